//! Files a run writes, and the rules that keep the user's data safe while it writes them:
//!
//! - [`write_atomic`]: replace a file through a temporary file beside it and a rename, so a
//!   reader (or a crash) sees the old file or the new one, never a torn one;
//! - [`remove_stale_temp_files`]: the temporary files of processes that were killed mid-write
//!   (SIGKILL leaves no chance to clean up; a BEiT-base checkpoint's is about 1 GB);
//! - [`check_outputs_spare_inputs`]: refuse an output that is, or lies inside, one of the run's
//!   inputs, before anything is written;
//! - [`OutputDir`]: an output directory that a failed run does not leave behind empty;
//! - [`fingerprint`]: a cheap identity of a file's content, so a resume can tell that another
//!   file now stands at a recorded path.
//!
//! The CLI uses all of them; they take plain paths so the C API can too.

mod atomic;
mod fingerprint;
mod output_dir;
mod overlap;
mod stale;

pub use atomic::{create_temp_beside, temp_path_beside, write_atomic, write_atomic_all, TempFile};
pub use fingerprint::fingerprint;
pub use output_dir::OutputDir;
pub use overlap::{check_outputs_spare_inputs, resolve, NamedPath};
pub use stale::{remove_stale_temp_files, remove_stale_temp_files_of, RemovedTemp};
