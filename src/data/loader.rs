//! BEiT's two-view pretraining data pipeline over a [`Dataset`] (BEIT_SPEC §6, unilm
//! `DataAugmentationForBEiT`): optional colour jitter (colour data only) → horizontal flip →
//! one random resized crop, resampled twice: view 1 at the model's resolution (bicubic),
//! normalised with a per-channel mean/std, for the patches; view 2 at the tokenizer's resolution
//! (Lanczos) with the tokenizer's pixel mapping (DALL-E `map_pixels`: x·(1−2ε)+ε, ε = 0.1, on
//! [0,1] pixels). Each image also gets a block-wise mask ([`MaskingGenerator::beit`] with a
//! configurable minimum block), with at least one masked patch.
//!
//! Everything is a pure function of (seed, epoch, position): the order of epoch `e` is a
//! permutation drawn from ChaCha8 keyed by (seed, e), and sample `p` of that order draws its
//! augmentation and mask from ChaCha8 keyed by (seed, e) on stream `p`. Batches are therefore
//! bit-identical for any number of worker threads and any timing, and [`Loader::starting_at`]
//! resumes a run at a batch position exactly.
//!
//! Resampling follows PIL's (torchvision's backend for these transforms) separable, antialiased
//! convolution with bicubic (a = −0.5) and Lanczos-3 kernels, in f32 without PIL's rounding to
//! u8 between passes; results are clamped to [0, 1].

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::batch::OwnedMimBatch;
use crate::data::dataset::Dataset;
use crate::data::masking::{MaskingGenerator, MaskingStrategy};
use crate::error::Result;
use crate::resources::{Bytes, Need, MAX_IMAGE_SIDE, MAX_LOADER_WORKERS};

/// Everything that determines the batches of a [`Loader`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// View 1 (model input) `(height, width)`.
    pub image_size: (usize, usize),
    /// View 2 (tokenizer input) `(height, width)`; BEiT: half of `image_size` (224 → 112).
    pub tokenizer_size: (usize, usize),
    /// Patch size of the model; the mask grid is `image_size / patch_size`.
    pub patch_size: (usize, usize),
    /// Patches masked per image (the block-wise generator may mask slightly fewer).
    pub masked_patches: usize,
    /// Smallest mask block area tried (BEiT pretraining: 16); at most `masked_patches`.
    pub min_mask_block: usize,
    /// Block-wise (BEiT) or uniformly random patches (the ablation).
    pub masking: MaskingStrategy,
    pub seed: u64,
    /// The epoch whose order and augmentations [`Loader::iter`] produces.
    pub epoch: u64,
    /// Worker threads producing batches (at least 1).
    pub workers: usize,
    /// Batches produced ahead of the consumer, in total over the workers (at least 1 each).
    pub prefetch: usize,
    /// Random resized crop: fraction of the image area (BEiT: (0.08, 1.0)).
    pub scale: (f64, f64),
    /// Random resized crop: aspect ratio w/h range (BEiT: (3/4, 4/3)).
    pub ratio: (f64, f64),
    /// Horizontal flip probability (BEiT: 0.5).
    pub flip_prob: f64,
    /// View 1 normalisation `(x − mean) / std` per channel on [0, 1] pixels; one entry per
    /// dataset channel, or one entry used for every channel.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// View 2 mapping `x·(1 − 2ε) + ε` on [0, 1] pixels (DALL-E `map_pixels`: ε = 0.1).
    pub tokenizer_eps: f32,
    /// Colour jitter strength for brightness, contrast and saturation (first BEiT release: 0.4;
    /// 0 disables; at most 1). Applied only to 3-channel data; grey data has none.
    pub color_jitter: f32,
    /// Drop the last incomplete batch of an epoch.
    pub drop_last: bool,
}

