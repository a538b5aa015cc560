/*
 * C API test of libbeit's data calls: the dataset writer (beit_dataset_writer_*), the importer
 * (beit_dataset_import), the augmenting loader (beit_loader_*) and the mask generator
 * (beit_mask_generator_*), written against include/beit.h only.
 *
 *   test_data
 *
 * - Writer: samples appended in two chunks read back byte for byte through beit_dataset_open;
 *   refused appends (NULL arrays, wrong lengths, arrays of absent sections, a finished writer)
 *   change nothing; a freed unfinished writer leaves no file at all; a finish that fails half
 *   way (a file size limit) leaves the previous file intact and no temporary file.
 * - Import: an IDX image and label file written here byte by byte from the IDX format come
 *   back as their pixels and labels; an output naming an input, a bad format and NULLs are
 *   refused.
 * - Loader: with cached tokens view 1 is the whole image, so each image of a batch equals, to
 *   the bit, (pixel / 255 - 0.5) / 0.5 of the sample its label names (labels are the sample
 *   indices here), laid out [B, C, H, W]; its tokens are that sample's cached tokens; an epoch
 *   visits every sample once; masks have 1..masked patches; the batch at a position is the
 *   same after a seek; the last short batch reports its size and zeroes the rest; bad options
 *   and buffers are refused with nothing written.
 * - Mask generator: the same seed gives the same masks, counts stay in bounds (exact for
 *   random masking), wrong lengths and bad options are refused.
 *
 * Prints one line per failed check, a line per section, and finally "N passed, M failed";
 * exits non-zero on any failure. Built by scripts/test-c, which also runs it under valgrind
 * and the sanitizers.
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

static char dir[64];

static void path_in(char *out, size_t size, const char *name) { snprintf(out, size, "%s/%s", dir, name); }

/* Entries of the scratch directory, "." and ".." not counted. */
static int entries_in(const char *d) {
    DIR *h = opendir(d);
    if (!h) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(h)) != NULL;)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(h);
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* The test data: N samples of H x W x C with labels (= the sample index) and GH x GW tokens   */

enum { N = 10, H = 8, W = 8, C = 3, GH = 2, GW = 2, PATCH = 4 };
#define PIX (H * W * C)
#define TOKS (GH * GW)

static uint8_t pixel(int i, int k) { return (uint8_t)((i * 53 + k * 29 + 7) % 256); }
static uint16_t token(int i, int k) { return (uint16_t)(i * 1000 + k * 17 + 3); }

typedef struct {
    uint8_t pixels[N * PIX];
    uint32_t labels[N];
    uint16_t tokens[N * TOKS];
} data;

static void make_data(data *d) {
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < PIX; k++) d->pixels[i * PIX + k] = pixel(i, k);
        d->labels[i] = (uint32_t)i;
        for (int k = 0; k < TOKS; k++) d->tokens[i * TOKS + k] = token(i, k);
    }
}

static beit_dataset_spec data_spec(void) {
    beit_dataset_spec s = beit_dataset_spec_default();
    s.height = H;
    s.width = W;
    s.channels = C;
    s.has_labels = true;
    s.has_tokens = true;
    s.token_grid_h = GH;
    s.token_grid_w = GW;
    return s;
}

/* Samples [from, from + count) of `d` as a beit_dataset_samples. */
static beit_dataset_samples chunk(const data *d, int from, int count) {
    beit_dataset_samples s = beit_dataset_samples_default();
    s.count = (size_t)count;
    s.pixels = d->pixels + from * PIX;
    s.pixels_len = (size_t)count * PIX;
    s.labels = d->labels + from;
    s.labels_len = (size_t)count;
    s.tokens = d->tokens + from * TOKS;
    s.tokens_len = (size_t)count * TOKS;
    return s;
}

/* ------------------------------------------------------------------------------------------ */
/* Writer                                                                                      */

static char data_path[128];

