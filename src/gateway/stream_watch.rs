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
//! Each response body of an HTTP/2 connection is [`Watched`]: it lives in a [`Slot`] of
//! the connection's, where it notes whether the stream is waiting on the client (a frame
//! was handed to hyper, or none asked for yet) and how many frames it has handed over.
//! The connection's [`Stalls`] looks at the slots every quarter of `send_timeout`; a
//! stream found waiting on the client with no frame handed over at five looks running
//! (so between one and one and a quarter `send_timeout`) loses its body: the upstream
//! connection streaming it is released, and the stream is reset when hyper next polls it.
//! The connection and its other streams go on: one connection may carry many users'
//! requests (a proxy in front of the gateway), and one slow reader among them is not a
//! reason to fail the others. A stream waiting on its upstream (a long poll, a slow
//! answer) is the route's body timeout's, not this one's. hyper may hold a frame it took
//! from the body while it waits for the stream's window, polling the body no more until
//! the window opens: such a stream never sees the cut, so one still held [`LOOKS`] looks
//! after it has its connection shut down gracefully (`GOAWAY`: the other streams finish,
//! no new one starts), and closed if it is still held [`LOOKS`] more (there is no other
//! way to reset it).
//!
//! A poll takes the slot's lock (uncontended: the connection's look takes it only for a
//! stream it found stalled) and writes one word; no clock is read. A slot is taken and
//! given back under the connection's lock once a response, and slots are reused.

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

/// One response body and what its stream waits on.
#[derive(Default)]
struct Slot {
    /// Frames handed over, and [`WAITING`]; written under `body`'s lock.
    word: AtomicU64,
    /// The body; taken by [`Stalls`] from a stream that waited on the client too long.
    body: Mutex<Option<Body>>,
}

/// The slots of one HTTP/2 connection's response bodies.
#[derive(Default)]
pub(crate) struct StreamWatch {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// Every slot made, in a fixed order ([`Stalls`] keeps what it saw by index).
    all: Vec<Arc<Slot>>,
    /// Those no body holds.
    free: Vec<Arc<Slot>>,
}

impl StreamWatch {
    /// A slot holding `body`, waiting on the client (hyper asks for window before it
    /// polls the body for the first time); the slot's word.
    fn take(&self, body: Body) -> (Arc<Slot>, u64) {
        let mut slots = self.slots.lock();
        let slot = match slots.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = Arc::new(Slot::default());
                slots.all.push(slot.clone());
                slot
            }
        };
        drop(slots);
        let mut held = slot.body.lock();
        *held = Some(body);
        let word = (((slot.word.load(Relaxed) >> 1) + 1) << 1) | WAITING;
        slot.word.store(word, Relaxed);
        drop(held);
        (slot, word)
    }

    /// Gives `slot` back, dropping what body it still holds.
    fn give_back(&self, slot: Arc<Slot>) {
        let body = {
            let mut held = slot.body.lock();
            slot.word.store(slot.word.load(Relaxed) & !WAITING, Relaxed);
            held.take()
        };
        self.slots.lock().free.push(slot);
        drop(body);
    }
}

/// Something that keeps a connection's [`StreamWatch`] alive: the connection's context,
/// which each request clones anyway.
pub(crate) trait HasWatch: Send + Sync + 'static {
    fn watch(&self) -> &StreamWatch;
}

/// A response body on an HTTP/2 connection, noting when its stream waits on the client.
pub(crate) struct Watched<W: HasWatch> {
    /// Always `Some` until dropped.
    slot: Option<Arc<Slot>>,
    /// What is in the slot's word, kept here so that a poll writes without reading.
    word: u64,
    owner: Arc<W>,
}

