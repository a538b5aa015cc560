//! The tokenizer on the GPU: the one training pass (`train::dvae_pass::training_pass`: encoder,
//! Gumbel-softmax, decoder, reconstruction MSE, KL and their backwards, written once over
//! `ImageOps` + `CodeOps`), the one tokenizing pass (`Encoder::tokens_views`) and the one
//! decoding pass (`Decoder::decode_views`) on the CUDA backend in fp32, with the parameters,
//! gradients and AdamW state on the device.
//!
//! A step uploads the batch and reads back the reconstruction's MSE, the KL (8 bytes each) and
//! the hard codes (for the perplexity); the optimizer step (`train::optimizer::apply_update`,
//! the CPU trainers' own, over [`DeviceUpdate`]) reads back the gradient norm (8 bytes) to
//! refuse a non-finite step before anything changes. No atomics: two runs give the same bits.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use super::adamw::{AdamW, DecayPlan};
use super::dvae_pass::{training_pass, PassLosses, StepPlan, StepSettings};
use super::gpu_update::DeviceUpdate;
use super::optimizer::{apply_update, NonFiniteGradient};
use crate::backend::cuda::adamw::GpuAdamW;
use crate::backend::cuda::device::driver_error;
use crate::backend::cuda::{CudaBackend, CudaDevice, CudaMemory, DeviceArena, DeviceParams, Scratch};
use crate::backend::memory::Planner;
use crate::dvae::network::{DecoderPlan, EncoderPlan};
use crate::dvae::Dvae;
use crate::error::Result;
use crate::model::params::ParamStore;

/// A tokenizer's parameters on the GPU and the memory of its last tokenizing and decoding
/// passes: the tokenizer's device for inference (fp32).
pub struct GpuTokenizer {
    be: CudaBackend<f32>,
    params: DeviceParams<f32>,
    /// The tokenizing plan and arena of the last chunk size.
    pass: Option<(usize, EncoderPlan, DeviceArena<f32>)>,
    /// The decoding plan and arena of the last chunk size.
    decode_pass: Option<(usize, DecoderPlan, DeviceArena<f32>)>,
}

impl std::fmt::Debug for GpuTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTokenizer").field("parameters", &self.params.len()).finish()
    }
}

impl Drop for GpuTokenizer {
    fn drop(&mut self) {
        // Before the buffers go: it may be dropped on a thread that never ran CUDA.
        self.be.device().make_current();
    }
}

impl GpuTokenizer {
    /// Uploads `dvae`'s parameters. `Unsupported` when CUDA is not usable.
    pub fn new(dvae: &Dvae) -> Result<Self> {
        let dev = CudaDevice::get()?;
        let params = DeviceParams::upload(&dev, &dvae.params.data)?;
        Ok(GpuTokenizer { be: CudaBackend::new(dev), params, pass: None, decode_pass: None })
    }

    /// Replaces the device parameters with `store`'s (same tokenizer).
    pub fn set_params(&mut self, store: &ParamStore) -> Result<()> {
        ensure!(store.data.len() == self.params.len(), InvalidArgument, "set_params: another tokenizer");
        let dev = self.be.device().clone();
        self.params.set(&dev, &store.data)
    }

    /// Visual tokens `[B, P]` of mapped pixels `[B, C, H, W]`, as [`Dvae::tokenize`] gives them:
    /// `dvae` is the tokenizer these parameters belong to (its networks and layout; its host
    /// values are not read). Chunks of images as on the CPU.
    pub fn tokenize(&mut self, dvae: &Dvae, mapped: &[f32]) -> Result<Vec<u32>> {
        ensure!(dvae.params.data.len() == self.params.len(), InvalidArgument, "tokenize: another tokenizer");
        dvae.check_pixels(mapped)?;
        let per = dvae.image_len();
        let chunk_images = dvae.chunk_images().min(mapped.len() / per);
        let mut tokens = Vec::with_capacity(mapped.len() / per * dvae.config.tokens_per_image());
        for chunk in mapped.chunks(per * chunk_images) {
            let images = chunk.len() / per;
            if self.pass.as_ref().is_none_or(|(b, _, _)| *b != images) {
                self.pass = None; // free the old arena first
                let mut p = Planner::split();
                let plan = dvae.nets.encoder.plan(&self.be, &mut p, images, false);
                let arena = DeviceArena::new(self.be.device(), &p, Scratch::default())?;
                self.pass = Some((images, plan, arena));
            }
            let (_, plan, arena) = self.pass.as_mut().expect("planned above");
            let mut m = CudaMemory::new(self.be.device(), arena, &self.params, None)?;
            dvae.nets.encoder.tokens_views(&self.be, &mut m, &dvae.params, plan, chunk, images, &mut tokens)?;
        }
        Ok(tokens)
    }

    /// Mapped pixels `[B, C, H, W]` of hard tokens `[B, P]`, as [`Dvae::decode`] gives them
    /// (the same checks and budget, the same chunks, the one decoding pass
    /// `Decoder::decode_views`): `dvae` is the tokenizer these parameters belong to (its
    /// networks and layout; its host values are not read).
    pub fn decode(&mut self, dvae: &Dvae, tokens: &[u32]) -> Result<Vec<f32>> {
        ensure!(dvae.params.data.len() == self.params.len(), InvalidArgument, "decode: another tokenizer");
        let (decoder, chunk_images) = dvae.decode_chunks(tokens)?;
        let p = dvae.config.tokens_per_image();
        let mut pixels = Vec::with_capacity(tokens.len() / p * dvae.image_len());
        for chunk in tokens.chunks(p * chunk_images) {
            let images = chunk.len() / p;
            if self.decode_pass.as_ref().is_none_or(|(b, _, _)| *b != images) {
                self.decode_pass = None; // free the old arena first
                let mut planner = Planner::split();
                let plan = decoder.plan(&self.be, &mut planner, images, false, None);
                let arena = DeviceArena::new(self.be.device(), &planner, Scratch::default())?;
                self.decode_pass = Some((images, plan, arena));
            }
            let (_, plan, arena) = self.decode_pass.as_mut().expect("planned above");
            let mut m = CudaMemory::new(self.be.device(), arena, &self.params, None)?;
            decoder.decode_views(&self.be, &mut m, &dvae.params, plan, chunk, images, &mut pixels)?;
        }
        Ok(pixels)
    }
}

