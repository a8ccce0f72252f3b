//! The journal's record model: what a session is made of, independent of storage.
//!
//! Wire data is kept as the exact bytes that crossed the proxy (`Body::Client`, `Body::Server`):
//! recording is a copy, and replay/export decode later with the protocol's own decoder, so a
//! better parser can always be re-run on exactly what was sent. Everything the agent itself
//! decided or observed (a refusal, a malformed message, an unreachable backend) is a `Note`.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A recorded session's id: a UUIDv7, so ids sort by start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionId(pub Uuid);

impl SessionId {
    pub fn new() -> SessionId {
        SessionId(Uuid::now_v7())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for SessionId {
    fn default() -> Self {
        SessionId::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for SessionId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(SessionId)
    }
}

/// Who opened the connection, as the kernel saw it in `connect()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// When the process called connect(), in nanoseconds since the Unix epoch.
    pub connected_ns: u64,
}

/// The first event of every session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStart {
    /// The configured target's name.
    pub target: String,
    /// "postgres", "mysql", ...
    pub protocol: String,
    /// Where the client was going (the address it passed to connect()).
    pub orig_dst: String,
    /// The client's address as the proxy saw it.
    pub client_addr: String,
    /// Present when the connection was intercepted by eBPF; absent on an explicit listener.
    pub process: Option<ProcessInfo>,
    /// The protocol's own startup facts (PostgreSQL: user, database, application_name, ...).
    pub params: Vec<(String, String)>,
    /// Who policy treated the client as (`None` when no policy is configured). Last field:
    /// postcard is positional, new fields go at the end.
    pub principal: Option<Principal>,
}

/// The identity policy decided for: a name and the groups it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub name: String,
    pub groups: Vec<String>,
}

/// What policy decided for one statement (or the session's `connect`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The statement text as the client sent it (empty for `connect`).
    pub sql: String,
    /// The action asked for: a statement kind ("select", "ddl", ...) or "connect".
    pub action: String,
    /// A one-line summary of the statement facts policy saw.
    pub facts: String,
    /// True when the statement was forwarded.
    pub allowed: bool,
    /// Ids of the policies that decided it (`@id` annotations, else Cedar's policy ids).
    pub policies: Vec<String>,
    /// The sentence the client was given on a deny (empty when allowed).
    pub reason: String,
}

impl SessionStart {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoteLevel {
    Info,
    Warning,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    Client,
    Server,
}

/// One recorded event's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    Start(SessionStart),
    /// Whole messages from the client, as received (credentials redacted), before forwarding.
    Client(Bytes),
    /// Whole messages from the server, exactly as forwarded to the client, before forwarding.
    Server(Bytes),
    /// Something the agent decided or observed.
    Note {
        level: NoteLevel,
        text: String,
    },
    /// The last event of a session.
    End {
        reason: String,
    },
    /// A policy decision (added after `End`: postcard encodes the variant index).
    Decision(Decision),
    /// A statement held for approval, and later what became of it (added after `Decision`).
    Review(Review),
    /// How the session was authenticated and secured, once its backend login is done (added
    /// after `Review`). Never holds a credential.
    Auth(AuthInfo),
    /// What masking changed in one response (added after `Auth`). Never holds a value.
    Masked(MaskReport),
}

/// The masking of one response (result set or COPY): what fired where, how many values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskReport {
    pub fired: Vec<MaskFiring>,
}

/// One rule or detector on one column of a response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskFiring {
    /// The result column's name.
    pub column: String,
    /// `column:<rule>` or `detector:<name>`.
    pub rule: String,
    /// The strategy applied (redact, partial, hash, null).
    pub strategy: String,
    /// Values masked.
    pub values: u64,
}

/// How a session was authenticated, and the TLS of both legs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthInfo {
    /// "passthrough" (the database authenticated the client), "login", "workload" or "token".
    pub method: String,
    /// The database role the client asked for (sluice authentication only).
    pub role: Option<String>,
    /// The backend login sluice used for it.
    pub backend_user: Option<String>,
    /// "plain", or the TLS version and cipher suite toward the client.
    pub client_tls: String,
    /// The same toward the backend.
    pub backend_tls: String,
    /// When the identity's token expires (ns since the epoch), for token and login identities.
    pub expires_ns: Option<u64>,
}

/// A held statement's part in a session: held, then approved, denied, timed out or abandoned.
/// The request itself (who asked, who decided, when) is the [`AccessRequest`] of the same id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// The request id people use (`sluice approve <id>`).
    pub request: String,
    pub state: RequestState,
}

