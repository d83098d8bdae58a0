//! Raw HTTP/1.1 over loopback for the gateway's tests: the bytes a test writes are the
//! bytes the server reads, with no client library normalising them first.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any exchange may take.
pub(crate) const BOUND: Duration = Duration::from_secs(10);

/// Splits a whole answer into its status and its body.
pub(crate) fn status_and_body(answer: &str) -> (u16, String) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sends `<method> <target>` with `Host: gw`, the `extra` header lines (each ending in
/// `\r\n`) and `Connection: close`; reads the answer to its end: the status and the body.
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{method} {target} HTTP/1.1\r\nhost: gw\r\n{extra}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    status_and_body(&String::from_utf8_lossy(&answer))
}

/// `GET <target>`, as [`request`].
pub(crate) async fn get(addr: SocketAddr, target: &str) -> (u16, String) {
    request(addr, "GET", target, "").await
}

/// A hand-written HTTP/1.1 upstream on a loopback port: reads bodiless request heads on
/// keep-alive connections, records each head as it came, and answers each `200` with
/// the body `answer` makes of the head. No library between the bytes and the test.
pub(crate) struct HeadsUpstream {
    pub(crate) addr: SocketAddr,
    heads: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

impl HeadsUpstream {
    /// The heads received so far, in order.
    pub(crate) fn seen(&self) -> Vec<String> {
        self.heads.lock().clone()
    }

    /// Forgets the heads received so far.
    pub(crate) fn clear(&self) {
        self.heads.lock().clear();
    }
}

/// Starts a [`HeadsUpstream`].
pub(crate) async fn heads_upstream(
    answer: impl Fn(&str) -> String + Clone + Send + Sync + 'static,
) -> HeadsUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let log = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (log, answer) = (log.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let body = answer(&head);
                    log.lock().push(head);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    HeadsUpstream { addr, heads }
}

/// A request head's target (`GET /x HTTP/1.1` → `/x`).
pub(crate) fn target_of(head: &str) -> &str {
    head.split(' ').nth(1).unwrap_or("")
}

/// Writes `raw` (requests, pipelined) and reads until the gateway closes the connection
/// (the last request should say `Connection: close`).
pub(crate) async fn pipelined(addr: SocketAddr, raw: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut answer))
        .await
        .expect("the answers in time")
        .unwrap();
    answer
}

/// A head's `Content-Length`, if it has one.
pub(crate) fn content_length(head: &str) -> Option<usize> {
    head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().unwrap())
    })
}

/// Splits `bytes`, the answers to pipelined requests, into each answer's head and body:
/// no body for an answer `bodiless` flags (one to `HEAD`), else as many bytes as its
/// `Content-Length` says. Panics where an answer should start and none does, or where
/// bytes are left over: the framing of the answers before it was wrong.
pub(crate) fn split_answers(mut bytes: &[u8], bodiless: &[bool]) -> Vec<(String, String)> {
    let mut answers = Vec::new();
    for (i, &bodiless) in bodiless.iter().enumerate() {
        assert!(
            bytes.starts_with(b"HTTP/1.1 "),
            "answer {i} does not start where the one before it ended:\n{}",
            String::from_utf8_lossy(bytes)
        );
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole head");
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        bytes = &bytes[end + 4..];
        let length = if bodiless {
            0
        } else {
            content_length(&head).unwrap_or_else(|| panic!("no Content-Length:\n{head}"))
        };
        let body = String::from_utf8_lossy(&bytes[..length]).into_owned();
        bytes = &bytes[length..];
        answers.push((head, body));
    }
    assert!(
        bytes.is_empty(),
        "bytes after the last answer:\n{}",
        String::from_utf8_lossy(bytes)
    );
    answers
}
