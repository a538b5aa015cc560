// A host emulator for the kernels in cuda/: runs a kernel's text as plain C++ on the CPU, every
// CUDA thread a cooperative fiber (ucontext), so __syncthreads and warp shuffles are real
// rendezvous of the threads of a block / warp. It exists because the kernels are written on
// machines with no GPU: it checks their indexing, tiling, masking and barrier structure against
// naive references before they meet a GPU (tests/cuda_kernels.rs is the test on the GPU).
//
// Stricter than a GPU where it matters: a barrier or full-mask shuffle that some thread of the
// block / warp never reaches (an exited thread, divergent control flow) is reported as a
// deadlock instead of being undefined behaviour. Blocks run one after another; __shared__
// arrays are function statics (shared by the fibers of the block that runs).
// Only what the kernels use is provided: 1-D blocks, float/double shuffles; bf16 comes from
// include/cuda_bf16.h beside this file.
#pragma once
#define BEIT_HOST_EMU 1

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::max;
using std::min;

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

namespace emu {

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
};

struct Sched {
    ucontext_t main;
    std::vector<Fiber> fibers;
    int current = 0;
    const std::function<void()>* body = nullptr;
    // Block barrier and one barrier per warp: arrivals and a generation that moves on release.
    int block_arrived = 0;
    unsigned long block_gen = 0;
    std::vector<int> warp_arrived;
    std::vector<unsigned long> warp_gen;
    std::vector<double> warp_slot;  // shuffle exchange, 32 per warp (double holds a float exactly)
    unsigned long progress = 0;
};
inline Sched S;

inline void yield() { swapcontext(&S.fibers[S.current].ctx, &S.main); }

inline void fiber_entry() {
    (*S.body)();
    S.fibers[S.current].done = true;
    S.progress++;
    swapcontext(&S.fibers[S.current].ctx, &S.main);
}

inline void block_barrier() {
    const unsigned long gen = S.block_gen;
    S.progress++;
    if (++S.block_arrived == (int)S.fibers.size()) {
        S.block_arrived = 0;
        S.block_gen++;
        return;
    }
    while (S.block_gen == gen) yield();
}

inline void warp_barrier(int w) {
    const unsigned long gen = S.warp_gen[w];
    S.progress++;
    const int lanes = std::min(32, (int)S.fibers.size() - 32 * w);
    if (++S.warp_arrived[w] == lanes) {
        S.warp_arrived[w] = 0;
        S.warp_gen[w]++;
        return;
    }
    while (S.warp_gen[w] == gen) yield();
}

// Runs `body` as a kernel over grid x block (1-D blocks), blocks in order.
inline void launch(emu_dim3 grid, unsigned threads, const std::function<void()>& body) {
    static std::vector<std::vector<char>> stacks;
    const size_t stack_size = 256 * 1024;
    if (stacks.size() < threads) stacks.resize(threads);
    gridDim = grid;
    blockDim = emu_dim3{threads, 1, 1};
    S.body = &body;
    const int warps = (threads + 31) / 32;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = emu_dim3{bx, by, bz};
                S.fibers.assign(threads, Fiber{});
                S.block_arrived = 0;
                S.warp_arrived.assign(warps, 0);
                S.warp_gen.assign(warps, 0);
                S.warp_slot.assign(32 * warps, 0.0);
                for (unsigned t = 0; t < threads; ++t) {
                    Fiber& f = S.fibers[t];
                    if (stacks[t].size() < stack_size) stacks[t].resize(stack_size);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = stacks[t].data();
                    f.ctx.uc_stack.ss_size = stack_size;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, fiber_entry, 0);
                }
                for (;;) {
                    bool all_done = true;
                    const unsigned long before = S.progress;
                    for (unsigned t = 0; t < threads; ++t) {
                        if (S.fibers[t].done) continue;
                        all_done = false;
                        S.current = (int)t;
                        threadIdx = emu_dim3{t, 0, 0};
                        swapcontext(&S.main, &S.fibers[t].ctx);
                    }
                    if (all_done) break;
                    if (S.progress == before) {
                        fprintf(stderr, "emu: deadlock in block (%u,%u,%u): a barrier or shuffle is not reached by all threads\n", bx, by, bz);
                        exit(2);
                    }
                }
            }
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }

template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src) {
    if (mask != 0xffffffffu) {
        fprintf(stderr, "emu: only full-mask shuffles are emulated\n");
        exit(2);
    }
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    emu::S.warp_slot[32 * w + lane] = (double)v;
    emu::warp_barrier(w);
    const V r = (V)emu::S.warp_slot[32 * w + (src & 31)];
    emu::warp_barrier(w);
    return r;
}

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    return __shfl_sync(mask, v, (int)(threadIdx.x % 32) ^ lane_mask);
}
