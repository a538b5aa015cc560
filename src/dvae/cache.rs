//! The token cache: tokenize every image of a dataset once and store the token grids in the
//! dataset file's tokens section, so pretraining can take the fast path (cached tokens of the
//! un-augmented image) instead of running the tokenizer on every augmented view.

use std::path::Path;

use rayon::prelude::*;

use crate::data::dataset::{Dataset, DatasetHeader, DatasetSpec, DatasetWriter};
use crate::data::loader::{resample, Filter};
use crate::error::Result;

use super::{map_pixels, Dvae};

/// Images tokenized per pass.
const CACHE_BATCH: usize = 256;

/// The tokenizer's view of a whole image: HWC u8 → CHW in [0, 1], resized to `size`x`size` with
/// the loader's view-2 filter (Lanczos, antialiased), grey replicated when the tokenizer wants
/// more channels, then [`map_pixels`].
pub fn tokenizer_input(pixels: &[u8], channels: usize, height: usize, width: usize, dvae: &Dvae) -> Vec<f32> {
    let plane = height * width;
    let mut img = vec![0.0f32; channels * plane];
    for (p, px) in pixels.chunks_exact(channels).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            img[ch * plane + p] = v as f32 * (1.0 / 255.0);
        }
    }
    let size = dvae.config.image_size;
    let resized = if (height, width) == (size, size) {
        img
    } else {
        resample(&img, channels, height, width, (0, 0, height, width), (size, size), Filter::Lanczos, false)
    };
    let want = dvae.config.in_channels;
    let out: Vec<f32> = if channels == want { resized } else { resized.repeat(want) };
    out.into_iter().map(map_pixels).collect()
}

/// Writes `out`: a copy of `input` (pixels, labels, masks) whose every sample carries the visual
/// tokens `dvae` assigns to the whole image. `progress` hears the count done after each pass.
pub fn tokenize_dataset(
    dvae: &Dvae,
    input: &Dataset,
    out: &Path,
    mut progress: impl FnMut(usize),
) -> Result<DatasetHeader> {
    let h = input.header().clone();
    let channels = h.channels as usize;
    let want = dvae.config.in_channels;
    ensure!(
        channels == want || channels == 1,
        InvalidArgument,
        "the dataset has {channels} channels and the tokenizer takes {want}: they must agree (grey data is replicated)"
    );
    let grid = dvae.config.grid() as u32;
    let spec = DatasetSpec {
        height: h.height,
        width: h.width,
        channels: h.channels,
        labels: h.has_labels(),
        masks: h.has_masks(),
        token_grid: Some((grid, grid)),
    };
    let mut writer = DatasetWriter::create(out, spec)?;
    let per_image = dvae.config.tokens_per_image();
    for start in (0..input.len()).step_by(CACHE_BATCH) {
        let end = (start + CACHE_BATCH).min(input.len());
        let views: Vec<Vec<f32>> = (start..end)
            .into_par_iter()
            .map(|i| tokenizer_input(input.pixels(i), channels, h.height as usize, h.width as usize, dvae))
            .collect();
        let mapped = views.concat();
        let tokens = dvae.tokenize(&mapped)?;
        for (k, i) in (start..end).enumerate() {
            let grid_tokens: Vec<u16> = tokens[k * per_image..(k + 1) * per_image].iter().map(|&t| t as u16).collect();
            writer.push(input.pixels(i), input.label(i), input.mask(i), Some(&grid_tokens))?;
        }
        progress(end);
    }
    writer.finish()
}
