//! HS256 JSON Web Tokens: verification of `Authorization: Bearer` credentials.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::config::JwtConfig;
use crate::ConfigError;

type HmacSha256 = Hmac<Sha256>;

/// The longest token accepted (bytes); longer ones are refused before decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Why a token was refused. Every variant becomes the same 401 answer; the reason is
/// kept for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtError {
    /// No `Authorization: Bearer` header.
    Missing,
    /// Not three base64url parts of JSON, or too long.
    Malformed,
    /// An `alg` other than HS256 (including `none`).
    UnsupportedAlgorithm,
    /// The signature does not match.
    BadSignature,
    /// `exp` is past.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    WrongAudience,
    /// No `exp` claim, while one is required ([`JwtVerifier::require_exp`]).
    MissingExpiry,
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Missing => "missing bearer token",
            Self::Malformed => "malformed token",
            Self::UnsupportedAlgorithm => "unsupported algorithm",
            Self::BadSignature => "invalid signature",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::WrongIssuer => "wrong issuer",
            Self::WrongAudience => "wrong audience",
            Self::MissingExpiry => "token without exp",
        })
    }
}

impl std::error::Error for JwtError {}

/// Verifies HS256 tokens against a shared secret, and the `exp`, `nbf`, `iss` and `aud`
/// claims. Cloning is cheap enough for per-route copies.
///
/// ```
/// use seawall::gateway::jwt::{JwtError, JwtVerifier};
///
/// let verifier = JwtVerifier::new(b"a secret of at least thirty-two bytes");
/// let token = verifier.sign(&serde_json::json!({ "sub": "ada", "exp": 4_000_000_000u64 }));
/// assert_eq!(verifier.verify(&token)?["sub"], "ada");
/// assert_eq!(verifier.verify("a.b.c"), Err(JwtError::Malformed));
/// # Ok::<(), JwtError>(())
/// ```
#[derive(Clone)]
pub struct JwtVerifier {
    key: HmacSha256,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    require_exp: bool,
    /// Shared by clones; a new one whenever a setting changes.
    cache: Arc<TokenCache>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("require_exp", &self.require_exp)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// A verifier for tokens signed with `secret`, with no issuer or audience check, and
    /// no `exp` required (see [`require_exp`](Self::require_exp); `[auth.jwt]` requires
    /// it by default).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            // HMAC takes keys of any length.
            key: <HmacSha256 as Mac>::new_from_slice(secret)
                .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length")),
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
            require_exp: false,
            cache: Arc::new(TokenCache::new()),
        }
    }

    /// A verifier from `[auth.jwt]`, its secret read from where the section says.
    ///
    /// # Errors
    ///
    /// When the secret cannot be read or is refused
    /// ([`JwtConfig::resolve_secret`]).
    pub fn from_config(config: &JwtConfig) -> Result<Self, ConfigError> {
        let mut v = Self::new(config.resolve_secret()?.as_bytes());
        v.issuer = config.issuer.clone();
        v.audience = config.audience.clone();
        v.leeway = config.leeway;
        v.require_exp = config.require_exp;
        v.cache = Arc::new(TokenCache::new());
        Ok(v)
    }

    /// Refuses tokens without an `exp` claim ([`JwtError::MissingExpiry`]) when `true`.
    #[must_use]
    pub fn require_exp(mut self, require: bool) -> Self {
        self.require_exp = require;
        self.cache = Arc::new(TokenCache::new());
        self
    }

    /// Requires `iss` to be `issuer`.
    #[must_use]
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self.cache = Arc::new(TokenCache::new());
        self
    }

    /// Requires `aud` to be or contain `audience`.
    #[must_use]
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self.cache = Arc::new(TokenCache::new());
        self
    }

    /// Tolerates this much clock skew on `exp` and `nbf`.
    #[must_use]
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self.cache = Arc::new(TokenCache::new());
        self
    }

    /// Signs `claims` with HS256 (for tests and tools issuing their own tokens).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.key.clone();
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{signature}")
    }

    /// Checks the `Authorization` header's bearer token.
    ///
    /// # Errors
    ///
    /// [`JwtError::Missing`] without a bearer token, or why the token is refused.
    pub fn verify_header(
        &self,
        headers: &http::HeaderMap,
    ) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
        self.verify(bearer(headers)?)
    }

    /// Checks the `Authorization` header's bearer token as [`verify_header`] does, without
    /// returning the claims, answering from a cache of tokens this verifier (or a clone)
    /// has already verified: a client sending the same token again costs a hash and a
    /// comparison, not a signature check and two JSON parses. `exp` and `nbf` are checked
    /// again on every use, so a cached token expires on time. The cache holds up to 1024
    /// tokens of up to 1 KiB (longer ones are verified every time), only ones whose
    /// signature and claims passed, so an attacker cannot fill it.
    ///
    /// [`verify_header`]: Self::verify_header
    ///
    /// # Errors
    ///
    /// As [`verify_header`](Self::verify_header).
    pub fn check_header(&self, headers: &http::HeaderMap) -> Result<(), JwtError> {
        let token = bearer(headers)?;
        self.check_at(token, now_millis())
    }

    /// [`check_header`](Self::check_header) for a token, as if the time were `now`
    /// (milliseconds since the Unix epoch).
    fn check_at(&self, token: &str, now: u64) -> Result<(), JwtError> {
        if let Some(times) = self.cache.get(token) {
            return times.check(now, self.leeway_millis());
        }
        let (_, times) = self.verify_with_times(token, now)?;
        self.cache.insert(token, times);
        Ok(())
    }

    /// Verifies a compact token now; on success, its claims.
    ///
    /// # Errors
    ///
    /// Why the token is refused.
    pub fn verify(
        &self,
        token: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
        self.verify_with_times(token, now_millis())
            .map(|(claims, _)| claims)
    }

    /// Verifies a token as if the time were `now` (seconds since the Unix epoch).
    ///
    /// # Errors
    ///
    /// Why the token is refused.
    pub fn verify_at(
        &self,
        token: &str,
        now: u64,
    ) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
        self.verify_with_times(token, now.saturating_mul(1000))
            .map(|(claims, _)| claims)
    }

    /// The leeway, in milliseconds: kept to the millisecond, as configured.
    fn leeway_millis(&self) -> u64 {
        u64::try_from(self.leeway.as_millis()).unwrap_or(u64::MAX)
    }

    /// [`verify_at`](Self::verify_at) at `now` in milliseconds since the Unix epoch, with
    /// the validity period it read.
    fn verify_with_times(
        &self,
        token: &str,
        now: u64,
    ) -> Result<(serde_json::Map<String, serde_json::Value>, Times), JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header_json = decode_json(header)?;
        match header_json.get("alg").and_then(|a| a.as_str()) {
            Some("HS256") => {}
            Some(_) => return Err(JwtError::UnsupportedAlgorithm),
            None => return Err(JwtError::Malformed),
        }
        // `crit` extensions are not understood: refuse, as RFC 7515 asks.
        if header_json.contains_key("crit") {
            return Err(JwtError::UnsupportedAlgorithm);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| JwtError::Malformed)?;
        let mut mac = self.key.clone();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&signature)
            .map_err(|_| JwtError::BadSignature)?;
        let claims = decode_json(payload)?;
        let times = Times {
            exp: claims.get("exp").map(numeric_date).transpose()?,
            nbf: claims.get("nbf").map(numeric_date).transpose()?,
        };
        if self.require_exp && times.exp.is_none() {
            return Err(JwtError::MissingExpiry);
        }
        times.check(now, self.leeway_millis())?;
        if let Some(issuer) = &self.issuer {
            if claims.get("iss").and_then(|i| i.as_str()) != Some(issuer.as_str()) {
                return Err(JwtError::WrongIssuer);
            }
        }
        if let Some(audience) = &self.audience {
            let ok = match claims.get("aud") {
                Some(serde_json::Value::String(a)) => a == audience,
                Some(serde_json::Value::Array(list)) => {
                    list.iter().any(|a| a.as_str() == Some(audience.as_str()))
                }
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        Ok((claims, times))
    }
}

