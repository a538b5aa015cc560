//! GPU benchmarks, run by `scripts/gpu-check` next to `scripts/gpu_bench_torch.py` (PyTorch on
//! the same problems in the same run). Ignored in plain test runs. Each appends JSON lines to
//! `$BEIT_BENCH_OUT` (default: stdout only), told apart by `kind`:
//! - `matmul`: cuBLASLt on the GEMM shapes of BEiT-base (batch 64 of 224² images: 12608 tokens);
//! - `gemm_peak`: a square 8192³ bf16 GEMM through the same path, the dense bf16 matrix rate
//!   the MFU is measured against;
//! - `attention`: fused attention forward and forward + backward at BEiT-B's shape (B = 64,
//!   12 heads, N = 197, d = 64, relative position bias, its gradient included);
//! - `pretrain_step`: the whole BEiT-B/16 224 MIM training step on the GPU in bf16 (batch 64,
//!   75 of 196 patches masked, vocab 8192, drop path 0.1, clipping, AdamW), with its model FLOPs.

use std::io::Write;
use std::time::Instant;

use beit::backend::cuda::attention::{attention_backward_scratch_len, AttentionShape};
use beit::backend::cuda::{CudaDevice, Epilogue, GemmShape};
use beit::data::synthetic::SyntheticMim;
use beit::train::gpu_pretrain::Precision;
use beit::train::trainer::{Trainer, TrainerOptions};
use beit::{Architecture, BeitConfig, Model};
use half::bf16;

/// Appends JSON lines to `$BEIT_BENCH_OUT` (several benchmarks share the file).
fn bench_out() -> Option<std::fs::File> {
    std::env::var_os("BEIT_BENCH_OUT")
        .map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).expect("open BEIT_BENCH_OUT"))
}

fn emit(out: &mut Option<std::fs::File>, line: serde_json::Value) {
    println!("{line}");
    if let Some(f) = out.as_mut() {
        writeln!(f, "{line}").unwrap();
    }
}

/// Seconds per call of `run`: warm-up, then enough calls for about `budget` seconds between two
/// synchronisations.
fn time_it(d: &CudaDevice, budget: f64, mut run: impl FnMut()) -> (f64, usize) {
    for _ in 0..3 {
        run();
    }
    d.synchronize().unwrap();
    let t0 = Instant::now();
    run();
    d.synchronize().unwrap();
    let once = t0.elapsed().as_secs_f64().max(1e-6);
    let iters = ((budget / once) as usize).clamp(5, 2000);
    let t0 = Instant::now();
    for _ in 0..iters {
        run();
    }
    d.synchronize().unwrap();
    (t0.elapsed().as_secs_f64() / iters as f64, iters)
}

