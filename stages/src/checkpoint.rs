//! Training checkpoints: everything a run needs to continue as if it had never stopped.
//!
//! One safetensors file in the stage's work directory holds the parameters (`param.NAME`), both
//! AdamW moments (`adam_m.NAME`, `adam_v.NAME`) and, in its metadata, the step, the data
//! position, the elapsed time and the metrics logged so far. It is written to a temporary name
//! and renamed, so a kill at any moment leaves either the previous checkpoint or the new one.

use std::path::Path;

use engine::StageError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fail;
use crate::model_io::{load_safetensors_with, save_safetensors_with};
use crate::nn::optim::AdamWState;
use crate::nn::params::{ParamMap, Tensor};

pub const FILE: &str = "checkpoint.safetensors";

/// Where the data stream stands: a sampler needs one or both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPos {
    /// The random-window generator's state.
    pub rng: u64,
    /// Sequences consumed so far (blocks in their seeded epoch order).
    pub consumed: u64,
}

/// The scalar part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    pub data: DataPos,
    /// Seconds of training before this run (for the metrics' `elapsed`).
    pub elapsed: f64,
    /// Metrics lines logged so far.
    pub log: Vec<Value>,
}

/// A resumable training state.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    pub params: ParamMap,
    pub opt: AdamWState,
    pub progress: Progress,
}

const PARAM: &str = "param.";
const M: &str = "adam_m.";
const V: &str = "adam_v.";

impl TrainState {
    /// Write the state. A frozen parameter (its moments are empty) never changes, so it is
    /// left out: [`TrainState::load`] takes it from the run's start.
    pub fn save(&self, dir: &Path) -> Result<(), StageError> {
        let mut all = ParamMap::default();
        for ((name, t), (_, m)) in self.params.iter().zip(self.opt.m.iter()) {
            if !m.data().is_empty() {
                all.insert(format!("{PARAM}{name}"), t.clone());
            }
        }
        for (prefix, map) in [(M, &self.opt.m), (V, &self.opt.v)] {
            for (name, t) in map.iter() {
                all.insert(format!("{prefix}{name}"), t.clone());
            }
        }
        let progress = serde_json::to_string(&self.progress).expect("progress serializes");
        let meta = [("tinygpt.progress", progress), ("tinygpt.adam_step", self.opt.step.to_string())];
        let tmp = dir.join(format!("{FILE}.tmp"));
        save_safetensors_with(&tmp, &all, &meta)?;
        let path = dir.join(FILE);
        std::fs::rename(&tmp, &path).map_err(|e| fail(format!("renaming `{}`", path.display()))(&e))
    }

    /// The checkpoint in `dir`, if there is one. `params` (the run's start) and `moments` give
    /// the names, order and shapes the run expects of the parameters and of the optimizer
    /// moments (empty for frozen tensors, whose values come from `params`); a checkpoint that
    /// does not match them is an error.
    pub fn load(dir: &Path, params: &ParamMap, moments: &ParamMap) -> Result<Option<TrainState>, StageError> {
        let path = dir.join(FILE);
        if !path.exists() {
            return Ok(None);
        }
        let (mut all, meta) = load_safetensors_with(&path)?;
        let bad =
            |what: String| StageError::msg(format!("checkpoint `{}` {what}; delete it to start over", path.display()));
        let progress: Progress = meta
            .get("tinygpt.progress")
            .and_then(|p| serde_json::from_str(p).ok())
            .ok_or_else(|| bad("has no readable progress".into()))?;
        let adam_step: u32 = meta
            .get("tinygpt.adam_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("has no optimizer step".into()))?;
        let mut take = |prefix: &str, like: &ParamMap| -> Result<ParamMap, StageError> {
            let mut out = ParamMap::default();
            for ((name, t), (_, m)) in like.iter().zip(moments.iter()) {
                if prefix == PARAM && m.data().is_empty() {
                    out.insert(name, t.clone());
                    continue;
                }
                let key = format!("{prefix}{name}");
                if !all.contains(&key) || all.tensor(&key).shape() != t.shape() {
                    return Err(bad(format!("does not match this model at `{key}`")));
                }
                out.insert(name, std::mem::replace(all.tensor_mut(&key), Tensor::zeros(&[0])));
            }
            Ok(out)
        };
        let params = take(PARAM, params)?;
        let m = take(M, moments)?;
        let v = take(V, moments)?;
        Ok(Some(TrainState { params, opt: AdamWState { m, v, step: adam_step }, progress }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::model::ModelConfig;

    #[test]
    fn a_checkpoint_round_trips_exactly() {
        let cfg = ModelConfig::llama(13, 6, 1, 4, 2, 16);
        let params = cfg.init(3);
        let mut opt = AdamWState::new(&params);
        opt.m.get_mut("model.norm.weight")[0] = 0.25;
        opt.v.get_mut("lm_head.weight")[1] = f32::MIN_POSITIVE;
        opt.step = 7;
        let progress = Progress {
            step: 7,
            data: DataPos { rng: u64::MAX - 3, consumed: 84 },
            elapsed: 1.5,
            log: vec![serde_json::json!({"step": 5, "loss": 2.5})],
        };
        let state = TrainState { params: params.clone(), opt, progress };
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TrainState::load(dir.path(), &params, &params).unwrap(), None);
        state.save(dir.path()).unwrap();
        assert_eq!(TrainState::load(dir.path(), &params, &params).unwrap(), Some(state));
        assert!(!dir.path().join(format!("{FILE}.tmp")).exists());

        let other = ModelConfig::llama(13, 6, 2, 4, 2, 16).init(3);
        let err = TrainState::load(dir.path(), &other, &other).unwrap_err().to_string();
        assert!(err.contains("does not match this model at `param.model.layers.1"), "{err}");
    }

    #[test]
    fn frozen_parameters_stay_out_of_the_checkpoint_and_come_back_from_the_start() {
        let start = ModelConfig::llama(13, 6, 1, 4, 2, 16).init(3);
        let trains = |name: &str| name == "model.norm.weight";
        let mut state = TrainState {
            opt: AdamWState::new(&start.zeros_like_trainable(trains)),
            params: start.clone(),
            progress: Progress { step: 2, data: DataPos::default(), elapsed: 0.0, log: vec![] },
        };
        state.params.get_mut("model.norm.weight")[0] = 7.0;
        let dir = tempfile::tempdir().unwrap();
        state.save(dir.path()).unwrap();
        let (file, _) = load_safetensors_with(&dir.path().join(FILE)).unwrap();
        assert!(file.contains("param.model.norm.weight") && !file.contains("param.lm_head.weight"));
        let moments = start.zeros_like_trainable(trains);
        assert_eq!(TrainState::load(dir.path(), &start, &moments).unwrap(), Some(state));
    }
}
