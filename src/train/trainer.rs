//! The trainer: one object that owns a model, its AdamW state, the gradient buffer, the training
//! workspace and the random state, and turns host-supplied batches into optimizer steps:
//! pretraining batches (pixels + mask + visual tokens, or the pixels themselves as the target:
//! [`TrainerOptions::mim_target`], [`Trainer::step`]) for a
//! `BeitForMaskedImageModeling`, labelled images ([`Trainer::step_classify`]) for a
//! `BeitForImageClassification`, images with a label per pixel ([`Trainer::step_segment`]) for a
//! `BeitForSemanticSegmentation` (BatchNorm on batch statistics, its running statistics updated
//! once per applied step). All share the optimizer, schedule, clipping, layer-wise lr
//! decay, stochastic depth and checkpoints. Checkpoints
//! ([`super::checkpoint`]) hold all of it, so a resumed run continues bit for bit.
//!
//! On the CPU a step's forward and backward runs data-parallel over the context's threads
//! (`model::data_parallel`: one serial pass per shard of images, gradients summed in shard
//! order), so a given seed and thread count give the same bits.
//!
//! A step validates the batch before it touches anything, and refuses to apply a non-finite
//! loss or gradient: after any error the trainer is exactly as before the call.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::context::{Context, Device};
use crate::error::{Error, Result};
use crate::model::param_store::ParamStore;
use crate::model::segmentation::head::BnRecord;
use crate::model::segmentation::layout::is_buffer;
use crate::model::segmentation::{SegBatch, BN_MOMENTUM};
use crate::model::{
    check_label_smoothing, Architecture, ClassifyBatch, DataParallelWorkspace, DropPath, MimBatch, MimTarget, Model,
};
use crate::resources::{try_zeroed, Bytes, Need};
use crate::train::gpu_pretrain::{DeviceGradients, GpuPretrainer, OptimizerSetup, Precision};

use super::adamw::{AdamW, AdamWConfig, DecayPlan};
use super::layer_decay::lr_scales;
use super::optimizer::{apply_update, HostUpdate, NonFiniteGradient};
use super::schedule::CosineSchedule;

/// How a trainer optimises. The defaults are BEiT's pretraining recipe (unilm
/// `run_beit_pretraining.py`): lr 1.5e-3 with linear warmup then cosine to 1e-5, AdamW betas
/// (0.9, 0.98), eps 1e-8, weight decay 0.05, gradient clipping at 3.0, drop path from the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerOptions {
    /// Peak learning rate (after warmup).
    pub learning_rate: f64,
    /// Final learning rate of the cosine schedule.
    pub min_learning_rate: f64,
    /// Steps of linear warmup from 0 to `learning_rate`.
    pub warmup_steps: u64,
    /// Length of the schedule; 0 keeps `learning_rate` constant after warmup.
    pub total_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub clip_grad_norm: f64,
    /// Stochastic depth rate of the last block (rising linearly from 0 at the first); `None`
    /// takes the config's `drop_path_rate`.
    pub drop_path_rate: Option<f64>,
    /// Layer-wise lr decay factor (1 = none; BEiT fine-tuning uses 0.65–0.9).
    pub layer_decay: f64,
    /// Which parameters weight decay applies to.
    pub weight_decay_on: WeightDecayOn,
    /// Seeds the trainer's random state (stochastic depth).
    pub seed: u64,
    /// What pretraining predicts for the masked patches: BEiT's visual tokens, or their pixels
    /// (the ablation; needs `vocab_size` = P·P·C). Stored in checkpoints, so a resumed run keeps
    /// its target. Fine-tuning ignores it.
    pub mim_target: MimTarget,
}

/// The parameters weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecayOn {
    /// BEiT's rule ([`super::adamw::decays`]): not biases, 1-D tensors, CLS token or absolute
    /// position embeddings.
    Beit,
    /// Every parameter (one `torch.optim.AdamW` group, as a plain PyTorch script does).
    All,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        TrainerOptions {
            learning_rate: 1.5e-3,
            min_learning_rate: 1e-5,
            warmup_steps: 0,
            total_steps: 0,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            clip_grad_norm: 3.0,
            drop_path_rate: None,
            layer_decay: 1.0,
            weight_decay_on: WeightDecayOn::Beit,
            seed: 0,
            mim_target: MimTarget::VisualTokens,
        }
    }
}

