// The cuBLASLt half of the CUDA mock: descriptors that check their attributes' sizes, a heuristic
// that refuses what cuBLASLt's documented type table refuses (cublasLtMatmul, "Datatypes
// Supported": for CUBLAS_COMPUTE_32F with scale type 32F, A/B and C/D types (16BF,16BF), (16F,16F),
// (16BF,32F), (16F,32F), (32F,32F), (8I,32F without epilogue); bias and aux of D's type; the GELU
// aux leading dimension a multiple of 8 and at least D's rows), and a plain column-major reference
// GEMM with fp32 accumulation and the epilogues libbeit uses. What the mock cannot emulate
// (16F data, row-major or tiled orders, pointer modes other than host, epilogues with batches) it
// refuses with CUBLAS_STATUS_NOT_SUPPORTED and a message saying it is the mock's limit.
#include <cmath>
#include <cstring>
#include <string>

#include "mock.h"

#define API extern "C" __attribute__((visibility("default"))) int
#define LOCKED std::lock_guard<std::recursive_mutex> locked(mock::lock())

namespace {

enum : int {
    OK = 0,
    NOT_INITIALIZED = 1,
    INVALID_VALUE = 7,
    EXECUTION_FAILED = 13,
    NOT_SUPPORTED = 15,
};
enum : int { R_32F = 0, R_16F = 2, R_8I = 3, R_16BF = 14 };
enum : uint32_t {
    EPI_DEFAULT = 1,
    EPI_BIAS = 4,
    EPI_GELU = 32,
    EPI_GELU_BIAS = 36,
    EPI_GELU_AUX = 160,
    EPI_GELU_AUX_BIAS = 164,
    EPI_DGELU = 192,
    EPI_BGRADA = 256,
    EPI_BGRADB = 512,
};

struct Handle {
    int magic = 0x4c74;
};
struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int32_t batch = 1, order = 0;
    int64_t stride = 0;
};
struct Desc {
    int32_t compute, scale, pointer_mode = 0, transa = 0, transb = 0, transc = 0;
    uint32_t epilogue = EPI_DEFAULT;
    uintptr_t bias = 0, aux = 0;
    int64_t aux_ld = 0, aux_stride = 0, bias_stride = 0;
    int32_t bias_type = -1, aux_type = -1;
};
struct Pref {
    uint64_t max_workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D
    uint32_t search_mode = 0;
};
struct Algo {  // lives in cublasLtMatmulAlgo_t's 64 bytes
    uint64_t magic, signature;
    uint32_t align[6];  // A, B, C, D, bias, aux: what the heuristic was told / saw
    uint64_t workspace;
    uint64_t unused[2];
};
static_assert(sizeof(Algo) == 64, "cublasLtMatmulAlgo_t is 8 x u64");
struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
    Algo algo;
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};
constexpr uint64_t kAlgoMagic = 0xbe17c0dabe17c0daull;

template <typename V>
int set(V& field, const void* buf, size_t size, const char* what) {
    if (!buf || size != sizeof(V))
        return mock::fail(INVALID_VALUE, "%s: value of %zu bytes, the attribute holds %zu", what, size, sizeof(V));
    memcpy(&field, buf, sizeof(V));
    return OK;
}

size_t elem_size(int type) { return type == R_32F ? 4 : type == R_8I ? 1 : 2; }
const char* type_name(int t) {
    return t == R_32F ? "32F" : t == R_16BF ? "16BF" : t == R_16F ? "16F" : t == R_8I ? "8I" : "?";
}
bool has_bias(uint32_t e) { return e == EPI_BIAS || e == EPI_GELU_BIAS || e == EPI_GELU_AUX_BIAS || e == EPI_BGRADA || e == EPI_BGRADB; }
bool has_aux(uint32_t e) { return e == EPI_GELU_AUX || e == EPI_GELU_AUX_BIAS || e == EPI_DGELU; }
uint32_t alignment(uintptr_t p) { return p ? 1u << std::min(__builtin_ctzll(p), 8) : 256; }
// Elements a column-major layout spans (all batches).
uint64_t span(const Layout& l) {
    return (uint64_t)(l.batch - 1) * (uint64_t)l.stride + (l.cols - 1) * (uint64_t)l.ld + l.rows;
}

