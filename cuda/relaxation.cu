// The dVAE's discrete bottleneck on the GPU, the twin of src/dvae/relaxation.rs, on token-major
// code logits [rows, vocab] (one row per grid position; one block per row, a multiple of 32
// threads):
// - the Gumbel-softmax relaxation y = softmax((logits + g) / tau), with g = −ln(−ln u) drawn
//   from the SAME ChaCha8 stream as the CPU (rand_chacha's ChaCha8Rng keyed by seed, step and
//   "gumbelsm", stream = row, word j of the stream for code j), and its backward;
// - the KL divergence of softmax(logits) to the uniform prior, per row, with its gradient;
// - the argmax that tokenizes (the first maximum, as torch.argmax and the CPU).
//
// The noise words are the CPU's bit for bit; exp and ln are CUDA's expf/logf (within 2 ulp of the
// CPU's polynomials) and row sums are block trees, so results match the CPU to f32 rounding
// (tests/cuda_image_ops.rs), not bit for bit. No atomics: the same inputs give the same bits on
// every run.

#include "kernel_util.cuh"

// ---------------------------------------------------------------------------------------------
// ChaCha8, as rand_chacha 0.9 lays it out: state = constants, key (8 little-endian words),
// a 64-bit block counter (words 12, 13), the 64-bit stream (words 14, 15); 4 double rounds; the
// output block is the state after the rounds plus the input state, words in order.

__device__ __forceinline__ unsigned rotl32(unsigned x, int n) { return (x << n) | (x >> (32 - n)); }

#define CHACHA_QUARTER(a, b, c, d)                                                                 \
    a += b; d ^= a; d = rotl32(d, 16);                                                             \
    c += d; b ^= c; b = rotl32(b, 12);                                                             \
    a += b; d ^= a; d = rotl32(d, 8);                                                              \
    c += d; b ^= c; b = rotl32(b, 7);

// Block `counter` of the stream `stream` under `key`, into out[16].
__device__ void chacha8_block(const unsigned key[8], unsigned long long counter, unsigned long long stream,
                              unsigned out[16]) {
    unsigned s[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                      key[0],      key[1],      key[2],      key[3],
                      key[4],      key[5],      key[6],      key[7],
                      (unsigned)counter, (unsigned)(counter >> 32), (unsigned)stream, (unsigned)(stream >> 32)};
    unsigned x[16];
    for (int i = 0; i < 16; ++i) x[i] = s[i];
    for (int r = 0; r < 4; ++r) {
        CHACHA_QUARTER(x[0], x[4], x[8], x[12]);
        CHACHA_QUARTER(x[1], x[5], x[9], x[13]);
        CHACHA_QUARTER(x[2], x[6], x[10], x[14]);
        CHACHA_QUARTER(x[3], x[7], x[11], x[15]);
        CHACHA_QUARTER(x[0], x[5], x[10], x[15]);
        CHACHA_QUARTER(x[1], x[6], x[11], x[12]);
        CHACHA_QUARTER(x[2], x[7], x[8], x[13]);
        CHACHA_QUARTER(x[3], x[4], x[9], x[14]);
    }
    for (int i = 0; i < 16; ++i) out[i] = x[i] + s[i];
}

// The key of (seed, step), as relaxation.rs's `row_rng` builds it: the seed's and the step's
// little-endian bytes, then "gumbelsm", then zeros.
__device__ void gumbel_key(unsigned long long seed, unsigned long long step, unsigned key[8]) {
    key[0] = (unsigned)seed;
    key[1] = (unsigned)(seed >> 32);
    key[2] = (unsigned)step;
    key[3] = (unsigned)(step >> 32);
    key[4] = 0x626d7567u;  // "gumb"
    key[5] = 0x6d736c65u;  // "elsm"
    key[6] = 0;
    key[7] = 0;
}

// ---------------------------------------------------------------------------------------------
// Block-wide maximum (a fixed tree; every thread gets it). `scratch` holds 32 floats.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = lane < warps ? scratch[lane] : -BEIT_INF;
    return warp_max(m);
}

