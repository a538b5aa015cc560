//! The segmentation head after the backbone, forward and backward (explicit, llm.c style):
//! the FPN rescaling of four backbone levels (4x up with ConvTranspose/BN/GELU/ConvTranspose,
//! 2x up with a ConvTranspose, identity, 2x2 max pool), the UperNet decode head (pyramid
//! pooling on the coarsest level, lateral 1x1 convolutions, a top-down path with bilinear
//! upsampling, 3x3 FPN convolutions, fusion and a 1x1 classifier), and the FCN auxiliary head
//! on level 2. Every tensor is NCHW f32. The forward keeps what the backward needs in a
//! [`HeadTape`]; BatchNorm runs with running statistics ([`BnMode::Eval`]) or batch
//! statistics ([`BnMode::Train`], whose statistics the tape keeps for the running update).

use crate::backend::cpu::backward::{gelu_backward, relu_backward, DxMode};
use crate::backend::cpu::batchnorm::{
    batchnorm_eval, batchnorm_train_backward, batchnorm_train_forward, BnBatchStats, BnShape,
};
use crate::backend::cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward, Conv2dShape,
};
use crate::backend::cpu::elementwise::relu_inplace;
use crate::backend::cpu::interp::{
    adaptive_avg_pool_backward, adaptive_avg_pool_forward, bilinear_backward, bilinear_forward,
};
use crate::backend::cpu::math;
use crate::backend::cpu::pool::{max_pool2x2_backward, max_pool2x2_forward};

use super::super::params::{Affine, ParamId, ParamStore};
use super::layout::{BatchNormParams, ConvBnRelu, SegmentationHead};

/// PyTorch's BatchNorm2d default eps.
pub(crate) const BN_EPS: f32 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnMode {
    /// Running statistics (`model.eval()`).
    Eval,
    /// Batch statistics (`model.train()`).
    Train,
}

/// Shared state of one head pass.
struct Ctx<'a> {
    p: &'a ParamStore,
    b: usize,
    mode: BnMode,
}

/// What one BatchNorm saw: its parameters and, in training mode, the batch statistics.
#[derive(Debug, Clone)]
pub struct BnRecord {
    pub bn: BatchNormParams,
    pub stats: BnBatchStats,
}

impl Ctx<'_> {
    /// BatchNorm forward of `x` (`[b, c, plane]`) into a new buffer.
    fn bn_forward(&self, bn: &BatchNormParams, x: &[f32], plane: usize) -> (Vec<f32>, Option<BnBatchStats>) {
        let shape = BnShape { batch: self.b, channels: bn.channels, plane };
        let mut out = vec![0.0; x.len()];
        let (g, beta) = (self.p.get(bn.weight), self.p.get(bn.bias));
        match self.mode {
            BnMode::Eval => {
                let (m, v) = (self.p.get(bn.running_mean), self.p.get(bn.running_var));
                batchnorm_eval(shape, x, &mut out, g, beta, m, v, BN_EPS);
                (out, None)
            }
            BnMode::Train => {
                let stats = batchnorm_train_forward(shape, x, &mut out, g, beta, BN_EPS);
                (out, Some(stats))
            }
        }
    }
}

/// Saved state of one Conv → BN → ReLU unit.
struct CbrTape {
    x: Vec<f32>,
    h: usize,
    w: usize,
    /// Convolution output (the BatchNorm input).
    pre: Vec<f32>,
    stats: Option<BnBatchStats>,
    /// After ReLU: the unit's output.
    out: Vec<f32>,
}

fn conv_shape(b: usize, u: &ConvBnRelu, h: usize, w: usize) -> Conv2dShape {
    Conv2dShape {
        batch: b,
        in_channels: u.in_channels,
        out_channels: u.out_channels,
        in_h: h,
        in_w: w,
        kernel: u.kernel,
        stride: 1,
        padding: u.padding,
    }
}

fn cbr_forward(ctx: &Ctx<'_>, u: &ConvBnRelu, x: Vec<f32>, h: usize, w: usize) -> CbrTape {
    let shape = conv_shape(ctx.b, u, h, w);
    let mut pre = vec![0.0; ctx.b * u.out_channels * h * w];
    conv2d_forward(&shape, &x, ctx.p.get(u.conv), None, &mut pre);
    let (mut out, stats) = ctx.bn_forward(&u.bn, &pre, h * w);
    relu_inplace(&mut out);
    CbrTape { x, h, w, pre, stats, out }
}

