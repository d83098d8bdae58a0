//! The gateway's request header checks and rewrite, on arbitrary header lists: no panic;
//! from an untrusted peer, no client-supplied `X-Forwarded-Host` / `X-Real-IP` /
//! `Forwarded` (or any other forwarding, client-address or path-override header, `_`
//! spellings too) survives, and `X-Forwarded-For` is the
//! peer alone; `Host` is never removed; no hop-by-hop header remains, nor any header
//! `Connection` named (but `Host`, `Authorization`, `Content-Length` and the forwarding
//! headers the gateway sets itself).
#![no_main]

use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use seawall::gateway::headers::{check_request, rewrite_for_upstream};

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];
const SET_BY_GATEWAY: [&str; 3] = ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"];
const PROTECTED: [&str; 3] = ["host", "authorization", "content-length"];
/// Client-address and path-override fields a client may not set (besides `forwarded`,
/// `x-real-ip` and `x-forwarded-*`), with `-` for any `_`.
const CLIENT_MAY_NOT_SET: [&str; 19] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "x-forwarded",
    "forwarded-for",
    "x-rewrite-url",
    "true-client-ip",
    "cf-pseudo-ipv4",
    "x-original-url",
    "cf-connecting-ip",
    "fastly-client-ip",
    "cf-connecting-ipv6",
    "x-cluster-client-ip",
    "x-appengine-user-ip",
    "x-original-forwarded-for",
    "client-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-originating-ip",
];

fn values(headers: &HeaderMap, name: &str) -> Vec<Vec<u8>> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect()
}

/// Whether the peer is trusted, whether the request is HTTP/1.0, and its header lines.
type Input = (bool, bool, Vec<(Vec<u8>, Vec<u8>)>);

fuzz_target!(|input: Input| {
    let (trusted, http10, lines) = input;
    let mut headers = HeaderMap::new();
    for (name, value) in lines {
        // Short, readable names mostly: the interesting ones are short.
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&name),
            HeaderValue::from_bytes(&value),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let version = if http10 {
        http::Version::HTTP_10
    } else {
        http::Version::HTTP_11
    };
    let _ = check_request(version, &headers, trusted);
    let _ = check_request(version, &headers, !trusted);

    let hosts = values(&headers, "host");
    let named: Vec<String> = headers
        .get_all("connection")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| HeaderName::from_bytes(n.as_bytes()).is_ok())
        .collect();
    let peer = HeaderValue::from_static("198.51.100.1");
    rewrite_for_upstream(&mut headers, Some(&peer), trusted, false);

    assert_eq!(
        values(&headers, "host"),
        hosts,
        "Host is never removed or changed"
    );
    for name in HOP_BY_HOP {
        assert!(!headers.contains_key(name), "hop-by-hop {name} remains");
    }
    for name in &named {
        if !PROTECTED.contains(&name.as_str()) && !SET_BY_GATEWAY.contains(&name.as_str()) {
            assert!(
                !headers.contains_key(name.as_str()),
                "{name} named in Connection remains"
            );
        }
    }
    if !trusted {
        for name in headers.keys() {
            let n = name.as_str();
            let dashed = n.replace('_', "-");
            assert!(
                !CLIENT_MAY_NOT_SET.contains(&dashed.as_str())
                    && (!dashed.starts_with("x-forwarded-") || SET_BY_GATEWAY.contains(&n)),
                "client-set {n} from an untrusted peer"
            );
        }
        assert_eq!(
            values(&headers, "x-forwarded-for"),
            [b"198.51.100.1".to_vec()]
        );
        assert_eq!(values(&headers, "x-forwarded-proto"), [b"http".to_vec()]);
        // X-Forwarded-Host is the (first) Host the gateway saw, or absent.
        let xfh = values(&headers, "x-forwarded-host");
        match hosts.first().filter(|h| !h.is_empty()) {
            Some(host) => assert_eq!(xfh, std::slice::from_ref(host)),
            None => assert!(xfh.is_empty()),
        }
    } else {
        let xff = values(&headers, "x-forwarded-for");
        assert_eq!(xff.len(), 1);
        assert!(xff[0].ends_with(b"198.51.100.1"));
    }
});
