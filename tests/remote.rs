//! The remote cache (issue 17): a second store with the same remote builds nothing and gets
//! the same bytes, over a shared directory and over a real S3-compatible server (`s3s-fs`,
//! installed by .ci/run); damaged remote objects are refused and rebuilt; an unreachable remote
//! is a warning, bad credentials an error; an upload killed part-way is never accepted.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use engine::cache::{ContentHash, Remote, Store};
use serde_json::Value;

use crate::util::{assert_success, key, ran, stage, stages_with, Sandbox};

const STAGES: [&str; 3] = ["corpus", "tokenize", "pack"];
/// A cancel flag never set.
static GO: AtomicBool = AtomicBool::new(false);

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn with_remote(sb: &Sandbox, args: &[&str], url: &str, env: &[(String, String)]) -> Output {
    let mut cmd = sb.command();
    cmd.args(args).args(["--remote", url]).envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().expect("the binary runs")
}

fn run_with_remote(sb: &Sandbox, url: &str, env: &[(String, String)]) -> Value {
    let out = with_remote(sb, &["run", "tiny.toml", "--json"], url, env);
    assert_success(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Every output file of each stage's artifact is the same in both stores (the manifests differ
/// only in what made them: timings and metadata).
fn assert_same_artifacts(a: (&Sandbox, &Value), b: (&Sandbox, &Value)) {
    for name in STAGES {
        assert_eq!(key(a.1, name), key(b.1, name), "stage {name}");
        let dir_a = a.0.store().join("objects").join(key(a.1, name));
        let dir_b = b.0.store().join("objects").join(key(b.1, name));
        let files = |dir: &Path| {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "manifest.json")
                .collect();
            names.sort();
            names
        };
        assert_eq!(files(&dir_a), files(&dir_b), "stage {name}");
        for file in files(&dir_a) {
            assert!(std::fs::read(dir_a.join(&file)).unwrap() == std::fs::read(dir_b.join(&file)).unwrap(), "{file:?}");
        }
    }
}

/// A first store builds and uploads; a second, empty one with the same remote plans every
/// stage as `remote`, runs none and ends with the same bytes.
fn check_second_store_builds_nothing(url: &str, env: &[(String, String)]) {
    let first = Sandbox::new();
    let built = run_with_remote(&first, url, env);
    assert_eq!(ran(&built), STAGES);

    let second = Sandbox::new();
    let out = with_remote(&second, &["plan", "tiny.toml", "--json"], url, env);
    assert_success(&out);
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stages_with(&plan, "remote"), STAGES, "{plan}");
    let text = String::from_utf8(with_remote(&second, &["plan", "tiny.toml"], url, env).stdout).unwrap();
    assert!(text.lines().any(|l| l.starts_with("pack") && l.contains("remote")), "{text}");

    let pulled = run_with_remote(&second, url, env);
    assert!(ran(&pulled).is_empty(), "{pulled}");
    assert_eq!(stages_with(&pulled, "remote"), STAGES);
    assert_same_artifacts((&first, &built), (&second, &pulled));
    assert_eq!(stage(&pulled, "pack")["metrics"], stage(&built, "pack")["metrics"]);

    let again = run_with_remote(&second, url, env);
    assert_eq!(stages_with(&again, "cached"), STAGES, "now local");
}

#[test]
fn a_second_store_with_a_shared_directory_remote_builds_nothing() {
    let remote = tempfile::tempdir().unwrap();
    check_second_store_builds_nothing(&file_url(remote.path()), &[]);
}

