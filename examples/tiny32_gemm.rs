//! Times the tiny32 pretraining step's GEMM shapes (batch 64 × 65 tokens, hidden 192, MLP 768,
//! MIM head blocks of 256 rows × 8192 codes) under different ways of using the threads:
//! `pool` (what `Threads::Pool` does: the gemm crate's own rayon parallelism, or row blocks for
//! products of 2048 rows and more), `chunks4` (the rows cut in two blocks per thread, each a
//! single-threaded product, balanced by rayon), `split_rows` / `split_cols` (the destination cut
//! in one block per thread), `single` (one thread). Prints GFLOP/s per shape, by wall clock and
//! per second of process CPU time (the latter is steadier on a shared machine).
//!
//! `cargo run --release --example tiny32_gemm [threads]`

use std::hint::black_box;
use std::time::Instant;

use beit::backend::cpu::gemm::{matmul, Mat, MatMut, Threads};
use rayon::prelude::*;

fn fill(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i.wrapping_mul(7919).wrapping_add(seed * 104729)) % 2003) as f32 / 1001.5 - 1.0).collect()
}

#[derive(Clone, Copy)]
enum Kind {
    /// y[m,n] = x[m,k] · w[n,k]ᵀ
    Fwd,
    /// dx[m,k] = dy[m,n] · w[n,k]
    Dx,
    /// dw[n,k] += dy[m,n]ᵀ · x[m,k]
    Dw,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let m = 64 * 65;
    let shapes: &[(&str, usize, usize, usize)] = &[
        ("qkv", m, 192, 576),
        ("proj", m, 192, 192),
        ("fc1", m, 192, 768),
        ("fc2", m, 768, 192),
        ("head", 256, 192, 8192),
    ];
    for &(name, m, k, n) in shapes {
        let x = fill(m * k, 1);
        let w = fill(n * k, 2);
        let dy = fill(m * n, 3);
        for kind in [Kind::Fwd, Kind::Dx, Kind::Dw] {
            let (rows, cols, tag) = match kind {
                Kind::Fwd => (m, n, "fwd"),
                Kind::Dx => (m, k, "dx"),
                Kind::Dw => (n, k, "dw"),
            };
            let mut dst = vec![0.0f32; rows * cols];
            let flops = 2.0 * (m * k * n) as f64;
            let operands = |kind: Kind| -> (Mat<'_>, Mat<'_>, bool) {
                match kind {
                    Kind::Fwd => (Mat::rows(&x, m, k), Mat::transposed(&w, n, k), false),
                    Kind::Dx => (Mat::rows(&dy, m, n), Mat::rows(&w, n, k), false),
                    Kind::Dw => (Mat::transposed(&dy, m, n), Mat::rows(&x, m, k), true),
                }
            };
            let mut line = format!("{name:5} {tag:3} m{m:5} k{k:5} n{n:5}:");
            for strategy in ["pool", "chunks4", "split_rows", "split_cols", "single"] {
                let mut times = vec![];
                let reps = ((6e9 / flops) as usize).clamp(5, 400);
                let cpu0 = cpu_ticks();
                pool.install(|| {
                    for rep in 0..reps + 1 {
                        let t0 = Instant::now();
                        let (a, b, acc) = operands(kind);
                        match strategy {
                            "pool" => matmul(MatMut::rows(&mut dst, rows, cols), a, b, 1.0, acc, Threads::Pool),
                            "single" => matmul(MatMut::rows(&mut dst, rows, cols), a, b, 1.0, acc, Threads::Single),
                            "split_rows" | "chunks4" => {
                                let parts = if strategy == "chunks4" { 2 * threads } else { threads };
                                let per = rows.div_ceil(parts);
                                dst.par_chunks_mut(per * cols).enumerate().for_each(|(i, d)| {
                                    let r0 = i * per;
                                    let r = d.len() / cols;
                                    let a = Mat { data: &a.data[r0 * a.row_stride..], rows: r, ..a };
                                    matmul(MatMut::rows(d, r, cols), a, b, 1.0, acc, Threads::Single);
                                });
                            }
                            _ => {
                                let per = cols.div_ceil(threads).div_ceil(16) * 16;
                                let ptr = beit_ptr(dst.as_mut_ptr());
                                (0..threads).into_par_iter().for_each(|i| {
                                    let c0 = (i * per).min(cols);
                                    let c = per.min(cols - c0);
                                    if c == 0 {
                                        return;
                                    }
                                    let b = Mat { data: &b.data[c0 * b.col_stride..], cols: c, ..b };
                                    let p = ptr;
                                    unsafe {
                                        let d = std::slice::from_raw_parts_mut(p.0.add(c0), (rows - 1) * cols + c);
                                        matmul(
                                            MatMut { data: d, rows, cols: c, row_stride: cols, col_stride: 1 },
                                            a,
                                            b,
                                            1.0,
                                            acc,
                                            Threads::Single,
                                        );
                                    }
                                });
                            }
                        }
                        black_box(&dst);
                        if rep > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                        }
                    }
                });
                let cpu = (cpu_ticks() - cpu0) as f64 / 100.0 / (reps + 1) as f64;
                let t = median(times);
                line += &format!(" {strategy} {:5.1}/{:5.1}", flops / t / 1e9, flops / cpu / 1e9);
            }
            println!("{line}  (GFLOP/s wall / per CPU-s)");
        }
    }
}

#[derive(Clone, Copy)]
struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}
fn beit_ptr(p: *mut f32) -> P {
    P(p)
}

/// utime + stime of the whole process in clock ticks (1/100 s).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
