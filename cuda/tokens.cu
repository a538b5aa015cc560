// The token-level ops of a BEiT pass around the transformer blocks (the host wrappers are
// src/backend/cuda/tokens.rs): assembling the token sequence from the patch embeddings (CLS, mask
// token, absolute positions) and its backward, gathering / scattering rows by index (the MIM
// head's masked rows), and the mean of each image's patch tokens (the mean-pooling pooler) and its
// backward. Each is the CUDA form of a CPU op (src/backend/cpu/ops.rs: assemble_tokens,
// gather_rows, scatter_rows, mean_patch_tokens and their backwards), with the same arithmetic per
// element, so the fp32 mode equals the CPU. Masks and row indices are int (the device's `Index`
// views).
//
// Parameter gradients are f32 and ACCUMULATED (+=) like the CPU's. Sums over the batch run in
// image order inside one thread (no atomics): the same bits on every run.

#include "kernel_util.cuh"

// Token assembly (embed_into after the patch GEMM), one element of x [batch, tokens, dim] per
// iteration: token 0 is the CLS token, token 1 + p is the mask token where patch p is masked
// (and a mask token exists), else the patch embedding; then the absolute position embedding
// (when given) is added. `masked` is [batch, patches], 1 where masked, or null (no mask).
template <typename T>
__device__ void assemble(T* __restrict__ x, const T* __restrict__ embedded, const T* __restrict__ cls,
                         const T* __restrict__ mask_token, const T* __restrict__ pos,
                         const int* __restrict__ masked, int batch, int patches, int dim) {
    const int tokens = patches + 1;
    const long long total = (long long)batch * tokens * dim;
    BEIT_GRID_STRIDE(i, total) {
        const int c = (int)(i % dim);
        const long long bt = i / dim;
        const int t = (int)(bt % tokens);
        const int b = (int)(bt / tokens);
        float v;
        if (t == 0) {
            v = beit_to_float(cls[c]);
        } else {
            const long long row = (long long)b * patches + (t - 1);
            const bool use_mask_token = mask_token && masked && masked[row] == 1;
            v = use_mask_token ? beit_to_float(mask_token[c]) : beit_to_float(embedded[row * dim + c]);
        }
        // The CPU stores x (rounded to T) and then adds the position: round in between too.
        if (pos) v = beit_to_float(beit_from_float<T>(v)) + beit_to_float(pos[(long long)t * dim + c]);
        x[i] = beit_from_float<T>(v);
    }
}

// The backward of `assemble` for the patch rows: dembedded[b, p] = 0 where the mask token
// replaced patch p (with a mask token), else dx[b, 1 + p].
template <typename T>
__device__ void embed_backward_rows(T* __restrict__ dembedded, const T* __restrict__ dx,
                                    const int* __restrict__ masked, int has_mask_token, int batch,
                                    int patches, int dim) {
    const long long total = (long long)batch * patches * dim;
    BEIT_GRID_STRIDE(i, total) {
        const long long row = i / dim;
        const int c = (int)(i % dim);
        const int b = (int)(row / patches), p = (int)(row % patches);
        const bool zero = has_mask_token && masked && masked[row] == 1;
        dembedded[i] = zero ? beit_from_float<T>(0.0f) : dx[((long long)b * (patches + 1) + 1 + p) * dim + c];
    }
}

// The small parameter gradients of `assemble`, one thread per output element, images in order:
//   i <  tokens·dim:            dpos[i] += Σ_b dx[b, i]            (when dpos is given)
//                               and for i < dim, dcls[i] += Σ_b dx[b, 0, i]
//   tokens·dim ≤ i < +dim:      dmask[c] += Σ_(b, p masked) dx[b, 1 + p, c] (when dmask and the
//                               mask are given)
template <typename T>
__device__ void embed_param_grads(float* __restrict__ dcls, float* __restrict__ dpos, float* __restrict__ dmask,
                                  const T* __restrict__ dx, const int* __restrict__ masked, int batch,
                                  int patches, int dim) {
    const int tokens = patches + 1;
    const long long td = (long long)tokens * dim;
    BEIT_GRID_STRIDE(i, td + dim) {
        if (i < td) {
            if (!dpos && i >= dim) continue;
            float s = 0.0f;
            for (int b = 0; b < batch; ++b) s += beit_to_float(dx[(long long)b * td + i]);
            if (dpos) dpos[i] += s;
            if (i < dim) dcls[i] += s;  // token 0's column sum is also the CLS gradient
        } else if (dmask && masked) {
            const int c = (int)(i - td);
            float s = 0.0f;
            for (int b = 0; b < batch; ++b)
                for (int p = 0; p < patches; ++p)
                    if (masked[(long long)b * patches + p] == 1) s += beit_to_float(dx[((long long)b * tokens + 1 + p) * dim + c]);
            dmask[c] += s;
        }
    }
}

