package beit_test

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// stepStats runs n steps of a fresh trainer (tinyConfig with cfgExtra merged in, init seed 1)
// on fixedBatch and returns their stats without the timings.
func stepStats(t *testing.T, ctx *beit.Context, cfgExtra string, opts *beit.TrainerOptions, n int) []beit.StepStats {
	t.Helper()
	cfg := tinyConfig
	if cfgExtra != "" {
		cfg = strings.TrimSuffix(strings.TrimSpace(cfg), "}") + ", " + cfgExtra + "}"
	}
	tr := must(beit.NewTrainerFromConfig(ctx, cfg, 1, opts))(t)
	defer tr.Close()
	var out []beit.StepStats
	for i := 0; i < n; i++ {
		s := must(tr.Step(fixedBatch()))(t)
		s.Seconds, s.ImagesPerS = 0, 0
		out = append(out, s)
	}
	return out
}

// The zero value of every TrainerOptions field is the library's default: a struct setting one
// field changes that field alone (TrainerOptions{LearningRate: 1e-3} used to send eps 0 and
// be refused), and nil, TrainerOptions{} and DefaultTrainerOptions() train identically.
func TestTrainerOptionsZeroValueIsDefault(t *testing.T) {
	ctx := newCPUContext(t)
	// The documented defaults (beit.h: BEiT's pretraining recipe), in Go's convention.
	want := beit.TrainerOptions{LearningRate: 1.5e-3, MinLearningRate: 1e-5, WeightDecay: 0.05, Beta1: 0.9,
		Beta2: 0.98, Eps: 1e-8, ClipGradNorm: 3, DropPathRate: 0, LayerDecay: 1}
	if got := beit.DefaultTrainerOptions(); got != want {
		t.Fatalf("DefaultTrainerOptions() = %+v, want %+v", got, want)
	}

	lr := stepStats(t, ctx, "", &beit.TrainerOptions{LearningRate: 1e-3}, 2)
	if lr[0].LR != 1e-3 || lr[1].LR != 1e-3 {
		t.Fatalf("LearningRate 1e-3 stepped at %v, %v", lr[0].LR, lr[1].LR)
	}
	defaults := beit.DefaultTrainerOptions()
	ref := stepStats(t, ctx, "", nil, 3)
	if ref[0].LR != 1.5e-3 {
		t.Fatalf("default learning rate %v", ref[0].LR)
	}
	for name, o := range map[string]*beit.TrainerOptions{"TrainerOptions{}": {}, "DefaultTrainerOptions()": &defaults} {
		if got := stepStats(t, ctx, "", o, 3); !reflect.DeepEqual(got, ref) {
			t.Errorf("%s trains as %+v, nil options as %+v", name, got, ref)
		}
	}
}

