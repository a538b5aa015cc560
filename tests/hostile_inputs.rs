//! The hostile-input suite (issue 16): every class of input that once aborted, hung, panicked,
//! destroyed data or gave a wrong answer that looked right, fed to the `beit` command line and to
//! the C API, each expected to be refused cleanly.
//!
//! One table row per case (the `hostile!` block below), one `#[test]` per row. A row is a
//! command line (`cli`) or a call through the C API (`c_api`: tests/hostile/driver.c, compiled
//! here with gcc against include/beit.h and target/release/libbeit.so) whose arguments name files
//! as `{d}/NAME`. Each case runs in a fresh directory `{d}` holding copies of the fixtures it
//! names (tiny models, datasets, a tokenizer, a pretraining run; made once per test process) and
//! its own files, and must end in a clean refusal:
//! - the command line exits with a code in 1..=99; the C API call returns a status other than
//!   `BEIT_OK` and `BEIT_ERR_INTERNAL` (a caught panic);
//! - with a message, and no panic text ("panicked", "RUST_BACKTRACE", "memory allocation of")
//!   on stdout or stderr;
//! - no signal (an abort is SIGABRT), and within the timeout (a hang is a failure);
//! - the directory is byte-identical afterwards: no output left behind (not even an empty
//!   directory or a temporary file), every input and every file that was there unchanged;
//! - where a row says `mentions`, the message names that (the tensor with a NaN, the option a
//!   resume changed).
//!
//! A few rows (`refused_or_succeeds`) also accept a success: values a command may clamp, such
//! as a batch larger than the whole dataset; they must still never abort, panic or hang.
//!
//! Every process runs under `prlimit --as` (4 GiB unless `BEIT_HOSTILE_AS` says otherwise), so
//! an allocation that should have been refused fails the case with SIGABRT instead of taking the
//! machine's memory; the library's default budget ("the memory available to this process")
//! sees that limit. The `baseline_*` rows run each command family once with valid values under
//! the same cap and must succeed: so the refusals above are refusals of the hostile value, not of
//! the cap or of a mistyped command.
//!
//! Environment: `BEIT_HOSTILE_AS` (bytes; the address-space cap), `BEIT_HOSTILE_TIMEOUT_S` (per
//! process, default 60), `BEIT_HOSTILE_KEEP=1` (keep a failed case's directory),
//! `BEIT_HOSTILE_LOG=FILE` (append one line per case: verdict, exit, message). Needs gcc,
//! readelf and prlimit (util-linux), and target/release/libbeit.so as new as src/ (`cargo
//! build --release`, which scripts/test runs first: `cargo test` does not rebuild the cdylib).
//! docs/hardening-tests.md says how to add a case.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use beit::data::dataset::{DatasetSpec, DatasetWriter};
use beit::dvae::{Dvae, DvaeConfig};
use beit::model::io::{read_f32, SafetensorsFile};
use beit::{Architecture, BeitConfig, Model};
use serde_json::{json, Value};

const BEIT: &str = env!("CARGO_BIN_EXE_beit");
const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");
const SCRATCH: &str = env!("CARGO_TARGET_TMPDIR");

/// Text that only a panic or an allocation abort prints.
const PANIC_TEXT: [&str; 3] = ["panicked", "RUST_BACKTRACE", "memory allocation of"];

fn address_space_cap() -> u64 {
    std::env::var("BEIT_HOSTILE_AS").ok().and_then(|v| v.parse().ok()).unwrap_or(4 << 30)
}

fn timeout() -> Duration {
    let s = std::env::var("BEIT_HOSTILE_TIMEOUT_S").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    Duration::from_secs(s)
}

// ---------------------------------------------------------------------------------------------
// Cases

/// Who runs a case.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Runner {
    /// target/release/beit.
    Cli,
    /// tests/hostile/driver.c (the C API).
    CApi,
}

/// What a case must end in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    Refusal,
    /// A baseline: success, every pre-existing file unchanged (new files are the outputs),
    /// except those under the paths given to [`Case::may_change`].
    Success,
    /// Either a clean refusal or a success (as [`Expect::Refusal`] or [`Expect::Success`]):
    /// for values a command may legitimately clamp, e.g. a batch larger than the whole dataset.
    RefusalOrSuccess,
}

/// A file a case writes into its directory before it runs.
enum Made {
    Bytes(Vec<u8>),
    /// A `pixel_values` f32 tensor of zeros with this shape (large: written in pieces).
    ZeroPixels([usize; 4]),
}

struct Case {
    runner: Runner,
    args: Vec<String>,
    files: Vec<(String, Made)>,
    mentions: Vec<String>,
    expect: Expect,
    may_change: Vec<String>,
}

/// A command line: `beit ARGS`. Whitespace separates arguments; `{d}` is the case's directory.
fn cli(args: &str) -> Case {
    Case::new(Runner::Cli, args)
}

/// A C API call: `hostile_driver ARGS` (the case names are in tests/hostile/driver.c).
fn c_api(args: &str) -> Case {
    Case::new(Runner::CApi, args)
}

impl Case {
    fn new(runner: Runner, args: &str) -> Case {
        Case {
            runner,
            args: args.split_whitespace().map(str::to_string).collect(),
            files: Vec::new(),
            mentions: Vec::new(),
            expect: Expect::Refusal,
            may_change: Vec::new(),
        }
    }

    /// Sets `flag` to `value`: replaces the value after `flag` where the command has it,
    /// appends both otherwise (clap refuses a flag given twice).
    fn set(mut self, flag: &str, value: &str) -> Case {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() && !self.args[i + 1].starts_with("--") => {
                self.args[i + 1] = value.to_string()
            }
            Some(i) => self.args.insert(i + 1, value.to_string()),
            None => self.args.extend([flag.to_string(), value.to_string()]),
        }
        self
    }

    /// Writes `name` (relative to `{d}`) with `bytes` before the run.
    fn file(mut self, name: &str, bytes: impl Into<Vec<u8>>) -> Case {
        self.files.push((name.to_string(), Made::Bytes(bytes.into())));
        self
    }

    /// Writes `name` as a model config: [`TINY`] with `overrides` applied.
    fn config(self, name: &str, overrides: Value) -> Case {
        self.file(name, tiny_with(overrides).to_string())
    }

    /// Writes `name` as a safetensors file with a zero `pixel_values` of `shape`.
    fn zero_pixels(mut self, name: &str, shape: [usize; 4]) -> Case {
        self.files.push((name.to_string(), Made::ZeroPixels(shape)));
        self
    }

    /// The refusal's message must contain `text` (case-insensitive).
    fn mentions(mut self, text: &str) -> Case {
        self.mentions.push(text.to_string());
        self
    }

    fn succeeds(mut self) -> Case {
        self.expect = Expect::Success;
        self
    }

    fn refused_or_succeeds(mut self) -> Case {
        self.expect = Expect::RefusalOrSuccess;
        self
    }

    /// A baseline may change what is under `path` (e.g. a resumed run's checkpoint).
    fn may_change(mut self, path: &str) -> Case {
        self.may_change.push(path.to_string());
        self
    }
}

/// The tiny model every case starts from: 16x16 grey images, 4x4 patches, 2 layers of width 32,
/// shared relative position bias, a mask token, 64 visual tokens.
const TINY: &str = r#"{"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 64,
    "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1,
    "drop_path_rate": 0.1}"#;

/// A segmentation backbone of the same kind (4 layers: the FPN taps four of them).
const SEG: &str = r#"{"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 32,
    "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
    "use_relative_position_bias": true, "out_indices": [1, 2, 3, 4], "pool_scales": [1, 2],
    "auxiliary_channels": 16}"#;

fn tiny_with(overrides: Value) -> Value {
    let mut v: Value = serde_json::from_str(TINY).unwrap();
    for (k, x) in overrides.as_object().expect("overrides are an object") {
        v[k] = x.clone();
    }
    v
}

