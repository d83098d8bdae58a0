//! One token bucket shared by every clone: [`RateLimiter`] (the lock-free GCRA bucket)
//! and its tower layer, [`RateLimitLayer`], in reject or wait [`Mode`].

pub(crate) mod bucket;
mod layer;
mod service;

pub use bucket::{Admitted, Charge, RateLimiter, Reservation, Taken};
pub use layer::{Mode, RateLimitLayer};
pub use service::RateLimit;
