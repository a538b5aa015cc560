//! Atomic file replacement and the temporary files it goes through.
//!
//! A temporary file is named `.NAME.tmp-PID-N` beside its target `NAME`: the PID says which
//! process writes it, so a later run can tell a killed writer's leftover from a live one's
//! ([`super::remove_stale_temp_files`]); N, unique within the process, keeps two threads that
//! write the same target apart (with the PID alone they would share, and tear, one file).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The N of the next temporary name this process makes.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// How many names [`create_temp_beside`] tries before giving up (a name is taken only by a
/// leftover of an earlier process that had our PID, or by a concurrent writer).
const CREATE_ATTEMPTS: usize = 64;

/// A fresh temporary name beside `path`: `.NAME.tmp-PID-N` in `path`'s directory.
pub fn temp_path_beside(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    ensure!(!name.is_empty(), InvalidArgument, "{} has no file name to write", path.display());
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    Ok(directory_of(path).join(format!(".{name}.tmp-{}-{n}", std::process::id())))
}

/// The directory a file at `path` is in (`.` for a bare name).
pub(crate) fn directory_of(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// A temporary file being written; removed when dropped unless [`TempFile::persist`] renamed
/// it into place, so an error (or a panic) on the way never leaves it behind.
pub struct TempFile {
    path: PathBuf,
    file: Option<fs::File>,
}

/// Creates a new temporary file beside `path` (never opening an existing file: a name that is
/// taken is skipped).
pub fn create_temp_beside(path: &Path) -> Result<TempFile> {
    let mut last_error = None;
    for _ in 0..CREATE_ATTEMPTS {
        let tmp = temp_path_beside(path)?;
        match fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok(TempFile { path: tmp, file: Some(file) }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => bail!(Io, "cannot create {}: {e}", tmp.display()),
        }
    }
    let e = last_error.map(|e| e.to_string()).unwrap_or_default();
    bail!(Io, "cannot create a temporary file beside {}: every name tried exists ({e})", path.display())
}

impl TempFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (until [`TempFile::persist`]).
    pub fn file(&mut self) -> &mut fs::File {
        self.file.as_mut().expect("a TempFile's file is open until it is persisted")
    }

    /// Flushes the file to disk, renames it to `target` and syncs the directory, so the new
    /// content survives a crash from here on.
    pub fn persist(mut self, target: &Path) -> Result<()> {
        let file = self.file.take().expect("a TempFile is persisted once");
        file.sync_all().map_err(|e| Error::Io(format!("cannot sync {}: {e}", self.path.display())))?;
        drop(file);
        fs::rename(&self.path, target)
            .map_err(|e| Error::Io(format!("cannot rename {} to {}: {e}", self.path.display(), target.display())))?;
        // Renamed: nothing of ours is left to remove.
        self.path = PathBuf::new();
        if let Ok(d) = fs::File::open(directory_of(target)) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        self.file = None;
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsync, rename,
/// fsync of the directory. Readers see the old file or the new one, never a torn one; on any
/// error the old file is untouched and the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = create_temp_beside(path)?;
    tmp.file().write_all(bytes).map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.path().display())))?;
    tmp.persist(path)
}

/// Writes several files atomically as a set, as far as a file system allows: every file is
/// written in full to its temporary file first, and only then is each renamed over its target.
/// A failure while writing (a full disk, a missing permission) leaves every old file as it was
/// and removes the temporary files; only a rename that fails after an earlier one succeeded
/// (which a directory that accepted the temporary files rarely does) mixes new and old files.
pub fn write_atomic_all(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut staged = Vec::with_capacity(files.len());
    for &(path, bytes) in files {
        let mut tmp = create_temp_beside(path)?;
        tmp.file().write_all(bytes).map_err(|e| Error::Io(format!("cannot write {}: {e}", tmp.path().display())))?;
        staged.push((tmp, path));
    }
    staged.into_iter().try_for_each(|(tmp, path)| tmp.persist(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.bin")]);
    }

    #[test]
    fn a_set_that_cannot_be_written_in_full_replaces_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("b.bin"));
        write_atomic_all(&[(&a, b"a1"), (&b, b"b1")]).unwrap();
        assert_eq!((fs::read(&a).unwrap(), fs::read(&b).unwrap()), (b"a1".to_vec(), b"b1".to_vec()));
        // The second file's temporary file cannot be created (its directory is missing): the
        // first, already written in full, must not have replaced its old version.
        let missing = dir.path().join("no/such/dir/c.bin");
        assert!(write_atomic_all(&[(&a, b"a2"), (&missing, b"c2")]).is_err());
        assert_eq!(fs::read(&a).unwrap(), b"a1");
        let mut names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json"), std::ffi::OsString::from("b.bin")]);
    }

    #[test]
    fn a_failed_rename_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory at the target: the rename fails after the data was written.
        let target = dir.path().join("busy");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"x").unwrap();
        assert!(write_atomic(&target, b"data").is_err());
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("busy")]);
    }

    #[test]
    fn threads_writing_one_file_never_share_a_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.bin");
        // Each thread writes a file of one repeated byte; a shared temporary file would mix them.
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomic(path, &vec![t; 64 << 10]).unwrap();
                        let seen = fs::read(path).unwrap();
                        assert!(seen.len() == 64 << 10 && seen.iter().all(|&b| b == seen[0]), "a torn file");
                    }
                });
            }
        });
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_taken_temp_name_is_skipped_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        // Plant the next name this process would use, as an earlier process with our PID would.
        let n = NEXT_TEMP.load(Ordering::Relaxed);
        let planted = dir.path().join(format!(".x.tmp-{}-{n}", std::process::id()));
        fs::write(&planted, b"someone else's").unwrap();
        write_atomic(&path, b"mine").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"mine");
        // Another thread's test may have taken the name first; either way the planted file is intact.
        assert_eq!(fs::read(&planted).unwrap(), b"someone else's");
    }
}
