//! Fine-tuning at another resolution: `Model::with_image_size` resizes the relative position
//! bias tables and absolute position embeddings once, by the rules transformers applies at run
//! time. Checked against transformers' own functions (scripts/gen_resolution_reference.py):
//! each table's bias for the new window, the interpolated position embeddings, and the logits of
//! `model(pixel_values, interpolate_pos_encoding=True)`, for 16→24 (up), 16→24x20 (non-square)
//! and 16→12 (down).

use std::path::{Path, PathBuf};

use beit::model::io::{read_f32, SafetensorsFile};
use beit::model::relpos::{add_bias, relative_position_index};
use beit::{ImageBatch, Model};

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_resolution").join(name)
}

fn max_rel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(&a, &b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max)
}

fn check_case(name: &str) {
    let dir = case_dir(name);
    let original = Model::load(&dir).unwrap();
    let file = SafetensorsFile::open(&dir.join("inputs.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (shape, pixels) = read_f32(&st, "pixel_values").unwrap().unwrap();
    let (h, w) = (shape[2], shape[3]);
    let resized = original.with_image_size(h, w).unwrap();
    assert_eq!(resized.config().image_size.hw(), (h, w));
    let grid = resized.config().native_grid();
    let heads = resized.config().num_attention_heads;

    let file = SafetensorsFile::open(&dir.join("expected.safetensors")).unwrap();
    let expected = file.parse().unwrap();
    let index = relative_position_index(grid);
    let mut worst = 0.0f32;
    let mut tables = 0;
    for key in expected.names() {
        let (_, want) = read_f32(&expected, key).unwrap().unwrap();
        if key.ends_with("relative_position_bias_table") {
            // transformers' bias for the new window; ours: the resized table, gathered.
            let p = resized.params();
            let table = p.get(p.find(key).unwrap());
            let mut bias = vec![0.0f32; heads * index.len()];
            add_bias(&mut bias, table, heads, &index);
            let err = max_rel(&bias, &want);
            assert!(err <= 1e-6, "{name}: {key}: {err:.2e}");
            worst = worst.max(err);
            tables += 1;
        } else if key.ends_with("position_embeddings") {
            let p = resized.params();
            let err = max_rel(p.get(p.find(key).unwrap()), &want);
            assert!(err <= 1e-6, "{name}: {key}: {err:.2e}");
            worst = worst.max(err);
        }
    }
    assert!(tables > 0, "{name}: no table compared");

    let (_, want_logits) = read_f32(&expected, "logits").unwrap().unwrap();
    let input =
        ImageBatch { pixels: &pixels, batch: shape[0], channels: shape[1], height: h, width: w, bool_masked_pos: None };
    let at_new_size = resized.forward(&input).unwrap().logits.unwrap();
    let err = max_rel(&at_new_size.data, &want_logits);
    assert!(err <= 1e-4, "{name}: resized model's logits {:?} vs transformers {want_logits:?}", at_new_size.data);
    // The original run at the new size (run-time resize) agrees as well.
    let runtime = original.forward(&input).unwrap().logits.unwrap();
    let err_runtime = max_rel(&runtime.data, &want_logits);
    assert!(err_runtime <= 1e-4, "{name}: run-time resize {err_runtime:.2e}");
    // And a saved resized directory loads at its new size with the same numbers.
    let tmp = tempfile::tempdir().unwrap();
    resized.save(tmp.path()).unwrap();
    let reloaded = Model::load(tmp.path()).unwrap();
    assert_eq!(reloaded.forward(&input).unwrap().logits.unwrap().data, at_new_size.data);
    eprintln!("{name}: tables/positions within {worst:.1e}, logits within {err:.1e} (run-time path {err_runtime:.1e})");
}

#[test]
fn upscaled_tables_and_logits_equal_transformers() {
    check_case("relpos_up");
}

#[test]
fn non_square_size_with_absolute_positions_equals_transformers() {
    check_case("abs_relpos_rect");
}

#[test]
fn downscaled_absolute_and_shared_tables_equal_transformers() {
    check_case("abs_shared_down");
}
