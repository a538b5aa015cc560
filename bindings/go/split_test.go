package beit_test

import (
	"math"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// allParameters is every parameter of tr by name.
func allParameters(t *testing.T, tr *beit.Trainer) map[string]beit.Tensor[float32] {
	t.Helper()
	out := map[string]beit.Tensor[float32]{}
	for _, p := range must(tr.Parameters())(t) {
		out[p.Name] = must(tr.Parameter(p.Name))(t)
	}
	return out
}

// differing reports the names whose values differ in bits (or are missing) between a and b.
func differing(a, b map[string]beit.Tensor[float32]) []string {
	var names []string
	for name, x := range a {
		y, ok := b[name]
		if !ok || !reflect.DeepEqual(x.Shape, y.Shape) || len(x.Data) != len(y.Data) {
			names = append(names, name)
			continue
		}
		for i := range x.Data {
			if math.Float32bits(x.Data[i]) != math.Float32bits(y.Data[i]) {
				names = append(names, name)
				break
			}
		}
	}
	if len(a) != len(b) {
		names = append(names, "(a different number of parameters)")
	}
	return names
}

func splitTrainer(t *testing.T, ctx *beit.Context, o beit.TrainerOptions) *beit.Trainer {
	t.Helper()
	o.LearningRate = 1e-3
	tr := must(beit.NewTrainerFromConfig(ctx, tinyConfig, 5, &o))(t)
	t.Cleanup(func() { tr.Close() })
	return tr
}

func noTimes(s beit.StepStats) beit.StepStats {
	s.Seconds, s.ImagesPerS = 0, 0
	return s
}

// ForwardBackward + ApplyGradients is Step, bit for bit, with stochastic depth on.
func TestSplitStepIsStep(t *testing.T) {
	ctx := newCPUContext(t)
	o := beit.TrainerOptions{DropPathRate: 0.3, Seed: 9}
	whole, split := splitTrainer(t, ctx, o), splitTrainer(t, ctx, o)
	b := fixedBatch()
	for i := 0; i < 3; i++ {
		want := must(whole.Step(b))(t)
		pass := must(split.ForwardBackward(b))(t)
		if pass != (beit.PassStats{Loss: want.Loss, Images: 2, Masked: 16}) {
			t.Fatalf("step %d: pass %+v, step %+v", i, pass, want)
		}
		got := must(split.ApplyGradients())(t)
		if noTimes(got) != noTimes(want) {
			t.Fatalf("step %d: split %+v, step %+v", i, got, want)
		}
	}
	if d := differing(allParameters(t, whole), allParameters(t, split)); len(d) > 0 {
		t.Fatalf("parameters differ: %v", d)
	}
	// The optimizer state too: the next steps agree.
	if a, b := must(whole.Step(b))(t), must(split.Step(b))(t); noTimes(a) != noTimes(b) {
		t.Fatalf("after the split steps: %+v vs %+v", a, b)
	}
}

// Gradients().Host is the buffer ApplyGradients reads: its norm is the step's, and doubling
// it in place doubles the reported norm.
func TestGradientsAliasTheBuffer(t *testing.T) {
	ctx := newCPUContext(t)
	o := beit.TrainerOptions{ClipGradNorm: beit.Zero, WeightDecay: beit.Zero}
	tr, ref := splitTrainer(t, ctx, o), splitTrainer(t, ctx, o)
	b := fixedBatch()
	_, err := tr.Gradients()
	wantErr(t, "no step pending", err, beit.ErrInvalidArgument)
	_, err = tr.ApplyGradients()
	wantErr(t, "apply with no step pending", err, beit.ErrInvalidArgument)

	must(tr.ForwardBackward(b))(t)
	g := must(tr.Gradients())(t)
	if g.Location != beit.MemoryHost || g.Location.String() != "host" || g.DevicePointer != 0 || g.Stream != 0 {
		t.Fatalf("gradients %+v", g)
	}
	params := must(tr.Parameters())(t)
	total := 0
	for _, p := range params {
		total += p.Len()
	}
	if len(g.Host) != g.Len || g.Len < total {
		t.Fatalf("len(Host) %d, Len %d, parameters hold %d", len(g.Host), g.Len, total)
	}
	// The same memory every time, not a copy.
	if again := must(tr.Gradients())(t); &again.Host[0] != &g.Host[0] {
		t.Fatal("Gradients returned another buffer")
	}
	norm := 0.0
	for i, v := range g.Host {
		norm += float64(v) * float64(v)
		g.Host[i] = 2 * v
	}
	norm = math.Sqrt(norm)
	doubled := must(tr.ApplyGradients())(t)
	want := must(ref.Step(b))(t)
	if math.Abs(want.GradNorm-norm) > 1e-6*norm || math.Abs(doubled.GradNorm-2*want.GradNorm) > 1e-6*want.GradNorm {
		t.Fatalf("norm of the view %g, reference step %g, doubled %g", norm, want.GradNorm, doubled.GradNorm)
	}
}

// Offsets place each parameter in the gradients: keeping one parameter's part alone (with no
// weight decay, a zero gradient moves nothing under AdamW) changes that parameter alone.
func TestGradientOffsets(t *testing.T) {
	ctx := newCPUContext(t)
	tr := splitTrainer(t, ctx, beit.TrainerOptions{WeightDecay: beit.Zero})
	before := allParameters(t, tr)
	var kept beit.ParameterInfo
	for _, p := range must(tr.Parameters())(t) {
		if strings.HasSuffix(p.Name, "attention.attention.query.weight") {
			kept = p
			break
		}
	}
	must(tr.ForwardBackward(fixedBatch()))(t)
	g := must(tr.Gradients())(t)
	own := append([]float32(nil), kept.Of(g.Host)...)
	for i := range g.Host {
		g.Host[i] = 0
	}
	copy(kept.Of(g.Host), own)
	must(tr.ApplyGradients())(t)
	if d := differing(before, allParameters(t, tr)); !reflect.DeepEqual(d, []string{kept.Name}) {
		t.Fatalf("changed %v, want only %s", d, kept.Name)
	}
}

// A pending step refuses what would lose it; DiscardGradients restores everything, the
// random state included; non-finite gradients drop the step.
func TestPendingStep(t *testing.T) {
	ctx := newCPUContext(t)
	o := beit.TrainerOptions{DropPathRate: 0.3}
	tr, ref := splitTrainer(t, ctx, o), splitTrainer(t, ctx, o)
	b := fixedBatch()
	before := allParameters(t, tr)
	must(tr.ForwardBackward(b))(t)
	_, err := tr.Step(b)
	wantErr(t, "Step while pending", err, beit.ErrInvalidArgument)
	_, err = tr.ForwardBackward(b)
	wantErr(t, "ForwardBackward while pending", err, beit.ErrInvalidArgument)
	err = tr.SaveCheckpoint(filepath.Join(t.TempDir(), "c"))
	wantErr(t, "SaveCheckpoint while pending", err, beit.ErrInvalidArgument)
	err = tr.SetParameter("beit.embeddings.cls_token", make([]float32, 32))
	wantErr(t, "SetParameter while pending", err, beit.ErrInvalidArgument)
	if err := tr.DiscardGradients(); err != nil {
		t.Fatal(err)
	}
	if err := tr.DiscardGradients(); err != nil {
		t.Fatal("nothing pending:", err)
	}
	if d := differing(before, allParameters(t, tr)); len(d) > 0 {
		t.Fatalf("discard left %v changed", d)
	}
	for i := 0; i < 2; i++ {
		if a, r := must(tr.Step(b))(t), must(ref.Step(b))(t); noTimes(a) != noTimes(r) {
			t.Fatalf("after discard: %+v, reference %+v", a, r)
		}
	}

	n := must(tr.StepCount())(t)
	before = allParameters(t, tr)
	must(tr.ForwardBackward(b))(t)
	must(tr.Gradients())(t).Host[7] = float32(math.Inf(1))
	_, err = tr.ApplyGradients()
	wantErr(t, "infinite gradient", err, beit.ErrNumerical)
	if d := differing(before, allParameters(t, tr)); len(d) > 0 || must(tr.StepCount())(t) != n {
		t.Fatalf("a dropped step changed %v", d)
	}
	_, err = tr.Gradients()
	wantErr(t, "dropped: nothing pending", err, beit.ErrInvalidArgument)
}

func TestPrecision(t *testing.T) {
	for p, want := range map[beit.Precision]string{beit.PrecisionDefault: "default", beit.PrecisionFP32: "fp32",
		beit.PrecisionBF16: "bf16", beit.Precision(9): "Precision(9)"} {
		if p.String() != want {
			t.Errorf("%d.String() = %q, want %q", uint32(p), p.String(), want)
		}
	}
	if s := beit.MemoryCUDADevice.String(); s != "cuda" {
		t.Errorf("MemoryCUDADevice.String() = %q", s)
	}
	if p := beit.DefaultTrainerOptions().Precision; p != beit.PrecisionDefault {
		t.Fatalf("default precision %v", p)
	}
	ctx := newCPUContext(t)
	_, err := beit.NewTrainerFromConfig(ctx, tinyConfig, 1, &beit.TrainerOptions{Precision: beit.PrecisionBF16})
	wantErr(t, "bf16 on the CPU", err, beit.ErrUnsupported)
	_, err = beit.NewTrainerFromConfig(ctx, tinyConfig, 1, &beit.TrainerOptions{Precision: beit.Precision(9)})
	wantErr(t, "precision 9", err, beit.ErrInvalidArgument)
	// The CPU computes in fp32: asking for it is the default.
	fp32 := splitTrainer(t, ctx, beit.TrainerOptions{Precision: beit.PrecisionFP32})
	def := splitTrainer(t, ctx, beit.TrainerOptions{})
	if a, b := must(fp32.Step(fixedBatch()))(t), must(def.Step(fixedBatch()))(t); noTimes(a) != noTimes(b) {
		t.Fatalf("fp32 %+v, default %+v", a, b)
	}
}
