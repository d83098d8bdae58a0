//! The Consul health-answer parser's memory, counted by a byte-counting global allocator
//! (its own test binary, so that no other test's allocations are counted).
//!
//! The client caps an answer at 64 MiB ("a health answer for thousands of instances is a
//! few MiB"); a hostile agent's body within the cap must not make the parser allocate
//! gigabytes. The parser built the whole array before filtering it, about 220 times the
//! body for `[0,0,…]` (each two bytes a whole entry plus a skipped-entry record): 14 GiB
//! at the cap.
#![allow(unsafe_code)] // the byte-counting allocator's `unsafe impl GlobalAlloc`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use seawall::consul::{HealthResponse, parse_agent_services, parse_health_response};

/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most `LIVE` reached since it was last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, SeqCst) + by;
    PEAK.fetch_max(now, SeqCst);
}

// SAFETY: every call is passed on to the system allocator unchanged; the counters are
// only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller's contract for `alloc`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller's contract for `dealloc`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the caller's contract for `realloc`.
        let q = unsafe { System.realloc(ptr, layout, new_size) };
        if !q.is_null() {
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new_size, SeqCst);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The most the parser may allocate, as a multiple of the body.
const MAX_RATIO: f64 = 16.0;

/// `[` + `n` copies of `item` separated by `,` + `]`, inside `prefix` and `suffix`.
fn array_body(prefix: &str, item: &str, n: usize, suffix: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(prefix.len() + n * (item.len() + 1) + suffix.len() + 2);
    body.extend_from_slice(prefix.as_bytes());
    body.push(b'[');
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item.as_bytes());
    }
    body.push(b']');
    body.extend_from_slice(suffix.as_bytes());
    body
}

/// Runs `parse` on `body`, returning its answer, after checking its peak allocation is at
/// most `max_ratio` times the body.
fn measured<T>(what: &str, body: &[u8], max_ratio: f64, parse: impl FnOnce(&[u8]) -> T) -> T {
    let base = LIVE.load(SeqCst);
    PEAK.store(base, SeqCst);
    let parsed = parse(body);
    let peak = PEAK.load(SeqCst) - base;
    let ratio = peak as f64 / body.len() as f64;
    eprintln!(
        "{what}: body {} bytes, peak {peak} bytes ({ratio:.1}x); at the 64 MiB cap: {:.2} GiB",
        body.len(),
        ratio * 64.0 / 1024.0
    );
    assert!(
        ratio <= max_ratio,
        "{what}: a {} byte body made the parser allocate {peak} bytes ({ratio:.0}x): the \
         64 MiB cap admits ~{:.1} GiB",
        body.len(),
        ratio * 64.0 / 1024.0
    );
    parsed
}

/// Parses `body` as a health answer, within [`MAX_RATIO`].
fn measure(what: &str, body: &[u8]) -> HealthResponse {
    measured(what, body, MAX_RATIO, |b| parse_health_response(b).unwrap())
}

/// The most the agent services' parser may allocate, as a multiple of the body: a
/// string of two bytes (`"",`) is a 24-byte `String`, the most any entry grows.
const MAX_SERVICES_RATIO: f64 = 10.0;

/// Parses `body` as the agent's services, within [`MAX_SERVICES_RATIO`]; their number.
fn measure_services(what: &str, body: &[u8]) -> usize {
    measured(what, body, MAX_SERVICES_RATIO, |b| {
        parse_agent_services(b).unwrap().len()
    })
}

/// One test, so that no other parse runs while one is measured.
#[test]
fn parsing_a_body_within_the_cap_allocates_a_bounded_multiple_of_it() {
    let n = 1 << 20; // bodies of 2 MiB and more

    // Entries that are not objects: each is skipped, all counted, the first 16 listed.
    let parsed = measure("[0,0,…]", &array_body("", "0", n, ""));
    assert_eq!(parsed.skipped_count, n);
    assert_eq!(parsed.skipped.len(), 16);
    assert!(parsed.instances.is_empty());

    // Undialable entries, each with a name to keep.
    let parsed = measure(
        "undialable entries",
        &array_body("", r#"{"Service":{"ID":"x"}}"#, n / 8, ""),
    );
    assert_eq!(parsed.skipped_count, n / 8);

    // One entry with a huge array of checks, tags or metadata.
    let one = |field: &str| {
        format!(r#"{{"Node":{{"Node":"n","Address":"h"}},"Service":{{"Port":1,{field}:"#)
    };
    let parsed = measure(
        "checks",
        &array_body(&format!("[{}0}},\"Checks\":", one("\"ID\"")), "0", n, "}]"),
    );
    assert_eq!(parsed.unhealthy, 1);
    let parsed = measure(
        "tags",
        &array_body(&format!("[{}", one("\"Tags\"")), "0", n, "}}]"),
    );
    assert!(parsed.instances[0].tags.is_empty());
    let parsed = measure(
        "string tags",
        &array_body(&format!("[{}", one("\"Tags\"")), "\"\"", n, "}}]"),
    );
    assert_eq!(parsed.instances[0].tags.len(), n);

    // The smallest dialable entries: every one an instance.
    let parsed = measure(
        "instances",
        &array_body("", r#"{"Service":{"Address":"a","Port":1}}"#, n / 16, ""),
    );
    assert_eq!(parsed.instances.len(), n / 16);

    // `GET /v1/agent/services` (the registration guard reads it every 30 s): it was
    // parsed into a tree of JSON values, 16 times the body for `[0,0,…]` (each two bytes
    // a 32-byte value), and more while the array doubled: a GiB at the cap.
    assert_eq!(
        measure_services("a service of [0,0,…]", &array_body("{\"x\":", "0", n, "}")),
        1
    );
    assert_eq!(
        measure_services(
            "a service of many tags",
            &array_body("{\"x\":{\"Tags\":", "\"\"", n, "}}")
        ),
        1
    );
    assert_eq!(
        measure_services(
            "a service of a huge object",
            &array_body("{\"x\":{\"Service\":\"s\",\"Weights\":", "{}", n, "}}")
        ),
        1
    );
}
