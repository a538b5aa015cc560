//! Layer norm over the last dimension, PyTorch's definition: biased variance, eps inside the
//! square root. Statistics in f32 over each row, rows spread over the pool.

use rayon::prelude::*;

use super::math::{self, simd_dispatch};
use super::rows_per_task;

simd_dispatch! {
    fn layernorm_rows(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], dim: usize, eps: f32) {
        for (o, row) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let mean = math::sum(row) / dim as f32;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - mean) * (v - mean);
            }
            let var = math::sum(o) / dim as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in o.iter_mut().zip(row).zip(gamma).zip(beta) {
                *o = (v - mean) * rstd * g + b;
            }
        }
    }
}

/// `out[r] = (x[r] - mean) / sqrt(var + eps) * gamma + beta` for every row of length `dim`.
pub fn layernorm(out: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], dim: usize, eps: f32) {
    assert_eq!(out.len(), x.len());
    assert_eq!(x.len() % dim, 0);
    assert_eq!(gamma.len(), dim);
    assert_eq!(beta.len(), dim);
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).for_each(|(o, xs)| layernorm_rows(o, xs, gamma, beta, dim, eps));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_row() {
        let x = vec![1.0f32, 2.0, 3.0, 4.0, -1.0, 0.0, 1.0, 2.0];
        let mut out = vec![0.0; 8];
        layernorm(&mut out, &x, &[1.0; 4], &[0.0; 4], 4, 1e-5);
        // mean 2.5, var 1.25 → (x - 2.5)/sqrt(1.25 + 1e-5)
        let s = (1.25f32 + 1e-5).sqrt();
        assert!((out[0] + 1.5 / s).abs() < 1e-6);
        assert!((out[3] - 1.5 / s).abs() < 1e-6);
        assert!((out[4] + 1.5 / s).abs() < 1e-6);
        let mut out2 = vec![0.0; 8];
        layernorm(&mut out2, &x, &[2.0; 4], &[1.0; 4], 4, 1e-5);
        assert!((out2[0] - (2.0 * out[0] + 1.0)).abs() < 1e-6);
    }
}
