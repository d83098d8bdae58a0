//! JWT verification never panics on any token, header or time, and never accepts a
//! token it did not sign: with a secret the fuzzer does not know, only errors come back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seawall::gateway::jwt::JwtVerifier;

fuzz_target!(|input: (String, Vec<u8>, u64)| {
    let (token, header, now) = input;
    let verifier = JwtVerifier::new(b"fuzzing secret, not in the corpus")
        .issuer("seawall")
        .audience("api");
    assert!(verifier.verify_at(&token, now).is_err());
    if let Ok(value) = http::HeaderValue::from_bytes(&header) {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, value);
        assert!(verifier.verify_header(&headers).is_err());
    }
    // A token it signed, with the fuzzer's claims, never panics either.
    let claims = serde_json::json!({ "iss": "seawall", "aud": "api", "exp": now, "sub": token });
    let _ = verifier.verify_at(&verifier.sign(&claims), now);
});
