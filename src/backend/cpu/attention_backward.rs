//! Attention for training: a forward that keeps the softmax probabilities, and the backward that
//! consumes them. Per (image, head) pair, with `S = scale·Q·Kᵀ + bias[h]`, `P = softmax(S)`,
//! `ctx = P·V`:
//!
//! - `dV = Pᵀ·dCtx`, `dP = dCtx·Vᵀ`,
//! - `dS = P ⊙ (dP − rowsum(dP ⊙ P))` (the softmax backward),
//! - `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`, `dbias[h] += Σ_b dS`.
//!
//! Like the forward, Q, K, V, dCtx and dQKV are strided views into the fused buffers, and each
//! pair writes only its own head's columns, so nothing is transposed or copied.

use rayon::prelude::*;

use super::attention::{
    contiguous_rows, forward_pair, head_views, padded_tokens, transpose_into, transpose_padded, AttentionShape,
    PairScratch,
};
use super::attention_kernel::{gemm_bcast, Strided};
use super::gemm::{matmul_raw, Mat, Threads};
use super::math::simd_dispatch;
use super::SendPtr;

fn check_shapes(qkv: &[f32], ctx_len: usize, bias_len: Option<usize>, shape: AttentionShape) {
    let AttentionShape { batch, tokens: t, heads, .. } = shape;
    let hidden = shape.hidden();
    assert_eq!(qkv.len(), batch * t * 3 * hidden, "attention: qkv length");
    assert_eq!(ctx_len, batch * t * hidden, "attention: context length");
    if let Some(n) = bias_len {
        assert_eq!(n, heads * t * t, "attention: bias length");
    }
}

/// [`attention_forward`](super::attention::attention_forward) that also keeps the softmax
/// probabilities: `probs` (`[batch, heads, tokens, tokens]`) receives `P` of every pair, for
/// [`attention_backward`]. Each pair computes in its own `probs` block, so no scratch is needed
/// and the parallelism is `batch·heads`.
pub fn attention_forward_saving_probs(
    ctx: &mut [f32],
    qkv: &[f32],
    bias: Option<&[f32]>,
    shape: AttentionShape,
    probs: &mut [f32],
) {
    check_shapes(qkv, ctx.len(), bias.map(<[f32]>::len), shape);
    let AttentionShape { batch, tokens: t, heads, .. } = shape;
    let block = t * t;
    assert_eq!(probs.len(), batch * heads * block, "attention: probs length");
    if block == 0 {
        return;
    }
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let fused = shape.fused();
    probs.par_chunks_mut(block).enumerate().for_each_init(PairScratch::default, |work, (pair, scores)| {
        // SAFETY: pair (b, h) owns its columns of `ctx`, and `scores` is its own block of
        // `probs`; `ctx` aliases neither `qkv` nor `probs`; `fused` is the shape's own verdict.
        unsafe { forward_pair(scores, work, ctx_ptr, qkv, bias, shape, pair / heads, pair % heads, fused) };
    });
}

simd_dispatch! {
    /// Softmax backward over rows of length `n`, in place: `dp` holds dP on entry and
    /// `dS = P ⊙ (dP − rowsum(dP ⊙ P))` on return.
    fn softmax_backward_rows(dp: &mut [f32], p: &[f32], n: usize) {
        for (drow, prow) in dp.chunks_exact_mut(n).zip(p.chunks_exact(n)) {
            // Eight lanes, as `math::sum`, so the dot product vectorises.
            let mut acc = [0.0f32; 8];
            let (dc, pc) = (drow.chunks_exact(8), prow.chunks_exact(8));
            let (dt, pt) = (dc.remainder(), pc.remainder());
            for (x, y) in dc.zip(pc) {
                for i in 0..8 {
                    acc[i] += x[i] * y[i];
                }
            }
            let mut dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (x, y) in dt.iter().zip(pt) {
                dot += x * y;
            }
            for (g, &pv) in drow.iter_mut().zip(prow) {
                *g = pv * (*g - dot);
            }
        }
    }
}

