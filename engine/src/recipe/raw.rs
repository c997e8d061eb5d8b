//! The recipe exactly as written: serde structs over TOML with a span on every value a later
//! check may reject. Nothing here knows stage kinds; `resolve` does the checking.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub recipe: Spanned<RawHeader>,
    #[serde(default)]
    pub stages: BTreeMap<Spanned<String>, Spanned<RawStage>>,
    /// Resources for every stage under an executor other than the local one.
    #[serde(default)]
    pub executor: Option<RawStage>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeader {
    pub name: Spanned<String>,
    #[serde(default)]
    pub seed: Option<Spanned<i64>>,
    #[serde(default)]
    pub description: Option<String>,
    /// Another recipe whose stages this one takes, relative to this file's folder.
    #[serde(default)]
    pub extends: Option<Spanned<String>>,
}

/// One `[stages.NAME]` table: `kind` and the kind's keys, each with its span.
pub type RawStage = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

pub fn parse(text: &str) -> Result<RawRecipe, toml::de::Error> {
    toml::from_str(text)
}
