/*
 * C API test of libbeit's tokenizer trainer (beit_dvae_trainer_*), written against
 * include/beit.h only; needs nothing but libc.
 *
 *   test_dvae
 *
 * A grey dataset file is written here byte by byte (docs/dataset-format.md). Then: the
 * defaults are `beit tokenizer train`'s; a trainer on a small config describes itself; a host
 * step reports what its first step must (step 1, the starting temperature, the peak learning
 * rate after a one-step warmup, a loss equal to the reconstruction error while the KL weight is
 * still 0); dataset training calls the progress callback after every step, stops when it
 * returns nonzero, and gives the same tokenizer files in one call as in several; the tokenizer
 * handed out tokenizes as the saved directory does and stays as it was while the trainer goes
 * on; a trainer loaded from the saved directory saves the same files; a save that fails half-way
 * (a file size limit) or cannot create its directory leaves the old files and no temporary
 * file; NULL for every pointer, too small structs, bad config fields and option values, wrong
 * lengths and non-finite pixels, a dataset of another channel count or with fewer images than
 * a batch, and a callback calling into its own trainer are refused with the right status and a
 * message, changing nothing.
 *
 * Prints one line per failed check, a line per section, and finally "N passed, M failed";
 * exits non-zero on any failure. Built by scripts/test-c, which also runs it under valgrind.
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

/* The tokenizer: 8x8 grey images, 2 groups (4x4 tokens), 16 codes. */
enum { S = 8, P = 16, V = 16, IMG = S * S };
/* The dataset: N grey 12x12 images. */
enum { N = 12, DH = 12, DW = 12 };

static char dir[64];
static char grey_path[128], rgb_path[128];

static void put_u32(uint8_t *b, size_t at, uint32_t v) {
    for (int k = 0; k < 4; k++) b[at + k] = (uint8_t)(v >> (8 * k));
}
static void put_u64(uint8_t *b, size_t at, uint64_t v) {
    for (int k = 0; k < 8; k++) b[at + k] = (uint8_t)(v >> (8 * k));
}

/* A pixels-only dataset of `n` images of DHxDWx`c` (header 128 bytes, pixels right after). */
static int write_dataset(const char *path, int n, int c) {
    size_t pix = (size_t)DH * DW * c, len = 128 + (size_t)n * pix;
    uint8_t *b = calloc(len, 1);
    if (!b) return -1;
    static const uint8_t magic[8] = {'B', 'E', 'I', 'T', 'D', 'S', 0, 1};
    memcpy(b, magic, 8);
    put_u32(b, 8, 1);   /* version */
    put_u32(b, 12, 128); /* header_size */
    put_u64(b, 16, (uint64_t)n);
    put_u32(b, 24, DH);
    put_u32(b, 28, DW);
    put_u32(b, 32, (uint32_t)c);
    put_u32(b, 36, 1); /* pixel_layout: HWC u8 */
    put_u64(b, 56, 128);
    put_u64(b, 64, (uint64_t)n * pix);
    for (int i = 0; i < n; i++)
        for (size_t k = 0; k < pix; k++) b[128 + i * pix + k] = (uint8_t)((k * 29 + (size_t)i * 83 + (k / DW) * i * 7) % 256);
    int rc = write_file(path, b, len);
    free(b);
    return rc;
}

static beit_dvae_config small_config(void) {
    beit_dvae_config c = beit_dvae_config_default();
    c.in_channels = 1;
    c.image_size = S;
    c.vocab_size = V;
    c.n_hid = 8;
    c.group_count = 2;
    c.n_blk_per_group = 1;
    c.decoder_n_init = 8;
    return c;
}

static beit_dvae_train_options small_options(void) {
    beit_dvae_train_options o = beit_dvae_train_options_default();
    o.lr = 2e-3f;
    o.kl_weight = 0.01f;
    o.tau_start = 0.9f;
    o.tau_end = 0.2f;
    o.total_steps = 7;
    o.seed = 11;
    return o;
}

