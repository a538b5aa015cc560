//! The masked-image-modeling training pass, llm.c style: a forward that keeps what the backward
//! needs in a planned arena (one set of slots per layer), then an explicit backward per layer in
//! reverse. No autograd: every gradient below is written out, and each op's backward is checked
//! by finite differences in `backend::cpu`, the whole pass against PyTorch's gradients in
//! `tests/mim_gradients.rs`.
//!
//! What is kept per layer: the block input `x`, the fused `qkv`, the attention probabilities,
//! the attention context, the block's midpoint (after the attention residual), GELU'(FC1 output)
//! (the forward saves the GELU's derivative, not its input: the backward then costs one multiply)
//! and the GELU output, both layer norm outputs, and, with layer scale, the two
//! branch outputs (their λ gradients need them).
//!
//! The backbone part (embeddings, blocks, `beit.layernorm`) is shared by every training head:
//! [`Model::backbone_forward_train`] leaves the backbone output in a slot, the head computes its
//! loss and writes dL/d(output) over that slot, and [`Model::backbone_backward_train`] takes it
//! from there. The classification head lives in `classify.rs`.
//!
//! The MIM head runs on the masked positions only: their rows are gathered (in `[batch, patch]`
//! order, as `logits[bool_masked_pos]` orders them), normalised and projected; the loss is the
//! mean over all masked positions of the batch of the [`MimTarget`]'s per-patch loss
//! (cross-entropy against the visual token, or the mean squared error against the patch's
//! pixels), fused with its output gradient.

use std::ops::Range;

use crate::backend::cpu::backward::{add_into, layernorm_backward, linear_backward};
use crate::backend::cpu::cross_entropy::cross_entropy_fused_part;
use crate::backend::cpu::gemm::linear;
use crate::backend::cpu::layernorm::layernorm;
use crate::backend::cpu::mean_squared_error::mse_fused_part;
use crate::backend::memory::{Arena, HostMemory, View};
use crate::backend::ops::{Backend, DxMode};
use crate::context::host_backend;
use crate::error::{Error, Result};
use crate::resources::{Bytes, Need};
use crate::tensor::checked_numel;

use super::block::{block_backward, block_forward, drop_factors, BlockDims};
use super::config::Architecture;
use super::forward::{pass_description, PIECES_HINT};
use super::params::{Affine, HeadParams, ParamId, ParamStore};
use super::plan::ActivationPlan;
use super::relpos;
use super::{ImageBatch, MimTarget, Model};

/// Masked rows per block of the MIM head (logits of one block: rows × vocab floats, 8 MB for
/// BEiT's 8192 tokens, so they stay in cache from the GEMM through the loss to the backward).
const HEAD_BLOCK_ROWS: usize = 256;

/// One pretraining batch as the host supplies it: pixels, the masked positions, and the visual
/// token of every patch (only the masked ones count; not read for the pixel target).
#[derive(Debug, Clone, Copy)]
pub struct MimBatch<'a> {
    /// `[batch, channels, height, width]`, f32.
    pub pixels: &'a [f32],
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `[batch, patches]`, 0 or 1.
    pub bool_masked_pos: &'a [u8],
    /// `[batch, patches]`, visual token ids in `[0, vocab_size)` where masked (others ignored).
    /// Not read for [`MimTarget::Pixels`], and may then be empty.
    pub labels: &'a [i64],
}

impl<'a> MimBatch<'a> {
    pub(super) fn images(&self) -> ImageBatch<'a> {
        ImageBatch {
            pixels: self.pixels,
            batch: self.batch,
            channels: self.channels,
            height: self.height,
            width: self.width,
            bool_masked_pos: Some(self.bool_masked_pos),
        }
    }

    /// Number of masked positions (the rows the loss averages over).
    pub fn masked_count(&self) -> usize {
        self.bool_masked_pos.iter().filter(|&&m| m == 1).count()
    }

    /// The images `images` of this batch (a data-parallel shard), with their masks and labels.
    pub(super) fn shard(&self, images: Range<usize>) -> MimBatch<'a> {
        let pixels_each = self.pixels.len() / self.batch;
        let patches_each = self.bool_masked_pos.len() / self.batch;
        let (a, b) = (images.start, images.end);
        MimBatch {
            pixels: &self.pixels[a * pixels_each..b * pixels_each],
            batch: b - a,
            bool_masked_pos: &self.bool_masked_pos[a * patches_each..b * patches_each],
            // Checked to hold every patch for the token target; the pixel target reads none.
            labels: self.labels.get(a * patches_each..b * patches_each).unwrap_or(&[]),
            ..*self
        }
    }
}

