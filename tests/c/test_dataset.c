/*
 * C API test of libbeit's dataset reader (beit_dataset_*), written against include/beit.h only;
 * needs nothing but libc and pthreads.
 *
 *   test_dataset
 *
 * The .beitds files are written here byte by byte from docs/dataset-format.md (not by libbeit),
 * which also checks that the format is implementable from the document alone: a file with all
 * four sections in an order other than the writer's, and trailing bytes after the last one; a
 * file with no samples. Then: open, info, every sample read back and compared; an index out of
 * range, wrong buffer lengths, NULL for every pointer argument and too small structs are
 * refused with the right status and a message, writing nothing; a truncated copy, a bad-magic
 * copy, an unknown version and a missing file fail with a message; 4 threads reading one
 * dataset at once get the same bytes.
 *
 * Prints one line per failed check, a line per section, and finally "N passed, M failed";
 * exits non-zero on any failure. Built by scripts/test-c, which also runs it under valgrind.
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

/* ------------------------------------------------------------------------------------------ */
/* Writing .beitds files from the spec                                                         */

enum { N = 5, H = 3, W = 4, C = 3, GH = 2, GW = 3 };
#define PIX (H * W * C)
#define MASK (H * W)
#define TOKS (GH * GW)

/* Sections placed out of the writer's order: tokens, pixels, labels, masks (64-byte aligned). */
enum {
    TOKENS_AT = 128,                  /* 2 * N * TOKS = 60 bytes, ends at 188 */
    PIXELS_AT = 192,                  /* N * PIX = 180 bytes, ends at 372 */
    LABELS_AT = 384,                  /* 4 * N = 20 bytes, ends at 404 */
    MASKS_AT = 448,                   /* N * MASK = 60 bytes, ends at 508 */
    FILE_LEN = MASKS_AT + N * MASK + 4 /* 4 trailing bytes, which readers ignore */
};

static uint8_t pixel(int i, int k) { return (uint8_t)(i * 37 + k * 11 + 3); }
static uint8_t mask_value(int i, int k) { return (uint8_t)((i + k) % 7); }
static uint16_t token(int i, int k) { return (uint16_t)(i * 8191 + k * 257 + 1); }
static uint32_t label(int i) { return (uint32_t)(1000003u * (uint32_t)i + 9u); }

static void put_u32(uint8_t *b, size_t at, uint32_t v) {
    for (int k = 0; k < 4; k++) b[at + k] = (uint8_t)(v >> (8 * k));
}
static void put_u64(uint8_t *b, size_t at, uint64_t v) {
    for (int k = 0; k < 8; k++) b[at + k] = (uint8_t)(v >> (8 * k));
}

/* The full test dataset (FILE_LEN bytes into `b`). */
static void build_full(uint8_t *b) {
    static const uint8_t magic[8] = {0x42, 0x45, 0x49, 0x54, 0x44, 0x53, 0x00, 0x01};
    memset(b, 0, FILE_LEN);
    memcpy(b, magic, 8);
    put_u32(b, 8, 1);     /* version */
    put_u32(b, 12, 128);  /* header_size */
    put_u64(b, 16, N);    /* count */
    put_u32(b, 24, H);
    put_u32(b, 28, W);
    put_u32(b, 32, C);
    put_u32(b, 36, 1);    /* pixel_layout: HWC u8 */
    put_u32(b, 40, 7);    /* flags: labels | masks | tokens */
    put_u32(b, 44, GH);
    put_u32(b, 48, GW);
    put_u64(b, 56, PIXELS_AT);
    put_u64(b, 64, (uint64_t)N * PIX);
    put_u64(b, 72, LABELS_AT);
    put_u64(b, 80, 4u * N);
    put_u64(b, 88, MASKS_AT);
    put_u64(b, 96, (uint64_t)N * MASK);
    put_u64(b, 104, TOKENS_AT);
    put_u64(b, 112, 2u * N * TOKS);
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < PIX; k++) b[PIXELS_AT + i * PIX + k] = pixel(i, k);
        put_u32(b, LABELS_AT + 4 * (size_t)i, label(i));
        for (int k = 0; k < MASK; k++) b[MASKS_AT + i * MASK + k] = mask_value(i, k);
        for (int k = 0; k < TOKS; k++) {
            uint16_t t = token(i, k);
            b[TOKENS_AT + 2 * (i * TOKS + k)] = (uint8_t)(t & 0xff);
            b[TOKENS_AT + 2 * (i * TOKS + k) + 1] = (uint8_t)(t >> 8);
        }
    }
    memset(b + FILE_LEN - 4, 0xee, 4);
}

