//! Fine-tuning and evaluation through the C API against their independent references: the
//! weights of `beit finetune` and `beit segment finetune` (the CLI binary, run as a separate
//! process) bit for bit, from a pretrained directory and from scratch; a run stopped by its
//! callback, checkpointed and resumed in a fresh trainer ends on the same bits; the
//! evaluations equal the Rust API's and a hand-built case whose answer is known.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;

use beit::data::dataset::{Dataset, DatasetSpec, DatasetWriter};
use beit::ffi::context::{beit_context, beit_context_create, beit_context_free, beit_context_options_default};
use beit::ffi::finetune::*;
use beit::ffi::model::{beit_model, beit_model_free, beit_model_load, beit_model_save};
use beit::ffi::segmentation::*;
use beit::ffi::status::{beit_last_error_message, beit_status};
use beit::ffi::trainer::{
    beit_step_stats, beit_trainer, beit_trainer_create, beit_trainer_free, beit_trainer_load_checkpoint,
    beit_trainer_options, beit_trainer_save_checkpoint, beit_trainer_save_model, beit_trainer_step_count,
};
use beit::train::finetune::classifier_from_pretrained;
use beit::{Architecture, BeitConfig, Model};

const BEIT: &str = env!("CARGO_BIN_EXE_beit");
const THREADS: u32 = 2;

fn reference() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_finetune")
}

fn c(s: impl AsRef<str>) -> CString {
    CString::new(s.as_ref()).unwrap()
}

fn cpath(p: &Path) -> CString {
    c(p.to_str().unwrap())
}

#[track_caller]
fn ok(st: beit_status) {
    if st != beit_status::BEIT_OK {
        let msg = unsafe { CStr::from_ptr(beit_last_error_message()) }.to_string_lossy().into_owned();
        panic!("{st:?}: {msg}");
    }
}

/// A C API context with the CLI runs' thread count (the data-parallel shards follow it).
struct Ctx(*mut beit_context);

impl Ctx {
    fn new() -> Self {
        let mut o = beit_context_options_default();
        o.num_threads = THREADS;
        let mut ctx = ptr::null_mut();
        ok(unsafe { beit_context_create(&o, &mut ctx) });
        Ctx(ctx)
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        unsafe { beit_context_free(self.0) }
    }
}

struct ModelHandle(*mut beit_model);

impl Drop for ModelHandle {
    fn drop(&mut self) {
        unsafe { beit_model_free(self.0) }
    }
}

fn load(ctx: &Ctx, dir: &Path) -> ModelHandle {
    let mut m = ptr::null_mut();
    ok(unsafe { beit_model_load(ctx.0, cpath(dir).as_ptr(), &mut m) });
    ModelHandle(m)
}

