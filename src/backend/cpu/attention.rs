//! Multi-head self-attention over a fused QKV buffer, one (image, head) pair per task:
//! `S = scale·Q·Kᵀ + bias`, row softmax, `ctx = P·V`. Q, K and V are read in place with strides,
//! and each head writes its own columns of the context, so nothing is transposed or copied.

use rayon::prelude::*;

use super::attention_kernel::{self, gemm_bcast, Strided};
use super::gemm::{matmul_raw, Mat, Threads};
use super::math::{self, simd_dispatch};
use super::SendPtr;

/// Longest sequence the register-blocked kernels take: their inner sums run over whole rows of
/// P and dS without cache blocking, which the tests cover up to 197 tokens; longer sequences
/// keep the gemm crate's blocked path.
const FUSED_MAX_TOKENS: usize = 1024;

pub use crate::backend::shapes::AttentionShape;

impl AttentionShape {
    /// Whether the per-pair products run on [`attention_kernel`]'s register-blocked kernels
    /// (AVX2+FMA, head dim a multiple of 8, at most [`FUSED_MAX_TOKENS`] tokens) rather than
    /// through the gemm crate.
    pub(crate) fn fused(&self) -> bool {
        self.head_dim > 0 && self.head_dim % 8 == 0 && self.tokens <= FUSED_MAX_TOKENS && attention_kernel::available()
    }
}

/// Per-task scratch of the per-pair functions, sized on first use: `transposed` holds Kᵀ (or
/// Vᵀ in the backward), `wide` a score matrix whose rows are padded to whole vectors, `rows_a`
/// and `rows_b` contiguous copies of `[tokens, head_dim]` operands.
#[derive(Default)]
pub(crate) struct PairScratch {
    pub transposed: Vec<f32>,
    pub wide: Vec<f32>,
    pub rows_a: Vec<f32>,
    pub rows_b: Vec<f32>,
}

/// Copies the strided `[rows, cols]` matrix `src` (unit column stride) into `dst` as contiguous
/// rows and returns it. The kernels read operands row after row many times over; inside the
/// fused QKV buffer those rows lie 3·hidden floats apart (2304 bytes for tiny32), a stride
/// that maps the 65 rows of a head onto a quarter of the L1 sets, so a contiguous copy (a few
/// KB) saves more in conflict misses than it costs.
pub(crate) fn contiguous_rows<'a>(dst: &'a mut Vec<f32>, src: Mat<'_>) -> &'a [f32] {
    debug_assert_eq!(src.col_stride, 1);
    let (rows, cols) = (src.rows, src.cols);
    dst.resize(rows * cols, 0.0);
    for (r, out) in dst.chunks_exact_mut(cols).enumerate() {
        out.copy_from_slice(&src.data[r * src.row_stride..r * src.row_stride + cols]);
    }
    &dst[..rows * cols]
}

/// Tokens rounded up to whole 8-float vectors: the row length of padded score matrices.
pub(crate) fn padded_tokens(t: usize) -> usize {
    t.div_ceil(8) * 8
}

