"""PyTorch's side of scripts/gpu-check's pretraining benchmarks, one mode per run (gpu-check
runs each under its own timeout and appends the JSON line to a file):

  step-eager    BEiT-B/16 224 MIM training step, bf16 autocast + SDPA, eager
  step-compile  the same step with torch.compile (compile time measured apart, not in images/s)
  attention     SDPA forward and forward+backward at B=64, 12 heads, N=197, d=64 with a float
                relative-position-bias mask that receives its gradient (as ours does)
  gemm-peak     an 8192^3 bf16 torch.matmul (cuBLAS), the dense bf16 rate of this GPU

The model: HF `BeitForMaskedImageModeling` (attn_implementation="sdpa") when `transformers` is
installed; otherwise `MimBeit` below, a self-contained PyTorch module with the same architecture
and the same computation as HF's (per-layer relative position bias, q/v biases and no k bias,
layer scale, drop path, exact GELU, the MIM head's layer norm and projection applied to every
patch and the loss over the masked ones, as HF does). The JSON says which ran.

The step on both sides: batch 64, 75 of 196 patches masked per image, vocab 8192, drop path 0.1,
layer scale 0.1, fp32 parameters and AdamW (lr 1.5e-3, betas 0.9/0.999, wd 0.05; fused),
gradient clipping at 3.0, bf16 compute. Timing: warm-up steps, then timed steps between two
torch.cuda.synchronize() calls.
"""
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH, MASKED, VOCAB, IMAGE, PATCH, DIM, LAYERS, HEADS, INTER = 64, 75, 8192, 224, 16, 768, 12, 12, 3072
DROP_PATH, LAYER_SCALE = 0.1, 0.1