impl<W: HasWatch> Watched<W> {
    pub(crate) fn new(body: Body, owner: Arc<W>) -> Self {
        let (slot, word) = owner.watch().take(body);
        Self {
            slot: Some(slot),
            word,
            owner,
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
        let Some(slot) = &this.slot else {
            return Poll::Ready(None);
        };
        let mut held = slot.body.lock();
        let Some(body) = held.as_mut() else {
            // Taken by `Stalls`: hyper resets the stream.
            return Poll::Ready(Some(Err(BoxError::from(
                "the client left the stream without window for send_timeout",
            ))));
        };
        let polled = Pin::new(body).poll_frame(cx);
        let frames = this.word >> 1;
        let word = match &polled {
            // A frame for hyper: the next poll waits for the client's window.
            Poll::Ready(Some(Ok(_))) => ((frames + 1) << 1) | WAITING,
            // The upstream's turn, or the end.
            _ => frames << 1,
        };
        if word != this.word {
            this.word = word;
            slot.word.store(word, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // A body taken is not at its end: the next poll says it failed, and hyper resets
        // the stream rather than ending it as if the answer were whole.
        self.slot
            .as_ref()
            .is_some_and(|slot| slot.body.lock().as_ref().is_some_and(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.slot
            .as_ref()
            .and_then(|slot| slot.body.lock().as_ref().map(|b| b.size_hint()))
            .unwrap_or_default()
    }
}

/// The connection's side: looks at its streams every quarter of `send_timeout`.
pub(crate) struct Stalls {
    watch: Arc<dyn HasWatch>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    tick: Duration,
    /// What each slot held at the last looks, and at how many looks running.
    seen: Vec<(u64, u8)>,
    /// Counts the streams cut (the gateway's `send_timeouts`).
    fired: Arc<AtomicU64>,
    /// The slots whose bodies were cut and still held by the same response (hyper has
    /// not polled it since, so it has not reset the stream): each with its word after the
    /// cut and the looks since.
    cut: Vec<(Arc<Slot>, u64, u8)>,
}

/// Looks running at which a stream seen waiting with no frame handed over has waited
/// `send_timeout` at least (the first look may come just after its wait began).
const LOOKS: u8 = 5;

/// What a stream cut for `send_timeout` and never reset (see [`Stalls::poll`]) asks of
/// its connection, by how long it has been held since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stuck {
    /// None is held, or not for long yet.
    No,
    /// One has been held a `send_timeout`: the connection is shut down gracefully
    /// (`GOAWAY`), so that its other streams may finish and no new one starts.
    ShutDown,
    /// One has been held two: the connection is closed (the graceful shutdown would wait
    /// on the held stream for good).
    Close,
}

impl Stalls {
    pub(crate) fn new(
        watch: Arc<dyn HasWatch>,
        send_timeout: Duration,
        fired: Arc<AtomicU64>,
    ) -> Self {
        let tick = (send_timeout / u32::from(LOOKS - 1)).max(Duration::from_millis(1));
        Self {
            watch,
            sleep: Box::pin(tokio::time::sleep(tick)),
            tick,
            seen: Vec::new(),
            fired,
            cut: Vec::new(),
        }
    }

    /// Looks at the streams when it is time to, cutting those that waited on the client
    /// for `send_timeout`. What a cut stream still not reset since asks of the
    /// connection: hyper holds a frame of its answer waiting for the stream's window and
    /// will not poll the body (and so see the cut, and reset the stream) until the client
    /// opens it, so the stream and the frame would be held for the connection's life.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Stuck {
        let mut stuck = Stuck::No;
        while self.sleep.as_mut().poll(cx).is_ready() {
            self.look();
            stuck = stuck.max(self.look_at_cut());
            let next = tokio::time::Instant::now() + self.tick;
            self.sleep.as_mut().reset(next);
        }
        stuck
    }

    /// How long the longest-held stream cut has gone without its response being polled
    /// (which fails it, and resets the stream) or dropped.
    fn look_at_cut(&mut self) -> Stuck {
        if self.cut.is_empty() {
            return Stuck::No;
        }
        let slots = self.watch.watch().slots.lock();
        let mut longest = 0;
        self.cut.retain_mut(|(slot, word, looks)| {
            let resolved = slot.word.load(Relaxed) != *word
                || slots.free.iter().any(|free| Arc::ptr_eq(free, slot));
            if resolved {
                return false;
            }
            *looks = looks.saturating_add(1);
            longest = longest.max(*looks);
            true
        });
        match longest {
            n if n >= 2 * LOOKS => Stuck::Close,
            n if n >= LOOKS => Stuck::ShutDown,
            _ => Stuck::No,
        }
    }

    /// One look at the slots: the bodies of streams that have been waiting, unchanged,
    /// for [`LOOKS`] are dropped. How many.
    fn look(&mut self) -> usize {
        let mut stalled = Vec::new();
        {
            let slots = self.watch.watch().slots.lock();
            self.seen.resize(slots.all.len(), (0, 0));
            for (slot, seen) in slots.all.iter().zip(&mut self.seen) {
                let word = slot.word.load(Relaxed);
                if word & WAITING != 0 && word == seen.0 {
                    seen.1 = seen.1.saturating_add(1);
                    if seen.1 >= LOOKS {
                        stalled.push((slot.clone(), word));
                    }
                } else {
                    *seen = (word, u8::from(word & WAITING != 0));
                }
            }
        }
        let mut cut = 0;
        for (slot, word) in stalled {
            let body = {
                let mut held = slot.body.lock();
                // Still the same wait (not a frame handed over since the look).
                if slot.word.load(Relaxed) != word {
                    continue;
                }
                slot.word.store(word & !WAITING, Relaxed);
                held.take()
            };
            if body.is_some() {
                cut += 1;
                self.cut.push((slot.clone(), word & !WAITING, 0));
                self.fired.fetch_add(1, Relaxed);
                #[cfg(feature = "tracing")]
                tracing::debug!(
                    target: "seawall::gateway",
                    timeout_ms = (self.tick * u32::from(LOOKS - 1)).as_millis() as u64,
                    "an HTTP/2 response waited on the client's window for send_timeout: \
                     its body dropped, the stream reset"
                );
            }
            // Dropped here, outside the locks: the upstream connection is released.
            drop(body);
        }
        cut
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
        Stalls::new(owner.clone(), Duration::from_secs(4), Arc::default())
    }

    /// Looks at `stalls` `n` times: how many streams each cut.
    fn looks(stalls: &mut Stalls, n: usize) -> Vec<usize> {
        (0..n).map(|_| stalls.look()).collect()
    }

    type Sender = futures::channel::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    /// A body fed by the returned sender, watched.
    fn channel_body(owner: &Arc<Owner>) -> (Sender, Watched<Owner>) {
        let (tx, rx) = futures::channel::mpsc::channel(4);
        let inner = http_body_util::StreamBody::new(rx).boxed_unsync();
        (tx, Watched::new(inner, owner.clone()))
    }

    #[tokio::test]
    async fn a_body_never_polled_is_cut_at_the_fifth_look_and_then_fails() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (tx, mut body) = channel_body(&owner);
        assert_eq!(looks(&mut stalls, 5), [0, 0, 0, 0, 1]);
        assert!(tx.is_closed(), "the upstream's body is dropped");
        assert_eq!(stalls.fired.load(Relaxed), 1);
        // Not at its end (hyper would end the stream as if whole): it fails.
        assert!(!hyper::body::Body::is_end_stream(&body));
        assert!(body.frame().await.unwrap().is_err());
        // Cut once, counted once.
        assert_eq!(looks(&mut stalls, 10), [0; 10]);
        assert_eq!(stalls.fired.load(Relaxed), 1);
    }

    /// A cut the response never sees (hyper holds a frame and polls no more) is still
    /// there `LOOKS` looks later: the connection is shut down, and closed `LOOKS` more
    /// later. One whose response is dropped (hyper polled it, failed, reset the stream)
    /// asks nothing.
    #[tokio::test]
    async fn a_cut_never_seen_is_reported_and_one_seen_is_not() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (_tx, held) = channel_body(&owner);
        let (_tx2, seen) = channel_body(&owner);
        assert_eq!(looks(&mut stalls, 5), [0, 0, 0, 0, 2]);
        drop(seen);
        let stuck: Vec<Stuck> = (0..10)
            .map(|_| {
                stalls.look();
                stalls.look_at_cut()
            })
            .collect();
        let (no, shut, close) = (Stuck::No, Stuck::ShutDown, Stuck::Close);
        assert_eq!(stuck, [no, no, no, no, shut, shut, shut, shut, shut, close]);
        drop(held);
        assert_eq!(stalls.look_at_cut(), Stuck::No);
        assert!(stalls.cut.is_empty());
    }

    #[tokio::test]
    async fn a_frame_handed_over_starts_the_count_again() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (mut tx, mut body) = channel_body(&owner);
        assert_eq!(looks(&mut stalls, 4), [0; 4]);
        tx.try_send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(looks(&mut stalls, 4), [0; 4]);
        assert_eq!(stalls.look(), 1);
    }

