/*
 * C API test of fine-tuning and evaluation (beit_model_to_classifier, beit_classifier_create,
 * beit_model_with_image_size, beit_trainer_step_classify, beit_trainer_finetune,
 * beit_finetune_epoch_steps, beit_model_evaluate, and the segmentation twins), written against
 * include/beit.h only.
 *
 *   test_finetune
 *
 * A labelled dataset with masks is written here byte by byte from docs/dataset-format.md.
 * Checked: the defaults say the recipe's values; a classifier made from a pretraining model has
 * the asked labels; host-fed classification steps are deterministic (two trainers agree bit for
 * bit) and resume from a checkpoint bit for bit; a dataset-driven run calls its callback once a
 * step and stops when told, and a resumed run continues from there to the same weights as one
 * straight run; evaluations count every image; segmentation fine-tunes, reports and evaluates;
 * every call refuses NULL, bad sizes, bad options and the wrong kind of model or trainer (a
 * classification batch on a pretraining trainer and vice versa) with a message, writing nothing.
 *
 * Prints a line per section and finally "N passed, M failed"; exits non-zero on any failure.
 * Built by scripts/test-c, which also runs it under valgrind and ASan/UBSan.
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

/* ------------------------------------------------------------------------------------------ */
/* A labelled dataset with masks: N 16x16 grey images, label i % 3, mask 1 on a square        */

enum { N = 12, H = 16, W = 16, K = 3, SEG_K = 2 };
#define PIX (H * W)
#define PIXELS_AT 128
#define LABELS_AT (PIXELS_AT + N * PIX)            /* 3200: a multiple of 64 */
#define MASKS_AT (LABELS_AT + 64)                  /* 4 * N = 48 label bytes, padded */
#define FILE_LEN (MASKS_AT + N * PIX)

static void put_u32(uint8_t *b, size_t at, uint32_t v) {
    for (int k = 0; k < 4; k++) b[at + k] = (uint8_t)(v >> (8 * k));
}
static void put_u64(uint8_t *b, size_t at, uint64_t v) {
    for (int k = 0; k < 8; k++) b[at + k] = (uint8_t)(v >> (8 * k));
}

static void build_dataset(uint8_t *b) {
    static const uint8_t magic[8] = {'B', 'E', 'I', 'T', 'D', 'S', 0, 1};
    memset(b, 0, FILE_LEN);
    memcpy(b, magic, 8);
    put_u32(b, 8, 1);
    put_u32(b, 12, 128);
    put_u64(b, 16, N);
    put_u32(b, 24, H);
    put_u32(b, 28, W);
    put_u32(b, 32, 1);
    put_u32(b, 36, 1);
    put_u32(b, 40, 3); /* labels | masks */
    put_u64(b, 56, PIXELS_AT);
    put_u64(b, 64, (uint64_t)N * PIX);
    put_u64(b, 72, LABELS_AT);
    put_u64(b, 80, 4u * N);
    put_u64(b, 88, MASKS_AT);
    put_u64(b, 96, (uint64_t)N * PIX);
    for (int i = 0; i < N; i++) {
        int y0 = i % 7, x0 = (i * 3) % 7;
        for (int y = 0; y < H; y++) {
            for (int x = 0; x < W; x++) {
                int in = y >= y0 && y < y0 + 8 && x >= x0 && x < x0 + 8;
                b[PIXELS_AT + i * PIX + y * W + x] = (uint8_t)(in ? 200 + i : 30 + (x * y) % 20);
                b[MASKS_AT + i * PIX + y * W + x] = (uint8_t)in;
            }
        }
        put_u32(b, LABELS_AT + 4 * (size_t)i, (uint32_t)(i % K));
    }
}

#define CONFIG                                                                                 \
    "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 4, "             \
    "\"intermediate_size\": 64, \"image_size\": 16, \"patch_size\": 4, \"num_channels\": 1, "  \
    "\"vocab_size\": 32, \"use_mask_token\": true, \"use_shared_relative_position_bias\": true, " \
    "\"layer_scale_init_value\": 0.1}"