/// Stochastic depth factors for one pass: for block `l`, branch `r` (0 attention, 1 MLP) and
/// image `b`, `factors[(l·2 + r)·batch + b]` is 0 (branch dropped) or `1/keep` (kept, rescaled).
#[derive(Debug, Clone, Copy)]
pub struct DropPath<'a> {
    pub factors: &'a [f32],
}

/// A planned pass: the views, their arena, and the relative position index of the grid.
pub(super) type Planned = (ActivationPlan, Arena, Vec<usize>);

/// Reusable memory for training passes: the arena is planned for one (batch, height, width,
/// thread count) and kept until the shape changes; logits grow to the largest masked count seen.
#[derive(Debug, Default)]
pub struct TrainWorkspace {
    pub(super) planned: Option<Planned>,
    pub(super) logits: Vec<f32>,
    masked_rows: Vec<usize>,
    masked_labels: Vec<usize>,
    /// The pixel target's rows: each masked patch's input pixels, `[masked, P·P·C]`.
    masked_pixels: Vec<f32>,
}

impl TrainWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held by the arena and the logits buffer.
    pub fn bytes(&self) -> usize {
        let arena = self.planned.as_ref().map_or(0, |(_, a, _)| a.len());
        (arena + self.logits.capacity()) * std::mem::size_of::<f32>()
    }
}

impl Model {
    /// Checks the images of a training batch: a valid input at the configured grid (training
    /// plans its arena for the position tables as stored) with finite pixels.
    pub(super) fn check_train_images(&self, images: &ImageBatch<'_>) -> Result<()> {
        self.check_input(images)?;
        let grid = self.config.grid_for(images.height, images.width);
        ensure!(
            grid == self.config.native_grid(),
            InvalidArgument,
            "training runs at the configured image size {}x{} ({:?} patches); this batch is {}x{}",
            self.config.image_size.hw().0,
            self.config.image_size.hw().1,
            self.config.native_grid(),
            images.height,
            images.width
        );
        if let Some(i) = images.pixels.iter().position(|v| !v.is_finite()) {
            bail!(
                InvalidArgument,
                "pixel_values[{i}] is {} (image {}): pixels must be finite",
                images.pixels[i],
                i / (images.channels * images.height * images.width)
            );
        }
        Ok(())
    }

    /// Checks a pretraining batch for `target` (and that this model's head fits the target);
    /// every problem is a readable error and nothing is computed.
    pub fn check_mim_batch(&self, batch: &MimBatch<'_>, target: MimTarget) -> Result<()> {
        ensure!(
            self.arch == Architecture::MaskedImageModeling,
            InvalidArgument,
            "pretraining needs a BeitForMaskedImageModeling model; this one is {}",
            self.arch.hf_name()
        );
        target.check_config(&self.config)?;
        self.check_train_images(&batch.images())?;
        ensure!(batch.masked_count() > 0, InvalidArgument, "bool_masked_pos masks no patch: the MIM loss is undefined");
        if target == MimTarget::Pixels {
            return Ok(()); // the labels are not read
        }
        let grid = self.config.native_grid();
        let n = grid.0 * grid.1;
        ensure!(
            checked_numel(&[batch.batch, n]) == Some(batch.labels.len()),
            InvalidArgument,
            "labels hold {} values; [batch {}, patches {n}] needs {}",
            batch.labels.len(),
            batch.batch,
            batch.batch * n
        );
        let vocab = self.config.vocab_size as i64;
        for (i, (&m, &label)) in batch.bool_masked_pos.iter().zip(batch.labels).enumerate() {
            ensure!(
                m == 0 || (0..vocab).contains(&label),
                InvalidArgument,
                "label {label} of masked patch {} in image {} is outside the vocabulary [0, {vocab})",
                i % n,
                i / n
            );
        }
        Ok(())
    }

    /// Checks the gradient buffer and the drop path factors of a pass over `batch` images, and
    /// plans `ws` for the batch's shape. Shared by every training head.
    pub(super) fn begin_train_pass(
        &self,
        ws: &mut TrainWorkspace,
        images: &ImageBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        grads: &[f32],
    ) -> Result<()> {
        self.check_train_buffers(images.batch, drop_path, grads)?;
        self.prepare_train_workspace(ws, images)
    }

