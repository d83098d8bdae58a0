//! HTTP/1.1 to the upstreams, spoken by the gateway itself on its pooled sockets.
//!
//! hyper's client connection puts a dispatch channel, a oneshot and a `want` signal
//! between the request and its socket, and builds its request head in a buffer of its
//! own every time; here the exchange writes straight from the request into a buffer the
//! connection keeps, and reads into a buffer the connection keeps, on the task of the
//! request. What the upstream sends is checked as strictly as nginx does:
//!
//! - a response head larger than [`MAX_HEAD`] bytes or with more than [`MAX_HEADERS`]
//!   fields, obsolete line folding, an invalid name or value: a [`ProtocolError`] (the
//!   gateway answers `502`); heads may end their lines with a bare `LF`, as httparse
//!   allows (RFC 9112 §2.2);
//! - framing (RFC 9112 §6.3): no body for `HEAD`, `1xx`, `204`, `304`; interim `1xx`
//!   answers (`100 Continue`, `103 Early Hints`) skipped, `101` refused (the gateway
//!   never asks for an upgrade); `Transfer-Encoding` and `Content-Length` together, a
//!   `Transfer-Encoding` in an HTTP/1.0 answer, `chunked` applied twice, differing or
//!   malformed `Content-Length` values, a transfer coding other than `chunked` (`gzip,
//!   chunked`: its content would reach the client still coded, as nginx refuses it):
//!   errors, not guesses; no length at all: the body runs to the close, and the
//!   connection is not reused;
//! - chunked bodies: hexadecimal sizes of at most 16 digits, extensions skipped (at most
//!   [`MAX_CHUNK_LINE`] bytes a line), `CRLF` (never a bare `LF`) after every size line
//!   and every chunk's data, trailers parsed as a header section (at most [`MAX_HEAD`]
//!   bytes) and handed on without the fields the head's `Connection` names (the route
//!   takes out what no upstream's trailers may carry on: hop-by-hop fields,
//!   `Content-Length`, `Host`, `Content-Type`, `Content-Encoding`, `Content-Range`).
//!
//! A connection is reused only when its last exchange ended cleanly on both sides: the
//! request's body sent whole, the response read to its end with nothing after it, and
//! keep-alive in force (HTTP/1.1 without `Connection: close`, HTTP/1.0 with
//! `Connection: keep-alive`).

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body as HttpBody, Frame};
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::Body;
use super::headers::Forwarded;
use crate::BoxError;

/// The largest response head (or chunked trailer section) accepted from an upstream.
pub const MAX_HEAD: usize = 64 * 1024 - 1;
/// The most header fields accepted in a response head (hyper's default too).
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (size and extensions) accepted.
pub const MAX_CHUNK_LINE: usize = 4096;
/// Fields the map of a response is made with room for beyond its own (see
/// [`parse_response_into`]).
const ADDED_LATER: usize = 6;
/// How much a read asks for at least.
pub(crate) const READ_CHUNK: usize = 8 * 1024;
/// How much a read asks for at most (see [`Conn::poll_fill`]).
const MAX_READ: usize = 256 * 1024;

/// An upstream's answer that is not HTTP/1.1 as RFC 9112 frames it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolError(pub(crate) &'static str);

impl ProtocolError {
    /// What was wrong, in a few words.
    pub fn reason(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed response from the upstream: {}", self.0)
    }
}

impl std::error::Error for ProtocolError {}

impl From<httparse::Error> for ProtocolError {
    fn from(e: httparse::Error) -> Self {
        Self(match e {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Status => "invalid status line",
            httparse::Error::Token => "invalid token",
            httparse::Error::TooManyHeaders => "too many header fields",
            httparse::Error::Version => "not HTTP/1.x",
        })
    }
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a `HEAD` request's answer, `204`, `304`, or `Content-Length: 0`.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status code (never `1xx`: interim answers are skipped).
    pub status: StatusCode,
    /// HTTP/1.0 or HTTP/1.1.
    pub version: Version,
    /// The header fields, as sent, but for a `Connection` field of `close` or
    /// `keep-alive` options only (read into `keep_alive`, and meaning nothing past this
    /// hop); their values share the connection's buffer.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request after this exchange.
    pub keep_alive: bool,
    /// What the parse saw of the fields the gateway would otherwise look up again.
    pub(crate) facts: HeadFacts,
}

/// What parsing a response head noticed of the few fields the gateway looks up in every
/// response: seen in the one pass over the fields that builds the map, they spare a
/// lookup each (a hash of the name and a probe) in every response that lacks them, which
/// is nearly all. Each flag is conservative: set, the field may be there and is looked
/// up as before.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HeadFacts {
    bits: u8,
}

impl HeadFacts {
    const HOP_BY_HOP: u8 = 1;
    const GRPC: u8 = 1 << 1;
    const KEEP_ALIVE: u8 = 1 << 2;

    /// Facts that rule nothing out: every lookup is made (an HTTP/2 response's).
    pub(crate) const UNKNOWN: Self = Self { bits: u8::MAX };

    /// Notes a field of the head, as it goes into the map.
    #[inline]
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        let hop = super::headers::hop_bit(name);
        if hop != 0 {
            self.bits |= Self::HOP_BY_HOP;
            if hop == super::headers::KEEP_ALIVE {
                self.bits |= Self::KEEP_ALIVE;
            }
        } else if *name == header::CONTENT_TYPE {
            self.note_content_type(value);
        } else if *name == crate::grpc::GRPC_STATUS {
            self.bits |= Self::GRPC;
        }
    }

    /// [`note`](Self::note) of a `Content-Type` field.
    #[inline]
    fn note_content_type(&mut self, value: &[u8]) {
        if value.starts_with(b"application/grpc") {
            self.bits |= Self::GRPC;
        }
    }

    /// A hop-by-hop field (RFC 9110's list, `Keep-Alive` or `Proxy-Connection`) may be in
    /// the head.
    pub(crate) fn hop_by_hop(self) -> bool {
        self.bits & Self::HOP_BY_HOP != 0
    }

    /// A gRPC content type or a `grpc-status` may be in the head.
    pub(crate) fn grpc(self) -> bool {
        self.bits & Self::GRPC != 0
    }

    /// A `Keep-Alive` field may be in the head.
    pub(crate) fn keep_alive(self) -> bool {
        self.bits & Self::KEEP_ALIVE != 0
    }
}

/// Where a header field's name and value are in the head: offsets and lengths (a head is
/// at most [`MAX_HEAD`] bytes: they fit).
type Span = [u16; 4];

/// How many fields' spans a parse keeps in place; a head with more puts them on the heap.
const INLINE_SPANS: usize = 32;

/// Where each field of a parsed head is, kept while the parser's borrow of the buffer
/// ends and the head is split off it. The first [`INLINE_SPANS`] are in place: zeroing
/// room for [`MAX_HEADERS`] on every head cost more than reading its few fields.
pub(crate) struct Spans<S> {
    inline: [S; INLINE_SPANS],
    heap: Vec<S>,
    len: usize,
}

impl<S: Copy + Default> Spans<S> {
    /// No spans yet.
    pub(crate) fn new() -> Self {
        Spans {
            inline: [S::default(); INLINE_SPANS],
            heap: Vec::new(),
            len: 0,
        }
    }

    /// Room for `n` spans, which replace any there were.
    pub(crate) fn slots(&mut self, n: usize) -> &mut [S] {
        self.len = n;
        if n <= INLINE_SPANS {
            &mut self.inline[..n]
        } else {
            self.heap.clear();
            self.heap.resize(n, S::default());
            &mut self.heap
        }
    }

