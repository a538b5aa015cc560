//! HF `BeitForSemanticSegmentation`: backbone hidden states `out_indices` (1-based into the
//! hidden states, whose entry 0 is the embeddings) without their CLS token, as `[hidden, gh, gw]`
//! maps, through the FPN rescaling, the UperNet decode head and (optionally) the FCN auxiliary
//! head ([`head`]). Inference runs BatchNorm on running statistics; the training pass
//! ([`Model::segmentation_forward_backward`]) on batch statistics, with HF's loss ([`loss`])
//! and a backward through the head into the backbone's shared backward (which takes the
//! gradients of the four intermediate hidden states).
//!
//! Both passes are written once over [`ImageOps`] ([`Model::segmentation_inference_pass`],
//! [`Model::segmentation_train_pass`]) in one memory: the backbone's plan and the head's
//! ([`SegPlan`]) share an arena, so the hidden states go from the backbone to the head (and
//! their gradients back) without leaving the device. The CPU runs them on the host backend
//! here; the GPU drivers (`train::gpu_inference`, `train::gpu_pretrain`) on CUDA.

pub mod head;
pub mod layout;
pub mod loss;
pub mod metrics;
pub mod plan;

use crate::backend::image_ops::ImageOps;
use crate::backend::memory::{Arena, HostMemory, Planner, View};
use crate::backend::Backend;
use crate::context::host_backend;
use crate::error::Result;
use crate::resources::{Bytes, Need};
use crate::tensor::checked_numel;

use super::forward::{OutputBuffers, PIECES_HINT};
use super::params::HeadParams;
use super::plan::ActivationPlan;
use super::training::{DropPath, TrainWorkspace};
use super::{Architecture, BeitConfig, ImageBatch, Model};
use head::{head_backward, head_forward, BnMode, BnRecord};
use layout::SegmentationHead;
pub(crate) use plan::SegPlan;

/// PyTorch BatchNorm2d's default momentum for the running statistics.
pub(crate) const BN_MOMENTUM: f32 = 0.1;

/// Memory of the segmentation head's part of a pass over `batch` images of `image` (h, w)
/// pixels, estimated from above. The head works at the finest FPN level, a plane of `16·gh·gw`
/// pixels: its forward tape (the level, the lateral and FPN convolutions' inputs,
/// pre-activations and outputs, the four upsampled maps and their concatenation) comes to fewer
/// than 24 maps of `hidden_size` channels there, 40 with the backward's gradients beside it; the
/// fusing 3x3 convolution over the concatenation keeps a column matrix of `36·hidden_size` rows
/// per image in flight (one per thread). The logits are `num_labels` maps at that level (3 with
/// their gradients in training), and the loss upsamples the logits of the decode and the
/// auxiliary head to the image and back (4 maps of `num_labels` channels at `h x w`; 1 at
/// evaluation). The pyramid pooling's maps at each pool scale come on top.
pub fn head_pass_bytes(cfg: &BeitConfig, batch: usize, image: (usize, usize), training: bool) -> Bytes {
    let (maps, logit_maps, image_maps) = if training { (40, 3, 4) } else { (24, 1, 1) };
    let (gh, gw) = cfg.grid_for(image.0, image.1);
    let (d, k) = (cfg.hidden_size, cfg.num_labels());
    let fine = gh.saturating_mul(gw).saturating_mul(16);
    // The pyramid pooling module pools the coarsest level to each scale s (up to 4096) and runs
    // a conv-BN-ReLU there: its input, pre-activation, output (and their gradients) at s x s.
    let pooling: Bytes = cfg.pool_scales().iter().map(|&s| Bytes::floats(&[s, s, d]) * (2 * logit_maps + 2)).sum();
    let per_image = Bytes::floats(&[maps, d, fine])
        + Bytes::floats(&[logit_maps, k, fine])
        + Bytes::floats(&[image_maps, k, image.0, image.1])
        + pooling;
    let in_flight = batch.min(rayon::current_num_threads()).max(1);
    per_image * batch + Bytes::floats(&[36, d, fine]) * in_flight
}

/// One fine-tuning batch: images and a label per pixel (`[batch, height, width]`, class ids in
/// `0..num_labels` or the ignore index).
#[derive(Debug, Clone, Copy)]
pub struct SegBatch<'a> {
    pub pixels: &'a [f32],
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub labels: &'a [i64],
}

impl<'a> SegBatch<'a> {
    pub(crate) fn images(&self) -> ImageBatch<'a> {
        ImageBatch {
            pixels: self.pixels,
            batch: self.batch,
            channels: self.channels,
            height: self.height,
            width: self.width,
            bool_masked_pos: None,
        }
    }
}

