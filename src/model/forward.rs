//! The inference forward pass, block by block, on the CPU backend. Every activation lives in a
//! planned arena (one allocation per input shape, reused across calls).

use rayon::prelude::*;

use crate::backend::cpu::gemm::linear;
use crate::backend::cpu::resize;
use crate::backend::memory::{Arena, HostMemory, Space, View};
use crate::backend::ops::{Backend, Norm};
use crate::context::host_backend;
use crate::error::Result;
use crate::resources::{self, Bytes, Need};
use crate::tensor::{checked_numel, Tensor};

use super::block::block_forward;
use super::config::Architecture;
use super::params::{Affine, BlockParams, HeadParams};
use super::plan::ActivationPlan;
use super::relpos;
use super::Model;

/// A batch of images in NCHW order, f32, plus optional masked positions (`[batch, patches]`,
/// 0 or 1) that replace patch embeddings by the mask token.
#[derive(Debug, Clone, Copy)]
pub struct ImageBatch<'a> {
    pub pixels: &'a [f32],
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub bool_masked_pos: Option<&'a [u8]>,
}

/// Shapes of what a forward pass produces for a given input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputShapes {
    /// `[batch, tokens, hidden]`, what HF `BeitModel` returns as `last_hidden_state`.
    pub last_hidden_state: Vec<usize>,
    /// `[batch, hidden]` where the model has a pooler.
    pub pooler_output: Option<Vec<usize>>,
    /// `[batch, patches, vocab]` (MIM) or `[batch, labels]` (classification).
    pub logits: Option<Vec<usize>>,
}

/// Caller-owned destinations; each `None` output is not computed where that can be skipped.
#[derive(Debug, Default)]
pub struct OutputBuffers<'a> {
    pub last_hidden_state: Option<&'a mut [f32]>,
    pub pooler_output: Option<&'a mut [f32]>,
    pub logits: Option<&'a mut [f32]>,
}

#[derive(Debug, Clone)]
pub struct Outputs {
    pub last_hidden_state: Tensor,
    pub pooler_output: Option<Tensor>,
    pub logits: Option<Tensor>,
}

/// A plan, its arena, and the relative position index of its grid.
#[derive(Debug)]
pub(crate) struct Workspace {
    plan: ActivationPlan,
    arena: Arena,
    rel_index: Vec<usize>,
}

/// Most views one block of a plan takes (a training plan's [`super::block::LayerSlots`];
/// inference takes fewer).
pub(super) const SLOTS_PER_LAYER: usize = 13;
/// Most arena slots of a plan outside its blocks.
pub(super) const SLOTS_OUTSIDE_BLOCKS: usize = 24;

/// What a refusal of a large pass suggests.
pub(super) const PIECES_HINT: &str =
    "run it in pieces: smaller batches, or a large image as tiles of the model's image size";

/// "a pass over B images of HxW pixels (T tokens each)", for messages.
pub(super) fn pass_description(batch: usize, height: usize, width: usize, tokens: Option<usize>) -> String {
    let tokens = tokens.map_or("more than 2^64".to_string(), |t| t.to_string());
    format!("a pass over {batch} images of {height}x{width} pixels ({tokens} tokens each)")
}

impl Model {
    fn grid_of(&self, height: usize, width: usize) -> (usize, usize) {
        self.config.grid_for(height, width)
    }

    /// Output shapes for a batch of `batch` images of `height` x `width`.
    pub fn output_shapes(&self, batch: usize, height: usize, width: usize) -> OutputShapes {
        let (gh, gw) = self.grid_of(height, width);
        let n = gh * gw;
        let d = self.config.hidden_size;
        OutputShapes {
            last_hidden_state: vec![batch, n + 1, d],
            pooler_output: self.layout.has_pooler.then(|| vec![batch, d]),
            logits: match self.arch {
                Architecture::Backbone => None,
                Architecture::MaskedImageModeling => Some(vec![batch, n, self.config.vocab_size]),
                Architecture::ImageClassification => Some(vec![batch, self.config.num_labels()]),
                // The decode head's logits at 4x the patch grid (HF does not upsample them).
                Architecture::SemanticSegmentation => Some(vec![batch, self.config.num_labels(), 4 * gh, 4 * gw]),
            },
        }
    }

