// The driver half of the CUDA mock (libcuda): the fake device, the primary context, device
// memory with guard bytes, modules that name emulated kernels, and cuLaunchKernel. See mock.h.
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <set>

#include "mock.h"

#define API extern "C" __attribute__((visibility("default"))) int
#define LOCKED std::lock_guard<std::recursive_mutex> locked(mock::lock())

namespace mock {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}

size_t memory_limit() {
    static const size_t limit = [] {
        const char* e = getenv("BEIT_CUDA_MOCK_MEMORY_MB");
        return (size_t)(e && *e ? strtoull(e, nullptr, 10) : 8192ull) << 20;
    }();
    return limit;
}

int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("cuda-mock: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    const char* a = getenv("BEIT_CUDA_MOCK_ABORT");
    if (a && *a && strcmp(a, "0") != 0) abort();
    return code;
}

static int g_async_error = 0;
void note_async_error(int code) {
    if (!g_async_error) g_async_error = code;
}
int take_async_error() {
    const int c = g_async_error;
    g_async_error = 0;
    return c;
}

// ------------------------------------------------------------------------------------ memory
constexpr unsigned char kGuardByte = 0xa5, kFreshByte = 0xff;
static std::map<uintptr_t, Alloc>& table() {
    static std::map<uintptr_t, Alloc> t;
    return t;
}
static size_t g_live = 0;
// Freed blocks wait here (NaN-filled) before going back to the host allocator, so that a stale
// pointer does not soon alias a new allocation and pass the checks.
static std::deque<std::pair<char*, size_t>> g_quarantine;
static size_t g_quarantined = 0;
constexpr size_t kQuarantineBytes = 256u << 20;

static size_t padded(size_t bytes) { return (bytes + 255) / 256 * 256; }

uintptr_t alloc(size_t bytes, int* status) {
    if (bytes == 0) {
        *status = fail(CUDA_ERROR_INVALID_VALUE, "cuMemAlloc: zero bytes requested (the real driver refuses this too)");
        return 0;
    }
    if (bytes > memory_limit() || g_live + bytes > memory_limit()) {
        *status = fail(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc: %zu bytes with %zu live exceed the mock's %zu MiB",
                       bytes, g_live, memory_limit() >> 20);
        return 0;
    }
    const size_t total = padded(bytes) + 2 * kGuard;
    char* raw = (char*)aligned_alloc(256, total);
    if (!raw) {
        *status = fail(CUDA_ERROR_OUT_OF_MEMORY, "cuMemAlloc: the host has no %zu bytes", total);
        return 0;
    }
    memset(raw, kGuardByte, kGuard);
    memset(raw + kGuard, kFreshByte, bytes);
    memset(raw + kGuard + bytes, kGuardByte, total - kGuard - bytes);
    const uintptr_t base = (uintptr_t)(raw + kGuard);
    table()[base] = Alloc{base, bytes};
    g_live += bytes;
    *status = CUDA_SUCCESS;
    return base;
}

bool check_guards(const Alloc& a, const char* when) {
    unsigned char* lo = (unsigned char*)a.base - kGuard;
    unsigned char* hi = (unsigned char*)a.base + a.size;
    const size_t hi_len = padded(a.size) + kGuard - a.size;
    for (size_t i = 0; i < kGuard; ++i)
        if (lo[i] != kGuardByte) {
            fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                 "%s: memory before the allocation at 0x%lx (%zu bytes) was overwritten (first changed byte %zu before its start)",
                 when, (unsigned long)a.base, a.size, kGuard - i);
            memset(lo, kGuardByte, kGuard);
            return false;
        }
    for (size_t i = 0; i < hi_len; ++i)
        if (hi[i] != kGuardByte) {
            fail(CUDA_ERROR_ILLEGAL_ADDRESS,
                 "%s: memory after the allocation at 0x%lx (%zu bytes) was overwritten (first changed byte %zu past its end)", when,
                 (unsigned long)a.base, a.size, i);
            memset(hi, kGuardByte, hi_len);
            return false;
        }
    return true;
}

bool check_all_guards(const char* when) {
    bool ok = true;
    for (auto& [base, a] : table()) ok = check_guards(a, when) && ok;
    return ok;
}

