//! GEMM throughput on BEiT-Base shapes (batch 8 × 197 tokens, hidden 768, MLP 3072).
//!
//! `cargo bench --bench gemm` runs criterion; throughput is reported in elements = FLOPs
//! (2·m·n·k), so criterion's "elem/s" column reads directly as FLOP/s.
//!
//! Environment:
//! * `BEIT_BENCH_THREADS` (default 2): size of the rayon pool every product runs in.
//! * `BEIT_BENCH_JSON=1`: skip criterion and print one JSON line per shape from a plain timing
//!   loop (median of repeated runs): `{"shape": ..., "m":..., "k":..., "n":..., "threads":...,
//!   "median_s":..., "gflops":...}`. `scripts/bench-vs-torch` uses this mode.
//! * `BEIT_BENCH_MIN_S` (JSON mode, default 1.0): minimum seconds of timed runs per shape.
//! * `BEIT_BENCH_SPLIT_M=1` (JSON mode): also time an experiment, `<shape>_split_m`: the rows cut
//!   into one block per thread, each a single-threaded product, instead of the gemm crate's own
//!   rayon parallelism.

use std::hint::black_box;
use std::time::{Duration, Instant};

use beit::backend::cpu::gemm::{linear, matmul, Mat, MatMut, Threads};
use criterion::{Criterion, Throughput};

/// Tokens in one BEiT-Base/16 224 image (196 patches + CLS) and the batch the shapes assume.
const TOKENS: usize = 197;
const BATCH: usize = 8;
const M: usize = BATCH * TOKENS;

/// A `Linear` shape: y[m, n] = x[m, k] · w[n, k]ᵀ + b.
struct LinearShape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
}

const LINEAR_SHAPES: [LinearShape; 4] = [
    LinearShape { name: "qkv", m: M, k: 768, n: 2304 },
    LinearShape { name: "attn_out", m: M, k: 768, n: 768 },
    LinearShape { name: "mlp_fc1", m: M, k: 768, n: 3072 },
    LinearShape { name: "mlp_fc2", m: M, k: 3072, n: 768 },
];

/// Per-head attention scores: q[197, 64] · k[197, 64]ᵀ on one thread (`Threads::Single`, as the
/// attention kernel calls it from inside its per-head parallel loop).
const SCORE_M: usize = TOKENS;
const SCORE_K: usize = 64;
const SCORE_N: usize = TOKENS;

fn threads() -> usize {
    std::env::var("BEIT_BENCH_THREADS").ok().and_then(|s| s.trim().parse().ok()).filter(|&n| n > 0).unwrap_or(2)
}

/// Deterministic values in [-1, 1).
fn fill(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i.wrapping_mul(7919).wrapping_add(seed * 104729)) % 2003) as f32 / 1001.5 - 1.0).collect()
}

struct LinearData {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    y: Vec<f32>,
}

impl LinearData {
    fn new(s: &LinearShape) -> Self {
        LinearData { x: fill(s.m * s.k, 1), w: fill(s.n * s.k, 2), b: fill(s.n, 3), y: vec![0.0; s.m * s.n] }
    }

    fn run(&mut self, s: &LinearShape) {
        linear(&mut self.y, black_box(&self.x), black_box(&self.w), Some(&self.b), s.m, s.k, s.n);
        black_box(&mut self.y);
    }

    /// Experiment: the rows split into one contiguous block per thread, each block a
    /// single-threaded product, instead of the gemm crate's own rayon parallelism.
    fn run_split_m(&mut self, s: &LinearShape, threads: usize) {
        use rayon::prelude::*;
        let rows = s.m.div_ceil(threads.max(1));
        let (x, w, b) = (black_box(&self.x), black_box(&self.w), &self.b);
        self.y.par_chunks_mut(rows * s.n).zip(x.par_chunks(rows * s.k)).for_each(|(y, x)| {
            let m = x.len() / s.k;
            for row in y.chunks_exact_mut(s.n) {
                row.copy_from_slice(b);
            }
            matmul(
                MatMut::rows(y, m, s.n),
                Mat::rows(x, m, s.k),
                Mat::transposed(w, s.n, s.k),
                1.0,
                true,
                Threads::Single,
            );
        });
        black_box(&mut self.y);
    }
}

