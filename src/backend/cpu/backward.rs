//! Backward passes of the row-wise ops and the Linear: layer norm, exact GELU, and
//! `y = x·wᵀ + b`. Input gradients are overwritten; parameter gradients are accumulated (`+=`),
//! so one buffer can collect a parameter's gradient over several uses or micro-batches.
//!
//! Parameter reductions over rows (dgamma, dbeta, db) are deterministic whatever the thread
//! count: rows are cut into chunks whose size depends only on the row length, each chunk sums
//! its rows in order into its own partial buffer, and the partials are added in chunk order.

use rayon::prelude::*;

use super::elementwise::RowFactors;
use super::gemm::{matmul, Mat, MatMut, Threads};
use super::math::{self, simd_dispatch};

/// Rows per chunk of a deterministic row reduction. Depends only on `row_len` (never on the
/// thread count), so the summation order, and with it every bit of the result, is fixed.
fn reduce_chunk_rows(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).clamp(4, 128)
}

/// Sums the per-chunk partials (`width` elements each) into the first one, chunk by chunk in
/// order, and returns it. Adding that total to the output once (rather than each partial) makes
/// `+=` exact: a second call on the same inputs adds exactly the first call's value.
fn reduce_partials_in_order(partials: &mut [f32], width: usize) -> &[f32] {
    let (total, rest) = partials.split_at_mut(width);
    for p in rest.chunks_exact(width) {
        for (t, &v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// `out += v`, element by element in order.
pub(crate) fn add_into(out: &mut [f32], v: &[f32]) {
    for (o, &a) in out.iter_mut().zip(v) {
        *o += a;
    }
}

simd_dispatch! {
    /// Layer norm backward for a chunk of rows; `part` is `[dgamma | dbeta]` for this chunk
    /// (zeroed by the caller, accumulated in row order), `tmp` one row of scratch. `dx` is
    /// overwritten, or added to with `accumulate`.
    fn layernorm_backward_rows(dx: &mut [f32], part: &mut [f32], tmp: &mut [f32], dy: &[f32], x: &[f32], gamma: &[f32], dim: usize, eps: f32, accumulate: bool) {
        let (pg, pb) = part.split_at_mut(dim);
        let inv_dim = 1.0 / dim as f32;
        for ((dxr, dyr), xr) in dx.chunks_exact_mut(dim).zip(dy.chunks_exact(dim)).zip(x.chunks_exact(dim)) {
            // Recompute the statistics exactly as the forward pass does.
            let mean = math::sum(xr) / dim as f32;
            for (d, &v) in tmp.iter_mut().zip(xr) {
                *d = (v - mean) * (v - mean);
            }
            let var = math::sum(tmp) / dim as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            // Σ dxhat·xhat with dxhat = dy·gamma, xhat = (x - mean)·rstd.
            for (((d, &v), &g), &o) in tmp.iter_mut().zip(xr).zip(gamma).zip(dyr) {
                *d = o * g * ((v - mean) * rstd);
            }
            let mean_dxhat_xhat = math::sum(tmp) * inv_dim;
            for ((d, &g), &o) in tmp.iter_mut().zip(gamma).zip(dyr) {
                *d = o * g;
            }
            let mean_dxhat = math::sum(tmp) * inv_dim;
            // dx = rstd·(dxhat - mean(dxhat) - xhat·mean(dxhat·xhat)).
            if accumulate {
                for ((d, &t), &v) in dxr.iter_mut().zip(tmp.iter()).zip(xr) {
                    let xhat = (v - mean) * rstd;
                    *d += rstd * (t - mean_dxhat - xhat * mean_dxhat_xhat);
                }
            } else {
                for ((d, &t), &v) in dxr.iter_mut().zip(tmp.iter()).zip(xr) {
                    let xhat = (v - mean) * rstd;
                    *d = rstd * (t - mean_dxhat - xhat * mean_dxhat_xhat);
                }
            }
            for (((pg, pb), &v), &o) in pg.iter_mut().zip(pb.iter_mut()).zip(xr).zip(dyr) {
                *pg += o * ((v - mean) * rstd);
                *pb += o;
            }
        }
    }
}

pub use crate::backend::ops::DxMode;

/// Gradients of PyTorch's `LayerNorm` (biased variance, eps inside the square root) over rows
/// of length `dim`. `dx` is overwritten or added to (`mode`); `dgamma` and `dbeta` are
/// accumulated (`+=`). Mean and rstd are recomputed from `x`. The parameter sums are
/// bit-identical for any number of threads.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dy: &[f32],
    x: &[f32],
    gamma: &[f32],
    dim: usize,
    eps: f32,
    mode: DxMode,
) {
    let accumulate = mode == DxMode::Accumulate;
    assert!(dim > 0, "layernorm_backward: dim must be positive");
    assert_eq!(x.len() % dim, 0, "layernorm_backward: x is not a whole number of rows");
    assert_eq!(dx.len(), x.len(), "layernorm_backward: dx length");
    assert_eq!(dy.len(), x.len(), "layernorm_backward: dy length");
    assert_eq!(gamma.len(), dim, "layernorm_backward: gamma length");
    assert_eq!(dgamma.len(), dim, "layernorm_backward: dgamma length");
    assert_eq!(dbeta.len(), dim, "layernorm_backward: dbeta length");
    let rows = x.len() / dim;
    if rows == 0 {
        return;
    }
    let chunk = reduce_chunk_rows(dim) * dim;
    let mut partials = vec![0.0f32; rows.div_ceil(reduce_chunk_rows(dim)) * 2 * dim];
    dx.par_chunks_mut(chunk)
        .zip(partials.par_chunks_mut(2 * dim))
        .zip(dy.par_chunks(chunk).zip(x.par_chunks(chunk)))
        .for_each(|((dxc, part), (dyc, xc))| {
            let mut tmp = vec![0.0f32; dim];
            layernorm_backward_rows(dxc, part, &mut tmp, dyc, xc, gamma, dim, eps, accumulate)
        });
    let (pg, pb) = reduce_partials_in_order(&mut partials, 2 * dim).split_at(dim);
    add_into(dgamma, pg);
    add_into(dbeta, pb);
}

simd_dispatch! {
    fn gelu_backward_chunk(dx: &mut [f32], dy: &[f32], pre: &[f32]) {
        // 32 elements per iteration: four independent vectors in flight, so the long
        // polynomial dependency chains of erf and exp overlap instead of running one at a time.
        const W: usize = 32;
        let mut d = dx.chunks_exact_mut(W);
        let mut o = dy.chunks_exact(W);
        let mut p = pre.chunks_exact(W);
        for ((d, o), p) in (&mut d).zip(&mut o).zip(&mut p) {
            for i in 0..W {
                d[i] = o[i] * math::gelu_grad(p[i]);
            }
        }
        for ((d, &o), &v) in d.into_remainder().iter_mut().zip(o.remainder()).zip(p.remainder()) {
            *d = o * math::gelu_grad(v);
        }
    }
}

/// `dx = dy ⊙ GELU'(pre)` for the exact (erf) GELU: GELU'(x) = Φ(x) + x·φ(x). `dx` is
/// overwritten; `pre` is the GELU's input (after the Linear's bias).
pub fn gelu_backward(dx: &mut [f32], dy: &[f32], pre: &[f32]) {
    assert_eq!(dx.len(), pre.len(), "gelu_backward: dx length");
    assert_eq!(dy.len(), pre.len(), "gelu_backward: dy length");
    const CHUNK: usize = 16_384;
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(pre.par_chunks(CHUNK)))
        .for_each(|(d, (o, p))| gelu_backward_chunk(d, o, p));
}

simd_dispatch! {
    fn relu_backward_chunk(dx: &mut [f32], dy: &[f32], x: &[f32], accumulate: bool) {
        if accumulate {
            for ((d, &o), &v) in dx.iter_mut().zip(dy).zip(x) {
                *d += if v > 0.0 { o } else { 0.0 };
            }
        } else {
            for ((d, &o), &v) in dx.iter_mut().zip(dy).zip(x) {
                *d = if v > 0.0 { o } else { 0.0 };
            }
        }
    }
}

/// Backward of [`super::elementwise::relu_forward`]: `dx = dout` where `x > 0`, else 0 (the
/// gradient at 0 is 0, as in PyTorch), overwritten or added to (`mode`).
pub fn relu_backward(x: &[f32], dout: &[f32], dx: &mut [f32], mode: DxMode) {
    assert_eq!(dout.len(), x.len(), "relu_backward: dout length");
    assert_eq!(dx.len(), x.len(), "relu_backward: dx length");
    const CHUNK: usize = 16_384;
    let accumulate = mode == DxMode::Accumulate;
    dx.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK).zip(x.par_chunks(CHUNK)))
        .for_each(|(d, (o, v))| relu_backward_chunk(d, o, v, accumulate));
}

