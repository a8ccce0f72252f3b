//! One MySQL/MariaDB session through the proxy (issue 6): the connection phase with
//! passthrough authentication, then a packet-framed relay that decides every statement before
//! it reaches the backend and journals every chunk of whole packets **before** forwarding it.
//!
//! **Connection phase.** The server speaks first, so sluice dials the backend (SO_MARK,
//! [`upstream::dial`]) and reads its greeting ([`login::read_greeting`]) before it greets the
//! client with the same version string, connection id, nonce and plugin, and the backend's
//! capabilities minus COMPRESS, ZSTD and LOCAL_FILES (and SSL, which is offered only when the
//! target has `tls_cert`; TLS is then terminated here with the target's rustls config). The
//! client's HandshakeResponse is forwarded to the backend with the same bits cleared and its
//! sequence id set to 1 (the backend leg is plaintext), so both legs negotiate the same
//! capabilities and command-phase packets pass unchanged. The auth exchange that follows
//! (AuthSwitch, AuthMoreData, the client's replies) is relayed until the backend's OK or ERR,
//! its sequence ids shifted by one when only the client leg did TLS.
//!
//! **Journal.** The session starts once the client's response names user and database (the
//! greeting, sluice's own bytes derived from the backend's, is the first server event; a
//! client that leaves before responding leaves no session). The response is journaled without
//! its auth data ([`HandshakeResponse::without_credentials`]) and every client packet of the
//! auth exchange with an empty payload (a scramble and the nonce allow offline guessing; a
//! clear-text reply is the password itself). Server packets are journaled as forwarded.
//!
//! **Command phase.** Two pumps run concurrently in the connection's task, sharing the
//! [`ResponseMachine`] behind a lock never held across an await. The client pump gates each
//! chunk of whole packets: COM_QUERY and COM_STMT_PREPARE text goes to [`Policy::decide_sql`]
//! with the MySQL dialect; `LOAD DATA LOCAL` and COM_CHANGE_USER are denied whatever the
//! policies say (not offered / not supported yet); a command packet whose sequence id is not 0
//! closes the session rather than skip policy. The chunk is cut right after the first denied
//! packet; it is journaled with its decisions, the packets before the denied one are placed in
//! the machine and forwarded, and the denied one's ERR 1142 (SQLSTATE 42000, naming the policy)
//! goes to the server pump, which writes it once the machine says every earlier command is
//! answered; the client pump reads nothing more until then, so replies keep command order. The
//! server pump, the only writer to the client, places each packet in the machine, journals each
//! chunk and forwards it unchanged.
//!
//! Memory is bounded: packets are capped at [`login::PRE_AUTH_MAX`] before the backend's OK and
//! at `max_message_bytes` after, in both directions; a larger declared length closes the
//! session with a reason. Every way a session ends after it started writes its end event.
//!
//! Not yet (issue 6): `auth = "sluice"` (config refuses it), backend TLS, masking of rows (a
//! MySQL session is refused while masking rules are loaded), approvals (an approval policy's
//! deny is a deny), KILL mapping.

pub mod login;

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sluice_journal::{AuthInfo, Decision, NoteLevel, Principal, SessionRecorder, SessionStart};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};
use tracing::{Span, debug, info, warn};

use super::{End, Routed, Shared, upstream};
use crate::access::Access;
use crate::config::{ClientTls, Unparsed};
use crate::policy::facts::Dialect;
use crate::policy::{Policy, PrincipalRef, SessionPolicy, Source, principal};
use crate::protocol::mysql::command::{Command, decode_command};
use crate::protocol::mysql::handshake::{
    Capabilities, ClientHandshake, ErrPacket, Handshake, HandshakeResponse, parse_client_handshake,
};
use crate::protocol::mysql::packet::{Decoder, HEADER_LEN, packet, packets, whole_packets};
use crate::protocol::mysql::response::{ClientEvent, ResponseMachine};
use crate::tls::Stream;

/// How much a read asks for at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Most packets relayed during the auth exchange.
const MAX_AUTH_PACKETS: usize = 16;
/// The policy id `LOAD DATA LOCAL` is denied by.
const LOCAL_INFILE_POLICY: &str = "sluice-local-infile";
/// The policy id COM_CHANGE_USER is denied by (re-authentication is not relayed yet).
const CHANGE_USER_POLICY: &str = "sluice-change-user";
/// Capabilities never offered to a client nor asked of a backend.
const NEVER: Capabilities = Capabilities(
    Capabilities::COMPRESS.0 | Capabilities::ZSTD_COMPRESSION.0 | Capabilities::LOCAL_FILES.0,
);

