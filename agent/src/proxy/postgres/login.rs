//! `auth = "sluice"`: sluice authenticates the person itself and logs in to the backend with a
//! role's credentials that only the agent holds. The client never sees a backend credential or
//! any backend authentication message, and the journal never holds one either.
//!
//! Who is connecting (login binding, workload identity, or an OIDC token as the password) and
//! which role they may use is decided by [`super::super::identify`], shared with MySQL; this
//! module asks for the token with AuthenticationCleartextPassword, and [`backend_login`] runs
//! the backend's authentication (SCRAM-SHA-256, MD5 or cleartext) and collects its greeting
//! (ParameterStatus, BackendKeyData, ReadyForQuery), which the caller passes on with sluice's
//! own key in place of the backend's.
//!
//! Every exchange here is bounded in messages, size and time.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sluice_journal::ProcessInfo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::PRE_AUTH_MAX;
use crate::config::Role;
use crate::protocol::postgres::auth::{
    self, SCRAM_SHA_256, ScramClient, authentication_cleartext, md5_password_message,
    password_message, startup_message,
};
use crate::protocol::postgres::backend::{Authentication, Backend, decode_backend};
use crate::protocol::postgres::frame::{FrameError, HEADER_LEN, message_len};

/// Most backend messages read before the backend's first ReadyForQuery.
const MAX_GREETING_MESSAGES: usize = 256;

use super::super::identify;
pub(crate) use super::super::identify::{Refusal, Who, choose_role};

/// Identifies the client: login binding, workload identity, or a token it sends as password.
/// Returns also the client's (emptied) password message when one was read, for the journal.
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    process: Option<&ProcessInfo>,
    local_or_tls: bool,
    shared: &super::super::Shared,
    timeout: Duration,
) -> Result<(Who, Option<Bytes>), Refusal> {
    if let Some(who) = identify::without_password(shared, process) {
        return Ok((who, None));
    }
    identify::may_send_token(
        shared,
        process,
        local_or_tls,
        "connect with sslmode=require",
    )?;
    client
        .write_all(&authentication_cleartext())
        .await
        .map_err(|_| Refusal::new("08006", "client went away"))?;
    let token = tokio::time::timeout(timeout, read_password(client))
        .await
        .map_err(|_| {
            Refusal::new("28000", "sluice: no password (token) within the time limit")
        })??;
    let who = identify::verify_token(shared, process, token).await?;
    // The journal's copy of the password message: emptied.
    Ok((who, Some(Bytes::from_static(&[b'p', 0, 0, 0, 4]))))
}

/// Reads one PasswordMessage ('p') and returns its text. A message over [`PRE_AUTH_MAX`] (a
/// token over `MAX_TOKEN_BYTES`) is refused as a bad password (28P01), after reading what the
/// client still sends of it (bounded), so it reads why before the connection closes.
async fn read_password<S: AsyncRead + Unpin>(client: &mut S) -> Result<String, Refusal> {
    let mut buf = BytesMut::with_capacity(2048);
    let (tag, msg) = match read_message(client, &mut buf, PRE_AUTH_MAX).await {
        Ok(m) => m,
        Err(ReadError::TooLong { len, .. }) => {
            super::super::drain(client, buf.len(), len).await;
            // The token is the message's body less its terminating NUL.
            return Err(identify::token_too_large(
                len.saturating_sub(HEADER_LEN + 1),
            ));
        }
        Err(ReadError::Malformed(e)) => {
            return Err(Refusal::new(
                "08P01",
                format!("sluice: bad password message: {e}"),
            ));
        }
        Err(_) => return Err(Refusal::new("08006", "client went away")),
    };
    if tag != b'p' {
        return Err(Refusal::new("08P01", "sluice: expected a password message"));
    }
    let body = &msg[HEADER_LEN..];
    let text = body.strip_suffix(&[0]).unwrap_or(body);
    String::from_utf8(text.to_vec())
        .map_err(|_| Refusal::new("28P01", "sluice: the password is not UTF-8"))
}

/// Why [`read_message`] has no message.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection before a whole message.
    Closed,
    Io(std::io::Error),
    /// A bad length.
    Malformed(String),
    /// A declared length (`len`, the whole message) over the cap `max`.
    TooLong {
        len: usize,
        max: usize,
    },
}

