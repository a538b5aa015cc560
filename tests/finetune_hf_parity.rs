//! Must-hold: libbeit fine-tunes a classifier as BEiT's recipe does in PyTorch / transformers.
//!
//! tests/reference_finetune (scripts/gen_finetune_reference.py, torch only) holds a classifier
//! made from a tiny pretrained `BeitForMaskedImageModeling` by unilm's rules (`init/`), the recipe
//! (`recipe.json`: warmup + cosine, layer-wise lr decay, AdamW with BEiT's weight-decay
//! exclusions, label smoothing; no drop path, dropout or clipping), explicit batches, and what
//! `transformers.BeitForImageClassification` trained by that recipe gave: per-step losses and
//! learning rates and the final value of every tensor, for two runs:
//! - "explicit": 10 distinct batches of 8, fed here to [`Trainer::step_classify`] (libbeit's
//!   loader shuffles and augments with ChaCha8, which Python cannot replay);
//! - "cli": one batch of 8 images every step, fed by `beit finetune` itself from a dataset file
//!   of exactly those 8 images (flip 0 and crop scale 1 make the loader's view the image itself;
//!   batch 8 of 8 samples makes every step see all of them).
//!
//! The first also checks the final model's logits against transformers' on fixed inputs; the
//! second runs `beit eval` on its result. A third test checks that libbeit's own
//! pretrained-to-classifier conversion gives `init/` (apart from the fresh head).

use std::path::{Path, PathBuf};
use std::process::Command;

use beit::data::dataset::{DatasetSpec, DatasetWriter};
use beit::model::io::{read_f32, read_i64, SafetensorsFile};
use beit::model::ClassifyBatch;
use beit::train::finetune::classifier_from_pretrained;
use beit::train::trainer::{Trainer, TrainerOptions, WeightDecayOn};
use beit::{ImageBatch, Model};
use serde_json::Value;

const BEIT: &str = env!("CARGO_BIN_EXE_beit");

/// Per-step loss: |ours − torch| at most this. The losses are means of 8 label-smoothed
/// cross-entropies near 1; fp32 passes that sum in another order differ by ~1e-7 (measured: at
/// most 8.6e-8 over the ten steps).
const LOSS_TOL: f64 = 1e-5;
/// Final weights: |ours − torch| at most this, per element. The updates are about 1e-2 (lr 5e-3
/// over ten steps); measured differences are at most 1.6e-6 (an element whose gradient is nearly
/// zero, where AdamW's normalised step magnifies rounding), typically 1e-8. One more layer-decay
/// power changes a group's updates by 25%.
const WEIGHT_TOL: f32 = 2e-5;
/// Final weights, per tensor: RMS(ours − torch) at most this fraction of RMS(torch − init), so a
/// small systematic change shows even where no single element passes [`WEIGHT_TOL`] (e.g. weight
/// decay on the cls token, which moves it by 0.05·Σlr·|p| ≈ 1e-5: 1.6e-3 of its update). Measured:
/// at most 7.5e-6.
const UPDATE_RMS_TOL: f64 = 1e-4;
/// The schedule's value per step, relative (both are f64 evaluations of the same formula).
const LR_TOL: f64 = 1e-12;
/// Logits of the fine-tuned model vs transformers' trained one (absolute for |logit| ≤ 1).
const LOGIT_TOL: f32 = 1e-4;

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_finetune")
}

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let file = SafetensorsFile::open(path).unwrap();
    let st = file.parse().unwrap();
    read_f32(&st, name).unwrap().unwrap_or_else(|| panic!("{} has no {name}", path.display()))
}

fn ints(path: &Path, name: &str) -> (Vec<usize>, Vec<i64>) {
    let file = SafetensorsFile::open(path).unwrap();
    let st = file.parse().unwrap();
    read_i64(&st, name).unwrap().unwrap_or_else(|| panic!("{} has no {name}", path.display()))
}

/// An f64 tensor, bit for bit.
fn f64s(path: &Path, name: &str) -> Vec<f64> {
    let file = SafetensorsFile::open(path).unwrap();
    let st = file.parse().unwrap();
    let view = st.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F64, "{name}");
    view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
}

fn recipe() -> serde_json::Map<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(reference().join("recipe.json")).unwrap()).unwrap()
}

