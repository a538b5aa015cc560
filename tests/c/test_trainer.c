/*
 * C API test of the libbeit pretraining trainer (beit_trainer_*), written against
 * include/beit.h only; needs nothing but libc and pthreads.
 *
 *   test_trainer
 *
 * A tiny BeitForMaskedImageModeling (hidden 32, 2 layers, 4 heads, 16x16 pixels in 4x4
 * patches, 1 channel, vocabulary 32) is trained on a batch built here: the loss must fall;
 * checkpoints must resume bit for bit, in the same and in another trainer; every bad input
 * must be refused with the right status and a message naming the problem, leaving the trainer
 * exactly where an untouched twin is; NULL for every pointer argument and too small structs
 * are refused; a failed save leaves the previous checkpoint byte-identical; threads stepping
 * one trainer at once each get BEIT_OK or BEIT_ERR_BUSY, and the trainer ends up exactly as one
 * that made the successful steps in sequence.
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

/* 1 when both files exist and hold the same bytes. */
static int same_file(const char *a, const char *b) {
    size_t na = 0, nb = 0;
    unsigned char *da = read_file(a, &na), *db = read_file(b, &nb);
    int same = da && db && na == nb && memcmp(da, db, na) == 0;
    free(da);
    free(db);
    return same;
}

#define PATH_CAP 4096

