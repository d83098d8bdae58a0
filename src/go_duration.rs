//! Go duration strings (`10s`, `1m30s`, `500ms`, `1h2m3.5s`), as Consul reads and writes
//! them.

use std::fmt;
use std::time::Duration;

/// The longest duration Go (and so Consul) can hold: `i64::MAX` nanoseconds, about 292
/// years.
pub const MAX_GO_DURATION: Duration = Duration::from_nanos(i64::MAX as u64);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Formats `d` as Go's `time.Duration.String()` does: `0s`, `750ns`, `1.5us`, `500ms`,
/// `10s`, `1m30s`, `1h30m0s`, `1h2m3.5s`; exact to the nanosecond.
///
/// The one difference from Go: microseconds are written `us`, not `µs`, to keep the text
/// ASCII (Go and Consul read both).
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::format_go_duration;
///
/// assert_eq!(format_go_duration(Duration::from_secs(90)), "1m30s");
/// assert_eq!(format_go_duration(Duration::from_millis(500)), "500ms");
/// assert_eq!(format_go_duration(Duration::from_secs(90 * 60)), "1h30m0s");
/// assert_eq!(format_go_duration(Duration::from_millis(3_723_500)), "1h2m3.5s");
/// ```
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000 {
        return format!("{nanos}ns");
    }
    if nanos < 1_000_000 {
        return format!("{}us", fraction(nanos, 1_000, 3));
    }
    if nanos < NANOS_PER_SEC {
        return format!("{}ms", fraction(nanos, 1_000_000, 6));
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    let s = u128::from(s) * NANOS_PER_SEC + u128::from(d.subsec_nanos());
    out.push_str(&fraction(s, NANOS_PER_SEC, 9));
    out.push('s');
    out
}

/// `n / unit` in decimal, with the fraction's trailing zeros dropped.
fn fraction(n: u128, unit: u128, digits: usize) -> String {
    let (int, rem) = (n / unit, n % unit);
    if rem == 0 {
        return int.to_string();
    }
    let frac = format!("{rem:0digits$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// Why a Go duration string could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseDurationError {
    input: String,
    kind: ParseDurationErrorKind,
}

/// What is wrong with a Go duration string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ParseDurationErrorKind {
    /// The text is empty.
    Empty,
    /// A number was expected (digits, with an optional fraction).
    InvalidNumber,
    /// A number is not followed by a unit (`10`); only a bare `0` needs none.
    MissingUnit,
    /// The unit is none of `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`.
    UnknownUnit,
    /// The duration is negative (a [`Duration`] cannot be).
    Negative,
    /// The duration exceeds [`MAX_GO_DURATION`].
    Overflow,
}

impl ParseDurationError {
    fn new(input: &str, kind: ParseDurationErrorKind) -> Self {
        // Keep the message short whatever the input.
        let input = match input.char_indices().nth(64) {
            Some((cut, _)) => format!("{}…", &input[..cut]),
            None => input.to_owned(),
        };
        Self { input, kind }
    }

    /// What is wrong.
    pub fn kind(&self) -> ParseDurationErrorKind {
        self.kind
    }
}

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            ParseDurationErrorKind::Empty => "empty",
            ParseDurationErrorKind::InvalidNumber => "expected a number",
            ParseDurationErrorKind::MissingUnit => "missing unit",
            ParseDurationErrorKind::UnknownUnit => "unknown unit",
            ParseDurationErrorKind::Negative => "negative",
            ParseDurationErrorKind::Overflow => "longer than 2562047h47m16.854775807s",
        };
        write!(f, "invalid duration {:?}: {what}", self.input)
    }
}

impl std::error::Error for ParseDurationError {}

