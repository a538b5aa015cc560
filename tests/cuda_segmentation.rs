//! Segmentation on the GPU against the CPU: inference (`GpuInference` on a
//! `BeitForSemanticSegmentation`: the backbone and the UperNet/FCN head in one device arena), the
//! training pass (`GpuPretrainer::segment_forward_backward`: loss, every gradient, the BatchNorm
//! batch statistics) and whole fine-tuning runs (`train::segmentation::finetune` and
//! `evaluate_on` with `Device::Cuda`), each against the CPU pass, which tests/segmentation_parity.rs
//! checks against Hugging Face. GPU tests are `#[ignore = "needs a CUDA GPU"]`; scripts/cuda-mock
//! runs them against the mock CUDA stack.
//!
//! Tolerances (fp32 on both sides, another summation order): outputs and losses 1e-5 relative;
//! each gradient 1e-5 of its norm; a fine-tuning run's parameter updates 1e-3 of their norm
//! (AdamW divides each gradient by its own running RMS, so elements whose gradient is rounding
//! noise move by up to lr either way: the norm of the whole update is what must agree).

mod gpu_common;

use std::path::Path;

use beit::data::dataset::{Dataset, DatasetSpec, DatasetWriter};
use beit::model::segmentation::SegBatch;
use beit::train::adamw::AdamWConfig;
use beit::train::gpu_inference::GpuInference;
use beit::train::gpu_pretrain::{GpuPretrainer, OptimizerSetup, Precision};
use beit::train::segmentation::{evaluate, evaluate_on, finetune, segmentation_config, SegFinetuneOptions};
use beit::{Architecture, BeitConfig, Device, ImageBatch, Model, OutputBuffers};
use gpu_common::{pixels, rel_err, worst_gradient};

/// Small segmentation configs (head dim 32, a 4x4 patch grid): with and without the auxiliary
/// head, per-layer and shared relative positions, mean and CLS pooling.
const CONFIGS: [(&str, &str); 2] = [
    (
        "per-layer relpos, layer scale, auxiliary head",
        r#"{"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 96,
            "image_size": 16, "patch_size": 4, "num_channels": 3, "use_relative_position_bias": true,
            "layer_scale_init_value": 0.1, "pool_scales": [1, 2], "auxiliary_channels": 16,
            "out_indices": [1, 2, 3, 4]}"#,
    ),
    (
        "shared relpos, no layer scale, final norm, no auxiliary head",
        r#"{"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 96,
            "image_size": 16, "patch_size": 4, "num_channels": 1, "use_shared_relative_position_bias": true,
            "layer_scale_init_value": 0.0, "use_mean_pooling": false, "pool_scales": [1, 2],
            "use_auxiliary_head": false, "out_indices": [1, 2, 3, 3]}"#,
    ),
];
const LABELS: usize = 3;
/// The parameters whose gradient is 0 in exact arithmetic: the biases of the FPN's transposed
/// convolutions, each followed by a training-mode BatchNorm, directly or through a 1x1
/// convolution (a lateral one), which subtracts the batch mean, bias included. Each side's
/// gradient is rounding noise, so they are checked to be ~0, not equal.
const ZERO_BY_BATCHNORM: [&str; 3] = ["fpn1.0.bias", "fpn1.3.bias", "fpn2.0.bias"];
/// The BatchNorms right behind those biases: AdamW moves each bias by ~lr either way on its
/// rounding noise, which shifts the mean these see from the second step on (but not their
/// variance, nor their outputs in training mode).
const MEAN_SHIFTED_BY_NOISE: [&str; 3] = [
    "fpn1.1.running_mean",
    "decode_head.lateral_convs.0.bn.running_mean",
    "decode_head.lateral_convs.1.bn.running_mean",
];

/// A segmentation model of `json` (the same parameters every call).
fn seg_model(json: &str) -> Model {
    let cfg = segmentation_config(BeitConfig::from_json_str(json).unwrap(), LABELS);
    Model::new_random(cfg, Architecture::SemanticSegmentation, 3).unwrap()
}

