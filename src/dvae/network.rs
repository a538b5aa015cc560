//! The tokenizer's networks, llm.c style: a list of stages, each with an explicit forward and
//! backward, activations kept on a tape only when training.
//!
//! The encoder is OpenAI's DALL-E encoder (`dall_e/encoder.py`) with its sizes as parameters:
//! a 7x7 input convolution, `group_count` groups of residual blocks (widths n, 2n, 4n, ...) with
//! a 2x max pool after every group but the last, then ReLU and a 1x1 convolution to one logit
//! per code. The decoder of a dVAE trained here mirrors it (DALL-E's decoder blocks) but
//! upsamples with learned 4x4 stride-2 transposed convolutions instead of nearest-neighbour
//! copies, and ends in a 1x1 convolution to pixels.
//!
//! Feature maps are NCHW like PyTorch. The two convolutions that touch the codebook (encoder
//! output, decoder input) are 1x1, so they are plain matrix products; they run "token-major",
//! one row per grid position (`[B·P, V]`), so the softmax over codes, the Gumbel noise and the
//! argmax all read contiguous rows.

use std::cell::RefCell;

use crate::backend::code_ops::CodeOps;
use crate::backend::image_ops::ImageOps;
use crate::backend::memory::{Arena, HostMemory, Planner, View};
use crate::backend::ops::DxMode;
use crate::backend::shapes::Conv2dShape;
use crate::backend::Backend;
use crate::context::host_backend;
use crate::error::{Error, Result};
use crate::model::params::{Init, ParamId, ParamStore};
use crate::resources::{Bytes, Need};

use super::config::DvaeConfig;

/// A feature map's per-image geometry; the batch size travels separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Geometry {
    pub fn len(&self, batch: usize) -> usize {
        batch * self.channels * self.height * self.width
    }
}

/// One convolution (or transposed convolution) with its weight and bias.
#[derive(Debug, Clone)]
pub struct ConvLayer {
    pub weight: ParamId,
    pub bias: ParamId,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub transposed: bool,
}

impl ConvLayer {
    /// A 'same' convolution (stride 1, padding (k−1)/2), DALL-E's `Conv2d`.
    fn same(store: &mut ParamStore, name: &str, n_in: usize, n_out: usize, kernel: usize) -> Self {
        let std = 1.0 / ((n_in * kernel * kernel) as f32).sqrt();
        ConvLayer {
            weight: store.push(format!("{name}.w"), &[n_out, n_in, kernel, kernel], Init::Normal { std }),
            bias: store.push(format!("{name}.b"), &[n_out], Init::Zeros),
            in_channels: n_in,
            out_channels: n_out,
            kernel,
            stride: 1,
            padding: (kernel - 1) / 2,
            transposed: false,
        }
    }

    /// A 4x4 stride-2 transposed convolution that doubles the resolution, keeping the width.
    fn upsample(store: &mut ParamStore, name: &str, n: usize) -> Self {
        let std = 1.0 / ((n * 4) as f32).sqrt();
        ConvLayer {
            weight: store.push(format!("{name}.w"), &[n, n, 4, 4], Init::Normal { std }),
            bias: store.push(format!("{name}.b"), &[n], Init::Zeros),
            in_channels: n,
            out_channels: n,
            kernel: 4,
            stride: 2,
            padding: 1,
            transposed: true,
        }
    }

    fn shape(&self, batch: usize, g: Geometry) -> Conv2dShape {
        debug_assert_eq!(g.channels, self.in_channels);
        Conv2dShape {
            batch,
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            in_h: g.height,
            in_w: g.width,
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        }
    }

    /// Floats of one image's column matrix, which the CPU convolution keeps per image in flight,
    /// forward and backward: `in_channels·k²` rows over the output plane for a convolution
    /// (im2col of its input), `out_channels·k²` rows over the input plane for a transposed one
    /// (the scatter buffer of its output).
    fn columns_per_image(&self, g: Geometry) -> Bytes {
        let out = self.output(g);
        let (rows, plane) = if self.transposed {
            (self.out_channels, g.height * g.width)
        } else {
            (self.in_channels, out.height * out.width)
        };
        Bytes::floats(&[rows, self.kernel, self.kernel, plane])
    }

    fn output(&self, g: Geometry) -> Geometry {
        let s = self.shape(1, g);
        let (height, width) =
            if self.transposed { (s.transpose_out_h(), s.transpose_out_w()) } else { (s.out_h(), s.out_w()) };
        Geometry { channels: self.out_channels, height, width }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        x: View,
        out: View,
        batch: usize,
        g: Geometry,
    ) -> Result<()> {
        let shape = self.shape(batch, g);
        let (w, b) = (store.view(self.weight), Some(store.view(self.bias)));
        if self.transposed {
            be.conv_transpose2d(m, out, x, w, b, shape)
        } else {
            be.conv2d(m, out, x, w, b, shape)
        }
    }

    /// Parameter gradients accumulate into the memory's gradients (laid out like `store.data`).
    #[allow(clippy::too_many_arguments)]
    fn backward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        x: View,
        dout: View,
        dx: Option<(View, DxMode)>,
        batch: usize,
        g: Geometry,
    ) -> Result<()> {
        let shape = self.shape(batch, g);
        let (dw, db) = (store.grad_view(self.weight), store.grad_view(self.bias));
        let w = store.view(self.weight);
        if self.transposed {
            be.conv_transpose2d_backward(m, dx, dw, Some(db), dout, x, w, shape)
        } else {
            be.conv2d_backward(m, dx, dw, Some(db), dout, x, w, shape)
        }
    }
}

