//! Validated configuration for a circuit breaker.

use std::sync::Arc;
use std::time::Duration;

use crate::ConfigError;

/// Largest count-based window accepted (one byte of memory per slot, in each of the two
/// windows a breaker keeps: closed periods take turns, so that a reset's period never
/// counts outcomes of calls admitted before it).
pub const MAX_WINDOW_SIZE: u32 = 1 << 20;
/// Largest number of buckets accepted for a time-based window.
pub const MAX_BUCKETS: u32 = 3600;
/// Longest duration accepted for any setting (365 days): longer waits are typos or
/// "forever", which [`Breaker::force_open`](super::Breaker::force_open) expresses better,
/// and they would overflow the clock arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The sliding window over which failure and slow-call rates are computed.
///
/// ```
/// use std::time::Duration;
/// use seawall::circuit_breaker::SlidingWindow;
///
/// // The last 100 calls.
/// let by_count = SlidingWindow::count_based(100);
/// // The last 60 seconds, kept in 60 one-second buckets.
/// let by_time = SlidingWindow::time_based(Duration::from_secs(60), 60);
/// # let _ = (by_count, by_time);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingWindow {
    /// The outcomes of the last `size` calls. No clock is read to maintain it.
    CountBased {
        /// Number of calls kept.
        size: u32,
    },
    /// The outcomes of the calls that completed in the last `window`, aggregated in
    /// `buckets` equal buckets. Reads the clock once per completed call.
    TimeBased {
        /// Total length of the window.
        window: Duration,
        /// Number of buckets the window is split into; the window slides one bucket at a time.
        buckets: u32,
    },
}

impl SlidingWindow {
    /// A window over the last `size` calls (two windows of `size` bytes: see
    /// [`MAX_WINDOW_SIZE`]).
    #[must_use]
    pub const fn count_based(size: u32) -> Self {
        Self::CountBased { size }
    }

    /// A window over the calls completed during the last `window`, kept in `buckets` buckets.
    #[must_use]
    pub const fn time_based(window: Duration, buckets: u32) -> Self {
        Self::TimeBased { window, buckets }
    }
}

/// How long the breaker stays open, possibly growing on repeated trips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WaitPolicy {
    pub(crate) base: Duration,
    pub(crate) multiplier: f64,
    pub(crate) max: Duration,
    pub(crate) jitter: f64,
}

impl WaitPolicy {
    /// The wait before the `trip`-th consecutive trip (1-based) moves to half-open,
    /// with `unit` a uniform sample in `[0, 1)` for the jitter.
    pub(crate) fn wait(&self, trip: u32, unit: f64) -> Duration {
        let spread = (1.0 - self.jitter, 1.0 + self.jitter);
        crate::util::backoff(trip, self.base, self.multiplier, self.max, spread, unit)
    }
}

/// A validated circuit breaker configuration. Build one with [`CircuitBreakerConfig::builder`].
///
/// ```
/// use std::time::Duration;
/// use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow};
///
/// let config = CircuitBreakerConfig::builder()
///     .name("payments")
///     .failure_rate_threshold(0.5)
///     .sliding_window(SlidingWindow::count_based(20))
///     .minimum_calls(10)
///     .wait_in_open(Duration::from_secs(5))
///     .exponential_backoff(2.0, Duration::from_secs(60))
///     .permitted_calls_in_half_open(3)
///     .build()?;
/// assert_eq!(config.name(), "payments");
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerConfig {
    pub(crate) name: Arc<str>,
    pub(crate) failure_rate_threshold: f64,
    pub(crate) slow_call_rate_threshold: f64,
    pub(crate) slow_call_duration: Option<Duration>,
    pub(crate) window: SlidingWindow,
    pub(crate) minimum_calls: u32,
    pub(crate) wait: WaitPolicy,
    pub(crate) permitted_calls_in_half_open: u32,
    pub(crate) max_wait_in_half_open: Option<Duration>,
    /// Whether the breaker reports to the `metrics` facade (off for a balancer's endpoint
    /// breakers under [`BalanceBuilder::endpoint_metrics`](crate::balance::BalanceBuilder::endpoint_metrics)).
    pub(crate) facade_metrics: bool,
}

