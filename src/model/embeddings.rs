//! The embeddings and the relative position biases of a pass, written once over [`Backend`]:
//! patch embedding (im2col + one GEMM), CLS and mask tokens, absolute positions (resized for
//! another grid as Hugging Face does), and the per-block attention bias gathered from the
//! shared and per-layer relative position tables (resized for another grid).

use crate::backend::memory::View;
use crate::backend::ops::TokenParams;
use crate::backend::shapes::PatchEmbedShape;
use crate::backend::Backend;
use crate::error::Result;

use super::block::BlockDims;
use super::forward::resize_position_embeddings;
use super::params::{BlockParams, ParamId};
use super::plan::ActivationPlan;
use super::relpos;
use super::{ImageBatch, Model};

impl Model {
    /// Whether the absolute position table is used as stored. HF keeps it when the patch count
    /// matches and the image is square, and resizes it otherwise (even at the configured size
    /// of a non-square config, where its resize then fails); we also keep it at the configured
    /// grid, so non-square configs work at their own size.
    pub(super) fn position_embeddings_fit(
        &self,
        positions: usize,
        height: usize,
        width: usize,
        grid: (usize, usize),
    ) -> bool {
        positions == grid.0 * grid.1 && (height == width || grid == self.config.native_grid())
    }

    fn patch_shape(&self, images: &ImageBatch<'_>) -> PatchEmbedShape {
        let (patch_h, patch_w) = self.config.patch_size.hw();
        PatchEmbedShape {
            batch: images.batch,
            channels: images.channels,
            height: images.height,
            width: images.width,
            patch_h,
            patch_w,
            hidden: self.config.hidden_size,
        }
    }

    /// The embeddings of `images` into the first block's input: the pixels are uploaded,
    /// split into patch rows (kept in `plan.patches`), projected, and assembled with the CLS
    /// token, the mask token where `images.bool_masked_pos` masks, and the positions. Also
    /// uploads the relative position index the blocks' biases read.
    pub(crate) fn embeddings_forward<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        images: &ImageBatch<'_>,
    ) -> Result<()> {
        let p = &self.params;
        let e = &self.layout.embeddings;
        let shape = self.patch_shape(images);
        let (b, n, k, d) = (images.batch, shape.num_patches(), shape.patch_len(), shape.hidden);
        be.upload(m, plan.pixels, images.pixels)?;
        be.im2col(m, plan.patches, plan.pixels, shape)?;
        let embedded = plan.embedded.prefix(b * n * d);
        be.linear(m, embedded, plan.patches, p.view(e.patch_weight), Some(p.view(e.patch_bias)), b * n, k, d)?;
        let mask = match images.bool_masked_pos {
            Some(mask) => {
                let mask: Vec<usize> = mask.iter().map(|&v| v as usize).collect();
                be.upload_indices(m, plan.mask, &mask)?;
                Some(plan.mask)
            }
            None => None,
        };
        let positions = match e.position_embeddings {
            Some(id) if plan.positions.is_empty() => Some(p.view(id)),
            Some(id) => {
                let pos = p.get(id);
                let resized = resize_position_embeddings(pos, d, pos.len() / d - 1, plan.grid);
                be.upload(m, plan.positions, &resized)?;
                Some(plan.positions)
            }
            None => None,
        };
        let tokens = TokenParams { cls: p.view(e.cls_token), mask_token: e.mask_token.map(|id| p.view(id)), positions };
        be.assemble_tokens(m, plan.layer(0).x, embedded, tokens, mask, b, n, d)?;
        if !plan.rel_index.is_empty() {
            be.upload_indices(m, plan.rel_index, &relpos::relative_position_index(plan.grid))?;
        }
        Ok(())
    }

    /// Backward of [`Model::embeddings_forward`]: `plan.scratch.dx` (dL/d(first block input))
    /// into the CLS token, mask token (where `masked`), absolute positions, and the patch
    /// projection (whose input rows are the patches kept from the forward).
    pub(crate) fn embeddings_backward<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        dims: BlockDims,
        masked: bool,
    ) -> Result<()> {
        let p = &self.params;
        let e = &self.layout.embeddings;
        let (b, n, d) = (dims.b, dims.t - 1, dims.d);
        let k = plan.patches.len() / (b * n);
        let dembedded = plan.embedded.prefix(b * n * d);
        let grads = TokenParams {
            cls: p.grad_view(e.cls_token),
            mask_token: e.mask_token.map(|id| p.grad_view(id)),
            positions: e.position_embeddings.map(|id| p.grad_view(id)),
        };
        let mask = masked.then_some(plan.mask);
        be.assemble_tokens_backward(m, dembedded, grads, plan.scratch.dx, mask, b, n, d)?;
        let (dw, db) = (p.grad_view(e.patch_weight), p.grad_view(e.patch_bias));
        be.linear_backward(m, None, dw, Some(db), dembedded, plan.patches, p.view(e.patch_weight), b * n, k, d)
    }

    /// A relative position table for the plan's grid: the stored parameter, or (for another
    /// grid, where the plan has a `table` view) its resize, uploaded into `plan.table`. Only a
    /// resize reads the host's parameter values (a pass whose parameters live on a device runs
    /// at the native grid).
    fn table_view<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        id: ParamId,
    ) -> Result<View> {
        if plan.table.is_empty() {
            return Ok(self.params.view(id));
        }
        let heads = self.config.num_attention_heads;
        let resized = relpos::resize_table(self.params.get(id), heads, self.config.native_grid(), plan.grid)
            .expect("a table view is planned only for a grid whose table is resized");
        be.upload(m, plan.table, &resized)?;
        Ok(plan.table)
    }

    /// Fills `plan.shared_bias` with the shared relative position bias; false if the model
    /// has none.
    pub(crate) fn shared_bias<B: Backend>(&self, be: &B, m: &mut B::Memory<'_>, plan: &ActivationPlan) -> Result<bool> {
        let Some(id) = self.layout.shared_rel_pos_table else {
            return Ok(false);
        };
        let table = self.table_view(be, m, plan, id)?;
        let heads = self.config.num_attention_heads;
        be.relpos_bias(m, plan.shared_bias, None, table, plan.rel_index, heads)?;
        Ok(true)
    }

    /// The attention bias of `block` into `plan.scratch.bias`: the shared bias (when
    /// `has_shared`) plus the block's own table (when it has one). False when there is neither.
    pub(crate) fn layer_bias<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        block: &BlockParams,
        has_shared: bool,
    ) -> Result<bool> {
        let bias = plan.scratch.bias;
        match (has_shared, block.rel_pos_table) {
            (false, None) => Ok(false),
            (true, None) => be.copy(m, bias, plan.shared_bias).map(|_| true),
            (has_shared, Some(id)) => {
                let table = self.table_view(be, m, plan, id)?;
                let shared = has_shared.then_some(plan.shared_bias);
                be.relpos_bias(m, bias, shared, table, plan.rel_index, self.config.num_attention_heads)?;
                Ok(true)
            }
        }
    }
}