// Is the problem one cuBLASLt runs (and the mock emulates)? m x n is D, k the inner dimension.
int validate(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl, uint64_t* k_out) {
    if (d.compute != 68 && d.compute != 69 && d.compute != 74 && d.compute != 75 && d.compute != 77 && d.compute != 78)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: compute type %d is not emulated (COMPUTE_32F variants only)", d.compute);
    if (d.scale != R_32F)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: COMPUTE_32F needs scale type 32F, got %d", d.scale);
    if (a.type != b.type || c.type != dl.type)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: A/B types %s/%s and C/D types %s/%s must pair up", type_name(a.type),
                          type_name(b.type), type_name(c.type), type_name(dl.type));
    const bool fast = d.compute != 68 && d.compute != 69;
    const int in = a.type, out = dl.type;
    const bool listed = fast ? (in == R_32F && out == R_32F)
                             : ((in == R_16BF && (out == R_16BF || out == R_32F)) ||
                                (in == R_16F && (out == R_16F || out == R_32F)) || (in == R_32F && out == R_32F) ||
                                (in == R_8I && out == R_32F));
    if (!listed)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: A/B %s with C/D %s is not a supported combination for compute type %d",
                          type_name(in), type_name(out), d.compute);
    if (in == R_8I && d.epilogue != EPI_DEFAULT)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: 8I inputs support no epilogue");
    if (in == R_16F || in == R_8I)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: %s data is supported by cuBLASLt but not emulated by the mock", type_name(in));
    if (a.order || b.order || c.order || dl.order)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: only column-major (CUBLASLT_ORDER_COL) layouts are emulated");
    if (d.pointer_mode != 0) return mock::fail(NOT_SUPPORTED, "cuBLASLt: only host alpha/beta are emulated");
    if (d.transc != 0) return mock::fail(NOT_SUPPORTED, "cuBLASLt: TRANSC must be CUBLAS_OP_N");
    if ((d.transa != 0 && d.transa != 1) || (d.transb != 0 && d.transb != 1))
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: transposes %d/%d are not emulated (N and T only)", d.transa, d.transb);
    const uint64_t m = dl.rows, n = dl.cols;
    const uint64_t am = d.transa ? a.cols : a.rows, ak = d.transa ? a.rows : a.cols;
    const uint64_t bk = d.transb ? b.cols : b.rows, bn = d.transb ? b.rows : b.cols;
    if (am != m || bn != n || ak != bk || c.rows != m || c.cols != n)
        return mock::fail(INVALID_VALUE,
                          "cuBLASLt: shapes do not fit: op(A) %lux%lu, op(B) %lux%lu, C %lux%lu, D %lux%lu",
                          (unsigned long)am, (unsigned long)ak, (unsigned long)bk, (unsigned long)bn,
                          (unsigned long)c.rows, (unsigned long)c.cols, (unsigned long)m, (unsigned long)n);
    for (const Layout* l : {&a, &b, &c, &dl})
        if (l->ld < (int64_t)std::max<uint64_t>(l->rows, 1) || l->rows == 0 || l->cols == 0 || l->batch < 1)
            return mock::fail(INVALID_VALUE, "cuBLASLt: a layout %lux%lu with ld %ld, batch %d", (unsigned long)l->rows,
                              (unsigned long)l->cols, (long)l->ld, l->batch);
    if (a.batch != dl.batch || b.batch != dl.batch || c.batch != dl.batch)
        return mock::fail(INVALID_VALUE, "cuBLASLt: batch counts A %d, B %d, C %d, D %d differ", a.batch, b.batch,
                          c.batch, dl.batch);
    const uint32_t e = d.epilogue;
    if (e != EPI_DEFAULT && e != EPI_BIAS && e != EPI_GELU && e != EPI_GELU_BIAS && e != EPI_GELU_AUX &&
        e != EPI_GELU_AUX_BIAS && e != EPI_DGELU && e != EPI_BGRADA && e != EPI_BGRADB)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: epilogue %u is not emulated", e);
    if (e != EPI_DEFAULT && dl.batch > 1)
        return mock::fail(NOT_SUPPORTED, "cuBLASLt: epilogues with batches are not emulated");
    if (has_bias(e)) {
        if (!d.bias) return mock::fail(INVALID_VALUE, "cuBLASLt: epilogue %u without CUBLASLT_MATMUL_DESC_BIAS_POINTER", e);
        if (d.bias_type != -1 && d.bias_type != out)
            return mock::fail(NOT_SUPPORTED, "cuBLASLt: bias type %s with D %s (the table lists D's type)",
                              type_name(d.bias_type), type_name(out));
    }
    if (has_aux(e)) {
        if (!d.aux) return mock::fail(INVALID_VALUE, "cuBLASLt: epilogue %u without CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER", e);
        if (d.aux_ld % 8 != 0 || d.aux_ld < (int64_t)m)
            return mock::fail(INVALID_VALUE,
                              "cuBLASLt: GELU aux leading dimension %ld must be a multiple of 8 and at least D's %lu rows",
                              (long)d.aux_ld, (unsigned long)m);
        if (d.aux_type != -1 && d.aux_type != out)
            return mock::fail(NOT_SUPPORTED, "cuBLASLt: aux type %s with D %s is not emulated", type_name(d.aux_type),
                              type_name(out));
    }
    *k_out = ak;
    return OK;
}

