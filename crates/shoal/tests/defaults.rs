//! Every default is pinned: the default NMT, CTR and CNN configurations equal the TOML
//! recorded in `tests/fixtures/defaults/` (a changed default fails here and has to be
//! changed there on purpose), and the README's table of NMT configuration fields states
//! each field's default as the code has it.

use shoal_cnn::trainer::CnnTrainConfig;
use shoal_ctr::trainer::CtrTrainConfig;
use shoal_nmt::NmtTrainConfig;
use std::path::Path;

fn pinned(name: &str, toml_text: &str) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/defaults/{name}.toml"));
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (got, want): (toml::Table, toml::Table) = (
        toml::from_str(toml_text).unwrap(),
        toml::from_str(&want).unwrap(),
    );
    assert_eq!(
        got,
        want,
        "the default {name} configuration is not the one pinned in {}:\n{toml_text}",
        path.display()
    );
}

#[test]
fn default_configurations_are_pinned() {
    pinned("nmt", &NmtTrainConfig::default().to_toml());
    pinned("ctr", &toml::to_string(&CtrTrainConfig::default()).unwrap());
    pinned("cnn", &toml::to_string(&CnnTrainConfig::default()).unwrap());
}

/// The README's "Configuration fields" table: one row per section, each field written
/// `` `name` (default) ``, where the default is the TOML value (strings in backticks,
/// alternatives after `|` or an explanation after ` = ` or `:` allowed).
#[test]
fn readme_states_the_nmt_defaults() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let defaults: toml::Table = toml::from_str(&NmtTrainConfig::default().to_toml()).unwrap();
    for (section, fields) in &defaults {
        let fields = fields.as_table().unwrap();
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{section}` |")))
            .unwrap_or_else(|| panic!("README: no configuration row for [{section}]"));
        for (field, value) in fields {
            let key = format!("`{field}` (");
            let at = row.find(&key).unwrap_or_else(|| {
                panic!("README: [{section}] does not state `{field}`'s default")
            });
            let rest = &row[at + key.len()..];
            let stated = rest[..rest.find(')').unwrap()]
                .split(['|', '\\'])
                .next()
                .unwrap()
                .split(" = ")
                .next()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .trim()
                .trim_matches('`');
            let ok = match value {
                toml::Value::String(s) => s == stated,
                toml::Value::Integer(i) => stated.parse::<i64>() == Ok(*i),
                toml::Value::Float(f) => stated.parse::<f64>() == Ok(*f),
                toml::Value::Boolean(b) => stated.parse::<bool>() == Ok(*b),
                other => panic!("[{section}] {field}: no README form for {other}"),
            };
            assert!(
                ok,
                "README: [{section}] `{field}` is stated as ({stated}), the default is {value}"
            );
        }
    }
}
