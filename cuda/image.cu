// The image ops of the UperNet segmentation head and the dVAE, on NCHW fp32 tensors, each the
// CUDA twin of a CPU function in src/backend/cpu (named beside each kernel) and equal to it bit
// for bit where the CPU's order of operations can be kept (every kernel below but the batch-norm
// statistics, whose f64 sums use a block tree instead of the CPU's running sum):
// - ReLU and its backward;
// - 2x2 max pooling with argmax, and its backward;
// - bilinear resize (align_corners=False) and its backward;
// - adaptive average pooling and its backward;
// - batch norm: per-channel batch statistics, the normalisation (batch or running statistics),
//   the backward's per-channel sums and dx, and the running-statistics update.
//
// No atomics: every backward is written as a gather (one thread per input element, reading the
// outputs that touched it in the CPU's order), so results are the same on every run. Arithmetic
// that the CPU does as separate roundings uses the __f*_rn intrinsics, which NVRTC never
// contracts into FMAs.

#include "kernel_util.cuh"

// ---------------------------------------------------------------------------------------------
// ReLU: backend/cpu/elementwise.rs relu_forward / relu_inplace, backend/cpu/backward.rs
// relu_backward.

// y = ReLU(x); y may alias x. `v < 0 ? 0 : v` rather than fmaxf: a NaN passes through, as in
// PyTorch and the CPU.
extern "C" __global__ void beit_image_relu(const float* x, float* y, long long n) {
    BEIT_GRID_STRIDE(i, n) {
        const float v = x[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

// dx = dy where x > 0, else 0; overwritten (accumulate = 0) or added to (accumulate = 1).
extern "C" __global__ void beit_image_relu_backward(const float* x, const float* dy, float* dx, long long n,
                                                    int accumulate) {
    BEIT_GRID_STRIDE(i, n) {
        const float g = x[i] > 0.0f ? dy[i] : 0.0f;
        dx[i] = accumulate ? __fadd_rn(dx[i], g) : g;
    }
}

// ---------------------------------------------------------------------------------------------
// 2x2 max pooling: backend/cpu/pool.rs max_pool2x2_forward / max_pool2x2_backward.

// One thread per output of `planes` planes of h x w (floor mode). argmax holds the index within
// the input plane; the first maximum in row-major window order wins, NaN wins over numbers.
extern "C" __global__ void beit_image_max_pool2x2(const float* x, float* y, unsigned* argmax, long long planes, int h,
                                                  int w) {
    const int oh = h / 2, ow = w / 2;
    BEIT_GRID_STRIDE(o, planes * oh * ow) {
        const long long plane = o / (oh * ow);
        const int r = (int)(o % (oh * ow));
        const int i = r / ow, j = r % ow;
        const float* p = x + plane * h * w;
        const int base = 2 * i * w + 2 * j;
        int best = base;
        const int others[3] = {base + 1, base + w, base + w + 1};
        for (int k = 0; k < 3; ++k) {
            const int idx = others[k];
            if (p[idx] > p[best] || p[idx] != p[idx]) best = idx;  // the second test: NaN
        }
        y[o] = p[best];
        argmax[o] = (unsigned)best;
    }
}

// One thread per input element: windows do not overlap, so an element receives the gradient of
// its window's output if it is that output's argmax, else 0 (a dropped odd row or column too).
extern "C" __global__ void beit_image_max_pool2x2_backward(const float* dy, const unsigned* argmax, float* dx,
                                                           long long planes, int h, int w, int accumulate) {
    const int oh = h / 2, ow = w / 2;
    BEIT_GRID_STRIDE(e, planes * h * w) {
        const long long plane = e / ((long long)h * w);
        const int r = (int)(e % ((long long)h * w));
        const int i = r / w / 2, j = r % w / 2;
        float g = 0.0f;
        if (i < oh && j < ow) {
            const long long o = plane * oh * ow + (long long)i * ow + j;
            if (argmax[o] == (unsigned)r) g = dy[o];
        }
        // 0 + g, as the CPU's fill-then-add (a −0 gradient becomes +0 there too).
        dx[e] = __fadd_rn(accumulate ? dx[e] : 0.0f, g);
    }
}

// ---------------------------------------------------------------------------------------------
// Bilinear resize, F.interpolate(mode="bilinear", align_corners=False): backend/cpu/interp.rs
// bilinear_forward / bilinear_backward (`bilinear_taps` there is `bilinear_tap` here).

struct BilinearTap {
    int i0, i1;
    float w0, w1;
};

// Output index o of an axis resized from `input` to `output`: its two source indices and weights.
__device__ __forceinline__ BilinearTap bilinear_tap(int o, int input, int output) {
    const float scale = __fdiv_rn((float)input, (float)output);
    const float src = fmaxf(__fsub_rn(__fmul_rn(scale, __fadd_rn((float)o, 0.5f)), 0.5f), 0.0f);
    BilinearTap t;
    t.i0 = min((int)src, input - 1);
    t.i1 = t.i0 < input - 1 ? t.i0 + 1 : t.i0;
    t.w1 = __fsub_rn(src, (float)t.i0);
    t.w0 = __fsub_rn(1.0f, t.w1);
    return t;
}

// One thread per output of `planes` planes: wy0·(wx0·p00 + wx1·p01) + wy1·(wx0·p10 + wx1·p11).
extern "C" __global__ void beit_image_bilinear(const float* x, float* y, long long planes, int in_h, int in_w,
                                               int out_h, int out_w) {
    BEIT_GRID_STRIDE(o, planes * out_h * out_w) {
        const long long plane = o / ((long long)out_h * out_w);
        const int r = (int)(o % ((long long)out_h * out_w));
        const BilinearTap ty = bilinear_tap(r / out_w, in_h, out_h);
        const BilinearTap tx = bilinear_tap(r % out_w, in_w, out_w);
        const float* p = x + plane * in_h * in_w;
        const float top = __fadd_rn(__fmul_rn(tx.w0, p[ty.i0 * in_w + tx.i0]), __fmul_rn(tx.w1, p[ty.i0 * in_w + tx.i1]));
        const float bottom =
            __fadd_rn(__fmul_rn(tx.w0, p[ty.i1 * in_w + tx.i0]), __fmul_rn(tx.w1, p[ty.i1 * in_w + tx.i1]));
        y[o] = __fadd_rn(__fmul_rn(ty.w0, top), __fmul_rn(ty.w1, bottom));
    }
}

// The outputs of an axis whose taps can reach input index i: source positions lie within one
// index of i, so o is within (i ± 1.5)/scale − 0.5; two more on each side cover the rounding.
__device__ __forceinline__ void bilinear_reach(int i, int input, int output, int* lo, int* hi) {
    const float scale = (float)input / (float)output;
    *lo = max(0, (int)floorf(((float)i - 1.5f) / scale - 0.5f) - 2);
    *hi = min(output - 1, (int)ceilf(((float)i + 1.5f) / scale - 0.5f) + 2);
}

// One thread per input element: the CPU scatters each output's gradient to its four taps in
// output raster order, taps in the order (y0,x0), (y0,x1), (y1,x0), (y1,x1); this gathers the
// same terms into the element in the same order, from 0 (dx overwritten).
extern "C" __global__ void beit_image_bilinear_backward(const float* dy, float* dx, long long planes, int in_h,
                                                        int in_w, int out_h, int out_w) {
    BEIT_GRID_STRIDE(e, planes * in_h * in_w) {
        const long long plane = e / ((long long)in_h * in_w);
        const int r = (int)(e % ((long long)in_h * in_w));
        const int yi = r / in_w, xi = r % in_w;
        int oy0, oy1, ox0, ox1;
        bilinear_reach(yi, in_h, out_h, &oy0, &oy1);
        bilinear_reach(xi, in_w, out_w, &ox0, &ox1);
        const float* g = dy + plane * out_h * out_w;
        float acc = 0.0f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            const BilinearTap ty = bilinear_tap(oy, in_h, out_h);
            if (ty.i0 != yi && ty.i1 != yi) continue;
            for (int ox = ox0; ox <= ox1; ++ox) {
                const BilinearTap tx = bilinear_tap(ox, in_w, out_w);
                if (tx.i0 != xi && tx.i1 != xi) continue;
                const float v = g[oy * out_w + ox];
                if (ty.i0 == yi && tx.i0 == xi) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(ty.w0, tx.w0), v));
                if (ty.i0 == yi && tx.i1 == xi) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(ty.w0, tx.w1), v));
                if (ty.i1 == yi && tx.i0 == xi) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(ty.w1, tx.w0), v));
                if (ty.i1 == yi && tx.i1 == xi) acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(ty.w1, tx.w1), v));
            }
        }
        dx[e] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Adaptive average pooling, nn.AdaptiveAvgPool2d: backend/cpu/interp.rs adaptive_avg_pool_*.

