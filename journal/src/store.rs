//! The RocksDB spool: the shared core ([`Core`]: families, sealing, reading, verifying), the
//! agent's writer ([`Journal`], [`SessionRecorder`]) and the readers' view ([`Reader`]).
//!
//! Writes go through RocksDB's WAL (on). By default without fsync: an append survives a crash
//! of the agent (the data is in the kernel's page cache), not a power loss. With
//! [`JournalOptions::power_loss_durable`] every write waits for the WAL's fsync, and concurrent
//! writers share one fsync (RocksDB's group commit). An append is a few microseconds and is
//! done inline on the connection's task; a RocksDB write stall therefore slows that connection,
//! which is the intended backpressure: nothing is forwarded that was not recorded.
//!
//! [`Reader`] opens the same directory read-only, which works while the agent holds it open: it
//! sees everything written up to the moment it opened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction as IterDirection, IteratorMode, Options, WriteBatch,
};
use serde::{Deserialize, Serialize};

use crate::chain::{ChainState, Checkpoint, Signer, genesis, link, verify_checkpoint};
use crate::hex;
use crate::model::{
    AccessRequest, Body, Decision, Event, NoteLevel, Review, SessionId, SessionStart,
    SessionSummary, now_ns,
};
use crate::seal::{SealError, Sealer};

pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_SESSIONS: &str = "sessions";
pub(crate) const CF_REQUESTS: &str = "requests";
pub(crate) const CF_CHECKPOINTS: &str = "checkpoints";
/// Each event's chain hash h(n), so a verifier can name the exact event that was changed.
pub(crate) const CF_HASHES: &str = "hashes";
/// The agent's shipping cursor per session: events below it are acknowledged by the collector.
pub(crate) const CF_SHIPPED: &str = "shipped";
/// The collector's ingest verdict per session.
pub(crate) const CF_INTEGRITY: &str = "integrity";
const FAMILIES: [&str; 7] = [
    CF_EVENTS,
    CF_SESSIONS,
    CF_REQUESTS,
    CF_CHECKPOINTS,
    CF_HASHES,
    CF_SHIPPED,
    CF_INTEGRITY,
];
/// First byte of every plain stored value: the value format. Bump it when the encoding changes.
pub(crate) const FORMAT: u8 = 1;
/// The end reason of a session its agent never closed, sealed when the agent restarted.
pub const INTERRUPTED: &str =
    "interrupted: the agent stopped without closing this session (sealed when it restarted)";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the journal at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("no journal at {path} (has the agent run with journal_dir set to it?)")]
    Missing { path: PathBuf },
    #[error("journal write failed for session {session}")]
    Write {
        session: SessionId,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot write {what} to the journal")]
    WriteOther {
        what: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot write request {id} to the journal")]
    WriteRequest {
        id: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot use the journal signing key")]
    Key(#[source] crate::chain::KeyError),
    #[error("cannot use the journal's data key")]
    Seal(#[from] SealError),
    #[error("journal read failed")]
    Read {
        #[source]
        source: rocksdb::Error,
    },
    #[error("undecodable journal value at {what}")]
    Decode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode journal value {what}")]
    Encode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("journal value at {what} has unknown format {format} (written by a newer sluice?)")]
    Format { what: String, format: u8 },
    #[error(
        "journal value at {what} does not open with the data key: it was altered or moved, or the journal holds values sealed with another key"
    )]
    Unseal { what: String },
    #[error(
        "journal value at {what} is encrypted, and no data key was given (pass --data-key, or run where the journal's SEALED-WITH file is readable)"
    )]
    Sealed { what: String },
    #[error("no session matches {0:?}")]
    NoSuchSession(String),
    #[error("{prefix:?} matches several sessions: {candidates}")]
    Ambiguous { prefix: String, candidates: String },
}

/// The stored form of an event (the key carries session and seq).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredEvent {
    pub ts_ns: u64,
    pub body: Body,
}

pub(crate) fn encode<T: Serialize>(
    value: &T,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, JournalError> {
    postcard::to_extend(value, vec![FORMAT]).map_err(|source| JournalError::Encode {
        what: what(),
        source,
    })
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: impl Fn() -> String,
) -> Result<T, JournalError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|source| JournalError::Decode {
                what: what(),
                source,
            })
        }
        Some((&format, _)) => Err(JournalError::Format {
            what: what(),
            format,
        }),
        None => Err(JournalError::Format {
            what: what(),
            format: 0,
        }),
    }
}

