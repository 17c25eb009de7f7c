//! Hub ids `org/name[@revision]` wherever a model folder is taken, resolved offline through a
//! Hugging Face cache laid out in a temp folder (blobs, snapshot symlinks, refs), with no
//! network: eval, generate, quantize and a pipeline run, plus the errors of a cache miss.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REPO: &str = "org/stories";
/// `refs/main` and `refs/dev` point at these; both snapshots hold stories260k.
const MAIN: &str = "1111111111111111111111111111111111111111";
const DEV: &str = "2222222222222222222222222222222222222222";
/// `refs/notok`: a snapshot without tokenizer.json.
const NOTOK: &str = "3333333333333333333333333333333333333333";
const FILES: [&str; 4] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
];

fn teacher() -> PathBuf {
    shared().join("models/stories260k")
}

fn text() -> String {
    shared()
        .join("data/tinystories-valid-64k.txt")
        .display()
        .to_string()
}

/// The first lines (about 4 KB) of the held-out text, written into `d`: enough to compare
/// perplexities, quick to score.
fn short_text(d: &Path) -> String {
    let full = std::fs::read_to_string(text()).unwrap();
    let cut = full[..4096].rfind('\n').unwrap();
    let p = d.join("short.txt");
    std::fs::write(&p, &full[..=cut]).unwrap();
    p.display().to_string()
}

/// Lays out `root/hub/models--org--stories` as huggingface_hub does: each file once under
/// blobs/, snapshot entries as relative symlinks to them, and refs naming the commits.
/// Returns the cache folder (`root/hub`).
fn make_cache(root: &Path) -> PathBuf {
    let cache = root.join("hub");
    let repo = cache.join("models--org--stories");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, f) in FILES.iter().enumerate() {
        std::fs::copy(
            teacher().join(f),
            repo.join("blobs").join(format!("{:064x}", i + 1)),
        )
        .unwrap();
    }
    for (commit, files) in [(MAIN, &FILES[..]), (DEV, &FILES[..]), (NOTOK, &FILES[..3])] {
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in files {
            let i = FILES.iter().position(|x| x == f).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{:064x}", i + 1), snap.join(f))
                .unwrap();
        }
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (name, commit) in [("main", MAIN), ("dev", DEV), ("notok", NOTOK)] {
        std::fs::write(repo.join("refs").join(name), commit).unwrap();
    }
    cache
}

