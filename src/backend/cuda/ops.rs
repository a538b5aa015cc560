//! The CUDA backend as a [`Backend`]: the ops of a BEiT pass on the device's one stream, over
//! memory planned as views. [`CudaMemory`] resolves a view to a device address: `Act` into the
//! activation arena (the storage type `T`: f32, or bf16 in a bf16 run), `Stat` into the f32
//! arena, `Param` into the parameters' working copy (`T`, laid out like the flat `ParamStore`),
//! `Grad` into the f32 gradient buffer (same layout).
//!
//! `Index` views are `i32` on the device ([`Backend::upload_indices`] refuses a value past
//! `i32::MAX`). The loss ops add their per-row losses (a scratch of the arena) in f64 to one
//! device value that [`Backend::take_loss`] reads and clears (the pass's one synchronisation).
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

use super::attention::attention_backward_scratch_len;
use super::device::{driver_error, CudaDevice};
use super::layernorm::{layernorm_backward_scratch_len, LayerNormStats, ResidualInput};
use super::matmul::{Epilogue, GemmType};
use super::sums::column_sums_scratch_len;
use super::tokens::TokenShape;
use crate::backend::memory::{Planner, Space, View};
use crate::backend::ops::{Backend, Branch, BranchGrads, DxMode, Norm, TokenParams};
use crate::backend::shapes::{AttentionShape, GemmShape, PatchEmbedShape};
use crate::error::{Error, Result};

pub use crate::precision::Precision;

/// The storage types of activations and working parameters: f32 and bf16.
pub trait Act: GemmType + ValidAsZeroBits + Copy + Send + Sync + Unpin + 'static {
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Act for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Act for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
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

impl<T> DeviceView<T> {
    /// The view of `len` elements at device address `ptr` (inside a live allocation the caller
    /// borrows for as long as the view is used).
    pub(crate) fn raw(ptr: u64, len: usize, stream: Arc<CudaStream>) -> Self {
        DeviceView { ptr, len, stream, _t: PhantomData }
    }
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
    losses: usize,
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

    /// Room for the per-row losses of [`Backend::cross_entropy`] or
    /// [`Backend::mean_squared_error`] over `rows` rows.
    pub fn loss(mut self, rows: usize) -> Self {
        self.losses = self.losses.max(rows);
        self
    }
}

/// The device memory of one planned pass: the activation arena (`Act`, in `T`), the statistics
/// arena (`Stat`, f32), the indices (`Index`, i32), the backend's [`Scratch`] and the loss sum.
pub struct DeviceArena<T: Act> {
    act: CudaSlice<T>,
    stat: CudaSlice<f32>,
    index: CudaSlice<i32>,
    column_sums: CudaSlice<f32>,
    layer_norm: CudaSlice<f32>,
    products: CudaSlice<f32>,
    losses: CudaSlice<f32>,
    loss: CudaSlice<f64>,
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
            index: dev.zeros::<i32>(plan.index_total().max(1))?,
            column_sums: f32s(scratch.column_sums)?,
            layer_norm: f32s(scratch.layer_norm)?,
            products: f32s(scratch.products)?,
            losses: f32s(scratch.losses)?,
            loss: dev.zeros::<f64>(1)?,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.act.num_bytes()
            + self.stat.num_bytes()
            + self.index.num_bytes()
            + self.column_sums.num_bytes()
            + self.layer_norm.num_bytes()
            + self.products.num_bytes()
            + self.losses.num_bytes()
            + self.loss.num_bytes()
    }
}

/// The device's resolution of a pass's views (see the module documentation): borrows the
/// arena, the parameters and the gradients for the pass's duration.
pub struct CudaMemory<'a, T: Act> {
    act: Span,
    stat: Span,
    index: Span,
    params: Span,
    grads: Span,
    column_sums: Span,
    layer_norm: Span,
    products: Span,
    losses: Span,
    loss: Span,
    stream: Arc<CudaStream>,
    _borrows: PhantomData<(&'a mut DeviceArena<T>, &'a DeviceParams<T>, &'a mut CudaSlice<f32>)>,
}

