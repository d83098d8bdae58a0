//! TLS to Redis (`rediss://`, feature `redis-tls`): a real `redis-server` taking TLS
//! connections on a loopback port, with certificates made for the test by a CA of its own
//! (and the client's certificate, which redis-server asks for by default). The limiter
//! shares its bucket over TLS; a server it cannot verify, or that refuses it, is a Redis
//! that cannot answer; settings that cannot work are refused when the limiter is built.

use std::path::PathBuf;
use std::time::Duration;

use seawall::rate_limit::redis::{
    FailurePolicy, RedisLimitError, RedisRateLimiter, RedisTls, Source,
};
use seawall::rate_limit::{Quota, Rate};

use crate::redis_server::RedisServer;
use crate::tls_support::{self, Leaf, Pki};

/// A `redis-server` with TLS on `tls_port`, its certificate for 127.0.0.1 signed by `pki`,
/// and the client certificate `pki` signed for the limiter.
struct TlsRedis {
    server: RedisServer,
    tls_port: u16,
    pki: Pki,
    client: Leaf,
    _dir: PathBuf,
}

impl TlsRedis {
    async fn start() -> Self {
        let pki = Pki::new();
        let dir = tls_support::temp_dir("redis-tls");
        let (cert, key) = tls_support::write(&dir, "server", &pki.leaf(&["127.0.0.1"], "redis"));
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, pki.ca_pem()).unwrap();
        let tls_port = RedisServer::free_port();
        let server =
            RedisServer::start_tls(RedisServer::free_port(), tls_port, &cert, &key, &ca).await;
        let client = pki.leaf(&["seawall-client"], "seawall");
        Self {
            server,
            tls_port,
            pki,
            client,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }

    /// The CA and the client certificate: what the limiter needs to reach this server.
    fn tls(&self) -> RedisTls {
        RedisTls::new()
            .ca_pem(self.pki.ca_pem())
            .client_certificate(self.client.cert_pem.clone(), self.client.key_pem.clone())
    }
}

fn quota() -> Quota {
    Quota::new(Rate::per_minute(1), 2).unwrap()
}

fn limiter(url: String, prefix: &str, tls: Option<RedisTls>) -> RedisRateLimiter {
    let mut builder = RedisRateLimiter::builder(url, quota())
        .prefix(prefix)
        .timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        builder = builder.tls(tls);
    }
    builder.build().unwrap()
}

/// Over TLS the bucket is Redis': two of three requests admitted by Redis, the third
/// refused by it, and the key is there when read over the plain port.
#[tokio::test]
async fn a_limiter_keeps_its_bucket_in_redis_over_tls() {
    let redis = TlsRedis::start().await;
    let limiter = limiter(redis.url(), "over-tls", Some(redis.tls()));
    for _ in 0..2 {
        match limiter.acquire("client", 1).await {
            Ok((_, Source::Redis)) => {}
            other => panic!("admitted by Redis over TLS: {other:?}"),
        }
    }
    match limiter.acquire("client", 1).await {
        Err(RedisLimitError::Limited(_)) => {}
        other => panic!("the burst of 2 is spent: {other:?}"),
    }
    assert_eq!(redis.server.keys("over-tls:*").await.len(), 1);
    // A second limiter (another replica) sees the same bucket.
    let replica = limiter_with(&redis, "over-tls");
    assert!(matches!(
        replica.acquire("client", 1).await,
        Err(RedisLimitError::Limited(_))
    ));
}

fn limiter_with(redis: &TlsRedis, prefix: &str) -> RedisRateLimiter {
    limiter(redis.url(), prefix, Some(redis.tls()))
}

/// The server's certificate is checked: signed by a CA the limiter was not told to trust
/// (another private CA, or webpki-roots when no CA is given), the handshake fails and the
/// check is Redis unavailable (failing closed here), not an admission. So is a server
/// that asks for a client certificate the limiter does not have.
#[tokio::test]
async fn a_server_the_limiter_cannot_verify_or_that_refuses_it_is_unavailable() {
    let redis = TlsRedis::start().await;
    let other = Pki::new();
    let cases =
        [
            (
                "a CA of another",
                Some(RedisTls::new().ca_pem(other.ca_pem()).client_certificate(
                    redis.client.cert_pem.clone(),
                    redis.client.key_pem.clone(),
                )),
            ),
            (
                "webpki-roots",
                Some(RedisTls::new().client_certificate(
                    redis.client.cert_pem.clone(),
                    redis.client.key_pem.clone(),
                )),
            ),
            ("webpki-roots, no settings", None),
            (
                "no client certificate",
                Some(RedisTls::new().ca_pem(redis.pki.ca_pem())),
            ),
        ];
    for (case, tls) in cases {
        let limiter = limiter(redis.url(), "refused", tls);
        match limiter.acquire("client", 1).await {
            Err(RedisLimitError::Unavailable(_)) => {}
            other => panic!("{case}: {other:?}"),
        }
    }
    assert!(redis.server.keys("refused:*").await.is_empty());
    // Failing open, such a check is answered by the local share, not by Redis.
    let open = RedisRateLimiter::builder(redis.url(), quota())
        .prefix("refused-open")
        .timeout(Duration::from_secs(2))
        .failure_policy(FailurePolicy::FailOpen {
            local_share: quota(),
        })
        .tls(RedisTls::new().ca_pem(other.ca_pem()))
        .build()
        .unwrap();
    match open.acquire("client", 1).await {
        Ok((_, Source::Local)) => {}
        other => panic!("failing open: {other:?}"),
    }
}

