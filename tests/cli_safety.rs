//! The command line never destroys the user's data and leaves no litter (issue 16, classes 5
//! and 6): an output that is, or lies inside, an input is refused before anything is written;
//! a fresh `beit pretrain` over a checkpoint needs --overwrite; a resume with other data options
//! is refused, naming each; a refused run leaves no directory or file behind; temporary files of
//! killed writers are removed when a run starts, a live writer's are kept.
//!
//! Every refusal is checked the same way: exit status 1, a message on stderr, no panic, and every
//! file under the test's directory byte-identical afterwards (nothing changed, nothing created).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use beit::data::dataset::{DatasetSpec, DatasetWriter};
use beit::dvae::{Dvae, DvaeConfig};
use beit::model::io::{f32_tensors_bytes, SafetensorsFile};
use beit::{Architecture, BeitConfig, Model};

const BEIT: &str = env!("CARGO_BIN_EXE_beit");

/// A small MIM model: 16x16 grey images, 4x4 patches.
const TINY: &str = r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1, "vocab_size": 64,
    "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1,
    "drop_path_rate": 0.1}"#;

/// Every file (with its bytes) and directory under `root`, by relative path.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(rel, None);
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                out.insert(rel, Some(std::fs::read_link(&path).unwrap().to_string_lossy().as_bytes().to_vec()));
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

fn beit(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(BEIT);
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A clean refusal: exit status 1, a message, no panic.
fn assert_refused(o: &Output, what: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{what}: expected a refusal (exit 1); stderr: {err}");
    assert!(err.starts_with("beit: ") && !err.contains("panicked"), "{what}: {err}");
    err
}

fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what} failed: {}", stderr(o));
}

/// Files every test uses, under one root.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Fixture { dir: tempfile::tempdir().unwrap() };
        std::fs::write(f.path("tiny.json"), TINY).unwrap();
        let cfg = BeitConfig::from_json_str(TINY).unwrap();
        Model::new_random(cfg, Architecture::MaskedImageModeling, 0).unwrap().save(&f.path("mim")).unwrap();
        write_dataset(&f.path("data.beitds"), 24, 0);
        write_dataset(&f.path("other.beitds"), 24, 1);
        let pixels: Vec<f32> = (0..2 * 256).map(|i| (i % 17) as f32 / 17.0).collect();
        let inputs = f32_tensors_bytes([("pixel_values", &[2usize, 1, 16, 16][..], &pixels[..])]).unwrap();
        std::fs::write(f.path("inputs.safetensors"), inputs).unwrap();
        let tokenizer = DvaeConfig {
            vocab_size: 16,
            n_hid: 8,
            group_count: 2,
            decoder_n_init: Some(8),
            ..DvaeConfig::small_grey(16)
        };
        Dvae::new(tokenizer, 0).unwrap().save(&f.path("tokenizer")).unwrap();
        f
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }
}

/// `count` grey 16x16 images with labels (0..3) and masks (0..2); `variant` changes the pixels.
fn write_dataset(path: &Path, count: usize, variant: usize) {
    let spec = DatasetSpec { height: 16, width: 16, channels: 1, labels: true, masks: true, token_grid: None };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..count {
        let level = 20 + (i * 67 + variant * 101) % 216;
        let px: Vec<u8> = (0..256).map(|p| (level + 8 * (p % 2)) as u8).collect();
        let mask: Vec<u8> = (0..256).map(|p| ((p / 16 + i) % 3) as u8).collect();
        w.push(&px, Some((i % 3) as u32), Some(&mask), None).unwrap();
    }
    w.finish().unwrap();
}

