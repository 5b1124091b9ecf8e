//! The code map in docs/ARCHITECTURE.md is the rule, and this test holds the code to it: every
//! module of the library may use only the modules its row of the "Module dependencies" table
//! lists, lists nothing it does not use, the table names every module there is, and the modules
//! form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The top-level modules of the library (a file `src/x.rs` or a folder `src/x/`), without the
/// binary's `main.rs` and the crate root.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(repo().join("src")).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            out.insert(name, rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") && name != "main" && name != "lib" {
            out.insert(name, vec![p]);
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            files.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p);
        }
    }
    files
}

/// The modules a file uses through `crate::name` paths, comments left out (a doc link is not
/// a dependency).
fn uses(file: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end > 0 {
                out.insert(rest[..end].to_owned());
            }
        }
        // `use crate::{a, b::c}`
        if let Some(rest) = code.trim_start().strip_prefix("use crate::{") {
            for part in rest.split([',', '}']) {
                let name = part.trim().split("::").next().unwrap_or("").trim();
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    out.insert(name.to_owned());
                }
            }
        }
    }
    out
}

/// The table under "## Module dependencies": module -> the modules it may use.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(repo().join("docs/ARCHITECTURE.md")).unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Module dependencies"))
        .expect("docs/ARCHITECTURE.md has a \"Module dependencies\" section");
    let names = |cell: &str| -> BTreeSet<String> {
        cell.split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, n)| n.trim_end_matches('/').to_owned())
            .collect()
    };
    let mut out = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [module, deps, ..] = cells[..] else {
            continue;
        };
        let Some(module) = names(module).into_iter().next() else {
            continue;
        };
        out.insert(module, names(deps));
    }
    out
}

#[test]
fn modules_use_only_what_the_code_map_allows() {
    let allowed = allowed();
    let mut graph = BTreeMap::new();
    let mut wrong = Vec::new();
    for (module, files) in modules() {
        let Some(may) = allowed.get(&module) else {
            wrong.push(format!("{module} is not in the table"));
            continue;
        };
        let mut used = BTreeSet::new();
        for f in &files {
            for u in uses(f) {
                if u != module && !may.contains(&u) {
                    wrong.push(format!(
                        "{} uses crate::{u}, not allowed for {module}",
                        f.strip_prefix(repo()).unwrap().display()
                    ));
                }
                used.insert(u);
            }
        }
        used.remove(&module);
        for stale in may.difference(&used) {
            wrong.push(format!(
                "the table lets {module} use {stale}, which it does not: take it out"
            ));
        }
        graph.insert(module, used);
    }
    for module in allowed.keys() {
        if !graph.contains_key(module) {
            wrong.push(format!("the table names {module}, which is not a module"));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/ARCHITECTURE.md's table and src/ disagree:\n{}",
        wrong.join("\n")
    );

    // No cycle: repeatedly take away the modules that use nothing left, and those nothing
    // left uses; what remains is the cycles.
    let mut left = graph.clone();
    while let Some(m) = left
        .keys()
        .find(|m| {
            left[*m].iter().all(|d| !left.contains_key(d))
                || !left.values().any(|deps| deps.contains(*m))
        })
        .cloned()
    {
        left.remove(&m);
    }
    assert!(
        left.is_empty(),
        "modules that use each other in a cycle: {left:?}"
    );
}
