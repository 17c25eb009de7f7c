//! Durable-file helpers shared by every stage.
//!
//! The run directory must survive a SIGKILL at any instant, so files that other
//! steps rely on (manifests, shards, checkpoints) are never written in place:
//! they go to a temporary file in the same folder, are fsynced, renamed over the
//! target, and then the folder itself is fsynced so the rename is durable.
//! A crash leaves at worst a `.NAME.tmp.PID.N` file, which `remove_temp_files`
//! cleans up on the next start.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Distinguishes temp files of concurrent writers inside one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Durable writes (renames into place) made by this process so far.
static WRITES: AtomicU64 = AtomicU64::new(0);

/// The environment variable naming the durable write a process dies at (crash tests).
pub const CRASH_ENV: &str = "PIPELINE_CRASH_AT_WRITE";
/// The environment variable naming the durable write that fails as on a full disk.
pub const FULL_DISK_ENV: &str = "PIPELINE_FULL_DISK_AT_WRITE";

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Every durable write passes here just before its rename. With `PIPELINE_CRASH_AT_WRITE=N`
/// the process SIGKILLs itself at its Nth one (its data written and fsynced, the rename not
/// done), so tests can die at every write point in turn instead of at random instants; with
/// `PIPELINE_FULL_DISK_AT_WRITE=N` the Nth one fails as a full disk does (ENOSPC).
fn crash_point(target: &Path) -> Result<()> {
    static AT: std::sync::OnceLock<(Option<u64>, Option<u64>)> = std::sync::OnceLock::new();
    let (at, full) = *AT.get_or_init(|| (env_number(CRASH_ENV), env_number(FULL_DISK_ENV)));
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    if full == Some(n) {
        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .with_context(|| format!("writing {} ({FULL_DISK_ENV}={n})", target.display()));
    }
    if at == Some(n) {
        eprintln!(
            "{CRASH_ENV}={n}: dying before {} is renamed into place",
            target.display()
        );
        // SIGKILL, as a machine that dies: no destructor, no flush, no cleanup runs.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    Ok(())
}

/// The folder holding `path`; "" (a bare file name) means the current folder.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A fresh temp path next to `path`, named `.NAME.tmp.PID.N`.
pub fn temp_path_for(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp_name = format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        n
    );
    Ok(parent_dir(path).join(tmp_name))
}

/// Is `name` one of the temp names `temp_path_for` makes (`.*.tmp.*`)?
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name[1..].contains(".tmp.")
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync, rename,
/// fsync of the folder. Readers see either the old file or the complete new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path_for(path)?;
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating temp file {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync of {}", tmp.display()))?;
        drop(f);
        crash_point(path)?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        // Best effort: a leftover would also be removed by remove_temp_files later.
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {} atomically", path.display()))?;
    fsync_dir(parent_dir(path))
}

/// Moves an already-complete file `from` over `to` (same filesystem) and makes
/// the rename durable. `from` should already be fsynced.
pub fn rename_durable(from: &Path, to: &Path) -> Result<()> {
    crash_point(to)?;
    fs::rename(from, to)
        .with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
    fsync_dir(parent_dir(to))
}

/// fsyncs a folder so that renames and creations inside it survive a crash.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening folder {}", dir.display()))?;
    d.sync_all()
        .with_context(|| format!("fsync of folder {}", dir.display()))
}

/// Lower-case hex SHA-256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lower-case hex SHA-256 of a file, read in 1 MiB pieces (files may be large).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Deletes leftover partial files (`.*.tmp.*`) directly inside `dir` and returns
/// the paths it removed, so the caller can log them. A missing folder is not an
/// error (nothing was ever written there).
pub fn remove_temp_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => {
            return Err(e).with_context(|| format!("listing folder {}", dir.display()));
        }
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing folder {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !is_temp_name(name) {
            continue;
        }
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("inspecting {}", path.display()))?;
        if !kind.is_file() {
            continue;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    if !removed.is_empty() {
        fsync_dir(dir)?;
    }
    removed.sort();
    Ok(removed)
}

