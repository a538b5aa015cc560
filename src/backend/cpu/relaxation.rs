//! Row-wise kernels of the tokenizer's discrete bottleneck on token-major code logits `[R, V]`:
//! the Gumbel-softmax relaxation and its backward, the KL divergence to the uniform prior (with
//! its gradient), and the hard argmax. Rows run in parallel; sums over rows are added in row
//! order, so results do not depend on the thread count.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::math::{self, simd_dispatch};

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
    let mut out = vec![0; logits.len() / vocab];
    argmax_rows_into(logits, vocab, &mut out);
    out
}

/// [`argmax_rows`] into `out` (one per row).
pub fn argmax_rows_into(logits: &[f32], vocab: usize, out: &mut [u32]) {
    assert_eq!(out.len() * vocab, logits.len(), "argmax_rows: one output per row");
    out.par_iter_mut().zip(logits.par_chunks(vocab)).for_each(|(o, row)| {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        *o = best as u32;
    });
}
