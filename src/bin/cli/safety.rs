//! The CLI's side of file safety (the rules are in `beit::files`): each command that writes
//! lists what it reads and what it writes, and nothing is written when an output is, or lies
//! inside, an input; temporary files that killed runs left in an output directory are removed
//! when a run is about to write there.

use std::path::Path;

use beit::files::NamedPath;
use beit::model::io::{CONFIG_FILE, WEIGHTS_FILE};

/// What a command reads and writes, named by the options that gave the paths.
#[derive(Default)]
pub struct Paths {
    reads: Vec<NamedPath>,
    writes: Vec<NamedPath>,
}

impl Paths {
    pub fn new() -> Self {
        Self::default()
    }

    /// An input file or directory.
    pub fn read(mut self, option: &str, path: impl AsRef<Path>) -> Self {
        self.reads.push(NamedPath::new(option, path.as_ref()));
        self
    }

    /// An input given by an optional option.
    pub fn read_opt(self, option: &str, path: Option<impl AsRef<Path>>) -> Self {
        match path {
            Some(p) => self.read(option, p),
            None => self,
        }
    }

    /// A `--config` that is a file (a preset name reads nothing).
    pub fn read_config(self, option: &str, config: &str) -> Self {
        if Path::new(config).is_file() {
            self.read(option, config)
        } else {
            self
        }
    }

    /// A file the command writes (or replaces).
    pub fn write(mut self, option: &str, path: impl AsRef<Path>) -> Self {
        self.writes.push(NamedPath::new(option, path.as_ref()));
        self
    }

    /// The files of a model or tokenizer directory the command saves into `dir`.
    pub fn write_model_dir(self, option: &str, dir: &Path) -> Self {
        self.write(option, dir.join(CONFIG_FILE)).write(option, dir.join(WEIGHTS_FILE))
    }

    /// Refuses when a written path is, or lies inside, a read one.
    pub fn check(&self) -> beit::Result<()> {
        beit::files::check_outputs_spare_inputs(&self.writes, &self.reads)
    }
}

/// Removes from `dir` the temporary files of `targets` left by killed runs (see
/// `beit::files::remove_stale_temp_files`), saying so on stderr.
pub fn remove_stale_temp_files(dir: &Path, targets: &[&str]) -> beit::Result<()> {
    report_removed(&beit::files::remove_stale_temp_files(dir, targets)?);
    Ok(())
}

/// Says on stderr which stale temporary files a run removed.
pub fn report_removed(removed: &[beit::files::RemovedTemp]) {
    for r in removed {
        eprintln!(
            "beit: removed {} ({} bytes), a temporary file left by process {}, which is no longer running",
            r.path.display(),
            r.bytes,
            r.pid
        );
    }
}

/// [`remove_stale_temp_files`] for the temporary files of the file `path` (beside it).
pub fn remove_stale_temp_files_of(path: &Path) -> beit::Result<()> {
    report_removed(&beit::files::remove_stale_temp_files_of(path)?);
    Ok(())
}

/// The files of a model directory, for [`remove_stale_temp_files`].
pub const MODEL_FILES: [&str; 2] = [CONFIG_FILE, WEIGHTS_FILE];