/// The bearer token of an `Authorization` header.
fn bearer(headers: &http::HeaderMap) -> Result<&str, JwtError> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(JwtError::Missing)?;
    let value = value.to_str().map_err(|_| JwtError::Malformed)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(JwtError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(JwtError::Missing);
    }
    Ok(token.trim())
}

/// Now, in milliseconds since the Unix epoch.
fn now_millis() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    u64::try_from(now).unwrap_or(u64::MAX)
}

/// A token's validity period, in milliseconds since the Unix epoch (a fractional `exp` or
/// `nbf` kept to the millisecond).
#[derive(Clone, Copy)]
struct Times {
    exp: Option<u64>,
    nbf: Option<u64>,
}

impl Times {
    fn check(self, now: u64, leeway: u64) -> Result<(), JwtError> {
        if self
            .exp
            .is_some_and(|exp| now >= exp.saturating_add(leeway))
        {
            return Err(JwtError::Expired);
        }
        if self.nbf.is_some_and(|nbf| now.saturating_add(leeway) < nbf) {
            return Err(JwtError::NotYetValid);
        }
        Ok(())
    }
}

/// Tokens verified lately: a direct-mapped table, each token in the slot its keyed hash
/// picks (the key is random per cache, so nobody can aim tokens at one slot), a newer
/// token replacing an older one.
struct TokenCache {
    hasher: std::hash::RandomState,
    slots: Box<[parking_lot::Mutex<Option<CachedToken>>]>,
}

