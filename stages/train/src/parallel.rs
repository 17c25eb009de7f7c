//! Data-parallel training: how a run learns its rank (`Launch`, torchrun's environment
//! variables), how the ranks of a launch share NCCL's unique id (`Launch::share_id`, a TCP
//! rendezvous at MASTER_ADDR:MASTER_PORT) and how ranks sum their gradients (`Collective`).
//! `ThreadRanks` is the collective of ranks running as threads of one process, summing through
//! the host; `nccl::NcclRanks` (the `nccl` feature) sums on the GPUs, for threads or processes.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

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
                let a = a.trim();
                if a.is_empty() {
                    bail!("MASTER_ADDR is empty: it names the host of rank 0");
                }
                // An IPv6 literal is bracketed, so that `host:port` parses.
                if a.contains(':') && !a.starts_with('[') {
                    Some(format!("[{a}]:{port}"))
                } else {
                    Some(format!("{a}:{port}"))
                }
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

/// NCCL's unique id: the bytes every rank of a launch must hold before NCCL connects them.
pub type NcclId = [u8; 128];

/// How long the ranks of a launch wait for each other at the rendezvous: schedulers start
/// processes minutes apart.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

/// The first bytes of every rendezvous message, so a stray connection (or a rank 0 that is
/// some other server) is told apart from a rank.
const GREETING: &[u8; 8] = b"pipeline";

impl Launch {
    /// NCCL's unique id, the same on every rank. Rank 0 makes it (`make_id`; with
    /// WORLD_SIZE = 1 that is all) and serves it on MASTER_PORT to each other rank, which
    /// connects to MASTER_ADDR:MASTER_PORT (retrying until it answers) and reads it. Either
    /// side gives up after `timeout`, naming MASTER_ADDR:MASTER_PORT and who is missing.
    pub fn share_id(
        &self,
        make_id: impl FnOnce() -> Result<NcclId>,
        timeout: Duration,
    ) -> Result<NcclId> {
        let deadline = Instant::now() + timeout;
        if self.world_size == 1 {
            return make_id();
        }
        let master = self.master.as_deref().with_context(|| {
            format!(
                "WORLD_SIZE = {} needs MASTER_ADDR and MASTER_PORT",
                self.world_size
            )
        })?;
        if self.rank == 0 {
            // Bound before the id is made, so a port in use fails before NCCL starts.
            let listener = listen(master)?;
            let id = make_id()?;
            serve_id(&listener, &id, self.world_size, master, timeout, deadline)?;
            Ok(id)
        } else {
            fetch_id(master, self.rank, self.world_size, timeout, deadline)
        }
    }
}

/// Rank 0's listener on MASTER_PORT, on every interface of MASTER_ADDR's address family
/// (MASTER_ADDR names this host as the others reach it, which need not be an address of ours).
fn listen(master: &str) -> Result<TcpListener> {
    let addr = resolve(master)?;
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => ([0, 0, 0, 0], addr.port()).into(),
        SocketAddr::V6(_) => ([0u16; 8], addr.port()).into(),
    };
    TcpListener::bind(any).with_context(|| {
        format!(
            "rank 0 cannot listen on MASTER_PORT = {} (MASTER_ADDR:MASTER_PORT = {master}): is another run using the port?",
            addr.port()
        )
    })
}

fn resolve(master: &str) -> Result<SocketAddr> {
    master
        .to_socket_addrs()
        .with_context(|| format!("MASTER_ADDR:MASTER_PORT = {master} does not resolve"))?
        .next()
        .with_context(|| format!("MASTER_ADDR:MASTER_PORT = {master} resolves to no address"))
}

fn serve_id(
    listener: &TcpListener,
    id: &NcclId,
    world: usize,
    master: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("rendezvous: cannot poll the listener")?;
    let mut joined = vec![false; world];
    joined[0] = true;
    while joined.contains(&false) {
        let (mut s, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !joined[r]).collect();
                    bail!(
                        "rank 0 waited {timeout:?} on MASTER_ADDR:MASTER_PORT = {master} for ranks {missing:?} of WORLD_SIZE = {world}, which did not connect (are they started, with the same MASTER_ADDR and MASTER_PORT?)"
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).context("rendezvous: accepting a connection"),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(rank) = greet_rank(&mut s, left.max(Duration::from_secs(1))) else {
            // Not a rank of ours (a port scan, a health check): ignore it.
            eprintln!("rendezvous: ignoring a connection from {peer} that is not a pipeline rank");
            continue;
        };
        let (rank, their_world) = rank;
        if their_world != world {
            bail!(
                "rank {rank} (from {peer}) has WORLD_SIZE = {their_world}, but rank 0 has WORLD_SIZE = {world}: every rank of a launch needs the same WORLD_SIZE"
            );
        }
        if rank == 0 || rank >= world || joined[rank] {
            bail!(
                "a second process (from {peer}) says RANK = {rank}: each rank of WORLD_SIZE = {world} runs once, and rank 0 is this process"
            );
        }
        let mut reply = Vec::with_capacity(GREETING.len() + 4 + id.len());
        reply.extend_from_slice(GREETING);
        reply.extend_from_slice(&(id.len() as u32).to_le_bytes());
        reply.extend_from_slice(id);
        s.write_all(&reply)
            .with_context(|| format!("rendezvous: sending the NCCL id to rank {rank} at {peer}"))?;
        joined[rank] = true;
    }
    Ok(())
}

