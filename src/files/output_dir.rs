//! Output directories that a failed run does not leave behind.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A run's output directory, created (with any missing parents) when the run is about to write.
/// Dropped without [`OutputDir::keep`] (the run failed), it removes the directories it created
/// that are still empty, deepest first; a directory that existed before, or that holds anything,
/// is never touched.
#[derive(Debug)]
pub struct OutputDir {
    path: PathBuf,
    /// The directories this created, outermost first.
    created: Vec<PathBuf>,
}

impl OutputDir {
    pub fn create(path: &Path) -> Result<Self> {
        let mut missing = Vec::new();
        let mut at = Some(path);
        while let Some(p) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            missing.push(p.to_path_buf());
            at = p.parent();
        }
        missing.reverse();
        let mut this = OutputDir { path: path.to_path_buf(), created: Vec::new() };
        for dir in missing {
            match fs::create_dir(&dir) {
                Ok(()) => this.created.push(dir),
                // Created meanwhile by someone else: theirs, not ours to remove.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                // `this` is dropped here and removes what it created so far.
                Err(e) => return Err(Error::Io(format!("cannot create {}: {e}", dir.display()))),
            }
        }
        ensure!(path.is_dir(), Io, "cannot use {} as an output directory: it is not a directory", path.display());
        Ok(this)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run succeeded: keep the directory.
    pub fn keep(mut self) {
        self.created.clear();
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // remove_dir refuses a non-empty directory: whatever the run wrote stays.
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_output_dir_removes_only_what_it_created_and_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b/c");
        drop(OutputDir::create(&out).unwrap());
        assert!(!dir.path().join("a").exists());

        let kept = OutputDir::create(&out).unwrap();
        kept.keep();
        assert!(out.is_dir());

        let out2 = dir.path().join("a/b/d");
        let guard = OutputDir::create(&out2).unwrap();
        fs::write(out2.join("written"), b"x").unwrap();
        drop(guard);
        assert!(out2.join("written").exists(), "a directory with content stays");
        assert!(out.is_dir(), "a directory that existed before stays");

        fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(OutputDir::create(&dir.path().join("file")).is_err());
        assert!(OutputDir::create(&dir.path().join("file/sub")).is_err());
    }
}
