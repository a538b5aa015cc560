//! The cuBLASLt handle a [`super::CudaDevice`] owns: the handle, its workspace and the cache of
//! chosen algorithms. Separate from `matmul` (which issues the products through it) so that the
//! device can own it without importing the ops built on the device.

use std::collections::HashMap;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;

use super::errors::driver_error;
use crate::backend::shapes::GemmShape;
use crate::error::{Error, Result};

/// The cuBLASLt handle, its workspace, and the algorithm chosen for each problem seen so far
/// (owned by the [`CudaDevice`]). Caching the heuristic's answer takes it off the per-call path
/// (it costs tens of microseconds, as much as a small attention GEMM) and pins one algorithm per
/// problem, so repeated calls compute the same bits.
pub(crate) struct BlasLt {
    pub(crate) handle: sys::cublasLtHandle_t,
    pub(crate) workspace: cudarc::driver::CudaSlice<u8>,
    pub(crate) algos: HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>,
}

/// Everything the heuristic's choice depends on: shape, transposes, batch strides, types,
/// epilogue, and the operands' pointer alignment (the heuristic may pick vectorised kernels
/// that need 16-byte or larger alignment; views into a buffer can have less).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct AlgoKey {
    pub(crate) shape: GemmShape,
    pub(crate) types: (&'static str, &'static str),
    pub(crate) epilogue: i32,
    pub(crate) alignments: [u32; 4],
}

/// The largest power of two (at most 256) dividing a device address: what cuBLASLt's
/// MIN_ALIGNMENT preferences ask for. Its default assumes 256 for every operand.
pub(crate) fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1u32 << ptr.trailing_zeros().min(8)
    }
}

// SAFETY: the handle is used only under the device's single stream; cuBLASLt handles may be
// used from any thread as long as calls are not concurrent on the same workspace, which the
// mutex around it in `CudaDevice` ensures.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

impl BlasLt {
    pub(crate) fn new(stream: &std::sync::Arc<CudaStream>, workspace_bytes: usize) -> Result<Self> {
        let handle = lt::create_handle().map_err(|e| blas_error("cublasLtCreate", e))?;
        // SAFETY: scratch memory only cuBLASLt writes.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes) }
            .map_err(|e| driver_error("allocating the cuBLASLt workspace", e))?;
        Ok(BlasLt { handle, workspace, algos: HashMap::new() })
    }
}

impl Drop for BlasLt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

pub(crate) fn blas_error(what: &str, e: lt::CublasError) -> Error {
    Error::Internal(format!("cuBLASLt {what} failed: {e:?}"))
}
