//! Backend login for MySQL/MariaDB targets: sluice is the client, with credentials only the
//! agent holds. The client of the session never sees this exchange, and the journal never
//! records it.
//!
//! Three steps, so that the caller owns TLS (the stream's type changes when it is upgraded):
//! 1. [`read_greeting`]: the server's Initial Handshake v10 (capped at [`PRE_AUTH_MAX`]).
//! 2. optionally [`request_tls`]: an SSLRequest (sequence id 1); the caller then runs the TLS
//!    handshake on the same socket.
//! 3. [`authenticate`]: HandshakeResponse41 (sequence id 1, or 2 after TLS) with the greeting's
//!    plugin, then AuthSwitchRequest / AuthMoreData rounds until OK or ERR:
//!    `mysql_native_password`, `caching_sha2_password` (fast auth; full auth sends the password
//!    over TLS, or without TLS encrypted with the server's RSA key, RSA-OAEP), and
//!    `mysql_clear_password` over TLS only.
//!
//! Generic over the stream (any tokio `AsyncRead + AsyncWrite`); never spawns, never logs a
//! password or a scramble. Every exchange is bounded: packets at [`PRE_AUTH_MAX`] bytes, at most
//! [`MAX_ROUNDS`] auth rounds, and the caller's timeout.
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::mysql::auth::{
    self, AuthError, CACHING_SHA2_PASSWORD, NATIVE_PASSWORD, Sha2Step, auth_response,
    caching_sha2_more_data,
};
use crate::protocol::mysql::handshake::{
    AuthReply, Capabilities, ChangeUser, ErrPacket, Handshake, HandshakeResponse, OkPacket,
    parse_auth_reply, parse_err, parse_handshake, ssl_request,
};
use crate::protocol::mysql::packet::{
    DecodeError, Decoder, PacketError, encode_packet, packet as frame,
};

/// Largest packet accepted from a backend before it has authenticated us.
pub const PRE_AUTH_MAX: usize = 64 * 1024;
/// Most AuthSwitchRequest / AuthMoreData rounds before giving up.
pub const MAX_ROUNDS: usize = 8;
/// utf8mb4_general_ci: what sluice asks for when the caller does not say.
pub const DEFAULT_CHARSET: u8 = 45;

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("i/o with the backend during login")]
    Io(#[source] std::io::Error),
    #[error("the backend closed the connection during login")]
    Closed,
    #[error("the backend's login packets are malformed")]
    Packet(#[source] PacketError),
    #[error("the backend's login packet does not decode")]
    Decode(#[source] DecodeError),
    #[error(
        "the backend refused the login: error {code} ({sql_state}): {message}",
        code = .0.code, sql_state = .0.sql_state, message = .0.message
    )]
    Refused(ErrPacket),
    #[error("backend authentication failed")]
    Auth(#[source] AuthError),
    #[error("the backend does not offer TLS (no CLIENT_SSL in its handshake)")]
    NoTls,
    #[error("the backend does not speak protocol 4.1 with plugin authentication")]
    TooOld,
    #[error("the backend asked for more than {MAX_ROUNDS} authentication rounds")]
    TooManyRounds,
    #[error("the backend did not complete the login within {0:?}")]
    Timeout(Duration),
}

/// Who sluice logs in as.
#[derive(Debug, Clone)]
pub struct Credentials<'a> {
    pub user: &'a str,
    pub password: &'a [u8],
    pub database: Option<&'a str>,
}

/// How sluice logs in.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// Capabilities to ask for (intersected with the server's).
    pub capabilities: Capabilities,
    pub charset: u8,
    pub max_packet: u32,
    /// Connection attributes sent when the server supports them (`_client_name`, ...).
    pub attributes: Vec<(String, String)>,
    /// Bound on the whole authentication exchange.
    pub timeout: Duration,
}

