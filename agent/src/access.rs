//! Requests for a person's decision, and the just-in-time grants approved requests create.
//!
//! Two kinds of request share one life cycle (`journal::AccessRequest`):
//! - a **held statement**: a policy annotated `@approval("group")` denied it; its session waits
//!   on [`Access::hold`]'s receiver until someone decides, the hold times out, or the session
//!   goes away. A protocol that cannot keep its client waiting past the timeout (MySQL has no
//!   mid-query notice) *defers* the request instead of timing it out: it stays open for a
//!   decision, and once approved the same principal's next run of the same statement text on
//!   the same target, in any session, uses the approval, once ([`Access::take_ready`]);
//! - **just-in-time access** (`sluice request access`): an approved one is a grant that makes
//!   `context.jit` true for that principal on that target until it expires or is revoked.
//!
//! Rules: only members of the request's approver group decide, and never the requester; a
//! request is decided once, and a deferred statement's approval is used once. Every state
//! change is written to the journal's `requests` family before it takes effect (a waiting
//! session is woken, a grant counts, a re-run is let through), so what the agent acted on is
//! what survives a restart. At start, statements still pending belong to sessions that no
//! longer exist and are marked abandoned; deferred statements and unused approvals belong to
//! no session and stay, like access requests; grants stay until they expire.
//!
//! ```text
//! statement:  Pending --decide--> Approved | Denied          (the waiting session runs it or not)
//!             Pending --settle--> TimedOut | Abandoned       (the session stopped waiting)
//!             Pending --settle--> Deferred --decide--> Ready --take_ready--> Used
//!                                          \--decide--> Denied   \--revoke--> Revoked
//!             Deferred --hold (same principal, target, text)--> Pending (waited on again)
//! access:     Pending --decide--> Approved (a grant until expiry) --revoke--> Revoked
//! ```
//!
//! Memory: every request is kept in memory (they are few: people make them); the grants that
//! policy asks about per statement are a separate short list, checked under a mutex without
//! allocating. This module never touches a socket; the control socket and the proxy call it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sluice_journal::{
    AccessRequest, Journal, JournalError, Principal, RequestKind, RequestState, SessionId, now_ns,
};
use tokio::sync::oneshot;

/// Shortest grant a request may ask for.
pub const MIN_GRANT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("no request matches {0:?} (see `sluice requests --all`)")]
    NoSuchRequest(String),
    #[error("{prefix:?} matches several requests: {candidates}")]
    Ambiguous { prefix: String, candidates: String },
    #[error("request {id} is already {state}")]
    NotPending { id: String, state: &'static str },
    #[error(
        "only members of group \"{group}\" may decide request {id}, and {who} is not one (see `sluice whoami`)"
    )]
    NotApprover {
        id: String,
        group: String,
        who: String,
    },
    #[error("{who} made request {id} and cannot decide it: another member of \"{group}\" must")]
    OwnRequest {
        id: String,
        who: String,
        group: String,
    },
    #[error("target \"{0}\" takes no just-in-time requests (its config has no `jit_approvers`)")]
    NoJit(String),
    #[error("no target named \"{0}\"")]
    UnknownTarget(String),
    #[error("a grant lasts between {min} and {max} seconds on this target; {asked} was asked")]
    Duration { asked: u64, min: u64, max: u64 },
    #[error("grant {id} is not active")]
    NotActive { id: String },
    #[error("only the grantee or a member of \"{group}\" may revoke grant {id}")]
    NotRevoker { id: String, group: String },
    #[error("a reason is required")]
    NoReason,
    #[error("cannot record the request")]
    Journal(#[from] JournalError),
}

/// What a person decided for a held statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved { by: String, comment: String },
    Denied { by: String, reason: String },
}

/// An active grant, as policy asks about it.
#[derive(Debug, Clone)]
struct Grant {
    principal: String,
    target: String,
    expires_ns: u64,
}

struct Inner {
    requests: Vec<AccessRequest>,
    waiters: HashMap<String, oneshot::Sender<Outcome>>,
    grants: Vec<Grant>,
}

/// The agent's requests and grants. Shared by every connection and the control socket.
pub struct Access {
    journal: Journal,
    inner: Mutex<Inner>,
}

