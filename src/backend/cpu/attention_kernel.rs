//! Register-blocked AVX2+FMA products for attention's small per-(image, head) matrices.
//!
//! Every product inside one attention pair (`Q·Kᵀ`, `P·V`, `Pᵀ·dCtx`, `dCtx·Vᵀ`, `dS·K`,
//! `dSᵀ·Q`; 65×65×64 for tiny32) is `C = α·A·B (+ C)` where B's rows hold the output columns
//! contiguously and A is read one scalar at a time at any strides (so `Pᵀ` and `dSᵀ` need no
//! copy). [`gemm_bcast`] computes exactly that shape: for a block of up to 6 rows × 16 columns,
//! twelve accumulators stay in registers over the whole inner dimension, each step loading
//! two vectors of B and broadcasting six scalars of A. At these sizes the gemm crate spends
//! a large share of its time in dispatch, packing and buffer set-up; this has none of those.
//!
//! The kernels need AVX2 and FMA; [`available`] says whether this CPU has them, and callers
//! keep the gemm-crate path for CPUs without (and for shapes the kernels do not cover).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of C per register block (broadcasts of A per inner step).
const ROWS: usize = 6;
/// Vectors of 8 columns per register block: 6 × 2 accumulators + 2 B vectors + 1 broadcast
/// fit the 16 ymm registers. (4 × 3, also 12 accumulators, leaves no register spare and LLVM
/// spills an accumulator inside the inner loop: measured 1.5× slower.)
const VECS: usize = 2;

/// Whether [`gemm_bcast`] may run on this CPU (AVX2 and FMA; std caches the detection).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A strided read-only operand: element (i, p) is at `ptr + i·row_stride + p·col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub ptr: *const f32,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// `C[i, 0..n] = alpha·Σ_p A(i, p)·B[p, 0..n] (+ C[i, 0..n] when accumulate)` for `i < m`,
/// with `A(i, p)` = `a.ptr[i·a.row_stride + p·a.col_stride]`, B's row p at
/// `b + p·b_row_stride` (n contiguous floats) and C's row i at `c + i·c_row_stride`. The inner
/// sum runs over p in order, the same order for every element and every call, so results do
/// not depend on threads.
///
/// # Safety
/// [`available`] must be true; `n` must be a multiple of 8; every element named above must be
/// valid (reads for A and B, reads and writes for C), and C must not overlap A or B.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bcast(
    m: usize,
    n: usize,
    k: usize,
    a: Strided,
    b: *const f32,
    b_row_stride: usize,
    c: *mut f32,
    c_row_stride: usize,
    alpha: f32,
    accumulate: bool,
) {
    debug_assert!(n % 8 == 0, "gemm_bcast: n must be a multiple of 8");
    let mut col = 0;
    while col < n {
        let vecs = ((n - col) / 8).min(VECS);
        let mut row = 0;
        while row < m {
            let rows = (m - row).min(ROWS);
            let a_blk = Strided { ptr: a.ptr.add(row * a.row_stride), ..a };
            let b_blk = b.add(col);
            let c_blk = c.add(row * c_row_stride + col);
            // One monomorphised block per (rows, vecs) so the accumulators are registers.
            macro_rules! block {
                ($($r:literal, $v:literal);*) => {
                    match (rows, vecs) {
                        $(($r, $v) => micro::<$r, $v>(k, a_blk, b_blk, b_row_stride, c_blk, c_row_stride, alpha, accumulate),)*
                        _ => unreachable!(),
                    }
                };
            }
            block!(6, 2; 6, 1; 5, 2; 5, 1; 4, 2; 4, 1; 3, 2; 3, 1; 2, 2; 2, 1; 1, 2; 1, 1);
            row += rows;
        }
        col += 8 * vecs;
    }
}

