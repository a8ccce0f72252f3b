//! Reading the journal back: `sluice sessions` (with filters), `sluice replay` (optionally
//! with the recorded timing), `sluice export` (with a verification bundle), `sluice verify`
//! (of a journal, or offline of a bundle and its export), and the listings of requests and
//! grants.
//!
//! Everything here works on a [`sluice_journal::Reader`] (read-only, safe while the agent runs)
//! over an agent's journal or a collector's store (same format; the store adds the
//! collector's integrity verdicts), and turns recorded wire bytes into the
//! protocol-independent [`Item`] vocabulary with the protocol's own decoder. Output goes to
//! any `io::Write`, so tests and the CLI share it.

mod bundle;
mod export;
mod filter;
#[cfg(test)]
pub(crate) mod fixture;
mod replay;
mod requests;
mod verify;

use std::io::Write;

use sluice_journal::{Body, Event, Reader, SessionSummary};

pub use bundle::{Bundle, BundleCheck, BundleError, export_with_bundle, parse_key, verify_bundle};
pub use export::{Format, export, export_session};
pub use filter::{DecisionKind, Filter, FilterArgs, FilterError, parse_time};
pub use replay::{MAX_GAP, ReplayOptions, Timing, replay, replay_with};
pub use requests::print_requests;
pub use verify::verify;

