//! What a resumed pretraining run must keep: a checkpoint is not overwritten by accident, its
//! target is kept, and the options that decide the data (recorded in it) are given again
//! unchanged. A checkpoint holds the model, the optimizer, the random state and the data
//! position; whether a resume continues the same run also depends on these.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::io::{SafetensorsFile, CONFIG_FILE, WEIGHTS_FILE};
use crate::model::MimTarget;
use crate::train::checkpoint::META_KEY;
use crate::train::run_record::RunRecord;

use super::pretrain::PretrainDataOptions;
use super::tokens::TargetSource;

/// Refuses to start a fresh run where `checkpoint` exists, unless the caller asked to resume it
/// or to overwrite it.
pub fn check_fresh_start(checkpoint: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if checkpoint.exists() && !resume && !overwrite {
        return Err(Error::InvalidArgument(format!(
            "{} holds a checkpoint (step {}): use --resume to continue it or --overwrite to start over",
            checkpoint.display(),
            saved_step(checkpoint).map_or("unknown".to_string(), |s| s.to_string())
        )));
    }
    Ok(())
}

/// The step a checkpoint was saved at, read from its metadata alone (None if unreadable).
pub fn saved_step(path: &Path) -> Option<u64> {
    let text = SafetensorsFile::open(path).ok()?.metadata().ok()?.remove(META_KEY)?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("step")?.as_u64()
}

/// Refuses to resume a checkpoint trained with `trained` with another target `asked` (None:
/// the caller named none, so the checkpoint's continues).
pub fn check_target(checkpoint: &Path, trained: MimTarget, asked: Option<MimTarget>) -> Result<()> {
    match asked {
        Some(asked) if asked != trained => Err(Error::InvalidArgument(format!(
            "{} was trained with the {trained} target; it cannot resume with --target {asked}",
            checkpoint.display()
        ))),
        _ => Ok(()),
    }
}

/// The options of a pretraining run that decide its data, as its checkpoint records them (by
/// their `beit pretrain` names): the batch size, the masked count (as resolved), the seed, the
/// target, the masking, where the targets come from, the data (a file by path and content) and,
/// for augmented tokens, the tokenizer (by path and content).
///
/// Not recorded: the model's config, directory and vocabulary size. They shape a fresh model
/// only; a resume takes the model from the checkpoint and ignores them, so a moved config file
/// or another spelling of the same preset must not refuse it.
pub fn pretrain_record(
    options: &PretrainDataOptions,
    masked: usize,
    target: MimTarget,
    source: TargetSource,
) -> Result<RunRecord> {
    let mut r = RunRecord::new();
    r.set("--batch", options.batch).set("--masked", masked).set("--seed", options.seed).set("--target", target.name());
    r.set(
        "--masking",
        match options.masking {
            crate::data::masking::MaskingStrategy::Blockwise => "block",
            crate::data::masking::MaskingStrategy::Random => "random",
        },
    );
    r.set("--tokens", source.name());
    if options.is_synthetic() {
        r.set("--data", super::pretrain::SYNTHETIC);
    } else {
        let data = Path::new(&options.data);
        r.set_path("--data", data, &[data])?;
    }
    if let (Some(dir), TargetSource::Augmented) = (&options.tokenizer, source) {
        r.set_path("--tokenizer", dir, &[&dir.join(CONFIG_FILE), &dir.join(WEIGHTS_FILE)])?;
    }
    Ok(r)
}

/// How a resume's record compares with the checkpoint's, when they agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordCheck {
    /// The checkpoint holds no record (written by an older libbeit, or through the C API), so
    /// nothing could be checked.
    Unrecorded,
    /// Every option matches; `moved` has a line per input found at another path with the same
    /// content.
    Matches { moved: Vec<String> },
}

