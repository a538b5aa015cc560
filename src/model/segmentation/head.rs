//! The segmentation head after the backbone, forward and backward (explicit, llm.c style), over
//! [`ImageOps`]: the FPN rescaling of four backbone levels (4x up with
//! ConvTranspose/BN/GELU/ConvTranspose, 2x up with a ConvTranspose, identity, 2x2 max pool), the
//! UperNet decode head (pyramid pooling on the coarsest level, lateral 1x1 convolutions, a
//! top-down path with bilinear upsampling, 3x3 FPN convolutions, fusion and a 1x1 classifier),
//! and the FCN auxiliary head on level 2. Every tensor is NCHW. A [`HeadPlan`] holds every view
//! of one pass: what the forward keeps for the backward, and (when training) the backward's
//! gradients. BatchNorm runs with running statistics ([`BnMode::Eval`]) or batch statistics
//! ([`BnMode::Train`], whose statistics the plan keeps for the running update).

use crate::backend::image_ops::{batch_norm_saved_len, BatchNorm, ImageOps};
use crate::backend::memory::{Planner, Space, View};
use crate::backend::ops::DxMode;
use crate::backend::shapes::{BnShape, Conv2dShape, ResizeShape};
use crate::error::Result;

use super::super::params::{Affine, ParamStore};
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

/// What one BatchNorm saw in a training pass: its parameters and the batch statistics its
/// forward kept (`[3, channels]`, see [`batch_norm_saved_len`]).
#[derive(Debug, Clone)]
pub struct BnRecord {
    pub bn: BatchNormParams,
    pub stats: Vec<f32>,
}

/// The views of one Conv → BN → ReLU unit at `h x w`.
#[derive(Debug, Clone, Copy)]
struct Cbr {
    x: View,
    /// Convolution output (the BatchNorm input).
    pre: View,
    /// The BatchNorm's batch statistics (empty in evaluation).
    saved: View,
    /// After ReLU: the unit's output.
    out: View,
    h: usize,
    w: usize,
}

/// The auxiliary head's views.
#[derive(Debug, Clone)]
struct AuxPlan {
    convs: Vec<Cbr>,
    cat: Option<Cbr>,
    logits: View,
}

/// The backward's gradients and scratch (training only).
#[derive(Debug, Clone)]
struct HeadGrads {
    dlogits: View,
    daux: View,
    /// dL/d(fused map), the classifier's input gradient.
    dfb: View,
    /// A Conv → BN → ReLU unit's ReLU and BatchNorm gradients, as large as the largest unit.
    drelu: View,
    dpre: View,
    /// dL/d(concatenation of the four upsampled maps).
    dcat: View,
    /// One part of `dcat` made contiguous (and scratch of the top-down path's backward).
    dpart: View,
    /// dL/d(top-down sums L0..L3).
    dlat: [View; 4],
    /// dL/d(pyramid pooling concatenation), and the pooled level's gradient.
    dcat3: View,
    dlevel3: View,
    /// A pyramid pooling branch: dL/d(its unit's output), dL/d(its pooled input), and the
    /// level-3 gradient it adds.
    dconv: View,
    dpooled: View,
    dspread: View,
    /// dL/d(levels 0..2).
    dlevels: [View; 3],
    /// The auxiliary head: its classifier's input gradient, the concatenation's gradient, and
    /// two buffers for the chain of units.
    aux_dcls: View,
    aux_dcat: View,
    aux_d: [View; 2],
    /// The FPN's 4x branch: dL/d(GELU output), dL/d(BN output), dL/d(BN input).
    dgelu: View,
    dbn: View,
    dup1: View,
    /// dL/d(the four feature maps); level 2's is `dlevels[2]`.
    dfeats: [View; 4],
}

