//! HTTP/2 responses held up by the client's flow-control window: `send_timeout` for the
//! streams of an HTTP/2 connection.
//!
//! An HTTP/1 client that stops reading blocks the gateway's writes, and
//! [`SendTimeout`](super::client::SendTimeout) closes its connection. An HTTP/2 client
//! can stop reading one response without blocking a single write: it keeps draining its
//! socket and never sends the `WINDOW_UPDATE` the stream needs. hyper then stops polling
//! the response body (it asks for window first) and tells nobody, so the upstream
//! connection streaming that body is held for as long as the client likes.
//!
//! Each response body of an HTTP/2 connection is [`Watched`]: it notes in a slot of its
//! own whether the stream is waiting on the client (a frame was handed to hyper, or none
//! asked for yet) and how many frames it has handed over. The connection's [`Stalls`]
//! looks at the slots every quarter of `send_timeout`; a stream found waiting on the
//! client with no frame handed over at five looks running (so between one and one and a
//! quarter `send_timeout`) ends the connection, as a blocked write does, dropping its
//! bodies and the upstream connections streaming them. A stream waiting on its upstream
//! (a long poll, a slow answer) is the route's body timeout's, not this one's.
//!
//! The stream's path pays one relaxed store a poll and no clock read; a slot is taken
//! and given back under the connection's lock once a response, and slots are reused.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use parking_lot::Mutex;

use super::body::Body;
use crate::BoxError;

/// A slot's low bit: the stream waits on the client. The other bits count frames handed
/// over (across the slot's owners, so that a new owner never reads as an old one).
const WAITING: u64 = 1;

/// The slots of one HTTP/2 connection's response bodies.
#[derive(Default)]
pub(crate) struct StreamWatch {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Every slot made, in a fixed order ([`Stalls`] keeps what it saw by index).
    all: Vec<Arc<AtomicU64>>,
    /// Those no body holds.
    free: Vec<Arc<AtomicU64>>,
}

impl StreamWatch {
    /// A slot for a new response body, waiting on the client (hyper asks for window
    /// before it polls the body for the first time).
    fn take(&self) -> Arc<AtomicU64> {
        let mut slots = self.slots.lock();
        let slot = match slots.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = Arc::new(AtomicU64::new(0));
                slots.all.push(slot.clone());
                slot
            }
        };
        drop(slots);
        let frames = slot.load(Relaxed) >> 1;
        slot.store(((frames + 1) << 1) | WAITING, Relaxed);
        slot
    }

    fn give_back(&self, slot: Arc<AtomicU64>) {
        slot.store(slot.load(Relaxed) & !WAITING, Relaxed);
        self.slots.lock().free.push(slot);
    }
}

/// Something that keeps a connection's [`StreamWatch`] alive: the connection's context,
/// which each request clones anyway.
pub(crate) trait HasWatch: Send + 'static {
    fn watch(&self) -> &StreamWatch;
}

/// A response body on an HTTP/2 connection, noting when its stream waits on the client.
pub(crate) struct Watched<W: HasWatch> {
    body: Body,
    slot: Option<Arc<AtomicU64>>,
    /// Frames handed over, with [`WAITING`] set while the stream waits on the client: what
    /// is in the slot, kept here so that a poll writes without reading.
    word: u64,
    owner: Arc<W>,
}

impl<W: HasWatch> Watched<W> {
    pub(crate) fn new(body: Body, owner: Arc<W>) -> Self {
        let slot = owner.watch().take();
        let word = slot.load(Relaxed);
        Self {
            body,
            slot: Some(slot),
            word,
            owner,
        }
    }

    #[inline]
    fn note(&mut self, word: u64) {
        if word != self.word {
            self.word = word;
            if let Some(slot) = &self.slot {
                slot.store(word, Relaxed);
            }
        }
    }
}

impl<W: HasWatch> Drop for Watched<W> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.owner.watch().give_back(slot);
        }
    }
}

