//! One PostgreSQL session through the proxy: startup, then a message-framed relay in both
//! directions that journals every chunk of whole messages **before** forwarding it.
//!
//! Invariants:
//! - Unchanged messages are forwarded exactly as received, in chunks of whole messages; only
//!   what policy replaces (a Sync for a denied statement, sluice's errors and notices), what
//!   masking rewrites (result rows) and sluice's own login greeting are new bytes. The journal
//!   gets what was forwarded (credentials emptied: a client's password/SASL messages, and the
//!   server's SASL payloads during a relayed login).
//! - Nothing is forwarded that the journal did not accept: a failed append ends the session.
//! - Memory per connection is bounded: the startup packets are capped at 10 kB
//!   ([`STARTUP_MAX`]), the client's other messages at 64 kB and 6 bytes ([`PRE_AUTH_MAX`]: a
//!   password message with a token of up to 64 kB) until the server has said
//!   AuthenticationOk, then both directions at `max_message_bytes` (from the first message
//!   after it: the cap is read again after every read); a larger declared length closes the
//!   connection with a logged and journaled reason.
//! - Every way a session ends (either side closes, bad input, backend unreachable, agent
//!   shutdown) writes the session's end event.
//!
//! **Startup and authentication.** TLS toward the client when the target has a certificate
//! (SSLRequest, or direct TLS with ALPN `postgresql`), toward the backend per `backend_tls`.
//! With `auth = "passthrough"` the client's startup packet is forwarded and the backend
//! authenticates it through the relay. With `auth = "sluice"`, [`login`] identifies the person,
//! checks the requested role and logs in to the backend with the role's credentials; the client
//! gets sluice's greeting and its own cancel key ([`cancel`]). Either way the session's `Auth`
//! event records the method and the TLS of both legs.
//!
//! **Policy** (when `agent.policy_dir` is set). At session start the principal is resolved
//! (`policy::principal`), recorded in the session start, and asked for `connect`; a deny closes
//! the session with FATAL 42501. Then, in the client->server direction, every simple Query,
//! every Parse and every legacy FunctionCall is decided *before* it is forwarded; every
//! decision is journaled (`Body::Decision`), after the client chunk that carried it (which is
//! journaled as the client sent it, denied bytes included).
//! - A denied **Query** (or FunctionCall, which names a function by OID that policy cannot
//!   see, so it is always denied with policy id `sluice-fastpath`) is replaced by a **Sync**: the
//!   backend never sees the statement, and answers the Sync with ReadyForQuery carrying its
//!   real transaction status (a Sync inside a transaction block leaves the block as it is; in a
//!   failed block the status stays 'E'). The proxy puts its ErrorResponse (42501, naming the
//!   policy and reason) right before that ReadyForQuery.
//! - A denied **Parse** is dropped, and so is every following message up to the next Sync, as
//!   PostgreSQL itself skips to Sync after an error in an extended batch. That Sync is
//!   forwarded; the ErrorResponse goes right before the ReadyForQuery answering it. Messages of
//!   the same batch *before* the denied Parse were forwarded and run (outside a transaction
//!   block their implicit transaction then commits at that Sync, where PostgreSQL would have
//!   rolled it back: clients that need the batch atomic use BEGIN). A named statement is
//!   decided at Parse; Bind/Execute name it and the server holds its SQL, so it cannot be
//!   swapped. Caveat: the error arrives at the Sync, so a client that sends a Parse and a Flush
//!   and waits without a Sync waits until it syncs.
//! - **Ordering.** The server->client pump is the only writer to the client. The client side
//!   numbers the sync points it forwards (startup, Query, Sync, the Sync replacing a denied
//!   message); each one is answered by exactly one ReadyForQuery. An injected error is sent to
//!   the server side over a channel, tagged with the number of the ReadyForQuery it must
//!   precede, *before* the sync point is written to the backend; the server side counts
//!   ReadyForQuery messages and splices the error in right before the right one. So an
//!   injected error never overtakes responses to earlier pipelined messages, and the journal's
//!   server chunk holds exactly what the client received.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use sluice_journal::{AuthInfo, Decision, NoteLevel, Principal, SessionId, SessionRecorder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{Span, debug, info, warn};

mod cancel;
mod catalog;
mod login;
mod masking;

use super::{End, Routed, Shared, Side, strict_denial, upstream};
use crate::access::Access;
use crate::config::{AuthMode, ClientTls, Unparsed};
use crate::mask::rules::RuleSet;
use crate::policy::facts::Dialect;
use crate::policy::{Policy, SessionPolicy, SqlDecision, principal};
use crate::protocol::postgres::auth;
use crate::protocol::postgres::encode::{
    NoticeSeverity, SSL_ACCEPTED, SSL_REFUSED, Severity, error_response, notice_response,
};
use crate::protocol::postgres::frame::{HEADER_LEN, messages, whole_messages};
use crate::protocol::postgres::frontend::{Frontend, decode_frontend};
use crate::protocol::postgres::startup::{
    StartupPacket, is_tls_client_hello, parse_startup, startup_len,
};
use crate::proxy::hold::{Holder, OnTimeout, Settled, Statement, wait};
use crate::tls::{Socket, Stream};
pub(crate) use cancel::CancelKeys;
use cancel::{BackendCancel, CancelRegistration};
pub(crate) use catalog::Catalogs;

/// Cap on the startup packets (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage):
/// nobody is authenticated yet, and a StartupMessage is a few parameters.
pub(crate) const STARTUP_MAX: usize = 10 * 1024;
/// Cap on the client's other messages before the server's AuthenticationOk (PasswordMessage,
/// SASL responses): room for a token of up to `MAX_TOKEN_BYTES` as the password.
pub(crate) const PRE_AUTH_MAX: usize = super::identify::MAX_TOKEN_BYTES + HEADER_LEN + 1;
/// How much a read asks for at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Injected errors waiting for their ReadyForQuery; a client that keeps sending denied
/// statements without reading waits here (backpressure), it does not grow memory.
const INJECT_QUEUE: usize = 64;
/// The Sync message that replaces a denied Query or FunctionCall.
const SYNC: &[u8] = &[b'S', 0, 0, 0, 4];
/// The policy id a legacy FunctionCall ('F') is denied by.
const FASTPATH_POLICY: &str = "sluice-fastpath";