/// MySQL error numbers sluice answers with, and their SQLSTATEs.
mod code {
    /// ER_ACCESS_DENIED_ERROR.
    pub const ACCESS_DENIED: (u16, &str) = (1045, "28000");
    /// ER_TABLEACCESS_DENIED_ERROR: "command denied to user".
    pub const DENIED: (u16, &str) = (1142, "42000");
    /// ER_HANDSHAKE_ERROR.
    pub const BAD_HANDSHAKE: (u16, &str) = (1043, "08S01");
    /// ER_NET_PACKETS_OUT_OF_ORDER / malformed input.
    pub const MALFORMED: (u16, &str) = (1156, "08S01");
    /// ER_DISK_FULL: the journal's spool is full.
    pub const SPOOL_FULL: (u16, &str) = (1021, "HY000");
    /// ER_SERVER_SHUTDOWN.
    pub const SHUTDOWN: (u16, &str) = (1053, "08S01");
    /// ER_UNKNOWN_ERROR: sluice itself cannot go on (backend unreachable, journal).
    pub const SLUICE: (u16, &str) = (1105, "HY000");
}

/// An ERR packet with sequence id `seq`.
fn err(seq: u8, (code, state): (u16, &str), text: &str) -> Bytes {
    packet(seq, &ErrPacket::new(code, state, text).encode()).freeze()
}

pub(crate) async fn serve(
    tcp: TcpStream,
    routed: Routed,
    shared: &Shared,
    stop: &mut broadcast::Receiver<()>,
) {
    let handshaken = tokio::select! {
        r = tokio::time::timeout(shared.config.startup_timeout(), connect(tcp, &routed, shared)) => match r {
            Ok(h) => h,
            Err(_) => {
                debug!("client or backend too slow during the connection phase: closed");
                return;
            }
        },
        _ = stop.recv() => return,
    };
    let Some(handshaken) = handshaken else { return };
    let Some(login) = begin(handshaken, &routed, shared).await else {
        return;
    };
    let Connected {
        client,
        server,
        recorder,
        gate,
        caps,
        client_seq,
    } = login;
    let mut session = Session {
        client,
        server,
        recorder: &recorder,
        gate: gate.as_ref(),
        machine: ResponseMachine::new(caps),
        max: shared.config.max_message_bytes,
    };
    let authenticated = tokio::select! {
        r = tokio::time::timeout(shared.config.startup_timeout(), session.authenticate(client_seq)) => {
            r.unwrap_or_else(|_| Err(End::Malformed {
                from: "client",
                reason: "the login did not complete in time".into(),
            }))
        }
        _ = stop.recv() => Err(End::Shutdown),
    };
    let end = match authenticated {
        Ok(true) => {
            info!(backend = %routed.backend, "session started");
            relay(session, stop).await
        }
        Ok(false) => {
            let _ = recorder.end("the backend refused the login");
            info!("backend refused the login");
            return;
        }
        Err(end) => end,
    };
    end.seal(&recorder, "packet");
}

/// A session whose client has responded to the greeting and whose response the backend has.
struct Connected {
    client: Stream,
    server: Stream,
    recorder: SessionRecorder,
    gate: Option<Gate>,
    /// The capabilities both legs negotiated.
    caps: Capabilities,
    /// The sequence id of the client's HandshakeResponse (1, or 2 after TLS).
    client_seq: u8,
}

