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
