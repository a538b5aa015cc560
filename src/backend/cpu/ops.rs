//! The CPU backend as a [`Backend`]: each op resolves its views in host memory
//! ([`HostMemory::split`], which refuses overlapping writes) and calls this backend's function
//! for it. What the CPU keeps for backwards: attention probabilities and GELU's derivative (each
//! backward is then one pass); layer norms keep nothing (their backward recomputes mean and rstd
//! from the input, cheaper than reading them).

use super::attention::attention_forward;
use super::attention_backward::{attention_backward, attention_backward_scratch_len, attention_forward_saving_probs};
use rayon::prelude::*;

use super::backward::{add_into, gelu_backward_saved, layernorm_backward, linear_backward, residual_add_backward};
use super::cross_entropy::cross_entropy_fused_part;
use super::cross_entropy_smoothed::smoothed_cross_entropy_fused_part;
use super::elementwise::{bias_gelu_inplace, bias_gelu_saving_grad, residual_add, residual_add_into, RowFactors};
use super::gemm::linear;
use super::layernorm::layernorm;
use super::mean_squared_error::mse_fused_part;
use crate::backend::memory::{HostMemory, View};
use crate::backend::ops::{Backend, Branch, BranchGrads, DxMode, Norm, RowScale, TokenParams};
use crate::backend::shapes::{AttentionShape, PatchEmbedShape};
use crate::error::Result;

/// The CPU backend (rayon threads of the calling pool, the `gemm` crate).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

fn row_factors<'a>(rows: Option<RowScale>, factors: &'a [f32]) -> Option<RowFactors<'a>> {
    rows.map(|r| RowFactors { factors, rows_each: r.rows_each })
}

fn view_or_empty(v: Option<View>, like: View) -> View {
    v.unwrap_or(View::empty(like.space))
}

impl Backend for Cpu {
    type Memory<'a> = HostMemory<'a>;

    fn shared_planner(&self) -> bool {
        true
    }

    fn layer_norm_saved_len(&self, _rows: usize) -> usize {
        0
    }

    fn attention_saved_len(&self, shape: AttentionShape) -> usize {
        shape.batch * shape.heads * shape.tokens * shape.tokens
    }

    fn attention_scratch_len(&self, shape: AttentionShape) -> usize {
        let threads = rayon::current_num_threads().max(1);
        threads.min(shape.batch * shape.heads) * shape.tokens * shape.tokens
    }

    fn attention_backward_scratch_len(&self, shape: AttentionShape, with_dbias: bool) -> usize {
        attention_backward_scratch_len(shape, with_dbias)
    }

    fn layer_norm(&self, m: &mut HostMemory<'_>, x: View, dim: usize, norm: Norm) -> Result<()> {
        let ([out], [x, g, b]) = m.split([norm.out], [x, norm.gamma, norm.beta]);
        layernorm(out, x, g, b, dim, norm.eps);
        Ok(())
    }

    fn layer_norm_backward(
        &self,
        m: &mut HostMemory<'_>,
        dx: View,
        dgamma: View,
        dbeta: View,
        dy: View,
        x: View,
        norm: Norm,
        dim: usize,
        mode: DxMode,
    ) -> Result<()> {
        let ([dx, dg, db], [dy, x, g]) = m.split([dx, dgamma, dbeta], [dy, x, norm.gamma]);
        layernorm_backward(dx, dg, db, dy, x, g, dim, norm.eps, mode);
        Ok(())
    }

    fn linear(
        &self,
        m: &mut HostMemory<'_>,
        y: View,
        x: View,
        w: View,
        bias: Option<View>,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let ([y], [x, w, b]) = m.split([y], [x, w, view_or_empty(bias, w)]);
        linear(y, x, w, bias.map(|_| b), rows, k, n);
        Ok(())
    }

    fn linear_backward(
        &self,
        m: &mut HostMemory<'_>,
        dx: Option<View>,
        dw: View,
        db: Option<View>,
        dy: View,
        x: View,
        w: View,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        let ([dxs, dw, dbs], [dy, x, w]) = m.split([view_or_empty(dx, dy), dw, view_or_empty(db, dw)], [dy, x, w]);
        linear_backward(dx.map(|_| dxs), dw, db.map(|_| dbs), dy, x, w, rows, k, n);
        Ok(())
    }

    fn linear_gelu(
        &self,
        m: &mut HostMemory<'_>,
        pre: View,
        out: View,
        x: View,
        w: View,
        bias: View,
        rows: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        self.linear(m, pre, x, w, None, rows, k, n)?;
        if pre == out {
            let ([out], [b]) = m.split([out], [bias]);
            bias_gelu_inplace(out, Some(b), n);
        } else {
            // `pre` leaves with GELU'(pre + bias): the backward is then one multiply.
            let ([pre, out], [b]) = m.split([pre, out], [bias]);
            bias_gelu_saving_grad(pre, out, b);
        }
        Ok(())
    }

