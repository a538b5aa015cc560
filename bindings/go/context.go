package beit

// #include "beit.h"
import "C"

import (
	"runtime"
	"sync"
)

// Device says where a context runs work.
type Device uint32

// Devices (beit_device).
const (
	DeviceAuto Device = C.BEIT_DEVICE_AUTO // CUDA when built in and usable, else the CPU
	DeviceCPU  Device = C.BEIT_DEVICE_CPU
	DeviceCUDA Device = C.BEIT_DEVICE_CUDA // an ErrUnsupported error when unavailable
)

// ContextOptions configures NewContext. The zero value means DeviceAuto (GPU 0), one thread
// per core and a memory budget of what the process has available.
type ContextOptions struct {
	Device  Device
	Threads int // worker threads; 0: one per available core
	// MemoryBudget is how many bytes one object planned on the context (a model, a trainer,
	// one inference pass, a tokenizer) may need; a bigger one is refused before anything is
	// allocated (ErrConfig when the size comes from a model config, ErrInvalidArgument when it
	// comes from an input). 0 (the zero value) means the memory available to the process when
	// each object is planned, which is also the library's default.
	MemoryBudget uint64
	// DeviceIndex is the GPU a DeviceCUDA or DeviceAuto context uses, as the driver numbers
	// them (after CUDA_VISIBLE_DEVICES); 0 (the zero value) is the first, the default. A
	// process drives one GPU: once a context has opened one, a context naming another fails
	// with ErrUnsupported (run one process per GPU). A GPU the driver does not have is
	// ErrUnsupported with DeviceCUDA (DeviceAuto takes the CPU instead); DeviceCPU needs 0
	// (ErrInvalidArgument otherwise).
	DeviceIndex uint32
}

// Context is an execution context: a device and a thread pool of its own. It may be shared
// by many goroutines.
//
// libbeit requires every model to be freed before the context it was loaded with; Context
// counts its live models, so Close on a context that still has models only marks it closed
// (new loads fail) and the C context is freed when its last model is closed.
type Context struct {
	mu     sync.Mutex
	ptr    *C.beit_context
	closed bool
	models int
}

// NewContext creates a context; opts may be nil for the defaults.
func NewContext(opts *ContextOptions) (*Context, error) {
	o := C.beit_context_options_default()
	if opts != nil {
		if opts.Threads < 0 || opts.Threads > 1<<31 {
			return nil, argError(StatusInvalidArgument, "Threads %d out of range", opts.Threads)
		}
		o.device = C.beit_device(opts.Device)
		o.num_threads = C.uint32_t(opts.Threads)
		o.memory_budget = C.uint64_t(opts.MemoryBudget)
		o.device_index = C.uint32_t(opts.DeviceIndex)
	}
	var ptr *C.beit_context
	if err := call(func() C.beit_status { return C.beit_context_create(&o, &ptr) }); err != nil {
		return nil, err
	}
	c := &Context{ptr: ptr}
	runtime.SetFinalizer(c, (*Context).Close)
	return c, nil
}

// Close releases the context (see Context for models still alive). Closing twice is a no-op.
func (c *Context) Close() error {
	if c == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	c.freeIfUnused()
	runtime.SetFinalizer(c, nil)
	return nil
}

func (c *Context) freeIfUnused() {
	if c.closed && c.models == 0 && c.ptr != nil {
		C.beit_context_free(c.ptr)
		c.ptr = nil
	}
}

// acquire gives the C handle for a new model and counts that model.
func (c *Context) acquire() (*C.beit_context, error) {
	if c == nil {
		return nil, closedError("context")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, closedError("context")
	}
	c.models++
	return c.ptr, nil
}

func (c *Context) release() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.models--
	c.freeIfUnused()
}

// handle gives the C handle for a call that does not outlive it (tokenizer and trainer
// creation: they share the pool, so the context may be freed after).
func (c *Context) handle() (*C.beit_context, func(), error) {
	if c == nil {
		return nil, nil, closedError("context")
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, nil, closedError("context")
	}
	return c.ptr, c.mu.Unlock, nil
}