/// DALL-E's residual block: `out = id(x) + gain · conv4(relu(conv3(relu(conv2(relu(conv1(relu(x))))))))`
/// with `id` a 1x1 convolution when the width changes. Encoder blocks use kernels 3,3,3,1 and
/// decoder blocks 1,3,3,3; the hidden width is a quarter of the output width.
#[derive(Debug, Clone)]
pub struct ResBlock {
    pub id_path: Option<ConvLayer>,
    pub res_path: [ConvLayer; 4],
    pub gain: f32,
}

impl ResBlock {
    fn new(store: &mut ParamStore, name: &str, n_in: usize, n_out: usize, kernels: [usize; 4], gain: f32) -> Self {
        let hid = n_out / 4;
        let id_path = (n_in != n_out).then(|| ConvLayer::same(store, &format!("{name}.id_path"), n_in, n_out, 1));
        let widths = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)];
        let res_path = std::array::from_fn(|i| {
            ConvLayer::same(store, &format!("{name}.res_path.conv_{}", i + 1), widths[i].0, widths[i].1, kernels[i])
        });
        ResBlock { id_path, res_path, gain }
    }

    /// Geometries of the four residual convolutions' inputs.
    fn res_inputs(&self, g: Geometry) -> [Geometry; 4] {
        std::array::from_fn(|i| Geometry { channels: self.res_path[i].in_channels, ..g })
    }

    fn output(&self, g: Geometry) -> Geometry {
        Geometry { channels: self.res_path[3].out_channels, ..g }
    }

    /// Writes the block output into `out`, keeping the four ReLU outputs (the residual
    /// convolutions' inputs, which the backward needs) in `v.acts`.
    #[allow(clippy::too_many_arguments)]
    fn forward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        x: View,
        out: View,
        v: &BlockViews,
        batch: usize,
        g: Geometry,
    ) -> Result<()> {
        let geos = self.res_inputs(g);
        let acts: [View; 4] = std::array::from_fn(|i| v.acts[i].prefix(geos[i].len(batch)));
        be.relu(m, acts[0], x)?;
        for i in 0..3 {
            // conv_{i+1} writes straight into the next activation buffer, then ReLU in place.
            self.res_path[i].forward(be, m, store, acts[i], acts[i + 1], batch, geos[i])?;
            be.relu(m, acts[i + 1], acts[i + 1])?;
        }
        let residual = v.residual.prefix(out.len());
        self.res_path[3].forward(be, m, store, acts[3], residual, batch, geos[3])?;
        match &self.id_path {
            Some(id) => id.forward(be, m, store, x, out, batch, g)?,
            None => be.copy(m, out, x)?,
        }
        be.add_scaled(m, out, residual, self.gain)
    }

    /// Backward for `dout` into `dx` (written); `d` lends two gradient buffers as large as the
    /// block's largest map.
    #[allow(clippy::too_many_arguments)]
    fn backward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        x: View,
        v: &BlockViews,
        dout: View,
        dx: View,
        d: [View; 2],
        batch: usize,
        g: Geometry,
    ) -> Result<()> {
        let geos = self.res_inputs(g);
        let mut cur = d[0].prefix(dout.len());
        be.copy(m, cur, dout)?;
        be.scale(m, cur, self.gain)?;
        for i in (0..4).rev() {
            let act = v.acts[i].prefix(geos[i].len(batch));
            let d_act = d[(4 - i) % 2].prefix(act.len());
            self.res_path[i].backward(be, m, store, act, cur, Some((d_act, DxMode::Overwrite)), batch, geos[i])?;
            // acts[i] = relu(previous), so acts[i] > 0 exactly where the ReLU passed its input;
            // masking d_act in place gives the pre-activation's gradient.
            if i > 0 {
                be.relu_backward(m, d_act, d_act, act, DxMode::Overwrite)?;
                cur = d_act;
            } else {
                be.relu_backward(m, dx, d_act, act, DxMode::Overwrite)?;
            }
        }
        match &self.id_path {
            Some(id) => id.backward(be, m, store, x, dout, Some((dx, DxMode::Accumulate)), batch, g),
            None => be.add_into(m, dx, dout),
        }
    }
}

/// One step of a network's spatial part.
// A network holds a dozen stages, built once: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Stage {
    Conv(ConvLayer),
    Block(ResBlock),
    MaxPool2x2,
    Relu,
}

/// What a stage's forward holds per image besides its input: the output, the scratch it keeps
/// for the backward (a block's four activations and its residual branch, a pool's argmax), and
/// the largest column matrix of its convolutions (one per image in flight).
#[derive(Debug, Clone, Copy)]
struct StageCost {
    output: Bytes,
    saved: Bytes,
    columns: Bytes,
}

/// The larger of two byte counts (an overflowed count is the larger).
fn larger(a: Bytes, b: Bytes) -> Bytes {
    match (a.get(), b.get()) {
        (Some(x), Some(y)) => Bytes::new(x.max(y)),
        _ => Bytes::from(None),
    }
}

/// Images whose convolution columns exist at once: one per pool thread, at most the batch.
fn images_in_flight(batch: usize) -> usize {
    batch.min(rayon::current_num_threads()).max(1)
}

/// Per-image memory of running `stages` from `input`, and what a whole batch needs.
#[derive(Debug, Clone, Copy)]
pub struct ChainCost {
    /// The largest stage: input + output + scratch, per image.
    peak: Bytes,
    /// Every stage's input, output and scratch summed: what a training forward keeps on its
    /// tape (plus the last output), per image.
    tape: Bytes,
    /// The largest column matrix of any convolution, per image in flight.
    columns: Bytes,
    /// The last stage's output geometry.
    output: Geometry,
}

