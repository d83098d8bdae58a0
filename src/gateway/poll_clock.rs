//! The time as of the current poll of a connection's task: the clock read once a poll,
//! not once per deadline or duration.
//!
//! A proxied request wants the time about six times: the deadline of the next head, the
//! request's start, the route's deadline, the idle pool's expiry check, the request's
//! duration and the returned connection's expiry. Each read is a `clock_gettime`, about
//! 20 ns on a virtual machine's TSC, and most fall within one poll of the connection's
//! task. nginx reads the clock once a turn of its event loop for the same reason.
//!
//! A connection's task is polled through [`Polled`]: the first [`now`] of each poll reads
//! the clock, the later ones of that poll get the same reading. A reading is at most as
//! stale as the poll is long: microseconds for a request and its answer, a few
//! milliseconds for a poll that streams a large body (tokio's cooperative budget bounds
//! the reads and writes of one poll). A deadline made from it comes that much earlier; a
//! duration measured with it is off by as much. Anywhere else (another task, a test, the
//! gateway called as a `tower::Service`), [`now`] reads the clock.
//!
//! For the deadlines and durations of a request's start and end only, which are
//! seconds and milliseconds: not for a timer re-armed while a body streams, and never in
//! a loop that waits for the time to pass a deadline, since the reading does not move
//! within a poll.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

/// The reading of the current poll, if it is a connection's.
#[derive(Clone, Copy)]
enum Reading {
    /// Not in a [`Polled`] poll: every [`now`] reads the clock.
    Outside,
    /// In one, the clock not read yet.
    Unread,
    /// In one, the clock read.
    Read(Instant),
}

thread_local! {
    static READING: Cell<Reading> = const { Cell::new(Reading::Outside) };
}

/// The time: as of this poll within a [`Polled`] future, from the clock elsewhere.
/// Follows tokio's paused clock in tests, as `tokio::time::Instant::now` does.
pub(crate) fn now() -> Instant {
    READING
        .try_with(|reading| match reading.get() {
            Reading::Read(at) => at,
            Reading::Unread => {
                let at = Instant::now();
                reading.set(Reading::Read(at));
                at
            }
            Reading::Outside => Instant::now(),
        })
        .unwrap_or_else(|_| Instant::now())
}

pin_project_lite::pin_project! {
    /// `F`, each of its polls sharing one reading of the clock (see the module).
    pub(crate) struct Polled<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Polled<F> {
    /// `inner`, to be spawned as a connection's task.
    pub(crate) fn new(inner: F) -> Self {
        Self { inner }
    }
}

/// Puts back the reading found before a poll, even when the poll panics: a later task
/// on the thread must not be handed a stale time.
struct Restore(Reading);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = READING.try_with(|reading| reading.set(self.0));
    }
}

impl<F: Future> Future for Polled<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = READING
            .try_with(|reading| reading.replace(Reading::Unread))
            .unwrap_or(Reading::Outside);
        let _restore = Restore(before);
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `f` once, inside a `Polled`.
    fn poll_once<T>(f: impl FnMut() -> T) -> T {
        let mut f = Some(f);
        let mut polled = std::pin::pin!(Polled::new(std::future::poll_fn(move |_| {
            Poll::Ready((f.take().expect("polled once"))())
        })));
        match polled
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
        {
            Poll::Ready(out) => out,
            Poll::Pending => unreachable!("ready at once"),
        }
    }

    #[test]
    fn one_poll_reads_the_clock_once_and_the_next_poll_again() {
        let (a, b) = poll_once(|| {
            let a = now();
            // The clock moves on within the poll; the reading does not.
            while Instant::now() <= a {}
            (a, now())
        });
        assert_eq!(a, b);
        // The next poll reads the clock again.
        let c = poll_once(now);
        assert!(c > b);
        // Outside a `Polled` poll, every call reads the clock.
        let outside = now();
        while Instant::now() <= outside {}
        assert!(now() > outside);
    }

    #[tokio::test(start_paused = true)]
    async fn polls_follow_the_paused_clock() {
        let first = poll_once(now);
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(poll_once(now), first + Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_that_panics_leaves_no_reading_behind() {
        let panicked = std::panic::catch_unwind(|| {
            poll_once(|| {
                let _ = now();
                panic!("in the poll");
            })
        });
        assert!(panicked.is_err());
        let before = now();
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(now(), before + Duration::from_millis(5));
    }
}
