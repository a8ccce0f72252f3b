//! The RocksDB spool: the agent's writer ([`Journal`], [`SessionRecorder`]) and the readers'
//! view ([`Reader`]).
//!
//! Writes go through RocksDB's WAL (on). By default without fsync: an append survives a crash
//! of the agent (the data is in the kernel's page cache), not a power loss. With
//! [`Journal::power_loss_durable`] every write waits for the WAL's fsync, and concurrent writers
//! share one fsync (RocksDB's group commit). An append is a few microseconds and is done inline on the connection's
//! task; a RocksDB write stall therefore slows that connection, which is the intended
//! backpressure: nothing is forwarded that was not recorded.
//!
//! [`Reader`] opens the same directory read-only, which works while the agent holds it open: it
//! sees everything written up to the moment it opened.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction as IterDirection, IteratorMode, Options, WriteBatch,
};
use serde::{Deserialize, Serialize};

use crate::chain::{ChainState, Checkpoint, Signer, genesis, link, verify_checkpoint};
use crate::model::{
    AccessRequest, Body, Decision, Event, NoteLevel, Review, SessionId, SessionStart,
    SessionSummary, now_ns,
};

const CF_EVENTS: &str = "events";
const CF_SESSIONS: &str = "sessions";
const CF_REQUESTS: &str = "requests";
const CF_CHECKPOINTS: &str = "checkpoints";
/// First byte of every stored value: the value format. Bump it when the encoding changes.
const FORMAT: u8 = 1;

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
    #[error("cannot write request {id} to the journal")]
    WriteRequest {
        id: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot use the journal signing key")]
    Key(#[source] crate::chain::KeyError),
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
    #[error("no session matches {0:?}")]
    NoSuchSession(String),
    #[error("{prefix:?} matches several sessions: {candidates}")]
    Ambiguous { prefix: String, candidates: String },
}

/// The stored form of an event (the key carries session and seq).
#[derive(Serialize, Deserialize)]
struct StoredEvent {
    ts_ns: u64,
    body: Body,
}

fn encode<T: Serialize>(value: &T, what: impl Fn() -> String) -> Result<Vec<u8>, JournalError> {
    postcard::to_extend(value, vec![FORMAT]).map_err(|source| JournalError::Encode {
        what: what(),
        source,
    })
}

fn decode<'a, T: Deserialize<'a>>(
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

fn key_seq(key: &[u8]) -> Result<u64, JournalError> {
    key.get(16..24)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| JournalError::Format {
            what: format!("event key {}", hex(key)),
            format: 0,
        })
}

fn event_key(session: &SessionId, seq: u64) -> [u8; 24] {
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
    [CF_EVENTS, CF_SESSIONS, CF_REQUESTS, CF_CHECKPOINTS]
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, options()))
        .collect()
}

