/*
 * The C API side of tests/hostile_inputs.rs: runs one named hostile call through include/beit.h
 * and libbeit.so and reports what the library answered.
 *
 *   hostile_driver CASE ARGS...
 *
 * On stdout: "status: NAME" (the status of the call under test) and "message: TEXT" (what
 * beit_last_error_message() said), then exit 0; the Rust harness judges them (a refusal is any
 * status but BEIT_OK and BEIT_ERR_INTERNAL, with a message). Exit 2: bad usage or a setup step
 * that should have worked (loading a valid fixture) failed; exit 3: a case's own check failed
 * (printed as "violation: ..."). The harness runs this under `prlimit --as`, so an allocation the
 * library should have refused fails (SIGABRT) instead of exhausting the machine. Never built
 * with AddressSanitizer: ASan reserves terabytes of address space, which the cap forbids.
 *
 * Cases:
 *   create CONFIG_FILE ARCH           beit_model_create with the file's text (ARCH: 0..3)
 *   trainer_config CONFIG_FILE        beit_trainer_create_from_config with the file's text
 *   load MODEL_DIR                    beit_model_load
 *   tokenizer_load DIR                beit_tokenizer_load
 *   output_sizes MODEL_DIR B H W      beit_model_output_sizes
 *   infer MODEL_DIR B H W             beit_model_infer on B x C x H x W zero pixels (C: the
 *                                     model's), asking for one small output
 *   infer_wrapped MODEL_DIR           beit_model_infer with a batch whose B*C*H*W wraps
 *                                     around 2^64 to exactly one image's length
 *   trainer_step_wrapped MODEL_DIR    beit_trainer_step, the same wrap for pixels and masks
 *   tokenize_wrapped TOKENIZER_DIR    beit_tokenizer_tokenize, the same wrap
 *   trainer_concurrent MODEL_DIR      four threads step one trainer at once: each call must be
 *                                     BEIT_OK or BEIT_ERR_BUSY, and the step count must equal
 *                                     the OK calls; reports BEIT_ERR_BUSY (which must occur)
 */
#define _XOPEN_SOURCE 700

#include "beit.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints the status and message of the call under test; the harness reads these two lines. */
static int report(beit_status status) {
    printf("status: %s\n", beit_status_name(status));
    printf("message: %s\n", beit_last_error_message());
    return 0;
}

static int usage(const char *why) {
    fprintf(stderr, "hostile_driver: %s\n", why);
    return 2;
}

/* A setup call that must succeed (e.g. loading a valid fixture); exits 2 when it does not. */
static void setup(beit_status status, const char *what) {
    if (status != BEIT_OK) {
        fprintf(stderr, "hostile_driver: setup failed: %s: %s: %s\n", what, beit_status_name(status),
                beit_last_error_message());
        exit(2);
    }
}

static size_t parse_size(const char *s) {
    char *end = NULL;
    unsigned long long v = strtoull(s, &end, 0);
    if (!end || *end != 0) {
        fprintf(stderr, "hostile_driver: not a number: %s\n", s);
        exit(2);
    }
    return (size_t)v;
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return NULL; }
    long n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET) != 0) { fclose(f); return NULL; }
    char *text = malloc((size_t)n + 1);
    if (text && fread(text, 1, (size_t)n, f) != (size_t)n) { free(text); text = NULL; }
    if (text) text[n] = 0;
    fclose(f);
    return text;
}

static beit_context *context(void) {
    beit_context *ctx = NULL;
    setup(beit_context_create(NULL, &ctx), "beit_context_create");
    return ctx;
}

static beit_model *load_model(beit_context *ctx, const char *dir, beit_model_info *info) {
    beit_model *model = NULL;
    setup(beit_model_load(ctx, dir, &model), "beit_model_load");
    *info = beit_model_info_default();
    setup(beit_model_get_info(model, info), "beit_model_get_info");
    return model;
}

/* The batch size whose product with `per_item` wraps around 2^64 to exactly `per_item`:
 * 2^64 / per_item + 1 when per_item is a power of two (2^64 is then a multiple of it). It wraps
 * every larger power of two the same way, so for several products pass the smallest factor. */
static size_t wrapping_batch(size_t per_item) {
    if (per_item == 0 || (per_item & (per_item - 1)) != 0) {
        fprintf(stderr, "hostile_driver: %zu is not a power of two\n", per_item);
        exit(2);
    }
    return (SIZE_MAX / per_item) + 2; /* (2^64 - 1) / p = 2^64 / p - 1 for p > 1 */
}

static int case_create(int argc, char **argv) {
    if (argc != 4) return usage("create CONFIG_FILE ARCH");
    char *json = read_text(argv[2]);
    if (!json) return usage("cannot read the config file");
    beit_context *ctx = context();
    beit_model *model = NULL;
    beit_status s = beit_model_create(ctx, json, (beit_architecture)parse_size(argv[3]), 0, &model);
    report(s);
    beit_model_free(model);
    beit_context_free(ctx);
    free(json);
    return 0;
}

