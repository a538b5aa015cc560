//! AdamW equals torch.optim.AdamW step for step (reference trajectories from
//! scripts/gen_adamw_reference.py: plain, and with layer-wise lr scales, a changing lr and tiny
//! gradients), and BEiT's weight-decay rule picks the right tensors.

use beit::model::io::{read_f32, SafetensorsFile};
use beit::train::adamw::{decays, AdamW, AdamWConfig};
use beit::{Architecture, BeitConfig, Model};

#[test]
fn five_steps_equal_torch_adamw() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/adamw.safetensors");
    let file = SafetensorsFile::open(std::path::Path::new(path)).unwrap();
    let st = file.parse().unwrap();
    let get = |n: &str| read_f32(&st, n).unwrap().unwrap();
    let (_, mut params) = get("start");
    let (gshape, grads) = get("grads");
    let (_, after) = get("after");
    let (_, mask) = get("decay_mask");
    let (_, h) = get("hyper");
    let n = params.len();
    let config = AdamWConfig { weight_decay: h[1], beta1: h[2], beta2: h[3], eps: h[4] };
    let mut opt = AdamW::with_mask(config, mask, vec![(0, n)]);
    for step in 0..gshape[0] {
        opt.step(&mut params, &grads[step * n..(step + 1) * n], h[0], None);
        for (i, (&a, &b)) in params.iter().zip(&after[step * n..(step + 1) * n]).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "step {step}, element {i}: {a} vs torch {b}");
        }
    }
    // Decay made a difference: the decayed group would differ without it.
    assert!(h[1] > 0.0);
}

/// BEiT fine-tuning's optimizer: per-element lr scales (layer-wise decay: `step`'s `lr_scale`)
/// with decay on and off at every scale, an lr that changes every step, and half the gradients
/// between 1e-9 and 1e-6, where sqrt(v̂) is of the order of eps = 1e-8 and eps decides the update.
/// Without eps, or without the scales, torch's parameters move by thousands of tolerances (the
/// script checks that).
#[test]
fn lr_scales_changing_lr_and_tiny_gradients_equal_torch_adamw() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/adamw_lr_scale.safetensors");
    let file = SafetensorsFile::open(std::path::Path::new(path)).unwrap();
    let st = file.parse().unwrap();
    let get = |n: &str| read_f32(&st, n).unwrap().unwrap_or_else(|| panic!("no tensor {n}"));
    let (_, mut params) = get("start");
    let (gshape, grads) = get("grads");
    let (_, after) = get("after");
    let (_, lrs) = get("lrs");
    let (_, lr_scale) = get("lr_scale");
    let (_, mask) = get("decay_mask");
    let (_, h) = get("hyper");
    let n = params.len();
    assert_eq!(gshape, [lrs.len(), n]);
    // What the reference must keep exercising: gradients where eps matters, scales other than 1
    // on decayed and undecayed entries.
    assert!(grads.iter().any(|&g| g != 0.0 && g.abs() <= 1e-8), "no gradient of the order of eps");
    for decays in [0.0, 1.0] {
        assert!(lr_scale.iter().zip(&mask).any(|(&s, &m)| m == decays && s < 0.5), "decay {decays}: no small scale");
    }
    let config = AdamWConfig { weight_decay: h[0], beta1: h[1], beta2: h[2], eps: h[3] };
    let mut opt = AdamW::with_mask(config, mask, vec![(0, n)]);
    let mut worst = 0.0f32;
    for (step, &lr) in lrs.iter().enumerate() {
        opt.step(&mut params, &grads[step * n..(step + 1) * n], lr, Some(&lr_scale));
        for (i, (&a, &b)) in params.iter().zip(&after[step * n..(step + 1) * n]).enumerate() {
            worst = worst.max((a - b).abs() / (1e-6 * b.abs().max(1.0)));
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "step {step}, element {i} (lr scale {}, gradient {:e}): {a} vs torch {b}",
                lr_scale[i],
                grads[step * n + i]
            );
        }
    }
    eprintln!("{} steps of {n} parameters: worst |ours - torch| = {worst:.3} of the tolerance", lrs.len());
}

#[test]
fn beit_weight_decay_rule() {
    let cfg = BeitConfig::from_json_str(
        r#"{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
            "image_size": 16, "patch_size": 8, "vocab_size": 16, "use_absolute_position_embeddings": true,
            "use_shared_relative_position_bias": true}"#,
    )
    .unwrap();
    let m = Model::new_random(cfg, Architecture::MaskedImageModeling, 0).unwrap();
    let decayed: Vec<&str> =
        m.params().specs.iter().filter(|s| s.exported && decays(&s.name, &s.shape)).map(|s| s.name.as_str()).collect();
    for name in [
        "beit.embeddings.mask_token",
        "beit.encoder.relative_position_bias.relative_position_bias_table",
        "beit.encoder.layer.0.attention.attention.query.weight",
        "beit.embeddings.patch_embeddings.projection.weight",
        "lm_head.weight",
    ] {
        assert!(decayed.contains(&name), "{name} should decay");
    }
    for name in [
        "beit.embeddings.cls_token",
        "beit.embeddings.position_embeddings",
        "beit.encoder.layer.0.lambda_1",
        "beit.encoder.layer.0.layernorm_before.weight",
        "beit.encoder.layer.0.attention.attention.query.bias",
        "lm_head.bias",
    ] {
        assert!(!decayed.contains(&name), "{name} should not decay");
    }
}
