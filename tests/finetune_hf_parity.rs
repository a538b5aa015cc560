//! Must-hold: a model fine-tuned here and loaded in `transformers` gives the same logits.
//!
//! tests/reference_finetune (scripts/gen_finetune_reference.py) holds a tiny pretrained
//! `BeitForMaskedImageModeling`, a tiny labelled dataset, the `beit finetune` arguments, fixed
//! inputs, and the logits `transformers.BeitForImageClassification.from_pretrained` gave on them
//! for the directory that fine-tune wrote. This test re-runs the same fine-tune (same seed, one
//! thread) through the CLI and checks that the directory it writes gives those logits within
//! 1e-4; then it runs `beit eval` on the result.

use std::path::{Path, PathBuf};
use std::process::Command;

use beit::model::io::{read_f32, SafetensorsFile};
use beit::{ImageBatch, Model};

const BEIT: &str = env!("CARGO_BIN_EXE_beit");

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_finetune")
}

fn tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let file = SafetensorsFile::open(path).unwrap();
    let st = file.parse().unwrap();
    read_f32(&st, name).unwrap().unwrap()
}

#[test]
fn finetuned_directory_gives_transformers_logits() {
    let refdir = reference();
    let args: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("finetune_args.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tuned = tmp.path().join("tuned");
    let mut cmd = Command::new(BEIT);
    cmd.arg("finetune")
        .arg("--model")
        .arg(refdir.join("pretrained"))
        .arg("--data")
        .arg(refdir.join("train.beitds"))
        .arg("--out")
        .arg(&tuned);
    for (k, v) in &args {
        cmd.arg(format!("--{k}")).arg(v.as_str().unwrap());
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "beit finetune failed: {}", String::from_utf8_lossy(&out.stderr));

    // One JSON line per log interval (every 5 of 10 steps) and a summary.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (line, step) in lines.iter().zip([5, 10]) {
        assert_eq!(line["step"], step);
        assert!(line["loss"].as_f64().unwrap().is_finite() && line["lr"].as_f64().unwrap() > 0.0);
        assert!(line["images_per_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(lines[2]["train_images"], 24, "label fraction 0.5 of 48 samples");

    let model = Model::load(&tuned).unwrap();
    assert_eq!(model.architecture().hf_name(), "BeitForImageClassification");
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
    eprintln!("fine-tuned logits vs transformers: worst |diff| / max(1, |logit|) = {worst:.2e}");
    assert!(worst <= 1e-4, "ours {:?} vs transformers {hf:?}", ours.data);

    // `beit eval --json`: counts add up, the confusion matrix is 3x3 and matches top-1.
    let out = Command::new(BEIT)
        .args(["eval", "--json", "--threads", "1", "--model"])
        .arg(&tuned)
        .arg("--data")
        .arg(refdir.join("train.beitds"))
        .output()
        .unwrap();
    assert!(out.status.success(), "beit eval failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let confusion: Vec<Vec<u64>> = serde_json::from_value(v["confusion"].clone()).unwrap();
    assert_eq!(confusion.len(), 3);
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 48);
    let diagonal: u64 = (0..3).map(|i| confusion[i][i]).sum();
    assert_eq!(v["correct"].as_u64().unwrap(), diagonal);
    assert!((v["top1"].as_f64().unwrap() - diagonal as f64 / 48.0).abs() < 1e-12);
    eprintln!("beit eval on the 48 training images: top-1 {}", v["top1"]);
}