    /// The caller's buffers of a training pass over `batch` images: `grads` laid out like the
    /// parameters, drop path factors (when given) `[layers, 2, batch]`.
    pub(super) fn check_train_buffers(
        &self,
        batch: usize,
        drop_path: Option<DropPath<'_>>,
        grads: &[f32],
    ) -> Result<()> {
        ensure!(
            grads.len() == self.params.data.len(),
            InvalidArgument,
            "gradient buffer holds {} values; the model has {}",
            grads.len(),
            self.params.data.len()
        );
        let layers = self.layout.blocks.len();
        if let Some(dp) = drop_path {
            ensure!(
                dp.factors.len() == layers * 2 * batch,
                InvalidArgument,
                "drop path factors hold {} values; [layers {layers}, 2, batch {batch}] needs {}",
                dp.factors.len(),
                layers * 2 * batch
            );
        }
        Ok(())
    }

    /// The backbone's training forward: embeddings, every block (keeping what the backward
    /// needs), and `beit.layernorm` when the model has it. Returns the pass's shapes and the
    /// view holding the backbone output (`[batch, tokens, hidden]`).
    pub(super) fn backbone_forward_train(
        &self,
        planned: &mut Planned,
        images: &ImageBatch<'_>,
        factors: Option<&[f32]>,
    ) -> Result<(BlockDims, View)> {
        let be = host_backend();
        let (plan, arena, rel_index) = planned;
        let dims = self.block_dims(images.batch, plan.tokens);
        {
            let [patches, x0, tmp] = arena.many_mut([plan.patches, plan.layer(0).x, plan.embedded]);
            self.embed_into(images, plan.grid, patches, x0, tmp);
        }
        if let Some(f) = factors {
            arena.get_mut(plan.factors).copy_from_slice(f);
        }
        let has_shared = self.shared_bias_into(arena.get_mut(plan.shared_bias), plan.grid, rel_index);
        for (l, blk) in self.layout.blocks.iter().enumerate() {
            let has_bias = {
                let [shared, bias] = arena.many_mut([plan.shared_bias, plan.scratch.bias]);
                self.layer_bias_into(bias, has_shared.then_some(&*shared), blk, plan.grid, rel_index)
            };
            let drop = factors.map(|_| drop_factors(plan.factors, l, dims));
            let mut m = HostMemory::new(arena, &self.params.data, &mut []);
            let (layer, out) = (plan.layer(l), plan.block_output(l));
            block_forward(&be, &mut m, &self.params, blk, layer, out, &plan.scratch, has_bias, dims, drop)?;
        }
        if let Some(ln) = &self.layout.final_layernorm {
            let mut m = HostMemory::new(arena, &self.params.data, &mut []);
            be.layer_norm(&mut m, plan.x_out, dims.d, self.norm(*ln, plan.output))?;
        }
        Ok((dims, plan.output))
    }

