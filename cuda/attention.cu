// Fused multi-head attention, forward and backward, flash-style: scores live only in registers
// (online softmax over key tiles), never as an N x N matrix in global memory. The CPU reference
// is src/backend/cpu/attention.rs and attention_backward.rs; per (image b, head h):
//   S = scale·Q·Kᵀ + bias[h],  P = softmax(S),  ctx = P·V           (scale = 1/sqrt(D))
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ⊙ (dP − Δ),  Δ_i = Σ_c dO_ic·O_ic  (= rowsum(dP ⊙ P))
//   dQ = scale·dS·K,  dK = scale·dSᵀ·Q,  dbias[h] += Σ_b dS
//
// Layouts (as the CPU's): qkv and dqkv [B·N, 3·H·D] with rows [q | k | v] and heads contiguous in
// each part; ctx and dctx [B·N, H·D]; bias [H, N, N] f32 (gathered from the relative position
// table by relpos_bias_gather below) or null; lse and delta [B, H, N] f32.
//
// Kernels and launches (ATT_THREADS threads = 4 warps per block, 32-row tiles; the host
// wrappers in src/backend/cuda/attention.rs own them):
// - beit_attention_forward_d{32,64}_{f32,bf16}: grid (ceil(N/32), H, B). Each warp owns 8 query rows;
//   lane j holds the score of key j of the current 32-key tile. Saves lse = max + log(sum).
// - beit_attention_backward_delta_{f32,bf16}: Δ, one warp per (b, h, i) row.
// - beit_attention_backward_dkdv_d{32,64}_*: grid (ceil(N/32), H, B). Each warp owns 8 keys and loops
//   over all query tiles; P and dS are recomputed from lse and Δ.
// - beit_attention_backward_dq_d{32,64}_*: grid (ceil(N/32), H, G). Each warp owns 8 query rows;
//   block g loops over its images b = g·per_group .. in order and, when dbias_part is not null,
//   writes Σ_(its b) dS into dbias_part[g] (a plain read-add-write: the block owns those
//   elements, so no atomics are needed).
// - beit_attention_dbias_reduce: dbias (+)= Σ_g dbias_part[g], g in order.
// - beit_attention_relpos_gather_*, beit_attention_relpos_table_grad: the relative position table to the [H, N, N] bias
//   and its adjoint, each table entry summing its pairs in pair order (the CPU's order) without
//   atomics.
//
// Everything is a fixed sequence of f32 operations: bit-identical run to run.
// Math is on CUDA cores (f32 FMAs on shared-memory tiles). Tensor cores are a later step; this
// kernel is the correct baseline they must match.

#include "kernel_util.cuh"

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * BEIT_WARP)
#define ATT_TILE 32                        // query rows per block and keys per tile
#define ATT_ROWS (ATT_TILE / ATT_WARPS)    // rows (or keys) per warp

// Loads rows [r0, r0 + ATT_TILE) of one head's part of qkv-like storage (row stride rs, the
// head's first column at col0) into a float tile with row pitch P, zero past row n.
template <typename T, int D, int P>
__device__ __forceinline__ void load_tile(float (*dst)[P], const T* src, size_t rs, int col0, int r0, int n) {
    for (int e = threadIdx.x; e < ATT_TILE * D; e += blockDim.x) {
        const int r = e / D, c = e % D;
        const int i = r0 + r;
        dst[r][c] = i < n ? beit_to_float(src[(size_t)i * rs + col0 + c]) : 0.0f;
    }
}

