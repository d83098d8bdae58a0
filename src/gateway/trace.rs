//! Following a request: W3C Trace Context (`traceparent`, `tracestate`), the request id
//! (`x-request-id`, Kong's correlation id) and, with the `tracing` feature, a span per
//! request. See the gateway's [module docs](super#following-a-request).
//!
//! [`TraceParent`] is public (hidden) for the fuzz target; the rest is the gateway's.

use std::cell::Cell;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};

/// `traceparent`.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The length of a version `00` `traceparent`.
pub const TRACEPARENT_LEN: usize = 55;
/// The longest request id passed on; a longer one is replaced.
pub const MAX_REQUEST_ID: usize = 128;
/// The `sampled` flag.
const SAMPLED: u8 = 0x01;
/// The flags forwarded from a client's `traceparent`: `sampled` and Level 2's `random`
/// (both describe the trace, which the gateway keeps). Others are unknown and sent as 0.
const KNOWN_FLAGS: u8 = 0x03;

/// A parsed W3C `traceparent` (Trace Context Level 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace id; never all zero.
    pub trace_id: [u8; 16],
    /// The caller's span id; never all zero.
    pub parent_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        // Uppercase is invalid (W3C: lowercase hex only).
        _ => None,
    }
}

/// Decodes lowercase hex into `out` (`hex.len() == 2 * out.len()`).
fn decode(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    Some(())
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `bytes` in lowercase hex into `out` (`out.len() == 2 * bytes.len()`): four bytes at a
/// time in one register, the rest a byte at a time.
fn encode_into(bytes: &[u8], out: &mut [u8]) {
    let mut quads = bytes.chunks_exact(4);
    let mut octets = out.chunks_exact_mut(8);
    for (quad, octet) in (&mut quads).zip(&mut octets) {
        if let Ok(quad) = <[u8; 4]>::try_from(quad) {
            octet.copy_from_slice(&hex8(u32::from_be_bytes(quad)));
        }
    }
    for (pair, byte) in octets
        .into_remainder()
        .chunks_exact_mut(2)
        .zip(quads.remainder())
    {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
}

/// `x`'s eight hex digits, most significant first, without a lookup per digit: each
/// nibble spread into a byte of its own, then `'0'` added to every byte, and `'a' - '0' -
/// 10` more to those of 10 and above.
fn hex8(x: u32) -> [u8; 8] {
    let x = u64::from(x);
    let v = ((x & 0xffff_0000) << 16) | (x & 0xffff);
    let v = ((v & 0x0000_ff00_0000_ff00) << 8) | (v & 0x0000_00ff_0000_00ff);
    let v = ((v & 0x00f0_00f0_00f0_00f0) << 4) | (v & 0x000f_000f_000f_000f);
    // 1 in each byte whose nibble is 10 or more (adding 6 carries it into bit 4).
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (v + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)).to_be_bytes()
}

impl TraceParent {
    /// Parses a `traceparent` value strictly, as W3C Trace Context says: `version`
    /// `-` `trace-id` `-` `parent-id` `-` `flags`, lowercase hex only, neither id all
    /// zeros, version `ff` invalid. Version `00` is exactly 55 bytes; a higher
    /// (future) version is parsed by the `00` layout and may carry more after a `-` at
    /// byte 55. `None` when invalid. No allocation.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < TRACEPARENT_LEN {
            return None;
        }
        let mut version = [0u8; 1];
        decode(&value[0..2], &mut version)?;
        match version[0] {
            0xff => return None,
            0 if value.len() != TRACEPARENT_LEN => return None,
            0 => {}
            _ if value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut parsed = Self {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        decode(&value[3..35], &mut parsed.trace_id)?;
        decode(&value[36..52], &mut parsed.parent_id)?;
        let mut flags = [0u8; 1];
        decode(&value[53..55], &mut flags)?;
        parsed.flags = flags[0];
        if parsed.trace_id == [0; 16] || parsed.parent_id == [0; 8] {
            return None;
        }
        Some(parsed)
    }

    /// The version `00` text of this `traceparent` (whatever version it was parsed
    /// from: W3C has a participant send the version it supports).
    pub fn encode(&self) -> [u8; TRACEPARENT_LEN] {
        let mut out = [b'-'; TRACEPARENT_LEN];
        out[0] = b'0';
        out[1] = b'0';
        encode_into(&self.trace_id, &mut out[3..35]);
        encode_into(&self.parent_id, &mut out[36..52]);
        encode_into(&[self.flags], &mut out[53..55]);
        out
    }
}

/// Whether `value` may be passed on as a request id: 1 to [`MAX_REQUEST_ID`] bytes of
/// visible ASCII (no space, no control byte, nothing above `~`).
pub fn valid_request_id(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= MAX_REQUEST_ID
        && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

thread_local! {
    /// splitmix64's state, seeded per thread from the standard library's per-process
    /// random keys and the thread's id (see `crate::util::seed`).
    static RNG: Cell<u64> = Cell::new(crate::util::seed(std::thread::current().id()));
}

/// The next 64 random bits of this thread's splitmix64 generator: fast, well spread,
/// and NOT cryptographic. Trace and request ids need uniqueness, not secrecy: never
/// use them as tokens.
fn next_u64() -> u64 {
    RNG.with(|state| {
        let mut s = state.get();
        let next = crate::util::next_u64(&mut s);
        state.set(s);
        next
    })
}

/// A random non-zero span id.
fn span_id() -> [u8; 8] {
    loop {
        let id = next_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// 16 random bytes, not all zero.
fn random16() -> [u8; 16] {
    loop {
        let id = (u128::from(next_u64()) << 64) | u128::from(next_u64());
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A request id shaped as a UUID v4 (`8-4-4-4-12` lowercase hex, version 4, RFC 9562
/// variant), from the thread's generator.
fn new_request_id() -> [u8; 36] {
    let mut bytes = random16();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut hex = [0u8; 32];
    encode_into(&bytes, &mut hex);
    let mut out = [b'-'; 36];
    out[0..8].copy_from_slice(&hex[0..8]);
    out[9..13].copy_from_slice(&hex[8..12]);
    out[14..18].copy_from_slice(&hex[12..16]);
    out[19..23].copy_from_slice(&hex[16..20]);
    out[24..36].copy_from_slice(&hex[20..32]);
    out
}

/// The request id header named by `[gateway] request_id_header`: `None` when empty
/// (disabled); an error (the reason) for an invalid name or one the gateway manages
/// otherwise.
pub(crate) fn request_id_header(name: &str) -> Result<Option<HeaderName>, String> {
    if name.is_empty() {
        return Ok(None);
    }
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    let reserved = [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::AUTHORIZATION,
        header::COOKIE,
        header::SET_COOKIE,
        header::CONTENT_TYPE,
        header::FORWARDED,
        TRACEPARENT.clone(),
        TRACESTATE.clone(),
    ];
    let s = parsed.as_str();
    // Fields with HTTP semantics of their own: the id, sent upstream on every request
    // without it and set on every answer (replacing the upstream's), would be read as
    // them (`Expect: <uuid>` is a `417`, `Content-Encoding: <uuid>` an answer no client
    // can decode, `Location: <uuid>` every redirect broken).
    let semantic = matches!(
        s,
        "expect"
            | "location"
            | "www-authenticate"
            | "range"
            | "retry-after"
            | "vary"
            | "etag"
            | "cache-control"
            | "date"
            | "server"
            | "age"
            | "allow"
            | "via"
            | "max-forwards"
            | "origin"
            | "referer"
            | "user-agent"
            | "last-modified"
            | "expires"
            | "pragma"
            | "alt-svc"
            | "strict-transport-security"
            | "refresh"
            | "link"
    ) || ["content-", "if-", "accept", "access-control-", "sec-"]
        .iter()
        .any(|prefix| s.starts_with(prefix));
    if reserved.contains(&parsed)
        || semantic
        || matches!(s, "keep-alive" | "proxy-connection")
        // What a client may not set (`X-Real-IP`, `X-Forwarded-*`, `X_Forwarded_For`...):
        // the id would be dropped from a client's request.
        || super::headers::is_forwarding(&parsed)
        || s.starts_with("proxy-")
        || s.starts_with("x-seawall-")
        || s.starts_with("ratelimit")
    {
        return Err(format!(
            "`{name}` is a header the gateway or HTTP itself manages; choose another"
        ));
    }
    // The default name, static: a request's map then takes it (twice a request: the
    // request's and the response's) without a reference count, as it would for a name
    // read from the configuration.
    if parsed == X_REQUEST_ID {
        return Ok(Some(X_REQUEST_ID.clone()));
    }
    Ok(Some(parsed))
}

/// `x-request-id`, the default `request_id_header`.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The gateway's tracing settings, from `[gateway]`.
#[derive(Clone, Debug)]
pub(crate) struct TraceSettings {
    /// `request_id_header`; `None`: disabled.
    request_id: Option<HeaderName>,
    /// `trace_context`.
    trace_context: bool,
}

impl TraceSettings {
    pub(crate) fn new(server: &super::config::ServerConfig) -> Self {
        Self {
            // Validated with the configuration; an invalid name here disables it.
            request_id: request_id_header(&server.request_id_header).ok().flatten(),
            trace_context: server.trace_context,
        }
    }

    /// Rewrites the request's trace headers for the upstream, in place, and opens the
    /// request's span:
    ///
    /// - `traceparent`: the client's (one, valid) with a new parent id, the gateway's
    ///   hop; otherwise a new trace, and the client's `tracestate`, if any, dropped
    ///   (it belongs to a trace that is not continued);
    /// - the request id: the client's (one, valid) as it is, or a new one.
    ///
    /// A value replacing one the client sent is put into the request's map; one the
    /// client had none of is returned ([`NewFields`]) for the endpoint's connection to
    /// write (no per-client limit is keyed on either: the configuration refuses it).
    ///
    /// The request's `Connection` header, if it names one of these, stops naming it:
    /// the gateway's values are for the upstream.
    pub(crate) fn begin<B>(&self, request: &mut Request<B>, route: &str) -> (Hop<'_>, NewFields) {
        let headers = request.headers_mut();
        // One pass over the names says which of these headers there are: a lookup hashes
        // a name, and nearly every request has none of them.
        let (mut parent, mut state, mut id, mut connection) = (false, false, false, false);
        for name in headers.keys() {
            if name == header::CONNECTION {
                connection = true;
            } else if name == TRACEPARENT {
                parent = true;
            } else if name == TRACESTATE {
                state = true;
            } else if self.request_id.as_ref() == Some(name) {
                id = true;
            }
        }
        let mut hop_trace: Option<TraceParent> = None;
        let mut fields = NewFields::default();
        if self.trace_context {
            let client = if parent {
                let mut values = headers.get_all(&TRACEPARENT).iter();
                match (values.next(), values.next()) {
                    (Some(v), None) => TraceParent::parse(v.as_bytes()),
                    _ => None,
                }
            } else {
                None
            };
            let next = match client {
                Some(parent) => TraceParent {
                    trace_id: parent.trace_id,
                    parent_id: span_id(),
                    flags: parent.flags & KNOWN_FLAGS,
                },
                None => {
                    if state {
                        headers.remove(&TRACESTATE);
                    }
                    TraceParent {
                        trace_id: random16(),
                        parent_id: span_id(),
                        // The gateway does not sample: a trace it starts is marked
                        // sampled, so services that follow their parent's decision
                        // record it (see the module docs).
                        flags: SAMPLED,
                    }
                }
            };
            if parent {
                // Replacing the client's: in the map.
                let text = next.encode();
                // Lowercase hex and `-`: always a valid value.
                if let Ok(value) = crate::header_arena::value(&[&text]) {
                    headers.insert(&TRACEPARENT, value);
                }
            } else {
                fields.traceparent = Some(next);
            }
            hop_trace = Some(next);
        }
        let request_id = self.request_id.as_ref().map(|name| {
            let client = if id {
                let mut values = headers.get_all(name).iter();
                (values.next(), values.next())
            } else {
                (None, None)
            };
            match client {
                (Some(v), None) if valid_request_id(v.as_bytes()) => v.clone(),
                _ => {
                    // Reference-counted, in the thread's header chunk: neither the
                    // value nor the copy echoed to the client costs an allocation.
                    let value = crate::header_arena::value(&[&new_request_id()])
                        .unwrap_or(HeaderValue::from_static("invalid"));
                    if id {
                        // Replacing the client's: in the map.
                        headers.insert(name, value.clone());
                    } else {
                        fields.request_id = Some((name.clone(), value.clone()));
                    }
                    value
                }
            }
        });
        if connection {
            self.unlist(headers);
        }
        #[cfg(feature = "tracing")]
        let span = {
            // The ids' text only for a subscriber that wants the span (the text sent
            // upstream is written with the head, not kept).
            let wanted = tracing::enabled!(target: "seawall::gateway", tracing::Level::INFO);
            let text = hop_trace.filter(|_| wanted).map(|t| t.encode());
            let hex = |range: std::ops::Range<usize>| {
                text.as_ref()
                    .and_then(|t| std::str::from_utf8(&t[range]).ok())
            };
            // Field values are evaluated only when a subscriber wants the span.
            tracing::info_span!(
                target: "seawall::gateway",
                "request",
                method = %request.method(),
                route,
                upstream = tracing::field::Empty,
                status = tracing::field::Empty,
                latency_us = tracing::field::Empty,
                trace_id = hex(3..35),
                span_id = hex(36..52),
                request_id = request_id.as_ref().and_then(|v| v.to_str().ok()),
            )
        };
        #[cfg(not(feature = "tracing"))]
        let _ = (hop_trace, route);
        let hop = Hop {
            request_id: self.request_id.as_ref().zip(request_id),
            #[cfg(feature = "tracing")]
            span,
        };
        (hop, fields)
    }

    /// Takes the gateway's trace headers out of the request's `Connection` list (rare:
    /// a client naming them there), so hop-by-hop removal keeps them.
    #[cold]
    fn unlist(&self, headers: &mut HeaderMap) {
        let ours = |token: &str| {
            let token = token.trim();
            (self.trace_context
                && (token.eq_ignore_ascii_case("traceparent")
                    || token.eq_ignore_ascii_case("tracestate")))
                || self
                    .request_id
                    .as_ref()
                    .is_some_and(|n| token.eq_ignore_ascii_case(n.as_str()))
        };
        let named = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(ours);
        if !named {
            return;
        }
        let kept: Vec<String> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter(|t| !ours(t) && !t.trim().is_empty())
            .map(|t| t.trim().to_owned())
            .collect();
        headers.remove(header::CONNECTION);
        if let Ok(value) = HeaderValue::from_str(&kept.join(", ")) {
            if !kept.is_empty() {
                headers.insert(header::CONNECTION, value);
            }
        }
    }
}

/// The trace fields [`TraceSettings::begin`] made for a request that had none of its
/// own: a new `traceparent` and request id. Not put into the request's map (an insertion
/// each, a name hashed, and the `traceparent` text made a header value): the endpoint's
/// HTTP/1 connection writes them with the head ([`encode`](Self::encode)); a request sent
/// any other way gets them in its map ([`insert_into`](Self::insert_into)).
#[derive(Clone, Debug, Default)]
pub(crate) struct NewFields {
    traceparent: Option<TraceParent>,
    request_id: Option<(HeaderName, HeaderValue)>,
}

impl NewFields {
    /// Writes the fields as HTTP/1 field lines.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        if let Some(parent) = &self.traceparent {
            out.extend_from_slice(b"traceparent: ");
            out.extend_from_slice(&parent.encode());
            out.extend_from_slice(b"\r\n");
        }
        if let Some((name, value)) = &self.request_id {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Fields as [`TraceSettings::begin`] would make them: `traceparent` (valid) and a
    /// request id.
    #[cfg(test)]
    pub(crate) fn made(traceparent: &str, id_name: HeaderName, id: HeaderValue) -> Self {
        Self {
            traceparent: TraceParent::parse(traceparent.as_bytes()),
            request_id: Some((id_name, id)),
        }
    }

    /// Puts the fields into `headers`, replacing any of the same name.
    pub(crate) fn insert_into(self, headers: &mut HeaderMap) {
        if let Some(parent) = self.traceparent {
            // Lowercase hex and `-`: always a valid value.
            if let Ok(value) = crate::header_arena::value(&[&parent.encode()]) {
                headers.insert(&TRACEPARENT, value);
            }
        }
        if let Some((name, value)) = self.request_id {
            headers.insert(name, value);
        }
    }
}

/// One request's trace state, from [`TraceSettings::begin`] until its response head.
#[derive(Debug)]
pub(crate) struct Hop<'a> {
    /// The request id header and the value sent upstream, echoed to the client.
    request_id: Option<(&'a HeaderName, HeaderValue)>,
    /// The request's span (disabled when no subscriber wants it).
    #[cfg(feature = "tracing")]
    span: tracing::Span,
}

impl Hop<'_> {
    /// Runs `future` (the request's handling) inside the request's span. Not an `async
    /// fn`: one would keep `future` twice, as its argument and as what it awaits
    /// (rust-lang/rust#62958), kilobytes copied into every request's state. Always
    /// inlined: called, it would copy the future once more on its way out.
    #[inline(always)]
    pub(crate) fn run<F: std::future::Future>(
        &self,
        future: F,
    ) -> impl std::future::Future<Output = F::Output> {
        #[cfg(feature = "tracing")]
        {
            use tracing::Instrument as _;
            future.instrument(self.span.clone())
        }
        #[cfg(not(feature = "tracing"))]
        {
            future
        }
    }

    /// Sets the request id on the response (replacing an upstream's), and records the
    /// status and the latency (to the response head) on the span, which then closes.
    pub(crate) fn finish<B>(self, response: &mut Response<B>, elapsed: std::time::Duration) {
        #[cfg(feature = "tracing")]
        if !self.span.is_disabled() {
            self.span.record("status", response.status().as_u16());
            self.span.record(
                "latency_us",
                u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            );
        }
        #[cfg(not(feature = "tracing"))]
        let _ = elapsed;
        if let Some((name, value)) = self.request_id {
            response.headers_mut().insert(name, value);
        }
    }
}

/// Records the endpoint chosen for the request on the request's span, if it is the
/// current one and enabled.
#[cfg(feature = "tracing")]
pub(crate) fn record_upstream(authority: &HeaderValue) {
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("upstream", authority.to_str().unwrap_or("?"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn settings() -> TraceSettings {
        TraceSettings {
            request_id: Some(X_REQUEST_ID.clone()),
            trace_context: true,
        }
    }

    fn request_with(fields: &[(&str, &str)]) -> Request<()> {
        let mut request = Request::new(());
        for (name, value) in fields {
            request.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request
    }

    fn written(fields: &NewFields) -> String {
        let mut out = Vec::new();
        fields.encode(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fields_a_request_had_none_of_go_with_its_head_not_into_its_map() {
        let settings = settings();
        let mut request = request_with(&[("x-a", "1")]);
        let (hop, fields) = settings.begin(&mut request, "r");
        let names: Vec<&str> = request.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-a"]);
        let lines = written(&fields);
        let (parent, id) = lines.split_once("\r\n").unwrap();
        let parent = parent.strip_prefix("traceparent: ").unwrap();
        assert!(TraceParent::parse(parent.as_bytes()).is_some(), "{parent}");
        let id = id.strip_prefix("x-request-id: ").unwrap().trim_end();
        // The id sent upstream is the one echoed to the client.
        let mut response = Response::new(());
        hop.finish(&mut response, std::time::Duration::ZERO);
        assert_eq!(response.headers()["x-request-id"], id);
        // Sent another way: in the map.
        let mut headers = HeaderMap::new();
        fields.insert_into(&mut headers);
        assert_eq!(headers["traceparent"], parent);
        assert_eq!(headers["x-request-id"], id);
    }

    #[test]
    fn fields_replacing_the_clients_or_keying_a_limit_go_into_the_map() {
        let settings = settings();
        // The client's trace continued, its invalid request id replaced: in the map.
        let mut request = request_with(&[("traceparent", VALID), ("x-request-id", "a b")]);
        let (_, fields) = settings.begin(&mut request, "r");
        assert_eq!(written(&fields), "");
        let parent = request.headers()["traceparent"].to_str().unwrap();
        assert_ne!(parent, VALID);
        assert_eq!(
            TraceParent::parse(parent.as_bytes()).unwrap().trace_id,
            TraceParent::parse(VALID.as_bytes()).unwrap().trace_id
        );
        assert_ne!(request.headers()["x-request-id"], "a b");
    }

    #[test]
    fn parses_the_spec_example() {
        let p = TraceParent::parse(VALID.as_bytes()).unwrap();
        assert_eq!(p.flags, 1);
        assert_eq!(p.parent_id, 0x00f0_67aa_0ba9_02b7u64.to_be_bytes());
        assert_eq!(&p.encode()[..], VALID.as_bytes());
    }

    #[test]
    fn refuses_what_w3c_calls_invalid() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // uppercase
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero parent
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",  // short
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-", // 00 + more
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01", // dash moved
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // bad version
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x", // bad flags
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x", // future, no dash
            "",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn future_versions_are_read_by_the_00_layout() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let p = TraceParent::parse(v.as_bytes()).unwrap();
        assert_eq!(&p.encode()[..], VALID.as_bytes());
        let exact = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(TraceParent::parse(exact.as_bytes()).is_some());
    }

    #[test]
    fn request_ids() {
        let id = new_request_id();
        let text = std::str::from_utf8(&id).unwrap();
        assert_eq!(text.len(), 36);
        for (i, c) in text.char_indices() {
            if [8, 13, 18, 23].contains(&i) {
                assert_eq!(c, '-', "{text}");
            } else {
                assert!(matches!(c, '0'..='9' | 'a'..='f'), "{text}");
            }
        }
        assert_eq!(&text[14..15], "4");
        assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"));
        assert!(valid_request_id(&id));
        assert_ne!(new_request_id(), id);
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"has space"));
        assert!(!valid_request_id("caf\u{e9}".as_bytes()));
        assert!(!valid_request_id(&[b'a'; MAX_REQUEST_ID + 1]));
        assert!(valid_request_id(&[b'a'; MAX_REQUEST_ID]));
    }

    #[test]
    fn request_id_header_names() {
        assert_eq!(request_id_header("").unwrap(), None);
        assert!(request_id_header("x-correlation-id").unwrap().is_some());
        for bad in [
            "host",
            "x-forwarded-for",
            "traceparent",
            "bad name",
            "connection",
        ] {
            assert!(request_id_header(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn hex_is_lowercase_hex_of_each_byte(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut out = vec![0u8; 2 * bytes.len()];
            encode_into(&bytes, &mut out);
            let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            prop_assert_eq!(String::from_utf8(out).unwrap(), expected);
        }

        #[test]
        fn encode_parse_round_trip(trace in any::<u128>(), parent in any::<u64>(), flags in any::<u8>()) {
            prop_assume!(trace != 0 && parent != 0);
            let p = TraceParent { trace_id: trace.to_be_bytes(), parent_id: parent.to_be_bytes(), flags };
            prop_assert_eq!(TraceParent::parse(&p.encode()), Some(p));
        }

        #[test]
        fn parse_encode_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(p) = TraceParent::parse(&bytes) {
                let text = p.encode();
                prop_assert_eq!(TraceParent::parse(&text), Some(p));
                if bytes.len() == TRACEPARENT_LEN && bytes.starts_with(b"00") {
                    prop_assert_eq!(&text[..], &bytes[..]);
                }
            }
        }

        #[test]
        fn one_byte_changed_is_still_strict(i in 0..TRACEPARENT_LEN, b in any::<u8>()) {
            let mut bytes = VALID.as_bytes().to_vec();
            bytes[i] = b;
            if let Some(p) = TraceParent::parse(&bytes) {
                prop_assert_eq!(&p.encode()[2..], &bytes[2..]);
            }
        }
    }
}
