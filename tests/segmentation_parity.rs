//! BeitForSemanticSegmentation against Hugging Face (tests/reference_segmentation, made by
//! scripts/gen_segmentation_reference.py): eval-mode logits within 1e-4, the train-mode loss,
//! every parameter gradient within 1e-4 of its norm, and the BatchNorm running statistics after
//! one training forward; plus a save/load round trip that writes HF's keys and dtypes.

use std::path::{Path, PathBuf};

use beit::model::io::{read_f32, read_i64, SafetensorsFile};
use beit::model::segmentation::layout::is_buffer;
use beit::model::segmentation::SegBatch;
use beit::model::TrainWorkspace;
use beit::{Architecture, ImageBatch, Model};

const CASES: [&str; 3] = ["aux_concat_32", "noaux_abs_48", "aux_default_40"];

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_segmentation").join(name)
}

struct Inputs {
    shape: Vec<usize>,
    pixels: Vec<f32>,
    labels: Vec<i64>,
}

fn inputs(dir: &Path) -> Inputs {
    let file = SafetensorsFile::open(&dir.join("inputs.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (shape, pixels) = read_f32(&st, "pixel_values").unwrap().unwrap();
    let (_, labels) = read_i64(&st, "labels").unwrap().unwrap();
    Inputs { shape, pixels, labels }
}

fn logits_of(model: &Model, inp: &Inputs) -> Vec<f32> {
    let s = &inp.shape;
    let batch = ImageBatch {
        pixels: &inp.pixels,
        batch: s[0],
        channels: s[1],
        height: s[2],
        width: s[3],
        bool_masked_pos: None,
    };
    model.forward(&batch).unwrap().logits.unwrap().data
}

#[test]
fn eval_logits_match_transformers() {
    for name in CASES {
        let dir = case_dir(name);
        let model = Model::load(&dir).unwrap();
        assert_eq!(model.architecture(), Architecture::SemanticSegmentation);
        let inp = inputs(&dir);
        let file = SafetensorsFile::open(&dir.join("outputs.safetensors")).unwrap();
        let st = file.parse().unwrap();
        let (shape, want) = read_f32(&st, "logits").unwrap().unwrap();
        let s = &inp.shape;
        assert_eq!(model.output_shapes(s[0], s[2], s[3]).logits.unwrap(), shape, "{name}: logits shape");
        let got = logits_of(&model, &inp);
        let worst = got.iter().zip(&want).map(|(&a, &b)| (a - b).abs()).fold(0.0f32, f32::max);
        let scale = want.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        eprintln!("{name}: logits {shape:?}, max |ours - HF| {worst:.2e} (max |logit| {scale:.2})");
        assert!(worst <= 1e-4, "{name}: logits differ from HF by {worst:e}");
    }
}

#[test]
fn eval_logits_depend_on_running_statistics() {
    // Guards the test above: resetting the running statistics must move the logits far more
    // than the tolerance, so they cannot have been ignored.
    let dir = case_dir("aux_concat_32");
    let mut model = Model::load(&dir).unwrap();
    let inp = inputs(&dir);
    let before = logits_of(&model, &inp);
    let names: Vec<String> = model.params().specs.iter().map(|s| s.name.clone()).collect();
    for name in names.iter().filter(|n| n.ends_with("running_mean")) {
        let id = model.params().find(name).unwrap();
        model.params_mut().get_mut(id).fill(0.0);
    }
    let after = logits_of(&model, &inp);
    let moved = before.iter().zip(&after).map(|(&a, &b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-2, "running means barely matter ({moved:e})");
}

#[test]
fn training_loss_gradients_and_running_stats_match_transformers() {
    for name in CASES {
        let dir = case_dir(name);
        let mut model = Model::load(&dir).unwrap();
        let inp = inputs(&dir);
        let s = &inp.shape;
        let batch = SegBatch {
            pixels: &inp.pixels,
            batch: s[0],
            channels: s[1],
            height: s[2],
            width: s[3],
            labels: &inp.labels,
        };
        let mut grads = vec![0.0f32; model.params().data.len()];
        let mut ws = TrainWorkspace::new();
        let start = std::time::Instant::now();
        let step = model.segmentation_forward_backward(&mut ws, &batch, None, &mut grads).unwrap();
        let elapsed = start.elapsed().as_secs_f64();

        let file = SafetensorsFile::open(&dir.join("train.safetensors")).unwrap();
        let st = file.parse().unwrap();
        let (_, ref_loss) = read_f32(&st, "loss").unwrap().unwrap();
        assert!((step.loss - ref_loss[0] as f64).abs() < 1e-5, "{name}: loss {} vs HF {}", step.loss, ref_loss[0]);

        let mut worst = (0.0f64, String::new());
        let mut checked = 0;
        let mut zero_by_bn = Vec::new();
        for spec in model.params().specs.iter().filter(|s| s.exported && !is_buffer(&s.name)) {
            let key = format!("grad.{}", spec.name);
            let (_, want) = read_f32(&st, &key).unwrap().unwrap_or_else(|| panic!("{name}: no {key}"));
            let got = &grads[spec.offset..spec.offset + spec.len];
            let norm = want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let diff = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max);
            if ["fpn1.0.bias", "fpn1.3.bias", "fpn2.0.bias"].contains(&spec.name.as_str()) {
                // Biases whose every path runs into a training-mode BatchNorm (fpn1.0, and fpn1.3 /
                // fpn2.0 through the 1x1 lateral convolutions) shift each channel by a constant
                // that the batch mean removes again: their true gradient is 0 and both sides hold
                // rounding noise only.
                let ours = got.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert!(
                    ours <= 1e-6 && norm <= 1e-6,
                    "{name}: {} gradient {ours:e} should be ~0 (HF norm {norm:e})",
                    spec.name
                );
                zero_by_bn.push(spec.name.clone());
            } else if norm == 0.0 {
                // Parameters that feed nothing (an unused last block, beit.layernorm).
                assert!(diff == 0.0, "{name}: {} should have no gradient, max {diff:e}", spec.name);
            } else {
                let rel = diff / norm;
                assert!(
                    rel <= 1e-4,
                    "{name}: {} max |ours - HF| {diff:.3e} = {rel:.2e} of its norm {norm:.3e}",
                    spec.name
                );
                if rel > worst.0 {
                    worst = (rel, spec.name.clone());
                }
            }
            checked += 1;
        }
        // BatchNorm buffers never receive gradient.
        for spec in model.params().specs.iter().filter(|s| is_buffer(&s.name)) {
            assert!(grads[spec.offset..spec.offset + spec.len].iter().all(|&g| g == 0.0), "{}", spec.name);
        }

        // PyTorch BatchNorm2d's default momentum.
        model.apply_batchnorm_statistics(&step.batchnorm, 0.1);
        let mut buffers = 0;
        for spec in model.params().specs.iter().filter(|s| is_buffer(&s.name)) {
            let key = format!("after.{}", spec.name);
            let got = &model.params().data[spec.offset..spec.offset + spec.len];
            if spec.name.ends_with("num_batches_tracked") {
                let (_, want) = read_i64(&st, &key).unwrap().unwrap();
                assert_eq!(got[0] as i64, want[0], "{name}: {key}");
            } else {
                let (_, want) = read_f32(&st, &key).unwrap().unwrap();
                let diff = got.iter().zip(&want).map(|(&a, &b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(diff <= 1e-5, "{name}: {key} differs by {diff:e}");
            }
            buffers += 1;
        }
        let reference_keys = st.names().len() - 1;
        assert_eq!(checked + buffers, reference_keys, "{name}: every reference tensor compared");
        eprintln!(
            "{name}: loss {:.7} (HF {:.7}); {checked} gradients, worst {:.2e} of its norm ({}); {buffers} \
             BatchNorm buffers; pass {elapsed:.3} s; zero through BatchNorm: {zero_by_bn:?}",
            step.loss, ref_loss[0], worst.0, worst.1
        );
    }
}

#[test]
fn save_writes_transformers_keys_and_dtypes() {
    let dir = case_dir("aux_concat_32");
    let model = Model::load(&dir).unwrap();
    let out = std::env::temp_dir().join(format!("beit-seg-save-{}", std::process::id()));
    model.save(&out).unwrap();
    let ours = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    let hf = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let (ours_st, hf_st) = (ours.parse().unwrap(), hf.parse().unwrap());
    let mut a: Vec<String> = ours_st.names().into_iter().map(String::from).collect();
    let mut b: Vec<String> = hf_st.names().into_iter().map(String::from).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "saved keys differ from save_pretrained's");
    for key in &b {
        let (x, y) = (ours_st.tensor(key).unwrap(), hf_st.tensor(key).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{key}");
        assert_eq!(x.data(), y.data(), "{key}: values");
    }
    let back = Model::load(&out).unwrap();
    let inp = inputs(&dir);
    assert_eq!(logits_of(&back, &inp), logits_of(&model, &inp));
    std::fs::remove_dir_all(&out).unwrap();
}
