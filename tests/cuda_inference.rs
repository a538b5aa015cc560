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

mod gpu_common;

use beit::train::gpu_inference::GpuInference;
use beit::train::gpu_pretrain::Precision;
use beit::{Architecture, BeitConfig, ImageBatch, Model, OutputBuffers};
use gpu_common::{pixels, rel_err};

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

/// `beit_model_infer` on a cuda context runs the pass on the GPU (`GpuInference`, the model
/// handle's parameters uploaded once) and writes what a cpu context writes, to rounding; new
/// parameters (the C API changes them only through a trainer, whose model comes back as a new
/// handle) are what a later cuda inference computes with; a segmentation model runs there too;
/// what the GPU pass does not run (another image size) is `BEIT_ERR_UNSUPPORTED`, never a CPU
/// run.
#[test]
#[ignore = "needs a CUDA GPU"]
fn c_api_infer_on_a_cuda_context_equals_the_cpu() {
    use beit::ffi::context::{
        beit_context, beit_context_create, beit_context_free, beit_context_options_default, beit_device, RawDevice,
    };
    use beit::ffi::model::{
        beit_architecture, beit_image_batch_default, beit_infer_outputs_default, beit_model, beit_model_create,
        beit_model_free, beit_model_infer, beit_model_load, RawArchitecture,
    };
    use beit::ffi::status::{beit_last_error_message, beit_status};
    use beit::ffi::trainer::{
        beit_mim_batch_default, beit_trainer_create, beit_trainer_free, beit_trainer_options_default,
        beit_trainer_save_model, beit_trainer_step,
    };
    use std::ffi::{CStr, CString};
    use std::ptr;

    let last_error = || unsafe { CStr::from_ptr(beit_last_error_message()) }.to_string_lossy().into_owned();
    let context = |device: beit_device| {
        let mut opts = beit_context_options_default();
        opts.device = RawDevice(device as u32);
        opts.num_threads = 2;
        let mut ctx: *mut beit_context = ptr::null_mut();
        // SAFETY: valid options and out pointer.
        assert_eq!(unsafe { beit_context_create(&opts, &mut ctx) }, beit_status::BEIT_OK, "{}", last_error());
        ctx
    };
    let (cpu, cuda) = (context(beit_device::BEIT_DEVICE_CPU), context(beit_device::BEIT_DEVICE_CUDA));
    let create = |json: &str, arch: beit_architecture, seed: u64| {
        let json = CString::new(json).unwrap();
        let mut model: *mut beit_model = ptr::null_mut();
        // SAFETY: a live context, a NUL-terminated config, an out pointer.
        let status = unsafe { beit_model_create(cpu, json.as_ptr(), RawArchitecture(arch as u32), seed, &mut model) };
        assert_eq!(status, beit_status::BEIT_OK, "{}", last_error());
        model
    };

    let cfg = BeitConfig::from_json_str(CONFIGS[0].1).unwrap();
    let (b, c, (h, w)) = (3, cfg.num_channels, cfg.image_size.hw());
    let n = (h / 4) * (w / 4);
    let px = pixels(b * c * h * w, 31);
    let mask: Vec<u8> = (0..b * n).map(|i| (i % 3 == 1) as u8).collect();
    // The MIM model's hidden state and logits (masked input) on a context, the status and the
    // message of a refusal otherwise.
    let infer = |ctx: *mut beit_context, model: *const beit_model, px: &[f32], size: usize| {
        let mut input = beit_image_batch_default();
        input.pixels = px.as_ptr();
        input.pixels_len = px.len();
        (input.batch, input.channels, input.height, input.width) = (b, c, size, size);
        let patches = (size / 4) * (size / 4);
        let mask: Vec<u8> = (0..b * patches).map(|i| (i % 3 == 1) as u8).collect();
        input.bool_masked_pos = mask.as_ptr();
        input.bool_masked_pos_len = mask.len();
        let mut hidden = vec![f32::NAN; b * (patches + 1) * cfg.hidden_size];
        let mut logits = vec![f32::NAN; b * patches * cfg.vocab_size];
        let mut out = beit_infer_outputs_default();
        (out.last_hidden_state, out.last_hidden_state_len) = (hidden.as_mut_ptr(), hidden.len());
        (out.logits, out.logits_len) = (logits.as_mut_ptr(), logits.len());
        // SAFETY: live handles; every buffer holds its stated length and outlives the call.
        match unsafe { beit_model_infer(ctx, model, &input, &out) } {
            beit_status::BEIT_OK => Ok((hidden, logits)),
            status => Err((status, last_error())),
        }
    };
    let check = |what: &str, gpu: &(Vec<f32>, Vec<f32>), cpu: &(Vec<f32>, Vec<f32>)| {
        for (name, g, c) in [("last_hidden_state", &gpu.0, &cpu.0), ("logits", &gpu.1, &cpu.1)] {
            let err = rel_err(g, c);
            eprintln!("beit_model_infer, {what}, {name}: max |cuda - cpu| / max|cpu| {err:.2e}");
            assert!(err <= 1e-5, "{what}, {name}: {err:e}");
        }
    };

    let model = create(CONFIGS[0].1, beit_architecture::BEIT_ARCH_MASKED_IMAGE_MODELING, 5);
    let want = infer(cpu, model, &px, h).unwrap();
    // Twice: the second call reuses the handle's upload and the planned memory.
    for _ in 0..2 {
        check("created model", &infer(cuda, model, &px, h).unwrap(), &want);
    }

    // One trainer step on a copy of the model, saved, loaded as a new handle on the cuda
    // context: its cuda inference computes with the trained parameters, and the first
    // handle's with its own, which did not change.
    let mut opts = beit_trainer_options_default();
    opts.learning_rate = 1e-2;
    let mut trainer = ptr::null_mut();
    // SAFETY: live handles, valid options, an out pointer.
    assert_eq!(unsafe { beit_trainer_create(cpu, model, &opts, &mut trainer) }, beit_status::BEIT_OK);
    let labels: Vec<i64> = (0..b * n).map(|i| (i * 7 % cfg.vocab_size) as i64).collect();
    let mut batch = beit_mim_batch_default();
    (batch.pixels, batch.pixels_len) = (px.as_ptr(), px.len());
    (batch.batch, batch.channels, batch.height, batch.width) = (b, c, h, w);
    (batch.bool_masked_pos, batch.bool_masked_pos_len) = (mask.as_ptr(), mask.len());
    (batch.labels, batch.labels_len) = (labels.as_ptr(), labels.len());
    let dir = tempfile::tempdir().unwrap();
    let path = CString::new(dir.path().join("trained").to_str().unwrap()).unwrap();
    let mut trained: *mut beit_model = ptr::null_mut();
    // SAFETY: a live trainer, a batch whose buffers hold their stated lengths, a NUL-terminated
    // path, an out pointer.
    unsafe {
        assert_eq!(beit_trainer_step(trainer, &batch, ptr::null_mut()), beit_status::BEIT_OK, "{}", last_error());
        assert_eq!(beit_trainer_save_model(trainer, path.as_ptr()), beit_status::BEIT_OK, "{}", last_error());
        beit_trainer_free(trainer);
        assert_eq!(beit_model_load(cuda, path.as_ptr(), &mut trained), beit_status::BEIT_OK, "{}", last_error());
    }
    let want_trained = infer(cpu, trained, &px, h).unwrap();
    let moved = rel_err(&want_trained.1, &want.1);
    assert!(moved > 1e-3, "the step moved the logits by {moved:e} only: the check below would prove nothing");
    check("trained model", &infer(cuda, trained, &px, h).unwrap(), &want_trained);
    check("created model after training its copy", &infer(cuda, model, &px, h).unwrap(), &want);

    // A refusal on the cuda context, where the cpu context computes: another image size.
    let px24 = pixels(b * c * 24 * 24, 32);
    assert!(infer(cpu, model, &px24, 24).is_ok());
    let (status, msg) = infer(cuda, model, &px24, 24).unwrap_err();
    assert_eq!(status, beit_status::BEIT_ERR_UNSUPPORTED, "{msg}");
    assert!(msg.contains("configured image size"), "{msg}");
    let seg_json = CONFIGS[0].1.trim_end().trim_end_matches('}').to_string()
        + r#", "out_indices": [1, 1, 2, 2], "pool_scales": [1, 2], "auxiliary_channels": 8}"#;
    let seg = create(&seg_json, beit_architecture::BEIT_ARCH_SEMANTIC_SEGMENTATION, 5);
    let mut input = beit_image_batch_default();
    (input.pixels, input.pixels_len) = (px.as_ptr(), px.len());
    (input.batch, input.channels, input.height, input.width) = (b, c, h, w);
    // A segmentation model on the cuda context: the GPU's logits and last hidden state are the
    // cpu context's.
    let labels = 5; // CONFIGS[0]'s num_labels
    let seg_out = |ctx: *mut beit_context| {
        let mut hidden = vec![0.0f32; b * (n + 1) * cfg.hidden_size];
        let mut logits = vec![0.0f32; b * labels * 16 * n]; // [b, labels, 4gh, 4gw]
        let mut out = beit_infer_outputs_default();
        (out.last_hidden_state, out.last_hidden_state_len) = (hidden.as_mut_ptr(), hidden.len());
        (out.logits, out.logits_len) = (logits.as_mut_ptr(), logits.len());
        // SAFETY: live handles; every buffer holds its stated length and outlives the call.
        let status = unsafe { beit_model_infer(ctx, seg, &input, &out) };
        assert_eq!(status, beit_status::BEIT_OK, "{}", last_error());
        (hidden, logits)
    };
    let (want_hidden, want_logits) = seg_out(cpu);
    let (got_hidden, got_logits) = seg_out(cuda);
    let (eh, el) = (rel_err(&got_hidden, &want_hidden), rel_err(&got_logits, &want_logits));
    println!("C API segmentation on cuda: last hidden state {eh:.2e}, logits {el:.2e}");
    assert!(eh <= 1e-5 && el <= 1e-5, "segmentation on the cuda context: {eh:.2e} / {el:.2e}");
    // SAFETY: live handles, freed once.
    unsafe {
        beit_model_free(seg);
        beit_model_free(trained);
        beit_model_free(model);
        beit_context_free(cuda);
        beit_context_free(cpu);
    }
}