// The command families, each valid as it stands (the baselines run them): a case changes one
// value with `set`. `--threads 1` keeps the 2-core machine free for the parallel cases.
const CREATE: &str = "create --config {d}/cfg.json --out {d}/created";
const INFER: &str =
    "infer --model {d}/tiny_backbone --inputs {d}/in.safetensors --output {d}/out.safetensors --threads 1";
const PRETRAIN: &str = "pretrain --config {d}/tiny.json --steps 1 --batch 2 --threads 1 --out {d}/new_run";
const PRETRAIN_DS: &str =
    "pretrain --config {d}/tiny.json --data {d}/grey.beitds --target pixels --steps 1 --batch 2 --threads 1 --out {d}/new_run";
/// Continues the `run` fixture (made by `PRETRAIN_DS` with `--out run`) by one step.
const RESUME: &str =
    "pretrain --config {d}/tiny.json --data {d}/grey.beitds --target pixels --steps 2 --batch 2 --threads 1 --out {d}/run --resume";
const REPLAY: &str = "pretrain-replay --model {d}/tiny_mim --batch {d}/batch.safetensors --steps 1 --lr 1e-3 --threads 1 --out {d}/replayed";
const FINETUNE: &str =
    "finetune --config {d}/tiny.json --data {d}/grey.beitds --steps 1 --batch 2 --threads 1 --out {d}/ft";
const FINETUNE_PRE: &str =
    "finetune --model {d}/tiny_mim --data {d}/grey.beitds --steps 1 --batch 2 --threads 1 --out {d}/ft";
const EVAL: &str = "eval --model {d}/tiny_cls --data {d}/grey.beitds --threads 1";
const SEG_FT: &str =
    "segment finetune --config {d}/seg.json --data {d}/grey.beitds --epochs 1 --batch-size 2 --threads 1 --out {d}/seg_out";
const SEG_EVAL: &str = "segment eval --model {d}/tiny_seg --data {d}/grey.beitds --threads 1";
const TOK_TRAIN: &str =
    "tokenizer train --data {d}/grey.beitds --out {d}/tok_out --image-size 16 --vocab 16 --n-hid 4 \
     --groups 2 --decoder-width 8 --steps 1 --batch 2 --eval-images 2 --threads 1";
const TOKENIZE: &str = "tokenize --tokenizer {d}/tok --data {d}/grey.beitds --out {d}/cache.beitds --threads 1";
const BENCH_INFER: &str = "bench infer --model {d}/tiny_backbone --batch 2 --iters 1 --threads 1";
const BENCH_PRETRAIN: &str = "bench pretrain --config {d}/tiny.json --batch 2 --iters 1 --warmup 0 --threads 1";
const BENCH_LOADER: &str =
    "bench loader --dataset {d}/grey.beitds --batch 2 --threads 1 --image-size 16 --patch 4 --masked 4 --batches 1";
const IMPORT_IDX: &str =
    "dataset import --format idx --images {d}/img.idx --labels {d}/lab.idx --out {d}/imported.beitds";
const IMPORT_NPY: &str = "dataset import --format npy --images {d}/x.npy --labels {d}/y.npy --out {d}/imported.beitds";
const IMPORT_FOLDER: &str = "dataset import --format image-folder --dir {d}/folder --size 4 --out {d}/imported.beitds";
const IMPORT_EMOJI: &str =
    "dataset import --format emoji --dir {d}/emoji --set google --size 4 --out {d}/imported.beitds";
const COMBINE: &str = "dataset combine --out {d}/combined.beitds {d}/grey.beitds {d}/grey_other.beitds";

/// Parameters, positions or activations of these configs need terabytes; every single field is
/// within its own cap.
fn huge_vocab() -> Value {
    json!({"vocab_size": 16_000_000, "hidden_size": 4096, "num_attention_heads": 4})
}
fn huge_labels() -> Value {
    json!({"num_labels": 1_000_000, "hidden_size": 65536, "num_attention_heads": 1, "intermediate_size": 64})
}
fn huge_channels() -> Value {
    json!({"num_channels": 4096, "patch_size": 64, "image_size": 64, "hidden_size": 768, "num_attention_heads": 4})
}
fn huge_hidden() -> Value {
    json!({"hidden_size": 65536, "intermediate_size": 65536, "num_attention_heads": 1, "num_hidden_layers": 12})
}
fn huge_depth() -> Value {
    json!({"hidden_size": 4096, "intermediate_size": 16384, "num_attention_heads": 4, "num_hidden_layers": 1024})
}
/// 65536x65536 pixels in 1x1 patches: 2^32 positions.
fn tiny_patch(positions: &str) -> Value {
    let mut v = json!({"patch_size": 1, "image_size": 65536, "use_shared_relative_position_bias": false});
    match positions {
        "absolute" => v["use_absolute_position_embeddings"] = true.into(),
        "relative" => v["use_relative_position_bias"] = true.into(),
        "shared" => v["use_shared_relative_position_bias"] = true.into(),
        _ => unreachable!(),
    }
    v
}

/// One `#[test]` per row.
macro_rules! hostile {
    ($($(#[$doc:meta])* $name:ident: $case:expr;)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                run_case(stringify!($name), $case);
            }
        )*
    };
}