static int case_trainer_config(int argc, char **argv) {
    if (argc != 3) return usage("trainer_config CONFIG_FILE");
    char *json = read_text(argv[2]);
    if (!json) return usage("cannot read the config file");
    beit_context *ctx = context();
    beit_trainer *trainer = NULL;
    beit_status s = beit_trainer_create_from_config(ctx, json, 0, NULL, &trainer);
    report(s);
    beit_trainer_free(trainer);
    beit_context_free(ctx);
    free(json);
    return 0;
}

static int case_load(int argc, char **argv) {
    if (argc != 3) return usage("load MODEL_DIR");
    beit_context *ctx = context();
    beit_model *model = NULL;
    report(beit_model_load(ctx, argv[2], &model));
    beit_model_free(model);
    beit_context_free(ctx);
    return 0;
}

static int case_tokenizer_load(int argc, char **argv) {
    if (argc != 3) return usage("tokenizer_load DIR");
    beit_context *ctx = context();
    beit_tokenizer *tok = NULL;
    report(beit_tokenizer_load(ctx, argv[2], &tok));
    beit_tokenizer_free(tok);
    beit_context_free(ctx);
    return 0;
}

static int case_output_sizes(int argc, char **argv) {
    if (argc != 6) return usage("output_sizes MODEL_DIR B H W");
    beit_context *ctx = context();
    beit_model_info info;
    beit_model *model = load_model(ctx, argv[2], &info);
    beit_output_sizes sizes = beit_output_sizes_default();
    report(beit_model_output_sizes(model, parse_size(argv[3]), parse_size(argv[4]), parse_size(argv[5]), &sizes));
    beit_model_free(model);
    beit_context_free(ctx);
    return 0;
}

/* One output to ask for, sized for `batch` images of `tokens` tokens: the pooler output (batch x
 * hidden) when the model has one, else a classifier's logits, else the last hidden state. */
static size_t small_output(const beit_model *model, const beit_model_info *info, size_t batch, size_t tokens,
                           beit_infer_outputs *out, float **buffer) {
    beit_output_sizes one = beit_output_sizes_default();
    setup(beit_model_output_sizes(model, 1, info->image_height, info->image_width, &one),
          "beit_model_output_sizes (configured size)");
    size_t len;
    float **slot;
    size_t *slot_len;
    if (one.pooler_output_len > 0) {
        len = batch * info->hidden_size;
        slot = &out->pooler_output;
        slot_len = &out->pooler_output_len;
    } else if (info->architecture == BEIT_ARCH_IMAGE_CLASSIFICATION) {
        len = batch * info->num_labels;
        slot = &out->logits;
        slot_len = &out->logits_len;
    } else {
        len = batch * tokens * info->hidden_size;
        slot = &out->last_hidden_state;
        slot_len = &out->last_hidden_state_len;
    }
    *buffer = calloc(len ? len : 1, sizeof(float));
    if (!*buffer) {
        fprintf(stderr, "hostile_driver: cannot allocate %zu output floats\n", len);
        exit(2);
    }
    *slot = *buffer;
    *slot_len = len;
    return len;
}

static int case_infer(int argc, char **argv) {
    if (argc != 6) return usage("infer MODEL_DIR B H W");
    beit_context *ctx = context();
    beit_model_info info;
    beit_model *model = load_model(ctx, argv[2], &info);
    size_t b = parse_size(argv[3]), h = parse_size(argv[4]), w = parse_size(argv[5]);
    size_t len;
    if (__builtin_mul_overflow(b, info.num_channels, &len) || __builtin_mul_overflow(len, h, &len) ||
        __builtin_mul_overflow(len, w, &len) || len > ((size_t)1 << 28))
        return usage("the input would not fit the driver's 1 GiB (use infer_wrapped for overflow)");
    float *pixels = calloc(len ? len : 1, sizeof(float));
    if (!pixels) return usage("cannot allocate the input");
    size_t tokens = (h / info.patch_height) * (w / info.patch_width) + 1;
    beit_infer_outputs out = beit_infer_outputs_default();
    float *buffer = NULL;
    small_output(model, &info, b, tokens, &out, &buffer);
    beit_image_batch in = beit_image_batch_default();
    in.pixels = pixels;
    in.pixels_len = len;
    in.batch = b;
    in.channels = info.num_channels;
    in.height = h;
    in.width = w;
    report(beit_model_infer(ctx, model, &in, &out));
    free(buffer);
    free(pixels);
    beit_model_free(model);
    beit_context_free(ctx);
    return 0;
}

