//! Helpers shared by the integration tests that compare with PyTorch reference files.

use beit::model::io::read_f32;
use beit::model::params::ParamStore;
use safetensors::SafeTensors;

/// Compares every exported parameter's gradient (`grads`, laid out like `params`) with the
/// tensor of the same name in the reference file: the largest difference must be within 1e-4
/// of the reference gradient's norm. Returns how many were compared and the worst relative
/// error with its parameter's name.
pub fn check_param_grads(name: &str, params: &ParamStore, grads: &[f32], st: &SafeTensors<'_>) -> (usize, f64, String) {
    let mut checked = 0;
    let mut worst = (0.0f64, String::new());
    for spec in params.specs.iter().filter(|s| s.exported) {
        let (_, want) =
            read_f32(st, &spec.name).unwrap().unwrap_or_else(|| panic!("{name}: no reference for {}", spec.name));
        let got = &grads[spec.offset..spec.offset + spec.len];
        assert_eq!(want.len(), got.len(), "{name}: {}", spec.name);
        let norm = want.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let max_diff = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b as f64).abs()).fold(0.0, f64::max);
        let rel = max_diff / norm;
        assert!(
            rel <= 1e-4,
            "{name}: {} max |ours - torch| = {max_diff:.3e}, {rel:.2e} of its norm {norm:.3e}",
            spec.name
        );
        if rel > worst.0 {
            worst = (rel, spec.name.clone());
        }
        checked += 1;
    }
    (checked, worst.0, worst.1)
}