    /// The spans last made room for.
    pub(crate) fn as_slice(&self) -> &[S] {
        if self.len <= INLINE_SPANS {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

/// What the request and response head parsers' tests share.
#[cfg(test)]
pub(crate) mod head_tests {
    use http::HeaderMap;

    use super::{INLINE_SPANS, MAX_HEADERS};

    /// Field counts either side of the room [`Spans`](super::Spans) keeps in place, and
    /// the most a head may have.
    pub(crate) const FIELD_COUNTS: [usize; 5] = [
        1,
        INLINE_SPANS - 1,
        INLINE_SPANS,
        INLINE_SPANS + 1,
        MAX_HEADERS,
    ];

    /// Fields `x-i: value i` for `i` in `range`: their head lines, and the fields as a
    /// map lists them.
    pub(crate) fn numbered(range: std::ops::Range<usize>) -> (String, Vec<(String, String)>) {
        let fields: Vec<(String, String)> = range
            .map(|i| (format!("x-{i}"), format!("value {i}")))
            .collect();
        let lines = fields
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        (lines, fields)
    }

    /// A map's fields, in order.
    pub(crate) fn listed(headers: &HeaderMap) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }
}

/// Parses a response head off the front of `buf`: `Ok(None)` while it is incomplete.
/// Interim `1xx` heads before it are consumed and skipped. `head_request`: the request
/// was `HEAD` (its answer has no body whatever its head says).
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<ResponseHead>, ProtocolError> {
    parse_response_into(buf, head_request, &mut None)
}

/// [`parse_response`], the head's fields put in `spare` (emptied) if there is one: a map
/// reused, not allocated. `spare` is taken only when a head is complete.
fn parse_response_into(
    buf: &mut BytesMut,
    head_request: bool,
    spare: &mut Option<HeaderMap>,
) -> Result<Option<ResponseHead>, ProtocolError> {
    loop {
        let mut spans = Spans::<Span>::new();
        let (len, code, minor) = {
            let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                buf,
                &mut slots,
            );
            match parsed {
                Ok(httparse::Status::Complete(len)) => {
                    if len > MAX_HEAD {
                        return Err(ProtocolError("response head too large"));
                    }
                    let base = buf.as_ptr() as usize;
                    let offset = |s: &[u8]| (s.as_ptr() as usize - base) as u16;
                    let slots = spans.slots(response.headers.len());
                    for (span, field) in slots.iter_mut().zip(response.headers.iter()) {
                        *span = [
                            offset(field.name.as_bytes()),
                            field.name.len() as u16,
                            offset(field.value),
                            field.value.len() as u16,
                        ];
                    }
                    (
                        len,
                        response.code.unwrap_or(0),
                        response.version.unwrap_or(1),
                    )
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                    return Err(ProtocolError("response head too large"));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        };
        if code == 101 {
            return Err(ProtocolError("unexpected 101 Switching Protocols"));
        }
        if (100..200).contains(&code) {
            buf.advance(len);
            continue;
        }
        // 600 to 999 parse as status codes but are none (RFC 9110 §15: a client treats
        // one as a 5xx): refused, as a broken upstream's answer, not passed on as a
        // success to the breaker, the outlier detection and the client.
        let status = StatusCode::from_u16(code)
            .ok()
            .filter(|_| code <= 599)
            .ok_or(ProtocolError("invalid status code"))?;
        let version = if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let head = buf.split_to(len).freeze();
        let mut headers = spare.take().unwrap_or_default();
        headers.clear();
        // The gateway's HTTP/1 server keeps the map of a response it has written for the
        // next request head of its connection, to which the gateway adds its own fields:
        // room for them now spares that request a growth (a new allocation, every field
        // rehashed).
        let spans = spans.as_slice();
        headers.reserve(spans.len() + ADDED_LATER);
        return head_of(headers, &head, spans, status, version, head_request).map(Some);
    }
}

/// The [`ResponseHead`] of a complete head whose fields are at `spans`.
fn head_of(
    mut headers: HeaderMap,
    head: &Bytes,
    spans: &[Span],
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<ResponseHead, ProtocolError> {
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    // A transfer coding besides `chunked` (`gzip, chunked`).
    let mut other_coding = false;
    let (mut close, mut keep_alive) = (false, false);
    let mut facts = HeadFacts::default();
    for &[name_at, name_len, value_at, value_len] in spans {
        let (name_at, value_at) = (name_at as usize, value_at as usize);
        let (name, role) = field_name(&head[name_at..name_at + name_len as usize])
            .map_err(|_| ProtocolError("invalid header name"))?;
        let value = &head[value_at..value_at + value_len as usize];
        match role {
            Role::ContentLength => {
                let n = content_length(value)?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(ProtocolError("differing Content-Length values"));
                }
                let repeated = length.replace(n).is_some();
                // A list of one length (`2, 2`) or the field repeated is accepted, and
                // passed on as the one value it stands for (RFC 9112 §6.3): as it came,
                // an HTTP/2 client resets the stream, an HTTP/1 client of a `HEAD` reads
                // a length that is no number.
                if repeated {
                    continue;
                }
                if !canonical_length(value) {
                    append_length(&mut headers, name, n);
                    continue;
                }
            }
            Role::TransferEncoding => {
                transfer_encoding = true;
                for coding in tokens(value) {
                    if chunked {
                        // `chunked` is only ever the last coding, and only once.
                        return Err(ProtocolError("a coding applied after chunked"));
                    }
                    chunked = coding.eq_ignore_ascii_case(b"chunked");
                    other_coding |= !chunked;
                }
                facts.note(&name, value);
            }
            Role::Connection => {
                if connection_options(value, &mut close, &mut keep_alive) {
                    continue;
                }
                facts.note(&name, value);
            }
            Role::ContentType => facts.note_content_type(value),
            Role::Host | Role::Plain => {}
            Role::Expect | Role::Other => facts.note(&name, value),
        }
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len as usize))
                .map_err(|_| ProtocolError("invalid header value"))?;
        headers.append(name, value);
    }
    let mut keep_alive = match version {
        Version::HTTP_10 => keep_alive && !close,
        _ => !close,
    };
    let no_body =
        head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if transfer_encoding {
        if length.is_some() {
            return Err(ProtocolError("both Content-Length and Transfer-Encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(ProtocolError("Transfer-Encoding in an HTTP/1.0 response"));
        }
        if other_coding || !chunked {
            // The content under another coding would reach the client as the content
            // itself once `chunked` is taken off and the hop-by-hop `Transfer-Encoding`
            // dropped: refused, as nginx refuses it.
            return Err(ProtocolError("a transfer coding other than chunked"));
        }
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                keep_alive = false;
                Framing::Close
            }
        }
    };
    Ok(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
        facts,
    })
}

/// Reads the options of a `Connection` field into `close` and `keep_alive`; true when
/// they are all `close` or `keep-alive` (nearly every message's), and so the field names
/// nothing else and means nothing past this hop: it is left out of the parsed head (it
/// would only be looked up and removed again, RFC 9110 §7.6.1). Its value is then letters,
/// `-`, commas and spaces: valid.
pub(crate) fn connection_options(value: &[u8], close: &mut bool, keep_alive: &mut bool) -> bool {
    // The one option nearly every message sends, alone: one comparison, not the list's
    // split, trim and two comparisons a token. Compared first as most spell it, byte for
    // byte, before a comparison that folds the case of each byte.
    if value == b"keep-alive" || value.eq_ignore_ascii_case(b"keep-alive") {
        *keep_alive = true;
        return true;
    }
    if value == b"close" || value.eq_ignore_ascii_case(b"close") {
        *close = true;
        return true;
    }
    let mut consumed = true;
    for option in tokens(value) {
        let (c, k) = (
            option.eq_ignore_ascii_case(b"close"),
            option.eq_ignore_ascii_case(b"keep-alive"),
        );
        *close |= c;
        *keep_alive |= k;
        consumed &= c || k;
    }
    consumed
}

/// What the HTTP/1 parsers do with a field, told from its name where the name is
/// matched ([`field_name`]): one branch a field, not a comparison with each name they
/// look for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    ContentType,
    Expect,
    /// None of the above, and known to be neither hop-by-hop nor gRPC's: nothing to note.
    Plain,
    /// None of the above, and not known to be plain: noted ([`HeadFacts::note`]).
    Other,
}

impl Role {
    /// The role of a name not among [`field_name`]'s common spellings.
    fn of(name: &HeaderName) -> Self {
        if *name == header::CONTENT_LENGTH {
            Self::ContentLength
        } else if *name == header::TRANSFER_ENCODING {
            Self::TransferEncoding
        } else if *name == header::HOST {
            Self::Host
        } else if *name == header::CONNECTION {
            Self::Connection
        } else if *name == header::CONTENT_TYPE {
            Self::ContentType
        } else if *name == header::EXPECT {
            Self::Expect
        } else {
            Self::Other
        }
    }
}

/// The field name `name`, as [`HeaderName::from_bytes`] reads it, and its [`Role`], with
/// the spellings clients and servers send most matched as sent: `from_bytes` copies every
/// name into a buffer, lowercasing it, and then looks it up among all the standard names.
pub(crate) fn field_name(
    name: &[u8],
) -> Result<(HeaderName, Role), http::header::InvalidHeaderName> {
    use Role::*;
    Ok(match name {
        b"Host" | b"host" => (header::HOST, Host),
        b"Content-Length" | b"content-length" => (header::CONTENT_LENGTH, ContentLength),
        b"Content-Type" | b"content-type" => (header::CONTENT_TYPE, ContentType),
        b"Connection" | b"connection" => (header::CONNECTION, Connection),
        b"Date" | b"date" => (header::DATE, Plain),
        b"Server" | b"server" => (header::SERVER, Plain),
        b"User-Agent" | b"user-agent" => (header::USER_AGENT, Plain),
        b"Accept" | b"accept" => (header::ACCEPT, Plain),
        b"Accept-Encoding" | b"accept-encoding" => (header::ACCEPT_ENCODING, Plain),
        b"Accept-Language" | b"accept-language" => (header::ACCEPT_LANGUAGE, Plain),
        b"Authorization" | b"authorization" => (header::AUTHORIZATION, Plain),
        b"Cache-Control" | b"cache-control" => (header::CACHE_CONTROL, Plain),
        b"Transfer-Encoding" | b"transfer-encoding" => {
            (header::TRANSFER_ENCODING, TransferEncoding)
        }
        b"Vary" | b"vary" => (header::VARY, Plain),
        b"ETag" | b"etag" => (header::ETAG, Plain),
        b"Last-Modified" | b"last-modified" => (header::LAST_MODIFIED, Plain),
        _ => {
            let name = HeaderName::from_bytes(name)?;
            let role = Role::of(&name);
            (name, role)
        }
    })
}

/// The non-empty elements of a comma-separated list, trimmed of optional whitespace.
pub(crate) fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `Content-Length` value: digits, or a list of identical ones (RFC 9110 §8.6).
#[inline]
pub(crate) fn content_length(value: &[u8]) -> Result<u64, ProtocolError> {
    // Nearly every value: one number in its plain form.
    if (1..=19).contains(&value.len()) && value.iter().all(u8::is_ascii_digit) {
        return Ok(value
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')));
    }
    content_length_list(value)
}

/// [`content_length`] of a list (`5, 5`), or of a number with leading zeros.
#[cold]
#[inline(never)]
fn content_length_list(value: &[u8]) -> Result<u64, ProtocolError> {
    const BAD: ProtocolError = ProtocolError("invalid Content-Length");
    let mut length = None;
    for element in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if element.is_empty() || !element.iter().all(u8::is_ascii_digit) {
            return Err(BAD);
        }
        // Leading zeros are valid (`0002`); past them, at most 19 digits fit the sum.
        let zeros = element.iter().take_while(|&&d| d == b'0').count();
        let element = &element[zeros.min(element.len() - 1)..];
        if element.len() > 19 {
            return Err(BAD);
        }
        let n = element
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        if length.is_some_and(|seen| seen != n) {
            return Err(ProtocolError("differing Content-Length values"));
        }
        length = Some(n);
    }
    length.ok_or(BAD)
}

