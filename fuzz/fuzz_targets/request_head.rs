//! The gateway's HTTP/1 server parser on arbitrary bytes from a client: a request head
//! (`parse_request`), fed whole and fed cut at an arbitrary point, as the network may
//! deliver it. No panic; the same outcome however the bytes are cut (the request, its
//! framing, what was left, or the error); and a head that is accepted is unambiguous: a
//! body framed by exactly one of `Content-Length` and `chunked`, one `Host` in HTTP/1.1.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use seawall::gateway::h1_server::{RequestBodyFraming, parse_request};

/// What parsing found: method, target, version, framing, keep-alive, expect-continue,
/// the fields, and the bytes left after the head; or the error; `None` if incomplete.
type Outcome = Result<
    Option<(
        String,
        String,
        String,
        String,
        bool,
        bool,
        Vec<(String, Vec<u8>)>,
        Vec<u8>,
    )>,
    (u16, &'static str),
>;

fn parse(pieces: [&[u8]; 2], max_head: usize) -> Outcome {
    let mut buf = BytesMut::new();
    for (i, piece) in pieces.iter().enumerate() {
        buf.extend_from_slice(piece);
        let before = buf.len();
        match parse_request(&mut buf, max_head) {
            Err(e) => return Err((e.status().as_u16(), e.reason())),
            Ok(None) => assert_eq!(buf.len(), before, "nothing consumed before a head"),
            Ok(Some(head)) => {
                assert!(buf.len() < before, "a head is at least its request line");
                let lengths = head.headers.get_all("content-length").iter().count();
                let codings = head.headers.get_all("transfer-encoding").iter().count();
                match head.body {
                    RequestBodyFraming::Chunked => assert_eq!(lengths, 0),
                    RequestBodyFraming::Length(n) => {
                        assert!(n > 0);
                        assert_eq!(codings, 0);
                    }
                    RequestBodyFraming::None => assert_eq!(codings, 0),
                }
                if head.version == http::Version::HTTP_11 {
                    assert_eq!(head.headers.get_all("host").iter().count(), 1);
                }
                let fields = head
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                    .collect();
                return Ok(Some((
                    head.method.to_string(),
                    head.uri.to_string(),
                    format!("{:?}", head.version),
                    format!("{:?}", head.body),
                    head.keep_alive,
                    head.expect_continue,
                    fields,
                    [&buf[..], &pieces[i + 1..].concat()].concat(),
                )));
            }
        }
    }
    Ok(None)
}

fuzz_target!(|input: (u16, bool, &[u8])| {
    let (cut, small, bytes) = input;
    let cut = usize::from(cut) % (bytes.len() + 1);
    let (first, second) = bytes.split_at(cut);
    // The configured bound: the smallest allowed, or the default.
    let max_head = if small { 8 * 1024 } else { 64 * 1024 };
    let whole = parse([bytes, b""], max_head);
    let split = parse([first, second], max_head);
    assert_eq!(whole, split, "cut at {cut}");
});
