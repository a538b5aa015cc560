//! The pretraining trainer: determinism, checkpoints that resume bit for bit, and bad input that
//! is refused with a clear error while the trainer stays usable and unchanged.

use std::path::Path;

use beit::data::batch::OwnedMimBatch;
use beit::data::synthetic::SyntheticMim;
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Model};

const CONFIG: &str = r#"{"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1, "vocab_size": 64,
    "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1,
    "drop_path_rate": 0.2}"#;

fn config() -> BeitConfig {
    BeitConfig::from_json_str(CONFIG).unwrap()
}

fn options() -> TrainerOptions {
    TrainerOptions { learning_rate: 2e-3, warmup_steps: 2, total_steps: 20, seed: 9, ..Default::default() }
}

fn trainer() -> Trainer {
    Trainer::new(Model::new_random(config(), Architecture::MaskedImageModeling, 1).unwrap(), options()).unwrap()
}

fn data() -> SyntheticMim {
    SyntheticMim::for_config(&config(), 6, 4)
}

/// Runs `steps` steps on the data stream from the trainer's position; returns the loss bits.
fn run(t: &mut Trainer, steps: usize) -> Vec<u64> {
    (0..steps)
        .map(|_| {
            let batch = data().batch(t.data_position(), 4);
            t.step(&batch.as_batch()).unwrap().loss.to_bits()
        })
        .collect()
}

fn param_bits(t: &Trainer) -> Vec<u32> {
    t.model().params().data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn training_is_deterministic_and_learns() {
    let (mut a, mut b) = (trainer(), trainer());
    let (la, lb) = (run(&mut a, 12), run(&mut b, 12));
    assert_eq!(la, lb);
    assert_eq!(param_bits(&a), param_bits(&b));
    // Drop path draws from the trainer's seed: another seed gives another trajectory.
    let mut c = Trainer::new(
        Model::new_random(config(), Architecture::MaskedImageModeling, 1).unwrap(),
        TrainerOptions { seed: 10, ..options() },
    )
    .unwrap();
    assert_ne!(run(&mut c, 12), la);
    let losses: Vec<f64> = la.iter().map(|&b| f64::from_bits(b)).collect();
    let first: f64 = losses[..3].iter().sum::<f64>() / 3.0;
    let last: f64 = losses[9..].iter().sum::<f64>() / 3.0;
    assert!(last < first, "loss did not fall: {losses:?}");
}

#[test]
fn checkpoint_resume_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut straight = trainer();
    let mut losses = run(&mut straight, 4);
    let mut interrupted = trainer();
    run(&mut interrupted, 4);
    interrupted.save_checkpoint(&path).unwrap();
    losses.extend(run(&mut straight, 5));
    drop(interrupted);

    let mut resumed = Trainer::from_checkpoint(&path).unwrap();
    assert_eq!(resumed.step_count(), 4);
    assert_eq!(resumed.data_position(), 4);
    assert_eq!(resumed.options(), &options());
    assert_eq!(run(&mut resumed, 5), losses[4..]);
    assert_eq!(param_bits(&resumed), param_bits(&straight));

    // Loading into an existing trainer of the same config does the same.
    let mut other = trainer();
    run(&mut other, 2);
    other.load_checkpoint(&path).unwrap();
    assert_eq!(run(&mut other, 5), losses[4..]);
    assert_eq!(param_bits(&other), param_bits(&straight));
}

/// Asserts that `t` is exactly where a fresh trainer after `steps` steps is, and still trains.
fn assert_unchanged_and_usable(t: &mut Trainer, steps: usize) {
    let mut reference = trainer();
    run(&mut reference, steps);
    assert_eq!(t.step_count(), steps as u64);
    assert_eq!(param_bits(t), param_bits(&reference));
    assert_eq!(run(t, 2), run(&mut reference, 2), "the trainer diverged from an untouched one");
}