impl LoaderConfig {
    /// BEiT's pretraining pipeline for a model with input `image_size` and `patch_size`:
    /// tokenizer view at half resolution, mask blocks of at least 16 patches (or `masked`, if
    /// smaller), crop scale (0.08, 1), ratio (3/4, 4/3), flip 0.5,
    /// normalisation mean 0.5 / std 0.5 (the 22k setting), ε = 0.1, no colour jitter, one worker,
    /// prefetch 2, drop_last false.
    pub fn beit(batch_size: usize, image_size: (usize, usize), patch_size: (usize, usize), masked: usize) -> Self {
        LoaderConfig {
            batch_size,
            image_size,
            tokenizer_size: (image_size.0.div_ceil(2), image_size.1.div_ceil(2)),
            patch_size,
            masked_patches: masked,
            min_mask_block: 16.min(masked),
            masking: MaskingStrategy::Blockwise,
            seed: 0,
            epoch: 0,
            workers: 1,
            prefetch: 2,
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            flip_prob: 0.5,
            mean: vec![0.5],
            std: vec![0.5],
            tokenizer_eps: 0.1,
            color_jitter: 0.0,
            drop_last: false,
        }
    }

    /// Mask grid `(rows, cols)`.
    pub fn grid(&self) -> (usize, usize) {
        (self.image_size.0 / self.patch_size.0, self.image_size.1 / self.patch_size.1)
    }

    /// This pipeline with view 1 the whole image, never flipped or colour-jittered (only
    /// resized to `image_size` and normalised): what a token cache needs, since it holds the
    /// tokens of each whole, unaltered image.
    pub fn whole_images(self) -> Self {
        LoaderConfig { scale: (1.0, 1.0), ratio: (1.0, 1.0), flip_prob: 0.0, color_jitter: 0.0, ..self }
    }

    /// Whether view 1 is always the whole, unaltered image ([`LoaderConfig::whole_images`]).
    pub fn keeps_whole_images(&self) -> bool {
        self.scale == (1.0, 1.0) && self.ratio == (1.0, 1.0) && self.flip_prob == 0.0 && self.color_jitter == 0.0
    }
}

/// One augmented batch. `B` is `indices.len()` (the last batch of an epoch may be short).
#[derive(Debug, Clone, PartialEq)]
pub struct MimBatchData {
    /// Epoch-relative batch position.
    pub position: usize,
    /// Channels of both views (the dataset's).
    pub channels: usize,
    /// View 1 `(H, W)`.
    pub image_size: (usize, usize),
    /// View 2 `(H2, W2)`.
    pub tokenizer_size: (usize, usize),
    /// View 1, f32 `[B, C, H, W]`, normalised.
    pub view1: Vec<f32>,
    /// View 2, f32 `[B, C, H2, W2]`, tokenizer pixel mapping applied.
    pub view2: Vec<f32>,
    /// u8 `[B, N]`, 1 = masked.
    pub bool_masked_pos: Vec<u8>,
    /// Class labels, if the dataset has them.
    pub labels: Option<Vec<u32>>,
    /// Cached visual tokens i64 `[B, N]`, if the dataset has token grids. These are the tokens
    /// of the un-augmented image, so after the flip and crop they only approximate the tokens of
    /// view 1; the faithful path tokenizes view 2.
    pub tokens: Option<Vec<i64>>,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
}

impl MimBatchData {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// What the trainer consumes: view 1, the masks and the cached tokens as labels (`None`
    /// without cached tokens; see [`MimBatchData::tokens`] for why they are approximate).
    pub fn to_owned_mim_batch(&self) -> Option<OwnedMimBatch> {
        Some(OwnedMimBatch {
            shape: [self.len(), self.channels, self.image_size.0, self.image_size.1],
            pixels: self.view1.clone(),
            bool_masked_pos: self.bool_masked_pos.clone(),
            labels: self.tokens.clone()?,
        })
    }
}

/// Builds batches from a shared dataset; see the module docs.
#[derive(Debug, Clone)]
pub struct Loader {
    dataset: Arc<Dataset>,
    config: LoaderConfig,
    order: Arc<Vec<usize>>,
}

const DOMAIN_ORDER: u64 = 0x004f_5244_4552; // "ORDER"
const DOMAIN_SAMPLE: u64 = 0x0000_5341_4d50_4c45; // "SAMPLE"
const DOMAIN_MASK: u64 = 0x0000_0000_4d41_534b; // "MASK"