// Zero asks for 0 where the zero value means the default; each case is checked against a
// setting whose effect is provably the same (or a hand-derived learning rate), and against the
// default, which must differ.
func TestTrainerOptionsZero(t *testing.T) {
	ctx := newCPUContext(t)

	// MinLearningRate: a 2-step cosine from 1e-3 ends its step 2 at min + (1e-3 - min)/2 (up to
	// cos(pi/2) ~ 6e-17): 5e-4 with Zero, 5.05e-4 with the default 1e-5.
	half := 0.5 * (1 + math.Cos(math.Pi/2))
	for _, c := range []struct{ min, want float64 }{{beit.Zero, 1e-3 * half}, {0, 1e-5 + (1e-3-1e-5)*half}} {
		s := stepStats(t, ctx, "", &beit.TrainerOptions{LearningRate: 1e-3, TotalSteps: 2, MinLearningRate: c.min}, 2)
		if math.Abs(s[1].LR-c.want) > 1e-18 {
			t.Errorf("MinLearningRate %v: step 2 at lr %v, want %v", c.min, s[1].LR, c.want)
		}
	}

	// WeightDecay: Zero trains exactly as a decay too small to change any f32 weight.
	none := stepStats(t, ctx, "", &beit.TrainerOptions{WeightDecay: beit.Zero}, 3)
	if tiny := stepStats(t, ctx, "", &beit.TrainerOptions{WeightDecay: 1e-300}, 3); !reflect.DeepEqual(none, tiny) {
		t.Errorf("WeightDecay Zero %+v, 1e-300 %+v", none, tiny)
	}
	if def := stepStats(t, ctx, "", nil, 3); reflect.DeepEqual(none, def) {
		t.Error("WeightDecay Zero trains as the default 0.05")
	}

	// ClipGradNorm: Zero (no clipping) trains as a bound no gradient reaches, and not as the
	// default bound 3, which this run's step 3 (gradient norm ~73) exceeds.
	hot := beit.TrainerOptions{LearningRate: 5e-2}
	noClip, huge := hot, hot
	noClip.ClipGradNorm, huge.ClipGradNorm = beit.Zero, 1e300
	a := stepStats(t, ctx, "", &noClip, 5)
	if a[2].GradNorm <= 3 {
		t.Fatalf("step 3's gradient norm %v does not exceed the default bound: the test proves nothing", a[2].GradNorm)
	}
	if b := stepStats(t, ctx, "", &huge, 5); !reflect.DeepEqual(a, b) {
		t.Errorf("ClipGradNorm Zero %+v, 1e300 %+v", a, b)
	}
	if c := stepStats(t, ctx, "", &hot, 5); reflect.DeepEqual(a, c) {
		t.Error("ClipGradNorm Zero trains as clipping at the default 3")
	}

	// DropPathRate: Zero overrides the config's rate with 0, as a config saying 0 does; 0 (the
	// default) takes the config's 0.5.
	zero := stepStats(t, ctx, `"drop_path_rate": 0.5`, &beit.TrainerOptions{DropPathRate: beit.Zero}, 3)
	if cfg0 := stepStats(t, ctx, `"drop_path_rate": 0.0`, nil, 3); !reflect.DeepEqual(zero, cfg0) {
		t.Errorf("DropPathRate Zero %+v, config 0 %+v", zero, cfg0)
	}
	if cfgRate := stepStats(t, ctx, `"drop_path_rate": 0.5`, nil, 3); reflect.DeepEqual(zero, cfgRate) {
		t.Error("DropPathRate Zero trains with the config's 0.5")
	}

	// Out of range stays out of range: the library names the field.
	for field, o := range map[string]beit.TrainerOptions{
		"eps":          {Eps: beit.Zero},
		"weight_decay": {WeightDecay: -0.5},
		"layer_decay":  {LayerDecay: beit.Zero},
	} {
		_, err := beit.NewTrainerFromConfig(ctx, tinyConfig, 1, &o)
		wantErr(t, field, err, beit.ErrInvalidArgument)
		if err != nil && !strings.Contains(err.Error(), field) {
			t.Errorf("%+v: error %q does not name %s", o, err, field)
		}
	}
}

// Every enum prints its name (as the CLI and config.json spell it), unknown values their number.
func TestEnumStrings(t *testing.T) {
	for _, c := range []struct {
		v    fmt.Stringer
		want string
	}{
		{beit.DeviceAuto, "auto"}, {beit.DeviceCPU, "cpu"}, {beit.DeviceCUDA, "cuda"}, {beit.Device(9), "Device(9)"},
		{beit.ArchBackbone, "BeitModel"}, {beit.ArchMaskedImageModeling, "BeitForMaskedImageModeling"},
		{beit.ArchImageClassification, "BeitForImageClassification"},
		{beit.ArchSemanticSegmentation, "BeitForSemanticSegmentation"}, {beit.Architecture(7), "Architecture(7)"},
		{beit.WeightDecayBEiT, "beit"}, {beit.WeightDecayAll, "all"}, {beit.WeightDecayOn(5), "WeightDecayOn(5)"},
		{beit.StatusBufferSize, "BEIT_ERR_BUFFER_SIZE"},
	} {
		if got := c.v.String(); got != c.want {
			t.Errorf("%#v.String() = %q, want %q", c.v, got, c.want)
		}
		if got := fmt.Sprint(c.v); got != c.want {
			t.Errorf("fmt.Sprint(%#v) = %q, want %q", c.v, got, c.want)
		}
	}
	// The names are those the library takes: each reference model's config.json says its
	// class, and Info reports the same one.
	ctx := newCPUContext(t)
	for dir, arch := range map[string]beit.Architecture{
		"reference/mim_shared": beit.ArchMaskedImageModeling, "reference/cls_all_pos_cls": beit.ArchImageClassification,
		"reference/backbone_abs_mean": beit.ArchBackbone, "reference_segmentation/aux_concat_32": beit.ArchSemanticSegmentation,
	} {
		var cfg struct{ Architectures []string }
		raw := must(os.ReadFile(refDir(dir, "config.json")))(t)
		if err := json.Unmarshal(raw, &cfg); err != nil || len(cfg.Architectures) != 1 {
			t.Fatalf("%s: architectures %v (%v)", dir, cfg.Architectures, err)
		}
		m := must(beit.LoadModel(ctx, refDir(dir)))(t)
		info := must(m.Info())(t)
		m.Close()
		if info.Architecture != arch || info.Architecture.String() != cfg.Architectures[0] {
			t.Errorf("%s: %v, config.json says %s", dir, info.Architecture, cfg.Architectures[0])
		}
	}
}