fn cli(args: &[&str]) -> std::process::Output {
    let out = Command::new(BEIT).args(args).output().unwrap();
    assert!(out.status.success(), "beit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Both directories hold the same model, byte for byte (config and weights).
#[track_caller]
fn assert_same_model_dir(a: &Path, b: &Path) {
    for f in ["config.json", "model.safetensors"] {
        let (x, y) = (std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap());
        assert!(x == y, "{f} differs between {} and {}", a.display(), b.display());
    }
}

/// Counts the steps a callback saw, and stops the run after `stop_after` of them.
struct Progress {
    steps: Vec<u64>,
    stop_after: Option<usize>,
    thread: std::thread::ThreadId,
}

unsafe extern "C" fn on_step(stats: *const beit_step_stats, user_data: *mut c_void) -> i32 {
    let p = unsafe { &mut *(user_data as *mut Progress) };
    assert_eq!(std::thread::current().id(), p.thread, "the callback runs on the calling thread");
    p.steps.push(unsafe { (*stats).step });
    i32::from(p.stop_after.is_some_and(|n| p.steps.len() >= n))
}

const STEPS: u64 = 9;
const SEED: u64 = 3;

/// The fine-tuning run both front ends make: 9 steps of 8 images, half the labels.
fn finetune_options(scratch: &CString) -> beit_finetune_options {
    beit_finetune_options {
        batch_size: 8,
        seed: SEED,
        label_fraction: 0.5,
        workers: 2,
        scratch_dir: scratch.as_ptr(),
        ..beit_finetune_options_default()
    }
}

fn cli_finetune(extra: &[&str], out: &Path) {
    let data = reference().join("train.beitds");
    let mut args = vec!["finetune", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(["--steps", "9", "--batch", "8", "--seed", "3", "--label-fraction", "0.5", "--threads", "2"]);
    args.extend(["--loader-workers", "2", "--log-every", "100"]);
    args.extend(extra);
    cli(&args);
}

/// Fine-tunes `model` through the C API as `cli_finetune` does, optionally stopping after
/// `stop_at` steps, checkpointing, and resuming in a fresh trainer; saves the result to `out`.
fn c_finetune(ctx: &Ctx, model: &ModelHandle, stop_at: Option<usize>, dir: &Path, out: &Path) {
    let scratch = cpath(dir);
    let opts = finetune_options(&scratch);
    let topts = beit_trainer_options { seed: SEED, ..beit_trainer_options_finetune_default(STEPS) };
    let data = cpath(&reference().join("train.beitds"));
    let mut t: *mut beit_trainer = ptr::null_mut();
    ok(unsafe { beit_trainer_create(ctx.0, model.0, &topts, &mut t) });
    let mut progress = Progress { steps: Vec::new(), stop_after: stop_at, thread: std::thread::current().id() };
    let user = &mut progress as *mut Progress as *mut c_void;
    ok(unsafe { beit_trainer_finetune(t, data.as_ptr(), &opts, Some(on_step), user) });
    if let Some(n) = stop_at {
        assert_eq!(progress.steps, (1..=n as u64).collect::<Vec<_>>());
        let mut count = 0;
        ok(unsafe { beit_trainer_step_count(t, &mut count) });
        assert_eq!(count, n as u64, "the run went on after the callback said stop");
        let ckpt = cpath(&dir.join("stopped.safetensors"));
        ok(unsafe { beit_trainer_save_checkpoint(t, ckpt.as_ptr()) });
        unsafe { beit_trainer_free(t) };
        // A fresh trainer (other options, other seed) takes everything from the checkpoint.
        let other = beit_trainer_options_finetune_default(STEPS);
        t = ptr::null_mut();
        ok(unsafe { beit_trainer_create(ctx.0, model.0, &other, &mut t) });
        ok(unsafe { beit_trainer_load_checkpoint(t, ckpt.as_ptr()) });
        progress.steps.clear();
        progress.stop_after = None;
        ok(unsafe { beit_trainer_finetune(t, data.as_ptr(), &opts, Some(on_step), user) });
        assert_eq!(progress.steps, (n as u64 + 1..=STEPS).collect::<Vec<_>>());
    } else {
        assert_eq!(progress.steps, (1..=STEPS).collect::<Vec<_>>());
    }
    ok(unsafe { beit_trainer_save_model(t, cpath(out).as_ptr()) });
    unsafe { beit_trainer_free(t) };
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.contains("labelled-subset"))
        .collect();
    assert!(leftovers.is_empty(), "the subset's scratch file was left behind: {leftovers:?}");
}

#[test]
fn finetuning_a_pretrained_model_matches_the_cli_also_when_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let (want, got, resumed) = (dir.path().join("cli"), dir.path().join("c"), dir.path().join("c-resumed"));
    let pretrained = reference().join("pretrained");
    // --image-size too: the position tables are resized (shared relative bias, per block).
    cli_finetune(&["--model", pretrained.to_str().unwrap(), "--image-size", "20"], &want);

    let ctx = Ctx::new();
    let mim = load(&ctx, &pretrained);
    let mut cls = ptr::null_mut();
    // 3 labels: the data's largest label plus one, as the CLI counts them.
    ok(unsafe { beit_model_to_classifier(ctx.0, mim.0, 3, 0.1, SEED, &mut cls) });
    let cls = ModelHandle(cls);
    let mut resized = ptr::null_mut();
    ok(unsafe { beit_model_with_image_size(ctx.0, cls.0, 20, 20, &mut resized) });
    let resized = ModelHandle(resized);
    c_finetune(&ctx, &resized, None, dir.path(), &got);
    assert_same_model_dir(&want, &got);
    c_finetune(&ctx, &resized, Some(4), dir.path(), &resumed);
    assert_same_model_dir(&want, &resumed);
}

#[test]
fn finetuning_from_scratch_matches_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (want, got) = (dir.path().join("cli"), dir.path().join("c"));
    let config = std::fs::read_to_string(reference().join("pretrained/config.json")).unwrap();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, &config).unwrap();
    cli_finetune(&["--config", config_path.to_str().unwrap(), "--drop-path", "0.2"], &want);

    let ctx = Ctx::new();
    let mut m = ptr::null_mut();
    ok(unsafe { beit_classifier_create(ctx.0, c(&config).as_ptr(), 3, 0.2, SEED, &mut m) });
    let m = ModelHandle(m);
    let scratch = cpath(dir.path());
    let opts = finetune_options(&scratch);
    let topts =
        beit_trainer_options { seed: SEED, drop_path_rate: 0.2, ..beit_trainer_options_finetune_default(STEPS) };
    let mut t = ptr::null_mut();
    ok(unsafe { beit_trainer_create(ctx.0, m.0, &topts, &mut t) });
    let data = cpath(&reference().join("train.beitds"));
    // No callback; opts->steps 0 runs to the trainer's total_steps.
    ok(unsafe { beit_trainer_finetune(t, data.as_ptr(), &opts, None, ptr::null_mut()) });
    ok(unsafe { beit_trainer_save_model(t, cpath(&got).as_ptr()) });
    unsafe { beit_trainer_free(t) };
    assert_same_model_dir(&want, &got);
}

