//! `beit bench infer|pretrain|loader`: speed measurements.

use std::path::PathBuf;

use beit::train::recipes::presets;
use beit::{Context, ContextOptions, Device, ImageBatch, Model};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Inference images/s of a model directory (or a built-in preset) on random input.
    Infer(InferArgs),
    /// Pretraining step images/s (forward, backward, AdamW) of a model directory or a preset.
    Pretrain(PretrainArgs),
    /// Augmenting two-view loader images/s over a dataset file (JSON on stdout).
    Loader(LoaderArgs),
}

#[derive(clap::Args)]
pub struct InferArgs {
    /// Model directory; if absent, a randomly initialised model of `--preset`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Built-in config when no --model is given: base (BEiT-B/16 224) or tiny32.
    #[arg(long, default_value = "base")]
    pub preset: String,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Timed passes after one warm-up pass.
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Model directory (BeitForMaskedImageModeling); if absent, a fresh model of --config.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Built-in config when no --model is given.
    #[arg(long, default_value = "tiny32")]
    pub config: String,
    /// A batch file (`beit pretrain-replay` format); if absent, a synthetic batch.
    #[arg(long)]
    pub batch_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Masked patches per image of the synthetic batch.
    #[arg(long, default_value_t = 26)]
    pub masked: usize,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// cpu or cuda (the GPU step; timed with a device synchronisation per step).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the GPU step: bf16 or fp32.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct LoaderArgs {
    #[arg(long)]
    pub dataset: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// View 1 size (square); the tokenizer view is half of it. 32 matches tiny32.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    #[arg(long, default_value_t = 4)]
    pub patch: usize,
    #[arg(long, default_value_t = 26)]
    pub masked: usize,
    /// Batches timed (at most one epoch).
    #[arg(long, default_value_t = 200)]
    pub batches: usize,
}

pub fn run(what: BenchCommand) -> beit::Result<()> {
    match what {
        BenchCommand::Infer(a) => bench_infer(a),
        BenchCommand::Pretrain(a) => bench_pretrain(a),
        BenchCommand::Loader(a) => bench_loader(a),
    }
}

