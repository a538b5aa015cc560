//! The data of a pretraining run and the config of a fresh model for it: BEiT's loader over a
//! dataset file, or the synthetic task, with the targets [`super::tokens`] chooses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::data::batch::OwnedMimBatch;
use crate::data::dataset::Dataset;
use crate::data::loader::LoaderConfig;
use crate::data::masking::MaskingStrategy;
use crate::data::mim_source::{DatasetMim, TokenSource};
use crate::data::synthetic::SyntheticMim;
use crate::dvae::Dvae;
use crate::error::{Error, Result};
use crate::model::{BeitConfig, MimTarget};

use super::tokens::{check_pixel_target, token_plan, TargetSource, TokenChoice};

/// The `data` value that selects the synthetic task rather than a dataset file.
pub const SYNTHETIC: &str = "synthetic";

/// The options of a pretraining run that decide its data (as `beit pretrain` takes them).
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainDataOptions {
    /// [`SYNTHETIC`], or the path of a dataset file (`.beitds`).
    pub data: String,
    /// `auto`, `cached` or `augmented` ([`TokenChoice`]); a dataset's only.
    pub tokens: String,
    /// The tokenizer directory, for augmented tokens.
    pub tokenizer: Option<PathBuf>,
    /// Which patches a dataset's masks cover (the synthetic task masks blocks).
    pub masking: MaskingStrategy,
    /// Images per batch.
    pub batch: usize,
    /// Loader worker threads (a dataset's only; 0 counts as 1).
    pub loader_workers: usize,
    /// The run's seed as the caller gave it (recorded; the data is drawn from the trainer's).
    pub seed: u64,
}

impl PretrainDataOptions {
    pub fn is_synthetic(&self) -> bool {
        self.data == SYNTHETIC
    }
}

/// The batches of a pretraining run.
// One value per run.
#[allow(clippy::large_enum_variant)]
pub enum PretrainData {
    Synthetic(SyntheticMim),
    Dataset(DatasetMim),
}

impl PretrainData {
    /// The batches for a model of `cfg` masking `masked` patches per image, drawn from `seed`
    /// (the trainer's), with `target`: the synthetic task, or the dataset file through the loader
    /// with BEiT's augmentation (view 1 at the model's resolution; view 2 at the tokenizer's, or
    /// half the model's without one) and cached or on-the-fly tokens. Also returns where the
    /// targets come from.
    pub fn open(
        options: &PretrainDataOptions,
        cfg: &BeitConfig,
        masked: usize,
        seed: u64,
        target: MimTarget,
    ) -> Result<(Self, TargetSource)> {
        if options.is_synthetic() {
            if options.masking != MaskingStrategy::Blockwise {
                return Err(Error::InvalidArgument(
                    "--masking random applies to dataset files; the synthetic task masks blocks".into(),
                ));
            }
            let synthetic = SyntheticMim::for_config(cfg, masked, seed);
            return Ok((PretrainData::Synthetic(synthetic), TargetSource::Synthetic));
        }
        let ds = Arc::new(Dataset::open(Path::new(&options.data))?);
        check_pixel_target(target, &options.tokens, options.tokenizer.is_some())?;
        let tokenizer = options.tokenizer.as_deref().map(Dvae::load).transpose()?.map(Arc::new);
        let choice: TokenChoice = options.tokens.parse()?;
        let plan = token_plan(choice, target, tokenizer.is_some(), ds.header().has_tokens(), &options.data)?;
        let source = match (plan, tokenizer) {
            (TargetSource::Augmented, Some(t)) => TokenSource::Augmented(t),
            (TargetSource::Cached, _) => TokenSource::Cached,
            // The targets are view 1's own patches: BEiT's crops and flips apply as for tokens.
            (TargetSource::Pixels, _) => TokenSource::Pixels,
            (other, _) => return Err(Error::Internal(format!("token plan {other:?} for a dataset run"))),
        };
        let loader = PretrainLoader {
            batch: options.batch,
            image_size: cfg.image_size.hw(),
            patch_size: cfg.patch_size.hw(),
            masked,
            masking: options.masking,
            seed,
            workers: options.loader_workers,
        };
        let config = loader.config(&source);
        Ok((PretrainData::Dataset(DatasetMim::new(ds, config, source)?), plan))
    }

    /// Batch number `position` of `batch` images (a dataset's batch size is the one it was
    /// opened with).
    pub fn batch_at(&mut self, position: u64, batch: usize) -> Result<OwnedMimBatch> {
        match self {
            PretrainData::Synthetic(s) => s.try_batch(position, batch),
            PretrainData::Dataset(d) => d.batch_at(position),
        }
    }
}

