//! Masking strategies: what a sensitive value (a whole cell, or one finding inside a cell) is
//! replaced with.
//!
//! Owns [`Strategy`] (redact, partial, hash, null), its strictness order ([`StrategyKind`]),
//! the HMAC key ([`HashKey`]) and [`Strategy::apply`]. Pure byte functions: never looks at
//! columns, rules or protocols, and appends to a caller's buffer instead of allocating.
//!
//! Invariants the other layers rely on:
//! - A redact mask and a partial mask character contain none of `"` `\` `,` `(` `)` `{` `}`
//!   nor control characters (checked by [`check_mask`] when rules are compiled), and a hash is
//!   `h:` plus lowercase hex. So a replacement written inside a JSON string, a composite
//!   (`(a,b)`) or an array (`{a,b}`) text value never changes its structure.
//! - Partial masking keeps at most half of the maskable characters, however large `keep` is:
//!   a short value is never returned in clear.
//! - Hashing is HMAC-SHA256 of the exact bytes, so equal inputs give equal outputs (joins on
//!   hashed columns still match) and nobody without the key can confirm a guess.
use ring::hmac;
use thiserror::Error;

/// Why a strategy's parameters are unusable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StrategyError {
    #[error("mask {mask:?} is empty")]
    EmptyMask { mask: String },
    #[error("mask {mask:?} contains {ch:?}, which could break JSON, array or composite values")]
    UnsafeMaskChar { mask: String, ch: char },
    #[error("hash key is {len} bytes; at least {min} are required")]
    KeyTooShort { len: usize, min: usize },
}

/// Characters a mask must not contain (see the module invariants).
const UNSAFE_MASK_CHARS: &[char] = &['"', '\\', ',', '(', ')', '{', '}'];

/// Shortest accepted HMAC key.
pub const MIN_KEY_LEN: usize = 16;

/// Hex characters of HMAC output kept after the `h:` prefix (64 bits: collisions are
/// negligible for joins, and the output stays short).
pub const HASH_HEX_CHARS: usize = 16;

/// Checks that `mask` is safe to write into any text value (see the module invariants).
pub fn check_mask(mask: &str) -> Result<(), StrategyError> {
    if mask.is_empty() {
        return Err(StrategyError::EmptyMask {
            mask: mask.to_string(),
        });
    }
    match mask
        .chars()
        .find(|c| c.is_control() || UNSAFE_MASK_CHARS.contains(c))
    {
        Some(ch) => Err(StrategyError::UnsafeMaskChar {
            mask: mask.to_string(),
            ch,
        }),
        None => Ok(()),
    }
}

/// The HMAC-SHA256 key of the hash strategy.
#[derive(Clone)]
pub struct HashKey(hmac::Key);

impl HashKey {
    /// A key from raw bytes; at least [`MIN_KEY_LEN`] of them.
    pub fn new(bytes: &[u8]) -> Result<Self, StrategyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(StrategyError::KeyTooShort {
                len: bytes.len(),
                min: MIN_KEY_LEN,
            });
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }
}

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(..)")
    }
}

/// The four kinds of strategy, ordered from least to most strict: partial reveals part of the
/// value, hash reveals equality, redact reveals only that a value exists, null reveals nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StrategyKind {
    /// No mask: the value as it is (an override exempting a group).
    Clear,
    Partial,
    Hash,
    Redact,
    Null,
}

impl StrategyKind {
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::Clear => "clear",
            StrategyKind::Partial => "partial",
            StrategyKind::Hash => "hash",
            StrategyKind::Redact => "redact",
            StrategyKind::Null => "null",
        }
    }
}

/// A compiled strategy with its parameters.
#[derive(Debug, Clone)]
pub enum Strategy {
    /// Replace with a fixed mask.
    Redact { mask: Box<str> },
    /// Keep the last `keep` alphanumeric characters; replace every other alphanumeric character
    /// with `mask_char`; keep separators (anything not alphanumeric). With `keep_email_domain`,
    /// a value containing `@` keeps everything from its last `@` on and masks the whole local
    /// part.
    Partial {
        keep: usize,
        mask_char: char,
        keep_email_domain: bool,
    },
    /// `h:` + the first [`HASH_HEX_CHARS`] hex characters of HMAC-SHA256(key, value).
    Hash(HashKey),
    /// SQL NULL.
    Null,
    /// The value as it is: for overrides that exempt a group. The engine never applies it
    /// (a plan leaves exempt columns and detectors out), so `apply` copies the value.
    Clear,
}

/// What [`Strategy::apply`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The replacement was appended to the output buffer.
    Replaced,
    /// The value becomes SQL NULL; nothing was appended.
    Null,
}

impl Strategy {
    pub fn kind(&self) -> StrategyKind {
        match self {
            Strategy::Redact { .. } => StrategyKind::Redact,
            Strategy::Partial { .. } => StrategyKind::Partial,
            Strategy::Hash(_) => StrategyKind::Hash,
            Strategy::Null => StrategyKind::Null,
            Strategy::Clear => StrategyKind::Clear,
        }
    }

    /// Appends the masked form of `value` to `out`, or says it becomes NULL.
    pub fn apply(&self, value: &[u8], out: &mut Vec<u8>) -> Applied {
        match self {
            Strategy::Redact { mask } => out.extend_from_slice(mask.as_bytes()),
            Strategy::Partial {
                keep,
                mask_char,
                keep_email_domain,
            } => {
                let at = if *keep_email_domain {
                    value.iter().rposition(|&b| b == b'@')
                } else {
                    None
                };
                match at {
                    Some(at) => {
                        partial(&value[..at], 0, *mask_char, out);
                        out.extend_from_slice(&value[at..]);
                    }
                    None => partial(value, *keep, *mask_char, out),
                }
            }
            Strategy::Hash(key) => hash(key, value, out),
            Strategy::Null => return Applied::Null,
            Strategy::Clear => out.extend_from_slice(value),
        }
        Applied::Replaced
    }
}