impl TrainerOptions {
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        ensure!(finite_nonneg(self.learning_rate), InvalidArgument, "learning_rate must be finite and >= 0");
        ensure!(finite_nonneg(self.min_learning_rate), InvalidArgument, "min_learning_rate must be finite and >= 0");
        ensure!(finite_nonneg(self.weight_decay), InvalidArgument, "weight_decay must be finite and >= 0");
        ensure!((0.0..1.0).contains(&self.beta1), InvalidArgument, "beta1 must be in [0, 1), got {}", self.beta1);
        ensure!((0.0..1.0).contains(&self.beta2), InvalidArgument, "beta2 must be in [0, 1), got {}", self.beta2);
        ensure!(self.eps.is_finite() && self.eps > 0.0, InvalidArgument, "eps must be finite and > 0");
        ensure!(finite_nonneg(self.clip_grad_norm), InvalidArgument, "clip_grad_norm must be finite and >= 0");
        if let Some(r) = self.drop_path_rate {
            ensure!((0.0..1.0).contains(&r), InvalidArgument, "drop_path_rate must be in [0, 1), got {r}");
        }
        ensure!(
            self.layer_decay.is_finite() && self.layer_decay > 0.0 && self.layer_decay <= 1.0,
            InvalidArgument,
            "layer_decay must be in (0, 1], got {}",
            self.layer_decay
        );
        ensure!(
            self.total_steps == 0 || self.total_steps > self.warmup_steps,
            InvalidArgument,
            "total_steps ({}) must exceed warmup_steps ({}) (or be 0 for a constant rate)",
            self.total_steps,
            self.warmup_steps
        );
        Ok(())
    }

    /// The learning rate of step `step` (0-based: the first step uses `lr_at(0)`).
    pub fn lr_at(&self, step: u64) -> f64 {
        if self.total_steps == 0 {
            let w = self.warmup_steps;
            return if step < w && w > 1 {
                self.learning_rate * step as f64 / (w - 1) as f64
            } else {
                self.learning_rate
            };
        }
        CosineSchedule {
            base_value: self.learning_rate,
            final_value: self.min_learning_rate,
            total_steps: self.total_steps as usize,
            warmup_steps: self.warmup_steps as usize,
        }
        .value(step as usize)
    }
}

/// The AdamW settings of `options`.
pub(crate) fn adamw_config(options: &TrainerOptions) -> AdamWConfig {
    AdamWConfig {
        beta1: options.beta1 as f32,
        beta2: options.beta2 as f32,
        eps: options.eps as f32,
        weight_decay: options.weight_decay as f32,
    }
}

/// The decay mask (1 where an element decays) and the trained ranges of `options`' decay rule,
/// as [`new_adamw`] builds its state from them (the GPU step's AdamW takes the same). BatchNorm
/// running statistics (a segmentation head's buffers) are not trained at all: the running
/// update after each step sets them.
fn decay_setup(model: &Model, options: &TrainerOptions) -> Result<DecayPlan> {
    DecayPlan::new(model.params(), |s| {
        if is_buffer(&s.name) {
            return None;
        }
        Some(match options.weight_decay_on {
            WeightDecayOn::Beit => super::adamw::decays(&s.name, &s.shape),
            WeightDecayOn::All => true,
        })
    })
}

/// Fresh AdamW state for `model` under `options`' decay rule.
pub(crate) fn new_adamw(model: &Model, options: &TrainerOptions) -> Result<AdamW> {
    Ok(AdamW::from_plan(adamw_config(options), decay_setup(model, options)?))
}

fn layer_decay_scales(model: &Model, options: &TrainerOptions) -> Option<Vec<f32>> {
    (options.layer_decay != 1.0)
        .then(|| lr_scales(model.params(), model.config().num_hidden_layers, options.layer_decay))
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Steps completed, this one included.
    pub step: u64,
    /// The loss before the update: the mean over the masked positions of the MIM target's loss
    /// (cross-entropy, or the pixels' mean squared error) in pretraining, mean cross-entropy over
    /// the images (label-smoothed) in classification.
    pub loss: f64,
    /// Learning rate applied (before layer decay).
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Masked positions the loss averaged over (0 for classification).
    pub masked: usize,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// The trainer's random state, in a form checkpoints can store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RngState {
    pub seed: [u8; 32],
    pub stream: u64,
    pub word_pos: u128,
}

