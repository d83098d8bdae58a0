//! The gateway's HTTP/1 client parsers on arbitrary bytes from an upstream: a response
//! head (`parse_response`) and a chunked body (`ChunkedDecoder`), each fed whole and fed
//! cut at an arbitrary point, as the network may deliver it. No panic; the same outcome
//! however the bytes are cut (what was parsed, what was left, the body's data, its
//! trailers, whether it ended, or the error); a chunked body's data never more than its
//! input.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use seawall::gateway::h1::{Chunk, ChunkedDecoder, parse_response};

/// What parsing a head found: status, version, framing, keep-alive, the fields, and the
/// bytes left after it; or the error; `None` if incomplete.
type HeadOutcome =
    Result<Option<(u16, String, String, bool, Vec<(String, Vec<u8>)>, Vec<u8>)>, &'static str>;

fn head(pieces: [&[u8]; 2], head_request: bool) -> HeadOutcome {
    let mut buf = BytesMut::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        let before = buf.len();
        match parse_response(&mut buf, head_request) {
            Err(e) => return Err(e.reason()),
            // Interim answers may have been consumed.
            Ok(None) => assert!(buf.len() <= before),
            Ok(Some(parsed)) => {
                assert!(buf.len() < before, "a head is at least its status line");
                let fields = parsed
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                return Ok(Some((
                    parsed.status.as_u16(),
                    format!("{:?}", parsed.version),
                    format!("{:?}", parsed.framing),
                    parsed.keep_alive,
                    fields,
                    // What follows the head: the rest of the input.
                    [&buf[..], &pieces[i + 1..].concat()].concat(),
                )));
            }
        }
    }
    Ok(None)
}

/// What decoding a chunked body found: its data, its trailers, whether it ended, and the
/// error if any.
type BodyOutcome = (Vec<u8>, Vec<(String, Vec<u8>)>, bool, Option<&'static str>);

fn body(pieces: [&[u8]; 2]) -> BodyOutcome {
    let mut decoder = ChunkedDecoder::new();
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), Vec::new());
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Err(e) => return (data, trailers, false, Some(e.reason())),
                Ok(None) => break,
                Ok(Some(Chunk::Data(d))) => {
                    assert!(!d.is_empty());
                    data.extend_from_slice(&d);
                }
                Ok(Some(Chunk::Trailers(t))) => {
                    trailers = t
                        .iter()
                        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect();
                }
                Ok(Some(Chunk::End)) => {
                    assert!(decoder.is_done());
                    return (data, trailers, true, None);
                }
            }
        }
    }
    (data, trailers, false, None)
}

fuzz_target!(|input: (bool, u16, &[u8])| {
    let (head_request, cut, bytes) = input;
    let cut = usize::from(cut) % (bytes.len() + 1);
    let (first, second) = bytes.split_at(cut);

    let whole = head([bytes, b""], head_request);
    let split = head([first, second], head_request);
    // A prefix may already be too large, or already wrong, where the whole is too: the
    // outcome is the same either way.
    assert_eq!(whole, split, "head cut at {cut}");

    let whole = body([bytes, b""]);
    let split = body([first, second]);
    assert_eq!(whole, split, "body cut at {cut}");
    assert!(whole.0.len() <= bytes.len());
});
