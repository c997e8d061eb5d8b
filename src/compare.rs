//! `tinygpt compare`: every model of a recipe in one table, a column per metric its
//! evaluations and its own stage report, from the artifacts already in the store.

use engine::{PlannedStage, Recipe};
use serde_json::{json, Value};

use crate::output;

/// A column: its header and where its value comes from.
struct Column {
    header: String,
    /// The metric's name in the manifest.
    metric: &'static str,
    /// The evaluation data it is measured on (its stage, as the recipe writes it), or `None`
    /// for a figure of the model's own stage.
    data: Option<String>,
}

/// Metrics of an evaluation, in the order they are shown.
const EVAL_METRICS: [&str; 11] = [
    "val_loss",
    "bits_per_byte",
    "perplexity",
    "preference_accuracy",
    "reward_accuracy",
    "mc_accuracy",
    "mc_accuracy_normalized",
    "exact_match",
    "decode_tokens_per_s",
    "draft_acceptance",
    "speculative_speedup",
];

pub struct Comparison {
    pub headers: Vec<String>,
    /// One per evaluated model, in the recipe's order: the model's stage name, then a cell per
    /// header after the first.
    pub rows: Vec<(String, Vec<Value>)>,
    /// Models no evaluation of the recipe takes.
    pub not_evaluated: Vec<String>,
    /// Models some evaluation takes but that are not built (or whose evaluation is not).
    pub not_built: Vec<String>,
}

fn is_model(kind: &engine::ArtifactType) -> bool {
    *kind == stages::MODEL || *kind == stages::QUANTIZED_MODEL
}

/// The stage an input slot of stage `id` takes, if it is wired to one.
fn input_stage(recipe: &Recipe, id: usize, slot: &str) -> Option<usize> {
    recipe.stages[id].inputs.iter().find(|i| i.slot == slot).and_then(|i| match i.source {
        engine::recipe::InputSource::Stage(up) => Some(up),
        _ => None,
    })
}

/// How a quantized model was made (`gptq int4 g32`), or `f32`.
fn quantization(recipe: &Recipe, id: usize) -> String {
    let stage = &recipe.stages[id];
    if stage.kind.output() != stages::QUANTIZED_MODEL {
        return "f32".into();
    }
    let p =
        |name: &str| stage.params.get(name).map(|v| v.to_string().trim_matches('"').to_string()).unwrap_or_default();
    format!("{} int{} g{}", p("method"), p("bits"), p("group_size"))
}

/// The data an evaluation reads, as its column headers name it: the stage as the recipe writes
/// it, or a raw input's file name.
fn data_name(recipe: &Recipe, eval: usize) -> String {
    let input = recipe.stages[eval].inputs.iter().find(|i| i.slot == "data");
    match input.map(|i| &i.source) {
        Some(engine::recipe::InputSource::Stage(d)) => recipe.stages[*d].template.clone(),
        Some(engine::recipe::InputSource::Raw { path, shown }) => {
            path.file_name().map_or_else(|| shown.clone(), |n| n.to_string_lossy().into_owned())
        }
        None => String::new(),
    }
}