    fn gelu_backward(&self, m: &mut HostMemory<'_>, dpre: View, dbias: View, dout: View, pre: View) -> Result<bool> {
        let ([dpre, dbias], [dout, pre]) = m.split([dpre, dbias], [dout, pre]);
        gelu_backward_saved(dpre, dbias, dout, pre);
        Ok(true)
    }

    fn attention(
        &self,
        m: &mut HostMemory<'_>,
        ctx: View,
        saved: View,
        scratch: View,
        qkv: View,
        bias: Option<View>,
        shape: AttentionShape,
    ) -> Result<()> {
        let ([ctx, saved_s, scratch], [qkv, b]) = m.split([ctx, saved, scratch], [qkv, view_or_empty(bias, qkv)]);
        let bias = bias.map(|_| b);
        if saved.is_empty() {
            attention_forward(ctx, qkv, bias, shape, scratch);
        } else {
            attention_forward_saving_probs(ctx, qkv, bias, shape, saved_s);
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        m: &mut HostMemory<'_>,
        dqkv: View,
        dbias: Option<View>,
        dctx: View,
        qkv: View,
        _ctx: View,
        saved: View,
        _bias: Option<View>,
        shape: AttentionShape,
        scratch: View,
    ) -> Result<()> {
        if let Some(db) = dbias {
            m.split::<1, 0>([db], []).0[0].fill(0.0);
        }
        let ([dqkv, dbs, scratch], [dctx, qkv, probs]) =
            m.split([dqkv, view_or_empty(dbias, scratch), scratch], [dctx, qkv, saved]);
        attention_backward(dqkv, dbias.map(|_| dbs), dctx, qkv, probs, shape, scratch);
        Ok(())
    }

    fn residual(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        branch: Branch,
        dim: usize,
        norm: Option<Norm>,
    ) -> Result<()> {
        let Branch { x, y, bias, lambda, factors } = branch;
        let factor_view = factors.map_or(View::empty(bias.space), |f| f.factors);
        let lambda_view = view_or_empty(lambda, bias);
        if out == x {
            // In place: inference, which has no drop path.
            assert!(factors.is_none(), "an in-place residual with drop path factors");
            let ([out], [y, b, l]) = m.split([out], [y, bias, lambda_view]);
            residual_add(out, y, b, lambda.map(|_| l));
        } else {
            let ([o], [x, y, b, l, f]) = m.split([out], [x, y, bias, lambda_view, factor_view]);
            residual_add_into(o, x, y, b, lambda.map(|_| l), row_factors(factors, f));
        }
        match norm {
            Some(norm) => self.layer_norm(m, out, dim, norm),
            None => Ok(()),
        }
    }

    fn residual_backward(
        &self,
        m: &mut HostMemory<'_>,
        dy: View,
        dacc: View,
        branch: Branch,
        grads: BranchGrads,
        dim: usize,
    ) -> Result<(View, bool)> {
        let Branch { y, bias, lambda, factors, .. } = branch;
        let factor_view = factors.map_or(View::empty(bias.space), |f| f.factors);
        match (lambda, grads.dlambda) {
            (Some(l), Some(dl)) => {
                let ([dys, dl, db], [dacc, y, b, l, f]) =
                    m.split([dy, dl, grads.dbias], [dacc, y, bias, l, factor_view]);
                residual_add_backward(dys, Some(dl), Some(db), dacc, y, b, l, row_factors(factors, f));
                Ok((dy, true))
            }
            (None, None) if factors.is_none() => Ok((dacc, false)),
            (None, None) => {
                let ones = vec![1.0f32; dim];
                let ([dys, db], [dacc, y, b, f]) = m.split([dy, grads.dbias], [dacc, y, bias, factor_view]);
                residual_add_backward(dys, None, Some(db), dacc, y, b, &ones, row_factors(factors, f));
                Ok((dy, true))
            }
            _ => unreachable!("a layer scale and its gradient come together"),
        }
    }

    fn fill_zero(&self, m: &mut HostMemory<'_>, v: View) -> Result<()> {
        m.split::<1, 0>([v], []).0[0].fill(0.0);
        Ok(())
    }

    fn upload(&self, m: &mut HostMemory<'_>, dst: View, src: &[f32]) -> Result<()> {
        m.split::<1, 0>([dst], []).0[0].copy_from_slice(src);
        Ok(())
    }

    fn upload_indices(&self, m: &mut HostMemory<'_>, dst: View, src: &[usize]) -> Result<()> {
        m.arena.indices_mut(dst).copy_from_slice(src);
        Ok(())
    }

    fn download(&self, m: &mut HostMemory<'_>, src: View, dst: &mut [f32]) -> Result<()> {
        dst.copy_from_slice(m.split::<0, 1>([], [src]).1[0]);
        Ok(())
    }

    fn copy(&self, m: &mut HostMemory<'_>, dst: View, src: View) -> Result<()> {
        let ([d], [s]) = m.split([dst], [src]);
        d.copy_from_slice(s);
        Ok(())
    }

    fn add_into(&self, m: &mut HostMemory<'_>, dst: View, src: View) -> Result<()> {
        let ([d], [s]) = m.split([dst], [src]);
        add_into(d, s);
        Ok(())
    }

    fn relpos_bias(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        shared: Option<View>,
        table: View,
        index: View,
        heads: usize,
    ) -> Result<()> {
        let index = m.arena.indices(index).to_vec();
        let ([out], [shared_s, table]) = m.split([out], [view_or_empty(shared, out), table]);
        match shared {
            Some(_) => out.copy_from_slice(shared_s),
            None => out.fill(0.0),
        }
        let tt = index.len();
        assert_eq!(out.len(), heads * tt, "relpos_bias: bias length");
        for h in 0..heads {
            for (b, &i) in out[h * tt..(h + 1) * tt].iter_mut().zip(&index) {
                *b += table[i * heads + h];
            }
        }
        Ok(())
    }

    fn relpos_bias_backward(
        &self,
        m: &mut HostMemory<'_>,
        dtable: View,
        dbias: View,
        index: View,
        heads: usize,
    ) -> Result<()> {
        let index = m.arena.indices(index).to_vec();
        let ([dtable], [dbias]) = m.split([dtable], [dbias]);
        let tt = index.len();
        assert_eq!(dbias.len(), heads * tt, "relpos_bias_backward: bias length");
        for h in 0..heads {
            for (&g, &i) in dbias[h * tt..(h + 1) * tt].iter().zip(&index) {
                dtable[i * heads + h] += g;
            }
        }
        Ok(())
    }

    fn im2col(&self, m: &mut HostMemory<'_>, patches: View, pixels: View, shape: PatchEmbedShape) -> Result<()> {
        let ([patches], [pixels]) = m.split([patches], [pixels]);
        let PatchEmbedShape { channels: ch, height: hh, width: ww, patch_h: ph, patch_w: pw, .. } = shape;
        let (n, gw, k) = (shape.num_patches(), shape.grid().1, shape.patch_len());
        patches.par_chunks_mut(k).enumerate().for_each(|(row, dst)| {
            let (img, patch) = (row / n, row % n);
            let (py, px) = (patch / gw, patch % gw);
            for cc in 0..ch {
                for ky in 0..ph {
                    let src = ((img * ch + cc) * hh + py * ph + ky) * ww + px * pw;
                    dst[(cc * ph + ky) * pw..(cc * ph + ky + 1) * pw].copy_from_slice(&pixels[src..src + pw]);
                }
            }
        });
        Ok(())
    }

    fn assemble_tokens(
        &self,
        m: &mut HostMemory<'_>,
        x: View,
        embedded: View,
        tokens: TokenParams,
        mask: Option<View>,
        batch: usize,
        patches: usize,
        dim: usize,
    ) -> Result<()> {
        let mask = mask.map(|v| m.arena.indices(v).to_vec());
        let (n, d, t) = (patches, dim, patches + 1);
        let (mt, pos) = (view_or_empty(tokens.mask_token, tokens.cls), view_or_empty(tokens.positions, tokens.cls));
        let ([x], [embedded, cls, mask_token, pos_s]) = m.split([x], [embedded, tokens.cls, mt, pos]);
        for img in 0..batch {
            x[img * t * d..img * t * d + d].copy_from_slice(cls);
            for patch in 0..n {
                let dst = &mut x[(img * t + 1 + patch) * d..(img * t + 2 + patch) * d];
                let masked = mask.as_ref().is_some_and(|m| m[img * n + patch] == 1);
                match (masked, tokens.mask_token) {
                    (true, Some(_)) => dst.copy_from_slice(mask_token),
                    _ => dst.copy_from_slice(&embedded[(img * n + patch) * d..(img * n + patch + 1) * d]),
                }
            }
        }
        if tokens.positions.is_some() {
            x.par_chunks_mut(t * d).for_each(|img| {
                for (v, &q) in img.iter_mut().zip(pos_s) {
                    *v += q;
                }
            });
        }
        Ok(())
    }

    fn assemble_tokens_backward(
        &self,
        m: &mut HostMemory<'_>,
        dembedded: View,
        grads: TokenParams,
        dx: View,
        mask: Option<View>,
        batch: usize,
        patches: usize,
        dim: usize,
    ) -> Result<()> {
        let mask = mask.map(|v| m.arena.indices(v).to_vec());
        let (n, d, t) = (patches, dim, patches + 1);
        let (dmt, dpos) = (view_or_empty(grads.mask_token, grads.cls), view_or_empty(grads.positions, grads.cls));
        let ([dembedded, dcls, dmask_token, dpos_s], [dx]) = m.split([dembedded, grads.cls, dmt, dpos], [dx]);
        // Small sums, run in image order so the result does not depend on threads.
        for img in 0..batch {
            add_into(dcls, &dx[img * t * d..img * t * d + d]);
        }
        if grads.positions.is_some() {
            for img in 0..batch {
                add_into(dpos_s, &dx[img * t * d..(img + 1) * t * d]);
            }
        }
        // The mask token's gradient is summed apart, then added once.
        let mut dmask = grads.mask_token.map(|_| vec![0.0f32; d]);
        for img in 0..batch {
            for patch in 0..n {
                let src = &dx[(img * t + 1 + patch) * d..(img * t + 2 + patch) * d];
                let dst = &mut dembedded[(img * n + patch) * d..(img * n + patch + 1) * d];
                if mask.as_ref().is_some_and(|m| m[img * n + patch] == 1) {
                    if let Some(dm) = dmask.as_mut() {
                        add_into(dm, src);
                    }
                    dst.fill(0.0);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        }
        if let Some(dm) = dmask {
            add_into(dmask_token, &dm);
        }
        Ok(())
    }

    fn gather_rows(&self, m: &mut HostMemory<'_>, dst: View, src: View, rows: View, dim: usize) -> Result<()> {
        let rows = m.arena.indices(rows).to_vec();
        let ([dst], [src]) = m.split([dst], [src]);
        for (d, &r) in dst.chunks_exact_mut(dim).zip(&rows) {
            d.copy_from_slice(&src[r * dim..(r + 1) * dim]);
        }
        Ok(())
    }

    fn scatter_rows(&self, m: &mut HostMemory<'_>, dst: View, src: View, rows: View, dim: usize) -> Result<()> {
        let rows = m.arena.indices(rows).to_vec();
        let ([dst], [src]) = m.split([dst], [src]);
        dst.fill(0.0);
        for (s, &r) in src.chunks_exact(dim).zip(&rows) {
            dst[r * dim..(r + 1) * dim].copy_from_slice(s);
        }
        Ok(())
    }

    fn mean_patch_tokens(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        hidden: View,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        let ([mean], [hidden]) = m.split([out], [hidden]);
        let (t, d) = (tokens, dim);
        for (i, mv) in mean.chunks_exact_mut(d).enumerate() {
            mv.fill(0.0);
            for tok in 1..t {
                for (a, &v) in mv.iter_mut().zip(&hidden[(i * t + tok) * d..(i * t + tok + 1) * d]) {
                    *a += v;
                }
            }
            let inv = 1.0 / (t - 1) as f32;
            mv.iter_mut().for_each(|v| *v *= inv);
        }
        Ok(())
    }

    fn mean_patch_tokens_backward(
        &self,
        m: &mut HostMemory<'_>,
        dhidden: View,
        dout: View,
        tokens: usize,
        dim: usize,
    ) -> Result<()> {
        let ([h], [dout]) = m.split([dhidden], [dout]);
        let (t, d) = (tokens, dim);
        h.fill(0.0);
        // The mean spreads its gradient evenly over the patch tokens.
        let inv = 1.0 / (t - 1) as f32;
        for (img, g) in dout.chunks_exact(d).enumerate() {
            for tok in 1..t {
                for (r, &v) in h[(img * t + tok) * d..(img * t + tok + 1) * d].iter_mut().zip(g) {
                    *r = v * inv;
                }
            }
        }
        Ok(())
    }

    fn cross_entropy(
        &self,
        m: &mut HostMemory<'_>,
        logits: View,
        labels: View,
        classes: usize,
        smoothing: Option<f32>,
        total_rows: usize,
    ) -> Result<()> {
        let labels = m.arena.indices(labels).to_vec();
        let ([lg], []) = m.split([logits], []);
        let sum = match smoothing {
            None => cross_entropy_fused_part(lg, &labels, classes, total_rows),
            Some(eps) => smoothed_cross_entropy_fused_part(lg, &labels, classes, eps, total_rows),
        };
        m.loss += sum;
        Ok(())
    }

    fn mean_squared_error(
        &self,
        m: &mut HostMemory<'_>,
        pred: View,
        target: View,
        cols: usize,
        total_rows: usize,
    ) -> Result<()> {
        let ([pred], [target]) = m.split([pred], [target]);
        let sum = mse_fused_part(pred, target, cols, total_rows);
        m.loss += sum;
        Ok(())
    }

    fn take_loss(&self, m: &mut HostMemory<'_>) -> Result<f64> {
        Ok(std::mem::take(&mut m.loss))
    }
}
