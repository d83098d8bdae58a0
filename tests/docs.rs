//! The documentation that must not drift: the README's feature table is the crate docs'
//! (`src/lib.rs`), and every feature in `Cargo.toml` is in it.

fn rows(text: &str, prefix: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter(|l| l.starts_with("| `"))
        .skip_while(|l| !l.starts_with("| `http`"))
        .take_while(|l| l.starts_with("| `"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_and_the_crate_docs_list_the_same_features() {
    let readme = include_str!("../README.md");
    let lib = include_str!("../src/lib.rs");
    let from_readme = rows(readme, "");
    let from_lib = rows(lib, "//! ");
    assert!(from_readme.len() >= 9, "{from_readme:#?}");
    assert_eq!(from_readme, from_lib);

    let manifest = include_str!("../Cargo.toml");
    let features = manifest
        .split("[features]")
        .nth(1)
        .and_then(|s| s.split("\n[").next())
        .expect("a [features] section");
    for line in features.lines() {
        let Some((name, _)) = line.split_once(" = ") else {
            continue;
        };
        if name == "default" || name.starts_with('#') {
            continue;
        }
        assert!(
            from_readme
                .iter()
                .any(|r| r.starts_with(&format!("| `{name}`"))),
            "feature {name} is not in the README's table"
        );
    }
}