/// What decides the loader of a pretraining run on a dataset, besides its token source.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainLoader {
    /// Images per batch.
    pub batch: usize,
    /// View 1 `(height, width)`: the model's input.
    pub image_size: (usize, usize),
    /// The model's patch size; the mask grid is `image_size / patch_size`.
    pub patch_size: (usize, usize),
    /// Patches masked per image.
    pub masked: usize,
    /// Which patches the masks cover.
    pub masking: MaskingStrategy,
    /// The seed the batches are drawn from (a run's: the trainer's).
    pub seed: u64,
    /// Loader worker threads (0 counts as 1).
    pub workers: usize,
}

impl PretrainLoader {
    /// BEiT's pipeline ([`LoaderConfig::beit`]) as `beit pretrain` runs it: two batches in
    /// flight per worker, the last incomplete batch of an epoch dropped (every step sees a full
    /// batch); view 2 at the tokenizer's input size with a tokenizer; with cached tokens, view 1
    /// is the whole image (the cache holds the tokens of whole, unaltered images).
    pub fn config(&self, source: &TokenSource) -> LoaderConfig {
        let workers = self.workers.max(1);
        let config = LoaderConfig {
            seed: self.seed,
            workers,
            prefetch: 2 * workers,
            drop_last: true,
            masking: self.masking,
            ..LoaderConfig::beit(self.batch, self.image_size, self.patch_size, self.masked)
        };
        match source {
            TokenSource::Augmented(t) => {
                LoaderConfig { tokenizer_size: (t.config.image_size, t.config.image_size), ..config }
            }
            TokenSource::Cached => config.whole_images(),
            TokenSource::Pixels => config,
        }
    }
}

/// The config of a fresh MIM model for `target`: `vocab_size` when the caller gives one, else
/// the size the target needs (the pixel target: one output per pixel value of a patch, P·P·C),
/// else the config's. Also returns the size it took from the target, for the caller to state.
pub fn fresh_model_config(
    mut cfg: BeitConfig,
    vocab_size: Option<usize>,
    target: MimTarget,
) -> (BeitConfig, Option<usize>) {
    match (vocab_size, target.required_vocab_size(&cfg)) {
        (Some(v), _) => {
            cfg.vocab_size = v;
            (cfg, None)
        }
        (None, Some(v)) => {
            cfg.vocab_size = v;
            (cfg, Some(v))
        }
        (None, None) => (cfg, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::recipes::presets::preset;

    #[test]
    fn a_fresh_pixel_model_predicts_each_pixel_of_a_patch() {
        let tiny = preset("tiny32").unwrap().config().unwrap();
        // tiny32: 4x4 patches of 1 channel -> 16 outputs.
        let (cfg, derived) = fresh_model_config(tiny.clone(), None, MimTarget::Pixels);
        assert_eq!((cfg.vocab_size, derived), (16, Some(16)));
        // base: 16x16 patches of 3 channels -> 768.
        let base = preset("base").unwrap().config().unwrap();
        assert_eq!(fresh_model_config(base, None, MimTarget::Pixels).1, Some(768));
        // Tokens keep the config's vocabulary; a given size wins for either target.
        let (cfg, derived) = fresh_model_config(tiny.clone(), None, MimTarget::VisualTokens);
        assert_eq!((cfg.vocab_size, derived), (8192, None));
        let (cfg, derived) = fresh_model_config(tiny, Some(512), MimTarget::Pixels);
        assert_eq!((cfg.vocab_size, derived), (512, None));
    }

    fn options(data: &str) -> PretrainDataOptions {
        PretrainDataOptions {
            data: data.into(),
            tokens: "auto".into(),
            tokenizer: None,
            masking: MaskingStrategy::Blockwise,
            batch: 2,
            loader_workers: 1,
            seed: 0,
        }
    }

    #[test]
    fn the_synthetic_task_masks_blocks_only() {
        let tiny = preset("tiny32").unwrap().config().unwrap();
        let (mut data, source) =
            PretrainData::open(&options(SYNTHETIC), &tiny, 24, 0, MimTarget::VisualTokens).unwrap();
        assert_eq!(source, TargetSource::Synthetic);
        assert_eq!(data.batch_at(0, 2).unwrap().shape[0], 2);
        let random = PretrainDataOptions { masking: MaskingStrategy::Random, ..options(SYNTHETIC) };
        assert!(PretrainData::open(&random, &tiny, 24, 0, MimTarget::VisualTokens).is_err());
    }
}
