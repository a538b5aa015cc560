//! Driver errors as libbeit errors.

use cudarc::driver::DriverError;

use crate::error::Error;

/// A driver error as a libbeit error, naming the operation.
pub(crate) fn driver_error(what: &str, e: DriverError) -> Error {
    Error::Internal(format!("CUDA {what} failed: {e:?}"))
}
