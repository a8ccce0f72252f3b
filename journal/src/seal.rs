//! Encryption at rest: the values of the `events`, `sessions` and `requests` families are
//! sealed with AES-256-GCM under the data key (32 random bytes in an owner-only file, created
//! at first start).
//!
//! ```text
//! sealed value = SEALED (0xE1) ++ nonce (12 B, random) ++ AES-256-GCM(inner, aad)
//! inner        = 0x00 ++ plain value
//!              | 0x01 ++ plain length (u32 LE) ++ LZ4 block(plain value)
//! aad          = "sluice-seal-v1" ++ family name ++ 0x00 ++ key of the value
//! ```
//! A sealed value does not compress, so RocksDB's own compression is lost; values are
//! LZ4-compressed before sealing when that makes them smaller (and `compress` is on).
//! The plain value is what the hash chain covers (FORMAT ++ postcard), so verification and
//! shipping work on plaintext and a collector can re-seal with its own key. The AAD binds a
//! value to its place: a sealed value moved to another key does not open. Checkpoints, chain
//! hashes and cursors are not secret and stay in the clear.
//!
//! The writer leaves a pointer file ([`KEY_POINTER`]) in the journal directory naming the key
//! file and the key's fingerprint, so a reader finds the key without configuration and a wrong
//! key is named as such rather than failing value by value.

use std::path::{Path, PathBuf};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::keyfile::{self, KeyError};

/// First byte of a sealed value (plain values start with the format byte, 1).
pub const SEALED: u8 = 0xE1;
/// The file in a journal directory that names its data key.
pub const KEY_POINTER: &str = "SEALED-WITH";
const AAD_DOMAIN: &[u8] = b"sluice-seal-v1";
const RAW: u8 = 0;
const LZ4: u8 = 1;
/// Values shorter than this are not worth compressing.
const COMPRESS_FROM: usize = 128;
/// The largest plain value a compressed one may claim (a recorded chunk is at most a few
/// protocol messages of at most `max_message_bytes`).
const MAX_PLAIN: usize = 1 << 30;

