//! Layer norm on the GPU (`cuda/layernorm.cu`): forward saving mean and rstd, the fused
//! residual-add + layer norm of a pre-LN block, and the backward with deterministic parameter
//! sums (per-block partials, then a fixed-order pass; no atomics). The CPU functions they equal
//! are `backend::cpu::layernorm::layernorm`, `backward::layernorm_backward` and
//! `elementwise::residual_add_into` (tests/cuda_kernels.rs).
//!
//! Storage `T` is `f32` or `half::bf16`; statistics and parameter gradients are always `f32`.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{config, int, Arg};
use super::matmul::GemmType;
use crate::backend::cpu::backward::DxMode;
use crate::error::Result;

const FILE: &str = "layernorm.cu";
/// Rows per block of the backward: `LN_BWD_ROWS` in the kernel file.
const BWD_ROWS: usize = 64;
/// Forward: one warp per row, 8 rows per block.
const FWD_THREADS: u32 = 256;
const FWD_ROWS: usize = FWD_THREADS as usize / 32;
const BWD_THREADS: u32 = 256;

/// Where the forward saves the per-row statistics for the backward (`[rows]` each).
pub struct LayerNormStats<'a> {
    pub mean: &'a mut dyn DevicePtrMut<f32>,
    pub rstd: &'a mut dyn DevicePtrMut<f32>,
}

/// The residual update fused before the norm: `resid = x + k_r·scale ⊙ (y + bias)`.
pub struct ResidualInput<'a, T> {
    pub x: &'a dyn DevicePtr<T>,
    pub y: &'a dyn DevicePtr<T>,
    /// The output projection's bias (`[dim]`), or none.
    pub bias: Option<&'a dyn DevicePtr<T>>,
    /// Layer scale λ (`[dim]`), or none.
    pub scale: Option<&'a dyn DevicePtr<T>>,
    /// Stochastic depth: `factors[r / rows_each]` multiplies row r's branch.
    pub row_factors: Option<(&'a dyn DevicePtr<f32>, usize)>,
}

/// Scratch (`f32` elements) [`CudaDevice::layernorm_backward`] needs for `rows` rows of `dim`.
pub fn layernorm_backward_scratch_len(rows: usize, dim: usize) -> usize {
    rows.div_ceil(BWD_ROWS) * 2 * dim
}

fn check_rows(what: &str, len: usize, dim: usize) -> Result<usize> {
    ensure!(dim > 0, InvalidArgument, "{what}: dim must be positive");
    ensure!(len % dim == 0, InvalidArgument, "{what}: {len} elements is not a whole number of rows of {dim}");
    Ok(len / dim)
}

impl CudaDevice {
    fn stats_args(&self, stats: Option<LayerNormStats<'_>>, rows: usize, what: &str) -> Result<(u64, u64)> {
        match stats {
            Some(s) => {
                ensure!(
                    s.mean.len() == rows && s.rstd.len() == rows,
                    InvalidArgument,
                    "{what}: mean/rstd hold {}/{} elements, expected {rows}",
                    s.mean.len(),
                    s.rstd.len()
                );
                Ok((self.addr_mut(s.mean), self.addr_mut(s.rstd)))
            }
            None => Ok((0, 0)),
        }
    }

