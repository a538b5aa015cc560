//! Softmax cross-entropy with label smoothing, fused with its logit gradient, for the
//! classification loss. It is PyTorch's `F.cross_entropy(logits, labels, label_smoothing=ε)`
//! (and timm's `LabelSmoothingCrossEntropy`, which BEiT fine-tuning uses): the target is
//! `(1 − ε)·onehot(y) + ε/K`, so per row
//!
//! `loss = −(1 − ε)·log p_y − (ε/K)·Σ_k log p_k`, `dloss/dx_k = p_k − ε/K − (1 − ε)·[k = y]`,
//!
//! averaged over the rows. Classification batches have few rows and few classes, so each row is
//! computed in f64, in row order (deterministic, no threads needed).

/// Mean label-smoothed cross-entropy of `logits` (`[rows, classes]`) against `labels`; on return
/// `logits` holds the gradient of that mean with respect to the logits. `smoothing` is ε in
/// [0, 1]; ε = 0 is the plain cross-entropy.
///
/// Panics if a label is out of range or the lengths disagree (callers validate at the API).
pub fn smoothed_cross_entropy_fused(logits: &mut [f32], labels: &[usize], classes: usize, smoothing: f32) -> f64 {
    if labels.is_empty() {
        assert!(logits.is_empty(), "smoothed_cross_entropy: logits length");
        return 0.0;
    }
    smoothed_cross_entropy_fused_part(logits, labels, classes, smoothing, labels.len()) / labels.len() as f64
}

/// [`smoothed_cross_entropy_fused`] for some rows of a larger batch of `total_rows` rows (a
/// data-parallel shard): the gradient written is that of the mean over all `total_rows`, and the
/// return value is the SUM of these rows' losses (the caller adds the parts and divides by
/// `total_rows`).
pub fn smoothed_cross_entropy_fused_part(
    logits: &mut [f32],
    labels: &[usize],
    classes: usize,
    smoothing: f32,
    total_rows: usize,
) -> f64 {
    assert_eq!(logits.len(), labels.len() * classes, "smoothed_cross_entropy: logits length");
    assert!(labels.iter().all(|&l| l < classes), "smoothed_cross_entropy: label out of range");
    assert!((0.0..=1.0).contains(&smoothing), "smoothed_cross_entropy: smoothing outside [0, 1]");
    assert!(total_rows >= labels.len(), "smoothed_cross_entropy: total_rows smaller than the part");
    let rows = total_rows as f64;
    let eps = smoothing as f64;
    let uniform = eps / classes as f64;
    let mut total = 0.0;
    for (row, &label) in logits.chunks_exact_mut(classes).zip(labels) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        let sum_logp: f64 = row.iter().map(|&v| v as f64 - lse).sum();
        total += -(1.0 - eps) * (row[label] as f64 - lse) - uniform * sum_logp;
        for (k, v) in row.iter_mut().enumerate() {
            let p = (*v as f64 - lse).exp();
            let target = uniform + if k == label { 1.0 - eps } else { 0.0 };
            *v = ((p - target) / rows) as f32;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss written from its definition (log-softmax, then the smoothed target), in f64.
    fn reference_loss(logits: &[f64], labels: &[usize], classes: usize, eps: f64) -> f64 {
        let mut total = 0.0;
        for (row, &y) in logits.chunks(classes).zip(labels) {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            for (k, &v) in row.iter().enumerate() {
                let target = eps / classes as f64 + if k == y { 1.0 - eps } else { 0.0 };
                total -= target * (v - lse);
            }
        }
        total / labels.len() as f64
    }

    #[test]
    fn hand_value_uniform_logits() {
        // Equal logits over K = 4: every log p = −ln 4, so the loss is ln 4 for any ε, and the
        // gradient is (1/4 − ε/4 − (1 − ε)[k = y]) / rows.
        let mut logits = vec![0.3f32; 8];
        let loss = smoothed_cross_entropy_fused(&mut logits, &[1, 3], 4, 0.1);
        assert!((loss - 4f64.ln()).abs() < 1e-9);
        assert!((logits[1] - (0.25 - 0.025 - 0.9) / 2.0).abs() < 1e-7);
        assert!((logits[0] - (0.25 - 0.025) / 2.0).abs() < 1e-7);
    }

    #[test]
    fn parts_add_up_to_the_whole_batch() {
        let x: Vec<f32> = (0..5 * 3).map(|i| ((i * 7 % 11) as f32 / 4.0) - 1.2).collect();
        let labels = [2usize, 0, 1, 1, 2];
        let mut whole = x.clone();
        let mean = smoothed_cross_entropy_fused(&mut whole, &labels, 3, 0.2);
        let mut parts = x.clone();
        let (a, b) = parts.split_at_mut(2 * 3);
        let sum = smoothed_cross_entropy_fused_part(a, &labels[..2], 3, 0.2, 5)
            + smoothed_cross_entropy_fused_part(b, &labels[2..], 3, 0.2, 5);
        assert!((sum / 5.0 - mean).abs() < 1e-12, "{} vs {mean}", sum / 5.0);
        // Each row's gradient is computed alike whichever part holds it.
        assert_eq!(parts, whole);
    }

    #[test]
    fn no_smoothing_is_the_plain_cross_entropy() {
        let x = [0.5f32, -1.0, 2.0, 0.25, 0.0, -0.5];
        let (mut a, mut b) = (x.to_vec(), x.to_vec());
        let la = smoothed_cross_entropy_fused(&mut a, &[2, 0], 3, 0.0);
        let lb = crate::backend::cpu::cross_entropy::cross_entropy_fused(&mut b, &[2, 0], 3);
        assert!((la - lb).abs() < 1e-6, "{la} vs {lb}");
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-7);
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        for eps in [0.0, 0.1, 0.5] {
            let (rows, classes) = (4, 5);
            let x: Vec<f64> = (0..rows * classes).map(|i| ((i * 29 % 17) as f64 / 5.0) - 1.7).collect();
            let labels = [4usize, 0, 2, 2];
            let mut g: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let loss = smoothed_cross_entropy_fused(&mut g, &labels, classes, eps as f32);
            assert!((loss - reference_loss(&x, &labels, classes, eps)).abs() < 1e-6, "eps {eps}");
            for i in 0..x.len() {
                let (mut up, mut down) = (x.clone(), x.clone());
                up[i] += 1e-5;
                down[i] -= 1e-5;
                let fd =
                    (reference_loss(&up, &labels, classes, eps) - reference_loss(&down, &labels, classes, eps)) / 2e-5;
                assert!((g[i] as f64 - fd).abs() < 1e-6, "eps {eps}, logit {i}: {} vs {fd}", g[i]);
            }
        }
    }
}
