//! Fine-tuning and evaluating a segmentation model on a dataset file with masks (`.beitds`,
//! e.g. the emoji set: mask = category + 1 on the foreground, 0 on the background).
//!
//! The loop is BEiT's fine-tuning recipe: AdamW (weight decay except 1-D tensors, biases, CLS
//! token and position embeddings; BatchNorm running statistics are not optimised at all),
//! linear warmup + cosine learning rate, layer-wise lr decay, stochastic depth (timm's rule,
//! rate rising linearly over the blocks), gradient clipping, random horizontal flips; after each
//! step the BatchNorm running statistics take PyTorch's momentum update. The steps are the
//! [`Trainer`]'s ([`Trainer::step_segment`]): this loop only picks and loads the batches, so a
//! host that feeds a segmentation trainer itself trains exactly as the loop does. Evaluation upsamples
//! the logits bilinearly to the mask size (as HF's `post_process_semantic_segmentation` does),
//! takes the per-pixel argmax, and accumulates mIoU over the whole set.

use std::ops::ControlFlow;

use rand::seq::SliceRandom;
use rand::Rng;

use super::adamw::AdamWConfig;
use super::trainer::{Trainer, TrainerOptions, WeightDecayOn};
use crate::backend::cpu::interp::bilinear_forward;
use crate::data::dataset::Dataset;
use crate::data::loader::check_normalisation;
/// The split lives with the other dataset subsets; re-exported here, where the fine-tune uses it.
pub use crate::data::subset::split_indices;
use crate::error::{Error, Result};
use crate::resources::{Bytes, Need, MAX_LABELS};

use crate::model::segmentation::metrics::{argmax_channels, IouAccumulator, IouReport};
use crate::model::segmentation::{head_pass_bytes, SegBatch};
use crate::model::{Architecture, BeitConfig, ImageBatch, Model};
use crate::train::gpu_inference::GpuInference;
use crate::train::gpu_pretrain::Precision;
use crate::Device;

/// Fine-tuning options (defaults: BEiT's segmentation recipe scaled to small runs).
#[derive(Debug, Clone, PartialEq)]
pub struct SegFinetuneOptions {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (after warmup).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    /// Layer-wise lr decay (1 = none); the head has scale 1, block i `decay^(L−i)`.
    pub layer_decay: f64,
    /// Stochastic depth rate of the last block; `None` = the config's `drop_path_rate`.
    pub drop_path_rate: Option<f64>,
    /// Global gradient-norm clip; `None` = no clipping.
    pub clip_grad: Option<f64>,
    pub seed: u64,
    /// Per-channel normalisation `(x/255 − mean) / std` (one value = all channels).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub flip: bool,
    /// Where the steps run: `Cpu`, or `Cuda` (the GPU trainer in fp32: parameters, gradients
    /// and AdamW on the device; the model gets the trained parameters at the end). `Auto` is a
    /// context's to resolve ([`crate::Context::device`]); here it is refused.
    pub device: Device,
}

impl Default for SegFinetuneOptions {
    fn default() -> Self {
        SegFinetuneOptions {
            epochs: 10,
            batch_size: 16,
            lr: 1e-3,
            min_lr: 1e-6,
            warmup_steps: 50,
            weight_decay: 0.05,
            layer_decay: 0.9,
            drop_path_rate: None,
            clip_grad: Some(3.0),
            seed: 0,
            mean: vec![0.5],
            std: vec![0.5],
            flip: true,
            device: Device::Cpu,
        }
    }
}

/// What one step did (for progress output).
#[derive(Debug, Clone, Copy)]
pub struct SegStepLog {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
}

/// Result of a fine-tuning run.
#[derive(Debug, Clone)]
pub struct SegFinetuneReport {
    pub steps: usize,
    /// Mean loss of the last epoch.
    pub final_epoch_loss: f64,
    pub seconds: f64,
}

