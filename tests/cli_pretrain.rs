//! The pretraining command line: `beit pretrain-replay` against PyTorch's AdamW trajectory, and
//! a `beit pretrain` run killed with SIGKILL mid-run and resumed from its last checkpoint, which
//! must give bit-identical losses and weights to an uninterrupted run (visual tokens on the
//! synthetic task; the pixel target on a dataset file, which must also learn). The killed runs
//! print into a pipe that is nearly full, so they block before their last step and every kill
//! lands mid-run (Linux: the pipe's size comes from fcntl F_GETPIPE_SZ).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::raw::c_int;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// The capacity in bytes of the pipe behind `fd` (Linux's F_GETPIPE_SZ).
fn pipe_capacity(fd: &impl AsRawFd) -> usize {
    extern "C" {
        fn fcntl(fd: c_int, cmd: c_int, ...) -> c_int;
    }
    const F_GETPIPE_SZ: c_int = 1032;
    // SAFETY: F_GETPIPE_SZ takes no argument and only reads the pipe's size.
    let n = unsafe { fcntl(fd.as_raw_fd(), F_GETPIPE_SZ) };
    assert!(n > 0, "F_GETPIPE_SZ: {}", std::io::Error::last_os_error());
    n as usize
}

/// A run that is killed (SIGKILL) when dropped, so that a failing assertion leaves no blocked
/// process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// When a killed run is killed.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// As soon as the run has created its output directory.
    OutputDirectory,
    /// As soon as the checkpoint in the output directory is of this step or later.
    Checkpoint(u64),
    /// This long after the start.
    After(Duration),
}