simd_dispatch! {
    /// `part += Σ_rows dy[row, :]` over a chunk of rows of length `part.len()`.
    fn column_sums_rows(part: &mut [f32], dy: &[f32]) {
        for row in dy.chunks_exact(part.len()) {
            for (p, &v) in part.iter_mut().zip(row) {
                *p += v;
            }
        }
    }
}

simd_dispatch! {
    fn mul_rows(dx: &mut [f32], dy: &[f32], factor: &[f32]) {
        for ((d, &o), &f) in dx.iter_mut().zip(dy).zip(factor) {
            *d = o * f;
        }
    }
}

/// GELU backward from the derivative the training forward saved
/// ([`bias_gelu_saving_grad`](super::elementwise::bias_gelu_saving_grad)), fused with the bias
/// gradient of the Linear that fed the GELU: `dx = dy ⊙ saved_grad` and `dbias += Σ_rows dx`
/// (rows of `dbias.len()`) while each chunk of `dx` is still in cache. `dx` is bit for bit
/// [`gelu_backward`]'s, and the sum bit for bit [`linear_backward`]'s `db` on it (same chunks,
/// same order).
pub fn gelu_backward_saved(dx: &mut [f32], dbias: &mut [f32], dy: &[f32], saved_grad: &[f32]) {
    assert_eq!(dx.len(), saved_grad.len(), "gelu_backward: dx length");
    assert_eq!(dy.len(), saved_grad.len(), "gelu_backward: dy length");
    let n = dbias.len();
    assert!(n > 0 && dx.len() % n == 0, "gelu_backward: not a whole number of rows of the bias");
    if dx.is_empty() {
        return;
    }
    let chunk = reduce_chunk_rows(n) * n;
    let mut partials = vec![0.0f32; dx.len().div_ceil(chunk) * n];
    dx.par_chunks_mut(chunk)
        .zip(partials.par_chunks_mut(n))
        .zip(dy.par_chunks(chunk).zip(saved_grad.par_chunks(chunk)))
        .for_each(|((d, part), (o, f))| {
            mul_rows(d, o, f);
            column_sums_rows(part, d);
        });
    add_into(dbias, reduce_partials_in_order(&mut partials, n));
}

