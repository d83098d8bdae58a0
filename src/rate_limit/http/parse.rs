//! Parsers for the forwarding headers. Total: any input gives a result, never a panic
//! (fuzzed in `fuzz/fuzz_targets/forwarded_headers.rs`).

use std::net::{IpAddr, SocketAddr};

/// One hop of `X-Forwarded-For` or `Forwarded: for=`: an address, or `None` for an
/// entry that is not one (`unknown`, an obfuscated `_name`, garbage).
fn hop(raw: &str) -> Option<IpAddr> {
    let raw = raw.trim().trim_matches('"');
    if let Ok(ip) = raw.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    // `[2001:db8::1]` without a port.
    raw.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| r.parse::<IpAddr>().ok())
}

/// The hops of an `X-Forwarded-For` value, left (client side) to right (nearest proxy).
pub fn x_forwarded_for(value: &str) -> Vec<Option<IpAddr>> {
    value.split(',').map(hop).collect()
}

/// The `for=` hops of a `Forwarded` value (RFC 7239), left to right. An element without
/// `for=` counts as an unknown hop.
pub fn forwarded_for(value: &str) -> Vec<Option<IpAddr>> {
    split_outside_quotes(value, ',')
        .into_iter()
        .map(|element| {
            split_outside_quotes(element, ';')
                .into_iter()
                .find_map(|pair| {
                    let (name, v) = pair.split_once('=')?;
                    name.trim().eq_ignore_ascii_case("for").then_some(v)
                })
                .and_then(hop)
        })
        .collect()
}

/// Splits on `sep` where it is not inside a quoted string (quotes may hold `,` and `;`).
/// A quote never closed opens no string: from the part holding it on, the value is split
/// on every `sep` (a client's unclosed quote must not swallow the well-formed elements
/// its proxy appended after it).
fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if quoted {
        parts.extend(s[start..].split(sep));
    } else {
        parts.push(&s[start..]);
    }
    parts
}

/// The `Retry-After` value in whole seconds (`delay-seconds` form); `None` for an
/// HTTP-date or anything else.
pub fn retry_after_seconds(value: &str) -> Option<u64> {
    let v = value.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Saturate absurd values rather than fail: "a very long time".
    Some(v.parse::<u64>().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("test address"))
    }

    #[test]
    fn x_forwarded_for_hops() {
        assert_eq!(
            x_forwarded_for("203.0.113.7, 10.0.0.1 ,2001:db8::1,garbage, 198.51.100.2:8080"),
            vec![
                ip("203.0.113.7"),
                ip("10.0.0.1"),
                ip("2001:db8::1"),
                None,
                ip("198.51.100.2")
            ]
        );
        assert_eq!(x_forwarded_for(""), vec![None]);
    }

    #[test]
    fn forwarded_hops() {
        let v = r#"for=192.0.2.43;proto=https, for="[2001:db8:cafe::17]:4711", for=unknown, by=10.0.0.1, For="_hidden", for="198.51.100.1;x,y""#;
        assert_eq!(
            forwarded_for(v),
            vec![
                ip("192.0.2.43"),
                ip("2001:db8:cafe::17"),
                None,
                None,
                None,
                None
            ]
        );
        assert_eq!(forwarded_for("for=[::1]"), vec![ip("::1")]);
        // An unclosed quote opens no string: the elements after it are read.
        assert_eq!(
            forwarded_for("for=\"x, for=198.51.100.7;proto=http"),
            vec![None, ip("198.51.100.7")]
        );
    }

    #[test]
    fn retry_after() {
        assert_eq!(retry_after_seconds("120"), Some(120));
        assert_eq!(retry_after_seconds(" 0 "), Some(0));
        assert_eq!(
            retry_after_seconds("99999999999999999999999"),
            Some(u64::MAX)
        );
        assert_eq!(retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_after_seconds("-1"), None);
        assert_eq!(retry_after_seconds(""), None);
    }
}