/// The part of the train split `train` (dataset indices) whose masks a label-efficiency run uses:
/// `fraction` of it, stratified by the samples' image labels when `data` has them (one class
/// otherwise), seeded by `seed` ([`super::finetune::stratified_subset`]). All of `train`
/// when `fraction` is 1. Returns dataset indices in increasing order.
pub fn labelled_train_subset(data: &Dataset, train: &[usize], fraction: f64, seed: u64) -> Result<Vec<usize>> {
    if fraction == 1.0 {
        return Ok(train.to_vec());
    }
    let labels: Vec<u32> = train.iter().map(|&i| data.label(i).unwrap_or(0)).collect();
    let picked = super::finetune::stratified_subset(&labels, fraction, seed)?;
    Ok(picked.into_iter().map(|k| train[k]).collect())
}

/// The samples of a segmentation run: the deterministic train/test split of the dataset
/// ([`split_indices`]) and the part of the train split whose masks it trains on
/// ([`labelled_train_subset`]). `beit segment finetune` and the C API both take it from here.
#[derive(Debug, Clone, PartialEq)]
pub struct SegSplit {
    /// The whole train split.
    pub all_train: Vec<usize>,
    /// What the run trains on: `all_train`, or its labelled fraction.
    pub train: Vec<usize>,
    /// The held-out samples (evaluation).
    pub test: Vec<usize>,
}

impl SegSplit {
    /// The split of `data` by `test_fraction` (in `[0, 1)`) and `split_seed`, training on
    /// `label_fraction` (in `(0, 1]`) of the train split drawn by `seed`.
    pub fn new(data: &Dataset, test_fraction: f64, split_seed: u64, label_fraction: f64, seed: u64) -> Result<Self> {
        let (all_train, test) = split_indices(data.len(), test_fraction, split_seed)?;
        let train = labelled_train_subset(data, &all_train, label_fraction, seed)?;
        Ok(SegSplit { all_train, train, test })
    }
}

/// A from-scratch segmentation model: [`segmentation_config`] of `cfg` with `num_labels`
/// classes, BEiT's random initialisation from `seed`.
pub fn segmenter_from_config(cfg: BeitConfig, num_labels: usize, seed: u64) -> Result<Model> {
    ensure!(
        (1..=MAX_LABELS).contains(&num_labels),
        InvalidArgument,
        "num_labels must be between 1 and {MAX_LABELS}, got {num_labels}"
    );
    Model::new_random(segmentation_config(cfg, num_labels), Architecture::SemanticSegmentation, seed)
}

/// Number of classes a dataset's masks need: the largest mask value + 1 (255, the usual ignore
/// value, is not counted).
pub fn mask_classes(data: &Dataset) -> Result<usize> {
    ensure!(data.header().has_masks(), InvalidArgument, "{} has no masks", data.path().display());
    let mut max = 0u8;
    for i in 0..data.len() {
        let m = data.mask(i).expect("has masks");
        max = max.max(m.iter().copied().filter(|&v| v != 255).max().unwrap_or(0));
    }
    Ok(max as usize + 1)
}

/// `cfg` made ready for segmentation with `num_labels` classes: segmentation options already in
/// it are kept; missing `out_indices` are placed where HF's `[3, 5, 7, 11]` sit in 12 layers,
/// scaled to the model's depth, and a missing `auxiliary_channels` is the hidden size (HF's 256
/// would dwarf a small backbone).
pub fn segmentation_config(mut cfg: BeitConfig, num_labels: usize) -> BeitConfig {
    let layers = cfg.num_hidden_layers;
    if cfg.out_indices.is_none() {
        let at = |k: usize| ((layers * k) as f64 / 12.0).round().clamp(1.0, layers as f64) as usize;
        cfg.out_indices = Some(vec![at(3), at(5), at(7), at(11)]);
    }
    if cfg.auxiliary_channels.is_none() {
        cfg.auxiliary_channels = Some(cfg.hidden_size);
    }
    cfg.id2label = None;
    cfg.num_labels = Some(num_labels);
    cfg.extra.remove("label2id");
    cfg
}

