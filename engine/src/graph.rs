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

/// Render the recipe as a graph: one node per stage (name and kind), one per raw input, an edge
/// per input slot labelled with the slot's name.
pub fn render(recipe: &Recipe, format: GraphFormat) -> String {
    let mut out = String::new();
    let mut raw_nodes: Vec<String> = Vec::new();
    let raw_id = |raw_nodes: &mut Vec<String>, shown: &str| -> usize {
        match raw_nodes.iter().position(|r| r == shown) {
            Some(i) => i,
            None => {
                raw_nodes.push(shown.to_string());
                raw_nodes.len() - 1
            }
        }
    };
    match format {
        GraphFormat::Dot => {
            out.push_str(&format!("digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box];\n", quote(&recipe.name)));
            for (id, s) in recipe.stages.iter().enumerate() {
                out.push_str(&format!("  s{id} [label=\"{}\\n({})\"];\n", quote(&s.name), s.kind.kind()));
            }
            for (id, s) in recipe.stages.iter().enumerate() {
                for input in &s.inputs {
                    let from = match &input.source {
                        InputSource::Stage(up) => format!("s{up}"),
                        InputSource::Raw { shown, .. } => {
                            let r = raw_id(&mut raw_nodes, shown);
                            format!("f{r}")
                        }
                    };
                    out.push_str(&format!("  {from} -> s{id} [label=\"{}\"];\n", input.slot));
                }
            }
            for (r, shown) in raw_nodes.iter().enumerate() {
                out.push_str(&format!("  f{r} [shape=note, label=\"{}\"];\n", quote(shown)));
            }
            out.push_str("}\n");
        }
        GraphFormat::Mermaid => {
            out.push_str("flowchart LR\n");
            for (id, s) in recipe.stages.iter().enumerate() {
                out.push_str(&format!("  s{id}[\"{}<br/>({})\"]\n", s.name.replace('"', "#quot;"), s.kind.kind()));
            }
            for (id, s) in recipe.stages.iter().enumerate() {
                for input in &s.inputs {
                    let from = match &input.source {
                        InputSource::Stage(up) => format!("s{up}"),
                        InputSource::Raw { shown, .. } => {
                            let r = raw_id(&mut raw_nodes, shown);
                            format!("f{r}")
                        }
                    };
                    out.push_str(&format!("  {from} -->|{}| s{id}\n", input.slot));
                }
            }
            for (r, shown) in raw_nodes.iter().enumerate() {
                out.push_str(&format!("  f{r}[/\"{}\"/]\n", shown.replace('"', "#quot;")));
            }
        }
    }
    out
}