/// What one training pass returns besides the gradient.
#[derive(Debug, Clone)]
pub struct SegStep {
    /// HF's loss: decode loss + auxiliary_loss_weight · auxiliary loss.
    pub loss: f64,
    /// Batch statistics of every BatchNorm, for [`Model::apply_batchnorm_statistics`].
    pub batchnorm: Vec<BnRecord>,
}

/// `[b, tokens, d]` hidden states (CLS first) in `hidden` → `[b, d, gh, gw]` maps in `maps`.
fn tokens_to_maps<B: ImageOps>(
    be: &B,
    m: &mut B::Memory<'_>,
    maps: View,
    hidden: View,
    b: usize,
    n: usize,
    d: usize,
) -> Result<()> {
    let t = n + 1;
    for img in 0..b {
        be.transpose(m, maps.sub(img * d * n, d * n), hidden.sub((img * t + 1) * d, n * d), 1, n, d)?;
    }
    Ok(())
}

/// Inverse of [`tokens_to_maps`] for gradients (the CLS row gets none).
fn maps_to_tokens<B: ImageOps>(
    be: &B,
    m: &mut B::Memory<'_>,
    hidden: View,
    maps: View,
    b: usize,
    n: usize,
    d: usize,
) -> Result<()> {
    let t = n + 1;
    be.fill_zero(m, hidden)?;
    for img in 0..b {
        be.transpose(m, hidden.sub((img * t + 1) * d, n * d), maps.sub(img * d * n, d * n), 1, d, n)?;
    }
    Ok(())
}

impl Model {
    /// The segmentation head's layout (None for other architectures).
    pub fn segmentation_head(&self) -> Option<&SegmentationHead> {
        match &self.layout.head {
            HeadParams::Segmentation(h) => Some(h),
            _ => None,
        }
    }

    pub(crate) fn check_segmentation_grid(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let grid = self.config.grid_for(height, width);
        ensure!(
            grid.0 >= 2 && grid.1 >= 2,
            InvalidArgument,
            "segmentation needs a patch grid of at least 2x2 (the coarsest FPN level pools it by 2); \
             {height}x{width} gives {grid:?}"
        );
        Ok(grid)
    }

    /// Tests what a segmentation pass over `b` images of `height`x`width` allocates beside the
    /// backbone's arena (which is tested where it is planned) against the budget: the head
    /// ([`head_pass_bytes`]) and the copies of the hidden states it reads.
    pub(crate) fn check_segmentation_need(&self, b: usize, height: usize, width: usize, training: bool) -> Result<()> {
        let (gh, gw) = self.config.grid_for(height, width);
        let hidden = Bytes::floats(&[b, gh * gw + 1, self.config.hidden_size]) * 5;
        let need = head_pass_bytes(&self.config, b, (height, width), training) + hidden;
        let what = if training { "the segmentation head's training pass" } else { "the segmentation head" };
        Need::new(format!("{what} over {b} images of {height}x{width} pixels"), need).hint(PIECES_HINT).check()
    }

    /// Hidden-state indices (0-based into the hidden states) of the four FPN levels.
    fn level_indices(head: &SegmentationHead) -> [usize; 4] {
        head.out_indices.map(|i| i - 1)
    }

    /// The plan of a segmentation inference pass on `be`: the backbone's inference plan and the
    /// head's views after it, in one planner.
    /// (The backbone's plan alone for other models.)
    pub(crate) fn inference_plan_with_head<B: Backend>(
        &self,
        be: &B,
        b: usize,
        height: usize,
        width: usize,
    ) -> (ActivationPlan, Option<SegPlan>, Planner) {
        let (plan, mut planner) = self.inference_plan(be, b, height, width);
        let seg = (self.arch == Architecture::SemanticSegmentation)
            .then(|| self.segmentation_views(&mut planner, b, (height, width), BnMode::Eval));
        (plan, seg, planner)
    }

    /// Inference: `logits` `[batch, labels, 4gh, 4gw]` (decode head, BatchNorm on running
    /// statistics) and `last_hidden_state` when asked. Input already checked.
    pub(crate) fn segmentation_forward_into(&self, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        self.check_segmentation_grid(input.height, input.width)?;
        self.check_segmentation_need(input.batch, input.height, input.width, false)?;
        self.check_pass_countable(input.batch, input.height, input.width)?;
        let be = host_backend();
        let (plan, seg, planner) = self.inference_plan_with_head(&be, input.batch, input.height, input.width);
        let seg = seg.expect("a segmentation model");
        let mut arena = Arena::new(&planner)?;
        let mut m = HostMemory::new(&mut arena, &self.params.data, &mut []);
        self.segmentation_inference_pass(&be, &mut m, &plan, &seg, input, out)
    }

