//! Softmax cross-entropy fused with its gradient, for the MIM loss: one pass per row computes
//! the log-sum-exp, the loss, and overwrites the logits with dL/dlogits. Rows are the masked
//! positions only (the caller gathers them), and the loss is averaged over all of them, as
//! `nn.CrossEntropyLoss()` on `logits[bool_masked_pos]` does.

use rayon::prelude::*;

use super::math::{self, simd_dispatch};

simd_dispatch! {
    fn row_loss_and_grad(row: &mut [f32], label: usize, inv_rows: f32) -> f64 {
        let max = math::max(row);
        for v in row.iter_mut() {
            *v = math::exp(*v - max);
        }
        let sum = math::sum(row);
        let p_label = row[label] / sum;
        let scale = inv_rows / sum;
        for v in row.iter_mut() {
            *v *= scale;
        }
        row[label] -= inv_rows;
        -(p_label as f64).ln()
    }
}

/// Mean cross-entropy of `logits` (`[rows, classes]`) against `labels`; on return `logits`
/// holds the gradient of that mean with respect to the logits. Returns the loss.
///
/// Panics if a label is out of range (callers validate labels at the API boundary).
pub fn cross_entropy_fused(logits: &mut [f32], labels: &[usize], classes: usize) -> f64 {
    if labels.is_empty() {
        assert!(logits.is_empty(), "cross_entropy: logits length");
        return 0.0;
    }
    cross_entropy_fused_part(logits, labels, classes, labels.len()) / labels.len() as f64
}

/// [`cross_entropy_fused`] for a block of rows of a larger batch of `total_rows` rows: the
/// gradient written is that of the mean over all `total_rows`, and the return value is the SUM
/// of this block's row losses (the caller adds the blocks and divides by `total_rows`).
pub fn cross_entropy_fused_part(logits: &mut [f32], labels: &[usize], classes: usize, total_rows: usize) -> f64 {
    assert_eq!(logits.len(), labels.len() * classes, "cross_entropy: logits length");
    assert!(labels.iter().all(|&l| l < classes), "cross_entropy: label out of range");
    assert!(total_rows >= labels.len(), "cross_entropy: total_rows smaller than the block");
    if labels.is_empty() {
        return 0.0;
    }
    let inv_rows = 1.0 / total_rows as f32;
    // Per-row losses are summed in row order afterwards, so the result does not depend on
    // how rayon schedules the rows.
    let losses: Vec<f64> = logits
        .par_chunks_mut(classes)
        .zip(labels.par_iter())
        .map(|(row, &label)| row_loss_and_grad(row, label, inv_rows))
        .collect();
    losses.iter().sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_loss(logits: &[f64], labels: &[usize], classes: usize) -> f64 {
        let mut total = 0.0;
        for (row, &l) in logits.chunks(classes).zip(labels) {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            total += lse - row[l];
        }
        total / labels.len() as f64
    }

    #[test]
    fn hand_value_uniform_logits() {
        // Equal logits over 8 classes: loss = ln 8, gradient = (1/8 − onehot) / rows.
        let mut logits = vec![0.5f32; 16];
        let loss = cross_entropy_fused(&mut logits, &[3, 0], 8);
        assert!((loss - 8f64.ln()).abs() < 1e-6);
        assert!((logits[3] - (0.125 - 1.0) / 2.0).abs() < 1e-6);
        assert!((logits[1] - 0.125 / 2.0).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let (rows, classes) = (3, 7);
        let x: Vec<f64> = (0..rows * classes).map(|i| ((i * 37 % 23) as f64 / 7.0) - 1.5).collect();
        let labels = [2usize, 6, 0];
        let mut g: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let loss = cross_entropy_fused(&mut g, &labels, classes);
        assert!((loss - reference_loss(&x, &labels, classes)).abs() < 1e-5);
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += 1e-5;
            down[i] -= 1e-5;
            let fd = (reference_loss(&up, &labels, classes) - reference_loss(&down, &labels, classes)) / 2e-5;
            assert!((g[i] as f64 - fd).abs() < 1e-5, "{i}: {} vs {fd}", g[i]);
        }
    }
}