/// What a held statement is.
pub struct HoldRequest<'a> {
    pub session: SessionId,
    pub requester: &'a Principal,
    pub target: &'a str,
    pub sql: &'a str,
    pub action: &'a str,
    pub policies: &'a [String],
    pub reason: &'a str,
    pub approvers: &'a str,
}

impl Access {
    /// Loads the journal's requests; statements left pending by a previous run are abandoned.
    pub fn open(journal: Journal) -> Result<Access, AccessError> {
        let mut requests = journal.requests()?;
        for r in requests.iter_mut() {
            if r.state == RequestState::Pending && matches!(r.kind, RequestKind::Statement { .. }) {
                r.state = RequestState::Abandoned {
                    at_ns: now_ns(),
                    why: "the agent stopped while the statement was held".into(),
                };
                journal.put_request(r)?;
            }
        }
        let grants = requests.iter().filter_map(grant_of).collect();
        Ok(Access {
            journal,
            inner: Mutex::new(Inner {
                requests,
                waiters: HashMap::new(),
                grants,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic mid-update of plain data; the data stays usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a held statement and returns its request and the receiver its session waits on.
    /// The same principal's deferred request for the same statement text on the same target is
    /// waited on again rather than doubled (its approvers see one request, however often the
    /// statement is retried before they decide).
    pub fn hold(
        &self,
        h: HoldRequest<'_>,
    ) -> Result<(AccessRequest, oneshot::Receiver<Outcome>), AccessError> {
        let mut inner = self.lock();
        let deferred = inner.requests.iter().position(|r| {
            matches!(r.state, RequestState::Deferred { .. })
                && same_statement(r, &h.requester.name, h.target, h.sql)
        });
        if let Some(i) = deferred {
            let mut resumed = inner.requests[i].clone();
            resumed.state = RequestState::Pending;
            self.journal.put_request(&resumed)?;
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(resumed.id.clone(), tx);
            inner.requests[i] = resumed.clone();
            return Ok((resumed, rx));
        }
        drop(inner);
        let request = AccessRequest {
            id: new_id(),
            created_ns: now_ns(),
            requester: h.requester.clone(),
            target: h.target.to_string(),
            kind: RequestKind::Statement {
                session: h.session,
                sql: h.sql.to_string(),
                action: h.action.to_string(),
                policies: h.policies.to_vec(),
            },
            reason: h.reason.to_string(),
            approvers: h.approvers.to_string(),
            state: RequestState::Pending,
        };
        self.journal.put_request(&request)?;
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.requests.push(request.clone());
        inner.waiters.insert(request.id.clone(), tx);
        Ok((request, rx))
    }

    /// Asks for just-in-time access to `target` for `seconds`.
    pub fn request_access(
        &self,
        requester: &Principal,
        target: &crate::config::Target,
        seconds: u64,
        reason: &str,
    ) -> Result<AccessRequest, AccessError> {
        let Some(approvers) = &target.jit_approvers else {
            return Err(AccessError::NoJit(target.name.clone()));
        };
        let max = target.jit_max.as_secs();
        if seconds < MIN_GRANT.as_secs() || seconds > max {
            return Err(AccessError::Duration {
                asked: seconds,
                min: MIN_GRANT.as_secs(),
                max,
            });
        }
        if reason.trim().is_empty() {
            return Err(AccessError::NoReason);
        }
        let request = AccessRequest {
            id: new_id(),
            created_ns: now_ns(),
            requester: requester.clone(),
            target: target.name.clone(),
            kind: RequestKind::Access { seconds },
            reason: reason.to_string(),
            approvers: approvers.clone(),
            state: RequestState::Pending,
        };
        self.journal.put_request(&request)?;
        self.lock().requests.push(request.clone());
        Ok(request)
    }

    /// A person's decision on a pending request (`id` may be a unique prefix).
    pub fn decide(
        &self,
        id: &str,
        by: &Principal,
        approve: bool,
        text: &str,
    ) -> Result<AccessRequest, AccessError> {
        if !approve && text.trim().is_empty() {
            return Err(AccessError::NoReason);
        }
        let mut inner = self.lock();
        let i = find(&inner.requests, id)?;
        let r = &inner.requests[i];
        let deferred = matches!(r.state, RequestState::Deferred { .. });
        if r.state != RequestState::Pending && !deferred {
            return Err(AccessError::NotPending {
                id: r.id.clone(),
                state: r.state.word(),
            });
        }
        if !is_approver(by, &r.approvers) {
            return Err(AccessError::NotApprover {
                id: r.id.clone(),
                group: r.approvers.clone(),
                who: by.name.clone(),
            });
        }
        if by.name == r.requester.name {
            return Err(AccessError::OwnRequest {
                id: r.id.clone(),
                who: by.name.clone(),
                group: r.approvers.clone(),
            });
        }
        let at_ns = now_ns();
        let mut updated = r.clone();
        updated.state = if approve && deferred {
            // Nobody waits: the approval waits for the statement to be run again.
            RequestState::Ready {
                by: by.name.clone(),
                comment: text.to_string(),
                at_ns,
            }
        } else if approve {
            let expires_ns = match updated.kind {
                RequestKind::Access { seconds } => {
                    Some(at_ns.saturating_add(seconds.saturating_mul(1_000_000_000)))
                }
                RequestKind::Statement { .. } => None,
            };
            RequestState::Approved {
                by: by.name.clone(),
                comment: text.to_string(),
                at_ns,
                expires_ns,
            }
        } else {
            RequestState::Denied {
                by: by.name.clone(),
                reason: text.to_string(),
                at_ns,
            }
        };
        // Recorded before it takes effect.
        self.journal.put_request(&updated)?;
        if let Some(g) = grant_of(&updated) {
            inner.grants.retain(|g| g.expires_ns > at_ns);
            inner.grants.push(g);
        }
        if let Some(tx) = inner.waiters.remove(&updated.id) {
            let outcome = if approve {
                Outcome::Approved {
                    by: by.name.clone(),
                    comment: text.to_string(),
                }
            } else {
                Outcome::Denied {
                    by: by.name.clone(),
                    reason: text.to_string(),
                }
            };
            // The session may have just given up; its own `settle` then finds it decided.
            let _ = tx.send(outcome);
        }
        inner.requests[i] = updated.clone();
        Ok(updated)
    }

    /// A held statement's session stopped waiting (timeout, client gone, shutdown). Returns the
    /// outcome if someone decided in the meantime (the session must honour it), else records
    /// `state` (TimedOut, Abandoned, or Deferred to keep the request open for a re-run) and
    /// returns None.
    pub fn settle(&self, id: &str, state: RequestState) -> Result<Option<Outcome>, AccessError> {
        let mut inner = self.lock();
        inner.waiters.remove(id);
        let Some(i) = inner.requests.iter().position(|r| r.id == id) else {
            return Err(AccessError::NoSuchRequest(id.to_string()));
        };
        match &inner.requests[i].state {
            RequestState::Pending => {}
            RequestState::Approved { by, comment, .. } => {
                return Ok(Some(Outcome::Approved {
                    by: by.clone(),
                    comment: comment.clone(),
                }));
            }
            RequestState::Denied { by, reason, .. } => {
                return Ok(Some(Outcome::Denied {
                    by: by.clone(),
                    reason: reason.clone(),
                }));
            }
            _ => return Ok(None),
        }
        let mut updated = inner.requests[i].clone();
        updated.state = state;
        self.journal.put_request(&updated)?;
        inner.requests[i] = updated;
        Ok(None)
    }

    /// A run of `sql` by `principal` on `target` that an approval policy would hold: uses the
    /// oldest unused approval of a deferred request for exactly that statement, if there is one.
    /// The use is recorded before this returns (so before the statement is forwarded), and a
    /// second run finds nothing. Err: the use cannot be recorded (the caller holds or denies).
    pub fn take_ready(
        &self,
        principal: &str,
        target: &str,
        sql: &str,
        session: SessionId,
    ) -> Result<Option<AccessRequest>, AccessError> {
        let mut inner = self.lock();
        let Some(i) = inner.requests.iter().position(|r| {
            matches!(r.state, RequestState::Ready { .. })
                && same_statement(r, principal, target, sql)
        }) else {
            return Ok(None);
        };
        let mut used = inner.requests[i].clone();
        let RequestState::Ready { by, comment, at_ns } = used.state else {
            return Ok(None);
        };
        used.state = RequestState::Used {
            by,
            comment,
            approved_ns: at_ns,
            at_ns: now_ns(),
            session,
        };
        self.journal.put_request(&used)?;
        inner.requests[i] = used.clone();
        Ok(Some(used))
    }

    /// Takes back an active grant, or an approval no re-run has used yet: its requester or a
    /// member of its approver group may.
    pub fn revoke(&self, id: &str, by: &Principal) -> Result<AccessRequest, AccessError> {
        let mut inner = self.lock();
        let i = find(&inner.requests, id)?;
        let r = &inner.requests[i];
        let active = matches!(r.state, RequestState::Ready { .. })
            || matches!(r.state, RequestState::Approved { expires_ns: Some(e), .. } if e > now_ns());
        if !active {
            return Err(AccessError::NotActive { id: r.id.clone() });
        }
        if r.requester.name != by.name && !is_approver(by, &r.approvers) {
            return Err(AccessError::NotRevoker {
                id: r.id.clone(),
                group: r.approvers.clone(),
            });
        }
        let mut updated = r.clone();
        updated.state = RequestState::Revoked {
            by: by.name.clone(),
            at_ns: now_ns(),
        };
        self.journal.put_request(&updated)?;
        inner.requests[i] = updated.clone();
        // Other grants of the same principal and target stay.
        inner.grants = inner.requests.iter().filter_map(grant_of).collect();
        Ok(updated)
    }

    /// Does `principal` hold an unexpired grant for `target`? Asked per statement, so it only
    /// reads (expired grants are dropped when a grant is added or revoked).
    pub fn has_grant(&self, principal: &str, target: &str) -> bool {
        let now = now_ns();
        self.lock()
            .grants
            .iter()
            .any(|g| g.expires_ns > now && g.principal == principal && g.target == target)
    }

    /// Requests, oldest first: the open ones (pending, deferred, approved but not used yet), or
    /// all.
    pub fn list(&self, all: bool) -> Vec<AccessRequest> {
        self.lock()
            .requests
            .iter()
            .filter(|r| all || r.state.is_open())
            .cloned()
            .collect()
    }

    /// The approved access requests whose grant has not expired or been revoked.
    pub fn grants(&self) -> Vec<AccessRequest> {
        let now = now_ns();
        self.lock()
            .requests
            .iter()
            .filter(|r| grant_of(r).is_some_and(|g| g.expires_ns > now))
            .cloned()
            .collect()
    }
}

/// Marks a held statement abandoned if its session stops waiting without settling it: the
/// waiting future is dropped (agent shutdown, the other direction ended) or returns early (the
/// client hung up). [`HoldGuard::disarm`] once the session settled the request itself.
pub struct HoldGuard<'a> {
    access: &'a Access,
    request: Option<String>,
}

impl<'a> HoldGuard<'a> {
    pub fn new(access: &'a Access, request: &str) -> HoldGuard<'a> {
        HoldGuard {
            access,
            request: Some(request.to_string()),
        }
    }

    pub fn disarm(&mut self) {
        self.request = None;
    }
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.request.take() {
            let state = RequestState::Abandoned {
                at_ns: now_ns(),
                why: "the session ended while the statement was held".into(),
            };
            if let Err(e) = self.access.settle(&id, state) {
                tracing::warn!(request = %id, error = %e, "cannot mark a held statement abandoned");
            }
        }
    }
}

/// Is `who` a member of one of `approvers` (one group, or several separated by commas:
/// `@approval("dba, sre")`)?
fn is_approver(who: &Principal, approvers: &str) -> bool {
    approvers
        .split(',')
        .map(str::trim)
        .any(|g| !g.is_empty() && who.groups.iter().any(|m| m == g))
}

/// Is `r` a held statement of `principal`'s with exactly this text on `target`?
fn same_statement(r: &AccessRequest, principal: &str, target: &str, sql: &str) -> bool {
    matches!(&r.kind, RequestKind::Statement { sql: s, .. } if s == sql)
        && r.requester.name == principal
        && r.target == target
}

fn grant_of(r: &AccessRequest) -> Option<Grant> {
    match (&r.kind, &r.state) {
        (
            RequestKind::Access { .. },
            RequestState::Approved {
                expires_ns: Some(e),
                ..
            },
        ) if *e > now_ns() => Some(Grant {
            principal: r.requester.name.clone(),
            target: r.target.clone(),
            expires_ns: *e,
        }),
        _ => None,
    }
}

/// The request `id` names: exactly, or as the unique prefix of one.
fn find(requests: &[AccessRequest], id: &str) -> Result<usize, AccessError> {
    let id = id.trim().to_ascii_lowercase();
    if id.is_empty() {
        return Err(AccessError::NoSuchRequest(id));
    }
    if let Some(i) = requests.iter().position(|r| r.id == id) {
        return Ok(i);
    }
    let hits: Vec<usize> = requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.id.starts_with(&id))
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [] => Err(AccessError::NoSuchRequest(id)),
        [one] => Ok(*one),
        many => Err(AccessError::Ambiguous {
            prefix: id,
            candidates: many
                .iter()
                .map(|&i| requests[i].id.clone())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// A short id people can type: 8 hex digits from the random part of a UUIDv7.
fn new_id() -> String {
    let u = uuid::Uuid::now_v7();
    let b = u.as_bytes();
    format!("{:02x}{:02x}{:02x}{:02x}", b[12], b[13], b[14], b[15])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn who(name: &str, groups: &[&str]) -> Principal {
        Principal {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn target(jit: Option<&str>) -> crate::config::Target {
        crate::config::Target {
            jit_approvers: jit.map(str::to_string),
            jit_max: Duration::from_secs(3600),
            ..crate::config::Target::plain(1, "prod-db", crate::config::Protocol::Postgres)
        }
    }

    fn hold(access: &Access, requester: &Principal) -> (AccessRequest, oneshot::Receiver<Outcome>) {
        access
            .hold(HoldRequest {
                session: SessionId::new(),
                requester,
                target: "prod-db",
                sql: "delete from t where id = 1",
                action: "delete",
                policies: &["prod-delete-needs-dba".to_string()],
                reason: "needs a DBA",
                approvers: "dba",
            })
            .unwrap()
    }

    #[test]
    fn only_another_member_of_the_group_decides_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        let ada = who("ada", &["dba"]);
        let (req, mut rx) = hold(&access, &ada);
        assert_eq!(access.list(false).len(), 1);
        let e = access
            .decide(&req.id, &who("bob", &["dev"]), true, "")
            .unwrap_err();
        assert!(matches!(e, AccessError::NotApprover { .. }), "{e}");
        let e = access.decide(&req.id, &ada, true, "").unwrap_err();
        assert!(matches!(e, AccessError::OwnRequest { .. }), "{e}");
        assert!(rx.try_recv().is_err());
        let e = access
            .decide(&req.id[..4], &who("cy", &["dba"]), false, " ")
            .unwrap_err();
        assert!(matches!(e, AccessError::NoReason), "{e}");
        access
            .decide(&req.id[..4], &who("cy", &["dba"]), true, "ok")
            .unwrap();
        assert_eq!(
            rx.try_recv().unwrap(),
            Outcome::Approved {
                by: "cy".into(),
                comment: "ok".into()
            }
        );
        let e = access
            .decide(&req.id, &who("dee", &["dba"]), false, "no")
            .unwrap_err();
        assert!(
            matches!(
                e,
                AccessError::NotPending {
                    state: "approved",
                    ..
                }
            ),
            "{e}"
        );
        assert!(access.list(false).is_empty());
        assert_eq!(access.list(true).len(), 1);
    }

    #[test]
    fn an_approval_may_name_several_groups() {
        assert!(is_approver(&who("x", &["sre"]), "dba, sre"));
        assert!(is_approver(&who("x", &["dba"]), "dba"));
        assert!(!is_approver(&who("x", &["dbas"]), "dba, sre"));
        assert!(!is_approver(&who("x", &[""]), "dba,,sre"));
    }

    #[test]
    fn a_decision_that_races_a_timeout_wins() {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        let ada = who("ada", &[]);
        let (req, _rx) = hold(&access, &ada);
        access
            .decide(&req.id, &who("cy", &["dba"]), false, "not now")
            .unwrap();
        let got = access
            .settle(&req.id, RequestState::TimedOut { at_ns: now_ns() })
            .unwrap();
        assert!(matches!(got, Some(Outcome::Denied { .. })));
        let (req, _rx) = hold(&access, &ada);
        assert!(
            access
                .settle(&req.id, RequestState::TimedOut { at_ns: now_ns() })
                .unwrap()
                .is_none()
        );
        let e = access
            .decide(&req.id, &who("cy", &["dba"]), true, "")
            .unwrap_err();
        assert!(
            matches!(
                e,
                AccessError::NotPending {
                    state: "timed-out",
                    ..
                }
            ),
            "{e}"
        );
    }

    fn defer(access: &Access, id: &str) {
        assert!(
            access
                .settle(id, RequestState::Deferred { at_ns: now_ns() })
                .unwrap()
                .is_none()
        );
    }

    const SQL: &str = "delete from t where id = 1";

    #[test]
    fn a_deferred_statement_approved_later_runs_once_for_its_principal_text_and_target() {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        let ada = who("ada", &["dev"]);
        let (req, _rx) = hold(&access, &ada);
        defer(&access, &req.id);
        // Still open for a decision, listed, and nothing to use yet.
        assert_eq!(access.list(false).len(), 1);
        assert!(
            access
                .take_ready("ada", "prod-db", SQL, SessionId::new())
                .unwrap()
                .is_none()
        );
        let r = access
            .decide(&req.id, &who("cy", &["dba"]), true, "INC-7")
            .unwrap();
        assert_eq!(r.state.word(), "ready");
        assert_eq!(access.list(false).len(), 1, "an unused approval is open");

        // Another principal, text or target does not use it.
        let later = SessionId::new();
        for (p, t, sql) in [
            ("bob", "prod-db", SQL),
            ("ada", "app-db", SQL),
            ("ada", "prod-db", "delete from t where id = 2"),
            ("ada", "prod-db", "DELETE FROM t WHERE id = 1"),
        ] {
            assert!(access.take_ready(p, t, sql, later).unwrap().is_none());
        }
        let used = access
            .take_ready("ada", "prod-db", SQL, later)
            .unwrap()
            .unwrap();
        assert_eq!(used.id, req.id);
        assert!(
            matches!(&used.state, RequestState::Used { by, comment, session, .. }
                if by == "cy" && comment == "INC-7" && *session == later),
            "{:?}",
            used.state
        );
        // Once.
        assert!(
            access
                .take_ready("ada", "prod-db", SQL, later)
                .unwrap()
                .is_none()
        );
        assert!(access.list(false).is_empty());
        let e = access
            .decide(&req.id, &who("dee", &["dba"]), false, "no")
            .unwrap_err();
        assert!(
            matches!(e, AccessError::NotPending { state: "used", .. }),
            "{e}"
        );
    }

    #[test]
    fn a_deferred_statement_run_again_before_a_decision_is_the_same_request_waited_on_again() {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        let ada = who("ada", &["dev"]);
        let (first, _rx) = hold(&access, &ada);
        defer(&access, &first.id);
        let (again, mut rx) = hold(&access, &ada);
        assert_eq!(again.id, first.id);
        assert_eq!(again.state, RequestState::Pending);
        // Approved while this session waits: it runs there, and is not left to use again.
        access
            .decide(&first.id, &who("cy", &["dba"]), true, "")
            .unwrap();
        assert!(matches!(rx.try_recv().unwrap(), Outcome::Approved { .. }));
        assert!(
            access
                .take_ready("ada", "prod-db", SQL, SessionId::new())
                .unwrap()
                .is_none()
        );
        // Someone else's identical statement is a request of its own.
        let (bobs, _rx) = hold(&access, &who("bob", &["dev"]));
        assert_ne!(bobs.id, first.id);
    }

    #[test]
    fn a_denied_or_revoked_deferred_statement_is_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        let ada = who("ada", &["dev"]);
        let (req, _rx) = hold(&access, &ada);
        defer(&access, &req.id);
        access
            .decide(&req.id, &who("cy", &["dba"]), false, "use the archive job")
            .unwrap();
        let (req2, _rx) = hold(&access, &ada);
        assert_ne!(req2.id, req.id, "a denied request is not waited on again");
        defer(&access, &req2.id);
        access
            .decide(&req2.id, &who("cy", &["dba"]), true, "")
            .unwrap();
        let e = access.revoke(&req2.id, &who("bob", &["dev"])).unwrap_err();
        assert!(matches!(e, AccessError::NotRevoker { .. }), "{e}");
        assert_eq!(
            access.revoke(&req2.id, &ada).unwrap().state.word(),
            "revoked"
        );
        assert!(
            access
                .take_ready("ada", "prod-db", SQL, SessionId::new())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn deferred_requests_and_unused_approvals_survive_a_restart_and_a_use_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let ada = who("ada", &["dev"]);
        let sql2 = "delete from t where id = 2";
        let (ready, deferred, used) = {
            let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
            let (a, _rx) = hold(&access, &ada);
            defer(&access, &a.id);
            access
                .decide(&a.id, &who("cy", &["dba"]), true, "")
                .unwrap();
            let (b, _rx) = access
                .hold(HoldRequest {
                    session: SessionId::new(),
                    requester: &ada,
                    target: "prod-db",
                    sql: sql2,
                    action: "delete",
                    policies: &[],
                    reason: "needs a DBA",
                    approvers: "dba",
                })
                .unwrap();
            defer(&access, &b.id);
            let (c, _rx) = access
                .hold(HoldRequest {
                    session: SessionId::new(),
                    requester: &ada,
                    target: "app-db",
                    sql: SQL,
                    action: "delete",
                    policies: &[],
                    reason: "needs a DBA",
                    approvers: "dba",
                })
                .unwrap();
            defer(&access, &c.id);
            access
                .decide(&c.id, &who("cy", &["dba"]), true, "")
                .unwrap();
            access
                .take_ready("ada", "app-db", SQL, SessionId::new())
                .unwrap()
                .unwrap();
            (a.id, b.id, c.id)
        };
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        let word = |id: &str| {
            access
                .list(true)
                .into_iter()
                .find(|r| r.id == id)
                .unwrap()
                .state
                .word()
        };
        assert_eq!(
            (word(&ready), word(&deferred), word(&used)),
            ("ready", "deferred", "used")
        );
        assert!(
            access
                .take_ready("ada", "app-db", SQL, SessionId::new())
                .unwrap()
                .is_none()
        );
        // Still decidable after the restart, and usable once.
        access
            .decide(&deferred, &who("cy", &["dba"]), true, "")
            .unwrap();
        let s = SessionId::new();
        assert!(
            access
                .take_ready("ada", "prod-db", sql2, s)
                .unwrap()
                .is_some()
        );
        assert!(
            access
                .take_ready("ada", "prod-db", SQL, s)
                .unwrap()
                .is_some()
        );
        assert!(
            access
                .take_ready("ada", "prod-db", SQL, s)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn grants_count_until_revoked_and_survive_a_restart_while_held_statements_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let ada = who("ada", &["dev"]);
        let t = target(Some("dba"));
        let (grant_id, held_id) = {
            let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
            assert!(matches!(
                access.request_access(&ada, &target(None), 600, "INC-1"),
                Err(AccessError::NoJit(_))
            ));
            assert!(matches!(
                access.request_access(&ada, &t, 7200, "INC-1"),
                Err(AccessError::Duration { .. })
            ));
            let r = access.request_access(&ada, &t, 600, "INC-1").unwrap();
            assert!(!access.has_grant("ada", "prod-db"));
            access
                .decide(&r.id, &who("cy", &["dba"]), true, "go")
                .unwrap();
            assert!(access.has_grant("ada", "prod-db"));
            assert!(!access.has_grant("ada", "app-db"));
            assert!(!access.has_grant("bob", "prod-db"));
            let (held, _rx) = hold(&access, &ada);
            (r.id, held.id)
        };
        let access = Access::open(Journal::open(dir.path()).unwrap()).unwrap();
        assert!(access.has_grant("ada", "prod-db"));
        assert_eq!(access.grants().len(), 1);
        let held = access
            .list(true)
            .into_iter()
            .find(|r| r.id == held_id)
            .unwrap();
        assert_eq!(held.state.word(), "abandoned");
        let e = access.revoke(&grant_id, &who("bob", &["dev"])).unwrap_err();
        assert!(matches!(e, AccessError::NotRevoker { .. }), "{e}");
        access.revoke(&grant_id, &ada).unwrap();
        assert!(!access.has_grant("ada", "prod-db"));
        assert!(access.grants().is_empty());
    }
}
