//! Header values (and rewritten request paths) made per request without an allocation
//! each.
//!
//! A value such as `RateLimit: "global";r=9;t=1`, a request id or a `traceparent` is a
//! few dozen bytes that change with every request. Made the usual way (a `Vec` turned
//! into a [`HeaderValue`]), each costs an allocation and its free. Here a thread writes
//! them one after the other into a chunk of its own and hands out reference-counted
//! slices of it: one allocation per chunk (and one for its shared count), then a
//! counter increment per value. A chunk is freed when the last value cut from it is
//! dropped; a thread keeps one chunk with space left, so the memory held is a chunk a
//! thread plus the chunks still referenced by values in flight, or kept: a response
//! cached with such a header keeps its whole chunk (4 KiB) alive.

use std::cell::RefCell;

use bytes::BytesMut;
use http::HeaderValue;
use http::header::InvalidHeaderValue;

/// The size of a chunk.
const CHUNK: usize = 4096;
/// Longer values get an allocation of their own, so that one does not waste a chunk.
const LARGEST_SHARED: usize = 256;

thread_local! {
    static CHUNK_LEFT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The concatenation of `parts` as a header value (checked as
/// [`HeaderValue::from_bytes`] checks it), written into this thread's current chunk.
pub(crate) fn value(parts: &[&[u8]]) -> Result<HeaderValue, InvalidHeaderValue> {
    HeaderValue::from_maybe_shared(bytes(parts))
}

/// The concatenation of `parts`, written into this thread's current chunk (a request
/// path rewritten for the upstream, say); longer than [`LARGEST_SHARED`], or while the
/// thread ends, a buffer of its own.
pub(crate) fn bytes(parts: &[&[u8]]) -> bytes::Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let shared = if len <= LARGEST_SHARED {
        CHUNK_LEFT
            .try_with(|left| {
                let mut left = left.borrow_mut();
                if left.capacity() < len {
                    *left = BytesMut::with_capacity(CHUNK);
                }
                for part in parts {
                    left.extend_from_slice(part);
                }
                left.split().freeze()
            })
            .ok()
    } else {
        None
    };
    // Too long, or the thread is ending: a buffer of its own (the vector's, not a copy
    // of it).
    shared.unwrap_or_else(|| bytes::Bytes::from(parts.concat()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_their_parts_and_stay_whole_across_chunks() {
        let mut kept = Vec::new();
        // Enough values to fill several chunks; each one is kept alive while later ones
        // are written.
        for i in 0..2000u32 {
            let n = i.to_string();
            let v = value(&[b"\"p\";r=", n.as_bytes(), b";t=1"]).unwrap();
            assert_eq!(v.as_bytes(), format!("\"p\";r={i};t=1").as_bytes());
            kept.push((i, v));
        }
        for (i, v) in &kept {
            assert_eq!(v.to_str().unwrap(), format!("\"p\";r={i};t=1"));
        }
    }

    #[test]
    fn long_empty_and_invalid_values() {
        let long = vec![b'a'; LARGEST_SHARED + 1];
        assert_eq!(value(&[&long]).unwrap().as_bytes(), &long[..]);
        let exact = vec![b'b'; LARGEST_SHARED];
        assert_eq!(value(&[&exact]).unwrap().as_bytes(), &exact[..]);
        assert_eq!(value(&[]).unwrap().as_bytes(), b"");
        assert!(value(&[b"a\nb"]).is_err());
        assert!(value(&[b"ok", b"\r"]).is_err());
        // A refused value leaves nothing behind in the chunk.
        assert_eq!(value(&[b"next"]).unwrap().as_bytes(), b"next");
    }

    #[test]
    fn values_outlive_their_thread() {
        let v = std::thread::spawn(|| value(&[b"from ", b"elsewhere"]).unwrap())
            .join()
            .unwrap();
        assert_eq!(v.as_bytes(), b"from elsewhere");
    }
}
