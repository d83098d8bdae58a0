//! A keyed limiter with the extractor that picks each request's bucket: the keyed
//! [`Limit`], and the one place a missing key is resolved.

use std::fmt;
use std::hash::Hash;

use super::{KeyedCharge, KeyedRateLimiter};
use crate::clock::Clock;
use crate::rate_limit::error::log_shared_key;
use crate::rate_limit::{Decision, KeyExtractor, Limit, OnMissingKey};

/// A request's key, or what [`OnMissingKey`] says to do without one.
pub(crate) enum KeyOf<K> {
    /// The request's own key.
    Key(K),
    /// No key: limit it in the shared bucket (logged).
    Shared,
    /// No key: let it through, unlimited here.
    Unlimited,
    /// No key: refuse it (the layer logs and answers); `client`: the client's error
    /// ([`KeyExtractor::missing_key_is_clients`]).
    Missing { client: bool },
}

impl<K> KeyOf<K> {
    /// The refusal of a request without a key.
    pub(crate) fn missing<Ch>(client: bool) -> Decision<Ch> {
        if client {
            Decision::KeyNotSent
        } else {
            Decision::MissingKey
        }
    }
}

/// Takes `request`'s key with `extractor`, or applies `policy` (logging a shared-bucket
/// request under `layer`): every keyed layer, local or Redis, resolves keys here.
#[inline]
pub(crate) fn key_of<R, E: KeyExtractor<R>>(
    extractor: &E,
    request: &R,
    policy: OnMissingKey,
    layer: &str,
) -> KeyOf<E::Key> {
    match extractor.extract(request) {
        Some(key) => KeyOf::Key(key),
        None if extractor.key_is_ambiguous(request) => KeyOf::Missing { client: true },
        None => match policy {
            OnMissingKey::Reject => KeyOf::Missing {
                client: extractor.missing_key_is_clients(),
            },
            OnMissingKey::Shared => {
                log_shared_key(layer);
                KeyOf::Shared
            }
            OnMissingKey::Allow => KeyOf::Unlimited,
        },
    }
}

/// A [`KeyedRateLimiter`] with the [`KeyExtractor`] that picks each request's bucket: the
/// keyed [`Limit`]. A request without a key is handled per [`OnMissingKey`]: refused by
/// default ([`Decision::MissingKey`]), never silently unlimited.
pub struct PerKey<E, Key, C> {
    limiter: KeyedRateLimiter<Key, C>,
    extractor: E,
    on_missing_key: OnMissingKey,
}

impl<E, Key, C> PerKey<E, Key, C> {
    /// A bucket per key taken by `extractor`; a request without a key is refused (see
    /// [`OnMissingKey`] and [`on_missing_key`](Self::on_missing_key)).
    pub fn new(limiter: KeyedRateLimiter<Key, C>, extractor: E) -> Self {
        Self {
            limiter,
            extractor,
            on_missing_key: OnMissingKey::default(),
        }
    }

    /// What to do with a request whose key cannot be taken (default
    /// [`OnMissingKey::Reject`]).
    #[must_use]
    pub fn on_missing_key(mut self, policy: OnMissingKey) -> Self {
        self.on_missing_key = policy;
        self
    }

    pub(crate) fn set_on_missing_key(&mut self, policy: OnMissingKey) {
        self.on_missing_key = policy;
    }

    pub(crate) fn missing_key_policy(&self) -> OnMissingKey {
        self.on_missing_key
    }

    pub(crate) fn extractor(&self) -> &E {
        &self.extractor
    }

    /// The limiter (for its state: how many keys it holds, say).
    pub fn limiter(&self) -> &KeyedRateLimiter<Key, C> {
        &self.limiter
    }
}

impl<E: Clone, Key, C> Clone for PerKey<E, Key, C> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            extractor: self.extractor.clone(),
            on_missing_key: self.on_missing_key,
        }
    }
}

impl<E, Key, C> fmt::Debug for PerKey<E, Key, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerKey")
            .field("limiter", &self.limiter)
            .field("extractor", &std::any::type_name::<E>())
            .field("on_missing_key", &self.on_missing_key)
            .finish()
    }
}

impl<Request, E, Key, C> Limit<Request> for PerKey<E, Key, C>
where
    E: KeyExtractor<Request, Key = Key>,
    Key: Hash + Eq + Clone + Send + Sync + 'static,
    C: Clock,
{
    /// `None` for a request drawn from the shared bucket (nothing to refund).
    type Charge = Option<KeyedCharge<Key, C>>;
    type Check = Decision<Self::Charge>;

    #[inline(always)]
    fn check(&self, request: &Request, tokens: u32) -> Decision<Self::Charge> {
        match key_of(&self.extractor, request, self.on_missing_key, "keyed") {
            KeyOf::Key(key) => self.limiter.decide(key, tokens),
            KeyOf::Shared => match self.limiter.acquire_shared(tokens) {
                Ok(admitted) => Decision::Admitted(admitted, None),
                Err(refused) => Decision::Refused(refused),
            },
            KeyOf::Unlimited => Decision::Unlimited,
            KeyOf::Missing { client } => KeyOf::<Key>::missing(client),
        }
    }
}
