//! The HTTP classifier never panics on any status or any `fail_on`/`ignore` setting, and
//! keeps its documented rules: 5xx fail unless ignored, 4xx succeed unless added, 600 to
//! 999 (no status codes) fail.
#![no_main]

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use seawall::circuit_breaker::{HttpClassifier, Outcome};

fuzz_target!(|input: (u16, Vec<u16>, Vec<u16>)| {
    let (status, fail_on, ignore) = input;
    let mut c = HttpClassifier::new();
    for s in fail_on.iter().filter_map(|s| StatusCode::from_u16(*s).ok()) {
        c = c.fail_on(s);
    }
    for s in ignore.iter().filter_map(|s| StatusCode::from_u16(*s).ok()) {
        c = c.ignore(s);
    }
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    let outcome = c.classify_status(status);
    let code = status.as_u16();
    let expected = if code >= 600 {
        Outcome::Failure
    } else if (500..600).contains(&code) {
        if ignore.contains(&code) {
            Outcome::Ignored
        } else {
            Outcome::Failure
        }
    } else if (400..500).contains(&code) && fail_on.contains(&code) {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    assert_eq!(outcome, expected);
});
