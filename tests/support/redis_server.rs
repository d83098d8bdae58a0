//! A real `redis-server` on a free loopback port, killed when dropped.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct RedisServer {
    child: Child,
    pub(crate) port: u16,
}

impl RedisServer {
    pub(crate) fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    /// Starts one on `port` and waits (at most five seconds) until it answers.
    pub(crate) async fn start(port: u16) -> Self {
        Self::start_with(port, &[]).await
    }

    /// Starts one that also takes TLS connections on `tls_port`, with the certificate
    /// `cert` and its key `key`, asking clients for a certificate signed by `ca` (Redis'
    /// default, `tls-auth-clients yes`); plain connections on `port` stay open, for the
    /// test to look at what the limiter wrote and to know when the server is up.
    pub(crate) async fn start_tls(
        port: u16,
        tls_port: u16,
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Self {
        let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
        Self::start_with(
            port,
            &[
                "--tls-port".to_owned(),
                tls_port.to_string(),
                "--tls-cert-file".to_owned(),
                path(cert),
                "--tls-key-file".to_owned(),
                path(key),
                "--tls-ca-cert-file".to_owned(),
                path(ca),
            ],
        )
        .await
    }

    async fn start_with(port: u16, extra: &[String]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install -y redis-server)");
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(client) = redis::Client::open(server.url()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: Result<String, _> = redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return server;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The keys Redis holds now under `pattern`.
    pub(crate) async fn keys(&self, pattern: &str) -> Vec<String> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `seawall_rate_limit_redis_checks_total{limiter, source}` counters not zero, by
/// `source`, since the last snapshot.
pub(crate) fn checks_by_source(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> std::collections::BTreeMap<String, u64> {
    use metrics_util::debugging::DebugValue;
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let key = key.key();
            let source = key
                .labels()
                .find(|l| l.key() == "source")?
                .value()
                .to_owned();
            match value {
                DebugValue::Counter(n)
                    if n > 0 && key.name() == "seawall_rate_limit_redis_checks_total" =>
                {
                    Some((source, n))
                }
                _ => None,
            }
        })
        .collect()
}
