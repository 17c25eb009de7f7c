//! A decoding worker: keeps up to `batch` sequences in flight; a finished sequence leaves and
//! the next sample takes its slot (continuous batching).

use crate::sampler::{argmax, sample, SampleRng, SamplingParams};
use crate::{FirstToken, GenerateConfig};
use anyhow::Result;
use corpus::{Finish, Sample};
use crossbeam_channel::Sender;
use model::{Llama, SeqCache};
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
    let mut caches: Vec<SeqCache> = (0..cfg.batch)
        .map(|_| SeqCache::new(model, cfg.max_tokens))
        .collect::<candle_core::Result<_>>()?;
    loop {
        // Fill free slots; a sample of one token is finished before it needs the model.
        for (slot, cache) in slots.iter_mut().zip(caches.iter_mut()) {
            while slot.is_none() {
                let Some(id) = job.take() else { break };
                let a = job.start(id);
                if a.tokens.len() >= cfg.max_tokens {
                    if tx.send(Ok(job.finish(a, Finish::Length))).is_err() {
                        return Ok(());
                    }
                } else {
                    cache.reset();
                    *slot = Some(a);
                }
            }
        }
        let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
        if live.is_empty() {
            return Ok(());
        }
        let inputs: Vec<u32> = live
            .iter()
            .map(|&i| *slots[i].as_ref().unwrap().tokens.last().unwrap())
            .collect();
        let mut refs: Vec<&mut SeqCache> = caches
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| slots[*i].is_some())
            .map(|(_, c)| c)
            .collect();
        let logits = model.decode_step(&inputs, &mut refs)?.to_vec2::<f32>()?;
        for (row, &i) in logits.iter().zip(&live) {
            let a = slots[i].as_mut().unwrap();
            let next = if a.tokens.len() < a.greedy {
                argmax(row)
            } else {
                sample(row, &params, &mut a.rng)
            };
            a.tokens.push(next);
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
