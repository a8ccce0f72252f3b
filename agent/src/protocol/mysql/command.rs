//! The command phase: client commands ([`decode_command`]), the values they and binary rows
//! carry ([`Value`]), column definitions ([`ColumnDef`]), and the [`ResponseMachine`] that, fed
//! both directions in order, knows what every server packet is.
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

use super::handshake::{
    Capabilities, ErrPacket, OkPacket, PROGRESS_REPORT, is_eof_or_ok_fe, parse_err, parse_ok,
    status, terminator_status,
};
use super::packet::{DecodeError, Reader, text};

/// Command codes (the first payload byte of a client command).
pub mod code {
    pub const SLEEP: u8 = 0x00;
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PROCESS_KILL: u8 = 0x0C;
    pub const PING: u8 = 0x0E;
    pub const CHANGE_USER: u8 = 0x11;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1A;
    pub const SET_OPTION: u8 = 0x1B;
    pub const STMT_FETCH: u8 = 0x1C;
    pub const RESET_CONNECTION: u8 = 0x1F;
    /// MariaDB: bulk execution of a prepared statement.
    pub const STMT_BULK_EXECUTE: u8 = 0xFA;
}

/// Column types (ColumnDefinition41 `type`, binary parameter types).
pub mod types {
    pub const DECIMAL: u8 = 0x00;
    pub const TINY: u8 = 0x01;
    pub const SHORT: u8 = 0x02;
    pub const LONG: u8 = 0x03;
    pub const FLOAT: u8 = 0x04;
    pub const DOUBLE: u8 = 0x05;
    pub const NULL: u8 = 0x06;
    pub const TIMESTAMP: u8 = 0x07;
    pub const LONGLONG: u8 = 0x08;
    pub const INT24: u8 = 0x09;
    pub const DATE: u8 = 0x0A;
    pub const TIME: u8 = 0x0B;
    pub const DATETIME: u8 = 0x0C;
    pub const YEAR: u8 = 0x0D;
    pub const NEWDATE: u8 = 0x0E;
    pub const VARCHAR: u8 = 0x0F;
    pub const BIT: u8 = 0x10;
    pub const TIMESTAMP2: u8 = 0x11;
    pub const DATETIME2: u8 = 0x12;
    pub const TIME2: u8 = 0x13;
    pub const JSON: u8 = 0xF5;
    pub const NEWDECIMAL: u8 = 0xF6;
    pub const BLOB: u8 = 0xFC;
    pub const VAR_STRING: u8 = 0xFD;
    pub const STRING: u8 = 0xFE;
}

/// Column flag: the integer is unsigned.
pub const UNSIGNED_FLAG: u16 = 0x20;
/// COM_STMT_EXECUTE flag: open a read-only cursor (rows come with COM_STMT_FETCH).
pub const CURSOR_TYPE_READ_ONLY: u8 = 0x01;
/// MariaDB: a statement id meaning "the statement prepared last" (pipelined prepare+execute).
pub const LAST_PREPARED: u32 = 0xFFFF_FFFF;

/// Most prepared statements remembered per session (MariaDB's default cap is 16382).
pub const MAX_STATEMENTS: usize = 16_384;
/// Most columns accepted in one result set (MySQL and MariaDB stop at 4096 per table).
pub const MAX_COLUMNS: u64 = 1 << 16;
/// Most commands awaiting a response remembered per session.
pub const MAX_PENDING: usize = 4096;

