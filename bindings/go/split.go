package beit

// #include "beit.h"
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Precision is the precision a trainer computes in (TrainerOptions.Precision, beit_precision).
type Precision uint32

// Precisions (beit_precision). The zero value is PrecisionDefault.
const (
	// PrecisionDefault: bf16 mixed precision on a cuda context, fp32 on the CPU.
	PrecisionDefault Precision = C.BEIT_PRECISION_DEFAULT
	// PrecisionFP32: fp32 everywhere (on a cuda context the step matches the CPU's to rounding).
	PrecisionFP32 Precision = C.BEIT_PRECISION_FP32
	// PrecisionBF16: bf16 activations and GEMM inputs with fp32 accumulation and master
	// weights; cuda contexts only (a CPU context refuses it with ErrUnsupported).
	PrecisionBF16 Precision = C.BEIT_PRECISION_BF16
)

// String is "default", "fp32" or "bf16"; an unknown value prints as "Precision(N)".
func (p Precision) String() string {
	switch p {
	case PrecisionDefault:
		return "default"
	case PrecisionFP32:
		return "fp32"
	case PrecisionBF16:
		return "bf16"
	}
	return fmt.Sprintf("Precision(%d)", uint32(p))
}

// MemoryLocation says where a buffer libbeit lends out lives (beit_memory_location).
type MemoryLocation uint32

// Memory locations (beit_memory_location).
const (
	MemoryHost       MemoryLocation = C.BEIT_MEMORY_HOST        // host memory: Gradients.Host
	MemoryCUDADevice MemoryLocation = C.BEIT_MEMORY_CUDA_DEVICE // GPU memory: Gradients.DevicePointer
)

// String is "host" or "cuda"; an unknown value prints as "MemoryLocation(N)".
func (m MemoryLocation) String() string {
	switch m {
	case MemoryHost:
		return "host"
	case MemoryCUDADevice:
		return "cuda"
	}
	return fmt.Sprintf("MemoryLocation(%d)", uint32(m))
}

// PassStats is what ForwardBackward computed (beit_pass_stats).
type PassStats struct {
	Loss   float64 // the batch's loss, as StepStats.Loss
	Images int     // images in the batch
	// Masked is the number of masked patches the loss averaged over: combining several
	// trainers' gradients into the gradient of their joint batch, each weighs Masked / total.
	Masked int
}

// Gradients is the pending step's gradient buffer (beit_gradients): Len float32 values laid
// out like the parameters (ParameterInfo.Offset gives each one's place; ParameterInfo.Of cuts
// it out).
type Gradients struct {
	Location MemoryLocation
	// Host aliases the trainer's own buffer (MemoryHost; nil on a cuda context): read it and
	// change it in place (an all-reduce, clipping of your own), and ApplyGradients uses it as
	// you left it. It is libbeit's memory, not Go's: it holds the step's gradients only until
	// ApplyGradients or DiscardGradients, and must not be touched after the trainer's Close.
	Host []float32
	// DevicePointer is the buffer's CUdeviceptr (MemoryCUDADevice; 0 otherwise).
	DevicePointer uint64
	// Stream is the CUstream the backward pass was queued on (MemoryCUDADevice; 0 otherwise):
	// make work on the buffer wait for it, and have it finished or queued on it before
	// ApplyGradients.
	Stream uintptr
	// Len is the number of float32 values in the buffer.
	Len int
}

