//! Segmentation metrics as mmseg / HF `evaluate`'s `mean_iou` define them: a confusion count
//! accumulated over the whole evaluation set (pixels labelled with the ignore index skipped),
//! per-class IoU = intersection / union, mIoU = mean over the classes whose union is not empty
//! (a class absent from both prediction and labels has an undefined IoU and does not count).

/// Accumulated intersection and union per class, plus pixel accuracy counts.
#[derive(Debug, Clone, PartialEq)]
pub struct IouAccumulator {
    pub num_classes: usize,
    pub ignore_index: i64,
    pub intersection: Vec<u64>,
    pub union: Vec<u64>,
    pub correct: u64,
    pub labelled: u64,
}

/// Summary of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct IouReport {
    /// IoU per class, `None` where the class appears in neither labels nor predictions.
    pub per_class: Vec<Option<f64>>,
    pub mean_iou: f64,
    pub pixel_accuracy: f64,
}

impl IouAccumulator {
    pub fn new(num_classes: usize, ignore_index: i64) -> Self {
        IouAccumulator {
            num_classes,
            ignore_index,
            intersection: vec![0; num_classes],
            union: vec![0; num_classes],
            correct: 0,
            labelled: 0,
        }
    }

    /// Adds one batch of predicted and true labels (same length). A true label outside
    /// `0..num_classes` that is not the ignore index is skipped as unlabelled, as mmseg does.
    pub fn add(&mut self, predicted: &[usize], labels: &[i64]) {
        assert_eq!(predicted.len(), labels.len(), "IouAccumulator::add: lengths differ");
        let k = self.num_classes;
        for (&p, &l) in predicted.iter().zip(labels) {
            if l == self.ignore_index || l < 0 || l as usize >= k {
                continue;
            }
            let l = l as usize;
            self.labelled += 1;
            if p == l {
                self.correct += 1;
                self.intersection[l] += 1;
                self.union[l] += 1;
            } else {
                self.union[l] += 1;
                if p < k {
                    self.union[p] += 1;
                }
            }
        }
    }

    pub fn report(&self) -> IouReport {
        let per_class: Vec<Option<f64>> =
            self.intersection.iter().zip(&self.union).map(|(&i, &u)| (u > 0).then(|| i as f64 / u as f64)).collect();
        let present: Vec<f64> = per_class.iter().flatten().copied().collect();
        let mean_iou = if present.is_empty() { 0.0 } else { present.iter().sum::<f64>() / present.len() as f64 };
        let pixel_accuracy = if self.labelled == 0 { 0.0 } else { self.correct as f64 / self.labelled as f64 };
        IouReport { per_class, mean_iou, pixel_accuracy }
    }
}

/// Per-pixel argmax of NCHW logits `[b, k, plane]` → `[b, plane]` (the first maximum wins).
pub fn argmax_channels(logits: &[f32], b: usize, k: usize, plane: usize) -> Vec<usize> {
    let mut out = vec![0usize; b * plane];
    for img in 0..b {
        let lg = &logits[img * k * plane..(img + 1) * k * plane];
        for px in 0..plane {
            let mut best = 0;
            for c in 1..k {
                if lg[c * plane + px] > lg[best * plane + px] {
                    best = c;
                }
            }
            out[img * plane + px] = best;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_iou() {
        // 3 classes, ignore 255. Labels / predictions over 8 pixels:
        //   label: 0 0 1 1 1 2 255 255
        //   pred:  0 1 1 1 0 1  2   0
        // Ignored pixels drop out. Class 0: I = 1 (px 0), U = |{0,1,4}| = 3 → 1/3.
        // Class 1: I = 2 (px 2, 3), U = |{1,2,3,4,5}| = 5 → 2/5. Class 2: I = 0, U = 1 (px 5) → 0.
        // mIoU = (1/3 + 2/5 + 0) / 3; accuracy 3/6.
        let mut acc = IouAccumulator::new(3, 255);
        acc.add(&[0, 1, 1, 1], &[0, 0, 1, 1]);
        acc.add(&[0, 1, 2, 0], &[1, 2, 255, 255]);
        let r = acc.report();
        assert_eq!(r.per_class, vec![Some(1.0 / 3.0), Some(0.4), Some(0.0)]);
        assert!((r.mean_iou - (1.0 / 3.0 + 0.4) / 3.0).abs() < 1e-12);
        assert!((r.pixel_accuracy - 0.5).abs() < 1e-12);

        // A class in neither labels nor predictions is left out of the mean.
        let mut acc = IouAccumulator::new(4, 255);
        acc.add(&[0, 1, 1], &[0, 1, 0]);
        let r = acc.report();
        assert_eq!(r.per_class, vec![Some(0.5), Some(0.5), None, None]);
        assert!((r.mean_iou - 0.5).abs() < 1e-12);
    }

    #[test]
    fn argmax_takes_first_maximum() {
        // 1 image, 3 classes, 2 pixels.
        let logits = [1.0, 5.0, 3.0, 5.0, 3.0, 0.0];
        assert_eq!(argmax_channels(&logits, 1, 3, 2), vec![1, 0]);
    }
}
