//! The BEiT masked-image-modeling training step on the GPU: the one MIM pass
//! (`Model::mim_pass`: embeddings, blocks, head and loss, forward and backward, written once over
//! the `Backend` trait) run on the CUDA backend (`backend::cuda::CudaBackend`), with the
//! parameters, gradients and AdamW around it on the device, on one stream.
//!
//! # What lives on the GPU
//! - the parameters as fp32 master copies (one flat buffer laid out like the `ParamStore`), and
//!   in bf16 mode a bf16 working copy of them that AdamW refreshes in its pass;
//! - the gradients (fp32, same layout), the AdamW moments, the per-element lr scales;
//! - one planned activation arena per batch size: `Model::training_plan` on the CUDA backend
//!   (every view of the pass: inputs, indices, every block's activations, the statistics the
//!   backward reads, the head's logits) plus the backend's scratch, allocated once.
//!
//! The pass uploads the batch (pixels, mask, masked rows and labels, drop path factors) and
//! reads back the loss (8 bytes, one synchronisation between the head's forward and the
//! backbone's backward); the optimizer step reads back the gradient norm (8 bytes) to refuse a
//! non-finite step exactly as the CPU trainer does. Parameters and optimizer state are read back
//! only on request ([`GpuPretrainer::download_params`], `download_optimizer`).
//!
//! # Precisions
//! - [`Precision::F32`]: every tensor fp32 (cuBLASLt with fp32 compute, no TF32): the parity
//!   mode, equal to the CPU pass to rounding (tests/cuda_pretrain.rs: 1e-5 of each gradient's
//!   norm).
//! - [`Precision::Bf16`]: activations, activation gradients and the working parameters are
//!   bf16; GEMMs and attention read bf16 and accumulate in fp32; layer norms, softmax,
//!   cross-entropy, the parameter gradients, the norm and AdamW are fp32.
//!
//! No atomics anywhere: two runs from the same state give the same bits.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr};
use half::bf16;

use crate::backend::cuda::adamw::GpuAdamW;
use crate::backend::cuda::device::driver_error;
pub use crate::backend::cuda::ops::Precision;
use crate::backend::cuda::{Act, CudaBackend, CudaDevice, CudaMemory, DeviceArena, DeviceParams, Scratch};
use crate::backend::optimizer::AdamWConfig;
use crate::error::{Error, Result};
use crate::model::param_store::ParamStore;
use crate::model::plan::ActivationPlan;
use crate::model::segmentation::head::{BnMode, BnRecord};
use crate::model::segmentation::{running_statistics_update, SegBatch, SegPlan};
use crate::model::{check_label_smoothing, Architecture, ClassifyBatch, HeadLists, MimBatch, MimTarget, Model};
use crate::train::adamw::AdamW;
use crate::train::gpu_update::DeviceUpdate;
use crate::train::optimizer::{apply_update, NonFiniteGradient};

/// What one GPU step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuStepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The optimizer settings the GPU step copies from the CPU trainer.
pub struct OptimizerSetup<'a> {
    pub config: AdamWConfig,
    /// 1 where an element decays, 0 where not (`[params]`).
    pub decay_mask: &'a [f32],
    /// (offset, len) ranges that are trained.
    pub trained: &'a [(usize, usize)],
    /// Per-element lr scale (layer-wise decay), or none.
    pub lr_scale: Option<&'a [f32]>,
}

/// A device gradient buffer as a host sees it ([`GpuPretrainer::gradients_on_device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceGradients {
    /// The `CUdeviceptr` of `len` f32 values, laid out like the parameters.
    pub pointer: u64,
    pub len: usize,
    /// The `CUstream` the work on the buffer is queued on, as an address.
    pub stream: usize,
}

/// The planned memory of one batch size.
struct Pass<T: Act> {
    batch: usize,
    plan: ActivationPlan,
    /// A segmentation model's head views, after the backbone's in the same arena.
    seg: Option<SegPlan>,
    arena: DeviceArena<T>,
    /// The norm pass's [Σg², ‖g‖].
    norm: CudaSlice<f64>,
}

/// The typed step; [`GpuPretrainer`] picks the storage type.
struct Step<T: Act> {
    be: CudaBackend<T>,
    /// The model's config, layout and parameter table (its values live on the device).
    model: Model,
    params: DeviceParams<T>,
    grads: CudaSlice<f32>,
    adamw: GpuAdamW,
    lr_scale: Option<CudaSlice<f32>>,
    pass: Option<Pass<T>>,
    /// The head's masked rows and labels as the host lists them (reused).
    rows: Vec<usize>,
    labels: Vec<usize>,
    /// The loss of the last pass.
    loss: Option<f64>,
}

