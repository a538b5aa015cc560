// Shared helpers of every libbeit kernel file. Embedded into the library by build.rs and handed to
// NVRTC as a named header, so `#include "common.cuh"` works without any file on disk. Toolkit
// headers (cuda_bf16.h) come from the CUDA include directory found at run time.
//
// Conventions for kernels (see src/backend/cuda/mod.rs for the Rust side):
// - entry points are `extern "C" __global__` and named `beit_<family>_<op>[_<dtype>]`, so the
//   Rust side loads them by a plain, unmangled name;
// - element counts are `long long` (tensors can pass 2^31 elements) and loops are grid-stride,
//   so any grid size is correct and the launcher picks it for occupancy only;
// - arithmetic is fp32; bf16 only at loads and stores;
// - reductions use a fixed tree (warp shuffles in a fixed order, then shared memory), never
//   atomics, so results are bit-identical run to run.
#pragma once

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float beit_to_float(float x) { return x; }
__device__ __forceinline__ float beit_to_float(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T beit_from_float(float x);
template <> __device__ __forceinline__ float beit_from_float<float>(float x) { return x; }
// Round to nearest even, as torch's .to(torch.bfloat16) and half::bf16::from_f32 do.
template <> __device__ __forceinline__ bf16 beit_from_float<bf16>(float x) { return __float2bfloat16_rn(x); }

// Grid-stride loop over [0, n) with a 64-bit index.
#define BEIT_GRID_STRIDE(i, n)                                                                   \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n);     \
         i += (long long)blockDim.x * gridDim.x)

// Sum over a full warp with a butterfly of shuffles: the same fixed order on every run, and every
// lane ends with the total.
__device__ __forceinline__ float beit_warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ double beit_warp_sum(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024): warp sums, then the first warp
// sums the per-warp partials. Deterministic (fixed tree). Every thread gets the total. `scratch`
// is shared memory of at least 32 floats; the function syncs before reusing it, so it can be
// called repeatedly with the same scratch.
__device__ __forceinline__ float beit_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = beit_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : 0.0f;
    total = beit_warp_sum(total);
    return total;
}

// The same fixed tree in double (for norms over millions of elements); `scratch` holds 32 doubles.
__device__ __forceinline__ double beit_block_sum(double v, double* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    v = beit_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = lane < warps ? scratch[lane] : 0.0;
    total = beit_warp_sum(total);
    return total;
}
