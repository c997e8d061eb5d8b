//! `pretrain`: train a gpt2 or llama model from scratch on packed blocks.
//!
//! AdamW (weight decay on matrices only), warmup then cosine or warmup-stable-decay, clipping
//! by global norm, gradient accumulation, optional z-loss, and a batch order fixed by the seed.
//! Every `checkpoint_interval` steps (and on Ctrl-C) the whole training state goes to the work
//! directory; a rerun resumes from it and ends bit-identical to an uninterrupted run.
//!
//! Output: `model.safetensors`, `config.json` and `tokenizer.json` (a directory Hugging Face
//! `transformers` loads), `meta.json`, and `metrics.jsonl` with one line per logged step and
//! per evaluation. `metrics.jsonl` holds wall-clock figures and follows the unhashed
//! `log_interval` and `eval_interval`, so it is a volatile output: left out of the content
//! digest, which the weights and the other files determine.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Instant;

use engine::{Accepts, Input, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use serde_json::json;

use crate::arrow_io::{read_blocks, Blocks, TokenMeta};
use crate::batches::{mean_loss, Sampler, SamplerKind};
use crate::checkpoint::{Progress, TrainState};
use crate::model_io::{save_model, TOKENIZER};
use crate::nn::kernels::adamw::AdamW;
use crate::nn::model::{Activations, Gelu, Model, ModelConfig};
use crate::nn::optim::{AdamWState, Schedule};
use crate::nn::step::{train_step, StepConfig};
use crate::pack::{TRAIN_FILE, VAL_FILE};
use crate::{fail, round, MODEL, PACKED};

pub struct Pretrain;

pub const METRICS_FILE: &str = "metrics.jsonl";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::choice("arch", "gpt2", &["gpt2", "llama"], "`gpt2` (nanoGPT's model) or `llama`"),
    ParamSpec::int("n_layer", 4, 1, 1024, "transformer blocks"),
    ParamSpec::int("n_head", 4, 1, 1024, "attention heads"),
    ParamSpec::opt_int("n_kv_head", 1, 1024, "llama: key/value heads (default n_head; 1 is multi-query)"),
    ParamSpec::int("n_embd", 128, 2, 65536, "model width"),
    ParamSpec::opt_int("block_size", 1, 1 << 20, "longest sequence the model accepts (default: the data's seq_len)"),
    ParamSpec::opt_int("ffn_hidden", 1, 1 << 20, "MLP width (default 4 n_embd for gpt2, 8/3 n_embd rounded up to 32 for llama)"),
    ParamSpec::bool("bias", false, "gpt2: biases in linear layers and LayerNorms"),
    ParamSpec::choice(
        "activation",
        "gelu_new",
        &["gelu_new", "gelu"],
        "gpt2: `gelu_new` (GPT-2's tanh approximation) or `gelu` (exact, with erf: PyTorch's `nn.GELU`, as nanoGPT)",
    ),
    ParamSpec::bool("tie_embeddings", true, "llama: the output projection is the token embedding (gpt2 always ties)"),
    ParamSpec::float("rope_theta", 10_000.0, 1.0, 1e9, "llama: rotary embedding base"),
    ParamSpec::int("max_steps", 2000, 1, 1 << 40, "optimizer steps"),
    ParamSpec::int("batch_size", 12, 1, 1 << 20, "sequences per micro-batch"),
    ParamSpec::int("grad_accum", 1, 1, 1 << 16, "micro-batches per optimizer step"),
    ParamSpec::choice(
        "sampler",
        "blocks",
        &["blocks", "windows"],
        "`blocks`: packed blocks in a seeded shuffled order; `windows`: random windows of the token stream (nanoGPT)",
    ),
    ParamSpec::float("lr", 1e-3, 0.0, 10.0, "peak learning rate"),
    ParamSpec::float("min_lr", 1e-4, 0.0, 10.0, "learning rate at the end of the decay"),
    ParamSpec::int("warmup_steps", 100, 0, 1 << 40, "linear warmup from lr / (warmup + 1)"),
    ParamSpec::choice(
        "schedule",
        "cosine",
        &["cosine", "wsd", "constant"],
        "after warmup: `cosine` to min_lr, `wsd` (warmup-stable-decay, linear decay at the end), or `constant`",
    ),
    ParamSpec::opt_int(
        "decay_steps",
        1,
        1 << 40,
        "cosine: the step where the decay ends (default max_steps); wsd: length of the final decay (default max_steps / 5)",
    ),
    ParamSpec::float("beta1", 0.9, 0.0, 0.999_999, "AdamW first-moment decay"),
    ParamSpec::float("beta2", 0.99, 0.0, 0.999_999, "AdamW second-moment decay"),
    ParamSpec::float("eps", 1e-8, 0.0, 1.0, "AdamW epsilon"),
    ParamSpec::float("weight_decay", 0.1, 0.0, 10.0, "decoupled weight decay, on matrices only"),
    ParamSpec::float("grad_clip", 1.0, 0.0, 1e9, "clip the global gradient norm to this (0: no clipping)"),
    ParamSpec::float("z_loss", 0.0, 0.0, 1.0, "weight of the squared log-partition (PaLM's z-loss)"),
    ParamSpec::int("eval_interval", 250, 0, 1 << 40, "validation loss every this many steps, and at the end (0: only at the end)")
        .not_hashed(),
    ParamSpec::int("eval_batches", 20, 1, 1 << 30, "validation batches per evaluation (the first ones, in order)")
        .not_hashed(),
    ParamSpec::int("log_interval", 10, 1, 1 << 40, "a metrics line every this many steps").not_hashed(),
    ParamSpec::int("checkpoint_interval", 250, 1, 1 << 40, "save the training state every this many steps").not_hashed(),
];

