//! The BEiT masked-image-modeling training step on the GPU: the one BEiT pass
//! (`model::block::{block_forward, block_backward}` over an `ActivationPlan`) run on the CUDA
//! backend (`backend::cuda::CudaBackend`), with the embeddings, the MIM head and AdamW around
//! it, on one stream.
//!
//! # What lives on the GPU
//! - the parameters as fp32 master copies (one flat buffer laid out like the `ParamStore`), and
//!   in bf16 mode a bf16 working copy of them that AdamW refreshes in its pass;
//! - the gradients (fp32, same layout), the AdamW moments, the per-element lr scales;
//! - one planned activation arena per batch size: `Model::training_plan` on the CUDA backend
//!   (every block's activations, the layer norm statistics and attention log-sum-exps the
//!   backward reads, the block scratch) plus the views the plan lacks (pixels, logits, losses,
//!   the final and head norms' statistics), allocated once;
//! - the batch (pixels, mask, masked-row indices and their labels, drop path factors), uploaded
//!   each step.
//!
//! Host reads per step: the loss and the gradient norm (16 bytes, one synchronisation, needed to
//! refuse a non-finite step exactly as the CPU trainer does). Parameters and optimizer state are
//! read back only on request ([`GpuPretrainer::download_params`], `download_optimizer`).
//!
//! # Precisions
//! - [`Precision::F32`]: every tensor fp32 (cuBLASLt with fp32 compute, no TF32): the parity
//!   mode, equal to the CPU pass to rounding (tests/cuda_pretrain.rs: 1e-5 of each gradient's
//!   norm).
//! - [`Precision::Bf16`]: activations, activation gradients and the working parameters are
//!   bf16; GEMMs and attention read bf16 and accumulate in fp32; layer norms, softmax,
//!   cross-entropy, the parameter gradients, the norm and AdamW are fp32.
//!
//! # The pass
//! Forward: patches and their projection, the token assembly (CLS, mask token, positions), the
//! shared relative position bias gathered once; per block the layer's bias (shared + its own
//! table) into the plan's bias view, then `block_forward`; the final norm; the MIM head on the
//! masked rows (gather, norm, projection, fused cross-entropy leaving dL/dlogits in place).
//! Backward: the head's transposes, the scatter into the hidden state's gradient, the final
//! norm, `block_backward` last block first (each layer's bias gradient gathered into its
//! tables), the embeddings. No atomics anywhere: two runs from the same state give the same
//! bits.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::backend::cuda::adamw::GpuAdamW;
use crate::backend::cuda::attention::RelPosIndex;
use crate::backend::cuda::device::driver_error;
pub use crate::backend::cuda::ops::Precision;
use crate::backend::cuda::patch_embed::PatchEmbedShape;
use crate::backend::cuda::tokens::{TokenParams, TokenShape};
use crate::backend::cuda::{Act, CudaBackend, CudaDevice, CudaMemory, DeviceArena, DeviceParams, Scratch};
use crate::backend::memory::View;
use crate::backend::ops::{Backend, DxMode, Norm};
use crate::backend::optimizer::AdamWConfig;
use crate::error::{Error, Result};
use crate::model::block::{block_backward, block_forward, drop_factors, BlockDims};
use crate::model::params::{Affine, HeadParams, ParamStore};
use crate::model::plan::ActivationPlan;
use crate::model::{relpos, Architecture, MimBatch, MimTarget, Model};
use crate::train::adamw::AdamW;

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

/// The views a MIM step needs beyond the activation plan.
#[derive(Debug, Clone, Copy)]
struct HeadViews {
    /// The batch's pixels (`Stat`, f32 NCHW).
    pixels: View,
    /// The final norm's statistics (`Stat`; empty without the norm).
    final_saved: View,
    /// The MIM head's norm statistics and logits, for up to every patch masked.
    head_saved: View,
    logits: View,
    losses: View,
}

/// The planned memory of one batch size.
struct Pass<T: Act> {
    batch: usize,
    plan: ActivationPlan,
    head: HeadViews,
    arena: DeviceArena<T>,
    /// Masked row indices then their labels, `[B·N]` each.
    idx: CudaSlice<i32>,
    mask: CudaSlice<u8>,
    /// The fused cross-entropy's f64 loss sum, and the norm pass's [Σg², ‖g‖].
    loss_sum: CudaSlice<f64>,
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
    relpos: Option<RelPosIndex>,
    pass: Option<Pass<T>>,
    masked: usize,
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

