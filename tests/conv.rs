//! Convolution, transposed convolution, 2x2 max pooling, nearest 2x upsampling and ReLU on the
//! CPU backend: finite differences for every gradient, PyTorch's results for the committed cases
//! in tests/reference_conv (scripts/gen_conv_reference.py), a direct-loop check of the forward
//! over many geometries, and bit-identical results for 1, 2 and 3 threads.

use std::path::Path;

use beit::backend::cpu::backward::{relu_backward, DxMode};
use beit::backend::cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward, Conv2dShape,
};
use beit::backend::cpu::elementwise::relu_forward;
use beit::backend::cpu::pool::{
    max_pool2x2_backward, max_pool2x2_forward, upsample_nearest2x_backward, upsample_nearest2x_forward,
};
use beit::model::io::{read_f32, read_i64, SafetensorsFile};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Finite-difference agreement: max |analytic - numeric| over the elements, relative to the L2
/// norm of the analytic gradient. The ops are linear in each input element (or piecewise linear,
/// with inputs kept `>= 2·eps` away from the kinks), so central differences carry no truncation
/// error; what is left is f32 rounding of the outputs, about 1e-7 of the loss over `2·eps`,
/// which measures around 1e-6 here. 1e-3 leaves room yet catches any wrong index or term (those
/// give errors of order 1).
const FD_TOL: f64 = 1e-3;

/// PyTorch agreement, max |ours - torch| relative to the L2 norm of torch's tensor. The
/// reference is the float64 result rounded once to f32, so this is our f32 accumulation error
/// (inner products of at most a few hundred terms, ~1e-7 relative).
const TORCH_TOL: f64 = 1e-5;

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn norm(a: &[f32]) -> f64 {
    a.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt()
}

/// max |got - want| / ||want|| (0 when both are all zero).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max);
    if diff == 0.0 {
        0.0
    } else {
        diff / norm(want)
    }
}

/// Central differences of `loss` with respect to every element of `inputs[which]`, compared
/// with `analytic` (see [`FD_TOL`]). The step actually taken is measured after f32 rounding.
fn fd_error(
    inputs: &mut [Vec<f32>],
    which: usize,
    analytic: &[f32],
    eps: f32,
    loss: &dyn Fn(&[Vec<f32>]) -> f64,
) -> f64 {
    assert_eq!(inputs[which].len(), analytic.len());
    let mut worst = 0.0f64;
    for i in 0..analytic.len() {
        let v = inputs[which][i];
        let (up, down) = (v + eps, v - eps);
        inputs[which][i] = up;
        let l_up = loss(inputs);
        inputs[which][i] = down;
        let l_down = loss(inputs);
        inputs[which][i] = v;
        let numeric = (l_up - l_down) / (up as f64 - down as f64);
        worst = worst.max((numeric - analytic[i] as f64).abs());
    }
    let n = norm(analytic);
    assert!(n > 0.0, "zero analytic gradient: the check would be vacuous");
    worst / n
}

#[allow(clippy::too_many_arguments)]
fn shape(batch: usize, cin: usize, cout: usize, h: usize, w: usize, k: usize, s: usize, p: usize) -> Conv2dShape {
    Conv2dShape { batch, in_channels: cin, out_channels: cout, in_h: h, in_w: w, kernel: k, stride: s, padding: p }
}

fn in_len(s: &Conv2dShape) -> usize {
    s.batch * s.in_channels * s.in_h * s.in_w
}

fn out_len(s: &Conv2dShape, transpose: bool) -> usize {
    let (h, w) = if transpose { (s.transpose_out_h(), s.transpose_out_w()) } else { (s.out_h(), s.out_w()) };
    s.batch * s.out_channels * h * w
}

fn forward(s: &Conv2dShape, transpose: bool, x: &[f32], w: &[f32], b: Option<&[f32]>, out: &mut [f32]) {
    if transpose {
        conv_transpose2d_forward(s, x, w, b, out)
    } else {
        conv2d_forward(s, x, w, b, out)
    }
}

