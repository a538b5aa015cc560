//! GPU ops against the CPU backend (the numerical reference) or hand-written formulas. Every
//! test needs a CUDA GPU: they are `#[ignore]`d so CPU CI lists them, and `scripts/gpu-check`
//! runs them with `--ignored`.
//!
//! Tolerances (and why):
//! - fp32 mode: 1e-5 relative to the output's largest magnitude (`normwise`): fp32 accumulation
//!   in a different order than the CPU's gemm; elementwise relative error is meaningless where
//!   a sum cancels to ~0.
//! - bf16: inputs are rounded to bf16 first and the CPU runs on the rounded values in fp32, so
//!   the only differences are the output's rounding to bf16 (relative 2^-9, half an ulp) and
//!   accumulation order: per element |gpu - cpu| <= 2^-8·|cpu| + 1e-5·max|cpu|.
//! - element-wise ops with identical rounding (casts, add, AdamW written with explicitly
//!   rounded intrinsics) are compared bit for bit or to one ulp, as each test states.

use beit::backend::cpu;
use beit::backend::cuda::{
    Act, CudaBackend, CudaDevice, CudaMemory, DeviceArena, DeviceParams, Epilogue, GemmShape, Scratch,
};
use beit::backend::memory::{Arena, HostMemory, Planner, Space, View};
use beit::backend::ops::TokenParams;
use beit::backend::Backend;
use beit::model::params::rel_pos_table_rows;
use beit::model::relpos::relative_position_index;
use beit::train::adamw::{AdamW, AdamWConfig};
use half::bf16;

fn dev() -> std::sync::Arc<CudaDevice> {
    CudaDevice::get().expect("these tests need a usable CUDA GPU (see `beit info`)")
}

/// Deterministic values in [-1, 1) (xorshift64*), independent of any crate's RNG stream.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D);
            ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn round_bf16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn from_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

fn max_abs(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// max |got - want| <= rel · max |want|; returns the achieved ratio for the log.
fn assert_normwise(got: &[f32], want: &[f32], rel: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = max_abs(want).max(f32::MIN_POSITIVE);
    let (worst, at) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold((0.0f32, 0), |(m, i), (j, d)| if d > m || d.is_nan() { (d, j) } else { (m, i) });
    let ratio = worst / scale;
    assert!(
        ratio <= rel,
        "{what}: worst |diff| {worst:e} at {at} (got {}, want {}) = {ratio:e} of max|want| {scale:e} > {rel:e}",
        got[at],
        want[at]
    );
    println!("{what}: worst normwise error {ratio:e} (limit {rel:e})");
    ratio
}

/// Per element |got - want| <= rel·|want| + abs.
fn assert_elementwise(got: &[f32], want: &[f32], rel: f32, abs: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0.0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= rel * w.abs() + abs,
            "{what}: element {i}: got {g}, want {w} (|diff| {d:e} > {rel:e}·|want| + {abs:e})"
        );
        worst = worst.max(d / (w.abs() + abs));
    }
    println!("{what}: worst error {worst:e} of the allowed rel·|want| + abs");
}

