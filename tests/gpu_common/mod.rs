//! Helpers shared by the GPU tests (`tests/cuda_*.rs`) that compare a GPU pass with the CPU's:
//! deterministic inputs and the error measures their tolerances are stated in.
#![allow(dead_code)] // each test file uses some of them

use beit::Model;

/// `n` values in [-1, 1) from a xorshift stream seeded by `seed` (the same on every machine).
pub fn pixels(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// max |got − want| / max |want|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    // NaN would slip through the max below: every output must be written and finite.
    assert!(got.iter().all(|v| v.is_finite()), "a non-finite output");
    let scale = want.iter().fold(f32::MIN_POSITIVE, |m, v| m.max(v.abs()));
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
}

/// The parameter whose GPU gradient is furthest from the CPU's, as max |gpu − cpu| over the
/// CPU gradient's norm, skipping `exempt` (parameters checked otherwise). A parameter whose CPU
/// gradient is exactly zero must get exactly zero on the GPU; every GPU gradient is finite.
pub fn worst_gradient(model: &Model, cpu: &[f32], gpu: &[f32], what: &str, exempt: &[&str]) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for s in model.params().specs.iter().filter(|s| !exempt.contains(&s.name.as_str())) {
        let (c, g) = (&cpu[s.offset..s.offset + s.len], &gpu[s.offset..s.offset + s.len]);
        assert!(g.iter().all(|v| v.is_finite()), "{what}: {} has a non-finite GPU gradient", s.name);
        let norm = c.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let diff = c.iter().zip(g).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max);
        if norm == 0.0 {
            assert_eq!(diff, 0.0, "{what}: {} has a zero CPU gradient but the GPU's differs", s.name);
            continue;
        }
        if diff / norm > worst.0 {
            worst = (diff / norm, s.name.clone());
        }
    }
    worst
}
