//! The token-source policy of pretraining: where a dataset run's MIM targets come from, given
//! what the caller asked for (`--tokens`, `--tokenizer`, `--target`) and what the dataset holds.

use crate::error::{Error, Result};
use crate::model::MimTarget;

/// What the caller asked for (`--tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenChoice {
    /// The dataset's token cache when it has one, else the tokenizer on every batch.
    #[default]
    Auto,
    /// The dataset's token cache (made by `beit tokenize`, of whole images).
    Cached,
    /// The tokenizer run on every batch's augmented view.
    Augmented,
}

impl std::str::FromStr for TokenChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(TokenChoice::Auto),
            "cached" => Ok(TokenChoice::Cached),
            "augmented" => Ok(TokenChoice::Augmented),
            other => Err(Error::InvalidArgument(format!("--tokens {other:?}: expected auto, cached or augmented"))),
        }
    }
}

/// Where a run's MIM targets come from, as the run record and the CLI name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSource {
    /// The synthetic task's own tokens (no dataset).
    Synthetic,
    /// The dataset's token cache.
    Cached,
    /// The tokenizer on every batch's view 2.
    Augmented,
    /// No tokens: the pixel target regresses view 1's own patches.
    Pixels,
}

impl TargetSource {
    pub fn name(self) -> &'static str {
        match self {
            TargetSource::Synthetic => "synthetic",
            TargetSource::Cached => "cached",
            TargetSource::Augmented => "augmented",
            TargetSource::Pixels => "pixels",
        }
    }
}

/// Refuses a token choice or a tokenizer beside the pixel target, which uses neither. `tokens`
/// is the choice as given (anything but `auto` counts as a choice, even one that does not
/// parse). Checked before a tokenizer is loaded.
pub fn check_pixel_target(target: MimTarget, tokens: &str, tokenizer_given: bool) -> Result<()> {
    if target == MimTarget::Pixels && (tokenizer_given || tokens != "auto") {
        return Err(pixel_target_conflict());
    }
    Ok(())
}

fn pixel_target_conflict() -> Error {
    Error::InvalidArgument(
        "--tokens and --tokenizer choose visual tokens; the pixel target (--target pixels) uses none".into(),
    )
}

/// Where the targets of a run on the dataset `data` come from:
/// - the pixel target: its own pixels (a token choice or tokenizer beside it is refused);
/// - `cached`: the token cache (whether the file has one is checked when the data is opened);
/// - `augmented`: the tokenizer, which must be given;
/// - `auto`: the token cache when the file has one, else the tokenizer, else an error saying
///   how to get either.
pub fn token_plan(
    choice: TokenChoice,
    target: MimTarget,
    tokenizer_given: bool,
    has_token_cache: bool,
    data: &str,
) -> Result<TargetSource> {
    if target == MimTarget::Pixels {
        if choice != TokenChoice::Auto || tokenizer_given {
            return Err(pixel_target_conflict());
        }
        return Ok(TargetSource::Pixels);
    }
    match (choice, tokenizer_given) {
        (TokenChoice::Cached, _) => Ok(TargetSource::Cached),
        (TokenChoice::Auto, _) if has_token_cache => Ok(TargetSource::Cached),
        (TokenChoice::Augmented | TokenChoice::Auto, true) => Ok(TargetSource::Augmented),
        (TokenChoice::Augmented | TokenChoice::Auto, false) => Err(Error::InvalidArgument(format!(
            "{data} has no token cache: pass --tokenizer DIR (or run `beit tokenize` first)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MimTarget::{Pixels, VisualTokens};
    use TokenChoice::{Augmented, Auto, Cached};

    #[test]
    fn auto_prefers_the_cache_then_the_tokenizer() {
        assert_eq!(token_plan(Auto, VisualTokens, true, true, "d").unwrap(), TargetSource::Cached);
        assert_eq!(token_plan(Auto, VisualTokens, false, true, "d").unwrap(), TargetSource::Cached);
        assert_eq!(token_plan(Auto, VisualTokens, true, false, "d").unwrap(), TargetSource::Augmented);
        let e = token_plan(Auto, VisualTokens, false, false, "d.beitds").unwrap_err().to_string();
        assert!(e.contains("d.beitds has no token cache: pass --tokenizer DIR"), "{e}");
    }

    #[test]
    fn an_explicit_choice_is_followed() {
        // Cached even without a cache: opening the data refuses it, naming `beit tokenize`.
        assert_eq!(token_plan(Cached, VisualTokens, true, false, "d").unwrap(), TargetSource::Cached);
        // Augmented even with a cache, but only with a tokenizer.
        assert_eq!(token_plan(Augmented, VisualTokens, true, true, "d").unwrap(), TargetSource::Augmented);
        assert!(token_plan(Augmented, VisualTokens, false, true, "d").is_err());
    }

    #[test]
    fn the_pixel_target_takes_no_tokens() {
        assert_eq!(token_plan(Auto, Pixels, false, true, "d").unwrap(), TargetSource::Pixels);
        assert!(token_plan(Cached, Pixels, false, true, "d").is_err());
        assert!(token_plan(Augmented, Pixels, false, false, "d").is_err());
        assert!(token_plan(Auto, Pixels, true, false, "d").is_err());
        // Any spelling but `auto` is a choice, even an unknown one.
        assert!(check_pixel_target(Pixels, "bogus", false).is_err());
        assert!(check_pixel_target(VisualTokens, "cached", true).is_ok());
    }

    #[test]
    fn choices_parse_by_name() {
        assert_eq!("auto".parse::<TokenChoice>().unwrap(), Auto);
        assert_eq!("cached".parse::<TokenChoice>().unwrap(), Cached);
        assert_eq!("augmented".parse::<TokenChoice>().unwrap(), Augmented);
        let e = "bogus".parse::<TokenChoice>().unwrap_err().to_string();
        assert!(e.contains(r#"--tokens "bogus": expected auto, cached or augmented"#), "{e}");
    }

    #[test]
    fn sources_have_the_names_checkpoints_record() {
        let names: Vec<_> =
            [TargetSource::Synthetic, TargetSource::Cached, TargetSource::Augmented, TargetSource::Pixels]
                .iter()
                .map(|s| s.name())
                .collect();
        assert_eq!(names, ["synthetic", "cached", "augmented", "pixels"]);
    }
}
