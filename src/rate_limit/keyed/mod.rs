//! A bucket per key: [`KeyedRateLimiter`] (a bounded, sharded table of buckets), its
//! keys ([`BoundedKey`]), the keyed [`Limit`](super::Limit) ([`PerKey`]: the limiter with
//! the extractor that picks each request's bucket) and its tower layers, [`KeyedRateLimitLayer`] (reject) and
//! [`KeyedWaitLayer`] (wait).

mod bounded_key;
mod layer;
mod limiter;
mod per_key;

pub use bounded_key::{BoundedKey, INLINE_KEY_BYTES};
pub use layer::{KeyedRateLimit, KeyedRateLimitLayer, KeyedRateLimitWait, KeyedWaitLayer};
pub use limiter::{DEFAULT_MAX_KEYS, KeyedCharge, KeyedRateLimiter};
pub use per_key::PerKey;
pub(crate) use per_key::{KeyOf, key_of};
