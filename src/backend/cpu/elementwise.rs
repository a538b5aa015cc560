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

simd_dispatch! {
    fn bias_gelu_saving_grad_rows(x: &mut [f32], out: &mut [f32], bias: &[f32]) {
        let dim = bias.len();
        for (x_row, o_row) in x.chunks_exact_mut(dim).zip(out.chunks_exact_mut(dim)) {
            for ((x, o), &b) in x_row.iter_mut().zip(o_row.iter_mut()).zip(bias) {
                (*o, *x) = math::gelu_and_grad(*x + b);
            }
        }
    }
}

/// For training: on entry `x` is a Linear's output without its bias; on return `out =
/// GELU(x + bias)` and `x = GELU'(x + bias)`, which is all the backward needs
/// ([`gelu_backward_saved`](super::backward::gelu_backward_saved)). One erf per element serves
/// both, and the backward then costs one multiply.
pub fn bias_gelu_saving_grad(x: &mut [f32], out: &mut [f32], bias: &[f32]) {
    let dim = bias.len();
    assert_eq!(x.len(), out.len(), "bias_gelu_saving_grad: lengths");
    assert_eq!(x.len() % dim, 0);
    let chunk = rows_per_task(x.len() / dim, dim) * dim;
    x.par_chunks_mut(chunk).zip(out.par_chunks_mut(chunk)).for_each(|(x, o)| bias_gelu_saving_grad_rows(x, o, bias));
}

simd_dispatch! {
    fn residual_into_rows(out: &mut [f32], x: &[f32], y: &[f32], bias: &[f32], scale: Option<&[f32]>) {
        let dim = bias.len();
        for ((o_row, x_row), y_row) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(y.chunks_exact(dim)) {
            match scale {
                Some(s) => {
                    for ((((o, &a), &v), &b), &g) in o_row.iter_mut().zip(x_row).zip(y_row).zip(bias).zip(s) {
                        *o = a + g * (v + b);
                    }
                }
                None => {
                    for (((o, &a), &v), &b) in o_row.iter_mut().zip(x_row).zip(y_row).zip(bias) {
                        *o = a + (v + b);
                    }
                }
            }
        }
    }
}

/// A factor per group of rows: row `r` takes `factors[r / rows_each]` (stochastic depth: one
/// factor per image, 0 to drop its branch, 1/keep to keep it).
#[derive(Debug, Clone, Copy)]
pub struct RowFactors<'a> {
    pub factors: &'a [f32],
    pub rows_each: usize,
}

impl RowFactors<'_> {
    pub fn of_row(&self, row: usize) -> f32 {
        self.factors[row / self.rows_each]
    }

    fn check(&self, rows: usize) {
        assert!(self.rows_each > 0 && self.factors.len() * self.rows_each == rows, "row factors do not cover the rows");
    }
}

/// [`residual_add`] out of place: `out = x + scale ⊙ (y + bias)` (the same arithmetic, so the
/// same bits), for training, which keeps both sides of every residual. With `row_factors`, row
/// r's scale is `scale·k_r` (or `k_r` without `scale`), and a row with `k_r = 0` is `x` as is.
pub fn residual_add_into(
    out: &mut [f32],
    x: &[f32],
    y: &[f32],
    bias: &[f32],
    scale: Option<&[f32]>,
    row_factors: Option<RowFactors<'_>>,
) {
    let dim = bias.len();
    assert_eq!(out.len(), x.len());
    assert_eq!(out.len(), y.len());
    assert_eq!(out.len() % dim, 0);
    if let Some(s) = scale {
        assert_eq!(s.len(), dim);
    }
    let rows = out.len() / dim;
    let chunk_rows = rows_per_task(rows, dim);
    let chunk = chunk_rows * dim;
    let Some(rf) = row_factors else {
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(y.par_chunks(chunk)))
            .for_each(|(o, (a, v))| residual_into_rows(o, a, v, bias, scale));
        return;
    };
    rf.check(rows);
    out.par_chunks_mut(chunk).enumerate().zip(x.par_chunks(chunk).zip(y.par_chunks(chunk))).for_each(
        |((c, o), (a, v))| {
            let mut eff = vec![0.0f32; dim];
            for (r, ((o, a), v)) in o.chunks_mut(dim).zip(a.chunks(dim)).zip(v.chunks(dim)).enumerate() {
                let k = rf.of_row(c * chunk_rows + r);
                if k == 0.0 {
                    o.copy_from_slice(a);
                    continue;
                }
                match scale {
                    Some(s) => eff.iter_mut().zip(s).for_each(|(e, &s)| *e = s * k),
                    None => eff.fill(k),
                }
                residual_into_rows(o, a, v, bias, Some(&eff));
            }
        },
    );
}

simd_dispatch! {
    fn relu_chunk(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            // `v < 0 ? 0 : v` rather than `max`: a NaN passes through, as in PyTorch.
            *o = if v < 0.0 { 0.0 } else { v };
        }
    }
}

simd_dispatch! {
    fn relu_chunk_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = if *v < 0.0 { 0.0 } else { *v };
        }
    }
}

/// `x = ReLU(x)` in place, for a pre-activation nothing else needs (its backward can read the
/// output instead: output > 0 exactly where the input was).
pub fn relu_inplace(x: &mut [f32]) {
    const CHUNK: usize = 16_384;
    x.par_chunks_mut(CHUNK).for_each(relu_chunk_inplace);
}

/// `out = ReLU(x)` (out of place; the backward needs `x`). Its backward is
/// [`super::backward::relu_backward`].
pub fn relu_forward(x: &[f32], out: &mut [f32]) {
    assert_eq!(out.len(), x.len(), "relu_forward: out length");
    const CHUNK: usize = 16_384;
    out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| relu_chunk(x, o));
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
    fn out_of_place_variants_equal_the_in_place_ops() {
        let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..24).map(|i| (i as f32 * 0.11).cos()).collect();
        let bias = [0.1f32, -0.2, 0.3, 0.05];
        let scale = [0.5f32, 1.5, -1.0, 2.0];
        for s in [None, Some(&scale[..])] {
            let mut acc = x.clone();
            residual_add(&mut acc, &y, &bias, s);
            let mut out = vec![0.0f32; 24];
            residual_add_into(&mut out, &x, &y, &bias, s, None);
            assert_eq!(acc, out);
        }
        let mut inplace = x.clone();
        bias_gelu_inplace(&mut inplace, Some(&bias), 4);
        let (mut saved, mut out) = (x.clone(), vec![0.0f32; 24]);
        bias_gelu_saving_grad(&mut saved, &mut out, &bias);
        assert_eq!(out, inplace);
        for (i, (&g, &v)) in saved.iter().zip(&x).enumerate() {
            assert_eq!(g, math::gelu_grad(v + bias[i % 4]));
        }
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
