//! Path normalisation and route matching are total on any input: no panic, and a path
//! that is accepted comes out normal (starts with `/`, no `.` or `..` segment, no `//`
//! when merging, never a leading `//`, normalising it again changes nothing) and is
//! matched to the same route as it would be after a second pass.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use seawall::gateway::path::{
    PathOptions, after_prefix_segments, match_form, normalize, under_prefix,
};

const PREFIXES: [&str; 5] = ["/api/admin", "/api/open", "/api", "/a/b", "/"];

/// The longest prefix `path` falls under, as the gateway picks routes.
fn route(path: &str) -> Option<&'static str> {
    PREFIXES.into_iter().find(|p| under_prefix(path, p))
}

fuzz_target!(|input: (&str, bool, bool)| {
    let (path, normalize_path, merge_slashes) = input;
    let options = PathOptions {
        normalize: normalize_path,
        merge_slashes,
    };
    let Ok(normal) = normalize(path, options) else {
        return;
    };
    assert!(normal.starts_with('/'), "{path:?} -> {normal:?}");
    assert!(!normal.starts_with("//"), "{path:?} -> {normal:?}");
    if merge_slashes {
        assert!(!normal.contains("//"), "{path:?} -> {normal:?}");
    }
    for segment in normal.split('/') {
        let decoded = segment.replace("%2E", ".").replace("%2e", ".");
        assert!(
            decoded != "." && decoded != "..",
            "{path:?} -> {normal:?}: dot segment"
        );
    }
    if !normalize_path {
        // Nothing decoded: only slashes may have been merged.
        assert_eq!(
            normal.replace('/', ""),
            path.replace('/', ""),
            "{path:?} -> {normal:?}"
        );
    }
    // Idempotent, without a copy the second time.
    match normalize(&normal, options) {
        Ok(Cow::Borrowed(again)) => assert_eq!(again, &*normal),
        other => panic!("{path:?} -> {normal:?} -> {other:?}"),
    }
    // Every byte clients encode is encoded: a prefix, written encoded, matches it.
    assert!(normal.is_ascii(), "{path:?} -> {normal:?}");
    if let Some(prefix) = route(&normal) {
        assert!(under_prefix(&normal, prefix));
    }
    // Routed on its match form, stripped by the prefix's segments as written.
    let form = match_form(&normal);
    assert!(form.starts_with('/') && !form.contains("//"), "{normal:?} -> {form:?}");
    assert_eq!(match_form(&form), form, "{normal:?}: the match form is stable");
    if let Some(prefix) = route(&form) {
        let cut = after_prefix_segments(&normal, prefix);
        assert!(cut <= normal.len() && normal.is_char_boundary(cut));
        let rest = &normal[cut..];
        assert!(rest.is_empty() || rest.starts_with('/'), "{normal:?} -> {rest:?}");
    }
});
