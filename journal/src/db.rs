//! The database core every view of a journal directory shares ([`Core`]: the families,
//! sealing, reading and verifying), and what reading yields: [`RawSession`] (a session in
//! plain form, for offline verification), [`Verification`], the collector's [`Integrity`].
//! Above the key schema and the ship format; the writer, the reader, shipping and the
//! collector's store build on it.

use std::collections::BTreeMap;
use std::path::Path;

use rocksdb::{DB, Direction as IterDirection, IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::chain::{Checkpoint, genesis, link, verify_checkpoint};
use crate::error::JournalError;
use crate::hex;
use crate::model::{AccessRequest, Body, Event, SessionId, SessionSummary};
use crate::schema::{
    CF_CHECKPOINTS, CF_EVENTS, CF_HASHES, CF_INTEGRITY, CF_REQUESTS, CF_SESSIONS, CF_SHIPPED,
    decode, decode_event, descriptors, encode, event_key, key_seq, options,
};
use crate::seal::{SealError, Sealer};
use crate::wire::ShipCheckpoint;

/// What every view of a journal directory shares: the database, its data key, and reading.
pub(crate) struct Core {
    pub db: DB,
    pub sealer: Option<Sealer>,
}

impl Core {
    /// Opens `dir` for writing (creating it), sealing values with the key in `data_key`
    /// (created on first use) and leaving the key pointer for readers.
    pub fn open_write(dir: &Path, data_key: Option<&Path>) -> Result<Core, JournalError> {
        let db = DB::open_cf_descriptors(&options(), dir, descriptors()).map_err(|source| {
            JournalError::Open {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        let sealer = match data_key {
            Some(path) => {
                let sealer = Sealer::load_or_create(path)
                    .map_err(|e| JournalError::Seal(SealError::Key(e)))?;
                crate::seal::write_pointer(dir, path, &sealer)?;
                Some(sealer)
            }
            None => None,
        };
        Ok(Core { db, sealer })
    }

    pub fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, JournalError> {
        self.db.cf_handle(name).ok_or_else(|| JournalError::Format {
            what: format!("column family {name}"),
            format: 0,
        })
    }

    /// The stored form of a plain value of a sealed family.
    pub fn seal(&self, family: &str, key: &[u8], plain: Vec<u8>) -> Result<Vec<u8>, JournalError> {
        match &self.sealer {
            None => Ok(plain),
            Some(s) => s
                .seal(family, key, &plain)
                .ok_or_else(|| JournalError::Unseal {
                    what: format!("{family}/{} (sealing failed)", hex(key)),
                }),
        }
    }

    /// The plain form of a stored value of a sealed family.
    pub fn unseal(&self, family: &str, key: &[u8], stored: &[u8]) -> Result<Vec<u8>, JournalError> {
        if stored.first() != Some(&crate::seal::SEALED) {
            return Ok(stored.to_vec());
        }
        let what = || format!("{family}/{}", hex(key));
        match &self.sealer {
            None => Err(JournalError::Sealed { what: what() }),
            Some(s) => s
                .open(family, key, stored)
                .ok_or_else(|| JournalError::Unseal { what: what() }),
        }
    }

    pub fn put_summary(
        &self,
        batch: &mut WriteBatch,
        summary: &SessionSummary,
    ) -> Result<(), JournalError> {
        let key = summary.id.as_bytes();
        let plain = encode(summary, || format!("session {}", summary.id))?;
        batch.put_cf(
            self.cf(CF_SESSIONS)?,
            key,
            self.seal(CF_SESSIONS, key, plain)?,
        );
        Ok(())
    }

    pub fn summary(&self, id: &SessionId) -> Result<Option<SessionSummary>, JournalError> {
        let key = id.as_bytes();
        let Some(stored) = self
            .db
            .get_cf(self.cf(CF_SESSIONS)?, key)
            .map_err(|source| JournalError::Read { source })?
        else {
            return Ok(None);
        };
        let plain = self.unseal(CF_SESSIONS, key, &stored)?;
        decode(&plain, || format!("session {id}")).map(Some)
    }

    /// Every session's stored summary, oldest first (counters as last written).
    pub fn stored_summaries(&self) -> Result<Vec<SessionSummary>, JournalError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_SESSIONS)?, IteratorMode::Start)
        {
            let (key, value) = item.map_err(|source| JournalError::Read { source })?;
            let plain = self.unseal(CF_SESSIONS, &key, &value)?;
            out.push(decode(&plain, || format!("session {}", hex(&key)))?);
        }
        Ok(out)
    }

    /// A session's events from `from` on as (seq, plain stored value), in order.
    pub fn raw_events(
        &self,
        session: SessionId,
        from: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>), JournalError>> + '_, JournalError> {
        let prefix = *session.as_bytes();
        let start = event_key(&session, from);
        let iter = self.db.iterator_cf(
            self.cf(CF_EVENTS)?,
            IteratorMode::From(&start, IterDirection::Forward),
        );
        Ok(iter
            .take_while(move |item| match item {
                Ok((key, _)) => key.starts_with(&prefix),
                Err(_) => true,
            })
            .map(move |item| {
                let (key, value) = item.map_err(|source| JournalError::Read { source })?;
                let seq = key_seq(&key)?;
                Ok((seq, self.unseal(CF_EVENTS, &key, &value)?))
            }))
    }

    /// A session's checkpoints, by the seq they cover.
    pub fn checkpoints(
        &self,
        session: &SessionId,
        from: u64,
    ) -> Result<BTreeMap<u64, Checkpoint>, JournalError> {
        let mut out = BTreeMap::new();
        let prefix = *session.as_bytes();
        let start = event_key(session, from);
        for item in self.db.iterator_cf(
            self.cf(CF_CHECKPOINTS)?,
            IteratorMode::From(&start, IterDirection::Forward),
        ) {
            let (key, value) = item.map_err(|source| JournalError::Read { source })?;
            if !key.starts_with(&prefix) {
                break;
            }
            let seq = key_seq(&key)?;
            out.insert(
                seq,
                decode(&value, || format!("checkpoint {session}/{seq}"))?,
            );
        }
        Ok(out)
    }

    /// The recorded chain hash of event `seq`, if any.
    pub fn hash(&self, session: &SessionId, seq: u64) -> Result<Option<[u8; 32]>, JournalError> {
        Ok(self
            .db
            .get_cf(self.cf(CF_HASHES)?, event_key(session, seq))
            .map_err(|source| JournalError::Read { source })?
            .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok()))
    }

    /// The seq after a session's last stored event (0 when it has none).
    pub fn next_seq(&self, session: &SessionId) -> Result<u64, JournalError> {
        let end = event_key(session, u64::MAX);
        let mut iter = self.db.raw_iterator_cf(self.cf(CF_EVENTS)?);
        iter.seek_for_prev(end);
        match iter.key() {
            Some(key) if key.starts_with(session.as_bytes()) => Ok(key_seq(key)? + 1),
            _ => {
                iter.status()
                    .map_err(|source| JournalError::Read { source })?;
                Ok(0)
            }
        }
    }

    /// Deletes everything recorded of `session` into `batch`.
    pub fn delete_session(
        &self,
        batch: &mut WriteBatch,
        session: &SessionId,
    ) -> Result<(), JournalError> {
        let from = event_key(session, 0);
        let to = {
            let mut k = [0xffu8; 25];
            k[..16].copy_from_slice(session.as_bytes());
            k
        };
        for family in [CF_EVENTS, CF_HASHES, CF_CHECKPOINTS] {
            batch.delete_range_cf(self.cf(family)?, &from[..], &to[..]);
        }
        for family in [CF_SESSIONS, CF_SHIPPED, CF_INTEGRITY] {
            batch.delete_cf(self.cf(family)?, session.as_bytes());
        }
        Ok(())
    }

    /// Every session's index entry, oldest first; the counters of sessions never sealed are
    /// derived from their events.
    pub fn sessions(&self) -> Result<Vec<SessionSummary>, JournalError> {
        let mut out = self.stored_summaries()?;
        for summary in &mut out {
            if summary.ended_ns.is_none() {
                let (mut client, mut server, mut events) = (0, 0, 0);
                for event in self.events(&summary.id)? {
                    events += 1;
                    match event?.body {
                        Body::Client(b) => client += b.len() as u64,
                        Body::Server(b) => server += b.len() as u64,
                        _ => {}
                    }
                }
                summary.client_bytes = client;
                summary.server_bytes = server;
                summary.events = events;
            }
        }
        Ok(out)
    }

    pub fn events(
        &self,
        session: &SessionId,
    ) -> Result<impl Iterator<Item = Result<Event, JournalError>> + '_, JournalError> {
        let session = *session;
        Ok(self
            .raw_events(session, 0)?
            .map(move |item| item.and_then(|(seq, plain)| decode_event(session, seq, &plain))))
    }

    /// Everything needed to verify `session` without this journal.
    pub fn raw_session(&self, session: &SessionId) -> Result<RawSession, JournalError> {
        let summary = self
            .summary(session)?
            .ok_or_else(|| JournalError::NoSuchSession(session.to_string()))?;
        let mut events = Vec::new();
        for item in self.raw_events(*session, 0)? {
            let (seq, value) = item?;
            events.push(RawEvent {
                seq,
                hash: self.hash(session, seq)?,
                value,
            });
        }
        let checkpoints = self
            .checkpoints(session, 0)?
            .into_iter()
            .map(|(seq, checkpoint)| ShipCheckpoint { seq, checkpoint })
            .collect();
        Ok(RawSession {
            summary,
            events,
            checkpoints,
        })
    }

    /// Recomputes `session`'s chain from the stored events and checks every recorded hash and
    /// checkpoint.
    pub fn verify(&self, session: &SessionId) -> Result<Verification, JournalError> {
        let checkpoints = self.checkpoints(session, 0)?;
        let prefix = *session.as_bytes();
        let iter = self.db.iterator_cf(
            self.cf(CF_EVENTS)?,
            IteratorMode::From(&prefix, IterDirection::Forward),
        );
        let events = iter
            .take_while(|item| match item {
                Ok((key, _)) => key.starts_with(&prefix),
                Err(_) => true,
            })
            .map(|item| {
                let (key, value) = item.map_err(|source| JournalError::Read { source })?;
                let seq = key_seq(&key)?;
                // A value that does not open is a changed event, not a read error.
                let plain = self.unseal(CF_EVENTS, &key, &value).ok();
                Ok((seq, plain, self.hash(session, seq)?))
            });
        verify_chain(session, events, checkpoints)
    }
}

