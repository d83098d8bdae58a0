//! The `traceparent` parser and the request-id check are total on any input: no panic; a
//! value accepted re-encodes to a version `00` value that parses to the same trace, never
//! with an all-zero id; and a valid version `00` value re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seawall::gateway::trace::{TRACEPARENT_LEN, TraceParent, valid_request_id};

fuzz_target!(|input: &[u8]| {
    let _ = valid_request_id(input);
    if let Some(parsed) = TraceParent::parse(input) {
        assert_ne!(parsed.trace_id, [0; 16]);
        assert_ne!(parsed.parent_id, [0; 8]);
        let text = parsed.encode();
        assert_eq!(TraceParent::parse(&text), Some(parsed));
        if input.len() == TRACEPARENT_LEN && input.starts_with(b"00") {
            assert_eq!(&text[..], input);
        }
    }
});
