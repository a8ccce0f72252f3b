//! Crash recovery: the sessions a previous agent left open (it was killed mid-session), each
//! with its hash chain and byte counters rebuilt from its stored events, for the writer to
//! seal with [`INTERRUPTED`] when it opens the journal.

use crate::chain::ChainState;
use crate::db::Core;
use crate::error::JournalError;
use crate::model::{Body, SessionSummary, now_ns};
use crate::schema::decode_event;

/// The end reason of a session its agent never closed, sealed when the agent restarted.
pub const INTERRUPTED: &str =
    "interrupted: the agent stopped without closing this session (sealed when it restarted)";

/// A session nobody sealed, as its events leave it.
pub(crate) struct Unsealed {
    pub summary: SessionSummary,
    /// The chain after its last stored event; `next_seq` follows it.
    pub chain: ChainState,
    pub client_bytes: u64,
    pub server_bytes: u64,
}

/// Every session of `core` without an end, oldest first.
pub(crate) fn unsealed(core: &Core) -> Result<Vec<Unsealed>, JournalError> {
    let mut out = Vec::new();
    for summary in core.stored_summaries()? {
        if summary.ended_ns.is_some() {
            continue;
        }
        let id = summary.id;
        let mut chain = ChainState::new(&id, now_ns());
        let (mut client_bytes, mut server_bytes) = (0, 0);
        for item in core.raw_events(id, 0)? {
            let (seq, plain) = item?;
            match decode_event(id, seq, &plain)?.body {
                Body::Client(b) => client_bytes += b.len() as u64,
                Body::Server(b) => server_bytes += b.len() as u64,
                _ => {}
            }
            chain.push(seq, &plain, false, 0);
            chain.next_seq = seq + 1;
        }
        out.push(Unsealed {
            summary,
            chain,
            client_bytes,
            server_bytes,
        });
    }
    Ok(out)
}
