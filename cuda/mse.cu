// The mean squared error fused with its gradient (the pixel-regression MIM loss), the CPU's
// src/backend/cpu/mean_squared_error.rs (mse_fused_part) on the device. For a block of rows of a
// batch of total_rows rows, with grad_scale = 2/(cols·total_rows) (in f64, as the CPU):
//   loss_r      = (1/cols)·Σ_c (pred_rc − target_rc)²      into losses[r] (f32; the caller sums
//                                                          them in f64 with cross_entropy.cu's
//                                                          beit_cross_entropy_loss_sum)
//   pred_rc    <- grad_scale·(pred_rc − target_rc)         (the gradient, in place)
// Errors and the row sum in f64, as the CPU. One block of MSE_THREADS threads per row: thread t
// sums columns t, t + MSE_THREADS, ... in order, then a fixed tree; no atomics.
#include "kernel_util.cuh"

#define MSE_THREADS 256

template <typename T>
__device__ void mse_forward_backward(T* __restrict__ pred, float* __restrict__ losses, const T* __restrict__ target,
                                     int rows, int cols, int total_rows) {
    __shared__ double part[MSE_THREADS];
    const int row = blockIdx.x;
    if (row >= rows) return;  // block-uniform
    const double grad_scale = 2.0 / ((double)cols * (double)total_rows);
    T* p = pred + (size_t)row * cols;
    const T* t = target + (size_t)row * cols;
    double acc = 0.0;
    for (int c = threadIdx.x; c < cols; c += MSE_THREADS) {
        const double err = (double)beit_to_float(p[c]) - (double)beit_to_float(t[c]);
        acc += err * err;
        p[c] = beit_from_float<T>((float)(grad_scale * err));
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int width = MSE_THREADS / 2; width > 0; width >>= 1) {
        if ((int)threadIdx.x < width) part[threadIdx.x] += part[threadIdx.x + width];
        __syncthreads();
    }
    if (threadIdx.x == 0) losses[row] = (float)(part[0] / (double)cols);
}

extern "C" __global__ void __launch_bounds__(MSE_THREADS)
    beit_mse_forward_backward_f32(float* pred, float* losses, const float* target, int rows, int cols,
                                  int total_rows) {
    mse_forward_backward<float>(pred, losses, target, rows, cols, total_rows);
}

extern "C" __global__ void __launch_bounds__(MSE_THREADS)
    beit_mse_forward_backward_bf16(bf16* pred, float* losses, const bf16* target, int rows, int cols,
                                   int total_rows) {
    mse_forward_backward<bf16>(pred, losses, target, rows, cols, total_rows);
}