simd_dispatch! {
    /// Row-wise softmax in place over rows of length `n` (max-subtracted for range).
    pub fn softmax_rows(s: &mut [f32], n: usize) {
        for row in s.chunks_exact_mut(n) {
            let max = math::max(row);
            for v in row.iter_mut() {
                *v = math::exp(*v - max);
            }
            let inv = 1.0 / math::sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// Attention forward.
/// - `qkv`: `[batch·tokens, 3·hidden]`, rows `[q | k | v]`, heads contiguous inside each part.
/// - `bias`: optional `[heads, tokens, tokens]` added to the scores (relative position bias).
/// - `ctx`: `[batch·tokens, hidden]` output.
/// - `scratch`: at least one `tokens²` block; tasks run in parallel, one block each, so the
///   parallelism is `scratch.len() / tokens²`.
pub fn attention_forward(
    ctx: &mut [f32],
    qkv: &[f32],
    bias: Option<&[f32]>,
    shape: AttentionShape,
    scratch: &mut [f32],
) {
    let AttentionShape { batch, tokens: t, heads, .. } = shape;
    let hidden = shape.hidden();
    assert_eq!(qkv.len(), batch * t * 3 * hidden, "attention: qkv length");
    assert_eq!(ctx.len(), batch * t * hidden, "attention: context length");
    if let Some(b) = bias {
        assert_eq!(b.len(), heads * t * t, "attention: bias length");
    }
    let block = t * t;
    let slots = scratch.len() / block;
    assert!(slots > 0, "attention: scratch smaller than one score matrix");
    let pairs = batch * heads;
    let per_slot = pairs.div_ceil(slots);
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let fused = shape.fused();

    scratch[..slots * block].par_chunks_mut(block).enumerate().for_each(|(slot, scores)| {
        let mut work = PairScratch::default();
        for pair in slot * per_slot..((slot + 1) * per_slot).min(pairs) {
            // SAFETY: pair (b, h) owns its columns of `ctx`; `scores` is this task's block.
            unsafe { forward_pair(scores, &mut work, ctx_ptr, qkv, bias, shape, pair / heads, pair % heads, fused) };
        }
    });
}

/// Views of one pair's Q, K and V inside the fused `[batch·tokens, 3·hidden]` buffer.
pub(crate) struct HeadViews<'a> {
    pub q: Mat<'a>,
    pub k: Mat<'a>,
    pub v: Mat<'a>,
}

pub(crate) fn head_views(qkv: &[f32], b: usize, h: usize, shape: AttentionShape) -> HeadViews<'_> {
    let (t, d, hidden) = (shape.tokens, shape.head_dim, shape.hidden());
    let base = b * t * 3 * hidden;
    let rs = 3 * hidden;
    let q = &qkv[base + h * d..];
    let k = &qkv[base + hidden + h * d..];
    let v = &qkv[base + 2 * hidden + h * d..];
    HeadViews {
        q: Mat { data: q, rows: t, cols: d, row_stride: rs, col_stride: 1 },
        k: Mat { data: k, rows: t, cols: d, row_stride: rs, col_stride: 1 },
        v: Mat { data: v, rows: t, cols: d, row_stride: rs, col_stride: 1 },
    }
}

/// Copies the `[rows, cols]` strided matrix `src` into `dst` transposed (`[cols, rows]`,
/// row-major).
pub(crate) fn transpose_into(dst: &mut [f32], src: Mat<'_>) {
    assert!(dst.len() >= src.rows * src.cols, "transpose_into: destination too small");
    for r in 0..src.rows {
        let row = &src.data[r * src.row_stride..];
        for c in 0..src.cols {
            dst[c * src.rows + r] = row[c * src.col_stride];
        }
    }
}

/// One (image, head) pair of the forward: `scores` (`tokens²`) ends holding the softmax
/// probabilities, and the pair's context goes into columns h·d..(h+1)·d of image b's rows of
/// `ctx` (`[batch·tokens, hidden]`). `fused` (from [`AttentionShape::fused`], or forced by
/// tests) picks the register-blocked kernels over the gemm crate.
///
/// # Safety
/// `ctx` must point to the `[batch·tokens, hidden]` context buffer, which must not alias `qkv`
/// or `scores`, and no other task may touch this pair's columns meanwhile. `fused` requires
/// what [`AttentionShape::fused`] checks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn forward_pair(
    scores: &mut [f32],
    work: &mut PairScratch,
    ctx: SendPtr,
    qkv: &[f32],
    bias: Option<&[f32]>,
    shape: AttentionShape,
    b: usize,
    h: usize,
    fused: bool,
) {
    if fused {
        forward_pair_fused(scores, work, ctx, qkv, bias, shape, b, h)
    } else {
        forward_pair_gemm(scores, work, ctx, qkv, bias, shape, b, h)
    }
}

/// [`forward_pair`] through the gemm crate. Kᵀ goes into `work.transposed` first: a contiguous
/// copy makes Q·Kᵀ about twice as fast as reading K's columns out of the fused buffer.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_pair_gemm(
    scores: &mut [f32],
    work: &mut PairScratch,
    ctx: SendPtr,
    qkv: &[f32],
    bias: Option<&[f32]>,
    shape: AttentionShape,
    b: usize,
    h: usize,
) {
    let AttentionShape { tokens: t, head_dim: d, .. } = shape;
    let hidden = shape.hidden();
    let block = t * t;
    let scale = (d as f32).powf(-0.5);
    let hv = head_views(qkv, b, h, shape);
    if let Some(bias) = bias {
        scores.copy_from_slice(&bias[h * block..(h + 1) * block]);
    }
    work.transposed.resize(d * t, 0.0);
    transpose_into(&mut work.transposed, hv.k);
    let kt = Mat::rows(&work.transposed[..d * t], d, t);
    matmul_raw(scores.as_mut_ptr(), t, t, t, 1, hv.q, kt, scale, bias.is_some(), Threads::Single);
    softmax_rows(scores, t);
    let p = Mat::rows(scores, t, t);
    matmul_raw(ctx.0.add(b * t * hidden + h * d), t, d, hidden, 1, p, hv.v, 1.0, false, Threads::Single);
}