/// The tokenizer trainer's device state: parameters (in [`GpuTokenizer`], which also
/// tokenizes), gradients, AdamW, and the planned memory of a step on the last batch size.
pub(crate) struct GpuDvae {
    tokenizer: GpuTokenizer,
    grads: CudaSlice<f32>,
    adamw: GpuAdamW,
    /// The norm pass's [Σg², ‖g‖].
    norm: CudaSlice<f64>,
    pass: Option<(StepPlan, DeviceArena<f32>)>,
}

impl Drop for GpuDvae {
    fn drop(&mut self) {
        self.tokenizer.be.device().make_current();
    }
}

impl GpuDvae {
    /// Uploads `dvae`'s parameters and `opt`'s state (moments, step count, settings; the decay
    /// rule is BEiT's, as [`AdamW::new`] builds it).
    pub(crate) fn new(dvae: &Dvae, opt: &AdamW) -> Result<Self> {
        let tokenizer = GpuTokenizer::new(dvae)?;
        let dev = tokenizer.be.device().clone();
        let decay = DecayPlan::beit(&dvae.params)?;
        let mut adamw = GpuAdamW::new(&dev, opt.config, &decay.mask, &decay.trained)?;
        dev.upload_into(&opt.exp_avg, &mut adamw.exp_avg)?;
        dev.upload_into(&opt.exp_avg_sq, &mut adamw.exp_avg_sq)?;
        adamw.step = opt.step;
        let grads = dev.zeros(dvae.params.data.len())?;
        let norm = dev.zeros(2)?;
        Ok(GpuDvae { tokenizer, grads, adamw, norm, pass: None })
    }

    fn device(&self) -> &Arc<CudaDevice> {
        self.tokenizer.be.device()
    }

    /// [`training_pass`] on the device for `batch` images of `mapped` (checked by the caller):
    /// the gradients (zeroed first) stay on the device.
    pub(crate) fn forward_backward(
        &mut self,
        dvae: &Dvae,
        mapped: &[f32],
        batch: usize,
        s: StepSettings,
        tokens: &mut Vec<u32>,
    ) -> Result<PassLosses> {
        let GpuDvae { tokenizer, grads, pass, .. } = self;
        let be = &tokenizer.be;
        if pass.as_ref().is_none_or(|(p, _)| p.batch != batch) {
            *pass = None; // free the old arena first
            let mut p = Planner::split();
            let plan = StepPlan::new(be, &dvae.nets, &mut p, batch);
            let c = &dvae.config;
            let rows = batch * c.tokens_per_image();
            let n_init = c.decoder_n_init.expect("a trainer's tokenizer has a decoder");
            // Bias gradients of the two pointwise layers (column sums) and the MSE's row losses.
            let scratch =
                Scratch::default().linear_backward(rows, c.vocab_size).linear_backward(rows, n_init).loss(batch);
            *pass = Some((plan, DeviceArena::new(be.device(), &p, scratch)?));
        }
        let (plan, arena) = pass.as_mut().expect("planned above");
        be.device().stream().memset_zeros(grads).map_err(|e| driver_error("memset", e))?;
        let mut m = CudaMemory::new(be.device(), arena, &tokenizer.params, Some(grads))?;
        training_pass(be, &mut m, &dvae.nets, &dvae.params, plan, mapped, s, tokens)
    }

    /// One optimizer step at `lr` on the last pass's gradients (no clipping, as the CPU's
    /// tokenizer step): the inner `Err` when the gradient norm is not finite (nothing changed).
    pub(crate) fn apply(&mut self, lr: f32) -> Result<std::result::Result<f64, NonFiniteGradient>> {
        let dev = self.tokenizer.be.device().clone();
        let mut target = DeviceUpdate {
            dev: &dev,
            params: &mut self.tokenizer.params,
            grads: &mut self.grads,
            adamw: &mut self.adamw,
            lr_scale: None,
            norm: &mut self.norm,
        };
        apply_update(&mut target, lr, None)
    }

    /// The gradients of the last pass into `out` (laid out like the parameters).
    pub(crate) fn download_grads(&self, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&self.device().download(&self.grads)?);
        Ok(())
    }

    /// The device parameters into `store`.
    pub(crate) fn download_params(&self, store: &mut ParamStore) -> Result<()> {
        ensure!(store.data.len() == self.tokenizer.params.len(), InvalidArgument, "download_params: another tokenizer");
        store.data.copy_from_slice(&self.device().download(self.tokenizer.params.master())?);
        Ok(())
    }

    /// The AdamW moments and step count into `opt`.
    pub(crate) fn download_optimizer(&self, opt: &mut AdamW) -> Result<()> {
        opt.exp_avg = self.device().download(&self.adamw.exp_avg)?;
        opt.exp_avg_sq = self.device().download(&self.adamw.exp_avg_sq)?;
        opt.step = self.adamw.step;
        Ok(())
    }

    /// Tokens of mapped pixels with the device parameters (see [`GpuTokenizer::tokenize`]).
    pub(crate) fn tokenize(&mut self, dvae: &Dvae, mapped: &[f32]) -> Result<Vec<u32>> {
        self.tokenizer.tokenize(dvae, mapped)
    }
}
