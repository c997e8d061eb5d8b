//! The Slurm executor: each stage that must be built becomes one `sbatch` job that runs
//! `tinygpt exec-stage` on a node, into this store (on a filesystem the nodes share) or
//! through the remote cache. The engine walks the DAG here and submits a stage once every
//! stage it reads is built, so dependencies never reach the scheduler.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use engine::cache::ContentHash;
use engine::{ResolvedStage, StageError, StageRunner};

/// Lines of a failed job's log shown in the error.
const LOG_TAIL_LINES: usize = 15;

pub struct Slurm {
    /// This binary, which the job runs.
    pub exe: PathBuf,
    pub recipe: PathBuf,
    pub sets: Vec<String>,
    /// The store the job uses: this run's, on a shared filesystem, or one on the node.
    pub store: PathBuf,
    /// Where job scripts and logs go: `slurm/` in this run's store.
    pub job_dir: PathBuf,
    /// The remote the job uses too, if any (credentials reach it through the environment,
    /// which `sbatch` passes on).
    pub remote: Option<String>,
    pub remote_required: bool,
    /// The job's working directory: this one, so relative paths mean the same.
    pub cwd: PathBuf,
}

impl Slurm {
    fn script(&self, stage: &str, key: &ContentHash) -> String {
        let mut args: Vec<String> =
            vec![self.exe.display().to_string(), "--cache".into(), self.store.display().to_string()];
        if let Some(remote) = &self.remote {
            args.extend(["--remote".into(), remote.clone()]);
        }
        if self.remote_required {
            args.push("--remote-required".into());
        }
        args.extend(["exec-stage".into(), self.recipe.display().to_string()]);
        args.extend(["--stage".into(), stage.to_string(), "--key".into(), key.to_hex()]);
        for set in &self.sets {
            args.extend(["--set".into(), set.clone()]);
        }
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        format!("#!/bin/sh\n# tinygpt: stage `{stage}`, key {key}\nexec {}\n", quoted.join(" "))
    }
}

impl StageRunner for Slurm {
    fn run_stage(&self, stage: &ResolvedStage, key: &ContentHash, cancel: &AtomicBool) -> Result<(), StageError> {
        let dir = &self.job_dir;
        std::fs::create_dir_all(dir).map_err(|e| StageError::chain(format!("creating `{}`", dir.display()), &e))?;
        let script = dir.join(format!("{key}.sh"));
        let log = dir.join(format!("{key}.log"));
        std::fs::write(&script, self.script(&stage.name, key))
            .map_err(|e| StageError::chain(format!("writing `{}`", script.display()), &e))?;

        let mut sbatch = Command::new("sbatch");
        sbatch.args(["--parsable", "--job-name", &format!("tinygpt-{}", stage.name)]);
        sbatch.arg("--output").arg(&log).arg("--chdir").arg(&self.cwd);
        let r = &stage.resources;
        if let Some(partition) = &r.partition {
            sbatch.args(["--partition", partition]);
        }
        if let Some(time) = &r.time {
            sbatch.args(["--time", time]);
        }
        if let Some(cpus) = r.cpus {
            sbatch.args(["--cpus-per-task", &cpus.to_string()]);
        }
        if let Some(mem) = &r.mem {
            sbatch.args(["--mem", mem]);
        }
        let out = sbatch
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| StageError::chain("cannot run `sbatch` (is Slurm's client on PATH?)", &e))?;
        let job = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string();
        if !out.status.success() || job.is_empty() {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(StageError::msg(format!("sbatch did not queue the job: {}", why.trim())));
        }

        // Poll the job's state, quickly at first: short stages finish in a second or two.
        let mut pause = Duration::from_millis(200);
        let (state, exit) = loop {
            if cancel.load(Ordering::Relaxed) {
                let _ = Command::new("scancel").arg(&job).status();
                return Err(StageError::Interrupted);
            }
            if let Some(end) = job_end(&job) {
                break end;
            }
            std::thread::sleep(pause);
            pause = (pause * 3 / 2).min(Duration::from_secs(2));
        };
        if state == "COMPLETED" {
            return Ok(());
        }
        Err(StageError::msg(format!(
            "Slurm job {job} ended {state} (exit code {exit}); the end of its log `{}`:\n{}",
            log.display(),
            tail(&log, LOG_TAIL_LINES)
        )))
    }
}

/// The state and exit code of a job that has ended, from `scontrol` (which keeps ended jobs
/// for a few minutes, with no accounting database needed); `None` while it is queued or
/// running, or when the scheduler cannot be asked right now.
fn job_end(job: &str) -> Option<(String, String)> {
    let out = Command::new("scontrol").args(["show", "job", "--oneliner", job]).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace().find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('='))).map(str::to_string)
    };
    let state = field("JobState")?;
    const RUNNING: [&str; 7] = ["PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"];
    if RUNNING.contains(&state.as_str()) {
        return None;
    }
    Some((state, field("ExitCode").unwrap_or_else(|| "?".into())))
}

/// The last `n` lines of a file, indented, or a note that it cannot be read.
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
        }
        Err(e) => format!("    (unreadable: {e})"),
    }
}

/// `text` as one word for `sh`.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_quote_every_argument() {
        let slurm = Slurm {
            exe: "/opt/tiny gpt/tinygpt".into(),
            recipe: "/r/it's.toml".into(),
            sets: vec!["pack.seq_len=64".into()],
            store: "/s".into(),
            job_dir: "/s/slurm".into(),
            remote: Some("s3://b/p".into()),
            remote_required: false,
            cwd: "/".into(),
        };
        let key = ContentHash::of_bytes(b"k");
        let script = slurm.script("pack", &key);
        let line = script.lines().last().unwrap();
        assert_eq!(
            line,
            format!(
                "exec '/opt/tiny gpt/tinygpt' '--cache' '/s' '--remote' 's3://b/p' 'exec-stage' '/r/it'\\''s.toml' \
                 '--stage' 'pack' '--key' '{key}' '--set' 'pack.seq_len=64'"
            )
        );
    }
}
