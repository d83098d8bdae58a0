//! The Consul client against a hand-written agent on loopback that resets a pooled
//! keep-alive connection when a request arrives on it, as an agent's idle timeout racing
//! the request does (issue 12, item 4): an idempotent request is sent again, once, on a
//! new connection, and counted; a request that failed on a new connection is not. Every
//! wait is bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use seawall::consul::{ConsulClient, ConsulConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

const BOUND: Duration = Duration::from_secs(10);

/// What the agent double saw.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    answered: AtomicUsize,
    reset: AtomicUsize,
}

/// Reads one request (head, and a `Content-Length` body); `false` if the connection
/// closed first.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..end + 4 + length);
            return true;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An agent that answers `GET /v1/status/leader` (any request, in fact) with keep-alive,
/// and resets (`SO_LINGER` 0, no answer) request number `reset_at` of its first
/// connection, once it has arrived. Later connections answer everything.
async fn agent(reset_at: usize) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let state = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let first = state.accepted.fetch_add(1, SeqCst) == 0;
            let state = state.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut n = 0;
                while read_request(&mut stream, &mut buf).await {
                    n += 1;
                    if first && n == reset_at {
                        #[allow(deprecated)]
                        let _ = stream.set_linger(Some(Duration::ZERO));
                        state.reset.fetch_add(1, SeqCst);
                        return;
                    }
                    let body = "\"10.0.0.1:8300\"";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    state.answered.fetch_add(1, SeqCst);
                }
            });
        }
    });
    (addr, seen)
}

fn client(addr: SocketAddr) -> ConsulClient {
    ConsulClient::new(
        ConsulConfig::builder()
            .address(addr.to_string())
            .request_timeout(Duration::from_secs(3))
            .build()
            .unwrap(),
    )
}

#[tokio::test]
async fn a_get_reset_on_a_reused_connection_is_retried_on_a_new_one() {
    let (addr, seen) = agent(2).await;
    let client = client(addr);
    let leader = timeout(BOUND, client.status_leader()).await.unwrap();
    assert_eq!(leader.unwrap().as_deref(), Some("10.0.0.1:8300"));
    // Let the connection go back to the pool.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let leader = timeout(BOUND, client.status_leader()).await.unwrap();
    assert_eq!(
        leader.expect("retried on a new connection").as_deref(),
        Some("10.0.0.1:8300")
    );
    assert_eq!(
        seen.reset.load(SeqCst),
        1,
        "the pooled connection was reused"
    );
    assert_eq!(seen.accepted.load(SeqCst), 2);
    assert_eq!(seen.answered.load(SeqCst), 2);
    assert_eq!(client.retried_stale(), 1);
}

#[tokio::test]
async fn a_get_reset_on_a_new_connection_is_not_retried() {
    let (addr, seen) = agent(1).await;
    let client = client(addr);
    let error = timeout(BOUND, client.status_leader())
        .await
        .unwrap()
        .expect_err("reset");
    assert!(error.is_transport(), "{error}");
    assert_eq!(seen.accepted.load(SeqCst), 1, "not sent again");
    assert_eq!(client.retried_stale(), 0);
}

#[tokio::test]
async fn a_put_reset_on_a_reused_connection_is_retried_too() {
    // `PUT` is idempotent, and the client's bodies are buffers it can send again.
    let (addr, seen) = agent(2).await;
    let client = client(addr);
    timeout(BOUND, client.status_leader())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    timeout(BOUND, client.check_pass("service:web", Some("fine")))
        .await
        .unwrap()
        .expect("retried on a new connection");
    assert_eq!(
        seen.reset.load(SeqCst),
        1,
        "the pooled connection was reused"
    );
    assert_eq!(seen.accepted.load(SeqCst), 2);
    assert_eq!(client.retried_stale(), 1);
}
