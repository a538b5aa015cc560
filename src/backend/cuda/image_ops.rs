//! The CUDA backend's [`ImageOps`] (the UperNet head's and the tokenizer's convolutional ops) over
//! a pass's planned views, for fp32 storage: each op resolves its views in the [`CudaMemory`]
//! and calls the kernel wrapper of `conv.rs` (cuBLASLt around im2col/col2im) or `image.rs`.
//! The CPU's implementation (`backend::cpu::image_ops`) is the reference; tests/cuda_image_ops.rs
//! runs every op through the trait on both backends.
//!
//! Storage is f32 only: the convolutional heads run in the parity precision (the image kernels
//! are f32), so `ImageOps` is implemented for `CudaBackend<f32>`.
//!
//! Scratch: the convolutions' column matrices, the batch-norm backward's per-channel f64 sums
//! and the pixel loss's per-image sums are allocated per call (sized from the op's shape); the
//! transformer ops take theirs from the planned arena. Planning these too is issue 20's
//! "no per-call device allocation".

use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice};

use super::conv::{conv_scratch_len, ColsGeometry};
use super::image::BnStats;
use super::ops::{check_views, CudaBackend, CudaMemory, DeviceView};
use crate::backend::image_ops::{batch_norm_saved_len, BatchNorm, ImageOps};
use crate::backend::memory::{Space, View};
use crate::backend::ops::DxMode;
use crate::backend::shapes::{BnShape, Conv2dShape, ResizeShape};
use crate::error::Result;

/// An f32 view in any space but `Index` (with f32 storage, activations and parameters are f32
/// like statistics and gradients).
pub(super) fn f32_view(m: &CudaMemory<'_, f32>, v: View) -> DeviceView<f32> {
    match v.space {
        Space::Act | Space::Param => m.t(v),
        Space::Stat | Space::Grad => m.f(v),
        Space::Index => panic!("image ops: an index view where f32 values belong"),
    }
}

/// The `[mean | 1/std | unbiased var]` thirds of a training batch norm's saved statistics.
fn bn_thirds(saved: View, channels: usize) -> [View; 3] {
    assert_eq!(saved.len, batch_norm_saved_len(channels), "batch norm: saved statistics length");
    [saved.sub(0, channels), saved.sub(channels, channels), saved.sub(2 * channels, channels)]
}

/// Column scratch a convolution of geometry `g` needs for `images` images: none for a 1x1,
/// stride-1, unpadded kernel (the image is its own column matrix).
fn conv_scratch(g: &ColsGeometry, images: usize) -> usize {
    if g.is_identity() {
        0
    } else {
        conv_scratch_len(g, images)
    }
}

impl CudaBackend<f32> {
    /// A zeroed device scratch of `len` elements (at least one: CUDA refuses empty allocations).
    pub(super) fn scratch<E: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<cudarc::driver::CudaSlice<E>> {
        self.device().zeros::<E>(len.max(1))
    }
}

/// Which convolution a pass runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Conv {
    Forward,
    Transposed,
}

/// The gradients a convolution's backward writes: the input's (when wanted, per mode), the
/// weight's and the bias's (added).
struct ConvGrads {
    dx: Option<(View, DxMode)>,
    dweight: View,
    dbias: Option<View>,
}

impl CudaBackend<f32> {
    /// A convolution or a transposed one (the same views, the same scratch rule, conv.rs's two
    /// forward wrappers).
    #[allow(clippy::too_many_arguments)]
    fn conv_forward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        kind: Conv,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()> {
        check_views("conv", &[out], &[x, weight, bias.unwrap_or(View::empty(Space::Param))]);
        let geometry = match kind {
            Conv::Forward => ColsGeometry::conv(&shape),
            Conv::Transposed => ColsGeometry::transpose(&shape),
        };
        let mut scratch = self.scratch::<f32>(conv_scratch(&geometry, shape.batch))?;
        let (x, w, mut o) = (f32_view(m, x), f32_view(m, weight), f32_view(m, out));
        let b = bias.map(|b| f32_view(m, b));
        let b = b.as_ref().map(|b| b as &dyn DevicePtr<f32>);
        let dev = self.device();
        match kind {
            Conv::Forward => dev.conv2d_forward(&shape, &x, &w, b, &mut o, &mut scratch),
            Conv::Transposed => dev.conv_transpose2d_forward(&shape, &x, &w, b, &mut o, &mut scratch),
        }
    }