template <typename T, int D>
__device__ void attention_forward(T* __restrict__ ctx, float* __restrict__ lse, const T* __restrict__ qkv,
                                  const float* __restrict__ bias, int n, int heads, float scale) {
    constexpr int CPL = D / BEIT_WARP;  // output columns per lane
    __shared__ float qs[ATT_TILE][D];       // rows read whole by every lane (broadcast)
    __shared__ float ks[ATT_TILE][D + 1];   // lane j reads row j: pitch D+1 avoids bank conflicts
    __shared__ float vs[ATT_TILE][D];       // lane reads its columns of row jj
    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x % BEIT_WARP, warp = threadIdx.x / BEIT_WARP;
    const int hidden = heads * D;
    const size_t rs = 3 * (size_t)hidden;
    const T* base = qkv + (size_t)b * n * rs;

    load_tile<T, D, D>(qs, base, rs, h * D, qt * ATT_TILE, n);

    float m[ATT_ROWS], l[ATT_ROWS], acc[ATT_ROWS][CPL];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r) {
        m[r] = -BEIT_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int cc = 0; cc < CPL; ++cc) acc[r][cc] = 0.0f;
    }

    for (int k0 = 0; k0 < n; k0 += ATT_TILE) {
        __syncthreads();  // the previous tile is consumed (and, first time, qs is complete)
        load_tile<T, D, D + 1>(ks, base, rs, hidden + h * D, k0, n);
        load_tile<T, D, D>(vs, base, rs, 2 * hidden + h * D, k0, n);
        __syncthreads();
        const int j = k0 + lane;
        const bool valid = j < n;
#pragma unroll
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int ri = warp * ATT_ROWS + r;
            const int i = qt * ATT_TILE + ri;
            if (i >= n) continue;  // warp-uniform
            float dot = 0.0f;
#pragma unroll 16
            for (int c = 0; c < D; ++c) dot += qs[ri][c] * ks[lane][c];
            float s = -BEIT_INF;
            if (valid) s = dot * scale + (bias ? bias[((size_t)h * n + i) * n + j] : 0.0f);
            const float m_new = fmaxf(m[r], warp_max(s));  // finite: key k0 is valid
            const float p = valid ? expf(s - m_new) : 0.0f;
            const float alpha = expf(m[r] - m_new);  // 0 on the first tile (m = −inf)
            l[r] = l[r] * alpha + beit_warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int cc = 0; cc < CPL; ++cc) acc[r][cc] *= alpha;
#pragma unroll 4  // full unrolling of the 32-step shuffle loops spills and bloats the cubin
            for (int jj = 0; jj < ATT_TILE; ++jj) {
                const float pj = __shfl_sync(BEIT_FULL_MASK, p, jj);
#pragma unroll
                for (int cc = 0; cc < CPL; ++cc) acc[r][cc] += pj * vs[jj][lane + BEIT_WARP * cc];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r) {
        const int i = qt * ATT_TILE + warp * ATT_ROWS + r;
        if (i >= n) continue;
        const float inv = 1.0f / l[r];
        T* out = ctx + ((size_t)b * n + i) * hidden + h * D;
#pragma unroll
        for (int cc = 0; cc < CPL; ++cc) out[lane + BEIT_WARP * cc] = beit_from_float<T>(acc[r][cc] * inv);
        if (lane == 0) lse[((size_t)b * heads + h) * n + i] = m[r] + logf(l[r]);
    }
}

// Δ[b, h, i] = Σ_c dctx[b, i, h, c] · ctx[b, i, h, c]; one warp per row.
template <typename T>
__device__ void attention_backward_delta(float* __restrict__ delta, const T* __restrict__ ctx,
                                         const T* __restrict__ dctx, int batch, int n, int heads, int head_dim) {
    const size_t w = (size_t)blockIdx.x * (blockDim.x / BEIT_WARP) + threadIdx.x / BEIT_WARP;
    if (w >= (size_t)batch * heads * n) return;  // warp-uniform
    const int lane = threadIdx.x % BEIT_WARP;
    const int i = (int)(w % n);
    const size_t bh = w / n;
    const int h = (int)(bh % heads), b = (int)(bh / heads);
    const size_t off = ((size_t)b * n + i) * heads * head_dim + (size_t)h * head_dim;
    float s = 0.0f;
    for (int c = lane; c < head_dim; c += BEIT_WARP) s += beit_to_float(dctx[off + c]) * beit_to_float(ctx[off + c]);
    s = beit_warp_sum(s);
    if (lane == 0) delta[w] = s;
}

