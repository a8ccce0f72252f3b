//! COM_CHANGE_USER under `auth = "sluice"`: the client logs in again on its connection, as
//! another of the target's roles. sluice holds both streams for the exchange (the relay's pumps
//! are stopped, every earlier command answered), so it runs in order like the first login:
//!
//! 1. the command is journaled without its auth response;
//! 2. the client is identified again ([`identify`]: its `sluice login` binding or workload
//!    identity, else an OIDC token: the command's own `mysql_clear_password` response, or
//!    asked for with an AuthSwitchRequest), and must be the session's principal: a session
//!    records one person, so another needs another connection;
//! 3. the user it names must be a role that person may use;
//! 4. sluice changes the backend's user itself with that role's credentials
//!    ([`login::change_user`]) and answers the client with the backend's OK.
//!
//! A refusal is ERR 1045 with what to do, and the session ends (a client whose COM_CHANGE_USER
//! failed holds a connection authenticated as nobody, as with MySQL itself). The backend's
//! auth exchange never reaches the client; the journal never holds a credential or token.

use bytes::Bytes;
use sluice_journal::{AuthInfo, NoteLevel, SessionRecorder};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::{End, Identified, Routed, Shared, Side, err, identify, identify_client, login};
use crate::protocol::mysql::handshake::{ChangeUser, Handshake, parse_change_user};
use crate::protocol::mysql::packet::packet;
use crate::protocol::mysql::response::ResponseMachine;
use crate::tls::Stream;

/// What a re-authentication needs besides the streams.
pub(super) struct Context<'a> {
    pub routed: &'a Routed,
    pub shared: &'a Shared,
    /// The session's principal: the person a COM_CHANGE_USER must still be.
    pub principal: &'a str,
    /// The backend's greeting (its nonce scrambles the new login).
    pub greeting: &'a Handshake,
    pub recorder: &'a SessionRecorder,
}

/// Runs one COM_CHANGE_USER (`payload`, received as packet 0). Ok: the client is logged in as
/// the new role, and `machine` knows the session was reset. Err: why the session ends (a
/// refusal's ERR already sent and journaled).
pub(super) async fn change_user(
    client: &mut Stream,
    server: &mut Stream,
    payload: &[u8],
    ctx: &Context<'_>,
    machine: &mut ResponseMachine,
) -> Result<(), End> {
    let caps = machine.capabilities();
    let request = parse_change_user(payload, caps).map_err(|e| End::Malformed {
        from: Side::Client,
        reason: e.to_string(),
    })?;
    journal_client(ctx, packet(0, &request.without_credentials(caps)).freeze())?;
    let (who, seq) = match identify_again(client, &request, ctx).await? {
        Ok(x) => x,
        Err((refusal, seq)) => return refuse(client, ctx, seq, refusal).await,
    };
    if who.principal.name != ctx.principal {
        let refusal = identify::Refusal::new(
            "28000",
            format!(
                "sluice: this session is {}'s; COM_CHANGE_USER cannot make it {}'s: open a new connection",
                ctx.principal, who.principal.name
            ),
        );
        return refuse(client, ctx, seq, refusal).await;
    }
    let role = match identify::choose_role(&ctx.routed.target, Some(&request.user), &who) {
        Ok(role) => role.clone(),
        Err(refusal) => return refuse(client, ctx, seq, refusal).await,
    };
    let creds = login::Credentials {
        user: &role.user,
        password: role.password.0.as_bytes(),
        database: Some(request.database.as_str()).filter(|d| !d.is_empty()),
    };
    let tls = server.is_tls();
    let changed = login::change_user(
        server,
        ctx.greeting,
        caps,
        &creds,
        request.charset.unwrap_or(u16::from(login::DEFAULT_CHARSET)),
        request.attributes.clone(),
        tls,
        ctx.shared.config.connect_timeout() * 2,
    )
    .await;
    let ok = match changed {
        Ok(l) => l.ok,
        Err(e) => {
            let refusal = identify::Refusal::new(
                "28000",
                format!(
                    "sluice: cannot change to role \"{}\" on target \"{}\": {}",
                    role.name,
                    ctx.routed.target.name,
                    crate::error_chain(&e)
                ),
            );
            let _ = ctx.recorder.note(NoteLevel::Error, refusal.message.clone());
            return refuse(client, ctx, seq, refusal).await;
        }
    };
    // The machine resets the session's prepared statements as the backend did.
    let ok = ok.encode(0x00, caps);
    let placed = machine
        .client(0, payload)
        .and_then(|_| machine.server(&ok).map(|_| ()));
    if let Err(e) = placed {
        return Err(End::Malformed {
            from: Side::Server,
            reason: e.to_string(),
        });
    }
    let ok = packet(seq, &ok).freeze();
    ctx.recorder.server(ok.clone()).map_err(End::Journal)?;
    client.write_all(&ok).await.map_err(|error| End::Io {
        from: Side::Client,
        error,
    })?;
    let _ = ctx.recorder.auth(AuthInfo {
        method: who.method.to_string(),
        role: Some(role.name.clone()),
        backend_user: Some(role.user.clone()),
        client_tls: client.describe(),
        backend_tls: server.describe(),
        expires_ns: who.expires_ns,
    });
    info!(role = %role.name, "COM_CHANGE_USER: now role {}", role.name);
    Ok(())
}

/// Who the client is now, and the sequence id of sluice's next packet to it (the command was
/// packet 0). A client that left or sent a bad reply ends the session as such.
async fn identify_again(
    client: &mut Stream,
    request: &ChangeUser,
    ctx: &Context<'_>,
) -> Result<Identified, End> {
    let recorder = ctx.recorder;
    let identified = identify_client(
        client,
        (request.auth_plugin.as_deref(), &request.auth_response),
        1,
        ctx.routed,
        ctx.shared,
        &mut |from_sluice, bytes| {
            if from_sluice {
                recorder.server(bytes)
            } else {
                recorder.client(bytes, 0)
            }
        },
    )
    .await
    .map_err(End::Journal)?;
    match identified {
        Err((r, _)) if r.code == "08006" => Err(End::ClientClosed),
        Err((r, _)) if r.code == "08P01" => Err(End::Malformed {
            from: Side::Client,
            reason: r.message,
        }),
        other => Ok(other),
    }
}

fn journal_client(ctx: &Context<'_>, bytes: Bytes) -> Result<(), End> {
    ctx.recorder.client(bytes, 0).map_err(End::Journal)
}

/// Sends the refusal (journaled first) and ends the session.
async fn refuse(
    client: &mut Stream,
    ctx: &Context<'_>,
    seq: u8,
    refusal: identify::Refusal,
) -> Result<(), End> {
    warn!(reason = %refusal.message, "COM_CHANGE_USER refused");
    let bytes = err(seq, refusal.mysql_code(), &refusal.message);
    ctx.recorder.server(bytes.clone()).map_err(End::Journal)?;
    let _ = client.write_all(&bytes).await;
    Err(End::Refused(format!(
        "COM_CHANGE_USER refused: {}",
        refusal.message
    )))
}
