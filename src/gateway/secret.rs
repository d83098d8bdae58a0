//! Secrets in the configuration (the JWT key, the admin token): where they are read from,
//! how weak ones are told apart, and errors that never show them.

use std::io::Read as _;
use std::path::Path;

use crate::ConfigError;

/// The largest secret file read.
const MAX_SECRET_FILE: u64 = 64 * 1024;
/// The shortest bearer token accepted (the admin token).
pub(crate) const MIN_TOKEN_LEN: usize = 16;
/// The shortest HMAC key accepted: RFC 7518 §3.2, "a key of the same size as the hash
/// output (for instance, 256 bits for "HS256") or larger MUST be used".
pub(crate) const MIN_HS256_KEY_LEN: usize = 32;
/// The fewest distinct byte values a secret may have.
const MIN_DISTINCT: usize = 8;

/// The secret `<section>.<key>` from the one source set: the literal `<key>`, the
/// environment variable `<key>_env` names, or the file `<key>_file` names, at least
/// `min_len` bytes. `None` when none is set.
pub(crate) fn resolve(
    section: &str,
    key: &str,
    literal: Option<&str>,
    env: Option<&str>,
    file: Option<&Path>,
    min_len: usize,
) -> Result<Option<String>, ConfigError> {
    let set =
        usize::from(literal.is_some()) + usize::from(env.is_some()) + usize::from(file.is_some());
    if set > 1 {
        let choices = if literal.is_some() {
            format!("{key}, {key}_env or {key}_file")
        } else {
            format!("{key}_env or {key}_file")
        };
        return Err(ConfigError::invalid(
            format!("{section}.{key}"),
            format!("set only one of {choices}"),
        ));
    }
    if let Some(secret) = literal {
        let field = format!("{section}.{key}");
        if placeholder(secret) {
            return Err(ConfigError::invalid(
                field,
                format!(
                    "contains an unresolved placeholder (`${{NAME}}`, `$NAME`, `{{{{ ... }}}}`, \
                     `%NAME%`: the file is not interpolated): use {key}_env = \"NAME\" to read \
                     it from the environment"
                ),
            ));
        }
        check_strength(&field, secret.as_bytes(), min_len)?;
        return Ok(Some(secret.to_owned()));
    }
    if let Some(name) = env {
        let field = format!("{section}.{key}_env");
        let secret = match std::env::var(name) {
            Ok(secret) => secret,
            Err(std::env::VarError::NotPresent) => {
                return Err(ConfigError::invalid(
                    field,
                    format!("the environment variable `{name}` is not set"),
                ));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(ConfigError::invalid(
                    field,
                    format!("the environment variable `{name}` is not valid UTF-8"),
                ));
            }
        };
        unrendered(&field, &secret)?;
        check_strength(&field, secret.as_bytes(), min_len)?;
        return Ok(Some(secret));
    }
    if let Some(path) = file {
        let field = format!("{section}.{key}_file");
        let secret = read_file(path).map_err(|reason| {
            ConfigError::invalid(
                field.clone(),
                format!("cannot read {}: {reason}", path.display()),
            )
        })?;
        unrendered(&field, &secret)?;
        check_strength(&field, secret.as_bytes(), min_len)?;
        return Ok(Some(secret));
    }
    Ok(None)
}

/// Whether `secret` looks like a placeholder left unresolved (`${NAME}`, `$NAME`,
/// `{{ ... }}`, `%NAME%`): its text is in the deployment's templates and often in public
/// docs (`$GATEWAY_JWT_SECRET`), so used as a key, anyone could sign with it. No random
/// secret has that shape.
fn placeholder(secret: &str) -> bool {
    let closed = |open: &str, close: &str| {
        secret
            .find(open)
            .is_some_and(|start| secret[start + open.len()..].contains(close))
    };
    let name = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let t = secret.trim();
    closed("${", "}")
        || closed("{{", "}}")
        || t.strip_prefix('$').is_some_and(name)
        || (t.len() > 2 && t.starts_with('%') && t.ends_with('%') && name(&t[1..t.len() - 1]))
}

/// Refuses a secret read from the environment or a file that is an unresolved
/// placeholder (a template never rendered).
fn unrendered(field: &str, secret: &str) -> Result<(), ConfigError> {
    if placeholder(secret) {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "holds an unresolved placeholder (`${NAME}`, `$NAME`, `{{ ... }}`, `%NAME%`): \
             a template was not rendered",
        ));
    }
    Ok(())
}

/// A regular file of at most [`MAX_SECRET_FILE`] bytes of UTF-8, less one final newline.
fn read_file(path: &Path) -> Result<String, String> {
    // Not a FIFO, a device or a terminal: those could block or never end.
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(format!("longer than {MAX_SECRET_FILE} bytes"));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// Refuses a weak secret: shorter than `min_len` bytes, all whitespace, fewer than 8
/// distinct byte values, or one pattern repeated (`abcdefghabcdefgh`: a period of at most
/// half its length). The reason never quotes the secret.
pub(crate) fn check_strength(
    field: &str,
    secret: &[u8],
    min_len: usize,
) -> Result<(), ConfigError> {
    if secret.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "must not be empty or whitespace",
        ));
    }
    if secret.len() < min_len {
        return Err(ConfigError::invalid(
            field.to_owned(),
            format!("must be at least {min_len} bytes"),
        ));
    }
    let mut seen = [false; 256];
    for &b in secret {
        seen[usize::from(b)] = true;
    }
    if seen.iter().filter(|s| **s).count() < MIN_DISTINCT {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "is too weak: fewer than 8 distinct bytes",
        ));
    }
    if smallest_period(secret) * 2 <= secret.len() {
        return Err(ConfigError::invalid(
            field.to_owned(),
            "is too weak: one short pattern repeated",
        ));
    }
    Ok(())
}