/// Reads one whole message (tag, length, body; at most `max` bytes) from `from`, buffering in
/// `buf`; bytes after it stay in `buf` for the next call. Returns its tag and the whole message
/// (the body is `msg[HEADER_LEN..]`). For the exchanges sluice has with a peer itself (login,
/// catalog); the relay reads chunks of whole messages instead.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<(u8, Bytes), ReadError> {
    loop {
        match message_len(buf, max) {
            Ok(Some(n)) => {
                let msg = buf.split_to(n).freeze();
                return Ok((msg[0], msg));
            }
            Ok(None) => {}
            Err(FrameError::TooLong { len, max }) => return Err(ReadError::TooLong { len, max }),
            Err(e) => return Err(ReadError::Malformed(e.to_string())),
        }
        match from.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// What the backend said after a successful login.
pub(crate) struct Greeting {
    /// ParameterStatus and NoticeResponse messages, in order, as the backend sent them.
    pub messages: Bytes,
    /// The backend's BackendKeyData.
    pub key: Option<(i32, i32)>,
    /// The backend's first ReadyForQuery.
    pub ready: Bytes,
}

/// Why the backend login failed; never contains the password.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    #[error("i/o error talking to the backend: {0}")]
    Io(#[from] std::io::Error),
    #[error("the backend closed the connection during login")]
    Closed,
    #[error("the backend sent a malformed message during login: {0}")]
    Malformed(String),
    #[error("the backend refused the login: {0}")]
    Refused(String),
    #[error("the backend asks for an authentication method sluice does not speak: {0}")]
    Unsupported(String),
    #[error("SCRAM: {0}")]
    Scram(#[from] auth::AuthError),
    #[error("the backend sent more than {MAX_GREETING_MESSAGES} messages before it was ready")]
    TooLong,
}

impl From<ReadError> for LoginError {
    fn from(e: ReadError) -> LoginError {
        match e {
            ReadError::Closed => LoginError::Closed,
            ReadError::Io(e) => LoginError::Io(e),
            ReadError::Malformed(e) => LoginError::Malformed(e),
            ReadError::TooLong { len, max } => {
                LoginError::Malformed(FrameError::TooLong { len, max }.to_string())
            }
        }
    }
}

/// Logs in to the backend as `role` with `params` (the client's, `user` replaced) and returns
/// its greeting.
pub(crate) async fn backend_login<S: AsyncRead + AsyncWrite + Unpin>(
    server: &mut S,
    role: &Role,
    params: &[(String, String)],
    max_message: usize,
) -> Result<Greeting, LoginError> {
    let mut startup: Vec<(String, String)> = vec![("user".into(), role.user.clone())];
    startup.extend(params.iter().filter(|(k, _)| k != "user").cloned());
    server.write_all(&startup_message(&startup)).await?;
    let rng = ring::rand::SystemRandom::new();
    let mut scram: Option<ScramClient> = None;
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = BytesMut::new();
    let mut key = None;
    for _ in 0..MAX_GREETING_MESSAGES {
        let (tag, msg) = read_message(server, &mut buf, max_message).await?;
        let body = &msg[HEADER_LEN..];
        let decoded =
            decode_backend(tag, body).map_err(|e| LoginError::Malformed(e.to_string()))?;
        match decoded {
            Backend::Authentication(a) => match a {
                Authentication::Ok => {}
                Authentication::CleartextPassword => {
                    server
                        .write_all(&password_message(&role.password.0))
                        .await?;
                }
                Authentication::Md5Password { salt } => {
                    server
                        .write_all(&md5_password_message(&role.user, &role.password.0, salt))
                        .await?;
                }
                Authentication::Sasl { mechanisms } => {
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(LoginError::Unsupported(format!(
                            "SASL {}",
                            mechanisms.iter().collect::<Vec<_>>().join(", ")
                        )));
                    }
                    let (client, first) = ScramClient::start(&role.password.0, &rng)?;
                    scram = Some(client);
                    server.write_all(&first).await?;
                }
                Authentication::SaslContinue(data) => {
                    let c = scram
                        .as_mut()
                        .ok_or_else(|| LoginError::Malformed("SASL continue first".into()))?;
                    let last = c.server_first(data)?;
                    server.write_all(&last).await?;
                }
                Authentication::SaslFinal(data) => {
                    scram
                        .as_ref()
                        .ok_or_else(|| LoginError::Malformed("SASL final first".into()))?
                        .server_final(data)?;
                }
                other => return Err(LoginError::Unsupported(format!("{other:?}"))),
            },
            Backend::ParameterStatus { .. } | Backend::NoticeResponse(_) => {
                out.extend_from_slice(&msg);
            }
            Backend::BackendKeyData { pid, key: secret } => key = Some((pid, secret)),
            Backend::ReadyForQuery { .. } => {
                return Ok(Greeting {
                    messages: out.freeze(),
                    key,
                    ready: msg,
                });
            }
            Backend::ErrorResponse(d) => {
                return Err(LoginError::Refused(format!(
                    "{} {}",
                    d.sqlstate().unwrap_or("?"),
                    d.message().unwrap_or("?")
                )));
            }
            other => {
                return Err(LoginError::Malformed(format!(
                    "unexpected {other:?} during login"
                )));
            }
        }
    }
    Err(LoginError::TooLong)
}
