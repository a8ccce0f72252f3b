//! `sluice export --format jsonl|csv [--session ID]`: one record per session start and end,
//! statement, returned row, command tag, error, notice and agent note, each carrying its
//! session, time, target, client user and process, so a record stands on its own.
//!
//! Streams: nothing but the current session's header is held in memory.

use std::io::Write;

use serde_json::{Value, json};
use sluice_journal::{Body, Reader, SessionSummary};

use super::{Decoder, ReadError, rfc3339};
use crate::protocol::Item;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// CSV columns, in order. Values that are lists (params, columns, row values) are JSON arrays.
const CSV_COLUMNS: [&str; 16] = [
    "session", "seq", "ts", "target", "user", "database", "uid", "pid", "comm", "kind", "sql",
    "params", "columns", "values", "tag", "message",
];

pub fn export(
    reader: &Reader,
    session: Option<&str>,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    let sessions = match session {
        Some(id) => vec![reader.find(id)?],
        None => reader.sessions()?,
    };
    if format == Format::Csv {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    for summary in &sessions {
        export_session(reader, summary, format, out)?;
    }
    Ok(())
}

fn export_session(
    reader: &Reader,
    s: &SessionSummary,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    let base = json!({
        "session": s.id.to_string(),
        "target": s.start.target,
        "user": s.start.param("user"),
        "database": s.start.param("database"),
        "uid": s.start.process.as_ref().map(|p| p.uid),
        "pid": s.start.process.as_ref().map(|p| p.pid),
        "comm": s.start.process.as_ref().map(|p| p.comm.clone()),
        "principal": s.start.principal.as_ref().map(|p| p.name.clone()),
        "groups": s.start.principal.as_ref().map(|p| p.groups.clone()),
    });
    let mut decoder = Decoder::for_protocol(&s.start.protocol);
    let mut columns: Vec<String> = Vec::new();
    for event in reader.events(&s.id)? {
        let event = event?;
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
                Item::Error { code, message } => {
                    json!({ "kind": "error", "code": code, "message": message })
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