    /// The backbone's backward. On entry the view returned by [`Model::backbone_forward_train`]
    /// holds dL/d(backbone output) (the head wrote it there); every backbone parameter's
    /// gradient is added to `grads`. Heads that read intermediate hidden states add their
    /// gradient through `inject(k, dx)`: called with k = L once `dx` holds dL/d(last block
    /// output), then with k = l once block l's backward has turned `dx` into the gradient of its
    /// input (so `dx` is complete when the embeddings' backward runs).
    pub(super) fn backbone_backward_train(
        &self,
        planned: &mut Planned,
        images: &ImageBatch<'_>,
        dims: BlockDims,
        factors: Option<&[f32]>,
        grads: &mut [f32],
        inject: &mut dyn FnMut(usize, &mut [f32]),
    ) -> Result<()> {
        let be = host_backend();
        let (plan, arena, rel_index) = planned;
        let p = &self.params;
        let sc = plan.scratch;
        // dL/dhidden → dL/dx_out in the `dx` view.
        match &self.layout.final_layernorm {
            Some(ln) => {
                let mut m = HostMemory::new(arena, &p.data, grads);
                let (dg, dbeta) = (p.grad_view(ln.weight), p.grad_view(ln.bias));
                let norm = self.norm(*ln, plan.output);
                be.layer_norm_backward(
                    &mut m,
                    sc.dx,
                    dg,
                    dbeta,
                    plan.output,
                    plan.x_out,
                    norm,
                    dims.d,
                    DxMode::Overwrite,
                )?;
            }
            None => {
                let [dx, dh] = arena.many_mut([sc.dx, plan.x_out]);
                dx.copy_from_slice(dh);
            }
        }
        inject(self.layout.blocks.len(), arena.get_mut(sc.dx));
        // The forward filled the shared bias view (heads leave it alone); blocks reuse it.
        let has_shared = self.layout.shared_rel_pos_table.is_some();
        // Backward through the blocks, last first. The shared table collects every layer's
        // bias gradient in `shared_dtable`.
        let mut shared_dtable = self.layout.shared_rel_pos_table.map(|id| vec![0.0f32; p.specs[id.0].len]);
        for (l, blk) in self.layout.blocks.iter().enumerate().rev() {
            let has_bias = {
                let [shared, bias] = arena.many_mut([plan.shared_bias, sc.bias]);
                self.layer_bias_into(bias, has_shared.then_some(&*shared), blk, plan.grid, rel_index)
            };
            let drop = factors.map(|_| drop_factors(plan.factors, l, dims));
            let mut m = HostMemory::new(arena, &p.data, grads);
            block_backward(&be, &mut m, p, blk, plan.layer(l), &sc, has_bias, dims, drop)?;
            if has_bias {
                let dbias = arena.get(sc.dbias);
                if let Some(dt) = shared_dtable.as_deref_mut() {
                    relpos::add_bias_backward(dt, dbias, dims.heads, rel_index);
                }
                if let Some(id) = blk.rel_pos_table {
                    relpos::add_bias_backward(grad_of(p, grads, id), dbias, dims.heads, rel_index);
                }
            }
            inject(l, arena.get_mut(sc.dx));
        }
        if let (Some(id), Some(dt)) = (self.layout.shared_rel_pos_table, shared_dtable) {
            add_into(grad_of(p, grads, id), &dt);
        }
        self.embeddings_backward(arena, plan, images.bool_masked_pos, dims, grads);
        Ok(())
    }

    /// Runs the MIM forward and backward on `batch` for `target`, ADDS the gradient of the loss
    /// to `grads` (laid out like the parameters), and returns the loss (the mean over all masked
    /// positions of the target's per-patch loss, see [`MimTarget`]). `drop_path` applies
    /// stochastic depth; `None` is the deterministic model.
    pub fn mim_forward_backward(
        &self,
        ws: &mut TrainWorkspace,
        batch: &MimBatch<'_>,
        target: MimTarget,
        drop_path: Option<DropPath<'_>>,
        grads: &mut [f32],
    ) -> Result<f64> {
        self.check_mim_batch(batch, target)?;
        let masked = batch.masked_count();
        Ok(self.mim_loss_sum(ws, batch, target, drop_path, masked, grads)? / masked as f64)
    }

