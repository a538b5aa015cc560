/*
 * C API test of the libbeit visual tokenizer (beit_tokenizer_*), written against
 * include/beit.h only; needs nothing but libc and pthreads.
 *
 *   test_tokenizer [TOKENIZER_DIR]     default tests/reference_dvae/dalle_small
 *
 * The reference tokenizer (a DALL-E-architecture encoder, 3x32x32 images, vocabulary 96) comes
 * with io.safetensors, holding PyTorch's `mapped_pixels` and `tokens`; it is read here with a
 * small safetensors reader of its own. The pixels are unmapped to [0, 1] ((x - 0.1) / 0.8) and
 * tokenized through the C API: the tokens must equal PyTorch's exactly. Then: the info; each
 * image alone gives its batch tokens; a constant image tokenizes the same twice; 4 threads
 * tokenizing with one tokenizer at once agree; the context handle may be freed first; NULL for
 * every pointer, batch 0, wrong lengths, NaN and infinite pixels, a too small struct, a missing
 * directory and decoding without a decoder are refused with the right status and a message,
 * writing nothing.
 *
 * Prints one line per failed check, a line per section, and finally "N passed, M failed";
 * exits non-zero on any failure. Built by scripts/test-c, which also runs it under valgrind.
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

enum { B = 4, C = 3, S = 32, P = 16, V = 96 };
#define PER (C * S * S)

static float pixels[B * PER];  /* the reference images, unmapped to [0, 1] */
static int64_t want[B * P];    /* PyTorch's tokens */

/* ------------------------------------------------------------------------------------------ */
/* A minimal safetensors reader (little-endian host)                                            */

/* Copies tensor `name` (exactly `bytes` bytes of data) out of a safetensors file image. */
static int tensor_bytes(const unsigned char *file, size_t size, const char *name, void *dst, size_t bytes) {
    if (size < 8) return -1;
    uint64_t hlen = 0;
    for (int k = 0; k < 8; k++) hlen |= (uint64_t)file[k] << (8 * k);
    if (hlen > size - 8) return -1;
    char *header = malloc((size_t)hlen + 1);
    if (!header) return -1;
    memcpy(header, file + 8, (size_t)hlen);
    header[hlen] = 0;
    char key[128];
    snprintf(key, sizeof key, "\"%s\":", name);
    int rc = -1;
    const char *at = strstr(header, key);
    const char *offsets = at ? strstr(at, "\"data_offsets\":[") : NULL;
    if (offsets) {
        char *end = NULL;
        unsigned long long begin = strtoull(offsets + strlen("\"data_offsets\":["), &end, 10);
        unsigned long long stop = (end && *end == ',') ? strtoull(end + 1, NULL, 10) : 0;
        if (stop >= begin && stop - begin == bytes && 8 + hlen + stop <= size) {
            memcpy(dst, file + 8 + hlen + begin, bytes);
            rc = 0;
        }
    }
    free(header);
    return rc;
}

static void read_reference(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/io.safetensors", dir);
    size_t size = 0;
    unsigned char *file = read_file(path, &size);
    static float mapped[B * PER];
    if (!file || tensor_bytes(file, size, "mapped_pixels", mapped, sizeof mapped) != 0 ||
        tensor_bytes(file, size, "tokens", want, sizeof want) != 0) {
        fprintf(stderr, "cannot read mapped_pixels [4,3,32,32] and tokens [4,16] from %s\n", path);
        free(file);
        exit(2);
    }
    free(file);
    for (int i = 0; i < B * PER; i++) pixels[i] = (mapped[i] - 0.1f) / 0.8f;
}

/* ------------------------------------------------------------------------------------------ */
/* Tests                                                                                       */

static beit_context *new_context(void) {
    beit_context_options o = beit_context_options_default();
    o.device = BEIT_DEVICE_CPU;
    o.num_threads = 2;
    beit_context *ctx = NULL;
    EXPECT_OK(beit_context_create(&o, &ctx));
    if (!ctx) exit(2);
    return ctx;
}

static int all_equal(const int64_t *a, int64_t v, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != v) return 0;
    return 1;
}

