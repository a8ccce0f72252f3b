//! A MySQL statement held for approval: the wait between the client pump's gating of the held
//! command and its answer.
//!
//! MySQL has no message a server may send while a command is running (PostgreSQL's
//! NoticeResponse), so the client learns nothing until the hold ends: approved, the command is
//! forwarded and its results flow; denied, it gets ERR 1142 with the reason and the request id;
//! not decided within `agent.approval_timeout_secs`, it gets ERR 1142 naming the request id and
//! the `sluice approve` command, and the request is *deferred* rather than timed out: it stays
//! open, and once approved the same principal's next run of the same statement on the same
//! target, in any session, runs once ([`crate::access::Access::take_ready`], called by the gate).
//!
//! While holding, the client pump forwards nothing more (later pipelined commands keep their
//! order; the server pump keeps relaying earlier commands' responses) but keeps reading the
//! client into its buffer, bounded by one packet's worth, so a hang-up is noticed: it withdraws
//! the request (`HoldGuard` marks it abandoned), as does the session ending for any other
//! reason (agent shutdown drops the waiting future), and so does a KILL of the session's
//! connection id from the same principal ([`super::kill`]; ERR 1317). The wait itself is
//! [`crate::proxy::hold::wait`], shared with PostgreSQL. Never touches the server socket or
//! writes to the client: the caller does, through the server pump.

use std::sync::atomic::{AtomicU16, Ordering};

use bytes::BytesMut;
use sluice_journal::SessionRecorder;
use tokio::io::AsyncRead;

use super::Gate;
use crate::protocol::mysql::packet::HEADER_LEN;
use crate::proxy::End;
use crate::proxy::hold::{Holder, OnTimeout, Settled, Statement, wait};

/// A command an approval policy holds: what policy said, and how its answer is numbered.
#[derive(Debug, Clone)]
pub(super) struct Held {
    pub sql: String,
    pub action: &'static str,
    pub facts: String,
    pub policies: Vec<String>,
    pub reason: String,
    pub approvers: String,
    /// The sequence id of the client's answer (the held packet's last one + 1).
    pub reply_seq: u8,
}

/// What became of a held command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HoldOutcome {
    Approved {
        request: String,
        by: String,
        comment: String,
    },
    /// Denied, deferred, withdrawn or not recordable: the client's error text.
    Refused(String),
    /// Withdrawn by a KILL of its connection (the client's error text).
    Interrupted(String),
}

/// The sequence id of the answer a client waits for while one of its commands is held, for the
/// parting error when the session ends during the hold (the client is not idle then, but waits
/// for packet `reply_seq`).
#[derive(Debug, Default)]
pub(super) struct Waiting(AtomicU16);

impl Waiting {
    fn set(&self, reply_seq: Option<u8>) {
        self.0
            .store(reply_seq.map_or(0, |s| u16::from(s) + 1), Ordering::Relaxed);
    }

    /// The sequence id the held command's client expects, while one is held.
    pub fn reply_seq(&self) -> Option<u8> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            n => u8::try_from(n - 1).ok(),
        }
    }
}

/// Holds a command ([`crate::proxy::hold::wait`], deferred when not decided in time, withdrawn
/// by a KILL), and turns what became of it into the client's answer. Err: the session ends
/// (the guard withdraws the request), its parting error answering the held command.
pub(super) async fn hold<R: AsyncRead + Unpin>(
    held: &Held,
    gate: &Gate,
    recorder: &SessionRecorder,
    from: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<HoldOutcome, End> {
    // Left set if the session ends during the hold: its parting error answers the command.
    gate.waiting.set(Some(held.reply_seq));
    let settled = wait(
        Holder {
            access: &gate.access,
            session: gate.session_id,
            principal: &gate.principal,
            target: &gate.target,
            timeout: gate.hold_timeout,
            on_timeout: OnTimeout::Deferred,
            interrupt: gate.kill.clone(),
            interrupted_by: "interrupted by a KILL of its connection",
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
        async |_: &str| Ok(()),
    )
    .await?;
    gate.waiting.set(None);
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
        } => HoldOutcome::Refused(format!(
            "sluice: request {request} was denied by {by}: {reason}"
        )),
        Settled::Unrecordable(e) => HoldOutcome::Refused(format!(
            "sluice: the statement needs approval, but the request cannot be recorded ({e}), so it is denied"
        )),
        Settled::Interrupted { request } => HoldOutcome::Interrupted(format!(
            "sluice: query execution was interrupted: request {request} is withdrawn (KILL of this connection), so the statement did not run"
        )),
        Settled::Deferred { request } => HoldOutcome::Refused(format!(
            "sluice: the statement needs approval and was not decided within {} s, so it did not run. Request {request} stays open: a member of \"{}\" runs `sluice approve {request}`; then run the same statement again and it runs once. Reason: {}",
            gate.hold_timeout.as_secs(),
            held.approvers,
            held.reason
        )),
        Settled::TimedOut { request } | Settled::Undecided { request } => {
            HoldOutcome::Refused(format!(
                "sluice: request {request} ended without a decision, so the statement did not run"
            ))
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn waiting_tells_the_held_answer_s_sequence_id_only_while_held() {
        let w = Waiting::default();
        assert_eq!(w.reply_seq(), None);
        w.set(Some(0));
        assert_eq!(w.reply_seq(), Some(0));
        w.set(Some(255));
        assert_eq!(w.reply_seq(), Some(255));
        w.set(None);
        assert_eq!(w.reply_seq(), None);
    }
}
