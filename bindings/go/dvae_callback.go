package beit

// The progress callback of DvaeTrainer.Train, exported to C. It lives in a file of its own:
// a cgo file that exports Go functions may only declare, not define, C functions in its
// preamble (dvae.go defines the call that passes it to beit_dvae_trainer_train).

// #include "beit.h"
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// dvaeProgress is what a Train call shares with its callback: the Go function, and the panic
// value of a callback that panicked (re-panicked by Train once the C call has returned, since
// a panic must not unwind through C frames).
type dvaeProgress struct {
	fn       func(DvaeStepStats) bool
	panicked any
}

//export goDvaeProgress
func goDvaeProgress(stats *C.beit_dvae_step_stats, user unsafe.Pointer) (stop C.int32_t) {
	p := (*(*cgo.Handle)(user)).Value().(*dvaeProgress)
	defer func() {
		if r := recover(); r != nil {
			p.panicked = r
			stop = 1
		}
	}()
	if p.fn(dvaeStatsFromC(stats)) {
		return 1
	}
	return 0
}