/// The partial mask of `value`: see [`Strategy::Partial`]. UTF-8 values are masked per
/// character; other bytes are masked per byte (bytes >= 0x80 count as maskable).
fn partial(value: &[u8], keep: usize, mask_char: char, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    let mask = mask_char.encode_utf8(&mut buf).as_bytes();
    match std::str::from_utf8(value) {
        Ok(s) => {
            let maskable = s.chars().filter(|c| c.is_alphanumeric()).count();
            let mut to_mask = maskable - keep.min(maskable / 2);
            for c in s.chars() {
                if c.is_alphanumeric() && to_mask > 0 {
                    to_mask -= 1;
                    out.extend_from_slice(mask);
                } else {
                    let mut cb = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut cb).as_bytes());
                }
            }
        }
        Err(_) => {
            let is_maskable = |b: u8| b.is_ascii_alphanumeric() || b >= 0x80;
            let maskable = value.iter().filter(|&&b| is_maskable(b)).count();
            let mut to_mask = maskable - keep.min(maskable / 2);
            for &b in value {
                if is_maskable(b) && to_mask > 0 {
                    to_mask -= 1;
                    out.extend_from_slice(mask);
                } else {
                    out.push(b);
                }
            }
        }
    }
}

fn hash(key: &HashKey, value: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let tag = hmac::sign(&key.0, value);
    out.extend_from_slice(b"h:");
    for &b in tag.as_ref().iter().take(HASH_HEX_CHARS / 2) {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn run(s: &Strategy, v: &str) -> Option<String> {
        let mut out = Vec::new();
        match s.apply(v.as_bytes(), &mut out) {
            Applied::Replaced => Some(String::from_utf8(out).unwrap()),
            Applied::Null => None,
        }
    }

    fn partial4() -> Strategy {
        Strategy::Partial {
            keep: 4,
            mask_char: '*',
            keep_email_domain: false,
        }
    }

    fn key() -> HashKey {
        HashKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    #[test]
    fn redact_replaces_the_whole_value_with_the_mask() {
        let s = Strategy::Redact {
            mask: "****".into(),
        };
        assert_eq!(run(&s, "alice@example.com").as_deref(), Some("****"));
        assert_eq!(run(&s, "").as_deref(), Some("****"));
    }

    #[test]
    fn partial_keeps_the_last_digits_and_the_separators() {
        let s = partial4();
        assert_eq!(
            run(&s, "4111 1111 1111 1111").as_deref(),
            Some("**** **** **** 1111")
        );
        assert_eq!(run(&s, "123-45-6789").as_deref(), Some("***-**-6789"));
        assert_eq!(
            run(&s, "4111-1111-1111-1111").as_deref(),
            Some("****-****-****-1111")
        );
    }

    #[test]
    fn partial_never_reveals_more_than_half_of_a_short_value() {
        let s = partial4();
        assert_eq!(run(&s, "1234").as_deref(), Some("**34"));
        assert_eq!(run(&s, "123456").as_deref(), Some("***456"));
        assert_eq!(run(&s, "7").as_deref(), Some("*"));
    }

    #[test]
    fn partial_masks_per_character_in_utf8_and_per_byte_otherwise() {
        let s = partial4();
        assert_eq!(run(&s, "Müllerstraße").as_deref(), Some("********raße"));
        let mut out = Vec::new();
        s.apply(&[0xff, 0xfe, b'a', b'b', b'-', b'c', b'd'], &mut out);
        assert_eq!(out, b"***b-cd");
    }

    #[test]
    fn partial_with_email_domain_masks_the_local_part_only() {
        let s = Strategy::Partial {
            keep: 4,
            mask_char: '*',
            keep_email_domain: true,
        };
        assert_eq!(
            run(&s, "john.smith@example.com").as_deref(),
            Some("****.*****@example.com")
        );
        assert_eq!(
            run(&s, "no-at-sign-here").as_deref(),
            Some("**-**-****-here")
        );
    }

    #[test]
    fn hash_is_stable_short_hex_and_depends_on_the_key() {
        let s = Strategy::Hash(key());
        let a = run(&s, "alice@example.com").unwrap();
        assert_eq!(a, run(&s, "alice@example.com").unwrap());
        assert_ne!(a, run(&s, "bob@example.com").unwrap());
        assert_eq!(a.len(), 2 + HASH_HEX_CHARS);
        assert!(a.starts_with("h:"));
        assert!(
            a[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        let other = Strategy::Hash(HashKey::new(&[7u8; 32]).unwrap());
        assert_ne!(a, run(&other, "alice@example.com").unwrap());
    }

    #[test]
    fn null_produces_sql_null() {
        assert_eq!(run(&Strategy::Null, "x"), None);
    }

    #[test]
    fn a_short_hash_key_is_refused() {
        assert_eq!(
            HashKey::new(b"short").unwrap_err(),
            StrategyError::KeyTooShort { len: 5, min: 16 }
        );
    }

    #[test]
    fn masks_with_structural_characters_are_refused() {
        assert!(check_mask("****").is_ok());
        assert!(check_mask("[redacted]").is_ok());
        for bad in ["\"x\"", "a\\b", "a,b", "(x)", "{x}", "a\tb", ""] {
            assert!(check_mask(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn strictness_orders_partial_below_hash_below_redact_below_null() {
        assert!(StrategyKind::Partial < StrategyKind::Hash);
        assert!(StrategyKind::Hash < StrategyKind::Redact);
        assert!(StrategyKind::Redact < StrategyKind::Null);
    }
}
