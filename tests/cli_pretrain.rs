//! The pretraining command line: `beit pretrain-replay` against PyTorch's AdamW trajectory, and
//! a `beit pretrain` run killed with SIGKILL and resumed from its last checkpoint, which must
//! give bit-identical losses and weights to an uninterrupted run (visual tokens on the synthetic
//! task; the pixel target on a dataset file, which must also learn).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use beit::model::io::{read_f32, SafetensorsFile};

const BEIT: &str = env!("CARGO_BIN_EXE_beit");

fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_grads").join(name)
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn pretrain_replay_equals_torch_adamw() {
    let case = reference("shared_scale");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(BEIT)
        .args(["pretrain-replay", "--model"])
        .arg(&case)
        .arg("--batch")
        .arg(case.join("batch.safetensors"))
        .args(["--steps", "3", "--lr", "1e-3", "--weight-decay", "0.05", "--weight-decay-on", "all", "--out"])
        .arg(out.path().join("model"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let lines = json_lines(&run.stdout);
    let file = SafetensorsFile::open(&case.join("adamw_steps.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (_, losses) = read_f32(&st, "losses").unwrap().unwrap();
    assert_eq!(lines.len(), 3);
    for (i, (line, &want)) in lines.iter().zip(&losses).enumerate() {
        assert_eq!(line["step"], i + 1);
        let loss = line["loss"].as_f64().unwrap();
        assert!((loss - want as f64).abs() < 1e-5, "step {}: {loss} vs torch {want}", i + 1);
    }
    let saved = SafetensorsFile::open(&out.path().join("model/model.safetensors")).unwrap();
    let saved = saved.parse().unwrap();
    let mut compared = 0;
    for name in st.names() {
        if name == "losses" {
            continue;
        }
        let (_, want) = read_f32(&st, name).unwrap().unwrap();
        let (_, got) = read_f32(&saved, name).unwrap().unwrap_or_else(|| panic!("{name} not saved"));
        for (j, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{name}[{j}]: {a} vs torch {b}");
        }
        compared += 1;
    }
    assert_eq!(compared, saved.len());
}

const TINY: &str = r#"{"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1, "vocab_size": 64,
    "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1,
    "drop_path_rate": 0.2}"#;

const STEPS: u64 = 24;

fn pretrain_cmd(config: &Path, out: &Path, resume: bool) -> Command {
    let mut c = Command::new(BEIT);
    c.args(["pretrain", "--config"])
        .arg(config)
        .args(["--steps", &STEPS.to_string(), "--batch", "4", "--masked", "6", "--seed", "3"])
        .args(["--checkpoint-every", "2", "--threads", "2", "--json", "--out"])
        .arg(out);
    if resume {
        c.arg("--resume");
    }
    c
}

/// Step → loss (exact f64 bits) of a run's JSON lines.
fn losses(lines: &[serde_json::Value]) -> Vec<(u64, u64)> {
    lines.iter().filter_map(|l| Some((l.get("step")?.as_u64()?, l.get("loss")?.as_f64()?.to_bits()))).collect()
}

/// Starts the run `start` (writing to `out`), kills it with SIGKILL when `kill_after_step` is
/// printed (or, with None, after `delay`), and returns the losses it printed.
fn killed_run(
    mut start: Command,
    out: &Path,
    kill_after_step: Option<u64>,
    delay: std::time::Duration,
) -> Vec<(u64, u64)> {
    let mut child = start.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                seen.push(v);
            }
        }
        seen
    });
    match kill_after_step {
        Some(step) => {
            // Poll the checkpoint's neighbour: the run prints step lines as it goes; wait for ours.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            loop {
                std::thread::sleep(std::time::Duration::from_millis(2));
                if std::fs::read_dir(out).map(|d| d.count()).unwrap_or(0) > 0 && progress(out) >= step {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "the run never reached step {step}");
            }
        }
        None => std::thread::sleep(delay),
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    losses(&reader.join().unwrap())
}

/// The step of the checkpoint currently in `out` (0 if none).
fn progress(out: &Path) -> u64 {
    let path = out.join("checkpoint.safetensors");
    SafetensorsFile::open(&path)
        .ok()
        .and_then(|f| f.metadata().ok())
        .and_then(|mut m| m.remove(beit::train::checkpoint::META_KEY))
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|meta| meta["step"].as_u64())
        .unwrap_or(0)
}

