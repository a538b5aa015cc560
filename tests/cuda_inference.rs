//! Inference on the GPU (`train::gpu_inference`: the one inference pass on the CUDA backend)
//! against the CPU forward (`Model::forward`, the reference checked against Hugging Face in
//! tests/reference_parity.rs), for the backbone, MIM and classification models over the
//! backbone's variants (shared / per-layer / absolute positions, layer scale, mean or CLS
//! pooling, a mask). GPU tests are `#[ignore = "needs a CUDA GPU"]`; scripts/cuda-mock runs them
//! against the mock CUDA stack.
//!
//! Tolerances, as max |gpu − cpu| over max |cpu| of each output: fp32 1e-5 (the same
//! arithmetic in another summation order); bf16 5e-2 (every stored activation and working
//! weight rounded to bf16, 2^-9 relative each, through a few blocks).

use beit::train::gpu_inference::GpuInference;
use beit::train::gpu_pretrain::Precision;
use beit::{Architecture, BeitConfig, ImageBatch, Model, OutputBuffers};

/// Small configs (head dim 32) covering the backbone's variants.
const CONFIGS: [(&str, &str); 3] = [
    (
        "shared relpos, layer scale, mean pooling",
        r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "image_size": 16, "patch_size": 4, "num_channels": 3, "vocab_size": 96, "use_mask_token": true,
            "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1, "num_labels": 5}"#,
    ),
    (
        "per-layer relpos, no layer scale, final norm, CLS pooling",
        r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
            "image_size": 16, "patch_size": 4, "num_channels": 3, "vocab_size": 96, "use_mask_token": true,
            "use_relative_position_bias": true, "layer_scale_init_value": 0.0, "use_mean_pooling": false,
            "num_labels": 7}"#,
    ),
    (
        "absolute positions, shared + per-layer relpos, layer scale",
        r#"{"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 96,
            "image_size": 20, "patch_size": 4, "num_channels": 1, "vocab_size": 40, "use_mask_token": true,
            "use_absolute_position_embeddings": true, "use_relative_position_bias": true,
            "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1, "use_mean_pooling": false}"#,
    ),
];

