package beit_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

var (
	dvaeConfig  = beit.DvaeConfig{InChannels: 1, ImageSize: 8, VocabSize: 16, NHid: 8, GroupCount: 2, BlocksPerGroup: 1, DecoderWidth: 8}
	dvaeOptions = beit.DvaeTrainOptions{LR: 2e-3, KLWeight: 0.01, TauStart: 0.9, TauEnd: 0.2, TotalSteps: 7, Seed: 11}
	dvaeData    = beit.DvaeDataOptions{Batch: 5, CropScaleMin: 0.4, Workers: 2, Seed: 11}
)

func beitCLI(t *testing.T) string {
	bin := filepath.Join(repo, "target", "release", "beit")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s: %v (run cargo build --release)", bin, err)
	}
	return bin
}

// dvaeDataset writes 24 grey 12x12 images as a dataset file (through `beit dataset import`).
func dvaeDataset(t *testing.T, dir string) string {
	px := make([]byte, 24*12*12)
	for i := range px {
		px[i] = byte(i*29 + (i/144)*83 + (i/12)*7)
	}
	if err := writeNpy(filepath.Join(dir, "x.npy"), "|u1", []int{24, 12, 12}, px); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "train.beitds")
	cmd := exec.Command(beitCLI(t), "dataset", "import", "--format", "npy", "--images", filepath.Join(dir, "x.npy"), "--out", out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("beit dataset import: %v\n%s", err, b)
	}
	return out
}

func tokenizerFiles(t *testing.T, dir string) [2][]byte {
	var out [2][]byte
	for i, name := range []string{"config.json", "model.safetensors"} {
		out[i] = must(os.ReadFile(filepath.Join(dir, name)))(t)
	}
	return out
}

// Train writes, byte for byte, the tokenizer `beit tokenizer train` writes with the same data,
// options and seed, and reports the losses it logs; a run stopped by its progress function and
// resumed writes it too.
func TestDvaeTrainEqualsTheCLI(t *testing.T) {
	dir := t.TempDir()
	data := dvaeDataset(t, dir)
	cmd := exec.Command(beitCLI(t), "tokenizer", "train", "--data", data, "--out", filepath.Join(dir, "cli"),
		"--image-size", "8", "--vocab", "16", "--n-hid", "8", "--groups", "2", "--blocks-per-group", "1",
		"--decoder-width", "8", "--steps", "7", "--batch", "5", "--lr", "2e-3", "--kl-weight", "0.01",
		"--tau-start", "0.9", "--tau-end", "0.2", "--crop-scale-min", "0.4", "--seed", "11", "--eval-images", "4",
		"--log-every", "1", "--json", "--threads", "2")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("beit tokenizer train: %v\n%s", err, stderr.String())
	}
	var cliLosses []float64
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		var l struct {
			Step *int     `json:"step"`
			Loss *float64 `json:"loss"`
		}
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatal(err)
		}
		if l.Step != nil && l.Loss != nil {
			cliLosses = append(cliLosses, *l.Loss)
		}
	}
	ctx := newCPUContext(t)
	tr := must(beit.NewDvaeTrainer(ctx, &dvaeConfig, &dvaeOptions))(t)
	defer tr.Close()
	var losses []float64
	sum := must(tr.Train(data, &dvaeData, func(s beit.DvaeStepStats) bool {
		if s.Step != uint64(len(losses)+1) {
			t.Errorf("progress step %d after %d calls", s.Step, len(losses))
		}
		losses = append(losses, s.Loss)
		return false
	}))(t)
	if sum.Steps != 7 || sum.Stopped || len(losses) != 7 || len(cliLosses) != 7 {
		t.Fatalf("summary %+v, %d losses, %d CLI losses", sum, len(losses), len(cliLosses))
	}
	for i := range losses {
		if losses[i] != cliLosses[i] {
			t.Errorf("step %d: loss %v, the CLI logged %v", i+1, losses[i], cliLosses[i])
		}
	}
	must(0, tr.Save(filepath.Join(dir, "go")))(t)
	if !equalFiles(tokenizerFiles(t, filepath.Join(dir, "go")), tokenizerFiles(t, filepath.Join(dir, "cli"))) {
		t.Fatal("the Go trainer's tokenizer differs from the CLI's")
	}

	resumed := must(beit.NewDvaeTrainer(ctx, &dvaeConfig, &dvaeOptions))(t)
	defer resumed.Close()
	first := dvaeData
	first.Steps = 6
	sum = must(resumed.Train(data, &first, func(s beit.DvaeStepStats) bool { return s.Step == 2 }))(t)
	if sum.Steps != 2 || !sum.Stopped {
		t.Fatalf("stopped run: %+v", sum)
	}
	if sum = must(resumed.Train(data, &dvaeData, nil))(t); sum.Steps != 5 {
		t.Fatalf("the rest: %+v", sum)
	}
	must(0, resumed.Save(filepath.Join(dir, "resumed")))(t)
	if !equalFiles(tokenizerFiles(t, filepath.Join(dir, "resumed")), tokenizerFiles(t, filepath.Join(dir, "cli"))) {
		t.Fatal("a stopped and resumed run differs from the CLI's")
	}
}

