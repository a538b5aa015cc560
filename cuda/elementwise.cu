// Element-wise arithmetic of the transformer block: the residual add and a scaled add
// (y += s·x, used for gradient accumulation). fp32 arithmetic, any storage type.
#include "common.cuh"

// y = a + b; y may alias a or b (the residual stream updated in place).
template <typename T> __device__ void add(const T* a, const T* b, T* y, long long n) {
    BEIT_GRID_STRIDE(i, n) y[i] = beit_from_float<T>(beit_to_float(a[i]) + beit_to_float(b[i]));
}

// y += s·x.
template <typename T> __device__ void axpy(float s, const T* x, T* y, long long n) {
    BEIT_GRID_STRIDE(i, n) y[i] = beit_from_float<T>(beit_to_float(y[i]) + s * beit_to_float(x[i]));
}

extern "C" __global__ void beit_add_f32(const float* a, const float* b, float* y, long long n) { add(a, b, y, n); }
extern "C" __global__ void beit_add_bf16(const bf16* a, const bf16* b, bf16* y, long long n) { add(a, b, y, n); }
extern "C" __global__ void beit_axpy_f32(float s, const float* x, float* y, long long n) { axpy(s, x, y, n); }
extern "C" __global__ void beit_axpy_bf16(float s, const bf16* x, bf16* y, long long n) { axpy(s, x, y, n); }
