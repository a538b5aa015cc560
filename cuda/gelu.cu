// Exact (erf) GELU, as Hugging Face's hidden_act="gelu" (torch.nn.functional.gelu): 
// GELU(x) = x·Φ(x) = 0.5·x·(1 + erf(x/√2)), and its derivative Φ(x) + x·φ(x) for the backward.
// fp32 arithmetic for both storage types; erff is CUDA's correctly-rounded-within-2-ulp erf
// (no --use_fast_math, see nvrtc.rs).
#include "common.cuh"

#define BEIT_SQRT1_2 0.70710678118654752440f
#define BEIT_INV_SQRT_2PI 0.39894228040143267794f

__device__ __forceinline__ float beit_gelu(float x) { return 0.5f * x * (1.0f + erff(x * BEIT_SQRT1_2)); }

__device__ __forceinline__ float beit_gelu_grad(float x) {
    const float cdf = 0.5f * (1.0f + erff(x * BEIT_SQRT1_2));
    const float pdf = BEIT_INV_SQRT_2PI * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

// y = GELU(x); y may alias x (in place).
template <typename T> __device__ void gelu_forward(const T* x, T* y, long long n) {
    BEIT_GRID_STRIDE(i, n) y[i] = beit_from_float<T>(beit_gelu(beit_to_float(x[i])));
}

// dx = dy · GELU'(x), x the GELU's input (pre-activation); dx may alias dy.
template <typename T> __device__ void gelu_backward(const T* x, const T* dy, T* dx, long long n) {
    BEIT_GRID_STRIDE(i, n) dx[i] = beit_from_float<T>(beit_to_float(dy[i]) * beit_gelu_grad(beit_to_float(x[i])));
}

extern "C" __global__ void beit_gelu_forward_f32(const float* x, float* y, long long n) { gelu_forward(x, y, n); }
extern "C" __global__ void beit_gelu_forward_bf16(const bf16* x, bf16* y, long long n) { gelu_forward(x, y, n); }
extern "C" __global__ void beit_gelu_backward_f32(const float* x, const float* dy, float* dx, long long n) {
    gelu_backward(x, dy, dx, n);
}
extern "C" __global__ void beit_gelu_backward_bf16(const bf16* x, const bf16* dy, bf16* dx, long long n) {
    gelu_backward(x, dy, dx, n);
}
