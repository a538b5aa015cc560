//! The tokenizer trainer's C API (`beit_dvae_trainer_*`), called as C would: dataset-driven
//! training writes, bit for bit, the tokenizer `beit tokenizer train` writes with the same data,
//! options and seed (also when split into several calls or stopped by the callback and
//! resumed); host-batch steps equal the Rust `DvaeTrainer`'s; the handed-out tokenizer is a
//! copy that tokenizes as the saved one; a trainer loaded from a saved tokenizer holds its
//! weights; a failed save leaves the old files; every bad argument is refused, changing nothing.

use std::ffi::{c_void, CStr, CString};
use std::mem::size_of;
use std::path::Path;
use std::process::Command;
use std::ptr::{null, null_mut};

use beit::data::dataset::{DatasetSpec, DatasetWriter};
use beit::dvae::{map_pixels, Dvae, DvaeConfig};
use beit::ffi::context::{beit_context, beit_context_create, beit_context_free, beit_context_options_default};
use beit::ffi::dvae::*;
use beit::ffi::status::{beit_last_error_message, beit_status};
use beit::ffi::tokenizer::{
    beit_tokenizer_decode, beit_tokenizer_free, beit_tokenizer_info_default, beit_tokenizer_tokenize,
};
use beit::model::io::{CONFIG_FILE, WEIGHTS_FILE};
use beit::train::dvae::{DvaeTrainOptions, DvaeTrainer};

use beit_status::*;

fn last_error() -> String {
    // SAFETY: never NULL, NUL-terminated.
    unsafe { CStr::from_ptr(beit_last_error_message()) }.to_str().unwrap().to_string()
}

fn context() -> *mut beit_context {
    let mut opts = beit_context_options_default();
    opts.num_threads = 2;
    let mut ctx = null_mut();
    assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, BEIT_OK, "{}", last_error());
    ctx
}

fn cstr(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// `count` grey 12x12 images of varied content.
fn write_dataset(path: &Path, count: usize, channels: u32) {
    let spec = DatasetSpec { height: 12, width: 12, channels, labels: false, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..count {
        let px: Vec<u8> =
            (0..144 * channels as usize).map(|p| ((p * 29 + i * 83 + (p / 12) * (i % 5) * 17) % 256) as u8).collect();
        w.push(&px, None, None, None).unwrap();
    }
    w.finish().unwrap();
}

/// The small tokenizer of these tests: 8x8 grey images, 4x4 tokens of 16 codes.
fn config() -> beit_dvae_config {
    beit_dvae_config {
        in_channels: 1,
        image_size: 8,
        vocab_size: 16,
        n_hid: 8,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: 8,
        ..beit_dvae_config_default()
    }
}

/// Every training option away from its default (the CLI gets the same values below).
fn options() -> beit_dvae_train_options {
    beit_dvae_train_options {
        lr: 2e-3,
        kl_weight: 0.01,
        tau_start: 0.9,
        tau_end: 0.2,
        total_steps: 7,
        seed: 11,
        ..beit_dvae_train_options_default()
    }
}

fn data_options(steps: u64) -> beit_dvae_data_options {
    beit_dvae_data_options {
        steps,
        batch: 5,
        crop_scale_min: 0.4,
        workers: 3,
        seed: 11,
        ..beit_dvae_data_options_default()
    }
}

/// The CLI's run with the same everything, into `out`; returns the losses it logged, as the
/// text of the JSON numbers (serde_json writes an f64's shortest round-trip form, which is one
/// text per value, but does not parse every text back to the exact f64 by default).
fn cli_train(data: &Path, out: &Path) -> Vec<String> {
    let run = Command::new(env!("CARGO_BIN_EXE_beit"))
        .args(["tokenizer", "train", "--image-size", "8", "--vocab", "16", "--n-hid", "8", "--groups", "2"])
        .args(["--blocks-per-group", "1", "--decoder-width", "8", "--steps", "7", "--batch", "5", "--lr", "2e-3"])
        .args(["--kl-weight", "0.01", "--tau-start", "0.9", "--tau-end", "0.2", "--crop-scale-min", "0.4"])
        .args(["--seed", "11", "--eval-images", "4", "--log-every", "1", "--json", "--threads", "2"])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8(run.stdout).unwrap();
    let losses: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains("\"step\":"))
        .map(|l| {
            let from = l.find("\"loss\":").unwrap() + "\"loss\":".len();
            let len = l[from..].find([',', '}']).unwrap();
            l[from..from + len].to_string()
        })
        .collect();
    assert_eq!(losses.len(), 7, "{stdout}");
    losses
}

/// The losses as the CLI's JSON writes them.
fn as_json(losses: &[f64]) -> Vec<String> {
    losses.iter().map(|l| serde_json::to_string(l).unwrap()).collect()
}

fn create(
    ctx: *const beit_context,
    config: &beit_dvae_config,
    opts: &beit_dvae_train_options,
) -> *mut beit_dvae_trainer {
    let mut t = null_mut();
    assert_eq!(unsafe { beit_dvae_trainer_create(ctx, config, opts, &mut t) }, BEIT_OK, "{}", last_error());
    assert!(!t.is_null());
    t
}

fn step_count(t: *const beit_dvae_trainer) -> u64 {
    let mut n = 0;
    assert_eq!(unsafe { beit_dvae_trainer_step_count(t, &mut n) }, BEIT_OK, "{}", last_error());
    n
}

fn save(t: *const beit_dvae_trainer, dir: &Path) {
    assert_eq!(unsafe { beit_dvae_trainer_save(t, cstr(dir).as_ptr()) }, BEIT_OK, "{}", last_error());
}

fn files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (std::fs::read(dir.join(CONFIG_FILE)).unwrap(), std::fs::read(dir.join(WEIGHTS_FILE)).unwrap())
}