/// Every view of one head pass over `b` images with a `grid` of patches.
#[derive(Debug, Clone)]
pub(crate) struct HeadPlan {
    b: usize,
    grid: (usize, usize),
    mode: BnMode,
    /// The four feature maps `[b, hidden, gh, gw]`.
    feats: [View; 4],
    f1_up1: View,
    f1_saved: View,
    f1_bn: View,
    f1_gelu: View,
    /// Levels 0, 1 and 3 (level 2 is `feats[2]`).
    level0: View,
    level1: View,
    level3: View,
    f4_saved: View,
    sizes: [(usize, usize); 4],
    aux: Option<AuxPlan>,
    lateral: Vec<Cbr>,
    psp: Vec<Cbr>,
    bottleneck: Cbr,
    /// The top-down sums L0..L2 (L3 is the bottleneck's output) and the upsampling scratch.
    lat: [View; 3],
    up: View,
    fpn: Vec<Cbr>,
    fpnb: Cbr,
    /// Decode logits `[b, labels, 4gh, 4gw]`.
    pub logits: View,
    grads: Option<HeadGrads>,
}

/// Plans the views of a pass; `Planner` hands them out.
struct Plans<'a> {
    plan: &'a mut Planner,
    b: usize,
    mode: BnMode,
}

impl Plans<'_> {
    fn act(&mut self, channels: usize, h: usize, w: usize) -> View {
        self.plan.act(self.b * channels * h * w)
    }

    fn cbr(&mut self, u: &ConvBnRelu, x: View, h: usize, w: usize) -> Cbr {
        let pre = self.act(u.out_channels, h, w);
        let saved = match self.mode {
            BnMode::Eval => View::empty(Space::Stat),
            BnMode::Train => self.plan.stat(batch_norm_saved_len(u.out_channels)),
        };
        let out = self.act(u.out_channels, h, w);
        Cbr { x, pre, saved, out, h, w }
    }
}

impl HeadPlan {
    /// Plans a pass of `head` over `b` images with a `grid` of patches; training mode plans the
    /// backward's gradients too.
    pub(crate) fn new(
        plan: &mut Planner,
        head: &SegmentationHead,
        b: usize,
        grid: (usize, usize),
        mode: BnMode,
    ) -> Self {
        let mut p = Plans { plan, b, mode };
        let (gh, gw) = grid;
        let (d, ch, k) = (head.fpn1_bn.channels, head.channels, head.num_labels);
        let bn_saved = |p: &mut Plans<'_>, c: usize| match mode {
            BnMode::Eval => View::empty(Space::Stat),
            BnMode::Train => p.plan.stat(batch_norm_saved_len(c)),
        };
        let feats = std::array::from_fn(|_| p.act(d, gh, gw));
        let f1_up1 = p.act(d, 2 * gh, 2 * gw);
        let f1_saved = bn_saved(&mut p, d);
        let f1_bn = p.act(d, 2 * gh, 2 * gw);
        let f1_gelu = p.act(d, 2 * gh, 2 * gw);
        let level0 = p.act(d, 4 * gh, 4 * gw);
        let level1 = p.act(d, 2 * gh, 2 * gw);
        let (ph, pw) = (gh / 2, gw / 2);
        let level3 = p.act(d, ph, pw);
        let f4_saved = p.plan.stat(b * d * ph * pw);
        let sizes = [(4 * gh, 4 * gw), (2 * gh, 2 * gw), (gh, gw), (ph, pw)];

        let aux = head.aux.as_ref().map(|a| {
            let mut convs = Vec::new();
            let mut x = feats[2];
            for u in &a.convs {
                let t = p.cbr(u, x, gh, gw);
                x = t.out;
                convs.push(t);
            }
            let cat = a.conv_cat.as_ref().map(|u| {
                let x = p.act(d + a.channels, gh, gw);
                p.cbr(u, x, gh, gw)
            });
            AuxPlan { convs, cat, logits: p.act(k, gh, gw) }
        });

        let levels = [level0, level1, feats[2]];
        let lateral: Vec<Cbr> =
            head.lateral.iter().zip(levels).zip(sizes).map(|((u, x), (h, w))| p.cbr(u, x, h, w)).collect();
        let psp: Vec<Cbr> = head
            .psp
            .iter()
            .zip(&head.pool_scales)
            .map(|(u, &s)| {
                let pooled = p.act(d, s, s);
                p.cbr(u, pooled, s, s)
            })
            .collect();
        let cat3 = p.act(d + head.psp.len() * ch, ph, pw);
        let bottleneck = p.cbr(&head.bottleneck, cat3, ph, pw);
        let lat = std::array::from_fn(|i| p.act(ch, sizes[i].0, sizes[i].1));
        let (h0, w0) = sizes[0];
        let up = p.act(ch, h0, w0);
        let fpn: Vec<Cbr> = (0..3).map(|i| p.cbr(&head.fpn_convs[i], lat[i], sizes[i].0, sizes[i].1)).collect();
        let cat = p.act(4 * ch, h0, w0);
        let fpnb = p.cbr(&head.fpn_bottleneck, cat, h0, w0);
        let logits = p.act(k, h0, w0);