int free_alloc(uintptr_t ptr, const char* what) {
    auto it = table().find(ptr);
    if (it == table().end()) {
        const Alloc* in = find(ptr);
        if (in)
            return fail(CUDA_ERROR_INVALID_VALUE, "%s: 0x%lx is %lu bytes into the allocation at 0x%lx, not its start",
                        what, (unsigned long)ptr, (unsigned long)(ptr - in->base), (unsigned long)in->base);
        return fail(CUDA_ERROR_INVALID_VALUE, "%s: 0x%lx is not a live allocation (freed twice?)", what,
                    (unsigned long)ptr);
    }
    const Alloc a = it->second;
    const bool guards = check_guards(a, what);
    table().erase(it);
    g_live -= a.size;
    char* raw = (char*)a.base - kGuard;
    const size_t total = padded(a.size) + 2 * kGuard;
    memset(raw, kFreshByte, total);
    g_quarantine.emplace_back(raw, total);
    g_quarantined += total;
    while (g_quarantined > kQuarantineBytes) {
        free(g_quarantine.front().first);
        g_quarantined -= g_quarantine.front().second;
        g_quarantine.pop_front();
    }
    if (!guards) note_async_error(CUDA_ERROR_ILLEGAL_ADDRESS);
    return CUDA_SUCCESS;
}

const Alloc* find(uintptr_t p) {
    auto& t = table();
    auto it = t.upper_bound(p);
    if (it == t.begin()) return nullptr;
    --it;
    return p <= it->second.base + it->second.size ? &it->second : nullptr;
}

bool in_range(const char* what, uintptr_t p, size_t bytes) {
    if (bytes == 0) return true;
    const Alloc* a = find(p);
    if (!a || p == a->base + a->size) {
        fail(CUDA_ERROR_INVALID_VALUE, "%s: 0x%lx (%zu bytes) is not in any live allocation", what, (unsigned long)p,
             bytes);
        return false;
    }
    if (p + bytes > a->base + a->size) {
        fail(CUDA_ERROR_INVALID_VALUE,
             "%s: [0x%lx, +%zu) runs %zu bytes past the end of the allocation at 0x%lx (%zu bytes; offset %zu)", what,
             (unsigned long)p, bytes, (size_t)(p + bytes - a->base - a->size), (unsigned long)a->base, a->size,
             (size_t)(p - a->base));
        return false;
    }
    return true;
}

// ---------------------------------------------------------------------------- kernels, sources
static std::map<std::string, Kernel*>& kernels() {
    static std::map<std::string, Kernel*> k;  // "file/name"
    return k;
}
void register_kernel(Kernel* k) { kernels()[std::string(k->file) + "/" + k->name] = k; }
Kernel* find_kernel(const std::string& file, const std::string& name) {
    auto it = kernels().find(file + "/" + name);
    return it == kernels().end() ? nullptr : it->second;
}
std::vector<Kernel*> kernels_of(const std::string& file) {
    std::vector<Kernel*> out;
    for (auto& [key, k] : kernels())
        if (file == k->file) out.push_back(k);
    return out;
}
static std::map<std::string, const char*>& sources() {
    static std::map<std::string, const char*> s;
    return s;
}
void register_source(const char* name, const char* text) { sources()[name] = text; }
const char* source_text(const std::string& name) {
    auto it = sources().find(name);
    return it == sources().end() ? nullptr : it->second;
}

bool check_pointer_arg(const Kernel& k, int index, uintptr_t p) {
    if (p == 0 || find(p)) return true;
    fail(CUDA_ERROR_INVALID_VALUE,
         "cuLaunchKernel %s: pointer parameter %d is 0x%lx, not in any live allocation (freed, or arguments out of "
         "order?)",
         k.name, index, (unsigned long)p);
    return false;
}

void run_kernel_checks(const Kernel& k, const std::vector<uintptr_t>& pointers) {
    std::set<uintptr_t> seen;
    char when[160];
    snprintf(when, sizeof when, "after kernel %s (%s)", k.name, k.file);
    for (uintptr_t p : pointers) {
        const Alloc* a = p ? find(p) : nullptr;
        if (a && seen.insert(a->base).second && !check_guards(*a, when)) note_async_error(CUDA_ERROR_ILLEGAL_ADDRESS);
    }
}