fn pixels(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// max |got − want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    // NaN would slip through the max below: every output must be written and finite.
    assert!(got.iter().all(|v| v.is_finite()), "a non-finite output");
    let scale = want.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_inference_equals_the_cpu_forward() {
    let archs = [Architecture::Backbone, Architecture::MaskedImageModeling, Architecture::ImageClassification];
    for (name, json) in CONFIGS {
        let cfg = BeitConfig::from_json_str(json).unwrap();
        for arch in archs {
            let model = Model::new_random(cfg.clone(), arch, 3).unwrap();
            let (c, (h, w)) = (cfg.num_channels, cfg.image_size.hw());
            let batch = 3;
            let n = model.output_shapes(batch, h, w).last_hidden_state[1] - 1;
            let px = pixels(batch * c * h * w, 11);
            let mask: Vec<u8> = (0..batch * n).map(|i| (i % 3 == 0) as u8).collect();
            let input = ImageBatch {
                pixels: &px,
                batch,
                channels: c,
                height: h,
                width: w,
                bool_masked_pos: (arch == Architecture::MaskedImageModeling).then_some(&mask[..]),
            };
            let want = model.forward(&input).unwrap();
            for (precision, tol) in [(Precision::F32, 1e-5), (Precision::Bf16, 5e-2)] {
                let mut gpu = GpuInference::new(&model, precision).expect("a CUDA GPU");
                let mut hidden = vec![f32::NAN; want.last_hidden_state.data.len()];
                let mut pooled = want.pooler_output.as_ref().map(|t| vec![f32::NAN; t.data.len()]);
                let mut logits = want.logits.as_ref().map(|t| vec![f32::NAN; t.data.len()]);
                // Twice: the second pass reuses the planned memory.
                for _ in 0..2 {
                    let out = OutputBuffers {
                        last_hidden_state: Some(&mut hidden),
                        pooler_output: pooled.as_deref_mut(),
                        logits: logits.as_deref_mut(),
                    };
                    gpu.forward_into(&input, out).unwrap();
                }
                let mut report = vec![("last_hidden_state", rel_err(&hidden, &want.last_hidden_state.data))];
                if let (Some(g), Some(t)) = (&pooled, &want.pooler_output) {
                    report.push(("pooler_output", rel_err(g, &t.data)));
                }
                if let (Some(g), Some(t)) = (&logits, &want.logits) {
                    report.push(("logits", rel_err(g, &t.data)));
                }
                for (what, err) in report {
                    eprintln!("{} {arch:?} [{name}] {what}: max |gpu - cpu| / max|cpu| {err:.2e}", precision.name());
                    assert!(err <= tol, "{} {arch:?} [{name}] {what}: {err:e} above {tol:e}", precision.name());
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_inference_refuses_what_it_does_not_run() {
    let cfg = BeitConfig::from_json_str(CONFIGS[0].1).unwrap();
    let model = Model::new_random(cfg.clone(), Architecture::ImageClassification, 3).unwrap();
    let mut gpu = GpuInference::new(&model, Precision::F32).expect("a CUDA GPU");
    // Another image size: refused, nothing computed.
    let px = pixels(3 * 24 * 24, 1);
    let input = ImageBatch { pixels: &px, batch: 1, channels: 3, height: 24, width: 24, bool_masked_pos: None };
    let shapes = model.output_shapes(1, 24, 24);
    let mut logits = vec![0.0; shapes.logits.unwrap().iter().product()];
    let err = gpu
        .forward_into(&input, OutputBuffers { logits: Some(&mut logits), ..Default::default() })
        .expect_err("another image size");
    assert!(err.to_string().contains("configured image size"), "{err}");
    // A buffer of the wrong length: the model's own check.
    let px = pixels(3 * 16 * 16, 1);
    let input = ImageBatch { pixels: &px, height: 16, width: 16, ..input };
    let mut short = vec![0.0; 3];
    let err = gpu.forward_into(&input, OutputBuffers { logits: Some(&mut short), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("logits buffer holds 3"), "{err}");
}

/// `beit infer --device cuda` runs the pass on the GPU (the CLI routes the context's device to
/// `GpuInference`) and writes what `--device cpu` writes, to rounding; a segmentation model is
/// refused there rather than computed on the CPU.
#[test]
#[ignore = "needs a CUDA GPU"]
fn cli_infer_on_a_cuda_context_equals_the_cpu() {
    // BEIT_BIN: where scripts/gpu-check put the binary on a machine the tests were copied to.
    let bin = std::env::var("BEIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_beit").to_string());
    let dir = tempfile::tempdir().unwrap();
    let cfg = BeitConfig::from_json_str(CONFIGS[0].1).unwrap();
    let model_dir = dir.path().join("model");
    Model::new_random(cfg.clone(), Architecture::ImageClassification, 6).unwrap().save(&model_dir).unwrap();
    let (b, c, (h, w)) = (3, cfg.num_channels, cfg.image_size.hw());
    let shape = [b, c, h, w];
    let x = pixels(b * c * h * w, 21);
    let inputs = dir.path().join("inputs.safetensors");
    std::fs::write(&inputs, beit::model::io::f32_tensors_bytes([("pixel_values", &shape[..], &x[..])]).unwrap())
        .unwrap();
    let run = |device: &str| {
        let out = dir.path().join(format!("out-{device}.safetensors"));
        let status = std::process::Command::new(&bin)
            .args(["infer", "--device", device, "--model"])
            .arg(&model_dir)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(status.status.success(), "beit infer --device {device}: {}", String::from_utf8_lossy(&status.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let logits = beit::model::io::read_f32(&st, "logits").unwrap().unwrap().1;
        let hidden = beit::model::io::read_f32(&st, "last_hidden_state").unwrap().unwrap().1;
        (logits, hidden)
    };
    let (cpu_logits, cpu_hidden) = run("cpu");
    let (gpu_logits, gpu_hidden) = run("cuda");
    for (name, g, c) in [("logits", &gpu_logits, &cpu_logits), ("last_hidden_state", &gpu_hidden, &cpu_hidden)] {
        let scale = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let worst = g.iter().zip(c.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("beit infer --device cuda, {name}: worst {:.2e} of max {scale:.3}", worst);
        assert!(g.iter().all(|v| v.is_finite()) && worst <= 1e-5 * scale.max(1.0), "{name}: {worst:e}");
    }
}
