//! The CUDA backend as a [`Backend`]: the ops of a BEiT pass on the device's one stream, over
//! memory planned as views. [`CudaMemory`] resolves a view to a device address: `Act` into the
//! activation arena (the storage type `T`: f32, or bf16 in a bf16 run), `Stat` into the f32
//! arena, `Param` into the parameters' working copy (`T`, laid out like the flat `ParamStore`),
//! `Grad` into the f32 gradient buffer (same layout).
//!
//! What the GPU keeps for backwards (flash-style): layer norms their per-row mean and rstd
//! (`Stat`, mean then rstd), attention its per-row log-sum-exp, GELU its input (the FC1 output).
//! Bias gradients are deterministic column sums of the output gradient in
//! [`Backend::linear_backward`] (so `gelu_backward` and `residual_backward` leave them to it).
//! The backend's own scratch (column-sum partials, layer norm backward partials, the residual
//! backward's products for dλ) lives in the [`DeviceArena`], sized when it is created
//! ([`Scratch`]).
//!
//! Every op equals the CPU's (`backend::cpu::ops`, the reference) to rounding in f32 storage:
//! tests/cuda_kernels.rs and tests/cuda_ops.rs op by op, tests/cuda_pretrain.rs the whole MIM
//! step.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop, ValidAsZeroBits};
use half::bf16;

use super::attention::{attention_backward_scratch_len, RelPosIndex};
use super::device::{driver_error, CudaDevice};
use super::layernorm::{layernorm_backward_scratch_len, LayerNormStats, ResidualInput};
use super::matmul::{Epilogue, GemmType};
use super::patch_embed::PatchEmbedShape;
use super::sums::column_sums_scratch_len;
use crate::backend::memory::{Planner, Space, View};
use crate::backend::ops::{Backend, Branch, BranchGrads, DxMode, Norm};
use crate::backend::shapes::{AttentionShape, GemmShape};
use crate::error::{Error, Result};

/// Storage precision of a GPU run.
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

/// The storage types of activations and working parameters: f32 and bf16.
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

/// `len` elements at a raw device address inside one live allocation. A pass addresses many
/// disjoint views of one buffer at once (what `CudaSlice`'s borrows cannot express); the memory
/// checks that an op's written views overlap none of its other views. All work is on the
/// device's single stream, so no event tracking is needed (it is disabled).
pub(crate) struct DeviceView<T> {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
    _t: PhantomData<T>,
}

impl<T> DeviceSlice<T> for DeviceView<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DeviceView<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceView<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

/// A buffer's base address and length (elements).
#[derive(Debug, Clone, Copy)]
struct Span {
    ptr: u64,
    len: usize,
}

impl Span {
    fn of<T>(buf: &CudaSlice<T>, stream: &CudaStream) -> Span {
        Span { ptr: buf.device_ptr(stream).0, len: buf.len() }
    }
}

/// The parameters on the device: the fp32 master copy, and in a bf16 run the bf16 working copy
/// the ops read (refreshed by whoever updates the master: AdamW in its pass).
pub struct DeviceParams<T: Act> {
    master: CudaSlice<f32>,
    work: Option<CudaSlice<bf16>>,
    _t: PhantomData<T>,
}

impl<T: Act> DeviceParams<T> {
    /// `values` (a flat `ParamStore`'s data) on the device, with the working copy.
    pub fn upload(dev: &CudaDevice, values: &[f32]) -> Result<Self> {
        ensure!(!values.is_empty(), InvalidArgument, "device parameters: an empty store");
        let master = dev.upload(values)?;
        let work = if T::NAME == "bf16" { Some(dev.zeros::<bf16>(values.len())?) } else { None };
        let mut p = DeviceParams { master, work, _t: PhantomData };
        p.refresh_work(dev)?;
        Ok(p)
    }

    pub fn len(&self) -> usize {
        self.master.len()
    }

    pub fn is_empty(&self) -> bool {
        self.master.is_empty()
    }

    /// The fp32 master copy.
    pub fn master(&self) -> &CudaSlice<f32> {
        &self.master
    }