    /// The MIM pass over `batch` for `target`, part of a larger batch with `total_masked` masked
    /// positions in all (the loss is their mean, so this part's output gradients are scaled by
    /// 1/`total_masked`): ADDS this part's gradient to `grads` and returns the sum of its
    /// masked positions' losses. For the whole batch (`total_masked` =
    /// `batch.masked_count()`) it is [`Model::mim_forward_backward`] before the division; for a
    /// data-parallel shard the shards' sums add up to the whole batch's. `batch` is checked by
    /// the caller; a part without masked positions adds nothing and returns 0.
    pub(super) fn mim_loss_sum(
        &self,
        ws: &mut TrainWorkspace,
        batch: &MimBatch<'_>,
        target: MimTarget,
        drop_path: Option<DropPath<'_>>,
        total_masked: usize,
        grads: &mut [f32],
    ) -> Result<f64> {
        let images = batch.images();
        self.begin_train_pass(ws, &images, drop_path, grads)?;
        if batch.masked_count() == 0 {
            // No loss term reaches this part: every gradient it would add is zero.
            return Ok(0.0);
        }
        let TrainWorkspace { planned, logits, masked_rows, masked_labels, masked_pixels } = ws;
        let planned = planned.as_mut().expect("planned above");
        let factors = drop_path.map(|dp| dp.factors);
        let (dims, hidden) = self.backbone_forward_train(planned, &images, factors)?;
        let (plan, arena, _) = &mut *planned;

        // MIM head on the masked rows, loss and output gradient fused. The targets: the masked
        // patches' labels, or their rows of the forward's im2col patches (the input pixels in
        // (channel, row, column) order, taken before the mask token replaced the patch).
        let n = dims.t - 1;
        let v = self.config.vocab_size;
        masked_rows.clear();
        masked_labels.clear();
        masked_pixels.clear();
        let patches = arena.get(plan.patches);
        for (i, _) in batch.bool_masked_pos.iter().enumerate().filter(|&(_, &m)| m == 1) {
            masked_rows.push((i / n) * dims.t + 1 + i % n);
            match target {
                MimTarget::VisualTokens => masked_labels.push(batch.labels[i] as usize),
                MimTarget::Pixels => masked_pixels.extend_from_slice(&patches[i * v..(i + 1) * v]),
            }
        }
        let m = masked_rows.len();
        let (head_ln, lm_head) = match &self.layout.head {
            HeadParams::MaskedImageModeling { layernorm, lm_head } => (*layernorm, *lm_head),
            _ => unreachable!("checked: a MIM model"),
        };
        let block = HEAD_BLOCK_ROWS.min(m);
        logits.resize(block * v, 0.0);
        let d = dims.d;
        let mut loss_sum = 0.0;
        {
            let [h, gathered, head_normed, dgathered, dnormed_rows] =
                arena.many_mut([hidden, plan.gathered, plan.head_normed, plan.scratch.dbranch, plan.scratch.dnormed]);
            let (gathered, head_normed) = (&mut gathered[..m * d], &mut head_normed[..m * d]);
            for (dst, &row) in gathered.chunks_exact_mut(d).zip(masked_rows.iter()) {
                dst.copy_from_slice(&h[row * d..(row + 1) * d]);
            }
            let p = &self.params;
            layernorm(head_normed, gathered, p.get(head_ln.weight), p.get(head_ln.bias), d, dims.eps);
            // Outputs, loss, output gradient and the head's backward, a block of rows at a time:
            // the block's outputs stay in cache between the four passes over them.
            let dnormed_rows = &mut dnormed_rows[..m * d];
            for start in (0..m).step_by(block) {
                let r = block.min(m - start);
                let rows = &head_normed[start * d..(start + r) * d];
                let lg = &mut logits[..r * v];
                linear(lg, rows, p.get(lm_head.weight), Some(p.get(lm_head.bias)), r, d, v);
                loss_sum += match target {
                    MimTarget::VisualTokens => {
                        cross_entropy_fused_part(lg, &masked_labels[start..start + r], v, total_masked)
                    }
                    MimTarget::Pixels => {
                        mse_fused_part(lg, &masked_pixels[start * v..(start + r) * v], v, total_masked)
                    }
                };
                let (dw, db) = grads_pair(&self.params, grads, lm_head);
                let dx = &mut dnormed_rows[start * d..(start + r) * d];
                linear_backward(Some(dx), dw, Some(db), lg, rows, p.get(lm_head.weight), r, d, v);
            }
            let dgathered = &mut dgathered[..m * d];
            let (dg, dbeta) = grads_pair(&self.params, grads, head_ln);
            layernorm_backward(
                dgathered,
                dg,
                dbeta,
                dnormed_rows,
                gathered,
                p.get(head_ln.weight),
                d,
                dims.eps,
                DxMode::Overwrite,
            );
            // Scatter back: unmasked rows and CLS get no gradient from the loss.
            h.fill(0.0);
            for (src, &row) in dgathered.chunks_exact(d).zip(masked_rows.iter()) {
                h[row * d..(row + 1) * d].copy_from_slice(src);
            }
        }
        self.backbone_backward_train(planned, &images, dims, factors, grads, &mut |_, _| {})?;
        Ok(loss_sum)
    }

    /// Runs the backbone forward of a training pass for `images` (at the configured size) and
    /// returns hidden states `indices` (each `[batch, tokens, hidden]`: the input of block k, or
    /// the last block's output for k = L); the activations stay in `ws` for
    /// [`Model::backbone_train_backward`]. For heads outside this module (segmentation).
    pub(crate) fn backbone_train_forward(
        &self,
        ws: &mut TrainWorkspace,
        images: &ImageBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        indices: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        self.prepare_train_workspace(ws, images)?;
        let planned = ws.planned.as_mut().expect("planned above");
        self.backbone_forward_train(planned, images, drop_path.map(|d| d.factors))?;
        let (plan, arena, _) = planned;
        Ok(indices.iter().map(|&k| arena.get(plan.hidden_state(k)).to_vec()).collect())
    }