static void test_writer(const data *d) {
    path_in(data_path, sizeof data_path, "data.beitds");
    beit_dataset_spec spec = data_spec();
    beit_dataset_writer *w = NULL;
    EXPECT_OK(beit_dataset_writer_create(data_path, &spec, &w));
    if (!w) return;
    beit_dataset_samples first = chunk(d, 0, 4), rest = chunk(d, 4, N - 4);
    EXPECT_OK(beit_dataset_writer_append(w, &first));
    CHECK(access(data_path, F_OK) != 0, "nothing exists at the path before finish");
    EXPECT_OK(beit_dataset_writer_append(w, &rest));
    uint64_t count = 0;
    EXPECT_OK(beit_dataset_writer_count(w, &count));
    CHECK(count == N, "count %llu", (unsigned long long)count);
    beit_dataset_info info = beit_dataset_info_default();
    EXPECT_OK(beit_dataset_writer_finish(w, &info));
    CHECK(info.count == N && info.height == H && info.width == W && info.channels == C && info.has_labels &&
              !info.has_masks && info.has_tokens && info.tokens_len == TOKS,
          "finish info");
    EXPECT_ERR(beit_dataset_writer_append(w, &first), BEIT_ERR_INVALID_ARGUMENT, "already finished");
    EXPECT_ERR(beit_dataset_writer_finish(w, NULL), BEIT_ERR_INVALID_ARGUMENT, "already finished");
    beit_dataset_writer_free(w);

    beit_dataset *ds = NULL;
    EXPECT_OK(beit_dataset_open(data_path, &ds));
    if (!ds) return;
    int bad = 0;
    for (int i = 0; i < N; i++) {
        uint8_t px[PIX];
        uint16_t toks[TOKS];
        beit_dataset_sample s = beit_dataset_sample_default();
        s.pixels = px;
        s.pixels_len = PIX;
        s.tokens = toks;
        s.tokens_len = TOKS;
        if (beit_dataset_read_sample(ds, (uint64_t)i, &s) != BEIT_OK || s.label != (uint32_t)i ||
            memcmp(px, d->pixels + i * PIX, PIX) != 0 || memcmp(toks, d->tokens + i * TOKS, sizeof toks) != 0)
            bad++;
    }
    CHECK(bad == 0, "%d samples read back differently", bad);
    beit_dataset_free(ds);
    section("writer: two chunks appended, finished, read back byte for byte");
}

