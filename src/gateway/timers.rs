//! Timers reused from one request to the next of a client connection.
//!
//! Every request of a keep-alive connection needs two timers: hyper's bound on reading
//! the next request head (`HEADER_READ_TIMEOUT`, armed while the connection waits for it)
//! and the route's deadline until the upstream's response head. A new `tokio::time::Sleep`
//! for each is inserted into the runtime's timer wheel and removed again, under the time
//! driver's lock, and an insertion earlier than the driver's next planned wake-up also
//! wakes the driver (a write to its eventfd: a system call, and one more `epoll_wait`
//! turn), which under load happened on up to half of the requests.
//!
//! [`ConnTimers`] keeps the sleeps a connection's requests are done with, one list per
//! purpose, and hands them out again: a sleep still in the wheel whose deadline moves
//! later is updated with one atomic operation, without the lock, and its old slot in the
//! wheel is moved only when that slot comes due (once in seconds, not once a request).
//! Timers of one purpose on one connection only ever move later (the same duration from a
//! later now), so that is the common case; a deadline moved earlier goes through tokio's
//! ordinary re-registration. Deadlines are exact either way: only where the timer sits in
//! the wheel until then changes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Sleeps kept per purpose and connection: one is in use at a time (a connection serves
/// one request at a time), the second covers a request finishing while the next starts.
const SPARES: usize = 2;

type Spares = parking_lot::Mutex<Vec<Pin<Box<Sleep>>>>;

/// The sleeps one client connection's requests reuse: hyper's head-read timer (as
/// [`hyper::rt::Timer`]) and the route deadline ([`ConnTimers::deadline`]). Cloning
/// shares them. Made on the connection's task, whose runtime's timers these are.
#[derive(Clone, Default)]
pub(crate) struct ConnTimers(Arc<[Spares; 2]>);

impl std::fmt::Debug for ConnTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTimers").finish_non_exhaustive()
    }
}

/// Which list a sleep comes from and goes back to.
const HEAD: usize = 0;
const DEADLINE: usize = 1;

impl ConnTimers {
    /// A sleep until `deadline` for the route's deadline.
    pub(crate) fn deadline(&self, deadline: Instant) -> Reused {
        self.sleep(DEADLINE, deadline)
    }

    fn sleep(&self, purpose: usize, deadline: Instant) -> Reused {
        let spare = self.0[purpose].lock().pop();
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Reused {
            sleep: Some(sleep),
            home: self.clone(),
            purpose,
        }
    }
}

/// A sleep of a [`ConnTimers`], given back to it when dropped.
pub(crate) struct Reused {
    sleep: Option<Pin<Box<Sleep>>>,
    home: ConnTimers,
    purpose: usize,
}

impl Reused {
    fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Future for Reused {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.get_mut().sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Reused {
    fn drop(&mut self) {
        if let Some(sleep) = self.sleep.take() {
            let mut spares = self.home.0[self.purpose].lock();
            if spares.len() < SPARES {
                spares.push(sleep);
            }
        }
    }
}

impl hyper::rt::Sleep for Reused {}

// hyper's `Timer` trait speaks `std::time::Instant`; every instant here is converted from
// or to tokio's, whose clock (paused in tests) is the one read.
#[allow(clippy::disallowed_types)]
impl hyper::rt::Timer for ConnTimers {
    /// tokio's clock, as hyper-util's `TokioTimer` reads it: deadlines hyper computes
    /// from it follow tokio's paused time in tests.
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep(HEAD, Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleep(HEAD, Instant::from_std(deadline)))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<Reused>() {
            Some(reused) => reused.get_mut().reset(Instant::from_std(new_deadline)),
            None => *sleep = hyper::rt::Timer::sleep_until(self, new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
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

    #[tokio::test(start_paused = true)]
    async fn hyper_sleeps_are_reused_and_reset() {
        use hyper::rt::Timer as _;
        let timers = ConnTimers::default();
        tokio::time::advance(Duration::from_secs(60)).await;
        // Paused time: hyper's deadlines must come from tokio's clock, not the OS's.
        assert_eq!(timers.now(), Instant::now().into_std());
        let start = Instant::now().into_std();
        drop(timers.sleep_until(start + Duration::from_millis(10)));
        assert_eq!(timers.0[HEAD].lock().len(), 1, "given back");
        let mut sleep = timers.sleep_until(start + Duration::from_millis(10));
        assert_eq!(timers.0[HEAD].lock().len(), 0, "taken again");
        let at = Instant::now();
        timers.reset(&mut sleep, (at + Duration::from_millis(20)).into_std());
        sleep.await;
        assert_eq!(at.elapsed(), Duration::from_millis(20));
        assert_eq!(timers.0[DEADLINE].lock().len(), 0, "lists apart");
    }
}