    /// Checks an input batch against the model; every problem is a readable error.
    pub fn check_input(&self, input: &ImageBatch<'_>) -> Result<()> {
        let c = &self.config;
        let (ph, pw) = c.patch_size.hw();
        ensure!(input.batch > 0, InvalidArgument, "batch size must be at least 1");
        ensure!(
            input.channels == c.num_channels,
            InvalidArgument,
            "pixel_values has {} channels; the model expects {}",
            input.channels,
            c.num_channels
        );
        ensure!(
            input.height >= ph && input.width >= pw,
            InvalidArgument,
            "image of {}x{} is smaller than one {}x{} patch",
            input.height,
            input.width,
            ph,
            pw
        );
        ensure!(
            input.height <= 1 << 16 && input.width <= 1 << 16,
            InvalidArgument,
            "image of {}x{} is too large",
            input.height,
            input.width
        );
        let want = checked_numel(&[input.batch, input.channels, input.height, input.width]);
        ensure!(
            want == Some(input.pixels.len()),
            InvalidArgument,
            "pixel_values holds {} values but shape [{}, {}, {}, {}] needs {}",
            input.pixels.len(),
            input.batch,
            input.channels,
            input.height,
            input.width,
            want.map_or("more than fit in memory".to_string(), |w| w.to_string())
        );
        let (gh, gw) = self.grid_of(input.height, input.width);
        if let Some(mask) = input.bool_masked_pos {
            ensure!(
                self.has_mask_token(),
                InvalidArgument,
                "bool_masked_pos was given but this model has no mask token (use_mask_token is false)"
            );
            ensure!(
                mask.len() == input.batch * gh * gw,
                InvalidArgument,
                "bool_masked_pos holds {} values; [batch {}, patches {}] needs {}",
                mask.len(),
                input.batch,
                gh * gw,
                input.batch * gh * gw
            );
            ensure!(mask.iter().all(|&m| m <= 1), InvalidArgument, "bool_masked_pos values must be 0 or 1");
        }
        if let Some(pos) = self.layout.embeddings.position_embeddings {
            let positions = self.params.specs[pos.0].shape[1] - 1;
            let side = (positions as f64).sqrt().round() as usize;
            let as_is = self.position_embeddings_fit(positions, input, (gh, gw));
            ensure!(
                as_is || side * side == positions,
                Unsupported,
                "absolute position embeddings for a {:?} grid cannot be resized to {gh}x{gw}",
                c.native_grid()
            );
        }
        Ok(())
    }

    /// Refuses, before any plan is made, a pass whose sizes could not even be counted. Every
    /// slot of the inference and training plans holds at most `batch · tokens · widest` floats,
    /// `widest` being the widest per-token row of the pass (3·hidden, intermediate, heads·tokens
    /// of attention scores, a patch's pixels), and a plan has fewer than [`SLOTS_PER_LAYER`]
    /// slots per block plus [`SLOTS_OUTSIDE_BLOCKS`]. When that bound fits in 64 bits, so does
    /// every product and sum of the plans; the exact plan is then tested against the budget
    /// where it is allocated. Cheap (arithmetic only): passes run it every call.
    pub(super) fn check_pass_countable(&self, batch: usize, height: usize, width: usize) -> Result<()> {
        let c = &self.config;
        let (gh, gw) = self.grid_of(height, width);
        let (ph, pw) = c.patch_size.hw();
        let tokens = gh.checked_mul(gw).and_then(|n| n.checked_add(1));
        let widest = tokens.and_then(|t| {
            [3 * c.hidden_size, c.intermediate_size, c.num_channels * ph * pw]
                .into_iter()
                .chain(Some(c.num_attention_heads.checked_mul(t)?))
                .max()
        });
        let slots = SLOTS_PER_LAYER * c.num_hidden_layers + SLOTS_OUTSIDE_BLOCKS;
        let bound = match (tokens, widest) {
            (Some(t), Some(w)) => Bytes::floats(&[batch, t, w]) * slots,
            _ => Bytes::from(None),
        };
        if bound.get().is_none() {
            Need::new(pass_description(batch, height, width, tokens), bound).hint(PIECES_HINT).check()?;
        }
        Ok(())
    }

