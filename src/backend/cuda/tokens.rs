//! The token-level ops of a BEiT pass around its blocks, on the GPU (`cuda/tokens.cu`): the
//! token sequence assembled from the patch embeddings (CLS token, mask token, absolute
//! positions) and its backward, rows gathered and scattered by index (the MIM head's masked
//! rows), and the mean of each image's patch tokens (the mean-pooling pooler) and its backward.
//! Each is the CPU op of `backend::cpu::ops` with the same arithmetic per element; the kernels
//! run against f64 loops in the host emulator (`scripts/emulate-kernels`) and against the CPU
//! ops on a GPU (tests/cuda_ops.rs). Masks and row indices are `int`s on the device.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{int, Arg};
use super::matmul::GemmType;
use crate::error::Result;

const FILE: &str = "tokens.cu";

/// The token sequence of a batch: `batch` images of `patches` patch tokens after one CLS token,
/// rows of `dim`.
#[derive(Debug, Clone, Copy)]
pub struct TokenShape {
    pub batch: usize,
    pub patches: usize,
    pub dim: usize,
}

impl TokenShape {
    pub fn tokens(&self) -> usize {
        self.patches + 1
    }
}

/// The device address of an optional buffer (0: none).
fn opt_addr<T>(dev: &CudaDevice, v: Option<&dyn DevicePtr<T>>) -> u64 {
    v.map_or(0, |v| dev.addr(v))
}

