/*
 * C API test of host-fed segmentation fine-tuning on a beit_trainer (beit_seg_batch,
 * beit_trainer_step_segment, beit_trainer_forward_backward_segment with apply/discard, and
 * checkpoints of a segmentation trainer), written against include/beit.h only.
 *
 *   test_seg_trainer
 *
 * Checked: beit_trainer_create takes a BeitForSemanticSegmentation; the split step gives the
 * whole step's loss and parameters bit for bit; the BatchNorm running statistics are updated
 * once per applied step (num_batches_tracked counts 0, 1, 2: the hand-derived values) and never
 * for a discarded one; a checkpoint taken mid-run resumes to the straight run's parameters bit
 * for bit, loaded into a fresh trainer (a truncated copy is refused first); bad batches (NULL, sizes, one image, a label outside
 * the classes, the wrong trainer) are refused with a message and change nothing.
 *
 * Prints a line per section and finally "N passed, M failed"; exits non-zero on any failure.
 * Built by scripts/test-c, which also runs it under valgrind and ASan/UBSan.
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"

enum { B = 2, H = 16, W = 16, K = 3, IGNORE = 255 };
#define SEG_CONFIG                                                                             \
    "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 2, "             \
    "\"intermediate_size\": 64, \"image_size\": 16, \"patch_size\": 4, \"num_channels\": 1, "  \
    "\"use_relative_position_bias\": true, \"pool_scales\": [1, 2], \"auxiliary_channels\": 16}"

static beit_context *ctx;
static char tmp[64];

static float pixels[4][B * H * W];
static int64_t labels[4][B * H * W];

/* Batch i: a bright square of class 1 + i % 2 on a darker ramp, one ignored pixel row. */
static void make_batches(void) {
    for (int i = 0; i < 4; i++) {
        for (int b = 0; b < B; b++) {
            for (int y = 0; y < H; y++) {
                for (int x = 0; x < W; x++) {
                    int at = (b * H + y) * W + x;
                    int in = y >= 2 + i + b && y < 10 + i + b && x >= 3 + b && x < 11 + b;
                    pixels[i][at] = in ? 0.8f - 0.1f * (float)i : -0.5f + 0.03f * (float)(x + y);
                    labels[i][at] = y == 0 ? IGNORE : in ? 1 + (i + b) % 2 : 0;
                }
            }
        }
    }
}

static beit_seg_batch batch(int i) {
    beit_seg_batch s = beit_seg_batch_default();
    s.pixels = pixels[i];
    s.pixels_len = B * H * W;
    s.batch = B;
    s.channels = 1;
    s.height = H;
    s.width = W;
    s.labels = labels[i];
    s.labels_len = B * H * W;
    return s;
}

/* Every parameter of the trainer, concatenated in its order (malloc'd, *len floats); with
 * `tracked`, also the sum of the num_batches_tracked entries over every BatchNorm and their
 * number. */
static float *snapshot(beit_trainer *t, size_t *len, float *tracked_sum, size_t *norms) {
    size_t count = 0, total = 0;
    EXPECT_OK(beit_trainer_parameter_count(t, &count));
    beit_parameter_info info = beit_parameter_info_default();
    for (size_t i = 0; i < count; i++) {
        EXPECT_OK(beit_trainer_parameter_info(t, i, &info));
        total += info.numel;
    }
    float *all = malloc(total * sizeof(float));
    size_t at = 0;
    *tracked_sum = 0.0f;
    *norms = 0;
    for (size_t i = 0; i < count && all; i++) {
        EXPECT_OK(beit_trainer_parameter_info(t, i, &info));
        EXPECT_OK(beit_trainer_get_parameter(t, info.name, all + at, info.numel));
        const char *suffix = ".num_batches_tracked";
        size_t n = strlen(info.name), s = strlen(suffix);
        if (n >= s && strcmp(info.name + n - s, suffix) == 0) {
            *tracked_sum += all[at];
            (*norms)++;
        }
        at += info.numel;
    }
    *len = total;
    return all;
}

static int same(const float *a, const float *b, size_t n) { return a && b && memcmp(a, b, n * sizeof(float)) == 0; }

static beit_trainer_options options(void) {
    beit_trainer_options o = beit_trainer_options_default();
    o.learning_rate = 1e-3;
    o.warmup_steps = 1;
    o.total_steps = 8;
    o.drop_path_rate = 0.2;
    o.layer_decay = 0.9;
    o.seed = 6;
    return o;
}

