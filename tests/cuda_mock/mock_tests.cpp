// Checks that the CUDA mock catches what docs/cuda.md says it catches, by calling its C entry
// points directly (linked against libbeit_cuda_mock.so; scripts/cuda-mock runs it). Every case
// below is a mistake the mock must refuse or report, plus a few results it must get right. The
// mock's own "cuda-mock:" messages for the refused cases go to stderr.
//   mock_tests <repository root>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern "C" {
int cuInit(unsigned);
int cuDevicePrimaryCtxRetain(void**, int);
int cuCtxSetCurrent(void*);
int cuCtxSynchronize();
int cuMemAlloc_v2(uintptr_t*, size_t);
int cuMemFree_v2(uintptr_t);
int cuMemcpyHtoD_v2(uintptr_t, const void*, size_t);
int cuMemcpyDtoH_v2(void*, uintptr_t, size_t);
int cuMemcpyDtoDAsync_v2(uintptr_t, uintptr_t, size_t, void*);
int cuMemsetD8Async(uintptr_t, unsigned char, size_t, void*);
int cuModuleLoadData(void**, const void*);
int cuModuleGetFunction(void**, void*, const char*);
int cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
int nvrtcCreateProgram(void**, const char*, const char*, int, const char* const*, const char* const*);
int nvrtcCompileProgram(void*, int, const char* const*);
int nvrtcGetCUBINSize(void*, size_t*);
int nvrtcGetCUBIN(void*, char*);
int nvrtcDestroyProgram(void**);
int cublasLtCreate(void**);
int cublasLtMatrixLayoutCreate(void**, int, uint64_t, uint64_t, int64_t);
int cublasLtMatmulDescCreate(void**, int, int);
int cublasLtMatmulDescSetAttribute(void*, int, const void*, size_t);
int cublasLtMatmulPreferenceCreate(void**);
int cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t);
int cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*, void*, int, void*, int*);
int cublasLtMatmul(void*, void*, const void*, const void*, void*, const void*, void*, const void*, const void*, void*,
                   void*, void*, const void*, void*, size_t, void*);
}

static int failures = 0;
static void expect(bool ok, const char* what) {
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    failures += !ok;
}

