// Casts between fp32 (master weights, CPU interchange) and bf16 (GPU storage). Round to nearest
// even, as torch's .to(torch.bfloat16) and half::bf16::from_f32 do, so host and device agree bit
// for bit.
#include "common.cuh"

extern "C" __global__ void beit_cast_f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    BEIT_GRID_STRIDE(i, n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void beit_cast_bf16_to_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n) {
    BEIT_GRID_STRIDE(i, n) y[i] = __bfloat162float(x[i]);
}