    /// What the attention kernels allocate beside the arena: each of `tasks` parallel tasks
    /// keeps a padded `tokens x tokens` score block and padded copies of a head's Q, Kᵀ and V
    /// (`backend::cpu::attention`'s pair scratch).
    pub(super) fn attention_scratch_bytes(&self, tasks: usize, tokens: usize) -> Bytes {
        let padded = tokens.div_ceil(8) * 8;
        Bytes::floats(&[tasks, padded, padded + 3 * self.config.head_dim()])
    }

    /// Tests what a new inference workspace for this shape needs (its arena, the relative
    /// position index and table, resized position embeddings, the attention kernels' scratch)
    /// against the budget.
    fn check_workspace_need(&self, plan: &ActivationPlan, arena_len: usize, height: usize, width: usize) -> Result<()> {
        let (batch, t) = (plan.key.0, plan.tokens);
        // Beside the arena: the relative position index, and a relative position table resized
        // for another grid (per call, see `table_for_grid`).
        let table = Bytes::floats(&[super::params::rel_pos_table_rows(plan.grid), self.config.num_attention_heads]);
        let positions = Bytes::floats(&[t, self.config.hidden_size]) * 2;
        let scratch = self.attention_scratch_bytes(plan.scratch.attn.len() / (t * t), t);
        let need = Bytes::floats(&[arena_len]) + Bytes::of::<usize>(&[t, t]) + table + positions + scratch;
        Need::new(format!("the activations of {}", pass_description(batch, height, width, Some(t))), need)
            .hint(PIECES_HINT)
            .check()
    }

    /// A workspace for this shape and the current pool size: from the model's pool when one
    /// fits, else newly planned (after the budget test).
    fn take_workspace(&self, batch: usize, height: usize, width: usize) -> Result<Workspace> {
        let threads = rayon::current_num_threads().max(1);
        let key = (batch, height, width, threads);
        {
            let mut pool = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |w: &Workspace| w.plan.key == key;
            if let Some(i) = pool.iter().position(fits) {
                return Ok(pool.swap_remove(i));
            }
        }
        self.check_pass_countable(batch, height, width)?;
        let (plan, arena_plan) = self.inference_plan(&host_backend(), batch, height, width);
        self.check_workspace_need(&plan, arena_plan.act_total(), height, width)?;
        let rel_index = relpos::relative_position_index(plan.grid);
        Ok(Workspace { plan, arena: Arena::new(&arena_plan)?, rel_index })
    }

    fn return_workspace(&self, ws: Workspace) {
        let mut pool = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() >= 4 {
            pool.remove(0);
        }
        pool.push(ws);
    }

