//! `auth = "sluice"`, the part every protocol shares: who is connecting, and which of the
//! target's roles they may use. The protocol modules only ask for the token in their own
//! words (PostgreSQL: AuthenticationCleartextPassword; MySQL: an AuthSwitchRequest to
//! `mysql_clear_password`) and word the refusals in their own error format.
//!
//! Who is connecting, in this order:
//! 1. a uid bound by `sluice login` (the connect()'s uid from the eBPF record): no password;
//! 2. a workload identity (`[[identity]]` by uid or cgroup): no password;
//! 3. otherwise an OIDC token as the password, accepted only over TLS or from this host
//!    (every intercepted connection is local), checked by [`crate::identity`].
//!
//! A refusal carries a SQLSTATE (28000: no identity or role; 28P01: a bad token, or one over
//! [`MAX_TOKEN_BYTES`]; 08P01: a protocol error; 08006: the client went away) and a sentence saying what to do. MySQL maps
//! the SQLSTATE to its error numbers ([`Refusal::mysql_code`]).

use sluice_journal::{Principal, ProcessInfo};

use super::Shared;
use crate::config::{Role, Target};
pub(crate) use crate::identity::oidc::MAX_TOKEN_BYTES;
use crate::identity::oidc::TokenError;

/// How the client was identified.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    pub principal: Principal,
    /// "login", "workload" or "token".
    pub method: &'static str,
    /// When the identity's token expires (ns since the epoch), if it came from one.
    pub expires_ns: Option<u64>,
}

/// A refusal: the SQLSTATE and the sentence the client gets (also journaled).
#[derive(Debug, Clone)]
pub(crate) struct Refusal {
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// The MySQL error number and SQLSTATE for this refusal: 1045 (access denied, 28000) for
    /// identity, token and role refusals; 1043 (bad handshake, 08S01) for protocol errors.
    pub fn mysql_code(&self) -> (u16, &'static str) {
        match self.code {
            "08P01" | "08006" => (1043, "08S01"),
            _ => (1045, "28000"),
        }
    }
}

/// The identity that needs no password: a `sluice login` binding of the connecting uid, then
/// a workload identity. None: the client must present a token.
pub(crate) fn without_password(shared: &Shared, process: Option<&ProcessInfo>) -> Option<Who> {
    let p = process?;
    if let Some(v) = shared.identity.login_for_uid(p.uid) {
        return Some(Who {
            principal: v.principal,
            method: "login",
            expires_ns: Some(v.expires_ns),
        });
    }
    crate::policy::principal::matching(&shared.identities, p).map(|principal| Who {
        principal,
        method: "workload",
        expires_ns: None,
    })
}

/// May this client send a token? `local_or_tls`: the connection is TLS or from this host;
/// `tls_hint`: how the client turns TLS on (e.g. "connect with sslmode=require").
pub(crate) fn may_send_token(
    shared: &Shared,
    process: Option<&ProcessInfo>,
    local_or_tls: bool,
    tls_hint: &str,
) -> Result<(), Refusal> {
    if !shared.identity.accepts_tokens() {
        return Err(Refusal::new(
            "28000",
            format!(
                "sluice: no identity for {}: run `sluice login` on this host first",
                who_text(process)
            ),
        ));
    }
    if !local_or_tls {
        return Err(Refusal::new(
            "28000",
            format!("sluice: send your token only over TLS: {tls_hint}"),
        ));
    }
    Ok(())
}

/// The refusal of a token of `len` bytes, over [`MAX_TOKEN_BYTES`]: found by a protocol's
/// size cap before the token is read whole, worded as the validator words it.
pub(crate) fn token_too_large(len: usize) -> Refusal {
    let e = TokenError::TooLarge {
        len,
        max: MAX_TOKEN_BYTES,
    };
    Refusal::new("28P01", format!("sluice: {e}"))
}

/// Checks `token` (the client's password) against the identity provider's keys, off the
/// async threads.
pub(crate) async fn verify_token(
    shared: &Shared,
    process: Option<&ProcessInfo>,
    token: String,
) -> Result<Who, Refusal> {
    if token.is_empty() {
        return Err(Refusal::new(
            "28000",
            format!(
                "sluice: no identity for {}: run `sluice login`, or give an OIDC token as the password",
                who_text(process)
            ),
        ));
    }
    let identity = shared.identity.clone();
    let verified = tokio::task::spawn_blocking(move || identity.verify_token(&token))
        .await
        .map_err(|_| Refusal::new("28P01", "sluice: token check failed"))?
        .map_err(|e| Refusal::new("28P01", format!("sluice: {e}")))?;
    Ok(Who {
        principal: verified.principal,
        method: "token",
        expires_ns: Some(verified.expires_ns),
    })
}

fn who_text(process: Option<&ProcessInfo>) -> String {
    match process {
        Some(p) => format!("uid {} ({})", p.uid, p.comm),
        None => "this connection".into(),
    }
}

/// The role the client asked for (its user name), if `who` may use it on `target`.
pub(crate) fn choose_role<'t>(
    target: &'t Target,
    requested: Option<&str>,
    who: &Who,
) -> Result<&'t Role, Refusal> {
    let Some(requested) = requested.filter(|r| !r.is_empty()) else {
        return Err(Refusal::new(
            "28000",
            "sluice: the connection names no database role (user)",
        ));
    };
    let names: Vec<&str> = target.roles.iter().map(|r| r.name.as_str()).collect();
    let Some(role) = target.roles.iter().find(|r| r.name == requested) else {
        return Err(Refusal::new(
            "28000",
            format!(
                "sluice: target \"{}\" has no role \"{requested}\" (its roles: {})",
                target.name,
                names.join(", ")
            ),
        ));
    };
    if !role.allows(&who.principal.name, &who.principal.groups) {
        let usable: Vec<&str> = target
            .roles
            .iter()
            .filter(|r| r.allows(&who.principal.name, &who.principal.groups))
            .map(|r| r.name.as_str())
            .collect();
        return Err(Refusal::new(
            "28000",
            format!(
                "sluice: {} may not use role \"{requested}\" on target \"{}\" (roles you may use: {})",
                who.principal.name,
                target.name,
                if usable.is_empty() {
                    "none".to_string()
                } else {
                    usable.join(", ")
                }
            ),
        ));
    }
    Ok(role)
}