// Output index i's window over an axis: [floor(i·in/out), ceil((i+1)·in/out)).
__device__ __forceinline__ int window_start(int i, int input, int output) { return i * input / output; }
__device__ __forceinline__ int window_end(int i, int input, int output) {
    return ((i + 1) * input + output - 1) / output;
}

// One thread per output: the window's sum in row order, divided by its height, then its width.
extern "C" __global__ void beit_image_adaptive_avg_pool(const float* x, float* y, long long planes, int in_h,
                                                        int in_w, int out_h, int out_w) {
    BEIT_GRID_STRIDE(o, planes * out_h * out_w) {
        const long long plane = o / ((long long)out_h * out_w);
        const int r = (int)(o % ((long long)out_h * out_w));
        const int oy = r / out_w, ox = r % out_w;
        const int y0 = window_start(oy, in_h, out_h), y1 = window_end(oy, in_h, out_h);
        const int x0 = window_start(ox, in_w, out_w), x1 = window_end(ox, in_w, out_w);
        const float* p = x + plane * in_h * in_w;
        float sum = 0.0f;
        for (int yy = y0; yy < y1; ++yy)
            for (int xx = x0; xx < x1; ++xx) sum = __fadd_rn(sum, p[yy * in_w + xx]);
        y[o] = __fdiv_rn(__fdiv_rn(sum, (float)(y1 - y0)), (float)(x1 - x0));
    }
}

