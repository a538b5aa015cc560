//! Host-fed segmentation fine-tuning on the trainer: the split step (forward_backward_segment,
//! then apply or discard) against the whole step, the BatchNorm running statistics updated once
//! per applied step and never for a discarded one, and a checkpoint taken mid-run that resumes
//! bit for bit (running statistics, drop path state and optimizer included).
//! (That the dataset loop takes exactly these steps is `train::segmentation`'s unit test.)

use beit::model::segmentation::SegBatch;
use beit::train::segmentation::segmenter_from_config;
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Model};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: usize = 3;
const SIZE: usize = 32;

fn segmenter() -> Model {
    let cfg = BeitConfig::from_json_str(
        r#"{"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64, "use_relative_position_bias": true,
            "pool_scales": [1, 2], "auxiliary_channels": 16}"#,
    )
    .unwrap();
    segmenter_from_config(cfg, 3, 5).unwrap()
}

/// Drop path on (so the random state matters), clipping and layer decay as the loop uses them.
fn options() -> TrainerOptions {
    TrainerOptions {
        learning_rate: 1e-3,
        warmup_steps: 2,
        total_steps: 10,
        drop_path_rate: Some(0.2),
        layer_decay: 0.9,
        seed: 4,
        ..TrainerOptions::default()
    }
}

/// Batch `i`: noise pixels, labels in 0..3 with some pixels at the ignore index 255.
fn batch(i: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(100 + i);
    let pixels = (0..B * 3 * SIZE * SIZE).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let labels =
        (0..B * SIZE * SIZE).map(|_| if rng.random_range(0..10) == 0 { 255 } else { rng.random_range(0..3) }).collect();
    (pixels, labels)
}

fn seg<'a>(data: &'a (Vec<f32>, Vec<i64>)) -> SegBatch<'a> {
    SegBatch { pixels: &data.0, batch: B, channels: 3, height: SIZE, width: SIZE, labels: &data.1 }
}

fn bits(t: &Trainer) -> Vec<u32> {
    t.model().params().data.iter().map(|v| v.to_bits()).collect()
}

/// The values of every BatchNorm buffer entry named `*suffix`, concatenated.
fn buffers(t: &Trainer, suffix: &str) -> Vec<f32> {
    let p = t.model().params();
    p.specs
        .iter()
        .filter(|s| s.name.ends_with(suffix))
        .flat_map(|s| p.data[s.offset..s.offset + s.len].to_vec())
        .collect()
}

#[test]
fn split_step_equals_the_step_and_a_discard_changes_nothing() {
    let mut whole = Trainer::new_segmenter(segmenter(), options()).unwrap();
    let mut split = Trainer::for_task(segmenter(), options()).unwrap();
    assert_eq!(split.model().architecture(), Architecture::SemanticSegmentation);
    let fresh = bits(&split);
    let (first, second) = (batch(0), batch(1));

    // A discarded step leaves everything (running statistics, random state) as it was.
    split.forward_backward_segment(&seg(&second)).unwrap();
    assert!(split.step_pending());
    split.discard_gradients();
    assert!(bits(&split) == fresh, "a discarded step changed the parameters or running statistics");
    assert!(buffers(&split, ".num_batches_tracked").iter().all(|&n| n == 0.0));

    for data in [&first, &second] {
        let a = whole.step_segment(&seg(data)).unwrap();
        let pass = split.forward_backward_segment(&seg(data)).unwrap();
        let b = split.apply_gradients().unwrap();
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        assert_eq!(pass.loss.to_bits(), a.loss.to_bits());
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
        assert!(bits(&whole) == bits(&split), "split step differs from the whole step at step {}", a.step);
    }
    // One running update per applied step: PyTorch counts them in num_batches_tracked, and
    // the running mean moved away from its initial zeros.
    let tracked = buffers(&whole, ".num_batches_tracked");
    assert!(!tracked.is_empty() && tracked.iter().all(|&n| n == 2.0), "{tracked:?}");
    assert!(buffers(&whole, ".running_mean").iter().any(|&m| m != 0.0));

    // A bad batch is refused and changes nothing.
    let one = batch(2);
    let short = SegBatch { batch: 1, pixels: &one.0[..3 * SIZE * SIZE], labels: &one.1[..SIZE * SIZE], ..seg(&one) };
    let before = bits(&whole);
    let err = whole.step_segment(&short).unwrap_err().to_string();
    assert!(err.contains("at least 2 images"), "{err}");
    let mut bad = batch(3);
    bad.1[7] = 3;
    let err = whole.step_segment(&seg(&bad)).unwrap_err().to_string();
    assert!(err.contains("label 3 at pixel 7"), "{err}");
    assert!(bits(&whole) == before && whole.step_count() == 2);
}

#[test]
fn a_checkpoint_mid_run_resumes_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("beit-seg-trainer-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mid.safetensors");
    let batches: Vec<_> = (0..5).map(batch).collect();

    let mut straight = Trainer::new_segmenter(segmenter(), options()).unwrap();
    for (i, data) in batches.iter().enumerate() {
        if i == 2 {
            straight.save_checkpoint(&path).unwrap();
        }
        straight.step_segment(&seg(data)).unwrap();
    }

    // From the checkpoint alone, and into a trainer of the same model at step 0.
    let mut restored = Trainer::from_checkpoint(&path).unwrap();
    let mut loaded = Trainer::new_segmenter(segmenter(), options()).unwrap();
    loaded.load_checkpoint(&path).unwrap();
    for t in [&mut restored, &mut loaded] {
        assert_eq!(t.step_count(), 2);
        assert!(buffers(t, ".num_batches_tracked").iter().all(|&n| n == 2.0), "the checkpoint holds the counts");
        for data in &batches[2..] {
            t.step_segment(&seg(data)).unwrap();
        }
        assert!(bits(t) == bits(&straight), "the resumed run differs from the straight one");
        assert_eq!(t.rng_state(), straight.rng_state());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