pub struct Trainer {
    pub(crate) model: Model,
    pub(crate) options: TrainerOptions,
    pub(crate) optimizer: AdamW,
    pub(crate) step: u64,
    pub(crate) data_position: u64,
    pub(crate) rng: ChaCha8Rng,
    lr_scale: Option<Vec<f32>>,
    grads: Vec<f32>,
    /// The step's forward and backward memory (data-parallel shards where they pay).
    workspace: DataParallelWorkspace,
    drop_factors: Vec<f32>,
    /// The GPU step when pretraining runs on CUDA ([`Trainer::use_cuda`]). It then holds the
    /// current parameters and optimizer state; the host copies follow as described there.
    gpu: Option<GpuPretrainer>,
    /// With the GPU step: whether each step leaves the host parameters behind the device's
    /// (until [`Trainer::sync_host`]) instead of copying them back.
    defer_host_copy: bool,
    /// The precision [`Trainer::use_context`] gives the GPU step; `None`: the task's default
    /// ([`Trainer::default_cuda_precision`]).
    context_precision: Option<Precision>,
    /// The front end's data-affecting options, saved in checkpoints ([`Trainer::set_run_record`]).
    pub(crate) run_record: Option<super::run_record::RunRecord>,
    /// The step between its halves ([`Trainer::forward_backward`] .. [`Trainer::apply_gradients`]).
    pending: Option<Pending>,
}

/// A step whose gradients wait for [`Trainer::apply_gradients`].
#[derive(Debug, Clone)]
struct Pending {
    /// The random state before the step's drop path draw, restored when the step is dropped.
    rng_before: ChaCha8Rng,
    loss: f64,
    images: usize,
    masked: usize,
    start: Instant,
    /// A segmentation pass's BatchNorm batch statistics (empty for the other heads): the running
    /// update that [`Trainer::apply_gradients`] makes once the step is applied, and that a
    /// discarded step never makes.
    batchnorm: Vec<BnRecord>,
}

/// What the first half of a step computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassStats {
    /// The loss of the batch (as [`StepStats::loss`]).
    pub loss: f64,
    pub images: usize,
    /// Masked positions the loss averaged over (0 for classification and segmentation): an
    /// all-reduce of pretraining gradients weights each share by it.
    pub masked: usize,
}

/// The pending step's gradient buffer, laid out like the parameters.
#[derive(Debug)]
pub enum Gradients<'a> {
    /// On the host: read and write it in place.
    Host(&'a mut [f32]),
    /// On the GPU: a device buffer, ready once the work queued on its stream is done.
    Device(DeviceGradients),
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("model", &self.model).field("step", &self.step).finish()
    }
}

impl Trainer {
    /// A pretraining trainer for `model` (a `BeitForMaskedImageModeling` whose head fits
    /// `options.mim_target`) at step 0; its steps are [`Trainer::step`].
    pub fn new(model: Model, options: TrainerOptions) -> Result<Self> {
        ensure!(
            model.architecture() == Architecture::MaskedImageModeling,
            InvalidArgument,
            "the pretraining trainer needs a BeitForMaskedImageModeling model; this one is {}",
            model.architecture().hf_name()
        );
        options.mim_target.check_config(model.config())?;
        Self::for_model(model, options)
    }

    /// A fine-tuning trainer for `model` (a `BeitForImageClassification`) at step 0; its steps
    /// are [`Trainer::step_classify`]. Same optimizer, schedule, clipping, layer decay, drop
    /// path and checkpoints as pretraining.
    pub fn new_classifier(model: Model, options: TrainerOptions) -> Result<Self> {
        ensure!(
            model.architecture() == Architecture::ImageClassification,
            InvalidArgument,
            "the classification trainer needs a BeitForImageClassification model; this one is {}",
            model.architecture().hf_name()
        );
        Self::for_model(model, options)
    }

    /// A segmentation fine-tuning trainer for `model` (a `BeitForSemanticSegmentation`) at step
    /// 0; its steps are [`Trainer::step_segment`]. Same optimizer, schedule, clipping, layer
    /// decay, drop path and checkpoints as the other tasks; the BatchNorm running statistics
    /// are not optimised (see [`decay_setup`]) but take PyTorch's momentum update after each
    /// applied step. On CUDA it trains in fp32 only.
    pub fn new_segmenter(model: Model, options: TrainerOptions) -> Result<Self> {
        ensure!(
            model.architecture() == Architecture::SemanticSegmentation,
            InvalidArgument,
            "the segmentation trainer needs a BeitForSemanticSegmentation model; this one is {}",
            model.architecture().hf_name()
        );
        Self::for_model(model, options)
    }

