//! How good a trained tokenizer is: reconstruction error through the hard codes (tokenize, then
//! decode the one-hot tokens: what BEiT's targets actually carry), codebook usage, and a PNG
//! grid of originals beside reconstructions for a person to look at.

use std::path::Path;

use serde::Serialize;

use super::relaxation::perplexity;
use super::{unmap_pixels, Dvae};
use crate::error::{Error, Result};
use crate::resources::{Bytes, Need};

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ReconReport {
    pub images: usize,
    /// Mean squared error in [0, 1] pixel units (after `unmap_pixels`) of the reconstruction
    /// from the argmax tokens.
    pub recon_mse: f64,
    /// Perplexity of the token histogram over all images' grid positions.
    pub perplexity: f64,
    /// Distinct codes used.
    pub codes_used: usize,
}

/// Tokenizes and reconstructs `mapped` images `[B, C, H, W]`; returns the report and the
/// reconstructions (mapped space).
pub fn evaluate(dvae: &Dvae, mapped: &[f32]) -> Result<(ReconReport, Vec<f32>)> {
    let tokens = dvae.tokenize(mapped)?;
    let recon = dvae.decode(&tokens)?;
    let sq: f64 = recon.iter().zip(mapped).map(|(&r, &x)| ((unmap_pixels(r) - unmap_pixels(x)) as f64).powi(2)).sum();
    let mut used = vec![false; dvae.config.vocab_size];
    tokens.iter().for_each(|&t| used[t as usize] = true);
    let report = ReconReport {
        images: mapped.len() / dvae.image_len(),
        recon_mse: sq / mapped.len() as f64,
        perplexity: perplexity(&tokens, dvae.config.vocab_size),
        codes_used: used.iter().filter(|&&u| u).count(),
    };
    Ok((report, recon))
}

/// Writes a PNG of `pairs` images: each row holds `cols` originals followed by their
/// reconstructions, with a 1-pixel grey gutter. Both inputs are mapped `[B, C, S, S]`, C 1 or 3.
pub fn write_recon_grid(
    path: &Path,
    originals: &[f32],
    recons: &[f32],
    channels: usize,
    size: usize,
    cols: usize,
) -> Result<()> {
    ensure!(channels == 1 || channels == 3, InvalidArgument, "a grid needs 1 or 3 channels, not {channels}");
    ensure!(size > 0 && cols > 0, InvalidArgument, "a grid needs a positive image size and column count");
    let per = channels.checked_mul(size).and_then(|v| v.checked_mul(size)).unwrap_or(usize::MAX);
    let count = originals.len() / per;
    ensure!(
        count > 0 && recons.len() == originals.len(),
        InvalidArgument,
        "grid: originals and reconstructions differ"
    );
    let rows = count.div_ceil(cols);
    let cell = size + 1;
    let side = |n: usize, k: usize| n.checked_mul(k).and_then(|v| v.checked_mul(cell)).and_then(|v| v.checked_add(1));
    let (w, h) = match (side(cols, 2), side(rows, 1)) {
        (Some(w), Some(h)) if u32::try_from(w).is_ok() && u32::try_from(h).is_ok() => (w, h),
        _ => bail!(InvalidArgument, "a reconstruction grid of {rows} rows of {cols} image pairs is too large"),
    };
    Need::new(format!("a {w}x{h} reconstruction grid"), Bytes::of::<u8>(&[w, h, 3])).check()?;
    let (w, h) = (w as u32, h as u32);
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([128, 128, 128]));
    for i in 0..count {
        let (r, c) = (i / cols, i % cols);
        for (set, src) in [originals, recons].iter().enumerate() {
            let x0 = (set * cols + c) * cell + 1;
            let y0 = r * cell + 1;
            let data = &src[i * per..(i + 1) * per];
            for y in 0..size {
                for x in 0..size {
                    let at = |ch: usize| (unmap_pixels(data[ch * size * size + y * size + x]) * 255.0).round() as u8;
                    let px = if channels == 1 { [at(0); 3] } else { [at(0), at(1), at(2)] };
                    img.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(px));
                }
            }
        }
    }
    img.save(path).map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display())))
}
