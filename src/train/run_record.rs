//! The options of a training run that decide what data it sees, kept in its checkpoint so a
//! resume can refuse to continue with other ones. A checkpoint holds the model, the optimizer,
//! the random state and the data position; whether a resume continues the same run also depends
//! on options that live outside it: the batch size, the dataset, the masking. Which options
//! count is the front end's choice (the CLI records `--batch`, `--data`, `--masking`, ...);
//! the record stores them by name and [`RunRecord::changes`] compares two records.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One recorded option: its value as the user gave it (or as the run resolved it), and for a
/// file or directory the identity of its content ([`crate::files::fingerprint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedOption {
    pub value: String,
    /// When present, the option's identity: two values with the same identity are the same
    /// input (a dataset moved to another path), two with different ones are not (another file
    /// at the same path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Options by name (a map sorted by name, so a checkpoint's bytes do not depend on the order
/// they were recorded in).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunRecord(BTreeMap<String, RecordedOption>);

/// How a resume's options compare with the checkpoint's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordComparison {
    /// One line per changed option: `NAME: OLD in the checkpoint, NEW here`.
    pub changed: Vec<String>,
    /// Options whose value changed but whose identity did not (a moved file), one line each.
    pub moved: Vec<String>,
}

impl RunRecord {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `name` = `value`.
    pub fn set(&mut self, name: &str, value: impl ToString) -> &mut Self {
        self.0.insert(name.to_string(), RecordedOption { value: value.to_string(), identity: None });
        self
    }

    /// Records `name` = the file or directory `path`, identified by the fingerprints of `files`
    /// (paths; for a directory, the files in it that make its content, e.g. its weights and
    /// config). The value shown is the path as resolved (absolute, symlinks followed).
    pub fn set_path(&mut self, name: &str, path: &Path, files: &[&Path]) -> Result<&mut Self> {
        let shown = crate::files::resolve(path)?.display().to_string();
        let identity = files.iter().map(|f| crate::files::fingerprint(f)).collect::<Result<Vec<_>>>()?.join(",");
        self.0.insert(name.to_string(), RecordedOption { value: shown, identity: Some(identity) });
        Ok(self)
    }

    pub fn get(&self, name: &str) -> Option<&RecordedOption> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &RecordedOption)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What differs between this record (the checkpoint's) and `current` (the resume's), option
    /// by option; an option recorded on one side only is a change too.
    pub fn changes(&self, current: &RunRecord) -> RecordComparison {
        let mut names: Vec<&String> = self.0.keys().chain(current.0.keys()).collect();
        names.sort();
        names.dedup();
        let mut out = RecordComparison::default();
        for name in names {
            let (old, new) = (self.0.get(name), current.0.get(name));
            let show = |o: Option<&RecordedOption>| o.map_or("(not given)".to_string(), |o| o.value.clone());
            let same_identity = match (old, new) {
                (Some(a), Some(b)) => match (&a.identity, &b.identity) {
                    (Some(x), Some(y)) => Some(x == y),
                    _ => None,
                },
                _ => None,
            };
            match same_identity {
                Some(true) if old.map(|o| &o.value) != new.map(|n| &n.value) => {
                    out.moved.push(format!("{name}: {} in the checkpoint, {} here", show(old), show(new)));
                }
                Some(true) => {}
                Some(false) => {
                    let (a, b) = (show(old), show(new));
                    let detail = if a == b {
                        format!("{a} (its content changed)")
                    } else {
                        format!("{a} in the checkpoint, {b} here")
                    };
                    out.changed.push(format!("{name}: {detail}"));
                }
                None if old != new => {
                    out.changed.push(format!("{name}: {} in the checkpoint, {} here", show(old), show(new)));
                }
                None => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_each_option_with_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"one").unwrap();
        std::fs::write(&b, b"one").unwrap();
        let mut old = RunRecord::new();
        old.set("--batch", 4).set("--masking", "block").set("--seed", 0);
        old.set_path("--data", &a, &[&a]).unwrap();
        let mut same = old.clone();
        same.set_path("--data", &b, &[&b]).unwrap(); // same content, another path
        let c = old.changes(&same);
        assert!(c.changed.is_empty() && c.moved.len() == 1 && c.moved[0].starts_with("--data: "), "{c:?}");

        let mut new = old.clone();
        new.set("--batch", 8).set("--masking", "random");
        std::fs::write(&a, b"two").unwrap();
        new.set_path("--data", &a, &[&a]).unwrap();
        let c = old.changes(&new);
        assert_eq!(c.changed.len(), 3, "{c:?}");
        assert_eq!(c.changed[0], "--batch: 4 in the checkpoint, 8 here");
        assert!(c.changed[1].starts_with("--data: ") && c.changed[1].ends_with("(its content changed)"), "{c:?}");
        assert_eq!(c.changed[2], "--masking: block in the checkpoint, random here");

        let mut fewer = RunRecord::new();
        fewer.set("--batch", 4);
        assert!(old.changes(&fewer).changed.iter().any(|l| l == "--seed: 0 in the checkpoint, (not given) here"));
    }
}
