/*
 * C API test of libbeit, written against include/beit.h only.
 *
 *   test_api [REFERENCE_DIR]      (default tests/reference/mim_shared)
 *   test_api --self               (no reference: a tiny random model stands in for it and the
 *                                  numbers are not compared with transformers)
 *
 * REFERENCE_DIR holds config.json + model.safetensors (a Hugging Face model directory),
 * inputs.safetensors (pixel_values, optional bool_masked_pos) and outputs.safetensors (what
 * transformers produced: last_hidden_state / pooler_output / logits). A minimal safetensors
 * reader below reads them, so the test needs nothing but libc.
 *
 * Prints one line per failed check, a line per section, and finally "N passed, M failed";
 * exits non-zero on any failure. Built by scripts/test-c, which also runs it under valgrind.
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

/* Copies at most `limit` bytes of `from` to `to` (SIZE_MAX: all). */
static int copy_file(const char *from, const char *to, size_t limit) {
    size_t size = 0;
    unsigned char *data = read_file(from, &size);
    if (!data) return -1;
    int rc = write_file(to, data, size < limit ? size : limit);
    free(data);
    return rc;
}

#define PATH_CAP 4096

/* out = a + b (+ c), aborting on overflow (paths here are short; this only guards). */
static void concat3(char *out, size_t cap, const char *a, const char *b, const char *c) {
    size_t la = strlen(a), lb = strlen(b), lc = strlen(c);
    if (la + lb + lc + 1 > cap) {
        fprintf(stderr, "path too long: %s%s%s\n", a, b, c);
        abort();
    }
    memmove(out, a, la);
    memcpy(out + la, b, lb);
    memcpy(out + la + lb, c, lc);
    out[la + lb + lc] = 0;
}

static void path_join(char *out, size_t cap, const char *dir, const char *name) {
    concat3(out, cap, dir, "/", name);
}

/* ------------------------------------------------------------------------------------------ */
/* A minimal safetensors reader: 8-byte little-endian header length, a JSON header mapping    */
/* names to {"dtype", "shape", "data_offsets"}, then the raw data.                            */

typedef struct {
    unsigned char *bytes;
    size_t size;
    char *header; /* NUL-terminated copy of the JSON header */
    const unsigned char *data;
    size_t data_size;
} st_file;

typedef struct {
    char dtype[16];
    size_t shape[8];
    int ndim;
    size_t numel;
    const unsigned char *data;
    size_t nbytes;
} st_tensor;

static void st_close(st_file *f) {
    free(f->bytes);
    free(f->header);
    memset(f, 0, sizeof *f);
}

static int st_open(const char *path, st_file *f) {
    memset(f, 0, sizeof *f);
    f->bytes = read_file(path, &f->size);
    if (!f->bytes || f->size < 8) goto bad;
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | f->bytes[i];
    if (n > f->size - 8) goto bad;
    f->header = malloc((size_t)n + 1);
    if (!f->header) goto bad;
    memcpy(f->header, f->bytes + 8, (size_t)n);
    f->header[n] = 0;
    f->data = f->bytes + 8 + n;
    f->data_size = f->size - 8 - (size_t)n;
    return 0;
bad:
    st_close(f);
    return -1;
}

static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') p++;
    return p;
}

/* Reads `[a, b, ...]` of non-negative integers at p; returns the count or -1. */
static int parse_ints(const char *p, size_t *out, int cap) {
    p = skip_ws(p);
    if (*p != '[') return -1;
    p = skip_ws(p + 1);
    int n = 0;
    if (*p == ']') return 0;
    for (;;) {
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p || n == cap) return -1;
        out[n++] = (size_t)v;
        p = skip_ws(end);
        if (*p == ']') return n;
        if (*p != ',') return -1;
        p = skip_ws(p + 1);
    }
}

/* The value after `"key":` inside [obj, end), or NULL. */
static const char *find_key(const char *obj, const char *end, const char *key) {
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    for (const char *p = strstr(obj, quoted); p && p < end; p = strstr(p + 1, quoted)) {
        const char *q = skip_ws(p + strlen(quoted));
        if (*q == ':') return skip_ws(q + 1);
    }
    return NULL;
}

/* Finds tensor `name`; returns 0 when found and consistent, 1 when absent, -1 when malformed. */
static int st_get(const st_file *f, const char *name, st_tensor *t) {
    memset(t, 0, sizeof *t);
    const char *obj = find_key(f->header, f->header + strlen(f->header), name);
    if (!obj) return 1;
    if (*obj != '{') return -1;
    const char *end = strchr(obj, '}');
    if (!end) return -1;
    const char *dtype = find_key(obj, end, "dtype");
    const char *shape = find_key(obj, end, "shape");
    const char *offsets = find_key(obj, end, "data_offsets");
    if (!dtype || !shape || !offsets || *dtype != '"') return -1;
    size_t i = 0;
    for (dtype++; *dtype && *dtype != '"' && i + 1 < sizeof t->dtype; dtype++) t->dtype[i++] = *dtype;
    t->ndim = parse_ints(shape, t->shape, 8);
    size_t off[2];
    if (t->ndim < 0 || parse_ints(offsets, off, 2) != 2 || off[0] > off[1] || off[1] > f->data_size)
        return -1;
    t->numel = 1;
    for (int d = 0; d < t->ndim; d++) t->numel *= t->shape[d];
    t->data = f->data + off[0];
    t->nbytes = off[1] - off[0];
    return 0;
}

