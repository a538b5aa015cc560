//! The built-in model presets: named configs a front end accepts wherever it takes a
//! config.json (`--config base`, `--preset tiny32`, ...). One table for every command: a preset
//! names a config and the architecture it is made for, and any command may start from it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::{Architecture, BeitConfig};

/// A named config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    /// What the preset is, in a line.
    pub about: &'static str,
    /// The architecture a model of this preset gets when the caller names none.
    pub architecture: Architecture,
    /// The config as HF `config.json` text: only the keys that differ from `BeitConfig`'s
    /// defaults (HF's, which are BEiT-B/16 at 224).
    pub config_json: &'static str,
}

impl Preset {
    /// The preset's config (validated).
    pub fn config(&self) -> Result<BeitConfig> {
        BeitConfig::from_json_str(self.config_json)
    }
}

/// Every preset, in the order error messages list them.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "base",
        about: "BEiT-B/16 at 224 (microsoft/beit-base-patch16-224): classification, 1000 labels",
        architecture: Architecture::ImageClassification,
        config_json: r#"{"num_labels": 1000, "use_relative_position_bias": true}"#,
    },
    Preset {
        name: "large",
        about: "BEiT-L/16 at 224 (microsoft/beit-large-patch16-224): classification, 1000 labels",
        architecture: Architecture::ImageClassification,
        config_json: r#"{"num_labels": 1000, "use_relative_position_bias": true, "hidden_size": 1024,
            "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}"#,
    },
    Preset {
        name: "tiny32",
        about: "a small grey 32x32 MIM model (patch 4, hidden 192, 12 layers): the pretraining benchmarks' model",
        architecture: Architecture::MaskedImageModeling,
        config_json: r#"{"image_size": 32, "patch_size": 4, "num_channels": 1, "hidden_size": 192,
            "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768,
            "vocab_size": 8192, "use_mask_token": true, "use_shared_relative_position_bias": true,
            "layer_scale_init_value": 0.1, "drop_path_rate": 0.1}"#,
    },
    // The main job's model: a quarter of tiny32's compute per image (hidden 128, 6 layers), so
    // pretraining, four fine-tunes and their evaluation fit minutes on 2 cores.
    Preset {
        name: "small32",
        about: "a grey 32x32 MIM model with a quarter of tiny32's compute (hidden 128, 6 layers)",
        architecture: Architecture::MaskedImageModeling,
        config_json: r#"{"image_size": 32, "patch_size": 4, "num_channels": 1, "hidden_size": 128,
            "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512,
            "vocab_size": 512, "use_mask_token": true, "use_shared_relative_position_bias": true,
            "layer_scale_init_value": 0.1, "drop_path_rate": 0.1}"#,
    },
    // Sized for the emoji sets' 64x64 RGB images (`beit dataset import --format emoji`). The
    // out_indices are BEiT's [3, 5, 7, 11] of 12 layers scaled to 6 (what a segmentation model
    // made from any 6-layer config gets), so the preset is whole for its architecture.
    Preset {
        name: "emoji-tiny",
        about: "an RGB 64x64 segmentation model (patch 8, hidden 96, 6 layers) for the emoji sets",
        architecture: Architecture::SemanticSegmentation,
        config_json: r#"{"image_size": 64, "patch_size": 8, "num_channels": 3, "hidden_size": 96,
            "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 384,
            "use_relative_position_bias": true, "layer_scale_init_value": 0.1, "drop_path_rate": 0.1,
            "use_mean_pooling": true, "pool_scales": [1, 2, 4], "auxiliary_channels": 64,
            "out_indices": [2, 3, 4, 6]}"#,
    },
];

/// The preset called `name`.
pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// The preset called `name`, or an error listing the presets there are.
pub fn preset(name: &str) -> Result<&'static Preset> {
    find(name).ok_or_else(|| Error::InvalidArgument(format!("unknown preset {name:?} ({})", names())))
}