fn bench_infer(a: InferArgs) -> beit::Result<()> {
    let InferArgs { model, preset: preset_name, batch, threads, iters, json } = a;
    let ctx = Context::new(&ContextOptions { device: Device::Cpu, threads, ..Default::default() })?;
    let model = match model {
        Some(dir) => Model::load(&dir)?,
        None => {
            let preset = presets::preset(&preset_name)?;
            Model::new_random(preset.config()?, preset.architecture, 0)?
        }
    };
    let cfg = model.config();
    let (h, w) = cfg.image_size.hw();
    let c = cfg.num_channels;
    beit::resources::Need::new(
        format!("the benchmark's {batch} random images"),
        beit::resources::Bytes::floats(&[batch, c, h, w]),
    )
    .hint("use a smaller --batch")
    .check()?;
    let mut pixels = beit::resources::try_zeroed::<f32>(batch * c * h * w, "the benchmark's images")?;
    pixels.iter_mut().enumerate().for_each(|(i, p)| *p = ((i * 7919 % 2003) as f32 / 1001.5) - 1.0);
    let input = ImageBatch { pixels: &pixels, batch, channels: c, height: h, width: w, bool_masked_pos: None };
    ctx.run(|| model.forward(&input))?;
    let mut times = Vec::new();
    for _ in 0..iters.max(1) {
        let start = std::time::Instant::now();
        ctx.run(|| model.forward(&input))?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let images_per_s = batch as f64 / median;
    if json {
        println!(
            "{}",
            serde_json::json!({"command": "bench infer", "batch": batch, "threads": ctx.threads(),
                "median_s": median, "images_per_s": images_per_s, "params": model.params().count()})
        );
    } else {
        println!(
            "beit bench infer: batch {batch}, {} threads: {:.3} s/pass median, {:.2} images/s",
            ctx.threads(),
            median,
            images_per_s
        );
    }
    Ok(())
}

fn bench_pretrain(a: PretrainArgs) -> beit::Result<()> {
    use beit::data::batch::OwnedMimBatch;
    use beit::data::synthetic::SyntheticMim;
    use beit::train::trainer::{Trainer, TrainerOptions, WeightDecayOn};
    let PretrainArgs { model, config, batch_file, batch, masked, threads, iters, warmup, device, precision, json } = a;
    let ctx = Context::new(&ContextOptions { device: device.parse()?, threads, ..Default::default() })?;
    let precision: beit::train::gpu_pretrain::Precision = precision.parse()?;
    let model = match model {
        Some(dir) => Model::load(&dir)?,
        None => Model::new_random(presets::config_from(&config)?, beit::Architecture::MaskedImageModeling, 0)?,
    };
    let data = match batch_file {
        Some(path) => OwnedMimBatch::load(&path)?,
        None => SyntheticMim::for_config(model.config(), masked, 0).try_batch(0, batch)?,
    };
    // What scripts/bench_torch_pretrain.py runs: torch.optim.AdamW(lr 1.5e-3, betas (0.9, 0.999),
    // eps 1e-8, weight decay 0.05 on every parameter), no clipping, the config's drop path.
    let options = TrainerOptions {
        learning_rate: 1.5e-3,
        beta2: 0.999,
        clip_grad_norm: 0.0,
        weight_decay_on: WeightDecayOn::All,
        ..TrainerOptions::default()
    };
    let mut trainer = Trainer::new(model, options)?;
    if ctx.device() == Device::Cuda {
        trainer.use_cuda(precision)?;
        // Steady-state steps: the parameters stay on the GPU (each step still reads its loss
        // and gradient norm back, which synchronises the device, so the timing is complete).
        trainer.defer_host_copy(true);
    }
    let b = data.shape[0];
    let mut losses = Vec::new();
    let mut times = Vec::new();
    for i in 0..warmup + iters.max(1) {
        let start = std::time::Instant::now();
        let stats = ctx.run(|| trainer.step(&data.as_batch()))?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
        losses.push(stats.loss);
    }
    let step_times = times.clone();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let images_per_s = b as f64 / median;
    let rss = peak_rss_mb();
    if json {
        crate::output::print_json(
            serde_json::json!({"command": "bench pretrain", "batch": b, "threads": ctx.threads(),
            "device": format!("{:?}", ctx.device()).to_lowercase(),
            "precision": trainer.cuda_precision().map_or("fp32", |p| p.name()),
            "median_s": median, "images_per_s": images_per_s, "step_times_s": step_times,
            "peak_rss_mb": rss, "first_loss": losses[0], "last_loss": losses[losses.len() - 1],
            "params": trainer.model().params().count()}),
        );
    } else {
        println!(
            "beit bench pretrain: batch {b}, {} threads: {median:.3} s/step median, {images_per_s:.1} images/s, \
             peak RSS {:.0} MiB, loss {:.4} -> {:.4}",
            ctx.threads(),
            rss.unwrap_or(f64::NAN),
            losses[0],
            losses[losses.len() - 1]
        );
    }
    Ok(())
}

fn bench_loader(a: LoaderArgs) -> beit::Result<()> {
    use beit::data::loader::{Loader, LoaderConfig};
    let LoaderArgs { dataset: file, batch, threads, image_size, patch, masked, batches } = a;
    let ds = std::sync::Arc::new(beit::data::dataset::Dataset::open(&file)?);
    let config = LoaderConfig {
        workers: threads.max(1),
        prefetch: 2 * threads.max(1),
        ..LoaderConfig::beit(batch, (image_size, image_size), (patch, patch), masked)
    };
    let loader = Loader::new(ds, config)?;
    let n = batches.min(loader.num_batches());
    let start = std::time::Instant::now();
    let images: usize = loader.iter()?.take(n).map(|b| b.len()).sum();
    let seconds = start.elapsed().as_secs_f64();
    crate::output::print_json(serde_json::json!({"command": "bench loader", "dataset": file.display().to_string(),
        "batch": batch, "threads": threads.max(1), "image_size": image_size, "batches": n, "images": images,
        "seconds": seconds, "images_per_s": images as f64 / seconds}));
    Ok(())
}

/// Peak resident memory of this process (VmHWM), in MiB; None where /proc is unavailable.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