/// One `R × 8V` block of [`gemm_bcast`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn micro<const R: usize, const V: usize>(
    k: usize,
    a: Strided,
    b: *const f32,
    b_row_stride: usize,
    c: *mut f32,
    c_row_stride: usize,
    alpha: f32,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); V]; R];
    let mut a_col = a.ptr;
    let mut b_row = b;
    for _ in 0..k {
        let mut bv = [_mm256_setzero_ps(); V];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm256_loadu_ps(b_row.add(8 * v));
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a_col.add(r * a.row_stride));
            for (x, &y) in acc_r.iter_mut().zip(&bv) {
                *x = _mm256_fmadd_ps(av, y, *x);
            }
        }
        a_col = a_col.add(a.col_stride);
        b_row = b_row.add(b_row_stride);
    }
    let al = _mm256_set1_ps(alpha);
    for (r, acc_r) in acc.iter().enumerate() {
        for (v, &x) in acc_r.iter().enumerate() {
            let dst = c.add(r * c_row_stride + 8 * v);
            let y = if accumulate { _mm256_fmadd_ps(x, al, _mm256_loadu_ps(dst)) } else { _mm256_mul_ps(x, al) };
            _mm256_storeu_ps(dst, y);
        }
    }
}

/// `dst[c·ld + r] = src[r·src_row_stride + c]` for `r < rows`, `c < cols`: a transpose into
/// rows of length `ld`, by 8×8 register tiles (eight row loads, 24 shuffles, eight stores)
/// where a scalar copy would spend one load and one scattered store per element. Rows past the
/// last whole tile go element by element.
///
/// # Safety
/// [`available`] must be true; `cols` must be a multiple of 8; the named elements of `src`
/// must be readable and those of `dst` writable, without overlap.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn transpose(dst: *mut f32, ld: usize, src: *const f32, src_row_stride: usize, rows: usize, cols: usize) {
    debug_assert!(cols % 8 == 0, "transpose: cols must be a multiple of 8");
    let whole = rows / 8 * 8;
    for r0 in (0..whole).step_by(8) {
        for c0 in (0..cols).step_by(8) {
            let ld_row = |i: usize| _mm256_loadu_ps(src.add((r0 + i) * src_row_stride + c0));
            let (t0, t1) = (_mm256_unpacklo_ps(ld_row(0), ld_row(1)), _mm256_unpackhi_ps(ld_row(0), ld_row(1)));
            let (t2, t3) = (_mm256_unpacklo_ps(ld_row(2), ld_row(3)), _mm256_unpackhi_ps(ld_row(2), ld_row(3)));
            let (t4, t5) = (_mm256_unpacklo_ps(ld_row(4), ld_row(5)), _mm256_unpackhi_ps(ld_row(4), ld_row(5)));
            let (t6, t7) = (_mm256_unpacklo_ps(ld_row(6), ld_row(7)), _mm256_unpackhi_ps(ld_row(6), ld_row(7)));
            // Per 128-bit lane, u_c holds column c (low lane) and column c + 4 (high lane) of
            // rows 0-3; w_c the same for rows 4-7.
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let w0 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let w1 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let w2 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let w3 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let out = |c: usize| dst.add((c0 + c) * ld + r0);
            _mm256_storeu_ps(out(0), _mm256_permute2f128_ps::<0x20>(u0, w0));
            _mm256_storeu_ps(out(1), _mm256_permute2f128_ps::<0x20>(u1, w1));
            _mm256_storeu_ps(out(2), _mm256_permute2f128_ps::<0x20>(u2, w2));
            _mm256_storeu_ps(out(3), _mm256_permute2f128_ps::<0x20>(u3, w3));
            _mm256_storeu_ps(out(4), _mm256_permute2f128_ps::<0x31>(u0, w0));
            _mm256_storeu_ps(out(5), _mm256_permute2f128_ps::<0x31>(u1, w1));
            _mm256_storeu_ps(out(6), _mm256_permute2f128_ps::<0x31>(u2, w2));
            _mm256_storeu_ps(out(7), _mm256_permute2f128_ps::<0x31>(u3, w3));
        }
    }
    for r in whole..rows {
        for c in 0..cols {
            *dst.add(c * ld + r) = *src.add(r * src_row_stride + c);
        }
    }
}