        let grads = (mode == BnMode::Train).then(|| {
            let ca = head.aux.as_ref().map_or(0, |a| a.channels);
            let widest = ch.max(ca).max(d);
            let largest_pool = head.pool_scales.iter().map(|&s| s * s).max().unwrap_or(0);
            // The largest unit output: a fine-level map, or a pyramid pooling scale beyond it.
            let unit = (widest * h0 * w0).max(ch * largest_pool);
            HeadGrads {
                dlogits: p.act(k, h0, w0),
                daux: p.act(k, gh, gw),
                dfb: p.act(ch, h0, w0),
                drelu: p.plan.act(b * unit),
                dpre: p.plan.act(b * unit),
                dcat: p.act(4 * ch, h0, w0),
                dpart: p.act(ch, h0, w0),
                dlat: std::array::from_fn(|i| p.act(ch, sizes[i].0, sizes[i].1)),
                dcat3: p.act(d + head.psp.len() * ch, ph, pw),
                dlevel3: p.act(d, ph, pw),
                dconv: p.plan.act(b * ch * largest_pool),
                dpooled: p.plan.act(b * d * largest_pool),
                dspread: p.act(d, ph, pw),
                dlevels: std::array::from_fn(|i| p.act(d, sizes[i].0, sizes[i].1)),
                aux_dcls: p.act(ca, gh, gw),
                aux_dcat: p.act(d + ca, gh, gw),
                aux_d: std::array::from_fn(|_| p.act(d.max(ca), gh, gw)),
                dgelu: p.act(d, 2 * gh, 2 * gw),
                dbn: p.act(d, 2 * gh, 2 * gw),
                dup1: p.act(d, 2 * gh, 2 * gw),
                dfeats: std::array::from_fn(|_| p.act(d, gh, gw)),
            }
        });
        HeadPlan {
            b,
            grid,
            mode,
            feats,
            f1_up1,
            f1_saved,
            f1_bn,
            f1_gelu,
            level0,
            level1,
            level3,
            f4_saved,
            sizes,
            aux,
            lateral,
            psp,
            bottleneck,
            lat,
            up,
            fpn,
            fpnb,
            logits,
            grads,
        }
    }

    /// The four feature maps the backbone's levels go to.
    pub(crate) fn feats(&self) -> [View; 4] {
        self.feats
    }

    /// The auxiliary logits `[b, labels, gh, gw]` (a head with an auxiliary head).
    pub(crate) fn aux_logits(&self) -> Option<View> {
        self.aux.as_ref().map(|a| a.logits)
    }

    /// Where the loss writes dL/d(logits) and dL/d(auxiliary logits) (training plans).
    pub(crate) fn logit_grads(&self) -> (View, View) {
        let g = self.grads.as_ref().expect("a training plan");
        (g.dlogits, g.daux)
    }

    /// dL/d(the four feature maps) after [`head_backward`].
    pub(crate) fn feat_grads(&self) -> [View; 4] {
        let g = self.grads.as_ref().expect("a training plan");
        [g.dfeats[0], g.dfeats[1], g.dlevels[2], g.dfeats[3]]
    }

    /// Spatial sizes of the decode logits and the auxiliary logits.
    pub(crate) fn logits_hw(&self) -> ((usize, usize), (usize, usize)) {
        (self.sizes[0], self.grid)
    }

    /// Training-mode statistics of every BatchNorm, for the running update.
    pub(crate) fn bn_records<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        head: &SegmentationHead,
    ) -> Result<Vec<BnRecord>> {
        let mut units: Vec<(&BatchNormParams, View)> = vec![(&head.fpn1_bn, self.f1_saved)];
        let cbrs = head.psp.iter().zip(&self.psp).chain(std::iter::once((&head.bottleneck, &self.bottleneck)));
        let cbrs = cbrs.chain(head.lateral.iter().zip(&self.lateral)).chain(head.fpn_convs.iter().zip(&self.fpn));
        let cbrs = cbrs.chain(std::iter::once((&head.fpn_bottleneck, &self.fpnb)));
        units.extend(cbrs.map(|(u, t)| (&u.bn, t.saved)));
        if let (Some(a), Some(t)) = (&head.aux, &self.aux) {
            for (u, t) in a.convs.iter().zip(&t.convs).chain(a.conv_cat.iter().zip(&t.cat)) {
                units.push((&u.bn, t.saved));
            }
        }
        let mut out = Vec::with_capacity(units.len());
        for (bn, saved) in units.into_iter().filter(|(_, s)| !s.is_empty()) {
            let mut stats = vec![0.0; saved.len()];
            be.download(m, saved, &mut stats)?;
            out.push(BnRecord { bn: *bn, stats });
        }
        Ok(out)
    }
}