/// A raw IDX image file [n, 8, 8] u8.
fn write_idx(path: &Path, n: u32) {
    let mut bytes = vec![0, 0, 8, 3];
    for d in [n, 8, 8] {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend((0..n * 64).map(|i| (i % 251) as u8));
    std::fs::write(path, bytes).unwrap();
}

/// Runs `args`, which must be refused for writing over an input, and checks that nothing under
/// the fixture changed; the message must name `names` (the options and paths involved).
fn assert_spares_inputs(f: &Fixture, case: &str, args: &[&dyn AsRef<std::ffi::OsStr>], names: &[&str]) {
    let before = snapshot(f.root());
    let out = beit(args);
    let err = assert_refused(&out, case);
    assert!(err.contains("refusing to overwrite an input"), "{case}: {err}");
    for n in names {
        assert!(err.contains(n), "{case}: the message does not name {n}: {err}");
    }
    assert!(snapshot(f.root()) == before, "{case}: files changed or were created");
}

#[test]
fn outputs_that_are_or_lie_inside_inputs_are_refused_for_every_command() {
    let f = Fixture::new();
    let p = |r: &str| f.path(r);
    let s = |r: &str| p(r).display().to_string();
    // Extra inputs: an IDX file, an image folder, a symlink and a hard link.
    write_idx(&p("images.idx"), 4);
    std::fs::create_dir_all(p("folder/cat")).unwrap();
    image::GrayImage::from_pixel(8, 8, image::Luma([90])).save(p("folder/cat/a.png")).unwrap();
    std::os::unix::fs::symlink(p("mim"), p("mim-link")).unwrap();
    std::fs::hard_link(p("inputs.safetensors"), p("inputs-hardlink")).unwrap();

    let weights = p("mim/model.safetensors");
    assert_spares_inputs(
        &f,
        "infer --output = the model's weights",
        &[&"infer", &"--model", &p("mim"), &"--inputs", &p("inputs.safetensors"), &"--output", &weights],
        &["--output", "--model", &s("mim/model.safetensors"), &s("mim")],
    );
    assert_spares_inputs(
        &f,
        "infer --output = --inputs",
        &[
            &"infer",
            &"--model",
            &p("mim"),
            &"--inputs",
            &p("inputs.safetensors"),
            &"--output",
            &p("inputs.safetensors"),
        ],
        &["--output", "--inputs"],
    );
    assert_spares_inputs(
        &f,
        "infer --output = a hard link of --inputs",
        &[&"infer", &"--model", &p("mim"), &"--inputs", &p("inputs.safetensors"), &"--output", &p("inputs-hardlink")],
        &["hard link", "--inputs"],
    );
    assert_spares_inputs(
        &f,
        "create --out = the directory of its --config",
        &[&"create", &"--config", &p("mim/config.json"), &"--out", &p("mim")],
        &["--out", "--config"],
    );
    // `pretrain --out DIR` writes DIR/model: here the very directory it starts from.
    std::fs::create_dir(p("pre")).unwrap();
    let cfg = BeitConfig::from_json_str(TINY).unwrap();
    Model::new_random(cfg, Architecture::MaskedImageModeling, 1).unwrap().save(&p("pre/model")).unwrap();
    assert_spares_inputs(
        &f,
        "pretrain --out DIR with --model DIR/model",
        &[&"pretrain", &"--model", &p("pre/model"), &"--steps", &"1", &"--batch", &"2", &"--out", &p("pre")],
        &["--out", "--model", &s("pre/model/config.json")],
    );
    assert_spares_inputs(
        &f,
        "pretrain --out inside --data",
        &[
            &"pretrain",
            &"--config",
            &p("tiny.json"),
            &"--data",
            &p("data.beitds"),
            &"--target",
            &"pixels",
            &"--out",
            &p("data.beitds"),
        ],
        &["--out", "--data"],
    );
    let replay_case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_grads/shared_scale");
    let replay_model = p("replay-model");
    std::fs::create_dir(&replay_model).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(replay_case.join(name), replay_model.join(name)).unwrap();
    }
    std::fs::copy(replay_case.join("batch.safetensors"), p("batch.safetensors")).unwrap();
    assert_spares_inputs(
        &f,
        "pretrain-replay --out = --model",
        &[
            &"pretrain-replay",
            &"--model",
            &replay_model,
            &"--batch",
            &p("batch.safetensors"),
            &"--steps",
            &"1",
            &"--lr",
            &"1e-3",
            &"--out",
            &replay_model,
        ],
        &["--out", "--model"],
    );
    assert_spares_inputs(
        &f,
        "dataset import --out = --images",
        &[&"dataset", &"import", &"--format", &"idx", &"--images", &p("images.idx"), &"--out", &p("images.idx")],
        &["--out", "--images", &s("images.idx")],
    );
    assert_spares_inputs(
        &f,
        "dataset import --out inside --dir",
        &[
            &"dataset",
            &"import",
            &"--format",
            &"image-folder",
            &"--dir",
            &p("folder"),
            &"--size",
            &"8",
            &"--out",
            &p("folder/x.beitds"),
        ],
        &["--out", "--dir"],
    );
    assert_spares_inputs(
        &f,
        "dataset combine --out = an input",
        &[
            &"dataset",
            &"combine",
            &p("other.beitds"),
            &format!("{}:train", s("data.beitds")),
            &"--out",
            &p("data.beitds"),
        ],
        &["--out", &s("data.beitds")],
    );
    assert_spares_inputs(
        &f,
        "tokenizer train --out = --data",
        &[
            &"tokenizer",
            &"train",
            &"--data",
            &p("data.beitds"),
            &"--image-size",
            &"16",
            &"--vocab",
            &"16",
            &"--steps",
            &"1",
            &"--batch",
            &"4",
            &"--out",
            &p("data.beitds"),
        ],
        &["--out", "--data"],
    );
    assert_spares_inputs(
        &f,
        "tokenize --out = --data",
        &[&"tokenize", &"--tokenizer", &p("tokenizer"), &"--data", &p("data.beitds"), &"--out", &p("data.beitds")],
        &["--out", "--data"],
    );
    assert_spares_inputs(
        &f,
        "tokenize --out inside --tokenizer",
        &[
            &"tokenize",
            &"--tokenizer",
            &p("tokenizer"),
            &"--data",
            &p("data.beitds"),
            &"--out",
            &p("tokenizer/model.safetensors"),
        ],
        &["--out", "--tokenizer"],
    );
    assert_spares_inputs(
        &f,
        "finetune --out = the pretrained --model",
        &[
            &"finetune",
            &"--model",
            &p("mim"),
            &"--data",
            &p("data.beitds"),
            &"--steps",
            &"1",
            &"--batch",
            &"4",
            &"--out",
            &p("mim"),
        ],
        &["--out", "--model"],
    );
    assert_spares_inputs(
        &f,
        "finetune --out = a symlink to the pretrained --model",
        &[
            &"finetune",
            &"--model",
            &p("mim"),
            &"--data",
            &p("data.beitds"),
            &"--steps",
            &"1",
            &"--batch",
            &"4",
            &"--out",
            &p("mim-link"),
        ],
        &["--out", "--model", "resolve"],
    );
    assert_spares_inputs(
        &f,
        "segment finetune --out = --model",
        &[
            &"segment",
            &"finetune",
            &"--model",
            &p("mim"),
            &"--data",
            &p("data.beitds"),
            &"--epochs",
            &"1",
            &"--batch-size",
            &"4",
            &"--out",
            &p("mim"),
        ],
        &["--out", "--model"],
    );

    // Outputs beside the inputs are fine: the same commands write there.
    let ok = beit(&[
        &"infer",
        &"--model",
        &p("mim"),
        &"--inputs",
        &p("inputs.safetensors"),
        &"--output",
        &p("out.safetensors"),
    ]);
    assert_ok(&ok, "infer beside its inputs");
    let ok = beit(&[
        &"dataset",
        &"import",
        &"--format",
        &"idx",
        &"--images",
        &p("images.idx"),
        &"--out",
        &p("images.beitds"),
    ]);
    assert_ok(&ok, "import beside its source");
}

