//! One pre-LN transformer block, forward and backward, written once over [`Backend`]: the
//! inference pass, the CPU training pass and (through the same ops) every other backend run
//! these two functions. llm.c style: no autograd, every gradient written out; each op's backward
//! is checked by finite differences in the backend, the whole pass against PyTorch's gradients
//! (`tests/mim_gradients.rs`, `tests/classify_gradients.rs`).
//!
//! `x → mid = x + k₁·λ₁ ⊙ (Attn(LN₁(x))·W_oᵀ + b_o) → out = mid + k₂·λ₂ ⊙ (FC₂(GELU(FC₁(LN₂(mid)))) + b₂)`
//! with λ the layer scale (1 without) and k the drop path factor of the row's image (1 without).

use crate::backend::memory::{Space, View};
use crate::backend::ops::{Backend, Branch, BranchGrads, DxMode, Norm, RowScale};
use crate::backend::shapes::AttentionShape;
use crate::error::Result;

use super::params::{BlockParams, ParamStore};

/// Where one block's activations live. A training plan gives every block its own (the backward
/// reads them); an inference plan gives all blocks one set in which `mid` is `x` (residuals in
/// place), `ln2` is `ln1`, `mlp_y` is `attn_y`, `fc1` is `gelu` (GELU in place) and nothing is
/// saved (`*_saved` empty).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerSlots {
    /// The block input.
    pub x: View,
    pub ln1: View,
    pub ln1_saved: View,
    pub qkv: View,
    /// What the attention backward needs beyond its inputs (the backend's choice).
    pub attn_saved: View,
    pub ctx: View,
    /// The attention branch's output before its bias (kept per block only with layer scale:
    /// λ₁'s gradient reads it; otherwise a shared scratch).
    pub attn_y: View,
    /// After the attention residual.
    pub mid: View,
    pub ln2: View,
    pub ln2_saved: View,
    /// What GELU's backward needs (the backend's choice: the CPU keeps GELU').
    pub fc1: View,
    pub gelu: View,
    /// The MLP branch's output before its bias (as `attn_y`).
    pub mlp_y: View,
}

/// Scratch the block passes share across blocks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockScratch {
    /// This block's relative position bias `[heads, T, T]` (`Stat`), filled by the caller
    /// before each block's forward and backward; empty without relative position bias.
    pub bias: View,
    /// The attention forward's scratch when it keeps nothing (inference).
    pub attn: View,
    /// Backward only (empty in an inference plan): the residual stream's gradient (dL/d(block
    /// output) on entry, dL/d(block input) on return), branch and norm gradients, and two wide
    /// buffers (`[rows, max(3·hidden, intermediate)]` and `[rows, intermediate]`).
    pub dx: View,
    pub dbranch: View,
    pub dnormed: View,
    pub dctx: View,
    pub wide_a: View,
    pub wide_b: View,
    /// dL/d(bias), left for the caller to gather into its tables.
    pub dbias: View,
    pub attn_backward: View,
}

/// Shapes and constants of one pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockDims {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub inter: usize,
    pub heads: usize,
    pub eps: f32,
}

impl BlockDims {
    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    pub fn attention(&self) -> AttentionShape {
        AttentionShape { batch: self.b, tokens: self.t, heads: self.heads, head_dim: self.d / self.heads }
    }
}

/// The block's two layer norms as ops see them.
fn norms(p: &ParamStore, blk: &BlockParams, s: &LayerSlots, eps: f32) -> (Norm, Norm) {
    let before =
        Norm { out: s.ln1, saved: s.ln1_saved, gamma: p.view(blk.ln_before_w), beta: p.view(blk.ln_before_b), eps };
    let after =
        Norm { out: s.ln2, saved: s.ln2_saved, gamma: p.view(blk.ln_after_w), beta: p.view(blk.ln_after_b), eps };
    (before, after)
}

/// The two residual branches; `y` only where the backward reads it (with layer scale), so a
/// shared `y` scratch may be reused by the backward.
fn branches(
    p: &ParamStore,
    blk: &BlockParams,
    s: &LayerSlots,
    drop: Option<[RowScale; 2]>,
    for_backward: bool,
) -> (Branch, Branch) {
    let kept = |y: View, lambda: Option<View>| match (for_backward, lambda) {
        (true, None) => View::empty(y.space),
        _ => y,
    };
    let (l1, l2) = (blk.lambda_1.map(|id| p.view(id)), blk.lambda_2.map(|id| p.view(id)));
    let attention =
        Branch { x: s.x, y: kept(s.attn_y, l1), bias: p.view(blk.out_b), lambda: l1, factors: drop.map(|f| f[0]) };
    let mlp =
        Branch { x: s.mid, y: kept(s.mlp_y, l2), bias: p.view(blk.fc2_b), lambda: l2, factors: drop.map(|f| f[1]) };
    (attention, mlp)
}