    /// The backward of a convolution or a transposed one (the same views, the same scratch rule,
    /// conv.rs's two backward wrappers).
    #[allow(clippy::too_many_arguments)]
    fn conv_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        kind: Conv,
        grads: ConvGrads,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()> {
        let ConvGrads { dx, dweight, dbias } = grads;
        let dxv = dx.map_or(View::empty(Space::Act), |(v, _)| v);
        check_views("conv backward", &[dxv, dweight, dbias.unwrap_or(View::empty(Space::Grad))], &[dout, x, weight]);
        let geometry = match kind {
            Conv::Forward => ColsGeometry::conv(&shape),
            Conv::Transposed => ColsGeometry::transpose(&shape),
        };
        let mut scratch = self.scratch::<f32>(conv_scratch(&geometry, shape.batch))?;
        let (x, w, d) = (f32_view(m, x), f32_view(m, weight), f32_view(m, dout));
        let mut dw = f32_view(m, dweight);
        let mut db = dbias.map(|v| f32_view(m, v));
        let mut dxs = dx.map(|(v, mode)| (f32_view(m, v), mode));
        let dx = dxs.as_mut().map(|(v, mode)| (v as &mut dyn DevicePtrMut<f32>, *mode));
        let db = db.as_mut().map(|v| v as &mut dyn DevicePtrMut<f32>);
        let dev = self.device();
        match kind {
            Conv::Forward => dev.conv2d_backward(&shape, &x, &w, &d, dx, &mut dw, db, &mut scratch),
            Conv::Transposed => dev.conv_transpose2d_backward(&shape, &x, &w, &d, dx, &mut dw, db, &mut scratch),
        }
    }
}