impl<'a, T: Act> CudaMemory<'a, T> {
    /// `grads` is laid out like the parameters (f32); a pass without gradients (inference)
    /// has none, and any `Grad` view is then refused.
    pub fn new(
        dev: &CudaDevice,
        arena: &'a mut DeviceArena<T>,
        params: &'a DeviceParams<T>,
        grads: Option<&'a mut CudaSlice<f32>>,
    ) -> Result<Self> {
        let s = dev.stream();
        let grads = match grads {
            Some(g) => {
                ensure!(
                    g.len() == params.len(),
                    InvalidArgument,
                    "device memory: the gradients hold {} values, the parameters {}",
                    g.len(),
                    params.len()
                );
                Span::of(g, s)
            }
            None => Span { ptr: 0, len: 0 },
        };
        Ok(CudaMemory {
            act: Span::of(&arena.act, s),
            stat: Span::of(&arena.stat, s),
            index: Span::of(&arena.index, s),
            params: params.working(s),
            grads,
            column_sums: Span::of(&arena.column_sums, s),
            layer_norm: Span::of(&arena.layer_norm, s),
            products: Span::of(&arena.products, s),
            losses: Span::of(&arena.losses, s),
            loss: Span::of(&arena.loss, s),
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

    /// A view of indices.
    pub(crate) fn i(&self, v: View) -> DeviceView<i32> {
        match v.space {
            Space::Index => self.in_span(self.index, v),
            other => panic!("device memory: a {other:?} view where indices belong"),
        }
    }

    fn scratch(&self, span: Span, len: usize, what: &str) -> DeviceView<f32> {
        assert!(len <= span.len, "device memory: the {what} scratch holds {}, an op needs {len}", span.len);
        self.at(span, 0, len)
    }

    /// The loss sum the loss ops add to.
    pub(crate) fn loss(&self) -> DeviceView<f64> {
        self.at(self.loss, 0, 1)
    }
}

/// Which element type a space holds on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    /// `T`: activations and parameters.
    T,
    /// f32: statistics and gradients.
    F32,
    Index,
}

fn elem(space: Space) -> Elem {
    match space {
        Space::Act | Space::Param => Elem::T,
        Space::Stat | Space::Grad => Elem::F32,
        Space::Index => Elem::Index,
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
    assert!(dim > 0 && len.is_multiple_of(dim), "{len} elements is not a whole number of rows of {dim}");
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
            Space::Index => self.dev.stream().memset_zeros(&mut m.i(v)).map_err(zeroed),
            Space::Param => unreachable!("refused by check_views"),
        }
    }

    fn upload(&self, m: &mut CudaMemory<'_, T>, dst: View, src: &[f32]) -> Result<()> {
        check_views("upload", &[dst], &[]);
        ensure!(dst.len == src.len(), InvalidArgument, "upload: {} values into a view of {}", src.len(), dst.len);
        let copied = |e| driver_error("host-to-device copy", e);
        match elem(dst.space) {
            Elem::F32 => self.dev.stream().memcpy_htod(src, &mut m.f(dst)).map_err(copied),
            Elem::T => {
                let host: Vec<T> = src.iter().map(|&v| T::from_f32(v)).collect();
                self.dev.stream().memcpy_htod(&host, &mut m.t(dst)).map_err(copied)
            }
            Elem::Index => bail!(InvalidArgument, "upload: floats into an index view (upload_indices)"),
        }
    }

    fn upload_indices(&self, m: &mut CudaMemory<'_, T>, dst: View, src: &[usize]) -> Result<()> {
        ensure!(
            dst.len == src.len(),
            InvalidArgument,
            "upload_indices: {} values into a view of {}",
            src.len(),
            dst.len
        );
        let host = src
            .iter()
            .map(|&v| {
                i32::try_from(v).map_err(|_| Error::InvalidArgument(format!("index {v} does not fit a device int")))
            })
            .collect::<Result<Vec<i32>>>()?;
        let copied = |e| driver_error("host-to-device copy", e);
        self.dev.stream().memcpy_htod(&host, &mut m.i(dst)).map_err(copied)
    }

    fn download(&self, m: &mut CudaMemory<'_, T>, src: View, dst: &mut [f32]) -> Result<()> {
        ensure!(dst.len() == src.len, InvalidArgument, "download: a view of {} into {} values", src.len, dst.len());
        let copied = |e| driver_error("device-to-host copy", e);
        match elem(src.space) {
            Elem::F32 => self.dev.stream().memcpy_dtoh(&m.f(src), dst).map_err(copied),
            Elem::T => {
                let mut host = vec![T::from_f32(0.0); src.len];
                self.dev.stream().memcpy_dtoh(&m.t(src), &mut host).map_err(copied)?;
                for (d, v) in dst.iter_mut().zip(host) {
                    *d = v.to_f32();
                }
                Ok(())
            }
            Elem::Index => bail!(InvalidArgument, "download: an index view as floats"),
        }
    }

    fn copy(&self, m: &mut CudaMemory<'_, T>, dst: View, src: View) -> Result<()> {
        check_views("copy", &[dst], &[src]);
        ensure!(
            dst.len == src.len && elem(dst.space) == elem(src.space),
            InvalidArgument,
            "copy: {src:?} into {dst:?}"
        );
        let copied = |e| driver_error("device copy", e);
        let stream = self.dev.stream();
        match elem(dst.space) {
            Elem::T => stream.memcpy_dtod(&m.t(src), &mut m.t(dst)).map_err(copied),
            Elem::F32 => stream.memcpy_dtod(&m.f(src), &mut m.f(dst)).map_err(copied),
            Elem::Index => stream.memcpy_dtod(&m.i(src), &mut m.i(dst)).map_err(copied),
        }
    }

    fn add_into(&self, m: &mut CudaMemory<'_, T>, dst: View, src: View) -> Result<()> {
        // In place: each element is read and written by one thread.
        check_views("add_into", &[dst], &[src]);
        ensure!(
            dst.len == src.len && elem(dst.space) == elem(src.space) && elem(dst.space) != Elem::Index,
            InvalidArgument,
            "add_into: {src:?} into {dst:?}"
        );
        match elem(dst.space) {
            Elem::T => self.dev.residual_add::<T>(&mut m.t(dst), &m.t(src)),
            _ => self.dev.residual_add::<f32>(&mut m.f(dst), &m.f(src)),
        }
    }

    fn relpos_bias(
        &self,
        m: &mut CudaMemory<'_, T>,
        out: View,
        shared: Option<View>,
        table: View,
        index: View,
        heads: usize,
    ) -> Result<()> {
        check_views("relpos_bias", &[out], &[shared.unwrap_or(View::empty(Space::Stat)), table, index]);
        if let Some(s) = shared {
            self.copy(m, out, s)?;
        }
        let (mut bias, index) = (m.f(out), m.i(index));
        // The table is a parameter (`T`) or a table resized for another grid (`Stat`, f32).
        match elem(table.space) {
            Elem::T => self.dev.relpos_bias_gather::<T>(&mut bias, &m.t(table), &index, heads, shared.is_some()),
            _ => self.dev.relpos_bias_gather::<f32>(&mut bias, &m.f(table), &index, heads, shared.is_some()),
        }
    }

    fn relpos_bias_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dtable: View,
        dbias: View,
        index: View,
        heads: usize,
    ) -> Result<()> {
        check_views("relpos_bias_backward", &[dtable], &[dbias, index]);
        self.dev.relpos_table_grad(&mut m.f(dtable), &m.f(dbias), &m.i(index), heads)
    }