/// Decodes the plain stored value of event `seq` of `session`.
pub(crate) fn decode_event(
    session: SessionId,
    seq: u64,
    plain: &[u8],
) -> Result<Event, JournalError> {
    let stored: StoredEvent = decode(plain, || format!("event {session}/{seq}"))?;
    Ok(Event {
        session,
        seq,
        ts_ns: stored.ts_ns,
        body: stored.body,
    })
}

pub(crate) fn key_seq(key: &[u8]) -> Result<u64, JournalError> {
    key.get(16..24)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| JournalError::Format {
            what: format!("event key {}", hex(key)),
            format: 0,
        })
}

pub(crate) fn event_key(session: &SessionId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(session.as_bytes());
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts
}

fn descriptors() -> Vec<ColumnFamilyDescriptor> {
    FAMILIES
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, options()))
        .collect()
}

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
            .map(|(seq, checkpoint)| crate::ship::ShipCheckpoint { seq, checkpoint })
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
    pub checkpoints: Vec<crate::ship::ShipCheckpoint>,
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

/// How the agent opens its journal.
#[derive(Clone, Debug, Default)]
pub struct JournalOptions {
    /// Ed25519 PKCS#8 key that signs checkpoints (created at first start, mode 600); None:
    /// chains are kept but not signed.
    pub signing_key: Option<PathBuf>,
    /// 32-byte AES-256-GCM data key (created at first start, mode 600); None: values are
    /// stored in the clear.
    pub encryption_key: Option<PathBuf>,
    /// Every write waits for the WAL's fsync, shared by concurrent writers (group commit).
    pub power_loss_durable: bool,
}

/// The agent's handle on its journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    pub(crate) core: Arc<Core>,
    /// Signs the sessions' chain checkpoints (None: chains are kept but not signed).
    signer: Option<Arc<Signer>>,
    sync: bool,
    /// Sessions sealed at open because a previous agent left them open.
    recovered: Arc<Vec<SessionId>>,
    pub(crate) last_compaction: Arc<std::sync::Mutex<u64>>,
}

