//! Throughput of the block quantization kernel alone (in memory, no files), next to memcpy.
//!
//! cargo run --example kernel_speed -p quantize -- [MiB of f32 input] [only this format]

use quant::CodeBook;
use std::time::Instant;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(256);
    let only = std::env::args().nth(2);
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
    let bw = quantize::bandwidth::memcpy_bandwidth(n * 4, 3);
    println!(
        "memcpy: {:.2} GB/s (1 thread), {:.2} GB/s ({} threads)",
        bw.single_thread_gb_per_s, bw.all_threads_gb_per_s, bw.threads
    );
    for (name, cb) in [
        ("nf4", CodeBook::Nf4),
        ("nf2", CodeBook::Nf2),
        ("int8", CodeBook::Int(8)),
    ] {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        for dq in [false, true] {
            let best = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(quantize::kernel::quantize_pack(&x, 64, cb, dq));
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            println!(
                "{name}{}: {:.2} GB/s of f32 input",
                if dq { " + double quant" } else { "" },
                (n * 4) as f64 / best / 1e9
            );
        }
    }
}