/* A float tensor as a malloc'ed array (F32 only), or NULL when absent or malformed. */
static float *st_f32(const st_file *f, const char *name, st_tensor *t) {
    if (st_get(f, name, t) != 0) return NULL;
    if (strcmp(t->dtype, "F32") != 0 || t->nbytes != t->numel * 4) {
        fprintf(stderr, "tensor %s: dtype %s, %zu bytes for %zu values: expected F32\n", name,
                t->dtype, t->nbytes, t->numel);
        return NULL;
    }
    float *out = malloc(t->numel * sizeof(float) + 1);
    if (out) memcpy(out, t->data, t->nbytes); /* little-endian host assumed */
    return out;
}

/* A 0/1 mask tensor (BOOL, U8 or an integer type) as malloc'ed bytes, or NULL. */
static uint8_t *st_mask(const st_file *f, const char *name, st_tensor *t) {
    if (st_get(f, name, t) != 0 || t->numel == 0) return NULL;
    size_t width = t->nbytes / t->numel;
    if (width * t->numel != t->nbytes || (width != 1 && width != 4 && width != 8)) return NULL;
    uint8_t *out = malloc(t->numel);
    if (!out) return NULL;
    for (size_t i = 0; i < t->numel; i++) out[i] = t->data[i * width] != 0;
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* Helpers around the API                                                                      */

/* |got - want| <= 1e-4 * max(1, |want|) everywhere; returns the number of violations. */
static size_t compare(const char *what, const float *got, const float *want, size_t n) {
    size_t bad = 0;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double tol = 1e-4 * (fabs(want[i]) > 1.0 ? fabs(want[i]) : 1.0);
        double err = fabs((double)got[i] - (double)want[i]);
        if (!(err <= tol)) {
            if (bad < 5)
                fprintf(stderr, "    %s[%zu] = %.7g, transformers says %.7g\n", what, i, got[i], want[i]);
            bad++;
        }
        if (err / tol > worst) worst = err / tol;
    }
    printf("     %-18s %zu values, worst error / tolerance = %.4f\n", what, n, worst);
    return bad;
}

typedef struct {
    float *hidden, *pooled, *logits;
    beit_output_sizes sizes;
} outputs_t;

static void outputs_free(outputs_t *o) {
    free(o->hidden);
    free(o->pooled);
    free(o->logits);
    memset(o, 0, sizeof *o);
}

/* Runs `model` on `input` into freshly allocated buffers for every output it has. */
static beit_status run_all(beit_context *ctx, const beit_model *model, const beit_image_batch *input,
                           outputs_t *o) {
    memset(o, 0, sizeof *o);
    o->sizes = beit_output_sizes_default();
    beit_status st = beit_model_output_sizes(model, input->batch, input->height, input->width, &o->sizes);
    if (st != BEIT_OK) return st;
    beit_infer_outputs out = beit_infer_outputs_default();
    out.last_hidden_state = o->hidden = calloc(o->sizes.last_hidden_state_len, sizeof(float));
    out.last_hidden_state_len = o->sizes.last_hidden_state_len;
    if (o->sizes.pooler_output_len) {
        out.pooler_output = o->pooled = calloc(o->sizes.pooler_output_len, sizeof(float));
        out.pooler_output_len = o->sizes.pooler_output_len;
    }
    if (o->sizes.logits_len) {
        out.logits = o->logits = calloc(o->sizes.logits_len, sizeof(float));
        out.logits_len = o->sizes.logits_len;
    }
    return beit_model_infer(ctx, model, input, &out);
}

static int same_bits(const float *a, const float *b, size_t n) {
    if (n == 0) return 1;
    return a != NULL && b != NULL && memcmp(a, b, n * sizeof(float)) == 0;
}

static int outputs_identical(const outputs_t *a, const outputs_t *b) {
    return a->sizes.last_hidden_state_len == b->sizes.last_hidden_state_len &&
           same_bits(a->hidden, b->hidden, a->sizes.last_hidden_state_len) &&
           same_bits(a->pooled, b->pooled, a->sizes.pooler_output_len) &&
           same_bits(a->logits, b->logits, a->sizes.logits_len);
}

/* A tiny masked-image-modeling config: 8x8 images, 4x4 patches (4 patches), mask token. */
static const char *TINY_MIM =
    "{\"hidden_size\": 8, \"num_hidden_layers\": 2, \"num_attention_heads\": 2,"
    " \"intermediate_size\": 16, \"image_size\": 8, \"patch_size\": 4, \"vocab_size\": 5,"
    " \"use_mask_token\": true, \"use_shared_relative_position_bias\": true,"
    " \"layer_scale_init_value\": 0.1}";

/* ------------------------------------------------------------------------------------------ */
/* The reference case                                                                          */

typedef struct {
    char dir[PATH_CAP];
    float *pixels;
    size_t pixels_len;
    size_t shape[4];
    uint8_t *mask;
    size_t mask_len;
    st_file outputs; /* empty in --self mode */
    int have_outputs;
} reference_t;

static void reference_free(reference_t *r) {
    free(r->pixels);
    free(r->mask);
    if (r->have_outputs) st_close(&r->outputs);
}

