//! The data loader: a reader thread verifies and reads the corpus shards, builds the training
//! rows (`concat` blocks or `pad` rows), and sends micro-batches through a bounded channel.
//! Batch `g` is a pure function of (corpus, packing, seq_len, batch, seed, g), so a resumed
//! run restarts the loader at its saved cursor and sees exactly the batches it would have.

use crate::config::Packing;
use anyhow::{bail, Context, Result};
use corpus::{fsio, CorpusManifest};
use crossbeam_channel::{bounded, Receiver};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// One micro-batch: `rows` sequences of `len` token ids, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Global micro-batch index (the loader cursor).
    pub index: u64,
    pub rows: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding (`pad` packing only).
    pub mask: Option<Vec<f32>>,
    /// This slice's part of the global micro-batch's counted tokens (1 with one rank).
    pub share: f64,
}

/// What the loader needs to know about the model and the run.
#[derive(Clone, Debug)]
pub struct LoaderSpec {
    pub packing: Packing,
    pub seq_len: usize,
    pub batch: usize,
    pub seed: u64,
    pub bos: Option<u32>,
    /// Filler for padded positions (masked out of the loss).
    pub pad: u32,
    pub vocab_size: usize,
}

/// The training rows of a whole corpus.
pub struct Rows {
    packing: Packing,
    seq_len: usize,
    /// `concat`: the token stream; `pad`: all rows back to back.
    tokens: Vec<u32>,
    /// `pad` only: start of each row in `tokens` (plus a final end offset).
    offsets: Vec<usize>,
}

