package beit

// The progress callbacks of the library's training loops (Trainer.Finetune,
// Model.SegmentationFinetune, DvaeTrainer.Train), exported to C. They live in a file of their
// own: a cgo file that exports Go functions may only declare, not define, C functions in its
// preamble (the files that call the loops define the C trampolines that pass them on).

/*
#include <stdlib.h>
#include "beit.h"
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// progressRun is what one training call shares with its progress callback: the Go function,
// and the value of a panic in it (a panic must not unwind through C frames: the callback
// recovers it and stops the run, and the Go method panics with it again once the C call has
// returned).
type progressRun[T any] struct {
	fn       func(T) bool
	panicked any
}

// start gives the user_data that leads the exported callbacks back to r, or NULL when r has
// no function (the call then passes no callback); done releases it once the C call is over.
func (r *progressRun[T]) start() (user unsafe.Pointer, done func()) {
	if r.fn == nil {
		return nil, func() {}
	}
	// The handle travels through C in C memory (a Go pointer to a Go pointer may not).
	h := cgo.NewHandle(r)
	user = C.malloc(C.size_t(unsafe.Sizeof(h)))
	*(*cgo.Handle)(user) = h
	return user, func() {
		C.free(user)
		h.Delete()
	}
}

// report hands v to the function: 1 (stop) when it returns true or panics.
func (r *progressRun[T]) report(v T) (stop C.int32_t) {
	defer func() {
		if p := recover(); p != nil {
			r.panicked = p
			stop = 1
		}
	}()
	if r.fn(v) {
		return 1
	}
	return 0
}

// repanic panics with the value the function panicked with, if it did.
func (r *progressRun[T]) repanic() {
	if r.panicked != nil {
		panic(r.panicked)
	}
}

// runOf is the progressRun a callback's user_data leads to.
func runOf[T any](user unsafe.Pointer) *progressRun[T] {
	return (*(*cgo.Handle)(user)).Value().(*progressRun[T])
}

//export goDvaeProgress
func goDvaeProgress(stats *C.beit_dvae_step_stats, user unsafe.Pointer) C.int32_t {
	return runOf[DvaeStepStats](user).report(dvaeStatsFromC(stats))
}

//export goStepProgress
func goStepProgress(stats *C.beit_step_stats, user unsafe.Pointer) C.int32_t {
	return runOf[StepStats](user).report(stepStatsFromC(stats))
}

//export goSegmentationProgress
func goSegmentationProgress(step *C.beit_segmentation_step, user unsafe.Pointer) C.int32_t {
	return runOf[SegmentationStep](user).report(segmentationStepFromC(step))
}
