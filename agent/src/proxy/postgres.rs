//! One PostgreSQL session through the proxy: startup, then a message-framed relay in both
//! directions that journals every chunk of whole messages **before** forwarding it.
//!
//! Invariants:
//! - Bytes are forwarded exactly as received, in chunks of whole messages; nothing is
//!   re-encoded. The journal gets the same chunk (password messages emptied: the journal never
//!   holds a credential).
//! - Nothing is forwarded that the journal did not accept: a failed append ends the session.
//! - Memory per connection is bounded: a client message is capped at 10 kB until the server
//!   has said AuthenticationOk, then both directions at `max_message_bytes`; a larger declared
//!   length closes the connection with a logged and journaled reason.
//! - Every way a session ends (either side closes, bad input, backend unreachable, agent
//!   shutdown) writes the session's end event.
//!
//! Authentication is passed through unchanged for now; TLS requests are answered 'N'.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use sluice_journal::{NoteLevel, SessionRecorder, SessionStart};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tracing::{Span, debug, info, warn};

use super::{Routed, Shared, upstream};
use crate::protocol::postgres::encode::{SSL_REFUSED, Severity, error_response};
use crate::protocol::postgres::frame::{messages, whole_messages};
use crate::protocol::postgres::startup::{
    StartupPacket, is_tls_client_hello, parse_startup, startup_len,
};

/// Cap on any client message before the server has accepted the login.
const PRE_AUTH_MAX: usize = 10 * 1024;
/// How much a read asks for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Why a session ended; the text goes to the journal's end event and the log.
#[derive(Debug)]
enum End {
    ClientClosed,
    ServerClosed,
    ClientClosedMidMessage,
    ServerClosedMidMessage,
    Malformed {
        from: &'static str,
        reason: String,
    },
    Io {
        from: &'static str,
        error: std::io::Error,
    },
    Journal(sluice_journal::JournalError),
    Shutdown,
}

impl End {
    fn text(&self) -> String {
        match self {
            End::ClientClosed => "client closed the connection".into(),
            End::ServerClosed => "server closed the connection".into(),
            End::ClientClosedMidMessage => "client disconnected in the middle of a message".into(),
            End::ServerClosedMidMessage => "server disconnected in the middle of a message".into(),
            End::Malformed { from, reason } => {
                format!("malformed message from the {from}: {reason}")
            }
            End::Io { from, error } => format!("i/o error on the {from} connection: {error}"),
            End::Journal(e) => format!("journal write failed: {e}"),
            End::Shutdown => "agent shutdown".into(),
        }
    }
}

pub(crate) async fn serve(
    mut client: TcpStream,
    routed: Routed,
    shared: &Shared,
    stop: &mut broadcast::Receiver<()>,
) {
    let target = routed.target.name.clone();
    let startup = tokio::select! {
        r = tokio::time::timeout(shared.config.startup_timeout(), read_startup(&mut client, &routed, shared)) => match r {
            Ok(s) => s,
            Err(_) => Err(StartupFailure::Refuse("no startup message within the startup timeout".into())),
        },
        _ = stop.recv() => return,
    };
    let (packet, params) = match startup {
        Ok(x) => x,
        Err(StartupFailure::Quiet) => return,
        Err(StartupFailure::Refuse(reason)) => {
            warn!(%reason, "connection refused before startup");
            let _ = client
                .write_all(&error_response(
                    Severity::Fatal,
                    "08P01",
                    &format!("sluice: {reason}"),
                ))
                .await;
            if let Ok(rec) = start(shared, &routed, Vec::new()) {
                let _ = rec.note(NoteLevel::Error, reason.clone());
                let _ = rec.end(reason);
            }
            return;
        }
    };

    let recorder = match start(shared, &routed, params) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot record the session: refused");
            let _ = client
                .write_all(&error_response(
                    Severity::Fatal,
                    "58030",
                    "sluice: this session cannot be recorded (journal unavailable), so it is refused",
                ))
                .await;
            return;
        }
    };
    Span::current().record("session", tracing::field::display(recorder.id()));

    let server = match upstream::dial(
        routed.backend,
        shared.config.upstream_mark,
        shared.config.connect_timeout(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let text = format!(
                "sluice: cannot reach target \"{target}\" at {}: {e}",
                routed.backend
            );
            warn!(backend = %routed.backend, error = %e, "backend unreachable");
            let _ = recorder.note(NoteLevel::Error, text.clone());
            let _ = client
                .write_all(&error_response(Severity::Fatal, "08006", &text))
                .await;
            let _ = recorder.end("backend unreachable");
            return;
        }
    };
    info!(backend = %routed.backend, "session started");
    let end = relay(
        client,
        server,
        packet,
        &recorder,
        shared.config.max_message_bytes,
        stop,
    )
    .await;
    let text = end.text();
    match &end {
        End::ClientClosed | End::ServerClosed | End::Shutdown => {
            info!(reason = %text, "session ended")
        }
        _ => warn!(reason = %text, "session ended abnormally"),
    }
    if !matches!(
        end,
        End::ClientClosed | End::ServerClosed | End::Shutdown | End::Journal(_)
    ) {
        let _ = recorder.note(NoteLevel::Error, text.clone());
    }
    if let Err(e) = recorder.end(text) {
        warn!(error = %e, "cannot seal the session");
    }
}

