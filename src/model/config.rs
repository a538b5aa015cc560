//! `BeitConfig`, read from and written to Hugging Face `config.json`. Unknown keys are kept so
//! that a load/save round trip does not lose what other tools put there.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Which Hugging Face class a model directory holds (`architectures[0]` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `BeitModel`: the backbone (+ pooler); outputs `last_hidden_state`.
    Backbone,
    /// `BeitForMaskedImageModeling`: backbone + layernorm + lm_head over the visual vocabulary.
    MaskedImageModeling,
    /// `BeitForImageClassification`: backbone + pooler + classifier.
    ImageClassification,
    /// `BeitForSemanticSegmentation`: backbone features from four layers, the FPN rescaling,
    /// the UperNet decode head and (optionally) the FCN auxiliary head.
    SemanticSegmentation,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Backbone => "BeitModel",
            Architecture::MaskedImageModeling => "BeitForMaskedImageModeling",
            Architecture::ImageClassification => "BeitForImageClassification",
            Architecture::SemanticSegmentation => "BeitForSemanticSegmentation",
        }
    }

    pub fn from_hf_name(name: &str) -> Result<Self> {
        Ok(match name {
            "BeitModel" => Architecture::Backbone,
            "BeitForMaskedImageModeling" => Architecture::MaskedImageModeling,
            "BeitForImageClassification" => Architecture::ImageClassification,
            "BeitForSemanticSegmentation" => Architecture::SemanticSegmentation,
            other => {
                return Err(Error::Unsupported(format!(
                    "architecture {other:?} is not supported (supported: BeitModel, \
                     BeitForMaskedImageModeling, BeitForImageClassification, \
                     BeitForSemanticSegmentation)"
                )))
            }
        })
    }
}

/// HF allows `image_size` / `patch_size` as an int or as `[h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    Square(usize),
    Rect([usize; 2]),
}

impl Size2 {
    pub fn hw(self) -> (usize, usize) {
        match self {
            Size2::Square(s) => (s, s),
            Size2::Rect([h, w]) => (h, w),
        }
    }
}