impl Default for CircuitBreakerConfig {
    /// The defaults documented on [`CircuitBreakerConfigBuilder`].
    fn default() -> Self {
        Self {
            name: Arc::from("default"),
            failure_rate_threshold: 0.5,
            slow_call_rate_threshold: 1.0,
            slow_call_duration: None,
            window: SlidingWindow::CountBased { size: 100 },
            minimum_calls: 100,
            wait: WaitPolicy {
                base: Duration::from_secs(60),
                multiplier: 1.0,
                max: Duration::from_secs(60),
                jitter: 0.0,
            },
            permitted_calls_in_half_open: 10,
            max_wait_in_half_open: None,
            facade_metrics: true,
        }
    }
}

impl CircuitBreakerConfig {
    /// Starts a builder holding the defaults.
    #[must_use]
    pub fn builder() -> CircuitBreakerConfigBuilder {
        CircuitBreakerConfigBuilder {
            config: Self::default(),
            backoff: None,
        }
    }

    /// The same configuration under another name: a template for many breakers, such as
    /// one per endpoint of a balancer. An empty name keeps the current one.
    #[must_use]
    pub fn with_name(&self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        let mut config = self.clone();
        if !name.is_empty() {
            config.name = name;
        }
        config
    }

    /// The breaker's name, used in events, metrics labels and the registry.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Failure-rate threshold, a fraction in `(0, 1]`.
    pub fn failure_rate_threshold(&self) -> f64 {
        self.failure_rate_threshold
    }

    /// Slow-call-rate threshold, a fraction in `(0, 1]`.
    pub fn slow_call_rate_threshold(&self) -> f64 {
        self.slow_call_rate_threshold
    }

    /// Duration above which a call counts as slow, if slow-call detection is on.
    pub fn slow_call_duration(&self) -> Option<Duration> {
        self.slow_call_duration
    }

    /// The sliding window.
    pub fn sliding_window(&self) -> SlidingWindow {
        self.window
    }

    /// Calls needed in the window before the rates are evaluated.
    pub fn minimum_calls(&self) -> u32 {
        self.minimum_calls
    }

    /// Base wait in the open state.
    pub fn wait_in_open(&self) -> Duration {
        self.wait.base
    }

    /// Probe calls admitted in the half-open state.
    pub fn permitted_calls_in_half_open(&self) -> u32 {
        self.permitted_calls_in_half_open
    }

    /// Longest time spent half-open before the breaker opens again, if bounded.
    pub fn max_wait_in_half_open(&self) -> Option<Duration> {
        self.max_wait_in_half_open
    }
}

/// Builder for [`CircuitBreakerConfig`]; nothing is checked until [`build`](Self::build).
///
/// Defaults follow resilience4j, except that slow-call detection is off until
/// [`slow_call_duration`](Self::slow_call_duration) is set (it costs a clock read per call):
///
/// | setting | default |
/// |---|---|
/// | `failure_rate_threshold` | 0.5 (50 % of the calls in the window) |
/// | `slow_call_rate_threshold` | 1.0 (all of them) |
/// | `slow_call_duration` | off |
/// | `sliding_window` | count-based, 100 calls |
/// | `minimum_calls` | 100 |
/// | `wait_in_open` | 60 s, no backoff, no jitter |
/// | `permitted_calls_in_half_open` | 10 |
/// | `max_wait_in_half_open` | unbounded |
///
/// ```
/// use std::time::Duration;
/// use seawall::circuit_breaker::{CircuitBreakerConfig, SlidingWindow};
///
/// let config = CircuitBreakerConfig::builder()
///     .name("payments")
///     // Open when 30 % of the calls of the last minute failed, or 80 % took over 2 s...
///     .sliding_window(SlidingWindow::time_based(Duration::from_secs(60), 12))
///     .minimum_calls(20)
///     .failure_rate_threshold(0.3)
///     .slow_call_duration(Duration::from_secs(2))
///     .slow_call_rate_threshold(0.8)
///     // ...stay open 5 s, doubling on each trip in a row up to 2 min, spread ±10 %...
///     .wait_in_open(Duration::from_secs(5))
///     .exponential_backoff(2.0, Duration::from_secs(120))
///     .jitter(0.1)
///     // ...then let 3 probes decide.
///     .permitted_calls_in_half_open(3)
///     .build()?;
/// assert_eq!(config.failure_rate_threshold(), 0.3);
///
/// // Every invalid value is a `ConfigError` naming the setting.
/// let err = CircuitBreakerConfig::builder().minimum_calls(0).build().unwrap_err();
/// assert_eq!(err.field(), "minimum_calls");
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerConfigBuilder {
    config: CircuitBreakerConfig,
    backoff: Option<(f64, Duration)>,
}

