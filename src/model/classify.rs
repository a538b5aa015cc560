//! The classification training pass (`BeitForImageClassification`): the backbone forward and
//! backward shared with pretraining ([`super::training`]), then HF's head and its backward:
//!
//! - mean pooling (`use_mean_pooling`): mean of the patch tokens (CLS excluded) of the
//!   un-normalised backbone output → `beit.pooler.layernorm` → `classifier`;
//! - CLS pooling: `beit.layernorm` (applied by the backbone to every token) → token 0 →
//!   `classifier`;
//!
//! and the mean label-smoothed cross-entropy over the batch, fused with its logit gradient.
//! Checked against PyTorch's gradients in `tests/classify_gradients.rs`.

use std::ops::Range;

use crate::backend::memory::HostMemory;
use crate::backend::ops::DxMode;
use crate::backend::Backend;
use crate::context::host_backend;
use crate::error::Result;

use super::config::Architecture;
use super::params::HeadParams;
use super::plan::ActivationPlan;
use super::training::HeadLists;
use super::{DataParallelWorkspace, DropPath, ImageBatch, Model, TrainWorkspace};

/// One labelled classification batch as the host supplies it.
#[derive(Debug, Clone, Copy)]
pub struct ClassifyBatch<'a> {
    /// `[batch, channels, height, width]`, f32.
    pub pixels: &'a [f32],
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `[batch]`, class ids in `[0, num_labels)`.
    pub labels: &'a [i64],
}

impl<'a> ClassifyBatch<'a> {
    fn images(&self) -> ImageBatch<'a> {
        ImageBatch {
            pixels: self.pixels,
            batch: self.batch,
            channels: self.channels,
            height: self.height,
            width: self.width,
            bool_masked_pos: None,
        }
    }

    /// The images `images` of this batch (a data-parallel shard) with their labels.
    fn shard(&self, images: Range<usize>) -> ClassifyBatch<'a> {
        let pixels_each = self.pixels.len() / self.batch;
        ClassifyBatch {
            pixels: &self.pixels[images.start * pixels_each..images.end * pixels_each],
            batch: images.len(),
            labels: &self.labels[images.clone()],
            ..*self
        }
    }
}

impl Model {
    /// Checks a classification batch; every problem is a readable error and nothing is computed.
    pub fn check_classify_batch(&self, batch: &ClassifyBatch<'_>) -> Result<()> {
        ensure!(
            self.arch == Architecture::ImageClassification,
            InvalidArgument,
            "classification training needs a BeitForImageClassification model; this one is {}",
            self.arch.hf_name()
        );
        self.check_train_images(&batch.images())?;
        ensure!(
            batch.labels.len() == batch.batch,
            InvalidArgument,
            "labels hold {} values; a batch of {} images needs {}",
            batch.labels.len(),
            batch.batch,
            batch.batch
        );
        let k = self.config.num_labels() as i64;
        if let Some(i) = batch.labels.iter().position(|l| !(0..k).contains(l)) {
            bail!(InvalidArgument, "label {} of image {i} is outside [0, num_labels {k})", batch.labels[i]);
        }
        Ok(())
    }

    /// Runs the classification forward and backward on `batch`, ADDS the gradient of the loss
    /// to `grads` (laid out like the parameters), and returns the loss: the mean over the batch
    /// of the cross-entropy with label smoothing `label_smoothing` (ε in [0, 1)). With
    /// `logits_out` (`[batch, num_labels]`) the logits are copied out too. `drop_path` applies
    /// stochastic depth; `None` is the deterministic model.
    pub fn classify_forward_backward(
        &self,
        ws: &mut TrainWorkspace,
        batch: &ClassifyBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        label_smoothing: f32,
        grads: &mut [f32],
        logits_out: Option<&mut [f32]>,
    ) -> Result<f64> {
        self.check_classify_batch(batch)?;
        check_label_smoothing(label_smoothing)?;
        let k = self.config.num_labels();
        if let Some(out) = &logits_out {
            ensure!(
                out.len() == batch.batch * k,
                InvalidArgument,
                "logits buffer holds {} values; [batch {}, labels {k}] needs {}",
                out.len(),
                batch.batch,
                batch.batch * k
            );
        }
        let loss_sum = self.classify_loss_sum(ws, batch, drop_path, label_smoothing, batch.batch, grads, logits_out)?;
        Ok(loss_sum / batch.batch as f64)
    }

    /// [`Model::classify_forward_backward`] (without the logits copy) split data-parallel over
    /// the threads of the current rayon pool where that pays (`super::data_parallel`; one shard
    /// is the whole-batch pass): the same loss and gradient within float rounding,
    /// deterministic for a given thread count. What the trainer runs.
    pub fn classify_forward_backward_data_parallel(
        &self,
        dp: &mut DataParallelWorkspace,
        batch: &ClassifyBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        label_smoothing: f32,
        grads: &mut [f32],
    ) -> Result<f64> {
        self.check_classify_batch(batch)?;
        check_label_smoothing(label_smoothing)?;
        let b = batch.batch;
        let loss_sum = self.data_parallel_pass(dp, &batch.images(), drop_path, grads, |ws, images, drop, grads| {
            self.classify_loss_sum(ws, &batch.shard(images), drop, label_smoothing, b, grads, None)
        })?;
        Ok(loss_sum / b as f64)
    }

