//! The GPU's dVAE bottleneck (`backend::cuda::relaxation`: Gumbel-softmax, its backward, the KL
//! to the uniform prior, the tokenizing argmax) against the CPU's `dvae::relaxation`, the
//! reference. Every test needs a CUDA GPU: they are `#[ignore]`d so CPU CI lists them, and
//! scripts/cuda-mock (CI) and scripts/gpu-check run them.
//!
//! Tolerances: the noise words are the CPU's (the same ChaCha8 stream), but exp and ln are
//! CUDA's (within 2 ulp of the CPU's polynomials) and row sums run as block trees, so the
//! relaxed codes, gradients and KL agree to 1e-5 of their largest magnitude; the argmax is exact.

use beit::backend::cuda::relaxation::kl_from_neg_entropy;
use beit::backend::cuda::CudaDevice;
use beit::dvae::relaxation;

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

/// max |got − want| <= rel · max |want|.
fn assert_normwise(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst <= rel * scale, "{what}: worst |diff| {worst:e} > {rel:e} of max|want| {scale:e}");
    println!("{what}: worst normwise error {:e} (limit {rel:e})", worst / scale);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gumbel_softmax_and_its_backward_follow_the_cpu_noise_and_math() {
    let d = dev();
    // A vocabulary that is not a multiple of a ChaCha block (16 words), more rows than a
    // block's threads touch at once.
    for (rows, vocab, tau, seed, step) in [(40, 100, 0.9f32, 7u64, 0u64), (9, 1000, 1.0 / 16.0, 123, 4567)] {
        let logits: Vec<f32> = values(rows * vocab, seed).iter().map(|v| 3.0 * v).collect();
        let dy = values(rows * vocab, seed + 1);
        let mut want = vec![0.0; logits.len()];
        relaxation::gumbel_softmax(&logits, vocab, tau, seed, step, &mut want);
        let (gl, gdy) = (d.upload(&logits).unwrap(), d.upload(&dy).unwrap());
        let mut gy = d.zeros::<f32>(logits.len()).unwrap();
        d.gumbel_softmax(&gl, &mut gy, vocab, tau, seed, step).unwrap();
        let y = d.download(&gy).unwrap();
        assert_normwise(&y, &want, 1e-5, &format!("gumbel softmax {rows}x{vocab} tau {tau}"));
        // The same seed and step give the same bits; another step other noise.
        let mut again = d.zeros::<f32>(logits.len()).unwrap();
        d.gumbel_softmax(&gl, &mut again, vocab, tau, seed, step).unwrap();
        assert_eq!(d.download(&again).unwrap(), y, "a second run differs");
        d.gumbel_softmax(&gl, &mut again, vocab, tau, seed, step + 1).unwrap();
        assert_ne!(d.download(&again).unwrap(), y, "the step does not change the noise");

        let mut want_d = vec![0.0; logits.len()];
        relaxation::gumbel_softmax_backward(&want, &dy, vocab, tau, &mut want_d);
        let gwant = d.upload(&want).unwrap();
        let mut gd = d.zeros::<f32>(logits.len()).unwrap();
        d.gumbel_softmax_backward(&gwant, &gdy, &mut gd, vocab, tau).unwrap();
        assert_normwise(&d.download(&gd).unwrap(), &want_d, 1e-5, &format!("gumbel softmax backward {rows}x{vocab}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kl_to_uniform_and_argmax_equal_the_cpu() {
    let d = dev();
    let (rows, vocab, weight) = (33, 513, 0.25f32);
    let mut logits: Vec<f32> = values(rows * vocab, 5).iter().map(|v| 4.0 * v).collect();
    // Ties (the first wins) and a NaN (skipped unless first) for the argmax.
    logits[10] = 20.0;
    logits[400] = 20.0;
    logits[vocab + 3] = f32::NAN;
    logits[2 * vocab] = f32::NAN;
    let clean: Vec<f32> = logits.iter().map(|v| if v.is_nan() { 0.5 } else { *v }).collect();
    let start = values(rows * vocab, 6);

    let mut want_d = start.clone();
    let want_kl = relaxation::kl_to_uniform(&clean, vocab, weight, Some(&mut want_d));
    let gl = d.upload(&clean).unwrap();
    let mut gd = d.upload(&start).unwrap();
    let mut parts = d.zeros::<f64>(rows).unwrap();
    d.kl_to_uniform_rows(&gl, Some(&mut gd), &mut parts, vocab, weight / rows as f32).unwrap();
    let kl = kl_from_neg_entropy(&d.download(&parts).unwrap(), vocab);
    assert!((kl - want_kl).abs() <= 1e-5 * want_kl.abs(), "KL {kl} on the GPU, {want_kl} on the CPU");
    assert_normwise(&d.download(&gd).unwrap(), &want_d, 1e-5, "KL gradient");

    let want_tokens = relaxation::argmax_rows(&logits, vocab);
    let gnan = d.upload(&logits).unwrap();
    let mut gt = d.zeros::<u32>(rows).unwrap();
    d.argmax_rows(&gnan, &mut gt, vocab).unwrap();
    let tokens = d.download(&gt).unwrap();
    assert_eq!(tokens, want_tokens);
    assert_eq!((tokens[0], tokens[2]), (10, 0), "the first of two maxima; a NaN in first place");
}

// The same ops through the `CodeOps` trait on both backends, over planned views.

use beit::backend::code_ops::CodeOps;
use beit::backend::cpu::ops::Cpu;
use beit::backend::cuda::{CudaBackend, CudaMemory, DeviceArena, DeviceParams, Scratch};
use beit::backend::memory::{Arena, HostMemory, Planner, View};

const ROWS: usize = 24;
const VOCAB: usize = 200;

struct Views {
    logits: View,
    y: View,
    dy: View,
    dlogits: View,
}

fn plan(p: &mut Planner) -> Views {
    let n = ROWS * VOCAB;
    Views { logits: p.act(n), y: p.act(n), dy: p.act(n), dlogits: p.act(n) }
}

/// Codes, their gradient (the relaxation's backward plus the KL's), the KL and the tokens.
fn run<B: CodeOps>(be: &B, m: &mut B::Memory<'_>, v: &Views) -> (Vec<f32>, Vec<f32>, f64, Vec<u32>) {
    let logits: Vec<f32> = values(ROWS * VOCAB, 50).iter().map(|x| 3.0 * x).collect();
    be.upload(m, v.logits, &logits).unwrap();
    be.upload(m, v.dy, &values(ROWS * VOCAB, 51)).unwrap();
    be.gumbel_softmax(m, v.y, v.logits, VOCAB, 0.5, 9, 3).unwrap();
    be.gumbel_softmax_backward(m, v.dlogits, v.y, v.dy, VOCAB, 0.5).unwrap();
    be.kl_to_uniform(m, v.logits, Some(v.dlogits), VOCAB, 0.1).unwrap();
    let kl = be.take_loss(m).unwrap();
    let mut tokens = vec![0u32; ROWS];
    be.argmax_rows(m, v.y, VOCAB, &mut tokens).unwrap();
    let (mut y, mut d) = (vec![0.0; ROWS * VOCAB], vec![0.0; ROWS * VOCAB]);
    be.download(m, v.y, &mut y).unwrap();
    be.download(m, v.dlogits, &mut d).unwrap();
    (y, d, kl, tokens)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn code_ops_through_the_trait_equal_the_cpu_backend() {
    let mut p = Planner::shared();
    let v = plan(&mut p);
    let mut arena = Arena::new(&p).unwrap();
    let mut grads = vec![0.0f32; 1];
    let mut m = HostMemory::new(&mut arena, &[0.0], &mut grads);
    let (want_y, want_d, want_kl, want_tokens) = run(&Cpu, &mut m, &v);

    let d = dev();
    let gpu = CudaBackend::<f32>::new(d.clone());
    let mut p = Planner::split();
    let v = plan(&mut p);
    let mut arena = DeviceArena::<f32>::new(&d, &p, Scratch::default()).unwrap();
    let params = DeviceParams::<f32>::upload(&d, &[0.0]).unwrap();
    let mut dgrads = d.zeros::<f32>(1).unwrap();
    let mut m = CudaMemory::new(&d, &mut arena, &params, Some(&mut dgrads)).unwrap();
    let (y, dl, kl, tokens) = run(&gpu, &mut m, &v);

    assert_normwise(&y, &want_y, 1e-5, "codes");
    assert_normwise(&dl, &want_d, 1e-5, "code logits gradient");
    assert!((kl - want_kl).abs() <= 1e-6 * want_kl.abs(), "KL {kl} on the GPU, {want_kl} on the CPU");
    // The codes agree to rounding, so their argmax does wherever the top two are apart.
    assert_eq!(tokens, want_tokens);
}
