//! BEiT's block-wise masking (unilm `MaskingGenerator`, BEIT_SPEC §6): rectangles of random area
//! and aspect ratio are added until the requested number of patches is masked. A block is kept
//! only if it adds new patches without exceeding the remaining budget, so the count never
//! exceeds the request but can fall short (the reference gives 74.5 of 75 on average).

use rand::Rng;

/// How the pretraining loader picks the patches to mask. BEiT masks blocks; uniformly random
/// patches are the paper's ablation (BEiT Table 4: block-wise masking helps, most on
/// segmentation), kept to reproduce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskingStrategy {
    /// Rectangles of random area and aspect ([`MaskingGenerator::generate`]).
    #[default]
    Blockwise,
    /// `num_masking_patches` distinct patches drawn uniformly ([`MaskingGenerator::generate_random`]).
    Random,
}

impl std::str::FromStr for MaskingStrategy {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s {
            "block" | "blockwise" => Ok(MaskingStrategy::Blockwise),
            "random" => Ok(MaskingStrategy::Random),
            other => Err(crate::error::Error::InvalidArgument(format!(
                "masking {other:?}: expected block (BEiT's block-wise masking) or random"
            ))),
        }
    }
}

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

    /// Fills `mask` with exactly `num_masking_patches` distinct patches drawn uniformly (the
    /// random-masking ablation; the block parameters are not used) and returns that count.
    pub fn generate_random(&self, rng: &mut impl Rng, mask: &mut [u8]) -> usize {
        let n = self.height * self.width;
        assert_eq!(mask.len(), n, "mask length must be height·width");
        mask.fill(0);
        let count = self.num_masking_patches.min(n);
        for i in rand::seq::index::sample(rng, n, count) {
            mask[i] = 1;
        }
        count
    }

    /// One mask by `strategy`; returns the masked count.
    pub fn generate_with(&self, strategy: MaskingStrategy, rng: &mut impl Rng, mask: &mut [u8]) -> usize {
        match strategy {
            MaskingStrategy::Blockwise => self.generate(rng, mask).0,
            MaskingStrategy::Random => self.generate_random(rng, mask),
        }
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

    /// Random masking masks exactly the count, is seeded, and (unlike blocks) leaves masked
    /// patches mostly without masked neighbours: over many draws the chance that a masked
    /// patch's right neighbour is masked is about the masking ratio, far below the blocks' rate.
    #[test]
    fn random_masking_is_exact_uniform_and_unclustered() {
        let g = MaskingGenerator::beit(14, 14, 75);
        let (mut rng, mut m) = (rand_chacha::ChaCha8Rng::seed_from_u64(3), vec![0u8; 196]);
        let neighbour_rate = |strategy: MaskingStrategy, rng: &mut rand_chacha::ChaCha8Rng| {
            let (mut pairs, mut masked) = (0usize, 0usize);
            let mut hits = vec![0usize; 196];
            let mut mask = vec![0u8; 196];
            for _ in 0..400 {
                let count = g.generate_with(strategy, rng, &mut mask);
                assert_eq!(mask.iter().map(|&v| v as usize).sum::<usize>(), count);
                for r in 0..14 {
                    for c in 0..13 {
                        if mask[r * 14 + c] == 1 {
                            masked += 1;
                            pairs += mask[r * 14 + c + 1] as usize;
                        }
                    }
                }
                mask.iter().enumerate().for_each(|(i, &v)| hits[i] += v as usize);
            }
            (pairs as f64 / masked as f64, hits)
        };
        assert_eq!(g.generate_random(&mut rng, &mut m), 75);
        let mut again = vec![0u8; 196];
        g.generate_random(&mut rand_chacha::ChaCha8Rng::seed_from_u64(3), &mut again);
        assert_eq!(m, again);
        let (random_rate, hits) = neighbour_rate(MaskingStrategy::Random, &mut rng);
        let (block_rate, _) = neighbour_rate(MaskingStrategy::Blockwise, &mut rng);
        // Random: P(neighbour masked | masked) = 74/195 = 0.38; blocks keep neighbours together.
        assert!((random_rate - 74.0 / 195.0).abs() < 0.03, "random neighbour rate {random_rate}");
        assert!(block_rate > random_rate + 0.2, "block {block_rate} vs random {random_rate}");
        // Every patch is masked at about the ratio 75/196 (400 draws: 153 ± 10 expected).
        assert!(hits.iter().all(|&h| (100..210).contains(&h)), "{hits:?}");
        assert_eq!("random".parse::<MaskingStrategy>().unwrap(), MaskingStrategy::Random);
        assert_eq!("block".parse::<MaskingStrategy>().unwrap(), MaskingStrategy::Blockwise);
        assert!("stripes".parse::<MaskingStrategy>().is_err());
    }
}
