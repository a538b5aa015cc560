//! How good a trained tokenizer is: reconstruction error through the hard codes (tokenize, then
//! decode the one-hot tokens: what BEiT's targets actually carry), codebook usage, and a PNG
//! grid of originals beside reconstructions for a person to look at.

use std::path::Path;

use serde::Serialize;

use super::relaxation::perplexity;
use super::{unmap_pixels, Dvae};
use crate::error::{Error, Result};

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
    let per = channels * size * size;
    let count = originals.len() / per;
    ensure!(
        count > 0 && recons.len() == originals.len(),
        InvalidArgument,
        "grid: originals and reconstructions differ"
    );
    let rows = count.div_ceil(cols);
    let cell = size + 1;
    let (w, h) = ((2 * cols * cell + 1) as u32, (rows * cell + 1) as u32);
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
