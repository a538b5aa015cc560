package beit_test

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// segConfig is a small BeitForSemanticSegmentation: 16x16 grey images, patch 4, 2 blocks.
const segConfig = `{"image_size": 16, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2,
"num_attention_heads": 2, "intermediate_size": 64, "num_channels": 1, "use_relative_position_bias": true,
"pool_scales": [1, 2], "auxiliary_channels": 16, "drop_path_rate": 0.1}`

// writeSquares writes n grey 16x16 images with a bright 8x8 square at a place of its own, and
// masks that are 1 on the square, 0 elsewhere.
func writeSquares(t *testing.T, path string, n int) {
	t.Helper()
	const size = 16
	w := must(beit.NewDatasetWriter(path, beit.DatasetSpec{Height: size, Width: size, Channels: 1, Masks: true}))(t)
	defer w.Close()
	px := make([]uint8, n*size*size)
	masks := make([]uint8, n*size*size)
	for i := 0; i < n; i++ {
		y0, x0 := i%7, (3*i)%7
		for y := 0; y < size; y++ {
			for x := 0; x < size; x++ {
				k := i*size*size + y*size + x
				px[k] = 30
				if y >= y0 && y < y0+8 && x >= x0 && x < x0+8 {
					px[k], masks[k] = 200, 1
				}
			}
		}
	}
	if err := w.Append(beit.Samples{Count: n, Pixels: px, Masks: masks}); err != nil {
		t.Fatal(err)
	}
	must(w.Finish())(t)
}

// segReport is what `beit segment finetune` prints and `beit segment eval` prints as "test".
type segReport struct {
	Steps  uint64    `json:"steps"`
	Losses []float64 `json:"losses"`
	Test   segScores `json:"test"`
}

type segScores struct {
	MeanIoU       float64    `json:"mean_iou"`
	PixelAccuracy float64    `json:"pixel_accuracy"`
	PerClassIoU   []*float64 `json:"per_class_iou"` // null: a class in neither masks nor predictions
}

func sameScores(t *testing.T, what string, got beit.SegmentationEvaluation, want segScores) {
	t.Helper()
	if got.MeanIoU != want.MeanIoU || got.PixelAccuracy != want.PixelAccuracy || len(got.PerClassIoU) != len(want.PerClassIoU) {
		t.Fatalf("%s: %+v, the CLI's %+v", what, got, want)
	}
	for i, w := range want.PerClassIoU {
		if g := got.PerClassIoU[i]; (w == nil) != math.IsNaN(g) || (w != nil && *w != g) {
			t.Fatalf("%s: class %d IoU %v, the CLI's %v", what, i, g, w)
		}
	}
}

