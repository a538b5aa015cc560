package beit_test

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"testing"

	beit "github.com/libbeit/beit-go"
)

const (
	dN, dH, dW, dC = 10, 8, 8, 3
	dPix           = dH * dW * dC
)

func dPixel(i, k int) uint8 { return uint8((i*53 + k*29 + 7) % 256) }

// writeData writes 10 RGB 8x8 samples, label = index, 2x2 tokens, in two chunks.
func writeData(t *testing.T, path string) beit.DatasetInfo {
	t.Helper()
	w := must(beit.NewDatasetWriter(path, beit.DatasetSpec{Height: dH, Width: dW, Channels: dC, Labels: true,
		TokenGridH: 2, TokenGridW: 2}))(t)
	defer w.Close()
	s := beit.Samples{Count: dN, Pixels: make([]uint8, dN*dPix), Labels: make([]uint32, dN), Tokens: make([]uint16, dN*4)}
	for i := 0; i < dN; i++ {
		for k := 0; k < dPix; k++ {
			s.Pixels[i*dPix+k] = dPixel(i, k)
		}
		s.Labels[i] = uint32(i)
		for k := 0; k < 4; k++ {
			s.Tokens[i*4+k] = uint16((i*4 + k) % 32)
		}
	}
	first := beit.Samples{Count: 4, Pixels: s.Pixels[:4*dPix], Labels: s.Labels[:4], Tokens: s.Tokens[:16]}
	rest := beit.Samples{Count: 6, Pixels: s.Pixels[4*dPix:], Labels: s.Labels[4:], Tokens: s.Tokens[16:]}
	for _, c := range []beit.Samples{first, rest} {
		if err := w.Append(c); err != nil {
			t.Fatal(err)
		}
	}
	if n := must(w.Len())(t); n != dN {
		t.Fatalf("Len %d", n)
	}
	return must(w.Finish())(t)
}

