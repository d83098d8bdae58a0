//! Consul: service registration with health checks, and discovery of healthy instances
//! through blocking queries.

mod client;
mod config;
mod duration;
mod error;
mod parse;
mod registration;

pub use client::{
    AgentService, Consistency, ConsulClient, HealthQuery, HealthResponse, MAX_WAIT,
    parse_health_response,
};
pub use config::{ConsulConfig, ConsulConfigBuilder, DEFAULT_ADDRESS, DEFAULT_REQUEST_TIMEOUT};
pub use duration::{
    MAX_GO_DURATION, ParseDurationError, ParseDurationErrorKind, format_go_duration,
    parse_go_duration,
};
pub use error::{ConfigError, ConsulError, ErrorKind};
pub use parse::{SkipReason, SkippedEntry};
pub use registration::{
    Check, CheckStatus, MIN_DEREGISTER_CRITICAL_AFTER, ServiceRegistration,
    ServiceRegistrationBuilder,
};