/// A request for a person's approval: a held statement, or just-in-time access to a target.
/// Stored in the journal's `requests` family; rewritten (same key) as its state changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRequest {
    /// Short id people type (8 hex digits; a unique prefix is enough).
    pub id: String,
    pub created_ns: u64,
    pub requester: Principal,
    pub target: String,
    pub kind: RequestKind,
    /// For a statement: the policy's reason for holding it. For access: the requester's reason.
    pub reason: String,
    /// The group whose members may decide (never the requester).
    pub approvers: String,
    pub state: RequestState,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    /// A statement held in a session until someone decides.
    Statement {
        session: SessionId,
        sql: String,
        action: String,
        policies: Vec<String>,
    },
    /// Just-in-time access: a grant on the target for `seconds`, starting at approval.
    Access { seconds: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestState {
    Pending,
    Approved {
        by: String,
        comment: String,
        at_ns: u64,
        /// For access requests: when the grant ends.
        expires_ns: Option<u64>,
    },
    Denied {
        by: String,
        reason: String,
        at_ns: u64,
    },
    /// Nobody decided within the hold timeout (statements only).
    TimedOut {
        at_ns: u64,
    },
    /// The waiting session went away (client closed, agent stopped or restarted).
    Abandoned {
        at_ns: u64,
        why: String,
    },
    /// An approved grant taken back before its expiry, or an unused approval ([`Ready`]) taken
    /// back before a re-run used it.
    ///
    /// [`Ready`]: RequestState::Ready
    Revoked {
        by: String,
        at_ns: u64,
    },
    /// Still undecided, but no session waits for it any more: a protocol without a way to keep a
    /// client waiting (MySQL) gave up at the hold timeout and told the client to run the same
    /// statement again once it is approved. Survives a restart (added after `Revoked`).
    Deferred {
        at_ns: u64,
    },
    /// A deferred statement's approval, not used yet: the next run of the same statement by the
    /// same principal on the same target, in any session, uses it (added after `Deferred`).
    Ready {
        by: String,
        comment: String,
        at_ns: u64,
    },
    /// A [`Ready`] approval that a run of the statement used, once (added after `Ready`).
    ///
    /// [`Ready`]: RequestState::Ready
    Used {
        by: String,
        comment: String,
        approved_ns: u64,
        at_ns: u64,
        /// The session the statement ran in.
        session: SessionId,
    },
}

impl RequestState {
    /// One word for listings.
    pub fn word(&self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved { .. } => "approved",
            RequestState::Denied { .. } => "denied",
            RequestState::TimedOut { .. } => "timed-out",
            RequestState::Abandoned { .. } => "abandoned",
            RequestState::Revoked { .. } => "revoked",
            RequestState::Deferred { .. } => "deferred",
            RequestState::Ready { .. } => "ready",
            RequestState::Used { .. } => "used",
        }
    }

    /// Still waiting for something: a decision (pending, deferred) or a re-run (ready).
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            RequestState::Pending | RequestState::Deferred { .. } | RequestState::Ready { .. }
        )
    }

    /// Who decided, when a person did.
    pub fn by(&self) -> Option<&str> {
        match self {
            RequestState::Approved { by, .. }
            | RequestState::Denied { by, .. }
            | RequestState::Revoked { by, .. }
            | RequestState::Ready { by, .. }
            | RequestState::Used { by, .. } => Some(by),
            _ => None,
        }
    }

    /// A short sentence: "approved by bob: ok", "timed out", ...
    pub fn describe(&self) -> String {
        let with = |head: String, text: &str| {
            if text.is_empty() {
                head
            } else {
                format!("{head}: {text}")
            }
        };
        match self {
            RequestState::Pending => "held for approval".into(),
            RequestState::Approved { by, comment, .. } => {
                with(format!("approved by {by}"), comment)
            }
            RequestState::Denied { by, reason, .. } => with(format!("denied by {by}"), reason),
            RequestState::TimedOut { .. } => "not decided in time".into(),
            RequestState::Abandoned { why, .. } => with("abandoned".into(), why),
            RequestState::Revoked { by, .. } => format!("revoked by {by}"),
            RequestState::Deferred { .. } => {
                "not decided while the session waited; once approved, the same statement runs once when run again".into()
            }
            RequestState::Ready { by, comment, .. } => with(
                format!("approved by {by}, runs once when the same statement is run again"),
                comment,
            ),
            RequestState::Used { by, session, .. } => {
                format!("approved by {by}, used in session {session}")
            }
        }
    }
}

/// One event as stored: its place in the session and when it happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub session: SessionId,
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub body: Body,
}

/// The per-session index entry that `sluice sessions` lists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: SessionId,
    pub start: SessionStart,
    pub started_ns: u64,
    /// None while the session is open, or when its agent died before sealing it.
    pub ended_ns: Option<u64>,
    pub end_reason: Option<String>,
    /// Statements the client sent (simple queries and extended-protocol executions).
    pub statements: u64,
    pub client_bytes: u64,
    pub server_bytes: u64,
    pub events: u64,
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration written as `90s`, `30m`, `2h`, `1h30m`, `1h 30m`, `7d` or `2w`, in seconds; the
/// error says what is wrong with the text.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let mut total: u64 = 0;
    let mut number = String::new();
    let mut any = false;
    for c in text.chars().filter(|c| !c.is_whitespace()) {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {c:?} (use s, m, h, d or w)"
                ));
            }
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?}: a number must come before {c:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        number.clear();
        any = true;
    }
    if !number.is_empty() || !any {
        return Err(format!("{text:?}: give a unit, e.g. 30m or 2h"));
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_parse_with_units_and_refuse_without() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("1h 30m"), Ok(5400));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        assert_eq!(parse_duration("2w"), Ok(14 * 86_400));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
    }
}
