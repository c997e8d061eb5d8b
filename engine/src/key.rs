//! Cache keys: the preimage (what a stage's output depends on) and its blake3 digest, plus the
//! typed reason a stage must run, found by diffing the old preimage against the new one.

use std::collections::BTreeMap;
use std::fmt;

use cache::ContentHash;
use serde::{Deserialize, Serialize};

use crate::recipe::ResolvedStage;

/// Bumped when the key's encoding changes; every artifact then reruns.
pub const KEY_FORMAT: &str = "tinygpt-key/1";

/// Everything a stage's output depends on. Stored in run records and manifests so that
/// `plan` can say which field changed.
///
/// Never in here: absolute paths, mtimes, clock time, host names, thread counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preimage {
    pub format: String,
    pub kind: String,
    pub version: u32,
    /// Canonical text of every hashed parameter, by name.
    pub params: BTreeMap<String, String>,
    /// Present only for kinds whose output depends on the seed.
    pub seed: Option<u64>,
    pub inputs: BTreeMap<String, InputDigest>,
}

/// One input slot's digest: a raw file's bytes, or an upstream artifact's content digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputDigest {
    pub digest: ContentHash,
    /// Where it came from, for messages only: not part of the key, so moving a file keeps
    /// the cache valid.
    pub from: String,
}

impl Preimage {
    pub fn new(stage: &ResolvedStage, inputs: BTreeMap<String, InputDigest>) -> Self {
        let spec = stage.kind.params();
        let params = stage
            .params
            .iter()
            .filter(|(name, value)| spec.iter().any(|p| p.name == *name && p.in_key(value)))
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Preimage {
            format: KEY_FORMAT.to_string(),
            kind: stage.kind.kind().to_string(),
            version: stage.kind.version(),
            params,
            seed: stage.kind.uses_seed().then_some(stage.seed),
            inputs,
        }
    }

    /// The key of this preimage without the named parameters: shared by runs that differ only
    /// in them ([`crate::Stage::run_length_params`]). `None` when there are none to leave out.
    pub fn family_key(&self, without: &[&str]) -> Option<ContentHash> {
        if without.is_empty() {
            return None;
        }
        let mut family = self.clone();
        family.format = format!("{KEY_FORMAT}/family");
        family.params.retain(|name, _| !without.contains(&name.as_str()));
        Some(family.key())
    }

    /// blake3 over a length-prefixed encoding of every field but the inputs' `from`.
    pub fn key(&self) -> ContentHash {
        let mut h = blake3::Hasher::new();
        let mut put = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        put(self.format.as_bytes());
        put(self.kind.as_bytes());
        put(&self.version.to_le_bytes());
        put(&(self.params.len() as u64).to_le_bytes());
        for (name, value) in &self.params {
            put(name.as_bytes());
            put(value.as_bytes());
        }
        match self.seed {
            Some(seed) => put(&seed.to_le_bytes()),
            None => put(b""),
        }
        put(&(self.inputs.len() as u64).to_le_bytes());
        for (slot, input) in &self.inputs {
            put(slot.as_bytes());
            put(input.digest.as_bytes());
        }
        ContentHash::from_hasher(&h)
    }
}

/// Why a stage must run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum DirtyReason {
    NeverRun,
    ConfigChanged {
        key: String,
        old: String,
        new: String,
    },
    InputChanged {
        slot: String,
        from: String,
    },
    /// An upstream stage runs first; whether this one reruns depends on its output bytes.
    UpstreamRuns {
        slot: String,
        stage: String,
    },
    CodeVersionChanged {
        old: u32,
        new: u32,
    },
    KindChanged {
        old: String,
        new: String,
    },
    ArtifactMissing,
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyReason::NeverRun => write!(f, "new stage"),
            DirtyReason::ConfigChanged { key, old, new } => write!(f, "{key} changed ({old} -> {new})"),
            DirtyReason::InputChanged { slot, from } => write!(f, "input `{slot}` changed ({from})"),
            DirtyReason::UpstreamRuns { slot, stage } => write!(f, "input `{slot}` is rebuilt first (stage `{stage}`)"),
            DirtyReason::CodeVersionChanged { old, new } => {
                write!(f, "implementation version changed ({old} -> {new})")
            }
            DirtyReason::KindChanged { old, new } => write!(f, "kind changed ({old} -> {new})"),
            DirtyReason::ArtifactMissing => write!(f, "artifact missing"),
        }
    }
}

