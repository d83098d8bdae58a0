//! Keys of bounded size for keyed limiters fed by clients (API-key headers and the like).

use std::fmt;
use std::hash::{Hash, Hasher};

/// The longest value a [`BoundedKey`] keeps as it is; longer ones are kept as a digest.
pub const INLINE_KEY_BYTES: usize = 64;

/// The `len` of a key holding a digest rather than the value.
const DIGEST: u8 = u8::MAX;

/// A key of fixed size, whatever its value's length: values of up to
/// [`INLINE_KEY_BYTES`] bytes are kept as they are, longer ones as a 128-bit keyed digest.
///
/// A [`KeyedRateLimiter`](crate::rate_limit::KeyedRateLimiter) bounds the number of keys it tracks;
/// with keys taken from requests (an `x-api-key` header, say) that is not a bound on
/// memory, since a client picks the length: 3 000 keys of 64 KiB each are 190 MB. With
/// `BoundedKey` every key is the same 65 bytes, inline, with no allocation of its own,
/// so the table's memory is bounded by its number of keys.
///
/// The digest is two SipHash-2-4 values of the value (domain-separated) under a fixed
/// key: every process, and every version of this crate, digests a value alike, so that
/// replicas sharing buckets through Redis
#[cfg_attr(
    feature = "http",
    doc = "([`HeaderKey`](crate::rate_limit::http::HeaderKey)"
)]
#[cfg_attr(not(feature = "http"), doc = "(`HeaderKey`")]
/// with the Redis limiter) agree on a long value's bucket, and a restarted replica finds it
/// again. A chance collision needs about 2^64 distinct long values. The key being public,
/// a client could look for two long values of its own with one digest; that merges only
/// the buckets of values it sends anyway. To collide with another client's value it
/// would need that value's digest, which nothing shows. Maps of keys hash with their own
/// random state (the table's), so a digest chosen by a client floods no table. Short and
/// long values never collide with each other (the length is part of the key).
///
/// ```
/// use seawall::rate_limit::{BoundedKey, INLINE_KEY_BYTES};
///
/// let short = BoundedKey::new(b"k-123");
/// assert_eq!(short.as_inline(), Some(&b"k-123"[..]));
/// let long = BoundedKey::new(&vec![b'k'; 64 * 1024]);
/// assert_eq!(long.as_inline(), None, "kept as a digest");
/// assert_eq!(long, BoundedKey::new(&vec![b'k'; 64 * 1024]));
/// assert!(std::mem::size_of::<BoundedKey>() <= INLINE_KEY_BYTES + 1);
/// ```
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BoundedKey {
    /// `0..=INLINE_KEY_BYTES`: the length of a value kept inline; [`DIGEST`]: the first
    /// 16 bytes are a digest. Unused bytes are zero, so that equality is bytewise.
    len: u8,
    bytes: [u8; INLINE_KEY_BYTES],
}

/// The digest's SipHash key: fixed, so that digests are the same in every process.
const DIGEST_KEY: (u64, u64) = (0x7365_6177_616c_6c2d, 0x626f_756e_6465_646b);

/// SipHash-2-4 of `domain` then `value`, under [`DIGEST_KEY`]: std's `SipHasher`,
/// deprecated for hash tables (for which `RandomState` is the better choice) but
/// specified as SipHash-2-4, so its values do not change with the Rust version.
#[allow(deprecated)]
fn sip(domain: u8, value: &[u8]) -> u64 {
    let mut h = std::hash::SipHasher::new_with_keys(DIGEST_KEY.0, DIGEST_KEY.1);
    h.write_u8(domain);
    h.write(value);
    h.finish()
}

impl BoundedKey {
    /// The key of `value`: the value itself if it is short, else its digest. Never
    /// allocates.
    pub fn new(value: &[u8]) -> Self {
        let mut bytes = [0u8; INLINE_KEY_BYTES];
        if value.len() <= INLINE_KEY_BYTES {
            bytes[..value.len()].copy_from_slice(value);
            return Self {
                len: value.len() as u8,
                bytes,
            };
        }
        bytes[..8].copy_from_slice(&sip(0, value).to_le_bytes());
        bytes[8..16].copy_from_slice(&sip(1, value).to_le_bytes());
        Self { len: DIGEST, bytes }
    }

    /// The value, if it was short enough to be kept as it is.
    pub fn as_inline(&self) -> Option<&[u8]> {
        (self.len != DIGEST).then(|| &self.bytes[..usize::from(self.len)])
    }

    /// The bytes that tell this key apart (the value, or the digest).
    fn used(&self) -> &[u8] {
        match self.len {
            DIGEST => &self.bytes[..16],
            n => &self.bytes[..usize::from(n)],
        }
    }
}

