package beit

/*
#include <stdlib.h>
#include "beit.h"

extern int32_t goDvaeProgress(beit_dvae_step_stats *stats, void *user);

// The callback libbeit calls: hands the stats to the exported Go function (which cgo declares
// with a non-const pointer; it only reads them).
static int32_t go_dvae_progress(const beit_dvae_step_stats *stats, void *user) {
	return goDvaeProgress((beit_dvae_step_stats *)stats, user);
}

// Trains with go_dvae_progress as the callback when user is not NULL, else with none.
static beit_status go_beit_dvae_train(beit_dvae_trainer *t, const char *path, const beit_dvae_data_options *o,
                                      void *user, beit_dvae_train_summary *out) {
	return beit_dvae_trainer_train(t, path, o, user ? go_dvae_progress : NULL, user, out);
}
*/
import "C"

import (
	"runtime"
	"sync"
	"unsafe"
)

// DvaeConfig is a new tokenizer's architecture (beit_dvae_config, the fields of its
// config.json). A zero field takes the default of `beit tokenizer train`: 1 channel, 32 px
// images, 8192 codes, first group width 32, 3 groups of 1 residual block, decoder width 64.
type DvaeConfig struct {
	InChannels     int // image channels C, 1 to 4
	ImageSize      int // side S of the square images; a multiple of 2^(GroupCount-1)
	VocabSize      int // codebook size, 2 to 65536
	NHid           int // width of the first group (later groups double it); a multiple of 4
	GroupCount     int // groups of residual blocks, 1 to 6; the token grid is S / 2^(GroupCount-1)
	BlocksPerGroup int // residual blocks per group, 1 to 16
	DecoderWidth   int // width of the decoder's first convolution
}

// DvaeTrainOptions is how a tokenizer trainer optimises (beit_dvae_train_options). A zero
// field takes the default of `beit tokenizer train` (so a KL weight of exactly 0 cannot be
// asked for; use a tiny one): LR 1e-3, KLWeight 5e-3, TauStart 1, TauEnd 0.125, TotalSteps
// 600, Seed 0.
type DvaeTrainOptions struct {
	LR         float32 // peak learning rate (warmup over 5% of TotalSteps, then cosine to LR/100)
	KLWeight   float32 // final weight of the KL term, reached after 20% of TotalSteps
	TauStart   float32 // Gumbel-softmax temperature at the start
	TauEnd     float32 // the temperature after 70% of TotalSteps
	TotalSteps uint64  // steps the schedules span
	Seed       uint64  // Gumbel noise; also the initial weights of NewDvaeTrainer
}

// DvaeDataOptions is how Train draws batches from a dataset (beit_dvae_data_options). A zero
// field takes the default: Steps 0 runs up to the trainer's TotalSteps; Batch 64;
// CropScaleMin 0.5; Workers 1; Seed 0.
type DvaeDataOptions struct {
	Steps        uint64  // steps to run
	Batch        int     // images per step; the dataset needs at least this many
	CropScaleMin float64 // smallest area fraction of the random resized crop, in (0, 1]
	Workers      int     // loader threads (the batches are the same for any number)
	Seed         uint64  // the epochs' orders and the augmentations
}

// DvaeStepStats is what one tokenizer training step did (beit_dvae_step_stats).
type DvaeStepStats struct {
	Step       uint64  // steps completed, this one included
	Loss       float64 // ReconMSE + (the KL weight of this step) * KL, before the update
	ReconMSE   float64 // reconstruction error from the relaxed codes, in mapped-pixel units
	KL         float64 // KL divergence of the code distribution to uniform, per token (nats)
	Perplexity float64 // of the hard codes over the batch
	Tau        float64 // this step's Gumbel-softmax temperature
	LR         float64 // this step's learning rate
}

// DvaeTrainSummary is what a Train call did (beit_dvae_train_summary).
type DvaeTrainSummary struct {
	Steps   uint64  // steps applied
	Stopped bool    // the progress function stopped the run early
	Seconds float64 // wall-clock time of the run
}

func dvaeStatsFromC(s *C.beit_dvae_step_stats) DvaeStepStats {
	return DvaeStepStats{
		Step: uint64(s.step), Loss: float64(s.loss), ReconMSE: float64(s.recon_mse), KL: float64(s.kl),
		Perplexity: float64(s.perplexity), Tau: float64(s.tau), LR: float64(s.lr),
	}
}