    /// Uploads `model` (a MIM model at its configured image size) and fresh or given optimizer
    /// state. Fails with `Unsupported` when CUDA is not usable or the model has a shape the
    /// kernels do not cover (head dim other than 32/64).
    pub fn new(model: &Model, precision: Precision, opt: OptimizerSetup<'_>) -> Result<Self> {
        ensure!(
            model.architecture() == Architecture::MaskedImageModeling,
            InvalidArgument,
            "the GPU pretraining step needs a BeitForMaskedImageModeling model; this one is {}",
            model.architecture().hf_name()
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
        let grid = c.native_grid();
        let heads = c.num_attention_heads;
        ensure!(
            matches!(c.hidden_size / heads, 32 | 64) && c.hidden_size % heads == 0,
            Unsupported,
            "the GPU step's fused attention has kernels for head dims 32 and 64; this model's is {}",
            c.hidden_size as f64 / heads as f64
        );
        let layout = &model.layout;
        let store = model.params();
        let params = DeviceParams::upload(&dev, &store.data)?;
        let grads = dev.zeros(store.data.len())?;
        ensure!(opt.decay_mask.len() == store.data.len(), InvalidArgument, "decay mask length");
        let adamw = GpuAdamW::new(&dev, opt.config, opt.decay_mask, opt.trained)?;
        let lr_scale = opt.lr_scale.map(|l| dev.upload(l)).transpose()?;
        let tables: Vec<_> = layout
            .shared_rel_pos_table
            .iter()
            .chain(layout.blocks.iter().filter_map(|b| b.rel_pos_table.as_ref()))
            .collect();
        let table_rows = (2 * grid.0 - 1) * (2 * grid.1 - 1) + 3;
        let relpos = if tables.is_empty() {
            None
        } else {
            Some(dev.relpos_index(&relpos::relative_position_index(grid), table_rows)?)
        };
        // The tables must have the rows the index addresses (the native grid's).
        for id in tables {
            let len = store.specs[id.0].len;
            let want = table_rows * heads;
            ensure!(len == want, InvalidArgument, "relative position table holds {len} values, expected {want}");
        }
        Ok(Step {
            be: CudaBackend::new(dev),
            model: model.without_values(),
            params,
            grads,
            adamw,
            lr_scale,
            relpos,
            pass: None,
            masked: 0,
        })
    }

    fn dev(&self) -> &CudaDevice {
        self.be.device()
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
        let (d, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let n = plan.grid.0 * plan.grid.1;
        let rows = b * plan.tokens;
        // The MIM head works on the masked rows: at most every patch.
        let maxm = b * n;
        let has_final = self.model.layout.final_layernorm.is_some();
        let head = HeadViews {
            pixels: planner.stat(b * c.num_channels * height * width),
            final_saved: planner.stat(if has_final { self.be.layer_norm_saved_len(rows) } else { 0 }),
            head_saved: planner.stat(self.be.layer_norm_saved_len(maxm)),
            logits: planner.act(maxm * vocab),
            losses: planner.stat(maxm),
        };
        let scratch = Scratch::default()
            .linear_backward(rows, 3 * d)
            .linear_backward(rows, inter)
            .linear_backward(rows, d)
            .linear_backward(maxm, vocab)
            .linear_backward(b * n, d)
            .layer_norm_backward(rows.max(maxm), d)
            .residual_backward(rows, d);
        let dev = self.be.device();
        self.pass = Some(Pass {
            batch: b,
            plan,
            head,
            arena: DeviceArena::new(dev, &planner, scratch)?,
            idx: dev.zeros(2 * maxm)?,
            mask: dev.zeros(maxm)?,
            loss_sum: dev.zeros(1)?,
            norm: dev.zeros(2)?,
        });
        Ok(())
    }

    fn forward_backward(&mut self, batch: &MimBatch<'_>, drop_path: Option<&[f32]>) -> Result<()> {
        let c = self.model.config();
        let (channels, (height, width), layers, vocab) =
            (c.num_channels, c.image_size.hw(), c.num_hidden_layers, c.vocab_size);
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
        if let Some(f) = drop_path {
            ensure!(f.len() == layers * 2 * b, InvalidArgument, "drop path factors hold {}", f.len());
        }
        // The masked rows (in [batch, patch] order, as the CPU gathers them) and their labels.
        let mut idx: Vec<i32> = Vec::with_capacity(2 * b * n);
        let mut labels: Vec<i32> = Vec::new();
        for (i, (&m, &label)) in batch.bool_masked_pos.iter().zip(batch.labels).enumerate() {
            if m == 1 {
                idx.push(int_of("masked row", (i / n) * (n + 1) + 1 + i % n)?);
                ensure!((0..vocab as i64).contains(&label), InvalidArgument, "label {label} outside the vocabulary");
                labels.push(label as i32);
            }
        }
        let m = idx.len();
        ensure!(m > 0, InvalidArgument, "bool_masked_pos masks no patch: the MIM loss is undefined");
        idx.extend_from_slice(&labels);
        self.plan(b)?;
        let Step { be, model, params, grads, relpos, pass, .. } = self;
        let pass = pass.as_mut().expect("planned");
        let stream = be.device().stream().clone();
        let up = |e| driver_error("host-to-device copy", e);
        stream.memcpy_htod(batch.bool_masked_pos, &mut pass.mask.slice_mut(0..b * n)).map_err(up)?;
        stream.memcpy_htod(&idx, &mut pass.idx.slice_mut(0..2 * m)).map_err(up)?;
        stream.memset_zeros(grads).map_err(|e| driver_error("memset", e))?;
        let Pass { plan, head, arena, idx, mask, loss_sum, .. } = pass;
        let mut mem = CudaMemory::new(be.device(), arena, params, grads)?;
        mem.upload(head.pixels, batch.pixels)?;
        if let Some(f) = drop_path {
            mem.upload(plan.factors, f)?;
        }
        let run =
            Run { be, model, plan, head, relpos: relpos.as_ref(), mask, idx, batch: b, m, drop: drop_path.is_some() };
        run.forward(&mut mem, loss_sum)?;
        run.backward(&mut mem)?;
        self.masked = m;
        Ok(())
    }

    fn loss(&self) -> Result<f64> {
        let p = self.pass.as_ref().ok_or_else(|| Error::InvalidArgument("no pass has run".into()))?;
        let sum = self.dev().download(&p.loss_sum)?[0];
        Ok(sum / self.masked as f64)
    }

    fn apply(&mut self, clip: f64, lr: f32) -> Result<GpuStepStats> {
        let Step { be, params, grads, adamw, lr_scale, pass, masked, .. } = self;
        let dev = be.device();
        let p = pass.as_mut().ok_or_else(|| Error::InvalidArgument("no pass has run".into()))?;
        if clip > 0.0 {
            dev.clip_grad_norm(grads, clip, &mut p.norm)?;
        } else {
            dev.global_norm_into(&*grads, &mut p.norm)?;
        }
        let loss = dev.download(&p.loss_sum)?[0] / *masked as f64;
        let grad_norm = dev.download(&p.norm)?[1];
        ensure!(loss.is_finite(), Numerical, "the loss is {loss}; the step was not applied");
        ensure!(grad_norm.is_finite(), Numerical, "the gradient norm is {grad_norm}; the step was not applied");
        let (master, work) = params.master_and_work();
        adamw.step(
            dev,
            master,
            &*grads,
            lr,
            lr_scale.as_ref().map(|s| s as &dyn DevicePtr<f32>),
            work.map(|w| w as &mut dyn DevicePtrMut<bf16>),
        )?;
        Ok(GpuStepStats { loss, grad_norm })
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

/// `v` as a kernel `int`.
fn int_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} = {v} does not fit a kernel int")))
}

/// One forward and backward over a planned pass.
struct Run<'s, T: Act> {
    be: &'s CudaBackend<T>,
    model: &'s Model,
    plan: &'s ActivationPlan,
    head: &'s HeadViews,
    relpos: Option<&'s RelPosIndex>,
    mask: &'s CudaSlice<u8>,
    /// Masked row indices, then their labels.
    idx: &'s CudaSlice<i32>,
    batch: usize,
    /// Masked rows.
    m: usize,
    /// Drop path factors in the plan.
    drop: bool,
}

impl<T: Act> Run<'_, T> {
    fn dims(&self) -> BlockDims {
        self.model.block_dims(self.batch, self.plan.tokens)
    }

