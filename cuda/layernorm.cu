// Layer norm over the last dimension (PyTorch's definition: biased variance, eps inside the
// square root), its fused form with the residual update before it, and its backward.
//
// The CPU reference is src/backend/cpu/layernorm.rs (forward), backward.rs layernorm_backward
// and elementwise.rs residual_add_into. Same two-pass statistics: mean, then the mean of the
// squared deviations (not E[x²] − mean², which cancels badly).
//
// Launch shapes (the host wrappers in src/backend/cuda/layernorm.rs own them):
// - beit_layernorm_forward_*, beit_layernorm_residual_forward_*: one warp per row, blockDim.x a multiple of 32, grid = ceil(rows / warps).
// - beit_layernorm_backward_*: grid = ceil(rows / LN_BWD_ROWS) blocks of any multiple of 32 threads;
//   block b writes dx for its rows and its own partial [dgamma | dbeta] row of `partials`.
// - beit_layernorm_backward_reduce: one thread per column, adds the partial rows in block order.
// No atomics: dgamma / dbeta are bit-identical from run to run.

#include "kernel_util.cuh"

// Rows per block of the backward. Fixed (not derived from the GPU), so the grouping of the
// parameter sums, and with it every bit of dgamma and dbeta, is the same on every device.
#define LN_BWD_ROWS 64

// mean and rstd of one row, by the warp that owns it; every lane gets both.
template <typename T>
__device__ __forceinline__ void row_stats(const T* row, int dim, float eps, float& mean, float& rstd) {
    const int lane = threadIdx.x % BEIT_WARP;
    float s = 0.0f;
    for (int c = lane; c < dim; c += BEIT_WARP) s += beit_to_float(row[c]);
    mean = beit_warp_sum(s) / (float)dim;
    float q = 0.0f;
    for (int c = lane; c < dim; c += BEIT_WARP) {
        const float d = beit_to_float(row[c]) - mean;
        q += d * d;
    }
    const float var = beit_warp_sum(q) / (float)dim;
    // Division and sqrt rounded correctly (NVRTC's defaults), not rsqrtf's approximation, so the
    // f32 mode matches the CPU's 1 / sqrt(var + eps).
    rstd = 1.0f / sqrtf(var + eps);
}

template <typename T>
__device__ __forceinline__ void normalize_row(T* out, const T* row, const T* gamma, const T* beta, int dim, float mean,
                                              float rstd) {
    const int lane = threadIdx.x % BEIT_WARP;
    for (int c = lane; c < dim; c += BEIT_WARP) {
        const float v = (beit_to_float(row[c]) - mean) * rstd;
        out[c] = beit_from_float<T>(v * beit_to_float(gamma[c]) + beit_to_float(beta[c]));
    }
}

// out = layernorm(x) row by row; mean / rstd ([rows] f32) are saved for the backward when not
// null.
template <typename T>
__device__ void layernorm_forward(T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                  const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                                  int rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / BEIT_WARP) + threadIdx.x / BEIT_WARP;
    if (row >= rows) return;  // warp-uniform: the whole warp leaves together
    const T* xr = x + (size_t)row * dim;
    float mean, rstd;
    row_stats(xr, dim, eps, mean, rstd);
    normalize_row(out + (size_t)row * dim, xr, gamma, beta, dim, mean, rstd);
    if (threadIdx.x % BEIT_WARP == 0) {
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
    }
}

// The residual update of a pre-LN block followed by the next layer norm, in one pass:
//   resid = x + k_r · scale ⊙ (y + bias)      (k_r = row_factors[row / rows_each], else 1;
//                                              scale / bias may be null: 1 / 0)
//   out   = layernorm(resid)
// The arithmetic is the CPU's residual_add_into: x + (scale·k)·(y + bias). The statistics are
// taken over the stored (rounded to T) resid, the tensor the backward sees.
template <typename T>
__device__ void residual_layernorm_forward(T* __restrict__ resid, T* __restrict__ out, float* __restrict__ mean_out,
                                           float* __restrict__ rstd_out, const T* __restrict__ x,
                                           const T* __restrict__ y, const T* __restrict__ bias,
                                           const T* __restrict__ scale, const float* __restrict__ row_factors,
                                           int rows_each, const T* __restrict__ gamma, const T* __restrict__ beta,
                                           int rows, int dim, float eps) {
    const int row = blockIdx.x * (blockDim.x / BEIT_WARP) + threadIdx.x / BEIT_WARP;
    if (row >= rows) return;
    const int lane = threadIdx.x % BEIT_WARP;
    const size_t off = (size_t)row * dim;
    const float k = row_factors ? row_factors[row / rows_each] : 1.0f;
    for (int c = lane; c < dim; c += BEIT_WARP) {
        const float b = bias ? beit_to_float(bias[c]) : 0.0f;
        const float s = scale ? beit_to_float(scale[c]) : 1.0f;
        const float v = beit_to_float(x[off + c]) + (s * k) * (beit_to_float(y[off + c]) + b);
        resid[off + c] = beit_from_float<T>(v);
    }
    // Each lane reads back only the columns it wrote, so no barrier is needed.
    float mean, rstd;
    row_stats(resid + off, dim, eps, mean, rstd);
    normalize_row(out + off, resid + off, gamma, beta, dim, mean, rstd);
    if (lane == 0) {
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
    }
}

