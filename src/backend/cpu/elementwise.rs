//! Element-wise ops, each a rayon loop over row chunks with a vectorisable body.

use rayon::prelude::*;

use super::math::{self, simd_dispatch};
use super::rows_per_task;

simd_dispatch! {
    fn gelu_chunk(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = math::gelu(*v);
        }
    }
}

/// In place exact GELU.
pub fn gelu_inplace(x: &mut [f32]) {
    let chunk = rows_per_task(x.len().div_ceil(1024), 1024) * 1024;
    x.par_chunks_mut(chunk).for_each(gelu_chunk);
}

simd_dispatch! {
    fn add_scaled_rows(acc: &mut [f32], y: &[f32], scale: Option<&[f32]>, dim: usize) {
        match scale {
            Some(s) => {
                for (a_row, y_row) in acc.chunks_exact_mut(dim).zip(y.chunks_exact(dim)) {
                    for ((a, &v), &g) in a_row.iter_mut().zip(y_row).zip(s) {
                        *a += g * v;
                    }
                }
            }
            None => {
                for (a, &v) in acc.iter_mut().zip(y) {
                    *a += v;
                }
            }
        }
    }
}

/// The residual update of a BEiT block: `acc[r, :] += scale ⊙ y[r, :]` (layer scale λ), or
/// `acc += y` when layer scale is off.
pub fn residual_add(acc: &mut [f32], y: &[f32], scale: Option<&[f32]>, dim: usize) {
    assert_eq!(acc.len(), y.len());
    assert_eq!(acc.len() % dim, 0);
    if let Some(s) = scale {
        assert_eq!(s.len(), dim);
    }
    let rows = rows_per_task(acc.len() / dim, dim) * dim;
    acc.par_chunks_mut(rows).zip(y.par_chunks(rows)).for_each(|(a, b)| add_scaled_rows(a, b, scale, dim));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residual_add_with_and_without_scale() {
        let mut acc = vec![1.0f32; 6];
        let y = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        residual_add(&mut acc, &y, Some(&[0.5, 1.0, 2.0]), 3);
        assert_eq!(acc, vec![1.5, 3.0, 7.0, 3.0, 6.0, 13.0]);
        residual_add(&mut acc, &y, None, 3);
        assert_eq!(acc, vec![2.5, 5.0, 10.0, 7.0, 11.0, 19.0]);
    }
}