// ProbeDevice reports what `beit info` reports, field by field (the CLI reads the same probe
// through the Rust API and prints JSON).
func TestProbeDeviceMatchesCLI(t *testing.T) {
	info := must(beit.ProbeDevice())(t)
	raw, err := exec.Command(filepath.Join(repo, "target", "release", "beit"), "info").Output()
	if err != nil {
		t.Fatalf("beit info: %v", err)
	}
	var cli struct {
		Device            string  `json:"device"`
		CUDAUsable        bool    `json:"cuda_usable"`
		Reason            string  `json:"reason"`
		DriverCUDAVersion *string `json:"driver_cuda_version"`
		DeviceCount       int     `json:"device_count"`
		GPU               *struct {
			Name              string `json:"name"`
			ComputeCapability string `json:"compute_capability"`
			TotalMemoryBytes  uint64 `json:"total_memory_bytes"`
		} `json:"gpu"`
	}
	if err := json.Unmarshal(raw, &cli); err != nil {
		t.Fatalf("beit info: %v\n%s", err, raw)
	}
	if info.Kind.String() != cli.Device || info.CUDAUsable != cli.CUDAUsable || info.DeviceCount != cli.DeviceCount {
		t.Errorf("kind %v usable %v count %d; beit info: %s %v %d", info.Kind, info.CUDAUsable, info.DeviceCount,
			cli.Device, cli.CUDAUsable, cli.DeviceCount)
	}
	if want := map[bool]beit.Device{true: beit.DeviceCUDA, false: beit.DeviceCPU}[info.CUDAUsable]; info.Kind != want {
		t.Errorf("auto picks %v with CUDA usable %v", info.Kind, info.CUDAUsable)
	}
	// The C struct holds the reason truncated to its buffer.
	if info.Reason == "" || !strings.HasPrefix(cli.Reason, info.Reason) {
		t.Errorf("reason %q; beit info: %q", info.Reason, cli.Reason)
	}
	driver := ""
	if info.DriverVersion > 0 {
		driver = fmt.Sprintf("%d.%d", info.DriverVersion/1000, info.DriverVersion%1000/10)
	}
	if cli.DriverCUDAVersion == nil && driver != "" || cli.DriverCUDAVersion != nil && *cli.DriverCUDAVersion != driver {
		t.Errorf("driver version %d; beit info: %v", info.DriverVersion, cli.DriverCUDAVersion)
	}
	if cli.GPU == nil {
		if info.Name != "cpu" || info.TotalMemory != 0 || info.ComputeCapabilityMajor != 0 || info.ComputeCapabilityMinor != 0 {
			t.Errorf("no GPU, yet %+v", info)
		}
	} else {
		cc := fmt.Sprintf("%d.%d", info.ComputeCapabilityMajor, info.ComputeCapabilityMinor)
		if info.Name != cli.GPU.Name || info.TotalMemory != cli.GPU.TotalMemoryBytes || cc != cli.GPU.ComputeCapability {
			t.Errorf("GPU %q %d %s; beit info: %+v", info.Name, info.TotalMemory, cc, *cli.GPU)
		}
	}
	if again := must(beit.ProbeDevice())(t); again != info {
		t.Errorf("a second probe says %+v, the first %+v", again, info)
	}
}