impl<T: Act> Drop for Step<T> {
    fn drop(&mut self) {
        // Before the buffers below go: a trainer may be dropped on a thread that never ran CUDA.
        self.be.device().make_current();
    }
}

enum Inner {
    F32(Step<f32>),
    Bf16(Step<bf16>),
}

/// The GPU pretraining step of one `BeitForMaskedImageModeling` model: parameters, gradients,
/// optimizer state and activations on the GPU (see the module documentation).
pub struct GpuPretrainer {
    inner: Inner,
    precision: Precision,
}

impl std::fmt::Debug for GpuPretrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuPretrainer").field("precision", &self.precision).finish()
    }
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match &$self.inner {
            Inner::F32($s) => $body,
            Inner::Bf16($s) => $body,
        }
    };
    (mut $self:expr, $s:ident => $body:expr) => {
        match &mut $self.inner {
            Inner::F32($s) => $body,
            Inner::Bf16($s) => $body,
        }
    };
}

impl GpuPretrainer {
    /// Whether this step can train `target`: it predicts visual tokens only (the pixel target
    /// runs on the CPU). Callers check before any work (no GPU needed to ask).
    pub fn check_target(target: MimTarget) -> Result<()> {
        ensure!(
            target == MimTarget::VisualTokens,
            Unsupported,
            "the CUDA pretraining step supports the visual-token target only; the {target} target runs on the \
             CPU (--device cpu)"
        );
        Ok(())
    }

    /// Uploads `model` (a MIM model, or a classification or segmentation model to fine-tune
    /// with [`GpuPretrainer::classify_forward_backward`] / [`GpuPretrainer::segment_forward_backward`],
    /// at its configured image size) and fresh or given optimizer state. Fails with
    /// `Unsupported` when CUDA is not usable or the model has a shape the kernels do not cover
    /// (head dim other than 32/64; segmentation in bf16, whose head's image ops are fp32).
    pub fn new(model: &Model, precision: Precision, opt: OptimizerSetup<'_>) -> Result<Self> {
        ensure!(
            model.architecture() != Architecture::SemanticSegmentation || precision == Precision::F32,
            Unsupported,
            "segmentation trains on the GPU in fp32 (the head's image ops have no bf16 kernels); use precision fp32"
        );
        let dev = CudaDevice::get()?;
        let inner = match precision {
            Precision::F32 => Inner::F32(Step::new(dev, model, opt)?),
            Precision::Bf16 => Inner::Bf16(Step::new(dev, model, opt)?),
        };
        Ok(GpuPretrainer { inner, precision })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Queues the forward and backward of `batch` (checked by the caller with
    /// `Model::check_mim_batch`); the gradients (zeroed first) stay on the device. `drop_path`
    /// is the CPU pass's `[layers, 2, batch]` factors.
    pub fn forward_backward(&mut self, batch: &MimBatch<'_>, drop_path: Option<&[f32]>) -> Result<()> {
        dispatch!(mut self, s => s.forward_backward(batch, drop_path))
    }

    /// The classification fine-tuning pass (`Model::classify_pass`) of `batch` with label
    /// smoothing `label_smoothing`: the gradients (zeroed first) stay on the device for
    /// [`GpuPretrainer::apply`], the loss is [`GpuPretrainer::loss`]. `drop_path` is the CPU
    /// pass's `[layers, 2, batch]` factors. Checked here as the CPU checks it.
    pub fn classify_forward_backward(
        &mut self,
        batch: &ClassifyBatch<'_>,
        drop_path: Option<&[f32]>,
        label_smoothing: f32,
    ) -> Result<()> {
        dispatch!(mut self, s => s.classify_forward_backward(batch, drop_path, label_smoothing))
    }

    /// The segmentation fine-tuning pass (`Model::segmentation_train_pass`, BatchNorm on batch
    /// statistics) of `batch`: the gradients (zeroed first) stay on the device for
    /// [`GpuPretrainer::apply`], the loss is [`GpuPretrainer::loss`]; returns the batch
    /// statistics of every BatchNorm for [`GpuPretrainer::apply_batchnorm_statistics`].
    /// `drop_path` is the CPU pass's `[layers, 2, batch]` factors. Checked as the CPU checks it.
    pub fn segment_forward_backward(
        &mut self,
        batch: &SegBatch<'_>,
        drop_path: Option<&[f32]>,
    ) -> Result<Vec<BnRecord>> {
        match &mut self.inner {
            Inner::F32(s) => s.segment_forward_backward(batch, drop_path),
            Inner::Bf16(_) => bail!(Unsupported, "segmentation trains on the GPU in fp32 only"),
        }
    }

    /// PyTorch's running update of every BatchNorm (`Model::apply_batchnorm_statistics`) on the
    /// device's copy of the running statistics, after a segmentation step.
    pub fn apply_batchnorm_statistics(&mut self, records: &[BnRecord], momentum: f32) -> Result<()> {
        match &mut self.inner {
            Inner::F32(s) => s.apply_batchnorm_statistics(records, momentum),
            Inner::Bf16(_) => bail!(Unsupported, "segmentation trains on the GPU in fp32 only"),
        }
    }

    /// The loss of the last `forward_backward` (synchronises).
    pub fn loss(&self) -> Result<f64> {
        dispatch!(self, s => s.loss())
    }

    /// One optimizer step on the gradients of the last `forward_backward`: global norm,
    /// clipping to `clip` (0: none), and AdamW at `lr`. Reads the loss and the norm back; when
    /// either is not finite, nothing is updated and the error says why.
    pub fn apply(&mut self, clip: f64, lr: f32) -> Result<GpuStepStats> {
        dispatch!(mut self, s => s.apply(clip, lr))
    }

    /// `forward_backward` then `apply`.
    pub fn step(
        &mut self,
        batch: &MimBatch<'_>,
        drop_path: Option<&[f32]>,
        clip: f64,
        lr: f32,
    ) -> Result<GpuStepStats> {
        self.forward_backward(batch, drop_path)?;
        self.apply(clip, lr)
    }

    /// Where the gradient buffer lives, for a host that works on it in place between the
    /// passes and [`GpuPretrainer::apply`] (an all-reduce): the pointer, and the stream the
    /// pass was queued on (wait on it before reading; queue writes on it, or finish them
    /// before `apply`).
    pub fn gradients_on_device(&self) -> DeviceGradients {
        dispatch!(self, s => {
            let stream = s.be.device().stream();
            DeviceGradients {
                pointer: s.grads.device_ptr(stream).0,
                len: s.grads.len(),
                stream: stream.cu_stream() as usize,
            }
        })
    }

    /// The gradient buffer (laid out like the parameters).
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        dispatch!(self, s => s.be.device().download(&s.grads))
    }

    /// The fp32 master parameters into `store` (same model config).
    pub fn download_params(&self, store: &mut ParamStore) -> Result<()> {
        dispatch!(self, s => {
            ensure!(store.data.len() == s.params.len(), InvalidArgument, "download_params: another model");
            let host = s.be.device().download(s.params.master())?;
            store.data.copy_from_slice(&host);
            Ok(())
        })
    }

    /// The AdamW moments and step count into `opt`.
    pub fn download_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        dispatch!(self, s => {
            let dev = s.be.device();
            opt.exp_avg = dev.download(&s.adamw.exp_avg)?;
            opt.exp_avg_sq = dev.download(&s.adamw.exp_avg_sq)?;
            opt.step = s.adamw.step;
            Ok(())
        })
    }