/* A header-only dataset: 0 samples of 2x2x1, no optional sections. */
static void build_empty(uint8_t *b) {
    static const uint8_t magic[8] = {'B', 'E', 'I', 'T', 'D', 'S', 0, 1};
    memset(b, 0, 128);
    memcpy(b, magic, 8);
    put_u32(b, 8, 1);
    put_u32(b, 12, 128);
    put_u32(b, 24, 2);
    put_u32(b, 28, 2);
    put_u32(b, 32, 1);
    put_u32(b, 36, 1);
    put_u64(b, 56, 128); /* pixels: offset 128, length 0 */
}

static char dir[64];
static char full_path[128], empty_path[128], trunc_path[128], magic_path[128], version_path[128];

static void make_files(void) {
    strcpy(dir, "/tmp/beit-test-dataset-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(2);
    }
    snprintf(full_path, sizeof full_path, "%s/full.beitds", dir);
    snprintf(empty_path, sizeof empty_path, "%s/empty.beitds", dir);
    snprintf(trunc_path, sizeof trunc_path, "%s/truncated.beitds", dir);
    snprintf(magic_path, sizeof magic_path, "%s/magic.beitds", dir);
    snprintf(version_path, sizeof version_path, "%s/version.beitds", dir);
    static uint8_t b[FILE_LEN];
    build_full(b);
    int ok = write_file(full_path, b, FILE_LEN) == 0;
    ok &= write_file(trunc_path, b, FILE_LEN - 5) == 0; /* cuts the trailing bytes and 1 mask byte */
    b[3] = 'X';
    ok &= write_file(magic_path, b, FILE_LEN) == 0;
    b[3] = 'T';
    put_u32(b, 8, 2);
    ok &= write_file(version_path, b, FILE_LEN) == 0;
    build_empty(b);
    ok &= write_file(empty_path, b, 128) == 0;
    size_t n = 0;
    unsigned char *back = read_file(full_path, &n);
    ok &= back != NULL && n == FILE_LEN;
    free(back);
    if (!ok) {
        fprintf(stderr, "cannot write the test files in %s\n", dir);
        exit(2);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Reading                                                                                     */

typedef struct {
    uint8_t pixels[PIX];
    uint8_t mask[MASK];
    uint16_t tokens[TOKS];
} sample_buf;

static beit_dataset_sample sample_for(sample_buf *s) {
    beit_dataset_sample out = beit_dataset_sample_default();
    out.pixels = s->pixels;
    out.pixels_len = PIX;
    out.mask = s->mask;
    out.mask_len = MASK;
    out.tokens = s->tokens;
    out.tokens_len = TOKS;
    return out;
}

/* 1 when `s` (read with every buffer) holds sample i exactly. */
static int sample_matches(const sample_buf *s, const beit_dataset_sample *out, int i) {
    if (!out->label_written || !out->mask_written || !out->tokens_written) return 0;
    if (out->label != label(i)) return 0;
    for (int k = 0; k < PIX; k++)
        if (s->pixels[k] != pixel(i, k)) return 0;
    for (int k = 0; k < MASK; k++)
        if (s->mask[k] != mask_value(i, k)) return 0;
    for (int k = 0; k < TOKS; k++)
        if (s->tokens[k] != token(i, k)) return 0;
    return 1;
}

static void test_open_and_read(void) {
    beit_dataset *d = NULL;
    EXPECT_OK(beit_dataset_open(full_path, &d));
    CHECK(d != NULL, "open gave no dataset");
    if (!d) return;
    beit_dataset_info info = beit_dataset_info_default();
    EXPECT_OK(beit_dataset_get_info(d, &info));
    CHECK(info.struct_size == sizeof info, "info.struct_size changed to %zu", info.struct_size);
    CHECK(info.count == N && info.height == H && info.width == W && info.channels == C,
          "info shape %llu x %ux%ux%u", (unsigned long long)info.count, info.height, info.width,
          info.channels);
    CHECK(info.has_labels && info.has_masks && info.has_tokens, "info sections");
    CHECK(info.token_grid_h == GH && info.token_grid_w == GW, "token grid %ux%u", info.token_grid_h,
          info.token_grid_w);
    CHECK(info.pixels_len == PIX && info.mask_len == MASK && info.tokens_len == TOKS,
          "info lengths %zu %zu %zu", info.pixels_len, info.mask_len, info.tokens_len);

    for (int i = 0; i < N; i++) {
        sample_buf s;
        memset(&s, 0, sizeof s);
        beit_dataset_sample out = sample_for(&s);
        EXPECT_OK(beit_dataset_read_sample(d, (uint64_t)i, &out));
        CHECK(sample_matches(&s, &out, i), "sample %d differs from what was written", i);
        CHECK(out.pixels == s.pixels && out.pixels_len == PIX && out.struct_size == sizeof out,
              "read_sample changed its inputs");
    }

    /* Optional buffers may be skipped; pixels only. */
    sample_buf s;
    memset(&s, 0, sizeof s);
    beit_dataset_sample out = beit_dataset_sample_default();
    out.pixels = s.pixels;
    out.pixels_len = PIX;
    EXPECT_OK(beit_dataset_read_sample(d, 4, &out));
    CHECK(out.label_written && out.label == label(4) && !out.mask_written && !out.tokens_written,
          "pixels-only read: label %u written %d/%d/%d", out.label, out.label_written,
          out.mask_written, out.tokens_written);
    CHECK(s.pixels[PIX - 1] == pixel(4, PIX - 1), "pixels-only read: wrong pixels");
    beit_dataset_free(d);

    /* A dataset with no samples and no optional sections. */
    d = NULL;
    EXPECT_OK(beit_dataset_open(empty_path, &d));
    info = beit_dataset_info_default();
    EXPECT_OK(beit_dataset_get_info(d, &info));
    CHECK(info.count == 0 && info.height == 2 && info.channels == 1 && !info.has_labels &&
              !info.has_masks && !info.has_tokens && info.mask_len == 0 && info.tokens_len == 0,
          "empty dataset info");
    uint8_t px[4];
    out = beit_dataset_sample_default();
    out.pixels = px;
    out.pixels_len = 4;
    EXPECT_ERR2(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_INVALID_ARGUMENT, "index 0",
                "0 samples");
    beit_dataset_free(d);
    beit_dataset_free(NULL);
    section("open, info, read every sample (file written from the spec)");
}

static void test_bad_arguments(void) {
    beit_dataset *d = NULL;
    EXPECT_OK(beit_dataset_open(full_path, &d));
    if (!d) return;
    sample_buf s;
    memset(&s, 0xab, sizeof s);
    beit_dataset_sample out = sample_for(&s);

    EXPECT_ERR2(beit_dataset_read_sample(d, N, &out), BEIT_ERR_INVALID_ARGUMENT, "index 5",
                "5 samples");
    EXPECT_ERR(beit_dataset_read_sample(d, UINT64_MAX, &out), BEIT_ERR_INVALID_ARGUMENT,
               "out of range");

    out.pixels_len = PIX - 1;
    EXPECT_ERR2(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_BUFFER_SIZE, "pixels_len is 35",
                "needs 36");
    out.pixels_len = PIX + 1;
    EXPECT_ERR2(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_BUFFER_SIZE, "37", "36");
    out = sample_for(&s);
    out.mask_len = MASK - 1;
    EXPECT_ERR2(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_BUFFER_SIZE, "mask_len is 11",
                "needs 12");
    out = sample_for(&s);
    out.tokens_len = TOKS + 1;
    EXPECT_ERR2(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_BUFFER_SIZE, "tokens_len is 7",
                "needs 6");
    out = sample_for(&s);
    out.mask = NULL;
    EXPECT_ERR(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_INVALID_ARGUMENT, "mask is NULL");
    out = sample_for(&s);
    out.struct_size = sizeof(size_t);
    EXPECT_ERR(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_INVALID_ARGUMENT, "struct_size");

    /* NULLs. */
    beit_dataset *none = (beit_dataset *)&s; /* must not be written */
    EXPECT_ERR(beit_dataset_open(NULL, &none), BEIT_ERR_NULL_POINTER, "path");
    CHECK(none == (beit_dataset *)&s, "failed open wrote *out");
    EXPECT_ERR(beit_dataset_open(full_path, NULL), BEIT_ERR_NULL_POINTER, "out");
    beit_dataset_info info = beit_dataset_info_default();
    EXPECT_ERR(beit_dataset_get_info(NULL, &info), BEIT_ERR_NULL_POINTER, "dataset");
    EXPECT_ERR(beit_dataset_get_info(d, NULL), BEIT_ERR_NULL_POINTER, "out");
    info.struct_size = 4;
    EXPECT_ERR(beit_dataset_get_info(d, &info), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    CHECK(info.count == 0, "failed get_info wrote the struct");
    out = sample_for(&s);
    EXPECT_ERR(beit_dataset_read_sample(NULL, 0, &out), BEIT_ERR_NULL_POINTER, "dataset");
    EXPECT_ERR(beit_dataset_read_sample(d, 0, NULL), BEIT_ERR_NULL_POINTER, "sample");
    out.pixels = NULL;
    EXPECT_ERR(beit_dataset_read_sample(d, 0, &out), BEIT_ERR_NULL_POINTER, "sample->pixels");

    /* No failed call wrote anything. */
    int untouched = 1;
    for (size_t k = 0; k < sizeof s; k++) untouched &= ((uint8_t *)&s)[k] == 0xab;
    CHECK(untouched, "a failed read wrote into the caller's buffers");
    CHECK(!out.label_written && !out.mask_written && !out.tokens_written && out.label == 0,
          "a failed read wrote the outputs");
    beit_dataset_free(d);
    section("bad indices, buffer lengths, NULLs and struct sizes are refused, nothing written");
}

static void test_corrupt_files(void) {
    beit_dataset *d = NULL;
    EXPECT_ERR2(beit_dataset_open(trunc_path, &d), BEIT_ERR_FORMAT, "masks", "truncated");
    CHECK(d == NULL, "a failed open wrote *out");
    EXPECT_ERR(beit_dataset_open(magic_path, &d), BEIT_ERR_FORMAT, "not a beit dataset");
    EXPECT_ERR2(beit_dataset_open(version_path, &d), BEIT_ERR_FORMAT, "version 2",
                "version 1");
    char missing[160];
    snprintf(missing, sizeof missing, "%s/missing.beitds", dir);
    EXPECT_ERR(beit_dataset_open(missing, &d), BEIT_ERR_IO, "missing.beitds");
    CHECK(d == NULL, "a failed open wrote *out");
    section("truncated, bad magic, unknown version, missing: refused with a message");
}

/* ------------------------------------------------------------------------------------------ */
/* Threads                                                                                     */

enum { THREADS = 4, ROUNDS = 200 };

typedef struct {
    const beit_dataset *d;
    int bad; /* reads that failed or differed */
} reader_arg;

static void *reader(void *p) {
    reader_arg *a = p;
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < N; i++) {
            int at = (i + r) % N;
            sample_buf s;
            memset(&s, 0, sizeof s);
            beit_dataset_sample out = sample_for(&s);
            if (beit_dataset_read_sample(a->d, (uint64_t)at, &out) != BEIT_OK ||
                beit_last_error_message()[0] != '\0' || !sample_matches(&s, &out, at))
                a->bad++;
        }
        sample_buf s;
        beit_dataset_sample out = sample_for(&s);
        /* An error on one thread does not disturb the others' messages. */
        if (beit_dataset_read_sample(a->d, N + (uint64_t)r, &out) != BEIT_ERR_INVALID_ARGUMENT)
            a->bad++;
    }
    return NULL;
}

static void test_threads(void) {
    beit_dataset *d = NULL;
    EXPECT_OK(beit_dataset_open(full_path, &d));
    if (!d) return;
    pthread_t t[THREADS];
    reader_arg args[THREADS];
    for (int k = 0; k < THREADS; k++) {
        args[k].d = d;
        args[k].bad = 0;
        CHECK(pthread_create(&t[k], NULL, reader, &args[k]) == 0, "pthread_create");
    }
    for (int k = 0; k < THREADS; k++) {
        pthread_join(t[k], NULL);
        CHECK(args[k].bad == 0, "thread %d: %d bad reads", k, args[k].bad);
    }
    beit_dataset_free(d);
    section("4 threads reading one dataset at once get the same bytes");
}

int main(void) {
    make_files();
    test_open_and_read();
    test_bad_arguments();
    test_corrupt_files();
    test_threads();
    remove_tree(dir);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