/// The connection phase up to the client's HandshakeResponse. None: the connection is over
/// (refused, with the client told and the journal written where there was something to say).
async fn connect(mut tcp: TcpStream, routed: &Routed, shared: &Shared) -> Option<Handshaken> {
    if let Err(refusal) = shared.admit_session() {
        warn!("journal spool full: session refused");
        let _ = tcp.write_all(&err(0, code::SPOOL_FULL, &refusal)).await;
        return None;
    }
    if shared.masking.is_some() {
        let text = format!(
            "sluice: target \"{}\" is MySQL, whose results sluice cannot mask yet, and this agent has masking rules: sessions are refused rather than shown unmasked",
            routed.target.name
        );
        refuse(
            Stream::Plain(tcp),
            0,
            code::ACCESS_DENIED,
            &text,
            shared,
            routed,
            Vec::new(),
        )
        .await;
        return None;
    }
    // The backend's greeting first: its capabilities are what the client is offered.
    let backend = async {
        let mut server = upstream::dial(
            routed.backend,
            shared.config.upstream_mark,
            shared.config.connect_timeout(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let greeting = login::read_greeting(&mut server)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        Ok::<_, String>((server, greeting))
    };
    let (server, greeting) = match backend.await {
        Ok(x) => x,
        Err(e) => {
            let text = format!(
                "sluice: cannot reach target \"{}\" at {}: {e}",
                routed.target.name, routed.backend
            );
            refuse(
                Stream::Plain(tcp),
                0,
                code::SLUICE,
                &text,
                shared,
                routed,
                Vec::new(),
            )
            .await;
            return None;
        }
    };
    let mut offered = greeting
        .capabilities
        .without(NEVER)
        .without(Capabilities::SSL);
    if routed.target.tls.is_some() {
        offered = offered | Capabilities::SSL;
    }
    let hello = packet(
        0,
        &Handshake {
            capabilities: offered,
            ..greeting.clone()
        }
        .encode(),
    )
    .freeze();
    if tcp.write_all(&hello).await.is_err() {
        return None;
    }

    // The client's SSLRequest or HandshakeResponse (sequence id 1), read exactly: a client
    // sends its TLS ClientHello right after an SSLRequest without waiting for an answer.
    let mut buf = BytesMut::with_capacity(512);
    let mut dec = Decoder::new(login::PRE_AUTH_MAX);
    dec.expect(Some(1));
    let (mut raw, mut payload) = match read_first_packet(&mut tcp, &mut dec).await {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(reason) => {
            let text = format!("sluice: bad handshake response: {reason}");
            refuse(
                Stream::Plain(tcp),
                2,
                code::BAD_HANDSHAKE,
                &text,
                shared,
                routed,
                Vec::new(),
            )
            .await;
            return None;
        }
    };
    let mut client = Stream::Plain(tcp);
    if let Ok(ClientHandshake::SslRequest { .. }) = parse_client_handshake(&payload) {
        let (Stream::Plain(tcp), Some(cfg)) = (client, routed.target.tls.clone()) else {
            // SSL was not offered: a client asking anyway gets no TLS.
            debug!("SSLRequest to a target without a certificate: closed");
            return None;
        };
        let tls = match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "client TLS handshake failed");
                return None;
            }
        };
        client = Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls)));
        (raw, payload) = match read_packet(&mut client, &mut buf, &mut dec).await {
            Ok(Some(p)) => p,
            Ok(None) => return None,
            Err(reason) => {
                let text = format!("sluice: bad handshake response: {reason}");
                refuse(
                    client,
                    3,
                    code::BAD_HANDSHAKE,
                    &text,
                    shared,
                    routed,
                    Vec::new(),
                )
                .await;
                return None;
            }
        };
    }
    let client_seq = raw.get(3).copied().unwrap_or(1);
    let mut response = match parse_client_handshake(&payload) {
        Ok(ClientHandshake::Response(r)) => r,
        Ok(ClientHandshake::SslRequest { .. }) | Err(_) => {
            let text = "sluice: bad handshake response: not a HandshakeResponse41";
            refuse(
                client,
                client_seq.wrapping_add(1),
                code::BAD_HANDSHAKE,
                text,
                shared,
                routed,
                Vec::new(),
            )
            .await;
            return None;
        }
    };
    let mut params = vec![("user".to_string(), response.username.clone())];
    if let Some(db) = &response.database {
        params.push(("database".to_string(), db.clone()));
    }
    let reply_seq = client_seq.wrapping_add(1);
    if routed.target.client_tls == ClientTls::Required && !client.is_tls() {
        let text = format!(
            "sluice: target \"{}\" requires TLS: connect with --ssl (mariadb) or --ssl-mode=REQUIRED (mysql)",
            routed.target.name
        );
        refuse(
            client,
            reply_seq,
            code::ACCESS_DENIED,
            &text,
            shared,
            routed,
            params,
        )
        .await;
        return None;
    }
    // What the backend gets: the client's response with the never-offered bits (and SSL: the
    // backend leg is plaintext) cleared, as packet 1. Only the flag bytes and the sequence id
    // change.
    let cleared = NEVER | Capabilities::SSL;
    response.capabilities = response.capabilities.without(cleared);
    let mut forward = raw.to_vec();
    if let Some(flags) = forward.get_mut(HEADER_LEN..HEADER_LEN + 4) {
        let lower = u32::from_le_bytes([flags[0], flags[1], flags[2], flags[3]]) & !cleared.lower();
        flags.copy_from_slice(&lower.to_le_bytes());
    }
    if let Some(seq) = forward.get_mut(3) {
        *seq = 1;
    }
    let caps = response.capabilities & offered;
    Some(Handshaken {
        client,
        server,
        hello,
        response,
        forward: Bytes::from(forward),
        params,
        caps,
        client_seq,
    })
}

/// The connection phase so far: the client answered sluice's greeting.
struct Handshaken {
    client: Stream,
    server: TcpStream,
    /// sluice's greeting as sent.
    hello: Bytes,
    /// The client's response, capabilities as forwarded.
    response: HandshakeResponse,
    /// The response as the backend gets it.
    forward: Bytes,
    params: Vec<(String, String)>,
    caps: Capabilities,
    client_seq: u8,
}

