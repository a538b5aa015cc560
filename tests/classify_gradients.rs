//! The classification training pass against PyTorch: loss, logits and every parameter gradient
//! of the five cases in tests/reference_classify_grads (scripts/gen_classify_grad_reference.py,
//! HF BeitForImageClassification, `F.cross_entropy(..., label_smoothing=ε)`), covering mean and
//! CLS pooling, layer scale on and off, shared / per-layer relative position bias / absolute
//! positions, label smoothing 0 and 0.1, and a large layer_norm_eps where it matters.

mod common;
use std::path::{Path, PathBuf};

use beit::model::io::{read_f32, read_i64, SafetensorsFile};
use beit::model::{ClassifyBatch, DataParallelWorkspace, DropPath, TrainWorkspace};
use beit::Model;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference_classify_grads").join(name)
}

struct Case {
    model: Model,
    shape: Vec<usize>,
    pixels: Vec<f32>,
    labels: Vec<i64>,
    smoothing: f32,
}

impl Case {
    fn load(name: &str) -> Case {
        let dir = case_dir(name);
        let model = Model::load(&dir).unwrap();
        let file = SafetensorsFile::open(&dir.join("batch.safetensors")).unwrap();
        let st = file.parse().unwrap();
        let (shape, pixels) = read_f32(&st, "pixel_values").unwrap().unwrap();
        let (_, labels) = read_i64(&st, "labels").unwrap().unwrap();
        let case: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let smoothing = case["label_smoothing"].as_f64().unwrap() as f32;
        Case { model, shape, pixels, labels, smoothing }
    }

    fn batch(&self) -> ClassifyBatch<'_> {
        ClassifyBatch {
            pixels: &self.pixels,
            batch: self.shape[0],
            channels: self.shape[1],
            height: self.shape[2],
            width: self.shape[3],
            labels: &self.labels,
        }
    }

    /// Loss, gradients and logits on a fresh gradient buffer.
    fn run(&self, drop: Option<DropPath<'_>>) -> (f64, Vec<f32>, Vec<f32>) {
        let mut grads = vec![0.0f32; self.model.params().data.len()];
        let mut logits = vec![0.0f32; self.shape[0] * self.model.config().num_labels()];
        let mut ws = TrainWorkspace::new();
        let loss = self
            .model
            .classify_forward_backward(&mut ws, &self.batch(), drop, self.smoothing, &mut grads, Some(&mut logits))
            .unwrap();
        (loss, grads, logits)
    }

    /// Loss and gradients of the pass split data-parallel over a pool of `threads` (what the
    /// trainer runs then).
    fn run_data_parallel(&self, threads: usize) -> (f64, Vec<f32>) {
        let mut grads = vec![0.0f32; self.model.params().data.len()];
        let mut dp = DataParallelWorkspace::new();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let loss = pool
            .install(|| {
                self.model.classify_forward_backward_data_parallel(
                    &mut dp,
                    &self.batch(),
                    None,
                    self.smoothing,
                    &mut grads,
                )
            })
            .unwrap();
        assert_eq!(dp.last_shards(), threads, "the pass did not split");
        (loss, grads)
    }
}

/// The whole-batch pass (with its logits), and the data-parallel one on 2 and 3 threads (3
/// images: shards of 1 and 2, or 1 each), against torch.
fn check_case(name: &str) {
    let case = Case::load(name);
    let (loss, grads, logits) = case.run(None);
    let file = SafetensorsFile::open(&case_dir(name).join("grads.safetensors")).unwrap();
    let st = file.parse().unwrap();
    let (_, ref_loss) = read_f32(&st, "loss").unwrap().unwrap();
    let (_, ref_logits) = read_f32(&st, "logits").unwrap().unwrap();
    let logit_err = logits.iter().zip(&ref_logits).map(|(&a, &b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(logit_err < 1e-4, "{name}: logits differ by {logit_err}");
    assert_eq!(case.shape[0], 3, "{name}: the shard sizes above assume 3 images");
    let passes = [
        ("whole batch", (loss, grads)),
        ("2 threads", case.run_data_parallel(2)),
        ("3 threads", case.run_data_parallel(3)),
    ];
    for (pass, (loss, grads)) in passes {
        assert!((loss - ref_loss[0] as f64).abs() < 1e-5, "{name}, {pass}: loss {loss} vs torch {}", ref_loss[0]);
        let p = case.model.params();
        let (checked, worst_rel, worst_name) = common::check_param_grads(name, p, &grads, &st);
        // Every gradient in the reference was compared (plus `loss` and `logits`).
        assert_eq!(checked, st.names().len() - 2, "{name}: tensors compared");
        eprintln!(
            "{name}, {pass}: loss {loss:.7} (torch {:.7}), logits within {logit_err:.1e}; worst gradient {:.2e} of its norm ({})",
            ref_loss[0], worst_rel, worst_name
        );
    }
}

#[test]
fn gradients_equal_torch_mean_pooling_shared_bias_layer_scale() {
    check_case("mean_shared_scale");
}

#[test]
fn gradients_equal_torch_mean_pooling_per_layer_bias_label_smoothing() {
    check_case("mean_layer_noscale_ls");
}

#[test]
fn gradients_equal_torch_cls_pooling_absolute_positions_label_smoothing() {
    check_case("cls_abs_scale_ls");
}

#[test]
fn gradients_equal_torch_cls_pooling_all_position_kinds_grey() {
    check_case("cls_all_pos_grey");
}

/// layer_norm_eps 1e-2 with per-token variance of the order of eps at every LayerNorm (the
/// blocks' and the mean pooler's): eps 1e-12 at any one of them, or eps outside the square root,
/// moves loss or gradients by thousands of tolerances (the case's case.json).
#[test]
fn gradients_equal_torch_mean_pooling_large_layer_norm_eps() {
    check_case("eps_mean_pool");
}

#[test]
fn deterministic_and_drop_path_of_all_kept_is_identity() {
    let case = Case::load("mean_shared_scale");
    let (l1, g1, _) = case.run(None);
    let (l2, g2, _) = case.run(None);
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1.iter().zip(&g2).all(|(a, b)| a.to_bits() == b.to_bits()));
    // Every branch kept with factor 1: the same numbers as no drop path.
    let layers = case.model.config().num_hidden_layers;
    let ones = vec![1.0f32; layers * 2 * case.shape[0]];
    let (l3, g3, _) = case.run(Some(DropPath { factors: &ones }));
    assert!((l1 - l3).abs() < 1e-7);
    for (a, b) in g1.iter().zip(&g3) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3));
    }
}

#[test]
fn bad_batches_are_errors() {
    let case = Case::load("cls_abs_scale_ls");
    let mut grads = vec![0.0f32; case.model.params().data.len()];
    let mut ws = TrainWorkspace::new();
    let bad_label = vec![5i64; case.shape[0]];
    let batch = ClassifyBatch { labels: &bad_label, ..case.batch() };
    let err = case.model.classify_forward_backward(&mut ws, &batch, None, 0.0, &mut grads, None).unwrap_err();
    assert!(err.to_string().contains("outside [0, num_labels 5)"), "{err}");
    let err = case.model.classify_forward_backward(&mut ws, &case.batch(), None, 1.0, &mut grads, None).unwrap_err();
    assert!(err.to_string().contains("label smoothing"), "{err}");
    assert!(grads.iter().all(|&g| g == 0.0), "an error must leave the gradients untouched");
}
