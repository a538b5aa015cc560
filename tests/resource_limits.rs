//! The resource model of the model's passes (src/resources.rs): inference, training and
//! segmentation passes whose memory does not fit the budget are refused before anything is
//! allocated, with a message that names the need, the budget and how to run the input in pieces;
//! what fits still runs; a refused trainer step leaves the trainer as it was; non-finite weights
//! are refused at load with the tensor's name.

use beit::resources::{with_budget, MemoryBudget};
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Context, ContextOptions, Device, Error, ImageBatch, Model};

/// A small config at `image` pixels with `extra` JSON fields appended.
fn config_at(image: usize, extra: &str) -> BeitConfig {
    BeitConfig::from_json_str(&format!(
        r#"{{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "image_size": {image}, "patch_size": 4, "num_channels": 1, "vocab_size": 40, "use_mask_token": true,
            "use_shared_relative_position_bias": true {extra}}}"#
    ))
    .unwrap()
}

fn config(extra: &str) -> BeitConfig {
    config_at(16, extra)
}

fn pixels(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn message(e: &Error) -> &str {
    e.message()
}

#[test]
fn an_image_whose_attention_needs_terabytes_is_refused_before_allocation() {
    let m = Model::new_random(config(""), Architecture::MaskedImageModeling, 0).unwrap();
    // 4096x4096 grey pixels with 4x4 patches: 1,048,577 tokens, attention scores of
    // 4 heads x 1e6 x 1e6 floats (16 TiB) per image. The pixels themselves are 64 MiB.
    let px = vec![0.25f32; 4096 * 4096];
    let input = ImageBatch { pixels: &px, batch: 1, channels: 1, height: 4096, width: 4096, bool_masked_pos: None };
    let err = m.forward(&input).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let msg = message(&err);
    assert!(msg.contains("1 images of 4096x4096 pixels (1048577 tokens each)"), "{msg}");
    assert!(msg.contains("TiB, more than the memory available to this process"), "{msg}");
    assert!(msg.contains("tiles of the model's image size"), "{msg}");
    // The model still works at its own size.
    let px = pixels(2 * 16 * 16);
    let ok = ImageBatch { pixels: &px, batch: 2, channels: 1, height: 16, width: 16, bool_masked_pos: None };
    assert_eq!(m.forward(&ok).unwrap().logits.unwrap().shape, vec![2, 16, 40]);
}

#[test]
fn a_context_budget_applies_to_the_passes_run_on_it() {
    let m = Model::new_random(config(""), Architecture::MaskedImageModeling, 0).unwrap();
    let px = pixels(64 * 16 * 16);
    let input = ImageBatch { pixels: &px, batch: 64, channels: 1, height: 16, width: 16, bool_masked_pos: None };
    let small = Context::new(&ContextOptions {
        device: Device::Cpu,
        threads: 2,
        memory_budget: Some(MemoryBudget::Bytes(256 << 10)),
        ..Default::default()
    })
    .unwrap();
    let err = small.run(|| m.forward(&input)).unwrap_err();
    let msg = message(&err);
    assert!(msg.contains("the memory budget set for this context (256 KiB)"), "{msg}");
    // Without a budget of its own, a context inherits the caller's.
    let inherit = Context::new(&ContextOptions { device: Device::Cpu, threads: 2, ..Default::default() }).unwrap();
    let err = with_budget(MemoryBudget::Bytes(256 << 10), || inherit.run(|| m.forward(&input))).unwrap_err();
    assert!(message(&err).contains("(256 KiB)"), "{err}");
    // And with room, the same pass runs.
    let roomy = Context::new(&ContextOptions {
        device: Device::Cpu,
        threads: 2,
        memory_budget: Some(MemoryBudget::Bytes(64 << 20)),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(roomy.run(|| m.forward(&input)).unwrap().last_hidden_state.shape, vec![64, 17, 32]);
    // A zero budget is refused when the context is made.
    let zero = ContextOptions {
        device: Device::Cpu,
        threads: 1,
        memory_budget: Some(MemoryBudget::Bytes(0)),
        ..Default::default()
    };
    assert!(matches!(Context::new(&zero), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_trainer_step_beyond_the_budget_is_refused_and_changes_nothing() {
    let model = Model::new_random(config(""), Architecture::MaskedImageModeling, 0).unwrap();
    let mut trainer = Trainer::new(model, TrainerOptions { learning_rate: 1e-3, ..Default::default() }).unwrap();
    let before = trainer.model().params().data.clone();
    let b = 512;
    let px = pixels(b * 16 * 16);
    let mask: Vec<u8> = (0..b * 16).map(|i| (i % 3 == 0) as u8).collect();
    let labels: Vec<i64> = (0..b * 16).map(|i| (i % 40) as i64).collect();
    let batch = beit::model::MimBatch {
        pixels: &px,
        batch: b,
        channels: 1,
        height: 16,
        width: 16,
        bool_masked_pos: &mask,
        labels: &labels,
    };
    let ctx = Context::new(&ContextOptions {
        device: Device::Cpu,
        threads: 1,
        memory_budget: Some(MemoryBudget::Bytes(4 << 20)),
        ..Default::default()
    })
    .unwrap();
    let err = ctx.run(|| trainer.step(&batch)).unwrap_err();
    let msg = message(&err);
    assert!(msg.contains("the training activations of a pass over 512 images of 16x16 pixels"), "{msg}");
    assert!(msg.contains("smaller batches"), "{msg}");
    assert_eq!(trainer.step_count(), 0);
    assert_eq!(trainer.model().params().data, before);
    // The same trainer steps on a batch that fits.
    let small = beit::model::MimBatch {
        pixels: &px[..4 * 256],
        batch: 4,
        bool_masked_pos: &mask[..4 * 16],
        labels: &labels[..4 * 16],
        ..batch
    };
    ctx.run(|| trainer.step(&small)).unwrap();
    assert_eq!(trainer.step_count(), 1);
}

#[test]
fn a_trainer_whose_optimizer_state_does_not_fit_is_refused() {
    let model = Model::new_random(config(""), Architecture::MaskedImageModeling, 0).unwrap();
    let n = model.params().data.len();
    let err = with_budget(MemoryBudget::Bytes((n * 4 * 3) as u64), || {
        Trainer::new(model, TrainerOptions::default()).unwrap_err()
    });
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(message(&err).contains(&format!("a trainer's optimizer state and gradients (4 buffers of {n} values)")));
}

#[test]
fn a_segmentation_pass_beyond_the_budget_is_refused() {
    let cfg = config_at(
        32,
        r#", "num_labels": 3, "out_indices": [1, 1, 2, 2], "pool_scales": [1, 2],
            "auxiliary_channels": 8"#,
    );
    let m = Model::new_random(cfg, Architecture::SemanticSegmentation, 0).unwrap();
    let px = pixels(4 * 32 * 32);
    let input = ImageBatch { pixels: &px, batch: 4, channels: 1, height: 32, width: 32, bool_masked_pos: None };
    assert!(m.forward(&input).is_ok());
    let err = with_budget(MemoryBudget::Bytes(1 << 20), || m.forward(&input)).unwrap_err();
    assert!(message(&err).contains("the segmentation head over 4 images of 32x32 pixels"), "{err}");
}

#[test]
fn non_finite_weights_are_refused_at_load_with_the_tensors_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Model::new_random(config(""), Architecture::MaskedImageModeling, 0).unwrap();
    let name = "beit.encoder.layer.1.intermediate.dense.weight";
    let id = m.params().find(name).unwrap();
    m.params_mut().get_mut(id)[5] = f32::NAN;
    m.save(dir.path()).unwrap();
    let err = Model::load(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Format(_)), "{err:?}");
    assert!(message(&err).contains(&format!("tensor {name}")) && message(&err).contains("NaN at index 5"), "{err}");
    m.params_mut().get_mut(id)[5] = f32::INFINITY;
    m.save(dir.path()).unwrap();
    assert!(message(&Model::load(dir.path()).unwrap_err()).contains("inf at index 5"));
    m.params_mut().get_mut(id)[5] = 0.5;
    m.save(dir.path()).unwrap();
    Model::load(dir.path()).unwrap();
}
