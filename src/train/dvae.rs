//! Training a dVAE, as DALL-E trains its tokenizer (Ramesh et al. 2021, §2.1 and appendix A.2),
//! at a size that fits a CPU: the encoder's code logits go through a Gumbel-softmax relaxation
//! whose temperature anneals from 1 towards 1/16, the decoder reconstructs the (mapped) image
//! from the relaxed codes, and the loss is the reconstruction's mean squared error plus a
//! weighted KL divergence of the code distribution to the uniform prior, whose weight warms up
//! from 0. DALL-E uses a logit-Laplace likelihood; plain squared error is simpler and works on
//! the small grey images this trains on. AdamW with a warmup + cosine learning rate.

use super::adamw::{AdamW, AdamWConfig};
use super::dvae_pass::{training_pass, PassLosses, StepPlan, StepSettings};
use super::gpu_dvae::GpuDvae;
use super::optimizer::{apply_update, HostUpdate, NonFiniteGradient};
use super::schedule::CosineSchedule;
use crate::backend::memory::{Arena, HostMemory, Planner};
use crate::context::{host_backend, Context, Device};
use crate::dvae::relaxation::perplexity;
use crate::dvae::Dvae;
use crate::error::{Error, Result};
use crate::resources::{try_zeroed, Bytes, Need};

#[derive(Debug, Clone, PartialEq)]
pub struct DvaeTrainOptions {
    /// Optimizer steps the schedules span.
    pub total_steps: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    /// Gumbel-softmax temperature: exponential decay from `tau_start` to `tau_end` over
    /// `tau_anneal_steps` (DALL-E: 1 → 1/16).
    pub tau_start: f32,
    pub tau_end: f32,
    pub tau_anneal_steps: usize,
    /// Final KL weight, reached linearly over `kl_warmup_steps` from 0.
    pub kl_weight: f32,
    pub kl_warmup_steps: usize,
    /// Seeds the Gumbel noise (initialisation is seeded by [`Dvae::new`]).
    pub seed: u64,
}

impl DvaeTrainOptions {
    /// Defaults for `total_steps` steps: lr 1e-3 to 1e-5 after a 5% warmup, weight decay 1e-4,
    /// temperature 1 → 1/8 over the first 70% of steps, KL weight 5e-3 reached after 20%.
    /// DALL-E anneals to 1/16 over 150k steps; in a few hundred steps, a floor of 1/8 with the
    /// stronger KL weight kept codebook usage up (Fashion-MNIST, 512 codes, 300 steps: 1/16 and
    /// 1e-3 used 30 codes at perplexity 7; 1/4 and 5e-3 used 140 at perplexity 18 but
    /// reconstructed worse from hard tokens).
    pub fn for_steps(total_steps: usize) -> Self {
        DvaeTrainOptions {
            total_steps,
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: (total_steps / 20).max(1),
            weight_decay: 1e-4,
            tau_start: 1.0,
            tau_end: 0.125,
            tau_anneal_steps: ((total_steps as u128 * 7 / 10) as usize).max(1),
            kl_weight: 5e-3,
            kl_warmup_steps: (total_steps / 5).max(1),
            seed: 0,
        }
    }

    /// Refuses values no run can train with, naming the field: a schedule of no steps, a
    /// negative or non-finite learning rate, weight decay or KL weight, a temperature that is
    /// not positive and finite.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.total_steps > 0, InvalidArgument, "total_steps must be positive");
        for (name, value) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("kl_weight", self.kl_weight),
        ] {
            ensure!(value.is_finite() && value >= 0.0, InvalidArgument, "{name} must be finite and >= 0, got {value}");
        }
        for (name, value) in [("tau_start", self.tau_start), ("tau_end", self.tau_end)] {
            ensure!(
                value.is_finite() && value > 0.0,
                InvalidArgument,
                "{name} (a Gumbel-softmax temperature) must be finite and > 0, got {value}"
            );
        }
        Ok(())
    }

    pub fn tau(&self, step: usize) -> f32 {
        let t = if self.tau_anneal_steps == 0 { 1.0 } else { (step as f64 / self.tau_anneal_steps as f64).min(1.0) };
        (self.tau_start as f64 * (self.tau_end as f64 / self.tau_start as f64).powf(t)) as f32
    }

    pub fn kl_weight_at(&self, step: usize) -> f32 {
        if self.kl_warmup_steps == 0 {
            return self.kl_weight;
        }
        self.kl_weight * (step as f32 / self.kl_warmup_steps as f32).min(1.0)
    }

    fn schedule(&self) -> CosineSchedule {
        CosineSchedule {
            base_value: self.lr as f64,
            final_value: self.min_lr as f64,
            total_steps: self.total_steps,
            warmup_steps: self.warmup_steps,
        }
    }
}

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DvaeStepStats {
    pub step: usize,
    /// `recon_mse + kl_weight · kl`.
    pub loss: f64,
    /// Mean squared error of the reconstruction from relaxed codes, in mapped-pixel units.
    pub recon_mse: f64,
    /// Mean KL of the code distribution to uniform, per grid position (nats).
    pub kl: f64,
    /// Perplexity of the hard codes (encoder argmax) over this batch.
    pub perplexity: f64,
    pub tau: f32,
    pub lr: f32,
}