/// A client command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command<'a> {
    Quit,
    InitDb(&'a [u8]),
    Query(&'a [u8]),
    FieldList {
        table: &'a [u8],
        wildcard: &'a [u8],
    },
    Statistics,
    ProcessKill(u32),
    Ping,
    ChangeUser {
        user: &'a [u8],
        database: &'a [u8],
    },
    StmtPrepare(&'a [u8]),
    StmtExecute(Execute<'a>),
    StmtSendLongData {
        stmt_id: u32,
        param: u16,
        data: &'a [u8],
    },
    StmtClose(u32),
    StmtReset(u32),
    StmtFetch {
        stmt_id: u32,
        rows: u32,
    },
    SetOption(u16),
    ResetConnection,
    Unknown(u8),
}

/// COM_STMT_EXECUTE. Its parameter values can only be decoded knowing how many parameters the
/// statement has (from its PREPARE_OK) and, when the client does not resend them, the types of
/// the previous execution: [`ResponseMachine::client`] fills `params`.
#[derive(Debug, Clone, PartialEq)]
pub struct Execute<'a> {
    pub stmt_id: u32,
    pub flags: u8,
    pub iterations: u32,
    /// NULL bitmap, new-params-bound flag, types and values, undecoded.
    pub param_bytes: &'a [u8],
    /// The decoded parameter values, when the statement's parameter count is known.
    pub params: Option<Vec<Value<'a>>>,
}

/// A decoded value of a binary row or an execution parameter (text rows are all `Bytes`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Int(i64),
    UInt(u64),
    Float(f32),
    Double(f64),
    /// Strings, decimals, blobs, JSON, bits, enums, and every value of a text row.
    Bytes(&'a [u8]),
    Date {
        year: u16,
        month: u8,
        day: u8,
    },
    DateTime {
        year: u16,
        month: u8,
        day: u8,
        hour: u8,
        minute: u8,
        second: u8,
        micros: u32,
    },
    Time {
        negative: bool,
        days: u32,
        hours: u8,
        minutes: u8,
        seconds: u8,
        micros: u32,
    },
    /// A parameter whose value came earlier in COM_STMT_SEND_LONG_DATA packets.
    LongData,
}

impl Value<'_> {
    /// The value as text for a reader, the way the text protocol would show it; `None` is NULL.
    pub fn render(&self) -> Option<String> {
        Some(match self {
            Value::Null => return None,
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Double(d) => d.to_string(),
            Value::Bytes(b) => text(b),
            Value::Date { year, month, day } => format!("{year:04}-{month:02}-{day:02}"),
            Value::DateTime {
                year,
                month,
                day,
                hour,
                minute,
                second,
                micros,
            } => {
                let mut s =
                    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}");
                if *micros != 0 {
                    s.push_str(&format!(".{micros:06}"));
                }
                s
            }
            Value::Time {
                negative,
                days,
                hours,
                minutes,
                seconds,
                micros,
            } => {
                let h = u64::from(*days) * 24 + u64::from(*hours);
                let sign = if *negative { "-" } else { "" };
                let mut s = format!("{sign}{h:02}:{minutes:02}:{seconds:02}");
                if *micros != 0 {
                    s.push_str(&format!(".{micros:06}"));
                }
                s
            }
            Value::LongData => "/* sent as long data */".to_owned(),
        })
    }
}

