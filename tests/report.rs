//! `tinygpt report` (issue 16, item 5): one self-contained HTML file with the DAG, a loss curve
//! per training stage, the compare table and the samples, which renders in headless Chromium
//! with no console message (SKIPPED where no browser can be had).

use std::path::PathBuf;
use std::process::Command;

use crate::compare::{stdout, SWEPT};
use crate::util::Sandbox;

/// A Chromium to open the report with: `TINYGPT_CHROMIUM`, or one on the PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TINYGPT_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().ok()?;
        found.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&found.stdout).trim()))
    })
}

#[test]
fn the_report_holds_the_dag_curves_table_and_samples_and_renders_in_a_browser() {
    let sb = Sandbox::new();
    sb.write("lrs.toml", SWEPT);
    sb.run_json("lrs.toml", &[]);
    let said = stdout(&sb, &["report", "lrs.toml", "-o", "report.html"]);
    assert_eq!(said.trim(), "wrote report.html");
    let html = std::fs::read_to_string(sb.path("report.html")).unwrap();

    // Every stage in the DAG, a curve per training stage with both lines, a row per model.
    for stage in ["corpus", "tokenize", "pack", "pretrain[lr=0.003]", "evaluate[lr=0.01]", "unevaluated"] {
        assert!(html.contains(&format!("<g class=\"stage\"><title>{stage} (")), "{stage} missing from the DAG");
    }
    for stage in ["pretrain[lr=0.003]", "pretrain[lr=0.01]", "unevaluated"] {
        let start = html.find(&format!("<svg class=\"loss-curve\" data-stage=\"{stage}\"")).expect("a curve");
        let svg = &html[start..start + html[start..].find("</svg>").unwrap()];
        assert!(svg.contains(">\ntrain\n</text>") && svg.contains(">\nvalidation\n</text>"), "{svg}");
        assert!(svg.matches("<polyline").count() >= 2, "two lines: {svg}");
    }
    assert!(html.contains("<td>pretrain[lr=0.003]</td><td>f32</td>"), "the compare table");
    assert!(html.contains("not evaluated by the recipe: unevaluated"));
    assert!(html.matches("<pre class=\"sample\"><b>Once</b>").count() == 2, "a sample per evaluation");
    // Self-contained: nothing to fetch (the one URL is SVG's namespace, which is not loaded).
    assert!(!html.contains("src=") && !html.contains("href=") && !html.contains("@import"));
    assert_eq!(html.matches("http").count(), html.matches("http://www.w3.org/2000/svg").count());

    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: no Chromium (install Debian's `chromium`, or set TINYGPT_CHROMIUM)");
        return;
    };
    let out = Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr"])
        .args(["--v=0", "--dump-dom"])
        .arg(format!("file://{}", sb.path("report.html").display()))
        .output()
        .expect("chromium runs");
    let dom = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    // The page's script ran (so no error stopped it) and counted the curves the browser parsed.
    assert!(dom.contains("data-curves=\"3\""), "{}", &dom[..dom.len().min(2000)]);
}