impl ChainCost {
    fn of(stages: &[Stage], input: Geometry) -> ChainCost {
        let (mut peak, mut tape, mut columns, mut g) = (Bytes::ZERO, Bytes::ZERO, Bytes::ZERO, input);
        for stage in stages {
            let c = stage.cost(g);
            let step = Bytes::floats(&[g.len(1)]) + c.output + c.saved;
            peak = larger(peak, step);
            tape += step;
            columns = larger(columns, c.columns);
            g = stage.output(g);
        }
        ChainCost { peak, tape, columns, output: g }
    }

    /// An inference pass over `batch` images: the largest stage's buffers for every image, and
    /// the column matrices of the images in flight.
    fn inference(&self, batch: usize) -> Bytes {
        self.peak * batch + self.columns * images_in_flight(batch)
    }

    /// A training forward and backward over `batch` images: the tape, then the backward's
    /// gradients of the largest stage (its output's, its input's and its activations': twice
    /// the stage) beside it, and the column matrices.
    fn training(&self, batch: usize) -> Bytes {
        (self.tape + self.peak * 2) * batch + self.columns * images_in_flight(batch)
    }
}

/// The views a block's forward writes besides its output: the four ReLU outputs and the
/// residual branch (each at least as large as the block needs).
#[derive(Debug, Clone, Copy)]
struct BlockViews {
    acts: [View; 4],
    residual: View,
}

/// What a stage keeps for its backward, beside its input.
#[derive(Debug, Clone, Copy)]
enum Saved {
    Nothing,
    Block(BlockViews),
    Pool(View),
}

impl Stage {
    fn cost(&self, g: Geometry) -> StageCost {
        let out = self.output(g);
        let output = Bytes::floats(&[out.len(1)]);
        match self {
            Stage::Conv(c) => StageCost { output, saved: Bytes::ZERO, columns: c.columns_per_image(g) },
            Stage::Block(b) => {
                let saved = b.res_inputs(g).iter().map(|a| Bytes::floats(&[a.len(1)])).sum::<Bytes>() + output;
                // Every convolution of a block keeps the resolution; only the widths differ.
                let columns = b
                    .id_path
                    .iter()
                    .chain(&b.res_path)
                    .map(|c| c.columns_per_image(Geometry { channels: c.in_channels, ..g }))
                    .fold(Bytes::ZERO, larger);
                StageCost { output, saved, columns }
            }
            // The argmax is u32, the size of an f32.
            Stage::MaxPool2x2 => StageCost { output, saved: output, columns: Bytes::ZERO },
            Stage::Relu => StageCost { output, saved: Bytes::ZERO, columns: Bytes::ZERO },
        }
    }