pub fn compare(recipe: &Recipe, plan: &[PlannedStage]) -> Comparison {
    let evaluations: Vec<(usize, usize, String)> = (0..recipe.stages.len())
        .filter(|&i| recipe.stages[i].kind.output() == stages::EVAL)
        .filter_map(|i| Some((i, input_stage(recipe, i, "model")?, data_name(recipe, i))))
        .collect();
    let mut datasets: Vec<String> = Vec::new();
    for (_, _, name) in &evaluations {
        if !datasets.contains(name) {
            datasets.push(name.clone());
        }
    }

    // Which metrics appear, per dataset, in the evaluations that are built.
    let mut columns: Vec<Column> = Vec::new();
    for dataset in &datasets {
        for metric in EVAL_METRICS {
            let present = evaluations.iter().any(|(e, _, d)| {
                d == dataset && plan[*e].artifact.as_ref().is_some_and(|a| !a.manifest.metrics[metric].is_null())
            });
            if present {
                let header = if datasets.len() > 1 { format!("{metric} ({dataset})") } else { metric.to_string() };
                columns.push(Column { header, metric, data: Some(dataset.clone()) });
            }
        }
    }
    for (metric, header) in [("parameters", "parameters"), ("tokens_per_s", "train_tokens_per_s")] {
        columns.push(Column { header: header.into(), metric, data: None });
    }

    let mut rows = Vec::new();
    let (mut not_evaluated, mut not_built) = (Vec::new(), Vec::new());
    for (m, stage) in recipe.stages.iter().enumerate() {
        if !is_model(&stage.kind.output()) {
            continue;
        }
        let evals: Vec<&(usize, usize, String)> = evaluations.iter().filter(|(_, model, _)| *model == m).collect();
        if evals.is_empty() {
            not_evaluated.push(stage.name.clone());
            continue;
        }
        let built: Vec<_> =
            evals.iter().filter_map(|(e, _, d)| Some((plan[*e].artifact.as_ref()?, d.clone()))).collect();
        let Some(model) = plan[m].artifact.as_ref().filter(|_| !built.is_empty()) else {
            not_built.push(stage.name.clone());
            continue;
        };
        let mut cells = vec![json!(quantization(recipe, m)), json!(model.manifest.total_bytes())];
        for c in &columns {
            let value = match &c.data {
                Some(dataset) => built
                    .iter()
                    .filter(|(_, d)| d == dataset)
                    .map(|(a, _)| a.manifest.metrics[c.metric].clone())
                    .find(|v| !v.is_null())
                    .unwrap_or(Value::Null),
                None => model.manifest.metrics[c.metric].clone(),
            };
            cells.push(value);
        }
        rows.push((stage.name.clone(), cells));
    }
    let mut headers = vec!["model".to_string(), "weights".into(), "bytes".into()];
    headers.extend(columns.into_iter().map(|c| c.header));
    Comparison { headers, rows, not_evaluated, not_built }
}

impl Comparison {
    fn cell_text(header: &str, v: &Value) -> String {
        match v {
            Value::Null => "-".into(),
            Value::String(s) => s.clone(),
            Value::Number(n) if header == "bytes" => output::human_bytes(n.as_u64().unwrap_or(0)),
            Value::Number(n) => match n.as_f64() {
                Some(x) if n.is_f64() => output::format_float(x),
                _ => n.to_string(),
            },
            other => other.to_string(),
        }
    }

    /// What the table leaves out, as lines under it.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.not_evaluated.is_empty() {
            notes.push(format!("not evaluated by the recipe: {}", self.not_evaluated.join(", ")));
        }
        if !self.not_built.is_empty() {
            notes.push(format!("not built yet (run the recipe): {}", self.not_built.join(", ")));
        }
        notes
    }

    /// Cells as text, for the terminal and the HTML report.
    pub fn text_rows(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|(name, cells)| {
                std::iter::once(name.clone())
                    .chain(cells.iter().zip(&self.headers[1..]).map(|(v, h)| Self::cell_text(h, v)))
                    .collect()
            })
            .collect()
    }

    pub fn table(&self) -> String {
        let headers: Vec<&str> = self.headers.iter().map(String::as_str).collect();
        let mut out = output::table(&headers, &self.text_rows());
        for note in self.notes() {
            out.push_str(&format!("{note}\n"));
        }
        out
    }

    pub fn json(&self) -> Value {
        let models: Vec<Value> = self
            .rows
            .iter()
            .map(|(name, cells)| {
                let mut row = serde_json::Map::new();
                row.insert("model".into(), json!(name));
                for (h, v) in self.headers[1..].iter().zip(cells) {
                    row.insert(h.clone(), v.clone());
                }
                Value::Object(row)
            })
            .collect();
        json!({ "models": models, "not_evaluated": self.not_evaluated, "not_built": self.not_built })
    }

    /// RFC 4180: a header line, a line per model, fields with a comma, quote or newline quoted.
    pub fn csv(&self) -> String {
        let field = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let mut out = self.headers.iter().map(|h| field(h)).collect::<Vec<_>>().join(",") + "\n";
        for (name, cells) in &self.rows {
            let mut line = vec![field(name)];
            line.extend(cells.iter().map(|v| match v {
                Value::Null => String::new(),
                Value::String(s) => field(s),
                other => field(&other.to_string()),
            }));
            out.push_str(&(line.join(",") + "\n"));
        }
        out
    }
}