/// `out[j] += Σ_r dy[r, j]` over rows of length `out.len()`, deterministic for any number of
/// threads.
fn column_sums_accumulate(out: &mut [f32], dy: &[f32]) {
    let n = out.len();
    if n == 0 || dy.is_empty() {
        return;
    }
    let rows = dy.len() / n;
    let chunk_rows = reduce_chunk_rows(n);
    let mut partials = vec![0.0f32; rows.div_ceil(chunk_rows) * n];
    partials.par_chunks_mut(n).zip(dy.par_chunks(chunk_rows * n)).for_each(|(p, d)| column_sums_rows(p, d));
    add_into(out, reduce_partials_in_order(&mut partials, n));
}

/// Backward of a PyTorch `Linear` `y[m, n] = x[m, k] · w[n, k]ᵀ + b[n]`:
/// `dx = dy · w` (overwritten, skipped when `None`), `dw += dyᵀ · x`, `db += Σ_rows dy`
/// (skipped when `None`). `db` is bit-identical for any number of threads.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dy.len(), m * n, "linear_backward: dy length");
    assert_eq!(x.len(), m * k, "linear_backward: x length");
    assert_eq!(w.len(), n * k, "linear_backward: w length");
    assert_eq!(dw.len(), n * k, "linear_backward: dw length");
    if let Some(dx) = dx {
        assert_eq!(dx.len(), m * k, "linear_backward: dx length");
        if n == 0 {
            dx.fill(0.0);
        } else {
            matmul(MatMut::rows(dx, m, k), Mat::rows(dy, m, n), Mat::rows(w, n, k), 1.0, false, Threads::Pool);
        }
    }
    if m > 0 {
        matmul(MatMut::rows(dw, n, k), Mat::transposed(dy, m, n), Mat::rows(x, m, k), 1.0, true, Threads::Pool);
    }
    if let Some(db) = db {
        assert_eq!(db.len(), n, "linear_backward: db length");
        column_sums_accumulate(db, dy);
    }
}

simd_dispatch! {
    /// One chunk of [`residual_add_backward`]: `dy = dacc ⊙ scale` and, into `part` (zeroed by
    /// the caller), `Σ_rows dacc ⊙ (y + bias)` in row order.
    fn residual_backward_rows(dy: &mut [f32], part: &mut [f32], dacc: &[f32], y: &[f32], bias: &[f32], scale: &[f32]) {
        let dim = bias.len();
        for ((dyr, dar), yr) in dy.chunks_exact_mut(dim).zip(dacc.chunks_exact(dim)).zip(y.chunks_exact(dim)) {
            for ((((o, &g), &v), &b), (&s, p)) in dyr.iter_mut().zip(dar).zip(yr).zip(bias).zip(scale.iter().zip(part.iter_mut())) {
                *o = g * s;
                *p += g * (v + b);
            }
        }
    }
}