    /// The backward matching [`Model::backbone_train_forward`]: `hidden_grads[i]` is dL/d(hidden
    /// state `indices[i]`) (`[batch, tokens, hidden]`); parameter gradients are added to `grads`.
    pub(crate) fn backbone_train_backward(
        &self,
        ws: &mut TrainWorkspace,
        images: &ImageBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        indices: &[usize],
        hidden_grads: &[Vec<f32>],
        grads: &mut [f32],
    ) -> Result<()> {
        let planned = ws.planned.as_mut().expect("backbone_train_forward ran first");
        let dims = self.block_dims(images.batch, planned.0.tokens);
        // No head reads the backbone output (after `beit.layernorm`) here: its gradient is 0.
        let output = planned.0.output;
        planned.1.get_mut(output).fill(0.0);
        let mut inject = |k: usize, dx: &mut [f32]| {
            for (_, g) in indices.iter().zip(hidden_grads).filter(|(&i, _)| i == k) {
                add_into(dx, g);
            }
        };
        self.backbone_backward_train(planned, images, dims, drop_path.map(|d| d.factors), grads, &mut inject)
    }

    /// Plans `ws` for `images` unless it already is: the plan's memory (arena, relative
    /// position index, and the MIM head's logits block, masked rows and pixel targets) is tested
    /// against the budget first, and reserved here, so the pass itself allocates nothing large.
    fn prepare_train_workspace(&self, ws: &mut TrainWorkspace, images: &ImageBatch<'_>) -> Result<()> {
        let threads = rayon::current_num_threads().max(1);
        let key = (images.batch, images.height, images.width, threads);
        if ws.planned.as_ref().is_some_and(|(p, _, _)| p.key == key) {
            return Ok(());
        }
        self.check_pass_countable(images.batch, images.height, images.width)?;
        let (plan, arena_plan) = self.training_plan(&host_backend(), images.batch, images.height, images.width);
        let (b, t) = (images.batch, plan.tokens);
        let positions = b * (t - 1);
        let head = match self.arch {
            Architecture::MaskedImageModeling => {
                let v = self.config.vocab_size;
                Bytes::floats(&[HEAD_BLOCK_ROWS.min(positions), v])
                    + Bytes::of::<usize>(&[positions]) * 2
                    + Bytes::floats(&[plan.patches.len()])
            }
            Architecture::ImageClassification => Bytes::floats(&[b, self.config.num_labels()]),
            _ => Bytes::ZERO,
        };
        let scratch = self.attention_scratch_bytes(threads, t);
        let need = Bytes::floats(&[arena_plan.act_total()]) + Bytes::of::<usize>(&[t, t]) + head + scratch;
        let what = format!("the training activations of {}", pass_description(b, images.height, images.width, Some(t)));
        Need::new(what, need).hint(PIECES_HINT).check()?;
        ws.planned = None; // free the old arena before allocating the new one
        if self.arch == Architecture::MaskedImageModeling {
            fn reserve<T>(v: &mut Vec<T>, n: usize) -> std::result::Result<(), std::collections::TryReserveError> {
                v.clear();
                v.try_reserve_exact(n)
            }
            let v = self.config.vocab_size;
            reserve(&mut ws.logits, HEAD_BLOCK_ROWS.min(positions) * v)
                .and_then(|_| reserve(&mut ws.masked_rows, positions))
                .and_then(|_| reserve(&mut ws.masked_labels, positions))
                .and_then(|_| reserve(&mut ws.masked_pixels, plan.patches.len()))
                .map_err(|_| Error::InvalidArgument("cannot allocate the MIM head's buffers: out of memory".into()))?;
        } else if self.arch == Architecture::ImageClassification {
            ws.logits.clear();
            ws.logits
                .try_reserve_exact(b * self.config.num_labels())
                .map_err(|_| Error::InvalidArgument("cannot allocate the classifier's logits: out of memory".into()))?;
        }
        let rel_index = relpos::relative_position_index(plan.grid);
        ws.planned = Some((plan, Arena::new(&arena_plan)?, rel_index));
        Ok(())
    }

