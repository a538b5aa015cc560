// One kernel file of cuda/ compiled against the host emulator, with its kernels registered for
// cuModuleGetFunction / cuLaunchKernel. scripts/cuda-mock compiles this file once per cuda/*.cu:
//   -DBEIT_KERNEL_SOURCE='"<repo>/cuda/gelu.cu"' -DBEIT_KERNEL_FILE='"gelu.cu"'
//   -DBEIT_SHARED_SECTION=beit_shared_gelu -DBEIT_KERNEL_LIST='"<build>/gelu.kernels"'
// The kernel list comes from a first, preprocessor-only pass with -DBEIT_MOCK_SCAN, in which
// __launch_bounds__(...) leaves a marker the script reads: one line
// `BEIT_MOCK_KERNEL(name, bounds...)` per extern "C" kernel (bounds 0 when none are declared).
#include "emu.h"
#include "mock.h"

#include <tuple>
#include <type_traits>
#include <utility>

// __launch_bounds__: the scan pass keeps it visible; the build registers its first value.
#undef __launch_bounds__
#ifdef BEIT_MOCK_SCAN
#define __launch_bounds__(...) BEIT_LB_BEGIN __VA_ARGS__ BEIT_LB_END
#else
#define __launch_bounds__(...)
#endif

// __shared__ arrays are function statics (as in the emulator) in a section of their own, which the
// mock fills with 0xff (NaN) before every block, so that a read before a write shows, and measures.
#define BEIT_STR2(x) #x
#define BEIT_STR(x) BEIT_STR2(x)
#define BEIT_CAT2(a, b) a##b
#define BEIT_CAT(a, b) BEIT_CAT2(a, b)
#undef __shared__
#define __shared__ static __attribute__((section(BEIT_STR(BEIT_SHARED_SECTION))))

#include BEIT_KERNEL_SOURCE

#ifndef BEIT_MOCK_SCAN
// The linker's bounds of the section (absent, hence weak, when the file has no __shared__ array).
extern "C" char BEIT_CAT(__start_, BEIT_SHARED_SECTION)[] __attribute__((weak, visibility("hidden")));
extern "C" char BEIT_CAT(__stop_, BEIT_SHARED_SECTION)[] __attribute__((weak, visibility("hidden")));

namespace {

mock::Kernel* g_running = nullptr;

void fill_shared(unsigned long) {
    if (g_running->shared_begin) memset(g_running->shared_begin, 0xff, g_running->shared_end - g_running->shared_begin);
}

// Static shared memory a block used: the bytes it changed (a lower bound of what it declares).
void measure_shared(unsigned long block) {
    if (block != 0 || !g_running->shared_begin) return;
    int used = 0;
    for (const char* p = g_running->shared_begin; p < g_running->shared_end; ++p) used += (unsigned char)*p != 0xff;
    g_running->static_shared_seen = std::max(g_running->static_shared_seen, used);
}

// Reads parameter i of the kernel as the kernel's own C++ signature declares it, checks the
// pointers, and runs every thread of the grid.
template <typename... P, size_t... I>
int run_with(mock::Kernel& k, void (*fn)(P...), emu_dim3 grid, unsigned threads, void** args,
              std::index_sequence<I...>) {
    std::tuple<std::decay_t<P>...> values{*static_cast<std::decay_t<P>*>(args[I])...};
    std::vector<uintptr_t> pointers;
    bool ok = true;
    (
        [&] {
            if constexpr (std::is_pointer_v<std::decay_t<P>>) {
                const uintptr_t p = (uintptr_t)std::get<I>(values);
                ok = mock::check_pointer_arg(k, (int)I, p) && ok;
                pointers.push_back(p);
            }
        }(),
        ...);
    if (!ok) return mock::CUDA_ERROR_INVALID_VALUE;
    g_running = &k;
    emu::S.before_block = fill_shared;
    emu::S.after_block = measure_shared;
    emu::S.exit_on_deadlock = false;
    const bool done = emu::launch(grid, threads, [&] { fn(std::get<I>(values)...); });
    emu::S.before_block = emu::S.after_block = nullptr;
    mock::run_kernel_checks(k, pointers);
    if (!done) return mock::fail(mock::CUDA_ERROR_LAUNCH_FAILED, "kernel %s deadlocked (see the emulator's message)", k.name);
    return mock::CUDA_SUCCESS;
}

template <typename... P>
int run(const mock::Kernel& k, unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args) {
    return run_with(const_cast<mock::Kernel&>(k), reinterpret_cast<void (*)(P...)>(k.fn), emu_dim3{gx, gy, gz},
                    threads, args, std::index_sequence_for<P...>{});
}

template <typename... P>
mock::Kernel describe(const char* name, void (*fn)(P...), int max_threads) {
    return mock::Kernel{BEIT_KERNEL_FILE,
                        name,
                        max_threads,
                        &run<P...>,
                        (void*)fn,
                        BEIT_CAT(__start_, BEIT_SHARED_SECTION),
                        BEIT_CAT(__stop_, BEIT_SHARED_SECTION)};
}

constexpr int first_bound(int max_threads, int = 0, int = 0) { return max_threads; }

}  // namespace

#define BEIT_MOCK_KERNEL(name, ...)                                                          \
    static mock::Kernel beit_mock_kernel_##name = describe(#name, &name, first_bound(__VA_ARGS__)); \
    static mock::Registrar beit_mock_registrar_##name(&beit_mock_kernel_##name);
#include BEIT_KERNEL_LIST
#endif
