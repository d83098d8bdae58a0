//! Ready-made key extractors for HTTP requests.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{HeaderName, Request};

use super::parse;
use crate::rate_limit::{BoundedKey, KeyExtractor};

pub use ipnet::IpNet;

/// An address or network that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidNet(String);

impl fmt::Display for InvalidNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid trusted proxy {:?}: expected an IP address or a CIDR network such as 10.0.0.0/8",
            self.0
        )
    }
}

impl std::error::Error for InvalidNet {}

/// A trusted proxy: a CIDR network (`10.0.0.0/8`, `2001:db8::/32`) or a single address
/// (`::1`, a network of one). An IPv4-mapped one (`::ffff:10.0.0.1`, `::ffff:10.0.0.0/104`,
/// as a dual-stack socket and its logs show an IPv4 peer) is its IPv4 form, as peers are
/// read (see [`canonical_net`]).
pub(crate) fn parse_net(s: &str) -> Result<IpNet, InvalidNet> {
    let t = s.trim();
    if t.contains('/') {
        t.parse::<IpNet>().map_err(|_| InvalidNet(s.to_owned()))
    } else {
        t.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| InvalidNet(s.to_owned()))
    }
    .map(canonical_net)
}

/// A network within the IPv4-mapped range (`::ffff:0:0/96`, a prefix of 96 or more) as
/// the IPv4 network it maps: [`net_contains`] reads a mapped peer as its IPv4 address, so
/// a network left in its IPv6 form would contain no peer at all. Others are unchanged
/// (`::/0` trusts IPv6 peers, not IPv4 ones).
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// Whether `ip` is in `net`; an IPv4-mapped IPv6 address (`::ffff:10.1.1.1`, what a
/// dual-stack socket reports for an IPv4 peer) counts as its IPv4 address.
pub(crate) fn net_contains(net: &IpNet, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    net.contains(&ip)
}

/// The client's IP address: the connection's peer address, or, when the peer is a
/// trusted proxy, the address that proxy reports in `X-Forwarded-For` (or, with
/// [`forwarded_header`](Self::forwarded_header), in `Forwarded`, RFC 7239). Exactly one
/// of the two headers is read, the one your proxies write: a header they merely pass
/// through is the client's to forge.
///
/// Headers are believed only from the proxies named here, and only as far as they go:
/// the hops are read from the right (nearest) and the first one that is not a trusted
/// proxy is the client. A client cannot pick its own key by sending these headers, since
/// what it sends sits to the left of the address its first trusted proxy appended.
///
/// The peer address is read from the request's extensions, as a [`SocketAddr`] (insert it
/// where the connection is accepted: `req.extensions_mut().insert(peer)` in a hyper
/// `service_fn`) or, with the feature `axum`, as axum's `ConnectInfo<SocketAddr>` (serve
/// the router with `into_make_service_with_connect_info::<SocketAddr>()`). A request
/// without either has no key: [`HttpRateLimitLayer`](super::HttpRateLimitLayer) then
/// answers per its [`OnMissingKey`](super::OnMissingKey), `500` by default.
///
/// ```
/// use std::net::SocketAddr;
/// use seawall::rate_limit::KeyExtractor;
/// use seawall::rate_limit::http::ClientIp;
///
/// let key = ClientIp::trusting(["10.0.0.0/8"])?;
/// let mut req = http::Request::builder()
///     .header("x-forwarded-for", "6.6.6.6, 203.0.113.9")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert("10.1.2.3:443".parse::<SocketAddr>().unwrap());
/// assert_eq!(key.extract(&req), Some("203.0.113.9".parse().unwrap()));
/// # Ok::<(), seawall::rate_limit::http::InvalidNet>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClientIp {
    /// Shared: services clone their extractor, often once per request. `None` when
    /// nothing is trusted, so that cloning [`ClientIp::peer`] touches no shared count.
    trusted: Option<std::sync::Arc<[IpNet]>>,
    use_forwarded: bool,
    /// The leading bits of an IPv6 address that make its key.
    ipv6_prefix: u8,
}

/// The default [`ClientIp::ipv6_prefix`]: a /64, the network one subscriber or host is
/// given (RFC 6177), within which it picks addresses at will.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

impl Default for ClientIp {
    fn default() -> Self {
        Self {
            trusted: None,
            use_forwarded: false,
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
        }
    }
}

impl ClientIp {
    /// The peer address only; forwarding headers are ignored.
    pub fn peer() -> Self {
        Self::default()
    }