pub(crate) async fn serve(
    tcp: Socket,
    routed: Routed,
    shared: &Shared,
    stop: &mut broadcast::Receiver<()>,
) {
    let startup = tokio::select! {
        r = tokio::time::timeout(shared.config.startup_timeout(), read_startup(tcp, &routed, shared)) => match r {
            Ok(s) => s,
            Err(_) => return,
        },
        _ = stop.recv() => return,
    };
    let (mut client, packet, params) = match startup {
        Ok(x) => x,
        Err((_, StartupFailure::Quiet)) => return,
        Err((client, StartupFailure::Refuse(reason))) => {
            refuse(client, shared, &routed, Vec::new(), "08P01", &reason).await;
            return;
        }
    };
    let client_tls = client.describe();
    if routed.target.client_tls == ClientTls::Required && !client.is_tls() {
        let text = format!(
            "sluice: target \"{}\" requires TLS: connect with sslmode=require",
            routed.target.name
        );
        refuse(Some(client), shared, &routed, params, "28000", &text).await;
        return;
    }

    // Who this is: with `auth = "sluice"`, sluice authenticates the client itself; otherwise
    // the [[identity]] rules name a principal for policy and the backend authenticates.
    let mut client_password: Option<Bytes> = None;
    let who = match routed.target.auth {
        AuthMode::Passthrough => None,
        AuthMode::Sluice => {
            let local_or_tls = client.is_tls() || routed.client_addr.is_local();
            match login::authenticate(
                &mut client,
                routed.process.as_ref(),
                local_or_tls,
                shared,
                shared.config.startup_timeout(),
            )
            .await
            {
                Ok((who, password)) => {
                    client_password = password;
                    Some(who)
                }
                Err(r) => {
                    warn!(code = r.code, reason = %r.message, "client authentication refused");
                    refuse(Some(client), shared, &routed, params, r.code, &r.message).await;
                    return;
                }
            }
        }
    };
    let role = match &who {
        None => None,
        Some(w) => match login::choose_role(&routed.target, param(&params, "user"), w) {
            Ok(role) => Some(role.clone()),
            Err(r) => {
                warn!(principal = %w.principal.name, reason = %r.message, "role refused");
                refuse(Some(client), shared, &routed, params, r.code, &r.message).await;
                return;
            }
        },
    };

    // Policy: the principal, and may they connect at all.
    let principal = match &who {
        Some(w) => Some(w.principal.clone()),
        None => shared
            .policy
            .as_ref()
            .map(|_| principal::resolve(&shared.identities, routed.process.as_ref())),
    };
    let gate = match (&shared.policy, &principal) {
        (Some(policy), Some(who)) => Some((
            who.clone(),
            policy.clone(),
            super::policy_session(policy, &routed, who),
        )),
        _ => None,
    };
    Span::current().record(
        "principal",
        tracing::field::display(principal.as_ref().map(|p| p.name.as_str()).unwrap_or("-")),
    );
    // Sent on to the backend with the principal, so the database's own logs show who it is.
    let backend_params = match (&principal, shared.config.tag_application_name) {
        (Some(p), true) => tag_application_name(&params, &p.name),
        _ => params.clone(),
    };
    if let Err(refusal) = shared.admit_session() {
        warn!("journal spool full: session refused");
        let _ = client
            .write_all(&error_response(Severity::Fatal, "53100", &refusal))
            .await;
        return;
    }
    let recorder = match shared.start_session(&routed, params, principal.clone()) {
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
    if let Some(p) = client_password.take()
        && let Err(e) = recorder.client(p, 0)
    {
        warn!(error = %e, "journal write failed");
        return;
    }

    let mut server = match dial_backend(&routed, shared).await {
        Ok(s) => s,
        Err(text) => {
            warn!(backend = %routed.backend, error = %text, "backend unreachable");
            let _ = recorder.note(NoteLevel::Error, text.clone());
            let _ = client
                .write_all(&error_response(Severity::Fatal, "08006", &text))
                .await;
            End::BackendUnreachable.seal(&recorder, "message");
            return;
        }
    };
    let jit = principal
        .as_ref()
        .is_some_and(|p| shared.access.has_grant(&p.name, &routed.target.name));
    let (registration, cancel_rx) = CancelRegistration::new(shared.pg_cancels.clone());
    // Masking's strict mode needs statements checked even without policies.
    let strict = shared.strict_masking(&routed.target.name);
    let gate = match gate {
        None => strict.map(|rules| Gate {
            policy: None,
            strict: Some(rules),
            unparsed: routed.target.unparsed,
            access: shared.access.clone(),
            session_id: recorder.id(),
            target: routed.target.name.clone(),
            principal: principal.clone().unwrap_or_else(|| Principal {
                name: "unknown".into(),
                groups: Vec::new(),
            }),
            hold_timeout: shared.config.approval_timeout(),
            cancel: cancel_rx,
        }),
        Some((who, policy, session)) => {
            match super::decide_connect(&policy, session, jit, &recorder) {
                Ok(session) => Some(Gate {
                    policy: Some((policy, session)),
                    strict,
                    unparsed: routed.target.unparsed,
                    access: shared.access.clone(),
                    session_id: recorder.id(),
                    target: routed.target.name.clone(),
                    principal: who,
                    hold_timeout: shared.config.approval_timeout(),
                    cancel: cancel_rx,
                }),
                Err(text) => {
                    warn!(principal = %who.name, reason = %text, "connect denied by policy");
                    let bytes = error_response(Severity::Fatal, "42501", &text);
                    let _ = recorder.server(bytes.clone());
                    let _ = client.write_all(&bytes).await;
                    End::ConnectDenied.seal(&recorder, "message");
                    return;
                }
            }
        }
    };

    // The backend login: passthrough forwards the client's startup packet and relays the
    // exchange; `auth = "sluice"` logs in with the role's credentials here.
    let greeted = match &role {
        None => {
            if let Err(e) = server.write_all(&packet).await {
                End::Io {
                    from: Side::Server,
                    error: e,
                }
                .seal(&recorder, "message");
                return;
            }
            false
        }
        Some(role) => {
            let login = tokio::time::timeout(
                shared.config.connect_timeout() * 2,
                login::backend_login(
                    &mut server,
                    role,
                    &backend_params,
                    shared.config.max_message_bytes,
                ),
            )
            .await
            .unwrap_or_else(|_| Err(login::LoginError::Closed));
            let greeting = match login {
                Ok(g) => g,
                Err(e) => {
                    let text = format!(
                        "sluice: cannot log in to target \"{}\" as role \"{}\": {e}",
                        routed.target.name, role.name
                    );
                    warn!(reason = %text, "backend login failed");
                    let _ = recorder.note(NoteLevel::Error, text.clone());
                    let bytes = error_response(Severity::Fatal, "28000", &text);
                    let _ = recorder.server(bytes.clone());
                    let _ = client.write_all(&bytes).await;
                    End::BackendLoginFailed.seal(&recorder, "message");
                    return;
                }
            };
            // sluice's own key for the client; the backend's stays here for cancels.
            let own = own_key();
            if let Some((pid, key)) = greeting.key {
                registration.own(
                    own,
                    BackendCancel {
                        addr: routed.backend.clone(),
                        pid,
                        key,
                    },
                );
            }
            let mut hello = BytesMut::new();
            hello.extend_from_slice(&auth::authentication_ok());
            hello.extend_from_slice(&greeting.messages);
            hello.extend_from_slice(&auth::backend_key_data(own.0, own.1));
            hello.extend_from_slice(&greeting.ready);
            let hello = hello.freeze();
            if let Err(e) = recorder.server(hello.clone()) {
                End::Journal(e).seal(&recorder, "message");
                return;
            }
            if client.write_all(&hello).await.is_err() {
                End::ClientClosed.seal(&recorder, "message");
                return;
            }
            true
        }
    };
    let _ = recorder.auth(AuthInfo {
        method: who
            .as_ref()
            .map(|w| w.method.to_string())
            .unwrap_or_else(|| "passthrough".into()),
        role: role.as_ref().map(|r| r.name.clone()),
        backend_user: role.as_ref().map(|r| r.user.clone()),
        client_tls,
        backend_tls: server.describe(),
        expires_ns: who.as_ref().and_then(|w| w.expires_ns),
    });
    info!(backend = %routed.backend, "session started");
    // Masking applies to the principal's groups (none known: nobody's overrides).
    let masker = shared.masking.as_ref().map(|rules| {
        let groups = principal
            .as_ref()
            .map(|p| p.groups.as_slice())
            .unwrap_or(&[]);
        // Column origins need a catalog connection, which needs credentials of sluice's own.
        let catalog = role.as_ref().map(|role| catalog::CatalogAccess {
            catalogs: shared.pg_catalogs.clone(),
            target: routed.target.clone(),
            backend: routed.backend.clone(),
            role: role.clone(),
            database: param(&backend_params, "database")
                .or(param(&backend_params, "user"))
                .unwrap_or("postgres")
                .to_string(),
            mark: shared.config.upstream_mark,
            timeout: shared.config.connect_timeout() * 2,
            max_message: shared.config.max_message_bytes,
        });
        masking::Masker::new(rules.clone(), &routed.target.name, groups, catalog)
    });
    let end = relay(
        client,
        server,
        Relay {
            recorder: &recorder,
            max_message: shared.config.max_message_bytes,
            gate: gate.as_ref(),
            cancel: &registration,
            greeted,
        },
        masker,
        stop,
    )
    .await;
    drop(registration);
    end.seal(&recorder, "message");
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `application_name` with the principal appended, so the database's logs (and
/// pg_stat_activity) show who is behind a session: `psql [sluice:ada@example.com]`.
fn tag_application_name(params: &[(String, String)], principal: &str) -> Vec<(String, String)> {
    let tag = format!("[sluice:{principal}]");
    let mut out: Vec<(String, String)> = params.to_vec();
    match out.iter_mut().find(|(k, _)| k == "application_name") {
        Some((_, v)) if v.is_empty() => *v = tag,
        Some((_, v)) => *v = format!("{v} {tag}"),
        None => out.push(("application_name".into(), tag)),
    }
    out
}

/// A random key pair sluice gives a client instead of the backend's.
fn own_key() -> (i32, i32) {
    use ring::rand::SecureRandom;
    let mut raw = [0u8; 8];
    // Without randomness the key is still unique enough per session but guessable; cancels
    // need the exact pair, and failing the session over it would be worse.
    let _ = ring::rand::SystemRandom::new().fill(&mut raw);
    (
        i32::from_be_bytes([raw[0] & 0x7f, raw[1], raw[2], raw[3]]),
        i32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]),
    )
}