impl CircuitBreakerConfigBuilder {
    /// Names the breaker (events, metrics labels, registry key).
    #[must_use]
    pub fn name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Opens the breaker when at least this share of the calls in the window failed: a
    /// fraction in `(0, 1]`, as every share in seawall (`0.5` is half of them). A value
    /// above 1, such as `50.0` meant as a percentage, is rejected by [`build`](Self::build).
    #[must_use]
    pub fn failure_rate_threshold(mut self, fraction: f64) -> Self {
        self.config.failure_rate_threshold = fraction;
        self
    }

    /// Opens the breaker when at least this share of the calls in the window were slow: a
    /// fraction in `(0, 1]` (`1.0`, the default, means all of them).
    #[must_use]
    pub fn slow_call_rate_threshold(mut self, fraction: f64) -> Self {
        self.config.slow_call_rate_threshold = fraction;
        self
    }

    /// Counts a call as slow when it takes at least `duration`; turns slow-call detection on.
    #[must_use]
    pub fn slow_call_duration(mut self, duration: Duration) -> Self {
        self.config.slow_call_duration = Some(duration);
        self
    }

    /// Sets the sliding window over which the rates are computed.
    #[must_use]
    pub fn sliding_window(mut self, window: SlidingWindow) -> Self {
        self.config.window = window;
        self
    }

