package beit_test

import (
	"math"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"testing"

	beit "github.com/libbeit/beit-go"
)

func sameFloats(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) {
			return false
		}
	}
	return true
}

// checkAgainstFile checks that params are exactly the tensors of a model.safetensors (read by
// the test's own reader): names, shapes, and values from get.
func checkAgainstFile(t *testing.T, path string, params []beit.ParameterInfo, get func(string) (beit.Tensor[float32], error)) {
	t.Helper()
	stored := readSafetensors(t, path)
	if len(params) != len(stored) {
		t.Fatalf("%d parameters, %s holds %d tensors", len(params), path, len(stored))
	}
	for _, p := range params {
		s, ok := stored[p.Name]
		if !ok || !reflect.DeepEqual(p.Shape, s.shape) {
			t.Fatalf("%s: shape %v, file %v (present %v)", p.Name, p.Shape, s.shape, ok)
		}
		v := must(get(p.Name))(t)
		if !reflect.DeepEqual(v.Shape, p.Shape) || !sameFloats(v.Data, s.f32(t)) {
			t.Fatalf("%s: values differ from the file", p.Name)
		}
	}
}

func TestModelParametersAreTheSafetensors(t *testing.T) {
	ctx := newCPUContext(t)
	dir := refDir("reference", "mim_shared")
	m := must(beit.LoadModel(ctx, dir))(t)
	defer m.Close()
	params := must(m.Parameters())(t)
	checkAgainstFile(t, filepath.Join(dir, "model.safetensors"), params, m.Parameter)
	// Offsets lay them out without overlap, and they are all of the model's.
	sorted := append([]beit.ParameterInfo(nil), params...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Offset < sorted[j].Offset })
	total := 0
	for i, p := range sorted {
		total += p.Len()
		if i > 0 && sorted[i-1].Offset+sorted[i-1].Len() > p.Offset {
			t.Fatalf("%s overlaps %s", sorted[i-1].Name, p.Name)
		}
	}
	if info := must(m.Info())(t); uint64(total) != info.NumParameters {
		t.Fatalf("parameters hold %d values, NumParameters %d", total, info.NumParameters)
	}
}

func TestSetParameterRoundTrip(t *testing.T) {
	ctx := newCPUContext(t)
	m := must(beit.NewModel(ctx, tinyConfig, beit.ArchMaskedImageModeling, 1))(t)
	defer m.Close()
	const name = "beit.encoder.layer.1.attention.attention.query.weight"
	old := must(m.Parameter(name))(t)
	if !reflect.DeepEqual(old.Shape, []int{32, 32}) {
		t.Fatalf("shape %v", old.Shape)
	}
	b := fixedBatch()
	before := must(m.Infer(b.Pixels, b.Batch, 1, 16, 16, b.Mask))(t)
	values := make([]float32, 32*32)
	for i := range values {
		values[i] = float32(math.Cos(float64(i)))
	}
	if err := m.SetParameter(name, values); err != nil {
		t.Fatal(err)
	}
	if got := must(m.Parameter(name))(t); !sameFloats(got.Data, values) {
		t.Fatal("Parameter after SetParameter differs")
	}
	if after := must(m.Infer(b.Pixels, b.Batch, 1, 16, 16, b.Mask))(t); sameFloats(after.Logits.Data, before.Logits.Data) {
		t.Fatal("inference did not use the new values")
	}
	// Saved, the file holds them under that name.
	dir := t.TempDir()
	if err := m.Save(dir); err != nil {
		t.Fatal(err)
	}
	if got := readSafetensors(t, filepath.Join(dir, "model.safetensors"))[name].f32(t); !sameFloats(got, values) {
		t.Fatal("saved values differ")
	}
	// Refusals change nothing.
	wantErr(t, "short", m.SetParameter(name, values[:10]), beit.ErrInvalidArgument)
	bad := append([]float32(nil), values...)
	bad[3] = float32(math.NaN())
	wantErr(t, "NaN", m.SetParameter(name, bad), beit.ErrInvalidArgument)
	wantErr(t, "unknown name", m.SetParameter("beit.no.such.weight", values), beit.ErrInvalidArgument)
	_, err := m.Parameter("beit.no.such.weight")
	wantErr(t, "unknown name", err, beit.ErrInvalidArgument)
	if got := must(m.Parameter(name))(t); !sameFloats(got.Data, values) {
		t.Fatal("a refused SetParameter changed the model")
	}
	m.Close()
	wantErr(t, "closed", m.SetParameter(name, values), beit.ErrClosed)
	_, err = m.Parameters()
	wantErr(t, "closed", err, beit.ErrClosed)
}