struct CachedToken {
    hash: u64,
    token: Box<str>,
    times: Times,
}

impl TokenCache {
    const SLOTS: usize = 1024;
    const MAX_LEN: usize = 1024;

    fn new() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            slots: (0..Self::SLOTS)
                .map(|_| parking_lot::Mutex::new(None))
                .collect(),
        }
    }

    fn slot(&self, hash: u64) -> &parking_lot::Mutex<Option<CachedToken>> {
        // SLOTS is a power of two.
        &self.slots[hash as usize & (Self::SLOTS - 1)]
    }

    fn get(&self, token: &str) -> Option<Times> {
        if token.len() > Self::MAX_LEN {
            return None;
        }
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, token);
        let slot = self.slot(hash).lock();
        let cached = slot.as_ref()?;
        // The keyed hash first: a different token matches it by chance only. The bytes
        // then in constant time, so that timing tells nothing of a cached token.
        (cached.hash == hash && constant_time_eq(cached.token.as_bytes(), token.as_bytes()))
            .then_some(cached.times)
    }

    fn insert(&self, token: &str, times: Times) {
        if token.len() > Self::MAX_LEN {
            return;
        }
        let hash = std::hash::BuildHasher::hash_one(&self.hasher, token);
        *self.slot(hash).lock() = Some(CachedToken {
            hash,
            token: token.into(),
            times,
        });
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn decode_json(part: &str) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(JwtError::Malformed),
    }
}

