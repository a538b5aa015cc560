package beit

/*
#include <stdlib.h>
#include "beit.h"

extern int32_t goStepProgress(beit_step_stats *stats, void *user);

// The callback libbeit calls: hands the stats to the exported Go function (which cgo declares
// with a non-const pointer; it only reads them).
static int32_t go_step_progress(const beit_step_stats *stats, void *user) {
	return goStepProgress((beit_step_stats *)stats, user);
}

// Fine-tunes with go_step_progress as the callback when user is not NULL, else with none.
static beit_status go_beit_trainer_finetune(beit_trainer *t, const char *path, const beit_finetune_options *o,
                                            void *user) {
	return beit_trainer_finetune(t, path, o, user ? go_step_progress : NULL, user);
}
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// ClassifierOptions say how ToClassifier and NewClassifier make a classifier. The zero value
// (or nil) is what `beit finetune` does.
type ClassifierOptions struct {
	// DropPathRate is the new config's stochastic depth rate (of the last block), in [0, 1).
	// 0: `beit finetune`'s 0.1; Zero: none.
	DropPathRate float64
	// Seed draws the new head (and, for NewClassifier, every weight). 0 is a seed like any
	// other, and the default.
	Seed uint64
}

func (o *ClassifierOptions) dropPathAndSeed() (C.double, C.uint64_t) {
	def := C.beit_trainer_options_finetune_default(0).drop_path_rate
	if o == nil {
		return def, 0
	}
	return orDefault(o.DropPathRate, def), C.uint64_t(o.Seed)
}

// derive makes a new model on m's context from m (read only, under m's read lock).
func (m *Model) derive(create func(ctx *C.beit_context, src *C.beit_model, out **C.beit_model) C.beit_status) (*Model, error) {
	var derived *Model
	err := m.use(func(src *C.beit_model) error {
		var err error
		derived, err = newModel(m.ctx, func(c *C.beit_context, out **C.beit_model) C.beit_status {
			return create(c, src, out)
		})
		return err
	})
	return derived, err
}

// ToClassifier makes a new BeitForImageClassification with numLabels labels from this
// pretrained model (BeitForMaskedImageModeling, BeitModel or BeitForImageClassification), as
// BEiT, and `beit finetune --model`, start fine-tuning: the backbone is copied (a shared
// relative position bias becomes every block's own), the mask token and MIM head are dropped,
// and the head is fresh, drawn from opts.Seed (nil opts: the defaults). The new model lives on
// this model's context; this one is only read.
func (m *Model) ToClassifier(numLabels int, opts *ClassifierOptions) (*Model, error) {
	n, err := sizeT(numLabels, "numLabels")
	if err != nil {
		return nil, err
	}
	rate, seed := opts.dropPathAndSeed()
	return m.derive(func(c *C.beit_context, src *C.beit_model, out **C.beit_model) C.beit_status {
		return C.beit_model_to_classifier(c, src, n, rate, seed, out)
	})
}

// NewClassifier creates a fresh BeitForImageClassification with numLabels labels from the
// text of a Hugging Face config.json, randomly initialised from opts.Seed (the from-scratch
// baseline, as `beit finetune` without --model).
func NewClassifier(ctx *Context, configJSON string, numLabels int, opts *ClassifierOptions) (*Model, error) {
	n, err := sizeT(numLabels, "numLabels")
	if err != nil {
		return nil, err
	}
	rate, seed := opts.dropPathAndSeed()
	cfg := C.CString(configJSON)
	defer C.free(unsafe.Pointer(cfg))
	return newModel(ctx, func(c *C.beit_context, out **C.beit_model) C.beit_status {
		return C.beit_classifier_create(c, cfg, n, rate, seed, out)
	})
}

// WithImageSize is a copy of the model for height x width inputs (as `beit finetune
// --image-size`): the same weights, the position tables resized as Hugging Face does. It
// fails with ErrUnsupported for absolute position embeddings of a non-square grid.
func (m *Model) WithImageSize(height, width int) (*Model, error) {
	h, err := sizeT(height, "height")
	if err != nil {
		return nil, err
	}
	w, err := sizeT(width, "width")
	if err != nil {
		return nil, err
	}
	return m.derive(func(c *C.beit_context, src *C.beit_model, out **C.beit_model) C.beit_status {
		return C.beit_model_with_image_size(c, src, h, w, out)
	})
}

// FinetuneTrainerOptions are `beit finetune`'s trainer options for a run of totalSteps steps
// (beit_trainer_options_finetune_default), in TrainerOptions' convention: learning rate 1e-3
// after a linear warmup over a tenth of the run, cosine to 1e-6, AdamW betas (0.9, 0.999),
// weight decay 0.05, no clipping (ClipGradNorm reads Zero), drop path 0.1, layer decay 0.65.
// totalSteps 0 gives a constant rate without warmup.
func FinetuneTrainerOptions(totalSteps uint64) TrainerOptions {
	return trainerOptionsFromC(C.beit_trainer_options_finetune_default(C.uint64_t(totalSteps)))
}

// ClassifyBatch is a labelled batch for StepClassify: Pixels float32 NCHW [Batch, Channels,
// Height, Width] at the model's image size, normalised as the model expects, and Labels
// [Batch], each in [0, NumLabels).
type ClassifyBatch struct {
	Pixels                         []float32
	Batch, Channels, Height, Width int
	Labels                         []int64
}

// StepClassify runs one fine-tuning step of a classification trainer (one made from a
// BeitForImageClassification) on b: the mean cross-entropy with label smoothing
// labelSmoothing (in [0, 1); `beit finetune` uses 0.1), backward, AdamW. StepStats.Masked is
// 0. On error (ErrInvalidArgument for a pretraining trainer or a bad batch, ErrNumerical when
// it diverged) the trainer is unchanged.
func (t *Trainer) StepClassify(b ClassifyBatch, labelSmoothing float64) (StepStats, error) {
	var stats StepStats
	if b.Batch < 0 || b.Channels < 0 || b.Height < 0 || b.Width < 0 {
		return stats, argError(StatusInvalidArgument, "negative shape [%d, %d, %d, %d]", b.Batch, b.Channels, b.Height, b.Width)
	}
	err := t.use(func(p *C.beit_trainer) error {
		var pin runtime.Pinner
		defer pin.Unpin()
		c := C.beit_classify_batch_default()
		if len(b.Pixels) > 0 {
			pin.Pin(&b.Pixels[0])
			c.pixels = (*C.float)(unsafe.Pointer(&b.Pixels[0]))
		}
		if len(b.Labels) > 0 {
			pin.Pin(&b.Labels[0])
			c.labels = (*C.int64_t)(unsafe.Pointer(&b.Labels[0]))
		}
		c.pixels_len, c.labels_len = C.size_t(len(b.Pixels)), C.size_t(len(b.Labels))
		c.batch, c.channels, c.height, c.width = C.size_t(b.Batch), C.size_t(b.Channels), C.size_t(b.Height), C.size_t(b.Width)
		s := C.beit_step_stats_default()
		if err := call(func() C.beit_status {
			return C.beit_trainer_step_classify(p, &c, C.float(labelSmoothing), &s)
		}); err != nil {
			return err
		}
		stats = stepStatsFromC(&s)
		return nil
	})
	return stats, err
}

// FinetuneOptions say how Trainer.Finetune feeds a classification trainer from a labelled
// dataset file (beit_finetune_options; the optimizer's side is the trainer's TrainerOptions).
// The zero value (or nil) is `beit finetune`'s; where 0 is a setting, say Zero.
type FinetuneOptions struct {
	// Steps is where the trainer's step count ends. 0: the trainer's TotalSteps.
	Steps uint64
	// BatchSize is images per step. 0: 64. Each epoch is the data's full batches in a seeded
	// order (data smaller than one batch gives one short batch).
	BatchSize int
	// LabelSmoothing of the cross-entropy, in [0, 1). 0: 0.1; Zero: none.
	LabelSmoothing float64
	// MinCropScale is the random resized crop's smallest area fraction, in (0, 1]. 0: 0.08.
	MinCropScale float64
	// FlipProb is the horizontal flip probability, in [0, 1]. 0: 0.5; Zero: no flips (for data
	// where mirroring changes the class).
	FlipProb float64
	// Seed seeds the labelled subset, the epochs' orders and the augmentations. `beit finetune
	// --seed S` uses S here, for the trainer's seed and for the head's.
	Seed uint64
	// Workers is the loader's threads, 1 to 256. 0: 1. The batches are the same for any count.
	Workers int
	// LabelFraction is the fraction of the labelled samples to train on, in (0, 1]. 0: 1. Below
	// 1, a stratified subset (the same fraction of every class, at least one sample each).
	LabelFraction float64
	// ScratchDir is where the labelled subset's temporary file goes (only below LabelFraction
	// 1; written, mapped and removed at once). "": the system's temporary directory.
	ScratchDir string
}

// toC fills a beit_finetune_options; its scratch_dir, when set, is C memory to free with
// free().
func (o *FinetuneOptions) toC() (C.beit_finetune_options, error) {
	c := C.beit_finetune_options_default()
	if o == nil {
		return c, nil
	}
	if o.BatchSize < 0 || o.Workers < 0 {
		return c, argError(StatusInvalidArgument, "BatchSize %d and Workers %d must not be negative", o.BatchSize, o.Workers)
	}
	c.steps = C.uint64_t(o.Steps)
	if o.BatchSize != 0 {
		c.batch_size = C.size_t(o.BatchSize)
	}
	c.label_smoothing = C.float(orDefault(o.LabelSmoothing, C.double(c.label_smoothing)))
	c.min_crop_scale = orDefault(o.MinCropScale, c.min_crop_scale)
	c.flip_prob = orDefault(o.FlipProb, c.flip_prob)
	c.seed = C.uint64_t(o.Seed)
	if o.Workers != 0 {
		c.workers = C.size_t(o.Workers)
	}
	c.label_fraction = orDefault(o.LabelFraction, c.label_fraction)
	if o.ScratchDir != "" {
		c.scratch_dir = C.CString(o.ScratchDir)
	}
	return c, nil
}

// Finetune fine-tunes this classification trainer on the labelled dataset file at
// datasetPath as `beit finetune` does (the augmenting loader, epoch after epoch in seeded
// orders, one StepClassify per batch) from the trainer's data position until its step count
// reaches opts.Steps (or its TotalSteps); nil opts take the defaults. With
// FinetuneTrainerOptions(steps) as the trainer's options, a model from ToClassifier (or
// NewClassifier) and the same seeds, the weights are those of `beit finetune`, bit for bit
// (CPU, same thread count), and a trainer restored from a checkpoint goes on with the batch
// the saved run would have taken next.
//
// progress, when not nil, runs after every step with its stats, on this goroutine; returning
// true stops the run there (nil error; a later Finetune goes on from there). It must not call
// this trainer's methods (they would wait for Finetune to return: a deadlock); stop the run
// and call them after, instead. A progress function that panics stops the run, and Finetune
// panics with its value once the run has ended. After an error the trainer holds the steps
// completed before it.
func (t *Trainer) Finetune(datasetPath string, opts *FinetuneOptions, progress func(StepStats) bool) error {
	o, err := opts.toC()
	if err != nil {
		return err
	}
	defer C.free(unsafe.Pointer(o.scratch_dir))
	cpath := C.CString(datasetPath)
	defer C.free(unsafe.Pointer(cpath))
	run := &progressRun[StepStats]{fn: progress}
	user, done := run.start()
	defer done()
	err = t.use(func(p *C.beit_trainer) error {
		return call(func() C.beit_status { return C.go_beit_trainer_finetune(p, cpath, &o, user) })
	})
	run.repanic()
	return err
}

// FinetuneEpochSteps is the number of steps one epoch of Trainer.Finetune takes over the
// dataset file at datasetPath with opts' BatchSize, LabelFraction and Seed (the labelled
// subset drawn as the run draws it): its full batches, or 1 when the data holds less than one
// batch. Epochs times this is `beit finetune --epochs`' step count, for FinetuneTrainerOptions.
func FinetuneEpochSteps(datasetPath string, opts *FinetuneOptions) (uint64, error) {
	o, err := opts.toC()
	if err != nil {
		return 0, err
	}
	defer C.free(unsafe.Pointer(o.scratch_dir))
	cpath := C.CString(datasetPath)
	defer C.free(unsafe.Pointer(cpath))
	var n C.uint64_t
	err = call(func() C.beit_status {
		return C.beit_finetune_epoch_steps(cpath, o.batch_size, o.label_fraction, o.seed, &n)
	})
	return uint64(n), err
}

// EvalBatchSize is the batch size Evaluate uses for 0: `beit eval --batch`'s default.
const EvalBatchSize = 256

// Evaluation is what Model.Evaluate measured (beit_evaluation).
type Evaluation struct {
	Images    uint64  // images evaluated (the whole dataset)
	Correct   uint64  // images whose top-1 prediction is their label
	Top1      float64 // Correct / Images (0 for an empty dataset)
	NumLabels int
	// Confusion is [NumLabels, NumLabels]: Confusion.Data[truth*NumLabels+predicted] images.
	Confusion Tensor[uint64]
}

// PerClassAccuracy is, for each class, its correct images over its images (0 for a class
// without images), as `beit eval` reports it.
func (e Evaluation) PerClassAccuracy() []float64 {
	k := e.NumLabels
	acc := make([]float64, k)
	for truth := 0; truth < k; truth++ {
		var total uint64
		for _, n := range e.Confusion.Data[truth*k : (truth+1)*k] {
			total += n
		}
		if total > 0 {
			acc[truth] = float64(e.Confusion.Data[truth*k+truth]) / float64(total)
		}
	}
	return acc
}

// Evaluate measures this BeitForImageClassification on every sample of the labelled dataset
// file at datasetPath, as `beit eval` does: each whole image resized (antialiased bicubic) to
// the model's image size, normalised to mean = std = 0.5, batchSize images per pass (0:
// EvalBatchSize; the results do not depend on it), on the model's context. Many goroutines may
// evaluate one model at once.
func (m *Model) Evaluate(datasetPath string, batchSize int) (Evaluation, error) {
	var e Evaluation
	if batchSize < 0 {
		return e, argError(StatusInvalidArgument, "batchSize must not be negative, got %d", batchSize)
	}
	if batchSize == 0 {
		batchSize = EvalBatchSize
	}
	cpath := C.CString(datasetPath)
	defer C.free(unsafe.Pointer(cpath))
	err := m.use(func(p *C.beit_model) error {
		k := m.info.NumLabels
		confusion := newTensor[uint64]([]int{k, k})
		var pin runtime.Pinner
		defer pin.Unpin()
		out := C.beit_evaluation_default()
		if len(confusion.Data) > 0 {
			pin.Pin(&confusion.Data[0])
			out.confusion = (*C.uint64_t)(unsafe.Pointer(&confusion.Data[0]))
			out.confusion_len = C.size_t(len(confusion.Data))
		}
		if err := call(func() C.beit_status {
			return C.beit_model_evaluate(m.cctx, p, cpath, C.size_t(batchSize), &out)
		}); err != nil {
			return err
		}
		e = Evaluation{Images: uint64(out.images), Correct: uint64(out.correct), Top1: float64(out.top1),
			NumLabels: int(out.num_labels), Confusion: confusion}
		return nil
	})
	return e, err
}