impl Hash for BoundedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Only the bytes in use: a short key hashes as fast as a short string.
        state.write_u8(self.len);
        state.write(self.used());
    }
}

impl fmt::Debug for BoundedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_inline() {
            Some(value) => write!(f, "BoundedKey({:?})", String::from_utf8_lossy(value)),
            None => write!(f, "BoundedKey(digest {:02x?})", &self.bytes[..16]),
        }
    }
}

/// The value as it is when it is UTF-8 and does not begin with `#`; otherwise `#x` and its
/// bytes in hex; for a digest, `#` and its 32 hex digits. One string for one key and one
/// key for one string (a value spelling out a digest, or bytes that are not UTF-8, are
/// written out in hex), and the same in every process: the `redis` limiters name their
/// buckets with it, so the replicas agree on a long value's bucket, and no value shares
/// another's.
impl fmt::Display for BoundedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = |f: &mut fmt::Formatter<'_>, bytes: &[u8]| {
            bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
        };
        match self.as_inline() {
            Some(value) => match std::str::from_utf8(value) {
                Ok(text) if !text.starts_with('#') => f.write_str(text),
                _ => {
                    f.write_str("#x")?;
                    hex(f, value)
                }
            },
            None => {
                f.write_str("#")?;
                hex(f, &self.bytes[..16])
            }
        }
    }
}

impl From<&str> for BoundedKey {
    fn from(value: &str) -> Self {
        Self::new(value.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct keys are written distinctly: a value spelling out a digest, a value
    /// beginning with `#`, and values that are not UTF-8 (once all one `U+FFFD`).
    #[test]
    fn display_is_one_to_one() {
        let long = BoundedKey::new(&[b'k'; 100]);
        let spelled = long.to_string();
        assert_eq!(spelled.len(), 33);
        let keys = [
            long,
            BoundedKey::new(spelled.as_bytes()),
            BoundedKey::new(b"#x6b"),
            BoundedKey::new(b"k"),
            BoundedKey::new(b"\xff"),
            BoundedKey::new(b"\xfe"),
            BoundedKey::new("\u{fffd}".as_bytes()),
            BoundedKey::new(b""),
            BoundedKey::new(b"#"),
        ];
        let shown: std::collections::HashSet<String> = keys.iter().map(|k| k.to_string()).collect();
        assert_eq!(shown.len(), keys.len(), "{shown:?}");
        assert_eq!(BoundedKey::new(b"k-123").to_string(), "k-123");
        assert_eq!(BoundedKey::new(b"#a").to_string(), "#x2361");
    }

    #[test]
    fn short_values_inline_long_ones_digested() {
        let at_bound = vec![b'a'; INLINE_KEY_BYTES];
        let over = vec![b'a'; INLINE_KEY_BYTES + 1];
        assert_eq!(BoundedKey::new(&at_bound).as_inline(), Some(&at_bound[..]));
        assert_eq!(BoundedKey::new(&over).as_inline(), None);
        assert_ne!(BoundedKey::new(&at_bound), BoundedKey::new(&over));
        assert_eq!(BoundedKey::new(b""), BoundedKey::new(b""));
        assert_ne!(BoundedKey::new(b""), BoundedKey::new(b"\0"));
        // Long values differing in their last byte only are different keys.
        let mut a = vec![b'k'; 400_000];
        let b = a.clone();
        a[399_999] = b'x';
        assert_ne!(BoundedKey::new(&a), BoundedKey::new(&b));
        assert_eq!(BoundedKey::new(&b), BoundedKey::new(&b.clone()));
    }

    /// SipHash-2-4's reference vector (key `00..0f`, message `00..0e`): what the digest
    /// is made of is the specified function, whatever std's hash tables use.
    #[test]
    #[allow(deprecated)]
    fn the_digest_is_siphash_2_4() {
        let key = |i: u64| (0..8).fold(0u64, |k, b| k | (8 * i + b) << (8 * b));
        let mut h = std::hash::SipHasher::new_with_keys(key(0), key(1));
        h.write(&(0u8..15).collect::<Vec<_>>());
        assert_eq!(h.finish(), 0xa129_ca61_49be_45e5);
    }

    /// Digests are fixed: the same in every process and every version, for buckets
    /// shared through Redis. A change here moves every long key's bucket.
    #[test]
    fn a_digest_is_the_same_everywhere() {
        let key = BoundedKey::new(&[b'k'; 100]);
        assert_eq!(key.to_string(), "#1e89178fea483a1e515a495ab554ba89");
    }

    #[test]
    fn keys_are_small_and_own_no_heap() {
        fn copy<T: Copy>() {}
        copy::<BoundedKey>();
        assert_eq!(std::mem::size_of::<BoundedKey>(), INLINE_KEY_BYTES + 1);
    }
}