/// A segmentation model whose backbone is taken from `pretrained` (any architecture; every
/// backbone entry is copied by name, `beit.` prefix or not; returns how many), head freshly
/// initialised from `seed`, config from [`segmentation_config`].
pub fn from_pretrained_backbone(pretrained: &Model, num_labels: usize, seed: u64) -> Result<(Model, usize)> {
    ensure!(
        (1..=MAX_LABELS).contains(&num_labels),
        InvalidArgument,
        "num_labels must be between 1 and {MAX_LABELS}, got {num_labels}"
    );
    let cfg = segmentation_config(pretrained.config().clone(), num_labels);
    let mut model = Model::new_random(cfg, Architecture::SemanticSegmentation, seed)?;
    let src = pretrained.params();
    let mut copied = 0;
    let names: Vec<(usize, String)> = model
        .params()
        .specs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name.starts_with("beit."))
        .map(|(i, s)| (i, s.name.clone()))
        .collect();
    for (i, name) in names {
        let bare = name.trim_start_matches("beit.");
        let Some(from) = src.find(&name).or_else(|| src.find(bare)) else { continue };
        if src.specs[from.0].shape != model.params().specs[i].shape {
            continue;
        }
        let values = src.get(from).to_vec();
        model.params_mut().get_mut(crate::model::params::ParamId(i)).copy_from_slice(&values);
        copied += 1;
    }
    Ok((model, copied))
}

/// Fills `pixels` (`[b, C, H, W]`, normalised) and `labels` (`[b, H, W]`) with samples `ids`,
/// mirrored left-right where `flips[i]`.
fn load_batch(
    data: &Dataset,
    ids: &[usize],
    flips: &[bool],
    mean: &[f32],
    std: &[f32],
    pixels: &mut Vec<f32>,
    labels: &mut Vec<i64>,
) {
    let h = data.header();
    let (hh, ww, c) = (h.height as usize, h.width as usize, h.channels as usize);
    pixels.clear();
    labels.clear();
    pixels.resize(ids.len() * c * hh * ww, 0.0);
    labels.resize(ids.len() * hh * ww, 0);
    for (b, (&id, &flip)) in ids.iter().zip(flips).enumerate() {
        let px = data.pixels(id);
        let mask = data.mask(id).expect("checked: the dataset has masks");
        for y in 0..hh {
            for x in 0..ww {
                let sx = if flip { ww - 1 - x } else { x };
                for ch in 0..c {
                    let (m, s) = (mean[ch.min(mean.len() - 1)], std[ch.min(std.len() - 1)]);
                    let v = px[(y * ww + sx) * c + ch] as f32 / 255.0;
                    pixels[((b * c + ch) * hh + y) * ww + x] = (v - m) / s;
                }
                labels[(b * hh + y) * ww + x] = mask[y * ww + sx] as i64;
            }
        }
    }
}

/// Memory of the segmentation head's part of one training pass over `batch` images at the
/// configured size ([`head_pass_bytes`]).
pub fn head_training_bytes(cfg: &BeitConfig, batch: usize) -> Bytes {
    head_pass_bytes(cfg, batch, cfg.image_size.hw(), true)
}

/// Memory of the segmentation head's part of an inference pass (evaluation) over `batch`
/// images at the configured size ([`head_pass_bytes`]).
pub fn head_inference_bytes(cfg: &BeitConfig, batch: usize) -> Bytes {
    head_pass_bytes(cfg, batch, cfg.image_size.hw(), false)
}

/// Memory of one batch's inputs: normalised pixels `[b, C, H, W]` and a label per pixel.
fn batch_input_bytes(cfg: &BeitConfig, batch: usize) -> Bytes {
    let (h, w) = cfg.image_size.hw();
    Bytes::floats(&[batch, cfg.num_channels, h, w]) + Bytes::of::<i64>(&[batch, h, w])
}

/// Refuses samples `ids` of `data` that do not exist, and mask values that are neither a class
/// of the model (`0..num_labels`) nor its ignore index: such a mask belongs to another label set,
/// and training on it would stop midway (evaluating would score it wrongly).
fn check_samples(model: &Model, data: &Dataset, ids: &[usize]) -> Result<()> {
    if let Some(&i) = ids.iter().find(|&&i| i >= data.len()) {
        bail!(InvalidArgument, "sample {i} of {} does not exist ({} samples)", data.path().display(), data.len());
    }
    let k = model.config().num_labels();
    let ignore = model.config().semantic_loss_ignore_index();
    let width = data.header().width as usize;
    for &i in ids {
        let mask = data.mask(i).expect("checked: the dataset has masks");
        if let Some((p, &v)) = mask.iter().enumerate().find(|&(_, &v)| i64::from(v) != ignore && v as usize >= k) {
            bail!(
                InvalidArgument,
                "{}: sample {i} has mask value {v} at pixel ({}, {}), but the model has {k} labels (0 to {}) and \
                 ignores {ignore}: pass a matching num_labels, or fix the masks",
                data.path().display(),
                p / width,
                p % width,
                k - 1
            );
        }
    }
    Ok(())
}

