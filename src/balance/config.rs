//! Balancer configuration: the picking strategy and outlier detection.

use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// How [`Balance`](super::Balance) picks an endpoint for the next request.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Strategy {
    /// Power of two choices on outstanding requests: two endpoints drawn at random
    /// (in proportion to their weights), the one with fewer requests in flight per unit of
    /// weight wins. The default: no clock read on the request path.
    #[default]
    LeastRequests,
    /// Power of two choices on peak-EWMA latency × (outstanding + 1), as in Finagle and
    /// tower: an endpoint's latency estimate jumps to any slower response at once and decays
    /// towards faster ones over `decay`. Endpoints start at `default_rtt`.
    PeakEwma {
        /// The latency estimate of an endpoint with no responses yet.
        default_rtt: Duration,
        /// The time constant of the decay towards faster responses.
        decay: Duration,
    },
    /// Weighted round robin (smooth, as nginx's: a weight-3 endpoint gets three turns in
    /// every cycle, interleaved rather than in a row).
    RoundRobin,
}

impl Strategy {
    /// Peak-EWMA with tower's defaults: 30 ms default latency, 10 s decay.
    pub const fn peak_ewma() -> Self {
        Strategy::PeakEwma {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(10),
        }
    }
}

/// What a balancer does when it has no endpoint at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenEmpty {
    /// Fail the request at once with [`NoEndpoints`](super::error::NoEndpoints).
    #[default]
    Fail,
    /// Stay not ready until an endpoint appears, for at most this long, then fail with
    /// [`NoEndpoints`](super::error::NoEndpoints).
    Wait(Duration),
}

/// Passive health checking, as Envoy's outlier detection: an endpoint that fails too
/// often is taken out of rotation for a while, longer each time it is ejected again, and
/// put back afterwards. At most [`max_ejected_percent`](OutlierDetectionBuilder::max_ejected_percent)
/// of the endpoints are out at once (at least one may always be), so traffic keeps flowing
/// when most endpoints look bad.
///
/// Outcomes are classified by the balancer's classifier
/// ([`Classify`](crate::circuit_breaker::Classify)); ignored outcomes count for nothing.
///
/// ```
/// use std::time::Duration;
/// use seawall::balance::OutlierDetection;
///
/// let detection = OutlierDetection::builder()
///     .consecutive_failures(5)
///     .failure_rate(50, 20) // half of the last 20 calls failed
///     .base_ejection_time(Duration::from_secs(10))
///     .max_ejection_time(Duration::from_secs(300))
///     .max_ejected_percent(50)
///     .build()?;
/// # Ok::<(), seawall::balance::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    pub(crate) consecutive_failures: Option<NonZeroU32>,
    pub(crate) failure_rate: Option<(u8, NonZeroU32)>,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
    pub(crate) max_ejected_percent: u8,
}

impl OutlierDetection {
    /// A builder holding the defaults: eject after 5 consecutive failures, no failure-rate
    /// rule, 30 s base ejection time growing to at most 300 s, at most 50 % ejected.
    #[must_use]
    pub fn builder() -> OutlierDetectionBuilder {
        OutlierDetectionBuilder {
            config: OutlierDetection::default(),
            consecutive: Some(5),
            rate: None,
        }
    }

    /// Failures in a row that eject an endpoint, if that rule is on.
    pub fn consecutive_failures(&self) -> Option<NonZeroU32> {
        self.consecutive_failures
    }

    /// The failure-rate rule, if on: the percentage of the last `calls` calls.
    pub fn failure_rate(&self) -> Option<(u8, NonZeroU32)> {
        self.failure_rate
    }

    /// How long the first ejection lasts.
    pub fn base_ejection_time(&self) -> Duration {
        self.base_ejection
    }

    /// The longest an ejection lasts.
    pub fn max_ejection_time(&self) -> Duration {
        self.max_ejection
    }

    /// The largest share of endpoints ejected at once, in percent.
    pub fn max_ejected_percent(&self) -> u8 {
        self.max_ejected_percent
    }

    /// How many of `endpoints` may be ejected at once: the configured share, but at least
    /// one.
    pub(crate) fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * usize::from(self.max_ejected_percent) / 100).max(1)
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: NonZeroU32::new(5),
            failure_rate: None,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// Builds an [`OutlierDetection`], checked in [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct OutlierDetectionBuilder {
    config: OutlierDetection,
    consecutive: Option<u32>,
    rate: Option<(u8, u32)>,
}

impl OutlierDetectionBuilder {
    /// Ejects an endpoint after `failures` failures in a row (at least 1).
    #[must_use]
    pub fn consecutive_failures(mut self, failures: u32) -> Self {
        self.consecutive = Some(failures);
        self
    }

    /// Turns the consecutive-failures rule off.
    #[must_use]
    pub fn no_consecutive_failures(mut self) -> Self {
        self.consecutive = None;
        self
    }

    /// Ejects an endpoint when at least `percent` of its calls failed, judged over every
    /// `calls` calls (a tumbling window; `percent` in 1..=100, `calls` at least 1).
    #[must_use]
    pub fn failure_rate(mut self, percent: u8, calls: u32) -> Self {
        self.rate = Some((percent, calls));
        self
    }

