//! Two limits checked in one HTTP layer (the gateway route's global and per-client
//! limits): the answers of two stacked [`HttpRateLimit`](super::HttpRateLimit) layers,
//! with one `RateLimit-Policy` and one `RateLimit` field listing both policies where the
//! two layers would write a field line each.
//!
//! A response then takes two header insertions and one formatted state where two layers
//! take four and two, and a request moves one layer of futures, not two. RFC 9110's list
//! rule makes `a, b` in one field line the same field as `a` and `b` in two.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use tower::Service;

use super::layer::{HeaderSettings, Headers, Refusal, ResponseFuture, ceil_secs};
use crate::problem::ProblemBody;
use crate::rate_limit::{Admitted, Decision, Limit, Refund};

/// The headers of a [`HttpRateLimitPair`]: each limit's settings (for its refusals) and
/// the two policies as one `RateLimit-Policy` value, made once for the quotas last seen.
pub(crate) struct PairedHeaders {
    outer: HeaderSettings,
    inner: HeaderSettings,
    policy: OnceLock<(Quotas, HeaderValue)>,
    /// `"inner";r=` and `, "outer";r=`: the state's text around its figures.
    state_prefixes: [Box<[u8]>; 2],
    /// The pair's slot key among the thread's last state values (`state_cache`).
    id: u64,
    /// The slot key of the pair's policy for quotas other than the first.
    policy_id: u64,
}

/// The two limits' `(limit, window)`, inner first: what the cached policy was made for.
type Quotas = [(u32, Duration); 2];

impl fmt::Debug for PairedHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairedHeaders")
            .field("outer", &self.outer)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl PairedHeaders {
    /// Policies named `outer` and `inner`; `hidden` sends none of their headers but
    /// `Retry-After` (see [`HttpRateLimitLayer::hide_headers`](super::HttpRateLimitLayer::hide_headers)).
    pub(crate) fn new(outer: &str, inner: &str, hidden: bool) -> Self {
        let settings = |name: &str| HeaderSettings {
            name: super::layer::PolicyName::new(name),
            style: super::layer::HeaderStyle {
                legacy: false,
                hidden,
            },
            body: None,
        };
        let (outer, inner) = (settings(outer), settings(inner));
        let state_prefixes = [
            format!("\"{}\";r=", inner.name.as_str()),
            format!(", \"{}\";r=", outer.name.as_str()),
        ]
        .map(|prefix| prefix.into_bytes().into_boxed_slice());
        Self {
            outer,
            inner,
            policy: OnceLock::new(),
            state_prefixes,
            id: super::state_cache::new_id(),
            policy_id: super::state_cache::new_id(),
        }
    }

    /// The headers of a request admitted by both limits, or by one of them (the other
    /// not applying to it): inner first, as stacked layers list them.
    fn admitted(&self, outer: Option<&Admitted>, inner: Option<&Admitted>) -> Option<Headers> {
        let (outer, inner) = match (outer, inner) {
            (Some(outer), Some(inner)) => (outer, inner),
            (Some(only), None) => return self.outer.admitted(*only),
            (None, Some(only)) => return self.inner.admitted(*only),
            (None, None) => return None,
        };
        if self.inner.style.hidden {
            return None;
        }
        Some(Headers::draft(
            self.policy(outer, inner),
            self.state(outer, inner),
        ))
    }

    /// `answer` (the inner limit's) with the outer limit's headers, if it admitted the
    /// request.
    #[cold]
    #[inline(never)]
    fn outer_added<B>(&self, mut answer: Response<B>, outer: Option<Admitted>) -> Response<B> {
        if let Some(h) = outer.and_then(|admitted| self.outer.admitted(admitted)) {
            h.apply(answer.headers_mut());
        }
        answer
    }

    /// `"inner";r=…;t=…, "outer";r=…;t=…`, written into the thread's header chunk as a
    /// single limit's state is: the value this thread made last for the same figures, if
    /// it did (see `state_cache`).
    fn state(&self, outer: &Admitted, inner: &Admitted) -> HeaderValue {
        let figures = [
            u64::from(inner.remaining),
            ceil_secs(inner.full_in),
            u64::from(outer.remaining),
            ceil_secs(outer.full_in),
        ];
        super::state_cache::value(self.id, figures, || self.make_state(figures))
    }

    fn make_state(&self, [inner_r, inner_t, outer_r, outer_t]: [u64; 4]) -> HeaderValue {
        use crate::util::decimal;
        let mut digits = [[0u8; 20]; 4];
        let [d0, d1, d2, d3] = &mut digits;
        let parts: [&[u8]; 8] = [
            &self.state_prefixes[0],
            decimal(inner_r, d0),
            b";t=",
            decimal(inner_t, d1),
            &self.state_prefixes[1],
            decimal(outer_r, d2),
            b";t=",
            decimal(outer_t, d3),
        ];
        // Built from sanitized names and digits: always valid.
        crate::header_arena::value(&parts).unwrap_or(HeaderValue::from_static("invalid"))
    }

    /// `"inner";q=…;w=…, "outer";q=…;w=…`: the first quotas' value kept for every
    /// thread, later ones by each thread while they stay the same (as a single
    /// policy's).
    fn policy(&self, outer: &Admitted, inner: &Admitted) -> HeaderValue {
        let quotas = [(inner.limit, inner.window), (outer.limit, outer.window)];
        if let Some((cached, value)) = self.policy.get() {
            if *cached == quotas {
                return value.clone();
            }
            let [a, b] = super::state_cache::quota(inner.limit, inner.window);
            let [c, d] = super::state_cache::quota(outer.limit, outer.window);
            return super::state_cache::value(self.policy_id, [a, b, c, d], || {
                self.make_policy(outer, inner)
            });
        }
        let value = self.make_policy(outer, inner);
        let _ = self.policy.set((quotas, value.clone()));
        value
    }

    /// `"inner";q=…;w=…, "outer";q=…;w=…`, made.
    fn make_policy(&self, outer: &Admitted, inner: &Admitted) -> HeaderValue {
        let inner = self.inner.name.policy(inner.limit, inner.window);
        let outer = self.outer.name.policy(outer.limit, outer.window);
        let joined = [inner.as_bytes(), b", ", outer.as_bytes()].concat();
        // Two valid values and a comma: valid; fall back to the inner one rather than
        // panic.
        HeaderValue::from_bytes(&joined).unwrap_or(inner)
    }
}