fn check_data(model: &Model, data: &Dataset) -> Result<()> {
    ensure!(
        model.architecture() == Architecture::SemanticSegmentation,
        InvalidArgument,
        "a BeitForSemanticSegmentation model is needed; this one is {}",
        model.architecture().hf_name()
    );
    let h = data.header();
    ensure!(h.has_masks(), InvalidArgument, "{} has no segmentation masks", data.path().display());
    let c = model.config();
    ensure!(c.num_labels() > 0, InvalidArgument, "the segmentation model has no labels (num_labels 0)");
    ensure!(
        (h.height as usize, h.width as usize) == c.image_size.hw() && h.channels as usize == c.num_channels,
        InvalidArgument,
        "{} holds {}x{}x{} images; the model takes {:?} with {} channels",
        data.path().display(),
        h.height,
        h.width,
        h.channels,
        c.image_size.hw(),
        c.num_channels
    );
    Ok(())
}

/// Fine-tunes `model` on samples `train` of `data`; `log` sees every step.
pub fn finetune(
    model: &mut Model,
    data: &Dataset,
    train: &[usize],
    opts: &SegFinetuneOptions,
    mut log: impl FnMut(&SegStepLog),
) -> Result<SegFinetuneReport> {
    finetune_until(model, data, train, opts, |s| {
        log(s);
        ControlFlow::Continue(())
    })
}

/// [`finetune`] whose `log` may stop the run: after a `Break` no further step is taken, and
/// `model` holds the parameters of the steps done (the report counts them; its epoch loss is
/// the mean over the last epoch's steps so far).
pub fn finetune_until(
    model: &mut Model,
    data: &Dataset,
    train: &[usize],
    opts: &SegFinetuneOptions,
    mut log: impl FnMut(&SegStepLog) -> ControlFlow<()>,
) -> Result<SegFinetuneReport> {
    check_data(model, data)?;
    ensure!(
        opts.batch_size >= 2,
        InvalidArgument,
        "batch size must be at least 2 (training-mode BatchNorm), got {}",
        opts.batch_size
    );
    ensure!(opts.epochs > 0, InvalidArgument, "segmentation fine-tuning needs at least one epoch, got 0");
    ensure!(
        train.len() >= opts.batch_size,
        InvalidArgument,
        "{} training samples < batch size {}",
        train.len(),
        opts.batch_size
    );
    let cfg = model.config();
    check_normalisation(&opts.mean, &opts.std, cfg.num_channels, "segmentation fine-tuning")?;
    let steps_per_epoch = train.len() / opts.batch_size;
    let Some(total) = steps_per_epoch.checked_mul(opts.epochs) else {
        bail!(InvalidArgument, "{} epochs of {steps_per_epoch} steps is more steps than can be counted", opts.epochs);
    };
    check_samples(model, data, train)?;
    let n = model.params().data.len();
    // The trainer's copy of the parameters, its gradients, the decay mask, the layer-decay
    // scales and AdamW's two moments.
    Need::new(
        format!("segmentation fine-tuning's gradients and optimizer state ({n} parameters)"),
        Bytes::floats(&[6, n]),
    )
    .check()?;
    Need::new(
        format!(
            "the segmentation head's training pass on a batch of {} images ({:?}, {} labels)",
            opts.batch_size,
            cfg.image_size.hw(),
            cfg.num_labels()
        ),
        head_training_bytes(cfg, opts.batch_size) + batch_input_bytes(cfg, opts.batch_size),
    )
    .hint("use a smaller batch size")
    .check()?;
    let start = std::time::Instant::now();
    let mut trainer = Trainer::new_segmenter(copy_of(model)?, trainer_options(opts, total)?)?;
    match opts.device {
        Device::Cpu => {}
        Device::Cuda => {
            trainer.use_cuda(Precision::F32)?;
            // The model takes the parameters once, at the end.
            trainer.defer_host_copy(true);
        }
        Device::Auto => {
            bail!(InvalidArgument, "segmentation fine-tuning runs on cpu or cuda; resolve auto with a Context")
        }
    }
    let run = run_epochs(&mut trainer, data, train, opts, steps_per_epoch, total, &mut log);
    // Whatever happened, `model` gets the parameters of the steps done (a refused step changed
    // nothing in the trainer).
    trainer.sync_host()?;
    model.params_mut().data.copy_from_slice(&trainer.model().params().data);
    let (steps, final_epoch_loss) = run?;
    Ok(SegFinetuneReport { steps, final_epoch_loss, seconds: start.elapsed().as_secs_f64() })
}