// One thread per input element: the gradients of the outputs whose windows hold it, each divided
// by its window's height then width, added in output raster order (as the CPU scatters them).
// Every output is visited: adaptive pooling outputs are small (the pyramid's 1, 2, 3 and 6).
extern "C" __global__ void beit_image_adaptive_avg_pool_backward(const float* dy, float* dx, long long planes,
                                                                 int in_h, int in_w, int out_h, int out_w) {
    BEIT_GRID_STRIDE(e, planes * in_h * in_w) {
        const long long plane = e / ((long long)in_h * in_w);
        const int r = (int)(e % ((long long)in_h * in_w));
        const int yi = r / in_w, xi = r % in_w;
        const float* g = dy + plane * out_h * out_w;
        float acc = 0.0f;
        for (int oy = 0; oy < out_h; ++oy) {
            const int y0 = window_start(oy, in_h, out_h), y1 = window_end(oy, in_h, out_h);
            if (yi < y0 || yi >= y1) continue;
            for (int ox = 0; ox < out_w; ++ox) {
                const int x0 = window_start(ox, in_w, out_w), x1 = window_end(ox, in_w, out_w);
                if (xi < x0 || xi >= x1) continue;
                acc = __fadd_rn(acc, __fdiv_rn(__fdiv_rn(g[oy * out_w + ox], (float)(y1 - y0)), (float)(x1 - x0)));
            }
        }
        dx[e] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// Batch norm (nn.BatchNorm2d): backend/cpu/batchnorm.rs. Launch: one block per channel, a
// multiple of 32 threads (the statistics and backward sums); one thread per element (apply, dx).

// Σ over channel c's elements of f(v) in f64: each thread sums its stride of every image's plane,
// then the block adds the threads' partials in a fixed tree. Every thread gets the total.
template <typename F>
__device__ double channel_sum(const float* x, int batch, int channels, int plane, int c, F f, double* scratch) {
    double s = 0.0;
    for (int b = 0; b < batch; ++b) {
        const float* p = x + ((long long)b * channels + c) * plane;
        for (int i = threadIdx.x; i < plane; i += blockDim.x) s += f(p[i]);
    }
    return beit_block_sum(s, scratch);
}

// Per channel: mean, 1/sqrt(biased variance + eps) and the unbiased variance (two passes, as
// the CPU: the mean first, then Σ(x − mean)²). Needs batch·plane > 1 (checked by the host).
extern "C" __global__ void beit_image_batch_norm_stats(const float* x, float* mean, float* invstd,
                                                       float* var_unbiased, int batch, int channels, int plane,
                                                       float eps) {
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const double n = (double)batch * plane;
    const double m = channel_sum(x, batch, channels, plane, c, [](float v) { return (double)v; }, scratch) / n;
    const double sq =
        channel_sum(x, batch, channels, plane, c, [m](float v) { return ((double)v - m) * ((double)v - m); }, scratch);
    if (threadIdx.x == 0) {
        mean[c] = (float)m;
        invstd[c] = (float)(1.0 / sqrt(sq / n + (double)eps));
        var_unbiased[c] = (float)(sq / (n - 1.0));
    }
}

// y = x·scale + shift with scale = γ·invstd, shift = β − mean·γ·invstd, per channel. With
// `running` set, `stat` is the running variance and invstd = 1/sqrt(var + eps) (evaluation);
// otherwise `stat` is the batch's invstd (training). y may alias x.
extern "C" __global__ void beit_image_batch_norm_apply(const float* x, float* y, const float* gamma, const float* beta,
                                                       const float* mean, const float* stat, long long batch,
                                                       int channels, int plane, int running, float eps) {
    BEIT_GRID_STRIDE(e, batch * channels * plane) {
        const int c = (int)(e / plane % channels);
        const float invstd = running ? __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(stat[c], eps))) : stat[c];
        const float scale = __fmul_rn(gamma[c], invstd);
        const float shift = __fsub_rn(beta[c], __fmul_rn(__fmul_rn(mean[c], gamma[c]), invstd));
        y[e] = __fadd_rn(__fmul_rn(x[e], scale), shift);
    }
}