/// ChaCha8 keyed by (seed, epoch, domain) on stream `stream`.
fn rng_for(seed: u64, epoch: u64, domain: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[0..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&domain.to_le_bytes());
    key[24..32].copy_from_slice(b"beitload");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// The visiting order of epoch `epoch`: a permutation of `0..n` from ChaCha8 keyed by (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng_for(seed, epoch, DOMAIN_ORDER, 0));
    order
}

/// Checks a per-channel normalisation `(x − mean) / std` for `channels`-channel images: one
/// value for every channel, or exactly one per channel; every value finite and no std zero.
/// `who` starts the message ("loader", "segmentation fine-tuning").
pub fn check_normalisation(mean: &[f32], std: &[f32], channels: usize, who: &str) -> Result<()> {
    for (name, v) in [("mean", mean), ("std", std)] {
        ensure!(
            v.len() == 1 || v.len() == channels,
            InvalidArgument,
            "{who}: {name} has {} values for {channels}-channel images; give one value, or one per channel",
            v.len()
        );
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            bail!(InvalidArgument, "{who}: {name} value {x} is not a finite number");
        }
    }
    ensure!(std.iter().all(|&s| s != 0.0), InvalidArgument, "{who}: std must be nonzero, got {std:?}");
    Ok(())
}

/// The memory a loader over images of `header`'s shape needs with `config`, estimated from
/// above: every batch that can be in flight (each worker's bounded queue, the one each worker
/// is building and the consumer's), each worker's scratch for the image it augments and its
/// stack, and the epoch's visiting order of `len` samples.
fn loader_bytes(header: &crate::data::dataset::DatasetHeader, len: usize, config: &LoaderConfig) -> Bytes {
    let c = header.channels as usize;
    let (ih, iw) = (header.height as usize, header.width as usize);
    let (h, w) = config.image_size;
    let (h2, w2) = config.tokenizer_size;
    let n = config.grid().0 * config.grid().1;
    let b = config.batch_size.min(len).max(1);
    let per_image = Bytes::floats(&[c, h, w])
        + Bytes::floats(&[c, h2, w2])
        + Bytes::of::<u8>(&[n])
        + Bytes::of::<usize>(&[1])
        + if header.has_labels() { Bytes::of::<u32>(&[1]) } else { Bytes::ZERO }
        + if header.has_tokens() { Bytes::of::<i64>(&[n]) } else { Bytes::ZERO };
    let batch = per_image * b + Bytes::of::<MimBatchData>(&[1]);
    let workers = config.workers.max(1);
    let depth = config.prefetch.div_ceil(workers).max(1);
    let in_flight = workers.checked_mul(depth.saturating_add(1)).and_then(|k| k.checked_add(1));
    // The image as floats, then per view the resampler's horizontal pass and its output.
    let scratch = Bytes::floats(&[c, ih, iw])
        + Bytes::floats(&[c, ih, w.max(w2)]) * 2
        + Bytes::floats(&[c, h, w])
        + Bytes::floats(&[c, h2, w2]);
    let in_flight_bytes = in_flight.map_or(Bytes::from(None), |k| batch * k);
    in_flight_bytes + (scratch + Bytes::new(WORKER_STACK as u64)) * workers + Bytes::of::<usize>(&[len])
}

/// Stack of a loader worker thread (Rust's default for spawned threads, set explicitly so the
/// budget counts what is reserved: under an address-space limit the stacks count too).
const WORKER_STACK: usize = 2 << 20;

