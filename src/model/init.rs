//! Random initialisation of a fresh model, BEiT's scheme (unilm): weights from a normal of std
//! `initializer_range` truncated (at ±std for pretraining, ±2 for fine-tuning models), biases
//! and position bias tables zero, layer norms 1/0,
//! layer scale at `layer_scale_init_value`, block l's output projections divided by √(2l), and a
//! new classifier 1000x smaller. Seeded: the same seed gives the same model on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::params::{Init, ParamStore};

pub fn initialise(store: &mut ParamStore, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for i in 0..store.specs.len() {
        let spec = store.specs[i].clone();
        let values = &mut store.data[spec.offset..spec.offset + spec.len];
        match spec.init {
            Init::Zeros => values.fill(0.0),
            Init::Ones => values.fill(1.0),
            Init::Constant(c) => values.fill(c),
            Init::TruncNormal { std, scale, bound } => {
                let normal = Normal::new(0.0f32, 1.0).expect("unit normal");
                let cut = bound / std;
                for v in values.iter_mut() {
                    // Rejection sampling of N(0,1) on [-cut, cut] (a ±std cut accepts 68% of
                    // draws, a ±2 cut at std 0.02 all of them).
                    let z = loop {
                        let z: f32 = normal.sample(&mut rng);
                        if z.abs() <= cut {
                            break z;
                        }
                    };
                    *v = z * std * scale;
                }
            }
            Init::Normal { std } => {
                let normal = Normal::new(0.0f32, std).expect("finite std");
                for v in values.iter_mut() {
                    *v = normal.sample(&mut rng);
                }
            }
        }
        // Keep the stream position independent of whether an entry used randomness, so adding
        // a zero-initialised entry does not reshuffle every later weight.
        let _: u64 = rng.random();
    }
}