/// What the progress callback saw, and when it stops the run.
struct Progress {
    steps: Vec<u64>,
    losses: Vec<f64>,
    stop_at: u64,
}

unsafe extern "C" fn record(stats: *const beit_dvae_step_stats, user_data: *mut c_void) -> i32 {
    // SAFETY: the test passes a live Progress; the stats are valid during the call.
    let (p, s) = unsafe { (&mut *(user_data as *mut Progress), &*stats) };
    assert_eq!(s.struct_size, size_of::<beit_dvae_step_stats>());
    p.steps.push(s.step);
    p.losses.push(s.loss);
    i32::from(s.step == p.stop_at)
}

/// Trains through the C API with `steps` per call (0: to total_steps); returns the summaries.
fn train(
    t: *mut beit_dvae_trainer,
    data: &Path,
    steps: u64,
    progress: &mut Progress,
) -> (beit_status, beit_dvae_train_summary) {
    let mut summary = beit_dvae_train_summary_default();
    let opts = data_options(steps);
    let user = progress as *mut Progress as *mut c_void;
    let st = unsafe { beit_dvae_trainer_train(t, cstr(data).as_ptr(), &opts, Some(record), user, &mut summary) };
    (st, summary)
}

#[test]
fn dataset_training_equals_the_cli_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.beitds");
    write_dataset(&data, 24, 1); // 4 batches of 5 per epoch: 7 steps cross into epoch 1
    let cli_out = dir.path().join("cli");
    let cli_losses = cli_train(&data, &cli_out);
    let ctx = context();

    // One call: steps 0 runs up to total_steps.
    let t = create(ctx, &config(), &options());
    let mut seen = Progress { steps: vec![], losses: vec![], stop_at: 0 };
    let (st, summary) = train(t, &data, 0, &mut seen);
    assert_eq!(st, BEIT_OK, "{}", last_error());
    assert_eq!((summary.steps, summary.stopped, step_count(t)), (7, false, 7));
    assert!(summary.seconds > 0.0);
    assert_eq!(seen.steps, (1..=7).collect::<Vec<_>>());
    assert_eq!(as_json(&seen.losses), cli_losses, "the callback's losses differ from the CLI's log");
    let api_out = dir.path().join("api");
    save(t, &api_out);
    assert_eq!(files(&api_out), files(&cli_out), "the C API's tokenizer differs from the CLI's");
    // At total_steps, steps 0 has nothing left to run.
    let (st, summary) = train(t, &data, 0, &mut seen);
    assert_eq!((st, summary.steps, step_count(t)), (BEIT_OK, 0, 7));

    // Three calls, the first stopped by its callback after step 2: the same tokenizer.
    let split = create(ctx, &config(), &options());
    let mut seen = Progress { steps: vec![], losses: vec![], stop_at: 2 };
    let (st, summary) = train(split, &data, 5, &mut seen);
    assert_eq!((st, summary.steps, summary.stopped, step_count(split)), (BEIT_OK, 2, true, 2));
    let (st, summary) = train(split, &data, 1, &mut seen);
    assert_eq!((st, summary.steps, summary.stopped), (BEIT_OK, 1, false));
    let (st, summary) = train(split, &data, 0, &mut seen);
    assert_eq!((st, summary.steps, step_count(split)), (BEIT_OK, 4, 7));
    assert_eq!(as_json(&seen.losses), cli_losses);
    let split_out = dir.path().join("split");
    save(split, &split_out);
    assert_eq!(files(&split_out), files(&cli_out));

    // No callback and no summary are fine too.
    let quiet = create(ctx, &config(), &options());
    let opts = data_options(0);
    let st = unsafe { beit_dvae_trainer_train(quiet, cstr(&data).as_ptr(), &opts, None, null_mut(), null_mut()) };
    assert_eq!((st, step_count(quiet)), (BEIT_OK, 7), "{}", last_error());
    let quiet_out = dir.path().join("quiet");
    save(quiet, &quiet_out);
    assert_eq!(files(&quiet_out), files(&cli_out));
    unsafe {
        beit_dvae_trainer_free(t);
        beit_dvae_trainer_free(split);
        beit_dvae_trainer_free(quiet);
        beit_context_free(ctx);
    }
}

