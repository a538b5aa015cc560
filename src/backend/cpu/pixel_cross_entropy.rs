//! Per-pixel softmax cross-entropy of NCHW logits (the segmentation loss), fused with its
//! gradient. Images run in parallel; their sums are added in image order, so the result does not
//! depend on the thread count.

use rayon::prelude::*;

/// Cross-entropy of `logits` (`[batch, k, plane]`) against `labels` (`[batch, plane]`, a label
/// of `k` leaves its pixel out). Returns the sum of the per-pixel losses and overwrites
/// `logits` with `scale ·` d(sum)/d(logits) (0 at pixels left out).
pub fn pixel_cross_entropy_fused(logits: &mut [f32], labels: &[usize], k: usize, plane: usize, scale: f32) -> f64 {
    assert_eq!(logits.len() % (k * plane).max(1), 0, "pixel_cross_entropy: logits length");
    assert_eq!(labels.len() * k, logits.len(), "pixel_cross_entropy: labels length");
    let per_image: Vec<f64> = logits
        .par_chunks_mut(k * plane)
        .zip(labels.par_chunks(plane))
        .map(|(lg, lab)| {
            let mut sum = 0.0f64;
            for (px, &label) in lab.iter().enumerate() {
                if label == k {
                    for c in 0..k {
                        lg[c * plane + px] = 0.0;
                    }
                    continue;
                }
                assert!(label < k, "pixel_cross_entropy: label {label} of {k} classes");
                let max = (0..k).map(|c| lg[c * plane + px]).fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = (0..k).map(|c| ((lg[c * plane + px] - max) as f64).exp()).sum();
                sum += z.ln() - (lg[label * plane + px] - max) as f64;
                for c in 0..k {
                    let prob = ((lg[c * plane + px] - max) as f64).exp() / z;
                    lg[c * plane + px] = (prob - (c == label) as u8 as f64) as f32 * scale;
                }
            }
            sum
        })
        .collect();
    per_image.iter().fold(0.0, |s, &a| s + a)
}
