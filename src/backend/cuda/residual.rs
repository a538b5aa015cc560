//! The residual branch of a pre-LN block on the GPU (`cuda/residual.cu`), forward without the
//! layer norm after it (the fused form is [`CudaDevice::residual_layernorm_forward`]) and
//! backward: the CPU's `elementwise::residual_add_into` and `backward::residual_add_backward`
//! (tests/cuda_kernels.rs).

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{int, Arg};
use super::layernorm::ResidualInput;
use super::matmul::GemmType;
use crate::error::Result;

const FILE: &str = "residual.cu";

impl CudaDevice {
    /// `out = x + k_r·scale ⊙ (y + bias)` over rows of `dim`: the residual branch of a pre-LN
    /// block without the layer norm [`CudaDevice::residual_layernorm_forward`] fuses after it
    /// (the same arithmetic), as the CPU's `residual_add_into`. `out` may address `input.x`
    /// (in place).
    pub fn residual_forward<T: GemmType>(
        &self,
        out: &mut dyn DevicePtrMut<T>,
        input: ResidualInput<'_, T>,
        dim: usize,
    ) -> Result<()> {
        let n = input.x.len();
        let rows = residual_rows("residual_forward", n, dim, &input)?;
        ensure!(
            out.len() == n && input.y.len() == n,
            InvalidArgument,
            "residual_forward: out holds {}, y {}, x {n}",
            out.len(),
            input.y.len()
        );
        let (factors, rows_each) = match input.row_factors {
            Some((f, each)) => (self.addr(f), each),
            None => (0, 1),
        };
        let args = [
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(self.addr(input.x)),
            Arg::Ptr(self.addr(input.y)),
            Arg::Ptr(input.bias.map_or(0, |b| self.addr(b))),
            Arg::Ptr(input.scale.map_or(0, |s| self.addr(s))),
            Arg::Ptr(factors),
            Arg::I32(int("rows_each", rows_each)?),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_residual_forward_f32", "beit_residual_forward_bf16");
        // SAFETY: the kernel's signature; x, y and out hold rows·dim, bias and scale dim, the
        // factors rows / rows_each (checked above).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(n, 256), &args) }
    }

    /// The backward of [`CudaDevice::residual_forward`]'s branch for `dacc` = dL/dout:
    /// `dy = k_r·scale ⊙ dacc` (dL/dy, whose column sums are dL/dbias), and with `prod`
    /// (layer scale: then `input.y` is the kept branch output) `prod = k_r·dacc ⊙ (y + bias)`,
    /// whose column sums are dL/dscale. `input.x` is not read.
    pub fn residual_backward<T: GemmType>(
        &self,
        dy: &mut dyn DevicePtrMut<T>,
        prod: Option<&mut dyn DevicePtrMut<f32>>,
        dacc: &dyn DevicePtr<T>,
        input: ResidualInput<'_, T>,
        dim: usize,
    ) -> Result<()> {
        let n = dacc.len();
        ensure!(dy.len() == n, InvalidArgument, "residual_backward: dy holds {}, dacc {n}", dy.len());
        let rows = residual_rows("residual_backward", n, dim, &input)?;
        let prod = match prod {
            Some(p) => {
                ensure!(p.len() == n && input.y.len() == n, InvalidArgument, "residual_backward: prod / y length");
                self.addr_mut(p)
            }
            None => 0,
        };
        let (factors, rows_each) = match input.row_factors {
            Some((f, each)) => (self.addr(f), each),
            None => (0, 1),
        };
        let args = [
            Arg::Ptr(self.addr_mut(dy)),
            Arg::Ptr(prod),
            Arg::Ptr(self.addr(dacc)),
            Arg::Ptr(if prod != 0 { self.addr(input.y) } else { 0 }),
            Arg::Ptr(input.bias.map_or(0, |b| self.addr(b))),
            Arg::Ptr(input.scale.map_or(0, |s| self.addr(s))),
            Arg::Ptr(factors),
            Arg::I32(int("rows_each", rows_each)?),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_residual_backward_f32", "beit_residual_backward_bf16");
        // SAFETY: the kernel's signature; dy, dacc (and prod, y when given) hold rows·dim, bias
        // and scale dim, the factors rows / rows_each (checked above).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(n, 256), &args) }
    }
}

/// Rows of `dim` in `n` elements, with the lengths of a residual's vectors checked.
fn residual_rows<T>(what: &str, n: usize, dim: usize, input: &ResidualInput<'_, T>) -> Result<usize> {
    ensure!(
        dim > 0 && n.is_multiple_of(dim),
        InvalidArgument,
        "{what}: {n} elements is not a whole number of rows of {dim}"
    );
    let rows = n / dim;
    for (name, v) in [("bias", input.bias), ("scale", input.scale)] {
        if let Some(v) = v {
            ensure!(v.len() == dim, InvalidArgument, "{what}: {name} holds {}, expected {dim}", v.len());
        }
    }
    if let Some((f, each)) = input.row_factors {
        ensure!(each > 0 && f.len() * each == rows, InvalidArgument, "{what}: row factors do not cover the rows");
    }
    Ok(rows)
}