impl Rows {
    pub fn len(&self) -> usize {
        match self.packing {
            Packing::Concat => self.tokens.len() / self.seq_len,
            Packing::Pad => self.offsets.len().saturating_sub(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn row(&self, k: usize) -> &[u32] {
        match self.packing {
            Packing::Concat => &self.tokens[k * self.seq_len..(k + 1) * self.seq_len],
            Packing::Pad => &self.tokens[self.offsets[k]..self.offsets[k + 1]],
        }
    }
}

/// Checks every listed shard against the manifest hash, then reads the samples in sample_id
/// order and builds the rows.
pub fn load_rows(corpus_dir: &Path, spec: &LoaderSpec) -> Result<Rows> {
    let manifest = CorpusManifest::load(corpus_dir)?;
    let mut samples = Vec::new();
    for (index, entry) in &manifest.shards {
        let path = corpus_dir.join(&entry.file);
        let actual = fsio::sha256_file(&path).with_context(|| format!("corpus shard {index}"))?;
        if actual != entry.sha256 {
            bail!(
                "corpus shard {} is corrupt: sha256 {actual}, the manifest says {} (run `pipeline corpus verify {}`)",
                path.display(),
                entry.sha256,
                corpus_dir.display()
            );
        }
        for s in corpus::read_shard(&path)? {
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= spec.vocab_size) {
                bail!(
                    "corpus shard {}: sample {} has token id {t}, outside the model's vocabulary of {}",
                    path.display(),
                    s.sample_id,
                    spec.vocab_size
                );
            }
            samples.push((s.sample_id, s.tokens));
        }
    }
    samples.sort_by_key(|s| s.0);

    let mut tokens = Vec::new();
    let mut offsets = vec![0];
    for (_, toks) in &samples {
        let start = tokens.len();
        tokens.extend(spec.bos);
        tokens.extend_from_slice(toks);
        if spec.packing == Packing::Pad {
            tokens.truncate(start + spec.seq_len);
            offsets.push(tokens.len());
        }
    }
    let rows = Rows {
        packing: spec.packing,
        seq_len: spec.seq_len,
        tokens,
        offsets,
    };
    if rows.is_empty() {
        bail!(
            "corpus {} yields no training rows: {} tokens, train.seq_len = {} (packing {:?})",
            corpus_dir.display(),
            rows.tokens.len(),
            spec.seq_len,
            spec.packing
        );
    }
    Ok(rows)
}

/// SplitMix64: a tiny, fully specified generator, so shuffles never depend on a crate version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (multiply-shift; the bias is below 2^-32 for any realistic n).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

/// The row order of one epoch: a Fisher-Yates shuffle seeded from (seed, epoch) only.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Builds micro-batch `index`: global rows index*batch .. (index+1)*batch, walking epochs.
pub struct Batcher {
    rows: Rows,
    spec: LoaderSpec,
    epoch: u64,
    order: Vec<usize>,
}

impl Batcher {
    pub fn new(rows: Rows, spec: LoaderSpec) -> Self {
        let order = epoch_order(rows.len(), spec.seed, 0);
        Batcher {
            rows,
            spec,
            epoch: 0,
            order,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    pub fn batch(&mut self, index: u64) -> Batch {
        self.rank_slice(index, 0, 1)
    }

    /// Rank `rank`'s slice of micro-batch `index` among `ranks`: global rows
    /// `rank * B / ranks ..` of the batch's B, padded to the whole batch's length, so the ranks'
    /// slices back to back are exactly `batch(index)`. B must be divisible by `ranks`
    /// (`check_ranks`).
    pub fn rank_slice(&mut self, index: u64, rank: usize, ranks: usize) -> Batch {
        let n = self.rows.len() as u64;
        let picked: Vec<usize> = (0..self.spec.batch as u64)
            .map(|i| {
                let r = index * self.spec.batch as u64 + i;
                let epoch = r / n;
                if epoch != self.epoch {
                    self.epoch = epoch;
                    self.order = epoch_order(n as usize, self.spec.seed, epoch);
                }
                self.order[(r % n) as usize]
            })
            .collect();
        let len = picked
            .iter()
            .map(|&k| self.rows.row(k).len())
            .max()
            .unwrap_or(0);
        let per_rank = picked.len() / ranks;
        let mine = &picked[rank * per_rank..(rank + 1) * per_rank];
        let mut ids = Vec::with_capacity(mine.len() * len);
        let mut mask = Vec::with_capacity(mine.len() * len);
        for &k in mine {
            let row = self.rows.row(k);
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(self.spec.pad, len - row.len()));
            mask.extend(std::iter::repeat_n(1f32, row.len()));
            mask.extend(std::iter::repeat_n(0f32, len - row.len()));
        }
        // The loss is a mean over counted tokens, so a rank's gradient weighs by its tokens.
        let counted = |rows: &[usize]| -> usize {
            match self.spec.packing {
                Packing::Concat => rows.len() * len,
                Packing::Pad => rows.iter().map(|&k| self.rows.row(k).len()).sum(),
            }
        };
        let share = if ranks == 1 {
            1.0
        } else {
            counted(mine) as f64 / counted(&picked) as f64
        };
        Batch {
            index,
            rows: mine.len(),
            len,
            ids,
            mask: (self.spec.packing == Packing::Pad).then_some(mask),
            share,
        }
    }
}

/// A global micro-batch of `batch` rows splits evenly over `ranks`, or the run is refused.
pub fn check_ranks(batch: usize, ranks: usize) -> Result<()> {
    if ranks == 0 || !batch.is_multiple_of(ranks) {
        bail!(
            "train.batch = {batch} does not split evenly over {ranks} ranks (--devices or WORLD_SIZE): choose a batch that is a multiple of {ranks}"
        );
    }
    Ok(())
}

/// The reader thread and the receiving end of its channel.
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
    corpus: PathBuf,
}

impl Loader {
    /// Starts the reader thread; it produces micro-batches `cursor, cursor + 1, ...` forever
    /// (epochs wrap) until the loader is dropped. Corpus errors arrive as the first item.
    pub fn start(corpus_dir: &Path, spec: LoaderSpec, cursor: u64) -> Result<Loader> {
        Self::start_rank(corpus_dir, spec, cursor, 0, 1)
    }

    /// `start` for rank `rank` of `ranks`: each item is that rank's slice of the micro-batch.
    pub fn start_rank(
        corpus_dir: &Path,
        spec: LoaderSpec,
        cursor: u64,
        rank: usize,
        ranks: usize,
    ) -> Result<Loader> {
        check_ranks(spec.batch, ranks)?;
        // Small bound: back-pressure keeps at most a few batches in memory.
        let (tx, rx) = bounded::<Result<Batch>>(4);
        let dir = corpus_dir.to_path_buf();
        let handle = std::thread::Builder::new()
            .name("train-loader".into())
            .spawn(move || {
                let mut batcher = match load_rows(&dir, &spec) {
                    Ok(rows) => Batcher::new(rows, spec),
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut index = cursor;
                while tx.send(Ok(batcher.rank_slice(index, rank, ranks))).is_ok() {
                    index += 1;
                }
            })
            .context("starting the data loader thread")?;
        Ok(Loader {
            rx: Some(rx),
            handle: Some(handle),
            corpus: corpus_dir.to_path_buf(),
        })
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        let rx = self.rx.as_ref().context("data loader already stopped")?;
        match rx.recv() {
            Ok(b) => b.with_context(|| format!("loading the corpus {}", self.corpus.display())),
            Err(_) => bail!(
                "the data loader thread for {} stopped unexpectedly",
                self.corpus.display()
            ),
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel makes the thread's next send fail, so it ends.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(packing: Packing) -> LoaderSpec {
        LoaderSpec {
            packing,
            seq_len: 4,
            batch: 3,
            seed: 7,
            bos: Some(1),
            pad: 0,
            vocab_size: 100,
        }
    }

    #[test]
    fn shuffle_is_a_deterministic_permutation() {
        let a = epoch_order(50, 1, 0);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 1, 0));
        assert_ne!(a, epoch_order(50, 1, 1));
        assert_ne!(a, epoch_order(50, 2, 0));
    }

    #[test]
    fn concat_and_pad_rows() {
        let sp = spec(Packing::Concat);
        let mut tokens = Vec::new();
        for toks in [vec![5u32, 6, 2], vec![7, 8, 9, 10, 2]] {
            tokens.push(1);
            tokens.extend(toks);
        }
        // 10 tokens -> 2 blocks of 4, tail of 2 dropped.
        let rows = Rows {
            packing: Packing::Concat,
            seq_len: 4,
            tokens,
            offsets: vec![0],
        };
        assert_eq!(rows.len(), 2);
        assert_eq!(rows.row(1), &[1, 7, 8, 9]);
        let mut b = Batcher::new(rows, sp);
        let x = b.batch(0);
        assert_eq!((x.rows, x.len, x.ids.len()), (3, 4, 12));
        assert!(x.mask.is_none());
        // Batch 1 is the same whether or not batch 0 was built first (resume from a cursor).
        let y = b.batch(1);
        let rows = Rows {
            packing: Packing::Concat,
            seq_len: 4,
            tokens: b.rows.tokens.clone(),
            offsets: vec![0],
        };
        assert_eq!(Batcher::new(rows, spec(Packing::Concat)).batch(1), y);

        let rows = Rows {
            packing: Packing::Pad,
            seq_len: 4,
            tokens: vec![1, 5, 6, 1, 7, 8, 9],
            offsets: vec![0, 3, 7],
        };
        let mut b = Batcher::new(rows, spec(Packing::Pad));
        let x = b.batch(0);
        assert_eq!(x.len, 4);
        let mask = x.mask.unwrap();
        // Each row is a whole sample: 3 or 4 real tokens, the short one padded and masked.
        for r in 0..3 {
            let m = &mask[r * 4..(r + 1) * 4];
            let ids = &x.ids[r * 4..(r + 1) * 4];
            let real = m.iter().filter(|&&v| v == 1.0).count();
            assert!(real == 3 || real == 4);
            assert_eq!(ids[0], 1);
            if real == 3 {
                assert_eq!((m[3], ids[3]), (0.0, 0));
            }
        }
    }

    /// Rows of 1..=6 tokens (pad packing) so a slice can be shorter than the whole batch.
    fn pad_rows(n: usize) -> Rows {
        let mut tokens = Vec::new();
        let mut offsets = vec![0];
        for i in 0..n {
            tokens.extend((0..1 + i % 6).map(|t| (i * 7 + t) as u32 % 100));
            offsets.push(tokens.len());
        }
        Rows {
            packing: Packing::Pad,
            seq_len: 6,
            tokens,
            offsets,
        }
    }

    #[test]
    fn rank_slices_back_to_back_are_the_global_batch() {
        for packing in [Packing::Concat, Packing::Pad] {
            for (batch, ranks) in [(4, 1), (4, 2), (4, 4), (6, 3), (8, 2), (12, 4)] {
                let sp = LoaderSpec {
                    batch,
                    seq_len: 6,
                    ..spec(packing)
                };
                let rows = || match packing {
                    Packing::Pad => pad_rows(11),
                    Packing::Concat => Rows {
                        packing,
                        seq_len: 6,
                        tokens: (0..66).collect(),
                        offsets: vec![0],
                    },
                };
                let mut whole = Batcher::new(rows(), sp.clone());
                let mut sliced: Vec<Batcher> = (0..ranks)
                    .map(|_| Batcher::new(rows(), sp.clone()))
                    .collect();
                // 11 rows: batches of 4..12 rows cross several epoch boundaries by index 9.
                for index in [0u64, 1, 2, 5, 9, 3] {
                    let want = whole.batch(index);
                    let parts: Vec<Batch> = sliced
                        .iter_mut()
                        .enumerate()
                        .map(|(r, b)| b.rank_slice(index, r, ranks))
                        .collect();
                    let ids: Vec<u32> = parts.iter().flat_map(|p| p.ids.clone()).collect();
                    assert_eq!(ids, want.ids, "{packing:?} B {batch} W {ranks} #{index}");
                    if let Some(m) = &want.mask {
                        let mask: Vec<f32> =
                            parts.iter().flat_map(|p| p.mask.clone().unwrap()).collect();
                        assert_eq!(&mask, m);
                    }
                    assert!(parts.iter().all(|p| p.len == want.len && p.index == index));
                    assert_eq!(parts.iter().map(|p| p.rows).sum::<usize>(), batch);
                    let shares: f64 = parts.iter().map(|p| p.share).sum();
                    assert!((shares - 1.0).abs() < 1e-12, "shares sum to {shares}");
                }
            }
        }
        assert!(check_ranks(6, 4).is_err());
        let e = format!("{:#}", check_ranks(6, 4).unwrap_err());
        assert!(
            e.contains("train.batch = 6") && e.contains("4 ranks"),
            "{e}"
        );
    }
}
