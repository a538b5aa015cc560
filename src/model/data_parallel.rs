//! Data-parallel training passes on the CPU: the batch is cut into contiguous shards of images,
//! one per thread, each shard runs the whole forward and backward on its thread with its own
//! workspace and gradient buffer, and the gradient buffers are then summed in shard order.
//!
//! Why: the per-token GEMMs of small models (tiny32: K = 192 or 768, a few hundred columns)
//! scale poorly when one product is spread over threads (about 60% parallel efficiency on two
//! threads, examples/tiny32_gemm.rs), and the row-wise ops pay a rayon dispatch each. A serial
//! pass per shard keeps every thread busy with whole, independent products and no
//! synchronisation until the end of the backward.
//!
//! How a shard runs serially: each worker owns a rayon pool of its own (one thread when there
//! are as many shards as threads) and runs its shard inside it. Every op of the pass asks the
//! current pool how wide it is (`rayon::current_num_threads`): in a one-thread pool the GEMMs
//! use no parallelism of their own (`backend::cpu::gemm`) and the row-wise ops' parallel
//! iterators run inline, so the shards never compete for each other's threads. The caller's
//! pool only dispatches the shards and waits.
//!
//! How many shards ([`Model::data_parallel_shards`]): one per thread, but no more than images,
//! and no more than the memory allows: every shard past the first holds a gradient buffer as
//! large as the model, and together those may not exceed the whole batch's activation arena
//! (so splitting at most about doubles a step's memory; the shards' arenas together are the
//! size of the whole batch's). A large model on a small batch, like one thread, gets one shard:
//! the whole-batch pass in the caller's pool, its products spread over all its threads.
//! With fewer shards than threads, the threads are dealt out among the shards' pools.
//!
//! Determinism: a shard's result depends only on its images and its pool's size, and the loss
//! sums and gradient buffers are added in shard order, so a given batch, seed and thread count
//! give the same bits every time (checkpoint resume stays bit-identical). A different thread
//! count cuts other shards and rounds differently, within float rounding of the whole-batch
//! pass (tests/data_parallel.rs).

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::resources::{try_zeroed, Bytes, Need};

use super::training::{DropPath, MimBatch, TrainWorkspace};
use super::{ImageBatch, MimTarget, Model};

/// Elements per task when the gradient buffers are summed (each element's sum runs in shard
/// order whatever the task split).
const SUM_CHUNK: usize = 1 << 16;

/// One worker: its pool and what its shard's pass needs.
struct Worker {
    pool: rayon::ThreadPool,
    workspace: TrainWorkspace,
    /// This shard's drop path factors, `[layers, 2, shard images]`.
    drop_factors: Vec<f32>,
    /// This shard's gradient, one value per parameter (empty for worker 0, which adds into the
    /// caller's buffer).
    grads: Vec<f32>,
    /// What its last shard returned.
    outcome: Result<f64>,
}

impl Worker {
    /// Runs `shard_pass` over `images` of the batch in this worker's pool (in a one-thread pool
    /// every op inside runs serially), adding into `grads`, or into the worker's own cleared
    /// buffer when `None`; the result goes to `outcome`.
    fn run_shard<F>(
        &mut self,
        images: Range<usize>,
        batch: usize,
        drop_path: Option<DropPath<'_>>,
        grads: Option<&mut [f32]>,
        shard_pass: &F,
    ) where
        F: Fn(&mut TrainWorkspace, Range<usize>, Option<DropPath<'_>>, &mut [f32]) -> Result<f64> + Sync,
    {
        let Worker { pool, workspace, drop_factors, grads: own, outcome } = self;
        *outcome = pool.install(|| {
            let grads = grads.unwrap_or_else(|| {
                own.fill(0.0);
                &mut own[..]
            });
            let drop = drop_path.map(|d| {
                shard_drop_factors(drop_factors, d.factors, batch, &images);
                DropPath { factors: &drop_factors[..] }
            });
            shard_pass(workspace, images, drop, grads)
        });
    }
}

/// The memory of data-parallel passes, kept between steps: the shards' workers (their pools,
/// arenas and gradient buffers) and the workspace of the one-shard (whole-batch) pass.
#[derive(Default)]
pub struct DataParallelWorkspace {
    whole: TrainWorkspace,
    workers: Vec<Worker>,
    /// Threads of each worker's pool.
    layout: Vec<usize>,
    /// Shards of the last pass.
    last_shards: usize,
}

impl std::fmt::Debug for DataParallelWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallelWorkspace").field("worker_threads", &self.layout).finish()
    }
}

