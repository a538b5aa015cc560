//! The visual tokenizer: a discrete VAE whose encoder maps an image to a grid of codes (BEiT's
//! prediction targets). The encoder is DALL-E's architecture, so OpenAI's trained encoder can be
//! imported (`scripts/convert_dalle_encoder.py`) and gives that model's tokens; a smaller one
//! with a decoder can be trained (by the trainer layer above, `train::dvae`, and `beit tokenizer train`).
//!
//! Pixels entering the encoder are `map_pixels(x) = 0.8·x + 0.1` of images in [0, 1]
//! (DALL-E's `map_pixels`, ε = 0.1); the decoder reconstructs in that same space.

/// cbindgen:ignore
pub mod config;
pub mod eval;
pub mod network;
pub mod relaxation;

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::io::{self, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::params::ParamStore;
use crate::resources::{Bytes, Need};

pub use config::DvaeConfig;
use network::{Decoder, DvaeNetworks};

/// DALL-E's pixel mapping: `x·(1 − 2ε) + ε` with ε = 0.1, for x in [0, 1].
pub const MAP_PIXELS_EPS: f32 = 0.1;

pub fn map_pixels(x: f32) -> f32 {
    x * (1.0 - 2.0 * MAP_PIXELS_EPS) + MAP_PIXELS_EPS
}

/// The inverse of [`map_pixels`], clamped to [0, 1] (DALL-E's `unmap_pixels`).
pub fn unmap_pixels(x: f32) -> f32 {
    ((x - MAP_PIXELS_EPS) / (1.0 - 2.0 * MAP_PIXELS_EPS)).clamp(0.0, 1.0)
}

/// Feature-map values (first-group width × pixels) per tokenizing pass: bounds the activations
/// of one pass to a few 32 MB buffers while keeping the GEMMs of small images large (256
/// Fashion-MNIST images per pass; 2 images per pass for a DALL-E encoder at 112 px).
const TOKENIZE_CHUNK_VALUES: usize = 8 << 20;

/// A tokenizer: configuration, parameters and networks.
#[derive(Debug, Clone)]
pub struct Dvae {
    pub config: DvaeConfig,
    pub params: ParamStore,
    pub nets: DvaeNetworks,
}

impl Dvae {
    /// A freshly initialised tokenizer (DALL-E's init: convolution weights from a normal of
    /// std 1/√fan_in, biases zero), the same for the same seed.
    pub fn new(config: DvaeConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let (mut params, nets) = DvaeNetworks::build(&config)?;
        crate::model::init::initialise(&mut params, seed);
        Ok(Dvae { config, params, nets })
    }

    /// Loads `config.json` and `model.safetensors` from `dir`. Tensor names are the ones
    /// [`Dvae::save`] writes (`encoder.blocks.…`, `decoder.blocks.…`); an encoder-only file may
    /// also use DALL-E's bare names (`blocks.…`). The config is validated and the parameters
    /// budgeted as in [`Dvae::new`] before anything is read; a NaN or infinite weight is refused
    /// with its tensor's name.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = DvaeConfig::load(dir)?;
        let (mut params, nets) = DvaeNetworks::build(&config)?;
        let path = dir.join(WEIGHTS_FILE);
        io::load_weights_named(&mut params, &path, |name| {
            std::iter::once(name.to_string()).chain(name.strip_prefix("encoder.").map(str::to_string)).collect()
        })?;
        for spec in &params.specs {
            let values = &params.data[spec.offset..spec.offset + spec.len];
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                bail!(
                    Format,
                    "{}: tensor {} holds a non-finite weight ({} at index {i}); a tokenizer needs finite weights",
                    path.display(),
                    spec.name,
                    values[i]
                );
            }
        }
        Ok(Dvae { config, params, nets })
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if missing), as a set
    /// ([`crate::files::write_atomic_all`]): both are written in full before either replaces
    /// its old version, so a save that fails leaves the tokenizer that was there (a directory
    /// never ends up with one tokenizer's config beside another's weights).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("cannot create {}: {e}", dir.display())))?;
        let weights = io::weights_bytes(&self.params)?;
        let config = self.config.to_json();
        let (weights_path, config_path) = (dir.join(WEIGHTS_FILE), dir.join(CONFIG_FILE));
        crate::files::write_atomic_all(&[(&weights_path, &weights), (&config_path, config.as_bytes())])
    }

    /// Images per tokenizing or decoding pass: bounded by the first feature map and by the
    /// logits `[P, V]` (at 8192 codes, 2 MB per 8x8-token image), each to 32 MB.
    pub(crate) fn chunk_images(&self) -> usize {
        let c = &self.config;
        let features = TOKENIZE_CHUNK_VALUES / (c.n_hid * c.image_size * c.image_size);
        let logits = TOKENIZE_CHUNK_VALUES / (c.tokens_per_image() * c.vocab_size);
        features.min(logits).max(1)
    }

    /// Floats per input image `[C, H, W]`.
    pub fn image_len(&self) -> usize {
        self.config.in_channels * self.config.image_size * self.config.image_size
    }

    pub(crate) fn check_pixels(&self, pixels: &[f32]) -> Result<usize> {
        let per = self.image_len();
        ensure!(
            !pixels.is_empty() && pixels.len().is_multiple_of(per),
            InvalidArgument,
            "tokenizer input has {} values; expected a positive multiple of {}x{}x{} = {per}",
            pixels.len(),
            self.config.in_channels,
            self.config.image_size,
            self.config.image_size
        );
        ensure!(pixels.iter().all(|v| v.is_finite()), InvalidArgument, "tokenizer input holds NaN or infinite values");
        Ok(pixels.len() / per)
    }

    /// Tests one encoder pass over `images` images against the memory budget.
    fn check_encoder_pass(&self, images: usize, hint: &str) -> Result<()> {
        let c = &self.config;
        Need::new(
            format!("tokenizing {images} image(s) of {}x{}x{}", c.in_channels, c.image_size, c.image_size),
            self.nets.encoder.pass_bytes(images, false),
        )
        .hint(hint)
        .check()
    }

    /// Code logits, token-major `[B·P, V]`, of mapped pixels `[B, C, H, W]` (one pass over the
    /// whole batch, budgeted first).
    pub fn logits(&self, mapped: &[f32]) -> Result<Vec<f32>> {
        let batch = self.check_pixels(mapped)?;
        self.check_encoder_pass(batch, "pass fewer images per call")?;
        Ok(self.nets.encoder.forward(&self.params, mapped, batch, None))
    }

    /// Visual tokens `[B, P]` (row-major grid) of mapped pixels `[B, C, H, W]`: the argmax of
    /// the encoder's logits, computed in chunks of images, each chunk's pass budgeted first.
    pub fn tokenize(&self, mapped: &[f32]) -> Result<Vec<u32>> {
        self.check_pixels(mapped)?;
        let per = self.image_len();
        let chunk_images = self.chunk_images().min(mapped.len() / per);
        self.check_encoder_pass(
            chunk_images,
            "images are tokenized in chunks already: this tokenizer's image_size and widths are too large for this memory",
        )?;
        let mut tokens = Vec::with_capacity(mapped.len() / per * self.config.tokens_per_image());
        for chunk in mapped.chunks(per * chunk_images) {
            self.nets.encoder.tokens_into(&self.params, chunk, chunk.len() / per, &mut tokens)?;
        }
        Ok(tokens)
    }

    /// Decodes hard tokens `[B, P]` into mapped pixels `[B, C, H, W]` (needs a decoder), in
    /// chunks of images ([`Dvae::decode_chunks`]).
    pub fn decode(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let (decoder, chunk_images) = self.decode_chunks(tokens)?;
        let p = self.config.tokens_per_image();
        let mut out = Vec::with_capacity(tokens.len() / p * self.image_len());
        for chunk in tokens.chunks(p * chunk_images) {
            decoder.decode_into(&self.params, chunk, chunk.len() / p, &mut out)?;
        }
        Ok(out)
    }

    /// What every device's decode checks before it allocates: a decoder, whole token grids of
    /// valid ids, and the memory of the output, of a chunk's one-hot codes and of a chunk's
    /// pass against the budget. Gives the decoder and the images per chunk.
    pub(crate) fn decode_chunks(&self, tokens: &[u32]) -> Result<(&Decoder, usize)> {
        let decoder = self
            .nets
            .decoder
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("this tokenizer has no decoder (an imported encoder)".into()))?;
        let (p, v) = (self.config.tokens_per_image(), self.config.vocab_size);
        ensure!(
            !tokens.is_empty() && tokens.len().is_multiple_of(p),
            InvalidArgument,
            "{} tokens is not a multiple of {p}",
            tokens.len()
        );
        ensure!(tokens.iter().all(|&t| (t as usize) < v), InvalidArgument, "token id outside the vocabulary of {v}");
        let images = tokens.len() / p;
        let chunk_images = self.chunk_images().min(images);
        let c = &self.config;
        Need::new(
            format!("decoding {images} token grid(s) into {}x{}x{} images", c.in_channels, c.image_size, c.image_size),
            Bytes::floats(&[images, self.image_len()])
                + Bytes::floats(&[chunk_images, p, v])
                + decoder.pass_bytes(chunk_images, false),
        )
        .hint("decode fewer token grids per call")
        .check()?;
        Ok((decoder, chunk_images))
    }
}
