package beit

/*
#include <stdlib.h>
#include "beit.h"

static beit_status go_beit_step(beit_trainer *t, const float *pixels, size_t pixels_len,
                                size_t batch, size_t channels, size_t height, size_t width,
                                const uint8_t *mask, size_t mask_len, const int64_t *labels,
                                size_t labels_len, beit_step_stats *out) {
	beit_mim_batch b = beit_mim_batch_default();
	b.pixels = pixels;
	b.pixels_len = pixels_len;
	b.batch = batch;
	b.channels = channels;
	b.height = height;
	b.width = width;
	b.bool_masked_pos = mask;
	b.bool_masked_pos_len = mask_len;
	b.labels = labels;
	b.labels_len = labels_len;
	return beit_trainer_step(t, &b, out);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
)

// WeightDecayOn says which parameters weight decay applies to.
type WeightDecayOn uint32

// Weight decay rules (beit_weight_decay_on).
const (
	WeightDecayBEiT WeightDecayOn = C.BEIT_WEIGHT_DECAY_BEIT // no decay for biases, norms, CLS, abs pos
	WeightDecayAll  WeightDecayOn = C.BEIT_WEIGHT_DECAY_ALL
)

// String is the rule's name as the CLI's --weight-decay-on takes it: "beit" or "all"; an
// unknown value prints as "WeightDecayOn(N)".
func (w WeightDecayOn) String() string {
	switch w {
	case WeightDecayBEiT:
		return "beit"
	case WeightDecayAll:
		return "all"
	}
	return fmt.Sprintf("WeightDecayOn(%d)", uint32(w))
}

// Zero, given to a float field of TrainerOptions, asks for the value 0, since the field's zero
// value means the library default: WeightDecay: Zero trains without weight decay, ClipGradNorm:
// Zero without clipping, DropPathRate: Zero without stochastic depth, MinLearningRate: Zero
// decays to 0. (Where 0 is out of range, as for Eps, the library refuses it like any value out
// of range: ErrInvalidArgument naming the field.) Any other value is passed on as it is.
const Zero = -1.0

// TrainerOptions configures a trainer (beit_trainer_options). The zero value is the library's
// default recipe (BEiT's pretraining: see DefaultTrainerOptions), and every field left at zero
// keeps its default, so TrainerOptions{LearningRate: 1e-3} changes the learning rate alone.
// Where 0 is itself a meaningful setting, say it with Zero.
type TrainerOptions struct {
	// LearningRate is the peak learning rate, reached after warmup. 0: the default (1.5e-3).
	LearningRate float64
	// MinLearningRate is where the cosine schedule ends. 0: the default (1e-5); Zero: decay to 0.
	MinLearningRate float64
	// WarmupSteps of linear warmup from 0 to LearningRate. 0: none (the default).
	WarmupSteps uint64
	// TotalSteps is the cosine schedule's length. 0 (the default): LearningRate stays constant
	// after warmup; otherwise it must exceed WarmupSteps.
	TotalSteps uint64
	// WeightDecay is AdamW's decoupled weight decay. 0: the default (0.05); Zero: none.
	WeightDecay float64
	// Beta1 is AdamW's first-moment decay, in [0, 1). 0: the default (0.9); Zero: 0.
	Beta1 float64
	// Beta2 is AdamW's second-moment decay, in [0, 1). 0: the default (0.98); Zero: 0.
	Beta2 float64
	// Eps is AdamW's epsilon (> 0). 0: the default (1e-8).
	Eps float64
	// ClipGradNorm clips the global gradient norm to this. 0: the default (3.0); Zero: no
	// clipping.
	ClipGradNorm float64
	// DropPathRate is the stochastic depth rate of the last block, in [0, 1). 0: the model
	// config's drop_path_rate (the default; so does any other negative value); Zero: no
	// stochastic depth.
	DropPathRate float64
	// LayerDecay is the layer-wise learning rate decay factor, in (0, 1]. 0: the default (1,
	// none).
	LayerDecay float64
	// WeightDecayOn says which parameters decay. The zero value, WeightDecayBEiT, is the default.
	WeightDecayOn WeightDecayOn
	// Seed seeds the trainer's random state (stochastic depth). 0 is the default, and a seed
	// like any other.
	Seed uint64
	// Precision of the steps. The zero value, PrecisionDefault, is bf16 on a cuda context and
	// fp32 on the CPU; PrecisionBF16 on a CPU context is refused with ErrUnsupported.
	Precision Precision
}

// DefaultTrainerOptions spells out the library's defaults (beit_trainer_options_default, BEiT's
// pretraining recipe) in this type's convention: passing it is the same as passing nil or
// TrainerOptions{}. A float default of 0 reads Zero, and DropPathRate reads 0 (the config's).
func DefaultTrainerOptions() TrainerOptions {
	return trainerOptionsFromC(C.beit_trainer_options_default())
}

// trainerOptionsFromC is a C options struct in this type's convention.
func trainerOptionsFromC(o C.beit_trainer_options) TrainerOptions {
	dropPath := fromC(o.drop_path_rate)
	if o.drop_path_rate < 0 {
		dropPath = 0 // C's "negative: the config's rate"
	}
	return TrainerOptions{
		LearningRate:    fromC(o.learning_rate),
		MinLearningRate: fromC(o.min_learning_rate),
		WarmupSteps:     uint64(o.warmup_steps),
		TotalSteps:      uint64(o.total_steps),
		WeightDecay:     fromC(o.weight_decay),
		Beta1:           fromC(o.beta1),
		Beta2:           fromC(o.beta2),
		Eps:             fromC(o.eps),
		ClipGradNorm:    fromC(o.clip_grad_norm),
		DropPathRate:    dropPath,
		LayerDecay:      fromC(o.layer_decay),
		WeightDecayOn:   WeightDecayOn(o.weight_decay_on),
		Seed:            uint64(o.seed),
		Precision:       Precision(o.precision),
	}
}

// fromC is a C float option in Go's convention: 0 is spelled Zero.
func fromC(v C.double) float64 {
	if v == 0 {
		return Zero
	}
	return float64(v)
}

// orDefault is v, or def when v is 0, or 0 when v is Zero.
func orDefault(v float64, def C.double) C.double {
	switch v {
	case 0:
		return def
	case Zero:
		return 0
	}
	return C.double(v)
}

func (t *TrainerOptions) toC() *C.beit_trainer_options {
	if t == nil {
		return nil
	}
	o := C.beit_trainer_options_default()
	o.learning_rate = orDefault(t.LearningRate, o.learning_rate)
	o.min_learning_rate = orDefault(t.MinLearningRate, o.min_learning_rate)
	o.warmup_steps = C.uint64_t(t.WarmupSteps)
	o.total_steps = C.uint64_t(t.TotalSteps)
	o.weight_decay = orDefault(t.WeightDecay, o.weight_decay)
	o.beta1 = orDefault(t.Beta1, o.beta1)
	o.beta2 = orDefault(t.Beta2, o.beta2)
	o.eps = orDefault(t.Eps, o.eps)
	o.clip_grad_norm = orDefault(t.ClipGradNorm, o.clip_grad_norm)
	o.drop_path_rate = orDefault(t.DropPathRate, o.drop_path_rate)
	o.layer_decay = orDefault(t.LayerDecay, o.layer_decay)
	if t.WeightDecayOn != 0 {
		o.weight_decay_on = C.beit_weight_decay_on(t.WeightDecayOn)
	}
	if t.Seed != 0 {
		o.seed = C.uint64_t(t.Seed)
	}
	if t.Precision != 0 {
		o.precision = C.beit_precision(t.Precision)
	}
	return &o
}

// MIMBatch is a masked-image-modeling batch: Pixels float32 NCHW [Batch, Channels, Height,
// Width] (the configured image size), Mask [Batch, patches] of 0/1 with at least one 1, and
// Labels [Batch, patches] (visual tokens; only the masked patches' count).
type MIMBatch struct {
	Pixels                         []float32
	Batch, Channels, Height, Width int
	Mask                           []uint8
	Labels                         []int64
}

// StepStats is what one step did (beit_step_stats).
type StepStats struct {
	Step       uint64  // steps completed, this one included
	Loss       float64 // mean cross-entropy over masked patches, before the update
	LR         float64
	GradNorm   float64 // before clipping
	Masked     int
	Seconds    float64
	ImagesPerS float64
}

func stepStatsFromC(s *C.beit_step_stats) StepStats {
	return StepStats{
		Step: uint64(s.step), Loss: float64(s.loss), LR: float64(s.lr), GradNorm: float64(s.grad_norm),
		Masked: int(s.masked), Seconds: float64(s.seconds), ImagesPerS: float64(s.images_per_s),
	}
}

// Trainer pretrains a BeitForMaskedImageModeling. A libbeit trainer takes one call at a time
// (it refuses a concurrent call with ErrBusy); this type serialises its methods with a mutex,
// so goroutines may share it and wait their turn. It shares its context's thread pool, so the
// Context may be closed first.
type Trainer struct {
	mu  sync.Mutex
	ptr *C.beit_trainer
	ctx *Context // the context it was made on: Model() makes models on it
}

func newTrainer(ctx *Context, create func(*C.beit_context, **C.beit_trainer) C.beit_status) (*Trainer, error) {
	cctx, unlock, err := ctx.handle()
	if err != nil {
		return nil, err
	}
	defer unlock()
	var ptr *C.beit_trainer
	if err := call(func() C.beit_status { return create(cctx, &ptr) }); err != nil {
		return nil, err
	}
	t := &Trainer{ptr: ptr, ctx: ctx}
	runtime.SetFinalizer(t, (*Trainer).Close)
	return t, nil
}

// NewTrainer creates a trainer on a copy of model (a masked image modeling model); opts nil
// means DefaultTrainerOptions().
func NewTrainer(ctx *Context, model *Model, opts *TrainerOptions) (*Trainer, error) {
	var t *Trainer
	err := model.use(func(m *C.beit_model) error {
		var err error
		t, err = newTrainer(ctx, func(c *C.beit_context, out **C.beit_trainer) C.beit_status {
			return C.beit_trainer_create(c, m, opts.toC(), out)
		})
		return err
	})
	return t, err
}

// NewTrainerFromConfig creates a trainer on a fresh model (weights from initSeed) described
// by the text of a Hugging Face config.json.
func NewTrainerFromConfig(ctx *Context, configJSON string, initSeed uint64, opts *TrainerOptions) (*Trainer, error) {
	cfg := C.CString(configJSON)
	defer C.free(unsafe.Pointer(cfg))
	return newTrainer(ctx, func(c *C.beit_context, out **C.beit_trainer) C.beit_status {
		return C.beit_trainer_create_from_config(c, cfg, C.uint64_t(initSeed), opts.toC(), out)
	})
}

// LoadTrainer creates a trainer on the model in a Hugging Face directory, at step 0 with
// fresh optimizer state (LoadCheckpoint resumes a run).
func LoadTrainer(ctx *Context, modelDir string, opts *TrainerOptions) (*Trainer, error) {
	cdir := C.CString(modelDir)
	defer C.free(unsafe.Pointer(cdir))
	return newTrainer(ctx, func(c *C.beit_context, out **C.beit_trainer) C.beit_status {
		return C.beit_trainer_load_model_dir(c, cdir, opts.toC(), out)
	})
}

// Close frees the trainer. Closing twice is a no-op.
func (t *Trainer) Close() error {
	if t == nil {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr != nil {
		C.beit_trainer_free(t.ptr)
		t.ptr = nil
	}
	runtime.SetFinalizer(t, nil)
	return nil
}

func (t *Trainer) use(f func(*C.beit_trainer) error) error {
	if t == nil {
		return closedError("trainer")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ptr == nil {
		return closedError("trainer")
	}
	return f(t.ptr)
}

// Step runs one optimizer step on b. On error (ErrNumerical: diverged) the trainer is
// unchanged.
func (t *Trainer) Step(b MIMBatch) (StepStats, error) {
	var stats StepStats
	if b.Batch < 0 || b.Channels < 0 || b.Height < 0 || b.Width < 0 {
		return stats, argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", b.Batch, b.Channels, b.Height, b.Width)
	}
	err := t.use(func(p *C.beit_trainer) error {
		s := C.beit_step_stats_default()
		err := call(func() C.beit_status {
			return C.go_beit_step(p, f32ptr(b.Pixels), C.size_t(len(b.Pixels)), C.size_t(b.Batch),
				C.size_t(b.Channels), C.size_t(b.Height), C.size_t(b.Width),
				u8ptr(b.Mask), C.size_t(len(b.Mask)), i64ptr(b.Labels), C.size_t(len(b.Labels)), &s)
		})
		runtime.KeepAlive(b.Pixels)
		runtime.KeepAlive(b.Mask)
		runtime.KeepAlive(b.Labels)
		if err != nil {
			return err
		}
		stats = stepStatsFromC(&s)
		return nil
	})
	return stats, err
}

func (t *Trainer) withPath(path string, f func(*C.beit_trainer, *C.char) C.beit_status) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	return t.use(func(p *C.beit_trainer) error {
		return call(func() C.beit_status { return f(p, cpath) })
	})
}

// SaveCheckpoint writes everything the trainer holds to the file path (atomically).
func (t *Trainer) SaveCheckpoint(path string) error {
	return t.withPath(path, func(p *C.beit_trainer, c *C.char) C.beit_status {
		return C.beit_trainer_save_checkpoint(p, c)
	})
}

// LoadCheckpoint restores a checkpoint of the same model config; on error the trainer is
// unchanged.
func (t *Trainer) LoadCheckpoint(path string) error {
	return t.withPath(path, func(p *C.beit_trainer, c *C.char) C.beit_status {
		return C.beit_trainer_load_checkpoint(p, c)
	})
}

// SaveModel writes the current weights as a Hugging Face directory (LoadModel reads it).
func (t *Trainer) SaveModel(dir string) error {
	return t.withPath(dir, func(p *C.beit_trainer, c *C.char) C.beit_status {
		return C.beit_trainer_save_model(p, c)
	})
}

// StepCount is the number of steps completed.
func (t *Trainer) StepCount() (uint64, error) {
	var n C.uint64_t
	err := t.use(func(p *C.beit_trainer) error {
		return call(func() C.beit_status { return C.beit_trainer_step_count(p, &n) })
	})
	return uint64(n), err
}

// DataPosition is where the host's data stream stands (one more per step; checkpointed).
func (t *Trainer) DataPosition() (uint64, error) {
	var n C.uint64_t
	err := t.use(func(p *C.beit_trainer) error {
		return call(func() C.beit_status { return C.beit_trainer_get_data_position(p, &n) })
	})
	return uint64(n), err
}

// SetDataPosition sets the data position.
func (t *Trainer) SetDataPosition(pos uint64) error {
	return t.use(func(p *C.beit_trainer) error {
		return call(func() C.beit_status { return C.beit_trainer_set_data_position(p, C.uint64_t(pos)) })
	})
}

// ModelInfo describes the trainer's model (to size batches).
func (t *Trainer) ModelInfo() (ModelInfo, error) {
	var info ModelInfo
	err := t.use(func(p *C.beit_trainer) error {
		ci := C.beit_model_info_default()
		if err := call(func() C.beit_status { return C.beit_trainer_get_model_info(p, &ci) }); err != nil {
			return err
		}
		info = modelInfoFromC(&ci)
		return nil
	})
	return info, err
}
