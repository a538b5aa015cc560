//! Segmentation fine-tuning end to end on a synthetic mask dataset (coloured rectangles on a
//! noisy background, class = colour): the Rust API learns (mIoU on held-out images rises far
//! above the untrained model's), the CLI (`beit segment finetune` / `eval`) runs and reports the
//! same split, and `beit infer` writes HF's logits for a segmentation directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use beit::data::dataset::{Dataset, DatasetSpec, DatasetWriter};
use beit::model::io::{read_f32, SafetensorsFile};
use beit::train::segmentation::{
    evaluate, finetune, mask_classes, segmentation_config, split_indices, SegFinetuneOptions,
};
use beit::{Architecture, BeitConfig, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BEIT: &str = env!("CARGO_BIN_EXE_beit");
const SIZE: usize = 32;
const COLOURS: [[u8; 3]; 3] = [[230, 40, 40], [40, 200, 60], [50, 70, 230]];

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beit-seg-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` images with one or two rectangles each; mask = colour index + 1, 0 elsewhere.
fn synthetic_dataset(path: &Path, n: usize) {
    let spec = DatasetSpec {
        height: SIZE as u32,
        width: SIZE as u32,
        channels: 3,
        labels: false,
        masks: true,
        token_grid: None,
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..n {
        let mut px: Vec<u8> = (0..SIZE * SIZE * 3).map(|_| rng.random_range(90..150)).collect();
        let mut mask = vec![0u8; SIZE * SIZE];
        for _ in 0..rng.random_range(1..3) {
            let c = rng.random_range(0..3usize);
            let (h, w) = (rng.random_range(8..20), rng.random_range(8..20));
            let (y0, x0) = (rng.random_range(0..SIZE - h), rng.random_range(0..SIZE - w));
            for y in y0..y0 + h {
                for x in x0..x0 + w {
                    mask[y * SIZE + x] = c as u8 + 1;
                    px[(y * SIZE + x) * 3..(y * SIZE + x) * 3 + 3].copy_from_slice(&COLOURS[c]);
                }
            }
        }
        w.push(&px, None, Some(&mask), None).unwrap();
    }
    w.finish().unwrap();
}

fn tiny_config() -> BeitConfig {
    BeitConfig::from_json_str(
        r#"{"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 4,
            "num_attention_heads": 2, "intermediate_size": 64, "use_relative_position_bias": true,
            "drop_path_rate": 0.0, "pool_scales": [1, 2], "auxiliary_channels": 16}"#,
    )
    .unwrap()
}

#[test]
fn finetune_learns_synthetic_masks() {
    let dir = temp_dir("api");
    let path = dir.join("rects.beitds");
    synthetic_dataset(&path, 160);
    let data = Dataset::open(&path).unwrap();
    let classes = mask_classes(&data).unwrap();
    assert_eq!(classes, 4);
    let (train, test) = split_indices(data.len(), 0.25, 0).unwrap();
    let cfg = segmentation_config(tiny_config(), classes);
    let mut model = Model::new_random(cfg, Architecture::SemanticSegmentation, 0).unwrap();
    let (mean, std) = (vec![0.5f32], vec![0.5f32]);
    let before = evaluate(&model, &data, &test, 32, &mean, &std).unwrap();
    let opts =
        SegFinetuneOptions { epochs: 6, batch_size: 8, lr: 2e-3, warmup_steps: 10, seed: 3, ..Default::default() };
    let mut losses = Vec::new();
    let start = std::time::Instant::now();
    let report = finetune(&mut model, &data, &train, &opts, |s| losses.push(s.loss)).unwrap();
    let after = evaluate(&model, &data, &test, 32, &mean, &std).unwrap();
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!(
        "{} steps in {:.1} s: loss {first:.3} -> {last:.3}; test mIoU {:.3} -> {:.3} (pixel acc {:.3} -> {:.3}); \
         per class {:?}",
        report.steps,
        start.elapsed().as_secs_f64(),
        before.mean_iou,
        after.mean_iou,
        before.pixel_accuracy,
        after.pixel_accuracy,
        after.per_class
    );
    assert_eq!(report.steps, 6 * (120 / 8));
    assert!(last < 0.6 * first, "loss did not fall enough: {first} -> {last}");
    assert!(after.mean_iou > before.mean_iou + 0.3, "mIoU {} -> {}", before.mean_iou, after.mean_iou);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `beit segment finetune` from the config at `cfg` on `data`, written to `out`, with `extra`
/// arguments after the common ones.
fn segment_finetune(cfg: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BEIT)
        .args(["segment", "finetune", "--config", cfg.to_str().unwrap(), "--data", data.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

/// `--label-fraction` trains on a seeded part of the train split; the test split is unchanged.
#[test]
fn cli_label_fraction_trains_on_part_of_the_train_split() {
    let dir = temp_dir("cli-fraction");
    let path = dir.join("rects.beitds");
    synthetic_dataset(&path, 40);
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, tiny_config().to_json_string()).unwrap();
    let run = |fraction: &str, out: &str| {
        let args = ["--epochs", "1", "--batch-size", "4", "--threads", "2", "--label-fraction", fraction];
        let run = segment_finetune(&cfg_path, &path, &dir.join(out), &args);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        serde_json::from_slice::<serde_json::Value>(&run.stdout).unwrap()
    };
    // 40 samples: 8 test, 32 train; a quarter of the train split is 8 samples, 2 batches of 4.
    let report = run("0.25", "quarter");
    assert_eq!(report["train_samples"], 8, "{report}");
    assert_eq!(report["test_samples"], 8);
    assert_eq!(report["steps"], 2);
    assert_eq!(report["losses"].as_array().unwrap().len(), 2);
    let bad = segment_finetune(&cfg_path, &path, &dir.join("bad"), &["--label-fraction", "0"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("label fraction"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn cli_finetune_eval_and_infer() {
    let dir = temp_dir("cli");
    let path = dir.join("rects.beitds");
    synthetic_dataset(&path, 40);
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, tiny_config().to_json_string()).unwrap();
    let out = dir.join("model");
    let run = segment_finetune(&cfg_path, &path, &out, &["--epochs", "1", "--batch-size", "4", "--threads", "2"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["steps"], 8, "{report}");
    assert_eq!(report["test_samples"], 8);
    let miou = report["test"]["mean_iou"].as_f64().unwrap();
    assert!(out.join("report.json").is_file());
    let model = Model::load(&out).unwrap();
    assert_eq!(model.architecture(), Architecture::SemanticSegmentation);
    assert_eq!(model.config().num_labels(), 4);

    let eval = Command::new(BEIT)
        .args(["segment", "eval", "--model", out.to_str().unwrap(), "--data", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let e: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(e["samples"], 8);
    assert!((e["mean_iou"].as_f64().unwrap() - miou).abs() < 1e-12, "eval {e} vs finetune {miou}");

    // `beit infer` on an HF segmentation directory writes HF's logits.
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_segmentation/noaux_abs_48");
    let logits_out = dir.join("out.safetensors");
    let infer = Command::new(BEIT)
        .args(["infer", "--model", case.to_str().unwrap()])
        .args(["--inputs", case.join("inputs.safetensors").to_str().unwrap()])
        .args(["--output", logits_out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(infer.status.success(), "{}", String::from_utf8_lossy(&infer.stderr));
    let ours = SafetensorsFile::open(&logits_out).unwrap();
    let hf = SafetensorsFile::open(&case.join("outputs.safetensors")).unwrap();
    let (s1, a) = read_f32(&ours.parse().unwrap(), "logits").unwrap().unwrap();
    let (s2, b) = read_f32(&hf.parse().unwrap(), "logits").unwrap().unwrap();
    assert_eq!(s1, s2);
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "beit infer logits differ by {worst}");
    std::fs::remove_dir_all(&dir).unwrap();
}
