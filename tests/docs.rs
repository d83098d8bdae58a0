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

/// SECURITY.md's "What the gateway does not do" must not deny what the gateway does: its
/// limits are shared by a fleet of replicas through Redis (`policy = "redis"`, documented
/// in the README and the gateway's module docs, tested in `tests/fleet.rs`).
#[test]
fn security_md_does_not_deny_the_gateways_fleet_limits() {
    let readme = include_str!("../README.md");
    let gateway_docs = include_str!("../src/gateway/mod.rs");
    assert!(readme.contains("shared by a fleet of replicas through Redis"));
    assert!(gateway_docs.contains("`policy = \"redis\"`"));
    let security = include_str!("../SECURITY.md");
    let does_not_do = security
        .split("## What the gateway does not do")
        .nth(1)
        .expect("a \"What the gateway does not do\" section");
    let denial = does_not_do
        .split("\n- ")
        .find(|item| item.contains("Limits across gateway replicas"));
    assert!(
        denial.is_none(),
        "SECURITY.md says the gateway does not limit across replicas:\n- {}",
        denial.unwrap_or_default()
    );
}
