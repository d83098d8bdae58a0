//! Small crate-private helpers shared by several layers: one home for the random numbers
//! that spread retries and picks, for time arithmetic in nanoseconds, and for numbers
//! written into header fields.

use std::hash::{BuildHasher, Hash};
use std::time::Duration;

/// splitmix64's increment (the golden ratio in 64 bits).
pub(crate) const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's finalizer: spreads the bits of `z` (a hash or a counter).
#[inline]
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The next number of a splitmix64 stream: spread, not cryptographic strength (jitter,
/// random picks, ids that must not collide by accident).
#[inline]
pub(crate) fn next_u64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(GOLDEN);
    mix(*state)
}

/// [`next_u64`] mapped to `[0, 1)`.
#[inline]
pub(crate) fn next_unit(state: &mut u64) -> f64 {
    (next_u64(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// A seed that differs between processes and calls (the standard library's per-process
/// random keys, hashed with `salt` and a counter), so that replicas and instances do not
/// draw in step.
pub(crate) fn seed(salt: impl Hash) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one((salt, COUNTER.fetch_add(1, Relaxed)))
}

/// Exponential backoff with jitter, one formula for the breaker's open waits and the
/// Consul watch's and registration's retries: `base × multiplier^(attempt − 1)`, capped
/// at `max` before the jitter (so that waits at the cap still spread), then scaled by a
/// factor in `spread` drawn with `unit`, a uniform sample in `[0, 1)`. At least 1 ms.
pub(crate) fn backoff(
    attempt: u32,
    base: Duration,
    multiplier: f64,
    max: Duration,
    spread: (f64, f64),
    unit: f64,
) -> Duration {
    let exp = attempt.saturating_sub(1).min(1024) as i32;
    let grown = base.as_secs_f64() * multiplier.powi(exp);
    let capped = grown.min(max.as_secs_f64());
    let factor = spread.0 + (spread.1 - spread.0) * unit;
    // Callers validate their settings, which keeps this finite; stay total regardless.
    Duration::try_from_secs_f64((capped * factor).max(0.001)).unwrap_or(max)
}

/// `get_ref`, `get_mut` and `into_inner` for a service wrapping an inner service `S` in
/// its field `$field` (`inner` by default), as tower-http's `define_inner_service_accessors!`.
macro_rules! inner_service_accessors {
    () => {
        $crate::util::inner_service_accessors!(inner);
    };
    ($field:ident) => {
        /// A reference to the inner service.
        pub fn get_ref(&self) -> &S {
            &self.$field
        }

        /// A mutable reference to the inner service.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.$field
        }

        /// The inner service.
        pub fn into_inner(self) -> S {
            self.$field
        }
    };
}
pub(crate) use inner_service_accessors;

/// `d` in nanoseconds, saturating at `u64::MAX` (584 years).
#[inline]
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The reason given for a share that is not a fraction in `range` (`"(0, 1]"` or
/// `"[0, 1]"`): every share in seawall is a fraction, and a whole number from 2 to 100, which
/// reads as a percentage (other libraries take percentages), gets a hint.
pub(crate) fn not_a_fraction(value: f64, range: &str) -> String {
    if (2.0..=100.0).contains(&value) && value.fract() == 0.0 {
        format!(
            "{value} is not a fraction in {range}; for {value} % write {}",
            value / 100.0
        )
    } else {
        format!("{value} is not a fraction in {range}")
    }
}

/// `n` in decimal, in the tail of `buf`: two digits at a time, from a table (the
/// `RateLimit` fields' numbers, HTTP/1 `Content-Length`).
#[cfg(feature = "http")]
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut i = buf.len();
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        i -= 2;
        buf[i..i + 2].copy_from_slice(&PAIRS[pair..pair + 2]);
    } else {
        i -= 1;
        buf[i] = b'0' + n as u8;
    }
    &buf[i..]
}

/// What a Redis URL asks of TLS, read as the `redis` crate's URL parser (WHATWG's) will
/// read it: spaces and control characters around it are dropped and tabs and line breaks
/// inside it removed before the scheme and the fragment are looked at, so that a URL
/// read from a file with its line break, or with a tab inside, cannot hide its scheme or
/// a `#insecure` from these checks.
#[cfg(any(feature = "redis", feature = "gateway"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RedisUrlTls {
    /// `rediss://` or `valkeys://` (any case): TLS.
    pub(crate) secure: bool,
    /// A `#` fragment: the `redis` crate's only one, `#insecure`, turns the certificate
    /// check off for a TLS URL.
    pub(crate) fragment: bool,
}

#[cfg(any(feature = "redis", feature = "gateway"))]
impl RedisUrlTls {
    pub(crate) fn of(url: &str) -> Self {
        let mut url = url
            .trim_matches(|c: char| c <= ' ')
            .chars()
            .filter(|c| !matches!(c, '\t' | '\n' | '\r'));
        let scheme: String = url
            .by_ref()
            .take_while(|c| *c != ':')
            .take(8)
            .collect::<String>()
            .to_ascii_lowercase();
        let secure = matches!(scheme.as_str(), "rediss" | "valkeys");
        Self {
            secure,
            fragment: url.any(|c| c == '#'),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[cfg(feature = "http")]
    #[test]
    fn decimal_writes_every_digit_count() {
        // Every digit count, and each side of every power of ten.
        let powers = (0..20).map(|p| 10u64.pow(p));
        let around = powers.flat_map(|n| [n - 1, n, n + 1]);
        for n in around.chain([7, 65_535, 4_294_967_295, u64::MAX - 1, u64::MAX]) {
            let mut buf = [0; 20];
            assert_eq!(super::decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn streams_spread_and_seeds_differ() {
        let mut state = 1;
        let draws: Vec<f64> = (0..1000).map(|_| super::next_unit(&mut state)).collect();
        assert!(draws.iter().all(|u| (0.0..1.0).contains(u)));
        let mean = draws.iter().sum::<f64>() / 1000.0;
        assert!((0.45..0.55).contains(&mean), "{mean}");
        assert_ne!(
            super::seed("a"),
            super::seed("a"),
            "a counter makes each call differ"
        );
        assert_eq!(super::nanos(Duration::MAX), u64::MAX);
        assert_eq!(super::nanos(Duration::from_micros(3)), 3_000);
    }

    #[test]
    fn percentages_get_a_hint() {
        assert_eq!(
            super::not_a_fraction(50.0, "(0, 1]"),
            "50 is not a fraction in (0, 1]; for 50 % write 0.5"
        );
        assert_eq!(
            super::not_a_fraction(1.5, "(0, 1]"),
            "1.5 is not a fraction in (0, 1]"
        );
        assert_eq!(
            super::not_a_fraction(-1.0, "[0, 1]"),
            "-1 is not a fraction in [0, 1]"
        );
    }
}
