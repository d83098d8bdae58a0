//! The request headers the gateway checks and rewrites: `Host` (RFC 9112 §3.2), one
//! `Authorization` on authenticated routes, hop-by-hop headers (RFC 9110 §7.6.1) and the
//! forwarding headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`).
//!
//! Public (hidden from the docs) for the fuzz target `request_headers`; not a stable API.
//!
//! What the upstream gets, from a peer that is **not** a trusted proxy (every peer, unless
//! `[gateway] trusted_proxies` names it):
//!
//! * `X-Forwarded-For`: the peer's address, alone;
//! * `Host`: the endpoint's own address (`host:port`), written by the upstream
//!   connection, as nginx's default `proxy_set_header Host $proxy_host` does;
//! * `X-Forwarded-Host`: the request's `Host` (none for an HTTP/1.0 request without one);
//! * `X-Forwarded-Proto`: `http`;
//! * no `Forwarded`, no `X-Real-IP`, and no other `X-Forwarded-*` (`-Port`, `-Prefix`,
//!   `-Ssl`…), nor the other fields upstreams read a client's address from
//!   (`X-Client-IP`, `CF-Connecting-IP`, `True-Client-IP`, `Fastly-Client-IP`,
//!   `X-Cluster-Client-IP`, `X-Forwarded`, `Forwarded-For` and a few more) or a path to
//!   serve instead of the request's (`X-Original-URL`, `X-Rewrite-URL`): whatever the
//!   client sent of these is dropped, spelled with `_` for `-` too (`X_Forwarded_For`),
//!   which CGI-style upstreams read as the same field.
//!
//! From a trusted proxy, its headers are believed and extended: the peer's address is
//! appended to `X-Forwarded-For` (every line of it, joined) and, if the proxy sent one, to
//! `Forwarded` (`for=…`); its `X-Forwarded-Host` / `-Proto` are kept (ours are set when it
//! sent none), as are `X-Real-IP`, the other `X-Forwarded-*` and the fields above.
//!
//! Hop-by-hop headers are dropped, and so are the headers `Connection` names, except the
//! end-to-end ones the exchange depends on: `Host`, `Authorization` and `Content-Length`
//! are never removed that way (RFC 9110 forbids naming them; a client that does is ignored
//! on that point rather than obeyed).
//!
//! A client that sends none of these headers costs one pass over the header names and no
//! allocation.

use std::net::IpAddr;

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// How many hop-by-hop headers have a name of their own in `http`.
const HOP_BY_HOP_LEN: usize = 7;
/// The hop-by-hop headers of RFC 9110 §7.6.1 with a name of their own in `http`.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Headers a `Connection` option never removes.
const PROTECTED: [HeaderName; 3] = [header::HOST, header::AUTHORIZATION, header::CONTENT_LENGTH];

/// [`remove_hop_by_hop`]'s bit for `name`: bit *i* for `HOP_BY_HOP[i]`, then
/// `keep-alive` and `proxy-connection`; 0 for any other name.
#[inline]
pub(crate) fn hop_bit(name: &HeaderName) -> u16 {
    // Names are lower case: one match on the text (by length first), not a comparison
    // with each entry of the list (this runs for every field of every message).
    match name.as_str() {
        "connection" => 1,
        "proxy-authenticate" => 1 << 1,
        "proxy-authorization" => 1 << 2,
        "te" => 1 << 3,
        "trailer" => 1 << 4,
        "transfer-encoding" => 1 << 5,
        "upgrade" => 1 << 6,
        "keep-alive" => KEEP_ALIVE,
        "proxy-connection" => PROXY_CONNECTION,
        _ => 0,
    }
}

/// [`hop_bit`] of `keep-alive`, past the bits of [`HOP_BY_HOP`].
pub(crate) const KEEP_ALIVE: u16 = 1 << HOP_BY_HOP_LEN;
/// [`hop_bit`] of `proxy-connection`.
const PROXY_CONNECTION: u16 = KEEP_ALIVE << 1;

#[inline]
fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_bit(name) != 0
}