#define SEG_CONFIG                                                                             \
    "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 2, "             \
    "\"intermediate_size\": 64, \"image_size\": 16, \"patch_size\": 4, \"num_channels\": 1, "  \
    "\"use_relative_position_bias\": true, \"pool_scales\": [1, 2], \"auxiliary_channels\": 16}"

static char tmp[64], data_path[128], missing_path[128];
static beit_context *ctx;

/* ------------------------------------------------------------------------------------------ */
/* A host-fed classification batch                                                             */

enum { B = 2 };
typedef struct {
    float pixels[B * PIX];
    int64_t labels[B];
} cbatch_t;

static void fill_batch(cbatch_t *b, int seed) {
    for (int i = 0; i < B * PIX; i++) b->pixels[i] = sinf(0.37f * (float)(i + seed));
    for (int i = 0; i < B; i++) b->labels[i] = (seed + i) % K;
}

static beit_classify_batch view(cbatch_t *b) {
    beit_classify_batch v = beit_classify_batch_default();
    v.pixels = b->pixels;
    v.pixels_len = B * PIX;
    v.batch = B;
    v.channels = 1;
    v.height = H;
    v.width = W;
    v.labels = b->labels;
    v.labels_len = B;
    return v;
}

static beit_model *classifier(void) {
    beit_model *mim = NULL, *cls = NULL;
    EXPECT_OK(beit_model_create(ctx, CONFIG, BEIT_ARCH_MASKED_IMAGE_MODELING, 1, &mim));
    EXPECT_OK(beit_model_to_classifier(ctx, mim, K, 0.1, 2, &cls));
    beit_model_free(mim);
    return cls;
}

static uint64_t steps_of(const beit_trainer *t) {
    uint64_t n = 0;
    EXPECT_OK(beit_trainer_step_count(t, &n));
    return n;
}

/* ------------------------------------------------------------------------------------------ */

static void test_defaults(void) {
    beit_trainer_options o = beit_trainer_options_finetune_default(100);
    CHECK(o.struct_size == sizeof o && o.learning_rate == 1e-3 && o.min_learning_rate == 1e-6 &&
              o.warmup_steps == 10 && o.total_steps == 100 && o.beta1 == 0.9 && o.beta2 == 0.999 &&
              o.weight_decay == 0.05 && o.clip_grad_norm == 0.0 && o.drop_path_rate == 0.1 &&
              o.layer_decay == 0.65 && o.weight_decay_on == BEIT_WEIGHT_DECAY_BEIT,
          "finetune trainer defaults");
    beit_finetune_options f = beit_finetune_options_default();
    CHECK(f.struct_size == sizeof f && f.steps == 0 && f.batch_size == 64 && f.label_smoothing == 0.1f &&
              f.min_crop_scale == 0.08 && f.flip_prob == 0.5 && f.workers == 1 && f.label_fraction == 1.0 &&
              f.scratch_dir == NULL,
          "finetune data defaults");
    beit_classify_batch cb = beit_classify_batch_default();
    CHECK(cb.struct_size == sizeof cb && cb.pixels == NULL && cb.batch == 0, "batch default");
    beit_evaluation e = beit_evaluation_default();
    CHECK(e.struct_size == sizeof e && e.confusion == NULL && e.images == 0, "evaluation default");
    beit_segmentation_options s = beit_segmentation_options_default();
    CHECK(s.struct_size == sizeof s && s.epochs == 10 && s.batch_size == 16 && s.layer_decay == 0.9 &&
              s.clip_grad_norm == 3.0 && s.drop_path_rate < 0 && s.flip && s.test_fraction == 0.2 &&
              s.label_fraction == 1.0 && s.mean == NULL,
          "segmentation defaults");
    beit_segmentation_eval_options se = beit_segmentation_eval_options_default();
    CHECK(se.batch_size == 32 && se.split == BEIT_SPLIT_TEST && se.test_fraction == 0.2, "eval defaults");
    beit_segmentation_report r = beit_segmentation_report_default();
    beit_segmentation_evaluation sv = beit_segmentation_evaluation_default();
    CHECK(r.struct_size == sizeof r && sv.struct_size == sizeof sv && sv.per_class_iou == NULL, "outputs");
    section("defaults");
}

