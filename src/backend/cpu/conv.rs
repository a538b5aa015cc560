//! 2-D convolution and transposed convolution (PyTorch `Conv2d` / `ConvTranspose2d` with
//! groups = 1, dilation = 1, output_padding = 0) for NCHW f32 tensors, by im2col + GEMM.
//!
//! Both ops are built from the same two per-image moves over one "column" geometry ([`Cols`]):
//! - gather: `out_b[rows, L] = W[rows, K] · im2col(src_b)[K, L]` (conv2d forward, and the input
//!   gradient of conv_transpose2d);
//! - scatter: `img_b += col2im(Wᵀ[K, rows] · a_b[rows, L])` (conv2d input gradient, and the
//!   forward of conv_transpose2d, which *is* conv2d's input gradient with the weight read as
//!   `[in, out, k, k]`).
//!
//! The weight gradient is `Σ_b a_b · im2col(src_b)ᵀ` in both cases.
//!
//! Threads: when there are at least as many images as threads, images run in parallel with
//! single-threaded GEMMs; otherwise images run one after another and each GEMM (and im2col /
//! col2im, split by channel) uses the whole pool. The `gemm` crate splits the output's rows and
//! columns over threads but runs the inner dimension in the same blocks in the same order, so
//! every output element sees the same float operations either way: results are bit-identical
//! for any number of threads (`tests/conv.rs` checks this). Batch reductions (weight and bias
//! gradients) use a fixed grouping of images that does not depend on the thread count.

use rayon::prelude::*;

use super::backward::{add_into, DxMode};
use super::gemm::{matmul, Mat, MatMut, Threads};
use super::math;

pub use crate::backend::shapes::Conv2dShape;

// The geometry lives with the shared shape types; the column layouts the CPU kernels use are here.
impl Conv2dShape {
    fn check(&self) {
        assert!(
            self.in_channels > 0 && self.out_channels > 0 && self.in_h > 0 && self.in_w > 0 && self.kernel > 0,
            "conv: empty dimension in {self:?}"
        );
        assert!(self.stride > 0, "conv: stride 0");
    }

    /// The column geometry of conv2d: image = the input, columns = output positions.
    fn conv_cols(&self) -> Cols {
        self.check();
        Cols {
            channels: self.in_channels,
            h: self.in_h,
            w: self.in_w,
            k: self.kernel,
            stride: self.stride,
            pad: self.padding,
            oh: self.out_h(),
            ow: self.out_w(),
        }
    }

    /// The column geometry of conv_transpose2d: image = its output, columns = its input
    /// positions (conv2d run backwards; `(T + 2p - k)/s + 1 == in` exactly for this `T`).
    fn transpose_cols(&self) -> Cols {
        self.check();
        Cols {
            channels: self.out_channels,
            h: self.transpose_out_h(),
            w: self.transpose_out_w(),
            k: self.kernel,
            stride: self.stride,
            pad: self.padding,
            oh: self.in_h,
            ow: self.in_w,
        }
    }
}

