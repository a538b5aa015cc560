"""Exceptions: one class per beit_status, all subclasses of BeitError."""

from __future__ import annotations

from . import _ffi


class BeitError(Exception):
    """A libbeit call failed. ``status`` is the beit_status code (an int; None for errors the
    bindings raise before any call, e.g. on a closed handle), ``status_name`` its name
    (e.g. ``"BEIT_ERR_IO"``) and ``message`` the library's explanation."""

    def __init__(self, message: str, status: int | None = None, status_name: str | None = None):
        super().__init__(f"{status_name}: {message}" if status_name else message)
        self.status = status
        self.status_name = status_name
        self.message = message


class InvalidArgumentError(BeitError, ValueError):
    """BEIT_ERR_INVALID_ARGUMENT: a wrong shape, length, option or value."""


class NullPointerError(BeitError, ValueError):
    """BEIT_ERR_NULL_POINTER (the bindings never pass NULL where it is required)."""


class IoError(BeitError):
    """BEIT_ERR_IO: a file or directory could not be read or written."""


class FormatError(BeitError):
    """BEIT_ERR_FORMAT: a file's content is wrong (bad JSON, corrupt safetensors, ...)."""


class ConfigError(BeitError, ValueError):
    """BEIT_ERR_CONFIG: a config that cannot describe a working model."""


class UnsupportedError(BeitError):
    """BEIT_ERR_UNSUPPORTED: a device or feature this build lacks."""


class BufferSizeError(BeitError, ValueError):
    """BEIT_ERR_BUFFER_SIZE: a buffer of the wrong length."""


class InternalError(BeitError):
    """BEIT_ERR_INTERNAL: a bug in libbeit."""


class NumericalError(BeitError, ArithmeticError):
    """BEIT_ERR_NUMERICAL: training diverged; the step was not applied."""


class BusyError(BeitError):
    """BEIT_ERR_BUSY: the handle is in use by a call on another thread (a trainer takes one
    call at a time); nothing was done. The bindings' Trainer serialises its own calls, so this
    comes only from raw calls into the library."""


class ClosedError(BeitError, ValueError):
    """The handle was closed (``close()`` or its ``with`` block ended)."""


_BY_STATUS = {
    _ffi.BEIT_ERR_INVALID_ARGUMENT: InvalidArgumentError,
    _ffi.BEIT_ERR_NULL_POINTER: NullPointerError,
    _ffi.BEIT_ERR_IO: IoError,
    _ffi.BEIT_ERR_FORMAT: FormatError,
    _ffi.BEIT_ERR_CONFIG: ConfigError,
    _ffi.BEIT_ERR_UNSUPPORTED: UnsupportedError,
    _ffi.BEIT_ERR_BUFFER_SIZE: BufferSizeError,
    _ffi.BEIT_ERR_INTERNAL: InternalError,
    _ffi.BEIT_ERR_NUMERICAL: NumericalError,
    _ffi.BEIT_ERR_BUSY: BusyError,
}


def error_class(status: int) -> type[BeitError]:
    return _BY_STATUS.get(status, BeitError)
