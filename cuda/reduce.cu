// Deterministic reductions (no atomics): column sums (bias gradients of Linears), row sums, and
// per-channel sums over NCHW (bias gradients of convolutions). Results are f32 (parameter
// gradients are f32 whatever the storage type) and ACCUMULATED (+=) like the CPU's parameter
// gradients, except row_sums, which overwrites.
//
// column_sums_partial + column_sums_finish: rows are cut into chunks of `chunk_rows` (chosen by
// the host from the shape only, never from the GPU); block (x, y) sums columns x·blockDim ..
// of chunk y in row order into partials[y]; the finish kernel adds the chunks in order. The CPU
// does the same (backward.rs column_sums_accumulate), with its own chunk size.

#include "kernel_util.cuh"

template <typename T>
__device__ void column_sums_partial(float* __restrict__ partials, const T* __restrict__ x, int rows, int n,
                                    int chunk_rows) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    const int r0 = blockIdx.y * chunk_rows;
    const int r1 = min(rows, r0 + chunk_rows);
    float s = 0.0f;
    for (int r = r0; r < r1; ++r) s += beit_to_float(x[(size_t)r * n + c]);
    partials[(size_t)blockIdx.y * n + c] = s;
}

extern "C" __global__ void beit_reduce_column_sums_finish(float* out, const float* partials, int chunks, int n) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    float s = 0.0f;
    for (int k = 0; k < chunks; ++k) s += partials[(size_t)k * n + c];
    out[c] += s;
}

// out[r] = Σ_c x[r, c]; one warp per row.
template <typename T>
__device__ void row_sums(float* __restrict__ out, const T* __restrict__ x, int rows, int n) {
    const int row = blockIdx.x * (blockDim.x / BEIT_WARP) + threadIdx.x / BEIT_WARP;
    if (row >= rows) return;  // warp-uniform
    const int lane = threadIdx.x % BEIT_WARP;
    float s = 0.0f;
    for (int c = lane; c < n; c += BEIT_WARP) s += beit_to_float(x[(size_t)row * n + c]);
    s = beit_warp_sum(s);
    if (lane == 0) out[row] = s;
}

// out[c] += Σ_b Σ_p x[b, c, p] for NCHW x with `plane` = H·W: one block per channel; each image's
// plane is summed by the block (fixed tree) and the images are added in order in f64, as the
// CPU's conv bias gradient does.
template <typename T>
__device__ void channel_sums(float* __restrict__ out, const T* __restrict__ x, int batch, int channels, int plane) {
    __shared__ float scratch[32];
    const int c = blockIdx.x;
    double total = 0.0;
    for (int b = 0; b < batch; ++b) {
        const T* p = x + ((size_t)b * channels + c) * plane;
        float s = 0.0f;
        for (int i = threadIdx.x; i < plane; i += blockDim.x) s += beit_to_float(p[i]);
        total += (double)beit_block_sum(s, scratch);
    }
    if (threadIdx.x == 0) out[c] += (float)total;
}

#define REDUCE_INSTANTIATE(SUFFIX, T)                                                                             \
    extern "C" __global__ void beit_reduce_column_sums_partial_##SUFFIX(float* partials, const T* x, int rows, int n,         \
                                                            int chunk_rows) {                                    \
        column_sums_partial<T>(partials, x, rows, n, chunk_rows);                                                \
    }                                                                                                            \
    extern "C" __global__ void beit_reduce_row_sums_##SUFFIX(float* out, const T* x, int rows, int n) {                       \
        row_sums<T>(out, x, rows, n);                                                                            \
    }                                                                                                            \
    extern "C" __global__ void beit_reduce_channel_sums_##SUFFIX(float* out, const T* x, int batch, int channels, int plane) { \
        channel_sums<T>(out, x, batch, channels, plane);                                                         \
    }

REDUCE_INSTANTIATE(f32, float)
REDUCE_INSTANTIATE(bf16, bf16)