/// The data key.
pub struct Sealer {
    key: LessSafeKey,
    fingerprint: String,
    rng: SystemRandom,
    compress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "the journal at {dir} is encrypted with the key {key} (fingerprint {fingerprint}), which {why}; run as root, or pass the key file with --data-key"
    )]
    NeedKey {
        dir: String,
        key: String,
        fingerprint: String,
        why: String,
    },
    #[error(
        "the key {key} (fingerprint {got}) is not the key the journal at {dir} was encrypted with (fingerprint {want})"
    )]
    WrongKey {
        dir: String,
        key: String,
        got: String,
        want: String,
    },
    #[error("cannot write the key pointer {path}")]
    Pointer {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Sealer {
    /// Loads the 32-byte key in `path`, or creates one there (mode 600).
    pub fn load_or_create(path: &Path) -> Result<Sealer, KeyError> {
        let bytes = keyfile::load_or_create(path, || {
            let mut k = vec![0u8; 32];
            SystemRandom::new()
                .fill(&mut k)
                .map_err(|_| KeyError::Random)?;
            Ok(k)
        })?;
        Sealer::from_bytes(&bytes, path)
    }

    /// Loads the existing key in `path`.
    pub fn load(path: &Path) -> Result<Sealer, KeyError> {
        Sealer::from_bytes(&keyfile::load(path)?, path)
    }

    fn from_bytes(bytes: &[u8], path: &Path) -> Result<Sealer, KeyError> {
        let invalid = || KeyError::Invalid {
            path: path.display().to_string(),
            what: "a 32-byte AES-256 key",
        };
        if bytes.len() != 32 {
            return Err(invalid());
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| invalid())?;
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        Ok(Sealer {
            key: LessSafeKey::new(key),
            fingerprint: crate::hex(&digest.as_ref()[..8]),
            rng: SystemRandom::new(),
            compress: true,
        })
    }

    /// Turns compression before sealing on or off (on by default).
    pub fn compressing(mut self, on: bool) -> Sealer {
        self.compress = on;
        self
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Seals the plain value stored under `key` in `family`.
    pub fn seal(&self, family: &str, key: &[u8], plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        // One buffer: header, then the inner value encrypted in place, then the tag.
        let header = 1 + NONCE_LEN;
        let mut out = Vec::with_capacity(header + 5 + plain.len() + AES_256_GCM.tag_len());
        out.push(SEALED);
        out.extend_from_slice(&nonce);
        let compressed = match self.compress && plain.len() >= COMPRESS_FROM {
            true => Some(lz4_flex::block::compress(plain)).filter(|c| c.len() + 4 < plain.len()),
            false => None,
        };
        match compressed {
            Some(c) => {
                out.push(LZ4);
                out.extend_from_slice(&u32::try_from(plain.len()).ok()?.to_le_bytes());
                out.extend_from_slice(&c);
            }
            None => {
                out.push(RAW);
                out.extend_from_slice(plain);
            }
        }
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(family, key)),
                &mut out[header..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    /// Opens a sealed value (None: altered, moved, or sealed with another key).
    pub fn open(&self, family: &str, key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let rest = sealed.strip_prefix(&[SEALED])?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let inner_len = self
            .key
            .open_in_place(nonce, Aad::from(aad(family, key)), &mut body)
            .ok()?
            .len();
        body.truncate(inner_len);
        match body.split_first()? {
            (&RAW, _) => {
                body.remove(0);
                Some(body)
            }
            (&LZ4, rest) => {
                let (len, compressed) = rest.split_first_chunk::<4>()?;
                let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
                if len > MAX_PLAIN {
                    return None;
                }
                let mut plain = vec![0u8; len];
                let n = lz4_flex::block::decompress_into(compressed, &mut plain).ok()?;
                (n == len).then_some(plain)
            }
            _ => None,
        }
    }
}

fn aad(family: &str, key: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(AAD_DOMAIN.len() + family.len() + 1 + key.len());
    a.extend_from_slice(AAD_DOMAIN);
    a.extend_from_slice(family.as_bytes());
    a.push(0);
    a.extend_from_slice(key);
    a
}

/// Writes `dir/KEY_POINTER` naming `key_path` and the key's fingerprint.
pub fn write_pointer(dir: &Path, key_path: &Path, sealer: &Sealer) -> Result<(), SealError> {
    let path = dir.join(KEY_POINTER);
    let absolute = std::path::absolute(key_path).unwrap_or_else(|_| key_path.to_path_buf());
    let text = format!(
        "# This journal's values are sealed with AES-256-GCM under this key file:\nkey = {}\nfingerprint = {}\n",
        absolute.display(),
        sealer.fingerprint()
    );
    std::fs::write(&path, text).map_err(|source| SealError::Pointer {
        path: path.display().to_string(),
        source,
    })
}

/// The key file and fingerprint named by `dir/KEY_POINTER`, if the journal is sealed.
pub fn read_pointer(dir: &Path) -> Option<(PathBuf, String)> {
    let text = std::fs::read_to_string(dir.join(KEY_POINTER)).ok()?;
    let field = |name: &str| {
        text.lines()
            .filter_map(|l| l.split_once(" = "))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    Some((PathBuf::from(field("key")?), field("fingerprint")?))
}

/// The sealer a reader of `dir` needs: `key` if given, else the one the pointer names; None
/// when the journal is not sealed.
pub fn sealer_for(dir: &Path, key: Option<&Path>) -> Result<Option<Sealer>, SealError> {
    let pointer = read_pointer(dir);
    let (path, want) = match (key, pointer) {
        (Some(k), Some((_, fp))) => (k.to_path_buf(), Some(fp)),
        (Some(k), None) => (k.to_path_buf(), None),
        (None, Some((k, fp))) => (k, Some(fp)),
        (None, None) => return Ok(None),
    };
    let sealer = Sealer::load(&path).map_err(|e| SealError::NeedKey {
        dir: dir.display().to_string(),
        key: path.display().to_string(),
        fingerprint: want.clone().unwrap_or_default(),
        why: match &e {
            KeyError::Read { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                "you cannot read".into()
            }
            other => format!("cannot be used ({other})"),
        },
    })?;
    if let Some(want) = want
        && want != sealer.fingerprint()
    {
        return Err(SealError::WrongKey {
            dir: dir.display().to_string(),
            key: path.display().to_string(),
            got: sealer.fingerprint().to_string(),
            want,
        });
    }
    Ok(Some(sealer))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_in_its_place_and_unaltered() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::load_or_create(&dir.path().join("k")).unwrap();
        let sealed = s.seal("events", b"key1", b"\x01hello").unwrap();
        assert_eq!(sealed[0], SEALED);
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(s.open("events", b"key1", &sealed).unwrap(), b"\x01hello");
        // A long value is compressed before sealing, and opens to the same bytes.
        let long: Vec<u8> = (0..4000u32)
            .flat_map(|i| format!("row {} ", i % 50).into_bytes())
            .collect();
        let sealed_long = s.seal("events", b"k", &long).unwrap();
        assert!(sealed_long.len() < long.len() / 2, "{}", sealed_long.len());
        assert_eq!(s.open("events", b"k", &sealed_long).unwrap(), long);
        let plain_sealer = Sealer::load(&dir.path().join("k"))
            .unwrap()
            .compressing(false);
        let uncompressed = plain_sealer.seal("events", b"k", &long).unwrap();
        assert!(uncompressed.len() > long.len());
        assert_eq!(s.open("events", b"k", &uncompressed).unwrap(), long);
        assert!(s.open("events", b"key2", &sealed).is_none(), "moved");
        assert!(
            s.open("sessions", b"key1", &sealed).is_none(),
            "other family"
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(s.open("events", b"key1", &altered).is_none(), "altered");
        let other = Sealer::load_or_create(&dir.path().join("k2")).unwrap();
        assert!(
            other.open("events", b"key1", &sealed).is_none(),
            "other key"
        );
        // The same key file loads the same key.
        let again = Sealer::load(&dir.path().join("k")).unwrap();
        assert_eq!(again.fingerprint(), s.fingerprint());
    }

    #[test]
    fn the_pointer_finds_the_key_and_a_wrong_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let s = Sealer::load_or_create(&key).unwrap();
        write_pointer(dir.path(), &key, &s).unwrap();
        let found = sealer_for(dir.path(), None).unwrap().unwrap();
        assert_eq!(found.fingerprint(), s.fingerprint());
        let other = dir.path().join("k2");
        Sealer::load_or_create(&other).unwrap();
        let err = sealer_for(dir.path(), Some(&other)).err().unwrap();
        assert!(err.to_string().contains("is not the key"), "{err}");
        let plain = tempfile::tempdir().unwrap();
        assert!(sealer_for(plain.path(), None).unwrap().is_none());
    }
}
