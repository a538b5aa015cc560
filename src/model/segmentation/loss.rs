//! HF's semantic segmentation loss: logits bilinearly upsampled (align_corners=False) to the
//! label map's size, then per-pixel cross-entropy averaged over the pixels whose label is not
//! the ignore index (`F.cross_entropy(..., ignore_index=..., reduction="mean")`).

use crate::backend::image_ops::ImageOps;
use crate::backend::memory::{Arena, HostMemory, Planner, View};
use crate::backend::shapes::ResizeShape;
use crate::backend::Backend;
use crate::context::host_backend;
use crate::error::Result;

/// `labels` as the pixel loss reads them (an `Index` view): the class id, or `k` for a pixel
/// labelled `ignore`; and the number of pixels that count. A label outside `0..k` other than
/// `ignore` is a caller error (checked before).
pub(crate) fn loss_labels(labels: &[i64], k: usize, ignore: i64) -> (Vec<usize>, usize) {
    let mut counted = 0;
    let ids = labels
        .iter()
        .map(|&l| {
            if l == ignore {
                k
            } else {
                assert!((0..k as i64).contains(&l), "label {l} outside [0, {k})");
                counted += 1;
                l as usize
            }
        })
        .collect();
    (ids, counted)
}

/// HF's loss of one logits map over planned views: `logits` `[b, k, h, w]` upsampled into `up`
/// (`[b, k, lh, lw]`), mean cross-entropy over the `counted` pixels whose `labels` (`Index`, see
/// [`loss_labels`]) count. Returns the loss and writes d loss / d logits into `dlogits`. With no
/// labelled pixel at all the loss is 0 with a zero gradient (PyTorch would return NaN). Takes
/// the memory's loss ([`Backend::take_loss`]), which must hold nothing else.
#[allow(clippy::too_many_arguments)]
pub(crate) fn segmentation_loss_pass<B: ImageOps>(
    be: &B,
    m: &mut B::Memory<'_>,
    logits: View,
    dlogits: View,
    up: View,
    labels: View,
    counted: usize,
    (b, k): (usize, usize),
    (h, w): (usize, usize),
    (lh, lw): (usize, usize),
) -> Result<f64> {
    let shape = ResizeShape { planes: b * k, in_h: h, in_w: w, out_h: lh, out_w: lw };
    if counted == 0 {
        be.fill_zero(m, dlogits)?;
        return Ok(0.0);
    }
    be.bilinear_resize(m, up, logits, shape)?;
    be.pixel_cross_entropy(m, up, labels, k, lh * lw, 1.0 / counted as f32)?;
    let sum = be.take_loss(m)?;
    be.bilinear_resize_backward(m, dlogits, up, shape)?;
    Ok(sum / counted as f64)
}

/// Views of one host loss computation.
struct HostLoss {
    arena: Arena,
    logits: View,
    dlogits: View,
    up: View,
    labels: View,
}

impl HostLoss {
    fn new(logits: usize, up: usize, labels: usize) -> Self {
        let mut plan = Planner::shared();
        let (logits, dlogits, up, labels) = (plan.act(logits), plan.act(logits), plan.act(up), plan.index(labels));
        let arena = Arena::new(&plan).expect("the memory of a host loss");
        HostLoss { arena, logits, dlogits, up, labels }
    }
}

/// Cross-entropy of NCHW `logits` (`[b, k, plane]`) against `labels` (`[b, plane]`), pixels
/// labelled `ignore` skipped, on the host backend. Returns (sum of the per-pixel losses, pixels
/// counted) and writes d(sum)/d(logits) into `dlogits` (0 for ignored pixels). A label outside
/// `0..k` other than `ignore` is a caller error (checked before).
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
    let (ids, counted) = loss_labels(labels, k, ignore);
    let mut host = HostLoss::new(logits.len(), 0, ids.len());
    let be = host_backend();
    let mut m = HostMemory::new(&mut host.arena, &[], &mut []);
    let mut run = |m: &mut HostMemory<'_>| -> Result<f64> {
        be.upload(m, host.logits, logits)?;
        be.upload_indices(m, host.labels, &ids)?;
        be.pixel_cross_entropy(m, host.logits, host.labels, k, plane, 1.0)?;
        be.download(m, host.logits, dlogits)?;
        be.take_loss(m)
    };
    (run(&mut m).expect("host ops"), counted)
}

/// HF's loss of one logits map on the host backend: upsample `[b, k, h, w]` to the labels'
/// `[b, lh, lw]`, mean cross-entropy over non-ignored pixels. Returns (loss, d loss / d logits
/// at `h x w`); see [`segmentation_loss_pass`].
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
    let (ids, counted) = loss_labels(labels, k, ignore);
    let mut host = HostLoss::new(logits.len(), b * k * label_hw.0 * label_hw.1, ids.len());
    let be = host_backend();
    let mut m = HostMemory::new(&mut host.arena, &[], &mut []);
    let mut dlogits = vec![0.0f32; logits.len()];
    let mut run = |m: &mut HostMemory<'_>| -> Result<f64> {
        be.upload(m, host.logits, logits)?;
        be.upload_indices(m, host.labels, &ids)?;
        let loss = segmentation_loss_pass(
            &be,
            m,
            host.logits,
            host.dlogits,
            host.up,
            host.labels,
            counted,
            (b, k),
            hw,
            label_hw,
        )?;
        be.download(m, host.dlogits, &mut dlogits)?;
        Ok(loss)
    };
    let loss = run(&mut m).expect("host ops");
    (loss, dlogits)
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
