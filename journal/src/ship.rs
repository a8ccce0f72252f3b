//! Shipping, the agent's side: on its [`Journal`], the next batch after the persisted cursor
//! and the acknowledgement that moves the cursor and frees the spool (the format is
//! `wire.rs`).
//!
//! ```text
//! cursor = "shipped" family: session id -> next unacknowledged seq (u64 BE)
//! ```
//! Events travel as their plain stored values (exactly what the chain hashes), so the collector
//! recomputes and checks the chain itself; the transport (mutual TLS) protects them in transit.
//! At-least-once: the cursor moves only on an acknowledgement, which the collector sends after
//! its synced write; a batch sent twice is absorbed there. A session leaves the spool only when
//! it is sealed and every event of it is acknowledged.

use rocksdb::WriteBatch;

use crate::error::JournalError;
use crate::model::SessionId;
use crate::schema::CF_SHIPPED;
use crate::wire::{IngestReport, ShipBatch, ShipCheckpoint, ShipEvent, ShipSession};
use crate::writer::Journal;

/// Run a compaction after deleting shipped sessions at most this often (so the spool's size on
/// disk follows what was deleted).
const COMPACT_EVERY_NS: u64 = 30_000_000_000;

/// What is waiting to be shipped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    pub events: u64,
    pub sessions: u64,
    /// When the oldest unshipped event was recorded (the shipping lag's start).
    pub oldest_ns: Option<u64>,
}

impl Journal {
    fn cursor(&self, session: &SessionId) -> Result<u64, JournalError> {
        let core = &self.core;
        Ok(core
            .db
            .get_cf(core.cf(CF_SHIPPED)?, session.as_bytes())
            .map_err(|source| JournalError::Read { source })?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Up to about `max_events` events or `max_bytes` of values not yet acknowledged, oldest
    /// session first, each session resuming at its cursor. Sealed sessions with nothing left
    /// to send come with no events, so that their acknowledgement removes them. None when
    /// everything is shipped.
    pub fn next_batch(
        &self,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Option<ShipBatch>, JournalError> {
        let core = &self.core;
        let (mut events_left, mut bytes_left) = (max_events.max(1), max_bytes.max(1));
        let mut sessions = Vec::new();
        for stored in core.stored_summaries()? {
            if events_left == 0 || bytes_left == 0 {
                break;
            }
            let id = stored.id;
            let cursor = self.cursor(&id)?;
            let mut events = Vec::new();
            for item in core.raw_events(id, cursor)? {
                let (seq, value) = item?;
                if events_left == 0 || (bytes_left < value.len() && !events.is_empty()) {
                    break;
                }
                events_left -= 1;
                bytes_left = bytes_left.saturating_sub(value.len());
                let hash = core.hash(&id, seq)?;
                events.push(ShipEvent { seq, value, hash });
            }
            // The summary after the events: if the session ended meanwhile, the next batch
            // carries the sealed summary.
            let summary = core.summary(&id)?.unwrap_or(stored);
            if events.is_empty() && summary.ended_ns.is_none() {
                continue;
            }
            let last = events.last().map(|e| e.seq);
            let checkpoints = match last {
                Some(last) => core
                    .checkpoints(&id, cursor)?
                    .into_iter()
                    .filter(|(seq, _)| *seq <= last)
                    .map(|(seq, checkpoint)| ShipCheckpoint { seq, checkpoint })
                    .collect(),
                None => Vec::new(),
            };
            sessions.push(ShipSession {
                summary,
                events,
                checkpoints,
            });
        }
        Ok((!sessions.is_empty()).then_some(ShipBatch { sessions }))
    }

    /// Records the collector's acknowledgement: each session's cursor moves to `next_seq`, and
    /// sessions that are sealed and wholly acknowledged are deleted from the spool. Returns how
    /// many were deleted.
    pub fn acknowledge(&self, report: &IngestReport) -> Result<usize, JournalError> {
        let core = &self.core;
        let mut batch = WriteBatch::default();
        let mut deleted = 0;
        for ack in &report.sessions {
            let id = ack.session;
            let Some(summary) = core.summary(&id)? else {
                continue;
            };
            let cursor = self.cursor(&id)?;
            let next = ack.next_seq.max(cursor);
            if summary.ended_ns.is_some() && next >= core.next_seq(&id)? {
                core.delete_session(&mut batch, &id)?;
                deleted += 1;
            } else if next > cursor {
                batch.put_cf(core.cf(CF_SHIPPED)?, id.as_bytes(), next.to_be_bytes());
            }
        }
        core.db
            .write_opt(batch, &self.write_options())
            .map_err(|source| JournalError::WriteOther {
                what: "the shipping cursor".into(),
                source,
            })?;
        if deleted > 0 {
            let now = crate::model::now_ns();
            let mut last = self
                .last_compaction
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if now.saturating_sub(*last) >= COMPACT_EVERY_NS {
                *last = now;
                for family in [
                    crate::schema::CF_EVENTS,
                    crate::schema::CF_HASHES,
                    crate::schema::CF_CHECKPOINTS,
                ] {
                    core.db
                        .compact_range_cf(core.cf(family)?, None::<&[u8]>, None::<&[u8]>);
                }
            }
        }
        Ok(deleted)
    }

    /// Flushes and compacts the spool now, so that its size on disk reflects what it holds.
    pub fn compact(&self) -> Result<(), JournalError> {
        let core = &self.core;
        for family in [
            crate::schema::CF_EVENTS,
            crate::schema::CF_HASHES,
            crate::schema::CF_CHECKPOINTS,
            crate::schema::CF_SESSIONS,
        ] {
            let cf = core.cf(family)?;
            core.db
                .flush_cf(cf)
                .map_err(|source| JournalError::Read { source })?;
            core.db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Events not yet acknowledged by the collector, and when the oldest was recorded.
    pub fn backlog(&self) -> Result<Backlog, JournalError> {
        let core = &self.core;
        let mut out = Backlog::default();
        for summary in core.stored_summaries()? {
            let id = summary.id;
            let cursor = self.cursor(&id)?;
            let next = core.next_seq(&id)?;
            if next <= cursor {
                continue;
            }
            out.events += next - cursor;
            out.sessions += 1;
            if out.oldest_ns.is_none()
                && let Some(first) = core.raw_events(id, cursor)?.next()
            {
                let (seq, plain) = first?;
                out.oldest_ns = Some(crate::schema::decode_event(id, seq, &plain)?.ts_ns);
            }
        }
        Ok(out)
    }
}