/// Backward of a Conv → BN → ReLU unit (training-mode BN): parameter gradients into `grads`,
/// returns dL/dx.
fn cbr_backward(ctx: &Ctx<'_>, u: &ConvBnRelu, t: &CbrTape, dout: &[f32], grads: &mut [f32]) -> Vec<f32> {
    let plane = t.h * t.w;
    let mut drelu = vec![0.0; dout.len()];
    relu_backward(&t.out, dout, &mut drelu, DxMode::Overwrite);
    let dpre = bn_backward(ctx, &u.bn, &t.pre, t.stats.as_ref(), &drelu, plane, grads);
    let shape = conv_shape(ctx.b, u, t.h, t.w);
    let mut dx = vec![0.0; t.x.len()];
    conv2d_backward(
        &shape,
        &t.x,
        ctx.p.get(u.conv),
        &dpre,
        Some((&mut dx, DxMode::Overwrite)),
        grad(ctx.p, grads, u.conv),
        None,
    );
    dx
}

fn bn_backward(
    ctx: &Ctx<'_>,
    bn: &BatchNormParams,
    x: &[f32],
    stats: Option<&BnBatchStats>,
    dy: &[f32],
    plane: usize,
    grads: &mut [f32],
) -> Vec<f32> {
    let stats = stats.expect("the head's backward needs a training-mode forward");
    let shape = BnShape { batch: ctx.b, channels: bn.channels, plane };
    let mut dx = vec![0.0; x.len()];
    let (dg, db) = grad_pair(ctx.p, grads, bn.weight, bn.bias);
    batchnorm_train_backward(shape, x, dy, ctx.p.get(bn.weight), stats, &mut dx, dg, db);
    dx
}

fn grad<'g>(p: &ParamStore, grads: &'g mut [f32], id: ParamId) -> &'g mut [f32] {
    let s = &p.specs[id.0];
    &mut grads[s.offset..s.offset + s.len]
}

/// Gradients of two distinct entries at once.
fn grad_pair<'g>(p: &ParamStore, grads: &'g mut [f32], a: ParamId, b: ParamId) -> (&'g mut [f32], &'g mut [f32]) {
    let (sa, sb) = (&p.specs[a.0], &p.specs[b.0]);
    assert!(sa.offset + sa.len <= sb.offset || sb.offset + sb.len <= sa.offset, "entries overlap");
    if sa.offset < sb.offset {
        let (lo, hi) = grads.split_at_mut(sb.offset);
        (&mut lo[sa.offset..sa.offset + sa.len], &mut hi[..sb.len])
    } else {
        let (lo, hi) = grads.split_at_mut(sa.offset);
        let second = &mut lo[sb.offset..sb.offset + sb.len];
        (&mut hi[..sa.len], second)
    }
}

/// Concatenates NCHW maps of the same size along channels.
fn concat_channels(b: usize, plane: usize, parts: &[(&[f32], usize)]) -> Vec<f32> {
    let total: usize = parts.iter().map(|p| p.1).sum();
    let mut out = Vec::with_capacity(b * total * plane);
    for img in 0..b {
        for &(data, c) in parts {
            out.extend_from_slice(&data[img * c * plane..(img + 1) * c * plane]);
        }
    }
    out
}

/// Splits an NCHW gradient back into per-part buffers (the inverse of [`concat_channels`]).
fn split_channels(b: usize, plane: usize, data: &[f32], channels: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = channels.iter().sum();
    let mut parts: Vec<Vec<f32>> = channels.iter().map(|&c| Vec::with_capacity(b * c * plane)).collect();
    for img in 0..b {
        let mut at = img * total * plane;
        for (part, &c) in parts.iter_mut().zip(channels) {
            part.extend_from_slice(&data[at..at + c * plane]);
            at += c * plane;
        }
    }
    parts
}

