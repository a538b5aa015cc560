package beit_test

import (
	"os"
	"os/exec"
	"path/filepath"
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
		if string(s.Pixels) != string(px[i*H*W*C:(i+1)*H*W*C]) {
			t.Errorf("sample %d: pixels differ", i)
		}
		if !s.HasLabel || s.Label != uint32(labels[i]) || s.Mask != nil || s.Tokens != nil {
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