static std::string root;
static std::string read(const std::string& file) {
    std::ifstream in(root + "/cuda/" + file);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

// Compiles cuda/<file> (or `text` under its name) with the mock NVRTC and loads the module.
static int load(const char* file, const char* arch, void** module, const std::string* text = nullptr) {
    const std::string src = text ? *text : read(file);
    void* prog = nullptr;
    nvrtcCreateProgram(&prog, src.c_str(), file, 0, nullptr, nullptr);
    const std::string opt = std::string("--gpu-architecture=") + arch;
    const char* opts[] = {opt.c_str()};
    int e = nvrtcCompileProgram(prog, 1, opts);
    if (e == 0) {
        size_t n = 0;
        nvrtcGetCUBINSize(prog, &n);
        std::vector<char> image(n);
        nvrtcGetCUBIN(prog, image.data());
        const int loaded = cuModuleLoadData(module, image.data());
        e = loaded ? 1000 + loaded : 0;
    }
    nvrtcDestroyProgram(&prog);
    return e;
}

static uintptr_t upload(const std::vector<float>& v) {
    uintptr_t p = 0;
    cuMemAlloc_v2(&p, v.size() * 4);
    cuMemcpyHtoD_v2(p, v.data(), v.size() * 4);
    return p;
}
static std::vector<float> download(uintptr_t p, size_t n) {
    std::vector<float> v(n);
    cuMemcpyDtoH_v2(v.data(), p, n * 4);
    return v;
}

static void memory_cases() {
    uintptr_t a = 0, b = 0;
    expect(cuMemAlloc_v2(&a, 10 * 4) == 0 && a % 256 == 0, "allocations are 256-byte aligned");
    std::vector<float> h = download(a, 10);
    expect(std::isnan(h[0]) && std::isnan(h[9]), "fresh allocations read as NaN");
    expect(cuMemAlloc_v2(&b, 0) == 1, "a zero-byte allocation is refused");
    expect(cuMemcpyHtoD_v2(a + 4, h.data(), 40) == 1, "a copy running past the end is refused");
    expect(cuMemcpyDtoH_v2(h.data(), a + 44, 4) == 1, "a copy from past the end is refused");
    expect(cuMemsetD8Async(a, 0, 41, nullptr) == 1, "a memset past the end is refused");
    expect(cuMemcpyDtoDAsync_v2(a, a + 8, 16, nullptr) == 1, "an overlapping device copy is refused");
    expect(cuMemFree_v2(a + 4) == 1, "freeing an interior pointer is refused");
    expect(cuMemAlloc_v2(&b, (size_t)1 << 40) == 2, "more than the device's memory is refused");
    expect(cuMemFree_v2(a) == 0 && cuMemFree_v2(a) == 1, "a double free is refused");
    int status = -1;
    std::thread([&] { status = cuMemAlloc_v2(&b, 16); }).join();
    expect(status == 201, "a thread without a current context gets CUDA_ERROR_INVALID_CONTEXT");
}

static void kernel_cases() {
    void *module = nullptr, *add = nullptr, *axpy = nullptr, *loss_sum = nullptr, *ce = nullptr;
    expect(load("elementwise.cu", "sm_90a", &module) == 0, "a cuda/ file compiles and loads");
    cuModuleGetFunction(&add, module, "beit_add_f32");
    cuModuleGetFunction(&axpy, module, "beit_axpy_f32");
    expect(add && axpy, "its kernels are found by name");
    expect(cuModuleGetFunction(&loss_sum, module, "beit_cross_entropy_loss_sum") == 500,
           "a kernel of another file is not in this module");
    std::string edited = read("elementwise.cu") + "\n// edited\n";
    expect(load("elementwise.cu", "sm_90a", &ce, &edited) == 6, "a source that differs from the built one fails to compile");
    expect(load("elementwise.cu", "sm_100a", &ce) == 1000 + 209, "an image for a newer GPU does not load");
    expect(load("cross_entropy.cu", "sm_80", &ce) == 0, "sm_80 code loads on compute capability 9.0");
    cuModuleGetFunction(&loss_sum, ce, "beit_cross_entropy_loss_sum");

    const uintptr_t x = upload({1, 2, 3, 4}), y = upload({10, 20, 30, 40});
    uintptr_t out = 0;
    cuMemAlloc_v2(&out, 4 * 4);
    long long n = 4;
    void* args[] = {(void*)&x, (void*)&y, (void*)&out, &n};
    expect(cuLaunchKernel(add, 1, 1, 1, 64, 1, 1, 0, nullptr, args, nullptr) == 0 && download(out, 4)[3] == 44,
           "beit_add_f32 adds");
    expect(cuLaunchKernel(add, 1, 1, 1, 1025, 1, 1, 0, nullptr, args, nullptr) == 1, "a block of 1025 threads is refused");
    expect(cuLaunchKernel(add, 1, 65536, 1, 32, 1, 1, 0, nullptr, args, nullptr) == 1, "grid y of 65536 is refused");
    double s = 2.0;  // the kernel's parameter is a float: the mock reads 4 bytes of this double
    void* axpy_args[] = {&s, (void*)&x, (void*)&out, &n};
    cuLaunchKernel(axpy, 1, 1, 1, 32, 1, 1, 0, nullptr, axpy_args, nullptr);
    expect(download(out, 4)[3] == 44, "a double passed for a float parameter reads as 0 (wrong result, as on a GPU)");
    long long too_many = 8;  // out holds 4 floats
    void* over[] = {(void*)&x, (void*)&y, (void*)&out, &too_many};
    cuLaunchKernel(add, 1, 1, 1, 32, 1, 1, 0, nullptr, over, nullptr);
    expect(cuCtxSynchronize() == 700, "a kernel writing past an allocation is reported at the next synchronisation");
    expect(cuCtxSynchronize() == 0, "and only once");
    const uintptr_t freed = upload({1});
    cuMemFree_v2(freed);
    void* stale[] = {(void*)&freed, (void*)&y, (void*)&out, &n};
    expect(cuLaunchKernel(add, 1, 1, 1, 32, 1, 1, 0, nullptr, stale, nullptr) == 1, "a freed pointer argument is refused");
    int rows = 1;
    void* ls_args[] = {(void*)&out, (void*)&x, &rows};
    expect(cuLaunchKernel(loss_sum, 1, 1, 1, 512, 1, 1, 0, nullptr, ls_args, nullptr) == 701,
           "more threads than __launch_bounds__(256) allow are refused");
}

// cuBLASLt: D[m x n] = A[m x k] B[k x n], column-major.
struct Gemm {
    void *h = nullptr, *desc = nullptr, *la = nullptr, *lb = nullptr, *lc = nullptr, *pref = nullptr;
    unsigned char result[96] = {};  // cublasLtMatmulHeuristicResult_t
    Gemm(int in, int out, int m, int n, int k, int epilogue = 1) {
        cublasLtCreate(&h);
        cublasLtMatmulDescCreate(&desc, 68, 0);
        cublasLtMatmulDescSetAttribute(desc, 7, &epilogue, 4);
        cublasLtMatrixLayoutCreate(&la, in, m, k, m);
        cublasLtMatrixLayoutCreate(&lb, in, k, n, k);
        cublasLtMatrixLayoutCreate(&lc, out, m, n, m);
        cublasLtMatmulPreferenceCreate(&pref);
    }
    int heuristic() {
        int count = 0;
        const int e = cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 1, result, &count);
        return e ? e : count == 1 ? 0 : -1;
    }
    int run(uintptr_t a, uintptr_t b, uintptr_t d, float beta = 0.0f) {
        const float alpha = 1.0f;
        return cublasLtMatmul(h, desc, &alpha, (void*)a, la, (void*)b, lb, &beta, (void*)d, lc, (void*)d, lc, result,
                              nullptr, 0, nullptr);
    }
};