fn conv1x1(ctx: &Ctx<'_>, cls: Affine, cin: usize, cout: usize, x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let shape = Conv2dShape {
        batch: ctx.b,
        in_channels: cin,
        out_channels: cout,
        in_h: h,
        in_w: w,
        kernel: 1,
        stride: 1,
        padding: 0,
    };
    let mut out = vec![0.0; ctx.b * cout * h * w];
    conv2d_forward(&shape, x, ctx.p.get(cls.weight), Some(ctx.p.get(cls.bias)), &mut out);
    out
}

#[allow(clippy::too_many_arguments)]
fn conv1x1_backward(
    ctx: &Ctx<'_>,
    cls: Affine,
    cin: usize,
    cout: usize,
    x: &[f32],
    h: usize,
    w: usize,
    dout: &[f32],
    grads: &mut [f32],
) -> Vec<f32> {
    let shape = Conv2dShape {
        batch: ctx.b,
        in_channels: cin,
        out_channels: cout,
        in_h: h,
        in_w: w,
        kernel: 1,
        stride: 1,
        padding: 0,
    };
    let mut dx = vec![0.0; x.len()];
    let (dw, db) = grad_pair(ctx.p, grads, cls.weight, cls.bias);
    conv2d_backward(&shape, x, ctx.p.get(cls.weight), dout, Some((&mut dx, DxMode::Overwrite)), dw, Some(db));
    dx
}

fn up2_shape(b: usize, d: usize, h: usize, w: usize) -> Conv2dShape {
    Conv2dShape { batch: b, in_channels: d, out_channels: d, in_h: h, in_w: w, kernel: 2, stride: 2, padding: 0 }
}

struct AuxTape {
    convs: Vec<CbrTape>,
    cat: Option<CbrTape>,
    /// The classifier's input.
    cls_in: Vec<f32>,
}

/// Everything the backward needs from one head forward.
pub(crate) struct HeadTape {
    b: usize,
    grid: (usize, usize),
    feats: [Vec<f32>; 4],
    f1_up1: Vec<f32>,
    f1_stats: Option<BnBatchStats>,
    f1_bn: Vec<f32>,
    f1_gelu: Vec<f32>,
    f4_argmax: Vec<u32>,
    sizes: [(usize, usize); 4],
    lateral: Vec<CbrTape>,
    psp: Vec<CbrTape>,
    bottleneck: CbrTape,
    fpn: Vec<CbrTape>,
    fpnb: CbrTape,
    aux: Option<AuxTape>,
}

impl HeadTape {
    /// Training-mode statistics of every BatchNorm, for the running update.
    pub(crate) fn bn_records(&self, head: &SegmentationHead) -> Vec<BnRecord> {
        let mut out = Vec::new();
        let mut push = |bn: &BatchNormParams, s: &Option<BnBatchStats>| {
            if let Some(stats) = s {
                out.push(BnRecord { bn: *bn, stats: stats.clone() });
            }
        };
        push(&head.fpn1_bn, &self.f1_stats);
        let units = head.psp.iter().zip(&self.psp).chain(std::iter::once((&head.bottleneck, &self.bottleneck)));
        let units = units.chain(head.lateral.iter().zip(&self.lateral)).chain(head.fpn_convs.iter().zip(&self.fpn));
        for (u, t) in units.chain(std::iter::once((&head.fpn_bottleneck, &self.fpnb))) {
            push(&u.bn, &t.stats);
        }
        if let (Some(a), Some(t)) = (&head.aux, &self.aux) {
            for (u, t) in a.convs.iter().zip(&t.convs).chain(a.conv_cat.iter().zip(&t.cat)) {
                push(&u.bn, &t.stats);
            }
        }
        out
    }
}

/// Output of a head forward: decode logits `[b, labels, 4gh, 4gw]`, auxiliary logits
/// `[b, labels, gh, gw]` when the head has them.
pub(crate) struct HeadOutput {
    pub logits: Vec<f32>,
    pub logits_hw: (usize, usize),
    pub aux_logits: Option<Vec<f32>>,
    pub aux_hw: (usize, usize),
}

