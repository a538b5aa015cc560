//! The BEiT model: config, parameters, Hugging Face directories, and the forward pass.
//!
//! `Model` owns its parameters. Inference takes `&self`, so one model can serve many threads;
//! each pass borrows a planned activation arena (`plan.rs`) from a small pool kept by the model.
//! The transformer block is written once, over the `Backend` trait, in `block.rs`.

pub(crate) mod block;
mod classify;
pub mod config;
mod data_parallel;
mod embeddings;
mod forward;
pub mod init;
pub mod io;
mod mim_target;
pub mod param_store;
pub mod params;
pub(crate) mod plan;
pub mod relpos;
pub(crate) mod resample;
mod resolution;
pub mod segmentation;
mod training;

use std::path::Path;
use std::sync::Mutex;

pub(crate) use classify::check_label_smoothing;
pub use classify::ClassifyBatch;
pub use config::{Architecture, BeitConfig};
pub use data_parallel::DataParallelWorkspace;
pub use forward::{ImageBatch, OutputBuffers, OutputShapes, Outputs};
pub use mim_target::MimTarget;
pub(crate) use training::HeadLists;
pub use training::{DropPath, MimBatch, TrainWorkspace};

use crate::error::{Error, Result};
use params::{Layout, ParamStore};

pub struct Model {
    config: BeitConfig,
    arch: Architecture,
    pub(crate) params: ParamStore,
    pub(crate) layout: Layout,
    workspaces: Mutex<Vec<forward::Workspace>>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("architecture", &self.arch).field("parameters", &self.params.count()).finish()
    }
}

impl Model {
    fn with_zero_params(mut config: BeitConfig, arch: Architecture) -> Result<Self> {
        config.validate()?;
        if arch == Architecture::ImageClassification && config.num_labels() == 0 {
            bail!(Config, "a classification model needs at least one label (num_labels / id2label)");
        }
        if arch == Architecture::SemanticSegmentation {
            config.validate_segmentation()?;
        }
        config.architectures = Some(vec![arch.hf_name().to_string()]);
        let (params, layout) = params::build_layout(&config, arch)?;
        Ok(Model { config, arch, params, layout, workspaces: Mutex::new(Vec::new()) })
    }

    /// A model whose parameters are all zero (to be filled, e.g. from a checkpoint).
    pub(crate) fn zeroed(config: BeitConfig, arch: Architecture) -> Result<Self> {
        Self::with_zero_params(config, arch)
    }

    /// A new model with BEiT's random initialisation (see [`init`]), reproducible from `seed`.
    pub fn new_random(config: BeitConfig, arch: Architecture, seed: u64) -> Result<Self> {
        let mut m = Self::with_zero_params(config, arch)?;
        init::initialise(&mut m.params, seed);
        Ok(m)
    }

    /// Loads a Hugging Face model directory (`config.json` + `model.safetensors`).
    /// The architecture comes from `architectures` in config.json (BeitModel when absent).
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(Io, "model directory {} does not exist or is not a directory", dir.display());
        }
        let config = BeitConfig::from_json_str(&io::read_config_text(dir)?)?;
        let arch = config.architecture()?;
        let mut m = Self::with_zero_params(config, arch)?;
        io::load_weights(&mut m.params, &dir.join(io::WEIGHTS_FILE))?;
        Ok(m)
    }

    /// Writes a Hugging Face model directory that `transformers` `from_pretrained` loads.
    /// Each file is replaced atomically; the directory is created if needed.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
        let weights = io::weights_bytes(&self.params)?;
        io::write_atomic(&dir.join(io::WEIGHTS_FILE), &weights)?;
        io::write_atomic(&dir.join(io::CONFIG_FILE), self.config.to_json_string().as_bytes())
    }

    pub fn config(&self) -> &BeitConfig {
        &self.config
    }

    pub fn architecture(&self) -> Architecture {
        self.arch
    }

    /// The parameters, HF-named, in one flat buffer.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// Mutable parameters. Invalidate nothing: passes read parameters afresh every time.
    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    /// The model without its parameter values: the config, the layout and the parameter table,
    /// all that planning a pass and addressing its views need (for a pass whose parameters
    /// live elsewhere, on a device). Its store holds no values: it runs no host pass.
    pub(crate) fn without_values(&self) -> Model {
        let params = ParamStore { data: Vec::new(), specs: self.params.specs.clone() };
        Model {
            config: self.config.clone(),
            arch: self.arch,
            params,
            layout: self.layout.clone(),
            workspaces: Mutex::new(Vec::new()),
        }
    }

    /// Whether `bool_masked_pos` is accepted (the model has a mask token).
    pub fn has_mask_token(&self) -> bool {
        self.layout.embeddings.mask_token.is_some()
    }
}
