//! Matrix products through cuBLASLt, in libbeit's row-major convention.
//!
//! cuBLASLt is column-major. A row-major `C[m, n] = op(A)[m, k] · op(B)[k, n]` is the
//! column-major `Cᵀ[n, m] = op(B)ᵀ · op(A)ᵀ`, and a row-major buffer read column-major *is* its
//! transpose, so the call passes B as cuBLASLt's "A" and A as its "B" with the same transpose
//! flags and swaps m and n; nothing is copied. Under that mapping:
//! - a bias of length n (one per output feature, the row-major columns) is cuBLASLt's bias over
//!   the rows of D (`EPILOGUE_BIAS`);
//! - an aux buffer (GELU pre-activation) has C's row-major layout, i.e. leading dimension n;
//! - the bias gradient `db[i] = Σ_k op(A)[i, k]` (dW = dYᵀ·X with db = Σ_rows dY) is a reduction of
//!   cuBLASLt's B over k (`EPILOGUE_BGRADB`), one value per column of D.
//!
//! Precision: compute type `CUBLAS_COMPUTE_32F` always (fp32 accumulation, and no TF32: the
//! fp32 mode is for parity with the CPU). Inputs are `f32` or `bf16` (tensor cores), outputs
//! `f32` or `bf16`; bias and aux have the output's type.
//!
//! cuBLASLt's GELU epilogues use the tanh approximation of GELU (as `torch.nn.GELU(approximate=
//! "tanh")`), not the exact erf GELU BEiT uses; they are exposed for models that want them, and
//! the exact path is `Epilogue::Bias` followed by the `gelu` kernel (src/backend/cuda/elementwise.rs).

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

use super::blaslt::{alignment, blas_error, AlgoKey, BlasLt};
use super::device::CudaDevice;
use super::errors::driver_error;
use crate::backend::shapes::GemmShape;
use crate::error::{Error, Result};

/// Element types cuBLASLt takes here.
pub trait GemmType: DeviceRepr {
    const DATA_TYPE: sys::cudaDataType;
    const NAME: &'static str;
}

impl GemmType for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
    const NAME: &'static str = "f32";
}

impl GemmType for half::bf16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
    const NAME: &'static str = "bf16";
}

/// What cuBLASLt does to the product before storing it. Epilogues need `batch == 1`.
pub enum Epilogue<'a, T> {
    /// `C = α·op(A)op(B) + β·C`.
    None,
    /// `C = α·op(A)op(B) + β·C + bias` (bias length n, broadcast over rows).
    Bias(&'a dyn DevicePtr<T>),
    /// `aux = α·op(A)op(B) + β·C + bias` (the pre-activation, kept for the backward) and
    /// `C = GELU_tanh(aux)`. n must be a multiple of 8 (cuBLASLt's rule for the aux leading
    /// dimension).
    GeluAuxBias { bias: &'a dyn DevicePtr<T>, aux: &'a mut dyn DevicePtrMut<T> },
    /// `C = (α·op(A)op(B) + β·C) ⊙ GELU_tanh'(aux)`: the MLP backward through the activation,
    /// with `aux` the pre-activation the forward stored. n a multiple of 8.
    DGelu { aux: &'a dyn DevicePtr<T> },
    /// The product as `None`, plus `bias_grad[i] = Σ_k op(A)[i, k]` (length m): with
    /// `A = dYᵀ` (trans_a, dY [rows, m]) that is a Linear's bias gradient next to its weight
    /// gradient `dW = dYᵀ·X`. `bias_grad` is overwritten, not accumulated.
    BiasGrad { bias_grad: &'a mut dyn DevicePtrMut<T> },
}

/// RAII guards for cuBLASLt descriptors.
struct Layout(sys::cublasLtMatrixLayout_t);
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout, destroyed once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn layout<T: GemmType>(rows: usize, cols: usize, ld: usize, batch: usize, stride: usize) -> Result<Layout> {
    let l = Layout(
        lt::create_matrix_layout(T::DATA_TYPE, rows as u64, cols as u64, ld as i64)
            .map_err(|e| blas_error("cublasLtMatrixLayoutCreate", e))?,
    );
    if batch > 1 {
        let count = batch as i32;
        let stride = stride as i64;
        // SAFETY: attribute values of the documented types (int32 count, int64 stride).
        unsafe {
            lt::set_matrix_layout_attribute(
                l.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                &count as *const i32 as *const c_void,
                size_of::<i32>(),
            )
            .map_err(|e| blas_error("setting the batch count", e))?;
            lt::set_matrix_layout_attribute(
                l.0,
                sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                &stride as *const i64 as *const c_void,
                size_of::<i64>(),
            )
            .map_err(|e| blas_error("setting the batch stride", e))?;
        }
    }
    Ok(l)
}

fn set_desc<V>(desc: &Desc, attr: sys::cublasLtMatmulDescAttributes_t, value: &V) -> Result<()> {
    // SAFETY: `value` is of the type cuBLASLt documents for `attr` (checked at each call site).
    unsafe { lt::set_matmul_desc_attribute(desc.0, attr, value as *const V as *const c_void, size_of::<V>()) }
        .map_err(|e| blas_error(&format!("setting {attr:?}"), e))
}

fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::InvalidArgument(format!("gemm: {what} holds {have} elements, the shape needs {need}")));
    }
    Ok(())
}

