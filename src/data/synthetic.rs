//! A synthetic masked-image-modeling task, generated on the fly and reproducible from (seed,
//! batch position): smooth random images (a few random plane waves and a ramp per channel) and,
//! as visual tokens, each patch's quantised mean brightness and dominant direction. Neighbouring
//! patches are correlated, so masked tokens are predictable from context and the loss falls as a
//! model learns. It stands in for a real dataset + tokenizer where none is needed: benchmarks,
//! the resume test, and `beit pretrain --data synthetic`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::batch::OwnedMimBatch;
use crate::data::masking::MaskingGenerator;
use crate::error::Result;
use crate::model::BeitConfig;
use crate::resources::{try_zeroed, Bytes, Need};

#[derive(Debug, Clone)]
pub struct SyntheticMim {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: (usize, usize),
    pub vocab: usize,
    /// Patches masked per image (BEiT's block-wise generator; it may mask slightly fewer).
    pub masked: usize,
    pub seed: u64,
}

impl SyntheticMim {
    /// The task for a model config, masking `masked` patches per image.
    pub fn for_config(config: &BeitConfig, masked: usize, seed: u64) -> Self {
        let (height, width) = config.image_size.hw();
        SyntheticMim {
            channels: config.num_channels,
            height,
            width,
            patch: config.patch_size.hw(),
            vocab: config.vocab_size,
            masked,
            seed,
        }
    }

    fn grid(&self) -> (usize, usize) {
        (self.height / self.patch.0, self.width / self.patch.1)
    }

    /// The memory of one batch of `batch` images: pixels, masks and token labels.
    pub fn batch_bytes(&self, batch: usize) -> Bytes {
        let (gh, gw) = self.grid();
        Bytes::floats(&[batch, self.channels, self.height, self.width])
            + Bytes::of::<u8>(&[batch, gh, gw])
            + Bytes::of::<i64>(&[batch, gh, gw])
    }

    /// Batch number `position` of `batch` images, tested against the memory budget first (the
    /// batch size comes from the user); the same arguments always give the same batch.
    pub fn try_batch(&self, position: u64, batch: usize) -> Result<OwnedMimBatch> {
        ensure!(batch > 0, InvalidArgument, "a batch needs at least one image, got 0");
        Need::new(
            format!("a synthetic batch of {batch} images of {}x{}x{}", self.channels, self.height, self.width),
            self.batch_bytes(batch),
        )
        .hint("use a smaller batch")
        .check()?;
        let pixels = try_zeroed::<f32>(batch * self.channels * self.height * self.width, "a synthetic batch")?;
        Ok(self.fill(position, batch, pixels))
    }

    /// [`SyntheticMim::try_batch`] for sizes known to be small (tests, benchmarks): panics where
    /// `try_batch` would refuse.
    pub fn batch(&self, position: u64, batch: usize) -> OwnedMimBatch {
        self.try_batch(position, batch).expect("a synthetic batch that fits in memory")
    }