    /// Keys an IPv6 client by its first `bits` bits (default [`DEFAULT_IPV6_PREFIX`], 64;
    /// 128: each address alone). A host given a /64, as most are, holds 2^64 addresses
    /// and can use a new one for every request: keyed by the whole address, each would
    /// get a bucket and a full burst of its own, and the limit would hold nothing back
    /// (and fill a keyed limiter's table, pushing other clients into its overflow
    /// bucket). IPv4 addresses, and IPv4 clients seen as IPv4-mapped IPv6 addresses
    /// (`::ffff:203.0.113.9` on a dual-stack socket), are keyed by the IPv4 address.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`](crate::ConfigError) naming `ipv6_prefix` for more than 128 bits.
    pub fn ipv6_prefix(mut self, bits: u8) -> Result<Self, crate::ConfigError> {
        if bits > 128 {
            return Err(crate::ConfigError::invalid(
                "ipv6_prefix",
                format!("{bits} bits: an IPv6 prefix is at most 128"),
            ));
        }
        if bits == 0 {
            return Err(crate::ConfigError::invalid(
                "ipv6_prefix",
                "0 bits: every IPv6 client would share one key (one client's use would \
                 refuse them all); 64 keys each subscriber's network",
            ));
        }
        self.ipv6_prefix = bits;
        Ok(self)
    }

    /// The key of the client at `ip` ([`resolve`](Self::resolve)'s answer): an IPv4
    /// address as it is (an IPv4-mapped IPv6 one as its IPv4 address), an IPv6 one cut
    /// to its [`ipv6_prefix`](Self::ipv6_prefix) (the rest of its bits zero).
    pub fn key_of(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u32::from(self.ipv6_prefix);
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            v4 => v4,
        }
    }

    /// Believes forwarding headers from these proxies (addresses or CIDR networks). One
    /// written IPv4-mapped (`::ffff:10.0.0.1`, as a dual-stack socket reports an IPv4
    /// peer) is its IPv4 address.
    ///
    /// A network of every address (`0.0.0.0/0`, `::/0`) trusts every peer: any client
    /// can then name the address it is keyed and limited as, and a per-client limit
    /// holds nobody. It is accepted (a fleet behind a load balancer whose addresses are
    /// not known may need it) and, with the `tracing` feature, logged as a `WARN`.
    pub fn trusting<I, S>(proxies: I) -> Result<Self, InvalidNet>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let trusted: Vec<IpNet> = proxies
            .into_iter()
            .map(|p| parse_net(p.as_ref()))
            .collect::<Result<_, _>>()?;
        warn_if_everyone(&trusted);
        let trusted = (!trusted.is_empty()).then(|| trusted.into());
        Ok(Self {
            trusted,
            ..Self::default()
        })
    }

    /// Believes forwarding headers from these networks, already parsed ([`IpNet`] is the
    /// [`ipnet`](https://docs.rs/ipnet) crate's, re-exported). Every address trusted is
    /// logged, as with [`trusting`](Self::trusting). IPv4-mapped networks
    /// (`::ffff:10.0.0.0/104`) are read as the IPv4 networks they map, as there.
    pub fn trusting_nets(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let trusted: Vec<IpNet> = nets.into_iter().map(canonical_net).collect();
        warn_if_everyone(&trusted);
        Self {
            trusted: (!trusted.is_empty()).then(|| trusted.into()),
            ..Self::default()
        }
    }

    /// Reads the standard `Forwarded` header instead of `X-Forwarded-For`: only when your
    /// trusted proxies write `Forwarded`.
    #[must_use]
    pub fn forwarded_header(mut self) -> Self {
        self.use_forwarded = true;
        self
    }

    /// Whether `ip` is one of the trusted proxies (always false for [`ClientIp::peer`]).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted
            .as_deref()
            .is_some_and(|nets| nets.iter().any(|net| net_contains(net, ip)))
    }

    /// Whether any proxy is trusted.
    pub fn trusts_any(&self) -> bool {
        self.trusted.is_some()
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusts(ip)
    }

    /// The client address for a connection from `peer` with these headers.
    pub fn resolve(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        // Several header lines form one comma-separated list. A line with bytes that are
        // not visible ASCII is read with them replaced, so that only the hop holding them
        // is unreadable: a proxy appends the client's address to the line the client
        // sent, and dropping the whole line would drop that address with the client's
        // garbage, keying the request on the proxy.
        let lines = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
        };
        let hops = if self.use_forwarded {
            // Line by line: a quoted string ends with its line (a client's unclosed quote
            // must not swallow the line its proxy added).
            let hops: Vec<_> = lines("forwarded")
                .flat_map(|line| parse::forwarded_for(&line))
                .collect();
            if hops.is_empty() {
                return peer;
            }
            hops
        } else {
            let parts: Vec<_> = lines("x-forwarded-for").collect();
            if parts.is_empty() {
                return peer;
            }
            parse::x_forwarded_for(&parts.join(","))
        };
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            match hop {
                // An entry we cannot read: stop at the last proxy we trust.
                None => return client,
                Some(ip) => {
                    client = ip;
                    if !self.is_trusted(ip) {
                        return ip;
                    }
                }
            }
        }
        client
    }
}

