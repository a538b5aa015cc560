package beit

/*
#include <stdlib.h>
#include "beit.h"
*/
import "C"

import (
	"unsafe"
)

// ParameterInfo describes one parameter of a model or trainer (beit_parameter_info).
type ParameterInfo struct {
	Name  string // the Hugging Face name, as in model.safetensors
	Shape []int
	// Offset is where its values start (in float32s) in the flat parameter buffer, which a
	// trainer's Gradients share.
	Offset int
}

// Len is the number of values, the product of Shape.
func (p ParameterInfo) Len() int { return numel(p.Shape) }

// Of is this parameter's part of flat, a buffer laid out like the parameters (e.g.
// Gradients.Host): a subslice, so writes go through.
func (p ParameterInfo) Of(flat []float32) []float32 {
	return flat[p.Offset : p.Offset+p.Len() : p.Offset+p.Len()]
}

// parameterTable lists parameters through a handle's count and info calls.
type parameterTable struct {
	count func(*C.size_t) C.beit_status
	info  func(C.size_t, *C.beit_parameter_info) C.beit_status
}

func (tab parameterTable) list() ([]ParameterInfo, error) {
	var n C.size_t
	if err := call(func() C.beit_status { return tab.count(&n) }); err != nil {
		return nil, err
	}
	out := make([]ParameterInfo, 0, int(n))
	for i := C.size_t(0); i < n; i++ {
		ci := C.beit_parameter_info_default()
		if err := call(func() C.beit_status { return tab.info(i, &ci) }); err != nil {
			return nil, err
		}
		shape := make([]int, int(ci.ndim))
		for d := range shape {
			shape[d] = int(ci.shape[d])
		}
		out = append(out, ParameterInfo{Name: C.GoString(&ci.name[0]), Shape: shape, Offset: int(ci.offset)})
	}
	return out, nil
}

// find is the parameter called name, or ErrInvalidArgument.
func (tab parameterTable) find(name string) (ParameterInfo, error) {
	all, err := tab.list()
	if err != nil {
		return ParameterInfo{}, err
	}
	for _, p := range all {
		if p.Name == name {
			return p, nil
		}
	}
	first := ""
	if len(all) > 0 {
		first = all[0].Name
	}
	return ParameterInfo{}, argError(StatusInvalidArgument, "no parameter is named %q (Parameters lists them: %q, ...)", name, first)
}

// get reads parameter name into a new tensor of its shape with the handle's get call.
func (tab parameterTable) get(name string, get func(*C.char, *C.float, C.size_t) C.beit_status) (Tensor[float32], error) {
	p, err := tab.find(name)
	if err != nil {
		return Tensor[float32]{}, err
	}
	out := newTensor[float32](p.Shape)
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	if err := call(func() C.beit_status { return get(cname, f32mut(out.Data), C.size_t(len(out.Data))) }); err != nil {
		return Tensor[float32]{}, err
	}
	return out, nil
}

// set writes values to parameter name with the handle's set call (libbeit checks the length
// and that every value is finite).
func set(name string, values []float32, set func(*C.char, *C.float, C.size_t) C.beit_status) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return call(func() C.beit_status { return set(cname, f32ptr(values), C.size_t(len(values))) })
}

func (m *Model) parameterTable(p *C.beit_model) parameterTable {
	return parameterTable{
		count: func(n *C.size_t) C.beit_status { return C.beit_model_parameter_count(p, n) },
		info: func(i C.size_t, out *C.beit_parameter_info) C.beit_status {
			return C.beit_model_parameter_info(p, i, out)
		},
	}
}

// Parameters lists the model's parameters (Hugging Face names, shapes, offsets) in its
// layout order.
func (m *Model) Parameters() ([]ParameterInfo, error) {
	var out []ParameterInfo
	err := m.use(func(p *C.beit_model) error {
		var err error
		out, err = m.parameterTable(p).list()
		return err
	})
	return out, err
}

// Parameter is a copy of parameter name (a Hugging Face name, e.g.
// "beit.encoder.layer.0.attention.attention.query.weight") with its shape.
func (m *Model) Parameter(name string) (Tensor[float32], error) {
	var out Tensor[float32]
	err := m.use(func(p *C.beit_model) error {
		var err error
		out, err = m.parameterTable(p).get(name, func(n *C.char, v *C.float, l C.size_t) C.beit_status {
			return C.beit_model_get_parameter(p, n, v, l)
		})
		return err
	})
	return out, err
}

