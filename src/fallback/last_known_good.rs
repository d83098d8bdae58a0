//! Serve the most recent successful response for the same key.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::{Ready, ready};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::policy::{Handler, Policy};

/// Default number of keys a [`LastKnownGood`] remembers.
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// Default bound on the bytes of the answers a
#[cfg_attr(feature = "http", doc = "[`LastKnownGood::http`]")]
#[cfg_attr(not(feature = "http"), doc = "`LastKnownGood::http`")]
/// cache (feature `http`) keeps (as its weigher counts them: each answer's header fields
/// and body): 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

struct Entry<R> {
    value: R,
    stored: Option<Instant>,
    seq: u64,
    /// What the weigher said of `value` when it was stored.
    weight: usize,
}

struct Store<K, R> {
    map: HashMap<K, Entry<R>>,
    /// Store order, for evicting the key stored longest ago; `seq` tells live entries from
    /// stale ones.
    order: VecDeque<(K, u64)>,
    seq: u64,
    /// The weights of the entries in `map`, summed.
    bytes: usize,
}

impl<K: Hash + Eq, R> Store<K, R> {
    fn remove(&mut self, key: &K) {
        if let Some(entry) = self.map.remove(key) {
            self.bytes -= entry.weight;
        }
    }
}

/// A cache fallback: remembers the last successful response per key (taken from the
/// request) and serves it when a later call for the same key fails.
///
/// "Successful" is every `Ok` unless [`keep_if`](Self::keep_if) says which: over an HTTP
/// client a `5xx` is an `Ok` too, and would replace the good answer it is meant to stand
/// in for.
#[cfg_attr(feature = "http", doc = "[`LastKnownGood::http`]")]
#[cfg_attr(not(feature = "http"), doc = "`LastKnownGood::http`")]
/// (feature `http`) keeps only `2xx` answers.
///
/// Memory is bounded: at most `max_entries` keys are kept (the key stored longest ago is
/// evicted first: a key whose answers keep coming stays), so request-chosen keys cannot
/// grow it without bound; with a [`weigh`](Self::weigh)er, at most
/// [`max_bytes`](Self::max_bytes) of answers too (a set number of large answers is no
/// bound:
#[cfg_attr(feature = "http", doc = "[`LastKnownGood::http`]")]
#[cfg_attr(not(feature = "http"), doc = "`LastKnownGood::http`")]
/// weighs its answers and keeps [`DEFAULT_MAX_BYTES`]).
/// With [`max_age`](Self::max_age), entries older than that are not served.
///
/// ```
/// use seawall::fallback::{FallbackLayer, LastKnownGood};
/// use std::time::Duration;
///
/// // Keyed by the request itself (here a product id); serve answers up to 5 minutes old.
/// let layer = FallbackLayer::new(
///     LastKnownGood::new(|id: &u32| *id)
///         .max_entries(1_000)
///         .max_age(Duration::from_secs(300)),
/// );
/// # let _: FallbackLayer<LastKnownGood<u32, String, _>> = layer;
/// ```
pub struct LastKnownGood<K, R, F> {
    key: Arc<F>,
    /// Which responses are remembered; all when `None`.
    keep: Option<Arc<Keep<R>>>,
    store: Arc<Mutex<Store<K, R>>>,
    max_entries: usize,
    max_age: Option<Duration>,
    /// Counts an answer's bytes for `max_bytes`; every answer weighs nothing when `None`.
    weigh: Option<Arc<Weigh<R>>>,
    max_bytes: usize,
    /// [`LastKnownGood::http`]'s rule on requests with credentials (their answers are
    /// kept only when marked shared); [`keep_if`](Self::keep_if) replaces it.
    credentials_rule: bool,
}

/// [`LastKnownGood::keep_if`]'s predicate.
type Keep<R> = dyn Fn(&R) -> bool + Send + Sync;

/// [`LastKnownGood::weigh`]'s function.
type Weigh<R> = dyn Fn(&R) -> usize + Send + Sync;

impl<K, R, F> Clone for LastKnownGood<K, R, F> {
    /// The clone shares the cache.
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            keep: self.keep.clone(),
            store: self.store.clone(),
            max_entries: self.max_entries,
            max_age: self.max_age,
            weigh: self.weigh.clone(),
            max_bytes: self.max_bytes,
            credentials_rule: self.credentials_rule,
        }
    }
}

impl<K, R, F> fmt::Debug for LastKnownGood<K, R, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LastKnownGood")
            .field("entries", &self.store.lock().map.len())
            .field("max_entries", &self.max_entries)
            .field("max_age", &self.max_age)
            .field("max_bytes", &self.weigh.as_ref().map(|_| self.max_bytes))
            .field("keep_if", &self.keep.is_some())
            .finish()
    }
}

