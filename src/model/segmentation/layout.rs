//! Parameters of the `BeitForSemanticSegmentation` head under the names Hugging Face checkpoints
//! use on the Hub (and that `save_pretrained` writes): `fpn1.0` / `fpn1.1` / `fpn1.3`, `fpn2.0`,
//! `decode_head.{psp_modules.i.1, bottleneck, lateral_convs.i, fpn_convs.i, fpn_bottleneck}.{conv,
//! bn}`, `decode_head.classifier`, `auxiliary_head.{convs.i, conv_cat}.{conv, bn}` and
//! `auxiliary_head.classifier`. transformers 5 renames some of these in memory; [`hf5_name`]
//! gives that spelling so a file written with it loads too.
//!
//! BatchNorm running statistics live in the parameter buffer as well (so one load/save path
//! handles them), but they are not trained: [`is_buffer`] names them, and the fine-tuning loop
//! leaves them out of the optimizer.

use super::super::config::BeitConfig;
use super::super::param_store::{Affine, Builder, Init, ParamId};

/// A BatchNorm2d: affine weight/bias (trained) and running statistics (buffers).
#[derive(Debug, Clone, Copy)]
pub struct BatchNormParams {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    /// Stored as f32 here, written as int64 as PyTorch keeps it.
    pub num_batches_tracked: ParamId,
    pub channels: usize,
}

/// HF `BeitConvLayer`: Conv2d (no bias) → BatchNorm2d → ReLU.
#[derive(Debug, Clone, Copy)]
pub struct ConvBnRelu {
    pub conv: ParamId,
    pub bn: BatchNormParams,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub padding: usize,
}

/// The FCN auxiliary head.
#[derive(Debug, Clone)]
pub struct AuxHead {
    pub convs: Vec<ConvBnRelu>,
    pub conv_cat: Option<ConvBnRelu>,
    pub classifier: Affine,
    pub channels: usize,
}

/// Everything after the backbone.
#[derive(Debug, Clone)]
pub struct SegmentationHead {
    /// fpn1: ConvTranspose2d(2, 2) → BatchNorm → GELU → ConvTranspose2d(2, 2) (4x up).
    pub fpn1_up1: Affine,
    pub fpn1_bn: BatchNormParams,
    pub fpn1_up2: Affine,
    /// fpn2: ConvTranspose2d(2, 2) (2x up). fpn3 is the identity, fpn4 a 2x2 max pool.
    pub fpn2_up: Affine,
    pub pool_scales: Vec<usize>,
    pub psp: Vec<ConvBnRelu>,
    pub bottleneck: ConvBnRelu,
    pub lateral: Vec<ConvBnRelu>,
    pub fpn_convs: Vec<ConvBnRelu>,
    pub fpn_bottleneck: ConvBnRelu,
    pub classifier: Affine,
    pub aux: Option<AuxHead>,
    /// UperHead channels (HF: `hidden_size`).
    pub channels: usize,
    pub num_labels: usize,
    /// 1-based hidden-state indices of the four levels.
    pub out_indices: [usize; 4],
}

/// Whether an entry is a BatchNorm buffer (running statistics), not a trained parameter.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var") || name.ends_with(".num_batches_tracked")
}

fn batchnorm(b: &mut Builder, name: &str, c: usize) -> BatchNormParams {
    BatchNormParams {
        weight: b.add_top(&format!("{name}.weight"), &[c], Init::Ones),
        bias: b.add_top(&format!("{name}.bias"), &[c], Init::Zeros),
        running_mean: b.add_top(&format!("{name}.running_mean"), &[c], Init::Zeros),
        running_var: b.add_top(&format!("{name}.running_var"), &[c], Init::Ones),
        num_batches_tracked: b.add_top(&format!("{name}.num_batches_tracked"), &[], Init::Zeros),
        channels: c,
    }
}

fn conv_bn_relu(
    b: &mut Builder,
    name: &str,
    cin: usize,
    cout: usize,
    kernel: usize,
    padding: usize,
    init: Init,
) -> ConvBnRelu {
    ConvBnRelu {
        conv: b.add_top(&format!("{name}.conv.weight"), &[cout, cin, kernel, kernel], init),
        bn: batchnorm(b, &format!("{name}.bn"), cout),
        in_channels: cin,
        out_channels: cout,
        kernel,
        padding,
    }
}

