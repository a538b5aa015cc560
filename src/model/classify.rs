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

use crate::backend::cpu::backward::{layernorm_backward, linear_backward, DxMode};
use crate::backend::cpu::cross_entropy_smoothed::smoothed_cross_entropy_fused_part;
use crate::backend::cpu::gemm::linear;
use crate::backend::cpu::layernorm::layernorm;
use crate::error::Result;

use super::config::Architecture;
use super::forward::mean_of_patch_tokens;
use super::params::HeadParams;
use super::training::grads_pair;
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
        let k = self.config.num_labels();
        let images = batch.images();
        self.begin_train_pass(ws, &images, drop_path, grads)?;
        let TrainWorkspace { planned, logits, .. } = ws;
        let planned = planned.as_mut().expect("planned above");
        let factors = drop_path.map(|dp| dp.factors);
        let (dims, hidden) = self.backbone_forward_train(planned, &images, factors)?;
        let (plan, arena, _) = &mut *planned;

        let HeadParams::Classifier { classifier } = self.layout.head else {
            unreachable!("checked: a classification model")
        };
        let (b, t, d) = (dims.b, dims.t, dims.d);
        let p = &self.params;
        let labels: Vec<usize> = batch.labels.iter().map(|&l| l as usize).collect();
        logits.resize(b * k, 0.0);
        let logits = &mut logits[..b * k];
        let loss_sum;
        {
            // `pooled` holds the pooler's input (mean or CLS row), `normed` the pooler layer
            // norm's output; `dnormed`/`dpooled` their gradients. All are [b, d] prefixes of
            // slots sized for every token.
            let [h, pooled, normed, dpooled, dnormed] =
                arena.many_mut([hidden, plan.gathered, plan.head_normed, plan.scratch.dbranch, plan.scratch.dnormed]);
            let (pooled, normed) = (&mut pooled[..b * d], &mut normed[..b * d]);
            let (dpooled, dnormed) = (&mut dpooled[..b * d], &mut dnormed[..b * d]);
            let features: &[f32] = match self.layout.pooler_layernorm {
                Some(ln) => {
                    mean_of_patch_tokens(pooled, h, b, t, d);
                    layernorm(normed, pooled, p.get(ln.weight), p.get(ln.bias), d, dims.eps);
                    normed
                }
                None => {
                    for img in 0..b {
                        pooled[img * d..(img + 1) * d].copy_from_slice(&h[img * t * d..img * t * d + d]);
                    }
                    pooled
                }
            };
            linear(logits, features, p.get(classifier.weight), Some(p.get(classifier.bias)), b, d, k);
            if let Some(out) = logits_out {
                out.copy_from_slice(logits);
            }
            loss_sum = smoothed_cross_entropy_fused_part(logits, &labels, k, label_smoothing, total_images);
            {
                let (dw, db) = grads_pair(p, grads, classifier);
                linear_backward(Some(&mut *dnormed), dw, Some(db), logits, features, p.get(classifier.weight), b, d, k);
            }
            // dL/d(backbone output), written over the output itself (the backbone's backward
            // reads it from there).
            h.fill(0.0);
            match self.layout.pooler_layernorm {
                Some(ln) => {
                    let (dg, dbeta) = grads_pair(p, grads, ln);
                    layernorm_backward(
                        dpooled,
                        dg,
                        dbeta,
                        dnormed,
                        pooled,
                        p.get(ln.weight),
                        d,
                        dims.eps,
                        DxMode::Overwrite,
                    );
                    // The mean spreads its gradient evenly over the patch tokens.
                    let inv = 1.0 / (t - 1) as f32;
                    for img in 0..b {
                        let g = &dpooled[img * d..(img + 1) * d];
                        for tok in 1..t {
                            let row = &mut h[(img * t + tok) * d..(img * t + tok + 1) * d];
                            for (r, &v) in row.iter_mut().zip(g) {
                                *r = v * inv;
                            }
                        }
                    }
                }
                None => {
                    for img in 0..b {
                        h[img * t * d..img * t * d + d].copy_from_slice(&dnormed[img * d..(img + 1) * d]);
                    }
                }
            }
        }
        self.backbone_backward_train(planned, &images, dims, factors, grads, &mut |_, _| {})?;
        Ok(loss_sum)
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