impl<K, R, F> LastKnownGood<K, R, F> {
    /// Keys responses by `key(&request)`; keeps up to [`DEFAULT_MAX_ENTRIES`] keys, of any age.
    pub fn new(key: F) -> Self {
        Self {
            key: Arc::new(key),
            keep: None,
            store: Arc::new(Mutex::new(Store {
                map: HashMap::new(),
                order: VecDeque::new(),
                seq: 0,
                bytes: 0,
            })),
            max_entries: DEFAULT_MAX_ENTRIES,
            max_age: None,
            weigh: None,
            max_bytes: usize::MAX,
            credentials_rule: false,
        }
    }

    /// Keeps answers of at most `n` bytes in all, as [`weigh`](Self::weigh) counts them
    /// (the keys stored longest ago are evicted first to make room; an answer heavier
    /// than `n` alone is not kept, and the last one kept for its key stays, as with
    /// [`keep_if`](Self::keep_if)).
    #[cfg_attr(feature = "http", doc = "[`LastKnownGood::http`]")]
    #[cfg_attr(not(feature = "http"), doc = "`LastKnownGood::http`")]
    /// weighs answers by their header fields and body and keeps [`DEFAULT_MAX_BYTES`];
    /// [`new`](Self::new) has no weigher, so this bounds nothing until one is given.
    #[must_use]
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Counts an answer's bytes for [`max_bytes`](Self::max_bytes): with request-chosen
    /// keys, `max_entries` alone bounds the number of answers kept, not their size. The
    /// keys are not weighed: a key taken whole from a request (a path) is as long as the
    /// server in front lets a request line be, `max_entries` times.
    ///
    /// ```
    /// use seawall::fallback::LastKnownGood;
    ///
    /// // Up to 10 000 pages, and 16 MiB of them.
    /// let cache = LastKnownGood::new(|path: &String| path.clone())
    ///     .weigh(|page: &String| page.len())
    ///     .max_bytes(16 << 20);
    /// # let _: LastKnownGood<String, String, _> = cache;
    /// ```
    #[must_use]
    pub fn weigh<W>(mut self, weigh: W) -> Self
    where
        W: Fn(&R) -> usize + Send + Sync + 'static,
    {
        self.weigh = Some(Arc::new(weigh));
        self
    }

    /// Keeps at most `n` keys (at least 1).
    #[must_use]
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n.max(1);
        self
    }

    /// Serves only responses stored less than `age` ago.
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Remembers only the responses `keep` accepts; the others still go to the caller,
    /// and leave the last remembered one in place to be served when a later call fails.
    #[cfg_attr(feature = "http", doc = "It replaces [`LastKnownGood::http`]'s rules")]
    #[cfg_attr(
        not(feature = "http"),
        doc = "It replaces `LastKnownGood::http`'s rules"
    )]
    /// on which answers are shared, those on requests with credentials included.
    ///
    /// ```
    /// use seawall::fallback::LastKnownGood;
    ///
    /// // Quotes with a price only: an answer saying "no price yet" is not kept.
    /// let cache = LastKnownGood::new(|symbol: &String| symbol.clone())
    ///     .keep_if(|quote: &Option<u64>| quote.is_some());
    /// # let _: LastKnownGood<String, Option<u64>, _> = cache;
    /// ```
    #[must_use]
    pub fn keep_if<P>(mut self, keep: P) -> Self
    where
        P: Fn(&R) -> bool + Send + Sync + 'static,
    {
        self.keep = Some(Arc::new(keep));
        self.credentials_rule = false;
        self
    }

    /// Number of keys currently remembered.
    pub fn len(&self) -> usize {
        self.store.lock().map.len()
    }

    /// The bytes of the answers currently remembered, as the weigher counted them.
    pub fn bytes(&self) -> usize {
        self.store.lock().bytes
    }

    /// True when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