// cMIMBatch is b as a beit_mim_batch held in Go memory: its arrays are pinned through pin (so
// that the struct may hold them when passed to C); call pin.Unpin() once the call is over.
func (b *MIMBatch) cMIMBatch(pin *runtime.Pinner) (C.beit_mim_batch, error) {
	c := C.beit_mim_batch_default()
	if b.Batch < 0 || b.Channels < 0 || b.Height < 0 || b.Width < 0 {
		return c, argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", b.Batch, b.Channels, b.Height, b.Width)
	}
	if len(b.Pixels) > 0 {
		pin.Pin(&b.Pixels[0])
		c.pixels = (*C.float)(unsafe.Pointer(&b.Pixels[0]))
	}
	if len(b.Mask) > 0 {
		pin.Pin(&b.Mask[0])
		c.bool_masked_pos = (*C.uint8_t)(unsafe.Pointer(&b.Mask[0]))
	}
	if len(b.Labels) > 0 {
		pin.Pin(&b.Labels[0])
		c.labels = (*C.int64_t)(unsafe.Pointer(&b.Labels[0]))
	}
	c.pixels_len, c.bool_masked_pos_len, c.labels_len = C.size_t(len(b.Pixels)), C.size_t(len(b.Mask)), C.size_t(len(b.Labels))
	c.batch, c.channels, c.height, c.width = C.size_t(b.Batch), C.size_t(b.Channels), C.size_t(b.Height), C.size_t(b.Width)
	return c, nil
}

// ForwardBackward is the first half of a split step, for hosts that work on the gradients
// before the optimizer (data-parallel training's all-reduce, their own clipping): it checks b
// as Step does, runs the forward and backward into the trainer's gradient buffer and leaves
// the step pending. Then Gradients shows the buffer and ApplyGradients finishes the step
// (clipping + AdamW), or DiscardGradients drops it; ForwardBackward + ApplyGradients equals
// Step bit for bit. While a step is pending, Step, ForwardBackward, checkpoints and
// SetParameter fail with ErrInvalidArgument. On error nothing is pending.
func (t *Trainer) ForwardBackward(b MIMBatch) (PassStats, error) {
	var stats PassStats
	var pin runtime.Pinner
	defer pin.Unpin()
	batch, err := b.cMIMBatch(&pin)
	if err != nil {
		return stats, err
	}
	err = t.use(func(p *C.beit_trainer) error {
		s := C.beit_pass_stats_default()
		if err := call(func() C.beit_status { return C.beit_trainer_forward_backward(p, &batch, &s) }); err != nil {
			return err
		}
		stats = PassStats{Loss: float64(s.loss), Images: int(s.images), Masked: int(s.masked)}
		return nil
	})
	return stats, err
}

// Gradients describes the pending step's gradient buffer: on a CPU context Host aliases it
// (see Gradients for how long it is valid); on a cuda context DevicePointer and Stream give
// it. ErrInvalidArgument when no step is pending.
func (t *Trainer) Gradients() (Gradients, error) {
	var g Gradients
	err := t.use(func(p *C.beit_trainer) error {
		c := C.beit_gradients_default()
		if err := call(func() C.beit_status { return C.beit_trainer_get_gradients(p, &c) }); err != nil {
			return err
		}
		g = Gradients{Location: MemoryLocation(c.location), DevicePointer: uint64(c.device_pointer),
			Stream: uintptr(c.stream), Len: int(c.len)}
		if g.Location == MemoryHost && c.host != nil {
			g.Host = unsafe.Slice((*float32)(unsafe.Pointer(c.host)), g.Len)
		}
		return nil
	})
	return g, err
}

// ApplyGradients is the second half of a split step: the gradient norm, clipping and AdamW
// on the gradient buffer as the host left it. ErrNumerical when the norm is not finite (the
// step is dropped: the trainer is as before ForwardBackward); ErrInvalidArgument when no step
// is pending.
func (t *Trainer) ApplyGradients() (StepStats, error) {
	var stats StepStats
	err := t.use(func(p *C.beit_trainer) error {
		s := C.beit_step_stats_default()
		if err := call(func() C.beit_status { return C.beit_trainer_apply_gradients(p, &s) }); err != nil {
			return err
		}
		stats = stepStatsFromC(&s)
		return nil
	})
	return stats, err
}

// DiscardGradients drops the pending step: the trainer is as before ForwardBackward (its
// random state included). Nothing happens when no step is pending.
func (t *Trainer) DiscardGradients() error {
	return t.use(func(p *C.beit_trainer) error {
		return call(func() C.beit_status { return C.beit_trainer_discard_gradients(p) })
	})
}