/// Row-major reference: C[m, n] = op(A) op(B), f64 accumulation.
#[allow(clippy::too_many_arguments)]
fn naive_gemm(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for p in 0..k {
                let av = if trans_a { a[p * m + i] } else { a[i * k + p] };
                let bv = if trans_b { b[j * k + p] } else { b[p * n + j] };
                s += av as f64 * bv as f64;
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// tanh-approximation GELU and its derivative (cuBLASLt's GELU epilogues), by hand:
/// g(x) = 0.5x(1 + tanh(u)), u = √(2/π)(x + 0.044715x³);
/// g'(x) = 0.5(1 + tanh u) + 0.5x(1 - tanh²u)·√(2/π)(1 + 3·0.044715x²).
fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
}

fn gelu_tanh_grad(x: f32) -> f32 {
    let x = x as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let t = (c * (x + 0.044715 * x * x * x)).tanh();
    (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)) as f32
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_fp32_matches_cpu_linear() {
    let d = dev();
    let (m, k, n) = (67, 96, 80);
    let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
    let mut want = vec![0.0f32; m * n];
    cpu::gemm::linear(&mut want, &x, &w, Some(&b), m, k, n);
    let (gx, gw, gb) = (d.upload(&x).unwrap(), d.upload(&w).unwrap(), d.upload(&b).unwrap());
    let mut gy = d.zeros::<f32>(m * n).unwrap();
    d.linear::<f32, f32>(&mut gy, &gx, &gw, Some(&gb), m, k, n).unwrap();
    assert_normwise(&d.download(&gy).unwrap(), &want, 1e-5, "linear fp32 + bias");
    // Without bias.
    cpu::gemm::linear(&mut want, &x, &w, None, m, k, n);
    d.linear::<f32, f32>(&mut gy, &gx, &gw, None, m, k, n).unwrap();
    assert_normwise(&d.download(&gy).unwrap(), &want, 1e-5, "linear fp32");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_bf16_matches_cpu_on_rounded_inputs() {
    let d = dev();
    let (m, k, n) = (130, 192, 96);
    let (x, w, b) = (round_bf16(&values(m * k, 4)), round_bf16(&values(n * k, 5)), round_bf16(&values(n, 6)));
    let mut want = vec![0.0f32; m * n];
    cpu::gemm::linear(&mut want, &x, &w, Some(&b), m, k, n);
    let (gx, gw) = (d.upload(&to_bf16(&x)).unwrap(), d.upload(&to_bf16(&w)).unwrap());
    // bf16 in, bf16 out (bias in the output's type).
    let gb = d.upload(&to_bf16(&b)).unwrap();
    let mut gy = d.zeros::<bf16>(m * n).unwrap();
    d.linear::<bf16, bf16>(&mut gy, &gx, &gw, Some(&gb), m, k, n).unwrap();
    let scale = max_abs(&want);
    assert_elementwise(&from_bf16(&d.download(&gy).unwrap()), &want, 1.0 / 256.0, 1e-5 * scale, "linear bf16->bf16");
    // bf16 in, fp32 out: only the accumulation order differs.
    let gb32 = d.upload(&b).unwrap();
    let mut gy32 = d.zeros::<f32>(m * n).unwrap();
    d.linear::<bf16, f32>(&mut gy32, &gx, &gw, Some(&gb32), m, k, n).unwrap();
    assert_normwise(&d.download(&gy32).unwrap(), &want, 1e-5, "linear bf16->fp32");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_every_transpose_and_alpha_beta() {
    let d = dev();
    let (m, n, k) = (37, 29, 45);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let (a, b, c0) = (values(m * k, 7), values(k * n, 8), values(m * n, 9));
        let prod = naive_gemm(&a, &b, m, n, k, ta, tb);
        let want: Vec<f32> = prod.iter().zip(&c0).map(|(p, c)| 0.5 * p + 2.0 * c).collect();
        let (ga, gb) = (d.upload(&a).unwrap(), d.upload(&b).unwrap());
        let mut gc = d.upload(&c0).unwrap();
        let shape = GemmShape { trans_a: ta, trans_b: tb, ..GemmShape::new(m, n, k) };
        d.gemm::<f32, f32>(shape, 0.5, &ga, &gb, 2.0, &mut gc, Epilogue::None).unwrap();
        assert_normwise(&d.download(&gc).unwrap(), &want, 1e-5, &format!("gemm trans_a={ta} trans_b={tb}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_strided_batched_as_attention_scores() {
    // Q·Kᵀ per (batch·head): [T, D] x [T, D]ᵀ, then P·V: [T, T] x [T, D].
    let d = dev();
    let (batch, t, dh) = (6, 50, 32);
    let (q, kk, v) = (values(batch * t * dh, 10), values(batch * t * dh, 11), values(batch * t * dh, 12));
    let mut want_s = Vec::new();
    let mut want_o = Vec::new();
    for bi in 0..batch {
        let r = bi * t * dh..(bi + 1) * t * dh;
        let s = naive_gemm(&q[r.clone()], &kk[r.clone()], t, t, dh, false, true);
        want_o.extend(naive_gemm(&s, &v[r], t, dh, t, false, false));
        want_s.extend(s);
    }
    let (gq, gk, gv) = (d.upload(&q).unwrap(), d.upload(&kk).unwrap(), d.upload(&v).unwrap());
    let mut gs = d.zeros::<f32>(batch * t * t).unwrap();
    let shape = GemmShape { trans_b: true, ..GemmShape::new(t, t, dh) }.batched(batch);
    let shape = GemmShape { stride_b: t * dh, ..shape };
    d.gemm::<f32, f32>(shape, 1.0, &gq, &gk, 0.0, &mut gs, Epilogue::None).unwrap();
    assert_normwise(&d.download(&gs).unwrap(), &want_s, 1e-5, "batched Q·Kᵀ");
    let mut go = d.zeros::<f32>(batch * t * dh).unwrap();
    let shape = GemmShape::new(t, dh, t).batched(batch);
    d.gemm::<f32, f32>(shape, 1.0, &gs, &gv, 0.0, &mut go, Epilogue::None).unwrap();
    assert_normwise(&d.download(&go).unwrap(), &want_o, 1e-5, "batched P·V");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn epilogue_gelu_aux_bias_keeps_the_pre_activation() {
    let d = dev();
    let (m, k, n) = (48, 64, 128);
    let (x, w, b) = (values(m * k, 13), values(n * k, 14), values(n, 15));
    let mut pre = vec![0.0f32; m * n];
    cpu::gemm::linear(&mut pre, &x, &w, Some(&b), m, k, n);
    let act: Vec<f32> = pre.iter().map(|&v| gelu_tanh(v)).collect();
    let (gx, gw, gb) = (d.upload(&x).unwrap(), d.upload(&w).unwrap(), d.upload(&b).unwrap());
    let mut gy = d.zeros::<f32>(m * n).unwrap();
    let mut aux = d.zeros::<f32>(m * n).unwrap();
    d.gemm::<f32, f32>(
        GemmShape::linear(m, k, n),
        1.0,
        &gx,
        &gw,
        0.0,
        &mut gy,
        Epilogue::GeluAuxBias { bias: &gb, aux: &mut aux },
    )
    .unwrap();
    assert_normwise(&d.download(&aux).unwrap(), &pre, 1e-5, "GELU_AUX_BIAS aux = pre-activation");
    let got = d.download(&gy).unwrap();
    // cuBLASLt may evaluate tanh with the hardware approximation (relative error up to 2^-11,
    // i.e. up to 2.5e-4·|x| in GELU): 5e-4 normwise. That is as large as the tanh/erf gap
    // (~4e-4), so the formula is checked separately: the output must be closer to the tanh
    // GELU than to the erf GELU.
    assert_normwise(&got, &act, 5e-4, "GELU_AUX_BIAS output = gelu_tanh(pre)");
    let erf: Vec<f32> = pre.iter().map(|&v| cpu::math::gelu(v)).collect();
    let (to_tanh, to_erf) = (sq_dist(&got, &act), sq_dist(&got, &erf));
    println!("GELU epilogue: squared distance to tanh GELU {to_tanh:e}, to erf GELU {to_erf:e}");
    assert!(to_tanh < to_erf, "the GELU epilogue is not the tanh approximation: {to_tanh:e} vs erf {to_erf:e}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn epilogue_dgelu_is_the_mlp_activation_backward() {
    let d = dev();
    // dH[m, h] = dY[m, n] · W2[n, h] ⊙ gelu_tanh'(pre[m, h]).
    let (m, n, h) = (40, 24, 64);
    let (dy, w2, pre) =
        (values(m * n, 16), values(n * h, 17), values(m * h, 18).iter().map(|v| 3.0 * v).collect::<Vec<_>>());
    let prod = naive_gemm(&dy, &w2, m, h, n, false, false);
    let want: Vec<f32> = prod.iter().zip(&pre).map(|(p, &x)| p * gelu_tanh_grad(x)).collect();
    let (gdy, gw2, gpre) = (d.upload(&dy).unwrap(), d.upload(&w2).unwrap(), d.upload(&pre).unwrap());
    let mut gdh = d.zeros::<f32>(m * h).unwrap();
    d.gemm::<f32, f32>(GemmShape::new(m, h, n), 1.0, &gdy, &gw2, 0.0, &mut gdh, Epilogue::DGelu { aux: &gpre })
        .unwrap();
    // As above: the epilogue's tanh may be the hardware approximation.
    assert_normwise(&d.download(&gdh).unwrap(), &want, 1e-3, "DGELU");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn epilogue_bias_grad_with_weight_grad() {
    let d = dev();
    // Linear backward: dW[n_out, k] = dYᵀ·X with dY [rows, n_out], X [rows, k]; db = Σ_rows dY.
    let (rows, n_out, k) = (75, 32, 48);
    let (dy, x) = (values(rows * n_out, 19), values(rows * k, 20));
    let want_dw = naive_gemm(&dy, &x, n_out, k, rows, true, false);
    let want_db: Vec<f32> =
        (0..n_out).map(|i| (0..rows).map(|r| dy[r * n_out + i] as f64).sum::<f64>() as f32).collect();
    let (gdy, gx) = (d.upload(&dy).unwrap(), d.upload(&x).unwrap());
    let mut gdw = d.zeros::<f32>(n_out * k).unwrap();
    let mut gdb = d.zeros::<f32>(n_out).unwrap();
    let shape = GemmShape { trans_a: true, ..GemmShape::new(n_out, k, rows) };
    d.gemm::<f32, f32>(shape, 1.0, &gdy, &gx, 0.0, &mut gdw, Epilogue::BiasGrad { bias_grad: &mut gdb }).unwrap();
    assert_normwise(&d.download(&gdw).unwrap(), &want_dw, 1e-5, "BGRAD weight gradient");
    assert_normwise(&d.download(&gdb).unwrap(), &want_db, 1e-5, "BGRAD bias gradient");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_rejects_bad_shapes() {
    let d = dev();
    let a = d.zeros::<f32>(10).unwrap();
    let mut c = d.zeros::<f32>(10).unwrap();
    let err = d.gemm::<f32, f32>(GemmShape::new(4, 4, 4), 1.0, &a, &a, 0.0, &mut c, Epilogue::None).unwrap_err();
    assert!(matches!(err, beit::Error::InvalidArgument(_)), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn casts_round_to_nearest_even_bit_for_bit() {
    let d = dev();
    let mut x = values(100_003, 21).iter().map(|v| v * 1e3).collect::<Vec<_>>();
    // Ties, subnormals, signed zero, infinities, bf16's extremes.
    x.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -0.0,
        1e-40,
        -1e-41,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3.389e38,
        f32::MAX,
    ]);
    let gx = d.upload(&x).unwrap();
    let mut gb = d.zeros::<bf16>(x.len()).unwrap();
    d.cast_f32_to_bf16(&gx, &mut gb).unwrap();
    let got = d.download(&gb).unwrap();
    for (i, (g, &v)) in got.iter().zip(&x).enumerate() {
        assert_eq!(g.to_bits(), bf16::from_f32(v).to_bits(), "f32->bf16 of {v} (element {i})");
    }
    let mut back = d.zeros::<f32>(x.len()).unwrap();
    d.cast_bf16_to_f32(&gb, &mut back).unwrap();
    for (g, b) in d.download(&back).unwrap().iter().zip(&got) {
        assert_eq!(g.to_bits(), b.to_f32().to_bits(), "bf16->f32 is exact");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelu_forward_backward_match_cpu() {
    let d = dev();
    let n = 50_001;
    let x: Vec<f32> = values(n, 22).iter().map(|v| 6.0 * v).collect();
    let dy = values(n, 23);
    let want_y: Vec<f32> = x.iter().map(|&v| cpu::math::gelu(v)).collect();
    let mut want_dx = vec![0.0f32; n];
    cpu::backward::gelu_backward(&mut want_dx, &dy, &x);
    // fp32: 1e-5 relative plus 4e-6 absolute: the CPU's erf is a rational approximation with
    // absolute error below 1e-6 (src/backend/cpu/math.rs), scaled by up to |x|/2 = 3 here.
    let (gx, gdy) = (d.upload(&x).unwrap(), d.upload(&dy).unwrap());
    let mut gy = d.zeros::<f32>(n).unwrap();
    d.gelu_forward::<f32>(&gx, &mut gy).unwrap();
    assert_elementwise(&d.download(&gy).unwrap(), &want_y, 1e-5, 4e-6, "gelu fp32");
    let mut gdx = d.zeros::<f32>(n).unwrap();
    d.gelu_backward::<f32>(&gx, &gdy, &mut gdx).unwrap();
    assert_elementwise(&d.download(&gdx).unwrap(), &want_dx, 1e-5, 4e-6, "gelu backward fp32");
    // In place equals out of place.
    let mut inplace = d.upload(&x).unwrap();
    d.gelu_forward_inplace::<f32>(&mut inplace).unwrap();
    assert_eq!(d.download(&inplace).unwrap(), d.download(&gy).unwrap());

    // bf16: rounded inputs; output rounding adds half a bf16 ulp (2^-9 relative).
    let (xb, dyb) = (round_bf16(&x), round_bf16(&dy));
    let want_yb: Vec<f32> = xb.iter().map(|&v| cpu::math::gelu(v)).collect();
    let mut want_dxb = vec![0.0f32; n];
    cpu::backward::gelu_backward(&mut want_dxb, &dyb, &xb);
    let (gxb, gdyb) = (d.upload(&to_bf16(&xb)).unwrap(), d.upload(&to_bf16(&dyb)).unwrap());
    let mut gyb = d.zeros::<bf16>(n).unwrap();
    d.gelu_forward::<bf16>(&gxb, &mut gyb).unwrap();
    assert_elementwise(&from_bf16(&d.download(&gyb).unwrap()), &want_yb, 1.0 / 256.0, 4e-6, "gelu bf16");
    let mut gdxb = d.zeros::<bf16>(n).unwrap();
    d.gelu_backward::<bf16>(&gxb, &gdyb, &mut gdxb).unwrap();
    assert_elementwise(&from_bf16(&d.download(&gdxb).unwrap()), &want_dxb, 1.0 / 256.0, 4e-6, "gelu backward bf16");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn residual_add_and_axpy() {
    let d = dev();
    let n = 70_000;
    let (a, b) = (values(n, 24), values(n, 25));
    // fp32 a + b is one correctly rounded add on both sides: bit for bit.
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let (ga, gb) = (d.upload(&a).unwrap(), d.upload(&b).unwrap());
    let mut gy = d.zeros::<f32>(n).unwrap();
    d.add::<f32>(&ga, &gb, &mut gy).unwrap();
    assert_eq!(d.download(&gy).unwrap(), want, "add fp32");
    let mut acc = d.upload(&a).unwrap();
    d.residual_add::<f32>(&mut acc, &gb).unwrap();
    assert_eq!(d.download(&acc).unwrap(), want, "residual_add fp32 in place");
    // bf16: bf16(f32(a) + f32(b)) on both sides: bit for bit.
    let (ab, bb) = (to_bf16(&a), to_bf16(&b));
    let want_b: Vec<u16> = ab.iter().zip(&bb).map(|(x, y)| bf16::from_f32(x.to_f32() + y.to_f32()).to_bits()).collect();
    let mut accb = d.upload(&ab).unwrap();
    d.residual_add::<bf16>(&mut accb, &d.upload(&bb).unwrap()).unwrap();
    assert_eq!(d.download(&accb).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want_b, "residual_add bf16");
    // axpy: y + s·x; NVRTC may fuse into one FMA (one rounding instead of two): 1e-6 relative.
    let want_axpy: Vec<f32> = a.iter().zip(&b).map(|(x, y)| y + 0.37 * x).collect();
    let mut gy2 = d.upload(&b).unwrap();
    d.axpy::<f32>(0.37, &ga, &mut gy2).unwrap();
    assert_elementwise(&d.download(&gy2).unwrap(), &want_axpy, 1e-6, 1e-7, "axpy fp32");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn adamw_matches_cpu_adamw() {
    let d = dev();
    let n = 40_000;
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 };
    let decay_mask: Vec<f32> = (0..n).map(|i| if (i / 1000) % 3 == 0 { 0.0 } else { 1.0 }).collect();
    // A gap (elements 10_000..10_500 are not trained, like the zero key bias).
    let trained = vec![(0, 10_000), (10_500, n - 10_500)];
    let lr_scale: Vec<f32> = (0..n).map(|i| 0.65f32.powi((i / 5000) as i32)).collect();
    let mut cpu_opt = AdamW::with_mask(config, decay_mask.clone(), trained.clone());
    let mut gpu_opt = beit::backend::cuda::adamw::GpuAdamW::new(&d, config, &decay_mask, &trained).unwrap();
    let mut params = values(n, 26);
    let mut gp = d.upload(&params).unwrap();
    let mut gbf = d.zeros::<bf16>(n).unwrap();
    let gscale = d.upload(&lr_scale).unwrap();
    for step in 0..3u64 {
        let grads: Vec<f32> = values(n, 100 + step).iter().map(|g| g * 0.1).collect();
        let gg = d.upload(&grads).unwrap();
        let lr = 1e-3 * (step as f32 + 1.0);
        let scale = if step == 1 { None } else { Some(&lr_scale[..]) };
        cpu_opt.step(&mut params, &grads, lr, scale);
        let gscale_arg: Option<&dyn cudarc::driver::DevicePtr<f32>> = if step == 1 { None } else { Some(&gscale) };
        gpu_opt.step(&d, &mut gp, &gg, lr, gscale_arg, Some(&mut gbf)).unwrap();
    }
    // Written with explicitly rounded intrinsics in the CPU's order: expected bit-identical;
    // 1e-6 relative leaves room for one ulp should a libm differ, and nothing more.
    let got = d.download(&gp).unwrap();
    assert_elementwise(&got, &params, 1e-6, 0.0, "adamw params");
    assert_elementwise(&d.download(&gpu_opt.exp_avg).unwrap(), &cpu_opt.exp_avg, 1e-6, 0.0, "adamw exp_avg");
    assert_elementwise(&d.download(&gpu_opt.exp_avg_sq).unwrap(), &cpu_opt.exp_avg_sq, 1e-6, 0.0, "adamw exp_avg_sq");
    let identical = got.iter().zip(&params).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
    println!("adamw: {identical} of {n} parameters bit-identical to the CPU");
    // The untrained gap is untouched; the bf16 copy is bf16(params) exactly.
    let start = values(n, 26);
    assert_eq!(&got[10_000..10_500], &start[10_000..10_500]);
    for (b, p) in d.download(&gbf).unwrap().iter().zip(&got).take(10_000) {
        assert_eq!(b.to_bits(), bf16::from_f32(*p).to_bits());
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn global_norm_and_clip_match_cpu_and_are_deterministic() {
    let d = dev();
    let n = 1_000_003;
    let g = values(n, 27);
    let want = beit::train::clip::global_norm(&g);
    let gg = d.upload(&g).unwrap();
    let got = d.global_norm(&gg).unwrap();
    let rel = ((got - want) / want).abs();
    assert!(rel < 1e-12, "norm {got} vs CPU {want}: relative {rel:e}");
    println!("global norm: GPU {got} CPU {want} relative difference {rel:e}");
    for _ in 0..3 {
        assert_eq!(d.global_norm(&gg).unwrap().to_bits(), got.to_bits(), "the norm must be bit-identical run to run");
    }
    // Clip below the norm: scaled like the CPU; above: untouched.
    let mut host = g.clone();
    let before = beit::train::clip::clip_grad_norm(&mut host, 10.0);
    let mut gclip = d.upload(&g).unwrap();
    let mut norm_out = d.zeros::<f64>(2).unwrap();
    d.clip_grad_norm(&mut gclip, 10.0, &mut norm_out).unwrap();
    let norms = d.download(&norm_out).unwrap();
    assert!(((norms[1] - before) / before).abs() < 1e-12);
    assert_elementwise(&d.download(&gclip).unwrap(), &host, 1e-6, 0.0, "clip_grad_norm");
    let mut gnoclip = d.upload(&g).unwrap();
    d.clip_grad_norm(&mut gnoclip, 1e9, &mut norm_out).unwrap();
    assert_eq!(d.download(&gnoclip).unwrap(), g, "a norm below max_norm leaves the gradients as they are");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_reports_itself() {
    let d = dev();
    let info = d.info();
    println!("{} sm_{}{} arch {}", info.name, info.compute_capability.0, info.compute_capability.1, d.arch().name());
    assert!(info.compute_capability >= (8, 0));
    assert!(d.multiprocessors() > 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn epilogues_in_bf16() {
    // The training path's precision: bf16 in and out, aux and bias gradient in bf16. The CPU
    // runs on the bf16-rounded inputs; outputs carry bf16 rounding (2^-9 relative) on top of
    // the fp32 tolerances of the tests above.
    let d = dev();
    let (m, k, n) = (64, 96, 128);
    let (x, w, b) = (round_bf16(&values(m * k, 30)), round_bf16(&values(n * k, 31)), round_bf16(&values(n, 32)));
    let mut pre = vec![0.0f32; m * n];
    cpu::gemm::linear(&mut pre, &x, &w, Some(&b), m, k, n);
    let act: Vec<f32> = pre.iter().map(|&v| gelu_tanh(v)).collect();
    let (gx, gw, gb) =
        (d.upload(&to_bf16(&x)).unwrap(), d.upload(&to_bf16(&w)).unwrap(), d.upload(&to_bf16(&b)).unwrap());
    let mut gy = d.zeros::<bf16>(m * n).unwrap();
    let mut aux = d.zeros::<bf16>(m * n).unwrap();
    d.gemm::<bf16, bf16>(
        GemmShape::linear(m, k, n),
        1.0,
        &gx,
        &gw,
        0.0,
        &mut gy,
        Epilogue::GeluAuxBias { bias: &gb, aux: &mut aux },
    )
    .unwrap();
    let scale = max_abs(&pre);
    assert_elementwise(
        &from_bf16(&d.download(&aux).unwrap()),
        &pre,
        1.0 / 256.0,
        1e-5 * scale,
        "bf16 GELU_AUX_BIAS aux",
    );
    assert_elementwise(
        &from_bf16(&d.download(&gy).unwrap()),
        &act,
        1.0 / 256.0,
        1e-4 * scale,
        "bf16 GELU_AUX_BIAS out",
    );
    // DGELU with the stored (bf16) pre-activation.
    let pre_b = from_bf16(&d.download(&aux).unwrap());
    let dy = round_bf16(&values(m * n, 33));
    let w2 = round_bf16(&values(n * n, 34));
    let prod = naive_gemm(&dy, &w2, m, n, n, false, false);
    let want: Vec<f32> = prod.iter().zip(&pre_b).map(|(p, &x)| p * gelu_tanh_grad(x)).collect();
    let mut gdh = d.zeros::<bf16>(m * n).unwrap();
    let (gdy, gw2) = (d.upload(&to_bf16(&dy)).unwrap(), d.upload(&to_bf16(&w2)).unwrap());
    d.gemm::<bf16, bf16>(GemmShape::new(m, n, n), 1.0, &gdy, &gw2, 0.0, &mut gdh, Epilogue::DGelu { aux: &aux })
        .unwrap();
    assert_elementwise(&from_bf16(&d.download(&gdh).unwrap()), &want, 1.0 / 256.0, 1e-3 * max_abs(&want), "bf16 DGELU");
    // BGRAD: dW = dYᵀ·X and db = Σ_rows dY.
    let want_dw = naive_gemm(&dy, &x, n, k, m, true, false);
    let want_db: Vec<f32> = (0..n).map(|i| (0..m).map(|r| dy[r * n + i] as f64).sum::<f64>() as f32).collect();
    let mut gdw = d.zeros::<bf16>(n * k).unwrap();
    let mut gdb = d.zeros::<bf16>(n).unwrap();
    let shape = GemmShape { trans_a: true, ..GemmShape::new(n, k, m) };
    d.gemm::<bf16, bf16>(shape, 1.0, &gdy, &gx, 0.0, &mut gdw, Epilogue::BiasGrad { bias_grad: &mut gdb }).unwrap();
    assert_elementwise(
        &from_bf16(&d.download(&gdw).unwrap()),
        &want_dw,
        1.0 / 256.0,
        1e-5 * max_abs(&want_dw),
        "bf16 BGRAD dW",
    );
    assert_elementwise(
        &from_bf16(&d.download(&gdb).unwrap()),
        &want_db,
        1.0 / 256.0,
        1e-5 * max_abs(&want_db),
        "bf16 BGRAD db",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn patch_embedding_matches_cpu_conv() {
    use beit::backend::cuda::patch_embed::PatchEmbedShape;
    let d = dev();
    // Two 3x36x44 images, 8x8 patches: a 4x5 grid; the last 4 rows and columns are dropped, as
    // conv2d drops them.
    let (b, c, h, w, p, hidden) = (2, 3, 36, 44, 8, 64);
    let shape = PatchEmbedShape { batch: b, channels: c, height: h, width: w, patch_h: p, patch_w: p, hidden };
    let conv = cpu::conv::Conv2dShape {
        batch: b,
        in_channels: c,
        out_channels: hidden,
        in_h: h,
        in_w: w,
        kernel: p,
        stride: p,
        padding: 0,
    };
    let n = shape.num_patches();
    assert_eq!(n, conv.out_h() * conv.out_w());
    let reference = |x: &[f32], wt: &[f32], bias: &[f32]| {
        let mut out = vec![0.0f32; b * hidden * n];
        cpu::conv::conv2d_forward(&conv, x, wt, Some(bias), &mut out);
        // [B, D, N] -> [B, N, D] (HF: flatten(2).transpose(1, 2)).
        let mut tokens = vec![0.0f32; b * n * hidden];
        for bi in 0..b {
            for di in 0..hidden {
                for ni in 0..n {
                    tokens[(bi * n + ni) * hidden + di] = out[(bi * hidden + di) * n + ni];
                }
            }
        }
        tokens
    };
    let (x, wt, bias) = (values(b * c * h * w, 40), values(hidden * c * p * p, 41), values(hidden, 42));
    let want = reference(&x, &wt, &bias);
    let gx = d.upload(&x).unwrap();
    let mut out = d.zeros::<f32>(b * n * hidden).unwrap();
    d.patch_embed::<f32>(shape, &gx, &d.upload(&wt).unwrap(), &d.upload(&bias).unwrap(), &mut out).unwrap();
    assert_normwise(&d.download(&out).unwrap(), &want, 1e-5, "patch embedding fp32");
    // bf16: pixels are rounded to bf16 by the kernel, weights stored in bf16.
    let (xr, wr, br) = (round_bf16(&x), round_bf16(&wt), round_bf16(&bias));
    let want_b = reference(&xr, &wr, &br);
    let mut outb = d.zeros::<bf16>(b * n * hidden).unwrap();
    d.patch_embed::<bf16>(shape, &gx, &d.upload(&to_bf16(&wr)).unwrap(), &d.upload(&to_bf16(&br)).unwrap(), &mut outb)
        .unwrap();
    assert_elementwise(
        &from_bf16(&d.download(&outb).unwrap()),
        &want_b,
        1.0 / 256.0,
        1e-5 * max_abs(&want_b),
        "patch embedding bf16",
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_on_unaligned_views() {
    // Operands that start one element into their buffers (4-byte aligned, not 16): the
    // algorithm must be chosen for that alignment, and the views must be read, not the buffers.
    let d = dev();
    let (m, k, n) = (33, 40, 24);
    let (x, w, b) = (values(m * k + 1, 50), values(n * k + 1, 51), values(n, 52));
    let mut want = vec![0.0f32; m * n];
    cpu::gemm::linear(&mut want, &x[1..], &w[1..], Some(&b), m, k, n);
    let (gx, gw, gb) = (d.upload(&x).unwrap(), d.upload(&w).unwrap(), d.upload(&b).unwrap());
    let mut gy = d.zeros::<f32>(m * n + 1).unwrap();
    {
        let (xv, wv) = (gx.slice(1..), gw.slice(1..));
        let mut yv = gy.slice_mut(1..);
        d.linear::<f32, f32>(&mut yv, &xv, &wv, Some(&gb), m, k, n).unwrap();
    }
    let got = d.download(&gy).unwrap();
    assert_eq!(got[0], 0.0, "the element before the view is untouched");
    assert_normwise(&got[1..], &want, 1e-5, "linear on unaligned views");
}

// ------------------------------------------------------------------ the Backend trait's pass ops

/// The views of [`pass_ops`], planned alike on a host (shared) and a device (split) planner.
struct PassViews {
    pixels: View,
    patches: View,
    embedded: View,
    x: View,
    dembedded: View,
    mask: View,
    rel_index: View,
    shared: View,
    bias: View,
    resized_table: View,
    dbias: View,
    rows: View,
    labels: View,
    gathered: View,
    scattered: View,
    pooled: View,
    dhidden: View,
    logits: View,
    targets: View,
    copied: View,
}

/// The sizes of the case: 2 images of 3x16x16 in 4x4 patches (a 4x4 grid), width 32, 2 heads,
/// 50 classes, 11 masked rows.
const PB: usize = 2;
const PC: usize = 3;
const PHW: usize = 16;
const PP: usize = 4;
const PD: usize = 32;
const PHEADS: usize = 2;
const PCLASSES: usize = 50;

fn pass_shape() -> beit::backend::shapes::PatchEmbedShape {
    beit::backend::shapes::PatchEmbedShape {
        batch: PB,
        channels: PC,
        height: PHW,
        width: PHW,
        patch_h: PP,
        patch_w: PP,
        hidden: PD,
    }
}

/// The parameters (and gradients) of the case, one flat store: CLS token, mask token,
/// positions `[T, D]`, a relative position table `[M, heads]`.
fn pass_params(n: usize, m: usize) -> (TokenParams, View, usize) {
    let t = n + 1;
    let cls = View::new(Space::Param, 0, PD);
    let mask_token = View::new(Space::Param, PD, PD);
    let positions = View::new(Space::Param, 2 * PD, t * PD);
    let table = View::new(Space::Param, (2 + t) * PD, m * PHEADS);
    (TokenParams { cls, mask_token: Some(mask_token), positions: Some(positions) }, table, (2 + t) * PD + m * PHEADS)
}

fn as_grad(v: View) -> View {
    View { space: Space::Grad, ..v }
}

fn plan_pass(p: &mut Planner, masked: usize, m: usize) -> PassViews {
    let s = pass_shape();
    let (n, k) = (s.num_patches(), s.patch_len());
    let t = n + 1;
    PassViews {
        pixels: p.stat(PB * PC * PHW * PHW),
        patches: p.act(PB * n * k),
        embedded: p.act(PB * n * PD),
        x: p.act(PB * t * PD),
        dembedded: p.act(PB * n * PD),
        mask: p.index(PB * n),
        rel_index: p.index(t * t),
        shared: p.stat(PHEADS * t * t),
        bias: p.stat(PHEADS * t * t),
        resized_table: p.stat(m * PHEADS),
        dbias: p.stat(PHEADS * t * t),
        rows: p.index(masked),
        labels: p.index(masked),
        gathered: p.act(masked * PD),
        scattered: p.act(PB * t * PD),
        pooled: p.act(PB * PD),
        dhidden: p.act(PB * t * PD),
        logits: p.act(masked * PCLASSES),
        targets: p.act(masked * PCLASSES),
        copied: p.stat(PHEADS * t * t),
    }
}

/// Runs every op the passes added to the trait (data movement, relative position bias, token
/// assembly, heads, losses) on `be` and returns each result, read back as f32.
fn pass_ops<B: Backend>(
    be: &B,
    m: &mut B::Memory<'_>,
    v: &PassViews,
    masked_rows: &[usize],
) -> Vec<(String, Vec<f32>)> {
    let s = pass_shape();
    let n = s.num_patches();
    let t = n + 1;
    let grid = s.grid();
    let tables = rel_pos_table_rows(grid);
    let (tokens, table, _) = pass_params(n, tables);
    let count = masked_rows.len();
    let mut out = Vec::new();
    let read = |be: &B, m: &mut B::Memory<'_>, name: &str, view: View| {
        let mut host = vec![0.0f32; view.len()];
        be.download(m, view, &mut host).unwrap();
        (name.to_string(), host)
    };
    // Embeddings: patch rows, token assembly with a mask and positions, its backward.
    be.upload(m, v.pixels, &values(v.pixels.len(), 60)).unwrap();
    be.im2col(m, v.patches, v.pixels, s).unwrap();
    out.push(read(be, m, "im2col", v.patches));
    let mask: Vec<usize> = (0..PB * n).map(|i| masked_rows.contains(&((i / n) * t + 1 + i % n)) as usize).collect();
    be.upload_indices(m, v.mask, &mask).unwrap();
    be.upload(m, v.embedded, &values(v.embedded.len(), 61)).unwrap();
    be.assemble_tokens(m, v.x, v.embedded, tokens, Some(v.mask), PB, n, PD).unwrap();
    out.push(read(be, m, "assemble_tokens", v.x));
    let grads = TokenParams {
        cls: as_grad(tokens.cls),
        mask_token: tokens.mask_token.map(as_grad),
        positions: tokens.positions.map(as_grad),
    };
    be.assemble_tokens_backward(m, v.dembedded, grads, v.x, Some(v.mask), PB, n, PD).unwrap();
    out.push(read(be, m, "assemble_tokens_backward dembedded", v.dembedded));
    out.push(read(be, m, "assemble_tokens_backward dcls", grads.cls));
    out.push(read(be, m, "assemble_tokens_backward dmask_token", grads.mask_token.unwrap()));
    out.push(read(be, m, "assemble_tokens_backward dpositions", grads.positions.unwrap()));
    // Relative position bias: from the parameter table, then a resized (f32) table onto it.
    be.upload_indices(m, v.rel_index, &relative_position_index(grid)).unwrap();
    be.relpos_bias(m, v.shared, None, table, v.rel_index, PHEADS).unwrap();
    out.push(read(be, m, "relpos_bias", v.shared));
    be.upload(m, v.resized_table, &values(v.resized_table.len(), 62)).unwrap();
    be.relpos_bias(m, v.bias, Some(v.shared), v.resized_table, v.rel_index, PHEADS).unwrap();
    out.push(read(be, m, "relpos_bias onto a shared bias", v.bias));
    be.upload(m, v.dbias, &values(v.dbias.len(), 63)).unwrap();
    be.relpos_bias_backward(m, as_grad(table), v.dbias, v.rel_index, PHEADS).unwrap();
    out.push(read(be, m, "relpos_bias_backward", as_grad(table)));
    be.copy(m, v.copied, v.bias).unwrap();
    be.add_into(m, v.copied, v.dbias).unwrap();
    out.push(read(be, m, "copy, add_into", v.copied));
    // Heads: gather / scatter rows, the mean of the patch tokens and its backward.
    be.upload_indices(m, v.rows, masked_rows).unwrap();
    be.gather_rows(m, v.gathered, v.x, v.rows, PD).unwrap();
    out.push(read(be, m, "gather_rows", v.gathered));
    be.upload(m, v.scattered, &values(v.scattered.len(), 64)).unwrap();
    be.scatter_rows(m, v.scattered, v.gathered, v.rows, PD).unwrap();
    out.push(read(be, m, "scatter_rows", v.scattered));
    be.mean_patch_tokens(m, v.pooled, v.x, t, PD).unwrap();
    out.push(read(be, m, "mean_patch_tokens", v.pooled));
    be.upload(m, v.dhidden, &values(v.dhidden.len(), 65)).unwrap();
    be.mean_patch_tokens_backward(m, v.dhidden, v.pooled, t, PD).unwrap();
    out.push(read(be, m, "mean_patch_tokens_backward", v.dhidden));
    // Losses, each part of a batch of count + 3 rows; the loss sums add up until taken.
    let labels: Vec<usize> = (0..count).map(|r| (r * 7 + 3) % PCLASSES).collect();
    be.upload_indices(m, v.labels, &labels).unwrap();
    for (name, smoothing, seed) in [("cross_entropy", None, 66), ("cross_entropy smoothed", Some(0.1), 67)] {
        let logits: Vec<f32> = values(v.logits.len(), seed).iter().map(|x| 4.0 * x).collect();
        be.upload(m, v.logits, &logits).unwrap();
        be.cross_entropy(
            m,
            v.logits.prefix((count - 2) * PCLASSES),
            v.labels.prefix(count - 2),
            PCLASSES,
            smoothing,
            count + 3,
        )
        .unwrap();
        let rest = v.logits.sub((count - 2) * PCLASSES, 2 * PCLASSES);
        be.cross_entropy(m, rest, v.labels.sub(count - 2, 2), PCLASSES, smoothing, count + 3).unwrap();
        out.push(read(be, m, &format!("{name} gradient"), v.logits));
        let loss = be.take_loss(m).unwrap();
        out.push((format!("{name} loss"), vec![loss as f32]));
    }
    be.upload(m, v.logits, &values(v.logits.len(), 68)).unwrap();
    be.upload(m, v.targets, &values(v.targets.len(), 69)).unwrap();
    be.mean_squared_error(m, v.logits, v.targets, PCLASSES, count + 3).unwrap();
    out.push(read(be, m, "mean_squared_error gradient", v.logits));
    out.push(("mean_squared_error loss".into(), vec![be.take_loss(m).unwrap() as f32]));
    assert_eq!(be.take_loss(m).unwrap(), 0.0, "take_loss clears the sum");
    out
}

fn pass_ops_case<T: Act>(rel: f32) {
    let s = pass_shape();
    let (n, grid) = (s.num_patches(), s.grid());
    let t = n + 1;
    let tables = rel_pos_table_rows(grid);
    let (_, _, param_len) = pass_params(n, tables);
    let params = values(param_len, 70);
    // Masked rows in [batch, patch] order: rows of x (skipping each image's CLS token).
    let masked_rows: Vec<usize> =
        (0..PB * n).filter(|i| i % 3 != 1).map(|i| (i / n) * t + 1 + i % n).take(11).collect();
    // The CPU backend.
    let mut host_plan = Planner::shared();
    let hv = plan_pass(&mut host_plan, masked_rows.len(), tables);
    let mut arena = Arena::new(&host_plan).unwrap();
    let mut host_grads = vec![0.0f32; param_len];
    let want = {
        let mut m = HostMemory::new(&mut arena, &params, &mut host_grads);
        pass_ops(&cpu::ops::Cpu, &mut m, &hv, &masked_rows)
    };
    // The CUDA backend, on views of a split plan.
    let d = dev();
    let be = CudaBackend::<T>::new(d.clone());
    let mut dev_plan = Planner::split();
    let dv = plan_pass(&mut dev_plan, masked_rows.len(), tables);
    let mut dev_arena = DeviceArena::<T>::new(&d, &dev_plan, Scratch::default().loss(masked_rows.len())).unwrap();
    let dev_params = DeviceParams::<T>::upload(&d, &params).unwrap();
    let mut dev_grads = d.zeros::<f32>(param_len).unwrap();
    let got = {
        let mut m = CudaMemory::new(&d, &mut dev_arena, &dev_params, Some(&mut dev_grads)).unwrap();
        pass_ops(&be, &mut m, &dv, &masked_rows)
    };
    assert_eq!(got.len(), want.len());
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        let scale = max_abs(w).max(1.0);
        let err = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        eprintln!("{} {name}: max |gpu - cpu| {err:.3e} of max {scale:.3e}", T::NAME);
        assert!(err <= rel * scale, "{} {name}: max |gpu - cpu| {err:e} exceeds {rel:e} x {scale:e}", T::NAME);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn backend_pass_ops_match_the_cpu_backend() {
    // fp32: the CPU's arithmetic to rounding. bf16: activations (and the working parameters)
    // are stored in bf16 (2^-9 relative), so each result is within a few of its roundings.
    pass_ops_case::<f32>(1e-5);
    pass_ops_case::<bf16>(2e-2);
}