/// Refuses a resume whose data options (`current`) differ from the ones the checkpoint
/// recorded, naming each with both values.
pub fn check_record(checkpoint: &Path, recorded: Option<&RunRecord>, current: &RunRecord) -> Result<RecordCheck> {
    let Some(recorded) = recorded else {
        return Ok(RecordCheck::Unrecorded);
    };
    let comparison = recorded.changes(current);
    if comparison.changed.is_empty() {
        return Ok(RecordCheck::Matches { moved: comparison.moved });
    }
    Err(Error::InvalidArgument(format!(
        "{} was saved by a run with other data options, so resuming it with these would not continue that run: {}. \
         Give the run's options again, or start over with --overwrite",
        checkpoint.display(),
        comparison.changed.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::masking::MaskingStrategy;

    fn options() -> PretrainDataOptions {
        PretrainDataOptions {
            data: super::super::pretrain::SYNTHETIC.into(),
            tokens: "auto".into(),
            tokenizer: None,
            masking: MaskingStrategy::Blockwise,
            batch: 64,
            loader_workers: 1,
            seed: 0,
        }
    }

    #[test]
    fn the_record_holds_the_data_options_and_nothing_else() {
        let r = pretrain_record(&options(), 75, MimTarget::VisualTokens, TargetSource::Synthetic).unwrap();
        let got: Vec<(&str, &str)> = r.iter().map(|(k, v)| (k, v.value.as_str())).collect();
        assert_eq!(
            got,
            [
                ("--batch", "64"),
                ("--data", "synthetic"),
                ("--masked", "75"),
                ("--masking", "block"),
                ("--seed", "0"),
                ("--target", "tokens"),
                ("--tokens", "synthetic"),
            ]
        );
        // The worker count does not change the data; a tokenizer counts only for augmented tokens.
        let dir = tempfile::tempdir().unwrap();
        let other = PretrainDataOptions { loader_workers: 4, tokenizer: Some(dir.path().into()), ..options() };
        let r2 = pretrain_record(&other, 75, MimTarget::VisualTokens, TargetSource::Synthetic).unwrap();
        assert_eq!(r, r2);
    }

    #[test]
    fn a_changed_option_refuses_the_resume_and_a_missing_record_is_reported() {
        let path = Path::new("out/checkpoint.safetensors");
        let old = pretrain_record(&options(), 75, MimTarget::VisualTokens, TargetSource::Synthetic).unwrap();
        assert_eq!(check_record(path, Some(&old), &old).unwrap(), RecordCheck::Matches { moved: vec![] });
        assert_eq!(check_record(path, None, &old).unwrap(), RecordCheck::Unrecorded);
        let random = PretrainDataOptions { masking: MaskingStrategy::Random, batch: 32, ..options() };
        let new = pretrain_record(&random, 75, MimTarget::VisualTokens, TargetSource::Synthetic).unwrap();
        let e = check_record(path, Some(&old), &new).unwrap_err().to_string();
        assert!(
            e.contains("--batch: 64 in the checkpoint, 32 here; --masking: block in the checkpoint, random here"),
            "{e}"
        );
    }

    #[test]
    fn the_target_is_kept_and_an_existing_checkpoint_is_not_overwritten_by_accident() {
        let path = Path::new("c.safetensors");
        assert!(check_target(path, MimTarget::Pixels, None).is_ok());
        assert!(check_target(path, MimTarget::Pixels, Some(MimTarget::Pixels)).is_ok());
        let e = check_target(path, MimTarget::VisualTokens, Some(MimTarget::Pixels)).unwrap_err().to_string();
        assert!(e.contains("was trained with the tokens target; it cannot resume with --target pixels"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint.safetensors");
        assert!(check_fresh_start(&checkpoint, false, false).is_ok());
        std::fs::write(&checkpoint, b"not a checkpoint").unwrap();
        let e = check_fresh_start(&checkpoint, false, false).unwrap_err().to_string();
        assert!(e.contains("holds a checkpoint (step unknown): use --resume"), "{e}");
        assert!(check_fresh_start(&checkpoint, true, false).is_ok());
        assert!(check_fresh_start(&checkpoint, false, true).is_ok());
    }
}
