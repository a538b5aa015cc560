//! The inference forward pass, block by block, written once over the [`Backend`] trait (run on
//! the CPU backend today). Every activation lives in views planned by
//! [`Model::inference_plan`] (one arena per input shape, reused across calls).

use super::resample;
use crate::backend::memory::{Arena, HostMemory, Space, View};
use crate::backend::ops::{Backend, Norm};
use crate::context::host_backend;
use crate::error::Result;
use crate::resources::{self, Bytes, Need};
use crate::tensor::{checked_numel, Tensor};

use super::block::block_forward;
use super::config::Architecture;
use super::params::{Affine, HeadParams};
use super::plan::ActivationPlan;
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

impl Outputs {
    /// Every output as a buffer a pass fills.
    pub fn buffers(&mut self) -> OutputBuffers<'_> {
        OutputBuffers {
            last_hidden_state: Some(&mut self.last_hidden_state.data),
            pooler_output: self.pooler_output.as_mut().map(|t| &mut t.data[..]),
            logits: self.logits.as_mut().map(|t| &mut t.data[..]),
        }
    }
}

/// A plan and its arena.
#[derive(Debug)]
pub(crate) struct Workspace {
    plan: ActivationPlan,
    arena: Arena,
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
            let as_is = self.position_embeddings_fit(positions, input.height, input.width, (gh, gw));
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
        Ok(Workspace { plan, arena: Arena::new(&arena_plan)? })
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
        let mut out = self.zeroed_outputs(input)?;
        self.forward_into(input, out.buffers())?;
        Ok(out)
    }

    /// Zeroed outputs for a pass over `input` (the input checked, their size checked against
    /// the memory budget first): what [`Model::forward`] fills, and a GPU pass too.
    pub fn zeroed_outputs(&self, input: &ImageBatch<'_>) -> Result<Outputs> {
        self.check_input(input)?;
        self.check_pass_countable(input.batch, input.height, input.width)?;
        let shapes = self.output_shapes(input.batch, input.height, input.width);
        let all = [Some(&shapes.last_hidden_state), shapes.pooler_output.as_ref(), shapes.logits.as_ref()];
        let need: Bytes = all.into_iter().flatten().map(|s| Bytes::floats(s)).sum();
        Need::new(format!("the outputs of a pass over {} images", input.batch), need).hint(PIECES_HINT).check()?;
        let zeros = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor { shape: shape.to_vec(), data: resources::try_zeroed(shape.iter().product(), "the outputs")? })
        };
        Ok(Outputs {
            last_hidden_state: zeros(&shapes.last_hidden_state)?,
            pooler_output: shapes.pooler_output.as_deref().map(zeros).transpose()?,
            logits: shapes.logits.as_deref().map(zeros).transpose()?,
        })
    }

    /// Runs the model, writing the requested outputs into caller-owned buffers whose lengths
    /// must match [`Model::output_shapes`]. Nothing is written when an error is returned.
    pub fn forward_into(&self, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        self.check_input(input)?;
        self.check_outputs(input, &out)?;
        if self.arch == Architecture::SemanticSegmentation {
            return self.segmentation_forward_into(input, out);
        }

        let mut ws = self.take_workspace(input.batch, input.height, input.width)?;
        let result = self.run(&mut ws, input, out);
        self.return_workspace(ws);
        result
    }

    /// Checks that each buffer of `out` is an output this model has, of the length
    /// [`Model::output_shapes`] gives for `input`.
    pub(crate) fn check_outputs(&self, input: &ImageBatch<'_>, out: &OutputBuffers<'_>) -> Result<()> {
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
        check("logits", &out.logits, shapes.logits.as_ref())
    }

    fn run(&self, ws: &mut Workspace, input: &ImageBatch<'_>, out: OutputBuffers<'_>) -> Result<()> {
        let mut m = HostMemory::new(&mut ws.arena, &self.params.data, &mut []);
        self.inference_pass(&host_backend(), &mut m, &ws.plan, input, out)
    }

    /// An inference pass on `be` over `plan` ([`Model::inference_plan`] for `input`, checked
    /// with [`Model::check_input`] and [`Model::check_outputs`]): the backbone, its final norm,
    /// then the head's outputs downloaded into `out`. Not for segmentation models (their head
    /// is `Model::segmentation_inference_pass`, after the same backbone output).
    pub(crate) fn inference_pass<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        input: &ImageBatch<'_>,
        out: OutputBuffers<'_>,
    ) -> Result<()> {
        let c = &self.config;
        let p = &self.params;
        let (b, t, d) = (input.batch, plan.tokens, c.hidden_size);
        self.backbone_output(be, m, plan, input, &[], out.last_hidden_state)?;

        if self.layout.has_pooler {
            let (mean, normed) = (plan.pooled.sub(0, b * d), plan.pooled.sub(b * d, b * d));
            let result = match &self.layout.pooler_layernorm {
                Some(ln) => {
                    be.mean_patch_tokens(m, mean, plan.output, t, d)?;
                    be.layer_norm(m, mean, d, self.norm(*ln, normed))?;
                    normed
                }
                None => {
                    let cls_rows: Vec<usize> = (0..b).map(|img| img * t).collect();
                    be.upload_indices(m, plan.rows.prefix(b), &cls_rows)?;
                    be.gather_rows(m, mean, plan.output, plan.rows.prefix(b), d)?;
                    mean
                }
            };
            if let Some(dst) = out.pooler_output {
                be.download(m, result, dst)?;
            }
            if let (HeadParams::Classifier { classifier }, Some(dst)) = (&self.layout.head, out.logits) {
                let k = c.num_labels();
                let (w, bias) = (p.view(classifier.weight), p.view(classifier.bias));
                be.linear(m, plan.logits, result, w, Some(bias), b, d, k)?;
                be.download(m, plan.logits, dst)?;
            }
        } else if let (HeadParams::MaskedImageModeling { layernorm: ln, lm_head }, Some(dst)) =
            (&self.layout.head, out.logits)
        {
            // The head's norm goes to a buffer free by now: the blocks' norm output, or (when
            // that holds the backbone output) the attention context.
            let layer = plan.layer(0);
            let normed = if plan.output == plan.x_out { layer.ln1 } else { layer.ctx };
            be.layer_norm(m, plan.output, d, self.norm(*ln, normed))?;
            let (v, n) = (c.vocab_size, t - 1);
            let (w, bias) = (p.view(lm_head.weight), p.view(lm_head.bias));
            // Patch tokens of one image are contiguous rows: one GEMM and one download each.
            for (i, logits) in dst.chunks_exact_mut(n * v).enumerate() {
                be.linear(m, plan.logits, normed.sub((i * t + 1) * d, n * d), w, Some(bias), n, d, v)?;
                be.download(m, plan.logits, logits)?;
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

    /// The backbone of an inference pass and its output: embeddings, every block, then
    /// `beit.layernorm` into `plan.output` (CLS pooling; mean pooling keeps the last block's
    /// output there), downloaded into `last_hidden_state` when asked. `captures[i] = (k, view)`
    /// copies hidden state k (0 = the embeddings, k = the output of block k, before any final
    /// layer norm) into the view on the way (the features of the segmentation head).
    pub(super) fn backbone_output<B: Backend>(
        &self,
        be: &B,
        m: &mut B::Memory<'_>,
        plan: &ActivationPlan,
        input: &ImageBatch<'_>,
        captures: &[(usize, View)],
        last_hidden_state: Option<&mut [f32]>,
    ) -> Result<()> {
        let dims = self.block_dims(input.batch, plan.tokens);
        let capture = |m: &mut B::Memory<'_>, k: usize| -> Result<()> {
            for &(_, dst) in captures.iter().filter(|(i, _)| *i == k) {
                be.copy(m, dst, plan.x_out)?;
            }
            Ok(())
        };
        self.embeddings_forward(be, m, plan, input)?;
        capture(m, 0)?;
        let has_shared = self.shared_bias(be, m, plan)?;
        for (l, block) in self.layout.blocks.iter().enumerate() {
            let has_bias = self.layer_bias(be, m, plan, block, has_shared)?;
            let (layer, out) = (plan.layer(l), plan.block_output(l));
            block_forward(be, m, &self.params, block, layer, out, &plan.scratch, has_bias, dims, None)?;
            capture(m, l + 1)?;
        }
        if let Some(ln) = &self.layout.final_layernorm {
            be.layer_norm(m, plan.x_out, dims.d, self.norm(*ln, plan.output))?;
        }
        if let Some(dst) = last_hidden_state {
            be.download(m, plan.output, dst)?;
        }
        Ok(())
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
    let resized = resample::bicubic(&planes, d, side, side, grid.0, grid.1);
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