impl<K, B, F> LastKnownGood<K, http::Response<B>, F> {
    /// [`new`](Self::new) for an HTTP service: a cache of `GET` answers that is safe to
    /// serve to any caller asking for the same key.
    ///
    /// * Only `GET` requests are keyed: other methods neither store nor are served an
    ///   answer (a failed `POST` must fail, not be told the last call succeeded; a `HEAD`
    ///   answer has no body to stand in for a `GET`'s).
    /// * Only answers with a `2xx` status are kept, so an upstream's `503` (an `Ok` to the
    ///   client) never replaces the good answer a later failure is to be answered with.
    /// * A `206 Partial Content` (or any answer with `Content-Range`) is not kept: it
    ///   answers one request's `Range`, not a request for the whole.
    /// * Answers meant for one caller are not kept: those that set a cookie
    ///   (`Set-Cookie`), are marked `Cache-Control: private`, `no-store` or `no-cache`, or
    ///   carry `Vary` (they depend on request fields that `key` may not cover: the
    ///   caller's `Cookie`, `Authorization`, `Accept-Encoding`); and answers to requests
    ///   with credentials (`Authorization` or `Cookie`), unless marked shared
    ///   (`Cache-Control: public`, `s-maxage` or `must-revalidate`, as RFC 9111 §3.5 has
    ///   it for `Authorization`; Varnish passes both by default): an API's `GET /me` is
    ///   seldom marked `private`, and one caller's answer would be served to the next.
    ///   Such requests are still served a kept answer when their call fails. A key that
    ///   covers the caller can take such answers with [`keep_if`](Self::keep_if), which
    ///   replaces these rules.
    /// * At most [`DEFAULT_MAX_BYTES`] of answers are kept (each weighed by its header
    ///   fields and its body's size hint: its length, for the buffered bodies a cached
    ///   answer has); [`max_bytes`](Self::max_bytes) changes the bound.
    ///
    /// ```
    /// use seawall::fallback::{FallbackLayer, LastKnownGood};
    ///
    /// // Product pages by path: the last shareable 2xx page of each is served when the
    /// // upstream fails a GET for it.
    /// let layer = FallbackLayer::new(LastKnownGood::http(|req: &http::Request<String>| {
    ///     req.uri().path().to_owned()
    /// }));
    /// # let _: FallbackLayer<LastKnownGood<String, http::Response<String>, _>> = layer;
    /// ```
    pub fn http(key: F) -> LastKnownGood<K, http::Response<B>, HttpKey<F>>
    where
        B: http_body::Body,
    {
        let mut cache = LastKnownGood::new(HttpKey(key))
            .keep_if(|response: &http::Response<B>| shareable(response))
            .weigh(|response: &http::Response<B>| weigh_response(response))
            .max_bytes(DEFAULT_MAX_BYTES);
        cache.credentials_rule = true;
        cache
    }
}

/// The bytes [`LastKnownGood::http`] counts for an answer: its header fields' names and
/// values, and its body by its size hint (its exact length for a buffered body; the most
/// it says it may have otherwise, or the least when it sets no upper bound).
#[cfg(feature = "http")]
fn weigh_response<B: http_body::Body>(response: &http::Response<B>) -> usize {
    let fields: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let hint = response.body().size_hint();
    let body = hint.upper().unwrap_or(hint.lower());
    fields.saturating_add(usize::try_from(body).unwrap_or(usize::MAX))
}

/// The key of [`LastKnownGood::http`]: `F`'s, for `GET` requests only.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Clone, Copy, Debug)]
pub struct HttpKey<F>(F);

/// Whether an answer may be kept by [`LastKnownGood::http`] and served to any caller.
#[cfg(feature = "http")]
fn shareable<B>(response: &http::Response<B>) -> bool {
    use http::header;
    let headers = response.headers();
    response.status().is_success()
        && response.status() != http::StatusCode::PARTIAL_CONTENT
        && !headers.contains_key(header::CONTENT_RANGE)
        && !headers.contains_key(header::SET_COOKIE)
        && !headers.contains_key(header::VARY)
        && !cache_control_has(response, &["private", "no-store", "no-cache"])
}

/// Whether an answer to a request with credentials says it may be shared anyway
/// (RFC 9111 §3.5).
#[cfg(feature = "http")]
fn marked_shared<B>(response: &http::Response<B>) -> bool {
    cache_control_has(response, &["public", "s-maxage", "must-revalidate"])
}

/// Whether the answer's `Cache-Control` has one of `directives` (by name, any case).
#[cfg(feature = "http")]
fn cache_control_has<B>(response: &http::Response<B>, directives: &[&str]) -> bool {
    response
        .headers()
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b','))
        .any(|directive| {
            let name = directive.trim_ascii();
            let name = name.split(|b| *b == b'=').next().unwrap_or_default();
            let name = name.trim_ascii();
            directives
                .iter()
                .any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
        })
}

#[cfg(feature = "http")]
impl<ReqB, K, B, E, F> Policy<http::Request<ReqB>, http::Response<B>, E>
    for LastKnownGood<K, http::Response<B>, HttpKey<F>>
where
    F: Fn(&http::Request<ReqB>) -> K,
    K: Hash + Eq + Clone,
    B: Clone,
{
    type Handler = LastKnownGoodHandler<K, http::Response<B>, HttpKey<F>>;

    fn handler(&self, request: &http::Request<ReqB>) -> Self::Handler {
        let headers = request.headers();
        let credentials = self.credentials_rule
            && (headers.contains_key(http::header::AUTHORIZATION)
                || headers.contains_key(http::header::COOKIE));
        LastKnownGoodHandler {
            key: (request.method() == http::Method::GET).then(|| (self.key.0)(request)),
            cache: self.clone(),
            kept_only_if: credentials
                .then_some(marked_shared::<B> as fn(&http::Response<B>) -> bool),
        }
    }
}