/// The preset names as a sentence: `a, b or c`.
fn names() -> String {
    let all: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
    match all.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A config given as a config.json path or a preset name: the file when one exists at that path,
/// else the preset.
pub fn config_from(name: &str) -> Result<BeitConfig> {
    match read_config_file(name)? {
        Some(cfg) => Ok(cfg),
        None => preset(name)?.config(),
    }
}

/// [`config_from`], with the architecture a new model of it gets by default: a file's
/// `architectures` (BeitModel when it has none), or the preset's.
pub fn config_and_architecture(name: &str) -> Result<(BeitConfig, Architecture)> {
    match read_config_file(name)? {
        Some(cfg) => {
            let arch = cfg.architecture()?;
            Ok((cfg, arch))
        }
        None => {
            let p = preset(name)?;
            Ok((p.config()?, p.architecture))
        }
    }
}

/// The config in the file `name`; None when no file is there.
fn read_config_file(name: &str) -> Result<Option<BeitConfig>> {
    if !Path::new(name).is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(name).map_err(|e| Error::Io(format!("cannot read {name}: {e}")))?;
    BeitConfig::from_json_str(&text).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields BEiT's published configs pin (BEIT_SPEC §1: HF BeitConfig defaults, and the
    /// flags the classification checkpoints change), checked field by field.
    fn assert_released_classifier(cfg: &BeitConfig, (hidden, layers, heads, inter): (usize, usize, usize, usize)) {
        assert_eq!(
            (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size),
            (hidden, layers, heads, inter)
        );
        assert_eq!(cfg.head_dim(), 64);
        assert_eq!((cfg.image_size.hw(), cfg.patch_size.hw(), cfg.num_channels), ((224, 224), (16, 16), 3));
        assert_eq!(cfg.native_grid(), (14, 14));
        assert_eq!(cfg.vocab_size, 8192);
        assert_eq!(cfg.hidden_act, "gelu");
        assert_eq!(cfg.layer_norm_eps, 1e-12);
        assert_eq!(cfg.initializer_range, 0.02);
        assert_eq!((cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob), (0.0, 0.0));
        // `*-224` classification checkpoints: per-layer relative position bias, no absolute
        // positions, no shared bias, no mask token, mean pooling, 1000 labels.
        assert!(cfg.use_relative_position_bias);
        assert!(!cfg.use_shared_relative_position_bias);
        assert!(!cfg.use_absolute_position_embeddings);
        assert!(!cfg.use_mask_token);
        assert!(cfg.use_mean_pooling);
        assert_eq!(cfg.layer_scale_init_value, 0.1);
        assert_eq!(cfg.drop_path_rate, 0.1);
        assert_eq!(cfg.num_labels(), 1000);
    }

    #[test]
    fn base_and_large_are_the_published_beit_configs() {
        let base = preset("base").unwrap();
        assert_eq!(base.architecture, Architecture::ImageClassification);
        assert_released_classifier(&base.config().unwrap(), (768, 12, 12, 3072));
        let large = preset("large").unwrap();
        assert_eq!(large.architecture, Architecture::ImageClassification);
        assert_released_classifier(&large.config().unwrap(), (1024, 24, 16, 4096));
    }

    #[test]
    fn small_presets_keep_their_shapes() {
        let tiny = preset("tiny32").unwrap().config().unwrap();
        assert_eq!((tiny.image_size.hw(), tiny.patch_size.hw(), tiny.num_channels), ((32, 32), (4, 4), 1));
        assert_eq!((tiny.hidden_size, tiny.num_hidden_layers, tiny.num_attention_heads), (192, 12, 3));
        assert_eq!((tiny.intermediate_size, tiny.vocab_size, tiny.native_grid()), (768, 8192, (8, 8)));
        assert!(tiny.use_mask_token && tiny.use_shared_relative_position_bias);
        let small = preset("small32").unwrap().config().unwrap();
        assert_eq!((small.hidden_size, small.num_hidden_layers, small.num_attention_heads), (128, 6, 4));
        assert_eq!((small.intermediate_size, small.vocab_size), (512, 512));
        let emoji = preset("emoji-tiny").unwrap();
        assert_eq!(emoji.architecture, Architecture::SemanticSegmentation);
        let emoji = emoji.config().unwrap();
        assert_eq!((emoji.image_size.hw(), emoji.patch_size.hw(), emoji.num_channels), ((64, 64), (8, 8), 3));
        assert_eq!((emoji.hidden_size, emoji.num_hidden_layers, emoji.pool_scales()), (96, 6, vec![1, 2, 4]));
        assert_eq!(emoji.auxiliary_channels(), 64);
    }

    #[test]
    fn names_are_unique_and_every_preset_parses() {
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(PRESETS[..i].iter().all(|q| q.name != p.name), "{} twice", p.name);
            let cfg = p.config().unwrap_or_else(|e| panic!("{}: {e}", p.name));
            if p.architecture == Architecture::SemanticSegmentation {
                cfg.validate_segmentation().unwrap_or_else(|e| panic!("{}: {e}", p.name));
            }
            assert_eq!(find(p.name), Some(p));
        }
    }

    #[test]
    fn emoji_tiny_takes_the_feature_layers_a_segmentation_model_of_it_would() {
        use crate::train::segmentation::segmentation_config;
        let cfg = preset("emoji-tiny").unwrap().config().unwrap();
        // [3, 5, 7, 11] of 12 layers at 6 layers: 1.5, 2.5, 3.5, 5.5, rounded up.
        assert_eq!(cfg.out_indices(), [2, 3, 4, 6]);
        let mut without = cfg.clone();
        without.out_indices = None;
        assert_eq!(segmentation_config(without, 5).out_indices, cfg.out_indices);
    }

    #[test]
    fn unknown_names_list_the_presets() {
        let e = preset("no-such").unwrap_err().to_string();
        assert!(e.contains(r#"unknown preset "no-such" (base, large, tiny32, small32 or emoji-tiny)"#), "{e}");
        assert!(config_from("no-such").is_err());
    }

    #[test]
    fn a_config_file_brings_its_own_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"hidden_size": 64, "num_attention_heads": 2, "architectures": ["BeitModel"]}"#)
            .unwrap();
        let name = path.to_str().unwrap();
        assert_eq!(config_from(name).unwrap().hidden_size, 64);
        let (cfg, arch) = config_and_architecture(name).unwrap();
        assert_eq!((cfg.hidden_size, arch), (64, Architecture::Backbone));
        let (cfg, arch) = config_and_architecture("tiny32").unwrap();
        assert_eq!((cfg.hidden_size, arch), (192, Architecture::MaskedImageModeling));
    }
}
