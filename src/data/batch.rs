//! A pretraining batch held in memory, and its safetensors file format (what `beit
//! pretrain-replay` reads and tests write): `pixel_values` f32 `[B, C, H, W]`, `bool_masked_pos`
//! u8 `[B, N]` and `labels` (any integer type) `[B, N]`, the visual token of every patch.

use std::path::Path;

use crate::error::Result;
use crate::model::io::{read_f32, read_i64, read_mask, SafetensorsFile};
use crate::model::MimBatch;

#[derive(Debug, Clone, PartialEq)]
pub struct OwnedMimBatch {
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
    pub pixels: Vec<f32>,
    pub bool_masked_pos: Vec<u8>,
    pub labels: Vec<i64>,
}

impl OwnedMimBatch {
    /// Reads a batch file; shapes are checked against each other (the model checks the rest).
    pub fn load(path: &Path) -> Result<Self> {
        let file = SafetensorsFile::open(path)?;
        let st = file.parse()?;
        let name = path.display();
        let Some((shape, pixels)) = read_f32(&st, "pixel_values")? else {
            bail!(Format, "{name} has no pixel_values tensor");
        };
        let Some((mshape, bool_masked_pos)) = read_mask(&st, "bool_masked_pos")? else {
            bail!(Format, "{name} has no bool_masked_pos tensor");
        };
        let Some((lshape, labels)) = read_i64(&st, "labels")? else {
            bail!(Format, "{name} has no labels tensor");
        };
        let shape: [usize; 4] = shape.try_into().map_err(|s: Vec<usize>| {
            crate::Error::Format(format!("{name}: pixel_values is {s:?}, expected [B,C,H,W]"))
        })?;
        ensure!(
            mshape.len() == 2 && mshape[0] == shape[0],
            Format,
            "{name}: bool_masked_pos is {mshape:?}; expected [{}, patches]",
            shape[0]
        );
        ensure!(lshape == mshape, Format, "{name}: labels are {lshape:?} but bool_masked_pos is {mshape:?}");
        Ok(OwnedMimBatch { shape, pixels, bool_masked_pos, labels })
    }

    pub fn as_batch(&self) -> MimBatch<'_> {
        let [batch, channels, height, width] = self.shape;
        MimBatch {
            pixels: &self.pixels,
            batch,
            channels,
            height,
            width,
            bool_masked_pos: &self.bool_masked_pos,
            labels: &self.labels,
        }
    }
}
