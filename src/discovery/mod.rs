//! Where a service's instances are: sources of instance snapshots, and the
//! [`tower::discover::Discover`] stream that turns them into per-instance services.
//!
//! Every source publishes [`Instances`] snapshots through an [`InstanceWatch`]:
//!
//! * [`InstanceWatch::fixed`]: a static list;
//! * [`Registry`]: an in-process registry, the embedded default when no Consul agent is
//!   configured;
//! * Consul (feature `consul`):
#![cfg_attr(feature = "consul", doc = "  [`crate::consul::ConsulWatch`],")]
#![cfg_attr(not(feature = "consul"), doc = "  `crate::consul::ConsulWatch`,")]
//!   through blocking queries.
//!
//! [`ServiceDiscover`] diffs the snapshots into inserts and removals keyed by
//! [`InstanceId`] (node and service ID), building each instance's service stack once, when
//! it appears. It plugs into tower's balancers and into [`crate::balance`].

mod discover;
mod instance;
mod registry;
mod watch;

pub use discover::{Endpoint, ServiceDiscover};
pub use instance::{Health, Instance, InstanceId};
pub use registry::{Registration, Registry};
pub use watch::{InstanceWatch, Instances, Publisher, SourceClosed, SourceStatus};