static beit_dvae_data_options small_data(uint64_t steps) {
    beit_dvae_data_options d = beit_dvae_data_options_default();
    d.steps = steps;
    d.batch = 4;
    d.crop_scale_min = 0.4;
    d.workers = 2;
    d.seed = 3;
    return d;
}

/* Mapped pixels [batch, 1, 8, 8] (map_pixels of values in [0, 1]). */
static void mapped_batch(float *px, int batch, int seed) {
    for (int i = 0; i < batch * IMG; i++) px[i] = 0.8f * (float)((i * 37 + seed * 11) % 97) / 96.0f + 0.1f;
}

static beit_dvae_trainer *create(beit_context *ctx) {
    beit_dvae_config c = small_config();
    beit_dvae_train_options o = small_options();
    beit_dvae_trainer *t = NULL;
    EXPECT_OK(beit_dvae_trainer_create(ctx, &c, &o, &t));
    return t;
}

static uint64_t steps_of(const beit_dvae_trainer *t) {
    uint64_t n = 12345;
    EXPECT_OK(beit_dvae_trainer_step_count(t, &n));
    return n;
}

/* Whether the two tokenizer directories hold byte-identical config.json and model.safetensors. */
static int same_files(const char *a, const char *b) {
    const char *names[2] = {"config.json", "model.safetensors"};
    for (int k = 0; k < 2; k++) {
        char pa[256], pb[256];
        snprintf(pa, sizeof pa, "%s/%s", a, names[k]);
        snprintf(pb, sizeof pb, "%s/%s", b, names[k]);
        size_t na = 0, nb = 0;
        unsigned char *fa = read_file(pa, &na), *fb = read_file(pb, &nb);
        int same = fa && fb && na == nb && memcmp(fa, fb, na) == 0;
        free(fa);
        free(fb);
        if (!same) return 0;
    }
    return 1;
}

static void path_in(char *out, size_t size, const char *name) { snprintf(out, size, "%s/%s", dir, name); }

/* ------------------------------------------------------------------------------------------ */

static void test_defaults(void) {
    beit_dvae_config c = beit_dvae_config_default();
    CHECK(c.struct_size == sizeof c && c.in_channels == 1 && c.image_size == 32 && c.vocab_size == 8192 &&
              c.n_hid == 32 && c.group_count == 3 && c.n_blk_per_group == 1 && c.decoder_n_init == 64,
          "beit_dvae_config_default is not beit tokenizer train's");
    beit_dvae_train_options o = beit_dvae_train_options_default();
    CHECK(o.struct_size == sizeof o && o.lr == 1e-3f && o.kl_weight == 5e-3f && o.tau_start == 1.0f &&
              o.tau_end == 0.125f && o.total_steps == 600 && o.seed == 0,
          "beit_dvae_train_options_default is not beit tokenizer train's");
    beit_dvae_data_options d = beit_dvae_data_options_default();
    CHECK(d.struct_size == sizeof d && d.steps == 0 && d.batch == 64 && d.crop_scale_min == 0.5 && d.workers == 1 &&
              d.seed == 0,
          "beit_dvae_data_options_default is not beit tokenizer train's");
    beit_dvae_step_stats s = beit_dvae_step_stats_default();
    beit_dvae_train_summary r = beit_dvae_train_summary_default();
    CHECK(s.struct_size == sizeof s && s.step == 0 && r.struct_size == sizeof r && r.steps == 0 && !r.stopped,
          "the stats defaults are not zeroed with their size");
    section("defaults");
}

