//! Launch wrappers of the element-wise kernels: casts (`cuda/cast.cu`), exact GELU forward and
//! backward (`cuda/gelu.cu`), residual add and scaled add (`cuda/elementwise.cu`). Each checks
//! lengths, then queues one grid-stride kernel on the device's stream.

use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};

use super::device::{driver_error, CudaDevice};
use super::matmul::GemmType;
use crate::error::Result;

/// Picks the kernel for the element type: `f32` or `bf16` variant.
pub(crate) fn by_type<T: GemmType>(f32_name: &'static str, bf16_name: &'static str) -> &'static str {
    if T::NAME == "bf16" {
        bf16_name
    } else {
        f32_name
    }
}

const BLOCK: u32 = 256;

impl CudaDevice {
    /// Queues `file::name(ptrs..., n)` over `n` elements: the common shape of every kernel here.
    /// Buffers go as raw device pointers (u64), so in-place calls can pass one buffer twice.
    pub(crate) fn launch_pointwise(
        &self,
        file: &'static str,
        name: &'static str,
        scalars: &[f32],
        ptrs: &[u64],
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let f = self.function(file, name)?;
        let n_arg = n as i64;
        let mut launch = self.stream().launch_builder(&f);
        for s in scalars {
            launch.arg(s);
        }
        for p in ptrs {
            launch.arg(p);
        }
        launch.arg(&n_arg);
        // SAFETY: the kernel's signature is (float..., pointer..., long long) as pushed; every
        // pointer is a live device buffer of at least n elements (the callers check lengths).
        unsafe { launch.launch(self.launch_1d(n, BLOCK)) }
            .map_err(|e| driver_error(&format!("launching {name}"), e))?;
        Ok(())
    }

    /// `y = bf16(x)`, round to nearest even.
    pub fn cast_f32_to_bf16(&self, x: &dyn DevicePtr<f32>, y: &mut dyn DevicePtrMut<half::bf16>) -> Result<()> {
        let n = x.len();
        ensure!(y.len() == n, InvalidArgument, "cast: {} elements in, {} out", n, y.len());
        let xp = x.device_ptr(self.stream()).0;
        let yp = y.device_ptr_mut(self.stream()).0;
        self.launch_pointwise("cast.cu", "beit_cast_f32_to_bf16", &[], &[xp, yp], n)
    }

    /// `y = f32(x)` (exact).
    pub fn cast_bf16_to_f32(&self, x: &dyn DevicePtr<half::bf16>, y: &mut dyn DevicePtrMut<f32>) -> Result<()> {
        let n = x.len();
        ensure!(y.len() == n, InvalidArgument, "cast: {} elements in, {} out", n, y.len());
        let xp = x.device_ptr(self.stream()).0;
        let yp = y.device_ptr_mut(self.stream()).0;
        self.launch_pointwise("cast.cu", "beit_cast_bf16_to_f32", &[], &[xp, yp], n)
    }

    /// `y = GELU(x)`, the exact erf GELU.
    pub fn gelu_forward<T: GemmType>(&self, x: &dyn DevicePtr<T>, y: &mut dyn DevicePtrMut<T>) -> Result<()> {
        let n = x.len();
        ensure!(y.len() == n, InvalidArgument, "gelu: {} elements in, {} out", n, y.len());
        let xp = x.device_ptr(self.stream()).0;
        let yp = y.device_ptr_mut(self.stream()).0;
        self.launch_pointwise(
            "gelu.cu",
            by_type::<T>("beit_gelu_forward_f32", "beit_gelu_forward_bf16"),
            &[],
            &[xp, yp],
            n,
        )
    }

    /// `x = GELU(x)` in place.
    pub fn gelu_forward_inplace<T: GemmType>(&self, x: &mut dyn DevicePtrMut<T>) -> Result<()> {
        let n = x.len();
        let xp = x.device_ptr_mut(self.stream()).0;
        self.launch_pointwise(
            "gelu.cu",
            by_type::<T>("beit_gelu_forward_f32", "beit_gelu_forward_bf16"),
            &[],
            &[xp, xp],
            n,
        )
    }

    /// `dx = dy · GELU'(x)` with `x` the GELU's input, as the CPU's
    /// `backend::cpu::backward::gelu_backward(dx, dy, pre)`.
    pub fn gelu_backward<T: GemmType>(
        &self,
        x: &dyn DevicePtr<T>,
        dy: &dyn DevicePtr<T>,
        dx: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let n = x.len();
        ensure!(
            dy.len() == n && dx.len() == n,
            InvalidArgument,
            "gelu_backward: lengths {} {} {}",
            n,
            dy.len(),
            dx.len()
        );
        let xp = x.device_ptr(self.stream()).0;
        let dyp = dy.device_ptr(self.stream()).0;
        let dxp = dx.device_ptr_mut(self.stream()).0;
        self.launch_pointwise(
            "gelu.cu",
            by_type::<T>("beit_gelu_backward_f32", "beit_gelu_backward_bf16"),
            &[],
            &[xp, dyp, dxp],
            n,
        )
    }

    /// `y = a + b`.
    pub fn add<T: GemmType>(
        &self,
        a: &dyn DevicePtr<T>,
        b: &dyn DevicePtr<T>,
        y: &mut dyn DevicePtrMut<T>,
    ) -> Result<()> {
        let n = a.len();
        ensure!(b.len() == n && y.len() == n, InvalidArgument, "add: lengths {} {} {}", n, b.len(), y.len());
        let ap = a.device_ptr(self.stream()).0;
        let bp = b.device_ptr(self.stream()).0;
        let yp = y.device_ptr_mut(self.stream()).0;
        self.launch_pointwise("elementwise.cu", by_type::<T>("beit_add_f32", "beit_add_bf16"), &[], &[ap, bp, yp], n)
    }

    /// `acc += b`: the residual update in place.
    pub fn residual_add<T: GemmType>(&self, acc: &mut dyn DevicePtrMut<T>, b: &dyn DevicePtr<T>) -> Result<()> {
        let n = acc.len();
        ensure!(b.len() == n, InvalidArgument, "residual_add: lengths {} {}", n, b.len());
        let bp = b.device_ptr(self.stream()).0;
        let ap = acc.device_ptr_mut(self.stream()).0;
        self.launch_pointwise("elementwise.cu", by_type::<T>("beit_add_f32", "beit_add_bf16"), &[], &[ap, bp, ap], n)
    }

    /// `y += s·x`.
    pub fn axpy<T: GemmType>(&self, s: f32, x: &dyn DevicePtr<T>, y: &mut dyn DevicePtrMut<T>) -> Result<()> {
        let n = x.len();
        ensure!(y.len() == n, InvalidArgument, "axpy: lengths {} {}", n, y.len());
        let xp = x.device_ptr(self.stream()).0;
        let yp = y.device_ptr_mut(self.stream()).0;
        self.launch_pointwise("elementwise.cu", by_type::<T>("beit_axpy_f32", "beit_axpy_bf16"), &[s], &[xp, yp], n)
    }
}
