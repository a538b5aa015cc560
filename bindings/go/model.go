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
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// Architecture is a model's Hugging Face class.
type Architecture uint32

// Architectures (beit_architecture).
const (
	ArchBackbone             Architecture = C.BEIT_ARCH_BACKBONE              // BeitModel
	ArchMaskedImageModeling  Architecture = C.BEIT_ARCH_MASKED_IMAGE_MODELING // BeitForMaskedImageModeling
	ArchImageClassification  Architecture = C.BEIT_ARCH_IMAGE_CLASSIFICATION  // BeitForImageClassification
	ArchSemanticSegmentation Architecture = C.BEIT_ARCH_SEMANTIC_SEGMENTATION // BeitForSemanticSegmentation
)

// String is the Hugging Face class name ("BeitForMaskedImageModeling", ...), as config.json's
// "architectures" spells it; an unknown value prints as "Architecture(N)".
func (a Architecture) String() string {
	switch a {
	case ArchBackbone:
		return "BeitModel"
	case ArchMaskedImageModeling:
		return "BeitForMaskedImageModeling"
	case ArchImageClassification:
		return "BeitForImageClassification"
	case ArchSemanticSegmentation:
		return "BeitForSemanticSegmentation"
	}
	return fmt.Sprintf("Architecture(%d)", uint32(a))
}

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

// OutputSizes are the output lengths (in float32 values) and shapes for one input size; an
// output the model does not have has length 0 and a nil shape.
type OutputSizes struct {
	LastHiddenState int // batch * NumTokens * hidden
	PoolerOutput    int // batch * hidden, or 0 without a pooler
	// batch * patches * vocab (MIM), batch * labels (classification), batch * labels * 4gh *
	// 4gw (segmentation, for a gh x gw patch grid), or 0 (backbone)
	Logits     int
	NumTokens  int // patches + 1 (CLS first)
	NumPatches int

	LastHiddenStateShape []int // [batch, NumTokens, hidden]
	PoolerOutputShape    []int // [batch, hidden]
	// [batch, NumPatches, vocab] (MIM), [batch, labels] (classification) or
	// [batch, labels, 4gh, 4gw] (segmentation: the decode head's logits at 4x the patch grid)
	LogitsShape []int
}

// Outputs holds what Infer computed, each output with its shape (see OutputSizes); a zero
// Tensor is an output the model does not have (or, for InferInto, one not wanted).
type Outputs struct {
	LastHiddenState Tensor[float32]
	PoolerOutput    Tensor[float32]
	Logits          Tensor[float32]
	NumTokens       int
	NumPatches      int
}

// Model is a loaded BEiT model. Any number of goroutines may call Infer (and Info,
// OutputSizes, Save, Parameters, Parameter) on one model at once; SetParameter and
// CopyParametersFrom, the calls that change it, wait for those to finish and hold them off
// while they run. Close waits for running calls.
type Model struct {
	mu   sync.RWMutex
	ptr  *C.beit_model
	ctx  *Context
	cctx *C.beit_context // ctx's C handle: kept alive until this model is closed
	info ModelInfo       // read once at load: a model never changes
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
	ci := C.beit_model_info_default()
	if err := call(func() C.beit_status { return C.beit_model_get_info(ptr, &ci) }); err != nil {
		C.beit_model_free(ptr)
		ctx.release()
		return nil, err
	}
	m := &Model{ptr: ptr, ctx: ctx, cctx: cptr, info: modelInfoFromC(&ci)}
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
	err := m.use(func(*C.beit_model) error { info = m.info; return nil })
	return info, err
}

// OutputSizes gives the output lengths for batch images of height x width pixels.
func (m *Model) OutputSizes(batch, height, width int) (OutputSizes, error) {
	var s OutputSizes
	if batch < 0 || height < 0 || width < 0 {
		return s, argError(StatusInvalidArgument, "negative size (batch %d, height %d, width %d)", batch, height, width)
	}
	err := m.use(func(p *C.beit_model) error {
		var err error
		s, err = m.outputSizes(p, batch, height, width)
		return err
	})
	return s, err
}

// outputSizes is OutputSizes for a caller that holds the model's lock (p is its handle).
func (m *Model) outputSizes(p *C.beit_model, batch, height, width int) (OutputSizes, error) {
	cs := C.beit_output_sizes_default()
	if err := call(func() C.beit_status {
		return C.beit_model_output_sizes(p, C.size_t(batch), C.size_t(height), C.size_t(width), &cs)
	}); err != nil {
		return OutputSizes{}, err
	}
	s := OutputSizes{
		LastHiddenState: int(cs.last_hidden_state_len),
		PoolerOutput:    int(cs.pooler_output_len),
		Logits:          int(cs.logits_len),
		NumTokens:       int(cs.num_tokens),
		NumPatches:      int(cs.num_patches),
	}
	return s, s.setShapes(m.info, batch, height, width)
}