impl DataParallelWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// The workspace of the whole-batch pass, for passes that must not be sharded (training-mode
    /// BatchNorm normalises over the whole batch).
    pub fn whole_batch(&mut self) -> &mut TrainWorkspace {
        &mut self.whole
    }

    /// How many shards the last pass ran (1: the whole-batch pass).
    pub fn last_shards(&self) -> usize {
        self.last_shards
    }

    /// Makes `shards` workers sharing `threads` threads (pools are started once and kept while
    /// the layout stays) and sizes the gradient buffers of workers 1.. for `params` values.
    fn ensure_workers(&mut self, shards: usize, threads: usize, params: usize) -> Result<()> {
        let layout: Vec<usize> = (0..shards).map(|i| threads / shards + usize::from(i < threads % shards)).collect();
        if self.layout != layout {
            self.workers.clear();
            self.layout.clear();
            for (i, &n) in layout.iter().enumerate() {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(move |t| format!("beit-shard-{i}-{t}"))
                    .build()
                    .map_err(|e| Error::Internal(format!("cannot start a data-parallel worker pool: {e}")))?;
                self.workers.push(Worker {
                    pool,
                    workspace: TrainWorkspace::new(),
                    drop_factors: Vec::new(),
                    grads: Vec::new(),
                    outcome: Ok(0.0),
                });
            }
            self.layout = layout;
        }
        // Workers 1.. each hold a gradient buffer as large as the model: tested against the
        // budget, and allocated fallibly, before the first pass that needs them.
        let missing = self.workers[1..].iter().filter(|w| w.grads.len() != params).count();
        if missing > 0 {
            Need::new(
                format!("the gradient buffers of {missing} data-parallel shards ({params} values each)"),
                Bytes::floats(&[missing, params]),
            )
            .check()?;
            for worker in &mut self.workers[1..] {
                if worker.grads.len() != params {
                    worker.grads = try_zeroed(params, "a data-parallel shard's gradient buffer")?;
                }
            }
        }
        Ok(())
    }
}

/// The images of shard `i` of `shards` over `batch` images: contiguous, sizes differing by at
/// most one.
fn shard_range(batch: usize, shards: usize, i: usize) -> Range<usize> {
    i * batch / shards..(i + 1) * batch / shards
}

/// Copies the factors of `images` out of `[layers, 2, batch]` factors into `out`
/// (`[layers, 2, images]`).
fn shard_drop_factors(out: &mut Vec<f32>, factors: &[f32], batch: usize, images: &Range<usize>) {
    out.clear();
    for branch in factors.chunks_exact(batch) {
        out.extend_from_slice(&branch[images.clone()]);
    }
}

impl Model {
    /// How many shards a training pass over `images` splits into when run from the current
    /// rayon pool (see the module doc); 1 means the whole-batch pass.
    pub fn data_parallel_shards(&self, images: &ImageBatch<'_>) -> usize {
        let threads = rayon::current_num_threads().max(1);
        if threads == 1 || images.batch < 2 {
            return 1;
        }
        let arena = self.train_arena_len(images);
        let by_memory = 1 + arena / self.params.data.len().max(1);
        threads.min(images.batch).min(by_memory)
    }

