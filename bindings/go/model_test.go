package beit_test

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"testing"

	beit "github.com/libbeit/beit-go"
)

func TestVersion(t *testing.T) {
	if beit.ABIVersion() != beit.HeaderABIVersion {
		t.Fatalf("library ABI %d, header %d", beit.ABIVersion(), beit.HeaderABIVersion)
	}
	if beit.Version() == "" {
		t.Fatal("empty version")
	}
	if s := beit.StatusIO.String(); s != "BEIT_ERR_IO" {
		t.Fatalf("StatusIO.String() = %q", s)
	}
}

type refCase struct {
	pixels    []float32
	shape     []int
	mask      []uint8
	want      map[string][]float32
	wantShape map[string][]int // transformers' output shapes
}

func loadCase(t *testing.T, name string) refCase { return loadCaseIn(t, "reference", name) }

// loadCaseIn reads tests/<set>/<name>'s inputs and transformers' outputs.
func loadCaseIn(t *testing.T, set, name string) refCase {
	in := readSafetensors(t, refDir(set, name, "inputs.safetensors"))
	c := refCase{pixels: in["pixel_values"].f32(t), shape: in["pixel_values"].shape, want: map[string][]float32{},
		wantShape: map[string][]int{}}
	if m, ok := in["bool_masked_pos"]; ok {
		c.mask = m.data
	}
	for k, v := range readSafetensors(t, refDir(set, name, "outputs.safetensors")) {
		c.want[k] = v.f32(t)
		c.wantShape[k] = v.shape
	}
	return c
}

