package beit

/*
#include <stdlib.h>
#include "beit.h"

// The batch and output structs are built here, on the C side, so that Go passes only plain
// pointers to Go memory free of Go pointers (the cgo rule), never a struct holding them.
static beit_status go_beit_infer(beit_context *ctx, const beit_model *model,
                                 const float *pixels, size_t pixels_len, size_t batch,
                                 size_t channels, size_t height, size_t width,
                                 const uint8_t *mask, size_t mask_len,
                                 float *lhs, size_t lhs_len, float *pool, size_t pool_len,
                                 float *logits, size_t logits_len) {
	beit_image_batch in = beit_image_batch_default();
	in.pixels = pixels;
	in.pixels_len = pixels_len;
	in.batch = batch;
	in.channels = channels;
	in.height = height;
	in.width = width;
	in.bool_masked_pos = mask;
	in.bool_masked_pos_len = mask_len;
	beit_infer_outputs out = beit_infer_outputs_default();
	out.last_hidden_state = lhs;
	out.last_hidden_state_len = lhs_len;
	out.pooler_output = pool;
	out.pooler_output_len = pool_len;
	out.logits = logits;
	out.logits_len = logits_len;
	return beit_model_infer(ctx, model, &in, &out);
}
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// Architecture is a model's Hugging Face class.
type Architecture uint32

// Architectures (beit_architecture).
const (
	ArchBackbone            Architecture = C.BEIT_ARCH_BACKBONE              // BeitModel
	ArchMaskedImageModeling Architecture = C.BEIT_ARCH_MASKED_IMAGE_MODELING // BeitForMaskedImageModeling
	ArchImageClassification Architecture = C.BEIT_ARCH_IMAGE_CLASSIFICATION  // BeitForImageClassification
)

// ModelInfo describes a model (beit_model_info).
type ModelInfo struct {
	Architecture     Architecture
	HiddenSize       int
	NumLayers        int
	NumHeads         int
	IntermediateSize int
	ImageHeight      int
	ImageWidth       int
	PatchHeight      int
	PatchWidth       int
	NumChannels      int
	NumPatches       int
	VocabSize        int
	NumLabels        int
	NumParameters    uint64
	HasMaskToken     bool
}

func modelInfoFromC(i *C.beit_model_info) ModelInfo {
	return ModelInfo{
		Architecture:     Architecture(i.architecture),
		HiddenSize:       int(i.hidden_size),
		NumLayers:        int(i.num_layers),
		NumHeads:         int(i.num_heads),
		IntermediateSize: int(i.intermediate_size),
		ImageHeight:      int(i.image_height),
		ImageWidth:       int(i.image_width),
		PatchHeight:      int(i.patch_height),
		PatchWidth:       int(i.patch_width),
		NumChannels:      int(i.num_channels),
		NumPatches:       int(i.num_patches),
		VocabSize:        int(i.vocab_size),
		NumLabels:        int(i.num_labels),
		NumParameters:    uint64(i.num_parameters),
		HasMaskToken:     bool(i.has_mask_token),
	}
}

// OutputSizes are the output lengths (in float32 values) for one input size.
type OutputSizes struct {
	LastHiddenState int // batch * NumTokens * hidden
	PoolerOutput    int // batch * hidden, or 0 without a pooler
	Logits          int // batch * patches * vocab (MIM), batch * labels (classification), or 0
	NumTokens       int // patches + 1 (CLS first)
	NumPatches      int
}

// Outputs holds what Infer computed; a nil slice is an output the model does not have.
// Shapes: LastHiddenState [batch, NumTokens, hidden], PoolerOutput [batch, hidden], Logits
// [batch, NumPatches, vocab] or [batch, num_labels].
type Outputs struct {
	LastHiddenState []float32
	PoolerOutput    []float32
	Logits          []float32
	NumTokens       int
	NumPatches      int
}

// Model is a loaded BEiT model. It is immutable: any number of goroutines may call Infer
// (and Info, OutputSizes, Save) on one model at once. Close waits for running calls.
type Model struct {
	mu   sync.RWMutex
	ptr  *C.beit_model
	ctx  *Context
	cctx *C.beit_context // ctx's C handle: kept alive until this model is closed
}

func newModel(ctx *Context, load func(*C.beit_context, **C.beit_model) C.beit_status) (*Model, error) {
	cptr, err := ctx.acquire()
	if err != nil {
		return nil, err
	}
	var ptr *C.beit_model
	if err := call(func() C.beit_status { return load(cptr, &ptr) }); err != nil {
		ctx.release()
		return nil, err
	}
	m := &Model{ptr: ptr, ctx: ctx, cctx: cptr}
	runtime.SetFinalizer(m, (*Model).Close)
	return m, nil
}

// LoadModel loads a Hugging Face model directory (config.json + model.safetensors).
func LoadModel(ctx *Context, dir string) (*Model, error) {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	return newModel(ctx, func(c *C.beit_context, out **C.beit_model) C.beit_status {
		return C.beit_model_load(c, cdir, out)
	})
}

// NewModel creates a randomly initialised model (reproducible from seed) from the text of a
// Hugging Face config.json ("{}" is BEiT-base); arch replaces its architectures entry.
func NewModel(ctx *Context, configJSON string, arch Architecture, seed uint64) (*Model, error) {
	cfg := C.CString(configJSON)
	defer C.free(unsafe.Pointer(cfg))
	return newModel(ctx, func(c *C.beit_context, out **C.beit_model) C.beit_status {
		return C.beit_model_create(c, cfg, C.beit_architecture(arch), C.uint64_t(seed), out)
	})
}

// Close frees the model; it waits for running calls. Closing twice is a no-op.
func (m *Model) Close() error {
	if m == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ptr != nil {
		C.beit_model_free(m.ptr)
		m.ptr = nil
		m.ctx.release()
	}
	runtime.SetFinalizer(m, nil)
	return nil
}

// use runs f with the live handle under the read lock, or fails for a closed model.
func (m *Model) use(f func(*C.beit_model) error) error {
	if m == nil {
		return closedError("model")
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.ptr == nil {
		return closedError("model")
	}
	return f(m.ptr)
}

// Info describes the model.
func (m *Model) Info() (ModelInfo, error) {
	var info ModelInfo
	err := m.use(func(p *C.beit_model) error {
		ci := C.beit_model_info_default()
		if err := call(func() C.beit_status { return C.beit_model_get_info(p, &ci) }); err != nil {
			return err
		}
		info = modelInfoFromC(&ci)
		return nil
	})
	return info, err
}

// OutputSizes gives the output lengths for batch images of height x width pixels.
func (m *Model) OutputSizes(batch, height, width int) (OutputSizes, error) {
	var s OutputSizes
	if batch < 0 || height < 0 || width < 0 {
		return s, argError(StatusInvalidArgument, "negative size (batch %d, height %d, width %d)", batch, height, width)
	}
	err := m.use(func(p *C.beit_model) error {
		cs := C.beit_output_sizes_default()
		if err := call(func() C.beit_status {
			return C.beit_model_output_sizes(p, C.size_t(batch), C.size_t(height), C.size_t(width), &cs)
		}); err != nil {
			return err
		}
		s = OutputSizes{
			LastHiddenState: int(cs.last_hidden_state_len),
			PoolerOutput:    int(cs.pooler_output_len),
			Logits:          int(cs.logits_len),
			NumTokens:       int(cs.num_tokens),
			NumPatches:      int(cs.num_patches),
		}
		return nil
	})
	return s, err
}

// Save writes the model as a Hugging Face directory (created if needed).
func (m *Model) Save(dir string) error {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	return m.use(func(p *C.beit_model) error {
		return call(func() C.beit_status { return C.beit_model_save(p, cdir) })
	})
}

// Infer runs the model on batch images, pixels float32 NCHW [batch, c, h, w] normalised as
// the model expects; mask is nil or [batch, patches] of 0/1 (1: replace that patch by the
// mask token). Every output the model has is computed, into new Go slices that C writes
// directly.
func (m *Model) Infer(pixels []float32, batch, c, h, w int, mask []uint8) (Outputs, error) {
	var out Outputs
	if batch < 0 || c < 0 || h < 0 || w < 0 {
		return out, argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", batch, c, h, w)
	}
	sizes, err := m.OutputSizes(batch, h, w)
	if err != nil {
		return out, err
	}
	out = Outputs{NumTokens: sizes.NumTokens, NumPatches: sizes.NumPatches}
	if sizes.LastHiddenState > 0 {
		out.LastHiddenState = make([]float32, sizes.LastHiddenState)
	}
	if sizes.PoolerOutput > 0 {
		out.PoolerOutput = make([]float32, sizes.PoolerOutput)
	}
	if sizes.Logits > 0 {
		out.Logits = make([]float32, sizes.Logits)
	}
	if err := m.InferInto(pixels, batch, c, h, w, mask, &out); err != nil {
		return Outputs{}, err
	}
	return out, nil
}

// InferInto is Infer writing into the caller's slices in out: a nil slice is an output not
// wanted; a non-nil one must have exactly the length OutputSizes gives (else ErrBufferSize).
// Reusing out across calls avoids allocation. On error nothing is written.
func (m *Model) InferInto(pixels []float32, batch, c, h, w int, mask []uint8, out *Outputs) error {
	if out == nil {
		return argError(StatusNullPointer, "out is nil")
	}
	if batch < 0 || c < 0 || h < 0 || w < 0 {
		return argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", batch, c, h, w)
	}
	return m.use(func(p *C.beit_model) error {
		err := call(func() C.beit_status {
			return C.go_beit_infer(m.cctx, p,
				f32ptr(pixels), C.size_t(len(pixels)), C.size_t(batch), C.size_t(c), C.size_t(h), C.size_t(w),
				u8ptr(mask), C.size_t(len(mask)),
				f32mut(out.LastHiddenState), C.size_t(len(out.LastHiddenState)),
				f32mut(out.PoolerOutput), C.size_t(len(out.PoolerOutput)),
				f32mut(out.Logits), C.size_t(len(out.Logits)))
		})
		runtime.KeepAlive(pixels)
		runtime.KeepAlive(mask)
		runtime.KeepAlive(out)
		return err
	})
}

// Pointers to the first element of Go slices (element types with no Go pointers), or NULL
// for an empty slice.
func f32ptr(s []float32) *C.float {
	if len(s) == 0 {
		return nil
	}
	return (*C.float)(unsafe.Pointer(&s[0]))
}

func f32mut(s []float32) *C.float { return f32ptr(s) }

func u8ptr(s []uint8) *C.uint8_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint8_t)(unsafe.Pointer(&s[0]))
}

func i64ptr(s []int64) *C.int64_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.int64_t)(unsafe.Pointer(&s[0]))
}

func u16ptr(s []uint16) *C.uint16_t {
	if len(s) == 0 {
		return nil
	}
	return (*C.uint16_t)(unsafe.Pointer(&s[0]))
}
