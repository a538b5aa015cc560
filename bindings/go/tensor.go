package beit

import "fmt"

// Element is an element type of the tensors libbeit reads and writes.
type Element interface {
	~float32 | ~float64 | ~int64 | ~uint64 | ~uint8 | ~uint16
}

// Tensor is a row-major (C order) array with its shape: len(Data) is the product of Shape.
// The outputs of this package (inference, tokenizer, dataset samples) are Tensors, so that a
// host never has to re-derive a layout from a length; a zero Tensor (nil Data and Shape) is an
// output that was not wanted or does not exist.
type Tensor[T Element] struct {
	Data  []T
	Shape []int
}

// Len is the number of elements, len(Data).
func (t Tensor[T]) Len() int { return len(t.Data) }

// String describes the tensor by its shape, e.g. "Tensor[float32][2 17 32]".
func (t Tensor[T]) String() string {
	var zero T
	return fmt.Sprintf("Tensor[%T]%v", zero, t.Shape)
}

// newTensor allocates a zeroed tensor of the given shape; a nil shape (an output that does
// not exist) gives the zero Tensor.
func newTensor[T Element](shape []int) Tensor[T] {
	if shape == nil {
		return Tensor[T]{}
	}
	return Tensor[T]{Data: make([]T, numel(shape)), Shape: shape}
}

func numel(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// checkedShape is shape when the product of its dimensions equals n, the length the library
// reported for that output; a difference means the binding derived the layout wrongly, and is
// reported rather than handed out as a mislabelled tensor.
func checkedShape(what string, n int, shape ...int) ([]int, error) {
	if got := numel(shape); got != n {
		return nil, argError(StatusInternal, "%s: shape %v holds %d values, but libbeit reports %d", what, shape, got, n)
	}
	return shape, nil
}
