//! The one error type of the library. Every fallible Rust API returns `Result<T>`; the C API maps
//! each variant to a `beit_status` code and keeps the message for `beit_last_error_message()`.

use std::fmt;

/// What went wrong, with a message that names the problem (file, tensor, shape) for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A caller passed something unusable: a NULL pointer, a wrong shape or length, a bad option.
    InvalidArgument(String),
    /// A file or directory could not be read or written.
    Io(String),
    /// A file was read but its content is wrong: bad JSON, corrupt safetensors, missing tensor.
    Format(String),
    /// A config that cannot describe a working model (e.g. hidden size not divisible by heads).
    Config(String),
    /// A requested device or feature is not available here.
    Unsupported(String),
    /// A bug in libbeit (a caught panic). Please report it.
    Internal(String),
    /// Training produced a non-finite loss or gradient (diverged); nothing was applied.
    Numerical(String),
    /// The object is in use by another call (a trainer stepped from two threads at once);
    /// nothing was done.
    Busy(String),
}

impl Error {
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::Io(m)
            | Error::Format(m)
            | Error::Config(m)
            | Error::Unsupported(m)
            | Error::Internal(m)
            | Error::Numerical(m)
            | Error::Busy(m) => m,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Error::InvalidArgument(_) => "invalid argument",
            Error::Io(_) => "i/o error",
            Error::Format(_) => "format error",
            Error::Config(_) => "config error",
            Error::Unsupported(_) => "unsupported",
            Error::Internal(_) => "internal error",
            Error::Numerical(_) => "numerical error",
            Error::Busy(_) => "busy",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// `bail!(Kind, "fmt", args)` returns early with `Error::Kind(format!(..))`.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$kind(format!($($arg)*)))
    };
}

/// `ensure!(cond, Kind, "fmt", args)` bails when `cond` is false.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($arg:tt)*) => {
        if !$cond {
            $crate::bail!($kind, $($arg)*);
        }
    };
}
