//! `metrics` and `tracing` reporting of the limiters, for limiters given a name.

use std::sync::OnceLock;

use super::Decision;
use super::error::RateLimited;
use super::local::bucket::Step;

/// The `source` labels of distributed limiters' checks. `exceeds_burst`: a request for
/// more tokens than the burst, refused on the spot (no bucket, in Redis or local, could
/// ever admit it), so that local refusals are not counted as answers from Redis.
#[cfg(all(feature = "metrics", feature = "redis"))]
const SOURCES: [&str; 6] = [
    "redis",
    "batch",
    "local",
    "unavailable",
    "cached",
    "exceeds_burst",
];

/// The reporting of one named limiter. Costs one atomic load per check while unnamed.
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    named: OnceLock<Named>,
}

#[derive(Debug)]
struct Named {
    #[cfg_attr(not(feature = "tracing"), allow(dead_code))]
    name: String,
    #[cfg(feature = "metrics")]
    admitted: metrics::Counter,
    #[cfg(feature = "metrics")]
    refused: metrics::Counter,
    /// Distributed limiters: checks by where they were answered, registered on first use.
    #[cfg(all(feature = "metrics", feature = "redis"))]
    sources: OnceLock<[metrics::Counter; 6]>,
}

impl Named {
    #[cfg(all(feature = "metrics", feature = "redis"))]
    fn source_counters(&self) -> [metrics::Counter; 6] {
        SOURCES.map(|source| {
            metrics::counter!(
                "seawall_rate_limit_redis_checks_total",
                "limiter" => self.name.clone(),
                "source" => source
            )
        })
    }
}

impl Telemetry {
    /// Names the limiter (once; later names are ignored) and registers its metrics.
    pub(crate) fn name(&self, name: &str) {
        let _ = self.named.set(Named {
            name: name.to_owned(),
            #[cfg(feature = "metrics")]
            admitted: metrics::counter!(
                "seawall_rate_limit_decisions_total",
                "limiter" => name.to_owned(),
                "decision" => "admitted"
            ),
            #[cfg(feature = "metrics")]
            refused: metrics::counter!(
                "seawall_rate_limit_decisions_total",
                "limiter" => name.to_owned(),
                "decision" => "refused"
            ),
            #[cfg(all(feature = "metrics", feature = "redis"))]
            sources: OnceLock::new(),
        });
    }

    /// The limiter's name, if it has one.
    pub(crate) fn get_name(&self) -> Option<&str> {
        self.named.get().map(|n| n.name.as_str())
    }

    /// Reports one decision of a local bucket: `admitted(step)` if it admits, else the
    /// refusal (made out of line). The step stays in registers: nothing here takes a
    /// reference to it or puts it in a `Result` before it is decided.
    #[inline]
    pub(crate) fn report<T>(
        &self,
        step: Step,
        admitted: impl FnOnce(Step) -> T,
    ) -> Result<T, RateLimited> {
        if step.admitted {
            self.admitted();
            Ok(admitted(step))
        } else {
            Err(self.refused(step.refusal()))
        }
    }

    /// [`report`](Self::report) as a [`Decision`], with what the admitted request took:
    /// built in place, with no `Result` in between for the optimiser to keep in memory.
    #[inline]
    pub(crate) fn decide<Ch>(&self, step: Step, charge: impl FnOnce(Step) -> Ch) -> Decision<Ch> {
        if step.admitted {
            self.admitted();
            Decision::Admitted(step.admitted(), charge(step))
        } else {
            Decision::Refused(self.refused(step.refusal()))
        }
    }

    /// Reports one decision.
    #[inline]
    pub(crate) fn record<T>(&self, result: &Result<T, RateLimited>) {
        match result {
            Ok(_) => self.admitted(),
            Err(refused) => {
                self.refused(*refused);
            }
        }
    }

    /// Reports an admitted request.
    #[inline]
    fn admitted(&self) {
        let Some(named) = self.named.get() else {
            return;
        };
        #[cfg(feature = "metrics")]
        named.admitted.increment(1);
        let _ = named;
    }

    /// Reports a refused request, handing the refusal back.
    #[cold]
    #[inline(never)]
    fn refused(&self, refused: RateLimited) -> RateLimited {
        let Some(named) = self.named.get() else {
            return refused;
        };
        #[cfg(feature = "metrics")]
        named.refused.increment(1);
        #[cfg(feature = "tracing")]
        tracing::debug!(
            limiter = %named.name,
            retry_after = ?refused.retry_after(),
            "rate limit refused a request"
        );
        let _ = named;
        refused
    }

    /// Names a distributed limiter: also registers its per-source counters.
    #[cfg(feature = "redis")]
    pub(crate) fn name_distributed(&self, name: &str) {
        self.name(name);
        #[cfg(feature = "metrics")]
        if let Some(named) = self.named.get() {
            named.sources.get_or_init(|| named.source_counters());
        }
    }

    /// Reports where a distributed limiter's check was answered.
    #[cfg(feature = "redis")]
    pub(crate) fn record_source(&self, source: &'static str) {
        let Some(named) = self.named.get() else {
            return;
        };
        #[cfg(feature = "metrics")]
        {
            let counters = named.sources.get_or_init(|| named.source_counters());
            if let Some(i) = SOURCES.iter().position(|s| *s == source) {
                counters[i].increment(1);
            }
        }
        let _ = (named, source);
    }

    /// Reports a check retried after a connection error (rare: registered on use).
    #[cfg(feature = "redis")]
    pub(crate) fn record_redis_retry(&self) {
        let Some(named) = self.named.get() else {
            return;
        };
        #[cfg(feature = "metrics")]
        metrics::counter!(
            "seawall_rate_limit_redis_retries_total",
            "limiter" => named.name.clone()
        )
        .increment(1);
        let _ = named;
    }
}
