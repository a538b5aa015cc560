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

use crate::backend::cpu::backward::{add_into, linear_backward, relu_backward, DxMode};
use crate::backend::cpu::conv::{
    conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward, Conv2dShape,
};
use crate::backend::cpu::elementwise::{add_bias, relu_forward, relu_inplace};
use crate::backend::cpu::gemm::{matmul, Mat, MatMut, Threads};
use crate::backend::cpu::pool::{max_pool2x2_backward, max_pool2x2_forward};
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

    fn forward(&self, store: &ParamStore, x: &[f32], batch: usize, g: Geometry, out: &mut [f32]) {
        let shape = self.shape(batch, g);
        let (w, b) = (store.get(self.weight), Some(store.get(self.bias)));
        if self.transposed {
            conv_transpose2d_forward(&shape, x, w, b, out);
        } else {
            conv2d_forward(&shape, x, w, b, out);
        }
    }

    /// Parameter gradients accumulate into `grads` (laid out like `store.data`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        store: &ParamStore,
        grads: &mut [f32],
        x: &[f32],
        dout: &[f32],
        dx: Option<(&mut [f32], DxMode)>,
        batch: usize,
        g: Geometry,
    ) {
        let shape = self.shape(batch, g);
        let (dw, db) = weight_and_bias_grads(store, grads, self.weight, self.bias);
        let w = store.get(self.weight);
        if self.transposed {
            conv_transpose2d_backward(&shape, x, w, dout, dx, dw, Some(db));
        } else {
            conv2d_backward(&shape, x, w, dout, dx, dw, Some(db));
        }
    }
}

