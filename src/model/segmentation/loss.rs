//! HF's semantic segmentation loss: logits bilinearly upsampled (align_corners=False) to the
//! label map's size, then per-pixel cross-entropy averaged over the pixels whose label is not
//! the ignore index (`F.cross_entropy(..., ignore_index=..., reduction="mean")`).

use rayon::prelude::*;

use crate::backend::cpu::interp::{bilinear_backward, bilinear_forward};

/// Cross-entropy of NCHW `logits` (`[b, k, plane]`) against `labels` (`[b, plane]`), pixels
/// labelled `ignore` skipped. Returns (sum of the per-pixel losses, pixels counted) and writes
/// d(sum)/d(logits) into `dlogits` (0 for ignored pixels). A label outside `0..k` other than
/// `ignore` is a caller error (checked before).
pub fn pixel_cross_entropy_sum(
    logits: &[f32],
    labels: &[i64],
    b: usize,
    k: usize,
    plane: usize,
    ignore: i64,
    dlogits: &mut [f32],
) -> (f64, usize) {
    assert_eq!(logits.len(), b * k * plane);
    assert_eq!(labels.len(), b * plane);
    assert_eq!(dlogits.len(), logits.len());
    let per_image: Vec<(f64, usize)> = dlogits
        .par_chunks_mut(k * plane)
        .zip(logits.par_chunks(k * plane))
        .zip(labels.par_chunks(plane))
        .map(|((dl, lg), lab)| {
            let (mut sum, mut count) = (0.0f64, 0usize);
            for (px, &label) in lab.iter().enumerate() {
                if label == ignore {
                    for c in 0..k {
                        dl[c * plane + px] = 0.0;
                    }
                    continue;
                }
                let max = (0..k).map(|c| lg[c * plane + px]).fold(f32::NEG_INFINITY, f32::max);
                let z: f64 = (0..k).map(|c| ((lg[c * plane + px] - max) as f64).exp()).sum();
                let y = label as usize;
                sum += z.ln() - (lg[y * plane + px] - max) as f64;
                count += 1;
                for c in 0..k {
                    let prob = ((lg[c * plane + px] - max) as f64).exp() / z;
                    dl[c * plane + px] = (prob - (c == y) as u8 as f64) as f32;
                }
            }
            (sum, count)
        })
        .collect();
    per_image.iter().fold((0.0, 0), |(s, n), &(a, c)| (s + a, n + c))
}

/// HF's loss of one logits map: upsample `[b, k, h, w]` to the labels' `[b, lh, lw]`, mean
/// cross-entropy over non-ignored pixels. Returns (loss, d loss / d logits at `h x w`). With
/// no labelled pixel at all the loss is 0 with a zero gradient (PyTorch would return NaN).
#[allow(clippy::too_many_arguments)]
pub fn segmentation_loss(
    logits: &[f32],
    b: usize,
    k: usize,
    hw: (usize, usize),
    labels: &[i64],
    label_hw: (usize, usize),
    ignore: i64,
) -> (f64, Vec<f32>) {
    let (h, w) = hw;
    let (lh, lw) = label_hw;
    let mut up = vec![0.0f32; b * k * lh * lw];
    bilinear_forward(b * k, h, w, lh, lw, logits, &mut up);
    let mut dup = vec![0.0f32; up.len()];
    let (sum, count) = pixel_cross_entropy_sum(&up, labels, b, k, lh * lw, ignore, &mut dup);
    let mut dlogits = vec![0.0f32; logits.len()];
    if count == 0 {
        return (0.0, dlogits);
    }
    let inv = 1.0 / count as f32;
    dup.iter_mut().for_each(|v| *v *= inv);
    bilinear_backward(b * k, h, w, lh, lw, &dup, &mut dlogits);
    (sum / count as f64, dlogits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_loss_with_ignore() {
        // One image, 2 classes, 2 pixels; pixel 1 ignored. Pixel 0: logits (0, ln 3), label 1:
        // p = (1/4, 3/4), loss = −ln(3/4), gradient (1/4, −1/4).
        let logits = [0.0f32, 0.0, 3.0f32.ln(), 5.0];
        let mut d = [9.0f32; 4];
        let (sum, n) = pixel_cross_entropy_sum(&logits, &[1, 255], 1, 2, 2, 255, &mut d);
        assert_eq!(n, 1);
        assert!((sum - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        assert!((d[0] - 0.25).abs() < 1e-6 && (d[2] + 0.25).abs() < 1e-6);
        assert_eq!((d[1], d[3]), (0.0, 0.0));
    }

    #[test]
    fn loss_gradient_matches_finite_differences() {
        let (b, k, h, w, lh, lw) = (2, 3, 3, 2, 6, 5);
        let logits: Vec<f32> = (0..b * k * h * w).map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0).collect();
        let labels: Vec<i64> = (0..b * lh * lw).map(|i| if i % 7 == 3 { 255 } else { (i % 3) as i64 }).collect();
        let (_, grad) = segmentation_loss(&logits, b, k, (h, w), &labels, (lh, lw), 255);
        let eps = 1e-2f32;
        for i in 0..logits.len() {
            let (mut p, mut m) = (logits.clone(), logits.clone());
            p[i] += eps;
            m[i] -= eps;
            let fp = segmentation_loss(&p, b, k, (h, w), &labels, (lh, lw), 255).0;
            let fm = segmentation_loss(&m, b, k, (h, w), &labels, (lh, lw), 255).0;
            let fd = (fp - fm) / (2.0 * eps as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-4, "logit {i}: {} vs fd {fd}", grad[i]);
        }
    }
}
