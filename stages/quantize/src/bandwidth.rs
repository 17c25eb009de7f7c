//! The machine's memory bandwidth as a plain copy sees it: the yardstick for the quantize
//! stage's throughput (it streams its input once, so memcpy speed is its ceiling).

use rayon::prelude::*;
use std::time::Instant;

#[derive(Clone, Debug, serde::Serialize)]
pub struct MemcpyBandwidth {
    pub bytes: usize,
    pub repeats: usize,
    /// Bytes copied per second by one `copy_from_slice` (GB = 1e9 bytes).
    pub single_thread_gb_per_s: f64,
    /// The same copy split over rayon's threads.
    pub all_threads_gb_per_s: f64,
    pub threads: usize,
}

/// Copies a `bytes`-byte buffer `repeats` times (after one warm-up copy that also faults
/// the pages in) and reports the best of single- and multi-threaded copying.
pub fn memcpy_bandwidth(bytes: usize, repeats: usize) -> MemcpyBandwidth {
    let src: Vec<u8> = (0..bytes).map(|i| i as u8).collect();
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let best = |f: &mut dyn FnMut()| {
        (0..repeats.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let single = best(&mut || {
        dst.copy_from_slice(std::hint::black_box(&src));
    });
    let chunk = bytes.div_ceil(rayon::current_num_threads()).max(1);
    let multi = best(&mut || {
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| d.copy_from_slice(std::hint::black_box(s)));
    });
    std::hint::black_box(&dst);
    MemcpyBandwidth {
        bytes,
        repeats,
        single_thread_gb_per_s: bytes as f64 / single / 1e9,
        all_threads_gb_per_s: bytes as f64 / multi / 1e9,
        threads: rayon::current_num_threads(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_something_positive() {
        let b = super::memcpy_bandwidth(1 << 20, 2);
        assert!(
            b.single_thread_gb_per_s > 0.01 && b.all_threads_gb_per_s > 0.01,
            "{b:?}"
        );
    }
}
