//! `Backend`: the ops a BEiT pass is written in, once, for every device. A pass plans its
//! memory as [`View`]s (see [`super::memory`]), then calls these ops on the backend's resolution
//! of that memory; it never sees a slice or a device pointer. The CPU backend (`cpu::Cpu`) is
//! the numerical reference: every other implementation is tested against it op by op.
//!
//! What an op keeps for its backward is the backend's choice (the CPU keeps attention
//! probabilities and GELU's derivative; a flash-style GPU keeps log-sum-exps and GELU's input),
//! so a pass asks the backend how large those buffers are (`*_saved_len`) and hands the same
//! views to the forward and the backward.

use super::memory::View;
use super::shapes::AttentionShape;
use crate::error::Result;

/// What a backward does with the input gradient buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DxMode {
    /// `dx = ∂L/∂x`.
    Overwrite,
    /// `dx += ∂L/∂x`: where a pre-LN block's residual stream meets the gradient through the
    /// norm, without another pass.
    Accumulate,
}

/// A factor per group of rows (a `Stat` view): row `r` takes `factors[r / rows_each]`
/// (stochastic depth: one factor per image, 0 to drop its branch, 1/keep to keep it).
#[derive(Debug, Clone, Copy)]
pub struct RowScale {
    pub factors: View,
    pub rows_each: usize,
}

/// A layer norm over rows of `dim`: its output, what it keeps for the backward
/// ([`Backend::layer_norm_saved_len`], may be empty), and its affine parameters.
#[derive(Debug, Clone, Copy)]
pub struct Norm {
    pub out: View,
    pub saved: View,
    pub gamma: View,
    pub beta: View,
    pub eps: f32,
}

/// A residual branch `x + k·λ ⊙ (y + bias)`: `y` the branch's output before its bias, λ the
/// layer scale, `k` the drop path factor of the row's image (1 where absent).
#[derive(Debug, Clone, Copy)]
pub struct Branch {
    pub x: View,
    pub y: View,
    pub bias: View,
    pub lambda: Option<View>,
    pub factors: Option<RowScale>,
}

/// Where a branch's parameter gradients go (added to).
#[derive(Debug, Clone, Copy)]
pub struct BranchGrads {
    pub dlambda: Option<View>,
    pub dbias: View,
}

/// The ops of the BEiT passes. Every op is deterministic (fixed reduction orders, no atomics):
/// the same inputs give the same bits for any thread count, which exact resume relies on.
/// Gradients of parameters (`dw`, `db`, `dgamma`, ...) are always ADDED to; activation
/// gradients are written unless a [`DxMode`] says otherwise.
pub trait Backend {
    /// The backend's resolution of a pass's views (activation and statistics buffers,
    /// parameters, gradients).
    type Memory<'a>;

    /// Whether `Act` and `Stat` views share one buffer (see [`super::memory::Planner`]).
    fn shared_planner(&self) -> bool;
    /// `Stat` elements a layer norm over `rows` rows keeps for its backward.
    fn layer_norm_saved_len(&self, rows: usize) -> usize;
    /// `Stat` elements an attention forward keeps for its backward.
    fn attention_saved_len(&self, shape: AttentionShape) -> usize;
    /// `Stat` scratch of an attention forward that keeps nothing (inference).
    fn attention_scratch_len(&self, shape: AttentionShape) -> usize;
    /// `Stat` scratch of an attention backward (with the bias gradient or without).
    fn attention_backward_scratch_len(&self, shape: AttentionShape, with_dbias: bool) -> usize;

    /// `norm.out = LN(x)` over rows of `dim`, keeping `norm.saved`.
    fn layer_norm(&self, m: &mut Self::Memory<'_>, x: View, dim: usize, norm: Norm) -> Result<()>;

    /// Gradients of [`Backend::layer_norm`]: `dx` (per `mode`), `dgamma`, `dbeta` (added).
    #[allow(clippy::too_many_arguments)]
    fn layer_norm_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: View,
        dgamma: View,
        dbeta: View,
        dy: View,
        x: View,
        norm: Norm,
        dim: usize,
        mode: DxMode,
    ) -> Result<()>;

    /// A PyTorch Linear: `y[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias)`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        m: &mut Self::Memory<'_>,
        y: View,
        x: View,
        w: View,
        bias: Option<View>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    /// Gradients of [`Backend::linear`] for `dy`: `dx` written (when wanted), `dw` and `db`
    /// added.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dx: Option<View>,
        dw: View,
        db: Option<View>,
        dy: View,
        x: View,
        w: View,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    /// `out = GELU(x·wᵀ + bias)` (exact erf GELU), keeping in `pre` what
    /// [`Backend::gelu_backward`] needs. `pre == out` is inference: nothing is kept.
    #[allow(clippy::too_many_arguments)]
    fn linear_gelu(
        &self,
        m: &mut Self::Memory<'_>,
        pre: View,
        out: View,
        x: View,
        w: View,
        bias: View,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()>;

    /// `dpre = dL/d(x·wᵀ + bias)` from `dout` and the kept `pre`. Returns whether it also added
    /// the bias gradient to `dbias` (else the caller's [`Backend::linear_backward`] sums it).
    fn gelu_backward(&self, m: &mut Self::Memory<'_>, dpre: View, dbias: View, dout: View, pre: View) -> Result<bool>;

    /// Multi-head attention over `qkv` (`[batch·tokens, 3·hidden]`, rows `[q | k | v]`) with an
    /// optional `[heads, tokens, tokens]` bias (`Stat`) into `ctx`. Keeps `saved`
    /// ([`Backend::attention_saved_len`]) for the backward; with `saved` empty it keeps nothing
    /// and works in `scratch` ([`Backend::attention_scratch_len`]).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        m: &mut Self::Memory<'_>,
        ctx: View,
        saved: View,
        scratch: View,
        qkv: View,
        bias: Option<View>,
        shape: AttentionShape,
    ) -> Result<()>;

    /// Gradients of [`Backend::attention`]: `dqkv` written, `dbias` (when given) written too
    /// (the caller gathers it into its tables).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dqkv: View,
        dbias: Option<View>,
        dctx: View,
        qkv: View,
        ctx: View,
        saved: View,
        bias: Option<View>,
        shape: AttentionShape,
        scratch: View,
    ) -> Result<()>;

    /// `out = branch.x + k·λ ⊙ (branch.y + bias)` (in place when `out == branch.x`), then, when
    /// given, `norm` of `out` (one pass over the rows where the backend can fuse them).
    fn residual(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        branch: Branch,
        dim: usize,
        norm: Option<Norm>,
    ) -> Result<()>;

    /// Backward of [`Backend::residual`]'s branch for the output gradient `dacc`: returns the
    /// view holding dL/dy (`dy`, or `dacc` itself where k = λ = 1) and whether it added the
    /// bias gradient (else the caller's [`Backend::linear_backward`] sums it); adds dλ.
    fn residual_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dy: View,
        dacc: View,
        branch: Branch,
        grads: BranchGrads,
        dim: usize,
    ) -> Result<(View, bool)>;

    /// `v = 0`.
    fn fill_zero(&self, m: &mut Self::Memory<'_>, v: View) -> Result<()>;
}