impl CudaDevice {
    /// `x[b, 0] = cls`, `x[b, 1 + p] = mask_token` where `masked[b, p] == 1` (with a mask token
    /// and a mask), else `embedded[b, p]`; then `+ positions[t]` (with absolute positions).
    #[allow(clippy::too_many_arguments)]
    pub fn assemble_tokens<T: GemmType>(
        &self,
        x: &mut dyn DevicePtrMut<T>,
        embedded: &dyn DevicePtr<T>,
        cls: &dyn DevicePtr<T>,
        mask_token: Option<&dyn DevicePtr<T>>,
        positions: Option<&dyn DevicePtr<T>>,
        masked: Option<&dyn DevicePtr<i32>>,
        shape: TokenShape,
    ) -> Result<()> {
        let TokenShape { batch, patches, dim } = shape;
        let (rows, t) = (batch * shape.tokens(), shape.tokens());
        ensure!(
            x.len() == rows * dim
                && embedded.len() == batch * patches * dim
                && cls.len() == dim
                && mask_token.is_none_or(|m| m.len() == dim)
                && positions.is_none_or(|p| p.len() == t * dim)
                && masked.is_none_or(|m| m.len() == batch * patches),
            InvalidArgument,
            "assemble_tokens: buffers do not hold {batch} images of {patches} patches of {dim}"
        );
        let args = [
            Arg::Ptr(self.addr_mut(x)),
            Arg::Ptr(self.addr(embedded)),
            Arg::Ptr(self.addr(cls)),
            Arg::Ptr(opt_addr(self, mask_token)),
            Arg::Ptr(opt_addr(self, positions)),
            Arg::Ptr(opt_addr(self, masked)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("patches", patches)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_assemble_f32", "beit_tokens_assemble_bf16");
        // SAFETY: the kernel's signature; every buffer holds what the shape says (checked).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(rows * dim, 256), &args) }
    }

    /// The backward of [`CudaDevice::assemble_tokens`] for `dx` = dL/dx: `dembedded` written
    /// (0 for the rows the mask token replaced), `dcls`, `dmask_token` (with a mask) and
    /// `dpositions` added to, each summed over the batch in image order.
    #[allow(clippy::too_many_arguments)]
    pub fn assemble_tokens_backward<T: GemmType>(
        &self,
        dembedded: &mut dyn DevicePtrMut<T>,
        dcls: &mut dyn DevicePtrMut<f32>,
        dmask_token: Option<&mut dyn DevicePtrMut<f32>>,
        dpositions: Option<&mut dyn DevicePtrMut<f32>>,
        dx: &dyn DevicePtr<T>,
        masked: Option<&dyn DevicePtr<i32>>,
        shape: TokenShape,
    ) -> Result<()> {
        let TokenShape { batch, patches, dim } = shape;
        let tokens = shape.tokens();
        ensure!(
            dx.len() == batch * tokens * dim
                && dembedded.len() == batch * patches * dim
                && dcls.len() == dim
                && dmask_token.as_ref().is_none_or(|m| m.len() == dim)
                && dpositions.as_ref().is_none_or(|p| p.len() == tokens * dim)
                && masked.is_none_or(|m| m.len() == batch * patches),
            InvalidArgument,
            "assemble_tokens_backward: buffers do not hold {batch} images of {patches} patches of {dim}"
        );
        let has_mask_token = dmask_token.is_some();
        let args = [
            Arg::Ptr(self.addr_mut(dcls)),
            Arg::Ptr(dpositions.map_or(0, |p| self.addr_mut(p))),
            Arg::Ptr(dmask_token.map_or(0, |m| self.addr_mut(m))),
            Arg::Ptr(self.addr(dx)),
            Arg::Ptr(opt_addr(self, masked)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("patches", patches)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_embed_param_grads_f32", "beit_tokens_embed_param_grads_bf16");
        // SAFETY: the kernel's signature; dx holds b·t·d, the gradients d and t·d (checked).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(tokens * dim + dim, 128), &args)? };
        let args = [
            Arg::Ptr(self.addr_mut(dembedded)),
            Arg::Ptr(self.addr(dx)),
            Arg::Ptr(opt_addr(self, masked)),
            Arg::I32(has_mask_token as i32),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("patches", patches)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_embed_backward_rows_f32", "beit_tokens_embed_backward_rows_bf16");
        // SAFETY: the kernel's signature; dembedded holds b·n·d (checked).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(batch * patches * dim, 256), &args) }
    }

    /// `dst[r] = src[index[r]]`, rows of `dim`, one row per index. Every index must be a row of
    /// `src` (the caller's).
    pub fn gather_rows<T: GemmType>(
        &self,
        dst: &mut dyn DevicePtrMut<T>,
        src: &dyn DevicePtr<T>,
        index: &dyn DevicePtr<i32>,
        dim: usize,
    ) -> Result<()> {
        let name = by_type::<T>("beit_tokens_gather_rows_f32", "beit_tokens_gather_rows_bf16");
        let (dense, indexed) = (dst.len(), src.len());
        self.rows_kernel(name, self.addr_mut(dst), self.addr(src), index, dense, indexed, dim)
    }

    /// `dst[index[r]] = src[r]`, rows of `dim`, one row per index; other rows of `dst` keep what
    /// they hold. Every index must be a row of `dst`, each at most once (the caller's).
    pub fn scatter_rows<T: GemmType>(
        &self,
        dst: &mut dyn DevicePtrMut<T>,
        src: &dyn DevicePtr<T>,
        index: &dyn DevicePtr<i32>,
        dim: usize,
    ) -> Result<()> {
        let name = by_type::<T>("beit_tokens_scatter_rows_f32", "beit_tokens_scatter_rows_bf16");
        let (dense, indexed) = (src.len(), dst.len());
        self.rows_kernel(name, self.addr_mut(dst), self.addr(src), index, dense, indexed, dim)
    }

    #[allow(clippy::too_many_arguments)]
    fn rows_kernel(
        &self,
        name: &'static str,
        dst: u64,
        src: u64,
        index: &dyn DevicePtr<i32>,
        dense: usize,
        indexed: usize,
        dim: usize,
    ) -> Result<()> {
        let count = index.len();
        ensure!(
            dim > 0 && dense == count * dim && indexed.is_multiple_of(dim),
            InvalidArgument,
            "{name}: {count} rows of {dim} between buffers of {dense} and {indexed}"
        );
        if count == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(dst),
            Arg::Ptr(src),
            Arg::Ptr(self.addr(index)),
            Arg::I32(int("rows", count)?),
            Arg::I32(int("dim", dim)?),
        ];
        // SAFETY: the kernel's signature; the dense side holds count·dim (checked), the indices
        // address rows of the indexed side (the caller's).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(count * dim, 256), &args) }
    }

    /// `out[b] = mean of hidden[b, 1..tokens]` over `[batch, tokens, dim]` `hidden`.
    pub fn mean_patch_tokens<T: GemmType>(
        &self,
        out: &mut dyn DevicePtrMut<T>,
        hidden: &dyn DevicePtr<T>,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        let batch = self.pool_batch("mean_patch_tokens", out.len(), hidden.len(), tokens, dim)?;
        let args = [
            Arg::Ptr(self.addr_mut(out)),
            Arg::Ptr(self.addr(hidden)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("tokens", tokens)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_mean_patches_f32", "beit_tokens_mean_patches_bf16");
        // SAFETY: the kernel's signature; out holds batch·dim, hidden batch·tokens·dim (checked).
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(batch * dim, 256), &args) }
    }

    /// The backward of [`CudaDevice::mean_patch_tokens`]: `dhidden` written (the CLS rows 0).
    pub fn mean_patch_tokens_backward<T: GemmType>(
        &self,
        dhidden: &mut dyn DevicePtrMut<T>,
        dout: &dyn DevicePtr<T>,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        let batch = self.pool_batch("mean_patch_tokens_backward", dout.len(), dhidden.len(), tokens, dim)?;
        let args = [
            Arg::Ptr(self.addr_mut(dhidden)),
            Arg::Ptr(self.addr(dout)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("tokens", tokens)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_mean_patches_backward_f32", "beit_tokens_mean_patches_backward_bf16");
        // SAFETY: the kernel's signature; lengths checked.
        unsafe { self.launch_kernel(FILE, name, self.launch_1d(batch * tokens * dim, 256), &args) }
    }

    /// Images of a mean-pooling op: `pooled` holds `batch·dim`, `hidden` `batch·tokens·dim`.
    fn pool_batch(&self, what: &str, pooled: usize, hidden: usize, tokens: usize, dim: usize) -> Result<usize> {
        ensure!(
            tokens > 1 && dim > 0 && pooled.is_multiple_of(dim) && hidden == pooled * tokens,
            InvalidArgument,
            "{what}: {pooled} pooled and {hidden} hidden values are not images of {tokens} tokens of {dim}"
        );
        Ok(pooled / dim)
    }
}