/// Decodes one binary-protocol value of column/parameter type `ty`.
pub fn decode_binary_value<'a>(
    r: &mut Reader<'a>,
    ty: u8,
    unsigned: bool,
) -> Result<Value<'a>, DecodeError> {
    use types::*;
    Ok(match ty {
        NULL => Value::Null,
        TINY => {
            let b = r.u8("tiny")?;
            if unsigned {
                Value::UInt(u64::from(b))
            } else {
                Value::Int(i64::from(b as i8))
            }
        }
        SHORT | YEAR => {
            let v = r.u16("short")?;
            if unsigned || ty == YEAR {
                Value::UInt(u64::from(v))
            } else {
                Value::Int(i64::from(v as i16))
            }
        }
        LONG | INT24 => {
            let v = r.u32("long")?;
            if unsigned {
                Value::UInt(u64::from(v))
            } else {
                Value::Int(i64::from(v as i32))
            }
        }
        LONGLONG => {
            let v = r.u64("longlong")?;
            if unsigned {
                Value::UInt(v)
            } else {
                Value::Int(v as i64)
            }
        }
        FLOAT => Value::Float(f32::from_bits(r.u32("float")?)),
        DOUBLE => Value::Double(f64::from_bits(r.u64("double")?)),
        DATE | DATETIME | TIMESTAMP | NEWDATE | TIMESTAMP2 | DATETIME2 => {
            let len = r.u8("datetime length")?;
            let body = r.bytes(usize::from(len), "datetime")?;
            let mut b = Reader::new("datetime", body);
            let (year, month, day) = if len >= 4 {
                (b.u16("year")?, b.u8("month")?, b.u8("day")?)
            } else {
                (0, 0, 0)
            };
            let (hour, minute, second) = if len >= 7 {
                (b.u8("hour")?, b.u8("minute")?, b.u8("second")?)
            } else {
                (0, 0, 0)
            };
            let micros = if len >= 11 { b.u32("microseconds")? } else { 0 };
            if ty == DATE || ty == NEWDATE {
                Value::Date { year, month, day }
            } else {
                Value::DateTime {
                    year,
                    month,
                    day,
                    hour,
                    minute,
                    second,
                    micros,
                }
            }
        }
        TIME | TIME2 => {
            let len = r.u8("time length")?;
            let body = r.bytes(usize::from(len), "time")?;
            let mut b = Reader::new("time", body);
            if len >= 8 {
                Value::Time {
                    negative: b.u8("sign")? != 0,
                    days: b.u32("days")?,
                    hours: b.u8("hours")?,
                    minutes: b.u8("minutes")?,
                    seconds: b.u8("seconds")?,
                    micros: if len >= 12 { b.u32("microseconds")? } else { 0 },
                }
            } else {
                Value::Time {
                    negative: false,
                    days: 0,
                    hours: 0,
                    minutes: 0,
                    seconds: 0,
                    micros: 0,
                }
            }
        }
        _ => Value::Bytes(r.lenenc_bytes("value")?),
    })
}

/// Decodes a client command payload. `caps` are the connection's negotiated capabilities.
pub fn decode_command(payload: &[u8], caps: Capabilities) -> Result<Command<'_>, DecodeError> {
    let Some((&cmd, body)) = payload.split_first() else {
        return Err(DecodeError::Empty { packet: "command" });
    };
    let mut r = Reader::new("command", body);
    Ok(match cmd {
        code::QUIT => Command::Quit,
        code::INIT_DB => Command::InitDb(body),
        code::QUERY => Command::Query(body),
        code::FIELD_LIST => {
            let mut r = Reader::new("COM_FIELD_LIST", body);
            let table = r.cstr_or_rest();
            Command::FieldList {
                table,
                wildcard: r.rest(),
            }
        }
        code::STATISTICS => Command::Statistics,
        code::PROCESS_KILL => Command::ProcessKill(r.u32("connection id")?),
        code::PING => Command::Ping,
        code::CHANGE_USER => {
            let mut r = Reader::new("COM_CHANGE_USER", body);
            let user = r.cstr("user")?;
            if caps.contains(Capabilities::SECURE_CONNECTION) {
                let n = r.u8("auth response length")?;
                r.bytes(usize::from(n), "auth response")?;
            } else {
                r.cstr("auth response")?;
            }
            let database = if r.is_empty() {
                &[][..]
            } else {
                r.cstr_or_rest()
            };
            Command::ChangeUser { user, database }
        }
        code::STMT_PREPARE => Command::StmtPrepare(body),
        code::STMT_EXECUTE => {
            let mut r = Reader::new("COM_STMT_EXECUTE", body);
            Command::StmtExecute(Execute {
                stmt_id: r.u32("statement id")?,
                flags: r.u8("flags")?,
                iterations: r.u32("iteration count")?,
                param_bytes: r.rest(),
                params: None,
            })
        }
        code::STMT_SEND_LONG_DATA => {
            let mut r = Reader::new("COM_STMT_SEND_LONG_DATA", body);
            Command::StmtSendLongData {
                stmt_id: r.u32("statement id")?,
                param: r.u16("parameter")?,
                data: r.rest(),
            }
        }
        code::STMT_CLOSE => Command::StmtClose(r.u32("statement id")?),
        code::STMT_RESET => Command::StmtReset(r.u32("statement id")?),
        code::SET_OPTION => Command::SetOption(r.u16("option")?),
        code::STMT_FETCH => Command::StmtFetch {
            stmt_id: r.u32("statement id")?,
            rows: r.u32("rows")?,
        },
        code::RESET_CONNECTION => Command::ResetConnection,
        other => Command::Unknown(other),
    })
}