/// The binary with a clean Hugging Face environment: the cache at `cache`, offline, and HOME
/// inside the temp folder so nothing falls back to the real ~/.cache.
fn hub_cmd(cache: &Path) -> Command {
    let mut c = bin();
    c.env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("HF_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env("HOME", cache.parent().unwrap());
    c
}

fn output(mut c: Command, args: &[&str]) -> Output {
    c.args(args).output().expect("cannot start pipeline")
}

fn ok(c: Command, args: &[&str]) -> String {
    let o = output(c, args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    stdout(&o)
}

fn eval_json(c: Command, model: &str, text: &str) -> serde_json::Value {
    let out = ok(c, &["eval", "--model", model, "--text", text, "--json"]);
    serde_json::from_str(out.trim()).expect("eval --json prints one JSON object")
}

#[test]
fn eval_by_hub_id_matches_the_local_folder() {
    let d = temp_dir("hub_eval");
    let cache = make_cache(&d);
    let t = short_text(&d);
    let local = eval_json(bin(), teacher().to_str().unwrap(), &t);
    assert!(local.get("hub_repo").is_none() && local.get("hub_commit").is_none());
    let want = local["ppl"].as_f64().unwrap();

    for (spec, commit) in [
        (REPO.to_string(), MAIN),
        (format!("{REPO}@dev"), DEV),
        (format!("{REPO}@{DEV}"), DEV),
        (format!("{REPO}@main"), MAIN),
    ] {
        let got = eval_json(hub_cmd(&cache), &spec, &t);
        assert_eq!(got["ppl"].as_f64().unwrap(), want, "{spec}: ppl");
        assert_eq!(got["tokens"], local["tokens"], "{spec}: tokens");
        assert_eq!(got["model"], spec.as_str());
        assert_eq!(got["hub_repo"], REPO, "{spec}");
        assert_eq!(got["hub_commit"], commit, "{spec}");
    }

    // Without HF_HUB_CACHE the cache is $HF_HOME/hub; `true` counts as offline too.
    let mut c = hub_cmd(&cache);
    c.env_remove("HF_HUB_CACHE")
        .env("HF_HOME", &d)
        .env("HF_HUB_OFFLINE", "true");
    assert_eq!(eval_json(c, REPO, &t)["hub_commit"], MAIN);
    // Without either, ~/.cache/huggingface/hub.
    let home = d.join("home");
    let hub_home = home.join(".cache/huggingface");
    std::fs::create_dir_all(&hub_home).unwrap();
    std::os::unix::fs::symlink(&cache, hub_home.join("hub")).unwrap();
    let mut c = hub_cmd(&cache);
    c.env_remove("HF_HUB_CACHE").env("HOME", &home);
    assert_eq!(eval_json(c, &format!("{REPO}@dev"), &t)["hub_commit"], DEV);
}

#[test]
fn a_local_folder_shaped_like_a_hub_id_wins() {
    let d = temp_dir("hub_local_wins");
    // An empty cache: were `org/stories` taken as a hub id, it would fail offline.
    let cache = d.join("empty-cache");
    std::fs::create_dir_all(&cache).unwrap();
    copy_model(&teacher(), &d.join("org/stories"));
    let mut c = hub_cmd(&cache);
    c.current_dir(&d);
    let got = eval_json(c, REPO, &short_text(&d));
    assert!(got.get("hub_repo").is_none(), "{got}");
    assert!(got["ppl"].as_f64().unwrap() > 1.0);
}

#[test]
fn offline_cache_misses_name_the_file_the_repo_and_the_folder() {
    let d = temp_dir("hub_errors");
    let cache = make_cache(&d);
    let t = short_text(&d);
    let fails = |model: &str| {
        let o = output(
            hub_cmd(&cache),
            &["eval", "--model", model, "--text", &t, "--json"],
        );
        assert!(!o.status.success(), "{model} should fail");
        stderr(&o)
    };

    let snap = cache.join("models--org--stories/snapshots").join(NOTOK);
    let e = fails(&format!("{REPO}@notok"));
    for want in [
        "tokenizer.json",
        REPO,
        "notok",
        NOTOK,
        &snap.display().to_string(),
        "HF_HUB_OFFLINE",
    ] {
        assert!(e.contains(want), "missing {want:?} in: {e}");
    }

    let e = fails("org/absent");
    for want in [
        "org/absent",
        "not in the Hugging Face cache",
        &cache.join("models--org--absent").display().to_string(),
    ] {
        assert!(e.contains(want), "missing {want:?} in: {e}");
    }

    let e = fails(&format!("{REPO}@v9"));
    assert!(
        e.contains("\"v9\"") && e.contains("cached revisions: dev, main, notok"),
        "{e}"
    );

    // A commit with no snapshot folder.
    let e = fails(&format!("{REPO}@{}", "4".repeat(40)));
    assert!(
        e.contains("config.json") && e.contains(&"4".repeat(40)),
        "{e}"
    );

    // Not a hub id and not a folder: the usual message.
    let e = fails("./org/stories");
    assert!(e.contains("does not exist"), "{e}");
}

fn generate(c: Command, teacher: &str, out: &Path) -> String {
    ok(
        c,
        &[
            "generate",
            "--teacher",
            teacher,
            "--out",
            out.to_str().unwrap(),
            "--samples",
            "8",
            "--max-tokens",
            "24",
            "--shard-size",
            "4",
            "--seed",
            "5",
        ],
    )
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn generate_with_a_hub_teacher_records_repo_and_commit() {
    let d = temp_dir("hub_generate");
    let cache = make_cache(&d);
    let local = d.join("local");
    generate(bin(), teacher().to_str().unwrap(), &local);
    let hub = d.join("hub-corpus");
    let spec = format!("{REPO}@dev");
    generate(hub_cmd(&cache), &spec, &hub);

    let (ml, mh) = (manifest(&local), manifest(&hub));
    let (tl, th) = (&ml["teacher"], &mh["teacher"]);
    assert!(
        tl.get("hub_repo").is_none() && tl.get("hub_commit").is_none(),
        "{tl}"
    );
    assert_eq!(th["path"], spec.as_str());
    assert_eq!(th["hub_repo"], REPO);
    assert_eq!(th["hub_commit"], DEV);
    assert_eq!(th["weights_sha256"], tl["weights_sha256"]);
    assert_eq!(th["tokenizer_sha256"], tl["tokenizer_sha256"]);
    // The same model: the same corpus, shard for shard.
    for i in 0..2 {
        let f = format!("shard-{i:05}.parquet");
        assert!(
            std::fs::read(local.join(&f)).unwrap() == std::fs::read(hub.join(&f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn quantize_a_hub_model() {
    let d = temp_dir("hub_quantize");
    let cache = make_cache(&d);
    let out = d.join("nf4");
    let o = ok(
        hub_cmd(&cache),
        &[
            "quantize",
            "--model",
            REPO,
            "--out",
            out.to_str().unwrap(),
            "--format",
            "nf4",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(o.trim()).unwrap();
    assert_eq!(v["hub_repo"], REPO);
    assert_eq!(v["hub_commit"], MAIN);
    // The snapshot's files are symlinks; the companions must still be copied, as files.
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        let m = std::fs::symlink_metadata(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(m.file_type().is_file(), "{f} is not a plain file");
    }
    let ppl = eval_json(bin(), out.to_str().unwrap(), &short_text(&d))["ppl"]
        .as_f64()
        .unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
}

#[test]
fn pipeline_run_with_a_hub_teacher_and_a_moved_branch() {
    let d = temp_dir("hub_run");
    let cache = make_cache(&d);
    let run_dir = d.join("run");
    let toml = d.join("p.toml");
    std::fs::write(
        &toml,
        format!(
            r#"[run]
name = "hub"
directory = "{run}"
[teacher]
model = "{REPO}"
[generate]
samples = 16
max_tokens = 32
shard_size = 8
batch = 8
seed = 3
[student]
w_bits = 4
[train]
steps = 4
batch = 4
seq_len = 32
lr = 1e-3
log_every = 2
checkpoint_every = 2
[eval]
text = "{text}"
max_tokens = 600
"#,
            run = run_dir.display(),
            text = text(),
        ),
    )
    .unwrap();
    let t = toml.to_str().unwrap();
    ok(hub_cmd(&cache), &["run", t]);

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("eval/report.json")).unwrap()).unwrap();
    assert_eq!(report["teacher"]["path"], REPO);
    assert_eq!(report["teacher"]["hub_repo"], REPO);
    assert_eq!(report["teacher"]["hub_commit"], MAIN);
    let md = std::fs::read_to_string(run_dir.join("eval/report.md")).unwrap();
    assert!(md.contains(MAIN), "{md}");
    assert_eq!(
        manifest(&run_dir.join("corpus"))["teacher"]["hub_commit"],
        MAIN
    );
    let stage: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("corpus/stage.json")).unwrap()).unwrap();
    assert_eq!(stage["config"]["teacher"]["hub_repo"], REPO);
    assert_eq!(stage["config"]["teacher"]["hub_commit"], MAIN);
    // The exported student took the teacher's config and tokenizer from the snapshot.
    for f in ["config.json", "tokenizer.json"] {
        assert!(run_dir.join("train/student").join(f).is_file(), "{f}");
    }
    let status = ok(hub_cmd(&cache), &["status", t]);
    assert!(status.contains("generate  done"), "{status}");

    // `main` moves to another commit with the same files: the generate stage has changed.
    std::fs::write(cache.join("models--org--stories/refs/main"), DEV).unwrap();
    let status = ok(hub_cmd(&cache), &["status", t]);
    assert!(
        status.contains("changed: teacher.hub_commit") && status.contains(DEV),
        "{status}"
    );

    // A teacher that is neither a folder nor in the cache is refused before anything runs,
    // at its line of the pipeline file.
    let o = output(
        hub_cmd(&cache),
        &["status", t, "--set", "teacher.model=org/absent"],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("[teacher] model") && e.contains("org/absent") && e.contains("line 5"),
        "{e}"
    );
}

/// A stand-in for the hub's HTTP API on 127.0.0.1, enough for hf-hub: the revision info
/// (`/api/models/REPO/revision/REV`) and file downloads (`/REPO/resolve/COMMIT/FILE`, with
/// the range requests, ETag, X-Repo-Commit and Content-Range the client reads). Every
/// request is logged as `PATH RANGE`.
struct FakeHub {
    url: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The commit the fake hub serves for `main`.
const HUB_COMMIT: &str = "abcdef0123456789abcdef0123456789abcdef01";

impl FakeHub {
    fn start() -> FakeHub {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
        let l = log.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let l = l.clone();
                std::thread::spawn(move || serve(s, &l));
            }
        });
        FakeHub { url, log }
    }

    fn requests(&self, prefix: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|r| r.starts_with(prefix)).count()
    }
}

fn serve(mut s: std::net::TcpStream, log: &std::sync::Mutex<Vec<String>>) {
    use std::io::{BufRead, Write};
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut range = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = v.trim().to_string();
            }
        }
    }
    log.lock().unwrap().push(format!("{path} {range}"));
    let api = format!("/api/models/{REPO}/revision/");
    let resolve = format!("/{REPO}/resolve/{HUB_COMMIT}/");
    let (status, headers, body) = if path == format!("{api}main")
        || path == format!("{api}{HUB_COMMIT}")
    {
        let mut siblings: Vec<serde_json::Value> = FILES
            .iter()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        siblings.push(serde_json::json!({ "rfilename": "README.md" }));
        let body = serde_json::json!({ "sha": HUB_COMMIT, "siblings": siblings }).to_string();
        (
            "200 OK",
            "Content-Type: application/json\r\n".to_string(),
            body.into_bytes(),
        )
    } else if let Some(i) = path
        .strip_prefix(&resolve)
        .and_then(|f| FILES.iter().position(|x| *x == f))
    {
        let bytes = std::fs::read(teacher().join(FILES[i])).unwrap();
        let n = bytes.len();
        let (a, b) = match range.strip_prefix("bytes=").and_then(|r| r.split_once('-')) {
            Some((a, b)) => (
                a.parse::<usize>().unwrap_or(0),
                b.parse::<usize>().map_or(n - 1, |b| b.min(n - 1)),
            ),
            None => (0, n - 1),
        };
        let headers = format!(
            "ETag: \"blob{i}\"\r\nX-Repo-Commit: {HUB_COMMIT}\r\nContent-Range: bytes {a}-{b}/{n}\r\n"
        );
        ("206 Partial Content", headers, bytes[a..=b].to_vec())
    } else {
        (
            "404 Not Found",
            String::new(),
            b"{\"error\":\"not found\"}".to_vec(),
        )
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(&body);
}

/// `hub_cmd` online against `endpoint`, with no proxy in the way.
fn online_cmd(cache: &Path, endpoint: &str) -> Command {
    let mut c = hub_cmd(cache);
    c.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", endpoint);
    for k in [
        "ALL_PROXY",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "all_proxy",
        "http_proxy",
        "https_proxy",
    ] {
        c.env_remove(k);
    }
    c
}

#[test]
fn online_downloads_into_the_cache_then_reuses_it() {
    let d = temp_dir("hub_online");
    let cache = d.join("hub");
    let hub = FakeHub::start();
    let t = short_text(&d);
    let want = eval_json(bin(), teacher().to_str().unwrap(), &t)["ppl"].clone();

    let got = eval_json(online_cmd(&cache, &hub.url), REPO, &t);
    assert_eq!(got["ppl"], want);
    assert_eq!(got["hub_commit"], HUB_COMMIT);
    let resolve = format!("/{REPO}/resolve/{HUB_COMMIT}/");
    assert_eq!(
        hub.requests(&format!("/api/models/{REPO}/revision/main")),
        1
    );
    // Each of the four files: a one-byte metadata request, then the body. README.md is not
    // needed and not fetched.
    assert_eq!(hub.requests(&resolve), 8, "{:?}", hub.log.lock().unwrap());
    assert_eq!(hub.requests(&format!("{resolve}README.md")), 0);

    // The standard layout: refs/main names the commit (no ref named after the commit
    // itself), the snapshot links into blobs/.
    let repo = cache.join("models--org--stories");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main"))
            .unwrap()
            .trim(),
        HUB_COMMIT
    );
    assert!(!repo.join("refs").join(HUB_COMMIT).exists());
    for f in FILES {
        let p = repo.join("snapshots").join(HUB_COMMIT).join(f);
        let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(m.file_type().is_symlink(), "{f} is not a link into blobs/");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            std::fs::read(teacher().join(f)).unwrap()
        );
    }

    // Again online: only the revision is looked up; every file comes from the cache.
    let got = eval_json(
        online_cmd(&cache, &hub.url),
        &format!("{REPO}@{HUB_COMMIT}"),
        &t,
    );
    assert_eq!(got["ppl"], want);
    assert_eq!(hub.requests(&resolve), 8);
    // Offline, what was downloaded serves alone.
    assert_eq!(
        eval_json(hub_cmd(&cache), REPO, &t)["hub_commit"],
        HUB_COMMIT
    );

    // A repo the hub does not know: the HTTP status, not a fallback.
    let o = output(
        online_cmd(&cache, &hub.url),
        &["eval", "--model", "org/unknown", "--text", &t],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("org/unknown") && e.contains("404"), "{e}");

    // The hub unreachable: a complete cached snapshot serves, with a warning; else an error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let o = output(
        online_cmd(&cache, &closed),
        &["eval", "--model", REPO, "--text", &t, "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot be reached"), "{}", stderr(&o));
    let o = output(
        online_cmd(&d.join("empty"), &closed),
        &["eval", "--model", REPO, "--text", &t],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("cannot reach the Hugging Face hub") && e.contains(REPO),
        "{e}"
    );
}
