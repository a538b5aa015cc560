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
use super::shapes::{AttentionShape, PatchEmbedShape};
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

/// The token parameters of the embeddings (or their gradients): the CLS token, the mask token
/// and the absolute position embeddings `[T, hidden]` (each where the model has it).
#[derive(Debug, Clone, Copy)]
pub struct TokenParams {
    pub cls: View,
    pub mask_token: Option<View>,
    pub positions: Option<View>,
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

    // ---- data movement -------------------------------------------------------------------

    /// `dst = src` from host memory.
    fn upload(&self, m: &mut Self::Memory<'_>, dst: View, src: &[f32]) -> Result<()>;

    /// The `Index` view `dst = src` from host memory (each value must fit the backend's index
    /// type; a refusal is an error).
    fn upload_indices(&self, m: &mut Self::Memory<'_>, dst: View, src: &[usize]) -> Result<()>;

    /// `dst = src` into host memory.
    fn download(&self, m: &mut Self::Memory<'_>, src: View, dst: &mut [f32]) -> Result<()>;

    /// `dst = src`.
    fn copy(&self, m: &mut Self::Memory<'_>, dst: View, src: View) -> Result<()>;

    /// `dst += src`.
    fn add_into(&self, m: &mut Self::Memory<'_>, dst: View, src: View) -> Result<()>;

    // ---- relative position bias ----------------------------------------------------------

    /// `out[h, i] = (shared[h, i] or 0) + table[index[i], h]`: a `[heads, T, T]` bias from a
    /// `[M, heads]` table and the `[T·T]` relative position index (`Index`).
    fn relpos_bias(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        shared: Option<View>,
        table: View,
        index: View,
        heads: usize,
    ) -> Result<()>;

    /// Backward of [`Backend::relpos_bias`]'s gather: `dtable[index[i], h] += dbias[h, i]`, each
    /// head in pair order (deterministic).
    fn relpos_bias_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dtable: View,
        dbias: View,
        index: View,
        heads: usize,
    ) -> Result<()>;

    // ---- embeddings ------------------------------------------------------------------------

    /// The patch rows `[batch·N, C·ph·pw]` of `pixels` (`[batch, C, H, W]`, `Stat`), ordered
    /// (channel, row, column) like the patch convolution's weight.
    fn im2col(&self, m: &mut Self::Memory<'_>, patches: View, pixels: View, shape: PatchEmbedShape) -> Result<()>;

    /// The tokens `x` (`[batch, T, hidden]`): the CLS token, then each patch's projection from
    /// `embedded` (`[batch·N, hidden]`) or the mask token where `mask` (`Index`, `[batch·N]`,
    /// 0 or 1) says masked; plus the position embeddings.
    #[allow(clippy::too_many_arguments)]
    fn assemble_tokens(
        &self,
        m: &mut Self::Memory<'_>,
        x: View,
        embedded: View,
        tokens: TokenParams,
        mask: Option<View>,
        batch: usize,
        patches: usize,
        dim: usize,
    ) -> Result<()>;

    /// Backward of [`Backend::assemble_tokens`] for `dx`: `dembedded` written (zero where
    /// masked), the token gradients added (summed over images in image order).
    #[allow(clippy::too_many_arguments)]
    fn assemble_tokens_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dembedded: View,
        grads: TokenParams,
        dx: View,
        mask: Option<View>,
        batch: usize,
        patches: usize,
        dim: usize,
    ) -> Result<()>;

    // ---- heads -------------------------------------------------------------------------------

    /// `dst[r] = src[rows[r]]` for rows of `dim` (`rows`: `Index`).
    fn gather_rows(&self, m: &mut Self::Memory<'_>, dst: View, src: View, rows: View, dim: usize) -> Result<()>;

    /// `dst = 0`, then `dst[rows[r]] = src[r]` (distinct rows).
    fn scatter_rows(&self, m: &mut Self::Memory<'_>, dst: View, src: View, rows: View, dim: usize) -> Result<()>;

    /// The mean of each image's patch tokens (tokens 1..T of `[batch, T, dim]`) into `out`
    /// (`[batch, dim]`): the mean-pooling pooler.
    fn mean_patch_tokens(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        hidden: View,
        tokens: usize,
        dim: usize,
    ) -> Result<()>;

    /// Backward of [`Backend::mean_patch_tokens`]: `dhidden` written, the CLS rows zero.
    fn mean_patch_tokens_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dhidden: View,
        dout: View,
        tokens: usize,
        dim: usize,
    ) -> Result<()>;

    /// Softmax cross-entropy of `logits` (`[rows, classes]`) against `labels` (`Index`) (with
    /// label smoothing ε when `smoothing` is given: the classification loss), for rows that are part of a mean over `total_rows`: the losses' sum is
    /// added to the memory's loss ([`Backend::take_loss`]) and `logits` is overwritten by
    /// dL/dlogits (scaled by 1/`total_rows`).
    fn cross_entropy(
        &self,
        m: &mut Self::Memory<'_>,
        logits: View,
        labels: View,
        classes: usize,
        smoothing: Option<f32>,
        total_rows: usize,
    ) -> Result<()>;

    /// The mean squared error of `pred` against `target` per row of `cols`, for rows that are
    /// part of a mean over `total_rows`: as [`Backend::cross_entropy`], the sum to the loss and
    /// `pred` overwritten by its gradient.
    fn mean_squared_error(
        &self,
        m: &mut Self::Memory<'_>,
        pred: View,
        target: View,
        cols: usize,
        total_rows: usize,
    ) -> Result<()>;

    /// The loss the loss ops added up since the last call (reads it to the host), then 0.
    fn take_loss(&self, m: &mut Self::Memory<'_>) -> Result<f64>;
}