const INPUTS: &[InputSpec] =
    &[InputSpec { name: "data", accepts: Accepts::Artifact(&[PACKED]), required: true, doc: "a `pack` stage" }];

/// The model a recipe asks for; the data supplies the vocabulary and the default block size.
fn model_config(p: &Params, vocab_size: usize, seq_len: usize) -> ModelConfig {
    let (layers, heads, embd) = (p.usize("n_layer"), p.usize("n_head"), p.usize("n_embd"));
    let block = p.opt_usize("block_size").unwrap_or(seq_len);
    let mut cfg = match p.str("arch") {
        "llama" => {
            let mut cfg =
                ModelConfig::llama(vocab_size, block, layers, heads, p.opt_usize("n_kv_head").unwrap_or(heads), embd);
            cfg.rope_theta = p.float("rope_theta") as f32;
            cfg.bias = p.bool("bias"); // `check` refuses true: llama has no biases
            cfg
        }
        _ => {
            let mut cfg = ModelConfig::gpt2(vocab_size, block, layers, heads, embd, p.bool("bias"));
            cfg.n_kv_head = p.opt_usize("n_kv_head").unwrap_or(heads);
            cfg
        }
    };
    if let Some(f) = p.opt_usize("ffn_hidden") {
        cfg.ffn_hidden = f;
    }
    // `check` refuses false for gpt2, and the exact GELU for llama (the choice's values are
    // Hugging Face's names).
    cfg.tie_embeddings = p.bool("tie_embeddings");
    cfg.gelu = Gelu::from_hf_name(p.str("activation")).expect("a declared choice");
    cfg
}

fn schedule(p: &Params) -> Schedule {
    let (lr, min_lr, warmup, steps) =
        (p.float("lr"), p.float("min_lr"), p.int("warmup_steps") as u64, p.int("max_steps") as u64);
    let decay = p.opt_usize("decay_steps").map(|d| d as u64);
    match p.str("schedule") {
        "wsd" => {
            let len = decay.unwrap_or(steps / 5).min(steps);
            Schedule::Wsd { lr, min_lr, warmup, decay_start: (steps - len).max(warmup), decay_end: steps }
        }
        "constant" => Schedule::Constant { lr, warmup },
        _ => Schedule::Cosine { lr, min_lr, warmup, decay_end: decay.unwrap_or(steps).max(warmup + 1) },
    }
}

