package beit_test

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// repo is the libbeit checkout this module lives in (bindings/go is two levels down).
var repo = filepath.Join("..", "..")

func refDir(parts ...string) string {
	return filepath.Join(append([]string{repo, "tests"}, parts...)...)
}

// tensor is one tensor of a safetensors file.
type tensor struct {
	dtype string
	shape []int
	data  []byte
}

// readSafetensors is a minimal safetensors reader: u64 LE header length, JSON header
// {name: {dtype, shape, data_offsets}}, then the data.
func readSafetensors(t *testing.T, path string) map[string]tensor {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 8 {
		t.Fatalf("%s: too short", path)
	}
	n := binary.LittleEndian.Uint64(b)
	if n > uint64(len(b)-8) {
		t.Fatalf("%s: header length %d past the end", path, n)
	}
	var header map[string]json.RawMessage
	if err := json.Unmarshal(b[8:8+n], &header); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	data := b[8+n:]
	out := map[string]tensor{}
	for name, raw := range header {
		if name == "__metadata__" {
			continue
		}
		var e struct {
			Dtype       string `json:"dtype"`
			Shape       []int  `json:"shape"`
			DataOffsets [2]int `json:"data_offsets"`
		}
		if err := json.Unmarshal(raw, &e); err != nil {
			t.Fatalf("%s %s: %v", path, name, err)
		}
		if e.DataOffsets[0] > e.DataOffsets[1] || e.DataOffsets[1] > len(data) {
			t.Fatalf("%s %s: bad offsets %v", path, name, e.DataOffsets)
		}
		out[name] = tensor{e.Dtype, e.Shape, data[e.DataOffsets[0]:e.DataOffsets[1]]}
	}
	return out
}

func (x tensor) f32(t *testing.T) []float32 {
	t.Helper()
	if x.dtype != "F32" {
		t.Fatalf("dtype %s, want F32", x.dtype)
	}
	v := make([]float32, len(x.data)/4)
	for i := range v {
		v[i] = math.Float32frombits(binary.LittleEndian.Uint32(x.data[4*i:]))
	}
	return v
}

func (x tensor) i64(t *testing.T) []int64 {
	t.Helper()
	if x.dtype != "I64" {
		t.Fatalf("dtype %s, want I64", x.dtype)
	}
	v := make([]int64, len(x.data)/8)
	for i := range v {
		v[i] = int64(binary.LittleEndian.Uint64(x.data[8*i:]))
	}
	return v
}

// worstRatio is the largest |got - want| / (1e-4 * max(1, |want|)): the Rust parity test's
// tolerance (tests/reference_parity.rs), as a ratio (<= 1 passes).
func worstRatio(t *testing.T, got, want []float32) float64 {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("length %d, want %d", len(got), len(want))
	}
	worst := 0.0
	for i := range got {
		d := math.Abs(float64(got[i]) - float64(want[i]))
		r := d / (1e-4 * math.Max(1, math.Abs(float64(want[i]))))
		if r > worst || math.IsNaN(r) {
			worst = r
		}
	}
	return worst
}

func newCPUContext(t *testing.T) *beit.Context {
	t.Helper()
	ctx, err := beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU, Threads: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ctx.Close() })
	return ctx
}

// wantErr checks that err is a *beit.Error with the status and a non-empty message, and
// that errors.Is matches the sentinel.
func wantErr(t *testing.T, what string, err error, sentinel *beit.Error) {
	t.Helper()
	var be *beit.Error
	if !errors.As(err, &be) {
		t.Errorf("%s: got %v (%T), want a *beit.Error %s", what, err, err, sentinel.Status)
		return
	}
	if be.Status != sentinel.Status || !errors.Is(err, sentinel) {
		t.Errorf("%s: status %s, want %s (%v)", what, be.Status, sentinel.Status, err)
	}
	if be.Message == "" {
		t.Errorf("%s: empty message", what)
	}
}

// must(f(...))(t) is f's value, or a fatal test error.
func must[T any](v T, err error) func(testing.TB) T {
	return func(t testing.TB) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// writeNpy writes a v1.0 .npy file of u8 with the given shape (C order).
func writeNpy(path string, descr string, shape []int, data []byte) error {
	shp := ""
	for _, d := range shape {
		shp += fmt.Sprintf("%d, ", d)
	}
	if len(shape) > 1 {
		shp = shp[:len(shp)-2]
	}
	header := fmt.Sprintf("{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, shp)
	// magic(6) + version(2) + len(2) + header + '\n', padded to a multiple of 64.
	total := 10 + len(header) + 1
	pad := (64 - total%64) % 64
	for i := 0; i < pad; i++ {
		header += " "
	}
	header += "\n"
	buf := append([]byte("\x93NUMPY\x01\x00"), byte(len(header)), byte(len(header)>>8))
	buf = append(buf, header...)
	buf = append(buf, data...)
	return os.WriteFile(path, buf, 0o644)
}