    /// Runs a training pass over `images` split into [`Model::data_parallel_shards`] shards
    /// (see the module doc): shard `i` runs `shard_pass(workspace, images, drop_path, grads)` in
    /// its worker's pool, which must ADD the gradient of its part of the loss (normalised for
    /// the whole batch) to `grads` and return its part of the loss. This ADDS the whole
    /// gradient to `grads` and returns the sum of the parts, both summed in shard order. With
    /// one shard, `shard_pass` runs over the whole batch in the caller's pool.
    pub(crate) fn data_parallel_pass<F>(
        &self,
        dp: &mut DataParallelWorkspace,
        images: &ImageBatch<'_>,
        drop_path: Option<DropPath<'_>>,
        grads: &mut [f32],
        shard_pass: F,
    ) -> Result<f64>
    where
        F: Fn(&mut TrainWorkspace, Range<usize>, Option<DropPath<'_>>, &mut [f32]) -> Result<f64> + Sync,
    {
        let batch = images.batch;
        self.check_train_buffers(batch, drop_path, grads)?;
        // The shard count plans the whole batch's arena: its sizes must be countable first.
        self.check_pass_countable(batch, images.height, images.width)?;
        let shards = self.data_parallel_shards(images);
        dp.last_shards = shards;
        if shards == 1 {
            return shard_pass(&mut dp.whole, 0..batch, drop_path, grads);
        }
        dp.ensure_workers(shards, rayon::current_num_threads(), self.params.data.len())?;
        // Shard 0 adds into the caller's buffer, the others into their worker's own.
        let mut caller_grads = Some(&mut *grads);
        rayon::scope(|s| {
            for (i, worker) in dp.workers.iter_mut().enumerate() {
                let grads = if i == 0 { caller_grads.take() } else { None };
                let shard_pass = &shard_pass;
                s.spawn(move |_| worker.run_shard(shard_range(batch, shards, i), batch, drop_path, grads, shard_pass));
            }
        });
        let mut loss = 0.0;
        for worker in &mut dp.workers {
            loss += std::mem::replace(&mut worker.outcome, Ok(0.0))?;
        }
        // grads (shard 0 added in place) += shard 1 += shard 2 ... for every element.
        let others: Vec<&[f32]> = dp.workers[1..].iter().map(|w| &w.grads[..]).collect();
        grads.par_chunks_mut(SUM_CHUNK).enumerate().for_each(|(c, out)| {
            let range = c * SUM_CHUNK..c * SUM_CHUNK + out.len();
            for g in &others {
                for (o, &v) in out.iter_mut().zip(&g[range.clone()]) {
                    *o += v;
                }
            }
        });
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_evenly() {
        for batch in 2..20 {
            for shards in 2..=batch.min(5) {
                let ranges: Vec<_> = (0..shards).map(|i| shard_range(batch, shards, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[shards - 1].end, batch);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let sizes: Vec<_> = ranges.iter().map(|r| r.len()).collect();
                assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
            }
        }
    }

    #[test]
    fn shard_drop_factors_take_each_branch_slice() {
        // [layers 2, 2, batch 3]: factor value encodes (layer, branch, image).
        let factors: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32).collect();
        let mut out = Vec::new();
        shard_drop_factors(&mut out, &factors, 3, &(1..3));
        assert_eq!(out, vec![1.0, 2.0, 4.0, 5.0, 7.0, 8.0, 10.0, 11.0]);
    }
}

// The MIM entry point lives here rather than in `training` so that the single-pass code does not
// import its data-parallel wrapper (training -> data_parallel -> training was a cycle).
impl Model {
    /// [`Model::mim_forward_backward`] split data-parallel over the threads of the current
    /// rayon pool where that pays (`super::data_parallel`; one shard is the whole-batch pass):
    /// the same loss and gradient within float rounding, deterministic for a given thread
    /// count. What the trainer runs.
    pub fn mim_forward_backward_data_parallel(
        &self,
        dp: &mut DataParallelWorkspace,
        batch: &MimBatch<'_>,
        target: MimTarget,
        drop_path: Option<DropPath<'_>>,
        grads: &mut [f32],
    ) -> Result<f64> {
        self.check_mim_batch(batch, target)?;
        let masked = batch.masked_count();
        let loss_sum = self.data_parallel_pass(dp, &batch.images(), drop_path, grads, |ws, images, drop, grads| {
            self.mim_loss_sum(ws, &batch.shard(images), target, drop, masked, grads)
        })?;
        Ok(loss_sum / masked as f64)
    }
}