#[allow(clippy::too_many_arguments)]
fn backward(
    s: &Conv2dShape,
    transpose: bool,
    x: &[f32],
    w: &[f32],
    dout: &[f32],
    dx: Option<(&mut [f32], DxMode)>,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    if transpose {
        conv_transpose2d_backward(s, x, w, dout, dx, dw, db)
    } else {
        conv2d_backward(s, x, w, dout, dx, dw, db)
    }
}

/// Finite differences for dx, dweight and dbias of one convolution, and the Accumulate / `+=`
/// contracts: a second backward adds exactly what the first produced. Returns the worst error.
fn conv_fd(s: Conv2dShape, transpose: bool, seed: u64) -> f64 {
    let mut r = rng(seed);
    let n_out = out_len(&s, transpose);
    let mut inputs =
        vec![uniform(&mut r, in_len(&s)), uniform(&mut r, s.weight_len()), uniform(&mut r, s.out_channels)];
    let dout = uniform(&mut r, n_out);
    let loss = |t: &[Vec<f32>]| {
        let mut out = vec![0.0f32; n_out];
        forward(&s, transpose, &t[0], &t[1], Some(&t[2]), &mut out);
        dot(&out, &dout)
    };
    let (x, w) = (inputs[0].clone(), inputs[1].clone());
    let mut dx = vec![f32::NAN; x.len()];
    let mut dw = vec![0.0f32; w.len()];
    let mut db = vec![0.0f32; s.out_channels];
    backward(&s, transpose, &x, &w, &dout, Some((&mut dx, DxMode::Overwrite)), &mut dw, Some(&mut db));
    let mut worst = 0.0f64;
    for (which, grad) in [&dx, &dw, &db].into_iter().enumerate() {
        let e = fd_error(&mut inputs, which, grad, 1e-2, &loss);
        assert!(e < FD_TOL, "{s:?} transpose={transpose}: input {which} finite-difference error {e:.2e}");
        worst = worst.max(e);
    }

    // Accumulate adds into dx; dweight and dbias are always accumulated.
    let base = uniform(&mut r, x.len());
    let mut dx2 = base.clone();
    let (mut dw2, mut db2) = (dw.clone(), db.clone());
    backward(&s, transpose, &x, &w, &dout, Some((&mut dx2, DxMode::Accumulate)), &mut dw2, Some(&mut db2));
    let want: Vec<f32> = base.iter().zip(&dx).map(|(a, b)| a + b).collect();
    assert!(rel_err(&dx2, &want) < 1e-6, "{s:?}: Accumulate dx");
    let twice = |g: &[f32]| g.iter().map(|v| 2.0 * v).collect::<Vec<f32>>();
    assert!(rel_err(&dw2, &twice(&dw)) < 1e-6, "{s:?}: dweight +=");
    assert!(rel_err(&db2, &twice(&db)) < 1e-6, "{s:?}: dbias +=");

    // Without dx and dbias the weight gradient is unchanged.
    let mut dw3 = vec![0.0f32; w.len()];
    backward(&s, transpose, &x, &w, &dout, None, &mut dw3, None);
    assert_eq!(dw3, dw, "{s:?}: dweight without dx");
    worst
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    let cases = [
        shape(2, 3, 4, 5, 6, 1, 1, 0), // k1: the im2col-free path
        shape(2, 3, 4, 6, 5, 3, 1, 1),
        shape(1, 2, 3, 9, 8, 7, 1, 3),
        shape(2, 2, 3, 8, 6, 4, 2, 1),
        shape(2, 2, 3, 9, 7, 3, 2, 0), // odd size, stride 2: the last row/column is not reached
    ];
    for (i, s) in cases.into_iter().enumerate() {
        conv_fd(s, false, 10 + i as u64);
    }
}