#[test]
fn cache_push_and_pull_move_a_recipes_artifacts() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let first = Sandbox::new();
    let built = first.run_json("tiny.toml", &[]);

    let out = with_remote(&first, &["cache", "push", "tiny.toml"], &url, &[]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().filter(|l| l.contains("sent")).count(), 3, "{text}");
    let text = String::from_utf8(with_remote(&first, &["cache", "push"], &url, &[]).stdout).unwrap();
    assert_eq!(text.lines().filter(|l| l.contains("in the remote already")).count(), 3, "{text}");

    let second = Sandbox::new();
    let out = with_remote(&second, &["cache", "pull", "tiny.toml"], &url, &[]);
    assert_success(&out);
    assert_eq!(String::from_utf8(out.stdout).unwrap().matches("received").count(), 3);
    let run = second.run_json("tiny.toml", &[]);
    assert_eq!(stages_with(&run, "cached"), STAGES, "pulled, so cached without a remote");
    assert_same_artifacts((&first, &built), (&second, &run));

    let third = Sandbox::new();
    assert_success(&with_remote(&third, &["cache", "pull"], &url, &[]));
    assert_eq!(stages_with(&third.run_json("tiny.toml", &[]), "cached"), STAGES, "pull without a recipe takes all");

    let out = third.tinygpt(&["cache", "push"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--remote"), "{}", stderr(&out));

    // Nothing built, nothing in an empty remote: every stage says so.
    let empty = tempfile::tempdir().unwrap();
    let fresh = Sandbox::new();
    let out = with_remote(&fresh, &["cache", "push", "tiny.toml"], &file_url(empty.path()), &[]);
    assert_success(&out);
    assert_eq!(String::from_utf8(out.stdout).unwrap().matches("not built here").count(), 3);
    let out = with_remote(&fresh, &["cache", "pull", "tiny.toml"], &file_url(empty.path()), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(String::from_utf8(out.stdout).unwrap().matches("not in the remote").count(), 3);
}

#[test]
fn a_damaged_remote_object_is_reported_and_rebuilt() {
    let remote = tempfile::tempdir().unwrap();
    let url = file_url(remote.path());
    let first = Sandbox::new();
    let built = run_with_remote(&first, &url, &[]);
    let manifest = first.manifest(&key(&built, "pack"));
    let biggest = manifest["files"].as_array().unwrap().iter().max_by_key(|f| f["size"].as_u64()).unwrap();
    let blob = remote.path().join("blobs").join(biggest["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&blob, bytes).unwrap();

    let second = Sandbox::new();
    let out = with_remote(&second, &["run", "tiny.toml", "--json"], &url, &[]);
    assert_success(&out);
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stderr(&out).contains("damaged") && stderr(&out).contains("pack"), "{}", stderr(&out));
    assert_eq!(ran(&run), ["pack"], "only the damaged artifact is rebuilt");
    assert_same_artifacts((&first, &built), (&second, &run));

    // The rebuild uploaded the good bytes again.
    let third = Sandbox::new();
    assert_eq!(stages_with(&run_with_remote(&third, &url, &[]), "remote"), STAGES);
}

#[test]
fn a_bad_remote_url_is_an_error_before_anything_runs() {
    let sb = Sandbox::new();
    let out = with_remote(&sb, &["run", "tiny.toml"], "ftp://host/x", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("ftp://host/x") && stderr(&out).contains("s3://"), "{}", stderr(&out));
    assert!(
        !sb.store().join("objects").exists() || std::fs::read_dir(sb.store().join("objects")).unwrap().count() == 0
    );
}

/// An `s3s-fs` server on a free loopback port, with its own empty data directory and a bucket;
/// stopped when dropped.
struct S3Server {
    child: Child,
    port: u16,
    _root: tempfile::TempDir,
}

const ACCESS_KEY: &str = "tinygpt-test";
const SECRET_KEY: &str = "tinygpt-test-secret";

fn s3s_fs() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("s3s-fs")).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    on_path.into_iter().chain(cargo_home.map(|c| c.join("bin/s3s-fs"))).find(|p| p.is_file())
}

impl S3Server {
    fn start() -> Option<S3Server> {
        let Some(binary) = s3s_fs() else {
            eprintln!("SKIPPED: no `s3s-fs` (cargo install s3s-fs@0.14.1 --features binary; .ci/run does)");
            return None;
        };
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("team")).unwrap();
        let port = free_port();
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = S3Server { child, port, _root: root };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "s3s-fs did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn env(&self) -> Vec<(String, String)> {
        env_for(self.port, SECRET_KEY)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

fn env_for(port: u16, secret: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

const S3_URL: &str = "s3://team/tinygpt";

#[test]
fn a_second_store_with_an_s3_remote_builds_nothing() {
    let Some(server) = S3Server::start() else { return };
    check_second_store_builds_nothing(S3_URL, &server.env());

    // s3s-fs keeps each object as a plain file: damage one behind the server's back.
    let blobs = server._root.path().join("team/tinygpt/blobs");
    let biggest =
        std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().path()).max_by_key(|p| p.metadata().unwrap().len());
    let biggest = biggest.expect("blobs were uploaded");
    let mut bytes = std::fs::read(&biggest).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&biggest, bytes).unwrap();
    let sb = Sandbox::new();
    let out = with_remote(&sb, &["run", "tiny.toml", "--json"], S3_URL, &server.env());
    assert_success(&out);
    assert!(stderr(&out).contains("damaged"), "{}", stderr(&out));
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ran(&run).len(), 1, "the stage whose file was damaged is rebuilt: {run}");
    assert_eq!(stages_with(&run, "remote").len(), 2, "{run}");
}