// SetParameter and CopyParametersFrom wait for inferences on other goroutines (never
// ErrBusy), and two models copying from each other at once do not deadlock.
func TestChangingASharedModel(t *testing.T) {
	ctx := newCPUContext(t)
	a := must(beit.NewModel(ctx, tinyConfig, beit.ArchMaskedImageModeling, 1))(t)
	defer a.Close()
	c := must(beit.NewModel(ctx, tinyConfig, beit.ArchMaskedImageModeling, 2))(t)
	defer c.Close()
	b := fixedBatch()
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for g := 0; g < 3; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				if _, err := a.Infer(b.Pixels, b.Batch, 1, 16, 16, b.Mask); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		for i := 0; i < 10; i++ {
			if err := a.SetParameter("beit.embeddings.cls_token", make([]float32, 32)); err != nil {
				errs <- err
			}
			if err := a.CopyParametersFrom(c); err != nil {
				errs <- err
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < 10; i++ {
			if err := c.CopyParametersFrom(a); err != nil {
				errs <- err
			}
		}
	}()
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestCopyParametersBetweenModels(t *testing.T) {
	ctx := newCPUContext(t)
	a := must(beit.NewModel(ctx, tinyConfig, beit.ArchMaskedImageModeling, 1))(t)
	defer a.Close()
	c := must(beit.NewModel(ctx, tinyConfig, beit.ArchMaskedImageModeling, 2))(t)
	defer c.Close()
	if err := c.CopyParametersFrom(a); err != nil {
		t.Fatal(err)
	}
	for _, p := range must(a.Parameters())(t) {
		if !sameFloats(must(a.Parameter(p.Name))(t).Data, must(c.Parameter(p.Name))(t).Data) {
			t.Fatalf("%s differs after the copy", p.Name)
		}
	}
	wantErr(t, "itself", a.CopyParametersFrom(a), beit.ErrInvalidArgument)
	wider := must(beit.NewModel(ctx, `{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
 "intermediate_size": 64, "image_size": 16, "patch_size": 4, "num_channels": 1,
 "vocab_size": 33, "use_mask_token": true, "use_shared_relative_position_bias": true}`, beit.ArchMaskedImageModeling, 1))(t)
	defer wider.Close()
	wantErr(t, "another vocabulary", wider.CopyParametersFrom(a), beit.ErrInvalidArgument)
}

func TestTrainerParametersAndModel(t *testing.T) {
	ctx := newCPUContext(t)
	tr := splitTrainer(t, ctx, beit.TrainerOptions{})
	b := fixedBatch()
	must(tr.Step(b))(t)
	dir := t.TempDir()
	if err := tr.SaveModel(dir); err != nil {
		t.Fatal(err)
	}
	params := must(tr.Parameters())(t)
	checkAgainstFile(t, filepath.Join(dir, "model.safetensors"), params, tr.Parameter)
	m := must(tr.Model())(t)
	defer m.Close()
	if !reflect.DeepEqual(must(m.Parameters())(t), params) {
		t.Fatal("Model().Parameters() differs from the trainer's")
	}
	checkAgainstFile(t, filepath.Join(dir, "model.safetensors"), params, m.Parameter)
	// A copy: later steps leave it.
	name := params[5].Name
	snap := must(m.Parameter(name))(t)
	must(tr.Step(b))(t)
	if !sameFloats(must(m.Parameter(name))(t).Data, snap.Data) || sameFloats(must(tr.Parameter(name))(t).Data, snap.Data) {
		t.Fatal("the model followed the trainer, or the step changed nothing")
	}
	// Trainer SetParameter / Parameter, and copying the model back in.
	values := make([]float32, len(snap.Data))
	for i := range values {
		values[i] = float32(i) * 1e-3
	}
	if err := tr.SetParameter(name, values); err != nil {
		t.Fatal(err)
	}
	if !sameFloats(must(tr.Parameter(name))(t).Data, values) {
		t.Fatal("trainer Parameter after SetParameter differs")
	}
	if err := tr.CopyParametersFrom(m); err != nil {
		t.Fatal(err)
	}
	checkAgainstFile(t, filepath.Join(dir, "model.safetensors"), params, tr.Parameter)
	if n := must(tr.StepCount())(t); n != 2 {
		t.Fatalf("StepCount %d after copying parameters in", n)
	}

	// Model() needs the trainer's context open.
	own := must(beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU, Threads: 1}))(t)
	tr2 := must(beit.NewTrainerFromConfig(own, tinyConfig, 1, nil))(t)
	defer tr2.Close()
	own.Close()
	_, err := tr2.Model()
	wantErr(t, "closed context", err, beit.ErrClosed)
}