template <typename T, int D>
__device__ void attention_backward_dkdv(T* __restrict__ dqkv, const T* __restrict__ qkv, const T* __restrict__ dctx,
                                        const float* __restrict__ bias, const float* __restrict__ lse,
                                        const float* __restrict__ delta, int n, int heads, float scale) {
    constexpr int CPL = D / BEIT_WARP;
    __shared__ float ks[ATT_TILE][D];        // this block's keys (broadcast reads)
    __shared__ float vs[ATT_TILE][D];
    __shared__ float qs[ATT_TILE][D + 1];    // lane i reads query row i
    __shared__ float dos[ATT_TILE][D + 1];
    __shared__ float bs[ATT_TILE][ATT_TILE + 1];  // bias[h, q0 + i, k0 + j] at [i][j]
    __shared__ float lse_s[ATT_TILE], delta_s[ATT_TILE];
    const int kt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x % BEIT_WARP, warp = threadIdx.x / BEIT_WARP;
    const int hidden = heads * D;
    const size_t rs = 3 * (size_t)hidden;
    const T* base = qkv + (size_t)b * n * rs;
    const T* dbase = dctx + (size_t)b * n * hidden;
    const float* lse_bh = lse + ((size_t)b * heads + h) * n;
    const float* delta_bh = delta + ((size_t)b * heads + h) * n;
    const int k0 = kt * ATT_TILE;

    load_tile<T, D, D>(ks, base, rs, hidden + h * D, k0, n);
    load_tile<T, D, D>(vs, base, rs, 2 * hidden + h * D, k0, n);

    float dk[ATT_ROWS][CPL], dv[ATT_ROWS][CPL];
#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r)
#pragma unroll
        for (int cc = 0; cc < CPL; ++cc) dk[r][cc] = dv[r][cc] = 0.0f;

    for (int q0 = 0; q0 < n; q0 += ATT_TILE) {
        __syncthreads();
        load_tile<T, D, D + 1>(qs, base, rs, h * D, q0, n);
        load_tile<T, D, D + 1>(dos, dbase, hidden, h * D, q0, n);
        for (int e = threadIdx.x; e < ATT_TILE * ATT_TILE; e += blockDim.x) {
            const int qi = e / ATT_TILE, kj = e % ATT_TILE;
            const int i = q0 + qi, j = k0 + kj;
            bs[qi][kj] = (bias && i < n && j < n) ? bias[((size_t)h * n + i) * n + j] : 0.0f;
        }
        if (threadIdx.x < ATT_TILE) {
            const int i = q0 + threadIdx.x;
            lse_s[threadIdx.x] = i < n ? lse_bh[i] : 0.0f;
            delta_s[threadIdx.x] = i < n ? delta_bh[i] : 0.0f;
        }
        __syncthreads();
        const bool valid = q0 + lane < n;  // lane = query row of the tile
#pragma unroll
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int kj = warp * ATT_ROWS + r;
            if (k0 + kj >= n) continue;  // warp-uniform
            float dot = 0.0f, dp = 0.0f;
#pragma unroll 16
            for (int c = 0; c < D; ++c) {
                dot += qs[lane][c] * ks[kj][c];
                dp += dos[lane][c] * vs[kj][c];
            }
            const float s = dot * scale + bs[lane][kj];
            const float p = valid ? expf(s - lse_s[lane]) : 0.0f;
            const float ds = valid ? p * (dp - delta_s[lane]) : 0.0f;
#pragma unroll 4  // full unrolling of the 32-step shuffle loops spills and bloats the cubin
            for (int ii = 0; ii < ATT_TILE; ++ii) {
                const float pi = __shfl_sync(BEIT_FULL_MASK, p, ii);
                const float dsi = __shfl_sync(BEIT_FULL_MASK, ds, ii);
#pragma unroll
                for (int cc = 0; cc < CPL; ++cc) {
                    dv[r][cc] += pi * dos[ii][lane + BEIT_WARP * cc];
                    dk[r][cc] += dsi * qs[ii][lane + BEIT_WARP * cc];
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < ATT_ROWS; ++r) {
        const int j = k0 + warp * ATT_ROWS + r;
        if (j >= n) continue;
        T* row = dqkv + ((size_t)b * n + j) * rs;
#pragma unroll
        for (int cc = 0; cc < CPL; ++cc) {
            const int c = lane + BEIT_WARP * cc;
            row[hidden + h * D + c] = beit_from_float<T>(dk[r][cc] * scale);
            row[2 * hidden + h * D + c] = beit_from_float<T>(dv[r][cc]);
        }
    }
}

template <typename T, int D>
__device__ void attention_backward_dq(T* __restrict__ dqkv, float* __restrict__ dbias_part, const T* __restrict__ qkv,
                                      const T* __restrict__ dctx, const float* __restrict__ bias,
                                      const float* __restrict__ lse, const float* __restrict__ delta, int batch,
                                      int per_group, int n, int heads, float scale) {
    constexpr int CPL = D / BEIT_WARP;
    __shared__ float qs[ATT_TILE][D];       // this block's query rows (broadcast reads)
    __shared__ float dos[ATT_TILE][D];
    __shared__ float ks[ATT_TILE][D + 1];   // lane j reads key row j
    __shared__ float vs[ATT_TILE][D + 1];
    const int qt = blockIdx.x, h = blockIdx.y, g = blockIdx.z;
    const int lane = threadIdx.x % BEIT_WARP, warp = threadIdx.x / BEIT_WARP;
    const int hidden = heads * D;
    const size_t rs = 3 * (size_t)hidden;
    const int b_begin = g * per_group;
    const int b_end = min(batch, b_begin + per_group);

    for (int b = b_begin; b < b_end; ++b) {
        const T* base = qkv + (size_t)b * n * rs;
        __syncthreads();  // the previous image's tiles are consumed
        load_tile<T, D, D>(qs, base, rs, h * D, qt * ATT_TILE, n);
        load_tile<T, D, D>(dos, dctx + (size_t)b * n * hidden, hidden, h * D, qt * ATT_TILE, n);

        float dq[ATT_ROWS][CPL], lse_r[ATT_ROWS], delta_r[ATT_ROWS];
#pragma unroll
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int i = qt * ATT_TILE + warp * ATT_ROWS + r;
            const size_t at = ((size_t)b * heads + h) * n + min(i, n - 1);
            lse_r[r] = lse[at];
            delta_r[r] = delta[at];
#pragma unroll
            for (int cc = 0; cc < CPL; ++cc) dq[r][cc] = 0.0f;
        }

        for (int k0 = 0; k0 < n; k0 += ATT_TILE) {
            __syncthreads();
            load_tile<T, D, D + 1>(ks, base, rs, hidden + h * D, k0, n);
            load_tile<T, D, D + 1>(vs, base, rs, 2 * hidden + h * D, k0, n);
            __syncthreads();
            const int j = k0 + lane;
            const bool valid = j < n;
#pragma unroll
            for (int r = 0; r < ATT_ROWS; ++r) {
                const int ri = warp * ATT_ROWS + r;
                const int i = qt * ATT_TILE + ri;
                if (i >= n) continue;  // warp-uniform
                float dot = 0.0f, dp = 0.0f;
#pragma unroll 16
                for (int c = 0; c < D; ++c) {
                    dot += qs[ri][c] * ks[lane][c];
                    dp += dos[ri][c] * vs[lane][c];
                }
                float ds = 0.0f;
                if (valid) {
                    const float s = dot * scale + (bias ? bias[((size_t)h * n + i) * n + j] : 0.0f);
                    const float p = expf(s - lse_r[r]);
                    ds = p * (dp - delta_r[r]);
                }
#pragma unroll 4  // full unrolling of the 32-step shuffle loops spills and bloats the cubin
                for (int jj = 0; jj < ATT_TILE; ++jj) {
                    const float dsj = __shfl_sync(BEIT_FULL_MASK, ds, jj);
#pragma unroll
                    for (int cc = 0; cc < CPL; ++cc) dq[r][cc] += dsj * ks[jj][lane + BEIT_WARP * cc];
                }
                if (dbias_part && valid) {
                    float* at = dbias_part + (((size_t)g * heads + h) * n + i) * n + j;
                    *at = (b == b_begin) ? ds : *at + ds;
                }
            }
        }

#pragma unroll
        for (int r = 0; r < ATT_ROWS; ++r) {
            const int i = qt * ATT_TILE + warp * ATT_ROWS + r;
            if (i >= n) continue;
            T* row = dqkv + ((size_t)b * n + i) * rs + h * D;
#pragma unroll
            for (int cc = 0; cc < CPL; ++cc) row[lane + BEIT_WARP * cc] = beit_from_float<T>(dq[r][cc] * scale);
        }
    }
}

#define ATT_INSTANTIATE(SUFFIX, T, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2) beit_attention_forward_d##D##_##SUFFIX(                   \
        T* ctx, float* lse, const T* qkv, const float* bias, int n, int heads, float scale) {                      \
        attention_forward<T, D>(ctx, lse, qkv, bias, n, heads, scale);                                             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) beit_attention_backward_dkdv_d##D##_##SUFFIX(             \
        T* dqkv, const T* qkv, const T* dctx, const float* bias, const float* lse, const float* delta, int n,     \
        int heads, float scale) {                                                                                  \
        attention_backward_dkdv<T, D>(dqkv, qkv, dctx, bias, lse, delta, n, heads, scale);                        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) beit_attention_backward_dq_d##D##_##SUFFIX(               \
        T* dqkv, float* dbias_part, const T* qkv, const T* dctx, const float* bias, const float* lse,             \
        const float* delta, int batch, int per_group, int n, int heads, float scale) {                            \
        attention_backward_dq<T, D>(dqkv, dbias_part, qkv, dctx, bias, lse, delta, batch, per_group, n, heads,    \
                                    scale);                                                                        \
    }