/// Whether a `Content-Length` value [`content_length`] accepted is the number in its
/// plain form (digits, no leading zero): forwarded as it came if so, written again
/// otherwise (a list `5, 5`, or `0005`: a peer's HTTP/2 stack reads at most 19 digits).
pub(crate) fn canonical_length(value: &[u8]) -> bool {
    value.iter().all(u8::is_ascii_digit) && (value.len() == 1 || value.first() != Some(&b'0'))
}

/// Appends `Content-Length: n`, for a value [`canonical_length`] would not pass on.
#[cold]
#[inline(never)]
pub(crate) fn append_length(headers: &mut HeaderMap, name: HeaderName, n: u64) {
    headers.append(name, HeaderValue::from(n));
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Chunk {
    /// Some of the body's data.
    Data(Bytes),
    /// The trailer section (the body ends after it).
    Trailers(HeaderMap),
    /// The end of the body.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In the hexadecimal size.
    Size,
    /// Whitespace after the size: more of it, `;` or `CR`.
    SizeSpace,
    /// After `;`: extensions until `CR`.
    Extension,
    /// The `LF` of a size line.
    SizeLf,
    /// In a chunk's data.
    Data,
    /// The `CR` after a chunk's data.
    DataCr,
    /// The `LF` after a chunk's data.
    DataLf,
    /// After the last chunk: the trailer section.
    Trailers,
    /// The body has ended.
    Done,
}

/// Decodes a chunked body (RFC 9112 §7.1) as its bytes arrive, in any pieces.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// In `Size`: the size so far; in `Data`: what is left of the chunk.
    size: u64,
    /// Bytes of the current size line so far.
    line: usize,
    /// In `Trailers`: how much of the trailer section was searched for its end.
    scanned: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        Self {
            state: ChunkState::Size,
            size: 0,
            line: 0,
            scanned: 0,
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes what it can off the front of `buf`: `Ok(None)` when it needs more bytes.
    /// Once the body has ended, [`Chunk::End`] again.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ProtocolError> {
        loop {
            match self.state {
                ChunkState::Data => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(self.size).map_or(buf.len(), |s| s.min(buf.len()));
                    self.size -= n as u64;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    return Ok(Some(Chunk::Data(buf.split_to(n).freeze())));
                }
                ChunkState::Trailers => return self.trailers(buf),
                ChunkState::Done => return Ok(Some(Chunk::End)),
                _ => {
                    let mut used = 0;
                    let result = self.lines(buf, &mut used);
                    buf.advance(used);
                    if !result? {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// Steps through size lines and data delimiters byte by byte; `Ok(false)` when `buf`
    /// ran out first. `used`: how many bytes of `buf` it consumed.
    fn lines(&mut self, buf: &[u8], used: &mut usize) -> Result<bool, ProtocolError> {
        for &b in buf {
            *used += 1;
            match self.state {
                ChunkState::Size => {
                    let digit = match b {
                        b'0'..=b'9' => Some(b - b'0'),
                        b'a'..=b'f' => Some(b - b'a' + 10),
                        b'A'..=b'F' => Some(b - b'A' + 10),
                        _ => None,
                    };
                    match (digit, self.line) {
                        (Some(_), 16..) => return Err(ProtocolError("chunk size too large")),
                        (Some(d), _) => self.size = self.size << 4 | u64::from(d),
                        (None, 0) => return Err(ProtocolError("invalid chunk size")),
                        (None, _) if b == b'\r' => self.state = ChunkState::SizeLf,
                        (None, _) if b == b';' => self.state = ChunkState::Extension,
                        (None, _) if matches!(b, b' ' | b'\t') => {
                            self.state = ChunkState::SizeSpace;
                        }
                        (None, _) => return Err(ProtocolError("invalid chunk size")),
                    }
                    self.line += 1;
                }
                ChunkState::SizeSpace => {
                    self.line += 1;
                    match b {
                        b' ' | b'\t' if self.line <= MAX_CHUNK_LINE => {}
                        b';' => self.state = ChunkState::Extension,
                        b'\r' => self.state = ChunkState::SizeLf,
                        _ => return Err(ProtocolError("invalid chunk size")),
                    }
                }
                ChunkState::Extension => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(ProtocolError("chunk extension too long"));
                    }
                    match b {
                        b'\r' => self.state = ChunkState::SizeLf,
                        b'\t' | 0x20..=0x7e | 0x80.. => {}
                        _ => return Err(ProtocolError("invalid chunk extension")),
                    }
                }
                ChunkState::SizeLf => {
                    if b != b'\n' {
                        return Err(ProtocolError("invalid chunk size line ending"));
                    }
                    self.line = 0;
                    self.state = if self.size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data
                    };
                    return Ok(true);
                }
                ChunkState::DataCr | ChunkState::DataLf => {
                    let expected = if self.state == ChunkState::DataCr {
                        b'\r'
                    } else {
                        b'\n'
                    };
                    if b != expected {
                        return Err(ProtocolError("chunk data not followed by CRLF"));
                    }
                    if self.state == ChunkState::DataCr {
                        self.state = ChunkState::DataLf;
                    } else {
                        self.state = ChunkState::Size;
                        self.size = 0;
                        self.line = 0;
                    }
                }
                ChunkState::Data | ChunkState::Trailers | ChunkState::Done => {
                    unreachable!("handled by decode")
                }
            }
        }
        Ok(false)
    }

    /// The trailer section after the last chunk.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Option<Chunk>, ProtocolError> {
        match buf.first() {
            None => return Ok(None),
            Some(b'\r') => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if buf[1] != b'\n' {
                    return Err(ProtocolError("invalid line ending after the last chunk"));
                }
                buf.advance(2);
                self.state = ChunkState::Done;
                return Ok(Some(Chunk::End));
            }
            Some(b'\n') => return Err(ProtocolError("invalid line ending after the last chunk")),
            Some(_) => {}
        }
        // Parsed only once its end may be here: a section sent a byte at a time costs
        // one search over it, not a parse per byte.
        if !blank_line_since(buf, self.scanned) {
            if buf.len() > MAX_HEAD {
                return Err(ProtocolError("trailer section too large"));
            }
            self.scanned = buf.len();
            return Ok(None);
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((len, fields))) => {
                if len > MAX_HEAD {
                    return Err(ProtocolError("trailer section too large"));
                }
                let mut trailers = HeaderMap::with_capacity(fields.len());
                for field in fields {
                    let name = HeaderName::from_bytes(field.name.as_bytes())
                        .map_err(|_| ProtocolError("invalid trailer name"))?;
                    let value = HeaderValue::from_bytes(field.value)
                        .map_err(|_| ProtocolError("invalid trailer value"))?;
                    trailers.append(name, value);
                }
                buf.advance(len);
                self.state = ChunkState::Done;
                Ok(Some(Chunk::Trailers(trailers)))
            }
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                Err(ProtocolError("trailer section too large"))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(e) => Err(ProtocolError::from(e)),
        }
    }
}

/// Drops the empty lines (`CRLF` or `LF`) `buf` begins with, which may come before a
/// request line (RFC 9112, 2.2) and which the parser skips: returns how many bytes.
/// Dropped as they come, each pair does not count as where a head may end (a client
/// sending them one pair at a time made every read parse the whole buffer again).
#[inline]
pub(crate) fn skip_empty_lines(buf: &mut BytesMut) -> usize {
    let mut n = 0;
    loop {
        match buf[n..] {
            [b'\r', b'\n', ..] => n += 2,
            [b'\n', ..] => n += 1,
            _ => break,
        }
    }
    if n > 0 {
        buf.advance(n);
    }
    n
}