    /// `out = layernorm(x)` over rows of `dim` (PyTorch's definition), saving mean and rstd
    /// when `stats` is given.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<T: GemmType>(
        &self,
        out: &mut dyn DevicePtrMut<T>,
        stats: Option<LayerNormStats<'_>>,
        x: &dyn DevicePtr<T>,
        gamma: &dyn DevicePtr<T>,
        beta: &dyn DevicePtr<T>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let rows = check_rows("layernorm_forward", x.len(), dim)?;
        ensure!(out.len() == x.len(), InvalidArgument, "layernorm_forward: out length {}", out.len());
        ensure!(gamma.len() == dim && beta.len() == dim, InvalidArgument, "layernorm_forward: gamma/beta length");
        let (mean, rstd) = self.stats_args(stats, rows, "layernorm_forward")?;
        let args = [
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr(gamma)),
            Arg::Ptr(self.addr(beta)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("dim", dim)?),
            Arg::F32(eps),
        ];
        let name = by_type::<T>("beit_layernorm_forward_f32", "beit_layernorm_forward_bf16");
        // SAFETY: the argument list is the kernel's signature; lengths checked above.
        unsafe { self.launch_kernel(FILE, name, config((rows.div_ceil(FWD_ROWS), 1, 1), FWD_THREADS), &args) }
    }

    /// The fused residual update and layer norm: `resid = x + k_r·scale ⊙ (y + bias)` (stored),
    /// then `out = layernorm(resid)`, the CPU's `residual_add_into` followed by `layernorm`.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_layernorm_forward<T: GemmType>(
        &self,
        resid: &mut dyn DevicePtrMut<T>,
        out: &mut dyn DevicePtrMut<T>,
        stats: Option<LayerNormStats<'_>>,
        input: ResidualInput<'_, T>,
        gamma: &dyn DevicePtr<T>,
        beta: &dyn DevicePtr<T>,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let n = input.x.len();
        let rows = check_rows("residual_layernorm_forward", n, dim)?;
        ensure!(
            input.y.len() == n && resid.len() == n && out.len() == n,
            InvalidArgument,
            "residual_layernorm_forward: x, y, resid and out must have the same length"
        );
        ensure!(
            gamma.len() == dim && beta.len() == dim,
            InvalidArgument,
            "residual_layernorm_forward: gamma/beta length"
        );
        for (what, p) in [("bias", input.bias), ("scale", input.scale)] {
            if let Some(p) = p {
                ensure!(p.len() == dim, InvalidArgument, "residual_layernorm_forward: {what} length {}", p.len());
            }
        }
        let (factors, rows_each) = match input.row_factors {
            Some((f, each)) => {
                ensure!(
                    each > 0 && f.len() * each == rows,
                    InvalidArgument,
                    "residual_layernorm_forward: row factors do not cover the rows"
                );
                (self.addr(f), each)
            }
            None => (0, 1),
        };
        let (mean, rstd) = self.stats_args(stats, rows, "residual_layernorm_forward")?;
        let args = [
            Arg::Ptr(self.addr_mut(resid)),
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::Ptr(self.addr(input.x)),
            Arg::Ptr(self.addr(input.y)),
            Arg::Ptr(input.bias.map_or(0, |b| self.addr(b))),
            Arg::Ptr(input.scale.map_or(0, |s| self.addr(s))),
            Arg::Ptr(factors),
            Arg::I32(int("rows_each", rows_each)?),
            Arg::Ptr(self.addr(gamma)),
            Arg::Ptr(self.addr(beta)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("dim", dim)?),
            Arg::F32(eps),
        ];
        let name = by_type::<T>("beit_layernorm_residual_forward_f32", "beit_layernorm_residual_forward_bf16");
        // SAFETY: the argument list is the kernel's signature; lengths checked above.
        unsafe { self.launch_kernel(FILE, name, config((rows.div_ceil(FWD_ROWS), 1, 1), FWD_THREADS), &args) }
    }

    /// Layer norm backward: `dx` overwritten or added to (`mode`), `dgamma` and `dbeta` (f32)
    /// accumulated (`+=`) in a fixed order, so they are bit-identical from run to run. `mean`
    /// and `rstd` are the forward's; `scratch` holds at least
    /// [`layernorm_backward_scratch_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: GemmType>(
        &self,
        dx: &mut dyn DevicePtrMut<T>,
        dgamma: &mut dyn DevicePtrMut<f32>,
        dbeta: &mut dyn DevicePtrMut<f32>,
        dy: &dyn DevicePtr<T>,
        x: &dyn DevicePtr<T>,
        gamma: &dyn DevicePtr<T>,
        mean: &dyn DevicePtr<f32>,
        rstd: &dyn DevicePtr<f32>,
        dim: usize,
        mode: DxMode,
        scratch: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        let rows = check_rows("layernorm_backward", x.len(), dim)?;
        ensure!(dx.len() == x.len() && dy.len() == x.len(), InvalidArgument, "layernorm_backward: dx/dy length");
        ensure!(
            gamma.len() == dim && dgamma.len() == dim && dbeta.len() == dim,
            InvalidArgument,
            "layernorm_backward: gamma/dgamma/dbeta length"
        );
        ensure!(mean.len() == rows && rstd.len() == rows, InvalidArgument, "layernorm_backward: mean/rstd length");
        let blocks = rows.div_ceil(BWD_ROWS);
        ensure!(
            scratch.len() >= layernorm_backward_scratch_len(rows, dim),
            InvalidArgument,
            "layernorm_backward: scratch holds {} floats, needs {}",
            scratch.len(),
            layernorm_backward_scratch_len(rows, dim)
        );
        if rows == 0 {
            return Ok(());
        }
        let partials = self.addr_mut(scratch);
        let args = [
            Arg::Ptr(self.addr_mut(dx)),
            Arg::Ptr(partials),
            Arg::Ptr(self.addr(dy)),
            Arg::Ptr(self.addr(x)),
            Arg::Ptr(self.addr(gamma)),
            Arg::Ptr(self.addr(mean)),
            Arg::Ptr(self.addr(rstd)),
            Arg::I32(int("rows", rows)?),
            Arg::I32(int("dim", dim)?),
            Arg::I32((mode == DxMode::Accumulate) as i32),
        ];
        let name = by_type::<T>("beit_layernorm_backward_f32", "beit_layernorm_backward_bf16");
        // SAFETY: the argument list is the kernel's signature; lengths checked above; block b
        // writes partial row b < blocks of the scratch.
        unsafe { self.launch_kernel(FILE, name, config((blocks, 1, 1), BWD_THREADS), &args)? };
        let args = [
            Arg::Ptr(self.addr_mut(dgamma)),
            Arg::Ptr(self.addr_mut(dbeta)),
            Arg::Ptr(partials),
            Arg::I32(int("blocks", blocks)?),
            Arg::I32(int("dim", dim)?),
        ];
        // SAFETY: as above; one thread per column.
        unsafe {
            self.launch_kernel(FILE, "beit_layernorm_backward_reduce", config((dim.div_ceil(256), 1, 1), 256), &args)
        }
    }
}
