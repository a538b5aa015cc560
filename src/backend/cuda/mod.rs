//! The CUDA backend: cudarc with run-time loading (libbeit never links CUDA), a probe before the
//! first CUDA call, NVRTC-compiled kernels cached on disk, cuBLASLt for every matrix product.
//! The CPU backend stays the numerical reference: every op here has a GPU test comparing it with
//! the CPU function (`tests/cuda_ops.rs`, `tests/cuda_kernels.rs`).
//!
//! # Pieces
//! - [`probe`]: is CUDA usable, and if not, why (`probe::probe()`; never panics).
//! - [`device`]: [`CudaDevice`], the process-wide context + stream + cuBLASLt handle + loaded
//!   modules (`CudaDevice::get()`; `Unsupported` with the probe's reason without a GPU).
//! - [`nvrtc`]: compiles the embedded `cuda/*.cu` for the GPU's arch, with the disk cache.
//! - [`buffer`]: device buffers (`DeviceBuffer<T>` = cudarc `CudaSlice<T>`) and copies.
//! - [`matmul`], [`elementwise`], [`adamw`], [`reduce`], [`patch_embed`], [`residual`], [`tokens`],
//!   [`cross_entropy`], [`mse`], [`conv`], [`image`] (ReLU, pooling, resizing, batch norm, the
//!   segmentation head's glue), [`relaxation`] (the dVAE's Gumbel-softmax, KL, argmax): the ops.
//! - [`ops`]: [`CudaBackend`], the backend as a [`crate::backend::Backend`] over device memory
//!   planned as views ([`CudaMemory`]); the MIM training step (`train::gpu_pretrain`) runs the one
//!   BEiT pass (`Model::mim_pass`) on it; [`image_ops`] and [`code_ops`]: the convolutional and
//!   code ops of the segmentation head and the dVAE (`ImageOps`, `CodeOps`) for fp32.
//!
//! # Adding a kernel file
//! 1. Write `cuda/<family>.cu`, starting with `#include "common.cuh"` (bf16 type, load/store
//!    helpers, grid-stride loop, deterministic warp/block sums). Entry points are
//!    `extern "C" __global__ void beit_<family>_<op>(...)` so they keep their plain names.
//!    Do arithmetic in fp32; no atomics in reductions (fixed trees, so runs are bit-identical).
//! 2. Nothing to register: build.rs embeds every `cuda/*.cu`/`*.cuh` (constant `GELU_CU` etc.
//!    and the table [`nvrtc::sources`]), and `scripts/check-kernels` compiles every `.cu` for
//!    sm_80 and sm_90 with NVRTC, no GPU needed. Run it after editing a kernel.
//!
//! # Loading a function, buffers, launching
//! ```ignore
//! use beit::backend::cuda::CudaDevice;
//! use cudarc::driver::{DevicePtr, DevicePtrMut, PushKernelArg};
//!
//! let dev = CudaDevice::get()?;                               // Err(Unsupported) without a GPU
//! let x = dev.upload(&host_x)?;                               // CudaSlice<f32>
//! let mut y = dev.zeros::<f32>(host_x.len())?;
//! let f = dev.function("gelu.cu", "beit_gelu_forward_f32")?; // compiled + cached on first use
//! let n = host_x.len() as i64;
//! let mut launch = dev.stream().launch_builder(&f);
//! launch.arg(&x).arg(&mut y).arg(&n);                         // args in the kernel's order
//! unsafe { launch.launch(dev.launch_1d(host_x.len(), 256)) }  // or a LaunchConfig of your own
//!     .map_err(|e| beit::Error::Internal(format!("gelu: {e:?}")))?;
//! let host_y = dev.download(&y)?;                             // synchronises the stream
//! ```
//! Wrappers take `&dyn DevicePtr<T>` / `&mut dyn DevicePtrMut<T>` so that both whole buffers
//! and views (`buf.slice(a..b)`) fit; `CudaDevice::launch_pointwise` launches the common
//! `(scalars..., pointers..., long long n)` signature. Everything runs on the one stream, in
//! issue order; a kernel's asynchronous error surfaces at the next `download`/`synchronize`.
//! A type that owns device buffers and may be dropped on a thread that has not used CUDA calls
//! `CudaDevice::make_current` in its `Drop` (cudarc frees without making the context current).
//!
//! # Writing a GPU test
//! In `tests/cuda_ops.rs` (or `tests/cuda_kernels.rs`): mark it
//! `#[ignore = "needs a CUDA GPU"]` (CPU CI lists it; `scripts/gpu-check` runs `--ignored`),
//! get the device with `CudaDevice::get().expect(..)`, run the CPU backend's function on the
//! same inputs, and compare: fp32 within 1e-5 relative; bf16 against the CPU run on the
//! bf16-rounded inputs, with a tolerance derived from bf16's 2^-8 relative step and stated in
//! the test. Set `BEIT_DISABLE_CUDA=1` to exercise the no-GPU paths on a GPU machine.

pub mod adamw;
pub mod attention;
mod blaslt;
pub mod buffer;
pub mod code_ops;
pub mod conv;
pub mod cross_entropy;
pub mod device;
pub mod elementwise;
mod errors;
pub mod image;
pub mod image_ops;
mod kernel_args;
pub mod layernorm;
pub mod matmul;
pub mod mse;
pub mod nvrtc;
pub mod ops;
pub mod patch_embed;
pub mod probe;
pub mod reduce;
pub mod relaxation;
pub mod residual;
pub mod sums;
pub mod tokens;

pub use crate::backend::shapes::GemmShape;
pub use buffer::DeviceBuffer;
pub use device::CudaDevice;
pub use matmul::{Epilogue, GemmType};
pub use ops::{Act, CudaBackend, CudaMemory, DeviceArena, DeviceParams, Precision, Scratch};
pub use probe::{probe, ProbeReport};