/// Starts the session's record, asks policy whether the principal may connect, and forwards
/// the response to the backend. Not cancelled by a timeout or shutdown once started, so a
/// started session always gets its end: it only writes (a few bytes each way).
async fn begin(h: Handshaken, routed: &Routed, shared: &Shared) -> Option<Connected> {
    let Handshaken {
        mut client,
        server,
        hello,
        response,
        forward,
        params,
        caps,
        client_seq,
    } = h;
    let reply_seq = client_seq.wrapping_add(1);
    let principal = shared
        .policy
        .as_ref()
        .map(|_| principal::resolve(&shared.identities, routed.process.as_ref()));
    Span::current().record(
        "principal",
        tracing::field::display(principal.as_ref().map(|p| p.name.as_str()).unwrap_or("-")),
    );
    let recorder = match start(shared, routed, params, principal.clone()) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot record the session: refused");
            let text =
                "sluice: this session cannot be recorded (journal unavailable), so it is refused";
            let _ = client.write_all(&err(reply_seq, code::SLUICE, text)).await;
            return None;
        }
    };
    Span::current().record("session", tracing::field::display(recorder.id()));
    let journal_copy = packet(client_seq, &response.without_credentials()).freeze();
    if recorder.server(hello).is_err() || recorder.client(journal_copy, 0).is_err() {
        let _ = recorder.end("journal write failed");
        return None;
    }

    // Policy: may this principal connect at all.
    let gate = match (&shared.policy, principal) {
        (Some(policy), Some(who)) => {
            let session = policy.engine().session(
                PrincipalRef {
                    name: &who.name,
                    groups: &who.groups,
                },
                &routed.target.name,
                Source {
                    uid: routed.process.as_ref().map(|p| p.uid),
                    comm: routed
                        .process
                        .as_ref()
                        .map(|p| p.comm.as_str())
                        .unwrap_or(""),
                },
            );
            let jit = shared.access.has_grant(&who.name, &routed.target.name);
            let connect = match &session {
                Ok(s) => policy.engine().decide_connect(s, jit),
                Err(e) => crate::policy::Verdict {
                    allowed: false,
                    policies: Vec::new(),
                    reason: format!("cannot build the policy request: {e}"),
                    approval: None,
                },
            };
            let _ = recorder.decision(Decision {
                sql: String::new(),
                action: "connect".into(),
                facts: String::new(),
                allowed: connect.allowed,
                policies: connect.policies.clone(),
                reason: connect.reason.clone(),
            });
            match session {
                Ok(session) if connect.allowed => Some(Gate {
                    policy: policy.clone(),
                    session,
                    unparsed: routed.target.unparsed,
                    access: shared.access.clone(),
                    principal: who,
                    target: routed.target.name.clone(),
                }),
                _ => {
                    let text = connect.message();
                    warn!(reason = %text, "connect denied by policy");
                    let bytes = err(reply_seq, code::ACCESS_DENIED, &text);
                    let _ = recorder.server(bytes.clone());
                    let _ = client.write_all(&bytes).await;
                    let _ = recorder.end("connect denied by policy");
                    return None;
                }
            }
        }
        _ => None,
    };

    let mut server = Stream::Plain(server);
    if let Err(e) = server.write_all(&forward).await {
        let _ = recorder.end(format!("i/o error on the server connection: {e}"));
        return None;
    }
    let _ = recorder.auth(AuthInfo {
        method: "passthrough".into(),
        role: None,
        backend_user: None,
        client_tls: client.describe(),
        backend_tls: server.describe(),
        expires_ns: None,
    });
    Some(Connected {
        client,
        server,
        recorder,
        gate,
        caps,
        client_seq,
    })
}