    /// The trainer of `model`'s task: [`Trainer::new`] (pretraining) for a
    /// `BeitForMaskedImageModeling`, [`Trainer::new_classifier`] (fine-tuning) for a
    /// `BeitForImageClassification`, [`Trainer::new_segmenter`] for a
    /// `BeitForSemanticSegmentation`; other architectures are refused, naming the three.
    pub fn for_task(model: Model, options: TrainerOptions) -> Result<Self> {
        match model.architecture() {
            Architecture::MaskedImageModeling => Self::new(model, options),
            Architecture::ImageClassification => Self::new_classifier(model, options),
            Architecture::SemanticSegmentation => Self::new_segmenter(model, options),
            other => bail!(
                InvalidArgument,
                "a trainer trains a BeitForMaskedImageModeling (pretraining), a BeitForImageClassification \
                 or a BeitForSemanticSegmentation (fine-tuning) model; this one is {}",
                other.hf_name()
            ),
        }
    }

    fn for_model(model: Model, options: TrainerOptions) -> Result<Self> {
        options.validate()?;
        Self::state_need(&model, &options).check_config()?;
        let optimizer = new_adamw(&model, &options)?;
        let lr_scale = layer_decay_scales(&model, &options);
        let grads = try_zeroed(model.params().data.len(), "the trainer's gradient buffer")?;
        let rng = ChaCha8Rng::seed_from_u64(options.seed);
        Ok(Trainer {
            model,
            options,
            optimizer,
            step: 0,
            data_position: 0,
            rng,
            lr_scale,
            grads,
            workspace: DataParallelWorkspace::new(),
            drop_factors: Vec::new(),
            gpu: None,
            defer_host_copy: false,
            context_precision: None,
            run_record: None,
            pending: None,
        })
    }