/// The smallest `p` with `s[i] == s[i + p]` for every `i` (the prefix function).
fn smallest_period(s: &[u8]) -> usize {
    let mut border = vec![0usize; s.len()];
    for i in 1..s.len() {
        let mut k = border[i - 1];
        while k > 0 && s[i] != s[k] {
            k = border[k - 1];
        }
        if s[i] == s[k] {
            k += 1;
        }
        border[i] = k;
    }
    s.len() - border.last().copied().unwrap_or(0)
}

/// A TOML error without the source excerpt the `toml` crate shows (the line at fault,
/// which may hold a secret): the line, the column and the message.
pub(crate) fn parse_error(text: &str, error: &toml::de::Error) -> String {
    let message = error
        .message()
        .trim_end()
        .replace('\n', " ")
        .replace("  ", " ");
    match error.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
            // The key of the line, never its value: `max_request_body = -1` names the
            // setting without the excerpt that could show a secret.
            let start = before
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let line_text = text[start..].split('\n').next().unwrap_or("");
            let key = line_text
                .split_once('=')
                .map(|(key, _)| key.trim())
                .filter(|k| {
                    !k.is_empty()
                        && k.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_-.\"".contains(&b))
                });
            match key {
                Some(key) => format!("line {line}, column {column} (`{key}`): {message}"),
                None => format!("line {line}, column {column}: {message}"),
            }
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weak(s: &str) -> Option<String> {
        check_strength("k", s.as_bytes(), MIN_TOKEN_LEN)
            .err()
            .map(|e| format!("{}: {}", e.field(), e.reason()))
    }

    #[test]
    fn parse_errors_name_the_key_not_the_value() {
        let text = "[gateway]\nmax_request_body = -1\n";
        let e = toml::from_str::<toml::Table>("a = \"\\q secretsecret\"").unwrap_err();
        let shown = parse_error("a = \"\\q secretsecret\"", &e);
        assert!(!shown.contains("secretsecret"), "{shown}");
        #[derive(Debug, serde::Deserialize)]
        struct G {
            #[allow(dead_code)]
            max_request_body: u64,
        }
        #[derive(Debug, serde::Deserialize)]
        struct T {
            #[allow(dead_code)]
            gateway: G,
        }
        let e = toml::from_str::<T>(text).unwrap_err();
        let shown = parse_error(text, &e);
        assert!(shown.contains("`max_request_body`"), "{shown}");
        // A line inside a multi-line string has no `key =`: nothing of it is shown.
        let text = "secret = \"\"\"\nabcdefabcdef\\q\n\"\"\"\n";
        let e = toml::from_str::<toml::Table>(text).unwrap_err();
        let shown = parse_error(text, &e);
        assert!(!shown.contains("abcdefabcdef"), "{shown}");
    }

    #[test]
    fn unresolved_placeholders_are_told_apart() {
        for shaped in [
            "${GATEWAY_JWT_SECRET}",
            "prefix-${X}-and-more-bytes",
            "$GATEWAY_JWT_SECRET",
            " $ADMIN_TOKEN_OF_THE_GATEWAY_1 ",
            "{{ .Values.gateway.admin.tokenValue }}",
            "%GATEWAY_ADMIN_TOKEN_FOR_WINDOWS%",
        ] {
            assert!(placeholder(shaped), "{shaped}");
            // Refused from every source, not only a literal (here: as a file's text).
            assert!(unrendered("k", shaped).is_err(), "{shaped}");
        }
        for secret in [
            "0123456789abcdefghijklmnopqrstuv",
            "pa$$word with more than enough bytes",
            "a%b%c and 32 bytes of other things",
            "{ a } and } { braces, 32 bytes long",
        ] {
            assert!(!placeholder(secret), "{secret}");
        }
    }

    #[test]
    fn strength_rules() {
        assert_eq!(weak("0123456789abcdefghijklmnopqrstuv"), None);
        assert_eq!(weak("a test secret of at least 32 bytes"), None);
        assert_eq!(
            weak("                    ").as_deref(),
            Some("k: must not be empty or whitespace")
        );
        assert_eq!(
            weak("").as_deref(),
            Some("k: must not be empty or whitespace")
        );
        assert_eq!(
            weak("short").as_deref(),
            Some("k: must be at least 16 bytes")
        );
        assert_eq!(
            weak("aaaaaaaaaaaaaaaaaaaaaaaa").as_deref(),
            Some("k: is too weak: fewer than 8 distinct bytes")
        );
        assert_eq!(
            weak("abcdefghabcdefgh").as_deref(),
            Some("k: is too weak: one short pattern repeated")
        );
        assert_eq!(
            weak("abcdefghabcdefghabc").as_deref(),
            Some("k: is too weak: one short pattern repeated")
        );
        assert_eq!(weak("abcdefghijabcdefgh"), None);
    }

    #[test]
    fn periods() {
        assert_eq!(smallest_period(b"abab"), 2);
        assert_eq!(smallest_period(b"abc"), 3);
        assert_eq!(smallest_period(b"aaaa"), 1);
        assert_eq!(smallest_period(b"abcab"), 3);
    }
}
