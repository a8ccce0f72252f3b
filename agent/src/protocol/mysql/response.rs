//! The [`ResponseMachine`]: fed both directions of the command phase in order, it knows what
//! every server packet is.
//!
//! MySQL's server packets do not say what they are: a packet starting with 0x00 is an OK after
//! COM_PING, a binary row after COM_STMT_EXECUTE, and a column count of 0 nowhere. The machine
//! keeps the queue of commands awaiting a response and the state inside the current one:
//!
//! ```text
//! COM_QUERY / COM_STMT_EXECUTE:
//!   OK | ERR | 0xFB LOCAL INFILE (client data, empty packet, then OK | ERR)
//!   | column count [metadata follows, MariaDB CACHE_METADATA]
//!     column definition x N  [EOF unless DEPRECATE_EOF]
//!     row* (text: lenenc strings, 0xFB NULL; binary: 0x00, NULL bitmap, typed values)
//!     EOF | OK(0xFE) | ERR
//!   each OK / EOF terminator with SERVER_MORE_RESULTS_EXISTS is followed by another result
//! COM_STMT_PREPARE: PREPARE_OK (0x00, id, columns, params) then param defs [EOF], column
//!   defs [EOF] | ERR
//! COM_STMT_FETCH: binary rows, then EOF/OK | ERR;  COM_FIELD_LIST: column defs, EOF/OK | ERR
//! COM_CHANGE_USER: the auth exchange (AuthSwitch, AuthMoreData, client data) until OK | ERR
//! COM_SET_OPTION: EOF/OK | ERR;  COM_STATISTICS: a string;  COM_STMT_CLOSE,
//!   COM_STMT_SEND_LONG_DATA, COM_QUIT: nothing;  everything else: OK | ERR
//! ```
//! Memory is bounded: at most [`MAX_STATEMENTS`] prepared statements and [`MAX_PENDING`]
//! queued commands are remembered. The machine never panics; a packet it cannot place is
//! [`Event::Unexpected`], one it cannot decode an error that resets it to idle. No I/O.
use std::collections::{HashMap, VecDeque};

use super::command::{Command, LAST_PREPARED, ParamType, decode_command, decode_execute_params};
use super::handshake::{
    Capabilities, ErrPacket, OkPacket, PROGRESS_REPORT, is_eof_or_ok_fe, parse_err, parse_ok,
    status, terminator_status,
};
use super::packet::{DecodeError, Reader};
use super::resultset::{ColumnDef, Value, decode_binary_row, decode_text_row, parse_column_def};

/// Most prepared statements remembered per session (MariaDB's default cap is 16382).
pub const MAX_STATEMENTS: usize = 16_384;
/// Most columns accepted in one result set (MySQL and MariaDB stop at 4096 per table).
pub const MAX_COLUMNS: u64 = 1 << 16;
/// Most commands awaiting a response remembered per session.
pub const MAX_PENDING: usize = 4096;