    /// What a trainer of `model` holds beside the model, at most (tested before it is built):
    /// AdamW's two moments, the gradient buffer, the decay mask while the optimizer is set up,
    /// and the per-element lr scales of layer decay. The passes' activations are tested where
    /// they are planned, at the first step of each batch shape.
    pub fn state_need(model: &Model, options: &TrainerOptions) -> Need {
        let n = model.params().data.len();
        let buffers = 4 + usize::from(options.layer_decay != 1.0);
        Need::new(
            format!("a trainer's optimizer state and gradients ({buffers} buffers of {n} values)"),
            Bytes::floats(&[buffers, n]),
        )
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Gives the model back (e.g. to save it or run inference with it). With the GPU step and
    /// [`Trainer::defer_host_copy`], call [`Trainer::sync_host`] first.
    pub fn into_model(self) -> Model {
        self.model
    }

    /// Runs the steps (pretraining, classification or segmentation fine-tuning) on the GPU from
    /// now on, in `precision` (bf16 for speed, fp32 for parity with the CPU pass; segmentation
    /// trains in fp32 only): the parameters and optimizer state move to the device.
    /// Every step then copies the parameters back to the host model (so [`Trainer::model`],
    /// saving and checkpoints see them) unless [`Trainer::defer_host_copy`] is set. Steps stay
    /// deterministic, and drop path draws from the same random state as on the CPU.
    pub fn use_cuda(&mut self, precision: Precision) -> Result<()> {
        self.check_nothing_pending("use_cuda")?;
        match self.model.architecture() {
            Architecture::MaskedImageModeling => GpuPretrainer::check_target(self.options.mim_target)?,
            Architecture::ImageClassification => {}
            Architecture::SemanticSegmentation => ensure!(
                precision == Precision::F32,
                Unsupported,
                "segmentation trains on the GPU in fp32 only; {precision:?} was asked for"
            ),
            other => bail!(
                Unsupported,
                "pretraining and classification or segmentation fine-tuning run on the CUDA backend; this trainer \
                 trains a {}",
                other.hf_name()
            ),
        }
        let plan = decay_setup(&self.model, &self.options)?;
        let mut gpu = GpuPretrainer::new(
            &self.model,
            precision,
            OptimizerSetup {
                config: self.optimizer.config,
                decay_mask: &plan.mask,
                trained: &plan.trained,
                lr_scale: self.lr_scale.as_deref(),
            },
        )?;
        gpu.upload_state(self.model.params(), &self.optimizer)?;
        self.gpu = Some(gpu);
        Ok(())
    }

    /// Follows `ctx`'s device: a cuda context moves the steps to the GPU, in the task's default
    /// precision ([`Trainer::default_cuda_precision`]) unless [`Trainer::set_context_precision`]
    /// said otherwise.
    pub fn use_context(&mut self, ctx: &Context) -> Result<()> {
        if ctx.device() == Device::Cuda && self.gpu.is_none() {
            self.use_cuda(self.context_precision.unwrap_or_else(|| self.default_cuda_precision()))?;
        }
        Ok(())
    }

    /// The GPU step's precision when none is asked for: bf16 (BEiT's mixed precision), fp32 for
    /// segmentation (the only precision its GPU pass has).
    pub fn default_cuda_precision(&self) -> Precision {
        match self.model.architecture() {
            Architecture::SemanticSegmentation => Precision::F32,
            _ => Precision::Bf16,
        }
    }

    /// The precision [`Trainer::use_context`] runs the GPU step in (the CPU computes in fp32
    /// whatever this says).
    pub fn set_context_precision(&mut self, precision: Precision) {
        self.context_precision = Some(precision);
    }

    /// The GPU step's precision, or `None` on the CPU.
    pub fn cuda_precision(&self) -> Option<Precision> {
        self.gpu.as_ref().map(|g| g.precision())
    }

    /// With the GPU step, stop copying the parameters back after every step (benchmarks, long
    /// runs that save rarely); call [`Trainer::sync_host`] before reading the model.
    pub fn defer_host_copy(&mut self, defer: bool) {
        self.defer_host_copy = defer;
    }

    /// Copies the GPU step's parameters and optimizer state into the host model and optimizer
    /// (nothing to do on the CPU).
    pub fn sync_host(&mut self) -> Result<()> {
        if let Some(gpu) = &self.gpu {
            gpu.download_params(self.model.params_mut())?;
            gpu.download_optimizer(&mut self.optimizer)?;
        }
        Ok(())
    }

    /// The current values of parameter `name` (a Hugging Face name), wherever the step keeps
    /// them (with the GPU step and a deferred host copy, read from the device).
    pub fn parameter(&self, name: &str) -> Result<Vec<f32>> {
        let id = self.model.params().find_exported(name)?;
        match (&self.gpu, self.defer_host_copy) {
            (Some(_), true) => {
                let mut store = self.model.params().clone();
                self.current_parameters_into(&mut store)?;
                Ok(store.get(id).to_vec())
            }
            _ => Ok(self.model.params().get(id).to_vec()),
        }
    }

    /// Writes the current parameters into `store` (a copy of [`Trainer::model`]'s): nothing to
    /// do unless the GPU step defers its host copy, then one download.
    pub fn current_parameters_into(&self, store: &mut ParamStore) -> Result<()> {
        match (&self.gpu, self.defer_host_copy) {
            (Some(gpu), true) => gpu.download_params(store),
            _ => Ok(()),
        }
    }

    /// Changes the trainer's parameters through `change` (e.g. [`ParamStore::set_named`]) on
    /// the host, then hands them to the GPU step. Refused while a step is pending; on error
    /// nothing changes.
    pub fn change_parameters(&mut self, change: impl FnOnce(&mut ParamStore) -> Result<()>) -> Result<()> {
        self.check_nothing_pending("setting parameters")?;
        self.sync_host()?;
        let mut store = self.model.params().clone();
        change(&mut store)?;
        if let Some(gpu) = &mut self.gpu {
            gpu.upload_state(&store, &self.optimizer)?;
        }
        *self.model.params_mut() = store;
        Ok(())
    }

    pub fn options(&self) -> &TrainerOptions {
        &self.options
    }

    /// Replaces the options (validated by the caller) and what derives from them.
    pub(crate) fn set_options_unchecked(&mut self, options: TrainerOptions) {
        self.lr_scale = layer_decay_scales(&self.model, &options);
        self.optimizer.config = adamw_config(&options);
        self.options = options;
    }

    /// After a checkpoint load: the GPU step takes the restored state (rebuilt, so a changed
    /// decay rule or lr scale is taken too).
    pub(crate) fn reload_gpu(&mut self) -> Result<()> {
        if let Some(precision) = self.cuda_precision() {
            self.gpu = None;
            self.use_cuda(precision)?;
        }
        Ok(())
    }

    /// The parameters and optimizer state as of the last step, wherever they live (for
    /// checkpoints, which take `&self`).
    pub(crate) fn current_state(&self) -> Result<Option<(Vec<f32>, AdamW)>> {
        match &self.gpu {
            None => Ok(None),
            Some(gpu) => {
                let mut store = self.model.params().clone();
                gpu.download_params(&mut store)?;
                let mut opt = self.optimizer.clone();
                gpu.download_optimizer(&mut opt)?;
                Ok(Some((store.data, opt)))
            }
        }
    }

    /// Steps completed.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Where the host's data stream stands: how many batches it has fed, unless the host sets
    /// it otherwise. Stored in checkpoints so a resumed run picks the same next batch.
    pub fn data_position(&self) -> u64 {
        self.data_position
    }

    pub fn set_data_position(&mut self, position: u64) {
        self.data_position = position;
    }

    pub fn rng_state(&self) -> RngState {
        RngState { seed: self.rng.get_seed(), stream: self.rng.get_stream(), word_pos: self.rng.get_word_pos() }
    }

    pub(crate) fn set_rng_state(&mut self, s: &RngState) {
        let mut rng = ChaCha8Rng::from_seed(s.seed);
        rng.set_stream(s.stream);
        rng.set_word_pos(s.word_pos);
        self.rng = rng;
    }

    /// Stochastic depth rate of block `l` of `layers`: `rate·l/(layers−1)`.
    pub fn drop_path_rate_of(rate: f64, l: usize, layers: usize) -> f64 {
        if layers <= 1 {
            0.0
        } else {
            rate * l as f64 / (layers - 1) as f64
        }
    }

    fn drop_path_rate(&self) -> f64 {
        self.options.drop_path_rate.unwrap_or(self.model.config().drop_path_rate)
    }

    /// Draws this step's stochastic depth factors into `drop_factors` (`[layers, 2, batch]`):
    /// keep with probability `1 − rate_l`, kept branches scaled by `1/keep`. Draws from `rng`
    /// only when some rate is positive, so a run without drop path consumes no randomness.
    fn draw_drop_path(&mut self, batch: usize) -> bool {
        let rate = self.drop_path_rate();
        if rate <= 0.0 {
            return false;
        }
        let layers = self.model.config().num_hidden_layers;
        self.drop_factors.clear();
        for l in 0..layers {
            let keep = 1.0 - Self::drop_path_rate_of(rate, l, layers);
            for _ in 0..2 * batch {
                let u: f64 = self.rng.random();
                // timm's rule: mask = floor(keep + U[0,1)), output x / keep · mask.
                let kept = (keep + u).floor() >= 1.0;
                self.drop_factors.push(if kept { (1.0 / keep) as f32 } else { 0.0 });
            }
        }
        true
    }

    /// One pretraining step on `batch`: forward, backward, clipping, AdamW at the scheduled lr
    /// ([`Trainer::forward_backward`] then [`Trainer::apply_gradients`]). On error nothing
    /// changes (parameters, optimizer state, step, random state).
    pub fn step(&mut self, batch: &MimBatch<'_>) -> Result<StepStats> {
        self.forward_backward(batch)?;
        self.apply_gradients()
    }

    /// One fine-tuning step on a labelled `batch` (mean cross-entropy with label smoothing
    /// `label_smoothing`), otherwise exactly as [`Trainer::step`]. On error nothing changes.
    pub fn step_classify(&mut self, batch: &ClassifyBatch<'_>, label_smoothing: f32) -> Result<StepStats> {
        self.forward_backward_classify(batch, label_smoothing)?;
        self.apply_gradients()
    }

    /// The first half of a pretraining step: draws the step's drop path, runs the forward and
    /// backward of `batch` into the zeroed gradient buffer, and leaves the step pending until
    /// [`Trainer::apply_gradients`] (or [`Trainer::discard_gradients`]). In between, the host
    /// may read and change the gradients ([`Trainer::gradients`]): an all-reduce across
    /// processes, its own clipping. Refused while another step is pending; a non-finite loss
    /// is refused and leaves the trainer as before.
    pub fn forward_backward(&mut self, batch: &MimBatch<'_>) -> Result<PassStats> {
        self.check_nothing_pending("forward_backward")?;
        let target = self.options.mim_target;
        self.model.check_mim_batch(batch, target)?;
        if self.gpu.is_some() {
            return self.pass_gpu(batch.batch, batch.masked_count(), |gpu, drop| gpu.forward_backward(batch, drop));
        }
        self.pass_cpu(batch.batch, batch.masked_count(), |model, ws, drop, grads| {
            model.mim_forward_backward_data_parallel(ws, batch, target, drop, grads)
        })
    }

    /// [`Trainer::forward_backward`] for a classification trainer's labelled `batch`.
    pub fn forward_backward_classify(&mut self, batch: &ClassifyBatch<'_>, label_smoothing: f32) -> Result<PassStats> {
        self.check_nothing_pending("forward_backward_classify")?;
        self.model.check_classify_batch(batch)?;
        check_label_smoothing(label_smoothing)?;
        if self.gpu.is_some() {
            return self
                .pass_gpu(batch.batch, 0, |gpu, drop| gpu.classify_forward_backward(batch, drop, label_smoothing));
        }
        self.pass_cpu(batch.batch, 0, |model, ws, drop, grads| {
            model.classify_forward_backward_data_parallel(ws, batch, drop, label_smoothing, grads)
        })
    }

    /// One segmentation fine-tuning step on `batch` (pixels and a label per pixel; labels equal
    /// to the config's `semantic_loss_ignore_index` count nowhere): HF's loss with BatchNorm on
    /// the batch's statistics, then the optimizer step as [`Trainer::step`], then the BatchNorm
    /// running statistics' momentum update. On error nothing changes.
    pub fn step_segment(&mut self, batch: &SegBatch<'_>) -> Result<StepStats> {
        self.forward_backward_segment(batch)?;
        self.apply_gradients()
    }

    /// [`Trainer::forward_backward`] for a segmentation trainer's `batch`. The BatchNorm running
    /// statistics wait with the step: [`Trainer::apply_gradients`] updates them, a discarded
    /// step leaves them as they were. The pass is never split over data-parallel shards
    /// (training-mode BatchNorm normalises over the whole batch).
    pub fn forward_backward_segment(&mut self, batch: &SegBatch<'_>) -> Result<PassStats> {
        self.check_nothing_pending("forward_backward_segment")?;
        self.model.check_seg_batch(batch)?;
        let mut batchnorm = Vec::new();
        let stats = if self.gpu.is_some() {
            self.pass_gpu(batch.batch, 0, |gpu, drop| {
                batchnorm = gpu.segment_forward_backward(batch, drop)?;
                Ok(())
            })
        } else {
            self.pass_cpu(batch.batch, 0, |model, ws, drop, grads| {
                let step = model.segmentation_forward_backward(ws.whole_batch(), batch, drop, grads)?;
                batchnorm = step.batchnorm;
                Ok(step.loss)
            })
        }?;
        self.pending.as_mut().expect("a successful pass leaves its step pending").batchnorm = batchnorm;
        Ok(stats)
    }

    /// The pending step's gradients (laid out like the parameters, [`Model::params`]): the
    /// host buffer on the CPU, the device buffer and the stream it is ready on with the GPU
    /// step. Refused when no step is pending.
    pub fn gradients(&mut self) -> Result<Gradients<'_>> {
        ensure!(
            self.pending.is_some(),
            InvalidArgument,
            "no step is pending: the gradients are there between forward_backward and apply_gradients"
        );
        Ok(match &self.gpu {
            Some(gpu) => Gradients::Device(gpu.gradients_on_device()),
            None => Gradients::Host(&mut self.grads),
        })
    }

