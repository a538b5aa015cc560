//! GPU matmul benchmark on BEiT-base shapes (batch 64 of 224² images: 64·197 = 12608 tokens),
//! run by `scripts/gpu-check` next to `scripts/gpu_bench_torch.py` (torch.matmul on the same
//! shapes in the same run). Ignored in plain test runs. Writes one JSON object per shape to
//! `$BEIT_BENCH_OUT` (default: stdout only).

use std::io::Write;
use std::time::Instant;

use beit::backend::cuda::{CudaDevice, Epilogue, GemmShape};
use half::bf16;

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
    let mut out: Option<std::fs::File> =
        std::env::var_os("BEIT_BENCH_OUT").map(|p| std::fs::File::create(p).expect("create BEIT_BENCH_OUT"));
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
        let line = serde_json::json!({"impl": "beit", "name": name, "batch": batch, "m": m, "n": n, "k": k,
            "trans_b": trans_b, "dtype": "bf16", "ms": seconds * 1e3, "tflops": tflops, "iters": iters});
        println!("{line}");
        if let Some(f) = out.as_mut() {
            writeln!(f, "{line}").unwrap();
        }
    }
}