/// Settings that cannot work are refused when the limiter is built, naming the setting:
/// a URL that turns the certificate check off, TLS settings for a plain URL (which would
/// be ignored), a CA file without a certificate, a client certificate without one or
/// with a key that is not its own.
#[test]
fn tls_settings_that_cannot_work_are_refused_when_built() {
    let pki = Pki::new();
    let client = pki.leaf(&["seawall-client"], "seawall");
    let stranger = pki.leaf(&["someone-else"], "other");
    let build = |url: &str, tls: Option<RedisTls>| {
        let mut builder = RedisRateLimiter::builder(url, quota());
        if let Some(tls) = tls {
            builder = builder.tls(tls);
        }
        builder.build().expect_err(url)
    };
    let insecure = build("rediss://127.0.0.1:6380/#insecure", None);
    assert_eq!(insecure.field(), "url", "{insecure}");
    let plain = build("redis://127.0.0.1:6379/", Some(RedisTls::new()));
    assert_eq!(plain.field(), "tls", "{plain}");
    let url = "rediss://127.0.0.1:6380/";
    let no_ca = build(url, Some(RedisTls::new().ca_pem("not a certificate")));
    assert_eq!(no_ca.field(), "tls.ca", "{no_ca}");
    let no_cert = build(
        url,
        Some(RedisTls::new().client_certificate("", client.key_pem.clone())),
    );
    assert_eq!(no_cert.field(), "tls.client_certificate", "{no_cert}");
    let bad_key = build(
        url,
        Some(RedisTls::new().client_certificate(client.cert_pem.clone(), "garbage")),
    );
    assert_eq!(bad_key.field(), "tls.client_key", "{bad_key}");
    let wrong_key = build(
        url,
        Some(RedisTls::new().client_certificate(client.cert_pem.clone(), stranger.key_pem)),
    );
    assert_eq!(wrong_key.field(), "tls.client_key", "{wrong_key}");
    // A cluster's nodes are checked as a URL is.
    let error = RedisRateLimiter::cluster_builder(["rediss://127.0.0.1:7000/#insecure"], quota())
        .build()
        .expect_err("#insecure");
    assert_eq!(error.field(), "nodes[0]", "{error}");
    // The key stays out of the builder's debug output.
    let shown = format!(
        "{:?}",
        RedisTls::new().client_certificate(client.cert_pem.clone(), client.key_pem.clone())
    );
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
}

/// `#insecure` is refused however the URL spells it for the `redis` crate's parser, which
/// drops spaces and control characters around a URL and tabs and line breaks inside it
/// (a URL read from a file keeps its line break): each of these would build a limiter
/// whose certificate check is off, or that never connects.
#[test]
fn an_insecure_fragment_is_refused_however_spelled() {
    for url in [
        "rediss://127.0.0.1:6380/#insecure ",
        "rediss://127.0.0.1:6380/#insecure\n",
        "rediss://127.0.0.1:6380/#insec\ture",
        " rediss://127.0.0.1:6380/#insecure",
        "\trediss://127.0.0.1:6380/#insecure",
        "REDISS://127.0.0.1:6380/#insecure",
        "valkeys://127.0.0.1:6380/#insecure",
    ] {
        let error = RedisRateLimiter::builder(url, quota())
            .build()
            .expect_err(url);
        assert_eq!(error.field(), "url", "{url:?}: {error}");
        assert!(error.reason().contains("#insecure"), "{url:?}: {error}");
    }
}

/// `valkeys://`, which the `redis` crate takes as TLS as it does `rediss://`, takes the
/// TLS settings (it was refused as a plain-text URL) and shares the bucket over TLS.
#[tokio::test]
async fn a_valkeys_url_is_tls() {
    let redis = TlsRedis::start().await;
    let url = format!("valkeys://127.0.0.1:{}/", redis.tls_port);
    let limiter = limiter(url, "valkeys", Some(redis.tls()));
    match limiter.acquire("client", 1).await {
        Ok((_, Source::Redis)) => {}
        other => panic!("over TLS: {other:?}"),
    }
    assert_eq!(redis.server.keys("valkeys:*").await.len(), 1);
}
