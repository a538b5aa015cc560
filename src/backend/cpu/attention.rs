//! Multi-head self-attention over a fused QKV buffer, one (image, head) pair per task:
//! `S = scale·Q·Kᵀ + bias`, row softmax, `ctx = P·V`. Q, K and V are read in place with strides,
//! and each head writes its own columns of the context, so nothing is transposed or copied.

use rayon::prelude::*;

use super::gemm::{matmul_raw, Mat, Threads};
use super::math::{self, simd_dispatch};
use super::SendPtr;

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    pub fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }
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
    let AttentionShape { batch, tokens: t, heads, head_dim: d } = shape;
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
    let scale = (d as f32).powf(-0.5);
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());

    scratch[..slots * block].par_chunks_mut(block).enumerate().for_each(|(slot, scores)| {
        // Capture the whole Send wrapper, not (by edition-2021 disjoint capture) its raw field.
        #[allow(clippy::redundant_locals)]
        let ctx_ptr = ctx_ptr;
        for pair in slot * per_slot..((slot + 1) * per_slot).min(pairs) {
            let (b, h) = (pair / heads, pair % heads);
            let base = b * t * 3 * hidden;
            let q = Mat { data: &qkv[base + h * d..], rows: t, cols: d, row_stride: 3 * hidden, col_stride: 1 };
            let kt =
                Mat { data: &qkv[base + hidden + h * d..], rows: d, cols: t, row_stride: 1, col_stride: 3 * hidden };
            let v = Mat {
                data: &qkv[base + 2 * hidden + h * d..],
                rows: t,
                cols: d,
                row_stride: 3 * hidden,
                col_stride: 1,
            };
            if let Some(bias) = bias {
                scores.copy_from_slice(&bias[h * block..(h + 1) * block]);
            }
            // SAFETY: `scores` is this task's own block.
            unsafe {
                matmul_raw(scores.as_mut_ptr(), t, t, t, 1, q, kt, scale, bias.is_some(), Threads::Single);
            }
            softmax_rows(scores, t);
            let p = Mat::rows(scores, t, t);
            // SAFETY: pair (b, h) owns columns h·d..(h+1)·d of rows b·t..(b+1)·t of `ctx`; no
            // other task writes them, and `ctx` does not alias `qkv` or `scores`.
            unsafe {
                let dst = ctx_ptr.0.add(b * t * hidden + h * d);
                matmul_raw(dst, t, d, hidden, 1, p, v, 1.0, false, Threads::Single);
            }
        }
    });
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
