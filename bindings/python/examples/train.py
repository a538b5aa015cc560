"""BEiT end to end from Python, with nothing but `pip install <libbeit>/bindings/python`:

1. write a small labelled dataset file (two classes of 16x16 RGB images) with beit.DatasetWriter;
2. train a visual tokenizer (a dVAE) on it for a few steps;
3. pretrain a BEiT for 10 steps with masked image modeling: the library's loader gives BEiT's
   augmented views and block-wise masks, the tokenizer turns view 2 into the visual tokens;
4. turn the pretrained model into a classifier and fine-tune it for 10 steps on the dataset;
5. evaluate it (top-1 and the confusion matrix).

    python train.py [WORK_DIR]        # WORK_DIR (default: a temporary directory) gets the files

Runs on the CPU in a few seconds. Exits nonzero on any error.
"""

import math
import pathlib
import sys
import tempfile

import numpy as np

import beit

SIZE, PATCH, IMAGES = 16, 4, 64

# A small BEiT: 16x16 images in 4x4 patches (a 4x4 grid), 64 visual tokens.
CONFIG = {
    "image_size": SIZE,
    "patch_size": PATCH,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 64,
    "use_mask_token": True,
    "use_shared_relative_position_bias": True,
    "layer_scale_init_value": 0.1,
}


def make_dataset(path: pathlib.Path) -> None:
    """Class 0: horizontal stripes, class 1: vertical stripes, with random phase, colour and noise."""
    rng = np.random.default_rng(0)
    labels = np.arange(IMAGES, dtype=np.uint32) % 2
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.empty((IMAGES, SIZE, SIZE, 3), dtype=np.uint8)  # the file stores HWC bytes
    for i, label in enumerate(labels):
        coord = ys if label == 0 else xs
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * coord / 4 + rng.uniform(0, 2 * math.pi))
        colour = rng.uniform(0.4, 1.0, size=3)
        image = wave[..., None] * colour + rng.normal(0, 0.05, size=(SIZE, SIZE, 3))
        pixels[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    with beit.DatasetWriter(path, height=SIZE, width=SIZE, channels=3, labels=True) as writer:
        writer.append(pixels, labels=labels)  # the file appears, whole, when the block ends


def main() -> int:
    work = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="beit-train-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "stripes.beitds"
    make_dataset(data)
    print(f"dataset: {data} ({IMAGES} images, 2 classes)")

    with beit.Context(threads=2, device="cpu") as ctx:
        # 2. A tokenizer whose token grid is the model's patch grid (16 px / 4 = 4x4).
        tokenizer_config = {"in_channels": 3, "image_size": SIZE, "vocab_size": CONFIG["vocab_size"],
                            "n_hid": 16, "group_count": 3, "n_blk_per_group": 1, "decoder_n_init": 16}
        with beit.DvaeTrainer.create(ctx, tokenizer_config, {"total_steps": 20, "seed": 0}) as dvae:
            summary = dvae.train(data, steps=20, batch=16)
            tokenizer = dvae.tokenizer()
        print(f"tokenizer: {summary.steps} steps")

        # 3. Pretraining, 10 steps: BEiT's loader (crops, flips, block-wise masks) and the
        # tokenizer's visual tokens of view 2 as the targets of the masked patches.
        options = {"learning_rate": 1e-3, "warmup_steps": 2, "total_steps": 10}
        with beit.Trainer.from_config(ctx, CONFIG, init_seed=0, options=options) as pretrainer, \
                beit.Loader(ctx, data, batch_size=16, image_size=SIZE, patch_size=PATCH, tokens=tokenizer) as loader:
            for _ in range(10):
                batch = loader.next()
                stats = pretrainer.step(batch.view1, batch.bool_masked_pos, batch.tokens)
                print(f"pretrain step {stats.step}: loss {stats.loss:.4f} "
                      f"({int(batch.bool_masked_pos.sum())} masked patches)")
            pretrained = pretrainer.model()

        # 4. Fine-tuning, 10 steps: a classifier with BEiT's pretrained backbone and a fresh head,
        # trained with `beit finetune`'s recipe on the labelled dataset.
        classifier = pretrained.to_classifier(num_labels=2)
        with beit.Trainer.from_model(ctx, classifier, beit.TrainerOptions.finetune(total_steps=10)) as tuner:
            tuner.finetune(data, {"steps": 10, "batch_size": 16},
                           callback=lambda s: print(f"fine-tune step {s.step}: loss {s.loss:.4f}"))
            tuned = tuner.model()

        # 5. Evaluation on the dataset.
        result = tuned.evaluate(data)
        print(f"top-1 {result.top1:.3f} ({result.correct}/{result.images}); confusion:\n{result.confusion}")
        for m in (tokenizer, pretrained, classifier, tuned):
            m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
