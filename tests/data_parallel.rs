//! The data-parallel pretraining pass (`Model::mim_forward_backward_data_parallel`, what
//! `Trainer::step` runs with several threads): the same loss and gradients as the whole-batch
//! pass within float rounding (odd batches, uneven shards, a shard without masked positions,
//! drop path; for both MIM targets: the config's head, 16 outputs for 4x4 grey patches, fits
//! the pixel target too), bit-identical results for a given thread count, and trainers that stay
//! deterministic and resume bit for bit on it.

use beit::data::batch::OwnedMimBatch;
use beit::data::synthetic::SyntheticMim;
use beit::model::{DataParallelWorkspace, DropPath, MimTarget, TrainWorkspace};
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Model};

const CONFIG: &str = r#"{"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
    "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1, "vocab_size": 16,
    "use_mask_token": true, "use_shared_relative_position_bias": true, "use_relative_position_bias": true,
    "layer_scale_init_value": 0.1, "drop_path_rate": 0.2}"#;
const LAYERS: usize = 3;
const PATCHES: usize = 16;

fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}

/// A random model whose biases and tables are nonzero too (so every gradient path carries
/// signal), and a batch of `b` images; image 0 has no masked patch.
fn model_and_batch(b: usize) -> (Model, OwnedMimBatch) {
    let mut model =
        Model::new_random(BeitConfig::from_json_str(CONFIG).unwrap(), Architecture::MaskedImageModeling, 3).unwrap();
    let mut state = 5u64;
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for v in model.params_mut().data.iter_mut() {
        *v += 0.05 * uniform();
    }
    let pixels: Vec<f32> = (0..b * 16 * 16).map(|_| 2.0 * uniform()).collect();
    let bool_masked_pos: Vec<u8> = (0..b * PATCHES).map(|i| (i >= PATCHES && i % 3 == 0) as u8).collect();
    let labels: Vec<i64> = (0..b * PATCHES).map(|i| ((i * 7) % 16) as i64).collect();
    (model, OwnedMimBatch { shape: [b, 1, 16, 16], pixels, bool_masked_pos, labels })
}

/// Drop path factors `[layers, 2, b]` with some branches dropped (0) and the others rescaled.
fn drop_factors(b: usize) -> Vec<f32> {
    (0..LAYERS * 2 * b).map(|i| if i % 5 == 2 { 0.0 } else { 1.25 }).collect()
}

const TARGETS: [MimTarget; 2] = [MimTarget::VisualTokens, MimTarget::Pixels];

fn whole_pass(model: &Model, batch: &OwnedMimBatch, target: MimTarget, factors: &[f32]) -> (f64, Vec<f32>) {
    let mut grads = vec![0.0f32; model.params().data.len()];
    let drop = Some(DropPath { factors });
    let loss = in_pool(1, || {
        model.mim_forward_backward(&mut TrainWorkspace::new(), &batch.as_batch(), target, drop, &mut grads)
    })
    .unwrap();
    (loss, grads)
}

/// The data-parallel pass in a pool of `threads`; asserts it ran `shards` shards.
fn split_pass(
    model: &Model,
    dp: &mut DataParallelWorkspace,
    (threads, shards): (usize, usize),
    batch: &OwnedMimBatch,
    target: MimTarget,
    factors: &[f32],
) -> (f64, Vec<f32>) {
    let mut grads = vec![0.0f32; model.params().data.len()];
    let drop = Some(DropPath { factors });
    let loss =
        in_pool(threads, || model.mim_forward_backward_data_parallel(dp, &batch.as_batch(), target, drop, &mut grads))
            .unwrap();
    assert_eq!(dp.last_shards(), shards, "{threads} threads, {} images, {target}", batch.shape[0]);
    (loss, grads)
}