static void test_host_steps(beit_context *ctx) {
    beit_dvae_trainer *t = create(ctx);
    beit_tokenizer_info info = beit_tokenizer_info_default();
    EXPECT_OK(beit_dvae_trainer_get_info(t, &info));
    CHECK(info.in_channels == 1 && info.image_size == S && info.vocab_size == V && info.grid_h == 4 &&
              info.grid_w == 4 && info.tokens_per_image == P && info.has_decoder,
          "get_info: %zu %zu %zu %zux%zu", info.in_channels, info.image_size, info.vocab_size, info.grid_h,
          info.grid_w);
    CHECK(steps_of(t) == 0, "a new trainer has steps");
    float px[3 * IMG];
    mapped_batch(px, 3, 0);
    beit_dvae_step_stats s = beit_dvae_step_stats_default();
    EXPECT_OK(beit_dvae_trainer_step(t, px, 3 * IMG, 3, &s));
    /* Step 0: temperature tau_start; warmup is max(1, 7/20) = 1 step, so the peak rate; the KL
     * weight warms up from 0, so the loss is the reconstruction error alone. */
    CHECK(s.step == 1 && s.tau == (double)0.9f && s.lr == (double)2e-3f, "first step: step %llu tau %g lr %g",
          (unsigned long long)s.step, s.tau, s.lr);
    CHECK(s.loss == s.recon_mse && s.recon_mse > 0 && s.kl >= 0 && s.perplexity >= 1 && s.perplexity <= V,
          "first step: loss %g recon %g kl %g perplexity %g", s.loss, s.recon_mse, s.kl, s.perplexity);
    EXPECT_OK(beit_dvae_trainer_step(t, px, 3 * IMG, 3, &s));
    CHECK(s.step == 2 && s.tau < (double)0.9f && s.loss > s.recon_mse, "second step: step %llu tau %g loss %g",
          (unsigned long long)s.step, s.tau, s.loss);
    EXPECT_OK(beit_dvae_trainer_step(t, px, 2 * IMG, 2, NULL));
    CHECK(steps_of(t) == 3, "three steps counted as %llu", (unsigned long long)steps_of(t));
    beit_dvae_trainer_free(t);
    section("host steps");
}

/* The progress callback's record. */
typedef struct {
    uint64_t steps[32];
    int calls;
    uint64_t stop_at;
    beit_dvae_trainer *trainer;
    beit_status reentered;
} progress;

static int32_t on_step(const beit_dvae_step_stats *s, void *user) {
    progress *p = user;
    if (p->calls < 32) p->steps[p->calls] = s->step;
    p->calls++;
    if (p->trainer) {
        uint64_t n = 0;
        p->reentered = beit_dvae_trainer_step_count(p->trainer, &n);
    }
    return s->step == p->stop_at;
}

static beit_status train(beit_dvae_trainer *t, const char *data, uint64_t steps, progress *p,
                         beit_dvae_train_summary *out) {
    beit_dvae_data_options d = small_data(steps);
    return beit_dvae_trainer_train(t, data, &d, on_step, p, out);
}

