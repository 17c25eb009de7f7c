//! Model specs that name a Hugging Face hub repository. Wherever a model folder is taken, a
//! spec `org/name` or `org/name@revision` is accepted too: an existing local path always wins;
//! otherwise a spec shaped like a hub repo id is resolved through the standard Hugging Face
//! cache (`models--org--name/{refs,snapshots,blobs}` under `HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`) to its snapshot folder, downloading the
//! missing files with `hf-hub` unless `HF_HUB_OFFLINE` is set. After that the snapshot is an
//! ordinary model folder; `HubSource` says which repo and commit it came from.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::{LazyLock, Mutex};

/// The branch a spec without `@revision` means.
pub const DEFAULT_REVISION: &str = "main";

/// A hub repo id with an optional revision, as the user wrote it (`org/name@rev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubSpec {
    /// The revision asked for (`main` when none was given).
    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or(DEFAULT_REVISION)
    }
}

impl std::fmt::Display for HubSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repo, self.revision())
    }
}

/// Where a model resolved from the hub came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSource {
    pub repo: String,
    /// The revision asked for (a branch, a tag or a commit).
    pub revision: String,
    /// The commit that revision resolved to (40 hex digits).
    pub commit: String,
}

/// Is `s` a valid hub repo id of the form `org/name`? The rules are huggingface_hub's
/// `validate_repo_id`: letters, digits, `_`, `-` and `.`, each part starting and ending with a
/// letter, digit or `_`, at most 96 characters a part, no `--` or `..`, not ending in `.git`.
pub fn is_repo_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else {
        return false;
    };
    let part_ok = |p: &str| {
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
        !p.is_empty()
            && p.len() <= 96
            && p.chars().all(|c| word(c) || c == '-' || c == '.')
            && p.starts_with(word)
            && p.ends_with(word)
    };
    part_ok(org) && part_ok(name) && !s.contains("--") && !s.contains("..") && !s.ends_with(".git")
}

/// Is `r` usable as a revision: a branch, tag or commit name that stays inside `refs/` when
/// joined to it (no `..`, no empty or absolute parts, no whitespace or git-forbidden marks)?
pub fn is_revision(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && r.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && !r.contains("..")
        && r.chars().all(|c| {
            c.is_ascii_graphic() && !matches!(c, '\\' | '~' | '^' | ':' | '?' | '*' | '[' | '@')
        })
}

/// Is `r` a full commit hash (40 lowercase hex digits), which names a snapshot directly?
pub fn is_commit_hash(r: &str) -> bool {
    r.len() == 40
        && r.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses `org/name` or `org/name@revision`; `None` when `s` has another shape.
pub fn parse_hub_spec(s: &str) -> Option<HubSpec> {
    let (repo, revision) = match s.split_once('@') {
        Some((repo, rev)) => (repo, Some(rev)),
        None => (s, None),
    };
    if !is_repo_id(repo) || !revision.is_none_or(is_revision) {
        return None;
    }
    Some(HubSpec {
        repo: repo.to_string(),
        revision: revision.map(String::from),
    })
}

/// The hub spec `spec` stands for, if any: `None` when it names an existing local path (a
/// local path always wins) or is not shaped like `org/name[@revision]`.
pub fn hub_spec_of(spec: &Path) -> Option<HubSpec> {
    if spec.exists() {
        return None;
    }
    parse_hub_spec(spec.to_str()?)
}

/// Where the cache lives and whether downloading is allowed, from the environment like
/// huggingface_hub: `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`
/// set to 1, true, yes or on forbids downloads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HubSettings {
    pub cache: PathBuf,
    pub offline: bool,
}

fn env_path(key: &str) -> Option<PathBuf> {
    let v = std::env::var_os(key).filter(|v| !v.is_empty())?;
    // huggingface_hub expands a leading `~`.
    match v.to_str().and_then(|s| s.strip_prefix("~/")) {
        Some(rest) => Some(home_dir()?.join(rest)),
        None => Some(PathBuf::from(v)),
    }
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
fn hf_home() -> Option<PathBuf> {
    env_path("HF_HOME")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|d| d.join("huggingface")))
        .or_else(|| home_dir().map(|h| h.join(".cache").join("huggingface")))
}

/// huggingface_hub's truth values for flags such as `HF_HUB_OFFLINE`.
pub fn env_flag_is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubSettings {
    pub fn from_env() -> Result<Self> {
        let cache = env_path("HF_HUB_CACHE")
            .or_else(|| hf_home().map(|h| h.join("hub")))
            .context(
                "cannot locate the Hugging Face cache: set HF_HUB_CACHE or HF_HOME (HOME is not set)",
            )?;
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| env_flag_is_true(&v));
        Ok(HubSettings { cache, offline })
    }

    /// The cache folder of `repo`: `models--org--name`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache
            .join(Repo::new(repo.to_string(), RepoType::Model).folder_name())
    }
}