// One block per row: y = softmax((logits + g) / tau). Each thread makes whole ChaCha blocks
// (16 codes each) of the row's stream.
extern "C" __global__ void beit_relax_gumbel_softmax(const float* logits, float* y, int rows, int vocab, float tau,
                                                     unsigned long long seed, unsigned long long step) {
    __shared__ float scratch[32];
    unsigned key[8];
    gumbel_key(seed, step, key);
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* l = logits + (long long)row * vocab;
        float* o = y + (long long)row * vocab;
        float m = -BEIT_INF;
        for (int b = threadIdx.x; b * 16 < vocab; b += blockDim.x) {
            unsigned words[16];
            chacha8_block(key, (unsigned long long)b, (unsigned long long)row, words);
            for (int w = 0; w < 16 && b * 16 + w < vocab; ++w) {
                const int j = b * 16 + w;
                // 24-bit uniforms strictly inside (0, 1): both logarithms are finite.
                const float u = __fmul_rn(__fadd_rn((float)(words[w] >> 8), 0.5f), 1.0f / 16777216.0f);
                const float v = __fsub_rn(l[j], logf(-logf(u)));
                o[j] = v;
                m = fmaxf(m, v);
            }
        }
        m = block_max(m, scratch);
        const float inv_tau = __fdiv_rn(1.0f, tau);
        float s = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float e = expf(__fmul_rn(__fsub_rn(o[j], m), inv_tau));
            o[j] = e;
            s += e;
        }
        s = beit_block_sum(s, scratch);
        const float inv_sum = __fdiv_rn(1.0f, s);
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) o[j] = __fmul_rn(o[j], inv_sum);
        __syncthreads();  // scratch is reused by the next row
    }
}

// One block per row: dlogits = (1/tau)·y ⊙ (dy − Σ y·dy), overwritten.
extern "C" __global__ void beit_relax_gumbel_softmax_backward(const float* y, const float* dy, float* dlogits,
                                                              int rows, int vocab, float tau) {
    __shared__ float scratch[32];
    const float inv_tau = __fdiv_rn(1.0f, tau);
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = (long long)row * vocab;
        float dot = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dot += __fmul_rn(y[base + j], dy[base + j]);
        dot = beit_block_sum(dot, scratch);
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            dlogits[base + j] = __fmul_rn(__fmul_rn(inv_tau, y[base + j]), __fsub_rn(dy[base + j], dot));
        __syncthreads();
    }
}

// One block per row: neg_entropy[row] = Σ q ln q with q = softmax(logits) (ln q = l − lse, from
// the logits), and, when dlogits is not null, dlogits += weight·q ⊙ (ln q − Σ q ln q).
extern "C" __global__ void beit_relax_kl_to_uniform(const float* logits, float* dlogits, double* neg_entropy,
                                                    int rows, int vocab, float weight) {
    __shared__ float scratch[32];
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* l = logits + (long long)row * vocab;
        float m = -BEIT_INF;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, l[j]);
        m = block_max(m, scratch);
        float s = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += expf(__fsub_rn(l[j], m));
        s = beit_block_sum(s, scratch);
        const float lse = __fadd_rn(m, logf(s)), inv_sum = __fdiv_rn(1.0f, s);
        float ne = 0.0f;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float q = __fmul_rn(expf(__fsub_rn(l[j], m)), inv_sum);
            ne += __fmul_rn(q, __fsub_rn(l[j], lse));
        }
        ne = beit_block_sum(ne, scratch);
        if (dlogits) {
            float* d = dlogits + (long long)row * vocab;
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
                const float q = __fmul_rn(expf(__fsub_rn(l[j], m)), inv_sum);
                d[j] = __fadd_rn(d[j], __fmul_rn(__fmul_rn(weight, q), __fsub_rn(__fsub_rn(l[j], lse), ne)));
            }
        }
        if (threadIdx.x == 0) neg_entropy[row] = (double)ne;
        __syncthreads();
    }
}

// One block per row: the index of the largest logit, the first on ties; a NaN is never chosen
// unless it is the first logit (the CPU's sequential `v > row[best]` scan).
extern "C" __global__ void beit_relax_argmax_rows(const float* logits, unsigned* tokens, int rows, int vocab) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* l = logits + (long long)row * vocab;
        // (value, index) of this thread's candidate; index vocab = none yet.
        float v = -BEIT_INF;
        int i = vocab;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            if (l[j] == l[j] && (i == vocab || l[j] > v)) {
                v = l[j];
                i = j;
            }
        // Combine: the larger value wins, the smaller index on equal values, a candidate over none.
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(BEIT_FULL_MASK, v, off);
            const int oi = __shfl_xor_sync(BEIT_FULL_MASK, i, off);
            if (oi != vocab && (i == vocab || ov > v || (ov == v && oi < i))) {
                v = ov;
                i = oi;
            }
        }
        __syncthreads();
        if (lane == 0) {
            best_v[warp] = v;
            best_i[warp] = i;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < warps; ++w)
                if (best_i[w] != vocab && (i == vocab || best_v[w] > v || (best_v[w] == v && best_i[w] < i))) {
                    v = best_v[w];
                    i = best_i[w];
                }
            tokens[row] = (l[0] != l[0] || i == vocab) ? 0u : (unsigned)i;
        }
    }
}