/// Dials the target's backend (SO_MARK), with TLS when the target says so.
async fn dial_backend(routed: &Routed, shared: &Shared) -> Result<Stream, String> {
    dial(
        &routed.target,
        &routed.backend,
        shared.config.upstream_mark,
        shared.config.connect_timeout(),
    )
    .await
}

/// Dials `backend` for `target` with SO_MARK `mark`, with TLS when the target says so.
pub(crate) async fn dial(
    target: &crate::config::Target,
    backend: &upstream::Addr,
    mark: u32,
    timeout: Duration,
) -> Result<Stream, String> {
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "sluice: cannot reach target \"{}\" at {}: {e}",
            target.name, backend
        )
    };
    let tcp = upstream::dial(backend, mark, timeout)
        .await
        .map_err(|e| unreachable(&e))?;
    let Some(tls) = &target.backend_tls else {
        return Ok(Stream::Plain(tcp));
    };
    let mut tcp = tcp;
    // PostgreSQL's SSLRequest: 'S' means go ahead.
    tcp.write_all(&[0, 0, 0, 8, 4, 210, 22, 47])
        .await
        .map_err(|e| unreachable(&e))?;
    let mut answer = [0u8; 1];
    tokio::time::timeout(timeout, tcp.read_exact(&mut answer))
        .await
        .map_err(|_| unreachable(&"no answer to SSLRequest"))?
        .map_err(|e| unreachable(&e))?;
    if answer[0] != SSL_ACCEPTED {
        return Err(unreachable(
            &"the backend does not accept TLS, and the target's backend_tls requires it",
        ));
    }
    upstream::tls(tcp, target, backend, tls.clone(), timeout)
        .await
        .map_err(|e| unreachable(&e))
}

/// Refuses a session before it started: the client gets FATAL `code` with `text`, and the
/// journal a session with the refusal as its note and end.
async fn refuse(
    client: Option<Stream>,
    shared: &Shared,
    routed: &Routed,
    params: Vec<(String, String)>,
    code: &str,
    text: &str,
) {
    if let Some(mut c) = client {
        let _ = c
            .write_all(&error_response(Severity::Fatal, code, text))
            .await;
        let _ = c.shutdown().await;
    }
    shared.record_refusal(routed, params, text);
}

enum StartupFailure {
    /// The client went away, or its TLS failed: nothing useful to say or record.
    Quiet,
    /// Refuse with this reason (sent to the client and journaled).
    Refuse(String),
}

type StartupResult =
    Result<(Stream, Bytes, Vec<(String, String)>), (Option<Stream>, StartupFailure)>;

/// Reads until a StartupMessage: answers SSLRequest with 'S' and TLS (when the target has a
/// certificate; 'N' otherwise), accepts PostgreSQL 17's direct TLS (ALPN `postgresql`),
/// answers GSSENCRequest with 'N', and passes a CancelRequest on. Returns the client stream
/// (TLS or not), the raw StartupMessage and its parameters.
async fn read_startup(tcp: Socket, routed: &Routed, shared: &Shared) -> StartupResult {
    let tls = routed.target.tls.clone();
    // Direct TLS: the first byte opens a ClientHello. Peeked, so the acceptor sees it all.
    let mut first = [0u8; 1];
    let mut stream = match tcp.peek(&mut first).await {
        Ok(0) | Err(_) => return Err((None, StartupFailure::Quiet)),
        Ok(_) if is_tls_client_hello(first[0]) => match &tls {
            None => {
                debug!("client started TLS directly, but the target has no certificate");
                return Err((None, StartupFailure::Quiet));
            }
            Some(cfg) => {
                let s = accept_tls(cfg.clone(), tcp).await.map_err(|f| (None, f))?;
                if s.get_ref().1.alpn_protocol() != Some(crate::tls::ALPN_POSTGRESQL) {
                    // PostgreSQL 17 requires ALPN with direct TLS; so does sluice.
                    debug!("direct TLS without ALPN postgresql: closed");
                    return Err((None, StartupFailure::Quiet));
                }
                Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))
            }
        },
        Ok(_) => Stream::Plain(tcp),
    };
    let mut buf = BytesMut::with_capacity(512);
    // Bounded: at most SSLRequest, GSSENCRequest, then the startup message.
    for _ in 0..4 {
        let len = loop {
            match startup_len(&buf, STARTUP_MAX) {
                Ok(Some(n)) => break n,
                Ok(None) => {}
                Err(e) => {
                    return Err((
                        Some(stream),
                        StartupFailure::Refuse(format!("sluice: bad startup packet: {e}")),
                    ));
                }
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) if buf.is_empty() => return Err((None, StartupFailure::Quiet)),
                Ok(0) => {
                    return Err((
                        None,
                        StartupFailure::Refuse("sluice: client disconnected during startup".into()),
                    ));
                }
                Ok(_) => {}
                Err(_) => return Err((None, StartupFailure::Quiet)),
            }
        };
        let packet = buf.split_to(len).freeze();
        match parse_startup(&packet) {
            Ok(StartupPacket::SslRequest) => {
                // Bytes after the SSLRequest, before our answer, would be read as if they had
                // come over TLS (CVE-2021-23214): refuse them.
                if !buf.is_empty() {
                    return Err((
                        Some(stream),
                        StartupFailure::Refuse(
                            "sluice: data sent after SSLRequest before the answer".into(),
                        ),
                    ));
                }
                stream = match (stream, &tls) {
                    (Stream::Plain(mut tcp), Some(cfg)) => {
                        if tcp.write_all(&[SSL_ACCEPTED]).await.is_err() {
                            return Err((None, StartupFailure::Quiet));
                        }
                        let s = accept_tls(cfg.clone(), tcp).await.map_err(|f| (None, f))?;
                        Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))
                    }
                    (mut other, _) => {
                        if other.write_all(&[SSL_REFUSED]).await.is_err() {
                            return Err((None, StartupFailure::Quiet));
                        }
                        other
                    }
                };
            }
            Ok(StartupPacket::GssEncRequest) => {
                if stream.write_all(&[SSL_REFUSED]).await.is_err() {
                    return Err((None, StartupFailure::Quiet));
                }
            }
            Ok(StartupPacket::Cancel { pid, key }) => {
                forward_cancel(routed, shared, &packet, (pid, key)).await;
                return Err((None, StartupFailure::Quiet));
            }
            Ok(StartupPacket::Startup { params, .. }) => {
                if !buf.is_empty() {
                    return Err((
                        Some(stream),
                        StartupFailure::Refuse(
                            "sluice: data sent before the server answered the startup message"
                                .into(),
                        ),
                    ));
                }
                return Ok((stream, packet, params));
            }
            Err(e) => {
                return Err((
                    Some(stream),
                    StartupFailure::Refuse(format!("sluice: bad startup packet: {e}")),
                ));
            }
        }
    }
    Err((
        Some(stream),
        StartupFailure::Refuse("sluice: too many startup packets".into()),
    ))
}

