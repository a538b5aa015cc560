//! `beit segment finetune` and `beit segment eval`: semantic segmentation (HF
//! BeitForSemanticSegmentation) on a dataset file with masks, from the command line. Both are
//! thin wrappers over `beit::train::segmentation`, so other front ends (e.g. a
//! `beit finetune --task segment`) can call the same functions.

use std::path::{Path, PathBuf};

use beit::data::dataset::Dataset;
use beit::model::io::{CONFIG_FILE, WEIGHTS_FILE};
use beit::model::segmentation::metrics::IouReport;
use beit::train::recipes::presets;
use beit::train::segmentation::{
    evaluate_on, finetune, from_pretrained_backbone, mask_classes, segmenter_from_config, split_indices,
    SegFinetuneOptions, SegSplit,
};
use beit::{Architecture, Context, ContextOptions, Device, Model};
use clap::Subcommand;

/// The options, losses and evaluation of `beit segment finetune`, beside the model in --out.
const REPORT_FILE: &str = "report.json";

#[derive(Subcommand)]
pub enum SegmentCommand {
    /// Fine-tune a segmentation model on a dataset with masks. The start is --model (a
    /// BeitForSemanticSegmentation directory to continue, or any BEiT directory, e.g. a
    /// pretrained BeitForMaskedImageModeling, whose backbone is kept under a new head) or --config
    /// (a preset or a config.json: a model from scratch). The samples are split deterministically
    /// into train and test (--test-fraction, --split-seed); the model trains on the train part,
    /// is evaluated (mIoU) on the test part, and is written to --out as an HF directory, with
    /// OUT/report.json holding the options, losses and the evaluation.
    Finetune(FinetuneArgs),
    /// Evaluate a segmentation model (mIoU, per-class IoU, pixel accuracy) on a dataset's test
    /// split (the same split as `finetune` with the same --test-fraction / --split-seed) or on
    /// every sample (--split all). Prints JSON.
    Eval(EvalArgs),
}