fn d_vocab() -> usize {
    8192
}
fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_inter() -> usize {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_init_range() -> f64 {
    0.02
}
fn d_eps() -> f64 {
    1e-12
}
fn d_image() -> Size2 {
    Size2::Square(224)
}
fn d_patch() -> Size2 {
    Size2::Square(16)
}
fn d_channels() -> usize {
    3
}
fn d_layer_scale() -> f64 {
    0.1
}
fn d_drop_path() -> f64 {
    0.1
}
fn d_true() -> bool {
    true
}

/// The fields of HF `BeitConfig` that the model uses, with HF's defaults. Floats are f64 so that
/// values such as 0.02 and 1e-12 are written back exactly as Python wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BeitConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "d_init_range")]
    pub initializer_range: f64,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image")]
    pub image_size: Size2,
    #[serde(default = "d_patch")]
    pub patch_size: Size2,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default)]
    pub use_mask_token: bool,
    #[serde(default)]
    pub use_absolute_position_embeddings: bool,
    #[serde(default)]
    pub use_relative_position_bias: bool,
    #[serde(default)]
    pub use_shared_relative_position_bias: bool,
    /// Layer scale is on when this is > 0 (HF's rule).
    #[serde(default = "d_layer_scale")]
    pub layer_scale_init_value: f64,
    #[serde(default = "d_drop_path")]
    pub drop_path_rate: f64,
    #[serde(default = "d_true")]
    pub use_mean_pooling: bool,
    /// Classification labels; HF derives `num_labels` from `id2label` (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Segmentation options (HF `BeitConfig`); `None` means HF's default, and they are written
    /// back only when set, so other architectures' config.json files do not change. See the
    /// accessors below for the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_indices: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_scales: Option<Vec<usize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_auxiliary_head: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auxiliary_loss_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auxiliary_channels: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auxiliary_num_convs: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auxiliary_concat_input: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic_loss_ignore_index: Option<i64>,
    /// Every other key of config.json, written back untouched.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for BeitConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl BeitConfig {
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: BeitConfig = serde_json::from_str(text)
            .map_err(|e| Error::Format(format!("config.json is not a valid BEiT config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json_string(&self) -> String {
        let mut v = serde_json::to_value(self).expect("config serialises");
        if let Value::Object(map) = &mut v {
            map.insert("model_type".into(), Value::String("beit".into()));
            if let Some(n) = self.num_labels_opt() {
                map.entry("num_labels").or_insert(Value::from(n));
            }
        }
        serde_json::to_string_pretty(&v).expect("config serialises")
    }

    /// Checks everything the model code relies on, so that a bad file is an error, not a panic,
    /// a hang or an abort. This is the one check of a config: `from_json_str` (config.json,
    /// checkpoints, the C API's config text) and every model constructor run it. Each size must
    /// lie under an absolute cap ([`crate::resources`]); whether the parameters and passes fit
    /// in memory is tested later, against the budget, where they are planned.
    pub fn validate(&self) -> Result<()> {
        use crate::resources::{check_range, MAX_CHANNELS, MAX_DIM, MAX_IMAGE_SIDE, MAX_LABELS, MAX_LAYERS, MAX_VOCAB};
        let bad = |m: String| Err(Error::Config(m));
        check_range("hidden_size", self.hidden_size, MAX_DIM)?;
        check_range("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS)?;
        check_range("num_attention_heads", self.num_attention_heads, self.hidden_size)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        check_range("intermediate_size", self.intermediate_size, MAX_DIM)?;
        check_range("num_channels", self.num_channels, MAX_CHANNELS)?;
        check_range("vocab_size", self.vocab_size, MAX_VOCAB)?;
        let (ih, iw) = self.image_size.hw();
        let (ph, pw) = self.patch_size.hw();
        check_range("image_size (height)", ih, MAX_IMAGE_SIDE)?;
        check_range("image_size (width)", iw, MAX_IMAGE_SIDE)?;
        if ph == 0 || pw == 0 || ih < ph || iw < pw {
            return bad(format!("patch_size {:?} does not fit image_size {:?}", (ph, pw), (ih, iw)));
        }
        if let Some(n) = self.num_labels {
            // 0 is HF's "no labels" for a bare backbone; a classifier refuses it where it is built.
            ensure!(n <= MAX_LABELS, Config, "num_labels must be at most {MAX_LABELS}, got {n}");
        }
        if let Some(map) = &self.id2label {
            ensure!(map.len() <= MAX_LABELS, Config, "id2label has {} labels, more than {MAX_LABELS}", map.len());
        }
        if self.hidden_act != "gelu" {
            return Err(Error::Unsupported(format!(
                "hidden_act {:?} is not supported (only \"gelu\", the exact erf GELU)",
                self.hidden_act
            )));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return bad(format!("layer_norm_eps must be a positive number, got {}", self.layer_norm_eps));
        }
        // The truncated-normal init draws until a value lands inside the cut, which is ±std or
        // ±2: a std <= 0 never lands (a hang), and a std far above 2 lands once in millions.
        if !(self.initializer_range.is_finite() && self.initializer_range > 0.0 && self.initializer_range <= 1.0) {
            return bad(format!("initializer_range must be in (0, 1], got {}", self.initializer_range));
        }
        if !self.layer_scale_init_value.is_finite() {
            return bad(format!("layer_scale_init_value must be finite, got {}", self.layer_scale_init_value));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad(format!("drop_path_rate must be in [0, 1), got {}", self.drop_path_rate));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1], got {p}"));
            }
        }
        if let Some(w) = self.auxiliary_loss_weight {
            ensure!(w.is_finite(), Config, "auxiliary_loss_weight must be finite, got {w}");
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn layer_scale(&self) -> bool {
        self.layer_scale_init_value > 0.0
    }

    fn num_labels_opt(&self) -> Option<usize> {
        self.id2label.as_ref().map(|m| m.len()).or(self.num_labels)
    }

    /// HF's `num_labels`: the size of `id2label`, else `num_labels`, else 2.
    pub fn num_labels(&self) -> usize {
        self.num_labels_opt().unwrap_or(2)
    }

    /// Patch grid (rows, cols) for an input of `h` x `w` pixels.
    pub fn grid_for(&self, h: usize, w: usize) -> (usize, usize) {
        let (ph, pw) = self.patch_size.hw();
        (h / ph, w / pw)
    }

    /// Patch grid of the configured image size (the grid the position tables were made for).
    pub fn native_grid(&self) -> (usize, usize) {
        let (h, w) = self.image_size.hw();
        self.grid_for(h, w)
    }

    /// HF `out_indices` (default `[3, 5, 7, 11]`): 1-based indices into the hidden states
    /// (0 = the embeddings, k = the output of block k) that feed the four FPN levels.
    pub fn out_indices(&self) -> Vec<usize> {
        self.out_indices.clone().unwrap_or_else(|| vec![3, 5, 7, 11])
    }

    /// HF `pool_scales` of the pyramid pooling module (default `[1, 2, 3, 6]`).
    pub fn pool_scales(&self) -> Vec<usize> {
        self.pool_scales.clone().unwrap_or_else(|| vec![1, 2, 3, 6])
    }

    /// Whether the FCN auxiliary head exists (HF default true).
    pub fn use_auxiliary_head(&self) -> bool {
        self.use_auxiliary_head.unwrap_or(true)
    }

    /// Weight of the auxiliary head's loss (HF default 0.4).
    pub fn auxiliary_loss_weight(&self) -> f64 {
        self.auxiliary_loss_weight.unwrap_or(0.4)
    }

    /// Channels of the auxiliary head's convolutions (HF default 256).
    pub fn auxiliary_channels(&self) -> usize {
        self.auxiliary_channels.unwrap_or(256)
    }

    /// Number of 3x3 convolutions in the auxiliary head (HF default 1).
    pub fn auxiliary_num_convs(&self) -> usize {
        self.auxiliary_num_convs.unwrap_or(1)
    }

    /// Whether the auxiliary head concatenates its input before the classifier (HF default false).
    pub fn auxiliary_concat_input(&self) -> bool {
        self.auxiliary_concat_input.unwrap_or(false)
    }

    /// Label value that the segmentation loss and mIoU skip (HF default 255).
    pub fn semantic_loss_ignore_index(&self) -> i64 {
        self.semantic_loss_ignore_index.unwrap_or(255)
    }

    /// Checks what `BeitForSemanticSegmentation` needs beyond [`BeitConfig::validate`].
    pub fn validate_segmentation(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let idx = self.out_indices();
        if idx.len() != 4 {
            return bad(format!("BeitForSemanticSegmentation needs exactly 4 out_indices, got {idx:?}"));
        }
        // transformers 5 accepts 0..=L and reads hidden_states[i - 1], so 0 wraps around to the
        // last hidden state, while transformers 4 selects nothing for it; only 1..=L means the
        // same in both.
        if let Some(&i) = idx.iter().find(|&&i| i == 0 || i > self.num_hidden_layers) {
            return bad(format!(
                "out_index {i} is outside 1..={} (hidden state i-1: 0 is the embeddings)",
                self.num_hidden_layers
            ));
        }
        let scales = self.pool_scales();
        if scales.is_empty() || scales.len() > 16 || scales.contains(&0) || scales.iter().any(|&s| s > 1 << 12) {
            return bad(format!("pool_scales must be 1 to 16 values in 1..=4096, got {scales:?}"));
        }
        if self.use_auxiliary_head() {
            let ca = self.auxiliary_channels();
            crate::resources::check_range("auxiliary_channels", ca, crate::resources::MAX_DIM)?;
            let convs = self.auxiliary_num_convs();
            ensure!(convs <= 16, Config, "auxiliary_num_convs must be at most 16, got {convs}");
            // With no convolution HF feeds the hidden_size-channel input to a classifier built
            // for auxiliary_channels, which only works when the two agree.
            if self.auxiliary_num_convs() == 0 && ca != self.hidden_size {
                return bad("auxiliary_num_convs 0 needs auxiliary_channels == hidden_size".into());
            }
        }
        let (ph, pw) = self.patch_size.hw();
        if ph != pw {
            return Err(Error::Unsupported("segmentation needs a square patch_size".into()));
        }
        if self.num_labels() < 1 {
            return bad("a segmentation model needs at least one label".into());
        }
        Ok(())
    }

    pub fn architecture(&self) -> Result<Architecture> {
        match self.architectures.as_deref() {
            Some([first, ..]) => Architecture::from_hf_name(first),
            _ => Ok(Architecture::Backbone),
        }
    }
}