    /// Replaces the values with `values` (same length) and refreshes the working copy.
    pub fn set(&mut self, dev: &CudaDevice, values: &[f32]) -> Result<()> {
        dev.upload_into(values, &mut self.master)?;
        self.refresh_work(dev)
    }

    /// The master copy and the bf16 working copy (bf16 runs), for an update that writes both.
    pub fn master_and_work(&mut self) -> (&mut CudaSlice<f32>, Option<&mut CudaSlice<bf16>>) {
        (&mut self.master, self.work.as_mut())
    }

    fn refresh_work(&mut self, dev: &CudaDevice) -> Result<()> {
        match &mut self.work {
            Some(w) => dev.cast_f32_to_bf16(&self.master, w),
            None => Ok(()),
        }
    }

    /// The working copy, in `T`.
    fn working(&self, stream: &CudaStream) -> Span {
        match &self.work {
            Some(w) => Span::of(w, stream),
            // T is f32 exactly when there is no bf16 copy: the working copy is then the master.
            None => {
                debug_assert_eq!(T::NAME, "f32");
                Span::of(&self.master, stream)
            }
        }
    }
}

/// The scratch [`CudaBackend`]'s ops use beyond a pass's views, sized for the largest op of the
/// pass: lengths in f32 elements.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scratch {
    column_sums: usize,
    layer_norm: usize,
    products: usize,
}

impl Scratch {
    /// Room for the bias gradient of [`Backend::linear_backward`] over `rows` rows of `n`
    /// outputs (a column sum of the output gradient).
    pub fn linear_backward(mut self, rows: usize, n: usize) -> Self {
        self.column_sums = self.column_sums.max(column_sums_scratch_len(rows, n));
        self
    }

    /// Room for [`Backend::layer_norm_backward`] over `rows` rows of `dim`.
    pub fn layer_norm_backward(mut self, rows: usize, dim: usize) -> Self {
        self.layer_norm = self.layer_norm.max(layernorm_backward_scratch_len(rows, dim));
        self
    }

    /// Room for [`Backend::residual_backward`] over `rows` rows of `dim` (with layer scale:
    /// the products whose column sums are dλ).
    pub fn residual_backward(mut self, rows: usize, dim: usize) -> Self {
        self.products = self.products.max(rows * dim);
        self.linear_backward(rows, dim)
    }
}

/// The device memory of one planned pass: the activation arena (`Act`, in `T`), the statistics
/// arena (`Stat`, f32), and the backend's [`Scratch`].
pub struct DeviceArena<T: Act> {
    act: CudaSlice<T>,
    stat: CudaSlice<f32>,
    column_sums: CudaSlice<f32>,
    layer_norm: CudaSlice<f32>,
    products: CudaSlice<f32>,
}