func equalFiles(a, b [2][]byte) bool { return bytes.Equal(a[0], b[0]) && bytes.Equal(a[1], b[1]) }

func mappedBatch(batch, seed int) []float32 {
	px := make([]float32, batch*64)
	for i := range px {
		px[i] = float32((i*37+seed*11)%97) / 96
	}
	return beit.MapPixels(px)
}

// Host steps report what a first step must; the tokenizer copy tokenizes as the saved
// directory does and stays as it was; a loaded trainer saves the files it loaded.
func TestDvaeStepsAndTokenizerCopy(t *testing.T) {
	dir := t.TempDir()
	ctx := newCPUContext(t)
	tr := must(beit.NewDvaeTrainer(ctx, &dvaeConfig, &dvaeOptions))(t)
	defer tr.Close()
	info := must(tr.Info())(t)
	if info.InChannels != 1 || info.ImageSize != 8 || info.VocabSize != 16 || info.GridH != 4 || !info.HasDecoder {
		t.Fatalf("info %+v", info)
	}
	s := must(tr.Step(mappedBatch(3, 0), 3))(t)
	// Step 0: the starting temperature, the peak rate after a 1-step warmup, KL weight 0.
	if s.Step != 1 || s.Tau != float64(float32(0.9)) || s.LR != float64(float32(2e-3)) || s.Loss != s.ReconMSE {
		t.Fatalf("first step %+v", s)
	}
	must(0, tr.Save(filepath.Join(dir, "tok")))(t)
	cp := must(tr.Tokenizer())(t)
	defer cp.Close()
	saved := must(beit.LoadTokenizer(ctx, filepath.Join(dir, "tok")))(t)
	defer saved.Close()
	plain := make([]float32, 4*64)
	for i := range plain {
		plain[i] = float32(i*13%50) / 49
	}
	want := must(saved.Tokenize(plain, 4))(t)
	if got := must(cp.Tokenize(plain, 4))(t); !equalInt64(got.Data, want.Data) {
		t.Fatal("the tokenizer copy differs from the saved tokenizer")
	}
	for k := 0; k < 3; k++ {
		must(tr.Step(mappedBatch(3, k+1), 3))(t)
	}
	if got := must(cp.Tokenize(plain, 4))(t); !equalInt64(got.Data, want.Data) {
		t.Fatal("the tokenizer copy changed with the trainer")
	}
	if n := must(tr.StepCount())(t); n != 4 {
		t.Fatalf("StepCount %d", n)
	}
	loaded := must(beit.LoadDvaeTrainer(ctx, filepath.Join(dir, "tok"), &dvaeOptions))(t)
	defer loaded.Close()
	must(0, loaded.Save(filepath.Join(dir, "again")))(t)
	if !equalFiles(tokenizerFiles(t, filepath.Join(dir, "again")), tokenizerFiles(t, filepath.Join(dir, "tok"))) {
		t.Fatal("a loaded trainer saves other files")
	}
}