    fn output(&self, g: Geometry) -> Geometry {
        match self {
            Stage::Conv(c) => c.output(g),
            Stage::Block(b) => b.output(g),
            Stage::MaxPool2x2 => Geometry { channels: g.channels, height: g.height / 2, width: g.width / 2 },
            Stage::Relu => g,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        x: View,
        out: View,
        saved: &Saved,
        batch: usize,
        g: Geometry,
    ) -> Result<()> {
        match (self, saved) {
            (Stage::Conv(c), _) => c.forward(be, m, store, x, out, batch, g),
            (Stage::Block(b), Saved::Block(v)) => b.forward(be, m, store, x, out, v, batch, g),
            (Stage::MaxPool2x2, Saved::Pool(argmax)) => {
                let argmax = argmax.prefix(be.max_pool2x2_saved_len(out.len()));
                be.max_pool2x2(m, out, argmax, x, batch * g.channels, g.height, g.width)
            }
            (Stage::Relu, _) => be.relu(m, out, x),
            _ => unreachable!("a stage's saved views match its kind"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        x: View,
        saved: &Saved,
        dout: View,
        dx: View,
        block: [View; 2],
        batch: usize,
        g: Geometry,
    ) -> Result<()> {
        match (self, saved) {
            (Stage::Conv(c), _) => c.backward(be, m, store, x, dout, Some((dx, DxMode::Overwrite)), batch, g),
            (Stage::Block(b), Saved::Block(v)) => b.backward(be, m, store, x, v, dout, dx, block, batch, g),
            (Stage::MaxPool2x2, Saved::Pool(argmax)) => {
                let argmax = argmax.prefix(be.max_pool2x2_saved_len(dout.len()));
                be.max_pool2x2_backward(m, dx, dout, argmax, batch * g.channels, g.height, g.width, DxMode::Overwrite)
            }
            (Stage::Relu, _) => be.relu_backward(m, dx, dout, x, DxMode::Overwrite),
            _ => unreachable!("a stage's saved views match its kind"),
        }
    }
}

/// The views of one pass through a chain of stages. Stage `i` reads `maps[i]` and writes
/// `maps[i + 1]`. A training plan gives every map and every stage's kept views their own
/// memory (the tape) and plans the backward's gradients; an inference plan alternates two map
/// buffers and shares one set of scratch among the stages.
#[derive(Debug, Clone)]
struct ChainPlan {
    maps: Vec<View>,
    geos: Vec<Geometry>,
    saved: Vec<Saved>,
    /// Gradients of the maps (two buffers, alternating) and a block's two gradient buffers.
    grads: Option<([View; 2], [View; 2])>,
}

impl ChainPlan {
    fn new<B: ImageOps>(
        be: &B,
        plan: &mut Planner,
        stages: &[Stage],
        input: View,
        g: Geometry,
        batch: usize,
        training: bool,
    ) -> Self {
        let mut geos = vec![g];
        for s in stages {
            let last = *geos.last().expect("non-empty");
            geos.push(s.output(last));
        }
        let len = |g: &Geometry| g.len(batch);
        let largest = geos.iter().map(len).max().unwrap_or(0);
        let block_views = |plan: &mut Planner, b: &ResBlock, g: Geometry| BlockViews {
            acts: b.res_inputs(g).map(|a| plan.act(a.len(batch))),
            residual: plan.act(b.output(g).len(batch)),
        };
        let mut maps = vec![input];
        let mut saved = Vec::with_capacity(stages.len());
        if training {
            for (s, g) in stages.iter().zip(&geos) {
                saved.push(match s {
                    Stage::Block(b) => Saved::Block(block_views(plan, b, *g)),
                    Stage::MaxPool2x2 => Saved::Pool(plan.stat(be.max_pool2x2_saved_len(len(&s.output(*g))))),
                    _ => Saved::Nothing,
                });
                maps.push(plan.act(len(&s.output(*g))));
            }
        } else {
            let outputs = geos[1..].iter().map(len).max().unwrap_or(0);
            let pair = [plan.act(outputs), plan.act(outputs)];
            // One scratch for every block: each view as large as the largest block needs.
            let mut widest = [0usize; 5];
            let mut pool = 0;
            for (s, g) in stages.iter().zip(&geos) {
                match s {
                    Stage::Block(b) => {
                        for (w, a) in widest.iter_mut().zip(b.res_inputs(*g)) {
                            *w = (*w).max(a.len(batch));
                        }
                        widest[4] = widest[4].max(b.output(*g).len(batch));
                    }
                    Stage::MaxPool2x2 => pool = pool.max(be.max_pool2x2_saved_len(len(&s.output(*g)))),
                    _ => {}
                }
            }
            let shared =
                BlockViews { acts: std::array::from_fn(|i| plan.act(widest[i])), residual: plan.act(widest[4]) };
            let argmax = plan.stat(pool);
            for (i, (s, g)) in stages.iter().zip(&geos).enumerate() {
                saved.push(match s {
                    Stage::Block(_) => Saved::Block(shared),
                    Stage::MaxPool2x2 => Saved::Pool(argmax),
                    _ => Saved::Nothing,
                });
                maps.push(pair[i % 2].prefix(len(&s.output(*g))));
            }
        }
        let grads = training.then(|| ([plan.act(largest), plan.act(largest)], [plan.act(largest), plan.act(largest)]));
        ChainPlan { maps, geos, saved, grads }
    }

    /// The chain's output map.
    fn output(&self) -> View {
        *self.maps.last().expect("non-empty")
    }

    /// The gradient buffer of map `i` (training plans).
    fn grad(&self, i: usize) -> View {
        let (maps, _) = self.grads.expect("a training plan");
        maps[i % 2].prefix(self.maps[i].len())
    }

    fn forward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        stages: &[Stage],
        store: &ParamStore,
        batch: usize,
    ) -> Result<()> {
        for (i, s) in stages.iter().enumerate() {
            s.forward(be, m, store, self.maps[i], self.maps[i + 1], &self.saved[i], batch, self.geos[i])?;
        }
        Ok(())
    }

    /// Backward through the stages from the gradient of the output ([`ChainPlan::grad`] of the
    /// last map) to the input's (`grad(0)`).
    fn backward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        stages: &[Stage],
        store: &ParamStore,
        batch: usize,
    ) -> Result<()> {
        let (_, block) = self.grads.expect("a training plan");
        for (i, s) in stages.iter().enumerate().rev() {
            let (dout, dx) = (self.grad(i + 1), self.grad(i));
            s.backward(be, m, store, self.maps[i], &self.saved[i], dout, dx, block, batch, self.geos[i])?;
        }
        Ok(())
    }
}

/// A 1x1 convolution applied token-major: `rows[B·P, n_out] = rows[B·P, n_in] · Wᵀ + b` with W
/// stored as the convolution's `[n_out, n_in, 1, 1]`.
#[derive(Debug, Clone)]
pub struct PointwiseLayer {
    pub weight: ParamId,
    pub bias: ParamId,
    pub n_in: usize,
    pub n_out: usize,
}

impl PointwiseLayer {
    fn new(store: &mut ParamStore, name: &str, n_in: usize, n_out: usize) -> Self {
        let conv = ConvLayer::same(store, name, n_in, n_out, 1);
        PointwiseLayer { weight: conv.weight, bias: conv.bias, n_in, n_out }
    }

    fn forward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        rows: View,
        out: View,
    ) -> Result<()> {
        let r = rows.len() / self.n_in;
        let (w, b) = (store.view(self.weight), store.view(self.bias));
        be.linear(m, out, rows, w, Some(b), r, self.n_in, self.n_out)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        rows: View,
        dout: View,
        drows: Option<View>,
    ) -> Result<()> {
        let r = rows.len() / self.n_in;
        let (dw, db) = (store.grad_view(self.weight), store.grad_view(self.bias));
        be.linear_backward(m, drows, dw, Some(db), dout, rows, store.view(self.weight), r, self.n_in, self.n_out)
    }
}

/// The host memory of one network pass: its plan's arena. A training forward leaves it on the
/// network's tape, where the backward works in it too.
#[derive(Debug)]
struct HostPass<P> {
    plan: P,
    arena: Arena,
}