    /// Runs the model and returns freshly allocated outputs (all that the model has).
    pub fn forward(&self, input: &ImageBatch<'_>) -> Result<Outputs> {
        self.check_input(input)?;
        self.check_pass_countable(input.batch, input.height, input.width)?;
        let shapes = self.output_shapes(input.batch, input.height, input.width);
        let all = [Some(&shapes.last_hidden_state), shapes.pooler_output.as_ref(), shapes.logits.as_ref()];
        let need: Bytes = all.into_iter().flatten().map(|s| Bytes::floats(s)).sum();
        Need::new(format!("the outputs of a pass over {} images", input.batch), need).hint(PIECES_HINT).check()?;
        let zeros = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor { shape: shape.to_vec(), data: resources::try_zeroed(shape.iter().product(), "the outputs")? })
        };
        let mut hidden = zeros(&shapes.last_hidden_state)?;
        let mut pooled = shapes.pooler_output.as_deref().map(zeros).transpose()?;
        let mut logits = shapes.logits.as_deref().map(zeros).transpose()?;
        self.forward_into(
            input,
            OutputBuffers {
                last_hidden_state: Some(&mut hidden.data),
                pooler_output: pooled.as_mut().map(|t| &mut t.data[..]),
                logits: logits.as_mut().map(|t| &mut t.data[..]),
            },
        )?;
        Ok(Outputs { last_hidden_state: hidden, pooler_output: pooled, logits })
    }

    /// Runs the model, writing the requested outputs into caller-owned buffers whose lengths
    /// must match [`Model::output_shapes`]. Nothing is written when an error is returned.
    pub fn forward_into(&self, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        self.check_input(input)?;
        let shapes = self.output_shapes(input.batch, input.height, input.width);
        let check = |name: &str, buf: &Option<&mut [f32]>, shape: Option<&Vec<usize>>| -> Result<()> {
            if let Some(b) = buf {
                let Some(shape) = shape else {
                    bail!(InvalidArgument, "this {} model has no {name} output", self.arch.hf_name());
                };
                let want = checked_numel(shape).unwrap_or(usize::MAX);
                ensure!(
                    b.len() == want,
                    InvalidArgument,
                    "{name} buffer holds {} values; shape {shape:?} needs {want}",
                    b.len()
                );
            }
            Ok(())
        };
        check("last_hidden_state", &out.last_hidden_state, Some(&shapes.last_hidden_state))?;
        check("pooler_output", &out.pooler_output, shapes.pooler_output.as_ref())?;
        check("logits", &out.logits, shapes.logits.as_ref())?;
        if self.arch == Architecture::SemanticSegmentation {
            return self.segmentation_forward_into(input, out);
        }

        let mut ws = self.take_workspace(input.batch, input.height, input.width)?;
        let result = self.run(&mut ws, input, out);
        self.return_workspace(ws);
        result
    }

    fn run(&self, ws: &mut Workspace, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        let c = &self.config;
        let be = host_backend();
        let plan = ws.plan.clone();
        let (b, t, d) = (input.batch, plan.tokens, c.hidden_size);

        self.blocks_forward(&be, ws, input, |_, _| {})?;
        let Workspace { arena, .. } = ws;
        let mut m = HostMemory::new(arena, &self.params.data, &mut []);
        // The backbone's output: `beit.layernorm` for CLS pooling, identity for mean pooling.
        if let Some(ln) = &self.layout.final_layernorm {
            be.layer_norm(&mut m, plan.x_out, d, self.norm(*ln, plan.output))?;
        }
        let hidden_view = plan.output;
        if let Some(dst) = out.last_hidden_state {
            dst.copy_from_slice(m.arena.get(hidden_view));
        }

        if self.layout.has_pooler {
            let (mean_view, normed_view) = (plan.pooled.sub(0, b * d), plan.pooled.sub(b * d, b * d));
            let result_view = {
                let [pooled, hidden] = m.arena.many_mut([plan.pooled, hidden_view]);
                let mean = &mut pooled[..b * d];
                match &self.layout.pooler_layernorm {
                    Some(_) => mean_of_patch_tokens(mean, hidden, b, t, d),
                    None => {
                        for i in 0..b {
                            mean[i * d..(i + 1) * d].copy_from_slice(&hidden[i * t * d..i * t * d + d]);
                        }
                    }
                }
                match &self.layout.pooler_layernorm {
                    Some(ln) => {
                        be.layer_norm(&mut m, mean_view, d, self.norm(*ln, normed_view))?;
                        normed_view
                    }
                    None => mean_view,
                }
            };
            let result = m.arena.get(result_view);
            if let Some(dst) = out.pooler_output {
                dst.copy_from_slice(result);
            }
            if let (HeadParams::Classifier { classifier }, Some(dst)) = (&self.layout.head, out.logits) {
                let (p, k) = (&self.params, c.num_labels());
                linear(dst, result, p.get(classifier.weight), Some(p.get(classifier.bias)), b, d, k);
            }
        } else if let (HeadParams::MaskedImageModeling { layernorm: ln, lm_head }, Some(dst)) =
            (&self.layout.head, out.logits)
        {
            // The head's norm goes to a buffer free by now: the blocks' norm output, or (when
            // that holds the backbone output) the attention context.
            let layer = plan.layer(0);
            let normed_view = if hidden_view == plan.x_out { layer.ln1 } else { layer.ctx };
            be.layer_norm(&mut m, hidden_view, d, self.norm(*ln, normed_view))?;
            let normed = m.arena.get(normed_view);
            let (p, v, n) = (&self.params, c.vocab_size, t - 1);
            // Patch tokens of one image are contiguous rows, so each image is one GEMM. The
            // logits go straight to the caller's buffer.
            for (i, logits) in dst.chunks_exact_mut(n * v).enumerate() {
                let rows = &normed[(i * t + 1) * d..(i * t + t) * d];
                linear(logits, rows, p.get(lm_head.weight), Some(p.get(lm_head.bias)), n, d, v);
            }
        }
        Ok(())
    }

    /// A layer norm with the affine `ln` into `out`, keeping nothing (inference).
    pub(super) fn norm(&self, ln: Affine, out: View) -> Norm {
        Norm {
            out,
            saved: View::empty(Space::Stat),
            gamma: self.params.view(ln.weight),
            beta: self.params.view(ln.bias),
            eps: self.config.layer_norm_eps as f32,
        }
    }

    /// The embeddings and every block of an inference pass, in the shared `x` of the plan;
    /// `after(k, x)` sees hidden state k (0 = the embeddings, k = the output of block k).
    fn blocks_forward<B>(
        &self,
        be: &B,
        ws: &mut Workspace,
        input: &ImageBatch<'_>,
        mut after: impl FnMut(usize, &[f32]),
    ) -> Result<()>
    where
        for<'a> B: Backend<Memory<'a> = HostMemory<'a>>,
    {
        let plan = ws.plan.clone();
        let dims = self.block_dims(input.batch, plan.tokens);
        self.embed(ws, input);
        after(0, ws.arena.get(plan.x_out));
        let has_shared = self.prepare_shared_bias(ws);
        for (l, block) in self.layout.blocks.iter().enumerate() {
            let has_bias = self.layer_bias(ws, block, has_shared);
            let mut m = HostMemory::new(&mut ws.arena, &self.params.data, &mut []);
            let (layer, out) = (plan.layer(l), plan.block_output(l));
            block_forward(be, &mut m, &self.params, block, layer, out, &plan.scratch, has_bias, dims, None)?;
            after(l + 1, ws.arena.get(out));
        }
        Ok(())
    }

    /// Hidden states `indices` of an inference pass (0 = the embeddings, k = the output of block
    /// k, before any final layer norm), each `[batch, tokens, hidden]`: the backbone features
    /// of heads outside this module (segmentation). `input` must have passed `check_input`.
    pub(crate) fn hidden_states(&self, input: &ImageBatch<'_>, indices: &[usize]) -> Result<Vec<Vec<f32>>> {
        let mut ws = self.take_workspace(input.batch, input.height, input.width)?;
        let mut out = vec![Vec::new(); indices.len()];
        let result = self.blocks_forward(&host_backend(), &mut ws, input, |k, x| {
            for (o, _) in out.iter_mut().zip(indices).filter(|(_, &i)| i == k) {
                *o = x.to_vec();
            }
        });
        self.return_workspace(ws);
        result.map(|_| out)
    }

    /// Patch embedding (as a GEMM over non-overlapping patches), mask token, CLS token and
    /// absolute position embeddings, into `x`.
    fn embed(&self, ws: &mut Workspace, input: &ImageBatch<'_>) {
        let plan = &ws.plan;
        let [patches, x, tmp] = ws.arena.many_mut([plan.patches, plan.x_out, plan.embedded]);
        self.embed_into(input, plan.grid, patches, x, tmp);
    }

    /// [`Model::embed`] on explicit buffers: `patches` receives the im2col rows
    /// (`[batch·patches, channels·ph·pw]`), `x` the embeddings (`[batch, tokens, hidden]`), and
    /// `tmp` (at least `[batch·patches, hidden]`) the patch projections before masking.
    pub(crate) fn embed_into(
        &self,
        input: &ImageBatch<'_>,
        grid: (usize, usize),
        patches: &mut [f32],
        x: &mut [f32],
        tmp: &mut [f32],
    ) {
        let c = &self.config;
        let p = &self.params;
        let e = &self.layout.embeddings;
        let (gh, gw) = grid;
        let (n, d) = (gh * gw, c.hidden_size);
        let t = n + 1;
        let (ph, pw) = c.patch_size.hw();
        let (ch, hh, ww) = (input.channels, input.height, input.width);
        let k = ch * ph * pw;
        let b = input.batch;

        // im2col: one row per patch, ordered (channel, row, col) like the conv weight.
        patches.par_chunks_mut(k).enumerate().for_each(|(row, dst)| {
            let (img, patch) = (row / n, row % n);
            let (py, px) = (patch / gw, patch % gw);
            for cc in 0..ch {
                for ky in 0..ph {
                    let src = ((img * ch + cc) * hh + py * ph + ky) * ww + px * pw;
                    dst[(cc * ph + ky) * pw..(cc * ph + ky + 1) * pw].copy_from_slice(&input.pixels[src..src + pw]);
                }
            }
        });
        let embedded = &mut tmp[..b * n * d];
        linear(embedded, patches, p.get(e.patch_weight), Some(p.get(e.patch_bias)), b * n, k, d);

        let cls = p.get(e.cls_token);
        let mask_token = e.mask_token.map(|m| p.get(m));
        for img in 0..b {
            x[img * t * d..img * t * d + d].copy_from_slice(cls);
            for patch in 0..n {
                let dst = &mut x[(img * t + 1 + patch) * d..(img * t + 2 + patch) * d];
                let masked = input.bool_masked_pos.is_some_and(|m| m[img * n + patch] == 1);
                match (masked, mask_token) {
                    (true, Some(mt)) => dst.copy_from_slice(mt),
                    _ => dst.copy_from_slice(&embedded[(img * n + patch) * d..(img * n + patch + 1) * d]),
                }
            }
        }

        if let Some(pos_id) = e.position_embeddings {
            let pos = p.get(pos_id);
            let positions = pos.len() / d - 1;
            let as_is = self.position_embeddings_fit(positions, input, grid);
            let resized;
            let pos: &[f32] = if as_is {
                pos
            } else {
                resized = resize_position_embeddings(pos, d, positions, grid);
                &resized
            };
            x.par_chunks_mut(t * d).for_each(|img| {
                for (v, &q) in img.iter_mut().zip(pos) {
                    *v += q;
                }
            });
        }
    }

    /// Whether the absolute position table is used as stored. HF keeps it when the patch count
    /// matches and the image is square, and resizes it otherwise (even at the configured size
    /// of a non-square config, where its resize then fails); we also keep it at the configured
    /// grid, so non-square configs work at their own size.
    fn position_embeddings_fit(&self, positions: usize, input: &ImageBatch<'_>, grid: (usize, usize)) -> bool {
        positions == grid.0 * grid.1 && (input.height == input.width || grid == self.config.native_grid())
    }

    /// Fills the shared relative position bias for this grid; false if the model has none.
    fn prepare_shared_bias(&self, ws: &mut Workspace) -> bool {
        let slot = ws.plan.shared_bias;
        let grid = ws.plan.grid;
        let Workspace { arena, rel_index, .. } = ws;
        self.shared_bias_into(arena.get_mut(slot), grid, rel_index)
    }

    /// The shared relative position bias (`[heads, T, T]`) for `grid` into `bias`; false (and
    /// `bias` untouched) if the model has none.
    pub(crate) fn shared_bias_into(&self, bias: &mut [f32], grid: (usize, usize), rel_index: &[usize]) -> bool {
        let Some(table_id) = self.layout.shared_rel_pos_table else {
            return false;
        };
        let table = self.table_for_grid(table_id, grid);
        bias.fill(0.0);
        relpos::add_bias(bias, &table, self.config.num_attention_heads, rel_index);
        true
    }

    /// The bias of one layer: shared + per-layer, whichever exist, in the `bias` slot.
    fn layer_bias(&self, ws: &mut Workspace, block: &BlockParams, has_shared: bool) -> bool {
        let plan = &ws.plan;
        let Workspace { arena, rel_index, .. } = ws;
        let [shared_bias, bias] = arena.many_mut([plan.shared_bias, plan.scratch.bias]);
        self.layer_bias_into(bias, has_shared.then_some(&*shared_bias), block, plan.grid, rel_index)
    }

    /// The attention bias of `block` into `bias`: the shared bias (when given) plus the block's
    /// own table (when it has one). False, and `bias` untouched, when there is neither.
    pub(crate) fn layer_bias_into(
        &self,
        bias: &mut [f32],
        shared_bias: Option<&[f32]>,
        block: &BlockParams,
        grid: (usize, usize),
        rel_index: &[usize],
    ) -> bool {
        match (shared_bias, block.rel_pos_table) {
            (None, None) => false,
            (shared_bias, table_id) => {
                match shared_bias {
                    Some(shared) => bias.copy_from_slice(shared),
                    None => bias.fill(0.0),
                }
                if let Some(id) = table_id {
                    let table = self.table_for_grid(id, grid);
                    relpos::add_bias(bias, &table, self.config.num_attention_heads, rel_index);
                }
                true
            }
        }
    }

    fn table_for_grid(&self, id: super::params::ParamId, grid: (usize, usize)) -> std::borrow::Cow<'_, [f32]> {
        let table = self.params.get(id);
        match relpos::resize_table(table, self.config.num_attention_heads, self.config.native_grid(), grid) {
            Some(resized) => std::borrow::Cow::Owned(resized),
            None => std::borrow::Cow::Borrowed(table),
        }
    }
}

