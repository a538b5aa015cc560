package beit_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// tests/reference_finetune: a labelled dataset (48 grey 12x12 images, 3 classes) and a small
// pretrained BeitForMaskedImageModeling (16x16 inputs, 1 channel, patch 4).
var (
	finetuneData = refDir("reference_finetune", "train.beitds")
	pretrained   = refDir("reference_finetune", "pretrained")
)

const ftSteps, ftSeed = 7, 3

// runCLI runs the beit CLI and gives its stdout (a failure is fatal, with its stderr).
func runCLI(t *testing.T, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(beitCLI(t), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("beit %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes()
}

// jsonLosses are the "loss" values of the JSON lines that have a "step" (the CLI's step log).
func jsonLosses(t *testing.T, out []byte) []float64 {
	t.Helper()
	var losses []float64
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var l struct {
			Step *uint64  `json:"step"`
			Loss *float64 `json:"loss"`
		}
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("%q: %v", line, err)
		}
		if l.Step != nil && l.Loss != nil {
			losses = append(losses, *l.Loss)
		}
	}
	return losses
}

// sameModelFiles fails unless the two model directories hold the same config.json and
// model.safetensors, byte for byte.
func sameModelFiles(t *testing.T, want, got string) {
	t.Helper()
	w, g := tokenizerFiles(t, want), tokenizerFiles(t, got)
	for i, name := range []string{"config.json", "model.safetensors"} {
		if !bytes.Equal(w[i], g[i]) {
			t.Errorf("%s differs between %s and %s", name, want, got)
		}
	}
}

func configText(t *testing.T, dir string) string {
	return string(must(os.ReadFile(filepath.Join(dir, "config.json")))(t))
}

// writeLabelled writes a labelled 1-channel dataset of size x size images: image i has
// label labels[i] and pixel k pixel(i, k).
func writeLabelled(t *testing.T, path string, size int, labels []uint32, pixel func(i, k int) uint8) {
	t.Helper()
	w := must(beit.NewDatasetWriter(path, beit.DatasetSpec{Height: size, Width: size, Channels: 1, Labels: true}))(t)
	defer w.Close()
	px := make([]uint8, len(labels)*size*size)
	for i := range labels {
		for k := 0; k < size*size; k++ {
			px[i*size*size+k] = pixel(i, k)
		}
	}
	if err := w.Append(beit.Samples{Count: len(labels), Pixels: px, Labels: labels}); err != nil {
		t.Fatal(err)
	}
	must(w.Finish())(t)
}