/// The trainer options of the loop's recipe: `opts`' rates, AdamW's default betas and eps,
/// BEiT's weight-decay rule, a schedule of `total` steps with the warmup cut to the run.
fn trainer_options(opts: &SegFinetuneOptions, total: usize) -> Result<TrainerOptions> {
    let adam = AdamWConfig::default();
    let warmup = opts.warmup_steps.min(total);
    // The trainer's schedule needs total_steps > warmup_steps; a run that is all warmup gets one
    // more (never reached) step, which leaves every step's rate as the warmup gives it.
    let schedule_steps = if warmup == total { total + 1 } else { total };
    let options = TrainerOptions {
        learning_rate: opts.lr,
        min_learning_rate: opts.min_lr,
        warmup_steps: warmup as u64,
        total_steps: schedule_steps as u64,
        weight_decay: f64::from(opts.weight_decay),
        beta1: f64::from(adam.beta1),
        beta2: f64::from(adam.beta2),
        eps: f64::from(adam.eps),
        clip_grad_norm: opts.clip_grad.unwrap_or(0.0),
        drop_path_rate: opts.drop_path_rate,
        layer_decay: opts.layer_decay,
        weight_decay_on: WeightDecayOn::Beit,
        seed: opts.seed,
        ..TrainerOptions::default()
    };
    options.validate()?;
    Ok(options)
}

/// A copy of `model` (config, architecture, parameters) for the trainer to own.
fn copy_of(model: &Model) -> Result<Model> {
    let mut copy = Model::zeroed(model.config().clone(), model.architecture())?;
    copy.params_mut().data.copy_from_slice(&model.params().data);
    Ok(copy)
}

/// The loop's batches: each epoch shuffles the order the last one left (the first shuffles
/// the train samples as given) and takes it `batch_size` at a time (the rest dropped), each
/// image flipped at random when `flip`. The shuffles and the flips draw from the trainer's
/// random state, interleaved with its drop path draws, so a seed gives one run.
struct EpochBatches<'a> {
    data: &'a Dataset,
    opts: &'a SegFinetuneOptions,
    order: Vec<usize>,
    next: usize,
    pixels: Vec<f32>,
    labels: Vec<i64>,
}

impl<'a> EpochBatches<'a> {
    fn new(data: &'a Dataset, train: &[usize], opts: &'a SegFinetuneOptions) -> Self {
        EpochBatches { data, opts, order: train.to_vec(), next: 0, pixels: Vec::new(), labels: Vec::new() }
    }

    /// Starts an epoch: shuffles the order.
    fn start_epoch(&mut self, rng: &mut impl Rng) {
        self.order.shuffle(rng);
        self.next = 0;
    }

    /// The next batch (drawing its flips from `rng`), or `None` at the end of the epoch.
    fn next_batch(&mut self, rng: &mut impl Rng) -> Option<SegBatch<'_>> {
        let b = self.opts.batch_size;
        let chunk = self.order.get(self.next..self.next + b)?;
        self.next += b;
        let flips: Vec<bool> = chunk.iter().map(|_| self.opts.flip && rng.random::<bool>()).collect();
        load_batch(self.data, chunk, &flips, &self.opts.mean, &self.opts.std, &mut self.pixels, &mut self.labels);
        let h = self.data.header();
        Some(SegBatch {
            pixels: &self.pixels,
            batch: b,
            channels: h.channels as usize,
            height: h.height as usize,
            width: h.width as usize,
            labels: &self.labels,
        })
    }
}