/// Plans a pass with `plan_views` and allocates its host memory.
fn host_pass<P>(plan_views: impl FnOnce(&mut Planner) -> P) -> Result<HostPass<P>> {
    let mut planner = Planner::shared();
    let plan = plan_views(&mut planner);
    Ok(HostPass { plan, arena: Arena::new(&planner)? })
}

/// Image → code logits.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub stages: Vec<Stage>,
    pub output: PointwiseLayer,
    pub input: Geometry,
}

/// The views of one encoder pass.
#[derive(Debug)]
pub(crate) struct EncoderPlan {
    chain: ChainPlan,
    /// The last feature map, token-major (the output convolution's input), and its gradient
    /// (training).
    rows: View,
    drows: View,
    /// The code logits, token-major `[B·P, V]`.
    pub logits: View,
}

impl EncoderPlan {
    /// The pixels `[B, C, H, W]` the pass reads.
    pub(crate) fn input(&self) -> View {
        self.chain.maps[0]
    }
}

/// What the encoder's training forward keeps: its pass's memory, where the backward works too.
#[derive(Debug, Default)]
pub struct EncoderTape {
    pass: RefCell<Option<HostPass<EncoderPlan>>>,
}

impl Encoder {
    fn new(store: &mut ParamStore, cfg: &DvaeConfig, prefix: &str) -> Self {
        let gain = cfg.post_gain();
        let mut stages =
            vec![Stage::Conv(ConvLayer::same(store, &format!("{prefix}blocks.input"), cfg.in_channels, cfg.n_hid, 7))];
        let mut width = cfg.n_hid;
        for g in 1..=cfg.group_count {
            let n_out = cfg.group_width(g);
            for k in 1..=cfg.n_blk_per_group {
                let name = format!("{prefix}blocks.group_{g}.block_{k}");
                stages.push(Stage::Block(ResBlock::new(store, &name, width, n_out, [3, 3, 3, 1], gain)));
                width = n_out;
            }
            if g < cfg.group_count {
                stages.push(Stage::MaxPool2x2);
            }
        }
        stages.push(Stage::Relu);
        let output = PointwiseLayer::new(store, &format!("{prefix}blocks.output.conv"), width, cfg.vocab_size);
        let input = Geometry { channels: cfg.in_channels, height: cfg.image_size, width: cfg.image_size };
        Encoder { stages, output, input }
    }

    /// Memory of one pass over `batch` images, `training` or not (an estimate from above):
    /// the stages' buffers ([`ChainCost`]), the input's copy, the last feature map twice
    /// (token-major, and its gradient when training) and the logits.
    pub fn pass_bytes(&self, batch: usize, training: bool) -> Bytes {
        let chain = ChainCost::of(&self.stages, self.input);
        let g = chain.output;
        let edges = Bytes::floats(&[self.input.len(1)])
            + Bytes::floats(&[g.len(1)]) * 2
            + Bytes::floats(&[g.height * g.width, self.output.n_out]);
        let stages = if training { chain.training(batch) } else { chain.inference(batch) };
        stages + edges * batch
    }

    /// Code logits, token-major `[B·P, V]`, for `pixels` `[B, C, H, W]` already mapped with
    /// `map_pixels`. With `tape`, keeps what [`Encoder::backward`] needs.
    pub fn forward(
        &self,
        store: &ParamStore,
        pixels: &[f32],
        batch: usize,
        tape: Option<&mut EncoderTape>,
    ) -> Vec<f32> {
        let mut logits = Vec::new();
        self.forward_into(store, pixels, batch, tape, &mut logits);
        logits
    }