// Trainer.Finetune writes the files `beit finetune` writes with the same model, data, options
// and seeds, byte for byte, and its progress function sees the losses the CLI logs; a run
// stopped by its progress function, checkpointed and resumed in a fresh trainer writes them
// too.
func TestFinetuneEqualsTheCLI(t *testing.T) {
	dir := t.TempDir()
	cli := runCLI(t, "finetune", "--model", pretrained, "--data", finetuneData, "--out", filepath.Join(dir, "cli"),
		"--steps", "7", "--batch", "8", "--seed", "3", "--label-fraction", "0.5", "--threads", "2", "--log-every", "1")
	cliLosses := jsonLosses(t, cli)

	ctx := newCPUContext(t)
	mim := must(beit.LoadModel(ctx, pretrained))(t)
	defer mim.Close()
	cls := must(mim.ToClassifier(3, &beit.ClassifierOptions{Seed: ftSeed}))(t)
	defer cls.Close()
	if info := must(cls.Info())(t); info.Architecture != beit.ArchImageClassification || info.NumLabels != 3 {
		t.Fatalf("classifier info %+v", info)
	}
	topts := beit.FinetuneTrainerOptions(ftSteps)
	// The recipe: lr 1e-3, cosine to 1e-6, warmup a tenth of 7 steps (0), betas (0.9, 0.999),
	// weight decay 0.05, no clipping (Zero in this convention), drop path 0.1, layer decay 0.65.
	if topts.LearningRate != 1e-3 || topts.MinLearningRate != 1e-6 || topts.WarmupSteps != 0 || topts.TotalSteps != ftSteps ||
		topts.Beta1 != 0.9 || topts.Beta2 != 0.999 || topts.WeightDecay != 0.05 || topts.ClipGradNorm != beit.Zero ||
		topts.DropPathRate != 0.1 || topts.LayerDecay != 0.65 || topts.Seed != 0 {
		t.Fatalf("FinetuneTrainerOptions(7) = %+v", topts)
	}
	topts.Seed = ftSeed
	opts := &beit.FinetuneOptions{BatchSize: 8, Seed: ftSeed, LabelFraction: 0.5, ScratchDir: dir}

	tr := must(beit.NewTrainer(ctx, cls, &topts))(t)
	defer tr.Close()
	var steps []uint64
	var losses []float64
	err := tr.Finetune(finetuneData, opts, func(s beit.StepStats) bool {
		steps = append(steps, s.Step)
		losses = append(losses, s.Loss)
		return false
	})
	if err != nil {
		t.Fatal(err)
	}
	must(0, tr.SaveModel(filepath.Join(dir, "go")))(t)
	sameModelFiles(t, filepath.Join(dir, "cli"), filepath.Join(dir, "go"))
	if len(steps) != ftSteps || steps[0] != 1 || steps[ftSteps-1] != ftSteps {
		t.Fatalf("progress saw steps %v", steps)
	}
	if len(cliLosses) != ftSteps {
		t.Fatalf("the CLI logged %d losses: %s", len(cliLosses), cli)
	}
	for i := range losses {
		if losses[i] != cliLosses[i] {
			t.Fatalf("step %d: loss %v, the CLI's %v", i+1, losses[i], cliLosses[i])
		}
	}

	// Stopped at step 3, checkpointed, resumed in a fresh trainer (whose own seed the
	// checkpoint replaces).
	stopped := must(beit.NewTrainer(ctx, cls, &topts))(t)
	defer stopped.Close()
	if err := stopped.Finetune(finetuneData, opts, func(s beit.StepStats) bool { return s.Step >= 3 }); err != nil {
		t.Fatal(err)
	}
	if n := must(stopped.StepCount())(t); n != 3 {
		t.Fatalf("stopped at step %d", n)
	}
	must(0, stopped.SaveCheckpoint(filepath.Join(dir, "ckpt")))(t)
	fresh := beit.FinetuneTrainerOptions(ftSteps)
	resumed := must(beit.NewTrainer(ctx, cls, &fresh))(t)
	defer resumed.Close()
	must(0, resumed.LoadCheckpoint(filepath.Join(dir, "ckpt")))(t)
	must(0, resumed.Finetune(finetuneData, opts, nil))(t)
	if n := must(resumed.StepCount())(t); n != ftSteps {
		t.Fatalf("resumed run ended at step %d", n)
	}
	must(0, resumed.SaveModel(filepath.Join(dir, "resumed")))(t)
	sameModelFiles(t, filepath.Join(dir, "cli"), filepath.Join(dir, "resumed"))
}

// A panic in the progress function stops the run after that step and comes out of Finetune;
// bad options, the wrong trainer and a missing file are errors that take no step.
func TestFinetuneErrors(t *testing.T) {
	ctx := newCPUContext(t)
	cls := must(beit.NewClassifier(ctx, configText(t, pretrained), 3, &beit.ClassifierOptions{Seed: 1}))(t)
	defer cls.Close()
	topts := beit.FinetuneTrainerOptions(ftSteps)
	tr := must(beit.NewTrainer(ctx, cls, &topts))(t)
	defer tr.Close()
	opts := &beit.FinetuneOptions{BatchSize: 8}

	func() {
		defer func() {
			if r := recover(); r != "boom at 1" {
				t.Fatalf("recovered %v, want the progress function's panic", r)
			}
		}()
		_ = tr.Finetune(finetuneData, opts, func(s beit.StepStats) bool { panic(fmt.Sprintf("boom at %d", s.Step)) })
		t.Fatal("Finetune returned instead of panicking")
	}()
	if n := must(tr.StepCount())(t); n != 1 {
		t.Fatalf("after the panic the trainer is at step %d, want 1", n)
	}

	for _, c := range []struct {
		what  string
		opts  beit.FinetuneOptions
		want  *beit.Error
		words string
	}{
		{"label fraction 2", beit.FinetuneOptions{LabelFraction: 2}, beit.ErrInvalidArgument, "label fraction"},
		{"flip probability 1.5", beit.FinetuneOptions{FlipProb: 1.5}, beit.ErrInvalidArgument, "flip_prob"},
		{"min crop scale 2", beit.FinetuneOptions{MinCropScale: 2}, beit.ErrInvalidArgument, "min_crop_scale"},
		{"label smoothing 1", beit.FinetuneOptions{LabelSmoothing: 1}, beit.ErrInvalidArgument, "smoothing"},
		{"negative batch", beit.FinetuneOptions{BatchSize: -1}, beit.ErrInvalidArgument, "BatchSize"},
	} {
		err := tr.Finetune(finetuneData, &c.opts, nil)
		wantErr(t, c.what, err, c.want)
		if err != nil && !strings.Contains(err.Error(), c.words) {
			t.Errorf("%s: %v does not say %q", c.what, err, c.words)
		}
	}
	wantErr(t, "missing dataset", tr.Finetune(filepath.Join(t.TempDir(), "none.beitds"), opts, nil), beit.ErrIO)
	if n := must(tr.StepCount())(t); n != 1 {
		t.Fatalf("refused runs took steps: at step %d", n)
	}

	noSteps := must(beit.NewTrainer(ctx, cls, nil))(t) // TotalSteps 0 and no Steps: nothing to do
	defer noSteps.Close()
	wantErr(t, "no steps", noSteps.Finetune(finetuneData, opts, nil), beit.ErrInvalidArgument)

	mimTrainer := must(beit.LoadTrainer(ctx, pretrained, nil))(t)
	defer mimTrainer.Close()
	err := mimTrainer.Finetune(finetuneData, &beit.FinetuneOptions{Steps: 2, BatchSize: 8}, nil)
	wantErr(t, "a pretraining trainer", err, beit.ErrInvalidArgument)
	if err != nil && !strings.Contains(err.Error(), "BeitForImageClassification") {
		t.Errorf("a pretraining trainer: %v", err)
	}

	tr.Close()
	if err := tr.Finetune(finetuneData, opts, nil); !errors.Is(err, beit.ErrClosed) {
		t.Fatalf("closed trainer: %v", err)
	}
}

