/* Data-parallel training through the split step: two workers (threads here, standing in for
 * two processes or two GPUs) each hold a trainer of the same model, run the forward and backward
 * of their half of a batch, all-reduce the gradients themselves, and apply them. A third trainer
 * steps on the whole batch; the workers end with its weights.
 *
 *   cc -std=c11 allreduce_split_step.c $(pkg-config --cflags --libs beit) -lpthread -lm
 *   ./a.out [steps]
 *
 * The all-reduce: a pretraining loss is the mean over the masked patches of the batch, so the
 * joint gradient is the masked-count-weighted mean of the halves' gradients,
 * g = (m0 g0 + m1 g1) / (m0 + m1), with m_i from beit_pass_stats.masked. (A classification loss
 * is the mean over images: weigh by beit_pass_stats.images instead.) On a cuda context the
 * gradients are device memory (beit_gradients.device_pointer, on beit_gradients.stream): pass
 * them to ncclAllReduce on that stream instead of the loop below.
 *
 * Exits 0 when, after every step, the all-reduced gradient equals the whole batch's within
 * 1e-5 of its norm, and at the end both workers hold identical weights that equal the single
 * trainer's within 1e-5 of the largest weight. */
#define _POSIX_C_SOURCE 200809L
#include <beit.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { IMAGES = 8, HALF = IMAGES / 2, CHANNELS = 3, SIDE = 16, PATCHES = 16, VOCAB = 32 };

static const char *CONFIG =
    "{\"hidden_size\": 32, \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"intermediate_size\": 64,"
    " \"image_size\": 16, \"patch_size\": 4, \"num_channels\": 3, \"vocab_size\": 32, \"use_mask_token\": true,"
    " \"use_shared_relative_position_bias\": true, \"layer_scale_init_value\": 0.1}";

