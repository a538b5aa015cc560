//! Element-wise ops, each a rayon loop over row chunks with a vectorisable body.

use rayon::prelude::*;

use super::math::{self, simd_dispatch};
use super::rows_per_task;

simd_dispatch! {
    fn bias_gelu_rows(x: &mut [f32], bias: Option<&[f32]>, dim: usize) {
        match bias {
            Some(b) => {
                for row in x.chunks_exact_mut(dim) {
                    for (v, &bb) in row.iter_mut().zip(b) {
                        *v = math::gelu(*v + bb);
                    }
                }
            }
            None => {
                for v in x.iter_mut() {
                    *v = math::gelu(*v);
                }
            }
        }
    }
}

/// In place `x[r, :] = GELU(x[r, :] + bias)` (exact GELU), the bias of the Linear before it
/// fused into the same pass.
pub fn bias_gelu_inplace(x: &mut [f32], bias: Option<&[f32]>, dim: usize) {
    assert_eq!(x.len() % dim, 0);
    if let Some(b) = bias {
        assert_eq!(b.len(), dim);
    }
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    x.par_chunks_mut(chunk).for_each(|c| bias_gelu_rows(c, bias, dim));
}

simd_dispatch! {
    fn add_bias_rows(y: &mut [f32], bias: &[f32]) {
        for row in y.chunks_exact_mut(bias.len()) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// `y[r, :] += bias` for every row.
pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    let dim = bias.len();
    assert_eq!(y.len() % dim, 0);
    let chunk = rows_per_task(y.len() / dim, dim) * dim;
    y.par_chunks_mut(chunk).for_each(|c| add_bias_rows(c, bias));
}

simd_dispatch! {
    fn add_scaled_rows(acc: &mut [f32], y: &[f32], bias: &[f32], scale: Option<&[f32]>, dim: usize) {
        for (a_row, y_row) in acc.chunks_exact_mut(dim).zip(y.chunks_exact(dim)) {
            match scale {
                Some(s) => {
                    for (((a, &v), &b), &g) in a_row.iter_mut().zip(y_row).zip(bias).zip(s) {
                        *a += g * (v + b);
                    }
                }
                None => {
                    for ((a, &v), &b) in a_row.iter_mut().zip(y_row).zip(bias) {
                        *a += v + b;
                    }
                }
            }
        }
    }
}

/// The residual update of a BEiT block with the output projection's bias fused in:
/// `acc[r, :] += scale ⊙ (y[r, :] + bias)` (layer scale λ), or `acc += y + bias` when layer
/// scale is off. The order of operations is HF's: bias, then scale, then residual.
pub fn residual_add(acc: &mut [f32], y: &[f32], bias: &[f32], scale: Option<&[f32]>) {
    let dim = bias.len();
    assert_eq!(acc.len(), y.len());
    assert_eq!(acc.len() % dim, 0);
    if let Some(s) = scale {
        assert_eq!(s.len(), dim);
    }
    let rows = rows_per_task(acc.len() / dim, dim) * dim;
    acc.par_chunks_mut(rows).zip(y.par_chunks(rows)).for_each(|(a, b)| add_scaled_rows(a, b, bias, scale, dim));
}

/// `acc += x`, element-wise (gradients meeting at a residual connection).
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    assert_eq!(acc.len(), x.len());
    const CHUNK: usize = 16_384;
    acc.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(a, x)| {
        for (a, &v) in a.iter_mut().zip(x) {
            *a += v;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_add_with_and_without_scale() {
        let mut acc = vec![1.0f32; 6];
        let y = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        residual_add(&mut acc, &y, &[0.0; 3], Some(&[0.5, 1.0, 2.0]));
        assert_eq!(acc, vec![1.5, 3.0, 7.0, 3.0, 6.0, 13.0]);
        residual_add(&mut acc, &y, &[1.0, 0.0, -1.0], None);
        assert_eq!(acc, vec![3.5, 5.0, 9.0, 8.0, 11.0, 18.0]);
        let mut acc = vec![0.0f32; 3];
        residual_add(&mut acc, &[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0], Some(&[2.0, 2.0, 2.0]));
        assert_eq!(acc, vec![4.0, 6.0, 8.0]);
    }

    #[test]
    fn bias_gelu_and_add_bias() {
        let mut x = vec![0.0f32, 1.0, -1.0, 2.0];
        bias_gelu_inplace(&mut x, Some(&[1.0, -1.0]), 2);
        let want = [math::gelu(1.0), math::gelu(0.0), math::gelu(0.0), math::gelu(1.0)];
        assert_eq!(x, want);
        let mut y = vec![1.0f32, 2.0, 3.0, 4.0];
        add_bias(&mut y, &[10.0, 20.0]);
        assert_eq!(y, vec![11.0, 22.0, 13.0, 24.0]);
    }
}
