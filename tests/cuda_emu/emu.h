// A host emulator for the kernels in cuda/: runs a kernel's text as plain C++ on the CPU, every
// CUDA thread a cooperative fiber (ucontext), so __syncthreads and warp shuffles are real
// rendezvous of the threads of a block / warp. It exists because the kernels are written on
// machines with no GPU: it checks their indexing, tiling, masking and barrier structure against
// naive references before they meet a GPU (tests/cuda_kernels.rs is the test on the GPU).
//
// Stricter than a GPU where it matters: a barrier or full-mask shuffle that some thread of the
// block / warp never reaches (an exited thread, divergent control flow) is reported as a
// deadlock instead of being undefined behaviour. Blocks run one after another; __shared__
// arrays are function statics (shared by the fibers of the block that runs). The CUDA mock
// (tests/cuda_mock) runs the same kernels through this file behind a fake driver.
// Only what the kernels use is provided: 1-D blocks, float/double shuffles; bf16 comes from
// include/cuda_bf16.h beside this file.
#pragma once
#define BEIT_HOST_EMU 1

#include <sys/mman.h>
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

// IEEE round-to-nearest arithmetic without contraction: what the host's SSE float operations are.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

namespace emu {

// Switching fibers: on x86-64 a hand-written switch of the callee-saved registers and the stack
// pointer (about 50 times faster than swapcontext, which makes a signal-mask system call every
// time); elsewhere ucontext. `switch_to(save, to)` stores the current stack pointer in *save and
// resumes the fiber whose stack pointer is `to`.
#if defined(__x86_64__) && !defined(BEIT_EMU_UCONTEXT)
__attribute__((naked, noinline)) static void switch_to(void** /*save*/, void* /*to*/) {
    __asm__ volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
#define BEIT_EMU_FAST_SWITCH 1
#endif

struct Fiber {
#ifdef BEIT_EMU_FAST_SWITCH
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
    bool done = false;
};

// Suspends `from` and resumes `to`.
inline void jump(Fiber& from, Fiber& to) {
#ifdef BEIT_EMU_FAST_SWITCH
    switch_to(&from.sp, to.sp);
#else
    swapcontext(&from.ctx, &to.ctx);
#endif
}

struct Sched {
    Fiber main;  // the launching code
    std::vector<Fiber> fibers;
    unsigned current = 0;
    const std::function<void()>* body = nullptr;
    // Block barrier and one barrier per warp: arrivals and a generation that moves on release.
    int block_arrived = 0;
    unsigned long block_gen = 0;
    std::vector<int> warp_arrived;
    std::vector<unsigned long> warp_gen;
    // Shuffle exchange: two sets of 32 slots per warp, used in turn (a double holds a float
    // exactly). A lane reads shuffle k's values before it can arrive at shuffle k + 1's barrier,
    // so when shuffle k + 2 writes the set again every lane has read it: one barrier per shuffle.
    std::vector<double> warp_slot;
    std::vector<unsigned char> shuffle_parity;  // per thread
    // Arrivals and exits; a whole round of the runnable fibers without any is a deadlock.
    unsigned long progress = 0, round_progress = 0;
    bool deadlocked = false;
    // Called before and after each block (the CUDA mock fills shared memory there); null: none.
    void (*before_block)(unsigned long block) = nullptr;
    void (*after_block)(unsigned long block) = nullptr;
    // false: a deadlock makes launch() return false instead of exiting the process.
    bool exit_on_deadlock = true;
};
inline Sched S;

// Fiber stacks: one mapping, committed lazily by the kernel as pages are touched, with an
// inaccessible guard page below each stack (an overflow faults instead of corrupting a neighbour).
constexpr size_t kStackSize = 256 * 1024, kGuard = 4096;
inline char* stack_of(unsigned t) {
    static char* base = nullptr;
    constexpr unsigned kMaxThreads = 1024;  // CUDA's limit per block
    if (t >= kMaxThreads) {
        fprintf(stderr, "emu: a block of more than %u threads\n", kMaxThreads);
        abort();
    }
    if (!base) {
        char* p = (char*)mmap(nullptr, (size_t)kMaxThreads * (kStackSize + kGuard), PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            fprintf(stderr, "emu: cannot map the fiber stacks\n");
            abort();
        }
        for (unsigned i = 0; i < kMaxThreads; ++i) mprotect(p + (size_t)i * (kStackSize + kGuard), kGuard, PROT_NONE);
        base = p;
    }
    return base + (size_t)t * (kStackSize + kGuard) + kGuard;
}

// Fibers hand over to each other directly, round-robin (no trip through the launching code):
// the next unfinished fiber after the current one.
inline unsigned next_runnable(unsigned t) {
    const unsigned n = (unsigned)S.fibers.size();
    do t = t + 1 == n ? 0 : t + 1;
    while (S.fibers[t].done);
    return t;
}

inline void run_fiber(unsigned from, unsigned to) {
    S.current = to;
    threadIdx = emu_dim3{to, 0, 0};
    jump(S.fibers[from], S.fibers[to]);
}

// Called by a fiber waiting at a barrier: lets the others run.
inline void yield() {
    const unsigned t = S.current, next = next_runnable(t);
    if (next <= t) {  // a round of the runnable fibers ends here
        if (S.progress == S.round_progress) {
            S.deadlocked = true;
            jump(S.fibers[t], S.main);  // never resumed
        }
        S.round_progress = S.progress;
    }
    if (next != t) run_fiber(t, next);
}

inline void fiber_entry() {
    (*S.body)();
    const unsigned t = S.current;
    S.fibers[t].done = true;
    S.progress++;
    bool any = false;
    for (const Fiber& f : S.fibers) any = any || !f.done;
    if (any)
        run_fiber(t, next_runnable(t));
    else
        jump(S.fibers[t], S.main);
    abort();  // a finished fiber is never resumed
}

inline void start_fiber(unsigned t) {
    Fiber& f = S.fibers[t];
    char* stack = stack_of(t);
#ifdef BEIT_EMU_FAST_SWITCH
    // The frame switch_to pops: six callee-saved registers, then the "return" into fiber_entry,
    // then a null return address for fiber_entry itself (16-byte aligned as after a call).
    void** top = (void**)(((uintptr_t)(stack + kStackSize) & ~(uintptr_t)15) - 64);
    for (int i = 0; i < 6; ++i) top[i] = nullptr;
    top[6] = (void*)&fiber_entry;
    top[7] = nullptr;
    f.sp = top;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = kStackSize;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
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

// Runs `body` as a kernel over grid x block (1-D blocks), blocks in order. Returns false on a
// deadlock when S.exit_on_deadlock is false (else reports it and exits).
inline bool launch(emu_dim3 grid, unsigned threads, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = emu_dim3{threads, 1, 1};
    S.body = &body;
    const int warps = (threads + 31) / 32;
    unsigned long block = 0;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx, ++block) {
                blockIdx = emu_dim3{bx, by, bz};
                S.fibers.assign(threads, Fiber{});
                S.block_arrived = 0;
                S.warp_arrived.assign(warps, 0);
                S.warp_gen.assign(warps, 0);
                S.warp_slot.assign(64 * warps, 0.0);
                S.shuffle_parity.assign(threads, 0);
                S.progress = S.round_progress = 0;
                S.deadlocked = false;
                for (unsigned t = 0; t < threads; ++t) start_fiber(t);
                if (S.before_block) S.before_block(block);
                S.current = 0;
                threadIdx = emu_dim3{0, 0, 0};
                jump(S.main, S.fibers[0]);  // back when every fiber is done, or on a deadlock
                if (S.deadlocked) {
                    fprintf(stderr, "emu: deadlock in block (%u,%u,%u): a barrier or shuffle is not reached by all threads\n", bx, by, bz);
                    if (S.exit_on_deadlock) exit(2);
                    return false;
                }
                if (S.after_block) S.after_block(block);
            }
    return true;
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
    double* slots = &emu::S.warp_slot[64 * w + 32 * emu::S.shuffle_parity[threadIdx.x]];
    emu::S.shuffle_parity[threadIdx.x] ^= 1;
    slots[lane] = (double)v;
    emu::warp_barrier(w);
    return (V)slots[src & 31];
}

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
    return __shfl_sync(mask, v, (int)(threadIdx.x % 32) ^ lane_mask);
}
