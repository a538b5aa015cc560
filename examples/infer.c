/* Inference on a model directory: loads a Hugging Face BEiT directory (config.json +
 * model.safetensors), runs one image through it and prints what came out.
 *
 *   cc -std=c11 infer.c $(pkg-config --cflags --libs beit) -o infer     (after make install; see examples/README.md)
 *   ./infer MODEL_DIR
 *
 * The image here is a synthetic gradient of the model's size; a real host fills `pixels` with
 * its own normalised image ([C, H, W] floats, the model's preprocessing).
 */
#include <stdio.h>
#include <stdlib.h>

#include "beit.h"

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, beit_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
        return 2;
    }
    beit_context *ctx = NULL;
    beit_model *model = NULL;
    if (beit_context_create(NULL, &ctx) != BEIT_OK) return fail("context");
    if (beit_model_load(ctx, argv[1], &model) != BEIT_OK) {
        beit_context_free(ctx);
        return fail(argv[1]);
    }
    beit_model_info info = beit_model_info_default();
    beit_model_get_info(model, &info);
    size_t c = info.num_channels, h = info.image_height, w = info.image_width;

    float *pixels = malloc(c * h * w * sizeof *pixels);
    for (size_t i = 0; i < c * h * w; i++) pixels[i] = (float)(i % w) / (float)w - 0.5f;

    /* Ask the library how big each output is for this batch, then hand it the buffers. */
    beit_image_batch in = beit_image_batch_default();
    in.pixels = pixels;
    in.pixels_len = c * h * w;
    in.batch = 1;
    in.channels = c;
    in.height = h;
    in.width = w;
    beit_output_sizes sizes = beit_output_sizes_default();
    if (beit_model_output_sizes(model, 1, h, w, &sizes) != BEIT_OK) return fail("output sizes");
    float *hidden = malloc(sizes.last_hidden_state_len * sizeof *hidden);
    float *logits = sizes.logits_len ? malloc(sizes.logits_len * sizeof *logits) : NULL;
    beit_infer_outputs out = beit_infer_outputs_default();
    out.last_hidden_state = hidden;
    out.last_hidden_state_len = sizes.last_hidden_state_len;
    out.logits = logits;
    out.logits_len = sizes.logits_len;
    int rc = 0;
    if (beit_model_infer(ctx, model, &in, &out) != BEIT_OK) {
        rc = fail("infer");
    } else {
        printf("libbeit %s: hidden size %zu, %zu layers\n", beit_version(), info.hidden_size, info.num_layers);
        printf("last_hidden_state: %zu values, first %.4f\n", sizes.last_hidden_state_len, hidden[0]);
        if (logits) {
            size_t best = 0;
            for (size_t i = 1; i < sizes.logits_len; i++)
                if (logits[i] > logits[best]) best = i;
            printf("logits: %zu values, largest at %zu (%.4f)\n", sizes.logits_len, best, logits[best]);
        }
    }
    free(pixels);
    free(hidden);
    free(logits);
    beit_model_free(model);
    beit_context_free(ctx);
    return rc;
}
