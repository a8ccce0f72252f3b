//! One MySQL/MariaDB session through the proxy (issue 6): the connection phase (passthrough
//! authentication, or `auth = "sluice"`), then a packet-framed relay that decides every
//! statement before it reaches the backend and journals every chunk of whole packets
//! **before** forwarding it.
//!
//! **Connection phase.** The server speaks first, so sluice dials the backend (SO_MARK,
//! [`upstream::dial`]) and reads its greeting ([`login::read_greeting`]) before it greets the
//! client with the same version string and connection id (so `KILL <id>` and the CLI's Ctrl-C
//! reach the right backend thread), and the backend's capabilities minus COMPRESS, ZSTD and
//! LOCAL_FILES (and SSL, which is offered only when the target has `tls_cert`; TLS is then
//! terminated here with the target's rustls config).
//! - *Passthrough*: the greeting also carries the backend's nonce and plugin. The client's
//!   HandshakeResponse is forwarded to the backend with the same bits cleared, as packet 1
//!   (or, when the target's `backend_tls` asks for TLS, as packet 2 with CLIENT_SSL after
//!   sluice's own SSLRequest and TLS handshake, [`backend_leg`]), so both legs negotiate the
//!   same capabilities and command-phase packets pass unchanged. The auth exchange that
//!   follows is relayed until the backend's OK or ERR, its sequence ids shifted by the
//!   difference between the legs.
//! - *`auth = "sluice"`*: the greeting carries sluice's own nonce and `mysql_native_password`.
//!   The client is identified ([`identify`]: `sluice login` binding, workload identity, or an
//!   OIDC token, asked for with an AuthSwitchRequest to `mysql_clear_password` unless the
//!   response already carries it, over TLS or from this host); its user name is the role.
//!   Refusals are ERR 1045 with what to do. sluice then logs in to the backend itself
//!   ([`login::authenticate`]: the role's user and password, the client's capabilities,
//!   charset and database, over TLS per `backend_tls`), and answers the client's login with an
//!   OK carrying the backend's status. The client never sees the backend's auth exchange.
//!
//! **Journal.** The session starts once the client's response names user and database, and
//! the client is identified: sluice's greeting, the response and sluice's auth exchange are
//! then journaled in order as the session's first events (they are sluice's own bytes and the
//! client's login, sent before a session could exist, as PostgreSQL's startup and password
//! messages are). A client that leaves before responding leaves no session; a refused one
//! leaves a session with the refusal as its note and end. The response is journaled without
//! its auth data ([`HandshakeResponse::without_credentials`]) and every client packet of the
//! auth exchange with an empty payload (a scramble and the nonce allow offline guessing; a
//! clear-text reply is a password or token). Server packets are journaled as forwarded.
//!
//! **Command phase.** Two pumps run concurrently in the connection's task, sharing the
//! [`ResponseMachine`] behind a lock never held across an await. The client pump gates each
//! chunk of whole packets: COM_QUERY and COM_STMT_PREPARE text goes to [`Policy::decide_sql`]
//! with the MySQL dialect; `LOAD DATA LOCAL` is denied whatever the policies say (never
//! offered); a command packet whose sequence id is not 0 closes the session rather than skip
//! policy. The chunk is cut right after the first denied
//! packet; it is journaled with its decisions, the packets before the denied one are placed in
//! the machine and forwarded, and the denied one's ERR 1142 (SQLSTATE 42000, naming the policy)
//! goes to the server pump, which writes it once the machine says every earlier command is
//! answered; the client pump reads nothing more until then, so replies keep command order. The
//! server pump, the only writer to the client, places each packet in the machine, journals each
//! chunk and forwards it unchanged.
//!
//! **COM_CHANGE_USER.** Passthrough relays it like the first login (the backend
//! authenticates; the journal copy has no auth response, and the exchange's client packets
//! are journaled empty). With `auth = "sluice"` the client pump stops the chunk before it and,
//! once every earlier command is answered (an empty "denial" is the barrier the server pump
//! acknowledges), both pumps stop: sluice holds both streams and answers it itself
//! ([`reauth`]: same person, a role they may use, the backend's user changed with the role's
//! credentials), then the pumps start again with the buffers they had.
//!
//! Memory is bounded: packets are capped at [`login::PRE_AUTH_MAX`] before the backend's OK
//! (the client's own login packets at [`CLIENT_LOGIN_MAX`], room for a 64 KiB token; a larger
//! one under `auth = "sluice"` is refused as a token too large, ERR 1045) and at
//! `max_message_bytes` after, in both directions; a larger declared length closes the session
//! with a reason. Every way a session ends after it started writes its end event.
//!
//! **Masking.** With masking rules loaded, the server pump hands each chunk to the session's
//! [`masking::Masker`], which places the packets in the machine and rewrites text and binary
//! rows before the chunk is journaled and forwarded. On a target in strict masking mode the
//! gate (present then even without policies) denies, as `sluice-masking-strict`, a statement
//! that would return a masked column sluice cannot recognise by name or move one elsewhere
//! (`proxy::strict_denial`, shared with PostgreSQL).
//!
//! **Approvals.** A command an `@approval` policy denies is held (`hold.rs`): the chunk is cut
//! after it and journaled, what came before is forwarded, and nothing after it is gated until
//! the hold ends. Approved, it is placed in the machine and forwarded; otherwise its ERR goes
//! the way of a denial's. A hold nobody decides in time is deferred: once approved, the same
//! principal's next run of the same text on the same target runs once (`Gate::decide` asks
//! [`Access::take_ready`] before holding).

mod hold;
mod kill;
pub mod login;
mod masking;
mod reauth;

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use sluice_journal::{AuthInfo, Decision, NoteLevel, Principal, SessionRecorder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tracing::{Span, debug, info, warn};

use super::{End, Routed, Shared, Side, identify, strict_denial, upstream};
use crate::access::Access;
use crate::config::{AuthMode, ClientTls, Role, Unparsed};
use crate::policy::facts::Dialect;
use crate::policy::{Policy, SessionPolicy, principal};
use crate::protocol::mysql::auth::{CLEAR_PASSWORD, NATIVE_PASSWORD};
use crate::protocol::mysql::command::{Command, decode_command};
use crate::protocol::mysql::handshake::{
    AuthSwitch, Capabilities, ClientHandshake, ErrPacket, Handshake, HandshakeResponse, NONCE_LEN,
    parse_change_user, parse_client_handshake,
};
use crate::protocol::mysql::packet::{
    Decoder, HEADER_LEN, PacketError, packet, packets, whole_packets,
};
use crate::protocol::mysql::response::{ClientEvent, ResponseMachine};
use crate::tls::{Socket, Stream};

/// How much a read asks for at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Most packets relayed during the auth exchange.
const MAX_AUTH_PACKETS: usize = 16;
/// Cap on the client's packets before it is logged in (its HandshakeResponse, the reply to an
/// AuthSwitchRequest): a token of up to `MAX_TOKEN_BYTES` as a clear-text password, and room
/// for the rest of a HandshakeResponse (names, connection attributes).
const CLIENT_LOGIN_MAX: usize = identify::MAX_TOKEN_BYTES + 8 * 1024;
/// The policy id `LOAD DATA LOCAL` is denied by.
const LOCAL_INFILE_POLICY: &str = "sluice-local-infile";
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
    /// ER_QUERY_INTERRUPTED.
    pub const INTERRUPTED: (u16, &str) = (1317, "70100");
    /// ER_NET_PACKET_TOO_LARGE.
    pub const TOO_LARGE: (u16, &str) = (1153, "08S01");
    /// ER_SERVER_SHUTDOWN.
    pub const SHUTDOWN: (u16, &str) = (1053, "08S01");
    /// ER_UNKNOWN_ERROR: sluice itself cannot go on (backend unreachable, journal).
    pub const SLUICE: (u16, &str) = (1105, "HY000");
}

/// An ERR packet with sequence id `seq`.
fn err(seq: u8, (code, state): (u16, &str), text: &str) -> Bytes {
    packet(seq, &ErrPacket::new(code, state, text).encode()).freeze()
}

pub(crate) use kill::KillTargets;