/// One block forward from `s.x` into `out` (which is `s.x` itself in an inference plan),
/// keeping what the backward needs in `s`. `has_bias`: `scratch.bias` holds this block's
/// relative position bias. `drop`: the drop path factors of the two branches.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_forward<B: Backend>(
    be: &B,
    m: &mut B::Memory<'_>,
    p: &ParamStore,
    blk: &BlockParams,
    s: &LayerSlots,
    out: View,
    scratch: &BlockScratch,
    has_bias: bool,
    dims: BlockDims,
    drop: Option<[RowScale; 2]>,
) -> Result<()> {
    let (rows, d, inter) = (dims.rows(), dims.d, dims.inter);
    let (ln1, ln2) = norms(p, blk, s, dims.eps);
    let (attention, mlp) = branches(p, blk, s, drop, false);

    be.layer_norm(m, s.x, d, ln1)?;
    // q, k and v weights (and biases, with k's fixed at zero) are adjacent: one GEMM.
    let (qkv_w, qkv_b) = (p.span_view(blk.query_w, blk.value_w), p.span_view(blk.query_b, blk.value_b));
    be.linear(m, s.qkv, s.ln1, qkv_w, Some(qkv_b), rows, d, 3 * d)?;
    be.attention(m, s.ctx, s.attn_saved, scratch.attn, s.qkv, has_bias.then_some(scratch.bias), dims.attention())?;
    // Output projection; its bias, layer scale, drop path, the residual add and the second
    // norm are one op.
    be.linear(m, s.attn_y, s.ctx, p.view(blk.out_w), None, rows, d, d)?;
    be.residual(m, s.mid, attention, d, Some(ln2))?;

    be.linear_gelu(m, s.fc1, s.gelu, s.ln2, p.view(blk.fc1_w), p.view(blk.fc1_b), rows, d, inter)?;
    be.linear(m, s.mlp_y, s.gelu, p.view(blk.fc2_w), None, rows, inter, d)?;
    be.residual(m, out, mlp, d, None)
}

/// One block backward: `scratch.dx` holds dL/d(block output) on entry and dL/d(block input) on
/// return; parameter gradients are added to the `Grad` space. With `has_bias` (`scratch.bias`
/// refilled by the caller), dL/d(bias) is left in `scratch.dbias` for the caller's tables.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_backward<B: Backend>(
    be: &B,
    m: &mut B::Memory<'_>,
    p: &ParamStore,
    blk: &BlockParams,
    s: &LayerSlots,
    scratch: &BlockScratch,
    has_bias: bool,
    dims: BlockDims,
    drop: Option<[RowScale; 2]>,
) -> Result<()> {
    let (rows, d, inter) = (dims.rows(), dims.d, dims.inter);
    let sc = scratch;
    let g = |id| p.grad_view(id);
    let (ln1, ln2) = norms(p, blk, s, dims.eps);
    let (attention, mlp) = branches(p, blk, s, drop, true);

    // MLP branch. Bias gradients are summed inside the element-wise pass that produces each
    // Linear's output gradient where the backend can (one read saved each).
    let grads = BranchGrads { dlambda: blk.lambda_2.map(g), dbias: g(blk.fc2_b) };
    let (dy, fused) = be.residual_backward(m, sc.dbranch, sc.dx, mlp, grads, d)?;
    let dgelu = sc.wide_b.prefix(rows * inter);
    let db = (!fused).then(|| g(blk.fc2_b));
    be.linear_backward(m, Some(dgelu), g(blk.fc2_w), db, dy, s.gelu, p.view(blk.fc2_w), rows, inter, d)?;
    let dfc1 = sc.wide_a.prefix(rows * inter);
    let fused = be.gelu_backward(m, dfc1, g(blk.fc1_b), dgelu, s.fc1)?;
    let db = (!fused).then(|| g(blk.fc1_b));
    be.linear_backward(m, Some(sc.dnormed), g(blk.fc1_w), db, dfc1, s.ln2, p.view(blk.fc1_w), rows, d, inter)?;
    let (dg, dbeta) = (g(blk.ln_after_w), g(blk.ln_after_b));
    be.layer_norm_backward(m, sc.dx, dg, dbeta, sc.dnormed, s.mid, ln2, d, DxMode::Accumulate)?;

    // Attention branch.
    let grads = BranchGrads { dlambda: blk.lambda_1.map(g), dbias: g(blk.out_b) };
    let (dy, fused) = be.residual_backward(m, sc.dbranch, sc.dx, attention, grads, d)?;
    let db = (!fused).then(|| g(blk.out_b));
    be.linear_backward(m, Some(sc.dctx), g(blk.out_w), db, dy, s.ctx, p.view(blk.out_w), rows, d, d)?;
    let dqkv = sc.wide_a.prefix(rows * 3 * d);
    let (dbias, bias) = (has_bias.then_some(sc.dbias), has_bias.then_some(sc.bias));
    let shape = dims.attention();
    be.attention_backward(m, dqkv, dbias, sc.dctx, s.qkv, s.ctx, s.attn_saved, bias, shape, sc.attn_backward)?;
    // q/k/v weights and biases are adjacent in the gradient buffer as in the parameters.
    let (w, dw, db) = (
        p.span_view(blk.query_w, blk.value_w),
        p.grad_span_view(blk.query_w, blk.value_w),
        p.grad_span_view(blk.query_b, blk.value_b),
    );
    be.linear_backward(m, Some(sc.dnormed), dw, Some(db), dqkv, s.ln1, w, rows, d, 3 * d)?;
    // The key bias is not a parameter (fixed at zero): drop what it collected.
    be.fill_zero(m, g(blk.key_b))?;
    let (dg, dbeta) = (g(blk.ln_before_w), g(blk.ln_before_b));
    be.layer_norm_backward(m, sc.dx, dg, dbeta, sc.dnormed, s.x, ln1, d, DxMode::Accumulate)
}

/// The drop path factors of block `l`'s two branches in a `Stat` view of `[layers, 2, batch]`.
pub(crate) fn drop_factors(factors: View, l: usize, dims: BlockDims) -> [RowScale; 2] {
    debug_assert_eq!(factors.space, Space::Stat);
    let b = dims.b;
    [0, 1].map(|r| RowScale { factors: factors.sub((l * 2 + r) * b, b), rows_each: dims.t })
}
