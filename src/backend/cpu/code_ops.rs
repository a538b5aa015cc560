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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::{Arena, Planner};
    use crate::backend::Backend;

    #[test]
    fn kl_goes_to_the_loss_and_adds_its_gradient() {
        let (vocab, rows) = (4, 3);
        let logits: Vec<f32> = (0..rows * vocab).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.4).collect();
        let mut plan = Planner::shared();
        let (l, d) = (plan.act(logits.len()), plan.act(logits.len()));
        let mut arena = Arena::new(&plan).unwrap();
        let mut m = HostMemory::new(&mut arena, &[], &mut []);
        Cpu.upload(&mut m, l, &logits).unwrap();
        Cpu.upload(&mut m, d, &[1.0; 12]).unwrap();
        Cpu.kl_to_uniform(&mut m, l, Some(d), vocab, 0.5).unwrap();
        let kl = Cpu.take_loss(&mut m).unwrap();
        let mut got = vec![0.0; 12];
        Cpu.download(&mut m, d, &mut got).unwrap();
        let mut want = vec![1.0; 12];
        assert_eq!(kl, kl_to_uniform(&logits, vocab, 0.5, Some(&mut want)));
        assert_eq!(got, want);
        let mut tokens = [9u32; 3];
        Cpu.argmax_rows(&mut m, l, vocab, &mut tokens).unwrap();
        assert_eq!(tokens.to_vec(), super::super::relaxation::argmax_rows(&logits, vocab));
        assert_eq!(Cpu.take_loss(&mut m).unwrap(), 0.0);
    }
}