/// Shared state of one head pass.
struct Ctx<'a, B: ImageOps> {
    be: &'a B,
    p: &'a ParamStore,
    b: usize,
    mode: BnMode,
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

fn conv1x1_shape(b: usize, cin: usize, cout: usize, (h, w): (usize, usize)) -> Conv2dShape {
    Conv2dShape { batch: b, in_channels: cin, out_channels: cout, in_h: h, in_w: w, kernel: 1, stride: 1, padding: 0 }
}

fn up2_shape(b: usize, d: usize, h: usize, w: usize) -> Conv2dShape {
    Conv2dShape { batch: b, in_channels: d, out_channels: d, in_h: h, in_w: w, kernel: 2, stride: 2, padding: 0 }
}

impl<B: ImageOps> Ctx<'_, B> {
    /// BatchNorm forward of `x` (`[b, c, plane]`) into `out`, keeping the batch statistics in
    /// `saved` when training.
    fn bn_forward(
        &self,
        m: &mut B::Memory<'_>,
        bn: &BatchNormParams,
        x: View,
        out: View,
        saved: View,
        plane: usize,
    ) -> Result<()> {
        let shape = BnShape { batch: self.b, channels: bn.channels, plane };
        let (g, beta) = (self.p.view(bn.weight), self.p.view(bn.bias));
        match self.mode {
            BnMode::Eval => {
                let (running_mean, running_var) = (self.p.view(bn.running_mean), self.p.view(bn.running_var));
                let norm = BatchNorm { gamma: g, beta, running_mean, running_var, eps: BN_EPS };
                self.be.batch_norm_eval(m, out, x, norm, shape)
            }
            BnMode::Train => self.be.batch_norm_train(m, out, saved, x, g, beta, BN_EPS, shape),
        }
    }

    /// Backward of a training-mode BatchNorm: `dx` written, parameter gradients added.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &self,
        m: &mut B::Memory<'_>,
        bn: &BatchNormParams,
        dx: View,
        dy: View,
        x: View,
        saved: View,
        plane: usize,
    ) -> Result<()> {
        assert!(!saved.is_empty(), "the head's backward needs a training-mode forward");
        let shape = BnShape { batch: self.b, channels: bn.channels, plane };
        let (dg, db) = (self.p.grad_view(bn.weight), self.p.grad_view(bn.bias));
        self.be.batch_norm_backward(m, dx, dg, db, dy, x, self.p.view(bn.weight), saved, shape)
    }

    fn cbr_forward(&self, m: &mut B::Memory<'_>, u: &ConvBnRelu, t: &Cbr) -> Result<()> {
        let shape = conv_shape(self.b, u, t.h, t.w);
        self.be.conv2d(m, t.pre, t.x, self.p.view(u.conv), None, shape)?;
        self.bn_forward(m, &u.bn, t.pre, t.out, t.saved, t.h * t.w)?;
        self.be.relu(m, t.out, t.out)
    }

    /// Backward of a Conv → BN → ReLU unit (training-mode BN) for `dout`: parameter gradients
    /// added, dL/dx written to `dx`; `g` lends the ReLU and BatchNorm gradients' buffers.
    fn cbr_backward(
        &self,
        m: &mut B::Memory<'_>,
        u: &ConvBnRelu,
        t: &Cbr,
        dout: View,
        dx: View,
        g: &HeadGrads,
    ) -> Result<()> {
        let (drelu, dpre) = (g.drelu.prefix(dout.len()), g.dpre.prefix(dout.len()));
        self.be.relu_backward(m, drelu, dout, t.out, DxMode::Overwrite)?;
        self.bn_backward(m, &u.bn, dpre, drelu, t.pre, t.saved, t.h * t.w)?;
        let shape = conv_shape(self.b, u, t.h, t.w);
        let dw = self.p.grad_view(u.conv);
        self.be.conv2d_backward(m, Some((dx, DxMode::Overwrite)), dw, None, dpre, t.x, self.p.view(u.conv), shape)
    }

    fn classifier(&self, m: &mut B::Memory<'_>, cls: Affine, shape: Conv2dShape, out: View, x: View) -> Result<()> {
        self.be.conv2d(m, out, x, self.p.view(cls.weight), Some(self.p.view(cls.bias)), shape)
    }

    fn classifier_backward(
        &self,
        m: &mut B::Memory<'_>,
        cls: Affine,
        shape: Conv2dShape,
        dx: View,
        dout: View,
        x: View,
    ) -> Result<()> {
        let (dw, db) = (self.p.grad_view(cls.weight), self.p.grad_view(cls.bias));
        self.be.conv2d_backward(m, Some((dx, DxMode::Overwrite)), dw, Some(db), dout, x, self.p.view(cls.weight), shape)
    }

    /// A ConvTranspose2d with bias.
    fn up(&self, m: &mut B::Memory<'_>, a: Affine, shape: Conv2dShape, out: View, x: View) -> Result<()> {
        self.be.conv_transpose2d(m, out, x, self.p.view(a.weight), Some(self.p.view(a.bias)), shape)
    }

    fn up_backward(
        &self,
        m: &mut B::Memory<'_>,
        a: Affine,
        shape: Conv2dShape,
        dx: View,
        dout: View,
        x: View,
    ) -> Result<()> {
        let (dw, db) = (self.p.grad_view(a.weight), self.p.grad_view(a.bias));
        self.be.conv_transpose2d_backward(
            m,
            Some((dx, DxMode::Overwrite)),
            dw,
            Some(db),
            dout,
            x,
            self.p.view(a.weight),
            shape,
        )
    }

    /// Bilinear resize of `x` (`[b, c, from]`) into channels `at..at + c` of each image of `dst`
    /// (`[b, total, to]`): one image at a time, so the result lands in a concatenation directly.
    #[allow(clippy::too_many_arguments)]
    fn resize_into(
        &self,
        m: &mut B::Memory<'_>,
        dst: View,
        total: usize,
        at: usize,
        x: View,
        c: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<()> {
        let shape = ResizeShape { planes: c, in_h: from.0, in_w: from.1, out_h: to.0, out_w: to.1 };
        let (pin, pout) = (from.0 * from.1, to.0 * to.1);
        for img in 0..self.b {
            let out = dst.sub((img * total + at) * pout, c * pout);
            self.be.bilinear_resize(m, out, x.sub(img * c * pin, c * pin), shape)?;
        }
        Ok(())
    }

    /// Backward of [`Ctx::resize_into`]: dL/dx (`[b, c, from]`) written from the channels
    /// `at..at + c` of `dout` (`[b, total, to]`).
    #[allow(clippy::too_many_arguments)]
    fn resize_from_backward(
        &self,
        m: &mut B::Memory<'_>,
        dx: View,
        c: usize,
        dout: View,
        total: usize,
        at: usize,
        from: (usize, usize),
        to: (usize, usize),
    ) -> Result<()> {
        let shape = ResizeShape { planes: c, in_h: from.0, in_w: from.1, out_h: to.0, out_w: to.1 };
        let (pin, pout) = (from.0 * from.1, to.0 * to.1);
        for img in 0..self.b {
            let g = dout.sub((img * total + at) * pout, c * pout);
            self.be.bilinear_resize_backward(m, dx.sub(img * c * pin, c * pin), g, shape)?;
        }
        Ok(())
    }

    /// Copies `x` (`[b, c, plane]`) into channels `at..at + c` of each image of `dst`
    /// (`[b, total, plane]`), or back with `from_dst`.
    #[allow(clippy::too_many_arguments)]
    fn channels(
        &self,
        m: &mut B::Memory<'_>,
        dst: View,
        total: usize,
        at: usize,
        x: View,
        c: usize,
        plane: usize,
        from_dst: bool,
    ) -> Result<()> {
        for img in 0..self.b {
            let (part, own) = (dst.sub((img * total + at) * plane, c * plane), x.sub(img * c * plane, c * plane));
            if from_dst {
                self.be.copy(m, own, part)?;
            } else {
                self.be.copy(m, part, own)?;
            }
        }
        Ok(())
    }
}

