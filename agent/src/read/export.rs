//! `sluice export --format jsonl|csv [--session ID] [filters]`: one record per session start
//! and end, statement, returned row, command tag, error, notice and agent note, each carrying
//! its session, time, target, principal, client user and process, so a record stands on its
//! own.
//!
//! A session's records are a function of its events alone ([`export_session`]): the same code
//! writes an export from the journal and re-derives it from a verification bundle, which is
//! how `sluice verify --bundle B --export F` proves F says what the signed events say. The
//! fields every record carries are taken from the session's signed Start event, not from the
//! (unsigned) session index.
//!
//! Values are exact, control characters included: an export is evidence, and a reader must
//! get what was sent. JSON Lines escapes them by itself (`\n`, `\u001b`). CSV has no escape
//! syntax (RFC 4180 only quotes), so a value holding one is written as it is inside quotes,
//! which CSV readers take as data; escaping `ESC` as `\x1b` there would record a value that
//! was never sent, and one nobody could tell from the four characters. People read CSV with a
//! CSV reader; `sluice replay` is the view for a terminal (`crate::inert`).
//!
//! Streams: nothing but the current session's header is held in memory.

use std::io::Write;

use serde_json::{Value, json};
use sluice_journal::{Body, Event, JournalError, Reader, SessionId, SessionStart, SessionSummary};

