//! The BEiT masked-image-modeling training step on the GPU, llm.c style: the CPU pass of
//! `model::training` (`backbone_forward_train`, the MIM head, `backbone_backward_train`) written
//! again as a sequence of the CUDA backend's ops, same math in the same order, on one stream.
//!
//! # What lives on the GPU
//! - the parameters as fp32 master copies (one flat buffer laid out like the `ParamStore`), and
//!   in bf16 mode a bf16 working copy of them that AdamW refreshes in its pass;
//! - the gradients (fp32, same layout), the AdamW moments, the per-element lr scales;
//! - one planned activation arena per batch size (`Acts`): every activation the backward needs,
//!   per layer, plus shared scratch, allocated once and addressed by offsets (`Slot`s);
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
//! # Forward (per block, after the embeddings)
//! `ln1 = LN(x)` (fused into the previous block's residual), `qkv = ln1·Wqkvᵀ + b` (bias
//! epilogue), fused attention with the relative position bias gathered into `[heads, N, N]`,
//! `y = ctx·Woᵀ`, `mid = x + k·λ1 ⊙ (y + bo)` fused with `ln2 = LN(mid)`, `fc1 = ln2·W1ᵀ + b1`,
//! exact GELU, `y = gelu·W2ᵀ`, `out = mid + k·λ2 ⊙ (y + b2)` fused with the next LN. The MIM
//! head gathers the masked rows, normalises, projects and runs the fused cross-entropy, which
//! leaves dL/dlogits in the logits buffer.
//!
//! # Backward
//! The transposes of each op, last block first; weight gradients `dW += dYᵀ·X` (fp32 output,
//! accumulated), bias gradients by the deterministic column sums (`sums.rs`), layer norm and
//! attention backwards with their fixed-order parameter sums, the relative position table
//! gradients gathered per table entry in pair order. No atomics anywhere: two runs from the same
//! state give the same bits.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop, ValidAsZeroBits};
use half::bf16;

use super::adamw::GpuAdamW;
use super::attention::{attention_backward_scratch_len, AttentionShape, RelPosIndex};
use super::device::{driver_error, CudaDevice};
use super::elementwise::by_type;
use super::kernel_args::{int, Arg};
use super::layernorm::{layernorm_backward_scratch_len, LayerNormStats, ResidualInput};
use super::matmul::{Epilogue, GemmType};
use super::patch_embed::PatchEmbedShape;
use super::sums::column_sums_scratch_len;
use crate::backend::cpu::backward::DxMode;
use crate::backend::optimizer::AdamWConfig;
use crate::backend::shapes::GemmShape;
use crate::error::{Error, Result};
use crate::model::params::{Affine, BlockParams, HeadParams, Layout, ParamId, ParamStore};
use crate::model::{relpos, Architecture, MimBatch, MimTarget, Model};
use crate::train::adamw::AdamW;

const FILE: &str = "pretrain.cu";
/// Slots start at multiples of this many elements (256 bytes for bf16), so every view handed to
/// cuBLASLt is as aligned as a fresh allocation and the heuristic can pick its fastest kernels.
const SLOT_ALIGN: usize = 128;

/// Storage precision of the GPU step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything fp32: parity with the CPU pass.
    F32,
    /// bf16 activations and GEMM/attention inputs, fp32 accumulation, fp32 master weights.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => bail!(InvalidArgument, "unknown precision {other:?} (fp32 or bf16)"),
        }
    }
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The storage types of activations: f32 and bf16.
pub trait Act: GemmType + ValidAsZeroBits + Copy + Send + Sync + Unpin + 'static {
    fn from_f32(v: f32) -> Self;
}

impl Act for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Act for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// A view of `len` elements at a raw device address inside one of the step's allocations. The
/// arena hands out many disjoint views of one buffer at once (what `CudaSlice`'s borrows cannot
/// express); the plan guarantees they do not overlap where one is written while another is read.
/// All work is on the device's single stream, so no event tracking is needed (it is disabled).
struct Dv<T> {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
    _t: PhantomData<T>,
}

impl<T> DeviceSlice<T> for Dv<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for Dv<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for Dv<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

/// `len` elements at element offset `off` of an allocation.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    off: usize,
    len: usize,
}

#[derive(Default)]
struct Planner {
    next: usize,
}

impl Planner {
    fn slot(&mut self, len: usize) -> Slot {
        let s = Slot { off: self.next, len };
        self.next += len.next_multiple_of(SLOT_ALIGN);
        s
    }
}

/// One device allocation with its base address (views are base + offset).
struct Region<T> {
    _buf: CudaSlice<T>,
    base: u64,
    stream: Arc<CudaStream>,
}

impl<T: cudarc::driver::DeviceRepr + ValidAsZeroBits> Region<T> {
    fn zeros(dev: &CudaDevice, len: usize) -> Result<Self> {
        let buf = dev.zeros::<T>(len.max(1))?;
        Ok(Self::wrap(dev, buf))
    }

    fn wrap(dev: &CudaDevice, buf: CudaSlice<T>) -> Self {
        let base = buf.device_ptr(dev.stream()).0;
        Region { _buf: buf, base, stream: dev.stream().clone() }
    }

    fn at(&self, s: Slot) -> Dv<T> {
        self.view(s.off, s.len)
    }

    fn view(&self, off: usize, len: usize) -> Dv<T> {
        Dv {
            ptr: self.base + (off * std::mem::size_of::<T>()) as u64,
            len,
            stream: self.stream.clone(),
            _t: PhantomData,
        }
    }

    fn all(&self) -> Dv<T> {
        self.view(0, self._buf.len())
    }
}

/// Shapes of the model.
#[derive(Debug, Clone, Copy)]
struct Dims {
    d: usize,
    inter: usize,
    heads: usize,
    layers: usize,
    vocab: usize,
    channels: usize,
    height: usize,
    width: usize,
    patch: (usize, usize),
    /// Patches per image N and tokens T = N + 1.
    n: usize,
    t: usize,
    eps: f32,
    scale: bool,
    has_shared: bool,
    has_rel: bool,
}

