//! Pretraining batches from a dataset file: the loader's augmented views and masks, with the
//! visual-token targets taken either from the dataset's token cache (fast: tokens of the
//! un-augmented image, computed once by `beit tokenize`) or from the tokenizer run on each
//! batch's view 2 (faithful: BEiT's tokens of the augmented view), or no tokens at all for the
//! pixel-regression target (`MimTarget::Pixels`: the model regresses view 1's own pixels).
//!
//! Batches are addressed by a global position (the trainer's data position): epoch =
//! position / batches per epoch, so a resumed run continues with exactly the batches an
//! uninterrupted one would have seen.

use std::sync::Arc;

use super::dataset::Dataset;
use super::loader::{Loader, LoaderConfig, LoaderIter, MimBatchData};
use crate::data::batch::OwnedMimBatch;
use crate::dvae::Dvae;
use crate::error::Result;

/// Where the MIM targets come from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// The dataset's tokens section (the token cache).
    Cached,
    /// The tokenizer applied to every batch's view 2.
    Augmented(Arc<Dvae>),
    /// No visual tokens: the pixel target is view 1 itself, so batches carry no labels (empty).
    Pixels,
}

pub struct DatasetMim {
    loader: Loader,
    tokens: TokenSource,
    /// The running epoch iterator and the next global position it yields.
    running: Option<(u64, LoaderIter)>,
}

impl DatasetMim {
    /// Checks that the dataset, the loader's grids and the token source agree.
    pub fn new(dataset: Arc<Dataset>, config: LoaderConfig, tokens: TokenSource) -> Result<Self> {
        let h = dataset.header().clone();
        let grid = config.grid();
        match &tokens {
            TokenSource::Cached => {
                ensure!(
                    h.has_tokens(),
                    InvalidArgument,
                    "{} has no token cache: run `beit tokenize` on it, or pass a tokenizer",
                    dataset.path().display()
                );
                ensure!(
                    (h.token_grid_h as usize, h.token_grid_w as usize) == grid,
                    InvalidArgument,
                    "the token cache's grid is {}x{} but the model's patch grid is {}x{}",
                    h.token_grid_h,
                    h.token_grid_w,
                    grid.0,
                    grid.1
                );
                // A cached token belongs to a patch of the whole image: a crop, flip or jitter
                // of view 1 would pair the model's patches with other patches' tokens.
                ensure!(
                    config.keeps_whole_images(),
                    InvalidArgument,
                    "a token cache holds the tokens of whole, unflipped images, but this loader crops or \
                     flips view 1 (scale {:?}, ratio {:?}, flip {}, jitter {}): use LoaderConfig::whole_images, \
                     or tokens computed on the fly",
                    config.scale,
                    config.ratio,
                    config.flip_prob,
                    config.color_jitter
                );
            }
            TokenSource::Augmented(dvae) => {
                let c = &dvae.config;
                ensure!(
                    (c.grid(), c.grid()) == grid,
                    InvalidArgument,
                    "the tokenizer's grid is {0}x{0} but the model's patch grid is {1}x{2}",
                    c.grid(),
                    grid.0,
                    grid.1
                );
                ensure!(
                    config.tokenizer_size == (c.image_size, c.image_size),
                    InvalidArgument,
                    "the loader's tokenizer view is {:?} but the tokenizer takes {}x{}",
                    config.tokenizer_size,
                    c.image_size,
                    c.image_size
                );
                ensure!(
                    c.in_channels == h.channels as usize,
                    InvalidArgument,
                    "the tokenizer takes {} channels, the dataset has {}",
                    c.in_channels,
                    h.channels
                );
            }
            TokenSource::Pixels => {}
        }
        let loader = Loader::new(dataset, config)?;
        ensure!(loader.num_batches() > 0, InvalidArgument, "the dataset holds fewer images than one batch");
        Ok(DatasetMim { loader, tokens, running: None })
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.loader.num_batches() as u64
    }

    /// The loader behind the batches (its config, its dataset, the batches of an epoch).
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// Where the MIM targets come from.
    pub fn token_source(&self) -> &TokenSource {
        &self.tokens
    }

    /// The batch at global `position` with everything the loader made of it: both views, the
    /// masks, the class labels, and in `tokens` the MIM targets of the token source (the
    /// cached tokens, the tokenizer's tokens of view 2, or `None` for the pixel target).
    /// `position` is that batch's global position, `indices` its samples.
    pub fn batch_data_at(&mut self, position: u64) -> Result<MimBatchData> {
        let per_epoch = self.batches_per_epoch();
        let (epoch, within) = (position / per_epoch, (position % per_epoch) as usize);
        let reuse = matches!(&self.running, Some((next, _)) if *next == position);
        if !reuse {
            let loader = self.loader.with_epoch(epoch)?;
            self.running = Some((position, loader.starting_at(within)?));
        }
        let (next, iter) = self.running.as_mut().expect("set above");
        let mut data = iter.next().expect("position is inside the epoch");
        *next = if within + 1 == per_epoch as usize { u64::MAX } else { position + 1 };
        data.tokens = match &self.tokens {
            TokenSource::Cached => Some(data.tokens.expect("checked: the dataset has tokens")),
            TokenSource::Augmented(dvae) => Some(dvae.tokenize(&data.view2)?.into_iter().map(i64::from).collect()),
            TokenSource::Pixels => None,
        };
        Ok(data)
    }

    /// The batch at global `position`, as the trainer takes it: view 1, the masks and the
    /// token source's targets (empty for the pixel target).
    pub fn batch_at(&mut self, position: u64) -> Result<OwnedMimBatch> {
        let data = self.batch_data_at(position)?;
        Ok(OwnedMimBatch {
            shape: [data.indices.len(), data.channels, data.image_size.0, data.image_size.1],
            pixels: data.view1,
            bool_masked_pos: data.bool_masked_pos,
            labels: data.tokens.unwrap_or_default(),
        })
    }
}
