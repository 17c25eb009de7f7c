//! Throughput of the block quantization kernel alone (in memory, no files), next to memcpy,
//! for f32 and bf16 input, and of the double quantization of one tensor's absmax values.
//!
//! cargo run --release --example kernel_speed -p quantize -- [MiB of f32 input] [only this format] [runs]
//!
//! Times are the best of several runs (the machine may be shared); GB/s are of input bytes.

use quant::CodeBook;
use quantize::kernel::{quantize_values, Values};
use std::time::Instant;

/// CPU time of all the process's threads so far, in seconds (from /proc; 0 elsewhere), so
/// that other work on a shared machine does not count.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .sum::<f64>()
        / 1e9
}

/// The best wall and CPU seconds of `runs` runs of `f`.
fn best(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    (0..runs)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_seconds());
            f();
            (t.elapsed().as_secs_f64(), cpu_seconds() - c)
        })
        .fold((f64::INFINITY, f64::INFINITY), |(a, b), (t, c)| {
            (a.min(t), b.min(c))
        })
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(256);
    let only = std::env::args().nth(2);
    let runs: usize = std::env::args()
        .nth(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(7);
    let n = (mib << 20) / 4;
    let mut s = 0x2545_F491_4F6C_DD1Du64;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect();
    let bf16: Vec<u8> = x
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    let bw = quantize::bandwidth::memcpy_bandwidth(n * 4, 5);
    println!(
        "memcpy: {:.2} GB/s (1 thread), {:.2} GB/s ({} threads)",
        bw.single_thread_gb_per_s, bw.all_threads_gb_per_s, bw.threads
    );
    for (name, cb) in [
        ("nf4", CodeBook::Nf4),
        ("nf3", CodeBook::Nf3),
        ("nf2", CodeBook::Nf2),
        ("int4", CodeBook::Int(4)),
        ("int8", CodeBook::Int(8)),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        for dq in [false, true] {
            let (t32, c32) = best(runs, || {
                std::hint::black_box(quantize_values(Values::F32(&x), 64, cb, dq));
            });
            let (t16, c16) = best(runs, || {
                std::hint::black_box(quantize_values(Values::Bf16(&bf16), 64, cb, dq));
            });
            println!(
                "{name}{}: f32 {:.2} GB/s, {:.2} CPU-ns/value; bf16 {:.2} GB/s, {:.2} CPU-ns/value",
                if dq { " + double quant" } else { "" },
                (n * 4) as f64 / t32 / 1e9,
                c32 / n as f64 * 1e9,
                (n * 2) as f64 / t16 / 1e9,
                c16 / n as f64 * 1e9,
            );
        }
    }
    // One 576 x 1536 matrix's absmax values (SmolLM2-135M's MLP, blocks of 64).
    let absmax: Vec<f32> = x[..13_824].iter().map(|v| v.abs() + 0.01).collect();
    let (t, c) = best(20, || {
        std::hint::black_box(quant::double_quantize(&absmax));
    });
    println!(
        "double_quantize of 13824 absmax values: {:.1} us, {:.1} CPU-us",
        t * 1e6,
        c * 1e6
    );
}