    /// Replaces the device state with `store` and `opt` (after a checkpoint load).
    pub fn upload_state(&mut self, store: &ParamStore, opt: &AdamW) -> Result<()> {
        dispatch!(mut self, s => s.upload_state(store, opt))
    }

    /// Sets the per-element lr scales (layer-wise decay) and the AdamW settings.
    pub fn set_optimizer(&mut self, config: AdamWConfig, lr_scale: Option<&[f32]>) -> Result<()> {
        dispatch!(mut self, s => {
            s.adamw.config = config;
            s.lr_scale = lr_scale.map(|l| s.be.device().upload(l)).transpose()?;
            Ok(())
        })
    }

    /// Device bytes held by the activation arena (0 before the first batch).
    pub fn arena_bytes(&self) -> usize {
        dispatch!(self, s => s.pass.as_ref().map_or(0, |p| p.arena.bytes()))
    }
}

impl<T: Act> Step<T> {
    fn new(dev: Arc<CudaDevice>, model: &Model, opt: OptimizerSetup<'_>) -> Result<Self> {
        let c = model.config();
        let heads = c.num_attention_heads;
        ensure!(
            matches!(c.hidden_size / heads, 32 | 64) && c.hidden_size.is_multiple_of(heads),
            Unsupported,
            "the GPU step's fused attention has kernels for head dims 32 and 64; this model's is {}",
            c.hidden_size as f64 / heads as f64
        );
        let store = model.params();
        let params = DeviceParams::upload(&dev, &store.data)?;
        let grads = dev.zeros(store.data.len())?;
        ensure!(opt.decay_mask.len() == store.data.len(), InvalidArgument, "decay mask length");
        let adamw = GpuAdamW::new(&dev, opt.config, opt.decay_mask, opt.trained)?;
        let lr_scale = opt.lr_scale.map(|l| dev.upload(l)).transpose()?;
        Ok(Step {
            be: CudaBackend::new(dev),
            model: model.without_values(),
            params,
            grads,
            adamw,
            lr_scale,
            pass: None,
            rows: Vec::new(),
            labels: Vec::new(),
            loss: None,
        })
    }