ATT_INSTANTIATE(f32, float, 32)
ATT_INSTANTIATE(f32, float, 64)
ATT_INSTANTIATE(bf16, bf16, 32)
ATT_INSTANTIATE(bf16, bf16, 64)

extern "C" __global__ void beit_attention_backward_delta_f32(float* delta, const float* ctx, const float* dctx, int batch,
                                                        int n, int heads, int head_dim) {
    attention_backward_delta<float>(delta, ctx, dctx, batch, n, heads, head_dim);
}

extern "C" __global__ void beit_attention_backward_delta_bf16(float* delta, const bf16* ctx, const bf16* dctx, int batch,
                                                         int n, int heads, int head_dim) {
    attention_backward_delta<bf16>(delta, ctx, dctx, batch, n, heads, head_dim);
}

// dbias[e] (+)= Σ_g part[g·len + e], g = 0, 1, .. in order; one thread per element.
extern "C" __global__ void beit_attention_dbias_reduce(float* dbias, const float* part, int groups, int len,
                                                  int accumulate) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= len) return;
    float s = 0.0f;
    for (int g = 0; g < groups; ++g) s += part[(size_t)g * len + e];
    dbias[e] = accumulate ? dbias[e] + s : s;
}

// bias[h, p] (+)= table[index[p], h] for the pairs p of an N x N grid (tt = N·N pairs);
// table [M, H] as Hugging Face stores it. One thread per (h, p).
template <typename T>
__device__ void relpos_bias_gather(float* __restrict__ bias, const T* __restrict__ table, const int* __restrict__ index,
                                   int heads, int tt, int accumulate) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)heads * tt) return;
    const int h = (int)(e / tt), p = (int)(e % tt);
    const float v = beit_to_float(table[(size_t)index[p] * heads + h]);
    bias[e] = accumulate ? bias[e] + v : v;
}