/// Adds the head's entries to `b` (after the backbone's) and returns where they are.
pub(crate) fn build_head(b: &mut Builder, cfg: &BeitConfig) -> SegmentationHead {
    let d = cfg.hidden_size;
    let ch = d;
    let k = cfg.num_labels();
    // HF `_init_weights`: Conv2d / ConvTranspose2d weights ~ N(0, initializer_range), biases 0,
    // BatchNorm 1 / 0.
    let w = Init::Normal { std: cfg.initializer_range as f32 };
    let up = |b: &mut Builder, name: &str| Affine {
        weight: b.add_top(&format!("{name}.weight"), &[d, d, 2, 2], w),
        bias: b.add_top(&format!("{name}.bias"), &[d], Init::Zeros),
    };
    let fpn1_up1 = up(b, "fpn1.0");
    let fpn1_bn = batchnorm(b, "fpn1.1", d);
    let fpn1_up2 = up(b, "fpn1.3");
    let fpn2_up = up(b, "fpn2.0");
    let pool_scales = cfg.pool_scales();
    let psp = (0..pool_scales.len())
        .map(|i| conv_bn_relu(b, &format!("decode_head.psp_modules.{i}.1"), d, ch, 1, 0, w))
        .collect();
    let bottleneck = conv_bn_relu(b, "decode_head.bottleneck", d + pool_scales.len() * ch, ch, 3, 1, w);
    let lateral = (0..3).map(|i| conv_bn_relu(b, &format!("decode_head.lateral_convs.{i}"), d, ch, 1, 0, w)).collect();
    let fpn_convs = (0..3).map(|i| conv_bn_relu(b, &format!("decode_head.fpn_convs.{i}"), ch, ch, 3, 1, w)).collect();
    let fpn_bottleneck = conv_bn_relu(b, "decode_head.fpn_bottleneck", 4 * ch, ch, 3, 1, w);
    let classifier = Affine {
        weight: b.add_top("decode_head.classifier.weight", &[k, ch, 1, 1], w),
        bias: b.add_top("decode_head.classifier.bias", &[k], Init::Zeros),
    };
    let aux = cfg.use_auxiliary_head().then(|| {
        let ca = cfg.auxiliary_channels();
        let n = cfg.auxiliary_num_convs();
        let convs = (0..n)
            .map(|i| conv_bn_relu(b, &format!("auxiliary_head.convs.{i}"), if i == 0 { d } else { ca }, ca, 3, 1, w))
            .collect();
        let conv_cat =
            cfg.auxiliary_concat_input().then(|| conv_bn_relu(b, "auxiliary_head.conv_cat", d + ca, ca, 3, 1, w));
        let classifier = Affine {
            weight: b.add_top("auxiliary_head.classifier.weight", &[k, ca, 1, 1], w),
            bias: b.add_top("auxiliary_head.classifier.bias", &[k], Init::Zeros),
        };
        AuxHead { convs, conv_cat, classifier, channels: ca }
    });
    let idx = cfg.out_indices();
    SegmentationHead {
        fpn1_up1,
        fpn1_bn,
        fpn1_up2,
        fpn2_up,
        pool_scales,
        psp,
        bottleneck,
        lateral,
        fpn_convs,
        fpn_bottleneck,
        classifier,
        aux,
        channels: ch,
        num_labels: k,
        out_indices: [idx[0], idx[1], idx[2], idx[3]],
    }
}

/// The in-memory name transformers 5 gives a Hub-named head entry (its `WeightRenaming` rules
/// for `BeitForSemanticSegmentation`), or `None` when the name is the same.
pub fn hf5_name(name: &str) -> Option<String> {
    let mut n = name.to_string();
    for (from, to) in [
        ("fpn1.0.", "fpn.fpn1.conv_transpose1."),
        ("fpn1.1.", "fpn.fpn1.normalization."),
        ("fpn1.3.", "fpn.fpn1.conv_transpose2."),
        ("fpn2.0.", "fpn.fpn2."),
    ] {
        if let Some(rest) = n.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    if let Some(rest) = n.strip_prefix("decode_head.psp_modules.") {
        // psp_modules.{i}.1.conv.weight → psp_modules.blocks.{i}.conv.convolution.weight
        let (i, tail) = rest.split_once(".1.")?;
        let tail = tail.replacen("conv.", "convolution.", 1).replacen("bn.", "normalization.", 1);
        return Some(format!("decode_head.psp_modules.blocks.{i}.conv.{tail}"));
    }
    n = n.replacen("decode_head.bottleneck.", "decode_head.psp_bottleneck.", 1);
    let renamed = n.replace(".conv.weight", ".convolution.weight").replace(".bn.", ".normalization.");
    (renamed != name).then_some(renamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers5_names() {
        let cases = [
            ("fpn1.0.weight", Some("fpn.fpn1.conv_transpose1.weight")),
            ("fpn1.1.running_var", Some("fpn.fpn1.normalization.running_var")),
            ("fpn2.0.bias", Some("fpn.fpn2.bias")),
            (
                "decode_head.psp_modules.2.1.conv.weight",
                Some("decode_head.psp_modules.blocks.2.conv.convolution.weight"),
            ),
            ("decode_head.psp_modules.0.1.bn.bias", Some("decode_head.psp_modules.blocks.0.conv.normalization.bias")),
            ("decode_head.bottleneck.conv.weight", Some("decode_head.psp_bottleneck.convolution.weight")),
            ("decode_head.lateral_convs.1.bn.weight", Some("decode_head.lateral_convs.1.normalization.weight")),
            ("auxiliary_head.convs.0.conv.weight", Some("auxiliary_head.convs.0.convolution.weight")),
            ("decode_head.classifier.weight", None),
        ];
        for (hub, want) in cases {
            assert_eq!(hf5_name(hub).as_deref(), want, "{hub}");
        }
        assert!(is_buffer("fpn1.1.running_mean") && !is_buffer("fpn1.1.weight"));
    }
}