/// Scratch length [`attention_backward`] needs: one `tokens²` block per (image, head) pair
/// when `dbias` is wanted (each pair's dS is kept for the ordered batch reduction), else one
/// block per task (at most one per pair; fewer blocks mean less parallelism).
pub fn attention_backward_scratch_len(shape: AttentionShape, with_dbias: bool) -> usize {
    let pairs = shape.batch * shape.heads;
    let slots = if with_dbias { pairs } else { pairs.min(rayon::current_num_threads().max(1)) };
    slots * shape.tokens * shape.tokens
}

/// Attention backward.
/// - `dqkv`: `[batch·tokens, 3·hidden]`, overwritten with `[dQ | dK | dV]` in the fused layout.
/// - `dbias`: optional `[heads, tokens, tokens]`, ACCUMULATED (`+=`) with `Σ_b dS[b, h]`; the
///   batch sum runs in batch order whatever the thread count, so it is deterministic.
/// - `dctx`: `[batch·tokens, hidden]`, the gradient of the context.
/// - `qkv`, `probs`: the forward's input and [`attention_forward_saving_probs`]'s `probs`.
/// - `scratch`: at least [`attention_backward_scratch_len`]; without `dbias` the parallelism is
///   `scratch.len() / tokens²`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    dbias: Option<&mut [f32]>,
    dctx: &[f32],
    qkv: &[f32],
    probs: &[f32],
    shape: AttentionShape,
    scratch: &mut [f32],
) {
    check_shapes(qkv, dctx.len(), dbias.as_deref().map(<[f32]>::len), shape);
    let AttentionShape { batch, tokens: t, heads, .. } = shape;
    let block = t * t;
    let pairs = batch * heads;
    assert_eq!(dqkv.len(), qkv.len(), "attention: dqkv length");
    assert_eq!(probs.len(), pairs * block, "attention: probs length");
    if pairs == 0 || t == 0 {
        return;
    }
    let slots = if dbias.is_some() {
        assert!(scratch.len() >= pairs * block, "attention: scratch smaller than one dS per pair (dbias)");
        pairs
    } else {
        let slots = (scratch.len() / block).min(pairs);
        assert!(slots > 0, "attention: scratch smaller than one score matrix");
        slots
    };
    let per_slot = pairs.div_ceil(slots);
    let dqkv_ptr = SendPtr(dqkv.as_mut_ptr());
    let fused = shape.fused();

    scratch[..slots * block].par_chunks_mut(block).enumerate().for_each(|(slot, ds)| {
        let mut work = PairScratch::default();
        for pair in slot * per_slot..((slot + 1) * per_slot).min(pairs) {
            let p = &probs[pair * block..(pair + 1) * block];
            // SAFETY: pair (b, h) owns columns h·d..(h+1)·d of each of the q, k and v parts of
            // rows b·t..(b+1)·t of `dqkv`; no other task touches them, and `dqkv` aliases none
            // of `qkv`, `probs`, `dctx`, `scratch`. `ds` is this task's block.
            unsafe { backward_pair(ds, &mut work, dqkv_ptr, dctx, qkv, p, shape, pair / heads, pair % heads, fused) };
        }
    });

    if let Some(dbias) = dbias {
        // scratch block `pair = b·heads + h` holds dS[b, h]; each element sums over b in order.
        // A task owns a range of elements and streams the batch's blocks through it, so the
        // reads are contiguous (the order of the additions per element is the same: b = 0, 1, ..).
        let scratch = &scratch[..pairs * block];
        let chunk = super::rows_per_task(heads * block, 1);
        dbias.par_chunks_mut(chunk).enumerate().for_each(|(c, out)| {
            let start = c * chunk;
            let mut acc = vec![0.0f32; out.len()];
            for b in 0..batch {
                let base = b * heads * block + start;
                for (a, &v) in acc.iter_mut().zip(&scratch[base..base + out.len()]) {
                    *a += v;
                }
            }
            for (o, a) in out.iter_mut().zip(acc) {
                *o += a;
            }
        });
    }
}