/// What a client may not set: the fields upstreams read the client's address or the
/// request's path from. `Forwarded`, `X-Real-IP` and every `X-Forwarded-*`; the other
/// client-address fields common libraries read, often before `X-Forwarded-For`
/// (`request-ip`, `django-ipware`, many handlers taking `CF-Connecting-IP` first):
/// `X-Client-IP`, `CF-Connecting-IP`, `CF-Connecting-IPv6`, `CF-Pseudo-IPv4`,
/// `Fastly-Client-IP`, `True-Client-IP`, `X-Cluster-Client-IP`, `X-Forwarded`,
/// `Forwarded-For`, `X-Original-Forwarded-For`, `X-AppEngine-User-IP`, `Client-IP` (PHP's
/// `HTTP_CLIENT_IP`, read first by countless applications), `X-Originating-IP`,
/// `X-Remote-IP`, `X-Remote-Addr`; and the path
/// overrides of IIS and Symfony (`X-Original-URL`, `X-Rewrite-URL`), which would have the
/// upstream serve another path than the route matched. With `_` for any `-` too
/// (`X_Forwarded_For`, `X-Real_IP`): CGI-style upstreams (Rack, PHP, WSGI) read both
/// spellings as the same `HTTP_X_FORWARDED_FOR`, so a client's underscored field would
/// reach them as the forwarded client.
#[inline]
pub(crate) fn is_forwarding(name: &HeaderName) -> bool {
    /// Whether `name` is `expected`, a `_` in it standing for a `-`.
    #[inline]
    fn same(name: &[u8], expected: &[u8]) -> bool {
        name.len() == expected.len()
            && name
                .iter()
                .zip(expected)
                .all(|(&n, &e)| n == e || (n == b'_' && e == b'-'))
    }
    let name = name.as_str().as_bytes();
    // By length first: this runs for every field of every request, and nearly every
    // field's length picks no candidate or one whose first byte differs.
    let listed = match name.len() {
        9 => name == b"forwarded" || same(name, b"x-real-ip") || same(name, b"client-ip"),
        11 => {
            same(name, b"x-client-ip") || same(name, b"x-forwarded") || same(name, b"x-remote-ip")
        }
        13 => {
            same(name, b"forwarded-for")
                || same(name, b"x-rewrite-url")
                || same(name, b"x-remote-addr")
        }
        14 => {
            same(name, b"true-client-ip")
                || same(name, b"cf-pseudo-ipv4")
                || same(name, b"x-original-url")
        }
        16 => {
            same(name, b"cf-connecting-ip")
                || same(name, b"fastly-client-ip")
                || same(name, b"x-originating-ip")
        }
        18 => same(name, b"cf-connecting-ipv6"),
        19 => same(name, b"x-cluster-client-ip") || same(name, b"x-appengine-user-ip"),
        24 => same(name, b"x-original-forwarded-for"),
        _ => false,
    };
    listed
        || name
            .get(..12)
            .is_some_and(|start| same(start, b"x-forwarded-"))
}

/// Why a request is answered `400 Bad Request` before it reaches a route's stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// An HTTP/1.1 request without `Host`.
    MissingHost,
    /// More than one `Host` line.
    DuplicateHost,
    /// A `Host` that is not `host[:port]`.
    InvalidHost,
    /// More than one `Authorization` line on a route with `auth = true`.
    DuplicateAuthorization,
}

impl BadRequest {
    /// The message of the 400.
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingHost => "missing Host header",
            Self::DuplicateHost => "more than one Host header",
            Self::InvalidHost => "invalid Host header",
            Self::DuplicateAuthorization => "more than one Authorization header",
        }
    }
}

/// Checks a request as it enters a route: exactly one valid `Host` in HTTP/1.1 (RFC 9112
/// §3.2; HTTP/1.0 requests may have none, as HTTP/1.0 has no `Host`, but not two), and at
/// most one `Authorization` when the route checks tokens (`auth`), so that the token
/// verified is the one forwarded. No allocation.
pub fn check_request(version: Version, headers: &HeaderMap, auth: bool) -> Result<(), BadRequest> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if version != Version::HTTP_10 && version != Version::HTTP_09 => {
            return Err(BadRequest::MissingHost);
        }
        (None, _) => {}
        (Some(_), Some(_)) => return Err(BadRequest::DuplicateHost),
        (Some(host), None) => {
            if !valid_host(host.as_bytes()) {
                return Err(BadRequest::InvalidHost);
            }
        }
    }
    if auth {
        check_authorization(headers)?;
    }
    Ok(())
}

/// At most one `Authorization`, on routes that check tokens: the token verified is then
/// the one forwarded. No allocation.
pub fn check_authorization(headers: &HeaderMap) -> Result<(), BadRequest> {
    match headers.get_all(header::AUTHORIZATION).iter().nth(1) {
        Some(_) => Err(BadRequest::DuplicateAuthorization),
        None => Ok(()),
    }
}