impl Journal {
    /// Opens (creating if needed) an unsigned, unsealed journal in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        Journal::open_with(dir, &JournalOptions::default())
    }

    /// Opens (creating if needed) the journal in `dir`, then seals every session a previous
    /// agent left open (killed mid-session) with an end event saying so.
    pub fn open_with(dir: &Path, options: &JournalOptions) -> Result<Journal, JournalError> {
        let signer = match &options.signing_key {
            Some(path) => Some(Arc::new(
                Signer::load_or_create(path).map_err(JournalError::Key)?,
            )),
            None => None,
        };
        let core = Core::open_write(dir, options.encryption_key.as_deref())?;
        let mut journal = Journal {
            core: Arc::new(core),
            signer,
            sync: options.power_loss_durable,
            recovered: Arc::new(Vec::new()),
            last_compaction: Arc::new(std::sync::Mutex::new(0)),
        };
        journal.recovered = Arc::new(journal.seal_interrupted()?);
        Ok(journal)
    }

    /// Opens the journal in `dir`, signing checkpoints with the key in `key`.
    pub fn open_signed(dir: &Path, key: &Path) -> Result<Journal, JournalError> {
        Journal::open_with(
            dir,
            &JournalOptions {
                signing_key: Some(key.to_path_buf()),
                ..JournalOptions::default()
            },
        )
    }

    /// Makes every write wait for the WAL's fsync.
    pub fn power_loss_durable(mut self, on: bool) -> Journal {
        self.sync = on;
        self
    }

    /// The sessions this open found unsealed and sealed as interrupted.
    pub fn recovered(&self) -> &[SessionId] {
        &self.recovered
    }

    /// The raw Ed25519 public key that signs this journal's checkpoints.
    pub fn public_key(&self) -> Option<Vec<u8>> {
        self.signer.as_ref().map(|s| s.public_key())
    }

    pub(crate) fn write_options(&self) -> rocksdb::WriteOptions {
        let mut o = rocksdb::WriteOptions::default();
        o.set_sync(self.sync);
        o
    }

    fn seal_interrupted(&self) -> Result<Vec<SessionId>, JournalError> {
        let mut sealed = Vec::new();
        for summary in self.core.stored_summaries()? {
            if summary.ended_ns.is_some() {
                continue;
            }
            let id = summary.id;
            let mut chain = ChainState::new(&id, now_ns());
            let (mut client, mut server) = (0, 0);
            for item in self.core.raw_events(id, 0)? {
                let (seq, plain) = item?;
                match decode_event(id, seq, &plain)?.body {
                    Body::Client(b) => client += b.len() as u64,
                    Body::Server(b) => server += b.len() as u64,
                    _ => {}
                }
                chain.push(seq, &plain, false, 0);
                chain.next_seq = seq + 1;
            }
            let recorder = SessionRecorder {
                id,
                journal: self.clone(),
                summary: std::sync::Mutex::new(summary.clone()),
                chain: std::sync::Mutex::new(chain),
                statements: AtomicU64::new(summary.statements),
                client_bytes: AtomicU64::new(client),
                server_bytes: AtomicU64::new(server),
            };
            recorder.end(INTERRUPTED)?;
            sealed.push(id);
        }
        Ok(sealed)
    }

    /// Starts recording a session: writes its start event and index entry.
    pub fn start_session(&self, start: SessionStart) -> Result<SessionRecorder, JournalError> {
        let id = SessionId::new();
        let ts = now_ns();
        let summary = SessionSummary {
            id,
            start: start.clone(),
            started_ns: ts,
            ended_ns: None,
            end_reason: None,
            statements: 0,
            client_bytes: 0,
            server_bytes: 0,
            events: 1,
        };
        let recorder = SessionRecorder {
            id,
            journal: self.clone(),
            summary: std::sync::Mutex::new(summary),
            chain: std::sync::Mutex::new(ChainState::new(&id, ts)),
            statements: AtomicU64::new(0),
            client_bytes: AtomicU64::new(0),
            server_bytes: AtomicU64::new(0),
        };
        recorder.write(Body::Start(start), true)?;
        Ok(recorder)
    }

    /// Writes a request's current state (a new request, or a new state of an old one).
    pub fn put_request(&self, request: &AccessRequest) -> Result<(), JournalError> {
        let key = request_key(request);
        let plain = encode(request, || format!("request {}", request.id))?;
        let value = self.core.seal(CF_REQUESTS, &key, plain)?;
        self.core
            .db
            .put_cf_opt(
                self.core.cf(CF_REQUESTS)?,
                key,
                value,
                &self.write_options(),
            )
            .map_err(|source| JournalError::WriteRequest {
                id: request.id.clone(),
                source,
            })
    }

    /// Every request, oldest first, in its latest state.
    pub fn requests(&self) -> Result<Vec<AccessRequest>, JournalError> {
        read_requests(&self.core)
    }

    /// Bytes the spool occupies now: table files plus memtables, over all families.
    pub fn spool_bytes(&self) -> u64 {
        let db = &self.core.db;
        FAMILIES
            .iter()
            .filter_map(|name| db.cf_handle(name))
            .map(|cf| {
                [
                    "rocksdb.total-sst-files-size",
                    "rocksdb.cur-size-all-mem-tables",
                ]
                .iter()
                .filter_map(|p| db.property_int_value_cf(cf, *p).ok().flatten())
                .sum::<u64>()
            })
            .sum()
    }
}

fn request_key(request: &AccessRequest) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + request.id.len());
    key.extend_from_slice(&request.created_ns.to_be_bytes());
    key.extend_from_slice(request.id.as_bytes());
    key
}

