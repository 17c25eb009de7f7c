//! A decoding worker: keeps up to `batch` sequences in flight; a finished sequence leaves and
//! the next sample takes its slot (continuous batching). On the CPU each slot has its own
//! `SeqCache` (batch-invariant, bit-reproducible logits); on a GPU the slots share one
//! `BatchCache`, so a step costs a few kernels per layer rather than a few per sequence.

use crate::sampler::{argmax, sample, SampleRng, SamplingParams};
use crate::{FirstToken, GenerateConfig};
use anyhow::Result;
use corpus::{Finish, Sample};
use crossbeam_channel::Sender;
use model::{BatchCache, Llama, SeqCache};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Job {
    pub model: Arc<Llama>,
    pub cfg: GenerateConfig,
    /// Sample ids still to make, in order; workers take them through `next`.
    pub ids: Vec<u64>,
    pub next: AtomicUsize,
    pub first_tokens: Vec<u32>,
}

struct Active {
    id: u64,
    rng: SampleRng,
    greedy: usize,
    tokens: Vec<u32>,
}

impl Job {
    fn take(&self) -> Option<u64> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.ids.get(i).copied()
    }

    fn start(&self, id: u64) -> Active {
        let mut rng = SampleRng::for_sample(self.cfg.seed, id);
        let n = self.first_tokens.len() as u64;
        let first = match self.cfg.first_token {
            FirstToken::Random => self.first_tokens[rng.below(n) as usize],
            FirstToken::Sweep => self.first_tokens[(id % n) as usize],
        };
        let p = self.cfg.greedy_prefix;
        let greedy = p.min as u64 + rng.below((p.max - p.min) as u64 + 1);
        Active {
            id,
            rng,
            greedy: greedy as usize,
            tokens: vec![first],
        }
    }

    fn finish(&self, a: Active, finish: Finish) -> Sample {
        Sample {
            sample_id: a.id,
            greedy_prefix: a.greedy.min(a.tokens.len()) as u8,
            tokens: a.tokens,
            finish,
            text: None,
        }
    }
}

pub fn run(job: &Job, tx: &Sender<Result<Sample>>) -> Result<()> {
    let r = decode_all(job, tx);
    if let Err(e) = &r {
        let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
    }
    r
}

fn decode_all(job: &Job, tx: &Sender<Result<Sample>>) -> Result<()> {
    let cfg = &job.cfg;
    let model = &job.model;
    let params = SamplingParams {
        temperature: cfg.temperature,
        top_k: cfg.top_k,
        top_p: cfg.top_p,
    };
    let eos = &model.cfg.eos_token_ids;
    let mut slots: Vec<Option<Active>> = (0..cfg.batch).map(|_| None).collect();
    let mut caches = if model.device.is_cpu() {
        Caches::PerSequence(
            (0..cfg.batch)
                .map(|_| SeqCache::new(model, cfg.max_tokens))
                .collect::<candle_core::Result<_>>()?,
        )
    } else {
        let mut cache = BatchCache::new(model, cfg.batch, cfg.max_tokens)?;
        if cfg.cuda_graph {
            cache.enable_cuda_graph()?;
        }
        Caches::Batched(Box::new(cache))
    };
    loop {
        // Fill free slots; a sample of one token is finished before it needs the model.
        for (i, slot) in slots.iter_mut().enumerate() {
            while slot.is_none() {
                let Some(id) = job.take() else { break };
                let a = job.start(id);
                if a.tokens.len() >= cfg.max_tokens {
                    if tx.send(Ok(job.finish(a, Finish::Length))).is_err() {
                        return Ok(());
                    }
                } else {
                    caches.reset(i);
                    *slot = Some(a);
                }
            }
        }
        let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let inputs: Vec<Option<u32>> = slots
            .iter()
            .map(|s| s.as_ref().map(|a| *a.tokens.last().unwrap()))
            .collect();
        let logits = caches.step(model, &inputs, &live)?;
        // Each sample draws from its own RNG, so the rows (a softmax over the whole vocabulary
        // each) are chosen in parallel with the same result as one by one.
        let mut active: Vec<&mut Active> = slots.iter_mut().flatten().collect();
        active
            .par_iter_mut()
            .zip(logits.par_iter())
            .for_each(|(a, row)| {
                let next = if a.tokens.len() < a.greedy {
                    argmax(row)
                } else {
                    sample(row, &params, &mut a.rng)
                };
                a.tokens.push(next);
            });
        for &i in &live {
            let a = slots[i].as_ref().unwrap();
            let next = *a.tokens.last().unwrap();
            let finish = if eos.contains(&next) {
                Some(Finish::Eos)
            } else if a.tokens.len() >= cfg.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            if let Some(f) = finish {
                let a = slots[i].take().unwrap();
                if tx.send(Ok(job.finish(a, f))).is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// The KV caches of a worker's slots.
enum Caches {
    PerSequence(Vec<SeqCache>),
    Batched(Box<BatchCache>),
}

impl Caches {
    fn reset(&mut self, slot: usize) {
        match self {
            Caches::PerSequence(c) => c[slot].reset(),
            Caches::Batched(b) => b.reset(slot),
        }
    }

    /// One decoding step of the slots holding a token; logits rows in the order of `live`.
    fn step(
        &mut self,
        model: &Llama,
        inputs: &[Option<u32>],
        live: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        match self {
            Caches::PerSequence(c) => {
                let tokens: Vec<u32> = inputs.iter().flatten().copied().collect();
                let mut refs: Vec<&mut SeqCache> = c
                    .iter_mut()
                    .zip(inputs)
                    .filter(|(_, t)| t.is_some())
                    .map(|(c, _)| c)
                    .collect();
                Ok(model.decode_step(&tokens, &mut refs)?.to_vec2::<f32>()?)
            }
            Caches::Batched(b) => {
                let all = model.decode_slots(inputs, b)?;
                let rows: Vec<u32> = live.iter().map(|&i| i as u32).collect();
                let rows = candle_core::Tensor::from_vec(rows, live.len(), all.device())?;
                Ok(all.index_select(&rows, 0)?.to_vec2::<f32>()?)
            }
        }
    }
}
