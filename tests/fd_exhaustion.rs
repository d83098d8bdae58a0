//! A gateway out of file descriptors (`EMFILE` on connecting to an upstream) answers
//! `502`, and does not count it against the endpoint: counted, a surge that used up the
//! process's descriptors ejected every healthy upstream at once (outlier detection, the
//! breakers) and kept them out after it passed. A test binary of its own: it lowers its
//! own process's descriptor limit (`prlimit`, util-linux) while the gateway runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use seawall::gateway::{Discovery, Gateway, GatewayConfig};

/// An HTTP/1.1 upstream answering every request `200` and closing: each request through
/// the gateway dials a new connection.
fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    addr
}

/// One keep-alive request on `client`; the status.
fn request(client: &mut TcpStream) -> u16 {
    client
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "the gateway closed the connection: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return text[9..12].parse().unwrap();
            }
        }
    }
}

/// The soft limit of open files in `limits` (`/proc/self/limits`).
fn soft_limit(limits: &str) -> u64 {
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap()
}

/// Sets this process's soft limit of open files (the hard one kept).
fn limit_files(soft: u64) {
    let pid = std::process::id().to_string();
    let hard = std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .unwrap();
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={soft}:{hard}")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
}

#[test]
fn running_out_of_descriptors_is_not_the_upstreams_failure() {
    let upstream = upstream();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = GatewayConfig::from_toml_str(&format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nservice = \"up\"\ntimeout = \"5s\"\n\
         balance = {{ outlier = {{ consecutive_failures = 2, max_ejected = 1.0 }} }}\n\
         breaker = {{ failure_rate = 0.5, window = 4, minimum_calls = 2 }}\n\
         [[services]]\nname = \"up\"\ninstances = [\"{upstream}\"]\n"
    ))
    .unwrap();
    let (gateway, handle) = runtime.block_on(async {
        let gateway = Gateway::build(config, Discovery::Static).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = gateway.clone().spawn(listener);
        (gateway, handle)
    });
    let mut client = TcpStream::connect(handle.local_addr()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(request(&mut client), 200);

    // No descriptor left: a limit a little above what is open, the rest taken.
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let limit = std::fs::read_to_string("/proc/self/limits").unwrap();
    limit_files(open + 64);
    let mut held = Vec::new();
    while let Ok(file) = std::fs::File::open("/dev/null") {
        held.push(file);
    }
    let statuses: Vec<u16> = (0..6).map(|_| request(&mut client)).collect();
    drop(held);
    limit_files(soft_limit(&limit));
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");

    let endpoint = gateway.status().routes[0].endpoints[0].clone();
    assert_eq!(
        (
            endpoint.failures,
            endpoint.ejected,
            endpoint.breaker.as_deref()
        ),
        (0, false, Some("closed")),
        "the gateway's own want of descriptors counted against the endpoint: {endpoint:?}"
    );
    assert_eq!(request(&mut client), 200, "served again");
    runtime.block_on(handle.shutdown());
}
