//! Stateful decoding of a recorded PostgreSQL session into shared [`Item`]s, for replay and
//! export.
//!
//! Owns the session state a reader needs to make sense of individual messages: prepared
//! statements (name → SQL and declared parameter types), portals (which statement, which result
//! formats), the queue of outstanding Describe/Execute/Sync requests (responses arrive in request
//! order, possibly after the client pipelined more), the shape of the rows being returned, and
//! COPY state. It works on the raw chunks the journal stores, each holding one or more whole
//! typed messages, fed in recording order through [`Transcriber::client`] and
//! [`Transcriber::server`]. It never panics: a chunk that cannot be framed or decoded yields
//! `Item::Error { code: "sluice", message: "undecodable ..." }` and the rest of that chunk is
//! skipped. Memory is bounded: at most [`MAX_STATEMENTS`] statements and portals and
//! [`MAX_PENDING`] outstanding requests are remembered.
//!
//! What becomes an item:
//! - A simple Query is one `Statement` (a multi-statement string stays one item).
//! - A Parse yields nothing, even for the unnamed statement: a user reading a replay wants each
//!   *executed* statement once. Each Bind yields one `Statement` with the SQL of the statement it
//!   binds and its parameter values (text as UTF-8, lossy; binary decoded when the declared type
//!   is known, else `\x` hex). A Bind of a statement this recording never saw parsed (prepared
//!   before the recording started, or by SQL `PREPARE`) shows a comment naming it.
//! - RowDescription → `Columns`; for an Execute whose portal was not described, the statement's
//!   columns (from an earlier Describe) are emitted before its first row. Describing a
//!   statement yields nothing (nothing ran). DataRow → `Row`, binary
//!   values decoded for int2/4/8, oid, bool, float4/8 and text-like types, else `\x` hex.
//! - CommandComplete → `Complete`; ErrorResponse → `Error`; NoticeResponse → `Notice`;
//!   NotificationResponse → `Notification`.
//! - COPY: after CopyOutResponse (server data) or CopyInResponse (client data), each text-format
//!   line becomes a `Row`, split on tabs, `\N` as NULL, backslash escapes undone. CSV is also
//!   "text" on the wire and is not split (one value per line). Binary COPY data is one `\x` hex
//!   value per CopyData message.
//! - Authentication, password messages, parameter status and the rest yield nothing.
use std::collections::{HashMap, VecDeque};

use super::backend::{Backend, decode_backend};
use super::body::{Format, Formats};
use super::frame::messages;
use super::frontend::{Frontend, Target, decode_frontend};
use crate::protocol::Item;

/// Most prepared statements (and, separately, portals) remembered per session.
pub const MAX_STATEMENTS: usize = 4096;
/// Most outstanding Describe/Execute/Sync requests remembered per session.
pub const MAX_PENDING: usize = 4096;
/// Longest incomplete COPY line kept while waiting for its end.
const MAX_COPY_LINE: usize = 1 << 20;

#[derive(Debug, Clone)]
struct Column {
    name: String,
    type_oid: u32,
    format: Format,
}

#[derive(Debug, Clone)]
struct Prepared {
    sql: String,
    param_types: Vec<u32>,
    columns: Option<Vec<Column>>,
}

#[derive(Debug, Clone)]
struct Portal {
    statement: String,
    result_formats: Vec<Format>,
    /// Set by a Describe of the portal, whose RowDescription carries the real formats.
    described: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    DescribeStatement(String),
    DescribePortal(String),
    Execute(String),
    Sync,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyDirection {
    In,
    Out,
}

/// Turns the raw chunks of one recorded session into [`Item`]s. Feed chunks in recording order.
#[derive(Debug, Default)]
pub struct Transcriber {
    statements: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    pending: VecDeque<Pending>,
    /// Type and format of each column of the rows currently being returned.
    shape: Vec<Column>,
    /// Whether `shape` was set for the Execute at the front of `pending`.
    execute_shaped: bool,
    copy: Option<(CopyDirection, Format)>,
    copy_line: Vec<u8>,
}

impl Transcriber {
    pub fn new() -> Self {
        Self::default()
    }