fn num(r: &serde_json::Map<String, Value>, key: &str) -> f64 {
    r[key].as_f64().unwrap_or_else(|| panic!("recipe.json: {key}"))
}

/// The recipe as libbeit's trainer options: what `beit finetune` sets (src/bin/cli/finetune.rs).
fn options(r: &serde_json::Map<String, Value>) -> TrainerOptions {
    TrainerOptions {
        learning_rate: num(r, "lr"),
        min_learning_rate: num(r, "min_lr"),
        warmup_steps: num(r, "warmup_steps") as u64,
        total_steps: num(r, "steps") as u64,
        weight_decay: num(r, "weight_decay"),
        beta1: num(r, "beta1"),
        beta2: num(r, "beta2"),
        eps: num(r, "eps"),
        clip_grad_norm: 0.0,
        drop_path_rate: Some(num(r, "drop_path")),
        layer_decay: num(r, "layer_decay"),
        weight_decay_on: WeightDecayOn::Beit,
        seed: 0,
        ..TrainerOptions::default()
    }
}

/// Compares per-step losses and schedule values with torch's run `run`; returns the worst loss
/// difference.
fn check_steps(run: &str, losses: &[f64], lrs: &[f64]) -> f64 {
    let file = reference().join("torch_run.safetensors");
    let (_, torch_losses) = tensor(&file, &format!("{run}.loss"));
    let torch_lrs = f64s(&file, &format!("{run}.lr"));
    assert_eq!(losses.len(), torch_losses.len(), "{run}: steps");
    let mut worst = 0.0f64;
    for (s, ((&ours, &theirs), (&lr, &torch_lr))) in
        losses.iter().zip(&torch_losses).zip(lrs.iter().zip(&torch_lrs)).enumerate()
    {
        assert!(
            (lr - torch_lr).abs() <= LR_TOL * torch_lr.abs().max(1e-12),
            "{run} step {}: lr {lr:e}, torch {torch_lr:e}",
            s + 1
        );
        let d = (ours - theirs as f64).abs();
        eprintln!("{run} step {:2}: loss {ours:.7} torch {theirs:.7} |diff| {d:.2e}; lr {lr:.6e}", s + 1);
        worst = worst.max(d);
    }
    eprintln!("{run}: worst per-step |loss - torch| = {worst:.2e}");
    assert!(worst <= LOSS_TOL, "{run}: losses {losses:?} vs torch {torch_losses:?}");
    worst
}

fn rms(v: impl Iterator<Item = f32>) -> f64 {
    let (sum, n) = v.fold((0.0f64, 0usize), |(s, n), x| (s + (x as f64).powi(2), n + 1));
    (sum / n.max(1) as f64).sqrt()
}

/// Compares every tensor of `model` with torch's final value in run `run`: each element within
/// [`WEIGHT_TOL`], and each tensor's RMS difference within [`UPDATE_RMS_TOL`] of the RMS of
/// torch's update to it. Returns the worst element difference and the worst relative RMS.
fn check_weights(run: &str, model: &Model) -> (f32, f64) {
    let file = reference().join("torch_run.safetensors");
    let init = Model::load(&reference().join("init")).unwrap();
    let p = model.params();
    let (mut worst, mut worst_rel) = ((0.0f32, String::new()), (0.0f64, String::new()));
    let mut compared = 0;
    for spec in p.specs.iter().filter(|s| s.exported) {
        let (shape, theirs) = tensor(&file, &format!("{run}.{}", spec.name));
        assert_eq!(shape, spec.shape, "{}", spec.name);
        let ours = &p.data[spec.offset..spec.offset + spec.len];
        let start = init.params().get(init.params().find(&spec.name).unwrap());
        let d = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        let update = rms(theirs.iter().zip(start).map(|(a, b)| a - b));
        let rel = rms(ours.iter().zip(&theirs).map(|(a, b)| a - b)) / update;
        eprintln!(
            "{run}: {:<90} max |ours - torch| {d:.2e}; RMS diff / RMS torch update ({update:.1e}) {rel:.1e}",
            spec.name
        );
        assert!(update > 0.0, "{run}: torch did not move {}", spec.name);
        if d > worst.0 {
            worst = (d, spec.name.clone());
        }
        if rel > worst_rel.0 {
            worst_rel = (rel, spec.name.clone());
        }
        compared += 1;
    }
    assert_eq!(compared, 43, "every trained tensor of the 2-layer classifier");
    eprintln!("{run}: worst final |weight - torch| = {:.2e} ({})", worst.0, worst.1);
    eprintln!("{run}: worst RMS diff / RMS update = {:.2e} ({})", worst_rel.0, worst_rel.1);
    assert!(worst.0 <= WEIGHT_TOL, "{run}: {} differs from torch's by {:e}", worst.1, worst.0);
    assert!(
        worst_rel.0 <= UPDATE_RMS_TOL,
        "{run}: {} differs from torch's by {:e} of torch's update (RMS)",
        worst_rel.1,
        worst_rel.0
    );
    (worst.0, worst_rel.0)
}