#[test]
fn epoch_steps_follow_the_label_fraction() {
    let data = cpath(&reference().join("train.beitds"));
    let mut n = 0;
    // 48 samples: 6 batches of 8; half of them (stratified) 3; a batch larger than the data, 1.
    ok(unsafe { beit_finetune_epoch_steps(data.as_ptr(), 8, 1.0, 0, &mut n) });
    assert_eq!(n, 6);
    ok(unsafe { beit_finetune_epoch_steps(data.as_ptr(), 8, 0.5, SEED, &mut n) });
    assert_eq!(n, 3);
    ok(unsafe { beit_finetune_epoch_steps(data.as_ptr(), 100, 1.0, 0, &mut n) });
    assert_eq!(n, 1);
    let st = unsafe { beit_finetune_epoch_steps(data.as_ptr(), 0, 1.0, 0, &mut n) };
    assert_eq!(st, beit_status::BEIT_ERR_INVALID_ARGUMENT);
}

/// Five 16x16 grey images labelled 0, 1, 1, 2, 1 (masks optional).
fn labelled_dataset(path: &Path) {
    let spec = DatasetSpec { height: 16, width: 16, channels: 1, labels: true, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for (i, label) in [0u32, 1, 1, 2, 1].into_iter().enumerate() {
        let px: Vec<u8> = (0..256).map(|p| ((p * 7 + i * 31) % 256) as u8).collect();
        w.push(&px, Some(label), None, None).unwrap();
    }
    w.finish().unwrap();
}

fn evaluate(ctx: &Ctx, model: &ModelHandle, data: &Path, k: usize) -> (beit_evaluation, Vec<u64>) {
    let mut confusion = vec![u64::MAX; k * k];
    let mut e = beit_evaluation {
        confusion: confusion.as_mut_ptr(),
        confusion_len: confusion.len(),
        ..beit_evaluation_default()
    };
    ok(unsafe { beit_model_evaluate(ctx.0, model.0, cpath(data).as_ptr(), 2, &mut e) });
    (e, confusion)
}

#[test]
fn evaluation_gives_the_known_answer_and_the_rust_apis() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("five.beitds");
    labelled_dataset(&data);
    let ctx = Ctx::new();

    // A classifier that answers 1 whatever the image: zero weights, the largest bias at 1.
    let pretrained = Model::load(&reference().join("pretrained")).unwrap();
    let (mut always_one, _) = classifier_from_pretrained(&pretrained, 3, 0.0, 0).unwrap();
    let p = always_one.params_mut();
    let w = p.find("classifier.weight").unwrap();
    p.get_mut(w).fill(0.0);
    let b = p.find("classifier.bias").unwrap();
    p.get_mut(b).copy_from_slice(&[0.0, 5.0, 0.0]);
    always_one.save(&dir.path().join("always-one")).unwrap();
    let m = load(&ctx, &dir.path().join("always-one"));
    let (e, confusion) = evaluate(&ctx, &m, &data, 3);
    assert_eq!((e.images, e.correct, e.num_labels), (5, 3, 3));
    assert_eq!(e.top1, 0.6);
    assert_eq!(confusion, [0, 1, 0, 0, 3, 0, 0, 1, 0]);

    // A trained-from-random classifier: the same numbers as the Rust API's evaluate.
    let (random, _) = classifier_from_pretrained(&pretrained, 3, 0.0, 9).unwrap();
    random.save(&dir.path().join("random")).unwrap();
    let want = beit::train::evaluate::evaluate(&random, &Dataset::open(&data).unwrap(), 2, |_, _| {}).unwrap();
    let (e, confusion) = evaluate(&ctx, &load(&ctx, &dir.path().join("random")), &data, 3);
    assert_eq!((e.images as usize, e.correct as usize, e.top1), (want.images, want.correct, want.top1));
    assert_eq!(confusion, want.confusion.concat());

    // The buffer must fit the model's labels; a wrong one writes nothing.
    let mut small = vec![7u64; 4];
    let mut e = beit_evaluation { confusion: small.as_mut_ptr(), confusion_len: 4, ..beit_evaluation_default() };
    let st = unsafe { beit_model_evaluate(ctx.0, m.0, cpath(&data).as_ptr(), 2, &mut e) };
    assert_eq!(st, beit_status::BEIT_ERR_BUFFER_SIZE);
    assert_eq!((small, e.images), (vec![7; 4], 0));
    // Without a buffer the counts still come.
    let mut e = beit_evaluation_default();
    ok(unsafe { beit_model_evaluate(ctx.0, m.0, cpath(&data).as_ptr(), 5, &mut e) });
    assert_eq!(e.correct, 3);
}