static void test_dataset_training(beit_context *ctx) {
    char one[128], split[128];
    path_in(one, sizeof one, "one");
    path_in(split, sizeof split, "split");

    beit_dvae_trainer *t = create(ctx);
    progress p = {.stop_at = 0};
    beit_dvae_train_summary r = beit_dvae_train_summary_default();
    EXPECT_OK(train(t, grey_path, 0, &p, &r)); /* steps 0: up to total_steps, 7 */
    int in_order = p.calls == 7;
    for (int k = 0; k < p.calls && k < 32; k++) in_order &= p.steps[k] == (uint64_t)k + 1;
    CHECK(in_order, "the callback saw %d steps, not 1..7 in order", p.calls);
    CHECK(r.steps == 7 && !r.stopped && r.seconds > 0 && steps_of(t) == 7, "summary: %llu steps, stopped %d",
          (unsigned long long)r.steps, r.stopped);
    EXPECT_OK(beit_dvae_trainer_save(t, one));

    /* Stopped after step 2 by the callback, then 1 more, then the rest: the same tokenizer. */
    beit_dvae_trainer *u = create(ctx);
    progress q = {.stop_at = 2};
    EXPECT_OK(train(u, grey_path, 5, &q, &r));
    CHECK(r.steps == 2 && r.stopped && steps_of(u) == 2 && q.calls == 2, "stopped run: %llu steps, stopped %d",
          (unsigned long long)r.steps, r.stopped);
    EXPECT_OK(train(u, grey_path, 1, &q, NULL));
    /* NULL opts are the defaults: batches of 64, more than the dataset holds. */
    EXPECT_ERR(beit_dvae_trainer_train(u, grey_path, NULL, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "than one batch (64)");
    EXPECT_OK(train(u, grey_path, 0, &q, &r));
    CHECK(r.steps == 4 && steps_of(u) == 7 && q.calls == 7, "the rest: %llu steps", (unsigned long long)r.steps);
    EXPECT_OK(beit_dvae_trainer_save(u, split));
    CHECK(same_files(one, split), "a run stopped after 2 steps and resumed differs from one run");
    beit_dvae_data_options d = small_data(4);
    beit_dvae_trainer *w = create(ctx);
    EXPECT_OK(beit_dvae_trainer_train(w, grey_path, &d, NULL, NULL, NULL));
    d.steps = 3;
    EXPECT_OK(beit_dvae_trainer_train(w, grey_path, &d, NULL, NULL, NULL));
    EXPECT_OK(beit_dvae_trainer_save(w, split));
    CHECK(same_files(one, split), "4 + 3 steps differ from 7 steps in one call");

    /* At total_steps, steps 0 runs nothing. */
    p.calls = 0;
    EXPECT_OK(train(t, grey_path, 0, &p, &r));
    CHECK(r.steps == 0 && p.calls == 0 && steps_of(t) == 7, "a finished trainer ran %llu more steps",
          (unsigned long long)r.steps);
    /* A callback that calls into its trainer is refused as busy, and the run goes on. */
    progress re = {.stop_at = 0, .trainer = t, .reentered = BEIT_OK};
    EXPECT_OK(train(t, grey_path, 2, &re, NULL));
    CHECK(re.calls == 2 && re.reentered == BEIT_ERR_BUSY && steps_of(t) == 9, "reentry: %s, %d calls",
          beit_status_name(re.reentered), re.calls);
    beit_dvae_trainer_free(t);
    beit_dvae_trainer_free(u);
    beit_dvae_trainer_free(w);
    section("dataset training");
}

static void test_tokenizer_and_load(beit_context *ctx) {
    char saved[128], again[128];
    path_in(saved, sizeof saved, "saved");
    path_in(again, sizeof again, "again");
    beit_dvae_trainer *t = create(ctx);
    float px[4 * IMG];
    mapped_batch(px, 4, 5);
    EXPECT_OK(beit_dvae_trainer_step(t, px, 4 * IMG, 4, NULL));
    EXPECT_OK(beit_dvae_trainer_save(t, saved));
    beit_tokenizer *copy = NULL, *loaded = NULL;
    EXPECT_OK(beit_dvae_trainer_get_tokenizer(t, &copy));
    EXPECT_OK(beit_tokenizer_load(ctx, saved, &loaded));
    float plain[4 * IMG];
    for (int i = 0; i < 4 * IMG; i++) plain[i] = (float)((i * 13) % 50) / 49.0f;
    int64_t a[4 * P], b[4 * P], c[4 * P];
    EXPECT_OK(beit_tokenizer_tokenize(copy, plain, 4 * IMG, 4, a, 4 * P));
    EXPECT_OK(beit_tokenizer_tokenize(loaded, plain, 4 * IMG, 4, b, 4 * P));
    CHECK(memcmp(a, b, sizeof a) == 0, "the handed-out tokenizer differs from the saved one");
    float back[4 * IMG];
    EXPECT_OK(beit_tokenizer_decode(copy, a, 4 * P, 4, back, 4 * IMG));
    /* The copy stays as it was while the trainer goes on (with a high learning rate). */
    for (int k = 0; k < 3; k++) EXPECT_OK(beit_dvae_trainer_step(t, px, 4 * IMG, 4, NULL));
    EXPECT_OK(beit_tokenizer_tokenize(copy, plain, 4 * IMG, 4, c, 4 * P));
    CHECK(memcmp(a, c, sizeof a) == 0, "the handed-out tokenizer changed with the trainer");

    beit_dvae_trainer *l = NULL;
    EXPECT_OK(beit_dvae_trainer_load(ctx, saved, NULL, &l));
    CHECK(l && steps_of(l) == 0, "a loaded trainer starts at step 0");
    EXPECT_OK(beit_dvae_trainer_save(l, again));
    CHECK(same_files(saved, again), "a loaded trainer saves other files than it loaded");
    beit_tokenizer_free(copy);
    beit_tokenizer_free(loaded);
    beit_dvae_trainer_free(l);
    beit_dvae_trainer_free(t);
    section("tokenizer copy and load");
}

static void test_failed_saves(beit_context *ctx) {
    char out[128], old[128], blocker[128], under[160];
    path_in(out, sizeof out, "kept");
    path_in(old, sizeof old, "kept-before");
    path_in(blocker, sizeof blocker, "a-file");
    snprintf(under, sizeof under, "%s/sub", blocker);
    beit_dvae_trainer *t = create(ctx);
    EXPECT_OK(beit_dvae_trainer_save(t, out));
    EXPECT_OK(beit_dvae_trainer_save(t, old));
    float px[2 * IMG];
    mapped_batch(px, 2, 1);
    EXPECT_OK(beit_dvae_trainer_step(t, px, 2 * IMG, 2, NULL));
    /* The weights (a few KB) cannot be written past 1 KB: nothing may be replaced. */
    file_size_limit limit = limit_file_size(1024);
    beit_status st = beit_dvae_trainer_save(t, out);
    undo_file_size_limit(limit);
    EXPECT_ERR(st, BEIT_ERR_IO, "cannot write");
    CHECK(same_files(out, old), "a failed save replaced the old files");
    CHECK(temp_files_in(out) == 0, "a failed save left temporary files");
    CHECK(write_file(blocker, "x", 1) == 0, "cannot write %s", blocker);
    EXPECT_ERR(beit_dvae_trainer_save(t, under), BEIT_ERR_IO, "sub");
    EXPECT_OK(beit_dvae_trainer_save(t, out));
    CHECK(!same_files(out, old), "the save after the failed one wrote nothing new");
    beit_dvae_trainer_free(t);
    section("failed saves leave the old files");
}

static void test_refusals(beit_context *ctx) {
    beit_dvae_trainer *out = NULL;
    beit_dvae_config c = small_config();
    beit_dvae_train_options o = small_options();
    EXPECT_ERR(beit_dvae_trainer_create(NULL, &c, &o, &out), BEIT_ERR_NULL_POINTER, "ctx");
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &o, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_dvae_trainer_load(ctx, NULL, &o, &out), BEIT_ERR_NULL_POINTER, "dir");
    EXPECT_ERR(beit_dvae_trainer_load(NULL, dir, &o, &out), BEIT_ERR_NULL_POINTER, "ctx");
    EXPECT_ERR(beit_dvae_trainer_load(ctx, dir, &o, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_dvae_trainer_load(ctx, "/nonexistent/beit-tokenizer", &o, &out), BEIT_ERR_IO, "nonexistent");

    /* Bad config fields and option values, each named. */
    beit_dvae_config bad = c;
    bad.in_channels = 5;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->in_channels");
    bad = c;
    bad.image_size = 9;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->image_size");
    bad = c;
    bad.n_hid = 6;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->n_hid");
    bad = c;
    bad.vocab_size = 70000;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->vocab_size");
    bad = c;
    bad.group_count = 0;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->group_count");
    bad = c;
    bad.n_blk_per_group = 17;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->n_blk_per_group");
    bad = c;
    bad.decoder_n_init = 0;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->decoder_n_init");
    bad = c;
    bad.struct_size = sizeof(size_t);
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &bad, &o, &out), BEIT_ERR_INVALID_ARGUMENT, "config->struct_size");
    beit_dvae_train_options bo = o;
    bo.lr = NAN;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->lr");
    bo = o;
    bo.kl_weight = -1.0f;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->kl_weight");
    bo = o;
    bo.tau_start = 0.0f;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->tau_start");
    bo = o;
    bo.tau_end = INFINITY;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->tau_end");
    bo = o;
    bo.total_steps = 0;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->total_steps");
    bo = o;
    bo.struct_size = 1;
    EXPECT_ERR(beit_dvae_trainer_create(ctx, &c, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->struct_size");
    EXPECT_ERR(beit_dvae_trainer_load(ctx, dir, &bo, &out), BEIT_ERR_INVALID_ARGUMENT, "opts->struct_size");
    CHECK(out == NULL, "a refused create wrote *out");

    beit_dvae_trainer *t = create(ctx);
    char before[128], now[128];
    path_in(before, sizeof before, "refusals-before");
    path_in(now, sizeof now, "refusals-now");
    EXPECT_OK(beit_dvae_trainer_save(t, before));

    /* Steps. */
    float px[2 * IMG];
    mapped_batch(px, 2, 2);
    beit_dvae_step_stats s = beit_dvae_step_stats_default();
    s.step = 99;
    EXPECT_ERR(beit_dvae_trainer_step(NULL, px, 2 * IMG, 2, &s), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_dvae_trainer_step(t, NULL, 2 * IMG, 2, &s), BEIT_ERR_NULL_POINTER, "pixels");
    EXPECT_ERR(beit_dvae_trainer_step(t, px, 2 * IMG, 0, &s), BEIT_ERR_INVALID_ARGUMENT, "batch is 0");
    EXPECT_ERR2(beit_dvae_trainer_step(t, px, 2 * IMG - 1, 2, &s), BEIT_ERR_INVALID_ARGUMENT, "pixels_len is 127",
                "needs 128");
    EXPECT_ERR2(beit_dvae_trainer_step(t, px, 2 * IMG, 3, &s), BEIT_ERR_INVALID_ARGUMENT, "pixels_len is 128",
                "needs 192");
    EXPECT_ERR(beit_dvae_trainer_step(t, px, 2 * IMG, SIZE_MAX / 2, &s), BEIT_ERR_INVALID_ARGUMENT,
               "more values than fit");
    px[70] = NAN;
    EXPECT_ERR(beit_dvae_trainer_step(t, px, 2 * IMG, 2, &s), BEIT_ERR_INVALID_ARGUMENT, "pixels[70]");
    px[70] = -INFINITY;
    EXPECT_ERR(beit_dvae_trainer_step(t, px, 2 * IMG, 2, &s), BEIT_ERR_INVALID_ARGUMENT, "pixels[70]");
    mapped_batch(px, 2, 2);
    beit_dvae_step_stats small = s;
    small.struct_size = 4;
    EXPECT_ERR(beit_dvae_trainer_step(t, px, 2 * IMG, 2, &small), BEIT_ERR_INVALID_ARGUMENT, "out->struct_size");
    CHECK(s.step == 99, "a refused step wrote its stats");

    /* Dataset runs. */
    beit_dvae_train_summary r = beit_dvae_train_summary_default();
    r.steps = 99;
    beit_dvae_data_options d = small_data(2);
    EXPECT_ERR(beit_dvae_trainer_train(NULL, grey_path, &d, NULL, NULL, &r), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_dvae_trainer_train(t, NULL, &d, NULL, NULL, &r), BEIT_ERR_NULL_POINTER, "dataset_path");
    EXPECT_ERR(beit_dvae_trainer_train(t, rgb_path, &d, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "3 channel(s) and the tokenizer takes 1");
    char missing[128];
    path_in(missing, sizeof missing, "missing.beitds");
    EXPECT_ERR(beit_dvae_trainer_train(t, missing, &d, NULL, NULL, &r), BEIT_ERR_IO, "missing.beitds");
    beit_dvae_data_options bd = d;
    bd.batch = N + 1;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "fewer images (12) than one batch (13)");
    bd = d;
    bd.batch = 0;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT, "batch");
    bd = d;
    bd.workers = 0;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT, "worker");
    bd = d;
    bd.workers = 257;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT, "worker");
    bd = d;
    bd.crop_scale_min = 0.0;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "opts->crop_scale_min");
    bd.crop_scale_min = 1.5;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "opts->crop_scale_min");
    bd.crop_scale_min = NAN;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "opts->crop_scale_min");
    bd = d;
    bd.struct_size = 2;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &bd, NULL, NULL, &r), BEIT_ERR_INVALID_ARGUMENT,
               "opts->struct_size");
    beit_dvae_train_summary small_r = r;
    small_r.struct_size = 1;
    EXPECT_ERR(beit_dvae_trainer_train(t, grey_path, &d, NULL, NULL, &small_r), BEIT_ERR_INVALID_ARGUMENT,
               "out->struct_size");
    CHECK(r.steps == 99, "a refused run wrote its summary");

    /* The rest. */
    uint64_t n = 77;
    EXPECT_ERR(beit_dvae_trainer_step_count(NULL, &n), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_dvae_trainer_step_count(t, NULL), BEIT_ERR_NULL_POINTER, "out");
    CHECK(n == 77, "a refused step_count wrote *out");
    beit_tokenizer_info info = beit_tokenizer_info_default();
    EXPECT_ERR(beit_dvae_trainer_get_info(NULL, &info), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_dvae_trainer_get_info(t, NULL), BEIT_ERR_NULL_POINTER, "out");
    info.struct_size = 3;
    EXPECT_ERR(beit_dvae_trainer_get_info(t, &info), BEIT_ERR_INVALID_ARGUMENT, "out->struct_size");
    beit_tokenizer *tok = NULL;
    EXPECT_ERR(beit_dvae_trainer_get_tokenizer(NULL, &tok), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_dvae_trainer_get_tokenizer(t, NULL), BEIT_ERR_NULL_POINTER, "out");
    CHECK(tok == NULL, "a refused get_tokenizer wrote *out");
    EXPECT_ERR(beit_dvae_trainer_save(NULL, now), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_dvae_trainer_save(t, NULL), BEIT_ERR_NULL_POINTER, "dir");
    beit_dvae_trainer_free(NULL);

    CHECK(steps_of(t) == 0, "a refused call counted a step");
    EXPECT_OK(beit_dvae_trainer_save(t, now));
    CHECK(same_files(before, now), "a refused call changed the trainer");
    beit_dvae_trainer_free(t);
    section("refusals change nothing");
}

int main(void) {
    strcpy(dir, "/tmp/beit-test-dvae-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 2;
    }
    path_in(grey_path, sizeof grey_path, "grey.beitds");
    path_in(rgb_path, sizeof rgb_path, "rgb.beitds");
    if (write_dataset(grey_path, N, 1) != 0 || write_dataset(rgb_path, N, 3) != 0) {
        fprintf(stderr, "cannot write the datasets in %s\n", dir);
        return 2;
    }
    beit_context_options co = beit_context_options_default();
    co.num_threads = 2;
    co.device = BEIT_DEVICE_CPU;
    beit_context *ctx = NULL;
    EXPECT_OK(beit_context_create(&co, &ctx));
    if (!ctx) return 2;

    test_defaults();
    test_host_steps(ctx);
    test_dataset_training(ctx);
    test_tokenizer_and_load(ctx);
    test_failed_saves(ctx);
    test_refusals(ctx);

    beit_context_free(ctx);
    remove_tree(dir);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
