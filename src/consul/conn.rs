//! The Consul client's connections, watched so that a request that failed on a stale
//! keep-alive connection can be told apart from one the agent may have acted on.
//!
//! An agent closes a keep-alive connection once it has been idle for its timeout. A
//! request written on it in that instant gets `Connection reset by peer` (or an early
//! EOF), and hyper-util's legacy client retries only requests it could not write at all.
//! Go's `net/http` also retries an idempotent request written on a *reused* connection
//! that failed before the first byte of an answer: the agent cannot have answered it.
//! Doing the same needs two facts the legacy client does not give: whether the
//! connection was reused, and whether any byte of the answer came. [`Watched`] records
//! both from the bytes that cross the socket, and hands them to the client's error (as
//! the connection's "extra" info) as an [`Exchanges`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
#[cfg(not(feature = "consul-tls"))]
use tokio::net::TcpStream;

/// What crossed one connection: bytes read in all, and how many had been read when the
/// current request started to be written. HTTP/1 without pipelining: a request is
/// written after the previous answer was read.
#[derive(Debug, Default)]
pub(crate) struct Exchanges {
    read: AtomicU64,
    read_before_request: AtomicU64,
    /// Whether the last operation was a write (the current request is being written).
    writing: AtomicBool,
    /// Whether the connection ended: a read met its end or failed, or a write failed.
    /// Set by whoever polls it, the pool's connection task for an idle one.
    closed: AtomicBool,
}

impl Exchanges {
    /// Whether the current request went out on a connection that had carried an answer
    /// before, and failed before a byte of its own answer came.
    pub(crate) fn reused_and_unanswered(&self) -> bool {
        let before = self.read_before_request.load(Relaxed);
        self.writing.load(Relaxed) && before > 0 && self.read.load(Relaxed) == before
    }

    /// Whether the connection ended (its peer closed it or it failed), as far as its
    /// reads and writes have shown: a connection the pool will not hand out again.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    fn on_closed(&self) {
        self.closed.store(true, Relaxed);
    }

    fn on_read(&self, n: usize) {
        if n > 0 {
            self.read.fetch_add(n as u64, Relaxed);
            self.writing.store(false, Relaxed);
        }
    }

    fn on_write(&self) {
        if !self.writing.load(Relaxed) {
            self.writing.store(true, Relaxed);
            self.read_before_request
                .store(self.read.load(Relaxed), Relaxed);
        }
    }
}

/// What a connection to the agent is: TCP alone without the feature `consul-tls`, so the
/// plain-HTTP path is exactly what it was; with it, TCP or TLS over TCP.
#[cfg(not(feature = "consul-tls"))]
type Stream = TcpStream;
#[cfg(feature = "consul-tls")]
type Stream = super::tls::MaybeTls;

/// A connection whose reads and writes (of plaintext, over TLS) are recorded in its
/// [`Exchanges`].
#[derive(Debug)]
pub(crate) struct Watched {
    stream: Stream,
    exchanges: Arc<Exchanges>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let (before, room) = (buf.filled().len(), buf.remaining());
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.exchanges.on_read(n);
        match &read {
            Poll::Ready(Ok(())) if n == 0 && room > 0 => this.exchanges.on_closed(),
            Poll::Ready(Err(_)) => this.exchanges.on_closed(),
            _ => {}
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.exchanges.on_write();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &written {
            this.exchanges.on_closed();
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.exchanges.on_write();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(_)) = &written {
            this.exchanges.on_closed();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connection for Watched {
    fn connected(&self) -> Connected {
        self.stream.connected().extra(self.exchanges.clone())
    }
}

/// An [`HttpConnector`] whose connections are [`Watched`], with a TLS handshake after
/// the TCP one when the agent is reached over `https://`.
#[derive(Debug, Clone)]
pub(crate) struct WatchedConnector {
    tcp: HttpConnector,
    #[cfg(feature = "consul-tls")]
    tls: Option<Arc<super::tls::ConsulTls>>,
    /// The time a TLS handshake may take: the configuration's `request_timeout`.
    #[cfg(feature = "consul-tls")]
    handshake_timeout: std::time::Duration,
}

impl WatchedConnector {
    /// Connections to the agent `config` points at, made by `tcp`.
    pub(crate) fn new(
        #[allow(unused_mut)] mut tcp: HttpConnector,
        config: &super::config::ConsulConfig,
    ) -> Self {
        #[cfg(feature = "consul-tls")]
        if config.tls.is_some() {
            // The requests' URIs say `https`, which the TCP connector refuses by default.
            tcp.enforce_http(false);
        }
        #[cfg(not(feature = "consul-tls"))]
        let _ = config;
        Self {
            tcp,
            #[cfg(feature = "consul-tls")]
            tls: config.tls.clone(),
            #[cfg(feature = "consul-tls")]
            handshake_timeout: config.request_timeout,
        }
    }
}

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<Watched>, Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

impl tower::Service<Uri> for WatchedConnector {
    type Response = TokioIo<Watched>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = tower::Service::call(&mut self.tcp, dst);
        #[cfg(feature = "consul-tls")]
        let (tls, limit) = (self.tls.clone(), self.handshake_timeout);
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            #[cfg(feature = "consul-tls")]
            let stream = match tls {
                Some(tls) => {
                    super::tls::MaybeTls::Tls(Box::new(tls.handshake(stream, limit).await?))
                }
                None => super::tls::MaybeTls::Plain(stream),
            };
            Ok(TokioIo::new(Watched {
                stream,
                exchanges: Arc::default(),
            }))
        })
    }
}

/// The [`Exchanges`] of the connection a legacy client's `error` happened on, if any.
pub(crate) fn exchanges_of(error: &hyper_util::client::legacy::Error) -> Option<Arc<Exchanges>> {
    let mut extensions = http::Extensions::new();
    error.connect_info()?.get_extras(&mut extensions);
    extensions.get::<Arc<Exchanges>>().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_and_answer_bytes_are_told_from_the_traffic() {
        let e = Exchanges::default();
        // First request on a new connection, no answer yet: not reused.
        e.on_write();
        e.on_write();
        assert!(!e.reused_and_unanswered());
        e.on_read(0);
        assert!(!e.reused_and_unanswered(), "EOF is no byte");
        e.on_read(100);
        // Second request, on the reused connection.
        e.on_write();
        assert!(e.reused_and_unanswered());
        e.on_read(3);
        assert!(!e.reused_and_unanswered(), "part of an answer came");
        // Third request.
        e.on_write();
        assert!(e.reused_and_unanswered());
    }
}