    /// [`Encoder::forward`] into `logits` (resized; its allocation is reused: at 8192 codes the
    /// logits of a batch of 64 are 134 MB, and a fresh allocation every step costs page faults).
    pub fn forward_into(
        &self,
        store: &ParamStore,
        pixels: &[f32],
        batch: usize,
        tape: Option<&mut EncoderTape>,
        logits: &mut Vec<f32>,
    ) {
        assert_eq!(pixels.len(), self.input.len(batch), "encoder input size");
        let be = host_backend();
        let training = tape.is_some();
        let mut pass = host_pass(|p| self.plan(&be, p, batch, training)).expect("the memory of an encoder pass");
        let mut m = HostMemory::new(&mut pass.arena, &store.data, &mut []);
        logits.resize(pass.plan.logits.len(), 0.0);
        let plan = &pass.plan;
        let mut run = |m: &mut HostMemory<'_>| -> Result<()> {
            be.upload(m, plan.input(), pixels)?;
            self.forward_views(&be, m, store, plan, batch)?;
            be.download(m, plan.logits, logits)
        };
        run(&mut m).expect("host ops");
        if let Some(t) = tape {
            *t.pass.get_mut() = Some(pass);
        }
    }

    /// The hard codes (argmax of the logits) of `pixels` `[B, C, H, W]`, appended to `tokens`.
    pub(crate) fn tokens_into(
        &self,
        store: &ParamStore,
        pixels: &[f32],
        batch: usize,
        tokens: &mut Vec<u32>,
    ) -> Result<()> {
        assert_eq!(pixels.len(), self.input.len(batch), "encoder input size");
        let be = host_backend();
        let mut pass = host_pass(|p| self.plan(&be, p, batch, false))?;
        let mut m = HostMemory::new(&mut pass.arena, &store.data, &mut []);
        self.tokens_views(&be, &mut m, store, &pass.plan, pixels, batch, tokens)
    }

    /// The tokenizing pass over planned views (an inference plan of `batch` images): uploads
    /// `pixels` `[B, C, H, W]`, runs the forward and appends the argmax of each grid position's
    /// logits to `tokens`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn tokens_views<B: ImageOps + CodeOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        plan: &EncoderPlan,
        pixels: &[f32],
        batch: usize,
        tokens: &mut Vec<u32>,
    ) -> Result<()> {
        be.upload(m, plan.input(), pixels)?;
        self.forward_views(be, m, store, plan, batch)?;
        let start = tokens.len();
        tokens.resize(start + plan.logits.len() / self.output.n_out, 0);
        be.argmax_rows(m, plan.logits, self.output.n_out, &mut tokens[start..])
    }

    /// The views of a pass over `batch` images (with the backward's when `training`).
    pub(crate) fn plan<B: ImageOps>(&self, be: &B, p: &mut Planner, batch: usize, training: bool) -> EncoderPlan {
        let input = p.act(self.input.len(batch));
        let chain = ChainPlan::new(be, p, &self.stages, input, self.input, batch, training);
        let features = chain.output().len();
        let g = *chain.geos.last().expect("non-empty");
        let rows = p.act(features);
        let drows = p.act(if training { features } else { 0 });
        let logits = p.act(batch * g.height * g.width * self.output.n_out);
        EncoderPlan { chain, rows, drows, logits }
    }

    /// The forward over planned views: `plan.input()` → `plan.logits`.
    pub(crate) fn forward_views<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        plan: &EncoderPlan,
        batch: usize,
    ) -> Result<()> {
        plan.chain.forward(be, m, &self.stages, store, batch)?;
        let g = *plan.chain.geos.last().expect("non-empty");
        be.transpose(m, plan.rows, plan.chain.output(), batch, g.channels, g.height * g.width)?;
        self.output.forward(be, m, store, plan.rows, plan.logits)
    }

    /// Accumulates parameter gradients from `dlogits` (token-major); the input gradient is not
    /// needed (pixels are data).
    pub fn backward(&self, store: &ParamStore, grads: &mut [f32], tape: &EncoderTape, dlogits: &[f32], batch: usize) {
        let mut pass = tape.pass.borrow_mut();
        let pass = pass.as_mut().expect("backward after a training forward");
        let be = host_backend();
        let mut m = HostMemory::new(&mut pass.arena, &store.data, grads);
        let plan = &pass.plan;
        // The logits' buffer takes their gradient: the forward is done with them.
        let run = |m: &mut HostMemory<'_>| -> Result<()> {
            be.upload(m, plan.logits, dlogits)?;
            self.backward_views(&be, m, store, plan, plan.logits, batch)
        };
        run(&mut m).expect("host ops");
    }

    /// The backward over planned views from `dlogits` (`[B·P, V]`): parameter gradients added.
    pub(crate) fn backward_views<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        plan: &EncoderPlan,
        dlogits: View,
        batch: usize,
    ) -> Result<()> {
        self.output.backward(be, m, store, plan.rows, dlogits, Some(plan.drows))?;
        let chain = &plan.chain;
        let last = chain.maps.len() - 1;
        let g = chain.geos[last];
        be.transpose(m, chain.grad(last), plan.drows, batch, g.height * g.width, g.channels)?;
        chain.backward(be, m, &self.stages, store, batch)
    }
}

/// Relaxed one-hot codes → reconstructed (mapped) pixels.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub input: PointwiseLayer,
    pub stages: Vec<Stage>,
    pub grid: Geometry,
}

/// The views of one decoder pass.
#[derive(Debug)]
pub(crate) struct DecoderPlan {
    /// The codes (token-major) and their gradient (training), the input convolution's rows and
    /// their gradient (training).
    codes: View,
    dcodes: View,
    rows: View,
    drows: View,
    chain: ChainPlan,
}

/// What the decoder's training forward keeps: its pass's memory, where the backward works too.
#[derive(Debug, Default)]
pub struct DecoderTape {
    pass: RefCell<Option<HostPass<DecoderPlan>>>,
}

impl Decoder {
    fn new(store: &mut ParamStore, cfg: &DvaeConfig, n_init: usize, prefix: &str) -> Self {
        let gain = cfg.post_gain();
        let input = PointwiseLayer::new(store, &format!("{prefix}blocks.input"), cfg.vocab_size, n_init);
        let mut stages = Vec::new();
        let mut width = n_init;
        for g in 1..=cfg.group_count {
            let n_out = cfg.group_width(cfg.group_count + 1 - g);
            for k in 1..=cfg.n_blk_per_group {
                let name = format!("{prefix}blocks.group_{g}.block_{k}");
                stages.push(Stage::Block(ResBlock::new(store, &name, width, n_out, [1, 3, 3, 3], gain)));
                width = n_out;
            }
            if g < cfg.group_count {
                stages.push(Stage::Conv(ConvLayer::upsample(
                    store,
                    &format!("{prefix}blocks.group_{g}.upsample"),
                    width,
                )));
            }
        }
        stages.push(Stage::Relu);
        stages.push(Stage::Conv(ConvLayer::same(
            store,
            &format!("{prefix}blocks.output.conv"),
            width,
            cfg.in_channels,
            1,
        )));
        let grid = Geometry { channels: n_init, height: cfg.grid(), width: cfg.grid() };
        Decoder { input, stages, grid }
    }

