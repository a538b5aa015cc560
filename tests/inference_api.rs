//! The Rust inference API: input validation, batch independence, and sharing one model across
//! threads.

use std::sync::Arc;

use beit::{Architecture, BeitConfig, Context, ContextOptions, Device, ImageBatch, Model, OutputBuffers};

/// A small model; the backbone gets no mask token (`use_mask_token` false), the MIM model
/// always has one.
fn model(arch: Architecture) -> Model {
    let cfg = BeitConfig::from_json_str(
        r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "image_size": 16, "patch_size": 4, "num_channels": 2, "vocab_size": 40, "num_labels": 3,
            "use_shared_relative_position_bias": true, "use_relative_position_bias": true}"#,
    )
    .unwrap();
    let mut m = Model::new_random(cfg, arch, 3).unwrap();
    // Fresh tables are zero; give the relative position bias something to do.
    for (i, v) in m.params_mut().data.iter_mut().enumerate() {
        *v += ((i * 2654435761usize) % 1000) as f32 * 1e-4 - 0.05;
    }
    m
}

fn pixels(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn ctx() -> Context {
    Context::new(&ContextOptions { device: Device::Cpu, threads: 2, ..Default::default() }).unwrap()
}

#[test]
fn each_image_of_a_batch_is_independent() {
    let m = model(Architecture::MaskedImageModeling);
    let ctx = ctx();
    let px = pixels(3 * 2 * 16 * 16);
    let mask: Vec<u8> = (0..3 * 16).map(|i| (i % 3 == 0) as u8).collect();
    let all = ctx
        .run(|| {
            m.forward(&ImageBatch {
                pixels: &px,
                batch: 3,
                channels: 2,
                height: 16,
                width: 16,
                bool_masked_pos: Some(&mask),
            })
        })
        .unwrap();
    let per = 2 * 16 * 16;
    for i in 0..3 {
        let one = ctx
            .run(|| {
                m.forward(&ImageBatch {
                    pixels: &px[i * per..(i + 1) * per],
                    batch: 1,
                    channels: 2,
                    height: 16,
                    width: 16,
                    bool_masked_pos: Some(&mask[i * 16..(i + 1) * 16]),
                })
            })
            .unwrap();
        let logits = all.logits.as_ref().unwrap();
        let n = logits.data.len() / 3;
        for (a, b) in one.logits.unwrap().data.iter().zip(&logits.data[i * n..(i + 1) * n]) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "image {i}: {a} vs {b}");
        }
    }
}

#[test]
fn masking_changes_only_through_the_mask_token() {
    let m = model(Architecture::MaskedImageModeling);
    let ctx = ctx();
    let px = pixels(2 * 16 * 16);
    let other: Vec<f32> = px.iter().map(|v| -v).collect();
    let all_masked = vec![1u8; 16];
    let run = |p: &[f32]| {
        ctx.run(|| {
            m.forward(&ImageBatch {
                pixels: p,
                batch: 1,
                channels: 2,
                height: 16,
                width: 16,
                bool_masked_pos: Some(&all_masked),
            })
        })
        .unwrap()
    };
    // With every patch masked, the pixels no longer matter.
    assert_eq!(run(&px).logits, run(&other).logits);
}

#[test]
fn bad_inputs_are_errors_that_name_the_problem() {
    let m = model(Architecture::MaskedImageModeling);
    let backbone = model(Architecture::Backbone);
    let px = pixels(2 * 16 * 16);
    let ok = ImageBatch { pixels: &px, batch: 1, channels: 2, height: 16, width: 16, bool_masked_pos: None };
    let bad_mask = [2u8; 16];
    let short_mask = [0u8; 15];
    let cases: Vec<(ImageBatch, &str)> = vec![
        (ImageBatch { channels: 3, ..ok }, "channels"),
        (ImageBatch { height: 8, width: 32, pixels: &px[..2 * 8 * 32 - 1], ..ok }, "pixel_values holds"),
        (ImageBatch { height: 2, width: 2, pixels: &px[..8], ..ok }, "smaller than one"),
        (ImageBatch { batch: 0, ..ok }, "batch"),
        (ImageBatch { bool_masked_pos: Some(&bad_mask), ..ok }, "0 or 1"),
        (ImageBatch { bool_masked_pos: Some(&short_mask), ..ok }, "bool_masked_pos holds 15"),
    ];
    for (input, needle) in cases {
        let err = m.forward(&input).expect_err(needle);
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    let err = backbone.forward(&ImageBatch { bool_masked_pos: Some(&[0u8; 16]), ..ok }).expect_err("no mask token");
    assert!(err.to_string().contains("no mask token"), "{err}");
    let mut small = vec![0.0f32; 3];
    let err = m
        .forward_into(&ok, OutputBuffers { logits: Some(&mut small), ..Default::default() })
        .expect_err("short buffer");
    assert!(err.to_string().contains("logits buffer holds 3"), "{err}");
    let err = backbone
        .forward_into(&ok, OutputBuffers { logits: Some(&mut small), ..Default::default() })
        .expect_err("no logits");
    assert!(err.to_string().contains("no logits"), "{err}");
}

#[test]
fn one_model_serves_many_threads() {
    let m = Arc::new(model(Architecture::ImageClassification));
    let ctx = Arc::new(ctx());
    let px = pixels(2 * 16 * 16);
    let input = ImageBatch { pixels: &px, batch: 1, channels: 2, height: 16, width: 16, bool_masked_pos: None };
    let want = ctx.run(|| m.forward(&input)).unwrap().logits.unwrap();
    let handles: Vec<_> = (0..6)
        .map(|_| {
            let (m, ctx, px) = (m.clone(), ctx.clone(), px.clone());
            std::thread::spawn(move || {
                (0..20)
                    .map(|_| {
                        let input = ImageBatch {
                            pixels: &px,
                            batch: 1,
                            channels: 2,
                            height: 16,
                            width: 16,
                            bool_masked_pos: None,
                        };
                        ctx.run(|| m.forward(&input)).unwrap().logits.unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for got in h.join().unwrap() {
            assert_eq!(got, want);
        }
    }
}