/// Whether `buf` has a blank line (`LF LF` or `LF CR LF`) ending after its first `from`
/// bytes: where a head or a trailer section may end. Looks back over the few bytes before
/// `from` in which one could have begun.
pub(crate) fn blank_line_since(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(2).min(buf.len())..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// How a request's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no framing header.
    None,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

impl RequestFraming {
    /// How a request with `method`, `headers` and `body` is framed: by its body alone.
    /// An empty body is `Content-Length: 0` for methods that define a body
    /// (`POST`, `PUT`, `PATCH`) or when the client said it, and no header otherwise; a body
    /// of known length is `Content-Length`, any other `chunked`, whatever the method (RFC
    /// 9110 allows a body on every method; dropping one would change the request).
    pub fn of<B: HttpBody>(method: &Method, headers: &HeaderMap, body: &B) -> Self {
        Self::by_body(method, body)
            .unwrap_or_else(|| Self::empty(headers.contains_key(header::CONTENT_LENGTH)))
    }

    /// The framing `method` and `body` decide alone: `None` for an empty body of a method
    /// that defines none, which is `Content-Length: 0` if the client sent the field
    /// ([`RequestFraming::empty`]).
    pub(crate) fn by_body<B: HttpBody>(method: &Method, body: &B) -> Option<Self> {
        if body.is_end_stream() {
            let defines_body = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
            return defines_body.then_some(Self::Length(0));
        }
        Some(match body.size_hint().exact() {
            Some(n) => Self::Length(n),
            None => Self::Chunked,
        })
    }

    /// An empty body's framing, for a method that defines none: `Content-Length: 0` if
    /// the client sent `Content-Length` (`has_length`), none otherwise.
    fn empty(has_length: bool) -> Self {
        if has_length {
            Self::Length(0)
        } else {
            Self::None
        }
    }
}

/// Writes a request head into `out`: the request line with `target` (origin form; with
/// `added.target_from`, `/` and what follows that byte of it), `host` if there is one,
/// every field of `headers` but `Content-Length`, `Transfer-Encoding` (and `Host`, if
/// `host` is given), the forwarding fields of `added`, then the framing field `framing`
/// says: the framing returned. A `framing` of `None` ([`RequestFraming::by_body`]) is
/// decided by whether `headers` has `Content-Length`, seen as they are written rather
/// than looked up.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    added: &Added,
    framing: Option<RequestFraming>,
) -> RequestFraming {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    match added.target_from {
        Some(from) => {
            out.push(b'/');
            out.extend_from_slice(target.get(from..).unwrap_or("").as_bytes());
        }
        None => out.extend_from_slice(target.as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut has_length = false;
    let mut cookies_written = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            has_length = true;
            continue;
        }
        if name == header::TRANSFER_ENCODING || (name == header::HOST && host.is_some()) {
            continue;
        }
        if name == header::COOKIE {
            // One `Cookie` line, its values joined with `; ` (RFC 9113 §8.2.3: an HTTP/2
            // client sends each cookie as a field of its own; RFC 6265 §5.4: one field
            // over HTTP/1, which upstreams joining repeated fields with `, ` misread).
            if !cookies_written {
                cookies_written = true;
                out.extend_from_slice(b"cookie: ");
                for (i, cookie) in headers.get_all(header::COOKIE).iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(b"; ");
                    }
                    out.extend_from_slice(cookie.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    added.forwarded.encode(out);
    added.trace.encode(out);
    let framing = framing.unwrap_or(RequestFraming::empty(has_length));
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
    framing
}

/// What the client writes into a request's head without its being in the request: the
/// forwarding fields, the trace fields the gateway made, and the target with the route's
/// prefix stripped (the endpoint's `Host` is the connection's: [`Conn::set_host`]). If
/// the request is handed back unsent ([`Conn::take_unsent`]), or is not written by this
/// client, they are put into it ([`Added::apply`]).
#[derive(Debug, Default)]
pub(crate) struct Added {
    pub(crate) forwarded: Forwarded,
    /// The target is `/` and what follows this byte of the request's path and query
    /// (a byte boundary it has); `None`: its path and query as they are.
    pub(crate) target_from: Option<usize>,
    /// The trace fields the gateway made for the request.
    pub(crate) trace: super::trace::NewFields,
}

impl Added {
    /// Puts the fields (and `host`, if given) into `request`'s map, replacing any of the
    /// same name, and the target into its URI.
    pub(crate) fn apply(self, request: &mut Request<Body>, host: Option<HeaderValue>) {
        let headers = request.headers_mut();
        if let Some(host) = host {
            headers.insert(header::HOST, host);
        }
        self.forwarded.insert_into(headers);
        self.trace.insert_into(headers);
        if let Some(from) = self.target_from {
            let uri = request.uri();
            let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
            let rest = path_and_query.get(from..).unwrap_or("");
            // Written into the thread's header chunk: no allocation of its own.
            let target = crate::header_arena::bytes(&[b"/", rest.as_bytes()]);
            *request.uri_mut() = http::Uri::from_maybe_shared(target)
                .unwrap_or_else(|_| http::Uri::from_static("/"));
        }
    }
}

/// `n` in decimal.
pub(crate) fn decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(crate::util::decimal(n, &mut [0; 20]));
}

/// `n` in hexadecimal.
pub(crate) fn hexadecimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Why an exchange on a [`Conn`] failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Reading or writing the socket failed.
    Io(io::Error),
    /// The upstream closed the connection before the response (or its body) ended.
    Closed,
    /// The upstream's answer was malformed.
    Protocol(ProtocolError),
    /// The request body failed (the client's fault: its error is in the source chain).
    RequestBody(BoxError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "upstream connection: {e}"),
            Self::Closed => f.write_str("the upstream closed the connection before the end"),
            Self::Protocol(e) => e.fmt(f),
            Self::RequestBody(e) => write!(f, "sending the request body: {e}"),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            Self::Protocol(e) => Some(e),
            Self::RequestBody(e) => Some(e.as_ref()),
            Self::Closed => None,
        }
    }
}

impl Failure {
    /// Whether the connection was lost (reset, closed, cut) rather than the exchange
    /// going wrong in a way a new connection would not fix.
    pub(crate) fn is_connection_lost(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::NotConnected
            ),
            Self::Protocol(_) | Self::RequestBody(_) => false,
        }
    }
}

/// Where the response body is.
#[derive(Debug)]
enum Reading {
    /// No exchange, or its head has not come.
    Head,
    /// `Content-Length`: what is left of it.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the upstream closes.
    Close,
    /// The body has ended.
    Done,
}

/// One HTTP/1.1 connection to an upstream: its socket and the two buffers every exchange
/// on it reuses.
pub(crate) struct Conn<IO> {
    io: IO,
    /// What has been read and not consumed.
    read: BytesMut,
    /// The head (or a chunk's size line) being written, from `written`.
    out: Vec<u8>,
    written: usize,
    /// A chunk of the request body being written after `out`.
    data: Bytes,
    /// The request, until its first byte is written: what a failed write hands back.
    unsent: Option<Request<Body>>,
    /// The fields written with `unsent`'s head besides its own, put back into its map if
    /// it is handed back.
    added: Added,
    /// The `Host` written in place of each request's own: the endpoint's, set once for
    /// the connection rather than carried with every request.
    host: Option<HeaderValue>,
    /// The last request's header map, emptied, for the next response's fields: with
    /// the gateway's HTTP/1 server reusing each response's map for its next request, the
    /// maps go round without an allocation.
    spare: Option<HeaderMap>,
    /// The request body still to send (after its first byte was written).
    body: Option<Body>,
    /// The request's body was polled once before its first write (for a frame to go
    /// with the head).
    peeked: bool,
    /// A frame was taken from the body then: the unsent request is no longer whole.
    consumed: bool,
    /// The body ended then.
    body_ended: bool,
    framing: RequestFraming,
    /// Bytes of a `Content-Length` body not yet taken from it.
    to_send: u64,
    /// A chunk's data was written: its `CRLF` is owed before the next size line.
    crlf_owed: bool,
    /// The request has been written whole (and flushed).
    sent: bool,
    /// Writing failed after part of the request was written: nothing more is written,
    /// but the upstream may still answer.
    write_failed: Option<io::Error>,
    /// The request is `HEAD`.
    head_request: bool,
    reading: Reading,
    /// How much the next read asks for (see [`Conn::poll_fill`]).
    read_size: usize,
    /// How many bytes the last incomplete parse of a response head had.
    partial: usize,
    /// [`Conn::idle_is_usable`] has just found the connection usable: the same check
    /// before the first write is skipped once.
    checked: bool,
    /// Bytes came since the request began.
    answered: bool,
    /// The last response allows another request.
    keep_alive: bool,
    /// What the parse of the last response head saw.
    facts: HeadFacts,
    /// The fields the last response head named in `Connection` (rarely any): taken out of
    /// its trailers as out of its head.
    trailer_drop: Vec<HeaderName>,
}