/// Starts the run `start` (writing to `out`) with its stdout on a pipe that has room for only
/// `room` more bytes and is not read until the run is dead. The run prints a line per step, so
/// once it has printed `room` bytes it blocks in its next print: with `room` less than its whole
/// output it cannot finish, however fast it runs or however late this thread is scheduled. It
/// is killed with SIGKILL at `kill_point` (which it must reach first); returns the losses it
/// printed.
fn killed_run(mut start: Command, out: &Path, room: usize, kill_point: KillPoint) -> Vec<(u64, u64)> {
    let (mut reader, mut writer) = std::io::pipe().unwrap();
    let capacity = pipe_capacity(&writer);
    assert!(room < capacity, "room {room} >= the pipe's capacity {capacity}");
    // Empty lines, which are not JSON. Linux fills a pipe's pages in order and appends a small
    // write to the last page when it fits, so exactly `room` bytes stay free.
    writer.write_all(&vec![b'\n'; capacity - room]).unwrap();
    start.stdout(writer).stderr(Stdio::null());
    let started = Instant::now();
    let mut run = Running(start.spawn().unwrap());
    drop(start); // our copy of the pipe's write end: reading it below ends when the run is dead
    let reached = |out: &Path| match kill_point {
        KillPoint::OutputDirectory => out.is_dir(),
        KillPoint::Checkpoint(step) => progress(out) >= step,
        KillPoint::After(delay) => started.elapsed() >= delay,
    };
    let deadline = started + Duration::from_secs(120);
    while !reached(out) {
        assert!(run.0.try_wait().unwrap().is_none(), "the run ended before {kill_point:?}");
        assert!(Instant::now() < deadline, "the run never reached {kill_point:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    run.0.kill().unwrap(); // SIGKILL on Unix
    let status = run.0.wait().unwrap();
    // Killed, not finished (it could not have: see above).
    assert_eq!(status.signal(), Some(9), "the run was not killed mid-run: {status}");
    let mut printed = Vec::new();
    reader.read_to_end(&mut printed).unwrap();
    let ours = &printed[capacity - room..];
    assert!(printed[..capacity - room].iter().all(|&b| b == b'\n'), "the filler changed");
    assert!(ours.len() <= room, "the run printed {} bytes into a pipe with room for {room}", ours.len());
    losses(&json_lines(ours))
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

/// The checkpoint step after which the second killed run is killed.
const KILL_AFTER: u64 = 10;

/// Runs `command(out, resume)` straight into `dir/straight`, then three times killed with
/// SIGKILL in the middle of the run and resumed: every loss and the final files must equal the
/// straight run's. Returns the straight run's losses.
fn check_sigkill_then_resume(dir: &Path, command: impl Fn(&Path, bool) -> Command) -> Vec<f64> {
    let straight_out = dir.join("straight");
    let start = Instant::now();
    let straight = command(&straight_out, false).output().unwrap();
    let duration = start.elapsed();
    assert!(straight.status.success(), "{}", String::from_utf8_lossy(&straight.stderr));
    let stdout = String::from_utf8_lossy(&straight.stdout);
    let reference = losses(&json_lines(&straight.stdout));
    assert_eq!(reference.iter().map(|&(s, _)| s).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
    // The bytes of the straight run's step lines (with their newlines). A killed run's lines
    // differ only in the digits of images_per_s, a few bytes.
    let step_line_bytes: Vec<usize> = stdout.lines().filter(|l| l.contains("\"loss\"")).map(|l| l.len() + 1).collect();
    assert_eq!(step_line_bytes.len() as u64, STEPS);
    let room_for = |lines: u64| step_line_bytes[..lines as usize].iter().sum::<usize>();

    // Each kill lands mid-run by construction: with stdout room for at most 3 lines more than
    // its kill point needs (3 lines are hundreds of bytes; the lines of two runs differ by a few
    // bytes each), a run reaches its kill point and blocks long before its last step.
    // - before_first_checkpoint: no room at all, so the run blocks printing step 1, before its
    //   first checkpoint (step 2); killed once it has created its output directory.
    // - after_checkpoint: killed as soon as its checkpoint of step KILL_AFTER is there (the run
    //   may be a step or three further, or in the middle of a save).
    // - by_timer: killed at an arbitrary moment in the first half of the run (before the first
    //   checkpoint, in the middle of a save, ... or blocked at step STEPS / 2).
    let kills = [
        ("before_first_checkpoint", 0, KillPoint::OutputDirectory),
        ("after_checkpoint", room_for(KILL_AFTER + 3), KillPoint::Checkpoint(KILL_AFTER)),
        ("by_timer", room_for(STEPS / 2), KillPoint::After(duration / 4)),
    ];
    assert!(KILL_AFTER + 3 < STEPS);
    for (name, room, kill_point) in kills {
        let out = dir.join(name);
        let before = killed_run(command(&out, false), &out, room, kill_point);
        let resumed_from = progress(&out);
        let printed = before.last().map_or(0, |&(s, _)| s);
        assert_eq!(before.iter().map(|&(s, _)| s).collect::<Vec<_>>(), (1..=printed).collect::<Vec<_>>(), "{name}");
        // A checkpoint is saved after its step's line is printed.
        assert!(
            resumed_from <= printed && printed < STEPS,
            "{name}: printed {printed} steps, checkpoint {resumed_from}"
        );
        match kill_point {
            KillPoint::OutputDirectory => assert_eq!((printed, resumed_from), (0, 0), "{name}"),
            KillPoint::Checkpoint(step) => assert!(resumed_from >= step, "{name}: checkpoint at {resumed_from}"),
            KillPoint::After(_) => {}
        }
        let resumed = command(&out, true).output().unwrap();
        assert!(resumed.status.success(), "{name}: {}", String::from_utf8_lossy(&resumed.stderr));
        let after = losses(&json_lines(&resumed.stdout));
        let steps: Vec<u64> = after.iter().map(|&(s, _)| s).collect();
        assert_eq!(steps, (resumed_from + 1..=STEPS).collect::<Vec<_>>(), "{name}: resumed at the wrong step");
        // Every loss either run printed equals the uninterrupted run's, bit for bit.
        for &(step, bits) in before.iter().chain(&after) {
            assert_eq!(bits, reference[step as usize - 1].1, "{name}: step {step} differs");
        }
        for file in ["checkpoint.safetensors", "model/model.safetensors"] {
            let (a, b) = (std::fs::read(straight_out.join(file)).unwrap(), std::fs::read(out.join(file)).unwrap());
            assert!(a == b, "{name}: {file} differs from the uninterrupted run's");
        }
        // A save the kill interrupted left a temporary file; the resumed run removed it.
        let temps: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(temps.is_empty(), "{name}: temporary files left: {temps:?}");
        eprintln!("{name}: killed after {printed} printed steps, resumed from step {resumed_from}");
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