/// One image's im2col geometry: `channels` planes of `h x w` on the image side, `oh x ow`
/// kernel positions on the column side. The column matrix is `[channels·k·k, oh·ow]`, row
/// `(c, kh, kw)`, column `(oh, ow)` holding `img[c, oh·s - p + kh, ow·s - p + kw]` (0 outside).
#[derive(Clone, Copy, Debug)]
struct Cols {
    channels: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Cols {
    /// Rows of the column matrix (the GEMM's inner dimension), `channels·k·k`.
    fn rows(&self) -> usize {
        self.channels * self.k * self.k
    }

    /// Columns of the column matrix, `oh·ow`.
    fn len(&self) -> usize {
        self.oh * self.ow
    }

    fn image_len(&self) -> usize {
        self.channels * self.h * self.w
    }

    /// A 1x1 kernel with stride 1 and no padding: the column matrix is the image itself, so
    /// im2col and col2im are skipped.
    fn is_identity(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// The positions `o` in `[lo, hi)` (a sub-range of `0..n_out`) whose input coordinate
/// `o·s + off - p` lies inside `0..n_in`.
fn valid_range(n_out: usize, n_in: usize, s: usize, off: usize, p: usize) -> (usize, usize) {
    let lo = if off >= p { 0 } else { (p - off).div_ceil(s) };
    let hi = if n_in + p > off { ((n_in + p - off - 1) / s + 1).min(n_out) } else { 0 };
    (lo.min(hi), hi)
}

/// im2col of one channel plane into its `k·k` rows of the column matrix (every element written).
fn im2col_plane(g: &Cols, plane: &[f32], cols: &mut [f32]) {
    let (k, s, p, ow) = (g.k, g.stride, g.pad, g.ow);
    let l = g.len();
    for kh in 0..k {
        let (oh_lo, oh_hi) = valid_range(g.oh, g.h, s, kh, p);
        for kw in 0..k {
            let (ow_lo, ow_hi) = valid_range(g.ow, g.w, s, kw, p);
            let row = &mut cols[(kh * k + kw) * l..][..l];
            for (oh, dst) in row.chunks_exact_mut(ow).enumerate() {
                if oh < oh_lo || oh >= oh_hi {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[(oh * s + kh - p) * g.w..][..g.w];
                dst[..ow_lo].fill(0.0);
                dst[ow_hi..].fill(0.0);
                if s == 1 {
                    let iw0 = ow_lo + kw - p;
                    dst[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
                } else {
                    for (o, d) in dst[ow_lo..ow_hi].iter_mut().enumerate() {
                        *d = src[(ow_lo + o) * s + kw - p];
                    }
                }
            }
        }
    }
}

/// col2im of one channel's `k·k` rows, added into its plane (the adjoint of [`im2col_plane`]).
/// Rows are added in (kh, kw) order, so the sum order is fixed.
fn col2im_add_plane(g: &Cols, cols: &[f32], plane: &mut [f32]) {
    let (k, s, p, ow) = (g.k, g.stride, g.pad, g.ow);
    let l = g.len();
    for kh in 0..k {
        let (oh_lo, oh_hi) = valid_range(g.oh, g.h, s, kh, p);
        for kw in 0..k {
            let (ow_lo, ow_hi) = valid_range(g.ow, g.w, s, kw, p);
            let row = &cols[(kh * k + kw) * l..][..l];
            for oh in oh_lo..oh_hi {
                let src = &row[oh * ow..][ow_lo..ow_hi];
                let dst = &mut plane[(oh * s + kh - p) * g.w..][..g.w];
                if s == 1 {
                    let iw0 = ow_lo + kw - p;
                    for (d, &v) in dst[iw0..iw0 + src.len()].iter_mut().zip(src) {
                        *d += v;
                    }
                } else {
                    for (o, &v) in src.iter().enumerate() {
                        dst[(ow_lo + o) * s + kw - p] += v;
                    }
                }
            }
        }
    }
}

/// The column matrix of one image: the image itself for 1x1 kernels, else im2col into `buf`
/// (channels split over the pool with `Threads::Pool`).
fn columns<'a>(g: &Cols, img: &'a [f32], buf: &'a mut Vec<f32>, threads: Threads) -> &'a [f32] {
    if g.is_identity() {
        return img;
    }
    let plane_cols = g.k * g.k * g.len();
    buf.resize(g.channels * plane_cols, 0.0);
    let planes = img.chunks_exact(g.h * g.w);
    match threads {
        Threads::Single => buf.chunks_exact_mut(plane_cols).zip(planes).for_each(|(c, x)| im2col_plane(g, x, c)),
        Threads::Pool => buf
            .par_chunks_exact_mut(plane_cols)
            .zip(img.par_chunks_exact(g.h * g.w))
            .for_each(|(c, x)| im2col_plane(g, x, c)),
    }
    buf
}

/// `img += col2im(cols)`, channels split over the pool with `Threads::Pool`.
fn col2im_add(g: &Cols, cols: &[f32], img: &mut [f32], threads: Threads) {
    let plane_cols = g.k * g.k * g.len();
    let plane = g.h * g.w;
    match threads {
        Threads::Single => {
            img.chunks_exact_mut(plane).zip(cols.chunks_exact(plane_cols)).for_each(|(x, c)| col2im_add_plane(g, c, x))
        }
        Threads::Pool => img
            .par_chunks_exact_mut(plane)
            .zip(cols.par_chunks_exact(plane_cols))
            .for_each(|(x, c)| col2im_add_plane(g, c, x)),
    }
}

/// What an op does with its destination before adding its product.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// Overwrite.
    Zero,
    /// Add into what is there (`DxMode::Accumulate`).
    Keep,
    /// Start every plane / row `c` from `bias[c]` (forward passes with a bias).
    Bias(&'a [f32]),
}

impl<'a> Start<'a> {
    fn from_mode(mode: DxMode) -> Self {
        match mode {
            DxMode::Overwrite => Start::Zero,
            DxMode::Accumulate => Start::Keep,
        }
    }

    fn from_bias(bias: Option<&'a [f32]>) -> Self {
        bias.map_or(Start::Zero, Start::Bias)
    }

    /// Prepares `dst` (`bias.len()` planes of `plane` elements) and says whether the product
    /// must be added to it.
    fn prepare(self, dst: &mut [f32], plane: usize) -> bool {
        match self {
            Start::Zero => false,
            Start::Keep => true,
            Start::Bias(b) => {
                for (d, &v) in dst.chunks_exact_mut(plane).zip(b) {
                    d.fill(v);
                }
                true
            }
        }
    }
}

/// Whether images go to separate rayon tasks (single-threaded GEMMs inside) or one at a time
/// with the whole pool on each: parallel over images only when that keeps every thread busy.
fn threads_for(tasks: usize) -> Threads {
    if tasks >= rayon::current_num_threads() {
        Threads::Single
    } else {
        Threads::Pool
    }
}

/// Runs `f(image, threads)` over the `batch` images, either one image per rayon task with
/// `Threads::Single` or one after another with `Threads::Pool`. `f` gets its own scratch buffer.
fn for_each_image<F>(batch: usize, f: F)
where
    F: Fn(usize, Threads, &mut Vec<f32>) + Sync,
{
    match threads_for(batch) {
        Threads::Single => (0..batch).into_par_iter().for_each_init(Vec::new, |buf, b| f(b, Threads::Single, buf)),
        Threads::Pool => {
            let mut buf = Vec::new();
            for b in 0..batch {
                f(b, Threads::Pool, &mut buf);
            }
        }
    }
}

/// A mutable slice shared by image tasks that each touch only their own image's range.
#[derive(Clone, Copy)]
struct Images {
    ptr: super::SendPtr,
    image_len: usize,
}

impl Images {
    fn new(data: &mut [f32], batch: usize) -> Self {
        assert_eq!(data.len() % batch.max(1), 0);
        Images { ptr: super::SendPtr(data.as_mut_ptr()), image_len: data.len() / batch.max(1) }
    }

    /// # Safety
    /// `b` is within the batch and no other live reference covers image `b`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn image(&self, b: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.0.add(b * self.image_len), self.image_len)
    }
}

/// Gather: `out_b[rows, L] (=|+=) W[rows, K] · im2col(src_b)[K, L]` for every image.
fn gather(batch: usize, g: &Cols, weight: &[f32], rows: usize, src: &[f32], out: &mut [f32], start: Start<'_>) {
    let (kk, l) = (g.rows(), g.len());
    assert_eq!(src.len(), batch * g.image_len());
    assert_eq!(out.len(), batch * rows * l);
    let out = Images::new(out, batch);
    for_each_image(batch, |b, threads, buf| {
        // SAFETY: each call gets a distinct image index.
        let ob = unsafe { out.image(b) };
        let cols = columns(g, &src[b * g.image_len()..][..g.image_len()], buf, threads);
        let accumulate = start.prepare(ob, l);
        matmul(
            MatMut::rows(ob, rows, l),
            Mat::rows(weight, rows, kk),
            Mat::rows(cols, kk, l),
            1.0,
            accumulate,
            threads,
        );
    });
}

/// Scatter: `img_b (=|+=) col2im(Wᵀ[K, rows] · a_b[rows, L])` for every image, where `weight`
/// is `[rows, K]` row-major.
fn scatter(batch: usize, g: &Cols, weight: &[f32], rows: usize, a: &[f32], img: &mut [f32], start: Start<'_>) {
    let (kk, l) = (g.rows(), g.len());
    assert_eq!(a.len(), batch * rows * l);
    assert_eq!(img.len(), batch * g.image_len());
    let img = Images::new(img, batch);
    let plane = g.h * g.w;
    for_each_image(batch, |b, threads, buf| {
        // SAFETY: each call gets a distinct image index.
        let ib = unsafe { img.image(b) };
        let ab = Mat::rows(&a[b * rows * l..][..rows * l], rows, l);
        let wt = Mat::transposed(weight, rows, kk);
        let accumulate = start.prepare(ib, plane);
        if g.is_identity() {
            // The column matrix is the image: write the product straight into it.
            matmul(MatMut::rows(ib, kk, l), wt, ab, 1.0, accumulate, threads);
            return;
        }
        buf.resize(kk * l, 0.0);
        matmul(MatMut::rows(buf, kk, l), wt, ab, 1.0, false, threads);
        if !accumulate {
            ib.fill(0.0);
        }
        col2im_add(g, buf, ib, threads);
    });
}

/// Floats of per-group weight-gradient partials kept at once (64 MiB). Fixed, so the grouping of
/// images, and with it the summation order, does not depend on the thread count.
const PARTIALS_BUDGET: usize = 16 << 20;

/// `dw[rows, K] += Σ_b a_b[rows, L] · im2col(src_b)[K, L]ᵀ`.
///
/// Images are cut into consecutive groups (as many as the budget allows, at most one per
/// image); each group's images are accumulated in order into the group's partial, and the
/// partials are added to `dw` in group order. Groups run in parallel when there are enough of
/// them to fill the pool, else one by one with the pool on each GEMM: the same sums either way.
fn weight_grad(batch: usize, g: &Cols, a: &[f32], rows: usize, src: &[f32], dw: &mut [f32]) {
    let (kk, l, wl) = (g.rows(), g.len(), rows * g.rows());
    assert_eq!(a.len(), batch * rows * l);
    assert_eq!(src.len(), batch * g.image_len());
    assert_eq!(dw.len(), wl);
    if batch == 0 {
        return;
    }
    let per_group = batch.div_ceil(batch.min((PARTIALS_BUDGET / wl).max(1)));
    let groups = batch.div_ceil(per_group);
    let group_partial = |gi: usize, part: &mut [f32], buf: &mut Vec<f32>, threads: Threads| {
        for (j, b) in (gi * per_group..((gi + 1) * per_group).min(batch)).enumerate() {
            let cols = columns(g, &src[b * g.image_len()..][..g.image_len()], buf, threads);
            let ab = Mat::rows(&a[b * rows * l..][..rows * l], rows, l);
            matmul(MatMut::rows(part, rows, kk), ab, Mat::transposed(cols, kk, l), 1.0, j > 0, threads);
        }
    };
    match threads_for(groups) {
        Threads::Single => {
            let mut partials = vec![0.0f32; groups * wl];
            partials
                .par_chunks_mut(wl)
                .enumerate()
                .for_each_init(Vec::new, |buf, (gi, part)| group_partial(gi, part, buf, Threads::Single));
            // dw[e] += p0[e], then p1[e], ...: parallel over elements, fixed order per element.
            const CHUNK: usize = 4096;
            dw.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, d)| {
                for p in partials.chunks_exact(wl) {
                    add_into(d, &p[ci * CHUNK..][..d.len()]);
                }
            });
        }
        Threads::Pool => {
            let (mut part, mut buf) = (vec![0.0f32; wl], Vec::new());
            for gi in 0..groups {
                group_partial(gi, &mut part, &mut buf, Threads::Pool);
                add_into(dw, &part);
            }
        }
    }
}

/// `dbias[c] += Σ_b Σ_(h,w) dout[b, c, h, w]`: per channel (in parallel), each image's plane
/// summed with [`math::sum`] and the images added in order in f64, so the result is the same for
/// any thread count.
fn bias_grad(batch: usize, channels: usize, plane: usize, dout: &[f32], dbias: &mut [f32]) {
    assert_eq!(dbias.len(), channels, "conv: dbias length");
    assert_eq!(dout.len(), batch * channels * plane);
    dbias.par_iter_mut().enumerate().for_each(|(c, db)| {
        let total: f64 = (0..batch).map(|b| math::sum(&dout[(b * channels + c) * plane..][..plane]) as f64).sum();
        *db += total as f32;
    });
}

/// PyTorch `Conv2d` forward:
/// `out[b, co, oh, ow] = bias[co] + Σ weight[co, ci, kh, kw] · x[b, ci, oh·s - p + kh, ow·s - p + kw]`
/// with `x` `[batch, in, in_h, in_w]`, `weight` `[out, in, k, k]`, `bias` `[out]`, `out`
/// `[batch, out, out_h, out_w]` (overwritten).
pub fn conv2d_forward(shape: &Conv2dShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let g = shape.conv_cols();
    assert_eq!(x.len(), shape.batch * g.image_len(), "conv2d_forward: x length");
    assert_eq!(weight.len(), shape.weight_len(), "conv2d_forward: weight length");
    assert_eq!(out.len(), shape.batch * shape.out_channels * g.len(), "conv2d_forward: out length");
    if let Some(b) = bias {
        assert_eq!(b.len(), shape.out_channels, "conv2d_forward: bias length");
    }
    gather(shape.batch, &g, weight, shape.out_channels, x, out, Start::from_bias(bias));
}

/// Backward of [`conv2d_forward`]. `dx` (skipped when `None`) is overwritten or added to as its
/// [`DxMode`] says; `dweight` and `dbias` are accumulated (`+=`), so a caller zeroes parameter
/// gradients once per step. `dweight` and `dbias` are bit-identical for any number of threads.
pub fn conv2d_backward(
    shape: &Conv2dShape,
    x: &[f32],
    weight: &[f32],
    dout: &[f32],
    dx: Option<(&mut [f32], DxMode)>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let g = shape.conv_cols();
    let co = shape.out_channels;
    assert_eq!(x.len(), shape.batch * g.image_len(), "conv2d_backward: x length");
    assert_eq!(weight.len(), shape.weight_len(), "conv2d_backward: weight length");
    assert_eq!(dweight.len(), shape.weight_len(), "conv2d_backward: dweight length");
    assert_eq!(dout.len(), shape.batch * co * g.len(), "conv2d_backward: dout length");
    if let Some(db) = dbias {
        bias_grad(shape.batch, co, g.len(), dout, db);
    }
    weight_grad(shape.batch, &g, dout, co, x, dweight);
    if let Some((dx, mode)) = dx {
        assert_eq!(dx.len(), x.len(), "conv2d_backward: dx length");
        scatter(shape.batch, &g, weight, co, dout, dx, Start::from_mode(mode));
    }
}

/// PyTorch `ConvTranspose2d` forward (output_padding 0): every input pixel spreads a weighted
/// `k x k` patch, `out[b, co, ih·s - p + kh, iw·s - p + kw] += x[b, ci, ih, iw] · weight[ci, co,
/// kh, kw]`, plus `bias[co]`. `x` `[batch, in, in_h, in_w]`, `weight` `[in, out, k, k]`, `out`
/// `[batch, out, transpose_out_h, transpose_out_w]` (overwritten).
pub fn conv_transpose2d_forward(shape: &Conv2dShape, x: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let g = shape.transpose_cols();
    assert_eq!(x.len(), shape.batch * shape.in_channels * g.len(), "conv_transpose2d_forward: x length");
    assert_eq!(weight.len(), shape.weight_len(), "conv_transpose2d_forward: weight length");
    assert_eq!(out.len(), shape.batch * g.image_len(), "conv_transpose2d_forward: out length");
    if let Some(b) = bias {
        assert_eq!(b.len(), shape.out_channels, "conv_transpose2d_forward: bias length");
    }
    scatter(shape.batch, &g, weight, shape.in_channels, x, out, Start::from_bias(bias));
}

/// Backward of [`conv_transpose2d_forward`]: `dx` (`None` skips it) overwritten or added to per
/// its [`DxMode`]; `dweight` and `dbias` accumulated (`+=`), bit-identical for any thread count.
pub fn conv_transpose2d_backward(
    shape: &Conv2dShape,
    x: &[f32],
    weight: &[f32],
    dout: &[f32],
    dx: Option<(&mut [f32], DxMode)>,
    dweight: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    let g = shape.transpose_cols();
    let ci = shape.in_channels;
    assert_eq!(x.len(), shape.batch * ci * g.len(), "conv_transpose2d_backward: x length");
    assert_eq!(weight.len(), shape.weight_len(), "conv_transpose2d_backward: weight length");
    assert_eq!(dweight.len(), shape.weight_len(), "conv_transpose2d_backward: dweight length");
    assert_eq!(dout.len(), shape.batch * g.image_len(), "conv_transpose2d_backward: dout length");
    if let Some(db) = dbias {
        bias_grad(shape.batch, shape.out_channels, g.h * g.w, dout, db);
    }
    // dweight[ci, (co, kh, kw)] += Σ_b x_b[ci, L] · im2col(dout_b)ᵀ.
    weight_grad(shape.batch, &g, x, ci, dout, dweight);
    if let Some((dx, mode)) = dx {
        assert_eq!(dx.len(), x.len(), "conv_transpose2d_backward: dx length");
        // dx_b = W[ci, K] · im2col(dout_b): a plain convolution of the upstream gradient.
        gather(shape.batch, &g, weight, ci, dout, dx, Start::from_mode(mode));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_range_matches_brute_force() {
        for n_in in 1..9 {
            for s in 1..4 {
                for p in 0..4 {
                    for off in 0..7 {
                        let n_out = 12;
                        let (lo, hi) = valid_range(n_out, n_in, s, off, p);
                        for o in 0..n_out {
                            let i = (o * s + off) as isize - p as isize;
                            let inside = i >= 0 && i < n_in as isize;
                            assert_eq!(inside, o >= lo && o < hi, "n_in {n_in} s {s} p {p} off {off} o {o}");
                        }
                    }
                }
            }
        }
    }
}
