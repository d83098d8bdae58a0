//! Ejection events through `tracing` and `metrics`, when those features are on.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `seawall_balance_ejections_total` | counter | `balancer`, `endpoint` |
//! | `seawall_balance_readmissions_total` | counter | `balancer`, `endpoint` |
//! | `seawall_balance_ejections_suppressed_total` | counter | `balancer` |
//! | `seawall_balance_endpoints` | gauge | `balancer` |

#![allow(unused_variables)]

use std::time::Duration;

/// `series`: whether the endpoint-labelled counter is kept (see
/// [`BalanceBuilder::endpoint_metrics`](super::BalanceBuilder::endpoint_metrics)).
pub(crate) fn ejected(balancer: &str, endpoint: &str, duration: Duration, series: bool) {
    #[cfg(feature = "tracing")]
    tracing::warn!(
        target: "seawall::balance",
        balancer,
        endpoint,
        ejected_for_ms = duration.as_millis() as u64,
        "endpoint ejected"
    );
    #[cfg(feature = "metrics")]
    if !series {
        return;
    }
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "seawall_balance_ejections_total",
        "balancer" => balancer.to_owned(),
        "endpoint" => endpoint.to_owned()
    )
    .increment(1);
}

pub(crate) fn readmitted(balancer: &str, endpoint: &str, series: bool) {
    #[cfg(feature = "tracing")]
    tracing::info!(target: "seawall::balance", balancer, endpoint, "endpoint readmitted");
    #[cfg(feature = "metrics")]
    if !series {
        return;
    }
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "seawall_balance_readmissions_total",
        "balancer" => balancer.to_owned(),
        "endpoint" => endpoint.to_owned()
    )
    .increment(1);
}

pub(crate) fn suppressed(balancer: &str, endpoint: &str) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "seawall::balance",
        balancer,
        endpoint,
        "ejection suppressed: the maximum share of endpoints is already ejected"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "seawall_balance_ejections_suppressed_total",
        "balancer" => balancer.to_owned()
    )
    .increment(1);
}

pub(crate) fn endpoints(balancer: &str, count: usize) {
    #[cfg(feature = "metrics")]
    metrics::gauge!("seawall_balance_endpoints", "balancer" => balancer.to_owned())
        .set(count as f64);
}
