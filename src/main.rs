//! The `tinygpt` binary: parses arguments, prints, reads the environment and picks exit codes.
//! All the work is in the `engine` and `stages` crates.
//!
//! Exit codes: 0 success, 1 a stage (or the store) failed, 2 a bad recipe or command line,
//! 130 interrupted.

mod benchmark;
mod cli;
mod compare;
mod diagnostic;
mod output;
mod progress;
mod report;
mod slurm;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use cli::{CacheCommand, Cli, Command, DagFormat, Executor, RecipeArgs, SampleArgs, TransferArgs};
use engine::cache::{Remote, Store};
use engine::{EngineError, Recipe, RecipeError, Registry, RemoteUse, StageProgress};

static CANCEL: AtomicBool = AtomicBool::new(false);

/// Why the binary stops early, mapped to an exit code.
enum Fail {
    Recipe(RecipeError),
    Other(String),
    /// Ctrl-C outside a run's stages (a transfer with the remote).
    Interrupted,
}

impl From<EngineError> for Fail {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Recipe(r) => Fail::Recipe(r),
            EngineError::Interrupted => Fail::Interrupted,
            other => Fail::Other(other.to_string()),
        }
    }
}

impl From<engine::cache::CacheError> for Fail {
    fn from(e: engine::cache::CacheError) -> Self {
        Fail::Other(format!("cache: {e}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(Fail::Recipe(e)) => {
            eprint!("{}", diagnostic::render(&e));
            ExitCode::from(2)
        }
        Err(Fail::Other(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
        Err(Fail::Interrupted) => {
            eprintln!("interrupted: nothing partial was kept; run again to continue");
            ExitCode::from(130)
        }
    }
}

/// Print a run's table (or JSON) and what went wrong; the exit code it calls for.
fn finish_run(report: &engine::RunReport, json: bool) -> ExitCode {
    if json {
        print_json(&output::run_json(report));
    } else {
        print!("{}", output::run_table(report));
    }
    if report.interrupted {
        eprintln!("interrupted: finished stages are cached; run again to continue");
        return ExitCode::from(130);
    }
    if let Some(f) = &report.failure {
        eprintln!("error: stage `{}` failed: {}", f.stage, f.message);
        if !report.not_run.is_empty() {
            let shown = report.not_run.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
            let more = report.not_run.len().saturating_sub(10);
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            eprintln!("not run: {shown}{more}");
        }
        return ExitCode::from(if f.bad_input { 2 } else { 1 });
    }
    ExitCode::SUCCESS
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd().join(path)
    }
}

fn cwd() -> PathBuf {
    std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."))
}

fn load(args: &RecipeArgs, registry: &Registry) -> Result<Recipe, Fail> {
    engine::recipe::load(&args.recipe, &args.sets, registry, &cwd()).map_err(Fail::Recipe)
}

fn open_store(cli_cache: &Option<PathBuf>) -> Result<Store, Fail> {
    let root = cli_cache.clone().unwrap_or_else(|| PathBuf::from(".tinygpt"));
    Ok(Store::open(&root)?)
}

/// The remote cache the command line or `TINYGPT_REMOTE` names, if any.
fn open_remote(url: &Option<String>, required: bool) -> Result<Option<RemoteUse>, Fail> {
    match url {
        None if required => {
            Err(Fail::Other("--remote-required needs a remote: give --remote URL or set TINYGPT_REMOTE".into()))
        }
        None => Ok(None),
        Some(url) => {
            let remote = Remote::open(url).map_err(|e| Fail::Other(e.to_string()))?;
            Ok(Some(RemoteUse::connect(remote, required, &warn)?))
        }
    }
}

fn warn(message: &str) {
    eprintln!("warning: {message}");
}

fn print_json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values serialize"));
}

fn dispatch(cli: Cli) -> Result<ExitCode, Fail> {
    let registry = stages::registry();
    match cli.command {
        Command::Run { recipe: args, jobs, json, executor, job_cache } => {
            let recipe = load(&args, &registry)?;
            let store = open_store(&cli.cache)?;
            install_interrupt_handler();
            let remote = open_remote(&cli.remote, cli.remote_required)?;
            if job_cache.is_some() && (executor != Executor::Slurm || remote.is_none()) {
                return Err(Fail::Recipe(RecipeError::new(
                    "--job-cache is the store of Slurm jobs, whose artifacts come back through a remote: it \
                     needs --executor slurm and --remote",
                )));
            }
            let slurm = match executor {
                Executor::Local => None,
                Executor::Slurm => Some(slurm::Slurm {
                    exe: std::env::current_exe().map_err(|e| Fail::Other(format!("cannot find this program: {e}")))?,
                    recipe: absolute(&args.recipe),
                    sets: args.sets.clone(),
                    store: absolute(job_cache.as_deref().unwrap_or(store.root())),
                    job_dir: absolute(&store.root().join("slurm")),
                    remote: cli.remote.clone(),
                    remote_required: cli.remote_required,
                    cwd: cwd(),
                }),
            };
            let jobs = match (jobs, &slurm) {
                (Some(jobs), _) => jobs,
                (None, Some(_)) => recipe.stages.len(),
                (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
            };
            let observer = progress::Progress::new();
            let opts = engine::RunOptions {
                remote: remote.as_ref(),
                runner: slurm.as_ref().map(|s| s as &dyn engine::StageRunner),
                ..engine::RunOptions::local(jobs, &CANCEL, &observer)
            };
            let report = engine::run(&recipe, &store, &opts)?;
            drop(observer);
            Ok(finish_run(&report, json))
        }
        Command::ExecStage { recipe, stage, key } => {
            let recipe = load(&recipe, &registry)?;
            let key = engine::cache::ContentHash::from_hex(&key)
                .ok_or_else(|| Fail::Other(format!("`{key}` is not a key (64 hex digits)")))?;
            let store = open_store(&cli.cache)?;
            install_interrupt_handler();
            let remote = open_remote(&cli.remote, cli.remote_required)?;
            let observer = progress::Progress::new();
            let opts = engine::RunOptions {
                remote: remote.as_ref(),
                only: Some((&stage, key)),
                ..engine::RunOptions::local(1, &CANCEL, &observer)
            };
            let report = engine::run(&recipe, &store, &opts)?;
            drop(observer);
            Ok(finish_run(&report, false))
        }
        Command::Plan { recipe, json } => {
            let recipe = load(&recipe, &registry)?;
            let store = open_store(&cli.cache)?;
            let remote = open_remote(&cli.remote, cli.remote_required)?;
            let plan = engine::plan_with_remote(&recipe, &store, remote.as_ref(), &warn)?;
            if json {
                print_json(&output::plan_json(&plan));
            } else {
                print!("{}", output::plan_table(&plan));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dag { recipe, format } => {
            let recipe = load(&recipe, &registry)?;
            let format = match format {
                DagFormat::Dot => engine::graph::GraphFormat::Dot,
                DagFormat::Mermaid => engine::graph::GraphFormat::Mermaid,
            };
            print!("{}", engine::graph::render(&recipe, format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache { command: CacheCommand::Push(args) } => {
            install_interrupt_handler();
            let remote = open_remote(&cli.remote, true)?.expect("a required remote is given");
            push(&args, &cli.cache, &remote, &registry)
        }
        Command::Cache { command: CacheCommand::Pull(args) } => {
            install_interrupt_handler();
            let remote = open_remote(&cli.remote, true)?.expect("a required remote is given");
            pull(&args, &cli.cache, &remote, &registry)
        }
        Command::Cache { command } => cache_command(command, &cli.cache, &registry),
        Command::Compare { recipe, json, csv } => {
            let (_, _, table) = built_models(&recipe, &cli.cache, &registry)?;
            if json {
                print_json(&table.json());
            } else if csv {
                print!("{}", table.csv());
                for note in table.notes() {
                    eprintln!("{note}");
                }
            } else {
                print!("{}", table.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report { recipe, output } => {
            let (recipe, plan, table) = built_models(&recipe, &cli.cache, &registry)?;
            let html =
                report::render(&recipe, &plan, &table).map_err(|e| Fail::Other(format!("drawing the report: {e}")))?;
            let path = output.unwrap_or_else(|| PathBuf::from(format!("{}.html", recipe.name)));
            let tmp = path.with_extension("html.tmp");
            std::fs::write(&tmp, html)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| Fail::Other(format!("writing `{}`: {e}", path.display())))?;
            println!("wrote {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { limit, json } => {
            let store = open_store(&cli.cache)?;
            let records = store.recent_runs(limit)?;
            if json {
                print_json(&output::runs_json(&records));
            } else {
                print!("{}", output::runs_table(&records));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sample(args) => sample(args, &cli.cache, &registry),
        Command::Bench { no_matmul, steps, json, shards } => {
            benchmark::run(!no_matmul, steps, json, shards);
            Ok(ExitCode::SUCCESS)
        }
        Command::Doc => {
            print!("{}", stage_reference(&registry));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A recipe, its plan against the store (which artifacts are built) and the compare table.
fn built_models(
    args: &RecipeArgs,
    root: &Option<PathBuf>,
    registry: &Registry,
) -> Result<(Recipe, Vec<engine::PlannedStage>, compare::Comparison), Fail> {
    let recipe = load(args, registry)?;
    let plan = engine::plan(&recipe, &open_store(root)?)?;
    let table = compare::compare(&recipe, &plan);
    Ok((recipe, plan, table))
}

fn cache_command(command: CacheCommand, root: &Option<PathBuf>, registry: &Registry) -> Result<ExitCode, Fail> {
    let store = open_store(root)?;
    match command {
        CacheCommand::Ls => {
            let rows: Vec<Vec<String>> = store
                .list()?
                .into_iter()
                .map(|a| {
                    let m = &a.manifest;
                    let meta = |k: &str| m.meta[k].as_str().unwrap_or("?").to_string();
                    vec![
                        m.key.short(),
                        meta("recipe"),
                        meta("stage"),
                        meta("kind"),
                        m.files.len().to_string(),
                        output::human_bytes(m.total_bytes()),
                    ]
                })
                .collect();
            print!("{}", output::table(&["key", "recipe", "stage", "kind", "files", "size"], &rows));
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Verify => {
            let (checked, problems) = store.verify()?;
            for p in &problems {
                println!("damaged {}: {} (moved aside; the next run rebuilds it)", &p.key[..12], p.problem);
            }
            println!("verified {checked} artifacts: {} damaged", problems.len());
            Ok(if problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        CacheCommand::Push(_) | CacheCommand::Pull(_) => unreachable!("dispatched with the remote"),
        CacheCommand::Gc { recipes, keep_runs } => {
            let mut keep = HashSet::new();
            for path in &recipes {
                let recipe = engine::recipe::load(path, &[], registry, &cwd()).map_err(Fail::Recipe)?;
                keep.extend(engine::plan(&recipe, &store)?.into_iter().filter_map(|s| s.key));
            }
            for record in store.recent_runs(keep_runs)? {
                keep.extend(record.keys);
            }
            let report = store.gc(&keep)?;
            let pruned = store.prune_runs(keep_runs)?;
            println!(
                "removed {} artifacts and {pruned} run records, kept {} artifacts, freed {}",
                report.removed,
                report.kept,
                output::human_bytes(report.freed_bytes)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The stages of a recipe to push or pull, by name with their plan; all artifacts without one.
fn transfer_plan(
    args: &TransferArgs,
    store: &Store,
    remote: Option<&RemoteUse>,
    registry: &Registry,
) -> Result<Option<Vec<engine::PlannedStage>>, Fail> {
    let Some(path) = &args.recipe else { return Ok(None) };
    let recipe = load(&RecipeArgs { recipe: path.clone(), sets: args.sets.clone() }, registry)?;
    Ok(Some(engine::plan_with_remote(&recipe, store, remote, &warn)?))
}

/// `tinygpt cache push`: every local artifact of the recipe (or of the store) the remote lacks.
fn push(
    args: &TransferArgs,
    root: &Option<PathBuf>,
    remote: &RemoteUse,
    registry: &Registry,
) -> Result<ExitCode, Fail> {
    let store = open_store(root)?;
    let mut rows = Vec::new();
    let artifacts: Vec<(String, engine::cache::Artifact)> = match transfer_plan(args, &store, None, registry)? {
        Some(plan) => plan
            .into_iter()
            .filter_map(|s| match s.artifact {
                Some(artifact) => Some((s.name, artifact)),
                None => {
                    let key = s.key.map_or_else(|| "?".into(), |k| k.short());
                    rows.push(vec![s.name, key, "not built here".into()]);
                    None
                }
            })
            .collect(),
        None => store.list()?.into_iter().map(|a| (stage_of(&a.manifest), a)).collect(),
    };
    let progress = progress::Progress::new();
    for (name, artifact) in &artifacts {
        let bar = progress.transfer(name, "uploading", artifact.manifest.total_bytes());
        let pushed = match remote.remote.push(artifact, &|n| bar.inc(n), &CANCEL) {
            Ok(pushed) => pushed,
            Err(engine::cache::RemoteError::Interrupted) => return Err(Fail::Interrupted),
            Err(e) => return Err(Fail::Other(e.to_string())),
        };
        drop(bar);
        let what = match pushed.files_sent {
            0 => "in the remote already".to_string(),
            n => format!("sent {n} files, {}", output::human_bytes(pushed.bytes_sent)),
        };
        rows.push(vec![name.clone(), artifact.manifest.key.short(), what]);
    }
    drop(progress);
    print!("{}", output::table(&["stage", "key", "pushed"], &rows));
    Ok(ExitCode::SUCCESS)
}

/// `tinygpt cache pull`: every artifact of the recipe (or of the remote) missing locally.
fn pull(
    args: &TransferArgs,
    root: &Option<PathBuf>,
    remote: &RemoteUse,
    registry: &Registry,
) -> Result<ExitCode, Fail> {
    let store = open_store(root)?;
    let mut rows = Vec::new();
    let mut missing = 0;
    let wanted: Vec<(String, engine::cache::ContentHash)> = match transfer_plan(args, &store, Some(remote), registry)? {
        Some(plan) => plan
            .into_iter()
            .filter(|s| s.action != engine::Action::Cached)
            .filter_map(|s| match s.key {
                Some(key) => Some((s.name, key)),
                None => {
                    missing += 1;
                    rows.push(vec![s.name, "?".into(), "not in the remote (an upstream stage is not)".into()]);
                    None
                }
            })
            .collect(),
        None => remote
            .remote
            .keys()
            .map_err(|e| Fail::Other(e.to_string()))?
            .into_iter()
            .map(|k| (String::new(), k))
            .collect(),
    };
    let progress = progress::Progress::new();
    for (name, key) in wanted {
        let staging = store.begin(&key)?;
        let (name, what) = if let Some(artifact) = store.get(&key)? {
            store.abandon(staging)?;
            let name = if name.is_empty() { stage_of(&artifact.manifest) } else { name };
            (name, "here already".to_string())
        } else if let Some(manifest) = remote.remote.manifest(&key).map_err(|e| Fail::Other(e.to_string()))? {
            let name = if name.is_empty() { stage_of(&manifest) } else { name };
            let bar = progress.transfer(&name, "downloading", manifest.total_bytes());
            let size = output::human_bytes(manifest.total_bytes());
            match remote.download_into(&store, staging, manifest, &|n| bar.inc(n), &CANCEL, &warn)? {
                Ok(_) => (name, format!("received {size}")),
                Err(_) => unreachable!("a required remote reports every failure as an error"),
            }
        } else {
            store.abandon(staging)?;
            missing += 1;
            (name, "not in the remote (run the recipe to build it)".to_string())
        };
        rows.push(vec![name, key.short(), what]);
    }
    drop(progress);
    print!("{}", output::table(&["stage", "key", "pulled"], &rows));
    Ok(if missing == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The stage an artifact was built for, as the engine recorded it in the manifest.
fn stage_of(manifest: &engine::cache::Manifest) -> String {
    manifest.meta["stage"].as_str().unwrap_or("?").to_string()
}

/// The model directory a `sample` command names: a directory as given, or the artifact of a
/// recipe's stage, which must already be built.
fn model_dir(
    args: &SampleArgs,
    stage: Option<&String>,
    root: &Option<PathBuf>,
    registry: &Registry,
) -> Result<PathBuf, Fail> {
    if args.source.is_dir() {
        return Ok(args.source.clone());
    }
    let recipe_args = RecipeArgs { recipe: args.source.clone(), sets: args.sets.clone() };
    let recipe = load(&recipe_args, registry)?;
    let store = open_store(root)?;
    let plan = engine::plan(&recipe, &store)?;
    let is_model = |kind: &str| {
        registry.get(kind).is_some_and(|k| k.output() == stages::MODEL || k.output() == stages::QUANTIZED_MODEL)
    };
    let stage = match stage {
        Some(name) => plan.iter().find(|s| &s.name == name).ok_or_else(|| {
            let names: Vec<&str> = plan.iter().map(|s| s.name.as_str()).collect();
            Fail::Other(format!("the recipe has no stage `{name}` (stages: {})", names.join(", ")))
        })?,
        None => plan
            .iter()
            .rev()
            .find(|s| is_model(&s.kind))
            .ok_or_else(|| Fail::Other("the recipe has no stage that makes a model".into()))?,
    };
    if !is_model(&stage.kind) {
        return Err(Fail::Other(format!(
            "stage `{}` is a `{}` stage, which does not make a model",
            stage.name, stage.kind
        )));
    }
    match &stage.artifact {
        Some(artifact) => Ok(artifact.dir.clone()),
        None => Err(Fail::Other(format!(
            "stage `{}` is not built for this recipe as it stands; run `tinygpt run {}` first",
            stage.name,
            args.source.display()
        ))),
    }
}

fn sample(args: SampleArgs, root: &Option<PathBuf>, registry: &Registry) -> Result<ExitCode, Fail> {
    use std::io::Write;
    let dir = model_dir(&args, args.stage.as_ref(), root, registry)?;
    let lm = stages::generate::LoadedModel::load(&dir).map_err(|e| Fail::Other(e.to_string()))?;
    let draft_lm = match &args.draft {
        None => None,
        Some(d) => {
            let draft_dir = match (Path::new(d).is_dir(), args.source.is_dir()) {
                (true, _) => PathBuf::from(d),
                (false, false) => model_dir(&args, Some(d), root, registry)?,
                (false, true) => {
                    return Err(Fail::Other(format!(
                        "`{d}` is not a model directory (with a model directory, --draft takes one too)"
                    )))
                }
            };
            let same = |f: &Path| std::fs::read(f.join(stages::model_io::TOKENIZER)).ok();
            if same(&dir) != same(&draft_dir) {
                return Err(Fail::Other(format!(
                    "the draft `{d}` has another tokenizer than the model: a draft must share the model's vocabulary"
                )));
            }
            Some(stages::generate::LoadedModel::load(&draft_dir).map_err(|e| Fail::Other(e.to_string()))?)
        }
    };
    let draft = draft_lm.as_ref().map(|lm| stages::generate::Draft { lm, tokens: args.draft_tokens });
    let prompt = match &args.instruction {
        None => args.prompt.clone(),
        Some(instruction) => {
            if !dir.join(stages::instructions::TEMPLATE_FILE).is_file() {
                return Err(Fail::Other(format!(
                    "the model in `{}` has no instruction template (`sft` writes one): use --prompt",
                    dir.display()
                )));
            }
            let template = stages::instructions::Template::read(&dir).map_err(|e| Fail::Other(e.to_string()))?;
            template.prompt(instruction, &args.input)
        }
    };
    let sampling = stages::nn::sample::Sampling { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p };
    let mut out = std::io::stdout();
    for i in 0..args.num_samples {
        if i > 0 {
            writeln!(out, "\n---").ok();
        }
        write!(out, "{prompt}").ok();
        let opts = stages::generate::GenOptions {
            sampling,
            max_new_tokens: args.max_new_tokens,
            seed: args.seed.wrapping_add(i as u64),
            stop_at_eot: true,
        };
        let started = std::time::Instant::now();
        let (_, stats) = stages::generate::generate_with_draft(&lm, draft, &prompt, opts, |piece| {
            write!(out, "{piece}").ok();
            out.flush().ok();
        })
        .map_err(|e| Fail::Other(e.to_string()))?;
        writeln!(out).ok();
        if draft.is_some() {
            eprintln!(
                "speculative: {:.0}% of {} proposals kept, {:.0} tokens/s",
                100.0 * stats.acceptance(),
                stats.proposed,
                stats.tokens as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn install_interrupt_handler() {
    let result = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            eprintln!("\naborting");
            std::process::exit(130);
        }
        eprintln!("\ninterrupting: stopping running stages (Ctrl-C again to abort at once)");
    });
    if let Err(e) = result {
        eprintln!("warning: cannot catch Ctrl-C ({e}); an interrupt will still leave no partial artifact");
    }
}

/// The Markdown reference of every stage kind, generated from the declarations so the docs
/// cannot drift (a test compares it with docs/RECIPES.md).
fn stage_reference(registry: &Registry) -> String {
    let mut out = String::new();
    for kind in registry.kinds() {
        out.push_str(&format!("### `{}`\n\n{}.\n\n", kind.kind(), capitalize(kind.about())));
        out.push_str(&format!(
            "Produces: `{}`. Implementation version: {}. Uses the seed: {}.\n\n",
            kind.output().0,
            kind.version(),
            if kind.uses_seed() { "yes" } else { "no" }
        ));
        if !kind.volatile_outputs().is_empty() {
            let files: Vec<String> = kind.volatile_outputs().iter().map(|f| format!("`{f}`")).collect();
            out.push_str(&format!(
                "Volatile outputs (verified, but not in the content digest): {}.\n\n",
                files.join(", ")
            ));
        }
        if !kind.inputs().is_empty() {
            out.push_str("| input | accepts | required | description |\n|---|---|---|---|\n");
            for i in kind.inputs() {
                let types: Vec<String> = i.accepts.types().iter().map(|t| format!("`{}`", t.0)).collect();
                let mut accepts = types.join(", ");
                if i.accepts.raw() {
                    accepts = if accepts.is_empty() {
                        "file or directory".into()
                    } else {
                        format!("file, directory or {accepts}")
                    };
                }
                out.push_str(&format!(
                    "| `{}` | {} | {} | {} |\n",
                    i.name,
                    accepts,
                    if i.required { "yes" } else { "no" },
                    i.doc
                ));
            }
            out.push('\n');
        }
        out.push_str("| parameter | type | default | hashed | description |\n|---|---|---|---|---|\n");
        for p in kind.params() {
            let default = match p.default_value() {
                Some(v) => format!("`{v}`"),
                None if matches!(p.default, engine::params::Default::Required) => "required".into(),
                None => "unset".into(),
            };
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                p.name,
                p.type_name().replace('|', "\\|"),
                default,
                match (p.hashed, p.keyed_at_default) {
                    (false, _) => "no",
                    (true, true) => "yes",
                    (true, false) => "when set",
                },
                p.doc
            ));
        }
        out.push('\n');
    }
    out
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}