/// (name, batch, m, n, k, trans_b): the row-major products of one BEiT-base block.
pub const SHAPES: [(&str, usize, usize, usize, usize, bool); 6] = [
    ("qkv_linear", 1, 12608, 2304, 768, true),
    ("attn_out_linear", 1, 12608, 768, 768, true),
    ("mlp_fc1", 1, 12608, 3072, 768, true),
    ("mlp_fc2", 1, 12608, 768, 3072, true),
    ("attn_scores_qkT", 768, 197, 197, 64, true),
    ("attn_pv", 768, 197, 64, 197, false),
];

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu-check"]
fn bench_matmul_bf16() {
    let d = CudaDevice::get().expect("a CUDA GPU");
    let mut out = bench_out();
    for (name, batch, m, n, k, trans_b) in SHAPES {
        let a = d.zeros::<bf16>(batch * m * k).unwrap();
        let b = d.zeros::<bf16>(batch * n * k).unwrap();
        let mut c = d.zeros::<bf16>(batch * m * n).unwrap();
        let mut shape = GemmShape { trans_b, ..GemmShape::new(m, n, k) };
        if batch > 1 {
            shape = shape.batched(batch);
        }
        let run = |c: &mut cudarc::driver::CudaSlice<bf16>| {
            d.gemm::<bf16, bf16>(shape, 1.0, &a, &b, 0.0, c, Epilogue::None).unwrap();
        };
        for _ in 0..5 {
            run(&mut c);
        }
        d.synchronize().unwrap();
        // Enough iterations for ~0.2 s, timed around a synchronised batch of launches.
        let t0 = Instant::now();
        run(&mut c);
        d.synchronize().unwrap();
        let once = t0.elapsed().as_secs_f64().max(1e-6);
        let iters = ((0.2 / once) as usize).clamp(10, 2000);
        let t0 = Instant::now();
        for _ in 0..iters {
            run(&mut c);
        }
        d.synchronize().unwrap();
        let seconds = t0.elapsed().as_secs_f64() / iters as f64;
        let tflops = 2.0 * (batch * m * n * k) as f64 / seconds / 1e12;
        let line = serde_json::json!({"kind": "matmul", "impl": "beit", "name": name, "batch": batch, "m": m, "n": n, "k": k,
            "trans_b": trans_b, "dtype": "bf16", "ms": seconds * 1e3, "tflops": tflops, "iters": iters});
        emit(&mut out, line);
    }
}

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu-check"]
fn bench_gemm_peak_bf16() {
    let d = CudaDevice::get().expect("a CUDA GPU");
    let n = 8192;
    let a = d.zeros::<bf16>(n * n).unwrap();
    let b = d.zeros::<bf16>(n * n).unwrap();
    let mut c = d.zeros::<bf16>(n * n).unwrap();
    let shape = GemmShape { trans_b: true, ..GemmShape::new(n, n, n) };
    let (seconds, iters) =
        time_it(&d, 0.5, || d.gemm::<bf16, bf16>(shape, 1.0, &a, &b, 0.0, &mut c, Epilogue::None).unwrap());
    let tflops = 2.0 * (n * n * n) as f64 / seconds / 1e12;
    emit(
        &mut bench_out(),
        serde_json::json!({"kind": "gemm_peak", "impl": "beit", "m": n, "n": n, "k": n, "dtype": "bf16",
            "ms": seconds * 1e3, "tflops": tflops, "iters": iters}),
    );
}

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu-check"]
fn bench_attention_bf16() {
    let d = CudaDevice::get().expect("a CUDA GPU");
    let shape = AttentionShape { batch: 64, tokens: 197, heads: 12, head_dim: 64 };
    let (b, n, h, hd) = (shape.batch, shape.tokens, shape.heads, shape.head_dim);
    // Small random values (not zeros: the softmax must do real work); bias from a table.
    let host: Vec<bf16> =
        (0..b * n * 3 * h * hd).map(|i| bf16::from_f32(((i * 7919) % 2003) as f32 * 1e-3 - 1.0)).collect();
    let qkv = d.upload(&host).unwrap();
    let bias_host: Vec<f32> = (0..h * n * n).map(|i| ((i * 31) % 97) as f32 * 1e-2 - 0.5).collect();
    let bias = d.upload(&bias_host).unwrap();
    let mut ctx = d.zeros::<bf16>(b * n * h * hd).unwrap();
    let mut lse = d.zeros::<f32>(b * h * n).unwrap();
    let dctx = d.upload(&host[..b * n * h * hd]).unwrap();
    let mut dqkv = d.zeros::<bf16>(b * n * 3 * h * hd).unwrap();
    let mut dbias = d.zeros::<f32>(h * n * n).unwrap();
    let mut scratch = d.zeros::<f32>(attention_backward_scratch_len(shape, true)).unwrap();
    let (fwd, iters_f) =
        time_it(&d, 0.3, || d.attention_forward::<bf16>(&mut ctx, &mut lse, &qkv, Some(&bias), shape).unwrap());
    let (both, iters_b) = time_it(&d, 0.5, || {
        d.attention_forward::<bf16>(&mut ctx, &mut lse, &qkv, Some(&bias), shape).unwrap();
        d.attention_backward::<bf16>(
            &mut dqkv,
            Some(&mut dbias),
            &dctx,
            &qkv,
            &ctx,
            &lse,
            Some(&bias),
            shape,
            &mut scratch,
        )
        .unwrap();
    });
    // Matmul FLOPs: forward QKᵀ and PV (4·B·H·N²·d); backward recomputes QKᵀ and does dV, dP,
    // dQ, dK (10·B·H·N²·d).
    let unit = (b * h * n * n * hd) as f64;
    emit(
        &mut bench_out(),
        serde_json::json!({"kind": "attention", "impl": "beit", "batch": b, "heads": h, "tokens": n,
            "head_dim": hd, "rel_pos_bias": true, "dtype": "bf16", "fwd_ms": fwd * 1e3, "fwd_bwd_ms": both * 1e3,
            "fwd_tflops": 4.0 * unit / fwd / 1e12, "fwd_bwd_tflops": 14.0 * unit / both / 1e12,
            "iters": [iters_f, iters_b]}),
    );
}

/// BEiT-B/16 at 224 as `BeitForMaskedImageModeling` pretrains it (HF defaults: layer scale 0.1,
/// drop path 0.1; per-layer relative position bias, mask token), vocab 8192.
pub const BEIT_BASE_MIM: &str = r#"{"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3, "vocab_size": 8192,
    "use_mask_token": true, "use_relative_position_bias": true, "layer_scale_init_value": 0.1,
    "drop_path_rate": 0.1}"#;

