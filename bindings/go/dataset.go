package beit

/*
#include <stdlib.h>
#include "beit.h"

static beit_status go_beit_read(const beit_dataset *ds, uint64_t index, uint8_t *pixels,
                                size_t pixels_len, uint8_t *mask, size_t mask_len,
                                uint16_t *tokens, size_t tokens_len, uint32_t *label,
                                bool *has_label) {
	beit_dataset_sample s = beit_dataset_sample_default();
	s.pixels = pixels;
	s.pixels_len = pixels_len;
	s.mask = mask;
	s.mask_len = mask_len;
	s.tokens = tokens;
	s.tokens_len = tokens_len;
	beit_status st = beit_dataset_read_sample(ds, index, &s);
	if (st == BEIT_OK) {
		*label = s.label;
		*has_label = s.label_written;
	}
	return st;
}
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// DatasetInfo describes a dataset (beit_dataset_info).
type DatasetInfo struct {
	Count                   int
	Height, Width, Channels int
	HasLabels               bool
	HasMasks                bool
	HasTokens               bool
	TokenGridH, TokenGridW  int
	PixelsLen, MaskLen      int // bytes per sample
	TokensLen               int // tokens per sample
}

// Sample is one dataset sample, each array with its shape: Pixels [H, W, C] (interleaved
// channels); Mask [H, W] (a zero Tensor without masks); Tokens [TokenGridH, TokenGridW] (a zero
// Tensor without tokens).
type Sample struct {
	Pixels   Tensor[uint8]
	Mask     Tensor[uint8]
	Tokens   Tensor[uint16]
	Label    uint32
	HasLabel bool
}

// Dataset is an open .beitds file (memory-mapped, read only). Any number of goroutines may
// read from one at once.
type Dataset struct {
	mu   sync.RWMutex
	ptr  *C.beit_dataset
	info DatasetInfo
}

// OpenDataset opens and validates a .beitds dataset file.
func OpenDataset(path string) (*Dataset, error) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var ptr *C.beit_dataset
	if err := call(func() C.beit_status { return C.beit_dataset_open(cpath, &ptr) }); err != nil {
		return nil, err
	}
	ci := C.beit_dataset_info_default()
	if err := call(func() C.beit_status { return C.beit_dataset_get_info(ptr, &ci) }); err != nil {
		C.beit_dataset_free(ptr)
		return nil, err
	}
	d := &Dataset{ptr: ptr, info: DatasetInfo{
		Count:      int(ci.count),
		Height:     int(ci.height),
		Width:      int(ci.width),
		Channels:   int(ci.channels),
		HasLabels:  bool(ci.has_labels),
		HasMasks:   bool(ci.has_masks),
		HasTokens:  bool(ci.has_tokens),
		TokenGridH: int(ci.token_grid_h),
		TokenGridW: int(ci.token_grid_w),
		PixelsLen:  int(ci.pixels_len),
		MaskLen:    int(ci.mask_len),
		TokensLen:  int(ci.tokens_len),
	}}
	runtime.SetFinalizer(d, (*Dataset).Close)
	return d, nil
}

// Close unmaps the dataset; it waits for running reads. Closing twice is a no-op.
func (d *Dataset) Close() error {
	if d == nil {
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ptr != nil {
		C.beit_dataset_free(d.ptr)
		d.ptr = nil
	}
	runtime.SetFinalizer(d, nil)
	return nil
}

// Len is the number of samples (0 once closed).
func (d *Dataset) Len() int {
	if d == nil {
		return 0
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.ptr == nil {
		return 0
	}
	return d.info.Count
}

// Info describes the dataset.
func (d *Dataset) Info() (DatasetInfo, error) {
	if d == nil {
		return DatasetInfo{}, closedError("dataset")
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.ptr == nil {
		return DatasetInfo{}, closedError("dataset")
	}
	return d.info, nil
}

// Read copies sample i (with its mask and tokens when the dataset has them).
func (d *Dataset) Read(i int) (Sample, error) {
	if d == nil {
		return Sample{}, closedError("dataset")
	}
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.ptr == nil {
		return Sample{}, closedError("dataset")
	}
	if i < 0 {
		return Sample{}, argError(StatusInvalidArgument, "index %d is negative", i)
	}
	in := d.info
	var s Sample
	var err error
	if s.Pixels.Shape, err = checkedShape("pixels", in.PixelsLen, in.Height, in.Width, in.Channels); err != nil {
		return Sample{}, err
	}
	s.Pixels = newTensor[uint8](s.Pixels.Shape)
	if in.HasMasks {
		shape, err := checkedShape("mask", in.MaskLen, in.Height, in.Width)
		if err != nil {
			return Sample{}, err
		}
		s.Mask = newTensor[uint8](shape)
	}
	if in.HasTokens {
		shape, err := checkedShape("tokens", in.TokensLen, in.TokenGridH, in.TokenGridW)
		if err != nil {
			return Sample{}, err
		}
		s.Tokens = newTensor[uint16](shape)
	}
	var label C.uint32_t
	var hasLabel C.bool
	err = call(func() C.beit_status {
		return C.go_beit_read(d.ptr, C.uint64_t(i), u8ptr(s.Pixels.Data), C.size_t(len(s.Pixels.Data)),
			u8ptr(s.Mask.Data), C.size_t(len(s.Mask.Data)), u16ptr(s.Tokens.Data), C.size_t(len(s.Tokens.Data)),
			&label, &hasLabel)
	})
	if err != nil {
		return Sample{}, err
	}
	s.Label = uint32(label)
	s.HasLabel = bool(hasLabel)
	return s, nil
}
