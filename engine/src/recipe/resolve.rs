//! Raw recipe + overrides + registry -> [`Recipe`]: names turned into ids, defaults filled,
//! types and wiring checked, the graph checked acyclic. Every error points at a span.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};

use super::overrides::{self, Override};
use super::sweep;
use super::tables::{self, Given, Place, Table};
use super::{InputSource, Recipe, ResolvedInput, ResolvedStage, Resources, RESOURCE_KEYS};
use crate::error::{did_you_mean, Origin, RecipeError};
use crate::params::{Default, Params};
use crate::stage::{InputSpec, Registry, Stage, Vocabulary};

/// Keys every stage accepts besides its kind's own.
const COMMON_KEYS: [&str; 5] = ["kind", "seed", "threads", "sweep", "executor"];

/// Read, parse and resolve the recipe at `path` (and the recipes it extends), applying `--set`
/// overrides (whose relative paths start from `cwd`).
pub fn load(path: &Path, sets: &[String], registry: &Registry, cwd: &Path) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| RecipeError::new(format!("cannot read recipe `{}`: {e}", path.display())))?;
    let origin = Arc::new(Origin { name: path.display().to_string(), text });
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() { cwd.to_path_buf() } else { cwd.join(base) };
    let sets = sets.iter().map(|s| overrides::parse(s)).collect::<Result<Vec<_>, _>>()?;
    resolve(origin, &base, &sets, registry, cwd, path)
}