impl<T: Act> DeviceArena<T> {
    /// Zeroed buffers for the views `plan` handed out (a split planner: the backend's) and
    /// `scratch`.
    pub fn new(dev: &CudaDevice, plan: &Planner, scratch: Scratch) -> Result<Self> {
        ensure!(!plan.is_shared(), InvalidArgument, "a device arena holds a split plan");
        // Zero-length device allocations are refused: every buffer holds at least one element.
        let f32s = |n: usize| dev.zeros::<f32>(n.max(1));
        Ok(DeviceArena {
            act: dev.zeros::<T>(plan.act_total().max(1))?,
            stat: f32s(plan.stat_total())?,
            column_sums: f32s(scratch.column_sums)?,
            layer_norm: f32s(scratch.layer_norm)?,
            products: f32s(scratch.products)?,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.act.num_bytes()
            + self.stat.num_bytes()
            + self.column_sums.num_bytes()
            + self.layer_norm.num_bytes()
            + self.products.num_bytes()
    }
}

/// The device's resolution of a pass's views (see the module documentation): borrows the
/// arena, the parameters and the gradients for the pass's duration.
pub struct CudaMemory<'a, T: Act> {
    act: Span,
    stat: Span,
    params: Span,
    grads: Span,
    column_sums: Span,
    layer_norm: Span,
    products: Span,
    stream: Arc<CudaStream>,
    _borrows: PhantomData<(&'a mut DeviceArena<T>, &'a DeviceParams<T>, &'a mut CudaSlice<f32>)>,
}

impl<'a, T: Act> CudaMemory<'a, T> {
    /// `grads` is laid out like the parameters (f32).
    pub fn new(
        dev: &CudaDevice,
        arena: &'a mut DeviceArena<T>,
        params: &'a DeviceParams<T>,
        grads: &'a mut CudaSlice<f32>,
    ) -> Result<Self> {
        ensure!(
            grads.len() == params.len(),
            InvalidArgument,
            "device memory: the gradients hold {} values, the parameters {}",
            grads.len(),
            params.len()
        );
        let s = dev.stream();
        Ok(CudaMemory {
            act: Span::of(&arena.act, s),
            stat: Span::of(&arena.stat, s),
            params: params.working(s),
            grads: Span::of(grads, s),
            column_sums: Span::of(&arena.column_sums, s),
            layer_norm: Span::of(&arena.layer_norm, s),
            products: Span::of(&arena.products, s),
            stream: s.clone(),
            _borrows: PhantomData,
        })
    }

    fn at<E>(&self, span: Span, offset: usize, len: usize) -> DeviceView<E> {
        DeviceView {
            ptr: span.ptr + (offset * std::mem::size_of::<E>()) as u64,
            len,
            stream: self.stream.clone(),
            _t: PhantomData,
        }
    }

    fn in_span<E>(&self, span: Span, v: View) -> DeviceView<E> {
        assert!(v.offset + v.len <= span.len, "device memory: a {:?} view outside its buffer", v.space);
        self.at(span, v.offset, v.len)
    }

    /// A view of `T` elements: activations or parameters.
    pub(crate) fn t(&self, v: View) -> DeviceView<T> {
        match v.space {
            Space::Act => self.in_span(self.act, v),
            Space::Param => self.in_span(self.params, v),
            other => panic!("device memory: a {other:?} view where {} elements belong", T::NAME),
        }
    }

    /// A view of f32 elements: statistics or gradients.
    pub(crate) fn f(&self, v: View) -> DeviceView<f32> {
        match v.space {
            Space::Stat => self.in_span(self.stat, v),
            Space::Grad => self.in_span(self.grads, v),
            other => panic!("device memory: a {other:?} view where f32 elements belong"),
        }
    }

    fn scratch(&self, span: Span, len: usize, what: &str) -> DeviceView<f32> {
        assert!(len <= span.len, "device memory: the {what} scratch holds {}, an op needs {len}", span.len);
        self.at(span, 0, len)
    }

    /// Copies `host` into the f32 view `v` (`Stat` or `Grad`, of `host`'s length).
    pub fn upload(&mut self, v: View, host: &[f32]) -> Result<()> {
        ensure!(v.len == host.len(), InvalidArgument, "upload: {} values into a view of {}", host.len(), v.len);
        let mut dst = self.f(v);
        self.stream.memcpy_htod(host, &mut dst).map_err(|e| driver_error("host-to-device copy", e))
    }
}

/// Whether two views of a split plan share an element: only views of one space can (the `Act`
/// and `Stat` buffers are apart on the device).
fn overlap(a: &View, b: &View) -> bool {
    a.space == b.space && !a.is_empty() && !b.is_empty() && a.offset < b.offset + b.len && b.offset < a.offset + a.len
}

/// Refuses an op whose written views include a parameter, or overlap each other or a read view
/// (reads may overlap): on the device that would be a silent race or a wrong result.
pub(super) fn check_views(op: &str, writes: &[View], reads: &[View]) {
    for (i, w) in writes.iter().enumerate() {
        assert!(w.space != Space::Param, "{op}: writes a parameter");
        for o in writes[..i].iter().chain(reads) {
            assert!(!overlap(w, o), "{op}: a written view overlaps another view of the op");
        }
    }
}

fn rows_of(len: usize, dim: usize) -> usize {
    assert!(dim > 0 && len % dim == 0, "{len} elements is not a whole number of rows of {dim}");
    len / dim
}

/// The CUDA backend over storage type `T` (f32 or bf16), on the process's device.
pub struct CudaBackend<T: Act> {
    dev: Arc<CudaDevice>,
    _t: PhantomData<T>,
}

impl<T: Act> Clone for CudaBackend<T> {
    fn clone(&self) -> Self {
        CudaBackend { dev: self.dev.clone(), _t: PhantomData }
    }
}

impl<T: Act> std::fmt::Debug for CudaBackend<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("storage", &T::NAME).finish()
    }
}

