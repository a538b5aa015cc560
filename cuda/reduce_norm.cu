// Global L2 norm of the gradients and clipping by it (PyTorch's clip_grad_norm_), without
// atomics: a fixed grid of BEIT_NORM_BLOCKS blocks each sums the squares of a fixed grid-stride
// subset in double, then one block sums the partials in a fixed tree. The grid does not depend
// on the GPU, so the norm is bit-identical run to run and across GPUs; clipping reads the norm
// on the device, so no host round trip sits in the training step.
#include "common.cuh"

// Must match NORM_BLOCKS in src/backend/cuda/reduce.rs; launched with 256 threads per block.
#define BEIT_NORM_BLOCKS 1024

extern "C" __global__ void beit_sumsq_partial(const float* __restrict__ x, double* __restrict__ partial,
                                              long long n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    BEIT_GRID_STRIDE(i, n) {
        const double xi = (double)x[i];
        acc += xi * xi;
    }
    acc = beit_block_sum(acc, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = Σ partial (the sum of squares), out[1] = its square root (the norm). One block.
extern "C" __global__ void beit_sumsq_finish(const double* __restrict__ partial, int count, double* __restrict__ out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = beit_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        out[0] = acc;
        out[1] = sqrt(acc);
    }
}

// g *= max_norm / (norm + 1e-6) when that factor is below 1 (as src/train/clip.rs: the factor
// computed in double, applied in float).
extern "C" __global__ void beit_clip_by_norm(const double* __restrict__ norm, double max_norm, float* __restrict__ g,
                                             long long n) {
    const double coef = max_norm / (norm[1] + 1e-6);
    if (coef >= 1.0) return;
    const float c = (float)coef;
    BEIT_GRID_STRIDE(i, n) g[i] = __fmul_rn(g[i], c);
}
