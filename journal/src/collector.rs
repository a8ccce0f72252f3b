//! The collector's store: a journal-format directory (so every read command works on it), into
//! which agents' batches are verified and written, plus the collector's own families.
//!
//! ```text
//! "integrity"  session id -> postcard(Integrity): the agent, the chain's tip, what was flagged
//! ```
//! Ingest recomputes each session's chain from the previous tip: an event extends the chain only
//! when its seq is the next one; its hash is recorded with it. A checkpoint counts only when it
//! signs the recomputed chain with the agent's enrolled key. Anything else (a gap, a bad or
//! foreign signature, a second different copy of an event) is written as it came **and**
//! flagged in the session's integrity record, which `sluice verify` and `sluice sessions` show:
//! nothing unverified is stored as good. An identical copy of a stored event is absorbed.

use std::collections::HashMap;
use std::path::Path;

use rocksdb::WriteBatch;

use crate::chain::{genesis, link, verify_checkpoint};
use crate::db::{Core, Integrity};
use crate::error::JournalError;
use crate::model::SessionSummary;
use crate::schema::{CF_CHECKPOINTS, CF_EVENTS, CF_HASHES, CF_INTEGRITY, encode, event_key};
use crate::wire::{IngestReport, SessionAck, ShipBatch, ShipSession};

/// The collector's store. One process writes it; readers open it with [`crate::Reader`].
pub struct Store {
    core: Core,
    /// Serializes ingests: each reads a session's tip and writes the next one.
    ingest: std::sync::Mutex<()>,
}

impl Store {
    /// Opens (creating) the store in `dir`, sealing values with the key in `encryption_key`.
    pub fn open(dir: &Path, encryption_key: Option<&Path>) -> Result<Store, JournalError> {
        Ok(Store {
            core: Core::open_write(dir, encryption_key)?,
            ingest: std::sync::Mutex::new(()),
        })
    }

    fn synced() -> rocksdb::WriteOptions {
        let mut o = rocksdb::WriteOptions::default();
        o.set_sync(true);
        o
    }

    /// Verifies and stores `batch` from the agent `agent` whose enrolled Ed25519 key is
    /// `public_key`, in one synced write: when this returns Ok, the acknowledged events are
    /// durable.
    pub fn ingest(
        &self,
        agent: &str,
        public_key: &[u8],
        batch: &ShipBatch,
    ) -> Result<IngestReport, JournalError> {
        let _one = self.ingest.lock().unwrap_or_else(|e| e.into_inner());
        let mut write = WriteBatch::default();
        let mut report = IngestReport {
            sessions: Vec::new(),
        };
        for session in &batch.sessions {
            report
                .sessions
                .push(self.ingest_session(agent, public_key, session, &mut write)?);
        }
        self.core
            .db
            .write_opt(write, &Store::synced())
            .map_err(|source| JournalError::WriteOther {
                what: format!("a batch from agent {agent}"),
                source,
            })?;
        Ok(report)
    }

