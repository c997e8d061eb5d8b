//! `teacher`: a frozen model's top-k log-probabilities at every position of a packed dataset,
//! the cached half of knowledge distillation. Students of any size, temperature or divergence
//! train from this artifact without running the teacher again.
//!
//! Output: `train.safetensors` and `val.safetensors`, each with `ids` (U16, or U32 for
//! vocabularies above 65,536) and `logprobs` (F16) of shape (blocks, T, k), highest first, and
//! `lse` (F32, (blocks, T)): each position's log-sum-exp over the whole vocabulary, so the
//! teacher's logits are `logprobs + lse` and the tail mass outside the top k is
//! 1 - sum(exp(logprobs)). Beside them, the packed blocks themselves (`train.arrow`,
//! `val.arrow`), the tokenizer and `meta.json`, so a student needs no other input, and
//! `teacher.json` (top_k, vocabulary, the teacher's shape).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use engine::{Accepts, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use half::f16;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

use crate::arrow_io::{read_blocks, Blocks, TokenMeta};
use crate::model_io::{model_over_data, save_raw_tensors, ModelOverData, TOKENIZER};
use crate::nn::batch::Batch;
use crate::nn::kernels::distill::top_k;
use crate::nn::model::{Activations, Model};
use crate::pack::{TRAIN_FILE, VAL_FILE};
use crate::{fail, round, MODEL, PACKED, TEACHER};

pub struct Teacher;

pub const TRAIN_LOGITS: &str = "train.safetensors";
pub const VAL_LOGITS: &str = "val.safetensors";
pub const TEACHER_FILE: &str = "teacher.json";

const PARAMS: &[ParamSpec] = &[
    ParamSpec::int("top_k", 64, 1, 1 << 20, "log-probabilities kept per position (at most the vocabulary)"),
    ParamSpec::int("batch_size", 16, 1, 1 << 20, "blocks per forward pass").not_hashed(),
];

const INPUTS: &[InputSpec] = &[
    InputSpec { name: "model", accepts: Accepts::Artifact(&[MODEL]), required: true, doc: "the teacher model" },
    InputSpec {
        name: "data",
        accepts: Accepts::Artifact(&[PACKED]),
        required: true,
        doc: "a `pack` stage made with the teacher's tokenizer",
    },
];

