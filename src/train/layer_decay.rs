//! Layer-wise learning-rate decay (unilm `LayerDecayValueAssigner`, BEIT_SPEC §7): with L
//! blocks there are L+2 layer ids: the embeddings (tokens, position embeddings, patch
//! embedding) are 0, block i is i+1, everything else (heads, final norms, the shared relative
//! position bias) is L+1; an entry's lr is scaled by `decay^(L+1−id)`.

use crate::model::params::ParamStore;

/// Layer id of an HF parameter name in a model with `num_layers` blocks.
pub fn layer_id(name: &str, num_layers: usize) -> usize {
    let name = name.strip_prefix("beit.").unwrap_or(name);
    if name.starts_with("embeddings.") {
        return 0;
    }
    if let Some(rest) = name.strip_prefix("encoder.layer.") {
        if let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) {
            return i + 1;
        }
    }
    num_layers + 1
}

/// Per-element lr scale for every entry of `store` (the `lr_scale` of [`super::adamw::AdamW::step`]).
pub fn lr_scales(store: &ParamStore, num_layers: usize, decay: f64) -> Vec<f32> {
    let mut scales = vec![1.0f32; store.data.len()];
    for s in &store.specs {
        let id = layer_id(&s.name, num_layers);
        let scale = decay.powi((num_layers + 1 - id) as i32) as f32;
        scales[s.offset..s.offset + s.len].fill(scale);
    }
    scales
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_unilm() {
        assert_eq!(layer_id("beit.embeddings.cls_token", 12), 0);
        assert_eq!(layer_id("beit.embeddings.patch_embeddings.projection.weight", 12), 0);
        assert_eq!(layer_id("beit.encoder.layer.0.attention.attention.query.weight", 12), 1);
        assert_eq!(layer_id("beit.encoder.layer.11.output.dense.bias", 12), 12);
        assert_eq!(layer_id("encoder.layer.3.lambda_1", 12), 4);
        assert_eq!(layer_id("beit.encoder.relative_position_bias.relative_position_bias_table", 12), 13);
        assert_eq!(layer_id("classifier.weight", 12), 13);
        assert_eq!(layer_id("beit.pooler.layernorm.weight", 12), 13);
        // decay^(L+1−id): head 1, last block 0.65, embeddings 0.65^13.
        let d: f64 = 0.65;
        assert_eq!(d.powi((12 + 1 - layer_id("classifier.bias", 12)) as i32), 1.0);
        assert!((d.powi((12 + 1 - layer_id("beit.embeddings.cls_token", 12)) as i32) - 0.65f64.powi(13)).abs() < 1e-15);
    }
}