const SEG_SIZE: usize = 16;

/// `n` 16x16 RGB images, each with a bright square of one of 2 colours on a dark background;
/// mask = colour + 1 inside the square, 0 outside.
fn mask_dataset(path: &Path, n: usize) {
    let spec = DatasetSpec {
        height: SEG_SIZE as u32,
        width: SEG_SIZE as u32,
        channels: 3,
        labels: false,
        masks: true,
        token_grid: None,
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..n {
        let colour: [u8; 3] = if i % 2 == 0 { [220, 30, 30] } else { [30, 30, 220] };
        let (y0, x0, side) = ((i * 5) % 8, (i * 3) % 8, 6 + i % 3);
        let mut px = vec![40u8; SEG_SIZE * SEG_SIZE * 3];
        let mut mask = vec![0u8; SEG_SIZE * SEG_SIZE];
        for y in y0..y0 + side {
            for x in x0..x0 + side {
                mask[y * SEG_SIZE + x] = (i % 2) as u8 + 1;
                px[(y * SEG_SIZE + x) * 3..][..3].copy_from_slice(&colour);
            }
        }
        w.push(&px, None, Some(&mask), None).unwrap();
    }
    w.finish().unwrap();
}

const SEG_CONFIG: &str = r#"{"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 2, "intermediate_size": 64, "num_channels": 3, "use_relative_position_bias": true,
    "drop_path_rate": 0.1, "pool_scales": [1, 2], "auxiliary_channels": 16}"#;

/// The numbers after `"key":` in the CLI's JSON text (one, or an array's), parsed exactly
/// (serde_json's own float parsing may be off by an ulp); `None` for a `null`.
fn json_numbers(text: &str, key: &str) -> Vec<Option<f64>> {
    let at = text.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key} in {text}")) + key.len() + 3;
    let rest = text[at..].trim_start();
    let body = match rest.strip_prefix('[') {
        Some(array) => &array[..array.find(']').unwrap()],
        None => &rest[..rest.find([',', '\n', '}']).unwrap()],
    };
    body.split(',').map(|v| v.trim()).map(|v| (v != "null").then(|| v.parse().unwrap())).collect()
}

fn json_number(text: &str, key: &str) -> f64 {
    json_numbers(text, key)[0].unwrap()
}