// setShapes derives each present output's shape from the model's info (the C API gives
// lengths only) and checks it against the length libbeit reported.
func (s *OutputSizes) setShapes(info ModelInfo, batch, height, width int) error {
	var err error
	if s.LastHiddenState > 0 {
		if s.LastHiddenStateShape, err = checkedShape("last_hidden_state", s.LastHiddenState, batch, s.NumTokens, info.HiddenSize); err != nil {
			return err
		}
	}
	if s.PoolerOutput > 0 {
		if s.PoolerOutputShape, err = checkedShape("pooler_output", s.PoolerOutput, batch, info.HiddenSize); err != nil {
			return err
		}
	}
	if s.Logits > 0 {
		var shape []int
		switch info.Architecture {
		case ArchMaskedImageModeling:
			shape = []int{batch, s.NumPatches, info.VocabSize}
		case ArchSemanticSegmentation:
			shape = []int{batch, info.NumLabels, 4 * (height / info.PatchHeight), 4 * (width / info.PatchWidth)}
		default:
			shape = []int{batch, info.NumLabels}
		}
		if s.LogitsShape, err = checkedShape("logits", s.Logits, shape...); err != nil {
			return err
		}
	}
	return nil
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
// directly, each with its shape (see OutputSizes).
func (m *Model) Infer(pixels []float32, batch, c, h, w int, mask []uint8) (Outputs, error) {
	var out Outputs
	if batch < 0 || c < 0 || h < 0 || w < 0 {
		return out, argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", batch, c, h, w)
	}
	sizes, err := m.OutputSizes(batch, h, w)
	if err != nil {
		return out, err
	}
	out = Outputs{
		LastHiddenState: newTensor[float32](sizes.LastHiddenStateShape),
		PoolerOutput:    newTensor[float32](sizes.PoolerOutputShape),
		Logits:          newTensor[float32](sizes.LogitsShape),
	}
	if err := m.InferInto(pixels, batch, c, h, w, mask, &out); err != nil {
		return Outputs{}, err
	}
	return out, nil
}

// InferInto is Infer writing into the caller's slices out.X.Data: a nil Data is an output not
// wanted; a non-nil one must have exactly the length OutputSizes gives (else ErrBufferSize).
// On success it sets the Shape of every output written (and of none other), NumTokens and
// NumPatches. Reusing out across calls avoids allocation. On error nothing is written.
func (m *Model) InferInto(pixels []float32, batch, c, h, w int, mask []uint8, out *Outputs) error {
	if out == nil {
		return argError(StatusNullPointer, "out is nil")
	}
	if batch < 0 || c < 0 || h < 0 || w < 0 {
		return argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", batch, c, h, w)
	}
	return m.use(func(p *C.beit_model) error {
		lhs, pool, logits := out.LastHiddenState.Data, out.PoolerOutput.Data, out.Logits.Data
		err := call(func() C.beit_status {
			return C.go_beit_infer(m.cctx, p,
				f32ptr(pixels), C.size_t(len(pixels)), C.size_t(batch), C.size_t(c), C.size_t(h), C.size_t(w),
				u8ptr(mask), C.size_t(len(mask)),
				f32mut(lhs), C.size_t(len(lhs)), f32mut(pool), C.size_t(len(pool)),
				f32mut(logits), C.size_t(len(logits)))
		})
		runtime.KeepAlive(pixels)
		runtime.KeepAlive(mask)
		runtime.KeepAlive(out)
		if err != nil {
			return err
		}
		// The call succeeded, so every non-nil buffer had its output's exact length: the
		// shapes follow from the same sizes.
		s, err := m.outputSizes(p, batch, h, w)
		if err != nil {
			return err
		}
		out.LastHiddenState.Shape = shapeIfWritten(lhs, s.LastHiddenStateShape)
		out.PoolerOutput.Shape = shapeIfWritten(pool, s.PoolerOutputShape)
		out.Logits.Shape = shapeIfWritten(logits, s.LogitsShape)
		out.NumTokens, out.NumPatches = s.NumTokens, s.NumPatches
		return nil
	})
}

func shapeIfWritten(data []float32, shape []int) []int {
	if data == nil {
		return nil
	}
	return shape
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
