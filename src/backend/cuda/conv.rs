//! 2-D convolution and transposed convolution on the GPU (NCHW, groups 1, dilation 1,
//! output_padding 0), as the CPU's `backend::cpu::conv`: im2col / col2im kernels
//! (`cuda/conv.cu`) around cuBLASLt products. Used by the patch embedding (kernel = stride =
//! patch, where im2col is a pure rearrangement) and the dVAE.
//!
//! Per image, with the column geometry [`ColsGeometry`] (the CPU's `Cols`):
//! - gather: `out_b[rows, L] (=|+=) W[rows, K] · im2col(src_b)` (conv2d forward, and the input
//!   gradient of conv_transpose2d);
//! - scatter: `img_b (=|+=) col2im(Wᵀ · a_b)` (conv2d input gradient, conv_transpose2d forward);
//! - weight gradient: `dW[rows, K] += Σ_b a_b · im2col(src_b)ᵀ`, one product per image added in
//!   image order (deterministic), into f32.
//!
//! Images are processed in chunks whose column matrices fit the caller's scratch
//! ([`conv_scratch_len`]); 1x1 stride-1 unpadded kernels need none (the image is its own column
//! matrix). Bias gradients are [`CudaDevice::channel_sums`].

use std::ops::{Bound, RangeBounds};

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{int, Arg};
use super::matmul::{Epilogue, GemmType};
use super::ops::DeviceView;
use crate::backend::cpu::backward::DxMode;
pub use crate::backend::cpu::conv::Conv2dShape;
use crate::backend::shapes::GemmShape;
use crate::error::Result;

const FILE: &str = "conv.cu";
const THREADS: u32 = 256;

/// One image's im2col geometry: `channels` planes of `h x w` on the image side, `oh x ow`
/// kernel positions on the column side; the column matrix is `[channels·k·k, oh·ow]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColsGeometry {
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ColsGeometry {
    /// conv2d's: the image is the input, the columns its output positions.
    pub fn conv(s: &Conv2dShape) -> Self {
        ColsGeometry {
            channels: s.in_channels,
            h: s.in_h,
            w: s.in_w,
            k: s.kernel,
            stride: s.stride,
            pad: s.padding,
            oh: s.out_h(),
            ow: s.out_w(),
        }
    }

    /// conv_transpose2d's: the image is its output, the columns its input positions.
    pub fn transpose(s: &Conv2dShape) -> Self {
        ColsGeometry {
            channels: s.out_channels,
            h: s.transpose_out_h(),
            w: s.transpose_out_w(),
            k: s.kernel,
            stride: s.stride,
            pad: s.padding,
            oh: s.in_h,
            ow: s.in_w,
        }
    }

    /// Rows of the column matrix (the products' inner dimension), `channels·k·k`.
    pub fn rows(&self) -> usize {
        self.channels * self.k * self.k
    }

    /// Columns of the column matrix, `oh·ow`.
    pub fn cols(&self) -> usize {
        self.oh * self.ow
    }

    pub fn image_len(&self) -> usize {
        self.channels * self.h * self.w
    }

    /// A 1x1 kernel with stride 1 and no padding: the column matrix is the image itself.
    pub fn is_identity(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }

    fn args(&self) -> Result<[Arg; 8]> {
        Ok([
            Arg::I32(int("channels", self.channels)?),
            Arg::I32(int("h", self.h)?),
            Arg::I32(int("w", self.w)?),
            Arg::I32(int("kernel", self.k)?),
            Arg::I32(int("stride", self.stride)?),
            Arg::I32(int("padding", self.pad)?),
            Arg::I32(int("oh", self.oh)?),
            Arg::I32(int("ow", self.ow)?),
        ])
    }
}

/// Scratch (`T` elements) for the column matrices of `images` images at once (0 for a 1x1
/// identity geometry). Conv wrappers need room for at least one image; more images per chunk
/// means fewer, larger products.
pub fn conv_scratch_len(g: &ColsGeometry, images: usize) -> usize {
    if g.is_identity() {
        0
    } else {
        images * g.rows() * g.cols()
    }
}