/// What a server packet was, as placed by the [`ResponseMachine`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// A result that is an OK (its status may announce more results).
    Ok(OkPacket),
    /// An error; it ends the command's response.
    Err(ErrPacket),
    /// MariaDB progress report (ERR 0xFFFF): not an error, nothing changes.
    Progress,
    /// A result set starts with this many columns. `metadata` is false when MariaDB's
    /// CACHE_METADATA says the definitions are not resent: [`ResponseMachine::columns`] then
    /// already holds the statement's columns from before, and no `Column` events follow.
    ResultStart { columns: u64, metadata: bool },
    /// Column `index` of the current result set (see [`ResponseMachine::columns`]); `last`
    /// when it is the last definition (rows, or the EOF before them, come next).
    Column { index: usize, last: bool },
    /// All column definitions of the current result set are in: rows follow.
    ColumnsDone,
    /// One row of the current result set, undecoded (see [`ResponseMachine::row`]).
    Row(&'a [u8]),
    /// The current result set ended with these status flags.
    ResultDone { status: u16 },
    /// COM_STMT_PREPARE succeeded; parameter and column definitions may follow.
    PrepareOk {
        stmt_id: u32,
        params: u16,
        columns: u16,
        warnings: u16,
    },
    /// One parameter definition of a prepared statement.
    Param,
    /// One column definition of a prepared statement (see [`ResponseMachine::columns`]).
    PrepareColumn,
    /// The prepared statement's definitions are all in.
    PrepareDone { stmt_id: u32 },
    /// The server asks for a client file (LOCAL INFILE) by this name.
    LocalInfile(&'a [u8]),
    /// COM_STATISTICS's answer.
    Statistics(&'a [u8]),
    /// An auth exchange packet during COM_CHANGE_USER (switch or more data).
    AuthData,
    /// A packet when no response was expected, or of a command sluice does not know.
    Unexpected,
}

/// What a client packet was.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent<'a> {
    Command(Command<'a>),
    /// A packet inside a command's exchange: LOCAL INFILE content (empty: end of file) or auth
    /// data during COM_CHANGE_USER.
    Data(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// COM_QUERY (text) or COM_STMT_EXECUTE (binary, with its statement).
    Results {
        binary: bool,
        stmt: Option<u32>,
    },
    /// OK or ERR; `quiet` for housekeeping (ping, resets) whose OK reports nothing.
    Simple {
        quiet: bool,
    },
    Prepare,
    Fetch {
        stmt: u32,
    },
    FieldList,
    Statistics,
    Auth,
    /// COM_SET_OPTION: EOF (or OK 0xFE) or ERR.
    Eof,
    /// A command sluice does not know: packets are unexpected until the next command.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// The first packet of a response (or of the next result after MORE_RESULTS).
    Start(Expect),
    Columns {
        expect: Expect,
        remaining: u64,
    },
    ColumnsEof {
        expect: Expect,
    },
    Rows {
        expect: Expect,
    },
    /// After a LOCAL INFILE request: the client sends the file, the server then OK | ERR.
    Infile {
        expect: Expect,
    },
    PrepareParams {
        stmt: u32,
        remaining: u16,
        columns: u16,
    },
    PrepareParamsEof {
        stmt: u32,
        columns: u16,
    },
    PrepareColumns {
        stmt: u32,
        remaining: u16,
    },
    PrepareColumnsEof {
        stmt: u32,
    },
    FieldList,
    Auth,
}

#[derive(Debug, Clone, Default)]
struct Stmt {
    params: u16,
    param_types: Vec<ParamType>,
    /// Parameters sent as long data since the last execution (few: a client sends one per
    /// blob parameter), so a statement costs nothing per declared parameter.
    long_data: Vec<u16>,
    columns: Vec<ColumnDef>,
}

/// Follows a connection's command phase: fed every client packet ([`Self::client`]) and every
/// server packet ([`Self::server`]) in order, it says what each server packet is and keeps the
/// column definitions of the current result set and the prepared statements' shapes.
#[derive(Debug, Clone)]
pub struct ResponseMachine {
    caps: Capabilities,
    pending: VecDeque<Expect>,
    state: State,
    columns: Vec<ColumnDef>,
    statements: HashMap<u32, Stmt>,
    last_prepared: Option<u32>,
    /// Responses completed so far (see [`Self::responses_completed`]).
    completed: u64,
}

impl ResponseMachine {
    /// A machine for a connection that negotiated `caps` (the client's response capabilities,
    /// which are a subset of the server's).
    pub fn new(caps: Capabilities) -> Self {
        Self {
            caps,
            pending: VecDeque::new(),
            state: State::Idle,
            columns: Vec::new(),
            statements: HashMap::new(),
            last_prepared: None,
            completed: 0,
        }
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// True when every command sent so far has been answered completely.
    pub fn is_idle(&self) -> bool {
        self.state == State::Idle && self.pending.is_empty()
    }

    /// True when the next server packet answers housekeeping whose OK reports nothing to a
    /// reader: COM_PING, COM_STMT_RESET, COM_RESET_CONNECTION, or COM_CHANGE_USER's exchange.
    pub fn answering_housekeeping(&self) -> bool {
        matches!(
            self.state,
            State::Start(Expect::Simple { quiet: true } | Expect::Auth) | State::Auth
        )
    }

    /// True when the next server packet answers a COM_STMT_PREPARE.
    pub fn awaiting_prepare(&self) -> bool {
        self.state == State::Start(Expect::Prepare)
    }

    /// The column definitions of the current (or last) result set or prepared statement.
    pub fn columns(&self) -> &[ColumnDef] {
        &self.columns
    }

    /// The column definitions of prepared statement `stmt_id`, when known.
    pub fn statement_columns(&self, stmt_id: u32) -> Option<&[ColumnDef]> {
        self.statements.get(&stmt_id).map(|s| s.columns.as_slice())
    }

    /// How many commands' responses have been completed: it changes exactly when a server
    /// packet ends a command's response (the last result of a multi-result response, an ERR,
    /// a fetch's EOF), so the sequence ids of the next one start over.
    pub fn responses_completed(&self) -> u64 {
        self.completed
    }

    /// Whether the rows of the current result set are binary (COM_STMT_EXECUTE / FETCH):
    /// meaningful right after [`Event::Row`], when [`Self::columns`] are the row's columns.
    pub fn binary_rows(&self) -> bool {
        self.binary()
    }

    /// Whether the current result set is binary (COM_STMT_EXECUTE / FETCH).
    fn binary(&self) -> bool {
        matches!(
            self.state,
            State::Rows {
                expect: Expect::Results { binary: true, .. } | Expect::Fetch { .. }
            }
        )
    }

    /// Decodes a row the machine reported as [`Event::Row`], with the current columns.
    pub fn row<'a>(&self, payload: &'a [u8]) -> Result<Vec<Value<'a>>, DecodeError> {
        if self.binary() {
            decode_binary_row(payload, &self.columns)
        } else {
            decode_text_row(payload, self.columns.len())
        }
    }

    fn resolve(&self, stmt_id: u32) -> u32 {
        if stmt_id == LAST_PREPARED {
            self.last_prepared.unwrap_or(stmt_id)
        } else {
            stmt_id
        }
    }

    fn push(&mut self, e: Expect) {
        if self.pending.len() >= MAX_PENDING {
            // The server stopped answering long ago: start over rather than grow.
            self.pending.clear();
        }
        if self.state == State::Idle && self.pending.is_empty() {
            self.state = State::Start(e);
        } else {
            self.pending.push_back(e);
        }
    }

    /// The current response is complete: move on to the next queued one.
    fn done(&mut self) {
        self.completed = self.completed.wrapping_add(1);
        self.state = match self.pending.pop_front() {
            Some(e) => State::Start(e),
            None => State::Idle,
        };
    }

    /// Places a client packet (`seq` is its sequence id: commands start at 0). A command
    /// queues the response it expects; COM_STMT_EXECUTE gets its parameters decoded when the
    /// statement's shape is known.
    pub fn client<'a>(
        &mut self,
        seq: u8,
        payload: &'a [u8],
    ) -> Result<ClientEvent<'a>, DecodeError> {
        if seq != 0 && matches!(self.state, State::Infile { .. } | State::Auth) {
            return Ok(ClientEvent::Data(payload));
        }
        let mut cmd = decode_command(payload, self.caps)?;
        match &mut cmd {
            Command::Quit | Command::StmtClose(_) | Command::StmtSendLongData { .. } => {}
            Command::Query(_) => self.push(Expect::Results {
                binary: false,
                stmt: None,
            }),
            Command::StmtPrepare(_) => self.push(Expect::Prepare),
            Command::StmtExecute(exec) => {
                let id = self.resolve(exec.stmt_id);
                if let Some(s) = self.statements.get_mut(&id) {
                    if let Ok((types, values)) = decode_execute_params(
                        exec.param_bytes,
                        usize::from(s.params),
                        &s.param_types,
                        &s.long_data,
                    ) {
                        s.param_types = types;
                        exec.params = Some(values);
                    }
                    s.long_data.clear();
                }
                self.push(Expect::Results {
                    binary: true,
                    stmt: Some(id),
                });
            }
            Command::StmtFetch { stmt_id, .. } => {
                let stmt = self.resolve(*stmt_id);
                self.push(Expect::Fetch { stmt });
            }
            Command::FieldList { .. } => self.push(Expect::FieldList),
            Command::Statistics => self.push(Expect::Statistics),
            Command::ChangeUser { .. } => {
                self.statements.clear();
                self.push(Expect::Auth);
            }
            Command::ResetConnection => {
                self.statements.clear();
                self.push(Expect::Simple { quiet: true });
            }
            Command::SetOption(_) => self.push(Expect::Eof),
            Command::Ping | Command::StmtReset(_) => self.push(Expect::Simple { quiet: true }),
            Command::InitDb(_) | Command::ProcessKill(_) => {
                self.push(Expect::Simple { quiet: false })
            }
            Command::Unknown(_) => self.push(Expect::Unknown),
        }
        match &cmd {
            Command::StmtClose(id) => {
                let id = self.resolve(*id);
                self.statements.remove(&id);
            }
            Command::StmtSendLongData { stmt_id, param, .. } => {
                let id = self.resolve(*stmt_id);
                if let Some(s) = self.statements.get_mut(&id)
                    && *param < s.params
                    && !s.long_data.contains(param)
                {
                    s.long_data.push(*param);
                }
            }
            Command::StmtReset(id) => {
                let id = self.resolve(*id);
                if let Some(s) = self.statements.get_mut(&id) {
                    s.long_data.clear();
                }
            }
            _ => {}
        }
        Ok(ClientEvent::Command(cmd))
    }

    /// Places a server packet. A decode error resets the machine to idle (the rest of the
    /// current response will be [`Event::Unexpected`]).
    pub fn server<'a>(&mut self, payload: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let r = self.step(payload);
        if r.is_err() {
            self.state = State::Idle;
            self.pending.clear();
        }
        r
    }

    fn err(&mut self, payload: &[u8]) -> Result<Event<'static>, DecodeError> {
        let e = parse_err(payload)?;
        if e.code == PROGRESS_REPORT && self.caps.contains(Capabilities::MARIADB_PROGRESS) {
            return Ok(Event::Progress);
        }
        self.done();
        Ok(Event::Err(e))
    }

    /// An OK or EOF status ended a result: another result follows when it says so.
    fn result_end(&mut self, expect: Expect, status: u16) {
        if status & status::MORE_RESULTS_EXISTS != 0 {
            self.state = State::Start(expect);
        } else {
            self.done();
        }
    }

    fn step<'a>(&mut self, payload: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let first = *payload.first().ok_or(DecodeError::Empty {
            packet: "server response",
        })?;
        match self.state {
            State::Idle => Ok(Event::Unexpected),
            State::Start(expect) => self.start(expect, first, payload),
            State::Columns { expect, remaining } => {
                if first == 0xFF {
                    return self.err(payload);
                }
                self.columns.push(parse_column_def(payload, self.caps)?);
                let index = self.columns.len() - 1;
                let last = remaining <= 1;
                if last {
                    self.state = if self.caps.contains(Capabilities::DEPRECATE_EOF) {
                        self.remember_columns(expect);
                        State::Rows { expect }
                    } else {
                        State::ColumnsEof { expect }
                    };
                } else {
                    self.state = State::Columns {
                        expect,
                        remaining: remaining - 1,
                    };
                }
                Ok(Event::Column { index, last })
            }
            State::ColumnsEof { expect } => {
                if first == 0xFF {
                    return self.err(payload);
                }
                let status = terminator_status(payload, self.caps)?;
                self.remember_columns(expect);
                if status & status::CURSOR_EXISTS != 0 {
                    // A cursor was opened: rows come with COM_STMT_FETCH.
                    self.result_end(expect, status);
                    return Ok(Event::ResultDone { status });
                }
                self.state = State::Rows { expect };
                Ok(Event::ColumnsDone)
            }
            State::Rows { expect } => match first {
                0xFF => self.err(payload),
                0xFE if is_eof_or_ok_fe(payload) => {
                    let status = terminator_status(payload, self.caps)?;
                    if matches!(expect, Expect::Fetch { .. }) {
                        self.done();
                    } else {
                        self.result_end(expect, status);
                    }
                    Ok(Event::ResultDone { status })
                }
                _ => Ok(Event::Row(payload)),
            },
            State::Infile { expect } => match first {
                0xFF => self.err(payload),
                0x00 => {
                    let ok = parse_ok(payload, self.caps)?;
                    self.result_end(expect, ok.status);
                    Ok(Event::Ok(ok))
                }
                _ => Ok(Event::Unexpected),
            },
            State::PrepareParams {
                stmt,
                remaining,
                columns,
            } => {
                if first == 0xFF {
                    return self.err(payload);
                }
                parse_column_def(payload, self.caps)?;
                self.state = if remaining > 1 {
                    State::PrepareParams {
                        stmt,
                        remaining: remaining - 1,
                        columns,
                    }
                } else if !self.caps.contains(Capabilities::DEPRECATE_EOF) {
                    State::PrepareParamsEof { stmt, columns }
                } else {
                    self.after_params(stmt, columns)
                };
                if self.state == State::Idle || matches!(self.state, State::Start(_)) {
                    return Ok(Event::PrepareDone { stmt_id: stmt });
                }
                Ok(Event::Param)
            }
            State::PrepareParamsEof { stmt, columns } => {
                terminator_status(payload, self.caps)?;
                self.state = self.after_params(stmt, columns);
                if self.state == State::Idle || matches!(self.state, State::Start(_)) {
                    return Ok(Event::PrepareDone { stmt_id: stmt });
                }
                Ok(Event::Param)
            }
            State::PrepareColumns { stmt, remaining } => {
                if first == 0xFF {
                    return self.err(payload);
                }
                self.columns.push(parse_column_def(payload, self.caps)?);
                if remaining > 1 {
                    self.state = State::PrepareColumns {
                        stmt,
                        remaining: remaining - 1,
                    };
                    return Ok(Event::PrepareColumn);
                }
                if self.caps.contains(Capabilities::DEPRECATE_EOF) {
                    self.prepare_done(stmt);
                    return Ok(Event::PrepareDone { stmt_id: stmt });
                }
                self.state = State::PrepareColumnsEof { stmt };
                Ok(Event::PrepareColumn)
            }
            State::PrepareColumnsEof { stmt } => {
                terminator_status(payload, self.caps)?;
                self.prepare_done(stmt);
                Ok(Event::PrepareDone { stmt_id: stmt })
            }
            State::FieldList => match first {
                0xFF => self.err(payload),
                0xFE if is_eof_or_ok_fe(payload) => {
                    let status = terminator_status(payload, self.caps)?;
                    self.done();
                    Ok(Event::ResultDone { status })
                }
                _ => {
                    self.columns.push(parse_column_def(payload, self.caps)?);
                    Ok(Event::Column {
                        index: self.columns.len() - 1,
                        last: false,
                    })
                }
            },
            State::Auth => match first {
                0x00 => {
                    let ok = parse_ok(payload, self.caps)?;
                    self.done();
                    Ok(Event::Ok(ok))
                }
                0xFF => self.err(payload),
                _ => Ok(Event::AuthData),
            },
        }
    }

    fn after_params(&mut self, stmt: u32, columns: u16) -> State {
        if columns == 0 {
            self.prepare_done(stmt);
            return self.state;
        }
        State::PrepareColumns {
            stmt,
            remaining: columns,
        }
    }

    fn prepare_done(&mut self, stmt: u32) {
        if let Some(s) = self.statements.get_mut(&stmt) {
            s.columns = self.columns.clone();
        }
        self.done();
    }

    /// Binary result sets remember their columns for later executions and fetches.
    fn remember_columns(&mut self, expect: Expect) {
        if let Expect::Results {
            binary: true,
            stmt: Some(id),
        } = expect
            && let Some(s) = self.statements.get_mut(&id)
        {
            s.columns = self.columns.clone();
        }
    }

    fn start<'a>(
        &mut self,
        expect: Expect,
        first: u8,
        payload: &'a [u8],
    ) -> Result<Event<'a>, DecodeError> {
        if first == 0xFF {
            return self.err(payload);
        }
        match expect {
            Expect::Unknown => Ok(Event::Unexpected),
            Expect::Simple { .. } => {
                let ok = parse_ok(payload, self.caps)?;
                self.done();
                Ok(Event::Ok(ok))
            }
            Expect::Eof => {
                // EOF (0xFE), or an OK where the server prefers one.
                let status = if first == 0x00 {
                    parse_ok(payload, self.caps)?.status
                } else {
                    terminator_status(payload, self.caps)?
                };
                self.done();
                Ok(Event::ResultDone { status })
            }
            Expect::Statistics => {
                self.done();
                Ok(Event::Statistics(payload))
            }
            Expect::Auth => {
                self.state = State::Auth;
                self.step(payload)
            }
            Expect::FieldList => {
                self.columns.clear();
                self.state = State::FieldList;
                self.step(payload)
            }
            Expect::Fetch { stmt } => {
                self.columns = self
                    .statements
                    .get(&stmt)
                    .map(|s| s.columns.clone())
                    .unwrap_or_default();
                self.state = State::Rows { expect };
                self.step(payload)
            }
            Expect::Prepare => {
                let mut r = Reader::new("COM_STMT_PREPARE_OK", payload);
                r.u8("header")?;
                let stmt_id = r.u32("statement id")?;
                let columns = r.u16("column count")?;
                let params = r.u16("parameter count")?;
                let warnings = if r.remaining() >= 3 {
                    r.u8("reserved")?;
                    r.u16("warnings")?
                } else {
                    0
                };
                if self.statements.len() < MAX_STATEMENTS || self.statements.contains_key(&stmt_id)
                {
                    self.statements.insert(
                        stmt_id,
                        Stmt {
                            params,
                            ..Stmt::default()
                        },
                    );
                }
                self.last_prepared = Some(stmt_id);
                self.columns.clear();
                self.state = if params > 0 {
                    State::PrepareParams {
                        stmt: stmt_id,
                        remaining: params,
                        columns,
                    }
                } else if columns > 0 {
                    State::PrepareColumns {
                        stmt: stmt_id,
                        remaining: columns,
                    }
                } else {
                    self.prepare_done(stmt_id);
                    self.state
                };
                Ok(Event::PrepareOk {
                    stmt_id,
                    params,
                    columns,
                    warnings,
                })
            }
            Expect::Results { stmt, .. } => match first {
                0x00 => {
                    let ok = parse_ok(payload, self.caps)?;
                    self.result_end(expect, ok.status);
                    Ok(Event::Ok(ok))
                }
                0xFB => {
                    self.state = State::Infile { expect };
                    Ok(Event::LocalInfile(&payload[1..]))
                }
                _ => {
                    let mut r = Reader::new("column count", payload);
                    let columns = r.lenenc("column count")?;
                    let metadata = if self.caps.contains(Capabilities::MARIADB_CACHE_METADATA) {
                        r.u8("metadata follows").unwrap_or(1) != 0
                    } else {
                        true
                    };
                    if columns == 0 || columns > MAX_COLUMNS {
                        return Err(r.invalid("column count", columns));
                    }
                    if metadata {
                        self.columns.clear();
                        self.state = State::Columns {
                            expect,
                            remaining: columns,
                        };
                    } else {
                        // Cached metadata: the statement's columns from before.
                        self.columns = stmt
                            .and_then(|id| self.statements.get(&id))
                            .map(|s| s.columns.clone())
                            .unwrap_or_default();
                        self.state = if self.caps.contains(Capabilities::DEPRECATE_EOF) {
                            State::Rows { expect }
                        } else {
                            State::ColumnsEof { expect }
                        };
                    }
                    Ok(Event::ResultStart { columns, metadata })
                }
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::protocol::mysql::command::code;
    use crate::protocol::mysql::handshake::EofPacket;
    use crate::protocol::mysql::packet::put_lenenc_bytes;
    use crate::protocol::mysql::resultset::types;

    fn caps() -> Capabilities {
        Capabilities::sluice_default()
    }

    use crate::protocol::mysql::testing::{ok_fe, text_row};

    fn coldef(name: &str, table: &str, ty: u8, flags: u16) -> Vec<u8> {
        crate::protocol::mysql::testing::coldef(table, name, name, ty, flags)
    }

    #[test]
    fn a_text_result_set_is_followed_to_its_end() {
        let mut m = ResponseMachine::new(caps());
        assert!(m.is_idle());
        m.client(0, b"\x03select id, name from users").unwrap();
        assert!(!m.is_idle());
        assert_eq!(
            m.server(b"\x02").unwrap(),
            Event::ResultStart {
                columns: 2,
                metadata: true
            }
        );
        assert_eq!(
            m.server(&coldef("id", "users", types::LONG, 0)).unwrap(),
            Event::Column {
                index: 0,
                last: false
            }
        );
        assert_eq!(
            m.server(&coldef("name", "users", types::VAR_STRING, 0))
                .unwrap(),
            Event::Column {
                index: 1,
                last: true
            }
        );
        assert_eq!(m.columns()[1].org_table, "users");
        let row = text_row(&[Some("1"), None]);
        assert_eq!(m.server(&row).unwrap(), Event::Row(&row));
        assert_eq!(m.row(&row).unwrap(), vec![Value::Bytes(b"1"), Value::Null]);
        assert_eq!(
            m.server(&ok_fe(status::AUTOCOMMIT)).unwrap(),
            Event::ResultDone {
                status: status::AUTOCOMMIT
            }
        );
        assert!(m.is_idle());
        assert_eq!(m.server(b"\x00\0\0\0\0\0\0").unwrap(), Event::Unexpected);
    }

    #[test]
    fn eof_packets_frame_the_columns_without_deprecate_eof() {
        let c = caps().without(Capabilities::DEPRECATE_EOF);
        let mut m = ResponseMachine::new(c);
        m.client(0, b"\x03select 1").unwrap();
        m.server(b"\x01").unwrap();
        m.server(&coldef("1", "", types::LONGLONG, 0)).unwrap();
        let eof = EofPacket::default().encode();
        assert_eq!(m.server(&eof).unwrap(), Event::ColumnsDone);
        let row = text_row(&[Some("1")]);
        assert_eq!(m.server(&row).unwrap(), Event::Row(&row));
        assert_eq!(m.server(&eof).unwrap(), Event::ResultDone { status: 0 });
        assert!(m.is_idle());
    }

    #[test]
    fn multi_statements_continue_while_more_results_exist() {
        let mut m = ResponseMachine::new(caps());
        m.client(0, b"\x03select 1; update t set a = 1; select 2")
            .unwrap();
        m.server(b"\x01").unwrap();
        m.server(&coldef("1", "", types::LONGLONG, 0)).unwrap();
        m.server(&text_row(&[Some("1")])).unwrap();
        m.server(&ok_fe(status::MORE_RESULTS_EXISTS)).unwrap();
        assert!(!m.is_idle());
        let ok = OkPacket {
            affected_rows: 3,
            status: status::MORE_RESULTS_EXISTS,
            ..OkPacket::default()
        };
        assert!(matches!(
            m.server(&ok.encode(0, caps())).unwrap(),
            Event::Ok(OkPacket {
                affected_rows: 3,
                ..
            })
        ));
        assert_eq!(
            m.server(b"\x01").unwrap(),
            Event::ResultStart {
                columns: 1,
                metadata: true
            }
        );
        m.server(&coldef("2", "", types::LONGLONG, 0)).unwrap();
        m.server(&text_row(&[Some("2")])).unwrap();
        m.server(&ok_fe(0)).unwrap();
        assert!(m.is_idle());
        // An error ends a multi-statement early.
        m.client(0, b"\x03select 1; bad").unwrap();
        m.server(&ok.encode(0, caps())).unwrap();
        let err = ErrPacket::new(1064, "42000", "syntax").encode();
        assert!(matches!(m.server(&err).unwrap(), Event::Err(_)));
        assert!(m.is_idle());
    }

    #[test]
    fn a_prepared_statement_executes_with_a_binary_result() {
        let mut m = ResponseMachine::new(caps());
        m.client(0, b"\x16select id, name from users where id > ?")
            .unwrap();
        let mut ok = BytesMut::new();
        ok.put_u8(0);
        ok.put_u32_le(9);
        ok.put_u16_le(2);
        ok.put_u16_le(1);
        ok.put_u8(0);
        ok.put_u16_le(0);
        assert_eq!(
            m.server(&ok).unwrap(),
            Event::PrepareOk {
                stmt_id: 9,
                params: 1,
                columns: 2,
                warnings: 0
            }
        );
        assert_eq!(
            m.server(&coldef("?", "", types::LONGLONG, 0)).unwrap(),
            Event::Param
        );
        assert_eq!(
            m.server(&coldef("id", "users", types::LONG, 0)).unwrap(),
            Event::PrepareColumn
        );
        assert_eq!(
            m.server(&coldef("name", "users", types::VAR_STRING, 0))
                .unwrap(),
            Event::PrepareDone { stmt_id: 9 }
        );
        assert!(m.is_idle());
        assert_eq!(m.statement_columns(9).unwrap().len(), 2);

        let mut exec = BytesMut::new();
        exec.put_u8(code::STMT_EXECUTE);
        exec.put_u32_le(9);
        exec.put_u8(0);
        exec.put_u32_le(1);
        exec.put_u8(0);
        exec.put_u8(1);
        exec.put_slice(&[types::LONGLONG, 0]);
        exec.put_u64_le(5);
        let ClientEvent::Command(Command::StmtExecute(e)) = m.client(0, &exec).unwrap() else {
            panic!("not an execute")
        };
        assert_eq!(e.params, Some(vec![Value::Int(5)]));
        m.server(b"\x02").unwrap();
        m.server(&coldef("id", "users", types::LONG, 0)).unwrap();
        assert_eq!(
            m.server(&coldef("name", "users", types::VAR_STRING, 0))
                .unwrap(),
            Event::Column {
                index: 1,
                last: true
            }
        );
        // 0x00, bitmap (2 cols + 2 bits -> 1 byte) with col 1 NULL (bit 3), id = 6.
        let row = [0x00, 0b1000, 6, 0, 0, 0];
        assert_eq!(m.server(&row).unwrap(), Event::Row(&row));
        assert_eq!(m.row(&row).unwrap(), vec![Value::Int(6), Value::Null]);
        m.server(&ok_fe(0)).unwrap();
        assert!(m.is_idle());
    }

    #[test]
    fn local_infile_waits_for_the_file_then_the_ok() {
        let mut m = ResponseMachine::new(caps());
        m.client(0, b"\x03load data local infile '/etc/passwd' into table t")
            .unwrap();
        assert_eq!(
            m.server(b"\xfb/etc/passwd").unwrap(),
            Event::LocalInfile(b"/etc/passwd")
        );
        assert_eq!(
            m.client(2, b"root:x:0").unwrap(),
            ClientEvent::Data(b"root:x:0")
        );
        assert_eq!(m.client(3, b"").unwrap(), ClientEvent::Data(b""));
        assert!(matches!(
            m.server(&OkPacket::default().encode(0, caps())).unwrap(),
            Event::Ok(_)
        ));
        assert!(m.is_idle());
    }

    #[test]
    fn commands_without_a_response_queue_nothing() {
        let mut m = ResponseMachine::new(caps());
        m.client(0, b"\x19\x01\0\0\0").unwrap();
        m.client(0, b"\x18\x01\0\0\0\0\0data").unwrap();
        assert!(m.is_idle());
        m.client(0, b"\x0e").unwrap();
        m.client(0, b"\x0e").unwrap();
        let ok = OkPacket::default().encode(0, caps());
        m.server(&ok).unwrap();
        assert!(!m.is_idle());
        m.server(&ok).unwrap();
        assert!(m.is_idle());
    }

    #[test]
    fn a_parameter_sent_as_long_data_is_not_read_from_the_execute_packet() {
        let mut m = ResponseMachine::new(caps());
        m.client(0, b"\x16insert into b values (?, ?)").unwrap();
        let mut ok = BytesMut::new();
        ok.put_u8(0);
        ok.put_u32_le(3);
        ok.put_u16_le(0);
        ok.put_u16_le(2);
        ok.put_u8(0);
        ok.put_u16_le(0);
        m.server(&ok).unwrap();
        m.server(&coldef("?", "", types::LONGLONG, 0)).unwrap();
        m.server(&coldef("?", "", types::BLOB, 0)).unwrap();
        assert!(m.is_idle());
        // Long data for parameter 1 (and a bogus parameter 9, ignored).
        m.client(0, b"\x18\x03\0\0\0\x01\0blob bytes").unwrap();
        m.client(0, b"\x18\x03\0\0\0\x09\0junk").unwrap();
        let mut exec = BytesMut::new();
        exec.put_u8(code::STMT_EXECUTE);
        exec.put_u32_le(3);
        exec.put_u8(0);
        exec.put_u32_le(1);
        exec.put_u8(0);
        exec.put_u8(1);
        exec.put_slice(&[types::LONGLONG, 0, types::BLOB, 0]);
        exec.put_u64_le(1);
        let ClientEvent::Command(Command::StmtExecute(e)) = m.client(0, &exec).unwrap() else {
            panic!("not an execute")
        };
        assert_eq!(e.params, Some(vec![Value::Int(1), Value::LongData]));
        m.server(&OkPacket::default().encode(0, caps())).unwrap();
        // The next execution sends both values again.
        let mut again = exec.clone();
        put_lenenc_bytes(&mut again, b"inline");
        let ClientEvent::Command(Command::StmtExecute(e)) = m.client(0, &again).unwrap() else {
            panic!("not an execute")
        };
        assert_eq!(e.params, Some(vec![Value::Int(1), Value::Bytes(b"inline")]));
    }

    #[test]
    fn cached_metadata_reuses_the_statements_columns() {
        let c = caps()
            .without(Capabilities::DEPRECATE_EOF)
            .union(Capabilities::MARIADB_CACHE_METADATA);
        let mut m = ResponseMachine::new(c);
        m.client(0, b"\x16select id from t").unwrap();
        let mut ok = BytesMut::new();
        ok.put_u8(0);
        ok.put_u32_le(1);
        ok.put_u16_le(1);
        ok.put_u16_le(0);
        ok.put_u8(0);
        ok.put_u16_le(0);
        m.server(&ok).unwrap();
        m.server(&coldef("id", "t", types::LONG, 0)).unwrap();
        let eof = EofPacket::default().encode();
        assert_eq!(m.server(&eof).unwrap(), Event::PrepareDone { stmt_id: 1 });
        let exec = b"\x17\x01\0\0\0\0\x01\0\0\0";
        let row = [0x00, 0x00, 9, 0, 0, 0];
        // First execution: metadata follows (1).
        m.client(0, exec).unwrap();
        assert_eq!(
            m.server(b"\x01\x01").unwrap(),
            Event::ResultStart {
                columns: 1,
                metadata: true
            }
        );
        m.server(&coldef("id", "t", types::LONG, 0)).unwrap();
        assert_eq!(m.server(&eof).unwrap(), Event::ColumnsDone);
        m.server(&row).unwrap();
        m.server(&eof).unwrap();
        // Second: not resent (0); the EOF and rows follow directly.
        m.client(0, exec).unwrap();
        assert_eq!(
            m.server(b"\x01\x00").unwrap(),
            Event::ResultStart {
                columns: 1,
                metadata: false
            }
        );
        assert_eq!(m.columns()[0].name, "id");
        assert_eq!(m.server(&eof).unwrap(), Event::ColumnsDone);
        assert_eq!(m.server(&row).unwrap(), Event::Row(&row));
        assert_eq!(m.row(&row).unwrap(), vec![Value::Int(9)]);
        m.server(&eof).unwrap();
        assert!(m.is_idle());
    }

    #[test]
    fn set_option_is_answered_by_an_eof_or_an_ok() {
        for c in [caps(), caps().without(Capabilities::DEPRECATE_EOF)] {
            let mut m = ResponseMachine::new(c);
            m.client(0, b"\x1b\x00\x00").unwrap();
            assert_eq!(
                m.server(&EofPacket::default().encode()).unwrap(),
                Event::ResultDone { status: 0 }
            );
            m.client(0, b"\x1b\x01\x00").unwrap();
            assert!(matches!(
                m.server(&OkPacket::default().encode(0, c)).unwrap(),
                Event::ResultDone { .. }
            ));
            assert!(m.is_idle());
        }
    }

    #[test]
    fn a_malformed_packet_is_an_error_and_resets() {
        let mut m = ResponseMachine::new(caps());
        m.client(0, b"\x03select 1").unwrap();
        m.server(b"\x01").unwrap();
        assert!(m.server(b"\x03def").is_err());
        assert!(m.is_idle());
        assert!(m.server(b"").is_err());
    }
}