// ---------------------------------------------------------------------------------- contexts
struct Context {
    int refs = 0;
};
static Context g_primary;
static thread_local Context* t_current = nullptr;
static bool g_initialised = false;
void* current_context() { return t_current; }
void bind_primary_context() {
    if (!t_current) t_current = &g_primary;
}
bool require_context(const char* what) {
    if (t_current == &g_primary && g_primary.refs > 0) return true;
    fail(CUDA_ERROR_INVALID_CONTEXT, "%s: no current CUDA context on this thread (cuCtxSetCurrent first)", what);
    return false;
}

}  // namespace mock

using namespace mock;

static bool stream_ok(void* s, const char* what) {
    const uintptr_t v = (uintptr_t)s;
    if (v <= 2) return true;  // the NULL, legacy and per-thread default streams
    fail(CUDA_ERROR_INVALID_HANDLE, "%s: stream %p is not a default stream (the mock has no other)", what, s);
    return false;
}

#define NEED_INIT \
    if (!g_initialised) return fail(CUDA_ERROR_NOT_INITIALIZED, "%s before cuInit", __func__)
#define NEED_CTX \
    NEED_INIT;   \
    if (!require_context(__func__)) return CUDA_ERROR_INVALID_CONTEXT

struct ErrorText {
    int code;
    const char *name, *text;
};
static const ErrorText kErrors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
};
API cuGetErrorString(int code, const char** out) {
    for (const auto& e : kErrors)
        if (e.code == code) return *out = e.text, CUDA_SUCCESS;
    *out = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}
API cuGetErrorName(int code, const char** out) {
    for (const auto& e : kErrors)
        if (e.code == code) return *out = e.name, CUDA_SUCCESS;
    *out = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

API cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = kDriverVersion;
    return CUDA_SUCCESS;
}
API cuInit(unsigned flags) {
    LOCKED;
    if (flags != 0) return fail(CUDA_ERROR_INVALID_VALUE, "cuInit: flags must be 0, got %u", flags);
    g_initialised = true;
    return CUDA_SUCCESS;
}
API cuDeviceGetCount(int* n) {
    NEED_INIT;
    *n = 1;
    return CUDA_SUCCESS;
}
static int check_device(int dev, const char* what) {
    if (!g_initialised) return fail(CUDA_ERROR_NOT_INITIALIZED, "%s before cuInit", what);
    if (dev != 0) return fail(CUDA_ERROR_INVALID_DEVICE, "%s: device %d (the mock has device 0 only)", what, dev);
    return CUDA_SUCCESS;
}
API cuDeviceGet(int* dev, int ordinal) {
    if (int e = check_device(ordinal, __func__)) return e;
    *dev = 0;
    return CUDA_SUCCESS;
}
API cuDeviceGetName(char* name, int len, int dev) {
    if (int e = check_device(dev, __func__)) return e;
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", kDeviceName);
    return CUDA_SUCCESS;
}
API cuDeviceTotalMem_v2(size_t* bytes, int dev) {
    if (int e = check_device(dev, __func__)) return e;
    *bytes = memory_limit();
    return CUDA_SUCCESS;
}
API cuDeviceGetAttribute(int* v, int attrib, int dev) {
    if (int e = check_device(dev, __func__)) return e;
    switch (attrib) {
        case 1: case 2: case 3: *v = 1024; break;         // max threads per block, block x / y
        case 4: *v = 64; break;                           // block z
        case 5: *v = 2147483647; break;                   // grid x
        case 6: case 7: *v = 65535; break;                // grid y, z
        case 8: *v = kStaticSharedLimit; break;           // shared memory per block
        case 10: *v = 32; break;                          // warp size
        case 16: *v = kMultiprocessors; break;
        case 75: *v = kMajor; break;
        case 76: *v = kMinor; break;
        case 97: *v = kSharedOptinLimit; break;           // opt-in shared memory per block
        case 115: *v = 1; break;                          // memory pools (cuMemAllocAsync)
        default: return fail(CUDA_ERROR_INVALID_VALUE, "cuDeviceGetAttribute: attribute %d is not emulated", attrib);
    }
    return CUDA_SUCCESS;
}