#[test]
fn split_pass_equals_the_whole_batch_pass() {
    // 5 images over 2 threads (shards of 2 and 3) and 3 threads (1, 2, 2: the first shard has
    // no masked patch); 4 images over 4 threads (one image each); 3 images over 4 threads (3
    // shards, the first with a pool of 2 threads).
    for (target, (b, threads, shards)) in
        TARGETS.into_iter().flat_map(|t| [(5, 2, 2), (5, 3, 3), (4, 4, 4), (3, 4, 3)].map(|c| (t, c)))
    {
        let (model, batch) = model_and_batch(b);
        let factors = drop_factors(b);
        let (want_loss, want) = whole_pass(&model, &batch, target, &factors);
        let (loss, got) =
            split_pass(&model, &mut DataParallelWorkspace::new(), (threads, shards), &batch, target, &factors);
        assert!(
            (loss - want_loss).abs() <= 1e-6 * want_loss,
            "{b} images, {threads} threads, {target}: {loss} vs {want_loss}"
        );
        let mut without_gradient = Vec::new();
        for spec in &model.params().specs {
            let range = spec.offset..spec.offset + spec.len;
            let norm = want[range.clone()].iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let diff =
                got[range.clone()].iter().zip(&want[range]).map(|(&a, &b)| (a - b).abs() as f64).fold(0.0, f64::max);
            assert!(
                diff <= 1e-5 * norm,
                "{b} images, {threads} threads, {target}: {}: max diff {diff:e}, norm {norm:e}",
                spec.name
            );
            if norm == 0.0 {
                without_gradient.push(spec.name.clone());
            }
        }
        // The comparison is not vacuous: every tensor but the fixed key biases has gradient.
        assert!(without_gradient.iter().all(|n| n.ends_with("attention.key.bias")), "{without_gradient:?}");
        assert_eq!(without_gradient.len(), LAYERS);
    }
}

#[test]
fn split_pass_adds_into_the_buffer_and_is_deterministic() {
    let (model, batch) = model_and_batch(5);
    let factors = drop_factors(5);
    let mut dp = DataParallelWorkspace::new();
    let (l1, g1) = split_pass(&model, &mut dp, (2, 2), &batch, MimTarget::VisualTokens, &factors);
    // Reusing the workers, or fresh ones: the same bits.
    let (l2, g2) = split_pass(&model, &mut dp, (2, 2), &batch, MimTarget::VisualTokens, &factors);
    let (l3, g3) =
        split_pass(&model, &mut DataParallelWorkspace::new(), (2, 2), &batch, MimTarget::VisualTokens, &factors);
    assert_eq!((l1.to_bits(), l1.to_bits()), (l2.to_bits(), l3.to_bits()));
    let bits = |g: &[f32]| g.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&g1), bits(&g2));
    assert_eq!(bits(&g1), bits(&g3));
    // A second pass into the same buffer adds (the shard buffers are cleared between passes).
    let mut g = g1.clone();
    in_pool(2, || {
        model.mim_forward_backward_data_parallel(
            &mut dp,
            &batch.as_batch(),
            MimTarget::VisualTokens,
            Some(DropPath { factors: &factors }),
            &mut g,
        )
    })
    .unwrap();
    for (i, (&a, &b)) in g.iter().zip(&g1).enumerate() {
        assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1e-3), "element {i}: {a} vs 2·{b}");
    }
}