static void test_models(void) {
    beit_model *mim = NULL, *m = NULL;
    EXPECT_OK(beit_model_create(ctx, CONFIG, BEIT_ARCH_MASKED_IMAGE_MODELING, 1, &mim));
    EXPECT_OK(beit_model_to_classifier(ctx, mim, 5, 0.0, 0, &m));
    beit_model_info info = beit_model_info_default();
    EXPECT_OK(beit_model_get_info(m, &info));
    CHECK(info.architecture == BEIT_ARCH_IMAGE_CLASSIFICATION && info.num_labels == 5 && !info.has_mask_token,
          "to_classifier: arch %u, %zu labels", (unsigned)info.architecture, info.num_labels);
    beit_model *resized = NULL;
    EXPECT_OK(beit_model_with_image_size(ctx, m, 24, 20, &resized));
    EXPECT_OK(beit_model_get_info(resized, &info));
    CHECK(info.image_height == 24 && info.image_width == 20 && info.num_labels == 5, "with_image_size");
    beit_model_free(resized);
    beit_model_free(m);

    beit_model *none = (beit_model *)(uintptr_t)0x40;
    EXPECT_ERR(beit_model_to_classifier(NULL, mim, 5, 0.0, 0, &none), BEIT_ERR_NULL_POINTER, "ctx");
    EXPECT_ERR(beit_model_to_classifier(ctx, NULL, 5, 0.0, 0, &none), BEIT_ERR_NULL_POINTER, "model");
    EXPECT_ERR(beit_model_to_classifier(ctx, mim, 5, 0.0, 0, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_ERR(beit_model_to_classifier(ctx, mim, 0, 0.0, 0, &none), BEIT_ERR_INVALID_ARGUMENT, "num_labels");
    EXPECT_ERR(beit_model_to_classifier(ctx, mim, 5, 1.0, 0, &none), BEIT_ERR_INVALID_ARGUMENT, "drop_path_rate");
    EXPECT_ERR(beit_model_to_classifier(ctx, mim, 5, NAN, 0, &none), BEIT_ERR_INVALID_ARGUMENT, "drop_path_rate");
    EXPECT_ERR(beit_model_with_image_size(ctx, mim, 2, 16, &none), BEIT_ERR_INVALID_ARGUMENT, "2");
    EXPECT_ERR(beit_model_with_image_size(ctx, NULL, 16, 16, &none), BEIT_ERR_NULL_POINTER, "model");

    EXPECT_OK(beit_classifier_create(ctx, CONFIG, 4, 0.1, 7, &m));
    EXPECT_OK(beit_model_get_info(m, &info));
    CHECK(info.architecture == BEIT_ARCH_IMAGE_CLASSIFICATION && info.num_labels == 4, "classifier_create");
    beit_model_free(m);
    EXPECT_ERR(beit_classifier_create(ctx, "{\"hidden_size\": ", 4, 0.1, 7, &none), BEIT_ERR_FORMAT, "config");
    EXPECT_ERR(beit_classifier_create(ctx, CONFIG, 0, 0.1, 7, &none), BEIT_ERR_INVALID_ARGUMENT, "num_labels");
    EXPECT_ERR(beit_classifier_create(ctx, NULL, 4, 0.1, 7, &none), BEIT_ERR_NULL_POINTER, "config_json");

    EXPECT_OK(beit_model_to_segmenter(ctx, mim, SEG_K, 3, &m));
    EXPECT_OK(beit_model_get_info(m, &info));
    CHECK(info.architecture == BEIT_ARCH_SEMANTIC_SEGMENTATION && info.num_labels == SEG_K, "to_segmenter");
    beit_model_free(m);
    EXPECT_ERR(beit_model_to_segmenter(ctx, mim, 0, 3, &none), BEIT_ERR_INVALID_ARGUMENT, "num_labels");
    EXPECT_ERR(beit_model_to_segmenter(ctx, mim, 2, 3, NULL), BEIT_ERR_NULL_POINTER, "out");
    EXPECT_OK(beit_segmenter_create(ctx, SEG_CONFIG, SEG_K, 3, &m));
    beit_model_free(m);
    EXPECT_ERR(beit_segmenter_create(ctx, SEG_CONFIG, 0, 3, &none), BEIT_ERR_INVALID_ARGUMENT, "num_labels");
    CHECK(none == (beit_model *)(uintptr_t)0x40, "out written by a failed call");
    beit_model_free(mim);
    section("classifier and segmenter models");
}

static void test_host_fed_steps(void) {
    beit_model *cls = classifier();
    beit_trainer_options o = beit_trainer_options_finetune_default(20);
    o.seed = 4;
    beit_trainer *t = NULL, *twin = NULL;
    EXPECT_OK(beit_trainer_create(ctx, cls, &o, &t));
    EXPECT_OK(beit_trainer_create(ctx, cls, &o, &twin));
    cbatch_t b;
    fill_batch(&b, 1);
    beit_classify_batch v = view(&b);
    beit_step_stats s1 = beit_step_stats_default(), s2 = beit_step_stats_default();
    EXPECT_OK(beit_trainer_step_classify(t, &v, 0.1f, &s1));
    EXPECT_OK(beit_trainer_step_classify(twin, &v, 0.1f, &s2));
    CHECK(s1.step == 1 && s1.masked == 0 && isfinite(s1.loss) && s1.loss > 0, "stats: step %llu loss %g",
          (unsigned long long)s1.step, s1.loss);
    CHECK(memcmp(&s1.loss, &s2.loss, sizeof s1.loss) == 0, "two trainers differ");

    /* Checkpoint, two more steps, back, the same two steps: the same bits. */
    char ckpt[256];
    snprintf(ckpt, sizeof ckpt, "%s/cls.safetensors", tmp);
    EXPECT_OK(beit_trainer_save_checkpoint(t, ckpt));
    double after[2], again[2];
    for (int i = 0; i < 2; i++) {
        fill_batch(&b, 10 + i);
        EXPECT_OK(beit_trainer_step_classify(t, &v, 0.1f, &s1));
        after[i] = s1.loss;
    }
    EXPECT_OK(beit_trainer_load_checkpoint(t, ckpt));
    CHECK(steps_of(t) == 1, "resumed at step 1");
    for (int i = 0; i < 2; i++) {
        fill_batch(&b, 10 + i);
        EXPECT_OK(beit_trainer_step_classify(t, &v, 0.1f, &s1));
        again[i] = s1.loss;
    }
    CHECK(memcmp(after, again, sizeof after) == 0, "resume is not bit for bit: %.17g %.17g vs %.17g %.17g",
          after[0], after[1], again[0], again[1]);

    /* Refusals: nothing changes, out is not written. */
    uint64_t before = steps_of(t);
    beit_step_stats untouched = beit_step_stats_default();
    untouched.step = 99;
    beit_classify_batch bad = v;
    EXPECT_ERR(beit_trainer_step_classify(NULL, &v, 0.1f, &untouched), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_trainer_step_classify(t, NULL, 0.1f, &untouched), BEIT_ERR_NULL_POINTER, "batch");
    bad.pixels = NULL;
    EXPECT_ERR(beit_trainer_step_classify(t, &bad, 0.1f, &untouched), BEIT_ERR_NULL_POINTER, "batch->pixels");
    bad = v;
    bad.labels = NULL;
    EXPECT_ERR(beit_trainer_step_classify(t, &bad, 0.1f, &untouched), BEIT_ERR_NULL_POINTER, "batch->labels");
    bad = v;
    bad.pixels_len = B * PIX - 1;
    EXPECT_ERR2(beit_trainer_step_classify(t, &bad, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "511",
                "512");
    bad = v;
    bad.labels_len = 3;
    EXPECT_ERR(beit_trainer_step_classify(t, &bad, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "labels_len");
    bad = v;
    bad.batch = SIZE_MAX / 2;
    EXPECT_ERR(beit_trainer_step_classify(t, &bad, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "pixels_len");
    bad = v;
    bad.struct_size = 8;
    EXPECT_ERR(beit_trainer_step_classify(t, &bad, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    EXPECT_ERR(beit_trainer_step_classify(t, &v, 1.0f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "smoothing");
    EXPECT_ERR(beit_trainer_step_classify(t, &v, NAN, &untouched), BEIT_ERR_INVALID_ARGUMENT, "smoothing");
    b.labels[1] = K;
    EXPECT_ERR(beit_trainer_step_classify(t, &v, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "label 3");
    b.labels[1] = 0;
    b.pixels[5] = NAN;
    EXPECT_ERR(beit_trainer_step_classify(t, &v, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT, "finite");
    b.pixels[5] = 0;
    /* A pretraining batch on a classification trainer. */
    float mim_pixels[PIX] = {0};
    uint8_t mask[16] = {1};
    int64_t tokens[16] = {0};
    beit_mim_batch mb = beit_mim_batch_default();
    mb.pixels = mim_pixels;
    mb.pixels_len = PIX;
    mb.batch = 1;
    mb.channels = 1;
    mb.height = H;
    mb.width = W;
    mb.bool_masked_pos = mask;
    mb.bool_masked_pos_len = 16;
    mb.labels = tokens;
    mb.labels_len = 16;
    EXPECT_ERR(beit_trainer_step(t, &mb, &untouched), BEIT_ERR_INVALID_ARGUMENT, "BeitForMaskedImageModeling");
    CHECK(steps_of(t) == before && untouched.step == 99, "a refused step changed something");

    /* A classification batch on a pretraining trainer. */
    beit_trainer *mim_trainer = NULL;
    EXPECT_OK(beit_trainer_create_from_config(ctx, CONFIG, 1, NULL, &mim_trainer));
    EXPECT_ERR(beit_trainer_step_classify(mim_trainer, &v, 0.1f, &untouched), BEIT_ERR_INVALID_ARGUMENT,
               "BeitForImageClassification");
    CHECK(steps_of(mim_trainer) == 0, "a refused step on a pretraining trainer counted");
    beit_trainer_free(mim_trainer);
    beit_trainer_free(twin);
    beit_trainer_free(t);
    beit_model_free(cls);
    section("host-fed classification steps");
}

typedef struct {
    uint64_t seen[16];
    int calls, stop_after;
} progress_t;

static int32_t on_step(const beit_step_stats *s, void *user_data) {
    progress_t *p = user_data;
    if (p->calls < 16) p->seen[p->calls] = s->step;
    p->calls++;
    return p->stop_after > 0 && p->calls >= p->stop_after;
}

static void save_and_read(beit_trainer *t, const char *name, unsigned char **bytes, size_t *len) {
    char dir[256], file[300];
    snprintf(dir, sizeof dir, "%s/%s", tmp, name);
    EXPECT_OK(beit_trainer_save_model(t, dir));
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    *bytes = read_file(file, len);
}

static void test_dataset_finetune(void) {
    beit_model *cls = classifier();
    beit_trainer_options o = beit_trainer_options_finetune_default(5);
    beit_finetune_options f = beit_finetune_options_default();
    f.batch_size = 4;
    f.seed = 1;
    f.label_fraction = 0.7;
    f.scratch_dir = tmp;

    beit_trainer *straight = NULL, *stopped = NULL;
    EXPECT_OK(beit_trainer_create(ctx, cls, &o, &straight));
    progress_t p = {{0}, 0, 0};
    EXPECT_OK(beit_trainer_finetune(straight, data_path, &f, on_step, &p));
    CHECK(p.calls == 5 && p.seen[0] == 1 && p.seen[4] == 5, "callback: %d calls", p.calls);
    CHECK(steps_of(straight) == 5, "straight run ended at %llu", (unsigned long long)steps_of(straight));

    EXPECT_OK(beit_trainer_create(ctx, cls, &o, &stopped));
    progress_t q = {{0}, 0, 2};
    EXPECT_OK(beit_trainer_finetune(stopped, data_path, &f, on_step, &q));
    CHECK(q.calls == 2 && steps_of(stopped) == 2, "stopped after %d calls at step %llu", q.calls,
          (unsigned long long)steps_of(stopped));
    EXPECT_OK(beit_trainer_finetune(stopped, data_path, &f, NULL, NULL));
    CHECK(steps_of(stopped) == 5, "resumed run ended at %llu", (unsigned long long)steps_of(stopped));
    unsigned char *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    save_and_read(straight, "straight", &a, &na);
    save_and_read(stopped, "stopped", &b, &nb);
    CHECK(a && b && na == nb && memcmp(a, b, na) == 0, "a stopped and resumed run differs from a straight one");
    free(a);
    free(b);
    CHECK(temp_files_in(tmp) == 0, "the labelled subset's scratch file was left behind");
    /* Running again past the end is a no-op. */
    EXPECT_OK(beit_trainer_finetune(straight, data_path, &f, NULL, NULL));
    CHECK(steps_of(straight) == 5, "a finished run took more steps");

    /* Refusals. */
    beit_finetune_options bad = f;
    EXPECT_ERR(beit_trainer_finetune(NULL, data_path, &f, NULL, NULL), BEIT_ERR_NULL_POINTER, "trainer");
    EXPECT_ERR(beit_trainer_finetune(stopped, NULL, &f, NULL, NULL), BEIT_ERR_NULL_POINTER, "dataset_path");
    EXPECT_ERR(beit_trainer_finetune(stopped, missing_path, &f, NULL, NULL), BEIT_ERR_IO, "missing");
    bad.struct_size = 8;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "struct_size");
    bad = f;
    bad.steps = 9;
    bad.batch_size = 0;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT, "batch");
    bad = f;
    bad.steps = 9;
    bad.min_crop_scale = 0;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "min_crop_scale");
    bad = f;
    bad.steps = 9;
    bad.flip_prob = 2;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "flip_prob");
    bad = f;
    bad.steps = 9;
    bad.label_fraction = 0;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "label fraction");
    bad = f;
    bad.steps = 9;
    bad.label_smoothing = -0.5f;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "smoothing");
    bad = f;
    bad.steps = 9;
    bad.workers = 100000;
    EXPECT_ERR(beit_trainer_finetune(stopped, data_path, &bad, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT, "worker");
    CHECK(steps_of(stopped) == 5, "a refused run took steps");
    beit_trainer_options constant = beit_trainer_options_finetune_default(0);
    beit_trainer *endless = NULL;
    EXPECT_OK(beit_trainer_create(ctx, cls, &constant, &endless));
    EXPECT_ERR(beit_trainer_finetune(endless, data_path, NULL, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "total_steps");
    beit_trainer_free(endless);
    beit_trainer *mim_trainer = NULL;
    EXPECT_OK(beit_trainer_create_from_config(ctx, CONFIG, 1, NULL, &mim_trainer));
    EXPECT_ERR(beit_trainer_finetune(mim_trainer, data_path, &f, NULL, NULL), BEIT_ERR_INVALID_ARGUMENT,
               "BeitForImageClassification");
    beit_trainer_free(mim_trainer);

    uint64_t n = 0;
    EXPECT_OK(beit_finetune_epoch_steps(data_path, 4, 1.0, 0, &n));
    CHECK(n == 3, "12 samples, batch 4: %llu steps", (unsigned long long)n);
    EXPECT_ERR(beit_finetune_epoch_steps(data_path, 0, 1.0, 0, &n), BEIT_ERR_INVALID_ARGUMENT, "batch");
    EXPECT_ERR(beit_finetune_epoch_steps(data_path, 4, 1.5, 0, &n), BEIT_ERR_INVALID_ARGUMENT, "fraction");
    EXPECT_ERR(beit_finetune_epoch_steps(data_path, 4, 1.0, 0, NULL), BEIT_ERR_NULL_POINTER, "out");

    beit_trainer_free(straight);
    beit_trainer_free(stopped);
    beit_model_free(cls);
    section("dataset-driven fine-tuning");
}

static void test_evaluate(void) {
    beit_model *cls = classifier();
    uint64_t confusion[K * K];
    memset(confusion, 0xff, sizeof confusion);
    beit_evaluation e = beit_evaluation_default();
    e.confusion = confusion;
    e.confusion_len = K * K;
    EXPECT_OK(beit_model_evaluate(ctx, cls, data_path, 5, &e));
    uint64_t total = 0, diagonal = 0, per_label[K] = {0};
    for (int t = 0; t < K; t++) {
        for (int p = 0; p < K; p++) {
            total += confusion[t * K + p];
            per_label[t] += confusion[t * K + p];
        }
        diagonal += confusion[t * K + t];
    }
    CHECK(e.images == N && e.num_labels == K && total == N && diagonal == e.correct &&
              e.top1 == (double)e.correct / N,
          "evaluation: %llu images, %llu correct, %llu in the matrix", (unsigned long long)e.images,
          (unsigned long long)e.correct, (unsigned long long)total);
    CHECK(per_label[0] == 4 && per_label[1] == 4 && per_label[2] == 4, "rows are the labels' counts");

    beit_evaluation bad = beit_evaluation_default();
    bad.confusion = confusion;
    bad.confusion_len = 4;
    EXPECT_ERR2(beit_model_evaluate(ctx, cls, data_path, 5, &bad), BEIT_ERR_BUFFER_SIZE, "4", "9");
    CHECK(bad.images == 0, "out written by a refused evaluation");
    EXPECT_ERR(beit_model_evaluate(ctx, cls, data_path, 0, &e), BEIT_ERR_INVALID_ARGUMENT, "batch");
    EXPECT_ERR(beit_model_evaluate(ctx, cls, missing_path, 5, &e), BEIT_ERR_IO, "missing");
    EXPECT_ERR(beit_model_evaluate(ctx, NULL, data_path, 5, &e), BEIT_ERR_NULL_POINTER, "model");
    EXPECT_ERR(beit_model_evaluate(ctx, cls, data_path, 5, NULL), BEIT_ERR_NULL_POINTER, "out");
    bad = beit_evaluation_default();
    bad.struct_size = 4;
    EXPECT_ERR(beit_model_evaluate(ctx, cls, data_path, 5, &bad), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    beit_model *mim = NULL;
    EXPECT_OK(beit_model_create(ctx, CONFIG, BEIT_ARCH_MASKED_IMAGE_MODELING, 1, &mim));
    EXPECT_ERR(beit_model_evaluate(ctx, mim, data_path, 5, &e), BEIT_ERR_INVALID_ARGUMENT,
               "BeitForImageClassification");
    beit_model_free(mim);
    beit_model_free(cls);
    section("classification evaluation");
}

static int32_t count_seg_steps(const beit_segmentation_step *s, void *user_data) {
    int *calls = user_data;
    (*calls)++;
    return s->step == 0; /* never: steps count from 1 */
}

static void test_segmentation(void) {
    beit_model *seg = NULL, *trained = NULL;
    EXPECT_OK(beit_segmenter_create(ctx, SEG_CONFIG, SEG_K, 3, &seg));
    beit_segmentation_options o = beit_segmentation_options_default();
    o.epochs = 2;
    o.batch_size = 3;
    o.warmup_steps = 1;
    o.test_fraction = 0.25;
    float mean[1] = {0.5f}, std[1] = {0.25f};
    o.mean = mean;
    o.mean_len = 1;
    o.std = std;
    o.std_len = 1;
    int calls = 0;
    beit_segmentation_report r = beit_segmentation_report_default();
    EXPECT_OK(beit_segmentation_finetune(ctx, seg, data_path, &o, count_seg_steps, &calls, &r, &trained));
    /* 12 samples: 3 test, 9 train, 3 batches of 3 per epoch. */
    CHECK(r.steps == 6 && calls == 6 && r.train_samples == 9 && r.test_samples == 3 && isfinite(r.final_epoch_loss),
          "report: %llu steps (%d calls), %llu train, %llu test", (unsigned long long)r.steps, calls,
          (unsigned long long)r.train_samples, (unsigned long long)r.test_samples);

    double iou[SEG_K] = {-1, -1};
    beit_segmentation_eval_options eo = beit_segmentation_eval_options_default();
    eo.test_fraction = 0.25;
    eo.mean = mean;
    eo.mean_len = 1;
    eo.std = std;
    eo.std_len = 1;
    beit_segmentation_evaluation e = beit_segmentation_evaluation_default();
    e.per_class_iou = iou;
    e.per_class_iou_len = SEG_K;
    EXPECT_OK(beit_model_evaluate_segmentation(ctx, trained, data_path, &eo, &e));
    CHECK(e.samples == 3 && e.num_labels == SEG_K && e.pixel_accuracy >= 0 && e.pixel_accuracy <= 1 &&
              e.mean_iou >= 0 && e.mean_iou <= 1 && (isnan(iou[0]) || (iou[0] >= 0 && iou[0] <= 1)),
          "evaluation: %llu samples, mIoU %g", (unsigned long long)e.samples, e.mean_iou);
    eo.split = BEIT_SPLIT_ALL;
    EXPECT_OK(beit_model_evaluate_segmentation(ctx, trained, data_path, &eo, &e));
    CHECK(e.samples == N, "all: %llu samples", (unsigned long long)e.samples);

    /* Refusals. */
    beit_model *none = (beit_model *)(uintptr_t)0x50;
    beit_segmentation_options bad = o;
    bad.batch_size = 1;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "batch size");
    bad = o;
    bad.epochs = 0;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "epoch");
    bad = o;
    bad.mean_len = 0;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "mean_len");
    bad = o;
    bad.mean = NULL;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "mean");
    bad = o;
    bad.test_fraction = 1.0;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "test-fraction");
    bad = o;
    bad.learning_rate = -1;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "learning_rate");
    bad = o;
    bad.struct_size = 8;
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &bad, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, data_path, &o, NULL, NULL, NULL, NULL), BEIT_ERR_NULL_POINTER,
               "out");
    EXPECT_ERR(beit_segmentation_finetune(ctx, seg, missing_path, &o, NULL, NULL, NULL, &none), BEIT_ERR_IO,
               "missing");
    beit_model *cls = classifier();
    EXPECT_ERR(beit_segmentation_finetune(ctx, cls, data_path, &o, NULL, NULL, NULL, &none),
               BEIT_ERR_INVALID_ARGUMENT, "BeitForSemanticSegmentation");
    EXPECT_ERR(beit_model_evaluate_segmentation(ctx, cls, data_path, &eo, &e), BEIT_ERR_INVALID_ARGUMENT,
               "BeitForSemanticSegmentation");
    beit_model_free(cls);
    CHECK(none == (beit_model *)(uintptr_t)0x50, "out written by a refused run");

    beit_segmentation_evaluation untouched = beit_segmentation_evaluation_default();
    untouched.per_class_iou = iou;
    untouched.per_class_iou_len = 5;
    EXPECT_ERR2(beit_model_evaluate_segmentation(ctx, trained, data_path, &eo, &untouched), BEIT_ERR_BUFFER_SIZE,
                "5", "2 labels");
    CHECK(untouched.samples == 0, "out written by a refused evaluation");
    beit_segmentation_eval_options badeo = eo;
    badeo.split = (beit_split)7;
    EXPECT_ERR(beit_model_evaluate_segmentation(ctx, trained, data_path, &badeo, &e), BEIT_ERR_INVALID_ARGUMENT,
               "beit_split");
    badeo = eo;
    badeo.batch_size = 0;
    EXPECT_ERR(beit_model_evaluate_segmentation(ctx, trained, data_path, &badeo, &e), BEIT_ERR_INVALID_ARGUMENT,
               "batch");
    EXPECT_ERR(beit_model_evaluate_segmentation(ctx, trained, data_path, &eo, NULL), BEIT_ERR_NULL_POINTER, "out");
    beit_model_free(trained);
    beit_model_free(seg);
    section("segmentation");
}

int main(void) {
    strcpy(tmp, "/tmp/beit-test-finetune-XXXXXX");
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 2;
    }
    snprintf(data_path, sizeof data_path, "%s/data.beitds", tmp);
    snprintf(missing_path, sizeof missing_path, "%s/missing.beitds", tmp);
    static uint8_t bytes[FILE_LEN];
    build_dataset(bytes);
    if (write_file(data_path, bytes, FILE_LEN) != 0) {
        perror("write");
        return 2;
    }
    beit_context_options co = beit_context_options_default();
    co.num_threads = 2;
    if (beit_context_create(&co, &ctx) != BEIT_OK) {
        fprintf(stderr, "context: %s\n", beit_last_error_message());
        return 2;
    }
    test_defaults();
    test_models();
    test_host_fed_steps();
    test_dataset_finetune();
    test_evaluate();
    test_segmentation();
    beit_context_free(ctx);
    remove_tree(tmp);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
