/* A host-driven pretraining loop: the host owns the data and feeds libbeit its own batches
 * (pixels, the mask of patches to predict, the visual token of every patch), steps the
 * trainer, checkpoints, and resumes from the checkpoint.
 *
 *   cc -std=c11 pretrain_loop.c $(pkg-config --cflags --libs beit) -o pretrain_loop     (after make install; see examples/README.md)
 *   ./pretrain_loop OUT_DIR
 *
 * The batches here are a toy task (each patch's token is its mean brightness, quantised to the
 * vocabulary) so that the loss visibly falls; a real host would run its images through a
 * tokenizer (see tokenize_dataset.c) and BEiT's block-wise masking.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "beit.h"

#define BATCH 8
#define SIZE 16
#define PATCH 4
#define GRID (SIZE / PATCH)
#define PATCHES (GRID * GRID)
#define VOCAB 16

static const char *CONFIG =
    "{\"image_size\": 16, \"patch_size\": 4, \"num_channels\": 1, \"hidden_size\": 32,"
    " \"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"intermediate_size\": 64,"
    " \"vocab_size\": 16, \"use_mask_token\": true, \"use_shared_relative_position_bias\": true,"
    " \"layer_scale_init_value\": 0.1}";

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, beit_last_error_message());
    return 1;
}

/* A small deterministic generator, so every run sees the same batches. */
static uint32_t next_random(uint64_t *state) {
    *state = *state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(*state >> 33);
}

/* Batch `position`: smooth random images, 6 random patches masked per image, and each patch's
 * token = its mean brightness in [0, 1) times VOCAB. */
static void make_batch(uint64_t position, float *pixels, uint8_t *mask, int64_t *labels) {
    uint64_t state = 0x9e3779b97f4a7c15ULL ^ position;
    for (int b = 0; b < BATCH; b++) {
        float fx = (float)(next_random(&state) % 100) / 300.0f, fy = (float)(next_random(&state) % 100) / 300.0f;
        for (int y = 0; y < SIZE; y++)
            for (int x = 0; x < SIZE; x++)
                pixels[(b * SIZE + y) * SIZE + x] = 0.5f + 0.45f * (float)((x * fx + y * fy) - (int)(x * fx + y * fy)) - 0.2f;
        memset(mask + b * PATCHES, 0, PATCHES);
        for (int k = 0; k < 6; k++) mask[b * PATCHES + next_random(&state) % PATCHES] = 1;
        for (int p = 0; p < PATCHES; p++) {
            int py = p / GRID, px = p % GRID;
            float sum = 0;
            for (int y = 0; y < PATCH; y++)
                for (int x = 0; x < PATCH; x++) sum += pixels[(b * SIZE + py * PATCH + y) * SIZE + px * PATCH + x];
            float mean = sum / (PATCH * PATCH);
            int64_t t = (int64_t)(mean * VOCAB);
            labels[b * PATCHES + p] = t < 0 ? 0 : t >= VOCAB ? VOCAB - 1 : t;
        }
    }
}

static int run_steps(beit_trainer *trainer, uint64_t until, double *last_loss) {
    static float pixels[BATCH * SIZE * SIZE];
    static uint8_t mask[BATCH * PATCHES];
    static int64_t labels[BATCH * PATCHES];
    uint64_t step = 0, position = 0;
    beit_trainer_step_count(trainer, &step);
    while (step < until) {
        beit_trainer_get_data_position(trainer, &position);
        make_batch(position, pixels, mask, labels);
        beit_mim_batch batch = beit_mim_batch_default();
        batch.pixels = pixels;
        batch.pixels_len = BATCH * SIZE * SIZE;
        batch.batch = BATCH;
        batch.channels = 1;
        batch.height = SIZE;
        batch.width = SIZE;
        batch.bool_masked_pos = mask;
        batch.bool_masked_pos_len = BATCH * PATCHES;
        batch.labels = labels;
        batch.labels_len = BATCH * PATCHES;
        beit_step_stats stats = beit_step_stats_default();
        if (beit_trainer_step(trainer, &batch, &stats) != BEIT_OK) return fail("step");
        step = stats.step;
        *last_loss = stats.loss;
        if (step % 20 == 0) printf("step %3llu  loss %.4f  lr %.2e\n", (unsigned long long)step, stats.loss, stats.lr);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    char checkpoint[4096], model_dir[4096];
    snprintf(checkpoint, sizeof checkpoint, "%s/checkpoint.safetensors", argv[1]);
    snprintf(model_dir, sizeof model_dir, "%s/model", argv[1]);

    beit_context *ctx = NULL;
    if (beit_context_create(NULL, &ctx) != BEIT_OK) return fail("context");
    beit_trainer_options opts = beit_trainer_options_default();
    opts.learning_rate = 2e-3;
    opts.warmup_steps = 10;
    opts.total_steps = 120;
    opts.drop_path_rate = 0.0;
    beit_trainer *trainer = NULL;
    if (beit_trainer_create_from_config(ctx, CONFIG, 7, &opts, &trainer) != BEIT_OK) return fail("trainer");

    double first = 0, loss = 0;
    int rc = run_steps(trainer, 1, &first) || run_steps(trainer, 60, &loss);
    /* Checkpoint (one file, replaced atomically), then continue in a new trainer from it, as a
     * host does after a restart. */
    if (!rc && beit_trainer_save_checkpoint(trainer, checkpoint) != BEIT_OK) rc = fail("save checkpoint");
    beit_trainer_free(trainer);
    trainer = NULL;
    if (!rc && beit_trainer_create_from_config(ctx, CONFIG, 7, &opts, &trainer) != BEIT_OK) rc = fail("trainer");
    if (!rc && beit_trainer_load_checkpoint(trainer, checkpoint) != BEIT_OK) rc = fail("load checkpoint");
    if (!rc) rc = run_steps(trainer, 120, &loss);
    if (!rc && beit_trainer_save_model(trainer, model_dir) != BEIT_OK) rc = fail("save model");
    if (!rc) {
        printf("loss %.4f -> %.4f; model saved to %s\n", first, loss, model_dir);
        if (!(loss < first)) {
            fprintf(stderr, "the loss did not fall\n");
            rc = 1;
        }
    }
    beit_trainer_free(trainer);
    beit_context_free(ctx);
    return rc;
}
