//! The CPU backend's [`ImageOps`]: each op resolves its views in host memory
//! ([`HostMemory::split`]) and calls this backend's kernel for it (conv.rs, batchnorm.rs,
//! pool.rs, interp.rs, elementwise.rs, pixel_cross_entropy.rs). A max pool keeps its argmax, as
//! u32, in the `Stat` floats planned for it.

use rayon::prelude::*;

use super::backward::{gelu_backward, relu_backward};
use super::batchnorm::{
    batchnorm_eval, batchnorm_train_backward_from, batchnorm_train_forward_saving, update_running_stats_from,
};
use super::conv::{conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward};
use super::elementwise::{relu_forward, relu_inplace};
use super::interp::{adaptive_avg_pool_backward, adaptive_avg_pool_forward, bilinear_backward, bilinear_forward};
use super::math;
use super::ops::Cpu;
use super::pixel_cross_entropy::pixel_cross_entropy_fused;
use super::pool::{max_pool2x2_backward, max_pool2x2_forward};
use crate::backend::image_ops::{batch_norm_saved_len, BatchNorm, ImageOps};
use crate::backend::memory::{HostMemory, View};
use crate::backend::ops::DxMode;
use crate::backend::shapes::{BnShape, Conv2dShape, ResizeShape};
use crate::error::Result;

/// Elements per rayon task of the element-wise ops.
const CHUNK: usize = 16_384;

fn or_empty(v: Option<View>, like: View) -> View {
    v.unwrap_or(View::empty(like.space))
}

/// The argmax a max pool keeps in `Stat` floats: the same bits read as u32.
fn as_indices(s: &[f32]) -> &[u32] {
    // SAFETY: f32 and u32 have the same size and alignment, and every bit pattern is valid for
    // both.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u32>(), s.len()) }
}

fn as_indices_mut(s: &mut [f32]) -> &mut [u32] {
    // SAFETY: as in `as_indices`; the borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u32>(), s.len()) }
}

/// The statistics a training batch norm kept: (mean, 1/std, unbiased variance).
fn saved_parts(saved: &[f32], channels: usize) -> (&[f32], &[f32], &[f32]) {
    assert_eq!(saved.len(), batch_norm_saved_len(channels), "batch norm: saved length");
    let (mean, rest) = saved.split_at(channels);
    let (invstd, var) = rest.split_at(channels);
    (mean, invstd, var)
}