/// `host[:port]`: a registered name (letters, digits, `-._~` and `%`-escapes), an IPv4
/// address or a bracketed IPv6 literal, and a port of up to 5 digits. Empty is valid
/// (RFC 9112 §3.2: a target without authority). Stricter than RFC 3986's `reg-name` on
/// purpose: no sub-delimiters (`,;=!$&'()*+`), which no host name has.
fn valid_host(host: &[u8]) -> bool {
    if host.is_empty() {
        return true;
    }
    let (name, port) = if host[0] == b'[' {
        let Some(end) = host.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &host[1..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &host[end + 1..] {
            [] => (&host[..0], None),
            [b':', port @ ..] => (&host[..0], Some(port)),
            _ => return false,
        }
    } else {
        // One pass, one table lookup a byte: the name's bytes up to a `:`.
        match host.iter().position(|&b| !HOST_NAME[usize::from(b)]) {
            None => (host, None),
            Some(colon) if host[colon] == b':' => (&host[..colon], Some(&host[colon + 1..])),
            Some(_) => return false,
        }
    };
    let port_ok = port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    port_ok && (host[0] == b'[' || !name.is_empty())
}

/// The bytes of a host name [`valid_host`] accepts: letters, digits, `-._~` and `%`.
const HOST_NAME: [bool; 256] = {
    let mut ok = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        ok[b] = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'%');
        b += 1;
    }
    ok
};

/// Rewrites a request's headers for the upstream (see the [module docs](self)):
/// hop-by-hop headers out, forwarding headers replaced (`trusted_peer`: extended) from
/// what the gateway saw. `peer` is the peer's address as `X-Forwarded-For` writes it;
/// `https` whether its connection came over TLS (`X-Forwarded-Proto`). `Host` is left in
/// place (the upstream connection sets its own).
pub fn rewrite_for_upstream(
    headers: &mut HeaderMap,
    peer: Option<&HeaderValue>,
    trusted_peer: bool,
    https: bool,
) {
    rewrite(headers, peer, trusted_peer, https)
        .forwarded
        .insert_into(headers);
}

/// What [`rewrite`] leaves to whoever writes the request upstream.
pub(crate) struct Rewritten {
    /// The forwarding fields to add to the request (none when a trusted proxy's were
    /// extended in the map).
    pub(crate) forwarded: Forwarded,
    /// The request had `TE: trailers` (removed with the other hop-by-hop fields).
    pub(crate) te_trailers: bool,
}

/// [`rewrite_for_upstream`], but for the forwarding fields the gateway sets on a request
/// from an untrusted peer: these are returned rather than inserted (the map has none of
/// that name left), for the HTTP/1 client to write after the map's, without three
/// insertions into the map and three removals from it.
pub(crate) fn rewrite(
    headers: &mut HeaderMap,
    peer: Option<&HeaderValue>,
    trusted_peer: bool,
    https: bool,
) -> Rewritten {
    let proto = if https { Proto::Https } else { Proto::Http };
    // One pass over the fields finds out what there is to do, and the `Host`.
    let (mut hop, mut forwarding, mut host) = (false, false, None);
    for (name, value) in headers.iter() {
        hop |= is_hop_by_hop(name);
        forwarding |= is_forwarding(name);
        if host.is_none() && name == header::HOST {
            host = Some(value);
        }
    }
    // Never removed below: neither hop-by-hop nor a forwarding field.
    let host = host.filter(|h| !h.is_empty()).cloned();
    let mut te_trailers = false;
    if hop {
        te_trailers = headers
            .get(header::TE)
            .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
        remove_hop_by_hop(headers);
    }
    if forwarding && !trusted_peer {
        strip_forwarding(headers);
    }
    let mut forwarded = Forwarded::default();
    if trusted_peer {
        if let Some(peer) = peer {
            append_forwarded_for(headers, peer);
            append_forwarded(headers, peer);
        }
        if let Some(host) = host {
            if !headers.contains_key(&X_FORWARDED_HOST) {
                headers.insert(X_FORWARDED_HOST.clone(), host);
            }
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), proto.value());
        }
    } else {
        // Whatever the client sent of these is gone (`strip_forwarding`): ours are the
        // only ones.
        forwarded = Forwarded {
            // The connection's own value, shared: no allocation.
            r#for: peer.cloned(),
            host,
            proto: Some(proto),
        };
    }
    Rewritten {
        forwarded,
        te_trailers,
    }
}

