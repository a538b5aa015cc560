//! `beit pretrain`: masked-image-modeling pretraining with checkpoints and exact resume. The
//! recipes (data, token sources, masked count, warmup, resume rules) are in
//! `beit::train::recipes`.

use std::path::PathBuf;

use beit::train::recipes::pretrain::{fresh_model_config, PretrainData, PretrainDataOptions};
use beit::train::recipes::{masking, presets, resume, schedule};
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Context, ContextOptions, Device, Model};

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Model config: a config.json or a preset (tiny32, small32, base); ignored with --model. A
    /// resumed run's model comes from its checkpoint, which records this (it must not change).
    #[arg(long, default_value = "tiny32")]
    pub config: String,
    /// Start from this HF model directory (a BeitForMaskedImageModeling) instead of a fresh one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Data: `synthetic`, or a dataset file (`.beitds`) read through the augmenting loader.
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// What the masked patches are trained to predict: `tokens` (BEiT's visual tokens, the
    /// default) or `pixels` (regress each masked patch's normalised input pixels with mean
    /// squared error: the paper's "−visual tokens" ablation; needs no tokenizer or token cache,
    /// and a fresh model's head gets vocab_size = patch·patch·channels). With --resume the
    /// checkpoint's target continues; naming another one is an error. CPU only.
    #[arg(long)]
    pub target: Option<beit::model::MimTarget>,
    /// Where a dataset's MIM targets come from: `cached` (the file's token cache, made by
    /// `beit tokenize`, of whole images: the model then sees whole, unflipped images too, no
    /// crop augmentation), `augmented` (the --tokenizer run on every batch's augmented view), or
    /// `auto` (cached when the file has tokens, else augmented).
    #[arg(long, default_value = "auto")]
    pub tokens: String,
    /// Tokenizer directory for `--tokens augmented`.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Codebook size of a fresh model's MIM head (default: the config's); set it to the
    /// tokenizer's vocabulary.
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// Loader worker threads (dataset data only).
    #[arg(long, default_value_t = 1)]
    pub loader_workers: usize,
    /// Total steps of the run (a resumed run continues up to this count).
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Patches masked per image (default: 75/196 of the grid, BEiT's ratio).
    #[arg(long)]
    pub masked: Option<usize>,
    /// Which patches a dataset's masks cover: `block` (BEiT's block-wise masking) or `random`
    /// (uniform patches: the paper's ablation).
    #[arg(long, default_value = "block")]
    pub masking: beit::data::masking::MaskingStrategy,
    #[arg(long, default_value_t = 1.5e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    pub min_lr: f64,
    /// Linear warmup steps (default: a tenth of --steps).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Clip the gradient norm (0: off).
    #[arg(long, default_value_t = 3.0)]
    pub clip: f64,
    /// Stochastic depth rate of the last block (default: the config's drop_path_rate).
    #[arg(long)]
    pub drop_path: Option<f64>,
    /// Seeds the model init, the data and the trainer.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// cpu, cuda (the step runs on the GPU) or auto (the CPU; see `beit info`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage precision of the GPU step: bf16 (GEMMs and attention in bf16 with fp32
    /// accumulation, fp32 master weights) or fp32 (parity with the CPU). CPU steps are fp32.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Save a checkpoint every K steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Continue from OUT/checkpoint.safetensors when it exists. The checkpoint's trainer options
    /// (learning rate, schedule, ...) and model win (--config, --model and --vocab-size are
    /// ignored); the options that decide the data (--batch, --data, --masking, --masked,
    /// --tokens, --tokenizer, --target, --seed) are recorded in it and must be given again
    /// unchanged.
    #[arg(long)]
    pub resume: bool,
    /// Start a fresh run even though OUT holds a checkpoint (its first checkpoint replaces the
    /// old one). Without --resume or --overwrite, an existing checkpoint is an error.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// One JSON line per step on stdout.
    #[arg(long)]
    pub json: bool,
}

impl PretrainArgs {
    /// The options that decide the run's data.
    pub fn data_options(&self) -> PretrainDataOptions {
        PretrainDataOptions {
            data: self.data.clone(),
            tokens: self.tokens.clone(),
            tokenizer: self.tokenizer.clone(),
            masking: self.masking,
            batch: self.batch,
            loader_workers: self.loader_workers,
            seed: self.seed,
        }
    }
}

