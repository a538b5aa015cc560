//! The `beit` command line: a thin layer over the Rust API.

use std::path::PathBuf;
use std::process::ExitCode;

use beit::model::io::{f32_tensors_bytes, read_f32, read_mask, write_atomic, SafetensorsFile};
use beit::{Context, ContextOptions, Device, ImageBatch, Model};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "beit", version, about = "BEiT vision transformers: inference, pretraining, fine-tuning")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Measure speed. `beit bench infer`: forward passes per second on random pixels.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
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
}

fn infer(
    model: PathBuf,
    inputs: PathBuf,
    output: PathBuf,
    device: String,
    threads: usize,
    json: bool,
) -> beit::Result<()> {
    let device: Device = device.parse()?;
    let ctx = Context::new(&ContextOptions { device, threads })?;
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
    write_atomic(&output, &f32_tensors_bytes(tensors)?)?;
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

/// The built-in configs: `base` is HF's BeitConfig defaults (BEiT-B/16 at 224, classification
/// with 1000 labels); `tiny32` is the small grey config the pretraining benchmarks use.
fn preset(name: &str) -> beit::Result<(beit::BeitConfig, beit::Architecture)> {
    let json = match name {
        "base" => r#"{"num_labels": 1000, "use_relative_position_bias": true}"#,
        "tiny32" => {
            r#"{"image_size": 32, "patch_size": 4, "num_channels": 1, "hidden_size": 192,
            "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768,
            "vocab_size": 8192, "use_mask_token": true, "use_shared_relative_position_bias": true,
            "layer_scale_init_value": 0.1, "drop_path_rate": 0.1}"#
        }
        other => return Err(beit::Error::InvalidArgument(format!("unknown preset {other:?} (base or tiny32)"))),
    };
    let cfg = beit::BeitConfig::from_json_str(json)?;
    let arch =
        if name == "base" { beit::Architecture::ImageClassification } else { beit::Architecture::MaskedImageModeling };
    Ok((cfg, arch))
}

fn bench_infer(
    model: Option<PathBuf>,
    preset_name: String,
    batch: usize,
    threads: usize,
    iters: usize,
    json: bool,
) -> beit::Result<()> {
    let ctx = Context::new(&ContextOptions { device: Device::Cpu, threads })?;
    let model = match model {
        Some(dir) => Model::load(&dir)?,
        None => {
            let (cfg, arch) = preset(&preset_name)?;
            Model::new_random(cfg, arch, 0)?
        }
    };
    let cfg = model.config();
    let (h, w) = cfg.image_size.hw();
    let c = cfg.num_channels;
    let pixels: Vec<f32> = (0..batch * c * h * w).map(|i| ((i * 7919 % 2003) as f32 / 1001.5) - 1.0).collect();
    let input = ImageBatch { pixels: &pixels, batch, channels: c, height: h, width: w, bool_masked_pos: None };
    ctx.run(|| model.forward(&input))?;
    let mut times = Vec::with_capacity(iters);
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
    let (cfg, default_arch) = if std::path::Path::new(&config).is_file() {
        let text =
            std::fs::read_to_string(&config).map_err(|e| beit::Error::Io(format!("cannot read {config}: {e}")))?;
        let cfg = beit::BeitConfig::from_json_str(&text)?;
        let arch = cfg.architecture()?;
        (cfg, arch)
    } else {
        preset(&config)?
    };
    let arch = match architecture {
        Some(name) => beit::Architecture::from_hf_name(&name)?,
        None => default_arch,
    };
    let model = Model::new_random(cfg, arch, seed)?;
    model.save(&out)?;
    println!("created {} with {} parameters in {}", arch.hf_name(), model.params().count(), out.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Infer { model, inputs, output, device, threads, json } => {
            infer(model, inputs, output, device, threads, json)
        }
        Command::Create { config, architecture, seed, out } => create(config, architecture, seed, out),
        Command::Bench { what: BenchCommand::Infer { model, preset, batch, threads, iters, json } } => {
            bench_infer(model, preset, batch, threads, iters, json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("beit: {e}");
            ExitCode::FAILURE
        }
    }
}