// Backward, part 1. With xhat = (x − mean)·rstd and g = dy ⊙ gamma:
//   dx = rstd · (g − mean(g) − xhat · mean(g ⊙ xhat))      (overwritten, or added when accumulate)
// and block b's partial parameter sums over its LN_BWD_ROWS rows, in row order:
//   partials[b, c] = Σ dy·xhat (dgamma), partials[b, dim + c] = Σ dy (dbeta).
template <typename T>
__device__ void layernorm_backward(T* __restrict__ dx, float* __restrict__ partials, const T* __restrict__ dy,
                                   const T* __restrict__ x, const T* __restrict__ gamma,
                                   const float* __restrict__ mean, const float* __restrict__ rstd, int rows, int dim,
                                   int accumulate) {
    const int lane = threadIdx.x % BEIT_WARP, warp = threadIdx.x / BEIT_WARP;
    const int warps = blockDim.x / BEIT_WARP;
    const int row0 = blockIdx.x * LN_BWD_ROWS;
    const int row_end = min(row0 + LN_BWD_ROWS, rows);
    const float inv_dim = 1.0f / (float)dim;
    for (int row = row0 + warp; row < row_end; row += warps) {
        const size_t off = (size_t)row * dim;
        const float mu = mean[row], rs = rstd[row];
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (int c = lane; c < dim; c += BEIT_WARP) {
            const float g = beit_to_float(dy[off + c]) * beit_to_float(gamma[c]);
            sum_g += g;
            sum_gx += g * ((beit_to_float(x[off + c]) - mu) * rs);
        }
        const float mean_g = beit_warp_sum(sum_g) * inv_dim;
        const float mean_gx = beit_warp_sum(sum_gx) * inv_dim;
        for (int c = lane; c < dim; c += BEIT_WARP) {
            const float g = beit_to_float(dy[off + c]) * beit_to_float(gamma[c]);
            const float xhat = (beit_to_float(x[off + c]) - mu) * rs;
            float d = rs * (g - mean_g - xhat * mean_gx);
            if (accumulate) d += beit_to_float(dx[off + c]);
            dx[off + c] = beit_from_float<T>(d);
        }
    }
    // Column sums of this block's rows: thread per column, rows in order.
    float* pg = partials + (size_t)blockIdx.x * 2 * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float sg = 0.0f, sb = 0.0f;
        for (int row = row0; row < row_end; ++row) {
            const size_t off = (size_t)row * dim;
            const float o = beit_to_float(dy[off + c]);
            sg += o * ((beit_to_float(x[off + c]) - mean[row]) * rstd[row]);
            sb += o;
        }
        pg[c] = sg;
        pg[dim + c] = sb;
    }
}

// Backward, part 2: dgamma[c] += Σ_b partials[b, c], dbeta[c] += Σ_b partials[b, dim + c], blocks
// in order (the sum is formed first and added once, as the CPU does, so `+=` is exact).
// One thread per column; f32 parameter gradients whatever the storage type.
__device__ void layernorm_backward_reduce_impl(float* __restrict__ dgamma, float* __restrict__ dbeta,
                                               const float* __restrict__ partials, int blocks, int dim) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float sg = 0.0f, sb = 0.0f;
    for (int b = 0; b < blocks; ++b) {
        sg += partials[(size_t)b * 2 * dim + c];
        sb += partials[(size_t)b * 2 * dim + dim + c];
    }
    dgamma[c] += sg;
    dbeta[c] += sb;
}

#define LN_INSTANTIATE(SUFFIX, T)                                                                                  \
    extern "C" __global__ void beit_layernorm_forward_##SUFFIX(T* out, float* mean, float* rstd, const T* x,           \
                                                          const T* gamma, const T* beta, int rows, int dim,       \
                                                          float eps) {                                            \
        layernorm_forward<T>(out, mean, rstd, x, gamma, beta, rows, dim, eps);                                    \
    }                                                                                                             \
    extern "C" __global__ void beit_layernorm_residual_forward_##SUFFIX(                                               \
        T* resid, T* out, float* mean, float* rstd, const T* x, const T* y, const T* bias, const T* scale,       \
        const float* row_factors, int rows_each, const T* gamma, const T* beta, int rows, int dim, float eps) {   \
        residual_layernorm_forward<T>(resid, out, mean, rstd, x, y, bias, scale, row_factors, rows_each, gamma,  \
                                      beta, rows, dim, eps);                                                      \
    }                                                                                                             \
    extern "C" __global__ void beit_layernorm_backward_##SUFFIX(T* dx, float* partials, const T* dy, const T* x,       \
                                                           const T* gamma, const float* mean, const float* rstd,  \
                                                           int rows, int dim, int accumulate) {                   \
        layernorm_backward<T>(dx, partials, dy, x, gamma, mean, rstd, rows, dim, accumulate);                     \
    }

LN_INSTANTIATE(f32, float)
LN_INSTANTIATE(bf16, bf16)

extern "C" __global__ void beit_layernorm_backward_reduce(float* dgamma, float* dbeta, const float* partials, int blocks,
                                                     int dim) {
    layernorm_backward_reduce_impl(dgamma, dbeta, partials, blocks, dim);
}