/// Reads one packet checked by `dec`: its wire bytes and payload, None when the peer closed
/// before a whole packet, Err with a reason when the bytes are not a packet.
async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<Option<(Bytes, Vec<u8>)>, String> {
    loop {
        if let Some((n, p)) = dec.decode(buf).map_err(|e| e.to_string())? {
            let payload = p.payload.into_owned();
            return Ok(Some((buf.split_to(n).freeze(), payload)));
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Reads exactly one packet (no byte beyond it) with the sequence id `dec` expects: its wire
/// bytes and payload, None when the peer closed, Err with a reason when it is not a packet.
async fn read_first_packet(
    tcp: &mut TcpStream,
    dec: &mut Decoder,
) -> Result<Option<(Bytes, Vec<u8>)>, String> {
    let mut wire = vec![0u8; HEADER_LEN];
    if tcp.read_exact(&mut wire).await.is_err() {
        return Ok(None);
    }
    let len = usize::from(wire[0]) | usize::from(wire[1]) << 8 | usize::from(wire[2]) << 16;
    if len > login::PRE_AUTH_MAX {
        // As the decoder says it (checking the sequence id first).
        return Err(match dec.decode(&wire) {
            Err(e) => e.to_string(),
            Ok(_) => format!(
                "packet of {len} bytes exceeds the limit of {} bytes",
                login::PRE_AUTH_MAX
            ),
        });
    }
    wire.resize(HEADER_LEN + len, 0);
    if tcp.read_exact(&mut wire[HEADER_LEN..]).await.is_err() {
        return Ok(None);
    }
    match dec.decode(&wire).map_err(|e| e.to_string())? {
        Some((_, p)) => {
            let payload = p.payload.into_owned();
            Ok(Some((Bytes::from(wire), payload)))
        }
        None => Err("a packet does not frame".into()),
    }
}

/// Refuses a connection before its session could start: the client gets ERR `code` with
/// `text` (as packet `seq`), the journal a session holding the refusal as its note and end.
async fn refuse(
    mut client: Stream,
    seq: u8,
    code: (u16, &str),
    text: &str,
    shared: &Shared,
    routed: &Routed,
    params: Vec<(String, String)>,
) {
    warn!(reason = %text, "connection refused before the session started");
    let _ = client.write_all(&err(seq, code, text)).await;
    let _ = client.shutdown().await;
    if let Ok(rec) = start(shared, routed, params, None) {
        let _ = rec.note(NoteLevel::Error, text.to_string());
        let _ = rec.end(text.to_string());
    }
}

fn start(
    shared: &Shared,
    routed: &Routed,
    params: Vec<(String, String)>,
    principal: Option<Principal>,
) -> Result<SessionRecorder, sluice_journal::JournalError> {
    shared.journal.start_session(SessionStart {
        target: routed.target.name.clone(),
        protocol: routed.target.protocol.as_str().into(),
        orig_dst: routed.orig_dst.to_string(),
        client_addr: routed.client_addr.to_string(),
        process: routed.process.clone(),
        params,
        principal,
    })
}

/// What a session needs to decide statements (present when `agent.policy_dir` is set).
struct Gate {
    policy: Arc<Policy>,
    session: SessionPolicy,
    unparsed: Unparsed,
    access: Arc<Access>,
    principal: Principal,
    target: String,
}

/// A statement's fate.
struct Ruling {
    decision: Option<Decision>,
    /// The client's error when denied.
    denied: Option<String>,
}

impl Gate {
    fn decide(&self, sql: &str) -> Ruling {
        let jit = self.access.has_grant(&self.principal.name, &self.target);
        let d = self
            .policy
            .decide_sql(&self.session, Dialect::MySql, sql, self.unparsed, jit);
        let mut verdict = d.verdict;
        let mut text = verdict.message();
        if !verdict.allowed && verdict.approval.is_some() {
            text.push_str(" (approvals are not available for MySQL targets yet)");
            verdict.reason = format!(
                "{} (approvals are not available for MySQL targets yet)",
                verdict.reason
            );
        }
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
        if !verdict.allowed {
            info!(action = d.action, policies = ?verdict.policies, "statement denied by policy");
        }
        Ruling {
            denied: (!verdict.allowed).then_some(text),
            decision: Some(Decision {
                sql: sql.to_string(),
                action: d.action.to_string(),
                facts,
                allowed: verdict.allowed,
                policies: verdict.policies,
                reason: verdict.reason,
            }),
        }
    }
}

/// A denial sluice makes whatever the policies say.
fn builtin_denial(sql: &str, action: &str, policy: &str, reason: &str) -> Ruling {
    info!(policy, "statement denied");
    Ruling {
        denied: Some(format!("sluice: denied by policy \"{policy}\": {reason}")),
        decision: Some(Decision {
            sql: sql.to_string(),
            action: action.to_string(),
            facts: String::new(),
            allowed: false,
            policies: vec![policy.to_string()],
            reason: reason.to_string(),
        }),
    }
}

/// `LOAD DATA LOCAL ...` or `LOAD XML LOCAL ...` (the client would send one of its files).
fn is_load_local(sql: &str) -> bool {
    let mut words = sql
        .split(|c: char| c.is_whitespace() || c == '(')
        .filter(|w| !w.is_empty());
    matches!(
        (words.next(), words.next(), words.next()),
        (Some(a), Some(b), Some(c))
            if a.eq_ignore_ascii_case("load")
                && (b.eq_ignore_ascii_case("data") || b.eq_ignore_ascii_case("xml"))
                && c.eq_ignore_ascii_case("local")
    )
}

/// The command phase's state: both streams, the journal, and the response machine.
struct Session<'a> {
    client: Stream,
    server: Stream,
    recorder: &'a SessionRecorder,
    gate: Option<&'a Gate>,
    machine: ResponseMachine,
    max: usize,
}

/// One client chunk after policy.
struct Gated {
    /// Where the chunk ends in the client buffer (after a denied packet, if any).
    len: usize,
    /// The bytes before the denied packet (all of them when none is denied).
    forward_len: usize,
    statements: u64,
    decisions: Vec<Decision>,
    /// The ERR packet for a denied command.
    denied: Option<Bytes>,
}

impl Session<'_> {
    /// Relays the auth exchange after the forwarded HandshakeResponse until the backend's OK
    /// (true) or ERR (false). Client packets are journaled with empty payloads.
    async fn authenticate(&mut self, client_seq: u8) -> Result<bool, End> {
        // The backend numbers the exchange from 1, the client from `client_seq`.
        let shift = client_seq.wrapping_sub(1);
        let mut cbuf = BytesMut::new();
        let mut sbuf = BytesMut::new();
        let mut relayed = 0usize;
        loop {
            let from_server = tokio::select! {
                r = self.server.read_buf(&mut sbuf) => match r {
                    Ok(0) => return Err(End::ServerClosed),
                    Ok(_) => true,
                    Err(error) => return Err(End::Io { from: "server", error }),
                },
                r = self.client.read_buf(&mut cbuf) => match r {
                    Ok(0) => return Err(End::ClientClosed),
                    Ok(_) => false,
                    Err(error) => return Err(End::Io { from: "client", error }),
                },
            };
            let (buf, from) = if from_server {
                (&mut sbuf, "server")
            } else {
                (&mut cbuf, "client")
            };
            let whole = whole_packets(buf, login::PRE_AUTH_MAX).map_err(|e| End::Malformed {
                from,
                reason: e.to_string(),
            })?;
            if whole == 0 {
                continue;
            }
            let chunk = buf.split_to(whole).freeze();
            let mut out = BytesMut::with_capacity(chunk.len());
            let mut journal = BytesMut::with_capacity(chunk.len());
            let mut done = None;
            for p in packets(&chunk, login::PRE_AUTH_MAX) {
                let p = p.map_err(|e| End::Malformed {
                    from,
                    reason: e.to_string(),
                })?;
                relayed += 1;
                if relayed > MAX_AUTH_PACKETS {
                    return Err(End::Malformed {
                        from,
                        reason: format!(
                            "more than {MAX_AUTH_PACKETS} packets in the auth exchange"
                        ),
                    });
                }
                if from_server {
                    let seq = p.seq.wrapping_add(shift);
                    let framed = packet(seq, &p.payload);
                    journal.extend_from_slice(&framed);
                    out.extend_from_slice(&framed);
                    match p.payload.first() {
                        Some(0x00) => done = Some(true),
                        Some(0xFF) => done = Some(false),
                        _ => {}
                    }
                } else {
                    journal.extend_from_slice(&packet(p.seq, &[]));
                    out.extend_from_slice(&packet(p.seq.wrapping_sub(shift), &p.payload));
                }
            }
            if from_server {
                self.recorder
                    .server(journal.freeze())
                    .map_err(End::Journal)?;
                self.client.write_all(&out).await.map_err(|error| End::Io {
                    from: "client",
                    error,
                })?;
            } else {
                self.recorder
                    .client(journal.freeze(), 0)
                    .map_err(End::Journal)?;
                self.server.write_all(&out).await.map_err(|error| End::Io {
                    from: "server",
                    error,
                })?;
            }
            if let Some(ok) = done {
                if !sbuf.is_empty() || !cbuf.is_empty() {
                    return Err(End::Malformed {
                        from: if sbuf.is_empty() { "client" } else { "server" },
                        reason: "bytes after the login's OK before any command".into(),
                    });
                }
                return Ok(ok);
            }
        }
    }
}

/// The command phase, until one side closes, bad input, or the agent stops. Two pumps run
/// concurrently in this task (so neither side waits on the other's socket buffers); they
/// share the response machine behind a lock that is never held across an await.
async fn relay(session: Session<'_>, stop: &mut broadcast::Receiver<()>) -> End {
    let Session {
        client,
        server,
        recorder,
        gate,
        machine,
        max,
    } = session;
    let machine = Mutex::new(machine);
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut server_rd, mut server_wr) = tokio::io::split(server);
    let (deny_tx, deny_rx) = mpsc::channel::<Bytes>(1);
    let (sent_tx, sent_rx) = mpsc::channel::<()>(1);
    let end = {
        let c2s = client_pump(
            &mut client_rd,
            &mut server_wr,
            Pump {
                recorder,
                machine: &machine,
                max,
            },
            gate,
            deny_tx,
            sent_rx,
        );
        let s2c = server_pump(
            &mut server_rd,
            &mut client_wr,
            Pump {
                recorder,
                machine: &machine,
                max,
            },
            deny_rx,
            sent_tx,
        );
        tokio::select! {
            e = c2s => e,
            e = s2c => e,
            _ = stop.recv() => End::Shutdown,
        }
    };
    // A parting error only where the client is idle (it reads it as the answer to its next
    // command, or at once) or waits for the answer to a bad command (packet 1).
    let idle = lock(&machine).is_idle();
    let parting = match &end {
        End::Shutdown if idle => Some(err(
            0,
            code::SHUTDOWN,
            "sluice: the connection is closed because the agent is shutting down",
        )),
        End::Malformed {
            from: "client",
            reason,
        } if idle => Some(err(
            1,
            code::MALFORMED,
            &format!("sluice: malformed packet from the client: {reason}"),
        )),
        End::Journal(_) if idle => Some(err(
            0,
            code::SLUICE,
            "sluice: the journal rejected a write, so the session is closed",
        )),
        _ => None,
    };
    if let Some(bytes) = parting {
        let _ = recorder.server(bytes.clone());
        let _ = client_wr.write_all(&bytes).await;
    }
    let _ = client_wr.shutdown().await;
    let _ = server_wr.shutdown().await;
    end
}