impl Loader {
    /// Checks `config` against the dataset and the memory budget, and draws the epoch's order.
    pub fn new(dataset: Arc<Dataset>, config: LoaderConfig) -> Result<Self> {
        let h = dataset.header();
        let c = h.channels as usize;
        ensure!(config.batch_size > 0, InvalidArgument, "loader: batch size must be positive, got 0");
        ensure!(
            config.workers <= MAX_LOADER_WORKERS,
            InvalidArgument,
            "loader: {} worker threads requested; at most {MAX_LOADER_WORKERS}",
            config.workers
        );
        ensure!(
            config.image_size.0 > 0
                && config.image_size.1 > 0
                && config.tokenizer_size.0 > 0
                && config.tokenizer_size.1 > 0,
            InvalidArgument,
            "loader: image sizes must be positive"
        );
        for (name, (sh, sw)) in [("image size", config.image_size), ("tokenizer view size", config.tokenizer_size)] {
            ensure!(
                sh <= MAX_IMAGE_SIDE && sw <= MAX_IMAGE_SIDE,
                InvalidArgument,
                "loader: {name} {sh}x{sw} is larger than {MAX_IMAGE_SIDE} pixels a side"
            );
        }
        ensure!(
            config.patch_size.0 > 0
                && config.patch_size.1 > 0
                && config.image_size.0.is_multiple_of(config.patch_size.0)
                && config.image_size.1.is_multiple_of(config.patch_size.1),
            InvalidArgument,
            "loader: image size {:?} is not a multiple of patch size {:?}",
            config.image_size,
            config.patch_size
        );
        let (gh, gw) = config.grid();
        ensure!(
            config.masked_patches >= 1 && config.masked_patches < gh * gw,
            InvalidArgument,
            "loader: {} masked patches for a {gh}x{gw} grid",
            config.masked_patches
        );
        ensure!(
            (1..=config.masked_patches).contains(&config.min_mask_block),
            InvalidArgument,
            "loader: minimum mask block {} must be in 1..={}",
            config.min_mask_block,
            config.masked_patches
        );
        ensure!(
            0.0 < config.scale.0 && config.scale.0 <= config.scale.1 && config.scale.1 <= 1.0,
            InvalidArgument,
            "loader: crop scale {:?} must satisfy 0 < min <= max <= 1",
            config.scale
        );
        ensure!(
            0.0 < config.ratio.0 && config.ratio.0 <= config.ratio.1,
            InvalidArgument,
            "loader: crop ratio {:?} must satisfy 0 < min <= max",
            config.ratio
        );
        ensure!((0.0..=1.0).contains(&config.flip_prob), InvalidArgument, "loader: flip probability outside [0, 1]");
        check_normalisation(&config.mean, &config.std, c, "loader")?;
        ensure!((0.0..=1.0).contains(&config.color_jitter), InvalidArgument, "loader: colour jitter must be in [0, 1]");
        if h.has_tokens() {
            ensure!(
                h.token_grid_h as usize == gh && h.token_grid_w as usize == gw,
                InvalidArgument,
                "loader: dataset token grid {}x{} differs from the patch grid {gh}x{gw}",
                h.token_grid_h,
                h.token_grid_w
            );
        }
        let b = config.batch_size.min(dataset.len()).max(1);
        Need::new(
            format!(
                "the loader ({} worker(s), prefetch {}, batches of {b} images {}x{} and {}x{} of {c} channel(s))",
                config.workers.max(1),
                config.prefetch,
                config.image_size.0,
                config.image_size.1,
                config.tokenizer_size.0,
                config.tokenizer_size.1
            ),
            loader_bytes(h, dataset.len(), &config),
        )
        .hint("use a smaller batch, fewer loader workers or a smaller prefetch")
        .check()?;
        let order = Arc::new(epoch_order(dataset.len(), config.seed, config.epoch));
        Ok(Loader { dataset, config, order })
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }
    /// Dataset indices in this epoch's visiting order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Batches in this epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The same loader for another epoch (new order and augmentations).
    pub fn with_epoch(&self, epoch: u64) -> Result<Self> {
        Loader::new(self.dataset.clone(), LoaderConfig { epoch, ..self.config.clone() })
    }