// The backward's per-channel sums: Σdy and Σdy·x̂ (x̂ = (x − mean)·invstd, in f64), stored in
// `sums` as 2·channels doubles (Σdy of channel c at 2c, Σdy·x̂ at 2c + 1); dβ += Σdy and
// dγ += Σdy·x̂ (rounded to f32, as the CPU).
extern "C" __global__ void beit_image_batch_norm_backward_sums(const float* x, const float* dy, const float* mean,
                                                               const float* invstd, double* sums, float* dgamma,
                                                               float* dbeta, int batch, int channels, int plane) {
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const double m = mean[c], is = invstd[c];
    double sdy = 0.0, sdyx = 0.0;
    for (int b = 0; b < batch; ++b) {
        const long long base = ((long long)b * channels + c) * plane;
        for (int i = threadIdx.x; i < plane; i += blockDim.x) {
            const double g = dy[base + i];
            sdy += g;
            sdyx += g * ((double)x[base + i] - m) * is;
        }
    }
    sdy = beit_block_sum(sdy, scratch);
    sdyx = beit_block_sum(sdyx, scratch);
    if (threadIdx.x == 0) {
        sums[2 * c] = sdy;
        sums[2 * c + 1] = sdyx;
        dbeta[c] = __fadd_rn(dbeta[c], (float)sdy);
        dgamma[c] = __fadd_rn(dgamma[c], (float)sdyx);
    }
}

// dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂)), overwritten.
extern "C" __global__ void beit_image_batch_norm_backward_dx(const float* x, const float* dy, const float* gamma,
                                                             const float* mean, const float* invstd,
                                                             const double* sums, float* dx, long long batch,
                                                             int channels, int plane) {
    const double n = (double)batch * plane;
    BEIT_GRID_STRIDE(e, batch * channels * plane) {
        const int c = (int)(e / plane % channels);
        const float mdy = (float)(sums[2 * c] / n), mdyx = (float)(sums[2 * c + 1] / n);
        const float k = __fmul_rn(gamma[c], invstd[c]);
        const float xhat = __fmul_rn(__fsub_rn(x[e], mean[c]), invstd[c]);
        dx[e] = __fmul_rn(k, __fsub_rn(__fsub_rn(dy[e], mdy), __fmul_rn(xhat, mdyx)));
    }
}

// The running update r = (1 − momentum)·r + momentum·batch, for the mean and the unbiased variance.
extern "C" __global__ void beit_image_batch_norm_running_update(float* running_mean, float* running_var,
                                                                const float* mean, const float* var_unbiased,
                                                                int channels, float momentum) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const float keep = __fsub_rn(1.0f, momentum);
    running_mean[c] = __fadd_rn(__fmul_rn(keep, running_mean[c]), __fmul_rn(momentum, mean[c]));
    running_var[c] = __fadd_rn(__fmul_rn(keep, running_var[c]), __fmul_rn(momentum, var_unbiased[c]));
}

// ---------------------------------------------------------------------------------------------
// Glue of the segmentation head: scaling, the NCHW <-> token-major transpose, and the per-pixel
// cross-entropy (model/segmentation/loss.rs pixel_cross_entropy_sum).

// v *= factor.
extern "C" __global__ void beit_image_scale(float* v, float factor, long long n) {
    BEIT_GRID_STRIDE(i, n) v[i] = __fmul_rn(v[i], factor);
}

// `batch` matrices [rows, cols] of x transposed into y ([cols, rows] each); one thread per
// output element (reads strided, writes coalesced).
extern "C" __global__ void beit_image_transpose(const float* x, float* y, long long batch, int rows, int cols) {
    const long long each = (long long)rows * cols;
    BEIT_GRID_STRIDE(o, batch * each) {
        const long long b = o / each;
        const int r = (int)(o % each);
        const int c = r / rows, rr = r % rows;  // y[b][c][rr] = x[b][rr][c]
        y[o] = x[b * each + (long long)rr * cols + c];
    }
}

// One block per image of NCHW logits [batch, classes, plane] against labels [batch, plane] (a
// label of `classes` leaves its pixel out): each thread takes pixels with a block stride; per
// pixel, in f64 as the CPU: max, z = Σ exp(l − max), loss ln z − (l_label − max), and the logits
// overwritten by scale·(softmax − onehot) (0 at pixels left out). The image's loss sum (a block
// tree of the threads' sums) goes to image_loss[image].
extern "C" __global__ void beit_image_pixel_cross_entropy(float* logits, const int* labels, double* image_loss,
                                                          int batch, int classes, int plane, float scale) {
    __shared__ double scratch[32];
    for (int b = blockIdx.x; b < batch; b += gridDim.x) {
        float* lg = logits + (long long)b * classes * plane;
        const int* lab = labels + (long long)b * plane;
        double sum = 0.0;
        for (int px = threadIdx.x; px < plane; px += blockDim.x) {
            const int label = lab[px];
            if (label == classes) {
                for (int c = 0; c < classes; ++c) lg[(long long)c * plane + px] = 0.0f;
                continue;
            }
            float mx = -BEIT_INF;
            for (int c = 0; c < classes; ++c) mx = fmaxf(mx, lg[(long long)c * plane + px]);
            double z = 0.0;
            for (int c = 0; c < classes; ++c) z += exp((double)__fsub_rn(lg[(long long)c * plane + px], mx));
            sum += log(z) - (double)__fsub_rn(lg[(long long)label * plane + px], mx);
            for (int c = 0; c < classes; ++c) {
                const double prob = exp((double)__fsub_rn(lg[(long long)c * plane + px], mx)) / z;
                lg[(long long)c * plane + px] = __fmul_rn((float)(prob - (c == label ? 1.0 : 0.0)), scale);
            }
        }
        sum = beit_block_sum(sum, scratch);
        if (threadIdx.x == 0) image_loss[b] = sum;
        __syncthreads();
    }
}
