//! The ship format, the contract between an agent and its collector: what an agent sends
//! ([`ShipBatch`]) and what the collector answers ([`IngestReport`]). The agent's side (the
//! cursor) is in `ship.rs`, the collector's (ingest) in `collector.rs`; both build on this.
//!
//! ```text
//! wire   = MAGIC (8 B) ++ postcard(ShipBatch | IngestReport)
//! ```
//! Events travel as their plain stored values (exactly what the chain hashes), so the collector
//! recomputes and checks the chain itself; the transport (mutual TLS) protects them in transit.
//! At-least-once: the cursor moves only on an acknowledgement, which the collector sends after
//! its synced write; a batch sent twice is absorbed there. A session leaves the spool only when
//! it is sealed and every event of it is acknowledged.

use serde::{Deserialize, Serialize};

use crate::chain::Checkpoint;
use crate::error::JournalError;
use crate::model::{SessionId, SessionSummary};

const BATCH_MAGIC: &[u8; 8] = b"SLSHIP01";
const REPORT_MAGIC: &[u8; 8] = b"SLACK001";

/// One shipment from an agent to its collector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipBatch {
    pub sessions: Vec<ShipSession>,
}

/// New events of one session, with its latest summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipSession {
    pub summary: SessionSummary,
    /// Contiguous seqs, ascending, starting at the agent's cursor.
    pub events: Vec<ShipEvent>,
    /// The signed checkpoints among `events`.
    pub checkpoints: Vec<ShipCheckpoint>,
}

/// An event's plain stored value (exactly the bytes its chain hash covers) and the chain hash
/// the agent recorded for it, so the collector can name an event that changed on the way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipEvent {
    pub seq: u64,
    pub value: Vec<u8>,
    /// None for events recorded before per-event hashes existed.
    pub hash: Option<[u8; 32]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipCheckpoint {
    pub seq: u64,
    pub checkpoint: Checkpoint,
}

/// The collector's answer to a batch, sent after its durable write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestReport {
    pub sessions: Vec<SessionAck>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionAck {
    pub session: SessionId,
    /// Events 0..next_seq of the session are durably stored at the collector.
    pub next_seq: u64,
    /// What the collector flagged in this session (gap, bad or foreign signature, conflicting
    /// duplicate), if anything; such events are stored flagged, never as good.
    pub problems: Vec<String>,
}

fn wire<T: Serialize>(magic: &[u8; 8], value: &T, what: &str) -> Result<Vec<u8>, JournalError> {
    postcard::to_extend(value, magic.to_vec()).map_err(|source| JournalError::Encode {
        what: what.into(),
        source,
    })
}

fn unwire<'a, T: Deserialize<'a>>(
    magic: &[u8; 8],
    bytes: &'a [u8],
    what: &str,
) -> Result<T, JournalError> {
    let rest = bytes
        .strip_prefix(magic.as_slice())
        .ok_or_else(|| JournalError::Format {
            what: format!("{what} (not a sluice {what}, or another version)"),
            format: bytes.first().copied().unwrap_or(0),
        })?;
    postcard::from_bytes(rest).map_err(|source| JournalError::Decode {
        what: what.into(),
        source,
    })
}

impl ShipBatch {
    pub fn encode(&self) -> Result<Vec<u8>, JournalError> {
        wire(BATCH_MAGIC, self, "batch")
    }

    pub fn decode(bytes: &[u8]) -> Result<ShipBatch, JournalError> {
        unwire(BATCH_MAGIC, bytes, "batch")
    }

    pub fn event_count(&self) -> usize {
        self.sessions.iter().map(|s| s.events.len()).sum()
    }
}

impl IngestReport {
    pub fn encode(&self) -> Result<Vec<u8>, JournalError> {
        wire(REPORT_MAGIC, self, "ingest report")
    }

    pub fn decode(bytes: &[u8]) -> Result<IngestReport, JournalError> {
        unwire(REPORT_MAGIC, bytes, "ingest report")
    }
}