    /// Builds batch `position` of the epoch on the calling thread. Panics if out of range.
    pub fn batch(&self, position: usize) -> MimBatchData {
        assert!(position < self.num_batches(), "batch {position} out of range ({} batches)", self.num_batches());
        let cfg = &self.config;
        let ds = &self.dataset;
        let c = ds.header().channels as usize;
        let (h, w) = cfg.image_size;
        let (h2, w2) = cfg.tokenizer_size;
        let (gh, gw) = cfg.grid();
        let n = gh * gw;
        let start = position * cfg.batch_size;
        let end = (start + cfg.batch_size).min(ds.len());
        let indices: Vec<usize> = self.order[start..end].to_vec();
        let b = indices.len();
        let mut view1 = vec![0.0f32; b * c * h * w];
        let mut view2 = vec![0.0f32; b * c * h2 * w2];
        let mut masks = vec![0u8; b * n];
        let generator = MaskingGenerator {
            min_num_patches: cfg.min_mask_block,
            ..MaskingGenerator::beit(gh, gw, cfg.masked_patches)
        };
        let mean: Vec<f32> = (0..c).map(|k| cfg.mean[k.min(cfg.mean.len() - 1)]).collect();
        let std: Vec<f32> = (0..c).map(|k| cfg.std[k.min(cfg.std.len() - 1)]).collect();
        let eps = cfg.tokenizer_eps;
        for (k, &idx) in indices.iter().enumerate() {
            let stream = (start + k) as u64;
            let mut rng = rng_for(cfg.seed, cfg.epoch, DOMAIN_SAMPLE, stream);
            let (v1, v2) = self.augment(ds.pixels(idx), &mut rng);
            let o1 = &mut view1[k * c * h * w..(k + 1) * c * h * w];
            for ch in 0..c {
                let (m, s) = (mean[ch], std[ch]);
                for (o, &x) in o1[ch * h * w..(ch + 1) * h * w].iter_mut().zip(&v1[ch * h * w..(ch + 1) * h * w]) {
                    *o = (x - m) / s;
                }
            }
            for (o, &x) in view2[k * c * h2 * w2..(k + 1) * c * h2 * w2].iter_mut().zip(&v2) {
                *o = x * (1.0 - 2.0 * eps) + eps;
            }
            let mut mrng = rng_for(cfg.seed, cfg.epoch, DOMAIN_MASK, stream);
            let mask = &mut masks[k * n..(k + 1) * n];
            // The generator can (rarely) place no block at all; redraw, and as a last resort
            // mask one random patch, so every image has at least one masked patch.
            if !(0..100).any(|_| generator.generate_with(cfg.masking, &mut mrng, mask) > 0) {
                mask[mrng.random_range(0..n)] = 1;
            }
        }
        let labels = ds.header().has_labels().then(|| indices.iter().map(|&i| ds.label(i).unwrap()).collect());
        let tokens = ds.header().has_tokens().then(|| {
            indices
                .iter()
                .flat_map(|&i| ds.tokens_le_bytes(i).unwrap().chunks_exact(2))
                .map(|t| u16::from_le_bytes([t[0], t[1]]) as i64)
                .collect()
        });
        MimBatchData {
            position,
            channels: c,
            image_size: (h, w),
            tokenizer_size: (h2, w2),
            view1,
            view2,
            bool_masked_pos: masks,
            labels,
            tokens,
            indices,
        }
    }