impl<T: Act> CudaBackend<T> {
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        CudaBackend { dev, _t: PhantomData }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The mean and rstd halves of a norm's saved statistics over `rows` rows.
    fn stats<'m>(m: &CudaMemory<'m, T>, saved: View, rows: usize) -> Option<(DeviceView<f32>, DeviceView<f32>)> {
        (!saved.is_empty()).then(|| {
            assert_eq!(saved.len, 2 * rows, "layer norm: saved statistics of {} for {rows} rows", saved.len);
            (m.f(saved.sub(0, rows)), m.f(saved.sub(rows, rows)))
        })
    }

    /// `dst = src` (one space, same length).
    pub fn copy(&self, m: &mut CudaMemory<'_, T>, dst: View, src: View) -> Result<()> {
        check_views("copy", &[dst], &[src]);
        ensure!(dst.len == src.len && dst.space == src.space, InvalidArgument, "copy: {src:?} into {dst:?}");
        let copied = |e| driver_error("device copy", e);
        match dst.space {
            Space::Act | Space::Param => self.dev.stream().memcpy_dtod(&m.t(src), &mut m.t(dst)).map_err(copied),
            Space::Stat | Space::Grad => self.dev.stream().memcpy_dtod(&m.f(src), &mut m.f(dst)).map_err(copied),
        }
    }

    /// `patches[B·N, C·ph·pw]` (`Act`) from the f32 `pixels` (`Stat`, NCHW): the rows of the
    /// patch projection.
    pub fn patchify(
        &self,
        m: &mut CudaMemory<'_, T>,
        shape: PatchEmbedShape,
        pixels: View,
        patches: View,
    ) -> Result<()> {
        check_views("patchify", &[patches], &[pixels]);
        self.dev.patchify_into::<T>(shape, &m.f(pixels), &mut m.t(patches))
    }

    /// The attention bias of one block into `bias` (`Stat`, `[heads, N, N]`): the shared bias
    /// (a `Stat` view) when given, plus the gather of `table` (a `Param` view of a relative
    /// position table) when given.
    pub fn relpos_bias(
        &self,
        m: &mut CudaMemory<'_, T>,
        bias: View,
        shared: Option<View>,
        table: Option<View>,
        index: &RelPosIndex,
        heads: usize,
    ) -> Result<()> {
        if let Some(s) = shared {
            self.copy(m, bias, s)?;
        }
        if let Some(t) = table {
            check_views("relpos_bias", &[bias], &[t]);
            self.dev.relpos_bias_gather::<T>(&mut m.f(bias), &m.t(t), index, heads, shared.is_some())?;
        }
        Ok(())
    }

    /// `dtable += ` the gradient of a table gathered into `dbias` (`Grad` and `Stat` views).
    pub fn relpos_table_grad(
        &self,
        m: &mut CudaMemory<'_, T>,
        dtable: View,
        dbias: View,
        index: &RelPosIndex,
        heads: usize,
    ) -> Result<()> {
        check_views("relpos_table_grad", &[dtable], &[dbias]);
        self.dev.relpos_table_grad(&mut m.f(dtable), &m.f(dbias), index, heads)
    }

    /// The softmax cross-entropy fused with its gradient over `[rows, vocab]` `logits`, which
    /// leave holding dL/dlogits of the loss `Σ losses · inv_rows`; `losses` (`Stat`, `[rows]`)
    /// the per-row losses, `loss_sum[0]` their f64 sum. `labels` on the device, `[rows]`.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy(
        &self,
        m: &mut CudaMemory<'_, T>,
        logits: View,
        labels: &dyn DevicePtr<i32>,
        vocab: usize,
        inv_rows: f32,
        losses: View,
        loss_sum: &mut dyn DevicePtrMut<f64>,
    ) -> Result<()> {
        check_views("cross_entropy", &[logits, losses], &[]);
        self.dev.cross_entropy_fused::<T>(&mut m.t(logits), labels, vocab, inv_rows, 0.0, &mut m.f(losses), loss_sum)
    }
}

