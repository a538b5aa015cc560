//! The GPU image ops (`backend::cuda::image`: ReLU, 2x2 max pooling, bilinear resize, adaptive
//! average pooling, batch norm, forward and backward; scaling, the transpose and the per-pixel
//! cross-entropy of the segmentation head) against the CPU functions they mirror,
//! the numerical reference. Every test needs a CUDA GPU: they are `#[ignore]`d so CPU CI lists
//! them, and scripts/cuda-mock (CI) and scripts/gpu-check run them.
//!
//! Tolerances: the kernels keep the CPU's order of f32 operations (explicitly rounded, never
//! contracted), so every op is compared bit for bit, except what the batch-norm statistics feed:
//! their f64 sums run as a block tree instead of the CPU's running sum, so the statistics and
//! the backward's dx are compared to 1e-6 of the largest magnitude, and the cross-entropy's loss
//! sum (a block tree of f64 per image) to 1e-12; each test says which.

use beit::backend::cpu;
use beit::backend::cuda::image::BnStats;
use beit::backend::cuda::CudaDevice;
use beit::backend::ops::DxMode;
use beit::backend::shapes::BnShape;

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

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: element {i} is {g:e} on the GPU, {w:e} on the CPU");
    }
    println!("{what}: {} elements bit-identical", got.len());
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
fn relu_forward_and_backward_equal_the_cpu() {
    let d = dev();
    let mut x = values(5000, 1);
    x[7] = f32::NAN;
    x[8] = -0.0;
    let dy = values(5000, 2);
    let (gx, gdy) = (d.upload(&x).unwrap(), d.upload(&dy).unwrap());

    let mut want = vec![0.0; x.len()];
    cpu::elementwise::relu_forward(&x, &mut want);
    let mut gy = d.zeros::<f32>(x.len()).unwrap();
    d.relu(&gx, &mut gy).unwrap();
    assert_bits(&d.download(&gy).unwrap(), &want, "relu");
    let mut inplace = d.upload(&x).unwrap();
    d.relu_inplace(&mut inplace).unwrap();
    assert_bits(&d.download(&inplace).unwrap(), &want, "relu in place");

    for mode in [DxMode::Overwrite, DxMode::Accumulate] {
        let start = values(x.len(), 3);
        let mut want = start.clone();
        cpu::backward::relu_backward(&x, &dy, &mut want, mode);
        let mut gdx = d.upload(&start).unwrap();
        d.relu_backward(&gx, &gdy, &mut gdx, mode).unwrap();
        assert_bits(&d.download(&gdx).unwrap(), &want, &format!("relu backward ({mode:?})"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn max_pool_forward_and_backward_equal_the_cpu() {
    let d = dev();
    // Odd sizes: the last row and column are dropped. Ties and a NaN exercise the choice rule.
    let (planes, h, w) = (6, 9, 7);
    let mut x = values(planes * h * w, 4);
    x[0] = 0.5;
    x[1] = 0.5;
    x[2 * w + 2] = f32::NAN;
    let outputs = planes * (h / 2) * (w / 2);
    let (mut want, mut want_arg) = (vec![0.0; outputs], vec![0u32; outputs]);
    cpu::pool::max_pool2x2_forward(planes, 1, h, w, &x, &mut want, &mut want_arg);
    let gx = d.upload(&x).unwrap();
    let (mut gy, mut garg) = (d.zeros::<f32>(outputs).unwrap(), d.zeros::<u32>(outputs).unwrap());
    d.max_pool2x2(&gx, &mut gy, &mut garg, planes, (h, w)).unwrap();
    assert_bits(&d.download(&gy).unwrap(), &want, "max pool");
    assert_eq!(d.download(&garg).unwrap(), want_arg, "max pool argmax");

    let dy = values(outputs, 5);
    let gdy = d.upload(&dy).unwrap();
    for mode in [DxMode::Overwrite, DxMode::Accumulate] {
        let start = values(x.len(), 6);
        let mut want = start.clone();
        cpu::pool::max_pool2x2_backward(planes, 1, h, w, &dy, &want_arg, &mut want, mode);
        let mut gdx = d.upload(&start).unwrap();
        d.max_pool2x2_backward(&gdy, &garg, &mut gdx, planes, (h, w), mode).unwrap();
        assert_bits(&d.download(&gdx).unwrap(), &want, &format!("max pool backward ({mode:?})"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bilinear_and_adaptive_pooling_equal_the_cpu_up_and_down() {
    let d = dev();
    let planes = 5;
    // Up 4x (the segmentation logits), down, and mixed; the pyramid's pooled grids.
    for (from, to) in [((8, 6), (32, 24)), ((13, 11), (5, 4)), ((7, 9), (16, 5)), ((1, 1), (3, 3))] {
        let x = values(planes * from.0 * from.1, 7);
        let dy = values(planes * to.0 * to.1, 8);
        let (gx, gdy) = (d.upload(&x).unwrap(), d.upload(&dy).unwrap());
        let tag = format!("{from:?} -> {to:?}");

        let mut want = vec![0.0; dy.len()];
        cpu::interp::bilinear_forward(planes, from.0, from.1, to.0, to.1, &x, &mut want);
        let mut gy = d.zeros::<f32>(dy.len()).unwrap();
        d.bilinear(&gx, &mut gy, planes, from, to).unwrap();
        assert_bits(&d.download(&gy).unwrap(), &want, &format!("bilinear {tag}"));

        let mut want = vec![0.0; x.len()];
        cpu::interp::bilinear_backward(planes, from.0, from.1, to.0, to.1, &dy, &mut want);
        let mut gdx = d.upload(&values(x.len(), 9)).unwrap();
        d.bilinear_backward(&gdy, &mut gdx, planes, from, to).unwrap();
        assert_bits(&d.download(&gdx).unwrap(), &want, &format!("bilinear backward {tag}"));
    }
    for (from, to) in [((16, 16), (1, 1)), ((16, 16), (2, 2)), ((14, 10), (3, 3)), ((14, 10), (6, 6))] {
        let x = values(planes * from.0 * from.1, 10);
        let dy = values(planes * to.0 * to.1, 11);
        let (gx, gdy) = (d.upload(&x).unwrap(), d.upload(&dy).unwrap());
        let tag = format!("{from:?} -> {to:?}");

        let mut want = vec![0.0; dy.len()];
        cpu::interp::adaptive_avg_pool_forward(planes, from.0, from.1, to.0, to.1, &x, &mut want);
        let mut gy = d.zeros::<f32>(dy.len()).unwrap();
        d.adaptive_avg_pool(&gx, &mut gy, planes, from, to).unwrap();
        assert_bits(&d.download(&gy).unwrap(), &want, &format!("adaptive avg pool {tag}"));

        let mut want = vec![0.0; x.len()];
        cpu::interp::adaptive_avg_pool_backward(planes, from.0, from.1, to.0, to.1, &dy, &mut want);
        let mut gdx = d.upload(&values(x.len(), 12)).unwrap();
        d.adaptive_avg_pool_backward(&gdy, &mut gdx, planes, from, to).unwrap();
        assert_bits(&d.download(&gdx).unwrap(), &want, &format!("adaptive avg pool backward {tag}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batch_norm_train_eval_backward_and_running_update_equal_the_cpu() {
    let d = dev();
    let shape = BnShape { batch: 3, channels: 5, plane: 67 };
    let (n, c, eps) = (shape.batch * shape.channels * shape.plane, shape.channels, 1e-5f32);
    // An offset per channel, so the mean matters.
    let x: Vec<f32> = values(n, 13).iter().enumerate().map(|(i, v)| v + (i / shape.plane % c) as f32).collect();
    let dy = values(n, 14);
    let gamma: Vec<f32> = values(c, 15).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta = values(c, 16);
    let (gx, gdy, ggamma, gbeta) =
        (d.upload(&x).unwrap(), d.upload(&dy).unwrap(), d.upload(&gamma).unwrap(), d.upload(&beta).unwrap());

    // Training: statistics (f64 sums in another order: 1e-6), then the normalisation from the
    // CPU's statistics (bit for bit).
    let mut want = vec![0.0; n];
    let stats = cpu::batchnorm::batchnorm_train_forward(shape, &x, &mut want, &gamma, &beta, eps);
    let (mut mean, mut invstd, mut var) =
        (d.zeros::<f32>(c).unwrap(), d.zeros::<f32>(c).unwrap(), d.zeros::<f32>(c).unwrap());
    d.batch_norm_stats(&gx, shape, eps, &mut mean, &mut invstd, &mut var).unwrap();
    assert_normwise(&d.download(&mean).unwrap(), &stats.mean, 1e-6, "batch norm mean");
    assert_normwise(&d.download(&invstd).unwrap(), &stats.invstd, 1e-6, "batch norm 1/std");
    assert_normwise(&d.download(&var).unwrap(), &stats.var_unbiased, 1e-6, "batch norm unbiased variance");
    let (cmean, cinvstd) = (d.upload(&stats.mean).unwrap(), d.upload(&stats.invstd).unwrap());
    let mut gy = d.zeros::<f32>(n).unwrap();
    let batch = BnStats::Batch { mean: &cmean, invstd: &cinvstd };
    d.batch_norm_apply(&gx, &mut gy, &ggamma, &gbeta, batch, shape, eps).unwrap();
    assert_bits(&d.download(&gy).unwrap(), &want, "batch norm (training)");

    // Backward from the CPU's statistics: dγ and dβ (accumulated) and dx, to f64 rounding.
    let (dg0, db0) = (values(c, 17), values(c, 18));
    let (mut want_dx, mut want_dg, mut want_db) = (vec![0.0; n], dg0.clone(), db0.clone());
    cpu::batchnorm::batchnorm_train_backward(shape, &x, &dy, &gamma, &stats, &mut want_dx, &mut want_dg, &mut want_db);
    let (mut gdx, mut gdg, mut gdb) = (d.zeros::<f32>(n).unwrap(), d.upload(&dg0).unwrap(), d.upload(&db0).unwrap());
    let mut sums = d.zeros::<f64>(2 * c).unwrap();
    d.batch_norm_backward(&gx, &gdy, &ggamma, &cmean, &cinvstd, shape, &mut sums, &mut gdx, &mut gdg, &mut gdb)
        .unwrap();
    assert_normwise(&d.download(&gdx).unwrap(), &want_dx, 1e-6, "batch norm dx");
    assert_normwise(&d.download(&gdg).unwrap(), &want_dg, 1e-6, "batch norm dgamma");
    assert_normwise(&d.download(&gdb).unwrap(), &want_db, 1e-6, "batch norm dbeta");

    // Evaluation with running statistics, and the running update: bit for bit.
    let running_mean = values(c, 19);
    let running_var: Vec<f32> = values(c, 20).iter().map(|v| 1.0 + 0.5 * v).collect();
    let mut want = vec![0.0; n];
    cpu::batchnorm::batchnorm_eval(shape, &x, &mut want, &gamma, &beta, &running_mean, &running_var, eps);
    let (mut grm, mut grv) = (d.upload(&running_mean).unwrap(), d.upload(&running_var).unwrap());
    let running = BnStats::Running { mean: &grm, var: &grv };
    d.batch_norm_apply(&gx, &mut gy, &ggamma, &gbeta, running, shape, eps).unwrap();
    assert_bits(&d.download(&gy).unwrap(), &want, "batch norm (evaluation)");

    let (mut want_rm, mut want_rv) = (running_mean.clone(), running_var.clone());
    cpu::batchnorm::update_running_stats(&mut want_rm, &mut want_rv, &stats, 0.1);
    let cvar = d.upload(&stats.var_unbiased).unwrap();
    d.batch_norm_running_update(&mut grm, &mut grv, &cmean, &cvar, 0.1).unwrap();
    assert_bits(&d.download(&grm).unwrap(), &want_rm, "running mean");
    assert_bits(&d.download(&grv).unwrap(), &want_rv, "running variance");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn image_ops_refuse_wrong_sizes() {
    let d = dev();
    let x = d.zeros::<f32>(10).unwrap();
    let mut y = d.zeros::<f32>(9).unwrap();
    let err = d.relu(&x, &mut y).unwrap_err();
    assert!(err.to_string().contains("relu y"), "{err}");
    let err = d.bilinear(&x, &mut y, 1, (2, 5), (0, 3)).unwrap_err();
    assert!(err.to_string().contains("bilinear"), "{err}");
    let shape = BnShape { batch: 1, channels: 10, plane: 1 };
    let (mut m, mut s, mut v) = (d.zeros::<f32>(10).unwrap(), d.zeros::<f32>(10).unwrap(), d.zeros::<f32>(10).unwrap());
    let err = d.batch_norm_stats(&x, shape, 1e-5, &mut m, &mut s, &mut v).unwrap_err();
    assert!(err.to_string().contains("more than 1 value"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn scale_transpose_and_pixel_cross_entropy_equal_the_cpu() {
    let d = dev();
    let (batch, classes, plane) = (3, 19, 130);
    let n = batch * classes * plane;
    let x: Vec<f32> = values(n, 21).iter().map(|v| 4.0 * v).collect();

    let mut gv = d.upload(&x).unwrap();
    d.scale(&mut gv, 0.37).unwrap();
    let want: Vec<f32> = x.iter().map(|v| v * 0.37).collect();
    assert_bits(&d.download(&gv).unwrap(), &want, "scale");

    // [batch, classes, plane] -> [batch, plane, classes] (feature map to token rows).
    let gx = d.upload(&x).unwrap();
    let mut gt = d.zeros::<f32>(n).unwrap();
    d.transpose(&gx, &mut gt, batch, classes, plane).unwrap();
    let mut want = vec![0.0; n];
    for b in 0..batch {
        for c in 0..classes {
            for p in 0..plane {
                want[(b * plane + p) * classes + c] = x[(b * classes + c) * plane + p];
            }
        }
    }
    assert_bits(&d.download(&gt).unwrap(), &want, "transpose");

    // Every fifth pixel ignored (label = classes on the GPU, the ignore index on the CPU).
    let ignore = 255i64;
    let labels: Vec<i64> =
        (0..batch * plane).map(|i| if i % 5 == 0 { ignore } else { (i * 7 % classes) as i64 }).collect();
    let mut want_grad = vec![0.0; n];
    let (want_sum, _) = beit::model::segmentation::loss::pixel_cross_entropy_sum(
        &x,
        &labels,
        batch,
        classes,
        plane,
        ignore,
        &mut want_grad,
    );
    let device_labels: Vec<i32> = labels.iter().map(|&l| if l == ignore { classes as i32 } else { l as i32 }).collect();
    let glabels = d.upload(&device_labels).unwrap();
    let mut glogits = d.upload(&x).unwrap();
    let mut image_loss = d.zeros::<f64>(batch).unwrap();
    d.pixel_cross_entropy(&mut glogits, &glabels, &mut image_loss, classes, plane, 1.0).unwrap();
    let sum: f64 = d.download(&image_loss).unwrap().iter().sum();
    assert!((sum - want_sum).abs() <= 1e-12 * want_sum.abs(), "loss sum {sum} on the GPU, {want_sum} on the CPU");
    assert_bits(&d.download(&glogits).unwrap(), &want_grad, "pixel cross-entropy gradient");
}

// ---------------------------------------------------------------------------------------------
// The same ops through the `ImageOps` trait on both backends: one small convolutional pass
// (convolution, batch norm in both modes, ReLU, GELU, max pooling, transposed convolution,
// bilinear resize, adaptive pooling, scale, scaled add, transpose, the pixel loss) and its
// backward, planned once per backend and run by the same generic code.

use beit::backend::cpu::ops::Cpu;
use beit::backend::cuda::{CudaBackend, CudaMemory, DeviceArena, DeviceParams, Scratch};
use beit::backend::image_ops::{batch_norm_saved_len, BatchNorm, ImageOps};
use beit::backend::memory::{Arena, HostMemory, Planner, Space, View};
use beit::backend::shapes::{Conv2dShape, ResizeShape};
use beit::backend::Backend;

const B: usize = 2;
const CIN: usize = 3;
const C: usize = 4;
const CT: usize = 2;
const H: usize = 8;

/// Parameter layout (flat, `Param` and `Grad` spaces alike).
struct Params {
    w: View,
    b: View,
    wt: View,
    bt: View,
    gamma: View,
    beta: View,
    running_mean: View,
    running_var: View,
    len: usize,
}

fn params() -> Params {
    let mut at = 0;
    let mut next = |len| {
        let v = View::new(Space::Param, at, len);
        at += len;
        v
    };
    let (w, b) = (next(C * CIN * 9), next(C));
    let (wt, bt) = (next(C * CT * 4), next(CT));
    let (gamma, beta, running_mean, running_var) = (next(C), next(C), next(C), next(C));
    Params { w, b, wt, bt, gamma, beta, running_mean, running_var, len: at }
}

fn grad(v: View) -> View {
    View::new(Space::Grad, v.offset, v.len)
}

fn conv_shape() -> Conv2dShape {
    Conv2dShape { batch: B, in_channels: CIN, out_channels: C, in_h: H, in_w: H, kernel: 3, stride: 1, padding: 1 }
}

fn transpose_shape() -> Conv2dShape {
    Conv2dShape {
        batch: B,
        in_channels: C,
        out_channels: CT,
        in_h: H / 2,
        in_w: H / 2,
        kernel: 2,
        stride: 2,
        padding: 0,
    }
}

/// Every view of the pass, in planning order.
struct Views {
    x: View,
    y1: View,
    y2: View,
    bn_saved: View,
    y3: View,
    y3g: View,
    y4: View,
    pool_saved: View,
    y5: View,
    y6: View,
    y7: View,
    y8: View,
    y9: View,
    logits: View,
    labels: View,
    running: [View; 2],
    dy7: View,
    dy6: View,
    dy6a: View,
    dy5: View,
    dy4: View,
    dy3g: View,
    dy3: View,
    dy2: View,
    dy1: View,
    dx: View,
}

fn plan<B: Backend>(be: &B, p: &mut Planner) -> Views {
    let _ = be;
    let n1 = B * C * H * H;
    Views {
        x: p.act(B * CIN * H * H),
        y1: p.act(n1),
        y2: p.act(n1),
        bn_saved: p.stat(batch_norm_saved_len(C)),
        y3: p.act(n1),
        y3g: p.act(n1),
        y4: p.act(n1 / 4),
        pool_saved: p.stat(n1 / 4),
        y5: p.act(B * CT * H * H),
        y6: p.act(B * CT * 5 * 7),
        y7: p.act(B * CT * 9),
        y8: p.act(n1),
        y9: p.act(n1),
        logits: p.act(B * CT * H * H),
        labels: p.index(B * H * H),
        running: [p.stat(C), p.stat(C)],
        dy7: p.act(B * CT * 9),
        dy6: p.act(B * CT * 5 * 7),
        dy6a: p.act(B * CT * 5 * 7),
        dy5: p.act(B * CT * H * H),
        dy4: p.act(n1 / 4),
        dy3g: p.act(n1),
        dy3: p.act(n1),
        dy2: p.act(n1),
        dy1: p.act(n1),
        dx: p.act(B * CIN * H * H),
    }
}

/// The pass, written once over the trait; returns every output, named, and the loss.
fn run<Bk: ImageOps>(be: &Bk, m: &mut Bk::Memory<'_>, v: &Views, ps: &Params) -> (Vec<(&'static str, Vec<f32>)>, f64) {
    let (cs, ts) = (conv_shape(), transpose_shape());
    let bn = beit::backend::shapes::BnShape { batch: B, channels: C, plane: H * H };
    be.upload(m, v.x, &values(B * CIN * H * H, 31)).unwrap();
    be.upload(m, v.running[0], &values(C, 32)).unwrap();
    be.upload(m, v.running[1], &values(C, 33).iter().map(|x| 1.0 + 0.5 * x).collect::<Vec<_>>()).unwrap();
    let labels: Vec<usize> = (0..B * H * H).map(|i| if i % 7 == 0 { CT } else { i % CT }).collect();
    be.upload_indices(m, v.labels, &labels).unwrap();
    for (dv, seed) in [(v.dy7, 34), (v.dy6, 35)] {
        be.upload(m, dv, &values(dv.len, seed)).unwrap();
    }

    be.conv2d(m, v.y1, v.x, ps.w, Some(ps.b), cs).unwrap();
    be.batch_norm_train(m, v.y2, v.bn_saved, v.y1, ps.gamma, ps.beta, 1e-5, bn).unwrap();
    be.relu(m, v.y3, v.y2).unwrap();
    be.gelu(m, v.y3g, v.y3).unwrap();
    be.max_pool2x2(m, v.y4, v.pool_saved, v.y3g, B * C, H, H).unwrap();
    be.conv_transpose2d(m, v.y5, v.y4, ps.wt, Some(ps.bt), ts).unwrap();
    let up = ResizeShape { planes: B * CT, in_h: H, in_w: H, out_h: 5, out_w: 7 };
    be.bilinear_resize(m, v.y6, v.y5, up).unwrap();
    let pool = ResizeShape { planes: B * CT, in_h: 5, in_w: 7, out_h: 3, out_w: 3 };
    be.adaptive_avg_pool(m, v.y7, v.y6, pool).unwrap();
    let running = BatchNorm {
        gamma: ps.gamma,
        beta: ps.beta,
        running_mean: ps.running_mean,
        running_var: ps.running_var,
        eps: 1e-5,
    };
    be.batch_norm_eval(m, v.y8, v.y1, running, bn).unwrap();
    be.scale(m, v.y8, 0.5).unwrap();
    be.add_scaled(m, v.y8, v.y1, -0.25).unwrap();
    be.transpose(m, v.y9, v.y1, B, C, H * H).unwrap();
    be.copy(m, v.logits, v.y5).unwrap();
    be.pixel_cross_entropy(m, v.logits, v.labels, CT, H * H, 0.5).unwrap();
    let loss = be.take_loss(m).unwrap();

    be.adaptive_avg_pool_backward(m, v.dy6a, v.dy7, pool).unwrap();
    be.add_into(m, v.dy6, v.dy6a).unwrap();
    be.bilinear_resize_backward(m, v.dy5, v.dy6, up).unwrap();
    be.conv_transpose2d_backward(
        m,
        Some((v.dy4, DxMode::Overwrite)),
        grad(ps.wt),
        Some(grad(ps.bt)),
        v.dy5,
        v.y4,
        ps.wt,
        ts,
    )
    .unwrap();
    be.max_pool2x2_backward(m, v.dy3g, v.dy4, v.pool_saved, B * C, H, H, DxMode::Overwrite).unwrap();
    be.gelu_input_backward(m, v.dy3, v.dy3g, v.y3).unwrap();
    be.relu_backward(m, v.dy2, v.dy3, v.y3, DxMode::Overwrite).unwrap();
    be.batch_norm_backward(m, v.dy1, grad(ps.gamma), grad(ps.beta), v.dy2, v.y1, ps.gamma, v.bn_saved, bn).unwrap();
    be.conv2d_backward(m, Some((v.dx, DxMode::Overwrite)), grad(ps.w), Some(grad(ps.b)), v.dy1, v.x, ps.w, cs).unwrap();
    be.batch_norm_update_running(m, v.running[0], v.running[1], v.bn_saved, 0.1).unwrap();

    let mut outs = Vec::new();
    let named = [
        ("conv2d", v.y1),
        ("batch norm (train)", v.y2),
        ("batch norm statistics", v.bn_saved),
        ("relu", v.y3),
        ("gelu", v.y3g),
        ("max pool", v.y4),
        ("conv transpose", v.y5),
        ("bilinear", v.y6),
        ("adaptive avg pool", v.y7),
        ("batch norm (eval) + scale + add_scaled", v.y8),
        ("transpose", v.y9),
        ("pixel cross-entropy gradient", v.logits),
        ("bilinear + pool backward", v.dy5),
        ("conv transpose dx", v.dy4),
        ("max pool backward", v.dy3g),
        ("gelu backward", v.dy3),
        ("relu backward", v.dy2),
        ("batch norm dx", v.dy1),
        ("conv2d dx", v.dx),
        ("running mean", v.running[0]),
        ("running var", v.running[1]),
        ("conv weight grad", grad(ps.w)),
        ("conv bias grad", grad(ps.b)),
        ("conv transpose weight grad", grad(ps.wt)),
        ("conv transpose bias grad", grad(ps.bt)),
        ("gamma grad", grad(ps.gamma)),
        ("beta grad", grad(ps.beta)),
    ];
    for (name, view) in named {
        let mut host = vec![0.0; view.len];
        be.download(m, view, &mut host).unwrap();
        outs.push((name, host));
    }
    (outs, loss)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn image_ops_through_the_trait_equal_the_cpu_backend() {
    let ps = params();
    let mut values_p = values(ps.len, 40);
    // Positive running variances.
    for i in 0..C {
        values_p[ps.running_var.offset + i] = 1.0 + 0.25 * values_p[ps.running_var.offset + i];
    }

    let cpu = Cpu;
    let mut p = Planner::shared();
    let v = plan(&cpu, &mut p);
    let mut arena = Arena::new(&p).unwrap();
    let mut grads = vec![0.0; ps.len];
    let mut m = HostMemory::new(&mut arena, &values_p, &mut grads);
    let (want, want_loss) = run(&cpu, &mut m, &v, &ps);

    let d = dev();
    let gpu = CudaBackend::<f32>::new(d.clone());
    let mut p = Planner::split();
    let v = plan(&gpu, &mut p);
    let mut arena = DeviceArena::<f32>::new(&d, &p, Scratch::default()).unwrap();
    let params = DeviceParams::<f32>::upload(&d, &values_p).unwrap();
    let mut dgrads = d.zeros::<f32>(ps.len).unwrap();
    let mut m = CudaMemory::new(&d, &mut arena, &params, Some(&mut dgrads)).unwrap();
    let (got, loss) = run(&gpu, &mut m, &v, &ps);

    assert!((loss - want_loss).abs() <= 1e-6 * want_loss.abs(), "loss {loss} on the GPU, {want_loss} on the CPU");
    for ((name, g), (_, w)) in got.iter().zip(&want) {
        if *name == "conv bias grad" {
            // The batch norm after the convolution makes its input gradient sum to 0 over each
            // channel, so this gradient is rounding noise around 0 on both backends: an
            // absolute bound (the other gradients are of order 1).
            let worst = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "{name}: worst |diff| {worst:e}");
            continue;
        }
        assert_normwise(g, w, 1e-5, name);
    }
}