static void test_writer_refusals(const data *d) {
    char path[128];
    path_in(path, sizeof path, "refused.beitds");
    beit_dataset_spec spec = data_spec();
    beit_dataset_writer *w = NULL;
    spec.height = 0;
    EXPECT_ERR(beit_dataset_writer_create(path, &spec, &w), BEIT_ERR_INVALID_ARGUMENT, "zero dimension");
    spec = data_spec();
    spec.has_tokens = false;
    EXPECT_ERR(beit_dataset_writer_create(path, &spec, &w), BEIT_ERR_INVALID_ARGUMENT, "has_tokens");
    spec = data_spec();
    spec.struct_size = 4;
    EXPECT_ERR(beit_dataset_writer_create(path, &spec, &w), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    spec = data_spec();
    EXPECT_ERR(beit_dataset_writer_create(NULL, &spec, &w), BEIT_ERR_NULL_POINTER, "path");
    EXPECT_ERR(beit_dataset_writer_create(path, NULL, &w), BEIT_ERR_NULL_POINTER, "spec");
    EXPECT_ERR(beit_dataset_writer_create(path, &spec, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_dataset_writer_create("/nonexistent-dir/x.beitds", &spec, &w), BEIT_ERR_IO, "nonexistent");
    CHECK(w == NULL, "a refused create wrote *out");

    EXPECT_OK(beit_dataset_writer_create(path, &spec, &w));
    if (!w) return;
    beit_dataset_samples s = chunk(d, 0, 2);
    s.pixels_len--;
    EXPECT_ERR2(beit_dataset_writer_append(w, &s), BEIT_ERR_INVALID_ARGUMENT, "pixels_len is 383", "needs 384");
    s = chunk(d, 0, 2);
    s.tokens_len = 3;
    EXPECT_ERR2(beit_dataset_writer_append(w, &s), BEIT_ERR_INVALID_ARGUMENT, "tokens_len is 3", "needs 8");
    s = chunk(d, 0, 2);
    s.labels = NULL;
    EXPECT_ERR(beit_dataset_writer_append(w, &s), BEIT_ERR_NULL_POINTER, "samples->labels");
    s = chunk(d, 0, 2);
    uint8_t masks[2 * H * W] = {0};
    s.masks = masks;
    s.masks_len = sizeof masks;
    EXPECT_ERR(beit_dataset_writer_append(w, &s), BEIT_ERR_INVALID_ARGUMENT, "has no masks");
    s = chunk(d, 0, 2);
    s.struct_size = 8;
    EXPECT_ERR(beit_dataset_writer_append(w, &s), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    EXPECT_ERR(beit_dataset_writer_append(w, NULL), BEIT_ERR_NULL_POINTER, "samples");
    EXPECT_ERR(beit_dataset_writer_append(NULL, &s), BEIT_ERR_NULL_POINTER, "writer");
    uint64_t count = 99;
    EXPECT_OK(beit_dataset_writer_count(w, &count));
    CHECK(count == 0, "refused appends appended %llu samples", (unsigned long long)count);
    s = chunk(d, 0, 2);
    EXPECT_OK(beit_dataset_writer_append(w, &s));
    CHECK(temp_files_in(dir) == 1, "one temporary file while writing");
    beit_dataset_writer_free(w); /* unfinished */
    CHECK(access(path, F_OK) != 0, "an unfinished writer left %s", path);
    CHECK(temp_files_in(dir) == 0, "an unfinished writer left its temporary file");
    beit_dataset_writer_free(NULL);

    /* A finish that fails half-way (writes past 300 bytes fail) keeps the previous file. */
    size_t before_size = 0, after_size = 0;
    unsigned char *before = read_file(data_path, &before_size);
    EXPECT_OK(beit_dataset_writer_create(data_path, &spec, &w));
    if (w) {
        s = chunk(d, 0, N);
        EXPECT_OK(beit_dataset_writer_append(w, &s));
        file_size_limit l = limit_file_size(300);
        EXPECT_ERR(beit_dataset_writer_finish(w, NULL), BEIT_ERR_IO, "data.beitds");
        undo_file_size_limit(l);
        EXPECT_ERR(beit_dataset_writer_append(w, &s), BEIT_ERR_INVALID_ARGUMENT, "failed earlier");
        beit_dataset_writer_free(w);
    }
    unsigned char *after = read_file(data_path, &after_size);
    CHECK(before && after && before_size == after_size && memcmp(before, after, before_size) == 0,
          "a failed finish changed the previous file");
    CHECK(temp_files_in(dir) == 0, "a failed finish left its temporary file");
    free(before);
    free(after);
    section("writer: refusals change nothing; unfinished and failed writers leave nothing behind");
}

/* ------------------------------------------------------------------------------------------ */
/* Import                                                                                      */

static void put_be32(uint8_t *b, uint32_t v) {
    for (int k = 0; k < 4; k++) b[k] = (uint8_t)(v >> (24 - 8 * k));
}

static void test_import(void) {
    enum { IN = 3, IH = 2, IW = 5 };
    uint8_t images[16 + IN * IH * IW], labels[8 + IN];
    put_be32(images, 0x803);
    put_be32(images + 4, IN);
    put_be32(images + 8, IH);
    put_be32(images + 12, IW);
    for (int k = 0; k < IN * IH * IW; k++) images[16 + k] = (uint8_t)(k * 9 + 1);
    put_be32(labels, 0x801);
    put_be32(labels + 4, IN);
    for (int k = 0; k < IN; k++) labels[8 + k] = (uint8_t)(9 - 4 * k);
    char images_path[128], labels_path[128], out[128];
    path_in(images_path, sizeof images_path, "images.idx");
    path_in(labels_path, sizeof labels_path, "labels.idx");
    path_in(out, sizeof out, "imported.beitds");
    CHECK(write_file(images_path, images, sizeof images) == 0 && write_file(labels_path, labels, sizeof labels) == 0,
          "writing the IDX files");

    beit_dataset_import_options o = beit_dataset_import_options_default();
    o.format = BEIT_IMPORT_IDX;
    o.images = images_path;
    o.labels = labels_path;
    o.out = out;
    beit_dataset_info info = beit_dataset_info_default();
    EXPECT_OK(beit_dataset_import(&o, &info));
    CHECK(info.count == IN && info.height == IH && info.width == IW && info.channels == 1 && info.has_labels,
          "import info");
    beit_dataset *ds = NULL;
    EXPECT_OK(beit_dataset_open(out, &ds));
    if (ds) {
        int bad = 0;
        for (int i = 0; i < IN; i++) {
            uint8_t px[IH * IW];
            beit_dataset_sample s = beit_dataset_sample_default();
            s.pixels = px;
            s.pixels_len = sizeof px;
            if (beit_dataset_read_sample(ds, (uint64_t)i, &s) != BEIT_OK || s.label != labels[8 + i] ||
                memcmp(px, images + 16 + i * IH * IW, sizeof px) != 0)
                bad++;
        }
        CHECK(bad == 0, "%d imported samples differ from the IDX files", bad);
        beit_dataset_free(ds);
    }

    beit_dataset_import_options bad = o;
    bad.out = images_path;
    EXPECT_ERR2(beit_dataset_import(&bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "opts->out", "opts->images");
    size_t size = 0;
    unsigned char *still = read_file(images_path, &size);
    CHECK(still && size == sizeof images && memcmp(still, images, size) == 0, "a refused import changed its input");
    free(still);
    bad = o;
    bad.format = (beit_import_format)7;
    EXPECT_ERR(beit_dataset_import(&bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "opts->format 7");
    bad = o;
    bad.channels = 3;
    EXPECT_ERR(beit_dataset_import(&bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "opts->channels");
    bad = o;
    bad.out = NULL;
    EXPECT_ERR(beit_dataset_import(&bad, NULL), BEIT_ERR_NULL_POINTER, "opts->out");
    bad = o;
    bad.format = BEIT_IMPORT_IMAGE_FOLDER;
    bad.images = bad.labels = NULL;
    EXPECT_ERR(beit_dataset_import(&bad, NULL), BEIT_ERR_NULL_POINTER, "opts->dir");
    bad = o;
    bad.labels = images_path;
    EXPECT_ERR(beit_dataset_import(&bad, NULL), BEIT_ERR_FORMAT, "magic");
    EXPECT_ERR(beit_dataset_import(NULL, NULL), BEIT_ERR_NULL_POINTER, "opts");
    section("import: IDX files come back as their pixels and labels; refusals");
}

/* ------------------------------------------------------------------------------------------ */
/* Loader                                                                                      */

enum { B = 4, NP = GH * GW };

typedef struct {
    float view1[B * C * H * W];
    float view2[B * C * H * W];
    uint8_t masks[B * NP];
    int64_t labels[B];
    int64_t tokens[B * NP];
    beit_loader_batch b;
} batch_buf;

static beit_loader_batch *buffers(batch_buf *x) {
    x->b = beit_loader_batch_default();
    x->b.view1 = x->view1;
    x->b.view1_len = B * C * H * W;
    x->b.view2 = x->view2;
    x->b.view2_len = B * C * H * W;
    x->b.bool_masked_pos = x->masks;
    x->b.bool_masked_pos_len = B * NP;
    x->b.labels = x->labels;
    x->b.labels_len = B;
    x->b.tokens = x->tokens;
    x->b.tokens_len = B * NP;
    return &x->b;
}

static beit_loader_options loader_options(void) {
    beit_loader_options o = beit_loader_options_default();
    o.batch_size = B;
    o.image_height = H;
    o.image_width = W;
    o.patch_height = PATCH;
    o.patch_width = PATCH;
    o.view2_height = H;
    o.view2_width = W;
    o.seed = 11;
    o.workers = 2;
    o.drop_last = false;
    o.token_source = BEIT_TOKENS_CACHED;
    return o;
}

/* Checks one batch against the dataset: whole images normalised, cached tokens, masks. */
static int batch_matches(const data *d, const batch_buf *x, size_t images, size_t masked, int *seen) {
    int bad = 0;
    for (size_t k = 0; k < images; k++) {
        int64_t i = x->labels[k];
        if (i < 0 || i >= N) return 1;
        seen[i]++;
        for (int c = 0; c < C; c++)
            for (int p = 0; p < H * W; p++) {
                float want = ((float)d->pixels[i * PIX + p * C + c] * (1.0f / 255.0f) - 0.5f) / 0.5f;
                float want2 = (float)d->pixels[i * PIX + p * C + c] * (1.0f / 255.0f) * 0.8f + 0.1f;
                bad += x->view1[((k * C) + (size_t)c) * H * W + (size_t)p] != want;
                float diff = x->view2[((k * C) + (size_t)c) * H * W + (size_t)p] - want2;
                bad += diff > 1e-5f || diff < -1e-5f;
            }
        size_t count = 0;
        for (int p = 0; p < NP; p++) {
            bad += x->tokens[k * NP + (size_t)p] != d->tokens[i * TOKS + p];
            bad += x->masks[k * NP + (size_t)p] > 1;
            count += x->masks[k * NP + (size_t)p];
        }
        bad += count < 1 || count > masked;
    }
    return bad;
}

static void test_loader(const data *d, beit_context *ctx) {
    beit_loader_options o = loader_options();
    beit_loader *l = NULL;
    EXPECT_OK(beit_loader_create(ctx, data_path, &o, &l));
    if (!l) return;
    beit_loader_info info = beit_loader_info_default();
    EXPECT_OK(beit_loader_get_info(l, &info));
    CHECK(info.batch_size == B && info.channels == C && info.height == H && info.width == W &&
              info.grid_h == GH && info.grid_w == GW && info.num_patches == NP && info.masked_patches == 2 &&
              info.batches_per_epoch == 3 && info.dataset_count == N && info.has_labels && info.has_tokens &&
              info.token_source == BEIT_TOKENS_CACHED && info.view1_len == B * C * H * W &&
              info.bool_masked_pos_len == B * NP && info.labels_len == B && info.tokens_len == B * NP,
          "loader info");

    static batch_buf x, again;
    for (int epoch = 0; epoch < 2; epoch++) {
        int seen[N] = {0}, bad = 0;
        for (int p = 0; p < 3; p++) {
            beit_loader_batch *b = buffers(&x);
            EXPECT_OK(beit_loader_next(l, b));
            size_t want_images = p == 2 ? N - 2 * B : B;
            CHECK(b->images == want_images && b->position == (uint64_t)(epoch * 3 + p) &&
                      b->epoch == (uint64_t)epoch && b->labels_written && b->tokens_written,
                  "batch %d of epoch %d: images %zu position %llu", p, epoch, b->images,
                  (unsigned long long)b->position);
            bad += batch_matches(d, &x, b->images, info.masked_patches, seen);
            if (p == 2) {
                int tail = 0;
                for (size_t k = b->images * C * H * W; k < B * C * H * W; k++) tail += x.view1[k] != 0.0f;
                for (size_t k = b->images; k < B; k++) tail += x.labels[k] != 0;
                CHECK(tail == 0, "the short batch's unused entries are not zero");
            }
        }
        CHECK(bad == 0, "epoch %d: %d values differ from the dataset", epoch, bad);
        int once = 1;
        for (int i = 0; i < N; i++) once &= seen[i] == 1;
        CHECK(once, "epoch %d does not visit every sample once", epoch);
    }
    /* The batch at a position is the same after a seek, whatever came before. */
    uint64_t pos = 0;
    EXPECT_OK(beit_loader_get_position(l, &pos));
    CHECK(pos == 6, "position %llu", (unsigned long long)pos);
    EXPECT_OK(beit_loader_seek(l, 4));
    EXPECT_OK(beit_loader_next(l, buffers(&x)));
    EXPECT_OK(beit_loader_seek(l, 0));
    EXPECT_OK(beit_loader_next(l, buffers(&again)));
    EXPECT_OK(beit_loader_seek(l, 4));
    EXPECT_OK(beit_loader_next(l, buffers(&again)));
    CHECK(memcmp(x.view1, again.view1, sizeof x.view1) == 0 && memcmp(x.masks, again.masks, sizeof x.masks) == 0 &&
              memcmp(x.labels, again.labels, sizeof x.labels) == 0 && again.b.position == 4,
          "batch 4 differs after a seek");
    beit_loader_free(l);

    /* Another loader with another worker count gives the same batch 4. */
    o.workers = 1;
    o.epoch_start = 1;
    EXPECT_OK(beit_loader_create(ctx, data_path, &o, &l));
    if (l) {
        EXPECT_OK(beit_loader_next(l, buffers(&again)));
        CHECK(again.b.position == 3, "epoch_start 1 starts at position %llu", (unsigned long long)again.b.position);
        EXPECT_OK(beit_loader_next(l, buffers(&again)));
        CHECK(memcmp(x.view1, again.view1, sizeof x.view1) == 0 && memcmp(x.masks, again.masks, sizeof x.masks) == 0,
              "batch 4 depends on the worker count");
        beit_loader_free(l);
    }
    section("loader: whole images, cached tokens, masks, epochs, seek, short batch");
}

static void test_loader_refusals(beit_context *ctx) {
    beit_loader *l = NULL;
    beit_loader_options o = loader_options();
    o.token_source = (beit_token_source)9;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "token_source 9");
    o = loader_options();
    o.masking = (beit_masking_strategy)4;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "opts->masking 4");
    o = loader_options();
    o.token_source = BEIT_TOKENS_TOKENIZER;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_NULL_POINTER, "opts->tokenizer");
    o = loader_options();
    o.flip_prob = 0.5;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "whole");
    o = loader_options();
    o.image_height = 0;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "image_height is 0");
    o = loader_options();
    o.image_width = 10;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "patches");
    o = loader_options();
    o.batch_size = 0;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "batch_size is 0");
    o = loader_options();
    o.drop_last = true;
    o.batch_size = N + 1;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "fewer images than one batch");
    o = loader_options();
    float mean[2] = {0.5f, 0.5f};
    o.mean = mean;
    o.mean_len = 2;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "mean_len is 2");
    o = loader_options();
    o.struct_size = 8;
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, &l), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    o = loader_options();
    EXPECT_ERR(beit_loader_create(NULL, data_path, &o, &l), BEIT_ERR_NULL_POINTER, "ctx");
    EXPECT_ERR(beit_loader_create(ctx, NULL, &o, &l), BEIT_ERR_NULL_POINTER, "dataset_path");
    EXPECT_ERR(beit_loader_create(ctx, data_path, &o, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_loader_create(ctx, "/nonexistent.beitds", &o, &l), BEIT_ERR_IO, "nonexistent");
    CHECK(l == NULL, "a refused create wrote *out");

    EXPECT_OK(beit_loader_create(ctx, data_path, &o, &l));
    if (!l) return;
    static batch_buf x;
    beit_loader_batch *b = buffers(&x);
    memset(x.view1, 0x7f, sizeof x.view1);
    b->view1_len--;
    EXPECT_ERR2(beit_loader_next(l, b), BEIT_ERR_BUFFER_SIZE, "view1_len is 767", "768");
    b = buffers(&x);
    b->tokens_len = 3;
    EXPECT_ERR2(beit_loader_next(l, b), BEIT_ERR_BUFFER_SIZE, "tokens_len is 3", "16");
    b = buffers(&x);
    b->view2 = NULL;
    EXPECT_ERR(beit_loader_next(l, b), BEIT_ERR_INVALID_ARGUMENT, "view2 is NULL");
    b = buffers(&x);
    b->struct_size = 8;
    EXPECT_ERR(beit_loader_next(l, b), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    EXPECT_ERR(beit_loader_next(l, NULL), BEIT_ERR_NULL_POINTER, "batch");
    EXPECT_ERR(beit_loader_next(NULL, buffers(&x)), BEIT_ERR_NULL_POINTER, "loader");
    int untouched = 1;
    for (size_t k = 0; k < sizeof x.view1 / sizeof x.view1[0]; k++) {
        uint32_t bits;
        memcpy(&bits, &x.view1[k], 4);
        untouched &= bits == 0x7f7f7f7fu;
    }
    CHECK(untouched, "a refused next wrote view 1");
    uint64_t pos = 9;
    EXPECT_OK(beit_loader_get_position(l, &pos));
    CHECK(pos == 0, "refused calls moved the position to %llu", (unsigned long long)pos);
    EXPECT_ERR(beit_loader_get_position(l, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_loader_seek(NULL, 1), BEIT_ERR_NULL_POINTER, "loader");
    beit_loader_info info = beit_loader_info_default();
    info.struct_size = 4;
    EXPECT_ERR(beit_loader_get_info(l, &info), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    EXPECT_ERR(beit_loader_get_info(NULL, &info), BEIT_ERR_NULL_POINTER, "loader");
    beit_loader_free(l);
    beit_loader_free(NULL);
    section("loader: bad options and buffers are refused, nothing written, position kept");
}

/* ------------------------------------------------------------------------------------------ */
/* Mask generator                                                                              */

static void test_mask_generator(void) {
    enum { GRID = 14, NPATCH = GRID * GRID };
    beit_mask_generator_options o = beit_mask_generator_options_default();
    o.grid_height = GRID;
    o.grid_width = GRID;
    o.seed = 5;
    beit_mask_generator *a = NULL, *b = NULL;
    EXPECT_OK(beit_mask_generator_create(&o, &a));
    EXPECT_OK(beit_mask_generator_create(&o, &b));
    if (!a || !b) return;
    int same = 1, bounds = 1;
    double total = 0;
    for (int r = 0; r < 100; r++) {
        uint8_t ma[NPATCH], mb[NPATCH];
        size_t ca = 0, cb = 0, ones = 0;
        EXPECT_OK(beit_mask_generator_next(a, ma, NPATCH, &ca));
        EXPECT_OK(beit_mask_generator_next(b, mb, NPATCH, &cb));
        same &= memcmp(ma, mb, NPATCH) == 0 && ca == cb;
        for (int k = 0; k < NPATCH; k++) {
            bounds &= ma[k] <= 1;
            ones += ma[k];
        }
        bounds &= ones == ca && ca <= 75;
        total += (double)ca;
    }
    CHECK(same, "two generators with one seed differ");
    CHECK(bounds, "a mask out of bounds");
    CHECK(total / 100 > 70, "block-wise masks average %.1f of 75 patches", total / 100);
    beit_mask_generator_free(a);
    beit_mask_generator_free(b);

    o.strategy = BEIT_MASKING_RANDOM;
    o.masked_patches = 50;
    EXPECT_OK(beit_mask_generator_create(&o, &a));
    if (a) {
        int exact = 1;
        for (int r = 0; r < 20; r++) {
            uint8_t m[NPATCH];
            size_t count = 0;
            EXPECT_OK(beit_mask_generator_next(a, m, NPATCH, &count));
            exact &= count == 50;
        }
        CHECK(exact, "random masking is not exact");
        uint8_t small[NPATCH - 1];
        memset(small, 3, sizeof small);
        EXPECT_ERR2(beit_mask_generator_next(a, small, sizeof small, NULL), BEIT_ERR_BUFFER_SIZE, "len is 195", "196");
        CHECK(small[0] == 3, "a refused draw wrote the mask");
        EXPECT_ERR(beit_mask_generator_next(a, NULL, NPATCH, NULL), BEIT_ERR_NULL_POINTER, "mask");
        EXPECT_ERR(beit_mask_generator_next(NULL, small, NPATCH, NULL), BEIT_ERR_NULL_POINTER, "generator");
        beit_mask_generator_free(a);
    }
    a = NULL;
    o.strategy = (beit_masking_strategy)3;
    EXPECT_ERR(beit_mask_generator_create(&o, &a), BEIT_ERR_INVALID_ARGUMENT, "strategy 3");
    o.strategy = BEIT_MASKING_BLOCKWISE;
    o.masked_patches = NPATCH;
    EXPECT_ERR(beit_mask_generator_create(&o, &a), BEIT_ERR_INVALID_ARGUMENT, "masked_patches is 196");
    o.masked_patches = 10;
    o.min_block = 11;
    EXPECT_ERR(beit_mask_generator_create(&o, &a), BEIT_ERR_INVALID_ARGUMENT, "min_block is 11");
    o.min_block = 0;
    o.min_aspect = 2.0;
    EXPECT_ERR(beit_mask_generator_create(&o, &a), BEIT_ERR_INVALID_ARGUMENT, "min_aspect");
    o.min_aspect = 0.3;
    o.grid_width = 0;
    EXPECT_ERR(beit_mask_generator_create(&o, &a), BEIT_ERR_INVALID_ARGUMENT, "14x0");
    EXPECT_ERR(beit_mask_generator_create(NULL, &a), BEIT_ERR_NULL_POINTER, "opts");
    CHECK(a == NULL, "a refused create wrote *out");
    beit_mask_generator_free(NULL);
    section("mask generator: seeded, counts in bounds, random exact, refusals");
}

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/beit-test-data-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    printf("libbeit %s (ABI %u); data test; scratch %s\n", beit_version(), beit_abi_version(), dir);
    beit_context_options co = beit_context_options_default();
    co.device = BEIT_DEVICE_CPU;
    co.num_threads = 2;
    beit_context *ctx = NULL;
    EXPECT_OK(beit_context_create(&co, &ctx));
    static data d;
    make_data(&d);
    test_writer(&d);
    test_writer_refusals(&d);
    test_import();
    if (ctx) {
        test_loader(&d, ctx);
        test_loader_refusals(ctx);
    }
    test_mask_generator();
    beit_context_free(ctx);
    CHECK(entries_in(dir) >= 0, "scratch directory");
    remove_tree(dir);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