extern "C" __global__ void beit_attention_relpos_gather_f32(float* bias, const float* table, const int* index, int heads,
                                                  int tt, int accumulate) {
    relpos_bias_gather<float>(bias, table, index, heads, tt, accumulate);
}

extern "C" __global__ void beit_attention_relpos_gather_bf16(float* bias, const bf16* table, const int* index, int heads,
                                                   int tt, int accumulate) {
    relpos_bias_gather<bf16>(bias, table, index, heads, tt, accumulate);
}

// Adjoint of the gather: dtable[m, h] += Σ_(p: index[p] = m) dbias[h, p], the pairs taken in
// increasing p and added one by one onto dtable, as the CPU's relpos_bias_backward does, so the
// f32 result is the same bits. One thread per (m, h); each scans the whole index (read by every
// thread of a warp at once: a broadcast), so no inverse of the index is needed. `dtable` is
// [rows, heads].
extern "C" __global__ void beit_attention_relpos_table_grad(float* dtable, const float* dbias, const int* index,
                                                            int heads, int rows, int tt) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= rows * heads) return;
    const int m = e / heads, h = e % heads;
    const float* g = dbias + (size_t)h * tt;
    float acc = dtable[e];
    for (int p = 0; p < tt; ++p)
        if (index[p] == m) acc += g[p];
    dtable[e] = acc;
}
