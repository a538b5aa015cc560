//! 2x2 max pooling and nearest-neighbour 2x upsampling for NCHW f32 tensors, forward and
//! backward. Every `(batch, channel)` plane is independent, so planes are split over rayon
//! tasks and results do not depend on the thread count. Input gradients take a [`DxMode`]
//! (overwrite, or add into a residual branch's gradient) like the other backward ops.

use rayon::prelude::*;

use super::backward::DxMode;

/// Planes per rayon task: enough elements per task to amortise scheduling.
fn planes_per_task(planes: usize, plane_len: usize) -> usize {
    super::rows_per_task(planes, plane_len)
}

/// PyTorch `MaxPool2d(2)` (kernel 2, stride 2, no padding, floor mode: an odd last row or
/// column is dropped). `x` is `[batch, channels, h, w]`, `out` and `argmax` are
/// `[batch, channels, h/2, w/2]`. `argmax` records, per output, the index *within its input
/// plane* (`ih·w + iw`) of the element chosen, as PyTorch's `return_indices` does: the first
/// maximum in row-major window order wins, and a NaN wins over numbers (PyTorch propagates NaN).
pub fn max_pool2x2_forward(
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
    x: &[f32],
    out: &mut [f32],
    argmax: &mut [u32],
) {
    let (oh, ow) = (h / 2, w / 2);
    let planes = batch * channels;
    assert_eq!(x.len(), planes * h * w, "max_pool2x2_forward: x length");
    assert_eq!(out.len(), planes * oh * ow, "max_pool2x2_forward: out length");
    assert_eq!(argmax.len(), out.len(), "max_pool2x2_forward: argmax length");
    assert!(h * w <= u32::MAX as usize, "max_pool2x2_forward: plane too large for u32 indices");
    if out.is_empty() {
        return;
    }
    let per = planes_per_task(planes, h * w);
    out.par_chunks_mut(per * oh * ow)
        .zip(argmax.par_chunks_mut(per * oh * ow))
        .zip(x.par_chunks(per * h * w))
        .for_each(|((out, arg), x)| {
            for ((o, a), xp) in
                out.chunks_exact_mut(oh * ow).zip(arg.chunks_exact_mut(oh * ow)).zip(x.chunks_exact(h * w))
            {
                for i in 0..oh {
                    for j in 0..ow {
                        let base = 2 * i * w + 2 * j;
                        let mut best = base;
                        for idx in [base + 1, base + w, base + w + 1] {
                            // Strictly greater keeps the first maximum; NaN propagates.
                            if xp[idx] > xp[best] || xp[idx].is_nan() {
                                best = idx;
                            }
                        }
                        o[i * ow + j] = xp[best];
                        a[i * ow + j] = best as u32;
                    }
                }
            }
        });
}

/// Backward of [`max_pool2x2_forward`]: each output's gradient goes to the input element its
/// `argmax` names; the others (and a dropped odd row/column) get 0. `dx` `[batch, channels, h,
/// w]` is overwritten or added to (`mode`). Windows do not overlap, so no element receives two
/// contributions.
#[allow(clippy::too_many_arguments)]
pub fn max_pool2x2_backward(
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
    dout: &[f32],
    argmax: &[u32],
    dx: &mut [f32],
    mode: DxMode,
) {
    let (oh, ow) = (h / 2, w / 2);
    let planes = batch * channels;
    assert_eq!(dx.len(), planes * h * w, "max_pool2x2_backward: dx length");
    assert_eq!(dout.len(), planes * oh * ow, "max_pool2x2_backward: dout length");
    assert_eq!(argmax.len(), dout.len(), "max_pool2x2_backward: argmax length");
    if dout.is_empty() {
        // A 1-pixel-high or -wide input pools to nothing: no gradient reaches it.
        if mode == DxMode::Overwrite {
            dx.fill(0.0);
        }
        return;
    }
    let per = planes_per_task(planes, h * w);
    dx.par_chunks_mut(per * h * w).zip(dout.par_chunks(per * oh * ow).zip(argmax.par_chunks(per * oh * ow))).for_each(
        |(dx, (dout, arg))| {
            if mode == DxMode::Overwrite {
                dx.fill(0.0);
            }
            for ((dxp, dp), ap) in
                dx.chunks_exact_mut(h * w).zip(dout.chunks_exact(oh * ow)).zip(arg.chunks_exact(oh * ow))
            {
                for (&d, &a) in dp.iter().zip(ap) {
                    dxp[a as usize] += d;
                }
            }
        },
    );
}

/// PyTorch `Upsample(scale_factor=2, mode='nearest')`: `out[b, c, i, j] = x[b, c, i/2, j/2]`,
/// `x` `[batch, channels, h, w]`, `out` `[batch, channels, 2h, 2w]` (overwritten).
pub fn upsample_nearest2x_forward(batch: usize, channels: usize, h: usize, w: usize, x: &[f32], out: &mut [f32]) {
    let planes = batch * channels;
    assert_eq!(x.len(), planes * h * w, "upsample_nearest2x_forward: x length");
    assert_eq!(out.len(), 4 * x.len(), "upsample_nearest2x_forward: out length");
    if x.is_empty() {
        return;
    }
    // One input row makes two identical output rows of 2w.
    let rows = planes * h;
    let per = super::rows_per_task(rows, 4 * w);
    out.par_chunks_mut(per * 4 * w).zip(x.par_chunks(per * w)).for_each(|(out, x)| {
        for (o, xr) in out.chunks_exact_mut(4 * w).zip(x.chunks_exact(w)) {
            let (top, bottom) = o.split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(xr) {
                pair[0] = v;
                pair[1] = v;
            }
            bottom.copy_from_slice(top);
        }
    });
}

/// Backward of [`upsample_nearest2x_forward`]: `dx[b, c, i, j]` is the sum of its 2x2 block of
/// `dout`, `(top-left + top-right) + (bottom-left + bottom-right)`. `dx` is overwritten or added
/// to (`mode`).
#[allow(clippy::too_many_arguments)]
pub fn upsample_nearest2x_backward(
    batch: usize,
    channels: usize,
    h: usize,
    w: usize,
    dout: &[f32],
    dx: &mut [f32],
    mode: DxMode,
) {
    let planes = batch * channels;
    assert_eq!(dx.len(), planes * h * w, "upsample_nearest2x_backward: dx length");
    assert_eq!(dout.len(), 4 * dx.len(), "upsample_nearest2x_backward: dout length");
    if dx.is_empty() {
        return;
    }
    let rows = planes * h;
    let per = super::rows_per_task(rows, 4 * w);
    dx.par_chunks_mut(per * w).zip(dout.par_chunks(per * 4 * w)).for_each(|(dx, dout)| {
        for (d, o) in dx.chunks_exact_mut(w).zip(dout.chunks_exact(4 * w)) {
            let (top, bottom) = o.split_at(2 * w);
            for ((v, t), b) in d.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
                let g = (t[0] + t[1]) + (b[0] + b[1]);
                *v = if mode == DxMode::Accumulate { *v + g } else { g };
            }
        }
    });
}
