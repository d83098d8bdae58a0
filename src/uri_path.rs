//! Request path normalisation (feature `http`): what the gateway does before route
//! matching (as Envoy's `normalize_path` and `merge_slashes` do), so that a route is
//! chosen on the path an upstream will act on, and that normal path is what the upstream
//! receives; and what [`PathKey`](crate::rate_limit::http::PathKey) keys. The gateway's
//! `gateway::path` is this module.
//!
//! [`normalize`] with both options on (the default):
//!
//! - decodes percent-encoded *unreserved* characters (`ALPHA DIGIT - . _ ~`, RFC 3986
//!   §2.3), so `%2e%2e` is `..` and `%7euser` is `~user`, and writes the hex digits of the
//!   other escapes in upper case (`%2a` is `%2A`, RFC 3986 §6.2.2.1); `%25` stays `%25`
//!   (nothing is decoded twice);
//! - merges repeated slashes (`/a//b` is `/a/b`);
//! - removes dot segments (RFC 3986 §5.2.4): `/a/./b/../c` is `/a/c`, `/a/b/..` is `/a/`.
//!
//! It refuses (the gateway answers `400`): a path that does not start with `/`; an encoded
//! `/` or `\` (`%2F`, `%5C`, either case) and a raw `\`, which upstreams disagree about; a
//! control byte, raw or encoded (`%00`–`%1F`, `%7F`); an invalid escape (`%zz`, `%2`); a
//! `..` that would climb above the root (`/../etc`); and any segment that starts with
//! `..;` or `.;` once decoded (`;` raw or as `%3B`): Tomcat and the servlet containers
//! behind many proxies drop `;parameters` from a segment and then resolve `..;x` as `..`,
//! so such a segment is refused rather than guessed at.
//!
//! With `normalize_path = false` no escape is decoded and no dot segment removed: the path
//! is matched and forwarded byte for byte as the client sent it, *and a path that would
//! need normalising* (a `.` or `..` segment, raw or encoded) is refused with `400` rather
//! than forwarded, since the route chosen on the raw path need not be the one an upstream
//! resolving dot segments would serve. The other refusals apply as well.
//!
//! With `merge_slashes = false` repeated slashes are kept (`/a//b` is matched and sent as
//! such; `..` after `//` removes the empty segment, as RFC 3986 says), except at the start
//! of the path: a path is never matched or forwarded with a leading `//`, which upstreams
//! may read as a network-path reference (`//evil.example/x`). Nor does stripping a prefix
//! leave one: the rest of `/api//evil.example/x` after `/api` is sent as
//! `/evil.example/x`.
//!
//! Characters clients percent-encode (non-ASCII, `"`, `<`, `>`, `` ` ``, `{`, `}`), sent
//! raw, are encoded (`/café` is `/caf%C3%A9`), so that a prefix written with its escapes
//! matches them whichever way they came; with `normalize_path = false` they are refused.
//!
//! Routes are then matched on the path's [`match_form`] (`;` parameters dropped, the
//! escapes of reserved characters a prefix may hold raw decoded).
//!
//! A path that is already normal (the common case) costs one pass over its bytes and no
//! allocation; only a path that changes is copied.

use std::borrow::Cow;
use std::fmt;

/// How request paths are normalised: the `[gateway]` keys `normalize_path` and
/// `merge_slashes`, both on by default. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathOptions {
    /// Decode escaped unreserved characters, remove dot segments and encode the characters
    /// clients percent-encode; when off, refuse paths that would need it.
    pub normalize: bool,
    /// Merge repeated slashes.
    pub merge_slashes: bool,
}

impl Default for PathOptions {
    fn default() -> Self {
        Self {
            normalize: true,
            merge_slashes: true,
        }
    }
}

/// Why a request path is refused (the gateway answers `400 Bad Request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PathError {
    /// The path does not start with `/` (`*`, an authority).
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    InvalidEscape,
    /// `%2F` or `%5C`: a separator hidden in a segment.
    EncodedSeparator,
    /// A raw `\`.
    Backslash,
    /// A control byte, raw or encoded (`%00`–`%1F`, `%7F`).
    ControlByte,
    /// A `..` above the root.
    AboveRoot,
    /// A segment starting with `..;` or `.;`.
    DotSegmentParameter,
    /// A `.` or `..` segment while `normalize_path` is off.
    DotSegment,
    /// A character clients percent-encode (non-ASCII, `"`, `<`, `>`, `` ` ``, `{`, `}`)
    /// sent raw while `normalize_path` is off (with it on, it is encoded).
    Unencoded,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path must start with '/'",
            Self::InvalidEscape => "invalid percent-encoding in the path",
            Self::EncodedSeparator => "encoded '/' or '\\' in the path",
            Self::Backslash => "'\\' in the path",
            Self::ControlByte => "control byte in the path",
            Self::AboveRoot => "the path climbs above the root",
            Self::DotSegmentParameter => "dot segment with a ';' parameter in the path",
            Self::DotSegment => "dot segment in the path",
            Self::Unencoded => "a character that must be percent-encoded is raw in the path",
        })
    }
}

