//! The command line: every command, option and its help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tinygpt",
    version,
    about = "Train small GPT models on the CPU from TOML recipes that rerun only what changed"
)]
pub struct Cli {
    /// The artifact store [default: .tinygpt in the current directory]
    #[arg(long, global = true, env = "TINYGPT_CACHE", value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// A cache shared with a team: `s3://BUCKET/PREFIX` (endpoint, region and credentials
    /// from the usual AWS_* variables) or `file:///PATH` on a shared filesystem. `run` and
    /// `plan` look there for what the local cache lacks; `run` uploads what it builds
    #[arg(long, global = true, env = "TINYGPT_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Stop with an error when the remote cannot be reached, instead of warning and building
    /// locally
    #[arg(long, global = true)]
    pub remote_required: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args)]
pub struct RecipeArgs {
    /// The recipe file
    pub recipe: PathBuf,
    /// Override a stage parameter or input: STAGE.KEY=VALUE (VALUE is TOML; bare words are
    /// strings; input paths are relative to the current directory)
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a recipe: every stage whose inputs or parameters changed, the rest from the cache
    Run {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Most stages running at once [default: number of cores; with Slurm, every stage]
        #[arg(long, short)]
        jobs: Option<usize>,
        /// Print the result as one JSON object on stdout
        #[arg(long)]
        json: bool,
        /// Where stages run: here, or each as a Slurm job (`sbatch`) with the resources of the
        /// recipe's `[executor]` table; the store must be on a filesystem the nodes share, or
        /// the run must have a remote and `--job-cache`
        #[arg(long, value_enum, default_value_t = Executor::Local)]
        executor: Executor,
        /// With `--executor slurm`: the store the jobs use on their nodes (node-local scratch)
        /// when this one is not shared with them; artifacts then travel through `--remote`
        #[arg(long, value_name = "DIR")]
        job_cache: Option<PathBuf>,
    },
    /// Run one stage of a recipe whose upstream artifacts are built: what a Slurm job runs
    #[command(hide = true)]
    ExecStage {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// The stage to build
        #[arg(long)]
        stage: String,
        /// Its key when it was submitted; a different key here is an error
        #[arg(long)]
        key: String,
    },
    /// Show what `run` would do and why, without running anything
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print the plan as one JSON object on stdout
        #[arg(long)]
        json: bool,
    },
    /// Print the recipe's graph of stages
    Dag {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Graphviz (`dot -Tsvg`) or a Mermaid flowchart (renders in GitHub Markdown)
        #[arg(long, value_enum, default_value_t = DagFormat::Dot)]
        format: DagFormat,
    },
    /// Every model of a recipe side by side: its evaluations' metrics, size, quantization and
    /// speeds, from the artifacts already built
    Compare {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print the table as JSON on stdout
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print the table as CSV on stdout
        #[arg(long)]
        csv: bool,
    },
    /// Write one self-contained HTML file about a recipe's built artifacts: the DAG, loss
    /// curves, the compare table, samples, and each stage's time and throughput
    Report {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Where to write it [default: the recipe's name with `.html`, in the current directory]
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Past runs, newest first: when, which recipe, stages run, cached and failed, seconds
    Runs {
        /// How many to show
        #[arg(long, short = 'n', default_value_t = 20, value_name = "N")]
        limit: usize,
        /// Print them as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Inspect and maintain the artifact store
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Generate text from a trained model, streaming it to the terminal
    Sample(SampleArgs),
    /// Measure this machine: FMA peak, matmul throughput per model shape, and training steps of
    /// the two reference models (time per kernel, tokens/s, MFU, peak memory)
    Bench {
        /// Skip the matmul table
        #[arg(long)]
        no_matmul: bool,
        /// Steps to time per model [default: 20 for shakespeare_char, 3 for gpt2-6x384]
        #[arg(long, value_name = "N")]
        steps: Option<usize>,
        /// Print every figure as one JSON document at the end (progress goes to stderr)
        #[arg(long)]
        json: bool,
        /// Train with each batch split into N shards, as the recipe key `shards` does (N must
        /// divide both reference batches, 12 and 8: 1, 2 or 4)
        #[arg(long, value_name = "N", default_value = "1", value_parser = shard_counts())]
        shards: usize,
    },
    /// Print the reference of every stage kind (parameters, defaults, inputs) as Markdown
    Doc,
}

/// The shard counts `bench` accepts: those that divide both reference models' batches.
fn shard_counts() -> impl clap::builder::TypedValueParser<Value = usize> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["1", "2", "4"]).map(|n| n.parse::<usize>().expect("a listed count"))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Executor {
    /// In this process
    Local,
    /// As Slurm jobs, one per stage
    Slurm,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DagFormat {
    Dot,
    Mermaid,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List every artifact: key, stage, kind, size
    Ls,
    /// Rehash every artifact; any that no longer matches its manifest is moved aside and will
    /// be rebuilt by the next run. Exits 1 if any was damaged
    Verify,
    /// Remove artifacts that neither the named recipes nor the last runs use, and the records
    /// of older runs
    Gc {
        /// Recipes whose current artifacts to keep
        recipes: Vec<PathBuf>,
        /// Also keep everything the last N runs produced or used, and their records
        #[arg(long, default_value_t = 3, value_name = "N")]
        keep_runs: usize,
    },
    /// Upload to the remote (`--remote`) the artifacts a recipe uses, or every local artifact
    Push(TransferArgs),
    /// Download from the remote (`--remote`) the artifacts a recipe uses that the local cache
    /// lacks, or every artifact the remote has
    Pull(TransferArgs),
}

#[derive(Args)]
pub struct TransferArgs {
    /// The recipe whose artifacts to move [default: all of them]
    pub recipe: Option<PathBuf>,
    /// Override a stage parameter or input, as for `run`
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE", requires = "recipe")]
    pub sets: Vec<String>,
}

#[derive(Args)]
pub struct SampleArgs {
    /// A recipe, or a model directory (config.json, model.safetensors, tokenizer.json)
    pub source: PathBuf,
    /// With a recipe: the stage whose model to use [default: the last stage that makes a model]
    pub stage: Option<String>,
    /// Override a stage parameter or input, as for `run`
    #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
    pub sets: Vec<String>,
    /// The text to continue; the model sees its last block_size - 1 tokens [default: start
    /// from the end-of-text token]
    #[arg(long, default_value = "", hide_default_value = true, conflicts_with = "instruction")]
    pub prompt: String,
    /// An instruction for a fine-tuned model: the prompt becomes the model's template (from
    /// `sft`) applied to it
    #[arg(long, value_name = "TEXT")]
    pub instruction: Option<String>,
    /// The instruction's input, if it has one
    #[arg(long, value_name = "TEXT", requires = "instruction", default_value = "", hide_default_value = true)]
    pub input: String,
    /// Tokens to generate per sample
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_new_tokens: usize,
    /// 0 picks the most likely token every time
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0: all)
    #[arg(long, default_value_t = 200, value_name = "K")]
    pub top_k: usize,
    /// Sample among the most likely tokens whose probability reaches P
    #[arg(long, default_value_t = 1.0, value_name = "P")]
    pub top_p: f32,
    /// Seed of the first sample: the same seed and prompt give the same text
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples to draw, each with the next seed
    #[arg(long, short = 'n', default_value_t = 1)]
    pub num_samples: usize,
    /// Decode speculatively with this smaller model (a stage of the recipe, or a model
    /// directory) proposing tokens: the same text at temperature 0, faster
    #[arg(long, value_name = "STAGE|DIR")]
    pub draft: Option<String>,
    /// Tokens the draft proposes per verification
    #[arg(long, default_value_t = 4, value_name = "K", requires = "draft")]
    pub draft_tokens: usize,
}
