// im2col / col2im for NCHW convolutions (patch embedding and the dVAE's conv2d and
// conv_transpose2d), so that each convolution becomes a GEMM. The geometry is the CPU's
// src/backend/cpu/conv.rs `Cols`: an image of `channels` planes of h x w, and a column matrix
// [channels·k·k, oh·ow] per image whose row (c, kh, kw) and column (oy, ox) hold
// img[c, oy·s − p + kh, ox·s − p + kw] (0 outside the image).
//   conv2d forward:            out_b = W[co, K] · im2col(x_b)
//   conv2d input gradient:     dx_b  = col2im(Wᵀ · dout_b)
//   conv_transpose2d forward:  out_b = col2im(Wᵀ · x_b)     (with the transposed geometry)
//   weight gradient:           dW   += Σ_b a_b · im2col(src_b)ᵀ
// The GEMMs are cuBLASLt's (src/backend/cuda/conv.rs composes them); these kernels only move data.
// col2im gathers (one thread per image element, adding its k·k taps in (kh, kw) order), so it
// needs no atomics and adds in the CPU's order: in f32 it gives the CPU's bits.

#include "kernel_util.cuh"

struct ColsGeom {
    int channels, h, w, k, stride, pad, oh, ow;
};

// cols[b, (c, kh, kw), (oy, ox)] = img[b, c, iy, ix]; one thread per column element.
template <typename T>
__device__ void im2col(T* __restrict__ cols, const T* __restrict__ img, int batch, ColsGeom g) {
    const size_t l = (size_t)g.oh * g.ow;
    const size_t per_image = (size_t)g.channels * g.k * g.k * l;
    const size_t total = per_image * batch;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t b = e / per_image;
        const size_t rem = e % per_image;
        const int row = (int)(rem / l);
        const int col = (int)(rem % l);
        const int c = row / (g.k * g.k), kh = (row / g.k) % g.k, kw = row % g.k;
        const int oy = col / g.ow, ox = col % g.ow;
        const int iy = oy * g.stride - g.pad + kh, ix = ox * g.stride - g.pad + kw;
        float v = 0.0f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w)
            v = beit_to_float(img[((b * g.channels + c) * g.h + iy) * g.w + ix]);
        cols[e] = beit_from_float<T>(v);
    }
}

// img[b, c, y, x] = start + Σ_(kh, kw) cols[b, (c, kh, kw), (oy, ox)] over the taps with
// oy·s − p + kh = y and ox·s − p + kw = x, where start is img itself (accumulate), bias[c]
// (bias not null) or 0. One thread per image element.
template <typename T>
__device__ void col2im(T* __restrict__ img, const T* __restrict__ cols, const T* __restrict__ bias, int batch,
                       ColsGeom g, int accumulate) {
    const size_t l = (size_t)g.oh * g.ow;
    const size_t plane = (size_t)g.h * g.w;
    const size_t total = (size_t)batch * g.channels * plane;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t bc = e / plane;
        const int c = (int)(bc % g.channels);
        const size_t b = bc / g.channels;
        const int y = (int)((e % plane) / g.w), x = (int)(e % g.w);
        float acc = accumulate ? beit_to_float(img[e]) : (bias ? beit_to_float(bias[c]) : 0.0f);
        const T* cb = cols + (b * g.channels + c) * g.k * g.k * l;
        for (int kh = 0; kh < g.k; ++kh) {
            const int ty = y + g.pad - kh;  // = oy·s
            if (ty < 0 || ty % g.stride != 0) continue;
            const int oy = ty / g.stride;
            if (oy >= g.oh) continue;
            for (int kw = 0; kw < g.k; ++kw) {
                const int tx = x + g.pad - kw;
                if (tx < 0 || tx % g.stride != 0) continue;
                const int ox = tx / g.stride;
                if (ox >= g.ow) continue;
                acc += beit_to_float(cb[(size_t)(kh * g.k + kw) * l + (size_t)oy * g.ow + ox]);
            }
        }
        img[e] = beit_from_float<T>(acc);
    }
}

// out[b, c, :] += bias[c] over `plane` elements: the bias of a conv2d forward after its GEMM.
template <typename T>
__device__ void channel_bias_add(T* __restrict__ out, const T* __restrict__ bias, int batch, int channels,
                                 int plane) {
    const size_t total = (size_t)batch * channels * plane;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const int c = (int)((e / plane) % channels);
        out[e] = beit_from_float<T>(beit_to_float(out[e]) + beit_to_float(bias[c]));
    }
}

#define CONV_INSTANTIATE(SUFFIX, T)                                                                               \
    extern "C" __global__ void beit_conv_im2col_##SUFFIX(T* cols, const T* img, int batch, int channels, int h, int w,      \
                                               int k, int stride, int pad, int oh, int ow) {                     \
        im2col<T>(cols, img, batch, ColsGeom{channels, h, w, k, stride, pad, oh, ow});                           \
    }                                                                                                            \
    extern "C" __global__ void beit_conv_col2im_##SUFFIX(T* img, const T* cols, const T* bias, int batch, int channels,     \
                                               int h, int w, int k, int stride, int pad, int oh, int ow,         \
                                               int accumulate) {                                                 \
        col2im<T>(img, cols, bias, batch, ColsGeom{channels, h, w, k, stride, pad, oh, ow}, accumulate);         \
    }                                                                                                            \
    extern "C" __global__ void beit_conv_channel_bias_add_##SUFFIX(T* out, const T* bias, int batch, int channels,          \
                                                         int plane) {                                            \
        channel_bias_add<T>(out, bias, batch, channels, plane);                                                  \
    }

CONV_INSTANTIATE(f32, float)
CONV_INSTANTIATE(bf16, bf16)
