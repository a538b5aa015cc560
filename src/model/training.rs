//! The masked-image-modeling training pass, llm.c style: a forward that keeps what the backward
//! needs in views planned by [`Model::training_plan`] (one set per layer), then an explicit
//! backward per layer in reverse, written once over the [`Backend`] trait (the block itself is
//! `model/block.rs`). No autograd: every gradient is written out, each op's backward is checked
//! by finite differences in `backend::cpu`, the whole pass against PyTorch's gradients in
//! `tests/mim_gradients.rs`.
//!
//! What is kept per layer: the block input, both layer norm outputs and their statistics, the
//! fused `qkv`, what the backend's attention saves for its backward, the attention context, the
//! block's midpoint, the FC1 output and the GELU output, and, with layer scale, the two branch
//! outputs (their λ gradients need them).
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

use crate::backend::memory::{Arena, HostMemory, View};
use crate::backend::ops::{Backend, DxMode, Norm};
use crate::context::host_backend;
use crate::error::{Error, Result};
use crate::resources::{Bytes, Need};
use crate::tensor::checked_numel;

use super::block::{block_backward, block_forward, drop_factors, BlockDims};
use super::config::Architecture;
use super::forward::{pass_description, PIECES_HINT};
use super::params::{Affine, HeadParams};
use super::plan::{ActivationPlan, HEAD_BLOCK_ROWS};
use super::segmentation::head::BnMode;
use super::segmentation::plan::SegPlan;
use super::{ImageBatch, MimTarget, Model};

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

/// A planned pass: the views and their arena.
pub(super) type Planned = (ActivationPlan, Arena);

/// Reusable memory for training passes: the arena is planned for one (batch, height, width,
/// thread count) and kept until the shape changes.
#[derive(Debug, Default)]
pub struct TrainWorkspace {
    pub(super) planned: Option<Planned>,
    /// A segmentation model's head views, planned in the same arena after the backbone's.
    pub(super) segmentation: Option<SegPlan>,
    /// The head's rows and labels as the host lists them, before they are uploaded.
    pub(super) rows: Vec<usize>,
    pub(super) labels: Vec<usize>,
}

/// The host lists a head fills and uploads (kept in the workspace, reserved when it is
/// planned).
pub(crate) struct HeadLists<'a> {
    pub rows: &'a mut Vec<usize>,
    pub labels: &'a mut Vec<usize>,
}