hostile! {
    // ---- Baselines: each command family with valid values succeeds under the same cap.
    baseline_create: cli(CREATE).config("cfg.json", json!({})).succeeds();
    baseline_infer: cli(INFER).succeeds();
    baseline_pretrain: cli(PRETRAIN).succeeds();
    baseline_pretrain_dataset: cli(PRETRAIN_DS).succeeds();
    baseline_pretrain_resume: cli(RESUME).succeeds().may_change("run");
    baseline_pretrain_replay: cli(REPLAY).succeeds();
    baseline_finetune: cli(FINETUNE).succeeds();
    baseline_finetune_pretrained: cli(FINETUNE_PRE).succeeds();
    baseline_eval: cli(EVAL).succeeds();
    baseline_segment_finetune: cli(SEG_FT).succeeds();
    baseline_segment_eval: cli(SEG_EVAL).succeeds();
    baseline_tokenizer_train: cli(TOK_TRAIN).succeeds();
    baseline_tokenize: cli(TOKENIZE).succeeds();
    baseline_bench_infer: cli(BENCH_INFER).succeeds();
    baseline_bench_pretrain: cli(BENCH_PRETRAIN).succeeds();
    baseline_bench_loader: cli(BENCH_LOADER).succeeds();
    baseline_import_idx: cli(IMPORT_IDX).succeeds();
    baseline_import_npy: cli(IMPORT_NPY).succeeds();
    baseline_import_image_folder: cli(IMPORT_FOLDER).succeeds();
    baseline_import_emoji: cli(IMPORT_EMOJI).succeeds();
    baseline_combine: cli(COMBINE).succeeds();
    baseline_c_create: c_api("create {d}/cfg.json 1").config("cfg.json", json!({})).succeeds();
    baseline_c_infer: c_api("infer {d}/tiny_backbone 2 16 16").succeeds();
    baseline_c_load: c_api("load {d}/tiny_cls").succeeds();
    baseline_c_tokenizer_load: c_api("tokenizer_load {d}/tok").succeeds();

    // ---- 1. Allocation before validation: configs whose product is enormous.
    create_huge_vocab_size: cli(CREATE).config("cfg.json", huge_vocab()).set("--architecture", "BeitForMaskedImageModeling");
    create_vocab_size_above_cap: cli(CREATE).config("cfg.json", json!({"vocab_size": 1_000_000_000_000u64}));
    create_vocab_size_u64_max: cli(CREATE).config("cfg.json", json!({"vocab_size": u64::MAX}));
    create_huge_num_labels: cli(CREATE).config("cfg.json", huge_labels()).set("--architecture", "BeitForImageClassification");
    create_num_labels_above_cap: cli(CREATE).config("cfg.json", json!({"num_labels": 1_000_000_000_000u64}))
        .set("--architecture", "BeitForImageClassification");
    create_huge_num_channels: cli(CREATE).config("cfg.json", huge_channels());
    create_huge_hidden_size: cli(CREATE).config("cfg.json", huge_hidden());
    create_huge_depth: cli(CREATE).config("cfg.json", huge_depth());
    create_tiny_patch_large_image_absolute: cli(CREATE).config("cfg.json", tiny_patch("absolute"));
    create_tiny_patch_large_image_relative: cli(CREATE).config("cfg.json", tiny_patch("relative"));
    create_tiny_patch_large_image_shared: cli(CREATE).config("cfg.json", tiny_patch("shared"));
    create_over_memory_budget: cli(CREATE).config("cfg.json", json!({})).set("--memory-budget", "64K");
    pretrain_config_huge_vocab_size: cli(PRETRAIN).set("--config", "{d}/cfg.json").config("cfg.json", huge_vocab());
    pretrain_huge_vocab_size_flag: cli(PRETRAIN).set("--vocab-size", "16000000").set("--config", "tiny32");
    pretrain_vocab_size_flag_above_cap: cli(PRETRAIN).set("--vocab-size", "1000000000000");
    finetune_config_huge_hidden_size: cli(FINETUNE).set("--config", "{d}/cfg.json").config("cfg.json", huge_hidden());
    segment_finetune_config_huge_hidden_size: cli(SEG_FT).set("--config", "{d}/cfg.json")
        .file("cfg.json", seg_with(json!({"hidden_size": 65536, "intermediate_size": 65536, "num_attention_heads": 1})));
    /// Pyramid pooling at the largest scale the config allows: tens of GB of maps per image.
    segment_finetune_pool_scale_4096: cli(SEG_FT).set("--config", "{d}/cfg.json")
        .file("cfg.json", seg_with(json!({"pool_scales": [4096]})));
    /// A model directory whose config claims terabytes beside small weights.
    infer_model_config_claims_huge: cli(INFER).set("--model", "{d}/claims_huge");
    /// A checkpoint whose metadata's config claims terabytes.
    pretrain_resume_checkpoint_claims_huge: cli(RESUME).set("--out", "{d}/run_claims_huge");

    // ---- 1. A huge batch in every command that takes one.
    pretrain_huge_batch: cli(PRETRAIN).set("--batch", "1000000000000");
    pretrain_batch_usize_max: cli(PRETRAIN).set("--batch", "18446744073709551615");
    pretrain_dataset_huge_batch: cli(PRETRAIN_DS).set("--batch", "1000000000000");
    // A batch larger than a dataset may be clamped to it: refused or run, but never an abort.
    finetune_huge_batch: cli(FINETUNE).set("--batch", "1000000000000").refused_or_succeeds();
    eval_huge_batch: cli(EVAL).set("--batch", "1000000000000").refused_or_succeeds();
    segment_finetune_huge_batch: cli(SEG_FT).set("--batch-size", "1000000000000").refused_or_succeeds();
    segment_eval_huge_batch: cli(SEG_EVAL).set("--batch-size", "1000000000000").refused_or_succeeds();
    tokenizer_train_huge_batch: cli(TOK_TRAIN).set("--batch", "1000000000000");
    bench_infer_huge_batch: cli(BENCH_INFER).set("--batch", "1000000000000");
    bench_pretrain_huge_batch: cli(BENCH_PRETRAIN).set("--batch", "1000000000000");
    bench_loader_huge_batch: cli(BENCH_LOADER).set("--batch", "1000000000000").refused_or_succeeds();

    // ---- 1. Tokenizer widths.
    tokenizer_train_huge_vocab: cli(TOK_TRAIN).set("--vocab", "16000000");
    tokenizer_train_vocab_above_cap: cli(TOK_TRAIN).set("--vocab", "1000000000000");
    tokenizer_train_huge_n_hid: cli(TOK_TRAIN).set("--n-hid", "65536");
    tokenizer_train_huge_decoder_width: cli(TOK_TRAIN).set("--decoder-width", "1000000");
    tokenizer_train_huge_groups: cli(TOK_TRAIN).set("--groups", "64");
    tokenizer_train_zero_groups: cli(TOK_TRAIN).set("--groups", "0");
    tokenizer_train_huge_image_size: cli(TOK_TRAIN).set("--image-size", "65536");
    tokenizer_train_zero_image_size: cli(TOK_TRAIN).set("--image-size", "0");
    tokenizer_train_zero_vocab: cli(TOK_TRAIN).set("--vocab", "0");

    // ---- 1. Image sizes and importers.
    /// 65536 is the largest side the config check allows: 2^28 patches of 4x4.
    finetune_largest_image_size: cli(FINETUNE_PRE).set("--image-size", "65536");
    finetune_image_size_above_cap: cli(FINETUNE_PRE).set("--image-size", "65537");
    finetune_zero_image_size: cli(FINETUNE_PRE).set("--image-size", "0");
    import_idx_huge_pad: cli(IMPORT_IDX).set("--pad", "65536");
    import_idx_pad_u32_max: cli(IMPORT_IDX).set("--pad", "4294967295x4294967295");
    import_image_folder_huge_size: cli(IMPORT_FOLDER).set("--size", "65536x65536");
    /// The package has an img/google/65536/ folder (of 4x4 images): the size picks it.
    import_emoji_huge_size: cli(IMPORT_EMOJI).set("--size", "65536");
    import_idx_header_claims_huge_dims: cli(IMPORT_IDX).set("--images", "{d}/huge.idx").set("--labels", "")
        .file("huge.idx", idx_images_header(&[1 << 30, 1 << 16, 1 << 16]));
    import_npy_header_claims_huge_shape: cli(IMPORT_NPY).set("--images", "{d}/huge.npy").set("--labels", "")
        .file("huge.npy", npy_u8(&[1 << 40, 1 << 20, 1 << 20], &[]));

    // ---- 1. Label counts from the data.
    /// Labels 0, 1 and 4,000,000,000 against a 3-class model: the confusion matrix's side.
    eval_huge_label_value: cli(EVAL).set("--data", "{d}/huge_label.beitds");
    /// A label of 1,000,000 (under the label cap): a 10^12-cell confusion matrix.
    eval_label_a_million: cli(EVAL).set("--data", "{d}/label_1m.beitds");
    /// One label of 4,000,000,000 sets the class count of a fresh classifier.
    finetune_hostile_label_sets_class_count: cli(FINETUNE).set("--data", "{d}/huge_label.beitds");
    finetune_pretrained_hostile_label_sets_class_count: cli(FINETUNE_PRE).set("--data", "{d}/huge_label.beitds");
    finetune_huge_num_labels: cli(FINETUNE).set("--num-labels", "1000000000000");
    segment_finetune_huge_num_labels: cli(SEG_FT).set("--num-labels", "1000000000000");
    segment_finetune_pretrained_huge_num_labels: cli(SEG_FT).set("--config", "").set("--model", "{d}/tiny_mim")
        .set("--num-labels", "1000000000000");

    // ---- 1. Threads.
    pretrain_50000_loader_workers: cli(PRETRAIN_DS).set("--loader-workers", "50000");
    finetune_50000_loader_workers: cli(FINETUNE).set("--loader-workers", "50000");
    bench_loader_50000_threads: cli(BENCH_LOADER).set("--threads", "50000");
    infer_a_million_threads: cli(INFER).set("--threads", "1000000");

    // ---- 1. An input image whose attention needs terabytes: 4096x4096 in 4x4 patches is
    // 2^20 tokens (a 64 MiB pixel file).
    infer_attention_needs_terabytes: cli(INFER).set("--inputs", "{d}/big.safetensors")
        .zero_pixels("big.safetensors", [1, 1, 4096, 4096]);
    infer_attention_needs_terabytes_absolute_positions: cli(INFER).set("--model", "{d}/tiny_backbone_abs")
        .set("--inputs", "{d}/big.safetensors").zero_pixels("big.safetensors", [1, 1, 4096, 4096]);

    // ---- 2. Hangs: a non-positive initializer_range.
    create_initializer_range_zero: cli(CREATE).config("cfg.json", json!({"initializer_range": 0.0}));
    create_initializer_range_negative: cli(CREATE).config("cfg.json", json!({"initializer_range": -0.02}));
    create_initializer_range_huge: cli(CREATE).config("cfg.json", json!({"initializer_range": 1e300}));
    pretrain_initializer_range_zero: cli(PRETRAIN).set("--config", "{d}/cfg.json")
        .config("cfg.json", json!({"initializer_range": 0.0}));
    finetune_initializer_range_negative: cli(FINETUNE).set("--config", "{d}/cfg.json")
        .config("cfg.json", json!({"initializer_range": -1.0}));
    segment_finetune_initializer_range_zero: cli(SEG_FT).set("--config", "{d}/cfg.json")
        .file("cfg.json", seg_with(json!({"initializer_range": 0.0})));
    bench_pretrain_initializer_range_zero: cli(BENCH_PRETRAIN).set("--config", "{d}/cfg.json")
        .config("cfg.json", json!({"initializer_range": 0.0}));

    // ---- 3. Zero (and other degenerate) sizes.
    pretrain_zero_batch: cli(PRETRAIN).set("--batch", "0");
    pretrain_dataset_zero_batch: cli(PRETRAIN_DS).set("--batch", "0");
    finetune_zero_batch: cli(FINETUNE).set("--batch", "0");
    eval_zero_batch: cli(EVAL).set("--batch", "0");
    segment_finetune_zero_batch: cli(SEG_FT).set("--batch-size", "0");
    segment_eval_zero_batch: cli(SEG_EVAL).set("--batch-size", "0");
    tokenizer_train_zero_batch: cli(TOK_TRAIN).set("--batch", "0");
    bench_infer_zero_batch: cli(BENCH_INFER).set("--batch", "0");
    bench_pretrain_zero_batch: cli(BENCH_PRETRAIN).set("--batch", "0");
    bench_loader_zero_batch: cli(BENCH_LOADER).set("--batch", "0");
    bench_loader_zero_patch: cli(BENCH_LOADER).set("--patch", "0");
    bench_loader_zero_image_size: cli(BENCH_LOADER).set("--image-size", "0");
    pretrain_more_masked_than_patches: cli(PRETRAIN_DS).set("--masked", "1000");
    finetune_zero_label_fraction: cli(FINETUNE).set("--label-fraction", "0");
    segment_finetune_test_fraction_above_one: cli(SEG_FT).set("--test-fraction", "1.5").mentions("fraction");

    // ---- 5. Outputs that would destroy an input.
    infer_output_is_model_weights: cli(INFER).set("--output", "{d}/tiny_backbone/model.safetensors");
    infer_output_is_inputs: cli(INFER).set("--output", "{d}/in.safetensors");
    /// The config file (hand-written) is inside the output directory, which would replace it.
    create_output_holds_its_config: cli(CREATE).set("--config", "{d}/mine/config.json").set("--out", "{d}/mine")
        .file("mine/config.json", TINY);
    import_idx_output_is_images: cli(IMPORT_IDX).set("--out", "{d}/img.idx");
    import_idx_output_is_labels: cli(IMPORT_IDX).set("--out", "{d}/lab.idx");
    import_npy_output_is_images: cli(IMPORT_NPY).set("--out", "{d}/x.npy");
    import_image_folder_output_is_an_image: cli(IMPORT_FOLDER).set("--out", "{d}/folder/a/0.png");
    import_emoji_output_is_its_index: cli(IMPORT_EMOJI).set("--out", "{d}/emoji/emoji.json");
    combine_output_is_an_input: cli(COMBINE).set("--out", "{d}/grey.beitds");
    combine_output_is_a_split_input: cli("dataset combine --out {d}/grey.beitds {d}/grey.beitds:train");
    tokenize_output_is_data: cli(TOKENIZE).set("--out", "{d}/grey.beitds");
    tokenize_output_is_tokenizer_weights: cli(TOKENIZE).set("--out", "{d}/tok/model.safetensors");
    tokenizer_train_output_is_data: cli(TOK_TRAIN).set("--out", "{d}/grey.beitds");
    tokenizer_train_output_is_eval_data: cli(TOK_TRAIN).set("--eval-data", "{d}/grey_other.beitds")
        .set("--out", "{d}/grey_other.beitds");
    finetune_output_is_pretrained_dir: cli(FINETUNE_PRE).set("--out", "{d}/tiny_mim");
    finetune_output_inside_pretrained_dir: cli(FINETUNE_PRE).set("--out", "{d}/tiny_mim/finetuned");
    finetune_output_is_data: cli(FINETUNE).set("--out", "{d}/grey.beitds");
    segment_finetune_output_is_model_dir: cli(SEG_FT).set("--config", "").set("--model", "{d}/tiny_mim")
        .set("--out", "{d}/tiny_mim");
    pretrain_output_is_model_dir: cli(PRETRAIN).set("--model", "{d}/tiny_mim").set("--out", "{d}/tiny_mim");
    /// `pre` holds only `model/`: a run into `pre` would replace its own starting model.
    pretrain_output_would_replace_its_model: cli(PRETRAIN).set("--model", "{d}/pre/model").set("--out", "{d}/pre");
    pretrain_replay_output_is_model_dir: cli(REPLAY).set("--out", "{d}/tiny_mim");
    /// A fresh run (no --resume) into a directory with a checkpoint.
    pretrain_fresh_run_over_checkpoint: cli(PRETRAIN_DS).set("--out", "{d}/run").set("--seed", "1");
    pretrain_fresh_synthetic_run_over_checkpoint: cli(PRETRAIN).set("--out", "{d}/run");
    pretrain_resume_with_another_batch: cli(RESUME).set("--batch", "3").mentions("batch");
    pretrain_resume_with_another_dataset: cli(RESUME).set("--data", "{d}/grey_other.beitds").mentions("data");
    pretrain_resume_with_synthetic_data: cli(RESUME).set("--data", "synthetic").mentions("data");
    pretrain_resume_with_other_masked_count: cli(RESUME).set("--masked", "2").mentions("masked");
    pretrain_resume_with_other_masking: cli(RESUME).set("--masking", "random").mentions("masking");

    // ---- 7. Wrong answers that look right.
    infer_nan_weights: cli(INFER).set("--model", "{d}/nan_backbone").mentions(POISONED_TENSOR);
    infer_inf_weights: cli(INFER).set("--model", "{d}/inf_backbone").mentions(POISONED_TENSOR);
    eval_nan_weights: cli(EVAL).set("--model", "{d}/nan_cls").mentions(POISONED_TENSOR);
    finetune_from_nan_weights: cli(FINETUNE_PRE).set("--model", "{d}/nan_mim").mentions(POISONED_TENSOR);
    pretrain_from_nan_weights: cli(PRETRAIN).set("--model", "{d}/nan_mim").mentions(POISONED_TENSOR);
    segment_finetune_from_nan_weights: cli(SEG_FT).set("--config", "").set("--model", "{d}/nan_mim")
        .mentions(POISONED_TENSOR);
    bench_infer_nan_weights: cli(BENCH_INFER).set("--model", "{d}/nan_backbone").mentions(POISONED_TENSOR);
    /// An RGB evaluation set for a tokenizer trained on grey images.
    tokenizer_train_rgb_eval_data_for_grey: cli(TOK_TRAIN).set("--eval-data", "{d}/rgb.beitds");
    tokenize_rgb_data_with_grey_tokenizer: cli(TOKENIZE).set("--data", "{d}/rgb.beitds");
    pretrain_rgb_model_grey_tokenizer: cli(PRETRAIN_DS).set("--config", "{d}/cfg.json").set("--data", "{d}/rgb.beitds")
        .set("--target", "tokens").set("--tokenizer", "{d}/tok").config("cfg.json", json!({"num_channels": 3}));
    pretrain_grey_model_rgb_data: cli(PRETRAIN_DS).set("--data", "{d}/rgb.beitds");
    finetune_grey_model_rgb_data: cli(FINETUNE_PRE).set("--data", "{d}/rgb.beitds");
    eval_grey_model_rgb_data: cli(EVAL).set("--data", "{d}/rgb.beitds");
    segment_eval_grey_model_rgb_data: cli(SEG_EVAL).set("--data", "{d}/rgb.beitds");
    /// A per-channel mean/std of the wrong length (the pretraining loader refuses it).
    segment_finetune_mean_of_two_for_grey: cli(SEG_FT).set("--mean", "0.5,0.5").set("--std", "0.5,0.5");
    segment_finetune_std_of_four_for_grey: cli(SEG_FT).set("--std", "0.5,0.5,0.5,0.5");
    segment_finetune_mean_of_two_for_rgb: cli(SEG_FT).set("--data", "{d}/rgb.beitds")
        .set("--config", "{d}/cfg.json").file("cfg.json", seg_with(json!({"num_channels": 3})))
        .set("--mean", "0.1,0.2").set("--std", "0.3,0.3");
    segment_eval_mean_of_two_for_grey: cli(SEG_EVAL).set("--mean", "0.5,0.5");
    segment_finetune_zero_std: cli(SEG_FT).set("--std", "0");

    // ---- The C API: the same classes through include/beit.h. `create CONFIG ARCH` numbers the
    // architecture as beit_architecture does: 0 BeitModel, 1 masked image modeling,
    // 2 image classification, 3 semantic segmentation.
    c_create_huge_vocab_size: c_api("create {d}/cfg.json 1").config("cfg.json", huge_vocab());
    c_create_vocab_size_above_cap: c_api("create {d}/cfg.json 1").config("cfg.json", json!({"vocab_size": 1_000_000_000_000u64}));
    c_create_huge_num_labels: c_api("create {d}/cfg.json 2").config("cfg.json", huge_labels());
    c_create_huge_num_channels: c_api("create {d}/cfg.json 0").config("cfg.json", huge_channels());
    c_create_huge_hidden_size: c_api("create {d}/cfg.json 0").config("cfg.json", huge_hidden());
    c_create_huge_depth: c_api("create {d}/cfg.json 0").config("cfg.json", huge_depth());
    c_create_tiny_patch_large_image_absolute: c_api("create {d}/cfg.json 0")
        .config("cfg.json", tiny_patch("absolute"));
    c_create_tiny_patch_large_image_relative: c_api("create {d}/cfg.json 1")
        .config("cfg.json", tiny_patch("relative"));
    c_create_segmentation_huge_hidden_size: c_api("create {d}/cfg.json 3")
        .file("cfg.json", seg_with(json!({"hidden_size": 65536, "intermediate_size": 65536, "num_attention_heads": 1})));
    c_create_initializer_range_zero: c_api("create {d}/cfg.json 1").config("cfg.json", json!({"initializer_range": 0.0}));
    c_create_initializer_range_negative: c_api("create {d}/cfg.json 1")
        .config("cfg.json", json!({"initializer_range": -0.02}));
    c_trainer_from_config_huge_vocab_size: c_api("trainer_config {d}/cfg.json").config("cfg.json", huge_vocab());
    c_trainer_from_config_initializer_range_zero: c_api("trainer_config {d}/cfg.json")
        .config("cfg.json", json!({"initializer_range": 0.0}));
    c_load_model_config_claims_huge: c_api("load {d}/claims_huge");
    c_load_nan_weights: c_api("load {d}/nan_backbone").mentions(POISONED_TENSOR);
    c_load_inf_weights: c_api("load {d}/inf_backbone").mentions(POISONED_TENSOR);
    c_load_nan_classifier_weights: c_api("load {d}/nan_cls").mentions(POISONED_TENSOR);
    c_infer_attention_needs_terabytes: c_api("infer {d}/tiny_backbone 1 4096 4096");
    c_infer_attention_needs_terabytes_absolute_positions: c_api("infer {d}/tiny_backbone_abs 1 4096 4096");
    c_output_sizes_overflow: c_api("output_sizes {d}/tiny_backbone 1099511627776 65536 65536");
    /// batch x C x H x W wraps around 2^64 to one image's length.
    c_infer_wrapped_batch: c_api("infer_wrapped {d}/tiny_backbone");
    c_trainer_step_wrapped_batch: c_api("trainer_step_wrapped {d}/tiny_mim");
    c_tokenize_wrapped_batch: c_api("tokenize_wrapped {d}/tok");
    c_tokenizer_load_huge_widths: c_api("tokenizer_load {d}/tok_huge");
    c_tokenizer_load_huge_groups: c_api("tokenizer_load {d}/tok_groups");
    c_tokenizer_load_nan_weights: c_api("tokenizer_load {d}/tok_nan");
    /// 4. Four threads step one trainer: each call is BEIT_OK or BEIT_ERR_BUSY, and the step
    /// count equals the OK calls.
    c_trainer_concurrent_steps: c_api("trainer_concurrent {d}/tiny_mim");
}