// FinetuneEpochSteps counts full batches of the (stratified) labelled subset, derived here by
// hand: classes of 9, 6 and 1 samples; a fraction f keeps round(f * n) of each (at least 1).
func TestFinetuneEpochSteps(t *testing.T) {
	path := filepath.Join(t.TempDir(), "l.beitds")
	labels := make([]uint32, 16)
	for i := range labels {
		switch {
		case i < 9:
			labels[i] = 0
		case i < 15:
			labels[i] = 1
		default:
			labels[i] = 2
		}
	}
	writeLabelled(t, path, 4, labels, func(i, k int) uint8 { return uint8(i*16 + k) })
	for _, c := range []struct {
		opts beit.FinetuneOptions
		want uint64
	}{
		{beit.FinetuneOptions{BatchSize: 4}, 4},                               // 16 / 4
		{beit.FinetuneOptions{BatchSize: 5}, 3},                               // 16 / 5, the last 1 dropped
		{beit.FinetuneOptions{BatchSize: 32}, 1},                              // less than a batch: one short one
		{beit.FinetuneOptions{BatchSize: 4, LabelFraction: 0.5}, 2},           // 5 + 3 + 1 = 9 -> 2
		{beit.FinetuneOptions{BatchSize: 2, LabelFraction: 0.25}, 2},          // 2 + 2 + 1 = 5 -> 2
		{beit.FinetuneOptions{BatchSize: 1, LabelFraction: 0.25, Seed: 9}, 5}, // the seed picks, not counts
		{beit.FinetuneOptions{}, 1},                                           // the default batch, 64: one short batch
	} {
		if got := must(beit.FinetuneEpochSteps(path, &c.opts))(t); got != c.want {
			t.Errorf("%+v: %d steps, want %d", c.opts, got, c.want)
		}
	}
	if got := must(beit.FinetuneEpochSteps(finetuneData, &beit.FinetuneOptions{BatchSize: 8}))(t); got != 48/8 {
		t.Errorf("reference data: %d steps", got)
	}
	_, err := beit.FinetuneEpochSteps(path, &beit.FinetuneOptions{LabelFraction: 1.5})
	wantErr(t, "label fraction 1.5", err, beit.ErrInvalidArgument)
	_, err = beit.FinetuneEpochSteps(filepath.Join(t.TempDir(), "none"), nil)
	wantErr(t, "missing file", err, beit.ErrIO)
}

