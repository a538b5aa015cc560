//! A tokenizer training run over a dataset: the loop `beit tokenizer train` and
//! `beit_dvae_trainer_train` share. The batches are the loader's view 2 (a random resized crop
//! and flip at the tokenizer's resolution, mapped with DALL-E's `map_pixels`): exactly what the
//! tokenizer sees during pretraining.
//!
//! Step `n` of a trainer (its step count before the step) takes batch `n` of the dataset's
//! endless batch stream, epoch `n / batches_per_epoch`, position `n % batches_per_epoch`, as
//! the loader orders it for the run's seed. So a run is a pure function of the trainer, the
//! dataset and [`DvaeDataOptions`], and two runs of `a` and `b` steps give, bit for bit, one run
//! of `a + b` steps.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use super::dvae::{DvaeStepStats, DvaeTrainer};
use crate::context::Context;
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderConfig};
use crate::dvae::DvaeConfig;
use crate::error::Result;
use crate::resources::with_budget;

/// How a run draws its batches from a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DvaeDataOptions {
    /// Steps the run adds to the trainer.
    pub steps: usize,
    /// Images per step; an epoch drops its last incomplete batch.
    pub batch: usize,
    /// Smallest crop area fraction of the random resized crop, in (0, 1].
    pub crop_scale_min: f64,
    /// Loader threads building batches ahead of the steps (at least 1); the batches are the
    /// same for any number.
    pub workers: usize,
    /// Seeds the epochs' orders and the augmentations.
    pub seed: u64,
}

impl DvaeDataOptions {
    /// `steps` steps of `batch` images with `beit tokenizer train`'s defaults: crops of at
    /// least half the image, one loader thread, seed 0.
    pub fn new(steps: usize, batch: usize) -> Self {
        DvaeDataOptions { steps, batch, crop_scale_min: 0.5, workers: 1, seed: 0 }
    }

