//! RSA-OAEP encryption with a server's public key: what `caching_sha2_password` full
//! authentication needs when the backend leg has no TLS (the server sends its key as PEM on
//! request, the client sends `(password + NUL) XOR nonce` encrypted with it). Padding is
//! PKCS#1 v2 OAEP with SHA-1 and MGF1-SHA-1 (OpenSSL's `RSA_PKCS1_OAEP_PADDING`, which MySQL
//! 8 uses). ring verifies RSA signatures but does not encrypt, hence this small module: key
//! parsing (SubjectPublicKeyInfo or PKCS#1 `RSA PUBLIC KEY`, PEM), padding, and `m^e mod n`.
//!
//! Public-key operations only: no secret is processed here but the message, and timing does
//! not reveal it beyond its length. Never panics on the server's bytes.

use base64::Engine as _;
use num_bigint::BigUint;
use ring::digest;

/// SHA-1's output length.
const H_LEN: usize = 20;
/// Smallest modulus accepted (bits); MySQL's default key is 2048.
const MIN_BITS: u64 = 1024;
/// Largest modulus accepted (bits).
const MAX_BITS: u64 = 16384;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RsaError {
    #[error("the server's public key is not PEM")]
    NotPem,
    #[error("the server's public key does not decode: {0}")]
    Der(&'static str),
    #[error("the server's RSA key has {0} bits (sluice accepts {MIN_BITS} to {MAX_BITS})")]
    KeySize(u64),
    #[error("the message is too long for the server's RSA key")]
    TooLong,
    #[error("no random numbers from the operating system")]
    Random,
}

/// An RSA public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    n: BigUint,
    e: BigUint,
}

impl PublicKey {
    /// Parses a PEM `PUBLIC KEY` (SubjectPublicKeyInfo, what MySQL sends) or `RSA PUBLIC KEY`.
    pub fn from_pem(pem: &[u8]) -> Result<PublicKey, RsaError> {
        let text = std::str::from_utf8(pem).map_err(|_| RsaError::NotPem)?;
        let (label, body) = pem_body(text).ok_or(RsaError::NotPem)?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| RsaError::NotPem)?;
        let key = match label {
            "PUBLIC KEY" => {
                // SEQUENCE { SEQUENCE { OID, params }, BIT STRING { RSAPublicKey } }
                let mut spki = Der::new(&der).sequence()?;
                let algorithm = spki.take(0x30)?;
                if !contains(algorithm, RSA_ENCRYPTION) {
                    return Err(RsaError::Der("not an rsaEncryption key"));
                }
                let bits = spki.take(0x03)?;
                match bits.split_first() {
                    Some((0, rest)) => rsa_public_key(rest)?,
                    _ => return Err(RsaError::Der("bit string with unused bits")),
                }
            }
            "RSA PUBLIC KEY" => rsa_public_key(&der)?,
            _ => return Err(RsaError::NotPem),
        };
        let bits = key.n.bits();
        if !(MIN_BITS..=MAX_BITS).contains(&bits) {
            return Err(RsaError::KeySize(bits));
        }
        Ok(key)
    }

    /// The modulus length in bytes.
    pub fn size(&self) -> usize {
        self.n.bits().div_ceil(8) as usize
    }

    /// Encrypts `message` with OAEP (SHA-1, MGF1-SHA-1, empty label) and a random seed.
    pub fn encrypt_oaep_sha1(&self, message: &[u8]) -> Result<Vec<u8>, RsaError> {
        let mut seed = [0u8; H_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| RsaError::Random)?;
        self.encrypt_with_seed(message, &seed)
    }

    fn encrypt_with_seed(&self, message: &[u8], seed: &[u8; H_LEN]) -> Result<Vec<u8>, RsaError> {
        let k = self.size();
        if message.len() + 2 * H_LEN + 2 > k {
            return Err(RsaError::TooLong);
        }
        // DB = lHash || PS || 0x01 || M
        let mut db = vec![0u8; k - H_LEN - 1];
        db[..H_LEN]
            .copy_from_slice(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, b"").as_ref());
        let m_at = db.len() - message.len();
        db[m_at - 1] = 0x01;
        db[m_at..].copy_from_slice(message);
        xor_in(&mut db, &mgf1(seed, k - H_LEN - 1));
        let mut masked_seed = *seed;
        xor_in(&mut masked_seed, &mgf1(&db, H_LEN));
        let mut em = Vec::with_capacity(k);
        em.push(0);
        em.extend_from_slice(&masked_seed);
        em.extend_from_slice(&db);
        let c = BigUint::from_bytes_be(&em).modpow(&self.e, &self.n);
        let bytes = c.to_bytes_be();
        let mut out = vec![0u8; k - bytes.len()];
        out.extend_from_slice(&bytes);
        Ok(out)
    }
}

