// The NVRTC half of the CUDA mock (libnvrtc): "compiling" checks that the source is the cuda/
// file the mock was built from (and its headers the same .cuh files), and the result is a
// placeholder image naming the file, the architecture and the file's kernels, which
// cuModuleLoadData accepts and whose kernels cuModuleGetFunction finds among the emulated ones.
#include <cstring>
#include <string>
#include <vector>

#include "mock.h"

#define API extern "C" __attribute__((visibility("default"))) int
#define LOCKED std::lock_guard<std::recursive_mutex> locked(mock::lock())

namespace {

enum : int {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
};

struct Program {
    std::string source, name;
    std::vector<std::pair<std::string, std::string>> headers;  // (name, text)
    std::string log, image;
    bool compiled = false;
};

bool starts(const std::string& s, const char* prefix) { return s.compare(0, strlen(prefix), prefix) == 0; }

int compile(Program& p, const std::vector<std::string>& options) {
    std::string arch;
    for (const auto& o : options) {
        if (starts(o, "--gpu-architecture=") || starts(o, "-arch="))
            arch = o.substr(o.find('=') + 1);
        else if (!(starts(o, "--std=") || starts(o, "-std=") || starts(o, "--include-path=") || starts(o, "-I") ||
                   starts(o, "--ptxas-options=") || starts(o, "-D") || o == "-lineinfo" || o == "--use_fast_math" ||
                   o == "-default-device")) {
            p.log = "nvrtc: error: unrecognized option " + o;
            return NVRTC_ERROR_INVALID_OPTION;
        }
    }
    if (arch.empty()) arch = "compute_75";  // NVRTC's default: PTX only, which has no cubin
    const char* built = mock::source_text(p.name);
    if (!built) {
        p.log = "cuda-mock NVRTC: " + p.name + " is not among the cuda/ files the mock was built from (rerun scripts/cuda-mock)";
        return NVRTC_ERROR_COMPILATION;
    }
    if (p.source != built) {
        p.log = "cuda-mock NVRTC: the text of " + p.name + " differs from the cuda/" + p.name +
                " the mock was built from (rerun scripts/cuda-mock)";
        return NVRTC_ERROR_COMPILATION;
    }
    for (const auto& [name, text] : p.headers) {
        const char* h = mock::source_text(name);
        if (h && text != h) {
            p.log = "cuda-mock NVRTC: header " + name + " differs from the one the mock was built from (rerun scripts/cuda-mock)";
            return NVRTC_ERROR_COMPILATION;
        }
    }
    std::string names;
    for (auto* k : mock::kernels_of(p.name)) names += std::string(names.empty() ? "" : " ") + k->name;
    p.log = "cuda-mock NVRTC: " + p.name + " for " + arch + " is the emulated build of this text; kernels: " + names;
    p.image = "BEIT-CUDA-MOCK-IMAGE\nfile=" + p.name + "\narch=" + arch + "\nkernels=" + names + "\n";
    p.compiled = true;
    return NVRTC_SUCCESS;
}

}  // namespace

API nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 13;
    *minor = 0;
    return NVRTC_SUCCESS;
}

extern "C" __attribute__((visibility("default"))) const char* nvrtcGetErrorString(int code) {
    switch (code) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR unknown";
    }
}

API nvrtcCreateProgram(Program** prog, const char* src, const char* name, int num_headers, const char* const* headers,
                       const char* const* include_names) {
    LOCKED;
    if (!prog || !src || num_headers < 0 || (num_headers > 0 && (!headers || !include_names)))
        return NVRTC_ERROR_INVALID_INPUT;
    auto* p = new Program{src, name ? name : "default_program", {}, {}, {}, false};
    for (int i = 0; i < num_headers; ++i) p->headers.emplace_back(include_names[i], headers[i]);
    *prog = p;
    return NVRTC_SUCCESS;
}

API nvrtcDestroyProgram(Program** prog) {
    LOCKED;
    if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
    delete *prog;
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

API nvrtcCompileProgram(Program* prog, int num_options, const char* const* options) {
    LOCKED;
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    if (num_options < 0 || (num_options > 0 && !options)) return NVRTC_ERROR_INVALID_INPUT;
    std::vector<std::string> opts(options, options + num_options);
    return compile(*prog, opts);
}

API nvrtcGetProgramLogSize(Program* prog, size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    *size = prog->log.size() + 1;
    return NVRTC_SUCCESS;
}
API nvrtcGetProgramLog(Program* prog, char* log) {
    if (!prog || !log) return NVRTC_ERROR_INVALID_INPUT;
    memcpy(log, prog->log.c_str(), prog->log.size() + 1);
    return NVRTC_SUCCESS;
}

// The image goes out NUL-terminated: cuModuleLoadData gets no length.
static int image_size(Program* prog, size_t* size, bool cubin) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    if (!prog->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    if (cubin && prog->image.find("arch=compute_") != std::string::npos)
        return mock::fail(NVRTC_ERROR_INVALID_INPUT, "nvrtcGetCUBIN: %s was compiled for a virtual architecture (no cubin)",
                          prog->name.c_str());
    *size = prog->image.size() + 1;
    return NVRTC_SUCCESS;
}
API nvrtcGetCUBINSize(Program* prog, size_t* size) { return image_size(prog, size, true); }
API nvrtcGetPTXSize(Program* prog, size_t* size) { return image_size(prog, size, false); }
API nvrtcGetCUBIN(Program* prog, char* out) {
    size_t n = 0;
    if (int e = image_size(prog, &n, true)) return e;
    memcpy(out, prog->image.c_str(), n);
    return NVRTC_SUCCESS;
}
API nvrtcGetPTX(Program* prog, char* out) {
    size_t n = 0;
    if (int e = image_size(prog, &n, false)) return e;
    memcpy(out, prog->image.c_str(), n);
    return NVRTC_SUCCESS;
}
