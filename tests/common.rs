//! Helpers shared by the end-to-end tests: paths, temp folders, running the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn shared() -> PathBuf {
    std::env::var_os("SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("cannot start pipeline")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh empty folder under the target dir, unique per test name.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies the files of a model folder (not subfolders) into `dst`.
pub fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Starts `pipeline ARGS` `times` times and SIGKILLs each run after a seeded random delay of
/// `min_ms..min_ms + span_ms` (xorshift from `seed`, so a failure can be replayed); returns
/// how many runs were still going when killed.
pub fn kill_at_random_moments(
    args: &[&str],
    times: usize,
    seed: u64,
    min_ms: u64,
    span_ms: u64,
) -> usize {
    let mut x = seed;
    let mut kills = 0;
    for _ in 0..times {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let ms = min_ms + x % span_ms;
        let mut child = bin()
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        if child.try_wait().unwrap().is_none() {
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            kills += 1;
        }
        let _ = child.wait();
    }
    kills
}

/// The files of `dir` whose names `keep` accepts, as (name, bytes), sorted by name.
pub fn folder_bytes(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, _)| keep(n))
        .map(|(n, p)| (n, std::fs::read(p).unwrap()))
        .collect();
    v.sort();
    v
}