impl ImageOps for CudaBackend<f32> {
    fn conv2d(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()> {
        self.conv_forward(m, Conv::Forward, out, x, weight, bias, shape)
    }

    fn conv2d_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dx: Option<(View, DxMode)>,
        dweight: View,
        dbias: Option<View>,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()> {
        self.conv_backward(m, Conv::Forward, ConvGrads { dx, dweight, dbias }, dout, x, weight, shape)
    }

    fn conv_transpose2d(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()> {
        self.conv_forward(m, Conv::Transposed, out, x, weight, bias, shape)
    }

    fn conv_transpose2d_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dx: Option<(View, DxMode)>,
        dweight: View,
        dbias: Option<View>,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()> {
        self.conv_backward(m, Conv::Transposed, ConvGrads { dx, dweight, dbias }, dout, x, weight, shape)
    }

    fn batch_norm_eval(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        x: View,
        bn: BatchNorm,
        shape: BnShape,
    ) -> Result<()> {
        check_views("batch_norm_eval", &[out], &[x, bn.gamma, bn.beta, bn.running_mean, bn.running_var]);
        let (xv, mut o) = (f32_view(m, x), f32_view(m, out));
        let (g, b, rm, rv) =
            (f32_view(m, bn.gamma), f32_view(m, bn.beta), f32_view(m, bn.running_mean), f32_view(m, bn.running_var));
        let stats = BnStats::Running { mean: &rm, var: &rv };
        self.device().batch_norm_apply(&xv, &mut o, &g, &b, stats, shape, bn.eps)
    }

    fn batch_norm_train(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        saved: View,
        x: View,
        gamma: View,
        beta: View,
        eps: f32,
        shape: BnShape,
    ) -> Result<()> {
        check_views("batch_norm_train", &[out, saved], &[x, gamma, beta]);
        let [mean, invstd, var] = bn_thirds(saved, shape.channels);
        let dev = self.device();
        let xv = f32_view(m, x);
        let (mut mv, mut iv, mut vv) = (f32_view(m, mean), f32_view(m, invstd), f32_view(m, var));
        dev.batch_norm_stats(&xv, shape, eps, &mut mv, &mut iv, &mut vv)?;
        let (g, b, mut o) = (f32_view(m, gamma), f32_view(m, beta), f32_view(m, out));
        dev.batch_norm_apply(&xv, &mut o, &g, &b, BnStats::Batch { mean: &mv, invstd: &iv }, shape, eps)
    }

    fn batch_norm_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dx: View,
        dgamma: View,
        dbeta: View,
        dy: View,
        x: View,
        gamma: View,
        saved: View,
        shape: BnShape,
    ) -> Result<()> {
        check_views("batch_norm_backward", &[dx, dgamma, dbeta], &[dy, x, gamma, saved]);
        let [mean, invstd, _] = bn_thirds(saved, shape.channels);
        let mut sums = self.scratch::<f64>(2 * shape.channels)?;
        let (xv, dyv, g, mv, iv) =
            (f32_view(m, x), f32_view(m, dy), f32_view(m, gamma), f32_view(m, mean), f32_view(m, invstd));
        let (mut dxv, mut dg, mut db) = (f32_view(m, dx), f32_view(m, dgamma), f32_view(m, dbeta));
        self.device().batch_norm_backward(&xv, &dyv, &g, &mv, &iv, shape, &mut sums, &mut dxv, &mut dg, &mut db)
    }

    fn batch_norm_update_running(
        &self,
        m: &mut CudaMemory<'_, f32>,
        running_mean: View,
        running_var: View,
        saved: View,
        momentum: f32,
    ) -> Result<()> {
        let channels = running_mean.len;
        let [mean, _, var] = bn_thirds(saved, channels);
        // The running statistics are buffers of the model (not parameters the trait forbids
        // writing): the caller passes them as statistics or gradients-space views it owns.
        check_views("batch_norm_update_running", &[running_mean, running_var], &[saved]);
        let (mut rm, mut rv) = (f32_view(m, running_mean), f32_view(m, running_var));
        let (mv, vv) = (f32_view(m, mean), f32_view(m, var));
        self.device().batch_norm_running_update(&mut rm, &mut rv, &mv, &vv, momentum)
    }

    fn relu(&self, m: &mut CudaMemory<'_, f32>, out: View, x: View) -> Result<()> {
        if out == x {
            check_views("relu", &[out], &[]);
            self.device().relu_inplace(&mut f32_view(m, out))
        } else {
            check_views("relu", &[out], &[x]);
            self.device().relu(&f32_view(m, x), &mut f32_view(m, out))
        }
    }

    fn relu_backward(&self, m: &mut CudaMemory<'_, f32>, dx: View, dout: View, y: View, mode: DxMode) -> Result<()> {
        let dev = self.device();
        if dx == dout {
            // In place: the kernel reads dy[i] before writing dx[i] of the same element.
            assert_eq!(mode, DxMode::Overwrite, "relu_backward: an in-place gradient is overwritten");
            check_views("relu_backward", &[dx], &[y]);
            let d = f32_view(m, dx);
            let mut d2 = f32_view(m, dx);
            dev.relu_backward(&f32_view(m, y), &d, &mut d2, mode)
        } else {
            check_views("relu_backward", &[dx], &[dout, y]);
            dev.relu_backward(&f32_view(m, y), &f32_view(m, dout), &mut f32_view(m, dx), mode)
        }
    }

    fn gelu(&self, m: &mut CudaMemory<'_, f32>, out: View, x: View) -> Result<()> {
        if out == x {
            check_views("gelu", &[out], &[]);
            self.device().gelu_forward_inplace::<f32>(&mut f32_view(m, out))
        } else {
            check_views("gelu", &[out], &[x]);
            self.device().gelu_forward::<f32>(&f32_view(m, x), &mut f32_view(m, out))
        }
    }

    fn gelu_input_backward(&self, m: &mut CudaMemory<'_, f32>, dx: View, dy: View, x: View) -> Result<()> {
        // The kernel allows dx to alias dy.
        let reads: &[View] = if dx == dy { &[x] } else { &[x, dy] };
        check_views("gelu_input_backward", &[dx], reads);
        self.device().gelu_backward::<f32>(&f32_view(m, x), &f32_view(m, dy), &mut f32_view(m, dx))
    }

    fn max_pool2x2_saved_len(&self, out_len: usize) -> usize {
        // One 32-bit index per output, stored in the f32 statistics buffer as its bits.
        out_len
    }

    fn max_pool2x2(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        saved: View,
        x: View,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        check_views("max_pool2x2", &[out, saved], &[x]);
        let s = f32_view(m, saved);
        // The argmax indices are u32 words in the f32 statistics buffer (never read as floats).
        let mut argmax =
            DeviceView::<u32>::raw(s.device_ptr(self.device().stream()).0, s.len(), self.device().stream().clone());
        self.device().max_pool2x2(&f32_view(m, x), &mut f32_view(m, out), &mut argmax, planes, (h, w))
    }

    fn max_pool2x2_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dx: View,
        dout: View,
        saved: View,
        planes: usize,
        h: usize,
        w: usize,
        mode: DxMode,
    ) -> Result<()> {
        check_views("max_pool2x2_backward", &[dx], &[dout, saved]);
        let s = f32_view(m, saved);
        let argmax =
            DeviceView::<u32>::raw(s.device_ptr(self.device().stream()).0, s.len(), self.device().stream().clone());
        self.device().max_pool2x2_backward(&f32_view(m, dout), &argmax, &mut f32_view(m, dx), planes, (h, w), mode)
    }