impl Default for LoginOptions {
    fn default() -> Self {
        Self {
            capabilities: Capabilities::sluice_default() | Capabilities::CONNECT_ATTRS,
            charset: DEFAULT_CHARSET,
            max_packet: 1 << 30,
            attributes: vec![("_client_name".to_owned(), "sluice".to_owned())],
            timeout: Duration::from_secs(10),
        }
    }
}

/// A completed login.
#[derive(Debug, Clone)]
pub struct Login {
    /// The capabilities in force on this connection from now on.
    pub capabilities: Capabilities,
    /// The plugin that authenticated us (after any switch).
    pub plugin: String,
    pub ok: OkPacket,
    /// Bytes the backend sent after its OK (normally none), for the caller's next read.
    pub leftover: BytesMut,
}

/// Reads one packet with the expected sequence id.
async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<Vec<u8>, LoginError> {
    loop {
        if let Some((n, p)) = dec.decode(buf).map_err(LoginError::Packet)? {
            let payload = p.payload.into_owned();
            let _ = buf.split_to(n);
            return Ok(payload);
        }
        if s.read_buf(buf).await.map_err(LoginError::Io)? == 0 {
            return Err(LoginError::Closed);
        }
    }
}

/// Reads the server's greeting (sequence id 0). An ERR instead (too many connections, host
/// blocked) is [`LoginError::Refused`].
pub async fn read_greeting<S: AsyncRead + Unpin>(s: &mut S) -> Result<Handshake, LoginError> {
    let mut buf = BytesMut::with_capacity(256);
    let mut dec = Decoder::new(PRE_AUTH_MAX);
    let payload = read_packet(s, &mut buf, &mut dec).await?;
    if payload.first() == Some(&0xFF) {
        return Err(LoginError::Refused(
            parse_err(&payload).map_err(LoginError::Decode)?,
        ));
    }
    let h = parse_handshake(&payload).map_err(LoginError::Decode)?;
    let needed =
        Capabilities::PROTOCOL_41 | Capabilities::SECURE_CONNECTION | Capabilities::PLUGIN_AUTH;
    if !h.capabilities.contains(needed) {
        return Err(LoginError::TooOld);
    }
    Ok(h)
}

fn negotiated(
    greeting: &Handshake,
    creds: &Credentials<'_>,
    opts: &LoginOptions,
    tls: bool,
) -> Capabilities {
    let mut caps = opts.capabilities.without(Capabilities::SSL);
    if creds.database.is_none() {
        caps = caps.without(Capabilities::CONNECT_WITH_DB);
    }
    if tls {
        caps = caps | Capabilities::SSL;
    }
    // Never compression, never LOCAL INFILE, whatever the caller asked.
    caps = caps
        .without(Capabilities::COMPRESS)
        .without(Capabilities::LOCAL_FILES)
        .without(Capabilities::MYSQL);
    caps & greeting.capabilities
}

/// Sends an SSLRequest (sequence id 1). The caller then upgrades the stream to TLS and calls
/// [`authenticate`] with `tls = true`.
pub async fn request_tls<S: AsyncWrite + Unpin>(
    s: &mut S,
    greeting: &Handshake,
    opts: &LoginOptions,
) -> Result<(), LoginError> {
    if !greeting.capabilities.contains(Capabilities::SSL) {
        return Err(LoginError::NoTls);
    }
    let caps = (opts.capabilities | Capabilities::SSL) & greeting.capabilities;
    let payload = ssl_request(
        caps.without(Capabilities::MYSQL),
        opts.max_packet,
        opts.charset,
    );
    s.write_all(&frame(1, &payload))
        .await
        .map_err(LoginError::Io)?;
    s.flush().await.map_err(LoginError::Io)
}

