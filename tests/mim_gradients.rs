//! The MIM training pass against PyTorch: loss and every parameter gradient of the five cases
//! in tests/reference_grads (scripts/gen_grad_reference.py, HF BeitForMaskedImageModeling), and
//! three AdamW steps with weight decay against torch.optim.AdamW's parameters.

mod common;
use std::path::{Path, PathBuf};

use beit::data::batch::OwnedMimBatch;
use beit::model::io::{read_f32, SafetensorsFile};
use beit::model::{DataParallelWorkspace, MimTarget, TrainWorkspace};
use beit::train::adamw::{AdamW, AdamWConfig};
use beit::Model;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_grads").join(name)
}

/// Loss and gradients of a case, on a fresh gradient buffer.
fn run_case(model: &Model, batch: &OwnedMimBatch) -> (f64, Vec<f32>) {
    let mut grads = vec![0.0f32; model.params().data.len()];
    let mut ws = TrainWorkspace::new();
    let loss =
        model.mim_forward_backward(&mut ws, &batch.as_batch(), MimTarget::VisualTokens, None, &mut grads).unwrap();
    (loss, grads)
}

/// The same, split data-parallel over a pool of `threads` (what the trainer runs then).
fn run_case_data_parallel(model: &Model, batch: &OwnedMimBatch, threads: usize) -> (f64, Vec<f32>) {
    let mut grads = vec![0.0f32; model.params().data.len()];
    let mut dp = DataParallelWorkspace::new();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let loss = pool
        .install(|| {
            model.mim_forward_backward_data_parallel(
                &mut dp,
                &batch.as_batch(),
                MimTarget::VisualTokens,
                None,
                &mut grads,
            )
        })
        .unwrap();
    assert_eq!(dp.last_shards(), threads, "the pass did not split");
    (loss, grads)
}