// smoothedCrossEntropy is the mean over rows of -(1-e) log p_y - (e/K) sum_k log p_k
// (PyTorch's cross_entropy with label_smoothing=e), in float64.
func smoothedCrossEntropy(logits []float32, labels []int64, k int, e float64) float64 {
	total := 0.0
	for r, y := range labels {
		row := logits[r*k : (r+1)*k]
		mx := math.Inf(-1)
		for _, v := range row {
			mx = math.Max(mx, float64(v))
		}
		sum := 0.0
		for _, v := range row {
			sum += math.Exp(float64(v) - mx)
		}
		lse := mx + math.Log(sum)
		sumLogP := 0.0
		for _, v := range row {
			sumLogP += float64(v) - lse
		}
		total += -(1-e)*(float64(row[y])-lse) - e/float64(k)*sumLogP
	}
	return total / float64(len(labels))
}

// StepClassify's loss is the label-smoothed cross-entropy of the model's own logits (Infer on
// the same pixels, computed here; without drop path the training forward is the model's); a
// restored checkpoint repeats its steps bit for bit; bad batches change nothing.
func TestStepClassify(t *testing.T) {
	dir := t.TempDir()
	ctx := newCPUContext(t)
	cls := must(beit.NewClassifier(ctx, configText(t, pretrained), 3, &beit.ClassifierOptions{Seed: 2}))(t)
	defer cls.Close()
	b := beit.ClassifyBatch{Pixels: make([]float32, 4*16*16), Batch: 4, Channels: 1, Height: 16, Width: 16,
		Labels: []int64{0, 2, 1, 2}}
	for i := range b.Pixels {
		b.Pixels[i] = float32(math.Sin(float64(i)*0.37) * 1.5)
	}
	// A head of weights far from its fresh ~0.001 scale, so that the logits are far from 0
	// and the loss far from ln 3.
	head := must(cls.Parameter("classifier.weight"))(t)
	for i := range head.Data {
		head.Data[i] = float32(math.Cos(float64(i) * 0.91))
	}
	must(0, cls.SetParameter("classifier.weight", head.Data))(t)
	must(0, cls.SetParameter("classifier.bias", []float32{0.3, -0.2, 0.1}))(t)
	out := must(cls.Infer(b.Pixels, 4, 1, 16, 16, nil))(t)
	want := smoothedCrossEntropy(out.Logits.Data, b.Labels, 3, 0.1)
	if math.Abs(want-math.Log(3)) < 0.1 {
		t.Fatalf("the reference loss %v is too close to ln 3 to tell models apart", want)
	}

	topts := beit.FinetuneTrainerOptions(10)
	topts.Seed, topts.DropPathRate = 5, beit.Zero
	tr := must(beit.NewTrainer(ctx, cls, &topts))(t)
	defer tr.Close()
	s := must(tr.StepClassify(b, 0.1))(t)
	if s.Step != 1 || s.Masked != 0 || math.Abs(s.Loss-want) > 1e-6*math.Abs(want) {
		t.Fatalf("first step %+v, want loss %v", s, want)
	}
	twin := must(beit.NewTrainer(ctx, cls, &topts))(t)
	defer twin.Close()
	if s2 := must(twin.StepClassify(b, 0.1))(t); s2.Loss != s.Loss || s2.GradNorm != s.GradNorm {
		t.Fatalf("the same step on a twin trainer: %+v, then %+v", s, s2)
	}

	must(0, tr.SaveCheckpoint(filepath.Join(dir, "ckpt")))(t)
	var after []float64
	for i := 0; i < 2; i++ {
		after = append(after, must(tr.StepClassify(b, 0))(t).Loss)
	}
	must(0, tr.LoadCheckpoint(filepath.Join(dir, "ckpt")))(t)
	for i := 0; i < 2; i++ {
		if l := must(tr.StepClassify(b, 0))(t).Loss; l != after[i] {
			t.Fatalf("step %d after the restore: loss %v, before %v", i+2, l, after[i])
		}
	}

	bad := b
	bad.Labels = []int64{0, 1, 2, 3}
	wantErr(t, "label 3 of 3 labels", must2(tr.StepClassify(bad, 0.1)), beit.ErrInvalidArgument)
	bad.Labels = b.Labels[:3]
	wantErr(t, "3 labels for 4 images", must2(tr.StepClassify(bad, 0.1)), beit.ErrInvalidArgument)
	wantErr(t, "label smoothing 1", must2(tr.StepClassify(b, 1)), beit.ErrInvalidArgument)
	bad = b
	bad.Height = -16
	wantErr(t, "negative height", must2(tr.StepClassify(bad, 0.1)), beit.ErrInvalidArgument)
	if n := must(tr.StepCount())(t); n != 3 {
		t.Fatalf("refused steps counted: step %d", n)
	}
	mimTrainer := must(beit.LoadTrainer(ctx, pretrained, nil))(t)
	defer mimTrainer.Close()
	err := must2(mimTrainer.StepClassify(b, 0.1))
	wantErr(t, "a pretraining trainer", err, beit.ErrInvalidArgument)
}

