//! Data-parallel training passes on the CPU: the batch is cut into one contiguous shard of
//! images per thread, each shard runs the whole forward and backward on one thread with its own
//! workspace and gradient buffer, and the gradient buffers are then summed in shard order.
//!
//! Why: the per-token GEMMs of small models (tiny32: K = 192 or 768, a few hundred columns)
//! scale poorly when one product is spread over threads (about 60% parallel efficiency on two
//! threads, examples/tiny32_gemm.rs), and the row-wise ops pay a rayon dispatch each. A serial
//! pass per shard keeps every thread busy with whole, independent products and no
//! synchronisation until the end of the backward.
//!
//! How a shard runs serially: each worker owns a rayon pool of ONE thread and runs its shard
//! inside it. Every op of the pass asks the current pool how wide it is
//! (`rayon::current_num_threads`): the GEMMs then use no parallelism of their own
//! (`backend::cpu::gemm`), and the row-wise ops' parallel iterators run inline on that one
//! thread, so the shards never compete for each other's threads. The caller's pool only
//! dispatches the shards and waits.
//!
//! Determinism: a shard's result depends only on its images (one thread, no scheduling), and
//! the loss sums and gradient buffers are added in shard order, so a given batch, seed and
//! thread count give the same bits every time (checkpoint resume stays bit-identical). A
//! different thread count cuts other shards and rounds differently, within float rounding of the
//! whole-batch pass (tests/data_parallel.rs).

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};

use super::training::{DropPath, TrainWorkspace};
use super::Model;

/// Elements per task when the gradient buffers are summed (each element's sum runs in shard
/// order whatever the task split).
const SUM_CHUNK: usize = 1 << 16;

/// One worker: a single-thread pool and what its shard's pass needs.
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
    /// Runs `shard_pass` over `images` of the batch in this worker's one-thread pool (so every
    /// op inside runs serially), adding into `grads`, or into the worker's own cleared buffer
    /// when `None`; the result goes to `outcome`.
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

/// The workers of data-parallel passes, kept between steps (their pools, arenas and gradient
/// buffers); built for the thread count of the pool the pass is called from.
#[derive(Default)]
pub struct DataParallelWorkspace {
    workers: Vec<Worker>,
}

impl std::fmt::Debug for DataParallelWorkspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallelWorkspace").field("workers", &self.workers.len()).finish()
    }
}

impl DataParallelWorkspace {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a pass over `batch` images from the current rayon pool splits into shards: with
    /// more than one thread and at least one image per thread. Otherwise the whole-batch pass
    /// (whose products use the pool's threads) runs.
    pub fn splits(batch: usize) -> bool {
        let threads = rayon::current_num_threads();
        threads > 1 && batch >= threads
    }

    /// Makes one worker per thread of the current pool (pools are started once and kept) and
    /// sizes the gradient buffers of workers 1.. for `params` values.
    fn ensure_workers(&mut self, threads: usize, params: usize) -> Result<()> {
        if self.workers.len() != threads {
            self.workers.clear();
            for i in 0..threads {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .thread_name(move |_| format!("beit-shard-{i}"))
                    .build()
                    .map_err(|e| Error::Internal(format!("cannot start a data-parallel worker thread: {e}")))?;
                self.workers.push(Worker {
                    pool,
                    workspace: TrainWorkspace::new(),
                    drop_factors: Vec::new(),
                    grads: Vec::new(),
                    outcome: Ok(0.0),
                });
            }
        }
        for worker in &mut self.workers[1..] {
            worker.grads.resize(params, 0.0);
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
    /// Runs a training pass data-parallel over `batch` images (see the module doc): shard `i`
    /// runs `shard_pass(workspace, images, drop_path, grads)` on its own thread, which must ADD
    /// the gradient of its part of the loss (normalised for the whole batch) to `grads` and
    /// return its part of the loss. This ADDS the whole gradient to `grads` and returns the sum
    /// of the parts, both summed in shard order. Call it from the pool whose threads it may use,
    /// when [`DataParallelWorkspace::splits`] says so.
    pub(crate) fn data_parallel_pass<F>(
        &self,
        dp: &mut DataParallelWorkspace,
        batch: usize,
        drop_path: Option<DropPath<'_>>,
        grads: &mut [f32],
        shard_pass: F,
    ) -> Result<f64>
    where
        F: Fn(&mut TrainWorkspace, Range<usize>, Option<DropPath<'_>>, &mut [f32]) -> Result<f64> + Sync,
    {
        let threads = rayon::current_num_threads();
        ensure!(
            threads > 1 && batch >= threads,
            Internal,
            "a data-parallel pass over {batch} images on {threads} threads"
        );
        ensure!(
            grads.len() == self.params.data.len(),
            InvalidArgument,
            "gradient buffer holds {} values; the model has {}",
            grads.len(),
            self.params.data.len()
        );
        let layers = self.layout.blocks.len();
        if let Some(d) = drop_path {
            ensure!(
                d.factors.len() == layers * 2 * batch,
                InvalidArgument,
                "drop path factors hold {} values; [layers {layers}, 2, batch {batch}] needs {}",
                d.factors.len(),
                layers * 2 * batch
            );
        }
        dp.ensure_workers(threads, self.params.data.len())?;
        // Shard 0 adds into the caller's buffer, the others into their worker's own.
        let mut caller_grads = Some(&mut *grads);
        rayon::scope(|s| {
            for (i, worker) in dp.workers.iter_mut().enumerate() {
                let grads = if i == 0 { caller_grads.take() } else { None };
                let shard_pass = &shard_pass;
                s.spawn(move |_| worker.run_shard(shard_range(batch, threads, i), batch, drop_path, grads, shard_pass));
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