/// `spec` as a model folder: itself when it is a local path or not a hub id (the folder
/// loader then reports what is wrong with it), else the snapshot folder of the hub repo with
/// where it came from. Within one process a spec resolves once, so every stage of a run uses
/// the same commit even if the branch moves meanwhile.
pub fn resolve(spec: &Path) -> Result<(PathBuf, Option<HubSource>)> {
    let Some(hub) = hub_spec_of(spec) else {
        return Ok((spec.to_path_buf(), None));
    };
    let settings = HubSettings::from_env()?;
    type Memo = HashMap<(HubSettings, String), (PathBuf, HubSource)>;
    static RESOLVED: LazyLock<Mutex<Memo>> = LazyLock::new(Default::default);
    let key = (settings.clone(), hub.to_string());
    if let Some((dir, source)) = RESOLVED.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok((dir, Some(source)));
    }
    let (dir, source) = resolve_hub(&settings, &hub)?;
    if let Ok(mut m) = RESOLVED.lock() {
        m.insert(key, (dir.clone(), source.clone()));
    }
    Ok((dir, Some(source)))
}

/// Resolves `hub` with explicit settings (no memo): offline from the cache alone, online
/// through the hub API, falling back to a complete cached snapshot when the hub cannot be
/// reached.
pub fn resolve_hub(settings: &HubSettings, hub: &HubSpec) -> Result<(PathBuf, HubSource)> {
    if settings.offline {
        return resolve_cached(settings, hub);
    }
    match download(settings, hub) {
        Ok(r) => Ok(r),
        Err(Unreachable(e)) => match resolve_cached(settings, hub) {
            Ok(r) => {
                eprintln!(
                    "warning: the Hugging Face hub cannot be reached ({e:#}); using the cached snapshot of {hub} (commit {})",
                    r.1.commit
                );
                Ok(r)
            }
            Err(cached) => Err(e.context(format!(
                "cannot reach the Hugging Face hub to fetch {hub}, and the cache cannot serve it either ({cached:#})"
            ))),
        },
        Err(Failed(e)) => Err(e),
    }
}

/// The files of a snapshot that make a model folder: config, tokenizer and weights (one
/// safetensors file, or an index and every shard it names); `generation_config.json` and
/// `quantize.json` are optional.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["generation_config.json", "quantize.json"];
const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The shard files a `model.safetensors.index.json` names, refusing names that leave the
/// snapshot folder.
fn index_shards(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object field `weight_map`", index.display()))?;
    let mut out = BTreeSet::new();
    for f in map.values().filter_map(|x| x.as_str()) {
        if !Path::new(f)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            bail!(
                "{}: weight_map names {f:?}, which is not a file inside the folder",
                index.display()
            );
        }
        out.insert(f.to_string());
    }
    Ok(out)
}

/// The commit `revision` names in the cache: itself for a commit hash, else `refs/<rev>`.
fn cached_commit(settings: &HubSettings, hub: &HubSpec) -> Result<String> {
    let repo_dir = settings.repo_dir(&hub.repo);
    let offline = if settings.offline {
        " and HF_HUB_OFFLINE is set, so nothing was downloaded"
    } else {
        ""
    };
    if !repo_dir.is_dir() {
        bail!(
            "hub model {} is not in the Hugging Face cache (no folder {}){offline}; \
             point HF_HUB_CACHE or HF_HOME at the cache that holds it{}",
            hub.repo,
            repo_dir.display(),
            if settings.offline {
                ", or unset HF_HUB_OFFLINE to download it"
            } else {
                ""
            }
        );
    }
    let rev = hub.revision();
    if is_commit_hash(rev) {
        return Ok(rev.to_string());
    }
    let ref_file = repo_dir.join("refs").join(rev);
    let text = std::fs::read_to_string(&ref_file).map_err(|_| {
        let known = list_refs(&repo_dir.join("refs"));
        anyhow!(
            "revision {rev:?} of hub model {} is not in the Hugging Face cache (no {}; cached revisions: {}){offline}",
            hub.repo,
            ref_file.display(),
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )
    })?;
    let commit = text.trim().to_string();
    if !is_commit_hash(&commit) {
        bail!(
            "{}: expected a 40-hex commit hash, found {commit:?}",
            ref_file.display()
        );
    }
    Ok(commit)
}

