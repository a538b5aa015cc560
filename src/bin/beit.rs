//! The `beit` command line: a thin layer over the Rust API.

use std::path::PathBuf;
use std::process::ExitCode;

use beit::model::io::{f32_tensors_bytes, read_f32, read_mask, write_atomic, SafetensorsFile};
use beit::train::recipes::presets;
use beit::{Context, ContextOptions, Device, ImageBatch, Model};
use clap::{Parser, Subcommand};

#[path = "cli/finetune.rs"]
mod finetune_cli;
#[path = "cli/info.rs"]
mod info_cli;
#[path = "cli/progress.rs"]
mod progress;
#[path = "cli/safety.rs"]
mod safety;
#[path = "cli/segment.rs"]
mod segment_cli;
#[path = "cli/tokenizer.rs"]
mod tokenizer_cli;

#[derive(Parser)]
#[command(name = "beit", version, about = "BEiT vision transformers: inference, pretraining, fine-tuning")]
struct Cli {
    /// How much memory one model, trainer, batch pass, loader or tokenizer may need: `available`
    /// (the default: what this process can still get) or a size such as 512M or 8G. Larger
    /// needs are refused before anything is allocated.
    #[arg(long, global = true, default_value = "available")]
    memory_budget: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe this machine as libbeit sees it (JSON): the device `auto` picks, the GPU, the
    /// driver and NVRTC versions, or why CUDA is not usable.
    Info,
    /// Run a model directory on the tensors of a safetensors file.
    ///
    /// Inputs: `pixel_values` f32 [B,C,H,W], optional `bool_masked_pos` u8 [B,N].
    /// Outputs: `last_hidden_state` (as HF BeitModel returns it), `pooler_output` where the
    /// model has a pooler, `logits` where it has a head.
    Infer {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Worker threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print a one-line JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Create a randomly initialised model (BEiT's init scheme) and save it as an HF directory.
    Create {
        /// A config.json to start from, or a built-in preset name (base, tiny32).
        #[arg(long, default_value = "tiny32")]
        config: String,
        /// BeitModel, BeitForMaskedImageModeling or BeitForImageClassification (default: the
        /// config's `architectures`, else the preset's).
        #[arg(long)]
        architecture: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Masked-image-modeling pretraining with checkpoints and exact resume.
    ///
    /// Data: `synthetic` (a generated task whose tokens are each patch's quantised brightness
    /// and gradient direction; reproducible from --seed and the batch position). Prints one JSON
    /// line per step with --json. Writes OUT/checkpoint.safetensors (atomically, every
    /// --checkpoint-every steps and at the end) and OUT/model (an HF model directory).
    Pretrain(PretrainArgs),
    /// Replay N AdamW steps on one fixed batch (no schedule, no clipping, no drop path unless
    /// asked), print `{"step", "loss"}` per step, and write the updated HF model directory.
    ///
    /// The batch file holds `pixel_values` f32 [B,C,H,W], `bool_masked_pos` u8 [B,N] and
    /// `labels` (integer) [B,N]: the visual token of every patch (only masked ones count).
    PretrainReplay(ReplayArgs),
    /// Measure speed. `beit bench infer`: forward passes per second on random pixels.
    /// `beit bench pretrain`: pretraining steps per second.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Image datasets in the `.beitds` format (docs/dataset-format.md).
    /// `beit dataset import`: convert IDX, NumPy .npy, image folders or emoji packages.
    /// `beit dataset info`: validate a file and print its header as one JSON line.
    Dataset {
        #[command(subcommand)]
        what: DatasetCommand,
    },
    /// Visual tokenizers (dVAE). `beit tokenizer train`: train one on a dataset file.
    Tokenizer {
        #[command(subcommand)]
        what: tokenizer_cli::TokenizerCommand,
    },
    /// Tokenize a dataset once into a token cache: a copy of the file whose samples carry the
    /// visual tokens of the whole image, for pretraining's fast path.
    Tokenize(tokenizer_cli::TokenizeArgs),
    /// Fine-tune a pretrained directory (or a fresh model) on a labelled dataset and save an HF
    /// directory. `--task classify`: BeitForImageClassification with BEiT's recipe (layer-wise
    /// lr decay, warmup + cosine, AdamW, label smoothing, drop path, random resized crops).
    /// Prints one JSON line per --log-every steps (step, loss, lr, images/s); progress on stderr.
    Finetune(finetune_cli::FinetuneArgs),
    /// Top-1 accuracy and the confusion matrix of a classifier on a labelled dataset.
    Eval(finetune_cli::EvalArgs),
    /// Semantic segmentation (BeitForSemanticSegmentation): `beit segment finetune`, `beit
    /// segment eval`.
    Segment {
        #[command(subcommand)]
        what: segment_cli::SegmentCommand,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ImportFormat {
    /// MNIST-style IDX files (raw or gzip).
    Idx,
    /// NumPy .npy arrays.
    Npy,
    /// A folder with one sub-folder of PNG/JPEG images per class.
    ImageFolder,
    /// An unpacked emoji-datasource-<set> npm package.
    Emoji,
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Convert images (and labels) into a dataset file, written atomically.
    ///
    /// Formats (details in docs/dataset-format.md):
    ///
    /// idx: --images FILE [--labels FILE] [--pad HxW]. MNIST-style IDX, u8 images [N,H,W], u8
    /// labels [N], raw or gzip; --pad centres each image on a black HxW canvas (28 -> 32).
    ///
    /// npy: --images X.npy [--labels Y.npy]. NumPy .npy (v1-v3, C order): images [N,H,W] or
    /// [N,H,W,C] of u1, or f4/f8 in [0,1] (stored as round(x*255)); labels [N] of any integer dtype.
    ///
    /// image-folder: --dir DIR --size HxW [--channels 1|3]. DIR/<class>/*.png|jpg|jpeg; labels are
    /// the sorted class folder names; images are converted to grey or RGB and resized (bilinear)
    /// to HxW. Class names go to OUT.classes.json.
    ///
    /// emoji: --dir PACKAGE --set google|twitter [--size 64]. An unpacked emoji-datasource-<set>
    /// npm package (scripts/fetch-emoji): RGB over black, label = category (sorted), mask =
    /// category + 1 where alpha >= 128, else 0. Category names go to OUT.classes.json.
    #[command(verbatim_doc_comment)]
    Import {
        /// Source format: idx, npy, image-folder or emoji.
        #[arg(long, value_enum, default_value = "idx")]
        format: ImportFormat,
        /// Image file (idx, npy).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Label file (idx, npy; optional).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Folder to import (image-folder: one sub-folder per class; emoji: the package root).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Output image size, HxW or one number for a square (image-folder: required; emoji:
        /// which img/<set>/<size> folder, default 64).
        #[arg(long)]
        size: Option<String>,
        /// Output channels for image-folder: 1 (grey) or 3 (RGB).
        #[arg(long, default_value_t = 3)]
        channels: u32,
        /// Emoji image set: google or twitter.
        #[arg(long)]
        set: Option<String>,
        /// idx: centre every image on a zero canvas of this size (HxW or one number).
        #[arg(long)]
        pad: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Open (and so fully validate) a dataset file and print count, shape and sections as JSON.
    Info { file: PathBuf },
    /// Write chosen samples of one or more dataset files into a new file, in the order given,
    /// written atomically. Each INPUT is FILE (every sample), FILE:train or FILE:test (the
    /// train or test split of `beit segment finetune` with the same --test-fraction and
    /// --split-seed). E.g. pretraining images without the fine-tune's test images:
    /// `beit dataset combine --out pre.beitds twitter.beitds google.beitds:train`.
    /// Inputs must share one image shape; labels, masks and tokens are kept when every input has
    /// them and dropped otherwise (the JSON line lists what was dropped).
    Combine {
        /// FILE, FILE:train or FILE:test.
        #[arg(required = true)]
        inputs: Vec<String>,
        /// Fraction of each split input's samples in its test split.
        #[arg(long, default_value_t = 0.2)]
        test_fraction: f64,
        /// Seed of the train/test shuffle.
        #[arg(long, default_value_t = 0)]
        split_seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct PretrainArgs {
    /// Model config: a config.json or a preset (tiny32, small32, base); ignored with --model. A
    /// resumed run's model comes from its checkpoint, which records this (it must not change).
    #[arg(long, default_value = "tiny32")]
    config: String,
    /// Start from this HF model directory (a BeitForMaskedImageModeling) instead of a fresh one.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Data: `synthetic`, or a dataset file (`.beitds`) read through the augmenting loader.
    #[arg(long, default_value = "synthetic")]
    data: String,
    /// What the masked patches are trained to predict: `tokens` (BEiT's visual tokens, the
    /// default) or `pixels` (regress each masked patch's normalised input pixels with mean
    /// squared error: the paper's "−visual tokens" ablation; needs no tokenizer or token cache,
    /// and a fresh model's head gets vocab_size = patch·patch·channels). With --resume the
    /// checkpoint's target continues; naming another one is an error. CPU only.
    #[arg(long)]
    target: Option<beit::model::MimTarget>,
    /// Where a dataset's MIM targets come from: `cached` (the file's token cache, made by
    /// `beit tokenize`, of whole images: the model then sees whole, unflipped images too, no
    /// crop augmentation), `augmented` (the --tokenizer run on every batch's augmented view), or
    /// `auto` (cached when the file has tokens, else augmented).
    #[arg(long, default_value = "auto")]
    tokens: String,
    /// Tokenizer directory for `--tokens augmented`.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Codebook size of a fresh model's MIM head (default: the config's); set it to the
    /// tokenizer's vocabulary.
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Loader worker threads (dataset data only).
    #[arg(long, default_value_t = 1)]
    loader_workers: usize,
    /// Total steps of the run (a resumed run continues up to this count).
    #[arg(long, default_value_t = 200)]
    steps: u64,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Patches masked per image (default: 75/196 of the grid, BEiT's ratio).
    #[arg(long)]
    masked: Option<usize>,
    /// Which patches a dataset's masks cover: `block` (BEiT's block-wise masking) or `random`
    /// (uniform patches: the paper's ablation).
    #[arg(long, default_value = "block")]
    masking: beit::data::masking::MaskingStrategy,
    #[arg(long, default_value_t = 1.5e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    /// Linear warmup steps (default: a tenth of --steps).
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Clip the gradient norm (0: off).
    #[arg(long, default_value_t = 3.0)]
    clip: f64,
    /// Stochastic depth rate of the last block (default: the config's drop_path_rate).
    #[arg(long)]
    drop_path: Option<f64>,
    /// Seeds the model init, the data and the trainer.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda (the step runs on the GPU) or auto (the CPU; see `beit info`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Storage precision of the GPU step: bf16 (GEMMs and attention in bf16 with fp32
    /// accumulation, fp32 master weights) or fp32 (parity with the CPU). CPU steps are fp32.
    #[arg(long, default_value = "bf16")]
    precision: String,
    #[arg(long)]
    out: PathBuf,
    /// Save a checkpoint every K steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    checkpoint_every: u64,
    /// Continue from OUT/checkpoint.safetensors when it exists. The checkpoint's trainer options
    /// (learning rate, schedule, ...) and model win (--config, --model and --vocab-size are
    /// ignored); the options that decide the data (--batch, --data, --masking, --masked,
    /// --tokens, --tokenizer, --target, --seed) are recorded in it and must be given again
    /// unchanged.
    #[arg(long)]
    resume: bool,
    /// Start a fresh run even though OUT holds a checkpoint (its first checkpoint replaces the
    /// old one). Without --resume or --overwrite, an existing checkpoint is an error.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// One JSON line per step on stdout.
    #[arg(long)]
    json: bool,
}

impl PretrainArgs {
    /// The options that decide the run's data.
    fn data_options(&self) -> beit::train::recipes::pretrain::PretrainDataOptions {
        beit::train::recipes::pretrain::PretrainDataOptions {
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

#[derive(clap::Args)]
struct ReplayArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    batch: PathBuf,
    #[arg(long)]
    steps: u64,
    #[arg(long)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Which parameters decay: beit (BEiT's exclusions) or all (one torch.optim.AdamW group).
    #[arg(long, default_value = "beit")]
    weight_decay_on: String,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Stochastic depth rate (default 0: off).
    #[arg(long, default_value_t = 0.0)]
    drop_path: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Inference images/s of a model directory (or a built-in preset) on random input.
    Infer {
        /// Model directory; if absent, a randomly initialised model of `--preset`.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Built-in config when no --model is given: base (BEiT-B/16 224) or tiny32.
        #[arg(long, default_value = "base")]
        preset: String,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed passes after one warm-up pass.
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long)]
        json: bool,
    },
    /// Pretraining step images/s (forward, backward, AdamW) of a model directory or a preset.
    Pretrain {
        /// Model directory (BeitForMaskedImageModeling); if absent, a fresh model of --config.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Built-in config when no --model is given.
        #[arg(long, default_value = "tiny32")]
        config: String,
        /// A batch file (`beit pretrain-replay` format); if absent, a synthetic batch.
        #[arg(long)]
        batch_file: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Masked patches per image of the synthetic batch.
        #[arg(long, default_value_t = 26)]
        masked: usize,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// cpu or cuda (the GPU step; timed with a device synchronisation per step).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Precision of the GPU step: bf16 or fp32.
        #[arg(long, default_value = "bf16")]
        precision: String,
        #[arg(long)]
        json: bool,
    },
    /// Augmenting two-view loader images/s over a dataset file (JSON on stdout).
    Loader {
        #[arg(long)]
        dataset: PathBuf,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// View 1 size (square); the tokenizer view is half of it. 32 matches tiny32.
        #[arg(long, default_value_t = 32)]
        image_size: usize,
        #[arg(long, default_value_t = 4)]
        patch: usize,
        #[arg(long, default_value_t = 26)]
        masked: usize,
        /// Batches timed (at most one epoch).
        #[arg(long, default_value_t = 200)]
        batches: usize,
    },
}

fn infer(
    model: PathBuf,
    inputs: PathBuf,
    output: PathBuf,
    device: String,
    threads: usize,
    json: bool,
) -> beit::Result<()> {
    safety::Paths::new().read("--model", &model).read("--inputs", &inputs).write("--output", &output).check()?;
    let device: Device = device.parse()?;
    let ctx = Context::new(&ContextOptions { device, threads, ..Default::default() })?;
    ctx.require_cpu("inference")?;
    let model = Model::load(&model)?;
    let file = SafetensorsFile::open(&inputs)?;
    let st = file.parse()?;
    let (shape, pixels) = read_f32(&st, "pixel_values")?
        .ok_or_else(|| beit::Error::Format(format!("{} has no tensor pixel_values", inputs.display())))?;
    if shape.len() != 4 {
        return Err(beit::Error::InvalidArgument(format!("pixel_values must be [B,C,H,W], got shape {shape:?}")));
    }
    let mask = read_mask(&st, "bool_masked_pos")?;
    if let Some((mshape, _)) = &mask {
        if mshape.len() != 2 || mshape[0] != shape[0] {
            return Err(beit::Error::InvalidArgument(format!(
                "bool_masked_pos must be [B,N] with B = {}, got {mshape:?}",
                shape[0]
            )));
        }
    }
    let batch = ImageBatch {
        pixels: &pixels,
        batch: shape[0],
        channels: shape[1],
        height: shape[2],
        width: shape[3],
        bool_masked_pos: mask.as_ref().map(|(_, m)| &m[..]),
    };
    let start = std::time::Instant::now();
    let out = ctx.run(|| model.forward(&batch))?;
    let seconds = start.elapsed().as_secs_f64();
    let mut tensors: Vec<(&str, &[usize], &[f32])> =
        vec![("last_hidden_state", &out.last_hidden_state.shape, &out.last_hidden_state.data)];
    if let Some(p) = &out.pooler_output {
        tensors.push(("pooler_output", &p.shape, &p.data));
    }
    if let Some(l) = &out.logits {
        tensors.push(("logits", &l.shape, &l.data));
    }
    let bytes = f32_tensors_bytes(tensors)?;
    safety::remove_stale_temp_files_of(&output)?;
    write_atomic(&output, &bytes)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "command": "infer",
                "architecture": model.architecture().hf_name(),
                "batch": shape[0],
                "device": format!("{:?}", ctx.device()).to_lowercase(),
                "threads": ctx.threads(),
                "seconds": seconds,
                "output": output.display().to_string(),
            })
        );
    }
    Ok(())
}

fn bench_infer(
    model: Option<PathBuf>,
    preset_name: String,
    batch: usize,
    threads: usize,
    iters: usize,
    json: bool,
) -> beit::Result<()> {
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

fn create(config: String, architecture: Option<String>, seed: u64, out: PathBuf) -> beit::Result<()> {
    safety::Paths::new().read_config("--config", &config).write_model_dir("--out", &out).check()?;
    let (cfg, default_arch) = presets::config_and_architecture(&config)?;
    let arch = match architecture {
        Some(name) => beit::Architecture::from_hf_name(&name)?,
        None => default_arch,
    };
    let model = Model::new_random(cfg, arch, seed)?;
    save_model(&model, &out)?;
    println!("created {} with {} parameters in {}", arch.hf_name(), model.params().count(), out.display());
    Ok(())
}

/// Saves `model` as an HF directory at `dir`, first removing what killed runs left there; a
/// failed save leaves no directory it created.
fn save_model(model: &Model, dir: &std::path::Path) -> beit::Result<()> {
    safety::remove_stale_temp_files(dir, &safety::MODEL_FILES)?;
    let out = beit::files::OutputDir::create(dir)?;
    model.save(dir)?;
    out.keep();
    Ok(())
}

fn print_json(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Peak resident memory of this process (VmHWM), in MiB; None where /proc is unavailable.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn pretrain(a: PretrainArgs) -> beit::Result<()> {
    use beit::train::recipes::pretrain::{fresh_model_config, PretrainData};
    use beit::train::recipes::{masking, resume, schedule};
    use beit::train::trainer::{Trainer, TrainerOptions};
    let checkpoint = a.out.join("checkpoint.safetensors");
    let model_dir = a.out.join("model");
    let data_options = a.data_options();
    safety::Paths::new()
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
        beit::backend::cuda::pretrain::GpuPretrainer::check_target(target)?;
    }
    let ctx = Context::new(&ContextOptions { device, threads: a.threads, ..Default::default() })?;
    let precision: beit::backend::cuda::pretrain::Precision = a.precision.parse()?;
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
    safety::remove_stale_temp_files(&a.out, &["checkpoint.safetensors"])?;
    safety::remove_stale_temp_files(&model_dir, &safety::MODEL_FILES)?;
    let out_dir = beit::files::OutputDir::create(&a.out)?;
    let start = std::time::Instant::now();
    let first_step = trainer.step_count();
    let mut progress = progress::Progress::new("beit pretrain", first_step, a.steps);
    let mut last_loss = f64::NAN;
    while trainer.step_count() < a.steps {
        let position = trainer.data_position();
        let batch = ctx.run(|| data.batch_at(position, a.batch))?;
        let stats = ctx.run(|| trainer.step(&batch.as_batch()))?;
        last_loss = stats.loss;
        if a.json {
            print_json(serde_json::json!({"step": stats.step, "loss": stats.loss, "lr": stats.lr,
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
    print_json(serde_json::json!({"command": "pretrain", "steps": trainer.step_count(), "steps_run": steps_run,
        "target": target.name(), "final_loss": last_loss, "seconds": seconds,
        "images_per_s": (steps_run as f64 * a.batch as f64) / seconds.max(1e-9),
        "threads": ctx.threads(), "device": format!("{:?}", ctx.device()).to_lowercase(),
        "checkpoint": checkpoint.display().to_string(),
        "model": model_dir.display().to_string()}));
    Ok(())
}

fn pretrain_replay(a: ReplayArgs) -> beit::Result<()> {
    use beit::data::batch::OwnedMimBatch;
    use beit::train::trainer::{Trainer, TrainerOptions, WeightDecayOn};
    let ctx = Context::new(&ContextOptions { device: Device::Cpu, threads: a.threads, ..Default::default() })?;
    let weight_decay_on = match a.weight_decay_on.as_str() {
        "beit" => WeightDecayOn::Beit,
        "all" => WeightDecayOn::All,
        other => return Err(beit::Error::InvalidArgument(format!("--weight-decay-on {other}: use beit or all"))),
    };
    safety::Paths::new()
        .read("--model", &a.model)
        .read("--batch", &a.batch)
        .write_model_dir("--out", &a.out)
        .check()?;
    let model = Model::load(&a.model)?;
    let batch = OwnedMimBatch::load(&a.batch)?;
    let options = TrainerOptions {
        learning_rate: a.lr,
        warmup_steps: 0,
        total_steps: 0,
        weight_decay: a.weight_decay,
        weight_decay_on,
        beta1: a.beta1,
        beta2: a.beta2,
        eps: a.eps,
        clip_grad_norm: 0.0,
        drop_path_rate: Some(a.drop_path),
        seed: a.seed,
        ..TrainerOptions::default()
    };
    let mut trainer = Trainer::new(model, options)?;
    for _ in 0..a.steps {
        let stats = ctx.run(|| trainer.step(&batch.as_batch()))?;
        print_json(serde_json::json!({"step": stats.step, "loss": stats.loss, "grad_norm": stats.grad_norm}));
    }
    save_model(trainer.model(), &a.out)
}

#[allow(clippy::too_many_arguments)]
fn bench_pretrain(
    model: Option<PathBuf>,
    config: String,
    batch_file: Option<PathBuf>,
    batch: usize,
    masked: usize,
    threads: usize,
    (iters, warmup): (usize, usize),
    (device, precision): (String, String),
    json: bool,
) -> beit::Result<()> {
    use beit::data::batch::OwnedMimBatch;
    use beit::data::synthetic::SyntheticMim;
    use beit::train::trainer::{Trainer, TrainerOptions, WeightDecayOn};
    let ctx = Context::new(&ContextOptions { device: device.parse()?, threads, ..Default::default() })?;
    let precision: beit::backend::cuda::pretrain::Precision = precision.parse()?;
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
        print_json(serde_json::json!({"command": "bench pretrain", "batch": b, "threads": ctx.threads(),
            "device": format!("{:?}", ctx.device()).to_lowercase(),
            "precision": trainer.cuda_precision().map_or("fp32", |p| p.name()),
            "median_s": median, "images_per_s": images_per_s, "step_times_s": step_times,
            "peak_rss_mb": rss, "first_loss": losses[0], "last_loss": losses[losses.len() - 1],
            "params": trainer.model().params().count()}));
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

fn dataset(what: DatasetCommand) -> beit::Result<()> {
    use beit::data::dataset::{Dataset, DatasetHeader};
    let info = |h: &DatasetHeader, file: &std::path::Path| {
        serde_json::json!({"file": file.display().to_string(), "version": h.version, "count": h.count,
            "height": h.height, "width": h.width, "channels": h.channels, "sections": h.section_names(),
            "token_grid": [h.token_grid_h, h.token_grid_w]})
    };
    match what {
        DatasetCommand::Import { format, images, labels, dir, size, channels, set, pad, out } => {
            use beit::data::import;
            let bad = |m: &str| beit::Error::InvalidArgument(m.to_string());
            let classes_file = import::classes_path(&out);
            safety::Paths::new()
                .read_opt("--images", images.as_ref())
                .read_opt("--labels", labels.as_ref())
                .read_opt("--dir", dir.as_ref())
                .write("--out", &out)
                .write("--out (its class names)", &classes_file)
                .check()?;
            safety::remove_stale_temp_files_of(&out)?;
            safety::remove_stale_temp_files_of(&classes_file)?;
            let start = std::time::Instant::now();
            let mut classes = None;
            let h = match format {
                ImportFormat::Idx | ImportFormat::Npy => {
                    let images = images.ok_or_else(|| bad("--images is required for --format idx and npy"))?;
                    if format == ImportFormat::Idx {
                        let pad = pad.as_deref().map(import::images::parse_size).transpose()?;
                        let pad = pad.map(|(ph, pw)| (ph as usize, pw as usize));
                        import::import_idx_padded(&images, labels.as_deref(), &out, pad)?
                    } else {
                        if pad.is_some() {
                            return Err(bad("--pad is for --format idx"));
                        }
                        import::import_npy(&images, labels.as_deref(), &out)?
                    }
                }
                ImportFormat::ImageFolder => {
                    let dir = dir.ok_or_else(|| bad("--dir is required for --format image-folder"))?;
                    let size = size.ok_or_else(|| bad("--size HxW is required for --format image-folder"))?;
                    let (hh, ww) = import::images::parse_size(&size)?;
                    let (h, names) = import::import_image_folder(&dir, hh, ww, channels, &out)?;
                    classes = Some(names);
                    h
                }
                ImportFormat::Emoji => {
                    let dir = dir.ok_or_else(|| bad("--dir is required for --format emoji"))?;
                    let set = set.ok_or_else(|| bad("--set google|twitter is required for --format emoji"))?;
                    let (hh, ww) = import::images::parse_size(size.as_deref().unwrap_or("64"))?;
                    if hh != ww {
                        return Err(bad("emoji images are square: give --size as one number"));
                    }
                    let (h, names) = import::import_emoji(&dir, &set, hh, &out)?;
                    classes = Some(names);
                    h
                }
            };
            let mut v = info(&h, &out);
            v["command"] = "dataset import".into();
            if let Some(names) = classes {
                v["classes"] = names.into();
                v["classes_file"] = import::classes_path(&out).display().to_string().into();
            }
            v["seconds"] = start.elapsed().as_secs_f64().into();
            print_json(v);
        }
        DatasetCommand::Info { file } => {
            let d = Dataset::open(&file)?;
            let mut v = info(d.header(), &file);
            v["command"] = "dataset info".into();
            print_json(v);
        }
        DatasetCommand::Combine { inputs, test_fraction, split_seed, out } => {
            use beit::data::subset::{check_test_fraction, split_indices, write_combined};
            check_test_fraction(test_fraction)?;
            let split = |input: &str| -> (String, Option<String>) {
                match input.rsplit_once(':') {
                    Some((f, p @ ("train" | "test"))) => (f.to_string(), Some(p.to_string())),
                    _ => (input.to_string(), None),
                }
            };
            inputs
                .iter()
                .fold(safety::Paths::new(), |paths, input| paths.read("INPUT", split(input).0))
                .write("--out", &out)
                .check()?;
            let mut opened = Vec::new();
            for input in &inputs {
                let (file, part) = split(input);
                let d = Dataset::open(std::path::Path::new(&file))?;
                let indices = match part.as_deref() {
                    None => (0..d.len()).collect(),
                    Some(p) => {
                        let (train, test) = split_indices(d.len(), test_fraction, split_seed)?;
                        if p == "train" {
                            train
                        } else {
                            test
                        }
                    }
                };
                opened.push((d, indices));
            }
            let parts: Vec<_> = opened.iter().map(|(d, i)| (d, i.as_slice())).collect();
            safety::remove_stale_temp_files_of(&out)?;
            let combined = write_combined(&out, &parts)?;
            let mut v = info(&combined.header, &out);
            v["command"] = "dataset combine".into();
            v["inputs"] = inputs
                .iter()
                .zip(&opened)
                .map(|(s, (_, i))| serde_json::json!({"input": s, "samples": i.len()}))
                .collect();
            v["dropped_sections"] = combined.dropped_sections.into();
            print_json(v);
        }
    }
    Ok(())
}

fn bench_loader(
    file: PathBuf,
    batch: usize,
    threads: usize,
    image_size: usize,
    patch: usize,
    masked: usize,
    batches: usize,
) -> beit::Result<()> {
    use beit::data::loader::{Loader, LoaderConfig};
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
    print_json(serde_json::json!({"command": "bench loader", "dataset": file.display().to_string(),
        "batch": batch, "threads": threads.max(1), "image_size": image_size, "batches": n, "images": images,
        "seconds": seconds, "images_per_s": images as f64 / seconds}));
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every context the commands create inherits this budget (ContextOptions::memory_budget is
    // None), and so does the work they do outside a context.
    let result = beit::resources::MemoryBudget::parse(&cli.memory_budget)
        .and_then(|budget| beit::resources::with_budget(budget, || run(cli.command)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beit: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> beit::Result<()> {
    match command {
        Command::Info => info_cli::info(),
        Command::Infer { model, inputs, output, device, threads, json } => {
            infer(model, inputs, output, device, threads, json)
        }
        Command::Create { config, architecture, seed, out } => create(config, architecture, seed, out),
        Command::Pretrain(args) => pretrain(args),
        Command::PretrainReplay(args) => pretrain_replay(args),
        Command::Bench { what: BenchCommand::Infer { model, preset, batch, threads, iters, json } } => {
            bench_infer(model, preset, batch, threads, iters, json)
        }
        Command::Bench {
            what:
                BenchCommand::Pretrain {
                    model,
                    config,
                    batch_file,
                    batch,
                    masked,
                    threads,
                    iters,
                    warmup,
                    device,
                    precision,
                    json,
                },
        } => bench_pretrain(
            model,
            config,
            batch_file,
            batch,
            masked,
            threads,
            (iters, warmup),
            (device, precision),
            json,
        ),
        Command::Bench {
            what: BenchCommand::Loader { dataset, batch, threads, image_size, patch, masked, batches },
        } => bench_loader(dataset, batch, threads, image_size, patch, masked, batches),
        Command::Dataset { what } => dataset(what),
        Command::Tokenizer { what: tokenizer_cli::TokenizerCommand::Train(args) } => tokenizer_cli::train(args),
        Command::Tokenize(args) => tokenizer_cli::tokenize(args),
        Command::Finetune(args) => finetune_cli::finetune(args),
        Command::Eval(args) => finetune_cli::eval(args),
        Command::Segment { what } => segment_cli::run(what),
    }
}
