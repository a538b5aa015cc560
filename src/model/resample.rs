//! Image resizing with PyTorch's `F.interpolate(..., align_corners=False)` semantics, used to fit
//! position tables to another input resolution the way Hugging Face does at run time:
//! bilinear for relative position bias tables, bicubic (A = -0.75) for absolute embeddings.
//! Inputs are channel-major planes `[channels, in_h, in_w]`.
//!
//! This is parameter preparation on the host (a checkpoint's tables fitted to a grid before a
//! pass uploads them), not an op of the pass, so it lives with the model rather than behind the
//! Backend trait. (The UperNet's feature-map interpolation, which is a pass op, is the backend's.)

/// Source coordinate of output index `dst` (PyTorch's `area_pixel_compute_source_index`).
fn source_index(scale: f32, dst: usize, cubic: bool) -> f32 {
    let src = scale * (dst as f32 + 0.5) - 0.5;
    if !cubic && src < 0.0 {
        0.0
    } else {
        src
    }
}

/// Bilinear resize of `channels` planes from `in_h x in_w` to `out_h x out_w`.
pub fn bilinear(input: &[f32], channels: usize, in_h: usize, in_w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(input.len(), channels * in_h * in_w);
    let mut out = vec![0.0f32; channels * out_h * out_w];
    let sh = in_h as f32 / out_h as f32;
    let sw = in_w as f32 / out_w as f32;
    for oy in 0..out_h {
        let fy = source_index(sh, oy, false);
        let y0 = (fy as usize).min(in_h - 1);
        let y1 = if y0 < in_h - 1 { y0 + 1 } else { y0 };
        let ly1 = fy - y0 as f32;
        let ly0 = 1.0 - ly1;
        for ox in 0..out_w {
            let fx = source_index(sw, ox, false);
            let x0 = (fx as usize).min(in_w - 1);
            let x1 = if x0 < in_w - 1 { x0 + 1 } else { x0 };
            let lx1 = fx - x0 as f32;
            let lx0 = 1.0 - lx1;
            for c in 0..channels {
                let p = &input[c * in_h * in_w..];
                out[c * out_h * out_w + oy * out_w + ox] = ly0 * (lx0 * p[y0 * in_w + x0] + lx1 * p[y0 * in_w + x1])
                    + ly1 * (lx0 * p[y1 * in_w + x0] + lx1 * p[y1 * in_w + x1]);
            }
        }
    }
    out
}

/// The four cubic-convolution weights for fractional offset `t` (Keys, A = -0.75, as PyTorch).
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Bicubic resize of `channels` planes; taps outside the image are clamped to the border.
pub fn bicubic(input: &[f32], channels: usize, in_h: usize, in_w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    assert_eq!(input.len(), channels * in_h * in_w);
    let mut out = vec![0.0f32; channels * out_h * out_w];
    let sh = in_h as f32 / out_h as f32;
    let sw = in_w as f32 / out_w as f32;
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    for oy in 0..out_h {
        let fy = source_index(sh, oy, true);
        let iy = fy.floor();
        let wy = cubic_weights(fy - iy);
        let iy = iy as isize;
        for ox in 0..out_w {
            let fx = source_index(sw, ox, true);
            let ix = fx.floor();
            let wx = cubic_weights(fx - ix);
            let ix = ix as isize;
            for c in 0..channels {
                let p = &input[c * in_h * in_w..];
                let mut acc = 0.0f32;
                for (ky, &wyk) in wy.iter().enumerate() {
                    let y = clamp(iy - 1 + ky as isize, in_h);
                    let mut row = 0.0f32;
                    for (kx, &wxk) in wx.iter().enumerate() {
                        let x = clamp(ix - 1 + kx as isize, in_w);
                        row += wxk * p[y * in_w + x];
                    }
                    acc += wyk * row;
                }
                out[c * out_h * out_w + oy * out_w + ox] = acc;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let x: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32 * 0.37 - 2.0).collect();
        assert_eq!(bilinear(&x, 2, 3, 4, 3, 4), x);
        let y = bicubic(&x, 2, 3, 4, 3, 4);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn bilinear_upsample_by_two_hand_values() {
        // PyTorch: F.interpolate(tensor([[[[0., 1.]]]]), size=(1, 4), mode='bilinear') = [0, .25, .75, 1]
        assert_eq!(bilinear(&[0.0, 1.0], 1, 1, 2, 1, 4), vec![0.0, 0.25, 0.75, 1.0]);
    }

    // Expected values printed by PyTorch 2.15: F.interpolate(x, size, mode, align_corners=False).
    #[test]
    fn bicubic_matches_torch() {
        let ramp: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let want: [f64; 16] = [
            -0.10546875,
            0.19140625,
            0.66796875,
            1.296875,
            1.703125,
            2.296875,
            2.703125,
            3.296875,
            3.703125,
            4.296875,
            4.703125,
            5.296875,
            5.703125,
            6.33203125,
            6.80859375,
            7.10546875,
        ];
        let got = bicubic(&ramp, 1, 1, 8, 1, 16);
        for (a, b) in got.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        let img = [1.0, -2.0, 3.0, 0.5, 4.0, -1.0];
        let want: [f64; 15] = [
            1.38556969,
            -0.76202071,
            -2.52083397,
            0.81379288,
            3.91055655,
            0.72600013,
            0.847,
            1.0,
            1.01800013,
            1.0,
            0.06643105,
            2.45602012,
            4.52083254,
            1.22220755,
            -1.91055477,
        ];
        for (a, b) in bicubic(&img, 1, 2, 3, 3, 5).iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn bilinear_matches_torch() {
        let img = [1.0, -2.0, 3.0, 0.5, 4.0, -1.0];
        let want = [1.0, -0.2, -2.0, 1.0, 3.0, 0.75, 0.85, 1.0, 1.0, 1.0, 0.5, 1.9, 4.0, 1.0, -1.0];
        for (a, b) in bilinear(&img, 1, 2, 3, 3, 5).iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
