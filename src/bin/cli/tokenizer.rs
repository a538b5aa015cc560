//! `beit tokenizer train` and `beit tokenize`: the visual tokenizer from the command line.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use beit::data::dataset::Dataset;
use beit::data::token_cache::{check_dataset_channels, dataset_inputs, tokenize_dataset};
use beit::dvae::eval::{evaluate, write_recon_grid};
use beit::dvae::{Dvae, DvaeConfig};
use beit::model::io::{CONFIG_FILE, WEIGHTS_FILE};
use beit::train::dvae::{DvaeTrainOptions, DvaeTrainer};
use beit::train::dvae_run::{train_on_dataset, DvaeDataOptions};
use beit::{Context, ContextOptions, Device};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a dVAE tokenizer (Gumbel-softmax relaxation, KL to a uniform prior, squared-error
    /// reconstruction) on a dataset file's images, augmented by the loader (random resized crop
    /// and flip). Writes OUT/config.json and OUT/model.safetensors (atomically, at the end),
    /// OUT/reconstructions.png (held-out originals beside their reconstructions from the hard
    /// tokens) and prints a JSON report: reconstruction error and codebook perplexity.
    Train(TrainArgs),
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training images (`.beitds`).
    #[arg(long)]
    data: PathBuf,
    /// Held-out images for the report and the PNG (default: --data).
    #[arg(long)]
    eval_data: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Input resolution of the tokenizer (a multiple of 2^(groups-1)).
    #[arg(long, default_value_t = 32)]
    image_size: usize,
    /// Codebook size.
    #[arg(long, default_value_t = 8192)]
    vocab: usize,
    /// Width of the first group (later groups double it).
    #[arg(long, default_value_t = 32)]
    n_hid: usize,
    /// Residual groups; the token grid is image_size / 2^(groups-1).
    #[arg(long, default_value_t = 3)]
    groups: usize,
    #[arg(long, default_value_t = 1)]
    blocks_per_group: usize,
    #[arg(long, default_value_t = 64)]
    decoder_width: usize,
    #[arg(long, default_value_t = 600)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Final weight of the KL term (reached after a fifth of the steps).
    #[arg(long, default_value_t = 5e-3)]
    kl_weight: f32,
    /// Gumbel-softmax temperature at the start and after 70% of the steps (exponential decay).
    #[arg(long, default_value_t = 1.0)]
    tau_start: f32,
    #[arg(long, default_value_t = 0.125)]
    tau_end: f32,
    /// Smallest crop area fraction of the random resized crop.
    #[arg(long, default_value_t = 0.5)]
    crop_scale_min: f64,
    /// Held-out images scored at the end.
    #[arg(long, default_value_t = 1000)]
    eval_images: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda (the training steps run on the GPU, in fp32; the final report's tokenizing and
    /// decoding run on the CPU) or auto (the CPU; see `beit info`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// One JSON line per logged step on stdout.
    #[arg(long)]
    json: bool,
    /// Log every K steps.
    #[arg(long, default_value_t = 50)]
    log_every: usize,
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// A tokenizer directory (`beit tokenizer train`, or a converted DALL-E encoder).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Images to tokenize (`.beitds`).
    #[arg(long)]
    data: PathBuf,
    /// The token cache: a copy of --data whose samples carry their visual tokens.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The files `beit tokenizer train` writes into --out besides the tokenizer's own.
const PNG_FILE: &str = "reconstructions.png";
const REPORT_FILE: &str = "report.json";

/// Refuses, before any training, held-out images the report could not be made from: none at
/// all, another channel count than the tokenizer's (grey images are replicated, as
/// `beit tokenize` does), or more than the memory budget allows.
fn check_eval_data(eval: &Dataset, what: &str, dvae: &Dvae, eval_images: usize) -> beit::Result<()> {
    use beit::resources::{Bytes, Need};
    check_dataset_channels(dvae, eval.header().channels as usize)
        .map_err(|e| beit::Error::InvalidArgument(format!("{what}: {}", e.message())))?;
    if eval_images == 0 {
        return Err(beit::Error::InvalidArgument("--eval-images 0: the report needs at least one image".into()));
    }
    if eval.is_empty() {
        return Err(beit::Error::InvalidArgument(format!("{what} holds no images for the report")));
    }
    // The held-out images and their reconstructions, as mapped floats.
    let images = eval_images.min(eval.len());
    Need::new(format!("the report's {images} held-out images"), Bytes::floats(&[images, dvae.image_len()]) * 2)
        .hint("lower --eval-images")
        .check()
}

pub fn train(a: TrainArgs) -> beit::Result<()> {
    crate::safety::Paths::new()
        .read("--data", &a.data)
        .read_opt("--eval-data", a.eval_data.as_ref())
        .write_model_dir("--out", &a.out)
        .write("--out", a.out.join(PNG_FILE))
        .write("--out", a.out.join(REPORT_FILE))
        .check()?;
    let device: Device = a.device.parse()?;
    let ctx = Context::new(&ContextOptions { device, threads: a.threads, ..Default::default() })?;
    let ds = Arc::new(Dataset::open(&a.data)?);
    let channels = ds.header().channels as usize;
    if channels != 1 && channels != 3 {
        return Err(beit::Error::InvalidArgument(format!(
            "--data has {channels} channels: the tokenizer's report ({PNG_FILE}) shows grey (1) or RGB (3) images"
        )));
    }
    let config = DvaeConfig {
        in_channels: channels,
        image_size: a.image_size,
        vocab_size: a.vocab,
        n_hid: a.n_hid,
        group_count: a.groups,
        n_blk_per_group: a.blocks_per_group,
        decoder_n_init: Some(a.decoder_width),
        ..DvaeConfig::small_grey(a.image_size)
    };
    let dvae = Dvae::new(config, a.seed)?;
    // Everything the report needs is checked now: a run that trains is a run that writes.
    let eval_ds = match &a.eval_data {
        Some(p) => Arc::new(Dataset::open(p)?),
        None => ds.clone(),
    };
    let eval_what = if a.eval_data.is_some() { "--eval-data" } else { "--data" };
    check_eval_data(&eval_ds, eval_what, &dvae, a.eval_images)?;
    let options = DvaeTrainOptions {
        lr: a.lr,
        kl_weight: a.kl_weight,
        tau_start: a.tau_start,
        tau_end: a.tau_end,
        seed: a.seed,
        ..DvaeTrainOptions::for_steps(a.steps)
    };
    let mut trainer = DvaeTrainer::new(dvae, options)?;
    trainer.use_context(&ctx)?;
    let data =
        DvaeDataOptions { crop_scale_min: a.crop_scale_min, seed: a.seed, ..DvaeDataOptions::new(a.steps, a.batch) };
    let start = std::time::Instant::now();
    let run = train_on_dataset(&mut trainer, &ctx, ds.clone(), &data, |stats| {
        let step = stats.step + 1;
        if step % a.log_every.max(1) == 0 || step == a.steps {
            let line = serde_json::json!({"step": step, "loss": stats.loss, "recon_mse": stats.recon_mse,
                "kl": stats.kl, "perplexity": stats.perplexity, "tau": stats.tau, "lr": stats.lr,
                "seconds": start.elapsed().as_secs_f64()});
            if a.json {
                println!("{line}");
            } else {
                eprintln!(
                    "step {step}/{}: recon {:.5}, kl {:.3}, perplexity {:.1}, tau {:.3}, {:.0} s",
                    a.steps,
                    stats.recon_mse,
                    stats.kl,
                    stats.perplexity,
                    stats.tau,
                    start.elapsed().as_secs_f64()
                );
            }
        }
        ControlFlow::Continue(())
    })?;
    let last = run.last;
    let train_seconds = start.elapsed().as_secs_f64();
    let trainer_on_cuda = trainer.on_cuda();
    let dvae = trainer.dvae;
    let mapped = dataset_inputs(&eval_ds, &dvae, a.eval_images)?;
    let (report, recon) = ctx.run(|| evaluate(&dvae, &mapped))?;
    let shown = 32.min(report.images) * dvae.image_len();
    let png = a.out.join(PNG_FILE);
    let summary = serde_json::json!({"command": "tokenizer train", "steps": a.steps, "batch": a.batch,
        "seconds": train_seconds, "images_per_s": (a.steps * a.batch) as f64 / train_seconds,
        "final_train_recon_mse_mapped": last.map(|l| l.recon_mse), "eval": report,
        "vocab_size": dvae.config.vocab_size, "grid": dvae.config.grid(), "out": a.out.display().to_string(),
        "png": png.display().to_string(), "threads": ctx.threads(),
        "device": if trainer_on_cuda { "cuda" } else { "cpu" }});
    // Written only now that everything that can fail has succeeded.
    crate::safety::remove_stale_temp_files(&a.out, &[CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE])?;
    let out_dir = beit::files::OutputDir::create(&a.out)?;
    dvae.save(&a.out)?;
    write_recon_grid(&png, &mapped[..shown], &recon[..shown], channels, a.image_size, 8)?;
    let report_text = serde_json::to_string_pretty(&summary).expect("json");
    beit::files::write_atomic(&a.out.join(REPORT_FILE), report_text.as_bytes())?;
    out_dir.keep();
    println!("{summary}");
    Ok(())
}

pub fn tokenize(a: TokenizeArgs) -> beit::Result<()> {
    crate::safety::Paths::new()
        .read("--tokenizer", &a.tokenizer)
        .read("--data", &a.data)
        .write("--out", &a.out)
        .check()?;
    let ctx = Context::new(&ContextOptions { device: Device::Cpu, threads: a.threads, ..Default::default() })?;
    let dvae = Dvae::load(&a.tokenizer)?;
    let ds = Dataset::open(&a.data)?;
    let start = std::time::Instant::now();
    let total = ds.len();
    crate::safety::remove_stale_temp_files_of(&a.out)?;
    let h = ctx.run(|| {
        tokenize_dataset(&dvae, &ds, &a.out, |done| {
            eprint!("\rtokenized {done}/{total}");
        })
    })?;
    eprintln!();
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"command": "tokenize", "images": h.count, "grid": [h.token_grid_h, h.token_grid_w],
            "seconds": seconds, "images_per_s": h.count as f64 / seconds, "threads": ctx.threads(),
            "out": a.out.display().to_string()})
    );
    Ok(())
}