/// Runs the head on four feature maps (`[b, hidden, gh, gw]` each).
pub(crate) fn head_forward(
    p: &ParamStore,
    head: &SegmentationHead,
    feats: [Vec<f32>; 4],
    b: usize,
    grid: (usize, usize),
    mode: BnMode,
) -> (HeadOutput, HeadTape) {
    let ctx = Ctx { p, b, mode };
    let (gh, gw) = grid;
    let d = head.fpn1_bn.channels;
    let ch = head.channels;
    let k = head.num_labels;

    // FPN.
    let s1 = up2_shape(b, d, gh, gw);
    let mut f1_up1 = vec![0.0; b * d * 4 * gh * gw];
    conv_transpose2d_forward(&s1, &feats[0], p.get(head.fpn1_up1.weight), Some(p.get(head.fpn1_up1.bias)), &mut f1_up1);
    let (f1_bn, f1_stats) = ctx.bn_forward(&head.fpn1_bn, &f1_up1, 4 * gh * gw);
    let f1_gelu: Vec<f32> = f1_bn.iter().map(|&v| math::gelu(v)).collect();
    let mut level0 = vec![0.0; b * d * 16 * gh * gw];
    let s2 = up2_shape(b, d, 2 * gh, 2 * gw);
    conv_transpose2d_forward(&s2, &f1_gelu, p.get(head.fpn1_up2.weight), Some(p.get(head.fpn1_up2.bias)), &mut level0);
    let mut level1 = vec![0.0; b * d * 4 * gh * gw];
    conv_transpose2d_forward(&s1, &feats[1], p.get(head.fpn2_up.weight), Some(p.get(head.fpn2_up.bias)), &mut level1);
    let level2 = feats[2].clone();
    let (ph, pw) = (gh / 2, gw / 2);
    let mut level3 = vec![0.0; b * d * ph * pw];
    let mut f4_argmax = vec![0u32; level3.len()];
    max_pool2x2_forward(b, d, gh, gw, &feats[3], &mut level3, &mut f4_argmax);
    let sizes = [(4 * gh, 4 * gw), (2 * gh, 2 * gw), (gh, gw), (ph, pw)];

    // Auxiliary head on level 2 (reads the level before the decode head consumes it).
    let aux = head.aux.as_ref().map(|a| {
        let mut convs = Vec::new();
        let mut h = level2.clone();
        for u in &a.convs {
            let t = cbr_forward(&ctx, u, h, gh, gw);
            h = t.out.clone();
            convs.push(t);
        }
        let cat = a.conv_cat.as_ref().map(|u| {
            let x = concat_channels(b, gh * gw, &[(&level2, d), (&h, a.channels)]);
            cbr_forward(&ctx, u, x, gh, gw)
        });
        let cls_in = cat.as_ref().map_or(h, |t| t.out.clone());
        AuxTape { convs, cat, cls_in }
    });
    let aux_logits =
        head.aux.as_ref().zip(aux.as_ref()).map(|(a, t)| conv1x1(&ctx, a.classifier, a.channels, k, &t.cls_in, gh, gw));

    // UperHead: laterals of levels 0..2, pyramid pooling on level 3.
    let levels = [level0, level1, level2];
    let lateral: Vec<CbrTape> = head
        .lateral
        .iter()
        .zip(&levels)
        .zip(&sizes)
        .map(|((u, x), &(h, w))| cbr_forward(&ctx, u, x.clone(), h, w))
        .collect();
    let mut psp = Vec::new();
    let mut ups = Vec::new();
    for (u, &scale) in head.psp.iter().zip(&head.pool_scales) {
        let mut pooled = vec![0.0; b * d * scale * scale];
        adaptive_avg_pool_forward(b * d, ph, pw, scale, scale, &level3, &mut pooled);
        let t = cbr_forward(&ctx, u, pooled, scale, scale);
        let mut up = vec![0.0; b * ch * ph * pw];
        bilinear_forward(b * ch, scale, scale, ph, pw, &t.out, &mut up);
        psp.push(t);
        ups.push(up);
    }
    let mut parts: Vec<(&[f32], usize)> = vec![(&level3, d)];
    parts.extend(ups.iter().map(|u| (u.as_slice(), ch)));
    let bottleneck = cbr_forward(&ctx, &head.bottleneck, concat_channels(b, ph * pw, &parts), ph, pw);

    // Top-down path: laterals[i-1] += up(laterals[i]).
    let mut lat: Vec<Vec<f32>> = lateral.iter().map(|t| t.out.clone()).collect();
    lat.push(bottleneck.out.clone());
    for i in (1..4).rev() {
        let (h, w) = sizes[i];
        let (h0, w0) = sizes[i - 1];
        let mut up = vec![0.0; b * ch * h0 * w0];
        bilinear_forward(b * ch, h, w, h0, w0, &lat[i], &mut up);
        for (a, &u) in lat[i - 1].iter_mut().zip(&up) {
            *a += u;
        }
    }
    let fpn: Vec<CbrTape> =
        (0..3).map(|i| cbr_forward(&ctx, &head.fpn_convs[i], lat[i].clone(), sizes[i].0, sizes[i].1)).collect();
    let (h0, w0) = sizes[0];
    let mut outs: Vec<Vec<f32>> = vec![fpn[0].out.clone()];
    for i in 1..4 {
        let src = if i < 3 { &fpn[i].out } else { &lat[3] };
        let mut up = vec![0.0; b * ch * h0 * w0];
        bilinear_forward(b * ch, sizes[i].0, sizes[i].1, h0, w0, src, &mut up);
        outs.push(up);
    }
    let parts: Vec<(&[f32], usize)> = outs.iter().map(|o| (o.as_slice(), ch)).collect();
    let fpnb = cbr_forward(&ctx, &head.fpn_bottleneck, concat_channels(b, h0 * w0, &parts), h0, w0);
    let logits = conv1x1(&ctx, head.classifier, ch, k, &fpnb.out, h0, w0);

    let tape = HeadTape {
        b,
        grid,
        feats,
        f1_up1,
        f1_stats,
        f1_bn,
        f1_gelu,
        f4_argmax,
        sizes,
        lateral,
        psp,
        bottleneck,
        fpn,
        fpnb,
        aux,
    };
    (HeadOutput { logits, logits_hw: sizes[0], aux_logits, aux_hw: grid }, tape)
}