impl std::error::Error for PathError {}

/// What a segment is, once `%2E` and `%3B` are read as `.` and `;`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dots {
    /// Anything else.
    Plain,
    /// `.`
    One,
    /// `..`
    Two,
    /// `.;…` or `..;…`
    WithParameter,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Classifies a raw segment (its escapes already checked valid). Most segments are told
/// apart by their first byte.
fn dots(segment: &[u8]) -> Dots {
    let mut decoded = [0u8; 3];
    let mut n = 0;
    let mut i = 0;
    while i < segment.len() && n < 3 {
        let b = if segment[i] == b'%' && i + 2 < segment.len() {
            let v = hex(segment[i + 1]).unwrap_or(0) << 4 | hex(segment[i + 2]).unwrap_or(0);
            i += 3;
            v
        } else {
            i += 1;
            segment[i - 1]
        };
        decoded[n] = b;
        n += 1;
        let done = i >= segment.len();
        match (&decoded[..n], done) {
            (b".", true) => return Dots::One,
            (b"..", true) => return Dots::Two,
            (b"." | b"..", false) => {}
            (b".;" | b"..;", _) => return Dots::WithParameter,
            _ => return Dots::Plain,
        }
    }
    Dots::Plain
}

/// Normalises a request path (without its query) as the [module docs](self) say: the path
/// itself, borrowed, when it is already normal; a normal copy when it is not.
///
/// # Errors
///
/// A [`PathError`] for the paths refused.
pub fn normalize(path: &str, options: PathOptions) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    if plain(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    checked(path, options)
}

/// Bytes [`plain`] looks at twice: `%`, `\`, control bytes and `DEL`, what a path holds
/// percent-encoded (see [`encoded`]), and `.` and `/` (which matter only after a `/`).
const NOTED: [bool; 256] = {
    let mut noted = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        noted[b] = true;
        b += 1;
    }
    noted[0x7f] = true;
    // What clients percent-encode, which a path holds encoded (see `ENCODED`).
    let mut b = 0x80;
    while b < 0x100 {
        noted[b] = true;
        b += 1;
    }
    noted[b'"' as usize] = true;
    noted[b'<' as usize] = true;
    noted[b'>' as usize] = true;
    noted[b'`' as usize] = true;
    noted[b'{' as usize] = true;
    noted[b'}' as usize] = true;
    noted[b'%' as usize] = true;
    noted[b'\\' as usize] = true;
    noted[b'.' as usize] = true;
    noted[b'/' as usize] = true;
    noted
};

/// Whether `b` is a byte clients percent-encode in a path (non-ASCII, `"`, `<`, `>`,
/// `` ` ``, `{`, `}`): sent raw, it is encoded, so that a route's prefix, written with
/// its escapes, matches it whichever way it came (raw, it escaped a prefix such as
/// `/caf%C3%A9`, and reached the upstream of a wider route as the protected path).
fn encoded(b: u8) -> bool {
    b >= 0x80 || matches!(b, b'"' | b'<' | b'>' | b'`' | b'{' | b'}')
}

/// Whether `bytes` (starting with `/`) is normal as it stands under any options, which
/// most paths are: no escape, no backslash or control byte, no segment that starts with
/// a dot, no repeated slash. One table lookup a byte; anything else is left to the full
/// pass, which decides.
fn plain(bytes: &[u8]) -> bool {
    let mut after_slash = false;
    for &b in bytes {
        if NOTED[usize::from(b)] {
            match b {
                b'/' if !after_slash => after_slash = true,
                b'.' if !after_slash => {}
                _ => return false,
            }
        } else {
            after_slash = false;
        }
    }
    true
}

