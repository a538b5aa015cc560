//! Outputs that would destroy inputs: `beit infer --output` naming the model's own weights, an
//! importer's `--out` naming its source, a fine-tune's `--out` naming the pretrained directory it
//! starts from. A command lists what it reads and what it writes; [`check_outputs_spare_inputs`]
//! refuses, before anything is written, any written path that is an input or lies inside one.
//!
//! Paths are compared as the filesystem resolves them ([`resolve`]): absolute, symlinks
//! followed, `.` and `..` applied; a path that does not exist yet is its nearest existing
//! ancestor, resolved, plus the rest. Two existing files are also the same when they are one
//! file under two names (hard links: the same device and inode).

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// A path a command reads or writes, and the option that named it (for messages).
#[derive(Debug, Clone)]
pub struct NamedPath {
    pub option: String,
    pub path: PathBuf,
}

impl NamedPath {
    pub fn new(option: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        NamedPath { option: option.into(), path: path.into() }
    }
}

/// `path` as the filesystem resolves it, whether or not it exists yet: the longest existing
/// prefix canonicalised (absolute, symlinks followed), the rest appended with `.` dropped and
/// `..` taking off the component before it.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::Io(format!("cannot read the current directory: {e}")))?.join(path)
    };
    // Walk up to the nearest ancestor that exists, collecting the missing components.
    let mut existing = absolute.as_path();
    let mut missing = Vec::new();
    let canonical = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(_) => match (existing.parent(), existing.components().next_back()) {
                (Some(parent), Some(last)) => {
                    missing.push(last);
                    existing = parent;
                }
                // The root itself cannot be canonicalised: nothing on this path exists to resolve.
                _ => break absolute.clone(),
            },
        }
    };
    let mut out = canonical;
    for component in missing.into_iter().rev() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    Ok(out)
}

/// Device and inode of an existing file (hard links share them).
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// Refuses (`InvalidArgument`) when a path in `writes` is a path in `reads`, or lies inside one,
/// naming both. Call it with every file the command will write (or replace) and every file or
/// directory it reads, before writing anything.
pub fn check_outputs_spare_inputs(writes: &[NamedPath], reads: &[NamedPath]) -> Result<()> {
    let resolved_reads =
        reads.iter().map(|r| Ok((r, resolve(&r.path)?, file_id(&r.path)))).collect::<Result<Vec<_>>>()?;
    for w in writes {
        let written = resolve(&w.path)?;
        let written_id = file_id(&w.path);
        for (r, read, read_id) in &resolved_reads {
            let relation = if written == *read {
                "is"
            } else if written.starts_with(read) {
                "is inside"
            } else if written_id.is_some() && written_id == *read_id {
                "is (a hard link of)"
            } else {
                continue;
            };
            // Where a symlink or a relative path hides the overlap, show the resolved path.
            let resolved_note =
                if written != w.path { format!(" (resolved: {})", written.display()) } else { String::new() };
            bail!(
                InvalidArgument,
                "{} would write {}{resolved_note}, which {relation} the input {} {}: refusing to overwrite an input; \
                 choose another {}",
                w.option,
                w.path.display(),
                r.option,
                r.path.display(),
                w.option
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_handles_missing_tails_and_dot_dot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("a")).unwrap();
        assert_eq!(resolve(&root.join("a/new/../x.bin")).unwrap(), root.join("a/x.bin"));
        assert_eq!(resolve(&root.join("a/./b/c")).unwrap(), root.join("a/b/c"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();
            assert_eq!(resolve(&root.join("link/out")).unwrap(), root.join("a/out"));
        }
    }

    #[test]
    fn outputs_over_or_inside_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("model")).unwrap();
        std::fs::write(d.join("model/model.safetensors"), b"w").unwrap();
        std::fs::write(d.join("data.beitds"), b"d").unwrap();
        let reads = [NamedPath::new("--model", d.join("model")), NamedPath::new("--data", d.join("data.beitds"))];
        let check = |w: PathBuf| check_outputs_spare_inputs(&[NamedPath::new("--out", w)], &reads);
        let e = check(d.join("model/model.safetensors")).unwrap_err().to_string();
        assert!(e.contains("is inside the input --model") && e.contains("--out"), "{e}");
        let e = check(d.join("model/../data.beitds")).unwrap_err().to_string();
        assert!(e.contains("is the input --data") && e.contains("(resolved: "), "{e}");
        assert!(check(d.join("model/new/x")).is_err());
        assert!(check(d.join("out/config.json")).is_ok());
        assert!(check(d.join("data.beitds.tokens")).is_ok());
        #[cfg(unix)]
        {
            std::fs::hard_link(d.join("data.beitds"), d.join("hard")).unwrap();
            let e = check(d.join("hard")).unwrap_err().to_string();
            assert!(e.contains("hard link"), "{e}");
            std::os::unix::fs::symlink(d.join("model"), d.join("soft")).unwrap();
            assert!(check(d.join("soft/config.json")).is_err());
        }
    }
}