use super::{Decoder, Filter, ReadError, rfc3339, select};
use crate::protocol::Item;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn word(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Csv => "csv",
        }
    }

    pub fn from_word(word: &str) -> Option<Format> {
        match word {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// CSV columns, in order. Values that are lists (params, columns, row values) are JSON arrays.
/// New columns go at the end, so scripts that read columns by position keep working.
const CSV_COLUMNS: [&str; 17] = [
    "session",
    "seq",
    "ts",
    "target",
    "user",
    "database",
    "uid",
    "pid",
    "comm",
    "kind",
    "sql",
    "params",
    "columns",
    "values",
    "tag",
    "message",
    "principal",
];

/// Exports one session (id or prefix) or every session `filter` keeps; returns the ids
/// exported, in order.
pub fn export(
    reader: &Reader,
    session: Option<&str>,
    filter: &Filter,
    format: Format,
    out: &mut dyn Write,
) -> Result<Vec<SessionId>, ReadError> {
    let sessions = selected(reader, session, filter)?;
    write_header(format, out)?;
    for s in &sessions {
        export_session(&s.id, &s.start, reader.events(&s.id)?, format, out)?;
    }
    Ok(sessions.into_iter().map(|s| s.id).collect())
}

/// The sessions an export covers: the one named (if it passes the filter), else all the
/// filter keeps.
pub(crate) fn selected(
    reader: &Reader,
    session: Option<&str>,
    filter: &Filter,
) -> Result<Vec<SessionSummary>, ReadError> {
    let wanted = session.map(|id| reader.find(id)).transpose()?.map(|s| s.id);
    Ok(select(reader, filter)?
        .into_iter()
        .map(|s| s.summary)
        .filter(|s| wanted.is_none_or(|w| w == s.id))
        .collect())
}

/// What an export starts with (the CSV header line; nothing for JSONL).
pub fn write_header(format: Format, out: &mut dyn Write) -> Result<(), ReadError> {
    if format == Format::Csv {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    Ok(())
}

/// The fields every record of a session carries.
fn base_fields(id: &SessionId, start: &SessionStart) -> Value {
    json!({
        "session": id.to_string(),
        "target": start.target,
        "user": start.param("user"),
        "database": start.param("database"),
        "uid": start.process.as_ref().map(|p| p.uid),
        "pid": start.process.as_ref().map(|p| p.pid),
        "comm": start.process.as_ref().map(|p| p.comm.clone()),
        "principal": start.principal.as_ref().map(|p| p.name.clone()),
        "groups": start.principal.as_ref().map(|p| p.groups.clone()),
    })
}

/// The records of one session, from its events in order (a journal's or a bundle's). `start`
/// is used until the session's own Start event (its first) replaces it.
pub fn export_session(
    id: &SessionId,
    start: &SessionStart,
    events: impl Iterator<Item = Result<Event, JournalError>>,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    let mut base = base_fields(id, start);
    let mut decoder = Decoder::for_protocol(&start.protocol);
    let mut columns: Vec<String> = Vec::new();
    for event in events {
        let event = event?;
        if let Body::Start(signed) = &event.body
            && event.seq == 0
        {
            base = base_fields(id, signed);
            decoder = Decoder::for_protocol(&signed.protocol);
        }
        let mut records: Vec<Value> = Vec::new();
        match &event.body {
            Body::Start(start) => records.push(json!({
                "kind": "session_start",
                "protocol": start.protocol,
                "orig_dst": start.orig_dst,
                "client_addr": start.client_addr,
                "gid": start.process.as_ref().map(|p| p.gid),
                "cgroup_id": start.process.as_ref().map(|p| p.cgroup_id),
            })),
            Body::Note { level, text } => {
                records.push(json!({ "kind": "note", "level": format!("{level:?}").to_lowercase(), "message": text }))
            }
            Body::End { reason } => records.push(json!({ "kind": "session_end", "message": reason })),
            Body::Decision(d) => records.push(json!({
                "kind": "decision",
                "sql": d.sql,
                "action": d.action,
                "facts": d.facts,
                "allowed": d.allowed,
                "policies": d.policies,
                "reason": d.reason,
            })),
            Body::Review(r) => records.push(json!({
                "kind": "review",
                "request": r.request,
                "state": r.state.word(),
                "by": r.state.by(),
                "message": r.state.describe(),
            })),
            Body::Auth(a) => records.push(json!({
                "kind": "auth",
                "method": a.method,
                "role": a.role,
                "backend_user": a.backend_user,
                "client_tls": a.client_tls,
                "backend_tls": a.backend_tls,
            })),
            Body::Masked(m) => {
                for f in &m.fired {
                    records.push(json!({
                        "kind": "masked",
                        "column": f.column,
                        "rule": f.rule,
                        "strategy": f.strategy,
                        "values": f.values,
                    }));
                }
            }
            Body::Client(_) | Body::Server(_) => {}
        }
        for item in decoder.items(&event) {
            records.push(match item {
                Item::Statement { sql, params } => {
                    json!({ "kind": "statement", "sql": sql, "params": params })
                }
                Item::Columns(c) => {
                    columns = c;
                    continue;
                }
                Item::Row(values) => json!({ "kind": "row", "columns": columns, "values": values }),
                Item::Complete { tag } => json!({ "kind": "complete", "tag": tag }),
                Item::Error {
                    code,
                    message,
                    number,
                } => {
                    json!({ "kind": "error", "code": code, "number": number, "message": message })
                }
                Item::Notice { code, message } => {
                    json!({ "kind": "notice", "code": code, "message": message })
                }
                Item::Notification { channel, payload } => {
                    json!({ "kind": "notification", "channel": channel, "message": payload })
                }
            });
        }
        for mut record in records {
            if let (Some(obj), Some(b)) = (record.as_object_mut(), base.as_object()) {
                for (k, v) in b {
                    obj.entry(k.clone()).or_insert_with(|| v.clone());
                }
                obj.insert("seq".into(), json!(event.seq));
                obj.insert("ts".into(), json!(rfc3339(event.ts_ns)));
            }
            match format {
                Format::Jsonl => {
                    serde_json::to_writer(&mut *out, &record)?;
                    writeln!(out)?;
                }
                Format::Csv => writeln!(out, "{}", csv_row(&record))?,
            }
        }
    }
    Ok(())
}

fn csv_row(record: &Value) -> String {
    CSV_COLUMNS
        .iter()
        .map(|c| {
            let text = match record.get(*c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            csv_field(&text)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// RFC 4180 quoting.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_with_commas_quotes_and_newlines_are_quoted() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }
}
