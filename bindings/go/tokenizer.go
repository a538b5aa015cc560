package beit

// #include <stdlib.h>
// #include "beit.h"
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// TokenizerInfo describes a visual tokenizer (beit_tokenizer_info).
type TokenizerInfo struct {
	InChannels     int  // C of an input image
	ImageSize      int  // S: images are S x S
	VocabSize      int  // tokens are in [0, VocabSize)
	GridH, GridW   int  // an image's token grid
	TokensPerImage int  // GridH * GridW
	HasDecoder     bool // Decode works
}

// Tokenizer is a loaded visual tokenizer (a DALL-E-style dVAE encoder, maybe with decoder).
// It is immutable: any number of goroutines may use one at once. It shares its context's
// thread pool, so the Context may be closed first.
type Tokenizer struct {
	mu   sync.RWMutex
	ptr  *C.beit_tokenizer
	info TokenizerInfo
}

// LoadTokenizer loads a tokenizer directory (config.json + model.safetensors).
func LoadTokenizer(ctx *Context, dir string) (*Tokenizer, error) {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	cctx, unlock, err := ctx.handle()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var ptr *C.beit_tokenizer
	if err := call(func() C.beit_status { return C.beit_tokenizer_load(cctx, cdir, &ptr) }); err != nil {
		return nil, err
	}
	return wrapTokenizer(ptr)
}

// wrapTokenizer owns a tokenizer handle from now on (freeing it when its info cannot be read).
func wrapTokenizer(ptr *C.beit_tokenizer) (*Tokenizer, error) {
	ci := C.beit_tokenizer_info_default()
	if err := call(func() C.beit_status { return C.beit_tokenizer_get_info(ptr, &ci) }); err != nil {
		C.beit_tokenizer_free(ptr)
		return nil, err
	}
	t := &Tokenizer{ptr: ptr, info: tokenizerInfoFromC(&ci)}
	runtime.SetFinalizer(t, (*Tokenizer).Close)
	return t, nil
}

func tokenizerInfoFromC(ci *C.beit_tokenizer_info) TokenizerInfo {
	return TokenizerInfo{
		InChannels:     int(ci.in_channels),
		ImageSize:      int(ci.image_size),
		VocabSize:      int(ci.vocab_size),
		GridH:          int(ci.grid_h),
		GridW:          int(ci.grid_w),
		TokensPerImage: int(ci.tokens_per_image),
		HasDecoder:     bool(ci.has_decoder),
	}
}

// Close frees the tokenizer; it waits for running calls. Closing twice is a no-op.
func (t *Tokenizer) Close() error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr != nil {
		C.beit_tokenizer_free(t.ptr)
		t.ptr = nil
	}
	runtime.SetFinalizer(t, nil)
	return nil
}

func (t *Tokenizer) use(f func(*C.beit_tokenizer) error) error {
	if t == nil {
		return closedError("tokenizer")
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	if t.ptr == nil {
		return closedError("tokenizer")
	}
	return f(t.ptr)
}

// Info describes the tokenizer.
func (t *Tokenizer) Info() (TokenizerInfo, error) {
	var info TokenizerInfo
	err := t.use(func(*C.beit_tokenizer) error { info = t.info; return nil })
	return info, err
}

// Tokenize maps batch images, pixels float32 [batch, C, S, S] in [0, 1] (plain, not
// DALL-E-mapped: libbeit maps them), to tokens of shape [batch, TokensPerImage] (each image's
// GridH x GridW grid row by row).
func (t *Tokenizer) Tokenize(pixels []float32, batch int) (Tensor[int64], error) {
	var tokens Tensor[int64]
	err := t.use(func(p *C.beit_tokenizer) error {
		if batch <= 0 {
			return argError(StatusInvalidArgument, "batch must be at least 1, got %d", batch)
		}
		buf := newTensor[int64]([]int{batch, t.info.TokensPerImage})
		err := call(func() C.beit_status {
			return C.beit_tokenizer_tokenize(p, f32ptr(pixels), C.size_t(len(pixels)), C.size_t(batch),
				i64ptr(buf.Data), C.size_t(len(buf.Data)))
		})
		runtime.KeepAlive(pixels)
		if err == nil {
			tokens = buf
		}
		return err
	})
	return tokens, err
}

// Decode maps tokens [batch, TokensPerImage] (e.g. Tokenize's Data) back to images of shape
// [batch, C, S, S] in [0, 1] (tokenizers with a decoder only).
func (t *Tokenizer) Decode(tokens []int64, batch int) (Tensor[float32], error) {
	var pixels Tensor[float32]
	err := t.use(func(p *C.beit_tokenizer) error {
		if batch <= 0 {
			return argError(StatusInvalidArgument, "batch must be at least 1, got %d", batch)
		}
		s := t.info.ImageSize
		buf := newTensor[float32]([]int{batch, t.info.InChannels, s, s})
		err := call(func() C.beit_status {
			return C.beit_tokenizer_decode(p, i64ptr(tokens), C.size_t(len(tokens)), C.size_t(batch),
				f32mut(buf.Data), C.size_t(len(buf.Data)))
		})
		runtime.KeepAlive(tokens)
		if err == nil {
			pixels = buf
		}
		return err
	})
	return pixels, err
}