/// Per-layer activations the backward reads (T arena) and statistics (f32 arena).
#[derive(Debug, Clone, Copy)]
struct LayerSlots {
    x: Slot,
    ln1: Slot,
    qkv: Slot,
    ctx: Slot,
    /// Attention branch output before bias (kept only with layer scale: λ1's gradient needs it).
    attn_y: Slot,
    mid: Slot,
    ln2: Slot,
    /// FC1 pre-activation (GELU's input) and the GELU output.
    fc1: Slot,
    gelu: Slot,
    mlp_y: Slot,
    ln1_mean: Slot,
    ln1_rstd: Slot,
    ln2_mean: Slot,
    ln2_rstd: Slot,
    lse: Slot,
}

/// Shared slots.
#[derive(Debug, Clone, Copy)]
struct Shared {
    patches: Slot,
    embedded: Slot,
    x_out: Slot,
    /// `beit.layernorm(x_out)`, or (without that norm) the discarded output of a unit norm.
    hidden: Slot,
    gathered: Slot,
    head_normed: Slot,
    logits: Slot,
    dgathered: Slot,
    dx: Slot,
    dh: Slot,
    dbranch: Slot,
    dnormed: Slot,
    dctx: Slot,
    wide_a: Slot,
    wide_b: Slot,
    branch_y: Slot,
    /// `[1; d] ++ [0; d]`: the affine of the unit norm used when the model has no final norm.
    unit: Slot,
    // f32 arena
    final_mean: Slot,
    final_rstd: Slot,
    head_mean: Slot,
    head_rstd: Slot,
    shared_bias: Slot,
    bias: Slot,
    dbias: Slot,
    attn_scratch: Slot,
    ln_scratch: Slot,
    col_scratch: Slot,
    prod: Slot,
    losses: Slot,
    factors: Slot,
    pixels: Slot,
}

/// The activation arena of one batch size.
struct Acts<T> {
    batch: usize,
    t: Region<T>,
    f: Region<f32>,
    /// Masked row indices then their labels, `[B·N]` each.
    idx: Region<i32>,
    mask: Region<u8>,
    /// The fused cross-entropy's f64 loss sum, and the norm pass's [Σg², ‖g‖].
    loss_sum: Region<f64>,
    norm: CudaSlice<f64>,
    layers: Vec<LayerSlots>,
    s: Shared,
}

/// What one GPU step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuStepStats {
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The typed step; [`GpuPretrainer`] picks the storage type.
struct Step<T: Act> {
    dev: Arc<CudaDevice>,
    dims: Dims,
    layout: Layout,
    spans: Vec<(usize, usize)>,
    params: Region<f32>,
    /// The bf16 working copy in bf16 mode.
    work: Option<Region<bf16>>,
    grads: Region<f32>,
    adamw: GpuAdamW,
    lr_scale: Option<CudaSlice<f32>>,
    relpos: Option<RelPosIndex>,
    acts: Option<Acts<T>>,
    masked: usize,
}

impl<T: Act> Drop for Step<T> {
    fn drop(&mut self) {
        // Before the buffers below go: a trainer may be dropped on a thread that never ran CUDA.
        self.dev.make_current();
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
        dispatch!(self, s => s.dev.download(&s.grads._buf))
    }

    /// The fp32 master parameters into `store` (same model config).
    pub fn download_params(&self, store: &mut ParamStore) -> Result<()> {
        dispatch!(self, s => {
            ensure!(store.data.len() == s.params._buf.len(), InvalidArgument, "download_params: another model");
            let host = s.dev.download(&s.params._buf)?;
            store.data.copy_from_slice(&host);
            Ok(())
        })
    }

    /// The AdamW moments and step count into `opt`.
    pub fn download_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        dispatch!(self, s => {
            opt.exp_avg = s.dev.download(&s.adamw.exp_avg)?;
            opt.exp_avg_sq = s.dev.download(&s.adamw.exp_avg_sq)?;
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
            s.lr_scale = lr_scale.map(|l| s.dev.upload(l)).transpose()?;
            Ok(())
        })
    }

    /// Device bytes held by the activation arena (0 before the first batch).
    pub fn arena_bytes(&self) -> usize {
        dispatch!(self, s => s.acts.as_ref().map_or(0, |a| a.t._buf.num_bytes() + a.f._buf.num_bytes()))
    }
}

impl<T: Act> Step<T> {
    fn new(dev: Arc<CudaDevice>, model: &Model, opt: OptimizerSetup<'_>) -> Result<Self> {
        let c = model.config();
        let grid = c.native_grid();
        let (height, width) = c.image_size.hw();
        let n = grid.0 * grid.1;
        let heads = c.num_attention_heads;
        ensure!(
            matches!(c.hidden_size / heads, 32 | 64) && c.hidden_size % heads == 0,
            Unsupported,
            "the GPU step's fused attention has kernels for head dims 32 and 64; this model's is {}",
            c.hidden_size as f64 / heads as f64
        );
        let layout = model.layout.clone();
        let dims = Dims {
            d: c.hidden_size,
            inter: c.intermediate_size,
            heads,
            layers: c.num_hidden_layers,
            vocab: c.vocab_size,
            channels: c.num_channels,
            height,
            width,
            patch: c.patch_size.hw(),
            n,
            t: n + 1,
            eps: c.layer_norm_eps as f32,
            scale: c.layer_scale(),
            has_shared: layout.shared_rel_pos_table.is_some(),
            has_rel: layout.shared_rel_pos_table.is_some() || layout.blocks.iter().any(|b| b.rel_pos_table.is_some()),
        };
        let store = model.params();
        let spans = store.specs.iter().map(|s| (s.offset, s.len)).collect();
        let params = Region::wrap(&dev, dev.upload(&store.data)?);
        let work = if T::NAME == "bf16" {
            let mut w = dev.zeros::<bf16>(store.data.len())?;
            dev.cast_f32_to_bf16(&params.all(), &mut w)?;
            Some(Region::wrap(&dev, w))
        } else {
            None
        };
        let grads = Region::zeros(&dev, store.data.len())?;
        ensure!(opt.decay_mask.len() == store.data.len(), InvalidArgument, "decay mask length");
        let adamw = GpuAdamW::new(&dev, opt.config, opt.decay_mask, opt.trained)?;
        let lr_scale = opt.lr_scale.map(|l| dev.upload(l)).transpose()?;
        let relpos = if dims.has_rel {
            let index = relpos::relative_position_index(grid);
            let rows = (2 * grid.0 - 1) * (2 * grid.1 - 1) + 3;
            Some(dev.relpos_index(&index, rows)?)
        } else {
            None
        };
        // The tables must have the rows the index addresses (the native grid's).
        for id in
            layout.shared_rel_pos_table.iter().chain(layout.blocks.iter().filter_map(|b| b.rel_pos_table.as_ref()))
        {
            let len = store.specs[id.0].len;
            let want = ((2 * grid.0 - 1) * (2 * grid.1 - 1) + 3) * heads;
            ensure!(len == want, InvalidArgument, "relative position table holds {len} values, expected {want}");
        }
        Ok(Step { dev, dims, layout, spans, params, work, grads, adamw, lr_scale, relpos, acts: None, masked: 0 })
    }

