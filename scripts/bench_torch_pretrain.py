#!/usr/bin/env python3
"""PyTorch side of the pretraining-step benchmark in scripts/bench-vs-torch, JSON lines on stdout.

Times full masked-image-modeling training steps of the Hugging Face BeitForMaskedImageModeling
"tiny32" config (32x32 grey input, patch 4 = 64 patches, hidden 192, 12 layers, 3 heads, MLP 768,
vocab 8192, mask token, shared relative position bias, layer scale 0.1, drop path 0.1, no dropout):
    step = optimizer.zero_grad(set_to_none=True); loss = model(pixel_values, bool_masked_pos=mask,
           labels=labels[mask]).loss; loss.backward(); optimizer.step()
with torch.optim.AdamW(lr 1.5e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.05) on all
parameters (one group). model.train(), so drop path is active; torch.manual_seed(0) for the model.

Batch (seeded): pixel_values ~ N(0, 1) [B,1,32,32]; bool_masked_pos [B,64] with exactly --masked
ones per row at random positions; labels i64 [B,64] uniform in [0, 8192) for EVERY patch (HF wants
only the masked ones, labels[mask], flattened row-major over the batch).

--save-model DIR writes the model with save_pretrained (safetensors) BEFORE any step and
--save-batch FILE writes the batch (pixel_values f32, bool_masked_pos u8, labels i64 [B,64]), so
`beit bench pretrain --model DIR --batch-file FILE` times the very same model and batch.

Lines (each a JSON object with a "kind" and "side": "torch"): "env", "saved" (when saving),
"pretrain". Peak RSS is ru_maxrss of this whole process at the end (torch's own baseline included;
rss_before_model_mb is ru_maxrss right after importing torch + transformers).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BeitConfig, BeitForMaskedImageModeling  # noqa: E402

RSS_AFTER_IMPORT_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

TINY32 = dict(image_size=32, num_channels=1, patch_size=4, hidden_size=192, num_hidden_layers=12,
              num_attention_heads=3, intermediate_size=768, vocab_size=8192, use_mask_token=True,
              use_shared_relative_position_bias=True, use_relative_position_bias=False,
              use_absolute_position_embeddings=False, layer_scale_init_value=0.1, drop_path_rate=0.1,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_mean_pooling=True)
ADAMW = dict(lr=1.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)


def emit(obj):
    print(json.dumps(obj), flush=True)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(cfg, batch, masked, seed=1):
    n = (cfg.image_size // cfg.patch_size) ** 2
    if not 0 <= masked <= n:
        raise SystemExit(f"--masked {masked}: must be in [0, {n}]")
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=gen)
    order = torch.rand(batch, n, generator=gen).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :masked], True)
    labels = torch.randint(0, cfg.vocab_size, (batch, n), generator=gen, dtype=torch.int64)
    return pixel_values, mask, labels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--masked", type=int, default=26, help="masked patches per image (of 64)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--iters", type=int, default=10, help="timed steps")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attn_implementation")
    ap.add_argument("--save-model", metavar="DIR", help="save_pretrained the untrained model here")
    ap.add_argument("--save-batch", metavar="FILE", help="write the batch here (safetensors)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    transformers.utils.logging.disable_progress_bar()

    emit({"kind": "env", "side": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
          "python": platform.python_version(), "threads": torch.get_num_threads(),
          "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available(),
          "cpu_capability": torch.backends.cpu.get_cpu_capability()})

    config = BeitConfig(**TINY32)
    torch.manual_seed(0)
    model = BeitForMaskedImageModeling._from_config(config, attn_implementation=args.attn)
    pixel_values, mask, labels = make_batch(config, args.batch, args.masked)

    if args.save_model:
        os.makedirs(args.save_model, exist_ok=True)
        model.save_pretrained(args.save_model, safe_serialization=True)
        emit({"kind": "saved", "side": "torch", "dir": args.save_model, "files": sorted(os.listdir(args.save_model))})
    if args.save_batch:
        from safetensors.torch import save_file
        d = os.path.dirname(os.path.abspath(args.save_batch))
        os.makedirs(d, exist_ok=True)
        save_file({"pixel_values": pixel_values.contiguous(),
                   "bool_masked_pos": mask.to(torch.uint8).contiguous(),
                   "labels": labels.contiguous()}, args.save_batch)
        emit({"kind": "saved", "side": "torch", "batch_file": args.save_batch})

    model.train()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    masked_labels = labels[mask]  # row-major over the batch, as HF's prediction_scores[bool_masked_pos]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixel_values, bool_masked_pos=mask, labels=masked_labels).loss
        loss.backward()
        opt.step()
        return loss.item()

    losses, times = [], []
    for _ in range(max(args.warmup, 0)):
        losses.append(step())
    for _ in range(max(args.iters, 1)):
        t = time.perf_counter()
        losses.append(step())  # .item() syncs nothing on CPU; the step is done when it returns
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    emit({"kind": "pretrain", "side": "torch", "attn_implementation": model.config._attn_implementation,
          "requested": args.attn, "batch": args.batch, "masked": args.masked, "threads": args.threads,
          "warmup": args.warmup, "iters": len(times), "median_s": med, "images_per_s": args.batch / med,
          "step_times_s": times, "first_loss": losses[0], "last_loss": losses[-1],
          "params": sum(p.numel() for p in model.parameters()),
          "peak_rss_mb": peak_rss_mb(), "rss_before_model_mb": RSS_AFTER_IMPORT_MB})
    return 0


if __name__ == "__main__":
    sys.exit(main())
