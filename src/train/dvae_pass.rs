//! The tokenizer's training pass, written once over `ImageOps` + `CodeOps` for every device:
//! the CPU trainer (`train::dvae`) runs it on the host backend, the GPU driver
//! (`train::gpu_dvae`) on `CudaBackend`.

use crate::backend::code_ops::CodeOps;
use crate::backend::image_ops::ImageOps;
use crate::backend::memory::{Planner, View};
use crate::dvae::network::{DecoderPlan, DvaeNetworks, EncoderPlan};
use crate::error::Result;
use crate::model::params::ParamStore;

/// The views of one training step: the encoder's pass (whose logits the relaxation reads), the
/// relaxed codes, the gradients of codes and logits, and the decoder's pass on the codes. Both
/// devices plan it alike (a shared planner on the host, a split one on the GPU).
pub(crate) struct StepPlan {
    pub(crate) batch: usize,
    encoder: EncoderPlan,
    decoder: DecoderPlan,
    codes: View,
    dlogits: View,
}

impl StepPlan {
    pub(crate) fn new<B: ImageOps>(be: &B, nets: &DvaeNetworks, p: &mut Planner, batch: usize) -> Self {
        let decoder = nets.decoder.as_ref().expect("a trainer's tokenizer has a decoder");
        let encoder = nets.encoder.plan(be, p, batch, true);
        let codes = p.act(encoder.logits.len());
        let (dcodes, dlogits) = (p.act(codes.len()), p.act(codes.len()));
        let decoder = decoder.plan(be, p, batch, true, Some((codes, dcodes)));
        StepPlan { batch, encoder, decoder, codes, dlogits }
    }
}

/// The schedule's values at one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSettings {
    pub(crate) tau: f32,
    pub(crate) kl_weight: f32,
    pub(crate) seed: u64,
    pub(crate) step: u64,
}

/// What one training pass measured: the reconstruction's MSE and the KL (its weight not
/// applied).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassLosses {
    pub(crate) recon_mse: f64,
    pub(crate) kl: f64,
}

/// The one training pass of the tokenizer, on any backend: the batch of mapped pixels uploaded
/// into the encoder's input, encoder forward → Gumbel-softmax → decoder forward → the
/// reconstruction's mean squared error over every element, fused with its gradient (one row
/// per image, so the row means average to the mean over all pixels) → decoder backward →
/// the relaxation's backward → the KL to the uniform prior (its weighted gradient added) →
/// encoder backward. Parameter gradients are ADDED to the memory's gradient buffer (the caller
/// zeroes it); the hard codes of the batch (the logits' argmax) land in `tokens`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn training_pass<B: ImageOps + CodeOps>(
    be: &B,
    m: &mut B::Memory<'_>,
    nets: &DvaeNetworks,
    params: &ParamStore,
    plan: &StepPlan,
    mapped: &[f32],
    s: StepSettings,
    tokens: &mut Vec<u32>,
) -> Result<PassLosses> {
    let decoder = nets.decoder.as_ref().expect("a trainer's tokenizer has a decoder");
    let (enc, dec, batch) = (&plan.encoder, &plan.decoder, plan.batch);
    let vocab = nets.encoder.output.n_out;
    be.upload(m, enc.input(), mapped)?;
    nets.encoder.forward_views(be, m, params, enc, batch)?;
    be.gumbel_softmax(m, plan.codes, enc.logits, vocab, s.tau, s.seed, s.step)?;
    decoder.forward_views(be, m, params, dec, batch)?;

    // The encoder's input still holds the pixels: the target. The loss op overwrites its
    // prediction with the gradient, so it works on a copy in the decoder's output gradient.
    let (recon, dpixels) = (dec.output(), dec.dpixels());
    be.copy(m, dpixels, recon)?;
    be.mean_squared_error(m, dpixels, enc.input(), recon.len() / batch, batch)?;
    let recon_mse = be.take_loss(m)? / batch as f64;

    decoder.backward_views(be, m, params, dec, batch)?;
    be.gumbel_softmax_backward(m, plan.dlogits, plan.codes, dec.dcodes(), vocab, s.tau)?;
    be.kl_to_uniform(m, enc.logits, Some(plan.dlogits), vocab, s.kl_weight)?;
    let kl = be.take_loss(m)?;
    nets.encoder.backward_views(be, m, params, enc, plan.dlogits, batch)?;
    tokens.resize(enc.logits.len() / vocab, 0);
    be.argmax_rows(m, enc.logits, vocab, tokens)?;
    Ok(PassLosses { recon_mse, kl })
}
