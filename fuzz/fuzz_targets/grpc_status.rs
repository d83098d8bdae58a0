//! `grpc-status` values and response heads from an upstream never panic the gRPC
//! classifier, and it keeps its rules: a canonical decimal 0–16 is that code, anything
//! else `UNKNOWN` (as tonic reads it); a non-200 status decides by the spec's mapping; a
//! 200 head decides only with a `grpc-status` header.
#![no_main]

use http::{HeaderValue, Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use seawall::grpc::{GrpcClassifier, GrpcCode};

fuzz_target!(|input: (Vec<u8>, u16, bool)| {
    let (value, status, with_header) = input;
    let code = GrpcCode::from_bytes(&value);
    let expected = std::str::from_utf8(&value)
        .ok()
        .and_then(|s| s.parse::<i32>().ok().filter(|n| n.to_string() == s))
        .filter(|n| (0..=16).contains(n))
        .map_or(GrpcCode::Unknown, GrpcCode::from_i32);
    assert_eq!(code, expected, "{value:?}");
    assert_eq!(GrpcCode::from_i32(code.as_i32()), code);

    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    let header = with_header.then(|| HeaderValue::from_bytes(&value).ok()).flatten();
    if let Some(header) = &header {
        response.headers_mut().insert("grpc-status", header.clone());
    }
    let classifier = GrpcClassifier::new();
    let decided = classifier.classify_head(&response);
    if status != StatusCode::OK {
        let mapped = GrpcCode::from_http_status(status);
        assert_eq!(decided, Some(classifier.classify_code(mapped)));
    } else if header.is_some() {
        assert_eq!(decided, Some(classifier.classify_code(code)));
    } else {
        assert_eq!(decided, None);
    }
});