static void blas_cases() {
    expect(Gemm(0, 14, 2, 2, 2).heuristic() == 15, "32F inputs with a 16BF output: no algorithm (NOT_SUPPORTED)");
    Gemm g(0, 0, 2, 2, 3);
    const int64_t eight = 8;
    expect(cublasLtMatmulDescSetAttribute(g.desc, 3, &eight, 8) == 7, "TRANSA given 8 bytes (it is an int32) is refused");
    expect(g.heuristic() == 0, "32F GEMM: an algorithm");
    // A = [[1,2,3],[4,5,6]], B = [[1,0],[0,1],[1,1]] -> D = [[4,5],[10,11]] (column-major storage)
    const uintptr_t a = upload({1, 4, 2, 5, 3, 6}), b = upload({1, 0, 1, 0, 1, 1}), d = upload({NAN, NAN, NAN, NAN});
    expect(g.run(a, b, d) == 0, "it runs");
    std::vector<float> r = download(d, 4);
    expect(r[0] == 4 && r[1] == 10 && r[2] == 5 && r[3] == 11, "D = A B, and beta 0 does not read C's NaNs");
    expect(g.run(a, b, a) == 7, "an output overlapping an input is refused");
    expect(g.run(a + 4, b, d) == 7, "an operand running past its allocation is refused");
    uint32_t sixteen = 16;
    Gemm aligned(0, 0, 2, 2, 3);
    cublasLtMatmulPreferenceSetAttribute(aligned.pref, 5, &sixteen, 4);
    aligned.heuristic();
    const uintptr_t a_off = upload({0, 1, 4, 2, 5, 3, 6}) + 4;
    expect(aligned.run(a_off, b, d) == 7, "A less aligned than the heuristic was told is refused");
    Gemm other(0, 0, 2, 2, 2);
    memcpy(other.result, g.result, sizeof g.result);
    expect(other.run(a, b, d) == 7, "an algorithm reused for a different shape is refused");
    Gemm gelu(14, 14, 12, 2, 3, 164);  // GELU_AUX_BIAS
    uintptr_t bias = 0, aux = 0;
    cuMemAlloc_v2(&bias, 64);
    cuMemAlloc_v2(&aux, 1024);
    cublasLtMatmulDescSetAttribute(gelu.desc, 8, &bias, 8);
    cublasLtMatmulDescSetAttribute(gelu.desc, 11, &aux, 8);
    const int64_t ld12 = 12, ld16 = 16;
    cublasLtMatmulDescSetAttribute(gelu.desc, 12, &ld12, 8);
    expect(gelu.heuristic() == 7, "a GELU aux leading dimension that is not a multiple of 8 is refused");
    cublasLtMatmulDescSetAttribute(gelu.desc, 12, &ld16, 8);
    expect(gelu.heuristic() == 0, "a multiple of 8 is accepted");
    const int f32 = 0;
    cublasLtMatmulDescSetAttribute(gelu.desc, 26, &f32, 4);
    expect(gelu.heuristic() == 15, "a 32F bias with a 16BF output is refused");
}

int main(int argc, char** argv) {
    root = argc > 1 ? argv[1] : ".";
    void* ctx = nullptr;
    cuInit(0);
    cuDevicePrimaryCtxRetain(&ctx, 0);
    cuCtxSetCurrent(ctx);
    memory_cases();
    kernel_cases();
    blas_cases();
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures != 0;
}