#[test]
fn conv_transpose2d_gradients_match_finite_differences() {
    let cases = [
        shape(2, 3, 2, 4, 5, 4, 2, 1),
        shape(2, 3, 4, 5, 4, 3, 1, 1),
        shape(2, 3, 2, 3, 4, 2, 2, 0),
        shape(1, 3, 2, 4, 3, 1, 1, 0), // k1: the col2im-free path
    ];
    for (i, s) in cases.into_iter().enumerate() {
        conv_fd(s, true, 20 + i as u64);
    }
}

/// Distinct values spaced 0.01 apart in random order: no two elements of a pooling window are
/// within a finite-difference step of each other, so no step crosses a kink.
fn spaced_values(r: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.01).collect();
    v.shuffle(r);
    v
}

#[test]
fn max_pool_gradients_match_finite_differences() {
    for (i, &(b, c, h, w)) in [(2, 2, 6, 8), (1, 3, 7, 5), (2, 1, 5, 9)].iter().enumerate() {
        let mut r = rng(30 + i as u64);
        let n_out = b * c * (h / 2) * (w / 2);
        let mut inputs = vec![spaced_values(&mut r, b * c * h * w)];
        let dout = uniform(&mut r, n_out);
        let loss = |t: &[Vec<f32>]| {
            let (mut out, mut arg) = (vec![0.0f32; n_out], vec![0u32; n_out]);
            max_pool2x2_forward(b, c, h, w, &t[0], &mut out, &mut arg);
            dot(&out, &dout)
        };
        let (mut out, mut arg) = (vec![0.0f32; n_out], vec![0u32; n_out]);
        max_pool2x2_forward(b, c, h, w, &inputs[0], &mut out, &mut arg);
        let mut dx = vec![f32::NAN; inputs[0].len()];
        max_pool2x2_backward(b, c, h, w, &dout, &arg, &mut dx, DxMode::Overwrite);
        let e = fd_error(&mut inputs, 0, &dx, 1e-3, &loss);
        assert!(e < FD_TOL, "max pool {h}x{w}: finite-difference error {e:.2e}");

        let base = uniform(&mut r, dx.len());
        let mut dx2 = base.clone();
        max_pool2x2_backward(b, c, h, w, &dout, &arg, &mut dx2, DxMode::Accumulate);
        let want: Vec<f32> = base.iter().zip(&dx).map(|(a, b)| a + b).collect();
        assert_eq!(dx2, want, "max pool {h}x{w}: Accumulate");
    }
}

#[test]
fn max_pool_first_maximum_wins_and_nan_propagates() {
    // One plane 2x4: window 0 is all ties (first wins), window 1 has a NaN.
    let x = [1.0, 1.0, 0.5, f32::NAN, 1.0, 1.0, 9.0, 2.0];
    let (mut out, mut arg) = ([0.0f32; 2], [0u32; 2]);
    max_pool2x2_forward(1, 1, 2, 4, &x, &mut out, &mut arg);
    assert_eq!(arg, [0, 3]);
    assert_eq!(out[0], 1.0);
    assert!(out[1].is_nan());
    // A 1-row input pools to nothing and gets a zero gradient.
    let mut dx = [f32::NAN; 4];
    max_pool2x2_backward(1, 1, 1, 4, &[], &[], &mut dx, DxMode::Overwrite);
    assert_eq!(dx, [0.0; 4]);
}

