//! Keys of bounded size for keyed limiters fed by clients (API-key headers and the like).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::OnceLock;

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
/// The digest is two SipHash-1-3 values of the value (domain-separated), keyed with a
/// random key drawn once per process (std's `RandomState`), so clients cannot choose two
/// long values with the same digest: they do not know the key, and a chance collision
/// needs about 2^64 distinct long values. Two processes digest the same value
/// differently, which is fine for a process's own table (do not persist or share
/// digests). Short and long values never collide with each other (the length is part of
/// the key).
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

fn digest_key() -> &'static RandomState {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    KEY.get_or_init(RandomState::new)
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
        let key = digest_key();
        let half = |domain: u8| {
            let mut h = key.build_hasher();
            h.write_u8(domain);
            h.write(value);
            h.finish()
        };
        bytes[..8].copy_from_slice(&half(0).to_le_bytes());
        bytes[8..16].copy_from_slice(&half(1).to_le_bytes());
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

/// The value (lossily, as UTF-8) or, for a digest, `#` and its 32 hex digits. Digests
/// differ between processes: a key shared through Redis by several replicas must not be
/// a digest (use values of at most [`INLINE_KEY_BYTES`] bytes, or a key extractor of your
/// own, with the `redis` limiters).
impl fmt::Display for BoundedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_inline() {
            Some(value) => f.write_str(&String::from_utf8_lossy(value)),
            None => {
                f.write_str("#")?;
                self.bytes[..16]
                    .iter()
                    .try_for_each(|b| write!(f, "{b:02x}"))
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

    #[test]
    fn keys_are_small_and_own_no_heap() {
        fn copy<T: Copy>() {}
        copy::<BoundedKey>();
        assert_eq!(std::mem::size_of::<BoundedKey>(), INLINE_KEY_BYTES + 1);
    }
}