/// Backward of [`head_forward`] (which must have run in [`BnMode::Train`]): parameter
/// gradients are added to `grads`; returns dL/d(feature map) of the four levels.
pub(crate) fn head_backward(
    p: &ParamStore,
    head: &SegmentationHead,
    t: &HeadTape,
    dlogits: &[f32],
    daux: Option<&[f32]>,
    grads: &mut [f32],
) -> [Vec<f32>; 4] {
    let b = t.b;
    let ctx = Ctx { p, b, mode: BnMode::Train };
    let (gh, gw) = t.grid;
    let d = head.fpn1_bn.channels;
    let ch = head.channels;
    let k = head.num_labels;
    let sizes = t.sizes;
    let (h0, w0) = sizes[0];

    // Classifier and fusion.
    let dfb = conv1x1_backward(&ctx, head.classifier, ch, k, &t.fpnb.out, h0, w0, dlogits, grads);
    let dcat = cbr_backward(&ctx, &head.fpn_bottleneck, &t.fpnb, &dfb, grads);
    let mut douts = split_channels(b, h0 * w0, &dcat, &[ch; 4]);
    // Gradients of the top-down sums L0..L3.
    let mut dlat: Vec<Vec<f32>> = Vec::with_capacity(4);
    for i in 0..4 {
        let (h, w) = sizes[i];
        let dfo = if i == 0 {
            std::mem::take(&mut douts[0])
        } else {
            let mut g = vec![0.0; b * ch * h * w];
            bilinear_backward(b * ch, h, w, h0, w0, &douts[i], &mut g);
            g
        };
        dlat.push(if i < 3 { cbr_backward(&ctx, &head.fpn_convs[i], &t.fpn[i], &dfo, grads) } else { dfo });
    }
    // Top-down path, reversed: L[i-1] = lat[i-1] + up(L[i]) was computed for i = 3, 2, 1.
    for i in 1..4 {
        let (h, w) = sizes[i];
        let (hp, wp) = sizes[i - 1];
        let mut g = vec![0.0; b * ch * h * w];
        bilinear_backward(b * ch, h, w, hp, wp, &dlat[i - 1], &mut g);
        for (a, &v) in dlat[i].iter_mut().zip(&g) {
            *a += v;
        }
    }

    // Pyramid pooling module and bottleneck → level 3.
    let (ph, pw) = sizes[3];
    let dcat3 = cbr_backward(&ctx, &head.bottleneck, &t.bottleneck, &dlat[3], grads);
    let mut chans = vec![d];
    chans.extend(std::iter::repeat_n(ch, head.psp.len()));
    let mut parts = split_channels(b, ph * pw, &dcat3, &chans);
    let mut dlevel3 = std::mem::take(&mut parts[0]);
    for ((u, tp), (dup, &scale)) in head.psp.iter().zip(&t.psp).zip(parts[1..].iter().zip(&head.pool_scales)) {
        let mut dconv = vec![0.0; b * ch * scale * scale];
        bilinear_backward(b * ch, scale, scale, ph, pw, dup, &mut dconv);
        let dpooled = cbr_backward(&ctx, u, tp, &dconv, grads);
        let mut g = vec![0.0; dlevel3.len()];
        adaptive_avg_pool_backward(b * d, ph, pw, scale, scale, &dpooled, &mut g);
        for (a, &v) in dlevel3.iter_mut().zip(&g) {
            *a += v;
        }
    }
    // Laterals → levels 0..2.
    let mut dlevels: Vec<Vec<f32>> =
        (0..3).map(|i| cbr_backward(&ctx, &head.lateral[i], &t.lateral[i], &dlat[i], grads)).collect();

    // Auxiliary head → level 2.
    if let (Some(a), Some(at), Some(daux)) = (&head.aux, &t.aux, daux) {
        let dcls = conv1x1_backward(&ctx, a.classifier, a.channels, k, &at.cls_in, gh, gw, daux, grads);
        let mut dh = dcls;
        if let (Some(u), Some(tc)) = (&a.conv_cat, &at.cat) {
            let dx = cbr_backward(&ctx, u, tc, &dh, grads);
            let parts = split_channels(b, gh * gw, &dx, &[d, a.channels]);
            for (x, &v) in dlevels[2].iter_mut().zip(&parts[0]) {
                *x += v;
            }
            dh = parts[1].clone();
        }
        for (u, tc) in a.convs.iter().zip(&at.convs).rev() {
            dh = cbr_backward(&ctx, u, tc, &dh, grads);
        }
        for (x, &v) in dlevels[2].iter_mut().zip(&dh) {
            *x += v;
        }
    }

    // FPN → backbone features.
    let s1 = up2_shape(b, d, gh, gw);
    let s2 = up2_shape(b, d, 2 * gh, 2 * gw);
    let mut dgelu = vec![0.0; t.f1_gelu.len()];
    {
        let (dw, db) = grad_pair(p, grads, head.fpn1_up2.weight, head.fpn1_up2.bias);
        let w = p.get(head.fpn1_up2.weight);
        conv_transpose2d_backward(&s2, &t.f1_gelu, w, &dlevels[0], Some((&mut dgelu, DxMode::Overwrite)), dw, Some(db));
    }
    let mut dbn = vec![0.0; dgelu.len()];
    gelu_backward(&mut dbn, &dgelu, &t.f1_bn);
    let dup1 = bn_backward(&ctx, &head.fpn1_bn, &t.f1_up1, t.f1_stats.as_ref(), &dbn, 4 * gh * gw, grads);
    let mut df0 = vec![0.0; t.feats[0].len()];
    {
        let (dw, db) = grad_pair(p, grads, head.fpn1_up1.weight, head.fpn1_up1.bias);
        let w = p.get(head.fpn1_up1.weight);
        conv_transpose2d_backward(&s1, &t.feats[0], w, &dup1, Some((&mut df0, DxMode::Overwrite)), dw, Some(db));
    }
    let mut df1 = vec![0.0; t.feats[1].len()];
    {
        let (dw, db) = grad_pair(p, grads, head.fpn2_up.weight, head.fpn2_up.bias);
        let w = p.get(head.fpn2_up.weight);
        conv_transpose2d_backward(&s1, &t.feats[1], w, &dlevels[1], Some((&mut df1, DxMode::Overwrite)), dw, Some(db));
    }
    let df2 = std::mem::take(&mut dlevels[2]);
    let mut df3 = vec![0.0; t.feats[3].len()];
    max_pool2x2_backward(b, d, gh, gw, &dlevel3, &t.f4_argmax, &mut df3, DxMode::Overwrite);
    [df0, df1, df2, df3]
}