#[test]
fn one_shard_is_the_whole_batch_pass_bit_for_bit() {
    // One thread: one shard.
    let (model, batch) = model_and_batch(5);
    let factors = drop_factors(5);
    for target in TARGETS {
        let (want_loss, want) = whole_pass(&model, &batch, target, &factors);
        let (loss, got) = split_pass(&model, &mut DataParallelWorkspace::new(), (1, 1), &batch, target, &factors);
        assert_eq!(loss.to_bits(), want_loss.to_bits(), "{target}");
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{target}");
    }

    // A model whose gradient buffer outweighs the batch's activations (a 4096-token head, 2
    // images) stays whole on 2 threads: a second gradient buffer would more than double the
    // memory.
    let big_head = CONFIG.replace(r#""vocab_size": 16"#, r#""vocab_size": 4096"#);
    let model =
        Model::new_random(BeitConfig::from_json_str(&big_head).unwrap(), Architecture::MaskedImageModeling, 3).unwrap();
    let batch = model_and_batch(2).1;
    let tokens = MimTarget::VisualTokens;
    let (want_loss, want) = whole_pass(&model, &batch, tokens, &drop_factors(2));
    let mut dp = DataParallelWorkspace::new();
    let (loss, got) = split_pass(&model, &mut dp, (2, 1), &batch, tokens, &drop_factors(2));
    assert_eq!(loss.to_bits(), want_loss.to_bits());
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn split_pass_refuses_bad_input() {
    let (model, batch) = model_and_batch(4);
    let mut dp = DataParallelWorkspace::new();
    let mut grads = vec![0.0f32; model.params().data.len()];
    let short = vec![1.0f32; LAYERS * 2 * 3];
    let err = in_pool(2, || {
        model.mim_forward_backward_data_parallel(
            &mut dp,
            &batch.as_batch(),
            MimTarget::VisualTokens,
            Some(DropPath { factors: &short }),
            &mut grads,
        )
    })
    .unwrap_err();
    assert!(err.to_string().contains("drop path factors"), "{err}");
    let mut wrong = vec![0.0f32; 7];
    let err = in_pool(2, || {
        model.mim_forward_backward_data_parallel(&mut dp, &batch.as_batch(), MimTarget::VisualTokens, None, &mut wrong)
    })
    .unwrap_err();
    assert!(err.to_string().contains("gradient buffer"), "{err}");
    assert!(grads.iter().all(|&g| g == 0.0));
}

fn trainer() -> Trainer {
    let model = Model::new_random(BeitConfig::from_json_str(CONFIG).unwrap(), Architecture::MaskedImageModeling, 1);
    let options =
        TrainerOptions { learning_rate: 2e-3, warmup_steps: 2, total_steps: 20, seed: 9, ..Default::default() };
    Trainer::new(model.unwrap(), options).unwrap()
}

/// `steps` trainer steps of 5 images each in a pool of `threads`; the loss bits.
fn run(t: &mut Trainer, threads: usize, steps: usize) -> Vec<u64> {
    let data = SyntheticMim::for_config(&BeitConfig::from_json_str(CONFIG).unwrap(), 6, 4);
    in_pool(threads, || {
        (0..steps)
            .map(|_| {
                let batch = data.batch(t.data_position(), 5);
                t.step(&batch.as_batch()).unwrap().loss.to_bits()
            })
            .collect()
    })
}

fn param_bits(t: &Trainer) -> Vec<u32> {
    t.model().params().data.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn split_trainer_is_deterministic_resumes_bit_for_bit_and_follows_the_serial_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    for threads in [2, 3] {
        let (mut a, mut b) = (trainer(), trainer());
        let la = run(&mut a, threads, 6);
        assert_eq!(run(&mut b, threads, 3), la[..3]);
        b.save_checkpoint(&path).unwrap();
        let mut resumed = Trainer::from_checkpoint(&path).unwrap();
        assert_eq!(run(&mut resumed, threads, 3), la[3..], "{threads} threads");
        assert_eq!(param_bits(&resumed), param_bits(&a), "{threads} threads");

        // The one-thread trainer runs the whole-batch pass: the same trajectory up to rounding.
        let mut serial = trainer();
        let ls = run(&mut serial, 1, 6);
        for (i, (&x, &y)) in la.iter().zip(&ls).enumerate() {
            let (x, y) = (f64::from_bits(x), f64::from_bits(y));
            assert!((x - y).abs() <= 1e-4 * y, "step {i}, {threads} threads: {x} vs serial {y}");
        }
    }
}