simd_dispatch! {
    /// [`residual_backward_rows`] with a factor per row (`factors[r]` for row r of the chunk):
    /// `dy = dacc ⊙ scale·k`, `part += Σ_rows k·dacc ⊙ (y + bias)`.
    fn residual_backward_rows_factored(dy: &mut [f32], part: &mut [f32], dacc: &[f32], y: &[f32], bias: &[f32], scale: &[f32], factors: &[f32]) {
        let dim = bias.len();
        for (((dyr, dar), yr), &k) in dy.chunks_exact_mut(dim).zip(dacc.chunks_exact(dim)).zip(y.chunks_exact(dim)).zip(factors) {
            for ((((o, &g), &v), &b), (&s, p)) in dyr.iter_mut().zip(dar).zip(yr).zip(bias).zip(scale.iter().zip(part.iter_mut())) {
                *o = g * (s * k);
                *p += k * (g * (v + b));
            }
        }
    }
}

/// Backward of [`residual_add`](super::elementwise::residual_add) `acc += scale ⊙ (y + bias)`
/// with respect to `y` and `scale`: `dy = dacc ⊙ scale` (overwritten; `dacc` itself flows to the
/// residual input unchanged, so the caller keeps it) and `dscale += Σ_rows dacc ⊙ (y + bias)`
/// (deterministic for any thread count). The bias gradient is `Σ_rows dy`: with `dbias` it is
/// added there while each chunk of `dy` is in cache, bit-identical to what [`linear_backward`]'s
/// `db` would collect from `dy` afterwards. Without `dscale`, `y` is not read. With
/// `row_factors` (see [`residual_add_into`](super::elementwise::residual_add_into)) row r's scale
/// is `scale·k_r` and it adds `k_r·dacc ⊙ (y + bias)` to `dscale`.
#[allow(clippy::too_many_arguments)]
pub fn residual_add_backward(
    dy: &mut [f32],
    dscale: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dacc: &[f32],
    y: &[f32],
    bias: &[f32],
    scale: &[f32],
    row_factors: Option<RowFactors<'_>>,
) {
    let dim = bias.len();
    assert!(dim > 0, "residual_add_backward: empty rows");
    assert_eq!(scale.len(), dim, "residual_add_backward: scale length");
    assert_eq!(dy.len(), dacc.len(), "residual_add_backward: dy length");
    assert_eq!(dacc.len() % dim, 0, "residual_add_backward: not a whole number of rows");
    let rows = dacc.len() / dim;
    if let Some(rf) = row_factors {
        assert!(rf.rows_each > 0 && rf.factors.len() * rf.rows_each == rows, "row factors do not cover the rows");
    }
    if let Some(db) = dbias.as_deref() {
        assert_eq!(db.len(), dim, "residual_add_backward: dbias length");
    }
    let factor_of = |row: usize| row_factors.map_or(1.0, |rf| rf.of_row(row));
    if dscale.is_none() && dbias.is_none() {
        let chunk_rows = super::rows_per_task(rows, dim);
        dy.par_chunks_mut(chunk_rows * dim)
            .enumerate()
            .zip(dacc.par_chunks(chunk_rows * dim))
            .for_each(|((c, o), g)| scale_rows(o, g, scale, dim, |r| factor_of(c * chunk_rows + r)));
        return;
    }
    if let Some(ds) = dscale.as_deref() {
        assert_eq!(y.len(), dacc.len(), "residual_add_backward: y length");
        assert_eq!(ds.len(), dim, "residual_add_backward: dscale length");
    }
    if rows == 0 {
        return;
    }
    // One partial row per chunk for each requested sum: [dscale | dbias].
    let want_scale = dscale.is_some();
    let width = dim * (want_scale as usize + dbias.is_some() as usize);
    let chunk_rows = reduce_chunk_rows(dim);
    let chunk = chunk_rows * dim;
    let mut partials = vec![0.0f32; rows.div_ceil(chunk_rows) * width];
    dy.par_chunks_mut(chunk).zip(partials.par_chunks_mut(width)).enumerate().zip(dacc.par_chunks(chunk)).for_each(
        |((c, (o, part)), g)| {
            let (scale_part, bias_part) = part.split_at_mut(if want_scale { dim } else { 0 });
            if want_scale {
                let yc = &y[c * chunk..c * chunk + o.len()];
                match row_factors {
                    None => residual_backward_rows(o, scale_part, g, yc, bias, scale),
                    Some(_) => {
                        let factors: Vec<f32> = (0..o.len() / dim).map(|r| factor_of(c * chunk_rows + r)).collect();
                        residual_backward_rows_factored(o, scale_part, g, yc, bias, scale, &factors)
                    }
                }
            } else {
                scale_rows(o, g, scale, dim, |r| factor_of(c * chunk_rows + r));
            }
            if !bias_part.is_empty() {
                column_sums_rows(bias_part, o);
            }
        },
    );
    let total = reduce_partials_in_order(&mut partials, width);
    let (total_scale, total_bias) = total.split_at(if want_scale { dim } else { 0 });
    if let Some(ds) = dscale {
        add_into(ds, total_scale);
    }
    if let Some(db) = dbias {
        add_into(db, total_bias);
    }
}