    /// The classification pass over `batch`, part of a larger batch of `total_images` (the loss
    /// is the mean over all of them, so this part's logit gradients are scaled by
    /// 1/`total_images`): ADDS this part's gradient to `grads` and returns the sum of its images'
    /// losses. `batch`, the smoothing and `logits_out` are checked by the caller.
    #[allow(clippy::too_many_arguments)]
    fn classify_loss_sum(
        &self,
        ws: &mut TrainWorkspace,
        batch: &ClassifyBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        label_smoothing: f32,
        total_images: usize,
        grads: &mut [f32],
        logits_out: Option<&mut [f32]>,
    ) -> Result<f64> {
        let images = batch.images();
        self.begin_train_pass(ws, &images, drop_path, grads)?;
        let TrainWorkspace { planned, rows, labels, .. } = ws;
        let (plan, arena) = planned.as_mut().expect("planned above");
        let mut m = HostMemory::new(arena, &self.params.data, grads);
        let factors = drop_path.map(|dp| dp.factors);
        let host = HeadLists { rows, labels };
        let be = host_backend();
        self.classify_pass(&be, &mut m, plan, batch, factors, label_smoothing, total_images, logits_out, host)
    }

    /// The classification pass on `be` (see [`Model::classify_loss_sum`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn classify_pass<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        batch: &ClassifyBatch<'_>,
        factors: Option<&[f32]>,
        label_smoothing: f32,
        total_images: usize,
        logits_out: Option<&mut [f32]>,
        host: HeadLists<'_>,
    ) -> Result<f64> {
        let k = self.config.num_labels();
        let p = &self.params;
        let dims = self.backbone_forward_train(be, m, plan, &batch.images(), factors)?;
        let HeadParams::Classifier { classifier } = self.layout.head else {
            unreachable!("checked: a classification model")
        };
        let (b, t, d) = (dims.b, dims.t, dims.d);
        // `pooled` holds the pooler's input (mean or CLS row), `normed` the pooler layer norm's
        // output; `dnormed`/`dpooled` their gradients. All are [b, d] prefixes of buffers sized
        // for every token.
        let (pooled, normed) = (plan.gathered.prefix(b * d), plan.head_normed.prefix(b * d));
        let (dpooled, dnormed) = (plan.scratch.dbranch.prefix(b * d), plan.scratch.dnormed.prefix(b * d));
        let logits = plan.logits.prefix(b * k);
        let HeadLists { rows, labels } = host;
        rows.clear();
        rows.extend((0..b).map(|img| img * t));
        labels.clear();
        labels.extend(batch.labels.iter().map(|&l| l as usize));
        let (rows_v, labels_v) = (plan.rows.prefix(b), plan.labels.prefix(b));
        be.upload_indices(m, labels_v, labels)?;
        let pooler_norm = self
            .layout
            .pooler_layernorm
            .map(|ln| self.kept_norm(ln, normed, plan.head_saved.prefix(be.layer_norm_saved_len(b))));
        let features = match pooler_norm {
            Some(norm) => {
                be.mean_patch_tokens(m, pooled, plan.output, t, d)?;
                be.layer_norm(m, pooled, d, norm)?;
                normed
            }
            None => {
                be.upload_indices(m, rows_v, rows)?;
                be.gather_rows(m, pooled, plan.output, rows_v, d)?;
                pooled
            }
        };
        let (w, bias) = (p.view(classifier.weight), p.view(classifier.bias));
        be.linear(m, logits, features, w, Some(bias), b, d, k)?;
        if let Some(out) = logits_out {
            be.download(m, logits, out)?;
        }
        be.cross_entropy(m, logits, labels_v, k, Some(label_smoothing), total_images)?;
        let (dw, db) = (p.grad_view(classifier.weight), p.grad_view(classifier.bias));
        be.linear_backward(m, Some(dnormed), dw, Some(db), logits, features, w, b, d, k)?;
        // dL/d(backbone output), written over the output itself (the backbone's backward reads
        // it from there).
        match (self.layout.pooler_layernorm, pooler_norm) {
            (Some(ln), Some(norm)) => {
                let (dg, dbeta) = (p.grad_view(ln.weight), p.grad_view(ln.bias));
                be.layer_norm_backward(m, dpooled, dg, dbeta, dnormed, pooled, norm, d, DxMode::Overwrite)?;
                be.mean_patch_tokens_backward(m, plan.output, dpooled, t, d)?;
            }
            _ => be.scatter_rows(m, plan.output, dnormed, rows_v, d)?,
        }
        let loss = be.take_loss(m)?;
        self.backbone_backward_train(be, m, plan, dims, factors.is_some(), false, &[])?;
        Ok(loss)
    }
}

/// Label smoothing must be in [0, 1) (1 would leave no signal of the true class).
pub(crate) fn check_label_smoothing(label_smoothing: f32) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&label_smoothing),
        InvalidArgument,
        "label smoothing must be in [0, 1), got {label_smoothing}"
    );
    Ok(())
}
