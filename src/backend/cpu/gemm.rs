//! Matrix products through the `gemm` crate. Matrices are described by a base slice and element
//! strides, so transposed and strided operands (attention heads inside a fused QKV buffer) need
//! no copies.

use gemm::Parallelism;

/// A strided matrix view: element (r, c) is `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A contiguous row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// The transpose of a contiguous row-major `[rows, cols]` matrix, seen as `[cols, rows]`.
    /// A PyTorch `Linear` weight `[out, in]` viewed this way is the `[in, out]` right operand.
    pub fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows: cols, cols: rows, row_stride: 1, col_stride: cols }
    }

    /// One past the last element this view touches (0 for an empty view).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// A mutable strided matrix view, the destination of a product.
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatMut<'a> {
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        MatMut { data, rows, cols, row_stride: cols, col_stride: 1 }
    }
}

/// How a product may use threads: `Pool` spreads one GEMM over the current rayon pool, `Single`
/// is for products that already run inside a parallel loop (one per attention head).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Pool,
    Single,
}

/// `dst = beta * a · b + (if accumulate { dst } else { 0 })`.
///
/// Panics if the shapes disagree or a view reaches past its slice: those are programming errors
/// inside the library (the public API validates user shapes before they get here).
pub fn matmul(dst: MatMut<'_>, a: Mat<'_>, b: Mat<'_>, beta: f32, accumulate: bool, threads: Threads) {
    let dst_extent = if dst.rows == 0 || dst.cols == 0 {
        0
    } else {
        (dst.rows - 1) * dst.row_stride + (dst.cols - 1) * dst.col_stride + 1
    };
    assert!(dst_extent <= dst.data.len(), "matmul: destination view out of bounds");
    // SAFETY: the destination view was just checked against its exclusively borrowed slice.
    unsafe {
        matmul_raw(
            dst.data.as_mut_ptr(),
            dst.rows,
            dst.cols,
            dst.row_stride,
            dst.col_stride,
            a,
            b,
            beta,
            accumulate,
            threads,
        )
    }
}

/// [`matmul`] into a raw strided destination, for parallel tasks that write interleaved but
/// disjoint elements of one buffer (attention heads writing their columns of the context).
///
/// # Safety
/// `dst` must be valid for writes at every `r * row_stride + c * col_stride` (r < rows,
/// c < cols), must not alias `a` or `b`, and no other thread may touch those elements meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw(
    dst: *mut f32,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    a: Mat<'_>,
    b: Mat<'_>,
    beta: f32,
    accumulate: bool,
    threads: Threads,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    assert_eq!(rows, a.rows, "matmul: row count differs");
    assert_eq!(cols, b.cols, "matmul: column count differs");
    assert!(a.extent() <= a.data.len() && b.extent() <= b.data.len(), "matmul: operand view out of bounds");
    if rows == 0 || cols == 0 {
        return;
    }
    let parallelism = match threads {
        Threads::Single => Parallelism::None,
        Threads::Pool => match rayon::current_num_threads() {
            0 | 1 => Parallelism::None,
            n => Parallelism::Rayon(n),
        },
    };
    gemm::gemm(
        rows,
        cols,
        a.cols,
        dst,
        col_stride as isize,
        row_stride as isize,
        accumulate,
        a.data.as_ptr(),
        a.col_stride as isize,
        a.row_stride as isize,
        b.data.as_ptr(),
        b.col_stride as isize,
        b.row_stride as isize,
        1.0,
        beta,
        false,
        false,
        false,
        parallelism,
    );
}

/// A PyTorch `Linear`: `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`. Callers that can fuse the
/// bias into the next element-wise pass (GELU, the residual update) pass `None` and do so.
pub fn linear(y: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) {
    assert_eq!(y.len(), m * n, "linear: output length");
    assert_eq!(x.len(), m * k, "linear: input length");
    assert_eq!(w.len(), n * k, "linear: weight length");
    matmul(MatMut::rows(y, m, n), Mat::rows(x, m, k), Mat::transposed(w, n, k), 1.0, false, Threads::Pool);
    if let Some(b) = bias {
        super::elementwise::add_bias(y, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn linear_matches_naive_product() {
        let (m, k, n) = (7, 13, 5);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 * 0.1 - 0.5).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 13) as f32 * 0.07 - 0.4).collect();
        let b: Vec<f32> = (0..n).map(|i| i as f32 * 0.3).collect();
        let mut wt = vec![0.0; k * n];
        for r in 0..n {
            for c in 0..k {
                wt[c * n + r] = w[r * k + c];
            }
        }
        let want = naive(&x, &wt, m, k, n);
        let mut y = vec![0.0; m * n];
        linear(&mut y, &x, &w, Some(&b), m, k, n);
        for i in 0..m * n {
            let expect = want[i] + b[i % n];
            assert!((y[i] - expect).abs() < 1e-5, "{i}: {} vs {expect}", y[i]);
        }
    }
}
