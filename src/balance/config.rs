//! Balancer configuration: the picking strategy and outlier detection.

use std::num::NonZeroU32;
use std::time::Duration;

use crate::ConfigError;

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
    /// Stay not ready until an endpoint appears, for at most this long from when the
    /// balancer found itself empty, then fail with
    /// [`NoEndpoints`](super::error::NoEndpoints), at once, until an endpoint appears
    /// (callers sharing the balancer each wait at most this long, not one after another).
    Wait(Duration),
    /// As [`Wait`](Self::Wait) until discovery has given the balancer's set an endpoint
    /// (its first answer may take a while), then as [`Fail`](Self::Fail): once every
    /// instance has left, requests are answered at once instead of each waiting out the
    /// bound. Replicas share the set, so one made later does not wait either.
    WaitAtStart(Duration),
}

/// Passive health checking, as Envoy's outlier detection: an endpoint that fails too
/// often is taken out of rotation for a while, longer each time it is ejected again, and
/// put back afterwards. At most a [share](OutlierDetectionBuilder::max_ejected) of the
/// endpoints are out at once (at least one may always be), so traffic keeps flowing
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
///     .failure_rate(0.5, 20) // half of the last 20 calls failed
///     .base_ejection_time(Duration::from_secs(10))
///     .max_ejection_time(Duration::from_secs(300))
///     .max_ejected(0.5) // at most half of the endpoints out at once
///     .build()?;
/// # Ok::<(), seawall::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    pub(crate) consecutive_failures: Option<NonZeroU32>,
    pub(crate) failure_rate: Option<(f64, NonZeroU32)>,
    pub(crate) base_ejection: Duration,
    pub(crate) max_ejection: Duration,
    pub(crate) max_ejected: f64,
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

    /// The failure-rate rule, if on: the share (a fraction in `(0, 1]`) of every `calls`
    /// calls that ejects.
    pub fn failure_rate(&self) -> Option<(f64, NonZeroU32)> {
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

    /// The largest share of endpoints ejected at once, a fraction in `[0, 1]`.
    pub fn max_ejected(&self) -> f64 {
        self.max_ejected
    }

    /// How many of `endpoints` may be ejected at once: the configured share, but at least
    /// one.
    pub(crate) fn max_ejected_count(&self, endpoints: usize) -> usize {
        // A share of at most 1 and a count of endpoints well under 2^52 stay exact enough;
        // the small epsilon keeps 0.3 × 10 at 3.
        ((endpoints as f64 * self.max_ejected + 1e-9).floor() as usize).max(1)
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: NonZeroU32::new(5),
            failure_rate: None,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected: 0.5,
        }
    }
}

/// Builds an [`OutlierDetection`], checked in [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct OutlierDetectionBuilder {
    config: OutlierDetection,
    consecutive: Option<u32>,
    rate: Option<(f64, u32)>,
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

    /// Ejects an endpoint when at least `threshold` of its calls failed, judged over every
    /// `calls` calls (a tumbling window). `threshold` is a fraction in `(0, 1]`, as every
    /// share in seawall (`0.5`: half of them); `calls` is at least 1.
    #[must_use]
    pub fn failure_rate(mut self, threshold: f64, calls: u32) -> Self {
        self.rate = Some((threshold, calls));
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

    /// The largest share of endpoints ejected at once, a fraction in `[0, 1]` (`0.5`: half
    /// of them; one endpoint may always be ejected).
    #[must_use]
    pub fn max_ejected(mut self, fraction: f64) -> Self {
        self.config.max_ejected = fraction;
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
            Some(n) => Some(NonZeroU32::new(n).ok_or_else(|| {
                ConfigError::invalid("consecutive_failures", "must be at least 1")
            })?),
        };
        config.failure_rate = match self.rate {
            None => None,
            Some((threshold, calls)) => {
                if !(threshold.is_finite() && threshold > 0.0 && threshold <= 1.0) {
                    return Err(ConfigError::invalid(
                        "failure_rate",
                        crate::util::not_a_fraction(threshold, "(0, 1]"),
                    ));
                }
                Some((
                    threshold,
                    NonZeroU32::new(calls).ok_or_else(|| {
                        ConfigError::invalid("failure_rate", "calls must be at least 1")
                    })?,
                ))
            }
        };
        if config.base_ejection < Duration::from_millis(1) {
            return Err(ConfigError::invalid(
                "base_ejection_time",
                format!("{:?} must be at least 1ms", config.base_ejection),
            ));
        }
        if config.max_ejection < config.base_ejection || config.max_ejection > MAX_DURATION {
            return Err(ConfigError::invalid(
                "max_ejection_time",
                format!(
                    "{:?} must be between the base time and 365 days",
                    config.max_ejection
                ),
            ));
        }
        let m = config.max_ejected;
        if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
            return Err(ConfigError::invalid(
                "max_ejected",
                crate::util::not_a_fraction(m, "[0, 1]"),
            ));
        }
        if config.consecutive_failures.is_none() && config.failure_rate.is_none() {
            return Err(ConfigError::invalid(
                "outlier_detection",
                "neither consecutive_failures nor failure_rate is on",
            ));
        }
        Ok(config)
    }
}

pub(crate) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_are_named() {
        let b = OutlierDetection::builder;
        let field =
            |r: Result<OutlierDetection, ConfigError>| r.expect_err("invalid").field().to_owned();
        assert_eq!(
            field(b().consecutive_failures(0).build()),
            "consecutive_failures"
        );
        assert_eq!(field(b().failure_rate(1.01, 10).build()), "failure_rate");
        let e = b()
            .failure_rate(50.0, 10)
            .build()
            .expect_err("a percentage");
        assert!(e.reason().contains("write 0.5"), "{e}");
        assert_eq!(field(b().failure_rate(0.5, 0).build()), "failure_rate");
        assert_eq!(
            field(b().base_ejection_time(Duration::ZERO).build()),
            "base_ejection_time"
        );
        assert_eq!(
            field(b().max_ejection_time(Duration::from_secs(1)).build()),
            "max_ejection_time"
        );
        assert_eq!(field(b().max_ejected(1.5).build()), "max_ejected");
        assert_eq!(field(b().max_ejected(f64::NAN).build()), "max_ejected");
        assert_eq!(
            field(b().no_consecutive_failures().build()),
            "outlier_detection"
        );
        assert!(b().build().is_ok());
    }

    #[test]
    fn one_endpoint_may_always_be_ejected() {
        let d = OutlierDetection::builder()
            .max_ejected(0.1)
            .build()
            .unwrap();
        assert_eq!(d.max_ejected_count(3), 1);
        assert_eq!(d.max_ejected_count(30), 3);
        let d = OutlierDetection::builder()
            .max_ejected(0.3)
            .build()
            .unwrap();
        assert_eq!(d.max_ejected_count(10), 3);
        let none = OutlierDetection::builder()
            .max_ejected(0.0)
            .build()
            .unwrap();
        assert_eq!(none.max_ejected_count(100), 1);
    }
}