#[test]
fn trainer_follows_torch_on_explicit_batches() {
    let refdir = reference();
    let r = recipe();
    let model = Model::load(&refdir.join("init")).unwrap();
    assert_eq!(model.architecture().hf_name(), "BeitForImageClassification");
    let mut trainer = Trainer::new_classifier(model, options(&r)).unwrap();
    let batches = refdir.join("batches.safetensors");
    let (shape, pixels) = tensor(&batches, "pixel_values");
    let (label_shape, labels) = ints(&batches, "labels");
    let (steps, b, c, h, w) = (shape[0], shape[1], shape[2], shape[3], shape[4]);
    assert_eq!((steps, b), (num(&r, "steps") as usize, num(&r, "batch") as usize));
    assert_eq!(label_shape, [steps, b]);
    let per_step = b * c * h * w;
    let smoothing = num(&r, "label_smoothing") as f32;
    let (mut losses, mut lrs) = (Vec::new(), Vec::new());
    for s in 0..steps {
        let batch = ClassifyBatch {
            pixels: &pixels[s * per_step..(s + 1) * per_step],
            batch: b,
            channels: c,
            height: h,
            width: w,
            labels: &labels[s * b..(s + 1) * b],
        };
        let stats = trainer.step_classify(&batch, smoothing).unwrap();
        losses.push(stats.loss);
        lrs.push(stats.lr);
    }
    check_steps("explicit", &losses, &lrs);
    let model = trainer.into_model();
    check_weights("explicit", &model);

    let (shape, pixels) = tensor(&refdir.join("inputs.safetensors"), "pixel_values");
    let input = ImageBatch {
        pixels: &pixels,
        batch: shape[0],
        channels: shape[1],
        height: shape[2],
        width: shape[3],
        bool_masked_pos: None,
    };
    let ours = model.forward(&input).unwrap().logits.unwrap();
    let (hf_shape, hf) = tensor(&refdir.join("hf_logits.safetensors"), "logits");
    assert_eq!(ours.shape, hf_shape);
    let worst = ours.data.iter().zip(&hf).map(|(&a, &b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0f32, f32::max);
    eprintln!("fine-tuned logits vs transformers': worst |diff| / max(1, |logit|) = {worst:.2e}");
    assert!(worst <= LOGIT_TOL, "ours {:?} vs transformers {hf:?}", ours.data);
}

#[test]
fn cli_finetune_follows_torch() {
    let refdir = reference();
    let tmp = tempfile::tempdir().unwrap();
    // The cli run's 8 images as a dataset file.
    let batches = refdir.join("batches.safetensors");
    let (shape, images) = ints(&batches, "cli_images");
    let (_, labels) = ints(&batches, "cli_labels");
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let data = tmp.path().join("cli.beitds");
    let spec = DatasetSpec {
        height: h as u32,
        width: w as u32,
        channels: c as u32,
        labels: true,
        masks: false,
        token_grid: None,
    };
    let mut writer = DatasetWriter::create(&data, spec).unwrap();
    let per_image = c * h * w;
    for i in 0..n {
        let px: Vec<u8> =
            images[i * per_image..(i + 1) * per_image].iter().map(|&v| u8::try_from(v).unwrap()).collect();
        writer.push(&px, Some(labels[i] as u32), None, None).unwrap();
    }
    writer.finish().unwrap();

    let args: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("finetune_args.json")).unwrap()).unwrap();
    let tuned = tmp.path().join("tuned");
    let mut cmd = Command::new(BEIT);
    cmd.arg("finetune").arg("--model").arg(refdir.join("init")).arg("--data").arg(&data).arg("--out").arg(&tuned);
    for (k, v) in &args {
        cmd.arg(format!("--{k}")).arg(v.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "beit finetune failed: {}", String::from_utf8_lossy(&out.stderr));

    // One JSON line per step (--log-every 1: each line's loss is that step's) and a summary.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps = num(&recipe(), "steps") as usize;
    assert_eq!(lines.len(), steps + 1, "{stdout}");
    for (s, line) in lines[..steps].iter().enumerate() {
        assert_eq!(line["step"], s + 1);
        assert!(line["images_per_s"].as_f64().unwrap() > 0.0);
    }
    let losses: Vec<f64> = lines[..steps].iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    let lrs: Vec<f64> = lines[..steps].iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    assert_eq!(lines[steps]["train_images"], n);
    assert_eq!(lines[steps]["num_labels"], 3);
    check_steps("cli", &losses, &lrs);
    let model = Model::load(&tuned).unwrap();
    assert_eq!(model.architecture().hf_name(), "BeitForImageClassification");
    check_weights("cli", &model);

    // `beit eval --json`: counts add up, the confusion matrix is 3x3 and matches top-1.
    let out = Command::new(BEIT)
        .args(["eval", "--json", "--threads", "1", "--model"])
        .arg(&tuned)
        .arg("--data")
        .arg(refdir.join("train.beitds"))
        .output()
        .unwrap();
    assert!(out.status.success(), "beit eval failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let confusion: Vec<Vec<u64>> = serde_json::from_value(v["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 3);
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 48);
    let diagonal: u64 = (0..3).map(|i| confusion[i][i]).sum();
    assert_eq!(v["correct"].as_u64().unwrap(), diagonal);
    assert!((v["top1"].as_f64().unwrap() - diagonal as f64 / 48.0).abs() < 1e-12);
    eprintln!("beit eval on the 48 images of train.beitds: top-1 {}", v["top1"]);
}

