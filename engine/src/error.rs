//! Errors of the engine. Recipe errors carry the source text and a byte span so the binary can
//! point at the offending key; the rest name the stage and the path involved.

use std::ops::Range;
use std::sync::Arc;

/// A recipe file or a `--set` argument: the text a span points into.
#[derive(Debug)]
pub struct Origin {
    /// The recipe path as the user gave it, or `--set` for a command-line override.
    pub name: String,
    pub text: String,
}

/// A problem with the recipe or the command line, found before anything runs.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RecipeError {
    pub message: String,
    pub origin: Option<Arc<Origin>>,
    pub span: Option<Range<usize>>,
    /// The text under the span's underline.
    pub label: String,
    pub help: Option<String>,
}

impl RecipeError {
    pub fn new(message: impl Into<String>) -> Self {
        RecipeError { message: message.into(), origin: None, span: None, label: String::new(), help: None }
    }
    pub fn at(mut self, origin: &Arc<Origin>, span: Range<usize>, label: impl Into<String>) -> Self {
        self.origin = Some(origin.clone());
        self.span = Some(span);
        self.label = label.into();
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    /// 1-based (line, column) of the span's start, if there is one.
    pub fn line_col(&self) -> Option<(usize, usize)> {
        let (origin, span) = (self.origin.as_ref()?, self.span.as_ref()?);
        let before = &origin.text[..span.start.min(origin.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Some((line, col))
    }
}

/// Anything that stops a plan or a run other than a bad recipe.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("cache: {0}")]
    Cache(#[from] cache::CacheError),
    #[error(transparent)]
    Remote(#[from] cache::RemoteError),
    #[error(
        "stage `{stage}` has key {here} here, not {submitted} as when it was submitted: the recipe or its \
         inputs changed since"
    )]
    KeyChanged { stage: String, here: String, submitted: String },
    /// The cancel flag was set during work outside a stage (a transfer with the remote).
    #[error("interrupted")]
    Interrupted,
    #[error("input `{slot}` of stage `{stage}`: {source}")]
    RawInput {
        stage: String,
        slot: String,
        #[source]
        source: cache::CacheError,
    },
}

/// "did you mean `pack`?" for a misspelt name, when one candidate is close enough.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= (c.len().max(name.len()) / 3).max(1))
        .min()
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbouring characters each cost one (`pakc` is one edit from `pack`).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_only_close_names() {
        assert_eq!(did_you_mean("pakc", ["pack", "tokenize"]).as_deref(), Some("did you mean `pack`?"));
        assert_eq!(did_you_mean("zzzz", ["pack", "tokenize"]), None);
    }

    #[test]
    fn line_and_column_are_one_based() {
        let origin = Arc::new(Origin { name: "r.toml".into(), text: "a = 1\nbb = 2\n".into() });
        let err = RecipeError::new("x").at(&origin, 9..10, "here");
        assert_eq!(err.line_col(), Some((2, 4)));
    }
}