// Samples appended in chunks read back exactly; refused appends append nothing; an
// abandoned writer leaves nothing behind.
func TestDatasetWriter(t *testing.T) {
	dir := t.TempDir()
	info := writeData(t, filepath.Join(dir, "d.beitds"))
	if info.Count != dN || info.Channels != dC || !info.HasLabels || !info.HasTokens {
		t.Fatalf("info %+v", info)
	}
	ds := must(beit.OpenDataset(filepath.Join(dir, "d.beitds")))(t)
	defer ds.Close()
	s := must(ds.Read(7))(t)
	for k := 0; k < dPix; k++ {
		if s.Pixels.Data[k] != dPixel(7, k) {
			t.Fatalf("pixel %d: %d", k, s.Pixels.Data[k])
		}
	}
	if s.Label != 7 || s.Tokens.Data[1] != 29 {
		t.Fatalf("label %d tokens %v", s.Label, s.Tokens.Data)
	}

	w := must(beit.NewDatasetWriter(filepath.Join(dir, "x.beitds"), beit.DatasetSpec{Height: 2, Width: 2, Channels: 1, Labels: true}))(t)
	err := w.Append(beit.Samples{Count: 2, Pixels: make([]uint8, 7), Labels: []uint32{1, 2}})
	if !errors.Is(err, beit.ErrInvalidArgument) {
		t.Fatalf("short pixels: %v", err)
	}
	if err := w.Append(beit.Samples{Count: 2, Pixels: make([]uint8, 8)}); !errors.Is(err, beit.ErrNullPointer) {
		t.Fatalf("missing labels: %v", err)
	}
	if n := must(w.Len())(t); n != 0 {
		t.Fatalf("refused appends appended %d", n)
	}
	if err := w.Append(beit.Samples{Count: 2, Pixels: make([]uint8, 8), Labels: []uint32{1, 2}}); err != nil {
		t.Fatal(err)
	}
	w.Close()
	if _, err := w.Len(); !errors.Is(err, beit.ErrClosed) {
		t.Fatalf("closed writer: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "x.beitds")); !os.IsNotExist(err) {
		t.Fatalf("an abandoned writer left its file: %v", err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("left behind: %v", entries)
	}
	if _, err := beit.NewDatasetWriter(filepath.Join(dir, "y.beitds"), beit.DatasetSpec{Width: 2, Channels: 1}); !errors.Is(err, beit.ErrInvalidArgument) {
		t.Fatalf("zero height: %v", err)
	}
}

// An IDX file written byte by byte imports as its pixels, padded; an output naming the input
// is refused.
func TestImportIDX(t *testing.T) {
	dir := t.TempDir()
	img := []byte{0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2, 10, 20, 30, 40}
	if err := os.WriteFile(filepath.Join(dir, "i.idx"), img, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "o.beitds")
	info := must(beit.Import(beit.ImportOptions{Format: beit.ImportIDX, Images: filepath.Join(dir, "i.idx"),
		Out: out, Height: 3, Width: 4}))(t)
	if info.Count != 2 || info.Height != 3 || info.Width != 4 || info.HasLabels {
		t.Fatalf("info %+v", info)
	}
	ds := must(beit.OpenDataset(out))(t)
	defer ds.Close()
	s := must(ds.Read(1))(t)
	want := []uint8{0, 0, 0, 0, 0, 30, 40, 0, 0, 0, 0, 0}
	for k := range want {
		if s.Pixels.Data[k] != want[k] {
			t.Fatalf("pixels %v, want %v", s.Pixels.Data, want)
		}
	}
	_, err := beit.Import(beit.ImportOptions{Format: beit.ImportIDX, Images: filepath.Join(dir, "i.idx"), Out: filepath.Join(dir, "i.idx")})
	var e *beit.Error
	if !errors.As(err, &e) || e.Status != beit.StatusInvalidArgument {
		t.Fatalf("out = images: %v", err)
	}
	if _, err := beit.Import(beit.ImportOptions{Format: 9, Out: out}); !errors.Is(err, beit.ErrInvalidArgument) {
		t.Fatalf("bad format: %v", err)
	}
	if beit.ImportImageFolder.String() != "image-folder" || beit.ImportFormat(9).String() != "ImportFormat(9)" {
		t.Fatal("ImportFormat.String")
	}
}

// With cached tokens view 1 is the whole image: every image equals (pixel/255 - 0.5)/0.5 of
// the sample its label names, its tokens that sample's; an epoch visits each sample once; the
// batches feed the trainer and a loader seeked to the trainer's position goes on identically.
func TestLoader(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "d.beitds")
	writeData(t, path)
	ctx := newCPUContext(t)
	opts := beit.LoaderOptions{BatchSize: 4, ImageHeight: 8, ImageWidth: 8, PatchHeight: 4, PatchWidth: 4,
		Tokens: beit.TokensCached, KeepLast: true, Seed: 3, Workers: 2}
	l := must(beit.NewLoader(ctx, path, opts))(t)
	defer l.Close()
	info := must(l.Info())(t)
	if info.BatchesPerEpoch != 3 || info.NumPatches != 4 || info.MaskedPatches != 2 || info.Tokens != beit.TokensCached {
		t.Fatalf("info %+v", info)
	}
	seen := map[int64]int{}
	for p := 0; p < 3; p++ {
		b := must(l.Next())(t)
		if b.Position != uint64(p) || (p == 2) != (b.Images == 2) || len(b.View1) != b.Images*dC*dH*dW {
			t.Fatalf("batch %d: images %d position %d", p, b.Images, b.Position)
		}
		for k, idx := range b.Labels {
			seen[idx]++
			for c := 0; c < dC; c++ {
				for q := 0; q < dH*dW; q++ {
					want := (float32(dPixel(int(idx), q*dC+c))*(1.0/255.0) - 0.5) / 0.5
					if got := b.View1[(k*dC+c)*dH*dW+q]; got != want {
						t.Fatalf("batch %d image %d (sample %d) c%d p%d: %v, want %v", p, k, idx, c, q, got, want)
					}
				}
			}
			for q := 0; q < 4; q++ {
				if b.Tokens[k*4+q] != (idx*4+int64(q))%32 {
					t.Fatalf("tokens of sample %d: %v", idx, b.Tokens[k*4:k*4+4])
				}
			}
		}
	}
	if len(seen) != dN {
		t.Fatalf("epoch visited %v", seen)
	}

	model := must(beit.NewModel(ctx, `{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
 "intermediate_size": 64, "image_size": 8, "patch_size": 4, "num_channels": 3, "vocab_size": 32, "use_mask_token": true}`,
		beit.ArchMaskedImageModeling, 1))(t)
	defer model.Close()
	tr := must(beit.NewTrainer(ctx, model, nil))(t)
	defer tr.Close()
	train := beit.LoaderOptions{BatchSize: 3, Model: model, Tokens: beit.TokensCached, Seed: 4}
	a := must(beit.NewLoader(ctx, path, train))(t)
	defer a.Close()
	for i := 0; i < 4; i++ {
		b := must(a.Next())(t)
		s := must(tr.Step(b.MIMBatch()))(t)
		if math.IsNaN(s.Loss) {
			t.Fatal("NaN loss")
		}
	}
	pos := must(tr.DataPosition())(t)
	next := must(a.Next())(t)
	resumed := must(beit.NewLoader(ctx, path, train))(t)
	defer resumed.Close()
	if err := resumed.Seek(pos); err != nil {
		t.Fatal(err)
	}
	got := must(resumed.Next())(t)
	if got.Position != 4 || got.Epoch != 1 || !equalF32(got.View1, next.View1) || !equalI64(got.Tokens, next.Tokens) {
		t.Fatalf("resumed batch differs (position %d epoch %d)", got.Position, got.Epoch)
	}
	if _, err := beit.NewLoader(ctx, path, beit.LoaderOptions{Model: model, Tokens: beit.TokenSource(7)}); !errors.Is(err, beit.ErrInvalidArgument) {
		t.Fatalf("bad token source: %v", err)
	}
	if _, err := beit.NewLoader(ctx, path, beit.LoaderOptions{Tokens: beit.TokensCached}); !errors.Is(err, beit.ErrInvalidArgument) {
		t.Fatalf("no sizes: %v", err)
	}
	if beit.TokensTokenizer.String() != "tokenizer" || beit.MaskingRandom.String() != "random" {
		t.Fatal("String")
	}
}

func equalF32(a, b []float32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func equalI64(a, b []int64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// Two generators with one seed draw the same masks; counts stay in bounds; random masking
// is exact; bad options are refused.
func TestMaskGenerator(t *testing.T) {
	opts := beit.MaskGeneratorOptions{GridHeight: 14, GridWidth: 14, Seed: 5}
	a := must(beit.NewMaskGenerator(opts))(t)
	defer a.Close()
	b := must(beit.NewMaskGenerator(opts))(t)
	defer b.Close()
	for r := 0; r < 30; r++ {
		ma, ca, err := a.Next()
		if err != nil {
			t.Fatal(err)
		}
		mb, cb, _ := b.Next()
		ones := 0
		for k := range ma {
			if ma[k] != mb[k] {
				t.Fatalf("draw %d differs", r)
			}
			ones += int(ma[k])
		}
		if ca != cb || ones != ca || ca > 75 || ca < 1 {
			t.Fatalf("draw %d: counts %d %d ones %d", r, ca, cb, ones)
		}
	}
	rnd := must(beit.NewMaskGenerator(beit.MaskGeneratorOptions{GridHeight: 6, GridWidth: 9, MaskedPatches: 20, Strategy: beit.MaskingRandom}))(t)
	defer rnd.Close()
	if _, n, _ := rnd.Next(); n != 20 {
		t.Fatalf("random count %d", n)
	}
	if _, err := beit.NewMaskGenerator(beit.MaskGeneratorOptions{GridHeight: 4, GridWidth: 4, MaskedPatches: 16}); !errors.Is(err, beit.ErrInvalidArgument) {
		t.Fatalf("all masked: %v", err)
	}
	a.Close()
	if _, _, err := a.Next(); !errors.Is(err, beit.ErrClosed) {
		t.Fatalf("closed: %v", err)
	}
}