    fn ingest_session(
        &self,
        agent: &str,
        public_key: &[u8],
        s: &ShipSession,
        write: &mut WriteBatch,
    ) -> Result<SessionAck, JournalError> {
        let core = &self.core;
        let id = s.summary.id;
        let mut state = core.integrity(&id)?.unwrap_or_else(|| Integrity {
            agent: agent.to_string(),
            next_seq: 0,
            tip: genesis(&id),
            sealed_through: None,
            broken: false,
            problems: Vec::new(),
        });
        let problems_before = state.problems.len();
        if state.agent != agent {
            state.problems.push(format!(
                "agent {agent} sent events of this session, which agent {} recorded; they were refused",
                state.agent
            ));
            write.put_cf(
                core.cf(CF_INTEGRITY)?,
                id.as_bytes(),
                encode(&state, || format!("integrity of {id}"))?,
            );
            return Ok(SessionAck {
                session: id,
                next_seq: 0,
                problems: state.problems.split_off(problems_before),
            });
        }
        // Hashes computed in this batch, not yet readable from the store.
        let mut fresh: HashMap<u64, [u8; 32]> = HashMap::new();
        for event in &s.events {
            let seq = event.seq;
            let key = event_key(&id, seq);
            if seq < state.next_seq {
                // A copy of a stored event: absorbed when identical.
                let previous = match seq {
                    0 => Some(genesis(&id)),
                    _ => match fresh.get(&(seq - 1)) {
                        Some(h) => Some(*h),
                        None => core.hash(&id, seq - 1)?,
                    },
                };
                let stored = match fresh.get(&seq) {
                    Some(h) => Some(*h),
                    None => core.hash(&id, seq)?,
                };
                let same = matches!((previous, stored), (Some(p), Some(h)) if link(&p, seq, &event.value) == h);
                if !same && !state.broken {
                    state.problems.push(format!(
                        "event {seq} arrived again with different content; the first copy is kept"
                    ));
                }
                continue;
            }
            if seq > state.next_seq && !state.broken {
                state.problems.push(format!(
                    "events {} to {} never arrived; the chain cannot be verified from event {} on",
                    state.next_seq,
                    seq - 1,
                    state.next_seq
                ));
                state.broken = true;
            }
            if !state.broken {
                let computed = link(&state.tip, seq, &event.value);
                // The chain goes on from the hash the agent recorded (its checkpoints sign that
                // chain); a value that does not match it is flagged here, and named by
                // `sluice verify` on the store, which finds the stored hash disagreeing.
                state.tip = match event.hash {
                    Some(recorded) if recorded != computed => {
                        state.problems.push(format!(
                            "event {seq} does not match the hash its agent recorded: it was altered after it was recorded"
                        ));
                        recorded
                    }
                    _ => computed,
                };
                fresh.insert(seq, state.tip);
                write.put_cf(core.cf(CF_HASHES)?, key, state.tip);
            }
            write.put_cf(
                core.cf(CF_EVENTS)?,
                key,
                core.seal(CF_EVENTS, &key, event.value.clone())?,
            );
            state.next_seq = seq + 1;
        }
        for c in &s.checkpoints {
            let seq = c.seq;
            let chain = match fresh.get(&seq) {
                Some(h) => Some(*h),
                None if !state.broken => core.hash(&id, seq)?,
                None => None,
            };
            if c.checkpoint.public_key != public_key {
                state.problems.push(format!(
                    "the checkpoint at event {seq} is signed with a key that is not agent {agent}'s enrolled key"
                ));
            } else if let Some(chain) = chain {
                if verify_checkpoint(&id, seq, &chain, &c.checkpoint) {
                    state.sealed_through = Some(state.sealed_through.map_or(seq, |s| s.max(seq)));
                } else {
                    state.problems.push(format!(
                        "the checkpoint at event {seq} does not verify: its signature or chain is wrong, or an event up to {seq} was altered"
                    ));
                }
            } else {
                state.problems.push(format!(
                    "the checkpoint at event {seq} cannot be checked: the events it covers did not all arrive"
                ));
            }
            write.put_cf(
                core.cf(CF_CHECKPOINTS)?,
                event_key(&id, seq),
                encode(&c.checkpoint, || format!("checkpoint {id}/{seq}"))?,
            );
        }
        let mut summary = s.summary.clone();
        if summary.ended_ns.is_none() {
            summary.events = state.next_seq;
        }
        core.put_summary(write, &summary)?;
        write.put_cf(
            core.cf(CF_INTEGRITY)?,
            id.as_bytes(),
            encode(&state, || format!("integrity of {id}"))?,
        );
        Ok(SessionAck {
            session: id,
            next_seq: state.next_seq,
            problems: state.problems[problems_before..].to_vec(),
        })
    }

    /// Every session's summary and integrity verdict, oldest first.
    pub fn sessions(&self) -> Result<Vec<(SessionSummary, Option<Integrity>)>, JournalError> {
        self.core
            .sessions()?
            .into_iter()
            .map(|s| {
                let i = self.core.integrity(&s.id)?;
                Ok((s, i))
            })
            .collect()
    }

