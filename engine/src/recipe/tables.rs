//! The recipe's stage tables as written, across `extends`: every value keeps the file, span
//! and folder it came from, so an error points into the file that wrote the bad value and a
//! relative path starts from that file's folder.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::raw::{self, RawRecipe};
use crate::error::{Origin, RecipeError};

/// Where a value came from: its text, its span, and the folder relative paths start from.
#[derive(Clone)]
pub(super) struct Place {
    pub origin: Arc<Origin>,
    pub span: Range<usize>,
    pub base: PathBuf,
}

impl Place {
    pub fn error(&self, message: impl Into<String>, label: impl Into<String>) -> RecipeError {
        RecipeError::new(message).at(&self.origin, self.span.clone(), label)
    }
}

/// One key of a stage table: its value and where the key and the value are written.
#[derive(Clone)]
pub(super) struct Given {
    pub value: toml::Value,
    pub key_at: Place,
    pub value_at: Place,
}

/// One `[stages.NAME]` table, merged over the tables of the same name in the recipes it extends.
pub(super) struct Table {
    pub name: String,
    /// Where the stage is first written.
    pub name_at: Place,
    pub kind: Option<Given>,
    /// Every key but `kind`.
    pub given: BTreeMap<String, Given>,
}

/// The `[recipe]` header of the top recipe, the seed inherited if it sets none.
pub(super) struct Header {
    pub name: String,
    pub name_at: Place,
    pub seed: Option<(i64, Place)>,
    /// The `[executor]` table, this recipe's or else the nearest one it extends.
    pub executor: Option<BTreeMap<String, Given>>,
    pub at: Place,
}

/// Read the recipe in `origin` and the chain of recipes it extends. `base` is its folder,
/// `path` its path (to detect cycles of `extends`).
pub(super) fn read(origin: Arc<Origin>, base: &Path, path: &Path) -> Result<(Header, Vec<Table>), RecipeError> {
    read_chain(origin, base, path, &mut Vec::new())
}

fn read_chain(
    origin: Arc<Origin>,
    base: &Path,
    path: &Path,
    chain: &mut Vec<(PathBuf, String)>,
) -> Result<(Header, Vec<Table>), RecipeError> {
    let raw: RawRecipe = raw::parse(&origin.text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        RecipeError::new(format!("invalid recipe: {}", e.message())).at(&origin, span, "here")
    })?;
    let here = |span: Range<usize>| Place { origin: origin.clone(), span, base: base.to_path_buf() };
    chain.push((std::fs::canonicalize(path).unwrap_or_else(|_| base.join(path)), origin.name.clone()));

    let header = raw.recipe.get_ref();
    let (mut inherited_seed, mut inherited_executor, mut tables) = match &header.extends {
        None => (None, None, Vec::new()),
        Some(extends) => {
            let at = here(extends.span());
            let shown = Path::new(&origin.name).parent().unwrap_or(Path::new("")).join(extends.get_ref());
            let parent_path = base.join(extends.get_ref());
            let canonical = std::fs::canonicalize(&parent_path).map_err(|e| {
                at.error(format!("cannot read `{}`, which this recipe extends: {e}", shown.display()), "not readable")
            })?;
            if let Some(first) = chain.iter().position(|(p, _)| *p == canonical) {
                let mut cycle: Vec<String> = chain[first..].iter().map(|(_, shown)| shown.clone()).collect();
                cycle.push(chain[first].1.clone());
                return Err(at
                    .error(format!("recipes extend each other in a cycle: {}", cycle.join(" -> ")), "closes the cycle")
                    .help("each arrow reads \"extends\""));
            }
            let text = std::fs::read_to_string(&parent_path).map_err(|e| {
                at.error(format!("cannot read `{}`, which this recipe extends: {e}", shown.display()), "not readable")
            })?;
            let parent_origin = Arc::new(Origin { name: shown.display().to_string(), text });
            let parent_base = parent_path.parent().map(Path::to_path_buf).unwrap_or_default();
            let (parent, tables) = read_chain(parent_origin, &parent_base, &parent_path, chain)?;
            (parent.seed, parent.executor, tables)
        }
    };
    chain.pop();

    // This file's stages in the order they are written, each merged over the inherited table
    // of the same name or added after the inherited ones.
    let mut own: Vec<_> = raw.stages.iter().collect();
    own.sort_by_key(|(n, _)| n.span().start);
    for (name, table) in own {
        let mut kind = None;
        let mut given = BTreeMap::new();
        for (k, v) in table.get_ref() {
            let g = Given { value: v.get_ref().clone(), key_at: here(k.span()), value_at: here(v.span()) };
            if k.get_ref() == "kind" {
                kind = Some(g);
            } else {
                given.insert(k.get_ref().clone(), g);
            }
        }
        match tables.iter_mut().find(|t: &&mut Table| t.name == *name.get_ref()) {
            Some(inherited) => {
                if let (Some(new), Some(old)) = (&kind, &inherited.kind) {
                    if new.value != old.value {
                        return Err(new
                            .value_at
                            .error(
                                format!(
                                    "stage `{}` is a {} stage in `{}`; a recipe that extends it may change its \
                                     keys but not its kind",
                                    name.get_ref(),
                                    old.value,
                                    old.value_at.origin.name
                                ),
                                "another kind",
                            )
                            .help("give the new stage a name of its own"));
                    }
                }
                if let Some(sweep) = given.get("sweep") {
                    drop_swept(&mut inherited.given, &sweep.value);
                }
                inherited.given.extend(given);
            }
            None => tables.push(Table { name: name.get_ref().clone(), name_at: here(name.span()), kind, given }),
        }
    }
    if let Some(seed) = &header.seed {
        inherited_seed = Some((*seed.get_ref(), here(seed.span())));
    }
    if let Some(executor) = &raw.executor {
        let given = executor.iter().map(|(k, v)| {
            (
                k.get_ref().clone(),
                Given { value: v.get_ref().clone(), key_at: here(k.span()), value_at: here(v.span()) },
            )
        });
        inherited_executor = Some(given.collect());
    }
    let header = Header {
        name: header.name.get_ref().clone(),
        name_at: here(header.name.span()),
        seed: inherited_seed,
        executor: inherited_executor,
        at: here(raw.recipe.span()),
    };
    Ok((header, tables))
}

/// Remove the keys a new `sweep` varies from a table that set them: an extending recipe or a
/// `--set` that sweeps a key replaces the single value it had.
pub(super) fn drop_swept(given: &mut BTreeMap<String, Given>, sweep: &toml::Value) {
    if let Some(grid) = sweep.as_table() {
        given.retain(|key, _| !grid.contains_key(key));
    }
}
