//! Data-parallel training: how a run learns its rank (`Launch`, torchrun's environment
//! variables) and how ranks sum their gradients (`Collective`). `ThreadRanks` is the
//! collective of ranks running as threads of one process; an NCCL collective for ranks in
//! separate processes implements the same trait.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::sync::{Arc, Condvar, Mutex};

/// Where this process stands in a multi-process launch (torchrun, or a scheduler setting the
/// same variables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The rank among the processes of this host: which GPU it takes.
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 meets the others (needed when world_size > 1).
    pub master: Option<String>,
}

/// The variables `Launch::from_env` reads.
pub const LAUNCH_VARS: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl Launch {
    /// The launch described by torchrun's variables, or `None` when neither RANK nor WORLD_SIZE
    /// is set (a plain single-process run). `var` looks a variable up (a parameter so tests
    /// need not change the process's environment).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let (rank, world) = (var("RANK"), var("WORLD_SIZE"));
        if rank.is_none() && world.is_none() {
            return Ok(None);
        }
        let number = |name: &str, v: Option<String>| -> Result<usize> {
            let v = v.with_context(|| {
                format!(
                    "{name} is not set, but {} is: a launch sets RANK and WORLD_SIZE together",
                    if name == "RANK" { "WORLD_SIZE" } else { "RANK" }
                )
            })?;
            v.trim()
                .parse()
                .with_context(|| format!("{name} = {v:?} is not a whole number"))
        };
        let rank = number("RANK", rank)?;
        let world_size = number("WORLD_SIZE", world)?;
        if world_size == 0 {
            bail!("WORLD_SIZE = 0: must be at least 1");
        }
        if rank >= world_size {
            bail!("RANK = {rank} with WORLD_SIZE = {world_size}: RANK must be below WORLD_SIZE (ranks count from 0)");
        }
        let local_rank = match var("LOCAL_RANK") {
            None => rank,
            Some(v) => v
                .trim()
                .parse()
                .with_context(|| format!("LOCAL_RANK = {v:?} is not a whole number"))?,
        };
        if local_rank > rank {
            bail!("LOCAL_RANK = {local_rank} is above RANK = {rank}: the ranks of one host are a part of all ranks");
        }
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(a), Some(p)) => {
                let port: u16 = p.trim().parse().with_context(|| {
                    format!("MASTER_PORT = {p:?} is not a port number (0..=65535)")
                })?;
                if a.trim().is_empty() {
                    bail!("MASTER_ADDR is empty: it names the host of rank 0");
                }
                Some(format!("{}:{port}", a.trim()))
            }
            (None, None) => None,
            (Some(_), None) => bail!("MASTER_ADDR is set but MASTER_PORT is not: set both"),
            (None, Some(_)) => bail!("MASTER_PORT is set but MASTER_ADDR is not: set both"),
        };
        if world_size > 1 && master.is_none() {
            bail!("WORLD_SIZE = {world_size} needs MASTER_ADDR and MASTER_PORT (where rank 0 meets the others)");
        }
        Ok(Some(Launch {
            rank,
            world_size,
            local_rank,
            master,
        }))
    }
}

/// How the ranks of a data-parallel run combine their gradients. Every rank calls each method
/// the same number of times in the same order.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Each tensor summed over the ranks, on this rank's device; every rank gets the same sums.
    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Tells the other ranks this one has failed, so none waits for it forever.
    fn abort(&self);
}

/// Ranks as threads of one process, meeting at a barrier around a shared buffer.
pub struct ThreadRanks {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    turn: Condvar,
}

#[derive(Default)]
struct Round {
    /// Each rank's tensors for the round under way.
    given: Vec<Option<Vec<Tensor>>>,
    arrived: usize,
    /// Rounds finished so far, and the sums of the last one.
    done: u64,
    sums: Arc<Vec<Tensor>>,
    aborted: bool,
}

