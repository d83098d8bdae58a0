//! Rates and quotas whose units cannot be misread.

use std::fmt;
use std::time::Duration;

use crate::ConfigError;

/// How many tokens are replenished per period.
///
/// The constructors say what they mean: [`Rate::per_second(100)`](Rate::per_second) is a
/// hundred tokens every second (not one token every hundred seconds, as `per_second(n)`
/// means in some other crates). Nothing is checked until a [`Quota`] is built from it.
///
/// ```
/// use std::time::Duration;
/// use seawall::rate_limit::Rate;
///
/// assert_eq!(Rate::per_second(100).interval(), Some(Duration::from_millis(10)));
/// assert_eq!(Rate::per_minute(6).interval(), Some(Duration::from_secs(10)));
/// assert_eq!(Rate::new(3, Duration::from_secs(1)).tokens(), 3);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    tokens: u32,
    period: Duration,
}

impl Rate {
    /// `tokens` every `period`.
    pub const fn new(tokens: u32, period: Duration) -> Self {
        Self { tokens, period }
    }

    /// `tokens` every second.
    pub const fn per_second(tokens: u32) -> Self {
        Self::new(tokens, Duration::from_secs(1))
    }

    /// `tokens` every minute.
    pub const fn per_minute(tokens: u32) -> Self {
        Self::new(tokens, Duration::from_secs(60))
    }

    /// `tokens` every hour.
    pub const fn per_hour(tokens: u32) -> Self {
        Self::new(tokens, Duration::from_secs(3600))
    }

    /// Tokens per period.
    pub const fn tokens(&self) -> u32 {
        self.tokens
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// Time to replenish one token, rounded up to the nanosecond so that the limit is
    /// never exceeded, if the rate is valid (at least one token per non-zero period, at
    /// least one nanosecond per token).
    pub fn interval(&self) -> Option<Duration> {
        if self.tokens == 0 || self.period.as_nanos() < u128::from(self.tokens) {
            return None;
        }
        let nanos = self.period.as_nanos().div_ceil(u128::from(self.tokens));
        (nanos > 0 && nanos <= u128::from(u64::MAX)).then(|| Duration::from_nanos(nanos as u64))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} per {:?}", self.tokens, self.period)
    }
}

/// The longest period a [`Rate`] may have (365 days).
pub const MAX_PERIOD: Duration = Duration::from_secs(365 * 24 * 3600);

fn rate_error(rate: Rate) -> ConfigError {
    ConfigError::invalid(
        "rate",
        format!(
            "{rate}: needs at least 1 token per period, at most 1 per nanosecond, and a period \
             of at most 365 days"
        ),
    )
}

/// A token bucket's shape: it refills at `rate` and holds at most `burst` tokens (it starts
/// full).
///
/// ```
/// use seawall::rate_limit::{Quota, Rate};
///
/// // 100 requests a second on average, up to 20 at once.
/// let quota = Quota::new(Rate::per_second(100), 20)?;
/// assert_eq!(quota.burst(), 20);
/// // A burst defaults to one period's worth of tokens.
/// assert_eq!(Quota::from_rate(Rate::per_minute(30))?.burst(), 30);
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    rate: Rate,
    burst: u32,
    interval_nanos: u64,
}

/// The longest a bucket may take to refill from empty, in nanoseconds (about 146 years).
const MAX_REFILL_NANOS: u64 = u64::MAX / 4;

impl Quota {
    /// A quota refilling at `rate` with room for `burst` tokens.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming `rate` (no token per period, more than one per nanosecond, or
    /// a period over 365 days) or `burst` (zero, or so large that an empty bucket would take
    /// more than 146 years, a quarter of `u64::MAX` nanoseconds, to refill).
    pub fn new(rate: Rate, burst: u32) -> Result<Self, ConfigError> {
        if rate.period > MAX_PERIOD {
            return Err(rate_error(rate));
        }
        let interval = rate.interval().ok_or_else(|| rate_error(rate))?;
        if burst == 0 {
            return Err(ConfigError::invalid("burst", "must be at least 1, got 0"));
        }
        let interval_nanos = crate::util::nanos(interval);
        // A bucket's time to refill from empty, in nanoseconds, must stay well inside a
        // `u64`: the limiters add it to the clock's reading (nanoseconds since the clock's
        // origin), and a sum that saturated at `u64::MAX` would admit every request.
        // A quarter of the range (146 years) leaves the clock three quarters.
        if u64::from(burst)
            .checked_mul(interval_nanos)
            .is_none_or(|tau| tau > MAX_REFILL_NANOS)
        {
            return Err(ConfigError::invalid(
                "burst",
                format!(
                    "{burst} tokens at one per {interval:?} take more than 146 years to refill"
                ),
            ));
        }
        Ok(Self {
            rate,
            burst,
            interval_nanos,
        })
    }

    /// A quota whose burst is one period's worth of tokens.
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn from_rate(rate: Rate) -> Result<Self, ConfigError> {
        Self::new(rate, rate.tokens)
    }

    /// The refill rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// The bucket's capacity.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Time to replenish one token.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_nanos)
    }

    pub(crate) fn interval_nanos(&self) -> u64 {
        self.interval_nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_quotas_are_typed_errors() {
        let field = |r: Result<Quota, ConfigError>| r.expect_err("invalid").field().to_owned();
        assert_eq!(field(Quota::new(Rate::per_second(0), 1)), "rate");
        assert_eq!(field(Quota::new(Rate::new(1, Duration::ZERO), 1)), "rate");
        // More than one token per nanosecond.
        assert_eq!(
            field(Quota::new(Rate::new(2, Duration::from_nanos(1)), 1)),
            "rate"
        );
        assert_eq!(field(Quota::new(Rate::new(1, Duration::MAX), 1)), "rate");
        assert_eq!(field(Quota::new(Rate::per_second(1), 0)), "burst");
        // Refilling from empty would take longer than a quarter of a `u64` of
        // nanoseconds (the rest is the clock's): refused rather than capped to a smaller
        // burst, or saturating with the clock's reading.
        let yearly = Rate::new(1, Duration::from_secs(365 * 24 * 3600));
        assert_eq!(field(Quota::new(yearly, u32::MAX)), "burst");
        let largest = MAX_REFILL_NANOS / Quota::new(yearly, 1).unwrap().interval_nanos();
        let largest = u32::try_from(largest).unwrap();
        assert_eq!(Quota::new(yearly, largest).unwrap().burst(), largest);
        assert_eq!(field(Quota::new(yearly, largest + 1)), "burst");
        // Every burst fits at a second a token.
        assert!(Quota::new(Rate::per_second(1), u32::MAX).is_ok());
    }

    #[test]
    fn units_mean_what_they_say() {
        let q = Quota::new(Rate::per_second(100), 1).expect("valid");
        assert_eq!(q.interval(), Duration::from_millis(10));
        let q = Quota::new(Rate::per_hour(3600), 1).expect("valid");
        assert_eq!(q.interval(), Duration::from_secs(1));
    }
}