static int load_reference(const char *dir, reference_t *r) {
    char path[PATH_CAP];
    st_file in;
    st_tensor t;
    concat3(r->dir, sizeof r->dir, dir, "", "");
    path_join(path, sizeof path, dir, "inputs.safetensors");
    if (st_open(path, &in) != 0) {
        fprintf(stderr, "cannot read %s (a reference case directory is needed; see the top of %s)\n",
                path, __FILE__);
        return -1;
    }
    r->pixels = st_f32(&in, "pixel_values", &t);
    if (!r->pixels || t.ndim != 4) {
        fprintf(stderr, "%s: no 4-d F32 pixel_values\n", path);
        st_close(&in);
        return -1;
    }
    r->pixels_len = t.numel;
    memcpy(r->shape, t.shape, sizeof r->shape);
    r->mask = st_mask(&in, "bool_masked_pos", &t);
    r->mask_len = r->mask ? t.numel : 0;
    st_close(&in);
    path_join(path, sizeof path, dir, "outputs.safetensors");
    if (st_open(path, &r->outputs) != 0) {
        fprintf(stderr, "cannot read %s\n", path);
        return -1;
    }
    r->have_outputs = 1;
    return 0;
}

/* --self: a tiny random MIM model saved to `dir`, with deterministic inputs. */
static int make_self_reference(beit_context *ctx, const char *dir, reference_t *r) {
    beit_model *m = NULL;
    concat3(r->dir, sizeof r->dir, dir, "", "");
    if (beit_model_create(ctx, TINY_MIM, BEIT_ARCH_MASKED_IMAGE_MODELING, 1234, &m) != BEIT_OK ||
        beit_model_save(m, dir) != BEIT_OK) {
        fprintf(stderr, "cannot make the stand-in model: %s\n", beit_last_error_message());
        beit_model_free(m);
        return -1;
    }
    beit_model_free(m);
    size_t shape[4] = {2, 3, 8, 8};
    memcpy(r->shape, shape, sizeof shape);
    r->pixels_len = 2 * 3 * 8 * 8;
    r->pixels = malloc(r->pixels_len * sizeof(float));
    for (size_t i = 0; i < r->pixels_len; i++) r->pixels[i] = (float)sin(0.37 * (double)i);
    r->mask_len = 2 * 4;
    r->mask = calloc(r->mask_len, 1);
    r->mask[1] = r->mask[6] = 1;
    return 0;
}

static beit_image_batch reference_batch(const reference_t *r) {
    beit_image_batch b = beit_image_batch_default();
    b.pixels = r->pixels;
    b.pixels_len = r->pixels_len;
    b.batch = r->shape[0];
    b.channels = r->shape[1];
    b.height = r->shape[2];
    b.width = r->shape[3];
    b.bool_masked_pos = r->mask;
    b.bool_masked_pos_len = r->mask_len;
    return b;
}

/* ------------------------------------------------------------------------------------------ */
/* Threads: one model and one context shared by several threads.                              */

typedef struct {
    beit_context *ctx;
    const beit_model *model;
    const beit_image_batch *input;
    const outputs_t *expected;
    int mismatches;
    int errors;
} thread_job;

