#!/usr/bin/env python3
"""Reference trajectory of torch.optim.AdamW for tests/adamw.rs.

Run: ~/torchref/bin/python scripts/gen_adamw_reference.py  (writes tests/reference/adamw.safetensors)
Two parameter groups as BEiT builds them: one with weight decay, one without. Five steps with
given gradients; the parameters after every step are recorded.
"""
import os

import torch
from safetensors.torch import save_file

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
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference", "adamw.safetensors")
save_file({
    "start": start, "grads": torch.stack(grads), "after": torch.stack(after),
    "decay_mask": torch.cat([torch.ones(P_DECAY), torch.zeros(P_NO_DECAY)]),
    "hyper": torch.tensor([LR, WD, BETAS[0], BETAS[1], EPS], dtype=torch.float64),
}, out)
print("wrote", out)
