//! Resampling of NCHW feature maps with backward passes, as the segmentation head needs them:
//! - bilinear interpolation to a given size, `F.interpolate(mode="bilinear",
//!   align_corners=False)` (source index `max(scale·(dst + 0.5) − 0.5, 0)`, `scale = in/out`,
//!   the right/bottom neighbour clamped at the border), which HF and mmseg use everywhere;
//! - adaptive average pooling, `nn.AdaptiveAvgPool2d`: output cell `i` of `out` averages input
//!   rows `floor(i·in/out) .. ceil((i+1)·in/out)` (cells overlap when `in` is not a multiple
//!   of `out`).
//!
//! Every `(image, channel)` plane is independent; planes run in parallel, so results do not
//! depend on the thread count. Backward passes overwrite `dx`.

use rayon::prelude::*;

/// One axis of a bilinear resize: for each output index, the two source indices and weights.
fn bilinear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Bilinear resize of `planes` planes from `in_h x in_w` to `out_h x out_w` (`out` overwritten).
pub fn bilinear_forward(
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    x: &[f32],
    out: &mut [f32],
) {
    assert_eq!(x.len(), planes * in_h * in_w, "bilinear_forward: x length");
    assert_eq!(out.len(), planes * out_h * out_w, "bilinear_forward: out length");
    if out.is_empty() {
        return;
    }
    let (ty, tx) = (bilinear_taps(in_h, out_h), bilinear_taps(in_w, out_w));
    out.par_chunks_mut(out_h * out_w).zip(x.par_chunks(in_h * in_w)).for_each(|(o, p)| {
        for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
            for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
                o[oy * out_w + ox] = wy0 * (wx0 * p[y0 * in_w + x0] + wx1 * p[y0 * in_w + x1])
                    + wy1 * (wx0 * p[y1 * in_w + x0] + wx1 * p[y1 * in_w + x1]);
            }
        }
    });
}

/// Backward of [`bilinear_forward`]: each output gradient goes to its four source pixels with
/// the same weights. `dx` (`[planes, in_h, in_w]`) is overwritten.
pub fn bilinear_backward(
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    dy: &[f32],
    dx: &mut [f32],
) {
    assert_eq!(dx.len(), planes * in_h * in_w, "bilinear_backward: dx length");
    assert_eq!(dy.len(), planes * out_h * out_w, "bilinear_backward: dy length");
    if dx.is_empty() {
        return;
    }
    let (ty, tx) = (bilinear_taps(in_h, out_h), bilinear_taps(in_w, out_w));
    dx.par_chunks_mut(in_h * in_w).zip(dy.par_chunks(out_h * out_w)).for_each(|(d, g)| {
        d.fill(0.0);
        for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
            for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
                let v = g[oy * out_w + ox];
                d[y0 * in_w + x0] += wy0 * wx0 * v;
                d[y0 * in_w + x1] += wy0 * wx1 * v;
                d[y1 * in_w + x0] += wy1 * wx0 * v;
                d[y1 * in_w + x1] += wy1 * wx1 * v;
            }
        }
    });
}

/// PyTorch's adaptive pooling window of output index `i`: `[floor(i·n/m), ceil((i+1)·n/m))`.
fn window(i: usize, input: usize, output: usize) -> (usize, usize) {
    (i * input / output, ((i + 1) * input).div_ceil(output))
}

/// `nn.AdaptiveAvgPool2d((out_h, out_w))` over `planes` planes (`out` overwritten).
pub fn adaptive_avg_pool_forward(
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    x: &[f32],
    out: &mut [f32],
) {
    assert_eq!(x.len(), planes * in_h * in_w, "adaptive_avg_pool_forward: x length");
    assert_eq!(out.len(), planes * out_h * out_w, "adaptive_avg_pool_forward: out length");
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(out_h * out_w).zip(x.par_chunks(in_h * in_w)).for_each(|(o, p)| {
        for oy in 0..out_h {
            let (y0, y1) = window(oy, in_h, out_h);
            for ox in 0..out_w {
                let (x0, x1) = window(ox, in_w, out_w);
                let mut sum = 0.0f32;
                for y in y0..y1 {
                    for xx in x0..x1 {
                        sum += p[y * in_w + xx];
                    }
                }
                // PyTorch divides by the window's height, then its width.
                o[oy * out_w + ox] = sum / (y1 - y0) as f32 / (x1 - x0) as f32;
            }
        }
    });
}