impl<IO> fmt::Debug for Conn<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("reading", &self.reading)
            .field("sent", &self.sent)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    /// A connection over `io`, ready for a request.
    pub(crate) fn new(io: IO) -> Self {
        Self {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            out: Vec::with_capacity(1024),
            written: 0,
            data: Bytes::new(),
            unsent: None,
            added: Added::default(),
            host: None,
            spare: None,
            body: None,
            peeked: false,
            consumed: false,
            body_ended: false,
            framing: RequestFraming::None,
            to_send: 0,
            crlf_owed: false,
            sent: true,
            write_failed: None,
            head_request: false,
            reading: Reading::Done,
            read_size: READ_CHUNK,
            partial: 0,
            checked: false,
            answered: false,
            keep_alive: true,
            facts: HeadFacts::UNKNOWN,
            trailer_drop: Vec::new(),
        }
    }

    /// What the parse of the last response head saw of the fields looked up later.
    pub(crate) fn head_facts(&self) -> HeadFacts {
        self.facts
    }

    /// Whether bytes of an answer came since the current request began.
    pub(crate) fn answered(&self) -> bool {
        self.answered
    }

    /// Whether the connection may carry another request: the last exchange ended
    /// cleanly on both sides, keep-alive is in force, and nothing came after the answer.
    pub(crate) fn is_reusable(&self) -> bool {
        self.keep_alive
            && self.sent
            && self.write_failed.is_none()
            && matches!(self.reading, Reading::Done)
            && self.read.is_empty()
    }

    /// Whether the response body has been read to its end.
    pub(crate) fn body_done(&self) -> bool {
        matches!(self.reading, Reading::Done)
    }

    /// What is left of a `Content-Length` body, if that is how it is delimited.
    pub(crate) fn body_remaining(&self) -> Option<u64> {
        match self.reading {
            Reading::Length(n) => Some(n),
            Reading::Done => Some(0),
            _ => None,
        }
    }

    /// Whether an idle connection is still usable: the upstream has neither closed it
    /// nor sent anything on it (an idle connection has no answer due). Costs no system
    /// call when the socket has had no event since its last read.
    ///
    /// `try_read` is asked first: a read that neither waits nor leaves a waker behind (a
    /// TCP socket's `try_read_buf`, `WouldBlock` when nothing came), `None` where the
    /// transport has none, and the connection is then polled with a no-op waker. The
    /// request's own read registers its waker a moment later: the poll spared costs
    /// about what the read does.
    pub(crate) fn idle_is_usable(
        &mut self,
        try_read: impl FnOnce(&mut IO, &mut BytesMut) -> Option<io::Result<usize>>,
    ) -> bool {
        if !self.is_reusable() {
            return false;
        }
        self.checked = match try_read(&mut self.io, &mut self.read) {
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => true,
            // Closed, failed, or bytes nobody asked for.
            Some(_) => false,
            None => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                self.poll_fill(&mut cx).is_pending()
            }
        };
        self.checked
    }

    /// Starts an exchange: encodes `request`'s head (its URI in origin form) into the
    /// connection's buffer. Nothing is written until [`Conn::poll_head`].
    pub(crate) fn start(&mut self, request: Request<Body>) {
        self.start_with(request, Added::default());
    }

    /// [`start`](Self::start), with fields written besides the request's own.
    pub(crate) fn start_with(&mut self, request: Request<Body>, added: Added) {
        let framing = RequestFraming::by_body(request.method(), request.body());
        self.out.clear();
        self.written = 0;
        let framing = encode_request(
            &mut self.out,
            request.method(),
            request.uri().path_and_query().map_or("/", |p| p.as_str()),
            request.headers(),
            self.host.as_ref(),
            &added,
            framing,
        );
        self.added = added;
        self.head_request = request.method() == Method::HEAD;
        self.framing = framing;
        self.to_send = match framing {
            RequestFraming::Length(n) => n,
            _ => 0,
        };
        self.crlf_owed = false;
        self.data = Bytes::new();
        self.sent = false;
        self.write_failed = None;
        self.body = None;
        self.peeked = false;
        self.consumed = false;
        self.body_ended = false;
        self.unsent = Some(request);
        self.reading = Reading::Head;
        self.partial = 0;
        self.answered = false;
        self.keep_alive = false;
    }

    /// The request, if no byte of it was written: it may be sent on another connection.
    /// With the fields it was started with in its map.
    pub(crate) fn take_unsent(&mut self) -> Option<Request<Body>> {
        let mut request = self.unsent.take()?;
        std::mem::take(&mut self.added).apply(&mut request, self.host.clone());
        Some(request)
    }

    /// Writes `host` as every request's `Host` on this connection, in place of the
    /// request's own.
    pub(crate) fn set_host(&mut self, host: HeaderValue) {
        self.host = Some(host);
    }

    /// Writes what is buffered, then takes the next frame of the request body, until the
    /// request has been sent whole (`Ready(Ok)`), or the socket or the body is not ready.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        if self.sent || self.write_failed.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.written == 0 && self.framing != RequestFraming::None {
            if let Some(request) = &mut self.unsent {
                if !self.peeked {
                    // A body frame already there goes with the head, in one write (and,
                    // on TCP, one segment). Once one is taken, the request is no longer
                    // whole: a failed first write no longer hands it back.
                    self.peeked = true;
                    if let Poll::Ready(frame) = Pin::new(request.body_mut()).poll_frame(cx) {
                        self.consumed = true;
                        match self.take_frame(frame) {
                            Ok(ended) => self.body_ended = ended,
                            // The body failed (the client's, or over the route's limit):
                            // the request is not whole to be sent on another connection.
                            Err(e) => {
                                self.unsent = None;
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                }
            }
        }
        loop {
            while self.written < self.out.len() || !self.data.is_empty() {
                let out = &self.out[self.written..];
                let write = if self.data.is_empty() {
                    Pin::new(&mut self.io).poll_write(cx, out)
                } else {
                    let slices = [io::IoSlice::new(out), io::IoSlice::new(&self.data)];
                    Pin::new(&mut self.io).poll_write_vectored(cx, &slices)
                };
                let n = match ready!(write) {
                    Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
                    other => other,
                };
                let n = match n {
                    Ok(n) => n,
                    // Nothing written: the request is intact, for [`Conn::take_unsent`],
                    // unless part of its body was taken.
                    Err(e) if self.unsent.is_some() => {
                        if self.consumed {
                            self.unsent = None;
                        }
                        return Poll::Ready(Err(Failure::Io(e)));
                    }
                    Err(e) => {
                        // Part of it went: the upstream may answer still (an early
                        // `413`, say); the exchange fails only if it does not.
                        self.write_failed = Some(e);
                        return Poll::Ready(Ok(()));
                    }
                };
                if let Some(request) = self.unsent.take() {
                    self.added = Added::default();
                    let (parts, body) = request.into_parts();
                    if !self.body_ended {
                        self.body = Some(body);
                    }
                    self.spare = Some(parts.headers);
                }
                let from_out = n.min(self.out.len() - self.written);
                self.written += from_out;
                self.data.advance(n - from_out);
            }
            self.out.clear();
            self.written = 0;
            // Flushed before waiting on the body, or ending: a TLS stream may hold records
            // back (a no-op on TCP).
            if let Err(e) = ready!(Pin::new(&mut self.io).poll_flush(cx)) {
                self.write_failed = Some(e);
                return Poll::Ready(Ok(()));
            }
            let Some(body) = &mut self.body else {
                self.sent = true;
                return Poll::Ready(Ok(()));
            };
            if self.framing == RequestFraming::None {
                // An empty body: nothing to take from it.
                self.body = None;
                continue;
            }
            let frame = ready!(Pin::new(body).poll_frame(cx));
            match self.take_frame(frame) {
                Ok(true) => self.body = None,
                Ok(false) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Frames what the request body gave for the wire (the chunk's size line in `out`,
    /// its data in `data`); `Ok(true)` when the body has ended.
    fn take_frame(
        &mut self,
        frame: Option<Result<Frame<Bytes>, BoxError>>,
    ) -> Result<bool, Failure> {
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    // Trailers are not forwarded: the gateway drops `Trailer` (which
                    // declares them) as hop-by-hop, and hyper's client sent none
                    // undeclared either.
                    return Ok(false);
                };
                if data.is_empty() {
                    return Ok(false);
                }
                let len = data.len() as u64;
                match self.framing {
                    RequestFraming::Length(_) => {
                        if len > self.to_send {
                            return Err(Failure::RequestBody(
                                "the request body is longer than its Content-Length".into(),
                            ));
                        }
                        self.to_send -= len;
                    }
                    RequestFraming::Chunked => {
                        if self.crlf_owed {
                            self.out.extend_from_slice(b"\r\n");
                        }
                        hexadecimal(&mut self.out, len);
                        self.out.extend_from_slice(b"\r\n");
                        self.crlf_owed = true;
                    }
                    RequestFraming::None => {}
                }
                self.data = data;
                Ok(false)
            }
            Some(Err(e)) => Err(Failure::RequestBody(e)),
            None => {
                match self.framing {
                    RequestFraming::Chunked => {
                        if self.crlf_owed {
                            self.out.extend_from_slice(b"\r\n");
                        }
                        self.out.extend_from_slice(b"0\r\n\r\n");
                    }
                    RequestFraming::Length(_) if self.to_send > 0 => {
                        return Err(Failure::RequestBody(
                            "the request body is shorter than its Content-Length".into(),
                        ));
                    }
                    _ => {}
                }
                Ok(true)
            }
        }
    }

    /// Reads into the buffer (see [`poll_fill`]), noting that an answer began.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let n = ready!(poll_fill(
            &mut self.io,
            &mut self.read,
            &mut self.read_size,
            cx
        ))?;
        if n > 0 {
            self.answered = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Called when the connection goes back to the pool, its buffers empty: buffers grown
    /// for a large answer (or head) are given back rather than kept by an idle connection.
    pub(crate) fn shrink_idle(&mut self) {
        if self.read.capacity() > 2 * READ_CHUNK {
            self.read = BytesMut::with_capacity(READ_CHUNK);
        }
        self.read_size = READ_CHUNK;
        if self.out.capacity() > 16 * 1024 {
            self.out = Vec::with_capacity(1024);
        }
    }

    /// Sends the request and reads until its response head.
    pub(crate) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<()>, Failure>> {
        if self.unsent.is_some() && self.written == 0 && !std::mem::take(&mut self.checked) {
            // Before the first byte (unless `idle_is_usable` just looked): a connection the upstream closed (or sent bytes on
            // unasked) fails with the request intact, to be sent on another. Costs no
            // system call while the socket has had no event since its last read.
            match self.poll_fill(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(Failure::Closed)),
                Poll::Ready(Ok(_)) => {
                    return Poll::Ready(Err(Failure::Protocol(ProtocolError(
                        "bytes before the request",
                    ))));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Io(e))),
            }
        }
        loop {
            // Sending may wait on the socket or on the client's body: the answer is read
            // meanwhile all the same (an upstream may answer before the body's end).
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if !self.read.is_empty() && matches!(self.read[0], b'\r' | b'\n') {
                let skipped = skip_empty_lines(&mut self.read);
                self.partial = self.partial.saturating_sub(skipped);
            }
            // Parsed again only once the head may have ended, or its bytes doubled (a
            // malformed one is still found early), or it is past the bound: a head sent a
            // byte at a time costs linear parsing, not quadratic.
            let len = self.read.len();
            if len > self.partial
                && (self.partial == 0
                    || len >= 2 * self.partial
                    || len > MAX_HEAD
                    || blank_line_since(&self.read, self.partial))
            {
                match parse_response_into(&mut self.read, self.head_request, &mut self.spare) {
                    Ok(Some(head)) => return Poll::Ready(Ok(self.begin_body(head))),
                    Ok(None) => self.partial = self.read.len(),
                    Err(e) => return Poll::Ready(Err(Failure::Protocol(e))),
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(match self.write_failed.take() {
                        Some(e) => Failure::Io(e),
                        None => Failure::Closed,
                    }));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Failure::Io(e))),
            }
        }
    }

    /// The response of `head`, its body to be read from this connection.
    fn begin_body(&mut self, head: ResponseHead) -> Response<()> {
        self.keep_alive = head.keep_alive;
        self.facts = head.facts;
        self.trailer_drop.clear();
        if head.facts.hop_by_hop() && matches!(head.framing, Framing::Chunked) {
            self.trailer_drop = super::headers::connection_named(&head.headers);
        }
        self.reading = match head.framing {
            Framing::Empty => Reading::Done,
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(ChunkedDecoder::new()),
            Framing::Close => Reading::Close,
        };
        let mut response = Response::new(());
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        response
    }

    /// The next frame of the response body (and the rest of the request sent meanwhile).
    pub(crate) fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Failure>>> {
        loop {
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            match &mut self.reading {
                Reading::Head | Reading::Done => return Poll::Ready(None),
                Reading::Length(left) if !self.read.is_empty() => {
                    let n =
                        usize::try_from(*left).map_or(self.read.len(), |l| l.min(self.read.len()));
                    *left -= n as u64;
                    if *left == 0 {
                        self.reading = Reading::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(self.read.split_to(n).freeze()))));
                }
                Reading::Chunked(decoder) => match decoder.decode(&mut self.read) {
                    Ok(Some(Chunk::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(Chunk::Trailers(mut trailers))) => {
                        self.reading = Reading::Done;
                        // What the head named in `Connection` (what no upstream's trailers may carry
                        // on is taken out further out, for every upstream).
                        for name in &self.trailer_drop {
                            trailers.remove(name);
                        }
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Some(Chunk::End)) => {
                        self.reading = Reading::Done;
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(Failure::Protocol(e)))),
                },
                Reading::Close if !self.read.is_empty() => {
                    let data = self.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Reading::Length(_) | Reading::Close => {}
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) if matches!(self.reading, Reading::Close) => {
                    self.reading = Reading::Done;
                    self.keep_alive = false;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(Failure::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(Failure::Io(e)))),
            }
        }
    }
}