/// Mapped pixels `[batch, 1, 8, 8]`, varied.
fn mapped_batch(batch: usize, seed: usize) -> Vec<f32> {
    (0..batch * 64).map(|i| map_pixels(((i * 37 + seed * 11) % 97) as f32 / 96.0)).collect()
}

#[test]
fn host_steps_equal_the_rust_trainer_and_the_tokenizer_is_a_copy() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context();
    let t = create(ctx, &config(), &options());
    let rust_config = DvaeConfig {
        vocab_size: 16,
        n_hid: 8,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: Some(8),
        ..DvaeConfig::small_grey(8)
    };
    let rust_options = DvaeTrainOptions {
        lr: 2e-3,
        kl_weight: 0.01,
        tau_start: 0.9,
        tau_end: 0.2,
        seed: 11,
        ..DvaeTrainOptions::for_steps(7)
    };
    let mut reference = DvaeTrainer::new(Dvae::new(rust_config, 11).unwrap(), rust_options).unwrap();
    for k in 0..3 {
        let px = mapped_batch(3, k);
        let mut stats = beit_dvae_step_stats_default();
        let st = unsafe { beit_dvae_trainer_step(t, px.as_ptr(), px.len(), 3, &mut stats) };
        assert_eq!(st, BEIT_OK, "{}", last_error());
        let want = reference.step(&px).unwrap();
        assert_eq!(stats.step, k as u64 + 1);
        let got = [stats.loss, stats.recon_mse, stats.kl, stats.perplexity, stats.tau, stats.lr];
        let want = [want.loss, want.recon_mse, want.kl, want.perplexity, want.tau as f64, want.lr as f64];
        assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "step {k}");
    }
    // A NULL out is fine.
    let px = mapped_batch(2, 9);
    assert_eq!(unsafe { beit_dvae_trainer_step(t, px.as_ptr(), px.len(), 2, null_mut()) }, BEIT_OK);
    reference.step(&px).unwrap();
    let saved = dir.path().join("tok");
    save(t, &saved);
    assert_eq!(Dvae::load(&saved).unwrap().params.data, reference.dvae.params.data);

    let mut info = beit_tokenizer_info_default();
    assert_eq!(unsafe { beit_dvae_trainer_get_info(t, &mut info) }, BEIT_OK);
    let got = (info.in_channels, info.image_size, info.vocab_size, info.grid_h, info.grid_w, info.tokens_per_image);
    assert_eq!((got, info.has_decoder), ((1, 8, 16, 4, 4, 16), true));

    // The handed-out tokenizer tokenizes (unmapped pixels) as the Rust tokenizer does (mapped).
    let mut tok = null_mut();
    assert_eq!(unsafe { beit_dvae_trainer_get_tokenizer(t, &mut tok) }, BEIT_OK, "{}", last_error());
    let plain: Vec<f32> = (0..4 * 64).map(|i| ((i * 13) % 50) as f32 / 49.0).collect();
    let mapped: Vec<f32> = plain.iter().map(|&x| map_pixels(x)).collect();
    let want: Vec<i64> = reference.dvae.tokenize(&mapped).unwrap().into_iter().map(i64::from).collect();
    let tokenize = |tok| {
        let mut tokens = vec![-1i64; 4 * 16];
        let st = unsafe { beit_tokenizer_tokenize(tok, plain.as_ptr(), plain.len(), 4, tokens.as_mut_ptr(), 64) };
        assert_eq!(st, BEIT_OK, "{}", last_error());
        tokens
    };
    assert_eq!(tokenize(tok), want);
    let mut pixels = vec![0f32; 4 * 64];
    assert_eq!(unsafe { beit_tokenizer_decode(tok, want.as_ptr(), 64, 4, pixels.as_mut_ptr(), pixels.len()) }, BEIT_OK);
    // More steps change the trainer, not the copy.
    for k in 0..3 {
        let px = mapped_batch(3, 20 + k);
        assert_eq!(unsafe { beit_dvae_trainer_step(t, px.as_ptr(), px.len(), 3, null_mut()) }, BEIT_OK);
    }
    assert_eq!(tokenize(tok), want);
    unsafe {
        beit_tokenizer_free(tok);
        beit_dvae_trainer_free(t);
        beit_context_free(ctx);
    }
}

