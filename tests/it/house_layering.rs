//! The layering written in docs/architecture.md holds in the code: every `crate::<module>` (and
//! `margay::<module>`) a file of `src/` names is in a layer below the file's own module, or in the list the
//! document gives that module. Test code (`#[cfg(test)]` modules) may reach anywhere and is not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

struct Layering {
    /// Module -> its layer number.
    layer: BTreeMap<String, u32>,
    /// Module -> the only modules it may use, where the document narrows it.
    only: BTreeMap<String, BTreeSet<String>>,
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn layering() -> Layering {
    let doc = std::fs::read_to_string(manifest().join("docs/architecture.md"))
        .expect("docs/architecture.md is readable");
    let block = doc
        .split("```layers\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/architecture.md has a ```layers block");
    let mut l = Layering {
        layer: BTreeMap::new(),
        only: BTreeMap::new(),
    };
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some((module, uses)) = line.split_once(':') {
            l.only.insert(
                module.trim().to_string(),
                uses.split_whitespace().map(str::to_string).collect(),
            );
        } else {
            let mut words = line.split_whitespace();
            let n: u32 = words
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("layer line {line:?} does not start with its number"));
            for m in words {
                assert!(
                    l.layer.insert(m.to_string(), n).is_none(),
                    "{m} is in two layers"
                );
            }
        }
    }
    l
}

/// The top-level module a file of `src/` belongs to (`node.rs` and `node/x.rs` are `node`); None for lib.rs.
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The modules a file's non-test code names through `crate::` or `margay::`.
fn used_modules(text: &str) -> BTreeSet<String> {
    // Unit tests sit at the end of a file behind `#[cfg(test)]`; they may use anything.
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut used = BTreeSet::new();
    for prefix in ["crate::", "margay::"] {
        for (i, _) in code.match_indices(prefix) {
            let before = code[..i].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `foo_crate::` is not ours
            }
            let name: String = code[i + prefix.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let l = layering();
    let src = manifest().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    let mut seen = BTreeSet::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src").to_path_buf();
        let Some(module) = module_of(&rel) else {
            continue;
        };
        seen.insert(module.clone());
        let Some(&own) = l.layer.get(&module) else {
            broken.push(format!(
                "src/{}: module {module} is in no layer of docs/architecture.md",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read source");
        for used in used_modules(&text) {
            if used == module {
                continue;
            }
            let Some(&theirs) = l.layer.get(&used) else {
                continue; // not a module of ours (an extern crate named through `margay::` cannot happen)
            };
            let allowed = match l.only.get(&module) {
                Some(only) => only.contains(&used),
                None => theirs < own,
            };
            if !allowed {
                broken.push(format!(
                    "src/{}: {module} (layer {own}) uses {used} (layer {theirs})",
                    rel.display()
                ));
            }
        }
    }
    for m in l.layer.keys() {
        assert!(
            seen.contains(m),
            "docs/architecture.md lists {m}, which is no module of src/: keep the layers true"
        );
    }
    assert!(
        broken.is_empty(),
        "the layering of docs/architecture.md is broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_use() {
    // The check itself: a file of a lower layer naming a higher module is caught, test code is not read.
    let used = used_modules(
        "use crate::node::NodeArgs;\nfn f() { margay::cli::run(); my_crate::x(); }\n#[cfg(test)]\nmod tests { use crate::lab; }",
    );
    assert_eq!(
        used,
        ["cli", "node"].iter().map(|s| s.to_string()).collect()
    );
}
