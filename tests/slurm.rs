//! The Slurm executor (issue 17) on a real one-node cluster that the test starts (Debian's
//! `slurmctld`, `slurmd` and `munge`, installed by .ci/run; SKIPPED where they are missing or
//! the test is not root): the quickstart run as Slurm jobs gives the bytes of a local run; Ctrl-C
//! cancels the submitted jobs and leaves the store valid; a job the scheduler kills shows its
//! log in the error, and its stage is rerun cleanly next time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{assert_success, key, ran, stages_with, Sandbox};

const STAGES: [&str; 5] = ["corpus", "tokenize", "pack", "pretrain", "evaluate"];
/// Enough steps that a job is still training when the test acts on it (a few seconds).
const LONG: &str = "pretrain.max_steps=8000";

/// A single-node cluster in a temporary directory: munged, slurmctld and slurmd in the
/// foreground, killed when dropped.
struct Cluster {
    children: Vec<Child>,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

fn on_path(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Cluster {
    fn start() -> Option<Cluster> {
        let missing: Vec<&str> = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol", "sinfo"]
            .into_iter()
            .filter(|p| !on_path(p))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "SKIPPED: no {} (apt-get install slurmctld slurmd slurm-client munge; .ci/run does)",
                missing.join(", ")
            );
            return None;
        }
        let uid = Command::new("id").arg("-u").output().unwrap();
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("SKIPPED: the test cluster runs its daemons as root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = |name: &str| dir.path().join(name);
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir(d(sub)).unwrap();
        }
        let key: Vec<u8> =
            (0..1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ std::process::id() as u8).collect();
        std::fs::write(d("munge.key"), key).unwrap();
        let only_owner = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(d("munge.key"), only_owner).unwrap();
        let socket = d("munge.sock");
        let mut children = Vec::new();
        children.push(
            Command::new("munged")
                .args(["--foreground", "--force"])
                .arg(format!("--key-file={}", d("munge.key").display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--pid-file={}", d("munged.pid").display()))
                .arg(format!("--log-file={}", d("log/munged.log").display()))
                .arg(format!("--seed-file={}", d("munge.seed").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut cluster = Cluster { children, conf: d("slurm.conf"), _dir: dir };
        wait_for("munged did not start", || socket.exists());

        let host = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout).unwrap();
        let host = host.trim();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let at = |name: &str| cluster._dir.path().join(name).display().to_string();
        let conf = format!(
            "ClusterName=tinygpt-test\nSlurmctldHost={host}\nSlurmctldPort={}\nSlurmdPort={}\n\
             AuthType=auth/munge\nAuthInfo=socket={}\nCredType=cred/munge\nSlurmUser=root\nSlurmdUser=root\n\
             StateSaveLocation={}\nSlurmdSpoolDir={}\nSlurmctldPidFile={}\nSlurmdPidFile={}\n\
             SlurmctldLogFile={}\nSlurmdLogFile={}\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\n\
             DefMemPerCPU=500\nReturnToService=2\nMpiDefault=none\n\
             NodeName={host} CPUs={cpus} RealMemory=2000 State=UNKNOWN\n\
             PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
            free_port(),
            free_port(),
            socket.display(),
            at("state"),
            at("spool"),
            at("slurmctld.pid"),
            at("slurmd.pid"),
            at("log/slurmctld.log"),
            at("log/slurmd.log"),
        );
        std::fs::write(&cluster.conf, conf).unwrap();
        for daemon in [vec!["slurmctld", "-D", "-i"], vec!["slurmd", "-D"]] {
            let child = Command::new(daemon[0])
                .args(&daemon[1..])
                .env("SLURM_CONF", &cluster.conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            cluster.children.push(child);
        }
        wait_for("the test cluster's node did not become idle", || {
            cluster.command("sinfo").args(["-h", "-o", "%T"]).output().is_ok_and(|o| o.stdout.starts_with(b"idle"))
        });
        Some(cluster)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    /// Ids of the queued and running jobs.
    fn jobs(&self, state: Option<&str>) -> Vec<String> {
        let mut cmd = self.command("squeue");
        cmd.args(["-h", "-o", "%i"]);
        if let Some(state) = state {
            cmd.args(["-t", state]);
        }
        String::from_utf8(cmd.output().unwrap().stdout).unwrap().lines().map(str::to_string).collect()
    }

    fn tinygpt(&self, sb: &Sandbox, args: &[&str]) -> Command {
        let mut cmd = sb.command();
        cmd.env("SLURM_CONF", &self.conf).args(args);
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn output_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.ends_with("manifest.json") && !p.ends_with("metrics.jsonl"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

fn json_of(out: &Output) -> Value {
    assert_success(out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Start a Slurm run of the long recipe and wait until its pretrain job is running.
fn start_long_run(cluster: &Cluster, sb: &Sandbox) -> Child {
    let child = cluster
        .tinygpt(sb, &["run", "train.toml", "--executor", "slurm", "--set", LONG])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("no pretrain job started", || {
        !cluster.jobs(Some("R")).is_empty()
            && std::fs::read_dir(sb.store().join("work")).is_ok_and(|mut d| d.next().is_some())
    });
    child
}

fn stderr_of(child: Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn recipes_run_as_slurm_jobs() {
    let Some(cluster) = Cluster::start() else { return };

    // The quickstart as jobs and here: the same bytes.
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.toml");
    let digests = |args: &[&str]| {
        let sb = Sandbox::new();
        std::fs::copy(&quickstart, sb.path("quickstart.toml")).unwrap();
        let mut all = vec!["run", "quickstart.toml", "--json"];
        all.extend_from_slice(args);
        let run = json_of(&cluster.tinygpt(&sb, &all).output().unwrap());
        assert_eq!(ran(&run), STAGES, "{run}");
        STAGES.map(|name| sb.manifest(&key(&run, name))["content_digest"].clone())
    };
    assert_eq!(digests(&["--executor", "slurm"]), digests(&[]), "the quickstart through Slurm");

    // The same recipe as jobs and here: the same bytes.
    let here = Sandbox::new();
    let local = here.run_json("train.toml", &[]);
    let sb = Sandbox::new();
    let recipe = std::fs::read_to_string(sb.path("train.toml")).unwrap();
    sb.write("train.toml", format!("{recipe}\n[executor]\ncpus = 1\nmem = \"300M\"\n"));
    let args = ["run", "train.toml", "--executor", "slurm", "--json", "--set", "pretrain.executor={ mem = \"400M\" }"];
    let jobs = json_of(&cluster.tinygpt(&sb, &args).output().unwrap());
    assert_eq!(ran(&jobs), STAGES, "{jobs}");
    // Each job had the recipe's resources, and pretrain its own memory.
    let shown = cluster.command("scontrol").args(["show", "job", "--oneliner"]).output().unwrap();
    let shown = String::from_utf8(shown.stdout).unwrap();
    let workdir = format!("WorkDir={} ", sb.dir.path().display());
    for name in STAGES {
        let ours = |l: &&str| l.contains(&format!("JobName=tinygpt-{name} ")) && l.contains(&workdir);
        let line = shown.lines().find(ours).expect("the job is listed");
        let mem = if name == "pretrain" { "400M" } else { "300M" };
        assert!(line.contains("NumCPUs=1 ") && line.contains(&format!("MinMemoryNode={mem} ")), "{name}: {line}");
    }
    for name in STAGES {
        assert_eq!(key(&jobs, name), key(&local, name));
        let files = |s: &Sandbox, run: &Value| output_files(&s.store().join("objects").join(key(run, name)));
        assert!(files(&sb, &jobs) == files(&here, &local), "stage {name}: different bytes");
    }
    let logs = std::fs::read_dir(sb.store().join("slurm"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
        .count();
    assert_eq!(logs, STAGES.len(), "one job per stage");
    let again =
        json_of(&cluster.tinygpt(&sb, &["run", "train.toml", "--executor", "slurm", "--json"]).output().unwrap());
    assert_eq!(stages_with(&again, "cached"), STAGES, "nothing submitted when cached");

    // Nodes that do not share this store: jobs use their own, artifacts come back through the
    // remote.
    let remote = tempfile::tempdir().unwrap();
    let node = tempfile::tempdir().unwrap();
    let apart = Sandbox::new();
    let url = format!("file://{}", remote.path().display());
    let node_store = node.path().to_str().unwrap();
    let args = ["run", "train.toml", "--executor", "slurm", "--json", "--remote", &url, "--job-cache", node_store];
    let run = json_of(&cluster.tinygpt(&apart, &args).output().unwrap());
    assert_eq!(ran(&run), STAGES, "{run}");
    for name in STAGES {
        assert!(node.path().join("objects").join(key(&run, name)).is_dir(), "{name} built in the job's store");
        let digest = |s: &Sandbox, run: &Value| s.manifest(&key(run, name))["content_digest"].clone();
        assert_eq!(digest(&apart, &run), digest(&here, &local), "{name}, back through the remote");
    }
    let out = cluster.tinygpt(&apart, &["run", "train.toml", "--job-cache", node_store]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--job-cache without Slurm and a remote");

    // Sweep members are jobs at the same time: both scripts are written before either job's
    // log is last written.
    let swept = Sandbox::new();
    let args = ["run", "tiny.toml", "--executor", "slurm", "--json", "--set", "pack.sweep={ seq_len = [16, 24] }"];
    let run = json_of(&cluster.tinygpt(&swept, &args).output().unwrap());
    assert_eq!(ran(&run).len(), 4, "{run}");
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let members: Vec<(std::time::SystemTime, std::time::SystemTime)> = ["pack[seq_len=16]", "pack[seq_len=24]"]
        .iter()
        .map(|name| {
            let job = swept.store().join("slurm").join(key(&run, name));
            (mtime(job.with_extension("sh")), mtime(job.with_extension("log")))
        })
        .collect();
    assert!(members.iter().map(|m| m.0).max() < members.iter().map(|m| m.1).min(), "{members:?}");

    // Ctrl-C cancels the job and leaves the store valid.
    let run = start_long_run(&cluster, &sb);
    Command::new("kill").args(["-INT", &run.id().to_string()]).status().unwrap();
    let (code, stderr) = stderr_of(run);
    assert_eq!(code, Some(130), "{stderr}");
    wait_for("the job was not cancelled", || cluster.jobs(None).is_empty());
    assert_success(&sb.tinygpt(&["cache", "verify"]));

    // A job the scheduler kills: its log in the error; the next run finishes the stage, with
    // the bytes of a local run.
    let run = start_long_run(&cluster, &sb);
    let job = cluster.jobs(Some("R")).remove(0);
    assert!(cluster.command("scancel").arg(&job).status().unwrap().success());
    let (code, stderr) = stderr_of(run);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("Slurm job {job} ended CANCELLED")), "{stderr}");
    assert!(stderr.contains("the end of its log"), "{stderr}");
    assert!(stderr.contains("pretrain"), "{stderr}");

    let finished = json_of(
        &cluster.tinygpt(&sb, &["run", "train.toml", "--executor", "slurm", "--json", "--set", LONG]).output().unwrap(),
    );
    assert_eq!(ran(&finished), ["pretrain", "evaluate"]);
    let long_here = here.run_json("train.toml", &["--set", LONG]);
    let files = |s: &Sandbox, run: &Value| output_files(&s.store().join("objects").join(key(run, "pretrain")));
    assert!(files(&sb, &finished) == files(&here, &long_here), "resumed after the kill, the same bytes");
}