/// `beit pretrain` of the pixel target on `data`, with these options unless `changed` names
/// another value, and `flags` (e.g. `--resume`) added.
fn pretrain(out: &Path, data: &Path, config: &Path, changed: &[(&str, &str)], flags: &[&str]) -> Output {
    let mut options = vec![
        ("--target", "pixels"),
        ("--steps", "2"),
        ("--batch", "4"),
        ("--masked", "4"),
        ("--seed", "5"),
        ("--masking", "block"),
        ("--checkpoint-every", "1"),
        ("--threads", "1"),
    ];
    for (name, value) in changed {
        options.iter_mut().find(|(n, _)| n == name).expect("a known option").1 = value;
    }
    let mut c = Command::new(BEIT);
    c.arg("pretrain").arg("--config").arg(config).arg("--data").arg(data).arg("--out").arg(out);
    for (name, value) in options {
        c.args([name, value]);
    }
    c.args(flags).output().unwrap()
}

fn checkpoint_meta(path: &Path) -> serde_json::Value {
    let text = SafetensorsFile::open(path).unwrap().metadata().unwrap().remove("beit_checkpoint").unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn pretrain_guards_its_checkpoint() {
    let f = Fixture::new();
    let (data, config, out) = (f.path("data.beitds"), f.path("tiny.json"), f.path("run"));
    let checkpoint = out.join("checkpoint.safetensors");
    assert_ok(&pretrain(&out, &data, &config, &[], &[]), "the first run");
    assert_eq!(checkpoint_meta(&checkpoint)["run"]["--batch"]["value"], "4");

    // A fresh run over it: refused, pointing at --resume and --overwrite.
    let before = snapshot(f.root());
    let err = assert_refused(&pretrain(&out, &data, &config, &[], &[]), "a fresh run over a checkpoint");
    assert!(err.contains("--resume") && err.contains("--overwrite") && err.contains("step 2"), "{err}");
    assert!(snapshot(f.root()) == before);

    // A resume with another batch, dataset, masking or seed: refused, naming the option and both
    // values.
    let resume = ["--resume"];
    let err = assert_refused(&pretrain(&out, &data, &config, &[("--batch", "8")], &resume), "another --batch");
    assert!(err.contains("--batch: 4 in the checkpoint, 8 here") && err.contains("--overwrite"), "{err}");
    let other = f.path("other.beitds");
    let err = assert_refused(&pretrain(&out, &other, &config, &[], &resume), "another --data");
    let (was, now) = (data.canonicalize().unwrap(), other.canonicalize().unwrap());
    assert!(err.contains(&format!("--data: {} in the checkpoint, {} here", was.display(), now.display())), "{err}");
    let err = assert_refused(&pretrain(&out, &data, &config, &[("--masking", "random")], &resume), "another --masking");
    assert!(err.contains("--masking: block in the checkpoint, random here"), "{err}");
    let err = assert_refused(&pretrain(&out, &data, &config, &[("--seed", "6")], &resume), "another --seed");
    assert!(err.contains("--seed: 5 in the checkpoint, 6 here"), "{err}");
    let err = assert_refused(&pretrain(&out, &data, &config, &[("--masked", "5")], &resume), "another --masked");
    assert!(err.contains("--masked: 4 in the checkpoint, 5 here"), "{err}");
    assert!(snapshot(f.root()) == before, "a refused resume changed files");

    // Another file at the same path: refused too.
    let saved = std::fs::read(&data).unwrap();
    std::fs::copy(&other, &data).unwrap();
    let err = assert_refused(&pretrain(&out, &data, &config, &[], &resume), "another file at --data's path");
    assert!(err.contains("--data: ") && err.contains("its content changed"), "{err}");
    std::fs::write(&data, saved).unwrap();

    // The same options resume (nothing is left to run here: the run is at its last step).
    assert_ok(&pretrain(&out, &data, &config, &[], &resume), "an unchanged resume");

    // --overwrite starts over, and records the new run's options.
    assert_ok(&pretrain(&out, &data, &config, &[("--batch", "8")], &["--overwrite"]), "--overwrite");
    assert_eq!(checkpoint_meta(&checkpoint)["run"]["--batch"]["value"], "8");
}

#[test]
fn a_checkpoint_without_a_record_still_resumes_with_a_note() {
    use beit::train::trainer::{Trainer, TrainerOptions};
    let f = Fixture::new();
    let out = f.path("old");
    std::fs::create_dir(&out).unwrap();
    let cfg = BeitConfig::from_json_str(TINY).unwrap();
    let model = Model::new_random(cfg, Architecture::MaskedImageModeling, 0).unwrap();
    let options = TrainerOptions { total_steps: 2, seed: 5, ..TrainerOptions::default() };
    // Saved through the library without a record, as an older beit or the C API did.
    Trainer::new(model, options).unwrap().save_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
    assert!(checkpoint_meta(&out.join("checkpoint.safetensors")).get("run").is_none());
    let run = beit(&[
        &"pretrain",
        &"--config",
        &f.path("tiny.json"),
        &"--steps",
        &"2",
        &"--batch",
        &"2",
        &"--masked",
        &"4",
        &"--seed",
        &"5",
        &"--threads",
        &"1",
        &"--resume",
        &"--out",
        &out,
    ]);
    assert_ok(&run, "resuming a checkpoint without a record");
    assert!(stderr(&run).contains("could not be checked"), "{}", stderr(&run));
    // From now on it is recorded.
    assert_eq!(checkpoint_meta(&out.join("checkpoint.safetensors"))["run"]["--batch"]["value"], "2");
}

/// A PID that is not running (a child that exited and was reaped).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn stale_temp_files_of_dead_writers_are_removed_when_a_run_starts() {
    let f = Fixture::new();
    let (data, config, out) = (f.path("data.beitds"), f.path("tiny.json"), f.path("run"));
    assert_ok(&pretrain(&out, &data, &config, &[], &[]), "the first run");
    let dead = dead_pid();
    let mut live = Command::new("sleep").arg("60").spawn().unwrap();
    let stale = [
        out.join(format!(".checkpoint.safetensors.tmp-{dead}")),
        out.join(format!(".checkpoint.safetensors.tmp-{dead}-0")),
        out.join(format!("model/.model.safetensors.tmp-{dead}")),
    ];
    let kept = [
        out.join(format!(".checkpoint.safetensors.tmp-{}", live.id())),
        // Not a name this run writes: not ours to judge.
        out.join(format!(".notes.txt.tmp-{dead}")),
    ];
    for p in stale.iter().chain(&kept) {
        std::fs::write(p, vec![7u8; 1000]).unwrap();
    }
    let run = pretrain(&out, &data, &config, &[], &["--resume"]);
    let _ = live.kill();
    let _ = live.wait();
    assert_ok(&run, "the resume");
    let err = stderr(&run);
    for p in &stale {
        assert!(!p.exists(), "{} was not removed", p.display());
        assert!(err.contains(&p.display().to_string()), "the removal of {} was not reported: {err}", p.display());
    }
    for p in &kept {
        assert!(p.exists(), "{} was removed", p.display());
    }

    // A file output: `beit dataset combine` removes its output's stale temporary files too.
    let combined = f.path("combined.beitds");
    let litter = f.path(&format!(".combined.beitds.tmp-{dead}"));
    std::fs::write(&litter, b"partial").unwrap();
    assert_ok(&beit(&[&"dataset", &"combine", &data, &"--out", &combined]), "combine");
    assert!(!litter.exists() && combined.exists());
}

