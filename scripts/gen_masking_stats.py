#!/usr/bin/env python3
"""Statistics of BEiT's block-wise masking, from the reference algorithm (unilm
beit/masking_generator.py, as BEIT_SPEC.md §6 describes it), for tests/masking.rs.

Run: python3 scripts/gen_masking_stats.py   (standard library only; writes
tests/reference/masking_stats.json). Our generator uses another random number generator, so
the test compares distributions (mean and spread of masked count and block count over 10,000
draws), not individual masks.
"""
import json
import math
import os
import random
import statistics

DRAWS = 10_000


class MaskingGenerator:
    """The reference algorithm, written out from its description (Python's own RNG and
    banker's rounding, as the original uses)."""

    def __init__(self, height, width, num_masking_patches, min_num_patches=4, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = height, width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i][j] == 0:
                                mask[i][j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = [[0] * self.width for _ in range(self.height)]
        count, blocks = 0, 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget)
            if delta == 0:
                break
            count += delta
            blocks += 1
        return count, blocks


def main():
    random.seed(20211)
    cases = []
    for (h, w, n, min_block) in [(14, 14, 75, 16), (8, 8, 26, 16), (8, 8, 26, 4), (14, 14, 98, 4)]:
        gen = MaskingGenerator(h, w, n, min_num_patches=min_block)
        draws = [gen() for _ in range(DRAWS)]
        counts = [c for c, _ in draws]
        blocks = [b for _, b in draws]
        cases.append({
            "height": h, "width": w, "num_masking_patches": n, "min_num_patches": min_block,
            "draws": DRAWS,
            "count_mean": statistics.fmean(counts), "count_std": statistics.pstdev(counts),
            "count_min": min(counts), "count_max": max(counts),
            "count_exact_fraction": sum(c == n for c in counts) / DRAWS,
            "blocks_mean": statistics.fmean(blocks), "blocks_std": statistics.pstdev(blocks),
        })
        print(cases[-1])
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference", "masking_stats.json")
    with open(out, "w") as f:
        json.dump({"generator": "scripts/gen_masking_stats.py", "cases": cases}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
