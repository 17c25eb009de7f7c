//! The measurements behind `pipeline bench` and `pipeline synth-model`: each module is one
//! benchmark that returns one JSON object, which the binary prints. `device` measures what the
//! hardware gives through candle (copy bandwidth, matrix-product peak); `decode` times the
//! generator's own decoding step next to the memory-bandwidth bound; the others compare a
//! device kernel with its CPU or tensor-op reference (`fake_quant`, `adamw`, `attention`,
//! `distill`, `grads`) or our logits with a reference file (`logits`). Training speed comes
//! from `pipeline train`'s own log (tokens_per_second).

pub mod adamw;
pub mod attention;
pub mod decode;
pub mod device;
pub mod distill;
pub mod fake_quant;
pub mod grads;
pub mod logits;
pub mod synth;

use anyhow::Result;
use model::Compute;
use std::time::Instant;

/// Seconds per call of `f`, mean of `reps` after `warm` untimed calls, GPU work included.
pub fn time_it(
    c: &Compute,
    warm: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    c.synchronize()?;
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    c.synchronize()?;
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

/// Rows of pseudo-random values (xorshift, so every machine sees the same numbers), with an
/// outlier per row and an all-zero row (the alpha = 0 case).
fn bench_rows(rows: usize, cols: usize) -> Vec<f32> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut v: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    for r in 0..rows {
        v[r * cols + (r * 31) % cols] *= 40.0;
    }
    v[..cols].fill(0.0);
    v
}

/// The process's peak resident memory (VmHWM), in bytes; 0 where /proc is not there.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