/// A checkpoint write killed with SIGKILL leaves `.NAME.tmp-PID`; a run that resumes in that
/// directory removes those of dead processes and keeps those of live ones.
#[test]
fn stale_temporary_files_of_dead_processes_are_removed() {
    let fx = fixtures();
    let dir = CaseDir::new("stale_temporary_files");
    copy_fixture(&fx.dir, dir.path(), "run");
    copy_fixture(&fx.dir, dir.path(), "tiny.json");
    copy_fixture(&fx.dir, dir.path(), "grey.beitds");
    let dead = {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let stale = dir.path().join(format!("run/.checkpoint.safetensors.tmp-{dead}"));
    let live = dir.path().join(format!("run/.checkpoint.safetensors.tmp-{}", std::process::id()));
    std::fs::write(&stale, vec![7u8; 4096]).unwrap();
    std::fs::write(&live, vec![7u8; 4096]).unwrap();
    let out = run_capped(Runner::Cli, &expand(RESUME, dir.path()), dir.path());
    let mut problems = out.problems_of_a_process();
    if out.code != Some(0) {
        problems.push(format!("the resume failed (exit {:?})", out.code));
    }
    if stale.exists() {
        problems.push(format!("{} (a dead process's) was not removed", stale.display()));
    }
    if !live.exists() {
        problems.push(format!("{} (this live process's) was removed", live.display()));
    }
    assert!(problems.is_empty(), "{}", out.report("stale_temporary_files", &problems));
}

// ---------------------------------------------------------------------------------------------
// Running a case

fn run_case(name: &str, case: Case) {
    let fx = fixtures();
    let dir = CaseDir::new(name);
    let expanded = expand_all(&case.args, dir.path());
    for fixture in fixture_names(&case.args) {
        if fx.dir.join(&fixture).exists() {
            copy_fixture(&fx.dir, dir.path(), &fixture);
        }
    }
    for (file, made) in &case.files {
        let path = dir.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match made {
            Made::Bytes(b) => std::fs::write(&path, b).unwrap(),
            Made::ZeroPixels(shape) => write_zero_pixels(&path, *shape),
        }
    }
    let before = snapshot(dir.path());
    let out = run_capped(case.runner, &expanded, dir.path());
    let after = snapshot(dir.path());

    let mut problems = out.problems_of_a_process();
    let expect = match case.expect {
        Expect::RefusalOrSuccess if out.succeeded(case.runner) => Expect::Success,
        Expect::RefusalOrSuccess => Expect::Refusal,
        e => e,
    };
    match expect {
        Expect::Refusal => {
            problems.extend(out.problems_of_a_refusal(case.runner));
            problems.extend(differences(&before, &after, true, &[]));
            // Paths in the message name the case's files, not what it says about them.
            let text = out.all_text().replace(&dir.path().display().to_string(), "{d}").to_lowercase();
            for m in &case.mentions {
                if !text.contains(&m.to_lowercase()) {
                    problems.push(format!("the message does not mention {m:?}"));
                }
            }
        }
        Expect::Success | Expect::RefusalOrSuccess => {
            problems.extend(out.problems_of_a_success(case.runner));
            problems.extend(differences(&before, &after, false, &case.may_change));
        }
    }
    log_outcome(name, &out, &problems);
    if !problems.is_empty() {
        if std::env::var_os("BEIT_HOSTILE_KEEP").is_some() {
            dir.keep();
        }
        panic!("{}", out.report(name, &problems));
    }
}

/// With `BEIT_HOSTILE_LOG=FILE`, one line per case: name, verdict, how it ended, the first line
/// of its message.
fn log_outcome(name: &str, out: &Outcome, problems: &[String]) {
    let Some(path) = std::env::var_os("BEIT_HOSTILE_LOG") else { return };
    let message = out
        .driver_line("message: ")
        .or_else(|| out.stderr.lines().rev().find(|l| l.starts_with("beit: ")).map(str::to_string))
        .unwrap_or_default();
    let verdict = if problems.is_empty() { "pass".to_string() } else { format!("FAIL: {}", problems.join("; ")) };
    let line = format!("{name}\t{verdict}\t{}\t{}\n", out.ended(), message.chars().take(200).collect::<String>());
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

/// A case's directory under the target's scratch folder, removed afterwards unless kept.
struct CaseDir {
    path: PathBuf,
    keep: std::cell::Cell<bool>,
}

impl CaseDir {
    fn new(name: &str) -> CaseDir {
        // Named by a hash: the case's name (e.g. "..._another_batch") in every path of its
        // messages would satisfy any `mentions`.
        let mut h = std::hash::DefaultHasher::new();
        h.write(name.as_bytes());
        let path = scratch_root().join("cases").join(format!("{:016x}", h.finish()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        CaseDir { path, keep: std::cell::Cell::new(false) }
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn keep(&self) {
        self.keep.set(true);
        eprintln!("kept {}", self.path.display());
    }
}

impl Drop for CaseDir {
    fn drop(&mut self) {
        if !self.keep.get() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// This process's scratch folder: target/tmp/hostile-PID (those of dead processes are removed
/// when the fixtures are made).
fn scratch_root() -> PathBuf {
    Path::new(SCRATCH).join(format!("hostile-{}", std::process::id()))
}

fn expand(args: &str, dir: &Path) -> Vec<String> {
    expand_all(&args.split_whitespace().map(str::to_string).collect::<Vec<_>>(), dir)
}

fn expand_all(args: &[String], dir: &Path) -> Vec<String> {
    // An empty value (`set("--config", "")`) drops the flag: how a row swaps --config for --model.
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i].starts_with("--") && args.get(i + 1).is_some_and(|v| v.is_empty()) {
            i += 2;
            continue;
        }
        out.push(args[i].replace("{d}", &dir.display().to_string()));
        i += 1;
    }
    out
}

/// The fixtures a command names: the first path component after each `{d}/`.
fn fixture_names(args: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for a in args {
        let mut rest = a.as_str();
        while let Some(at) = rest.find("{d}/") {
            rest = &rest[at + 4..];
            let end = rest.find(['/', ':']).unwrap_or(rest.len());
            names.push(rest[..end].to_string());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// What a process did.
struct Outcome {
    command: String,
    code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
    seconds: f64,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn all_text(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// What no run may do, refused or not.
    fn problems_of_a_process(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.timed_out {
            p.push(format!("hang: still running after {} s, killed", timeout().as_secs()));
        } else if let Some(sig) = self.signal {
            p.push(format!("killed by signal {sig}{}", if sig == 6 { " (SIGABRT)" } else { "" }));
        }
        let text = self.all_text();
        for t in PANIC_TEXT {
            if text.contains(t) {
                p.push(format!("panic text {t:?} in the output"));
            }
        }
        p
    }

    fn problems_of_a_refusal(&self, runner: Runner) -> Vec<String> {
        let mut p = Vec::new();
        let Some(code) = self.code else { return p };
        match runner {
            Runner::Cli => {
                if code == 0 {
                    p.push("accepted: exit 0".into());
                } else if !(1..=99).contains(&code) {
                    p.push(format!("exit code {code}, not in 1..=99"));
                }
                if code != 0 && self.stderr.trim().is_empty() {
                    p.push("no message on stderr".into());
                }
                // Every hostile value parses as its option's type, so a usage error means the
                // row itself is wrong (a misspelt flag), not that the value was refused.
                if self.stderr.contains("Usage:") {
                    p.push("the command line was refused by clap (a usage error: is the row right?)".into());
                }
            }
            Runner::CApi => {
                if code != 0 {
                    p.push(format!("the driver exited {code}: {}", self.stderr.trim()));
                }
                let status = self.driver_line("status: ").unwrap_or_default();
                let message = self.driver_line("message: ").unwrap_or_default();
                match status.as_str() {
                    "" => p.push("the driver printed no status".into()),
                    "BEIT_OK" => p.push("accepted: BEIT_OK".into()),
                    "BEIT_ERR_INTERNAL" => p.push(format!("BEIT_ERR_INTERNAL (a caught panic): {message}")),
                    _ => {}
                }
                if !status.is_empty() && status != "BEIT_OK" && message.trim().is_empty() {
                    p.push(format!("{status} without a message"));
                }
                for line in self.stdout.lines().filter(|l| l.starts_with("violation: ")) {
                    p.push(line.to_string());
                }
            }
        }
        p
    }

    fn succeeded(&self, runner: Runner) -> bool {
        self.code == Some(0) && (runner == Runner::Cli || self.driver_line("status: ").as_deref() == Some("BEIT_OK"))
    }

    fn problems_of_a_success(&self, runner: Runner) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(code) = self.code {
            if code != 0 {
                p.push(format!("a valid run failed: exit {code}"));
            }
        }
        if runner == Runner::CApi && self.driver_line("status: ").as_deref() != Some("BEIT_OK") {
            p.push(format!("a valid call failed: {:?}", self.driver_line("status: ")));
        }
        p
    }

    fn ended(&self) -> String {
        if self.timed_out {
            "killed at the timeout".to_string()
        } else if let Some(s) = self.signal {
            format!("signal {s}")
        } else {
            format!("exit {}", self.code.unwrap_or(-1))
        }
    }

    fn driver_line(&self, prefix: &str) -> Option<String> {
        self.stdout.lines().find_map(|l| l.strip_prefix(prefix)).map(str::to_string)
    }

    fn report(&self, name: &str, problems: &[String]) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n      ")
        };
        format!(
            "hostile case {name} FAILED: {}\n  command: {}\n  ended: {} after {:.2} s\n  stdout:\n      {}\n  stderr:\n      {}",
            problems.join("; "),
            self.command,
            self.ended(),
            self.seconds,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

/// Runs a case's program under the address-space cap and the timeout, in `dir`.
fn run_capped(runner: Runner, args: &[String], dir: &Path) -> Outcome {
    let program = match runner {
        Runner::Cli => PathBuf::from(BEIT),
        Runner::CApi => driver().clone(),
    };
    let logs = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut cmd = Command::new(prlimit());
    cmd.arg(format!("--as={}", address_space_cap()))
        .arg("--")
        .arg(&program)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let command = format!("{} {}", program.display(), args.join(" "));
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    let limit = timeout();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let seconds = start.elapsed().as_secs_f64();
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Outcome {
        command,
        code: status.code(),
        signal: if timed_out { None } else { status.signal() },
        timed_out,
        seconds,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

fn prlimit() -> &'static Path {
    static PRLIMIT: OnceLock<PathBuf> = OnceLock::new();
    PRLIMIT.get_or_init(|| {
        let ok = Command::new("prlimit").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(ok, "prlimit (util-linux) is required: every hostile case runs under `prlimit --as`");
        PathBuf::from("prlimit")
    })
}

// ---------------------------------------------------------------------------------------------
// Snapshots: the whole case directory before and after.

#[derive(PartialEq, Eq, Debug)]
enum Entry {
    Dir,
    File { len: u64, hash: u64 },
    Link(PathBuf),
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let entry = if meta.file_type().is_symlink() {
                Entry::Link(std::fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                stack.push(path.clone());
                Entry::Dir
            } else {
                Entry::File { len: meta.len(), hash: hash_file(&path) }
            };
            out.insert(rel, entry);
        }
    }
    out
}

fn hash_file(path: &Path) -> u64 {
    // SipHash with fixed keys: deterministic, and a changed byte changes it.
    let mut h = std::hash::DefaultHasher::new();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
    }
    h.finish()
}

/// How `after` differs from `before`. A refusal must leave no new entry; a success may add
/// entries. Nothing that was there may change or go, except under `may_change`.
fn differences(
    before: &BTreeMap<PathBuf, Entry>,
    after: &BTreeMap<PathBuf, Entry>,
    no_new_entries: bool,
    may_change: &[String],
) -> Vec<String> {
    let exempt = |p: &Path| may_change.iter().any(|m| p.starts_with(m));
    let mut p = Vec::new();
    for (path, entry) in before {
        if exempt(path) {
            continue;
        }
        match after.get(path) {
            None => p.push(format!("{} was removed", path.display())),
            Some(e) if e != entry => p.push(format!("{} was changed", path.display())),
            _ => {}
        }
    }
    if no_new_entries {
        let new: Vec<String> =
            after.keys().filter(|k| !before.contains_key(*k)).map(|k| k.display().to_string()).collect();
        if !new.is_empty() {
            p.push(format!("left behind: {}", new.join(", ")));
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Fixtures: made once per test process, copied into each case that names them.

/// The tensor set to NaN (or +Inf) in the `nan_*` / `inf_*` models: a refusal must name it.
const POISONED_TENSOR: &str = "layer.1.output.dense.weight";

struct Fixtures {
    dir: PathBuf,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        remove_scratch_of_dead_processes();
        let dir = scratch_root().join("fixtures");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        make_fixtures(&dir);
        Fixtures { dir }
    })
}

fn remove_scratch_of_dead_processes() {
    let Ok(entries) = std::fs::read_dir(SCRATCH) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("hostile-").and_then(|p| p.parse::<u32>().ok()) {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn copy_fixture(from_root: &Path, to_root: &Path, name: &str) {
    let (from, to) = (from_root.join(name), to_root.join(name));
    if from.is_dir() {
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            copy_fixture(&from, &to, &e.file_name().to_string_lossy());
        }
    } else {
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

fn seg_with(overrides: Value) -> String {
    let mut v: Value = serde_json::from_str(SEG).unwrap();
    for (k, x) in overrides.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

fn config(json: &str) -> BeitConfig {
    BeitConfig::from_json_str(json).unwrap()
}

fn make_fixtures(dir: &Path) {
    let tiny = config(TINY);
    std::fs::write(dir.join("tiny.json"), TINY).unwrap();
    std::fs::write(dir.join("seg.json"), SEG).unwrap();

    let save = |name: &str, cfg: BeitConfig, arch: Architecture| {
        Model::new_random(cfg, arch, 0).unwrap().save(&dir.join(name)).unwrap();
    };
    save("tiny_mim", tiny.clone(), Architecture::MaskedImageModeling);
    save("tiny_backbone", tiny.clone(), Architecture::Backbone);
    save(
        "tiny_backbone_abs",
        config(
            &tiny_with(json!({"use_shared_relative_position_bias": false, "use_absolute_position_embeddings": true}))
                .to_string(),
        ),
        Architecture::Backbone,
    );
    save("tiny_cls", config(&tiny_with(json!({"num_labels": 3})).to_string()), Architecture::ImageClassification);
    let seg = beit::train::segmentation::segmentation_config(config(SEG), 3);
    save("tiny_seg", seg, Architecture::SemanticSegmentation);
    save("pre/model", tiny.clone(), Architecture::MaskedImageModeling);

    poison(&dir.join("tiny_backbone"), &dir.join("nan_backbone"), f32::NAN);
    poison(&dir.join("tiny_backbone"), &dir.join("inf_backbone"), f32::INFINITY);
    poison(&dir.join("tiny_mim"), &dir.join("nan_mim"), f32::NAN);
    poison(&dir.join("tiny_cls"), &dir.join("nan_cls"), f32::NAN);

    // A model directory whose config claims terabytes beside the tiny model's weights.
    std::fs::create_dir_all(dir.join("claims_huge")).unwrap();
    let mut claims = tiny_with(huge_vocab());
    claims["architectures"] = json!(["BeitForMaskedImageModeling"]);
    std::fs::write(dir.join("claims_huge/config.json"), claims.to_string()).unwrap();
    std::fs::copy(dir.join("tiny_mim/model.safetensors"), dir.join("claims_huge/model.safetensors")).unwrap();

    // Datasets: 16x16, labels 0..3 and masks 0..3; another with other pixels; RGB; labels with
    // one hostile value.
    let dataset = |name: &str, channels: u32, labels: &dyn Fn(usize) -> u32, salt: usize| {
        let spec = DatasetSpec { height: 16, width: 16, channels, labels: true, masks: true, token_grid: None };
        let mut w = DatasetWriter::create(&dir.join(name), spec).unwrap();
        for i in 0..12 {
            let px: Vec<u8> = (0..256 * channels as usize).map(|j| ((i * 37 + j * 11 + salt) % 251) as u8).collect();
            let mask: Vec<u8> = (0..256).map(|j| ((i + j / 64) % 3) as u8).collect();
            w.push(&px, Some(labels(i)), Some(&mask), None).unwrap();
        }
        w.finish().unwrap();
    };
    dataset("grey.beitds", 1, &|i| (i % 3) as u32, 0);
    dataset("grey_other.beitds", 1, &|i| (i % 3) as u32, 5);
    dataset("rgb.beitds", 3, &|i| (i % 3) as u32, 0);
    dataset("huge_label.beitds", 1, &|i| if i == 7 { 4_000_000_000 } else { (i % 2) as u32 }, 0);
    dataset("label_1m.beitds", 1, &|i| if i == 7 { 1_000_000 } else { (i % 3) as u32 }, 0);

    // Tokenizers: a tiny grey one; configs that claim huge widths or 64 groups beside its
    // weights; one with a NaN weight.
    let tok_cfg = DvaeConfig {
        in_channels: 1,
        image_size: 16,
        vocab_size: 16,
        n_hid: 4,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: Some(8),
        ..DvaeConfig::small_grey(16)
    };
    Dvae::new(tok_cfg.clone(), 0).unwrap().save(&dir.join("tok")).unwrap();
    let tok_json: Value = serde_json::from_str(&tok_cfg.to_json()).unwrap();
    for (name, overrides) in
        [("tok_huge", json!({"vocab_size": 16_000_000, "n_hid": 65536})), ("tok_groups", json!({"group_count": 64}))]
    {
        let mut v = tok_json.clone();
        for (k, x) in overrides.as_object().unwrap() {
            v[k] = x.clone();
        }
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("config.json"), v.to_string()).unwrap();
        std::fs::copy(dir.join("tok/model.safetensors"), dir.join(name).join("model.safetensors")).unwrap();
    }
    poison_any(&dir.join("tok"), &dir.join("tok_nan"), f32::NAN);

    // Importer sources: IDX and .npy (3 images of 4x4 and their labels), an image folder.
    std::fs::write(dir.join("img.idx"), [idx_images_header(&[3, 4, 4]), (0..48u8).collect()].concat()).unwrap();
    std::fs::write(dir.join("lab.idx"), [vec![0, 0, 8, 1, 0, 0, 0, 3], vec![0, 1, 2]].concat()).unwrap();
    std::fs::write(dir.join("x.npy"), npy_u8(&[3, 4, 4], &(0..48u8).collect::<Vec<_>>())).unwrap();
    std::fs::write(dir.join("y.npy"), npy_u8(&[3], &[0, 1, 2])).unwrap();
    for (class, i) in [("a", 0u8), ("b", 1)] {
        std::fs::create_dir_all(dir.join("folder").join(class)).unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([i * 100, 50, 200]))
            .save(dir.join("folder").join(class).join(format!("{i}.png")))
            .unwrap();
    }

    // An emoji package with one 4x4 image, in a 4/ folder and in a 65536/ folder.
    std::fs::create_dir_all(dir.join("emoji")).unwrap();
    let index = json!([{"category": "Smileys", "image": "1f600.png", "has_img_google": true}]);
    std::fs::write(dir.join("emoji/emoji.json"), index.to_string()).unwrap();
    for size in ["4", "65536"] {
        let folder = dir.join("emoji/img/google").join(size);
        std::fs::create_dir_all(&folder).unwrap();
        image::RgbaImage::from_pixel(4, 4, image::Rgba([200, 100, 50, 255])).save(folder.join("1f600.png")).unwrap();
    }

    // Inference input and a pretrain-replay batch.
    write_zero_pixels(&dir.join("in.safetensors"), [2, 1, 16, 16]);
    write_replay_batch(&dir.join("batch.safetensors"));

    // A pretraining run with a checkpoint at step 1 (the command line's own, so that it holds
    // whatever the command line stores), and a copy whose metadata claims a huge config.
    let run = expand(&PRETRAIN_DS.replace("{d}/new_run", "{d}/run"), dir);
    let out = Command::new(BEIT).args(&run).output().unwrap();
    assert!(out.status.success(), "fixture run: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::create_dir_all(dir.join("run_claims_huge")).unwrap();
    rewrite_checkpoint_config(
        &dir.join("run/checkpoint.safetensors"),
        &dir.join("run_claims_huge/checkpoint.safetensors"),
        huge_vocab(),
    );
}

/// Copies the model directory `from` to `to` with every value of [`POISONED_TENSOR`] set to
/// `value`.
fn poison(from: &Path, to: &Path, value: f32) {
    rewrite_tensors(from, to, |name| name.ends_with(POISONED_TENSOR), value);
}

/// Copies the directory `from` to `to` with the first value of its first tensor set to `value`.
fn poison_any(from: &Path, to: &Path, value: f32) {
    let file = SafetensorsFile::open(&from.join("model.safetensors")).unwrap();
    let first = file.parse().unwrap().names().into_iter().min().unwrap().to_string();
    rewrite_tensors(from, to, |name| name == first, value);
}

fn rewrite_tensors(from: &Path, to: &Path, pick: impl Fn(&str) -> bool, value: f32) {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    let file = SafetensorsFile::open(&from.join("model.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let mut tensors = Vec::new();
    let mut hit = 0;
    for name in st.names() {
        let (shape, mut data) = read_f32(&st, name).unwrap().unwrap();
        if pick(name) {
            data[0] = value;
            hit += 1;
        }
        tensors.push((name.to_string(), shape, data));
    }
    assert_eq!(hit, 1, "exactly one tensor of {} is poisoned", from.display());
    let bytes =
        beit::model::io::f32_tensors_bytes(tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())))
            .unwrap();
    std::fs::write(to.join("model.safetensors"), bytes).unwrap();
}

/// Copies a checkpoint with the model config in its metadata changed by `overrides`.
fn rewrite_checkpoint_config(from: &Path, to: &Path, overrides: Value) {
    let file = SafetensorsFile::open(from).unwrap();
    let mut metadata = file.metadata().unwrap();
    let key = beit::train::checkpoint::META_KEY;
    let mut meta: Value = serde_json::from_str(&metadata[key]).unwrap();
    let mut cfg: Value = serde_json::from_str(meta["config"].as_str().unwrap()).unwrap();
    for (k, x) in overrides.as_object().unwrap() {
        cfg[k] = x.clone();
    }
    meta["config"] = cfg.to_string().into();
    metadata.insert(key.to_string(), meta.to_string());
    let st = file.parse().unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .names()
        .into_iter()
        .map(|n| {
            let (s, d) = read_f32(&st, n).unwrap().unwrap();
            (n.to_string(), s, d)
        })
        .collect();
    let bytes = beit::model::io::f32_tensors_bytes_with_metadata(
        tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())),
        metadata,
    )
    .unwrap();
    std::fs::write(to, bytes).unwrap();
}

/// A safetensors file whose one tensor, `pixel_values` f32 of `shape`, is zeros; written in
/// pieces, so a 64 MiB input costs no 64 MiB buffer.
fn write_zero_pixels(path: &Path, shape: [usize; 4]) {
    let bytes = shape.iter().product::<usize>() * 4;
    let mut header = json!({"pixel_values": {"dtype": "F32", "shape": shape, "data_offsets": [0, bytes]}}).to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(header.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(zeros.len());
        f.write_all(&zeros[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
}

/// `beit pretrain-replay`'s batch: two 16x16 grey images, half the patches masked, tokens.
fn write_replay_batch(path: &Path) {
    let pixels: Vec<u8> = (0..2 * 256).flat_map(|i| ((i % 17) as f32 / 17.0 - 0.5).to_le_bytes()).collect();
    let mask: Vec<u8> = (0..32).map(|i| (i % 2) as u8).collect();
    let labels: Vec<u8> = (0..32i64).flat_map(|i| (i % 64).to_le_bytes()).collect();
    use safetensors::tensor::{Dtype, TensorView};
    let views = vec![
        ("bool_masked_pos", TensorView::new(Dtype::U8, vec![2, 16], &mask).unwrap()),
        ("labels", TensorView::new(Dtype::I64, vec![2, 16], &labels).unwrap()),
        ("pixel_values", TensorView::new(Dtype::F32, vec![2, 1, 16, 16], &pixels).unwrap()),
    ];
    std::fs::write(path, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// The header of an IDX file of u8 images with these dimensions (big-endian u32s).
fn idx_images_header(dims: &[u32]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b
}

/// A .npy v1 file of u8 with this shape and these bytes (which may be fewer than it claims).
fn npy_u8(shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape_text = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '|u1', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

// ---------------------------------------------------------------------------------------------
// The C driver: compiled once per test process against include/beit.h and libbeit.so.

fn driver() -> &'static PathBuf {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let lib_dir = Path::new(BEIT).parent().unwrap().to_path_buf();
        let lib = lib_dir.join("libbeit.so");
        assert!(lib.is_file(), "{} is missing: build it with `cargo build --release`", lib.display());
        // `cargo test` builds the binary but not the cdylib: one older than the sources would
        // test old code.
        let so = std::fs::metadata(&lib).and_then(|m| m.modified()).unwrap();
        let newest = newest_source(&Path::new(MANIFEST).join("src"));
        assert!(
            so >= newest,
            "{} is older than the sources in src/: rebuild it with `cargo build --release`",
            lib.display()
        );
        let out = scratch_root().join("driver");
        std::fs::create_dir_all(&out).unwrap();
        // libbeit.so records its SONAME (libbeit.so.<ABI>), the name the driver looks up at run
        // time; a cargo target dir has only libbeit.so, so the versioned name is a link here
        // (as scripts/test-c does).
        let soname = soname(&lib);
        let run_dir = match &soname {
            Some(name) => {
                let link = out.join(name);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(&lib, &link).unwrap();
                out.clone()
            }
            None => lib_dir.clone(),
        };
        let exe = out.join("hostile_driver");
        let root = Path::new(MANIFEST);
        let gcc = Command::new("gcc")
            .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
            .arg(format!("-I{}", root.join("include").display()))
            .arg(root.join("tests/hostile/driver.c"))
            .arg("-o")
            .arg(&exe)
            .arg(format!("-L{}", lib_dir.display()))
            .arg(format!("-Wl,-rpath,{}", run_dir.display()))
            .args(["-lbeit", "-lpthread"])
            .output()
            .unwrap_or_else(|e| panic!("gcc is required for the C API cases: {e}"));
        assert!(gcc.status.success(), "gcc tests/hostile/driver.c:\n{}", String::from_utf8_lossy(&gcc.stderr));
        exe
    })
}

fn newest_source(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let path = e.path();
        let t = if path.is_dir() { newest_source(&path) } else { e.metadata().unwrap().modified().unwrap() };
        newest = newest.max(t);
    }
    newest
}

fn soname(lib: &Path) -> Option<String> {
    let out = Command::new("readelf").arg("-d").arg(lib).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("(SONAME)"))?;
    Some(line.split('[').nth(1)?.trim_end_matches(']').to_string())
}
