//! The activation plan: every buffer of a pass, as views planned before anything runs, for a
//! (batch, height, width) and the backend that will run it. One type for inference and
//! training: a training plan keeps every block's activations (the backward reads them) and its
//! gradient scratch; an inference plan gives all blocks one set of buffers, updated in place.

use crate::backend::memory::{Planner, Space, View};
use crate::backend::Backend;

use super::block::{BlockDims, BlockScratch, LayerSlots};
use super::config::Architecture;
use super::params::rel_pos_table_rows;
use super::relpos;
use super::Model;

/// Masked rows per block of the MIM head in training (logits of one block: rows × vocab floats,
/// 8 MB for BEiT's 8192 tokens, so they stay in cache from the GEMM through the loss to the
/// backward).
pub(crate) const HEAD_BLOCK_ROWS: usize = 256;

/// The views of one pass.
#[derive(Debug, Clone)]
pub(crate) struct ActivationPlan {
    /// (batch, height, width, threads): a plan is reused while these hold (the CPU's attention
    /// scratch is sized for the pool).
    pub key: (usize, usize, usize, usize),
    pub grid: (usize, usize),
    pub tokens: usize,
    /// One per block (training), or one shared by all (inference).
    layers: Vec<LayerSlots>,
    /// The last block's output (inference: the shared `x`).
    pub x_out: View,
    /// The backbone's output: `beit.layernorm(x_out)` where the model has that norm, else
    /// `x_out`.
    pub output: View,
    /// What `beit.layernorm` and the MIM head's norm keep for their backwards (training).
    pub final_saved: View,
    pub head_saved: View,
    /// The im2col rows of the patches, `[batch·patches, channels·ph·pw]` (kept: the patch
    /// projection's weight gradient and the pixel target read them).
    pub patches: View,
    /// The patch projections before the mask token replaces masked ones (`[batch·patches,
    /// hidden]`; a scratch the block passes also use).
    pub embedded: View,
    /// The shared relative position bias `[heads, T, T]` (`Stat`; empty without one).
    pub shared_bias: View,
    pub scratch: BlockScratch,
    /// Drop path factors `[layers, 2, batch]` (`Stat`; training only).
    pub factors: View,
    /// Heads' buffers: the masked (MIM) or pooled (classification) rows and their norm
    /// (training), the pooler's mean and its norm (inference).
    pub gathered: View,
    pub head_normed: View,
    pub pooled: View,
    /// The inputs as uploaded: pixels `[batch, C, H, W]` (`Stat`), the mask `[batch·N]`
    /// (`Index`), the position embeddings resized for this grid (`Stat`, empty when the stored
    /// ones fit).
    pub pixels: View,
    pub mask: View,
    pub positions: View,
    /// The relative position index `[T·T]` (`Index`), a relative position table resized for
    /// this grid (`Stat`, empty at the native grid), and the shared table's gradient summed
    /// over blocks (`Stat`, training).
    pub rel_index: View,
    pub table: View,
    pub shared_dtable: View,
    /// The head's logits (MIM training: a block of rows; MIM inference: one image's patches;
    /// classification: the batch), the rows it reads (`Index`) and its labels (`Index`; the
    /// pixel target's patch rows), the pixel target's rows (`Act`).
    pub logits: View,
    pub rows: View,
    pub labels: View,
    pub targets: View,
}

/// The views of a pass's inputs.
struct InputViews {
    pixels: View,
    mask: View,
    positions: View,
    rel_index: View,
    table: View,
}

impl ActivationPlan {
    /// Block `l`'s activations.
    pub fn layer(&self, l: usize) -> &LayerSlots {
        &self.layers[l.min(self.layers.len() - 1)]
    }

    /// Where block `l` writes its output: the next block's input, or `x_out` after the last.
    pub fn block_output(&self, l: usize) -> View {
        self.layers.get(l + 1).map_or(self.x_out, |s| s.x)
    }

    /// Elements of the head's own buffers (logits and targets) in the activation arena.
    pub fn head_len(&self) -> usize {
        self.logits.len() + self.targets.len()
    }

    /// Hidden state `k`: the input of block k, or the last block's output for k = L (in an
    /// inference plan, the current contents of the shared `x`).
    pub fn hidden_state(&self, k: usize) -> View {
        match self.layers.get(k) {
            Some(s) => s.x,
            None => self.x_out,
        }
    }
}

/// The sizes a plan is drawn from: the patch grid, patches `n` and tokens `t` per image, the
/// blocks' dimensions, one patch's pixel count, and whether attention has a relative bias.
struct PassShape {
    grid: (usize, usize),
    n: usize,
    t: usize,
    dims: BlockDims,
    patch_len: usize,
    has_rel: bool,
}

