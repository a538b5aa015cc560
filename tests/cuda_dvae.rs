//! The tokenizer's training step and tokenizing pass on the GPU (`train::gpu_dvae`: the one
//! pass of `train::dvae` on `CudaBackend<f32>`) against the CPU trainer, the reference: the same
//! initialisation and batches, a few steps on each, then the losses, every parameter's gradient,
//! the parameters and the optimizer state after the steps, and the tokens. Every test needs a
//! CUDA GPU: they are `#[ignore]`d so CPU CI lists them, and scripts/cuda-mock (CI) and
//! scripts/gpu-check run them.
//!
//! Tolerances (fp32 on both sides): the losses within 1e-5 relative; each gradient tensor within
//! 1e-5 of its L2 norm (max abs difference); parameters within 1e-5 of each tensor's largest
//! magnitude after the steps (AdamW's first steps move by ~lr·sign(g), so a gradient that is
//! tiny and noisy could flip a sign: the check runs where the gradients agree to rounding).

mod gpu_common;

use beit::dvae::{map_pixels, Dvae, DvaeConfig};
use beit::train::dvae::{DvaeStepStats, DvaeTrainOptions, DvaeTrainer};
use beit::train::gpu_dvae::GpuTokenizer;
use beit::{Context, ContextOptions, Device};
use gpu_common::rel_err;

fn config() -> DvaeConfig {
    DvaeConfig {
        model_type: "beit-dvae".into(),
        in_channels: 1,
        image_size: 8,
        vocab_size: 24,
        n_hid: 8,
        group_count: 2,
        n_blk_per_group: 1,
        decoder_n_init: Some(8),
    }
}

/// Deterministic smooth images in mapped space.
fn images(count: usize, size: usize, seed: u32) -> Vec<f32> {
    let mut out = Vec::with_capacity(count * size * size);
    for b in 0..count {
        for y in 0..size {
            for x in 0..size {
                let t = (b as f32 + 1.0) * 0.7 + seed as f32 * 0.31;
                let v = 0.5 + 0.4 * ((x as f32 * 0.9 + t).sin() * (y as f32 * 0.6 - t).cos());
                out.push(map_pixels(v));
            }
        }
    }
    out
}

fn options() -> DvaeTrainOptions {
    DvaeTrainOptions { seed: 11, ..DvaeTrainOptions::for_steps(20) }
}

fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
    assert!((got - want).abs() <= rel * want.abs(), "{what}: GPU {got}, CPU {want}");
}

/// Each tensor of `got` within `tol` of its own size in `want` (`norm`: L2 norm, else max |·|).
fn assert_tensorwise(dvae: &Dvae, got: &[f32], want: &[f32], tol: f64, norm: bool, what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: the GPU's values are not all finite");
    let mut worst = 0.0f64;
    for s in &dvae.params.specs {
        let (g, w) = (&got[s.offset..s.offset + s.len], &want[s.offset..s.offset + s.len]);
        let size = if norm {
            w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
        } else {
            w.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64))
        };
        let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        let rel = diff / size.max(1e-30);
        assert!(diff <= tol * size.max(1e-30), "{what} {}: worst |diff| {diff:e} is {rel:e} of {size:e}", s.name);
        worst = worst.max(rel);
    }
    println!("{what}: worst {worst:e} (limit {tol:e})");
    worst
}

