//! Authentication plugins sluice speaks: as a client towards backends (`mysql_native_password`,
//! `caching_sha2_password` fast and full authentication) and as a server towards clients
//! (`mysql_clear_password`, which carries an OIDC token over TLS).
//!
//! ```text
//! mysql_native_password:  SHA1(pw) XOR SHA1(nonce || SHA1(SHA1(pw)))            (20 bytes)
//! caching_sha2_password:  SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) || nonce)     (32 bytes)
//!   server: AuthMoreData 0x03 -> fast auth succeeded, an OK follows
//!           AuthMoreData 0x04 -> full auth: the password NUL-terminated over TLS, or
//!                                RSA-OAEP-encrypted with the server's key (not supported:
//!                                ring has no RSA encryption)
//! mysql_clear_password:   the password NUL-terminated (only ever over TLS)
//! ```
//! Pure functions over bytes; never touches a socket. Passwords are never formatted into errors.
//! An empty password is an empty auth response for both scrambles (what servers expect).
use ring::digest;

pub const NATIVE_PASSWORD: &str = "mysql_native_password";
pub const CACHING_SHA2_PASSWORD: &str = "caching_sha2_password";
pub const CLEAR_PASSWORD: &str = "mysql_clear_password";

/// caching_sha2_password's AuthMoreData: the server found the scramble in its cache.
pub const FAST_AUTH_SUCCESS: u8 = 0x03;
/// caching_sha2_password's AuthMoreData: the server needs the password itself.
pub const PERFORM_FULL_AUTH: u8 = 0x04;
/// caching_sha2_password: the client asks for the server's RSA public key.
pub const REQUEST_PUBLIC_KEY: u8 = 0x02;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "caching_sha2_password full authentication without TLS: the server's RSA key is unusable \
         ({0}); set backend_tls = \"require\" for this target"
    )]
    RsaKey(#[source] super::rsa::RsaError),
    #[error("the backend asks for the unsupported auth plugin {0:?}")]
    UnsupportedPlugin(String),
    #[error("the backend sent unexpected {plugin} data: {what}")]
    Unexpected {
        plugin: &'static str,
        what: &'static str,
    },
    #[error(
        "mysql_clear_password refused without TLS: the password would cross the network in clear"
    )]
    ClearWithoutTls,
    #[error("the client's mysql_clear_password response is not valid UTF-8")]
    NotUtf8,
}

fn sha1(parts: &[&[u8]]) -> [u8; 20] {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 20];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The nonce a scramble uses: the first 20 bytes of the plugin data (servers append a NUL).
fn nonce20(nonce: &[u8]) -> &[u8] {
    nonce.get(..20).unwrap_or(nonce)
}

/// The `mysql_native_password` auth response for `password` and the server's nonce.
pub fn native_password(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = sha1(&[password]);
    let stage2 = sha1(&[&stage1]);
    let mix = sha1(&[nonce20(nonce), &stage2]);
    stage1.iter().zip(mix).map(|(a, b)| a ^ b).collect()
}

/// The `caching_sha2_password` auth response (fast path) for `password` and the nonce.
pub fn caching_sha2_password(password: &[u8], nonce: &[u8]) -> Vec<u8> {
    if password.is_empty() {
        return Vec::new();
    }
    let stage1 = sha256(&[password]);
    let stage2 = sha256(&[&stage1]);
    let mix = sha256(&[&stage2, nonce20(nonce)]);
    stage1.iter().zip(mix).map(|(a, b)| a ^ b).collect()
}

/// The first auth response for `plugin` (the handshake's or an AuthSwitchRequest's).
/// `mysql_clear_password` is only answered over TLS.
pub fn auth_response(
    plugin: &str,
    password: &[u8],
    nonce: &[u8],
    tls: bool,
) -> Result<Vec<u8>, AuthError> {
    match plugin {
        NATIVE_PASSWORD => Ok(native_password(password, nonce)),
        CACHING_SHA2_PASSWORD => Ok(caching_sha2_password(password, nonce)),
        CLEAR_PASSWORD if tls => Ok(clear_password(password)),
        CLEAR_PASSWORD => Err(AuthError::ClearWithoutTls),
        other => Err(AuthError::UnsupportedPlugin(other.to_owned())),
    }
}