async fn accept_tls(
    cfg: Arc<rustls::ServerConfig>,
    tcp: Socket,
) -> Result<tokio_rustls::server::TlsStream<Socket>, StartupFailure> {
    tokio_rustls::TlsAcceptor::from(cfg)
        .accept(tcp)
        .await
        .map_err(|e| {
            debug!(error = %e, "client TLS handshake failed");
            StartupFailure::Quiet
        })
}

/// A CancelRequest: tells the session with that key (a held statement is withdrawn), and
/// cancels on the backend, with the backend's key when the client holds one of sluice's.
async fn forward_cancel(routed: &Routed, shared: &Shared, packet: &Bytes, key: cancel::Key) {
    let (addr, bytes) = match shared.pg_cancels.cancel(key) {
        Some(Some(b)) => (b.addr, auth::cancel_request(b.pid, b.key)),
        Some(None) | None => (routed.backend.clone(), packet.clone()),
    };
    match upstream::dial(
        &addr,
        shared.config.upstream_mark,
        shared.config.connect_timeout(),
    )
    .await
    {
        Ok(mut s) => {
            let _ = s.write_all(&bytes).await;
            info!(backend = %addr, "cancel request forwarded");
        }
        Err(e) => warn!(error = %e, "cannot forward cancel request"),
    }
}

/// What a session needs to decide statements.
struct Gate {
    /// The policies and this session's part of their requests (None: no `policy_dir`).
    policy: Option<(Arc<Policy>, SessionPolicy)>,
    /// Masking rules, when the target is in strict masking mode.
    strict: Option<Arc<RuleSet>>,
    unparsed: Unparsed,
    access: Arc<Access>,
    session_id: SessionId,
    target: String,
    principal: Principal,
    hold_timeout: Duration,
    /// Bumped by a CancelRequest carrying this session's key.
    cancel: watch::Receiver<u64>,
}

impl Gate {
    /// Does the principal hold a just-in-time grant for the target right now?
    fn jit(&self) -> bool {
        self.access.has_grant(&self.principal.name, &self.target)
    }
}

/// A message from sluice that the server side writes to the client: `error` right before the
/// ReadyForQuery numbered `before_ready` (counting from the one that ends the startup, number
/// 1), or at once when `before_ready` is [`NOW`] (a NoticeResponse, which PostgreSQL allows
/// between any two messages).
struct Injection {
    before_ready: u64,
    error: Bytes,
}

/// `Injection::before_ready` for a message written at the next message boundary.
const NOW: u64 = 0;

/// Relays both directions until one ends or the agent stops.
/// What both directions of a session's relay share.
struct Relay<'a> {
    recorder: &'a SessionRecorder,
    max_message: usize,
    gate: Option<&'a Gate>,
    cancel: &'a CancelRegistration,
    /// sluice already logged in to the backend and greeted the client (AuthenticationOk ...
    /// ReadyForQuery); otherwise the client's startup was forwarded and its exchange is relayed.
    greeted: bool,
}

async fn relay(
    client: Stream,
    server: Stream,
    r: Relay<'_>,
    masker: Option<masking::Masker>,
    stop: &mut broadcast::Receiver<()>,
) -> End {
    match (client, server) {
        // Plain sockets split into owned halves without a lock between them.
        (Stream::Plain(c), Stream::Plain(s)) => {
            let (client_rd, client_wr) = c.into_split();
            let (server_rd, server_wr) = s.into_split();
            relay_halves(
                (client_rd, client_wr),
                (server_rd, server_wr),
                r,
                masker,
                stop,
            )
            .await
        }
        (c, s) => {
            let client = tokio::io::split(c);
            let server = tokio::io::split(s);
            relay_halves(client, server, r, masker, stop).await
        }
    }
}