/// The loop's epochs on `trainer`; returns the steps taken and the last epoch's mean loss.
fn run_epochs(
    trainer: &mut Trainer,
    data: &Dataset,
    train: &[usize],
    opts: &SegFinetuneOptions,
    steps_per_epoch: usize,
    total: usize,
    log: &mut impl FnMut(&SegStepLog) -> ControlFlow<()>,
) -> Result<(usize, f64)> {
    let mut step = 0;
    let mut epoch_loss = 0.0;
    let mut batches = EpochBatches::new(data, train, opts);
    for epoch in 0..opts.epochs {
        batches.start_epoch(&mut trainer.rng);
        epoch_loss = 0.0;
        let mut epoch_steps = 0;
        while let Some(batch) = batches.next_batch(&mut trainer.rng) {
            let stats = trainer.step_segment(&batch).map_err(|e| at_step(e, step))?;
            epoch_loss += stats.loss;
            step += 1;
            epoch_steps += 1;
            let entry = SegStepLog {
                step,
                total_steps: total,
                epoch,
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
            };
            if log(&entry).is_break() {
                return Ok((step, epoch_loss / epoch_steps as f64));
            }
        }
        epoch_loss /= steps_per_epoch.max(1) as f64;
    }
    Ok((step, epoch_loss))
}

/// A numerical refusal of the trainer, with the loop's step in it.
fn at_step(e: Error, step: usize) -> Error {
    match e {
        Error::Numerical(m) => Error::Numerical(format!("at step {step}: {m}")),
        other => other,
    }
}

/// mIoU of `model` (eval mode) on samples `ids` of `data`, batches of `batch_size`, on the CPU.
pub fn evaluate(
    model: &Model,
    data: &Dataset,
    ids: &[usize],
    batch_size: usize,
    mean: &[f32],
    std: &[f32],
) -> Result<IouReport> {
    evaluate_on(model, data, ids, batch_size, mean, std, Device::Cpu)
}

