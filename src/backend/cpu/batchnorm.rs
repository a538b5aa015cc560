//! PyTorch `BatchNorm2d` on NCHW f32 tensors: evaluation (running statistics), training
//! (statistics of the batch, biased variance for normalising, unbiased variance for the running
//! update with `momentum`), and the training backward.
//!
//! Per-channel sums are accumulated in f64 in a fixed order (image, then pixel), so results do
//! not depend on the thread count; channels run in parallel.

use rayon::prelude::*;

use super::SendPtr;

pub use crate::backend::shapes::BnShape;

impl BnShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// The contiguous runs of channel `c`: one `plane`-long run per image.
    fn runs(&self, c: usize) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.batch).map(move |b| {
            let start = (b * self.channels + c) * self.plane;
            start..start + self.plane
        })
    }
}

/// Per-channel statistics of one training forward, kept for the backward.
#[derive(Debug, Clone, Default)]
pub struct BnBatchStats {
    pub mean: Vec<f32>,
    /// 1 / sqrt(biased variance + eps).
    pub invstd: Vec<f32>,
    /// Unbiased variance (what the running average takes).
    pub var_unbiased: Vec<f32>,
}

/// Evaluation mode: `out = (x − running_mean) / sqrt(running_var + eps) · gamma + beta`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval(
    shape: BnShape,
    x: &[f32],
    out: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) {
    assert_eq!(x.len(), shape.len(), "batchnorm_eval: x length");
    assert_eq!(out.len(), x.len(), "batchnorm_eval: out length");
    let c = shape.channels;
    out.par_chunks_mut(shape.plane.max(1)).zip(x.par_chunks(shape.plane.max(1))).enumerate().for_each(
        |(i, (o, xi))| {
            let ch = i % c;
            let invstd = 1.0 / (running_var[ch] + eps).sqrt();
            let (scale, shift) = (gamma[ch] * invstd, beta[ch] - running_mean[ch] * gamma[ch] * invstd);
            for (o, &v) in o.iter_mut().zip(xi) {
                *o = v * scale + shift;
            }
        },
    );
}

/// Training mode: normalises with the batch's per-channel mean and biased variance, returns the
/// statistics (mean, 1/std, unbiased variance). Needs more than one value per channel, as
/// PyTorch does.
pub fn batchnorm_train_forward(
    shape: BnShape,
    x: &[f32],
    out: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> BnBatchStats {
    let c = shape.channels;
    let mut saved = vec![0.0; 3 * c];
    batchnorm_train_forward_saving(shape, x, out, gamma, beta, eps, &mut saved);
    BnBatchStats { mean: saved[..c].to_vec(), invstd: saved[c..2 * c].to_vec(), var_unbiased: saved[2 * c..].to_vec() }
}

/// [`batchnorm_train_forward`] keeping the statistics in `saved` (`[3, channels]`: mean, 1/std,
/// unbiased variance) instead of returning them.
pub fn batchnorm_train_forward_saving(
    shape: BnShape,
    x: &[f32],
    out: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    saved: &mut [f32],
) {
    assert_eq!(saved.len(), 3 * shape.channels, "batchnorm_train_forward: saved length");
    assert_eq!(x.len(), shape.len(), "batchnorm_train_forward: x length");
    assert_eq!(out.len(), x.len(), "batchnorm_train_forward: out length");
    let n = shape.batch * shape.plane;
    assert!(n > 1, "batchnorm_train_forward: expected more than 1 value per channel when training");
    let stats: Vec<(f32, f32, f32)> = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let mut sum = 0.0f64;
            for r in shape.runs(c) {
                sum += x[r].iter().map(|&v| v as f64).sum::<f64>();
            }
            let mean = sum / n as f64;
            let mut sq = 0.0f64;
            for r in shape.runs(c) {
                sq += x[r].iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>();
            }
            let var = sq / n as f64;
            let invstd = 1.0 / (var + eps as f64).sqrt();
            (mean as f32, invstd as f32, (sq / (n - 1) as f64) as f32)
        })
        .collect();
    let ptr = SendPtr(out.as_mut_ptr());
    (0..shape.channels).into_par_iter().for_each(|c| {
        let (mean, invstd, _) = stats[c];
        let (scale, shift) = (gamma[c] * invstd, beta[c] - mean * gamma[c] * invstd);
        let ptr = ptr;
        for r in shape.runs(c) {
            // SAFETY: channel c's runs are disjoint from every other channel's.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r.start), r.len()) };
            for (o, &v) in o.iter_mut().zip(&x[r]) {
                *o = v * scale + shift;
            }
        }
    });
    let c = shape.channels;
    for (i, s) in stats.iter().enumerate() {
        (saved[i], saved[c + i], saved[2 * c + i]) = *s;
    }
}