impl Model {
    pub(crate) fn block_dims(&self, batch: usize, tokens: usize) -> BlockDims {
        let c = &self.config;
        BlockDims {
            b: batch,
            t: tokens,
            d: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps as f32,
        }
    }

    /// The shape of a pass over `batch` images of `height` x `width` (what both plans start from).
    fn pass_shape(&self, batch: usize, height: usize, width: usize) -> PassShape {
        let c = &self.config;
        let grid = c.grid_for(height, width);
        let n = grid.0 * grid.1;
        let (ph, pw) = c.patch_size.hw();
        PassShape {
            grid,
            n,
            t: n + 1,
            dims: self.block_dims(batch, n + 1),
            patch_len: c.num_channels * ph * pw,
            has_rel: c.use_relative_position_bias || c.use_shared_relative_position_bias,
        }
    }

    /// The input views every plan has (see [`ActivationPlan::pixels`], `rel_index`).
    fn input_views(
        &self,
        p: &mut Planner,
        batch: usize,
        height: usize,
        width: usize,
        grid: (usize, usize),
    ) -> InputViews {
        let c = &self.config;
        let (n, t) = (grid.0 * grid.1, grid.0 * grid.1 + 1);
        let has_rel = c.use_relative_position_bias || c.use_shared_relative_position_bias;
        let resized_positions = self.layout.embeddings.position_embeddings.is_some_and(|id| {
            let positions = self.params.specs[id.0].shape[1] - 1;
            !self.position_embeddings_fit(positions, height, width, grid)
        });
        let resized_tables = has_rel && relpos::table_is_resized(c.native_grid(), grid);
        InputViews {
            pixels: p.stat(batch * c.num_channels * height * width),
            mask: p.index(batch * n),
            positions: p.stat(if resized_positions { t * c.hidden_size } else { 0 }),
            rel_index: p.index(if has_rel { t * t } else { 0 }),
            table: p.stat(if resized_tables { rel_pos_table_rows(grid) * c.num_attention_heads } else { 0 }),
        }
    }

    fn new_planner<B: Backend>(be: &B) -> Planner {
        if be.shared_planner() {
            Planner::shared()
        } else {
            Planner::split()
        }
    }

    /// The plan of an inference pass over `batch` images of `height` x `width` on `be`.
    pub(crate) fn inference_plan<B: Backend>(
        &self,
        be: &B,
        batch: usize,
        height: usize,
        width: usize,
    ) -> (ActivationPlan, Planner) {
        let c = &self.config;
        let PassShape { grid, n, t, dims, patch_len, has_rel } = self.pass_shape(batch, height, width);
        let (d, inter, heads, rows) = (dims.d, dims.inter, dims.heads, dims.rows());
        let mut p = Self::new_planner(be);
        let patches = p.act(batch * n * patch_len);
        let x = p.act(rows * d);
        let normed = p.act(rows * d);
        let qkv = p.act(rows * 3 * d);
        let ctx = p.act(rows * d);
        let projected = p.act(rows * d);
        let mlp = p.act(rows * inter);
        let shared_bias = p.stat(if c.use_shared_relative_position_bias { heads * t * t } else { 0 });
        let bias = p.stat(if has_rel { heads * t * t } else { 0 });
        let attn = p.stat(be.attention_scratch_len(dims.attention()));
        let pooled = p.act(2 * batch * d);
        let inputs = self.input_views(&mut p, batch, height, width, grid);
        let logits = p.act(match self.arch {
            Architecture::MaskedImageModeling => n * c.vocab_size,
            Architecture::ImageClassification => batch * c.num_labels(),
            _ => 0,
        });
        let rows_view = p.index(batch);
        let nothing = View::empty(Space::Stat);
        let layer = LayerSlots {
            x,
            ln1: normed,
            ln1_saved: nothing,
            qkv,
            attn_saved: nothing,
            ctx,
            attn_y: projected,
            mid: x,
            ln2: normed,
            ln2_saved: nothing,
            fc1: mlp,
            gelu: mlp,
            mlp_y: projected,
        };
        let empty = View::empty(Space::Act);
        let scratch = BlockScratch {
            bias,
            attn,
            dx: empty,
            dbranch: empty,
            dnormed: empty,
            dctx: empty,
            wide_a: empty,
            wide_b: empty,
            dbias: nothing,
            attn_backward: nothing,
        };
        let threads = rayon::current_num_threads().max(1);
        let plan = ActivationPlan {
            key: (batch, height, width, threads),
            grid,
            tokens: t,
            layers: vec![layer],
            x_out: x,
            output: if self.layout.final_layernorm.is_some() { normed } else { x },
            final_saved: nothing,
            head_saved: nothing,
            patches,
            // The patch projections wait in `ctx` until the tokens are assembled.
            embedded: ctx,
            shared_bias,
            scratch,
            factors: nothing,
            gathered: empty,
            head_normed: empty,
            pooled,
            pixels: inputs.pixels,
            mask: inputs.mask,
            positions: inputs.positions,
            rel_index: inputs.rel_index,
            table: inputs.table,
            shared_dtable: nothing,
            logits,
            rows: rows_view,
            labels: View::empty(Space::Index),
            targets: empty,
        };
        (plan, p)
    }

