//! The CUDA backend's [`CodeOps`] (the tokenizer's discrete bottleneck) over a pass's planned
//! views, fp32 storage: each op resolves its views in the [`CudaMemory`] and calls
//! `relaxation.rs` (`cuda/relaxation.cu`). The CPU's implementation (`backend::cpu::code_ops`)
//! is the reference (tests/cuda_relaxation.rs runs both through the trait).
//!
//! Scratch (the KL's per-row sums, the argmax's tokens) is allocated per call, sized by the row
//! count; planning it is issue 20's "no per-call device allocation".

use cudarc::driver::DevicePtr;

use super::image_ops::f32_view;
use super::ops::{check_views, CudaBackend, CudaMemory, DeviceView};
use crate::backend::code_ops::CodeOps;
use crate::backend::memory::View;
use crate::error::Result;

impl CodeOps for CudaBackend<f32> {
    fn gumbel_softmax(
        &self,
        m: &mut CudaMemory<'_, f32>,
        out: View,
        logits: View,
        vocab: usize,
        tau: f32,
        seed: u64,
        step: u64,
    ) -> Result<()> {
        check_views("gumbel_softmax", &[out], &[logits]);
        self.device().gumbel_softmax(&f32_view(m, logits), &mut f32_view(m, out), vocab, tau, seed, step)
    }

    fn gumbel_softmax_backward(
        &self,
        m: &mut CudaMemory<'_, f32>,
        dlogits: View,
        y: View,
        dy: View,
        vocab: usize,
        tau: f32,
    ) -> Result<()> {
        check_views("gumbel_softmax_backward", &[dlogits], &[y, dy]);
        self.device().gumbel_softmax_backward(&f32_view(m, y), &f32_view(m, dy), &mut f32_view(m, dlogits), vocab, tau)
    }

    fn kl_to_uniform(
        &self,
        m: &mut CudaMemory<'_, f32>,
        logits: View,
        dlogits: Option<View>,
        vocab: usize,
        weight: f32,
    ) -> Result<()> {
        check_views("kl_to_uniform", &[dlogits.unwrap_or(View::empty(logits.space))], &[logits]);
        let rows = logits.len / vocab.max(1);
        let dev = self.device();
        let parts = self.scratch::<f64>(rows)?;
        let mut parts_view = DeviceView::<f64>::raw(parts.device_ptr(dev.stream()).0, rows, dev.stream().clone());
        let mut d = dlogits.map(|v| f32_view(m, v));
        // The CPU weighs each row by weight / rows (in f32).
        let per_row = weight / rows.max(1) as f32;
        dev.kl_to_uniform_rows(
            &f32_view(m, logits),
            d.as_mut().map(|v| v as &mut dyn cudarc::driver::DevicePtrMut<f32>),
            &mut parts_view,
            vocab,
            per_row,
        )?;
        dev.kl_finish(&mut m.loss(), &parts_view, vocab)?;
        // Freed in stream order, after the kernels that use it.
        drop(parts);
        Ok(())
    }

    fn argmax_rows(&self, m: &mut CudaMemory<'_, f32>, logits: View, vocab: usize, out: &mut [u32]) -> Result<()> {
        let dev = self.device();
        let mut tokens = self.scratch::<u32>(out.len())?;
        dev.argmax_rows(&f32_view(m, logits), &mut tokens, vocab)?;
        let host = dev.download(&tokens)?;
        out.copy_from_slice(&host[..out.len()]);
        Ok(())
    }
}