#[test]
fn a_loaded_tokenizer_trains_on_from_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context();
    let t = create(ctx, &config(), &options());
    let px = mapped_batch(2, 1);
    assert_eq!(unsafe { beit_dvae_trainer_step(t, px.as_ptr(), px.len(), 2, null_mut()) }, BEIT_OK);
    let first = dir.path().join("first");
    save(t, &first);
    let mut loaded = null_mut();
    let st = unsafe { beit_dvae_trainer_load(ctx, cstr(&first).as_ptr(), &options(), &mut loaded) };
    assert_eq!(st, BEIT_OK, "{}", last_error());
    assert_eq!(step_count(loaded), 0);
    let again = dir.path().join("again");
    save(loaded, &again);
    assert_eq!(files(&again), files(&first));
    // A NULL opts takes the defaults.
    let mut defaults = null_mut();
    assert_eq!(unsafe { beit_dvae_trainer_load(ctx, cstr(&first).as_ptr(), null(), &mut defaults) }, BEIT_OK);

    // An encoder without a decoder cannot be trained.
    let encoder_only = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_dvae/dalle_small");
    let mut none = null_mut();
    let st = unsafe { beit_dvae_trainer_load(ctx, cstr(&encoder_only).as_ptr(), null(), &mut none) };
    assert_eq!(st, BEIT_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("decoder"), "{}", last_error());
    assert!(none.is_null());
    let st = unsafe { beit_dvae_trainer_load(ctx, cstr(&dir.path().join("missing")).as_ptr(), null(), &mut none) };
    assert_eq!(st, BEIT_ERR_IO, "{}", last_error());
    unsafe {
        beit_dvae_trainer_free(t);
        beit_dvae_trainer_free(loaded);
        beit_dvae_trainer_free(defaults);
        beit_context_free(ctx);
    }
}