static void *thread_main(void *arg) {
    thread_job *job = arg;
    for (int i = 0; i < 3; i++) {
        outputs_t o;
        beit_status st = run_all(job->ctx, job->model, job->input, &o);
        if (st != BEIT_OK) job->errors++;
        else if (!outputs_identical(&o, job->expected)) job->mismatches++;
        outputs_free(&o);
        /* The last error message is per thread. */
        beit_model_infer(job->ctx, job->model, NULL, NULL);
        if (strstr(beit_last_error_message(), "input is NULL") == NULL) job->errors++;
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    const char *ref_dir = argc > 1 ? argv[1] : "tests/reference/mim_shared";
    int self_mode = strcmp(ref_dir, "--self") == 0;
    char tmp[] = "/tmp/beit-c-test-XXXXXX";
    char path[PATH_CAP], path2[PATH_CAP], dir_x[PATH_CAP];
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 2;
    }
    printf("libbeit %s (ABI %u), header %d.%d.%d (ABI %d); reference %s; scratch %s\n", beit_version(),
           beit_abi_version(), BEIT_VERSION_MAJOR, BEIT_VERSION_MINOR, BEIT_VERSION_PATCH,
           BEIT_ABI_VERSION, self_mode ? "--self (numbers not compared with transformers)" : ref_dir,
           tmp);

    /* ---- versions and status names */
    {
        char v[64];
        snprintf(v, sizeof v, "%d.%d.%d", BEIT_VERSION_MAJOR, BEIT_VERSION_MINOR, BEIT_VERSION_PATCH);
        CHECK(strcmp(beit_version(), v) == 0, "beit_version() %s != header %s", beit_version(), v);
        CHECK(beit_abi_version() == BEIT_ABI_VERSION, "ABI %u != %d", beit_abi_version(), BEIT_ABI_VERSION);
        CHECK(strcmp(beit_status_name(BEIT_OK), "BEIT_OK") == 0, "status name");
        CHECK(strcmp(beit_status_name(BEIT_ERR_BUFFER_SIZE), "BEIT_ERR_BUFFER_SIZE") == 0, "status name");
        CHECK(strcmp(beit_status_name((beit_status)1234), "BEIT_UNKNOWN_STATUS") == 0, "unknown status");
        CHECK(beit_last_error_message() != NULL && beit_last_error_message()[0] == '\0',
              "no error yet: message must be \"\"");
        section("version, ABI, status names");
    }

    /* ---- contexts */
    beit_context *ctx = NULL;
    {
        beit_context_options o = beit_context_options_default();
        CHECK(o.struct_size == sizeof o && o.device == BEIT_DEVICE_AUTO && o.num_threads == 0, "defaults");
        o.device = BEIT_DEVICE_CPU;
        o.num_threads = 2;
        EXPECT_OK(beit_context_create(&o, &ctx));
        CHECK(ctx != NULL, "context created");

        beit_context *c2 = NULL;
        EXPECT_OK(beit_context_create(NULL, &c2)); /* NULL options = defaults */
        beit_context_free(c2);

        /* A struct from a newer header (larger struct_size) is accepted. */
        struct {
            beit_context_options o;
            uint64_t future_field;
        } newer = {beit_context_options_default(), 42};
        newer.o.struct_size = sizeof newer;
        newer.o.num_threads = 1;
        c2 = NULL;
        EXPECT_OK(beit_context_create(&newer.o, &c2));
        beit_context_free(c2);

        beit_context *untouched = (beit_context *)(uintptr_t)0x10;
        beit_context_options bad = beit_context_options_default();
        bad.struct_size = 0;
        EXPECT_ERR(beit_context_create(&bad, &untouched), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        bad.struct_size = 4;
        EXPECT_ERR(beit_context_create(&bad, &untouched), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        bad = beit_context_options_default();
        bad.device = (beit_device)9;
        EXPECT_ERR(beit_context_create(&bad, &untouched), BEIT_ERR_INVALID_ARGUMENT, "device");
        bad = beit_context_options_default();
        bad.num_threads = 100000;
        EXPECT_ERR(beit_context_create(&bad, &untouched), BEIT_ERR_INVALID_ARGUMENT, "thread");
        CHECK(untouched == (beit_context *)(uintptr_t)0x10, "out written on failure");
        EXPECT_ERR(beit_context_create(NULL, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");

        bad = beit_context_options_default();
        bad.device = BEIT_DEVICE_CUDA;
        c2 = NULL;
        beit_status st = beit_context_create(&bad, &c2);
        if (st == BEIT_OK) {
            beit_context_free(c2);
            passed++;
        } else {
            CHECK(st == BEIT_ERR_UNSUPPORTED && strstr(beit_last_error_message(), "cuda") != NULL,
                  "cuda without cuda: %s \"%s\"", beit_status_name(st), beit_last_error_message());
        }
        section("contexts");
    }

    /* ---- a context's memory budget */
    {
        const char *tiny = "{\"hidden_size\": 8, \"num_hidden_layers\": 1, \"num_attention_heads\": 2, "
                           "\"intermediate_size\": 16, \"image_size\": 8, \"patch_size\": 4}";
        beit_context_options o = beit_context_options_default();
        CHECK(o.memory_budget == 0, "the default budget is 0 (the memory available), got %llu",
              (unsigned long long)o.memory_budget);
        o.device = BEIT_DEVICE_CPU;
        o.num_threads = 1;
        o.memory_budget = (uint64_t)1 << 20;
        beit_context *small = NULL;
        EXPECT_OK(beit_context_create(&o, &small));
        beit_model *m = (beit_model *)(uintptr_t)0x20;
        /* BEiT-base ("{}") needs about 350 MB of parameters: refused before any allocation. */
        EXPECT_ERR2(beit_model_create(small, "{}", BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_CONFIG,
                    "memory budget set for this context", "1.0 MiB");
        CHECK(m == (beit_model *)(uintptr_t)0x20, "out written by a refused create");
        m = NULL;
        EXPECT_OK(beit_model_create(small, tiny, BEIT_ARCH_BACKBONE, 1, &m)); /* a tiny one fits */
        beit_model_free(m);
        beit_context_free(small);

        /* A caller built against the first version of the struct: its struct_size ends before
         * memory_budget, so the library must not read it (here a 1-byte budget that would
         * refuse every model) and uses the default. */
        o.struct_size = offsetof(beit_context_options, memory_budget);
        o.memory_budget = 1;
        beit_context *old = NULL;
        EXPECT_OK(beit_context_create(&o, &old));
        m = NULL;
        EXPECT_OK(beit_model_create(old, tiny, BEIT_ARCH_BACKBONE, 1, &m));
        beit_model_free(m);
        beit_context_free(old);
        /* The same budget with the full struct_size is read, and refuses the tiny model. */
        o.struct_size = sizeof o;
        old = NULL;
        EXPECT_OK(beit_context_create(&o, &old));
        m = (beit_model *)(uintptr_t)0x20;
        EXPECT_ERR(beit_model_create(old, tiny, BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_CONFIG,
                   "memory budget set for this context");
        beit_context_free(old);
        section("a context's memory budget; older structs without it");
    }
    if (!ctx) {
        fprintf(stderr, "no context, cannot go on\n");
        printf("%d passed, %d failed\n", passed, failed + 1);
        return 1;
    }

    /* ---- the reference case: load, run, compare with transformers */
    reference_t ref;
    memset(&ref, 0, sizeof ref);
    beit_model *model = NULL;
    outputs_t first;
    memset(&first, 0, sizeof first);
    {
        int ok;
        if (self_mode) {
            path_join(path, sizeof path, tmp, "self_reference");
            ok = make_self_reference(ctx, path, &ref) == 0;
        } else {
            ok = load_reference(ref_dir, &ref) == 0;
        }
        CHECK(ok, "reference case %s unusable", ref_dir);
        if (!ok) {
            reference_free(&ref);
            beit_context_free(ctx);
            remove_tree(tmp);
            printf("%d passed, %d failed\n", passed, failed);
            return 1;
        }
        EXPECT_OK(beit_model_load(ctx, ref.dir, &model));
        CHECK(model != NULL, "model loaded");

        beit_model_info info = beit_model_info_default();
        EXPECT_OK(beit_model_get_info(model, &info));
        CHECK(info.struct_size == sizeof info, "struct_size kept");
        CHECK(info.num_channels == ref.shape[1], "channels %zu vs input %zu", info.num_channels, ref.shape[1]);
        CHECK(info.hidden_size % info.num_heads == 0 && info.num_layers > 0 && info.num_parameters > 0,
              "info plausible");
        printf("     model: arch %u, hidden %zu, layers %zu, heads %zu, %zux%zu images, %zux%zu patches, "
               "%llu parameters, mask token %s; input [%zu, %zu, %zu, %zu]%s\n",
               (unsigned)info.architecture, info.hidden_size, info.num_layers, info.num_heads,
               info.image_height, info.image_width, info.patch_height, info.patch_width,
               (unsigned long long)info.num_parameters, info.has_mask_token ? "yes" : "no", ref.shape[0],
               ref.shape[1], ref.shape[2], ref.shape[3], ref.mask ? " + bool_masked_pos" : "");

        beit_image_batch input = reference_batch(&ref);
        EXPECT_OK(run_all(ctx, model, &input, &first));
        size_t tokens = first.sizes.num_tokens;
        CHECK(first.sizes.last_hidden_state_len == ref.shape[0] * tokens * info.hidden_size,
              "last_hidden_state_len");
        CHECK(tokens == first.sizes.num_patches + 1, "tokens = patches + 1");

        if (ref.have_outputs) {
            int compared = 0;
            const char *names[3] = {"last_hidden_state", "pooler_output", "logits"};
            const float *ours[3] = {first.hidden, first.pooled, first.logits};
            size_t lens[3] = {first.sizes.last_hidden_state_len, first.sizes.pooler_output_len,
                              first.sizes.logits_len};
            for (int i = 0; i < 3; i++) {
                st_tensor t;
                float *want = st_f32(&ref.outputs, names[i], &t);
                if (!want) {
                    CHECK(st_get(&ref.outputs, names[i], &t) == 1, "%s unreadable in outputs.safetensors",
                          names[i]);
                    continue;
                }
                CHECK(ours[i] != NULL && lens[i] == t.numel, "%s: %zu values, transformers has %zu",
                      names[i], lens[i], t.numel);
                if (ours[i] && lens[i] == t.numel) {
                    size_t bad = compare(names[i], ours[i], want, t.numel);
                    CHECK(bad == 0, "%s: %zu of %zu values outside 1e-4", names[i], bad, t.numel);
                    compared++;
                }
                free(want);
            }
            CHECK(compared >= 1, "nothing compared with transformers");
        }
        section("reference case: load, infer, compare with transformers");
    }

    /* ---- save, reload, rerun: bit-identical */
    {
        beit_image_batch input = reference_batch(&ref);
        path_join(dir_x, sizeof dir_x, tmp, "saved");
        EXPECT_OK(beit_model_save(model, dir_x));
        beit_model *again = NULL;
        EXPECT_OK(beit_model_load(ctx, dir_x, &again));
        outputs_t second;
        EXPECT_OK(run_all(ctx, again, &input, &second));
        CHECK(outputs_identical(&first, &second), "outputs after save + load differ");
        outputs_free(&second);
        /* The same model again, the same bits (deterministic). */
        EXPECT_OK(run_all(ctx, model, &input, &second));
        CHECK(outputs_identical(&first, &second), "a second run differs");
        outputs_free(&second);
        beit_model_free(again);
        section("save, reload, rerun: bit-identical");
    }

    /* ---- one model, one context, four threads */
    {
        beit_image_batch input = reference_batch(&ref);
        pthread_t threads[4];
        thread_job jobs[4];
        for (int i = 0; i < 4; i++) {
            jobs[i] = (thread_job){ctx, model, &input, &first, 0, 0};
            CHECK(pthread_create(&threads[i], NULL, thread_main, &jobs[i]) == 0, "pthread_create");
        }
        for (int i = 0; i < 4; i++) {
            pthread_join(threads[i], NULL);
            CHECK(jobs[i].errors == 0 && jobs[i].mismatches == 0, "thread %d: %d errors, %d mismatches", i,
                  jobs[i].errors, jobs[i].mismatches);
        }
        CHECK(beit_last_error_message()[0] == '\0', "other threads' errors leaked into this thread");
        section("one model and context shared by 4 threads");
    }

    /* ---- bad arguments to inference (a tiny MIM model and a tiny backbone) */
    beit_model *mim = NULL, *backbone = NULL;
    {
        EXPECT_OK(beit_model_create(ctx, TINY_MIM, BEIT_ARCH_MASKED_IMAGE_MODELING, 7, &mim));
        EXPECT_OK(beit_model_create(ctx, TINY_MIM, BEIT_ARCH_BACKBONE, 7, &backbone));
        float pixels[2 * 4 * 8 * 8];
        for (size_t i = 0; i < sizeof pixels / sizeof pixels[0]; i++) pixels[i] = (float)cos(0.1 * (double)i);
        uint8_t mask[8] = {0, 1, 0, 0, 1, 0, 0, 1};
        beit_image_batch in = beit_image_batch_default();
        in.pixels = pixels;
        in.pixels_len = 2 * 3 * 8 * 8;
        in.batch = 2;
        in.channels = 3;
        in.height = 8;
        in.width = 8;
        in.bool_masked_pos = mask;
        in.bool_masked_pos_len = 8;
        float logits[2 * 4 * 5], hidden[2 * 5 * 8];
        beit_infer_outputs out = beit_infer_outputs_default();
        out.logits = logits;
        out.logits_len = 40;
        out.last_hidden_state = hidden;
        out.last_hidden_state_len = 80;
        EXPECT_OK(beit_model_infer(ctx, mim, &in, &out));

        /* NULL handles and structs */
        EXPECT_ERR(beit_model_infer(NULL, mim, &in, &out), BEIT_ERR_NULL_POINTER, "ctx is NULL");
        EXPECT_ERR(beit_model_infer(ctx, NULL, &in, &out), BEIT_ERR_NULL_POINTER, "model is NULL");
        EXPECT_ERR(beit_model_infer(ctx, mim, NULL, &out), BEIT_ERR_NULL_POINTER, "input is NULL");
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, NULL), BEIT_ERR_NULL_POINTER, "outputs is NULL");
        beit_image_batch b = in;
        b.pixels = NULL;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_NULL_POINTER, "pixels is NULL");

        /* struct_size */
        b = in;
        b.struct_size = 0;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        b.struct_size = sizeof(size_t) + sizeof(void *);
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        beit_infer_outputs o2 = out;
        o2.struct_size = 1;
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, &o2), BEIT_ERR_INVALID_ARGUMENT, "struct_size");

        /* Structs from a newer header are accepted. */
        struct {
            beit_image_batch b;
            double future[2];
        } newer_in = {in, {1.0, 2.0}};
        newer_in.b.struct_size = sizeof newer_in;
        struct {
            beit_infer_outputs o;
            float *future;
        } newer_out = {out, NULL};
        newer_out.o.struct_size = sizeof newer_out;
        EXPECT_OK(beit_model_infer(ctx, mim, &newer_in.b, &newer_out.o));

        /* Output buffers */
        float sentinel = 12345.0f;
        for (size_t i = 0; i < 40; i++) logits[i] = sentinel;
        o2 = out;
        o2.logits_len = 39;
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, &o2), BEIT_ERR_BUFFER_SIZE, "logits_len is 39");
        CHECK(strstr(beit_last_error_message(), "40") != NULL, "message gives both lengths: %s",
              beit_last_error_message());
        o2 = out;
        o2.last_hidden_state_len = 81;
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, &o2), BEIT_ERR_BUFFER_SIZE, "last_hidden_state_len is 81");
        CHECK(strstr(beit_last_error_message(), "80") != NULL, "message gives both lengths: %s",
              beit_last_error_message());
        o2 = beit_infer_outputs_default();
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, &o2), BEIT_ERR_INVALID_ARGUMENT, "requests nothing");
        float pooled[16];
        o2 = out;
        o2.pooler_output = pooled; /* a MIM model has no pooler */
        o2.pooler_output_len = 16;
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, &o2), BEIT_ERR_INVALID_ARGUMENT, "pooler_output");
        float big[200];
        o2 = out;
        o2.last_hidden_state = big; /* [0, 80) and [50, 90) overlap */
        o2.logits = big + 50;
        EXPECT_ERR(beit_model_infer(ctx, mim, &in, &o2), BEIT_ERR_INVALID_ARGUMENT, "overlaps");

        /* Logits from a backbone */
        beit_image_batch nb = in;
        nb.bool_masked_pos = NULL;
        nb.bool_masked_pos_len = 0;
        o2 = beit_infer_outputs_default();
        o2.logits = logits;
        o2.logits_len = 40;
        EXPECT_ERR(beit_model_infer(ctx, backbone, &nb, &o2), BEIT_ERR_INVALID_ARGUMENT, "logits");
        CHECK(strstr(beit_last_error_message(), "BeitModel") != NULL, "names the class: %s",
              beit_last_error_message());

        /* Pixel tensor shapes */
        b = in;
        b.pixels_len = 2 * 3 * 8 * 8 - 1;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "pixel_values holds 383");
        b = in;
        b.channels = 4;
        b.pixels_len = 2 * 4 * 8 * 8;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "channels");
        b = in;
        b.height = 3;
        b.width = 3;
        b.pixels_len = 2 * 3 * 3 * 3;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "smaller than one");
        b = in;
        b.batch = 0;
        b.pixels_len = 0;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "batch");

        /* bool_masked_pos */
        b = in;
        b.bool_masked_pos_len = 7;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "bool_masked_pos holds 7");
        uint8_t bad_mask[8] = {0, 1, 2, 0, 0, 0, 0, 0};
        b = in;
        b.bool_masked_pos = bad_mask;
        EXPECT_ERR(beit_model_infer(ctx, mim, &b, &out), BEIT_ERR_INVALID_ARGUMENT, "0 or 1");
        CHECK(logits[0] == sentinel && logits[39] == sentinel, "outputs written by a failed call");

        /* output sizes */
        beit_output_sizes s = beit_output_sizes_default();
        EXPECT_OK(beit_model_output_sizes(mim, 2, 8, 8, &s));
        CHECK(s.logits_len == 40 && s.last_hidden_state_len == 80 && s.pooler_output_len == 0 &&
                  s.num_tokens == 5 && s.num_patches == 4,
              "output sizes");
        EXPECT_ERR(beit_model_output_sizes(mim, 2, 2, 8, &s), BEIT_ERR_INVALID_ARGUMENT, "smaller than one");
        EXPECT_ERR(beit_model_output_sizes(NULL, 2, 8, 8, &s), BEIT_ERR_NULL_POINTER, "model is NULL");
        EXPECT_ERR(beit_model_output_sizes(mim, 2, 8, 8, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");
        s.struct_size = 3;
        EXPECT_ERR(beit_model_output_sizes(mim, 2, 8, 8, &s), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        beit_model_info info = beit_model_info_default();
        EXPECT_ERR(beit_model_get_info(NULL, &info), BEIT_ERR_NULL_POINTER, "model is NULL");
        EXPECT_ERR(beit_model_get_info(mim, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");
        info.struct_size = 0;
        EXPECT_ERR(beit_model_get_info(mim, &info), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
        CHECK(info.hidden_size == 0, "info written by a failed call");
        struct {
            beit_model_info i;
            uint64_t future;
        } newer_info;
        memset(&newer_info, 0, sizeof newer_info);
        newer_info.i.struct_size = sizeof newer_info;
        newer_info.future = 77;
        EXPECT_OK(beit_model_get_info(mim, &newer_info.i));
        CHECK(newer_info.i.struct_size == sizeof newer_info && newer_info.future == 77 &&
                  newer_info.i.hidden_size == 8 && newer_info.i.num_patches == 4 &&
                  newer_info.i.vocab_size == 5 && newer_info.i.has_mask_token &&
                  newer_info.i.architecture == BEIT_ARCH_MASKED_IMAGE_MODELING,
              "info into a newer, larger struct");
        section("bad arguments to inference");
    }

    /* ---- bad configs and model directories */
    {
        beit_model *m = (beit_model *)(uintptr_t)0x20;
        EXPECT_ERR(beit_model_create(ctx, "{\"hidden_size\": 10, \"num_attention_heads\": 3}",
                                     BEIT_ARCH_BACKBONE, 1, &m),
                   BEIT_ERR_CONFIG, "num_attention_heads");
        EXPECT_ERR(beit_model_create(ctx, "{\"hidden_size\": 8,", BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_FORMAT,
                   "config");
        EXPECT_ERR(beit_model_create(ctx, "[1, 2]", BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_FORMAT, "config");
        EXPECT_ERR(beit_model_create(ctx, TINY_MIM, (beit_architecture)17, 1, &m), BEIT_ERR_INVALID_ARGUMENT,
                   "arch");
        EXPECT_ERR(beit_model_create(ctx, "\xff\xfe{}", BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_INVALID_ARGUMENT,
                   "UTF-8");
        EXPECT_ERR(beit_model_create(NULL, TINY_MIM, BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_NULL_POINTER,
                   "ctx is NULL");
        EXPECT_ERR(beit_model_create(ctx, NULL, BEIT_ARCH_BACKBONE, 1, &m), BEIT_ERR_NULL_POINTER,
                   "config_json is NULL");
        EXPECT_ERR(beit_model_create(ctx, TINY_MIM, BEIT_ARCH_BACKBONE, 1, NULL), BEIT_ERR_NULL_POINTER,
                   "out is NULL");

        EXPECT_ERR(beit_model_load(ctx, "/nonexistent/beit/model", &m), BEIT_ERR_IO, "does not exist");
        EXPECT_ERR(beit_model_load(NULL, ref.dir, &m), BEIT_ERR_NULL_POINTER, "ctx is NULL");
        EXPECT_ERR(beit_model_load(ctx, NULL, &m), BEIT_ERR_NULL_POINTER, "dir is NULL");
        EXPECT_ERR(beit_model_load(ctx, ref.dir, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");

        char src_cfg[PATH_CAP], src_w[PATH_CAP], dir[PATH_CAP];
        path_join(src_cfg, sizeof src_cfg, ref.dir, "config.json");
        path_join(src_w, sizeof src_w, ref.dir, "model.safetensors");
        size_t wsize = 0;
        unsigned char *weights = read_file(src_w, &wsize);
        CHECK(weights != NULL && wsize > 64, "cannot read %s", src_w);

        /* An empty directory: no config.json */
        path_join(dir, sizeof dir, tmp, "empty");
        CHECK(mkdir(dir, 0700) == 0, "mkdir %s", dir);
        EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_IO, "config.json");

        /* Truncated weights */
        path_join(dir, sizeof dir, tmp, "truncated");
        mkdir(dir, 0700);
        path_join(path, sizeof path, dir, "config.json");
        CHECK(copy_file(src_cfg, path, SIZE_MAX) == 0, "copy config");
        path_join(path, sizeof path, dir, "model.safetensors");
        CHECK(weights && write_file(path, weights, wsize / 2) == 0, "write truncated weights");
        EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_FORMAT, "safetensors");
        CHECK(weights && write_file(path, weights, 5) == 0, "write truncated weights");
        EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_FORMAT, "safetensors");
        CHECK(write_file(path, "", 0) == 0, "write empty weights");
        EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_FORMAT, "safetensors");

        /* Corrupt header: garbage bytes in the JSON, then an absurd header length */
        if (weights) {
            unsigned char *bad = malloc(wsize);
            memcpy(bad, weights, wsize);
            for (size_t i = 8; i < 40; i++) bad[i] = (unsigned char)(0xA5 ^ i);
            CHECK(write_file(path, bad, wsize) == 0, "write corrupt weights");
            EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_FORMAT, "safetensors");
            memcpy(bad, weights, wsize);
            memset(bad, 0xFF, 8);
            CHECK(write_file(path, bad, wsize) == 0, "write corrupt weights");
            EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_FORMAT, "safetensors");
            free(bad);
        }
        /* Weights of another model (the tiny backbone: other shapes, no head): missing tensors
         * or wrong shapes. */
        if (backbone) {
            char tiny_dir[PATH_CAP];
            path_join(tiny_dir, sizeof tiny_dir, tmp, "tiny_backbone");
            EXPECT_OK(beit_model_save(backbone, tiny_dir));
            path_join(path2, sizeof path2, tiny_dir, "model.safetensors");
            CHECK(copy_file(path2, path, SIZE_MAX) == 0, "copy tiny weights");
            beit_status st = beit_model_load(ctx, dir, &m);
            CHECK(st == BEIT_ERR_FORMAT && (strstr(beit_last_error_message(), "tensor") != NULL),
                  "foreign weights: %s \"%s\"", beit_status_name(st), beit_last_error_message());
            if (st == BEIT_OK) {
                beit_model_free(m);
                m = (beit_model *)(uintptr_t)0x20;
            }
        }

        /* A config whose hidden_size does not divide by num_attention_heads */
        path_join(dir, sizeof dir, tmp, "bad_heads");
        mkdir(dir, 0700);
        path_join(path, sizeof path, dir, "model.safetensors");
        CHECK(weights && write_file(path, weights, wsize) == 0, "copy weights");
        path_join(path, sizeof path, dir, "config.json");
        const char *heads = "{\"hidden_size\": 10, \"num_attention_heads\": 3, \"num_hidden_layers\": 1}";
        CHECK(write_file(path, heads, strlen(heads)) == 0, "write config");
        EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_CONFIG, "num_attention_heads");
        /* Invalid JSON */
        CHECK(write_file(path, "{ \"hidden_size\": ", 17) == 0, "write config");
        EXPECT_ERR(beit_model_load(ctx, dir, &m), BEIT_ERR_FORMAT, "config");
        CHECK(m == (beit_model *)(uintptr_t)0x20, "out written by a failed call");
        free(weights);
        section("bad configs and model directories");
    }

    /* ---- failed saves leave the previous save loadable */
    {
        char file[PATH_CAP];
        beit_image_batch input = reference_batch(&ref);
        /* A path under a regular file cannot be created. */
        path_join(file, sizeof file, tmp, "regular_file");
        CHECK(write_file(file, "x", 1) == 0, "write %s", file);
        path_join(path, sizeof path, file, "model_dir");
        EXPECT_ERR(beit_model_save(model, path), BEIT_ERR_IO, "cannot create");
        EXPECT_ERR(beit_model_save(NULL, dir_x), BEIT_ERR_NULL_POINTER, "model is NULL");
        EXPECT_ERR(beit_model_save(model, NULL), BEIT_ERR_NULL_POINTER, "dir is NULL");

        /* Saving into dir_x (saved above) fails while no file may grow past 1 KiB: writing
         * model.safetensors' temporary file fails half-way, and the temporary file goes. */
        file_size_limit limit = limit_file_size(1024);
        if (mim) EXPECT_ERR(beit_model_save(mim, dir_x), BEIT_ERR_IO, "model.safetensors");
        undo_file_size_limit(limit);
        CHECK(temp_files_in(dir_x) == 0, "a failed save left a temporary file in %s", dir_x);
        beit_model *again = NULL;
        EXPECT_OK(beit_model_load(ctx, dir_x, &again));
        outputs_t o;
        EXPECT_OK(run_all(ctx, again, &input, &o));
        CHECK(outputs_identical(&first, &o), "the previous save in %s changed after a failed save", dir_x);
        outputs_free(&o);
        beit_model_free(again);
        section("failed saves keep the previous save loadable");
    }

    /* ---- errors: cleared on success; NULL frees */
    {
        beit_model_get_info(NULL, NULL);
        CHECK(beit_last_error_message()[0] != '\0', "a failure leaves a message");
        const char *before = beit_last_error_message();
        CHECK(before == beit_last_error_message(), "the message is stable between calls");
        beit_model_info info = beit_model_info_default();
        EXPECT_OK(beit_model_get_info(model, &info)); /* and the message is "" again */
        beit_context_free(NULL);
        beit_model_free(NULL);
        passed++;
        section("error message cleared on success; free(NULL) is a no-op");
    }

    beit_model_free(mim);
    beit_model_free(backbone);
    beit_model_free(model);
    beit_context_free(ctx);
    outputs_free(&first);
    reference_free(&ref);
    remove_tree(tmp);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
