//! Sweeps: a stage that declares `sweep = { beta = [0.05, 0.1] }` becomes one member per point
//! of the grid (`align[beta=0.05]`, `align[beta=0.1]`), and every stage downstream of a swept
//! stage becomes one member per upstream member it can take. Members are ordinary stages to
//! the rest of the engine; those that share upstream stages share their cached artifacts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use toml::Spanned;

use super::tables::{Given, Place, Table};
use crate::error::RecipeError;
use crate::stage::Stage;

/// Most members one stage may expand into: a typo in a grid should not plan a million stages.
const MAX_MEMBERS: usize = 4096;

/// One stage after expansion.
pub(super) struct Member {
    /// Index of the table it comes from.
    pub table: usize,
    pub name: String,
    /// The table's keys with the swept values filled in, `sweep` removed, and each input that
    /// names a swept stage renamed to the matching member.
    pub given: BTreeMap<String, Given>,
    /// The grid point: (key, value) as shown in the member's name, in the order the stages are written.
    pub point: Vec<(String, String)>,
}

/// One swept value of one stage.
#[derive(Clone)]
struct Assign {
    /// (table, position of the key in its grid): orders a point as the recipe writes its stages.
    rank: (usize, usize),
    key: String,
    value: toml::Value,
    value_at: Place,
    key_at: Place,
}

struct Grid {
    key: String,
    key_at: Place,
    values: Vec<(toml::Value, Place)>,
}