fn cli_segment(start: &[&str], data: &Path, out: &Path) -> String {
    let mut args = vec!["segment", "finetune", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(start);
    args.extend(["--epochs", "2", "--batch-size", "4", "--threads", "2", "--test-fraction", "0.25"]);
    args.extend(["--split-seed", "5", "--seed", "7", "--label-fraction", "0.75", "--warmup-steps", "2"]);
    args.extend(["--mean", "0.4,0.5,0.6", "--std", "0.5"]);
    String::from_utf8(cli(&args).stdout).unwrap()
}

unsafe extern "C" fn on_seg_step(step: *const beit_segmentation_step, user_data: *mut c_void) -> i32 {
    let losses = unsafe { &mut *(user_data as *mut Vec<f64>) };
    losses.push(unsafe { (*step).loss });
    0
}

/// Fine-tunes `model` through the C API as `cli_segment` does, saves it to `out`, and returns
/// its per-step losses and report.
fn c_segment(ctx: &Ctx, model: &ModelHandle, data: &Path, out: &Path) -> (Vec<f64>, beit_segmentation_report) {
    let mean = [0.4f32, 0.5, 0.6];
    let std = [0.5f32];
    let opts = beit_segmentation_options {
        epochs: 2,
        batch_size: 4,
        test_fraction: 0.25,
        split_seed: 5,
        seed: 7,
        label_fraction: 0.75,
        warmup_steps: 2,
        mean: mean.as_ptr(),
        mean_len: 3,
        std: std.as_ptr(),
        std_len: 1,
        ..beit_segmentation_options_default()
    };
    let mut losses: Vec<f64> = Vec::new();
    let mut report = beit_segmentation_report_default();
    let mut trained = ptr::null_mut();
    ok(unsafe {
        beit_segmentation_finetune(
            ctx.0,
            model.0,
            cpath(data).as_ptr(),
            &opts,
            Some(on_seg_step),
            &mut losses as *mut Vec<f64> as *mut c_void,
            &mut report,
            &mut trained,
        )
    });
    let trained = ModelHandle(trained);
    ok(unsafe { beit_model_save(trained.0, cpath(out).as_ptr()) });
    (losses, report)
}

fn seg_evaluate(ctx: &Ctx, dir: &Path, data: &Path, split: beit_split) -> (beit_segmentation_evaluation, Vec<f64>) {
    let model = load(ctx, dir);
    let mean = [0.4f32, 0.5, 0.6];
    let std = [0.5f32];
    let opts = beit_segmentation_eval_options {
        test_fraction: 0.25,
        split_seed: 5,
        split: RawSplit(split as u32),
        mean: mean.as_ptr(),
        mean_len: 3,
        std: std.as_ptr(),
        std_len: 1,
        ..beit_segmentation_eval_options_default()
    };
    let mut per_class = vec![-1.0; 3];
    let mut e = beit_segmentation_evaluation {
        per_class_iou: per_class.as_mut_ptr(),
        per_class_iou_len: 3,
        ..beit_segmentation_evaluation_default()
    };
    ok(unsafe { beit_model_evaluate_segmentation(ctx.0, model.0, cpath(data).as_ptr(), &opts, &mut e) });
    (e, per_class)
}

#[test]
fn segmentation_matches_the_cli_from_a_pretrained_model_and_from_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("squares.beitds");
    mask_dataset(&data, 24);
    // A pretrained masked image modeling directory to take the backbone from.
    let mut mim_config = BeitConfig::from_json_str(SEG_CONFIG).unwrap();
    mim_config.use_mask_token = true;
    let mim_dir = dir.path().join("mim");
    Model::new_random(mim_config, Architecture::MaskedImageModeling, 11).unwrap().save(&mim_dir).unwrap();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, SEG_CONFIG).unwrap();
    let ctx = Ctx::new();

    let want = dir.path().join("cli-pretrained");
    let cli_report = cli_segment(&["--model", mim_dir.to_str().unwrap()], &data, &want);
    let mim = load(&ctx, &mim_dir);
    let mut seg = ptr::null_mut();
    // 3 classes: background and the two colours (the CLI counts the largest mask value + 1).
    ok(unsafe { beit_model_to_segmenter(ctx.0, mim.0, 3, 7, &mut seg) });
    let seg = ModelHandle(seg);
    let got = dir.path().join("c-pretrained");
    let (losses, report) = c_segment(&ctx, &seg, &data, &got);
    assert_same_model_dir(&want, &got);
    let cli_losses: Vec<Option<f64>> = json_numbers(&cli_report, "losses");
    assert_eq!(losses.into_iter().map(Some).collect::<Vec<_>>(), cli_losses);
    // 24 samples: 6 test, 18 train, three quarters of it 14 (stratified rounding), 3 batches of 4.
    assert_eq!((report.train_samples, report.test_samples), (14, 6));
    assert_eq!(report.steps, 6);
    assert_eq!(json_number(&cli_report, "train_samples"), 14.0);
    assert_eq!(report.final_epoch_loss, json_number(&cli_report, "final_epoch_loss"));

    // The test split's evaluation equals the CLI's report of it, and the Rust API's.
    let (e, per_class) = seg_evaluate(&ctx, &got, &data, beit_split::BEIT_SPLIT_TEST);
    assert_eq!(e.samples, 6);
    assert_eq!(e.mean_iou, json_number(&cli_report, "mean_iou"));
    assert_eq!(e.pixel_accuracy, json_number(&cli_report, "pixel_accuracy"));
    let ours: Vec<Option<f64>> = per_class.iter().map(|&v| (!v.is_nan()).then_some(v)).collect();
    assert_eq!(ours, json_numbers(&cli_report, "per_class_iou"));
    let all = (0..24).collect::<Vec<_>>();
    let want_all = beit::train::segmentation::evaluate(
        &Model::load(&got).unwrap(),
        &Dataset::open(&data).unwrap(),
        &all,
        32,
        &[0.4, 0.5, 0.6],
        &[0.5],
    )
    .unwrap();
    let (e, _) = seg_evaluate(&ctx, &got, &data, beit_split::BEIT_SPLIT_ALL);
    assert_eq!((e.samples, e.mean_iou, e.pixel_accuracy), (24, want_all.mean_iou, want_all.pixel_accuracy));

    let want = dir.path().join("cli-scratch");
    cli_segment(&["--config", config_path.to_str().unwrap()], &data, &want);
    let mut fresh = ptr::null_mut();
    ok(unsafe { beit_segmenter_create(ctx.0, c(SEG_CONFIG).as_ptr(), 3, 7, &mut fresh) });
    let fresh = ModelHandle(fresh);
    let got = dir.path().join("c-scratch");
    c_segment(&ctx, &fresh, &data, &got);
    assert_same_model_dir(&want, &got);
}