/// What both pumps share.
#[derive(Clone, Copy)]
struct Pump<'a> {
    recorder: &'a SessionRecorder,
    machine: &'a Mutex<ResponseMachine>,
    max: usize,
}

fn lock(machine: &Mutex<ResponseMachine>) -> std::sync::MutexGuard<'_, ResponseMachine> {
    // A poisoned lock means a panic elsewhere mid-update; the machine is still memory-safe.
    machine.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads from `from` until `buf` holds at least one whole packet; returns how many bytes of
/// whole packets it holds. Cancel safe: what was read stays in `buf`.
async fn read_whole<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
    max: usize,
    side: &'static str,
) -> Result<usize, End> {
    loop {
        let whole = whole_packets(buf, max).map_err(|e| End::Malformed {
            from: side,
            reason: e.to_string(),
        })?;
        if whole > 0 {
            return Ok(whole);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match from.read_buf(buf).await {
            Ok(0) if side == "client" => return Err(End::ClientClosed),
            Ok(0) => return Err(End::ServerClosed),
            Ok(_) => {}
            Err(error) => return Err(End::Io { from: side, error }),
        }
    }
}

/// Client -> server: gates each chunk of whole packets (up to and including the first denied
/// one), journals it with its decisions, forwards what is allowed. A denied command's ERR goes
/// to the server pump, and this side reads nothing more until it was sent, so replies keep
/// command order.
async fn client_pump<R, W>(
    from: &mut R,
    to: &mut W,
    p: Pump<'_>,
    gate: Option<&Gate>,
    deny: mpsc::Sender<Bytes>,
    mut sent: mpsc::Receiver<()>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        if let Err(end) = read_whole(from, &mut buf, p.max, "client").await {
            return end;
        }
        loop {
            let gated = match gate_packets(&buf, p.max, &mut lock(p.machine), gate) {
                Ok(Some(g)) => g,
                Ok(None) => break,
                Err(reason) => {
                    return End::Malformed {
                        from: "client",
                        reason,
                    };
                }
            };
            let chunk = buf.split_to(gated.len).freeze();
            if let Err(e) =
                p.recorder
                    .client_with_decisions(chunk.clone(), gated.statements, gated.decisions)
            {
                return End::Journal(e);
            }
            if gated.forward_len > 0
                && let Err(error) = to.write_all(&chunk[..gated.forward_len]).await
            {
                return End::Io {
                    from: "server",
                    error,
                };
            }
            if let Some(error) = gated.denied
                && (deny.send(error).await.is_err() || sent.recv().await.is_none())
            {
                return End::ServerClosed;
            }
        }
    }
}

