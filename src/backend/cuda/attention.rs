//! Fused attention on the GPU (`cuda/attention.cu`), flash-style: forward with online softmax
//! (saving the per-row log-sum-exp instead of the probabilities), backward recomputing P from
//! it, and the relative position bias (gathered from the table into `[heads, N, N]`, and its
//! gradient reduced back into the table). Nothing N x N per image is kept in global memory; the
//! bias gradient is summed over the batch in a fixed grouping (no atomics), so every result is
//! bit-identical from run to run.
//!
//! Equals `backend::cpu::attention::attention_forward`, `attention_backward::attention_backward`
//! and `model::relpos::{add_bias, add_bias_backward}` (tests/cuda_kernels.rs). Head dims 32 and
//! 64 (BEiT-S/B/L use 64); storage `f32` or `half::bf16`.

use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::device::CudaDevice;
use super::elementwise::by_type;
use super::kernel_args::{config, int, Arg};
use super::matmul::GemmType;
pub use crate::backend::cpu::attention::AttentionShape;
use crate::error::Result;

const FILE: &str = "attention.cu";
/// `ATT_TILE` and `ATT_THREADS` of the kernel file.
const TILE: usize = 32;
const THREADS: u32 = 128;
/// Images summed per block of the dQ kernel when the bias gradient is wanted, as a number of
/// groups: the batch is cut into at most this many groups, each accumulating its images'
/// dS in order; the groups are added in order. Fixed, so the sum order depends on the batch
/// size only.
const DBIAS_GROUPS: usize = 8;

fn per_group(batch: usize, with_dbias: bool) -> usize {
    if with_dbias {
        batch.div_ceil(DBIAS_GROUPS).max(1)
    } else {
        1
    }
}

/// Scratch (`f32` elements) [`CudaDevice::attention_backward`] needs: Δ per row, plus the
/// per-group bias-gradient partials when `with_dbias`.
pub fn attention_backward_scratch_len(shape: AttentionShape, with_dbias: bool) -> usize {
    let AttentionShape { batch, tokens: n, heads, .. } = shape;
    let rows = batch * heads * n;
    if with_dbias {
        rows + batch.div_ceil(per_group(batch, true)) * heads * n * n
    } else {
        rows
    }
}

fn kernel<T: GemmType>(kind: &str, head_dim: usize) -> Result<&'static str> {
    let bf = T::NAME == "bf16";
    Ok(match (kind, head_dim, bf) {
        ("forward", 32, false) => "beit_attention_forward_d32_f32",
        ("forward", 64, false) => "beit_attention_forward_d64_f32",
        ("forward", 32, true) => "beit_attention_forward_d32_bf16",
        ("forward", 64, true) => "beit_attention_forward_d64_bf16",
        ("dkdv", 32, false) => "beit_attention_backward_dkdv_d32_f32",
        ("dkdv", 64, false) => "beit_attention_backward_dkdv_d64_f32",
        ("dkdv", 32, true) => "beit_attention_backward_dkdv_d32_bf16",
        ("dkdv", 64, true) => "beit_attention_backward_dkdv_d64_bf16",
        ("dq", 32, false) => "beit_attention_backward_dq_d32_f32",
        ("dq", 64, false) => "beit_attention_backward_dq_d64_f32",
        ("dq", 32, true) => "beit_attention_backward_dq_d32_bf16",
        ("dq", 64, true) => "beit_attention_backward_dq_d64_bf16",
        _ => bail!(Unsupported, "CUDA attention: head_dim {head_dim} (kernels exist for 32 and 64)"),
    })
}

fn check_shape(shape: AttentionShape, qkv: usize, ctx: usize, bias: Option<usize>) -> Result<()> {
    let AttentionShape { batch, tokens: n, heads, .. } = shape;
    let hidden = shape.hidden();
    ensure!(qkv == batch * n * 3 * hidden, InvalidArgument, "attention: qkv holds {qkv} elements");
    ensure!(ctx == batch * n * hidden, InvalidArgument, "attention: context holds {ctx} elements");
    if let Some(b) = bias {
        ensure!(b == heads * n * n, InvalidArgument, "attention: bias holds {b} elements, expected heads·N·N");
    }
    Ok(())
}

