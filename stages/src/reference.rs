//! `reference`: a frozen reference model's summed log-probability of every response of a
//! `preferences` stage (chosen and rejected, given the prompt), with its token count, the
//! cached half of DPO and IPO. Changing beta or the loss reruns `align`, never this.
//!
//! Output: `train.safetensors` and `val.safetensors`, each with `logps` (F64, one per sequence:
//! pair i's chosen at 2i, its rejected at 2i + 1), `tokens` (U32) and `kl_logps` (F64: each
//! sequence's prompt with another's response, KTO's KL estimate; see
//! [`crate::preferences::mismatched`]), and `reference.json` naming the data it scored by the
//! digests of its files.

use std::collections::BTreeSet;
use std::path::Path;

use engine::{Accepts, InputSpec, Metrics, ParamProblem, ParamSpec, Params, Stage, StageCtx, StageError};
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

use crate::arrow_io::{read_examples, Examples, TokenMeta};
use crate::example_rows::{Layout, Rows};
use crate::model_io::{model_over_data, save_raw_tensors, ModelOverData};
use crate::nn::batch::Batch;
use crate::nn::model::{Activations, Model};
use crate::nn::params::ParamMap;
use crate::preferences::{mismatched, Labels, LABELS_FILE, TRAIN_FILE, VAL_FILE};
use crate::{fail, round, MODEL, PREFERENCES, REFERENCE};

pub struct Reference;

pub const TRAIN_LOGPS: &str = "train.safetensors";
pub const VAL_LOGPS: &str = "val.safetensors";
pub const REFERENCE_FILE: &str = "reference.json";

const PARAMS: &[ParamSpec] = &[ParamSpec::int("batch_size", 16, 1, 1 << 20, "sequences per forward pass").not_hashed()];

const INPUTS: &[InputSpec] = &[
    InputSpec { name: "model", accepts: Accepts::Artifact(&[MODEL]), required: true, doc: "the reference model" },
    InputSpec {
        name: "data",
        accepts: Accepts::Artifact(&[PREFERENCES]),
        required: true,
        doc: "a `preferences` stage made with the reference's tokenizer",
    },
];

impl Stage for Reference {
    fn kind(&self) -> &'static str {
        "reference"
    }
    fn version(&self) -> u32 {
        2 // 2: kl_logps
    }
    fn about(&self) -> &'static str {
        "a frozen reference model's log-probabilities of every chosen and rejected response, cached for DPO and IPO"
    }
    fn params(&self) -> &'static [ParamSpec] {
        PARAMS
    }
    fn inputs(&self) -> &'static [InputSpec] {
        INPUTS
    }
    fn output(&self) -> engine::ArtifactType {
        REFERENCE
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
        let ModelOverData { cfg, params, eot, data, .. } = model_over_data(ctx)?;
        let model = Model::new(cfg, &params);
        let batch = ctx.params().usize("batch_size");
        let train = PrefSplit::read(&data.dir, TRAIN_FILE, eot, cfg.block_size)?;
        let val = PrefSplit::read(&data.dir, VAL_FILE, eot, cfg.block_size)?;
        ctx.progress().set_length(2 * (train.rows.rows + val.rows.rows) as u64, "sequences");
        let mut scored = Vec::new();
        let mut done = 0;
        for (split, file) in [(&train, TRAIN_LOGPS), (&val, VAL_LOGPS)] {
            let mut logps = SeqLogps::default();
            for (rows, kl) in [(&split.rows, false), (&split.kl, true)] {
                let s = sequence_logps(&model, &params, rows, batch, |n| {
                    ctx.check_cancelled()?;
                    ctx.progress().set_position((done + n) as u64);
                    Ok(())
                })?;
                done += rows.rows;
                if kl {
                    logps.kl_logps = s.logps;
                } else {
                    logps = SeqLogps { kl_logps: Vec::new(), ..s };
                }
            }
            logps.write(&ctx.out(file))?;
            scored.push(logps);
        }
        let digest = |f: &str| data.file_digest(f).map(|d| d.to_string());
        let about = json!({ "data": { TRAIN_FILE: digest(TRAIN_FILE), VAL_FILE: digest(VAL_FILE) } });
        let text = serde_json::to_string_pretty(&about).expect("JSON values serialize") + "\n";
        std::fs::write(ctx.out(REFERENCE_FILE), text).map_err(|e| fail("writing reference.json")(&e))?;
        // The mean log-probability of the desirable (chosen) and undesirable responses.
        let mean = |label: u8| {
            let picked: Vec<f64> =
                scored[0].logps.iter().zip(&train.labels).filter(|(_, l)| **l == label).map(|(x, _)| *x).collect();
            picked.iter().sum::<f64>() / picked.len().max(1) as f64
        };
        Ok(Metrics::from([
            ("sequences".into(), json!(scored[0].logps.len() + scored[1].logps.len())),
            ("mean_logp_chosen".into(), json!(round(mean(1), 4))),
            ("mean_logp_rejected".into(), json!(round(mean(0), 4))),
        ]))
    }
}