static void test_steps(beit_model *seg) {
    beit_trainer_options o = options();
    beit_trainer *whole = NULL, *split = NULL;
    EXPECT_OK(beit_trainer_create(ctx, seg, &o, &whole));
    EXPECT_OK(beit_trainer_create(ctx, seg, &o, &split));
    size_t n0, n1, norms;
    float tracked;
    float *fresh = snapshot(split, &n0, &tracked, &norms);
    CHECK(norms >= 2 && tracked == 0.0f, "%zu BatchNorms, tracked %g before any step", norms, tracked);

    /* A discarded step changes nothing, running statistics included. */
    beit_seg_batch b0 = batch(0), b1 = batch(1);
    beit_pass_stats pass = beit_pass_stats_default();
    EXPECT_OK(beit_trainer_forward_backward_segment(split, &b1, &pass));
    CHECK(pass.images == B && pass.masked == 0 && pass.loss > 0.0, "pass stats %g %zu %zu", pass.loss,
          pass.images, pass.masked);
    EXPECT_ERR(beit_trainer_step_segment(split, &b1, NULL), BEIT_ERR_INVALID_ARGUMENT, "pending");
    EXPECT_OK(beit_trainer_discard_gradients(split));
    float *after_discard = snapshot(split, &n1, &tracked, &norms);
    CHECK(n0 == n1 && same(fresh, after_discard, n0), "a discarded step changed the parameters");

    for (int i = 0; i < 2; i++) {
        beit_seg_batch bi = i ? b1 : b0;
        beit_step_stats a = beit_step_stats_default(), s = beit_step_stats_default();
        EXPECT_OK(beit_trainer_step_segment(whole, &bi, &a));
        EXPECT_OK(beit_trainer_forward_backward_segment(split, &bi, &pass));
        EXPECT_OK(beit_trainer_apply_gradients(split, &s));
        CHECK(a.step == (uint64_t)i + 1 && s.step == a.step, "step %llu / %llu", (unsigned long long)a.step,
              (unsigned long long)s.step);
        CHECK(a.loss == s.loss && pass.loss == a.loss && a.grad_norm == s.grad_norm,
              "split step %d: loss %.17g vs %.17g", i, s.loss, a.loss);
        float tw, ts;
        size_t nw, ns, bw, bs;
        float *pw = snapshot(whole, &nw, &tw, &bw), *ps = snapshot(split, &ns, &ts, &bs);
        CHECK(nw == ns && same(pw, ps, nw), "split and whole steps differ after step %d", i + 1);
        CHECK(tw == (float)((i + 1) * (int)bw), "num_batches_tracked sums to %g after %d steps of %zu BatchNorms",
              tw, i + 1, bw);
        free(pw);
        free(ps);
    }

    /* Refusals: nothing changes. */
    size_t nb;
    float tb;
    float *before = snapshot(whole, &nb, &tb, &norms);
    EXPECT_ERR(beit_trainer_step_segment(whole, NULL, NULL), BEIT_ERR_NULL_POINTER, "batch");
    beit_seg_batch bad = batch(2);
    bad.labels = NULL;
    EXPECT_ERR(beit_trainer_step_segment(whole, &bad, NULL), BEIT_ERR_NULL_POINTER, "batch->labels");
    bad = batch(2);
    bad.labels_len = B * H * W - 1;
    EXPECT_ERR2(beit_trainer_step_segment(whole, &bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "batch->labels_len", "511");
    bad = batch(2);
    bad.struct_size = 8;
    EXPECT_ERR(beit_trainer_step_segment(whole, &bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "struct_size");
    bad = batch(2);
    bad.batch = 1;
    bad.pixels_len = H * W;
    bad.labels_len = H * W;
    EXPECT_ERR(beit_trainer_step_segment(whole, &bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "at least 2 images");
    labels[3][5] = K;
    bad = batch(3);
    EXPECT_ERR(beit_trainer_forward_backward_segment(whole, &bad, NULL), BEIT_ERR_INVALID_ARGUMENT, "label 3");
    labels[3][5] = 0;
    float *after = snapshot(whole, &n1, &tb, &norms);
    CHECK(nb == n1 && same(before, after, nb), "a refused step changed the trainer");
    free(before);
    free(after);
    free(fresh);
    free(after_discard);
    beit_trainer_free(whole);
    beit_trainer_free(split);
    section("segmentation steps");
}

static void test_checkpoint(beit_model *seg) {
    char ckpt[128];
    snprintf(ckpt, sizeof ckpt, "%s/mid.safetensors", tmp);
    beit_trainer_options o = options();
    beit_trainer *straight = NULL, *resumed = NULL;
    EXPECT_OK(beit_trainer_create(ctx, seg, &o, &straight));
    for (int i = 0; i < 4; i++) {
        if (i == 2) EXPECT_OK(beit_trainer_save_checkpoint(straight, ckpt));
        beit_seg_batch bi = batch(i);
        EXPECT_OK(beit_trainer_step_segment(straight, &bi, NULL));
    }
    EXPECT_OK(beit_trainer_create(ctx, seg, &o, &resumed));
    /* A truncated copy is refused and leaves the trainer at step 0. */
    size_t size = 0;
    unsigned char *bytes = read_file(ckpt, &size);
    char cut[160];
    snprintf(cut, sizeof cut, "%s/cut.safetensors", tmp);
    CHECK(bytes && size > 64 && write_file(cut, bytes, size / 2) == 0, "checkpoint of %zu bytes", size);
    free(bytes);
    EXPECT_ERR(beit_trainer_load_checkpoint(resumed, cut), BEIT_ERR_FORMAT, "cut.safetensors");
    uint64_t steps = 99;
    EXPECT_OK(beit_trainer_step_count(resumed, &steps));
    CHECK(steps == 0, "a refused checkpoint moved the trainer to step %llu", (unsigned long long)steps);
    EXPECT_OK(beit_trainer_load_checkpoint(resumed, ckpt));
    EXPECT_OK(beit_trainer_step_count(resumed, &steps));
    CHECK(steps == 2, "resumed at step %llu", (unsigned long long)steps);
    size_t n;
    float tracked;
    size_t norms;
    float *mid = snapshot(resumed, &n, &tracked, &norms);
    CHECK(tracked == (float)(2 * (int)norms), "the checkpoint holds the running statistics' counts (%g)", tracked);
    free(mid);
    for (int i = 2; i < 4; i++) {
        beit_seg_batch bi = batch(i);
        EXPECT_OK(beit_trainer_step_segment(resumed, &bi, NULL));
    }
    size_t na, nb;
    float ta, tb;
    float *a = snapshot(straight, &na, &ta, &norms), *b = snapshot(resumed, &nb, &tb, &norms);
    CHECK(na == nb && same(a, b, na), "the resumed run differs from the straight one");
    free(a);
    free(b);
    beit_trainer_free(straight);
    beit_trainer_free(resumed);
    section("segmentation checkpoint");
}

static void test_wrong_trainer(void) {
    beit_model *mim = NULL;
    EXPECT_OK(beit_model_create(ctx,
                                "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 2, "
                                "\"intermediate_size\": 64, \"image_size\": 16, \"patch_size\": 4, "
                                "\"num_channels\": 1, \"vocab_size\": 32, \"use_mask_token\": true}",
                                BEIT_ARCH_MASKED_IMAGE_MODELING, 1, &mim));
    beit_trainer *t = NULL;
    EXPECT_OK(beit_trainer_create(ctx, mim, NULL, &t));
    beit_seg_batch b0 = batch(0);
    EXPECT_ERR(beit_trainer_step_segment(t, &b0, NULL), BEIT_ERR_INVALID_ARGUMENT, "BeitForSemanticSegmentation");
    EXPECT_ERR(beit_trainer_step_segment(NULL, &b0, NULL), BEIT_ERR_NULL_POINTER, "trainer");
    beit_trainer_free(t);
    beit_model_free(mim);
    section("wrong trainer");
}

int main(void) {
    strcpy(tmp, "/tmp/beit-test-seg-trainer-XXXXXX");
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 2;
    }
    beit_context_options co = beit_context_options_default();
    co.num_threads = 2;
    if (beit_context_create(&co, &ctx) != BEIT_OK) {
        fprintf(stderr, "context: %s\n", beit_last_error_message());
        return 2;
    }
    make_batches();
    beit_model *seg = NULL;
    EXPECT_OK(beit_segmenter_create(ctx, SEG_CONFIG, K, 3, &seg));
    test_steps(seg);
    test_checkpoint(seg);
    test_wrong_trainer();
    beit_model_free(seg);
    beit_context_free(ctx);
    remove_tree(tmp);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
