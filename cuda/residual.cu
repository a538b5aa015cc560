// The residual branch of a pre-LN transformer block, forward and backward, element-wise:
// the CPU's residual_add_into / residual_add_backward (src/backend/cpu/elementwise.rs,
// backward.rs) element for element. fp32 arithmetic, f32 or bf16 storage. The forward fused with
// the layer norm after it is layernorm.cu's residual_layernorm_forward (the same arithmetic).
//
// Launches: grid-stride loops of any size over rows·dim (the host wrappers in
// src/backend/cuda/residual.rs).
#include "common.cuh"

// A residual branch of a pre-LN block, without the layer norm that may follow it
// (layernorm.cu's residual_layernorm_forward is the fused form, with the same arithmetic):
//   out[r, c] = x[r, c] + (λ_c·k_r)·(y[r, c] + bias_c)
// λ = 1 without layer scale (scale null), k_r = factors[r / rows_each] the drop path factor of
// the row's image (1 without: factors null). `out` may be `x` (the stream updated in place):
// each element is read and written by the same thread, so x and out are not __restrict__.
template <typename T>
__device__ void residual_forward(T* out, const T* x, const T* __restrict__ y, const T* __restrict__ bias,
                                 const T* __restrict__ scale, const float* __restrict__ factors, int rows_each,
                                 int rows, int dim) {
    BEIT_GRID_STRIDE(i, (long long)rows * dim) {
        const int r = (int)(i / dim), c = (int)(i % dim);
        const float k = factors ? factors[r / rows_each] : 1.0f;
        const float s = scale ? beit_to_float(scale[c]) : 1.0f;
        const float b = bias ? beit_to_float(bias[c]) : 0.0f;
        const float v = beit_to_float(x[i]) + (s * k) * (beit_to_float(y[i]) + b);
        out[i] = beit_from_float<T>(v);
    }
}

// The backward of residual_forward for the branch, given dacc = dL/dout:
//   dy[r, c]   = k_r·λ_c·dacc[r, c]                        (dL/dy, also dL/dbias before the
//                                                           caller's column sum)
//   prod[r, c] = k_r·dacc[r, c]·(y[r, c] + bias_c)         (when prod is given, with layer
//                                                           scale: the caller sums it over rows
//                                                           into dλ)
// y is read only when prod is given.
template <typename T>
__device__ void residual_backward(T* __restrict__ dy, float* __restrict__ prod, const T* __restrict__ dacc,
                                  const T* __restrict__ y, const T* __restrict__ bias, const T* __restrict__ scale,
                                  const float* __restrict__ factors, int rows_each, int rows, int dim) {
    BEIT_GRID_STRIDE(i, (long long)rows * dim) {
        const int r = (int)(i / dim), c = (int)(i % dim);
        const float k = factors ? factors[r / rows_each] : 1.0f;
        const float g = beit_to_float(dacc[i]);
        const float s = scale ? beit_to_float(scale[c]) : 1.0f;
        dy[i] = beit_from_float<T>(k * s * g);
        if (prod) prod[i] = k * g * (beit_to_float(y[i]) + (bias ? beit_to_float(bias[c]) : 0.0f));
    }
}

#define RESIDUAL_INSTANTIATE(SUFFIX, T)                                                                       \
    extern "C" __global__ void beit_residual_forward_##SUFFIX(T* out, const T* x, const T* y, const T* bias,  \
                                                              const T* scale, const float* factors,           \
                                                              int rows_each, int rows, int dim) {             \
        residual_forward<T>(out, x, y, bias, scale, factors, rows_each, rows, dim);                           \
    }                                                                                                         \
    extern "C" __global__ void beit_residual_backward_##SUFFIX(T* dy, float* prod, const T* dacc, const T* y, \
                                                               const T* bias, const T* scale,                 \
                                                               const float* factors, int rows_each, int rows, \
                                                               int dim) {                                     \
        residual_backward<T>(dy, prod, dacc, y, bias, scale, factors, rows_each, rows, dim);                  \
    }

RESIDUAL_INSTANTIATE(f32, float)
RESIDUAL_INSTANTIATE(bf16, bf16)
