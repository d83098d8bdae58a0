use super::classify::{Classify, Outcome};

/// The HTTP classifier (feature `http`): 5xx responses, transport errors and timeouts are
/// failures; everything else, 4xx included, is a success.
///
/// 4xx statuses that do signal an unhealthy upstream can be added with
/// [`fail_on`](Self::fail_on), and 5xx statuses that do not (such as 501) can be left out
/// with [`ignore`](Self::ignore).
///
/// ```
/// use http::{Response, StatusCode};
/// use seawall::circuit_breaker::{Classify, HttpClassifier, Outcome};
///
/// let classify = HttpClassifier::new().fail_on(StatusCode::TOO_MANY_REQUESTS);
/// let resp = |s: StatusCode| Response::builder().status(s).body(()).unwrap();
/// let c = |r: &Response<()>| Classify::<_, std::io::Error>::classify(&classify, Ok(r));
/// assert_eq!(c(&resp(StatusCode::OK)), Outcome::Success);
/// assert_eq!(c(&resp(StatusCode::NOT_FOUND)), Outcome::Success);
/// assert_eq!(c(&resp(StatusCode::TOO_MANY_REQUESTS)), Outcome::Failure);
/// assert_eq!(c(&resp(StatusCode::BAD_GATEWAY)), Outcome::Failure);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HttpClassifier {
    /// Bit `s - 400` set: status `s` (4xx) is a failure.
    failing_4xx: u128,
    /// Bit `s - 500` set: status `s` (5xx) is ignored.
    ignored_5xx: u128,
}

impl HttpClassifier {
    /// 5xx and errors are failures.
    pub const fn new() -> Self {
        Self {
            failing_4xx: 0,
            ignored_5xx: 0,
        }
    }

    /// Also counts this 4xx status as a failure (for example 429 from an overloaded
    /// upstream). Statuses outside 400–499 are left as they were.
    #[must_use]
    pub const fn fail_on(mut self, status: http::StatusCode) -> Self {
        let s = status.as_u16();
        if s >= 400 && s < 500 {
            self.failing_4xx |= 1 << (s - 400);
        }
        self
    }

    /// Leaves this 5xx status out of the window (for example 501 Not Implemented).
    /// Statuses outside 500–599 are left as they were.
    #[must_use]
    pub const fn ignore(mut self, status: http::StatusCode) -> Self {
        let s = status.as_u16();
        if s >= 500 && s < 600 {
            self.ignored_5xx |= 1 << (s - 500);
        }
        self
    }

    /// The outcome for a response status. 600 to 999, which `http` parses but are no
    /// status codes, are failures (RFC 9110 §15: a client treats one as a 5xx).
    pub const fn classify_status(&self, status: http::StatusCode) -> Outcome {
        let s = status.as_u16();
        if s >= 600 {
            Outcome::Failure
        } else if s >= 500 {
            if self.ignored_5xx & (1 << (s - 500)) != 0 {
                Outcome::Ignored
            } else {
                Outcome::Failure
            }
        } else if s >= 400 && s < 500 && self.failing_4xx & (1 << (s - 400)) != 0 {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }
}

impl<B, E: 'static> Classify<http::Response<B>, E> for HttpClassifier {
    /// The status's outcome, but for the answers a seawall rate limit inside the breaker
    /// made itself (marked [`Refused`](crate::rate_limit::http::Refused) or
    /// [`Undecided`](crate::rate_limit::http::Undecided): a `429`, or the `400`, `500` or
    /// `503` of a missing key or store), which are [`Outcome::Ignored`]: a client's own
    /// refusals are not the upstream's failures (one client's burst opened the breaker
    /// for everybody with `fail_on(429)`). The same for an error a limit refused with
    /// ([`refused_locally`](crate::circuit_breaker::refused_locally)); any other error is
    /// a failure.
    #[inline]
    fn classify(&self, result: Result<&http::Response<B>, &E>) -> Outcome {
        match result {
            // Every answer a rate limit makes is a 4xx or a 5xx: only those are looked up.
            // Ignored whatever the status would count as: a local `429` counted as the
            // upstream's success let a half-open probe that never reached the upstream
            // close the breaker.
            Ok(response)
                if response.status().as_u16() >= 400 && answered_by_a_rate_limit(response) =>
            {
                Outcome::Ignored
            }
            Ok(response) => self.classify_status(response.status()),
            // A limit's refusal as an error (the tower layers'): ignored as well.
            Err(error) => super::classify::error_outcome(error),
        }
    }
}

/// Whether a seawall rate limit answered `response` itself (looked up only for a
/// response with an error status).
#[cold]
pub(crate) fn answered_by_a_rate_limit<B>(response: &http::Response<B>) -> bool {
    let extensions = response.extensions();
    extensions
        .get::<crate::rate_limit::http::Refused>()
        .is_some()
        || extensions
            .get::<crate::rate_limit::http::Undecided>()
            .is_some()
}