pub fn pretrain(a: PretrainArgs) -> beit::Result<()> {
    let checkpoint = a.out.join("checkpoint.safetensors");
    let model_dir = a.out.join("model");
    let data_options = a.data_options();
    crate::safety::Paths::new()
        .read_config("--config", &a.config)
        .read_opt("--model", a.model.as_ref())
        .read_opt("--data", (!data_options.is_synthetic()).then_some(&a.data))
        .read_opt("--tokenizer", a.tokenizer.as_ref())
        .write("--out", &checkpoint)
        .write_model_dir("--out", &model_dir)
        .check()?;
    resume::check_fresh_start(&checkpoint, a.resume, a.overwrite)?;
    let device: Device = a.device.parse()?;
    if let (Device::Cuda, Some(target)) = (device, a.target) {
        beit::train::gpu_pretrain::GpuPretrainer::check_target(target)?;
    }
    let ctx = Context::new(&ContextOptions { device, threads: a.threads, ..Default::default() })?;
    let precision: beit::train::gpu_pretrain::Precision = a.precision.parse()?;
    let resuming = a.resume && checkpoint.is_file();
    let mut trainer = if resuming {
        let t = Trainer::from_checkpoint(&checkpoint)?;
        resume::check_target(&checkpoint, t.options().mim_target, a.target)?;
        t
    } else {
        let target = a.target.unwrap_or_default();
        let model = match &a.model {
            Some(dir) => Model::load(dir)?,
            None => {
                let (cfg, derived) = fresh_model_config(presets::config_from(&a.config)?, a.vocab_size, target);
                if let Some(v) = derived {
                    eprintln!("beit pretrain: the {target} target predicts {v} values per patch: vocab_size {v}");
                }
                Model::new_random(cfg, beit::Architecture::MaskedImageModeling, a.seed)?
            }
        };
        let options = TrainerOptions {
            learning_rate: a.lr,
            min_learning_rate: a.min_lr,
            warmup_steps: a.warmup_steps.unwrap_or(schedule::default_warmup_steps(a.steps)),
            total_steps: a.steps,
            weight_decay: a.weight_decay,
            clip_grad_norm: a.clip,
            drop_path_rate: a.drop_path,
            seed: a.seed,
            mim_target: target,
            ..TrainerOptions::default()
        };
        Trainer::new(model, options)?
    };
    if ctx.device() == Device::Cuda {
        trainer.use_cuda(precision)?;
        // Parameters come back only for checkpoints and the final save (sync_host below).
        trainer.defer_host_copy(true);
    }
    let cfg = trainer.model().config().clone();
    let masked = a.masked.unwrap_or(masking::default_masked_patches(cfg.native_grid()));
    let target = trainer.options().mim_target;
    let (mut data, token_source) = PretrainData::open(&data_options, &cfg, masked, trainer.options().seed, target)?;
    let record = resume::pretrain_record(&data_options, masked, target, token_source)?;
    if resuming {
        match resume::check_record(&checkpoint, trainer.run_record(), &record)? {
            resume::RecordCheck::Unrecorded => eprintln!(
                "beit pretrain: note: {} holds no record of its run's data options (written by an older beit or \
                 through the C API), so they could not be checked; it will from now on",
                checkpoint.display()
            ),
            resume::RecordCheck::Matches { moved } => {
                for moved in &moved {
                    eprintln!("beit pretrain: note: same content at another path: {moved}");
                }
            }
        }
        eprintln!(
            "beit pretrain: resuming from {} at step {} ({target} target)",
            checkpoint.display(),
            trainer.step_count()
        );
    }
    trainer.set_run_record(Some(record));
    // Everything is validated: from here on the run writes.
    crate::safety::remove_stale_temp_files(&a.out, &["checkpoint.safetensors"])?;
    crate::safety::remove_stale_temp_files(&model_dir, &crate::safety::MODEL_FILES)?;
    let out_dir = beit::files::OutputDir::create(&a.out)?;
    let start = std::time::Instant::now();
    let first_step = trainer.step_count();
    let mut progress = crate::progress::Progress::new("beit pretrain", first_step, a.steps);
    let mut last_loss = f64::NAN;
    while trainer.step_count() < a.steps {
        let position = trainer.data_position();
        let batch = ctx.run(|| data.batch_at(position, a.batch))?;
        let stats = ctx.run(|| trainer.step(&batch.as_batch()))?;
        last_loss = stats.loss;
        if a.json {
            crate::output::print_json(serde_json::json!({"step": stats.step, "loss": stats.loss, "lr": stats.lr,
                "grad_norm": stats.grad_norm, "masked": stats.masked, "images_per_s": stats.images_per_s}));
        } else {
            let detail = format!(
                "loss {:.4}, lr {:.2e}, grad norm {:.3}, {:.1} images/s",
                stats.loss, stats.lr, stats.grad_norm, stats.images_per_s
            );
            progress.update(stats.step, &detail);
        }
        if a.checkpoint_every > 0 && stats.step % a.checkpoint_every == 0 && stats.step < a.steps {
            trainer.save_checkpoint(&checkpoint)?;
        }
    }
    trainer.save_checkpoint(&checkpoint)?;
    trainer.sync_host()?;
    trainer.model().save(&model_dir)?;
    out_dir.keep();
    let steps_run = trainer.step_count() - first_step;
    let seconds = start.elapsed().as_secs_f64();
    crate::output::print_json(
        serde_json::json!({"command": "pretrain", "steps": trainer.step_count(), "steps_run": steps_run,
        "target": target.name(), "final_loss": last_loss, "seconds": seconds,
        "images_per_s": (steps_run as f64 * a.batch as f64) / seconds.max(1e-9),
        "threads": ctx.threads(), "device": format!("{:?}", ctx.device()).to_lowercase(),
        "checkpoint": checkpoint.display().to_string(),
        "model": model_dir.display().to_string()}),
    );
    Ok(())
}