/// What differs between the preimage of the last build and the current one.
pub fn diff(old: &Preimage, new: &Preimage) -> Vec<DirtyReason> {
    if old.key() == new.key() {
        return vec![DirtyReason::ArtifactMissing];
    }
    let mut reasons = Vec::new();
    if old.kind != new.kind {
        reasons.push(DirtyReason::KindChanged { old: old.kind.clone(), new: new.kind.clone() });
    }
    if old.version != new.version || old.format != new.format {
        reasons.push(DirtyReason::CodeVersionChanged { old: old.version, new: new.version });
    }
    let unset = || "unset".to_string();
    let names: std::collections::BTreeSet<&String> = old.params.keys().chain(new.params.keys()).collect();
    for name in names {
        let (a, b) = (old.params.get(name), new.params.get(name));
        if a != b {
            reasons.push(DirtyReason::ConfigChanged {
                key: name.clone(),
                old: a.cloned().unwrap_or_else(unset),
                new: b.cloned().unwrap_or_else(unset),
            });
        }
    }
    if old.seed != new.seed {
        let show = |s: Option<u64>| s.map_or_else(unset, |s| s.to_string());
        reasons.push(DirtyReason::ConfigChanged { key: "seed".into(), old: show(old.seed), new: show(new.seed) });
    }
    let slots: std::collections::BTreeSet<&String> = old.inputs.keys().chain(new.inputs.keys()).collect();
    for slot in slots {
        match (old.inputs.get(slot), new.inputs.get(slot)) {
            (Some(a), Some(b)) if a.digest == b.digest => {}
            (_, Some(b)) => reasons.push(DirtyReason::InputChanged { slot: slot.clone(), from: b.from.clone() }),
            (Some(_), None) => {
                reasons.push(DirtyReason::InputChanged { slot: slot.clone(), from: "disconnected".into() })
            }
            (None, None) => unreachable!("slot came from one of the maps"),
        }
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preimage() -> Preimage {
        Preimage {
            format: KEY_FORMAT.into(),
            kind: "pack".into(),
            version: 1,
            params: BTreeMap::from([("seq_len".into(), "256".into())]),
            seed: Some(0),
            inputs: BTreeMap::from([(
                "data".into(),
                InputDigest { digest: ContentHash::of_bytes(b"tokens"), from: "stage `tokenize`".into() },
            )]),
        }
    }

    #[test]
    fn the_origin_of_an_input_is_not_part_of_the_key() {
        let mut moved = preimage();
        moved.inputs.get_mut("data").unwrap().from = "file `elsewhere.txt`".into();
        assert_eq!(moved.key(), preimage().key());
    }

    #[test]
    fn every_field_that_matters_changes_the_key_and_is_named() {
        let base = preimage();
        let mut p = base.clone();
        p.params.insert("seq_len".into(), "128".into());
        assert_ne!(p.key(), base.key());
        assert_eq!(diff(&base, &p)[0].to_string(), "seq_len changed (256 -> 128)");

        let mut v = base.clone();
        v.version = 2;
        assert_eq!(diff(&base, &v), vec![DirtyReason::CodeVersionChanged { old: 1, new: 2 }]);

        let mut s = base.clone();
        s.seed = Some(7);
        assert_eq!(diff(&base, &s)[0].to_string(), "seed changed (0 -> 7)");

        let mut i = base.clone();
        i.inputs.get_mut("data").unwrap().digest = ContentHash::of_bytes(b"other");
        assert_eq!(diff(&base, &i)[0].to_string(), "input `data` changed (stage `tokenize`)");

        assert_eq!(diff(&base, &base), vec![DirtyReason::ArtifactMissing]);
    }

    #[test]
    fn runs_that_differ_only_in_their_length_share_a_family() {
        let base = preimage();
        let mut longer = base.clone();
        longer.params.insert("seq_len".into(), "512".into());
        assert_eq!(base.family_key(&["seq_len"]), longer.family_key(&["seq_len"]));
        assert_ne!(base.family_key(&["seq_len"]), Some(base.key()), "a family key is not an artifact key");
        let mut other = longer.clone();
        other.seed = Some(9);
        assert_ne!(base.family_key(&["seq_len"]), other.family_key(&["seq_len"]));
        assert_eq!(base.family_key(&[]), None);
    }
}