impl<T: Act> Backend for CudaBackend<T> {
    type Memory<'a> = CudaMemory<'a, T>;

    fn shared_planner(&self) -> bool {
        false
    }

    fn layer_norm_saved_len(&self, rows: usize) -> usize {
        2 * rows
    }

    fn attention_saved_len(&self, shape: AttentionShape) -> usize {
        shape.batch * shape.heads * shape.tokens
    }

    fn attention_scratch_len(&self, shape: AttentionShape) -> usize {
        // Without saving, the forward writes its log-sum-exps here.
        self.attention_saved_len(shape)
    }

    fn attention_backward_scratch_len(&self, shape: AttentionShape, with_dbias: bool) -> usize {
        attention_backward_scratch_len(shape, with_dbias)
    }

    fn layer_norm(&self, m: &mut CudaMemory<'_, T>, x: View, dim: usize, norm: Norm) -> Result<()> {
        check_views("layer_norm", &[norm.out, norm.saved], &[x, norm.gamma, norm.beta]);
        let rows = rows_of(x.len, dim);
        let mut stats = Self::stats(m, norm.saved, rows);
        let stats = stats.as_mut().map(|(mean, rstd)| LayerNormStats { mean, rstd });
        self.dev.layernorm_forward::<T>(
            &mut m.t(norm.out),
            stats,
            &m.t(x),
            &m.t(norm.gamma),
            &m.t(norm.beta),
            dim,
            norm.eps,
        )
    }