/// The peer's address: a bare [`SocketAddr`] extension, or (feature `axum`) axum's
/// `ConnectInfo<SocketAddr>`.
pub(crate) fn peer_of(extensions: &http::Extensions) -> Option<IpAddr> {
    if let Some(peer) = extensions.get::<SocketAddr>() {
        return Some(peer.ip());
    }
    #[cfg(feature = "axum")]
    if let Some(axum::extract::ConnectInfo(peer)) =
        extensions.get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(peer.ip());
    }
    None
}

impl<B> KeyExtractor<Request<B>> for ClientIp {
    type Key = IpAddr;

    /// The [`key_of`](ClientIp::key_of) the client's address.
    fn extract(&self, request: &Request<B>) -> Option<IpAddr> {
        let peer = peer_of(request.extensions())?;
        Some(self.key_of(self.resolve(peer, request.headers())))
    }
}

/// The one value of `name` in `headers`: `None` when it is absent or sent more than once.
/// A key field is not a list: of two API keys, which one an upstream reads is its own
/// choice (the last, often), so a limit keyed on the first could be passed with a fresh
/// first value each time while the upstream took the second.
#[inline]
pub(crate) fn single<'a>(
    headers: &'a http::HeaderMap,
    name: &http::HeaderName,
) -> Option<&'a http::HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

/// The value of a header (for example an API key), as a [`BoundedKey`]: values up to 64
/// bytes as they are, longer ones as a 128-bit digest (the same in every process), so
/// that clients choosing long values cannot grow a keyed limiter's memory (each key is
/// 65 bytes, with no allocation). Requests with the header more than once (which value an
/// upstream reads is its own choice) are refused, `400`, whatever the policy (see
/// [`KeyExtractor::key_is_ambiguous`](super::super::KeyExtractor::key_is_ambiguous)). Requests without the header, or with a value that is not visible ASCII,
/// have no key: a [`PerKey`](super::PerKey) limit answers them per its
/// [`OnMissingKey`](super::OnMissingKey): refused by default, the client's error (the HTTP
/// layers answer `400 Bad Request`); or one shared bucket; or let through, with a limit by
/// [`ClientIp`] or a global one beside it.
#[derive(Debug, Clone)]
pub struct HeaderKey(pub HeaderName);

impl HeaderKey {
    /// The key of a header value, if it is visible ASCII and not empty (an empty value is
    /// no key: every client sending one would share it, past
    /// [`OnMissingKey`](super::OnMissingKey)).
    pub fn key_of(value: &http::HeaderValue) -> Option<BoundedKey> {
        value
            .to_str()
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| BoundedKey::new(v.as_bytes()))
    }
}

impl<B> KeyExtractor<Request<B>> for HeaderKey {
    type Key = BoundedKey;

    fn extract(&self, request: &Request<B>) -> Option<BoundedKey> {
        Self::key_of(single(request.headers(), &self.0)?)
    }

    /// The header is the client's to send: a request without it is a `400`.
    fn missing_key_is_clients(&self) -> bool {
        true
    }

    /// The header sent more than once: a `400` whatever the policy.
    fn key_is_ambiguous(&self, request: &Request<B>) -> bool {
        request.headers().get_all(&self.0).iter().nth(1).is_some()
    }
}

/// The request path, or its first `segments` segments (`/api/users/42` → `/api/users`
/// with 2), so that each route or API area has its own bucket. Normalised first, as the
/// gateway matches its routes (`gateway::path`, feature `gateway`): every spelling of one path (`/api/%6Cogin`, `/%61pi//login`,
/// `/api/x/../login`, `/api;x/login`) is one key; a path that normalisation refuses (an
/// encoded `/`, a control byte, a `..` above the root) is keyed as it came. As a [`BoundedKey`], as
/// [`HeaderKey`]'s values are: a path up to 64 bytes as it is, a longer one as a keyed
/// digest, so that clients sending long paths cannot grow a keyed limiter's memory beyond
/// its number of keys (each key is 65 bytes, with no allocation).
#[derive(Debug, Clone, Copy, Default)]
pub struct PathKey {
    segments: Option<usize>,
}