#[test]
fn refused_runs_leave_nothing_behind() {
    let f = Fixture::new();
    let before = snapshot(f.root());
    let nested = f.path("a/b/out");
    let data = f.path("data.beitds");
    let tiny = f.path("tiny.json");
    let cases: Vec<(&str, Vec<&dyn AsRef<std::ffi::OsStr>>)> = vec![
        (
            "pretrain, an unknown preset",
            vec![&"pretrain", &"--config", &"no-such-preset", &"--steps", &"1", &"--out", &nested],
        ),
        (
            "pretrain, a missing dataset",
            vec![&"pretrain", &"--data", &"/nonexistent.beitds", &"--steps", &"1", &"--out", &nested],
        ),
        (
            "pretrain, over the memory budget",
            vec![&"--memory-budget", &"64K", &"pretrain", &"--config", &"tiny32", &"--steps", &"1", &"--out", &nested],
        ),
        (
            "pretrain, random masking on synthetic data",
            vec![&"pretrain", &"--config", &tiny, &"--masking", &"random", &"--steps", &"1", &"--out", &nested],
        ),
        (
            "finetune with a label fraction, a bad --image-size",
            vec![
                &"finetune",
                &"--config",
                &tiny,
                &"--data",
                &data,
                &"--label-fraction",
                &"0.5",
                &"--image-size",
                &"x",
                &"--out",
                &nested,
            ],
        ),
        (
            "finetune with a label fraction, an unknown preset",
            vec![
                &"finetune",
                &"--config",
                &"no-such-preset",
                &"--data",
                &data,
                &"--label-fraction",
                &"0.5",
                &"--out",
                &nested,
            ],
        ),
        (
            "finetune, batch 0",
            vec![&"finetune", &"--config", &tiny, &"--data", &data, &"--batch", &"0", &"--out", &nested],
        ),
        ("create, an unknown preset", vec![&"create", &"--config", &"no-such-preset", &"--out", &nested]),
    ];
    for (case, args) in cases {
        assert_refused(&beit(&args), case);
        assert!(snapshot(f.root()) == before, "{case}: left files or directories behind");
    }
}