func referenceCases(t *testing.T) []string {
	entries, err := os.ReadDir(refDir("reference"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		if _, err := os.Stat(refDir("reference", e.Name(), "case.json")); err == nil {
			names = append(names, e.Name())
		}
	}
	if len(names) < 13 {
		t.Fatalf("found %d reference cases, want the 13", len(names))
	}
	return names
}

// Every committed Hugging Face reference case, run through Go -> cgo -> beit.h, matches
// transformers' outputs within the Rust parity test's tolerance, and each output's Shape is
// the shape transformers gave it.
func TestInferMatchesTransformers(t *testing.T) {
	ctx := newCPUContext(t)
	for _, name := range referenceCases(t) {
		t.Run(name, func(t *testing.T) {
			c := loadCase(t, name)
			m := must(beit.LoadModel(ctx, refDir("reference", name)))(t)
			defer m.Close()
			s := c.shape
			out := must(m.Infer(c.pixels, s[0], s[1], s[2], s[3], c.mask))(t)
			got := map[string]beit.Tensor[float32]{"last_hidden_state": out.LastHiddenState, "pooler_output": out.PoolerOutput, "logits": out.Logits}
			sizes := must(m.OutputSizes(s[0], s[2], s[3]))(t)
			sizeShapes := map[string][]int{"last_hidden_state": sizes.LastHiddenStateShape, "pooler_output": sizes.PoolerOutputShape, "logits": sizes.LogitsShape}
			compared := 0
			for k, want := range c.want {
				if got[k].Data == nil {
					t.Fatalf("no %s", k)
				}
				if r := worstRatio(t, got[k].Data, want); r > 1 {
					t.Errorf("%s: %.3fx the tolerance", k, r)
				}
				if !reflect.DeepEqual(got[k].Shape, c.wantShape[k]) || !reflect.DeepEqual(sizeShapes[k], c.wantShape[k]) {
					t.Errorf("%s: shape %v (OutputSizes %v), transformers %v", k, got[k].Shape, sizeShapes[k], c.wantShape[k])
				}
				compared++
			}
			for k, v := range got {
				if (v.Data != nil || v.Shape != nil || sizeShapes[k] != nil) && c.want[k] == nil {
					t.Errorf("we produce %s (%v), HF does not", k, v)
				}
			}
			if compared == 0 {
				t.Fatal("nothing compared")
			}
		})
	}
}

// Info and OutputSizes report the reference model's config; InferInto with reused buffers
// gives the same bits as Infer; Save + LoadModel round-trips bit-exactly.
func TestInfoInferIntoAndSave(t *testing.T) {
	ctx := newCPUContext(t)
	m := must(beit.LoadModel(ctx, refDir("reference", "mim_shared")))(t)
	defer m.Close()
	info := must(m.Info())(t)
	if info.Architecture != beit.ArchMaskedImageModeling || info.HiddenSize != 32 || info.NumPatches != 16 ||
		info.VocabSize != 64 || !info.HasMaskToken || info.NumChannels != 3 || info.NumParameters == 0 {
		t.Fatalf("info %+v", info)
	}
	sz := must(m.OutputSizes(2, 32, 32))(t)
	if sz.LastHiddenState != 2*17*32 || sz.Logits != 2*16*64 || sz.PoolerOutput != 0 || sz.NumTokens != 17 {
		t.Fatalf("sizes %+v", sz)
	}
	c := loadCase(t, "mim_shared")
	first := must(m.Infer(c.pixels, 2, 3, 32, 32, c.mask))(t)
	out := beit.Outputs{Logits: beit.Tensor[float32]{Data: make([]float32, sz.Logits)}} // only logits wanted
	for i := 0; i < 2; i++ {
		if err := m.InferInto(c.pixels, 2, 3, 32, 32, c.mask, &out); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(out.Logits, first.Logits) {
			t.Fatal("InferInto differs from Infer")
		}
		// Only the output written gets a shape.
		if out.LastHiddenState.Shape != nil || out.NumTokens != 17 || out.NumPatches != 16 {
			t.Fatalf("InferInto set %+v", out)
		}
	}
	dir := t.TempDir()
	if err := m.Save(dir); err != nil {
		t.Fatal(err)
	}
	m2 := must(beit.LoadModel(ctx, dir))(t)
	defer m2.Close()
	again := must(m2.Infer(c.pixels, 2, 3, 32, 32, c.mask))(t)
	if !reflect.DeepEqual(again, first) {
		t.Fatal("saved and reloaded model gives other outputs")
	}
}

// 16 goroutines share one Model (and Context), each running inference 4 times, on inputs of
// their own: every result equals the serial one bit for bit. Run under -race.
func TestConcurrentInference(t *testing.T) {
	ctx := newCPUContext(t)
	m := must(beit.LoadModel(ctx, refDir("reference", "mim_shared")))(t)
	defer m.Close()
	c := loadCase(t, "mim_shared")
	const G = 16
	inputs := make([][]float32, G)
	serial := make([]beit.Outputs, G)
	for g := range inputs {
		inputs[g] = make([]float32, len(c.pixels))
		for i, v := range c.pixels {
			inputs[g][i] = v * float32(1+g) / 8
		}
		serial[g] = must(m.Infer(inputs[g], 2, 3, 32, 32, c.mask))(t)
	}
	var wg sync.WaitGroup
	errs := make(chan error, G*4)
	for g := 0; g < G; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for k := 0; k < 4; k++ {
				out, err := m.Infer(inputs[g], 2, 3, 32, 32, c.mask)
				if err != nil {
					errs <- err
					return
				}
				if !reflect.DeepEqual(out, serial[g]) {
					errs <- errors.New("concurrent result differs from the serial one")
					return
				}
				// An error on another goroutine's thread must carry its own message.
				_, err = m.Infer(inputs[g][:10], 2, 3, 32, 32, nil)
				var be *beit.Error
				if !errors.As(err, &be) || be.Status != beit.StatusInvalidArgument || be.Message == "" {
					errs <- errors.New("concurrent error case: " + err.Error())
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// Every error is a *beit.Error with the right status and a message, matching its sentinel.
func TestInferErrors(t *testing.T) {
	ctx := newCPUContext(t)
	_, err := beit.LoadModel(ctx, filepath.Join(t.TempDir(), "missing"))
	wantErr(t, "missing model dir", err, beit.ErrIO)

	m := must(beit.LoadModel(ctx, refDir("reference", "mim_shared")))(t)
	c := loadCase(t, "mim_shared")
	_, err = m.Infer(c.pixels[:100], 2, 3, 32, 32, nil)
	wantErr(t, "short pixels", err, beit.ErrInvalidArgument)
	_, err = m.Infer(c.pixels, 2, 3, 32, 32, c.mask[:5])
	wantErr(t, "short mask", err, beit.ErrInvalidArgument)
	_, err = m.Infer(nil, 2, 3, 32, 32, nil)
	wantErr(t, "nil pixels", err, beit.ErrNullPointer)
	_, err = m.Infer(c.pixels, 2, 1, 32, 32, nil)
	wantErr(t, "wrong channels", err, beit.ErrInvalidArgument)
	_, err = m.Infer(c.pixels, 0, 3, 32, 32, nil)
	wantErr(t, "batch 0", err, beit.ErrInvalidArgument)
	_, err = m.Infer(c.pixels, -2, 3, 32, 32, nil)
	wantErr(t, "negative batch", err, beit.ErrInvalidArgument)
	bad := append([]uint8(nil), c.mask...)
	bad[3] = 7
	_, err = m.Infer(c.pixels, 2, 3, 32, 32, bad)
	wantErr(t, "mask value 7", err, beit.ErrInvalidArgument)

	out := beit.Outputs{Logits: beit.Tensor[float32]{Data: make([]float32, 10)}}
	err = m.InferInto(c.pixels, 2, 3, 32, 32, nil, &out)
	wantErr(t, "wrong output length", err, beit.ErrBufferSize)
	for _, v := range out.Logits.Data {
		if v != 0 {
			t.Fatal("an output was written on error")
		}
	}
	if out.Logits.Shape != nil {
		t.Fatal("a shape was set on error")
	}
	out = beit.Outputs{PoolerOutput: beit.Tensor[float32]{Data: make([]float32, 64)}}
	err = m.InferInto(c.pixels, 2, 3, 32, 32, nil, &out)
	wantErr(t, "an output the model lacks", err, beit.ErrInvalidArgument)

	// NaN pixels: beit_model_infer checks shapes, not values (unlike the tokenizer and the
	// trainer, tested elsewhere): the NaN propagates into image 0's outputs, no crash.
	nan := append([]float32(nil), c.pixels...)
	nan[0] = float32(math.NaN())
	res, err := m.Infer(nan, 2, 3, 32, 32, nil)
	if err != nil {
		wantErr(t, "NaN pixel", err, beit.ErrInvalidArgument)
	} else if !math.IsNaN(float64(res.LastHiddenState.Data[0])) {
		t.Error("NaN pixel accepted, yet image 0's outputs are not NaN")
	}

	// A closed model (and closing twice) is an error, never a crash.
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = m.Infer(c.pixels, 2, 3, 32, 32, nil)
	wantErr(t, "closed model Infer", err, beit.ErrClosed)
	wantErr(t, "closed model Infer", err, beit.ErrNullPointer)
	_, err = m.Info()
	wantErr(t, "closed model Info", err, beit.ErrClosed)
	if errors.Is(err, beit.ErrIO) {
		t.Error("ErrClosed matches ErrIO")
	}
	var nilModel *beit.Model
	_, err = nilModel.Info()
	wantErr(t, "nil model", err, beit.ErrClosed)

	// Bad context options; a closed context.
	_, err = beit.NewContext(&beit.ContextOptions{Device: 42})
	wantErr(t, "unknown device", err, beit.ErrInvalidArgument)
	ctx2 := must(beit.NewContext(nil))(t)
	ctx2.Close()
	_, err = beit.LoadModel(ctx2, refDir("reference", "mim_shared"))
	wantErr(t, "closed context", err, beit.ErrClosed)
}

// Closing a context while a model still uses it defers the C free: the model keeps working.
func TestContextClosedBeforeModel(t *testing.T) {
	ctx := must(beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU, Threads: 1}))(t)
	m := must(beit.LoadModel(ctx, refDir("reference", "mim_shared")))(t)
	ctx.Close()
	c := loadCase(t, "mim_shared")
	if _, err := m.Infer(c.pixels, 2, 3, 32, 32, c.mask); err != nil {
		t.Fatal(err)
	}
	m.Close()
}
