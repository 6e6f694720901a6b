//! The crate's modules form layers: what a module uses sits below it, so the import graph of
//! the crate's modules (`crate::<module>` references outside tests and comments) has no cycle,
//! and no module uses the router (`handlers`) back. Read from the sources, so a change that
//! closes a circle fails here with the circle it closed.

use std::collections::{BTreeMap, BTreeSet};

/// Every module file of `src/` (not the crate root) and the modules it refers to.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut sources = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        let Some(name) = path.file_stem().and_then(|n| n.to_str()) else { continue };
        if path.extension().is_some_and(|e| e == "rs") && name != "lib" && !name.ends_with("_tests") {
            sources.insert(name.to_string(), std::fs::read_to_string(&path).expect("a source is readable"));
        }
    }
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(name, text)| {
            let code = strip(text);
            let mut uses = BTreeSet::new();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    // `use crate::{a::X, b};`
                    let group = &group[..group.find('}').unwrap_or(group.len())];
                    uses.extend(group.split(',').filter_map(|item| {
                        let first = item.trim().split("::").next()?.trim();
                        modules.contains(first).then(|| first.to_string())
                    }));
                } else {
                    let first: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if modules.contains(&first) {
                        uses.insert(first);
                    }
                }
            }
            uses.remove(name);
            (name.clone(), uses)
        })
        .collect()
}

/// The source without its `#[cfg(test)] mod tests` and its comments.
fn strip(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// A cycle through `from`, if there is one (depth first, with the path so far).
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut circle = path[start..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(graph, next, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_import_graph_has_no_cycle() {
    let graph = graph();
    assert!(graph.len() > 40, "the modules were not found: {:?}", graph.keys());
    assert!(graph["write"].contains("state") && graph["handlers"].contains("write"), "references are not read");
    if let Some(circle) = cycle(&graph) {
        panic!("the modules import each other in a circle: {}", circle.join(" -> "));
    }
}

#[test]
fn no_module_uses_the_router() {
    let graph = graph();
    let users: Vec<&String> = graph.iter().filter(|(_, uses)| uses.contains("handlers")).map(|(m, _)| m).collect();
    assert!(users.is_empty(), "these modules use the router (handlers) back: {users:?}");
}

#[test]
fn a_circle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", &["b"][..]), ("b", &["c"]), ("c", &["a"]), ("d", &[])]
        .into_iter()
        .map(|(n, uses)| (n.to_string(), uses.iter().map(|u| u.to_string()).collect()))
        .collect();
    assert_eq!(cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let mut acyclic = graph.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&acyclic), None);
}