/// One parameter type of a COM_STMT_EXECUTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamType {
    pub ty: u8,
    pub unsigned: bool,
}

/// Decodes the parameters of an execution of a statement with `count` parameters; `previous`
/// are the types of the previous execution (used when the client does not resend types).
/// `long_data` lists the parameters sent with COM_STMT_SEND_LONG_DATA (their value is not in
/// the packet). Returns the types in force and the values.
pub fn decode_execute_params<'a>(
    param_bytes: &'a [u8],
    count: usize,
    previous: &[ParamType],
    long_data: &[u16],
) -> Result<(Vec<ParamType>, Vec<Value<'a>>), DecodeError> {
    if count == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut r = Reader::new("COM_STMT_EXECUTE", param_bytes);
    let bitmap = r.bytes(count.div_ceil(8), "NULL bitmap")?;
    let bound = r.u8("new params bound flag")?;
    let types: Vec<ParamType> = if bound == 1 {
        let mut t = Vec::with_capacity(count.min(r.remaining() / 2));
        for _ in 0..count {
            let ty = r.u8("parameter type")?;
            let flag = r.u8("parameter flag")?;
            t.push(ParamType {
                ty,
                unsigned: flag & 0x80 != 0,
            });
        }
        t
    } else if previous.len() == count {
        previous.to_vec()
    } else {
        return Err(r.invalid("parameter types (never sent)", count as u64));
    };
    let mut values = Vec::with_capacity(count.min(r.remaining() + 1));
    for (i, t) in types.iter().enumerate() {
        let null = bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0);
        if null {
            values.push(Value::Null);
        } else if long_data.iter().any(|&p| usize::from(p) == i) {
            values.push(Value::LongData);
        } else {
            values.push(decode_binary_value(&mut r, t.ty, t.unsigned)?);
        }
    }
    Ok((types, values))
}

/// A column definition (ColumnDefinition41).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ColumnDef {
    pub schema: String,
    /// The table alias as the query named it.
    pub table: String,
    /// The real table (empty for computed columns): what masking rules match.
    pub org_table: String,
    /// The column alias as the query named it.
    pub name: String,
    /// The real column name (empty for computed columns).
    pub org_name: String,
    pub charset: u16,
    pub length: u32,
    pub column_type: u8,
    pub flags: u16,
    pub decimals: u8,
}

impl ColumnDef {
    pub fn unsigned(&self) -> bool {
        self.flags & UNSIGNED_FLAG != 0
    }
}

/// Decodes a column definition; MariaDB's extended type info is skipped when negotiated.
pub fn parse_column_def(payload: &[u8], caps: Capabilities) -> Result<ColumnDef, DecodeError> {
    let mut r = Reader::new("column definition", payload);
    r.lenenc_bytes("catalog")?;
    let schema = text(r.lenenc_bytes("schema")?);
    let table = text(r.lenenc_bytes("table")?);
    let org_table = text(r.lenenc_bytes("org_table")?);
    let name = text(r.lenenc_bytes("name")?);
    let org_name = text(r.lenenc_bytes("org_name")?);
    if caps.contains(Capabilities::MARIADB_EXTENDED_TYPE_INFO) {
        r.lenenc_bytes("extended type info")?;
    }
    let fixed = r.lenenc("fixed fields length")?;
    if fixed < 10 {
        return Err(r.invalid("fixed fields length", fixed));
    }
    Ok(ColumnDef {
        schema,
        table,
        org_table,
        name,
        org_name,
        charset: r.u16("character set")?,
        length: r.u32("column length")?,
        column_type: r.u8("type")?,
        flags: r.u16("flags")?,
        decimals: r.u8("decimals")?,
    })
}