impl Core {
    /// Every request, oldest first, in its latest state.
    pub fn requests(&self) -> Result<Vec<AccessRequest>, JournalError> {
        let core = self;
        let Some(family) = core.db.cf_handle(CF_REQUESTS) else {
            // A journal written before requests existed.
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in core.db.iterator_cf(family, IteratorMode::Start) {
            let (key, value) = item.map_err(|source| JournalError::Read { source })?;
            let plain = core.unseal(CF_REQUESTS, &key, &value)?;
            out.push(decode(&plain, || format!("request {}", hex(&key)))?);
        }
        Ok(out)
    }
}

/// The first problem in a session's events, checked against their recorded hashes and
/// checkpoints. `events` yields (seq, plain value or None when it would not unseal, recorded
/// hash), in stored order.
pub(crate) fn verify_chain(
    session: &SessionId,
    events: impl Iterator<Item = Result<(u64, Option<Vec<u8>>, Option<[u8; 32]>), JournalError>>,
    mut checkpoints: BTreeMap<u64, Checkpoint>,
) -> Result<Verification, JournalError> {
    let mut out = Verification {
        events: 0,
        sealed_through: None,
        public_key: checkpoints.values().next().map(|c| c.public_key.clone()),
        problem: None,
    };
    let mut hash = genesis(session);
    // Journals written before per-event hashes have none; once one is seen, all must be there.
    let mut hashed = false;
    for (expected, item) in (0u64..).zip(events) {
        let (seq, value, recorded) = item?;
        if seq != expected {
            out.problem = Some((
                expected,
                format!("event {expected} is missing (dropped): the next stored event is {seq}"),
            ));
            return Ok(out);
        }
        let Some(value) = value else {
            out.problem = Some((
                seq,
                format!("event {seq} does not decrypt: it was altered or moved"),
            ));
            return Ok(out);
        };
        hash = link(&hash, seq, &value);
        out.events += 1;
        hashed |= recorded.is_some();
        match recorded {
            Some(r) if r != hash => {
                out.problem = Some((
                    seq,
                    format!(
                        "event {seq} does not match its recorded hash: it was altered, replaced or moved"
                    ),
                ));
                return Ok(out);
            }
            None if hashed => {
                out.problem = Some((
                    seq,
                    format!("event {seq} has no recorded hash: it was inserted"),
                ));
                return Ok(out);
            }
            _ => {}
        }
        if let Some(c) = checkpoints.remove(&seq) {
            if out.public_key.as_deref() != Some(c.public_key.as_slice()) {
                out.problem = Some((seq, "a checkpoint is signed with another key".into()));
                return Ok(out);
            }
            if !verify_checkpoint(session, seq, &hash, &c) {
                let from = out.sealed_through.map(|s| s + 1).unwrap_or(0);
                out.problem = Some((
                    seq,
                    format!(
                        "the chain does not match the signed checkpoint at event {seq}: an event from {from} to {seq} was changed, inserted or reordered (with its hash rewritten), or the checkpoint was forged"
                    ),
                ));
                return Ok(out);
            }
            out.sealed_through = Some(seq);
        }
    }
    if let Some((&seq, _)) = checkpoints.iter().next() {
        out.problem = Some((
            seq,
            format!(
                "a checkpoint covers event {seq}, which is not in the journal (events were dropped)"
            ),
        ));
    }
    Ok(out)
}

/// A session as recorded, in plain form: what an export bundle carries so that it can be
/// verified offline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawSession {
    pub summary: SessionSummary,
    /// Ascending seq.
    pub events: Vec<RawEvent>,
    pub checkpoints: Vec<ShipCheckpoint>,
}