/// HF's absolute position resize: the patch part as a √P x √P grid, bicubic to `grid`, CLS kept.
pub(super) fn resize_position_embeddings(pos: &[f32], d: usize, positions: usize, grid: (usize, usize)) -> Vec<f32> {
    let side = (positions as f64).sqrt().round() as usize;
    // [side·side, d] → [d, side, side]
    let mut planes = vec![0.0f32; d * positions];
    for r in 0..positions {
        for ch in 0..d {
            planes[ch * positions + r] = pos[(r + 1) * d + ch];
        }
    }
    let resized = resize::bicubic(&planes, d, side, side, grid.0, grid.1);
    let n = grid.0 * grid.1;
    let mut out = vec![0.0f32; (n + 1) * d];
    out[..d].copy_from_slice(&pos[..d]);
    for r in 0..n {
        for ch in 0..d {
            out[(r + 1) * d + ch] = resized[ch * n + r];
        }
    }
    out
}

/// Mean over tokens 1..t of each image (the mean-pooling pooler excludes CLS).
pub(super) fn mean_of_patch_tokens(mean: &mut [f32], hidden: &[f32], b: usize, t: usize, d: usize) {
    for i in 0..b {
        let m = &mut mean[i * d..(i + 1) * d];
        m.fill(0.0);
        for tok in 1..t {
            for (a, &v) in m.iter_mut().zip(&hidden[(i * t + tok) * d..(i * t + tok + 1) * d]) {
                *a += v;
            }
        }
        let inv = 1.0 / (t - 1) as f32;
        m.iter_mut().for_each(|v| *v *= inv);
    }
}
