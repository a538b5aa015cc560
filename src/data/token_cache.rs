//! The token cache: tokenize every image of a dataset once and store the token grids in the
//! dataset file's tokens section, so pretraining can take the fast path (cached tokens of the
//! un-augmented image) instead of running the tokenizer on every augmented view.

use std::path::Path;

use rayon::prelude::*;

use crate::data::dataset::{Dataset, DatasetHeader, DatasetSpec, DatasetWriter};
use crate::data::loader::{resample, Filter};
use crate::error::{Error, Result};
use crate::resources::{Bytes, Need};

use crate::dvae::{map_pixels, Dvae};

/// Images tokenized per pass.
const CACHE_BATCH: usize = 256;

/// Whether images of `channels` channels can be the tokenizer's input: the same count as its
/// `in_channels`, or grey images (replicated into every channel). Anything else is refused:
/// flattened into the tokenizer's `[C, S, S]` layout, three RGB planes for a grey tokenizer
/// would be read as three grey images.
pub fn check_dataset_channels(dvae: &Dvae, channels: usize) -> Result<()> {
    let want = dvae.config.in_channels;
    ensure!(
        channels == want || channels == 1,
        InvalidArgument,
        "the images have {channels} channels and the tokenizer takes {want}: they must agree (grey images are \
         replicated into every channel)"
    );
    Ok(())
}

/// The tokenizer's view of a whole image: HWC u8 → CHW in [0, 1], resized to `size`x`size` with
/// the loader's view-2 filter (Lanczos, antialiased), grey replicated when the tokenizer wants
/// more channels, then [`map_pixels`]. Refuses a channel count the tokenizer cannot take
/// ([`check_dataset_channels`]) and pixels that are not `height·width·channels` bytes.
pub fn tokenizer_input(pixels: &[u8], channels: usize, height: usize, width: usize, dvae: &Dvae) -> Result<Vec<f32>> {
    check_dataset_channels(dvae, channels)?;
    let plane = height.checked_mul(width).filter(|p| p.checked_mul(channels) == Some(pixels.len()));
    let Some(plane) = plane else {
        bail!(
            InvalidArgument,
            "an image of {height}x{width}x{channels} (HxWxC) has {} bytes, not {}",
            pixels.len(),
            height.saturating_mul(width).saturating_mul(channels)
        );
    };
    let mut img = vec![0.0f32; channels * plane];
    for (p, px) in pixels.chunks_exact(channels).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            img[ch * plane + p] = v as f32 * (1.0 / 255.0);
        }
    }
    let size = dvae.config.image_size;
    let resized = if (height, width) == (size, size) {
        img
    } else {
        resample(&img, channels, height, width, (0, 0, height, width), (size, size), Filter::Lanczos, false)
    };
    let want = dvae.config.in_channels;
    let out: Vec<f32> = if channels == want { resized } else { resized.repeat(want) };
    Ok(out.into_iter().map(map_pixels).collect())
}

/// Memory of turning `images` dataset images of `header`'s shape into tokenizer inputs: each
/// image's float copy and resampled planes, and the mapped inputs of all of them.
fn inputs_bytes(dvae: &Dvae, header: &DatasetHeader, images: usize) -> Bytes {
    let (h, w, c) = (header.height as usize, header.width as usize, header.channels as usize);
    let s = dvae.config.image_size;
    // The image as floats, the resampler's horizontal pass (c·h·s) and its output.
    let per_image = Bytes::floats(&[c, h, w]) + Bytes::floats(&[c, h, s]) + Bytes::floats(&[c, s, s]);
    per_image * images + Bytes::floats(&[images, dvae.image_len()])
}

/// The mapped tokenizer inputs `[B, C, S, S]` of the first `count` images of `ds` (all of them
/// when it has fewer), un-augmented ([`tokenizer_input`]): what a tokenizer is evaluated on.
/// Refuses a dataset whose channel count the tokenizer cannot take, and inputs that do not fit
/// the memory budget.
pub fn dataset_inputs(ds: &Dataset, dvae: &Dvae, count: usize) -> Result<Vec<f32>> {
    let h = ds.header();
    let channels = h.channels as usize;
    check_dataset_channels(dvae, channels)
        .map_err(|e| Error::InvalidArgument(format!("{}: {}", ds.path().display(), e.message())))?;
    let n = count.min(ds.len());
    Need::new(format!("the tokenizer inputs of {n} images of {}", ds.path().display()), inputs_bytes(dvae, h, n))
        .hint("evaluate fewer images")
        .check()?;
    let mut out = Vec::new();
    out.try_reserve_exact(n * dvae.image_len())
        .map_err(|_| Error::InvalidArgument(format!("cannot allocate the tokenizer inputs of {n} images")))?;
    for i in 0..n {
        out.extend(tokenizer_input(ds.pixels(i), channels, h.height as usize, h.width as usize, dvae)?);
    }
    Ok(out)
}

/// Writes `out`: a copy of `input` (pixels, labels, masks) whose every sample carries the visual
/// tokens `dvae` assigns to the whole image. `progress` hears the count done after each pass.
/// The channel count, the passes and the sections the writer keeps in memory are checked
/// before the output file is created.
pub fn tokenize_dataset(
    dvae: &Dvae,
    input: &Dataset,
    out: &Path,
    mut progress: impl FnMut(usize),
) -> Result<DatasetHeader> {
    let h = input.header().clone();
    let channels = h.channels as usize;
    check_dataset_channels(dvae, channels)
        .map_err(|e| Error::InvalidArgument(format!("{}: {}", input.path().display(), e.message())))?;
    let per_pass = CACHE_BATCH.min(input.len());
    let c = &dvae.config;
    Need::new(
        format!("tokenizing {per_pass} images of {} per pass", input.path().display()),
        inputs_bytes(dvae, &h, per_pass) + dvae.nets.encoder.pass_bytes(per_pass.min(dvae.chunk_images()), false),
    )
    .check()?;
    let grid = c.grid() as u32;
    let spec = DatasetSpec {
        height: h.height,
        width: h.width,
        channels: h.channels,
        labels: h.has_labels(),
        masks: h.has_masks(),
        token_grid: Some((grid, grid)),
    };
    let mut writer = DatasetWriter::create(out, spec)?;
    writer.reserve(input.len())?;
    let per_image = c.tokens_per_image();
    for start in (0..input.len()).step_by(CACHE_BATCH) {
        let end = (start + CACHE_BATCH).min(input.len());
        let views: Vec<Vec<f32>> = (start..end)
            .into_par_iter()
            .map(|i| tokenizer_input(input.pixels(i), channels, h.height as usize, h.width as usize, dvae))
            .collect::<Result<_>>()?;
        let mapped = views.concat();
        let tokens = dvae.tokenize(&mapped)?;
        for (k, i) in (start..end).enumerate() {
            let grid_tokens: Vec<u16> = tokens[k * per_image..(k + 1) * per_image].iter().map(|&t| t as u16).collect();
            writer.push(input.pixels(i), input.label(i), input.mask(i), Some(&grid_tokens))?;
        }
        progress(end);
    }
    writer.finish()
}
