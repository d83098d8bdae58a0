//! The forwarding-header parsers and the client-IP resolution are total on any input:
//! no panic, and the resolved client is either the peer or an address that appears in
//! the headers.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use seawall::rate_limit::http::{ClientIp, parse};

fuzz_target!(|input: (&str, &str, &str, &str)| {
    let (xff, forwarded, retry_after, net) = input;
    let xff_hops = parse::x_forwarded_for(xff);
    let fwd_hops = parse::forwarded_for(forwarded);
    let _ = parse::retry_after_seconds(retry_after);
    let _ = ClientIp::trusting([net]);

    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let key = ClientIp::trusting(["10.0.0.0/8", "::1"]).expect("valid networks");
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(xff) {
        headers.insert("x-forwarded-for", v);
    }
    if let Ok(v) = http::HeaderValue::from_str(forwarded) {
        headers.insert("forwarded", v);
    }
    // `Forwarded` counts when it is readable text.
    let forwarded_set = headers.get("forwarded").is_some_and(|v| v.to_str().is_ok());
    // X-Forwarded-For only, by default; Forwarded only when chosen.
    let client = key.resolve(peer, &headers);
    assert!(client == peer || xff_hops.contains(&Some(client)));
    let client = key.clone().forwarded_header().resolve(peer, &headers);
    assert!(client == peer || (forwarded_set && fwd_hops.contains(&Some(client))));
});