/// One event's plain stored value (what the chain hashes) and its recorded chain hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEvent {
    pub seq: u64,
    pub value: Vec<u8>,
    pub hash: Option<[u8; 32]>,
}

impl RawSession {
    /// The same checks as [`Reader::verify`], on this in-memory copy.
    pub fn verify(&self) -> Verification {
        let id = self.summary.id;
        let checkpoints = self
            .checkpoints
            .iter()
            .map(|c| (c.seq, c.checkpoint.clone()))
            .collect();
        let events = self
            .events
            .iter()
            .map(|e| Ok((e.seq, Some(e.value.clone()), e.hash)));
        verify_chain(&id, events, checkpoints).unwrap_or_else(|e| Verification {
            events: 0,
            sealed_through: None,
            public_key: None,
            problem: Some((0, e.to_string())),
        })
    }

    /// The decoded events, in order.
    pub fn events(&self) -> impl Iterator<Item = Result<Event, JournalError>> + '_ {
        let id = self.summary.id;
        self.events
            .iter()
            .map(move |e| decode_event(id, e.seq, &e.value))
    }
}

/// What [`Reader::verify`] found for one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Events read.
    pub events: u64,
    /// The last event a valid checkpoint covers (None: no checkpoint).
    pub sealed_through: Option<u64>,
    /// The public key the checkpoints were made with.
    pub public_key: Option<Vec<u8>>,
    /// The first problem: the event's seq and what is wrong.
    pub problem: Option<(u64, String)>,
}