/// `o = g ⊙ scale·k_r` row by row (`factor(r)` = k for row r of this chunk).
fn scale_rows(o: &mut [f32], g: &[f32], scale: &[f32], dim: usize, factor: impl Fn(usize) -> f32) {
    for (r, (orow, grow)) in o.chunks_exact_mut(dim).zip(g.chunks_exact(dim)).enumerate() {
        let k = factor(r);
        for ((o, &g), &s) in orow.iter_mut().zip(grow).zip(scale) {
            *o = g * (s * k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), uniform in [lo, hi).
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let u = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        }
        fn vec(&mut self, len: usize, lo: f32, hi: f32) -> Vec<f32> {
            (0..len).map(|_| self.uniform(lo, hi)).collect()
        }
    }

    const H: f64 = 1e-3;

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&a| a as f64).collect()
    }

    fn loss(r: &[f32], y: &[f64]) -> f64 {
        r.iter().zip(y).map(|(&r, &y)| r as f64 * y).sum()
    }

    /// Central differences of `f` (a scalar loss of f64 inputs) with respect to every element
    /// of `inputs[which]`.
    fn fd_grad(inputs: &[Vec<f64>], which: usize, f: &dyn Fn(&[Vec<f64>]) -> f64) -> Vec<f64> {
        let mut v = inputs.to_vec();
        (0..inputs[which].len())
            .map(|i| {
                let orig = v[which][i];
                v[which][i] = orig + H;
                let lp = f(&v);
                v[which][i] = orig - H;
                let lm = f(&v);
                v[which][i] = orig;
                (lp - lm) / (2.0 * H)
            })
            .collect()
    }

    /// max |a - b| / max(|a|, |b|, 1e-3) over all elements.
    fn max_rel_err(analytic: &[f32], fd: &[f64]) -> f64 {
        assert_eq!(analytic.len(), fd.len());
        analytic
            .iter()
            .zip(fd)
            .map(|(&a, &b)| {
                let a = a as f64;
                (a - b).abs() / a.abs().max(b.abs()).max(1e-3)
            })
            .fold(0.0, f64::max)
    }

    fn check(name: &str, analytic: &[f32], fd: &[f64], tol: f64) {
        let err = max_rel_err(analytic, fd);
        eprintln!("{name}: max relative FD error {err:.3e}");
        assert!(err < tol, "{name}: max relative error {err} ≥ {tol}");
    }

    #[test]
    fn residual_add_backward_matches_finite_differences() {
        use crate::backend::cpu::elementwise::residual_add;
        let mut rng = Rng(11);
        let (rows, dim) = (37, 6);
        let acc0 = rng.vec(rows * dim, -1.0, 1.0);
        let y = rng.vec(rows * dim, -1.0, 1.0);
        let bias = rng.vec(dim, -0.5, 0.5);
        let scale = rng.vec(dim, 0.1, 1.5);
        let r = rng.vec(rows * dim, -1.0, 1.0);
        let f = |v: &[Vec<f64>]| {
            // loss = <r, acc + scale ⊙ (y + bias)> in f64
            let (y, s) = (&v[0], &v[1]);
            (0..rows * dim)
                .map(|i| r[i] as f64 * (acc0[i] as f64 + s[i % dim] * (y[i] + bias[i % dim] as f64)))
                .sum::<f64>()
        };
        let inputs = vec![to64(&y), to64(&scale)];
        let (mut dy, mut ds) = (vec![0.0f32; rows * dim], vec![0.0f32; dim]);
        residual_add_backward(&mut dy, Some(&mut ds), None, &r, &y, &bias, &scale, None);
        check("residual dy", &dy, &fd_grad(&inputs, 0, &f), 1e-3);
        check("residual dscale", &ds, &fd_grad(&inputs, 1, &f), 1e-3);
        // The forward it inverts is residual_add: <r, d(acc)/d(y)> agrees for one element.
        let mut acc = acc0.clone();
        residual_add(&mut acc, &y, &bias, Some(&scale));
        assert!((acc[7] - (acc0[7] + scale[1] * (y[7] + bias[1]))).abs() < 1e-6);
        // Without dscale, dy is the same.
        let mut dy2 = vec![0.0f32; rows * dim];
        residual_add_backward(&mut dy2, None, None, &r, &y, &bias, &scale, None);
        assert_eq!(dy, dy2);
    }

    #[test]
    fn residual_add_backward_with_row_factors_matches_finite_differences() {
        use crate::backend::cpu::elementwise::{residual_add_into, RowFactors};
        let mut rng = Rng(12);
        let (rows, dim, each) = (36, 5, 12);
        let factors = [0.0f32, 1.25, 0.5];
        let rf = RowFactors { factors: &factors, rows_each: each };
        let x = rng.vec(rows * dim, -1.0, 1.0);
        let y = rng.vec(rows * dim, -1.0, 1.0);
        let bias = rng.vec(dim, -0.5, 0.5);
        let scale = rng.vec(dim, 0.1, 1.5);
        let r = rng.vec(rows * dim, -1.0, 1.0);
        let f = |v: &[Vec<f64>]| {
            let (y, s) = (&v[0], &v[1]);
            (0..rows * dim)
                .map(|i| {
                    let k = factors[i / dim / each] as f64;
                    r[i] as f64 * (x[i] as f64 + k * s[i % dim] * (y[i] + bias[i % dim] as f64))
                })
                .sum::<f64>()
        };
        let inputs = vec![to64(&y), to64(&scale)];
        let (mut dy, mut ds) = (vec![0.0f32; rows * dim], vec![0.0f32; dim]);
        residual_add_backward(&mut dy, Some(&mut ds), None, &r, &y, &bias, &scale, Some(rf));
        check("factored residual dy", &dy, &fd_grad(&inputs, 0, &f), 1e-3);
        check("factored residual dscale", &ds, &fd_grad(&inputs, 1, &f), 1e-3);
        // The forward: dropped rows are x exactly; kept rows add k·scale ⊙ (y + bias).
        let mut out = vec![0.0f32; rows * dim];
        residual_add_into(&mut out, &x, &y, &bias, Some(&scale), Some(rf));
        assert_eq!(&out[..each * dim], &x[..each * dim]);
        let i = each * dim + 3;
        assert_eq!(out[i], x[i] + (scale[3] * 1.25) * (y[i] + bias[3]));
    }

    /// The fused bias gradients add exactly what `linear_backward`'s `db` would collect from the
    /// same output afterwards (same chunks, same order), for several row counts and both paths.
    #[test]
    fn fused_bias_gradients_equal_the_column_sums_bit_for_bit() {
        use crate::backend::cpu::elementwise::{bias_gelu_inplace, bias_gelu_saving_grad, RowFactors};
        let mut rng = Rng(77);
        for &(rows, dim) in &[(1, 3), (37, 8), (300, 192), (130, 768)] {
            let dacc = rng.vec(rows * dim, -1.0, 1.0);
            let y = rng.vec(rows * dim, -1.0, 1.0);
            let bias = rng.vec(dim, -0.5, 0.5);
            let scale = rng.vec(dim, 0.1, 1.5);
            let factors = [0.0f32, 1.25];
            let rf = (rows % 2 == 0).then(|| RowFactors { factors: &factors, rows_each: rows / 2 });
            for with_scale in [false, true] {
                let (mut dy, mut ds, mut db) = (vec![0.0f32; rows * dim], vec![0.5f32; dim], vec![0.25f32; dim]);
                let ds_opt = with_scale.then_some(&mut ds[..]);
                residual_add_backward(&mut dy, ds_opt, Some(&mut db), &dacc, &y, &bias, &scale, rf);
                let (mut dy_plain, mut ds_plain) = (vec![0.0f32; rows * dim], vec![0.5f32; dim]);
                residual_add_backward(
                    &mut dy_plain,
                    with_scale.then_some(&mut ds_plain[..]),
                    None,
                    &dacc,
                    &y,
                    &bias,
                    &scale,
                    rf,
                );
                assert_eq!(dy, dy_plain, "dy ({rows}x{dim}, scale {with_scale})");
                assert_eq!(ds, ds_plain, "dscale ({rows}x{dim})");
                let mut want = vec![0.25f32; dim];
                column_sums_accumulate(&mut want, &dy);
                assert_eq!(db, want, "dbias ({rows}x{dim}, scale {with_scale})");
            }
            let pre = rng.vec(rows * dim, -4.0, 4.0);
            // The training forward saves GELU' in place of its input.
            let (mut saved, mut out) = (pre.clone(), vec![0.0f32; rows * dim]);
            bias_gelu_saving_grad(&mut saved, &mut out, &bias);
            let mut out_inplace = pre.clone();
            bias_gelu_inplace(&mut out_inplace, Some(&bias), dim);
            assert_eq!(out, out_inplace, "gelu forward ({rows}x{dim})");
            let pre_b: Vec<f32> = pre.iter().enumerate().map(|(i, &v)| v + bias[i % dim]).collect();
            let (mut dx, mut db) = (vec![0.0f32; rows * dim], vec![0.25f32; dim]);
            gelu_backward_saved(&mut dx, &mut db, &dacc, &saved);
            let pre = pre_b;
            let mut dx_plain = vec![0.0f32; rows * dim];
            gelu_backward(&mut dx_plain, &dacc, &pre);
            assert_eq!(dx, dx_plain, "gelu dx ({rows}x{dim})");
            let mut want = vec![0.25f32; dim];
            column_sums_accumulate(&mut want, &dx);
            assert_eq!(db, want, "gelu dbias ({rows}x{dim})");
        }
    }

    #[test]
    fn layernorm_backward_accumulate_adds_the_overwritten_result() {
        let mut rng = Rng(21);
        let (rows, dim) = (19, 7);
        let x = rng.vec(rows * dim, -2.0, 2.0);
        let dy = rng.vec(rows * dim, -1.0, 1.0);
        let gamma = rng.vec(dim, 0.5, 1.5);
        let base = rng.vec(rows * dim, -1.0, 1.0);
        let (mut g1, mut b1, mut g2, mut b2) = (vec![0.0; dim], vec![0.0; dim], vec![0.0; dim], vec![0.0; dim]);
        let mut over = vec![0.0f32; rows * dim];
        layernorm_backward(&mut over, &mut g1, &mut b1, &dy, &x, &gamma, dim, 1e-5, DxMode::Overwrite);
        let mut acc = base.clone();
        layernorm_backward(&mut acc, &mut g2, &mut b2, &dy, &x, &gamma, dim, 1e-5, DxMode::Accumulate);
        for i in 0..rows * dim {
            assert_eq!(acc[i], base[i] + over[i]);
        }
        assert_eq!((g1, b1), (g2, b2));
    }

    fn layernorm_ref(x: &[f64], gamma: &[f64], beta: &[f64], dim: usize, eps: f64) -> Vec<f64> {
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks_exact(dim) {
            let mean = row.iter().sum::<f64>() / dim as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / dim as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            for ((v, g), b) in row.iter().zip(gamma).zip(beta) {
                y.push((v - mean) * rstd * g + b);
            }
        }
        y
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (rows, dim, eps) = (5, 24, 1e-5f32);
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let x = rng.vec(rows * dim, -2.0, 2.0);
        let gamma = rng.vec(dim, 0.5, 1.5);
        let beta = rng.vec(dim, -0.5, 0.5);
        let r = rng.vec(rows * dim, -1.0, 1.0);
        let mut dx = vec![f32::NAN; rows * dim];
        let mut dgamma = vec![0.0; dim];
        let mut dbeta = vec![0.0; dim];
        layernorm_backward(&mut dx, &mut dgamma, &mut dbeta, &r, &x, &gamma, dim, eps, DxMode::Overwrite);

        let inputs = vec![to64(&x), to64(&gamma), to64(&beta)];
        let f = |v: &[Vec<f64>]| loss(&r, &layernorm_ref(&v[0], &v[1], &v[2], dim, eps as f64));
        check("layernorm dx", &dx, &fd_grad(&inputs, 0, &f), 1e-3);
        check("layernorm dgamma", &dgamma, &fd_grad(&inputs, 1, &f), 1e-3);
        check("layernorm dbeta", &dbeta, &fd_grad(&inputs, 2, &f), 1e-3);
    }

    fn gelu_ref(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        let mut rng = Rng(0x0fed_cba9_8765_4321);
        let mut pre = rng.vec(200, -6.0, 6.0);
        pre.extend_from_slice(&[0.0, 1e-4, -1e-4, 0.5, -0.5, 3.9, -3.9, 4.5, -4.5, 10.0, -10.0]);
        let r = rng.vec(pre.len(), -1.0, 1.0);
        let mut dx = vec![f32::NAN; pre.len()];
        gelu_backward(&mut dx, &r, &pre);
        let inputs = vec![to64(&pre)];
        let f = |v: &[Vec<f64>]| r.iter().zip(&v[0]).map(|(&r, &x)| r as f64 * gelu_ref(x)).sum::<f64>();
        check("gelu dx", &dx, &fd_grad(&inputs, 0, &f), 1e-3);
        // Large inputs: identity gradient far right, zero far left.
        let mut d = [0.0f32; 2];
        gelu_backward(&mut d, &[1.0, 1.0], &[50.0, -50.0]);
        assert!((d[0] - 1.0).abs() < 1e-6 && d[1].abs() < 1e-6, "{d:?}");
    }

    fn linear_ref(x: &[f64], w: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = b[j] + (0..k).map(|p| x[i * k + p] * w[j * k + p]).sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (m, k, n) = (9, 13, 7);
        let mut rng = Rng(0xdead_beef_cafe_f00d);
        let x = rng.vec(m * k, -1.0, 1.0);
        let w = rng.vec(n * k, -1.0, 1.0);
        let b = rng.vec(n, -1.0, 1.0);
        let r = rng.vec(m * n, -1.0, 1.0);
        let mut dx = vec![f32::NAN; m * k];
        let mut dw = vec![0.0; n * k];
        let mut db = vec![0.0; n];
        linear_backward(Some(&mut dx), &mut dw, Some(&mut db), &r, &x, &w, m, k, n);

        let inputs = vec![to64(&x), to64(&w), to64(&b)];
        let f = |v: &[Vec<f64>]| loss(&r, &linear_ref(&v[0], &v[1], &v[2], m, k, n));
        check("linear dx", &dx, &fd_grad(&inputs, 0, &f), 1e-3);
        check("linear dw", &dw, &fd_grad(&inputs, 1, &f), 1e-3);
        check("linear db", &db, &fd_grad(&inputs, 2, &f), 1e-3);
    }

    fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|a| a.to_bits()).collect()
    }

    #[test]
    fn parameter_reductions_are_deterministic_across_thread_counts() {
        let (rows, dim) = (1000, 64); // 128 rows per chunk → 8 chunks
        let mut rng = Rng(0x5555_aaaa_3333_cccc);
        let x = rng.vec(rows * dim, -3.0, 3.0);
        let dy = rng.vec(rows * dim, -1.0, 1.0);
        let gamma = rng.vec(dim, 0.5, 1.5);
        let run_ln = |threads| {
            in_pool(threads, || {
                let mut dx = vec![0.0; rows * dim];
                let mut dg = vec![0.0; dim];
                let mut dbt = vec![0.0; dim];
                layernorm_backward(&mut dx, &mut dg, &mut dbt, &dy, &x, &gamma, dim, 1e-6, DxMode::Overwrite);
                (bits(&dx), bits(&dg), bits(&dbt))
            })
        };
        let one = run_ln(1);
        let four = run_ln(4);
        assert_eq!(one.1, four.1, "dgamma differs between 1 and 4 threads");
        assert_eq!(one.2, four.2, "dbeta differs between 1 and 4 threads");
        assert_eq!(one.0, four.0, "dx differs between 1 and 4 threads");

        let (m, n) = (1000, 48);
        let dy = rng.vec(m * n, -1.0, 1.0);
        let run_db = |threads| {
            in_pool(threads, || {
                let mut db = vec![0.0; n];
                column_sums_accumulate(&mut db, &dy);
                bits(&db)
            })
        };
        assert_eq!(run_db(1), run_db(4), "db differs between 1 and 4 threads");
    }

    #[test]
    fn parameter_gradients_accumulate() {
        let (rows, dim) = (300, 32);
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let x = rng.vec(rows * dim, -2.0, 2.0);
        let dy = rng.vec(rows * dim, -1.0, 1.0);
        let gamma = rng.vec(dim, 0.5, 1.5);
        let mut dx = vec![0.0; rows * dim];
        let (mut dg, mut dbt) = (vec![0.0; dim], vec![0.0; dim]);
        layernorm_backward(&mut dx, &mut dg, &mut dbt, &dy, &x, &gamma, dim, 1e-5, DxMode::Overwrite);
        let (dg1, dbt1, dx1) = (dg.clone(), dbt.clone(), dx.clone());
        layernorm_backward(&mut dx, &mut dg, &mut dbt, &dy, &x, &gamma, dim, 1e-5, DxMode::Overwrite);
        assert_eq!(dx, dx1, "dx must be overwritten, not accumulated");
        assert_eq!(dg, dg1.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
        assert_eq!(dbt, dbt1.iter().map(|v| 2.0 * v).collect::<Vec<_>>());

        let (m, k, n) = (70, 40, 30);
        let x = rng.vec(m * k, -1.0, 1.0);
        let w = rng.vec(n * k, -1.0, 1.0);
        let dy = rng.vec(m * n, -1.0, 1.0);
        let mut dx = vec![0.0; m * k];
        let (mut dw, mut db) = (vec![0.0; n * k], vec![0.0; n]);
        linear_backward(Some(&mut dx), &mut dw, Some(&mut db), &dy, &x, &w, m, k, n);
        let (dw1, db1, dx1) = (dw.clone(), db.clone(), dx.clone());
        linear_backward(Some(&mut dx), &mut dw, Some(&mut db), &dy, &x, &w, m, k, n);
        assert_eq!(dx, dx1, "dx must be overwritten, not accumulated");
        assert_eq!(db, db1.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
        for (a, b) in dw.iter().zip(&dw1) {
            assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1.0), "dw: {a} vs 2·{b}");
        }
        // Without dx and db only dw moves.
        linear_backward(None, &mut dw, None, &dy, &x, &w, m, k, n);
        assert_eq!(db, db1.iter().map(|v| 2.0 * v).collect::<Vec<_>>());
        for (a, b) in dw.iter().zip(&dw1) {
            assert!((a - 3.0 * b).abs() <= 1e-5 * b.abs().max(1.0), "dw: {a} vs 3·{b}");
        }
    }
}