/// The agent's handle on its journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Arc<DB>,
    /// Signs the sessions' chain checkpoints (None: chains are kept but not signed).
    signer: Option<Arc<Signer>>,
    /// Every write waits for the WAL's fsync (power-loss durability); concurrent writers share
    /// one fsync (RocksDB's group commit).
    sync: bool,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        let db = DB::open_cf_descriptors(&options(), dir, descriptors()).map_err(|source| {
            JournalError::Open {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        Ok(Journal {
            db: Arc::new(db),
            signer: None,
            sync: false,
        })
    }

    /// Makes every write wait for the WAL's fsync, so what was forwarded survives a power
    /// loss, not only an agent crash. Writes from all connections that arrive together share
    /// one fsync (group commit).
    pub fn power_loss_durable(mut self, on: bool) -> Journal {
        self.sync = on;
        self
    }

    fn write_options(&self) -> rocksdb::WriteOptions {
        let mut o = rocksdb::WriteOptions::default();
        o.set_sync(self.sync);
        o
    }

    /// Opens the journal in `dir`, signing checkpoints with the key in `key` (created on first
    /// use, mode 600).
    pub fn open_signed(dir: &Path, key: &Path) -> Result<Journal, JournalError> {
        let signer = Signer::load_or_create(key).map_err(JournalError::Key)?;
        let mut journal = Journal::open(dir)?;
        journal.signer = Some(Arc::new(signer));
        Ok(journal)
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
        let value = encode(request, || format!("request {}", request.id))?;
        self.db
            .put_cf_opt(
                self.cf(CF_REQUESTS)?,
                request_key(request),
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
        read_requests(&self.db)
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, JournalError> {
        cf(&self.db, name)
    }
}

fn request_key(request: &AccessRequest) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + request.id.len());
    key.extend_from_slice(&request.created_ns.to_be_bytes());
    key.extend_from_slice(request.id.as_bytes());
    key
}

fn read_requests(db: &DB) -> Result<Vec<AccessRequest>, JournalError> {
    let Some(family) = db.cf_handle(CF_REQUESTS) else {
        // A journal written before requests existed.
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in db.iterator_cf(family, IteratorMode::Start) {
        let (key, value) = item.map_err(|source| JournalError::Read { source })?;
        out.push(decode(&value, || format!("request {}", hex(&key)))?);
    }
    Ok(out)
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, JournalError> {
    db.cf_handle(name).ok_or_else(|| JournalError::Format {
        what: format!("column family {name}"),
        format: 0,
    })
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

    /// Numbers, links and writes `bodies` (and the summary, and a checkpoint when due) in one
    /// batch, under the chain lock.
    fn commit(&self, bodies: Vec<Body>, with_summary: bool) -> Result<(), JournalError> {
        let ts_ns = now_ns();
        let id = self.id();
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let mut batch = WriteBatch::default();
        let events = self.journal.cf(CF_EVENTS)?;
        let mut ended = false;
        let mut last = 0;
        let mut due = false;
        for body in bodies {
            let seq = chain.next_seq;
            let ending = matches!(body, Body::End { .. });
            ended |= ending;
            let value = encode(&StoredEvent { ts_ns, body }, || format!("event {id}/{seq}"))?;
            due |= chain.push(seq, &value, ending, ts_ns);
            batch.put_cf(events, event_key(&id, seq), value);
            chain.next_seq += 1;
            last = seq;
        }
        if due && let Some(signer) = &self.journal.signer {
            let checkpoint = chain.checkpoint(signer, &id, last, ts_ns);
            batch.put_cf(
                self.journal.cf(CF_CHECKPOINTS)?,
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
            batch.put_cf(
                self.journal.cf(CF_SESSIONS)?,
                id.as_bytes(),
                encode(&*s, || format!("session {id}"))?,
            );
        }
        self.journal
            .db
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

/// A read-only view of a journal directory; safe to open while the agent writes to it.
pub struct Reader {
    db: DB,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Reader, JournalError> {
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
        Ok(Reader { db })
    }

    /// Every request, oldest first, in its latest state.
    pub fn requests(&self) -> Result<Vec<AccessRequest>, JournalError> {
        read_requests(&self.db)
    }

    /// Recomputes `session`'s hash chain from its stored events and checks every checkpoint's
    /// chain and signature; reports the first event where anything disagrees (a changed,
    /// missing, inserted or reordered event, a bad signature, or a second signing key).
    pub fn verify(&self, session: &SessionId) -> Result<Verification, JournalError> {
        let prefix = *session.as_bytes();
        let mut checkpoints: std::collections::BTreeMap<u64, Checkpoint> = Default::default();
        if let Some(family) = self.db.cf_handle(CF_CHECKPOINTS) {
            for item in self
                .db
                .iterator_cf(family, IteratorMode::From(&prefix, IterDirection::Forward))
            {
                let (key, value) = item.map_err(|source| JournalError::Read { source })?;
                if !key.starts_with(&prefix) {
                    break;
                }
                let seq = key_seq(&key)?;
                checkpoints.insert(
                    seq,
                    decode(&value, || format!("checkpoint {session}/{seq}"))?,
                );
            }
        }
        let mut out = Verification {
            events: 0,
            sealed_through: None,
            public_key: checkpoints.values().next().map(|c| c.public_key.clone()),
            problem: None,
        };
        let mut hash = genesis(session);
        let events = self.db.iterator_cf(
            cf(&self.db, CF_EVENTS)?,
            IteratorMode::From(&prefix, IterDirection::Forward),
        );
        for (expected, item) in (0u64..).zip(events) {
            let (key, value) = item.map_err(|source| JournalError::Read { source })?;
            if !key.starts_with(&prefix) {
                break;
            }
            let seq = key_seq(&key)?;
            if seq != expected {
                out.problem = Some((
                    expected,
                    format!("event {expected} is missing (the next stored event is {seq})"),
                ));
                return Ok(out);
            }
            hash = link(&hash, seq, &value);
            out.events += 1;
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
                            "the chain does not match the signed checkpoint at event {seq}: an event from {from} to {seq} was changed, inserted or reordered, or the checkpoint was forged"
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

    /// Every session's index entry, oldest first. For sessions that were never sealed, the
    /// byte and event counters are derived from the events (statements stay as last written).
    pub fn sessions(&self) -> Result<Vec<SessionSummary>, JournalError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf(&self.db, CF_SESSIONS)?, IteratorMode::Start)
        {
            let (key, value) = item.map_err(|source| JournalError::Read { source })?;
            let mut summary: SessionSummary = decode(&value, || format!("session {}", hex(&key)))?;
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
            out.push(summary);
        }
        Ok(out)
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
        let prefix = *session.as_bytes();
        let session = *session;
        let iter = self.db.iterator_cf(
            cf(&self.db, CF_EVENTS)?,
            IteratorMode::From(&prefix, IterDirection::Forward),
        );
        Ok(iter
            .take_while(move |item| match item {
                Ok((key, _)) => key.starts_with(&prefix),
                Err(_) => true,
            })
            .map(move |item| {
                let (key, value) = item.map_err(|source| JournalError::Read { source })?;
                let seq = key
                    .get(16..24)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| JournalError::Format {
                        what: format!("event key {}", hex(&key)),
                        format: 0,
                    })?;
                let stored: StoredEvent = decode(&value, || format!("event {session}/{seq}"))?;
                Ok(Event {
                    session,
                    seq,
                    ts_ns: stored.ts_ns,
                    body: stored.body,
                })
            }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
        let family = reader.db.cf_handle(CF_CHECKPOINTS).unwrap();
        let count = reader.db.iterator_cf(family, IteratorMode::Start).count();
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
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(11), "{v:?}");
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
        assert!(verify(dir.path(), &id).problem.is_some());

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