/// Runs the head on the four feature maps `plan.feats()` (`[b, hidden, gh, gw]` each), in the
/// plan's BatchNorm mode, into `plan.logits` (and the auxiliary logits).
pub(crate) fn head_forward<B: ImageOps>(
    be: &B,
    m: &mut B::Memory<'_>,
    p: &ParamStore,
    head: &SegmentationHead,
    t: &HeadPlan,
) -> Result<()> {
    let b = t.b;
    let ctx = Ctx { be, p, b, mode: t.mode };
    let (gh, gw) = t.grid;
    let d = head.fpn1_bn.channels;
    let ch = head.channels;
    let k = head.num_labels;
    let sizes = t.sizes;

    // FPN.
    let s1 = up2_shape(b, d, gh, gw);
    ctx.up(m, head.fpn1_up1, s1, t.f1_up1, t.feats[0])?;
    ctx.bn_forward(m, &head.fpn1_bn, t.f1_up1, t.f1_bn, t.f1_saved, 4 * gh * gw)?;
    be.gelu(m, t.f1_gelu, t.f1_bn)?;
    ctx.up(m, head.fpn1_up2, up2_shape(b, d, 2 * gh, 2 * gw), t.level0, t.f1_gelu)?;
    ctx.up(m, head.fpn2_up, s1, t.level1, t.feats[1])?;
    be.max_pool2x2(m, t.level3, t.f4_saved, t.feats[3], b * d, gh, gw)?;

    // Auxiliary head on level 2.
    if let (Some(a), Some(at)) = (&head.aux, &t.aux) {
        for (u, c) in a.convs.iter().zip(&at.convs) {
            ctx.cbr_forward(m, u, c)?;
        }
        let last = at.convs.last().map_or(t.feats[2], |c| c.out);
        let cls_in = match (&a.conv_cat, &at.cat) {
            (Some(u), Some(c)) => {
                let total = d + a.channels;
                ctx.channels(m, c.x, total, 0, t.feats[2], d, gh * gw, false)?;
                ctx.channels(m, c.x, total, d, last, a.channels, gh * gw, false)?;
                ctx.cbr_forward(m, u, c)?;
                c.out
            }
            _ => last,
        };
        ctx.classifier(m, a.classifier, conv1x1_shape(b, a.channels, k, t.grid), at.logits, cls_in)?;
    }

    // UperHead: laterals of levels 0..2, pyramid pooling on level 3.
    for (u, c) in head.lateral.iter().zip(&t.lateral) {
        ctx.cbr_forward(m, u, c)?;
    }
    let (ph, pw) = sizes[3];
    let total3 = d + head.psp.len() * ch;
    let cat3 = t.bottleneck.x;
    ctx.channels(m, cat3, total3, 0, t.level3, d, ph * pw, false)?;
    for (i, ((u, c), &scale)) in head.psp.iter().zip(&t.psp).zip(&head.pool_scales).enumerate() {
        let pool = ResizeShape { planes: b * d, in_h: ph, in_w: pw, out_h: scale, out_w: scale };
        be.adaptive_avg_pool(m, c.x, t.level3, pool)?;
        ctx.cbr_forward(m, u, c)?;
        ctx.resize_into(m, cat3, total3, d + i * ch, c.out, ch, (scale, scale), (ph, pw))?;
    }
    ctx.cbr_forward(m, &head.bottleneck, &t.bottleneck)?;

    // Top-down path: L[i-1] = lateral[i-1] + up(L[i]), L3 the bottleneck's output.
    let lat = [t.lat[0], t.lat[1], t.lat[2], t.bottleneck.out];
    for (l, unit) in lat.iter().zip(&t.lateral) {
        be.copy(m, *l, unit.out)?;
    }
    for i in (1..4).rev() {
        let (h, w) = sizes[i];
        let (h0, w0) = sizes[i - 1];
        let up = t.up.prefix(b * ch * h0 * w0);
        be.bilinear_resize(m, up, lat[i], ResizeShape { planes: b * ch, in_h: h, in_w: w, out_h: h0, out_w: w0 })?;
        be.add_into(m, lat[i - 1], up)?;
    }
    for (u, c) in head.fpn_convs.iter().zip(&t.fpn) {
        ctx.cbr_forward(m, u, c)?;
    }
    // Fusion: the four maps at level 0's size, concatenated along channels.
    let (h0, w0) = sizes[0];
    let cat = t.fpnb.x;
    ctx.channels(m, cat, 4 * ch, 0, t.fpn[0].out, ch, h0 * w0, false)?;
    for (i, &size) in sizes.iter().enumerate().skip(1) {
        let src = if i < 3 { t.fpn[i].out } else { lat[3] };
        ctx.resize_into(m, cat, 4 * ch, i * ch, src, ch, size, (h0, w0))?;
    }
    ctx.cbr_forward(m, &head.fpn_bottleneck, &t.fpnb)?;
    ctx.classifier(m, head.classifier, conv1x1_shape(b, ch, k, (h0, w0)), t.logits, t.fpnb.out)
}