/// Two limits in one layer: `outer` is checked first and `inner` only for what `outer`
/// admits, and the request is charged only when both admit it, as two
/// [`HttpRateLimit`](super::HttpRateLimit) layers stacked do. Every answer is theirs:
/// the same statuses, [`Refused`](super::Refused) marks, refunds and `Retry-After`, and
/// the same policies, listed in one field line each on an admitted request.
#[derive(Clone)]
pub(crate) struct HttpRateLimitPair<S, O, I> {
    service: S,
    outer: O,
    inner: I,
    headers: Arc<PairedHeaders>,
}

impl<S, O, I> HttpRateLimitPair<S, O, I> {
    /// `service` under `outer`, then `inner`.
    pub(crate) fn new(service: S, outer: O, inner: I, headers: PairedHeaders) -> Self {
        Self {
            service,
            outer,
            inner,
            headers: Arc::new(headers),
        }
    }

    /// The inner limit, mutably (to hand it per-request state, such as the client).
    pub(crate) fn inner_limit_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// The service under the limits.
    pub(crate) fn get_ref(&self) -> &S {
        &self.service
    }

    /// The service under the limits, mutably.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.service
    }
}

impl<S: fmt::Debug, O, I> fmt::Debug for HttpRateLimitPair<S, O, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpRateLimitPair")
            .field("service", &self.service)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl<S, O, I, ReqB, ResB> Service<Request<ReqB>> for HttpRateLimitPair<S, O, I>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    O: Limit<Request<ReqB>, Check = Decision<<O as Limit<Request<ReqB>>>::Charge>>,
    I: Limit<Request<ReqB>, Check = Decision<<I as Limit<Request<ReqB>>>::Charge>>,
    ResB: ProblemBody,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, (Option<O::Charge>, Option<I::Charge>)>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // The figures and the charge kept apart, refusals answered out of line
        // (`HeaderSettings::decide`).
        let headers = &*self.headers;
        let (outer, outer_charge) = match HeaderSettings::decide(self.outer.check(&request, 1)) {
            Ok(Some((admitted, charge))) => (Some(admitted), Some(charge)),
            Ok(None) => (None, None),
            Err(refusal) => return ResponseFuture::refused(headers.outer.refuse(refusal)),
        };
        let (inner, inner_charge) = match HeaderSettings::decide(self.inner.check(&request, 1)) {
            Ok(Some((admitted, charge))) => (Some(admitted), Some(charge)),
            Ok(None) => (None, None),
            Err(refusal) => {
                // As the outer of two stacked layers answers: its token back when the
                // inner limit refused or took no key (not for a store's `503`), its
                // headers added.
                if let (Refusal::Limited(_) | Refusal::MissingKey { .. }, Some(charge)) =
                    (&refusal, outer_charge)
                {
                    charge.refund();
                }
                let answer = headers.inner.refuse(refusal);
                return ResponseFuture::refused(headers.outer_added(answer, outer));
            }
        };
        if outer_charge.is_none() && inner_charge.is_none() {
            // Neither limit applies to this request: nothing to add or hand back.
            return ResponseFuture::unlimited(self.service.call(request));
        }
        let added = headers.admitted(outer.as_ref(), inner.as_ref());
        // Handed back if a limit further in refuses: only what was taken.
        let charges = (outer_charge, inner_charge);
        ResponseFuture::called(self.service.call(request), added, charges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(remaining: u32, full_in_ms: u64, limit: u32, window_s: u64) -> Admitted {
        Admitted {
            remaining,
            full_in: Duration::from_millis(full_in_ms),
            limit,
            window: Duration::from_secs(window_s),
        }
    }

    fn values(headers: Option<Headers>) -> Vec<(String, String)> {
        let mut map = http::HeaderMap::new();
        if let Some(h) = headers {
            h.apply(&mut map);
        }
        map.iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn both_policies_are_listed_in_one_field_each_inner_first() {
        let pair = PairedHeaders::new("global", "per-client", false);
        let (outer, inner) = (admitted(99, 10, 100, 1), admitted(4, 1500, 5, 5));
        let expected = vec![
            (
                "ratelimit-policy".to_owned(),
                "\"per-client\";q=5;w=5, \"global\";q=100;w=1".to_owned(),
            ),
            (
                "ratelimit".to_owned(),
                "\"per-client\";r=4;t=2, \"global\";r=99;t=1".to_owned(),
            ),
        ];
        assert_eq!(values(pair.admitted(Some(&outer), Some(&inner))), expected);
        // The cached policy is used again, and made again for a changed quota.
        assert_eq!(values(pair.admitted(Some(&outer), Some(&inner))), expected);
        let changed = admitted(0, 0, 7, 7);
        assert_eq!(
            values(pair.admitted(Some(&outer), Some(&changed)))[0].1,
            "\"per-client\";q=7;w=7, \"global\";q=100;w=1"
        );
        // A changed quota is kept by the thread, not made for every response.
        let policy = |inner: &Admitted| pair.policy(&outer, inner);
        assert_eq!(
            policy(&changed).as_bytes().as_ptr(),
            policy(&changed).as_bytes().as_ptr()
        );
        assert_eq!(policy(&inner), expected[0].1.as_str());
    }

    #[test]
    fn one_limit_alone_is_listed_alone_and_hidden_limits_not_at_all() {
        let pair = PairedHeaders::new("global", "per-client", false);
        let only = admitted(2, 1000, 3, 3);
        assert_eq!(
            values(pair.admitted(None, Some(&only))),
            [
                ("ratelimit-policy".into(), "\"per-client\";q=3;w=3".into()),
                ("ratelimit".into(), "\"per-client\";r=2;t=1".into())
            ]
        );
        assert_eq!(
            values(pair.admitted(Some(&only), None))[1].1,
            "\"global\";r=2;t=1"
        );
        assert!(pair.admitted(None, None).is_none());
        let hidden = PairedHeaders::new("global", "per-client", true);
        assert!(hidden.admitted(Some(&only), Some(&only)).is_none());
        assert!(hidden.admitted(None, Some(&only)).is_none());
    }
}
