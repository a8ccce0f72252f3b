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
//! the request ([`HoldGuard`] marks it abandoned), as does the session ending for any other
//! reason (agent shutdown drops the waiting future), and so does a KILL of the session's
//! connection id from the same principal ([`super::kill`]; ERR 1317). Never touches the server socket or writes to
//! the client: the caller does, through the server pump.

use std::sync::atomic::{AtomicU16, Ordering};

use bytes::BytesMut;
use sluice_journal::{RequestState, Review, SessionRecorder, now_ns};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{info, warn};

use super::Gate;
use crate::access::{HoldGuard, HoldRequest, Outcome};
use crate::protocol::mysql::packet::HEADER_LEN;
use crate::proxy::End;

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

/// Holds a command: records the request (or waits again on the same principal's deferred one
/// for the same text), journals the Review, and waits for a decision, the timeout, or the client
/// going away. Err: the session ends (the guard withdraws the request).
pub(super) async fn hold<R: AsyncRead + Unpin>(
    held: &Held,
    gate: &Gate,
    recorder: &SessionRecorder,
    from: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<HoldOutcome, End> {
    let (request, mut decided) = match gate.access.hold(HoldRequest {
        session: gate.session_id,
        requester: &gate.principal,
        target: &gate.target,
        sql: &held.sql,
        action: held.action,
        policies: &held.policies,
        reason: &held.reason,
        approvers: &held.approvers,
    }) {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "cannot record a request for approval: the statement is denied");
            return Ok(HoldOutcome::Refused(format!(
                "sluice: the statement needs approval, but the request cannot be recorded ({e}), so it is denied"
            )));
        }
    };
    let id = request.id;
    let mut guard = HoldGuard::new(&gate.access, &id);
    // Left set if the session ends during the hold: its parting error answers the command.
    gate.waiting.set(Some(held.reply_seq));
    info!(request = %id, approvers = %held.approvers, action = held.action, "statement held for approval");
    recorder
        .review(Review {
            request: id.clone(),
            state: RequestState::Pending,
        })
        .map_err(End::Journal)?;
    let timeout = gate.hold_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut kill = gate.kill.clone();
    kill.borrow_and_update();
    let mut interrupted = false;
    let waited: Result<Outcome, RequestState> = loop {
        tokio::select! {
            Ok(()) = kill.changed() => {
                interrupted = true;
                break Err(RequestState::Abandoned {
                    at_ns: now_ns(),
                    why: "interrupted by a KILL of its connection".into(),
                });
            }
            o = &mut decided => break o.map_err(|_| RequestState::Abandoned {
                at_ns: now_ns(),
                why: "the request was dropped".into(),
            }),
            _ = tokio::time::sleep_until(deadline) => break Err(RequestState::Deferred { at_ns: now_ns() }),
            r = from.read_buf(buf), if buf.len() < max.saturating_add(HEADER_LEN) => match r {
                Ok(0) => return Err(End::ClientClosed),
                Ok(_) => {}
                Err(error) => return Err(End::Io { from: "client", error }),
            },
        }
    };
    guard.disarm();
    gate.waiting.set(None);
    let outcome = match waited {
        Ok(o) => Some(o),
        // A decision that crossed the timeout wins.
        Err(state) => match gate.access.settle(&id, state.clone()) {
            Ok(Some(o)) => Some(o),
            Ok(None) => {
                recorder
                    .review(Review {
                        request: id.clone(),
                        state: state.clone(),
                    })
                    .map_err(End::Journal)?;
                if interrupted {
                    info!(request = %id, "held statement interrupted by KILL: withdrawn");
                    return Ok(HoldOutcome::Interrupted(format!(
                        "sluice: query execution was interrupted: request {id} is withdrawn (KILL of this connection), so the statement did not run"
                    )));
                }
                if matches!(state, RequestState::Deferred { .. }) {
                    info!(request = %id, "held statement not decided in time: deferred to a re-run");
                    return Ok(HoldOutcome::Refused(format!(
                        "sluice: the statement needs approval and was not decided within {} s, so it did not run. Request {id} stays open: a member of \"{}\" runs `sluice approve {id}`; then run the same statement again and it runs once. Reason: {}",
                        timeout.as_secs(),
                        held.approvers,
                        held.reason
                    )));
                }
                None
            }
            Err(e) => {
                warn!(request = %id, error = %e, "cannot record the end of a hold");
                None
            }
        },
    };
    Ok(match outcome {
        Some(Outcome::Approved { by, comment }) => {
            info!(request = %id, %by, "held statement approved: forwarding it");
            recorder
                .review(Review {
                    request: id.clone(),
                    state: RequestState::Approved {
                        by: by.clone(),
                        comment: comment.clone(),
                        at_ns: now_ns(),
                        expires_ns: None,
                    },
                })
                .map_err(End::Journal)?;
            HoldOutcome::Approved {
                request: id,
                by,
                comment,
            }
        }
        Some(Outcome::Denied { by, reason }) => {
            info!(request = %id, %by, "held statement denied");
            recorder
                .review(Review {
                    request: id.clone(),
                    state: RequestState::Denied {
                        by: by.clone(),
                        reason: reason.clone(),
                        at_ns: now_ns(),
                    },
                })
                .map_err(End::Journal)?;
            HoldOutcome::Refused(format!("sluice: request {id} was denied by {by}: {reason}"))
        }
        None => HoldOutcome::Refused(format!(
            "sluice: request {id} ended without a decision, so the statement did not run"
        )),
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