fn assert_stats(gpu: &DvaeStepStats, cpu: &DvaeStepStats) {
    assert_close(gpu.loss, cpu.loss, 1e-5, "loss");
    assert_close(gpu.recon_mse, cpu.recon_mse, 1e-5, "reconstruction MSE");
    assert_close(gpu.kl, cpu.kl, 1e-5, "KL");
    assert_eq!((gpu.step, gpu.tau, gpu.lr), (cpu.step, cpu.tau, cpu.lr));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn training_steps_on_the_gpu_equal_the_cpu_trainer() {
    let dvae = Dvae::new(config(), 5).unwrap();
    let mut cpu = DvaeTrainer::new(dvae.clone(), options()).unwrap();
    let mut gpu = DvaeTrainer::new(dvae, options()).unwrap();
    gpu.use_cuda().expect("a usable CUDA GPU");
    assert!(gpu.on_cuda() && !cpu.on_cuda());
    // Two batch sizes: the step plans again for the second.
    let batches = [images(3, 8, 1), images(3, 8, 2), images(2, 8, 3)];
    for x in &batches {
        let want = cpu.forward_backward(x).unwrap();
        let got = gpu.forward_backward(x).unwrap();
        assert_stats(&got, &want);
        assert_tensorwise(&cpu.dvae, gpu.gradients(), cpu.gradients(), 1e-5, true, "gradient");
        let (want, got) = (cpu.step(x).unwrap(), gpu.step(x).unwrap());
        assert_stats(&got, &want);
        assert_eq!(gpu.step_count(), cpu.step_count());
        assert_tensorwise(&cpu.dvae, &gpu.dvae.params.data, &cpu.dvae.params.data, 1e-5, false, "parameters");
    }
    let (got, want) = (gpu.optimizer_state().unwrap(), cpu.optimizer_state().unwrap());
    assert_eq!(got.step, want.step);
    assert_tensorwise(&cpu.dvae, &got.exp_avg, &want.exp_avg, 1e-5, false, "first moment");
    assert_tensorwise(&cpu.dvae, &got.exp_avg_sq, &want.exp_avg_sq, 1e-5, false, "second moment");

    // The trainer tokenizes on its device; the tokens equal the CPU's of the same parameters
    // (the logits agree to rounding, so their argmax does wherever the top two are apart).
    let x = images(5, 8, 4);
    let want = gpu.dvae.tokenize(&x).unwrap();
    assert_eq!(gpu.tokenize(&x).unwrap(), want);
    assert_eq!(want.len(), 5 * 16);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tokenizing_on_the_gpu_equals_the_cpu() {
    let mut dvae = Dvae::new(DvaeConfig { vocab_size: 40, ..config() }, 9).unwrap();
    // Spread the output biases so the argmax is decided by more than rounding.
    let spec = dvae.params.specs.iter().find(|s| s.name == "encoder.blocks.output.conv.b").unwrap().clone();
    for (i, b) in dvae.params.data[spec.offset..spec.offset + spec.len].iter_mut().enumerate() {
        *b = (i as f32 * 0.37).sin();
    }
    let mut tok = GpuTokenizer::new(&dvae).expect("a usable CUDA GPU");
    for count in [1, 7, 3] {
        let x = images(count, 8, count as u32);
        let want = dvae.tokenize(&x).unwrap();
        assert_eq!(tok.tokenize(&dvae, &x).unwrap(), want, "{count} images");
    }
    // New parameters take effect; a bad input is refused before any work.
    dvae.params.data.iter_mut().for_each(|v| *v *= -1.0);
    tok.set_params(&dvae.params).unwrap();
    let x = images(4, 8, 9);
    assert_eq!(tok.tokenize(&dvae, &x).unwrap(), dvae.tokenize(&x).unwrap());
    assert!(tok.tokenize(&dvae, &x[..10]).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decoding_on_the_gpu_equals_the_cpu() {
    let mut dvae = Dvae::new(DvaeConfig { vocab_size: 40, ..config() }, 12).unwrap();
    let mut tok = GpuTokenizer::new(&dvae).expect("a usable CUDA GPU");
    let p = dvae.config.tokens_per_image();
    let grids =
        |count: usize, seed: usize| -> Vec<u32> { (0..count * p).map(|i| ((i * 7 + seed) % 40) as u32).collect() };
    // Batch sizes that change the planned pass, and back.
    for count in [1, 5, 2] {
        let tokens = grids(count, count);
        let want = dvae.decode(&tokens).unwrap();
        assert_eq!(want.len(), count * dvae.image_len());
        let err = rel_err(&tok.decode(&dvae, &tokens).unwrap(), &want);
        println!("decode, {count} grid(s): max |gpu - cpu| / max|cpu| {err:.2e}");
        assert!(err <= 1e-5, "{count} grid(s): {err:e}");
    }
    // New parameters take effect.
    dvae.params.data.iter_mut().enumerate().for_each(|(i, v)| *v *= 1.0 + (i % 5) as f32 * 0.1);
    tok.set_params(&dvae.params).unwrap();
    let tokens = grids(3, 1);
    let err = rel_err(&tok.decode(&dvae, &tokens).unwrap(), &dvae.decode(&tokens).unwrap());
    assert!(err <= 1e-5, "after set_params: {err:e}");
    // What the CPU refuses, the GPU refuses, before any work.
    assert!(tok.decode(&dvae, &tokens[..p - 1]).is_err());
    assert!(tok.decode(&dvae, &[40; 16]).is_err());
    let encoder_only = Dvae::new(DvaeConfig { vocab_size: 40, decoder_n_init: None, ..config() }, 12).unwrap();
    let mut enc = GpuTokenizer::new(&encoder_only).unwrap();
    assert!(enc.decode(&encoder_only, &tokens).unwrap_err().to_string().contains("no decoder"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_cuda_context_moves_the_trainer_to_the_gpu() {
    let ctx = Context::new(&ContextOptions { device: Device::Cuda, ..ContextOptions::default() }).unwrap();
    let mut trainer = DvaeTrainer::new(Dvae::new(config(), 1).unwrap(), options()).unwrap();
    trainer.use_context(&ctx).unwrap();
    assert!(trainer.on_cuda());
    let cpu_ctx = Context::new(&ContextOptions { device: Device::Cpu, ..ContextOptions::default() }).unwrap();
    let mut cpu = DvaeTrainer::new(Dvae::new(config(), 1).unwrap(), options()).unwrap();
    cpu.use_context(&cpu_ctx).unwrap();
    assert!(!cpu.on_cuda());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_c_api_tokenizes_and_decodes_on_the_gpu_of_a_cuda_context() {
    use beit::ffi::context::{
        beit_context, beit_context_create, beit_context_free, beit_context_options_default, beit_device, RawDevice,
    };
    use beit::ffi::status::beit_status;
    use beit::ffi::tokenizer::beit_tokenizer_tokenize;
    use beit::ffi::tokenizer::{beit_tokenizer, beit_tokenizer_decode, beit_tokenizer_free, beit_tokenizer_load};

    let dvae = Dvae::new(DvaeConfig { vocab_size: 40, ..config() }, 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    dvae.save(dir.path()).unwrap();
    let path = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    let pixels: Vec<f32> = images(3, 8, 5).iter().map(|&v| beit::dvae::unmap_pixels(v)).collect();
    let mapped: Vec<f32> = pixels.iter().map(|&v| map_pixels(v)).collect();
    let want: Vec<i64> = dvae.tokenize(&mapped).unwrap().iter().map(|&t| t as i64).collect();

    let load = |device: beit_device| {
        let mut opts = beit_context_options_default();
        opts.device = RawDevice(device as u32);
        let (mut ctx, mut tok): (*mut beit_context, *mut beit_tokenizer) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: valid options, out pointers, a NUL-terminated path; the tokenizer shares the
        // context, so the handle may go first.
        unsafe {
            assert_eq!(beit_context_create(&opts, &mut ctx), beit_status::BEIT_OK);
            assert_eq!(beit_tokenizer_load(ctx, path.as_ptr(), &mut tok), beit_status::BEIT_OK);
            beit_context_free(ctx);
        }
        tok
    };
    let (gpu, cpu) = (load(beit_device::BEIT_DEVICE_CUDA), load(beit_device::BEIT_DEVICE_CPU));
    // SAFETY: live tokenizers, buffers of the stated lengths.
    unsafe {
        let mut tokens = vec![-1i64; want.len()];
        let status = beit_tokenizer_tokenize(gpu, pixels.as_ptr(), pixels.len(), 3, tokens.as_mut_ptr(), tokens.len());
        assert_eq!(status, beit_status::BEIT_OK);
        assert_eq!(tokens, want);
        // Decoding runs on the GPU of the cuda context and gives the cpu context's pixels.
        let decode = |tok: *mut beit_tokenizer| {
            let mut out = vec![f32::NAN; pixels.len()];
            let status = beit_tokenizer_decode(tok, tokens.as_ptr(), tokens.len(), 3, out.as_mut_ptr(), out.len());
            assert_eq!(status, beit_status::BEIT_OK);
            out
        };
        let (on_gpu, on_cpu) = (decode(gpu), decode(cpu));
        let worst = on_gpu.iter().zip(&on_cpu).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        println!("beit_tokenizer_decode on cuda: worst |cuda - cpu| {worst:.2e} (pixels in [0, 1])");
        assert!(on_gpu.iter().all(|v| v.is_finite()) && worst <= 1e-5, "{worst:e}");
        beit_tokenizer_free(gpu);
        beit_tokenizer_free(cpu);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tokenizer_train_on_device_cuda_steps_on_the_gpu() {
    use beit::data::dataset::{DatasetSpec, DatasetWriter};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.beitds");
    let spec = DatasetSpec { height: 16, width: 16, channels: 1, labels: false, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(&data, spec).unwrap();
    for i in 0..8usize {
        let px: Vec<u8> = (0..256).map(|p| (20 + (i * 67 + p * 13) % 216) as u8).collect();
        w.push(&px, None, None, None).unwrap();
    }
    w.finish().unwrap();
    let out = dir.path().join("tokenizer");
    let args = [
        "tokenizer",
        "train",
        "--device",
        "cuda",
        "--image-size",
        "8",
        "--vocab",
        "16",
        "--n-hid",
        "8",
        "--groups",
        "2",
        "--decoder-width",
        "8",
        "--steps",
        "2",
        "--batch",
        "4",
        "--eval-images",
        "4",
        "--threads",
        "1",
    ];
    // BEIT_BIN: where scripts/gpu-check put the binary on a machine the tests were copied to.
    let bin = std::env::var("BEIT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_beit").to_string());
    let run =
        std::process::Command::new(bin).args(args).arg("--data").arg(&data).arg("--out").arg(&out).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let stdout = String::from_utf8_lossy(&run.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["device"], "cuda", "{stdout}");
    assert!(summary["eval"]["recon_mse"].as_f64().unwrap().is_finite());
    Dvae::load(&out).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_c_api_trains_a_tokenizer_on_the_gpu_of_a_cuda_context() {
    use beit::data::dataset::{DatasetSpec, DatasetWriter};
    use beit::ffi::context::{
        beit_context_create, beit_context_free, beit_context_options_default, beit_device, RawDevice,
    };
    use beit::ffi::dvae::*;
    use beit::ffi::status::beit_status;
    use beit::ffi::tokenizer::{beit_tokenizer_free, beit_tokenizer_tokenize};
    use std::ffi::{c_void, CString};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.beitds");
    let spec = DatasetSpec { height: 12, width: 12, channels: 1, labels: false, masks: false, token_grid: None };
    let mut w = DatasetWriter::create(&data, spec).unwrap();
    for i in 0..8usize {
        let px: Vec<u8> = (0..144).map(|p| (20 + (i * 67 + p * 13 + (p / 12) * i) % 216) as u8).collect();
        w.push(&px, None, None, None).unwrap();
    }
    w.finish().unwrap();
    let data = CString::new(data.to_str().unwrap()).unwrap();
    let c = config();
    let config = beit_dvae_config {
        in_channels: c.in_channels,
        image_size: c.image_size,
        vocab_size: c.vocab_size,
        n_hid: c.n_hid,
        group_count: c.group_count,
        n_blk_per_group: c.n_blk_per_group,
        decoder_n_init: c.decoder_n_init.unwrap(),
        ..beit_dvae_config_default()
    };
    let opts = beit_dvae_train_options { total_steps: 20, seed: 11, ..beit_dvae_train_options_default() };
    let data_opts = beit_dvae_data_options { steps: 3, batch: 4, seed: 2, ..beit_dvae_data_options_default() };

    unsafe extern "C" fn record(stats: *const beit_dvae_step_stats, user: *mut c_void) -> i32 {
        // SAFETY: the test passes its Vec; the stats are valid during the call.
        unsafe { (*(user as *mut Vec<beit_dvae_step_stats>)).push(*stats) };
        0
    }
    // Trains 3 steps on `device`; returns the stats, the saved tokenizer and the tokens the
    // handed-out copy gives.
    let run = |device: beit_device, name: &str| {
        let mut copts = beit_context_options_default();
        copts.device = RawDevice(device as u32);
        let (mut ctx, mut t, mut tok) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
        let mut stats: Vec<beit_dvae_step_stats> = Vec::new();
        let out = dir.path().join(name);
        let out_c = CString::new(out.to_str().unwrap()).unwrap();
        let plain: Vec<f32> = images(3, 8, 5).iter().map(|&v| beit::dvae::unmap_pixels(v)).collect();
        let mut tokens = vec![-1i64; 3 * c.tokens_per_image()];
        // SAFETY: valid options, out pointers and buffers of the stated lengths; the trainer and
        // the tokenizer share the context, so its handle may go first.
        unsafe {
            assert_eq!(beit_context_create(&copts, &mut ctx), beit_status::BEIT_OK);
            assert_eq!(beit_dvae_trainer_create(ctx, &config, &opts, &mut t), beit_status::BEIT_OK);
            beit_context_free(ctx);
            let user = &mut stats as *mut Vec<beit_dvae_step_stats> as *mut c_void;
            let st = beit_dvae_trainer_train(t, data.as_ptr(), &data_opts, Some(record), user, std::ptr::null_mut());
            assert_eq!(st, beit_status::BEIT_OK);
            assert_eq!(beit_dvae_trainer_save(t, out_c.as_ptr()), beit_status::BEIT_OK);
            assert_eq!(beit_dvae_trainer_get_tokenizer(t, &mut tok), beit_status::BEIT_OK);
            let st = beit_tokenizer_tokenize(tok, plain.as_ptr(), plain.len(), 3, tokens.as_mut_ptr(), tokens.len());
            assert_eq!(st, beit_status::BEIT_OK);
            beit_tokenizer_free(tok);
            beit_dvae_trainer_free(t);
        }
        (stats, Dvae::load(&out).unwrap(), tokens)
    };
    let (gpu_stats, gpu, gpu_tokens) = run(beit_device::BEIT_DEVICE_CUDA, "cuda");
    let (cpu_stats, cpu, cpu_tokens) = run(beit_device::BEIT_DEVICE_CPU, "cpu");
    assert_eq!(gpu_stats.len(), 3);
    for (g, c) in gpu_stats.iter().zip(&cpu_stats) {
        assert_close(g.loss, c.loss, 1e-5, "loss");
        assert_close(g.recon_mse, c.recon_mse, 1e-5, "reconstruction MSE");
        assert_eq!((g.step, g.tau, g.lr), (c.step, c.tau, c.lr));
    }
    assert_tensorwise(&cpu, &gpu.params.data, &cpu.params.data, 1e-5, false, "parameters after 3 C API steps");
    // The copy tokenizes on the GPU; the tokens are the saved tokenizer's (ties within rounding
    // aside, which these smooth images do not meet).
    let plain: Vec<f32> = images(3, 8, 5).iter().map(|&v| beit::dvae::unmap_pixels(v)).collect();
    let mapped: Vec<f32> = plain.iter().map(|&v| map_pixels(v)).collect();
    let want: Vec<i64> = gpu.tokenize(&mapped).unwrap().iter().map(|&t| t as i64).collect();
    assert_eq!(gpu_tokens, want);
    assert_eq!(cpu_tokens.len(), want.len());
}