/// Backward of [`adaptive_avg_pool_forward`]: each output gradient is spread evenly over its
/// window (windows may overlap, so contributions add). `dx` is overwritten.
pub fn adaptive_avg_pool_backward(
    planes: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    dy: &[f32],
    dx: &mut [f32],
) {
    assert_eq!(dx.len(), planes * in_h * in_w, "adaptive_avg_pool_backward: dx length");
    assert_eq!(dy.len(), planes * out_h * out_w, "adaptive_avg_pool_backward: dy length");
    if dx.is_empty() {
        return;
    }
    dx.par_chunks_mut(in_h * in_w).zip(dy.par_chunks(out_h * out_w)).for_each(|(d, g)| {
        d.fill(0.0);
        for oy in 0..out_h {
            let (y0, y1) = window(oy, in_h, out_h);
            for ox in 0..out_w {
                let (x0, x1) = window(ox, in_w, out_w);
                let v = g[oy * out_w + ox] / (y1 - y0) as f32 / (x1 - x0) as f32;
                for y in y0..y1 {
                    for xx in x0..x1 {
                        d[y * in_w + xx] += v;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 997) as f32 / 300.0 - 1.5).collect()
    }

    #[test]
    fn bilinear_matches_hand_values() {
        // 2 → 4 along one axis: scale 0.5, sources max(0.5·(o+0.5) − 0.5, 0) = 0, 0.25, 0.75,
        // 1.25 → clamped right neighbour: values a, a + 0.25(b − a), a + 0.75(b − a), b.
        let x = [1.0f32, 3.0];
        let mut out = [0.0f32; 4];
        bilinear_forward(1, 1, 2, 1, 4, &x, &mut out);
        assert_eq!(out, [1.0, 1.5, 2.5, 3.0]);
        // Down 4 → 3 and the resize module (position tables) agree.
        let x = data(2 * 4 * 5, 3);
        let mut out = vec![0.0; 2 * 3 * 7];
        bilinear_forward(2, 4, 5, 3, 7, &x, &mut out);
        let other = crate::model::resample::bilinear(&x, 2, 4, 5, 3, 7);
        assert_eq!(out, other);
    }

    #[test]
    fn adaptive_pool_windows_follow_torch() {
        // 5 → 3: windows [0,2), [1,4), [3,5).
        assert_eq!((0..3).map(|i| window(i, 5, 3)).collect::<Vec<_>>(), vec![(0, 2), (1, 4), (3, 5)]);
        let x: Vec<f32> = (0..5).map(|v| v as f32).collect();
        let mut out = [0.0f32; 3];
        adaptive_avg_pool_forward(1, 1, 5, 1, 3, &x, &mut out);
        assert_eq!(out, [0.5, 2.0, 3.5]);
    }

    /// `Σ r ⊙ f(x)` is linear in x, so its gradient is exactly the backward of `r`; central
    /// differences check that for every input element.
    fn check_linear_op(n_in: usize, n_out: usize, fwd: &dyn Fn(&[f32], &mut [f32]), bwd: &dyn Fn(&[f32], &mut [f32])) {
        let x = data(n_in, 11);
        let r = data(n_out, 5);
        let mut dx = vec![0.0; n_in];
        bwd(&r, &mut dx);
        let loss = |x: &[f32]| -> f64 {
            let mut out = vec![0.0; n_out];
            fwd(x, &mut out);
            out.iter().zip(&r).map(|(&o, &w)| o as f64 * w as f64).sum()
        };
        let h = 0.25f32;
        for i in 0..n_in {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 1e-4, "element {i}: backward {} vs fd {fd}", dx[i]);
        }
    }

    #[test]
    fn bilinear_backward_matches_finite_differences() {
        for &(ih, iw, oh, ow) in &[(3, 4, 7, 9), (6, 5, 4, 2), (2, 2, 8, 8), (5, 3, 5, 3)] {
            check_linear_op(2 * ih * iw, 2 * oh * ow, &|x, o| bilinear_forward(2, ih, iw, oh, ow, x, o), &|g, d| {
                bilinear_backward(2, ih, iw, oh, ow, g, d)
            });
        }
    }

    #[test]
    fn adaptive_pool_backward_matches_finite_differences() {
        for &(ih, iw, oh, ow) in &[(5, 7, 3, 2), (6, 6, 1, 1), (4, 4, 6, 6), (7, 5, 6, 3)] {
            check_linear_op(
                3 * ih * iw,
                3 * oh * ow,
                &|x, o| adaptive_avg_pool_forward(3, ih, iw, oh, ow, x, o),
                &|g, d| adaptive_avg_pool_backward(3, ih, iw, oh, ow, g, d),
            );
        }
    }
}
