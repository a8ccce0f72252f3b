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
    /// A protocol this build cannot decode: events are shown as byte counts.
    Unknown,
}

impl Decoder {
    pub(crate) fn for_protocol(protocol: &str) -> Decoder {
        match protocol {
            "postgres" => Decoder::Postgres(Transcriber::new()),
            _ => Decoder::Unknown,
        }
    }

    /// The items a recorded event carries (start, notes and end are not wire items).
    pub(crate) fn items(&mut self, event: &Event) -> Vec<Item> {
        match (self, &event.body) {
            (Decoder::Postgres(t), Body::Client(bytes)) => t.client(bytes),
            (Decoder::Postgres(t), Body::Server(bytes)) => t.server(bytes),
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

/// Statements recorded in a session (for sessions that were never sealed).
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
    for s in out.iter_mut().filter(|s| s.ended_ns.is_none()) {
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