#[test]
fn upsample_gradients_match_finite_differences() {
    let (b, c, h, w) = (2, 3, 3, 5);
    let mut r = rng(40);
    let mut inputs = vec![uniform(&mut r, b * c * h * w)];
    let dout = uniform(&mut r, 4 * b * c * h * w);
    let loss = |t: &[Vec<f32>]| {
        let mut out = vec![0.0f32; dout.len()];
        upsample_nearest2x_forward(b, c, h, w, &t[0], &mut out);
        dot(&out, &dout)
    };
    let mut dx = vec![f32::NAN; inputs[0].len()];
    upsample_nearest2x_backward(b, c, h, w, &dout, &mut dx, DxMode::Overwrite);
    let e = fd_error(&mut inputs, 0, &dx, 1e-2, &loss);
    assert!(e < FD_TOL, "upsample: finite-difference error {e:.2e}");

    let base = uniform(&mut r, dx.len());
    let mut dx2 = base.clone();
    upsample_nearest2x_backward(b, c, h, w, &dout, &mut dx2, DxMode::Accumulate);
    let want: Vec<f32> = base.iter().zip(&dx).map(|(a, b)| a + b).collect();
    assert_eq!(dx2, want, "upsample: Accumulate");
}

#[test]
fn relu_gradients_match_finite_differences() {
    let mut r = rng(50);
    // |x| >= 0.05, far from the kink at 0 for a step of 1e-3; 70_000 elements span several
    // rayon chunks.
    let x: Vec<f32> = (0..70_000)
        .map(|_| {
            let v: f32 = r.random_range(0.05f32..1.0);
            if r.random::<bool>() {
                v
            } else {
                -v
            }
        })
        .collect();
    let dout = uniform(&mut r, x.len());
    let mut out = vec![0.0f32; x.len()];
    relu_forward(&x, &mut out);
    for (&o, &v) in out.iter().zip(&x) {
        assert_eq!(o, v.max(0.0));
    }
    let mut dx = vec![f32::NAN; x.len()];
    relu_backward(&x, &dout, &mut dx, DxMode::Overwrite);
    for ((&d, &o), &v) in dx.iter().zip(&dout).zip(&x) {
        assert_eq!(d, if v > 0.0 { o } else { 0.0 });
    }
    // Finite differences on the first 2,000 elements.
    let n = 2_000;
    let loss = |t: &[Vec<f32>]| {
        let mut out = vec![0.0f32; n];
        relu_forward(&t[0], &mut out);
        dot(&out, &dout[..n])
    };
    let e = fd_error(&mut [x[..n].to_vec()], 0, &dx[..n], 1e-3, &loss);
    assert!(e < FD_TOL, "relu: finite-difference error {e:.2e}");

    let base = uniform(&mut r, dx.len());
    let mut dx2 = base.clone();
    relu_backward(&x, &dout, &mut dx2, DxMode::Accumulate);
    let want: Vec<f32> = base.iter().zip(&dx).map(|(a, b)| a + b).collect();
    assert_eq!(dx2, want, "relu: Accumulate");
}