func (c *DvaeConfig) toC() C.beit_dvae_config {
	o := C.beit_dvae_config_default()
	if c == nil {
		return o
	}
	setSize := func(dst *C.size_t, v int) {
		if v != 0 {
			*dst = C.size_t(v)
		}
	}
	setSize(&o.in_channels, c.InChannels)
	setSize(&o.image_size, c.ImageSize)
	setSize(&o.vocab_size, c.VocabSize)
	setSize(&o.n_hid, c.NHid)
	setSize(&o.group_count, c.GroupCount)
	setSize(&o.n_blk_per_group, c.BlocksPerGroup)
	setSize(&o.decoder_n_init, c.DecoderWidth)
	return o
}

func (t *DvaeTrainOptions) toC() C.beit_dvae_train_options {
	o := C.beit_dvae_train_options_default()
	if t == nil {
		return o
	}
	setFloat := func(dst *C.float, v float32) {
		if v != 0 {
			*dst = C.float(v)
		}
	}
	setFloat(&o.lr, t.LR)
	setFloat(&o.kl_weight, t.KLWeight)
	setFloat(&o.tau_start, t.TauStart)
	setFloat(&o.tau_end, t.TauEnd)
	if t.TotalSteps != 0 {
		o.total_steps = C.uint64_t(t.TotalSteps)
	}
	o.seed = C.uint64_t(t.Seed)
	return o
}

func (d *DvaeDataOptions) toC() (C.beit_dvae_data_options, error) {
	o := C.beit_dvae_data_options_default()
	if d == nil {
		return o, nil
	}
	if d.Batch < 0 || d.Workers < 0 {
		return o, argError(StatusInvalidArgument, "Batch %d and Workers %d must not be negative", d.Batch, d.Workers)
	}
	o.steps = C.uint64_t(d.Steps)
	if d.Batch != 0 {
		o.batch = C.size_t(d.Batch)
	}
	if d.CropScaleMin != 0 {
		o.crop_scale_min = C.double(d.CropScaleMin)
	}
	if d.Workers != 0 {
		o.workers = C.size_t(d.Workers)
	}
	o.seed = C.uint64_t(d.Seed)
	return o, nil
}

// DvaeTrainer trains a visual tokenizer (a dVAE with a decoder), on host batches (Step) or on
// a dataset file with the loop of `beit tokenizer train` (Train). On a cuda context the steps
// run on the GPU. A libbeit trainer takes one call at a time; this type serialises its methods
// with a mutex, so goroutines may share it. A Train progress function must not call methods of
// the trainer it reports on (they would wait for Train to end: a deadlock). It shares its
// context's thread pool, so the Context may be closed first.
type DvaeTrainer struct {
	mu  sync.Mutex
	ptr *C.beit_dvae_trainer
}

func newDvaeTrainer(ctx *Context, create func(*C.beit_context, **C.beit_dvae_trainer) C.beit_status) (*DvaeTrainer, error) {
	cctx, unlock, err := ctx.handle()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var ptr *C.beit_dvae_trainer
	if err := call(func() C.beit_status { return create(cctx, &ptr) }); err != nil {
		return nil, err
	}
	t := &DvaeTrainer{ptr: ptr}
	runtime.SetFinalizer(t, (*DvaeTrainer).Close)
	return t, nil
}

// NewDvaeTrainer creates a trainer for a new tokenizer of architecture config, initialised
// from opts.Seed. nil config or opts take the defaults.
func NewDvaeTrainer(ctx *Context, config *DvaeConfig, opts *DvaeTrainOptions) (*DvaeTrainer, error) {
	c, o := config.toC(), opts.toC()
	return newDvaeTrainer(ctx, func(cctx *C.beit_context, out **C.beit_dvae_trainer) C.beit_status {
		return C.beit_dvae_trainer_create(cctx, &c, &o, out)
	})
}

// LoadDvaeTrainer creates a trainer that goes on training the tokenizer directory dir (it
// needs a decoder), from step 0 with fresh optimizer state.
func LoadDvaeTrainer(ctx *Context, dir string, opts *DvaeTrainOptions) (*DvaeTrainer, error) {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	o := opts.toC()
	return newDvaeTrainer(ctx, func(cctx *C.beit_context, out **C.beit_dvae_trainer) C.beit_status {
		return C.beit_dvae_trainer_load(cctx, cdir, &o, out)
	})
}

// Close frees the trainer. Closing twice is a no-op.
func (t *DvaeTrainer) Close() error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr != nil {
		C.beit_dvae_trainer_free(t.ptr)
		t.ptr = nil
	}
	runtime.SetFinalizer(t, nil)
	return nil
}