    /// The loader of epoch `epoch` for a tokenizer of `config`. Only view 2 is used; view 1 and
    /// its masks (the loader always makes them) are at the tokenizer's size and token grid, as
    /// `beit tokenizer train` has always drawn them, which keeps its runs reproducible.
    pub fn loader_config(&self, config: &DvaeConfig, epoch: u64) -> LoaderConfig {
        let (s, f) = (config.image_size, config.downsample());
        LoaderConfig {
            tokenizer_size: (s, s),
            scale: (self.crop_scale_min, 1.0),
            seed: self.seed,
            epoch,
            workers: self.workers,
            drop_last: true,
            ..LoaderConfig::beit(self.batch, (s, s), (f, f), 1)
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DvaeRunReport {
    /// Steps the run applied.
    pub steps: usize,
    /// Whether the step callback stopped the run before `steps` were done.
    pub stopped: bool,
    /// The last applied step's stats (`None` when the run applied none).
    pub last: Option<DvaeStepStats>,
    /// Wall-clock seconds of the run, the loader's start included.
    pub seconds: f64,
}

/// Trains `trainer` for `data.steps` steps on `dataset`'s images (see the module docs for which
/// batches), each step inside `ctx` (its thread pool and memory budget; the GPU when the trainer
/// runs there, [`DvaeTrainer::use_context`]). After each applied step `on_step` gets its stats
/// on the calling thread; [`ControlFlow::Break`] ends the run there, that step kept.
///
/// Everything that can be refused is checked before the first step: a dataset whose channel
/// count is not the tokenizer's, fewer images than one batch, loader options (crop scale,
/// workers, batch 0) and the memory of a step and of the loader; such a refusal changes nothing.
/// A step that fails (a non-finite loss: [`crate::error::Error::Numerical`]) ends the run with
/// its error; the steps before it stay applied (the trainer's step count says how many).
pub fn train_on_dataset(
    trainer: &mut DvaeTrainer,
    ctx: &Context,
    dataset: Arc<Dataset>,
    data: &DvaeDataOptions,
    mut on_step: impl FnMut(&DvaeStepStats) -> ControlFlow<()>,
) -> Result<DvaeRunReport> {
    let start = Instant::now();
    let config = trainer.dvae.config.clone();
    let channels = dataset.header().channels as usize;
    ensure!(
        channels == config.in_channels,
        InvalidArgument,
        "the dataset's images have {channels} channel(s) and the tokenizer takes {}: they must agree",
        config.in_channels
    );
    ensure!(data.workers >= 1, InvalidArgument, "a tokenizer training run needs at least 1 loader worker, got 0");
    let budget = ctx.memory_budget();
    with_budget(budget, || trainer.check_batch(data.batch))?;
    let first = trainer.step_count();
    let loader_at =
        |epoch: u64| with_budget(budget, || Loader::new(dataset.clone(), data.loader_config(&config, epoch)));
    let mut loader = loader_at(0)?;
    let per_epoch = loader.num_batches();
    ensure!(
        per_epoch > 0,
        InvalidArgument,
        "the dataset has fewer images ({}) than one batch ({})",
        dataset.len(),
        data.batch
    );
    let mut epoch = (first / per_epoch) as u64;
    if epoch != 0 {
        loader = loader_at(epoch)?;
    }
    let mut batches = loader.starting_at(first % per_epoch)?;
    let mut report = DvaeRunReport { steps: 0, stopped: false, last: None, seconds: 0.0 };
    while report.steps < data.steps {
        let Some(batch) = batches.next() else {
            epoch += 1;
            loader = loader_at(epoch)?;
            batches = loader.iter()?;
            continue;
        };
        let stats = ctx.run(|| trainer.step(&batch.view2))?;
        report.steps += 1;
        report.last = Some(stats);
        if on_step(&stats).is_break() {
            report.stopped = report.steps < data.steps;
            break;
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::ContextOptions;
    use crate::data::dataset::{DatasetSpec, DatasetWriter};
    use crate::dvae::Dvae;
    use crate::train::dvae::DvaeTrainOptions;

    fn config() -> DvaeConfig {
        DvaeConfig {
            vocab_size: 12,
            n_hid: 8,
            group_count: 2,
            n_blk_per_group: 1,
            decoder_n_init: Some(8),
            ..DvaeConfig::small_grey(8)
        }
    }

    fn trainer() -> DvaeTrainer {
        let options = DvaeTrainOptions { seed: 5, ..DvaeTrainOptions::for_steps(10) };
        DvaeTrainer::new(Dvae::new(config(), 3).unwrap(), options).unwrap()
    }

    /// `count` 10x10 images of `channels` channels with varied content.
    fn dataset(dir: &std::path::Path, count: usize, channels: u32) -> Arc<Dataset> {
        let path = dir.join(format!("d{channels}.beitds"));
        let spec = DatasetSpec { height: 10, width: 10, channels, labels: false, masks: false, token_grid: None };
        let mut w = DatasetWriter::create(&path, spec).unwrap();
        for i in 0..count {
            let px: Vec<u8> = (0..100 * channels as usize).map(|p| ((p * 37 + i * 91) % 256) as u8).collect();
            w.push(&px, None, None, None).unwrap();
        }
        w.finish().unwrap();
        Arc::new(Dataset::open(&path).unwrap())
    }

    fn context() -> Context {
        Context::new(&ContextOptions { threads: 2, ..Default::default() }).unwrap()
    }

    fn data(steps: usize) -> DvaeDataOptions {
        DvaeDataOptions { crop_scale_min: 0.3, seed: 9, ..DvaeDataOptions::new(steps, 3) }
    }

    fn bits(t: &DvaeTrainer) -> Vec<u32> {
        t.dvae.params.data.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn a_run_steps_through_the_epochs_in_order_and_split_runs_equal_one() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 11, 1); // 3 batches of 3 per epoch, 2 images dropped
        let ctx = context();
        // The reference: the loop `beit tokenizer train` ran before it moved here, written out.
        let mut reference = trainer();
        let mut reference_stats = Vec::new();
        'epochs: for epoch in 0.. {
            let loader = Loader::new(ds.clone(), data(7).loader_config(&config(), epoch)).unwrap();
            for batch in loader.iter().unwrap() {
                reference_stats.push(reference.step(&batch.view2).unwrap());
                if reference.step_count() == 7 {
                    break 'epochs;
                }
            }
        }

        let mut whole = trainer();
        let mut seen = Vec::new();
        let run = train_on_dataset(&mut whole, &ctx, ds.clone(), &data(7), |s| {
            seen.push(*s);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!((run.steps, run.stopped, whole.step_count()), (7, false, 7));
        assert_eq!(run.last, Some(seen[6]));
        assert_eq!(seen, reference_stats);
        assert_eq!(bits(&whole), bits(&reference));

        // 4 steps then 3 more (crossing into epoch 1 mid-run, resuming mid-epoch).
        let mut split = trainer();
        let mut seen = Vec::new();
        for steps in [4, 3] {
            train_on_dataset(&mut split, &ctx, ds.clone(), &data(steps), |s| {
                seen.push(*s);
                ControlFlow::Continue(())
            })
            .unwrap();
        }
        assert_eq!(seen, reference_stats);
        assert_eq!(bits(&split), bits(&reference));
    }

    #[test]
    fn break_ends_the_run_after_that_step() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 7, 1);
        let ctx = context();
        let mut t = trainer();
        let mut calls = 0;
        let run = train_on_dataset(&mut t, &ctx, ds.clone(), &data(5), |s| {
            calls += 1;
            if s.step == 1 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!((run.steps, run.stopped, calls, t.step_count()), (2, true, 2, 2));
        assert_eq!(run.last.unwrap().step, 1);
        // Breaking at the last step is no early stop.
        let run = train_on_dataset(&mut t, &ctx, ds, &data(1), |_| ControlFlow::Break(())).unwrap();
        assert_eq!((run.steps, run.stopped, t.step_count()), (1, false, 3));
    }

    #[test]
    fn refused_runs_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let grey = dataset(dir.path(), 5, 1);
        let rgb = dataset(dir.path(), 5, 3);
        let ctx = context();
        let mut t = trainer();
        let before = bits(&t);
        let mut refuse = |ds: &Arc<Dataset>, d: DvaeDataOptions, want: &str| {
            let err = train_on_dataset(&mut t, &ctx, ds.clone(), &d, |_| panic!("no step may run")).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        };
        refuse(&rgb, data(2), "3 channel(s) and the tokenizer takes 1");
        refuse(&grey, DvaeDataOptions { batch: 6, ..data(2) }, "fewer images (5) than one batch (6)");
        refuse(&grey, DvaeDataOptions { batch: 0, ..data(2) }, "at least one image");
        refuse(&grey, DvaeDataOptions { workers: 0, ..data(2) }, "at least 1 loader worker");
        refuse(&grey, DvaeDataOptions { crop_scale_min: 0.0, ..data(2) }, "crop scale");
        refuse(&grey, DvaeDataOptions { crop_scale_min: f64::NAN, ..data(2) }, "crop scale");
        assert_eq!((t.step_count(), bits(&t)), (0, before));
    }
}