impl CudaDevice {
    /// `C = α·op(A)·op(B) + β·C` (row-major, see [`GemmShape`]) with an optional epilogue,
    /// queued on the device's stream. `A` and `B` share an input type (`f32` or `bf16`); `C` is
    /// `f32` or `bf16` (bf16 inputs may write f32, f32 inputs need an f32 output).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<TI: GemmType, TO: GemmType>(
        &self,
        shape: GemmShape,
        alpha: f32,
        a: &dyn DevicePtr<TI>,
        b: &dyn DevicePtr<TI>,
        beta: f32,
        c: &mut dyn DevicePtrMut<TO>,
        epilogue: Epilogue<'_, TO>,
    ) -> Result<()> {
        let GemmShape { m, n, k, trans_a, trans_b, batch, stride_a, stride_b, stride_c } = shape;
        ensure!(batch >= 1, InvalidArgument, "gemm: batch must be at least 1");
        ensure!(
            !(TI::NAME == "f32" && TO::NAME == "bf16"),
            InvalidArgument,
            "gemm: f32 inputs with a bf16 output is not a supported cuBLASLt combination"
        );
        ensure!(m > 0 && n > 0 && k > 0, InvalidArgument, "gemm: empty shape m={m} n={n} k={k}");
        let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
        check_len("A", a.len(), GemmShape::elements_needed(a_rows, a_cols, batch, stride_a))?;
        check_len("B", b.len(), GemmShape::elements_needed(b_rows, b_cols, batch, stride_b))?;
        check_len("C", c.len(), GemmShape::elements_needed(m, n, batch, stride_c))?;
        let needs_single = !matches!(epilogue, Epilogue::None);
        ensure!(!(needs_single && batch > 1), InvalidArgument, "gemm: epilogues need batch == 1");
        let stream = self.stream();

        // cuBLASLt's view: D'[n, m] (column-major, ld n) = op(B') · op(A'), B' = our A, A' = our B.
        // The stored column-major shape of our row-major [r, c] matrix is [c, r] with ld c.
        let lt_a = layout::<TI>(b_cols, b_rows, b_cols, batch, stride_b)?;
        let lt_b = layout::<TI>(a_cols, a_rows, a_cols, batch, stride_a)?;
        let lt_c = layout::<TO>(n, m, n, batch, stride_c)?;
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
                .map_err(|e| blas_error("cublasLtMatmulDescCreate", e))?,
        );
        // cublasOperation_t (an int32 enum; cudarc's cuBLASLt bindings do not carry it):
        // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op = |t: bool| -> i32 { i32::from(t) };
        set_desc(&desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &op(trans_b))?;
        set_desc(&desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &op(trans_a))?;

        // Device pointers of the epilogue's vectors, with their length checks. The guards
        // returned by device_ptr must live until the matmul is queued.
        let (a_ptr, _ga) = a.device_ptr(stream);
        let (b_ptr, _gb) = b.device_ptr(stream);
        let (c_ptr, _gc) = c.device_ptr_mut(stream);
        let mut guards = Vec::new();
        let epi = match epilogue {
            Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias(bias) => {
                check_len("bias", bias.len(), n)?;
                let (p, g) = bias.device_ptr(stream);
                guards.push(g);
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &(p as *const c_void),
                )?;
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
            }
            Epilogue::GeluAuxBias { bias, aux } => {
                ensure!(n % 8 == 0, InvalidArgument, "gemm: GELU aux epilogue needs n % 8 == 0 (n = {n})");
                check_len("bias", bias.len(), n)?;
                check_len("aux", aux.len(), m * n)?;
                let (p, g) = bias.device_ptr(stream);
                guards.push(g);
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &(p as *const c_void),
                )?;
                let (q, g) = aux.device_ptr_mut(stream);
                guards.push(g);
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    &(q as *mut c_void),
                )?;
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &(n as i64),
                )?;
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX_BIAS
            }
            Epilogue::DGelu { aux } => {
                ensure!(n % 8 == 0, InvalidArgument, "gemm: DGELU epilogue needs n % 8 == 0 (n = {n})");
                check_len("aux", aux.len(), m * n)?;
                let (q, g) = aux.device_ptr(stream);
                guards.push(g);
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                    &(q as *const c_void),
                )?;
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                    &(n as i64),
                )?;
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DGELU
            }
            Epilogue::BiasGrad { bias_grad } => {
                check_len("bias_grad", bias_grad.len(), m)?;
                let (p, g) = bias_grad.device_ptr_mut(stream);
                guards.push(g);
                set_desc(
                    &desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &(p as *mut c_void),
                )?;
                sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB
            }
        };
        set_desc(&desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;

        let mut blas = self.blaslt.lock().unwrap_or_else(|p| p.into_inner());
        let key = AlgoKey {
            shape,
            types: (TI::NAME, TO::NAME),
            epilogue: epi as i32,
            alignments: [alignment(b_ptr), alignment(a_ptr), alignment(c_ptr), alignment(c_ptr)],
        };
        self.context().bind_to_thread().map_err(|e| driver_error("binding the context", e))?;
        let algo = match blas.algos.get(&key) {
            Some(algo) => *algo,
            None => {
                let algo = self.choose_algo(&blas, &key, &desc, [&lt_a, &lt_b, &lt_c])?;
                blas.algos.insert(key, algo);
                algo
            }
        };
        let ws_bytes = blas.workspace.len();
        let (ws_ptr, _gw) = blas.workspace.device_ptr(stream);
        // SAFETY: every pointer is a live device allocation of the checked size on this
        // context; alpha/beta are host f32 (the default pointer mode, scale type 32F).
        unsafe {
            lt::matmul(
                blas.handle,
                desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b_ptr as *const c_void,
                lt_a.0,
                a_ptr as *const c_void,
                lt_b.0,
                c_ptr as *const c_void,
                lt_c.0,
                c_ptr as *mut c_void,
                lt_c.0,
                &algo,
                ws_ptr as *mut c_void,
                ws_bytes,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error(&format!("cublasLtMatmul {m}x{n}x{k}"), e))?;
        drop(guards);
        Ok(())
    }

    /// Asks cuBLASLt's heuristic for the fastest algorithm of `key` within the workspace, telling
    /// it the operands' real alignment (cuBLASLt's "A" is our B: see the module comment).
    fn choose_algo(
        &self,
        blas: &BlasLt,
        key: &AlgoKey,
        desc: &Desc,
        [lt_a, lt_b, lt_c]: [&Layout; 3],
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let pref = Pref(lt::create_matmul_pref().map_err(|e| blas_error("cublasLtMatmulPreferenceCreate", e))?);
        let set_pref = |attr: sys::cublasLtMatmulPreferenceAttributes_t, bytes: &[u8]| {
            // SAFETY: each attribute gets a value of its documented type (u64 workspace bytes,
            // u32 alignments), passed by address with its size.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, bytes.as_ptr() as *const c_void, bytes.len()) }
                .map_err(|e| blas_error(&format!("setting {attr:?}"), e))
        };
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        set_pref(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &(blas.workspace.len() as u64).to_ne_bytes())?;
        let [a, b, c, d] = key.alignments;
        set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a.to_ne_bytes())?;
        set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b.to_ne_bytes())?;
        set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c.to_ne_bytes())?;
        set_pref(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &d.to_ne_bytes())?;
        // SAFETY: live descriptors and handle.
        let heuristic =
            unsafe { lt::get_matmul_algo_heuristic(blas.handle, desc.0, lt_a.0, lt_b.0, lt_c.0, lt_c.0, pref.0) }
                .map_err(|e| {
                    let GemmShape { m, n, k, trans_a, trans_b, batch, .. } = key.shape;
                    Error::Unsupported(format!(
                "cuBLASLt has no algorithm for {m}x{n}x{k} ({} in, {} out, trans_a={trans_a}, trans_b={trans_b}, \
                 batch={batch}, epilogue {}, alignments {:?}): {e:?}",
                key.types.0, key.types.1, key.epilogue, key.alignments
            ))
                })?;
        Ok(heuristic.algo)
    }

    /// A PyTorch Linear on the GPU, as the CPU's `backend::cpu::gemm::linear`:
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear<TI: GemmType, TO: GemmType>(
        &self,
        y: &mut dyn DevicePtrMut<TO>,
        x: &dyn DevicePtr<TI>,
        w: &dyn DevicePtr<TI>,
        bias: Option<&dyn DevicePtr<TO>>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        ensure!(x.len() == m * k, InvalidArgument, "linear: x holds {} elements, expected {m}x{k}", x.len());
        ensure!(w.len() == n * k, InvalidArgument, "linear: w holds {} elements, expected {n}x{k}", w.len());
        ensure!(y.len() == m * n, InvalidArgument, "linear: y holds {} elements, expected {m}x{n}", y.len());
        let epilogue = match bias {
            Some(b) => Epilogue::Bias(b),
            None => Epilogue::None,
        };
        self.gemm(GemmShape::linear(m, k, n), 1.0, x, w, 0.0, y, epilogue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_1000), 256);
        assert_eq!(alignment(0x7f00_0000_1004), 4);
        assert_eq!(alignment(0x7f00_0000_1010), 16);
        assert_eq!(alignment(0x7f00_0000_1002), 2);
        assert_eq!(alignment(0), 256);
    }

    #[test]
    fn batched_strides_are_dense() {
        let s = GemmShape::linear(4, 3, 5).batched(2);
        assert_eq!((s.stride_a, s.stride_b, s.stride_c), (12, 15, 20));
        assert!(s.trans_b && !s.trans_a);
        assert_eq!(GemmShape::elements_needed(4, 3, 2, 12), 24);
        assert_eq!(GemmShape::elements_needed(4, 3, 3, 0), 12);
    }
}