API cuDevicePrimaryCtxRetain(void** ctx, int dev) {
    LOCKED;
    if (int e = check_device(dev, __func__)) return e;
    g_primary.refs++;
    *ctx = &g_primary;
    return CUDA_SUCCESS;
}
API cuDevicePrimaryCtxRelease_v2(int dev) {
    LOCKED;
    if (int e = check_device(dev, __func__)) return e;
    if (g_primary.refs == 0) return fail(CUDA_ERROR_INVALID_CONTEXT, "cuDevicePrimaryCtxRelease: not retained");
    g_primary.refs--;
    return CUDA_SUCCESS;
}
API cuCtxGetCurrent(void** ctx) {
    NEED_INIT;
    *ctx = t_current;
    return CUDA_SUCCESS;
}
API cuCtxSetCurrent(void* ctx) {
    NEED_INIT;
    if (ctx && (ctx != &g_primary || g_primary.refs == 0))
        return fail(CUDA_ERROR_INVALID_CONTEXT, "cuCtxSetCurrent: %p is not a live context", ctx);
    t_current = (Context*)ctx;
    return CUDA_SUCCESS;
}

// Synchronisation points: every guard checked, and an earlier kernel's error reported.
static int synchronise(const char* what) {
    check_all_guards(what);
    const int e = take_async_error();
    if (e) fail(e, "%s: reporting an error of earlier work (see the messages above)", what);
    return e;
}
API cuCtxSynchronize() {
    LOCKED;
    NEED_CTX;
    return synchronise(__func__);
}
API cuStreamSynchronize(void* stream) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, __func__)) return CUDA_ERROR_INVALID_HANDLE;
    return synchronise(__func__);
}

API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    LOCKED;
    NEED_CTX;
    *free_bytes = memory_limit() - g_live;
    *total = memory_limit();
    return CUDA_SUCCESS;
}
API cuMemAlloc_v2(uintptr_t* ptr, size_t bytes) {
    LOCKED;
    NEED_CTX;
    int status;
    *ptr = alloc(bytes, &status);
    return status;
}
API cuMemAllocAsync(uintptr_t* ptr, size_t bytes, void* stream) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, __func__)) return CUDA_ERROR_INVALID_HANDLE;
    int status;
    *ptr = alloc(bytes, &status);
    return status;
}
API cuMemFree_v2(uintptr_t ptr) {
    LOCKED;
    NEED_CTX;
    return free_alloc(ptr, __func__);
}
API cuMemFreeAsync(uintptr_t ptr, void* stream) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, __func__)) return CUDA_ERROR_INVALID_HANDLE;
    return free_alloc(ptr, __func__);
}

static int copy_in(uintptr_t dst, const void* src, size_t n, void* stream, const char* what) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, what)) return CUDA_ERROR_INVALID_HANDLE;
    if (!in_range(what, dst, n)) return CUDA_ERROR_INVALID_VALUE;
    memcpy((void*)dst, src, n);
    return CUDA_SUCCESS;
}
API cuMemcpyHtoD_v2(uintptr_t dst, const void* src, size_t n) { return copy_in(dst, src, n, nullptr, __func__); }
API cuMemcpyHtoDAsync_v2(uintptr_t dst, const void* src, size_t n, void* s) { return copy_in(dst, src, n, s, __func__); }

static int copy_out(void* dst, uintptr_t src, size_t n, void* stream, const char* what) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, what)) return CUDA_ERROR_INVALID_HANDLE;
    if (!in_range(what, src, n)) return CUDA_ERROR_INVALID_VALUE;
    if (int e = synchronise(what)) return e;  // the host waits for the work writing `src`
    memcpy(dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
API cuMemcpyDtoH_v2(void* dst, uintptr_t src, size_t n) { return copy_out(dst, src, n, nullptr, __func__); }
API cuMemcpyDtoHAsync_v2(void* dst, uintptr_t src, size_t n, void* s) { return copy_out(dst, src, n, s, __func__); }

API cuMemcpyDtoDAsync_v2(uintptr_t dst, uintptr_t src, size_t n, void* stream) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, __func__)) return CUDA_ERROR_INVALID_HANDLE;
    if (!in_range("cuMemcpyDtoDAsync destination", dst, n) || !in_range("cuMemcpyDtoDAsync source", src, n))
        return CUDA_ERROR_INVALID_VALUE;
    if (n && dst < src + n && src < dst + n)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuMemcpyDtoDAsync: source and destination overlap (undefined on a GPU)");
    memcpy((void*)dst, (const void*)src, n);
    return CUDA_SUCCESS;
}
API cuMemsetD8Async(uintptr_t dst, unsigned char v, size_t n, void* stream) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, __func__)) return CUDA_ERROR_INVALID_HANDLE;
    if (!in_range(__func__, dst, n)) return CUDA_ERROR_INVALID_VALUE;
    memset((void*)dst, v, n);
    return CUDA_SUCCESS;
}

