//! The dVAE's discrete bottleneck, on token-major code logits `[R, V]` (one row per grid
//! position): the Gumbel-softmax relaxation (Jang et al. 2017, as DALL-E trains its dVAE), the KL
//! divergence of the encoder's code distribution to the uniform prior, the hard argmax that
//! tokenizes, and the codebook perplexity that says how many codes are in use.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::backend::cpu::math::{self, simd_dispatch};

simd_dispatch! {
    /// Row-wise softmax of `x / tau`, in place.
    fn softmax_in_place(x: &mut [f32], tau: f32) {
        let inv = 1.0 / tau;
        let max = math::max(x);
        for v in x.iter_mut() {
            *v = math::exp((*v - max) * inv);
        }
        let inv_sum = 1.0 / math::sum(x);
        for v in x.iter_mut() {
            *v *= inv_sum;
        }
    }
}

simd_dispatch! {
    /// `out = logits + g` with g = −ln(−ln u) from 24-bit uniforms `u = (bits >> 8 + ½) / 2^24`,
    /// which are strictly inside (0, 1), so both logarithms are finite.
    fn add_gumbel(out: &mut [f32], logits: &[f32], bits: &[u32]) {
        for ((o, &l), &r) in out.iter_mut().zip(logits).zip(bits) {
            let u = ((r >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0);
            *o = l - math::ln(-math::ln(u));
        }
    }
}

/// The noise stream of row `row` at `step`: ChaCha8 keyed by the seed and step, one stream per
/// row, so the noise is the same whatever the thread count.
fn row_rng(seed: u64, step: u64, row: usize) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&step.to_le_bytes());
    key[16..24].copy_from_slice(b"gumbelsm");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(row as u64);
    rng
}

/// Relaxed one-hot codes `y = softmax((logits + g) / tau)` with `g` standard Gumbel noise
/// (`−ln(−ln u)`, u uniform in (0, 1)) drawn from (`seed`, `step`).
pub fn gumbel_softmax(logits: &[f32], vocab: usize, tau: f32, seed: u64, step: u64, out: &mut [f32]) {
    assert_eq!(logits.len(), out.len());
    assert!(tau > 0.0, "temperature must be positive");
    out.par_chunks_mut(vocab).zip(logits.par_chunks(vocab)).enumerate().for_each_init(
        || vec![0u32; vocab],
        |bits, (row, (o, l))| {
            row_rng(seed, step, row).fill(&mut bits[..]);
            add_gumbel(o, l, bits);
            softmax_in_place(o, tau);
        },
    );
}

/// Backward of [`gumbel_softmax`] given its output `y`: `dlogits = (1/τ) · y ⊙ (dy − Σ y·dy)`
/// (the noise is a constant), overwriting `dlogits`.
pub fn gumbel_softmax_backward(y: &[f32], dy: &[f32], vocab: usize, tau: f32, dlogits: &mut [f32]) {
    assert_eq!(y.len(), dy.len());
    assert_eq!(y.len(), dlogits.len());
    let inv_tau = 1.0 / tau;
    dlogits.par_chunks_mut(vocab).zip(y.par_chunks(vocab).zip(dy.par_chunks(vocab))).for_each(|(d, (yr, dyr))| {
        let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
        for ((o, &a), &b) in d.iter_mut().zip(yr).zip(dyr) {
            *o = inv_tau * a * (b - dot);
        }
    });
}

simd_dispatch! {
    /// One row of [`kl_to_uniform`]: returns `Σ q ln q` and, with `weight ≠ 0`, adds
    /// `weight · q ⊙ (ln q − Σ q ln q)` to `d`. `q` is scratch of the row's length.
    fn kl_row(l: &[f32], q: &mut [f32], d: Option<&mut [f32]>, weight: f32) -> f64 {
        let max = math::max(l);
        for (p, &v) in q.iter_mut().zip(l) {
            *p = math::exp(v - max);
        }
        let sum = math::sum(q);
        // ln q = l − lse, from the logits: ln of a tiny q would underflow.
        let lse = max + math::ln(sum);
        let inv_sum = 1.0 / sum;
        let mut neg_entropy = 0.0f32;
        for (p, &v) in q.iter_mut().zip(l) {
            *p *= inv_sum;
            neg_entropy += *p * (v - lse);
        }
        if let Some(d) = d {
            for ((o, &p), &v) in d.iter_mut().zip(q.iter()).zip(l) {
                *o += weight * p * (v - lse - neg_entropy);
            }
        }
        neg_entropy as f64
    }
}