/// What the destination of a scatter starts from.
#[derive(Clone, Copy)]
enum Start<'a, T> {
    Zero,
    Keep,
    Bias(&'a dyn DevicePtr<T>),
}

/// Elements `range` of a buffer of `len`, as (offset, length); panics outside it (a caller bug:
/// every range below is computed from checked lengths).
fn resolve(range: impl RangeBounds<usize>, len: usize) -> (usize, usize) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    assert!(start <= end && end <= len, "conv: elements {start}..{end} of a buffer of {len}");
    (start, end - start)
}

impl CudaDevice {
    /// Elements `range` of `x` as a view (any buffer or view: the convolutions run on a pass's
    /// planned views as well as on plain buffers).
    fn sub<T>(&self, x: &dyn DevicePtr<T>, range: impl RangeBounds<usize>) -> DeviceView<T> {
        let (offset, len) = resolve(range, x.len());
        DeviceView::raw(self.addr(x) + (offset * std::mem::size_of::<T>()) as u64, len, self.stream().clone())
    }

    /// [`CudaDevice::sub`] of a buffer the caller may write.
    fn sub_mut<T>(&self, x: &mut dyn DevicePtrMut<T>, range: impl RangeBounds<usize>) -> DeviceView<T> {
        let (offset, len) = resolve(range, x.len());
        DeviceView::raw(self.addr_mut(x) + (offset * std::mem::size_of::<T>()) as u64, len, self.stream().clone())
    }

