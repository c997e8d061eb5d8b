//! Stage parameters: how a stage kind declares them (name, type, default, hashed or not) and
//! the checked values a resolved recipe holds.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// The type of a parameter, with the range of values it accepts.
#[derive(Debug, Clone, Copy)]
pub enum ParamType {
    Int { min: i64, max: i64 },
    Float { min: f64, max: f64 },
    Bool,
    Str,
    Choice(&'static [&'static str]),
    StrList,
}

/// A parameter's default. `Absent` means the parameter is optional and has no value unless set.
#[derive(Debug, Clone, Copy)]
pub enum Default {
    Required,
    Absent,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(&'static str),
    StrList(&'static [&'static str]),
}

/// One parameter of a stage kind. Declared as a constant table per kind.
#[derive(Debug, Clone, Copy)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    pub default: Default,
    /// Whether the value enters the cache key. Only settings that cannot change the output
    /// bytes (progress display, thread count) are left out.
    pub hashed: bool,
    /// Whether the value enters the key when it equals the default ([`ParamSpec::keyed_when_set`]).
    pub keyed_at_default: bool,
    pub doc: &'static str,
}

impl ParamSpec {
    const fn new(name: &'static str, ty: ParamType, default: Default, doc: &'static str) -> Self {
        ParamSpec { name, ty, default, hashed: true, keyed_at_default: true, doc }
    }
    pub const fn int(name: &'static str, default: i64, min: i64, max: i64, doc: &'static str) -> Self {
        Self::new(name, ParamType::Int { min, max }, Default::Int(default), doc)
    }
    pub const fn float(name: &'static str, default: f64, min: f64, max: f64, doc: &'static str) -> Self {
        Self::new(name, ParamType::Float { min, max }, Default::Float(default), doc)
    }
    pub const fn bool(name: &'static str, default: bool, doc: &'static str) -> Self {
        Self::new(name, ParamType::Bool, Default::Bool(default), doc)
    }
    pub const fn choice(
        name: &'static str,
        default: &'static str,
        options: &'static [&'static str],
        doc: &'static str,
    ) -> Self {
        Self::new(name, ParamType::Choice(options), Default::Str(default), doc)
    }
    pub const fn string(name: &'static str, default: Option<&'static str>, doc: &'static str) -> Self {
        let default = match default {
            Some(s) => Default::Str(s),
            None => Default::Absent,
        };
        Self::new(name, ParamType::Str, default, doc)
    }
    pub const fn str_list(name: &'static str, default: &'static [&'static str], doc: &'static str) -> Self {
        Self::new(name, ParamType::StrList, Default::StrList(default), doc)
    }
    /// An optional integer with no default.
    pub const fn opt_int(name: &'static str, min: i64, max: i64, doc: &'static str) -> Self {
        Self::new(name, ParamType::Int { min, max }, Default::Absent, doc)
    }
    /// An optional number with no default.
    pub const fn opt_float(name: &'static str, min: f64, max: f64, doc: &'static str) -> Self {
        Self::new(name, ParamType::Float { min, max }, Default::Absent, doc)
    }
    /// Mark a parameter as not part of the cache key.
    pub const fn not_hashed(mut self) -> Self {
        self.hashed = false;
        self
    }
    /// A parameter added after a stage's outputs were first cached, whose default computes
    /// what the stage computed before it existed: at its default it stays out of the key, so
    /// existing caches stay valid. Changing such a default changes outputs, so it comes with a
    /// new stage version, as any change of output does.
    pub const fn keyed_when_set(mut self) -> Self {
        self.keyed_at_default = false;
        self
    }
    /// Whether `value` of this parameter enters the cache key.
    pub fn in_key(&self, value: &ParamValue) -> bool {
        self.hashed && (self.keyed_at_default || self.default_value().as_ref() != Some(value))
    }

    pub fn default_value(&self) -> Option<ParamValue> {
        match self.default {
            Default::Required | Default::Absent => None,
            Default::Int(v) => Some(ParamValue::Int(v)),
            Default::Float(v) => Some(ParamValue::Float(v)),
            Default::Bool(v) => Some(ParamValue::Bool(v)),
            Default::Str(v) => Some(ParamValue::Str(v.to_string())),
            Default::StrList(v) => Some(ParamValue::StrList(v.iter().map(|s| s.to_string()).collect())),
        }
    }

    /// The type as a reader would say it, for error messages and docs.
    pub fn type_name(&self) -> String {
        match self.ty {
            ParamType::Int { min, max } => format!("integer in {min}..={max}"),
            ParamType::Float { min, max } => format!("number in [{min}, {max}]"),
            ParamType::Bool => "boolean".into(),
            ParamType::Str => "string".into(),
            ParamType::Choice(options) => {
                let quoted: Vec<_> = options.iter().map(|o| format!("\"{o}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            ParamType::StrList => "list of strings".into(),
        }
    }

    /// Check a TOML value against this parameter; the error says what was expected and found.
    pub fn convert(&self, value: &toml::Value) -> Result<ParamValue, String> {
        let expected = || format!("expected {}, found {}", self.type_name(), describe(value));
        match (self.ty, value) {
            (ParamType::Int { min, max }, toml::Value::Integer(v)) if (min..=max).contains(v) => {
                Ok(ParamValue::Int(*v))
            }
            (ParamType::Float { min, max }, toml::Value::Float(v)) if v.is_finite() && *v >= min && *v <= max => {
                Ok(ParamValue::Float(*v))
            }
            // `lr = 1` means 1.0: integers are accepted where a number is expected.
            (ParamType::Float { min, max }, toml::Value::Integer(v)) if (*v as f64) >= min && (*v as f64) <= max => {
                Ok(ParamValue::Float(*v as f64))
            }
            (ParamType::Bool, toml::Value::Boolean(v)) => Ok(ParamValue::Bool(*v)),
            (ParamType::Str, toml::Value::String(v)) => Ok(ParamValue::Str(v.clone())),
            (ParamType::Choice(options), toml::Value::String(v)) if options.contains(&v.as_str()) => {
                Ok(ParamValue::Str(v.clone()))
            }
            (ParamType::StrList, toml::Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(expected))
                .collect::<Result<_, _>>()
                .map(ParamValue::StrList),
            _ => Err(expected()),
        }
    }
}

fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("string \"{s}\""),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(f) => format!("number {f}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("datetime {d}"),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

/// A checked parameter value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    StrList(Vec<String>),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The canonical JSON text: `0.001`, `"bpe"`, `["a","b"]`.
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// The parameters of one resolved stage: every declared parameter with a value (given or
/// default), each checked against its declaration.
///
/// Invariant: holds only names the kind declares, each with the declared type, so the typed
/// getters below panic only on a bug in a stage (asking for an undeclared name or wrong type).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params {
    values: BTreeMap<String, ParamValue>,
}

impl Params {
    pub(crate) fn insert(&mut self, name: &str, value: ParamValue) {
        self.values.insert(name.to_string(), value);
    }

    /// Every declared default with `values` on top, unchecked: for running a stage outside a
    /// recipe (tests, benchmarks).
    pub fn from_defaults(specs: &[ParamSpec], values: &[(&str, ParamValue)]) -> Params {
        let mut params = Params::default();
        for spec in specs {
            if let Some(v) = spec.default_value() {
                params.insert(spec.name, v);
            }
        }
        for (name, v) in values {
            params.insert(name, v.clone());
        }
        params
    }

    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.values.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &ParamValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    fn expect(&self, name: &str) -> &ParamValue {
        self.values.get(name).unwrap_or_else(|| panic!("stage asked for undeclared or unset parameter `{name}`"))
    }

    pub fn int(&self, name: &str) -> i64 {
        match self.expect(name) {
            ParamValue::Int(v) => *v,
            other => panic!("parameter `{name}` is declared as {other:?}, not an integer"),
        }
    }
    pub fn usize(&self, name: &str) -> usize {
        usize::try_from(self.int(name)).unwrap_or_else(|_| panic!("parameter `{name}` must be declared non-negative"))
    }
    pub fn opt_usize(&self, name: &str) -> Option<usize> {
        self.values.contains_key(name).then(|| self.usize(name))
    }
    pub fn float(&self, name: &str) -> f64 {
        match self.expect(name) {
            ParamValue::Float(v) => *v,
            other => panic!("parameter `{name}` is declared as {other:?}, not a number"),
        }
    }
    pub fn opt_float(&self, name: &str) -> Option<f64> {
        self.values.contains_key(name).then(|| self.float(name))
    }
    pub fn bool(&self, name: &str) -> bool {
        match self.expect(name) {
            ParamValue::Bool(v) => *v,
            other => panic!("parameter `{name}` is declared as {other:?}, not a boolean"),
        }
    }
    pub fn str(&self, name: &str) -> &str {
        match self.expect(name) {
            ParamValue::Str(v) => v,
            other => panic!("parameter `{name}` is declared as {other:?}, not a string"),
        }
    }
    pub fn opt_str(&self, name: &str) -> Option<&str> {
        self.values.contains_key(name).then(|| self.str(name))
    }
    pub fn str_list(&self, name: &str) -> &[String] {
        match self.expect(name) {
            ParamValue::StrList(v) => v,
            other => panic!("parameter `{name}` is declared as {other:?}, not a list of strings"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LR: ParamSpec = ParamSpec::float("lr", 1e-3, 0.0, 10.0, "learning rate");

    #[test]
    fn floats_are_normalized_whatever_their_spelling() {
        let a = LR.convert(&toml::Value::Float(1e-3)).unwrap();
        let b = LR.convert(&"v = 0.001".parse::<toml::Table>().unwrap()["v"]).unwrap();
        assert_eq!(a.to_string(), b.to_string());
        assert_eq!(LR.convert(&toml::Value::Integer(1)).unwrap(), ParamValue::Float(1.0));
    }

    #[test]
    fn out_of_range_and_wrong_types_say_what_was_expected() {
        let err = LR.convert(&toml::Value::Float(f64::NAN)).unwrap_err();
        assert!(err.starts_with("expected number in [0, 10]"), "{err}");
        let err = LR.convert(&toml::Value::String("fast".into())).unwrap_err();
        assert_eq!(err, "expected number in [0, 10], found string \"fast\"");
        let choice = ParamSpec::choice("algorithm", "bpe", &["byte", "bpe"], "");
        assert!(choice.convert(&toml::Value::String("wordpiece".into())).unwrap_err().contains("one of \"byte\""));
    }

    #[test]
    fn a_parameter_keyed_when_set_stays_out_of_the_key_at_its_default() {
        let precision = ParamSpec::choice("precision", "f32", &["f32", "bf16"], "").keyed_when_set();
        assert!(!precision.in_key(&ParamValue::Str("f32".into())));
        assert!(precision.in_key(&ParamValue::Str("bf16".into())));
        assert!(LR.in_key(&ParamValue::Float(1e-3)), "an ordinary parameter is keyed at its default");
        assert!(!LR.not_hashed().in_key(&ParamValue::Float(0.5)));
    }
}