    /// Memory of one pass over `batch` images, `training` or not (an estimate from above): the
    /// stages' buffers ([`ChainCost`]), the input convolution's rows and their NCHW copy, and the
    /// pass's copy of the codes (with their gradient when training).
    pub fn pass_bytes(&self, batch: usize, training: bool) -> Bytes {
        let codes = Bytes::floats(&[self.grid.height * self.grid.width, self.input.n_in]) * (1 + training as usize);
        self.pass_bytes_on_codes(batch, training) + codes * batch
    }

    /// [`Decoder::pass_bytes`] of a pass that reads the codes (and writes their gradient) in
    /// views of its caller's.
    pub(crate) fn pass_bytes_on_codes(&self, batch: usize, training: bool) -> Bytes {
        let chain = ChainCost::of(&self.stages, self.grid);
        let stages = if training { chain.training(batch) } else { chain.inference(batch) };
        stages + Bytes::floats(&[self.grid.len(1)]) * (2 * batch)
    }

    /// Pixels `[B, C, H, W]` (in `map_pixels` space) from codes token-major `[B·P, V]`.
    pub fn forward(&self, store: &ParamStore, codes: &[f32], batch: usize, tape: Option<&mut DecoderTape>) -> Vec<f32> {
        let be = host_backend();
        let training = tape.is_some();
        let mut pass = host_pass(|p| self.plan(&be, p, batch, training, None)).expect("the memory of a decoder pass");
        let mut m = HostMemory::new(&mut pass.arena, &store.data, &mut []);
        let plan = &pass.plan;
        let mut pixels = vec![0.0; plan.output().len()];
        let mut run = |m: &mut HostMemory<'_>| -> Result<()> {
            be.upload(m, plan.codes, codes)?;
            self.forward_views(&be, m, store, plan, batch)?;
            be.download(m, plan.output(), &mut pixels)
        };
        run(&mut m).expect("host ops");
        if let Some(t) = tape {
            *t.pass.get_mut() = Some(pass);
        }
        pixels
    }

    /// Mapped pixels `[B, C, H, W]` of the hard tokens `[B, P]`, appended to `pixels`: one
    /// inference pass on the host (see [`Decoder::decode_views`]).
    pub(crate) fn decode_into(
        &self,
        store: &ParamStore,
        tokens: &[u32],
        batch: usize,
        pixels: &mut Vec<f32>,
    ) -> Result<()> {
        let be = host_backend();
        let mut pass = host_pass(|p| self.plan(&be, p, batch, false, None))?;
        let mut m = HostMemory::new(&mut pass.arena, &store.data, &mut []);
        self.decode_views(&be, &mut m, store, &pass.plan, tokens, batch, pixels)
    }

    /// The decoding pass over planned views (an inference plan of `batch` images, with codes
    /// of its own): uploads the one-hot codes of `tokens` `[B, P]` (token-major, as the
    /// relaxation gives them in training, so the input layer is the same product), runs the
    /// forward and appends the pixels to `pixels`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_views<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        plan: &DecoderPlan,
        tokens: &[u32],
        batch: usize,
        pixels: &mut Vec<f32>,
    ) -> Result<()> {
        let v = self.input.n_in;
        let mut one_hot = vec![0.0f32; tokens.len() * v];
        for (row, &t) in one_hot.chunks_exact_mut(v).zip(tokens) {
            row[t as usize] = 1.0;
        }
        be.upload(m, plan.codes, &one_hot)?;
        self.forward_views(be, m, store, plan, batch)?;
        let start = pixels.len();
        pixels.resize(start + plan.output().len(), 0.0);
        be.download(m, plan.output(), &mut pixels[start..])
    }

    /// The views of a pass over `batch` images (with the backward's when `training`), reading
    /// the codes from `codes` (and writing their gradient to its second view) when given, else
    /// from views of its own.
    pub(crate) fn plan<B: ImageOps>(
        &self,
        be: &B,
        p: &mut Planner,
        batch: usize,
        training: bool,
        codes: Option<(View, View)>,
    ) -> DecoderPlan {
        let tokens = batch * self.grid.height * self.grid.width;
        let (codes, dcodes) = codes.unwrap_or_else(|| {
            let codes = p.act(tokens * self.input.n_in);
            (codes, p.act(if training { tokens * self.input.n_in } else { 0 }))
        });
        let rows = p.act(tokens * self.input.n_out);
        let drows = p.act(if training { tokens * self.input.n_out } else { 0 });
        let x = p.act(self.grid.len(batch));
        let chain = ChainPlan::new(be, p, &self.stages, x, self.grid, batch, training);
        DecoderPlan { codes, dcodes, rows, drows, chain }
    }

    /// The forward over planned views: the codes → `plan.output()`.
    pub(crate) fn forward_views<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        plan: &DecoderPlan,
        batch: usize,
    ) -> Result<()> {
        self.input.forward(be, m, store, plan.codes, plan.rows)?;
        let g = self.grid;
        be.transpose(m, plan.chain.maps[0], plan.rows, batch, g.height * g.width, g.channels)?;
        plan.chain.forward(be, m, &self.stages, store, batch)
    }

    /// Accumulates parameter gradients and writes the gradient of `codes` (the forward's input,
    /// token-major, whose copy on the tape is read) into `dcodes` (resized, allocation reused).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        store: &ParamStore,
        grads: &mut [f32],
        tape: &DecoderTape,
        codes: &[f32],
        dpixels: Vec<f32>,
        batch: usize,
        dcodes: &mut Vec<f32>,
    ) {
        let mut pass = tape.pass.borrow_mut();
        let pass = pass.as_mut().expect("backward after a training forward");
        assert_eq!(codes.len(), pass.plan.codes.len(), "the codes of the forward");
        let be = host_backend();
        let mut m = HostMemory::new(&mut pass.arena, &store.data, grads);
        dcodes.resize(codes.len(), 0.0);
        let plan = &pass.plan;
        let mut run = |m: &mut HostMemory<'_>| -> Result<()> {
            be.upload(m, plan.dpixels(), &dpixels)?;
            self.backward_views(&be, m, store, plan, batch)?;
            be.download(m, plan.dcodes, dcodes)
        };
        run(&mut m).expect("host ops");
    }

    /// The backward over planned views from the gradient in `plan.dpixels()`: parameter
    /// gradients added, the codes' gradient written.
    pub(crate) fn backward_views<B: ImageOps>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        store: &ParamStore,
        plan: &DecoderPlan,
        batch: usize,
    ) -> Result<()> {
        let chain = &plan.chain;
        chain.backward(be, m, &self.stages, store, batch)?;
        let g = self.grid;
        be.transpose(m, plan.drows, chain.grad(0), batch, g.channels, g.height * g.width)?;
        self.input.backward(be, m, store, plan.codes, plan.drows, Some(plan.dcodes))
    }
}

