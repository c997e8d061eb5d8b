//! Turning engine errors into miette diagnostics that point into the recipe or `--set` text.

use std::io::IsTerminal;

use engine::RecipeError;
use miette::{GraphicalReportHandler, GraphicalTheme, LabeledSpan, MietteDiagnostic, NamedSource, Report};

/// Render a recipe error: message, `[file:line:col]`, the offending line with a label, help.
pub fn render(err: &RecipeError) -> String {
    let mut diag = MietteDiagnostic::new(err.message.clone());
    if let Some(help) = &err.help {
        diag = diag.with_help(help.clone());
    }
    let report = match (&err.origin, &err.span) {
        (Some(origin), Some(span)) => {
            diag = diag.with_label(LabeledSpan::at(span.clone(), err.label.clone()));
            Report::new(diag).with_source_code(NamedSource::new(origin.name.clone(), origin.text.clone()))
        }
        _ => Report::new(diag),
    };
    let theme =
        if std::io::stderr().is_terminal() { GraphicalTheme::unicode() } else { GraphicalTheme::unicode_nocolor() };
    let mut out = String::new();
    GraphicalReportHandler::new_themed(theme)
        .with_links(false)
        .render_report(&mut out, report.as_ref())
        .expect("rendering into a String cannot fail");
    out
}