#define CHECK(call)                                                                                \
    do {                                                                                           \
        beit_status status_ = (call);                                                              \
        if (status_ != BEIT_OK) {                                                                  \
            fprintf(stderr, "%s:%d: %s failed: %s: %s\n", __FILE__, __LINE__, #call,               \
                    beit_status_name(status_), beit_last_error_message());                         \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* One pretraining batch: pixels [IMAGES, 3, 16, 16], a mask and visual-token labels per patch. */
static float pixels[IMAGES * CHANNELS * SIDE * SIDE];
static uint8_t mask[IMAGES * PATCHES];
static int64_t labels[IMAGES * PATCHES];

/* Images first..first+count of the batch, as a beit_mim_batch. */
static struct beit_mim_batch slice(size_t first, size_t count) {
    struct beit_mim_batch b = beit_mim_batch_default();
    b.pixels = pixels + first * CHANNELS * SIDE * SIDE;
    b.pixels_len = count * CHANNELS * SIDE * SIDE;
    b.batch = count;
    b.channels = CHANNELS;
    b.height = SIDE;
    b.width = SIDE;
    b.bool_masked_pos = mask + first * PATCHES;
    b.bool_masked_pos_len = count * PATCHES;
    b.labels = labels + first * PATCHES;
    b.labels_len = count * PATCHES;
    return b;
}

/* A fresh batch for `step`: a small deterministic generator, about 40% of patches masked. */
static void make_batch(unsigned step) {
    uint64_t state = 0x9E3779B97F4A7C15ull * (step + 1);
    for (size_t i = 0; i < sizeof pixels / sizeof *pixels; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        pixels[i] = (float)((state >> 40) % 2001) / 1000.0f - 1.0f;
    }
    for (size_t i = 0; i < IMAGES * PATCHES; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        mask[i] = (state >> 33) % 5 < 2;
        labels[i] = (int64_t)((state >> 45) % VOCAB);
    }
    for (size_t img = 0; img < IMAGES; img++) mask[img * PATCHES] = 1; /* every half masks something */
}

/* Every weight of a trainer, laid out as its gradient buffer (beit_parameter_info.offset). */
static float *all_weights(struct beit_trainer *t, size_t len) {
    float *w = calloc(len, sizeof *w);
    size_t count = 0;
    CHECK(beit_trainer_parameter_count(t, &count));
    for (size_t i = 0; i < count; i++) {
        struct beit_parameter_info info = beit_parameter_info_default();
        CHECK(beit_trainer_parameter_info(t, i, &info));
        CHECK(beit_trainer_get_parameter(t, info.name, w + info.offset, info.numel));
    }
    return w;
}

/* The two workers and what they share. */
struct worker {
    int rank;
    struct beit_trainer *trainer;
    struct beit_gradients grads;
    size_t masked;
};
static struct worker workers[2];
static pthread_barrier_t barrier;
static unsigned steps = 5;

static void *work(void *arg) {
    struct worker *me = arg;
    for (unsigned step = 0; step < steps; step++) {
        pthread_barrier_wait(&barrier); /* main has written this step's batch */
        struct beit_mim_batch half = slice((size_t)me->rank * HALF, HALF);
        struct beit_pass_stats pass = beit_pass_stats_default();
        CHECK(beit_trainer_forward_backward(me->trainer, &half, &pass));
        me->masked = pass.masked;
        me->grads = beit_gradients_default();
        CHECK(beit_trainer_get_gradients(me->trainer, &me->grads));
        if (me->grads.location != BEIT_MEMORY_HOST) {
            fprintf(stderr, "this example all-reduces host gradients; use a CPU context\n");
            exit(1);
        }
        pthread_barrier_wait(&barrier); /* both halves' gradients are ready */
        /* The all-reduce, each worker writing its own buffer: the weighted mean of both. */
        const struct worker *a = &workers[0], *b = &workers[1];
        double wa = (double)a->masked / (double)(a->masked + b->masked), wb = 1.0 - wa;
        float *mine = me->grads.host;
        const float *other = workers[1 - me->rank].grads.host;
        float *reduced = malloc(me->grads.len * sizeof *reduced);
        for (size_t i = 0; i < me->grads.len; i++)
            reduced[i] = (float)((me->rank == 0 ? wa : wb) * mine[i] + (me->rank == 0 ? wb : wa) * other[i]);
        pthread_barrier_wait(&barrier); /* both have read both buffers */
        memcpy(mine, reduced, me->grads.len * sizeof *reduced);
        free(reduced);
        pthread_barrier_wait(&barrier); /* both buffers hold the reduced gradient (checked by main) */
        pthread_barrier_wait(&barrier); /* main has compared them */
        CHECK(beit_trainer_apply_gradients(me->trainer, NULL));
        pthread_barrier_wait(&barrier); /* the step is done: nobody reads the batch any more */
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) steps = (unsigned)atoi(argv[1]);
    struct beit_context_options copts = beit_context_options_default();
    copts.device = BEIT_DEVICE_CPU;
    struct beit_context *ctx = NULL;
    CHECK(beit_context_create(&copts, &ctx));

    /* Same config, same initial weights (init seed 7), same options: no stochastic depth, whose
     * per-image draws would differ between one batch of 8 and two of 4. */
    struct beit_trainer_options opts = beit_trainer_options_default();
    opts.learning_rate = 1e-3;
    opts.drop_path_rate = 0.0;
    struct beit_trainer *single = NULL;
    CHECK(beit_trainer_create_from_config(ctx, CONFIG, 7, &opts, &single));
    for (int r = 0; r < 2; r++) {
        workers[r].rank = r;
        CHECK(beit_trainer_create_from_config(ctx, CONFIG, 7, &opts, &workers[r].trainer));
    }

    pthread_barrier_init(&barrier, NULL, 3);
    pthread_t threads[2];
    for (int r = 0; r < 2; r++) pthread_create(&threads[r], NULL, work, &workers[r]);
    double worst_gradient = 0.0;
    for (unsigned step = 0; step < steps; step++) {
        make_batch(step); /* only between steps: the workers read it during one */
        pthread_barrier_wait(&barrier);
        /* The single trainer on the whole batch, through the split step too, to see its gradient. */
        struct beit_mim_batch whole = slice(0, IMAGES);
        CHECK(beit_trainer_forward_backward(single, &whole, NULL));
        struct beit_gradients g = beit_gradients_default();
        CHECK(beit_trainer_get_gradients(single, &g));
        pthread_barrier_wait(&barrier);
        pthread_barrier_wait(&barrier);
        pthread_barrier_wait(&barrier);
        double diff = 0.0, norm = 0.0;
        for (size_t i = 0; i < g.len; i++) {
            double d = (double)workers[0].grads.host[i] - g.host[i];
            diff += d * d;
            norm += (double)g.host[i] * g.host[i];
            if (workers[0].grads.host[i] != workers[1].grads.host[i]) {
                fprintf(stderr, "step %u: the workers' reduced gradients differ at %zu\n", step, i);
                return 1;
            }
        }
        double relative = sqrt(diff) / sqrt(norm);
        if (relative > worst_gradient) worst_gradient = relative;
        printf("step %u: gradient norm %.6f, all-reduced vs whole batch %.3g of it\n", step, sqrt(norm), relative);
        pthread_barrier_wait(&barrier);
        struct beit_step_stats stats = beit_step_stats_default();
        CHECK(beit_trainer_apply_gradients(single, &stats));
        pthread_barrier_wait(&barrier);
    }
    for (int r = 0; r < 2; r++) pthread_join(threads[r], NULL);
    pthread_barrier_destroy(&barrier);

    struct beit_gradients g = beit_gradients_default();
    size_t len = 0;
    { /* the buffer's length, from a pass that is then dropped */
        struct beit_mim_batch whole = slice(0, IMAGES);
        CHECK(beit_trainer_forward_backward(single, &whole, NULL));
        CHECK(beit_trainer_get_gradients(single, &g));
        len = g.len;
        CHECK(beit_trainer_discard_gradients(single));
    }
    float *w0 = all_weights(workers[0].trainer, len), *w1 = all_weights(workers[1].trainer, len);
    float *ws = all_weights(single, len);
    double worst_weight = 0.0, largest = 0.0;
    for (size_t i = 0; i < len; i++) {
        if (w0[i] != w1[i]) {
            fprintf(stderr, "the workers' weights differ at %zu\n", i);
            return 1;
        }
        double d = fabs((double)w0[i] - ws[i]);
        if (d > worst_weight) worst_weight = d;
        if (fabs(ws[i]) > largest) largest = fabs(ws[i]);
    }
    printf("after %u steps: workers identical; largest weight difference to the single trainer %.3g "
           "(largest weight %.3g)\n", steps, worst_weight, largest);
    int ok = worst_gradient <= 1e-5 && worst_weight <= 1e-5 * largest;
    free(w0);
    free(w1);
    free(ws);
    beit_trainer_free(single);
    for (int r = 0; r < 2; r++) beit_trainer_free(workers[r].trainer);
    beit_context_free(ctx);
    if (!ok) {
        fprintf(stderr, "FAIL: gradients %.3g, weights %.3g of the largest\n", worst_gradient, worst_weight / largest);
        return 1;
    }
    printf("OK\n");
    return 0;
}