/// The `X-Forwarded-For`, `-Host` and `-Proto` fields the gateway sets on a request, kept
/// out of its map: see [`rewrite`].
///
/// The scheme is one of two static values, kept as which one: the request's exchange
/// carries these fields from the route to the endpoint's connection, moved a few times
/// on the way, and a third `HeaderValue` would add 40 bytes to every move.
#[derive(Clone, Debug, Default)]
pub(crate) struct Forwarded {
    r#for: Option<HeaderValue>,
    host: Option<HeaderValue>,
    proto: Option<Proto>,
}

/// `X-Forwarded-Proto`'s value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proto {
    Http,
    Https,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    fn value(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

impl Forwarded {
    /// Puts the fields into `headers`, replacing any of the same name.
    pub(crate) fn insert_into(self, headers: &mut HeaderMap) {
        for (name, value) in [
            (&X_FORWARDED_FOR, self.r#for),
            (&X_FORWARDED_HOST, self.host),
            (&X_FORWARDED_PROTO, self.proto.map(Proto::value)),
        ] {
            if let Some(value) = value {
                headers.insert(name.clone(), value);
            }
        }
    }

    /// Writes the fields as HTTP/1 field lines.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for (name, value) in [
            (
                &X_FORWARDED_FOR,
                self.r#for.as_ref().map(HeaderValue::as_bytes),
            ),
            (
                &X_FORWARDED_HOST,
                self.host.as_ref().map(HeaderValue::as_bytes),
            ),
            (
                &X_FORWARDED_PROTO,
                self.proto.map(|p| p.as_str().as_bytes()),
            ),
        ] {
            if let Some(value) = value {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// Drops `Forwarded`, `X-Real-IP` and every `X-Forwarded-*`.
fn strip_forwarding(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_forwarding(n))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// `X-Forwarded-For: <all lines joined>, <peer>`.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &HeaderValue) {
    let mut lines = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if lines.peek().is_none() {
        headers.insert(X_FORWARDED_FOR.clone(), peer.clone());
        return;
    }
    let mut value = Vec::new();
    for line in lines {
        value.extend_from_slice(line.as_bytes());
        value.extend_from_slice(b", ");
    }
    value.extend_from_slice(peer.as_bytes());
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// `Forwarded: <all lines joined>, for=<peer>`, if the trusted proxy sent one.
fn append_forwarded(headers: &mut HeaderMap, peer: &HeaderValue) {
    let mut lines = headers.get_all(header::FORWARDED).iter().peekable();
    if lines.peek().is_none() {
        return;
    }
    let mut value = Vec::new();
    for line in lines {
        value.extend_from_slice(line.as_bytes());
        value.extend_from_slice(b", ");
    }
    // RFC 7239 §6: IPv6 addresses are bracketed and quoted.
    let v6 = std::str::from_utf8(peer.as_bytes())
        .ok()
        .and_then(|p| p.parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_ipv6());
    if v6 {
        value.extend_from_slice(b"for=\"[");
        value.extend_from_slice(peer.as_bytes());
        value.extend_from_slice(b"]\"");
    } else {
        value.extend_from_slice(b"for=");
        value.extend_from_slice(peer.as_bytes());
    }
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(header::FORWARDED, v);
    }
}

/// Drops the hop-by-hop headers of RFC 9110 §7.6.1, and those `Connection` names, except
/// `Host`, `Authorization` and `Content-Length`. One pass over the names finds which are
/// there (most messages have none, a response from a keep-alive upstream only
/// `Connection`), and only those are looked up and removed; `Connection` options that are
/// such names already (`keep-alive`) cost no parse and no allocation.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        present |= hop_bit(name);
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is `Connection`.
    // Nearly always `Connection: keep-alive` or `close`, which name nothing else: no list
    // to collect then.
    let names_others = || {
        headers.get_all(header::CONNECTION).iter().any(|v| {
            v.as_bytes().split(|&b| b == b',').any(|token| {
                let token = std::str::from_utf8(token).map_or("", str::trim);
                !token.is_empty() && !removed_anyway(token)
            })
        })
    };
    if present & 1 != 0 && names_others() {
        for name in connection_named(headers) {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if present & KEEP_ALIVE != 0 {
        headers.remove("keep-alive");
    }
    if present & PROXY_CONNECTION != 0 {
        headers.remove("proxy-connection");
    }
}

/// The fields `headers`' `Connection` names beyond the hop-by-hop ones and the protected
/// (`Host`, `Authorization`, `Content-Length`): what [`remove_hop_by_hop`] removes for
/// it, and what the HTTP/1 client takes out of the message's trailers too.
pub(crate) fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !removed_anyway(token))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .filter(|name| !PROTECTED.contains(name))
        .collect()
}

/// Fields a trailer section may not carry on, whatever it says: a recipient needs them
/// before the content (framing, routing, the content's form: RFC 9110 §6.5.1), and a
/// client merging trailers into the head would take them as the message's own.
const NOT_IN_TRAILERS: [HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::HOST,
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
];

/// Takes out of an upstream's trailer section what a proxy may not forward in one, from
/// any upstream: the hop-by-hop fields and those its own `Connection` names
/// ([`remove_hop_by_hop`]), and those [`NOT_IN_TRAILERS`] lists. gRPC's `grpc-status` and
/// every other field pass. (The fields an HTTP/1 head named in `Connection` are taken out
/// by the HTTP/1 client, where that head is known: RFC 9110 §7.6.1 says "header or
/// trailer field".)
pub(crate) fn sanitize_trailers(trailers: &mut HeaderMap) {
    remove_hop_by_hop(trailers);
    for name in &NOT_IN_TRAILERS {
        if trailers.contains_key(name) {
            trailers.remove(name);
        }
    }
}

/// Takes out of a client's request trailer section what [`sanitize_trailers`] takes out of
/// an upstream's, and what a client may not set in a head it could otherwise set there:
/// the forwarding fields (see [`is_forwarding`]), `Authorization` and `Cookie` (checked,
/// or not, in the head: an upstream merging trailers into the head would take them as
/// the request's own; RFC 9110 §6.5.1 keeps authentication out of trailers). Over
/// HTTP/2 the hop-by-hop fields would also make hyper refuse the trailers and leave the
/// upstream's stream open until the route timed out, blamed on the endpoint. (The
/// fields the head's `Connection` named are not known here: those named in the head go
/// anyway, as for any client.)
pub(crate) fn sanitize_request_trailers(trailers: &mut HeaderMap) {
    sanitize_trailers(trailers);
    for name in [header::AUTHORIZATION, header::COOKIE] {
        if trailers.contains_key(&name) {
            trailers.remove(name);
        }
    }
    if trailers.keys().any(is_forwarding) {
        strip_forwarding(trailers);
    }
}

/// Whether a `Connection` option names a header [`remove_hop_by_hop`] removes in any
/// case (when present).
fn removed_anyway(token: &str) -> bool {
    token.eq_ignore_ascii_case("keep-alive")
        || token.eq_ignore_ascii_case("proxy-connection")
        || HOP_BY_HOP
            .iter()
            .any(|h| token.eq_ignore_ascii_case(h.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_keep_only_what_may_follow_the_content() {
        let mut trailers = HeaderMap::new();
        for (name, value) in [
            ("grpc-status", "0"),
            ("grpc-message", "ok"),
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("host", "elsewhere"),
            ("content-type", "text/html"),
            ("connection", "x-in-trailers"),
            ("x-in-trailers", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
        ] {
            trailers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        sanitize_trailers(&mut trailers);
        let left: Vec<&str> = trailers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["grpc-status", "grpc-message", "x-other"]);
    }

    #[test]
    fn hop_bits_follow_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_bit(name), 1 << i, "{name}");
        }
        let keep_alive = HeaderName::from_static("keep-alive");
        let proxy_connection = HeaderName::from_static("proxy-connection");
        assert_eq!(hop_bit(&keep_alive), KEEP_ALIVE);
        assert_eq!(hop_bit(&proxy_connection), PROXY_CONNECTION);
        for other in [header::HOST, header::DATE, header::CONTENT_LENGTH] {
            assert_eq!(hop_bit(&other), 0, "{other}");
        }
        assert_eq!(hop_bit(&HeaderName::from_static("x-upgrade")), 0);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn all(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_but_not_host() {
        let mut h = map(&[
            (
                "connection",
                "close, x-secret, host, authorization, content-length",
            ),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("host", "a.example"),
            ("authorization", "Bearer t"),
            ("content-length", "3"),
            ("x-kept", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["authorization", "content-length", "host", "x-kept"]);
    }

    #[test]
    fn connection_options_that_are_hop_by_hop_names_are_removed_once() {
        let mut h = map(&[
            ("connection", "Keep-Alive, X-Foo, close"),
            ("keep-alive", "timeout=5"),
            ("x-foo", "1"),
            ("close", "1"),
            ("content-type", "text/plain"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type"]);
        // A keep-alive upstream's answer: only `Connection` to drop.
        let mut h = map(&[("connection", "keep-alive"), ("content-length", "2")]);
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length"]);
        // Named but absent, and protected names: nothing else goes.
        let mut h = map(&[
            ("connection", "upgrade, te, content-length"),
            ("content-length", "2"),
            ("proxy-connection", "keep-alive"),
        ]);
        remove_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length"]);
    }

    proptest::proptest! {
        /// The table-driven check accepts exactly the hosts the rule spelled out accepts.
        #[test]
        fn host_check_matches_its_rule(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a", "Z", "9", "-", ".", "_", "~", "%", ":", "[", "]", "::1", "80",
                    "123456", " ", ",", "/", "@", "\u{0}", "\u{7f}", "é",
                ]),
                0..8,
            ),
        ) {
            let host = parts.concat();
            let rule = |host: &[u8]| {
                if host.is_empty() || host[0] == b'[' {
                    return None;
                }
                let (name, port) = match host.iter().position(|&b| b == b':') {
                    Some(colon) => (&host[..colon], Some(&host[colon + 1..])),
                    None => (host, None),
                };
                let name_ok = name.iter().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%')
                });
                let port_ok =
                    port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
                Some(name_ok && port_ok && !name.is_empty())
            };
            if let Some(expected) = rule(host.as_bytes()) {
                proptest::prop_assert_eq!(valid_host(host.as_bytes()), expected, "{:?}", host);
            }
        }
    }

    #[test]
    fn host_checks() {
        let ok = |v: &str| valid_host(v.as_bytes());
        for good in [
            "a.example",
            "a.example:8080",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:80",
            "x_y-z~",
            "",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "a b", "a,b", "a/b", "a:123456", "a:x", "[::1", "[]", "[::1]x", ":80", "a@b",
        ] {
            assert!(!ok(bad), "{bad}");
        }
        let h11 = Version::HTTP_11;
        assert_eq!(
            check_request(h11, &map(&[]), false),
            Err(BadRequest::MissingHost)
        );
        assert_eq!(check_request(Version::HTTP_10, &map(&[]), false), Ok(()));
        assert_eq!(
            check_request(h11, &map(&[("host", "a"), ("host", "a")]), false),
            Err(BadRequest::DuplicateHost)
        );
        let two_tokens = map(&[
            ("host", "a"),
            ("authorization", "x"),
            ("authorization", "y"),
        ]);
        assert_eq!(check_request(h11, &two_tokens, false), Ok(()));
        assert_eq!(
            check_request(h11, &two_tokens, true),
            Err(BadRequest::DuplicateAuthorization)
        );
    }

    #[test]
    fn untrusted_peers_get_fresh_forwarding_headers() {
        let mut h = map(&[
            ("host", "gw.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-port", "1"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        let peer = HeaderValue::from_static("198.51.100.1");
        rewrite_for_upstream(&mut h, Some(&peer), false, false);
        assert_eq!(all(&h, "x-forwarded-for"), ["198.51.100.1"]);
        assert_eq!(all(&h, "x-forwarded-host"), ["gw.example"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(all(&h, "host"), ["gw.example"]);
        for gone in ["x-forwarded-port", "forwarded", "x-real-ip"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn trusted_proxies_are_appended_to() {
        let mut h = map(&[
            ("host", "gw.internal"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "10.0.0.9"),
            ("x-forwarded-host", "shop.example"),
            ("forwarded", "for=203.0.113.7"),
        ]);
        let peer = HeaderValue::from_static("2001:db8::1");
        rewrite_for_upstream(&mut h, Some(&peer), true, false);
        assert_eq!(
            all(&h, "x-forwarded-for"),
            ["203.0.113.7, 10.0.0.9, 2001:db8::1"]
        );
        assert_eq!(all(&h, "x-forwarded-host"), ["shop.example"]);
        assert_eq!(all(&h, "x-forwarded-proto"), ["http"]);
        assert_eq!(
            all(&h, "forwarded"),
            ["for=203.0.113.7, for=\"[2001:db8::1]\""]
        );
    }
}