#[test]
fn s3_faults_are_warnings_and_bad_credentials_an_error() {
    let Some(server) = S3Server::start() else { return };
    let sb = Sandbox::new();

    let denied = with_remote(&sb, &["run", "tiny.toml"], S3_URL, &env_for(server.port, "wrong"));
    assert_eq!(denied.status.code(), Some(1));
    let text = stderr(&denied);
    assert!(text.contains(S3_URL) && text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
    assert_eq!(text.matches("refused the credentials").count(), 1, "one error: {text}");
    assert!(!text.contains("running"), "nothing ran: {text}");

    // Nothing listens on a port just freed: the remote is unreachable.
    let unreachable = env_for(free_port(), SECRET_KEY);
    let required = with_remote(&sb, &["run", "tiny.toml", "--remote-required"], S3_URL, &unreachable);
    assert_eq!(required.status.code(), Some(1), "{}", stderr(&required));
    assert!(stderr(&required).contains("unavailable"), "{}", stderr(&required));

    let out = with_remote(&sb, &["run", "tiny.toml", "--json"], S3_URL, &unreachable);
    assert_success(&out);
    let run: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ran(&run), STAGES, "built locally");
    assert_eq!(stderr(&out).matches("warning:").count(), 1, "warned once: {}", stderr(&out));
    assert!(stderr(&out).contains("unavailable"), "{}", stderr(&out));
}

/// A store with one artifact whose single file is `bytes` long (sent in parts).
fn store_with_big_artifact(root: &Path, bytes: usize) -> (Store, ContentHash) {
    let store = Store::open(root).unwrap();
    let key = ContentHash::of_bytes(&bytes.to_le_bytes());
    let staging = store.begin(&key).unwrap();
    let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(staging.dir().join("weights.bin"), data).unwrap();
    store.publish(staging, &[], serde_json::json!({"stage": "big"}), serde_json::json!({}), 0.0).unwrap();
    (store, key)
}

#[test]
fn large_files_go_to_s3_in_parts_and_come_back_whole() {
    let Some(server) = S3Server::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (store, key) = store_with_big_artifact(&dir.path().join("a"), 19 << 20);
    let remote = Remote::open_with_env(S3_URL, server.env()).unwrap();
    let artifact = store.get(&key).unwrap().unwrap();
    let pushed = remote.push(&artifact, &|_| {}, &GO).unwrap();
    assert_eq!(pushed.bytes_sent, 19 << 20);

    let second = Store::open(&dir.path().join("b")).unwrap();
    let manifest = remote.manifest(&key).unwrap().expect("uploaded");
    let staging = second.begin(&key).unwrap();
    remote.download(&manifest, &staging, &|_| {}, &GO).unwrap();
    let pulled = second.adopt(staging, manifest).unwrap();
    assert!(std::fs::read(pulled.path("weights.bin")).unwrap() == std::fs::read(artifact.path("weights.bin")).unwrap());
}

/// Start `cache push` of a large artifact to the S3 server, send `signal` once its upload has
/// begun, and check a reader either finds no artifact or a whole one. Returns the exit code.
fn push_stopped_by(signal: &str) -> Option<i32> {
    let server = S3Server::start()?;
    let sb = Sandbox::new();
    let (_, key) = store_with_big_artifact(&sb.store(), 160 << 20);
    let mut push = sb
        .command()
        .args(["cache", "push", "--remote", S3_URL])
        .envs(server.env())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The progress line comes just before the first part goes out.
    let mut stderr = std::io::BufReader::new(push.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("uploading"), "{line}");
    std::thread::sleep(Duration::from_millis(30));
    Command::new("kill").args([signal, &push.id().to_string()]).status().unwrap();
    let status = push.wait().unwrap();

    let remote = Remote::open_with_env(S3_URL, server.env()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let second = Store::open(dir.path()).unwrap();
    match remote.manifest(&key).unwrap() {
        None => {
            assert!(remote.keys().unwrap().is_empty(), "no manifest names the partial upload");
            eprintln!("{signal} stopped the upload part-way; a reader sees no artifact");
        }
        Some(manifest) => {
            // The signal came after the last byte: then the artifact is whole.
            assert!(status.success(), "{status:?}");
            let staging = second.begin(&key).unwrap();
            remote.download(&manifest, &staging, &|_| {}, &GO).unwrap();
            second.adopt(staging, manifest).unwrap();
            eprintln!("the upload finished before {signal}; the artifact is whole");
        }
    }
    status.code()
}

#[test]
fn an_upload_killed_part_way_is_never_accepted() {
    push_stopped_by("-KILL");
}

#[test]
fn ctrl_c_stops_an_upload_between_parts() {
    if let Some(code) = push_stopped_by("-INT") {
        assert!(code == 130 || code == 0, "exit code {code}");
    }
}