static int case_infer_wrapped(int argc, char **argv) {
    if (argc != 3) return usage("infer_wrapped MODEL_DIR");
    beit_context *ctx = context();
    beit_model_info info;
    beit_model *model = load_model(ctx, argv[2], &info);
    size_t image = info.num_channels * info.image_height * info.image_width;
    float *pixels = calloc(image, sizeof(float));
    if (!pixels) return usage("cannot allocate the input");
    size_t batch = wrapping_batch(image);
    /* What a buffer for `batch` pooler outputs would need wraps too: pass one image's worth. */
    beit_infer_outputs out = beit_infer_outputs_default();
    float *buffer = NULL;
    small_output(model, &info, 1, info.num_patches + 1, &out, &buffer);
    beit_image_batch in = beit_image_batch_default();
    in.pixels = pixels;
    in.pixels_len = batch * image; /* wraps to `image` */
    in.batch = batch;
    in.channels = info.num_channels;
    in.height = info.image_height;
    in.width = info.image_width;
    report(beit_model_infer(ctx, model, &in, &out));
    free(buffer);
    free(pixels);
    beit_model_free(model);
    beit_context_free(ctx);
    return 0;
}

/* A valid one-image batch for `info`'s model, every patch masked, token 0 everywhere. */
typedef struct {
    float *pixels;
    uint8_t *mask;
    int64_t *labels;
    size_t image, patches;
} mim_buffers;

static mim_buffers mim_batch(const beit_model_info *info) {
    mim_buffers m;
    m.image = info->num_channels * info->image_height * info->image_width;
    m.patches = info->num_patches;
    m.pixels = calloc(m.image, sizeof(float));
    m.mask = malloc(m.patches);
    m.labels = calloc(m.patches, sizeof(int64_t));
    if (!m.pixels || !m.mask || !m.labels) exit(usage("cannot allocate the batch"));
    memset(m.mask, 1, m.patches);
    return m;
}

static void free_mim(mim_buffers *m) {
    free(m->pixels);
    free(m->mask);
    free(m->labels);
}

static beit_mim_batch batch_of(const mim_buffers *m, const beit_model_info *info, size_t batch) {
    beit_mim_batch b = beit_mim_batch_default();
    b.pixels = m->pixels;
    b.pixels_len = batch * m->image;
    b.batch = batch;
    b.channels = info->num_channels;
    b.height = info->image_height;
    b.width = info->image_width;
    b.bool_masked_pos = m->mask;
    b.bool_masked_pos_len = batch * m->patches;
    b.labels = m->labels;
    b.labels_len = batch * m->patches;
    return b;
}

static int case_trainer_step_wrapped(int argc, char **argv) {
    if (argc != 3) return usage("trainer_step_wrapped MODEL_DIR");
    beit_context *ctx = context();
    beit_model_info info;
    beit_model *model = load_model(ctx, argv[2], &info);
    beit_trainer *trainer = NULL;
    setup(beit_trainer_create(ctx, model, NULL, &trainer), "beit_trainer_create");
    mim_buffers m = mim_batch(&info);
    /* One batch size that wraps both products (both are powers of two): the smaller decides. */
    size_t batch = wrapping_batch(m.image < m.patches ? m.image : m.patches);
    beit_mim_batch b = batch_of(&m, &info, batch);
    if (b.pixels_len != m.image || b.labels_len != m.patches) return usage("the batch size does not wrap");
    beit_step_stats stats = beit_step_stats_default();
    report(beit_trainer_step(trainer, &b, &stats));
    free_mim(&m);
    beit_trainer_free(trainer);
    beit_model_free(model);
    beit_context_free(ctx);
    return 0;
}

static int case_tokenize_wrapped(int argc, char **argv) {
    if (argc != 3) return usage("tokenize_wrapped TOKENIZER_DIR");
    beit_context *ctx = context();
    beit_tokenizer *tok = NULL;
    setup(beit_tokenizer_load(ctx, argv[2], &tok), "beit_tokenizer_load");
    beit_tokenizer_info info = beit_tokenizer_info_default();
    setup(beit_tokenizer_get_info(tok, &info), "beit_tokenizer_get_info");
    size_t image = info.in_channels * info.image_size * info.image_size;
    size_t batch = wrapping_batch(image < info.tokens_per_image ? image : info.tokens_per_image);
    if (batch * image != image || batch * info.tokens_per_image != info.tokens_per_image)
        return usage("the batch size does not wrap");
    float *pixels = calloc(image, sizeof(float));
    int64_t *tokens = calloc(info.tokens_per_image, sizeof(int64_t));
    if (!pixels || !tokens) return usage("cannot allocate the buffers");
    report(beit_tokenizer_tokenize(tok, pixels, batch * image, batch, tokens, batch * info.tokens_per_image));
    free(pixels);
    free(tokens);
    beit_tokenizer_free(tok);
    beit_context_free(ctx);
    return 0;
}

