//! The agent's control socket: how `sluice requests|approve|deny|grants|request access|revoke|
//! whoami|login|logout|policy reload` reach the running agent, and the client side those
//! commands use.
//!
//! A unix stream socket (`agent.control_socket`, mode 0666: anyone may connect). Each
//! connection carries one request line of JSON ([`ControlRequest`]) and gets one response line
//! ([`ControlResponse`]). The caller is identified by the kernel, never by what it sends: the
//! peer's uid and pid come from `SO_PEERCRED`, and its principal from the same `[[identity]]`
//! rules a database connection gets (uid, or the cgroup the peer process is in). So "nobody
//! approves their own request" holds as long as people have their own uids.
//!
//! Bounded: a request line is at most [`MAX_LINE`] bytes and must arrive within [`IO_TIMEOUT`];
//! connections are served one task each, and the accept loop ends with the agent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_journal::{AccessRequest, Principal, ProcessInfo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::access::Access;
use crate::config::{IdentityConfig, Target};
use crate::policy::{Policy, principal};

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Time a peer has to send its request, and a client waits for the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create the control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reach the agent at {path} (is `sluice agent` running? is `--socket` right?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent at {path} failed")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the agent's answer is not understood: {0}")]
    Protocol(String),
    /// The agent refused the request; the text says why.
    #[error("{0}")]
    Refused(String),
}

/// One request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Who the agent takes the caller for.
    Whoami,
    /// Open requests (pending, deferred, approved but not used yet), or all of them.
    Requests {
        all: bool,
    },
    Approve {
        id: String,
        comment: String,
    },
    Deny {
        id: String,
        reason: String,
    },
    RequestAccess {
        target: String,
        seconds: u64,
        reason: String,
    },
    /// Active just-in-time grants.
    Grants,
    Revoke {
        id: String,
    },
    /// Reload the policy directory (as SIGHUP does).
    Reload,
    /// The issuer and client id `sluice login` runs the device flow against.
    OidcInfo,
    /// `sluice login`: bind the caller's uid to the person these tokens name.
    Login {
        id_token: String,
        refresh_token: Option<String>,
    },
    /// `sluice logout`: forget the caller's binding.
    Logout,
    /// `sluice status`: spool and shipping metrics (Prometheus text).
    Status,
}

/// The agent's answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    /// The caller, as the agent sees it.
    #[serde(default)]
    pub principal: Option<Principal>,
    #[serde(default)]
    pub requests: Vec<AccessRequest>,
    #[serde(default)]
    pub message: Option<String>,
    /// For `whoami` and `login`: how the caller is identified, and until when (ns).
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub expires_ns: Option<u64>,
    /// For `oidc_info`: the issuer and the device-flow client id.
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
}

/// What the control socket needs from the agent.
pub struct ControlContext {
    pub access: Arc<Access>,
    pub identities: Vec<IdentityConfig>,
    pub targets: Vec<Target>,
    pub policy: Option<Arc<Policy>>,
    pub identity: Arc<crate::identity::Identity>,
    /// `[oidc]` issuer and client id, for `sluice login`.
    pub oidc: Option<(String, String)>,
    /// Spool and shipping metrics, for `sluice status`.
    pub ship: Arc<crate::ship::ShipMetrics>,
    /// The journal (its size on disk, for `sluice status`).
    pub journal: sluice_journal::Journal,
}

/// Creates the socket (replacing a stale one), world-connectable.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let fail = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(fail)?;
    Ok(listener)
}