/// Runs `command(out, resume)` straight into `dir/straight`, then killed (after its checkpoint of
/// step 10, and at an arbitrary moment) and resumed: every loss and the final files must equal
/// the straight run's. Returns the straight run's losses.
fn check_sigkill_then_resume(dir: &Path, command: impl Fn(&Path, bool) -> Command) -> Vec<f64> {
    let straight_out = dir.join("straight");
    let start = std::time::Instant::now();
    let straight = command(&straight_out, false).output().unwrap();
    let duration = start.elapsed();
    assert!(straight.status.success(), "{}", String::from_utf8_lossy(&straight.stderr));
    let reference = losses(&json_lines(&straight.stdout));
    assert_eq!(reference.len() as u64, STEPS);

    // Killed once right after its checkpoint of step 10, once at an arbitrary moment (possibly
    // in the middle of a save, possibly before the first checkpoint).
    for (name, kill_at, delay) in [("at_step", Some(10), duration), ("by_timer", None, duration / 2)] {
        let out = dir.join(name);
        let before = killed_run(command(&out, false), &out, kill_at, delay);
        let resumed_from = progress(&out);
        if let Some(step) = kill_at {
            assert!(resumed_from >= step, "{name}: checkpoint at {resumed_from}");
        }
        if resumed_from == STEPS {
            eprintln!("{name}: the run finished before the kill; nothing to resume");
            continue;
        }
        let resumed = command(&out, true).output().unwrap();
        assert!(resumed.status.success(), "{name}: {}", String::from_utf8_lossy(&resumed.stderr));
        let after = losses(&json_lines(&resumed.stdout));
        assert_eq!(after.first().map(|&(s, _)| s), Some(resumed_from + 1), "{name}: resumed at the wrong step");
        // Every loss either run printed equals the uninterrupted run's, bit for bit.
        for &(step, bits) in before.iter().chain(&after) {
            assert_eq!(bits, reference[step as usize - 1].1, "{name}: step {step} differs");
        }
        assert_eq!(after.last().map(|&(s, _)| s), Some(STEPS));
        for file in ["checkpoint.safetensors", "model/model.safetensors"] {
            let (a, b) = (std::fs::read(straight_out.join(file)).unwrap(), std::fs::read(out.join(file)).unwrap());
            assert!(a == b, "{name}: {file} differs from the uninterrupted run's");
        }
        eprintln!("{name}: killed after {} printed steps, resumed from step {resumed_from}", before.len());
    }
    reference.iter().map(|&(_, bits)| f64::from_bits(bits)).collect()
}

#[test]
fn sigkill_then_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, TINY).unwrap();
    check_sigkill_then_resume(dir.path(), |out, resume| pretrain_cmd(&config, out, resume));
}

/// 24 grey 16x16 images, each an even grey level with faint vertical stripes: a masked patch's
/// pixels are predictable from the unmasked ones.
fn write_grey_dataset(path: &Path) {
    use beit::data::dataset::{DatasetSpec, DatasetWriter};
    let spec = DatasetSpec { height: 16, width: 16, channels: 1, labels: false, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..24 {
        let level = 20 + (i * 67) % 216;
        let px: Vec<u8> = (0..256).map(|p| (level + 8 * (p % 2)) as u8).collect();
        w.push(&px, None, None, None).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn pixel_target_pretrains_on_a_dataset_learns_and_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    // TINY's head has 64 outputs; a fresh model for the pixel target gets 4·4·1 = 16.
    let config = dir.path().join("config.json");
    std::fs::write(&config, TINY).unwrap();
    let data = dir.path().join("grey.beitds");
    write_grey_dataset(&data);
    let pixels = |out: &Path, resume: bool| {
        let mut c = pretrain_cmd(&config, out, resume);
        c.args(["--target", "pixels", "--data"]).arg(&data);
        c
    };

    // A short run: no tokenizer or token cache needed, the head adjusted and said so.
    let out = dir.path().join("short");
    let run = Command::new(BEIT)
        .args(["pretrain", "--target", "pixels", "--steps", "3", "--batch", "4", "--json", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("vocab_size 16"), "{stderr}");
    let lines = json_lines(&run.stdout);
    assert_eq!(lines.iter().filter(|l| l.get("loss").is_some_and(|v| v.is_f64())).count(), 3);
    assert_eq!(lines.last().unwrap()["target"], "pixels");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(saved["vocab_size"], 16);

    let losses = check_sigkill_then_resume(dir.path(), pixels);
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (mean(&losses[..6]), mean(&losses[losses.len() - 6..]));
    eprintln!("pixel losses: first six {first:.4}, last six {last:.4}: {losses:?}");
    assert!(last < 0.5 * first, "the pixel loss did not fall: {losses:?}");

    // The checkpoint keeps its target: resuming it with another is refused, and so is the
    // pixel target on the GPU step (before any work: no GPU needed to be told).
    let straight = dir.path().join("straight");
    let tokens = pretrain_cmd(&config, &straight, true).args(["--target", "tokens"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&tokens.stderr);
    assert!(!tokens.status.success() && stderr.contains("trained with the pixels target"), "{stderr}");
    let cuda = pixels(&dir.path().join("cuda"), false).args(["--device", "cuda"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&cuda.stderr);
    assert!(!cuda.status.success() && stderr.contains("visual-token target only"), "{stderr}");
    assert!(!dir.path().join("cuda").exists());
}