// dst[r] = src[index[r]] (rows of `dim`), r < count: the masked rows of the hidden state.
template <typename T>
__device__ void gather_rows(T* __restrict__ dst, const T* __restrict__ src, const int* __restrict__ index, int count,
                            int dim) {
    BEIT_GRID_STRIDE(i, (long long)count * dim) {
        const int r = (int)(i / dim), c = (int)(i % dim);
        dst[i] = src[(long long)index[r] * dim + c];
    }
}

// dst[index[r]] = src[r]: the head's gradient back into the (zeroed) hidden-state gradient.
template <typename T>
__device__ void scatter_rows(T* __restrict__ dst, const T* __restrict__ src, const int* __restrict__ index, int count,
                             int dim) {
    BEIT_GRID_STRIDE(i, (long long)count * dim) {
        const int r = (int)(i / dim), c = (int)(i % dim);
        dst[(long long)index[r] * dim + c] = src[i];
    }
}

// out[b, c] = (1/(tokens − 1))·Σ_(t = 1..tokens−1) hidden[b, t, c]: the mean of each image's patch
// tokens (the CLS token left out), summed in token order in f32 then scaled, as the CPU's
// mean_patch_tokens. One thread per output element.
template <typename T>
__device__ void mean_patch_tokens(T* __restrict__ out, const T* __restrict__ hidden, int batch, int tokens,
                                  int dim) {
    BEIT_GRID_STRIDE(i, (long long)batch * dim) {
        const long long b = i / dim;
        const int c = (int)(i % dim);
        float s = 0.0f;
        for (int t = 1; t < tokens; ++t) s += beit_to_float(hidden[(b * tokens + t) * dim + c]);
        out[i] = beit_from_float<T>(s * (1.0f / (float)(tokens - 1)));
    }
}

// The backward of mean_patch_tokens: dhidden[b, t, c] = dout[b, c]/(tokens − 1) for the patch
// tokens, 0 for the CLS token (written, not added).
template <typename T>
__device__ void mean_patch_tokens_backward(T* __restrict__ dhidden, const T* __restrict__ dout, int batch,
                                           int tokens, int dim) {
    const float inv = 1.0f / (float)(tokens - 1);
    BEIT_GRID_STRIDE(i, (long long)batch * tokens * dim) {
        const long long bt = i / dim;
        const int c = (int)(i % dim);
        const int t = (int)(bt % tokens);
        const long long b = bt / tokens;
        dhidden[i] = beit_from_float<T>(t == 0 ? 0.0f : beit_to_float(dout[b * dim + c]) * inv);
    }
}

#define TOKENS_INSTANTIATE(SUFFIX, T)                                                                                \
    extern "C" __global__ void beit_tokens_assemble_##SUFFIX(T* x, const T* embedded, const T* cls,                  \
                                                            const T* mask_token, const T* pos,                       \
                                                            const int* masked, int batch, int patches,               \
                                                            int dim) {                                               \
        assemble<T>(x, embedded, cls, mask_token, pos, masked, batch, patches, dim);                                 \
    }                                                                                                                \
    extern "C" __global__ void beit_tokens_embed_backward_rows_##SUFFIX(                                             \
        T* dembedded, const T* dx, const int* masked, int has_mask_token, int batch, int patches,                    \
        int dim) {                                                                                                   \
        embed_backward_rows<T>(dembedded, dx, masked, has_mask_token, batch, patches, dim);                          \
    }                                                                                                                \
    extern "C" __global__ void beit_tokens_embed_param_grads_##SUFFIX(float* dcls, float* dpos, float* dmask,        \
                                                                     const T* dx, const int* masked,                 \
                                                                     int batch, int patches, int dim) {              \
        embed_param_grads<T>(dcls, dpos, dmask, dx, masked, batch, patches, dim);                                    \
    }                                                                                                                \
    extern "C" __global__ void beit_tokens_gather_rows_##SUFFIX(T* dst, const T* src, const int* index, int count,   \
                                                               int dim) {                                            \
        gather_rows<T>(dst, src, index, count, dim);                                                                 \
    }                                                                                                                \
    extern "C" __global__ void beit_tokens_scatter_rows_##SUFFIX(T* dst, const T* src, const int* index, int count,  \
                                                                int dim) {                                           \
        scatter_rows<T>(dst, src, index, count, dim);                                                                \
    }                                                                                                                \
    extern "C" __global__ void beit_tokens_mean_patches_##SUFFIX(T* out, const T* hidden, int batch, int tokens,     \
                                                                int dim) {                                           \
        mean_patch_tokens<T>(out, hidden, batch, tokens, dim);                                                       \
    }                                                                                                                \
    extern "C" __global__ void beit_tokens_mean_patches_backward_##SUFFIX(T* dhidden, const T* dout, int batch,      \
                                                                         int tokens, int dim) {                      \
        mean_patch_tokens_backward<T>(dhidden, dout, batch, tokens, dim);                                            \
    }

TOKENS_INSTANTIATE(f32, float)
TOKENS_INSTANTIATE(bf16, bf16)