unsafe extern "C" fn stop_at_once(_: *const beit_segmentation_step, user_data: *mut c_void) -> i32 {
    unsafe { *(user_data as *mut u32) += 1 };
    1
}

#[test]
fn a_stopped_segmentation_run_hands_out_the_steps_done() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("squares.beitds");
    mask_dataset(&data, 12);
    let ctx = Ctx::new();
    let mut seg = ptr::null_mut();
    ok(unsafe { beit_segmenter_create(ctx.0, c(SEG_CONFIG).as_ptr(), 3, 1, &mut seg) });
    let seg = ModelHandle(seg);
    let opts = beit_segmentation_options { epochs: 3, batch_size: 2, ..beit_segmentation_options_default() };
    let mut calls = 0u32;
    let mut report = beit_segmentation_report_default();
    let mut trained = ptr::null_mut();
    ok(unsafe {
        beit_segmentation_finetune(
            ctx.0,
            seg.0,
            cpath(&data).as_ptr(),
            &opts,
            Some(stop_at_once),
            &mut calls as *mut u32 as *mut c_void,
            &mut report,
            &mut trained,
        )
    });
    let trained = ModelHandle(trained);
    assert_eq!((calls, report.steps), (1, 1));
    // One step moved the weights; the source model is untouched.
    let (a, b) = (dir.path().join("source"), dir.path().join("trained"));
    ok(unsafe { beit_model_save(seg.0, cpath(&a).as_ptr()) });
    ok(unsafe { beit_model_save(trained.0, cpath(&b).as_ptr()) });
    let fresh = segmenter_reference(1);
    assert_eq!(Model::load(&a).unwrap().params().data, fresh.params().data);
    assert_ne!(Model::load(&b).unwrap().params().data, fresh.params().data);
}

fn segmenter_reference(seed: u64) -> Model {
    beit::train::segmentation::segmenter_from_config(BeitConfig::from_json_str(SEG_CONFIG).unwrap(), 3, seed).unwrap()
}
