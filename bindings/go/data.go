package beit

/*
#include <stdlib.h>
#include "beit.h"

// The C structs that carry Go slices are filled here, on the C side: cgo forbids passing Go
// memory that holds Go pointers.
static beit_status go_beit_writer_append(beit_dataset_writer *w, size_t count, const uint8_t *pixels,
                                         size_t pixels_len, const uint32_t *labels, size_t labels_len,
                                         const uint8_t *masks, size_t masks_len, const uint16_t *tokens,
                                         size_t tokens_len) {
	beit_dataset_samples s = beit_dataset_samples_default();
	s.count = count;
	s.pixels = pixels;
	s.pixels_len = pixels_len;
	s.labels = labels;
	s.labels_len = labels_len;
	s.masks = masks;
	s.masks_len = masks_len;
	s.tokens = tokens;
	s.tokens_len = tokens_len;
	return beit_dataset_writer_append(w, &s);
}

static beit_status go_beit_loader_create(const beit_context *ctx, const char *path, beit_loader_options *o,
                                         const float *mean, size_t mean_len, const float *std, size_t std_len,
                                         beit_loader **out) {
	o->mean = mean;
	o->mean_len = mean_len;
	o->std = std;
	o->std_len = std_len;
	return beit_loader_create(ctx, path, o, out);
}

static beit_status go_beit_loader_next(beit_loader *l, float *view1, size_t view1_len, float *view2,
                                       size_t view2_len, uint8_t *masks, size_t masks_len, int64_t *labels,
                                       size_t labels_len, int64_t *tokens, size_t tokens_len,
                                       beit_loader_batch *out) {
	beit_loader_batch b = beit_loader_batch_default();
	b.view1 = view1;
	b.view1_len = view1_len;
	b.view2 = view2;
	b.view2_len = view2_len;
	b.bool_masked_pos = masks;
	b.bool_masked_pos_len = masks_len;
	b.labels = labels;
	b.labels_len = labels_len;
	b.tokens = tokens;
	b.tokens_len = tokens_len;
	beit_status st = beit_loader_next(l, &b);
	if (st == BEIT_OK) {
		out->images = b.images;
		out->position = b.position;
		out->epoch = b.epoch;
		out->labels_written = b.labels_written;
		out->tokens_written = b.tokens_written;
	}
	return st;
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

func datasetInfoOf(ci *C.beit_dataset_info) DatasetInfo {
	return DatasetInfo{
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
	}
}

// u32 converts a Go size to a C uint32_t, refusing what does not fit.
func u32(v int, name string) (C.uint32_t, error) {
	if v < 0 || uint64(v) > 0xffffffff {
		return 0, argError(StatusInvalidArgument, "%s must be in [0, 2^32), got %d", name, v)
	}
	return C.uint32_t(v), nil
}

// sizeT converts a Go count to a C size_t, refusing a negative one.
func sizeT(v int, name string) (C.size_t, error) {
	if v < 0 {
		return 0, argError(StatusInvalidArgument, "%s must not be negative, got %d", name, v)
	}
	return C.size_t(v), nil
}

// ---- Writer --------------------------------------------------------------------------------

// DatasetSpec is the shape and sections of a new dataset file (beit_dataset_spec).
type DatasetSpec struct {
	Height, Width, Channels int
	Labels                  bool // every sample carries a class label
	Masks                   bool // every sample carries a segmentation mask [H, W]
	// TokenGridH x TokenGridW visual tokens per sample; both 0 for none.
	TokenGridH, TokenGridW int
}

// Samples are Count samples back to back for DatasetWriter.Append: Pixels u8
// [Count, H, W, C] interleaved (each pixel's channels together, rows top to bottom); Labels
// [Count]; Masks [Count, H, W]; Tokens [Count, TokenGridH, TokenGridW]. An optional part is
// given exactly when the spec has it.
type Samples struct {
	Count  int
	Pixels []uint8
	Labels []uint32
	Masks  []uint8
	Tokens []uint16
}

// DatasetWriter writes a .beitds file atomically: nothing exists at its path until Finish,
// and Close on an unfinished writer abandons it, leaving nothing behind. Its methods may be
// called from several goroutines (they take turns).
type DatasetWriter struct {
	mu   sync.Mutex
	ptr  *C.beit_dataset_writer
	Spec DatasetSpec
}

// NewDatasetWriter starts a dataset file at path.
func NewDatasetWriter(path string, spec DatasetSpec) (*DatasetWriter, error) {
	s := C.beit_dataset_spec_default()
	var err error
	for _, f := range []struct {
		dst  *C.uint32_t
		v    int
		name string
	}{{&s.height, spec.Height, "Height"}, {&s.width, spec.Width, "Width"}, {&s.channels, spec.Channels, "Channels"},
		{&s.token_grid_h, spec.TokenGridH, "TokenGridH"}, {&s.token_grid_w, spec.TokenGridW, "TokenGridW"}} {
		if *f.dst, err = u32(f.v, f.name); err != nil {
			return nil, err
		}
	}
	s.has_labels = C.bool(spec.Labels)
	s.has_masks = C.bool(spec.Masks)
	s.has_tokens = C.bool(spec.TokenGridH != 0 || spec.TokenGridW != 0)
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var ptr *C.beit_dataset_writer
	if err := call(func() C.beit_status { return C.beit_dataset_writer_create(cpath, &s, &ptr) }); err != nil {
		return nil, err
	}
	w := &DatasetWriter{ptr: ptr, Spec: spec}
	runtime.SetFinalizer(w, (*DatasetWriter).Close)
	return w, nil
}

func (w *DatasetWriter) use(f func(*C.beit_dataset_writer) error) error {
	if w == nil {
		return closedError("dataset writer")
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ptr == nil {
		return closedError("dataset writer")
	}
	return f(w.ptr)
}

// Append adds s.Count samples; all or nothing: a refused call appends none.
func (w *DatasetWriter) Append(s Samples) error {
	n, err := sizeT(s.Count, "Count")
	if err != nil {
		return err
	}
	return w.use(func(p *C.beit_dataset_writer) error {
		var labels *C.uint32_t
		if len(s.Labels) > 0 {
			labels = (*C.uint32_t)(unsafe.Pointer(&s.Labels[0]))
		}
		err := call(func() C.beit_status {
			return C.go_beit_writer_append(p, n, u8ptr(s.Pixels), C.size_t(len(s.Pixels)), labels,
				C.size_t(len(s.Labels)), u8ptr(s.Masks), C.size_t(len(s.Masks)), u16ptr(s.Tokens),
				C.size_t(len(s.Tokens)))
		})
		runtime.KeepAlive(s)
		return err
	})
}

// Len is the number of samples appended so far.
func (w *DatasetWriter) Len() (int, error) {
	var n C.uint64_t
	err := w.use(func(p *C.beit_dataset_writer) error {
		return call(func() C.beit_status { return C.beit_dataset_writer_count(p, &n) })
	})
	return int(n), err
}

// Finish writes the file and closes the writer (also when it fails: then nothing is written
// and a previous file at the path stays as it was).
func (w *DatasetWriter) Finish() (DatasetInfo, error) {
	ci := C.beit_dataset_info_default()
	err := w.use(func(p *C.beit_dataset_writer) error {
		return call(func() C.beit_status { return C.beit_dataset_writer_finish(p, &ci) })
	})
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return DatasetInfo{}, err
	}
	return datasetInfoOf(&ci), nil
}

// Close frees the writer; an unfinished one is abandoned and leaves nothing behind. Closing
// twice is a no-op.
func (w *DatasetWriter) Close() error {
	if w == nil {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.ptr != nil {
		C.beit_dataset_writer_free(w.ptr)
		w.ptr = nil
	}
	runtime.SetFinalizer(w, nil)
	return nil
}

// ---- Import --------------------------------------------------------------------------------

// ImportFormat is a source format of Import (beit_import_format).
type ImportFormat uint32

// The import formats.
const (
	ImportIDX         ImportFormat = C.BEIT_IMPORT_IDX          // IDX images (+ labels), raw or gzip
	ImportNPY         ImportFormat = C.BEIT_IMPORT_NPY          // NumPy .npy images (+ labels)
	ImportImageFolder ImportFormat = C.BEIT_IMPORT_IMAGE_FOLDER // Dir/<class>/*.png|jpg
	ImportEmoji       ImportFormat = C.BEIT_IMPORT_EMOJI        // an emoji-datasource package
)

func (f ImportFormat) String() string {
	switch f {
	case ImportIDX:
		return "idx"
	case ImportNPY:
		return "npy"
	case ImportImageFolder:
		return "image-folder"
	case ImportEmoji:
		return "emoji"
	}
	return fmt.Sprintf("ImportFormat(%d)", uint32(f))
}

// ImportOptions say what Import converts (beit_dataset_import_options); a zero field is
// unset. Height x Width: the output size (ImageFolder), the padded canvas (IDX), the emoji
// size (Emoji, default 64); Channels 1 or 3 (ImageFolder, default 3); Set: the emoji set.
type ImportOptions struct {
	Format                  ImportFormat
	Out                     string
	Images, Labels, Dir     string
	Height, Width, Channels int
	Set                     string
}

// Import converts images (and labels) into a dataset file at opts.Out, as `beit dataset
// import` does, atomically; an Out that is or lies inside an input is refused first.
func Import(opts ImportOptions) (DatasetInfo, error) {
	o := C.beit_dataset_import_options_default()
	o.format = C.beit_import_format(opts.Format)
	var err error
	if o.height, err = u32(opts.Height, "Height"); err != nil {
		return DatasetInfo{}, err
	}
	if o.width, err = u32(opts.Width, "Width"); err != nil {
		return DatasetInfo{}, err
	}
	if o.channels, err = u32(opts.Channels, "Channels"); err != nil {
		return DatasetInfo{}, err
	}
	var frees []unsafe.Pointer
	defer func() {
		for _, p := range frees {
			C.free(p)
		}
	}()
	cstr := func(s string) *C.char {
		if s == "" {
			return nil
		}
		c := C.CString(s)
		frees = append(frees, unsafe.Pointer(c))
		return c
	}
	o.out, o.images, o.labels, o.dir, o.set = cstr(opts.Out), cstr(opts.Images), cstr(opts.Labels),
		cstr(opts.Dir), cstr(opts.Set)
	ci := C.beit_dataset_info_default()
	if err := call(func() C.beit_status { return C.beit_dataset_import(&o, &ci) }); err != nil {
		return DatasetInfo{}, err
	}
	return datasetInfoOf(&ci), nil
}

// ---- Loader --------------------------------------------------------------------------------

// MaskingStrategy is which patches a mask covers (beit_masking_strategy).
type MaskingStrategy uint32

// The masking strategies.
const (
	MaskingBlockwise MaskingStrategy = C.BEIT_MASKING_BLOCKWISE // BEiT's blocks (the default)
	MaskingRandom    MaskingStrategy = C.BEIT_MASKING_RANDOM    // uniform patches (the ablation)
)

func (m MaskingStrategy) String() string {
	switch m {
	case MaskingBlockwise:
		return "blockwise"
	case MaskingRandom:
		return "random"
	}
	return fmt.Sprintf("MaskingStrategy(%d)", uint32(m))
}

// TokenSource is where a loader's visual tokens come from (beit_token_source).
type TokenSource uint32

// The token sources.
const (
	TokensNone      TokenSource = C.BEIT_TOKENS_NONE      // no tokens
	TokensCached    TokenSource = C.BEIT_TOKENS_CACHED    // the dataset's token cache (whole images)
	TokensTokenizer TokenSource = C.BEIT_TOKENS_TOKENIZER // LoaderOptions.Tokenizer on view 2
)

func (t TokenSource) String() string {
	switch t {
	case TokensNone:
		return "none"
	case TokensCached:
		return "cached"
	case TokensTokenizer:
		return "tokenizer"
	}
	return fmt.Sprintf("TokenSource(%d)", uint32(t))
}

// LoaderOptions configure a Loader (beit_loader_options); zero values mean `beit
// pretrain`'s recipe: BatchSize 64, sizes from Model, BEiT's masked count (75/196 of the
// grid), block-wise masking, crops, flips and normalisation (0.5, 0.5), one worker, the last
// incomplete batch of an epoch dropped. With the same dataset, BatchSize, Seed, model and
// token source, the batches are the ones `beit pretrain` trains on.
type LoaderOptions struct {
	BatchSize int
	// Model gives view 1's size, the patch size and the channels; without one, set
	// ImageHeight/Width and PatchHeight/Width.
	Model                   *Model
	ImageHeight, ImageWidth int
	PatchHeight, PatchWidth int
	View2Height, View2Width int // 0: the tokenizer's input size, else half of view 1
	MaskedPatches           int
	Masking                 MaskingStrategy
	MinMaskBlock            int
	CropScale, CropRatio    *[2]float64 // nil: the recipe's ((0.08, 1), (3/4, 4/3); whole images with cached tokens)
	FlipProb                *float64    // nil: the recipe's (0.5; 0 with cached tokens)
	ColorJitter             float64
	Mean, Std               []float32 // nil: 0.5; one value, or one per channel
	Seed, EpochStart        uint64
	Workers, Prefetch       int
	KeepLast                bool // keep the last incomplete batch of each epoch
	Tokens                  TokenSource
	Tokenizer               *Tokenizer // implies TokensTokenizer when Tokens is TokensNone
}

// LoaderInfo gives the shapes of a loader's batches (beit_loader_info).
type LoaderInfo struct {
	BatchSize, Channels, Height, Width int
	View2Height, View2Width            int
	PatchHeight, PatchWidth            int
	GridH, GridW, NumPatches           int
	MaskedPatches, MinMaskBlock        int
	BatchesPerEpoch, DatasetCount      uint64
	HasLabels, HasTokens               bool
	Tokens                             TokenSource
	View1Len, View2Len, MaskLen        int
	LabelsLen, TokensLen               int
}

// LoaderBatch is one batch of Images images: View1 float32 [Images, C, H, W] (normalised:
// the trainer's pixels), View2 [Images, C, View2Height, View2Width] (DALL-E mapped),
// BoolMaskedPos u8 [Images, NumPatches], Labels [Images] (nil without labels), Tokens
// [Images, NumPatches] (nil without a token source), and its global position and epoch.
type LoaderBatch struct {
	View1, View2            []float32
	BoolMaskedPos           []uint8
	Labels, Tokens          []int64
	Images                  int
	Channels                int
	Height, Width           int
	View2Height, View2Width int
	NumPatches              int
	Position, Epoch         uint64
}

// MIMBatch is the batch as Trainer.Step takes it (view 1, the masks, the tokens as labels).
func (b *LoaderBatch) MIMBatch() MIMBatch {
	return MIMBatch{Pixels: b.View1, Batch: b.Images, Channels: b.Channels, Height: b.Height, Width: b.Width,
		Mask: b.BoolMaskedPos, Labels: b.Tokens}
}

// Loader is BEiT's augmenting pretraining loader over a dataset file: an endless sequence
// of batches (epochs follow each other), each a pure function of the options and its global
// position, so Seek resumes a run exactly. Its methods may be called from several goroutines
// (they take turns).
type Loader struct {
	mu   sync.Mutex
	ptr  *C.beit_loader
	info LoaderInfo
}

// NewLoader creates a loader over the dataset file at path. The loader keeps what it needs of
// ctx, the model and the tokenizer: they may be closed first.
func NewLoader(ctx *Context, path string, opts LoaderOptions) (*Loader, error) {
	o := C.beit_loader_options_default()
	if opts.BatchSize < 0 {
		return nil, argError(StatusInvalidArgument, "BatchSize must not be negative, got %d", opts.BatchSize)
	}
	if opts.BatchSize != 0 {
		o.batch_size = C.size_t(opts.BatchSize)
	}
	for _, f := range []struct {
		dst  *C.size_t
		v    int
		name string
	}{{&o.image_height, opts.ImageHeight, "ImageHeight"}, {&o.image_width, opts.ImageWidth, "ImageWidth"},
		{&o.patch_height, opts.PatchHeight, "PatchHeight"}, {&o.patch_width, opts.PatchWidth, "PatchWidth"},
		{&o.view2_height, opts.View2Height, "View2Height"}, {&o.view2_width, opts.View2Width, "View2Width"},
		{&o.masked_patches, opts.MaskedPatches, "MaskedPatches"}, {&o.min_mask_block, opts.MinMaskBlock, "MinMaskBlock"},
		{&o.workers, opts.Workers, "Workers"}, {&o.prefetch, opts.Prefetch, "Prefetch"}} {
		v, err := sizeT(f.v, f.name)
		if err != nil {
			return nil, err
		}
		*f.dst = v
	}
	o.masking = C.beit_masking_strategy(opts.Masking)
	if opts.CropScale != nil {
		o.crop_scale_min, o.crop_scale_max = C.double(opts.CropScale[0]), C.double(opts.CropScale[1])
	}
	if opts.CropRatio != nil {
		o.crop_ratio_min, o.crop_ratio_max = C.double(opts.CropRatio[0]), C.double(opts.CropRatio[1])
	}
	if opts.FlipProb != nil {
		o.flip_prob = C.double(*opts.FlipProb)
	}
	o.color_jitter = C.double(opts.ColorJitter)
	o.seed, o.epoch_start = C.uint64_t(opts.Seed), C.uint64_t(opts.EpochStart)
	o.drop_last = C.bool(!opts.KeepLast)
	o.token_source = C.beit_token_source(opts.Tokens)
	if opts.Tokenizer != nil && opts.Tokens == TokensNone {
		o.token_source = C.BEIT_TOKENS_TOKENIZER
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	cctx, unlock, err := ctx.handle()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var ptr *C.beit_loader
	create := func() error {
		var mean, std *C.float
		if len(opts.Mean) > 0 {
			mean = (*C.float)(unsafe.Pointer(&opts.Mean[0]))
		}
		if len(opts.Std) > 0 {
			std = (*C.float)(unsafe.Pointer(&opts.Std[0]))
		}
		err := call(func() C.beit_status {
			return C.go_beit_loader_create(cctx, cpath, &o, mean, C.size_t(len(opts.Mean)), std,
				C.size_t(len(opts.Std)), &ptr)
		})
		runtime.KeepAlive(opts.Mean)
		runtime.KeepAlive(opts.Std)
		return err
	}
	withTokenizer := create
	if opts.Tokenizer != nil {
		withTokenizer = func() error {
			return opts.Tokenizer.use(func(t *C.beit_tokenizer) error { o.tokenizer = t; return create() })
		}
	}
	if opts.Model != nil {
		err = opts.Model.use(func(m *C.beit_model) error { o.model = m; return withTokenizer() })
	} else {
		err = withTokenizer()
	}
	if err != nil {
		return nil, err
	}
	ci := C.beit_loader_info_default()
	if err := call(func() C.beit_status { return C.beit_loader_get_info(ptr, &ci) }); err != nil {
		C.beit_loader_free(ptr)
		return nil, err
	}
	l := &Loader{ptr: ptr, info: LoaderInfo{
		BatchSize: int(ci.batch_size), Channels: int(ci.channels), Height: int(ci.height), Width: int(ci.width),
		View2Height: int(ci.view2_height), View2Width: int(ci.view2_width),
		PatchHeight: int(ci.patch_height), PatchWidth: int(ci.patch_width),
		GridH: int(ci.grid_h), GridW: int(ci.grid_w), NumPatches: int(ci.num_patches),
		MaskedPatches: int(ci.masked_patches), MinMaskBlock: int(ci.min_mask_block),
		BatchesPerEpoch: uint64(ci.batches_per_epoch), DatasetCount: uint64(ci.dataset_count),
		HasLabels: bool(ci.has_labels), HasTokens: bool(ci.has_tokens), Tokens: TokenSource(ci.token_source),
		View1Len: int(ci.view1_len), View2Len: int(ci.view2_len), MaskLen: int(ci.bool_masked_pos_len),
		LabelsLen: int(ci.labels_len), TokensLen: int(ci.tokens_len),
	}}
	runtime.SetFinalizer(l, (*Loader).Close)
	return l, nil
}

func (l *Loader) use(f func(*C.beit_loader) error) error {
	if l == nil {
		return closedError("loader")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ptr == nil {
		return closedError("loader")
	}
	return f(l.ptr)
}

// Info describes the loader's batches.
func (l *Loader) Info() (LoaderInfo, error) {
	var info LoaderInfo
	err := l.use(func(*C.beit_loader) error { info = l.info; return nil })
	return info, err
}

// Next gives the batch at the current position and moves on. The sequence is endless: it
// never returns io.EOF.
func (l *Loader) Next() (*LoaderBatch, error) {
	var batch *LoaderBatch
	err := l.use(func(p *C.beit_loader) error {
		i := l.info
		b := &LoaderBatch{
			View1: make([]float32, i.View1Len), View2: make([]float32, i.View2Len),
			BoolMaskedPos: make([]uint8, i.MaskLen), Channels: i.Channels, Height: i.Height, Width: i.Width,
			View2Height: i.View2Height, View2Width: i.View2Width, NumPatches: i.NumPatches,
		}
		if i.HasLabels {
			b.Labels = make([]int64, i.LabelsLen)
		}
		if i.HasTokens {
			b.Tokens = make([]int64, i.TokensLen)
		}
		var out C.beit_loader_batch
		err := call(func() C.beit_status {
			return C.go_beit_loader_next(p, f32ptr(b.View1), C.size_t(len(b.View1)), f32ptr(b.View2),
				C.size_t(len(b.View2)), u8ptr(b.BoolMaskedPos), C.size_t(len(b.BoolMaskedPos)), i64ptr(b.Labels),
				C.size_t(len(b.Labels)), i64ptr(b.Tokens), C.size_t(len(b.Tokens)), &out)
		})
		runtime.KeepAlive(b)
		if err != nil {
			return err
		}
		n := int(out.images)
		b.Images, b.Position, b.Epoch = n, uint64(out.position), uint64(out.epoch)
		if n < i.BatchSize {
			c := i.Channels
			b.View1 = b.View1[:n*c*i.Height*i.Width]
			b.View2 = b.View2[:n*c*i.View2Height*i.View2Width]
			b.BoolMaskedPos = b.BoolMaskedPos[:n*i.NumPatches]
			if b.Labels != nil {
				b.Labels = b.Labels[:n]
			}
			if b.Tokens != nil {
				b.Tokens = b.Tokens[:n*i.NumPatches]
			}
		}
		batch = b
		return nil
	})
	return batch, err
}

// Position is the global position of the next batch.
func (l *Loader) Position() (uint64, error) {
	var pos C.uint64_t
	err := l.use(func(p *C.beit_loader) error {
		return call(func() C.beit_status { return C.beit_loader_get_position(p, &pos) })
	})
	return uint64(pos), err
}

// Seek makes the batch at global position the next one (e.g. Trainer.DataPosition to resume).
func (l *Loader) Seek(position uint64) error {
	return l.use(func(p *C.beit_loader) error {
		return call(func() C.beit_status { return C.beit_loader_seek(p, C.uint64_t(position)) })
	})
}

// Close stops the loader's workers and frees it. Closing twice is a no-op.
func (l *Loader) Close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ptr != nil {
		C.beit_loader_free(l.ptr)
		l.ptr = nil
	}
	runtime.SetFinalizer(l, nil)
	return nil
}

// ---- Mask generator ------------------------------------------------------------------------

// MaskGeneratorOptions configure a MaskGenerator (beit_mask_generator_options); zero values
// mean BEiT's setting: 75/196 of the grid masked, blocks of at least 16 patches (capped at
// the count) and at most the count, aspect in [0.3, 1/0.3], block-wise.
type MaskGeneratorOptions struct {
	GridHeight, GridWidth int
	MaskedPatches         int
	MinBlock, MaxBlock    int
	MinAspect             float64
	Strategy              MaskingStrategy
	Seed                  uint64
}

// MaskGenerator draws BEiT masks, seeded: the same options and seed give the same masks. Its
// methods may be called from several goroutines (they take turns).
type MaskGenerator struct {
	mu      sync.Mutex
	ptr     *C.beit_mask_generator
	patches int
}

// NewMaskGenerator creates a mask generator.
func NewMaskGenerator(opts MaskGeneratorOptions) (*MaskGenerator, error) {
	o := C.beit_mask_generator_options_default()
	for _, f := range []struct {
		dst  *C.size_t
		v    int
		name string
	}{{&o.grid_height, opts.GridHeight, "GridHeight"}, {&o.grid_width, opts.GridWidth, "GridWidth"},
		{&o.masked_patches, opts.MaskedPatches, "MaskedPatches"}, {&o.min_block, opts.MinBlock, "MinBlock"},
		{&o.max_block, opts.MaxBlock, "MaxBlock"}} {
		v, err := sizeT(f.v, f.name)
		if err != nil {
			return nil, err
		}
		*f.dst = v
	}
	if opts.MinAspect != 0 {
		o.min_aspect = C.double(opts.MinAspect)
	}
	o.strategy = C.beit_masking_strategy(opts.Strategy)
	o.seed = C.uint64_t(opts.Seed)
	var ptr *C.beit_mask_generator
	if err := call(func() C.beit_status { return C.beit_mask_generator_create(&o, &ptr) }); err != nil {
		return nil, err
	}
	g := &MaskGenerator{ptr: ptr, patches: opts.GridHeight * opts.GridWidth}
	runtime.SetFinalizer(g, (*MaskGenerator).Close)
	return g, nil
}

// Next draws a mask, u8 [GridHeight, GridWidth] row-major (1 = masked), and its masked count.
func (g *MaskGenerator) Next() ([]uint8, int, error) {
	if g == nil {
		return nil, 0, closedError("mask generator")
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ptr == nil {
		return nil, 0, closedError("mask generator")
	}
	mask := make([]uint8, g.patches)
	var count C.size_t
	err := call(func() C.beit_status {
		return C.beit_mask_generator_next(g.ptr, u8ptr(mask), C.size_t(len(mask)), &count)
	})
	runtime.KeepAlive(mask)
	if err != nil {
		return nil, 0, err
	}
	return mask, int(count), nil
}

// Close frees the generator. Closing twice is a no-op.
func (g *MaskGenerator) Close() error {
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ptr != nil {
		C.beit_mask_generator_free(g.ptr)
		g.ptr = nil
	}
	runtime.SetFinalizer(g, nil)
	return nil
}