/// The whole-batch pass and the data-parallel one on 2 threads against torch.
fn check_case(name: &str) {
    let dir = case_dir(name);
    let model = Model::load(&dir).unwrap();
    let batch = OwnedMimBatch::load(&dir.join("batch.safetensors")).unwrap();
    let file = SafetensorsFile::open(&dir.join("grads.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (_, ref_loss) = read_f32(&st, "loss").unwrap().unwrap();
    for (pass, (loss, grads)) in
        [("whole batch", run_case(&model, &batch)), ("data-parallel", run_case_data_parallel(&model, &batch, 2))]
    {
        assert!((loss - ref_loss[0] as f64).abs() < 1e-5, "{name}, {pass}: loss {loss} vs torch {}", ref_loss[0]);
        let p = model.params();
        let (checked, worst_rel, worst_name) = common::check_param_grads(name, p, &grads, &st);
        // Every tensor in the reference was compared (the internal key bias is not exported).
        assert_eq!(checked, st.names().len() - 1, "{name}: tensors compared");
        eprintln!(
            "{name}, {pass}: loss {loss:.7} (torch {:.7}); worst gradient {:.2e} of its norm ({})",
            ref_loss[0], worst_rel, worst_name
        );
    }
}

#[test]
fn gradients_equal_torch_shared_bias_and_layer_scale() {
    check_case("shared_scale");
}

#[test]
fn gradients_equal_torch_per_layer_bias_without_layer_scale() {
    check_case("layer_rel_noscale");
}

#[test]
fn gradients_equal_torch_absolute_positions_and_final_layernorm() {
    check_case("abs_cls");
}

#[test]
fn gradients_equal_torch_all_position_kinds_grey() {
    check_case("all_pos_grey");
}

/// layer_norm_eps 1e-2 with per-token variance of the order of eps at the LayerNorms: eps 1e-12
/// at any one LayerNorm moves loss or gradients by 78 to 8000 tolerances, eps ignored or outside
/// the square root everywhere by thousands (the case's case.json).
#[test]
fn gradients_equal_torch_large_layer_norm_eps_final_layernorm() {
    check_case("eps_final_ln");
}

#[test]
fn three_adamw_steps_equal_torch() {
    let dir = case_dir("shared_scale");
    let mut model = Model::load(&dir).unwrap();
    let batch = OwnedMimBatch::load(&dir.join("batch.safetensors")).unwrap();
    let file = SafetensorsFile::open(&dir.join("adamw_steps.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (_, losses) = read_f32(&st, "losses").unwrap().unwrap();
    // The reference decays every parameter (one group); mirror that with an all-ones mask.
    let n = model.params().data.len();
    let trained: Vec<(usize, usize)> =
        model.params().specs.iter().filter(|s| s.exported).map(|s| (s.offset, s.len)).collect();
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let mut opt = AdamW::with_mask(config, vec![1.0; n], trained);
    for (step, &want) in losses.iter().enumerate() {
        let (loss, grads) = run_case(&model, &batch);
        assert!((loss - want as f64).abs() < 1e-5, "step {step}: loss {loss} vs torch {want}");
        opt.step(&mut model.params_mut().data, &grads, 1e-3, None);
    }
    let p = model.params();
    for spec in p.specs.iter().filter(|s| s.exported) {
        let (_, want) = read_f32(&st, &spec.name).unwrap().unwrap();
        let got = &p.data[spec.offset..spec.offset + spec.len];
        for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{}[{i}]: {a} vs torch {b}", spec.name);
        }
    }
}

#[test]
fn gradients_are_deterministic_and_accumulate() {
    let dir = case_dir("all_pos_grey");
    let model = Model::load(&dir).unwrap();
    let batch = OwnedMimBatch::load(&dir.join("batch.safetensors")).unwrap();
    let (l1, g1) = run_case(&model, &batch);
    let (l2, g2) = run_case(&model, &batch);
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
    // A second pass into the same buffer adds: twice the gradient (up to rounding, since a
    // GEMM adds its k-blocks into the buffer one by one).
    let mut g = g1.clone();
    let mut ws = TrainWorkspace::new();
    model.mim_forward_backward(&mut ws, &batch.as_batch(), MimTarget::VisualTokens, None, &mut g).unwrap();
    for (i, (&a, &b)) in g.iter().zip(&g1).enumerate() {
        assert!((a - 2.0 * b).abs() <= 1e-6 * b.abs().max(1e-3), "element {i}: {a} vs 2·{b}");
    }
}

/// A small random MIM model with layer scale and a shared bias, and a random batch.
fn small_model_and_batch() -> (Model, OwnedMimBatch) {
    let cfg = beit::BeitConfig::from_json_str(
        r#"{"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
            "image_size": 16, "patch_size": 4, "num_channels": 1, "vocab_size": 16,
            "use_shared_relative_position_bias": true, "use_relative_position_bias": true,
            "layer_scale_init_value": 0.1}"#,
    )
    .unwrap();
    let mut model = Model::new_random(cfg, beit::Architecture::MaskedImageModeling, 7).unwrap();
    // Random init zeroes biases and tables; give them values so every path carries gradient.
    let mut state = 1u64;
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for v in model.params_mut().data.iter_mut() {
        *v += 0.05 * uniform();
    }
    let (b, n) = (3, 16);
    let pixels: Vec<f32> = (0..b * 16 * 16).map(|_| 2.0 * uniform()).collect();
    let bool_masked_pos: Vec<u8> = (0..b * n).map(|i| (i % 3 == 0) as u8).collect();
    let labels: Vec<i64> = (0..b * n).map(|i| ((i * 7) % 16) as i64).collect();
    (model, OwnedMimBatch { shape: [b, 1, 16, 16], pixels, bool_masked_pos, labels })
}

#[test]
fn drop_path_gradient_matches_finite_differences() {
    use beit::model::DropPath;
    let (mut model, batch) = small_model_and_batch();
    let layers = 3;
    // Drop some branches (factor 0), keep the others rescaled by 1/keep (keep = 0.8).
    let factors: Vec<f32> = (0..layers * 2 * 3).map(|i| if i % 4 == 1 { 0.0 } else { 1.25 }).collect();
    let dp = Some(DropPath { factors: &factors });
    let mut ws = TrainWorkspace::new();
    let mut grads = vec![0.0f32; model.params().data.len()];
    model.mim_forward_backward(&mut ws, &batch.as_batch(), MimTarget::VisualTokens, dp, &mut grads).unwrap();

    // Directional derivative along the gradient of the encoder blocks only (what drop path
    // touches), against central differences of the loss.
    let mut dir = vec![0.0f32; grads.len()];
    for s in model.params().specs.iter().filter(|s| s.exported && s.name.contains("encoder.layer.")) {
        dir[s.offset..s.offset + s.len].copy_from_slice(&grads[s.offset..s.offset + s.len]);
    }
    let norm = dir.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
    dir.iter_mut().for_each(|v| *v /= norm as f32);
    let analytic: f64 = dir.iter().zip(&grads).map(|(&u, &g)| u as f64 * g as f64).sum();
    let h = 2e-2f32;
    let base = model.params().data.clone();
    let mut loss_at = |sign: f32| {
        for ((p, &b), &u) in model.params_mut().data.iter_mut().zip(&base).zip(&dir) {
            *p = b + sign * h * u;
        }
        let mut g = vec![0.0f32; base.len()];
        model.mim_forward_backward(&mut ws, &batch.as_batch(), MimTarget::VisualTokens, dp, &mut g).unwrap()
    };
    let fd = (loss_at(1.0) - loss_at(-1.0)) / (2.0 * h as f64);
    let rel = (fd - analytic).abs() / analytic.abs();
    eprintln!("drop path: directional derivative {analytic:.6}, finite differences {fd:.6}, rel err {rel:.2e}");
    assert!(rel < 2e-3, "analytic {analytic} vs finite differences {fd}");
}

#[test]
fn drop_path_of_ones_is_the_plain_pass() {
    use beit::model::DropPath;
    let (model, batch) = small_model_and_batch();
    let ones = vec![1.0f32; 3 * 2 * 3];
    let mut ws = TrainWorkspace::new();
    let (mut g1, mut g2) = (vec![0.0f32; model.params().data.len()], vec![0.0f32; model.params().data.len()]);
    let l1 = model.mim_forward_backward(&mut ws, &batch.as_batch(), MimTarget::VisualTokens, None, &mut g1).unwrap();
    let l2 = model
        .mim_forward_backward(
            &mut ws,
            &batch.as_batch(),
            MimTarget::VisualTokens,
            Some(DropPath { factors: &ones }),
            &mut g2,
        )
        .unwrap();
    // The forward is the same arithmetic (λ·1 = λ); the backward sums λ's gradient image by
    // image instead of in one pass, so it may differ in the last bits.
    assert_eq!(l1.to_bits(), l2.to_bits());
    for (i, (&a, &b)) in g1.iter().zip(&g2).enumerate() {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "element {i}: {a} vs {b}");
    }
}

// The pixel-regression target (BEiT's "−visual tokens" ablation). `small_model_and_batch`'s head
// has 16 outputs, one per value of its 4x4 grey patches, so the same model serves it.

/// The pixel target of masked patch `patch` of image `img`, read straight from the image in
/// (channel, row, column) order: `[C·ph·pw]`.
fn patch_pixels(batch: &OwnedMimBatch, (ph, pw): (usize, usize), img: usize, patch: usize) -> Vec<f64> {
    let [_, c, h, w] = batch.shape;
    let (gy, gx) = (patch / (w / pw), patch % (w / pw));
    let mut out = Vec::with_capacity(c * ph * pw);
    for ch in 0..c {
        for y in 0..ph {
            for x in 0..pw {
                out.push(batch.pixels[((img * c + ch) * h + gy * ph + y) * w + gx * pw + x] as f64);
            }
        }
    }
    out
}

#[test]
fn pixel_gradients_match_finite_differences() {
    let (mut model, batch) = small_model_and_batch();
    let pixels = MimTarget::Pixels;
    let mut ws = TrainWorkspace::new();
    let mut grads = vec![0.0f32; model.params().data.len()];
    let loss = model.mim_forward_backward(&mut ws, &batch.as_batch(), pixels, None, &mut grads).unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    let mut loss_with = |model: &mut Model, index: usize, value: f32| {
        let saved = std::mem::replace(&mut model.params_mut().data[index], value);
        let mut g = vec![0.0f32; grads.len()];
        let l = model.mim_forward_backward(&mut ws, &batch.as_batch(), pixels, None, &mut g).unwrap();
        model.params_mut().data[index] = saved;
        l
    };
    // The two largest-gradient elements of tensors from the input to the head.
    let tensors = [
        "beit.embeddings.patch_embeddings.projection.weight",
        "beit.embeddings.patch_embeddings.projection.bias",
        "beit.embeddings.mask_token",
        "beit.encoder.relative_position_bias.relative_position_bias_table",
        "beit.encoder.layer.0.attention.attention.query.weight",
        "beit.encoder.layer.1.intermediate.dense.weight",
        "beit.encoder.layer.2.lambda_2",
        "layernorm.weight",
        "lm_head.weight",
        "lm_head.bias",
    ];
    let h = 1e-2f32;
    let mut checked = 0;
    for name in tensors {
        let id = model.params().find(name).unwrap_or_else(|| panic!("no parameter {name}"));
        let spec = model.params().specs[id.0].clone();
        let mut order: Vec<usize> = (spec.offset..spec.offset + spec.len).collect();
        order.sort_by(|&a, &b| grads[b].abs().total_cmp(&grads[a].abs()));
        for &i in &order[..2] {
            let p = model.params().data[i];
            // Central differences of the f64 losses; the perturbed values are exact in f32.
            let (up, down) = (p + h, p - h);
            let fd = (loss_with(&mut model, i, up) - loss_with(&mut model, i, down)) / (up as f64 - down as f64);
            let g = grads[i] as f64;
            let err = (fd - g).abs();
            eprintln!("{name}[{}]: analytic {g:.6e}, finite differences {fd:.6e}", i - spec.offset);
            assert!(g != 0.0, "{name}: no gradient");
            assert!(
                err <= 1e-2 * g.abs() + 1e-7,
                "{name}[{}]: analytic {g} vs finite differences {fd}",
                i - spec.offset
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * tensors.len());
}

#[test]
fn pixel_loss_of_a_constant_head_is_the_hand_computed_mean_squared_error() {
    // Two channels and 2x4 patches (so the (channel, row, column) order is not symmetric):
    // 2·2·4 = 16 outputs. With lm_head's weight zero every prediction is its bias b, so
    // loss = mean over masked patches of mean_j (b_j − t_j)², and dL/db_j = mean over masked
    // patches of 2(b_j − t_j)/16.
    let cfg = beit::BeitConfig::from_json_str(
        r#"{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "image_size": 8, "patch_size": [2, 4], "num_channels": 2, "vocab_size": 16,
            "use_mask_token": true, "use_shared_relative_position_bias": true}"#,
    )
    .unwrap();
    let (ph, pw, k) = (2, 4, 16);
    let mut model = Model::new_random(cfg.clone(), beit::Architecture::MaskedImageModeling, 5).unwrap();
    let weight = model.params().find("lm_head.weight").unwrap();
    model.params_mut().get_mut(weight).fill(0.0);
    let bias: Vec<f32> = (0..k).map(|j| 0.1 * j as f32 - 0.7).collect();
    let bias_id = model.params().find("lm_head.bias").unwrap();
    model.params_mut().get_mut(bias_id).copy_from_slice(&bias);

    let (b, n) = (2, 8); // 4x2 patches of 2x4 pixels
    let pixels: Vec<f32> = (0..b * 2 * 8 * 8).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let bool_masked_pos: Vec<u8> = (0..b * n).map(|i| u8::from(i % 3 != 1)).collect();
    // Labels are not read by the pixel target: empty is fine.
    let batch = OwnedMimBatch { shape: [b, 2, 8, 8], pixels, bool_masked_pos, labels: Vec::new() };

    let (mut want_loss, mut want_db) = (0.0f64, vec![0.0f64; k]);
    let masked: Vec<usize> = (0..b * n).filter(|&i| batch.bool_masked_pos[i] == 1).collect();
    for &i in &masked {
        let target = patch_pixels(&batch, (ph, pw), i / n, i % n);
        for j in 0..k {
            let err = bias[j] as f64 - target[j];
            want_loss += err * err / (k * masked.len()) as f64;
            want_db[j] += 2.0 * err / (k * masked.len()) as f64;
        }
    }
    let mut grads = vec![0.0f32; model.params().data.len()];
    let loss =
        model.mim_forward_backward(&mut TrainWorkspace::new(), &batch.as_batch(), MimTarget::Pixels, None, &mut grads);
    let loss = loss.unwrap();
    assert!((loss - want_loss).abs() <= 1e-6 * want_loss, "loss {loss} vs hand {want_loss}");
    let spec = &model.params().specs[bias_id.0];
    for (j, (&got, &want)) in grads[spec.offset..spec.offset + spec.len].iter().zip(&want_db).enumerate() {
        assert!((got as f64 - want).abs() <= 1e-6, "dL/db[{j}]: {got} vs hand {want}");
    }

    // A head of another width is refused with the size it needs; the token target still takes it.
    let wide =
        Model::new_random(beit::BeitConfig { vocab_size: 17, ..cfg }, beit::Architecture::MaskedImageModeling, 5)
            .unwrap();
    let mut g = vec![0.0f32; wide.params().data.len()];
    let err = wide
        .mim_forward_backward(&mut TrainWorkspace::new(), &batch.as_batch(), MimTarget::Pixels, None, &mut g)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocab_size = patch 2x4 x 2 channels = 16"), "{err}");
    assert!(g.iter().all(|&v| v == 0.0));
}