    /// How long the first ejection lasts (at least 1 ms). The n-th ejection in a row lasts n
    /// times as long, up to [`max_ejection_time`](Self::max_ejection_time).
    #[must_use]
    pub fn base_ejection_time(mut self, time: Duration) -> Self {
        self.config.base_ejection = time;
        self
    }

    /// The longest an ejection lasts (at least the base time, at most 365 days).
    #[must_use]
    pub fn max_ejection_time(mut self, time: Duration) -> Self {
        self.config.max_ejection = time;
        self
    }

    /// The largest share of endpoints ejected at once, in percent (0..=100; one endpoint
    /// may always be ejected).
    #[must_use]
    pub fn max_ejected_percent(mut self, percent: u8) -> Self {
        self.config.max_ejected_percent = percent;
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the first invalid setting.
    pub fn build(self) -> Result<OutlierDetection, ConfigError> {
        let mut config = self.config;
        config.consecutive_failures = match self.consecutive {
            None => None,
            Some(n) => Some(NonZeroU32::new(n).ok_or(ConfigError::ConsecutiveFailures)?),
        };
        config.failure_rate = match self.rate {
            None => None,
            Some((percent, calls)) => {
                if percent == 0 || percent > 100 {
                    return Err(ConfigError::FailureRatePercent(percent));
                }
                Some((
                    percent,
                    NonZeroU32::new(calls).ok_or(ConfigError::FailureRateCalls)?,
                ))
            }
        };
        if config.base_ejection < Duration::from_millis(1) {
            return Err(ConfigError::BaseEjectionTime(config.base_ejection));
        }
        if config.max_ejection < config.base_ejection || config.max_ejection > MAX_DURATION {
            return Err(ConfigError::MaxEjectionTime(config.max_ejection));
        }
        if config.max_ejected_percent > 100 {
            return Err(ConfigError::MaxEjectedPercent(config.max_ejected_percent));
        }
        if config.consecutive_failures.is_none() && config.failure_rate.is_none() {
            return Err(ConfigError::NoRule);
        }
        Ok(config)
    }
}

pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// An invalid balancer setting.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `consecutive_failures` was 0.
    ConsecutiveFailures,
    /// The failure-rate percentage was not in 1..=100.
    FailureRatePercent(u8),
    /// The failure-rate window was 0 calls.
    FailureRateCalls,
    /// The base ejection time was under 1 ms.
    BaseEjectionTime(Duration),
    /// The maximum ejection time was below the base time or above 365 days.
    MaxEjectionTime(Duration),
    /// The maximum ejected share was above 100 %.
    MaxEjectedPercent(u8),
    /// Outlier detection with neither rule on.
    NoRule,
    /// A peak-EWMA default latency or decay of zero or above 365 days.
    PeakEwma(Duration),
    /// A `WhenEmpty::Wait` above 365 days.
    EmptyWait(Duration),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ConsecutiveFailures => {
                f.write_str("invalid consecutive_failures: must be at least 1")
            }
            Self::FailureRatePercent(p) => {
                write!(f, "invalid failure_rate percent {p}: must be in 1..=100")
            }
            Self::FailureRateCalls => f.write_str("invalid failure_rate calls: must be at least 1"),
            Self::BaseEjectionTime(d) => {
                write!(f, "invalid base_ejection_time {d:?}: must be at least 1ms")
            }
            Self::MaxEjectionTime(d) => write!(
                f,
                "invalid max_ejection_time {d:?}: must be between the base time and 365 days"
            ),
            Self::MaxEjectedPercent(p) => {
                write!(f, "invalid max_ejected_percent {p}: must be at most 100")
            }
            Self::NoRule => f.write_str(
                "invalid outlier detection: neither consecutive_failures nor failure_rate is on",
            ),
            Self::PeakEwma(d) => write!(
                f,
                "invalid peak-EWMA duration {d:?}: must be above zero and at most 365 days"
            ),
            Self::EmptyWait(d) => write!(f, "invalid when_empty wait {d:?}: at most 365 days"),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_named() {
        let b = OutlierDetection::builder;
        assert_eq!(
            b().consecutive_failures(0).build(),
            Err(ConfigError::ConsecutiveFailures)
        );
        assert_eq!(
            b().failure_rate(101, 10).build(),
            Err(ConfigError::FailureRatePercent(101))
        );
        assert_eq!(
            b().failure_rate(50, 0).build(),
            Err(ConfigError::FailureRateCalls)
        );
        assert!(matches!(
            b().base_ejection_time(Duration::ZERO).build(),
            Err(ConfigError::BaseEjectionTime(_))
        ));
        assert!(matches!(
            b().max_ejection_time(Duration::from_secs(1)).build(),
            Err(ConfigError::MaxEjectionTime(_))
        ));
        assert_eq!(
            b().max_ejected_percent(101).build(),
            Err(ConfigError::MaxEjectedPercent(101))
        );
        assert_eq!(
            b().no_consecutive_failures().build(),
            Err(ConfigError::NoRule)
        );
        assert!(b().build().is_ok());
    }

    #[test]
    fn one_endpoint_may_always_be_ejected() {
        let d = OutlierDetection::builder()
            .max_ejected_percent(10)
            .build()
            .unwrap();
        assert_eq!(d.max_ejected(3), 1);
        assert_eq!(d.max_ejected(30), 3);
        let none = OutlierDetection::builder()
            .max_ejected_percent(0)
            .build()
            .unwrap();
        assert_eq!(none.max_ejected(100), 1);
    }
}