/// out = conv2d by direct loops in f64 (transpose: the scatter definition of ConvTranspose2d).
fn naive_conv(s: &Conv2dShape, transpose: bool, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let k = s.kernel;
    let (oh, ow) = if transpose { (s.transpose_out_h(), s.transpose_out_w()) } else { (s.out_h(), s.out_w()) };
    let mut out = vec![0.0f64; s.batch * s.out_channels * oh * ow];
    for bi in 0..s.batch {
        for co in 0..s.out_channels {
            for v in &mut out[(bi * s.out_channels + co) * oh * ow..][..oh * ow] {
                *v = b[co] as f64;
            }
        }
        for ci in 0..s.in_channels {
            for co in 0..s.out_channels {
                for kh in 0..k {
                    for kw in 0..k {
                        if transpose {
                            let wv = w[((ci * s.out_channels + co) * k + kh) * k + kw] as f64;
                            for ih in 0..s.in_h {
                                for iw in 0..s.in_w {
                                    let oy = (ih * s.stride + kh) as isize - s.padding as isize;
                                    let ox = (iw * s.stride + kw) as isize - s.padding as isize;
                                    if oy < 0 || ox < 0 || oy >= oh as isize || ox >= ow as isize {
                                        continue;
                                    }
                                    let xv = x[((bi * s.in_channels + ci) * s.in_h + ih) * s.in_w + iw] as f64;
                                    out[((bi * s.out_channels + co) * oh + oy as usize) * ow + ox as usize] += wv * xv;
                                }
                            }
                        } else {
                            let wv = w[((co * s.in_channels + ci) * k + kh) * k + kw] as f64;
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    let iy = (oy * s.stride + kh) as isize - s.padding as isize;
                                    let ix = (ox * s.stride + kw) as isize - s.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= s.in_h as isize || ix >= s.in_w as isize {
                                        continue;
                                    }
                                    let xv = x
                                        [((bi * s.in_channels + ci) * s.in_h + iy as usize) * s.in_w + ix as usize]
                                        as f64;
                                    out[((bi * s.out_channels + co) * oh + oy) * ow + ox] += wv * xv;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

#[test]
fn forward_matches_direct_loops_over_many_geometries() {
    let mut r = rng(60);
    for k in [1, 2, 3, 4, 5, 7] {
        for stride in 1..=3 {
            for padding in 0..=k.min(3) {
                for (h, w) in [(7, 7), (8, 5), (k, k + 1)] {
                    for transpose in [false, true] {
                        let s = shape(2, 3, 2, h, w, k, stride, padding);
                        // Skip geometries PyTorch rejects (empty outputs).
                        let n = h.min(w);
                        if (!transpose && n + 2 * padding < k) || (transpose && (n - 1) * stride + k <= 2 * padding) {
                            continue;
                        }
                        let x = uniform(&mut r, in_len(&s));
                        let wt = uniform(&mut r, s.weight_len());
                        let b = uniform(&mut r, s.out_channels);
                        let mut out = vec![f32::NAN; out_len(&s, transpose)];
                        forward(&s, transpose, &x, &wt, Some(&b), &mut out);
                        let want = naive_conv(&s, transpose, &x, &wt, &b);
                        let e = rel_err(&out, &want);
                        assert!(e < 1e-6, "{s:?} transpose={transpose}: {e:.2e} from direct loops");
                    }
                }
            }
        }
    }
}

fn reference(file: &str) -> SafetensorsFile {
    SafetensorsFile::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_conv").join(file)).unwrap()
}

/// Every case of a conv reference file against our forward and backward; returns the case count
/// and the worst error.
fn check_conv_reference(file: &str, transpose: bool) -> (usize, f64) {
    let f = reference(file);
    let st = f.parse().unwrap();
    let mut cases: Vec<String> =
        st.names().iter().filter_map(|n| n.strip_suffix(".shape")).map(str::to_string).collect();
    cases.sort();
    let mut worst = 0.0f64;
    for case in &cases {
        let get = |t: &str| read_f32(&st, &format!("{case}.{t}")).unwrap().map(|(_, v)| v);
        let (_, dims) = read_i64(&st, &format!("{case}.shape")).unwrap().unwrap();
        let d: Vec<usize> = dims.iter().map(|&v| v as usize).collect();
        let s = shape(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
        let (x, w, dout) = (get("x").unwrap(), get("weight").unwrap(), get("dout").unwrap());
        let bias = get("bias");
        let mut out = vec![f32::NAN; out_len(&s, transpose)];
        forward(&s, transpose, &x, &w, bias.as_deref(), &mut out);
        let mut dx = vec![f32::NAN; x.len()];
        let mut dw = vec![0.0f32; w.len()];
        let mut db = vec![0.0f32; s.out_channels];
        backward(
            &s,
            transpose,
            &x,
            &w,
            &dout,
            Some((&mut dx, DxMode::Overwrite)),
            &mut dw,
            bias.as_ref().map(|_| &mut db[..]),
        );
        let mut pairs = vec![("out", out), ("dx", dx), ("dweight", dw)];
        if bias.is_some() {
            pairs.push(("dbias", db));
        }
        for (name, got) in pairs {
            let e = rel_err(&got, &get(name).unwrap());
            assert!(e < TORCH_TOL, "{file} {case}: {name} {e:.2e} of torch's norm");
            worst = worst.max(e);
        }
    }
    (cases.len(), worst)
}

#[test]
fn conv2d_matches_torch() {
    let (cases, _) = check_conv_reference("conv2d.safetensors", false);
    assert_eq!(cases, 5);
}

#[test]
fn conv_transpose2d_matches_torch() {
    let (cases, _) = check_conv_reference("conv_transpose2d.safetensors", true);
    assert_eq!(cases, 3);
}

#[test]
fn pool_and_upsample_match_torch() {
    let f = reference("pool.safetensors");
    let st = f.parse().unwrap();
    let mut seen = 0;
    for name in st.names() {
        let Some(case) = name.strip_suffix(".shape") else { continue };
        let get = |t: &str| read_f32(&st, &format!("{case}.{t}")).unwrap().unwrap().1;
        let (_, d) = read_i64(&st, name).unwrap().unwrap();
        let (b, c, h, w) = (d[0] as usize, d[1] as usize, d[2] as usize, d[3] as usize);
        let (x, dout) = (get("x"), get("dout"));
        let mut dx = vec![f32::NAN; x.len()];
        let mut out = vec![f32::NAN; get("out").len()];
        if case.starts_with("maxpool") {
            let mut arg = vec![0u32; out.len()];
            max_pool2x2_forward(b, c, h, w, &x, &mut out, &mut arg);
            let (_, want_idx) = read_i64(&st, &format!("{case}.indices")).unwrap().unwrap();
            assert!(arg.iter().zip(&want_idx).all(|(&a, &i)| a as i64 == i), "{case}: indices");
            max_pool2x2_backward(b, c, h, w, &dout, &arg, &mut dx, DxMode::Overwrite);
            // Max and gradient routing are exact.
            assert_eq!(out, get("out"), "{case}: out");
            assert_eq!(dx, get("dx"), "{case}: dx");
        } else {
            upsample_nearest2x_forward(b, c, h, w, &x, &mut out);
            upsample_nearest2x_backward(b, c, h, w, &dout, &mut dx, DxMode::Overwrite);
            assert_eq!(out, get("out"), "{case}: out");
            let e = rel_err(&dx, &get("dx"));
            assert!(e < TORCH_TOL, "{case}: dx {e:.2e} of torch's norm");
        }
        seen += 1;
    }
    assert_eq!(seen, 3);
}

/// Forward and all gradients of both convolutions, at a size where the GEMMs do use threads.
fn run_all(s: &Conv2dShape, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let mut results = Vec::new();
    for transpose in [false, true] {
        let x = uniform(&mut r, in_len(s));
        let w = uniform(&mut r, s.weight_len());
        let b = uniform(&mut r, s.out_channels);
        let dout = uniform(&mut r, out_len(s, transpose));
        let mut out = vec![0.0f32; dout.len()];
        forward(s, transpose, &x, &w, Some(&b), &mut out);
        let mut dx = vec![0.0f32; x.len()];
        let mut dw = vec![0.0f32; w.len()];
        let mut db = vec![0.0f32; b.len()];
        backward(s, transpose, &x, &w, &dout, Some((&mut dx, DxMode::Overwrite)), &mut dw, Some(&mut db));
        results.extend([out, dx, dw, db]);
    }
    results
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // Batch 1 runs images one by one with threaded GEMMs, batch 5 runs images in parallel
    // (with 2 or 3 threads); both must equal the single-thread result bit for bit.
    let cases =
        [shape(1, 16, 32, 24, 24, 3, 1, 1), shape(5, 16, 24, 16, 16, 4, 2, 1), shape(2, 32, 16, 20, 20, 1, 1, 0)];
    for (i, s) in cases.iter().enumerate() {
        let run = |threads: usize| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| run_all(s, 70 + i as u64))
        };
        let one = run(1);
        for threads in [2, 3] {
            assert!(run(threads) == one, "{s:?}: {threads} threads differ from 1");
        }
    }
}