fn read_requests(core: &Core) -> Result<Vec<AccessRequest>, JournalError> {
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

/// Records one session. Shared (behind an `Arc`) by the tasks that pump each direction.
pub struct SessionRecorder {
    id: SessionId,
    journal: Journal,
    summary: std::sync::Mutex<SessionSummary>,
    /// The next seq and the running hash chain; held while an event is numbered, linked and
    /// written, so the chain follows the seq order.
    chain: std::sync::Mutex<ChainState>,
    statements: AtomicU64,
    client_bytes: AtomicU64,
    server_bytes: AtomicU64,
}

impl SessionRecorder {
    pub fn id(&self) -> SessionId {
        self.id
    }

    fn lock_summary(&self) -> std::sync::MutexGuard<'_, SessionSummary> {
        // A poisoned lock only means another task panicked mid-update of plain counters.
        self.summary.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records whole messages from the client, carrying `statements` statements.
    pub fn client(&self, data: Bytes, statements: u64) -> Result<(), JournalError> {
        self.statements.fetch_add(statements, Ordering::Relaxed);
        self.client_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.write(Body::Client(data), false)
    }

    /// Records whole messages from the client together with the policy decisions taken on
    /// them, in one write (one write per chunk instead of one more per statement).
    pub fn client_with_decisions(
        &self,
        data: Bytes,
        statements: u64,
        decisions: Vec<Decision>,
    ) -> Result<(), JournalError> {
        if decisions.is_empty() {
            return self.client(data, statements);
        }
        self.statements.fetch_add(statements, Ordering::Relaxed);
        self.client_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut bodies = Vec::with_capacity(decisions.len() + 1);
        bodies.push(Body::Client(data));
        bodies.extend(decisions.into_iter().map(Body::Decision));
        self.commit(bodies, false)
    }

    /// Records whole messages from the server.
    pub fn server(&self, data: Bytes) -> Result<(), JournalError> {
        self.server_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.write(Body::Server(data), false)
    }

    pub fn note(&self, level: NoteLevel, text: impl Into<String>) -> Result<(), JournalError> {
        self.write(
            Body::Note {
                level,
                text: text.into(),
            },
            false,
        )
    }

    /// Records a policy decision.
    pub fn decision(&self, decision: Decision) -> Result<(), JournalError> {
        self.write(Body::Decision(decision), false)
    }

    /// Records what masking changed in one response.
    pub fn masked(&self, report: crate::model::MaskReport) -> Result<(), JournalError> {
        self.write(Body::Masked(report), false)
    }

    /// Records how the session was authenticated.
    pub fn auth(&self, auth: crate::model::AuthInfo) -> Result<(), JournalError> {
        self.write(Body::Auth(auth), false)
    }

    /// Records a held statement's state (held, or what became of it).
    pub fn review(&self, review: Review) -> Result<(), JournalError> {
        self.write(Body::Review(review), false)
    }

    /// Seals the session: the end event and the final index entry, in one batch.
    pub fn end(&self, reason: impl Into<String>) -> Result<(), JournalError> {
        let reason = reason.into();
        {
            let mut s = self.lock_summary();
            s.end_reason = Some(reason.clone());
        }
        self.write(Body::End { reason }, true)
    }

    fn write(&self, body: Body, with_summary: bool) -> Result<(), JournalError> {
        self.commit(vec![body], with_summary)
    }

    /// Numbers, links, seals and writes `bodies` with their chain hashes (and the summary, and
    /// a checkpoint when due) in one batch, under the chain lock.
    fn commit(&self, bodies: Vec<Body>, with_summary: bool) -> Result<(), JournalError> {
        let ts_ns = now_ns();
        let id = self.id;
        let core = &self.journal.core;
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = WriteBatch::default();
        let events = core.cf(CF_EVENTS)?;
        let hashes = core.cf(CF_HASHES)?;
        let mut ended = false;
        let mut last = 0;
        let mut due = false;
        for body in bodies {
            let seq = chain.next_seq;
            let ending = matches!(body, Body::End { .. });
            ended |= ending;
            let value = encode(&StoredEvent { ts_ns, body }, || format!("event {id}/{seq}"))?;
            due |= chain.push(seq, &value, ending, ts_ns);
            let key = event_key(&id, seq);
            batch.put_cf(hashes, key, chain.hash);
            batch.put_cf(events, key, core.seal(CF_EVENTS, &key, value)?);
            chain.next_seq += 1;
            last = seq;
        }
        if due && let Some(signer) = &self.journal.signer {
            let checkpoint = chain.checkpoint(signer, &id, last, ts_ns);
            batch.put_cf(
                core.cf(CF_CHECKPOINTS)?,
                event_key(&id, last),
                encode(&checkpoint, || format!("checkpoint {id}/{last}"))?,
            );
        }
        if with_summary {
            let mut s = self.lock_summary();
            if ended {
                s.ended_ns = Some(ts_ns);
            }
            s.statements = self.statements.load(Ordering::Relaxed);
            s.client_bytes = self.client_bytes.load(Ordering::Relaxed);
            s.server_bytes = self.server_bytes.load(Ordering::Relaxed);
            s.events = chain.next_seq;
            core.put_summary(&mut batch, &s)?;
        }
        core.db
            .write_opt(batch, &self.journal.write_options())
            .map_err(|source| JournalError::Write {
                session: id,
                source,
            })
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

/// A read-only view of a journal directory (an agent's journal or a collector's store); safe
/// to open while its writer runs.
pub struct Reader {
    core: Core,
}

impl Reader {
    /// Opens `dir`, finding its data key (if sealed) through the pointer its writer left.
    pub fn open(dir: &Path) -> Result<Reader, JournalError> {
        Reader::open_with_key(dir, None)
    }

    /// Opens `dir` with the data key in `key` (or the one its pointer names).
    pub fn open_with_key(dir: &Path, key: Option<&Path>) -> Result<Reader, JournalError> {
        if !dir.join("CURRENT").exists() {
            return Err(JournalError::Missing {
                path: dir.to_path_buf(),
            });
        }
        let open = |source| JournalError::Open {
            path: dir.to_path_buf(),
            source,
        };
        // Open the families the directory has: an older journal may lack newer ones.
        let existing = DB::list_cf(&options(), dir).map_err(open)?;
        let families = descriptors()
            .into_iter()
            .filter(|d| existing.iter().any(|name| name == d.name()));
        let db =
            DB::open_cf_descriptors_read_only(&options(), dir, families, false).map_err(open)?;
        let sealer = crate::seal::sealer_for(dir, key)?;
        Ok(Reader {
            core: Core { db, sealer },
        })
    }

    /// Every request, oldest first, in its latest state.
    pub fn requests(&self) -> Result<Vec<AccessRequest>, JournalError> {
        read_requests(&self.core)
    }

    /// Recomputes `session`'s hash chain from its stored events and checks every recorded hash
    /// and checkpoint; reports the first event where anything disagrees: a changed, missing,
    /// inserted or reordered event, a bad signature, or a second signing key.
    pub fn verify(&self, session: &SessionId) -> Result<Verification, JournalError> {
        if self.core.db.cf_handle(CF_CHECKPOINTS).is_none() {
            return verify_chain(session, std::iter::empty(), BTreeMap::new());
        }
        self.core.verify(session)
    }

    /// Everything needed to verify `session` offline (an export bundle).
    pub fn raw_session(&self, session: &SessionId) -> Result<RawSession, JournalError> {
        self.core.raw_session(session)
    }

    /// The collector's ingest verdict for `session` (None in an agent's journal).
    pub fn integrity(
        &self,
        session: &SessionId,
    ) -> Result<Option<crate::collector::Integrity>, JournalError> {
        crate::collector::integrity(&self.core, session)
    }

    /// Every session's index entry, oldest first. For sessions that were never sealed, the
    /// byte and event counters are derived from the events (statements stay as last written).
    pub fn sessions(&self) -> Result<Vec<SessionSummary>, JournalError> {
        self.core.sessions()
    }

    /// Finds a session by its full id or a unique prefix of it.
    pub fn find(&self, prefix: &str) -> Result<SessionSummary, JournalError> {
        let wanted = prefix.trim().to_ascii_lowercase();
        let matches: Vec<SessionSummary> = self
            .sessions()?
            .into_iter()
            .filter(|s| !wanted.is_empty() && s.id.to_string().starts_with(&wanted))
            .collect();
        match matches.len() {
            0 => Err(JournalError::NoSuchSession(prefix.to_string())),
            1 => Ok(matches
                .into_iter()
                .next()
                .ok_or_else(|| JournalError::NoSuchSession(prefix.to_string()))?),
            _ => Err(JournalError::Ambiguous {
                prefix: prefix.to_string(),
                candidates: matches
                    .iter()
                    .map(|s| s.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A session's events in order.
    pub fn events(
        &self,
        session: &SessionId,
    ) -> Result<impl Iterator<Item = Result<Event, JournalError>> + '_, JournalError> {
        self.core.events(session)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::ProcessInfo;

    fn start() -> SessionStart {
        SessionStart {
            target: "app-db".into(),
            protocol: "postgres".into(),
            orig_dst: "127.0.0.1:5432".into(),
            client_addr: "127.0.0.1:40000".into(),
            process: Some(ProcessInfo {
                uid: 1000,
                gid: 1000,
                pid: 42,
                comm: "psql".into(),
                cgroup_id: 7,
                connected_ns: 1,
            }),
            params: vec![("user".into(), "app".into())],
            principal: None,
        }
    }

    #[test]
    fn a_sealed_session_reads_back_in_order_with_its_counters() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let rec = journal.start_session(start()).unwrap();
        rec.client(Bytes::from_static(b"Q\0\0\0\x0dselect 1\0"), 1)
            .unwrap();
        rec.server(Bytes::from_static(b"Z\0\0\0\x05I")).unwrap();
        rec.note(NoteLevel::Info, "hello").unwrap();
        rec.end("client closed").unwrap();
        drop(journal);
        drop(rec);

        let reader = Reader::open(dir.path()).unwrap();
        let sessions = reader.sessions().unwrap();
        assert_eq!(sessions.len(), 1);
        let s = &sessions[0];
        assert_eq!(s.statements, 1);
        assert_eq!(s.client_bytes, 14);
        assert_eq!(s.server_bytes, 6);
        assert_eq!(s.events, 5);
        assert_eq!(s.end_reason.as_deref(), Some("client closed"));
        let events: Vec<Event> = reader.events(&s.id).unwrap().map(|e| e.unwrap()).collect();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
        assert!(matches!(events[0].body, Body::Start(_)));
        assert!(matches!(events[4].body, Body::End { .. }));
        assert_eq!(reader.find(&s.id.to_string()[..8]).unwrap().id, s.id);
    }

    #[test]
    fn a_reader_sees_an_open_session_while_the_writer_holds_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let rec = journal.start_session(start()).unwrap();
        rec.server(Bytes::from_static(b"Z\0\0\0\x05I")).unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        let sessions = reader.sessions().unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].ended_ns, None);
        assert_eq!(sessions[0].server_bytes, 6);
        assert_eq!(sessions[0].events, 2);
    }

    #[test]
    fn a_missing_journal_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Reader::open(&dir.path().join("nope")).err().unwrap();
        assert!(err.to_string().contains("no journal at"), "{err}");
    }

    /// A signed session of `n` client chunks, sealed; returns its id and the journal dir.
    fn signed_session(n: usize) -> (tempfile::TempDir, SessionId) {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open_signed(&dir.path().join("j"), &dir.path().join("key")).unwrap();
        let rec = journal.start_session(start()).unwrap();
        for i in 0..n {
            rec.client(Bytes::from(format!("Q\0\0\0\x0dselect {i}\0")), 1)
                .unwrap();
        }
        rec.end("client closed").unwrap();
        let id = rec.id();
        drop(rec);
        drop(journal);
        (dir, id)
    }

    fn verify(dir: &Path, id: &SessionId) -> Verification {
        Reader::open(&dir.join("j")).unwrap().verify(id).unwrap()
    }

    /// Opens the journal for writing, as an attacker with the files would.
    fn tamper(dir: &Path, f: impl FnOnce(&DB)) {
        let db = DB::open_cf_descriptors(&options(), dir.join("j"), descriptors()).unwrap();
        f(&db);
    }

    #[test]
    fn a_sealed_signed_session_verifies_and_checkpoints_come_every_thousand_events() {
        let (dir, id) = signed_session(2500);
        let v = verify(dir.path(), &id);
        assert_eq!(v.problem, None);
        assert_eq!(v.events, 2502);
        assert_eq!(v.sealed_through, Some(2501));
        let reader = Reader::open(&dir.path().join("j")).unwrap();
        let family = reader.core.db.cf_handle(CF_CHECKPOINTS).unwrap();
        let count = reader
            .core
            .db
            .iterator_cf(family, IteratorMode::Start)
            .count();
        assert_eq!(count, 3, "at 999, 1999 and the end");
        // The key file is the owner's only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn an_altered_dropped_inserted_or_reordered_event_is_found_and_named() {
        // Altered: a byte of event 3 changes.
        let (dir, id) = signed_session(10);
        tamper(dir.path(), |db| {
            let cf = db.cf_handle(CF_EVENTS).unwrap();
            let key = event_key(&id, 3);
            let mut v = db.get_cf(cf, key).unwrap().unwrap();
            let last = v.len() - 2;
            v[last] ^= 1;
            db.put_cf(cf, key, v).unwrap();
        });
        let v = verify(dir.path(), &id);
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(3), "{v:?}");
        assert!(v.problem.unwrap().1.contains("altered"));
        assert_eq!(v.sealed_through, None);

        // Dropped: event 4 is deleted.
        let (dir, id) = signed_session(10);
        tamper(dir.path(), |db| {
            db.delete_cf(db.cf_handle(CF_EVENTS).unwrap(), event_key(&id, 4))
                .unwrap();
        });
        let v = verify(dir.path(), &id);
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(4), "{v:?}");
        assert!(v.problem.unwrap().1.contains("missing"));

        // Reordered: events 2 and 5 swap values.
        let (dir, id) = signed_session(10);
        tamper(dir.path(), |db| {
            let cf = db.cf_handle(CF_EVENTS).unwrap();
            let a = db.get_cf(cf, event_key(&id, 2)).unwrap().unwrap();
            let b = db.get_cf(cf, event_key(&id, 5)).unwrap().unwrap();
            db.put_cf(cf, event_key(&id, 2), b).unwrap();
            db.put_cf(cf, event_key(&id, 5), a).unwrap();
        });
        let v = verify(dir.path(), &id);
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(2), "{v:?}");

        // Inserted at the end, after the last checkpoint: the end's checkpoint no longer
        // covers the last event, which is reported unsealed, and a re-signed checkpoint with
        // another key is refused.
        let (dir, id) = signed_session(3);
        tamper(dir.path(), |db| {
            let cf = db.cf_handle(CF_EVENTS).unwrap();
            let v = db.get_cf(cf, event_key(&id, 1)).unwrap().unwrap();
            db.put_cf(cf, event_key(&id, 5), v).unwrap();
        });
        let v = verify(dir.path(), &id);
        assert_eq!(v.sealed_through, Some(4));
        assert_eq!(v.events, 6);
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(5), "{v:?}");
        assert!(v.problem.unwrap().1.contains("inserted"));
        let other = tempfile::tempdir().unwrap();
        let forger = Signer::load_or_create(&other.path().join("k")).unwrap();
        let (dir, id) = signed_session(3);
        tamper(dir.path(), |db| {
            let mut chain = ChainState::new(&id, 0);
            let events = db.cf_handle(CF_EVENTS).unwrap();
            for seq in 0..5u64 {
                let v = db.get_cf(events, event_key(&id, seq)).unwrap().unwrap();
                chain.push(seq, &v, false, 0);
            }
            let c = chain.checkpoint(&forger, &id, 4, 0);
            db.put_cf(
                db.cf_handle(CF_CHECKPOINTS).unwrap(),
                event_key(&id, 1),
                encode(&c, || "x".into()).unwrap(),
            )
            .unwrap();
        });
        let v = verify(dir.path(), &id);
        assert!(v.problem.is_some(), "{v:?}");
    }

    #[test]
    fn a_power_loss_durable_journal_writes_and_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap().power_loss_durable(true);
        let rec = journal.start_session(start()).unwrap();
        rec.server(Bytes::from_static(b"Z\0\0\0\x05I")).unwrap();
        rec.end("done").unwrap();
        let reader = Reader::open(dir.path()).unwrap();
        assert_eq!(reader.sessions().unwrap()[0].events, 3);
    }

    #[test]
    fn a_corrupt_value_is_an_error_not_a_panic() {
        let err = decode::<StoredEvent>(&[FORMAT, 0xff, 0xff, 0xff], || "x".into())
            .err()
            .unwrap();
        assert!(err.to_string().contains("undecodable"));
        let err = decode::<StoredEvent>(&[9], || "x".into()).err().unwrap();
        assert!(err.to_string().contains("unknown format 9"));
    }
}