// useExclusive runs f with the live handle under the write lock: it waits for running calls
// (inferences on other goroutines), and none starts until f returns.
func (m *Model) useExclusive(f func(*C.beit_model) error) error {
	if m == nil {
		return closedError("model")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ptr == nil {
		return closedError("model")
	}
	return f(m.ptr)
}

// SetParameter sets parameter name from values (exactly its number of values, row-major, all
// finite): the next inference uses them. It waits for the model's running calls. On error the
// model is unchanged.
func (m *Model) SetParameter(name string, values []float32) error {
	return m.useExclusive(func(p *C.beit_model) error {
		return set(name, values, func(n *C.char, v *C.float, l C.size_t) C.beit_status {
			return C.beit_model_set_parameter(p, n, v, l)
		})
	})
}

// CopyParametersFrom sets every parameter from src, which must have the same ones (names and
// shapes: the same config and architecture). It waits for m's running calls, as SetParameter
// does. On error m is unchanged.
func (m *Model) CopyParametersFrom(src *Model) error {
	if m == nil || src == nil {
		return closedError("model")
	}
	if m == src {
		return argError(StatusInvalidArgument, "CopyParametersFrom: the source is the model itself")
	}
	// Two models copying from each other at once must not each hold one lock while waiting
	// for the other's: both locks are taken in one order, by address.
	if uintptr(unsafe.Pointer(m)) < uintptr(unsafe.Pointer(src)) {
		m.mu.Lock()
		src.mu.RLock()
	} else {
		src.mu.RLock()
		m.mu.Lock()
	}
	defer m.mu.Unlock()
	defer src.mu.RUnlock()
	if m.ptr == nil || src.ptr == nil {
		return closedError("model")
	}
	return call(func() C.beit_status { return C.beit_model_copy_parameters(m.ptr, src.ptr) })
}

func (t *Trainer) parameterTable(p *C.beit_trainer) parameterTable {
	return parameterTable{
		count: func(n *C.size_t) C.beit_status { return C.beit_trainer_parameter_count(p, n) },
		info: func(i C.size_t, out *C.beit_parameter_info) C.beit_status {
			return C.beit_trainer_parameter_info(p, i, out)
		},
	}
}

// Parameters lists the trainer's parameters as Model.Parameters does; Offset places each one
// in Gradients too.
func (t *Trainer) Parameters() ([]ParameterInfo, error) {
	var out []ParameterInfo
	err := t.use(func(p *C.beit_trainer) error {
		var err error
		out, err = t.parameterTable(p).list()
		return err
	})
	return out, err
}

// Parameter is a copy of the trainer's parameter name with its shape, as of the last applied
// step.
func (t *Trainer) Parameter(name string) (Tensor[float32], error) {
	var out Tensor[float32]
	err := t.use(func(p *C.beit_trainer) error {
		var err error
		out, err = t.parameterTable(p).get(name, func(n *C.char, v *C.float, l C.size_t) C.beit_status {
			return C.beit_trainer_get_parameter(p, n, v, l)
		})
		return err
	})
	return out, err
}

// SetParameter sets the trainer's parameter name (exactly its number of values, all finite):
// the next step trains from them, with the optimizer state kept. ErrInvalidArgument while a
// split step is pending; on error nothing changes.
func (t *Trainer) SetParameter(name string, values []float32) error {
	return t.use(func(p *C.beit_trainer) error {
		return set(name, values, func(n *C.char, v *C.float, l C.size_t) C.beit_status {
			return C.beit_trainer_set_parameter(p, n, v, l)
		})
	})
}

// CopyParametersFrom sets every parameter of the trainer from model (the same names and
// shapes), with the optimizer state kept. ErrInvalidArgument while a split step is pending;
// on error nothing changes.
func (t *Trainer) CopyParametersFrom(model *Model) error {
	return t.use(func(p *C.beit_trainer) error {
		return model.use(func(m *C.beit_model) error {
			return call(func() C.beit_status { return C.beit_trainer_copy_parameters_from(p, m) })
		})
	})
}

// Model is a new Model holding a copy of the trainer's model as of its last applied step (it
// does not follow later steps), on the context the trainer was made on, which must still be
// open: infer with it, save it, read its parameters. Close it when done.
func (t *Trainer) Model() (*Model, error) {
	var m *Model
	err := t.use(func(p *C.beit_trainer) error {
		var err error
		m, err = newModel(t.ctx, func(_ *C.beit_context, out **C.beit_model) C.beit_status {
			return C.beit_trainer_get_model(p, out)
		})
		return err
	})
	return m, err
}
