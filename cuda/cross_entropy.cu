// Softmax cross-entropy fused with its gradient over rows of [rows, vocab] logits (the MIM loss:
// vocab 8192), the CPU's src/backend/cpu/cross_entropy.rs generalised with masking and label
// smoothing as nn.CrossEntropyLoss(ignore_index, label_smoothing) defines them.
//
// Row r with label y_r ≥ 0 and smoothing ε over V classes, target t = (1 − ε)·onehot(y) + ε/V:
//   loss_r   = logsumexp(x_r) − Σ_c t_c·x_rc = lse − (1 − ε)·x_ry − ε·mean(x_r)
//   dlogits  = (softmax(x_r) − t) · inv_rows        (gradient of the mean over the counted rows)
// A row with a negative label is masked: loss 0 and gradient 0 (PyTorch's ignore_index). The
// caller passes inv_rows = 1 / (number of counted rows) of the whole batch.
//
// beit_cross_entropy_forward_backward_{f32,bf16}: one block per row (blockDim a multiple of 32, ≤ 1024). Pass 1
// keeps a running (max, sum of exp) per thread and merges them over the block in a fixed tree;
// pass 2 overwrites the logits with the gradient. Losses go to losses[rows] (f32).
// beit_cross_entropy_loss_sum: one block, sums losses[] in a fixed order into a double added to
// out[0] (the CPU sums its row losses in f64 too; a pass adds the loss of every block of rows, and
// of mse.cu's rows, there until the host takes it). No atomics anywhere.

#include "kernel_util.cuh"

// Merge two (max, sum·e^(−max)) pairs of an online softmax.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    // -inf − -inf is NaN: a side with no elements (sum 0, max −inf) contributes 0.
    const float a = (s == 0.0f) ? 0.0f : s * expf(m - mm);
    const float b = (s2 == 0.0f) ? 0.0f : s2 * expf(m2 - mm);
    m = mm;
    s = a + b;
}

template <typename T>
__device__ void cross_entropy_forward_backward(T* __restrict__ logits, float* __restrict__ losses,
                                               const int* __restrict__ labels, int rows, int vocab, float inv_rows,
                                               float smoothing) {
    __shared__ float sm_m[32], sm_s[32], sm_x[32];
    const int row = blockIdx.x;
    if (row >= rows) return;  // block-uniform
    const int lane = threadIdx.x % BEIT_WARP, warp = threadIdx.x / BEIT_WARP;
    const int warps = blockDim.x / BEIT_WARP;
    T* x = logits + (size_t)row * vocab;
    const int label = labels[row];

    // Pass 1: per-thread online (max, sum exp), and the plain sum of logits for smoothing.
    float m = -BEIT_INF, s = 0.0f, sx = 0.0f;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = beit_to_float(x[c]);
        sx += v;
        if (v > m) {
            s = s * expf(m - v) + 1.0f;  // s is 0 while m is −inf, so no NaN
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    // Warp tree, then the first warp's lanes fold the per-warp results (fixed order).
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(BEIT_FULL_MASK, m, off);
        const float s2 = __shfl_xor_sync(BEIT_FULL_MASK, s, off);
        lse_merge(m, s, m2, s2);
        sx += __shfl_xor_sync(BEIT_FULL_MASK, sx, off);
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_s[warp] = s;
        sm_x[warp] = sx;
    }
    __syncthreads();
    m = lane < warps ? sm_m[lane] : -BEIT_INF;
    s = lane < warps ? sm_s[lane] : 0.0f;
    sx = lane < warps ? sm_x[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(BEIT_FULL_MASK, m, off);
        const float s2 = __shfl_xor_sync(BEIT_FULL_MASK, s, off);
        lse_merge(m, s, m2, s2);
        sx += __shfl_xor_sync(BEIT_FULL_MASK, sx, off);
    }
    // Every warp folded the same values in the same order: m, s, sx agree across the block.

    if (label < 0) {
        // Masked row: no loss, no gradient.
        for (int c = threadIdx.x; c < vocab; c += blockDim.x) x[c] = beit_from_float<T>(0.0f);
        if (threadIdx.x == 0) losses[row] = 0.0f;
        return;
    }
    const float x_label = label < vocab ? beit_to_float(x[label]) : BEIT_NAN;  // out of range: NaN, visible
    __syncthreads();  // x[label] is read by all before pass 2 overwrites it
    const float lse = m + logf(s);
    const float off_t = smoothing / (float)vocab;
    const float on_t = 1.0f - smoothing + off_t;
    if (threadIdx.x == 0) losses[row] = lse - (1.0f - smoothing) * x_label - smoothing * (sx / (float)vocab);

    // Pass 2: gradient in place. p·inv_rows = e^(x − m) · (inv_rows / s), the CPU's arithmetic.
    const float scale = inv_rows / s;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float p = expf(beit_to_float(x[c]) - m) * scale;
        const float t = (c == label ? on_t : off_t) * inv_rows;
        x[c] = beit_from_float<T>(p - t);
    }
}

extern "C" __global__ void beit_cross_entropy_forward_backward_f32(float* logits, float* losses, const int* labels,
                                                              int rows, int vocab, float inv_rows, float smoothing) {
    cross_entropy_forward_backward<float>(logits, losses, labels, rows, vocab, inv_rows, smoothing);
}

extern "C" __global__ void beit_cross_entropy_forward_backward_bf16(bf16* logits, float* losses, const int* labels,
                                                               int rows, int vocab, float inv_rows,
                                                               float smoothing) {
    cross_entropy_forward_backward<bf16>(logits, losses, labels, rows, vocab, inv_rows, smoothing);
}

// out[0] += Σ_r losses[r] in f64: thread t sums rows t, t + blockDim, ... in order, then a fixed
// tree over the block's threads. One block of CE_SUM_THREADS threads.
#define CE_SUM_THREADS 256
extern "C" __global__ void __launch_bounds__(CE_SUM_THREADS)
    beit_cross_entropy_loss_sum(double* out, const float* losses, int rows) {
    __shared__ double part[CE_SUM_THREADS];
    double acc = 0.0;
    for (int r = threadIdx.x; r < rows; r += CE_SUM_THREADS) acc += (double)losses[r];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int width = CE_SUM_THREADS / 2; width > 0; width >>= 1) {
        if ((int)threadIdx.x < width) part[threadIdx.x] += part[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] += part[0];
}