/// Reads from `io` into `read`: `Ok(0)` at the end of the stream. Reads ask for
/// [`READ_CHUNK`] bytes, twice as much each time one fills what it asked for (a large
/// body: fewer system calls and frames), up to [`MAX_READ`], and half as much again when
/// one brings less than an eighth; `read_size` keeps the connection's current size.
pub(crate) fn poll_fill<IO: AsyncRead + Unpin>(
    io: &mut IO,
    read: &mut BytesMut,
    read_size: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if read.capacity() - read.len() < *read_size / 4 {
        // Reclaims the buffer in place once the heads and bodies that share it are gone:
        // a steady connection reads without allocating.
        read.reserve(*read_size);
    }
    let asked = read.capacity() - read.len();
    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, read))?;
    if n == asked && *read_size < MAX_READ {
        *read_size *= 2;
    } else if n < *read_size / 8 && *read_size > READ_CHUNK {
        *read_size /= 2;
    }
    Poll::Ready(Ok(n))
}

/// Sends `request` on `conn` and reads its response head.
pub(crate) fn exchange<IO: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<IO>,
    request: Request<Body>,
) -> impl Future<Output = Result<Response<()>, Failure>> + '_ {
    conn.start(request);
    std::future::poll_fn(move |cx| conn.poll_head(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<ResponseHead>, ProtocolError> {
        parse_response(&mut BytesMut::from(text), false)
    }

    /// The spellings `field_name` matches itself, and names that go to `from_bytes`.
    const NAMES: [&str; 22] = [
        "host",
        "content-length",
        "content-type",
        "connection",
        "date",
        "server",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "authorization",
        "cache-control",
        "transfer-encoding",
        "vary",
        "etag",
        "last-modified",
        "expect",
        "keep-alive",
        "te",
        "grpc-status",
        "x-request-id",
        "upgrade",
    ];

    proptest::proptest! {
        /// A name matched as sent is the name `from_bytes` reads, in the role the long
        /// way (comparisons with each name) gives it; a `Plain` one has nothing to note.
        #[test]
        fn field_names_take_the_role_their_name_has(
            index in 0..NAMES.len(),
            upper in proptest::collection::vec(proptest::bool::ANY, 20),
        ) {
            let lower = NAMES[index];
            let cased: String = lower
                .chars()
                .zip(upper.iter().cycle())
                .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            let title: String = lower
                .split('-')
                .map(|w| format!("{}{}", w[..1].to_ascii_uppercase(), &w[1..]))
                .collect::<Vec<_>>()
                .join("-");
            for spelling in [lower, cased.as_str(), title.as_str()] {
                let (name, role) = field_name(spelling.as_bytes()).unwrap();
                let read = HeaderName::from_bytes(spelling.as_bytes()).unwrap();
                proptest::prop_assert_eq!(&name, &read);
                let long_way = Role::of(&read);
                if role == Role::Plain {
                    proptest::prop_assert_eq!(long_way, Role::Other, "{}", spelling);
                    let mut facts = HeadFacts::default();
                    facts.note(&read, b"application/grpc");
                    proptest::prop_assert_eq!(facts.bits, 0, "{}", spelling);
                } else {
                    proptest::prop_assert_eq!(role, long_way, "{}", spelling);
                }
            }
        }
    }

    fn framing(text: &str) -> Result<(Framing, bool), &'static str> {
        match parse(text) {
            Ok(Some(head)) => Ok((head.framing, head.keep_alive)),
            Ok(None) => Err("incomplete"),
            Err(e) => Err(e.reason()),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        use Framing::*;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Ok((Length(5), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"),
            Ok((Length(7), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 7\r\ncontent-length: 7\r\n\r\n"),
            Ok((Length(7), true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n"),
            Ok((Chunked, true))
        );
        // Another coding is refused (its content would be forwarded still coded), and
        // so is no coding at all; not when no body follows.
        for te in ["gzip, Chunked", "gzip", ""] {
            let head = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            let parsed = framing(&head);
            assert!(parsed.is_err(), "{te}: {parsed:?}");
        }
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok((Close, false)));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(
            framing("HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
            Ok((Empty, true))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n"),
            Ok((Length(1), false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            Ok((Length(1), false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\n"),
            Ok((Length(1), true))
        );
        // A HEAD request's answer has no body, whatever its head says.
        let head = parse_response(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"),
            true,
        );
        assert_eq!(head.unwrap().unwrap().framing, Empty);
    }

    #[test]
    fn connection_is_left_out_when_it_names_nothing_else() {
        let head = |text: &str| parse(text).unwrap().unwrap();
        for value in [
            "keep-alive",
            "Keep-Alive",
            "close",
            " close , keep-alive ",
            "",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\nConnection: {value}\r\nx-a: 1\r\n\r\n");
            let h = head(&text);
            assert!(!h.headers.contains_key(header::CONNECTION), "{value:?}");
            assert_eq!(h.headers["x-a"], "1");
        }
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive);
        // Naming another field: kept, for the proxy to remove that field too.
        let h = head("HTTP/1.1 200 OK\r\nConnection: close, x-a\r\nx-a: 1\r\n\r\n");
        assert_eq!(h.headers[header::CONNECTION], "close, x-a");
        assert!(!h.keep_alive);
        let (mut close, mut keep_alive) = (false, false);
        assert!(!connection_options(b"upgrade", &mut close, &mut keep_alive));
        assert!(connection_options(
            b"keep-alive,,",
            &mut close,
            &mut keep_alive
        ));
        assert!(keep_alive && !close);
    }

    proptest::proptest! {
        /// The single-option shortcut reads a value as the list's general reading does.
        #[test]
        fn connection_options_read_as_the_list_says(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "keep-alive", "Keep-Alive", "KEEP-ALIVE", "close", "Close", "keep-alivex",
                    "clos", "upgrade", "x-a", ",", " ", "\t", "",
                ]),
                0..5,
            )
        ) {
            let value = parts.concat();
            let (mut close, mut keep_alive) = (false, false);
            let consumed = connection_options(value.as_bytes(), &mut close, &mut keep_alive);
            let (mut c, mut k, mut all) = (false, false, true);
            for option in tokens(value.as_bytes()) {
                let (is_c, is_k) = (
                    option.eq_ignore_ascii_case(b"close"),
                    option.eq_ignore_ascii_case(b"keep-alive"),
                );
                c |= is_c;
                k |= is_k;
                all &= is_c || is_k;
            }
            proptest::prop_assert_eq!((consumed, close, keep_alive), (all, c, k), "{:?}", value);
        }
    }

    #[test]
    fn ambiguous_or_malformed_framing_is_an_error() {
        for (text, reason) in [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                "both Content-Length and Transfer-Encoding",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                "differing Content-Length values",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n",
                "differing Content-Length values",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                "invalid Content-Length",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip, chunked\r\n\r\n",
                "a coding applied after chunked",
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
                "a coding applied after chunked",
            ),
            (
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 response",
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
                "unexpected 101 Switching Protocols",
            ),
            (
                "HTTP/1.1 200 OK\r\nfolded: a\r\n b\r\n\r\n",
                "invalid header name",
            ),
            ("HTTP/2.0 200 OK\r\n\r\n", "not HTTP/1.x"),
            ("HTTP/1.1 20 OK\r\n\r\n", "invalid status line"),
            (
                "HTTP/1.1 200 OK\r\nbad name: y\r\n\r\n",
                "invalid header name",
            ),
            (
                "HTTP/1.1 200 OK\r\nx: a\u{1}b\r\n\r\n",
                "invalid header value",
            ),
        ] {
            assert_eq!(framing(text), Err(reason), "{text:?}");
        }
    }

    #[test]
    fn bare_lf_line_endings_are_accepted_in_heads_not_in_chunk_framing() {
        // httparse accepts LF line endings in heads (RFC 9112 §2.2 lets a recipient):
        // the end of a head is found the same way whichever ending it uses.
        assert_eq!(
            framing("HTTP/1.1 200 OK\ncontent-length: 2\n\n").map(|f| f.0),
            Ok(Framing::Length(2))
        );
        // Chunk framing is strict: a bare LF where CRLF belongs is an error, never a
        // guess at where the next chunk starts.
        assert!(decode(&[b"3\nabc\r\n0\r\n\r\n"]).is_err());
        assert!(decode(&[b"3\r\nabc\n0\r\n\r\n"]).is_err());
        assert!(decode(&[b"3\r\nabc\r\n0\r\n\n"]).is_err());
    }

    #[test]
    fn interim_answers_are_skipped() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        );
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.headers.get("link"), None);
        assert_eq!(&buf[..], b"ok");
    }

    #[test]
    fn every_field_is_read_however_many_the_head_has() {
        use head_tests::{FIELD_COUNTS, listed, numbered};
        for n in std::iter::once(0).chain(FIELD_COUNTS) {
            let (lines, sent) = numbered(0..n);
            let mut buf = BytesMut::from(format!("HTTP/1.1 200 OK\r\n{lines}\r\nbody").as_str());
            let head = parse_response(&mut buf, false).unwrap().unwrap();
            assert_eq!(listed(&head.headers), sent, "{n} fields");
            assert_eq!(&buf[..], b"body");
        }
    }

    #[test]
    fn a_head_is_incomplete_until_its_blank_line_and_bounded() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
        assert!(parse_response(&mut buf, false).unwrap().is_none());
        let mut big = BytesMut::from("HTTP/1.1 200 OK\r\n");
        while big.len() <= MAX_HEAD {
            big.extend_from_slice(
                b"x-filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        assert!(parse_response(&mut big, false).is_err());
        let mut many = BytesMut::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_response(&mut many, false).unwrap_err().reason(),
            "too many header fields"
        );
    }

    #[test]
    fn header_values_share_the_read_buffer() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 OK\r\nx-a: one\r\nX-B: two\r\nx-a: three\r\ncontent-length: 0\r\n\r\nrest",
        );
        let head = parse_response(&mut buf, false).unwrap().unwrap();
        let a: Vec<_> = head.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["one", "three"]);
        assert_eq!(head.headers["x-b"], "two");
        assert_eq!(&buf[..], b"rest");
    }

    /// Decodes `pieces` fed one after the other: the data, the trailers, and whether it
    /// ended.
    fn decode(pieces: &[&[u8]]) -> Result<(Vec<u8>, Option<HeaderMap>, bool), &'static str> {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for piece in pieces {
            buf.extend_from_slice(piece);
            loop {
                match decoder.decode(&mut buf).map_err(|e| e.reason())? {
                    Some(Chunk::Data(d)) => data.extend_from_slice(&d),
                    Some(Chunk::Trailers(t)) => trailers = Some(t),
                    Some(Chunk::End) => return Ok((data, trailers, true)),
                    None => break,
                }
            }
        }
        Ok((data, trailers, false))
    }

    #[test]
    fn chunked_bodies_decode_in_any_pieces() {
        let body = b"5\r\nhello\r\n6;ext=\"a b\"\r\n world\r\nA \r\n0123456789\r\n0\r\n\r\n";
        for split in 0..body.len() {
            let (data, trailers, ended) = decode(&[&body[..split], &body[split..]]).unwrap();
            assert_eq!(data, b"hello world0123456789");
            assert!(trailers.is_none() && ended, "split at {split}");
        }
        let one_by_one: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode(&one_by_one).unwrap().0, b"hello world0123456789");
        let (data, trailers, ended) =
            decode(&[b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\n"]).unwrap();
        assert_eq!(data, b"abc");
        assert!(ended);
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        assert_eq!(
            decode(&[b"3\r\nab"]).unwrap(),
            (b"ab".to_vec(), None, false)
        );
    }

    /// A request with `headers` header fields and `body`.
    fn request(method: Method, fields: usize, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.method_mut() = method;
        *request.uri_mut() = http::Uri::from_static("/p?q");
        for i in 0..fields {
            request.headers_mut().append(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        request
    }

    /// Reads from `upstream` until `end` has been seen; what was read.
    async fn read_until(upstream: &mut tokio::io::DuplexStream, end: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(end.len()).any(|w| w == end) {
            let n = upstream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        seen
    }

    /// The body of the response on `conn`, to its end.
    async fn body_of(conn: &mut Conn<tokio::io::DuplexStream>) -> (Vec<u8>, bool) {
        let mut data = Vec::new();
        let mut trailers = false;
        while let Some(frame) = std::future::poll_fn(|cx| conn.poll_body(cx)).await {
            let frame = frame.unwrap();
            trailers |= frame.is_trailers();
            if let Ok(d) = frame.into_data() {
                data.extend_from_slice(&d);
            }
        }
        (data, trailers)
    }

    #[tokio::test]
    async fn exchanges_on_one_connection_reuse_its_buffers_and_maps() {
        use tokio::io::AsyncWriteExt;
        let (io, mut upstream) = tokio::io::duplex(64 * 1024);
        let mut conn = Conn::new(io);
        // A GET with many fields: its map, emptied, takes the response's fields.
        let response = {
            let sending = exchange(
                &mut conn,
                request(Method::GET, 40, super::super::body::full("")),
            );
            let answer = async {
                let head = read_until(&mut upstream, b"\r\n\r\n").await;
                let head = String::from_utf8(head).unwrap();
                assert!(
                    head.starts_with("GET /p?q HTTP/1.1\r\nx-0: v\r\n"),
                    "{head}"
                );
                assert!(!head.contains("content-length"), "{head}");
                upstream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc")
                    .await
                    .unwrap();
            };
            let (response, ()) = tokio::join!(sending, answer);
            response.unwrap()
        };
        assert!(
            response.headers().capacity() >= 40,
            "the request's map, reused"
        );
        assert_eq!(body_of(&mut conn).await, (b"abc".to_vec(), false));
        assert!(conn.is_reusable());
        // A POST with a streamed body, answered chunked with trailers.
        let frames = futures::stream::iter(
            ["hello", " world"]
                .map(|s| Ok::<_, BoxError>(Frame::data(Bytes::from_static(s.as_bytes())))),
        );
        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames));
        let sending = exchange(&mut conn, request(Method::POST, 0, body));
        let answer = async {
            let sent = read_until(&mut upstream, b"0\r\n\r\n").await;
            let sent = String::from_utf8(sent).unwrap();
            assert!(
                sent.ends_with(
                    "transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                ),
                "{sent:?}"
            );
            upstream
                .write_all(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n")
                .await
                .unwrap();
        };
        let (response, ()) = tokio::join!(sending, answer);
        assert_eq!(response.unwrap().status(), StatusCode::CREATED);
        assert_eq!(body_of(&mut conn).await, (b"ok".to_vec(), true));
        assert!(conn.is_reusable());
        // The upstream closes: the next exchange fails before a byte is written, and the
        // request is handed back whole.
        drop(upstream);
        let failed = exchange(
            &mut conn,
            request(Method::GET, 1, super::super::body::full("")),
        )
        .await;
        assert!(failed.unwrap_err().is_connection_lost());
        assert!(conn.take_unsent().is_some());
    }

    /// An upstream socket that counts the writes made on it, or fails every write.
    struct Writes {
        inner: tokio::io::DuplexStream,
        count: usize,
        fail: bool,
    }

    impl AsyncRead for Writes {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if self.fail {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            self.count += 1;
            // All of it, as a socket with room does.
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            Pin::new(&mut self.inner).poll_write(cx, &all)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_body_ready_with_its_head_goes_in_the_same_write() {
        use tokio::io::AsyncWriteExt;
        let (io, mut upstream) = tokio::io::duplex(64 * 1024);
        let mut conn = Conn::new(Writes {
            inner: io,
            count: 0,
            fail: false,
        });
        let frames = futures::stream::iter(
            ["abc", "de"].map(|s| Ok::<_, BoxError>(Frame::data(Bytes::from_static(s.as_bytes())))),
        );
        for (body, wire, writes) in [
            (
                super::super::body::full("hello"),
                "content-length: 5\r\n\r\nhello",
                1,
            ),
            (
                http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames)),
                "transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                // The head with the first chunk; the second; the last chunk.
                3,
            ),
        ] {
            conn.io.count = 0;
            let sending = exchange(&mut conn, request(Method::POST, 0, body));
            let answer = async {
                let sent = read_until(&mut upstream, wire.as_bytes()).await;
                assert!(String::from_utf8(sent).unwrap().ends_with(wire));
                upstream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .unwrap();
            };
            let (response, ()) = tokio::join!(sending, answer);
            response.unwrap();
            assert_eq!(conn.io.count, writes, "{wire:?}");
            assert!(conn.is_reusable());
        }
    }

    /// An upstream sends its response head a byte at a time (a slow or hostile upstream;
    /// SECURITY.md trusts upstreams with their answers, not with their framing).
    /// `Conn::poll_head` parsed the whole buffer again after every read that brought
    /// anything, so a head of `n` bytes cost `n` parses of up to `n` bytes: quadratic
    /// (the ~40 KiB head here, some 40 000 times; a 60 KiB one took about 10 s of CPU in a
    /// debug build). As the gateway's HTTP/1 server does with request heads, it parses
    /// again only when the head may have ended or its bytes doubled. Counted by
    /// `partial`, which each incomplete parse sets to the bytes it had.
    #[tokio::test]
    async fn a_response_head_trickled_a_byte_at_a_time_is_not_parsed_at_every_byte() {
        use tokio::io::AsyncWriteExt;
        let mut head = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..40 {
            head.push_str(&format!("x-{i}: {}\r\n", "v".repeat(1000)));
        }
        head.push_str("content-length: 0\r\n\r\n");
        assert!(head.len() < MAX_HEAD);
        let (io, mut upstream) = tokio::io::duplex(1 << 20);
        let mut conn = Conn::new(io);
        conn.start(request(Method::GET, 0, super::super::body::empty()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // The request goes out; the answer is awaited.
        assert!(conn.poll_head(&mut cx).is_pending());
        read_until(&mut upstream, b"\r\n\r\n").await;
        let (mut parses, mut last, mut answered) = (0usize, conn.partial, false);
        for byte in head.as_bytes() {
            upstream
                .write_all(std::slice::from_ref(byte))
                .await
                .unwrap();
            if let Poll::Ready(response) = conn.poll_head(&mut cx) {
                assert_eq!(response.unwrap().status(), StatusCode::OK);
                answered = true;
                break;
            }
            if conn.partial != last {
                (parses, last) = (parses + 1, conn.partial);
            }
        }
        assert!(answered, "the head was not read whole");
        assert!(
            parses <= 32,
            "{parses} incomplete parses of a {}-byte head sent a byte at a time",
            head.len()
        );
    }

    #[tokio::test]
    async fn a_request_whose_body_was_taken_is_not_handed_back() {
        let (io, _upstream) = tokio::io::duplex(1024);
        let mut conn = Conn::new(Writes {
            inner: io,
            count: 0,
            fail: true,
        });
        let failed = exchange(
            &mut conn,
            request(Method::GET, 0, super::super::body::full("")),
        )
        .await;
        assert!(failed.unwrap_err().is_connection_lost());
        assert!(conn.take_unsent().is_some(), "nothing taken: whole");
        let failed = exchange(
            &mut conn,
            request(Method::POST, 0, super::super::body::full("x")),
        )
        .await;
        assert!(failed.unwrap_err().is_connection_lost());
        assert!(conn.take_unsent().is_none(), "its body's frame was taken");
    }

    #[tokio::test]
    async fn large_bodies_are_read_in_growing_reads_and_the_buffer_is_given_back() {
        use tokio::io::AsyncWriteExt;
        const SIZE: usize = 1 << 20;
        let (io, mut upstream) = tokio::io::duplex(512 * 1024);
        let mut conn = Conn::new(io);
        let sending = exchange(
            &mut conn,
            request(Method::GET, 0, super::super::body::full("")),
        );
        let answer = async {
            read_until(&mut upstream, b"\r\n\r\n").await;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n");
            upstream.write_all(head.as_bytes()).await.unwrap();
        };
        let (response, ()) = tokio::join!(sending, answer);
        response.unwrap();
        let writer = tokio::spawn(async move {
            upstream.write_all(&vec![7u8; SIZE]).await.unwrap();
            upstream
        });
        let (mut frames, mut total, mut largest) = (0, 0, 0);
        while let Some(frame) = std::future::poll_fn(|cx| conn.poll_body(cx)).await {
            let data = frame.unwrap().into_data().unwrap();
            frames += 1;
            total += data.len();
            largest = largest.max(data.len());
        }
        let _upstream = writer.await.unwrap();
        assert_eq!(total, SIZE);
        // At 8 KiB a read it would take 128.
        assert!(frames < 40, "{frames} frames");
        assert!(largest > 4 * READ_CHUNK, "largest frame {largest}");
        assert!(conn.is_reusable());
        conn.shrink_idle();
        assert!(conn.read.capacity() <= 2 * READ_CHUNK);
        assert_eq!(conn.read_size, READ_CHUNK);
    }

    proptest::proptest! {
        /// Any chunking of any data, with extensions and trailers, cut anywhere,
        /// decodes to the data.
        #[test]
        fn chunked_encoding_round_trips(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), 0..8),
            extension in proptest::option::of("[a-z]{1,8}(=[a-z0-9]{0,8})?"),
            trailer in proptest::prelude::any::<bool>(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let mut wire = Vec::new();
            for chunk in &chunks {
                wire.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
                if let Some(ext) = &extension {
                    wire.extend_from_slice(format!(" ; {ext}").as_bytes());
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"x-sum: 1\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            let at = cut.index(wire.len() + 1);
            let (data, trailers, ended) = decode(&[&wire[..at], &wire[at..]]).unwrap();
            proptest::prop_assert_eq!(data, chunks.concat());
            proptest::prop_assert!(ended);
            proptest::prop_assert_eq!(trailers.is_some(), trailer);
        }
    }

    proptest::proptest! {
        /// What the parse notes of a head matches its map: where a fact rules a field
        /// out, the lookups it spares find nothing; where it does not, the field is there.
        #[test]
        fn head_facts_match_the_fields(
            picks in proptest::collection::vec(0usize..14, 0..8),
        ) {
            const FIELDS: [&str; 14] = [
                "Content-Type: application/json",
                "Content-Type: application/grpc+proto",
                "content-type: text/plain",
                "grpc-status: 0",
                "Grpc-Status: 14",
                "Keep-Alive: timeout=5",
                "Proxy-Connection: keep-alive",
                "Connection: close",
                "Connection: keep-alive, x-secret",
                "Upgrade: h2c",
                "Trailer: x-sum",
                "X-Custom: 1",
                "Server: test",
                "Date: Mon, 01 Jan 2024 00:00:00 GMT",
            ];
            let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n");
            for &i in &picks {
                head.push_str(FIELDS[i]);
                head.push_str("\r\n");
            }
            head.push_str("\r\n");
            let parsed = parse_response(&mut BytesMut::from(head.as_bytes()), false)
                .unwrap()
                .unwrap();
            let (facts, headers) = (parsed.facts, parsed.headers);
            let mut stripped = headers.clone();
            super::super::headers::remove_hop_by_hop(&mut stripped);
            let hop = headers
                .keys()
                .any(|name| super::super::headers::hop_bit(name) != 0);
            proptest::prop_assert_eq!(facts.hop_by_hop(), hop, "{}", head);
            if !facts.hop_by_hop() {
                proptest::prop_assert_eq!(&stripped, &headers);
            }
            let grpc = super::super::grpc::status_in_trailers(&headers)
                || crate::grpc::GrpcCode::from_headers(&headers).is_some();
            let grpc_type = headers
                .get_all(header::CONTENT_TYPE)
                .iter()
                .any(|v| v.as_bytes().starts_with(b"application/grpc"));
            proptest::prop_assert_eq!(
                facts.grpc(),
                grpc_type || headers.contains_key(&crate::grpc::GRPC_STATUS),
                "{}", head
            );
            proptest::prop_assert!(facts.grpc() || !grpc, "{}", head);
            proptest::prop_assert_eq!(
                facts.keep_alive(),
                headers.contains_key("keep-alive"),
                "{}", head
            );
        }
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for (body, reason) in [
            (&b"\r\n"[..], "invalid chunk size"),
            (b"x\r\n", "invalid chunk size"),
            (b"-1\r\n", "invalid chunk size"),
            (b"5 x\r\n", "invalid chunk size"),
            (b"3\nabc\r\n", "invalid chunk size"),
            (b"3\rabc\r\n", "invalid chunk size line ending"),
            (b"3\r\nabcd\r\n", "chunk data not followed by CRLF"),
            (b"3\r\nabc\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"10000000000000000\r\n", "chunk size too large"),
            (b"0\r\n\n", "invalid line ending after the last chunk"),
            (b"0\r\n\rx", "invalid line ending after the last chunk"),
            (b"1;a\x01\r\n", "invalid chunk extension"),
        ] {
            assert_eq!(decode(&[body]).map(|_| ()), Err(reason), "{body:?}");
        }
        let mut long = b"1;".to_vec();
        long.resize(MAX_CHUNK_LINE + 2, b'a');
        assert_eq!(
            decode(&[&long]).map(|_| ()),
            Err("chunk extension too long")
        );
        // Sixteen digits are the most: with leading zeros the size still fits.
        assert_eq!(decode(&[b"0000000000000003\r\nabc\r\n"]).unwrap().0, b"abc");
    }

    #[test]
    fn request_heads_carry_the_body_s_framing_only() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("up:80"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::POST,
            "/p?q=1",
            &headers,
            None,
            &Added::default(),
            Some(RequestFraming::Length(12345)),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /p?q=1 HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12345\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::GET,
            "/",
            &HeaderMap::new(),
            None,
            &Added::default(),
            Some(RequestFraming::Chunked),
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::GET,
            "/",
            &HeaderMap::new(),
            None,
            &Added::default(),
            Some(RequestFraming::None),
        );
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        // An empty body of a method that defines none: `Content-Length: 0` only if the
        // client sent the field.
        let mut length = HeaderMap::new();
        length.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        for (fields, framing, head) in [
            (
                HeaderMap::new(),
                RequestFraming::None,
                &b"GET / HTTP/1.1\r\n\r\n"[..],
            ),
            (
                length,
                RequestFraming::Length(0),
                b"GET / HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            ),
        ] {
            let mut out = Vec::new();
            let written = encode_request(
                &mut out,
                &Method::GET,
                "/",
                &fields,
                None,
                &Added::default(),
                None,
            );
            assert_eq!((written, &out[..]), (framing, head));
            assert_eq!(
                RequestFraming::of(&Method::GET, &fields, &super::super::body::empty()),
                framing
            );
        }
        let (mut d, mut h) = (Vec::new(), Vec::new());
        decimal(&mut d, 0);
        decimal(&mut d, u64::MAX);
        hexadecimal(&mut h, 0);
        hexadecimal(&mut h, u64::MAX);
        assert_eq!(d, b"018446744073709551615");
        assert_eq!(h, b"0ffffffffffffffff");
    }

    /// What a request was started with besides its own: the endpoint's `Host` in place of
    /// the request's, the forwarding fields after the request's, the target stripped of
    /// the route's prefix; and in the request when it is handed back unsent.
    #[test]
    fn added_fields_are_written_with_the_head_and_put_back_unsent() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("gw.example"));
        headers.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        let peer = HeaderValue::from_static("198.51.100.1");
        let forwarded =
            super::super::headers::rewrite(&mut headers, Some(&peer), false, false).forwarded;
        // `/api//x?q` with `/api` stripped.
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let added = Added {
            forwarded,
            target_from: Some(6),
            trace: super::super::trace::NewFields::made(
                parent,
                HeaderName::from_static("x-request-id"),
                HeaderValue::from_static("id-1"),
            ),
        };
        let host = HeaderValue::from_static("up:80");
        let mut out = Vec::new();
        encode_request(
            &mut out,
            &Method::GET,
            "/api//x?q",
            &headers,
            Some(&host),
            &added,
            Some(RequestFraming::None),
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x?q HTTP/1.1\r\nhost: up:80\r\nx-a: 1\r\n\
             x-forwarded-for: 198.51.100.1\r\nx-forwarded-host: gw.example\r\n\
             x-forwarded-proto: http\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-\
             00f067aa0ba902b7-01\r\nx-request-id: id-1\r\n\r\n"
        );
        // Unsent: the same fields, in the map, for another connection.
        let (io, _upstream) = tokio::io::duplex(64);
        let mut conn = Conn::new(io);
        conn.set_host(host);
        let mut request = Request::new(super::super::body::empty());
        *request.headers_mut() = headers;
        *request.uri_mut() = http::Uri::from_static("/api//x?q");
        conn.start_with(request, added);
        let request = conn.take_unsent().expect("nothing written");
        assert_eq!(request.uri(), "/x?q");
        let fields: Vec<_> = request
            .headers()
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            fields,
            [
                "host: up:80",
                "x-a: 1",
                "x-forwarded-for: 198.51.100.1",
                "x-forwarded-host: gw.example",
                "x-forwarded-proto: http",
                "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "x-request-id: id-1",
            ]
        );
    }
}
