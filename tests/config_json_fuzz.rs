//! The `config_json` fuzz target's checks (fuzz/src/config_json.rs) over deterministic inputs,
//! so that `cargo test` runs them without nightly or libFuzzer: random bytes, and valid configs
//! (one per architecture's needs) with fields set to edge values (zero, negative, each cap and
//! one past it, 2^32, 2^64 - 1, 1e300, wrong types), deleted, or their text mutated. Every
//! config is built as every architecture under a 4 MiB budget: nothing may panic, abort, hang or
//! return an internal error.

#[path = "../fuzz/src/config_json.rs"]
mod config_json;

use serde_json::{json, Value};

#[path = "fuzz_replay/rng.rs"]
mod rng;
use rng::Rng;

/// Valid configs that fit the budget (and BEiT-base's defaults, `{}`, which does not).
fn valid_configs() -> Vec<Value> {
    let tiny = json!({"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 16,
        "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 32,
        "use_mask_token": true, "use_shared_relative_position_bias": true, "layer_scale_init_value": 0.1});
    let with = |overrides: Value| {
        let mut v = tiny.clone();
        for (k, x) in overrides.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    vec![
        tiny.clone(),
        with(json!({"use_shared_relative_position_bias": false, "use_absolute_position_embeddings": true,
            "num_labels": 5, "use_mean_pooling": true})),
        with(json!({"use_shared_relative_position_bias": false, "use_relative_position_bias": true,
            "image_size": [16, 8], "patch_size": [4, 2], "num_channels": 3})),
        with(json!({"use_relative_position_bias": true, "out_indices": [1, 2, 3, 4], "pool_scales": [1, 2],
            "auxiliary_channels": 8, "use_auxiliary_head": true, "num_labels": 3,
            "id2label": {"0": "a", "1": "b", "2": "c"}})),
        with(json!({"architectures": ["BeitForImageClassification"], "num_labels": 2, "layer_scale_init_value": 0.0})),
        json!({}),
    ]
}

const FIELDS: [&str; 32] = [
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "num_labels",
    "initializer_range",
    "layer_norm_eps",
    "layer_scale_init_value",
    "drop_path_rate",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "out_indices",
    "pool_scales",
    "auxiliary_channels",
    "auxiliary_num_convs",
    "auxiliary_loss_weight",
    "id2label",
    "label2id",
    "use_mask_token",
    "use_absolute_position_embeddings",
    "use_relative_position_bias",
    "use_shared_relative_position_bias",
    "use_mean_pooling",
    "architectures",
    "hidden_act",
    "semantic_loss_ignore_index",
    "use_auxiliary_head",
    "auxiliary_concat_input",
];

fn edge_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(-1),
        json!(4096),
        json!(4097),
        json!(65536),
        json!(65537),
        json!(1_048_576),
        json!(1_048_577),
        json!(16_777_216),
        json!(16_777_217),
        json!(4_294_967_296u64),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e300),
        json!(-1e300),
        json!(1e-300),
        json!(0.0),
        json!(-0.02),
        json!(0.5),
        json!(2.5),
        json!("x"),
        Value::Null,
        json!(true),
        json!([]),
        json!([0]),
        json!([1, 2]),
        json!([65536, 65536]),
        json!([1, 65536]),
        json!([u64::MAX, 1]),
        json!([1, 2, 3, 4]),
        json!([0, 1, 2, 3]),
        Value::Array(vec![json!(4096); 16]),
        json!({}),
        json!({"0": "a", "5000000": "b"}),
        json!(["BeitForSemanticSegmentation"]),
        json!(["NotAModel"]),
        json!("gelu_new"),
    ]
}

/// A number's text to splice over another: edge cases the JSON parser itself must handle.
const NUMBER_TEXT: [&str; 12] = [
    "0",
    "-0",
    "1e999",
    "-1e999",
    "18446744073709551616",
    "99999999999999999999999999",
    "1.5",
    "-1",
    "4294967295",
    "65536",
    "1e-400",
    "00",
];

fn mutate(rng: &mut Rng, valid: &[Value], edges: &[Value]) -> Vec<u8> {
    let mut v = rng.pick(valid).clone();
    for _ in 0..1 + rng.below(3) {
        let field = *rng.pick(&FIELDS);
        match rng.below(6) {
            0..=2 => v[field] = rng.pick(edges).clone(),
            3 => {
                if let Some(o) = v.as_object_mut() {
                    o.remove(field);
                }
            }
            // A whole product of caps at once: every size near its largest.
            4 => {
                for (k, x) in [("hidden_size", 65536u64), ("intermediate_size", 65536), ("vocab_size", 16_777_216)] {
                    v[k] = json!(x >> rng.below(8));
                }
            }
            _ => v[field] = json!(rng.next() >> rng.below(64)),
        }
    }
    let mut text = v.to_string().into_bytes();
    // Now and then damage the text too: a number spliced over a digit, a truncation, a byte.
    match rng.below(8) {
        0 => {
            if let Some(at) = (0..text.len()).map(|_| rng.below(text.len())).find(|&i| text[i].is_ascii_digit()) {
                let n = NUMBER_TEXT[rng.below(NUMBER_TEXT.len())].as_bytes();
                text.splice(at..at + 1, n.iter().copied());
            }
        }
        1 => text.truncate(rng.below(text.len() + 1)),
        2 if !text.is_empty() => {
            let at = rng.below(text.len());
            text[at] = rng.next() as u8;
        }
        _ => {}
    }
    text
}

#[test]
fn valid_configs_build_within_the_budget() {
    let ctx = config_json::Context::new();
    for v in valid_configs() {
        config_json::check(v.to_string().as_bytes(), &ctx);
    }
    // The tiny configs really are built (so the mutations below reach model creation).
    let cfg = beit::BeitConfig::from_json_str(&valid_configs()[0].to_string()).unwrap();
    beit::resources::with_budget(beit::resources::MemoryBudget::Bytes(config_json::BUDGET), || {
        beit::Model::new_random(cfg, beit::Architecture::MaskedImageModeling, 0).unwrap();
    });
}

#[test]
fn random_bytes_never_panic() {
    let ctx = config_json::Context::new();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for n in 0..3000 {
        let len = rng.below(200);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Some start like JSON objects, to get past the first byte.
        if n % 2 == 0 && len > 2 {
            data[0] = b'{';
            data[len - 1] = b'}';
        }
        config_json::check(&data, &ctx);
    }
}

#[test]
fn mutated_valid_configs_never_panic() {
    let ctx = config_json::Context::new();
    let (valid, edges) = (valid_configs(), edge_values());
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..2500 {
        let data = mutate(&mut rng, &valid, &edges);
        config_json::check(&data, &ctx);
    }
}