impl CudaDevice {
    /// Attention forward: `ctx = softmax(scale·Q·Kᵀ + bias)·V` per (image, head), and `lse`
    /// (`[batch, heads, N]`, f32) for the backward. `bias` is `[heads, N, N]` f32 or none.
    pub fn attention_forward<T: GemmType>(
        &self,
        ctx: &mut dyn DevicePtrMut<T>,
        lse: &mut dyn DevicePtrMut<f32>,
        qkv: &dyn DevicePtr<T>,
        bias: Option<&dyn DevicePtr<f32>>,
        shape: AttentionShape,
    ) -> Result<()> {
        check_shape(shape, qkv.len(), ctx.len(), bias.map(|b| b.len()))?;
        let AttentionShape { batch, tokens: n, heads, head_dim } = shape;
        ensure!(lse.len() == batch * heads * n, InvalidArgument, "attention: lse holds {} elements", lse.len());
        let name = kernel::<T>("forward", head_dim)?;
        let args = [
            Arg::Ptr(self.addr_mut(ctx)),
            Arg::Ptr(self.addr_mut(lse)),
            Arg::Ptr(self.addr(qkv)),
            Arg::Ptr(bias.map_or(0, |b| self.addr(b))),
            Arg::I32(int("tokens", n)?),
            Arg::I32(int("heads", heads)?),
            Arg::F32((head_dim as f32).powf(-0.5)),
        ];
        // SAFETY: the kernel's signature; lengths checked above.
        unsafe { self.launch_kernel(FILE, name, config((n.div_ceil(TILE), heads, batch), THREADS), &args) }
    }

    /// Attention backward: `dqkv` overwritten with `[dQ | dK | dV]`; `dbias` (`[heads, N, N]`,
    /// f32) ACCUMULATED with `Σ_b dS` when given, as the CPU's. `ctx` and `lse` are the forward's
    /// outputs; `scratch` holds at least [`attention_backward_scratch_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: GemmType>(
        &self,
        dqkv: &mut dyn DevicePtrMut<T>,
        dbias: Option<&mut dyn DevicePtrMut<f32>>,
        dctx: &dyn DevicePtr<T>,
        qkv: &dyn DevicePtr<T>,
        ctx: &dyn DevicePtr<T>,
        lse: &dyn DevicePtr<f32>,
        bias: Option<&dyn DevicePtr<f32>>,
        shape: AttentionShape,
        scratch: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        check_shape(shape, qkv.len(), ctx.len(), bias.map(|b| b.len()))?;
        let AttentionShape { batch, tokens: n, heads, head_dim } = shape;
        ensure!(dqkv.len() == qkv.len() && dctx.len() == ctx.len(), InvalidArgument, "attention: dqkv/dctx length");
        ensure!(lse.len() == batch * heads * n, InvalidArgument, "attention: lse holds {} elements", lse.len());
        if let Some(d) = &dbias {
            ensure!(d.len() == heads * n * n, InvalidArgument, "attention: dbias holds {} elements", d.len());
        }
        let need = attention_backward_scratch_len(shape, dbias.is_some());
        ensure!(scratch.len() >= need, InvalidArgument, "attention: scratch holds {}, needs {need}", scratch.len());
        if batch * heads * n == 0 {
            return Ok(());
        }
        let rows = batch * heads * n;
        let delta = self.addr_mut(scratch);
        let part = delta + (rows * std::mem::size_of::<f32>()) as u64;
        let (n_i, heads_i, d_i) = (int("tokens", n)?, int("heads", heads)?, int("head_dim", head_dim)?);
        let scale = (head_dim as f32).powf(-0.5);
        let (dqkv_p, dctx_p, qkv_p, ctx_p, lse_p) =
            (self.addr_mut(dqkv), self.addr(dctx), self.addr(qkv), self.addr(ctx), self.addr(lse));
        let bias_p = bias.map_or(0, |b| self.addr(b));

        let args = [
            Arg::Ptr(delta),
            Arg::Ptr(ctx_p),
            Arg::Ptr(dctx_p),
            Arg::I32(int("batch", batch)?),
            Arg::I32(n_i),
            Arg::I32(heads_i),
            Arg::I32(d_i),
        ];
        let name = by_type::<T>("beit_attention_backward_delta_f32", "beit_attention_backward_delta_bf16");
        // SAFETY: the kernel's signature; one warp per row of Δ (rows floats at the scratch start).
        unsafe { self.launch_kernel(FILE, name, config((rows.div_ceil(8), 1, 1), 256), &args)? };

        let args = [
            Arg::Ptr(dqkv_p),
            Arg::Ptr(qkv_p),
            Arg::Ptr(dctx_p),
            Arg::Ptr(bias_p),
            Arg::Ptr(lse_p),
            Arg::Ptr(delta),
            Arg::I32(n_i),
            Arg::I32(heads_i),
            Arg::F32(scale),
        ];
        // SAFETY: the kernel's signature; lengths checked above.
        unsafe {
            self.launch_kernel(
                FILE,
                kernel::<T>("dkdv", head_dim)?,
                config((n.div_ceil(TILE), heads, batch), THREADS),
                &args,
            )?
        };