/// Server -> client: the only writer to the client. Places each packet in the machine,
/// journals each chunk, forwards it unchanged; writes a denied command's ERR once every
/// earlier command is answered.
async fn server_pump<R, W>(
    from: &mut R,
    to: &mut W,
    p: Pump<'_>,
    mut deny: mpsc::Receiver<Bytes>,
    sent: mpsc::Sender<()>,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut pending: Option<Bytes> = None;
    let mut deny_open = true;
    loop {
        if pending.is_some() && lock(p.machine).is_idle() {
            if let Some(bytes) = pending.take() {
                if let Err(e) = p.recorder.server(bytes.clone()) {
                    return End::Journal(e);
                }
                if let Err(error) = to.write_all(&bytes).await {
                    return End::Io {
                        from: "client",
                        error,
                    };
                }
                if sent.send(()).await.is_err() {
                    return End::ClientClosed;
                }
            }
            continue;
        }
        // Both branches are cancel safe (read_whole keeps what it read in `buf`).
        let whole = tokio::select! {
            d = deny.recv(), if deny_open && pending.is_none() => {
                match d {
                    Some(bytes) => pending = Some(bytes),
                    None => deny_open = false,
                }
                continue;
            }
            r = read_whole(from, &mut buf, p.max, "server") => match r {
                Ok(n) => n,
                Err(end) => return end,
            },
        };
        let chunk = buf.split_to(whole).freeze();
        {
            let mut machine = lock(p.machine);
            for packet in packets(&chunk, p.max) {
                let placed = packet.map_err(|e| e.to_string()).and_then(|pk| {
                    machine
                        .server(&pk.payload)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
                if let Err(reason) = placed {
                    return End::Malformed {
                        from: "server",
                        reason,
                    };
                }
            }
        }
        if let Err(e) = p.recorder.server(chunk.clone()) {
            return End::Journal(e);
        }
        if let Err(error) = to.write_all(&chunk).await {
            return End::Io {
                from: "client",
                error,
            };
        }
    }
}

/// Decides the whole client packets at the start of `buf`, stopping after the first denied
/// command. Allowed packets are placed in `machine` (their responses are then expected); a
/// denied one is not (the backend never sees it). Ok(None): no whole packet buffered.
fn gate_packets(
    buf: &[u8],
    max: usize,
    machine: &mut ResponseMachine,
    gate: Option<&Gate>,
) -> Result<Option<Gated>, String> {
    let whole = whole_packets(buf, max).map_err(|e| e.to_string())?;
    if whole == 0 {
        return Ok(None);
    }
    let mut out = Gated {
        len: whole,
        forward_len: whole,
        statements: 0,
        decisions: Vec::new(),
        denied: None,
    };
    let mut offset = 0usize;
    let caps = machine.capabilities();
    let mut rest = buf.get(..whole).unwrap_or_default();
    while !rest.is_empty() {
        let wire = crate::protocol::mysql::packet::packet_len(rest, max)
            .map_err(|e| e.to_string())?
            .unwrap_or(rest.len());
        let Some(Ok(p)) = packets(rest.get(..wire).unwrap_or_default(), max).next() else {
            return Err("a client packet does not frame".into());
        };
        rest = rest.get(wire..).unwrap_or_default();
        let start = offset;
        offset += wire;
        // Every command starts at sequence id 0; other packets belong to an open exchange, and
        // one the machine would take for a command is refused (it would skip policy).
        let ruling = if p.seq == 0 {
            match decode_command(&p.payload, caps).map_err(|e| e.to_string())? {
                Command::Query(sql) | Command::StmtPrepare(sql) => {
                    let sql = String::from_utf8_lossy(sql);
                    if is_load_local(&sql) {
                        Some(builtin_denial(
                            &sql,
                            "other",
                            LOCAL_INFILE_POLICY,
                            "LOAD DATA LOCAL would read a file from the client's host; sluice does not relay it",
                        ))
                    } else {
                        gate.map(|g| g.decide(&sql))
                    }
                }
                Command::ChangeUser { .. } => Some(builtin_denial(
                    "",
                    "other",
                    CHANGE_USER_POLICY,
                    "changing the user inside a session is not supported through sluice yet; open a new connection as that user",
                )),
                _ => None,
            }
        } else {
            None
        };
        if let Some(Ruling { decision, denied }) = ruling {
            out.decisions.extend(decision);
            if let Some(text) = denied {
                out.len = offset;
                out.forward_len = start;
                out.denied = Some(err(p.last_seq.wrapping_add(1), code::DENIED, &text));
                return Ok(Some(out));
            }
        }
        let event = machine
            .client(p.seq, &p.payload)
            .map_err(|e| e.to_string())?;
        if let ClientEvent::Command(cmd) = &event
            && p.seq != 0
        {
            return Err(format!(
                "a {} command with sequence id {}, where commands start at 0",
                command_name(cmd),
                p.seq
            ));
        }
        if let ClientEvent::Command(cmd) = event
            && matches!(
                cmd,
                Command::Query(_)
                    | Command::StmtExecute(_)
                    | Command::InitDb(_)
                    | Command::ProcessKill(_)
                    | Command::FieldList { .. }
            )
        {
            out.statements += 1;
        }
    }
    Ok(Some(out))
}

/// A command's name for error messages.
fn command_name(cmd: &Command<'_>) -> &'static str {
    match cmd {
        Command::Query(_) => "COM_QUERY",
        Command::StmtPrepare(_) => "COM_STMT_PREPARE",
        Command::StmtExecute(_) => "COM_STMT_EXECUTE",
        Command::ChangeUser { .. } => "COM_CHANGE_USER",
        _ => "client",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn query(sql: &str) -> BytesMut {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        packet(0, &p)
    }

    #[test]
    fn load_data_local_is_recognised_in_any_case_and_spacing() {
        assert!(is_load_local(
            "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE t"
        ));
        assert!(is_load_local("  load\n xml  local infile 'x' into table t"));
        assert!(!is_load_local("LOAD DATA INFILE '/tmp/x' INTO TABLE t"));
        assert!(!is_load_local("select 'load data local'"));
    }

    #[test]
    fn a_denied_command_ends_the_chunk_and_is_not_forwarded() {
        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t"));
        let after = buf.len();
        buf.extend_from_slice(&query("select 1"));
        let g = gate_packets(&buf, 1 << 20, &mut machine, None)
            .unwrap()
            .unwrap();
        assert_eq!((g.len, g.forward_len), (after, 0));
        assert!(
            machine.is_idle(),
            "the backend never sees the denied command"
        );
        let denied = g.denied.unwrap();
        assert_eq!(denied[3], 1, "the ERR answers packet 0");
        assert!(
            String::from_utf8_lossy(&denied).contains(LOCAL_INFILE_POLICY),
            "{denied:?}"
        );
        assert_eq!(g.decisions.len(), 1);

        // The rest is gated next: allowed, forwarded whole, and awaited.
        let rest = buf.split_off(after);
        let g = gate_packets(&rest, 1 << 20, &mut machine, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            (g.len, g.forward_len, g.statements),
            (rest.len(), rest.len(), 1)
        );
        assert!(g.denied.is_none());
        assert!(!machine.is_idle());
    }

    #[test]
    fn an_incomplete_packet_waits_and_an_oversize_one_is_an_error() {
        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let q = query("select 1");
        assert!(
            gate_packets(&q[..5], 1 << 20, &mut machine, None)
                .unwrap()
                .is_none()
        );
        assert!(gate_packets(&[0xff, 0xff, 0xff, 0], 1024, &mut machine, None).is_err());
    }

    #[test]
    fn a_command_out_of_sequence_is_refused_rather_than_let_past_policy() {
        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let mut p = vec![0x03];
        p.extend_from_slice(b"delete from t");
        let e = gate_packets(&packet(1, &p), 1 << 20, &mut machine, None)
            .err()
            .unwrap();
        assert!(e.contains("sequence id 1"), "{e}");
    }

    #[test]
    fn errors_are_framed_with_the_sequence_id_given() {
        let e = err(3, code::DENIED, "sluice: denied");
        assert_eq!(&e[3..5], &[3, 0xff]);
        assert_eq!(u16::from_le_bytes([e[5], e[6]]), 1142);
        assert_eq!(&e[7..13], b"#42000");
    }
}
