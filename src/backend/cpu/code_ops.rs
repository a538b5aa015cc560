//! The CPU backend's [`CodeOps`]: each op resolves its views in host memory and calls the
//! kernels of relaxation.rs.

use super::ops::Cpu;
use super::relaxation::{argmax_rows_into, gumbel_softmax, gumbel_softmax_backward, kl_to_uniform};
use crate::backend::code_ops::CodeOps;
use crate::backend::memory::{HostMemory, View};
use crate::error::Result;

impl CodeOps for Cpu {
    fn gumbel_softmax(
        &self,
        m: &mut HostMemory<'_>,
        out: View,
        logits: View,
        vocab: usize,
        tau: f32,
        seed: u64,
        step: u64,
    ) -> Result<()> {
        let ([out], [logits]) = m.split([out], [logits]);
        gumbel_softmax(logits, vocab, tau, seed, step, out);
        Ok(())
    }

    fn gumbel_softmax_backward(
        &self,
        m: &mut HostMemory<'_>,
        dlogits: View,
        y: View,
        dy: View,
        vocab: usize,
        tau: f32,
    ) -> Result<()> {
        let ([dlogits], [y, dy]) = m.split([dlogits], [y, dy]);
        gumbel_softmax_backward(y, dy, vocab, tau, dlogits);
        Ok(())
    }

    fn kl_to_uniform(
        &self,
        m: &mut HostMemory<'_>,
        logits: View,
        dlogits: Option<View>,
        vocab: usize,
        weight: f32,
    ) -> Result<()> {
        let ([d], [logits]) = m.split([dlogits.unwrap_or(View::empty(logits.space))], [logits]);
        let kl = kl_to_uniform(logits, vocab, weight, dlogits.map(|_| d));
        m.loss += kl;
        Ok(())
    }

    fn argmax_rows(&self, m: &mut HostMemory<'_>, logits: View, vocab: usize, out: &mut [u32]) -> Result<()> {
        let ([], [logits]) = m.split([], [logits]);
        argmax_rows_into(logits, vocab, out);
        Ok(())
    }
}