/// Authenticates with `creds` after [`read_greeting`] (and [`request_tls`] + the TLS handshake
/// when `tls`), bounded by `opts.timeout`.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    greeting: &Handshake,
    creds: &Credentials<'_>,
    opts: &LoginOptions,
    tls: bool,
) -> Result<Login, LoginError> {
    tokio::time::timeout(opts.timeout, exchange(s, greeting, creds, opts, tls))
        .await
        .map_err(|_| LoginError::Timeout(opts.timeout))?
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    greeting: &Handshake,
    creds: &Credentials<'_>,
    opts: &LoginOptions,
    tls: bool,
) -> Result<Login, LoginError> {
    let caps = negotiated(greeting, creds, opts, tls);
    let plugin = first_plugin(greeting, tls);
    let first =
        auth_response(&plugin, creds.password, &greeting.nonce, tls).map_err(LoginError::Auth)?;
    let response = HandshakeResponse {
        capabilities: caps,
        max_packet: opts.max_packet,
        charset: opts.charset,
        username: creds.user.to_owned(),
        auth_response: first,
        database: creds.database.map(str::to_owned),
        auth_plugin: Some(plugin.clone()),
        attributes: opts.attributes.clone(),
    };
    let mut out = BytesMut::new();
    let seq = encode_packet(if tls { 2 } else { 1 }, &response.encode(), &mut out);
    s.write_all(&out).await.map_err(LoginError::Io)?;
    s.flush().await.map_err(LoginError::Io)?;
    rounds(s, seq, caps, plugin, greeting.nonce.clone(), creds, tls).await
}

/// The plugin sluice answers a greeting with: the server's when sluice speaks it, else native
/// (the server then switches us to what the account really uses).
fn first_plugin(greeting: &Handshake, tls: bool) -> String {
    match greeting.auth_plugin.as_str() {
        NATIVE_PASSWORD | CACHING_SHA2_PASSWORD => greeting.auth_plugin.clone(),
        auth::CLEAR_PASSWORD if tls => greeting.auth_plugin.clone(),
        _ => NATIVE_PASSWORD.to_owned(),
    }
}

/// Logs in again on an authenticated connection in its command phase (COM_CHANGE_USER), as
/// `creds` with the connection's `caps`, `charset` and `attributes`, bounded by `timeout`. The
/// first response is scrambled with the greeting's nonce, as the server expects; the server
/// then answers OK, ERR or an AuthSwitchRequest as at login.
#[allow(clippy::too_many_arguments)]
pub async fn change_user<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    greeting: &Handshake,
    caps: Capabilities,
    creds: &Credentials<'_>,
    charset: u16,
    attributes: Vec<(String, String)>,
    tls: bool,
    timeout: Duration,
) -> Result<Login, LoginError> {
    let work = async {
        let plugin = first_plugin(greeting, tls);
        let command = ChangeUser {
            user: creds.user.to_owned(),
            auth_response: auth_response(&plugin, creds.password, &greeting.nonce, tls)
                .map_err(LoginError::Auth)?,
            database: creds.database.unwrap_or("").to_owned(),
            charset: Some(charset),
            auth_plugin: Some(plugin.clone()),
            attributes,
        };
        let mut out = BytesMut::new();
        let seq = encode_packet(0, &command.encode(caps), &mut out);
        s.write_all(&out).await.map_err(LoginError::Io)?;
        s.flush().await.map_err(LoginError::Io)?;
        rounds(s, seq, caps, plugin, greeting.nonce.clone(), creds, tls).await
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| LoginError::Timeout(timeout))?
}

