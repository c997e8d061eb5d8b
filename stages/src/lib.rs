//! tinygpt's stage kinds, one module per kind, and the registry that lists them.
//!
//! A new kind is a new module plus one line in [`registry`].

pub mod arrow_io;
pub mod corpus;
pub mod model_io;
pub mod nn;
pub mod pack;

mod text_source;
pub mod tokenize;

use std::sync::Arc;

use engine::{ArtifactType, Registry};

/// Documents of text: JSONL with a `text` field (the `corpus` stage) or raw files.
pub const TEXT: ArtifactType = ArtifactType("text");
/// Token ids per document, a `tokenizer.json` and `meta.json` (the `tokenize` stage).
pub const TOKENS: ArtifactType = ArtifactType("tokens");
/// Fixed-length training blocks split into train and validation (the `pack` stage).
pub const PACKED: ArtifactType = ArtifactType("packed");

/// Every stage kind a recipe may use.
pub fn registry() -> Registry {
    let mut r = Registry::default();
    r.register(Arc::new(corpus::Corpus));
    r.register(Arc::new(tokenize::Tokenize));
    r.register(Arc::new(pack::Pack));
    r
}

/// Turn any displayable error into a stage failure with context.
pub(crate) fn fail(context: impl std::fmt::Display) -> impl FnOnce(&dyn std::error::Error) -> engine::StageError {
    move |e| engine::StageError::chain(context, e)
}
