//! `grpc-timeout` values from a caller never panic the gateway's parser (no overflow,
//! whatever the digits), and it accepts exactly the spec's grammar, `1*8DIGIT` and a unit
//! (`H`, `M`, `S`, `m`, `u`, `n`), with the duration the value says.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use seawall::gateway::grpc::parse_timeout;

fuzz_target!(|value: &[u8]| {
    let parsed = parse_timeout(value);
    let expected = std::str::from_utf8(value).ok().and_then(|s| {
        let unit = s.chars().last()?;
        let digits = &s[..s.len() - unit.len_utf8()];
        if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let nanos: u128 = match unit {
            'H' => 3_600_000_000_000,
            'M' => 60_000_000_000,
            'S' => 1_000_000_000,
            'm' => 1_000_000,
            'u' => 1_000,
            'n' => 1,
            _ => return None,
        };
        let total = u128::from(n) * nanos;
        Some(Duration::new(
            u64::try_from(total / 1_000_000_000).ok()?,
            (total % 1_000_000_000) as u32,
        ))
    });
    assert_eq!(parsed, expected, "{value:?}");
});