/// Reads a Go duration string, as Go's `time.ParseDuration` does: a sequence of decimal
/// numbers, each with an optional fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`,
/// `h`), such as `1m30s`, `1.5h`, `500ms` or `90m`; `0` alone needs no unit. A sign is
/// accepted, but a negative duration is an error. Never panics.
///
/// # Errors
///
/// A [`ParseDurationError`] saying what is wrong, including durations over
/// [`MAX_GO_DURATION`].
///
/// ```
/// use std::time::Duration;
/// use seawall::consul::parse_go_duration;
///
/// assert_eq!(parse_go_duration("1m30s")?, Duration::from_secs(90));
/// assert_eq!(parse_go_duration("1h2m3.5s")?, Duration::from_millis(3_723_500));
/// assert!(parse_go_duration("10").is_err());
/// assert!(parse_go_duration("5 minutes").is_err());
/// # Ok::<(), seawall::consul::ParseDurationError>(())
/// ```
pub fn parse_go_duration(s: &str) -> Result<Duration, ParseDurationError> {
    use ParseDurationErrorKind as K;
    let err = |kind| ParseDurationError::new(s, kind);
    let mut rest = s.as_bytes();
    let mut negative = false;
    if let Some((&sign @ (b'-' | b'+'), tail)) = rest.split_first() {
        negative = sign == b'-';
        rest = tail;
    }
    if rest == b"0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(err(if s.is_empty() {
            K::Empty
        } else {
            K::InvalidNumber
        }));
    }
    let max = u128::from(MAX_GO_DURATION.as_nanos() as u64);
    let mut total: u128 = 0;
    while !rest.is_empty() {
        // The integer part.
        let int_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let mut int: u128 = 0;
        for &b in &rest[..int_len] {
            int = int * 10 + u128::from(b - b'0');
            if int > max {
                return Err(err(K::Overflow));
            }
        }
        rest = &rest[int_len..];
        // The fraction: digits beyond the 18th cannot matter at nanosecond precision.
        let mut frac: u128 = 0;
        let mut scale: u128 = 1;
        let mut frac_len = 0;
        if let Some((b'.', tail)) = rest.split_first() {
            rest = tail;
            frac_len = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            for &b in rest[..frac_len].iter().take(18) {
                frac = frac * 10 + u128::from(b - b'0');
                scale *= 10;
            }
            rest = &rest[frac_len..];
        }
        if int_len == 0 && frac_len == 0 {
            return Err(err(K::InvalidNumber));
        }
        // The unit: everything up to the next number.
        let unit_len = rest
            .iter()
            .take_while(|b| !b.is_ascii_digit() && **b != b'.')
            .count();
        if unit_len == 0 {
            return Err(err(K::MissingUnit));
        }
        let unit: u128 = match &rest[..unit_len] {
            b"ns" => 1,
            // `us`, `µs` (U+00B5) and `μs` (U+03BC).
            b"us" | b"\xC2\xB5s" | b"\xCE\xBCs" => 1_000,
            b"ms" => 1_000_000,
            b"s" => NANOS_PER_SEC,
            b"m" => 60 * NANOS_PER_SEC,
            b"h" => 3600 * NANOS_PER_SEC,
            _ => return Err(err(K::UnknownUnit)),
        };
        rest = &rest[unit_len..];
        // int ≤ max < 2^63 and unit < 2^42: no u128 overflow.
        let value = int * unit + frac * unit / scale;
        total = total.saturating_add(value);
        if total > max {
            return Err(err(K::Overflow));
        }
    }
    if negative && total > 0 {
        return Err(err(K::Negative));
    }
    Ok(Duration::from_nanos(total as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(1), "1ns"),
            (Duration::from_nanos(1_100), "1.1us"),
            (Duration::from_micros(2_200), "2.2ms"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_millis(3_500), "3.5s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(60), "1m0s"),
            (Duration::from_secs(5400), "1h30m0s"),
            (Duration::from_millis(3_723_500), "1h2m3.5s"),
            (Duration::new(1, 1), "1.000000001s"),
            (MAX_GO_DURATION, "2562047h47m16.854775807s"),
        ];
        for (d, text) in cases {
            assert_eq!(format_go_duration(d), text);
            assert_eq!(parse_go_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn parses_go_syntax() {
        let ok = [
            ("90m", Duration::from_secs(5400)),
            ("1.5h", Duration::from_secs(5400)),
            ("+10s", Duration::from_secs(10)),
            ("-0s", Duration::ZERO),
            ("0", Duration::ZERO),
            (".5s", Duration::from_millis(500)),
            ("5.s", Duration::from_secs(5)),
            ("1h1m1s1ms1us1ns", Duration::new(3661, 1_001_001)),
            ("3µs", Duration::from_micros(3)),
            ("3μs", Duration::from_micros(3)),
            ("1.0000000001s", Duration::from_secs(1)),
            ("0.000000001s", Duration::from_nanos(1)),
        ];
        for (text, d) in ok {
            assert_eq!(parse_go_duration(text), Ok(d), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_with_a_typed_error() {
        use ParseDurationErrorKind as K;
        let bad = [
            ("", K::Empty),
            ("-", K::InvalidNumber),
            ("s", K::InvalidNumber),
            (".s", K::InvalidNumber),
            ("10", K::MissingUnit),
            ("1s10", K::MissingUnit),
            ("10 s", K::UnknownUnit),
            ("10sec", K::UnknownUnit),
            ("1d", K::UnknownUnit),
            ("-1s", K::Negative),
            ("2562048h", K::Overflow),
            ("2562047h47m16.854775808s", K::Overflow),
            ("99999999999999999999999999999999999999999s", K::Overflow),
        ];
        for (text, kind) in bad {
            let e = parse_go_duration(text).expect_err(text);
            assert_eq!(e.kind(), kind, "{text}");
            assert!(e.to_string().starts_with("invalid duration"));
        }
        let long = "x".repeat(10_000);
        assert!(parse_go_duration(&long).unwrap_err().to_string().len() < 200);
    }

    proptest! {
        #[test]
        fn round_trips(nanos in 0..=i64::MAX as u64) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }

        #[test]
        fn never_panics(s in "\\PC{0,24}") {
            let _ = parse_go_duration(&s);
        }

        #[test]
        fn never_panics_on_duration_like_text(s in "[-+]?([0-9]{0,22}(\\.[0-9]{0,22})?(ns|us|µs|ms|s|m|h|x)?){1,4}") {
            if let Ok(d) = parse_go_duration(&s) {
                prop_assert!(d <= MAX_GO_DURATION);
            }
        }
    }
}