    /// The plan of a training pass over `batch` images of `height` x `width` on `be`.
    pub(crate) fn training_plan<B: Backend>(
        &self,
        be: &B,
        batch: usize,
        height: usize,
        width: usize,
    ) -> (ActivationPlan, Planner) {
        let c = &self.config;
        let PassShape { grid, n, t, dims, patch_len, has_rel } = self.pass_shape(batch, height, width);
        let (d, inter, heads, rows) = (dims.d, dims.inter, dims.heads, dims.rows());
        let scale = c.layer_scale();
        let shape = dims.attention();
        let mut p = Self::new_planner(be);
        let inputs = self.input_views(&mut p, batch, height, width, grid);
        // Without layer scale the branch outputs are not kept: they go to `dbranch`, free
        // during the forward.
        let dbranch = p.act(rows * d);
        let branch_y = |p: &mut Planner| if scale { p.act(rows * d) } else { dbranch };
        let layers = (0..c.num_hidden_layers)
            .map(|_| LayerSlots {
                x: p.act(rows * d),
                ln1: p.act(rows * d),
                ln1_saved: p.stat(be.layer_norm_saved_len(rows)),
                qkv: p.act(rows * 3 * d),
                attn_saved: p.stat(be.attention_saved_len(shape)),
                ctx: p.act(rows * d),
                attn_y: branch_y(&mut p),
                mid: p.act(rows * d),
                ln2: p.act(rows * d),
                ln2_saved: p.stat(be.layer_norm_saved_len(rows)),
                fc1: p.act(rows * inter),
                gelu: p.act(rows * inter),
                mlp_y: branch_y(&mut p),
            })
            .collect();
        let x_out = p.act(rows * d);
        let output = if self.layout.final_layernorm.is_some() { p.act(rows * d) } else { x_out };
        let scratch = BlockScratch {
            bias: p.stat(if has_rel { heads * t * t } else { 0 }),
            attn: View::empty(Space::Stat),
            dx: p.act(rows * d),
            dbranch,
            dnormed: p.act(rows * d),
            dctx: p.act(rows * d),
            wide_a: p.act(rows * inter.max(3 * d)),
            wide_b: p.act(rows * inter),
            dbias: p.stat(if has_rel { heads * t * t } else { 0 }),
            attn_backward: p.stat(be.attention_backward_scratch_len(shape, has_rel)),
        };
        let threads = rayon::current_num_threads().max(1);
        let plan = ActivationPlan {
            key: (batch, height, width, threads),
            grid,
            tokens: t,
            layers,
            x_out,
            output,
            final_saved: p.stat(be.layer_norm_saved_len(rows)),
            head_saved: p.stat(be.layer_norm_saved_len(batch * n)),
            patches: p.act(batch * n * patch_len),
            embedded: p.act(rows * d),
            shared_bias: p.stat(if c.use_shared_relative_position_bias { heads * t * t } else { 0 }),
            scratch,
            factors: p.stat(c.num_hidden_layers * 2 * batch),
            gathered: p.act(batch * n * d),
            head_normed: p.act(batch * n * d),
            pooled: View::empty(Space::Act),
            pixels: inputs.pixels,
            mask: inputs.mask,
            positions: inputs.positions,
            rel_index: inputs.rel_index,
            table: inputs.table,
            shared_dtable: p.stat(self.layout.shared_rel_pos_table.map_or(0, |id| self.params.specs[id.0].len)),
            logits: p.act(match self.arch {
                Architecture::MaskedImageModeling => HEAD_BLOCK_ROWS.min(batch * n) * c.vocab_size,
                Architecture::ImageClassification => batch * c.num_labels(),
                _ => 0,
            }),
            rows: p.index(batch * n),
            labels: p.index(batch * n),
            // The pixel target's rows (its head is as wide as a patch row, checked with the target).
            targets: p.act(if self.arch == Architecture::MaskedImageModeling { batch * n * patch_len } else { 0 }),
        };
        (plan, p)
    }
}