/// Mean over rows of `KL(softmax(logits) ‖ uniform) = Σ q ln q + ln V`; with `dlogits`, adds
/// `weight ·` its gradient, `weight · q ⊙ (ln q − Σ q ln q) / R`.
pub fn kl_to_uniform(logits: &[f32], vocab: usize, weight: f32, dlogits: Option<&mut [f32]>) -> f64 {
    let rows = logits.len() / vocab;
    let row_weight = weight / rows.max(1) as f32;
    let parts: Vec<f64> = match dlogits {
        Some(d) => {
            assert_eq!(d.len(), logits.len());
            logits
                .par_chunks(vocab)
                .zip(d.par_chunks_mut(vocab))
                .map_init(|| vec![0.0f32; vocab], |q, (l, dr)| kl_row(l, q, Some(dr), row_weight))
                .collect()
        }
        None => logits.par_chunks(vocab).map_init(|| vec![0.0f32; vocab], |q, l| kl_row(l, q, None, 0.0)).collect(),
    };
    // Summed in row order: the same bits for any thread count.
    parts.iter().sum::<f64>() / rows.max(1) as f64 + (vocab as f64).ln()
}

/// The index of each row's largest logit (the first one on ties, like `torch.argmax`).
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .par_chunks(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

/// Codebook perplexity `exp(−Σ p ln p)` of the code histogram: 1 when one code is used
/// everywhere, the number of codes when used uniformly.
pub fn perplexity(tokens: &[u32], vocab: usize) -> f64 {
    if tokens.is_empty() {
        return 0.0;
    }
    let mut counts = vec![0u64; vocab];
    for &t in tokens {
        counts[t as usize] += 1;
    }
    let n = tokens.len() as f64;
    let entropy: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| -(c as f64 / n) * (c as f64 / n).ln()).sum();
    entropy.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central differences of `f` at `x` along every coordinate.
    fn numeric_grad(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        let h = 1e-2f32;
        (0..x.len())
            .map(|i| {
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[i] += h;
                b[i] -= h;
                (f(&a) - f(&b)) / (2.0 * h as f64)
            })
            .collect()
    }

    fn logits(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.3).collect()
    }

    #[test]
    fn kl_gradient_matches_finite_differences() {
        let (vocab, x) = (7, logits(21));
        let mut d = vec![0.0; x.len()];
        let kl = kl_to_uniform(&x, vocab, 2.0, Some(&mut d));
        assert!(kl > 0.0);
        let num = numeric_grad(&x, |l| 2.0 * kl_to_uniform(l, vocab, 0.0, None));
        for (a, n) in d.iter().zip(&num) {
            assert!((*a as f64 - n).abs() < 1e-3, "{a} vs {n}");
        }
        // Uniform logits: KL 0 exactly (hand-derived).
        assert!(kl_to_uniform(&[0.5; 8], 4, 1.0, None).abs() < 1e-7);
    }

    #[test]
    fn gumbel_softmax_backward_matches_finite_differences() {
        let (vocab, tau, x) = (5, 0.7, logits(15));
        let r: Vec<f32> = (0..15).map(|i| (i as f32 * 0.37).sin()).collect();
        let loss = |l: &[f32]| {
            let mut y = vec![0.0; l.len()];
            gumbel_softmax(l, vocab, tau, 3, 9, &mut y);
            y.iter().zip(&r).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut y = vec![0.0; x.len()];
        gumbel_softmax(&x, vocab, tau, 3, 9, &mut y);
        let mut d = vec![0.0; x.len()];
        gumbel_softmax_backward(&y, &r, vocab, tau, &mut d);
        let num = numeric_grad(&x, loss);
        for (a, n) in d.iter().zip(&num) {
            assert!((*a as f64 - n).abs() < 2e-3, "{a} vs {n}");
        }
        // Rows are distributions.
        for row in y.chunks(vocab) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn gumbel_noise_is_the_standard_distribution() {
        // With all-zero logits and τ = 1, the argmax of logits + g is uniform over codes.
        let (vocab, rows) = (4, 20_000);
        let zeros = vec![0.0f32; vocab * rows];
        let mut y = vec![0.0; zeros.len()];
        gumbel_softmax(&zeros, vocab, 1.0, 11, 0, &mut y);
        let counts = argmax_rows(&y, vocab).iter().fold(vec![0usize; vocab], |mut c, &t| {
            c[t as usize] += 1;
            c
        });
        for c in counts {
            assert!((c as f64 / rows as f64 - 0.25).abs() < 0.015, "{c}");
        }
        // ln y_0 − ln y_1 = g_0 − g_1, a difference of two standard Gumbels: logistic, with
        // mean 0 and variance π²/3.
        let diffs: Vec<f64> = y.chunks(vocab).map(|r| (r[0] as f64).ln() - (r[1] as f64).ln()).collect();
        let mean = diffs.iter().sum::<f64>() / rows as f64;
        let var = diffs.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / rows as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        assert!((var - std::f64::consts::PI.powi(2) / 3.0).abs() < 0.15, "{var}");
    }

    #[test]
    fn perplexity_hand_derived() {
        assert_eq!(perplexity(&[3, 3, 3], 8), 1.0);
        assert!((perplexity(&[0, 1, 2, 3], 8) - 4.0).abs() < 1e-12);
        assert_eq!(argmax_rows(&[1.0, 3.0, 3.0, 0.0, 2.0, 1.0], 3), vec![1, 1]);
    }
}