/// Every entry in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_failed_save_leaves_the_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context();
    let t = create(ctx, &config(), &options());
    let out = dir.path().join("tok");
    save(t, &out);
    let before = std::fs::read(out.join(CONFIG_FILE)).unwrap();
    let px = mapped_batch(2, 4);
    assert_eq!(unsafe { beit_dvae_trainer_step(t, px.as_ptr(), px.len(), 2, null_mut()) }, BEIT_OK);
    // model.safetensors replaced by a non-empty directory: the new weights cannot be renamed
    // into place (also for root), so neither file may be replaced.
    std::fs::remove_file(out.join(WEIGHTS_FILE)).unwrap();
    std::fs::create_dir(out.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(out.join(WEIGHTS_FILE).join("keep"), b"x").unwrap();
    assert_eq!(unsafe { beit_dvae_trainer_save(t, cstr(&out).as_ptr()) }, BEIT_ERR_IO);
    assert!(last_error().contains("rename"), "{}", last_error());
    assert_eq!(std::fs::read(out.join(CONFIG_FILE)).unwrap(), before, "config.json replaced by a failed save");
    assert_eq!(listing(&out), [CONFIG_FILE, WEIGHTS_FILE], "a failed save left temporary files");

    // A directory that cannot be created: nothing is left behind.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    assert_eq!(unsafe { beit_dvae_trainer_save(t, cstr(&blocker.join("sub")).as_ptr()) }, BEIT_ERR_IO);
    assert_eq!(listing(dir.path()), ["a-file", "tok"]);
    unsafe {
        beit_dvae_trainer_free(t);
        beit_context_free(ctx);
    }
}

fn expect(st: beit_status, want: beit_status, words: &[&str]) {
    let msg = last_error();
    assert_eq!(st, want, "{msg}");
    for w in words {
        assert!(msg.contains(w), "{msg:?} lacks {w:?}");
    }
}

