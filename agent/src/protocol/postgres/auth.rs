//! Authentication messages sluice writes itself when it terminates client authentication and
//! logs in to the backend with credentials only the agent holds (issue: credential injection).
//!
//! Toward the **backend** (sluice is the client): the StartupMessage, PasswordMessage
//! (cleartext, MD5), and SCRAM-SHA-256 (RFC 5802/7677, no channel binding: `n,,`) with
//! [`ScramClient`], which also verifies the server's signature so a server that does not know
//! the password cannot pass as the database. Toward the **client** (sluice is the server):
//! AuthenticationOk, AuthenticationCleartextPassword, BackendKeyData, and the CancelRequest
//! sluice forwards with the backend's keys.
//!
//! Pure functions over bytes; never touches a socket. Passwords are never formatted into
//! errors. SASLprep is not applied to the password: PostgreSQL stores verifiers of ASCII
//! passwords unchanged, and a non-ASCII password is used as its UTF-8 bytes, which is what
//! PostgreSQL does too when SASLprep would reject the string.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::{BufMut, Bytes, BytesMut};
use ring::{digest, hmac, pbkdf2, rand::SecureRandom};

/// The one SASL mechanism sluice speaks to backends.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Protocol 3.0.
const PROTOCOL_3_0: i32 = 196_608;
const CANCEL_CODE: i32 = 80_877_102;
/// Fewest PBKDF2 iterations accepted from a server (PostgreSQL's default is 4096).
const MIN_ITERATIONS: u32 = 1000;
/// Most accepted: a hostile server cannot make sluice spin for minutes.
const MAX_ITERATIONS: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the server's SCRAM message is malformed: {0}")]
    Malformed(&'static str),
    #[error("the server's SCRAM nonce does not extend ours")]
    Nonce,
    #[error(
        "the server asks for {0} PBKDF2 iterations, outside {MIN_ITERATIONS}..={MAX_ITERATIONS}"
    )]
    Iterations(u64),
    #[error("the server's SCRAM signature does not verify: it does not know the password")]
    ServerSignature,
    #[error("the server reported a SCRAM error: {0}")]
    ServerError(String),
    #[error("no randomness available for the SCRAM nonce")]
    Random,
}

