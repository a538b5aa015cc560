//! Matrix products through the `gemm` crate. Matrices are described by a base slice and element
//! strides, so transposed and strided operands (attention heads inside a fused QKV buffer) need
//! no copies.

use gemm::Parallelism;
use rayon::prelude::*;

/// Destination rows from which a `Threads::Pool` product with a row-major left operand is split
/// into row blocks rather than handed to the gemm crate's own parallelism (see
/// [`matmul_raw`]). The tiny32 per-token products (Linear forward and dX: 4160 rows, row-major
/// activations or output gradients) gain; the MIM head's 256-row blocks and the weight
/// gradients (a transposed left operand: dYᵀ; for the head 8192 rows) measured slower split,
/// so they stay with the gemm crate.
const ROW_SPLIT_MIN_ROWS: usize = 2048;

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
    let pool = rayon::current_num_threads();
    if threads == Threads::Pool && pool > 1 && rows >= ROW_SPLIT_MIN_ROWS && a.col_stride == 1 {
        // Tall products (the per-token Linears: batch·tokens rows, a few hundred columns and
        // inner dimension) run as row blocks, each a single-threaded product, two blocks per
        // thread for rayon to balance: each thread then packs and streams only its own rows,
        // where the gemm crate's own split over the whole matrix was measured 10-40% slower
        // on the tiny32 shapes (examples/tiny32_gemm.rs), and a thread that falls behind (a
        // shared machine) hands blocks to the other instead of stalling the product.
        // Every element is still one product over the whole inner dimension with the same
        // blocking, so the result does not depend on the split (tested bit for bit).
        let blocks = 2 * pool;
        let per = rows.div_ceil(blocks);
        let dst = super::SendPtr(dst);
        (0..rows.div_ceil(per)).into_par_iter().for_each(|i| {
            let r0 = i * per;
            let r = per.min(rows - r0);
            let a = Mat { data: &a.data[r0 * a.row_stride..], rows: r, ..a };
            let dst = dst;
            // SAFETY: block i writes only rows r0..r0 + r of the caller's destination.
            unsafe {
                matmul_raw(
                    dst.0.add(r0 * row_stride),
                    r,
                    cols,
                    row_stride,
                    col_stride,
                    a,
                    b,
                    beta,
                    accumulate,
                    Threads::Single,
                )
            };
        });
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

    /// The row-block split of tall products gives the same bits as one single-threaded
    /// product, for any pool size, with and without accumulation and for a transposed operand.
    #[test]
    fn tall_products_split_into_row_blocks_bit_identical() {
        let (m, k, n) = (ROW_SPLIT_MIN_ROWS + 37, 24, 19);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 2003) as f32 / 1001.5 - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729) % 1009) as f32 / 504.5 - 1.0).collect();
        let start: Vec<f32> = (0..m * n).map(|i| ((i * 31) % 97) as f32 / 48.5 - 1.0).collect();
        for accumulate in [false, true] {
            let run = |threads: usize, mode: Threads| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut y = start.clone();
                pool.install(|| {
                    matmul(
                        MatMut::rows(&mut y, m, n),
                        Mat::rows(&x, m, k),
                        Mat::transposed(&w, n, k),
                        0.5,
                        accumulate,
                        mode,
                    )
                });
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let single = run(1, Threads::Single);
            for threads in [2, 3] {
                assert_eq!(run(threads, Threads::Pool), single, "{threads} threads, accumulate {accumulate}");
            }
            // And it is the product: check a few rows against f64.
            let y: Vec<f32> = single.iter().map(|&b| f32::from_bits(b)).collect();
            for r in [0, m / 2, m - 1] {
                for c in 0..n {
                    let dot: f64 = (0..k).map(|p| x[r * k + p] as f64 * w[c * k + p] as f64).sum();
                    let want = 0.5 * dot + if accumulate { start[r * n + c] as f64 } else { 0.0 };
                    assert!((y[r * n + c] as f64 - want).abs() < 1e-5, "({r}, {c})");
                }
            }
        }
    }
}
