//! The wait of a statement held for approval, for every protocol: record the request (or
//! wait again on the same principal's deferred one for the same text), journal its Review,
//! let the protocol tell the client, then wait for a decision, the timeout, the protocol's
//! interrupt (PostgreSQL's CancelRequest, MySQL's KILL) or the client going away, and journal
//! what became of it. What the client is told, and when, is the protocol's
//! ([`Settled`] to its own error or forward).
//!
//! While holding, nothing more is forwarded (later pipelined statements keep their order; the
//! server side keeps relaying earlier responses) but the client is still read into its buffer,
//! bounded by `read_cap` bytes, so a hang-up is noticed. A session that stops waiting without
//! settling the request (a hang-up, an agent shutdown dropping the future) marks it abandoned
//! ([`HoldGuard`]). Never touches the server socket or writes to the client.

use std::time::Duration;

use bytes::BytesMut;
use sluice_journal::{Principal, RequestState, Review, SessionId, SessionRecorder, now_ns};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{End, Side};
use crate::access::{Access, HoldGuard, HoldRequest, Outcome};

/// What a hold nobody decided in time becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnTimeout {
    /// The request times out: the statement did not run; an approval must come while a
    /// re-run waits (PostgreSQL, whose client was told of the hold by a notice).
    TimedOut,
    /// The request stays open: once approved, the same principal's next run of the same
    /// statement on the same target runs once (MySQL, whose client learns nothing during a
    /// hold; [`Access::take_ready`]).
    Deferred,
}

/// The session's side of a hold.
pub(crate) struct Holder<'a> {
    pub access: &'a Access,
    pub session: SessionId,
    pub principal: &'a Principal,
    pub target: &'a str,
    /// `agent.approval_timeout_secs`.
    pub timeout: Duration,
    pub on_timeout: OnTimeout,
    /// Bumped by the protocol's interrupt of this session's running statement.
    pub interrupt: watch::Receiver<u64>,
    /// What the interrupt is, for the request's record ("the client cancelled the statement").
    pub interrupted_by: &'static str,
}

/// The statement held, as policy found it.
pub(crate) struct Statement<'a> {
    pub sql: &'a str,
    pub action: &'a str,
    pub policies: &'a [String],
    pub reason: &'a str,
    pub approvers: &'a str,
}

/// What became of a hold (each journaled as a Review, but [`Settled::Unrecordable`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settled {
    Approved {
        request: String,
        by: String,
        comment: String,
    },
    Denied {
        request: String,
        by: String,
        reason: String,
    },
    /// The request could not be recorded, so the statement is denied (the error's text).
    Unrecordable(String),
    /// Withdrawn by the protocol's interrupt.
    Interrupted { request: String },
    /// Not decided in time ([`OnTimeout::TimedOut`]).
    TimedOut { request: String },
    /// Not decided in time, left open ([`OnTimeout::Deferred`]).
    Deferred { request: String },
    /// Ended without a decision otherwise (the request was dropped, or its end could not be
    /// recorded).
    Undecided { request: String },
}

/// Holds `statement` for `holder`'s session. `announce` runs once the request is recorded
/// and journaled as pending, with its id (the protocol tells the client, or not). Err: the
/// session ends (the journal failed, the client went away, `announce` failed).
pub(crate) async fn wait<R: AsyncRead + Unpin>(
    mut holder: Holder<'_>,
    statement: Statement<'_>,
    recorder: &SessionRecorder,
    from: &mut R,
    buf: &mut BytesMut,
    read_cap: usize,
    announce: impl AsyncFnOnce(&str) -> Result<(), End>,
) -> Result<Settled, End> {
    let (request, mut decided) = match holder.access.hold(HoldRequest {
        session: holder.session,
        requester: holder.principal,
        target: holder.target,
        sql: statement.sql,
        action: statement.action,
        policies: statement.policies,
        reason: statement.reason,
        approvers: statement.approvers,
    }) {
        Ok(x) => x,
        Err(e) => {
            warn!(error = %e, "cannot record a request for approval: the statement is denied");
            return Ok(Settled::Unrecordable(e.to_string()));
        }
    };
    let id = request.id;
    let mut guard = HoldGuard::new(holder.access, &id);
    info!(request = %id, approvers = %statement.approvers, action = statement.action, "statement held for approval");
    recorder
        .review(Review {
            request: id.clone(),
            state: RequestState::Pending,
        })
        .map_err(End::Journal)?;
    announce(&id).await?;
    let deadline = tokio::time::Instant::now() + holder.timeout;
    holder.interrupt.borrow_and_update();
    let mut interrupted = false;
    let waited: Result<Outcome, RequestState> = loop {
        tokio::select! {
            Ok(()) = holder.interrupt.changed() => {
                interrupted = true;
                break Err(RequestState::Abandoned {
                    at_ns: now_ns(),
                    why: holder.interrupted_by.into(),
                });
            }
            o = &mut decided => break o.map_err(|_| RequestState::Abandoned {
                at_ns: now_ns(),
                why: "the request was dropped".into(),
            }),
            _ = tokio::time::sleep_until(deadline) => break Err(match holder.on_timeout {
                OnTimeout::TimedOut => RequestState::TimedOut { at_ns: now_ns() },
                OnTimeout::Deferred => RequestState::Deferred { at_ns: now_ns() },
            }),
            r = from.read_buf(buf), if buf.len() < read_cap => match r {
                Ok(0) => return Err(End::ClientClosed),
                Ok(_) => {}
                Err(error) => return Err(End::Io { from: Side::Client, error }),
            },
        }
    };
    guard.disarm();
    let outcome = match waited {
        Ok(o) => o,
        // A decision that crossed the timeout or the interrupt wins.
        Err(state) => match holder.access.settle(&id, state.clone()) {
            Ok(Some(o)) => o,
            Ok(None) => {
                recorder
                    .review(Review {
                        request: id.clone(),
                        state: state.clone(),
                    })
                    .map_err(End::Journal)?;
                return Ok(match state {
                    RequestState::TimedOut { .. } => {
                        info!(request = %id, "held statement not decided in time");
                        Settled::TimedOut { request: id }
                    }
                    RequestState::Deferred { .. } => {
                        info!(request = %id, "held statement not decided in time: deferred to a re-run");
                        Settled::Deferred { request: id }
                    }
                    _ if interrupted => {
                        info!(request = %id, "held statement interrupted: withdrawn");
                        Settled::Interrupted { request: id }
                    }
                    _ => Settled::Undecided { request: id },
                });
            }
            Err(e) => {
                warn!(request = %id, error = %e, "cannot record the end of a hold");
                return Ok(Settled::Undecided { request: id });
            }
        },
    };
    Ok(match outcome {
        Outcome::Approved { by, comment } => {
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
            Settled::Approved {
                request: id,
                by,
                comment,
            }
        }
        Outcome::Denied { by, reason } => {
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
            Settled::Denied {
                request: id,
                by,
                reason,
            }
        }
    })
}