    fn adaptive_avg_pool(&self, m: &mut CudaMemory<'_, f32>, out: View, x: View, shape: ResizeShape) -> Result<()> {
        check_views("adaptive_avg_pool", &[out], &[x]);
        let (from, to) = ((shape.in_h, shape.in_w), (shape.out_h, shape.out_w));
        self.device().adaptive_avg_pool(&f32_view(m, x), &mut f32_view(m, out), shape.planes, from, to)
    }

    fn adaptive_avg_pool_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dx: View,
        dout: View,
        shape: ResizeShape,
    ) -> Result<()> {
        check_views("adaptive_avg_pool_backward", &[dx], &[dout]);
        let (from, to) = ((shape.in_h, shape.in_w), (shape.out_h, shape.out_w));
        self.device().adaptive_avg_pool_backward(&f32_view(m, dout), &mut f32_view(m, dx), shape.planes, from, to)
    }

    fn bilinear_resize(&self, m: &mut CudaMemory<'_, f32>, out: View, x: View, shape: ResizeShape) -> Result<()> {
        check_views("bilinear_resize", &[out], &[x]);
        let (from, to) = ((shape.in_h, shape.in_w), (shape.out_h, shape.out_w));
        self.device().bilinear(&f32_view(m, x), &mut f32_view(m, out), shape.planes, from, to)
    }

    fn bilinear_resize_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dx: View,
        dout: View,
        shape: ResizeShape,
    ) -> Result<()> {
        check_views("bilinear_resize_backward", &[dx], &[dout]);
        let (from, to) = ((shape.in_h, shape.in_w), (shape.out_h, shape.out_w));
        self.device().bilinear_backward(&f32_view(m, dout), &mut f32_view(m, dx), shape.planes, from, to)
    }

    fn scale(&self, m: &mut CudaMemory<'_, f32>, v: View, factor: f32) -> Result<()> {
        check_views("scale", &[v], &[]);
        self.device().scale(&mut f32_view(m, v), factor)
    }

    fn add_scaled(&self, m: &mut CudaMemory<'_, f32>, y: View, x: View, a: f32) -> Result<()> {
        check_views("add_scaled", &[y], &[x]);
        self.device().axpy::<f32>(a, &f32_view(m, x), &mut f32_view(m, y))
    }

    fn transpose(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        x: View,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        check_views("transpose", &[out], &[x]);
        self.device().transpose(&f32_view(m, x), &mut f32_view(m, out), batch, rows, cols)
    }

    fn pixel_cross_entropy(
        &self,
        m: &mut CudaMemory<'_, f32>,
        logits: View,
        labels: View,
        classes: usize,
        plane: usize,
        scale: f32,
    ) -> Result<()> {
        check_views("pixel_cross_entropy", &[logits], &[labels]);
        let images = logits.len / (classes * plane).max(1);
        let image_loss = self.scratch::<f64>(images)?;
        let dev = self.device();
        let mut image_loss_view =
            DeviceView::<f64>::raw(image_loss.device_ptr(dev.stream()).0, images, dev.stream().clone());
        dev.pixel_cross_entropy(&mut f32_view(m, logits), &m.i(labels), &mut image_loss_view, classes, plane, scale)?;
        dev.add_sum_f64(&mut m.loss(), &image_loss_view)?;
        // The scratch lives until the stream has used it: dropping a CudaSlice frees it in
        // stream order.
        drop(image_loss);
        Ok(())
    }
}