    /// Sets how many calls the window must hold before the rates are evaluated.
    #[must_use]
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.config.minimum_calls = calls;
        self
    }

    /// Sets how long the breaker stays open before admitting probes (the base wait when
    /// backoff is on). An open wait is never shorter than 1 ms, whatever this and the
    /// jitter make of it.
    #[must_use]
    pub fn wait_in_open(mut self, wait: Duration) -> Self {
        self.config.wait.base = wait;
        self
    }

    /// Grows the open wait by `multiplier` on every consecutive trip (a trip from half-open
    /// without closing in between), up to `max`. A successful close resets the growth.
    #[must_use]
    pub fn exponential_backoff(mut self, multiplier: f64, max: Duration) -> Self {
        self.backoff = Some((multiplier, max));
        self
    }

    /// Spreads the open wait uniformly over `wait × (1 ± jitter)` (the backoff cap applies
    /// before the jitter), so that a fleet of clients does not probe in lockstep. A fraction
    /// in `[0, 1)`: `0.2` spreads a 10 s wait over 8–12 s.
    #[must_use]
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.config.wait.jitter = jitter;
        self
    }

    /// Sets how many probe calls the half-open state admits at once; their outcomes decide
    /// whether the breaker closes or opens again.
    #[must_use]
    pub fn permitted_calls_in_half_open(mut self, calls: u32) -> Self {
        self.config.permitted_calls_in_half_open = calls;
        self
    }

    /// Opens the breaker again when the probes have not all completed within `max`.
    #[must_use]
    pub fn max_wait_in_half_open(mut self, max: Duration) -> Self {
        self.config.max_wait_in_half_open = Some(max);
        self
    }

    /// Validates every setting; the error names the first one at fault.
    pub fn build(self) -> Result<CircuitBreakerConfig, ConfigError> {
        let mut c = self.config;
        (c.wait.multiplier, c.wait.max) = self.backoff.unwrap_or((1.0, c.wait.base));
        let share = |field: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 1.0 {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    field,
                    crate::util::not_a_fraction(v, "(0, 1]"),
                ))
            }
        };
        let duration = |field: &'static str, d: Duration| {
            if d.is_zero() || d > MAX_DURATION {
                Err(ConfigError::invalid(
                    field,
                    format!("{d:?} must be greater than zero and at most 365 days"),
                ))
            } else {
                Ok(())
            }
        };
        if c.name.is_empty() {
            return Err(ConfigError::invalid("name", "must not be empty"));
        }
        share("failure_rate_threshold", c.failure_rate_threshold)?;
        share("slow_call_rate_threshold", c.slow_call_rate_threshold)?;
        if let Some(d) = c.slow_call_duration {
            duration("slow_call_duration", d)?;
        }
        match c.window {
            SlidingWindow::CountBased { size } => {
                if size == 0 || size > MAX_WINDOW_SIZE {
                    return Err(ConfigError::invalid(
                        "sliding_window",
                        format!(
                            "a count-based window of {size} calls: must hold 1 to {MAX_WINDOW_SIZE}"
                        ),
                    ));
                }
                if c.minimum_calls > size {
                    return Err(ConfigError::invalid(
                        "minimum_calls",
                        format!(
                            "{} is more than the window's {size} calls: the breaker could never trip",
                            c.minimum_calls
                        ),
                    ));
                }
            }
            SlidingWindow::TimeBased { window, buckets } => {
                let ok = buckets > 0
                    && buckets <= MAX_BUCKETS
                    && window <= MAX_DURATION
                    && window / buckets >= Duration::from_millis(1);
                if !ok {
                    return Err(ConfigError::invalid(
                        "sliding_window",
                        format!(
                            "a time-based window of {window:?} in {buckets} buckets: needs 1 to \
                             {MAX_BUCKETS} buckets of at least 1ms, at most 365 days in all"
                        ),
                    ));
                }
            }
        }
        if c.minimum_calls == 0 {
            return Err(ConfigError::invalid("minimum_calls", "must be at least 1"));
        }
        duration("wait_in_open", c.wait.base)?;
        if !(c.wait.multiplier.is_finite() && c.wait.multiplier >= 1.0) {
            return Err(ConfigError::invalid(
                "exponential_backoff",
                format!(
                    "multiplier {} must be finite and at least 1",
                    c.wait.multiplier
                ),
            ));
        }
        if c.wait.max < c.wait.base || c.wait.max > MAX_DURATION {
            return Err(ConfigError::invalid(
                "exponential_backoff",
                format!(
                    "max {:?} must be at least wait_in_open ({:?}) and at most 365 days",
                    c.wait.max, c.wait.base
                ),
            ));
        }
        if !(c.wait.jitter.is_finite() && (0.0..1.0).contains(&c.wait.jitter)) {
            return Err(ConfigError::invalid(
                "jitter",
                crate::util::not_a_fraction(c.wait.jitter, "[0, 1)"),
            ));
        }
        if c.permitted_calls_in_half_open == 0 || c.permitted_calls_in_half_open > MAX_WINDOW_SIZE {
            return Err(ConfigError::invalid(
                "permitted_calls_in_half_open",
                format!(
                    "{} must be between 1 and {MAX_WINDOW_SIZE}",
                    c.permitted_calls_in_half_open
                ),
            ));
        }
        if let Some(d) = c.max_wait_in_half_open {
            duration("max_wait_in_half_open", d)?;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = CircuitBreakerConfig::builder()
            .build()
            .expect("defaults valid");
        assert_eq!(c, CircuitBreakerConfig::default());
    }

    #[test]
    fn every_invalid_value_names_its_setting() {
        let b = || CircuitBreakerConfig::builder();
        let cases: Vec<(CircuitBreakerConfigBuilder, &str, &str)> = vec![
            (b().name(""), "name", "empty"),
            (
                b().failure_rate_threshold(0.0),
                "failure_rate_threshold",
                "0",
            ),
            (
                b().failure_rate_threshold(50.0),
                "failure_rate_threshold",
                "for 50 % write 0.5",
            ),
            (
                b().failure_rate_threshold(100.5),
                "failure_rate_threshold",
                "100.5",
            ),
            (
                b().slow_call_rate_threshold(-1.0),
                "slow_call_rate_threshold",
                "-1",
            ),
            (
                b().slow_call_duration(Duration::ZERO),
                "slow_call_duration",
                "0ns",
            ),
            (
                b().sliding_window(SlidingWindow::count_based(0)),
                "sliding_window",
                "0 calls",
            ),
            (
                b().sliding_window(SlidingWindow::count_based(MAX_WINDOW_SIZE + 1)),
                "sliding_window",
                "1048577",
            ),
            (
                b().sliding_window(SlidingWindow::count_based(10))
                    .minimum_calls(11),
                "minimum_calls",
                "11",
            ),
            (
                b().sliding_window(SlidingWindow::count_based(10))
                    .minimum_calls(0),
                "minimum_calls",
                "at least 1",
            ),
            (
                b().sliding_window(SlidingWindow::time_based(Duration::from_millis(5), 10)),
                "sliding_window",
                "5ms in 10 buckets",
            ),
            (
                b().sliding_window(SlidingWindow::time_based(Duration::from_secs(5), 0)),
                "sliding_window",
                "0 buckets",
            ),
            (b().wait_in_open(Duration::ZERO), "wait_in_open", "0ns"),
            (
                b().exponential_backoff(0.5, Duration::from_secs(600)),
                "exponential_backoff",
                "0.5",
            ),
            (
                b().exponential_backoff(2.0, Duration::from_secs(1)),
                "exponential_backoff",
                "1s",
            ),
            (b().jitter(1.0), "jitter", "1"),
            (b().jitter(f64::NAN), "jitter", "NaN"),
            (
                b().permitted_calls_in_half_open(0),
                "permitted_calls_in_half_open",
                "0",
            ),
            (
                b().max_wait_in_half_open(Duration::ZERO),
                "max_wait_in_half_open",
                "0ns",
            ),
        ];
        for (builder, field, shown) in cases {
            let err = builder.build().expect_err("must be rejected");
            assert_eq!(err.field(), field, "{err}");
            assert!(err.reason().contains(shown), "{err} should show {shown}");
        }
    }

    #[test]
    fn shares_are_fractions() {
        let c = CircuitBreakerConfig::builder()
            .failure_rate_threshold(1.0)
            .slow_call_rate_threshold(0.25)
            .jitter(0.2)
            .build()
            .expect("valid");
        assert_eq!(c.failure_rate_threshold(), 1.0);
        assert_eq!(c.slow_call_rate_threshold(), 0.25);
    }

    #[test]
    fn backoff_and_wait_can_be_set_in_any_order() {
        let a = CircuitBreakerConfig::builder()
            .exponential_backoff(2.0, Duration::from_secs(60))
            .wait_in_open(Duration::from_secs(5))
            .build()
            .expect("valid");
        let b = CircuitBreakerConfig::builder()
            .wait_in_open(Duration::from_secs(5))
            .exponential_backoff(2.0, Duration::from_secs(60))
            .build()
            .expect("valid");
        assert_eq!(a, b);
        assert_eq!(a.wait.max, Duration::from_secs(60));
        let plain = CircuitBreakerConfig::builder()
            .wait_in_open(Duration::from_secs(5))
            .build()
            .expect("valid");
        assert_eq!(
            (plain.wait.multiplier, plain.wait.max),
            (1.0, Duration::from_secs(5))
        );
    }

    #[test]
    fn extreme_but_valid_waits_do_not_overflow() {
        let w = WaitPolicy {
            base: MAX_DURATION,
            multiplier: 1e300,
            max: MAX_DURATION,
            jitter: 0.99,
        };
        for trip in [1, 2, 1000, u32::MAX] {
            let d = w.wait(trip, 0.999);
            assert!(d <= MAX_DURATION * 2, "{d:?}");
            // The clock arithmetic the breaker does with it stays in range.
            assert!(tokio::time::Instant::now().checked_add(d).is_some());
        }
    }

    #[test]
    fn wait_grows_and_is_capped() {
        let w = WaitPolicy {
            base: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.0,
        };
        assert_eq!(w.wait(1, 0.5), Duration::from_secs(1));
        assert_eq!(w.wait(2, 0.5), Duration::from_secs(2));
        assert_eq!(w.wait(4, 0.5), Duration::from_secs(8));
        assert_eq!(w.wait(5, 0.5), Duration::from_secs(10));
        assert_eq!(w.wait(u32::MAX, 0.5), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let w = WaitPolicy {
            base: Duration::from_secs(10),
            multiplier: 1.0,
            max: Duration::from_secs(10),
            jitter: 0.2,
        };
        let mut above = 0;
        for i in 0..100 {
            let unit = f64::from(i) / 100.0;
            let d = w.wait(1, unit);
            assert!(
                d >= Duration::from_secs(8) && d < Duration::from_secs(12),
                "{d:?}"
            );
            above += usize::from(d > Duration::from_secs(10));
        }
        assert_eq!(w.wait(1, 0.0), Duration::from_secs(8));
        assert_eq!(w.wait(1, 0.5), Duration::from_secs(10));
        assert_eq!(above, 49, "half the draws lie above the base wait");
    }
}
