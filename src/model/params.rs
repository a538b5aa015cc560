//! All parameters of a model in one flat f32 buffer, with a table of named, shaped entries.
//! One buffer makes the optimizer (and later device upload) a single loop; names are the Hugging
//! Face names, so loading and saving is a lookup. The layout functions say which entries a config
//! and architecture have, and place query/key/value next to each other so the three projections
//! run as one fused GEMM.

use super::config::{Architecture, BeitConfig};
pub(crate) use super::param_store::Builder;
pub use super::param_store::{Affine, Init, ParamId, ParamSpec, ParamStore};
use crate::error::Result;
use crate::resources::{try_zeroed, Bytes, Need};

/// Parameters of the embeddings.
#[derive(Debug, Clone)]
pub struct EmbeddingParams {
    pub cls_token: ParamId,
    pub mask_token: Option<ParamId>,
    pub position_embeddings: Option<ParamId>,
    pub patch_weight: ParamId,
    pub patch_bias: ParamId,
}

/// Parameters of one transformer block. `query_w..value_w` and `query_b..value_b` are adjacent.
#[derive(Debug, Clone)]
pub struct BlockParams {
    pub ln_before_w: ParamId,
    pub ln_before_b: ParamId,
    pub query_w: ParamId,
    pub key_w: ParamId,
    pub value_w: ParamId,
    pub query_b: ParamId,
    pub key_b: ParamId,
    pub value_b: ParamId,
    pub out_w: ParamId,
    pub out_b: ParamId,
    pub lambda_1: Option<ParamId>,
    pub lambda_2: Option<ParamId>,
    pub ln_after_w: ParamId,
    pub ln_after_b: ParamId,
    pub fc1_w: ParamId,
    pub fc1_b: ParamId,
    pub fc2_w: ParamId,
    pub fc2_b: ParamId,
    pub rel_pos_table: Option<ParamId>,
}

#[derive(Debug, Clone)]
pub enum HeadParams {
    None,
    MaskedImageModeling {
        layernorm: Affine,
        lm_head: Affine,
    },
    Classifier {
        classifier: Affine,
    },
    /// FPN, UperNet decode head and optional FCN auxiliary head (`super::segmentation`).
    Segmentation(Box<super::segmentation::layout::SegmentationHead>),
}

/// Where every parameter of a model lives.
#[derive(Debug, Clone)]
pub struct Layout {
    pub embeddings: EmbeddingParams,
    pub shared_rel_pos_table: Option<ParamId>,
    pub blocks: Vec<BlockParams>,
    /// `beit.layernorm`: present when `use_mean_pooling` is false (otherwise an identity).
    pub final_layernorm: Option<Affine>,
    /// `beit.pooler.layernorm`: present when the model has a pooler and uses mean pooling.
    pub pooler_layernorm: Option<Affine>,
    /// Whether a pooler exists at all (BeitModel and classification; MIM has none).
    pub has_pooler: bool,
    pub head: HeadParams,
}

/// Rows of a relative position bias table for a patch grid: (2h−1)(2w−1) + 3.
pub fn rel_pos_table_rows(grid: (usize, usize)) -> usize {
    (2 * grid.0 - 1) * (2 * grid.1 - 1) + 3
}