    fn im2col(&self, m: &mut CudaMemory<'_, T>, patches: View, pixels: View, shape: PatchEmbedShape) -> Result<()> {
        check_views("im2col", &[patches], &[pixels]);
        self.dev.patchify_into::<T>(shape, &m.f(pixels), &mut m.t(patches))
    }

    fn assemble_tokens(
        &self,
        m: &mut CudaMemory<'_, T>,
        x: View,
        embedded: View,
        tokens: TokenParams,
        mask: Option<View>,
        batch: usize,
        patches: usize,
        dim: usize,
    ) -> Result<()> {
        let (no_param, no_index) = (View::empty(Space::Param), View::empty(Space::Index));
        let (mask_token, positions) = (tokens.mask_token, tokens.positions);
        check_views(
            "assemble_tokens",
            &[x],
            &[
                embedded,
                tokens.cls,
                mask_token.unwrap_or(no_param),
                positions.unwrap_or(no_param),
                mask.unwrap_or(no_index),
            ],
        );
        ensure!(
            positions.is_none_or(|p| elem(p.space) == Elem::T),
            Unsupported,
            "assemble_tokens: position embeddings resized for another grid (f32) on the GPU"
        );
        let (mt, pos, mk) = (mask_token.map(|v| m.t(v)), positions.map(|v| m.t(v)), mask.map(|v| m.i(v)));
        self.dev.assemble_tokens::<T>(
            &mut m.t(x),
            &m.t(embedded),
            &m.t(tokens.cls),
            mt.as_ref().map(|v| v as &dyn DevicePtr<T>),
            pos.as_ref().map(|v| v as &dyn DevicePtr<T>),
            mk.as_ref().map(|v| v as &dyn DevicePtr<i32>),
            TokenShape { batch, patches, dim },
        )
    }