// ----------------------------------------------------------------------------------- modules
// An "image" from the mock NVRTC is text:
// "BEIT-CUDA-MOCK-IMAGE\nfile=<name>\narch=<arch>\nkernels=<name> <name>...\n".
struct Module {
    std::string file;
    std::set<std::string> kernels;  // as the image lists them
};
static std::set<Module*> g_modules;
static const char kImageMagic[] = "BEIT-CUDA-MOCK-IMAGE\n";

API cuModuleLoadData(void** module, const void* image) {
    LOCKED;
    NEED_CTX;
    const char* text = (const char*)image;
    if (!text) return CUDA_ERROR_INVALID_VALUE;
    if (memcmp(text, "\x7f" "ELF", 4) == 0)
        return fail(CUDA_ERROR_INVALID_IMAGE,
                    "cuModuleLoadData: a real cubin (from a kernel cache a real NVRTC filled?); the mock runs only the "
                    "images of its own NVRTC (set BEIT_CACHE_DIR to a fresh directory)");
    if (strncmp(text, kImageMagic, sizeof kImageMagic - 1) != 0)
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: not an image of the mock NVRTC");
    const char* f = strstr(text, "file=");
    const char* a = strstr(text, "arch=");
    const char* ks = strstr(text, "kernels=");
    if (!f || !a || !ks) return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: malformed mock image");
    const std::string file(f + 5, strcspn(f + 5, "\n")), arch(a + 5, strcspn(a + 5, "\n"));
    std::set<std::string> listed;
    for (const char* k = ks + 8; *k && *k != '\n'; k += strspn(k, " ")) {
        const size_t len = strcspn(k, " \n");
        listed.emplace(k, len);
        k += len;
    }
    // sm_XY runs on compute capability >= X.Y; the arch-specific sm_XYa only on exactly X.Y.
    int cc = 0;
    char suffix = 0;
    if (sscanf(arch.c_str(), "sm_%d%c", &cc, &suffix) < 1)
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: %s was compiled for %s, not a real architecture",
                    file.c_str(), arch.c_str());
    const int device_cc = kMajor * 10 + kMinor;
    if (cc > device_cc || (suffix == 'a' && cc != device_cc))
        return fail(CUDA_ERROR_NO_BINARY_FOR_GPU, "cuModuleLoadData: %s was compiled for %s; the device is sm_%d",
                    file.c_str(), arch.c_str(), device_cc);
    if (kernels_of(file).empty())
        return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: the mock has no kernels of %s", file.c_str());
    for (const auto& name : listed)
        if (!find_kernel(file, name))
            return fail(CUDA_ERROR_INVALID_IMAGE, "cuModuleLoadData: the image of %s lists %s, which the mock lacks",
                        file.c_str(), name.c_str());
    Module* m = new Module{file, listed};
    g_modules.insert(m);
    *module = m;
    return CUDA_SUCCESS;
}
API cuModuleUnload(void* module) {
    LOCKED;
    NEED_INIT;
    if (!g_modules.erase((Module*)module)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleUnload: %p", module);
    delete (Module*)module;
    return CUDA_SUCCESS;
}
API cuModuleGetFunction(void** fn, void* module, const char* name) {
    LOCKED;
    NEED_CTX;
    if (!g_modules.count((Module*)module)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuModuleGetFunction: %p", module);
    Module* m = (Module*)module;
    Kernel* k = name && m->kernels.count(name) ? find_kernel(m->file, name) : nullptr;
    if (!k)
        return fail(CUDA_ERROR_NOT_FOUND, "cuModuleGetFunction: no kernel %s in %s", name ? name : "(null)",
                    ((Module*)module)->file.c_str());
    *fn = k;
    return CUDA_SUCCESS;
}

// The kernel behind a CUfunction handle, or null when `f` is not one of a loaded module.
static Kernel* loaded(void* f) {
    for (auto& m : g_modules)
        for (auto* k : kernels_of(m->file))
            if (k == f) return k;
    return nullptr;
}

API cuFuncGetAttribute(int* v, int attrib, void* f) {
    LOCKED;
    NEED_CTX;
    Kernel* k = loaded(f);
    if (!k) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncGetAttribute: %p is not a function", f);
    switch (attrib) {
        case 0: *v = k->max_threads ? k->max_threads : 1024; break;  // max threads per block
        case 1: *v = k->static_shared_seen; break;                   // static shared bytes (as seen)
        case 8: *v = k->max_dynamic_shared; break;
        default: return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncGetAttribute: attribute %d is not emulated", attrib);
    }
    return CUDA_SUCCESS;
}
API cuFuncSetAttribute(void* f, int attrib, int v) {
    LOCKED;
    NEED_CTX;
    Kernel* k = loaded(f);
    if (!k) return fail(CUDA_ERROR_INVALID_HANDLE, "cuFuncSetAttribute: %p is not a function", f);
    if (attrib != 8) return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute: attribute %d is not emulated", attrib);
    if (v < 0 || v > kSharedOptinLimit)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuFuncSetAttribute: %d bytes of dynamic shared memory (limit %d)", v,
                    kSharedOptinLimit);
    k->max_dynamic_shared = v;
    return CUDA_SUCCESS;
}

API cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void* stream, void** params, void** extra) {
    LOCKED;
    NEED_CTX;
    if (!stream_ok(stream, __func__)) return CUDA_ERROR_INVALID_HANDLE;
    if (!loaded(f)) return fail(CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: %p is not a loaded function", f);
    Kernel& k = *loaded(f);
    if (!gx || !gy || !gz || !bx || !by || !bz)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: empty grid (%u,%u,%u) or block (%u,%u,%u)", k.name,
                    gx, gy, gz, bx, by, bz);
    if (gx > 2147483647u || gy > 65535 || gz > 65535)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: grid (%u,%u,%u) exceeds (2^31-1, 65535, 65535)",
                    k.name, gx, gy, gz);
    if (bx > 1024 || by > 1024 || bz > 64 || (unsigned long)bx * by * bz > 1024)
        return fail(CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel %s: block (%u,%u,%u) exceeds 1024 threads or (1024,1024,64)",
                    k.name, bx, by, bz);
    if (k.max_threads && bx * by * bz > (unsigned)k.max_threads)
        return fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "cuLaunchKernel %s: %u threads per block; its __launch_bounds__ allow %d",
                    k.name, bx * by * bz, k.max_threads);
    const int shared_limit = k.max_dynamic_shared > 0 ? k.static_shared_seen + k.max_dynamic_shared : kStaticSharedLimit;
    if ((int)shared + k.static_shared_seen > shared_limit)
        return fail(CUDA_ERROR_INVALID_VALUE,
                    "cuLaunchKernel %s: %u bytes of dynamic shared memory plus %d static exceed the %d-byte limit", k.name,
                    shared, k.static_shared_seen, shared_limit);
    if (shared)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel %s: dynamic shared memory is not emulated", k.name);
    if (by != 1 || bz != 1)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel %s: the emulator runs 1-D blocks only", k.name);
    if (!params || extra)
        return fail(CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel %s: only kernelParams are emulated (no `extra`)", k.name);
    if (int e = k.run(k, gx, gy, gz, bx, params)) return e;
    if (k.static_shared_seen > kStaticSharedLimit) {
        fail(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "kernel %s wrote %d bytes of static shared memory (limit %d)", k.name,
             k.static_shared_seen, kStaticSharedLimit);
        note_async_error(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES);
    }
    return CUDA_SUCCESS;
}