// must2 is the error of a two-valued call.
func must2[T any](_ T, err error) error { return err }

// Model.Evaluate gives the numbers of `beit eval --json`; on images at the model's size its
// confusion matrix is the argmax of Infer's logits on the dataset's pixels normalised by hand.
func TestEvaluate(t *testing.T) {
	dir := t.TempDir()
	ctx := newCPUContext(t)
	mim := must(beit.LoadModel(ctx, pretrained))(t)
	defer mim.Close()
	cls := must(mim.ToClassifier(3, &beit.ClassifierOptions{Seed: 4}))(t)
	defer cls.Close()
	must(0, cls.Save(filepath.Join(dir, "cls")))(t)
	e := must(cls.Evaluate(finetuneData, 7))(t)
	var want struct {
		Images           uint64     `json:"images"`
		Correct          uint64     `json:"correct"`
		Top1             float64    `json:"top1"`
		Confusion        [][]uint64 `json:"confusion"`
		PerClassAccuracy []float64  `json:"per_class_accuracy"`
	}
	cli := runCLI(t, "eval", "--model", filepath.Join(dir, "cls"), "--data", finetuneData, "--json", "--threads", "2")
	if err := json.Unmarshal(cli, &want); err != nil {
		t.Fatalf("%s: %v", cli, err)
	}
	if e.Images != want.Images || e.Correct != want.Correct || e.Top1 != want.Top1 || e.NumLabels != 3 {
		t.Fatalf("Evaluate %+v, beit eval %s", e, cli)
	}
	if len(e.Confusion.Shape) != 2 || e.Confusion.Shape[0] != 3 || e.Confusion.Shape[1] != 3 {
		t.Fatalf("confusion shape %v", e.Confusion.Shape)
	}
	for i, row := range want.Confusion {
		for j, n := range row {
			if e.Confusion.Data[i*3+j] != n {
				t.Fatalf("confusion %v, beit eval's %v", e.Confusion.Data, want.Confusion)
			}
		}
	}
	for i, acc := range e.PerClassAccuracy() {
		if acc != want.PerClassAccuracy[i] {
			t.Fatalf("per-class accuracy %v, beit eval's %v", e.PerClassAccuracy(), want.PerClassAccuracy)
		}
	}
	if again := must(cls.Evaluate(finetuneData, 0))(t); again.Correct != e.Correct {
		t.Fatalf("the default batch size changed the result: %+v", again)
	}

	// 16x16 images (the model's size: no resize): pixel v is (v/255 - 0.5) / 0.5.
	labels := []uint32{0, 1, 2, 0, 1, 2, 2, 1, 0, 1}
	own := filepath.Join(dir, "own.beitds")
	writeLabelled(t, own, 16, labels, func(i, k int) uint8 { return uint8((i*37 + k*k*11 + (k/16)*29) % 256) })
	ds := must(beit.OpenDataset(own))(t)
	defer ds.Close()
	pixels := make([]float32, 0, len(labels)*256)
	for i := range labels {
		s := must(ds.Read(i))(t)
		for _, v := range s.Pixels.Data {
			x := float32(v) * (1.0 / 255.0)
			pixels = append(pixels, (x-0.5)/0.5)
		}
	}
	logits := must(cls.Infer(pixels, len(labels), 1, 16, 16, nil))(t).Logits.Data
	confusion := make([]uint64, 9)
	correct := uint64(0)
	for i, truth := range labels {
		row := logits[i*3 : i*3+3]
		best := 0
		for k := range row {
			if row[k] > row[best] {
				best = k
			}
		}
		confusion[int(truth)*3+best]++
		if best == int(truth) {
			correct++
		}
	}
	got := must(cls.Evaluate(own, 4))(t)
	if got.Images != uint64(len(labels)) || got.Correct != correct || got.Top1 != float64(correct)/float64(len(labels)) {
		t.Fatalf("Evaluate %+v, want %d of %d correct", got, correct, len(labels))
	}
	for i := range confusion {
		if got.Confusion.Data[i] != confusion[i] {
			t.Fatalf("confusion %v, from Infer %v", got.Confusion.Data, confusion)
		}
	}

	_, err := mim.Evaluate(finetuneData, 8)
	wantErr(t, "a MIM model", err, beit.ErrInvalidArgument)
	_, err = cls.Evaluate(filepath.Join(dir, "none.beitds"), 8)
	wantErr(t, "missing file", err, beit.ErrIO)
	_, err = cls.Evaluate(finetuneData, -1)
	wantErr(t, "negative batch", err, beit.ErrInvalidArgument)
}

