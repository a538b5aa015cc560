#!/usr/bin/env python3
"""Reference trajectories of torch.optim.AdamW for tests/adamw.rs.

Run: ~/torchref/bin/python scripts/gen_adamw_reference.py
     (writes tests/reference/adamw.safetensors and tests/reference/adamw_lr_scale.safetensors)

adamw.safetensors: two parameter groups as BEiT builds them, one with weight decay, one without.
Five steps with given gradients at one learning rate; the parameters after every step are recorded.

adamw_lr_scale.safetensors: BEiT fine-tuning's groups, one per (layer id, decays) pair as unilm's
layer-wise lr decay builds them: 4 layer ids (embeddings, block 1, block 2, head) with lr scale
DECAY^(3 - id) = 0.421875, 0.5625, 0.75, 1, each with and without weight decay (8 groups of 8
elements). Five steps whose learning rate changes every step (a warmup-then-decay schedule; each
group's lr is the step's lr times its scale, as BEiT's scheduler sets it). Half of every group's
gradients are tiny (|g| from 1e-9 to 1e-6, log-uniform, random sign every step), so the update's
denominator sqrt(v_hat) + eps is of the order of eps = 1e-8 there and dropping or moving eps
changes those updates by O(lr); the other half are N(0, 1) * (0.1 + step).
Stored: start [P], grads [STEPS, P], after [STEPS, P], lrs [STEPS] (the step's base lr),
lr_scale [P] and decay_mask [P] per element, hyper f64 [WD, beta1, beta2, eps].
The script fails unless eps 0 and every lr scale 1 each move some parameter by more than
SENSITIVITY_MIN of tests/adamw.rs's tolerances (it prints how far).
"""
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference")

torch.manual_seed(5)
P_DECAY, P_NO_DECAY, STEPS = 40, 24, 5
LR, WD, BETAS, EPS = 3e-3, 0.05, (0.9, 0.999), 1e-8
decay = torch.nn.Parameter(torch.randn(P_DECAY))
no_decay = torch.nn.Parameter(torch.randn(P_NO_DECAY))
start = torch.cat([decay.detach(), no_decay.detach()]).clone()
opt = torch.optim.AdamW([{"params": [decay], "weight_decay": WD}, {"params": [no_decay], "weight_decay": 0.0}],
                        lr=LR, betas=BETAS, eps=EPS)
grads, after = [], []
for step in range(STEPS):
    g = torch.randn(P_DECAY + P_NO_DECAY) * (0.1 + step)
    grads.append(g)
    decay.grad = g[:P_DECAY].clone()
    no_decay.grad = g[P_DECAY:].clone()
    opt.step()
    after.append(torch.cat([decay.detach(), no_decay.detach()]).clone())
out = os.path.join(OUT, "adamw.safetensors")
save_file({
    "start": start, "grads": torch.stack(grads), "after": torch.stack(after),
    "decay_mask": torch.cat([torch.ones(P_DECAY), torch.zeros(P_NO_DECAY)]),
    "hyper": torch.tensor([LR, WD, BETAS[0], BETAS[1], EPS], dtype=torch.float64),
}, out)
print("wrote", out)

# Layer-wise lr scales, decay on and off, tiny gradients, a changing lr.
DECAY, LAYER_IDS, PER_GROUP = 0.75, 4, 8
LRS = [1e-3, 2e-3, 3e-3, 2.5e-3, 1.5e-3]
SENSITIVITY_MIN = 10.0  # tolerances (tests/adamw.rs: 1e-6 * max(1, |torch|)) each variant must move


def scaled_trajectory(eps=EPS, use_scale=True):
    """The run described above (with another eps, or every lr scale 1, for the sensitivity check)."""
    gen = torch.Generator().manual_seed(6)
    groups = []  # (parameter, lr scale, weight decay)
    for layer_id in range(LAYER_IDS):
        for wd in (WD, 0.0):
            groups.append((torch.nn.Parameter(torch.randn(PER_GROUP, generator=gen)),
                           DECAY ** (LAYER_IDS - 1 - layer_id), wd))
    params = [p for p, _, _ in groups]
    start = torch.cat([p.detach() for p in params]).clone()
    lr_scale = torch.cat([torch.full((PER_GROUP,), s, dtype=torch.float32) for _, s, _ in groups])
    decay_mask = torch.cat([torch.full((PER_GROUP,), 1.0 if wd else 0.0) for _, _, wd in groups])
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": wd, "lr_scale": s if use_scale else 1.0}
                             for p, s, wd in groups], lr=LRS[0], betas=BETAS, eps=eps, foreach=False)
    tiny = torch.arange(len(groups) * PER_GROUP) % 2 == 0  # every other element of every group
    grads, after = [], []
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        normal = torch.randn(len(tiny), generator=gen) * (0.1 + step)
        small = torch.pow(10.0, -9.0 + 3.0 * torch.rand(len(tiny), generator=gen))
        sign = torch.where(torch.rand(len(tiny), generator=gen) < 0.5, -1.0, 1.0)
        g = torch.where(tiny, small * sign, normal)
        grads.append(g)
        for i, p in enumerate(params):
            p.grad = g[i * PER_GROUP:(i + 1) * PER_GROUP].clone()
        opt.step()
        after.append(torch.cat([p.detach() for p in params]).clone())
    return {"start": start, "grads": torch.stack(grads), "after": torch.stack(after),
            "lrs": torch.tensor(LRS, dtype=torch.float64), "lr_scale": lr_scale, "decay_mask": decay_mask,
            "hyper": torch.tensor([WD, BETAS[0], BETAS[1], EPS], dtype=torch.float64)}, tiny


ref, tiny = scaled_trajectory()
grads = ref["grads"]
assert grads[:, tiny].abs().max() <= 1e-6 and grads[:, tiny].abs().min() >= 1e-9
want = ref["after"]
for label, variant in [("eps 0", scaled_trajectory(eps=0.0)[0]), ("every lr scale 1", scaled_trajectory(use_scale=False)[0])]:
    assert torch.equal(variant["grads"], grads)
    moved = ((variant["after"] - want).abs() / (1e-6 * want.abs().clamp(min=1.0))).max().item()
    print(f"{label}: the parameters move by {moved:.3g} tolerances")
    if not moved > SENSITIVITY_MIN:
        raise SystemExit(f"{label} moves the trajectory by only {moved:.3g} tolerances")
out = os.path.join(OUT, "adamw_lr_scale.safetensors")
save_file(ref, out)
print("wrote", out, f"(tiny gradients {grads[:, tiny].abs().min().item():.2g}..{grads[:, tiny].abs().max().item():.2g},"
      f" the others from {grads[:, ~tiny].abs().min().item():.2g})")