fn gpu_trainer(model: &Model) -> GpuPretrainer {
    let p = model.params();
    let trained: Vec<(usize, usize)> = p.specs.iter().filter(|s| s.exported).map(|s| (s.offset, s.len)).collect();
    let mask = vec![1.0; p.data.len()];
    let setup = OptimizerSetup { config: AdamWConfig::default(), decay_mask: &mask, trained: &trained, lr_scale: None };
    GpuPretrainer::new(model, Precision::F32, setup).expect("a CUDA GPU")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_segmentation_inference_equals_the_cpu_forward() {
    for (name, json) in CONFIGS {
        let model = seg_model(json);
        let cfg = model.config();
        let (b, c, (h, w)) = (2, cfg.num_channels, cfg.image_size.hw());
        let px = pixels(b * c * h * w, 5);
        let input = ImageBatch { pixels: &px, batch: b, channels: c, height: h, width: w, bool_masked_pos: None };
        let cpu = model.forward(&input).unwrap();
        let mut gpu = GpuInference::new(&model, Precision::F32).expect("a CUDA GPU");
        // Twice: the second pass reuses the planned arena.
        for round in 0..2 {
            let got = gpu.forward(&input).unwrap();
            let logits = rel_err(&got.logits.as_ref().unwrap().data, &cpu.logits.as_ref().unwrap().data);
            let hidden = rel_err(&got.last_hidden_state.data, &cpu.last_hidden_state.data);
            println!("[{name}] round {round}: logits {logits:.2e}, last hidden state {hidden:.2e}");
            assert!(logits <= 1e-5 && hidden <= 1e-5, "[{name}] GPU segmentation off: {logits:.2e} / {hidden:.2e}");
        }
        // Only the logits asked for: the same logits.
        let mut logits = vec![0.0f32; cpu.logits.as_ref().unwrap().data.len()];
        let out = OutputBuffers { last_hidden_state: None, pooler_output: None, logits: Some(&mut logits) };
        gpu.forward_into(&input, out).unwrap();
        assert!(rel_err(&logits, &cpu.logits.as_ref().unwrap().data) <= 1e-5);
        // bf16 has no kernels for the head's image ops: refused, not run.
        let err = GpuInference::new(&model, Precision::Bf16).unwrap_err();
        assert!(err.to_string().contains("fp32"), "{err}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn segmentation_step_equals_the_cpu_pass() {
    for (name, json) in CONFIGS {
        let model = seg_model(json);
        let cfg = model.config().clone();
        let (b, c, (h, w)) = (3, cfg.num_channels, cfg.image_size.hw());
        let px = pixels(b * c * h * w, 9);
        // Every class, and some pixels with the ignore index.
        let ignore = cfg.semantic_loss_ignore_index();
        let labels: Vec<i64> =
            (0..b * h * w).map(|i| if i % 11 == 0 { ignore } else { ((i / 5 + i / 37) % LABELS) as i64 }).collect();
        let batch = SegBatch { pixels: &px, batch: b, channels: c, height: h, width: w, labels: &labels };
        let layers = cfg.num_hidden_layers;
        let factors: Vec<f32> = (0..layers * 2 * b).map(|i| if i % b == 1 { 0.0 } else { 1.25 }).collect();

        let mut ws = beit::model::TrainWorkspace::new();
        let mut cpu_grads = vec![0.0f32; model.params().data.len()];
        let drop = Some(beit::model::DropPath { factors: &factors });
        let cpu = model.segmentation_forward_backward(&mut ws, &batch, drop, &mut cpu_grads).unwrap();

        let mut gpu = gpu_trainer(&model);
        let records = gpu.segment_forward_backward(&batch, Some(&factors)).unwrap();
        let gpu_loss = gpu.loss().unwrap();
        let gpu_grads = gpu.download_grads().unwrap();

        let loss_rel = (gpu_loss - cpu.loss).abs() / cpu.loss.abs();
        let norm_of = |g: &[f32]| g.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let total = norm_of(&cpu_grads);
        for s in model.params().specs.iter().filter(|s| ZERO_BY_BATCHNORM.contains(&s.name.as_str())) {
            // Its gradient is 0 in exact arithmetic: both sides hold rounding noise only.
            let (cg, gg) = (&cpu_grads[s.offset..s.offset + s.len], &gpu_grads[s.offset..s.offset + s.len]);
            let noise = norm_of(cg).max(norm_of(gg)) / total;
            assert!(noise <= 1e-6, "[{name}] {}: gradient {noise:.2e} of the total, not ~0", s.name);
        }
        let worst = worst_gradient(&model, &cpu_grads, &gpu_grads, name, &ZERO_BY_BATCHNORM);
        println!(
            "[{name}] loss cpu {:.6} gpu {gpu_loss:.6} (rel {loss_rel:.2e}); worst gradient {:.2e} ({})",
            cpu.loss, worst.0, worst.1
        );
        assert!(loss_rel <= 1e-5, "[{name}] loss relative error {loss_rel:.2e}");
        assert!(worst.0 <= 1e-5, "[{name}] gradient of {} off by {:.2e} of its norm", worst.1, worst.0);
        assert_eq!(records.len(), cpu.batchnorm.len());
        for (g, c) in records.iter().zip(&cpu.batchnorm) {
            assert_eq!(g.bn.running_mean, c.bn.running_mean);
            let err = rel_err(&g.stats, &c.stats);
            assert!(err <= 1e-5, "[{name}] BatchNorm statistics off by {err:.2e}");
        }

        // The running update on the device equals the host's.
        let mut host = seg_model(json);
        host.apply_batchnorm_statistics(&cpu.batchnorm, 0.1);
        gpu.apply_batchnorm_statistics(&records, 0.1).unwrap();
        let mut device = seg_model(json);
        gpu.download_params(device.params_mut()).unwrap();
        for r in &cpu.batchnorm {
            for id in [r.bn.running_mean, r.bn.running_var, r.bn.num_batches_tracked] {
                let err = rel_err(device.params().get(id), host.params().get(id));
                assert!(err <= 1e-6, "[{name}] running statistics off by {err:.2e}");
            }
        }
    }
}

/// `n` images of `size` pixels, 3 channels, with masks in `0..LABELS` (a bright square of class
/// 1 or 2 on a background of class 0).
fn mask_dataset(path: &Path, n: usize, size: usize) {
    let spec = DatasetSpec {
        height: size as u32,
        width: size as u32,
        channels: 3,
        labels: false,
        masks: true,
        token_grid: None,
    };
    let mut w = DatasetWriter::create(path, spec).unwrap();
    for i in 0..n {
        let mut px: Vec<u8> = (0..size * size * 3).map(|k| (60 + (k * 7 + i * 13) % 80) as u8).collect();
        let mut mask = vec![0u8; size * size];
        let (class, y0, x0) = (1 + i % 2, i % 5, (i * 3) % 6);
        for y in y0..y0 + 8 {
            for x in x0..x0 + 8 {
                mask[y * size + x] = class as u8;
                px[(y * size + x) * 3 + class] = 230;
            }
        }
        w.push(&px, None, Some(&mask), None).unwrap();
    }
    w.finish().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_finetune_follows_the_cpu_run() {
    let dir = std::env::temp_dir().join(format!("beit-cuda-seg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("squares.beitds");
    mask_dataset(&path, 8, 16);
    let data = Dataset::open(&path).unwrap();
    let ids: Vec<usize> = (0..8).collect();
    let json = CONFIGS[0].1.replace("\"num_channels\": 3,", "\"num_channels\": 3, \"drop_path_rate\": 0.1,");
    let start = seg_model(&json);
    let opts = |device| SegFinetuneOptions {
        epochs: 1,
        batch_size: 4,
        warmup_steps: 0,
        clip_grad: Some(1.0),
        device,
        ..SegFinetuneOptions::default()
    };
    let run = |device| {
        let mut m = seg_model(&json);
        let mut losses = Vec::new();
        finetune(&mut m, &data, &ids, &opts(device), |s| losses.push(s.loss)).unwrap();
        (m, losses)
    };
    let (cpu, cpu_losses) = run(Device::Cpu);
    let (gpu, gpu_losses) = run(Device::Cuda);
    println!("losses cpu {cpu_losses:?} gpu {gpu_losses:?}");
    assert_eq!(cpu_losses.len(), 2);
    for (c, g) in cpu_losses.iter().zip(&gpu_losses) {
        assert!((c - g).abs() <= 1e-5 * c.abs(), "loss cpu {c} gpu {g}");
    }
    // The parameter updates agree as a whole; the running statistics element by element.
    let (p0, pc, pg) = (&start.params().data, &cpu.params().data, &gpu.params().data);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for ((&a, &c), &g) in p0.iter().zip(pc).zip(pg) {
        diff += ((g - c) as f64).powi(2);
        norm += ((c - a) as f64).powi(2);
    }
    let rel = (diff / norm).sqrt();
    println!("parameter update: |gpu - cpu| / |cpu update| = {rel:.2e}");
    assert!(norm > 0.0 && rel <= 1e-3, "the GPU run's update is off by {rel:.2e} of the CPU's");
    let running =
        |n: &str| (n.contains("running_") || n.contains("num_batches")) && !MEAN_SHIFTED_BY_NOISE.contains(&n);
    for s in cpu.params().specs.iter().filter(|s| running(&s.name)) {
        let err = rel_err(&pg[s.offset..s.offset + s.len], &pc[s.offset..s.offset + s.len]);
        assert!(err <= 1e-4, "{}: running statistics off by {err:.2e}", s.name);
    }
    // The GPU's evaluation scores the model as the CPU's does.
    let (mean, std) = (vec![0.5f32], vec![0.5f32]);
    let on_cpu = evaluate(&gpu, &data, &ids, 3, &mean, &std).unwrap();
    let on_gpu = evaluate_on(&gpu, &data, &ids, 3, &mean, &std, Device::Cuda).unwrap();
    assert_eq!(format!("{on_cpu:?}"), format!("{on_gpu:?}"));
    std::fs::remove_dir_all(&dir).ok();
}
