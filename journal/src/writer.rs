//! The agent's writer: [`Journal`] (opening, crash recovery at open, requests, the spool's
//! size) and [`SessionRecorder`] (one session's events, numbered, chained, sealed and written
//! in one batch each).
//!
//! Writes go through RocksDB's WAL (on). By default without fsync: an append survives a crash
//! of the agent (the data is in the kernel's page cache), not a power loss. With
//! [`JournalOptions::power_loss_durable`] every write waits for the WAL's fsync, and concurrent
//! writers share one fsync (RocksDB's group commit). An append is a few microseconds and is
//! done inline on the connection's task; a RocksDB write stall therefore slows that connection,
//! which is the intended backpressure: nothing is forwarded that was not recorded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use rocksdb::WriteBatch;

use crate::chain::{ChainState, Signer};
use crate::db::Core;
use crate::error::JournalError;
use crate::model::{
    AccessRequest, AuthInfo, Body, Decision, MaskReport, NoteLevel, Review, SessionId,
    SessionStart, SessionSummary, now_ns,
};
use crate::recovery::{INTERRUPTED, unsealed};
use crate::schema::{
    CF_CHECKPOINTS, CF_EVENTS, CF_HASHES, CF_REQUESTS, FAMILIES, StoredEvent, encode, event_key,
    request_key,
};

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

    /// Seals every session a previous agent left open, with [`INTERRUPTED`].
    fn seal_interrupted(&self) -> Result<Vec<SessionId>, JournalError> {
        let mut sealed = Vec::new();
        for open in unsealed(&self.core)? {
            let id = open.summary.id;
            let recorder = SessionRecorder {
                id,
                journal: self.clone(),
                statements: AtomicU64::new(open.summary.statements),
                summary: std::sync::Mutex::new(open.summary),
                chain: std::sync::Mutex::new(open.chain),
                client_bytes: AtomicU64::new(open.client_bytes),
                server_bytes: AtomicU64::new(open.server_bytes),
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
        self.core.requests()
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
    pub fn masked(&self, report: MaskReport) -> Result<(), JournalError> {
        self.write(Body::Masked(report), false)
    }

    /// Records how the session was authenticated.
    pub fn auth(&self, auth: AuthInfo) -> Result<(), JournalError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::db::Verification;
    use crate::model::{Event, ProcessInfo};
    use crate::reader::Reader;
    use crate::schema::{descriptors, options};
    use rocksdb::{DB, IteratorMode};

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
}