#[test]
fn bad_arguments_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context();
    let mut out = null_mut();
    use beit_status::{BEIT_ERR_INVALID_ARGUMENT as INVALID, BEIT_ERR_NULL_POINTER as NULL};

    // Creation.
    let bad_config = |c: beit_dvae_config, words: &[&str]| {
        let mut t = null_mut();
        expect(unsafe { beit_dvae_trainer_create(ctx, &c, &options(), &mut t) }, INVALID, words);
        assert!(t.is_null());
    };
    bad_config(beit_dvae_config { in_channels: 0, ..config() }, &["config->in_channels"]);
    bad_config(beit_dvae_config { image_size: 9, ..config() }, &["config->image_size 9"]);
    bad_config(beit_dvae_config { n_hid: 6, ..config() }, &["config->n_hid"]);
    bad_config(beit_dvae_config { group_count: 7, ..config() }, &["config->group_count"]);
    bad_config(beit_dvae_config { n_blk_per_group: 0, ..config() }, &["config->n_blk_per_group"]);
    bad_config(beit_dvae_config { vocab_size: 1, ..config() }, &["config->vocab_size"]);
    bad_config(beit_dvae_config { decoder_n_init: 0, ..config() }, &["config->decoder_n_init"]);
    bad_config(beit_dvae_config { struct_size: 8, ..config() }, &["config->struct_size is 8"]);
    let bad_options = |o: beit_dvae_train_options, words: &[&str]| {
        let mut t = null_mut();
        expect(unsafe { beit_dvae_trainer_create(ctx, &config(), &o, &mut t) }, INVALID, words);
        assert!(t.is_null());
    };
    bad_options(beit_dvae_train_options { lr: f32::NAN, ..options() }, &["opts->lr", "NaN"]);
    bad_options(beit_dvae_train_options { lr: -1.0, ..options() }, &["opts->lr"]);
    bad_options(beit_dvae_train_options { kl_weight: f32::INFINITY, ..options() }, &["opts->kl_weight"]);
    bad_options(beit_dvae_train_options { tau_start: 0.0, ..options() }, &["opts->tau_start"]);
    bad_options(beit_dvae_train_options { tau_end: -0.5, ..options() }, &["opts->tau_end"]);
    bad_options(beit_dvae_train_options { total_steps: 0, ..options() }, &["opts->total_steps"]);
    bad_options(beit_dvae_train_options { struct_size: 0, ..options() }, &["opts->struct_size is 0"]);
    expect(unsafe { beit_dvae_trainer_create(null(), &config(), &options(), &mut out) }, NULL, &["ctx"]);
    expect(unsafe { beit_dvae_trainer_create(ctx, &config(), &options(), null_mut()) }, NULL, &["out"]);
    expect(unsafe { beit_dvae_trainer_load(ctx, null(), null(), &mut out) }, NULL, &["dir"]);
    let non_utf8 = [0xffu8, 0];
    expect(unsafe { beit_dvae_trainer_load(ctx, non_utf8.as_ptr().cast(), null(), &mut out) }, INVALID, &["UTF-8"]);
    // A parameter count beyond the memory budget: refused before anything is allocated.
    let huge = beit_dvae_config { n_hid: 4096, group_count: 5, vocab_size: 65536, image_size: 64, ..config() };
    let mut t = null_mut();
    let st = unsafe { beit_dvae_trainer_create(ctx, &huge, &options(), &mut t) };
    assert!(st != BEIT_OK && t.is_null(), "{st:?}");

    // NULL config and opts are the defaults.
    let mut defaults = null_mut();
    assert_eq!(unsafe { beit_dvae_trainer_create(ctx, null(), null(), &mut defaults) }, BEIT_OK, "{}", last_error());
    let mut info = beit_tokenizer_info_default();
    assert_eq!(unsafe { beit_dvae_trainer_get_info(defaults, &mut info) }, BEIT_OK);
    assert_eq!((info.in_channels, info.image_size, info.vocab_size, info.grid_h), (1, 32, 8192, 8));
    unsafe { beit_dvae_trainer_free(defaults) };

    let t = create(ctx, &config(), &options());
    let saved = dir.path().join("before");
    save(t, &saved);
    let unchanged = |t| {
        assert_eq!(step_count(t), 0);
        let now = dir.path().join("now");
        save(t, &now);
        assert_eq!(files(&now), files(&saved), "a refused call changed the trainer");
    };

    // Steps.
    let px = mapped_batch(2, 0);
    let step = |px: *const f32, len: usize, batch: usize, out: *mut beit_dvae_step_stats| unsafe {
        beit_dvae_trainer_step(t, px, len, batch, out)
    };
    let mut stats = beit_dvae_step_stats { step: 99, ..beit_dvae_step_stats_default() };
    expect(step(null(), 128, 2, &mut stats), NULL, &["pixels"]);
    expect(unsafe { beit_dvae_trainer_step(null_mut(), px.as_ptr(), 128, 2, &mut stats) }, NULL, &["trainer"]);
    expect(step(px.as_ptr(), 128, 0, &mut stats), INVALID, &["batch is 0"]);
    expect(step(px.as_ptr(), 127, 2, &mut stats), INVALID, &["pixels_len is 127", "needs 128"]);
    expect(step(px.as_ptr(), 128, usize::MAX / 2, &mut stats), INVALID, &["more values than fit in memory"]);
    let misaligned = unsafe { (px.as_ptr() as *const u8).add(1) } as *const f32;
    expect(step(misaligned, 128, 2, &mut stats), INVALID, &["aligned"]);
    let mut nan = px.clone();
    nan[70] = f32::NAN;
    expect(step(nan.as_ptr(), 128, 2, &mut stats), INVALID, &["pixels[70] is NaN"]);
    let mut small = beit_dvae_step_stats { struct_size: 4, ..beit_dvae_step_stats_default() };
    expect(step(px.as_ptr(), 128, 2, &mut small), INVALID, &["out->struct_size is 4"]);
    assert_eq!(stats.step, 99, "stats written by a refused step");
    unchanged(t);

    // Dataset runs.
    let data = dir.path().join("grey.beitds");
    write_dataset(&data, 6, 1);
    let rgb = dir.path().join("rgb.beitds");
    write_dataset(&rgb, 6, 3);
    let mut summary = beit_dvae_train_summary { steps: 99, ..beit_dvae_train_summary_default() };
    let run = |path: &Path, opts: beit_dvae_data_options, summary: &mut beit_dvae_train_summary| unsafe {
        beit_dvae_trainer_train(t, cstr(path).as_ptr(), &opts, None, null_mut(), summary)
    };
    let d = beit_dvae_data_options { batch: 2, ..data_options(2) };
    expect(run(&rgb, d, &mut summary), INVALID, &["3 channel(s) and the tokenizer takes 1"]);
    expect(run(&data, beit_dvae_data_options { batch: 7, ..d }, &mut summary), INVALID, &["fewer images (6)"]);
    expect(run(&data, beit_dvae_data_options { batch: 0, ..d }, &mut summary), INVALID, &["batch"]);
    expect(run(&data, beit_dvae_data_options { workers: 0, ..d }, &mut summary), INVALID, &["worker"]);
    expect(run(&data, beit_dvae_data_options { workers: 100_000, ..d }, &mut summary), INVALID, &["worker"]);
    for scale in [0.0, -0.5, 1.5, f64::NAN] {
        let o = beit_dvae_data_options { crop_scale_min: scale, ..d };
        expect(run(&data, o, &mut summary), INVALID, &["opts->crop_scale_min"]);
    }
    expect(run(&data, beit_dvae_data_options { struct_size: 3, ..d }, &mut summary), INVALID, &["opts->struct_size"]);
    let mut small = beit_dvae_train_summary { struct_size: 1, ..beit_dvae_train_summary_default() };
    expect(run(&data, d, &mut small), INVALID, &["out->struct_size is 1"]);
    expect(run(&dir.path().join("missing.beitds"), d, &mut summary), BEIT_ERR_IO, &["missing.beitds"]);
    std::fs::write(dir.path().join("junk.beitds"), b"not a dataset").unwrap();
    expect(run(&dir.path().join("junk.beitds"), d, &mut summary), BEIT_ERR_FORMAT, &[]);
    let st = unsafe { beit_dvae_trainer_train(t, null(), &d, None, null_mut(), &mut summary) };
    expect(st, NULL, &["dataset_path"]);
    assert_eq!(summary.steps, 99, "summary written by a refused run");
    unchanged(t);

    // The rest.
    expect(unsafe { beit_dvae_trainer_save(t, null()) }, NULL, &["dir"]);
    expect(unsafe { beit_dvae_trainer_save(null(), cstr(dir.path()).as_ptr()) }, NULL, &["trainer"]);
    expect(unsafe { beit_dvae_trainer_get_tokenizer(t, null_mut()) }, NULL, &["out"]);
    expect(unsafe { beit_dvae_trainer_get_tokenizer(null(), &mut null_mut()) }, NULL, &["trainer"]);
    expect(unsafe { beit_dvae_trainer_step_count(t, null_mut()) }, NULL, &["out"]);
    expect(unsafe { beit_dvae_trainer_get_info(t, null_mut()) }, NULL, &["out"]);
    let mut small = beit_tokenizer_info_default();
    small.struct_size = 2;
    expect(unsafe { beit_dvae_trainer_get_info(t, &mut small) }, INVALID, &["struct_size is 2"]);
    unsafe { beit_dvae_trainer_free(null_mut()) };
    unchanged(t);
    unsafe {
        beit_dvae_trainer_free(t);
        beit_context_free(ctx);
    }
}