/// A NumericDate: seconds since the epoch, possibly fractional; negative counts as 0.
/// A `NumericDate` (seconds since the Unix epoch, maybe fractional), in milliseconds.
fn numeric_date(v: &serde_json::Value) -> Result<u64, JwtError> {
    if let Some(n) = v.as_u64() {
        return Ok(n.saturating_mul(1000));
    }
    match v.as_f64() {
        Some(f) if f.is_finite() => Ok(if f <= 0.0 {
            0
        } else {
            (f * 1000.0).min(u64::MAX as f64) as u64
        }),
        _ => Err(JwtError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(b"0123456789abcdef-secret")
            .issuer("seawall")
            .audience("api")
    }

    fn good() -> serde_json::Value {
        json!({ "sub": "ada", "iss": "seawall", "aud": ["web", "api"], "exp": NOW + 60, "nbf": NOW - 60 })
    }

    fn forge(header: &str, payload: &serde_json::Value, sig: &str) -> String {
        format!(
            "{}.{}.{sig}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        )
    }

    /// A leeway and a fractional `exp` or `nbf` count to the millisecond: `leeway =
    /// "1500ms"` tolerated 1 s of skew (and "500ms" none), and a fractional `nbf` let a
    /// token in up to a second early.
    #[test]
    fn leeway_and_fractional_times_keep_their_milliseconds() {
        let v = JwtVerifier::new(b"0123456789abcdef-leeway-secret".as_slice())
            .leeway(Duration::from_millis(1500));
        let token = v.sign(&json!({ "exp": NOW }));
        for _ in 0..2 {
            // Verified, then from the cache.
            assert_eq!(v.check_at(&token, NOW * 1000 + 1499), Ok(()));
        }
        assert_eq!(
            v.check_at(&token, NOW * 1000 + 1500),
            Err(JwtError::Expired)
        );
        let strict = JwtVerifier::new(b"0123456789abcdef-leeway-secret".as_slice());
        let token = strict.sign(&json!({ "exp": NOW + 60, "nbf": NOW as f64 + 0.75 }));
        assert_eq!(
            strict.check_at(&token, NOW * 1000 + 749),
            Err(JwtError::NotYetValid)
        );
        assert_eq!(strict.check_at(&token, NOW * 1000 + 750), Ok(()));
        let token = strict.sign(&json!({ "exp": NOW as f64 + 0.25 }));
        assert_eq!(strict.check_at(&token, NOW * 1000 + 249), Ok(()));
        assert_eq!(
            strict.check_at(&token, NOW * 1000 + 250),
            Err(JwtError::Expired)
        );
    }

    #[test]
    fn cached_tokens_still_expire_and_wait_for_nbf() {
        let v = verifier();
        let token = v.sign(&good());
        assert!(v.cache.get(&token).is_none());
        assert_eq!(v.check_at(&token, NOW * 1000), Ok(()));
        assert!(v.cache.get(&token).is_some(), "a verified token is cached");
        // Served from the cache, with the times checked on every use.
        assert_eq!(v.check_at(&token, NOW * 1000), Ok(()));
        assert_eq!(
            v.check_at(&token, (NOW + 60) * 1000),
            Err(JwtError::Expired)
        );
        assert_eq!(
            v.check_at(&token, (NOW - 61) * 1000),
            Err(JwtError::NotYetValid)
        );
        // A clone shares the cache; a changed setting starts a new one.
        assert!(v.clone().cache.get(&token).is_some());
        let stricter = v.clone().audience("admin");
        assert!(stricter.cache.get(&token).is_none());
        assert_eq!(
            stricter.check_at(&token, NOW * 1000),
            Err(JwtError::WrongAudience),
            "the cache never answers for another configuration"
        );
    }

    #[test]
    fn only_good_tokens_are_cached() {
        let v = verifier();
        let token = v.sign(&good());
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        for _ in 0..2 {
            assert_eq!(
                v.check_at(&tampered, NOW * 1000),
                Err(JwtError::BadSignature)
            );
            assert!(v.cache.get(&tampered).is_none());
        }
        let expired = v.sign(&json!({ "iss": "seawall", "aud": "api", "exp": NOW - 1 }));
        assert_eq!(v.check_at(&expired, NOW * 1000), Err(JwtError::Expired));
        assert!(v.cache.get(&expired).is_none());
        // A token that differs from a cached one in its last byte is not taken for it.
        assert_eq!(v.check_at(&token, NOW * 1000), Ok(()));
        assert_eq!(
            v.check_at(&tampered, NOW * 1000),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn check_header_agrees_with_verify_header() {
        let v = verifier();
        let token = v.sign(&good());
        for value in [
            format!("Bearer {token}"),
            format!("bearer   {token} "),
            format!("Basic {token}"),
            "Bearer a.b.c".to_owned(),
            "Bearer".to_owned(),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(
                v.check_header(&headers),
                v.verify_header(&headers).map(|_| ()),
                "{value}"
            );
        }
        assert_eq!(
            v.check_header(&http::HeaderMap::new()),
            Err(JwtError::Missing)
        );
    }

    #[test]
    fn the_cache_stays_bounded() {
        let v = verifier();
        let tokens: Vec<String> = (0..3 * TokenCache::SLOTS)
            .map(|i| v.sign(&json!({ "iss": "seawall", "aud": "api", "n": i })))
            .collect();
        for t in &tokens {
            assert_eq!(v.check_at(t, NOW * 1000), Ok(()));
        }
        let cached = v.cache.slots.iter().filter(|s| s.lock().is_some()).count();
        assert!(cached <= TokenCache::SLOTS);
        assert_eq!(v.cache.slots.len(), TokenCache::SLOTS);
        // Too long to be cached: verified every time, and still accepted.
        let long = v.sign(&json!({ "iss": "seawall", "aud": "api", "pad": "x".repeat(2000) }));
        assert_eq!(v.check_at(&long, NOW * 1000), Ok(()));
        assert!(v.cache.get(&long).is_none());
    }

    #[test]
    fn a_good_token_passes() {
        let v = verifier();
        let claims = v.verify_at(&v.sign(&good()), NOW).unwrap();
        assert_eq!(claims["sub"], "ada");
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!(
                "Bearer {}",
                v.sign(&json!({"iss": "seawall", "aud": "api"}))
            )
            .parse()
            .unwrap(),
        );
        assert!(v.verify_header(&headers).is_ok());
    }

    #[test]
    fn tampered_tokens_fail() {
        let v = verifier();
        let token = v.sign(&good());
        let (head, sig) = token.rsplit_once('.').unwrap();
        let (header, _) = head.split_once('.').unwrap();
        let other = URL_SAFE_NO_PAD
            .encode(json!({"sub": "eve", "iss": "seawall", "aud": "api"}).to_string());
        assert_eq!(
            v.verify_at(&format!("{header}.{other}.{sig}"), NOW),
            Err(JwtError::BadSignature)
        );
        let mut bad_sig = sig.to_owned();
        bad_sig.replace_range(0..1, if sig.starts_with('A') { "B" } else { "A" });
        assert_eq!(
            v.verify_at(&format!("{head}.{bad_sig}"), NOW),
            Err(JwtError::BadSignature)
        );
        let other_key = JwtVerifier::new(b"another secret, 16+ bytes");
        assert_eq!(
            v.verify_at(&other_key.sign(&good()), NOW),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn time_claims_are_checked() {
        let v = verifier();
        let mut c = good();
        c["exp"] = json!(NOW);
        assert_eq!(v.verify_at(&v.sign(&c), NOW), Err(JwtError::Expired));
        assert!(
            v.clone()
                .leeway(Duration::from_secs(5))
                .verify_at(&v.sign(&c), NOW)
                .is_ok()
        );
        c["exp"] = json!(NOW + 60);
        c["nbf"] = json!(NOW + 10);
        assert_eq!(v.verify_at(&v.sign(&c), NOW), Err(JwtError::NotYetValid));
        c["nbf"] = json!("soon");
        assert_eq!(v.verify_at(&v.sign(&c), NOW), Err(JwtError::Malformed));
    }

    #[test]
    fn issuer_and_audience_are_checked() {
        let v = verifier();
        let mut c = good();
        c["iss"] = json!("mallory");
        assert_eq!(v.verify_at(&v.sign(&c), NOW), Err(JwtError::WrongIssuer));
        let mut c = good();
        c["aud"] = json!("web");
        assert_eq!(v.verify_at(&v.sign(&c), NOW), Err(JwtError::WrongAudience));
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(v.verify_at(&v.sign(&c), NOW), Err(JwtError::WrongAudience));
    }

    #[test]
    fn other_algorithms_are_refused() {
        let v = verifier();
        let none = forge(r#"{"alg":"none","typ":"JWT"}"#, &good(), "");
        assert_eq!(v.verify_at(&none, NOW), Err(JwtError::UnsupportedAlgorithm));
        let rs = forge(r#"{"alg":"RS256"}"#, &good(), "c2ln");
        assert_eq!(v.verify_at(&rs, NOW), Err(JwtError::UnsupportedAlgorithm));
        let lower = forge(r#"{"alg":"hs256"}"#, &good(), "c2ln");
        assert_eq!(
            v.verify_at(&lower, NOW),
            Err(JwtError::UnsupportedAlgorithm)
        );
        let no_alg = forge(r#"{"typ":"JWT"}"#, &good(), "c2ln");
        assert_eq!(v.verify_at(&no_alg, NOW), Err(JwtError::Malformed));
    }

    #[test]
    fn malformed_input_never_panics() {
        let v = verifier();
        for token in [
            "",
            ".",
            "..",
            "...",
            "a.b",
            "a.b.c.d",
            "!!.??.**",
            "e30.e30.",
            "e30.e30.e30",
            "bnVsbA.bnVsbA.AA",
            "W10.W10.AA",
            "\u{1F600}.\u{1F600}.\u{1F600}",
        ] {
            assert!(v.verify_at(token, NOW).is_err(), "{token}");
        }
        assert_eq!(
            v.verify_at(&"a".repeat(MAX_TOKEN_LEN + 1), NOW),
            Err(JwtError::Malformed)
        );
        let mut headers = http::HeaderMap::new();
        assert_eq!(v.verify_header(&headers), Err(JwtError::Missing));
        headers.insert(
            http::header::AUTHORIZATION,
            "Basic YWRhOmFkYQ==".parse().unwrap(),
        );
        assert_eq!(v.verify_header(&headers), Err(JwtError::Missing));
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(v.verify_header(&headers), Err(JwtError::Malformed));
    }
}