pub(crate) async fn serve(
    tcp: Socket,
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
        backend_seq,
        authenticated,
        principal,
        greeting,
        // Kept for the session's lifetime: dropping it removes the session from KillTargets.
        kill_registration: _kill_registration,
    } = login;
    let mut session = Session {
        client,
        server,
        recorder: &recorder,
        gate: gate.as_ref(),
        machine: ResponseMachine::new(caps),
        max: shared.config.max_message_bytes,
        // Masking applies to the principal's groups (none known: nobody's overrides).
        masker: shared.masking.as_ref().map(|rules| {
            let groups = principal.as_ref().map(|p| p.groups.as_slice());
            masking::Masker::new(rules.clone(), &routed.target.name, groups.unwrap_or(&[]))
        }),
        reauth: match (routed.target.auth, &principal) {
            (AuthMode::Sluice, Some(p)) => Some(Reauth {
                routed: &routed,
                shared,
                principal: p.name.clone(),
                greeting,
            }),
            _ => None,
        },
    };
    let authenticated = if authenticated {
        Ok(true)
    } else {
        tokio::select! {
        r = tokio::time::timeout(shared.config.startup_timeout(), session.authenticate(client_seq, backend_seq)) => {
            r.unwrap_or_else(|_| Err(End::Malformed {
                from: Side::Client,
                reason: "the login did not complete in time".into(),
            }))
        }
        _ = stop.recv() => Err(End::Shutdown),
        }
    };
    let end = match authenticated {
        Ok(true) => {
            info!(backend = %routed.backend, "session started");
            relay(session, stop).await
        }
        Ok(false) => {
            End::BackendRefusedLogin.seal(&recorder, "packet");
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
    /// The same on the backend leg.
    backend_seq: u8,
    /// The login is complete (`auth = "sluice"`); otherwise the backend's auth exchange with
    /// the client is relayed next.
    authenticated: bool,
    /// Who the session is (policy's principal, or the identity `auth = "sluice"` found).
    principal: Option<Principal>,
    /// The backend's greeting.
    greeting: Handshake,
    /// This session in [`KillTargets`], for its lifetime.
    kill_registration: kill::KillRegistration,
}

/// The connection phase up to the client's HandshakeResponse. None: the connection is over
/// (refused, with the client told and the journal written where there was something to say).
async fn connect(mut tcp: Socket, routed: &Routed, shared: &Shared) -> Option<Handshaken> {
    if let Err(refusal) = shared.admit_session() {
        warn!("journal spool full: session refused");
        let _ = tcp.write_all(&err(0, code::SPOOL_FULL, &refusal)).await;
        return None;
    }
    // The backend's greeting first: its capabilities are what the client is offered.
    let backend = async {
        let mut server = upstream::dial(
            &routed.backend,
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
    // With `auth = "sluice"` the client answers sluice, not the backend: its own nonce, and
    // the plugin every client starts with (a token is asked for by switching to clear text).
    let sluice_auth = routed.target.auth == AuthMode::Sluice;
    let hello = packet(
        0,
        &Handshake {
            capabilities: offered,
            nonce: if sluice_auth {
                own_nonce()
            } else {
                greeting.nonce.clone()
            },
            auth_plugin: if sluice_auth {
                NATIVE_PASSWORD.into()
            } else {
                greeting.auth_plugin.clone()
            },
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
    let mut dec = Decoder::new(CLIENT_LOGIN_MAX);
    dec.expect(Some(1));
    let (mut raw, mut payload) = match read_first_packet(&mut tcp, &mut dec).await {
        Ok(Some(p)) => p,
        Ok(None) => return None,
        Err(e) => {
            let r = e.refusal(&mut tcp, HEADER_LEN, sluice_auth).await;
            refuse(
                Stream::Plain(tcp),
                2,
                r.mysql_code(),
                &r.message,
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
            Err(e) => {
                let r = e.refusal(&mut client, buf.len(), sluice_auth).await;
                refuse(
                    client,
                    3,
                    r.mysql_code(),
                    &r.message,
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
    // `auth = "sluice"`: who this is, and the role they asked for (the user name).
    let mut exchange = Vec::new();
    let mut signed_in = None;
    if sluice_auth {
        // No session yet: the exchange is journaled when it starts.
        let identified = identify_client(
            &mut client,
            (response.auth_plugin.as_deref(), &response.auth_response),
            client_seq.wrapping_add(1),
            routed,
            shared,
            &mut |from_sluice, bytes| {
                exchange.push((from_sluice, bytes));
                Ok(())
            },
        )
        .await
        .unwrap_or_else(|e| {
            let r = identify::Refusal::new("08006", format!("sluice: {e}"));
            Err((r, client_seq.wrapping_add(1)))
        });
        let chosen = match identified {
            Ok((who, seq)) => identify::choose_role(&routed.target, Some(&response.username), &who)
                .map(|role| (who.clone(), role.clone(), seq))
                .map_err(|r| (r, seq)),
            Err(e) => Err(e),
        };
        match chosen {
            Ok((who, role, seq)) => signed_in = Some(SignedIn { who, role, seq }),
            Err((r, seq)) => {
                warn!(code = r.code, reason = %r.message, "client authentication refused");
                refuse(
                    client,
                    seq,
                    r.mysql_code(),
                    &r.message,
                    shared,
                    routed,
                    params,
                )
                .await;
                return None;
            }
        }
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
        greeting,
        hello,
        response,
        forward: Bytes::from(forward),
        params,
        caps,
        client_seq,
        exchange,
        signed_in,
    })
}

/// A client `auth = "sluice"` identified, the role it may use, and the sequence id of the
/// server's next packet to it.
struct SignedIn {
    who: identify::Who,
    role: Role,
    seq: u8,
}

/// 20 random printable bytes: the nonce in sluice's own greeting. Nothing sluice checks
/// depends on it (a client's scramble of it is never verified: sluice asks for a token or
/// knows the uid), so a failing OS random source leaves it less random, not unsafe.
fn own_nonce() -> Vec<u8> {
    let mut bytes = [0u8; NONCE_LEN];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| 0x21 + b % 94).collect()
}

/// A client's identity, and the sequence id of sluice's next packet to it; or a refusal and
/// the sequence id to send it as.
type Identified = Result<(identify::Who, u8), (identify::Refusal, u8)>;

/// `auth = "sluice"`, at login and at COM_CHANGE_USER: identifies the client by its `sluice
/// login` binding or workload identity, or else by the OIDC token it sends with
/// `mysql_clear_password` (asked for with an AuthSwitchRequest as packet `seq` unless `plugin`
/// and `auth_response`, what the client already sent, carry it). Each packet of that exchange
/// goes to `record` (true: sluice's) before anything else is done with it, the client's with
/// an empty payload. Err: `record` failed.
async fn identify_client(
    client: &mut Stream,
    (plugin, auth_response): (Option<&str>, &[u8]),
    mut seq: u8,
    routed: &Routed,
    shared: &Shared,
    record: &mut (dyn FnMut(bool, Bytes) -> Result<(), sluice_journal::JournalError> + Send),
) -> Result<Identified, sluice_journal::JournalError> {
    let process = routed.process.as_ref();
    if let Some(who) = identify::without_password(shared, process) {
        return Ok(Ok((who, seq)));
    }
    let local_or_tls = client.is_tls() || routed.client_addr.is_local();
    if let Err(r) = identify::may_send_token(
        shared,
        process,
        local_or_tls,
        "connect with --ssl (mariadb) or --ssl-mode=REQUIRED (mysql)",
    ) {
        return Ok(Err((r, seq)));
    }
    let clear = if plugin == Some(CLEAR_PASSWORD) {
        auth_response.to_vec()
    } else {
        let switch = packet(
            seq,
            &AuthSwitch {
                plugin: CLEAR_PASSWORD.into(),
                data: Vec::new(),
            }
            .encode(),
        )
        .freeze();
        record(true, switch.clone())?;
        let gone = || identify::Refusal::new("08006", "client went away");
        if client.write_all(&switch).await.is_err() {
            return Ok(Err((gone(), seq)));
        }
        let mut dec = Decoder::new(CLIENT_LOGIN_MAX);
        dec.expect(Some(seq.wrapping_add(1)));
        let mut buf = BytesMut::with_capacity(1024);
        let read = tokio::time::timeout(
            shared.config.startup_timeout(),
            read_packet(client, &mut buf, &mut dec),
        )
        .await;
        let after = seq.wrapping_add(2);
        let payload = match read {
            Ok(Ok(Some((_, payload)))) => payload,
            Ok(Ok(None)) => return Ok(Err((gone(), seq))),
            Ok(Err(Unreadable::Bad(reason))) => {
                let r =
                    identify::Refusal::new("08P01", format!("sluice: bad auth reply: {reason}"));
                return Ok(Err((r, after)));
            }
            Ok(Err(too_long)) => {
                return Ok(Err((
                    too_long.refusal(client, buf.len(), true).await,
                    after,
                )));
            }
            Err(_) => {
                let r = identify::Refusal::new("28000", "sluice: no token within the time limit");
                return Ok(Err((r, after)));
            }
        };
        record(false, packet(seq.wrapping_add(1), &[]).freeze())?;
        seq = after;
        payload
    };
    let text = clear.strip_suffix(&[0]).unwrap_or(&clear);
    let Ok(token) = String::from_utf8(text.to_vec()) else {
        let r = identify::Refusal::new("28P01", "sluice: the password is not UTF-8");
        return Ok(Err((r, seq)));
    };
    Ok(identify::verify_token(shared, process, token)
        .await
        .map(|who| (who, seq))
        .map_err(|r| (r, seq)))
}

/// The connection phase so far: the client answered sluice's greeting (and, with
/// `auth = "sluice"`, was identified).
struct Handshaken {
    client: Stream,
    server: Socket,
    /// The backend's greeting.
    greeting: Handshake,
    /// sluice's greeting as sent.
    hello: Bytes,
    /// The client's response, capabilities as forwarded.
    response: HandshakeResponse,
    /// The response as the backend gets it.
    forward: Bytes,
    params: Vec<(String, String)>,
    caps: Capabilities,
    client_seq: u8,
    /// The packets of sluice's own auth exchange with the client (true: sluice's), for the
    /// journal; client payloads emptied.
    exchange: Vec<(bool, Bytes)>,
    /// `auth = "sluice"`: who, as which role.
    signed_in: Option<SignedIn>,
}

/// Starts the session's record (journaling the connection phase so far), asks policy whether
/// the principal may connect, and logs in to the backend: passthrough forwards the client's
/// response (the auth exchange is relayed next, by [`Session::authenticate`]);
/// `auth = "sluice"` logs in with the role's credentials and answers the client's login with
/// OK. Not cancelled by a timeout or shutdown once started, so a started session always gets
/// its end; the backend login is bounded by its own timeout.
async fn begin(h: Handshaken, routed: &Routed, shared: &Shared) -> Option<Connected> {
    let Handshaken {
        mut client,
        server,
        greeting,
        hello,
        response,
        forward,
        params,
        caps,
        client_seq,
        exchange,
        signed_in,
    } = h;
    let reply_seq = signed_in
        .as_ref()
        .map(|s| s.seq)
        .unwrap_or(client_seq.wrapping_add(1));
    let principal = match &signed_in {
        Some(s) => Some(s.who.principal.clone()),
        None => shared
            .policy
            .as_ref()
            .map(|_| principal::resolve(&shared.identities, routed.process.as_ref())),
    };
    Span::current().record(
        "principal",
        tracing::field::display(principal.as_ref().map(|p| p.name.as_str()).unwrap_or("-")),
    );
    let recorder = match shared.start_session(routed, params, principal.clone()) {
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
    let journaled = recorder
        .server(hello)
        .and_then(|()| recorder.client(journal_copy, 0))
        .and_then(|()| {
            exchange.into_iter().try_for_each(|(from_server, bytes)| {
                if from_server {
                    recorder.server(bytes)
                } else {
                    recorder.client(bytes, 0)
                }
            })
        });
    if let Err(e) = journaled {
        End::Journal(e).seal(&recorder, "packet");
        return None;
    }

    // A KILL of this connection id from the same principal withdraws a held statement.
    let (kill_registration, kill_rx) = kill::KillRegistration::new(
        shared.mysql_kills.clone(),
        routed.backend.clone(),
        greeting.connection_id,
        principal.as_ref().map(|p| p.name.as_str()).unwrap_or(""),
    );
    // Masking's strict mode needs statements checked even without policies.
    let strict = shared.strict_masking(&routed.target.name);
    // Policy: may this principal connect at all.
    let gate = match (&shared.policy, principal.clone()) {
        (Some(policy), Some(who)) => {
            let jit = shared.access.has_grant(&who.name, &routed.target.name);
            let session = super::policy_session(policy, routed, &who);
            match super::decide_connect(policy, session, jit, &recorder) {
                Ok(session) => Some(Gate {
                    policy: Some((policy.clone(), session)),
                    strict: strict.clone(),
                    unparsed: routed.target.unparsed,
                    access: shared.access.clone(),
                    principal: who,
                    target: routed.target.name.clone(),
                    session_id: recorder.id(),
                    hold_timeout: shared.config.approval_timeout(),
                    waiting: hold::Waiting::default(),
                    kill: kill_rx.clone(),
                    kills: shared.mysql_kills.clone(),
                    backend: routed.backend.clone(),
                }),
                Err(text) => {
                    warn!(reason = %text, "connect denied by policy");
                    let bytes = err(reply_seq, code::ACCESS_DENIED, &text);
                    let _ = recorder.server(bytes.clone());
                    let _ = client.write_all(&bytes).await;
                    End::ConnectDenied.seal(&recorder, "packet");
                    return None;
                }
            }
        }
        // Strict masking checks statements even without policies.
        (_, who) => strict.map(|rules| Gate {
            policy: None,
            strict: Some(rules),
            unparsed: routed.target.unparsed,
            access: shared.access.clone(),
            principal: who.unwrap_or_else(|| Principal {
                name: "unknown".into(),
                groups: Vec::new(),
            }),
            target: routed.target.name.clone(),
            session_id: recorder.id(),
            hold_timeout: shared.config.approval_timeout(),
            waiting: hold::Waiting::default(),
            kill: kill_rx.clone(),
            kills: shared.mysql_kills.clone(),
            backend: routed.backend.clone(),
        }),
    };

    let timeout = shared.config.connect_timeout() * 2;
    let backend = backend_leg(server, &greeting, routed, caps, timeout).await;
    let mut server = match backend {
        Ok(s) => s,
        Err(e) => {
            let text = format!(
                "sluice: cannot reach target \"{}\" at {}: {e}",
                routed.target.name, routed.backend
            );
            warn!(reason = %text, "backend TLS failed");
            let _ = recorder.note(NoteLevel::Error, text.clone());
            let bytes = err(reply_seq, code::SLUICE, &text);
            let _ = recorder.server(bytes.clone());
            let _ = client.write_all(&bytes).await;
            End::BackendUnreachable.seal(&recorder, "packet");
            return None;
        }
    };
    let backend_seq = if server.is_tls() { 2 } else { 1 };
    let authenticated = match &signed_in {
        None => {
            // Passthrough: the client's response, as the backend's packet 1 (2 after TLS).
            let mut forward = forward.to_vec();
            if server.is_tls() {
                set_ssl(&mut forward);
            }
            if let Some(seq) = forward.get_mut(3) {
                *seq = backend_seq;
            }
            if let Err(e) = server.write_all(&forward).await {
                End::Io {
                    from: Side::Server,
                    error: e,
                }
                .seal(&recorder, "packet");
                return None;
            }
            false
        }
        Some(SignedIn { who, role, .. }) => {
            let tls = server.is_tls();
            let mut attributes = response.attributes.clone();
            if shared.config.tag_application_name {
                attributes.push(("sluice_principal".into(), who.principal.name.clone()));
            }
            let opts = login::LoginOptions {
                capabilities: caps | Capabilities::CONNECT_ATTRS,
                charset: response.charset,
                max_packet: response.max_packet,
                attributes,
                timeout,
            };
            let creds = login::Credentials {
                user: &role.user,
                password: role.password.0.as_bytes(),
                database: response.database.as_deref(),
            };
            let ok = match login::authenticate(&mut server, &greeting, &creds, &opts, tls).await {
                Ok(l) => l.ok,
                Err(e) => {
                    let text = format!(
                        "sluice: cannot log in to target \"{}\" as role \"{}\": {}",
                        routed.target.name,
                        role.name,
                        crate::error_chain(&e)
                    );
                    warn!(reason = %text, "backend login failed");
                    let _ = recorder.note(NoteLevel::Error, text.clone());
                    let bytes = err(reply_seq, code::ACCESS_DENIED, &text);
                    let _ = recorder.server(bytes.clone());
                    let _ = client.write_all(&bytes).await;
                    End::BackendLoginFailed.seal(&recorder, "packet");
                    return None;
                }
            };
            // The client's login succeeds with sluice's OK carrying the backend's status.
            let ok = packet(reply_seq, &ok.encode(0x00, caps)).freeze();
            if let Err(e) = recorder.server(ok.clone()) {
                End::Journal(e).seal(&recorder, "packet");
                return None;
            }
            if client.write_all(&ok).await.is_err() {
                End::ClientClosed.seal(&recorder, "packet");
                return None;
            }
            true
        }
    };
    let _ = recorder.auth(AuthInfo {
        method: signed_in
            .as_ref()
            .map(|s| s.who.method.to_string())
            .unwrap_or_else(|| "passthrough".into()),
        role: signed_in.as_ref().map(|s| s.role.name.clone()),
        backend_user: signed_in.as_ref().map(|s| s.role.user.clone()),
        client_tls: client.describe(),
        backend_tls: server.describe(),
        expires_ns: signed_in.as_ref().and_then(|s| s.who.expires_ns),
    });
    Some(Connected {
        client,
        server,
        recorder,
        gate,
        caps,
        client_seq,
        backend_seq,
        authenticated,
        principal,
        greeting,
        kill_registration,
    })
}

/// The backend connection after its greeting: TLS when the target's `backend_tls` asks for it
/// (an SSLRequest with the session's capabilities, then the handshake), else as it is.
async fn backend_leg(
    mut server: Socket,
    greeting: &Handshake,
    routed: &Routed,
    caps: Capabilities,
    timeout: std::time::Duration,
) -> Result<Stream, String> {
    let Some(config) = routed.target.backend_tls.clone() else {
        return Ok(Stream::Plain(server));
    };
    let opts = login::LoginOptions {
        capabilities: caps,
        ..login::LoginOptions::default()
    };
    login::request_tls(&mut server, greeting, &opts)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    upstream::tls(server, &routed.target, &routed.backend, config, timeout).await
}

/// Sets CLIENT_SSL in a framed HandshakeResponse41's capability flags.
fn set_ssl(framed: &mut [u8]) {
    if let Some(flags) = framed.get_mut(HEADER_LEN..HEADER_LEN + 4) {
        let lower = u32::from_le_bytes([flags[0], flags[1], flags[2], flags[3]])
            | Capabilities::SSL.lower();
        flags.copy_from_slice(&lower.to_le_bytes());
    }
}

/// Why a client's login packet could not be read.
enum Unreadable {
    /// Its declared length (header included) is over the cap.
    TooLong { len: usize },
    /// Not a packet; the reason.
    Bad(String),
}

impl From<PacketError> for Unreadable {
    fn from(e: PacketError) -> Unreadable {
        match e {
            PacketError::TooLong { len, .. } => Unreadable::TooLong {
                len: len + HEADER_LEN,
            },
            e => Unreadable::Bad(e.to_string()),
        }
    }
}

impl Unreadable {
    /// The refusal to send, after reading what the client still sends of a packet too large
    /// (bounded): under `auth = "sluice"` such a packet carries a token, refused as too large
    /// (1045); otherwise the handshake is bad (1043).
    async fn refusal(
        self,
        client: &mut (impl AsyncRead + Unpin),
        buffered: usize,
        sluice_auth: bool,
    ) -> identify::Refusal {
        match self {
            Unreadable::TooLong { len } => {
                super::drain(client, buffered, len).await;
                if sluice_auth {
                    // The payload less the rest of the packet is at most the token.
                    return identify::token_too_large(len.saturating_sub(HEADER_LEN + 1));
                }
                identify::Refusal::new(
                    "08P01",
                    format!(
                        "sluice: bad handshake response: a packet of {len} bytes exceeds the limit of {CLIENT_LOGIN_MAX} bytes"
                    ),
                )
            }
            Unreadable::Bad(reason) => {
                identify::Refusal::new("08P01", format!("sluice: bad handshake response: {reason}"))
            }
        }
    }
}

/// Reads one packet checked by `dec`: its wire bytes and payload, None when the peer closed
/// before a whole packet, Err when the bytes are not a packet or it is too long.
async fn read_packet<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut BytesMut,
    dec: &mut Decoder,
) -> Result<Option<(Bytes, Vec<u8>)>, Unreadable> {
    loop {
        if let Some((n, p)) = dec.decode(buf)? {
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
/// bytes and payload, None when the peer closed, Err when it is not a packet or too long.
async fn read_first_packet(
    tcp: &mut Socket,
    dec: &mut Decoder,
) -> Result<Option<(Bytes, Vec<u8>)>, Unreadable> {
    let mut wire = vec![0u8; HEADER_LEN];
    if tcp.read_exact(&mut wire).await.is_err() {
        return Ok(None);
    }
    let len = usize::from(wire[0]) | usize::from(wire[1]) << 8 | usize::from(wire[2]) << 16;
    if len > CLIENT_LOGIN_MAX {
        // As the decoder says it (checking the sequence id first).
        return Err(match dec.decode(&wire) {
            Err(e) => e.into(),
            Ok(_) => Unreadable::TooLong {
                len: len + HEADER_LEN,
            },
        });
    }
    wire.resize(HEADER_LEN + len, 0);
    if tcp.read_exact(&mut wire[HEADER_LEN..]).await.is_err() {
        return Ok(None);
    }
    match dec.decode(&wire)? {
        Some((_, p)) => {
            let payload = p.payload.into_owned();
            Ok(Some((Bytes::from(wire), payload)))
        }
        None => Err(Unreadable::Bad("a packet does not frame".into())),
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
    let _ = client.write_all(&err(seq, code, text)).await;
    let _ = client.shutdown().await;
    shared.record_refusal(routed, params, text);
}

/// What a session needs to decide statements (present when `agent.policy_dir` is set).
struct Gate {
    /// The policies and this session's request to them (absent: no `policy_dir`, and the gate
    /// exists for strict masking alone).
    policy: Option<(Arc<Policy>, SessionPolicy)>,
    /// Masking rules, when the target masks in strict mode.
    strict: Option<Arc<crate::mask::rules::RuleSet>>,
    unparsed: Unparsed,
    access: Arc<Access>,
    principal: Principal,
    target: String,
    /// The session held statements' requests name.
    session_id: sluice_journal::SessionId,
    /// How long a held statement waits for a decision (`agent.approval_timeout_secs`).
    hold_timeout: std::time::Duration,
    /// Set while a statement is held.
    waiting: hold::Waiting,
    /// Changes when a KILL of this session's connection id arrives ([`kill`]).
    kill: tokio::sync::watch::Receiver<u64>,
    /// Where this session's own KILLs of held statements go.
    kills: Arc<KillTargets>,
    /// The backend, which with a connection id names a session.
    backend: super::upstream::Addr,
}

/// An error for the client: the MySQL error number and SQLSTATE, and the text.
type Refusal = ((u16, &'static str), String);

/// A statement's fate.
struct Ruling {
    decision: Option<Decision>,
    /// The client's error when denied.
    denied: Option<String>,
    /// Held for approval (no decision recorded yet: the hold's outcome makes it).
    held: Option<hold::Held>,
    /// This run used a deferred request's approval.
    used: Option<sluice_journal::Review>,
}

impl Gate {
    fn decide(&self, sql: &str) -> Ruling {
        let mut d = self.decide_sql(sql);
        if d.verdict.allowed
            && let Some(rules) = &self.strict
            && let Some(denied) = strict_denial(rules, &self.target, Dialect::MySql, sql)
        {
            d.verdict = denied;
        }
        // Without policies, only what strict masking denies is worth a record.
        let record = self.policy.is_some() || !d.verdict.allowed;
        let mut verdict = d.verdict;
        let mut text = verdict.message();
        let mut used = None;
        if let (false, Some(approvers)) = (verdict.allowed, &verdict.approval) {
            // Run again after a deferred hold: an unused approval of exactly this text lets it
            // through once (recorded as used before it is forwarded).
            match self
                .access
                .take_ready(&self.principal.name, &self.target, sql, self.session_id)
            {
                Ok(Some(r)) => {
                    if let sluice_journal::RequestState::Used { by, comment, .. } = &r.state {
                        info!(request = %r.id, %by, "statement runs on its deferred request's approval");
                        verdict.allowed = true;
                        verdict.reason = approved_reason(&r.id, by, comment);
                    }
                    used = Some(sluice_journal::Review {
                        request: r.id,
                        state: r.state,
                    });
                }
                Ok(None) => {
                    return Ruling {
                        decision: None,
                        denied: None,
                        held: Some(hold::Held {
                            sql: sql.to_string(),
                            action: d.action,
                            facts: d.facts,
                            policies: verdict.policies,
                            reason: verdict.reason,
                            approvers: approvers.clone(),
                            reply_seq: 0,
                        }),
                        used: None,
                    };
                }
                Err(e) => {
                    warn!(error = %e, "cannot record the use of an approval: the statement is denied");
                    text = format!(
                        "sluice: the statement needs approval, and the use of its approval cannot be recorded ({e}), so it is denied"
                    );
                    verdict.reason = text.clone();
                }
            }
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
            decision: record.then(|| Decision {
                sql: sql.to_string(),
                action: d.action.to_string(),
                facts,
                allowed: verdict.allowed,
                policies: verdict.policies,
                reason: verdict.reason,
            }),
            held: None,
            used,
        }
    }

    /// A KILL of connection `id` from this session: withdraws that session's held statement
    /// when it is the same principal's.
    fn interrupt(&self, id: u32) {
        if self
            .kills
            .interrupt(&self.backend, id, &self.principal.name)
        {
            info!(
                connection = id,
                "KILL of a connection of the same principal: its held statement, if any, is withdrawn"
            );
        }
    }

    /// The policies' decision on `sql` (allowed when there are none).
    fn decide_sql(&self, sql: &str) -> crate::policy::SqlDecision {
        match &self.policy {
            Some((policy, session)) => {
                let jit = self.access.has_grant(&self.principal.name, &self.target);
                policy.decide_sql(session, Dialect::MySql, sql, self.unparsed, jit)
            }
            None => crate::policy::SqlDecision::allowed(),
        }
    }

    /// The decision on a held statement once its hold ended, and the client's error when it is
    /// not to run. Decided again: a reload to a plain forbid during the hold still denies.
    fn after_hold(
        &self,
        held: &hold::Held,
        outcome: hold::HoldOutcome,
    ) -> (Decision, Option<Refusal>) {
        let mut decision = Decision {
            sql: held.sql.clone(),
            action: held.action.to_string(),
            facts: held.facts.clone(),
            allowed: false,
            policies: held.policies.clone(),
            reason: String::new(),
        };
        let denied = match outcome {
            hold::HoldOutcome::Approved {
                request,
                by,
                comment,
            } => {
                let v = self.decide_sql(&held.sql).verdict;
                if v.allowed || v.approval.is_some() {
                    decision.allowed = true;
                    decision.reason = approved_reason(&request, &by, &comment);
                    None
                } else {
                    info!(request = %request, policies = ?v.policies, "approved statement denied by policies loaded during the hold");
                    decision.policies = v.policies.clone();
                    decision.reason = v.reason.clone();
                    Some((code::DENIED, v.message()))
                }
            }
            hold::HoldOutcome::Refused(text) => {
                decision.reason = text.clone();
                Some((code::DENIED, text))
            }
            hold::HoldOutcome::Interrupted(text) => {
                decision.reason = text.clone();
                Some((code::INTERRUPTED, text))
            }
        };
        (decision, denied)
    }
}

/// A decision's reason when a person's approval let the statement through.
fn approved_reason(request: &str, by: &str, comment: &str) -> String {
    if comment.is_empty() {
        format!("request {request} approved by {by}")
    } else {
        format!("request {request} approved by {by}: {comment}")
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
        held: None,
        used: None,
    }
}

/// The command phase's state: both streams, the journal, and the response machine.
struct Session<'a> {
    client: Stream,
    server: Stream,
    recorder: &'a SessionRecorder,
    gate: Option<&'a Gate>,
    machine: ResponseMachine,
    max: usize,
    /// Rewrites result rows when masking rules are loaded.
    masker: Option<masking::Masker>,
    /// `auth = "sluice"`: what answering a COM_CHANGE_USER needs.
    reauth: Option<Reauth<'a>>,
}

/// What sluice needs to answer a COM_CHANGE_USER itself.
struct Reauth<'a> {
    routed: &'a Routed,
    shared: &'a Shared,
    /// The session's principal.
    principal: String,
    /// The backend's greeting.
    greeting: Handshake,
}

/// Answers the COM_CHANGE_USER first in `cbuf` ([`reauth::change_user`]), with both streams
/// held and every earlier command answered.
async fn change_user_now(
    client: &mut Stream,
    server: &mut Stream,
    cbuf: &mut BytesMut,
    r: &Reauth<'_>,
    recorder: &SessionRecorder,
    machine: &Mutex<ResponseMachine>,
    max: usize,
) -> Result<(), End> {
    let malformed = |reason: String| End::Malformed {
        from: Side::Client,
        reason,
    };
    let wire = crate::protocol::mysql::packet::packet_len(cbuf, max)
        .map_err(|e| malformed(e.to_string()))?
        .ok_or_else(|| malformed("COM_CHANGE_USER is not whole".into()))?;
    let command = cbuf.split_to(wire);
    let payload = match packets(&command, max).next() {
        Some(Ok(p)) => p.payload.into_owned(),
        Some(Err(e)) => return Err(malformed(e.to_string())),
        None => return Err(malformed("COM_CHANGE_USER does not frame".into())),
    };
    let ctx = reauth::Context {
        routed: r.routed,
        shared: r.shared,
        principal: &r.principal,
        greeting: &r.greeting,
        recorder,
    };
    // The machine is only touched here while the pumps are stopped.
    let mut m = std::mem::replace(&mut *lock(machine), ResponseMachine::new(Capabilities(0)));
    let result = reauth::change_user(client, server, &payload, &ctx, &mut m).await;
    *lock(machine) = m;
    result
}

/// One client chunk after policy.
struct Gated {
    /// Where the chunk ends in the client buffer (after a denied or held packet, if any).
    len: usize,
    /// The bytes before the denied or held packet (all of them when none is).
    forward_len: usize,
    statements: u64,
    decisions: Vec<Decision>,
    /// The ERR packet for a denied command.
    denied: Option<Bytes>,
    /// A command held for approval: the chunk's last packet, from `forward_len` on, neither
    /// forwarded nor placed in the machine yet.
    held: Option<hold::Held>,
    /// Deferred requests whose approval a run in this chunk used.
    used: Vec<sluice_journal::Review>,
    /// What the journal gets instead of the chunk, when it carries credentials.
    journal: Option<Bytes>,
    /// The chunk stops before a COM_CHANGE_USER that sluice answers itself.
    change_user: bool,
}

impl Session<'_> {
    /// Relays the auth exchange after the forwarded HandshakeResponse until the backend's OK
    /// (true) or ERR (false). Client packets are journaled with empty payloads.
    async fn authenticate(&mut self, client_seq: u8, backend_seq: u8) -> Result<bool, End> {
        // Each leg numbers the exchange from its response's sequence id (2 after TLS).
        let shift = client_seq.wrapping_sub(backend_seq);
        let mut cbuf = BytesMut::new();
        let mut sbuf = BytesMut::new();
        let mut relayed = 0usize;
        loop {
            let from_server = tokio::select! {
                r = self.server.read_buf(&mut sbuf) => match r {
                    Ok(0) => return Err(End::ServerClosed),
                    Ok(_) => true,
                    Err(error) => return Err(End::Io { from: Side::Server, error }),
                },
                r = self.client.read_buf(&mut cbuf) => match r {
                    Ok(0) => return Err(End::ClientClosed),
                    Ok(_) => false,
                    Err(error) => return Err(End::Io { from: Side::Client, error }),
                },
            };
            let (buf, from) = if from_server {
                (&mut sbuf, Side::Server)
            } else {
                (&mut cbuf, Side::Client)
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
                    from: Side::Client,
                    error,
                })?;
            } else {
                self.recorder
                    .client(journal.freeze(), 0)
                    .map_err(End::Journal)?;
                self.server.write_all(&out).await.map_err(|error| End::Io {
                    from: Side::Server,
                    error,
                })?;
            }
            if let Some(ok) = done {
                if !sbuf.is_empty() || !cbuf.is_empty() {
                    return Err(End::Malformed {
                        from: if sbuf.is_empty() {
                            Side::Client
                        } else {
                            Side::Server
                        },
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
        mut client,
        mut server,
        recorder,
        gate,
        machine,
        max,
        mut masker,
        reauth,
    } = session;
    let change_user = if reauth.is_some() {
        ChangeUserBy::Sluice
    } else {
        ChangeUserBy::Backend
    };
    let machine = Mutex::new(machine);
    // Owned here, not by the pumps, so nothing read is lost when they stop for a
    // COM_CHANGE_USER and start again after it.
    let mut cbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut sbuf = BytesMut::with_capacity(READ_CHUNK);
    let end = loop {
        let (mut client_rd, mut client_wr) = tokio::io::split(client);
        let (mut server_rd, mut server_wr) = tokio::io::split(server);
        let (deny_tx, deny_rx) = mpsc::channel::<Bytes>(1);
        let (sent_tx, sent_rx) = mpsc::channel::<()>(1);
        let stopped = {
            let c2s = client_pump(
                &mut client_rd,
                &mut server_wr,
                Pump {
                    recorder,
                    machine: &machine,
                    max,
                    change_user,
                },
                gate,
                &mut cbuf,
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
                    change_user,
                },
                deny_rx,
                sent_tx,
                &mut masker,
                &mut sbuf,
            );
            tokio::select! {
                s = c2s => s,
                e = s2c => Stopped::End(e),
                _ = stop.recv() => Stopped::End(End::Shutdown),
            }
        };
        client = client_rd.unsplit(client_wr);
        server = server_rd.unsplit(server_wr);
        match (stopped, &reauth) {
            (Stopped::ChangeUser, Some(r)) => {
                let changed = tokio::select! {
                    c = change_user_now(&mut client, &mut server, &mut cbuf, r, recorder, &machine, max) => c,
                    _ = stop.recv() => Err(End::Shutdown),
                };
                if let Err(e) = changed {
                    break e;
                }
            }
            (Stopped::ChangeUser, None) => {
                break End::Malformed {
                    from: Side::Client,
                    reason: "COM_CHANGE_USER stopped a relay that does not answer it".into(),
                };
            }
            (Stopped::End(e), _) => break e,
        }
    };
    let mut client_wr = client;
    let mut server_wr = server;
    // A parting error only where the client is idle (it reads it as the answer to its next
    // command, or at once) or waits for the answer to a bad command (packet 1).
    let idle = lock(&machine).is_idle();
    let parting = match &end {
        // A client whose command is held waits for that command's answer.
        End::Shutdown if idle => Some(err(
            gate.and_then(|g| g.waiting.reply_seq()).unwrap_or(0),
            code::SHUTDOWN,
            "sluice: the connection is closed because the agent is shutting down",
        )),
        End::Malformed {
            from: Side::Client,
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
        End::TooLarge {
            from: Side::Client,
            len,
            max,
        } if idle => Some(err(
            1,
            code::TOO_LARGE,
            &format!(
                "sluice: a packet of {len} bytes exceeds this agent's max_message_bytes ({max} bytes); \
                 raise `max_message_bytes` in the [agent] section of sluice's configuration"
            ),
        )),
        _ => None,
    };
    if let End::TooLarge {
        from: Side::Client,
        len,
        ..
    } = &end
        && parting.is_some()
    {
        // Read what the client is still sending of it (bounded), so that closing does not
        // reset the connection before the client has read why.
        super::drain(&mut client_wr, cbuf.len(), *len).await;
    }
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
    /// Who answers a COM_CHANGE_USER (the client pump's concern).
    change_user: ChangeUserBy,
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
    side: Side,
) -> Result<usize, End> {
    loop {
        let whole = whole_packets(buf, max).map_err(|e| match e {
            PacketError::TooLong { len, max } => End::TooLarge {
                from: side,
                len,
                max,
            },
            e => End::Malformed {
                from: side,
                reason: e.to_string(),
            },
        })?;
        if whole > 0 {
            return Ok(whole);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match from.read_buf(buf).await {
            Ok(0) if side == Side::Client => return Err(End::ClientClosed),
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
    buf: &mut BytesMut,
    deny: mpsc::Sender<Bytes>,
    mut sent: mpsc::Receiver<()>,
) -> Stopped
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let end = |e: End| Stopped::End(e);
    loop {
        if let Err(e) = read_whole(from, buf, p.max, Side::Client).await {
            return end(e);
        }
        loop {
            let gated = match gate_packets(buf, p.max, &mut lock(p.machine), gate, p.change_user) {
                Ok(Some(g)) => g,
                Ok(None) => break,
                Err(reason) => {
                    return end(End::Malformed {
                        from: Side::Client,
                        reason,
                    });
                }
            };
            let chunk = buf.split_to(gated.len).freeze();
            if !chunk.is_empty()
                && let Err(e) = p.recorder.client_with_decisions(
                    gated.journal.clone().unwrap_or_else(|| chunk.clone()),
                    gated.statements,
                    gated.decisions,
                )
            {
                return end(End::Journal(e));
            }
            for review in gated.used {
                if let Err(e) = p.recorder.review(review) {
                    return end(End::Journal(e));
                }
            }
            if gated.forward_len > 0
                && let Err(error) = to.write_all(&chunk[..gated.forward_len]).await
            {
                return end(End::Io {
                    from: Side::Server,
                    error,
                });
            }
            let mut refusal = gated.denied;
            if let (Some(held), Some(gate)) = (gated.held, gate) {
                // Nothing after the held command is gated until its hold ends.
                let outcome = match hold::hold(&held, gate, p.recorder, from, buf, p.max).await {
                    Ok(o) => o,
                    Err(e) => return end(e),
                };
                let (decision, denied) = gate.after_hold(&held, outcome);
                if let Err(e) = p.recorder.decision(decision) {
                    return end(End::Journal(e));
                }
                let command = chunk.slice(gated.forward_len..);
                match denied {
                    Some((code, text)) => refusal = Some(err(held.reply_seq, code, &text)),
                    None => {
                        // Placed before it is forwarded, so its response finds it awaited.
                        let placed = packets(&command, p.max)
                            .next()
                            .ok_or_else(|| "a held packet does not frame".to_string())
                            .and_then(|pk| {
                                let pk = pk.map_err(|e| e.to_string())?;
                                lock(p.machine)
                                    .client(pk.seq, &pk.payload)
                                    .map(|_| ())
                                    .map_err(|e| e.to_string())
                            });
                        if let Err(reason) = placed {
                            return end(End::Malformed {
                                from: Side::Client,
                                reason,
                            });
                        }
                        if let Err(error) = to.write_all(&command).await {
                            return end(End::Io {
                                from: Side::Server,
                                error,
                            });
                        }
                    }
                }
            }
            if let Some(error) = refusal
                && (deny.send(error).await.is_err() || sent.recv().await.is_none())
            {
                return end(End::ServerClosed);
            }
            if gated.change_user {
                // An empty "error" is a barrier: the server pump acknowledges it once every
                // earlier command is answered, and then sluice holds both streams.
                if deny.send(Bytes::new()).await.is_err() || sent.recv().await.is_none() {
                    return end(End::ServerClosed);
                }
                return Stopped::ChangeUser;
            }
        }
    }
}

/// Why the client pump stopped.
enum Stopped {
    End(End),
    /// A COM_CHANGE_USER for sluice to answer is first in the client buffer, and every
    /// earlier command is answered.
    ChangeUser,
}

/// Server -> client: the only writer to the client. Places each packet in the machine (through
/// the masker, which rewrites rows, when there is one), journals each chunk with its masking
/// reports, forwards it; writes a denied command's ERR once every
/// earlier command is answered.
async fn server_pump<R, W>(
    from: &mut R,
    to: &mut W,
    p: Pump<'_>,
    mut deny: mpsc::Receiver<Bytes>,
    sent: mpsc::Sender<()>,
    masker: &mut Option<masking::Masker>,
    buf: &mut BytesMut,
) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut pending: Option<Bytes> = None;
    let mut deny_open = true;
    loop {
        if pending.is_some() && lock(p.machine).is_idle() {
            // An empty one is the client pump's barrier: nothing to send, only the answer.
            if let Some(bytes) = pending.take().filter(|b| !b.is_empty()) {
                if let Err(e) = p.recorder.server(bytes.clone()) {
                    return End::Journal(e);
                }
                if let Err(error) = to.write_all(&bytes).await {
                    return End::Io {
                        from: Side::Client,
                        error,
                    };
                }
            }
            if sent.send(()).await.is_err() {
                return End::ClientClosed;
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
            r = read_whole(from, buf, p.max, Side::Server) => match r {
                Ok(n) => n,
                Err(end) => return end,
            },
        };
        let chunk = buf.split_to(whole).freeze();
        // Masked before anything records or forwards it: the clear value stays here.
        let (chunk, reports) = match masker.as_mut() {
            Some(m) => match m.chunk(chunk, &mut lock(p.machine), p.max) {
                Ok(x) => x,
                Err(reason) => {
                    return End::Malformed {
                        from: Side::Server,
                        reason,
                    };
                }
            },
            None => (chunk, Vec::new()),
        };
        if masker.is_none() {
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
                        from: Side::Server,
                        reason,
                    };
                }
            }
        }
        if let Err(e) = p.recorder.server(chunk.clone()) {
            return End::Journal(e);
        }
        for report in reports {
            if let Err(e) = p.recorder.masked(report) {
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

/// Decides the whole client packets at the start of `buf`, stopping after the first denied
/// command. Allowed packets are placed in `machine` (their responses are then expected); a
/// denied one is not (the backend never sees it). Ok(None): no whole packet buffered.
fn gate_packets(
    buf: &[u8],
    max: usize,
    machine: &mut ResponseMachine,
    gate: Option<&Gate>,
    change_user: ChangeUserBy,
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
        held: None,
        used: Vec::new(),
        journal: None,
        change_user: false,
    };
    // The journal's copy, once a packet in the chunk carries credentials.
    let mut journal: Option<BytesMut> = None;
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
                    if crate::policy::parse::loads_local_file(&sql) {
                        Some(builtin_denial(
                            &sql,
                            "other",
                            LOCAL_INFILE_POLICY,
                            "LOAD DATA LOCAL would read a file from the client's host; sluice does not relay it",
                        ))
                    } else {
                        if let (Some(g), Some(id)) = (gate, kill::killed_id(&sql)) {
                            g.interrupt(id);
                        }
                        gate.map(|g| g.decide(&sql))
                    }
                }
                Command::ChangeUser { .. } if change_user == ChangeUserBy::Sluice => {
                    // sluice runs this login itself, once every earlier command is answered.
                    out.len = start;
                    out.forward_len = start;
                    out.change_user = true;
                    out.journal = journal.map(BytesMut::freeze);
                    return Ok(Some(out));
                }
                Command::ProcessKill(id) => {
                    if let Some(g) = gate {
                        g.interrupt(id);
                    }
                    None
                }
                _ => None,
            }
        } else {
            None
        };
        if let Some(Ruling {
            decision,
            denied,
            held,
            used,
        }) = ruling
        {
            out.decisions.extend(decision);
            out.used.extend(used);
            if let Some(text) = denied {
                out.len = offset;
                out.forward_len = start;
                out.denied = Some(err(p.last_seq.wrapping_add(1), code::DENIED, &text));
                out.journal = journal.map(|mut j| {
                    j.extend_from_slice(buf.get(start..offset).unwrap_or_default());
                    j.freeze()
                });
                return Ok(Some(out));
            }
            if let Some(mut held) = held {
                held.reply_seq = p.last_seq.wrapping_add(1);
                // Journaled now, so counted now (a COM_QUERY, as the transcript counts it).
                if p.payload.first() == Some(&0x03) {
                    out.statements += 1;
                }
                out.len = offset;
                out.forward_len = start;
                out.held = Some(held);
                out.journal = journal.map(|mut j| {
                    j.extend_from_slice(buf.get(start..offset).unwrap_or_default());
                    j.freeze()
                });
                return Ok(Some(out));
            }
        }
        let event = machine
            .client(p.seq, &p.payload)
            .map_err(|e| e.to_string())?;
        // A relayed COM_CHANGE_USER and its auth exchange are journaled without credentials
        // (LOCAL INFILE is never offered, so client data packets are auth data).
        let redacted = match &event {
            ClientEvent::Command(Command::ChangeUser { .. }) => {
                let copy = parse_change_user(&p.payload, caps);
                Some(
                    copy.map(|c| c.without_credentials(caps).to_vec())
                        .unwrap_or_default(),
                )
            }
            ClientEvent::Data(_) => Some(Vec::new()),
            ClientEvent::Command(_) => None,
        };
        match (redacted, &mut journal) {
            (Some(payload), j) => {
                let j =
                    j.get_or_insert_with(|| BytesMut::from(buf.get(..start).unwrap_or_default()));
                j.extend_from_slice(&packet(p.seq, &payload));
            }
            (None, Some(j)) => j.extend_from_slice(buf.get(start..offset).unwrap_or_default()),
            (None, None) => {}
        }
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
    out.journal = journal.map(BytesMut::freeze);
    Ok(Some(out))
}

/// Who answers a COM_CHANGE_USER: the backend (passthrough: relayed like the first login), or
/// sluice itself (`auth = "sluice"`: [`reauth::change_user`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeUserBy {
    Backend,
    Sluice,
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
    use sluice_journal::Journal;
    use sluice_journal::SessionStart;

    fn query(sql: &str) -> BytesMut {
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        packet(0, &p)
    }

    #[test]
    fn a_denied_command_ends_the_chunk_and_is_not_forwarded() {
        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&query("LOAD DATA LOCAL INFILE 'x' INTO TABLE t"));
        let after = buf.len();
        buf.extend_from_slice(&query("select 1"));
        let g = gate_packets(&buf, 1 << 20, &mut machine, None, ChangeUserBy::Backend)
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
        let g = gate_packets(&rest, 1 << 20, &mut machine, None, ChangeUserBy::Backend)
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
            gate_packets(&q[..5], 1 << 20, &mut machine, None, ChangeUserBy::Backend)
                .unwrap()
                .is_none()
        );
        assert!(
            gate_packets(
                &[0xff, 0xff, 0xff, 0],
                1024,
                &mut machine,
                None,
                ChangeUserBy::Backend
            )
            .is_err()
        );
    }

    #[test]
    fn a_change_user_is_journaled_without_its_scramble_or_stops_the_chunk_for_sluice() {
        use crate::protocol::mysql::handshake::{ChangeUser, parse_change_user};
        let caps = Capabilities::sluice_default();
        let scramble = b"0123456789abcdefghij".to_vec();
        let change = ChangeUser {
            user: "app_ro".into(),
            auth_response: scramble.clone(),
            database: "shop".into(),
            charset: Some(45),
            auth_plugin: Some("mysql_native_password".into()),
            attributes: Vec::new(),
        };
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&query("select 1"));
        let before = buf.len();
        buf.extend_from_slice(&packet(0, &change.encode(caps)));

        // Passthrough: relayed whole, journaled with the auth response emptied.
        let mut machine = ResponseMachine::new(caps);
        let g = gate_packets(&buf, 1 << 20, &mut machine, None, ChangeUserBy::Backend)
            .unwrap()
            .unwrap();
        assert_eq!((g.len, g.forward_len), (buf.len(), buf.len()));
        let journal = g.journal.unwrap();
        assert_eq!(&journal[..before], &buf[..before]);
        let copy = packets(&journal[before..], 1 << 20)
            .next()
            .unwrap()
            .unwrap();
        let copy = parse_change_user(&copy.payload, caps).unwrap();
        assert_eq!(copy.user, "app_ro");
        assert!(copy.auth_response.is_empty());
        assert!(!journal.windows(scramble.len()).any(|w| w == scramble));

        // sluice answers it: the chunk stops before it, which stays buffered.
        let mut machine = ResponseMachine::new(caps);
        let g = gate_packets(&buf, 1 << 20, &mut machine, None, ChangeUserBy::Sluice)
            .unwrap()
            .unwrap();
        assert_eq!(
            (g.len, g.forward_len, g.change_user),
            (before, before, true)
        );
        assert!(g.journal.is_none());
    }

    #[test]
    fn a_command_out_of_sequence_is_refused_rather_than_let_past_policy() {
        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let mut p = vec![0x03];
        p.extend_from_slice(b"delete from t");
        let e = gate_packets(
            &packet(1, &p),
            1 << 20,
            &mut machine,
            None,
            ChangeUserBy::Backend,
        )
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

    /// A gate on `prod-db` with the example policies (DELETE there needs a "dba"'s approval),
    /// for principal "dev", and a second principal who may approve.
    fn prod_gate(hold_timeout: std::time::Duration) -> (Gate, Journal, tempfile::TempDir) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let policy = Policy::load(&dir).unwrap();
        let session = policy
            .engine()
            .session(
                crate::policy::PrincipalRef {
                    name: "dev",
                    groups: &[],
                },
                "prod-db",
                crate::policy::Source {
                    uid: Some(1000),
                    comm: "mariadb",
                },
            )
            .unwrap();
        let journal_dir = tempfile::tempdir().unwrap();
        let journal = sluice_journal::Journal::open(journal_dir.path()).unwrap();
        let gate = Gate {
            policy: Some((policy, session)),
            strict: None,
            unparsed: Unparsed::Deny,
            access: Arc::new(Access::open(journal.clone()).unwrap()),
            principal: Principal {
                name: "dev".into(),
                groups: Vec::new(),
            },
            target: "prod-db".into(),
            session_id: sluice_journal::SessionId::new(),
            hold_timeout,
            waiting: hold::Waiting::default(),
            kill: tokio::sync::watch::channel(0).1,
            kills: Arc::default(),
            backend: crate::proxy::Addr::Tcp("127.0.0.1:3306".parse().unwrap()),
        };
        (gate, journal, journal_dir)
    }

    fn recorder(journal: &Journal) -> SessionRecorder {
        journal
            .start_session(SessionStart {
                target: "prod-db".into(),
                protocol: "mysql".into(),
                orig_dst: "127.0.0.1:3306".into(),
                client_addr: "127.0.0.1:50000".into(),
                process: None,
                params: Vec::new(),
                principal: None,
            })
            .unwrap()
    }

    fn dba() -> Principal {
        Principal {
            name: "cy".into(),
            groups: vec!["dba".into()],
        }
    }

    const DELETE: &str = "delete from t where id = 1";

    #[test]
    fn a_held_command_ends_the_chunk_unforwarded_and_unawaited_after_what_came_before() {
        let (gate, _journal, _dir) = prod_gate(std::time::Duration::from_secs(1));
        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&query("select 1"));
        let before = buf.len();
        buf.extend_from_slice(&query(DELETE));
        let after = buf.len();
        buf.extend_from_slice(&query("select 2"));
        let g = gate_packets(
            &buf,
            1 << 20,
            &mut machine,
            Some(&gate),
            ChangeUserBy::Backend,
        )
        .unwrap()
        .unwrap();
        assert_eq!((g.len, g.forward_len), (after, before));
        assert!(g.denied.is_none());
        let held = g.held.unwrap();
        assert_eq!(
            (held.sql.as_str(), held.approvers.as_str(), held.reply_seq),
            (DELETE, "dba", 1)
        );
        assert_eq!(held.policies, ["prod-delete-needs-dba"]);
        // The select's decision only; the held one's is recorded when its hold ends.
        assert_eq!(g.decisions.len(), 1);
        assert_eq!(
            g.statements, 2,
            "the held COM_QUERY is journaled, so counted"
        );
        // Only the select is awaited.
        assert!(!machine.is_idle());
        machine
            .server(&[0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00])
            .unwrap();
        assert!(machine.is_idle(), "the held command is not placed");
    }

    #[test]
    fn a_deferred_request_approved_later_lets_the_same_statement_through_once() {
        let (gate, _journal, _dir) = prod_gate(std::time::Duration::from_secs(1));
        let r = gate.decide(DELETE);
        let held = r.held.unwrap();
        let (req, _rx) = gate
            .access
            .hold(crate::access::HoldRequest {
                session: gate.session_id,
                requester: &gate.principal,
                target: &gate.target,
                sql: DELETE,
                action: held.action,
                policies: &held.policies,
                reason: &held.reason,
                approvers: &held.approvers,
            })
            .unwrap();
        gate.access
            .settle(
                &req.id,
                sluice_journal::RequestState::Deferred {
                    at_ns: sluice_journal::now_ns(),
                },
            )
            .unwrap();
        assert!(gate.decide(DELETE).held.is_some(), "undecided: held again");
        // That re-run waits on the same request; its session gives up again.
        gate.access
            .settle(
                &req.id,
                sluice_journal::RequestState::Deferred {
                    at_ns: sluice_journal::now_ns(),
                },
            )
            .unwrap();
        gate.access.decide(&req.id, &dba(), true, "INC-7").unwrap();

        let mut machine = ResponseMachine::new(Capabilities::sluice_default());
        let g = gate_packets(
            &query(DELETE),
            1 << 20,
            &mut machine,
            Some(&gate),
            ChangeUserBy::Backend,
        )
        .unwrap()
        .unwrap();
        assert!(g.held.is_none() && g.denied.is_none());
        assert_eq!(g.forward_len, g.len);
        assert!(g.decisions[0].allowed);
        assert_eq!(
            g.decisions[0].reason,
            format!("request {} approved by cy: INC-7", req.id)
        );
        assert_eq!(g.used.len(), 1);
        assert_eq!(g.used[0].state.word(), "used");
        // Once: the next run is held anew.
        assert!(gate.decide(DELETE).held.is_some());
    }

    #[test]
    fn after_a_hold_an_approval_runs_the_statement_and_anything_else_is_an_error() {
        let (gate, _journal, _dir) = prod_gate(std::time::Duration::from_secs(1));
        let held = gate.decide(DELETE).held.unwrap();
        let (d, denied) = gate.after_hold(
            &held,
            hold::HoldOutcome::Approved {
                request: "abcd1234".into(),
                by: "cy".into(),
                comment: String::new(),
            },
        );
        assert!(d.allowed && denied.is_none());
        assert_eq!(d.reason, "request abcd1234 approved by cy");
        let (d, denied) = gate.after_hold(&held, hold::HoldOutcome::Refused("sluice: no".into()));
        assert!(!d.allowed);
        assert_eq!(denied, Some((code::DENIED, "sluice: no".to_string())));
        let (d, denied) = gate.after_hold(
            &held,
            hold::HoldOutcome::Interrupted("sluice: killed".into()),
        );
        assert!(!d.allowed);
        assert_eq!(
            denied,
            Some((code::INTERRUPTED, "sluice: killed".to_string()))
        );
    }

    #[tokio::test]
    async fn a_hold_nobody_decides_in_time_defers_the_request_and_names_the_approve_command() {
        let (gate, journal, _dir) = prod_gate(std::time::Duration::from_millis(200));
        let rec = recorder(&journal);
        let held = gate.decide(DELETE).held.unwrap();
        let (mut client, _keep) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let outcome = hold::hold(&held, &gate, &rec, &mut client, &mut buf, 1 << 20)
            .await
            .unwrap();
        let hold::HoldOutcome::Refused(text) = outcome else {
            panic!("{outcome:?}")
        };
        let open = gate.access.list(false);
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].state.word(), "deferred");
        let id = &open[0].id;
        assert!(
            text.contains(&format!("`sluice approve {id}`"))
                && text.contains("run the same statement again"),
            "{text}"
        );
        assert_eq!(gate.waiting.reply_seq(), None);
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_during_a_hold_withdraws_it() {
        let (gate, journal, _dir) = prod_gate(std::time::Duration::from_secs(30));
        let rec = recorder(&journal);
        let mut held = gate.decide(DELETE).held.unwrap();
        held.reply_seq = 1;
        let (mut client, peer) = tokio::io::duplex(64);
        drop(peer);
        let mut buf = BytesMut::new();
        let end = hold::hold(&held, &gate, &rec, &mut client, &mut buf, 1 << 20)
            .await
            .unwrap_err();
        assert!(matches!(end, End::ClientClosed), "{}", end.text("packet"));
        let all = gate.access.list(true);
        assert_eq!(all[0].state.word(), "abandoned");
        assert!(gate.access.list(false).is_empty());
    }
}
