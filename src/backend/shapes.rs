//! Shape types the backends share: what a caller describes once and every backend computes.

/// The shape of a (possibly batched) row-major product `C[m, n] = op(A)[m, k] · op(B)[k, n]`.
/// Every matrix is dense row-major; `trans_a` means A is stored as [k, m], `trans_b` that B is
/// stored as [n, k] (a PyTorch Linear weight). Batches are `batch` products at element strides
/// `stride_a/b/c` (0 for a matrix shared by all batches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl GemmShape {
    /// One product with no transposes.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        GemmShape { m, n, k, trans_a: false, trans_b: false, batch: 1, stride_a: 0, stride_b: 0, stride_c: 0 }
    }

    /// A PyTorch Linear: `y[m, n] = x[m, k] · w[n, k]ᵀ`.
    pub fn linear(m: usize, k: usize, n: usize) -> Self {
        GemmShape { trans_b: true, ..Self::new(m, n, k) }
    }

    /// `batch` products with dense strides (each batch's matrices follow each other).
    pub fn batched(mut self, batch: usize) -> Self {
        self.batch = batch;
        self.stride_a = self.m * self.k;
        self.stride_b = self.k * self.n;
        self.stride_c = self.m * self.n;
        self
    }

    pub(crate) fn elements_needed(rows: usize, cols: usize, batch: usize, stride: usize) -> usize {
        if rows * cols == 0 {
            return 0;
        }
        stride * (batch - 1) + rows * cols
    }
}