/// The auth rounds after the first response (sent as packet `seq - 1`): AuthSwitchRequest and
/// AuthMoreData answered until OK or ERR, at most [`MAX_ROUNDS`].
async fn rounds<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    mut seq: u8,
    caps: Capabilities,
    mut plugin: String,
    // The plugin's data: the greeting's nonce, or an AuthSwitchRequest's.
    mut nonce: Vec<u8>,
    creds: &Credentials<'_>,
    tls: bool,
) -> Result<Login, LoginError> {
    let mut buf = BytesMut::with_capacity(256);
    let mut dec = Decoder::new(PRE_AUTH_MAX);
    for _ in 0..MAX_ROUNDS {
        dec.expect(Some(seq));
        let payload = read_packet(s, &mut buf, &mut dec).await?;
        seq = dec.expected().unwrap_or(0);
        let reply: Option<Vec<u8>> =
            match parse_auth_reply(&payload, caps).map_err(LoginError::Decode)? {
                AuthReply::Ok(ok) => {
                    return Ok(Login {
                        capabilities: caps,
                        plugin,
                        ok,
                        leftover: buf,
                    });
                }
                AuthReply::Err(e) => return Err(LoginError::Refused(e)),
                AuthReply::Switch(sw) => {
                    plugin = sw.plugin;
                    nonce = sw.data;
                    Some(
                        auth_response(&plugin, creds.password, &nonce, tls)
                            .map_err(LoginError::Auth)?,
                    )
                }
                AuthReply::MoreData(data) if plugin == CACHING_SHA2_PASSWORD => {
                    match caching_sha2_more_data(data, creds.password, &nonce, tls)
                        .map_err(LoginError::Auth)?
                    {
                        Sha2Step::AwaitOk => None,
                        Sha2Step::Send(v) => Some(v),
                    }
                }
                AuthReply::MoreData(_) => {
                    return Err(LoginError::Auth(AuthError::Unexpected {
                        plugin: "mysql_native_password",
                        what: "AuthMoreData",
                    }));
                }
            };
        if let Some(reply) = reply {
            let mut out = BytesMut::new();
            seq = encode_packet(seq, &reply, &mut out);
            s.write_all(&out).await.map_err(LoginError::Io)?;
            s.flush().await.map_err(LoginError::Io)?;
        }
    }
    Err(LoginError::TooManyRounds)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    use super::*;
    use crate::protocol::mysql::handshake::{
        AuthSwitch, ClientHandshake, auth_more_data, parse_client_handshake, status,
    };
    use crate::protocol::mysql::packet::packet;

    const NONCE: &[u8; 20] = b"abcdefghijklmnopqrst";

    fn greeting(plugin: &str) -> Handshake {
        Handshake {
            server_version: "8.0.36".into(),
            connection_id: 7,
            nonce: NONCE.to_vec(),
            capabilities: Capabilities::sluice_default()
                | Capabilities::CONNECT_ATTRS
                | Capabilities::MYSQL,
            charset: 255,
            status: status::AUTOCOMMIT,
            auth_plugin: plugin.into(),
        }
    }

    /// A scripted server: reads one packet, checks it, answers.
    async fn read_one(s: &mut DuplexStream) -> (u8, Vec<u8>) {
        let mut buf = BytesMut::new();
        let mut dec = Decoder::unchecked(1 << 20);
        loop {
            if let Some((_, p)) = dec.decode(&buf).unwrap() {
                return (p.seq, p.payload.into_owned());
            }
            assert!(s.read_buf(&mut buf).await.unwrap() > 0, "client closed");
        }
    }

    fn creds() -> Credentials<'static> {
        Credentials {
            user: "app",
            password: b"secret",
            database: Some("shop"),
        }
    }

    async fn run_client(mut c: DuplexStream, tls: bool) -> Result<Login, LoginError> {
        let g = read_greeting(&mut c).await?;
        authenticate(&mut c, &g, &creds(), &LoginOptions::default(), tls).await
    }

    #[tokio::test]
    async fn caching_sha2_fast_auth_logs_in() {
        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(run_client(c, false));
        s.write_all(&packet(0, &greeting(CACHING_SHA2_PASSWORD).encode()))
            .await
            .unwrap();
        let (seq, resp) = read_one(&mut s).await;
        assert_eq!(seq, 1);
        let ClientHandshake::Response(r) = parse_client_handshake(&resp).unwrap() else {
            panic!("ssl request")
        };
        assert_eq!(r.username, "app");
        assert_eq!(r.database.as_deref(), Some("shop"));
        assert_eq!(r.auth_plugin.as_deref(), Some(CACHING_SHA2_PASSWORD));
        assert_eq!(
            r.auth_response,
            auth::caching_sha2_password(b"secret", NONCE)
        );
        assert!(!r.capabilities.contains(Capabilities::COMPRESS));
        assert!(!r.capabilities.contains(Capabilities::LOCAL_FILES));
        s.write_all(&packet(2, &auth_more_data(&[auth::FAST_AUTH_SUCCESS])))
            .await
            .unwrap();
        let caps = Capabilities::sluice_default();
        s.write_all(&packet(3, &OkPacket::default().encode(0, caps)))
            .await
            .unwrap();
        let login = client.await.unwrap().unwrap();
        assert_eq!(login.plugin, CACHING_SHA2_PASSWORD);
    }

    #[tokio::test]
    async fn caching_sha2_full_auth_sends_the_password_over_tls_or_rsa_encrypted_without() {
        // Over "TLS" (the caller upgraded the stream): the password, NUL-terminated.
        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(async move {
            let mut c = c;
            let g = read_greeting(&mut c).await?;
            authenticate(&mut c, &g, &creds(), &LoginOptions::default(), true).await
        });
        s.write_all(&packet(0, &greeting(CACHING_SHA2_PASSWORD).encode()))
            .await
            .unwrap();
        let (seq, _) = read_one(&mut s).await;
        assert_eq!(seq, 2, "after an SSLRequest the response is packet 2");
        s.write_all(&packet(3, &auth_more_data(&[auth::PERFORM_FULL_AUTH])))
            .await
            .unwrap();
        let (seq, pw) = read_one(&mut s).await;
        assert_eq!((seq, pw.as_slice()), (4, &b"secret\0"[..]));
        s.write_all(&packet(
            5,
            &OkPacket::default().encode(0, Capabilities::sluice_default()),
        ))
        .await
        .unwrap();
        client.await.unwrap().unwrap();

        // Without TLS: sluice asks for the server's RSA key and sends the password encrypted
        // with it (OAEP), XORed with the nonce; openssl, holding the private key, reads it.
        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(run_client(c, false));
        s.write_all(&packet(0, &greeting(CACHING_SHA2_PASSWORD).encode()))
            .await
            .unwrap();
        read_one(&mut s).await;
        s.write_all(&packet(2, &auth_more_data(&[auth::PERFORM_FULL_AUTH])))
            .await
            .unwrap();
        let (seq, ask) = read_one(&mut s).await;
        assert_eq!((seq, ask.as_slice()), (3, &[auth::REQUEST_PUBLIC_KEY][..]));
        let key = include_bytes!("../../../testdata/mysql/rsa_public.pem");
        s.write_all(&packet(4, &auth_more_data(key))).await.unwrap();
        let (seq, sealed) = read_one(&mut s).await;
        assert_eq!((seq, sealed.len()), (5, 256));
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        s.write_all(&packet(
            6,
            &OkPacket::default().encode(0, Capabilities::sluice_default()),
        ))
        .await
        .unwrap();
        client.await.unwrap().unwrap();
        let opened = openssl_oaep_decrypt(&sealed);
        let expected: Vec<u8> = b"secret\0"
            .iter()
            .zip(NONCE.iter())
            .map(|(a, b)| a ^ b)
            .collect();
        assert_eq!(opened, expected);

        // A key that is not one: refused, with the fix in the message, password never sent.
        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(run_client(c, false));
        s.write_all(&packet(0, &greeting(CACHING_SHA2_PASSWORD).encode()))
            .await
            .unwrap();
        read_one(&mut s).await;
        s.write_all(&packet(2, &auth_more_data(&[auth::PERFORM_FULL_AUTH])))
            .await
            .unwrap();
        read_one(&mut s).await;
        s.write_all(&packet(
            4,
            &auth_more_data(b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n"),
        ))
        .await
        .unwrap();
        let e = client.await.unwrap().unwrap_err();
        let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(chain.contains("backend_tls = \"require\""), "{chain}");
    }

    /// `openssl pkeyutl` decrypting RSA-OAEP (SHA-1) with the test key's private half: the
    /// reference implementation MySQL servers use.
    fn openssl_oaep_decrypt(sealed: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/testdata/mysql/rsa_private.pem"
        );
        let mut child = std::process::Command::new("openssl")
            .args(["pkeyutl", "-decrypt", "-inkey", key])
            .args([
                "-pkeyopt",
                "rsa_padding_mode:oaep",
                "-pkeyopt",
                "rsa_oaep_md:sha1",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (apt-get install openssl)");
        child.stdin.take().unwrap().write_all(sealed).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl could not decrypt");
        out.stdout
    }

    #[tokio::test]
    async fn an_auth_switch_to_native_password_is_followed() {
        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(run_client(c, false));
        s.write_all(&packet(0, &greeting(CACHING_SHA2_PASSWORD).encode()))
            .await
            .unwrap();
        read_one(&mut s).await;
        let fresh = b"ZYXWVUTSRQPONMLKJIHG".to_vec();
        let sw = AuthSwitch {
            plugin: NATIVE_PASSWORD.into(),
            data: fresh.clone(),
        };
        s.write_all(&packet(2, &sw.encode())).await.unwrap();
        let (seq, resp) = read_one(&mut s).await;
        assert_eq!(seq, 3);
        assert_eq!(resp, auth::native_password(b"secret", &fresh));
        s.write_all(&packet(
            4,
            &ErrPacket::new(1045, "28000", "Access denied for user 'app'").encode(),
        ))
        .await
        .unwrap();
        let e = client.await.unwrap().unwrap_err();
        assert!(
            matches!(&e, LoginError::Refused(err) if err.code == 1045),
            "{e}"
        );
        assert!(e.to_string().contains("error 1045 (28000)"));
    }

    #[tokio::test]
    async fn a_wrong_sequence_id_and_an_unknown_plugin_are_clear_errors() {
        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(run_client(c, false));
        s.write_all(&packet(0, &greeting(NATIVE_PASSWORD).encode()))
            .await
            .unwrap();
        read_one(&mut s).await;
        s.write_all(&packet(
            7,
            &OkPacket::default().encode(0, Capabilities::sluice_default()),
        ))
        .await
        .unwrap();
        let e = client.await.unwrap().unwrap_err();
        assert!(matches!(
            e,
            LoginError::Packet(PacketError::Sequence {
                expected: 2,
                got: 7
            })
        ));

        let (c, mut s) = duplex(4096);
        let client = tokio::spawn(run_client(c, false));
        s.write_all(&packet(0, &greeting(NATIVE_PASSWORD).encode()))
            .await
            .unwrap();
        read_one(&mut s).await;
        let sw = AuthSwitch {
            plugin: "client_ed25519".into(),
            data: vec![1; 32],
        };
        s.write_all(&packet(2, &sw.encode())).await.unwrap();
        let e = client.await.unwrap().unwrap_err();
        assert!(matches!(
            e,
            LoginError::Auth(AuthError::UnsupportedPlugin(ref p)) if p == "client_ed25519"
        ));
    }

    #[tokio::test]
    async fn a_greeting_that_is_an_error_is_a_refusal() {
        let (mut c, mut s) = duplex(4096);
        s.write_all(&packet(0, b"\xff\x10\x04Too many connections"))
            .await
            .unwrap();
        let e = read_greeting(&mut c).await.unwrap_err();
        assert!(matches!(e, LoginError::Refused(ref err) if err.code == 1040));
        drop(s);
        let (mut c, s) = duplex(4096);
        drop(s);
        assert!(matches!(
            read_greeting(&mut c).await.unwrap_err(),
            LoginError::Closed
        ));
    }
}
