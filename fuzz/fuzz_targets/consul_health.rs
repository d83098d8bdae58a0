//! The Consul health-answer parser is total on any input: no panic, a decode error for
//! anything that is not a JSON array (or null), and every instance it returns dialable
//! (a non-empty address, a port other than 0, a weight of at least 1).
#![no_main]

use libfuzzer_sys::fuzz_target;
use seawall::consul::parse_health_response;

fuzz_target!(|data: &[u8]| {
    match parse_health_response(data) {
        Ok(response) => {
            for instance in &response.instances {
                assert!(!instance.address.is_empty());
                assert_ne!(instance.port, 0);
                assert!(instance.weight.get() >= 1);
            }
        }
        Err(e) => assert!(e.is_decode(), "{e}"),
    }
    // The same bytes wrapped as one entry exercise the per-entry leniency.
    let mut wrapped = Vec::with_capacity(data.len() + 2);
    wrapped.push(b'[');
    wrapped.extend_from_slice(data);
    wrapped.push(b']');
    let _ = parse_health_response(&wrapped);
});