#[test]
fn bad_batches_are_refused_and_change_nothing() {
    let mut t = trainer();
    run(&mut t, 1);
    let good = data().batch(t.data_position(), 4);
    let expect_err = |t: &mut Trainer, b: &OwnedMimBatch, needle: &str| {
        let err = t.step(&b.as_batch()).unwrap_err().to_string();
        assert!(err.contains(needle), "error {err:?} should mention {needle:?}");
    };
    let mut b = good.clone();
    b.bool_masked_pos.pop();
    expect_err(&mut t, &b, "bool_masked_pos holds 63 values");
    let mut b = good.clone();
    b.labels.push(0);
    expect_err(&mut t, &b, "labels hold 65 values");
    let mut b = good.clone();
    let i = b.bool_masked_pos.iter().position(|&m| m == 1).unwrap();
    b.labels[i] = 64;
    expect_err(&mut t, &b, "outside the vocabulary");
    b.labels[i] = -1;
    expect_err(&mut t, &b, "outside the vocabulary");
    let mut b = good.clone();
    b.pixels[17] = f32::NAN;
    expect_err(&mut t, &b, "pixels must be finite");
    let mut b = good.clone();
    b.bool_masked_pos.fill(0);
    expect_err(&mut t, &b, "masks no patch");
    let mut b = good.clone();
    b.bool_masked_pos[0] = 2;
    expect_err(&mut t, &b, "0 or 1");
    let mut b = good.clone();
    b.shape = [4, 1, 8, 32];
    expect_err(&mut t, &b, "configured image size");
    assert_unchanged_and_usable(&mut t, 1);
}

#[test]
fn diverging_step_is_refused() {
    // A learning rate of 1e36 sends the weights to ~1e36 in one step; the next forward pass
    // overflows. That step must be refused with a numerical error and leave everything as it was.
    let opts = TrainerOptions { learning_rate: 1e36, clip_grad_norm: 0.0, ..options() };
    let mut t = Trainer::new(Model::new_random(config(), Architecture::MaskedImageModeling, 1).unwrap(), opts).unwrap();
    let batch = |t: &Trainer| data().batch(t.data_position(), 4);
    let mut diverged = false;
    for _ in 0..4 {
        let (params, rng, step) = (param_bits(&t), t.rng_state(), t.step_count());
        match t.step(&batch(&t).as_batch()) {
            Ok(_) => continue,
            Err(e) => {
                assert!(matches!(e, beit::Error::Numerical(_)), "{e}");
                assert!(e.to_string().contains("not applied"), "{e}");
                assert_eq!((param_bits(&t), t.rng_state(), t.step_count()), (params, rng, step));
                diverged = true;
                break;
            }
        }
    }
    assert!(diverged, "training at lr 1e36 never produced a non-finite loss");
}

#[test]
fn bad_checkpoints_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A checkpoint of another config.
    let other_cfg =
        BeitConfig::from_json_str(&CONFIG.replace("\"intermediate_size\": 64", "\"intermediate_size\": 96")).unwrap();
    let other =
        Trainer::new(Model::new_random(other_cfg, Architecture::MaskedImageModeling, 1).unwrap(), options()).unwrap();
    let other_path = dir.path().join("other.safetensors");
    other.save_checkpoint(&other_path).unwrap();
    let mut t = trainer();
    run(&mut t, 2);
    let err = t.load_checkpoint(&other_path).unwrap_err().to_string();
    assert!(err.contains("another model config") && err.contains("intermediate_size"), "{err}");

    // A truncated file, a model directory's weights (not a checkpoint), a missing file.
    let good = dir.path().join("good.safetensors");
    t.save_checkpoint(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert!(t.load_checkpoint(&cut).is_err());
    t.model().save(&dir.path().join("hf")).unwrap();
    let err = t.load_checkpoint(&dir.path().join("hf/model.safetensors")).unwrap_err().to_string();
    assert!(err.contains("not a libbeit trainer checkpoint"), "{err}");
    assert!(t.load_checkpoint(&dir.path().join("missing.safetensors")).is_err());
    assert_unchanged_and_usable(&mut t, 2);
}

