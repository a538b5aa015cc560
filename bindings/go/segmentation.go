package beit

/*
#include <stdlib.h>
#include "beit.h"

extern int32_t goSegmentationProgress(beit_segmentation_step *step, void *user);

// The callback libbeit calls: hands the step to the exported Go function (which cgo declares
// with a non-const pointer; it only reads it).
static int32_t go_segmentation_progress(const beit_segmentation_step *step, void *user) {
	return goSegmentationProgress((beit_segmentation_step *)step, user);
}

// Fine-tunes with go_segmentation_progress as the callback when user is not NULL, else with
// none.
static beit_status go_beit_segmentation_finetune(const beit_context *ctx, const beit_model *model,
                                                 const char *path, const beit_segmentation_options *o,
                                                 void *user, beit_segmentation_report *report,
                                                 beit_model **out) {
	return beit_segmentation_finetune(ctx, model, path, o, user ? go_segmentation_progress : NULL, user,
	                                  report, out);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// ToSegmenter makes a new BeitForSemanticSegmentation with numLabels classes whose backbone
// is this model's (any architecture: every backbone tensor of the same name and shape is
// copied) under a fresh UperNet head drawn from seed, as `beit segment finetune --model` does
// with a model that is not yet a segmentation model. The config gains out_indices and
// auxiliary_channels when it has none. The new model lives on this model's context.
func (m *Model) ToSegmenter(numLabels int, seed uint64) (*Model, error) {
	n, err := sizeT(numLabels, "numLabels")
	if err != nil {
		return nil, err
	}
	return m.derive(func(c *C.beit_context, src *C.beit_model, out **C.beit_model) C.beit_status {
		return C.beit_model_to_segmenter(c, src, n, C.uint64_t(seed), out)
	})
}

// NewSegmenter creates a fresh BeitForSemanticSegmentation with numLabels classes from the
// text of a Hugging Face config.json (completed as ToSegmenter completes it), randomly
// initialised from seed, as `beit segment finetune --config`.
func NewSegmenter(ctx *Context, configJSON string, numLabels int, seed uint64) (*Model, error) {
	n, err := sizeT(numLabels, "numLabels")
	if err != nil {
		return nil, err
	}
	cfg := C.CString(configJSON)
	defer C.free(unsafe.Pointer(cfg))
	return newModel(ctx, func(c *C.beit_context, out **C.beit_model) C.beit_status {
		return C.beit_segmenter_create(c, cfg, n, C.uint64_t(seed), out)
	})
}

// SegmentationOptions say how Model.SegmentationFinetune trains (beit_segmentation_options,
// the options of `beit segment finetune`). The zero value (or nil) is the library's default,
// BEiT's segmentation recipe scaled to small runs; where 0 is a setting, say Zero.
type SegmentationOptions struct {
	// Epochs over the training samples, each the full batches of a seeded shuffle. 0: 10.
	Epochs int
	// BatchSize is images per step, at least 2 (BatchNorm) and at most the training samples.
	// 0: 16.
	BatchSize int
	// LearningRate is the peak learning rate, after warmup. 0: 1e-3.
	LearningRate float64
	// MinLearningRate is where the cosine schedule ends. 0: 1e-6; Zero: 0.
	MinLearningRate float64
	// WarmupSteps of linear warmup (at most the run). 0: 50; Zero: none.
	WarmupSteps int
	// WeightDecay is AdamW's (BEiT's rule; BatchNorm statistics excluded). 0: 0.05; Zero: none.
	WeightDecay float64
	// LayerDecay is the layer-wise learning rate decay, in (0, 1]. 0: 0.9; 1: none.
	LayerDecay float64
	// DropPathRate is the stochastic depth rate of the last block, in [0, 1). 0: the model
	// config's drop_path_rate; Zero: none.
	DropPathRate float64
	// ClipGradNorm clips the global gradient norm to this. 0: 3; Zero: no clipping.
	ClipGradNorm float64
	// Seed seeds the shuffles, flips, drop path and the labelled subset.
	Seed uint64
	// Mean and Std normalise [0, 1] pixels: one value for every channel, or one per channel.
	// nil: 0.5.
	Mean, Std []float32
	// NoFlip turns off the random horizontal flips (on by default).
	NoFlip bool
	// TestFraction is the share of the samples held out for evaluation, in [0, 1): the run
	// trains on the rest. 0: 0.2; Zero: none held out.
	TestFraction float64
	// SplitSeed seeds the train/test shuffle.
	SplitSeed uint64
	// LabelFraction is the fraction of the train split whose masks are used, in (0, 1]: a
	// seeded subset (by Seed), stratified by the samples' image labels when the dataset has
	// them. 0: 1.
	LabelFraction float64
}

// steps is a step or epoch count option: 0 the default, Zero none.
func steps(v int, def C.uint64_t, name string) (C.uint64_t, error) {
	switch {
	case v == 0:
		return def, nil
	case v == Zero:
		return 0, nil
	case v < 0:
		return 0, argError(StatusInvalidArgument, "%s must not be negative (Zero asks for 0), got %d", name, v)
	}
	return C.uint64_t(v), nil
}

// pinnedFloats points C at v's values (pinned by pin until the call is over); nil for none.
func pinnedFloats(pin *runtime.Pinner, v []float32) (*C.float, C.size_t) {
	if len(v) == 0 {
		return nil, 0
	}
	pin.Pin(&v[0])
	return (*C.float)(unsafe.Pointer(&v[0])), C.size_t(len(v))
}

// toC fills a beit_segmentation_options whose mean and std are pinned by pin.
func (o *SegmentationOptions) toC(pin *runtime.Pinner) (C.beit_segmentation_options, error) {
	c := C.beit_segmentation_options_default()
	if o == nil {
		return c, nil
	}
	var err error
	if o.Epochs < 0 {
		return c, argError(StatusInvalidArgument, "Epochs must not be negative, got %d", o.Epochs)
	}
	if c.epochs, err = steps(o.Epochs, c.epochs, "Epochs"); err != nil {
		return c, err
	}
	if c.warmup_steps, err = steps(o.WarmupSteps, c.warmup_steps, "WarmupSteps"); err != nil {
		return c, err
	}
	if o.BatchSize < 0 {
		return c, argError(StatusInvalidArgument, "BatchSize must not be negative, got %d", o.BatchSize)
	}
	if o.BatchSize != 0 {
		c.batch_size = C.size_t(o.BatchSize)
	}
	c.learning_rate = orDefault(o.LearningRate, c.learning_rate)
	c.min_learning_rate = orDefault(o.MinLearningRate, c.min_learning_rate)
	c.weight_decay = C.float(orDefault(o.WeightDecay, C.double(c.weight_decay)))
	c.layer_decay = orDefault(o.LayerDecay, c.layer_decay)
	c.drop_path_rate = orDefault(o.DropPathRate, c.drop_path_rate)
	c.clip_grad_norm = orDefault(o.ClipGradNorm, c.clip_grad_norm)
	c.seed = C.uint64_t(o.Seed)
	c.mean, c.mean_len = pinnedFloats(pin, o.Mean)
	c.std, c.std_len = pinnedFloats(pin, o.Std)
	c.flip = C.bool(!o.NoFlip)
	c.test_fraction = orDefault(o.TestFraction, c.test_fraction)
	c.split_seed = C.uint64_t(o.SplitSeed)
	c.label_fraction = orDefault(o.LabelFraction, c.label_fraction)
	return c, nil
}

// SegmentationStep is what one segmentation fine-tuning step did (beit_segmentation_step).
type SegmentationStep struct {
	Step       uint64  // steps completed, this one included
	TotalSteps uint64  // steps the whole run takes
	Epoch      uint64  // the epoch of this step, from 0
	Loss       float64 // pixel cross-entropy (plus the auxiliary head's, weighted), before the update
	LR         float64 // the learning rate this step applied (before layer decay)
	GradNorm   float64 // global gradient norm before clipping
}

func segmentationStepFromC(s *C.beit_segmentation_step) SegmentationStep {
	return SegmentationStep{Step: uint64(s.step), TotalSteps: uint64(s.total_steps), Epoch: uint64(s.epoch),
		Loss: float64(s.loss), LR: float64(s.lr), GradNorm: float64(s.grad_norm)}
}

// SegmentationReport is what a SegmentationFinetune run did (beit_segmentation_report).
type SegmentationReport struct {
	Steps          uint64  // steps taken (fewer than planned when progress stopped the run)
	TrainSamples   uint64  // samples trained on (the train split, or its labelled fraction)
	TestSamples    uint64  // samples held out (the test split)
	FinalEpochLoss float64 // mean loss of the last epoch (of its steps taken)
	Seconds        float64 // wall-clock time of the training
}

// SegmentationFinetune fine-tunes a copy of this BeitForSemanticSegmentation on the dataset
// file with masks at datasetPath, as `beit segment finetune` does, and returns the trained
// copy (on this model's context; this model is only read) and what the run did; nil opts take
// the defaults. The samples are split into train and test (TestFraction, SplitSeed) and the
// run trains on the train split. With the same model, data and options the weights are those
// of `beit segment finetune`, bit for bit (CPU, same thread count). On a cuda context the
// steps run on the GPU (fp32).
//
// progress, when not nil, runs after every step, on this goroutine; returning true stops the
// run there, and the model of the steps done is returned. A progress function that panics
// stops the run, and SegmentationFinetune panics with its value once the run has ended.
func (m *Model) SegmentationFinetune(datasetPath string, opts *SegmentationOptions, progress func(SegmentationStep) bool) (*Model, SegmentationReport, error) {
	var report SegmentationReport
	var pin runtime.Pinner
	defer pin.Unpin()
	o, err := opts.toC(&pin)
	if err != nil {
		return nil, report, err
	}
	cpath := C.CString(datasetPath)
	defer C.free(unsafe.Pointer(cpath))
	run := &progressRun[SegmentationStep]{fn: progress}
	user, done := run.start()
	defer done()
	r := C.beit_segmentation_report_default()
	trained, err := m.derive(func(c *C.beit_context, src *C.beit_model, out **C.beit_model) C.beit_status {
		return C.go_beit_segmentation_finetune(c, src, cpath, &o, user, &r, out)
	})
	if run.panicked != nil {
		trained.Close()
		run.repanic()
	}
	if err != nil {
		return nil, report, err
	}
	report = SegmentationReport{Steps: uint64(r.steps), TrainSamples: uint64(r.train_samples),
		TestSamples: uint64(r.test_samples), FinalEpochLoss: float64(r.final_epoch_loss), Seconds: float64(r.seconds)}
	return trained, report, nil
}

// Split is which samples of a dataset EvaluateSegmentation scores. Its zero value,
// SplitTest, is the default (these are not beit_split's C values).
type Split uint32

// The splits.
const (
	// SplitTest is the held-out samples of the train/test split (TestFraction, SplitSeed):
	// those SegmentationFinetune with the same split did not train on.
	SplitTest Split = iota
	// SplitAll is every sample.
	SplitAll
)

// String is "test" or "all", as `beit segment eval --split-name` takes it; an unknown value
// prints as "Split(N)".
func (s Split) String() string {
	switch s {
	case SplitTest:
		return "test"
	case SplitAll:
		return "all"
	}
	return fmt.Sprintf("Split(%d)", uint32(s))
}

// SegmentationEvalOptions say how EvaluateSegmentation evaluates (beit_segmentation_eval_options);
// the zero value (or nil) is `beit segment eval`'s default: the test split of the default split.
type SegmentationEvalOptions struct {
	// BatchSize is images per forward pass. 0: 32.
	BatchSize int
	// Mean and Std normalise [0, 1] pixels, as in SegmentationOptions. nil: 0.5.
	Mean, Std []float32
	// Split says which samples: SplitTest (the zero value) or SplitAll.
	Split Split
	// TestFraction is the split's held-out share, in [0, 1), for SplitTest. 0: 0.2; Zero: 0.
	TestFraction float64
	// SplitSeed is the split's seed, for SplitTest.
	SplitSeed uint64
}

func (o *SegmentationEvalOptions) toC(pin *runtime.Pinner) (C.beit_segmentation_eval_options, error) {
	c := C.beit_segmentation_eval_options_default()
	if o == nil {
		return c, nil
	}
	if o.BatchSize < 0 {
		return c, argError(StatusInvalidArgument, "BatchSize must not be negative, got %d", o.BatchSize)
	}
	if o.BatchSize != 0 {
		c.batch_size = C.size_t(o.BatchSize)
	}
	c.mean, c.mean_len = pinnedFloats(pin, o.Mean)
	c.std, c.std_len = pinnedFloats(pin, o.Std)
	switch o.Split {
	case SplitTest:
		c.split = C.BEIT_SPLIT_TEST
	case SplitAll:
		c.split = C.BEIT_SPLIT_ALL
	default:
		return c, argError(StatusInvalidArgument, "Split %d is not SplitTest or SplitAll", uint32(o.Split))
	}
	c.test_fraction = orDefault(o.TestFraction, c.test_fraction)
	c.split_seed = C.uint64_t(o.SplitSeed)
	return c, nil
}

// SegmentationEvaluation is what EvaluateSegmentation measured (beit_segmentation_evaluation).
type SegmentationEvaluation struct {
	MeanIoU       float64 // mean IoU over the classes present (in the masks or the predictions)
	PixelAccuracy float64 // correctly labelled pixels / scored pixels (the ignore index is not scored)
	Samples       uint64  // samples evaluated
	NumLabels     int
	PerClassIoU   []float64 // [NumLabels]: each class's IoU, NaN for a class in neither masks nor predictions
}

// EvaluateSegmentation measures this BeitForSemanticSegmentation on the dataset file with
// masks at datasetPath, as `beit segment eval` does: each image normalised, the logits
// upsampled bilinearly to the mask size, the per-pixel argmax scored against the masks over
// the chosen samples, on the model's context (CPU, or the GPU in fp32); nil opts take the
// defaults. Many goroutines may evaluate one model at once.
func (m *Model) EvaluateSegmentation(datasetPath string, opts *SegmentationEvalOptions) (SegmentationEvaluation, error) {
	var e SegmentationEvaluation
	var pin runtime.Pinner
	defer pin.Unpin()
	o, err := opts.toC(&pin)
	if err != nil {
		return e, err
	}
	cpath := C.CString(datasetPath)
	defer C.free(unsafe.Pointer(cpath))
	err = m.use(func(p *C.beit_model) error {
		perClass := make([]float64, m.info.NumLabels)
		out := C.beit_segmentation_evaluation_default()
		if len(perClass) > 0 {
			pin.Pin(&perClass[0])
			out.per_class_iou = (*C.double)(unsafe.Pointer(&perClass[0]))
			out.per_class_iou_len = C.size_t(len(perClass))
		}
		if err := call(func() C.beit_status {
			return C.beit_model_evaluate_segmentation(m.cctx, p, cpath, &o, &out)
		}); err != nil {
			return err
		}
		e = SegmentationEvaluation{MeanIoU: float64(out.mean_iou), PixelAccuracy: float64(out.pixel_accuracy),
			Samples: uint64(out.samples), NumLabels: int(out.num_labels), PerClassIoU: perClass}
		return nil
	})
	return e, err
}