    /// Items for a chunk the client sent: one or more whole typed messages.
    pub fn client(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        for m in messages(bytes) {
            let decoded = m
                .map_err(|e| e.to_string())
                .and_then(|(tag, body)| decode_frontend(tag, body).map_err(|e| e.to_string()));
            match decoded {
                Ok(msg) => self.on_client(msg, &mut out),
                Err(e) => {
                    out.push(undecodable("client", &e));
                    break;
                }
            }
        }
        out
    }

    /// Items for a chunk the server sent: one or more whole typed messages.
    pub fn server(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        for m in messages(bytes) {
            let decoded = m
                .map_err(|e| e.to_string())
                .and_then(|(tag, body)| decode_backend(tag, body).map_err(|e| e.to_string()));
            match decoded {
                Ok(msg) => self.on_server(msg, &mut out),
                Err(e) => {
                    out.push(undecodable("server", &e));
                    break;
                }
            }
        }
        out
    }

    fn push_pending(&mut self, p: Pending) {
        if self.pending.len() >= MAX_PENDING {
            // The server stopped answering long ago; start over rather than grow.
            self.pending.clear();
            self.execute_shaped = false;
        }
        self.pending.push_back(p);
    }

    fn on_client(&mut self, msg: Frontend<'_>, out: &mut Vec<Item>) {
        match msg {
            Frontend::Query { sql } => out.push(Item::Statement {
                sql: sql.to_owned(),
                params: Vec::new(),
            }),
            Frontend::Parse {
                name,
                sql,
                param_types,
            } => {
                if self.statements.len() < MAX_STATEMENTS || self.statements.contains_key(name) {
                    self.statements.insert(
                        name.to_owned(),
                        Prepared {
                            sql: sql.to_owned(),
                            param_types: param_types.iter().collect(),
                            columns: None,
                        },
                    );
                }
            }
            Frontend::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            } => {
                let prepared = self.statements.get(statement);
                let sql = match prepared {
                    Some(p) => p.sql.clone(),
                    None => format!(
                        "/* prepared statement {statement:?}, not seen in this recording */"
                    ),
                };
                let types = prepared.map(|p| p.param_types.as_slice()).unwrap_or(&[]);
                let params = params
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.map(|v| {
                            let oid = types.get(i).copied().unwrap_or(0);
                            render(v, param_formats.for_value(i), oid)
                        })
                    })
                    .collect();
                out.push(Item::Statement { sql, params });
                if self.portals.len() < MAX_STATEMENTS || self.portals.contains_key(portal) {
                    self.portals.insert(
                        portal.to_owned(),
                        Portal {
                            statement: statement.to_owned(),
                            result_formats: formats_vec(result_formats),
                            described: false,
                        },
                    );
                }
            }
            Frontend::Describe { target, name } => self.push_pending(match target {
                Target::Statement => Pending::DescribeStatement(name.to_owned()),
                Target::Portal => Pending::DescribePortal(name.to_owned()),
            }),
            Frontend::Execute { portal, .. } => {
                self.push_pending(Pending::Execute(portal.to_owned()))
            }
            Frontend::Close { target, name } => match target {
                Target::Statement => {
                    self.statements.remove(name);
                }
                Target::Portal => {
                    self.portals.remove(name);
                }
            },
            Frontend::Sync => self.push_pending(Pending::Sync),
            Frontend::CopyData(data) => {
                if let Some((CopyDirection::In, format)) = self.copy {
                    self.copy_data(data, format, out);
                }
            }
            Frontend::CopyDone => self.copy_end(out),
            Frontend::CopyFail { .. } => self.copy_line.clear(),
            Frontend::FunctionCall {
                function_oid,
                arg_formats,
                args,
                ..
            } => out.push(Item::Statement {
                sql: format!("/* function call, oid {function_oid} */"),
                params: args
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v.map(|v| render(v, arg_formats.for_value(i), 0)))
                    .collect(),
            }),
            Frontend::Flush
            | Frontend::Terminate
            | Frontend::Password
            | Frontend::Unknown { .. } => {}
        }
    }

    fn on_server(&mut self, msg: Backend<'_>, out: &mut Vec<Item>) {
        match msg {
            Backend::RowDescription(fields) => {
                let columns: Vec<Column> = fields
                    .iter()
                    .map(|f| Column {
                        name: f.name.to_owned(),
                        type_oid: f.type_oid,
                        format: f.format,
                    })
                    .collect();
                if let Some(Pending::DescribeStatement(name)) = self.pending.front() {
                    // Nothing runs yet: remember the shape for the executions to come.
                    if let Some(p) = self.statements.get_mut(name) {
                        p.columns = Some(columns);
                    }
                    self.pending.pop_front();
                    return;
                }
                out.push(Item::Columns(
                    columns.iter().map(|c| c.name.clone()).collect(),
                ));
                match self.pending.front() {
                    Some(Pending::DescribePortal(name)) => {
                        if let Some(p) = self.portals.get_mut(name) {
                            p.described = true;
                            if let Some(s) = self.statements.get_mut(&p.statement) {
                                s.columns = Some(columns.clone());
                            }
                        }
                        self.shape = columns;
                        self.pending.pop_front();
                    }
                    _ => self.shape = columns,
                }
            }
            Backend::NoData => {
                if matches!(
                    self.pending.front(),
                    Some(Pending::DescribeStatement(_) | Pending::DescribePortal(_))
                ) {
                    self.pending.pop_front();
                }
            }
            Backend::DataRow(values) => {
                self.shape_for_execute(out);
                let row = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        v.map(|v| match self.shape.get(i) {
                            Some(c) => render(v, c.format, c.type_oid),
                            None => render(v, Format::Text, 0),
                        })
                    })
                    .collect();
                out.push(Item::Row(row));
            }
            Backend::CommandComplete { tag } => {
                self.copy_end(out);
                self.copy = None;
                out.push(Item::Complete {
                    tag: tag.to_owned(),
                });
                self.execute_done();
            }
            Backend::EmptyQueryResponse | Backend::PortalSuspended => self.execute_done(),
            Backend::ErrorResponse(d) => {
                self.copy = None;
                self.copy_line.clear();
                out.push(Item::Error {
                    code: d.sqlstate().unwrap_or("").to_owned(),
                    message: d.message().unwrap_or("").to_owned(),
                    number: None,
                });
                // The server skips everything up to the next Sync.
                while let Some(p) = self.pending.front() {
                    if *p == Pending::Sync {
                        break;
                    }
                    self.pending.pop_front();
                }
                self.execute_shaped = false;
            }
            Backend::NoticeResponse(d) => out.push(Item::Notice {
                code: d.sqlstate().unwrap_or("").to_owned(),
                message: d.message().unwrap_or("").to_owned(),
            }),
            Backend::NotificationResponse {
                channel, payload, ..
            } => out.push(Item::Notification {
                channel: channel.to_owned(),
                payload: payload.to_owned(),
            }),
            Backend::ReadyForQuery { .. } => {
                if self.pending.front() == Some(&Pending::Sync) {
                    self.pending.pop_front();
                }
                self.execute_shaped = false;
            }
            Backend::CopyOutResponse(r) => {
                self.copy = Some((CopyDirection::Out, r.format));
                self.copy_line.clear();
            }
            Backend::CopyInResponse(r) => {
                self.copy = Some((CopyDirection::In, r.format));
                self.copy_line.clear();
            }
            Backend::CopyBothResponse(_) => self.copy = None,
            Backend::CopyData(data) => {
                if let Some((CopyDirection::Out, format)) = self.copy {
                    self.copy_data(data, format, out);
                }
            }
            Backend::CopyDone => self.copy_end(out),
            Backend::Authentication(_)
            | Backend::ParameterStatus { .. }
            | Backend::BackendKeyData { .. }
            | Backend::ParseComplete
            | Backend::BindComplete
            | Backend::CloseComplete
            | Backend::ParameterDescription(_)
            | Backend::NegotiateProtocolVersion { .. }
            | Backend::FunctionCallResponse { .. }
            | Backend::Unknown { .. } => {}
        }
    }

    /// Before the first row of an Execute, works out the row shape from its portal (and emits
    /// the columns if the portal was not described, so every result reads columns-then-rows).
    fn shape_for_execute(&mut self, out: &mut Vec<Item>) {
        if self.execute_shaped {
            return;
        }
        let Some(Pending::Execute(name)) = self.pending.front() else {
            return;
        };
        self.execute_shaped = true;
        let Some(portal) = self.portals.get(name) else {
            return;
        };
        if portal.described {
            return;
        }
        let columns = self
            .statements
            .get(&portal.statement)
            .and_then(|s| s.columns.as_ref());
        let Some(columns) = columns else {
            // Unknown shape: text, unless the portal asked for binary results.
            self.shape = (0..portal.result_formats.len())
                .map(|i| Column {
                    name: String::new(),
                    type_oid: 0,
                    format: format_at(&portal.result_formats, i),
                })
                .collect();
            return;
        };
        self.shape = columns
            .iter()
            .enumerate()
            .map(|(i, c)| Column {
                format: format_at(&portal.result_formats, i),
                ..c.clone()
            })
            .collect();
        out.push(Item::Columns(
            columns.iter().map(|c| c.name.clone()).collect(),
        ));
    }

    fn execute_done(&mut self) {
        if matches!(self.pending.front(), Some(Pending::Execute(_))) {
            self.pending.pop_front();
        }
        self.execute_shaped = false;
    }

    fn copy_data(&mut self, data: &[u8], format: Format, out: &mut Vec<Item>) {
        if format == Format::Binary {
            out.push(Item::Row(vec![Some(hex(data))]));
            return;
        }
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.copy_line.extend_from_slice(&rest[..nl]);
            rest = &rest[nl + 1..];
            let line = std::mem::take(&mut self.copy_line);
            if let Some(row) = copy_row(&line) {
                out.push(row);
            }
        }
        self.copy_line.extend_from_slice(rest);
        if self.copy_line.len() > MAX_COPY_LINE {
            let line = std::mem::take(&mut self.copy_line);
            out.push(Item::Row(vec![Some(
                String::from_utf8_lossy(&line).into_owned(),
            )]));
        }
    }

    fn copy_end(&mut self, out: &mut Vec<Item>) {
        let line = std::mem::take(&mut self.copy_line);
        if !line.is_empty()
            && let Some(row) = copy_row(&line)
        {
            out.push(row);
        }
    }
}

