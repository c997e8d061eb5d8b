//! `--set STAGE.KEY=VALUE` arguments. Each keeps its own text as an [`Origin`] so that an
//! error in an override points into the argument the way a recipe error points into the file.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Origin, RecipeError};

#[derive(Debug, Clone)]
pub struct Override {
    pub stage: String,
    pub key: String,
    pub value: toml::Value,
    pub origin: Arc<Origin>,
    pub stage_span: Range<usize>,
    pub key_span: Range<usize>,
    pub value_span: Range<usize>,
}

/// Parse one override. VALUE is read as a TOML value (`64`, `3e-4`, `true`, `["a", "b"]`,
/// `"quoted"`); anything that is not valid TOML is taken as a plain string, so paths and
/// names need no quotes: `--set tokenize.input=data/shakespeare.txt`.
pub fn parse(arg: &str) -> Result<Override, RecipeError> {
    let origin = Arc::new(Origin { name: "--set".into(), text: arg.to_string() });
    let whole = 0..arg.len();
    // A sweep member's name holds `=` and `.` inside its brackets: `align[beta=0.1].lr=3e-4`.
    let bracket_end = match (arg.find('['), arg.find('=')) {
        (Some(open), Some(eq)) if open < eq => match arg[open..].find(']') {
            Some(close) => open + close + 1,
            None => {
                return Err(RecipeError::new(format!("`--set {arg}` opens a `[` it does not close")).at(
                    &origin,
                    open..arg.len(),
                    "missing `]`",
                ));
            }
        },
        _ => 0,
    };
    let Some(eq) = arg[bracket_end..].find('=').map(|i| bracket_end + i) else {
        return Err(RecipeError::new(format!("`--set {arg}` is not of the form STAGE.KEY=VALUE")).at(
            &origin,
            whole,
            "missing `=`",
        ));
    };
    let (lhs, raw_value) = (&arg[..eq], &arg[eq + 1..]);
    let Some((stage, key)) =
        lhs[bracket_end..].find('.').map(|i| (&lhs[..bracket_end + i], &lhs[bracket_end + i + 1..]))
    else {
        return Err(RecipeError::new(format!("`--set {arg}` does not name a stage and a key"))
            .at(&origin, 0..lhs.len(), "expected STAGE.KEY")
            .help("for example `--set pack.seq_len=128`"));
    };
    if stage.is_empty() || key.is_empty() {
        return Err(RecipeError::new(format!("`--set {arg}` has an empty stage or key name")).at(
            &origin,
            0..lhs.len(),
            "expected STAGE.KEY",
        ));
    }
    let value_start = lhs.len() + 1;
    Ok(Override {
        stage: stage.to_string(),
        key: key.to_string(),
        value: parse_value(raw_value),
        stage_span: 0..stage.len(),
        key_span: stage.len() + 1..lhs.len(),
        value_span: value_start..arg.len().max(value_start),
        origin,
    })
}

fn parse_value(text: &str) -> toml::Value {
    if !text.contains('\n') {
        if let Ok(mut table) = format!("v = {text}").parse::<toml::Table>() {
            if let Some(v) = table.remove("v") {
                return v;
            }
        }
    }
    toml::Value::String(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_typed_like_toml_and_bare_words_are_strings() {
        assert_eq!(parse("pack.seq_len=64").unwrap().value, toml::Value::Integer(64));
        assert_eq!(parse("p.lr=3e-4").unwrap().value, toml::Value::Float(3e-4));
        assert_eq!(parse("t.input=data/a b.txt").unwrap().value, toml::Value::String("data/a b.txt".into()));
        assert_eq!(parse("t.algorithm=\"bpe\"").unwrap().value, toml::Value::String("bpe".into()));
        let o = parse("tokenize.vocab_size=512").unwrap();
        assert_eq!(
            (&o.origin.text[o.stage_span.clone()], &o.origin.text[o.key_span.clone()]),
            ("tokenize", "vocab_size")
        );
    }

    #[test]
    fn a_sweep_member_is_named_with_its_brackets() {
        let o = parse("align[beta=0.1,lr=3e-4].max_steps=5").unwrap();
        assert_eq!((o.stage.as_str(), o.key.as_str()), ("align[beta=0.1,lr=3e-4]", "max_steps"));
        assert_eq!(o.value, toml::Value::Integer(5));
        assert!(parse("align[beta=0.1.max_steps=5").is_err());
    }

    #[test]
    fn malformed_overrides_are_errors() {
        assert!(parse("pack").is_err());
        assert!(parse("pack=3").is_err());
        assert!(parse(".x=3").is_err());
    }
}