/// One (image, head) pair of the backward: dQ, dK and dV into the pair's columns of `dqkv`
/// (`[batch·tokens, 3·hidden]`), and dS into `ds` (`tokens²`, kept for the bias gradient). `p`
/// is the pair's block of probabilities. `fused` picks the register-blocked kernels.
///
/// # Safety
/// `dqkv` must point to the `[batch·tokens, 3·hidden]` gradient buffer, aliasing none of the
/// other arguments, and no other task may touch this pair's columns meanwhile. `fused` requires
/// what [`AttentionShape::fused`] checks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn backward_pair(
    ds: &mut [f32],
    work: &mut PairScratch,
    dqkv: SendPtr,
    dctx: &[f32],
    qkv: &[f32],
    p: &[f32],
    shape: AttentionShape,
    b: usize,
    h: usize,
    fused: bool,
) {
    if fused {
        backward_pair_fused(ds, work, dqkv, dctx, qkv, p, shape, b, h)
    } else {
        backward_pair_gemm(ds, work, dqkv, dctx, qkv, p, shape, b, h)
    }
}

/// [`backward_pair`] through the gemm crate.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_pair_gemm(
    ds: &mut [f32],
    work: &mut PairScratch,
    dqkv: SendPtr,
    dctx: &[f32],
    qkv: &[f32],
    p_data: &[f32],
    shape: AttentionShape,
    b: usize,
    h: usize,
) {
    let AttentionShape { tokens: t, head_dim: d, .. } = shape;
    let hidden = shape.hidden();
    let rs = 3 * hidden;
    let scale = (d as f32).powf(-0.5);
    let hv = head_views(qkv, b, h, shape);
    let dc = Mat { data: &dctx[b * t * hidden + h * d..], rows: t, cols: d, row_stride: hidden, col_stride: 1 };
    let base = dqkv.0.add(b * t * rs + h * d);
    // dV = Pᵀ·dCtx
    matmul_raw(base.add(2 * hidden), t, d, rs, 1, Mat::transposed(p_data, t, t), dc, 1.0, false, Threads::Single);
    // dP = dCtx·Vᵀ, with Vᵀ as a contiguous copy: it reads twice as fast as V's columns in place.
    work.transposed.resize(d * t, 0.0);
    transpose_into(&mut work.transposed, hv.v);
    matmul_raw(ds.as_mut_ptr(), t, t, t, 1, dc, Mat::rows(&work.transposed, d, t), 1.0, false, Threads::Single);
    softmax_backward_rows(ds, p_data, t);
    let ds_view = Mat::rows(ds, t, t);
    // dQ = scale·dS·K, dK = scale·dSᵀ·Q
    matmul_raw(base, t, d, rs, 1, ds_view, hv.k, scale, false, Threads::Single);
    matmul_raw(base.add(hidden), t, d, rs, 1, Mat::transposed(ds, t, t), hv.q, scale, false, Threads::Single);
}

/// [`backward_pair`] on the register-blocked kernels. Pᵀ and dSᵀ are read in place (the
/// kernels take any strides for their broadcast operand); dP is computed with rows padded to
/// whole vectors (Vᵀ's padding columns are zero) and only its valid part is kept.
#[allow(clippy::too_many_arguments)]
unsafe fn backward_pair_fused(
    ds: &mut [f32],
    work: &mut PairScratch,
    dqkv: SendPtr,
    dctx: &[f32],
    qkv: &[f32],
    p_data: &[f32],
    shape: AttentionShape,
    b: usize,
    h: usize,
) {
    let AttentionShape { tokens: t, head_dim: d, .. } = shape;
    let hidden = shape.hidden();
    let rs = 3 * hidden;
    let tp = padded_tokens(t);
    let scale = (d as f32).powf(-0.5);
    let hv = head_views(qkv, b, h, shape);
    let dc = Mat { data: &dctx[b * t * hidden + h * d..], rows: t, cols: d, row_stride: hidden, col_stride: 1 };
    let base = dqkv.0.add(b * t * rs + h * d);
    let rows = |data: &[f32], stride: usize| Strided { ptr: data.as_ptr(), row_stride: stride, col_stride: 1 };
    let cols = |data: &[f32], stride: usize| Strided { ptr: data.as_ptr(), row_stride: 1, col_stride: stride };
    let dc = contiguous_rows(&mut work.rows_a, dc);
    // dV = Pᵀ·dCtx
    gemm_bcast(t, d, t, cols(p_data, t), dc.as_ptr(), d, base.add(2 * hidden), rs, 1.0, false);
    // dP = dCtx·Vᵀ
    work.transposed.resize(d * tp, 0.0);
    work.wide.resize(t * tp, 0.0);
    transpose_padded(&mut work.transposed, hv.v, tp);
    let dp = &mut work.wide[..t * tp];
    gemm_bcast(t, tp, d, rows(dc, d), work.transposed.as_ptr(), tp, dp.as_mut_ptr(), tp, 1.0, false);
    for (drow, prow) in ds.chunks_exact_mut(t).zip(dp.chunks_exact(tp)) {
        drow.copy_from_slice(&prow[..t]);
    }
    softmax_backward_rows(ds, p_data, t);
    // dQ = scale·dS·K, dK = scale·dSᵀ·Q
    let k = contiguous_rows(&mut work.rows_b, hv.k);
    gemm_bcast(t, d, t, rows(ds, t), k.as_ptr(), d, base, rs, scale, false);
    let q = contiguous_rows(&mut work.rows_b, hv.q);
    gemm_bcast(t, d, t, cols(ds, t), q.as_ptr(), d, base.add(hidden), rs, scale, false);
}

