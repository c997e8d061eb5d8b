//! `tinygpt report`: one self-contained HTML file about a recipe's built artifacts: the DAG,
//! the loss curves of every training stage (SVG drawn by plotters), the compare table, the
//! samples of every evaluation, and each stage's time and throughput. It loads nothing from
//! the network and runs no script but one line that marks the page as rendered.

use std::fmt::Write;

use engine::recipe::InputSource;
use engine::{PlannedStage, Recipe};
use plotters::prelude::*;
use serde_json::Value;

use crate::compare::Comparison;
use crate::output;

/// Text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}\
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right;white-space:nowrap}\
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}\
.curves{display:flex;flex-wrap:wrap;gap:1em}.dag,.wide{overflow-x:auto}\
pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em;border-radius:4px}.note{color:#666}";

/// (step, loss) points of one line of a chart.
type Line = Vec<(f64, f64)>;

/// A stage's training log: the train loss and the validation loss against step.
fn curves(artifact: &engine::cache::Artifact) -> Option<(Line, Line)> {
    let text = std::fs::read_to_string(artifact.path(stages::train::METRICS_FILE)).ok()?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
        let Some(step) = v["step"].as_f64() else { continue };
        if let Some(loss) = v["loss"].as_f64() {
            train.push((step, loss));
        }
        if let Some(loss) = v["val_loss"].as_f64() {
            val.push((step, loss));
        }
    }
    (!train.is_empty() || !val.is_empty()).then_some((train, val))
}

/// One training stage's loss against step, as an SVG element.
fn curve_svg(title: &str, train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<String, String> {
    let points = || train.iter().chain(val);
    let max_step = points().map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (560, 320)).into_drawing_area();
        let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..max_step, (lo - pad)..(hi + pad))
            .map_err(e)?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(e)?;
        for (points, color, label) in [(train, BLUE, "train"), (val, RED, "validation")] {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(e)?;
        root.present().map_err(e)?;
    }
    // Mark the element so that the page (and its test) can find the curves.
    Ok(svg.replacen("<svg ", &format!("<svg class=\"loss-curve\" data-stage=\"{}\" ", escape(title)), 1))
}

/// The DAG as an SVG: a column per depth (the longest chain of inputs above a stage), stages in
/// recipe order within it, an edge per input slot; built stages filled, unbuilt ones outlined.
fn dag_svg(recipe: &Recipe, plan: &[PlannedStage]) -> String {
    let n = recipe.stages.len();
    let mut depth = vec![0usize; n];
    for (i, s) in recipe.stages.iter().enumerate() {
        for input in &s.inputs {
            if let InputSource::Stage(up) = input.source {
                depth[i] = depth[i].max(depth[up] + 1);
            }
        }
    }
    let (w, h, gap_x, gap_y) = (170.0, 34.0, 36.0, 12.0);
    let mut row_in_column = vec![0usize; n];
    let mut used = vec![0usize; depth.iter().max().map_or(1, |d| d + 1)];
    for i in 0..n {
        row_in_column[i] = used[depth[i]];
        used[depth[i]] += 1;
    }
    let x = |i: usize| 10.0 + depth[i] as f64 * (w + gap_x);
    let y = |i: usize| 10.0 + row_in_column[i] as f64 * (h + gap_y);
    let width = 20.0 + used.len() as f64 * (w + gap_x);
    let height = 20.0 + *used.iter().max().unwrap_or(&1) as f64 * (h + gap_y);
    let mut out = format!(
        "<svg class=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"11\">"
    );
    for (i, s) in recipe.stages.iter().enumerate() {
        for input in &s.inputs {
            if let InputSource::Stage(up) = input.source {
                let (x1, y1, x2, y2) = (x(up) + w, y(up) + h / 2.0, x(i), y(i) + h / 2.0);
                let mid = (x1 + x2) / 2.0;
                let _ = write!(
                    out,
                    "<path d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}\" fill=\"none\" stroke=\"#999\"><title>{}</title></path>",
                    escape(input.slot)
                );
            }
        }
    }
    for (i, s) in recipe.stages.iter().enumerate() {
        let built = plan[i].artifact.is_some();
        let fill = if built { "#dbeafe" } else { "#fff" };
        let name = if s.name.chars().count() > 27 {
            format!("{}…", s.name.chars().take(26).collect::<String>())
        } else {
            s.name.clone()
        };
        let _ = write!(
            out,
            "<g class=\"stage\"><title>{} ({}){}</title><rect x=\"{}\" y=\"{}\" width=\"{w}\" height=\"{h}\" rx=\"4\" \
             fill=\"{fill}\" stroke=\"#3b82f6\"/><text x=\"{}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" \
             fill=\"#666\">{}</text></g>",
            escape(&s.name),
            s.kind.kind(),
            if built { "" } else { ", not built" },
            x(i),
            y(i),
            x(i) + 6.0,
            y(i) + 14.0,
            escape(&name),
            x(i) + 6.0,
            y(i) + 27.0,
            s.kind.kind()
        );
    }
    out.push_str("</svg>");
    out
}