    unsafe fn im2col_raw<T: GemmType>(&self, cols: u64, img: u64, batch: usize, g: &ColsGeometry) -> Result<()> {
        let mut args = vec![Arg::Ptr(cols), Arg::Ptr(img), Arg::I32(int("batch", batch)?)];
        args.extend(g.args()?);
        let total = batch * g.rows() * g.cols();
        let name = by_type::<T>("beit_conv_im2col_f32", "beit_conv_im2col_bf16");
        // SAFETY: the kernel's signature; the caller vouches for the buffers.
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(total, THREADS), &args) }
    }

    unsafe fn col2im_raw<T: GemmType>(
        &self,
        img: u64,
        cols: u64,
        bias: u64,
        batch: usize,
        g: &ColsGeometry,
        accumulate: bool,
    ) -> Result<()> {
        let mut args = vec![Arg::Ptr(img), Arg::Ptr(cols), Arg::Ptr(bias), Arg::I32(int("batch", batch)?)];
        args.extend(g.args()?);
        args.push(Arg::I32(accumulate as i32));
        let total = batch * g.image_len();
        let name = by_type::<T>("beit_conv_col2im_f32", "beit_conv_col2im_bf16");
        // SAFETY: the kernel's signature; the caller vouches for the buffers.
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(total, THREADS), &args) }
    }

    /// `cols[b] = im2col(img[b])` for `batch` images (`[batch, rows, cols]` out).
    pub fn im2col<T: GemmType>(
        &self,
        cols: &mut dyn DevicePtrMut<T>,
        img: &dyn DevicePtr<T>,
        batch: usize,
        g: &ColsGeometry,
    ) -> Result<()> {
        ensure!(img.len() == batch * g.image_len(), InvalidArgument, "im2col: image holds {}", img.len());
        ensure!(cols.len() == batch * g.rows() * g.cols(), InvalidArgument, "im2col: columns hold {}", cols.len());
        // SAFETY: lengths checked above.
        unsafe { self.im2col_raw::<T>(self.addr_mut(cols), self.addr(img), batch, g) }
    }

    /// `img[b] = start + col2im(cols[b])` where start is `img` itself (`accumulate`), else
    /// `bias[c]` per channel (when given), else 0. The k·k taps of each pixel are added in
    /// (kh, kw) order: the CPU's order.
    pub fn col2im<T: GemmType>(
        &self,
        img: &mut dyn DevicePtrMut<T>,
        cols: &dyn DevicePtr<T>,
        bias: Option<&dyn DevicePtr<T>>,
        batch: usize,
        g: &ColsGeometry,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(img.len() == batch * g.image_len(), InvalidArgument, "col2im: image holds {}", img.len());
        ensure!(cols.len() == batch * g.rows() * g.cols(), InvalidArgument, "col2im: columns hold {}", cols.len());
        if let Some(b) = bias {
            ensure!(b.len() == g.channels, InvalidArgument, "col2im: bias holds {}", b.len());
        }
        let bias = bias.map_or(0, |b| self.addr(b));
        // SAFETY: lengths checked above.
        unsafe { self.col2im_raw::<T>(self.addr_mut(img), self.addr(cols), bias, batch, g, accumulate) }
    }

    /// `out[b, c, :] += bias[c]` over NCHW `out` with `plane` elements per channel.
    fn channel_bias_add<T: GemmType>(
        &self,
        out: u64,
        bias: &dyn DevicePtr<T>,
        batch: usize,
        plane: usize,
    ) -> Result<()> {
        let channels = bias.len();
        let args = [
            Arg::Ptr(out),
            Arg::Ptr(self.addr(bias)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("channels", channels)?),
            Arg::I32(int("plane", plane)?),
        ];
        let name = by_type::<T>("beit_conv_channel_bias_add_f32", "beit_conv_channel_bias_add_bf16");
        // SAFETY: the kernel's signature; callers pass an output of batch·channels·plane.
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(batch * channels * plane, THREADS), &args) }
    }

    /// Images per chunk for a scratch of `scratch` elements (all of them for identity).
    fn chunk_images(g: &ColsGeometry, batch: usize, scratch: usize) -> Result<usize> {
        if g.is_identity() {
            return Ok(batch.max(1));
        }
        let per = g.rows() * g.cols();
        let n = (scratch / per.max(1)).min(batch);
        ensure!(n > 0 || batch == 0, InvalidArgument, "conv: scratch holds {scratch}, one image needs {per}");
        Ok(n.max(1))
    }

    /// Gather: `out_b[rows, L] = W[rows, K] · im2col(src_b)` (+ out_b with `accumulate`).
    #[allow(clippy::too_many_arguments)]
    fn conv_gather<T: GemmType>(
        &self,
        batch: usize,
        g: &ColsGeometry,
        weight: &dyn DevicePtr<T>,
        rows: usize,
        src: &dyn DevicePtr<T>,
        out: &mut dyn DevicePtrMut<T>,
        accumulate: bool,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let (kk, l, il) = (g.rows(), g.cols(), g.image_len());
        let chunk = Self::chunk_images(g, batch, scratch.len())?;
        let mut b0 = 0;
        while b0 < batch {
            let nb = chunk.min(batch - b0);
            let shape = GemmShape { stride_a: 0, ..GemmShape::new(rows, l, kk).batched(nb) };
            let mut c = self.sub_mut(out, b0 * rows * l..(b0 + nb) * rows * l);
            let beta = if accumulate { 1.0 } else { 0.0 };
            if g.is_identity() {
                let x = self.sub(src, b0 * il..(b0 + nb) * il);
                self.gemm::<T, T>(shape, 1.0, weight, &x, beta, &mut c, Epilogue::None)?;
            } else {
                let cols_p = self.addr_mut(scratch);
                // SAFETY: nb images of `src` from b0 (checked by the callers) into nb·K·L scratch.
                unsafe { self.im2col_raw::<T>(cols_p, self.addr(&self.sub(src, b0 * il..(b0 + nb) * il)), nb, g)? };
                let cols = self.sub_mut(scratch, ..nb * kk * l);
                self.gemm::<T, T>(shape, 1.0, weight, &cols, beta, &mut c, Epilogue::None)?;
            }
            b0 += nb;
        }
        Ok(())
    }

    /// Scatter: `img_b = start + col2im(Wᵀ[K, rows] · a_b)`, `weight` `[rows, K]`.
    #[allow(clippy::too_many_arguments)]
    fn conv_scatter<T: GemmType>(
        &self,
        batch: usize,
        g: &ColsGeometry,
        weight: &dyn DevicePtr<T>,
        rows: usize,
        a: &dyn DevicePtr<T>,
        img: &mut dyn DevicePtrMut<T>,
        start: Start<'_, T>,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let (kk, l, il) = (g.rows(), g.cols(), g.image_len());
        let chunk = Self::chunk_images(g, batch, scratch.len())?;
        let plane = g.h * g.w;
        let mut b0 = 0;
        while b0 < batch {
            let nb = chunk.min(batch - b0);
            let shape = GemmShape { trans_a: true, stride_a: 0, ..GemmShape::new(kk, l, rows).batched(nb) };
            let ab = self.sub(a, b0 * rows * l..(b0 + nb) * rows * l);
            let mut ib = self.sub_mut(img, b0 * il..(b0 + nb) * il);
            if g.is_identity() {
                let beta = if matches!(start, Start::Keep) { 1.0 } else { 0.0 };
                self.gemm::<T, T>(shape, 1.0, weight, &ab, beta, &mut ib, Epilogue::None)?;
                if let Start::Bias(bias) = start {
                    let p = self.addr_mut(&mut ib);
                    self.channel_bias_add::<T>(p, bias, nb, plane)?;
                }
            } else {
                {
                    let mut cols = self.sub_mut(scratch, ..nb * kk * l);
                    self.gemm::<T, T>(shape, 1.0, weight, &ab, 0.0, &mut cols, Epilogue::None)?;
                }
                let (bias, accumulate) = match start {
                    Start::Zero => (0, false),
                    Start::Keep => (0, true),
                    Start::Bias(b) => (self.addr(b), false),
                };
                let (ip, cp) = (self.addr_mut(&mut ib), self.addr(&self.sub_mut(scratch, ..nb * kk * l)));
                // SAFETY: nb images in `ib`, nb column matrices in the scratch, bias of
                // `channels` (checked by the callers).
                unsafe { self.col2im_raw::<T>(ip, cp, bias, nb, g, accumulate)? };
            }
            b0 += nb;
        }
        Ok(())
    }

    /// `dw[rows, K] += Σ_b a_b[rows, L] · im2col(src_b)ᵀ`, images in order, in f32.
    #[allow(clippy::too_many_arguments)]
    fn conv_weight_grad<T: GemmType>(
        &self,
        batch: usize,
        g: &ColsGeometry,
        a: &dyn DevicePtr<T>,
        rows: usize,
        src: &dyn DevicePtr<T>,
        dw: &mut dyn DevicePtrMut<f32>,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let (kk, l, il) = (g.rows(), g.cols(), g.image_len());
        let chunk = Self::chunk_images(g, batch, scratch.len())?;
        let shape = GemmShape { trans_b: true, ..GemmShape::new(rows, kk, l) };
        let mut b0 = 0;
        while b0 < batch {
            let nb = chunk.min(batch - b0);
            if !g.is_identity() {
                let cols_p = self.addr_mut(scratch);
                // SAFETY: nb images of `src` from b0 into nb·K·L scratch.
                unsafe { self.im2col_raw::<T>(cols_p, self.addr(&self.sub(src, b0 * il..(b0 + nb) * il)), nb, g)? };
            }
            for j in 0..nb {
                let b = b0 + j;
                let ab = self.sub(a, b * rows * l..(b + 1) * rows * l);
                if g.is_identity() {
                    let cols = self.sub(src, b * il..(b + 1) * il);
                    self.gemm::<T, f32>(shape, 1.0, &ab, &cols, 1.0, dw, Epilogue::None)?;
                } else {
                    let cols = self.sub_mut(scratch, j * kk * l..(j + 1) * kk * l);
                    self.gemm::<T, f32>(shape, 1.0, &ab, &cols, 1.0, dw, Epilogue::None)?;
                }
            }
            b0 += nb;
        }
        Ok(())
    }

    /// PyTorch `Conv2d` forward (the CPU's `conv2d_forward`): `out` `[batch, out, out_h, out_w]`
    /// overwritten from `x` `[batch, in, in_h, in_w]`, `weight` `[out, in, k, k]`, `bias` `[out]`.
    /// `scratch` holds [`conv_scratch_len`]`(ColsGeometry::conv(shape), n)` for some n ≥ 1.
    pub fn conv2d_forward<T: GemmType>(
        &self,
        shape: &Conv2dShape,
        x: &dyn DevicePtr<T>,
        weight: &dyn DevicePtr<T>,
        bias: Option<&dyn DevicePtr<T>>,
        out: &mut dyn DevicePtrMut<T>,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let g = ColsGeometry::conv(shape);
        let co = shape.out_channels;
        ensure!(x.len() == shape.batch * g.image_len(), InvalidArgument, "conv2d_forward: x holds {}", x.len());
        ensure!(weight.len() == shape.weight_len(), InvalidArgument, "conv2d_forward: weight holds {}", weight.len());
        ensure!(out.len() == shape.batch * co * g.cols(), InvalidArgument, "conv2d_forward: out holds {}", out.len());
        if let Some(b) = bias {
            ensure!(b.len() == co, InvalidArgument, "conv2d_forward: bias holds {}", b.len());
        }
        self.conv_gather(shape.batch, &g, weight, co, x, out, false, scratch)?;
        if let Some(b) = bias {
            let p = self.addr_mut(out);
            self.channel_bias_add::<T>(p, b, shape.batch, g.cols())?;
        }
        Ok(())
    }

    /// Backward of [`CudaDevice::conv2d_forward`] (the CPU's `conv2d_backward`): `dx`
    /// overwritten or added to per its [`DxMode`]; `dweight` and `dbias` (f32) accumulated.
    #[allow(clippy::too_many_arguments)]
    pub fn conv2d_backward<T: GemmType>(
        &self,
        shape: &Conv2dShape,
        x: &dyn DevicePtr<T>,
        weight: &dyn DevicePtr<T>,
        dout: &dyn DevicePtr<T>,
        dx: Option<(&mut dyn DevicePtrMut<T>, DxMode)>,
        dweight: &mut dyn DevicePtrMut<f32>,
        dbias: Option<&mut dyn DevicePtrMut<f32>>,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let g = ColsGeometry::conv(shape);
        let co = shape.out_channels;
        ensure!(x.len() == shape.batch * g.image_len(), InvalidArgument, "conv2d_backward: x holds {}", x.len());
        ensure!(weight.len() == shape.weight_len(), InvalidArgument, "conv2d_backward: weight holds {}", weight.len());
        ensure!(
            dweight.len() == shape.weight_len(),
            InvalidArgument,
            "conv2d_backward: dweight holds {}",
            dweight.len()
        );
        ensure!(
            dout.len() == shape.batch * co * g.cols(),
            InvalidArgument,
            "conv2d_backward: dout holds {}",
            dout.len()
        );
        if let Some(db) = dbias {
            ensure!(db.len() == co, InvalidArgument, "conv2d_backward: dbias holds {}", db.len());
            self.channel_sums::<T>(db, dout, shape.batch, g.cols())?;
        }
        self.conv_weight_grad(shape.batch, &g, dout, co, x, dweight, scratch)?;
        if let Some((dx, mode)) = dx {
            ensure!(dx.len() == x.len(), InvalidArgument, "conv2d_backward: dx holds {}", dx.len());
            let start = if mode == DxMode::Accumulate { Start::Keep } else { Start::Zero };
            self.conv_scatter(shape.batch, &g, weight, co, dout, dx, start, scratch)?;
        }
        Ok(())
    }

    /// PyTorch `ConvTranspose2d` forward (the CPU's `conv_transpose2d_forward`): `x`
    /// `[batch, in, in_h, in_w]`, `weight` `[in, out, k, k]`, `out` `[batch, out,
    /// transpose_out_h, transpose_out_w]` overwritten. `scratch` holds
    /// [`conv_scratch_len`]`(ColsGeometry::transpose(shape), n)` for some n ≥ 1.
    pub fn conv_transpose2d_forward<T: GemmType>(
        &self,
        shape: &Conv2dShape,
        x: &dyn DevicePtr<T>,
        weight: &dyn DevicePtr<T>,
        bias: Option<&dyn DevicePtr<T>>,
        out: &mut dyn DevicePtrMut<T>,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let g = ColsGeometry::transpose(shape);
        let ci = shape.in_channels;
        ensure!(
            x.len() == shape.batch * ci * g.cols(),
            InvalidArgument,
            "conv_transpose2d_forward: x holds {}",
            x.len()
        );
        ensure!(
            weight.len() == shape.weight_len(),
            InvalidArgument,
            "conv_transpose2d_forward: weight holds {}",
            weight.len()
        );
        ensure!(
            out.len() == shape.batch * g.image_len(),
            InvalidArgument,
            "conv_transpose2d_forward: out holds {}",
            out.len()
        );
        let start = match bias {
            Some(b) => {
                ensure!(
                    b.len() == shape.out_channels,
                    InvalidArgument,
                    "conv_transpose2d_forward: bias holds {}",
                    b.len()
                );
                Start::Bias(b)
            }
            None => Start::Zero,
        };
        self.conv_scatter(shape.batch, &g, weight, ci, x, out, start, scratch)
    }

    /// Backward of [`CudaDevice::conv_transpose2d_forward`] (the CPU's
    /// `conv_transpose2d_backward`): `dx` per its [`DxMode`]; `dweight`, `dbias` accumulated.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose2d_backward<T: GemmType>(
        &self,
        shape: &Conv2dShape,
        x: &dyn DevicePtr<T>,
        weight: &dyn DevicePtr<T>,
        dout: &dyn DevicePtr<T>,
        dx: Option<(&mut dyn DevicePtrMut<T>, DxMode)>,
        dweight: &mut dyn DevicePtrMut<f32>,
        dbias: Option<&mut dyn DevicePtrMut<f32>>,
        scratch: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let g = ColsGeometry::transpose(shape);
        let ci = shape.in_channels;
        ensure!(
            x.len() == shape.batch * ci * g.cols(),
            InvalidArgument,
            "conv_transpose2d_backward: x holds {}",
            x.len()
        );
        ensure!(
            weight.len() == shape.weight_len(),
            InvalidArgument,
            "conv_transpose2d_backward: weight holds {}",
            weight.len()
        );
        ensure!(
            dweight.len() == shape.weight_len(),
            InvalidArgument,
            "conv_transpose2d_backward: dweight holds {}",
            dweight.len()
        );
        ensure!(
            dout.len() == shape.batch * g.image_len(),
            InvalidArgument,
            "conv_transpose2d_backward: dout holds {}",
            dout.len()
        );
        if let Some(db) = dbias {
            ensure!(
                db.len() == shape.out_channels,
                InvalidArgument,
                "conv_transpose2d_backward: dbias holds {}",
                db.len()
            );
            self.channel_sums::<T>(db, dout, shape.batch, g.h * g.w)?;
        }
        // dweight[ci, (co, kh, kw)] += Σ_b x_b[ci, L] · im2col(dout_b)ᵀ.
        self.conv_weight_grad(shape.batch, &g, x, ci, dout, dweight, scratch)?;
        if let Some((dx, mode)) = dx {
            ensure!(dx.len() == x.len(), InvalidArgument, "conv_transpose2d_backward: dx holds {}", dx.len());
            // dx_b = W[ci, K] · im2col(dout_b): a plain convolution of the upstream gradient.
            self.conv_gather(shape.batch, &g, weight, ci, dout, dx, mode == DxMode::Accumulate, scratch)?;
        }
        Ok(())
    }
}