    /// Floats of the activation arena a training pass over `images` plans.
    pub(super) fn train_arena_len(&self, images: &ImageBatch<'_>) -> usize {
        self.training_plan(&host_backend(), images.batch, images.height, images.width).1.act_total()
    }

    /// Backward of the embeddings: `dx` (dL/d(first block input)) into the CLS token, mask
    /// token, absolute positions, and the patch projection (whose input rows are the im2col
    /// patches kept from the forward).
    fn embeddings_backward(
        &self,
        arena: &mut Arena,
        plan: &ActivationPlan,
        bool_masked_pos: Option<&[u8]>,
        dims: BlockDims,
        grads: &mut [f32],
    ) {
        let p = &self.params;
        let e = &self.layout.embeddings;
        let (b, t, d) = (dims.b, dims.t, dims.d);
        let n = t - 1;
        let [dx, patches, dembedded] = arena.many_mut([plan.scratch.dx, plan.patches, plan.embedded]);
        let dembedded = &mut dembedded[..b * n * d];
        // Small sums, run in image order so the result does not depend on threads.
        {
            let dcls = grad_of(p, grads, e.cls_token);
            for img in 0..b {
                add_into(dcls, &dx[img * t * d..img * t * d + d]);
            }
        }
        if let Some(pos) = e.position_embeddings {
            let dpos = grad_of(p, grads, pos);
            for img in 0..b {
                add_into(dpos, &dx[img * t * d..(img + 1) * t * d]);
            }
        }
        let mut dmask = e.mask_token.map(|_| vec![0.0f32; d]);
        for img in 0..b {
            for patch in 0..n {
                let src = &dx[(img * t + 1 + patch) * d..(img * t + 2 + patch) * d];
                let dst = &mut dembedded[(img * n + patch) * d..(img * n + patch + 1) * d];
                if bool_masked_pos.is_some_and(|m| m[img * n + patch] == 1) {
                    if let Some(dm) = dmask.as_mut() {
                        add_into(dm, src);
                    }
                    dst.fill(0.0);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
        if let (Some(id), Some(dm)) = (e.mask_token, dmask) {
            add_into(grad_of(p, grads, id), &dm);
        }
        let k = patches.len() / (b * n);
        let (dw, db) = grads_pair(p, grads, Affine { weight: e.patch_weight, bias: e.patch_bias });
        linear_backward(None, dw, Some(db), dembedded, patches, p.get(e.patch_weight), b * n, k, d);
    }
}

pub(super) fn grad_of<'g>(p: &ParamStore, grads: &'g mut [f32], id: ParamId) -> &'g mut [f32] {
    let s = &p.specs[id.0];
    &mut grads[s.offset..s.offset + s.len]
}

/// The gradients of a weight/bias pair (distinct entries, so two disjoint borrows).
pub(super) fn grads_pair<'g>(p: &ParamStore, grads: &'g mut [f32], pair: Affine) -> (&'g mut [f32], &'g mut [f32]) {
    let (w, b) = (&p.specs[pair.weight.0], &p.specs[pair.bias.0]);
    assert!(w.offset + w.len <= b.offset || b.offset + b.len <= w.offset, "weight and bias overlap");
    if w.offset < b.offset {
        let (lo, hi) = grads.split_at_mut(b.offset);
        (&mut lo[w.offset..w.offset + w.len], &mut hi[..b.len])
    } else {
        let (lo, hi) = grads.split_at_mut(w.offset);
        let bias = &mut lo[b.offset..b.offset + b.len];
        (&mut hi[..w.len], bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grads_pair_handles_both_orders() {
        let cfg = crate::model::BeitConfig::from_json_str(
            r#"{"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":16,
                "image_size":8,"patch_size":4,"num_channels":1,"vocab_size":4}"#,
        )
        .unwrap();
        let m = Model::new_random(cfg, Architecture::MaskedImageModeling, 0).unwrap();
        let mut g = vec![0.0f32; m.params.data.len()];
        let blk = &m.layout.blocks[0];
        let (w, b) = grads_pair(&m.params, &mut g, Affine { weight: blk.fc1_w, bias: blk.fc1_b });
        assert_eq!((w.len(), b.len()), (16 * 8, 16));
        let (b2, w2) = grads_pair(&m.params, &mut g, Affine { weight: blk.fc1_b, bias: blk.fc1_w });
        assert_eq!((b2.len(), w2.len()), (16, 16 * 8));
    }
}