/// Copies the `[rows, cols]` strided matrix `src` (unit column stride, cols a multiple of 8)
/// transposed into `dst` as `[cols, ld]` row-major with [`attention_kernel::transpose`],
/// zeroing columns `rows..ld` so that products over the padded rows add nothing there.
///
/// # Safety
/// [`attention_kernel::available`] must be true.
pub(crate) unsafe fn transpose_padded(dst: &mut [f32], src: Mat<'_>, ld: usize) {
    let (rows, cols) = (src.rows, src.cols);
    assert!(ld >= rows && dst.len() >= cols * ld, "transpose_padded: destination too small");
    assert!(
        src.col_stride == 1 && cols % 8 == 0 && (rows == 0 || (rows - 1) * src.row_stride + cols <= src.data.len())
    );
    attention_kernel::transpose(dst.as_mut_ptr(), ld, src.data.as_ptr(), src.row_stride, rows, cols);
    for c in 0..cols {
        dst[c * ld + rows..(c + 1) * ld].fill(0.0);
    }
}

/// [`forward_pair`] on the register-blocked kernels: S is computed with rows padded to whole
/// vectors (Kᵀ's padding columns are zero) and the softmax runs on the valid part only.
#[allow(clippy::too_many_arguments)]
unsafe fn forward_pair_fused(
    scores: &mut [f32],
    work: &mut PairScratch,
    ctx: SendPtr,
    qkv: &[f32],
    bias: Option<&[f32]>,
    shape: AttentionShape,
    b: usize,
    h: usize,
) {
    let AttentionShape { tokens: t, head_dim: d, .. } = shape;
    let hidden = shape.hidden();
    let tp = padded_tokens(t);
    let scale = (d as f32).powf(-0.5);
    let hv = head_views(qkv, b, h, shape);
    work.transposed.resize(d * tp, 0.0);
    work.wide.resize(t * tp, 0.0);
    transpose_padded(&mut work.transposed, hv.k, tp);
    let s = &mut work.wide[..t * tp];
    if let Some(bias) = bias {
        for (srow, brow) in s.chunks_exact_mut(tp).zip(bias[h * t * t..(h + 1) * t * t].chunks_exact(t)) {
            srow[..t].copy_from_slice(brow);
        }
    }
    let q = contiguous_rows(&mut work.rows_a, hv.q);
    let q = Strided { ptr: q.as_ptr(), row_stride: d, col_stride: 1 };
    gemm_bcast(t, tp, d, q, work.transposed.as_ptr(), tp, s.as_mut_ptr(), tp, scale, bias.is_some());
    for (prow, srow) in scores.chunks_exact_mut(t).zip(s.chunks_exact(tp)) {
        prow.copy_from_slice(&srow[..t]);
    }
    softmax_rows(scores, t);
    let p = Strided { ptr: scores.as_ptr(), row_stride: t, col_stride: 1 };
    let v = contiguous_rows(&mut work.rows_b, hv.v);
    gemm_bcast(t, d, t, p, v.as_ptr(), d, ctx.0.add(b * t * hidden + h * d), hidden, 1.0, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct evaluation of the definition in f64.
    fn naive(qkv: &[f32], bias: Option<&[f32]>, s: AttentionShape) -> Vec<f32> {
        let (t, d, hd) = (s.tokens, s.head_dim, s.hidden());
        let mut out = vec![0.0f32; s.batch * t * hd];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..t {
                    let q = |c: usize| qkv[(b * t + i) * 3 * hd + h * d + c] as f64;
                    let mut w: Vec<f64> = (0..t)
                        .map(|j| {
                            let k = |c: usize| qkv[(b * t + j) * 3 * hd + hd + h * d + c] as f64;
                            let dot: f64 = (0..d).map(|c| q(c) * k(c)).sum::<f64>() / (d as f64).sqrt();
                            dot + bias.map_or(0.0, |bb| bb[h * t * t + i * t + j] as f64)
                        })
                        .collect();
                    let m = w.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = w
                        .iter_mut()
                        .map(|x| {
                            *x = (*x - m).exp();
                            *x
                        })
                        .sum();
                    for c in 0..d {
                        let acc: f64 =
                            (0..t).map(|j| w[j] / z * qkv[(b * t + j) * 3 * hd + 2 * hd + h * d + c] as f64).sum();
                        out[(b * t + i) * hd + h * d + c] = acc as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_definition_with_and_without_bias() {
        let s = AttentionShape { batch: 2, tokens: 5, heads: 3, head_dim: 4 };
        let n = s.batch * s.tokens * 3 * s.hidden();
        let qkv: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let bias: Vec<f32> = (0..s.heads * 25).map(|i| ((i * 13 % 17) as f32 / 8.0) - 1.0).collect();
        for bias in [None, Some(&bias[..])] {
            for slots in [1, 4] {
                let mut ctx = vec![0.0; s.batch * s.tokens * s.hidden()];
                let mut scratch = vec![0.0; slots * 25];
                attention_forward(&mut ctx, &qkv, bias, s, &mut scratch);
                let want = naive(&qkv, bias, s);
                for (a, b) in ctx.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }
}
