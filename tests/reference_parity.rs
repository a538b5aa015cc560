//! Hugging Face parity: every case under tests/reference (made by scripts/gen_reference.py with
//! torch + transformers, committed) is loaded, run, and compared to the outputs transformers
//! produced; then saved, reloaded and re-run to show the round trip is bit-exact.

use std::path::{Path, PathBuf};

use beit::model::io::{read_f32, read_mask, SafetensorsFile};
use beit::{Context, ContextOptions, Device, ImageBatch, Model, Outputs};

fn reference_cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/reference exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    cases
}

fn context() -> Context {
    Context::new(&ContextOptions { device: Device::Cpu, threads: 2, ..Default::default() }).unwrap()
}

struct Inputs {
    shape: Vec<usize>,
    pixels: Vec<f32>,
    mask: Option<Vec<u8>>,
}

fn read_inputs(case: &Path) -> Inputs {
    let file = SafetensorsFile::open(&case.join("inputs.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (shape, pixels) = read_f32(&st, "pixel_values").unwrap().expect("pixel_values");
    let mask = read_mask(&st, "bool_masked_pos").unwrap().map(|(_, m)| m);
    Inputs { shape, pixels, mask }
}

fn run(ctx: &Context, model: &Model, inputs: &Inputs) -> Outputs {
    let s = &inputs.shape;
    let batch = ImageBatch {
        pixels: &inputs.pixels,
        batch: s[0],
        channels: s[1],
        height: s[2],
        width: s[3],
        bool_masked_pos: inputs.mask.as_deref(),
    };
    ctx.run(|| model.forward(&batch)).unwrap()
}

/// Largest violation of |a - b| <= 1e-4 · max(1, |b|), as a ratio to the allowed error.
fn worst_ratio(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).abs() / (1e-4 * (b as f64).abs().max(1.0)))
        .fold(0.0, f64::max)
}

#[test]
fn reference_cases_exist() {
    let cases = reference_cases();
    assert!(cases.len() >= 13, "expected the 13 reference cases, found {}", cases.len());
}

#[test]
fn outputs_match_transformers() {
    let ctx = context();
    let mut failures = Vec::new();
    for case in reference_cases() {
        let model = Model::load(&case).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let inputs = read_inputs(&case);
        let out = run(&ctx, &model, &inputs);
        let file = SafetensorsFile::open(&case.join("outputs.safetensors")).unwrap();
        let st = file.parse().unwrap();
        let ours = [
            ("last_hidden_state", Some(&out.last_hidden_state)),
            ("pooler_output", out.pooler_output.as_ref()),
            ("logits", out.logits.as_ref()),
        ];
        let mut compared = 0;
        for (name, tensor) in ours {
            let Some((shape, want)) = read_f32(&st, name).unwrap() else { continue };
            let tensor = tensor.unwrap_or_else(|| panic!("{}: we produce no {name}", case.display()));
            assert_eq!(tensor.shape, shape, "{}: {name} shape", case.display());
            let ratio = worst_ratio(&tensor.data, &want);
            println!(
                "{:<28} {name:<18} worst error / tolerance = {ratio:.4}",
                case.file_name().unwrap().to_string_lossy()
            );
            if ratio > 1.0 {
                failures.push(format!("{} {name}: {ratio:.3}x the tolerance", case.display()));
            }
            compared += 1;
        }
        assert!(compared >= 1, "{}: nothing compared", case.display());
    }
    assert!(failures.is_empty(), "outside tolerance:\n{}", failures.join("\n"));
}

#[test]
fn save_and_reload_round_trip_bit_exact() {
    let ctx = context();
    for case in reference_cases() {
        let model = Model::load(&case).unwrap();
        let inputs = read_inputs(&case);
        let first = run(&ctx, &model, &inputs);

        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        // Every tensor HF wrote comes back with the same name, shape and bits.
        let original = std::fs::read(case.join("model.safetensors")).unwrap();
        let saved = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&original).unwrap(),
            safetensors::SafeTensors::deserialize(&saved).unwrap(),
        );
        let mut names_a: Vec<_> = a.names().into_iter().filter(|n| !n.contains("relative_position_index")).collect();
        let mut names_b: Vec<_> = b.names();
        names_a.sort();
        names_b.sort();
        assert_eq!(names_a, names_b, "{}: tensor names differ after save", case.display());
        for name in names_a {
            let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
            assert_eq!(ta.shape(), tb.shape(), "{name}");
            assert_eq!(ta.data(), tb.data(), "{}: {name} changed in the round trip", case.display());
        }
        // The config keeps every key HF wrote, with the same values.
        let cfg_a: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(case.join("config.json")).unwrap()).unwrap();
        let cfg_b: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        for (k, v) in cfg_a.as_object().unwrap() {
            assert_eq!(cfg_b.get(k), Some(v), "{}: config key {k} changed", case.display());
        }

        let reloaded = Model::load(dir.path()).unwrap();
        let second = run(&ctx, &reloaded, &inputs);
        assert_eq!(first.last_hidden_state, second.last_hidden_state);
        assert_eq!(first.logits, second.logits);
        assert_eq!(first.pooler_output, second.pooler_output);

        let dir2 = tempfile::tempdir().unwrap();
        reloaded.save(dir2.path()).unwrap();
        assert_eq!(saved, std::fs::read(dir2.path().join("model.safetensors")).unwrap());
    }
}