    fn p(&self) -> &ParamStore {
        &self.model.params
    }

    fn tokens(&self) -> TokenShape {
        let d = self.model.config().hidden_size;
        TokenShape { batch: self.batch, patches: self.plan.tokens - 1, dim: d }
    }

    fn head_params(&self) -> (Affine, Affine) {
        match &self.model.layout.head {
            HeadParams::MaskedImageModeling { layernorm, lm_head } => (*layernorm, *lm_head),
            _ => unreachable!("checked in new: a MIM model"),
        }
    }

    fn norm(&self, ln: Affine, out: View, saved: View) -> Norm {
        let p = self.p();
        Norm {
            out,
            saved,
            gamma: p.view(ln.weight),
            beta: p.view(ln.bias),
            eps: self.model.config().layer_norm_eps as f32,
        }
    }

    /// Block `blk`'s attention bias into the plan's bias view (shared + its own table); false
    /// when it has none.
    fn layer_bias(&self, mem: &mut CudaMemory<'_, T>, l: usize) -> Result<bool> {
        let layout = &self.model.layout;
        let blk = &layout.blocks[l];
        let Some(index) = self.relpos else { return Ok(false) };
        let shared = layout.shared_rel_pos_table.map(|_| self.plan.shared_bias);
        let table = blk.rel_pos_table.map(|id| self.p().view(id));
        if shared.is_none() && table.is_none() {
            return Ok(false);
        }
        self.be.relpos_bias(
            mem,
            self.plan.scratch.bias,
            shared,
            table,
            index,
            self.model.config().num_attention_heads,
        )?;
        Ok(true)
    }

