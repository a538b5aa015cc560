//! Evaluating a classifier on a labelled dataset: top-1 accuracy and the confusion matrix.
//!
//! Preprocessing is the evaluation counterpart of the fine-tuning loader: the whole image,
//! resized (PIL-style antialiased bicubic, as the loader's crops are) to the model's image size,
//! scaled to [0, 1] and normalised with mean = std = 0.5 (BEIT_SPEC §2). No crop: the small
//! datasets this targets are already framed (BEiT evaluates ≥ 384 px models with crop_pct 1 too).

use serde::Serialize;

use crate::data::dataset::Dataset;
use crate::data::loader::{resample, Filter};
use crate::error::Result;
use crate::model::{Architecture, ImageBatch, Model};
use crate::resources::{try_zeroed, Bytes, Need};

/// Results of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub images: usize,
    pub correct: usize,
    /// `correct / images`.
    pub top1: f64,
    pub num_labels: usize,
    /// `confusion[true][predicted]`: image counts.
    pub confusion: Vec<Vec<u64>>,
    /// Per class: correct / images of that class (NaN-free: 0 for an absent class).
    pub per_class_accuracy: Vec<f64>,
}

/// Samples `indices` of `ds` as model input `[B, C, H, W]` (see the module docs).
pub fn eval_pixels(ds: &Dataset, indices: &[usize], size: (usize, usize)) -> Vec<f32> {
    let h = ds.header();
    let (ih, iw, c) = (h.height as usize, h.width as usize, h.channels as usize);
    let mut out = Vec::with_capacity(indices.len() * c * size.0 * size.1);
    let mut img = vec![0.0f32; c * ih * iw];
    for &i in indices {
        for (p, px) in ds.pixels(i).chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                img[ch * ih * iw + p] = v as f32 * (1.0 / 255.0);
            }
        }
        let resized = if (ih, iw) == size {
            img.clone()
        } else {
            resample(&img, c, ih, iw, (0, 0, ih, iw), size, Filter::Bicubic, false)
        };
        out.extend(resized.iter().map(|&x| (x - 0.5) / 0.5));
    }
    out
}

/// Pixels of one image of `ds` (height · width).
fn ih_iw(ds: &Dataset) -> usize {
    ds.header().height as usize * ds.header().width as usize
}

/// Index of the largest logit (the first on ties, as `torch.argmax` on CPU).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (k, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = k;
        }
    }
    best
}

/// Runs `model` (a `BeitForImageClassification`) over every sample of `ds` in batches of
/// `batch_size`; `on_batch(done, total)` reports progress.
pub fn evaluate(
    model: &Model,
    ds: &Dataset,
    batch_size: usize,
    mut on_batch: impl FnMut(usize, usize),
) -> Result<Evaluation> {
    ensure!(
        model.architecture() == Architecture::ImageClassification,
        InvalidArgument,
        "evaluation needs a BeitForImageClassification model; this one is {}",
        model.architecture().hf_name()
    );
    ensure!(ds.header().has_labels(), InvalidArgument, "{} has no labels", ds.path().display());
    ensure!(batch_size > 0, InvalidArgument, "the evaluation batch size must be positive, got 0");
    let c = ds.header().channels as usize;
    ensure!(
        c == model.config().num_channels,
        InvalidArgument,
        "{} has {c} channels; the model takes {}",
        ds.path().display(),
        model.config().num_channels
    );
    let k = model.config().num_labels();
    ensure!(k > 0, InvalidArgument, "the model has no labels to evaluate");
    let size = model.config().image_size.hw();
    let n = ds.len();
    // Every label first: one outside the model's labels is a wrong dataset, not a miss.
    if let Some((i, l)) = (0..n).map(|i| (i, ds.label(i).expect("labelled"))).find(|&(_, l)| l as usize >= k) {
        bail!(
            InvalidArgument,
            "{}: sample {i} has label {l}, but the model has {k} labels (0 to {})",
            ds.path().display(),
            k - 1
        );
    }
    let b = batch_size.min(n).max(1);
    Need::new(
        format!("the {k}x{k} confusion matrix and the per-class accuracies"),
        Bytes::of::<u64>(&[k, k]) + Bytes::of::<Vec<u64>>(&[k]) + Bytes::of::<f64>(&[k]),
    )
    .hint("the model's num_labels decides the matrix")
    .check()?;
    Need::new(
        format!("a batch of {b} evaluation images ({}x{}x{c}) and their logits", size.0, size.1),
        Bytes::floats(&[b, c, size.0, size.1]) * 2 + Bytes::floats(&[b, k]) + Bytes::floats(&[c, ih_iw(ds)]) * 2,
    )
    .hint("use a smaller batch")
    .check()?;
    let mut confusion = Vec::new();
    confusion
        .try_reserve_exact(k)
        .map_err(|_| crate::error::Error::InvalidArgument(format!("cannot allocate the {k}x{k} confusion matrix")))?;
    for _ in 0..k {
        confusion.push(try_zeroed::<u64>(k, "a confusion matrix row")?);
    }
    let mut correct = 0;
    for start in (0..n).step_by(batch_size) {
        let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let pixels = eval_pixels(ds, &indices, size);
        let input = ImageBatch {
            pixels: &pixels,
            batch: indices.len(),
            channels: c,
            height: size.0,
            width: size.1,
            bool_masked_pos: None,
        };
        let out = model.forward(&input)?;
        let logits = out.logits.expect("a classifier has logits");
        for (row, &i) in logits.data.chunks_exact(k).zip(&indices) {
            let truth = ds.label(i).expect("labelled") as usize; // checked above: truth < k
            let predicted = argmax(row);
            confusion[truth][predicted] += 1;
            correct += usize::from(predicted == truth);
        }
        on_batch(indices[indices.len() - 1] + 1, n);
    }
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(t, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                row[t] as f64 / total as f64
            }
        })
        .collect();
    Ok(Evaluation {
        images: n,
        correct,
        top1: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        num_labels: k,
        confusion,
        per_class_accuracy,
    })
}
