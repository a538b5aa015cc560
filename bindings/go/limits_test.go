package beit_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	beit "github.com/libbeit/beit-go"
)

// ContextOptions.MemoryBudget reaches the library: BEiT-base does not fit in 1 MiB and is
// refused with ErrConfig before anything is allocated; a tiny model fits; 0 means what is
// available.
func TestMemoryBudget(t *testing.T) {
	small := must(beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU, Threads: 1, MemoryBudget: 1 << 20}))(t)
	defer small.Close()
	_, err := beit.NewModel(small, "{}", beit.ArchBackbone, 1)
	wantErr(t, "BEiT-base in 1 MiB", err, beit.ErrConfig)
	var be *beit.Error
	if errors.As(err, &be) && !strings.Contains(be.Message, "memory budget set for this context") {
		t.Errorf("message %q does not name the context's budget", be.Message)
	}
	m := must(beit.NewModel(small, tinyConfig, beit.ArchMaskedImageModeling, 1))(t)
	m.Close()

	def := must(beit.NewContext(&beit.ContextOptions{Device: beit.DeviceCPU, Threads: 1}))(t)
	defer def.Close()
	m = must(beit.NewModel(def, tinyConfig, beit.ArchMaskedImageModeling, 1))(t)
	m.Close()
}

// BEIT_ERR_BUSY maps to StatusBusy and the ErrBusy sentinel.
func TestBusyStatus(t *testing.T) {
	if s := beit.StatusBusy.String(); s != "BEIT_ERR_BUSY" {
		t.Fatalf("StatusBusy is %q", s)
	}
	err := error(&beit.Error{Status: beit.StatusBusy, Message: "beit_trainer_step: busy"})
	if !errors.Is(err, beit.ErrBusy) || errors.Is(err, beit.ErrInternal) {
		t.Fatalf("errors.Is does not tell ErrBusy: %v", err)
	}
}

// A Trainer shared by goroutines serialises their calls (the library would refuse the
// concurrent ones with ErrBusy): every step succeeds, and the trainer equals one that made as
// many steps in sequence.
func TestSharedTrainerSerialisesCalls(t *testing.T) {
	ctx := newCPUContext(t)
	const goroutines, steps = 4, 3
	b := fixedBatch()
	shared := must(beit.NewTrainerFromConfig(ctx, tinyConfig, 5, nil))(t)
	defer shared.Close()
	var wg sync.WaitGroup
	errs := make(chan error, goroutines*steps)
	start := make(chan struct{})
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for i := 0; i < steps; i++ {
				if _, err := shared.Step(b); err != nil {
					errs <- err
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("a concurrent Step failed: %v", err)
	}
	if n := must(shared.StepCount())(t); n != goroutines*steps {
		t.Fatalf("StepCount %d, want %d", n, goroutines*steps)
	}
	twin := must(beit.NewTrainerFromConfig(ctx, tinyConfig, 5, nil))(t)
	defer twin.Close()
	for i := 0; i < goroutines*steps; i++ {
		must(twin.Step(b))(t)
	}
	dir := t.TempDir()
	state := func(tr *beit.Trainer, name string) []byte {
		path := filepath.Join(dir, name)
		if err := tr.SaveCheckpoint(path); err != nil {
			t.Fatal(err)
		}
		return must(os.ReadFile(path))(t)
	}
	if !bytes.Equal(state(shared, "shared"), state(twin, "sequential")) {
		t.Fatal("the shared trainer differs from one stepped in sequence")
	}
}