    // ---- views of parameters and gradients

    /// The working copy of parameter `id` (fp32 master in fp32 mode, bf16 copy in bf16 mode).
    fn p(&self, id: ParamId) -> Dv<T> {
        let (off, len) = self.spans[id.0];
        // T is f32 exactly when there is no bf16 copy: the working copy is then the master.
        let base = self.work.as_ref().map_or(self.params.base, |w| w.base);
        Dv {
            ptr: base + (off * std::mem::size_of::<T>()) as u64,
            len,
            stream: self.params.stream.clone(),
            _t: PhantomData,
        }
    }

    /// Parameters `first..=last` (adjacent in the store), as one view.
    fn p_span(&self, first: ParamId, last: ParamId) -> Dv<T> {
        let (off, _) = self.spans[first.0];
        let (lo, ll) = self.spans[last.0];
        let mut v = self.p(first);
        v.len = lo + ll - off;
        v
    }

    fn g(&self, id: ParamId) -> Dv<f32> {
        let (off, len) = self.spans[id.0];
        self.grads.view(off, len)
    }

    fn g_span(&self, first: ParamId, last: ParamId) -> Dv<f32> {
        let (off, _) = self.spans[first.0];
        let (lo, ll) = self.spans[last.0];
        self.grads.view(off, lo + ll - off)
    }

    // ---- planning

