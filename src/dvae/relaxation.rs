//! The dVAE's discrete bottleneck, on token-major code logits `[R, V]` (one row per grid
//! position): the Gumbel-softmax relaxation (Jang et al. 2017, as DALL-E trains its dVAE), the KL
//! divergence of the encoder's code distribution to the uniform prior, the hard argmax that
//! tokenizes ([`CodeOps`], which the training step and tokenizing run on planned views; the
//! functions here run one op on host slices), and the codebook perplexity that says how many
//! codes are in use.

use crate::backend::code_ops::CodeOps;
use crate::backend::memory::{Arena, HostMemory, Planner, View};
use crate::backend::Backend;
use crate::context::host_backend;
use crate::error::Result;

/// Host memory holding one float view per length.
fn host_views<const N: usize>(lens: [usize; N]) -> ([View; N], Arena) {
    let mut plan = Planner::shared();
    let views = lens.map(|l| plan.act(l));
    (views, Arena::new(&plan).expect("the host memory of a code op"))
}

/// Relaxed one-hot codes `y = softmax((logits + g) / tau)` with `g` standard Gumbel noise
/// (`−ln(−ln u)`, u uniform in (0, 1)) drawn from (`seed`, `step`), on the host backend
/// ([`CodeOps::gumbel_softmax`]).
pub fn gumbel_softmax(logits: &[f32], vocab: usize, tau: f32, seed: u64, step: u64, out: &mut [f32]) {
    assert_eq!(logits.len(), out.len());
    let ([l, o], mut arena) = host_views([logits.len(), out.len()]);
    let be = host_backend();
    let mut m = HostMemory::new(&mut arena, &[], &mut []);
    let mut run = |m: &mut HostMemory<'_>| -> Result<()> {
        be.upload(m, l, logits)?;
        be.gumbel_softmax(m, o, l, vocab, tau, seed, step)?;
        be.download(m, o, out)
    };
    run(&mut m).expect("host ops");
}

/// Backward of [`gumbel_softmax`] given its output `y`: `dlogits = (1/τ) · y ⊙ (dy − Σ y·dy)`
/// (the noise is a constant), overwriting `dlogits`; on the host backend.
pub fn gumbel_softmax_backward(y: &[f32], dy: &[f32], vocab: usize, tau: f32, dlogits: &mut [f32]) {
    assert_eq!(y.len(), dy.len());
    assert_eq!(y.len(), dlogits.len());
    let ([yv, dyv, d], mut arena) = host_views([y.len(), dy.len(), dlogits.len()]);
    let be = host_backend();
    let mut m = HostMemory::new(&mut arena, &[], &mut []);
    let mut run = |m: &mut HostMemory<'_>| -> Result<()> {
        be.upload(m, yv, y)?;
        be.upload(m, dyv, dy)?;
        be.gumbel_softmax_backward(m, d, yv, dyv, vocab, tau)?;
        be.download(m, d, dlogits)
    };
    run(&mut m).expect("host ops");
}

/// Mean over rows of `KL(softmax(logits) ‖ uniform) = Σ q ln q + ln V`; with `dlogits`, adds
/// `weight ·` its gradient, `weight · q ⊙ (ln q − Σ q ln q) / R`. On the host backend.
pub fn kl_to_uniform(logits: &[f32], vocab: usize, weight: f32, dlogits: Option<&mut [f32]>) -> f64 {
    let ([l, d], mut arena) = host_views([logits.len(), dlogits.as_ref().map_or(0, |d| d.len())]);
    let be = host_backend();
    let mut m = HostMemory::new(&mut arena, &[], &mut []);
    let run = |m: &mut HostMemory<'_>| -> Result<f64> {
        be.upload(m, l, logits)?;
        match dlogits {
            Some(dst) => {
                be.upload(m, d, dst)?;
                be.kl_to_uniform(m, l, Some(d), vocab, weight)?;
                be.download(m, d, dst)?;
            }
            None => be.kl_to_uniform(m, l, None, vocab, weight)?,
        }
        be.take_loss(m)
    };
    run(&mut m).expect("host ops")
}

/// The index of each row's largest logit (the first one on ties, like `torch.argmax`), on the
/// host backend.
pub fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    let ([l], mut arena) = host_views([logits.len()]);
    let be = host_backend();
    let mut m = HostMemory::new(&mut arena, &[], &mut []);
    let mut tokens = vec![0; logits.len() / vocab];
    let mut run = |m: &mut HostMemory<'_>| -> Result<()> {
        be.upload(m, l, logits)?;
        be.argmax_rows(m, l, vocab, &mut tokens)
    };
    run(&mut m).expect("host ops");
    tokens
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