impl DecoderPlan {
    /// The reconstructed pixels `[B, C, H, W]`.
    pub(crate) fn output(&self) -> View {
        self.chain.output()
    }

    /// Where the backward writes dL/d(codes).
    pub(crate) fn dcodes(&self) -> View {
        self.dcodes
    }

    /// Where the backward reads dL/d(pixels).
    pub(crate) fn dpixels(&self) -> View {
        self.chain.grad(self.chain.maps.len() - 1)
    }
}

/// A tokenizer's parameters and networks.
#[derive(Debug, Clone)]
pub struct DvaeNetworks {
    pub encoder: Encoder,
    pub decoder: Option<Decoder>,
}

impl DvaeNetworks {
    /// Builds the parameter table (zero-filled) and the networks for `cfg` (validated). Encoder
    /// entries are named `encoder.blocks...` and decoder entries `decoder.blocks...`, DALL-E's
    /// names under a prefix. The parameters are counted and tested against the memory budget
    /// first (`Error::Config` when they do not fit), and their buffer is reserved whole, so no
    /// allocation on the way can fail.
    pub fn build(cfg: &DvaeConfig) -> Result<(ParamStore, DvaeNetworks)> {
        let count = Self::param_count(cfg);
        let bytes = count.map_or(Bytes::from(None), |n| Bytes::floats(&[n]));
        let shown = count.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
        Need::new(format!("the {shown} parameters of this tokenizer config"), bytes).check_config()?;
        let total = count.unwrap_or_default();
        let mut store = ParamStore::empty();
        // ParamStore::push grows the buffer entry by entry; reserved whole, it never reallocates.
        store.data.try_reserve_exact(total).map_err(|_| {
            Error::Config(format!(
                "cannot allocate {bytes} for the tokenizer's parameters: the system refused the memory"
            ))
        })?;
        let encoder = Encoder::new(&mut store, cfg, "encoder.");
        let decoder = cfg.decoder_n_init.map(|n| Decoder::new(&mut store, cfg, n, "decoder."));
        debug_assert_eq!(store.data.len(), total, "param_count agrees with the networks built");
        Ok((store, DvaeNetworks { encoder, decoder }))
    }

    /// The number of parameters [`DvaeNetworks::build`] allocates for `cfg`, with checked
    /// arithmetic (`None`: more than `usize` holds). It follows the constructors layer by
    /// layer, before any of them runs.
    pub fn param_count(cfg: &DvaeConfig) -> Option<usize> {
        let groups = cfg.group_count;
        let mut total = conv_params(cfg.in_channels, cfg.n_hid, 7)?;
        let mut width = cfg.n_hid;
        for g in 1..=groups {
            let n_out = cfg.n_hid.checked_shl(g as u32 - 1)?;
            for _ in 0..cfg.n_blk_per_group {
                total = total.checked_add(block_params(width, n_out, [3, 3, 3, 1])?)?;
                width = n_out;
            }
        }
        total = total.checked_add(conv_params(width, cfg.vocab_size, 1)?)?;
        if let Some(n_init) = cfg.decoder_n_init {
            total = total.checked_add(conv_params(cfg.vocab_size, n_init, 1)?)?;
            width = n_init;
            for g in 1..=groups {
                let n_out = cfg.n_hid.checked_shl((groups - g) as u32)?;
                for _ in 0..cfg.n_blk_per_group {
                    total = total.checked_add(block_params(width, n_out, [1, 3, 3, 3])?)?;
                    width = n_out;
                }
                if g < groups {
                    total = total.checked_add(conv_params(width, width, 4)?)?;
                }
            }
            total = total.checked_add(conv_params(width, cfg.in_channels, 1)?)?;
        }
        Some(total)
    }
}

/// Weights and bias of a `kernel`x`kernel` convolution (or transposed convolution).
fn conv_params(n_in: usize, n_out: usize, kernel: usize) -> Option<usize> {
    n_out.checked_mul(n_in)?.checked_mul(kernel.checked_mul(kernel)?)?.checked_add(n_out)
}

/// Parameters of a [`ResBlock`].
fn block_params(n_in: usize, n_out: usize, kernels: [usize; 4]) -> Option<usize> {
    let hid = n_out / 4;
    let id_path = if n_in != n_out { conv_params(n_in, n_out, 1)? } else { 0 };
    let widths = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)];
    widths.iter().zip(kernels).try_fold(id_path, |acc, (&(a, b), k)| acc.checked_add(conv_params(a, b, k)?))
}