struct ScoreData {
    q: Vec<f32>,
    k: Vec<f32>,
    s: Vec<f32>,
}

impl ScoreData {
    fn new() -> Self {
        ScoreData { q: fill(SCORE_M * SCORE_K, 4), k: fill(SCORE_N * SCORE_K, 5), s: vec![0.0; SCORE_M * SCORE_N] }
    }

    fn run(&mut self) {
        let scale = 1.0 / (SCORE_K as f32).sqrt();
        matmul(
            MatMut::rows(&mut self.s, SCORE_M, SCORE_N),
            Mat::rows(black_box(&self.q), SCORE_M, SCORE_K),
            Mat::transposed(black_box(&self.k), SCORE_N, SCORE_K),
            scale,
            false,
            Threads::Single,
        );
        black_box(&mut self.s);
    }
}

fn flops(m: usize, k: usize, n: usize) -> u64 {
    2 * (m * k * n) as u64
}

/// Median seconds of `f` over at least 5 runs and at least `min_s` seconds, after 2 warm-up runs.
fn time_median(min_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || start.elapsed().as_secs_f64() < min_s {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn json_line(name: &str, m: usize, k: usize, n: usize, threads: usize, median_s: f64) {
    let gflops = flops(m, k, n) as f64 / median_s / 1e9;
    println!(
        "{{\"shape\": \"{name}\", \"m\": {m}, \"k\": {k}, \"n\": {n}, \"threads\": {threads}, \
         \"median_s\": {median_s:.9}, \"gflops\": {gflops:.3}}}"
    );
}

fn run_json(pool: &rayon::ThreadPool, threads: usize) {
    let min_s: f64 = std::env::var("BEIT_BENCH_MIN_S").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1.0);
    for s in &LINEAR_SHAPES {
        let mut d = LinearData::new(s);
        let t = pool.install(|| time_median(min_s, || d.run(s)));
        json_line(s.name, s.m, s.k, s.n, threads, t);
    }
    let mut d = ScoreData::new();
    let t = pool.install(|| time_median(min_s, || d.run()));
    json_line("attn_scores_1head", SCORE_M, SCORE_K, SCORE_N, 1, t);
    if std::env::var("BEIT_BENCH_SPLIT_M").is_ok_and(|v| v == "1") {
        for s in &LINEAR_SHAPES {
            let mut d = LinearData::new(s);
            let t = pool.install(|| time_median(min_s, || d.run_split_m(s, threads)));
            json_line(&format!("{}_split_m", s.name), s.m, s.k, s.n, threads, t);
        }
    }
}

fn run_criterion(pool: &rayon::ThreadPool, threads: usize) {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    {
        let mut group = c.benchmark_group(format!("linear_t{threads}"));
        for s in &LINEAR_SHAPES {
            let mut d = LinearData::new(s);
            group.throughput(Throughput::Elements(flops(s.m, s.k, s.n)));
            group.bench_function(format!("{}_{}x{}x{}", s.name, s.m, s.k, s.n), |b| {
                b.iter(|| pool.install(|| d.run(s)))
            });
        }
        group.finish();
    }
    {
        let mut group = c.benchmark_group("matmul_single");
        let mut d = ScoreData::new();
        group.throughput(Throughput::Elements(flops(SCORE_M, SCORE_K, SCORE_N)));
        group.bench_function(format!("attn_scores_{SCORE_M}x{SCORE_K}x{SCORE_N}"), |b| {
            b.iter(|| pool.install(|| d.run()))
        });
        group.finish();
    }
    c.final_summary();
}

fn main() {
    let threads = threads();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon pool");
    if std::env::var("BEIT_BENCH_JSON").is_ok_and(|v| v == "1") {
        run_json(&pool, threads);
    } else {
        run_criterion(&pool, threads);
    }
}