/// The DER of the rsaEncryption OID, 1.2.840.113549.1.1.1.
const RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
fn rsa_public_key(der: &[u8]) -> Result<PublicKey, RsaError> {
    let mut seq = Der::new(der).sequence()?;
    let n = BigUint::from_bytes_be(seq.take(0x02)?);
    let e = BigUint::from_bytes_be(seq.take(0x02)?);
    if e < BigUint::from(3u8) {
        return Err(RsaError::Der("public exponent below 3"));
    }
    Ok(PublicKey { n, e })
}

/// The label and base64 body of the first PEM block in `text`.
fn pem_body(text: &str) -> Option<(&str, String)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----")?;
    let label = &rest[..label_end];
    let body_start = &rest[label_end + 5..];
    let end = body_start.find("-----END ")?;
    let body: String = body_start[..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    Some((label, body))
}

/// MGF1 with SHA-1.
fn mgf1(seed: &[u8], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + H_LEN);
    let mut counter: u32 = 0;
    while out.len() < len {
        let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
        ctx.update(seed);
        ctx.update(&counter.to_be_bytes());
        out.extend_from_slice(ctx.finish().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    out
}

fn xor_in(into: &mut [u8], mask: &[u8]) {
    for (a, b) in into.iter_mut().zip(mask) {
        *a ^= b;
    }
}

/// A minimal DER reader: definite lengths only, tag-checked.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Der(bytes)
    }

    /// The contents of the next element, which must have `tag`.
    fn take(&mut self, tag: u8) -> Result<&'a [u8], RsaError> {
        let bytes = self.0;
        let (&t, rest) = bytes.split_first().ok_or(RsaError::Der("truncated"))?;
        if t != tag {
            return Err(RsaError::Der("unexpected element"));
        }
        let (&first, rest) = rest.split_first().ok_or(RsaError::Der("truncated"))?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(RsaError::Der("bad length"));
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| acc << 8 | usize::from(*b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(RsaError::Der("truncated"));
        }
        let (contents, after) = rest.split_at(len);
        self.0 = after;
        Ok(contents)
    }

    fn sequence(mut self) -> Result<Der<'a>, RsaError> {
        self.take(0x30).map(Der)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A 2048-bit test key (`openssl genpkey -algorithm RSA`), public half.
    pub(crate) const TEST_KEY: &str = include_str!("../../../testdata/mysql/rsa_public.pem");

    #[test]
    fn a_public_key_parses_and_encrypts_to_its_size() {
        let key = PublicKey::from_pem(TEST_KEY.as_bytes()).unwrap();
        assert_eq!(key.size(), 256);
        let c = key.encrypt_oaep_sha1(b"secret\0").unwrap();
        assert_eq!(c.len(), 256);
        // A random seed: two encryptions differ.
        assert_ne!(c, key.encrypt_oaep_sha1(b"secret\0").unwrap());
        assert_eq!(
            key.encrypt_oaep_sha1(&[0u8; 256 - 2 * H_LEN - 1]),
            Err(RsaError::TooLong)
        );
    }

    #[test]
    fn bad_keys_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n",
            b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n",
            b"-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n",
            b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
            &[0xff, 0xfe],
        ] {
            assert!(PublicKey::from_pem(bad).is_err(), "{bad:?}");
        }
    }
}