/// The gradient slices of a weight and its bias (the bias directly follows the weight).
fn weight_and_bias_grads<'g>(
    store: &ParamStore,
    grads: &'g mut [f32],
    weight: ParamId,
    bias: ParamId,
) -> (&'g mut [f32], &'g mut [f32]) {
    let (w, b) = (&store.specs[weight.0], &store.specs[bias.0]);
    assert_eq!(w.offset + w.len, b.offset, "a bias directly follows its weight");
    let (dw, db) = grads[w.offset..b.offset + b.len].split_at_mut(w.len);
    (dw, db)
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

    /// Writes the block output into `out`; returns the four ReLU outputs (the residual
    /// convolutions' inputs), which the backward needs.
    fn forward(&self, store: &ParamStore, x: &[f32], batch: usize, g: Geometry, out: &mut [f32]) -> [Vec<f32>; 4] {
        let geos = self.res_inputs(g);
        let mut acts: [Vec<f32>; 4] = std::array::from_fn(|i| vec![0.0; geos[i].len(batch)]);
        relu_forward(x, &mut acts[0]);
        for i in 0..3 {
            let (done, rest) = acts.split_at_mut(i + 1);
            // conv_{i+1} writes straight into the next activation buffer, then ReLU in place.
            self.res_path[i].forward(store, &done[i], batch, geos[i], &mut rest[0]);
            relu_inplace(&mut rest[0]);
        }
        let mut residual = vec![0.0; out.len()];
        self.res_path[3].forward(store, &acts[3], batch, geos[3], &mut residual);
        match &self.id_path {
            Some(id) => id.forward(store, x, batch, g, out),
            None => out.copy_from_slice(x),
        }
        for (o, r) in out.iter_mut().zip(&residual) {
            *o += self.gain * r;
        }
        acts
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        store: &ParamStore,
        grads: &mut [f32],
        x: &[f32],
        acts: &[Vec<f32>; 4],
        dout: &[f32],
        dx: &mut [f32],
        batch: usize,
        g: Geometry,
    ) {
        let geos = self.res_inputs(g);
        let mut d: Vec<f32> = dout.iter().map(|v| v * self.gain).collect();
        for i in (0..4).rev() {
            let mut d_act = vec![0.0; acts[i].len()];
            self.res_path[i].backward(
                store,
                grads,
                &acts[i],
                &d,
                Some((&mut d_act, DxMode::Overwrite)),
                batch,
                geos[i],
            );
            // acts[i] = relu(previous), so acts[i] > 0 exactly where the ReLU passed its input;
            // masking d_act in place gives the pre-activation's gradient.
            if i > 0 {
                for (g, &a) in d_act.iter_mut().zip(&acts[i]) {
                    *g = if a > 0.0 { *g } else { 0.0 };
                }
                d = d_act;
            } else {
                relu_backward(&acts[0], &d_act, dx, DxMode::Overwrite);
            }
        }
        match &self.id_path {
            Some(id) => id.backward(store, grads, x, dout, Some((dx, DxMode::Accumulate)), batch, g),
            None => add_into(dx, dout),
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

/// What a stage keeps for its backward, beside its input.
#[derive(Debug)]
enum Saved {
    Nothing,
    Block([Vec<f32>; 4]),
    Pool(Vec<u32>),
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

    fn forward(&self, store: &ParamStore, x: &[f32], batch: usize, g: Geometry) -> (Vec<f32>, Saved) {
        let mut out = vec![0.0; self.output(g).len(batch)];
        let saved = match self {
            Stage::Conv(c) => {
                c.forward(store, x, batch, g, &mut out);
                Saved::Nothing
            }
            Stage::Block(b) => Saved::Block(b.forward(store, x, batch, g, &mut out)),
            Stage::MaxPool2x2 => {
                let mut argmax = vec![0u32; out.len()];
                max_pool2x2_forward(batch, g.channels, g.height, g.width, x, &mut out, &mut argmax);
                Saved::Pool(argmax)
            }
            Stage::Relu => {
                relu_forward(x, &mut out);
                Saved::Nothing
            }
        };
        (out, saved)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        store: &ParamStore,
        grads: &mut [f32],
        x: &[f32],
        saved: &Saved,
        dout: &[f32],
        batch: usize,
        g: Geometry,
    ) -> Vec<f32> {
        let mut dx = vec![0.0; g.len(batch)];
        match (self, saved) {
            (Stage::Conv(c), _) => c.backward(store, grads, x, dout, Some((&mut dx, DxMode::Overwrite)), batch, g),
            (Stage::Block(b), Saved::Block(acts)) => b.backward(store, grads, x, acts, dout, &mut dx, batch, g),
            (Stage::MaxPool2x2, Saved::Pool(argmax)) => {
                max_pool2x2_backward(batch, g.channels, g.height, g.width, dout, argmax, &mut dx, DxMode::Overwrite)
            }
            (Stage::Relu, _) => relu_backward(x, dout, &mut dx, DxMode::Overwrite),
            _ => unreachable!("a stage's saved state matches its kind"),
        }
        dx
    }
}

/// A chain of stages with what its forward kept for the backward.
#[derive(Debug, Default)]
pub struct Tape {
    inputs: Vec<Vec<f32>>,
    saved: Vec<Saved>,
}

/// Runs `stages` on `x`; with `tape`, keeps every stage's input and saved state.
fn run_stages(
    stages: &[Stage],
    store: &ParamStore,
    x: Vec<f32>,
    batch: usize,
    mut g: Geometry,
    mut tape: Option<&mut Tape>,
) -> (Vec<f32>, Geometry) {
    let mut x = x;
    for stage in stages {
        let (out, saved) = stage.forward(store, &x, batch, g);
        if let Some(t) = tape.as_deref_mut() {
            t.inputs.push(std::mem::replace(&mut x, out));
            t.saved.push(saved);
        } else {
            x = out;
        }
        g = stage.output(g);
    }
    (x, g)
}

/// Backward through `stages` from the gradient of their output; returns the input gradient.
fn backprop_stages(
    stages: &[Stage],
    store: &ParamStore,
    grads: &mut [f32],
    tape: &Tape,
    dout: Vec<f32>,
    batch: usize,
    input: Geometry,
) -> Vec<f32> {
    let mut geos = vec![input];
    for s in stages {
        let last = *geos.last().expect("non-empty");
        geos.push(s.output(last));
    }
    let mut d = dout;
    for (i, stage) in stages.iter().enumerate().rev() {
        d = stage.backward(store, grads, &tape.inputs[i], &tape.saved[i], &d, batch, geos[i]);
    }
    d
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

    fn forward(&self, store: &ParamStore, rows: &[f32], out: &mut [f32]) {
        let m = rows.len() / self.n_in;
        matmul(
            MatMut::rows(out, m, self.n_out),
            Mat::rows(rows, m, self.n_in),
            Mat::transposed(store.get(self.weight), self.n_out, self.n_in),
            1.0,
            false,
            Threads::Pool,
        );
        add_bias(out, store.get(self.bias));
    }

    fn backward(&self, store: &ParamStore, grads: &mut [f32], rows: &[f32], dout: &[f32], drows: Option<&mut [f32]>) {
        let m = rows.len() / self.n_in;
        let (dw, db) = weight_and_bias_grads(store, grads, self.weight, self.bias);
        linear_backward(drows, dw, Some(db), dout, rows, store.get(self.weight), m, self.n_in, self.n_out);
    }
}

/// NCHW `[B, C, H, W]` → token-major rows `[B·H·W, C]`.
pub fn nchw_to_rows(x: &[f32], batch: usize, g: Geometry) -> Vec<f32> {
    let (c, p) = (g.channels, g.height * g.width);
    let mut rows = vec![0.0; x.len()];
    for b in 0..batch {
        let (src, dst) = (&x[b * c * p..(b + 1) * c * p], &mut rows[b * c * p..(b + 1) * c * p]);
        for ch in 0..c {
            for i in 0..p {
                dst[i * c + ch] = src[ch * p + i];
            }
        }
    }
    rows
}

/// Token-major rows `[B·H·W, C]` → NCHW `[B, C, H, W]`.
pub fn rows_to_nchw(rows: &[f32], batch: usize, g: Geometry) -> Vec<f32> {
    let (c, p) = (g.channels, g.height * g.width);
    let mut x = vec![0.0; rows.len()];
    for b in 0..batch {
        let (src, dst) = (&rows[b * c * p..(b + 1) * c * p], &mut x[b * c * p..(b + 1) * c * p]);
        for i in 0..p {
            for ch in 0..c {
                dst[ch * p + i] = src[i * c + ch];
            }
        }
    }
    x
}

/// Image → code logits.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub stages: Vec<Stage>,
    pub output: PointwiseLayer,
    pub input: Geometry,
}

/// What the encoder's training forward keeps.
#[derive(Debug, Default)]
pub struct EncoderTape {
    stages: Tape,
    /// The last feature map (after its ReLU), token-major: the output convolution's input.
    features: Vec<f32>,
    geometry: Option<Geometry>,
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
        let keep = tape.is_some();
        let mut stage_tape = Tape::default();
        let (features, g) =
            run_stages(&self.stages, store, pixels.to_vec(), batch, self.input, keep.then_some(&mut stage_tape));
        let rows = nchw_to_rows(&features, batch, g);
        logits.resize(batch * g.height * g.width * self.output.n_out, 0.0);
        self.output.forward(store, &rows, logits);
        if let Some(t) = tape {
            *t = EncoderTape { stages: stage_tape, features: rows, geometry: Some(g) };
        }
    }

    /// Accumulates parameter gradients from `dlogits` (token-major); the input gradient is not
    /// needed (pixels are data).
    pub fn backward(&self, store: &ParamStore, grads: &mut [f32], tape: &EncoderTape, dlogits: &[f32], batch: usize) {
        let g = tape.geometry.expect("backward after a training forward");
        let mut drows = vec![0.0; tape.features.len()];
        self.output.backward(store, grads, &tape.features, dlogits, Some(&mut drows));
        let dfeatures = rows_to_nchw(&drows, batch, g);
        backprop_stages(&self.stages, store, grads, &tape.stages, dfeatures, batch, self.input);
    }
}

/// Relaxed one-hot codes → reconstructed (mapped) pixels.
#[derive(Debug, Clone)]
pub struct Decoder {
    pub input: PointwiseLayer,
    pub stages: Vec<Stage>,
    pub grid: Geometry,
}

#[derive(Debug, Default)]
pub struct DecoderTape {
    stages: Tape,
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
    /// stages' buffers ([`ChainCost`]) and the input convolution's rows and their NCHW copy.
    /// The codes themselves are the caller's.
    pub fn pass_bytes(&self, batch: usize, training: bool) -> Bytes {
        let chain = ChainCost::of(&self.stages, self.grid);
        let stages = if training { chain.training(batch) } else { chain.inference(batch) };
        stages + Bytes::floats(&[self.grid.len(1)]) * (2 * batch)
    }

    /// Pixels `[B, C, H, W]` (in `map_pixels` space) from codes token-major `[B·P, V]`.
    pub fn forward(&self, store: &ParamStore, codes: &[f32], batch: usize, tape: Option<&mut DecoderTape>) -> Vec<f32> {
        let mut rows = vec![0.0; batch * self.grid.height * self.grid.width * self.input.n_out];
        self.input.forward(store, codes, &mut rows);
        let x = rows_to_nchw(&rows, batch, self.grid);
        let mut stage_tape = Tape::default();
        let (out, _) = run_stages(&self.stages, store, x, batch, self.grid, tape.is_some().then_some(&mut stage_tape));
        if let Some(t) = tape {
            *t = DecoderTape { stages: stage_tape };
        }
        out
    }

    /// Accumulates parameter gradients and writes the gradient of `codes` (the forward's input,
    /// token-major) into `dcodes` (resized, allocation reused).
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
        let dx = backprop_stages(&self.stages, store, grads, &tape.stages, dpixels, batch, self.grid);
        let drows = nchw_to_rows(&dx, batch, self.grid);
        dcodes.resize(codes.len(), 0.0);
        self.input.backward(store, grads, codes, &drows, Some(dcodes));
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