/// PyTorch's running update: `r = (1 − momentum)·r + momentum·batch` for the mean and the
/// unbiased variance.
pub fn update_running_stats(running_mean: &mut [f32], running_var: &mut [f32], stats: &BnBatchStats, momentum: f32) {
    update_running_stats_from(running_mean, running_var, &stats.mean, &stats.var_unbiased, momentum);
}

/// [`update_running_stats`] from the batch mean and unbiased variance.
pub fn update_running_stats_from(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &[f32],
    var_unbiased: &[f32],
    momentum: f32,
) {
    for (r, &m) in running_mean.iter_mut().zip(mean) {
        *r = (1.0 - momentum) * *r + momentum * m;
    }
    for (r, &v) in running_var.iter_mut().zip(var_unbiased) {
        *r = (1.0 - momentum) * *r + momentum * v;
    }
}

/// Backward of [`batchnorm_train_forward`]: with `x̂ = (x − mean)·invstd`,
/// `dβ += Σ dy`, `dγ += Σ dy·x̂`, and `dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))`
/// (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_backward(
    shape: BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    stats: &BnBatchStats,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    batchnorm_train_backward_from(shape, x, dy, gamma, &stats.mean, &stats.invstd, dx, dgamma, dbeta);
}

/// [`batchnorm_train_backward`] from the forward's batch mean and 1/std.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_backward_from(
    shape: BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert_eq!(x.len(), shape.len(), "batchnorm_train_backward: x length");
    assert_eq!(dy.len(), x.len(), "batchnorm_train_backward: dy length");
    assert_eq!(dx.len(), x.len(), "batchnorm_train_backward: dx length");
    let n = (shape.batch * shape.plane) as f64;
    let sums: Vec<(f64, f64)> = (0..shape.channels)
        .into_par_iter()
        .map(|c| {
            let (mean, invstd) = (mean[c] as f64, invstd[c] as f64);
            let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
            for r in shape.runs(c) {
                for (&g, &v) in dy[r.clone()].iter().zip(&x[r]) {
                    sdy += g as f64;
                    sdyx += g as f64 * (v as f64 - mean) * invstd;
                }
            }
            (sdy, sdyx)
        })
        .collect();
    for c in 0..shape.channels {
        dbeta[c] += sums[c].0 as f32;
        dgamma[c] += sums[c].1 as f32;
    }
    let ptr = SendPtr(dx.as_mut_ptr());
    (0..shape.channels).into_par_iter().for_each(|c| {
        let (mean, invstd) = (mean[c], invstd[c]);
        let (mdy, mdyx) = ((sums[c].0 / n) as f32, (sums[c].1 / n) as f32);
        let k = gamma[c] * invstd;
        let ptr = ptr;
        for r in shape.runs(c) {
            // SAFETY: channel c's runs are disjoint from every other channel's.
            let d = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r.start), r.len()) };
            for ((d, &g), &v) in d.iter_mut().zip(&dy[r.clone()]).zip(&x[r]) {
                let xhat = (v - mean) * invstd;
                *d = k * (g - mdy - xhat * mdyx);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32 * 2_654_435_761u32) ^ seed) % 1000) as f32 / 250.0 - 2.0).collect()
    }

    #[test]
    fn eval_matches_formula() {
        let shape = BnShape { batch: 2, channels: 3, plane: 4 };
        let x = data(24, 1);
        let (g, b, m, v) = ([1.5, -0.5, 2.0], [0.1, 0.2, -0.3], [0.3, -1.0, 0.0], [0.5, 2.0, 1.0]);
        let mut out = vec![0.0; 24];
        batchnorm_eval(shape, &x, &mut out, &g, &b, &m, &v, 1e-5);
        for (i, &o) in out.iter().enumerate() {
            let c = (i / 4) % 3;
            let want = (x[i] - m[c]) / (v[c] + 1e-5f32).sqrt() * g[c] + b[c];
            assert!((o - want).abs() < 1e-5, "{i}: {o} vs {want}");
        }
    }

    #[test]
    fn train_stats_and_running_update() {
        // Channel 0 of a [2, 1, 2] input holds 1, 2 (image 0) and 3, 6 (image 1): mean 3,
        // biased variance (4 + 1 + 0 + 9) / 4 = 3.5, unbiased 14 / 3.
        let shape = BnShape { batch: 2, channels: 1, plane: 2 };
        let x = [1.0, 2.0, 3.0, 6.0];
        let mut out = [0.0; 4];
        let s = batchnorm_train_forward(shape, &x, &mut out, &[1.0], &[0.0], 0.0);
        assert!((s.mean[0] - 3.0).abs() < 1e-6);
        assert!((s.invstd[0] - 1.0 / 3.5f32.sqrt()).abs() < 1e-6);
        assert!((s.var_unbiased[0] - 14.0 / 3.0).abs() < 1e-5);
        assert!((out[3] - 3.0 / 3.5f32.sqrt()).abs() < 1e-5);
        let (mut rm, mut rv) = ([1.0f32], [1.0f32]);
        update_running_stats(&mut rm, &mut rv, &s, 0.1);
        assert!((rm[0] - (0.9 + 0.3)).abs() < 1e-6);
        assert!((rv[0] - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-6);
    }

    #[test]
    fn train_backward_matches_finite_differences() {
        let shape = BnShape { batch: 3, channels: 2, plane: 5 };
        let n = 30;
        let x = data(n, 7);
        let r = data(n, 99); // loss = Σ r ⊙ out
        let (g, b) = ([0.7f32, -1.3], [0.2f32, 0.4]);
        let loss = |x: &[f32], g: &[f32], b: &[f32]| -> f64 {
            let mut out = vec![0.0; n];
            batchnorm_train_forward(shape, x, &mut out, g, b, 1e-5);
            out.iter().zip(&r).map(|(&o, &w)| o as f64 * w as f64).sum()
        };
        let mut out = vec![0.0; n];
        let stats = batchnorm_train_forward(shape, &x, &mut out, &g, &b, 1e-5);
        let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; 2], vec![0.0; 2]);
        batchnorm_train_backward(shape, &x, &r, &g, &stats, &mut dx, &mut dg, &mut db);
        let h = 1e-2f32;
        for i in 0..n {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &g, &b) - loss(&xm, &g, &b)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 2e-3, "dx[{i}]: {} vs fd {fd}", dx[i]);
        }
        for c in 0..2 {
            let (mut gp, mut gm) = (g, g);
            gp[c] += h;
            gm[c] -= h;
            let fd = (loss(&x, &gp, &b) - loss(&x, &gm, &b)) / (2.0 * h as f64);
            assert!((fd - dg[c] as f64).abs() < 1e-3, "dgamma[{c}]: {} vs {fd}", dg[c]);
            let (mut bp, mut bm) = (b, b);
            bp[c] += h;
            bm[c] -= h;
            let fd = (loss(&x, &g, &bp) - loss(&x, &g, &bm)) / (2.0 * h as f64);
            assert!((fd - db[c] as f64).abs() < 1e-3, "dbeta[{c}]: {} vs {fd}", db[c]);
        }
    }
}