fn undecodable(direction: &str, error: &str) -> Item {
    Item::Error {
        code: "sluice".to_owned(),
        message: format!("undecodable {direction} message: {error}"),
        number: None,
    }
}

fn formats_vec(f: Formats<'_>) -> Vec<Format> {
    f.iter().collect()
}

/// `for_value` over an owned list (same rule: none = text, one = all, else per column).
fn format_at(formats: &[Format], i: usize) -> Format {
    match formats {
        [] => Format::Text,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(Format::Text),
    }
}

/// One text-format COPY line as a row; `None` for the old end-of-data marker `\.`.
fn copy_row(line: &[u8]) -> Option<Item> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line == b"\\." {
        return None;
    }
    Some(Item::Row(
        line.split(|&b| b == b'\t')
            .map(|field| (field != b"\\N").then(|| unescape_copy(field)))
            .collect(),
    ))
}

fn unescape_copy(field: &[u8]) -> String {
    let mut out = Vec::with_capacity(field.len());
    let mut it = field.iter().copied();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match it.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b't') => out.push(b'\t'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Renders one parameter or column value for a reader.
fn render(value: &[u8], format: Format, type_oid: u32) -> String {
    if format == Format::Text {
        return String::from_utf8_lossy(value).into_owned();
    }
    decode_binary(value, type_oid).unwrap_or_else(|| hex(value))
}

/// Binary values of the few types whose encoding is simple; `None` means "show as hex".
fn decode_binary(v: &[u8], type_oid: u32) -> Option<String> {
    Some(match (type_oid, v) {
        (16, [b]) => if *b != 0 { "t" } else { "f" }.to_owned(),
        (21, &[a, b]) => i16::from_be_bytes([a, b]).to_string(),
        (23, &[a, b, c, d]) => i32::from_be_bytes([a, b, c, d]).to_string(),
        (26, &[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]).to_string(),
        (20, v) => i64::from_be_bytes(v.try_into().ok()?).to_string(),
        (700, &[a, b, c, d]) => float(f64::from(f32::from_be_bytes([a, b, c, d]))),
        (701, v) => float(f64::from_be_bytes(v.try_into().ok()?)),
        // text, varchar, name, bpchar, unknown: the binary form is the text.
        (25 | 1043 | 19 | 1042 | 705, v) => String::from_utf8_lossy(v).into_owned(),
        _ => return None,
    })
}

fn float(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_owned()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
    } else {
        f.to_string()
    }
}

fn hex(v: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + v.len() * 2);
    s.push_str("\\x");
    for b in v {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}
