//! A fresh model follows BEiT's initialisation (hand-derived statistics), and configs that
//! cannot describe a model are refused with a message that names the problem.

use beit::{Architecture, BeitConfig, Error, Model};

fn tiny_config(extra: &str) -> BeitConfig {
    let json = format!(
        r#"{{"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 256,
            "image_size": 32, "patch_size": 8, "vocab_size": 512, "use_shared_relative_position_bias": true,
            "layer_scale_init_value": 0.1 {extra}}}"#
    );
    BeitConfig::from_json_str(&json).unwrap()
}

fn values<'a>(m: &'a Model, name: &str) -> &'a [f32] {
    let id = m.params().find(name).unwrap_or_else(|| panic!("no parameter {name}"));
    m.params().get(id)
}

fn std_dev(v: &[f32]) -> f64 {
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

/// Standard deviation of N(0, 1) truncated to [-1, 1]: sqrt(1 - 2·φ(1) / (Φ(1) - Φ(-1))).
fn truncated_unit_std() -> f64 {
    let phi1 = (-0.5f64).exp() / (2.0 * std::f64::consts::PI).sqrt();
    let mass = 0.682_689_492_137_086; // Φ(1) − Φ(−1)
    (1.0 - 2.0 * phi1 / mass).sqrt()
}

#[test]
fn fresh_model_follows_beit_init() {
    let m = Model::new_random(tiny_config(""), Architecture::MaskedImageModeling, 7).unwrap();
    let std = 0.02 * truncated_unit_std();
    let q = values(&m, "beit.encoder.layer.0.attention.attention.query.weight");
    assert!(q.iter().all(|v| v.abs() <= 0.02), "truncated at ±std");
    assert!((std_dev(q) / std - 1.0).abs() < 0.05, "std {} vs {std}", std_dev(q));
    // Output projections of block l (1-based) are divided by sqrt(2l).
    for l in 0..3 {
        let scale = 1.0 / (2.0 * (l + 1) as f64).sqrt();
        for name in [
            format!("beit.encoder.layer.{l}.attention.output.dense.weight"),
            format!("beit.encoder.layer.{l}.output.dense.weight"),
        ] {
            let s = std_dev(values(&m, &name));
            assert!((s / (std * scale) - 1.0).abs() < 0.06, "{name}: std {s} vs {}", std * scale);
        }
    }
    assert!(values(&m, "beit.encoder.layer.1.lambda_1").iter().all(|&v| v == 0.1));
    assert!(values(&m, "beit.encoder.layer.2.layernorm_after.weight").iter().all(|&v| v == 1.0));
    assert!(values(&m, "beit.encoder.layer.2.layernorm_after.bias").iter().all(|&v| v == 0.0));
    assert!(values(&m, "beit.encoder.layer.0.attention.attention.query.bias").iter().all(|&v| v == 0.0));
    assert!(values(&m, "beit.encoder.relative_position_bias.relative_position_bias_table").iter().all(|&v| v == 0.0));
    assert!(values(&m, "beit.embeddings.mask_token").iter().any(|&v| v != 0.0));
    // Same seed, same model; another seed, another model.
    let again = Model::new_random(tiny_config(""), Architecture::MaskedImageModeling, 7).unwrap();
    assert_eq!(m.params().data, again.params().data);
    let other = Model::new_random(tiny_config(""), Architecture::MaskedImageModeling, 8).unwrap();
    assert_ne!(m.params().data, other.params().data);
}

#[test]
fn fresh_classifier_follows_the_finetuning_init() {
    // unilm's fine-tuning model cuts its normal at ±2 (timm's trunc_normal_ default), which at
    // std 0.02 is no cut: the weights have std 0.02, not the pretraining model's 0.54·0.02.
    let m = Model::new_random(tiny_config(r#", "num_labels": 10"#), Architecture::ImageClassification, 1).unwrap();
    let q = values(&m, "beit.encoder.layer.0.attention.attention.query.weight");
    assert!((std_dev(q) / 0.02 - 1.0).abs() < 0.05, "std {} vs 0.02", std_dev(q));
    assert!(q.iter().any(|v| v.abs() > 0.03), "not cut at ±std");
    let fc2 = values(&m, "beit.encoder.layer.1.output.dense.weight");
    assert!((std_dev(fc2) / (0.02 / 2.0) - 1.0).abs() < 0.05, "fc2 of block 2 divided by sqrt(4)");
    // The head starts 1000x smaller (init_scale 0.001).
    let w = values(&m, "classifier.weight");
    assert_eq!(w.len(), 10 * 64);
    let s = std_dev(w);
    let want = 0.02 * 0.001;
    assert!((s / want - 1.0).abs() < 0.15, "classifier std {s} vs {want}");
}

#[test]
fn parameter_count_of_beit_base_matches_hf() {
    // BEiT-B/16 224 classification with per-layer relative position bias: 86,530,984 (BEIT_SPEC §5).
    let cfg = BeitConfig::from_json_str(r#"{"use_relative_position_bias": true, "num_labels": 1000}"#).unwrap();
    let m = Model::new_random(cfg, Architecture::ImageClassification, 0).unwrap();
    assert_eq!(m.params().count(), 86_530_984);
}

#[test]
fn bad_configs_are_refused_with_a_reason() {
    let cases = [
        (r#"{"hidden_size": 30, "num_attention_heads": 4}"#, "not a multiple"),
        (r#"{"num_attention_heads": 0}"#, "num_attention_heads must be between 1 and 768, got 0"),
        (r#"{"vocab_size": 4000000000}"#, "vocab_size must be between 1 and 16777216"),
        (r#"{"num_hidden_layers": 100000}"#, "num_hidden_layers must be between 1 and 1024"),
        (r#"{"initializer_range": -1}"#, "initializer_range must be in (0, 1]"),
        (r#"{"initializer_range": 0}"#, "initializer_range must be in (0, 1]"),
        (r#"{"initializer_range": 1e30}"#, "initializer_range must be in (0, 1]"),
        (r#"{"drop_path_rate": 1.5}"#, "drop_path_rate must be in [0, 1)"),
        (r#"{"image_size": 100000}"#, "image_size (height) must be between 1 and 65536"),
        (r#"{"num_labels": 1000000000}"#, "num_labels must be at most"),
        (r#"{"patch_size": 64, "image_size": 32}"#, "does not fit"),
        (r#"{"hidden_act": "relu"}"#, "hidden_act"),
        (r#"{"layer_norm_eps": -1.0}"#, "layer_norm_eps"),
        (r#"{"hidden_size": "big"}"#, "not a valid BEiT config"),
        ("not json", "not a valid BEiT config"),
    ];
    for (json, needle) in cases {
        let err = BeitConfig::from_json_str(json).expect_err(json);
        assert!(err.to_string().contains(needle), "{json}: {err}");
        assert!(matches!(err, Error::Config(_) | Error::Format(_) | Error::Unsupported(_)), "{json}: {err:?}");
    }
}

#[test]
fn parameters_beyond_the_memory_budget_are_refused_before_allocation() {
    use beit::resources::{with_budget, MemoryBudget};
    // BEiT-base MIM: 91,966,208 parameters (the unexported zero key biases included) = 351 MiB of f32.
    let cfg = BeitConfig::from_json_str(r#"{"use_mask_token": true}"#).unwrap();
    let err = with_budget(MemoryBudget::Bytes(64 << 20), || {
        Model::new_random(cfg.clone(), Architecture::MaskedImageModeling, 0).unwrap_err()
    });
    let Error::Config(m) = &err else { panic!("{err:?}") };
    assert!(m.contains("parameters of this BeitForMaskedImageModeling config would need 351 MiB"), "{m}");
    assert!(m.contains("memory budget set for this context (64.0 MiB)"), "{m}");
    // The same config fits a budget of its size.
    with_budget(MemoryBudget::Bytes(400 << 20), || Model::new_random(cfg, Architecture::MaskedImageModeling, 0))
        .unwrap();
    // A config whose parameters overflow any arithmetic is refused, not wrapped around.
    let huge = BeitConfig::from_json_str(
        r#"{"vocab_size": 16777216, "hidden_size": 65536, "num_attention_heads": 1, "intermediate_size": 65536,
            "num_hidden_layers": 1024, "image_size": 65536, "patch_size": 1, "use_relative_position_bias": true}"#,
    )
    .unwrap();
    let err = Model::new_random(huge, Architecture::MaskedImageModeling, 0).unwrap_err();
    assert!(matches!(err, Error::Config(_)) && err.to_string().contains("would need"), "{err}");
}
