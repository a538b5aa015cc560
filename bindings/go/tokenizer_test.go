package beit_test

import (
	"math"
	"reflect"
	"sync"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// The reference DALL-E-style tokenizer: PyTorch's mapped pixels (0.8x+0.1), unmapped to
// [0, 1], tokenize to exactly PyTorch's int64 tokens; also from 4 goroutines at once.
func TestTokenizerMatchesPyTorch(t *testing.T) {
	ctx := newCPUContext(t)
	dir := refDir("reference_dvae", "dalle_small")
	tok := must(beit.LoadTokenizer(ctx, dir))(t)
	defer tok.Close()
	info := must(tok.Info())(t)
	if info.InChannels != 3 || info.ImageSize != 32 || info.VocabSize != 96 || info.TokensPerImage != 16 ||
		info.GridH*info.GridW != 16 {
		t.Fatalf("info %+v", info)
	}
	io := readSafetensors(t, dir+"/io.safetensors")
	mapped := io["mapped_pixels"].f32(t)
	want := io["tokens"].i64(t)
	pixels := make([]float32, len(mapped))
	for i, v := range mapped {
		pixels[i] = (v - 0.1) / 0.8
	}
	got := must(tok.Tokenize(pixels, 4))(t)
	if !reflect.DeepEqual(got.Data, want) {
		t.Fatalf("tokens\n got %v\nwant %v", got.Data, want)
	}
	if !reflect.DeepEqual(got.Shape, io["tokens"].shape) {
		t.Fatalf("tokens shape %v, PyTorch's %v", got.Shape, io["tokens"].shape)
	}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			again, err := tok.Tokenize(pixels, 4)
			if err != nil || !reflect.DeepEqual(again.Data, want) {
				t.Errorf("concurrent tokenize: %v", err)
			}
		}()
	}
	wg.Wait()

	// Error cases.
	_, err := tok.Tokenize(pixels[:100], 4)
	wantErr(t, "short pixels", err, beit.ErrInvalidArgument)
	nan := append([]float32(nil), pixels...)
	nan[5] = float32(math.NaN())
	_, err = tok.Tokenize(nan, 4)
	wantErr(t, "NaN pixel", err, beit.ErrInvalidArgument)
	_, err = tok.Tokenize(pixels, 0)
	wantErr(t, "batch 0", err, beit.ErrInvalidArgument)
	if !info.HasDecoder {
		_, err = tok.Decode(want, 4)
		wantErr(t, "decode without decoder", err, beit.ErrInvalidArgument)
	}
	_, err = beit.LoadTokenizer(ctx, t.TempDir())
	wantErr(t, "missing tokenizer files", err, beit.ErrIO)
	tok.Close()
	_, err = tok.Tokenize(pixels, 4)
	wantErr(t, "closed tokenizer", err, beit.ErrClosed)
}