/// [`normalize`] for a path that starts with `/` but is not [`plain`].
fn checked(path: &str, options: PathOptions) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    // One pass: refuse what is refused, find whether anything changes.
    let mut rewrite = bytes.get(1) == Some(&b'/');
    let mut segment_start = 1;
    let mut i = 1;
    while i <= bytes.len() {
        let b = bytes.get(i).copied().unwrap_or(b'/');
        match b {
            b'/' => {
                let segment = &bytes[segment_start..i];
                if segment.is_empty() {
                    rewrite |= options.merge_slashes && i < bytes.len();
                } else {
                    match dots(segment) {
                        Dots::Plain => {}
                        Dots::WithParameter => return Err(PathError::DotSegmentParameter),
                        Dots::One | Dots::Two if !options.normalize => {
                            return Err(PathError::DotSegment);
                        }
                        Dots::One | Dots::Two => rewrite = true,
                    }
                }
                segment_start = i + 1;
            }
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::InvalidEscape);
                };
                let v = hi << 4 | lo;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0..=0x1f | 0x7f => return Err(PathError::ControlByte),
                    _ => {}
                }
                rewrite |= options.normalize
                    && (unreserved(v)
                        || bytes[i + 1].is_ascii_lowercase()
                        || bytes[i + 2].is_ascii_lowercase());
                i += 2;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlByte),
            b if encoded(b) && !options.normalize => return Err(PathError::Unencoded),
            b if encoded(b) => rewrite = true,
            _ => {}
        }
        i += 1;
    }
    if !rewrite {
        return Ok(Cow::Borrowed(path));
    }
    rewrite_path(bytes, options).map(Cow::Owned)
}

