// The CUDA mock (tests/cuda_mock): one shared library that stands in for libcuda, libnvrtc and
// libcublasLt (scripts/cuda-mock builds it and names it as cudarc looks those up), so that the GPU
// tests run on a machine without a GPU. "Device" memory is host memory with guard bytes; kernels
// are the real cuda/*.cu files compiled against the host emulator (tests/cuda_emu); cuBLASLt is a
// column-major reference GEMM. See docs/cuda.md, "The CUDA mock".
//
// Only what libbeit calls through cudarc 0.19 exists: cudarc resolves each symbol on first use
// and panics "Missing symbol ..." for one that is absent, which names what to add here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace mock {

// Status codes, as the CUDA 13 headers (and cudarc's bindings of them) number them.
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

// The fake GPU.
constexpr const char* kDeviceName = "mock";
constexpr int kMajor = 9, kMinor = 0;           // Hopper: the sm_90a kernels "run" here
constexpr int kDriverVersion = 13000;          // CUDA 13.0, what the bindings need
constexpr int kMultiprocessors = 4;            // few: grid-stride loops then take several turns
constexpr int kStaticSharedLimit = 48 * 1024;  // per block, without opting in
constexpr int kSharedOptinLimit = 227 * 1024;  // sm_90's opt-in maximum per block
size_t memory_limit();                         // BEIT_CUDA_MOCK_MEMORY_MB, default 8 GiB

// Every entry point takes this lock: the emulator runs one kernel at a time on the calling
// thread, as one stream runs its work in order.
std::recursive_mutex& lock();

// A mock error: printed to stderr with "cuda-mock:" (BEIT_CUDA_MOCK_ABORT=1 aborts there, for a
// debugger), and the status code the caller returns.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void note_async_error(int code);  // reported by the next synchronising call
int take_async_error();

// Device memory: host blocks with kGuard guard bytes on each side (and up to the 256-byte
// rounding), checked on free, on every synchronisation and after each kernel that was given a
// pointer into the allocation. Fresh memory is filled with 0xff bytes: NaN as f32, bf16 and f64.
constexpr size_t kGuard = 256;
struct Alloc {
    uintptr_t base;
    size_t size;
};
uintptr_t alloc(size_t bytes, int* status);
int free_alloc(uintptr_t ptr, const char* what);
const Alloc* find(uintptr_t p);  // the live allocation holding address p (or ending at p)
// [p, p + bytes) must lie in one live allocation; else a reported error naming `what`.
bool in_range(const char* what, uintptr_t p, size_t bytes);
bool check_guards(const Alloc& a, const char* when);  // false (and reported) when overwritten
bool check_all_guards(const char* when);

// Kernels: every extern "C" __global__ function of cuda/*.cu, compiled against the emulator and
// registered by its file's translation unit (kernels.cpp).
struct Kernel {
    const char* file;  // "gelu.cu"
    const char* name;
    int max_threads;  // __launch_bounds__' first value, 0 when none is declared
    // Runs the kernel on grid x threads with the parameters cuLaunchKernel got; the status
    // (failures already reported).
    int (*run)(const Kernel& k, unsigned gx, unsigned gy, unsigned gz, unsigned threads, void** args);
    void* fn;
    char* shared_begin;  // this file's __shared__ arrays, in their own section
    char* shared_end;
    int max_dynamic_shared = 0;  // cuFuncSetAttribute
    int static_shared_seen = 0;  // shared bytes a block was seen to write
};
void register_kernel(Kernel* k);
Kernel* find_kernel(const std::string& file, const std::string& name);
std::vector<Kernel*> kernels_of(const std::string& file);
// The text of each cuda/ file as the mock was built from it (NVRTC compares what it is given).
void register_source(const char* name, const char* text);
const char* source_text(const std::string& name);
// Checks a kernel's pointer parameter: null or inside a live allocation.
bool check_pointer_arg(const Kernel& k, int index, uintptr_t p);
void run_kernel_checks(const Kernel& k, const std::vector<uintptr_t>& pointers);

struct Registrar {
    explicit Registrar(Kernel* k) { register_kernel(k); }
};
struct SourceRegistrar {
    SourceRegistrar(const char* name, const char* text) { register_source(name, text); }
};

// The thread's current context (cuCtxSetCurrent); cuBLASLt binds the primary one as the CUDA
// runtime does.
void* current_context();
void bind_primary_context();
bool require_context(const char* what);

}  // namespace mock
