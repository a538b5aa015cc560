//! The tokenizer's configuration: the DALL-E encoder architecture (openai/DALL-E `encoder.py`)
//! with its widths, depth and downsampling as parameters, plus an optional decoder for a dVAE
//! trained here. Saved as `config.json` beside `model.safetensors`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::resources::MAX_DIM;

/// Most image channels of a tokenizer (grey, RGB, RGBA).
pub const MAX_IN_CHANNELS: usize = 4;
/// Most residual groups (a 32x downsampling).
pub const MAX_GROUPS: usize = 6;
/// Most residual blocks per group.
pub const MAX_BLOCKS_PER_GROUP: usize = 16;
/// Widest first group (`n_hid`) and decoder input (`decoder_n_init`).
pub const MAX_WIDTH: usize = 4096;
/// Largest codebook: tokens are stored as u16.
pub const MAX_CODEBOOK: usize = 1 << 16;
/// Largest tokenizer input side, in pixels.
pub const MAX_SIDE: usize = 4096;

/// The `model_type` written to and expected in `config.json`.
pub const MODEL_TYPE: &str = "beit-dvae";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvaeConfig {
    #[serde(default = "model_type")]
    pub model_type: String,
    /// Image channels (1 grey, 3 RGB).
    pub in_channels: usize,
    /// Square input resolution the tokenizer sees (DALL-E: 112 for BEiT's 224 input).
    pub image_size: usize,
    /// Codebook size: one logit per code and grid position (DALL-E and BEiT: 8192).
    pub vocab_size: usize,
    /// Width of the first group; group g has `n_hid · 2^(g-1)` channels (DALL-E: 256).
    pub n_hid: usize,
    /// Residual groups; a 2x max pool follows every group but the last, so the token grid is
    /// `image_size / 2^(group_count-1)` (DALL-E: 4 groups, 112 → 14).
    pub group_count: usize,
    /// Residual blocks per group (DALL-E: 2).
    pub n_blk_per_group: usize,
    /// Width of the decoder's first convolution; `None` for an encoder-only tokenizer (an
    /// imported DALL-E encoder).
    #[serde(default)]
    pub decoder_n_init: Option<usize>,
}

fn model_type() -> String {
    MODEL_TYPE.to_string()
}

impl DvaeConfig {
    /// OpenAI's DALL-E encoder (the tokenizer BEiT used): 3 channels, 112 px, 8192 codes.
    pub fn dalle() -> Self {
        DvaeConfig {
            model_type: model_type(),
            in_channels: 3,
            image_size: 112,
            vocab_size: 8192,
            n_hid: 256,
            group_count: 4,
            n_blk_per_group: 2,
            decoder_n_init: None,
        }
    }

    /// A dVAE for small grey images (Fashion-MNIST at 32x32): 8x8 tokens, 8192 codes, widths
    /// 32/64/128, and a decoder.
    pub fn small_grey(image_size: usize) -> Self {
        DvaeConfig {
            model_type: model_type(),
            in_channels: 1,
            image_size,
            vocab_size: 8192,
            n_hid: 32,
            group_count: 3,
            n_blk_per_group: 1,
            decoder_n_init: Some(64),
        }
    }

    /// Downsampling factor from pixels to tokens.
    pub fn downsample(&self) -> usize {
        1 << (self.group_count - 1)
    }

    /// Token grid side (tokens per image: its square).
    pub fn grid(&self) -> usize {
        self.image_size / self.downsample()
    }

    pub fn tokens_per_image(&self) -> usize {
        self.grid() * self.grid()
    }

    /// Channels of group `g` (1-based, as in DALL-E's parameter names).
    pub fn group_width(&self, g: usize) -> usize {
        self.n_hid << (g - 1)
    }

    /// The residual branch's gain, `1 / (group_count · n_blk_per_group)²` (DALL-E `post_gain`).
    pub fn post_gain(&self) -> f32 {
        let layers = (self.group_count * self.n_blk_per_group) as f32;
        1.0 / (layers * layers)
    }

    pub fn has_decoder(&self) -> bool {
        self.decoder_n_init.is_some()
    }

    /// Checks every field against the architecture's rules and an absolute cap, so that a
    /// config file (or CLI options) can describe no network whose sizes overflow or hang: the
    /// widest group, the image and the codebook are all bounded here. Whether the parameters
    /// and a pass fit in memory is tested against the budget where they are allocated
    /// ([`crate::dvae::Dvae::new`], [`crate::dvae::Dvae::load`], a tokenizing or training pass).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.model_type != MODEL_TYPE {
            return bad(format!("model_type is {:?}; a tokenizer has {MODEL_TYPE:?}", self.model_type));
        }
        if !(1..=MAX_IN_CHANNELS).contains(&self.in_channels) {
            return bad(format!("in_channels must be 1 to {MAX_IN_CHANNELS}, got {}", self.in_channels));
        }
        if !(1..=MAX_GROUPS).contains(&self.group_count) {
            return bad(format!("group_count must be 1 to {MAX_GROUPS}, got {}", self.group_count));
        }
        if !(1..=MAX_BLOCKS_PER_GROUP).contains(&self.n_blk_per_group) {
            return bad(format!("n_blk_per_group must be 1 to {MAX_BLOCKS_PER_GROUP}, got {}", self.n_blk_per_group));
        }
        // Every block's hidden width is a quarter of its output width.
        if self.n_hid == 0 || !self.n_hid.is_multiple_of(4) || self.n_hid > MAX_WIDTH {
            return bad(format!("n_hid must be a positive multiple of 4 up to {MAX_WIDTH}, got {}", self.n_hid));
        }
        // The last group is 2^(group_count-1) times as wide as the first.
        let widest = self.n_hid.checked_shl(self.group_count as u32 - 1).filter(|&w| w <= MAX_DIM);
        if widest.is_none() {
            return bad(format!(
                "n_hid {} doubled over {} groups gives a last group wider than {MAX_DIM} channels",
                self.n_hid, self.group_count
            ));
        }
        if self.vocab_size < 2 || self.vocab_size > MAX_CODEBOOK {
            return bad(format!(
                "vocab_size must be 2 to {MAX_CODEBOOK} (tokens are stored as u16), got {}",
                self.vocab_size
            ));
        }
        if self.image_size == 0 || self.image_size > MAX_SIDE || !self.image_size.is_multiple_of(self.downsample()) {
            return bad(format!(
                "image_size {} must be a positive multiple of the downsampling factor {} (and at most {MAX_SIDE})",
                self.image_size,
                self.downsample()
            ));
        }
        if let Some(n) = self.decoder_n_init {
            if n == 0 || n > MAX_WIDTH {
                return bad(format!("decoder_n_init must be 1 to {MAX_WIDTH}, got {n}"));
            }
        }
        Ok(())
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let config: DvaeConfig =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("tokenizer config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_json(&crate::model::io::read_config_text(dir)?)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }
}