/// The collector's verdict on one session, kept up to date by ingest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Integrity {
    /// The enrolled agent that sent it.
    pub agent: String,
    /// Events 0..next_seq are stored.
    pub next_seq: u64,
    /// The chain hash after event next_seq - 1 (while the chain is unbroken).
    pub tip: [u8; 32],
    /// The last event covered by a checkpoint that verified.
    pub sealed_through: Option<u64>,
    /// True once a gap made the rest of the chain unverifiable here.
    pub broken: bool,
    /// Everything flagged, oldest first.
    pub problems: Vec<String>,
}

impl Integrity {
    /// One word for listings: verified, unsealed (events after the last good checkpoint) or
    /// flagged.
    pub fn verdict(&self) -> String {
        if !self.problems.is_empty() {
            format!("FLAGGED: {}", self.problems.join("; "))
        } else if self.next_seq > 0 && self.sealed_through == Some(self.next_seq - 1) {
            "verified".into()
        } else {
            match self.sealed_through {
                Some(s) => format!("unsealed after event {s}"),
                None => "unsealed".into(),
            }
        }
    }
}

impl Core {
    /// The collector's ingest verdict for `session` (None in an agent's journal).
    pub fn integrity(&self, session: &SessionId) -> Result<Option<Integrity>, JournalError> {
        let Some(family) = self.db.cf_handle(CF_INTEGRITY) else {
            return Ok(None);
        };
        self.db
            .get_cf(family, session.as_bytes())
            .map_err(|source| JournalError::Read { source })?
            .map(|v| decode(&v, || format!("integrity of {session}")))
            .transpose()
    }
}