#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let mut t = trainer();
    run(&mut t, 1);
    t.save_checkpoint(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Saving into a missing directory fails cleanly...
    assert!(t.save_checkpoint(&dir.path().join("no/such/dir/ckpt.safetensors")).is_err());
    // ...and a save that cannot rename over the target (here: a directory in the way of the
    // temporary file's rename) leaves the old file as it was.
    run(&mut t, 1);
    let blocked = dir.path().join("blocked.safetensors");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    assert!(t.save_checkpoint(&blocked).is_err());
    assert!(blocked.join("keep").exists());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(Path::new(&path).exists());
}

#[test]
fn options_are_validated() {
    let model = || Model::new_random(config(), Architecture::MaskedImageModeling, 1).unwrap();
    for (opts, needle) in [
        (TrainerOptions { learning_rate: f64::NAN, ..options() }, "learning_rate"),
        (TrainerOptions { beta2: 1.0, ..options() }, "beta2"),
        (TrainerOptions { drop_path_rate: Some(1.0), ..options() }, "drop_path_rate"),
        (TrainerOptions { total_steps: 2, warmup_steps: 2, ..options() }, "total_steps"),
        (TrainerOptions { layer_decay: 0.0, ..options() }, "layer_decay"),
    ] {
        let err = Trainer::new(model(), opts).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    let cls = Model::new_random(
        BeitConfig::from_json_str(&CONFIG.replace("\"vocab_size\": 64", "\"num_labels\": 3")).unwrap(),
        Architecture::ImageClassification,
        1,
    )
    .unwrap();
    assert!(Trainer::new(cls, options()).unwrap_err().to_string().contains("BeitForMaskedImageModeling"));
}

#[test]
fn the_pixel_target_needs_its_head_width_stays_on_the_cpu_and_travels_with_checkpoints() {
    use beit::model::MimTarget;
    use beit::train::gpu_pretrain::Precision;
    let pixels = TrainerOptions { mim_target: MimTarget::Pixels, ..options() };
    // CONFIG's head has 64 outputs; 4x4 grey patches need 16.
    let err = Trainer::new(Model::new_random(config(), Architecture::MaskedImageModeling, 1).unwrap(), pixels.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab_size = patch 4x4 x 1 channels = 16") && err.contains("vocab_size 64"), "{err}");
    let cfg16 = BeitConfig { vocab_size: 16, ..config() };
    let model = || Model::new_random(cfg16.clone(), Architecture::MaskedImageModeling, 1).unwrap();
    let mut t = Trainer::new(model(), pixels.clone()).unwrap();
    // Refused before any GPU work (so without a GPU too), leaving a CPU trainer.
    let err = t.use_cuda(Precision::Bf16).unwrap_err();
    assert!(
        matches!(err, beit::Error::Unsupported(_)) && err.to_string().contains("visual-token target only"),
        "{err}"
    );
    assert_eq!(t.cuda_precision(), None);

    // Labels are not read: a batch without any trains the same as one with them.
    let batch = data().batch(0, 4);
    let unlabelled = OwnedMimBatch { labels: Vec::new(), ..batch.clone() };
    let mut u = Trainer::new(model(), pixels.clone()).unwrap();
    assert_eq!(
        t.step(&batch.as_batch()).unwrap().loss.to_bits(),
        u.step(&unlabelled.as_batch()).unwrap().loss.to_bits()
    );

    // A checkpoint brings its target: loaded into a token trainer of the same config, the
    // trainer continues with pixels exactly as the saved one does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pixels.safetensors");
    t.save_checkpoint(&path).unwrap();
    let mut tokens = Trainer::new(model(), options()).unwrap();
    tokens.load_checkpoint(&path).unwrap();
    assert_eq!(tokens.options().mim_target, MimTarget::Pixels);
    let mut resumed = Trainer::from_checkpoint(&path).unwrap();
    let next = data().batch(1, 4);
    let want = t.step(&next.as_batch()).unwrap().loss.to_bits();
    assert_eq!(tokens.step(&next.as_batch()).unwrap().loss.to_bits(), want);
    assert_eq!(resumed.step(&next.as_batch()).unwrap().loss.to_bits(), want);
    assert_eq!(param_bits(&resumed), param_bits(&t));
}
