//! A bucket per key: [`KeyedRateLimiter`] (a bounded, sharded table of buckets), its
//! keys ([`BoundedKey`]) and its tower layers, [`KeyedRateLimitLayer`] (reject) and
//! [`KeyedWaitLayer`] (wait).

mod bounded_key;
mod layer;
mod limiter;

pub use bounded_key::{BoundedKey, INLINE_KEY_BYTES};
pub use layer::{
    KeyedRateLimit, KeyedRateLimitLayer, KeyedRateLimitWait, KeyedWaitLayer, WaitFuture,
};
pub use limiter::{DEFAULT_MAX_KEYS, KeyedCharge, KeyedRateLimiter};