/// A grid value as its member's name shows it: strings bare, the rest as TOML writes them.
pub(super) fn shown(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The grid of each table (empty for a stage that sweeps nothing), checked against its kind.
fn grids(tables: &[Table], kinds: &[Arc<dyn Stage>]) -> Result<Vec<Vec<Grid>>, RecipeError> {
    let mut out = Vec::with_capacity(tables.len());
    for (t, kind) in tables.iter().zip(kinds) {
        let Some(g) = t.given.get("sweep") else {
            out.push(Vec::new());
            continue;
        };
        let Some(table) = g.value.as_table() else {
            return Err(g
                .value_at
                .error(format!("`sweep` of stage `{}` must be a table of lists", t.name), "not a table")
                .help("for example `sweep = { lr = [1e-3, 3e-3] }`"));
        };
        let mut grid = Vec::new();
        for (key, key_at, values_at) in spanned_entries(table, &g.value_at) {
            let values = &table[&key];
            let reject = |message: String, label: &str| Err(key_at.error(message, label));
            if key == "kind" || key == "sweep" {
                return reject(format!("stage `{}` cannot sweep `{key}`", t.name), "not a sweepable key");
            }
            if kind.inputs().iter().any(|s| s.name == key) {
                return Err(key_at
                    .error(format!("stage `{}` cannot sweep its input `{key}`", t.name), "an input slot")
                    .help("write one stage per input instead"));
            }
            if let Some(set) = t.given.get(&key) {
                return Err(set
                    .key_at
                    .error(format!("`{key}` of stage `{}` is both set and swept", t.name), "set here")
                    .help("remove this key, or remove it from `sweep`"));
            }
            let Some(list) = values.as_array() else {
                return Err(values_at.error(
                    format!("the values of `{key}` in the sweep of stage `{}` must be a list", t.name),
                    "not a list",
                ));
            };
            if list.is_empty() {
                return Err(values_at.error(
                    format!("the sweep of stage `{}` gives `{key}` no values", t.name),
                    "an empty grid runs nothing",
                ));
            }
            let places = spanned_elements(list.len(), &values_at);
            let mut seen = BTreeSet::new();
            for (v, at) in list.iter().zip(&places) {
                if !seen.insert(shown(v)) {
                    return Err(at.error(
                        format!("`{key}` = {} appears twice in the sweep of stage `{}`", shown(v), t.name),
                        "repeated",
                    ));
                }
            }
            grid.push(Grid { key, key_at, values: list.iter().cloned().zip(places).collect() });
        }
        out.push(grid);
    }
    Ok(out)
}

/// The value written at `at`, parsed again with spans (relative to `at`), if it parses as `T`.
fn reparse<T: serde::de::DeserializeOwned>(at: &Place) -> Option<T> {
    let text = &at.origin.text[at.span.clone()];
    toml::de::ValueDeserializer::parse(text).ok().and_then(|d| T::deserialize(d).ok())
}

/// The place of a span found inside the value written at `at`.
fn inside(at: &Place, span: std::ops::Range<usize>) -> Place {
    Place { span: at.span.start + span.start..at.span.start + span.end, ..at.clone() }
}

/// The keys of an inline table with where each key and its value are written, in written
/// order. A table written some other way (a `[stages.x.sweep]` header, a `--set` value that
/// is not an inline table) gets the whole table's place for everything.
fn spanned_entries(table: &toml::Table, at: &Place) -> Vec<(String, Place, Place)> {
    match reparse::<BTreeMap<Spanned<String>, Spanned<toml::Value>>>(at) {
        Some(map) if map.len() == table.len() => {
            let mut entries: Vec<_> =
                map.iter().map(|(k, v)| (k.get_ref().clone(), inside(at, k.span()), inside(at, v.span()))).collect();
            entries.sort_by_key(|(_, k, _)| k.span.start);
            entries
        }
        _ => table.keys().map(|k| (k.clone(), at.clone(), at.clone())).collect(),
    }
}

/// Where each element of a written list is, or the list's place for each.
fn spanned_elements(n: usize, at: &Place) -> Vec<Place> {
    match reparse::<Vec<Spanned<toml::Value>>>(at) {
        Some(list) if list.len() == n => list.iter().map(|v| inside(at, v.span())).collect(),
        _ => vec![at.clone(); n],
    }
}

/// Expand every table into its members. `order` is a topological order of the tables and
/// `upstream[t]` the tables whose outputs table `t` takes, in slot order.
pub(super) fn expand(
    tables: &[Table],
    kinds: &[Arc<dyn Stage>],
    order: &[usize],
    upstream: &[Vec<usize>],
) -> Result<Vec<Member>, RecipeError> {
    let grids = grids(tables, kinds)?;
    // A key swept by two stages is shown with its stage's name, so names stay unambiguous.
    let mut sweepers: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for (t, grid) in grids.iter().enumerate() {
        for g in grid {
            sweepers.entry(g.key.as_str()).or_default().insert(t);
        }
    }
    let label = |a: &Assign| {
        if sweepers[a.key.as_str()].len() > 1 {
            format!("{}.{}", tables[a.rank.0].name, a.key)
        } else {
            a.key.clone()
        }
    };

    let mut points: Vec<Vec<Vec<Assign>>> = vec![Vec::new(); tables.len()];
    for &t in order {
        let mut combos: Vec<Vec<Assign>> = vec![Vec::new()];
        for &u in &upstream[t] {
            let mut next = Vec::new();
            for a in &combos {
                for b in &points[u] {
                    if let Some(merged) = merge(a, b) {
                        next.push(merged);
                    }
                }
            }
            combos = next;
        }
        for (i, g) in grids[t].iter().enumerate() {
            let mut next = Vec::with_capacity(combos.len() * g.values.len());
            for a in &combos {
                for (value, value_at) in &g.values {
                    let mut point = a.clone();
                    point.push(Assign {
                        rank: (t, i),
                        key: g.key.clone(),
                        value: value.clone(),
                        value_at: value_at.clone(),
                        key_at: g.key_at.clone(),
                    });
                    next.push(point);
                }
            }
            combos = next;
            if combos.len() > MAX_MEMBERS {
                return Err(g.key_at.error(
                    format!("stage `{}` would expand into more than {MAX_MEMBERS} members", tables[t].name),
                    "this grid",
                ));
            }
        }
        points[t] = combos;
    }

    let name = |t: usize, point: &[Assign]| {
        if point.is_empty() {
            tables[t].name.clone()
        } else {
            let parts: Vec<String> = point.iter().map(|a| format!("{}={}", label(a), shown(&a.value))).collect();
            format!("{}[{}]", tables[t].name, parts.join(","))
        }
    };
    let mut members = Vec::new();
    for (t, table) in tables.iter().enumerate() {
        for point in &points[t] {
            let mut given = table.given.clone();
            given.remove("sweep");
            for a in point.iter().filter(|a| a.rank.0 == t) {
                given.insert(
                    a.key.clone(),
                    Given { value: a.value.clone(), key_at: a.key_at.clone(), value_at: a.value_at.clone() },
                );
            }
            // Inputs naming a stage that expanded take the member of the same grid point.
            for g in given.values_mut() {
                let Some(text) = g.value.as_str() else { continue };
                let Some(u) = upstream[t].iter().copied().find(|u| tables[*u].name == text) else { continue };
                let ranks: BTreeSet<(usize, usize)> =
                    points[u].first().map(|p| p.iter().map(|a| a.rank).collect()).unwrap_or_default();
                let restricted: Vec<Assign> = point.iter().filter(|a| ranks.contains(&a.rank)).cloned().collect();
                g.value = toml::Value::String(name(u, &restricted));
            }
            let point_shown = point.iter().map(|a| (label(a), shown(&a.value))).collect();
            members.push(Member { table: t, name: name(t, point), given, point: point_shown });
        }
    }
    Ok(members)
}

/// Two grid points combined, or `None` when they disagree on a value both hold.
fn merge(a: &[Assign], b: &[Assign]) -> Option<Vec<Assign>> {
    let mut out: Vec<Assign> = a.to_vec();
    for x in b {
        match out.iter().find(|y| y.rank == x.rank) {
            Some(y) if y.value != x.value => return None,
            Some(_) => {}
            None => out.push(x.clone()),
        }
    }
    out.sort_by_key(|x| x.rank);
    Some(out)
}
