//! Hybrid sampling (DESIGN.md, Generation): a random (or swept) first token, a greedy prefix
//! of `g` tokens counting the first, then sampling from softmax(logits / T) with optional
//! top-k / top-p. All randomness of a sample comes from (seed, sample index).

use serde::{Deserialize, Serialize};

/// SplitMix64: small, fast, and identical on every machine.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SampleRng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

impl SampleRng {
    /// The stream of one sample; independent of batch, worker and machine.
    pub fn for_sample(seed: u64, sample_id: u64) -> Self {
        SampleRng(mix(seed ^ 0x5851f42d4c957f2d) ^ mix(sample_id.wrapping_add(0x9e3779b97f4a7c15)))
    }

    pub fn new(seed: u64) -> Self {
        SampleRng(mix(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        mix(self.0)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        // Rejection keeps it exactly uniform.
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
}

/// Draws one token from softmax(logits / T) restricted by top-k and top-p.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut SampleRng) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / p.temperature).exp()))
        .collect();
    if p.top_k.is_some() || p.top_p.is_some() {
        // Highest probability first; equal values keep index order (stable sort).
        cand.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
        if let Some(k) = p.top_k {
            cand.truncate(k.max(1));
        }
        if let Some(top_p) = p.top_p {
            let total: f64 = cand.iter().map(|c| c.1).sum();
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, c) in cand.iter().enumerate() {
                acc += c.1;
                if acc >= top_p * total {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep);
        }
    }
    let total: f64 = cand.iter().map(|c| c.1).sum();
    let u = rng.next_f64() * total;
    let mut acc = 0.0;
    for c in &cand {
        acc += c.1;
        if u < acc {
            return c.0;
        }
    }
    cand.last().map(|c| c.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_depends_only_on_seed_and_sample() {
        let mut a = SampleRng::for_sample(7, 123);
        let mut b = SampleRng::for_sample(7, 123);
        let mut c = SampleRng::for_sample(7, 124);
        let xa: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let xb: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        let xc: Vec<u64> = (0..5).map(|_| c.next_u64()).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
        };
        let mut rng = SampleRng::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..20000 {
            counts[sample(&logits, &p, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        let share = counts[1] as f64 / 20000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
        let greedy_k = SamplingParams {
            temperature: 1.0,
            top_k: Some(1),
            top_p: None,
        };
        assert_eq!(sample(&logits, &greedy_k, &mut rng), 1);
        let nucleus = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
        };
        assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
    }

    #[test]
    fn argmax_prefers_lowest_index_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }
}