/// What a client does with a caching_sha2_password AuthMoreData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sha2Step {
    /// Fast auth succeeded: wait for the OK.
    AwaitOk,
    /// Send this and read the next packet: over TLS the password, NUL-terminated; without TLS
    /// first a request for the server's public key, then the password encrypted with it.
    Send(Vec<u8>),
}

/// The client's next step after a caching_sha2_password AuthMoreData `data` (without the 0x01
/// header), `nonce` being the plugin's data. Full authentication sends the password in clear
/// only over TLS; without TLS it asks for the server's RSA public key and sends
/// `(password + NUL) XOR nonce` encrypted with RSA-OAEP (as MySQL's own clients do).
pub fn caching_sha2_more_data(
    data: &[u8],
    password: &[u8],
    nonce: &[u8],
    tls: bool,
) -> Result<Sha2Step, AuthError> {
    match data {
        [FAST_AUTH_SUCCESS] => Ok(Sha2Step::AwaitOk),
        [PERFORM_FULL_AUTH] if tls => Ok(Sha2Step::Send(clear_password(password))),
        [PERFORM_FULL_AUTH] => Ok(Sha2Step::Send(vec![REQUEST_PUBLIC_KEY])),
        d if d.starts_with(b"-----BEGIN") => {
            let key = super::rsa::PublicKey::from_pem(d).map_err(AuthError::RsaKey)?;
            let nonce = nonce20(nonce);
            let mut message = clear_password(password);
            if !nonce.is_empty() {
                for (i, b) in message.iter_mut().enumerate() {
                    *b ^= nonce[i % nonce.len()];
                }
            }
            key.encrypt_oaep_sha1(&message)
                .map(Sha2Step::Send)
                .map_err(AuthError::RsaKey)
        }
        _ => Err(AuthError::Unexpected {
            plugin: CACHING_SHA2_PASSWORD,
            what: "AuthMoreData that is neither 0x03 nor 0x04",
        }),
    }
}

/// A password as `mysql_clear_password` (and caching_sha2 full auth over TLS) sends it: the
/// bytes, NUL-terminated.
pub fn clear_password(password: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(password.len() + 1);
    out.extend_from_slice(password);
    out.push(0);
    out
}

/// The server side of `mysql_clear_password`: the token or password a client sent (the
/// trailing NUL removed). Only call this for a client on TLS (`tls`); the caller refuses
/// plaintext before asking for the password.
pub fn parse_clear_password(response: &[u8], tls: bool) -> Result<&str, AuthError> {
    if !tls {
        return Err(AuthError::ClearWithoutTls);
    }
    let trimmed = response.strip_suffix(&[0]).unwrap_or(response);
    std::str::from_utf8(trimmed).map_err(|_| AuthError::NotUtf8)
}