func equalInt64(a, b []int64) bool {
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

// A progress function that panics stops the run; Train panics with its value afterwards.
func TestDvaeProgressPanicComesThrough(t *testing.T) {
	dir := t.TempDir()
	data := dvaeDataset(t, dir)
	tr := must(beit.NewDvaeTrainer(newCPUContext(t), &dvaeConfig, &dvaeOptions))(t)
	defer tr.Close()
	func() {
		defer func() {
			if r := recover(); r != "stop at 2" {
				t.Fatalf("recovered %v", r)
			}
		}()
		opts := dvaeData
		opts.Steps = 5
		_, _ = tr.Train(data, &opts, func(s beit.DvaeStepStats) bool {
			if s.Step == 2 {
				panic("stop at 2")
			}
			return false
		})
		t.Fatal("Train did not panic")
	}()
	if n := must(tr.StepCount())(t); n != 2 {
		t.Fatalf("StepCount %d after the panic at step 2", n)
	}
}

// Zero values are the defaults; bad values, files and closed trainers are errors; a failed
// save leaves the old files.
func TestDvaeErrors(t *testing.T) {
	dir := t.TempDir()
	ctx := newCPUContext(t)
	def := must(beit.NewDvaeTrainer(ctx, nil, nil))(t)
	info := must(def.Info())(t)
	if info.ImageSize != 32 || info.VocabSize != 8192 || info.GridH != 8 {
		t.Fatalf("defaults %+v", info)
	}
	def.Close()
	bad := dvaeConfig
	bad.NHid = 6
	_, err := beit.NewDvaeTrainer(ctx, &bad, &dvaeOptions)
	wantErr(t, "n_hid 6", err, beit.ErrInvalidArgument)
	badOpts := dvaeOptions
	badOpts.TauEnd = -1
	_, err = beit.NewDvaeTrainer(ctx, &dvaeConfig, &badOpts)
	wantErr(t, "negative tau_end", err, beit.ErrInvalidArgument)
	_, err = beit.LoadDvaeTrainer(ctx, refDir("reference_dvae", "dalle_small"), nil)
	wantErr(t, "no decoder", err, beit.ErrInvalidArgument)
	_, err = beit.LoadDvaeTrainer(ctx, filepath.Join(dir, "missing"), nil)
	wantErr(t, "missing directory", err, beit.ErrIO)

	tr := must(beit.NewDvaeTrainer(ctx, &dvaeConfig, &dvaeOptions))(t)
	_, err = tr.Step(mappedBatch(2, 0)[:127], 2)
	wantErr(t, "short pixels", err, beit.ErrInvalidArgument)
	_, err = tr.Step(nil, 2)
	wantErr(t, "nil pixels", err, beit.ErrNullPointer)
	_, err = tr.Train(filepath.Join(dir, "missing.beitds"), &dvaeData, nil)
	wantErr(t, "missing dataset", err, beit.ErrIO)
	data := dvaeDataset(t, dir)
	tooBig := dvaeData
	tooBig.Batch = 25
	_, err = tr.Train(data, &tooBig, nil)
	wantErr(t, "batch larger than the dataset", err, beit.ErrInvalidArgument)
	negative := dvaeData
	negative.Workers = -1
	_, err = tr.Train(data, &negative, nil)
	wantErr(t, "negative workers", err, beit.ErrInvalidArgument)

	kept := filepath.Join(dir, "kept")
	must(0, tr.Save(kept))(t)
	oldConfig := must(os.ReadFile(filepath.Join(kept, "config.json")))(t)
	must(0, os.Remove(filepath.Join(kept, "model.safetensors")))(t)
	must(0, os.MkdirAll(filepath.Join(kept, "model.safetensors", "x"), 0o755))(t)
	must(tr.Step(mappedBatch(1, 3), 1))(t)
	wantErr(t, "save over a directory", tr.Save(kept), beit.ErrIO)
	if got := must(os.ReadFile(filepath.Join(kept, "config.json")))(t); !bytes.Equal(got, oldConfig) {
		t.Fatal("a failed save replaced config.json")
	}
	if entries := must(os.ReadDir(kept))(t); len(entries) != 2 {
		t.Fatalf("a failed save left %d entries", len(entries))
	}
	tr.Close()
	_, err = tr.StepCount()
	wantErr(t, "closed trainer", err, beit.ErrClosed)
	_, err = tr.Train(data, nil, nil)
	wantErr(t, "closed trainer", err, beit.ErrClosed)
}