/// Model FLOPs of one training step (forward ×3): `6·(linear weights)·(rows through them)` for
/// every Linear (patch projection over B·N patches, q/k/v/out/fc1/fc2 over B·T tokens, the MIM
/// head over the `masked` tokens of the whole batch only) plus attention's `4·B·T²·D·L` forward, ×3.
pub fn model_flops(cfg: &BeitConfig, batch: usize, masked: usize) -> f64 {
    let (d, inter, l, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size);
    let (gh, gw) = cfg.native_grid();
    let n = gh * gw;
    let t = n + 1;
    let (ph, pw) = cfg.patch_size.hw();
    let patch = (cfg.num_channels * ph * pw * d * batch * n) as f64;
    let blocks = ((4 * d * d + 2 * d * inter) * batch * t * l) as f64;
    let head = (d * v * masked) as f64;
    let attention = (4 * batch * t * t * d * l) as f64;
    6.0 * (patch + blocks + head) + 3.0 * attention
}

#[test]
#[ignore = "GPU benchmark: run by scripts/gpu-check"]
fn bench_pretrain_step_bf16() {
    let d = CudaDevice::get().expect("a CUDA GPU");
    let cfg = BeitConfig::from_json_str(BEIT_BASE_MIM).unwrap();
    let (batch, masked, warmup, timed) = (64, 75, 3, 10);
    let model = Model::new_random(cfg.clone(), Architecture::MaskedImageModeling, 0).unwrap();
    // BEiT's recipe as bench_pretrain.py runs it on the PyTorch side: AdamW (0.9, 0.999),
    // weight decay 0.05, clipping at 3.0, drop path 0.1, lr 1.5e-3.
    let options =
        TrainerOptions { learning_rate: 1.5e-3, beta2: 0.999, clip_grad_norm: 3.0, ..TrainerOptions::default() };
    let mut t = Trainer::new(model, options).unwrap();
    t.use_cuda(Precision::Bf16).unwrap();
    t.defer_host_copy(true);
    // Two batches made before timing (the host's synthetic generator is not what is measured).
    let data = SyntheticMim::for_config(&cfg, masked, 0);
    let batches = [data.batch(0, batch), data.batch(1, batch)];
    let mut losses = Vec::new();
    for i in 0..warmup {
        losses.push(t.step(&batches[i % 2].as_batch()).unwrap().loss);
    }
    d.synchronize().unwrap();
    let t0 = Instant::now();
    for i in 0..timed {
        // Each step reads its loss and gradient norm back: the device is synchronised.
        losses.push(t.step(&batches[i % 2].as_batch()).unwrap().loss);
    }
    d.synchronize().unwrap();
    let seconds = t0.elapsed().as_secs_f64() / timed as f64;
    let flops = model_flops(&cfg, batch, batch * masked);
    emit(
        &mut bench_out(),
        serde_json::json!({"kind": "pretrain_step", "impl": "beit", "model": "BEiT-B/16 224 MIM", "batch": batch,
            "masked_per_image": masked, "vocab": cfg.vocab_size, "precision": "bf16", "step_ms": seconds * 1e3,
            "images_per_s": batch as f64 / seconds, "model_tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / seconds / 1e12, "timed_steps": timed, "warmup_steps": warmup,
            "first_loss": losses[0], "last_loss": losses[losses.len() - 1],
            "params": t.model().params().count()}),
    );
    assert!(losses.iter().all(|l| l.is_finite()), "non-finite loss: {losses:?}");
}

#[test]
fn model_flops_formula_by_hand() {
    // One layer, d 4, inter 8, 2x2 grid of 2x2 patches of 1 channel, vocab 5, batch 1, 2 masked:
    // patch 6·(4·4·4) = 384, blocks 6·((64 + 64)·5) = 3840, head 6·(4·5·2) = 240,
    // attention 3·4·25·4 = 1200; a second image doubles every term.
    let cfg = BeitConfig::from_json_str(
        r#"{"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
            "image_size": 4, "patch_size": 2, "num_channels": 1, "vocab_size": 5}"#,
    )
    .unwrap();
    assert_eq!(model_flops(&cfg, 1, 2), 384.0 + 3840.0 + 240.0 + 1200.0);
    assert_eq!(model_flops(&cfg, 2, 4), 2.0 * (384.0 + 3840.0 + 240.0 + 1200.0));
}