impl<K: Hash + Eq + Clone, R: Clone, F> LastKnownGood<K, R, F> {
    fn put(&self, key: K, value: R) {
        let weight = self.weigh.as_ref().map_or(0, |weigh| weigh(&value));
        if weight > self.max_bytes {
            // Alone over the bound: not kept (the key's last answer, if any, stays).
            return;
        }
        let stored = self.max_age.map(|_| Instant::now());
        let mut guard = self.store.lock();
        let store = &mut *guard;
        store.seq += 1;
        let seq = store.seq;
        // Stored again: the most recent key now, so that eviction takes the keys stored
        // longest ago (its earlier place in `order` is left stale).
        store.remove(&key);
        while store.map.len() >= self.max_entries || store.bytes > self.max_bytes - weight {
            let Some((old, old_seq)) = store.order.pop_front() else {
                break;
            };
            if store.map.get(&old).is_some_and(|e| e.seq == old_seq) {
                store.remove(&old);
            }
        }
        store.order.push_back((key.clone(), seq));
        store.map.insert(
            key,
            Entry {
                value,
                stored,
                seq,
                weight,
            },
        );
        store.bytes += weight;
        // Compacted once stale places outnumber the live keys (and a few): bounded by the
        // keys kept, not by `max_entries`, which may be `usize::MAX` (`max_bytes` alone
        // bounding the cache), where a key stored again and again grew it for ever. Each
        // compaction drops more stale places than it keeps: amortised O(1) a store.
        if store.order.len() > store.map.len().saturating_mul(2).saturating_add(16) {
            let map = &store.map;
            store
                .order
                .retain(|(k, s)| map.get(k).is_some_and(|e| e.seq == *s));
        }
    }

    fn get(&self, key: &K) -> Option<R> {
        let mut store = self.store.lock();
        let fresh = match (store.map.get(key), self.max_age) {
            (None, _) => return None,
            (Some(e), Some(age)) => e.stored.is_some_and(|t| t.elapsed() < age),
            (Some(_), None) => true,
        };
        if fresh {
            store.map.get(key).map(|e| e.value.clone())
        } else {
            store.remove(key);
            None
        }
    }
}

impl<Req, K, R, E, F> Policy<Req, R, E> for LastKnownGood<K, R, F>
where
    F: Fn(&Req) -> K,
    K: Hash + Eq + Clone,
    R: Clone,
{
    type Handler = LastKnownGoodHandler<K, R, F>;

    fn handler(&self, request: &Req) -> Self::Handler {
        LastKnownGoodHandler {
            key: Some((self.key)(request)),
            cache: self.clone(),
            kept_only_if: None,
        }
    }
}

/// Per-call state of [`LastKnownGood`].
pub struct LastKnownGoodHandler<K, R, F> {
    /// `None`: a request the cache does not take (not a `GET`, for
    /// [`LastKnownGood::http`]).
    key: Option<K>,
    cache: LastKnownGood<K, R, F>,
    /// A further condition on the answer to this request being kept (for a request
    /// with credentials, [`LastKnownGood::http`]'s).
    kept_only_if: Option<fn(&R) -> bool>,
}

impl<K, R, F> fmt::Debug for LastKnownGoodHandler<K, R, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LastKnownGoodHandler")
            .finish_non_exhaustive()
    }
}

impl<K, R, E, F> Handler<R, E> for LastKnownGoodHandler<K, R, F>
where
    K: Hash + Eq + Clone,
    R: Clone,
{
    type Future = Ready<Result<R, E>>;

    fn on_success(&mut self, response: &R) {
        let Some(key) = &self.key else { return };
        if self.kept_only_if.is_none_or(|kept| kept(response))
            && self.cache.keep.as_ref().is_none_or(|keep| keep(response))
        {
            self.cache.put(key.clone(), response.clone());
        }
    }

    fn on_error(self, error: E) -> Self::Future {
        let Some(key) = &self.key else {
            return ready(Err(error));
        };
        ready(self.cache.get(key).ok_or(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no `max_bytes` (`usize::MAX`), weights summing past `usize::MAX` evicted
    /// nothing (`bytes + weight`, saturated, was never over the bound) and overflowed the
    /// count: a panic in a debug build, the entry stored and not counted; a wrapped count
    /// in release. The bound is now checked without the sum.
    #[test]
    fn weights_summing_past_usize_max_are_evicted_not_overflowed() {
        let cache = LastKnownGood::new(|id: &u32| *id).weigh(|_: &String| usize::MAX / 2 + 1);
        cache.put(1, "a".to_owned());
        cache.put(2, "b".to_owned());
        assert_eq!((cache.len(), cache.bytes()), (1, usize::MAX / 2 + 1));
    }
}