    /// Both views of one HWC u8 image, as CHW f32 in [0, 1] before normalisation / mapping.
    fn augment(&self, pixels: &[u8], rng: &mut ChaCha8Rng) -> (Vec<f32>, Vec<f32>) {
        let cfg = &self.config;
        let hd = self.dataset.header();
        let (ih, iw, c) = (hd.height as usize, hd.width as usize, hd.channels as usize);
        let mut img = vec![0.0f32; c * ih * iw];
        for (p, px) in pixels.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                img[ch * ih * iw + p] = v as f32 * (1.0 / 255.0);
            }
        }
        if cfg.color_jitter > 0.0 && c == 3 {
            color_jitter(&mut img, ih * iw, cfg.color_jitter, rng);
        }
        let flip = rng.random::<f64>() < cfg.flip_prob;
        let crop = random_resized_crop_params(ih, iw, cfg.scale, cfg.ratio, rng);
        let (top, left, ch_, cw) = crop;
        // Flip-then-crop equals cropping the mirrored box and mirroring the crop.
        let box_left = if flip { iw - left - cw } else { left };
        let v1 = resample(&img, c, ih, iw, (top, box_left, ch_, cw), cfg.image_size, Filter::Bicubic, flip);
        let v2 = resample(&img, c, ih, iw, (top, box_left, ch_, cw), cfg.tokenizer_size, Filter::Lanczos, flip);
        (v1, v2)
    }

    /// Batches from position 0 of the epoch.
    pub fn iter(&self) -> Result<LoaderIter> {
        self.starting_at(0)
    }

    /// Batches from batch `position` on: identical to skipping `position` batches of
    /// [`Loader::iter`], without computing them. Starts the worker threads; when the system
    /// refuses one, the ones started are stopped and the error says so.
    pub fn starting_at(&self, position: usize) -> Result<LoaderIter> {
        let workers = self.config.workers.max(1);
        let end = self.num_batches();
        let depth = self.config.prefetch.div_ceil(workers).max(1);
        let mut iter = LoaderIter {
            next: position,
            end,
            start: position,
            receivers: Vec::with_capacity(workers),
            handles: Vec::with_capacity(workers),
        };
        // Worker w builds positions ≡ position + w (mod workers), in order, each into its own
        // bounded channel; the iterator reads the channels round-robin, so order is fixed.
        for w in 0..workers {
            let (tx, rx) = sync_channel(depth);
            let loader = self.clone();
            let first = position + w;
            let builder = std::thread::Builder::new().name(format!("beit-loader-{w}")).stack_size(WORKER_STACK);
            let spawned = builder.spawn(move || {
                let mut p = first;
                while p < end {
                    if tx.send(loader.batch(p)).is_err() {
                        return;
                    }
                    p += workers;
                }
            });
            match spawned {
                Ok(handle) => {
                    iter.handles.push(handle);
                    iter.receivers.push(rx);
                }
                // Dropping `iter` stops and joins the workers already running.
                Err(e) => bail!(
                    InvalidArgument,
                    "loader: cannot start worker thread {} of {workers}: {e}; use fewer loader workers",
                    w + 1
                ),
            }
        }
        Ok(iter)
    }
}

/// Batches of one epoch, produced by worker threads; dropping it stops them.
pub struct LoaderIter {
    next: usize,
    end: usize,
    start: usize,
    receivers: Vec<Receiver<MimBatchData>>,
    handles: Vec<JoinHandle<()>>,
}

impl Iterator for LoaderIter {
    type Item = MimBatchData;