/// The normal form of a path that passed [`normalize`]'s checks.
fn rewrite_path(bytes: &[u8], options: PathOptions) -> Result<String, PathError> {
    let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
    // Where each kept segment starts in `out` (at its '/').
    let mut starts: Vec<usize> = Vec::new();
    let mut segment: Vec<u8> = Vec::new();
    let raw_segments = bytes[1..].split(|&b| b == b'/');
    let count = bytes[1..].iter().filter(|&&b| b == b'/').count() + 1;
    for (n, raw) in raw_segments.enumerate() {
        let last = n + 1 == count;
        segment.clear();
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == b'%' {
                let v = hex(raw[i + 1]).unwrap_or(0) << 4 | hex(raw[i + 2]).unwrap_or(0);
                if options.normalize && unreserved(v) {
                    segment.push(v);
                } else if options.normalize {
                    segment.push(b'%');
                    segment.push(raw[i + 1].to_ascii_uppercase());
                    segment.push(raw[i + 2].to_ascii_uppercase());
                } else {
                    segment.extend_from_slice(&raw[i..i + 3]);
                }
                i += 3;
            } else if encoded(raw[i]) {
                segment.extend_from_slice(&escape(raw[i]));
                i += 1;
            } else {
                segment.push(raw[i]);
                i += 1;
            }
        }
        match &segment[..] {
            b"." if options.normalize => {
                if last {
                    starts.push(out.len());
                    out.push(b'/');
                }
            }
            b".." if options.normalize => {
                let start = starts.pop().ok_or(PathError::AboveRoot)?;
                out.truncate(start);
                if last {
                    starts.push(out.len());
                    out.push(b'/');
                }
            }
            // Merged, or the leading `//` that is never kept; a trailing slash stays.
            b"" if !last && (options.merge_slashes || starts.is_empty()) => {}
            _ => {
                starts.push(out.len());
                out.push(b'/');
                out.extend_from_slice(&segment);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    // Only ASCII was decoded or copied, the rest encoded.
    String::from_utf8(out).map_err(|_| PathError::InvalidEscape)
}

/// `%XX` for `b`, upper-case hex.
fn escape(b: u8) -> [u8; 3] {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    [b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]
}

/// Whether the escape of `b` is matched as `b` ([`match_form`]): the sub-delimiters but
/// `;`, and `:` and `@`, which a prefix may hold raw and an upstream that decodes its path
/// (most frameworks) reads the same either way.
fn matched_decoded(b: u8) -> bool {
    matches!(
        b,
        b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
    )
}

/// The form of a normal path that routes are matched against: the path itself but for
/// what an upstream reads otherwise than the bytes say. Each segment's `;` parameters are
/// dropped, and the segments left empty with them (and any other empty one), as servlet
/// containers (Tomcat, Jetty, Spring) drop them before they route (`/api;x/admin`,
/// `/;/api/admin` and `/api/;x/admin` are served as `/api/admin`: matched as written, they
/// escaped a route for `/api/admin` to a wider one); and escapes of the characters a
/// prefix may hold raw are decoded (`/v1/things%3Aadmin` is `/v1/things:admin` to the
/// frameworks that decode their paths). Other escapes stay (upper-case). Borrowed when
/// the path has no `;`, no `%` and no empty segment, as nearly every path.
pub fn match_form(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    if !bytes.iter().any(|&b| b == b';' || b == b'%') && !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut out = Vec::with_capacity(bytes.len());
    for segment in path.split('/').skip(1) {
        let kept = without_parameters(segment).as_bytes();
        if kept.is_empty() {
            continue;
        }
        out.push(b'/');
        let mut i = 0;
        while i < kept.len() {
            let b = kept[i];
            if b == b'%' && i + 2 < kept.len() {
                let v = hex(kept[i + 1]).unwrap_or(0) << 4 | hex(kept[i + 2]).unwrap_or(0);
                if matched_decoded(v) {
                    out.push(v);
                } else {
                    out.push(b'%');
                    out.push(kept[i + 1].to_ascii_uppercase());
                    out.push(kept[i + 2].to_ascii_uppercase());
                }
                i += 3;
            } else {
                out.push(b);
                i += 1;
            }
        }
    }
    if out.is_empty() || path.ends_with('/') {
        out.push(b'/');
    }
    // Only ASCII was decoded; the rest copied whole from a `str`.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| path.to_owned()))
}

/// `segment` without its parameters: up to its first `;`, raw or escaped (`%3B`, as the
/// dot-segment check counts it: a framework that decodes before it drops parameters reads
/// one there).
fn without_parameters(segment: &str) -> &str {
    let b = segment.as_bytes();
    let end = (0..b.len())
        .find(|&i| {
            b[i] == b';'
                || (b[i] == b'%'
                    && b.get(i + 1) == Some(&b'3')
                    && matches!(b.get(i + 2), Some(b'B' | b'b')))
        })
        .unwrap_or(b.len());
    &segment[..end]
}

/// Where the part of `path` after `prefix`'s segments begins, for a path that matched
/// `prefix` in its [`match_form`]: after as many of the path's segments as the prefix
/// has, counting only those the match form keeps (not empty once their parameters are
/// dropped), each with its parameters and escapes as written. `path` is the path alone
/// (no query).
pub fn after_prefix_segments(path: &str, prefix: &str) -> usize {
    let mut left = prefix.split('/').filter(|s| !s.is_empty()).count();
    if left == 0 {
        return 0;
    }
    let mut at = 0;
    for segment in path.split('/').skip(1) {
        at += 1 + segment.len();
        if !without_parameters(segment).is_empty() {
            left -= 1;
            if left == 0 {
                return at;
            }
        }
    }
    path.len()
}

/// Whether `path` falls under `prefix` on a segment boundary: `/api` covers `/api` and
/// `/api/x`, not `/apix`; `/` covers everything. `prefix` has no trailing slash (but `/`).
/// A `;` ends a segment too: `/api;x/y` is under `/api`, since Tomcat and the servlet
/// containers behind many proxies drop `;parameters` and serve it as `/api/y` (matched to
/// another route, it would escape `/api`'s policy).
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with(';'))
}