/// Creates the output folder `dir` of a stage or command (with its parents) and checks that
/// nothing below it is a symbolic link. Every file the pipeline writes lies under such a
/// folder, so a link planted there (`RUN/train -> /elsewhere`, a log or temp name pointing
/// out) can never redirect a write outside it. `dir` itself may be a link: it is the user's
/// choice of place.
pub fn create_out_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    refuse_links(dir)
}

/// Fails on the first symbolic link found below `dir` (not followed), naming it and its target.
pub fn refuse_links(dir: &Path) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing folder {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing folder {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("inspecting {}", path.display()))?;
        if kind.is_symlink() {
            let target =
                fs::read_link(&path).map_or_else(|_| "?".into(), |t| t.display().to_string());
            bail!(
                "{} is a symbolic link (to {target}); the pipeline writes only inside its output \
                 folders and never through a link: replace it with a real file or folder",
                path.display()
            );
        }
        if kind.is_dir() {
            refuse_links(&path)?;
        }
    }
    Ok(())
}

/// Checks that a file name taken from a manifest is a plain name inside its
/// folder (no separators, no `..`), so a crafted manifest cannot point outside.
pub fn check_plain_file_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\\')
        || name.contains('\0')
    {
        bail!("{name:?} is not a plain file name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestDir;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() -> Result<()> {
        let dir = TestDir::new("fsio-atomic")?;
        let p = dir.path().join("a.json");
        write_atomic(&p, b"first")?;
        write_atomic(&p, b"second")?;
        assert_eq!(fs::read(&p)?, b"second");
        let names: Vec<_> = fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        Ok(())
    }

    #[test]
    fn write_atomic_error_names_path() -> Result<()> {
        let dir = TestDir::new("fsio-err")?;
        let p = dir.path().join("no-such-folder").join("x.bin");
        let err = write_atomic(&p, b"x").unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("x.bin"), "{msg}");
        Ok(())
    }

    #[test]
    fn hashes_agree() -> Result<()> {
        let dir = TestDir::new("fsio-hash")?;
        let p = dir.path().join("h");
        // Larger than one read buffer, so the streaming path is exercised.
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data)?;
        assert_eq!(sha256_file(&p)?, sha256_bytes(&data));
        assert_eq!(
            sha256_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let missing = sha256_file(&dir.path().join("missing")).unwrap_err();
        assert!(format!("{missing:#}").contains("missing"));
        Ok(())
    }

    #[test]
    fn removes_only_temp_files() -> Result<()> {
        let dir = TestDir::new("fsio-clean")?;
        fs::write(
            dir.path().join(".shard-00001.parquet.tmp.123.0"),
            b"partial",
        )?;
        fs::write(dir.path().join(".manifest.json.tmp.9.4"), b"partial")?;
        fs::write(dir.path().join("shard-00000.parquet"), b"keep")?;
        fs::write(dir.path().join(".hidden"), b"keep")?;
        fs::write(dir.path().join("notes.tmp.txt"), b"keep")?;
        let removed = remove_temp_files(dir.path())?;
        let names: Vec<_> = removed
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        assert_eq!(
            names,
            vec![".manifest.json.tmp.9.4", ".shard-00001.parquet.tmp.123.0"]
        );
        assert!(dir.path().join("shard-00000.parquet").exists());
        assert!(dir.path().join(".hidden").exists());
        assert!(dir.path().join("notes.tmp.txt").exists());
        assert!(remove_temp_files(&dir.path().join("absent"))?.is_empty());
        Ok(())
    }

    #[test]
    fn plain_names() {
        assert!(check_plain_file_name("shard-00000.parquet").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd"] {
            assert!(check_plain_file_name(bad).is_err(), "{bad}");
        }
    }
}