    fn plan(&mut self, b: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.batch == b) {
            return Ok(());
        }
        self.acts = None; // free the old arena first
        let Dims { d, inter, heads, layers, vocab, channels, height, width, patch, n, t, scale, .. } = self.dims;
        let rows = b * t;
        let maxm = b * n;
        let k = channels * patch.0 * patch.1;
        let mut tp = Planner::default();
        let mut fp = Planner::default();
        let shape = AttentionShape { batch: b, tokens: t, heads, head_dim: d / heads };
        let layer_slots: Vec<LayerSlots> = (0..layers)
            .map(|_| LayerSlots {
                x: tp.slot(rows * d),
                ln1: tp.slot(rows * d),
                qkv: tp.slot(rows * 3 * d),
                ctx: tp.slot(rows * d),
                attn_y: tp.slot(if scale { rows * d } else { 0 }),
                mid: tp.slot(rows * d),
                ln2: tp.slot(rows * d),
                fc1: tp.slot(rows * inter),
                gelu: tp.slot(rows * inter),
                mlp_y: tp.slot(if scale { rows * d } else { 0 }),
                ln1_mean: fp.slot(rows),
                ln1_rstd: fp.slot(rows),
                ln2_mean: fp.slot(rows),
                ln2_rstd: fp.slot(rows),
                lse: fp.slot(b * heads * t),
            })
            .collect();
        let col_scratch = [(rows, d), (rows, 3 * d), (rows, inter), (maxm, vocab), (b * n, d)]
            .iter()
            .map(|&(r, c)| column_sums_scratch_len(r, c))
            .max()
            .unwrap_or(0);
        let s = Shared {
            patches: tp.slot(b * n * k),
            embedded: tp.slot(b * n * d),
            x_out: tp.slot(rows * d),
            hidden: tp.slot(rows * d),
            gathered: tp.slot(maxm * d),
            head_normed: tp.slot(maxm * d),
            logits: tp.slot(maxm * vocab),
            dgathered: tp.slot(maxm * d),
            dx: tp.slot(rows * d),
            dh: tp.slot(rows * d),
            dbranch: tp.slot(rows * d),
            dnormed: tp.slot(rows * d),
            dctx: tp.slot(rows * d),
            wide_a: tp.slot(rows * inter.max(3 * d)),
            wide_b: tp.slot(rows * inter),
            branch_y: tp.slot(rows * d),
            unit: tp.slot(2 * d),
            final_mean: fp.slot(rows),
            final_rstd: fp.slot(rows),
            head_mean: fp.slot(maxm),
            head_rstd: fp.slot(maxm),
            shared_bias: fp.slot(if self.dims.has_shared { heads * t * t } else { 0 }),
            bias: fp.slot(if self.dims.has_rel { heads * t * t } else { 0 }),
            dbias: fp.slot(if self.dims.has_rel { heads * t * t } else { 0 }),
            attn_scratch: fp.slot(attention_backward_scratch_len(shape, self.dims.has_rel)),
            ln_scratch: fp.slot(layernorm_backward_scratch_len(rows.max(maxm), d)),
            col_scratch: fp.slot(col_scratch),
            prod: fp.slot(rows * d),
            losses: fp.slot(maxm),
            factors: fp.slot(layers * 2 * b),
            pixels: fp.slot(b * channels * height * width),
        };
        let dev = &self.dev;
        let t_region = Region::<T>::zeros(dev, tp.next)?;
        let mut unit: Vec<T> = vec![T::from_f32(1.0); d];
        unit.extend(vec![T::from_f32(0.0); d]);
        dev.stream().memcpy_htod(&unit[..], &mut t_region.at(s.unit)).map_err(|e| driver_error("upload", e))?;
        self.acts = Some(Acts {
            batch: b,
            t: t_region,
            f: Region::zeros(dev, fp.next)?,
            idx: Region::zeros(dev, 2 * maxm)?,
            mask: Region::zeros(dev, maxm)?,
            loss_sum: Region::zeros(dev, 1)?,
            norm: dev.zeros(2)?,
            layers: layer_slots,
            s,
        });
        Ok(())
    }

    // ---- the pass

    fn forward_backward(&mut self, batch: &MimBatch<'_>, drop_path: Option<&[f32]>) -> Result<()> {
        let Dims { channels, height, width, n, layers, vocab, .. } = self.dims;
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
        self.plan(b)?;
        // The masked rows (in [batch, patch] order, as the CPU gathers them) and their labels.
        let mut idx: Vec<i32> = Vec::with_capacity(2 * b * n);
        let mut labels: Vec<i32> = Vec::new();
        for (i, (&m, &label)) in batch.bool_masked_pos.iter().zip(batch.labels).enumerate() {
            if m == 1 {
                idx.push(int("masked row", (i / n) * (n + 1) + 1 + i % n)?);
                ensure!((0..vocab as i64).contains(&label), InvalidArgument, "label {label} outside the vocabulary");
                labels.push(label as i32);
            }
        }
        let m = idx.len();
        ensure!(m > 0, InvalidArgument, "bool_masked_pos masks no patch: the MIM loss is undefined");
        idx.extend_from_slice(&labels);
        let a = self.acts.as_ref().expect("planned");
        let stream = self.dev.stream().clone();
        let up = |e| driver_error("host-to-device copy", e);
        stream.memcpy_htod(batch.pixels, &mut a.f.at(a.s.pixels)).map_err(up)?;
        stream.memcpy_htod(batch.bool_masked_pos, &mut a.mask.view(0, b * n)).map_err(up)?;
        stream.memcpy_htod(&idx, &mut a.idx.view(0, 2 * m)).map_err(up)?;
        if let Some(f) = drop_path {
            stream.memcpy_htod(f, &mut a.f.at(a.s.factors)).map_err(up)?;
        }
        self.masked = m;
        self.dev.stream().memset_zeros(&mut self.grads.all()).map_err(|e| driver_error("memset", e))?;
        let factors = drop_path.is_some();
        self.forward(b, m, factors)?;
        self.backward(b, m, factors)
    }

    /// `[batch]` drop path factors of block `l`, branch `r`.
    fn factors(&self, a: &Acts<T>, on: bool, l: usize, r: usize) -> Option<Dv<f32>> {
        on.then(|| a.f.view(a.s.factors.off + (l * 2 + r) * a.batch, a.batch))
    }

    /// The attention bias of block `blk` into the `bias` slot (shared + per-layer), as the CPU's
    /// `layer_bias_into`; false when the block has none.
    fn layer_bias(&self, a: &Acts<T>, blk: &BlockParams) -> Result<bool> {
        let heads = self.dims.heads;
        let Some(index) = &self.relpos else { return Ok(false) };
        if !self.dims.has_shared && blk.rel_pos_table.is_none() {
            return Ok(false);
        }
        let mut bias = a.f.at(a.s.bias);
        if self.dims.has_shared {
            self.dev
                .stream()
                .memcpy_dtod(&a.f.at(a.s.shared_bias), &mut bias)
                .map_err(|e| driver_error("device copy", e))?;
        }
        if let Some(id) = blk.rel_pos_table {
            self.dev.relpos_bias_gather::<T>(&mut bias, &self.p(id), index, heads, self.dims.has_shared)?;
        }
        Ok(true)
    }

    fn forward(&self, b: usize, m: usize, drop: bool) -> Result<()> {
        let dev = &*self.dev;
        let a = self.acts.as_ref().expect("planned");
        let s = &a.s;
        let Dims { d, inter, heads, vocab, channels, height, width, patch, n, t, eps, .. } = self.dims;
        let rows = b * t;
        let e = &self.layout.embeddings;
        let shape =
            PatchEmbedShape { batch: b, channels, height, width, patch_h: patch.0, patch_w: patch.1, hidden: d };
        let k = shape.patch_len();
        // Embeddings: patches, their projection, CLS / mask token / positions.
        dev.patchify_into::<T>(shape, &a.f.at(s.pixels), &mut a.t.at(s.patches))?;
        dev.linear::<T, T>(
            &mut a.t.at(s.embedded),
            &a.t.at(s.patches),
            &self.p(e.patch_weight),
            Some(&self.p(e.patch_bias)),
            b * n,
            k,
            d,
        )?;
        let l0 = a.layers[0];
        let opt_ptr = |id: Option<ParamId>| id.map_or(0, |id| self.p(id).ptr);
        let args = [
            Arg::Ptr(a.t.at(l0.x).ptr),
            Arg::Ptr(a.t.at(s.embedded).ptr),
            Arg::Ptr(self.p(e.cls_token).ptr),
            Arg::Ptr(opt_ptr(e.mask_token)),
            Arg::Ptr(opt_ptr(e.position_embeddings)),
            Arg::Ptr(a.mask.base),
            Arg::I32(int("batch", b)?),
            Arg::I32(int("patches", n)?),
            Arg::I32(int("dim", d)?),
        ];
        // SAFETY: the kernel's signature; x holds b·t·d, embedded b·n·d, the parameters their
        // spec lengths, mask b·n bytes (planned above).
        unsafe {
            dev.launch_kernel(
                FILE,
                by_type::<T>("beit_pretrain_assemble_f32", "beit_pretrain_assemble_bf16"),
                dev.launch_1d(rows * d, 256),
                &args,
            )?
        };
        if let (Some(id), Some(index)) = (self.layout.shared_rel_pos_table, &self.relpos) {
            dev.relpos_bias_gather::<T>(&mut a.f.at(s.shared_bias), &self.p(id), index, heads, false)?;
        }
        let blk0 = &self.layout.blocks[0];
        dev.layernorm_forward::<T>(
            &mut a.t.at(l0.ln1),
            Some(LayerNormStats { mean: &mut a.f.at(l0.ln1_mean), rstd: &mut a.f.at(l0.ln1_rstd) }),
            &a.t.at(l0.x),
            &self.p(blk0.ln_before_w),
            &self.p(blk0.ln_before_b),
            d,
            eps,
        )?;
        let att = AttentionShape { batch: b, tokens: t, heads, head_dim: d / heads };
        for (l, blk) in self.layout.blocks.iter().enumerate() {
            let ls = a.layers[l];
            let has_bias = self.layer_bias(a, blk)?;
            dev.linear::<T, T>(
                &mut a.t.at(ls.qkv),
                &a.t.at(ls.ln1),
                &self.p_span(blk.query_w, blk.value_w),
                Some(&self.p_span(blk.query_b, blk.value_b)),
                rows,
                d,
                3 * d,
            )?;
            let bias = a.f.at(s.bias);
            dev.attention_forward::<T>(
                &mut a.t.at(ls.ctx),
                &mut a.f.at(ls.lse),
                &a.t.at(ls.qkv),
                has_bias.then_some(&bias as &dyn DevicePtr<f32>),
                att,
            )?;
            let attn_y = if self.dims.scale { ls.attn_y } else { s.branch_y };
            dev.linear::<T, T>(&mut a.t.at(attn_y), &a.t.at(ls.ctx), &self.p(blk.out_w), None, rows, d, d)?;
            let lambda1 = blk.lambda_1.map(|id| self.p(id));
            let f1 = self.factors(a, drop, l, 0);
            dev.residual_layernorm_forward::<T>(
                &mut a.t.at(ls.mid),
                &mut a.t.at(ls.ln2),
                Some(LayerNormStats { mean: &mut a.f.at(ls.ln2_mean), rstd: &mut a.f.at(ls.ln2_rstd) }),
                ResidualInput {
                    x: &a.t.at(ls.x),
                    y: &a.t.at(attn_y),
                    bias: Some(&self.p(blk.out_b)),
                    scale: lambda1.as_ref().map(|v| v as &dyn DevicePtr<T>),
                    row_factors: f1.as_ref().map(|f| (f as &dyn DevicePtr<f32>, t)),
                },
                &self.p(blk.ln_after_w),
                &self.p(blk.ln_after_b),
                d,
                eps,
            )?;
            dev.linear::<T, T>(
                &mut a.t.at(ls.fc1),
                &a.t.at(ls.ln2),
                &self.p(blk.fc1_w),
                Some(&self.p(blk.fc1_b)),
                rows,
                d,
                inter,
            )?;
            dev.gelu_forward::<T>(&a.t.at(ls.fc1), &mut a.t.at(ls.gelu))?;
            let mlp_y = if self.dims.scale { ls.mlp_y } else { s.branch_y };
            dev.linear::<T, T>(&mut a.t.at(mlp_y), &a.t.at(ls.gelu), &self.p(blk.fc2_w), None, rows, inter, d)?;
            // The residual, fused with the next layer norm: the next block's ln_before, the
            // final norm, or (without one) a unit norm whose output nobody reads.
            let (resid, out, mean, rstd, gamma, beta) = match a.layers.get(l + 1) {
                Some(next) => {
                    let nb = &self.layout.blocks[l + 1];
                    (next.x, next.ln1, next.ln1_mean, next.ln1_rstd, self.p(nb.ln_before_w), self.p(nb.ln_before_b))
                }
                None => {
                    let (gamma, beta) = match &self.layout.final_layernorm {
                        Some(ln) => (self.p(ln.weight), self.p(ln.bias)),
                        None => (a.t.view(s.unit.off, d), a.t.view(s.unit.off + d, d)),
                    };
                    (s.x_out, s.hidden, s.final_mean, s.final_rstd, gamma, beta)
                }
            };
            let lambda2 = blk.lambda_2.map(|id| self.p(id));
            let f2 = self.factors(a, drop, l, 1);
            dev.residual_layernorm_forward::<T>(
                &mut a.t.at(resid),
                &mut a.t.at(out),
                Some(LayerNormStats { mean: &mut a.f.at(mean), rstd: &mut a.f.at(rstd) }),
                ResidualInput {
                    x: &a.t.at(ls.mid),
                    y: &a.t.at(mlp_y),
                    bias: Some(&self.p(blk.fc2_b)),
                    scale: lambda2.as_ref().map(|v| v as &dyn DevicePtr<T>),
                    row_factors: f2.as_ref().map(|f| (f as &dyn DevicePtr<f32>, t)),
                },
                &gamma,
                &beta,
                d,
                eps,
            )?;
        }

        // MIM head on the masked rows: gather, norm, logits, fused cross-entropy (the logits
        // buffer then holds dL/dlogits).
        let (head_ln, lm_head) = self.head();
        let h = if self.layout.final_layernorm.is_some() { s.hidden } else { s.x_out };
        self.rows_kernel("beit_pretrain_gather_rows", a.t.at(s.gathered).ptr, a.t.at(h).ptr, a.idx.base, m)?;
        let gathered = a.t.view(s.gathered.off, m * d);
        let normed = a.t.view(s.head_normed.off, m * d);
        dev.layernorm_forward::<T>(
            &mut normed.clone_view(),
            Some(LayerNormStats { mean: &mut a.f.view(s.head_mean.off, m), rstd: &mut a.f.view(s.head_rstd.off, m) }),
            &gathered,
            &self.p(head_ln.weight),
            &self.p(head_ln.bias),
            d,
            eps,
        )?;
        let mut logits = a.t.view(s.logits.off, m * vocab);
        dev.linear::<T, T>(&mut logits, &normed, &self.p(lm_head.weight), Some(&self.p(lm_head.bias)), m, d, vocab)?;
        let labels = a.idx.view(m, m);
        dev.cross_entropy_fused::<T>(
            &mut logits,
            &labels,
            vocab,
            1.0 / m as f32,
            0.0,
            &mut a.f.view(s.losses.off, m),
            &mut a.loss_sum.view(0, 1),
        )?;
        Ok(())
    }

    fn head(&self) -> (Affine, Affine) {
        match &self.layout.head {
            HeadParams::MaskedImageModeling { layernorm, lm_head } => (*layernorm, *lm_head),
            _ => unreachable!("checked in new: a MIM model"),
        }
    }

    /// Gather (`name` = ..._gather_rows) or scatter rows of `d` by the first `m` indices.
    fn rows_kernel(&self, name: &'static str, dst: u64, src: u64, index: u64, m: usize) -> Result<()> {
        let d = self.dims.d;
        let full: &'static str = match (name, T::NAME) {
            ("beit_pretrain_gather_rows", "f32") => "beit_pretrain_gather_rows_f32",
            ("beit_pretrain_gather_rows", _) => "beit_pretrain_gather_rows_bf16",
            (_, "f32") => "beit_pretrain_scatter_rows_f32",
            _ => "beit_pretrain_scatter_rows_bf16",
        };
        let args = [Arg::Ptr(dst), Arg::Ptr(src), Arg::Ptr(index), Arg::I32(int("rows", m)?), Arg::I32(int("dim", d)?)];
        // SAFETY: the kernel's signature; the m indices address rows of the b·t-row source
        // (gather) or destination (scatter), and the dense side holds m·d (planned for b·n rows).
        unsafe { self.dev.launch_kernel(FILE, full, self.dev.launch_1d(m * d, 256), &args) }
    }

    /// `dX[rows, n_in] = dY[rows, n_out] · W[n_out, n_in]`.
    fn input_grad(&self, dx: &mut Dv<T>, dy: &Dv<T>, w: &Dv<T>, rows: usize, n_in: usize, n_out: usize) -> Result<()> {
        self.dev.gemm::<T, T>(GemmShape::new(rows, n_in, n_out), 1.0, dy, w, 0.0, dx, Epilogue::None)
    }

    /// `dW[n_out, n_in] += dYᵀ·X` and `db += Σ_rows dY` (fp32, deterministic column sums).
    #[allow(clippy::too_many_arguments)]
    fn weight_grad(
        &self,
        a: &Acts<T>,
        dw: Dv<f32>,
        db: Option<Dv<f32>>,
        dy: &Dv<T>,
        x: &Dv<T>,
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> Result<()> {
        let mut dw = dw;
        let shape = GemmShape { trans_a: true, ..GemmShape::new(n_out, n_in, rows) };
        self.dev.gemm::<T, f32>(shape, 1.0, dy, x, 1.0, &mut dw, Epilogue::None)?;
        if let Some(mut db) = db {
            self.dev.column_sums::<T>(&mut db, dy, &mut a.f.at(a.s.col_scratch))?;
        }
        Ok(())
    }

    /// The backward of a residual branch `out = x + k·λ ⊙ (y + bias)` for its output gradient
    /// `dacc`: returns the view holding dL/dy (`dacc` itself when k = λ = 1) and adds dλ.
    #[allow(clippy::too_many_arguments)]
    fn branch_backward(
        &self,
        a: &Acts<T>,
        dacc: Slot,
        y: Slot,
        bias: ParamId,
        lambda: Option<ParamId>,
        factors: Option<Dv<f32>>,
        rows: usize,
    ) -> Result<Dv<T>> {
        let d = self.dims.d;
        if lambda.is_none() && factors.is_none() {
            return Ok(a.t.at(dacc));
        }
        let dy = a.t.view(a.s.dbranch.off, rows * d);
        let prod = a.f.view(a.s.prod.off, rows * d);
        let args = [
            Arg::Ptr(dy.ptr),
            Arg::Ptr(if lambda.is_some() { prod.ptr } else { 0 }),
            Arg::Ptr(a.t.at(dacc).ptr),
            Arg::Ptr(if lambda.is_some() { a.t.at(y).ptr } else { 0 }),
            Arg::Ptr(self.p(bias).ptr),
            Arg::Ptr(lambda.map_or(0, |id| self.p(id).ptr)),
            Arg::Ptr(factors.as_ref().map_or(0, |f| f.ptr)),
            Arg::I32(int("tokens", self.dims.t)?),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("dim", d)?),
        ];
        let name = by_type::<T>("beit_pretrain_branch_backward_f32", "beit_pretrain_branch_backward_bf16");
        // SAFETY: the kernel's signature; every tensor holds rows·d (bias, λ: d; factors: batch),
        // y is read only with λ (then it is the kept branch output).
        unsafe { self.dev.launch_kernel(FILE, name, self.dev.launch_1d(rows * d, 256), &args)? };
        if let Some(id) = lambda {
            self.dev.column_sums::<f32>(&mut self.g(id), &prod, &mut a.f.at(a.s.col_scratch))?;
        }
        Ok(dy)
    }

    fn backward(&self, b: usize, m: usize, drop: bool) -> Result<()> {
        let dev = &*self.dev;
        let a = self.acts.as_ref().expect("planned");
        let s = &a.s;
        let Dims { d, inter, heads, vocab, n, t, .. } = self.dims;
        let rows = b * t;
        // Head backward: dnormed = dlogits·W, dW, db, the head norm, scatter into dh.
        let (head_ln, lm_head) = self.head();
        let dlogits = a.t.view(s.logits.off, m * vocab);
        let normed = a.t.view(s.head_normed.off, m * d);
        let mut dnormed = a.t.view(s.dnormed.off, m * d);
        self.input_grad(&mut dnormed, &dlogits, &self.p(lm_head.weight), m, d, vocab)?;
        self.weight_grad(a, self.g(lm_head.weight), Some(self.g(lm_head.bias)), &dlogits, &normed, m, d, vocab)?;
        dev.layernorm_backward::<T>(
            &mut a.t.view(s.dgathered.off, m * d),
            &mut self.g(head_ln.weight),
            &mut self.g(head_ln.bias),
            &dnormed,
            &a.t.view(s.gathered.off, m * d),
            &self.p(head_ln.weight),
            &a.f.view(s.head_mean.off, m),
            &a.f.view(s.head_rstd.off, m),
            d,
            DxMode::Overwrite,
            &mut a.f.at(s.ln_scratch),
        )?;
        let mut dh = a.t.at(s.dh);
        dev.stream().memset_zeros(&mut dh).map_err(|e| driver_error("memset", e))?;
        self.rows_kernel("beit_pretrain_scatter_rows", dh.ptr, a.t.at(s.dgathered).ptr, a.idx.base, m)?;

        // dL/dhidden → dL/dx_out in dx.
        let mut dx = a.t.at(s.dx);
        match &self.layout.final_layernorm {
            Some(ln) => dev.layernorm_backward::<T>(
                &mut dx,
                &mut self.g(ln.weight),
                &mut self.g(ln.bias),
                &dh,
                &a.t.at(s.x_out),
                &self.p(ln.weight),
                &a.f.at(s.final_mean),
                &a.f.at(s.final_rstd),
                d,
                DxMode::Overwrite,
                &mut a.f.at(s.ln_scratch),
            )?,
            None => dev.stream().memcpy_dtod(&dh, &mut dx).map_err(|e| driver_error("device copy", e))?,
        }

        let att = AttentionShape { batch: b, tokens: t, heads, head_dim: d / heads };
        for (l, blk) in self.layout.blocks.iter().enumerate().rev() {
            let ls = a.layers[l];
            // MLP branch.
            let mlp_y = if self.dims.scale { ls.mlp_y } else { s.branch_y };
            let dbranch =
                self.branch_backward(a, s.dx, mlp_y, blk.fc2_b, blk.lambda_2, self.factors(a, drop, l, 1), rows)?;
            let mut dgelu = a.t.view(s.wide_b.off, rows * inter);
            self.input_grad(&mut dgelu, &dbranch, &self.p(blk.fc2_w), rows, inter, d)?;
            self.weight_grad(
                a,
                self.g(blk.fc2_w),
                Some(self.g(blk.fc2_b)),
                &dbranch,
                &a.t.at(ls.gelu),
                rows,
                inter,
                d,
            )?;
            let mut dfc1 = a.t.view(s.wide_a.off, rows * inter);
            dev.gelu_backward::<T>(&a.t.at(ls.fc1), &dgelu, &mut dfc1)?;
            let mut dnormed = a.t.at(s.dnormed);
            self.input_grad(&mut dnormed, &dfc1, &self.p(blk.fc1_w), rows, d, inter)?;
            self.weight_grad(a, self.g(blk.fc1_w), Some(self.g(blk.fc1_b)), &dfc1, &a.t.at(ls.ln2), rows, d, inter)?;
            dev.layernorm_backward::<T>(
                &mut a.t.at(s.dx),
                &mut self.g(blk.ln_after_w),
                &mut self.g(blk.ln_after_b),
                &dnormed,
                &a.t.at(ls.mid),
                &self.p(blk.ln_after_w),
                &a.f.at(ls.ln2_mean),
                &a.f.at(ls.ln2_rstd),
                d,
                DxMode::Accumulate,
                &mut a.f.at(s.ln_scratch),
            )?;

            // Attention branch.
            let attn_y = if self.dims.scale { ls.attn_y } else { s.branch_y };
            let dbranch =
                self.branch_backward(a, s.dx, attn_y, blk.out_b, blk.lambda_1, self.factors(a, drop, l, 0), rows)?;
            let mut dctx = a.t.at(s.dctx);
            self.input_grad(&mut dctx, &dbranch, &self.p(blk.out_w), rows, d, d)?;
            self.weight_grad(a, self.g(blk.out_w), Some(self.g(blk.out_b)), &dbranch, &a.t.at(ls.ctx), rows, d, d)?;
            let has_bias = self.layer_bias(a, blk)?;
            let mut dbias = a.f.at(s.dbias);
            if has_bias {
                dev.stream().memset_zeros(&mut dbias).map_err(|e| driver_error("memset", e))?;
            }
            let bias = a.f.at(s.bias);
            let mut dqkv = a.t.view(s.wide_a.off, rows * 3 * d);
            dev.attention_backward::<T>(
                &mut dqkv,
                if has_bias { Some(&mut dbias as &mut dyn DevicePtrMut<f32>) } else { None },
                &dctx,
                &a.t.at(ls.qkv),
                &a.t.at(ls.ctx),
                &a.f.at(ls.lse),
                has_bias.then_some(&bias as &dyn DevicePtr<f32>),
                att,
                &mut a.f.at(s.attn_scratch),
            )?;
            if has_bias {
                let index = self.relpos.as_ref().expect("has_rel");
                if let Some(id) = self.layout.shared_rel_pos_table {
                    dev.relpos_table_grad(&mut self.g(id), &dbias, index, heads)?;
                }
                if let Some(id) = blk.rel_pos_table {
                    dev.relpos_table_grad(&mut self.g(id), &dbias, index, heads)?;
                }
            }
            let mut dnormed = a.t.at(s.dnormed);
            self.input_grad(&mut dnormed, &dqkv, &self.p_span(blk.query_w, blk.value_w), rows, d, 3 * d)?;
            self.weight_grad(
                a,
                self.g_span(blk.query_w, blk.value_w),
                Some(self.g_span(blk.query_b, blk.value_b)),
                &dqkv,
                &a.t.at(ls.ln1),
                rows,
                d,
                3 * d,
            )?;
            // The key bias is not a parameter (fixed at zero): drop what it collected.
            dev.stream().memset_zeros(&mut self.g(blk.key_b)).map_err(|e| driver_error("memset", e))?;
            dev.layernorm_backward::<T>(
                &mut a.t.at(s.dx),
                &mut self.g(blk.ln_before_w),
                &mut self.g(blk.ln_before_b),
                &dnormed,
                &a.t.at(ls.x),
                &self.p(blk.ln_before_w),
                &a.f.at(ls.ln1_mean),
                &a.f.at(ls.ln1_rstd),
                d,
                DxMode::Accumulate,
                &mut a.f.at(s.ln_scratch),
            )?;
        }

        // Embeddings: CLS, positions, mask token, then the patch projection.
        let e = &self.layout.embeddings;
        let opt_g = |id: Option<ParamId>| id.map_or(0, |id| self.g(id).ptr);
        let args = [
            Arg::Ptr(self.g(e.cls_token).ptr),
            Arg::Ptr(opt_g(e.position_embeddings)),
            Arg::Ptr(opt_g(e.mask_token)),
            Arg::Ptr(a.t.at(s.dx).ptr),
            Arg::Ptr(a.mask.base),
            Arg::I32(int("batch", b)?),
            Arg::I32(int("patches", n)?),
            Arg::I32(int("dim", d)?),
        ];
        let name = by_type::<T>("beit_pretrain_embed_param_grads_f32", "beit_pretrain_embed_param_grads_bf16");
        // SAFETY: the kernel's signature; dx holds b·t·d, the gradients their spec lengths.
        unsafe { dev.launch_kernel(FILE, name, dev.launch_1d(t * d + d, 128), &args)? };
        let dembedded = a.t.at(s.embedded);
        let args = [
            Arg::Ptr(dembedded.ptr),
            Arg::Ptr(a.t.at(s.dx).ptr),
            Arg::Ptr(a.mask.base),
            Arg::I32(e.mask_token.is_some() as i32),
            Arg::I32(int("batch", b)?),
            Arg::I32(int("patches", n)?),
            Arg::I32(int("dim", d)?),
        ];
        let name = by_type::<T>("beit_pretrain_embed_backward_rows_f32", "beit_pretrain_embed_backward_rows_bf16");
        // SAFETY: the kernel's signature; dembedded holds b·n·d (it reuses the forward's slot).
        unsafe { dev.launch_kernel(FILE, name, dev.launch_1d(b * n * d, 256), &args)? };
        let k = self.dims.channels * self.dims.patch.0 * self.dims.patch.1;
        self.weight_grad(
            a,
            self.g(e.patch_weight),
            Some(self.g(e.patch_bias)),
            &dembedded,
            &a.t.at(s.patches),
            b * n,
            k,
            d,
        )
    }

    fn loss(&self) -> Result<f64> {
        let a = self.acts.as_ref().ok_or_else(|| Error::InvalidArgument("no pass has run".into()))?;
        let sum = self.dev.download(&a.loss_sum._buf)?[0];
        Ok(sum / self.masked as f64)
    }

    fn apply(&mut self, clip: f64, lr: f32) -> Result<GpuStepStats> {
        let dev = self.dev.clone();
        let a = self.acts.as_mut().ok_or_else(|| Error::InvalidArgument("no pass has run".into()))?;
        let mut grads = self.grads.all();
        if clip > 0.0 {
            dev.clip_grad_norm(&mut grads, clip, &mut a.norm)?;
        } else {
            dev.global_norm_into(&grads, &mut a.norm)?;
        }
        let loss = dev.download(&a.loss_sum._buf)?[0] / self.masked as f64;
        let grad_norm = dev.download(&a.norm)?[1];
        ensure!(loss.is_finite(), Numerical, "the loss is {loss}; the step was not applied");
        ensure!(grad_norm.is_finite(), Numerical, "the gradient norm is {grad_norm}; the step was not applied");
        let mut params = self.params.all();
        let mut work = self.work.as_ref().map(|w| w.all());
        self.adamw.step(
            &dev,
            &mut params,
            &grads,
            lr,
            self.lr_scale.as_ref().map(|s| s as &dyn DevicePtr<f32>),
            work.as_mut().map(|w| w as &mut dyn DevicePtrMut<bf16>),
        )?;
        Ok(GpuStepStats { loss, grad_norm })
    }

    fn upload_state(&mut self, store: &ParamStore, opt: &AdamW) -> Result<()> {
        let dev = self.dev.clone();
        ensure!(store.data.len() == self.params._buf.len(), InvalidArgument, "upload_state: another model");
        let up = |e| driver_error("host-to-device copy", e);
        dev.stream().memcpy_htod(&store.data, &mut self.params.all()).map_err(up)?;
        if let Some(w) = &self.work {
            dev.cast_f32_to_bf16(&self.params.all(), &mut w.all())?;
        }
        dev.upload_into(&opt.exp_avg, &mut self.adamw.exp_avg)?;
        dev.upload_into(&opt.exp_avg_sq, &mut self.adamw.exp_avg_sq)?;
        self.adamw.step = opt.step;
        self.adamw.config = opt.config;
        Ok(())
    }
}

impl<T> Dv<T> {
    fn clone_view(&self) -> Dv<T> {
        Dv { ptr: self.ptr, len: self.len, stream: self.stream.clone(), _t: PhantomData }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_disjoint() {
        let mut p = Planner::default();
        let a = p.slot(5);
        let b = p.slot(0);
        let c = p.slot(300);
        assert_eq!((a.off, b.off, c.off), (0, 128, 128));
        assert_eq!(p.next, 128 + 384);
        assert!(c.off % SLOT_ALIGN == 0);
    }

    #[test]
    fn precision_parses() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("fp32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("fp16".parse::<Precision>().is_err());
    }
}