impl Stage for Pretrain {
    fn kind(&self) -> &'static str {
        "pretrain"
    }
    fn version(&self) -> u32 {
        5 // 2: GELU through one exp, dot products in eight partial sums; 3: attention as matrix products; 4: exp without libm in GELU and SiLU; 5: attention in query blocks with exp_fast, norm statistics in four f64 lanes
    }
    fn about(&self) -> &'static str {
        "train a gpt2 or llama model from scratch on packed blocks, with checkpoints and exact resume"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        MODEL
    }
    fn uses_seed(&self) -> bool {
        true
    }
    fn volatile_outputs(&self) -> &'static [&'static str] {
        &[METRICS_FILE]
    }

    fn check(&self, p: &Params, _connected: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        let cfg = model_config(p, 2, p.opt_usize("block_size").unwrap_or(1));
        if let Some((key, problem)) = cfg.problem() {
            return Err(ParamProblem::new(key, problem));
        }
        if p.float("min_lr") > p.float("lr") {
            return Err(ParamProblem::new(
                "min_lr",
                format!("min_lr {} is above lr {}", p.float("min_lr"), p.float("lr")),
            ));
        }
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let Input::Artifact { artifact, .. } = ctx.required_input("data") else {
            unreachable!("`data` accepts only artifacts");
        };
        let p = ctx.params();
        let meta = TokenMeta::read(&artifact.dir)?;
        let seq_len = meta.seq_len.ok_or_else(|| StageError::msg("the data's meta.json has no seq_len"))?;
        let cfg = model_config(p, meta.vocab_size as usize, seq_len);
        if cfg.block_size < seq_len {
            return Err(StageError::msg(format!(
                "block_size {} is shorter than the data's seq_len {seq_len}: raise `block_size` or lower `pack.seq_len`",
                cfg.block_size
            )));
        }
        let train = read_blocks(&artifact.path(TRAIN_FILE))?;
        let val = read_blocks(&artifact.path(VAL_FILE))?;
        assert_eq!(train.width, seq_len + 1, "pack writes blocks of seq_len + 1");
        let kind = if p.str("sampler") == "windows" { SamplerKind::Windows } else { SamplerKind::Blocks };
        if kind == SamplerKind::Windows && !Sampler::windows_fit(&train) {
            return Err(StageError::msg(format!(
                "random windows need seq_len + 1 = {} training tokens that are not padding, and the data has {}: lower `pack.seq_len` or use sampler = \"blocks\"",
                seq_len + 1,
                train.stream_len()
            )));
        }
        let run = Run {
            cfg,
            batch: p.usize("batch_size"),
            accum: p.usize("grad_accum"),
            max_steps: p.int("max_steps") as u64,
            schedule: schedule(p),
            adamw: AdamW {
                lr: 0.0,
                beta1: p.float("beta1") as f32,
                beta2: p.float("beta2") as f32,
                eps: p.float("eps") as f32,
                weight_decay: p.float("weight_decay") as f32,
            },
            grad_clip: p.float("grad_clip"),
            z_loss: p.float("z_loss") as f32,
            eval_interval: p.int("eval_interval") as u64,
            eval_batches: p.usize("eval_batches"),
            log_interval: p.int("log_interval") as u64,
            checkpoint_interval: p.int("checkpoint_interval") as u64,
        };
        let sampler = Sampler::new(kind, train, ctx.seed());
        let outcome = run.train(ctx, sampler, &val, seq_len)?;

        save_model(ctx.out_dir(), &cfg, &outcome.state.params, meta.eot_id)?;
        std::fs::copy(artifact.path(TOKENIZER), ctx.out(TOKENIZER)).map_err(|e| fail("copying tokenizer.json")(&e))?;
        meta.write(ctx.out_dir())?;
        let mut lines = Vec::new();
        for line in &outcome.state.progress.log {
            writeln!(lines, "{line}").expect("writing to memory");
        }
        std::fs::write(ctx.out(METRICS_FILE), lines).map_err(|e| fail("writing metrics.jsonl")(&e))?;

        let tokens = outcome.state.progress.step * (run.batch * run.accum * seq_len) as u64;
        let mut metrics = Metrics::from([
            ("steps".into(), json!(outcome.state.progress.step)),
            ("train_loss".into(), json!(round(outcome.last_loss, 4))),
            ("val_loss".into(), json!(round(outcome.val_loss, 4))),
            ("parameters".into(), json!(outcome.state.params.num_elements())),
            ("tokens".into(), json!(tokens)),
            ("tokens_per_s".into(), json!(round(outcome.tokens_per_s, 0))),
        ]);
        if let Some(step) = outcome.resumed_from {
            metrics.insert("resumed_from_step".into(), json!(step));
        }
        Ok(metrics)
    }
}

/// The numbers of one training run.
struct Run {
    cfg: ModelConfig,
    batch: usize,
    accum: usize,
    max_steps: u64,
    schedule: Schedule,
    adamw: AdamW,
    grad_clip: f64,
    z_loss: f32,
    eval_interval: u64,
    eval_batches: usize,
    log_interval: u64,
    checkpoint_interval: u64,
}

struct Outcome {
    state: TrainState,
    last_loss: f64,
    val_loss: f64,
    tokens_per_s: f64,
    resumed_from: Option<u64>,
}