/// Reads a rank's greeting: (RANK, WORLD_SIZE).
fn greet_rank(s: &mut TcpStream, timeout: Duration) -> Result<(usize, usize)> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf)?;
    if &buf[..8] != GREETING {
        bail!("not a pipeline rank");
    }
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap()) as usize;
    Ok((word(8), word(12)))
}

fn fetch_id(
    master: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
    deadline: Instant,
) -> Result<NcclId> {
    let unreachable = |why: String| {
        anyhow::anyhow!(
            "rank {rank} could not reach rank 0 at MASTER_ADDR:MASTER_PORT = {master} within {timeout:?}: {why} (is rank 0 running, and are MASTER_ADDR and MASTER_PORT the same for every rank?)"
        )
    };
    let mut s = loop {
        let tried = master
            .to_socket_addrs()
            .map_err(|e| format!("{e}"))
            .and_then(|mut a| {
                a.next()
                    .ok_or_else(|| "it resolves to no address".to_string())
            })
            .and_then(|addr| {
                let left = deadline.saturating_duration_since(Instant::now());
                TcpStream::connect_timeout(
                    &addr,
                    left.clamp(Duration::from_millis(10), Duration::from_secs(2)),
                )
                .map_err(|e| format!("{e}"))
            });
        match tried {
            Ok(s) => break s,
            Err(why) if Instant::now() >= deadline => return Err(unreachable(why)),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(1));
    let lost = |e: std::io::Error| {
        anyhow::anyhow!(
            "rank {rank}: rank 0 at MASTER_ADDR:MASTER_PORT = {master} closed the rendezvous without sending the NCCL id ({e}); see rank 0's error"
        )
    };
    s.set_read_timeout(Some(left)).map_err(lost)?;
    s.set_write_timeout(Some(left)).map_err(lost)?;
    let mut hello = GREETING.to_vec();
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    s.write_all(&hello).map_err(lost)?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).map_err(lost)?;
    let len = u32::from_le_bytes(head[8..].try_into().unwrap()) as usize;
    let mut id = [0u8; 128];
    if &head[..8] != GREETING || len != id.len() {
        bail!(
            "rank {rank}: MASTER_ADDR:MASTER_PORT = {master} answered, but not as rank 0 of a pipeline launch (another program on that port?)"
        );
    }
    s.read_exact(&mut id).map_err(lost)?;
    Ok(id)
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
        let v6 = Launch::from_env(env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "::1"),
            ("MASTER_PORT", "29500"),
        ]))?
        .unwrap();
        assert_eq!(v6.master.as_deref(), Some("[::1]:29500"));
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

    fn free_port() -> u16 {
        TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .expect("no free port")
            .port()
    }

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch {
            rank,
            world_size: world,
            local_rank: 0,
            master: Some(format!("127.0.0.1:{port}")),
        }
    }

    #[test]
    fn every_rank_gets_rank_zeros_id_over_tcp() -> Result<()> {
        let (world, port) = (4, free_port());
        let made: NcclId = std::array::from_fn(|i| (i * 7 + 3) as u8);
        // The other ranks start first and retry until rank 0 listens.
        let others: Vec<_> = (1..world)
            .map(|r| {
                let l = launch(r, world, port);
                std::thread::spawn(move || {
                    l.share_id(
                        || bail!("only rank 0 makes the id"),
                        Duration::from_secs(20),
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let first = launch(0, world, port).share_id(|| Ok(made), Duration::from_secs(20))?;
        assert_eq!(first, made);
        for h in others {
            assert_eq!(h.join().unwrap()?, made);
        }
        // Alone, rank 0 needs no network.
        let alone = Launch {
            master: None,
            ..launch(0, 1, 0)
        };
        assert_eq!(alone.share_id(|| Ok(made), Duration::ZERO)?, made);
        Ok(())
    }

    #[test]
    fn rendezvous_failures_name_master_addr_and_port() -> Result<()> {
        let short = Duration::from_millis(400);
        let err = |r: Result<NcclId>| format!("{:#}", r.unwrap_err());
        let port = free_port();
        let master = format!("MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port}");

        // Nobody listens on the port.
        let e = err(launch(1, 2, port).share_id(|| Ok([0; 128]), short));
        assert!(
            e.contains("could not reach rank 0") && e.contains(&master),
            "{e}"
        );

        // Rank 0 waits in vain, and says for whom.
        let e = err(launch(0, 3, port).share_id(|| Ok([0; 128]), short));
        assert!(
            e.contains("ranks [1, 2] of WORLD_SIZE = 3") && e.contains(&master),
            "{e}"
        );

        // A rank of another WORLD_SIZE is refused, and learns that rank 0 gave up.
        let zero = std::thread::spawn(move || {
            launch(0, 2, port).share_id(|| Ok([1; 128]), Duration::from_secs(10))
        });
        let e1 = err(launch(1, 3, port).share_id(|| Ok([0; 128]), Duration::from_secs(10)));
        let e0 = err(zero.join().unwrap());
        assert!(
            e0.contains("WORLD_SIZE = 3, but rank 0 has WORLD_SIZE = 2"),
            "{e0}"
        );
        assert!(
            e1.contains("closed the rendezvous") && e1.contains(&master),
            "{e1}"
        );

        // The port is taken.
        let _taken = TcpListener::bind(("0.0.0.0", port))?;
        let e = err(launch(0, 2, port).share_id(|| Ok([0; 128]), short));
        assert!(
            e.contains(&format!("cannot listen on MASTER_PORT = {port}")),
            "{e}"
        );
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