/// Resolve recipe text already read into `origin`.
pub fn resolve(
    origin: Arc<Origin>,
    base: &Path,
    sets: &[Override],
    registry: &Registry,
    cwd: &Path,
    path: &Path,
) -> Result<Recipe, RecipeError> {
    let (header, mut tables) = tables::read(origin.clone(), base, path)?;
    let mut seed = match &header.seed {
        Some((s, at)) => non_negative(*s, at, "seed")?,
        None => 0,
    };
    let resources = match &header.executor {
        Some(table) => {
            let entries = table.iter().map(|(k, g)| (k.as_str(), &g.value, &g.key_at, &g.value_at));
            read_resources(Resources::default(), entries, "the `[executor]` table")?
        }
        None => Resources::default(),
    };
    let name = header.name.clone();
    if name.trim().is_empty() {
        return Err(header.name_at.error("the recipe name is empty", "give the recipe a name"));
    }
    for t in &tables {
        let valid = t.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if t.name.is_empty() || !valid {
            return Err(t.name_at.error(
                format!("stage name `{}` may hold only letters, digits, `_` and `-`", t.name),
                "rename this stage",
            ));
        }
    }
    if tables.is_empty() {
        return Err(header.at.error("the recipe has no stages", "add a [stages.NAME] table"));
    }

    // Overrides of the recipe seed and of whole stages apply before sweeps expand (so that
    // `--set align.sweep=...` changes the grid); overrides of one member apply after.
    let mut member_sets = Vec::new();
    for o in sets {
        let at = |span: &Range<usize>| override_place(o, span, cwd);
        if o.stage == "recipe" {
            if o.key != "seed" {
                return Err(at(&o.key_span)
                    .error(format!("`recipe.{}` cannot be overridden", o.key), "only `recipe.seed` can be set"));
            }
            let Some(v) = o.value.as_integer() else {
                return Err(at(&o.value_span).error("the seed must be a non-negative integer", "not an integer"));
            };
            seed = non_negative(v, &at(&o.value_span), "seed")?;
        } else if let Some(t) = tables.iter_mut().find(|t| t.name == o.stage) {
            check_override(o, t, &at(&o.key_span))?;
            if o.key == "sweep" {
                tables::drop_swept(&mut t.given, &o.value);
            }
            t.given.insert(o.key.clone(), override_given(o, cwd));
        } else {
            member_sets.push(o);
        }
    }

    let kinds: Vec<Arc<dyn Stage>> =
        tables.iter().map(|t| resolve_kind(t, registry).cloned()).collect::<Result<_, _>>()?;
    // The graph between tables: checked acyclic before anything else, so a cycle is reported
    // as a cycle and not as some other mismatch, and walked to expand sweeps.
    let table_names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let mut edges: Vec<(usize, usize, Place)> = Vec::new();
    let mut upstream: Vec<Vec<usize>> = vec![Vec::new(); tables.len()];
    for (t, table) in tables.iter().enumerate() {
        for spec in kinds[t].inputs().iter().filter(|s| !s.accepts.types().is_empty()) {
            let Some(g) = table.given.get(spec.name) else { continue };
            let Some(u) = g.value.as_str().and_then(|text| table_names.iter().position(|n| *n == text)) else {
                continue;
            };
            edges.push((u, t, g.value_at.clone()));
            if !upstream[t].contains(&u) {
                upstream[t].push(u);
            }
        }
    }
    let table_order = topological_order(&table_names, &edges)?;
    let mut members = sweep::expand(&tables, &kinds, &table_order, &upstream)?;

    for o in member_sets {
        let at = |span: &Range<usize>| override_place(o, span, cwd);
        let Some(m) = members.iter_mut().find(|m| m.name == o.stage) else {
            let candidates: Vec<&str> =
                table_names.iter().copied().chain(members.iter().map(|m| m.name.as_str())).collect();
            let mut err =
                at(&o.stage_span).error(format!("no stage named `{}` in `{}`", o.stage, origin.name), "unknown stage");
            err.help = did_you_mean(&o.stage, candidates.iter().copied());
            return Err(err);
        };
        check_override(o, &tables[m.table], &at(&o.key_span))?;
        m.given.insert(o.key.clone(), override_given(o, cwd));
    }

    // First pass: parameters, and the raw text of each input slot.
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let mut stages = Vec::with_capacity(members.len());
    let mut wiring: Vec<Slots> = Vec::with_capacity(members.len());
    for m in &members {
        let table = &tables[m.table];
        let (mut resolved, slots) =
            resolve_stage(&m.name, &kinds[m.table], m.given.clone(), seed, &resources, &table.name_at)?;
        resolved.template = table.name.clone();
        resolved.point = m.point.clone();
        stages.push(resolved);
        wiring.push(slots);
    }

    // Second pass: find the stage each input names.
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    // The stage a slot takes its input from, if it names one and the slot takes stage outputs.
    let upstream = |spec: &InputSpec, text: &str| index.get(text).copied().filter(|_| !spec.accepts.types().is_empty());
    let mut edges: Vec<(usize, usize, Place)> = Vec::new();
    for (i, slots) in wiring.iter().enumerate() {
        for (spec, text, at) in slots {
            if let Some(from) = upstream(spec, text) {
                edges.push((from, i, at.clone()));
            }
        }
    }
    let order = topological_order(&names, &edges)?;

    // Third pass: wire inputs to stages or files, and check artifact types.
    let mut wired: Vec<(usize, &'static str, usize, Place)> = Vec::new();
    for (i, slots) in wiring.into_iter().enumerate() {
        for (spec, text, at) in slots {
            let slot = spec.name;
            let source = match upstream(spec, &text) {
                Some(from) => {
                    let produced = stages[from].kind.output();
                    if !spec.accepts.types().contains(&produced) {
                        let wanted: Vec<_> = spec.accepts.types().iter().map(|t| t.0).collect();
                        return Err(at.error(
                            format!(
                                "input `{slot}` of stage `{}` takes {}, but stage `{text}` produces {}",
                                stages[i].name,
                                wanted.join(" or "),
                                produced.0
                            ),
                            format!("a {} artifact", produced.0),
                        ));
                    }
                    wired.push((i, slot, from, at.clone()));
                    InputSource::Stage(from)
                }
                _ if spec.accepts.raw() => {
                    let path = at.base.join(&text);
                    if !path.exists() {
                        let mut err = at.error(
                            format!("input `{slot}` of stage `{}` names no stage and no file `{text}`", stages[i].name),
                            format!("not found (looked for {})", path.display()),
                        );
                        err.help = did_you_mean(&text, names.iter().copied());
                        return Err(err);
                    }
                    InputSource::Raw { path, shown: text }
                }
                _ => {
                    let mut err = at.error(
                        format!("input `{slot}` of stage `{}` names an unknown stage `{text}`", stages[i].name),
                        "no stage with this name",
                    );
                    err.help = did_you_mean(&text, names.iter().copied());
                    return Err(err);
                }
            };
            stages[i].inputs.push(ResolvedInput { slot, source });
        }
    }

    check_vocabularies(&stages, &order, &wired)?;
    check_shapes(&stages, &order, &wired, |i, key| {
        let m = &members[i];
        m.given.get(key).map_or(&tables[m.table].name_at, |g| &g.key_at).clone()
    })?;

    // Renumber stage ids into topological order.
    let mut new_id = vec![0; order.len()];
    for (new, &old) in order.iter().enumerate() {
        new_id[old] = new;
    }
    let mut slots: Vec<Option<ResolvedStage>> = stages.into_iter().map(Some).collect();
    let mut ordered = Vec::with_capacity(slots.len());
    for &old in &order {
        let mut stage = slots[old].take().expect("each stage is placed once");
        for input in &mut stage.inputs {
            if let InputSource::Stage(id) = &mut input.source {
                *id = new_id[*id];
            }
        }
        ordered.push(stage);
    }
    Ok(Recipe { name, path: path.to_path_buf(), seed, stages: ordered })
}

/// Refuse a stage whose inputs carry token ids from different tokenizers ([`Stage::same_vocabulary`]):
/// each stage's ids trace back to the stage that made their tokenizer ([`Vocabulary`]), and two
/// inputs that must agree must trace back to the same one. `wired` lists (stage, slot, upstream
/// stage, where the slot is written).
fn check_vocabularies(
    stages: &[ResolvedStage],
    order: &[usize],
    wired: &[(usize, &'static str, usize, Place)],
) -> Result<(), RecipeError> {
    let input = |i: usize, slot: &str| wired.iter().find(|(s, name, _, _)| *s == i && *name == slot);
    let mut origin: Vec<Option<usize>> = vec![None; stages.len()];
    for &i in order {
        origin[i] = match stages[i].kind.vocabulary() {
            Vocabulary::None => None,
            Vocabulary::Own => Some(i),
            Vocabulary::From(slot) => input(i, slot).and_then(|(_, _, from, _)| origin[*from]),
        };
    }
    for &i in order {
        let mut first: Option<(&str, usize, usize)> = None;
        for slot in stages[i].kind.same_vocabulary() {
            let Some((_, _, from, at)) = input(i, slot) else { continue };
            let Some(tokenizer) = origin[*from] else { continue };
            match first {
                None => first = Some((slot, *from, tokenizer)),
                Some((other_slot, other, other_tokenizer)) if other_tokenizer != tokenizer => {
                    let (a, b) = (&stages[*from].name, &stages[other].name);
                    let (ta, tb) = (&stages[tokenizer].name, &stages[other_tokenizer].name);
                    return Err(at
                        .error(
                            format!(
                                "stage `{}`: input `{slot}` (stage `{a}`) and input `{other_slot}` (stage `{b}`) \
                                 hold token ids of different vocabularies, from tokenizer stages `{ta}` and `{tb}`",
                                stages[i].name
                            ),
                            format!("vocabulary of `{ta}`"),
                        )
                        .help(format!("wire `{slot}` and `{other_slot}` to stages made with one tokenizer")));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Each stage's [`Stage::output_shape`] in DAG order, each handed what its upstream stages
/// told, then [`Stage::check_shapes`] on the same: a problem points at the key it names (or the
/// stage, when the key is not written), via `key_at(stage, key)`.
fn check_shapes(
    stages: &[ResolvedStage],
    order: &[usize],
    wired: &[(usize, &'static str, usize, Place)],
    key_at: impl Fn(usize, &str) -> Place,
) -> Result<(), RecipeError> {
    let mut shapes = vec![serde_json::Value::Null; stages.len()];
    for &i in order {
        let upstream: BTreeMap<&str, &serde_json::Value> =
            wired.iter().filter(|(s, _, _, _)| *s == i).map(|(_, slot, from, _)| (*slot, &shapes[*from])).collect();
        let stage = &stages[i];
        stage.kind.check_shapes(&stage.params, &upstream).map_err(|p| {
            key_at(i, &p.key).error(format!("stage `{}`: {}", stage.name, p.message), format!("`{}`", p.key))
        })?;
        shapes[i] = stage.kind.output_shape(&stage.params, &upstream);
    }
    Ok(())
}

fn non_negative(v: i64, at: &Place, what: &str) -> Result<u64, RecipeError> {
    u64::try_from(v).map_err(|_| at.error(format!("`{what}` must be a non-negative integer, found {v}"), "negative"))
}

fn resolve_kind<'r>(table: &Table, registry: &'r Registry) -> Result<&'r Arc<dyn Stage>, RecipeError> {
    let stage_name = &table.name;
    let known = registry.names().join(", ");
    let Some(kind) = &table.kind else {
        return Err(table
            .name_at
            .error(format!("stage `{stage_name}` has no `kind`"), "add `kind = \"...\"` to this table")
            .help(format!("kinds: {known}")));
    };
    let Some(kind_name) = kind.value.as_str() else {
        return Err(kind.value_at.error(format!("`kind` of stage `{stage_name}` must be a string"), "not a string"));
    };
    registry.get(kind_name).ok_or_else(|| {
        let mut err =
            kind.value_at.error(format!("unknown stage kind `{kind_name}` for stage `{stage_name}`"), "unknown kind");
        err.help = Some(match did_you_mean(kind_name, registry.names()) {
            Some(hint) => format!("{hint} (kinds: {known})"),
            None => format!("kinds: {known}"),
        });
        err
    })
}

/// A place in a `--set` argument; its relative paths start from `cwd`.
fn override_place(o: &Override, span: &Range<usize>, cwd: &Path) -> Place {
    Place { origin: o.origin.clone(), span: span.clone(), base: cwd.to_path_buf() }
}

/// The key a `--set` gives, as if the recipe wrote it.
fn override_given(o: &Override, cwd: &Path) -> Given {
    Given {
        value: o.value.clone(),
        key_at: override_place(o, &o.key_span, cwd),
        value_at: override_place(o, &o.value_span, cwd),
    }
}

/// Refuse a `--set` of a stage's kind, or of a key its sweep varies.
fn check_override(o: &Override, table: &Table, key_at: &Place) -> Result<(), RecipeError> {
    if o.key == "kind" {
        return Err(key_at.error("the kind of a stage cannot be overridden", "edit the recipe instead"));
    }
    let swept = table.given.get("sweep").and_then(|g| g.value.as_table()).is_some_and(|t| t.contains_key(&o.key));
    if swept {
        return Err(key_at.error(format!("`{}` is swept in stage `{}`", o.key, table.name), "a swept key").help(
            format!("change the grid instead, for example --set '{}.sweep={{ {} = [...] }}'", table.name, o.key),
        ));
    }
    Ok(())
}

/// The input slots a stage wires, with the text written for each and where it was written.
type Slots = Vec<(&'static InputSpec, String, Place)>;

fn resolve_stage(
    stage_name: &str,
    kind: &Arc<dyn Stage>,
    given: BTreeMap<String, Given>,
    recipe_seed: u64,
    recipe_resources: &Resources,
    name_at: &Place,
) -> Result<(ResolvedStage, Slots), RecipeError> {
    let mut resources = recipe_resources.clone();
    let mut params = Params::default();
    let mut slots = Vec::new();
    let mut seed = recipe_seed;
    let mut threads = None;
    let mut key_places: HashMap<String, Place> = HashMap::new();
    for (key, g) in given {
        key_places.insert(key.clone(), g.key_at.clone());
        let context = format!("`{key}` of stage `{stage_name}`");
        match key.as_str() {
            "seed" | "threads" => {
                let Some(v) = g.value.as_integer() else {
                    return Err(g
                        .value_at
                        .error(format!("{context} must be a non-negative integer"), "not an integer"));
                };
                let v = non_negative(v, &g.value_at, &key)?;
                if key == "seed" {
                    if !kind.uses_seed() {
                        return Err(g
                            .key_at
                            .error(format!("stage kind `{}` does not use a seed", kind.kind()), "remove this key"));
                    }
                    seed = v;
                } else {
                    threads = (v > 0).then_some(v as usize);
                }
            }
            "executor" => {
                let Some(table) = g.value.as_table() else {
                    return Err(g
                        .value_at
                        .error(format!("{context} must be a table of {}", RESOURCE_KEYS.join(", ")), "not a table"));
                };
                let entries = table.iter().map(|(k, v)| (k.as_str(), v, &g.value_at, &g.value_at));
                resources = read_resources(resources, entries, &context)?;
            }
            _ => {
                if let Some(spec) = kind.params().iter().find(|p| p.name == key) {
                    let value = spec
                        .convert(&g.value)
                        .map_err(|e| g.value_at.error(format!("{context}: {e}"), "wrong value"))?;
                    params.insert(spec.name, value);
                } else if let Some(spec) = kind.inputs().iter().find(|s| s.name == key) {
                    let Some(text) = g.value.as_str() else {
                        return Err(g.value_at.error(
                            format!("input {context} must be a string: a stage name or a path"),
                            "not a string",
                        ));
                    };
                    slots.push((spec, text.to_string(), g.value_at));
                } else {
                    let keys: Vec<&str> = kind
                        .params()
                        .iter()
                        .map(|p| p.name)
                        .chain(kind.inputs().iter().map(|s| s.name))
                        .chain(COMMON_KEYS)
                        .collect();
                    let mut err = g.key_at.error(
                        format!("unknown key `{key}` for stage `{stage_name}` (kind `{}`)", kind.kind()),
                        "unknown key",
                    );
                    err.help = Some(match did_you_mean(&key, keys.iter().copied()) {
                        Some(hint) => hint,
                        None => format!("keys of `{}`: {}", kind.kind(), keys.join(", ")),
                    });
                    return Err(err);
                }
            }
        }
    }
    for spec in kind.params() {
        if params.get(spec.name).is_some() {
            continue;
        }
        match spec.default_value() {
            Some(v) => params.insert(spec.name, v),
            None if matches!(spec.default, Default::Required) => {
                return Err(name_at.error(
                    format!("stage `{stage_name}` needs `{}` ({})", spec.name, spec.type_name()),
                    format!("`{}` missing here", spec.name),
                ));
            }
            None => {}
        }
    }
    let connected: BTreeSet<&str> = slots.iter().map(|(s, _, _)| s.name).collect();
    for spec in kind.inputs() {
        if spec.required && !connected.contains(spec.name) {
            return Err(name_at
                .error(
                    format!("stage `{stage_name}` needs input `{}`", spec.name),
                    format!("`{}` missing here", spec.name),
                )
                .help(spec.doc));
        }
    }
    kind.check(&params, &connected).map_err(|p| {
        let at = key_places.get(&p.key).unwrap_or(name_at);
        at.error(format!("stage `{stage_name}`: {}", p.message), format!("`{}`", p.key))
    })?;
    let stage = ResolvedStage {
        name: stage_name.to_string(),
        template: stage_name.to_string(),
        point: Vec::new(),
        kind: kind.clone(),
        params,
        seed,
        threads,
        resources,
        inputs: Vec::new(),
    };
    Ok((stage, slots))
}

/// `base` with the keys of an executor table (`what` names it in errors) set over it; each
/// entry is (key, value, where the key is written, where the value is).
fn read_resources<'a>(
    mut base: Resources,
    entries: impl IntoIterator<Item = (&'a str, &'a toml::Value, &'a Place, &'a Place)>,
    what: &str,
) -> Result<Resources, RecipeError> {
    for (key, v, key_at, value_at) in entries {
        let text = || {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| value_at.error(format!("`{key}` in {what} must be a string"), "not a string"))
        };
        match key {
            "partition" => base.partition = Some(text()?),
            "time" => base.time = Some(text()?),
            "mem" => base.mem = Some(text()?),
            "cpus" => match v.as_integer() {
                Some(n) if n > 0 && n <= u32::MAX as i64 => base.cpus = Some(n as u32),
                _ => {
                    return Err(value_at
                        .error(format!("`cpus` in {what} must be a positive integer"), "not a positive integer"))
                }
            },
            _ => {
                let mut err = key_at.error(format!("unknown key `{key}` in {what}"), "unknown key");
                err.help = Some(
                    did_you_mean(key, RESOURCE_KEYS)
                        .unwrap_or_else(|| format!("its keys are {}", RESOURCE_KEYS.join(", "))),
                );
                return Err(err);
            }
        }
    }
    Ok(base)
}

/// Kahn's algorithm, taking the earliest-written ready stage first so the order is stable.
/// On a cycle, the error prints it (`a -> b -> c -> a`) and points at the input that closes it.
fn topological_order(names: &[&str], edges: &[(usize, usize, Place)]) -> Result<Vec<usize>, RecipeError> {
    let mut graph: DiGraph<usize, usize> = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..names.len()).map(|i| graph.add_node(i)).collect();
    for (e, (from, to, _)) in edges.iter().enumerate() {
        graph.add_edge(nodes[*from], nodes[*to], e);
    }
    for scc in petgraph::algo::tarjan_scc(&graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() > 1 || self_loop {
            return Err(cycle_error(&graph, &scc, names, edges));
        }
    }
    let mut indegree: Vec<usize> =
        nodes.iter().map(|n| graph.neighbors_directed(*n, petgraph::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..names.len()).filter(|i| indegree[*i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(names.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for next in graph.neighbors(nodes[i]) {
            let j = graph[next];
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(Reverse(j));
            }
        }
    }
    assert_eq!(order.len(), names.len(), "an acyclic graph orders every stage");
    Ok(order)
}

fn cycle_error(
    graph: &DiGraph<usize, usize>,
    scc: &[NodeIndex],
    names: &[&str],
    edges: &[(usize, usize, Place)],
) -> RecipeError {
    // Walk from the earliest-written stage of the component back to itself (breadth-first, so
    // the cycle printed is a shortest one).
    let start = *scc.iter().min_by_key(|n| graph[**n]).expect("a component is non-empty");
    let mut parent: HashMap<NodeIndex, (NodeIndex, usize)> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut closing = None;
    'search: while let Some(n) = queue.pop_front() {
        for e in graph.edges(n) {
            use petgraph::visit::EdgeRef;
            let next = e.target();
            if !scc.contains(&next) {
                continue;
            }
            if next == start {
                closing = Some((n, *e.weight()));
                break 'search;
            }
            if let std::collections::hash_map::Entry::Vacant(v) = parent.entry(next) {
                v.insert((n, *e.weight()));
                queue.push_back(next);
            }
        }
    }
    let (last, closing_edge) = closing.expect("a strongly connected component has a cycle through every node");
    let mut path = vec![last];
    let mut n = last;
    while n != start {
        n = parent[&n].0;
        path.push(n);
    }
    // `path` is [last, ..., start], each stage followed by the one that feeds it; `start`
    // takes its input from `last`. Print it the way the recipe reads: a stage, then the stage
    // it takes its input from.
    path.insert(0, start);
    let text: Vec<&str> = path.iter().map(|n| names[graph[*n]]).collect();
    let at = &edges[closing_edge].2;
    at.error(format!("the recipe has a cycle: {}", text.join(" -> ")), "this input closes the cycle")
        .help("each arrow reads \"takes its input from\"; a stage cannot depend on its own output")
}