    #[tokio::test]
    async fn a_stream_waiting_on_its_upstream_is_never_cut() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (tx, mut body) = channel_body(&owner);
        // Polled, nothing from the upstream yet.
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(hyper::body::Body::poll_frame(Pin::new(&mut body), &mut cx).is_pending());
        assert_eq!(looks(&mut stalls, 20), [0; 20]);
        assert!(!tx.is_closed());
    }

    #[tokio::test]
    async fn one_stalled_stream_is_cut_and_the_others_go_on() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (stalled_tx, _stalled) = channel_body(&owner);
        let (mut busy_tx, mut busy) = channel_body(&owner);
        for _ in 0..4 {
            assert_eq!(stalls.look(), 0);
            busy_tx
                .try_send(Ok(Frame::data(Bytes::from_static(b"a"))))
                .unwrap();
            busy.frame().await.unwrap().unwrap();
        }
        assert_eq!(stalls.look(), 1);
        assert!(stalled_tx.is_closed());
        assert!(!busy_tx.is_closed());
    }

    #[tokio::test]
    async fn a_slot_given_back_and_taken_again_is_a_new_wait() {
        let owner = owner();
        let mut stalls = stalls(&owner);
        let (first_tx, first) = channel_body(&owner);
        assert_eq!(looks(&mut stalls, 3), [0; 3]);
        drop(first);
        assert!(first_tx.is_closed());
        let (_tx, _second) = channel_body(&owner);
        assert_eq!(owner.0.slots.lock().all.len(), 1, "the slot is reused");
        // The new owner's wait counts from its own first look.
        assert_eq!(looks(&mut stalls, 5), [0, 0, 0, 0, 1]);
    }
}