// Model.SegmentationFinetune writes the files `beit segment finetune` writes with the same
// start, data and options, byte for byte, its progress function sees the CLI's losses, and
// EvaluateSegmentation reports what `beit segment finetune` and `beit segment eval` report,
// on the test split and on every sample.
func TestSegmentationEqualsTheCLI(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "squares.beitds")
	writeSquares(t, data, 16)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(segConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	var report segReport
	out := runCLI(t, "segment", "finetune", "--config", filepath.Join(dir, "config.json"), "--data", data,
		"--out", filepath.Join(dir, "cli"), "--epochs", "2", "--batch-size", "4", "--threads", "2", "--seed", "5",
		"--warmup-steps", "2", "--test-fraction", "0.25")
	if err := json.Unmarshal(out, &report); err != nil {
		t.Fatalf("%s: %v", out, err)
	}
	var all segScores
	out = runCLI(t, "segment", "eval", "--model", filepath.Join(dir, "cli"), "--data", data, "--split-name", "all",
		"--threads", "2")
	if err := json.Unmarshal(out, &all); err != nil {
		t.Fatalf("%s: %v", out, err)
	}

	ctx := newCPUContext(t)
	seg := must(beit.NewSegmenter(ctx, segConfig, 2, 5))(t)
	defer seg.Close()
	if info := must(seg.Info())(t); info.Architecture != beit.ArchSemanticSegmentation || info.NumLabels != 2 {
		t.Fatalf("segmenter info %+v", info)
	}
	opts := &beit.SegmentationOptions{Epochs: 2, BatchSize: 4, Seed: 5, WarmupSteps: 2, TestFraction: 0.25}
	var steps []beit.SegmentationStep
	trained, r, err := seg.SegmentationFinetune(data, opts, func(s beit.SegmentationStep) bool {
		steps = append(steps, s)
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	defer trained.Close()
	must(0, trained.Save(filepath.Join(dir, "go")))(t)
	sameModelFiles(t, filepath.Join(dir, "cli"), filepath.Join(dir, "go"))
	// 12 training samples in batches of 4: 3 steps an epoch, 6 in all.
	if r.Steps != 6 || r.Steps != report.Steps || r.TrainSamples != 12 || r.TestSamples != 4 || len(steps) != 6 {
		t.Fatalf("report %+v (%d steps seen), the CLI's %+v", r, len(steps), report)
	}
	for i, s := range steps {
		if s.Step != uint64(i+1) || s.TotalSteps != 6 || s.Epoch != uint64(i/3) || s.Loss != report.Losses[i] {
			t.Fatalf("step %d: %+v, the CLI's loss %v", i+1, s, report.Losses[i])
		}
	}
	if r.FinalEpochLoss != (steps[3].Loss+steps[4].Loss+steps[5].Loss)/3 {
		t.Errorf("final epoch loss %v, the mean of the last 3 steps' %v", r.FinalEpochLoss, steps[3:])
	}
	test := must(trained.EvaluateSegmentation(data, &beit.SegmentationEvalOptions{TestFraction: 0.25}))(t)
	if test.Samples != 4 || test.NumLabels != 2 {
		t.Fatalf("test split: %+v", test)
	}
	sameScores(t, "test split", test, report.Test)
	every := must(trained.EvaluateSegmentation(data, &beit.SegmentationEvalOptions{Split: beit.SplitAll, Mean: []float32{0.5}, BatchSize: 3}))(t)
	if every.Samples != 16 {
		t.Fatalf("every sample: %+v", every)
	}
	sameScores(t, "every sample", every, all)
}

// A progress function stops the run (the model of the steps done comes back) or panics (the
// panic comes out after the run); options and models the run cannot use are errors.
func TestSegmentationStopsAndErrors(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "squares.beitds")
	writeSquares(t, data, 12)
	ctx := newCPUContext(t)
	mim := must(beit.LoadModel(ctx, pretrained))(t)
	defer mim.Close()
	seg := must(mim.ToSegmenter(3, 1))(t)
	defer seg.Close()
	info := must(seg.Info())(t)
	if info.Architecture != beit.ArchSemanticSegmentation || info.NumLabels != 3 || info.HiddenSize != 32 {
		t.Fatalf("segmenter from the pretrained model: %+v", info)
	}
	// The backbone is the pretrained one.
	name := "beit.encoder.layer.1.output.dense.weight"
	a, b := must(mim.Parameter(name))(t), must(seg.Parameter(name))(t)
	for i := range a.Data {
		if a.Data[i] != b.Data[i] {
			t.Fatalf("%s differs from the pretrained model's", name)
		}
	}

	opts := &beit.SegmentationOptions{Epochs: 3, BatchSize: 2, WarmupSteps: beit.Zero, NoFlip: true, TestFraction: beit.Zero}
	stopped, r, err := seg.SegmentationFinetune(data, opts, func(s beit.SegmentationStep) bool { return s.Step == 4 })
	if err != nil {
		t.Fatal(err)
	}
	stopped.Close()
	if r.Steps != 4 || r.TrainSamples != 12 || r.TestSamples != 0 {
		t.Fatalf("stopped run: %+v", r)
	}
	func() {
		defer func() {
			if p := recover(); p != "boom at 2" {
				t.Fatalf("recovered %v, want the progress function's panic", p)
			}
		}()
		_, _, _ = seg.SegmentationFinetune(data, opts, func(s beit.SegmentationStep) bool {
			if s.Step == 2 {
				panic(fmt.Sprintf("boom at %d", s.Step))
			}
			return false
		})
		t.Fatal("SegmentationFinetune returned instead of panicking")
	}()

	for _, c := range []struct {
		what  string
		opts  beit.SegmentationOptions
		words string
	}{
		{"batch size 1", beit.SegmentationOptions{BatchSize: 1}, "batch"},
		{"layer decay 2", beit.SegmentationOptions{LayerDecay: 2}, "layer_decay"},
		{"two means for one channel", beit.SegmentationOptions{BatchSize: 2, Mean: []float32{0.5, 0.5}}, "mean"},
		{"negative epochs", beit.SegmentationOptions{Epochs: -3}, "Epochs"},
		{"negative warmup", beit.SegmentationOptions{WarmupSteps: -2}, "WarmupSteps"},
	} {
		m, _, err := seg.SegmentationFinetune(data, &c.opts, nil)
		if m != nil {
			t.Errorf("%s: a model came back", c.what)
		}
		wantErr(t, c.what, err, beit.ErrInvalidArgument)
		if err != nil && !strings.Contains(err.Error(), c.words) {
			t.Errorf("%s: %v does not say %q", c.what, err, c.words)
		}
	}
	_, _, err = mim.SegmentationFinetune(data, nil, nil)
	wantErr(t, "a MIM model", err, beit.ErrInvalidArgument)
	_, err = mim.EvaluateSegmentation(data, nil)
	wantErr(t, "evaluating a MIM model", err, beit.ErrInvalidArgument)
	_, err = seg.EvaluateSegmentation(data, &beit.SegmentationEvalOptions{Split: 7})
	wantErr(t, "split 7", err, beit.ErrInvalidArgument)
	_, err = seg.EvaluateSegmentation(finetuneData, nil)
	wantErr(t, "a dataset without masks", err, beit.ErrInvalidArgument)
	_, err = beit.NewSegmenter(ctx, segConfig, 0, 1)
	wantErr(t, "0 labels", err, beit.ErrInvalidArgument)
	if beit.SplitTest.String() != "test" || beit.SplitAll.String() != "all" || beit.Split(7).String() != "Split(7)" {
		t.Errorf("Split strings: %v %v %v", beit.SplitTest, beit.SplitAll, beit.Split(7))
	}
}