impl ImageOps for Cpu {
    fn conv2d(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()> {
        let ([out], [x, w, b]) = m.split([out], [x, weight, or_empty(bias, weight)]);
        conv2d_forward(&shape, x, w, bias.map(|_| b), out);
        Ok(())
    }

    fn conv2d_backward(
        &self,
        m: &mut HostMemory<'_>,
        dx: Option<(View, DxMode)>,
        dweight: View,
        dbias: Option<View>,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()> {
        let dx_view = dx.map_or(View::empty(dout.space), |d| d.0);
        let ([dxs, dw, db], [dout, x, w]) = m.split([dx_view, dweight, or_empty(dbias, dweight)], [dout, x, weight]);
        conv2d_backward(&shape, x, w, dout, dx.map(|d| (dxs, d.1)), dw, dbias.map(|_| db));
        Ok(())
    }

    fn conv_transpose2d(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        x: View,
        weight: View,
        bias: Option<View>,
        shape: Conv2dShape,
    ) -> Result<()> {
        let ([out], [x, w, b]) = m.split([out], [x, weight, or_empty(bias, weight)]);
        conv_transpose2d_forward(&shape, x, w, bias.map(|_| b), out);
        Ok(())
    }

    fn conv_transpose2d_backward(
        &self,
        m: &mut HostMemory<'_>,
        dx: Option<(View, DxMode)>,
        dweight: View,
        dbias: Option<View>,
        dout: View,
        x: View,
        weight: View,
        shape: Conv2dShape,
    ) -> Result<()> {
        let dx_view = dx.map_or(View::empty(dout.space), |d| d.0);
        let ([dxs, dw, db], [dout, x, w]) = m.split([dx_view, dweight, or_empty(dbias, dweight)], [dout, x, weight]);
        conv_transpose2d_backward(&shape, x, w, dout, dx.map(|d| (dxs, d.1)), dw, dbias.map(|_| db));
        Ok(())
    }

    fn batch_norm_eval(&self, m: &mut HostMemory<'_>, out: View, x: View, bn: BatchNorm, shape: BnShape) -> Result<()> {
        let ([out], [x, g, b, rm, rv]) = m.split([out], [x, bn.gamma, bn.beta, bn.running_mean, bn.running_var]);
        batchnorm_eval(shape, x, out, g, b, rm, rv, bn.eps);
        Ok(())
    }

    fn batch_norm_train(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        saved: View,
        x: View,
        gamma: View,
        beta: View,
        eps: f32,
        shape: BnShape,
    ) -> Result<()> {
        let ([out, saved], [x, g, b]) = m.split([out, saved], [x, gamma, beta]);
        batchnorm_train_forward_saving(shape, x, out, g, b, eps, saved);
        Ok(())
    }

    fn batch_norm_backward(
        &self,
        m: &mut HostMemory<'_>,
        dx: View,
        dgamma: View,
        dbeta: View,
        dy: View,
        x: View,
        gamma: View,
        saved: View,
        shape: BnShape,
    ) -> Result<()> {
        let ([dx, dg, db], [dy, x, g, saved]) = m.split([dx, dgamma, dbeta], [dy, x, gamma, saved]);
        let (mean, invstd, _) = saved_parts(saved, shape.channels);
        batchnorm_train_backward_from(shape, x, dy, g, mean, invstd, dx, dg, db);
        Ok(())
    }

    fn batch_norm_update_running(
        &self,
        m: &mut HostMemory<'_>,
        running_mean: View,
        running_var: View,
        saved: View,
        momentum: f32,
    ) -> Result<()> {
        let ([rm, rv], [saved]) = m.split([running_mean, running_var], [saved]);
        let (mean, _, var) = saved_parts(saved, rm.len());
        update_running_stats_from(rm, rv, mean, var, momentum);
        Ok(())
    }

    fn relu(&self, m: &mut HostMemory<'_>, out: View, x: View) -> Result<()> {
        if out == x {
            relu_inplace(m.split::<1, 0>([out], []).0[0]);
        } else {
            let ([out], [x]) = m.split([out], [x]);
            relu_forward(x, out);
        }
        Ok(())
    }

    fn relu_backward(&self, m: &mut HostMemory<'_>, dx: View, dout: View, y: View, mode: DxMode) -> Result<()> {
        if dx == dout {
            assert_eq!(mode, DxMode::Overwrite, "relu_backward: an in-place gradient is overwritten");
            let ([d], [y]) = m.split([dx], [y]);
            assert_eq!(d.len(), y.len(), "relu_backward: y length");
            d.par_chunks_mut(CHUNK).zip(y.par_chunks(CHUNK)).for_each(|(d, y)| {
                for (g, &a) in d.iter_mut().zip(y) {
                    *g = if a > 0.0 { *g } else { 0.0 };
                }
            });
        } else {
            let ([dx], [dout, y]) = m.split([dx], [dout, y]);
            relu_backward(y, dout, dx, mode);
        }
        Ok(())
    }

    fn gelu(&self, m: &mut HostMemory<'_>, out: View, x: View) -> Result<()> {
        let ([out], [x]) = m.split([out], [x]);
        assert_eq!(out.len(), x.len(), "gelu: out length");
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = math::gelu(v);
            }
        });
        Ok(())
    }

    fn gelu_input_backward(&self, m: &mut HostMemory<'_>, dx: View, dy: View, x: View) -> Result<()> {
        let ([dx], [dy, x]) = m.split([dx], [dy, x]);
        gelu_backward(dx, dy, x);
        Ok(())
    }

    fn max_pool2x2_saved_len(&self, out_len: usize) -> usize {
        out_len
    }

    fn max_pool2x2(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        saved: View,
        x: View,
        planes: usize,
        h: usize,
        w: usize,
    ) -> Result<()> {
        let ([out, saved], [x]) = m.split([out, saved], [x]);
        max_pool2x2_forward(planes, 1, h, w, x, out, as_indices_mut(saved));
        Ok(())
    }

    fn max_pool2x2_backward(
        &self,
        m: &mut HostMemory<'_>,
        dx: View,
        dout: View,
        saved: View,
        planes: usize,
        h: usize,
        w: usize,
        mode: DxMode,
    ) -> Result<()> {
        let ([dx], [dout, saved]) = m.split([dx], [dout, saved]);
        max_pool2x2_backward(planes, 1, h, w, dout, as_indices(saved), dx, mode);
        Ok(())
    }

    fn adaptive_avg_pool(&self, m: &mut HostMemory<'_>, out: View, x: View, s: ResizeShape) -> Result<()> {
        let ([out], [x]) = m.split([out], [x]);
        adaptive_avg_pool_forward(s.planes, s.in_h, s.in_w, s.out_h, s.out_w, x, out);
        Ok(())
    }

    fn adaptive_avg_pool_backward(&self, m: &mut HostMemory<'_>, dx: View, dout: View, s: ResizeShape) -> Result<()> {
        let ([dx], [dout]) = m.split([dx], [dout]);
        adaptive_avg_pool_backward(s.planes, s.in_h, s.in_w, s.out_h, s.out_w, dout, dx);
        Ok(())
    }

    fn bilinear_resize(&self, m: &mut HostMemory<'_>, out: View, x: View, s: ResizeShape) -> Result<()> {
        let ([out], [x]) = m.split([out], [x]);
        bilinear_forward(s.planes, s.in_h, s.in_w, s.out_h, s.out_w, x, out);
        Ok(())
    }

    fn bilinear_resize_backward(&self, m: &mut HostMemory<'_>, dx: View, dout: View, s: ResizeShape) -> Result<()> {
        let ([dx], [dout]) = m.split([dx], [dout]);
        bilinear_backward(s.planes, s.in_h, s.in_w, s.out_h, s.out_w, dout, dx);
        Ok(())
    }

    fn scale(&self, m: &mut HostMemory<'_>, v: View, factor: f32) -> Result<()> {
        let ([v], []) = m.split([v], []);
        v.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= factor));
        Ok(())
    }

    fn add_scaled(&self, m: &mut HostMemory<'_>, y: View, x: View, a: f32) -> Result<()> {
        let ([y], [x]) = m.split([y], [x]);
        assert_eq!(y.len(), x.len(), "add_scaled: x length");
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                *o += a * v;
            }
        });
        Ok(())
    }

    fn transpose(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        x: View,
        batch: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let ([out], [x]) = m.split([out], [x]);
        let each = rows * cols;
        assert!(x.len() == batch * each && out.len() == x.len(), "transpose: lengths");
        if each == 0 {
            return Ok(());
        }
        out.par_chunks_mut(each).zip(x.par_chunks(each)).for_each(|(dst, src)| {
            for r in 0..rows {
                for c in 0..cols {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        });
        Ok(())
    }

    fn pixel_cross_entropy(
        &self,
        m: &mut HostMemory<'_>,
        logits: View,
        labels: View,
        classes: usize,
        plane: usize,
        scale: f32,
    ) -> Result<()> {
        let labels = m.arena.indices(labels).to_vec();
        let ([lg], []) = m.split([logits], []);
        let sum = pixel_cross_entropy_fused(lg, &labels, classes, plane, scale);
        m.loss += sum;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::{Arena, Planner};
    use crate::backend::Backend;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + seed * 11) % 23) as f32 - 11.0) / 7.0).collect()
    }

    #[test]
    fn transpose_add_scaled_and_in_place_relu_backward() {
        let (batch, rows, cols) = (2, 3, 5);
        let mut plan = Planner::shared();
        let (x, t, y, g) = (plan.act(30), plan.act(30), plan.act(30), plan.act(30));
        let mut arena = Arena::new(&plan).unwrap();
        let mut m = HostMemory::new(&mut arena, &[], &mut []);
        let xs = data(30, 1);
        Cpu.upload(&mut m, x, &xs).unwrap();
        Cpu.transpose(&mut m, t, x, batch, rows, cols).unwrap();
        let mut got = vec![0.0; 30];
        Cpu.download(&mut m, t, &mut got).unwrap();
        for b in 0..batch {
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(got[b * 15 + c * rows + r], xs[b * 15 + r * cols + c]);
                }
            }
        }
        // y = x + 0.5·t
        Cpu.copy(&mut m, y, x).unwrap();
        Cpu.add_scaled(&mut m, y, t, 0.5).unwrap();
        let mut ys = vec![0.0; 30];
        Cpu.download(&mut m, y, &mut ys).unwrap();
        for i in 0..30 {
            assert_eq!(ys[i], xs[i] + 0.5 * got[i]);
        }
        // Masking a gradient in place equals the out-of-place backward.
        let gs = data(30, 2);
        Cpu.upload(&mut m, g, &gs).unwrap();
        Cpu.relu_backward(&mut m, t, g, x, DxMode::Overwrite).unwrap();
        Cpu.relu_backward(&mut m, g, g, x, DxMode::Overwrite).unwrap();
        let (mut a, mut b) = (vec![0.0; 30], vec![0.0; 30]);
        Cpu.download(&mut m, t, &mut a).unwrap();
        Cpu.download(&mut m, g, &mut b).unwrap();
        assert_eq!(a, b);
        for i in 0..30 {
            assert_eq!(b[i], if xs[i] > 0.0 { gs[i] } else { 0.0 });
        }
    }

    #[test]
    fn max_pool_keeps_its_argmax_in_stat_floats() {
        let (planes, h, w) = (3, 4, 6);
        let mut plan = Planner::shared();
        let x = plan.act(planes * h * w);
        let out = plan.act(planes * 6);
        let saved = plan.stat(Cpu.max_pool2x2_saved_len(planes * 6));
        let (dout, dx) = (plan.act(planes * 6), plan.act(planes * h * w));
        let mut arena = Arena::new(&plan).unwrap();
        let mut m = HostMemory::new(&mut arena, &[], &mut []);
        let xs = data(planes * h * w, 3);
        Cpu.upload(&mut m, x, &xs).unwrap();
        Cpu.max_pool2x2(&mut m, out, saved, x, planes, h, w).unwrap();
        let ds = data(planes * 6, 4);
        Cpu.upload(&mut m, dout, &ds).unwrap();
        Cpu.max_pool2x2_backward(&mut m, dx, dout, saved, planes, h, w, DxMode::Overwrite).unwrap();
        let (mut o, mut d) = (vec![0.0; planes * 6], vec![0.0; planes * h * w]);
        Cpu.download(&mut m, out, &mut o).unwrap();
        Cpu.download(&mut m, dx, &mut d).unwrap();
        let (mut want_o, mut want_d, mut arg) =
            (vec![0.0; planes * 6], vec![0.0; planes * h * w], vec![0u32; planes * 6]);
        max_pool2x2_forward(planes, 1, h, w, &xs, &mut want_o, &mut arg);
        max_pool2x2_backward(planes, 1, h, w, &ds, &arg, &mut want_d, DxMode::Overwrite);
        assert_eq!((o, d), (want_o, want_d));
    }
}
