//! What masked image modeling predicts for each masked patch: BEiT's visual tokens, or the
//! patch's own pixels (the paper's "−visual tokens" ablation, BEIT_SPEC §9, which regresses the
//! masked patches' pixels instead).
//!
//! Both targets use the same MIM head (`layernorm` + `lm_head`); only its width and the loss
//! differ:
//! - visual tokens: `vocab_size` logits, mean softmax cross-entropy against the batch's labels;
//! - pixels: `vocab_size = P·P·C` outputs, regressed onto the patch's normalised input pixels
//!   as the model was fed them (before the mask token replaced the patch), flattened in the
//!   patch embedding's (channel, row, column) order, the im2col row the patch projection
//!   reads. The loss is the mean over all masked patches of the mean squared error over those
//!   P·P·C values (so its scale does not depend on the patch size); the batch's labels are not
//!   read.

use serde::{Deserialize, Serialize};

use super::BeitConfig;
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum MimTarget {
    /// The visual token of every masked patch (the batch's `labels`): BEiT.
    #[default]
    #[serde(rename = "tokens")]
    VisualTokens,
    /// The masked patch's own input pixels, regressed with mean squared error.
    #[serde(rename = "pixels")]
    Pixels,
}

impl MimTarget {
    /// The name the command line and checkpoints use.
    pub fn name(self) -> &'static str {
        match self {
            MimTarget::VisualTokens => "tokens",
            MimTarget::Pixels => "pixels",
        }
    }

    /// The head width this target needs of a model with `config`: P·P·C for pixels; `None`
    /// for visual tokens, whose vocabulary is the tokenizer's (any size).
    pub fn required_vocab_size(self, config: &BeitConfig) -> Option<usize> {
        match self {
            MimTarget::VisualTokens => None,
            MimTarget::Pixels => {
                let (ph, pw) = config.patch_size.hw();
                Some(ph * pw * config.num_channels)
            }
        }
    }

    /// Checks that a MIM head of `config` can predict this target.
    pub fn check_config(self, config: &BeitConfig) -> Result<()> {
        if let Some(want) = self.required_vocab_size(config) {
            let (ph, pw) = config.patch_size.hw();
            ensure!(
                config.vocab_size == want,
                InvalidArgument,
                "the pixel target needs vocab_size = patch {ph}x{pw} x {} channels = {want} (one output per \
                 pixel value of a patch); this config has vocab_size {}",
                config.num_channels,
                config.vocab_size
            );
        }
        Ok(())
    }
}

impl std::fmt::Display for MimTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for MimTarget {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tokens" => Ok(MimTarget::VisualTokens),
            "pixels" => Ok(MimTarget::Pixels),
            other => Err(crate::error::Error::InvalidArgument(format!(
                "MIM target {other:?}: expected tokens (BEiT's visual tokens) or pixels (regress the masked \
                 patches' pixels)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_target_needs_one_output_per_patch_value() {
        let cfg = BeitConfig::from_json_str(
            r#"{"hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"intermediate_size":16,
                "image_size":8,"patch_size":4,"num_channels":3,"vocab_size":48}"#,
        )
        .unwrap();
        assert_eq!(MimTarget::Pixels.required_vocab_size(&cfg), Some(48));
        MimTarget::Pixels.check_config(&cfg).unwrap();
        let other = BeitConfig { vocab_size: 64, ..cfg };
        let err = MimTarget::Pixels.check_config(&other).unwrap_err().to_string();
        assert!(err.contains("= 48") && err.contains("vocab_size 64"), "{err}");
        MimTarget::VisualTokens.check_config(&other).unwrap();
    }

    #[test]
    fn names_round_trip() {
        for t in [MimTarget::VisualTokens, MimTarget::Pixels] {
            assert_eq!(t.name().parse::<MimTarget>().unwrap(), t);
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.name()));
        }
        assert!("pixel".parse::<MimTarget>().is_err());
    }
}
