/* Tokenizing a folder of images: turn the folder into a dataset file with the CLI, then read
 * every image through the dataset API and tokenize it with a visual tokenizer.
 *
 *   beit dataset import --format image-folder --dir IMAGES/ --size 32 --channels 1 --out images.beitds
 *   cc -std=c11 tokenize_dataset.c $(pkg-config --cflags --libs beit) -o tokenize_dataset     (after make install; see examples/README.md)
 *   ./tokenize_dataset TOKENIZER_DIR images.beitds
 *
 * TOKENIZER_DIR comes from `beit tokenizer train` (or scripts/convert_dalle_encoder.py). The
 * images must have the tokenizer's size and channel count (the import resizes them). Prints
 * each image's label and the first visual tokens of its grid.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "beit.h"

static int fail(const char *what) {
    fprintf(stderr, "%s: %s\n", what, beit_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s TOKENIZER_DIR DATASET.beitds\n", argv[0]);
        return 2;
    }
    beit_context *ctx = NULL;
    beit_tokenizer *tok = NULL;
    beit_dataset *ds = NULL;
    if (beit_context_create(NULL, &ctx) != BEIT_OK) return fail("context");
    if (beit_tokenizer_load(ctx, argv[1], &tok) != BEIT_OK) return fail(argv[1]);
    if (beit_dataset_open(argv[2], &ds) != BEIT_OK) return fail(argv[2]);

    beit_tokenizer_info ti = beit_tokenizer_info_default();
    beit_dataset_info di = beit_dataset_info_default();
    beit_tokenizer_get_info(tok, &ti);
    beit_dataset_get_info(ds, &di);
    if (di.height != ti.image_size || di.width != ti.image_size || di.channels != ti.in_channels) {
        fprintf(stderr, "images are %ux%ux%u; the tokenizer takes %zux%zux%zu\n", di.height, di.width, di.channels,
                ti.image_size, ti.image_size, ti.in_channels);
        return 1;
    }
    size_t hw = (size_t)di.height * di.width, c = di.channels;
    uint8_t *raw = malloc(di.pixels_len);
    float *pixels = malloc(c * hw * sizeof *pixels);
    int64_t *tokens = malloc(ti.tokens_per_image * sizeof *tokens);
    int rc = 0;
    for (uint64_t i = 0; i < di.count && !rc; i++) {
        beit_dataset_sample s = beit_dataset_sample_default();
        s.pixels = raw;
        s.pixels_len = di.pixels_len;
        if (beit_dataset_read_sample(ds, i, &s) != BEIT_OK) {
            rc = fail("read");
            break;
        }
        /* Dataset pixels are u8 [H, W, C]; the tokenizer takes f32 [C, H, W] in [0, 1]. */
        for (size_t p = 0; p < hw; p++)
            for (size_t ch = 0; ch < c; ch++) pixels[ch * hw + p] = raw[p * c + ch] / 255.0f;
        if (beit_tokenizer_tokenize(tok, pixels, c * hw, 1, tokens, ti.tokens_per_image) != BEIT_OK) {
            rc = fail("tokenize");
            break;
        }
        printf("image %llu (label %d): %zux%zu tokens:", (unsigned long long)i, s.label_written ? (int)s.label : -1,
               ti.grid_h, ti.grid_w);
        for (size_t k = 0; k < ti.tokens_per_image && k < 8; k++) printf(" %lld", (long long)tokens[k]);
        printf("%s\n", ti.tokens_per_image > 8 ? " ..." : "");
    }
    free(raw);
    free(pixels);
    free(tokens);
    beit_dataset_free(ds);
    beit_tokenizer_free(tok);
    beit_context_free(ctx);
    return rc;
}