/// Builds the parameter table of `arch` for `cfg` (zero-filled buffer). The buffer is tested
/// against the memory budget first: a config whose parameters do not fit is `Error::Config`.
pub fn build_layout(cfg: &BeitConfig, arch: Architecture) -> Result<(ParamStore, Layout)> {
    let d = cfg.hidden_size;
    let inter = cfg.intermediate_size;
    let (ph, pw) = cfg.patch_size.hw();
    let grid = cfg.native_grid();
    let n_patches = grid.0 * grid.1;
    let heads = cfg.num_attention_heads;
    let std = cfg.initializer_range as f32;
    // unilm's two model files cut the normal differently: the pretraining model
    // (modeling_pretrain.py) at ±std, the fine-tuning model (modeling_finetune.py, timm's
    // trunc_normal_ with its default a=-2, b=2) at ±2, which for std 0.02 is no cut at all. It
    // matters for a from-scratch fine-tune: the ±std cut leaves weights at 0.54·std and such a
    // model barely trains (Fashion-MNIST, small32, 300 steps: 24.6% top-1 vs 62% with ±2).
    let bound = if arch == Architecture::MaskedImageModeling { std } else { 2.0 };
    let tn = |scale: f32| Init::TruncNormal { std, scale, bound };
    // HF names the bare BeitModel's parameters without the `beit.` prefix.
    let prefix = if arch == Architecture::Backbone { "" } else { "beit." };
    let mut b = Builder { specs: Vec::new(), total: 0, prefix };

    let embeddings = EmbeddingParams {
        cls_token: b.add("embeddings.cls_token", &[1, 1, d], tn(1.0)),
        mask_token: (cfg.use_mask_token || arch == Architecture::MaskedImageModeling)
            .then(|| b.add("embeddings.mask_token", &[1, 1, d], tn(1.0))),
        position_embeddings: cfg
            .use_absolute_position_embeddings
            .then(|| b.add("embeddings.position_embeddings", &[1, n_patches + 1, d], tn(1.0))),
        patch_weight: b.add("embeddings.patch_embeddings.projection.weight", &[d, cfg.num_channels, ph, pw], tn(1.0)),
        patch_bias: b.add("embeddings.patch_embeddings.projection.bias", &[d], Init::Zeros),
    };
    let table_shape = [rel_pos_table_rows(grid), heads];
    let shared_rel_pos_table = cfg
        .use_shared_relative_position_bias
        .then(|| b.add("encoder.relative_position_bias.relative_position_bias_table", &table_shape, Init::Zeros));
    let lambda = Init::Constant(cfg.layer_scale_init_value as f32);
    let blocks = (0..cfg.num_hidden_layers)
        .map(|l| {
            let p = format!("encoder.layer.{l}");
            let a = format!("{p}.attention.attention");
            // unilm rescales the two output projections of block l (1-based) by 1/sqrt(2l).
            let rescale = 1.0 / (2.0 * (l + 1) as f32).sqrt();
            let ln_before = b.layernorm(&format!("{p}.layernorm_before"), d, false);
            let query_w = b.add(&format!("{a}.query.weight"), &[d, d], tn(1.0));
            let key_w = b.add(&format!("{a}.key.weight"), &[d, d], tn(1.0));
            let value_w = b.add(&format!("{a}.value.weight"), &[d, d], tn(1.0));
            let query_b = b.add(&format!("{a}.query.bias"), &[d], Init::Zeros);
            let key_b = b.push(format!("{}{a}.key.bias", b.prefix), &[d], Init::Zeros, false);
            let value_b = b.add(&format!("{a}.value.bias"), &[d], Init::Zeros);
            let rel_pos_table = cfg.use_relative_position_bias.then(|| {
                b.add(&format!("{a}.relative_position_bias.relative_position_bias_table"), &table_shape, Init::Zeros)
            });
            let out_w = b.add(&format!("{p}.attention.output.dense.weight"), &[d, d], tn(rescale));
            let out_b = b.add(&format!("{p}.attention.output.dense.bias"), &[d], Init::Zeros);
            let lambda_1 = cfg.layer_scale().then(|| b.add(&format!("{p}.lambda_1"), &[d], lambda));
            let lambda_2 = cfg.layer_scale().then(|| b.add(&format!("{p}.lambda_2"), &[d], lambda));
            let ln_after = b.layernorm(&format!("{p}.layernorm_after"), d, false);
            let fc1_w = b.add(&format!("{p}.intermediate.dense.weight"), &[inter, d], tn(1.0));
            let fc1_b = b.add(&format!("{p}.intermediate.dense.bias"), &[inter], Init::Zeros);
            let fc2_w = b.add(&format!("{p}.output.dense.weight"), &[d, inter], tn(rescale));
            let fc2_b = b.add(&format!("{p}.output.dense.bias"), &[d], Init::Zeros);
            BlockParams {
                ln_before_w: ln_before.weight,
                ln_before_b: ln_before.bias,
                query_w,
                key_w,
                value_w,
                query_b,
                key_b,
                value_b,
                out_w,
                out_b,
                lambda_1,
                lambda_2,
                ln_after_w: ln_after.weight,
                ln_after_b: ln_after.bias,
                fc1_w,
                fc1_b,
                fc2_w,
                fc2_b,
                rel_pos_table,
            }
        })
        .collect();
    let final_layernorm = (!cfg.use_mean_pooling).then(|| b.layernorm("layernorm", d, false));
    // HF builds the segmentation backbone with add_pooling_layer=False.
    let has_pooler = !matches!(arch, Architecture::MaskedImageModeling | Architecture::SemanticSegmentation);
    let pooler_layernorm = (has_pooler && cfg.use_mean_pooling).then(|| b.layernorm("pooler.layernorm", d, false));
    let head = match arch {
        Architecture::Backbone => HeadParams::None,
        Architecture::MaskedImageModeling => HeadParams::MaskedImageModeling {
            layernorm: b.layernorm("layernorm", d, true),
            lm_head: Affine {
                weight: b.add_top("lm_head.weight", &[cfg.vocab_size, d], tn(1.0)),
                bias: b.add_top("lm_head.bias", &[cfg.vocab_size], Init::Zeros),
            },
        },
        Architecture::ImageClassification => {
            let k = cfg.num_labels();
            HeadParams::Classifier {
                classifier: Affine {
                    // unilm's fine-tuning head starts 1000x smaller (init_scale 0.001).
                    weight: b.add_top("classifier.weight", &[k, d], tn(0.001)),
                    bias: b.add_top("classifier.bias", &[k], Init::Zeros),
                },
            }
        }
        Architecture::SemanticSegmentation => {
            HeadParams::Segmentation(Box::new(super::segmentation::layout::build_head(&mut b, cfg)))
        }
    };
    let layout =
        Layout { embeddings, shared_rel_pos_table, blocks, final_layernorm, pooler_layernorm, has_pooler, head };
    Need::new(format!("the {} parameters of this {} config", b.total, arch.hf_name()), Bytes::floats(&[b.total]))
        .check_config()?;
    let data = try_zeroed(b.total, "the model's parameters")?;
    Ok((ParamStore { data, specs: b.specs }, layout))
}
