// Helpers of the hand-written kernels (layernorm, attention, cross_entropy, conv, reduce) on top
// of common.cuh (bf16 type, beit_to_float / beit_from_float, beit_warp_sum, beit_block_sum).
//
// Storage is either bf16 (training and inference) or f32 (the parity mode the tests compare with
// the CPU backend); all arithmetic is f32. Every kernel is a template over the storage type `T`,
// instantiated under two extern "C" names (`beit_<family>_<op>_bf16`, `..._f32`).
//
// Determinism: no atomics. Every reduction has a fixed shape (warp butterflies, fixed block
// trees, sequential loops), so the same launch on the same inputs gives the same bits.
//
// The host emulator (tests/cuda_emu/emu.h) compiles these files as plain C++, with its own
// cuda_bf16.h; the kernels are the same text.
#pragma once

#include "common.cuh"

#define BEIT_WARP 32
#define BEIT_FULL_MASK 0xffffffffu
// NVRTC has no <math.h> macros; these are the IEEE bit patterns.
#define BEIT_INF __int_as_float(0x7f800000)
#define BEIT_NAN __int_as_float(0x7fffffff)

// Maximum over the 32 lanes of a warp (butterfly; every lane gets it).
__device__ __forceinline__ float warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(BEIT_FULL_MASK, v, off));
    return v;
}