    /// Draws the images of batch `position` into `pixels` (zeroed, `[batch, C, H, W]`), then
    /// their tokens and masks.
    fn fill(&self, position: u64, batch: usize, mut pixels: Vec<f32>) -> OwnedMimBatch {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(position);
        let (c, h, w) = (self.channels, self.height, self.width);
        let (gh, gw) = self.grid();
        let n = gh * gw;
        for plane in pixels.chunks_exact_mut(h * w) {
            let waves: Vec<(f32, f32, f32, f32)> = (0..3)
                .map(|_| {
                    let angle = rng.random::<f32>() * std::f32::consts::TAU;
                    let freq = 0.5 + 2.5 * rng.random::<f32>();
                    (
                        angle.cos() * freq,
                        angle.sin() * freq,
                        rng.random::<f32>() * std::f32::consts::TAU,
                        0.5 * rng.random::<f32>(),
                    )
                })
                .collect();
            let ramp = (rng.random::<f32>() - 0.5, rng.random::<f32>() - 0.5);
            for y in 0..h {
                for x in 0..w {
                    let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
                    let mut value = ramp.0 * (2.0 * u - 1.0) + ramp.1 * (2.0 * v - 1.0);
                    for &(fx, fy, phase, amp) in &waves {
                        value += amp * (std::f32::consts::TAU * (fx * u + fy * v) + phase).sin();
                    }
                    plane[y * w + x] = value.clamp(-1.0, 1.0);
                }
            }
        }
        let labels = self.tokens(&pixels, batch);
        let generator = MaskingGenerator::beit(gh, gw, self.masked.min(n));
        let mut bool_masked_pos = vec![0u8; batch * n];
        for mask in bool_masked_pos.chunks_exact_mut(n) {
            generator.generate(&mut rng, mask);
            if !mask.contains(&1) {
                mask[rng.random_range(0..n)] = 1; // every image contributes to the loss
            }
        }
        OwnedMimBatch { shape: [batch, c, h, w], pixels, bool_masked_pos, labels }
    }

    /// The "visual token" of every patch: mean brightness in 16 levels × horizontal and vertical
    /// gradient signs, folded into the vocabulary.
    fn tokens(&self, pixels: &[f32], batch: usize) -> Vec<i64> {
        let (c, h, w) = (self.channels, self.height, self.width);
        let (ph, pw) = self.patch;
        let (gh, gw) = self.grid();
        let mut labels = Vec::with_capacity(batch * gh * gw);
        for img in 0..batch {
            for py in 0..gh {
                for px in 0..gw {
                    let (mut sum, mut dx, mut dy) = (0.0f32, 0.0f32, 0.0f32);
                    for ch in 0..c {
                        let plane = &pixels[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
                        for y in 0..ph {
                            for x in 0..pw {
                                let v = plane[(py * ph + y) * w + px * pw + x];
                                sum += v;
                                dx += if 2 * x < pw { -v } else { v };
                                dy += if 2 * y < ph { -v } else { v };
                            }
                        }
                    }
                    let mean = sum / (c * ph * pw) as f32;
                    let level = (((mean + 1.0) * 8.0) as usize).min(15);
                    let token = level * 4 + (dx > 0.0) as usize * 2 + (dy > 0.0) as usize;
                    labels.push((token % self.vocab) as i64);
                }
            }
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_reproducible_and_distinct() {
        let s = SyntheticMim { channels: 1, height: 16, width: 16, patch: (4, 4), vocab: 64, masked: 6, seed: 3 };
        let a = s.batch(5, 2);
        assert_eq!(a, s.batch(5, 2));
        assert_ne!(a.pixels, s.batch(6, 2).pixels);
        assert_eq!(a.bool_masked_pos.len(), 2 * 16);
        for mask in a.bool_masked_pos.chunks(16) {
            let count = mask.iter().filter(|&&m| m == 1).count();
            assert!((1..=6).contains(&count));
        }
        assert!(a.labels.iter().all(|&l| (0..64).contains(&l)));
        assert!(a.pixels.iter().all(|v| v.abs() <= 1.0));
    }

    #[test]
    fn a_batch_too_large_is_refused_before_allocation() {
        use crate::resources::{with_budget, MemoryBudget};
        let s = SyntheticMim { channels: 3, height: 224, width: 224, patch: (16, 16), vocab: 64, masked: 6, seed: 3 };
        let Err(crate::Error::InvalidArgument(m)) = s.try_batch(0, 1 << 40) else { panic!("accepted") };
        assert!(m.contains("1099511627776 images of 3x224x224") && m.contains("smaller batch"), "{m}");
        let small = with_budget(MemoryBudget::Bytes(1 << 20), || s.try_batch(0, 8));
        assert!(matches!(small, Err(crate::Error::InvalidArgument(_))), "{small:?}");
        assert!(s.try_batch(0, 0).is_err());
        assert_eq!(s.try_batch(2, 2).unwrap(), s.batch(2, 2));
    }
}
