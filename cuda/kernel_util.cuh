// Shared helpers of the hand-written kernels (layernorm, attention, cross_entropy, conv, reduce).
//
// Storage is either bf16 (training and inference) or f32 (the parity mode the tests compare with
// the CPU backend); all arithmetic is f32. Every kernel is a template over the storage type `T`,
// instantiated under two extern "C" names (`<name>_bf16`, `<name>_f32`) so the host can look
// them up without C++ name mangling.
//
// Determinism: no atomics. Every reduction here has a fixed shape (warp butterflies, fixed block
// trees, sequential loops), so the same launch on the same inputs gives the same bits.
//
// Under BEIT_HOST_EMU the file is compiled as plain C++ by the host emulator
// (tests/cuda_emu/emu.h), which provides the CUDA built-ins; the kernels are the same text.
#pragma once

#ifndef BEIT_HOST_EMU
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
#endif

#define BEIT_WARP 32
#define BEIT_FULL_MASK 0xffffffffu
// NVRTC has no <math.h> macros; these are the IEEE bit patterns.
#define BEIT_INF __int_as_float(0x7f800000)
#define BEIT_NAN __int_as_float(0x7fffffff)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, as torch's .to(bfloat16).
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }

// Sum over the 32 lanes of a warp by a butterfly: every lane ends with the same value, and the
// order of the additions is fixed.
__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(BEIT_FULL_MASK, v, off);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(BEIT_FULL_MASK, v, off));
    return v;
}

// Sum over a block whose size is a multiple of 32 (at most 1024): warp butterflies, then the
// first warp folds the per-warp sums. `scratch` holds 32 floats of shared memory. Every thread
// gets the result. Contains __syncthreads, so all threads of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % BEIT_WARP, warp = threadIdx.x / BEIT_WARP;
    const int warps = blockDim.x / BEIT_WARP;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < warps ? scratch[lane] : 0.0f;
    r = warp_sum(r);
    return r;
}