/// Portable stand-in so callers compile everywhere; never called ([`available`] is false).
///
/// # Safety
/// Not callable: [`available`] is false off x86_64.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn transpose(
    _dst: *mut f32,
    _ld: usize,
    _src: *const f32,
    _src_row_stride: usize,
    _rows: usize,
    _cols: usize,
) {
    unreachable!("transpose needs x86_64 with AVX2")
}

/// Portable stand-in so callers compile everywhere; never called ([`available`] is false).
///
/// # Safety
/// Not callable: [`available`] is false off x86_64.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bcast(
    _m: usize,
    _n: usize,
    _k: usize,
    _a: Strided,
    _b: *const f32,
    _b_row_stride: usize,
    _c: *mut f32,
    _c_row_stride: usize,
    _alpha: f32,
    _accumulate: bool,
) {
    unreachable!("gemm_bcast needs x86_64 with AVX2 and FMA")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Against the definition in f64, over remainders in both block dimensions, transposed and
    /// strided A, padded rows of B and C, with and without accumulation.
    #[test]
    fn gemm_bcast_matches_definition() {
        if !available() {
            eprintln!("no AVX2+FMA: kernel not exercised");
            return;
        }
        for &(m, n, k) in &[(1, 8, 1), (5, 16, 3), (65, 72, 64), (65, 64, 65), (17, 24, 32), (7, 40, 200)] {
            for transposed_a in [false, true] {
                for accumulate in [false, true] {
                    // A is m×k inside a buffer with padding; transposed means stored k×m.
                    let lda = if transposed_a { m + 3 } else { k + 5 };
                    let a_buf = values(lda * if transposed_a { k } else { m }, 1);
                    let a = if transposed_a {
                        Strided { ptr: a_buf.as_ptr(), row_stride: 1, col_stride: lda }
                    } else {
                        Strided { ptr: a_buf.as_ptr(), row_stride: lda, col_stride: 1 }
                    };
                    let ldb = n + 8;
                    let b = values(k * ldb, 2);
                    let ldc = n + 16;
                    let c0 = values(m * ldc, 3);
                    let mut c = c0.clone();
                    let alpha = 0.37f32;
                    unsafe { gemm_bcast(m, n, k, a, b.as_ptr(), ldb, c.as_mut_ptr(), ldc, alpha, accumulate) };
                    let mut worst = 0.0f64;
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            let want = if j < n {
                                let dot: f64 = (0..k)
                                    .map(|p| {
                                        let av = a_buf[i * a.row_stride + p * a.col_stride] as f64;
                                        av * b[p * ldb + j] as f64
                                    })
                                    .sum();
                                alpha as f64 * dot + if accumulate { c0[i * ldc + j] as f64 } else { 0.0 }
                            } else {
                                // Columns past n are never written.
                                c0[i * ldc + j] as f64
                            };
                            worst = worst.max((got - want).abs() / (1.0 + want.abs()));
                        }
                    }
                    // f32 sums of k products of magnitude ≤ 1: rounding grows like k·2⁻²⁴.
                    assert!(
                        worst < 2e-6 * (k as f64).sqrt().max(1.0),
                        "m{m} n{n} k{k} t{transposed_a} acc{accumulate}: {worst:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn transpose_matches_definition() {
        if !available() {
            eprintln!("no AVX2+FMA: kernel not exercised");
            return;
        }
        for &(rows, cols) in &[(1, 8), (8, 8), (17, 32), (65, 64), (197, 64)] {
            let stride = cols + 5;
            let src = values(rows * stride, 4);
            let ld = rows + 7;
            let mut dst = vec![f32::NAN; cols * ld];
            unsafe { transpose(dst.as_mut_ptr(), ld, src.as_ptr(), stride, rows, cols) };
            for c in 0..cols {
                for r in 0..ld {
                    let got = dst[c * ld + r];
                    if r < rows {
                        assert_eq!(got.to_bits(), src[r * stride + c].to_bits(), "rows {rows} cols {cols}: ({r}, {c})");
                    } else {
                        assert!(got.is_nan(), "wrote past the rows");
                    }
                }
            }
        }
    }
}