    fn forward(&self, mem: &mut CudaMemory<'_, T>, loss_sum: &mut CudaSlice<f64>) -> Result<()> {
        let (be, plan, p) = (self.be, self.plan, self.p());
        let c = self.model.config();
        let layout = &self.model.layout;
        let dims = self.dims();
        let ts = self.tokens();
        let (b, n, d, m, vocab) = (dims.b, ts.patches, dims.d, self.m, c.vocab_size);
        let (ph, pw) = c.patch_size.hw();
        let (height, width) = c.image_size.hw();
        let e = &layout.embeddings;

        // Embeddings: patches, their projection, CLS / mask token / positions.
        let shape =
            PatchEmbedShape { batch: b, channels: c.num_channels, height, width, patch_h: ph, patch_w: pw, hidden: d };
        let k = shape.patch_len();
        let embedded = plan.embedded.prefix(b * n * d);
        be.patchify(mem, shape, self.head.pixels, plan.patches)?;
        be.linear(mem, embedded, plan.patches, p.view(e.patch_weight), Some(p.view(e.patch_bias)), b * n, k, d)?;
        let params = TokenParams {
            cls: p.view(e.cls_token),
            mask_token: e.mask_token.map(|id| p.view(id)),
            position: e.position_embeddings.map(|id| p.view(id)),
        };
        be.assemble_tokens(mem, plan.layer(0).x, embedded, params, self.mask, ts)?;
        if let (Some(id), Some(index)) = (layout.shared_rel_pos_table, self.relpos) {
            be.relpos_bias(mem, plan.shared_bias, None, Some(p.view(id)), index, dims.heads)?;
        }

        for (l, blk) in layout.blocks.iter().enumerate() {
            let has_bias = self.layer_bias(mem, l)?;
            let drop = self.drop.then(|| drop_factors(plan.factors, l, dims));
            let (layer, out) = (plan.layer(l), plan.block_output(l));
            block_forward(be, mem, p, blk, layer, out, &plan.scratch, has_bias, dims, drop)?;
        }
        if let Some(ln) = &layout.final_layernorm {
            be.layer_norm(mem, plan.x_out, d, self.norm(*ln, plan.output, self.head.final_saved))?;
        }

        // MIM head on the masked rows: gather, norm, logits, fused cross-entropy (the logits
        // view then holds dL/dlogits).
        let (head_ln, lm_head) = self.head_params();
        let (gathered, normed) = (plan.gathered.prefix(m * d), plan.head_normed.prefix(m * d));
        be.gather_rows(mem, gathered, plan.output, self.idx, m, d)?;
        be.layer_norm(mem, gathered, d, self.norm(head_ln, normed, self.head.head_saved.prefix(2 * m)))?;
        let logits = self.head.logits.prefix(m * vocab);
        be.linear(mem, logits, normed, p.view(lm_head.weight), Some(p.view(lm_head.bias)), m, d, vocab)?;
        let labels = self.idx.slice(m..2 * m);
        be.cross_entropy(mem, logits, &labels, vocab, 1.0 / m as f32, self.head.losses.prefix(m), loss_sum)
    }

