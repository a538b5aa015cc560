//! `beit finetune` and `beit eval`: fine-tuning a pretrained (or fresh) model on a labelled
//! dataset, and measuring a classifier on one. Thin: the work is in `beit::train::finetune` and
//! `beit::train::evaluate`.

use std::path::PathBuf;
use std::sync::Arc;

use beit::data::dataset::Dataset;
use beit::model::io::{CONFIG_FILE, WEIGHTS_FILE};
use beit::train::finetune::{
    classifier_from_pretrained, dataset_labels, label_fraction_subset, num_labels_from_data, run_finetune,
    subset_dataset, total_steps, FinetuneData, SUBSET_FILE,
};
use beit::train::recipes::finetune as recipe;
use beit::train::recipes::presets;
use beit::train::recipes::schedule::default_warmup_steps;
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Context, ContextOptions, Device, Model};

/// What is fine-tuned. Each task has its own head, loss and data; more arrive with their issues.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Task {
    /// Image classification (`BeitForImageClassification`): labels from the dataset file.
    Classify,
}

#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[arg(long, value_enum, default_value = "classify")]
    pub task: Task,
    /// Pretrained HF directory (BeitForMaskedImageModeling, BeitModel or
    /// BeitForImageClassification weights). Without it, --config starts from scratch.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Config of a from-scratch model: a config.json or a preset (tiny32, base).
    #[arg(long, default_value = "tiny32")]
    pub config: String,
    /// Labelled training data (`.beitds`).
    #[arg(long)]
    pub data: PathBuf,
    /// Fraction of the labelled samples to train on: a stratified subset (the same fraction of
    /// every class), seeded by --seed.
    #[arg(long, default_value_t = 1.0)]
    pub label_fraction: f64,
    /// Number of labels (default: the largest label in --data plus one).
    #[arg(long)]
    pub num_labels: Option<usize>,
    /// Fine-tune at this image size (HxW or one number); position tables are resized as HF does.
    #[arg(long)]
    pub image_size: Option<String>,
    /// Total optimizer steps (overrides --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Epochs over the (subset of the) data, when --steps is not given.
    #[arg(long, default_value_t = recipe::EPOCHS)]
    pub epochs: u64,
    #[arg(long, default_value_t = recipe::BATCH_SIZE)]
    pub batch: usize,
    /// Peak learning rate (BEiT-B from pt22k: 4e-3 at batch 1024).
    #[arg(long, default_value_t = recipe::LEARNING_RATE)]
    pub lr: f64,
    #[arg(long, default_value_t = recipe::MIN_LEARNING_RATE)]
    pub min_lr: f64,
    /// Layer-wise lr decay (BEiT: 0.65 for base from pretraining; 1 = none).
    #[arg(long, default_value_t = recipe::LAYER_DECAY)]
    pub layer_decay: f64,
    #[arg(long, default_value_t = recipe::WEIGHT_DECAY)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = recipe::LABEL_SMOOTHING)]
    pub label_smoothing: f32,
    /// Stochastic depth rate of the last block.
    #[arg(long, default_value_t = recipe::DROP_PATH_RATE)]
    pub drop_path: f64,
    /// Linear warmup steps (default: a tenth of the steps).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// cpu, cuda (the steps run on the GPU, bf16; an error without a usable one) or auto (says
    /// what it chose).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Clip the gradient norm (0: off; BEiT fine-tuning does not clip).
    #[arg(long, default_value_t = recipe::CLIP_GRAD_NORM)]
    pub clip: f64,
    /// Smallest random-resized-crop area fraction (BEiT / timm: 0.08).
    #[arg(long, default_value_t = recipe::MIN_CROP_SCALE)]
    pub min_crop_scale: f64,
    /// Horizontal flip probability.
    #[arg(long, default_value_t = recipe::FLIP_PROB)]
    pub flip: f64,
    /// Seeds the head init (and a from-scratch model), the subset, the data and drop path.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 1)]
    pub loader_workers: usize,
    /// Print a JSON line every K steps (and after the last).
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
    /// Where the fine-tuned HF directory (BeitForImageClassification) is written.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A BeitForImageClassification directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Labelled data (`.beitds`).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the result (top-1, confusion matrix, per-class accuracy) as one JSON line.
    #[arg(long)]
    pub json: bool,
}