/// Decodes a text-protocol row of `columns` values.
pub fn decode_text_row(payload: &[u8], columns: usize) -> Result<Vec<Value<'_>>, DecodeError> {
    let mut r = Reader::new("text row", payload);
    let mut out = Vec::with_capacity(columns.min(payload.len()));
    for _ in 0..columns {
        out.push(match r.lenenc_bytes_or_null("value")? {
            Some(b) => Value::Bytes(b),
            None => Value::Null,
        });
    }
    Ok(out)
}

/// Decodes a binary-protocol row of `columns`.
pub fn decode_binary_row<'a>(
    payload: &'a [u8],
    columns: &[ColumnDef],
) -> Result<Vec<Value<'a>>, DecodeError> {
    let mut r = Reader::new("binary row", payload);
    let header = r.u8("header")?;
    if header != 0 {
        return Err(r.invalid("header", u64::from(header)));
    }
    let bitmap = r.bytes((columns.len() + 7 + 2) / 8, "NULL bitmap")?;
    let mut out = Vec::with_capacity(columns.len());
    for (i, c) in columns.iter().enumerate() {
        let bit = i + 2;
        if bitmap
            .get(bit / 8)
            .is_some_and(|b| b & (1 << (bit % 8)) != 0)
        {
            out.push(Value::Null);
        } else {
            out.push(decode_binary_value(&mut r, c.column_type, c.unsigned())?);
        }
    }
    Ok(out)
}

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
    use crate::protocol::mysql::handshake::EofPacket;
    use crate::protocol::mysql::packet::{put_lenenc, put_lenenc_bytes};

    fn caps() -> Capabilities {
        Capabilities::sluice_default()
    }

    fn coldef(name: &str, table: &str, ty: u8, flags: u16) -> Vec<u8> {
        let mut b = BytesMut::new();
        for s in ["def", "shop", table, table, name, name] {
            put_lenenc_bytes(&mut b, s.as_bytes());
        }
        put_lenenc(&mut b, 0x0c);
        b.put_u16_le(33);
        b.put_u32_le(11);
        b.put_u8(ty);
        b.put_u16_le(flags);
        b.put_u8(0);
        b.put_u16_le(0);
        b.to_vec()
    }

    fn text_row(values: &[Option<&str>]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for v in values {
            match v {
                Some(s) => put_lenenc_bytes(&mut b, s.as_bytes()),
                None => b.put_u8(0xFB),
            }
        }
        b.to_vec()
    }

    fn ok_fe(status: u16) -> Vec<u8> {
        OkPacket {
            status,
            ..OkPacket::default()
        }
        .encode(0xFE, caps())
        .to_vec()
    }

    #[test]
    fn commands_decode() {
        let c = caps();
        assert_eq!(decode_command(b"\x01", c).unwrap(), Command::Quit);
        assert_eq!(
            decode_command(b"\x03select 1", c).unwrap(),
            Command::Query(b"select 1")
        );
        assert_eq!(
            decode_command(b"\x02shop", c).unwrap(),
            Command::InitDb(b"shop")
        );
        assert_eq!(
            decode_command(b"\x04users\0%", c).unwrap(),
            Command::FieldList {
                table: b"users",
                wildcard: b"%"
            }
        );
        assert_eq!(decode_command(b"\x0e", c).unwrap(), Command::Ping);
        assert_eq!(
            decode_command(b"\x16select ?", c).unwrap(),
            Command::StmtPrepare(b"select ?")
        );
        assert_eq!(
            decode_command(b"\x19\x01\0\0\0", c).unwrap(),
            Command::StmtClose(1)
        );
        assert_eq!(
            decode_command(b"\x1a\x01\0\0\0", c).unwrap(),
            Command::StmtReset(1)
        );
        assert_eq!(
            decode_command(b"\x1c\x01\0\0\0\x0a\0\0\0", c).unwrap(),
            Command::StmtFetch {
                stmt_id: 1,
                rows: 10
            }
        );
        assert_eq!(
            decode_command(b"\x1b\x01\0", c).unwrap(),
            Command::SetOption(1)
        );
        assert_eq!(
            decode_command(b"\x1f", c).unwrap(),
            Command::ResetConnection
        );
        assert_eq!(
            decode_command(b"\x11bob\0\x02abshop\0", c).unwrap(),
            Command::ChangeUser {
                user: b"bob",
                database: b"shop"
            }
        );
        assert_eq!(decode_command(b"\x12", c).unwrap(), Command::Unknown(0x12));
        assert!(decode_command(b"", c).is_err());
        assert!(decode_command(b"\x19\x01", c).is_err());
    }

    #[test]
    fn execute_parameters_decode_with_and_without_types() {
        // Two params: INT 7 and VARCHAR 'ab'; second execution NULL + 'cd' reusing types.
        let mut p = BytesMut::new();
        p.put_u8(0); // null bitmap
        p.put_u8(1); // new params bound
        p.put_slice(&[types::LONGLONG, 0, types::VAR_STRING, 0]);
        p.put_u64_le(7);
        put_lenenc_bytes(&mut p, b"ab");
        let (t, v) = decode_execute_params(&p, 2, &[], &[]).unwrap();
        assert_eq!(v, vec![Value::Int(7), Value::Bytes(b"ab")]);
        let mut q = BytesMut::new();
        q.put_u8(0b01);
        q.put_u8(0);
        put_lenenc_bytes(&mut q, b"cd");
        let (_, v) = decode_execute_params(&q, 2, &t, &[]).unwrap();
        assert_eq!(v, vec![Value::Null, Value::Bytes(b"cd")]);
        assert!(decode_execute_params(&q, 2, &[], &[]).is_err());
        // Every truncation is an error, never a panic.
        for end in 0..p.len() {
            assert!(decode_execute_params(&p[..end], 2, &[], &[]).is_err());
        }
    }

    #[test]
    fn binary_values_render_like_the_text_protocol() {
        let one = |ty: u8, unsigned: bool, bytes: &[u8]| {
            let mut r = Reader::new("t", bytes);
            decode_binary_value(&mut r, ty, unsigned)
                .unwrap()
                .render()
                .unwrap()
        };
        assert_eq!(one(types::TINY, false, &[0xFF]), "-1");
        assert_eq!(one(types::TINY, true, &[0xFF]), "255");
        assert_eq!(one(types::SHORT, false, &[0xFE, 0xFF]), "-2");
        assert_eq!(one(types::LONG, false, &7i32.to_le_bytes()), "7");
        assert_eq!(
            one(types::LONGLONG, true, &u64::MAX.to_le_bytes()),
            u64::MAX.to_string()
        );
        assert_eq!(one(types::DOUBLE, false, &1.5f64.to_le_bytes()), "1.5");
        assert_eq!(one(types::FLOAT, false, &0.25f32.to_le_bytes()), "0.25");
        assert_eq!(
            one(types::DATE, false, &[4, 0xE9, 0x07, 2, 29]),
            "2025-02-29"
        );
        assert_eq!(
            one(types::DATETIME, false, &[7, 0xE9, 0x07, 12, 31, 23, 59, 58]),
            "2025-12-31 23:59:58"
        );
        assert_eq!(
            one(
                types::DATETIME,
                false,
                &[11, 0xE9, 0x07, 1, 2, 3, 4, 5, 0x40, 0xE2, 0x01, 0]
            ),
            "2025-01-02 03:04:05.123456"
        );
        assert_eq!(one(types::DATETIME, false, &[0]), "0000-00-00 00:00:00");
        assert_eq!(
            one(types::TIME, false, &[8, 1, 1, 0, 0, 0, 2, 3, 4]),
            "-26:03:04"
        );
        assert_eq!(one(types::NEWDECIMAL, false, b"\x0412.5"), "12.5");
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
