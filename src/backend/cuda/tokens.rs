//! The token-level ops of a BEiT pass around its blocks, on the GPU (`cuda/tokens.cu`): the
//! token sequence assembled from the patch embeddings (CLS token, mask token, absolute
//! positions) and its backward, and rows gathered and scattered by index (the MIM head's masked
//! rows). Each is a loop of the CPU pass (`model::forward::embed_into`, `model::training`) with
//! the same arithmetic per element; the kernels run against f64 loops in the host emulator
//! (`scripts/emulate-kernels`) and, through the whole MIM step, against the CPU pass on a GPU
//! (tests/cuda_pretrain.rs).

use cudarc::driver::DevicePtr;

use super::elementwise::by_type;
use super::kernel_args::{int, Arg};
use super::ops::{check_views, Act, CudaBackend, CudaMemory};
use crate::backend::memory::View;
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

/// The embeddings' parameters the assembly reads (`Param` views), or their gradients (`Grad`).
#[derive(Debug, Clone, Copy)]
pub struct TokenParams {
    pub cls: View,
    pub mask_token: Option<View>,
    pub position: Option<View>,
}

impl<T: Act> CudaBackend<T> {
    /// `x[b, 0] = cls`, `x[b, 1 + p] = mask_token` where patch p of image b is masked (with a
    /// mask token), else `embedded[b, p]`; then `+ position[t]` (with absolute positions).
    /// `masked` holds `[batch, patches]` bytes, 0 or 1.
    pub fn assemble_tokens(
        &self,
        m: &mut CudaMemory<'_, T>,
        x: View,
        embedded: View,
        p: TokenParams,
        masked: &dyn DevicePtr<u8>,
        shape: TokenShape,
    ) -> Result<()> {
        let TokenShape { batch, patches, dim } = shape;
        let rows = batch * shape.tokens();
        ensure!(
            x.len == rows * dim && embedded.len == batch * patches * dim && masked.len() >= batch * patches,
            InvalidArgument,
            "assemble_tokens: views do not hold {batch} images of {patches} patches of {dim}"
        );
        let no = View::empty(p.cls.space);
        check_views("assemble_tokens", &[x], &[embedded, p.cls, p.mask_token.unwrap_or(no), p.position.unwrap_or(no)]);
        let dev = self.device();
        let opt = |v: Option<View>| v.map_or(0, |v| m.t(v).device_ptr(dev.stream()).0);
        let args = [
            Arg::Ptr(dev.addr_mut(&mut m.t(x))),
            Arg::Ptr(dev.addr(&m.t(embedded))),
            Arg::Ptr(dev.addr(&m.t(p.cls))),
            Arg::Ptr(opt(p.mask_token)),
            Arg::Ptr(opt(p.position)),
            Arg::Ptr(dev.addr(masked)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("patches", patches)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_assemble_f32", "beit_tokens_assemble_bf16");
        // SAFETY: the kernel's signature; x holds b·t·d, embedded b·n·d, masked b·n bytes
        // (checked), the parameters their spec lengths (d, t·d).
        unsafe { dev.launch_kernel(FILE, name, dev.launch_1d(rows * dim, 256), &args) }
    }

    /// The backward of [`CudaBackend::assemble_tokens`] for `dx` = dL/dx: `dembedded` written
    /// (0 for the rows the mask token replaced), the gradients `grads` (`Grad` views) added to,
    /// summed over the batch in image order.
    pub fn assemble_tokens_backward(
        &self,
        m: &mut CudaMemory<'_, T>,
        dembedded: View,
        grads: TokenParams,
        dx: View,
        masked: &dyn DevicePtr<u8>,
        shape: TokenShape,
    ) -> Result<()> {
        let TokenShape { batch, patches, dim } = shape;
        let tokens = shape.tokens();
        ensure!(
            dx.len == batch * tokens * dim && dembedded.len == batch * patches * dim && masked.len() >= batch * patches,
            InvalidArgument,
            "assemble_tokens_backward: views do not hold {batch} images of {patches} patches of {dim}"
        );
        let no = View::empty(grads.cls.space);
        let (dmask, dpos) = (grads.mask_token.unwrap_or(no), grads.position.unwrap_or(no));
        check_views("assemble_tokens_backward", &[dembedded, grads.cls, dmask, dpos], &[dx]);
        let dev = self.device();
        let opt = |v: Option<View>| v.map_or(0, |v| m.f(v).device_ptr(dev.stream()).0);
        let args = [
            Arg::Ptr(dev.addr_mut(&mut m.f(grads.cls))),
            Arg::Ptr(opt(grads.position)),
            Arg::Ptr(opt(grads.mask_token)),
            Arg::Ptr(dev.addr(&m.t(dx))),
            Arg::Ptr(dev.addr(masked)),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("patches", patches)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_embed_param_grads_f32", "beit_tokens_embed_param_grads_bf16");
        // SAFETY: the kernel's signature; dx holds b·t·d, the gradients their spec lengths.
        unsafe { dev.launch_kernel(FILE, name, dev.launch_1d(tokens * dim + dim, 128), &args)? };
        let args = [
            Arg::Ptr(dev.addr_mut(&mut m.t(dembedded))),
            Arg::Ptr(dev.addr(&m.t(dx))),
            Arg::Ptr(dev.addr(masked)),
            Arg::I32(grads.mask_token.is_some() as i32),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("patches", patches)?),
            Arg::I32(int("dim", dim)?),
        ];
        let name = by_type::<T>("beit_tokens_embed_backward_rows_f32", "beit_tokens_embed_backward_rows_bf16");
        // SAFETY: the kernel's signature; dembedded holds b·n·d (checked).
        unsafe { dev.launch_kernel(FILE, name, dev.launch_1d(batch * patches * dim, 256), &args) }
    }

    /// `dst[r] = src[index[r]]`, rows of `dim`, for the first `count` indices.
    pub fn gather_rows(
        &self,
        m: &mut CudaMemory<'_, T>,
        dst: View,
        src: View,
        index: &dyn DevicePtr<i32>,
        count: usize,
        dim: usize,
    ) -> Result<()> {
        self.rows_kernel(
            m,
            by_type::<T>("beit_tokens_gather_rows_f32", "beit_tokens_gather_rows_bf16"),
            dst,
            src,
            index,
            count,
            dim,
        )
    }

    /// `dst[index[r]] = src[r]` for the first `count` indices; other rows of `dst` keep what
    /// they hold.
    pub fn scatter_rows(
        &self,
        m: &mut CudaMemory<'_, T>,
        dst: View,
        src: View,
        index: &dyn DevicePtr<i32>,
        count: usize,
        dim: usize,
    ) -> Result<()> {
        self.rows_kernel(
            m,
            by_type::<T>("beit_tokens_scatter_rows_f32", "beit_tokens_scatter_rows_bf16"),
            dst,
            src,
            index,
            count,
            dim,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rows_kernel(
        &self,
        m: &mut CudaMemory<'_, T>,
        name: &'static str,
        dst: View,
        src: View,
        index: &dyn DevicePtr<i32>,
        count: usize,
        dim: usize,
    ) -> Result<()> {
        let gather = name.contains("gather");
        let (dense, indexed) = if gather { (dst, src) } else { (src, dst) };
        ensure!(
            index.len() >= count && dense.len >= count * dim && dim > 0 && indexed.len % dim == 0,
            InvalidArgument,
            "{name}: {count} rows of {dim} between views of {} and {}",
            dense.len,
            indexed.len
        );
        check_views(name, &[dst], &[src]);
        let dev = self.device();
        let args = [
            Arg::Ptr(dev.addr_mut(&mut m.t(dst))),
            Arg::Ptr(dev.addr(&m.t(src))),
            Arg::Ptr(dev.addr(index)),
            Arg::I32(int("rows", count)?),
            Arg::I32(int("dim", dim)?),
        ];
        // SAFETY: the kernel's signature; the dense side holds count·dim (checked), the indices
        // address rows of the indexed side (the caller's: masked rows of the batch).
        unsafe { dev.launch_kernel(FILE, name, dev.launch_1d(count * dim, 256), &args) }
    }
}