/// [`evaluate`] with the logits computed on `device` (`Cpu`, or `Cuda`: the GPU inference pass
/// in fp32).
pub fn evaluate_on(
    model: &Model,
    data: &Dataset,
    ids: &[usize],
    batch_size: usize,
    mean: &[f32],
    std: &[f32],
    device: Device,
) -> Result<IouReport> {
    check_data(model, data)?;
    ensure!(batch_size > 0, InvalidArgument, "the evaluation batch size must be positive, got 0");
    let cfg = model.config();
    check_normalisation(mean, std, cfg.num_channels, "segmentation evaluation")?;
    check_samples(model, data, ids)?;
    let k = cfg.num_labels();
    let b = batch_size.min(ids.len()).max(1);
    let (hh, ww) = cfg.image_size.hw();
    Need::new(
        format!("the per-class IoU tables of {k} labels"),
        Bytes::of::<u64>(&[2, k]) + Bytes::of::<Option<f64>>(&[k]),
    )
    .check()?;
    Need::new(
        format!("evaluating a batch of {b} images ({hh}x{ww}, {k} labels) with the segmentation head"),
        head_inference_bytes(cfg, b) + batch_input_bytes(cfg, b) + Bytes::of::<usize>(&[b, hh, ww]),
    )
    .hint("use a smaller batch size")
    .check()?;
    let mut gpu = match device {
        Device::Cpu => None,
        Device::Cuda => Some(GpuInference::new(model, Precision::F32)?),
        Device::Auto => {
            bail!(InvalidArgument, "segmentation evaluation runs on cpu or cuda; resolve auto with a Context")
        }
    };
    let mut acc = IouAccumulator::new(k, cfg.semantic_loss_ignore_index());
    let c = cfg.num_channels;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for chunk in ids.chunks(batch_size) {
        let flips = vec![false; chunk.len()];
        load_batch(data, chunk, &flips, mean, std, &mut pixels, &mut labels);
        let b = chunk.len();
        let input = ImageBatch { pixels: &pixels, batch: b, channels: c, height: hh, width: ww, bool_masked_pos: None };
        let outputs = match &mut gpu {
            Some(gpu) => gpu.forward(&input)?,
            None => model.forward(&input)?,
        };
        let logits = outputs.logits.expect("segmentation logits");
        let (lh, lw) = (logits.shape[2], logits.shape[3]);
        let mut up = vec![0.0f32; b * k * hh * ww];
        bilinear_forward(b * k, lh, lw, hh, ww, &logits.data, &mut up);
        acc.add(&argmax_channels(&up, b, k, hh * ww), &labels);
    }
    Ok(acc.report())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::{DatasetSpec, DatasetWriter};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// `n` 32x32 images of noise with a square of class 1 to 3 (its colour) each.
    fn squares(path: &std::path::Path, n: usize) -> Dataset {
        let spec = DatasetSpec { height: 32, width: 32, channels: 3, labels: false, masks: true, token_grid: None };
        let mut w = DatasetWriter::create(path, spec).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..n {
            let mut px: Vec<u8> = (0..32 * 32 * 3).map(|_| rng.random_range(90..150)).collect();
            let mut mask = vec![0u8; 32 * 32];
            let class = rng.random_range(1..4u8);
            let (y0, x0) = (rng.random_range(0..20), rng.random_range(0..20));
            for y in y0..y0 + 12 {
                for x in x0..x0 + 12 {
                    mask[y * 32 + x] = class;
                    px[(y * 32 + x) * 3 + usize::from(class - 1)] = 250;
                }
            }
            w.push(&px, None, Some(&mask), None).unwrap();
        }
        w.finish().unwrap();
        Dataset::open(path).unwrap()
    }

    fn tiny_segmenter() -> Model {
        let cfg = BeitConfig::from_json_str(
            r#"{"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 64, "use_relative_position_bias": true,
                "pool_scales": [1, 2], "auxiliary_channels": 16}"#,
        )
        .unwrap();
        segmenter_from_config(cfg, 4, 3).unwrap()
    }

    fn bits(model: &Model) -> Vec<u32> {
        model.params().data.iter().map(|v| v.to_bits()).collect()
    }

    /// A host that feeds a segmentation trainer the loop's batches (same order, same flips)
    /// ends with the loop's parameters and running statistics, bit for bit, and each applied
    /// step updated the running statistics once.
    #[test]
    fn host_fed_steps_give_the_loops_weights() {
        let dir = std::env::temp_dir().join(format!("beit-seg-host-fed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = squares(&dir.join("squares.beitds"), 10);
        let train: Vec<usize> = (0..10).collect();
        // No drop path: the host's own generator then makes the loop's shuffles and flips (the
        // loop draws them from the trainer's, which drop path would share).
        let opts = SegFinetuneOptions {
            epochs: 2,
            batch_size: 4,
            warmup_steps: 2,
            drop_path_rate: Some(0.0),
            seed: 9,
            ..SegFinetuneOptions::default()
        };
        let mut looped = tiny_segmenter();
        let report = finetune(&mut looped, &data, &train, &opts, |_| {}).unwrap();
        assert_eq!(report.steps, 4);

        let total = 4;
        let mut trainer = Trainer::new_segmenter(tiny_segmenter(), trainer_options(&opts, total).unwrap()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let mut batches = EpochBatches::new(&data, &train, &opts);
        let mut losses = Vec::new();
        for _ in 0..opts.epochs {
            batches.start_epoch(&mut rng);
            while let Some(batch) = batches.next_batch(&mut rng) {
                losses.push(trainer.step_segment(&batch).unwrap().loss);
            }
        }
        assert_eq!(losses.len(), total);
        assert!(bits(trainer.model()) == bits(&looped), "host-fed parameters differ from the loop's");
        let store = trainer.model().params();
        let tracked: Vec<f32> = store
            .specs
            .iter()
            .filter(|s| s.name.ends_with(".num_batches_tracked"))
            .map(|s| store.data[s.offset])
            .collect();
        assert!(!tracked.is_empty());
        assert!(tracked.iter().all(|&n| n == total as f32), "num_batches_tracked {tracked:?} after {total} steps");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn out_indices_scale_with_depth() {
        let cfg = |l: usize| BeitConfig { num_hidden_layers: l, ..BeitConfig::default() };
        assert_eq!(segmentation_config(cfg(12), 3).out_indices, Some(vec![3, 5, 7, 11]));
        assert_eq!(segmentation_config(cfg(6), 3).out_indices, Some(vec![2, 3, 4, 6]));
        assert_eq!(segmentation_config(cfg(4), 3).out_indices, Some(vec![1, 2, 2, 4]));
        assert_eq!(segmentation_config(cfg(4), 3).num_labels(), 3);
    }
}