use crate::protocol::Item;
use crate::protocol::postgres::transcript::Transcriber;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Journal(#[from] sluice_journal::JournalError),
    #[error("cannot write output")]
    Output(#[from] std::io::Error),
    #[error("cannot encode output")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Decodes one session's recorded bytes into items, whatever its protocol.
pub(crate) enum Decoder {
    Postgres(Transcriber),
    Mysql(crate::protocol::mysql::Transcriber),
    /// A protocol this build cannot decode: events are shown as byte counts.
    Unknown,
}

impl Decoder {
    pub(crate) fn for_protocol(protocol: &str) -> Decoder {
        match protocol {
            "postgres" => Decoder::Postgres(Transcriber::new()),
            "mysql" => Decoder::Mysql(crate::protocol::mysql::Transcriber::new()),
            _ => Decoder::Unknown,
        }
    }

    /// The items a recorded event carries (start, notes and end are not wire items).
    pub(crate) fn items(&mut self, event: &Event) -> Vec<Item> {
        match (self, &event.body) {
            (Decoder::Postgres(t), Body::Client(bytes)) => t.client(bytes),
            (Decoder::Postgres(t), Body::Server(bytes)) => t.server(bytes),
            (Decoder::Mysql(t), Body::Client(bytes)) => t.client(bytes),
            (Decoder::Mysql(t), Body::Server(bytes)) => t.server(bytes),
            _ => Vec::new(),
        }
    }
}

/// Nanoseconds since the epoch as RFC 3339 UTC with nanoseconds.
pub(crate) fn rfc3339(ns: u64) -> String {
    match jiff::Timestamp::from_nanosecond(i128::from(ns)) {
        Ok(t) => format!("{t:.9}"),
        Err(_) => ns.to_string(),
    }
}

/// Statements recorded in a session (for sessions the proxy never sealed).
fn count_statements(reader: &Reader, summary: &SessionSummary) -> Result<u64, ReadError> {
    let mut decoder = Decoder::for_protocol(&summary.start.protocol);
    let mut n = 0;
    for event in reader.events(&summary.id)? {
        let event = event?;
        if matches!(event.body, Body::Client(_)) {
            n += decoder
                .items(&event)
                .iter()
                .filter(|i| matches!(i, Item::Statement { .. }))
                .count() as u64;
        }
    }
    Ok(n)
}

/// Every session, oldest first, with counters filled in for open ones.
pub fn sessions(reader: &Reader) -> Result<Vec<SessionSummary>, ReadError> {
    let mut out = reader.sessions()?;
    // Unsealed sessions, and those sealed at the agent's restart, have no statement count
    // from the proxy: count what was recorded.
    let uncounted = |s: &SessionSummary| {
        s.ended_ns.is_none() || s.end_reason.as_deref() == Some(sluice_journal::INTERRUPTED)
    };
    for s in out.iter_mut().filter(|s| uncounted(s)) {
        s.statements = count_statements(reader, s)?;
    }
    Ok(out)
}

/// A session a filter kept, with what the collector said of it (None in an agent's journal).
pub struct Selected {
    pub summary: SessionSummary,
    pub integrity: Option<IntegrityView>,
}

/// The collector's ingest verdict for one session, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntegrityView {
    /// The agent that shipped the session.
    pub agent: String,
    /// `verified`, `unsealed (...)` or `FLAGGED: <first problem>`.
    pub verdict: String,
    pub problems: Vec<String>,
}

/// The collector's verdict for a session, when the journal is a collector's store.
fn integrity(
    reader: &Reader,
    id: &sluice_journal::SessionId,
) -> Result<Option<IntegrityView>, ReadError> {
    Ok(reader.integrity(id)?.map(|i| IntegrityView {
        verdict: i.verdict(),
        agent: i.agent,
        problems: i.problems,
    }))
}

/// The sessions `filter` keeps, oldest first: cheap filters on the summaries, then the event
/// filters (`--statement`, `--decision`) on what is left.
pub fn select(reader: &Reader, filter: &Filter) -> Result<Vec<Selected>, ReadError> {
    let mut out = Vec::new();
    for summary in sessions(reader)? {
        let integrity = integrity(reader, &summary.id)?;
        let agent = integrity.as_ref().map(|i| i.agent.as_str());
        if !filter.summary_matches(&summary, agent) {
            continue;
        }
        if filter.needs_events() && !filter.events_match(&summary, reader.events(&summary.id)?)? {
            continue;
        }
        out.push(Selected { summary, integrity });
    }
    Ok(out)
}

/// `sluice sessions`: a table, or JSON with `json`, of the sessions `filter` keeps.
pub fn print_sessions(
    reader: &Reader,
    filter: &Filter,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    let list = select(reader, filter)?;
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|s| {
                let mut v = session_json(&s.summary);
                if let (Some(obj), Some(i)) = (v.as_object_mut(), &s.integrity) {
                    obj.insert("agent".into(), i.agent.clone().into());
                    obj.insert("integrity".into(), i.verdict.clone().into());
                    obj.insert("integrity_problems".into(), i.problems.clone().into());
                }
                v
            })
            .collect();
        serde_json::to_writer_pretty(&mut *out, &rows)?;
        writeln!(out)?;
        return Ok(());
    }
    // Principals, process names and targets come from tokens, clients and configs: each
    // line is written escaped.
    let out = &mut crate::inert::Lines::new(out);
    let collector = list.iter().any(|s| s.integrity.is_some());
    let mut header = format!(
        "{:<36}  {:<30}  {:<30}  {:<12}  {:<20}  {:>6}  {:<15}  {:>10}  {:>12}",
        "SESSION", "START", "END", "TARGET", "PRINCIPAL", "UID", "COMM", "STATEMENTS", "BYTES"
    );
    if collector {
        header.push_str("  INTEGRITY");
    }
    writeln!(out, "{}", header.trim_end())?;
    for selected in &list {
        let s = &selected.summary;
        let (uid, comm) = match &s.start.process {
            Some(p) => (p.uid.to_string(), p.comm.clone()),
            None => ("-".into(), "-".into()),
        };
        let end = s.ended_ns.map(rfc3339).unwrap_or_else(|| "(open)".into());
        let mut line = format!(
            "{:<36}  {:<30}  {:<30}  {:<12}  {:<20}  {:>6}  {:<15}  {:>10}  {:>12}",
            s.id,
            rfc3339(s.started_ns),
            end,
            s.start.target,
            s.start
                .principal
                .as_ref()
                .map(|p| p.name.as_str())
                .unwrap_or("-"),
            uid,
            comm,
            s.statements,
            s.client_bytes + s.server_bytes
        );
        if collector {
            line.push_str("  ");
            line.push_str(
                selected
                    .integrity
                    .as_ref()
                    .map(|i| i.verdict.as_str())
                    .unwrap_or("-"),
            );
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn session_json(s: &SessionSummary) -> serde_json::Value {
    serde_json::json!({
        "id": s.id.to_string(),
        "start": rfc3339(s.started_ns),
        "end": s.ended_ns.map(rfc3339),
        "end_reason": s.end_reason,
        "target": s.start.target,
        "principal": s.start.principal.as_ref().map(|p| p.name.clone()),
        "groups": s.start.principal.as_ref().map(|p| p.groups.clone()),
        "protocol": s.start.protocol,
        "orig_dst": s.start.orig_dst,
        "client_addr": s.start.client_addr,
        "uid": s.start.process.as_ref().map(|p| p.uid),
        "gid": s.start.process.as_ref().map(|p| p.gid),
        "pid": s.start.process.as_ref().map(|p| p.pid),
        "comm": s.start.process.as_ref().map(|p| p.comm.clone()),
        "cgroup_id": s.start.process.as_ref().map(|p| p.cgroup_id),
        "user": s.start.param("user"),
        "database": s.start.param("database"),
        "statements": s.statements,
        "client_bytes": s.client_bytes,
        "server_bytes": s.server_bytes,
        "bytes": s.client_bytes + s.server_bytes,
        "events": s.events,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fixture::Fixture;
    use sluice_journal::{Journal, Store};

    /// The fixture's sessions shipped to a collector store as agent `bastion-1`, enrolled
    /// with `key` (the agent's own key unless given another).
    fn store(f: &Fixture, key: Option<Vec<u8>>) -> Reader {
        let journal = Journal::open_signed(
            &f.dir.path().join("journal"),
            &f.dir.path().join("signing.key"),
        )
        .unwrap();
        let batch = journal.next_batch(10_000, 1 << 24).unwrap().unwrap();
        let key = key.unwrap_or_else(|| journal.public_key().unwrap());
        let dir = f.dir.path().join("store");
        let store = Store::open(&dir, None).unwrap();
        store.ingest("bastion-1", &key, &batch).unwrap();
        drop(store);
        Reader::open(&dir).unwrap()
    }

    fn text(run: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        run(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_read_commands_work_on_a_collector_store_and_show_its_verdict() {
        let f = Fixture::new();
        let reader = store(&f, None);
        let all = Filter::default();
        let table = text(|o| print_sessions(&reader, &all, false, o).unwrap());
        assert!(
            table.lines().next().unwrap().ends_with("INTEGRITY"),
            "{table}"
        );
        assert_eq!(table.matches("  verified").count(), 2, "{table}");
        let json = text(|o| print_sessions(&reader, &all, true, o).unwrap());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["agent"], "bastion-1");
        assert_eq!(v[0]["integrity"], "verified");
        // --host matches the agent's name in a collector's store.
        let host = Filter {
            host: Some("bastion-1".into()),
            ..Filter::default()
        };
        assert_eq!(select(&reader, &host).unwrap().len(), 2);
        let grace = Filter {
            principal: Some("grace".into()),
            statement: Some("orders".into()),
            ..Filter::default()
        };
        let found = select(&reader, &grace).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].summary.id, f.sessions[1]);
        let verified = text(|o| assert!(verify(&reader, None, o).unwrap()));
        assert_eq!(verified.matches("all signed").count(), 2, "{verified}");
        let replayed = text(|o| {
            replay(
                &reader,
                &f.sessions[0].to_string(),
                &ReplayOptions::default(),
                o,
            )
            .unwrap()
        });
        assert!(
            replayed.contains("> select id, name from people"),
            "{replayed}"
        );
        // An export with its bundle from the collector verifies offline.
        let (export, bundle) = (f.dir.path().join("e.csv"), f.dir.path().join("b.jsonl"));
        export_with_bundle(&reader, None, &grace, Format::Csv, &export, &bundle).unwrap();
        let check = BundleCheck {
            export: Some(&export),
            key: None,
        };
        let out = text(|o| {
            assert!(verify_bundle(&Bundle::read(&bundle).unwrap(), &check, o).unwrap());
        });
        assert!(out.contains("1 sessions"), "{out}");
    }

    #[test]
    fn what_the_collector_flagged_is_listed_and_fails_verify() {
        let f = Fixture::new();
        let reader = store(&f, Some(vec![9; 32]));
        let table = text(|o| print_sessions(&reader, &Filter::default(), false, o).unwrap());
        assert_eq!(table.matches("  FLAGGED: ").count(), 2, "{table}");
        let out = text(|o| assert!(!verify(&reader, None, o).unwrap()));
        assert!(
            out.contains("FLAGGED by the collector (agent bastion-1): "),
            "{out}"
        );
        // A bundle exported from there carries the collector's verdict, and fails on it.
        let (export, bundle) = (f.dir.path().join("e.csv"), f.dir.path().join("b.jsonl"));
        let all = Filter::default();
        export_with_bundle(&reader, None, &all, Format::Csv, &export, &bundle).unwrap();
        let check = BundleCheck {
            export: Some(&export),
            key: None,
        };
        let out = text(|o| {
            assert!(!verify_bundle(&Bundle::read(&bundle).unwrap(), &check, o).unwrap());
        });
        assert!(
            out.contains(&format!(
                "session {}: FLAGGED by the collector (agent bastion-1): ",
                f.sessions[0]
            )),
            "{out}"
        );
    }
}
