//! What `run`, `plan` and `cache ls` print: aligned tables for people, JSON for programs.

use engine::cache::RunRecord;
use engine::{PlannedStage, RunReport};
use serde_json::{json, Value};

/// A compact `name=value` list of a stage's metrics.
fn metrics_text(metrics: &Value) -> String {
    let Some(map) = metrics.as_object() else { return String::new() };
    map.iter()
        .map(|(k, v)| match v.as_f64() {
            Some(x) if v.is_f64() => format!("{k}={}", format_float(x)),
            _ => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn format_float(x: f64) -> String {
    if x.abs() >= 100.0 || x == x.trunc() {
        format!("{x:.1}")
    } else {
        format!("{x:.4}").trim_end_matches('0').to_string()
    }
}

/// Rows of cells, columns padded to their widest cell; the last column is left ragged.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

pub fn run_table(report: &RunReport) -> String {
    let rows: Vec<Vec<String>> = report
        .outcomes
        .iter()
        .map(|o| {
            vec![
                o.name.clone(),
                o.kind.clone(),
                o.action.to_string(),
                format!("{:.2}", o.seconds),
                metrics_text(&o.metrics),
            ]
        })
        .collect();
    table(&["stage", "kind", "action", "seconds", "metrics"], &rows)
}

pub fn run_json(report: &RunReport) -> Value {
    let stages: Vec<Value> = report
        .outcomes
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "kind": o.kind,
                "key": o.key.to_hex(),
                "action": o.action,
                "seconds": o.seconds,
                "metrics": o.metrics,
            })
        })
        .collect();
    let status = if report.interrupted {
        "interrupted"
    } else if report.failure.is_some() {
        "failed"
    } else {
        "ok"
    };
    let mut out = json!({ "status": status, "stages": stages });
    if let Some(f) = &report.failure {
        out["error"] = json!({ "stage": f.stage, "message": f.message });
    }
    out
}

fn reason_text(stage: &PlannedStage) -> String {
    stage.reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

pub fn plan_table(plan: &[PlannedStage]) -> String {
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|s| {
            let key = s.key.map_or_else(|| "?".to_string(), |k| k.short());
            vec![s.name.clone(), s.kind.clone(), s.action.to_string(), key, reason_text(s)]
        })
        .collect();
    table(&["stage", "kind", "action", "key", "why"], &rows)
}

pub fn plan_json(plan: &[PlannedStage]) -> Value {
    let stages: Vec<Value> = plan
        .iter()
        .map(|s| {
            let (seconds, metrics) = match &s.artifact {
                Some(a) => (json!(a.manifest.seconds), a.manifest.metrics.clone()),
                None => (Value::Null, json!({})),
            };
            json!({
                "name": s.name,
                "kind": s.kind,
                "key": s.key.map(|k| k.to_hex()),
                "action": s.action,
                "seconds": seconds,
                "metrics": metrics,
                "reason": if s.reasons.is_empty() { Value::Null } else { json!(reason_text(s)) },
                "reasons": s.reasons,
            })
        })
        .collect();
    json!({ "stages": stages })
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

/// A Unix time as `2026-12-02 17:42:03` (UTC).
fn utc(seconds: u64) -> String {
    chrono::DateTime::from_timestamp(seconds as i64, 0)
        .map_or_else(|| "?".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// `tinygpt runs`: one line per run, newest first.
pub fn runs_table(records: &[RunRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| match &r.summary {
            Some(s) => {
                let mut failed = s.failed.to_string();
                if s.interrupted {
                    failed = format!("{failed} (interrupted)");
                } else if s.not_run > 0 {
                    failed = format!("{failed} ({} not run)", s.not_run);
                }
                vec![
                    utc(s.started),
                    r.label.clone(),
                    s.recipe.clone(),
                    s.ran.to_string(),
                    s.cached.to_string(),
                    s.remote.to_string(),
                    failed,
                    format!("{:.2}", s.seconds),
                ]
            }
            None => {
                let mut row = vec!["?".to_string(); 8];
                row[1] = r.label.clone();
                row
            }
        })
        .collect();
    table(&["started (UTC)", "recipe", "file", "ran", "cached", "remote", "failed", "seconds"], &rows)
}

pub fn runs_json(records: &[RunRecord]) -> Value {
    let runs: Vec<Value> =
        records.iter().map(|r| json!({ "recipe": r.label, "keys": r.keys.len(), "summary": r.summary })).collect();
    json!({ "runs": runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(&["a", "bb"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "a     bb\nlong  x\n");
    }

    #[test]
    fn metrics_are_compact() {
        assert_eq!(metrics_text(&json!({"tokens": 12, "ratio": 1.23456})), "ratio=1.2346 tokens=12");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