    /// Whether a step is pending (after [`Trainer::forward_backward`], before
    /// [`Trainer::apply_gradients`] or [`Trainer::discard_gradients`]).
    pub fn step_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Drops the pending step: the trainer is as before its forward_backward (random state
    /// included). Nothing to do when none is pending.
    pub fn discard_gradients(&mut self) {
        if let Some(p) = self.pending.take() {
            self.rng = p.rng_before;
        }
    }

    /// The second half of a step: the global gradient norm, clipping, and AdamW at the
    /// scheduled learning rate on the pending step's gradients (as the host left them). A
    /// non-finite gradient norm is refused: the step is dropped and the trainer is as before
    /// its forward_backward. Refused when no step is pending.
    pub fn apply_gradients(&mut self) -> Result<StepStats> {
        let Some(pending) = self.pending.take() else {
            bail!(InvalidArgument, "no step is pending: run forward_backward first");
        };
        let lr = self.options.lr_at(self.step);
        let clip = (self.options.clip_grad_norm > 0.0).then_some(self.options.clip_grad_norm);
        let grad_norm = match &mut self.gpu {
            Some(gpu) => match gpu.apply(self.options.clip_grad_norm, lr as f32) {
                Ok(s) => Ok(s.grad_norm),
                Err(e) => Err(e),
            },
            None => {
                let mut target = HostUpdate {
                    adamw: &mut self.optimizer,
                    params: &mut self.model.params_mut().data,
                    grads: &mut self.grads,
                    lr_scale: self.lr_scale.as_deref(),
                };
                match apply_update(&mut target, lr as f32, clip) {
                    Ok(Ok(norm)) => Ok(norm),
                    Ok(Err(NonFiniteGradient(norm))) => Err(Error::Numerical(format!(
                        "the gradient norm is {norm}; the step was not applied and the trainer is unchanged"
                    ))),
                    Err(e) => Err(e),
                }
            }
        };
        let grad_norm = match grad_norm {
            Ok(norm) => norm,
            Err(e) => {
                self.rng = pending.rng_before;
                return Err(e);
            }
        };
        // The segmentation head's running statistics follow the applied step (and only it).
        if !pending.batchnorm.is_empty() {
            match &mut self.gpu {
                Some(gpu) => gpu.apply_batchnorm_statistics(&pending.batchnorm, BN_MOMENTUM)?,
                None => self.model.apply_batchnorm_statistics(&pending.batchnorm, BN_MOMENTUM),
            }
        }
        if let (Some(gpu), false) = (&self.gpu, self.defer_host_copy) {
            gpu.download_params(self.model.params_mut())?;
        }
        self.step += 1;
        self.data_position += 1;
        let seconds = pending.start.elapsed().as_secs_f64();
        Ok(StepStats {
            step: self.step,
            loss: pending.loss,
            lr,
            grad_norm,
            masked: pending.masked,
            seconds,
            images_per_s: pending.images as f64 / seconds.max(1e-12),
        })
    }

    /// Refuses `call` while a step is pending (its gradients and random state belong to it).
    pub(crate) fn check_nothing_pending(&self, call: &str) -> Result<()> {
        ensure!(
            self.pending.is_none(),
            InvalidArgument,
            "{call}: a step is pending (forward_backward ran; apply_gradients or discard_gradients has not): \
             finish it first"
        );
        Ok(())
    }

    /// The first half of a step on the GPU: the same drop path draw and the same refusal of a
    /// non-finite loss as [`Trainer::pass_cpu`]; `pass` queues the forward and backward there.
    fn pass_gpu(
        &mut self,
        images: usize,
        masked: usize,
        pass: impl FnOnce(&mut GpuPretrainer, Option<&[f32]>) -> Result<()>,
    ) -> Result<PassStats> {
        let start = Instant::now();
        let rng_before = self.rng.clone();
        let dropping = self.draw_drop_path(images);
        let gpu = self.gpu.as_mut().expect("checked by the caller");
        let drop = dropping.then_some(&self.drop_factors[..]);
        let loss = pass(gpu, drop).and_then(|()| gpu.loss());
        self.finish_pass(loss, rng_before, start, images, masked)
    }

    /// The first half of a step on the CPU, shared by every head: drop path draw, `pass`
    /// (forward + backward into the zeroed gradient buffer, returning the loss).
    fn pass_cpu(
        &mut self,
        images: usize,
        masked: usize,
        pass: impl FnOnce(&Model, &mut DataParallelWorkspace, Option<DropPath<'_>>, &mut [f32]) -> Result<f64>,
    ) -> Result<PassStats> {
        let start = Instant::now();
        let rng_before = self.rng.clone();
        let dropping = self.draw_drop_path(images);
        self.grads.fill(0.0);
        let drop = dropping.then_some(DropPath { factors: &self.drop_factors });
        let loss = pass(&self.model, &mut self.workspace, drop, &mut self.grads);
        self.finish_pass(loss, rng_before, start, images, masked)
    }

    /// Makes a pass's step pending, or, when it failed or its loss is not finite, puts the
    /// random state back.
    fn finish_pass(
        &mut self,
        loss: Result<f64>,
        rng_before: ChaCha8Rng,
        start: Instant,
        images: usize,
        masked: usize,
    ) -> Result<PassStats> {
        let loss = match loss {
            Ok(loss) if loss.is_finite() => loss,
            Ok(loss) => {
                self.rng = rng_before;
                bail!(Numerical, "the loss is {loss}; the step was not applied and the trainer is unchanged");
            }
            Err(e) => {
                self.rng = rng_before;
                return Err(e);
            }
        };
        self.pending = Some(Pending { rng_before, loss, images, masked, start, batchnorm: Vec::new() });
        Ok(PassStats { loss, images, masked })
    }
}