pub struct DvaeTrainer {
    pub dvae: Dvae,
    pub options: DvaeTrainOptions,
    optimizer: AdamW,
    grads: Vec<f32>,
    step: usize,
    /// The memory of a step on the last batch size, kept across steps so its pages are faulted
    /// in once (the code-sized buffers `[B·P, V]` are 134 MB each at 8192 codes and batch 64).
    pass: Option<(StepPlan, Arena)>,
    /// The hard codes of the last step.
    tokens: Vec<u32>,
    /// The step on the GPU ([`DvaeTrainer::use_cuda`]): parameters, gradients and AdamW state
    /// live there, and every step copies the parameters back into `dvae`.
    gpu: Option<GpuDvae>,
}

impl DvaeTrainer {
    pub fn new(dvae: Dvae, options: DvaeTrainOptions) -> Result<Self> {
        ensure!(dvae.config.has_decoder(), InvalidArgument, "training a tokenizer needs a decoder (decoder_n_init)");
        options.validate()?;
        let n = dvae.params.data.len();
        // Gradients and AdamW's two moments, each as large as the parameters.
        Need::new(
            format!("the tokenizer trainer's gradients and optimizer state ({n} parameters)"),
            Bytes::floats(&[3, n]),
        )
        .check()?;
        let grads = try_zeroed(n, "the tokenizer's gradients")?;
        let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: options.weight_decay };
        let optimizer = AdamW::new(&dvae.params, config)?;
        Ok(DvaeTrainer { dvae, options, optimizer, grads, step: 0, pass: None, tokens: Vec::new(), gpu: None })
    }

    /// Runs the steps on the GPU from now on (fp32): the parameters and the optimizer state
    /// move to the device, and every step copies the parameters back into
    /// [`DvaeTrainer::dvae`] (the device holds the parameters from now on: values written into
    /// `dvae.params` by the caller are not seen by the next step). `Unsupported` without a
    /// usable GPU.
    pub fn use_cuda(&mut self) -> Result<()> {
        if self.gpu.is_none() {
            self.gpu = Some(GpuDvae::new(&self.dvae, &self.optimizer)?);
        }
        Ok(())
    }

    /// Follows `ctx`'s device: a cuda context moves the steps to the GPU (an error, never a CPU
    /// run, when that fails).
    pub fn use_context(&mut self, ctx: &Context) -> Result<()> {
        if ctx.device() == Device::Cuda {
            self.use_cuda()?;
        }
        Ok(())
    }

    /// Whether the steps run on the GPU.
    pub fn on_cuda(&self) -> bool {
        self.gpu.is_some()
    }

    /// Visual tokens of mapped pixels `[B, C, H, W]` with the current parameters, on the
    /// trainer's device (as [`Dvae::tokenize`]).
    pub fn tokenize(&mut self, mapped: &[f32]) -> Result<Vec<u32>> {
        match &mut self.gpu {
            Some(gpu) => gpu.tokenize(&self.dvae, mapped),
            None => self.dvae.tokenize(mapped),
        }
    }

    /// The AdamW state as of the last step (read from the device on the GPU).
    pub fn optimizer_state(&self) -> Result<AdamW> {
        let mut opt = self.optimizer.clone();
        if let Some(gpu) = &self.gpu {
            gpu.download_optimizer(&mut opt)?;
        }
        Ok(opt)
    }

    pub fn step_count(&self) -> usize {
        self.step
    }
    /// Memory of one training step on `batch` images, estimated from above: the encoder's and
    /// the decoder's training passes, the four code-sized buffers `[B·P, V]` (logits, relaxed
    /// codes and their gradients) and the reconstruction with its gradient.
    pub fn step_bytes(&self, batch: usize) -> Bytes {
        let c = &self.dvae.config;
        let nets = &self.dvae.nets;
        let decoder = nets.decoder.as_ref().map_or(Bytes::ZERO, |d| d.pass_bytes_on_codes(batch, true));
        nets.encoder.pass_bytes(batch, true)
            + decoder
            + Bytes::floats(&[4, batch, c.tokens_per_image(), c.vocab_size])
            + Bytes::floats(&[2, batch, self.dvae.image_len()])
    }

    /// Tests a training step on `batch` images against the memory budget, so a run can refuse
    /// its batch size before it starts (every step also tests it).
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        ensure!(batch > 0, InvalidArgument, "a tokenizer training batch needs at least one image, got 0");
        let c = &self.dvae.config;
        Need::new(
            format!(
                "a tokenizer training step on {batch} image(s) of {}x{}x{} ({} codes)",
                c.in_channels, c.image_size, c.image_size, c.vocab_size
            ),
            self.step_bytes(batch),
        )
        .hint("use a smaller batch")
        .check()
    }

    /// Loss and gradients of one batch of mapped pixels `[B, C, H, W]` at the current step's
    /// temperature and KL weight, without changing any parameter (gradients land in
    /// [`DvaeTrainer::gradients`], read back from the device on the GPU).
    pub fn forward_backward(&mut self, mapped: &[f32]) -> Result<DvaeStepStats> {
        let stats = self.pass(mapped)?;
        if let Some(gpu) = &self.gpu {
            gpu.download_grads(&mut self.grads)?;
        }
        Ok(stats)
    }

    /// The training pass on the trainer's device; the gradients stay where it ran.
    fn pass(&mut self, mapped: &[f32]) -> Result<DvaeStepStats> {
        let batch = self.dvae.check_pixels(mapped)?;
        let (o, step) = (&self.options, self.step);
        let s = StepSettings { tau: o.tau(step), kl_weight: o.kl_weight_at(step), seed: o.seed, step: step as u64 };
        let losses = match &mut self.gpu {
            Some(gpu) => gpu.forward_backward(&self.dvae, mapped, batch, s, &mut self.tokens)?,
            None => {
                self.check_batch(batch)?;
                let be = host_backend();
                let nets = &self.dvae.nets;
                if self.pass.as_ref().is_none_or(|(p, _)| p.batch != batch) {
                    self.pass = None; // free the old memory before planning the new
                    let mut p = Planner::shared();
                    let plan = StepPlan::new(&be, nets, &mut p, batch);
                    self.pass = Some((plan, Arena::new(&p)?));
                }
                let (plan, arena) = self.pass.as_mut().expect("planned above");
                self.grads.fill(0.0);
                let mut m = HostMemory::new(arena, &self.dvae.params.data, &mut self.grads);
                training_pass(&be, &mut m, nets, &self.dvae.params, plan, mapped, s, &mut self.tokens)?
            }
        };
        let PassLosses { recon_mse, kl } = losses;
        let ppl = perplexity(&self.tokens, self.dvae.config.vocab_size);
        let lr = o.schedule().value(step) as f32;
        let loss = recon_mse + s.kl_weight as f64 * kl;
        Ok(DvaeStepStats { step, loss, recon_mse, kl, perplexity: ppl, tau: s.tau, lr })
    }

    /// The gradients of the last [`DvaeTrainer::forward_backward`], laid out like the parameters.
    pub fn gradients(&self) -> &[f32] {
        &self.grads
    }

    /// One AdamW step on a batch of mapped pixels `[B, C, H, W]`. A non-finite loss or
    /// gradient changes nothing and returns [`Error::Numerical`].
    pub fn step(&mut self, mapped: &[f32]) -> Result<DvaeStepStats> {
        let stats = self.pass(mapped)?;
        let non_finite = || Error::Numerical(format!("tokenizer step {}: non-finite loss or gradient", self.step));
        if !stats.loss.is_finite() {
            return Err(non_finite());
        }
        let applied: std::result::Result<f64, NonFiniteGradient> = match &mut self.gpu {
            Some(gpu) => {
                let applied = gpu.apply(stats.lr)?;
                if applied.is_ok() {
                    gpu.download_params(&mut self.dvae.params)?;
                }
                applied
            }
            None => {
                let mut target = HostUpdate {
                    adamw: &mut self.optimizer,
                    params: &mut self.dvae.params.data,
                    grads: &mut self.grads,
                    lr_scale: None,
                };
                apply_update(&mut target, stats.lr, None)?
            }
        };
        applied.map_err(|_| non_finite())?;
        self.step += 1;
        Ok(stats)
    }
}