#[cfg(test)]
mod tests {
    use super::super::attention::{attention_forward, PairScratch};
    use super::super::SendPtr;
    use super::*;

    const SHAPE: AttentionShape = AttentionShape { batch: 2, tokens: 5, heads: 2, head_dim: 3 };

    /// Deterministic uniform values in [-1, 1) (xorshift64*).
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s >> 12;
                s ^= s << 25;
                s ^= s >> 27;
                let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                r as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// `L = Σ r ⊙ ctx`, the attention evaluated from its definition in f64.
    fn loss_f64(qkv: &[f64], bias: &[f64], r: &[f32], s: AttentionShape) -> f64 {
        let (t, d, hd) = (s.tokens, s.head_dim, s.hidden());
        let scale = 1.0 / (d as f64).sqrt();
        let mut loss = 0.0;
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..t {
                    let q = |c: usize| qkv[(b * t + i) * 3 * hd + h * d + c];
                    let mut w: Vec<f64> = (0..t)
                        .map(|j| {
                            let k = |c: usize| qkv[(b * t + j) * 3 * hd + hd + h * d + c];
                            scale * (0..d).map(|c| q(c) * k(c)).sum::<f64>() + bias[h * t * t + i * t + j]
                        })
                        .collect();
                    let m = w.iter().cloned().fold(f64::MIN, f64::max);
                    w.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = w.iter().sum();
                    for c in 0..d {
                        let ctx: f64 = (0..t).map(|j| w[j] / z * qkv[(b * t + j) * 3 * hd + 2 * hd + h * d + c]).sum();
                        loss += r[(b * t + i) * hd + h * d + c] as f64 * ctx;
                    }
                }
            }
        }
        loss
    }

    struct Grads {
        dqkv: Vec<f32>,
        dbias: Vec<f32>,
    }

    fn run_backward(qkv: &[f32], bias: &[f32], dctx: &[f32], s: AttentionShape) -> Grads {
        let mut ctx = vec![0.0; s.batch * s.tokens * s.hidden()];
        let mut probs = vec![0.0; s.batch * s.heads * s.tokens * s.tokens];
        attention_forward_saving_probs(&mut ctx, qkv, Some(bias), s, &mut probs);
        let mut dqkv = vec![f32::NAN; qkv.len()];
        // Start from a non-zero dbias to check that it accumulates.
        let mut dbias = vec![0.5; bias.len()];
        let mut scratch = vec![0.0; attention_backward_scratch_len(s, true)];
        attention_backward(&mut dqkv, Some(&mut dbias), dctx, qkv, &probs, s, &mut scratch);
        dbias.iter_mut().for_each(|v| *v -= 0.5);
        Grads { dqkv, dbias }
    }

    /// Max |analytic − FD| / max |FD| over all entries of `x`.
    fn fd_error(x: &[f32], grad: &[f32], f: impl Fn(&[f64]) -> f64) -> f64 {
        let eps = 1e-3;
        let mut xs: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let (mut worst, mut max_abs) = (0.0f64, 0.0f64);
        for i in 0..xs.len() {
            let orig = xs[i];
            xs[i] = orig + eps;
            let up = f(&xs);
            xs[i] = orig - eps;
            let down = f(&xs);
            xs[i] = orig;
            let fd = (up - down) / (2.0 * eps);
            worst = worst.max((fd - grad[i] as f64).abs());
            max_abs = max_abs.max(fd.abs());
        }
        assert!(max_abs > 1e-2, "gradient unexpectedly tiny");
        worst / max_abs
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let s = SHAPE;
        let qkv: Vec<f32> = random(s.batch * s.tokens * 3 * s.hidden(), 1).iter().map(|v| 1.5 * v).collect();
        let bias = random(s.heads * s.tokens * s.tokens, 2);
        let r = random(s.batch * s.tokens * s.hidden(), 3);
        let g = run_backward(&qkv, &bias, &r, s);
        let bias64: Vec<f64> = bias.iter().map(|&v| v as f64).collect();
        let qkv64: Vec<f64> = qkv.iter().map(|&v| v as f64).collect();

        let hd = s.hidden();
        let err_qkv = fd_error(&qkv, &g.dqkv, |x| loss_f64(x, &bias64, &r, s));
        let err_bias = fd_error(&bias, &g.dbias, |x| loss_f64(&qkv64, x, &r, s));
        // Per part, so a wrong dQ, dK or dV cannot hide behind the others' magnitudes.
        let mut err_parts = [0.0; 3];
        for (part, err) in err_parts.iter_mut().enumerate() {
            let idx: Vec<usize> = (0..qkv.len()).filter(|i| (i % (3 * hd)) / hd == part).collect();
            let sub: Vec<f32> = idx.iter().map(|&i| qkv[i]).collect();
            let sub_grad: Vec<f32> = idx.iter().map(|&i| g.dqkv[i]).collect();
            *err = fd_error(&sub, &sub_grad, |x| {
                let mut full = qkv64.clone();
                for (&i, &v) in idx.iter().zip(x) {
                    full[i] = v;
                }
                loss_f64(&full, &bias64, &r, s)
            });
        }
        eprintln!(
            "FD rel errors: dqkv {err_qkv:.2e}, dq {:.2e} dk {:.2e} dv {:.2e}, dbias {err_bias:.2e}",
            err_parts[0], err_parts[1], err_parts[2]
        );
        assert!(err_qkv < 1e-3, "dqkv FD error {err_qkv}");
        assert!(err_parts.iter().all(|&e| e < 1e-3), "dq/dk/dv FD errors {err_parts:?}");
        assert!(err_bias < 1e-3, "dbias FD error {err_bias}");
    }

    #[test]
    fn attention_backward_probs_sum_to_one_and_ctx_matches_forward() {
        let s = AttentionShape { batch: 2, tokens: 7, heads: 3, head_dim: 4 };
        let qkv = random(s.batch * s.tokens * 3 * s.hidden(), 4);
        let bias = random(s.heads * s.tokens * s.tokens, 5);
        for bias in [None, Some(&bias[..])] {
            let mut ctx = vec![0.0; s.batch * s.tokens * s.hidden()];
            let mut probs = vec![0.0; s.batch * s.heads * s.tokens * s.tokens];
            attention_forward_saving_probs(&mut ctx, &qkv, bias, s, &mut probs);
            for row in probs.chunks(s.tokens) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "row sum {sum}");
                assert!(row.iter().all(|&p| p > 0.0));
            }
            let mut want = vec![0.0; ctx.len()];
            let mut scratch = vec![0.0; 3 * s.tokens * s.tokens];
            attention_forward(&mut want, &qkv, bias, s, &mut scratch);
            assert_eq!(ctx, want);
        }
    }

    #[test]
    fn attention_backward_without_dbias_matches_with() {
        let s = AttentionShape { batch: 3, tokens: 6, heads: 2, head_dim: 4 };
        let qkv = random(s.batch * s.tokens * 3 * s.hidden(), 6);
        let bias = random(s.heads * s.tokens * s.tokens, 7);
        let dctx = random(s.batch * s.tokens * s.hidden(), 8);
        let g = run_backward(&qkv, &bias, &dctx, s);
        let mut ctx = vec![0.0; dctx.len()];
        let mut probs = vec![0.0; s.batch * s.heads * s.tokens * s.tokens];
        attention_forward_saving_probs(&mut ctx, &qkv, Some(&bias), s, &mut probs);
        for slots in [1, 4] {
            let mut dqkv = vec![f32::NAN; qkv.len()];
            let mut scratch = vec![0.0; slots * s.tokens * s.tokens];
            attention_backward(&mut dqkv, None, &dctx, &qkv, &probs, s, &mut scratch);
            assert_eq!(dqkv, g.dqkv);
        }
    }

    #[test]
    fn attention_backward_dbias_independent_of_thread_count() {
        let s = AttentionShape { batch: 5, tokens: 9, heads: 3, head_dim: 4 };
        let qkv = random(s.batch * s.tokens * 3 * s.hidden(), 9);
        let bias = random(s.heads * s.tokens * s.tokens, 10);
        let dctx = random(s.batch * s.tokens * s.hidden(), 11);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| run_backward(&qkv, &bias, &dctx, s))
        };
        let (one, three) = (run(1), run(3));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.dbias), bits(&three.dbias));
        assert_eq!(bits(&one.dqkv), bits(&three.dqkv));
    }

    /// The register-blocked kernels against the gemm-crate path, pair by pair, forward
    /// (probabilities and context) and backward (dQ, dK, dV and dS), over token counts with
    /// every remainder the kernels handle (17, 65 = tiny32, 197 = BEiT-B/16) and head dims 32
    /// and 64, with and without the bias. The two paths round differently (different summation
    /// blocking), so they agree to float rounding: within 2e-6 relative to each output's
    /// largest magnitude, about 30 ulps at unit scale.
    #[test]
    fn fused_kernels_match_gemm_path() {
        if !super::super::attention_kernel::available() {
            eprintln!("no AVX2+FMA: fused kernels not exercised");
            return;
        }
        for &tokens in &[17, 65, 197] {
            for &head_dim in &[32, 64] {
                let s = AttentionShape { batch: 2, tokens, heads: 3, head_dim };
                assert!(s.fused());
                let (t, hd) = (s.tokens, s.hidden());
                let qkv: Vec<f32> = random(s.batch * t * 3 * hd, 20 + tokens as u64).iter().map(|v| 2.0 * v).collect();
                let bias_table = random(s.heads * t * t, 21);
                let dctx = random(s.batch * t * hd, 22);
                for bias in [None, Some(&bias_table[..])] {
                    let run = |fused: bool| {
                        let mut ctx = vec![0.0; s.batch * t * hd];
                        let mut probs = vec![0.0; s.batch * s.heads * t * t];
                        let mut dqkv = vec![f32::NAN; qkv.len()];
                        let mut ds = vec![0.0; s.batch * s.heads * t * t];
                        let mut work = PairScratch::default();
                        for pair in 0..s.batch * s.heads {
                            let (b, h) = (pair / s.heads, pair % s.heads);
                            let blk = pair * t * t..(pair + 1) * t * t;
                            // SAFETY: single-threaded; every buffer is distinct and sized for `s`.
                            unsafe {
                                forward_pair(
                                    &mut probs[blk.clone()],
                                    &mut work,
                                    SendPtr(ctx.as_mut_ptr()),
                                    &qkv,
                                    bias,
                                    s,
                                    b,
                                    h,
                                    fused,
                                );
                                let p = &probs[blk.clone()];
                                backward_pair(
                                    &mut ds[blk],
                                    &mut work,
                                    SendPtr(dqkv.as_mut_ptr()),
                                    &dctx,
                                    &qkv,
                                    p,
                                    s,
                                    b,
                                    h,
                                    fused,
                                );
                            }
                        }
                        [ctx, probs, dqkv, ds]
                    };
                    let (new, old) = (run(true), run(false));
                    for (name, (a, b)) in ["ctx", "probs", "dqkv", "dS"].iter().zip(new.iter().zip(&old)) {
                        assert!(a.iter().all(|v| v.is_finite()), "{name}: unwritten or non-finite output");
                        let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        let worst = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                        eprintln!("t {t} d {head_dim} bias {}: {name} max |fused - gemm| {worst:.2e} (max |gemm| {scale:.2e})", bias.is_some());
                        assert!(worst <= 2e-6 * scale, "t {t} d {head_dim} {name}: {worst:e} vs scale {scale:e}");
                    }
                }
            }
        }
    }
}
