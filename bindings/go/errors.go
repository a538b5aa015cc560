package beit

// #include "beit.h"
import "C"

import (
	"fmt"
	"runtime"
)

// Status is a libbeit status code (beit_status).
type Status uint32

// The status codes of beit.h.
const (
	StatusOK              Status = C.BEIT_OK
	StatusInvalidArgument Status = C.BEIT_ERR_INVALID_ARGUMENT
	StatusNullPointer     Status = C.BEIT_ERR_NULL_POINTER
	StatusIO              Status = C.BEIT_ERR_IO
	StatusFormat          Status = C.BEIT_ERR_FORMAT
	StatusConfig          Status = C.BEIT_ERR_CONFIG
	StatusUnsupported     Status = C.BEIT_ERR_UNSUPPORTED
	StatusBufferSize      Status = C.BEIT_ERR_BUFFER_SIZE
	StatusInternal        Status = C.BEIT_ERR_INTERNAL
	StatusNumerical       Status = C.BEIT_ERR_NUMERICAL
	StatusBusy            Status = C.BEIT_ERR_BUSY
)

// String gives the C name of the status, e.g. "BEIT_ERR_IO".
func (s Status) String() string {
	return C.GoString(C.beit_status_name(C.beit_status(s)))
}

// Error is every error this package returns: the libbeit status and the message
// beit_last_error_message() gave for that very call (or a message of the binding's own for
// a closed handle).
//
// errors.Is(err, ErrIO) (and the other Err* sentinels) tests the status class;
// errors.Is(err, ErrClosed) tests for a handle used after Close.
type Error struct {
	Status  Status
	Message string

	sentinel bool
	closed   bool
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "beit: " + e.Status.String()
	}
	return fmt.Sprintf("beit: %s: %s", e.Status, e.Message)
}

// Is makes the sentinels match by status class (ErrClosed: by closed handle).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok || !t.sentinel {
		return false
	}
	if t.closed {
		return e.closed
	}
	return e.Status == t.Status
}

func sentinel(s Status) *Error { return &Error{Status: s, sentinel: true} }

// Sentinels for errors.Is, one per status class.
var (
	ErrInvalidArgument = sentinel(StatusInvalidArgument)
	ErrNullPointer     = sentinel(StatusNullPointer)
	ErrIO              = sentinel(StatusIO)
	ErrFormat          = sentinel(StatusFormat)
	ErrConfig          = sentinel(StatusConfig)
	ErrUnsupported     = sentinel(StatusUnsupported)
	ErrBufferSize      = sentinel(StatusBufferSize)
	ErrInternal        = sentinel(StatusInternal)
	ErrNumerical       = sentinel(StatusNumerical)
	// ErrBusy: the handle was in use by a call on another thread (a trainer takes one call at
	// a time); nothing was done. Trainer serialises its own methods, so it never returns this.
	ErrBusy = sentinel(StatusBusy)
	// ErrClosed matches an error from a handle used after Close. Such an error has
	// Status StatusNullPointer (it is what C would say of the freed, NULL, handle), so it
	// matches ErrNullPointer too.
	ErrClosed = &Error{Status: StatusNullPointer, Message: "handle is closed", sentinel: true, closed: true}
)

func closedError(what string) error {
	return &Error{Status: StatusNullPointer, Message: what + " is closed", closed: true}
}

// call runs one fallible C call and, on failure, reads the message on the same OS thread:
// beit_last_error_message() is per thread, and a goroutine may move between threads between
// two cgo calls unless locked.
func call(f func() C.beit_status) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	st := f()
	if st == C.BEIT_OK {
		return nil
	}
	return &Error{Status: Status(st), Message: C.GoString(C.beit_last_error_message())}
}

// argError is an error the binding finds before calling C (a Go-side shape check).
func argError(s Status, format string, args ...any) error {
	return &Error{Status: s, Message: fmt.Sprintf(format, args...)}
}

// Version is the loaded library's version, "MAJOR.MINOR.PATCH".
func Version() string { return C.GoString(C.beit_version()) }

// ABIVersion is the loaded library's ABI version; it must equal HeaderABIVersion.
func ABIVersion() uint32 { return uint32(C.beit_abi_version()) }

// HeaderABIVersion is the ABI version of the beit.h this package was compiled against.
const HeaderABIVersion = uint32(C.BEIT_ABI_VERSION)