impl ThreadRanks {
    /// One handle per rank, to move into each rank's thread.
    pub fn new(world: usize) -> Vec<ThreadRanks> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Round {
                given: vec![None; world],
                ..Round::default()
            }),
            turn: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadRanks {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// What a rank's collective call returns when another rank has failed.
pub const ABORTED: &str = "another rank failed";

impl Collective for ThreadRanks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        let sh = &self.shared;
        let lock = || sh.state.lock().map_err(|_| anyhow::anyhow!(ABORTED));
        let mut st = lock()?;
        if st.aborted {
            bail!(ABORTED);
        }
        let round = st.done;
        st.given[self.rank] = Some(tensors.to_vec());
        st.arrived += 1;
        if st.arrived == sh.world {
            // The last to arrive sums in rank order, so every run adds in the same order.
            let given: Vec<Vec<Tensor>> = st
                .given
                .iter_mut()
                .map(|g| g.take().unwrap_or_default())
                .collect();
            if given.iter().any(|g| g.len() != tensors.len()) {
                st.aborted = true;
                sh.turn.notify_all();
                bail!("all_reduce_sum: the ranks passed different numbers of tensors");
            }
            let dev = tensors.first().map(|t| t.device().clone());
            let mut sums = Vec::with_capacity(tensors.len());
            for i in 0..tensors.len() {
                let mut acc = given[0][i].clone();
                for g in &given[1..] {
                    let x = match &dev {
                        Some(d) => g[i].to_device(d)?,
                        None => g[i].clone(),
                    };
                    acc = (acc + x)?;
                }
                sums.push(acc);
            }
            st.sums = Arc::new(sums);
            st.arrived = 0;
            st.done += 1;
            sh.turn.notify_all();
        } else {
            while st.done == round && !st.aborted {
                st = sh.turn.wait(st).map_err(|_| anyhow::anyhow!(ABORTED))?;
            }
            if st.done == round {
                bail!(ABORTED);
            }
        }
        // The sums stay until every rank has taken them: the next round needs all ranks.
        let sums = st.sums.clone();
        drop(st);
        sums.iter()
            .zip(tensors)
            .map(|(s, mine)| Ok(s.to_device(mine.device())?))
            .collect()
    }

    fn abort(&self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.aborted = true;
        }
        self.shared.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launch_reads_torchrun_variables() -> Result<()> {
        assert_eq!(Launch::from_env(env(&[]))?, None);
        let l = Launch::from_env(env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))?
        .unwrap();
        assert_eq!(
            l,
            Launch {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master: Some("node0:29500".into())
            }
        );
        let one = Launch::from_env(env(&[("RANK", "0"), ("WORLD_SIZE", "1")]))?.unwrap();
        assert_eq!((one.local_rank, one.master), (0, None));
        let m = [("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        for (vars, want) in [
            (vec![("RANK", "0")], "WORLD_SIZE is not set"),
            (vec![("WORLD_SIZE", "2")], "RANK is not set"),
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK = \"x\""),
            (
                vec![("RANK", "2"), ("WORLD_SIZE", "2")],
                "RANK must be below WORLD_SIZE",
            ),
            (vec![("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE = 0"),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2")],
                "needs MASTER_ADDR",
            ),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "MASTER_PORT is not",
            ),
            (
                vec![
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    m[0],
                    ("MASTER_PORT", "99999"),
                ],
                "MASTER_PORT = \"99999\"",
            ),
            (
                vec![
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "2"),
                    m[0],
                    m[1],
                ],
                "LOCAL_RANK = 2",
            ),
        ] {
            let e = format!("{:#}", Launch::from_env(env(&vars)).unwrap_err());
            assert!(e.contains(want), "{vars:?}: {e}");
        }
        Ok(())
    }

    #[test]
    fn thread_ranks_sum_in_rank_order_and_every_rank_gets_the_sum() -> Result<()> {
        let world = 3;
        let handles: Vec<_> = ThreadRanks::new(world)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || -> Result<Vec<Vec<f32>>> {
                    let mut out = Vec::new();
                    for round in 0..20 {
                        let r = c.rank() as f32;
                        let t = Tensor::new(&[r, 10.0 * r + round as f32], &Device::Cpu)?;
                        let s = c.all_reduce_sum(&[t])?;
                        out.push(s[0].to_vec1::<f32>()?);
                    }
                    Ok(out)
                })
            })
            .collect();
        let got: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Result<_>>()?;
        for (round, sums) in got[0].iter().enumerate() {
            assert_eq!(sums, &vec![3.0, 30.0 + 3.0 * round as f32]);
        }
        assert!(got.iter().all(|g| g == &got[0]));
        Ok(())
    }

    #[test]
    fn a_failed_rank_releases_the_others() {
        let mut ranks = ThreadRanks::new(2);
        let second = ranks.pop().unwrap();
        let first = ranks.pop().unwrap();
        let waiter = std::thread::spawn(move || {
            let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
            first.all_reduce_sum(&[t]).map(|_| ())
        });
        second.abort();
        let e = waiter.join().unwrap().unwrap_err();
        assert!(format!("{e}").contains(ABORTED));
    }
}