impl<W: HasWatch> hyper::body::Body for Watched<W> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        let frames = this.word >> 1;
        match &polled {
            // A frame for hyper: the next poll waits for the client's window.
            Poll::Ready(Some(Ok(_))) => this.note(((frames + 1) << 1) | WAITING),
            // The upstream's turn, or the end.
            _ => this.note(frames << 1),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's side: looks at its streams every quarter of `send_timeout`.
pub(crate) struct Stalls {
    watch: Arc<dyn HasWatch + Sync>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    tick: Duration,
    /// What each slot held at the last looks, and at how many looks running.
    seen: Vec<(u64, u8)>,
}

/// Looks running at which a stream seen waiting with no frame handed over has waited
/// `send_timeout` at least (the first look may come just after its wait began).
const LOOKS: u8 = 5;

impl Stalls {
    pub(crate) fn new(watch: Arc<dyn HasWatch + Sync>, send_timeout: Duration) -> Self {
        let tick = (send_timeout / u32::from(LOOKS - 1)).max(Duration::from_millis(1));
        Self {
            watch,
            sleep: Box::pin(tokio::time::sleep(tick)),
            tick,
            seen: Vec::new(),
        }
    }

    /// Whether a stream has waited on the client for `send_timeout`.
    pub(crate) fn poll_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.look() {
                return true;
            }
            let next = tokio::time::Instant::now() + self.tick;
            self.sleep.as_mut().reset(next);
        }
        false
    }

    /// One look at the slots: whether one has been waiting, unchanged, for [`LOOKS`].
    fn look(&mut self) -> bool {
        let slots = self.watch.watch().slots.lock();
        self.seen.resize(slots.all.len(), (0, 0));
        let mut stalled = false;
        for (slot, seen) in slots.all.iter().zip(&mut self.seen) {
            let word = slot.load(Relaxed);
            if word & WAITING != 0 && word == seen.0 {
                seen.1 = seen.1.saturating_add(1);
                stalled |= seen.1 >= LOOKS;
            } else {
                *seen = (word, u8::from(word & WAITING != 0));
            }
        }
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Owner(StreamWatch);

    impl HasWatch for Owner {
        fn watch(&self) -> &StreamWatch {
            &self.0
        }
    }

    fn owner() -> Arc<Owner> {
        Arc::new(Owner(StreamWatch::default()))
    }

    fn stalls(owner: &Arc<Owner>) -> Stalls {
        Stalls::new(owner.clone(), Duration::from_secs(4))
    }

    /// Looks at `stalls` `n` times: whether any found a stall.
    fn looks(stalls: &mut Stalls, n: usize) -> Vec<bool> {
        (0..n).map(|_| stalls.look()).collect()
    }

    #[tokio::test]
    async fn a_body_never_polled_is_a_stall_at_the_fifth_look() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let _body = Watched::new(super::super::body::full("x"), owner.clone());
        assert_eq!(looks(&mut stalls, 5), [false, false, false, false, true]);
    }

    #[tokio::test]
    async fn a_frame_handed_over_starts_the_count_again() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let inner = http_body_util::StreamBody::new(rx).boxed_unsync();
        let mut body = Watched::new(inner, owner.clone());
        assert_eq!(looks(&mut stalls, 4), [false; 4]);
        tx.try_send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(looks(&mut stalls, 4), [false; 4]);
        assert!(stalls.look());
    }

    #[tokio::test]
    async fn a_stream_waiting_on_its_upstream_is_no_stall() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (_tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let inner = http_body_util::StreamBody::new(rx).boxed_unsync();
        let mut body = Watched::new(inner, owner.clone());
        // Polled, nothing from the upstream yet.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(hyper::body::Body::poll_frame(Pin::new(&mut body), &mut cx).is_pending());
        assert_eq!(looks(&mut stalls, 20), [false; 20]);
    }

    #[tokio::test]
    async fn a_slot_given_back_and_taken_again_is_a_new_wait() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let first = Watched::new(super::super::body::full("x"), owner.clone());
        assert_eq!(looks(&mut stalls, 3), [false; 3]);
        drop(first);
        let _second = Watched::new(super::super::body::full("y"), owner.clone());
        assert_eq!(owner.0.slots.lock().all.len(), 1, "the slot is reused");
        // The new owner's wait counts from its own first look.
        assert_eq!(looks(&mut stalls, 5), [false, false, false, false, true]);
    }
}
