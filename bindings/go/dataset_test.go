package beit_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// A dataset made by `beit dataset import --format npy` from .npy files this test writes
// reads back, through Go, the same pixels and labels.
func TestDatasetFromNpyImport(t *testing.T) {
	bin := filepath.Join(repo, "target", "release", "beit")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s: %v (run cargo build --release)", bin, err)
	}
	const N, H, W, C = 5, 6, 4, 3
	dir := t.TempDir()
	px := make([]byte, N*H*W*C)
	for i := range px {
		px[i] = byte(i*7 + i/13)
	}
	labels := []byte{3, 1, 4, 1, 5}
	if err := writeNpy(filepath.Join(dir, "x.npy"), "|u1", []int{N, H, W, C}, px); err != nil {
		t.Fatal(err)
	}
	if err := writeNpy(filepath.Join(dir, "y.npy"), "|u1", []int{N}, labels); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "d.beitds")
	cmd := exec.Command(bin, "dataset", "import", "--format", "npy", "--images", filepath.Join(dir, "x.npy"),
		"--labels", filepath.Join(dir, "y.npy"), "--out", out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("beit dataset import: %v\n%s", err, b)
	}
	ds := must(beit.OpenDataset(out))(t)
	defer ds.Close()
	info := must(ds.Info())(t)
	if ds.Len() != N || info.Height != H || info.Width != W || info.Channels != C || !info.HasLabels ||
		info.HasMasks || info.HasTokens || info.PixelsLen != H*W*C {
		t.Fatalf("info %+v", info)
	}
	for i := 0; i < N; i++ {
		s := must(ds.Read(i))(t)
		if string(s.Pixels.Data) != string(px[i*H*W*C:(i+1)*H*W*C]) {
			t.Errorf("sample %d: pixels differ", i)
		}
		// The shape of the .npy images, less the sample axis.
		if !reflect.DeepEqual(s.Pixels.Shape, []int{H, W, C}) {
			t.Errorf("sample %d: pixels shape %v, want [%d %d %d]", i, s.Pixels.Shape, H, W, C)
		}
		if !s.HasLabel || s.Label != uint32(labels[i]) || s.Mask.Data != nil || s.Mask.Shape != nil || s.Tokens.Data != nil {
			t.Errorf("sample %d: %+v", i, s)
		}
	}
	_, err := ds.Read(N)
	wantErr(t, "index past the end", err, beit.ErrInvalidArgument)
	_, err = ds.Read(-1)
	wantErr(t, "negative index", err, beit.ErrInvalidArgument)
	_, err = beit.OpenDataset(filepath.Join(dir, "missing.beitds"))
	wantErr(t, "missing file", err, beit.ErrIO)
	_, err = beit.OpenDataset(filepath.Join(dir, "x.npy"))
	wantErr(t, "not a dataset", err, beit.ErrFormat)
	ds.Close()
	_, err = ds.Read(0)
	wantErr(t, "closed dataset", err, beit.ErrClosed)
	if ds.Len() != 0 {
		t.Error("closed dataset has a length")
	}
}

// A token cache (`beit tokenize` over an imported dataset) reads back through Go with each
// sample's tokens shaped as the tokenizer's grid [GridH, GridW], holding the tokens the Go
// Tokenizer gives for the same image (its pixels / 255).
func TestDatasetTokensShape(t *testing.T) {
	bin := filepath.Join(repo, "target", "release", "beit")
	const N, S = 3, 8 // tests/reference_dvae/grad_tiny: 1 channel, 8x8 images
	dir := t.TempDir()
	px := make([]byte, N*S*S)
	for i := range px {
		px[i] = byte(i * 37)
	}
	if err := writeNpy(filepath.Join(dir, "x.npy"), "|u1", []int{N, S, S}, px); err != nil {
		t.Fatal(err)
	}
	images, cache := filepath.Join(dir, "x.beitds"), filepath.Join(dir, "tokens.beitds")
	tokDir := refDir("reference_dvae", "grad_tiny")
	for _, args := range [][]string{
		{"dataset", "import", "--format", "npy", "--images", filepath.Join(dir, "x.npy"), "--out", images},
		{"tokenize", "--tokenizer", tokDir, "--data", images, "--out", cache},
	} {
		if b, err := exec.Command(bin, args...).CombinedOutput(); err != nil {
			t.Fatalf("beit %v: %v\n%s", args, err, b)
		}
	}
	ctx := newCPUContext(t)
	tok := must(beit.LoadTokenizer(ctx, tokDir))(t)
	defer tok.Close()
	ti := must(tok.Info())(t)
	ds := must(beit.OpenDataset(cache))(t)
	defer ds.Close()
	for i := 0; i < N; i++ {
		s := must(ds.Read(i))(t)
		if !reflect.DeepEqual(s.Tokens.Shape, []int{ti.GridH, ti.GridW}) {
			t.Fatalf("sample %d: tokens shape %v, want the grid [%d %d]", i, s.Tokens.Shape, ti.GridH, ti.GridW)
		}
		img := make([]float32, S*S)
		for k, v := range s.Pixels.Data {
			img[k] = float32(v) / 255
		}
		want := must(tok.Tokenize(img, 1))(t)
		for k, v := range want.Data {
			if int64(s.Tokens.Data[k]) != v {
				t.Fatalf("sample %d: cached tokens %v, Tokenize %v", i, s.Tokens.Data, want.Data)
			}
		}
	}
}
