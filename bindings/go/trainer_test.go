package beit_test

import (
	"math"
	"path/filepath"
	"reflect"
	"testing"

	beit "github.com/libbeit/beit-go"
)

const tinyConfig = `{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
 "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1,
 "vocab_size": 32, "use_mask_token": true, "use_shared_relative_position_bias": true,
 "layer_scale_init_value": 0.1}`

func fixedBatch() beit.MIMBatch {
	const B, P = 2, 16
	b := beit.MIMBatch{Batch: B, Channels: 1, Height: 16, Width: 16,
		Pixels: make([]float32, B*16*16), Mask: make([]uint8, B*P), Labels: make([]int64, B*P)}
	for i := range b.Pixels {
		b.Pixels[i] = float32(math.Sin(float64(i) * 0.37))
	}
	for i := range b.Mask {
		b.Mask[i] = uint8(i % 2)
		b.Labels[i] = int64(i*5) % 32
	}
	return b
}

// A tiny trainer on a fixed batch: the loss is finite and falls; a checkpoint resumes bit
// for bit; SaveModel writes a model LoadModel reads; errors are *beit.Error.
func TestTrainerSmoke(t *testing.T) {
	ctx := newCPUContext(t)
	opts := beit.DefaultTrainerOptions()
	opts.LearningRate = 1e-3
	opts.WarmupSteps = 0
	opts.TotalSteps = 0
	tr := must(beit.NewTrainerFromConfig(ctx, tinyConfig, 1, &opts))(t)
	defer tr.Close()
	b := fixedBatch()
	var losses []float64
	for i := 0; i < 8; i++ {
		s := must(tr.Step(b))(t)
		if math.IsNaN(s.Loss) || math.IsInf(s.Loss, 0) || s.Step != uint64(i+1) || s.Masked != 16 {
			t.Fatalf("step %d: %+v", i, s)
		}
		losses = append(losses, s.Loss)
	}
	if !(losses[len(losses)-1] < losses[0]) {
		t.Fatalf("loss did not fall: %v", losses)
	}
	if n := must(tr.StepCount())(t); n != 8 {
		t.Fatalf("StepCount %d", n)
	}
	if p := must(tr.DataPosition())(t); p != 8 {
		t.Fatalf("DataPosition %d", p)
	}
	info := must(tr.ModelInfo())(t)
	if info.NumPatches != 16 || info.VocabSize != 32 {
		t.Fatalf("ModelInfo %+v", info)
	}

	dir := t.TempDir()
	ckpt := filepath.Join(dir, "run.ckpt")
	if err := tr.SaveCheckpoint(ckpt); err != nil {
		t.Fatal(err)
	}
	next := must(tr.Step(b))(t)
	other := must(beit.NewTrainerFromConfig(ctx, tinyConfig, 99, nil))(t)
	defer other.Close()
	if err := other.LoadCheckpoint(ckpt); err != nil {
		t.Fatal(err)
	}
	resumed := must(other.Step(b))(t)
	if resumed.Loss != next.Loss || resumed.Step != next.Step || resumed.GradNorm != next.GradNorm {
		t.Fatalf("resumed step %+v, want %+v", resumed, next)
	}

	mdir := filepath.Join(dir, "model")
	if err := tr.SaveModel(mdir); err != nil {
		t.Fatal(err)
	}
	m := must(beit.LoadModel(ctx, mdir))(t)
	defer m.Close()
	if mi := must(m.Info())(t); mi.Architecture != beit.ArchMaskedImageModeling {
		t.Fatalf("saved model %+v", mi)
	}
	// Trainers from the saved dir and from the loaded Model step identically.
	t1 := must(beit.LoadTrainer(ctx, mdir, &opts))(t)
	defer t1.Close()
	t2 := must(beit.NewTrainer(ctx, m, &opts))(t)
	defer t2.Close()
	s1, s2 := must(t1.Step(b))(t), must(t2.Step(b))(t)
	s1.Seconds, s2.Seconds, s1.ImagesPerS, s2.ImagesPerS = 0, 0, 0, 0
	if !reflect.DeepEqual(s1, s2) {
		t.Fatalf("LoadTrainer %+v, NewTrainer %+v", s1, s2)
	}

	// Errors: the trainer is unchanged after each.
	before := must(tr.StepCount())(t)
	nan := fixedBatch()
	nan.Pixels[3] = float32(math.NaN())
	_, err := tr.Step(nan)
	wantErr(t, "NaN pixel", err, beit.ErrInvalidArgument)
	short := fixedBatch()
	short.Labels = short.Labels[:3]
	_, err = tr.Step(short)
	wantErr(t, "short labels", err, beit.ErrInvalidArgument)
	none := fixedBatch()
	none.Mask = make([]uint8, len(none.Mask))
	_, err = tr.Step(none)
	wantErr(t, "no masked patch", err, beit.ErrInvalidArgument)
	if after := must(tr.StepCount())(t); after != before {
		t.Fatalf("step count moved on error: %d -> %d", before, after)
	}
	err = tr.LoadCheckpoint(filepath.Join(dir, "missing.ckpt"))
	wantErr(t, "missing checkpoint", err, beit.ErrIO)
	_, err = beit.NewTrainerFromConfig(ctx, `{"hidden_size": 10, "num_attention_heads": 3}`, 1, nil)
	wantErr(t, "bad config", err, beit.ErrConfig)
	_, err = beit.NewTrainerFromConfig(ctx, `{"hidden_size": `, 1, nil)
	wantErr(t, "not JSON", err, beit.ErrFormat)
	bad := opts
	bad.Beta2 = 1.5
	_, err = beit.NewTrainerFromConfig(ctx, tinyConfig, 1, &bad)
	wantErr(t, "beta2 1.5", err, beit.ErrInvalidArgument)
	hot := opts
	hot.LearningRate = 1e30
	hot.ClipGradNorm = beit.Zero
	div := must(beit.NewTrainerFromConfig(ctx, tinyConfig, 1, &hot))(t)
	defer div.Close()
	var numErr error
	for i := 0; i < 20 && numErr == nil; i++ {
		_, numErr = div.Step(b)
	}
	wantErr(t, "diverged", numErr, beit.ErrNumerical)

	tr.Close()
	_, err = tr.Step(b)
	wantErr(t, "closed trainer", err, beit.ErrClosed)
	err = tr.SaveCheckpoint(ckpt)
	wantErr(t, "closed trainer save", err, beit.ErrClosed)
}
