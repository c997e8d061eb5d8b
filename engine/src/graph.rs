//! Drawing a recipe's DAG as Graphviz dot or Mermaid, raw inputs included.

use crate::recipe::{InputSource, Recipe};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphFormat {
    Dot,
    Mermaid,
}

fn quote(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Node ids and edges of the drawing: stages are `s<id>`, raw inputs `f<n>` (one per distinct
/// path), each edge labelled with its input slot.
struct Drawing {
    raw_inputs: Vec<String>,
    edges: Vec<(String, usize, &'static str)>,
}

fn drawing(recipe: &Recipe) -> Drawing {
    let mut d = Drawing { raw_inputs: Vec::new(), edges: Vec::new() };
    for (id, s) in recipe.stages.iter().enumerate() {
        for input in &s.inputs {
            let from = match &input.source {
                InputSource::Stage(up) => format!("s{up}"),
                InputSource::Raw { shown, .. } => {
                    let r = d.raw_inputs.iter().position(|r| r == shown).unwrap_or_else(|| {
                        d.raw_inputs.push(shown.clone());
                        d.raw_inputs.len() - 1
                    });
                    format!("f{r}")
                }
            };
            d.edges.push((from, id, input.slot));
        }
    }
    d
}

/// Render the recipe as a graph: one node per stage (name and kind), one per raw input, an edge
/// per input slot labelled with the slot's name.
pub fn render(recipe: &Recipe, format: GraphFormat) -> String {
    let d = drawing(recipe);
    let mut out = String::new();
    match format {
        GraphFormat::Dot => {
            out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n", quote(&recipe.name)));
            for (id, s) in recipe.stages.iter().enumerate() {
                out.push_str(&format!("  s{id} [label=\"{}\\n({})\"];\n", quote(&s.name), s.kind.kind()));
            }
            for (from, to, slot) in &d.edges {
                out.push_str(&format!("  {from} -> s{to} [label=\"{slot}\"];\n"));
            }
            for (r, shown) in d.raw_inputs.iter().enumerate() {
                out.push_str(&format!("  f{r} [shape=note, label=\"{}\"];\n", quote(shown)));
            }
            out.push_str("}\n");
        }
        GraphFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for (id, s) in recipe.stages.iter().enumerate() {
                out.push_str(&format!("  s{id}[\"{}<br/>({})\"]\n", s.name.replace('"', "#quot;"), s.kind.kind()));
            }
            for (from, to, slot) in &d.edges {
                out.push_str(&format!("  {from} -->|{slot}| s{to}\n"));
            }
            for (r, shown) in d.raw_inputs.iter().enumerate() {
                out.push_str(&format!("  f{r}[/\"{}\"/]\n", shown.replace('"', "#quot;")));
            }
        }
    }
    out
}
