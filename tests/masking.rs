//! Block-wise masking against the reference algorithm's statistics (10,000 draws each, from
//! scripts/gen_masking_stats.py): mean and spread of the masked count and of the block count,
//! and the count never exceeding the request.

use beit::data::masking::MaskingGenerator;
use rand::SeedableRng;

#[test]
fn statistics_match_the_reference_algorithm() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/masking_stats.json");
    let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = stats["cases"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for case in cases {
        let get = |k: &str| case[k].as_f64().unwrap();
        let (h, w, n) = (get("height") as usize, get("width") as usize, get("num_masking_patches") as usize);
        let g =
            MaskingGenerator { min_num_patches: get("min_num_patches") as usize, ..MaskingGenerator::beit(h, w, n) };
        let draws = get("draws") as usize;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2021);
        let mut mask = vec![0u8; h * w];
        let (mut counts, mut blocks) = (Vec::new(), Vec::new());
        for _ in 0..draws {
            let (c, b) = g.generate(&mut rng, &mut mask);
            assert!(c <= n, "masked {c} > requested {n}");
            counts.push(c as f64);
            blocks.push(b as f64);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let std = |v: &[f64]| {
            let m = mean(v);
            (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        // Means: both are estimates from `draws` samples, so allow 4 standard errors of the
        // difference. Spreads: within 10%.
        for (name, v) in [("count", &counts), ("blocks", &blocks)] {
            let (want_mean, want_std) = (get(&format!("{name}_mean")), get(&format!("{name}_std")));
            let se = (2.0 * want_std * want_std / draws as f64).sqrt();
            let (m, s) = (mean(v), std(v));
            println!(
                "{h}x{w} n={n}: {name} mean {m:.4} (reference {want_mean:.4}), std {s:.4} (reference {want_std:.4})"
            );
            assert!((m - want_mean).abs() <= 4.0 * se + 1e-9, "{h}x{w} n={n} {name} mean {m} vs {want_mean}");
            assert!((s / want_std - 1.0).abs() < 0.10, "{h}x{w} n={n} {name} std {s} vs {want_std}");
        }
        let exact = counts.iter().filter(|&&c| c as usize == n).count() as f64 / draws as f64;
        assert!((exact - get("count_exact_fraction")).abs() < 0.03, "exact fraction {exact}");
    }
}