uint64_t signature(const Desc& d, const Layout* ls[4]) {
    uint64_t h = 0xcbf29ce484222325ull;
    auto mix = [&](const void* p, size_t n) {
        for (size_t i = 0; i < n; ++i) h = (h ^ ((const unsigned char*)p)[i]) * 0x100000001b3ull;
    };
    const int32_t fields[] = {d.compute, d.scale, d.transa, d.transb, (int32_t)d.epilogue, d.bias_type, d.aux_type};
    mix(fields, sizeof fields);
    mix(&d.aux_ld, sizeof d.aux_ld);
    for (int i = 0; i < 4; ++i) {
        const int64_t v[] = {ls[i]->type, (int64_t)ls[i]->rows, (int64_t)ls[i]->cols, ls[i]->ld, ls[i]->batch, ls[i]->stride};
        mix(v, sizeof v);
    }
    return h;
}

float load(int type, uintptr_t base, uint64_t i) {
    if (type == R_32F) return ((const float*)base)[i];
    uint32_t u = (uint32_t)((const uint16_t*)base)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
void store(int type, uintptr_t base, uint64_t i, float v) {
    if (type == R_32F) {
        ((float*)base)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    const uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    ((uint16_t*)base)[i] = bits;
}

// GELU with the tanh approximation, as cuBLASLt's epilogues compute it, and its derivative.
float gelu(float x) {
    const float c = 0.7978845608028654f, t = std::tanh(c * (x + 0.044715f * x * x * x));
    return 0.5f * x * (1.0f + t);
}
float gelu_grad(float x) {
    const float c = 0.7978845608028654f, t = std::tanh(c * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
}

bool overlaps(uintptr_t p, uint64_t pn, uintptr_t q, uint64_t qn) { return p < q + qn && q < p + pn; }

}  // namespace

API cublasLtCreate(Handle** h) {
    LOCKED;
    if (!h) return INVALID_VALUE;
    mock::bind_primary_context();  // cuBLASLt goes through the CUDA runtime, which does this
    *h = new Handle;
    return OK;
}
API cublasLtDestroy(Handle* h) {
    LOCKED;
    if (!h || h->magic != 0x4c74) return NOT_INITIALIZED;
    delete h;
    return OK;
}

API cublasLtMatrixLayoutCreate(Layout** l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!l) return INVALID_VALUE;
    if (type != R_32F && type != R_16BF && type != R_16F && type != R_8I)
        return mock::fail(NOT_SUPPORTED, "cublasLtMatrixLayoutCreate: data type %d is not emulated", type);
    *l = new Layout{type, rows, cols, ld};
    return OK;
}
API cublasLtMatrixLayoutDestroy(Layout* l) {
    delete l;
    return OK;
}
API cublasLtMatrixLayoutSetAttribute(Layout* l, int attr, const void* buf, size_t size) {
    if (!l) return INVALID_VALUE;
    switch (attr) {
        case 1: return set(l->order, buf, size, "CUBLASLT_MATRIX_LAYOUT_ORDER");
        case 5: return set(l->batch, buf, size, "CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT");
        case 6: return set(l->stride, buf, size, "CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET");
        default: return mock::fail(NOT_SUPPORTED, "cublasLtMatrixLayoutSetAttribute: attribute %d is not emulated", attr);
    }
}

API cublasLtMatmulDescCreate(Desc** d, int compute, int scale) {
    if (!d) return INVALID_VALUE;
    *d = new Desc{compute, scale};
    return OK;
}
API cublasLtMatmulDescDestroy(Desc* d) {
    delete d;
    return OK;
}
API cublasLtMatmulDescSetAttribute(Desc* d, int attr, const void* buf, size_t size) {
    if (!d) return INVALID_VALUE;
    switch (attr) {
        case 0: return set(d->compute, buf, size, "CUBLASLT_MATMUL_DESC_COMPUTE_TYPE");
        case 1: return set(d->scale, buf, size, "CUBLASLT_MATMUL_DESC_SCALE_TYPE");
        case 2: return set(d->pointer_mode, buf, size, "CUBLASLT_MATMUL_DESC_POINTER_MODE");
        case 3: return set(d->transa, buf, size, "CUBLASLT_MATMUL_DESC_TRANSA");
        case 4: return set(d->transb, buf, size, "CUBLASLT_MATMUL_DESC_TRANSB");
        case 5: return set(d->transc, buf, size, "CUBLASLT_MATMUL_DESC_TRANSC");
        case 7: return set(d->epilogue, buf, size, "CUBLASLT_MATMUL_DESC_EPILOGUE");
        case 8: return set(d->bias, buf, size, "CUBLASLT_MATMUL_DESC_BIAS_POINTER");
        case 10: return set(d->bias_stride, buf, size, "CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE");
        case 11: return set(d->aux, buf, size, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER");
        case 12: return set(d->aux_ld, buf, size, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD");
        case 13: return set(d->aux_stride, buf, size, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE");
        case 22: return set(d->aux_type, buf, size, "CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE");
        case 26: return set(d->bias_type, buf, size, "CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE");
        default: return mock::fail(NOT_SUPPORTED, "cublasLtMatmulDescSetAttribute: attribute %d is not emulated", attr);
    }
}

API cublasLtMatmulPreferenceCreate(Pref** p) {
    if (!p) return INVALID_VALUE;
    *p = new Pref;
    return OK;
}
API cublasLtMatmulPreferenceDestroy(Pref* p) {
    delete p;
    return OK;
}
API cublasLtMatmulPreferenceSetAttribute(Pref* p, int attr, const void* buf, size_t size) {
    if (!p) return INVALID_VALUE;
    switch (attr) {
        case 0: return set(p->search_mode, buf, size, "CUBLASLT_MATMUL_PREF_SEARCH_MODE");
        case 1: return set(p->max_workspace, buf, size, "CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES");
        case 5: case 6: case 7: case 8: {
            uint32_t v = 0;
            if (int e = set(v, buf, size, "CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES")) return e;
            if (v == 0 || (v & (v - 1)))
                return mock::fail(INVALID_VALUE, "cuBLASLt: minimum alignment %u is not a power of two", v);
            p->align[attr - 5] = v;
            return OK;
        }
        default: return mock::fail(NOT_SUPPORTED, "cublasLtMatmulPreferenceSetAttribute: attribute %d is not emulated", attr);
    }
}

API cublasLtMatmulAlgoGetHeuristic(Handle* h, Desc* d, Layout* a, Layout* b, Layout* c, Layout* dl, Pref* p,
                                   int requested, HeuristicResult* results, int* count) {
    LOCKED;
    if (!h || h->magic != 0x4c74) return NOT_INITIALIZED;
    if (!d || !a || !b || !c || !dl || !p || requested < 1 || !results || !count) return INVALID_VALUE;
    *count = 0;
    uint64_t k;
    if (int e = validate(*d, *a, *b, *c, *dl, &k)) return e;
    const Layout* ls[4] = {a, b, c, dl};
    HeuristicResult r{};
    r.algo.magic = kAlgoMagic;
    r.algo.signature = signature(*d, ls);
    for (int i = 0; i < 4; ++i) r.algo.align[i] = p->align[i];
    // Like cuBLASLt, the heuristic reads the epilogue pointers' alignment from their values.
    r.algo.align[4] = alignment(d->bias);
    r.algo.align[5] = alignment(d->aux);
    r.algo.workspace = std::min<uint64_t>(p->max_workspace, 64 * 1024);  // scribbled on by each matmul
    r.workspace = r.algo.workspace;
    r.state = OK;
    r.waves = 1.0f;
    results[0] = r;
    *count = 1;
    return OK;
}

API cublasLtMatmul(Handle* h, Desc* d, const void* alpha_p, const void* a_p, Layout* a, const void* b_p, Layout* b,
                   const void* beta_p, const void* c_p, Layout* c, void* d_p, Layout* dl, const Algo* algo,
                   void* ws, size_t ws_size, void* stream) {
    LOCKED;
    if (!h || h->magic != 0x4c74) return NOT_INITIALIZED;
    if (!d || !a || !b || !c || !dl || !alpha_p || !beta_p) return INVALID_VALUE;
    if ((uintptr_t)stream > 2) return mock::fail(INVALID_VALUE, "cublasLtMatmul: the mock has only the default stream");
    mock::bind_primary_context();
    uint64_t k;
    if (int e = validate(*d, *a, *b, *c, *dl, &k)) return e;
    const Layout* ls[4] = {a, b, c, dl};
    const uintptr_t A = (uintptr_t)a_p, B = (uintptr_t)b_p, C = (uintptr_t)c_p, D = (uintptr_t)d_p;
    const uint64_t m = dl->rows, n = dl->cols;
    const uint32_t e = d->epilogue;
    const uintptr_t ptrs[6] = {A, B, C, D, d->bias, d->aux};
    const char* names[6] = {"A", "B", "C", "D", "bias", "aux"};
    if (algo) {
        if (algo->magic != kAlgoMagic) return mock::fail(INVALID_VALUE, "cublasLtMatmul: algo not from the heuristic");
        if (algo->signature != signature(*d, ls))
            return mock::fail(INVALID_VALUE,
                              "cublasLtMatmul: the algo was chosen by the heuristic for a different problem (%lux%lux%lu "
                              "now): cache the algo by every descriptor and layout field",
                              (unsigned long)m, (unsigned long)n, (unsigned long)k);
        for (int i = 0; i < 6; ++i)
            if (ptrs[i] && ptrs[i] % algo->align[i] != 0)
                return mock::fail(INVALID_VALUE,
                                  "cublasLtMatmul: %s at 0x%lx is %u-byte aligned; the algo was chosen for %u-byte "
                                  "alignment (say the real alignment in the preference, or cache the algo by it)",
                                  names[i], (unsigned long)ptrs[i], alignment(ptrs[i]), algo->align[i]);
        if (algo->workspace) {
            if (!ws || ws_size < algo->workspace || (uintptr_t)ws % 256)
                return mock::fail(INVALID_VALUE, "cublasLtMatmul: the algo needs %lu bytes of 256-aligned workspace, got %zu at %p",
                                  (unsigned long)algo->workspace, ws_size, ws);
            if (!mock::in_range("cublasLtMatmul workspace", (uintptr_t)ws, ws_size)) return INVALID_VALUE;
            memset(ws, 0xff, algo->workspace);
        }
    }
    const float alpha = *(const float*)alpha_p, beta = *(const float*)beta_p;
    const size_t in_size = elem_size(a->type), out_size = elem_size(dl->type);
    const uint64_t bias_len = e == EPI_BGRADB ? n : m;
    const uint64_t aux_len = (uint64_t)d->aux_ld * (n - 1) + m;
    struct Operand {
        const char* what;
        uintptr_t p;
        uint64_t bytes;
        bool output;
    } ops[] = {{"cublasLtMatmul A", A, span(*a) * in_size, false},
               {"cublasLtMatmul B", B, span(*b) * in_size, false},
               {"cublasLtMatmul C", beta != 0.0f ? C : 0, span(*c) * out_size, false},
               {"cublasLtMatmul D", D, span(*dl) * out_size, true},
               {"cublasLtMatmul bias", has_bias(e) ? d->bias : 0, bias_len * out_size, e == EPI_BGRADA || e == EPI_BGRADB},
               {"cublasLtMatmul aux", has_aux(e) ? d->aux : 0, aux_len * out_size, e != EPI_DGELU}};
    for (const auto& o : ops)
        if (o.p && !mock::in_range(o.what, o.p, o.bytes)) return INVALID_VALUE;
    for (int o = 0; o < 6; ++o)  // an output may not overlap another operand (C == D in place aside)
        for (int i = 0; i < 6; ++i)
            if (ops[o].output && ops[o].p && ops[i].p && o != i && !(o == 3 && i == 2 && C == D && c->ld == dl->ld) &&
                overlaps(ops[o].p, ops[o].bytes, ops[i].p, ops[i].bytes))
                return mock::fail(INVALID_VALUE, "%s overlaps %s (undefined on a GPU)", ops[o].what, ops[i].what);

    // The product, batch by batch: each op(A) row and op(B) column gathered to contiguous fp32,
    // dot products in fp32 with 8 partial sums (a fixed order: deterministic).
    std::vector<float> arow(k), bcols(k * n), grad(e == EPI_BGRADA || e == EPI_BGRADB ? bias_len : 0, 0.0f);
    for (int batch = 0; batch < dl->batch; ++batch) {
        const uint64_t oa = batch * a->stride, ob = batch * b->stride, oc = batch * c->stride, od = batch * dl->stride;
        for (uint64_t j = 0; j < n; ++j)
            for (uint64_t kk = 0; kk < k; ++kk)
                bcols[j * k + kk] = load(b->type, B, ob + (d->transb ? kk * b->ld + j : j * b->ld + kk));
        if (e == EPI_BGRADB)
            for (uint64_t j = 0; j < n; ++j)
                for (uint64_t kk = 0; kk < k; ++kk) grad[j] += bcols[j * k + kk];
        for (uint64_t i = 0; i < m; ++i) {
            for (uint64_t kk = 0; kk < k; ++kk)
                arow[kk] = load(a->type, A, oa + (d->transa ? i * a->ld + kk : kk * a->ld + i));
            if (e == EPI_BGRADA)
                for (uint64_t kk = 0; kk < k; ++kk) grad[i] += arow[kk];
            for (uint64_t j = 0; j < n; ++j) {
                const float* bc = &bcols[j * k];
                float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                uint64_t kk = 0;
                for (; kk + 8 <= k; kk += 8)
                    for (int u = 0; u < 8; ++u) s[u] += arow[kk + u] * bc[kk + u];
                for (; kk < k; ++kk) s[kk % 8] += arow[kk] * bc[kk];
                float v = alpha * (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
                if (beta != 0.0f) v += beta * load(c->type, C, oc + j * c->ld + i);
                if (e == EPI_BIAS || e == EPI_GELU_BIAS || e == EPI_GELU_AUX_BIAS) v += load(dl->type, d->bias, i);
                if (e == EPI_GELU_AUX || e == EPI_GELU_AUX_BIAS) store(dl->type, d->aux, j * d->aux_ld + i, v);
                if (e == EPI_GELU || e == EPI_GELU_BIAS || e == EPI_GELU_AUX || e == EPI_GELU_AUX_BIAS) v = gelu(v);
                if (e == EPI_DGELU) v *= gelu_grad(load(dl->type, d->aux, j * d->aux_ld + i));
                store(dl->type, D, od + j * dl->ld + i, v);
            }
        }
    }
    for (uint64_t i = 0; i < grad.size(); ++i) store(dl->type, d->bias, i, grad[i]);
    return OK;
}