impl TrainWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes held by the arena and the head's lists.
    pub fn bytes(&self) -> usize {
        let arena = self.planned.as_ref().map_or(0, |(_, a)| a.bytes());
        arena + (self.rows.capacity() + self.labels.capacity()) * std::mem::size_of::<usize>()
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

    /// The backbone's training forward on `be`: embeddings, every block (keeping what the
    /// backward needs), and `beit.layernorm` when the model has it; the backbone output is left
    /// in `plan.output` (`[batch, tokens, hidden]`). `factors`: drop path (`[layers, 2, batch]`).
    pub(crate) fn backbone_forward_train<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        images: &ImageBatch<'_>,
        factors: Option<&[f32]>,
    ) -> Result<BlockDims> {
        let dims = self.block_dims(images.batch, plan.tokens);
        self.embeddings_forward(be, m, plan, images)?;
        if let Some(f) = factors {
            be.upload(m, plan.factors, f)?;
        }
        let has_shared = self.shared_bias(be, m, plan)?;
        for (l, blk) in self.layout.blocks.iter().enumerate() {
            let has_bias = self.layer_bias(be, m, plan, blk, has_shared)?;
            let drop = factors.map(|_| drop_factors(plan.factors, l, dims));
            let (layer, out) = (plan.layer(l), plan.block_output(l));
            block_forward(be, m, &self.params, blk, layer, out, &plan.scratch, has_bias, dims, drop)?;
        }
        if let Some(ln) = &self.layout.final_layernorm {
            be.layer_norm(m, plan.x_out, dims.d, self.kept_norm(*ln, plan.output, plan.final_saved))?;
        }
        Ok(dims)
    }

    /// The backbone's backward on `be`. On entry `plan.output` holds dL/d(backbone output) (the
    /// head wrote it there); every backbone parameter's gradient is added to the `Grad` space.
    /// Heads that read intermediate hidden states add their gradients `hidden_grads[i] = (k,
    /// view of dL/d(hidden state k))`: k = L once `dx` holds dL/d(last block output), k = l once
    /// block l's backward has turned `dx` into the gradient of its input. `drop`: the forward had drop
    /// path factors; `masked`: it had a mask.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backbone_backward_train<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        dims: BlockDims,
        drop: bool,
        masked: bool,
        hidden_grads: &[(usize, View)],
    ) -> Result<()> {
        let p = &self.params;
        let sc = plan.scratch;
        let inject = |m: &mut B::Memory<'_>, k: usize| -> Result<()> {
            for &(_, g) in hidden_grads.iter().filter(|(i, _)| *i == k) {
                be.add_into(m, sc.dx, g)?;
            }
            Ok(())
        };
        // dL/d(output) → dL/d(x_out) in `dx`.
        match &self.layout.final_layernorm {
            Some(ln) => {
                let (dg, dbeta) = (p.grad_view(ln.weight), p.grad_view(ln.bias));
                let norm = self.kept_norm(*ln, plan.output, plan.final_saved);
                be.layer_norm_backward(m, sc.dx, dg, dbeta, plan.output, plan.x_out, norm, dims.d, DxMode::Overwrite)?;
            }
            None => be.copy(m, sc.dx, plan.x_out)?,
        }
        inject(m, self.layout.blocks.len())?;
        // The forward filled the shared bias (heads leave it alone); blocks reuse it. Its
        // table's gradient is summed over the blocks first, then added once.
        let has_shared = self.layout.shared_rel_pos_table.is_some();
        if has_shared {
            be.fill_zero(m, plan.shared_dtable)?;
        }
        let heads = dims.heads;
        for (l, blk) in self.layout.blocks.iter().enumerate().rev() {
            let has_bias = self.layer_bias(be, m, plan, blk, has_shared)?;
            let factors = drop.then(|| drop_factors(plan.factors, l, dims));
            block_backward(be, m, p, blk, plan.layer(l), &sc, has_bias, dims, factors)?;
            if has_bias {
                if has_shared {
                    be.relpos_bias_backward(m, plan.shared_dtable, sc.dbias, plan.rel_index, heads)?;
                }
                if let Some(id) = blk.rel_pos_table {
                    be.relpos_bias_backward(m, p.grad_view(id), sc.dbias, plan.rel_index, heads)?;
                }
            }
            inject(m, l)?;
        }
        if let Some(id) = self.layout.shared_rel_pos_table {
            be.add_into(m, p.grad_view(id), plan.shared_dtable)?;
        }
        self.embeddings_backward(be, m, plan, dims, masked)
    }

    /// A training layer norm with the affine `ln` into `out`, keeping `saved`.
    pub(super) fn kept_norm(&self, ln: Affine, out: View, saved: View) -> Norm {
        Norm { saved, ..self.norm(ln, out) }
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
        let TrainWorkspace { planned, rows, labels, .. } = ws;
        let (plan, arena) = planned.as_mut().expect("planned above");
        let mut m = HostMemory::new(arena, &self.params.data, grads);
        let factors = drop_path.map(|dp| dp.factors);
        let host = HeadLists { rows, labels };
        self.mim_pass(&host_backend(), &mut m, plan, batch, target, factors, total_masked, host)
    }

    /// The MIM pass on `be` (see [`Model::mim_loss_sum`]). The head runs on the masked positions
    /// only: their rows are gathered (in `[batch, patch]` order, as `logits[bool_masked_pos]`
    /// orders them), normalised and projected a block of rows at a time (the block's logits
    /// stay in cache from the GEMM through the fused loss to the head's backward).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mim_pass<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        batch: &MimBatch<'_>,
        target: MimTarget,
        factors: Option<&[f32]>,
        total_masked: usize,
        host: HeadLists<'_>,
    ) -> Result<f64> {
        let p = &self.params;
        let images = batch.images();
        let dims = self.backbone_forward_train(be, m, plan, &images, factors)?;
        let (t, d, v) = (dims.t, dims.d, self.config.vocab_size);
        let n = t - 1;
        // The masked rows of the hidden state, and their targets: visual tokens, or (for the
        // pixel target) the rows of the forward's patches (the input pixels in (channel, row,
        // column) order, taken before the mask token replaced the patch).
        let HeadLists { rows, labels } = host;
        rows.clear();
        labels.clear();
        for (i, _) in batch.bool_masked_pos.iter().enumerate().filter(|&(_, &mk)| mk == 1) {
            rows.push((i / n) * t + 1 + i % n);
            labels.push(match target {
                MimTarget::VisualTokens => batch.labels[i] as usize,
                MimTarget::Pixels => i,
            });
        }
        let count = rows.len();
        let (rows_v, labels_v) = (plan.rows.prefix(count), plan.labels.prefix(count));
        be.upload_indices(m, rows_v, rows)?;
        be.upload_indices(m, labels_v, labels)?;
        // (The pixel target's head is as wide as a patch row: checked with the target.)
        let targets = match target {
            MimTarget::Pixels => plan.targets.prefix(count * v),
            MimTarget::VisualTokens => plan.targets.prefix(0),
        };
        if target == MimTarget::Pixels {
            be.gather_rows(m, targets, plan.patches, labels_v, v)?;
        }
        let (head_ln, lm_head) = match &self.layout.head {
            HeadParams::MaskedImageModeling { layernorm, lm_head } => (*layernorm, *lm_head),
            _ => unreachable!("checked: a MIM model"),
        };
        let (gathered, normed) = (plan.gathered.prefix(count * d), plan.head_normed.prefix(count * d));
        be.gather_rows(m, gathered, plan.output, rows_v, d)?;
        let norm = self.kept_norm(head_ln, normed, plan.head_saved.prefix(be.layer_norm_saved_len(count)));
        be.layer_norm(m, gathered, d, norm)?;
        // Outputs, loss, output gradient and the head's backward, a block of rows at a time.
        let dnormed = plan.scratch.dnormed.prefix(count * d);
        let (w, bias) = (p.view(lm_head.weight), p.view(lm_head.bias));
        let (dw, db) = (p.grad_view(lm_head.weight), p.grad_view(lm_head.bias));
        let block = HEAD_BLOCK_ROWS.min(count);
        for start in (0..count).step_by(block) {
            let r = block.min(count - start);
            let (logits, x) = (plan.logits.prefix(r * v), normed.sub(start * d, r * d));
            be.linear(m, logits, x, w, Some(bias), r, d, v)?;
            match target {
                MimTarget::VisualTokens => {
                    be.cross_entropy(m, logits, labels_v.sub(start, r), v, None, total_masked)?
                }
                MimTarget::Pixels => {
                    be.mean_squared_error(m, logits, targets.sub(start * v, r * v), v, total_masked)?
                }
            }
            be.linear_backward(m, Some(dnormed.sub(start * d, r * d)), dw, Some(db), logits, x, w, r, d, v)?;
        }
        let dgathered = plan.scratch.dbranch.prefix(count * d);
        let (dg, dbeta) = (p.grad_view(head_ln.weight), p.grad_view(head_ln.bias));
        be.layer_norm_backward(m, dgathered, dg, dbeta, dnormed, gathered, norm, d, DxMode::Overwrite)?;
        // Scatter back: unmasked rows and CLS get no gradient from the loss.
        be.scatter_rows(m, plan.output, dgathered, rows_v, d)?;
        let loss = be.take_loss(m)?;
        self.backbone_backward_train(be, m, plan, dims, factors.is_some(), true, &[])?;
        Ok(loss)
    }

    /// Plans `ws` for `images` unless it already is: the plan's memory (the arena with every
    /// activation, index and head buffer, the attention kernels' scratch, the host lists of
    /// the head) is tested against the budget first, and reserved here, so the pass itself
    /// allocates nothing large.
    fn prepare_train_workspace(&self, ws: &mut TrainWorkspace, images: &ImageBatch<'_>) -> Result<()> {
        let threads = rayon::current_num_threads().max(1);
        let key = (images.batch, images.height, images.width, threads);
        let segmentation = self.arch == Architecture::SemanticSegmentation;
        if ws.planned.as_ref().is_some_and(|(p, _)| p.key == key) && ws.segmentation.is_some() == segmentation {
            return Ok(());
        }
        self.check_pass_countable(images.batch, images.height, images.width)?;
        let be = host_backend();
        let (plan, mut arena_plan) = self.training_plan(&be, images.batch, images.height, images.width);
        let (b, t) = (images.batch, plan.tokens);
        let hw = (images.height, images.width);
        let seg_plan = segmentation.then(|| self.segmentation_views(&mut arena_plan, b, hw, BnMode::Train));
        let positions = b * (t - 1);
        let scratch = self.attention_scratch_bytes(threads, t);
        let need = Bytes::floats(&[arena_plan.act_total()])
            + Bytes::of::<usize>(&[arena_plan.index_total()])
            + Bytes::of::<usize>(&[positions]) * 2
            + scratch;
        let what = format!("the training activations of {}", pass_description(b, images.height, images.width, Some(t)));
        Need::new(what, need).hint(PIECES_HINT).check()?;
        ws.planned = None; // free the old arena before allocating the new one
        ws.segmentation = None;
        for list in [&mut ws.rows, &mut ws.labels] {
            list.clear();
            list.try_reserve_exact(positions)
                .map_err(|_| Error::InvalidArgument("cannot allocate the head's row lists: out of memory".into()))?;
        }
        ws.planned = Some((plan, Arena::new(&arena_plan)?));
        ws.segmentation = seg_plan;
        Ok(())
    }

    /// Floats of the activations (the arena without the head's logits and targets) a training
    /// pass over `images` plans.
    pub(super) fn train_arena_len(&self, images: &ImageBatch<'_>) -> usize {
        let (plan, planner) = self.training_plan(&host_backend(), images.batch, images.height, images.width);
        planner.act_total() - plan.head_len()
    }
}