    /// The segmentation inference pass on `be` over a [`Model::inference_plan_with_head`] for
    /// `input` (checked, grid at least 2x2): the backbone, copying the four levels' hidden
    /// states on the way, its output (downloaded when asked), the head on the levels as maps,
    /// and the logits downloaded.
    pub(crate) fn segmentation_inference_pass<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        seg: &SegPlan,
        input: &ImageBatch<'_>,
        out: OutputBuffers<'_>,
    ) -> Result<()> {
        let head = self.segmentation_head().expect("a segmentation model");
        let (b, d, n) = (input.batch, self.config.hidden_size, plan.tokens - 1);
        let captures: Vec<(usize, View)> = Self::level_indices(head).into_iter().zip(seg.tokens).collect();
        self.backbone_output(be, m, plan, input, &captures, out.last_hidden_state)?;
        if let Some(dst) = out.logits {
            for (&(_, hidden), maps) in captures.iter().zip(seg.head.feats()) {
                tokens_to_maps(be, m, maps, hidden, b, n, d)?;
            }
            head_forward(be, m, &self.params, head, &seg.head)?;
            be.download(m, seg.head.logits, dst)?;
        }
        Ok(())
    }

    /// Checks a segmentation batch; every problem is a readable error.
    pub fn check_seg_batch(&self, batch: &SegBatch<'_>) -> Result<()> {
        ensure!(
            self.arch == Architecture::SemanticSegmentation,
            InvalidArgument,
            "segmentation training needs a BeitForSemanticSegmentation model; this one is {}",
            self.arch.hf_name()
        );
        self.check_input(&batch.images())?;
        self.check_segmentation_grid(batch.height, batch.width)?;
        ensure!(
            self.config.grid_for(batch.height, batch.width) == self.config.native_grid(),
            InvalidArgument,
            "training runs at the configured image size {:?}; this batch is {}x{}",
            self.config.image_size.hw(),
            batch.height,
            batch.width
        );
        ensure!(
            checked_numel(&[batch.batch, batch.height, batch.width]) == Some(batch.labels.len()),
            InvalidArgument,
            "labels hold {} values; [batch {}, {}, {}] needs {}",
            batch.labels.len(),
            batch.batch,
            batch.height,
            batch.width,
            batch.batch * batch.height * batch.width
        );
        if let Some(i) = batch.pixels.iter().position(|v| !v.is_finite()) {
            bail!(InvalidArgument, "pixel_values[{i}] is {}: pixels must be finite", batch.pixels[i]);
        }
        let (k, ignore) = (self.config.num_labels() as i64, self.config.semantic_loss_ignore_index());
        if let Some((i, &l)) = batch.labels.iter().enumerate().find(|(_, &l)| l != ignore && !(0..k).contains(&l)) {
            bail!(InvalidArgument, "label {l} at pixel {i} is neither in [0, {k}) nor the ignore index {ignore}");
        }
        // Training-mode BatchNorm needs more than one value per channel (PyTorch raises too):
        // the 1x1 pyramid pooling level has one value per image.
        ensure!(batch.batch >= 2, InvalidArgument, "segmentation training needs at least 2 images per batch");
        Ok(())
    }

    /// One training pass (BatchNorm on batch statistics): HF's loss, its gradient ADDED to
    /// `grads` (laid out like the parameters; BatchNorm buffers get none), and the batch
    /// statistics for the running update. `drop_path` as in pretraining.
    pub fn segmentation_forward_backward(
        &self,
        ws: &mut TrainWorkspace,
        batch: &SegBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        grads: &mut [f32],
    ) -> Result<SegStep> {
        self.check_seg_batch(batch)?;
        self.check_segmentation_need(batch.batch, batch.height, batch.width, true)?;
        self.begin_train_pass(ws, &batch.images(), drop_path, grads)?;
        let (plan, arena) = ws.planned.as_mut().expect("planned above");
        let seg = ws.segmentation.as_ref().expect("a segmentation model's workspace plans its head");
        let mut m = HostMemory::new(arena, &self.params.data, grads);
        self.segmentation_train_pass(&host_backend(), &mut m, plan, seg, batch, drop_path.map(|d| d.factors))
    }

    /// The segmentation training pass on `be` over a training plan with the head's views after
    /// it ([`Model::segmentation_views`], [`BnMode::Train`]) for `batch` (checked with
    /// [`Model::check_seg_batch`]): the backbone's training forward, its four levels as maps
    /// through the head, HF's loss on the decode (and auxiliary) logits with its gradient, the
    /// head's backward, and the backbone's backward with the levels' gradients added in.
    /// Parameter gradients are ADDED to the memory's gradient buffer.
    pub(crate) fn segmentation_train_pass<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        seg: &SegPlan,
        batch: &SegBatch<'_>,
        factors: Option<&[f32]>,
    ) -> Result<SegStep> {
        let head = self.segmentation_head().expect("checked");
        let (b, d, n) = (batch.batch, self.config.hidden_size, plan.tokens - 1);
        let levels = Self::level_indices(head);
        let dims = self.backbone_forward_train(be, m, plan, &batch.images(), factors)?;
        for (&k, maps) in levels.iter().zip(seg.head.feats()) {
            tokens_to_maps(be, m, maps, plan.hidden_state(k), b, n, d)?;
        }
        head_forward(be, m, &self.params, head, &seg.head)?;

        let k = head.num_labels;
        let (labels, counted) = loss::loss_labels(batch.labels, k, self.config.semantic_loss_ignore_index());
        be.upload_indices(m, seg.labels, &labels)?;
        let label_hw = (batch.height, batch.width);
        let (dlogits, daux) = seg.head.logit_grads();
        let (logits_hw, aux_hw) = seg.head.logits_hw();
        let pass = |m: &mut B::Memory<'_>, logits: View, dlogits: View, hw: (usize, usize)| {
            loss::segmentation_loss_pass(be, m, logits, dlogits, seg.up, seg.labels, counted, (b, k), hw, label_hw)
        };
        let mut loss = pass(m, seg.head.logits, dlogits, logits_hw)?;
        if let Some(aux) = seg.head.aux_logits() {
            let weight = self.config.auxiliary_loss_weight();
            loss += weight * pass(m, aux, daux, aux_hw)?;
            be.scale(m, daux, weight as f32)?;
        }
        head_backward(be, m, &self.params, head, &seg.head)?;
        for (&dhidden, maps) in seg.tokens.iter().zip(seg.head.feat_grads()) {
            maps_to_tokens(be, m, dhidden, maps, b, n, d)?;
        }
        let batchnorm = seg.head.bn_records(be, m, head)?;
        // No head reads the backbone output (after `beit.layernorm`): its gradient is 0.
        be.fill_zero(m, plan.output)?;
        let injected: Vec<(usize, View)> = levels.into_iter().zip(seg.tokens).collect();
        self.backbone_backward_train(be, m, plan, dims, factors.is_some(), false, &injected)?;
        Ok(SegStep { loss, batchnorm })
    }

    /// PyTorch's running-statistics update of every BatchNorm after a training pass
    /// (`momentum` 0.1 by default) and `num_batches_tracked += 1`.
    pub fn apply_batchnorm_statistics(&mut self, records: &[BnRecord], momentum: f32) {
        for r in records {
            let (rm, rv, n) = (r.bn.running_mean, r.bn.running_var, r.bn.num_batches_tracked);
            let mut mean = self.params.get(rm).to_vec();
            let mut var = self.params.get(rv).to_vec();
            running_statistics_update(&mut mean, &mut var, &r.stats, momentum).expect("host ops");
            self.params.get_mut(rm).copy_from_slice(&mean);
            self.params.get_mut(rv).copy_from_slice(&var);
            self.params.get_mut(n)[0] += 1.0;
        }
    }
}

/// One BatchNorm's running update from the statistics its training forward kept (`stats`, see
/// [`head::BnRecord`]): `running ← (1 − momentum)·running + momentum·batch` (the variance
/// unbiased), on host copies of the running mean and variance. The CPU model and the GPU
/// trainer (which copies the two small vectors off the device and back) both update through it.
pub fn running_statistics_update(mean: &mut [f32], var: &mut [f32], stats: &[f32], momentum: f32) -> Result<()> {
    let mut plan = Planner::shared();
    let views = [plan.stat(mean.len()), plan.stat(var.len()), plan.stat(stats.len())];
    let mut arena = Arena::new(&plan)?;
    let be = host_backend();
    let mut m = HostMemory::new(&mut arena, &[], &mut []);
    let [mean_v, var_v, stats_v] = views;
    be.upload(&mut m, mean_v, mean)?;
    be.upload(&mut m, var_v, var)?;
    be.upload(&mut m, stats_v, stats)?;
    be.batch_norm_update_running(&mut m, mean_v, var_v, stats_v, momentum)?;
    be.download(&mut m, mean_v, mean)?;
    be.download(&mut m, var_v, var)
}