fn start(
    shared: &Shared,
    routed: &Routed,
    params: Vec<(String, String)>,
) -> Result<SessionRecorder, sluice_journal::JournalError> {
    shared.journal.start_session(SessionStart {
        target: routed.target.name.clone(),
        protocol: routed.target.protocol.as_str().into(),
        orig_dst: routed.orig_dst.to_string(),
        client_addr: routed.client_addr.to_string(),
        process: routed.process.clone(),
        params,
    })
}

enum StartupFailure {
    /// The client went away, or spoke TLS directly: nothing useful to say or record.
    Quiet,
    /// Refuse with this reason (sent to the client and journaled).
    Refuse(String),
}

/// Reads until a StartupMessage, answering SSLRequest/GSSENCRequest with 'N' and forwarding a
/// CancelRequest to the backend. Returns the raw StartupMessage and its parameters.
async fn read_startup(
    client: &mut TcpStream,
    routed: &Routed,
    shared: &Shared,
) -> Result<(Bytes, Vec<(String, String)>), StartupFailure> {
    let mut buf = BytesMut::with_capacity(512);
    // Bounded: at most SSLRequest, GSSENCRequest, then the startup message.
    for _ in 0..4 {
        let len = loop {
            match startup_len(&buf, PRE_AUTH_MAX) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(e) => return Err(StartupFailure::Refuse(format!("bad startup packet: {e}"))),
            }
            if buf.first().copied().is_some_and(is_tls_client_hello) {
                debug!("client started TLS directly; not supported yet");
                return Err(StartupFailure::Quiet);
            }
            match client.read_buf(&mut buf).await {
                Ok(0) if buf.is_empty() => return Err(StartupFailure::Quiet),
                Ok(0) => {
                    return Err(StartupFailure::Refuse(
                        "client disconnected during startup".into(),
                    ));
                }
                Ok(_) => {}
                Err(_) => return Err(StartupFailure::Quiet),
            }
        };
        let packet = buf.split_to(len).freeze();
        match parse_startup(&packet) {
            Ok(StartupPacket::SslRequest) | Ok(StartupPacket::GssEncRequest) => {
                client
                    .write_all(&[SSL_REFUSED])
                    .await
                    .map_err(|_| StartupFailure::Quiet)?;
            }
            Ok(StartupPacket::Cancel { .. }) => {
                // Authentication passes through, so the client holds the backend's own keys.
                match upstream::dial(
                    routed.backend,
                    shared.config.upstream_mark,
                    shared.config.connect_timeout(),
                )
                .await
                {
                    Ok(mut s) => {
                        let _ = s.write_all(&packet).await;
                        info!(backend = %routed.backend, "cancel request forwarded");
                    }
                    Err(e) => warn!(error = %e, "cannot forward cancel request"),
                }
                return Err(StartupFailure::Quiet);
            }
            Ok(StartupPacket::Startup { params, .. }) => {
                if !buf.is_empty() {
                    return Err(StartupFailure::Refuse(
                        "data sent before the server answered the startup message".into(),
                    ));
                }
                return Ok((packet, params));
            }
            Err(e) => return Err(StartupFailure::Refuse(format!("bad startup packet: {e}"))),
        }
    }
    Err(StartupFailure::Refuse("too many startup packets".into()))
}