#[test]
fn tokenizer_train_checks_everything_before_it_trains_and_writes_nothing_when_refused() {
    let f = Fixture::new();
    let data = f.path("data.beitds");
    let rgb = f.path("rgb.beitds");
    let spec = DatasetSpec { height: 16, width: 16, channels: 3, labels: false, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(&rgb, spec).unwrap();
    for i in 0..8 {
        w.push(&vec![(i * 20) as u8; 16 * 16 * 3], None, None, None).unwrap();
    }
    w.finish().unwrap();
    let empty = f.path("empty.beitds");
    let spec = DatasetSpec { height: 16, width: 16, channels: 1, labels: false, masks: false, token_grid: None };
    DatasetWriter::create(&empty, spec).unwrap().finish().unwrap();
    let out = f.path("tok/out");
    let base: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"tokenizer",
        &"train",
        &"--data",
        &data,
        &"--image-size",
        &"16",
        &"--vocab",
        &"16",
        &"--n-hid",
        &"8",
        &"--groups",
        &"2",
        &"--decoder-width",
        &"8",
        &"--steps",
        &"2",
        &"--batch",
        &"4",
        &"--threads",
        &"1",
        &"--out",
        &out,
    ];
    let before = snapshot(f.root());
    let cases: Vec<(&str, Vec<&dyn AsRef<std::ffi::OsStr>>, &str)> = vec![
        ("RGB held-out images for a grey tokenizer", vec![&"--eval-data", &rgb], "3 channels"),
        ("no held-out images", vec![&"--eval-data", &empty], "no images"),
        ("a missing --eval-data", vec![&"--eval-data", &"/nonexistent.beitds"], "nonexistent"),
        ("--eval-images 0", vec![&"--eval-images", &"0"], "--eval-images 0"),
    ];
    for (case, extra, says) in cases {
        let mut args = base.clone();
        args.extend(extra);
        let err = assert_refused(&beit(&args), case);
        assert!(err.contains(says), "{case}: {err}");
        // Refused before training, so nothing was written (not even a tokenizer without its report).
        assert!(snapshot(f.root()) == before, "{case}: left files behind");
    }
    assert_ok(&beit(&base), "a valid tokenizer run");
    for file in ["config.json", "model.safetensors", "reconstructions.png", "report.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
}

/// The temporary files in `dir` (names holding `.tmp-`).
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".tmp-")))
        .collect()
}