/// The server side of `mysql_native_password`: does the client's response prove knowledge of
/// the password whose double SHA1 is `stage2` (what `mysql.user` stores, unhexed)?
pub fn verify_native_password(response: &[u8], nonce: &[u8], stage2: &[u8; 20]) -> bool {
    if response.len() != 20 {
        return false;
    }
    let mix = sha1(&[nonce20(nonce), stage2]);
    let stage1: Vec<u8> = response.iter().zip(mix).map(|(a, b)| a ^ b).collect();
    // Constant time: no early exit on the first differing byte.
    sha1(&[&stage1])
        .iter()
        .zip(stage2)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn hex(v: &[u8]) -> String {
        v.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn native_password_matches_known_answers() {
        // xp-framework/rdbms's MySqlPasswordTest (protocol 4.1 scramble).
        assert_eq!(
            native_password(b"hello", b"12345678901234567890"),
            b"}PQn\x0es\x0b\x0b\x1b\x12\xfb\xaa\x1b\xa0\x87o=\xb2\xc4\xdd"
        );
        // The trailing NUL servers put after the nonce does not change the scramble.
        assert_eq!(
            native_password(b"hello", b"12345678901234567890\0"),
            native_password(b"hello", b"12345678901234567890")
        );
        assert!(native_password(b"", b"12345678901234567890").is_empty());
    }

    #[test]
    fn caching_sha2_password_matches_known_answers() {
        // go-sql-driver/mysql's TestSHA256Pass vectors.
        let nonce = [
            10, 47, 74, 111, 75, 73, 34, 48, 88, 76, 114, 74, 37, 13, 3, 80, 82, 2, 23, 21,
        ];
        assert_eq!(
            hex(&caching_sha2_password(b"secret", &nonce)),
            "f490e76f66d9d86665ce54d98c78d0acfe2fb0b08b423da807144873d30b312c"
        );
        assert_eq!(
            hex(&caching_sha2_password(b"secret2", &nonce)),
            "abc3934a012cf342e876071c8ee202de51785b430258a7a0138bc79c4d800bc6"
        );
        assert!(caching_sha2_password(b"", &nonce).is_empty());
    }

    #[test]
    fn caching_sha2_fast_auth_waits_and_full_auth_asks_for_the_key_without_tls() {
        let nonce = b"abcdefghijklmnopqrst";
        assert_eq!(
            caching_sha2_more_data(&[3], b"pw", nonce, false),
            Ok(Sha2Step::AwaitOk)
        );
        assert_eq!(
            caching_sha2_more_data(&[4], b"pw", nonce, true),
            Ok(Sha2Step::Send(b"pw\0".to_vec()))
        );
        assert_eq!(
            caching_sha2_more_data(&[4], b"pw", nonce, false),
            Ok(Sha2Step::Send(vec![REQUEST_PUBLIC_KEY]))
        );
        let key = include_bytes!("../../../testdata/mysql/rsa_public.pem");
        let Ok(Sha2Step::Send(sealed)) = caching_sha2_more_data(key, b"pw", nonce, false) else {
            panic!("no encrypted password")
        };
        assert_eq!(sealed.len(), 256);
        let e =
            caching_sha2_more_data(b"-----BEGIN PUBLIC KEY-----", b"pw", nonce, false).unwrap_err();
        assert!(e.to_string().contains("backend_tls = \"require\""), "{e}");
        assert!(!e.to_string().contains("pw"));
        assert!(caching_sha2_more_data(&[], b"pw", nonce, true).is_err());
    }

    #[test]
    fn clear_password_is_only_accepted_over_tls() {
        assert_eq!(parse_clear_password(b"eyJtoken\0", true), Ok("eyJtoken"));
        assert_eq!(parse_clear_password(b"eyJtoken", true), Ok("eyJtoken"));
        assert_eq!(
            parse_clear_password(b"eyJtoken\0", false),
            Err(AuthError::ClearWithoutTls)
        );
        assert_eq!(
            parse_clear_password(b"\xff\0", true),
            Err(AuthError::NotUtf8)
        );
        assert_eq!(
            auth_response(CLEAR_PASSWORD, b"t", b"", false),
            Err(AuthError::ClearWithoutTls)
        );
        assert_eq!(
            auth_response(CLEAR_PASSWORD, b"t", b"", true),
            Ok(b"t\0".to_vec())
        );
        assert!(matches!(
            auth_response("auth_gssapi_client", b"t", b"", true),
            Err(AuthError::UnsupportedPlugin(_))
        ));
    }

    #[test]
    fn a_native_response_verifies_against_the_stored_double_sha1() {
        let nonce = b"abcdefghijklmnopqrst";
        let stage2 = sha1(&[&sha1(&[b"s3cret"])]);
        assert!(verify_native_password(
            &native_password(b"s3cret", nonce),
            nonce,
            &stage2
        ));
        assert!(!verify_native_password(
            &native_password(b"wrong", nonce),
            nonce,
            &stage2
        ));
        assert!(!verify_native_password(b"short", nonce, &stage2));
    }
}