    /// The pass's memory for `b` images (planned again only when the batch size changes).
    fn plan(&mut self, b: usize) -> Result<()> {
        if self.pass.as_ref().is_some_and(|p| p.batch == b) {
            return Ok(());
        }
        self.pass = None; // free the old arena first
        let c = self.model.config();
        let (height, width) = c.image_size.hw();
        let (plan, mut planner) = self.model.training_plan(&self.be, b, height, width);
        let seg = (self.model.architecture() == Architecture::SemanticSegmentation)
            .then(|| self.model.segmentation_views(&mut planner, b, (height, width), BnMode::Train));
        let (d, inter) = (c.hidden_size, c.intermediate_size);
        let patches = b * (plan.tokens - 1);
        let rows = b * plan.tokens;
        // The MIM head projects a block of masked rows at a time (the plan's logits); the
        // classifier one row per image.
        let classes = match self.model.architecture() {
            Architecture::ImageClassification => c.num_labels(),
            _ => c.vocab_size,
        };
        let head_rows = plan.logits.len() / classes;
        let scratch = Scratch::default()
            .linear_backward(rows, 3 * d)
            .linear_backward(rows, inter)
            .linear_backward(rows, d)
            .linear_backward(head_rows, classes)
            .linear_backward(patches, d)
            .layer_norm_backward(rows.max(patches), d)
            .residual_backward(rows, d)
            .loss(head_rows);
        let dev = self.be.device();
        let arena = DeviceArena::new(dev, &planner, scratch)?;
        self.pass = Some(Pass { batch: b, plan, seg, arena, norm: dev.zeros(2)? });
        Ok(())
    }

    fn forward_backward(&mut self, batch: &MimBatch<'_>, drop_path: Option<&[f32]>) -> Result<()> {
        ensure!(
            self.model.architecture() == Architecture::MaskedImageModeling,
            InvalidArgument,
            "a MIM step needs a BeitForMaskedImageModeling model; this one is {}",
            self.model.architecture().hf_name()
        );
        let c = self.model.config();
        let (channels, (height, width)) = (c.num_channels, c.image_size.hw());
        let grid = c.native_grid();
        let n = grid.0 * grid.1;
        let b = batch.batch;
        ensure!(b > 0, InvalidArgument, "empty batch");
        ensure!(
            batch.channels == channels && batch.height == height && batch.width == width,
            InvalidArgument,
            "the GPU step runs at {channels}x{height}x{width}; this batch is {}x{}x{}",
            batch.channels,
            batch.height,
            batch.width
        );
        ensure!(
            batch.pixels.len() == b * channels * height * width
                && batch.bool_masked_pos.len() == b * n
                && batch.labels.len() == b * n,
            InvalidArgument,
            "batch buffers do not match [batch {b}] images of {n} patches"
        );
        let masked = batch.masked_count();
        ensure!(masked > 0, InvalidArgument, "bool_masked_pos masks no patch: the MIM loss is undefined");
        self.begin(b, drop_path)?;
        let Step { be, model, params, grads, pass, rows, labels, .. } = self;
        let pass = pass.as_mut().expect("planned");
        let mut mem = CudaMemory::new(be.device(), &mut pass.arena, params, Some(grads))?;
        let host = HeadLists { rows, labels };
        let target = MimTarget::VisualTokens;
        let sum = model.mim_pass(be, &mut mem, &pass.plan, batch, target, drop_path, masked, host)?;
        self.loss = Some(sum / masked as f64);
        Ok(())
    }

    fn classify_forward_backward(
        &mut self,
        batch: &ClassifyBatch<'_>,
        drop_path: Option<&[f32]>,
        label_smoothing: f32,
    ) -> Result<()> {
        self.model.check_classify_batch(batch)?;
        check_label_smoothing(label_smoothing)?;
        let b = batch.batch;
        self.begin(b, drop_path)?;
        let Step { be, model, params, grads, pass, rows, labels, .. } = self;
        let pass = pass.as_mut().expect("planned");
        let mut mem = CudaMemory::new(be.device(), &mut pass.arena, params, Some(grads))?;
        let host = HeadLists { rows, labels };
        let sum = model.classify_pass(be, &mut mem, &pass.plan, batch, drop_path, label_smoothing, b, None, host)?;
        self.loss = Some(sum / b as f64);
        Ok(())
    }