// WithImageSize resizes the position tables (the relative position bias of a 5x5 grid has
// (2*5-1)^2 + 3 = 84 rows, that of the 4x4 grid 52) and keeps every other weight.
func TestWithImageSize(t *testing.T) {
	ctx := newCPUContext(t)
	mim := must(beit.LoadModel(ctx, pretrained))(t)
	defer mim.Close()
	cls := must(mim.ToClassifier(3, nil))(t)
	defer cls.Close()
	big := must(cls.WithImageSize(20, 20))(t)
	defer big.Close()
	info := must(big.Info())(t)
	if info.ImageHeight != 20 || info.ImageWidth != 20 || info.NumPatches != 25 || info.NumLabels != 3 {
		t.Fatalf("resized info %+v", info)
	}
	params := must(cls.Parameters())(t)
	resized := map[string][]int{}
	for _, p := range must(big.Parameters())(t) {
		resized[p.Name] = p.Shape
	}
	tables := 0
	for _, p := range params {
		if strings.HasSuffix(p.Name, "relative_position_bias_table") {
			tables++
			if p.Shape[0] != 52 || resized[p.Name][0] != 84 || resized[p.Name][1] != p.Shape[1] {
				t.Fatalf("%s: %v -> %v", p.Name, p.Shape, resized[p.Name])
			}
			continue
		}
		if strings.Contains(p.Name, "relative_position_index") {
			continue
		}
		a, b := must(cls.Parameter(p.Name))(t), must(big.Parameter(p.Name))(t)
		for i := range a.Data {
			if a.Data[i] != b.Data[i] {
				t.Fatalf("%s changed", p.Name)
			}
		}
	}
	if tables != info.NumLayers {
		t.Fatalf("%d relative position tables, want one per block (%d)", tables, info.NumLayers)
	}
	out := must(big.Infer(make([]float32, 20*20), 1, 1, 20, 20, nil))(t)
	if len(out.Logits.Shape) != 2 || out.Logits.Shape[1] != 3 {
		t.Fatalf("logits %v", out.Logits)
	}
	_, err := cls.WithImageSize(2, 2)
	wantErr(t, "an image smaller than a patch", err, beit.ErrInvalidArgument)
	_, err = cls.WithImageSize(-1, 16)
	wantErr(t, "negative height", err, beit.ErrInvalidArgument)
}

// ToClassifier and NewClassifier refuse what the C API refuses, and the classifier's drop
// path rate is the option's (or the recipe's 0.1).
func TestClassifierOptions(t *testing.T) {
	ctx := newCPUContext(t)
	mim := must(beit.LoadModel(ctx, pretrained))(t)
	defer mim.Close()
	dir := t.TempDir()
	for _, c := range []struct {
		opts *beit.ClassifierOptions
		want float64
	}{{nil, 0.1}, {&beit.ClassifierOptions{DropPathRate: 0.25}, 0.25}, {&beit.ClassifierOptions{DropPathRate: beit.Zero}, 0}} {
		cls := must(mim.ToClassifier(2, c.opts))(t)
		must(0, cls.Save(dir))(t)
		cls.Close()
		var config struct {
			DropPathRate float64 `json:"drop_path_rate"`
		}
		if err := json.Unmarshal([]byte(configText(t, dir)), &config); err != nil {
			t.Fatal(err)
		}
		if config.DropPathRate != c.want {
			t.Errorf("%+v: drop_path_rate %v, want %v", c.opts, config.DropPathRate, c.want)
		}
	}
	_, err := mim.ToClassifier(0, nil)
	wantErr(t, "0 labels", err, beit.ErrInvalidArgument)
	_, err = mim.ToClassifier(2, &beit.ClassifierOptions{DropPathRate: 1})
	wantErr(t, "drop path 1", err, beit.ErrInvalidArgument)
	_, err = beit.NewClassifier(ctx, "{not json", 2, nil)
	wantErr(t, "bad config", err, beit.ErrFormat)
	mim.Close()
	_, err = mim.ToClassifier(2, nil)
	if !errors.Is(err, beit.ErrClosed) {
		t.Fatalf("closed model: %v", err)
	}
}