    /// Retention: deletes every session that ended (or, never sealed, started) before
    /// `cutoff_ns`, and returns their summaries. The caller records the purge.
    pub fn purge_before(&self, cutoff_ns: u64) -> Result<Vec<SessionSummary>, JournalError> {
        let _one = self.ingest.lock().unwrap_or_else(|e| e.into_inner());
        let mut write = WriteBatch::default();
        let mut purged = Vec::new();
        for summary in self.core.stored_summaries()? {
            if summary.ended_ns.unwrap_or(summary.started_ns) < cutoff_ns {
                self.core.delete_session(&mut write, &summary.id)?;
                purged.push(summary);
            }
        }
        self.core
            .db
            .write_opt(write, &Store::synced())
            .map_err(|source| JournalError::WriteOther {
                what: "a retention purge".into(),
                source,
            })?;
        if !purged.is_empty() {
            for family in [CF_EVENTS, CF_HASHES, CF_CHECKPOINTS] {
                self.core
                    .db
                    .compact_range_cf(self.core.cf(family)?, None::<&[u8]>, None::<&[u8]>);
            }
        }
        Ok(purged)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::model::{NoteLevel, SessionId, SessionStart};
    use crate::reader::Reader;
    use crate::writer::{Journal, JournalOptions};

    fn start() -> SessionStart {
        SessionStart {
            target: "app-db".into(),
            protocol: "postgres".into(),
            orig_dst: "127.0.0.1:5432".into(),
            client_addr: "127.0.0.1:40000".into(),
            process: None,
            params: vec![("user".into(), "app".into())],
            principal: None,
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        journal: Journal,
        journal_dir: std::path::PathBuf,
        store: Store,
        store_dir: std::path::PathBuf,
        key: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("journal");
        let journal = Journal::open_with(
            &journal_dir,
            &JournalOptions {
                signing_key: Some(dir.path().join("signing.key")),
                encryption_key: Some(dir.path().join("data.key")),
                power_loss_durable: false,
            },
        )
        .unwrap();
        let store_dir = dir.path().join("store");
        let store = Store::open(&store_dir, Some(&dir.path().join("store.key"))).unwrap();
        let key = journal.public_key().unwrap();
        Fixture {
            _dir: dir,
            journal,
            journal_dir,
            store,
            store_dir,
            key,
        }
    }

    fn record(journal: &Journal, statements: usize) -> SessionId {
        let rec = journal.start_session(start()).unwrap();
        for i in 0..statements {
            rec.client(Bytes::from(format!("Q\0\0\0\x0dselect {i}\0")), 1)
                .unwrap();
            rec.server(Bytes::from_static(b"Z\0\0\0\x05I")).unwrap();
        }
        rec.end("client closed").unwrap();
        rec.id()
    }

    /// Ships everything, batch by batch (bounded), returning the reports.
    fn ship_all(f: &Fixture, max_events: usize) -> Vec<IngestReport> {
        let mut reports = Vec::new();
        for _ in 0..1000 {
            let Some(batch) = f.journal.next_batch(max_events, 1 << 20).unwrap() else {
                return reports;
            };
            let wire = ShipBatch::decode(&batch.encode().unwrap()).unwrap();
            let report = f.store.ingest("bastion-1", &f.key, &wire).unwrap();
            let report = IngestReport::decode(&report.encode().unwrap()).unwrap();
            f.journal.acknowledge(&report).unwrap();
            reports.push(report);
        }
        panic!("shipping did not finish");
    }

    #[test]
    fn shipped_sessions_arrive_verified_and_leave_the_spool() {
        let f = fixture();
        let a = record(&f.journal, 30);
        let b = record(&f.journal, 5);
        // An open session ships what it has and stays in the spool.
        let open = f.journal.start_session(start()).unwrap();
        open.note(NoteLevel::Info, "still here").unwrap();
        assert_eq!(f.journal.backlog().unwrap().events, 62 + 12 + 2);
        let reports = ship_all(&f, 7);
        assert!(reports.len() > 10, "small batches: {}", reports.len());
        assert!(
            reports
                .iter()
                .all(|r| r.sessions.iter().all(|s| s.problems.is_empty()))
        );
        assert_eq!(f.journal.backlog().unwrap().events, 0);
        let sessions = f.store.sessions().unwrap();
        assert_eq!(sessions.len(), 3);
        for (summary, integrity) in &sessions {
            let integrity = integrity.as_ref().unwrap();
            assert!(integrity.problems.is_empty(), "{integrity:?}");
            if summary.id != open.id() {
                assert_eq!(integrity.verdict(), "verified");
            }
        }
        // The spool keeps only the open session.
        let left: Vec<SessionId> = f
            .journal
            .core
            .stored_summaries()
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(left, vec![open.id()]);
        // The store reads like a journal, with the collector's own key, and verifies.
        let reader = Reader::open(&f.store_dir).unwrap();
        for id in [a, b] {
            let v = reader.verify(&id).unwrap();
            assert_eq!(v.problem, None);
            assert_eq!(v.public_key.as_deref(), Some(f.key.as_slice()));
        }
        assert_eq!(reader.find(&a.to_string()).unwrap().events, 62);
        // The open session's tail ships once it ends.
        open.note(NoteLevel::Info, "more").unwrap();
        open.end("client closed").unwrap();
        ship_all(&f, 100);
        assert!(f.journal.core.stored_summaries().unwrap().is_empty());
        let reader = Reader::open(&f.store_dir).unwrap();
        assert_eq!(reader.verify(&open.id()).unwrap().problem, None);
        assert_eq!(reader.find(&open.id().to_string()).unwrap().events, 4);
    }

    #[test]
    fn a_replayed_batch_is_absorbed_and_the_store_is_unchanged() {
        let f = fixture();
        let id = record(&f.journal, 3);
        let batch = f.journal.next_batch(100, 1 << 20).unwrap().unwrap();
        let first = f.store.ingest("bastion-1", &f.key, &batch).unwrap();
        let again = f.store.ingest("bastion-1", &f.key, &batch).unwrap();
        assert_eq!(first, again);
        assert!(again.sessions[0].problems.is_empty());
        let reader = Reader::open(&f.store_dir).unwrap();
        assert_eq!(reader.events(&id).unwrap().count(), 8);
        assert_eq!(reader.verify(&id).unwrap().problem, None);
    }

    #[test]
    fn altered_foreign_or_gapped_batches_are_stored_flagged_never_as_good() {
        // Altered: an event's bytes change after the agent recorded them.
        let f = fixture();
        let id = record(&f.journal, 3);
        let mut batch = f.journal.next_batch(100, 1 << 20).unwrap().unwrap();
        let v = &mut batch.sessions[0].events[2].value;
        let last = v.len() - 2;
        v[last] ^= 1;
        let report = f.store.ingest("bastion-1", &f.key, &batch).unwrap();
        let problems = &report.sessions[0].problems;
        assert_eq!(problems.len(), 1, "{report:?}");
        assert!(
            problems[0].contains("event 2 does not match the hash"),
            "{report:?}"
        );
        let reader = Reader::open(&f.store_dir).unwrap();
        let integrity = reader.integrity(&id).unwrap().unwrap();
        assert!(integrity.verdict().starts_with("FLAGGED"), "{integrity:?}");
        let v = reader.verify(&id).unwrap();
        assert_eq!(v.problem.map(|p| p.0), Some(2), "named exactly");

        // Altered in a batch without recorded hashes (as an agent from before them sends):
        // the checkpoint that covers it does not verify.
        let f = fixture();
        record(&f.journal, 3);
        let mut batch = f.journal.next_batch(100, 1 << 20).unwrap().unwrap();
        for event in &mut batch.sessions[0].events {
            event.hash = None;
        }
        let event = &mut batch.sessions[0].events[2];
        let last = event.value.len() - 2;
        event.value[last] ^= 1;
        let report = f.store.ingest("bastion-1", &f.key, &batch).unwrap();
        assert!(
            report.sessions[0].problems[0].contains("does not verify"),
            "{report:?}"
        );

        // Signed with another key than the enrolled one.
        let f = fixture();
        record(&f.journal, 1);
        let batch = f.journal.next_batch(100, 1 << 20).unwrap().unwrap();
        let report = f.store.ingest("bastion-1", &[7u8; 32], &batch).unwrap();
        assert!(report.sessions[0].problems[0].contains("not agent bastion-1's"));

        // A gap: the first events never arrive.
        let f = fixture();
        let id = record(&f.journal, 3);
        let mut batch = f.journal.next_batch(100, 1 << 20).unwrap().unwrap();
        batch.sessions[0].events.drain(..2);
        let report = f.store.ingest("bastion-1", &f.key, &batch).unwrap();
        assert!(
            report.sessions[0].problems[0].contains("never arrived"),
            "{report:?}"
        );
        let v = Reader::open(&f.store_dir).unwrap().verify(&id).unwrap();
        assert_eq!(v.problem.map(|p| p.0), Some(0));

        // Another agent claiming the session is refused.
        let f = fixture();
        record(&f.journal, 1);
        let batch = f.journal.next_batch(100, 1 << 20).unwrap().unwrap();
        f.store.ingest("bastion-1", &f.key, &batch).unwrap();
        let report = f.store.ingest("bastion-2", &f.key, &batch).unwrap();
        assert!(report.sessions[0].problems[0].contains("which agent bastion-1 recorded"));
    }

    #[test]
    fn an_interrupted_session_is_sealed_at_restart_and_ships_verified() {
        let f = fixture();
        let rec = f.journal.start_session(start()).unwrap();
        rec.client(Bytes::from_static(b"Q\0\0\0\x0dselect 1\0"), 1)
            .unwrap();
        let id = rec.id();
        // The agent dies: nothing more is written, the handles go away.
        drop(rec);
        let Fixture {
            _dir,
            journal,
            journal_dir,
            store,
            store_dir,
            key,
        } = f;
        drop(journal);
        let journal = Journal::open_with(
            &journal_dir,
            &JournalOptions {
                signing_key: Some(_dir.path().join("signing.key")),
                encryption_key: Some(_dir.path().join("data.key")),
                power_loss_durable: false,
            },
        )
        .unwrap();
        assert_eq!(journal.recovered(), &[id]);
        let reader = Reader::open(&journal_dir).unwrap();
        let s = reader.find(&id.to_string()).unwrap();
        assert_eq!(s.end_reason.as_deref(), Some(crate::recovery::INTERRUPTED));
        assert_eq!(s.events, 3);
        let v = reader.verify(&id).unwrap();
        assert_eq!((v.problem, v.sealed_through), (None, Some(2)));
        let batch = journal.next_batch(100, 1 << 20).unwrap().unwrap();
        let report = store.ingest("bastion-1", &key, &batch).unwrap();
        assert_eq!(report.sessions[0].next_seq, 3);
        assert_eq!(journal.acknowledge(&report).unwrap(), 1);
        let (summary, integrity) = &store.sessions().unwrap()[0];
        assert_eq!(
            summary.end_reason.as_deref(),
            Some(crate::recovery::INTERRUPTED)
        );
        assert_eq!(integrity.as_ref().unwrap().verdict(), "verified");
        drop(store);
        assert_eq!(
            Reader::open(&store_dir)
                .unwrap()
                .verify(&id)
                .unwrap()
                .problem,
            None
        );
    }

    #[test]
    fn the_journal_is_encrypted_at_rest_and_the_reader_finds_its_key() {
        let f = fixture();
        let rec = f.journal.start_session(start()).unwrap();
        rec.client(
            Bytes::from_static(b"Q\0\0\0\x1dselect 'secret-marker-42'\0"),
            1,
        )
        .unwrap();
        rec.end("client closed").unwrap();
        let id = rec.id();
        drop(rec);
        let Fixture {
            _dir,
            journal,
            journal_dir,
            ..
        } = f;
        drop(journal);
        // No file of the journal holds the statement in the clear.
        for entry in std::fs::read_dir(&journal_dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(16).any(|w| w == b"secret-marker-42"));
        }
        let reader = Reader::open(&journal_dir).unwrap();
        assert_eq!(reader.verify(&id).unwrap().problem, None);
        let texts: Vec<String> = reader
            .events(&id)
            .unwrap()
            .map(|e| format!("{:?}", e.unwrap().body))
            .collect();
        assert!(texts.iter().any(|t| t.contains("secret-marker-42")));
        // Another key is named as the wrong one.
        let other = _dir.path().join("other.key");
        crate::seal::Sealer::load_or_create(&other).unwrap();
        let err = Reader::open_with_key(&journal_dir, Some(&other))
            .err()
            .unwrap();
        assert!(err.to_string().contains("data key") || format!("{err:?}").contains("WrongKey"));
    }

    #[test]
    fn tampering_with_the_collectors_store_is_named_at_the_first_bad_event() {
        use crate::schema::{CF_EVENTS, event_key};
        // Each case: a fresh store holding one verified session of 12 events, then a change
        // made by someone with the store's files and its data key.
        type Tamper = fn(&Core, &SessionId);
        let cases: [(&str, u64, Tamper); 4] = [
            ("altered", 4, |core, id| {
                let key = event_key(id, 4);
                let stored = core
                    .db
                    .get_cf(core.cf(CF_EVENTS).unwrap(), key)
                    .unwrap()
                    .unwrap();
                let mut plain = core.unseal(CF_EVENTS, &key, &stored).unwrap();
                let last = plain.len() - 2;
                plain[last] ^= 1;
                let sealed = core.seal(CF_EVENTS, &key, plain).unwrap();
                core.db
                    .put_cf(core.cf(CF_EVENTS).unwrap(), key, sealed)
                    .unwrap();
            }),
            ("dropped", 6, |core, id| {
                core.db
                    .delete_cf(core.cf(CF_EVENTS).unwrap(), event_key(id, 6))
                    .unwrap();
            }),
            ("reordered", 3, |core, id| {
                let cf = core.cf(CF_EVENTS).unwrap();
                let (k3, k7) = (event_key(id, 3), event_key(id, 7));
                let a = core
                    .unseal(CF_EVENTS, &k3, &core.db.get_cf(cf, k3).unwrap().unwrap())
                    .unwrap();
                let b = core
                    .unseal(CF_EVENTS, &k7, &core.db.get_cf(cf, k7).unwrap().unwrap())
                    .unwrap();
                core.db
                    .put_cf(cf, k3, core.seal(CF_EVENTS, &k3, b).unwrap())
                    .unwrap();
                core.db
                    .put_cf(cf, k7, core.seal(CF_EVENTS, &k7, a).unwrap())
                    .unwrap();
            }),
            ("inserted", 12, |core, id| {
                let cf = core.cf(CF_EVENTS).unwrap();
                let (k1, k12) = (event_key(id, 1), event_key(id, 12));
                let v = core
                    .unseal(CF_EVENTS, &k1, &core.db.get_cf(cf, k1).unwrap().unwrap())
                    .unwrap();
                core.db
                    .put_cf(cf, k12, core.seal(CF_EVENTS, &k12, v).unwrap())
                    .unwrap();
            }),
        ];
        for (what, bad, tamper) in cases {
            let f = fixture();
            let id = record(&f.journal, 5);
            ship_all(&f, 100);
            assert_eq!(
                Reader::open(&f.store_dir)
                    .unwrap()
                    .verify(&id)
                    .unwrap()
                    .problem,
                None
            );
            tamper(&f.store.core, &id);
            let v = Reader::open(&f.store_dir).unwrap().verify(&id).unwrap();
            assert_eq!(v.problem.as_ref().map(|p| p.0), Some(bad), "{what}: {v:?}");
        }
    }

    #[test]
    fn retention_purges_old_sessions_only() {
        let f = fixture();
        let old = record(&f.journal, 1);
        ship_all(&f, 100);
        let cutoff = crate::model::now_ns();
        let young = record(&f.journal, 1);
        ship_all(&f, 100);
        let purged = f.store.purge_before(cutoff).unwrap();
        assert_eq!(purged.iter().map(|s| s.id).collect::<Vec<_>>(), vec![old]);
        let left: Vec<SessionId> = f.store.sessions().unwrap().iter().map(|s| s.0.id).collect();
        assert_eq!(left, vec![young]);
    }
}