enum { THREADS = 4, STEPS_PER_THREAD = 25 };

typedef struct {
    beit_trainer *trainer;
    const beit_mim_batch *batch;
    pthread_barrier_t *start;
    int ok, busy, other;
    beit_status other_status;
    char other_message[512];
} stepper;

static void *step_loop(void *arg) {
    stepper *s = arg;
    pthread_barrier_wait(s->start);
    for (int i = 0; i < STEPS_PER_THREAD; i++) {
        beit_step_stats stats = beit_step_stats_default();
        beit_status st = beit_trainer_step(s->trainer, s->batch, &stats);
        if (st == BEIT_OK) {
            s->ok++;
        } else if (st == BEIT_ERR_BUSY) {
            s->busy++;
        } else {
            s->other++;
            s->other_status = st;
            snprintf(s->other_message, sizeof s->other_message, "%s", beit_last_error_message());
        }
    }
    return NULL;
}

static int case_trainer_concurrent(int argc, char **argv) {
    if (argc != 3) return usage("trainer_concurrent MODEL_DIR");
    /* A pool as wide as the stepping threads, so that their steps can overlap however the
     * library queues work on it (with one pool thread, steps would run one after another). */
    beit_context *ctx = NULL;
    beit_context_options opts = beit_context_options_default();
    opts.num_threads = THREADS;
    setup(beit_context_create(&opts, &ctx), "beit_context_create");
    beit_model_info info;
    beit_model *model = load_model(ctx, argv[2], &info);
    beit_trainer *trainer = NULL;
    setup(beit_trainer_create(ctx, model, NULL, &trainer), "beit_trainer_create");
    mim_buffers m = mim_batch(&info);
    beit_mim_batch b = batch_of(&m, &info, 1);
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, THREADS);
    stepper s[THREADS];
    pthread_t threads[THREADS];
    for (int i = 0; i < THREADS; i++) {
        memset(&s[i], 0, sizeof s[i]);
        s[i].trainer = trainer;
        s[i].batch = &b;
        s[i].start = &start;
        pthread_create(&threads[i], NULL, step_loop, &s[i]);
    }
    int ok = 0, busy = 0, violations = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        ok += s[i].ok;
        busy += s[i].busy;
        if (s[i].other) {
            violations++;
            printf("violation: a concurrent step returned %s: %s\n", beit_status_name(s[i].other_status),
                   s[i].other_message);
        }
    }
    pthread_barrier_destroy(&start);
    uint64_t steps = 0;
    setup(beit_trainer_step_count(trainer, &steps), "beit_trainer_step_count");
    printf("concurrent: %d ok, %d busy, step count %llu\n", ok, busy, (unsigned long long)steps);
    if (steps != (uint64_t)ok) {
        printf("violation: %d steps returned BEIT_OK but the trainer counts %llu\n", ok, (unsigned long long)steps);
        violations++;
    }
    if (busy == 0) {
        printf("violation: %d threads stepped one trainer at once and none was refused with BEIT_ERR_BUSY\n",
               THREADS);
        violations++;
    }
    /* The status under test: one more step while another thread holds the trainer is what
     * BEIT_ERR_BUSY is; here, report the refusal seen above (or OK when there was none). */
    if (busy > 0) {
        beit_trainer_free(trainer);
        trainer = NULL;
        printf("status: BEIT_ERR_BUSY\nmessage: %d of %d concurrent steps refused\n", busy, THREADS * STEPS_PER_THREAD);
    } else {
        report(BEIT_OK);
    }
    free_mim(&m);
    beit_trainer_free(trainer);
    beit_model_free(model);
    beit_context_free(ctx);
    return violations ? 3 : 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return usage("usage: hostile_driver CASE ARGS...");
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *c = argv[1];
    if (!strcmp(c, "create")) return case_create(argc, argv);
    if (!strcmp(c, "trainer_config")) return case_trainer_config(argc, argv);
    if (!strcmp(c, "load")) return case_load(argc, argv);
    if (!strcmp(c, "tokenizer_load")) return case_tokenizer_load(argc, argv);
    if (!strcmp(c, "output_sizes")) return case_output_sizes(argc, argv);
    if (!strcmp(c, "infer")) return case_infer(argc, argv);
    if (!strcmp(c, "infer_wrapped")) return case_infer_wrapped(argc, argv);
    if (!strcmp(c, "trainer_step_wrapped")) return case_trainer_step_wrapped(argc, argv);
    if (!strcmp(c, "tokenize_wrapped")) return case_tokenize_wrapped(argc, argv);
    if (!strcmp(c, "trainer_concurrent")) return case_trainer_concurrent(argc, argv);
    return usage("unknown case");
}