    fn next(&mut self) -> Option<MimBatchData> {
        if self.next >= self.end {
            return None;
        }
        let w = (self.next - self.start) % self.receivers.len();
        match self.receivers[w].recv() {
            Ok(batch) => {
                self.next += 1;
                Some(batch)
            }
            Err(_) => {
                // The worker died (a panic); surface it rather than silently ending the epoch.
                self.next = self.end;
                let handle = self.handles.remove(w);
                if let Err(e) = handle.join() {
                    std::panic::resume_unwind(e);
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for LoaderIter {}

impl Drop for LoaderIter {
    fn drop(&mut self) {
        self.receivers.clear(); // blocked senders fail and their workers return
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// torchvision `RandomResizedCrop.get_params`: `(top, left, height, width)` of the crop box.
pub fn random_resized_crop_params(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * (scale.0 + (scale.1 - scale.0) * rng.random::<f64>());
        let aspect = (lr0 + (lr1 - lr0) * rng.random::<f64>()).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    // Fallback: central crop clamped to the ratio range.
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0 {
        (((width as f64 / ratio.0).round_ties_even() as usize).clamp(1, height), width)
    } else if in_ratio > ratio.1 {
        (height, ((height as f64 * ratio.1).round_ties_even() as usize).clamp(1, width))
    } else {
        (height, width)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// torchvision `ColorJitter(s, s, s)` on CHW [0,1] RGB: brightness, contrast and saturation
/// factors uniform in [max(0, 1−s), 1+s], applied in a random order.
fn color_jitter(img: &mut [f32], plane: usize, s: f32, rng: &mut impl Rng) {
    let lo = (1.0 - s).max(0.0) as f64;
    let hi = (1.0 + s) as f64;
    let mut ops = [0usize, 1, 2];
    ops.shuffle(rng);
    let grey = |img: &[f32], p: usize| 0.299 * img[p] + 0.587 * img[plane + p] + 0.114 * img[2 * plane + p];
    for op in ops {
        let f = (lo + (hi - lo) * rng.random::<f64>()) as f32;
        match op {
            0 => img.iter_mut().for_each(|x| *x = (*x * f).clamp(0.0, 1.0)),
            1 => {
                let mean = (0..plane).map(|p| grey(img, p)).sum::<f32>() / plane as f32;
                img.iter_mut().for_each(|x| *x = (*x * f + mean * (1.0 - f)).clamp(0.0, 1.0));
            }
            _ => {
                for p in 0..plane {
                    let g = grey(img, p);
                    for ch in 0..3 {
                        let x = &mut img[ch * plane + p];
                        *x = (*x * f + g * (1.0 - f)).clamp(0.0, 1.0);
                    }
                }
            }
        }
    }
}

/// Resampling kernel (PIL's definitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Bilinear (triangle), support 1.
    Bilinear,
    /// Bicubic, a = −0.5, support 2.
    Bicubic,
    /// Lanczos-3, support 3.
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }
    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        let px = x * std::f64::consts::PI;
                        px.sin() / px
                    }
                };
                if x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// PIL's `precompute_coeffs` for `in0..in0+in_len` of an axis resampled to `out` samples:
/// per output sample, the first input index and its normalised weights.
fn coefficients(in0: usize, in_len: usize, out: usize, filter: Filter) -> Vec<(usize, Vec<f32>)> {
    let scale = in_len as f64 / out as f64;
    let fscale = scale.max(1.0);
    let support = filter.support() * fscale;
    (0..out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(in_len);
            let mut w: Vec<f64> = (lo..hi).map(|i| filter.eval((i as f64 - center + 0.5) / fscale)).collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (in0 + lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Crops `(top, left, h, w)` from CHW planes `channels x in_h x in_w`, resamples it to `out`
/// `(height, width)` with `filter` (antialiased when shrinking, as PIL), mirrors it horizontally
/// if `mirror`, and clamps to [0, 1]. Returns CHW planes.
#[allow(clippy::too_many_arguments)]
pub fn resample(
    input: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    crop: (usize, usize, usize, usize),
    out: (usize, usize),
    filter: Filter,
    mirror: bool,
) -> Vec<f32> {
    let (top, left, ch, cw) = crop;
    assert_eq!(input.len(), channels * in_h * in_w);
    assert!(top + ch <= in_h && left + cw <= in_w && ch > 0 && cw > 0, "crop box outside the image");
    let (oh, ow) = out;
    let xs = coefficients(left, cw, ow, filter);
    let ys = coefficients(top, ch, oh, filter);
    // Horizontal pass over the crop's rows: [channels, ch, ow].
    let mut tmp = vec![0.0f32; channels * ch * ow];
    for c in 0..channels {
        for y in 0..ch {
            let row = &input[c * in_h * in_w + (top + y) * in_w..][..in_w];
            let dst = &mut tmp[(c * ch + y) * ow..][..ow];
            for (ox, (x0, w)) in xs.iter().enumerate() {
                let v: f32 = w.iter().zip(&row[*x0..]).map(|(a, b)| a * b).sum();
                dst[if mirror { ow - 1 - ox } else { ox }] = v;
            }
        }
    }
    // Vertical pass.
    let mut outv = vec![0.0f32; channels * oh * ow];
    for c in 0..channels {
        for (oy, (y0, w)) in ys.iter().enumerate() {
            let dst = &mut outv[(c * oh + oy) * ow..][..ow];
            for (k, &wk) in w.iter().enumerate() {
                let src = &tmp[(c * ch + y0 - top + k) * ow..][..ow];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d += wk * s;
                }
            }
            dst.iter_mut().for_each(|d| *d = d.clamp(0.0, 1.0));
        }
    }
    outv
}