#[test]
fn a_run_killed_while_writing_its_checkpoint_leaves_litter_that_the_resume_removes() {
    let f = Fixture::new();
    // Wide enough that a checkpoint (parameters and both AdamW moments, ~70 MB) takes a while to
    // write, on images small enough that a step is quick.
    let config = f.path("wide.json");
    std::fs::write(
        &config,
        TINY.replace("\"hidden_size\": 32", "\"hidden_size\": 512")
            .replace("\"intermediate_size\": 64", "\"intermediate_size\": 2048"),
    )
    .unwrap();
    let out = f.path("run");
    let args = |steps: &str| {
        let mut c = Command::new(BEIT);
        c.args(["pretrain", "--batch", "1", "--masked", "4", "--threads", "1", "--checkpoint-every", "1"])
            .args(["--steps", steps, "--resume", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out);
        c
    };
    // Kill the run with SIGKILL while a checkpoint's temporary file exists; a save that finished
    // between the look and the kill is simply tried again.
    let mut litter = Vec::new();
    for _attempt in 0..20 {
        let mut child =
            args("100000").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while temp_files(&out).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        litter = temp_files(&out);
        if !litter.is_empty() {
            break;
        }
    }
    assert!(!litter.is_empty(), "never caught a checkpoint write in progress");
    // The resume (to the step the checkpoint holds, so it only cleans up and saves) removes it.
    let step = SafetensorsFile::open(&out.join("checkpoint.safetensors"))
        .ok()
        .map(|_| checkpoint_meta(&out.join("checkpoint.safetensors"))["step"].as_u64().unwrap())
        .unwrap_or(0);
    let resumed = args(&step.max(1).to_string()).output().unwrap();
    assert_ok(&resumed, "the resume");
    let err = stderr(&resumed);
    for p in &litter {
        assert!(!p.exists(), "{} is still there", p.display());
        assert!(err.contains(&p.display().to_string()), "the removal of {} was not reported: {err}", p.display());
    }
    assert!(temp_files(&out).is_empty() && temp_files(&out.join("model")).is_empty());
}