    fn backward(&self, mem: &mut CudaMemory<'_, T>) -> Result<()> {
        let (be, plan, p) = (self.be, self.plan, self.p());
        let c = self.model.config();
        let layout = &self.model.layout;
        let dims = self.dims();
        let ts = self.tokens();
        let (b, n, d, m, vocab) = (dims.b, ts.patches, dims.d, self.m, c.vocab_size);
        let sc = plan.scratch;
        let g = |id| p.grad_view(id);

        // Head backward: dnormed = dlogits·W, dW, db, the head norm, scatter into the gradient
        // of the backbone output (which takes the output's view, as on the CPU).
        let (head_ln, lm_head) = self.head_params();
        let (gathered, normed) = (plan.gathered.prefix(m * d), plan.head_normed.prefix(m * d));
        let (dnormed, dgathered) = (sc.dnormed.prefix(m * d), sc.dbranch.prefix(m * d));
        let logits = self.head.logits.prefix(m * vocab);
        let w = p.view(lm_head.weight);
        be.linear_backward(
            mem,
            Some(dnormed),
            g(lm_head.weight),
            Some(g(lm_head.bias)),
            logits,
            normed,
            w,
            m,
            d,
            vocab,
        )?;
        let head_norm = self.norm(head_ln, normed, self.head.head_saved.prefix(2 * m));
        let (dg, dbeta) = (g(head_ln.weight), g(head_ln.bias));
        be.layer_norm_backward(mem, dgathered, dg, dbeta, dnormed, gathered, head_norm, d, DxMode::Overwrite)?;
        be.fill_zero(mem, plan.output)?;
        be.scatter_rows(mem, plan.output, dgathered, self.idx, m, d)?;

        // dL/d(backbone output) → dL/d(last block output) in dx.
        match &layout.final_layernorm {
            Some(ln) => {
                let norm = self.norm(*ln, plan.output, self.head.final_saved);
                let (dg, dbeta) = (g(ln.weight), g(ln.bias));
                be.layer_norm_backward(mem, sc.dx, dg, dbeta, plan.output, plan.x_out, norm, d, DxMode::Overwrite)?;
            }
            None => be.copy(mem, sc.dx, plan.x_out)?,
        }

        for (l, blk) in layout.blocks.iter().enumerate().rev() {
            let has_bias = self.layer_bias(mem, l)?;
            let drop = self.drop.then(|| drop_factors(plan.factors, l, dims));
            block_backward(be, mem, p, blk, plan.layer(l), &sc, has_bias, dims, drop)?;
            if has_bias {
                let index = self.relpos.expect("a bias comes from a table");
                for id in layout.shared_rel_pos_table.iter().chain(blk.rel_pos_table.iter()) {
                    be.relpos_table_grad(mem, g(*id), sc.dbias, index, dims.heads)?;
                }
            }
        }

        // Embeddings: CLS, positions, mask token, then the patch projection.
        let e = &layout.embeddings;
        let grads = TokenParams {
            cls: g(e.cls_token),
            mask_token: e.mask_token.map(g),
            position: e.position_embeddings.map(g),
        };
        let dembedded = plan.embedded.prefix(b * n * d);
        be.assemble_tokens_backward(mem, dembedded, grads, sc.dx, self.mask, ts)?;
        let k = plan.patches.len / (b * n);
        let (dw, db) = (g(e.patch_weight), g(e.patch_bias));
        be.linear_backward(mem, None, dw, Some(db), dembedded, plan.patches, p.view(e.patch_weight), b * n, k, d)
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