/// Backward of [`head_forward`] (which must have run on a training plan) from the logit
/// gradients in [`HeadPlan::logit_grads`]: parameter gradients are added to the memory's
/// gradients; dL/d(feature maps) land in [`HeadPlan::feat_grads`].
pub(crate) fn head_backward<B: ImageOps>(
    be: &B,
    m: &mut B::Memory<'_>,
    p: &ParamStore,
    head: &SegmentationHead,
    t: &HeadPlan,
) -> Result<()> {
    let b = t.b;
    let g = t.grads.as_ref().expect("the head's backward needs a training plan");
    let ctx = Ctx { be, p, b, mode: BnMode::Train };
    let (gh, gw) = t.grid;
    let d = head.fpn1_bn.channels;
    let ch = head.channels;
    let k = head.num_labels;
    let sizes = t.sizes;
    let (h0, w0) = sizes[0];

    // Classifier and fusion.
    ctx.classifier_backward(m, head.classifier, conv1x1_shape(b, ch, k, (h0, w0)), g.dfb, g.dlogits, t.fpnb.out)?;
    ctx.cbr_backward(m, &head.fpn_bottleneck, &t.fpnb, g.dfb, g.dcat, g)?;
    // Gradients of the top-down sums L0..L3.
    for (i, &(h, w)) in sizes.iter().enumerate() {
        let dfo = if i == 3 { g.dlat[3] } else { g.dpart.prefix(b * ch * h * w) };
        if i == 0 {
            ctx.channels(m, g.dcat, 4 * ch, 0, dfo, ch, h0 * w0, true)?;
        } else {
            ctx.resize_from_backward(m, dfo, ch, g.dcat, 4 * ch, i * ch, (h, w), (h0, w0))?;
        }
        if i < 3 {
            ctx.cbr_backward(m, &head.fpn_convs[i], &t.fpn[i], dfo, g.dlat[i], g)?;
        }
    }
    // Top-down path, reversed: L[i-1] = lat[i-1] + up(L[i]) was computed for i = 3, 2, 1.
    for i in 1..4 {
        let (h, w) = sizes[i];
        let (hp, wp) = sizes[i - 1];
        let up = g.dpart.prefix(b * ch * h * w);
        be.bilinear_resize_backward(
            m,
            up,
            g.dlat[i - 1],
            ResizeShape { planes: b * ch, in_h: h, in_w: w, out_h: hp, out_w: wp },
        )?;
        be.add_into(m, g.dlat[i], up)?;
    }

    // Pyramid pooling module and bottleneck → level 3.
    let (ph, pw) = sizes[3];
    let total3 = d + head.psp.len() * ch;
    ctx.cbr_backward(m, &head.bottleneck, &t.bottleneck, g.dlat[3], g.dcat3, g)?;
    ctx.channels(m, g.dcat3, total3, 0, g.dlevel3, d, ph * pw, true)?;
    for (i, ((u, c), &scale)) in head.psp.iter().zip(&t.psp).zip(&head.pool_scales).enumerate() {
        let dconv = g.dconv.prefix(b * ch * scale * scale);
        ctx.resize_from_backward(m, dconv, ch, g.dcat3, total3, d + i * ch, (scale, scale), (ph, pw))?;
        let dpooled = g.dpooled.prefix(b * d * scale * scale);
        ctx.cbr_backward(m, u, c, dconv, dpooled, g)?;
        let pool = ResizeShape { planes: b * d, in_h: ph, in_w: pw, out_h: scale, out_w: scale };
        be.adaptive_avg_pool_backward(m, g.dspread, dpooled, pool)?;
        be.add_into(m, g.dlevel3, g.dspread)?;
    }
    // Laterals → levels 0..2.
    for i in 0..3 {
        ctx.cbr_backward(m, &head.lateral[i], &t.lateral[i], g.dlat[i], g.dlevels[i], g)?;
    }

    // Auxiliary head → level 2.
    if let (Some(a), Some(at)) = (&head.aux, &t.aux) {
        let ca = a.channels;
        let cls_in = at.cat.as_ref().or(at.convs.last()).map_or(t.feats[2], |c| c.out);
        let cls_shape = conv1x1_shape(b, ca, k, t.grid);
        let dcls = g.aux_dcls;
        ctx.classifier_backward(m, a.classifier, cls_shape, dcls, g.daux, cls_in)?;
        let mut dh = dcls;
        let mut next = 0;
        if let (Some(u), Some(c)) = (&a.conv_cat, &at.cat) {
            ctx.cbr_backward(m, u, c, dh, g.aux_dcat, g)?;
            // dlevels[2] += the concatenation's first part, per image.
            for img in 0..b {
                let plane = gh * gw;
                let part = g.aux_dcat.sub(img * (d + ca) * plane, d * plane);
                be.add_into(m, g.dlevels[2].sub(img * d * plane, d * plane), part)?;
            }
            dh = g.aux_d[next].prefix(b * ca * gh * gw);
            next = 1 - next;
            ctx.channels(m, g.aux_dcat, d + ca, d, dh, ca, gh * gw, true)?;
        }
        for (u, c) in a.convs.iter().zip(&at.convs).rev() {
            let dx = g.aux_d[next].prefix(c.x.len());
            next = 1 - next;
            ctx.cbr_backward(m, u, c, dh, dx, g)?;
            dh = dx;
        }
        be.add_into(m, g.dlevels[2], dh)?;
    }

    // FPN → backbone features.
    let s1 = up2_shape(b, d, gh, gw);
    let s2 = up2_shape(b, d, 2 * gh, 2 * gw);
    ctx.up_backward(m, head.fpn1_up2, s2, g.dgelu, g.dlevels[0], t.f1_gelu)?;
    be.gelu_input_backward(m, g.dbn, g.dgelu, t.f1_bn)?;
    ctx.bn_backward(m, &head.fpn1_bn, g.dup1, g.dbn, t.f1_up1, t.f1_saved, 4 * gh * gw)?;
    ctx.up_backward(m, head.fpn1_up1, s1, g.dfeats[0], g.dup1, t.feats[0])?;
    ctx.up_backward(m, head.fpn2_up, s1, g.dfeats[1], g.dlevels[1], t.feats[1])?;
    be.max_pool2x2_backward(m, g.dfeats[3], g.dlevel3, t.f4_saved, b * d, gh, gw, DxMode::Overwrite)
}