fn html_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<div class=\"wide\"><table><tr>");
    for h in headers {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{}</td>", escape(cell));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table></div>");
    out
}

/// The whole report.
pub fn render(recipe: &Recipe, plan: &[PlannedStage], comparison: &Comparison) -> Result<String, String> {
    let mut body = String::new();
    let built = plan.iter().filter(|s| s.artifact.is_some()).count();
    let _ = write!(
        body,
        "<h1>{}</h1><p class=\"note\">Recipe <code>{}</code>: {} stages, {built} built.</p>",
        escape(&recipe.name),
        escape(&recipe.path.display().to_string()),
        recipe.stages.len()
    );

    let _ = write!(body, "<h2>Stages</h2><div class=\"dag\">{}</div>", dag_svg(recipe, plan));

    body.push_str("<h2>Models</h2>");
    if comparison.rows.is_empty() {
        body.push_str("<p class=\"note\">No evaluated model is built yet.</p>");
    } else {
        body.push_str(&html_table(&comparison.headers, &comparison.text_rows()));
    }
    for note in comparison.notes() {
        let _ = write!(body, "<p class=\"note\">{}</p>", escape(&note));
    }

    body.push_str("<h2>Training curves</h2><div class=\"curves\">");
    let mut any_curve = false;
    for (s, p) in recipe.stages.iter().zip(plan) {
        let Some((train, val)) = p.artifact.as_ref().and_then(curves) else { continue };
        body.push_str(&curve_svg(&s.name, &train, &val)?);
        any_curve = true;
    }
    body.push_str("</div>");
    if !any_curve {
        body.push_str("<p class=\"note\">No training stage is built yet.</p>");
    }

    body.push_str("<h2>Samples</h2>");
    for (s, p) in recipe.stages.iter().zip(plan) {
        let Some(artifact) = &p.artifact else { continue };
        let Ok(text) = std::fs::read_to_string(artifact.path(stages::evaluate::RESULTS_FILE)) else { continue };
        let Ok(results) = serde_json::from_str::<Value>(&text) else { continue };
        let Some(samples) = results["samples"].as_array().filter(|s| !s.is_empty()) else { continue };
        let _ = write!(body, "<h3>{}</h3>", escape(&s.name));
        for sample in samples {
            let prompt = sample["prompt"].as_str().unwrap_or_default();
            let text = sample["text"].as_str().unwrap_or_default();
            let _ = write!(body, "<pre class=\"sample\"><b>{}</b>{}</pre>", escape(prompt), escape(text));
        }
    }

    body.push_str("<h2>Time and throughput</h2>");
    let rows: Vec<Vec<String>> = recipe
        .stages
        .iter()
        .zip(plan)
        .map(|(s, p)| {
            let (seconds, throughput, size) = match &p.artifact {
                None => ("not built".to_string(), String::new(), String::new()),
                Some(a) => {
                    let m = &a.manifest.metrics;
                    let rate = [("tokens_per_s", "training"), ("decode_tokens_per_s", "decoding")]
                        .iter()
                        .find_map(|(key, what)| m[*key].as_f64().map(|r| format!("{r:.0} tokens/s {what}")))
                        .unwrap_or_default();
                    (format!("{:.2}", a.manifest.seconds), rate, output::human_bytes(a.manifest.total_bytes()))
                }
            };
            vec![s.name.clone(), s.kind.kind().to_string(), seconds, throughput, size]
        })
        .collect();
    let headers: Vec<String> =
        ["stage", "kind", "seconds (when built)", "throughput", "size"].iter().map(|h| h.to_string()).collect();
    body.push_str(&html_table(&headers, &rows));

    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} - tinygpt report</title>\
         <style>{STYLE}</style></head><body>{body}\
         <script>document.body.dataset.curves = document.querySelectorAll('svg.loss-curve').length;</script>\
         </body></html>\n",
        escape(&recipe.name)
    ))
}