/// Relays both directions until one ends or the agent stops.
async fn relay(
    client: TcpStream,
    mut server: TcpStream,
    startup: Bytes,
    recorder: &SessionRecorder,
    max_message: usize,
    stop: &mut broadcast::Receiver<()>,
) -> End {
    // The startup packet's content is the session start's `params`, already journaled.
    if let Err(error) = server.write_all(&startup).await {
        return End::Io {
            from: "server",
            error,
        };
    }
    let authenticated = AtomicBool::new(false);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let end = {
        let c2s = pump(
            &mut client_rd,
            &mut server_wr,
            Side::Client,
            recorder,
            max_message,
            &authenticated,
        );
        let s2c = pump(
            &mut server_rd,
            &mut client_wr,
            Side::Server,
            recorder,
            max_message,
            &authenticated,
        );
        tokio::select! {
            e = c2s => e,
            e = s2c => e,
            _ = stop.recv() => End::Shutdown,
        }
    };
    // The pumps are dropped at a message boundary of what they wrote, except when one was cut
    // mid-write; a final error from sluice is then best effort.
    let notice = match &end {
        End::Shutdown => Some(error_response(
            Severity::Fatal,
            "57P01",
            "sluice: terminating connection because the agent is shutting down",
        )),
        End::Malformed { from, reason } => Some(error_response(
            Severity::Fatal,
            "08P01",
            &format!("sluice: malformed message from the {from}: {reason}"),
        )),
        End::Journal(_) => Some(error_response(
            Severity::Fatal,
            "58030",
            "sluice: the journal rejected a write, so the session is closed",
        )),
        End::ServerClosedMidMessage => Some(error_response(
            Severity::Fatal,
            "08006",
            "sluice: the server disconnected in the middle of a message",
        )),
        _ => None,
    };
    if let Some(bytes) = notice {
        let _ = recorder.server(bytes.clone());
        let _ = client_wr.write_all(&bytes).await;
    }
    let _ = client_wr.shutdown().await;
    let _ = server_wr.shutdown().await;
    end
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// Reads whole messages from `from`, journals each chunk, then writes it to `to`.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    side: Side,
    recorder: &SessionRecorder,
    max_message: usize,
    authenticated: &AtomicBool,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match from.read_buf(&mut buf).await {
            Ok(0) => {
                return match (side, buf.is_empty()) {
                    (Side::Client, true) => End::ClientClosed,
                    (Side::Client, false) => End::ClientClosedMidMessage,
                    (Side::Server, true) => End::ServerClosed,
                    (Side::Server, false) => End::ServerClosedMidMessage,
                };
            }
            Ok(_) => {}
            Err(error) => {
                return End::Io {
                    from: side.name(),
                    error,
                };
            }
        }
        let max = if side == Side::Client && !authenticated.load(Ordering::Relaxed) {
            PRE_AUTH_MAX
        } else {
            max_message
        };
        let whole = match whole_messages(&buf, max) {
            Ok(n) => n,
            Err(e) => {
                return End::Malformed {
                    from: side.name(),
                    reason: e.to_string(),
                };
            }
        };
        if whole == 0 {
            continue;
        }
        let chunk = buf.split_to(whole).freeze();
        let recorded = match side {
            Side::Client => {
                let (journal_copy, statements) = client_chunk_for_journal(&chunk);
                recorder.client(journal_copy, statements)
            }
            Side::Server => {
                if !authenticated.load(Ordering::Relaxed) && is_authentication_ok(&chunk) {
                    authenticated.store(true, Ordering::Relaxed);
                }
                recorder.server(chunk.clone())
            }
        };
        if let Err(e) = recorded {
            return End::Journal(e);
        }
        if let Err(error) = to.write_all(&chunk).await {
            let other = match side {
                Side::Client => "server",
                Side::Server => "client",
            };
            return End::Io { from: other, error };
        }
    }
}

/// The journal's copy of a client chunk (password messages emptied) and how many statements it
/// carries (simple queries and extended-protocol Binds: each is one execution).
fn client_chunk_for_journal(chunk: &Bytes) -> (Bytes, u64) {
    let mut statements = 0;
    let mut has_password = false;
    for (tag, _) in messages(chunk).flatten() {
        match tag {
            b'Q' | b'B' => statements += 1,
            b'p' => has_password = true,
            _ => {}
        }
    }
    if !has_password {
        return (chunk.clone(), statements);
    }
    let mut copy = BytesMut::with_capacity(chunk.len());
    let mut offset = 0usize;
    for (tag, body) in messages(chunk).flatten() {
        let len = 5 + body.len();
        if tag == b'p' {
            copy.extend_from_slice(&[b'p', 0, 0, 0, 4]);
        } else if let Some(whole) = chunk.get(offset..offset + len) {
            copy.extend_from_slice(whole);
        }
        offset += len;
    }
    (copy.freeze(), statements)
}

/// Does this chunk of server messages contain AuthenticationOk ('R', code 0)?
fn is_authentication_ok(chunk: &[u8]) -> bool {
    messages(chunk)
        .flatten()
        .any(|(tag, body)| tag == b'R' && body.get(..4) == Some(&[0, 0, 0, 0]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn password_messages_are_emptied_in_the_journal_copy_and_statements_counted() {
        let mut raw = BytesMut::new();
        raw.extend_from_slice(b"p\0\0\0\x0bsecret\0");
        raw.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
        let (copy, statements) = client_chunk_for_journal(&raw.freeze());
        assert_eq!(statements, 1);
        assert_eq!(&copy[..5], b"p\0\0\0\x04");
        assert_eq!(&copy[5..], b"Q\0\0\0\x0dselect 1\0");
        assert!(!copy.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn authentication_ok_is_recognised_among_other_messages() {
        assert!(is_authentication_ok(b"R\0\0\0\x08\0\0\0\0S\0\0\0\x06a\0"));
        assert!(!is_authentication_ok(b"R\0\0\0\x08\0\0\0\x03"));
    }
}
