//! The README's crate table is true to the workspace: one row per member crate, and its
//! "depends on (workspace)" column lists exactly the workspace crates in that crate's
//! `[dependencies]` (optional ones included). Dependencies also point down: the base
//! crates (optim, kernels, data, comm, control, compress, onnx, launch) depend on no
//! workload or runtime crate, and the runtime on no workload.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// Each member crate's workspace dependencies, from its `Cargo.toml`.
fn members() -> BTreeMap<String, BTreeSet<String>> {
    let root: toml::Table =
        toml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap())
            .unwrap();
    let mut out = BTreeMap::new();
    for m in root["workspace"]["members"].as_array().unwrap() {
        let dir = Path::new(ROOT).join(m.as_str().unwrap());
        let t: toml::Table =
            toml::from_str(&std::fs::read_to_string(dir.join("Cargo.toml")).unwrap()).unwrap();
        let name = t["package"]["name"].as_str().unwrap().to_string();
        let deps = t
            .get("dependencies")
            .and_then(|d| d.as_table())
            .map(|d| {
                d.keys()
                    .filter(|k| k.starts_with("shoal"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        out.insert(name, deps);
    }
    out
}

/// The README's table: crate -> its "depends on (workspace)" cell.
fn readme_table() -> BTreeMap<String, BTreeSet<String>> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let start = readme
        .find("| crate | owns | depends on (workspace) |")
        .expect("README: the crate table");
    let mut out = BTreeMap::new();
    for line in readme[start..].lines().skip(2) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let deps = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|d| *d != "-" && !d.is_empty())
            .map(String::from)
            .collect();
        out.insert(name, deps);
    }
    out
}

#[test]
fn readme_crate_table_matches_the_manifests() {
    let members = members();
    let table = readme_table();
    assert_eq!(
        members.keys().collect::<Vec<_>>(),
        table.keys().collect::<Vec<_>>(),
        "the README's crate table lists other crates than the workspace"
    );
    for (name, deps) in &members {
        assert_eq!(
            &table[name], deps,
            "README: {name} depends on {deps:?} (its Cargo.toml), the table says {:?}",
            table[name]
        );
    }
}

#[test]
fn dependencies_point_down() {
    let members = members();
    let upper = [
        "shoal",
        "shoal-nmt",
        "shoal-ctr",
        "shoal-cnn",
        "shoal-runtime",
    ];
    for base in [
        "shoal-optim",
        "shoal-kernels",
        "shoal-data",
        "shoal-comm",
        "shoal-control",
        "shoal-compress",
        "shoal-onnx",
        "shoal-launch",
    ] {
        for d in &members[base] {
            assert!(
                !upper.contains(&d.as_str()),
                "{base} (a base crate) depends on {d}"
            );
        }
    }
    for d in &members["shoal-runtime"] {
        assert!(
            !["shoal-nmt", "shoal-ctr", "shoal-cnn", "shoal"].contains(&d.as_str()),
            "the runtime depends on the workload crate {d}"
        );
    }
    for w in ["shoal-nmt", "shoal-ctr", "shoal-cnn"] {
        for d in &members[w] {
            assert!(
                !["shoal-nmt", "shoal-ctr", "shoal-cnn", "shoal"].contains(&d.as_str()),
                "the workload {w} depends on {d}"
            );
        }
    }
}