static void path_join(char *out, size_t cap, const char *dir, const char *name) {
    size_t ld = strlen(dir), ln = strlen(name);
    if (ld + 1 + ln + 1 > cap) {
        fprintf(stderr, "path too long: %s/%s\n", dir, name);
        abort();
    }
    memmove(out, dir, ld);
    out[ld] = '/';
    memcpy(out + ld + 1, name, ln);
    out[ld + 1 + ln] = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The model and the batch                                                                     */

#define CONFIG_WITH(inter)                                                                     \
    "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "             \
    "\"intermediate_size\": " inter ", \"image_size\": 16, \"patch_size\": 4, "                \
    "\"num_channels\": 1, \"vocab_size\": 32, \"use_mask_token\": true, "                      \
    "\"use_shared_relative_position_bias\": true, \"layer_scale_init_value\": 0.1}"

static const char *CONFIG = CONFIG_WITH("64");
static const char *OTHER_CONFIG = CONFIG_WITH("96");

enum { B = 2, C = 1, H = 16, W = 16, PATCHES = 16, VOCAB = 32 };
#define NPIX (B * C * H * W)
#define NPATCH (B * PATCHES)

typedef struct {
    float pixels[NPIX];
    uint8_t mask[NPATCH];
    int64_t labels[NPATCH];
} batch_t;

/* A deterministic batch: smooth pixels, about 40% of the patches masked, labels in range. */
static void make_batch(batch_t *b) {
    for (int i = 0; i < NPIX; i++) b->pixels[i] = (float)sin(0.37 * i) * 0.8f + (float)(i % 7) * 0.05f;
    for (int i = 0; i < NPATCH; i++) {
        b->mask[i] = (uint8_t)(((i * 7 + 3) % 5) < 2);
        b->labels[i] = (int64_t)((i * 5 + 11) % VOCAB);
    }
}

static int masked_count(const batch_t *b) {
    int n = 0;
    for (int i = 0; i < NPATCH; i++) n += b->mask[i];
    return n;
}

static int first_masked(const batch_t *b) {
    for (int i = 0; i < NPATCH; i++)
        if (b->mask[i]) return i;
    return -1;
}

static beit_mim_batch view(const batch_t *b) {
    beit_mim_batch v = beit_mim_batch_default();
    v.pixels = b->pixels;
    v.pixels_len = NPIX;
    v.batch = B;
    v.channels = C;
    v.height = H;
    v.width = W;
    v.bool_masked_pos = b->mask;
    v.bool_masked_pos_len = NPATCH;
    v.labels = b->labels;
    v.labels_len = NPATCH;
    return v;
}

static beit_trainer_options train_options(void) {
    beit_trainer_options o = beit_trainer_options_default();
    o.learning_rate = 1e-3; /* constant: warmup 0, total_steps 0 */
    o.seed = 7;
    return o;
}

static beit_trainer *trainer_from_config(const beit_context *ctx, const char *config, uint64_t init_seed,
                                         const beit_trainer_options *opts) {
    beit_trainer *t = NULL;
    beit_status st = beit_trainer_create_from_config(ctx, config, init_seed, opts, &t);
    CHECK(st == BEIT_OK && t != NULL, "beit_trainer_create_from_config: %s \"%s\"", beit_status_name(st),
          beit_last_error_message());
    return st == BEIT_OK ? t : NULL;
}

/* One step; *loss gets the loss (NaN on failure). */
static beit_status step(beit_trainer *t, const beit_mim_batch *b, double *loss) {
    beit_step_stats s = beit_step_stats_default();
    beit_status st = beit_trainer_step(t, b, &s);
    *loss = st == BEIT_OK ? s.loss : NAN;
    return st;
}

/* `n` steps on `b`, losses into `out`; returns the number of failed steps. */
static int run(beit_trainer *t, const beit_mim_batch *b, int n, double *out) {
    int bad = 0;
    for (int i = 0; i < n; i++) {
        beit_status st = step(t, b, &out[i]);
        if (st != BEIT_OK) {
            fprintf(stderr, "    step failed: %s \"%s\"\n", beit_status_name(st), beit_last_error_message());
            bad++;
        }
    }
    return bad;
}

static uint64_t steps_of(const beit_trainer *t) {
    uint64_t n = UINT64_MAX;
    if (beit_trainer_step_count(t, &n) != BEIT_OK) return UINT64_MAX;
    return n;
}

static uint64_t position_of(const beit_trainer *t) {
    uint64_t n = UINT64_MAX;
    if (beit_trainer_get_data_position(t, &n) != BEIT_OK) return UINT64_MAX;
    return n;
}

/* Steps `t` and its untouched `twin` once each on `b`: the losses must be bit-identical. */
static void same_as_twin_at(int line, const char *after, beit_trainer *t, beit_trainer *twin,
                            const beit_mim_batch *b) {
    double lt, lw;
    beit_status st = step(t, b, &lt), sw = step(twin, b, &lw);
    if (st == BEIT_OK && sw == BEIT_OK && memcmp(&lt, &lw, sizeof lt) == 0 && steps_of(t) == steps_of(twin)) {
        passed++;
        return;
    }
    failed++;
    fprintf(stderr, "FAIL %s:%d: after %s the trainer differs from its untouched twin: %s %.17g vs %s %.17g\n",
            __FILE__, line, after, beit_status_name(st), lt, beit_status_name(sw), lw);
}
#define SAME_AS_TWIN(after, t, twin, b) same_as_twin_at(__LINE__, (after), (t), (twin), (b))

/* ------------------------------------------------------------------------------------------ */
/* Threads: one trainer stepped by several threads at once (each call OK or BEIT_ERR_BUSY).    */

enum { RACE_THREADS = 4, RACE_CALLS = 3, RACE_ROUNDS = 100 };

typedef struct {
    beit_trainer *t;
    const beit_mim_batch *batch;
    pthread_barrier_t *start;
    int ok, busy, other;
    char other_message[256];
} race_job;

static void *race_main(void *arg) {
    race_job *job = arg;
    pthread_barrier_wait(job->start);
    for (int i = 0; i < RACE_CALLS; i++) {
        beit_step_stats s = beit_step_stats_default();
        beit_status st = beit_trainer_step(job->t, job->batch, &s);
        const char *msg = beit_last_error_message();
        if (st == BEIT_OK) {
            job->ok++;
        } else if (st == BEIT_ERR_BUSY && strstr(msg, "beit_trainer_step") != NULL && s.step == 0) {
            job->busy++;
        } else {
            job->other++;
            snprintf(job->other_message, sizeof job->other_message, "%s \"%s\" (stats step %llu)",
                     beit_status_name(st), msg, (unsigned long long)s.step);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Threads: trainers of their own on one shared context.                                       */

typedef struct {
    const beit_context *ctx;
    const beit_mim_batch *batch;
    double losses[3];
    int errors;
} thread_job;

static void *thread_main(void *arg) {
    thread_job *job = arg;
    beit_trainer_options o = train_options();
    beit_trainer *t = NULL;
    if (beit_trainer_create_from_config(job->ctx, CONFIG, 1, &o, &t) != BEIT_OK) {
        job->errors++;
        return NULL;
    }
    for (int i = 0; i < 3; i++)
        if (step(t, job->batch, &job->losses[i]) != BEIT_OK) job->errors++;
    beit_trainer_free(t);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

int main(void) {
    char tmp[] = "/tmp/beit-c-trainer-XXXXXX";
    char path[PATH_CAP], path2[PATH_CAP], dir[PATH_CAP];
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 2;
    }
    printf("libbeit %s (ABI %u); trainer test; scratch %s\n", beit_version(), beit_abi_version(), tmp);

    beit_context *ctx = NULL;
    {
        beit_context_options o = beit_context_options_default();
        o.device = BEIT_DEVICE_CPU;
        o.num_threads = 2;
        EXPECT_OK(beit_context_create(&o, &ctx));
    }
    if (!ctx) {
        printf("%d passed, %d failed\n", passed, failed + 1);
        return 1;
    }
    batch_t data;
    make_batch(&data);
    const beit_mim_batch good = view(&data);
    const beit_trainer_options opts = train_options();

    /* ---- defaults */
    {
        beit_trainer_options o = beit_trainer_options_default();
        CHECK(o.struct_size == sizeof o, "options struct_size");
        CHECK(o.learning_rate == 1.5e-3 && o.min_learning_rate == 1e-5 && o.warmup_steps == 0 &&
                  o.total_steps == 0 && o.weight_decay == 0.05 && o.beta1 == 0.9 && o.beta2 == 0.98 &&
                  o.eps == 1e-8 && o.clip_grad_norm == 3.0 && o.drop_path_rate < 0 && o.layer_decay == 1.0 &&
                  o.weight_decay_on == BEIT_WEIGHT_DECAY_BEIT && o.seed == 0,
              "beit_trainer_options_default() is not BEiT's recipe");
        beit_mim_batch b = beit_mim_batch_default();
        CHECK(b.struct_size == sizeof b && b.pixels == NULL && b.bool_masked_pos == NULL && b.labels == NULL &&
                  b.pixels_len == 0 && b.batch == 0,
              "beit_mim_batch_default()");
        beit_step_stats s = beit_step_stats_default();
        CHECK(s.struct_size == sizeof s && s.step == 0 && s.loss == 0.0, "beit_step_stats_default()");
        CHECK(BEIT_WEIGHT_DECAY_BEIT == 0 && BEIT_WEIGHT_DECAY_ALL == 1, "enum values");
        section("defaults");
    }

    /* ---- training on one fixed batch: the loss is finite and falls */
    beit_trainer *t = trainer_from_config(ctx, CONFIG, 1, &opts);
    if (!t) {
        fprintf(stderr, "no trainer, cannot go on\n");
        printf("%d passed, %d failed\n", passed, failed + 1);
        return 1;
    }
    {
        beit_model_info info = beit_model_info_default();
        EXPECT_OK(beit_trainer_get_model_info(t, &info));
        CHECK(info.architecture == BEIT_ARCH_MASKED_IMAGE_MODELING && info.num_patches == PATCHES &&
                  info.vocab_size == VOCAB && info.num_channels == C && info.image_height == H &&
                  info.image_width == W && info.hidden_size == 32 && info.num_layers == 2 &&
                  info.has_mask_token && info.num_parameters > 0,
              "trainer model info");

        double losses[20];
        int finite = 1;
        for (int i = 0; i < 20; i++) {
            beit_step_stats s = beit_step_stats_default();
            beit_status st = beit_trainer_step(t, &good, &s);
            CHECK(st == BEIT_OK, "step %d: %s \"%s\"", i, beit_status_name(st), beit_last_error_message());
            losses[i] = s.loss;
            finite &= isfinite(s.loss) && isfinite(s.grad_norm);
            CHECK(s.step == (uint64_t)i + 1 && s.masked == (size_t)masked_count(&data) && s.lr == 1e-3 &&
                      s.seconds >= 0 && s.images_per_s > 0 && s.struct_size == sizeof s,
                  "step %d stats: step %llu masked %zu lr %g", i, (unsigned long long)s.step, s.masked, s.lr);
        }
        CHECK(finite, "a loss or gradient norm is not finite");
        double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[17] + losses[18] + losses[19]) / 3;
        CHECK(last < first && losses[19] < losses[0], "the loss did not fall: %.5f -> %.5f (first %.5f, last %.5f)",
              first, last, losses[0], losses[19]);
        printf("     loss %.4f -> %.4f over 20 steps (%d masked patches)\n", losses[0], losses[19],
               masked_count(&data));
        CHECK(steps_of(t) == 20 && position_of(t) == 20, "step count %llu, data position %llu",
              (unsigned long long)steps_of(t), (unsigned long long)position_of(t));
        EXPECT_OK(beit_trainer_step(t, &good, NULL)); /* stats are optional */
        CHECK(steps_of(t) == 21, "a step without stats did not count");
        section("training: the loss is finite and falls");
    }

    /* ---- checkpoints resume bit for bit, in the same and in another trainer */
    char ckpt[PATH_CAP];
    path_join(ckpt, sizeof ckpt, tmp, "ckpt.safetensors");
    {
        EXPECT_OK(beit_trainer_save_checkpoint(t, ckpt));
        double a[3], b[3], c[3];
        CHECK(run(t, &good, 3, a) == 0, "3 steps after the save");
        EXPECT_OK(beit_trainer_set_data_position(t, 1000));
        CHECK(position_of(t) == 1000, "set_data_position");
        EXPECT_OK(beit_trainer_load_checkpoint(t, ckpt));
        CHECK(steps_of(t) == 21 && position_of(t) == 21, "after loading: step %llu, position %llu",
              (unsigned long long)steps_of(t), (unsigned long long)position_of(t));
        CHECK(run(t, &good, 3, b) == 0, "3 steps after the load");
        CHECK(memcmp(a, b, sizeof a) == 0, "resumed losses differ: %.17g %.17g %.17g vs %.17g %.17g %.17g", a[0],
              a[1], a[2], b[0], b[1], b[2]);

        /* Another trainer of the same config, other init seed, default options: the checkpoint
         * replaces weights, optimizer state, options and random state. */
        beit_trainer *t2 = trainer_from_config(ctx, CONFIG, 99, NULL);
        if (t2) {
            EXPECT_OK(beit_trainer_load_checkpoint(t2, ckpt));
            CHECK(steps_of(t2) == 21 && position_of(t2) == 21, "second trainer after loading");
            CHECK(run(t2, &good, 3, c) == 0, "3 steps in the second trainer");
            CHECK(memcmp(a, c, sizeof a) == 0, "second trainer's losses differ: %.17g vs %.17g", a[0], c[0]);
        }
        beit_trainer_free(t2);

        /* Two saves of the same state are byte-identical. */
        path_join(path, sizeof path, tmp, "again1.safetensors");
        path_join(path2, sizeof path2, tmp, "again2.safetensors");
        EXPECT_OK(beit_trainer_save_checkpoint(t, path));
        EXPECT_OK(beit_trainer_save_checkpoint(t, path2));
        CHECK(same_file(path, path2), "two saves of one state differ");
        section("checkpoints resume bit for bit");
    }

    /* ---- trainers from a beit_model (copied) and from a model directory */
    {
        beit_trainer_options o = opts;
        o.drop_path_rate = 0.0; /* the loss is then a function of the weights and the batch */
        beit_model *m = NULL;
        EXPECT_OK(beit_model_create(ctx, CONFIG, BEIT_ARCH_MASKED_IMAGE_MODELING, 5, &m));
        beit_trainer *from_model = NULL, *from_config = trainer_from_config(ctx, CONFIG, 5, &o);
        EXPECT_OK(beit_trainer_create(ctx, m, &o, &from_model));

        enum { LOGITS = B * PATCHES * VOCAB };
        static float before[LOGITS], after[LOGITS];
        beit_image_batch in = beit_image_batch_default();
        in.pixels = data.pixels;
        in.pixels_len = NPIX;
        in.batch = B;
        in.channels = C;
        in.height = H;
        in.width = W;
        beit_infer_outputs out = beit_infer_outputs_default();
        out.logits = before;
        out.logits_len = LOGITS;
        EXPECT_OK(beit_model_infer(ctx, m, &in, &out));

        double a[3], b[3];
        if (from_model && from_config) {
            CHECK(run(from_model, &good, 3, a) == 0 && run(from_config, &good, 3, b) == 0, "steps");
            CHECK(memcmp(a, b, sizeof a) == 0, "a trainer of a model differs from one of the same config+seed");
        }
        out.logits = after;
        EXPECT_OK(beit_model_infer(ctx, m, &in, &out));
        CHECK(memcmp(before, after, sizeof before) == 0, "training changed the caller's beit_model");
        beit_model_free(m); /* the trainer owns its copy: it keeps working (valgrind watches) */

        if (from_model) {
            path_join(dir, sizeof dir, tmp, "trained_model");
            EXPECT_OK(beit_trainer_save_model(from_model, dir));
            beit_model *saved = NULL;
            EXPECT_OK(beit_model_load(ctx, dir, &saved));
            beit_model_info info = beit_model_info_default();
            if (saved) {
                EXPECT_OK(beit_model_get_info(saved, &info));
                CHECK(info.architecture == BEIT_ARCH_MASKED_IMAGE_MODELING && info.vocab_size == VOCAB,
                      "saved model info");
            }
            beit_model_free(saved);
            beit_trainer *from_dir = NULL;
            EXPECT_OK(beit_trainer_load_model_dir(ctx, dir, &o, &from_dir));
            if (from_dir) {
                CHECK(steps_of(from_dir) == 0, "a trainer from a model directory starts at step 0");
                double l1, l2;
                CHECK(step(from_model, &good, &l1) == BEIT_OK && step(from_dir, &good, &l2) == BEIT_OK,
                      "steps after save_model");
                CHECK(memcmp(&l1, &l2, sizeof l1) == 0, "saved weights differ: loss %.17g vs %.17g", l1, l2);
            }
            beit_trainer_free(from_dir);
        }

        /* A backbone cannot be pretrained, neither as a handle nor as a directory. */
        beit_model *backbone = NULL;
        EXPECT_OK(beit_model_create(ctx, CONFIG, BEIT_ARCH_BACKBONE, 5, &backbone));
        beit_trainer *none = (beit_trainer *)(uintptr_t)0x30;
        EXPECT_ERR(beit_trainer_create(ctx, backbone, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "BeitForMaskedImageModeling");
        path_join(dir, sizeof dir, tmp, "backbone");
        EXPECT_OK(beit_model_save(backbone, dir));
        EXPECT_ERR(beit_trainer_load_model_dir(ctx, dir, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "BeitForMaskedImageModeling");
        EXPECT_ERR(beit_trainer_load_model_dir(ctx, "/nonexistent/beit/dir", &o, &none), BEIT_ERR_IO,
                   "does not exist");
        EXPECT_ERR(beit_trainer_create_from_config(ctx, "{\"hidden_size\": 10, \"num_attention_heads\": 3}", 1,
                                                   &o, &none),
                   BEIT_ERR_CONFIG, "num_attention_heads");
        EXPECT_ERR(beit_trainer_create_from_config(ctx, "{\"hidden_size\": ", 1, &o, &none), BEIT_ERR_FORMAT,
                   "config");
        EXPECT_ERR(beit_trainer_create_from_config(ctx, "\xff\xfe{}", 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "UTF-8");
        CHECK(none == (beit_trainer *)(uintptr_t)0x30, "out written by a failed create");
        beit_model_free(backbone);
        beit_trainer_free(from_model);
        beit_trainer_free(from_config);
        section("trainers from a model (copied) and from a directory");
    }

    /* ---- bad input: the right status, a message naming the problem, the trainer unchanged */
    {
        beit_trainer *bad = trainer_from_config(ctx, CONFIG, 3, &opts);
        beit_trainer *twin = trainer_from_config(ctx, CONFIG, 3, &opts);
        if (bad && twin) {
            SAME_AS_TWIN("creation", bad, twin, &good);
            beit_mim_batch v;
            beit_step_stats s = beit_step_stats_default();
            s.step = 12345;

            v = good;
            v.bool_masked_pos_len = NPATCH - 1;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "bool_masked_pos_len is 31",
                        "needs 32");
            SAME_AS_TWIN("a short mask", bad, twin, &good);
            v.bool_masked_pos_len = NPATCH + 1;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "bool_masked_pos_len is 33",
                        "needs 32");
            SAME_AS_TWIN("a long mask", bad, twin, &good);

            v = good;
            v.labels_len = NPATCH - 1;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "labels_len is 31", "needs 32");
            SAME_AS_TWIN("short labels", bad, twin, &good);
            v.labels_len = NPATCH + 1;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "labels_len is 33", "needs 32");
            SAME_AS_TWIN("long labels", bad, twin, &good);

            v = good;
            v.pixels_len = NPIX - 1;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "pixels_len is 511",
                        "needs 512");
            SAME_AS_TWIN("short pixels", bad, twin, &good);

            batch_t *copy = malloc(sizeof *copy);
            int k = first_masked(&data);
            memcpy(copy, &data, sizeof *copy);
            copy->labels[k] = VOCAB;
            v = view(copy);
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "label 32",
                        "outside the vocabulary");
            SAME_AS_TWIN("a label = vocab_size", bad, twin, &good);
            copy->labels[k] = -1;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "label -1",
                        "outside the vocabulary");
            SAME_AS_TWIN("a negative label", bad, twin, &good);

            memcpy(copy, &data, sizeof *copy);
            copy->pixels[100] = NAN;
            EXPECT_ERR2(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "pixel_values[100]",
                        "must be finite");
            SAME_AS_TWIN("a NaN pixel", bad, twin, &good);
            copy->pixels[100] = INFINITY;
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "must be finite");
            SAME_AS_TWIN("an infinite pixel", bad, twin, &good);

            memcpy(copy, &data, sizeof *copy);
            copy->mask[3] = 2;
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "0 or 1");
            SAME_AS_TWIN("a mask value of 2", bad, twin, &good);
            memset(copy->mask, 0, sizeof copy->mask);
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "masks no patch");
            SAME_AS_TWIN("an empty mask", bad, twin, &good);

            /* Consistent lengths, wrong shapes. */
            v = good;
            v.batch = 1;
            v.channels = 2;
            v.bool_masked_pos_len = v.labels_len = PATCHES;
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "channels");
            SAME_AS_TWIN("two channels", bad, twin, &good);
            v = good;
            v.batch = 8;
            v.height = v.width = 8; /* 8 images of 8x8 = 512 pixels, 4 patches each = 32 */
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "configured image size");
            SAME_AS_TWIN("another image size", bad, twin, &good);
            v = good;
            v.batch = 0;
            v.pixels_len = v.bool_masked_pos_len = v.labels_len = 0;
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "batch");
            SAME_AS_TWIN("an empty batch", bad, twin, &good);
            v = good;
            v.batch = SIZE_MAX / 4;
            EXPECT_ERR(beit_trainer_step(bad, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "more values than fit");
            SAME_AS_TWIN("a huge batch", bad, twin, &good);
            CHECK(s.step == 12345, "stats written by a failed step");

            /* Checkpoints that do not fit. */
            beit_trainer *other = trainer_from_config(ctx, OTHER_CONFIG, 1, &opts);
            char other_ckpt[PATH_CAP];
            path_join(other_ckpt, sizeof other_ckpt, tmp, "other.safetensors");
            if (other) EXPECT_OK(beit_trainer_save_checkpoint(other, other_ckpt));
            beit_trainer_free(other);
            EXPECT_ERR2(beit_trainer_load_checkpoint(bad, other_ckpt), BEIT_ERR_INVALID_ARGUMENT,
                        "another model config", "intermediate_size");
            SAME_AS_TWIN("another config's checkpoint", bad, twin, &good);

            size_t n = 0;
            unsigned char *bytes = read_file(ckpt, &n);
            path_join(path, sizeof path, tmp, "truncated.safetensors");
            CHECK(bytes && write_file(path, bytes, n / 2) == 0, "write a truncated checkpoint");
            EXPECT_ERR(beit_trainer_load_checkpoint(bad, path), BEIT_ERR_FORMAT, "truncated.safetensors");
            SAME_AS_TWIN("a truncated checkpoint", bad, twin, &good);
            free(bytes);
            path_join(path, sizeof path, tmp, "trained_model/model.safetensors");
            EXPECT_ERR(beit_trainer_load_checkpoint(bad, path), BEIT_ERR_FORMAT, "not a libbeit trainer checkpoint");
            SAME_AS_TWIN("a model's weights as a checkpoint", bad, twin, &good);
            path_join(path, sizeof path, tmp, "missing.safetensors");
            EXPECT_ERR(beit_trainer_load_checkpoint(bad, path), BEIT_ERR_IO, "missing.safetensors");
            SAME_AS_TWIN("a missing checkpoint", bad, twin, &good);
            free(copy);
        }
        beit_trainer_free(bad);
        beit_trainer_free(twin);

        /* A diverging run: BEIT_ERR_NUMERICAL, the step not applied. */
        beit_trainer_options hot = opts;
        hot.learning_rate = 1e36;
        hot.clip_grad_norm = 0;
        beit_trainer *div = trainer_from_config(ctx, CONFIG, 1, &hot);
        int diverged = 0;
        for (int i = 0; div && i < 4 && !diverged; i++) {
            uint64_t before = steps_of(div);
            double loss;
            beit_status st = step(div, &good, &loss);
            if (st != BEIT_OK) {
                diverged = 1;
                CHECK(st == BEIT_ERR_NUMERICAL && strstr(beit_last_error_message(), "not applied") != NULL,
                      "divergence: %s \"%s\"", beit_status_name(st), beit_last_error_message());
                CHECK(steps_of(div) == before, "a diverged step counted");
            }
        }
        CHECK(diverged, "lr 1e36 never diverged");
        beit_trainer_free(div);
        section("bad input is refused and changes nothing");
    }

    /* ---- bad options */
    {
        beit_trainer *none = (beit_trainer *)(uintptr_t)0x40;
        beit_trainer_options o = opts;
        o.beta2 = 1.0;
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT, "beta2");
        o = opts;
        o.weight_decay_on = (beit_weight_decay_on)5;
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "weight_decay_on 5");
        o = opts;
        o.drop_path_rate = NAN;
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "drop_path_rate");
        o = opts;
        o.warmup_steps = 10;
        o.total_steps = 10;
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "total_steps");
        o = opts;
        o.layer_decay = 0;
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "layer_decay");
        o = opts;
        o.learning_rate = INFINITY;
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                   "learning_rate");
        CHECK(none == (beit_trainer *)(uintptr_t)0x40, "out written by a failed create");

        /* Every option in use: all-parameter decay, layer decay, warmup + cosine, drop path. */
        o = opts;
        o.weight_decay_on = BEIT_WEIGHT_DECAY_ALL;
        o.layer_decay = 0.75;
        o.warmup_steps = 2;
        o.total_steps = 10;
        o.drop_path_rate = 0.2;
        beit_trainer *all = trainer_from_config(ctx, CONFIG, 1, &o);
        if (all) {
            beit_step_stats s = beit_step_stats_default();
            EXPECT_OK(beit_trainer_step(all, &good, &s));
            CHECK(s.lr == 0.0, "warmup starts at lr 0, got %g", s.lr);
            EXPECT_OK(beit_trainer_step(all, &good, &s));
            EXPECT_OK(beit_trainer_step(all, &good, &s));
            CHECK(s.lr > 0 && s.lr <= 1e-3 && isfinite(s.loss), "scheduled lr %g, loss %g", s.lr, s.loss);
        }
        beit_trainer_free(all);
        section("options are checked");
    }

    /* ---- NULL pointers and struct sizes */
    {
        beit_trainer *none = (beit_trainer *)(uintptr_t)0x50;
        beit_model *m = NULL;
        EXPECT_OK(beit_model_create(ctx, CONFIG, BEIT_ARCH_MASKED_IMAGE_MODELING, 5, &m));
        uint64_t u = 0;
        beit_model_info info = beit_model_info_default();
        beit_step_stats s = beit_step_stats_default();
        beit_mim_batch v;

        EXPECT_ERR(beit_trainer_create(NULL, m, &opts, &none), BEIT_ERR_NULL_POINTER, "ctx is NULL");
        EXPECT_ERR(beit_trainer_create(ctx, NULL, &opts, &none), BEIT_ERR_NULL_POINTER, "model is NULL");
        EXPECT_ERR(beit_trainer_create(ctx, m, &opts, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");
        EXPECT_ERR(beit_trainer_create_from_config(NULL, CONFIG, 1, &opts, &none), BEIT_ERR_NULL_POINTER,
                   "ctx is NULL");
        EXPECT_ERR(beit_trainer_create_from_config(ctx, NULL, 1, &opts, &none), BEIT_ERR_NULL_POINTER,
                   "config_json is NULL");
        EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &opts, NULL), BEIT_ERR_NULL_POINTER,
                   "out is NULL");
        EXPECT_ERR(beit_trainer_load_model_dir(NULL, tmp, &opts, &none), BEIT_ERR_NULL_POINTER, "ctx is NULL");
        EXPECT_ERR(beit_trainer_load_model_dir(ctx, NULL, &opts, &none), BEIT_ERR_NULL_POINTER,
                   "model_dir is NULL");
        EXPECT_ERR(beit_trainer_load_model_dir(ctx, tmp, &opts, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");
        CHECK(none == (beit_trainer *)(uintptr_t)0x50, "out written by a failed create");
        /* NULL options mean the defaults. */
        beit_trainer *d = NULL;
        EXPECT_OK(beit_trainer_create(ctx, m, NULL, &d));
        beit_trainer_free(d);

        EXPECT_ERR(beit_trainer_step(NULL, &good, &s), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_step(t, NULL, &s), BEIT_ERR_NULL_POINTER, "batch is NULL");
        v = good;
        v.pixels = NULL;
        EXPECT_ERR(beit_trainer_step(t, &v, &s), BEIT_ERR_NULL_POINTER, "batch->pixels is NULL");
        v = good;
        v.bool_masked_pos = NULL;
        EXPECT_ERR(beit_trainer_step(t, &v, &s), BEIT_ERR_NULL_POINTER, "batch->bool_masked_pos is NULL");
        v = good;
        v.labels = NULL;
        EXPECT_ERR(beit_trainer_step(t, &v, &s), BEIT_ERR_NULL_POINTER, "batch->labels is NULL");
        EXPECT_ERR(beit_trainer_save_checkpoint(NULL, ckpt), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_save_checkpoint(t, NULL), BEIT_ERR_NULL_POINTER, "path is NULL");
        EXPECT_ERR(beit_trainer_load_checkpoint(NULL, ckpt), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_load_checkpoint(t, NULL), BEIT_ERR_NULL_POINTER, "path is NULL");
        EXPECT_ERR(beit_trainer_save_model(NULL, tmp), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_save_model(t, NULL), BEIT_ERR_NULL_POINTER, "dir is NULL");
        EXPECT_ERR(beit_trainer_step_count(NULL, &u), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_step_count(t, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");
        EXPECT_ERR(beit_trainer_get_data_position(NULL, &u), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_get_data_position(t, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");
        EXPECT_ERR(beit_trainer_set_data_position(NULL, 5), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_get_model_info(NULL, &info), BEIT_ERR_NULL_POINTER, "trainer is NULL");
        EXPECT_ERR(beit_trainer_get_model_info(t, NULL), BEIT_ERR_NULL_POINTER, "out is NULL");

        /* struct_size too small: options, batch, stats, model info. */
        uint64_t steps_before = steps_of(t);
        /* The first version ends before `precision`: anything shorter is too small. */
        size_t small[] = {0, sizeof(size_t), offsetof(beit_trainer_options, precision) - 1};
        for (int i = 0; i < 3; i++) {
            beit_trainer_options o = opts;
            o.struct_size = small[i];
            EXPECT_ERR(beit_trainer_create_from_config(ctx, CONFIG, 1, &o, &none), BEIT_ERR_INVALID_ARGUMENT,
                       "opts->struct_size");
            EXPECT_ERR(beit_trainer_create(ctx, m, &o, &none), BEIT_ERR_INVALID_ARGUMENT, "opts->struct_size");
        }
        v = good;
        v.struct_size = sizeof v - 1;
        EXPECT_ERR(beit_trainer_step(t, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "batch->struct_size");
        v.struct_size = 0;
        EXPECT_ERR(beit_trainer_step(t, &v, &s), BEIT_ERR_INVALID_ARGUMENT, "batch->struct_size");
        s.struct_size = sizeof s - 1;
        s.step = 999;
        EXPECT_ERR(beit_trainer_step(t, &good, &s), BEIT_ERR_INVALID_ARGUMENT, "out->struct_size");
        CHECK(s.step == 999 && steps_of(t) == steps_before, "a step with too small stats ran or wrote");
        info.struct_size = 4;
        EXPECT_ERR(beit_trainer_get_model_info(t, &info), BEIT_ERR_INVALID_ARGUMENT, "out->struct_size");
        CHECK(info.hidden_size == 0, "info written by a failed call");
        CHECK(none == (beit_trainer *)(uintptr_t)0x50, "out written by a failed create");

        /* Structs from a newer header (larger struct_size) are accepted; fields beyond this
         * version's are left alone. */
        struct {
            beit_trainer_options o;
            uint64_t future;
        } newer_opts = {opts, 1};
        newer_opts.o.struct_size = sizeof newer_opts;
        struct {
            beit_mim_batch b;
            uint64_t future;
        } newer_batch = {good, 2};
        newer_batch.b.struct_size = sizeof newer_batch;
        struct {
            beit_step_stats s;
            uint64_t future;
        } newer_stats;
        memset(&newer_stats, 0, sizeof newer_stats);
        newer_stats.s.struct_size = sizeof newer_stats;
        newer_stats.future = 77;
        d = NULL;
        EXPECT_OK(beit_trainer_create(ctx, m, &newer_opts.o, &d));
        EXPECT_OK(beit_trainer_step(d, &newer_batch.b, &newer_stats.s));
        CHECK(newer_stats.s.struct_size == sizeof newer_stats && newer_stats.s.step == 1 && newer_stats.future == 77,
              "stats into a newer, larger struct");
        beit_trainer_free(d);
        beit_model_free(m);
        section("NULL pointers and struct sizes");
    }

    /* ---- failed saves leave the previous checkpoint byte-identical */
    {
        char keep[PATH_CAP], copy[PATH_CAP];
        path_join(keep, sizeof keep, tmp, "keep.safetensors");
        path_join(copy, sizeof copy, tmp, "keep-copy.safetensors");
        EXPECT_OK(beit_trainer_save_checkpoint(t, keep));
        size_t n = 0;
        unsigned char *bytes = read_file(keep, &n);
        CHECK(bytes && write_file(copy, bytes, n) == 0, "copy the checkpoint");
        free(bytes);
        EXPECT_OK(beit_trainer_step(t, &good, NULL)); /* a new save would now differ */

        path_join(path, sizeof path, tmp, "no/such/dir/keep.safetensors");
        EXPECT_ERR(beit_trainer_save_checkpoint(t, path), BEIT_ERR_IO, "does not exist");
        CHECK(same_file(keep, copy), "the earlier checkpoint changed after a failed save elsewhere");

        /* A save over keep.safetensors that fails half-way (no file may grow past 1 KiB; works
         * even as root) leaves the old file as it was, and no temporary file. */
        file_size_limit limit = limit_file_size(1024);
        EXPECT_ERR(beit_trainer_save_checkpoint(t, keep), BEIT_ERR_IO, "keep.safetensors");
        undo_file_size_limit(limit);
        CHECK(same_file(keep, copy), "the earlier checkpoint changed after a failed save over it");
        CHECK(temp_files_in(tmp) == 0, "a failed save left a temporary file in %s", tmp);

        /* A model directory under a regular file cannot be created. */
        path_join(path, sizeof path, keep, "model_dir");
        EXPECT_ERR(beit_trainer_save_model(t, path), BEIT_ERR_IO, "cannot create");
        /* The trainer still saves and loads after all that. */
        EXPECT_OK(beit_trainer_save_checkpoint(t, keep));
        CHECK(!same_file(keep, copy), "a successful save did not replace the checkpoint");
        EXPECT_OK(beit_trainer_load_checkpoint(t, copy));
        section("failed saves leave the previous checkpoint byte-identical");
    }

    /* ---- trainers of their own on several threads, one context */
    {
        enum { THREADS = 3 };
        pthread_t threads[THREADS];
        thread_job jobs[THREADS];
        for (int i = 0; i < THREADS; i++) {
            memset(&jobs[i], 0, sizeof jobs[i]);
            jobs[i].ctx = ctx;
            jobs[i].batch = &good;
            CHECK(pthread_create(&threads[i], NULL, thread_main, &jobs[i]) == 0, "pthread_create");
        }
        for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
        for (int i = 0; i < THREADS; i++) {
            CHECK(jobs[i].errors == 0, "thread %d: %d errors", i, jobs[i].errors);
            CHECK(memcmp(jobs[i].losses, jobs[0].losses, sizeof jobs[0].losses) == 0,
                  "thread %d's losses differ from thread 0's", i);
        }
        section("trainers on several threads sharing a context");
    }

    /* ---- one trainer, several threads at once: every call OK or BUSY, no corruption */
    {
        beit_trainer *shared = trainer_from_config(ctx, CONFIG, 11, &opts);
        beit_trainer *twin = trainer_from_config(ctx, CONFIG, 11, &opts);
        int ok = 0, busy = 0, other = 0, rounds = 0;
        /* Rounds of threads released at once, until some call was refused as busy (so that
         * the test cannot pass without calls that overlapped). */
        while (shared && twin && busy == 0 && other == 0 && rounds < RACE_ROUNDS) {
            rounds++;
            pthread_barrier_t start;
            pthread_barrier_init(&start, NULL, RACE_THREADS);
            pthread_t threads[RACE_THREADS];
            race_job jobs[RACE_THREADS];
            for (int i = 0; i < RACE_THREADS; i++) {
                memset(&jobs[i], 0, sizeof jobs[i]);
                jobs[i].t = shared;
                jobs[i].batch = &good;
                jobs[i].start = &start;
                CHECK(pthread_create(&threads[i], NULL, race_main, &jobs[i]) == 0, "pthread_create");
            }
            for (int i = 0; i < RACE_THREADS; i++) {
                pthread_join(threads[i], NULL);
                ok += jobs[i].ok;
                busy += jobs[i].busy;
                other += jobs[i].other;
                CHECK(jobs[i].other == 0, "a concurrent step returned %s", jobs[i].other_message);
            }
            pthread_barrier_destroy(&start);
        }
        CHECK(busy > 0, "%d rounds of %d threads never met a busy trainer", rounds, RACE_THREADS);
        printf("     %d round(s): %d steps ran, %d refused as busy\n", rounds, ok, busy);
        if (shared && twin) {
            CHECK(steps_of(shared) == (uint64_t)ok && position_of(shared) == (uint64_t)ok,
                  "after %d successful steps: step %llu, data position %llu", ok,
                  (unsigned long long)steps_of(shared), (unsigned long long)position_of(shared));
            double loss;
            for (int i = 0; i < ok; i++) CHECK(step(twin, &good, &loss) == BEIT_OK, "twin step %d", i);
            /* The checkpoints hold everything (weights, AdamW moments, step, data position,
             * random state): the shared trainer is exactly one that made its successful steps
             * in sequence, and the refused calls changed nothing. */
            path_join(path, sizeof path, tmp, "shared.safetensors");
            path_join(path2, sizeof path2, tmp, "sequential.safetensors");
            EXPECT_OK(beit_trainer_save_checkpoint(shared, path));
            EXPECT_OK(beit_trainer_save_checkpoint(twin, path2));
            CHECK(same_file(path, path2), "the shared trainer differs from its sequential twin");
        }
        beit_trainer_free(shared);
        beit_trainer_free(twin);
        section("one trainer stepped by several threads at once: OK or BEIT_ERR_BUSY, never corrupted");
    }

    /* ---- errors cleared on success; NULL frees */
    {
        beit_trainer_step_count(NULL, NULL);
        CHECK(beit_last_error_message()[0] != '\0', "a failure leaves a message");
        uint64_t u;
        EXPECT_OK(beit_trainer_step_count(t, &u));
        beit_trainer_free(NULL);
        passed++;
        section("error message cleared on success; free(NULL) is a no-op");
    }

    /* ---- a trainer outlives the context handle it was created with (it shares the pool) */
    {
        beit_context *ctx2 = NULL;
        beit_trainer *t2 = NULL;
        EXPECT_OK(beit_context_create(NULL, &ctx2));
        EXPECT_OK(beit_trainer_create_from_config(ctx2, CONFIG, 1, &opts, &t2));
        beit_context_free(ctx2);
        beit_step_stats st = beit_step_stats_default();
        EXPECT_OK(beit_trainer_step(t2, &good, &st));
        CHECK(isfinite(st.loss) && st.step == 1, "step after freeing the context: loss %g, step %llu",
              st.loss, (unsigned long long)st.step);
        beit_trainer_free(t2);
        section("a trainer keeps working after its context handle is freed");
    }

    beit_trainer_free(t);
    beit_context_free(ctx);
    remove_tree(tmp);
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