    /// The start of every pass over `b` images: checks the drop path factors (`[layers, 2, b]`),
    /// forgets the last loss, plans the memory for `b` and zeroes the gradients.
    fn begin(&mut self, b: usize, drop_path: Option<&[f32]>) -> Result<()> {
        let layers = self.model.config().num_hidden_layers;
        if let Some(f) = drop_path {
            ensure!(f.len() == layers * 2 * b, InvalidArgument, "drop path factors hold {}", f.len());
        }
        self.loss = None;
        self.plan(b)?;
        let Step { be, grads, .. } = self;
        be.device().stream().memset_zeros(grads).map_err(|e| driver_error("memset", e))
    }

    fn loss(&self) -> Result<f64> {
        self.loss.ok_or_else(|| Error::InvalidArgument("no pass has run".into()))
    }

    fn apply(&mut self, clip: f64, lr: f32) -> Result<GpuStepStats> {
        let loss = self.loss()?;
        ensure!(loss.is_finite(), Numerical, "the loss is {loss}; the step was not applied");
        let Step { be, params, grads, adamw, lr_scale, pass, .. } = self;
        let p = pass.as_mut().expect("a pass ran");
        let mut target =
            DeviceUpdate { dev: be.device(), params, grads, adamw, lr_scale: lr_scale.as_ref(), norm: &mut p.norm };
        match apply_update(&mut target, lr, (clip > 0.0).then_some(clip))? {
            Ok(grad_norm) => Ok(GpuStepStats { loss, grad_norm }),
            Err(NonFiniteGradient(norm)) => bail!(Numerical, "the gradient norm is {norm}; the step was not applied"),
        }
    }

    fn upload_state(&mut self, store: &ParamStore, opt: &AdamW) -> Result<()> {
        let dev = self.be.device().clone();
        ensure!(store.data.len() == self.params.len(), InvalidArgument, "upload_state: another model");
        self.params.set(&dev, &store.data)?;
        dev.upload_into(&opt.exp_avg, &mut self.adamw.exp_avg)?;
        dev.upload_into(&opt.exp_avg_sq, &mut self.adamw.exp_avg_sq)?;
        self.adamw.step = opt.step;
        self.adamw.config = opt.config;
        Ok(())
    }
}

impl Step<f32> {
    fn segment_forward_backward(&mut self, batch: &SegBatch<'_>, drop_path: Option<&[f32]>) -> Result<Vec<BnRecord>> {
        self.model.check_seg_batch(batch)?;
        self.begin(batch.batch, drop_path)?;
        let Step { be, model, params, grads, pass, .. } = self;
        let pass = pass.as_mut().expect("planned");
        let seg = pass.seg.as_ref().expect("a segmentation model's pass plans its head");
        let mut mem = CudaMemory::new(be.device(), &mut pass.arena, params, Some(grads))?;
        let step = model.segmentation_train_pass(be, &mut mem, &pass.plan, seg, batch, drop_path)?;
        self.loss = Some(step.loss);
        Ok(step.batchnorm)
    }

    fn apply_batchnorm_statistics(&mut self, records: &[BnRecord], momentum: f32) -> Result<()> {
        let stream = self.be.device().stream().clone();
        let (master, _) = self.params.master_and_work();
        let store = self.model.params();
        let copy_err = |e| driver_error("copy of the BatchNorm statistics", e);
        for r in records {
            let [mean, var, tracked] = [r.bn.running_mean, r.bn.running_var, r.bn.num_batches_tracked].map(|id| {
                let v = store.view(id);
                v.offset..v.offset + v.len
            });
            let mut host = [mean.clone(), var.clone(), tracked.clone()].map(|range| vec![0.0f32; range.len()]);
            for (range, h) in [&mean, &var, &tracked].into_iter().zip(host.iter_mut()) {
                stream.memcpy_dtoh(&master.slice(range.clone()), h).map_err(copy_err)?;
            }
            let [m, v, n] = &mut host;
            running_statistics_update(m, v, &r.stats, momentum)?;
            n[0] += 1.0;
            for (range, h) in [mean, var, tracked].into_iter().zip(&host) {
                stream.memcpy_htod(h, &mut master.slice_mut(range)).map_err(copy_err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_parses() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("fp16".parse::<Precision>().is_err());
    }
}