/// A callback that calls into the trainer it is being called from: refused as busy.
unsafe extern "C" fn reenter(_stats: *const beit_dvae_step_stats, user_data: *mut c_void) -> i32 {
    // SAFETY: the test passes (trainer, statuses).
    let (t, seen) = unsafe { &mut *(user_data as *mut (*mut beit_dvae_trainer, Vec<(beit_status, String)>)) };
    let mut n = 0;
    let st = unsafe { beit_dvae_trainer_step_count(*t, &mut n) };
    seen.push((st, last_error()));
    0
}

#[test]
fn a_callback_calling_into_its_trainer_is_busy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.beitds");
    write_dataset(&data, 4, 1);
    let ctx = context();
    let t = create(ctx, &config(), &options());
    let mut state: (*mut beit_dvae_trainer, Vec<(beit_status, String)>) = (t, Vec::new());
    let opts = beit_dvae_data_options { batch: 2, ..data_options(3) };
    let user = &mut state as *mut _ as *mut c_void;
    let st = unsafe { beit_dvae_trainer_train(t, cstr(&data).as_ptr(), &opts, Some(reenter), user, null_mut()) };
    assert_eq!(st, BEIT_OK, "{}", last_error());
    assert_eq!(state.1.len(), 3);
    for (st, msg) in &state.1 {
        assert_eq!(*st, BEIT_ERR_BUSY);
        assert!(msg.starts_with("beit_dvae_trainer_step_count: the dVAE trainer is busy"), "{msg}");
    }
    assert_eq!(step_count(t), 3);
    unsafe {
        beit_dvae_trainer_free(t);
        beit_context_free(ctx);
    }
}