/// `--label-fraction 0.5` trains on a stratified half: 24 of the 48 samples.
#[test]
fn cli_label_fraction_trains_on_a_stratified_half() {
    let refdir = reference();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(BEIT)
        .arg("finetune")
        .arg("--model")
        .arg(refdir.join("pretrained"))
        .arg("--data")
        .arg(refdir.join("train.beitds"))
        .arg("--out")
        .arg(tmp.path().join("tuned"))
        .args(["--label-fraction", "0.5", "--steps", "1", "--batch", "8", "--threads", "1", "--seed", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "beit finetune failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["train_images"], 24, "{stdout}");
}

/// libbeit's conversion of the pretrained MIM model gives the reference's `init/` (written by
/// the script from unilm's rules): the shared relative position table copied into each block,
/// the mask token and MIM head gone, every backbone tensor as pretrained; the fresh head differs
/// only by its random draw (pooler norm 1/0, bias 0, weight ~ N(0, 0.02)·0.001 in both).
#[test]
fn libbeit_conversion_of_the_pretrained_model_gives_init() {
    let refdir = reference();
    let pretrained = Model::load(&refdir.join("pretrained")).unwrap();
    let init = Model::load(&refdir.join("init")).unwrap();
    let (ours, fresh) = classifier_from_pretrained(&pretrained, 3, 0.0, 0).unwrap();
    let (p, q) = (ours.params(), init.params());
    let names = |m: &Model| m.params().specs.iter().filter(|s| s.exported).map(|s| s.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&init));
    assert_eq!(
        fresh,
        ["beit.pooler.layernorm.weight", "beit.pooler.layernorm.bias", "classifier.weight", "classifier.bias"]
    );
    for spec in p.specs.iter().filter(|s| s.exported) {
        let (a, b) = (p.get(p.find(&spec.name).unwrap()), q.get(q.find(&spec.name).unwrap()));
        if spec.name == "classifier.weight" {
            let std = |v: &[f32]| (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt();
            for (who, v) in [("libbeit", a), ("init", b)] {
                assert!((1e-5..3e-5).contains(&std(v)), "{who}: classifier.weight rms {:e}", std(v));
            }
        } else {
            assert_eq!(a, b, "{}", spec.name);
        }
    }
    let c = ours.config();
    assert!(c.use_relative_position_bias && !c.use_shared_relative_position_bias && !c.use_mask_token);
}