fn parse_size(s: &str) -> beit::Result<(usize, usize)> {
    let bad = || beit::Error::InvalidArgument(format!("--image-size {s:?}: expected HxW or one number"));
    let parts: Vec<&str> = s.split('x').collect();
    let nums: Vec<usize> = parts.iter().map(|p| p.trim().parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    match nums[..] {
        [n] => Ok((n, n)),
        [h, w] => Ok((h, w)),
        _ => Err(bad()),
    }
}

pub fn finetune(a: FinetuneArgs) -> beit::Result<()> {
    match a.task {
        Task::Classify => finetune_classify(a),
    }
}

fn finetune_classify(a: FinetuneArgs) -> beit::Result<()> {
    crate::safety::Paths::new()
        .read_opt("--model", a.model.as_ref())
        .read_config("--config", &a.config)
        .read("--data", &a.data)
        .write_model_dir("--out", &a.out)
        .check()?;
    if a.batch == 0 {
        return Err(beit::Error::InvalidArgument("--batch 0: a batch needs at least one image".into()));
    }
    let device: Device = a.device.parse()?;
    let ctx = Context::new(&ContextOptions { device, threads: a.threads, ..Default::default() })?;
    let full = Arc::new(Dataset::open(&a.data)?);
    let labels = dataset_labels(&full)?;
    let num_labels = match a.num_labels {
        Some(k) => k,
        None => num_labels_from_data(&labels)?,
    };
    let subset = label_fraction_subset(&labels, a.label_fraction, a.seed)?;
    let train_images = subset.as_ref().map_or(full.len(), |s| s.len());

    let (model, fresh) = match &a.model {
        Some(dir) => {
            let pretrained = Model::load(dir)?;
            classifier_from_pretrained(&pretrained, num_labels, a.drop_path, a.seed)?
        }
        None => {
            let config = presets::config_from(&a.config)?;
            let model = recipe::classifier_from_config(&config, num_labels, a.drop_path, a.seed)?;
            (model, vec!["(all: from scratch)".into()])
        }
    };
    let model = match &a.image_size {
        Some(s) => {
            let (h, w) = parse_size(s)?;
            model.with_image_size(h, w)?
        }
        None => model,
    };
    eprintln!("beit finetune: fresh parameters: {}", fresh.join(", "));
    let steps = total_steps(train_images, a.batch, a.epochs, a.steps)?;
    let options = TrainerOptions {
        learning_rate: a.lr,
        min_learning_rate: a.min_lr,
        warmup_steps: a.warmup_steps.unwrap_or(default_warmup_steps(steps)),
        weight_decay: a.weight_decay,
        clip_grad_norm: a.clip,
        drop_path_rate: Some(a.drop_path),
        layer_decay: a.layer_decay,
        seed: a.seed,
        ..recipe::trainer_options(steps)
    };
    let mut trainer = Trainer::new_classifier(model, options)?;
    // A cuda context runs the steps on the GPU.
    trainer.use_context(&ctx)?;
    eprintln!("beit finetune: device {}", ctx.device_note());

    // Everything is validated: from here on the run writes into --out.
    crate::safety::remove_stale_temp_files(&a.out, &[CONFIG_FILE, WEIGHTS_FILE, SUBSET_FILE])?;
    let out_dir = beit::files::OutputDir::create(&a.out)?;
    // The labelled subset, under a temporary name in --out: if the run is killed before it is
    // mapped and removed, the next run in --out removes it.
    let data = subset_dataset(&full, subset.as_deref(), &a.out)?;
    if let Some(subset) = &subset {
        eprintln!("beit finetune: {} of {} labelled samples (fraction {})", subset.len(), full.len(), a.label_fraction);
    }
    let feed = FinetuneData {
        batch_size: a.batch,
        steps,
        label_smoothing: a.label_smoothing,
        crop_scale: (a.min_crop_scale, 1.0),
        flip_prob: a.flip,
        seed: a.seed,
        workers: a.loader_workers,
    };
    let start = std::time::Instant::now();
    let (mut window_loss, mut window_n, mut window_images, mut window_start) =
        (0.0, 0u64, 0usize, std::time::Instant::now());
    let mut last_loss = f64::NAN;
    let mut progress = crate::progress::Progress::new("beit finetune", 0, steps);
    ctx.run(|| {
        run_finetune(&mut trainer, data.clone(), &feed, |s| {
            window_loss += s.loss;
            window_n += 1;
            window_images += (s.images_per_s * s.seconds).round() as usize;
            last_loss = s.loss;
            if s.step % a.log_every.max(1) == 0 || s.step == steps {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                crate::output::print_json(serde_json::json!({"step": s.step, "loss": window_loss / window_n as f64,
                    "lr": s.lr, "grad_norm": s.grad_norm, "images_per_s": window_images as f64 / secs}));
                (window_loss, window_n, window_images, window_start) = (0.0, 0, 0, std::time::Instant::now());
            }
            progress.update(s.step, &format!("loss {:.4}, {:.1} images/s", s.loss, s.images_per_s));
        })
    })?;
    trainer.into_model().save(&a.out)?;
    out_dir.keep();
    crate::output::print_json(serde_json::json!({"command": "finetune", "task": "classify", "steps": steps,
        "final_loss": last_loss, "seconds": start.elapsed().as_secs_f64(), "train_images": data.len(),
        "num_labels": num_labels, "threads": ctx.threads(), "model": a.out.display().to_string()}));
    Ok(())
}

pub fn eval(a: EvalArgs) -> beit::Result<()> {
    let ctx = Context::new(&ContextOptions { device: Device::Cpu, threads: a.threads, ..Default::default() })?;
    let model = Model::load(&a.model)?;
    let ds = Dataset::open(&a.data)?;
    let start = std::time::Instant::now();
    let mut progress = crate::progress::Progress::new("beit eval", 0, ds.len() as u64);
    let result = ctx.run(|| {
        beit::train::evaluate::evaluate(&model, &ds, a.batch, |done, _| progress.update(done as u64, "images"))
    })?;
    let seconds = start.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&result).map_err(|e| beit::Error::Internal(e.to_string()))?;
        v["command"] = "eval".into();
        v["seconds"] = seconds.into();
        crate::output::print_json(v);
    } else {
        println!("top-1 {:.4} ({}/{} images, {:.1} s)", result.top1, result.correct, result.images, seconds);
        println!("confusion matrix (rows: true label, columns: predicted):");
        for row in &result.confusion {
            println!("{}", row.iter().map(|c| format!("{c:6}")).collect::<String>());
        }
    }
    Ok(())
}