    fn assemble_tokens_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dembedded: View,
        grads: TokenParams,
        dx: View,
        mask: Option<View>,
        batch: usize,
        patches: usize,
        dim: usize,
    ) -> Result<()> {
        let (no_grad, no_index) = (View::empty(Space::Grad), View::empty(Space::Index));
        let (dmask_token, dpositions) = (grads.mask_token, grads.positions);
        check_views(
            "assemble_tokens_backward",
            &[dembedded, grads.cls, dmask_token.unwrap_or(no_grad), dpositions.unwrap_or(no_grad)],
            &[dx, mask.unwrap_or(no_index)],
        );
        let (mut dmt, mut dpos, mk) = (dmask_token.map(|v| m.f(v)), dpositions.map(|v| m.f(v)), mask.map(|v| m.i(v)));
        self.dev.assemble_tokens_backward::<T>(
            &mut m.t(dembedded),
            &mut m.f(grads.cls),
            dmt.as_mut().map(|v| v as &mut dyn DevicePtrMut<f32>),
            dpos.as_mut().map(|v| v as &mut dyn DevicePtrMut<f32>),
            &m.t(dx),
            mk.as_ref().map(|v| v as &dyn DevicePtr<i32>),
            TokenShape { batch, patches, dim },
        )
    }

    fn gather_rows(&self, m: &mut CudaMemory<'_, T>, dst: View, src: View, rows: View, dim: usize) -> Result<()> {
        check_views("gather_rows", &[dst], &[src, rows]);
        self.dev.gather_rows::<T>(&mut m.t(dst), &m.t(src), &m.i(rows), dim)
    }

    fn scatter_rows(&self, m: &mut CudaMemory<'_, T>, dst: View, src: View, rows: View, dim: usize) -> Result<()> {
        check_views("scatter_rows", &[dst], &[src, rows]);
        self.fill_zero(m, dst)?;
        self.dev.scatter_rows::<T>(&mut m.t(dst), &m.t(src), &m.i(rows), dim)
    }

    fn mean_patch_tokens(
        &self,
        m: &mut CudaMemory<'_, T>,
        out: View,
        hidden: View,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        check_views("mean_patch_tokens", &[out], &[hidden]);
        self.dev.mean_patch_tokens::<T>(&mut m.t(out), &m.t(hidden), tokens, dim)
    }

    fn mean_patch_tokens_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dhidden: View,
        dout: View,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        check_views("mean_patch_tokens_backward", &[dhidden], &[dout]);
        self.dev.mean_patch_tokens_backward::<T>(&mut m.t(dhidden), &m.t(dout), tokens, dim)
    }

    fn cross_entropy(
        &self,
        m: &mut CudaMemory<'_, T>,
        logits: View,
        labels: View,
        classes: usize,
        smoothing: Option<f32>,
        total_rows: usize,
    ) -> Result<()> {
        check_views("cross_entropy", &[logits], &[labels]);
        ensure!(total_rows >= labels.len, InvalidArgument, "cross_entropy: total_rows below the part's rows");
        let mut losses = m.scratch(m.losses, labels.len, "losses");
        let inv_rows = 1.0 / total_rows as f32;
        let eps = smoothing.unwrap_or(0.0);
        self.dev.cross_entropy_fused::<T>(
            &mut m.t(logits),
            &m.i(labels),
            classes,
            inv_rows,
            eps,
            &mut losses,
            &mut m.loss(),
        )
    }

    fn mean_squared_error(
        &self,
        m: &mut CudaMemory<'_, T>,
        pred: View,
        target: View,
        cols: usize,
        total_rows: usize,
    ) -> Result<()> {
        check_views("mean_squared_error", &[pred], &[target]);
        let mut losses = m.scratch(m.losses, rows_of(pred.len, cols), "losses");
        self.dev.mse_fused::<T>(&mut m.t(pred), &m.t(target), cols, total_rows, &mut losses, &mut m.loss())
    }

    fn take_loss(&self, m: &mut CudaMemory<'_, T>) -> Result<f64> {
        let mut host = [0.0f64];
        let stream = self.dev.stream();
        stream.memcpy_dtoh(&m.loss(), &mut host).map_err(|e| driver_error("device-to-host copy", e))?;
        stream.memset_zeros(&mut m.loss()).map_err(|e| driver_error("memset", e))?;
        Ok(host[0])
    }
}