        let group = per_group(batch, dbias.is_some());
        let groups = batch.div_ceil(group);
        let args = [
            Arg::Ptr(dqkv_p),
            Arg::Ptr(if dbias.is_some() { part } else { 0 }),
            Arg::Ptr(qkv_p),
            Arg::Ptr(dctx_p),
            Arg::Ptr(bias_p),
            Arg::Ptr(lse_p),
            Arg::Ptr(delta),
            Arg::I32(int("batch", batch)?),
            Arg::I32(int("per_group", group)?),
            Arg::I32(n_i),
            Arg::I32(heads_i),
            Arg::F32(scale),
        ];
        // SAFETY: the kernel's signature; group g writes partial g < groups of the scratch.
        unsafe {
            self.launch_kernel(
                FILE,
                kernel::<T>("dq", head_dim)?,
                config((n.div_ceil(TILE), heads, groups), THREADS),
                &args,
            )?
        };

        if let Some(dbias) = dbias {
            let len = heads * n * n;
            let args = [
                Arg::Ptr(self.addr_mut(dbias)),
                Arg::Ptr(part),
                Arg::I32(int("groups", groups)?),
                Arg::I32(int("dbias length", len)?),
                Arg::I32(1),
            ];
            // SAFETY: the kernel's signature; `groups` partials of `len` floats after Δ.
            unsafe {
                self.launch_kernel(FILE, "beit_attention_dbias_reduce", config((len.div_ceil(256), 1, 1), 256), &args)?
            };
        }
        Ok(())
    }

    /// `bias[h, p] (+)= table[index[p], h]`: the `[heads, N, N]` f32 bias from a `[rows, heads]`
    /// table (f32 or `T`) and the `[N·N]` relative position index (added to what `bias` holds
    /// with `accumulate`, as the CPU's `relpos_bias` with a shared bias). Every index entry must
    /// be a row of the table (the caller's: `model::relpos` builds them for the table's grid).
    pub fn relpos_bias_gather<T: GemmType>(
        &self,
        bias: &mut dyn DevicePtrMut<f32>,
        table: &dyn DevicePtr<T>,
        index: &dyn DevicePtr<i32>,
        heads: usize,
        accumulate: bool,
    ) -> Result<()> {
        let tt = index.len();
        ensure!(bias.len() == heads * tt, InvalidArgument, "relpos gather: bias holds {} elements", bias.len());
        ensure!(heads > 0 && table.len() % heads == 0, InvalidArgument, "relpos gather: table holds {}", table.len());
        let args = [
            Arg::Ptr(self.addr_mut(bias)),
            Arg::Ptr(self.addr(table)),
            Arg::Ptr(self.addr(index)),
            Arg::I32(int("heads", heads)?),
            Arg::I32(int("pairs", tt)?),
            Arg::I32(accumulate as i32),
        ];
        let name = by_type::<T>("beit_attention_relpos_gather_f32", "beit_attention_relpos_gather_bf16");
        // SAFETY: the kernel's signature; one thread per bias element.
        unsafe { self.launch_kernel(FILE, name, config(((heads * tt).div_ceil(256), 1, 1), 256), &args) }
    }

    /// `dtable[m, h] += Σ_(p: index[p] = m) dbias[h, p]`, pairs in increasing order (the CPU's
    /// `relpos_bias_backward`, bit for bit in f32). `dtable` is `[rows, heads]`.
    pub fn relpos_table_grad(
        &self,
        dtable: &mut dyn DevicePtrMut<f32>,
        dbias: &dyn DevicePtr<f32>,
        index: &dyn DevicePtr<i32>,
        heads: usize,
    ) -> Result<()> {
        let tt = index.len();
        ensure!(dbias.len() == heads * tt, InvalidArgument, "relpos grad: dbias holds {} elements", dbias.len());
        ensure!(heads > 0 && dtable.len() % heads == 0, InvalidArgument, "relpos grad: dtable holds {}", dtable.len());
        let rows = dtable.len() / heads;
        let args = [
            Arg::Ptr(self.addr_mut(dtable)),
            Arg::Ptr(self.addr(dbias)),
            Arg::Ptr(self.addr(index)),
            Arg::I32(int("heads", heads)?),
            Arg::I32(int("table rows", rows)?),
            Arg::I32(int("pairs", tt)?),
        ];
        // SAFETY: the kernel's signature; one thread per table element.
        unsafe {
            self.launch_kernel(
                FILE,
                "beit_attention_relpos_table_grad",
                config(((rows * heads).div_ceil(128), 1, 1), 128),
                &args,
            )
        }
    }
}