fn message(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u8(tag);
    out.put_i32(0);
    body(&mut out);
    let len = i32::try_from(out.len() - 1).unwrap_or(i32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.extend(s.bytes().filter(|&b| b != 0));
    out.put_u8(0);
}

/// A StartupMessage (protocol 3.0) with `params` in order.
pub fn startup_message(params: &[(String, String)]) -> Bytes {
    let mut out = BytesMut::with_capacity(128);
    out.put_i32(0);
    out.put_i32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(&mut out, k);
        put_cstr(&mut out, v);
    }
    out.put_u8(0);
    let len = i32::try_from(out.len()).unwrap_or(i32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// A CancelRequest for backend process `pid` with secret `key`.
pub fn cancel_request(pid: i32, key: i32) -> Bytes {
    let mut out = BytesMut::with_capacity(16);
    out.put_i32(16);
    out.put_i32(CANCEL_CODE);
    out.put_i32(pid);
    out.put_i32(key);
    out.freeze()
}

/// PasswordMessage carrying `password` (cleartext authentication).
pub fn password_message(password: &str) -> Bytes {
    message(b'p', |o| put_cstr(o, password))
}

/// PasswordMessage for MD5 authentication: `"md5" + md5(md5(password + user) + salt)`.
pub fn md5_password_message(user: &str, password: &str, salt: [u8; 4]) -> Bytes {
    use md5::{Digest, Md5};
    let inner = hex(&Md5::digest(
        [password.as_bytes(), user.as_bytes()].concat(),
    ));
    let outer = hex(&Md5::digest([inner.as_bytes(), &salt[..]].concat()));
    password_message(&format!("md5{outer}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// AuthenticationOk.
pub fn authentication_ok() -> Bytes {
    message(b'R', |o| o.put_i32(0))
}

/// AuthenticationCleartextPassword: the client sends its password (for sluice: a token).
pub fn authentication_cleartext() -> Bytes {
    message(b'R', |o| o.put_i32(3))
}

/// BackendKeyData with sluice's own key pair for the client.
pub fn backend_key_data(pid: i32, key: i32) -> Bytes {
    message(b'K', |o| {
        o.put_i32(pid);
        o.put_i32(key);
    })
}

/// One SCRAM-SHA-256 exchange with a backend, from sluice's side.
pub struct ScramClient {
    password: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    /// Set once the server's first message was answered.
    expected_server_signature: Option<Vec<u8>>,
}

impl ScramClient {
    /// Starts an exchange; returns the client and the SASLInitialResponse to send.
    pub fn start(
        password: &str,
        rng: &dyn SecureRandom,
    ) -> Result<(ScramClient, Bytes), AuthError> {
        let mut raw = [0u8; 18];
        rng.fill(&mut raw).map_err(|_| AuthError::Random)?;
        Ok(Self::with_nonce(password, &B64.encode(raw)))
    }

    fn with_nonce(password: &str, nonce: &str) -> (ScramClient, Bytes) {
        // PostgreSQL takes the user from the startup message; the SCRAM user name is empty.
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}");
        let msg = message(b'p', |o| {
            put_cstr(o, SCRAM_SHA_256);
            o.put_i32(i32::try_from(first.len()).unwrap_or(i32::MAX));
            o.extend_from_slice(first.as_bytes());
        });
        (
            ScramClient {
                password: password.as_bytes().to_vec(),
                client_first_bare,
                nonce: nonce.to_string(),
                expected_server_signature: None,
            },
            msg,
        )
    }

    /// Answers AuthenticationSASLContinue (`server-first-message`) with the SASLResponse
    /// carrying the client proof.
    pub fn server_first(&mut self, data: &[u8]) -> Result<Bytes, AuthError> {
        let text = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in text.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                Some(("e", v)) => return Err(AuthError::ServerError(v.to_string())),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(AuthError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(AuthError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(AuthError::Malformed("no salt"))?)
            .map_err(|_| AuthError::Malformed("salt is not base64"))?;
        let iterations: u64 = iterations
            .ok_or(AuthError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| AuthError::Malformed("iteration count is not a number"))?;
        let iterations = u32::try_from(iterations)
            .ok()
            .filter(|i| (MIN_ITERATIONS..=MAX_ITERATIONS).contains(i))
            .and_then(std::num::NonZeroU32::new)
            .ok_or(AuthError::Iterations(iterations))?;

        let mut salted = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            &self.password,
            &mut salted,
        );
        let salted_key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted_key, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let client_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
            auth_message.as_bytes(),
        );
        let proof: Vec<u8> = client_key
            .as_ref()
            .iter()
            .zip(client_signature.as_ref())
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac::sign(&salted_key, b"Server Key");
        let server_signature = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
            auth_message.as_bytes(),
        );
        self.expected_server_signature = Some(server_signature.as_ref().to_vec());
        let last = format!("{without_proof},p={}", B64.encode(proof));
        Ok(message(b'p', |o| o.extend_from_slice(last.as_bytes())))
    }

    /// Checks AuthenticationSASLFinal (`server-final-message`).
    pub fn server_final(&self, data: &[u8]) -> Result<(), AuthError> {
        let text = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(AuthError::ServerError(e.to_string()));
        }
        let got = B64
            .decode(
                text.strip_prefix("v=")
                    .ok_or(AuthError::Malformed("no verifier"))?,
            )
            .map_err(|_| AuthError::Malformed("verifier is not base64"))?;
        let expected = self
            .expected_server_signature
            .as_deref()
            .ok_or(AuthError::Malformed("final message before the first"))?;
        // The value came from the server and proves nothing secret of ours: plain comparison.
        if got != expected {
            return Err(AuthError::ServerSignature);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::frame::messages;
    use super::super::startup::{StartupPacket, parse_startup};
    use super::*;

    /// RFC 7677's SCRAM-SHA-256 example messages with PostgreSQL's empty user name (so the
    /// proof differs from the RFC's); the expected proof and server signature were computed
    /// with Python's hashlib/hmac from the RFC's formulas.
    #[test]
    fn scram_sha_256_matches_an_independent_computation() {
        let (mut c, first) = ScramClient::with_nonce("pencil", "rOprNGfwEbeRWgbNEkqO");
        let (_, body) = messages(&first).next().unwrap().unwrap();
        assert!(body.starts_with(b"SCRAM-SHA-256\0"));
        assert!(body.ends_with(b"n,,n=,r=rOprNGfwEbeRWgbNEkqO"));
        let server_first =
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let last = c.server_first(server_first).unwrap();
        let (_, body) = messages(&last).next().unwrap().unwrap();
        assert_eq!(
            std::str::from_utf8(body).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=qvT2SWdEH5Q06albL+hjSYuUhCG7VndFyzIb7CK4n9k="
        );
        assert_eq!(
            c.server_final(b"v=3HO6Qt1M4MKJrmlKaoOqLAI0/0TV0HZe7J9H3MBtSOg=")
                .map_err(|e| e.to_string()),
            Ok(())
        );
        assert_eq!(
            c.server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(AuthError::ServerSignature)
        );
    }

    #[test]
    fn hostile_scram_messages_are_errors() {
        let (mut c, _) = ScramClient::with_nonce("pw", "abc");
        assert_eq!(
            c.server_first(b"r=xyz,s=AAAA,i=4096"),
            Err(AuthError::Nonce)
        );
        assert_eq!(
            c.server_first(b"r=abc,s=AAAA,i=4096"),
            Err(AuthError::Nonce)
        );
        assert_eq!(
            c.server_first(b"r=abcd,s=AAAA,i=99999999"),
            Err(AuthError::Iterations(99_999_999))
        );
        assert!(matches!(
            c.server_first(b"e=invalid-proof"),
            Err(AuthError::ServerError(_))
        ));
        assert!(c.server_first(b"\xff").is_err());
        assert!(c.server_final(b"v=AAAA").is_err());
    }

    #[test]
    fn md5_passwords_match_postgresql() {
        // Python: "md5" + md5(md5(b"secret" + b"alice").hexdigest().encode() + b"\x01\x02\x03\x04")
        let m = md5_password_message("alice", "secret", [1, 2, 3, 4]);
        let (tag, body) = messages(&m).next().unwrap().unwrap();
        assert_eq!(tag, b'p');
        assert_eq!(body, b"md598a0412b9c31436fc53776e863350083\0");
    }

    #[test]
    fn a_startup_message_parses_back() {
        let params = vec![
            ("user".to_string(), "app".to_string()),
            ("database".to_string(), "db".to_string()),
        ];
        let m = startup_message(&params);
        assert_eq!(
            parse_startup(&m).unwrap(),
            StartupPacket::Startup {
                version: (3, 0),
                params
            }
        );
        assert_eq!(
            parse_startup(&cancel_request(7, -9)).unwrap(),
            StartupPacket::Cancel { pid: 7, key: -9 }
        );
    }
}
