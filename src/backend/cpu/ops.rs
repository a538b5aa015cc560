//! The CPU backend as a [`Backend`]: each op resolves its views in host memory
//! ([`HostMemory::split`], which refuses overlapping writes) and calls this backend's function
//! for it. What the CPU keeps for backwards: attention probabilities and GELU's derivative (each
//! backward is then one pass); layer norms keep nothing (their backward recomputes mean and rstd
//! from the input, cheaper than reading them).

use super::attention::attention_forward;
use super::attention_backward::{attention_backward, attention_backward_scratch_len, attention_forward_saving_probs};
use super::backward::{gelu_backward_saved, layernorm_backward, linear_backward, residual_add_backward};
use super::elementwise::{bias_gelu_inplace, bias_gelu_saving_grad, residual_add, residual_add_into, RowFactors};
use super::gemm::linear;
use super::layernorm::layernorm;
use crate::backend::memory::{HostMemory, View};
use crate::backend::ops::{Backend, Branch, BranchGrads, DxMode, Norm, RowScale};
use crate::backend::shapes::AttentionShape;
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
}