/// Branch and tag names under `refs/` (nested ones such as `refs/pr/1` included), sorted.
fn list_refs(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The snapshot folder of `hub` in the cache, when every file a model folder needs is there.
pub fn resolve_cached(settings: &HubSettings, hub: &HubSpec) -> Result<(PathBuf, HubSource)> {
    let commit = cached_commit(settings, hub)?;
    let snap = settings.repo_dir(&hub.repo).join("snapshots").join(&commit);
    let missing = |file: &str| {
        anyhow!(
            "{file} of hub model {} at revision {} (commit {commit}) is not in the Hugging Face cache: \
             looked in {}{}",
            hub.repo,
            hub.revision(),
            snap.display(),
            if settings.offline {
                "; HF_HUB_OFFLINE is set, so nothing was downloaded"
            } else {
                ""
            }
        )
    };
    // `exists` follows the snapshot's symlinks, so a link to a deleted blob counts as missing.
    for f in REQUIRED {
        if !snap.join(f).exists() {
            return Err(missing(f));
        }
    }
    if !snap.join(SINGLE).exists() {
        if !snap.join(INDEX).exists() {
            return Err(missing(&format!("{SINGLE} (or {INDEX})")));
        }
        for shard in index_shards(&snap.join(INDEX))? {
            if !snap.join(&shard).exists() {
                return Err(missing(&shard));
            }
        }
    }
    let source = HubSource {
        repo: hub.repo.clone(),
        revision: hub.revision().to_string(),
        commit,
    };
    Ok((snap, source))
}

/// Why a download failed: the hub could not be reached (a cached snapshot may still serve),
/// or anything else (not found, access denied, a broken file), which is final.
enum DownloadError {
    Unreachable(anyhow::Error),
    Failed(anyhow::Error),
}
use DownloadError::{Failed, Unreachable};

fn api_error(e: hf_hub::api::sync::ApiError, what: impl FnOnce() -> String) -> DownloadError {
    use hf_hub::api::sync::ApiError;
    let transport = match &e {
        ApiError::RequestError(r) => matches!(**r, ureq::Error::Transport(_)),
        _ => false,
    };
    let status = match &e {
        ApiError::RequestError(r) => match &**r {
            ureq::Error::Status(code, _) => Some(*code),
            _ => None,
        },
        _ => None,
    };
    let hint = match status {
        Some(401 | 403) => {
            "; for a gated or private repo set HF_TOKEN (or log in with `huggingface-cli login`)"
        }
        Some(404) => "; check the repo id and revision",
        _ => "",
    };
    let err = anyhow!("{}: {e}{hint}", what());
    if transport {
        Unreachable(err)
    } else {
        Failed(err)
    }
}

/// Resolves `hub` online: asks the hub which commit the revision is and which files it has,
/// downloads the missing ones into the cache pinned to that commit, and points
/// `refs/<revision>` at it (as huggingface_hub does).
fn download(settings: &HubSettings, hub: &HubSpec) -> Result<(PathBuf, HubSource), DownloadError> {
    let cache = Cache::new(settings.cache.clone());
    let mut builder = ApiBuilder::from_cache(cache.clone());
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        if !endpoint.is_empty() {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
        }
    }
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| {
            let f = env_path("HF_TOKEN_PATH").or_else(|| hf_home().map(|h| h.join("token")))?;
            let t = std::fs::read_to_string(f).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
    if token.is_some() {
        builder = builder.with_token(token);
    }
    let api = builder
        .build()
        .map_err(|e| api_error(e, || "cannot set up the Hugging Face hub client".into()))?;
    let rev = hub.revision().to_string();
    let info = api
        .repo(Repo::with_revision(
            hub.repo.clone(),
            RepoType::Model,
            rev.clone(),
        ))
        .info()
        .map_err(|e| {
            api_error(e, || {
                format!("cannot look up {hub} on the Hugging Face hub")
            })
        })?;
    let commit = info.sha;
    if !is_commit_hash(&commit) {
        return Err(Failed(anyhow!(
            "the hub answered commit {commit:?} for {hub}, not a 40-hex commit hash"
        )));
    }
    let on_hub: BTreeSet<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let repo_dir = settings.repo_dir(&hub.repo);
    let snap = repo_dir.join("snapshots").join(&commit);
    let commit_ref = repo_dir.join("refs").join(&commit);
    let had_commit_ref = commit_ref.exists();
    let pinned = api.repo(Repo::with_revision(
        hub.repo.clone(),
        RepoType::Model,
        commit.clone(),
    ));
    let fetch = |file: &str| -> Result<(), DownloadError> {
        if snap.join(file).exists() {
            return Ok(());
        }
        pinned.download(file).map(|_| ()).map_err(|e| {
            api_error(e, || {
                format!("cannot download {file} of {hub} (commit {commit})")
            })
        })
    };
    let absent = |file: &str| {
        Failed(anyhow!(
            "hub model {hub} (commit {commit}) has no {file}; a model folder needs config.json, tokenizer.json and safetensors weights"
        ))
    };
    for f in REQUIRED {
        if !on_hub.contains(f) {
            return Err(absent(f));
        }
        fetch(f)?;
    }
    for f in OPTIONAL {
        if on_hub.contains(f) {
            fetch(f)?;
        }
    }
    if on_hub.contains(SINGLE) {
        fetch(SINGLE)?;
    } else if on_hub.contains(INDEX) {
        fetch(INDEX)?;
        for shard in index_shards(&snap.join(INDEX)).map_err(Failed)? {
            if !on_hub.contains(&shard) {
                return Err(absent(&shard));
            }
            fetch(&shard)?;
        }
    } else {
        return Err(absent(&format!(
            "{SINGLE} or {INDEX} (only safetensors checkpoints are supported)"
        )));
    }
    // hf-hub records the pinned download under refs/<commit>; huggingface_hub keeps refs for
    // branches and tags only.
    if !had_commit_ref && commit_ref.is_file() {
        let _ = std::fs::remove_file(&commit_ref);
    }
    if rev != commit {
        cache
            .repo(Repo::with_revision(hub.repo.clone(), RepoType::Model, rev))
            .create_ref(&commit)
            .map_err(|e| {
                Failed(anyhow!(
                    "cannot write refs/{} in {}: {e}",
                    hub.revision(),
                    repo_dir.display()
                ))
            })?;
    }
    let source = HubSource {
        repo: hub.repo.clone(),
        revision: hub.revision().to_string(),
        commit,
    };
    Ok((snap, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_follow_the_hub_rules() {
        for ok in [
            "org/name",
            "meta-llama/Llama-3.2-1B",
            "Qwen/Qwen2.5-0.5B-Instruct",
            "a/b",
            "user_1/model.v2",
            "EleutherAI/pythia-70m",
        ] {
            assert!(is_repo_id(ok), "{ok} should be a repo id");
        }
        for bad in [
            "name",
            "",
            "/name",
            "org/",
            "org/name/extra",
            "./org/name",
            "../org/name",
            "org/-name",
            "org/name-",
            ".org/name",
            "org/na--me",
            "org/na..me",
            "org/name.git",
            "org/na me",
            "org/näme",
            "org/name!",
            &format!("org/{}", "x".repeat(97)),
        ] {
            assert!(!is_repo_id(bad), "{bad:?} should not be a repo id");
        }
        assert!(is_repo_id(&format!("org/{}", "x".repeat(96))));
    }

    #[test]
    fn specs_split_repo_and_revision() {
        assert_eq!(
            parse_hub_spec("org/name"),
            Some(HubSpec {
                repo: "org/name".into(),
                revision: None
            })
        );
        let s = parse_hub_spec("org/name@v1.0").unwrap();
        assert_eq!((s.repo.as_str(), s.revision()), ("org/name", "v1.0"));
        assert_eq!(s.to_string(), "org/name@v1.0");
        assert_eq!(parse_hub_spec("org/name").unwrap().revision(), "main");
        let c = "0123456789abcdef0123456789abcdef01234567";
        let s = parse_hub_spec(&format!("org/name@{c}")).unwrap();
        assert!(is_commit_hash(s.revision()));
        assert_eq!(
            parse_hub_spec("org/name@refs/pr/1").unwrap().revision(),
            "refs/pr/1"
        );
        for bad in [
            "org/name@",
            "org/name@a@b",
            "org/name@../../etc",
            "org/name@a/../b",
            "org/name@/abs",
            "org/name@a//b",
            "org/name@has space",
            "org/name@a\\b",
            "bad id/name@main",
            "name@main",
        ] {
            assert_eq!(parse_hub_spec(bad), None, "{bad:?} should not parse");
        }
    }

    #[test]
    fn commit_hashes_are_40_lowercase_hex() {
        assert!(is_commit_hash(&"a".repeat(40)));
        assert!(!is_commit_hash(&"a".repeat(39)));
        assert!(!is_commit_hash(&"A".repeat(40)));
        assert!(!is_commit_hash(&"g".repeat(40)));
    }

    #[test]
    fn offline_flag_values() {
        for t in ["1", "true", "TRUE", "yes", "On", " 1 "] {
            assert!(env_flag_is_true(t), "{t}");
        }
        for f in ["0", "false", "no", "off", "", "2"] {
            assert!(!env_flag_is_true(f), "{f}");
        }
    }

    /// A fresh folder under the system temp dir.
    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("model-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_existing_local_path_wins_over_a_hub_id() {
        // Tests run in the crate folder, where `src/hub.rs` exists: id-shaped, but local.
        assert!(parse_hub_spec("src/hub.rs").is_some());
        assert_eq!(hub_spec_of(Path::new("src/hub.rs")), None);
        assert_eq!(
            resolve(Path::new("src/hub.rs")).unwrap(),
            (PathBuf::from("src/hub.rs"), None)
        );
        assert_eq!(
            hub_spec_of(Path::new("src/not-here")).map(|h| h.repo),
            Some("src/not-here".to_string())
        );
        // Neither a local path nor id-shaped: handed back untouched for the folder loader
        // to report as missing.
        let missing = PathBuf::from("/no/such/model-folder");
        assert_eq!(resolve(&missing).unwrap(), (missing.clone(), None));
    }

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn cached_snapshots_resolve_by_branch_and_commit() {
        let d = temp("cache");
        let settings = HubSettings {
            cache: d.clone(),
            offline: true,
        };
        let repo = d.join("models--org--name");
        let c1 = "1".repeat(40);
        let c2 = "2".repeat(40);
        for c in [&c1, &c2] {
            let s = repo.join("snapshots").join(c);
            write(&s.join("config.json"), "{}");
            write(&s.join("tokenizer.json"), "{}");
        }
        write(&repo.join("snapshots").join(&c1).join(SINGLE), "w");
        // The second commit is sharded.
        write(
            &repo.join("snapshots").join(&c2).join(INDEX),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        );
        write(
            &repo
                .join("snapshots")
                .join(&c2)
                .join("model-00001-of-00002.safetensors"),
            "w",
        );
        write(&repo.join("refs/main"), &c1);
        write(&repo.join("refs/dev"), &format!("{c2}\n"));
        let spec = |s: &str| parse_hub_spec(s).unwrap();

        let (dir, src) = resolve_cached(&settings, &spec("org/name")).unwrap();
        assert_eq!(dir, repo.join("snapshots").join(&c1));
        assert_eq!(
            src,
            HubSource {
                repo: "org/name".into(),
                revision: "main".into(),
                commit: c1.clone()
            }
        );
        let (dir, _) = resolve_cached(&settings, &spec(&format!("org/name@{c1}"))).unwrap();
        assert_eq!(dir, repo.join("snapshots").join(&c1));

        // The branch `dev` points at the sharded commit, which lacks its second shard.
        let e = format!(
            "{:#}",
            resolve_cached(&settings, &spec("org/name@dev")).unwrap_err()
        );
        assert!(
            e.contains("model-00002-of-00002.safetensors")
                && e.contains("org/name")
                && e.contains("dev")
                && e.contains(&c2)
                && e.contains(&repo.join("snapshots").join(&c2).display().to_string())
                && e.contains("HF_HUB_OFFLINE"),
            "{e}"
        );
        write(
            &repo
                .join("snapshots")
                .join(&c2)
                .join("model-00002-of-00002.safetensors"),
            "w",
        );
        let (dir, src) = resolve_cached(&settings, &spec("org/name@dev")).unwrap();
        assert_eq!(
            (dir, src.commit),
            (repo.join("snapshots").join(&c2), c2.clone())
        );

        let e = format!(
            "{:#}",
            resolve_cached(&settings, &spec("org/name@v9")).unwrap_err()
        );
        assert!(
            e.contains("\"v9\"") && e.contains("cached revisions: dev, main"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            resolve_cached(&settings, &spec("org/other")).unwrap_err()
        );
        assert!(
            e.contains("org/other")
                && e.contains(&d.join("models--org--other").display().to_string()),
            "{e}"
        );
        // A shard name that escapes the snapshot is refused, not followed.
        write(
            &repo.join("snapshots").join(&c2).join(INDEX),
            r#"{"weight_map": {"a": "../../x.safetensors"}}"#,
        );
        std::fs::remove_file(repo.join("snapshots").join(&c2).join(SINGLE)).ok();
        let e = format!(
            "{:#}",
            resolve_cached(&settings, &spec("org/name@dev")).unwrap_err()
        );
        assert!(e.contains("not a file inside the folder"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
