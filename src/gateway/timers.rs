//! Timers reused from one request to the next of a client connection.
//!
//! Every request of a keep-alive connection needs the route's deadline until the
//! upstream's response head. A new `tokio::time::Sleep` for each is inserted into the
//! runtime's timer wheel and removed again, under the time driver's lock, and an
//! insertion earlier than the driver's next planned wake-up also wakes the driver (a
//! write to its eventfd: a system call, and one more `epoll_wait` turn), which under load
//! happened on up to half of the requests.
//!
//! [`ConnTimers`] keeps the sleeps a connection's requests are done with and hands them
//! out again. A connection's deadlines only ever move later (the same duration from a
//! later now), so the common case is a spare armed for an earlier request's deadline,
//! before this one's: it is left armed there (not reset, which costs a hundred
//! instructions a request even on tokio's path without the lock), and moved to this
//! request's deadline only if it fires first (once in a route timeout, not once a
//! request). A deadline earlier than where the spare is armed goes through tokio's
//! ordinary re-registration. Deadlines are exact either way: only where the timer sits
//! in the wheel until then changes. (The HTTP/1 server's head timer is one sleep per
//! connection of its own, kept the same way: see `h1_server`.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Sleeps kept per connection: one is in use at a time (a connection serves one request
/// at a time), the second covers a request finishing while the next starts.
const SPARES: usize = 2;

/// The sleeps one client connection's requests reuse for their route deadlines
/// ([`ConnTimers::deadline`]). Cloning shares them. Made on the connection's task, whose
/// runtime's timers these are.
#[derive(Clone, Default)]
pub(crate) struct ConnTimers(Arc<parking_lot::Mutex<Vec<Pin<Box<Sleep>>>>>);

impl std::fmt::Debug for ConnTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTimers").finish_non_exhaustive()
    }
}

impl ConnTimers {
    /// A sleep until `deadline` for the route's deadline.
    pub(crate) fn deadline(&self, deadline: Instant) -> Reused {
        let spare = self.0.lock().pop();
        let sleep = match spare {
            Some(mut sleep) => {
                // Armed no later than `deadline`: left there (see the module docs).
                if sleep.deadline() > deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Reused {
            sleep: Some(sleep),
            deadline,
            home: self.clone(),
        }
    }
}

/// A sleep of a [`ConnTimers`], given back to it when dropped.
pub(crate) struct Reused {
    /// Armed at `deadline` or before it.
    sleep: Option<Pin<Box<Sleep>>>,
    /// When this future is ready.
    deadline: Instant,
    home: ConnTimers,
}

impl Future for Reused {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(sleep) = &mut this.sleep else {
            return Poll::Ready(());
        };
        loop {
            std::task::ready!(sleep.as_mut().poll(cx));
            if sleep.deadline() >= this.deadline {
                return Poll::Ready(());
            }
            // Fired at an earlier request's deadline: armed for this one's now.
            sleep.as_mut().reset(this.deadline);
        }
    }
}

impl Drop for Reused {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            let mut spares = self.home.0.lock();
            if spares.len() < SPARES {
                spares.push(sleep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reused_sleep_keeps_its_new_deadline() {
        let timers = ConnTimers::default();
        let start = Instant::now();
        drop(timers.deadline(start + Duration::from_millis(10)));
        // The same sleep, moved later.
        let sleep = timers.deadline(start + Duration::from_millis(50));
        sleep.await;
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        // Moved earlier than the spare's last deadline: still exact.
        let sleep = timers.deadline(Instant::now() + Duration::from_millis(5));
        let at = Instant::now();
        sleep.await;
        assert_eq!(at.elapsed(), Duration::from_millis(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_spare_armed_earlier_is_not_ready_before_the_new_deadline() {
        let timers = ConnTimers::default();
        let start = Instant::now();
        // Polled, so armed in the wheel at 10 ms, then given back unfired.
        let mut first = Box::pin(timers.deadline(start + Duration::from_millis(10)));
        assert!(futures::poll!(first.as_mut()).is_pending());
        drop(first);
        let mut second = Box::pin(timers.deadline(start + Duration::from_millis(40)));
        assert!(futures::poll!(second.as_mut()).is_pending());
        // Past where the spare was armed: it fires, and is moved, not ready.
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(futures::poll!(second.as_mut()).is_pending());
        tokio::time::advance(Duration::from_millis(19)).await;
        assert!(futures::poll!(second.as_mut()).is_pending());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(futures::poll!(second.as_mut()).is_ready());
        assert_eq!(start.elapsed(), Duration::from_millis(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fired_spare_waits_again() {
        let timers = ConnTimers::default();
        timers
            .deadline(Instant::now() + Duration::from_millis(1))
            .await;
        let at = Instant::now();
        timers
            .deadline(Instant::now() + Duration::from_millis(30))
            .await;
        assert_eq!(at.elapsed(), Duration::from_millis(30));
    }
}