    fn layer_norm_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dx: View,
        dgamma: View,
        dbeta: View,
        dy: View,
        x: View,
        norm: Norm,
        dim: usize,
        mode: DxMode,
    ) -> Result<()> {
        check_views("layer_norm_backward", &[dx, dgamma, dbeta], &[dy, x, norm.gamma, norm.saved]);
        let rows = rows_of(x.len, dim);
        let (mean, rstd) =
            Self::stats(m, norm.saved, rows).expect("a device layer norm backward reads the saved statistics");
        let mut scratch = m.scratch(m.layer_norm, layernorm_backward_scratch_len(rows, dim), "layer norm");
        self.dev.layernorm_backward::<T>(
            &mut m.t(dx),
            &mut m.f(dgamma),
            &mut m.f(dbeta),
            &m.t(dy),
            &m.t(x),
            &m.t(norm.gamma),
            &mean,
            &rstd,
            dim,
            mode,
            &mut scratch,
        )
    }

    fn linear(
        &self,
        m: &mut CudaMemory<'_, T>,
        y: View,
        x: View,
        w: View,
        bias: Option<View>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        check_views("linear", &[y], &[x, w, bias.unwrap_or(View::empty(Space::Param))]);
        let bias = bias.map(|b| m.t(b));
        self.dev.linear::<T, T>(
            &mut m.t(y),
            &m.t(x),
            &m.t(w),
            bias.as_ref().map(|b| b as &dyn DevicePtr<T>),
            rows,
            k,
            n,
        )
    }

    fn linear_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dx: Option<View>,
        dw: View,
        db: Option<View>,
        dy: View,
        x: View,
        w: View,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let none = View::empty(Space::Grad);
        check_views("linear_backward", &[dx.unwrap_or(View::empty(Space::Act)), dw, db.unwrap_or(none)], &[dy, x, w]);
        let dev = &self.dev;
        if let Some(dx) = dx {
            // dX[rows, k] = dY[rows, n] · W[n, k].
            dev.gemm::<T, T>(GemmShape::new(rows, k, n), 1.0, &m.t(dy), &m.t(w), 0.0, &mut m.t(dx), Epilogue::None)?;
        }
        // dW[n, k] += dYᵀ · X, accumulated in f32.
        let shape = GemmShape { trans_a: true, ..GemmShape::new(n, k, rows) };
        dev.gemm::<T, f32>(shape, 1.0, &m.t(dy), &m.t(x), 1.0, &mut m.f(dw), Epilogue::None)?;
        if let Some(db) = db {
            let mut scratch = m.scratch(m.column_sums, column_sums_scratch_len(rows, n), "column sums");
            dev.column_sums::<T>(&mut m.f(db), &m.t(dy), &mut scratch)?;
        }
        Ok(())
    }

    fn linear_gelu(
        &self,
        m: &mut CudaMemory<'_, T>,
        pre: View,
        out: View,
        x: View,
        w: View,
        bias: View,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        // The exact (erf) GELU after the bias epilogue: cuBLASLt's GELU epilogues are the tanh
        // form. `pre` keeps GELU's input for the backward.
        self.linear(m, pre, x, w, Some(bias), rows, k, n)?;
        if pre == out {
            self.dev.gelu_forward_inplace::<T>(&mut m.t(out))
        } else {
            check_views("linear_gelu", &[out], &[pre]);
            self.dev.gelu_forward::<T>(&m.t(pre), &mut m.t(out))
        }
    }

    fn gelu_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dpre: View,
        _dbias: View,
        dout: View,
        pre: View,
    ) -> Result<bool> {
        check_views("gelu_backward", &[dpre], &[dout, pre]);
        self.dev.gelu_backward::<T>(&m.t(pre), &m.t(dout), &mut m.t(dpre))?;
        Ok(false)
    }

    fn attention(
        &self,
        m: &mut CudaMemory<'_, T>,
        ctx: View,
        saved: View,
        scratch: View,
        qkv: View,
        bias: Option<View>,
        shape: AttentionShape,
    ) -> Result<()> {
        let lse = if saved.is_empty() { scratch.prefix(self.attention_saved_len(shape)) } else { saved };
        check_views("attention", &[ctx, lse], &[qkv, bias.unwrap_or(View::empty(Space::Stat))]);
        let bias = bias.map(|b| m.f(b));
        self.dev.attention_forward::<T>(
            &mut m.t(ctx),
            &mut m.f(lse),
            &m.t(qkv),
            bias.as_ref().map(|b| b as &dyn DevicePtr<f32>),
            shape,
        )
    }

    fn attention_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dqkv: View,
        dbias: Option<View>,
        dctx: View,
        qkv: View,
        ctx: View,
        saved: View,
        bias: Option<View>,
        shape: AttentionShape,
        scratch: View,
    ) -> Result<()> {
        let no_stat = View::empty(Space::Stat);
        check_views(
            "attention_backward",
            &[dqkv, dbias.unwrap_or(no_stat), scratch],
            &[dctx, qkv, ctx, saved, bias.unwrap_or(no_stat)],
        );
        // The kernel adds the bias gradient to what `dbias` holds: start from zero.
        if let Some(db) = dbias {
            self.fill_zero(m, db)?;
        }
        let mut dbias = dbias.map(|d| m.f(d));
        let bias = bias.map(|b| m.f(b));
        self.dev.attention_backward::<T>(
            &mut m.t(dqkv),
            dbias.as_mut().map(|d| d as &mut dyn DevicePtrMut<f32>),
            &m.t(dctx),
            &m.t(qkv),
            &m.t(ctx),
            &m.f(saved),
            bias.as_ref().map(|b| b as &dyn DevicePtr<f32>),
            shape,
            &mut m.f(scratch),
        )
    }

    fn residual(
        &self,
        m: &mut CudaMemory<'_, T>,
        out: View,
        branch: Branch,
        dim: usize,
        norm: Option<Norm>,
    ) -> Result<()> {
        let Branch { x, y, bias, lambda, factors } = branch;
        let no_param = View::empty(Space::Param);
        let factor_view = factors.map_or(View::empty(Space::Stat), |f| f.factors);
        // In place (out == x) each element is read and written by one thread: x is not a read
        // the write may overlap.
        let x_read = if out == x { View::empty(Space::Act) } else { x };
        let (norm_out, norm_saved) =
            norm.map_or((View::empty(Space::Act), View::empty(Space::Stat)), |n| (n.out, n.saved));
        check_views(
            "residual",
            &[out, norm_out, norm_saved],
            &[x_read, y, bias, lambda.unwrap_or(no_param), factor_view],
        );
        let (xv, yv, bv) = (m.t(x), m.t(y), m.t(bias));
        let lv = lambda.map(|l| m.t(l));
        let fv = factors.map(|f| (m.f(f.factors), f.rows_each));
        let input = ResidualInput {
            x: &xv,
            y: &yv,
            bias: Some(&bv),
            scale: lv.as_ref().map(|l| l as &dyn DevicePtr<T>),
            row_factors: fv.as_ref().map(|(f, each)| (f as &dyn DevicePtr<f32>, *each)),
        };
        match norm {
            None => self.dev.residual_forward::<T>(&mut m.t(out), input, dim),
            Some(norm) => {
                let rows = rows_of(x.len, dim);
                let mut stats = Self::stats(m, norm.saved, rows);
                let stats = stats.as_mut().map(|(mean, rstd)| LayerNormStats { mean, rstd });
                self.dev.residual_layernorm_forward::<T>(
                    &mut m.t(out),
                    &mut m.t(norm.out),
                    stats,
                    input,
                    &m.t(norm.gamma),
                    &m.t(norm.beta),
                    dim,
                    norm.eps,
                )
            }
        }
    }

    fn residual_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dy: View,
        dacc: View,
        branch: Branch,
        grads: BranchGrads,
        dim: usize,
    ) -> Result<(View, bool)> {
        let Branch { x, y, bias, lambda, factors } = branch;
        if lambda.is_none() && factors.is_none() {
            return Ok((dacc, false));
        }
        let factor_view = factors.map_or(View::empty(Space::Stat), |f| f.factors);
        let no_param = View::empty(Space::Param);
        check_views(
            "residual_backward",
            &[dy, grads.dlambda.unwrap_or(View::empty(Space::Grad))],
            &[dacc, y, bias, lambda.unwrap_or(no_param), factor_view],
        );
        let rows = rows_of(dacc.len, dim);
        let mut prod = lambda.map(|_| m.scratch(m.products, rows * dim, "residual products"));
        let (xv, yv, bv) = (m.t(x), m.t(y), m.t(bias));
        let lv = lambda.map(|l| m.t(l));
        let fv = factors.map(|f| (m.f(f.factors), f.rows_each));
        let input = ResidualInput {
            x: &xv,
            y: &yv,
            bias: Some(&bv),
            scale: lv.as_ref().map(|l| l as &dyn DevicePtr<T>),
            row_factors: fv.as_ref().map(|(f, each)| (f as &dyn DevicePtr<f32>, *each)),
        };
        self.dev.residual_backward::<T>(
            &mut m.t(dy),
            prod.as_mut().map(|p| p as &mut dyn DevicePtrMut<f32>),
            &m.t(dacc),
            input,
            dim,
        )?;
        match (prod, grads.dlambda) {
            (Some(prod), Some(dl)) => {
                let mut scratch = m.scratch(m.column_sums, column_sums_scratch_len(rows, dim), "column sums");
                self.dev.column_sums::<f32>(&mut m.f(dl), &prod, &mut scratch)?;
            }
            (None, None) => {}
            _ => unreachable!("a layer scale and its gradient come together"),
        }
        // dL/dbias = Σ_rows dy: the caller's linear_backward sums it.
        Ok((dy, false))
    }

    fn fill_zero(&self, m: &mut CudaMemory<'_, T>, v: View) -> Result<()> {
        check_views("fill_zero", &[v], &[]);
        let zeroed = |e| driver_error("memset", e);
        match v.space {
            Space::Act => self.dev.stream().memset_zeros(&mut m.t(v)).map_err(zeroed),
            Space::Stat | Space::Grad => self.dev.stream().memset_zeros(&mut m.f(v)).map_err(zeroed),
            Space::Param => unreachable!("refused by check_views"),
        }
    }
}