async fn relay_halves<CR, CW, SR, SW>(
    (mut client_rd, mut client_wr): (CR, CW),
    (mut server_rd, mut server_wr): (SR, SW),
    r: Relay<'_>,
    masker: Option<masking::Masker>,
    stop: &mut broadcast::Receiver<()>,
) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    SR: AsyncRead + Unpin,
    SW: AsyncWrite + Unpin,
{
    let recorder = r.recorder;
    let authenticated = AtomicBool::new(r.greeted);
    let (inject_tx, inject_rx) = mpsc::channel::<Injection>(INJECT_QUEUE);
    let end = {
        let c2s = client_pump(
            &mut client_rd,
            &mut server_wr,
            &r,
            &authenticated,
            inject_tx,
        );
        let s2c = server_pump(
            &mut server_rd,
            &mut client_wr,
            &r,
            &authenticated,
            masker,
            inject_rx,
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

/// Reads from `from` until a chunk of whole messages is buffered; returns it, or why the
/// stream ended. `max` is the cap on one message, asked again after every read (it grows
/// when the login completes while this read waits).
async fn read_chunk<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
    side: Side,
    max: &(dyn Fn() -> usize + Sync),
) -> Result<Bytes, End> {
    loop {
        if let Some(chunk) = split_whole(buf, side, max())? {
            return Ok(chunk);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match from.read_buf(buf).await {
            Ok(0) => {
                return Err(match (side, buf.is_empty()) {
                    (Side::Client, true) => End::ClientClosed,
                    (Side::Client, false) => End::ClientClosedMidMessage,
                    (Side::Server, true) => End::ServerClosed,
                    (Side::Server, false) => End::ServerClosedMidMessage,
                });
            }
            Ok(_) => {}
            Err(error) => {
                return Err(End::Io { from: side, error });
            }
        }
    }
}

fn split_whole(buf: &mut BytesMut, side: Side, max: usize) -> Result<Option<Bytes>, End> {
    let whole = whole_messages(buf, max).map_err(|e| End::Malformed {
        from: side,
        reason: e.to_string(),
    })?;
    Ok((whole > 0).then(|| buf.split_to(whole).freeze()))
}

/// Client -> server: journals each chunk as received, decides its statements (when a policy is
/// configured), then forwards what policy let through. A statement an approval policy holds
/// stops the chunk there: what came before it is forwarded, the client is told (a notice), and
/// the rest of the chunk waits for the decision.
async fn client_pump<R, W>(
    from: &mut R,
    to: &mut W,
    r: &Relay<'_>,
    authenticated: &AtomicBool,
    inject: mpsc::Sender<Injection>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (recorder, max_message, gate) = (r.recorder, r.max_message, r.gate);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut state = ClientState {
        // The startup message is answered by the first ReadyForQuery.
        sync_points: 1,
        skipping: None,
    };
    // Read at every check, not once per loop: the read that is waiting when the server's
    // AuthenticationOk goes by must take the first statement with `max_message_bytes`.
    let cap = || {
        if authenticated.load(Ordering::Relaxed) {
            max_message
        } else {
            PRE_AUTH_MAX
        }
    };
    loop {
        let chunk = match read_chunk(from, &mut buf, Side::Client, &cap).await {
            Ok(c) => c,
            Err(end) => return end,
        };
        let (journal_copy, statements) = client_chunk_for_journal(&chunk);
        let Some(gate) = gate else {
            if let Err(e) = recorder.client(journal_copy, statements) {
                return End::Journal(e);
            }
            if let Err(error) = to.write_all(&chunk).await {
                return End::Io {
                    from: Side::Server,
                    error,
                };
            }
            continue;
        };
        let mut from_offset = 0usize;
        let mut resolved: Option<Resolved> = None;
        // The chunk is journaled with the first decisions on it, before anything is forwarded.
        let mut unjournaled = Some((journal_copy, statements));
        loop {
            let gated = match gate_chunk(&chunk, from_offset, resolved.take(), gate, &mut state) {
                Ok(g) => g,
                Err(reason) => {
                    if let Some((copy, n)) = unjournaled.take() {
                        let _ = recorder.client(copy, n);
                    }
                    return End::Malformed {
                        from: Side::Client,
                        reason,
                    };
                }
            };
            let written = match unjournaled.take() {
                Some((copy, n)) => recorder.client_with_decisions(copy, n, gated.decisions),
                None => gated
                    .decisions
                    .into_iter()
                    .try_for_each(|d| recorder.decision(d)),
            };
            if let Err(e) = written {
                return End::Journal(e);
            }
            // Injections go first: the server side must know about an error before the
            // ReadyForQuery it precedes can come back.
            for i in gated.injections {
                if inject.send(i).await.is_err() {
                    return End::ServerClosed;
                }
            }
            if !gated.forward.is_empty()
                && let Err(error) = to.write_all(&gated.forward).await
            {
                return End::Io {
                    from: Side::Server,
                    error,
                };
            }
            let Some(held) = gated.held else { break };
            let outcome =
                match hold(held.clone(), gate, recorder, &inject, from, &mut buf, cap()).await {
                    Ok(o) => o,
                    Err(end) => return end,
                };
            from_offset = held.offset;
            resolved = Some(Resolved {
                offset: held.offset,
                outcome,
            });
        }
    }
}

/// A statement an approval policy holds: where it is in its chunk and what policy said.
#[derive(Debug, Clone)]
struct Held {
    offset: usize,
    sql: String,
    action: &'static str,
    policies: Vec<String>,
    reason: String,
    approvers: String,
}

/// What became of a held statement, for [`gate_chunk`] to act on.
#[derive(Debug, Clone)]
enum HoldOutcome {
    Approved {
        request: String,
        by: String,
        comment: String,
    },
    /// Denied, timed out, cancelled, or not recordable: the client's error (SQLSTATE, text).
    Refused { code: &'static str, message: String },
}

/// The outcome for the message at `offset` of the chunk being gated.
struct Resolved {
    offset: usize,
    outcome: HoldOutcome,
}

/// Holds a statement ([`crate::proxy::hold::wait`]: timed out when not decided in time,
/// withdrawn by a CancelRequest), telling the client with a NoticeResponse once the request
/// is recorded, and turns what became of it into the client's answer.
async fn hold<R: AsyncRead + Unpin>(
    held: Held,
    gate: &Gate,
    recorder: &SessionRecorder,
    inject: &mpsc::Sender<Injection>,
    from: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<HoldOutcome, End> {
    let timeout = gate.hold_timeout;
    let announce = async |id: &str| {
        let notice = notice_response(
            NoticeSeverity::Notice,
            "00000",
            &format!(
                "sluice: statement held for approval: request {id}; an approver (group \"{}\") runs `sluice approve {id}` (or `sluice deny {id} --reason ...`); waiting up to {} s. Reason: {}",
                held.approvers,
                timeout.as_secs(),
                held.reason
            ),
        );
        inject
            .send(Injection {
                before_ready: NOW,
                error: notice,
            })
            .await
            .map_err(|_| End::ServerClosed)
    };
    let settled = wait(
        Holder {
            access: &gate.access,
            session: gate.session_id,
            principal: &gate.principal,
            target: &gate.target,
            timeout,
            on_timeout: OnTimeout::TimedOut,
            interrupt: gate.cancel.clone(),
            interrupted_by: "the client cancelled the statement",
        },
        Statement {
            sql: &held.sql,
            action: held.action,
            policies: &held.policies,
            reason: &held.reason,
            approvers: &held.approvers,
        },
        recorder,
        from,
        buf,
        max.saturating_add(HEADER_LEN),
        announce,
    )
    .await?;
    let refused = |code, message| HoldOutcome::Refused { code, message };
    Ok(match settled {
        Settled::Approved {
            request,
            by,
            comment,
        } => HoldOutcome::Approved {
            request,
            by,
            comment,
        },
        Settled::Denied {
            request,
            by,
            reason,
        } => refused(
            "42501",
            format!("sluice: request {request} was denied by {by}: {reason}"),
        ),
        Settled::Unrecordable(e) => refused(
            "42501",
            format!(
                "sluice: the statement needs approval, but the request cannot be recorded ({e}), so it is denied"
            ),
        ),
        Settled::Interrupted { request } => refused(
            "57014",
            format!(
                "sluice: canceling statement due to user request: request {request} is withdrawn and the statement did not run"
            ),
        ),
        Settled::TimedOut { request }
        | Settled::Deferred { request }
        | Settled::Undecided { request } => refused(
            "42501",
            format!(
                "sluice: request {request} was not decided within {} s, so the statement did not run; ask an approver and run it again",
                timeout.as_secs()
            ),
        ),
    })
}

/// What the client side remembers between chunks.
struct ClientState {
    /// Sync points forwarded so far (each is answered by one ReadyForQuery).
    sync_points: u64,
    /// After a denied Parse: the error to send at the next Sync; messages until then are
    /// dropped.
    skipping: Option<Bytes>,
}

/// One client chunk (from some offset on) after policy.
struct Gated {
    forward: Bytes,
    injections: Vec<Injection>,
    decisions: Vec<Decision>,
    /// A statement an approval policy holds; the chunk was gated up to it (not included).
    held: Option<Held>,
}

/// Decides the statements in a chunk of whole client messages, from byte `from` on.
/// Unchanged messages keep their bytes; the chunk itself is returned when nothing changed.
/// `resolved` is a person's decision for the held message at its offset (which is `from`).
fn gate_chunk(
    chunk: &Bytes,
    from: usize,
    mut resolved: Option<Resolved>,
    gate: &Gate,
    state: &mut ClientState,
) -> Result<Gated, String> {
    let part = chunk.slice(from.min(chunk.len())..);
    let mut out = Gated {
        forward: part.clone(),
        injections: Vec::new(),
        decisions: Vec::new(),
        held: None,
    };
    let mut forward: Option<BytesMut> = None;
    let mut offset = 0usize;
    for message in messages(&part) {
        let (tag, body) = message.map_err(|e| e.to_string())?;
        let whole = part.slice(offset..offset + HEADER_LEN + body.len());
        let start = offset;
        offset += whole.len();

        // What to do with this message: forward it, drop it, or send a Sync in its place.
        enum Action {
            Forward,
            Drop,
            SyncFor(Bytes),
        }
        let action = if state.skipping.is_some() {
            if tag == b'S' {
                let error = state.skipping.take().unwrap_or_default();
                state.sync_points += 1;
                out.injections.push(Injection {
                    before_ready: state.sync_points,
                    error,
                });
            }
            if tag == b'S' {
                Action::Forward
            } else {
                Action::Drop
            }
        } else {
            match tag {
                b'Q' | b'P' => {
                    let sql = match decode_frontend(tag, body) {
                        Ok(Frontend::Query { sql }) | Ok(Frontend::Parse { sql, .. }) => sql,
                        Ok(_) => "",
                        Err(e) => return Err(e.to_string()),
                    };
                    let mut d = match &gate.policy {
                        Some((policy, session)) => policy.decide_sql(
                            session,
                            Dialect::Postgres,
                            sql,
                            gate.unparsed,
                            gate.jit(),
                        ),
                        None => SqlDecision::allowed(),
                    };
                    if d.verdict.allowed
                        && let Some(rules) = &gate.strict
                        && let Some(denied) =
                            strict_denial(rules, &gate.target, Dialect::Postgres, sql)
                    {
                        d.verdict = denied;
                    }
                    // Without policies, only what strict masking denies is worth a record.
                    let record = gate.policy.is_some() || !d.verdict.allowed;
                    if d.unparsed_allowed {
                        warn!(
                            sql,
                            "statement sluice cannot parse allowed by the target's `unparsed = \"allow\"`"
                        );
                    }
                    let facts = if d.unparsed_allowed {
                        format!("{} (unparsed, allowed by target config)", d.facts)
                    } else {
                        d.facts
                    };
                    let mut verdict = d.verdict;
                    // The client's text when a hold ends without approval.
                    let mut refused: Option<(&'static str, String)> = None;
                    match (resolved.take(), &verdict.approval) {
                        // Decided again (policies may have been reloaded meanwhile): an
                        // approval lifts only a deny that is still an approval policy's.
                        (Some(r), _) if r.offset == from + start => match r.outcome {
                            HoldOutcome::Approved {
                                request,
                                by,
                                comment,
                            } if verdict.allowed || verdict.approval.is_some() => {
                                verdict.allowed = true;
                                verdict.reason = if comment.is_empty() {
                                    format!("request {request} approved by {by}")
                                } else {
                                    format!("request {request} approved by {by}: {comment}")
                                };
                            }
                            HoldOutcome::Approved { .. } => {}
                            HoldOutcome::Refused { code, message } => {
                                verdict.allowed = false;
                                verdict.reason = message.clone();
                                refused = Some((code, message));
                            }
                        },
                        (_, Some(approvers)) if !verdict.allowed => {
                            // Stop here: the caller forwards what came before and waits.
                            out.held = Some(Held {
                                offset: from + start,
                                sql: sql.to_string(),
                                action: d.action,
                                policies: verdict.policies,
                                reason: verdict.reason,
                                approvers: approvers.clone(),
                            });
                            let f = forward.get_or_insert_with(|| {
                                let mut f = BytesMut::with_capacity(part.len());
                                f.extend_from_slice(&part[..start]);
                                f
                            });
                            out.forward = std::mem::take(f).freeze();
                            return Ok(out);
                        }
                        _ => {}
                    }
                    if !verdict.allowed {
                        info!(action = d.action, policies = ?verdict.policies, "statement denied by policy");
                    }
                    let error = (!verdict.allowed).then(|| {
                        let (code, text) = refused.unwrap_or_else(|| ("42501", verdict.message()));
                        error_response(Severity::Error, code, &text)
                    });
                    if record {
                        out.decisions.push(Decision {
                            sql: sql.to_string(),
                            action: d.action.to_string(),
                            facts,
                            allowed: verdict.allowed,
                            policies: verdict.policies,
                            reason: verdict.reason,
                        });
                    }
                    match (tag, error) {
                        (b'Q', None) => {
                            state.sync_points += 1;
                            Action::Forward
                        }
                        (b'Q', Some(error)) => Action::SyncFor(error),
                        (_, None) => Action::Forward,
                        (_, Some(error)) => {
                            state.skipping = Some(error);
                            Action::Drop
                        }
                    }
                }
                b'F' => {
                    let reason = "the function-call sub-protocol names functions by OID, which policy cannot check".to_string();
                    let message =
                        format!("sluice: denied by policy \"{FASTPATH_POLICY}\": {reason}");
                    out.decisions.push(Decision {
                        sql: String::new(),
                        action: "call".into(),
                        facts: "fastpath function call".into(),
                        allowed: false,
                        policies: vec![FASTPATH_POLICY.into()],
                        reason,
                    });
                    Action::SyncFor(error_response(Severity::Error, "42501", &message))
                }
                b'S' => {
                    state.sync_points += 1;
                    Action::Forward
                }
                _ => Action::Forward,
            }
        };
        match action {
            Action::Forward => {
                if let Some(f) = forward.as_mut() {
                    f.extend_from_slice(&whole);
                }
            }
            Action::Drop | Action::SyncFor(_) => {
                let f = forward.get_or_insert_with(|| {
                    let mut f = BytesMut::with_capacity(part.len());
                    f.extend_from_slice(&part[..start]);
                    f
                });
                if let Action::SyncFor(error) = action {
                    state.sync_points += 1;
                    out.injections.push(Injection {
                        before_ready: state.sync_points,
                        error,
                    });
                    f.put_slice(SYNC);
                }
            }
        }
    }
    if let Some(f) = forward {
        out.forward = f.freeze();
    }
    Ok(out)
}

/// Server -> client: the only writer to the client. Splices injected errors in right before
/// the ReadyForQuery they belong to, journals each chunk exactly as it forwards it.
async fn server_pump<R, W>(
    from: &mut R,
    to: &mut W,
    r: &Relay<'_>,
    authenticated: &AtomicBool,
    mut masker: Option<masking::Masker>,
    mut inject: mpsc::Receiver<Injection>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (recorder, max_message) = (r.recorder, r.max_message);
    // The backend's key is the client's only when the login was relayed.
    let cancel = (!r.greeted).then_some(r.cancel);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut pending: VecDeque<Injection> = VecDeque::new();
    // A greeted client already got the first ReadyForQuery (its startup's).
    let mut ready_seen: u64 = u64::from(r.greeted);
    let mut inject_open = true;
    let cap = || max_message;
    loop {
        // Both branches are cancel safe: read_buf only appends what it read to `buf`.
        let chunk = tokio::select! {
            biased;
            i = inject.recv(), if inject_open => {
                match i {
                    Some(i) => {
                        if let Err(end) = take_injection(i, &mut pending, recorder, to).await {
                            return end;
                        }
                    }
                    None => inject_open = false,
                }
                continue;
            }
            c = read_chunk(from, &mut buf, Side::Server, &cap) => match c {
                Ok(c) => c,
                Err(end) => return end,
            },
        };
        // Queued before this chunk was complete: a notice goes ahead of it.
        while let Ok(i) = inject.try_recv() {
            if let Err(end) = take_injection(i, &mut pending, recorder, to).await {
                return end;
            }
        }
        if !authenticated.load(Ordering::Relaxed) && is_authentication_ok(&chunk) {
            authenticated.store(true, Ordering::Relaxed);
        }
        // BackendKeyData comes once, before the first ReadyForQuery.
        if ready_seen == 0
            && let Some(c) = cancel
        {
            c.observe(&chunk);
        }
        // Masked before anything records or forwards it: the clear value stays here.
        if let Some(m) = masker.as_ref()
            && authenticated.load(Ordering::Relaxed)
        {
            m.resolve(&chunk).await;
        }
        let (chunk, reports) = match masker.as_mut() {
            Some(m) if authenticated.load(Ordering::Relaxed) => match m.chunk(chunk) {
                Ok(x) => x,
                Err(reason) => {
                    return End::Malformed {
                        from: Side::Server,
                        reason,
                    };
                }
            },
            _ => (chunk, Vec::new()),
        };
        let chunk = splice(chunk, &mut pending, &mut ready_seen);
        // Before login, the journal's copy loses the server's SASL payloads (see below).
        let journal_copy = if ready_seen == 0 {
            server_chunk_for_journal(&chunk)
        } else {
            chunk.clone()
        };
        if let Err(e) = recorder.server(journal_copy) {
            return End::Journal(e);
        }
        for report in reports {
            if let Err(e) = recorder.masked(report) {
                return End::Journal(e);
            }
        }
        if let Err(error) = to.write_all(&chunk).await {
            return End::Io {
                from: Side::Client,
                error,
            };
        }
    }
}

/// Takes one injection on the server side: a notice ([`NOW`]) is journaled and written at once
/// (between two whole messages is a valid place for it); an error waits in `pending` for its
/// ReadyForQuery.
async fn take_injection<W: AsyncWrite + Unpin>(
    i: Injection,
    pending: &mut VecDeque<Injection>,
    recorder: &SessionRecorder,
    to: &mut W,
) -> Result<(), End> {
    if i.before_ready != NOW {
        pending.push_back(i);
        return Ok(());
    }
    recorder.server(i.error.clone()).map_err(End::Journal)?;
    to.write_all(&i.error).await.map_err(|error| End::Io {
        from: Side::Client,
        error,
    })
}

/// Counts the ReadyForQuery messages in `chunk` and puts each due injection's error right
/// before its ReadyForQuery. Returns the chunk itself when nothing is due.
fn splice(chunk: Bytes, pending: &mut VecDeque<Injection>, ready_seen: &mut u64) -> Bytes {
    let mut out: Option<BytesMut> = None;
    let mut offset = 0usize;
    for (tag, body) in messages(&chunk).flatten() {
        let len = HEADER_LEN + body.len();
        if tag == b'Z' {
            *ready_seen += 1;
            while pending
                .front()
                .is_some_and(|i| i.before_ready <= *ready_seen)
            {
                if let Some(i) = pending.pop_front() {
                    let o = out.get_or_insert_with(|| {
                        let mut o = BytesMut::with_capacity(chunk.len() + i.error.len());
                        o.extend_from_slice(&chunk[..offset]);
                        o
                    });
                    o.extend_from_slice(&i.error);
                }
            }
        }
        if let Some(o) = out.as_mut()
            && let Some(m) = chunk.get(offset..offset + len)
        {
            o.extend_from_slice(m);
        }
        offset += len;
    }
    match out {
        Some(o) => o.freeze(),
        None => chunk,
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

/// The journal's copy of a server chunk during login: AuthenticationSASLContinue and
/// AuthenticationSASLFinal (codes 11, 12) keep their code but lose their payload. With the
/// salt, iteration count and nonces of the first and the server signature of the second, a
/// reader of the journal could test password guesses offline; the client gets them whole.
fn server_chunk_for_journal(chunk: &Bytes) -> Bytes {
    let is_sasl = |tag: u8, body: &[u8]| {
        tag == b'R' && matches!(body.get(..4), Some([0, 0, 0, 11]) | Some([0, 0, 0, 12]))
    };
    if !messages(chunk).flatten().any(|(t, b)| is_sasl(t, b)) {
        return chunk.clone();
    }
    let mut copy = BytesMut::with_capacity(chunk.len());
    let mut offset = 0usize;
    for (tag, body) in messages(chunk).flatten() {
        let len = HEADER_LEN + body.len();
        if is_sasl(tag, body) {
            copy.extend_from_slice(&[b'R', 0, 0, 0, 8]);
            copy.extend_from_slice(&body[..4]);
        } else if let Some(whole) = chunk.get(offset..offset + len) {
            copy.extend_from_slice(whole);
        }
        offset += len;
    }
    copy.freeze()
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
    use crate::policy::{PrincipalRef, Source};

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

    fn gate() -> (Gate, tempfile::TempDir) {
        gate_on("app-db")
    }

    fn gate_on(target: &str) -> (Gate, tempfile::TempDir) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let policy = Policy::load(&dir).unwrap();
        let session = policy
            .engine()
            .session(
                PrincipalRef {
                    name: "dev",
                    groups: &[],
                },
                target,
                Source {
                    uid: Some(1000),
                    comm: "psql",
                },
            )
            .unwrap();
        let journal_dir = tempfile::tempdir().unwrap();
        let journal = sluice_journal::Journal::open(journal_dir.path()).unwrap();
        let gate = Gate {
            policy: Some((policy, session)),
            strict: None,
            unparsed: Unparsed::Deny,
            access: Arc::new(Access::open(journal).unwrap()),
            session_id: SessionId::new(),
            target: target.into(),
            principal: Principal {
                name: "dev".into(),
                groups: Vec::new(),
            },
            hold_timeout: Duration::from_secs(1),
            cancel: watch::channel(0).1,
        };
        (gate, journal_dir)
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_denied_query_becomes_a_sync_and_its_error_waits_for_that_ready_for_query() {
        let (gate, _dir) = gate();
        let mut state = ClientState {
            sync_points: 1,
            skipping: None,
        };
        let mut chunk = msg(b'Q', b"select 1\0");
        chunk.extend(msg(b'Q', b"drop table t\0"));
        chunk.extend(msg(b'Q', b"select 2\0"));
        let g = gate_chunk(&Bytes::from(chunk), 0, None, &gate, &mut state).unwrap();
        let mut want = msg(b'Q', b"select 1\0");
        want.extend_from_slice(SYNC);
        want.extend(msg(b'Q', b"select 2\0"));
        assert_eq!(&g.forward[..], &want[..]);
        assert_eq!(g.injections.len(), 1);
        assert_eq!(g.injections[0].before_ready, 3);
        assert_eq!(state.sync_points, 4);
        assert_eq!(g.decisions.len(), 3);
        assert!(!g.decisions[1].allowed);

        // The server answers: startup done earlier (1), select 1 (2), the Sync (3), select 2 (4).
        let mut pending: VecDeque<Injection> = g.injections.into();
        let mut seen = 1;
        let z = msg(b'Z', b"I");
        let c = msg(b'C', b"SELECT 1\0");
        let mut server = c.clone();
        server.extend(&z);
        server.extend(&z);
        server.extend(&c);
        server.extend(&z);
        let out = splice(Bytes::from(server), &mut pending, &mut seen);
        let tags: Vec<u8> = messages(&out).flatten().map(|(t, _)| t).collect();
        assert_eq!(tags, b"CZEZCZ".to_vec());
        assert!(pending.is_empty());
        assert_eq!(seen, 4);
    }

    #[test]
    fn a_denied_parse_drops_the_batch_up_to_sync_across_chunks() {
        let (gate, _dir) = gate();
        let mut state = ClientState {
            sync_points: 1,
            skipping: None,
        };
        let mut first = msg(b'P', b"s1\0delete from t\0\0\0");
        first.extend(msg(b'B', b"\0s1\0\0\0\0\0\0\0"));
        let g = gate_chunk(&Bytes::from(first), 0, None, &gate, &mut state).unwrap();
        assert!(g.forward.is_empty());
        assert!(g.injections.is_empty());
        let mut second = msg(b'E', b"\0\0\0\0\0");
        second.extend(msg(b'S', b""));
        second.extend(msg(b'Q', b"select 1\0"));
        let g = gate_chunk(&Bytes::from(second), 0, None, &gate, &mut state).unwrap();
        let mut want = msg(b'S', b"");
        want.extend(msg(b'Q', b"select 1\0"));
        assert_eq!(&g.forward[..], &want[..]);
        assert_eq!(g.injections.len(), 1);
        assert_eq!(g.injections[0].before_ready, 2);
        assert!(state.skipping.is_none());
    }

    #[test]
    fn allowed_chunks_are_forwarded_as_the_same_bytes() {
        let (gate, _dir) = gate();
        let mut state = ClientState {
            sync_points: 1,
            skipping: None,
        };
        let mut chunk = msg(b'P', b"\0select * from people where id = $1\0\0\0");
        chunk.extend(msg(b'S', b""));
        let chunk = Bytes::from(chunk);
        let g = gate_chunk(&chunk, 0, None, &gate, &mut state).unwrap();
        assert_eq!(g.forward.as_ptr(), chunk.as_ptr());
        assert_eq!(g.forward.len(), chunk.len());
    }

    #[test]
    fn a_held_statement_stops_the_chunk_and_its_outcome_resumes_it_at_the_same_place() {
        let (gate, _dir) = gate_on("prod-db");
        let mut state = ClientState {
            sync_points: 1,
            skipping: None,
        };
        let mut chunk = msg(b'Q', b"select 1\0");
        let held_at = chunk.len();
        chunk.extend(msg(b'Q', b"delete from t where id = 1\0"));
        chunk.extend(msg(b'Q', b"select 2\0"));
        let chunk = Bytes::from(chunk);
        let g = gate_chunk(&chunk, 0, None, &gate, &mut state).unwrap();
        assert_eq!(&g.forward[..], &msg(b'Q', b"select 1\0")[..]);
        let held = g.held.unwrap();
        assert_eq!(held.offset, held_at);
        assert_eq!(held.approvers, "dba");
        assert_eq!(state.sync_points, 2);

        // Approved: the held statement and the rest go on as they were.
        let mut approved = ClientState {
            sync_points: 2,
            skipping: None,
        };
        let resolved = Resolved {
            offset: held_at,
            outcome: HoldOutcome::Approved {
                request: "ab12cd34".into(),
                by: "cy".into(),
                comment: "ok".into(),
            },
        };
        let g = gate_chunk(&chunk, held_at, Some(resolved), &gate, &mut approved).unwrap();
        assert_eq!(&g.forward[..], &chunk[held_at..]);
        assert!(g.held.is_none() && g.injections.is_empty());
        assert!(g.decisions[0].allowed);
        assert_eq!(g.decisions[0].reason, "request ab12cd34 approved by cy: ok");
        assert_eq!(approved.sync_points, 4);

        // Refused: a Sync takes its place and the error waits for its ReadyForQuery.
        let resolved = Resolved {
            offset: held_at,
            outcome: HoldOutcome::Refused {
                code: "42501",
                message: "sluice: request ab12cd34 was denied by cy: no".into(),
            },
        };
        let g = gate_chunk(&chunk, held_at, Some(resolved), &gate, &mut state).unwrap();
        let mut want = SYNC.to_vec();
        want.extend(msg(b'Q', b"select 2\0"));
        assert_eq!(&g.forward[..], &want[..]);
        assert_eq!(g.injections.len(), 1);
        assert_eq!(g.injections[0].before_ready, 3);
        assert!(
            g.injections[0]
                .error
                .windows(10)
                .any(|w| w == b"denied by ")
        );
        assert!(!g.decisions[0].allowed);
    }

    #[test]
    fn scram_payloads_from_the_server_are_emptied_in_the_journal_copy() {
        let mut chunk = msg(b'R', b"\0\0\0\x0br=abc,s=c2FsdA==,i=4096");
        chunk.extend(msg(b'S', b"a\0b\0"));
        chunk.extend(msg(b'R', b"\0\0\0\x0cv=c2lnbmF0dXJl"));
        let copy = server_chunk_for_journal(&Bytes::from(chunk));
        let tags: Vec<(u8, Vec<u8>)> = messages(&copy)
            .flatten()
            .map(|(t, b)| (t, b.to_vec()))
            .collect();
        assert_eq!(tags[0], (b'R', vec![0, 0, 0, 11]));
        assert_eq!(tags[1].0, b'S');
        assert_eq!(tags[2], (b'R', vec![0, 0, 0, 12]));
        let plain = Bytes::from(msg(b'R', b"\0\0\0\0"));
        assert_eq!(server_chunk_for_journal(&plain).as_ptr(), plain.as_ptr());
    }

    #[test]
    fn authentication_ok_is_recognised_among_other_messages() {
        assert!(is_authentication_ok(b"R\0\0\0\x08\0\0\0\0S\0\0\0\x06a\0"));
        assert!(!is_authentication_ok(b"R\0\0\0\x08\0\0\0\x03"));
    }
}