#[derive(clap::Args)]
pub struct SplitArgs {
    /// Dataset file with masks (`.beitds`, e.g. from `beit dataset import --format emoji`).
    #[arg(long)]
    data: PathBuf,
    /// Fraction of the samples held out for evaluation.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Seed of the train/test shuffle.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Normalisation mean of [0, 1] pixels (one value for all channels, or one per channel).
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    mean: Vec<f32>,
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    std: Vec<f32>,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda (the passes run on the GPU, fp32; an error without a usable one) or auto (says
    /// what it chose).
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl SplitArgs {
    /// The context of the run: its threads and device (which it says on stderr).
    fn context(&self, command: &str) -> beit::Result<Context> {
        let device: Device = self.device.parse()?;
        let ctx = Context::new(&ContextOptions { device, threads: self.threads, ..Default::default() })?;
        eprintln!("beit segment {command}: device {}", ctx.device_note());
        Ok(ctx)
    }
}

#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    split: SplitArgs,
    /// Start from this model directory.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// Start from scratch: a preset (`emoji-tiny`) or a config.json.
    #[arg(long)]
    config: Option<String>,
    #[arg(long)]
    out: PathBuf,
    /// Classes (default: the largest mask value + 1).
    #[arg(long)]
    num_labels: Option<usize>,
    /// Fraction of the train split whose masks are used (label efficiency): a seeded subset, by
    /// --seed, stratified by the samples' image labels when the file has them. The test split
    /// does not change.
    #[arg(long, default_value_t = 1.0)]
    label_fraction: f64,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    #[arg(long, default_value_t = 50)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f32,
    #[arg(long, default_value_t = 0.9)]
    layer_decay: f64,
    /// Stochastic depth rate (default: the config's drop_path_rate).
    #[arg(long)]
    drop_path: Option<f64>,
    /// Gradient norm clip (0 = none).
    #[arg(long, default_value_t = 3.0)]
    clip_grad: f64,
    /// Seed of the new head's initialisation, the shuffles, flips and drop path.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print a line every N steps.
    #[arg(long, default_value_t = 20)]
    log_every: usize,
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    split: SplitArgs,
    #[arg(long)]
    model: PathBuf,
    /// `test` (the held-out split) or `all`.
    #[arg(long, default_value = "test")]
    split_name: String,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
}

fn report_json(r: &IouReport) -> serde_json::Value {
    serde_json::json!({"mean_iou": r.mean_iou, "pixel_accuracy": r.pixel_accuracy, "per_class_iou": r.per_class})
}

fn split_of(a: &SplitArgs, data: &Dataset) -> beit::Result<(Vec<usize>, Vec<usize>)> {
    split_indices(data.len(), a.test_fraction, a.split_seed)
}

pub fn run(cmd: SegmentCommand) -> beit::Result<()> {
    match cmd {
        SegmentCommand::Finetune(a) => run_finetune(a),
        SegmentCommand::Eval(a) => run_eval(a),
    }
}

fn run_finetune(a: FinetuneArgs) -> beit::Result<()> {
    crate::safety::Paths::new()
        .read_opt("--model", a.model.as_ref())
        .read_opt("--config", a.config.as_ref().filter(|c| Path::new(c).is_file()))
        .read("--data", &a.split.data)
        .write_model_dir("--out", &a.out)
        .write("--out", a.out.join(REPORT_FILE))
        .check()?;
    beit::data::subset::check_test_fraction(a.split.test_fraction)?;
    let ctx = a.split.context("finetune")?;
    let data = Dataset::open(&a.split.data)?;
    let classes = match a.num_labels {
        Some(k) => k,
        None => mask_classes(&data)?,
    };
    let (mut model, start) = match (&a.model, &a.config) {
        (Some(dir), _) => {
            let m = Model::load(dir)?;
            if m.architecture() == Architecture::SemanticSegmentation {
                (m, format!("continued {}", dir.display()))
            } else {
                let (seg, copied) = from_pretrained_backbone(&m, classes, a.seed)?;
                (seg, format!("backbone of {} ({copied} tensors), new head", dir.display()))
            }
        }
        (None, Some(name)) => {
            (segmenter_from_config(presets::config_from(name)?, classes, a.seed)?, format!("from scratch ({name})"))
        }
        (None, None) => return Err(beit::Error::InvalidArgument("pass --model DIR or --config PRESET".into())),
    };
    let SegSplit { all_train, train, test } =
        SegSplit::new(&data, a.split.test_fraction, a.split.split_seed, a.label_fraction, a.seed)?;
    let opts = SegFinetuneOptions {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        min_lr: a.min_lr,
        warmup_steps: a.warmup_steps,
        weight_decay: a.weight_decay,
        layer_decay: a.layer_decay,
        drop_path_rate: a.drop_path,
        clip_grad: (a.clip_grad > 0.0).then_some(a.clip_grad),
        seed: a.seed,
        mean: a.split.mean.clone(),
        std: a.split.std.clone(),
        flip: true,
        device: ctx.device(),
    };
    eprintln!(
        "beit segment finetune: {start}; {} labels; {} train (of {}) / {} test samples; {} threads",
        classes,
        train.len(),
        all_train.len(),
        test.len(),
        ctx.threads()
    );
    let log_every = a.log_every.max(1);
    let mut losses = Vec::new();
    let report = ctx.run(|| {
        finetune(&mut model, &data, &train, &opts, |s| {
            losses.push(s.loss);
            if s.step % log_every == 0 || s.step == s.total_steps {
                eprintln!(
                    "step {}/{} epoch {} loss {:.4} lr {:.2e} grad norm {:.3}",
                    s.step, s.total_steps, s.epoch, s.loss, s.lr, s.grad_norm
                );
            }
        })
    })?;
    // The evaluation can still fail: run it before anything is written.
    let eval = if test.is_empty() {
        None
    } else {
        Some(ctx.run(|| evaluate_on(&model, &data, &test, 32, &opts.mean, &opts.std, ctx.device()))?)
    };
    let out = serde_json::json!({
        "command": "segment finetune", "start": start, "out": a.out.display().to_string(),
        "num_labels": classes, "label_fraction": a.label_fraction, "train_samples": train.len(),
        "test_samples": test.len(),
        "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "layer_decay": a.layer_decay,
        "steps": report.steps, "seconds": report.seconds, "final_epoch_loss": report.final_epoch_loss,
        "first_loss": losses.first(), "losses": losses, "test": eval.as_ref().map(report_json),
    });
    let text = serde_json::to_string_pretty(&out).expect("json");
    crate::safety::remove_stale_temp_files(&a.out, &[CONFIG_FILE, WEIGHTS_FILE, REPORT_FILE])?;
    let out_dir = beit::files::OutputDir::create(&a.out)?;
    model.save(&a.out)?;
    beit::files::write_atomic(&a.out.join(REPORT_FILE), text.as_bytes())?;
    out_dir.keep();
    println!("{text}");
    Ok(())
}

fn run_eval(a: EvalArgs) -> beit::Result<()> {
    let ctx = a.split.context("eval")?;
    let data = Dataset::open(&a.split.data)?;
    let model = Model::load(&a.model)?;
    let ids = match a.split_name.as_str() {
        "test" => split_of(&a.split, &data)?.1,
        "all" => (0..data.len()).collect(),
        other => return Err(beit::Error::InvalidArgument(format!("--split-name {other:?}: test or all"))),
    };
    let start = std::time::Instant::now();
    let r = ctx.run(|| evaluate_on(&model, &data, &ids, a.batch_size, &a.split.mean, &a.split.std, ctx.device()))?;
    let mut out = report_json(&r);
    out["command"] = "segment eval".into();
    out["samples"] = ids.len().into();
    out["seconds"] = start.elapsed().as_secs_f64().into();
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    Ok(())
}
