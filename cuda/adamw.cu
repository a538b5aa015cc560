// One AdamW step over the flat fp32 master parameters, with PyTorch's rule exactly as
// src/train/adamw.rs computes it (decoupled weight decay first, then the bias-corrected update):
//   p *= 1 - lr_j·wd·decay_j
//   m += (g - m)·(1 - β1)
//   v  = v·β2 + (1 - β2)·g·g
//   p -= (step_j·m) / (sqrt(v)/bias2_sqrt + eps)
// with lr_j = lr·scale_j and step_j = step_size·scale_j (scale_j from layer-wise lr decay, 1
// without). Every operation is an explicitly rounded intrinsic (__fmul_rn, ...) in the CPU's
// order, so NVRTC cannot contract pairs into FMAs and the result matches the CPU bit for bit.
//
// flags[j]: bit 0 = element j is trained (else untouched, like the zero key bias), bit 1 = it
// decays. lr_scale and p_bf16 may be NULL; with p_bf16 the bf16 copy the forward reads is
// refreshed in the same pass.
#include "common.cuh"

extern "C" __global__ void beit_adamw_step(float lr, float beta1, float beta2, float eps, float weight_decay,
                                           float step_size, float bias2_sqrt, float* __restrict__ p,
                                           float* __restrict__ m, float* __restrict__ v,
                                           const float* __restrict__ g, const unsigned char* __restrict__ flags,
                                           const float* __restrict__ lr_scale, bf16* __restrict__ p_bf16,
                                           long long n) {
    const float one_minus_b1 = __fsub_rn(1.0f, beta1);
    const float one_minus_b2 = __fsub_rn(1.0f, beta2);
    BEIT_GRID_STRIDE(j, n) {
        const unsigned char f = flags[j];
        if (!(f & 1u)) continue;
        const float s = lr_scale ? lr_scale[j] : 1.0f;
        const float lr_j = __fmul_rn(lr, s);
        const float step_j = __fmul_rn(step_size, s);
        const float d = (f & 2u) ? 1.0f : 0.0f;
        const float gj = g[j];
        float pj = p[j];
        pj = __fmul_rn(pj, __fsub_rn(1.0f, __fmul_rn(__fmul_rn(lr_j, weight_decay), d)));
        float mj = m[j];
        mj = __fadd_rn(mj, __fmul_rn(__fsub_rn(gj, mj), one_minus_b1));
        float vj = v[j];
        vj = __fadd_rn(__fmul_rn(vj, beta2), __fmul_rn(__fmul_rn(one_minus_b2, gj), gj));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), bias2_sqrt), eps);
        pj = __fsub_rn(pj, __fdiv_rn(__fmul_rn(step_j, mj), denom));
        p[j] = pj;
        m[j] = mj;
        v[j] = vj;
        if (p_bf16) p_bf16[j] = __float2bfloat16_rn(pj);
    }
}