func (t *DvaeTrainer) use(f func(*C.beit_dvae_trainer) error) error {
	if t == nil {
		return closedError("dVAE trainer")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return closedError("dVAE trainer")
	}
	return f(t.ptr)
}

// Info describes the tokenizer being trained (shapes for Step).
func (t *DvaeTrainer) Info() (TokenizerInfo, error) {
	var info TokenizerInfo
	err := t.use(func(p *C.beit_dvae_trainer) error {
		ci := C.beit_tokenizer_info_default()
		if err := call(func() C.beit_status { return C.beit_dvae_trainer_get_info(p, &ci) }); err != nil {
			return err
		}
		info = tokenizerInfoFromC(&ci)
		return nil
	})
	return info, err
}

// StepCount is the number of steps completed.
func (t *DvaeTrainer) StepCount() (uint64, error) {
	var n C.uint64_t
	err := t.use(func(p *C.beit_dvae_trainer) error {
		return call(func() C.beit_status { return C.beit_dvae_trainer_step_count(p, &n) })
	})
	return uint64(n), err
}

// MapPixels is DALL-E's pixel mapping 0.8*x + 0.1 of images with values in [0, 1]: what Step
// takes (Tokenizer.Tokenize maps by itself).
func MapPixels(images []float32) []float32 {
	out := make([]float32, len(images))
	for i, x := range images {
		out[i] = x*0.8 + 0.1
	}
	return out
}

// Step runs one optimizer step on batch images, mapped float32 [batch, C, S, S] in the
// tokenizer's pixel mapping (MapPixels of [0, 1] images). On error (ErrNumerical: diverged)
// the trainer is unchanged.
func (t *DvaeTrainer) Step(mapped []float32, batch int) (DvaeStepStats, error) {
	var stats DvaeStepStats
	if batch < 0 {
		return stats, argError(StatusInvalidArgument, "batch must not be negative, got %d", batch)
	}
	err := t.use(func(p *C.beit_dvae_trainer) error {
		s := C.beit_dvae_step_stats_default()
		err := call(func() C.beit_status {
			return C.beit_dvae_trainer_step(p, f32ptr(mapped), C.size_t(len(mapped)), C.size_t(batch), &s)
		})
		runtime.KeepAlive(mapped)
		if err == nil {
			stats = dvaeStatsFromC(&s)
		}
		return err
	})
	return stats, err
}

// Train trains on the images of the dataset file at datasetPath with the loop of
// `beit tokenizer train` (nil opts: the defaults). progress, when not nil, runs after each
// step with its stats; returning true stops the run there. A progress function that panics
// stops the run, and Train panics with its value once the run has ended.
func (t *DvaeTrainer) Train(datasetPath string, opts *DvaeDataOptions, progress func(DvaeStepStats) bool) (DvaeTrainSummary, error) {
	var summary DvaeTrainSummary
	o, err := opts.toC()
	if err != nil {
		return summary, err
	}
	cpath := C.CString(datasetPath)
	defer C.free(unsafe.Pointer(cpath))
	run := &progressRun[DvaeStepStats]{fn: progress}
	user, done := run.start()
	defer done()
	err = t.use(func(p *C.beit_dvae_trainer) error {
		s := C.beit_dvae_train_summary_default()
		err := call(func() C.beit_status { return C.go_beit_dvae_train(p, cpath, &o, user, &s) })
		if err == nil {
			summary = DvaeTrainSummary{Steps: uint64(s.steps), Stopped: bool(s.stopped), Seconds: float64(s.seconds)}
		}
		return err
	})
	run.repanic()
	return summary, err
}

// Save writes the tokenizer directory (config.json + model.safetensors) that LoadTokenizer
// reads; both files are written in full before either replaces its old version.
func (t *DvaeTrainer) Save(dir string) error {
	cdir := C.CString(dir)
	defer C.free(unsafe.Pointer(cdir))
	return t.use(func(p *C.beit_dvae_trainer) error {
		return call(func() C.beit_status { return C.beit_dvae_trainer_save(p, cdir) })
	})
}

// Tokenizer is a copy of the tokenizer as it stands now (later steps do not change it).
func (t *DvaeTrainer) Tokenizer() (*Tokenizer, error) {
	var tok *Tokenizer
	err := t.use(func(p *C.beit_dvae_trainer) error {
		var ptr *C.beit_tokenizer
		if err := call(func() C.beit_status { return C.beit_dvae_trainer_get_tokenizer(p, &ptr) }); err != nil {
			return err
		}
		var err error
		tok, err = wrapTokenizer(ptr)
		return err
	})
	return tok, err
}