impl Run {
    fn train(&self, ctx: &StageCtx<'_>, mut sampler: Sampler, val: &Blocks, t: usize) -> Result<Outcome, StageError> {
        let fresh = self.cfg.init(ctx.seed());
        let resumed = TrainState::load(ctx.work_dir(), &fresh)?;
        let resumed_from = resumed.as_ref().map(|s| s.progress.step);
        let mut state = resumed.unwrap_or_else(|| TrainState {
            opt: AdamWState::new(&fresh),
            progress: Progress { step: 0, data: sampler.start(), elapsed: 0.0, log: Vec::new() },
            params: fresh,
        });
        let model = Model::new(self.cfg, &state.params);
        let mut grads = state.params.zeros_like();
        let mut acts = Activations::new(&self.cfg, self.batch, t);
        let val_batch = self.batch.min(val.rows()).max(1);
        let mut val_acts = Activations::new(&self.cfg, val_batch, t);
        let rows = self.batch * t;
        let (mut ids, mut targets) = (vec![0u32; rows], vec![0u32; rows]);

        let progress = ctx.progress();
        progress.set_length(self.max_steps, "steps");
        progress.set_position(state.progress.step);
        let started = Instant::now();
        let elapsed_before = state.progress.elapsed;
        let (mut last_loss, mut val_loss) = (f64::NAN, f64::NAN);
        let mut window = (Instant::now(), 0u64);
        let tokens_per_step = (rows * self.accum) as u64;

        while state.progress.step < self.max_steps {
            if ctx.check_cancelled().is_err() {
                state.progress.elapsed = elapsed_before + started.elapsed().as_secs_f64();
                state.save(ctx.work_dir())?;
                return Err(StageError::Interrupted);
            }
            let step = state.progress.step;
            let lr = self.schedule.lr(step);
            let cfg = StepConfig {
                accum: self.accum,
                adamw: AdamW { lr: lr as f32, ..self.adamw },
                grad_clip: self.grad_clip,
                z_loss: self.z_loss,
            };
            let data = &mut state.progress.data;
            let outcome = train_step(
                &model,
                &mut state.params,
                &mut state.opt,
                &mut grads,
                &mut acts,
                &mut ids,
                &mut targets,
                cfg,
                |ids, targets| sampler.fill(data, ids, targets),
            );
            let (loss, norm) = (outcome.loss, outcome.grad_norm);
            if !outcome.finite() {
                return Err(StageError::msg(format!(
                    "training diverged at step {}: loss {loss}, gradient norm {norm} (lr {lr:.3e}); \
                     lower `lr`, raise `warmup_steps` or set `grad_clip`",
                    step + 1
                )));
            }
            state.progress.step += 1;
            let step = state.progress.step;
            last_loss = loss;
            window.1 += tokens_per_step;

            if step.is_multiple_of(self.log_interval) || step == self.max_steps {
                let secs = window.0.elapsed().as_secs_f64();
                state.progress.log.push(json!({
                    "step": step,
                    "loss": round(loss, 5),
                    "lr": lr,
                    "grad_norm": round(norm, 5),
                    "tokens_per_s": round(window.1 as f64 / secs.max(1e-9), 0),
                    "elapsed_s": round(elapsed_before + started.elapsed().as_secs_f64(), 3),
                }));
                window = (Instant::now(), 0);
            }
            let eval_now =
                step == self.max_steps || (self.eval_interval > 0 && step.is_multiple_of(self.eval_interval));
            if eval_now {
                let batches = Some(self.eval_batches);
                val_loss = mean_loss(&model, &state.params, val, &mut val_acts, batches, |_| Ok(()))?.mean;
                state.progress.log.push(json!({ "step": step, "val_loss": round(val_loss, 5) }));
            }
            progress.set_position(step);
            let val_note = if val_loss.is_nan() { String::new() } else { format!(" val {val_loss:.4}") };
            progress.set_message(&format!("loss {loss:.4}{val_note}"));
            if step.is_multiple_of(self.checkpoint_interval) && step < self.max_steps {
                state.progress.elapsed = elapsed_before + started.elapsed().as_secs_f64();
                state.save(ctx.work_dir())?;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let trained = state.progress.step - resumed_from.unwrap_or(0);
        Ok(Outcome {
            last_loss,
            val_loss,
            tokens_per_s: (trained * tokens_per_step) as f64 / seconds.max(1e-9),
            resumed_from,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::model::Arch;

    #[test]
    fn schedules_come_from_the_parameters() {
        let params = |pairs: &[(&str, engine::ParamValue)]| Params::from_defaults(PARAMS, pairs);
        use engine::ParamValue::{Int, Str};
        let cos = schedule(&params(&[]));
        assert_eq!(cos, Schedule::Cosine { lr: 1e-3, min_lr: 1e-4, warmup: 100, decay_end: 2000 });
        let wsd = schedule(&params(&[("schedule", Str("wsd".into())), ("max_steps", Int(1000))]));
        assert_eq!(wsd, Schedule::Wsd { lr: 1e-3, min_lr: 1e-4, warmup: 100, decay_start: 800, decay_end: 1000 });
        let cfg = model_config(&params(&[("arch", Str("llama".into())), ("n_kv_head", Int(1))]), 65, 64);
        assert_eq!((cfg.arch, cfg.n_kv_head, cfg.block_size, cfg.vocab_size), (Arch::Llama, 1, 64, 65));
    }
}
