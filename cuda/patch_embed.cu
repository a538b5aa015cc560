// Patch embedding, first half: the image [B, C, H, W] (fp32 pixels) rearranged into one row per
// patch, [B·N, C·ph·pw], columns in the conv weight's [C, ph, pw] order, converted to the GEMM's
// input type on the way. Because the patches do not overlap (stride = kernel), this is a
// permutation of the input, not an im2col expansion: no element is duplicated. The second half
// is one cuBLASLt GEMM with the bias epilogue (src/backend/cuda/patch_embed.rs), which writes
// the tokens [B, N, D] directly in the layout the transformer reads (conv(x).flatten(2).transpose(1, 2)).
// Rows beyond floor(H/ph)·ph (and columns beyond floor(W/pw)·pw) are dropped, as conv2d does.
#include "common.cuh"

template <typename T>
__device__ void patchify(const float* __restrict__ x, T* __restrict__ patches, int channels, int height, int width,
                         int ph, int pw, int grid_h, int grid_w, long long total) {
    const long long cols = (long long)channels * ph * pw;
    const long long per_image = (long long)grid_h * grid_w;
    BEIT_GRID_STRIDE(idx, total) {
        const long long row = idx / cols;
        const int col = (int)(idx - row * cols);
        const long long b = row / per_image;
        const int p = (int)(row - b * per_image);
        const int py = p / grid_w, px = p - (p / grid_w) * grid_w;
        const int c = col / (ph * pw);
        const int r = col - c * (ph * pw);
        const int i = r / pw, j = r - (r / pw) * pw;
        const long long src = ((b * channels + c) * height + (long long)py * ph + i) * width + (long long)px * pw + j;
        patches[idx] = beit_from_float<T>(x[src]);
    }
}

extern "C" __global__ void beit_patchify_f32(const float* x, float* patches, int channels, int height, int width,
                                             int ph, int pw, int grid_h, int grid_w, long long total) {
    patchify(x, patches, channels, height, width, ph, pw, grid_h, grid_w, total);
}

extern "C" __global__ void beit_patchify_bf16(const float* x, bf16* patches, int channels, int height, int width,
                                              int ph, int pw, int grid_h, int grid_w, long long total) {
    patchify(x, patches, channels, height, width, ph, pw, grid_h, grid_w, total);
}