impl Stage for Teacher {
    fn kind(&self) -> &'static str {
        "teacher"
    }
    fn version(&self) -> u32 {
        1
    }
    fn about(&self) -> &'static str {
        "a frozen model's top-k log-probabilities over packed data, cached for distillation"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        TEACHER
    }
    /// The packed data's `seq_len`, which the teacher's logits keep.
    fn output_shape(&self, _: &Params, upstream: &BTreeMap<&str, &serde_json::Value>) -> serde_json::Value {
        crate::packed_shape(crate::told(upstream, "data", "seq_len"))
    }
    fn vocabulary(&self) -> engine::Vocabulary {
        engine::Vocabulary::From("model")
    }
    fn same_vocabulary(&self) -> &'static [&'static str] {
        &["model", "data"]
    }
    fn check(&self, _: &Params, _: &BTreeSet<&str>) -> Result<(), ParamProblem> {
        Ok(())
    }

    fn run(&self, ctx: &StageCtx<'_>) -> Result<Metrics, StageError> {
        let ModelOverData { cfg, params, data, .. } = model_over_data(ctx)?;
        let t = TokenMeta::seq_len_within(&data.dir, cfg.block_size, "the teacher's")?;
        let k = ctx.params().usize("top_k");
        if k > cfg.vocab_size {
            return Err(StageError::msg(format!(
                "top_k {k} is larger than the teacher's vocabulary of {}: lower `top_k`",
                cfg.vocab_size
            )));
        }
        let model = Model::new(cfg, &params);
        let (train, val) = (read_blocks(&data.path(TRAIN_FILE))?, read_blocks(&data.path(VAL_FILE))?);
        let batch = ctx.params().usize("batch_size");
        ctx.progress().set_length((train.rows() + val.rows()) as u64, "blocks");
        let mut done = 0;
        let mut splits = Vec::new();
        for (blocks, file) in [(&train, TRAIN_LOGITS), (&val, VAL_LOGITS)] {
            let logits = teacher_logits(&model, &params, blocks, k, batch, |rows| {
                ctx.check_cancelled()?;
                ctx.progress().set_position((done + rows) as u64);
                Ok(())
            })?;
            done += blocks.rows();
            logits.write(&ctx.out(file), cfg.vocab_size)?;
            splits.push(logits);
        }
        for file in [TRAIN_FILE, VAL_FILE, TOKENIZER, TokenMeta::FILE] {
            std::fs::copy(data.path(file), ctx.out(file)).map_err(|e| fail(format!("copying {file}"))(&e))?;
        }
        let about = json!({ "top_k": k, "vocab_size": cfg.vocab_size, "seq_len": t, "teacher": {
            "arch": cfg.arch.name(), "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "parameters": params.num_elements() } });
        let text = serde_json::to_string_pretty(&about).expect("JSON values serialize") + "\n";
        std::fs::write(ctx.out(TEACHER_FILE), text).map_err(|e| fail("writing teacher.json")(&e))?;

        let bytes: u64 = [TRAIN_LOGITS, VAL_LOGITS]
            .iter()
            .map(|f| std::fs::metadata(ctx.out(f)).map(|m| m.len()).unwrap_or(0))
            .sum();
        let positions = splits[0].positions();
        Ok(Metrics::from([
            ("top_k".into(), json!(k)),
            ("positions".into(), json!(positions + splits[1].positions())),
            ("top_k_mass".into(), json!(round(splits[0].mean_top_mass(&train), 4))),
            ("bytes".into(), json!(bytes)),
            (
                "bytes_per_position".into(),
                json!(round(bytes as f64 / (positions + splits[1].positions()).max(1) as f64, 1)),
            ),
        ]))
    }
}

/// A teacher's top-k log-probabilities for every position of a split's blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct TeacherLogits {
    pub k: usize,
    pub t: usize,
    /// (blocks, T, k).
    pub ids: Vec<u32>,
    /// (blocks, T, k), at T = 1.
    pub logprobs: Vec<f16>,
    /// (blocks, T).
    pub lse: Vec<f32>,
}

impl TeacherLogits {
    pub fn positions(&self) -> usize {
        self.lse.len()
    }

    /// Block `r`'s ids and log-probabilities (T * k each), into f32 for the loss.
    pub fn block(&self, r: usize, ids: &mut [u32], logprobs: &mut [f32]) {
        let span = r * self.t * self.k..(r + 1) * self.t * self.k;
        ids.copy_from_slice(&self.ids[span.clone()]);
        for (out, x) in logprobs.iter_mut().zip(&self.logprobs[span]) {
            *out = x.to_f32();
        }
    }

    /// The mean share of probability the top k hold, over the positions whose target is not
    /// padding.
    pub fn mean_top_mass(&self, blocks: &Blocks) -> f64 {
        let counted = blocks.rows() * self.t - blocks.padding.min(blocks.rows() * self.t);
        let sum: f64 =
            self.logprobs.chunks(self.k).take(counted).map(|c| c.iter().map(|x| x.to_f64().exp()).sum::<f64>()).sum();
        sum / counted.max(1) as f64
    }

    fn write(&self, path: &Path, vocab: usize) -> Result<(), StageError> {
        let rows = self.lse.len() / self.t;
        let ids: Vec<u8> = if vocab <= 1 << 16 {
            self.ids.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect()
        } else {
            self.ids.iter().flat_map(|i| i.to_le_bytes()).collect()
        };
        let id_type = if vocab <= 1 << 16 { Dtype::U16 } else { Dtype::U32 };
        let logprobs: Vec<u8> = self.logprobs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let lse: Vec<u8> = self.lse.iter().flat_map(|x| x.to_le_bytes()).collect();
        let shape = vec![rows, self.t, self.k];
        let tensors = [
            ("ids", id_type, shape.clone(), &ids[..]),
            ("logprobs", Dtype::F16, shape, &logprobs[..]),
            ("lse", Dtype::F32, vec![rows, self.t], &lse[..]),
        ];
        save_raw_tensors(path, "tinygpt-teacher", &tensors)
    }

    /// Read a split that [`Teacher`] wrote.
    pub fn read(path: &Path) -> Result<Self, StageError> {
        let bytes = std::fs::read(path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
        let bad = |what: String| StageError::msg(format!("`{}`: {what}", path.display()));
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let tensor = |name: &str| file.tensor(name).map_err(|e| bad(format!("tensor `{name}`: {e}")));
        let (ids, logprobs, lse) = (tensor("ids")?, tensor("logprobs")?, tensor("lse")?);
        let shape = logprobs.shape().to_vec();
        if shape.len() != 3 || ids.shape() != shape || lse.shape() != &shape[..2] || logprobs.dtype() != Dtype::F16 {
            return Err(bad("the tensors' shapes or types are not a teacher's".into()));
        }
        let ids = match ids.dtype() {
            Dtype::U16 => ids.data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect(),
            Dtype::U32 => ids.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            other => return Err(bad(format!("ids are {other:?}, expected U16 or U32"))),
        };
        Ok(TeacherLogits {
            t: shape[1],
            k: shape[2],
            ids,
            logprobs: logprobs.data().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect(),
            lse: lse.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        })
    }
}

/// The top-k log-probabilities of `model` at every position of `blocks`, in forward passes of
/// `batch` blocks; `after_batch` gets the blocks done (for progress; an error stops the work).
pub fn teacher_logits(
    model: &Model,
    params: &crate::nn::params::ParamMap,
    blocks: &Blocks,
    k: usize,
    batch: usize,
    mut after_batch: impl FnMut(usize) -> Result<(), StageError>,
) -> Result<TeacherLogits, StageError> {
    let (t, v) = (blocks.width - 1, model.cfg.vocab_size);
    let rows = blocks.rows();
    let mut out = TeacherLogits {
        k,
        t,
        ids: vec![0; rows * t * k],
        logprobs: vec![f16::ZERO; rows * t * k],
        lse: vec![0.0; rows * t],
    };
    let mut done = 0;
    while done < rows {
        let chunk = batch.min(rows - done);
        let mut acts = Activations::inference(model, chunk, t);
        let span = done * (t + 1)..(done + chunk) * (t + 1);
        let mut ids = Vec::with_capacity(chunk * t);
        for row in blocks.tokens[span].chunks(t + 1) {
            ids.extend_from_slice(&row[..t]);
        }
        model.forward(params, &Batch::whole_rows(t, &ids, &vec![0; ids.len()]), &mut acts);
        let positions = done * t..(done + chunk) * t;
        let out_ids = &mut out.ids[positions.start * k..positions.end * k];
        let out_lp = &mut out.logprobs[positions.start * k..positions.end * k];
        let out_lse = &mut out.lse[positions];
        acts.logits
            .par_chunks(v)
            .zip(out_ids.par_chunks_mut(k).zip(out_lp.par_chunks_mut(k)).zip(out_lse.par_iter_mut()))
            .for_each_init(
                || (Vec::new(), vec![0.0f32; k]),
                |(order, lp), (logits, ((ids, lp16), lse))| {
                    *lse = top_k(logits, k, order, ids, lp) as f32;
                    for (o, x) in lp16.iter_mut().zip(lp.iter()) {
                        *o = f16::from_f32(*x);
                    }
                },
            );
        done += chunk;
        after_batch(done)?;
    }
    Ok(out)
}