/// Why a configured `path_prefix` is refused, if it is: it must be a normal path (as
/// [`normalize`] leaves it, with both options on), so written as requests are matched:
/// no query or fragment, no whitespace, no `;`-parameter dot segment, no `//`; what
/// clients percent-encode (any non-ASCII character, `"`, `<`, `>`, `` ` ``, `{`, `}`)
/// written as its escapes, in upper case (`/caf%C3%A9`), and unreserved characters
/// (letters, digits, `-._~`) never escaped.
// The gateway checks its routes' prefixes with it.
#[cfg_attr(not(feature = "gateway"), allow(dead_code))]
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if prefix.contains(['?', '#']) || prefix.chars().any(char::is_whitespace) {
        return Err("must be a plain path (no query, fragment or spaces)".into());
    }
    if let Some(c) = prefix
        .chars()
        .find(|c| !c.is_ascii() || matches!(c, '"' | '<' | '>' | '`' | '{' | '}'))
    {
        let mut utf8 = [0; 4];
        let escaped: String = c
            .encode_utf8(&mut utf8)
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect();
        return Err(format!(
            "{c:?} comes percent-encoded in requests, and is matched so: write it \
             `{escaped}`"
        ));
    }
    if prefix.contains(';') || prefix.to_ascii_uppercase().contains("%3B") {
        return Err(
            "must not contain ';': requests are matched without their segments' \
             ;parameters, as the servlet containers behind many gateways read them"
                .into(),
        );
    }
    if let Some(at) = prefix.match_indices('%').find_map(|(i, _)| {
        let b = prefix.as_bytes();
        let v = hex(*b.get(i + 1)?)? << 4 | hex(*b.get(i + 2)?)?;
        matched_decoded(v).then_some(v)
    }) {
        return Err(format!(
            "write {:?} unescaped: requests are matched with its escape decoded",
            char::from(at)
        ));
    }
    match normalize(prefix, PathOptions::default()) {
        Ok(Cow::Borrowed(_)) => Ok(()),
        Ok(Cow::Owned(normal))
            if prefix.contains('%')
                && !prefix.contains("//")
                && !prefix.split('/').any(|segment| {
                    let dots = segment.to_ascii_lowercase().replace("%2e", ".");
                    dots == "." || dots == ".."
                }) =>
        {
            Err(format!(
                "write percent-escapes as requests are matched (upper-case hex, letters, \
                 digits and -._~ unescaped): `{normal}`"
            ))
        }
        Ok(Cow::Owned(_)) | Err(PathError::AboveRoot | PathError::DotSegmentParameter) => {
            Err("must be a normal path (no '.' or '..' segments, no '//')".into())
        }
        Err(PathError::Backslash) => Err("must not contain '\\'".into()),
        Err(PathError::EncodedSeparator) => Err("must not contain an encoded '/' or '\\'".into()),
        Err(e) => Err(format!("must be a plain path: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routes are matched as servlet containers and decoding frameworks read a path:
    /// parameters and the segments they leave empty dropped, reserved escapes decoded;
    /// and the prefix is stripped by segments as written.
    #[test]
    fn paths_are_matched_as_the_upstreams_read_them() {
        for (path, form) in [
            ("/api/admin/x", "/api/admin/x"),
            ("/api;jsessionid=1/admin/x", "/api/admin/x"),
            ("/;/api/admin/x", "/api/admin/x"),
            ("/api/;x/admin/", "/api/admin/"),
            ("/v1/things%3aadmin", "/v1/things:admin"),
            ("/caf%c3%a9/x%3Bz", "/caf%C3%A9/x"),
            ("/api%3bx/admin", "/api/admin"),
            ("/;", "/"),
        ] {
            assert_eq!(match_form(path), form, "{path}");
        }
        assert!(matches!(match_form("/a/b"), Cow::Borrowed(_)));
        for (path, prefix, rest) in [
            ("/api/admin/x", "/api/admin", "/x"),
            ("/api;j=1/admin/x", "/api/admin", "/x"),
            ("/;/api/;x/admin;y/x/y", "/api/admin", "/x/y"),
            ("/api/admin", "/api/admin", ""),
            ("/x", "/", "/x"),
        ] {
            assert_eq!(&path[after_prefix_segments(path, prefix)..], rest, "{path}");
        }
        // Raw bytes clients encode are encoded, so an encoded prefix matches them.
        assert_eq!(
            normalize("/caf\u{e9}/{x}", PathOptions::default()).as_deref(),
            Ok("/caf%C3%A9/%7Bx%7D")
        );
        // Prefixes that could never match so are refused.
        assert!(check_prefix("/a;b").is_err());
        assert!(check_prefix("/a%3bb").is_err());
        assert!(check_prefix("/v1/things%3Aadmin").is_err());
        assert!(check_prefix("/v1/things:admin").is_ok());
    }

    const OFF: PathOptions = PathOptions {
        normalize: false,
        merge_slashes: true,
    };
    const KEEP_SLASHES: PathOptions = PathOptions {
        normalize: true,
        merge_slashes: false,
    };

    fn n(path: &str) -> Result<String, PathError> {
        normalize(path, PathOptions::default()).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/api/users/42",
            "/a/b/",
            "/a.b/..c/...",
            "/sp%20ace/%2A",
            "/x;y=1",
            "/a/%25",
            "/%C3%A9",
        ] {
            assert!(
                matches!(normalize(p, PathOptions::default()), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn dot_segments_escapes_and_slashes_are_normalised() {
        let cases = [
            ("/a/./b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/%2e%2E/b", "/b"),
            ("/a/.%2e/b", "/b"),
            ("/%7Euser/%41%2d", "/~user/A-"),
            ("/a/%2a", "/a/%2A"),
            ("//a///b//", "/a/b/"),
            ("/a//../b", "/b"),
            ("/api/open/../admin/secret", "/api/admin/secret"),
            ("/..a/a..", "/..a/a.."),
            ("/.", "/"),
            ("/a/..", "/"),
            ("/%252e%252e", "/%252e%252e"),
        ];
        for (input, expected) in cases {
            assert_eq!(n(input).as_deref(), Ok(expected), "{input}");
            assert!(
                matches!(
                    normalize(expected, PathOptions::default()),
                    Ok(Cow::Borrowed(_))
                ),
                "{expected} is normal"
            );
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        let cases = [
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("/a/..%2fb", PathError::EncodedSeparator),
            ("/a/%2F", PathError::EncodedSeparator),
            ("/a/%5c", PathError::EncodedSeparator),
            ("/a\\b", PathError::Backslash),
            ("/a%00", PathError::ControlByte),
            ("/a%1f", PathError::ControlByte),
            ("/a%7F", PathError::ControlByte),
            ("/a\tb", PathError::ControlByte),
            ("/a%zz", PathError::InvalidEscape),
            ("/a%2", PathError::InvalidEscape),
            ("/a%", PathError::InvalidEscape),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/%2e%2e/x", PathError::AboveRoot),
            ("/a/..;/b", PathError::DotSegmentParameter),
            ("/a/..;x=1/b", PathError::DotSegmentParameter),
            ("/a/.;/b", PathError::DotSegmentParameter),
            ("/a/%2e%2e;/b", PathError::DotSegmentParameter),
            ("/a/..%3B/b", PathError::DotSegmentParameter),
            ("/a/..;", PathError::DotSegmentParameter),
        ];
        for (input, error) in cases {
            assert_eq!(n(input), Err(error), "{input:?}");
        }
    }

    #[test]
    fn options_off() {
        assert_eq!(normalize("/a/../b", OFF), Err(PathError::DotSegment));
        assert_eq!(normalize("/a/%2e", OFF), Err(PathError::DotSegment));
        assert_eq!(normalize("/%7e/%2a", OFF).as_deref(), Ok("/%7e/%2a"));
        assert_eq!(normalize("/a//%7e", OFF).as_deref(), Ok("/a/%7e"));
        assert_eq!(
            normalize("/a//b/./c", KEEP_SLASHES).as_deref(),
            Ok("/a//b/c")
        );
        assert_eq!(normalize("//a//b", KEEP_SLASHES).as_deref(), Ok("/a//b"));
        assert_eq!(normalize("///a", KEEP_SLASHES).as_deref(), Ok("/a"));
        assert_eq!(normalize("/a//..", KEEP_SLASHES).as_deref(), Ok("/a/"));
        assert!(matches!(
            normalize("/a//b", KEEP_SLASHES),
            Ok(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn prefixes() {
        assert!(under_prefix("/api", "/api"));
        assert!(under_prefix("/api/x", "/api"));
        assert!(!under_prefix("/apix", "/api"));
        assert!(under_prefix("/api;jsessionid=1/x", "/api"));
        assert!(under_prefix("/anything", "/"));
        assert_eq!(check_prefix("/api/v1"), Ok(()));
        assert_eq!(check_prefix("/api/"), Ok(()));
        assert_eq!(check_prefix("/caf%C3%A9"), Ok(()));
        for bad in [
            "/api/../admin",
            "/api/.",
            "/a//b",
            "/a%2e",
            "/a\\b",
            "/..;/x",
            "api",
            "/café",
            "/caf%c3%a9",
            "/%41",
            "/a%zz",
            "/a%2F",
            "/a/%2e%2e/b",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// The shortcut for normal paths answers as the full pass does: a path it lets
        /// through is one the full pass borrows, under every option.
        #[test]
        fn the_shortcut_agrees_with_the_full_pass(
            rest in proptest::collection::vec(
                proptest::sample::select(vec![
                    "/", "//", ".", "..", "%", "%2e", "%2E", "%41", "%2f", "%7e", "%zz", "a",
                    "b.c", ";", "\\", "\u{1}", "\u{7f}", "~", "é", "-",
                ]),
                0..12,
            ),
            normalize_path: bool,
            merge_slashes: bool,
        ) {
            let path = format!("/{}", rest.concat());
            let options = PathOptions { normalize: normalize_path, merge_slashes };
            let full = checked(&path, options);
            if plain(path.as_bytes()) {
                proptest::prop_assert!(matches!(full, Ok(Cow::Borrowed(p)) if p == path), "{:?}", path);
            }
            proptest::prop_assert_eq!(normalize(&path, options), full);
        }
    }
}