impl PathKey {
    /// The whole path.
    pub fn full() -> Self {
        Self { segments: None }
    }

    /// The first `n` segments of the path.
    pub fn prefix(n: usize) -> Self {
        Self { segments: Some(n) }
    }
}

impl<B> KeyExtractor<Request<B>> for PathKey {
    type Key = BoundedKey;

    fn extract(&self, request: &Request<B>) -> Option<BoundedKey> {
        let raw = request.uri().path();
        // Every spelling of one path is one key: escapes of unreserved characters decoded
        // (`/api/%6Cogin` is `/api/login`), dot segments removed, slashes merged, `;`
        // parameters dropped (each a bucket of its own otherwise, and a fresh burst).
        // Borrowed for a path already in that form, as nearly every one is.
        let normal = crate::uri_path::normalize(raw, crate::uri_path::PathOptions::default());
        let matched = normal.as_deref().map(crate::uri_path::match_form);
        let path: &str = match &matched {
            Ok(path) => path,
            // A path servers refuse (an encoded `/`, a control byte, a `..` above the
            // root): as it came.
            Err(_) => raw,
        };
        let end = match self.segments {
            None => path.len(),
            Some(n) => path
                .match_indices('/')
                .nth(n)
                .map_or(path.len(), |(i, _)| i),
        };
        Some(BoundedKey::new(&path.as_bytes()[..end]))
    }
}