/// The train and validation log-probabilities of a reference artifact, refused unless it
/// scored exactly the preference data `data` (by the digests of its files).
pub fn load_reference(
    (reference, reference_stage): (&engine::cache::Artifact, &str),
    (data, data_stage): (&engine::cache::Artifact, &str),
) -> Result<(SeqLogps, SeqLogps), StageError> {
    let about: serde_json::Value = std::fs::read(reference.path(REFERENCE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for file in [TRAIN_FILE, VAL_FILE] {
        if about["data"][file].as_str() != data.file_digest(file).map(|d| d.to_string()).as_deref() {
            return Err(StageError::msg(format!(
                "the reference of stage `{reference_stage}` scored other preference data than stage `{data_stage}`: \
                 wire `{reference_stage}.data` to `{data_stage}`"
            )));
        }
    }
    Ok((SeqLogps::read(&reference.path(TRAIN_LOGPS))?, SeqLogps::read(&reference.path(VAL_LOGPS))?))
}

/// A `preferences` split as the model reads it.
pub struct PrefSplit {
    /// One sequence per row (for pairs: row 2i pair i's chosen, 2i + 1 its rejected), targets on
    /// the responses only.
    pub rows: Rows,
    /// Row i: sequence i's prompt with another sequence's response ([`mismatched`]).
    pub kl: Rows,
    /// Each sequence's label: 1 desirable (a chosen response), 0 undesirable.
    pub labels: Vec<u8>,
    pub paired: bool,
}

impl PrefSplit {
    pub fn read(dir: &Path, file: &str, eot: u32, block_size: usize) -> Result<PrefSplit, StageError> {
        let examples = read_examples(&dir.join(file))?;
        let t = TokenMeta::read(dir)?.seq_len.unwrap_or(block_size).min(block_size).max(1);
        let labels = Labels::read(dir)?;
        let split_labels = if file == VAL_FILE { labels.val } else { labels.train };
        if split_labels.len() != examples.len() {
            return Err(StageError::msg(format!(
                "`{}`: {} labels for {} sequences",
                dir.join(LABELS_FILE).display(),
                split_labels.len(),
                examples.len()
            )));
        }
        let kl = mismatched(&examples, labels.paired, t + 1);
        Ok(PrefSplit {
            rows: one_per_row(&examples, t, eot, &dir.join(file))?,
            kl: one_per_row(&kl, t, eot, &dir.join(file))?,
            labels: split_labels,
            paired: labels.paired,
        })
    }
}

/// Sequences as rows of `t` positions, one each.
fn one_per_row(examples: &Examples, t: usize, eot: u32, file: &Path) -> Result<Rows, StageError> {
    let layout = Layout { t, packing: false, drop_overlong: false, train_on_prompt: false, eot };
    let (rows, stats) = layout.pack(examples);
    if rows.rows != examples.len() || stats.truncated > 0 {
        return Err(StageError::msg(format!(
            "`{}`: {} sequences make {} rows of {t} ({} cut): the preference data does not fit the model's block size",
            file.display(),
            examples.len(),
            rows.rows,
            stats.truncated
        )));
    }
    Ok(rows)
}

/// Each sequence's summed log-probability of its targets and how many there are; from a
/// `reference` stage, also the log-probabilities of the mismatched sequences.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeqLogps {
    pub logps: Vec<f64>,
    pub tokens: Vec<u32>,
    pub kl_logps: Vec<f64>,
}

impl SeqLogps {
    fn write(&self, path: &Path) -> Result<(), StageError> {
        let logps: Vec<u8> = self.logps.iter().flat_map(|x| x.to_le_bytes()).collect();
        let tokens: Vec<u8> = self.tokens.iter().flat_map(|x| x.to_le_bytes()).collect();
        let kl: Vec<u8> = self.kl_logps.iter().flat_map(|x| x.to_le_bytes()).collect();
        let n = vec![self.logps.len()];
        let tensors = [
            ("logps", Dtype::F64, n.clone(), &logps[..]),
            ("tokens", Dtype::U32, n.clone(), &tokens[..]),
            ("kl_logps", Dtype::F64, n, &kl[..]),
        ];
        save_raw_tensors(path, "tinygpt-reference", &tensors)
    }

    /// Read a split that [`Reference`] wrote.
    pub fn read(path: &Path) -> Result<Self, StageError> {
        let bytes = std::fs::read(path).map_err(|e| fail(format!("reading `{}`", path.display()))(&e))?;
        let bad = |what: String| StageError::msg(format!("`{}`: {what}", path.display()));
        let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let tensor = |name: &str, dtype: Dtype| {
            let t = file.tensor(name).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if t.dtype() != dtype {
                return Err(bad(format!("tensor `{name}` is {:?}, expected {dtype:?}", t.dtype())));
            }
            Ok(t.data().to_vec())
        };
        let f64s = |bytes: Vec<u8>| -> Vec<f64> {
            bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
        };
        let tokens = tensor("tokens", Dtype::U32)?;
        Ok(SeqLogps {
            logps: f64s(tensor("logps", Dtype::F64)?),
            tokens: tokens.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
            kl_logps: f64s(tensor("kl_logps", Dtype::F64)?),
        })
    }
}

/// The summed log-probability of every row's targets under `model`, forward only, in batches
/// of `batch` rows; `after_batch` gets the rows done (an error from it stops the work). Sums run
/// in f64 in token order, so they do not depend on the thread count.
pub fn sequence_logps(
    model: &Model,
    params: &ParamMap,
    rows: &Rows,
    batch: usize,
    mut after_batch: impl FnMut(usize) -> Result<(), StageError>,
) -> Result<SeqLogps, StageError> {
    let t = rows.t;
    let mut out =
        SeqLogps { logps: Vec::with_capacity(rows.rows), tokens: Vec::with_capacity(rows.rows), ..SeqLogps::default() };
    let mut done = 0;
    let mut buffers: Option<(Activations, Batch)> = None;
    while done < rows.rows {
        let chunk = batch.min(rows.rows - done);
        if buffers.as_ref().is_none_or(|(_, b)| b.batch() != chunk) {
            buffers = Some((Activations::inference(model, chunk, t), Batch::new(chunk, t)));
        }
        let (acts, b) = buffers.as_mut().expect("made above");
        for i in 0..chunk {
            rows.copy_row(done + i, b, i);
        }
        model.target_losses(params, b, acts);
        for (losses, targets) in acts.row_losses().chunks(t).zip(b.targets.chunks(t)).take(chunk) {
            out.logps.push(-losses.iter().sum::<f64>());
            out.tokens.push(targets.iter().filter(|x| **x != crate::nn::batch::IGNORE).count() as u32);
        }
        done += chunk;
        after_batch(done)?;
    }
    Ok(out)
}
