//! Temporary files left by killed writers.
//!
//! [`super::write_atomic`] and the dataset writer write `.NAME.tmp-PID-N` (older versions:
//! `.NAME.tmp-PID`) and rename it over `NAME`. A process killed with SIGKILL (or by the OOM
//! killer, or a power cut) in between leaves that file for good, as large as what it was
//! writing. A run that starts or resumes in a directory removes the ones whose writer is no
//! longer running.
//!
//! Only the temporary files of the names the caller writes are considered: another program's
//! `.tmp-` files in a shared directory are not ours to judge. A file is removed only when its
//! writer is known to be gone: never this process's, never one whose PID is running (even if
//! that PID now belongs to an unrelated process), and nothing at all where process liveness
//! cannot be read (no `/proc`). A directory shared by processes in other PID namespaces
//! (containers, other hosts over NFS) can see their live writers as dead: run those elsewhere.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A temporary file [`remove_stale_temp_files`] removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedTemp {
    pub path: PathBuf,
    /// The process that wrote it, no longer running.
    pub pid: u32,
    pub bytes: u64,
}

/// The target name and writer PID of a temporary file name `.NAME.tmp-PID` or
/// `.NAME.tmp-PID-N`; `None` for any other name.
pub(crate) fn parse_temp_name(file_name: &str) -> Option<(&str, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (target, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, n) = match tail.split_once('-') {
        Some((pid, n)) => (pid, Some(n)),
        None => (tail, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if target.is_empty() || !digits(pid) || !n.is_none_or(digits) {
        return None;
    }
    Some((target, pid.parse().ok()?))
}

/// Whether process `pid` is running: `None` where this cannot be told.
fn process_is_running(pid: u32) -> Option<bool> {
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return None;
    }
    Some(proc_root.join(pid.to_string()).exists())
}

/// Removes from `dir` the temporary files of `targets` (file names, e.g. `checkpoint.safetensors`)
/// whose writing process is no longer running, and returns what it removed. A missing `dir` has
/// nothing to remove.
pub fn remove_stale_temp_files(dir: &Path, targets: &[&str]) -> Result<Vec<RemovedTemp>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!(Io, "cannot list {}: {e}", dir.display()),
    };
    let me = std::process::id();
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::Io(format!("cannot list {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some((target, pid)) = name.to_str().and_then(parse_temp_name) else { continue };
        // A scratch file written under a temporary name of its own is written through a
        // temporary file of that name: `..NAME.tmp-PID-N.tmp-PID-M` belongs to NAME too.
        let target = parse_temp_name(target).map_or(target, |(inner, _)| inner);
        if !targets.contains(&target) || pid == me || process_is_running(pid) != Some(false) {
            continue;
        }
        // Plain files only (file_type does not follow a symlink).
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed.push(RemovedTemp { path, pid, bytes: meta.len() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // another run removed it first
            Err(e) => bail!(Io, "cannot remove the stale temporary file {}: {e}", path.display()),
        }
    }
    removed.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(removed)
}

/// [`remove_stale_temp_files`] for the temporary files of the one file `path` (in its
/// directory, `.` for a bare name).
pub fn remove_stale_temp_files_of(path: &Path) -> Result<Vec<RemovedTemp>> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    match path.file_name().and_then(|n| n.to_str()) {
        Some(name) => remove_stale_temp_files(dir, &[name]),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_parse() {
        assert_eq!(parse_temp_name(".checkpoint.safetensors.tmp-123"), Some(("checkpoint.safetensors", 123)));
        assert_eq!(parse_temp_name(".model.safetensors.tmp-7-0"), Some(("model.safetensors", 7)));
        assert_eq!(parse_temp_name(".a.tmp-b.tmp-9-12"), Some(("a.tmp-b", 9)));
        for other in
            ["checkpoint.safetensors.tmp-1", ".x.tmp-", ".x.tmp-1-", ".x.tmp-1-2-3", ".x.tmp-a", ".tmp-1", ".x.tmp-1x"]
        {
            assert_eq!(parse_temp_name(other), None, "{other}");
        }
    }

    /// A PID that is not running now (a child that has exited and been reaped).
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn removes_dead_writers_files_only() {
        if process_is_running(std::process::id()).is_none() {
            eprintln!("no /proc: process liveness unknown, nothing is removed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let me = std::process::id();
        let parent = std::os::unix::process::parent_id(); // running
        let files = [
            format!(".ck.tmp-{dead}"),
            format!(".ck.tmp-{dead}-3"),
            format!(".ck.tmp-{me}-0"),
            format!(".ck.tmp-{parent}"),
            format!(".other.tmp-{dead}"),
            format!("..ck.tmp-{dead}-1.tmp-{dead}-2"),
            "ck".to_string(),
        ];
        for f in &files {
            fs::write(dir.path().join(f), b"0123").unwrap();
        }
        let removed = remove_stale_temp_files(dir.path(), &["ck"]).unwrap();
        let names: Vec<String> =
            removed.iter().map(|r| r.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
        let mut want =
            vec![format!("..ck.tmp-{dead}-1.tmp-{dead}-2"), format!(".ck.tmp-{dead}"), format!(".ck.tmp-{dead}-3")];
        want.sort();
        assert_eq!(names, want);
        assert!(removed.iter().all(|r| r.pid == dead && r.bytes == 4));
        for kept in files[2..5].iter().chain(&files[6..]) {
            assert!(dir.path().join(kept).exists(), "{kept} was removed");
        }
        assert!(remove_stale_temp_files(&dir.path().join("missing"), &["ck"]).unwrap().is_empty());
    }
}
