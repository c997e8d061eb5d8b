//! Shared setup: a temporary directory with the test recipes, a store inside it, and helpers
//! to run the real binary and read its JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    /// A fresh directory holding copies of `tests/recipes/*.toml`.
    pub fn new() -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/recipes");
        for entry in std::fs::read_dir(recipes).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        Sandbox { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn store(&self) -> PathBuf {
        self.path(".tinygpt")
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) {
        std::fs::write(self.path(name), contents).unwrap();
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tinygpt"));
        cmd.current_dir(self.dir.path()).env_remove("TINYGPT_CACHE").env_remove("TINYGPT_REMOTE");
        cmd
    }

    pub fn tinygpt(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("the binary runs")
    }

    /// `tinygpt run RECIPE ARGS --json`, which must succeed; returns the JSON.
    pub fn run_json(&self, recipe: &str, args: &[&str]) -> Value {
        self.json("run", recipe, args)
    }

    /// `tinygpt plan RECIPE ARGS --json`, which must succeed; returns the JSON.
    pub fn plan_json(&self, recipe: &str, args: &[&str]) -> Value {
        self.json("plan", recipe, args)
    }

    fn json(&self, command: &str, recipe: &str, args: &[&str]) -> Value {
        let mut all = vec![command, recipe, "--json"];
        all.extend_from_slice(args);
        let out = self.tinygpt(&all);
        assert_success(&out);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{command} --json prints JSON: {e}"))
    }

    /// The manifest of the artifact with this key.
    pub fn manifest(&self, key: &str) -> Value {
        let path = self.store().join("objects").join(key).join("manifest.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }
}

pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "tinygpt failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stages that ran (not cached), in order.
pub fn ran(json: &Value) -> Vec<String> {
    stages_with(json, "run")
}

pub fn stages_with(json: &Value, action: &str) -> Vec<String> {
    json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == action)
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

pub fn stage<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["stages"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no stage {name}"))
}

pub fn key(json: &Value, name: &str) -> String {
    stage(json, name)["key"].as_str().expect("a key").to_string()
}

/// The directory of stage `name`'s artifact in a run's store.
pub fn artifact(sb: &Sandbox, run: &Value, name: &str) -> PathBuf {
    sb.store().join("objects").join(key(run, name))
}

/// Move a file's modification time forward without touching its bytes.
pub fn touch(path: &Path) {
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(path).unwrap().set_modified(later).unwrap();
}

/// `../shared/data` beside the project, with the real data sets, or `None` (saying the check is
/// skipped) where it is absent: the suite makes its own fixtures, and checks on real data run
/// only beside it.
pub fn shared_data() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if dir.join("tinyshakespeare/input.txt").exists() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: ../shared/data is not present (checks on real data run only beside it)");
        None
    }
}

/// What `found` finds, asked every 2 ms for up to two minutes (then a failure naming `what`).
pub fn poll_until<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> T {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    loop {
        if let Some(x) = found() {
            return x;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no {what} appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Start `tinygpt run RECIPE ARGS`, wait for a training checkpoint to appear in the store's
/// `work/` (the stages before it must be cached already, or have published theirs), send
/// `sig` (`-INT` or `-KILL`) and wait for the process. Returns the key of the interrupted stage
/// and the exit status.
pub fn interrupt_run(sb: &Sandbox, recipe: &str, args: &[&str], sig: &str) -> (String, std::process::ExitStatus) {
    use std::process::Stdio;
    use std::time::Duration;
    let mut child =
        sb.command().args(["run", recipe]).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // A stage's key depends on upstream outputs, so find it by its checkpoint.
    let checkpoint_dir = || -> Option<PathBuf> {
        let dirs = std::fs::read_dir(sb.store().join("work")).ok()?;
        dirs.filter_map(|d| d.ok()).map(|d| d.path()).find(|d| d.join("checkpoint.safetensors").exists())
    };
    let work = poll_until("checkpoint", checkpoint_dir);
    let key = work.file_name().unwrap().to_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(50));
    let status = std::process::Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert!(
        !sb.store().join("objects").join(&key).exists(),
        "the run finished before the signal; make the test run longer"
    );
    (key, status)
}

/// Issue 16, item 3, for any training stage: with `schedule = "wsd"`, raising `max_steps`
/// from `short` to `long` continues from the shorter run (reporting the steps it reused: the
/// short run's stable phase, `short - short / 5`) and gives the bytes of a run from scratch.
pub fn check_prefix_reuse(recipe: &str, stage_name: &str, short: u64, long: u64) {
    let wsd = format!("{stage_name}.schedule=wsd");
    let steps = |n: u64| format!("{stage_name}.max_steps={n}");
    let (short_steps, long_steps) = (steps(short), steps(long));
    let sb = Sandbox::new();
    sb.run_json(recipe, &["--set", &wsd, "--set", &short_steps]);
    let longer = sb.run_json(recipe, &["--set", &wsd, "--set", &long_steps]);
    let metrics = &stage(&longer, stage_name)["metrics"];
    assert_eq!(metrics["reused_steps"], short - short / 5, "{metrics}");
    assert_eq!(metrics["steps"], long);

    let scratch = Sandbox::new();
    let fresh = scratch.run_json(recipe, &["--set", &wsd, "--set", &long_steps]);
    assert!(stage(&fresh, stage_name)["metrics"]["reused_steps"].is_null());
    let digest = |sb: &Sandbox, run: &Value| sb.manifest(&key(run, stage_name))["content_digest"].clone();
    assert_eq!(digest(&sb, &longer), digest(&scratch, &fresh), "{stage_name}: continued and fresh runs differ");
}