/// Logs a trusted network of every address (`/0`): every peer may then set the client
/// address limits key on.
fn warn_if_everyone(nets: &[IpNet]) {
    #[cfg(feature = "tracing")]
    if let Some(net) = nets.iter().find(|net| net.prefix_len() == 0) {
        tracing::warn!(
            target: "seawall::rate_limit",
            net = %net,
            "every address is trusted as a proxy: any client can name the address it is \
             keyed and limited as (X-Forwarded-For, Forwarded); list the proxies' own \
             addresses instead"
        );
    }
    #[cfg(not(feature = "tracing"))]
    let _ = nets;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/api/users/42?x=1");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).expect("request");
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().expect("peer"));
        r
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn networks() {
        let net = parse_net("10.0.0.0/8").unwrap();
        assert!(net_contains(&net, ip("10.200.0.1")));
        assert!(!net_contains(&net, ip("11.0.0.1")));
        assert!(net_contains(&net, ip("::ffff:10.1.1.1")), "IPv4-mapped");
        let v6 = parse_net("2001:db8::/32").unwrap();
        assert!(net_contains(&v6, ip("2001:db8:1::1")));
        assert!(!net_contains(&v6, ip("10.0.0.1")));
        let all = parse_net("0.0.0.0/0").unwrap();
        assert!(net_contains(&all, ip("1.2.3.4")));
        let one = parse_net(" ::1 ").unwrap();
        assert!(net_contains(&one, ip("::1")));
        assert!(!net_contains(&one, ip("::2")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", "1.2.3.4/", ""] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        assert!(ClientIp::trusting(["10.0.0.0/8", "nope"]).is_err());
        let parsed = ClientIp::trusting_nets(["10.0.0.0/8".parse().unwrap()]);
        assert!(parsed.trusts(ip("10.9.9.9")) && !parsed.trusts(ip("11.0.0.1")));
    }

    #[test]
    fn untrusted_peers_cannot_choose_their_key() {
        let key = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        let r = req("203.0.113.5:1000", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(key.extract(&r), Some(ip("203.0.113.5")));
        assert_eq!(ClientIp::peer().extract(&r), Some(ip("203.0.113.5")));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let key = ClientIp::trusting(["10.0.0.0/8", "192.168.0.0/16"]).unwrap();
        // The client spoofed 6.6.6.6; the edge proxy appended the real 198.51.100.7,
        // then an inner proxy appended 192.168.1.1.
        let r = req(
            "10.0.0.2:80",
            &[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 192.168.1.1")],
        );
        assert_eq!(key.extract(&r), Some(ip("198.51.100.7")));
        // Several header lines form one list.
        let r = req(
            "10.0.0.2:80",
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "198.51.100.8"),
            ],
        );
        assert_eq!(key.extract(&r), Some(ip("198.51.100.8")));
        // Garbage to the right of trusted hops: stop at the last trusted one.
        let r = req("10.0.0.2:80", &[("x-forwarded-for", "198.51.100.7, junk")]);
        assert_eq!(key.extract(&r), Some(ip("10.0.0.2")));
        // Everything trusted: the leftmost.
        let r = req("10.0.0.2:80", &[("x-forwarded-for", "10.9.9.9, 10.0.0.3")]);
        assert_eq!(key.extract(&r), Some(ip("10.9.9.9")));
        // No header from a trusted peer: the peer.
        assert_eq!(key.extract(&req("10.0.0.2:80", &[])), Some(ip("10.0.0.2")));
    }

    #[test]
    fn only_the_chosen_header_is_read() {
        let headers = [
            (
                "forwarded",
                r#"for=6.6.6.6, for="[2001:db8::7]:4711";proto=https"#,
            ),
            ("x-forwarded-for", "198.51.100.7"),
        ];
        let r = req("10.0.0.2:80", &headers);
        // The proxies write X-Forwarded-For: a Forwarded header is the client's, ignored.
        let xff = ClientIp::trusting(["10.0.0.0/8"]).unwrap();
        assert_eq!(xff.extract(&r), Some(ip("198.51.100.7")));
        // The proxies write Forwarded: X-Forwarded-For is ignored.
        let fwd = ClientIp::trusting(["10.0.0.0/8"])
            .unwrap()
            .forwarded_header();
        // (Keyed by its /64.)
        assert_eq!(fwd.extract(&r), Some(ip("2001:db8::")));
        // The chosen header is absent: the peer, never the other header.
        let only_forwarded = req("10.0.0.2:80", &[("forwarded", "for=1.2.3.4")]);
        assert_eq!(xff.extract(&only_forwarded), Some(ip("10.0.0.2")));
        let only_xff = req("10.0.0.2:80", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(fwd.extract(&only_xff), Some(ip("10.0.0.2")));
    }

    #[test]
    fn no_peer_no_key() {
        let r = Request::builder().body(()).unwrap();
        assert_eq!(ClientIp::peer().extract(&r), None);
    }

    #[test]
    fn header_and_path_keys() {
        let r = req("1.2.3.4:5", &[("x-api-key", "k-123")]);
        assert_eq!(
            HeaderKey(HeaderName::from_static("x-api-key")).extract(&r),
            Some(BoundedKey::from("k-123"))
        );
        let huge = "k".repeat(100_000);
        let r = req("1.2.3.4:5", &[("x-api-key", &huge)]);
        let key = HeaderKey(HeaderName::from_static("x-api-key")).extract(&r);
        assert_eq!(key, Some(BoundedKey::from(huge.as_str())));
        assert_eq!(key.unwrap().as_inline(), None);
        assert_eq!(
            HeaderKey(HeaderName::from_static("x-other")).extract(&r),
            None
        );
        assert_eq!(
            PathKey::full().extract(&r),
            Some(BoundedKey::from("/api/users/42"))
        );
        assert_eq!(
            PathKey::prefix(2).extract(&r),
            Some(BoundedKey::from("/api/users"))
        );
        assert_eq!(
            PathKey::prefix(9).extract(&r),
            Some(BoundedKey::from("/api/users/42"))
        );
        assert_eq!(PathKey::prefix(0).extract(&r), Some(BoundedKey::from("")));
    }

    /// A client choosing its path chooses the key: a long one is kept as a digest, so
    /// that a table of such keys takes no more memory than one of short ones.
    #[test]
    fn a_long_path_is_a_bounded_key() {
        let long = format!("/{}", "a".repeat(60_000));
        let r = Request::builder().uri(long.as_str()).body(()).unwrap();
        let key = PathKey::full().extract(&r).expect("a key");
        assert_eq!(key.as_inline(), None, "kept as a digest");
        assert_eq!(key, BoundedKey::from(long.as_str()));
        let other = format!("/{}b", "a".repeat(59_999));
        let r = Request::builder().uri(other.as_str()).body(()).unwrap();
        assert_ne!(PathKey::full().extract(&r), Some(key));
        // The prefix is taken before the digest: one bucket for the area.
        let deep = format!("/api/{}", "x".repeat(10_000));
        let r = Request::builder().uri(deep.as_str()).body(()).unwrap();
        assert_eq!(
            PathKey::prefix(1).extract(&r),
            Some(BoundedKey::from("/api"))
        );
    }
}