/// Serves the socket until `stop` fires.
pub async fn serve(
    listener: UnixListener,
    ctx: Arc<ControlContext>,
    mut stop: broadcast::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.recv() => return,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &ctx).await {
                warn!(error = %e, "control socket connection failed");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, ctx: &ControlContext) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(rd).take(MAX_LINE as u64 + 1);
    let read = reader.read_until(b'\n', &mut line);
    let response = match tokio::time::timeout(IO_TIMEOUT, read).await {
        Err(_) => refuse("no request within the time limit".into()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if line.len() > MAX_LINE => refuse("request too long".into()),
        Ok(Ok(_)) => match serde_json::from_slice::<ControlRequest>(&line) {
            Err(e) => refuse(format!("bad request: {e}")),
            Ok(ControlRequest::Login {
                id_token,
                refresh_token,
            }) => {
                // Verifying may fetch the issuer's keys: off the runtime's threads.
                let identity = ctx.identity.clone();
                let uid = cred.uid();
                match tokio::task::spawn_blocking(move || {
                    identity.bind(uid, &id_token, refresh_token)
                })
                .await
                {
                    Ok(Ok(v)) => {
                        info!(uid, principal = %v.principal.name, "login bound");
                        ControlResponse {
                            ok: true,
                            principal: Some(v.principal),
                            method: Some("login".into()),
                            expires_ns: Some(v.expires_ns),
                            ..Default::default()
                        }
                    }
                    Ok(Err(e)) => refuse(format!("login refused: {e}")),
                    Err(_) => refuse("login check failed".into()),
                }
            }
            Ok(request) => {
                let (caller, method, expires_ns) = caller(ctx, cred.uid(), cred.gid(), cred.pid());
                let mut r = handle(ctx, &caller, cred.uid(), request);
                if r.ok && r.method.is_none() {
                    r.method = Some(method.into());
                    r.expires_ns = r.expires_ns.or(expires_ns);
                }
                r
            }
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    tokio::time::timeout(IO_TIMEOUT, wr.write_all(&out))
        .await
        .map_err(|_| std::io::Error::other("peer does not read"))??;
    wr.shutdown().await
}

/// The peer's principal: its `sluice login` binding, else the `[[identity]]` rules database
/// connections get (else `uid:<n>`); with how it was found and until when.
fn caller(
    ctx: &ControlContext,
    uid: u32,
    gid: u32,
    pid: Option<i32>,
) -> (Principal, &'static str, Option<u64>) {
    if let Some(v) = ctx.identity.login_for_uid(uid) {
        return (v.principal, "login", Some(v.expires_ns));
    }
    let pid = pid.and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default();
    let cgroup_id = crate::intercept::process_cgroup_id(pid).unwrap_or(0);
    let process = ProcessInfo {
        uid,
        gid,
        pid,
        comm,
        cgroup_id,
        connected_ns: sluice_journal::now_ns(),
    };
    match principal::matching(&ctx.identities, &process) {
        Some(p) => (p, "workload", None),
        None => (principal::resolve(&[], Some(&process)), "uid", None),
    }
}

fn refuse(error: String) -> ControlResponse {
    ControlResponse {
        ok: false,
        error: Some(error),
        ..Default::default()
    }
}

fn handle(
    ctx: &ControlContext,
    caller: &Principal,
    uid: u32,
    request: ControlRequest,
) -> ControlResponse {
    let done = |requests: Vec<AccessRequest>, message: Option<String>| ControlResponse {
        ok: true,
        principal: Some(caller.clone()),
        requests,
        message,
        ..Default::default()
    };
    let result = match request {
        ControlRequest::Whoami => Ok(done(Vec::new(), None)),
        ControlRequest::Requests { all } => Ok(done(ctx.access.list(all), None)),
        ControlRequest::Grants => Ok(done(ctx.access.grants(), None)),
        ControlRequest::Approve { id, comment } => ctx
            .access
            .decide(&id, caller, true, &comment)
            .map(|r| {
                info!(request = %r.id, by = %caller.name, "request approved");
                done(vec![r], None)
            }),
        ControlRequest::Deny { id, reason } => {
            ctx.access.decide(&id, caller, false, &reason).map(|r| {
                info!(request = %r.id, by = %caller.name, "request denied");
                done(vec![r], None)
            })
        }
        ControlRequest::Revoke { id } => ctx.access.revoke(&id, caller).map(|r| {
            info!(request = %r.id, by = %caller.name, "revoked");
            done(vec![r], None)
        }),
        ControlRequest::RequestAccess {
            target,
            seconds,
            reason,
        } => match ctx.targets.iter().find(|t| t.name == target) {
            None => Err(crate::access::AccessError::UnknownTarget(target)),
            Some(t) => ctx
                .access
                .request_access(caller, t, seconds, &reason)
                .map(|r| {
                    info!(request = %r.id, by = %caller.name, target = %r.target, seconds, "access requested");
                    done(vec![r], None)
                }),
        },
        ControlRequest::OidcInfo => {
            return match &ctx.oidc {
                None => refuse(
                    "this agent has no [oidc] issuer configured, so there is nothing to log in to"
                        .into(),
                ),
                Some((issuer, client_id)) => ControlResponse {
                    ok: true,
                    issuer: Some(issuer.clone()),
                    client_id: Some(client_id.clone()),
                    ..Default::default()
                },
            };
        }
        ControlRequest::Logout => {
            return match ctx.identity.unbind(uid) {
                Some(p) => {
                    info!(uid, principal = %p.name, "logged out");
                    ControlResponse {
                        ok: true,
                        principal: Some(p),
                        message: Some("logged out".into()),
                        method: Some("login".into()),
                        ..Default::default()
                    }
                }
                None => refuse(format!("uid {uid} is not logged in")),
            };
        }
        // Handled before a caller is resolved (it needs a blocking check).
        ControlRequest::Login { .. } => return refuse("login is handled elsewhere".into()),
        ControlRequest::Status => {
            // A RocksDB property read; the backlog and lag are at most 2 s old
            // (`ship::refresh_metrics`).
            ctx.ship.spool_bytes.store(
                ctx.journal.spool_bytes(),
                std::sync::atomic::Ordering::Relaxed,
            );
            return done(Vec::new(), Some(ctx.ship.render()));
        }
        ControlRequest::Reload => {
            return match &ctx.policy {
                None => refuse("the agent runs without policies (no agent.policy_dir)".into()),
                Some(p) => match p.reload() {
                    Ok(n) => {
                        info!(policies = n, "policies reloaded on request");
                        done(Vec::new(), Some(format!("{n} policies in force")))
                    }
                    Err(e) => refuse(crate::error_chain(&e)),
                },
            };
        }
    };
    result.unwrap_or_else(|e| refuse(e.to_string()))
}

/// Sends one request to the agent at `path` and returns its answer; a refusal is an error.
pub async fn call(path: &Path, request: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let exchange = async {
        let mut stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: path.to_path_buf(),
                    source,
                })?;
        let mut line =
            serde_json::to_vec(request).map_err(|e| ControlError::Protocol(e.to_string()))?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(io)?;
        let mut answer = Vec::new();
        let mut reader = BufReader::new(stream).take(16 << 20);
        reader.read_until(b'\n', &mut answer).await.map_err(io)?;
        serde_json::from_slice::<ControlResponse>(&answer)
            .map_err(|e| ControlError::Protocol(e.to_string()))
    };
    let response = tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| ControlError::Timeout(IO_TIMEOUT))??;
    if !response.ok {
        return Err(ControlError::Refused(
            response
                .error
                .unwrap_or_else(|| "refused without a reason".into()),
        ));
    }
    Ok(response)
}
