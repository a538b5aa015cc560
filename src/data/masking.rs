//! BEiT's block-wise masking (unilm `MaskingGenerator`, BEIT_SPEC §6): rectangles of random area
//! and aspect ratio are added until the requested number of patches is masked. A block is kept
//! only if it adds new patches without exceeding the remaining budget, so the count never
//! exceeds the request but can fall short (the reference gives 74.5 of 75 on average).

use rand::Rng;

/// Parameters of the generator; [`MaskingGenerator::beit`] gives BEiT's pretraining defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskingGenerator {
    pub height: usize,
    pub width: usize,
    pub num_masking_patches: usize,
    /// Smallest block area tried (BEiT pretraining: 16; the class default: 4).
    pub min_num_patches: usize,
    /// Largest block area (defaults to `num_masking_patches`).
    pub max_num_patches: usize,
    /// Block aspect ratio h/w is log-uniform in [min_aspect, 1/min_aspect].
    pub min_aspect: f64,
}

impl MaskingGenerator {
    /// BEiT's pretraining setting for a `height` x `width` patch grid: min block 16, aspect
    /// 0.3 to 1/0.3, blocks up to the whole budget.
    pub fn beit(height: usize, width: usize, num_masking_patches: usize) -> Self {
        MaskingGenerator {
            height,
            width,
            num_masking_patches,
            min_num_patches: 16,
            max_num_patches: num_masking_patches,
            min_aspect: 0.3,
        }
    }

    /// Tries up to 10 random blocks and adds the first that covers new patches within
    /// `budget`. Returns how many patches it added (0 if every try failed).
    fn add_block(&self, rng: &mut impl Rng, mask: &mut [u8], budget: usize) -> usize {
        let (lo, hi) = (self.min_aspect.ln(), (1.0 / self.min_aspect).ln());
        for _ in 0..10 {
            // Python's random.uniform(a, b) = a + (b − a)·U[0,1), which also accepts a > b.
            let area =
                self.min_num_patches as f64 + (budget as f64 - self.min_num_patches as f64) * rng.random::<f64>();
            let aspect = (lo + (hi - lo) * rng.random::<f64>()).exp();
            // Python's round() rounds half to even.
            let h = (area * aspect).sqrt().round_ties_even() as usize;
            let w = (area / aspect).sqrt().round_ties_even() as usize;
            if w >= self.width || h >= self.height {
                continue;
            }
            let top = rng.random_range(0..=self.height - h);
            let left = rng.random_range(0..=self.width - w);
            let already: usize = (top..top + h)
                .map(|i| {
                    mask[i * self.width + left..i * self.width + left + w].iter().map(|&m| m as usize).sum::<usize>()
                })
                .sum();
            let new = h * w - already;
            if new > 0 && new <= budget {
                for i in top..top + h {
                    mask[i * self.width + left..i * self.width + left + w].fill(1);
                }
                return new;
            }
        }
        0
    }

    /// Fills `mask` (`height·width`, row-major, 0/1) and returns (masked count, block count).
    pub fn generate(&self, rng: &mut impl Rng, mask: &mut [u8]) -> (usize, usize) {
        assert_eq!(mask.len(), self.height * self.width, "mask length must be height·width");
        mask.fill(0);
        let (mut count, mut blocks) = (0, 0);
        while count < self.num_masking_patches {
            let budget = (self.num_masking_patches - count).min(self.max_num_patches);
            match self.add_block(rng, mask, budget) {
                0 => break,
                added => {
                    count += added;
                    blocks += 1;
                }
            }
        }
        (count, blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mask_agrees_with_its_count_and_is_seeded() {
        let g = MaskingGenerator::beit(14, 14, 75);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut a = vec![0u8; 196];
        let (count, blocks) = g.generate(&mut rng, &mut a);
        assert_eq!(a.iter().map(|&m| m as usize).sum::<usize>(), count);
        assert!(count <= 75 && blocks >= 1);
        let mut b = vec![0u8; 196];
        g.generate(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1), &mut b);
        assert_eq!(a, b);
    }
}
