//! `CodeOps`: the ops of the tokenizer's discrete bottleneck, on token-major code logits
//! (`[rows, vocab]`, one row per grid position) in planned [`View`]s: the Gumbel-softmax
//! relaxation and its backward, the KL divergence of the code distribution to the uniform prior,
//! and the hard argmax that tokenizes. Deterministic for any thread count, as every op.

use super::memory::View;
use super::ops::Backend;
use crate::error::Result;

/// The code ops. A backend offers them beside [`Backend`]'s.
pub trait CodeOps: Backend {
    /// Relaxed one-hot codes `out = softmax((logits + g) / tau)` per row of `vocab`, with `g`
    /// standard Gumbel noise drawn from (`seed`, `step`, row): the same noise for any thread
    /// count.
    #[allow(clippy::too_many_arguments)]
    fn gumbel_softmax(
        &self,
        m: &mut Self::Memory<'_>,
        out: View,
        logits: View,
        vocab: usize,
        tau: f32,
        seed: u64,
        step: u64,
    ) -> Result<()>;

    /// Backward of [`CodeOps::gumbel_softmax`] from its output `y`: `dlogits = (1/τ) · y ⊙ (dy −
    /// Σ y·dy)` (the noise is a constant), written.
    fn gumbel_softmax_backward(
        &self,
        m: &mut Self::Memory<'_>,
        dlogits: View,
        y: View,
        dy: View,
        vocab: usize,
        tau: f32,
    ) -> Result<()>;

    /// The mean over rows of `KL(softmax(logits) ‖ uniform)`, added to the memory's loss
    /// ([`Backend::take_loss`]); with `dlogits`, `weight ·` its gradient added there.
    fn kl_to_uniform(
        &self,
        m: &mut Self::Memory<'_>,
        logits: View,
        dlogits: Option<View>,
        vocab: usize,
        weight: f32,
    ) -> Result<()>;

    /// The index of each row's largest logit (the first on ties, like `torch.argmax`), into
    /// host memory.
    fn argmax_rows(&self, m: &mut Self::Memory<'_>, logits: View, vocab: usize, out: &mut [u32]) -> Result<()>;
}
