//! Client commands of the command phase: their codes, the [`Command`] each payload decodes
//! into, and the parameters of a COM_STMT_EXECUTE.
//!
//! ```text
//! COM_QUERY 0x03 sql | COM_STMT_PREPARE 0x16 sql | COM_INIT_DB 0x02 db | COM_PING 0x0e | ...
//! COM_STMT_EXECUTE 0x17 | stmt id u32 | flags u8 | iterations u32 |
//!     [NULL bitmap (n+7)/8 | new-params-bound u8 | [type u8, flag u8] x n | values]
//! ```
//! Decoding borrows from the payload; parameter values need the statement's parameter count
//! (from its PREPARE_OK), which the [`ResponseMachine`](super::response::ResponseMachine)
//! supplies. Never panics on input; no I/O.
use super::handshake::Capabilities;
use super::packet::{DecodeError, Reader};
use super::resultset::{Value, decode_binary_value};

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

/// COM_STMT_EXECUTE flag: open a read-only cursor (rows come with COM_STMT_FETCH).
pub const CURSOR_TYPE_READ_ONLY: u8 = 0x01;
/// MariaDB: a statement id meaning "the statement prepared last" (pipelined prepare+execute).
pub const LAST_PREPARED: u32 = 0xFFFF_FFFF;

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::protocol::mysql::packet::put_lenenc_bytes;
    use crate::protocol::mysql::resultset::types;

    fn caps() -> Capabilities {
        Capabilities::sluice_default()
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
}