class Block(nn.Module):
    def __init__(self, drop_path, grid):
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM, eps=1e-12)
        self.qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(DIM))
        self.v_bias = nn.Parameter(torch.zeros(DIM))
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM, eps=1e-12)
        self.fc1 = nn.Linear(DIM, INTER)
        self.fc2 = nn.Linear(INTER, DIM)
        self.lambda_1 = nn.Parameter(LAYER_SCALE * torch.ones(DIM))
        self.lambda_2 = nn.Parameter(LAYER_SCALE * torch.ones(DIM))
        self.drop_path = drop_path
        gh, gw = grid
        rows = (2 * gh - 1) * (2 * gw - 1) + 3
        self.table = nn.Parameter(torch.zeros(rows, HEADS))
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def drop(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = (keep + torch.rand(x.shape[0], 1, 1, device=x.device, dtype=x.dtype)).floor_()
        return x / keep * mask

    def forward(self, x):
        b, t, _ = x.shape
        h = self.ln1(x)
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(h, self.qkv.weight, bias).reshape(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        rel = self.table[self.index.view(-1)].view(t, t, HEADS).permute(2, 0, 1).unsqueeze(0)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=rel.to(qkv.dtype))
        a = a.transpose(1, 2).reshape(b, t, DIM)
        x = x + self.drop(self.lambda_1 * self.proj(a))
        x = x + self.drop(self.lambda_2 * self.fc2(F.gelu(self.fc1(self.ln2(x)))))
        return x


def relative_position_index(grid):
    gh, gw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += gh - 1
    rel[:, :, 1] += gw - 1
    rel[:, :, 0] *= 2 * gw - 1
    n = gh * gw
    index = torch.zeros(n + 1, n + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    rows = (2 * gh - 1) * (2 * gw - 1)
    index[0, 0:] = rows
    index[0:, 0] = rows + 1
    index[0, 0] = rows + 2
    return index


class MimBeit(nn.Module):
    """BeitForMaskedImageModeling's computation (HF modeling_beit), self-contained."""

    def __init__(self):
        super().__init__()
        grid = (IMAGE // PATCH, IMAGE // PATCH)
        self.patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.blocks = nn.ModuleList(
            [Block(DROP_PATH * i / (LAYERS - 1), grid) for i in range(LAYERS)]
        )
        self.layernorm = nn.LayerNorm(DIM, eps=1e-12)
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, pixel_values, bool_masked_pos, labels):
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        w = bool_masked_pos.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token.expand(b, n, -1) * w
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        scores = self.lm_head(self.layernorm(x[:, 1:]))
        return F.cross_entropy(scores[bool_masked_pos].float(), labels)


def make_model(dev):
    try:
        from transformers import BeitConfig, BeitForMaskedImageModeling

        import transformers

        kw = dict(vocab_size=VOCAB, use_mask_token=True, use_relative_position_bias=True,
                  use_shared_relative_position_bias=False, layer_scale_init_value=LAYER_SCALE,
                  drop_path_rate=DROP_PATH, use_mean_pooling=True)
        try:
            model = BeitForMaskedImageModeling(BeitConfig(attn_implementation="sdpa", **kw))
        except Exception:  # a transformers without SDPA for BEiT
            model = BeitForMaskedImageModeling(BeitConfig(**kw))
        impl = "hf-" + str(getattr(model.config, "_attn_implementation", "eager"))

        def loss(m, px, mask, labels):
            return m(pixel_values=px, bool_masked_pos=mask, labels=labels).loss

        return model.to(dev), loss, f"{impl} transformers {transformers.__version__}"
    except ImportError:
        model = MimBeit().to(dev)
        return model, (lambda m, px, mask, labels: m(px, mask, labels)), "self-contained MimBeit (no transformers)"


def batch(dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    px = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g)
    n = (IMAGE // PATCH) ** 2
    mask = torch.zeros(BATCH, n, dtype=torch.bool)
    for i in range(BATCH):
        mask[i, torch.randperm(n, generator=g)[:MASKED]] = True
    labels = torch.randint(0, VOCAB, (BATCH * MASKED,), generator=g)
    return px.to(dev), mask.to(dev), labels.to(dev)


def step_bench(compile_it):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model, loss_fn, impl = make_model(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                            fused=True)
    fwd = torch.compile(model) if compile_it else model
    data = [batch(dev, 0), batch(dev, 1)]

    def step(i):
        px, mask, labels = data[i % 2]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(fwd, px, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first = step(0).item()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for i in range(1, 4):
        step(i)
    torch.cuda.synchronize()
    timed = 10
    t0 = time.perf_counter()
    for i in range(timed):
        last = step(i)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / timed
    params = sum(p.numel() for p in model.parameters())
    return {"kind": "pretrain_step", "impl": "torch-compile" if compile_it else "torch-eager", "model": impl,
            "batch": BATCH, "masked_per_image": MASKED, "vocab": VOCAB, "precision": "bf16 autocast",
            "step_ms": sec * 1e3, "images_per_s": BATCH / sec, "first_step_s": first_s,
            "compile_s": first_s if compile_it else None, "timed_steps": timed, "warmup_steps": 4,
            "first_loss": first, "last_loss": last.item(), "params": params, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0)}


def timed(fn, budget):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    iters = min(max(int(budget / once), 5), 2000)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def attention_bench():
    dev = torch.device("cuda")
    b, h, n, d = 64, 12, 197, 64
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dev, torch.bfloat16).requires_grad_() for _ in range(3))
    bias = (0.5 * torch.randn(1, h, n, n, generator=g)).to(dev, torch.bfloat16).requires_grad_()
    dout = torch.randn(b, h, n, d, generator=g).to(dev, torch.bfloat16)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def both():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(b, h, n, n))
        torch.autograd.grad(out, (q, k, v, bias), dout)

    f, fb = timed(fwd, 0.3), timed(both, 0.5)
    unit = b * h * n * n * d
    return {"kind": "attention", "impl": "torch-sdpa", "batch": b, "heads": h, "tokens": n, "head_dim": d,
            "rel_pos_bias": True, "dtype": "bf16", "fwd_ms": f * 1e3, "fwd_bwd_ms": fb * 1e3,
            "fwd_tflops": 4 * unit / f / 1e12, "fwd_bwd_tflops": 14 * unit / fb / 1e12, "torch": torch.__version__}


def gemm_peak():
    dev = torch.device("cuda")
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    bt = torch.randn(n, n, device=dev, dtype=torch.bfloat16).t()
    sec = timed(lambda: torch.matmul(a, bt), 0.5)
    return {"kind": "gemm_peak", "impl": "torch", "m": n, "n": n, "k": n, "dtype": "bf16", "ms": sec * 1e3,
            "tflops": 2 * n ** 3 / sec / 1e12}


def main():
    mode, out = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None
    rec = {"step-eager": lambda: step_bench(False), "step-compile": lambda: step_bench(True),
           "attention": attention_bench, "gemm-peak": gemm_peak}[mode]()
    line = json.dumps(rec)
    print(line)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