static void test_info(const beit_tokenizer *t) {
    beit_tokenizer_info info = beit_tokenizer_info_default();
    EXPECT_OK(beit_tokenizer_get_info(t, &info));
    CHECK(info.struct_size == sizeof info, "struct_size changed to %zu", info.struct_size);
    CHECK(info.in_channels == C && info.image_size == S && info.vocab_size == V,
          "info %zu channels, %zu px, vocabulary %zu", info.in_channels, info.image_size, info.vocab_size);
    CHECK(info.grid_h == 4 && info.grid_w == 4 && info.tokens_per_image == P, "grid %zux%zu, %zu tokens",
          info.grid_h, info.grid_w, info.tokens_per_image);
    CHECK(!info.has_decoder, "the reference encoder has no decoder");

    beit_tokenizer_info small = beit_tokenizer_info_default();
    small.struct_size = sizeof(size_t);
    EXPECT_ERR(beit_tokenizer_get_info(t, &small), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    CHECK(small.in_channels == 0 && small.vocab_size == 0, "a refused info was written");
    EXPECT_ERR(beit_tokenizer_get_info(NULL, &info), BEIT_ERR_NULL_POINTER, "tokenizer");
    EXPECT_ERR(beit_tokenizer_get_info(t, NULL), BEIT_ERR_NULL_POINTER, "out");
    section("info");
}

static void test_pytorch_tokens(const beit_tokenizer *t) {
    int64_t got[B * P];
    memset(got, 0xff, sizeof got);
    EXPECT_OK(beit_tokenizer_tokenize(t, pixels, B * PER, B, got, B * P));
    int differ = 0;
    for (int i = 0; i < B * P; i++) differ += got[i] != want[i];
    CHECK(differ == 0, "%d of %d tokens differ from PyTorch's (first: %lld vs %lld)", differ, B * P,
          (long long)got[0], (long long)want[0]);
    for (int b = 0; b < B; b++) {
        int64_t one[P];
        EXPECT_OK(beit_tokenizer_tokenize(t, pixels + b * PER, PER, 1, one, P));
        CHECK(memcmp(one, want + b * P, sizeof one) == 0, "image %d alone gives other tokens", b);
    }
    section("tokens equal PyTorch's");
}

static void test_constant_image(const beit_tokenizer *t) {
    static float grey[2 * PER];
    for (int i = 0; i < 2 * PER; i++) grey[i] = 0.25f;
    int64_t a[2 * P], b[2 * P];
    EXPECT_OK(beit_tokenizer_tokenize(t, grey, 2 * PER, 2, a, 2 * P));
    EXPECT_OK(beit_tokenizer_tokenize(t, grey, 2 * PER, 2, b, 2 * P));
    CHECK(memcmp(a, b, sizeof a) == 0, "a constant image tokenizes differently twice");
    CHECK(memcmp(a, a + P, P * sizeof a[0]) == 0, "two equal images in a batch give different tokens");
    int in_range = 1;
    for (int i = 0; i < 2 * P; i++) in_range &= a[i] >= 0 && a[i] < V;
    CHECK(in_range, "a token is outside [0, %d)", V);
    /* The encoder looks at the pixels: a grey image is not tokenized like a reference one. */
    CHECK(memcmp(a, want, P * sizeof a[0]) != 0, "a grey image tokenizes like reference image 0");
    section("a constant image, twice");
}

typedef struct {
    const beit_tokenizer *t;
    int64_t out[B * P];
    beit_status status;
} job;

static void *tokenize_job(void *arg) {
    job *j = arg;
    j->status = beit_tokenizer_tokenize(j->t, pixels, B * PER, B, j->out, B * P);
    return NULL;
}

static void test_threads(const beit_tokenizer *t) {
    enum { T = 4 };
    static job jobs[T];
    pthread_t th[T];
    for (int i = 0; i < T; i++) {
        jobs[i].t = t;
        jobs[i].status = BEIT_ERR_INTERNAL;
        CHECK(pthread_create(&th[i], NULL, tokenize_job, &jobs[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < T; i++) {
        pthread_join(th[i], NULL);
        CHECK(jobs[i].status == BEIT_OK, "thread %d: %s", i, beit_status_name(jobs[i].status));
        CHECK(memcmp(jobs[i].out, want, sizeof want) == 0, "thread %d got other tokens", i);
    }
    section("4 threads on one tokenizer");
}

static void test_errors(beit_context *ctx, const beit_tokenizer *t, const char *dir) {
    static int64_t out[B * P];
    for (int i = 0; i < B * P; i++) out[i] = -7;
    EXPECT_ERR(beit_tokenizer_tokenize(NULL, pixels, B * PER, B, out, B * P), BEIT_ERR_NULL_POINTER, "tokenizer");
    EXPECT_ERR(beit_tokenizer_tokenize(t, NULL, B * PER, B, out, B * P), BEIT_ERR_NULL_POINTER, "pixels");
    EXPECT_ERR(beit_tokenizer_tokenize(t, pixels, B * PER, B, NULL, B * P), BEIT_ERR_NULL_POINTER, "tokens");
    EXPECT_ERR(beit_tokenizer_tokenize(t, pixels, B * PER, 0, out, B * P), BEIT_ERR_INVALID_ARGUMENT, "batch is 0");
    EXPECT_ERR2(beit_tokenizer_tokenize(t, pixels, B * PER - 1, B, out, B * P), BEIT_ERR_INVALID_ARGUMENT,
                "pixels_len is 12287", "12288");
    EXPECT_ERR(beit_tokenizer_tokenize(t, pixels, B * PER, B - 1, out, B * P), BEIT_ERR_INVALID_ARGUMENT,
               "pixels_len");
    EXPECT_ERR2(beit_tokenizer_tokenize(t, pixels, B * PER, B, out, B * P - 1), BEIT_ERR_BUFFER_SIZE,
                "tokens_len is 63", "64");
    EXPECT_ERR(beit_tokenizer_tokenize(t, pixels, B * PER, B, out, B * P + 1), BEIT_ERR_BUFFER_SIZE,
               "tokens_len");
    EXPECT_ERR(beit_tokenizer_tokenize(t, pixels, SIZE_MAX, SIZE_MAX, out, B * P), BEIT_ERR_INVALID_ARGUMENT,
               "fit in memory");
    static float bad[PER];
    memcpy(bad, pixels, sizeof bad);
    bad[100] = NAN;
    EXPECT_ERR2(beit_tokenizer_tokenize(t, bad, PER, 1, out, P), BEIT_ERR_INVALID_ARGUMENT, "pixels[100]",
                "finite");
    bad[100] = -INFINITY;
    EXPECT_ERR(beit_tokenizer_tokenize(t, bad, PER, 1, out, P), BEIT_ERR_INVALID_ARGUMENT, "pixels[100]");
    CHECK(all_equal(out, -7, B * P), "a refused tokenize wrote tokens");

    static float img[PER];
    for (int i = 0; i < PER; i++) img[i] = 3.0f;
    EXPECT_ERR(beit_tokenizer_decode(t, want, P, 1, img, PER), BEIT_ERR_INVALID_ARGUMENT, "no decoder");
    int kept = 1;
    for (int i = 0; i < PER; i++) kept &= img[i] == 3.0f;
    CHECK(kept, "a refused decode wrote pixels");
    EXPECT_ERR(beit_tokenizer_decode(NULL, want, P, 1, img, PER), BEIT_ERR_NULL_POINTER, "tokenizer");

    beit_tokenizer *h = NULL;
    EXPECT_ERR(beit_tokenizer_load(NULL, dir, &h), BEIT_ERR_NULL_POINTER, "ctx");
    EXPECT_ERR(beit_tokenizer_load(ctx, NULL, &h), BEIT_ERR_NULL_POINTER, "dir");
    EXPECT_ERR(beit_tokenizer_load(ctx, dir, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_tokenizer_load(ctx, "/nonexistent/beit-tokenizer", &h), BEIT_ERR_IO, "config.json");
    CHECK(h == NULL, "a failed load wrote *out");

    /* A copy of the tokenizer with a truncated weights file, then with a broken config. */
    char tmp[] = "/tmp/beit-test-tokenizer-XXXXXX", path[4096];
    if (mkdtemp(tmp)) {
        size_t n = 0, m = 0;
        snprintf(path, sizeof path, "%s/config.json", dir);
        unsigned char *config = read_file(path, &n);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        unsigned char *weights = read_file(path, &m);
        CHECK(config && weights && m > 100, "cannot read the tokenizer files");
        if (config && weights && m > 100) {
            snprintf(path, sizeof path, "%s/config.json", tmp);
            CHECK(write_file(path, config, n) == 0, "write %s", path);
            snprintf(path, sizeof path, "%s/model.safetensors", tmp);
            CHECK(write_file(path, weights, m - 100) == 0, "write %s", path);
            EXPECT_ERR(beit_tokenizer_load(ctx, tmp, &h), BEIT_ERR_FORMAT, "model.safetensors");
            snprintf(path, sizeof path, "%s/config.json", tmp);
            CHECK(write_file(path, "{\"in_channels\": 3,", 18) == 0, "write %s", path);
            EXPECT_ERR(beit_tokenizer_load(ctx, tmp, &h), BEIT_ERR_CONFIG, "config.json");
            CHECK(h == NULL, "a failed load wrote *out");
        }
        free(config);
        free(weights);
        remove_tree(tmp);
    } else {
        CHECK(0, "mkdtemp failed");
    }
    beit_tokenizer_free(NULL);
    section("bad arguments are refused, nothing written");
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/reference_dvae/dalle_small";
    read_reference(dir);
    beit_context *ctx = new_context();
    beit_tokenizer *t = NULL;
    EXPECT_OK(beit_tokenizer_load(ctx, dir, &t));
    if (!t) {
        fprintf(stderr, "cannot load the tokenizer in %s: %s\n", dir, beit_last_error_message());
        beit_context_free(ctx);
        return 1;
    }
    test_info(t);
    test_pytorch_tokens(t);
    test_constant_image(t);
    test_errors(ctx, t, dir);
    /* The tokenizer shares the context's pool: the context handle may be freed first. */
    beit_context_free(ctx);
    test_threads(t);
    beit_tokenizer_free(t);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
