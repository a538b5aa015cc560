//! Changing a model's image size (fine-tuning at another resolution than pretraining): a copy of
//! the model whose config has the new `image_size` and whose position tables are resized for
//! the new patch grid, once, by the rules Hugging Face applies at run time (BEIT_SPEC §3.3, §3.6):
//!
//! - relative position bias tables (shared and per layer): the first M−3 rows as a
//!   (2w−1)×(2h−1) image per head, bilinear with align_corners=False, the 3 CLS rows kept
//!   ([`relpos::resize_table`]);
//! - absolute position embeddings: the patch part as a √N×√N grid, bicubic with
//!   align_corners=False, the CLS entry kept.
//!
//! So the resized model at its new size computes exactly what the original computes on inputs of
//! that size (HF `interpolate_pos_encoding=True`), and a directory saved from it loads in
//! `transformers` without any interpolation. (unilm instead refits tables with a scipy cubic at
//! load time; its numbers differ from HF's, and HF parity is what a saved directory needs.)
//! Checked against torch in `tests/resolution_change.rs`.

use crate::error::Result;

use super::config::Size2;
use super::forward::resize_position_embeddings;
use super::relpos;
use super::Model;

impl Model {
    /// This model for `(height, width)` inputs: same weights, position tables resized.
    pub fn with_image_size(&self, height: usize, width: usize) -> Result<Model> {
        let mut config = self.config.clone();
        config.image_size = if height == width { Size2::Square(height) } else { Size2::Rect([height, width]) };
        let old_grid = self.config.native_grid();
        let new_grid = config.native_grid();
        ensure!(
            new_grid.0 > 0 && new_grid.1 > 0,
            InvalidArgument,
            "image size {height}x{width} holds no {:?} patch",
            self.config.patch_size.hw()
        );
        let heads = self.config.num_attention_heads;
        let d = self.config.hidden_size;
        let mut out = Model::zeroed(config, self.arch)?;
        let position_id = self.layout.embeddings.position_embeddings;
        let mut tables: Vec<usize> = self.layout.blocks.iter().filter_map(|b| b.rel_pos_table.map(|id| id.0)).collect();
        tables.extend(self.layout.shared_rel_pos_table.map(|id| id.0));
        for (i, spec) in self.params.specs.iter().enumerate() {
            let src = &self.params.data[spec.offset..spec.offset + spec.len];
            let dst_spec = out.params.specs[i].clone();
            debug_assert_eq!(dst_spec.name, spec.name);
            let value: Vec<f32> = if tables.contains(&i) {
                relpos::resize_table(src, heads, old_grid, new_grid).unwrap_or_else(|| src.to_vec())
            } else if position_id.is_some_and(|id| id.0 == i) {
                let positions = spec.len / d - 1;
                if positions == new_grid.0 * new_grid.1 && old_grid == new_grid {
                    src.to_vec()
                } else {
                    ensure!(
                        old_grid.0 == old_grid.1,
                        Unsupported,
                        "absolute position embeddings of a non-square grid {old_grid:?} cannot be resized (HF cannot either)"
                    );
                    resize_position_embeddings(src, d, positions, new_grid)
                }
            } else {
                src.to_vec()
            };
            ensure!(
                value.len() == dst_spec.len,
                Internal,
                "{}: resized to {} values, the new layout has {}",
                spec.name,
                value.len(),
                dst_spec.len
            );
            out.params.data[dst_spec.offset..dst_spec.offset + dst_spec.len].copy_from_slice(&value);
        }
        Ok(out)
    }
}
