//! Zero-copy decoding of the typed messages a client (frontend) sends, after startup.
//!
//! Owns the mapping from a (tag, body) pair, as delimited by [`frame`](super::frame), to a
//! [`Frontend`] value borrowing from the body. Never allocates, never reads outside the body,
//! and never decodes the contents of a `'p'` message (password, SASL and GSS responses may hold
//! secrets: the variant carries nothing). A body with bytes left over after its last field is an
//! error, as it is for PostgreSQL. Tags shared with the backend direction ('D', 'C', 'S', 'E',
//! 'H', 'd', 'c') mean something else there: see [`backend`](super::backend).
use super::body::{DecodeError, Format, Formats, Oids, Reader, Values};

/// What a Describe or Close message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// One decoded frontend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend<'a> {
    /// 'Q': a simple query (possibly several statements).
    Query { sql: &'a str },
    /// 'P': prepare `sql` as statement `name` ("" is the unnamed statement).
    Parse {
        name: &'a str,
        sql: &'a str,
        param_types: Oids<'a>,
    },
    /// 'B': bind parameters to a statement, creating a portal.
    Bind {
        portal: &'a str,
        statement: &'a str,
        param_formats: Formats<'a>,
        params: Values<'a>,
        result_formats: Formats<'a>,
    },
    /// 'E': run a portal, returning at most `max_rows` rows (0 = all).
    Execute { portal: &'a str, max_rows: i32 },
    /// 'D': describe a statement or portal.
    Describe { target: Target, name: &'a str },
    /// 'C': close a statement or portal.
    Close { target: Target, name: &'a str },
    /// 'S'
    Sync,
    /// 'H'
    Flush,
    /// 'X'
    Terminate,
    /// 'd': COPY FROM STDIN data.
    CopyData(&'a [u8]),
    /// 'c'
    CopyDone,
    /// 'f': the client aborts a COPY FROM STDIN.
    CopyFail { message: &'a str },
    /// 'F': the legacy function-call sub-protocol.
    FunctionCall {
        function_oid: u32,
        arg_formats: Formats<'a>,
        args: Values<'a>,
        result_format: Format,
    },
    /// 'p': PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse. Deliberately
    /// opaque: its content may be a password.
    Password,
    /// Any other tag.
    Unknown { tag: u8 },
}

/// Decodes one frontend message body.
pub fn decode_frontend(tag: u8, body: &[u8]) -> Result<Frontend<'_>, DecodeError> {
    let mut r = Reader::new(tag, body);
    let msg = match tag {
        b'Q' => Frontend::Query {
            sql: r.cstr("query")?,
        },
        b'P' => Frontend::Parse {
            name: r.cstr("statement name")?,
            sql: r.cstr("query")?,
            param_types: r.oids("parameter types")?,
        },
        b'B' => {
            let portal = r.cstr("portal name")?;
            let statement = r.cstr("statement name")?;
            let param_formats = r.formats("parameter formats")?;
            let params = r.values("parameter values")?;
            if param_formats.len() > 1 && param_formats.len() != params.len() {
                return Err(r.invalid("parameter format count", param_formats.len() as i64));
            }
            Frontend::Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats: r.formats("result formats")?,
            }
        }
        b'E' => Frontend::Execute {
            portal: r.cstr("portal name")?,
            max_rows: r.i32("row limit")?,
        },
        b'D' => Frontend::Describe {
            target: target(&mut r)?,
            name: r.cstr("name")?,
        },
        b'C' => Frontend::Close {
            target: target(&mut r)?,
            name: r.cstr("name")?,
        },
        b'S' => Frontend::Sync,
        b'H' => Frontend::Flush,
        b'X' => Frontend::Terminate,
        b'd' => Frontend::CopyData(r.rest()),
        b'c' => Frontend::CopyDone,
        b'f' => Frontend::CopyFail {
            message: r.cstr("error message")?,
        },
        b'F' => {
            let function_oid = r.u32("function oid")?;
            let arg_formats = r.formats("argument formats")?;
            let args = r.values("arguments")?;
            if arg_formats.len() > 1 && arg_formats.len() != args.len() {
                return Err(r.invalid("argument format count", arg_formats.len() as i64));
            }
            Frontend::FunctionCall {
                function_oid,
                arg_formats,
                args,
                result_format: r.format("result format")?,
            }
        }
        b'p' => {
            r.rest();
            Frontend::Password
        }
        _ => {
            r.rest();
            Frontend::Unknown { tag }
        }
    };
    r.finish()?;
    Ok(msg)
}

fn target(r: &mut Reader<'_>) -> Result<Target, DecodeError> {
    match r.u8("target")? {
        b'S' => Ok(Target::Statement),
        b'P' => Ok(Target::Portal),
        other => Err(r.invalid("target", i64::from(other))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn query_parse_bind_execute_decode() {
        assert_eq!(
            decode_frontend(b'Q', b"select 1\0"),
            Ok(Frontend::Query { sql: "select 1" })
        );
        let mut p = b"s1\0select $1\0".to_vec();
        p.extend_from_slice(&1i16.to_be_bytes());
        p.extend_from_slice(&23u32.to_be_bytes());
        let Frontend::Parse {
            name,
            sql,
            param_types,
        } = decode_frontend(b'P', &p).unwrap()
        else {
            panic!("not a parse")
        };
        assert_eq!((name, sql), ("s1", "select $1"));
        assert_eq!(param_types.iter().collect::<Vec<_>>(), vec![23]);

        let mut b = b"\0s1\0".to_vec();
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes()); // binary
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        let Frontend::Bind {
            params,
            param_formats,
            result_formats,
            ..
        } = decode_frontend(b'B', &b).unwrap()
        else {
            panic!("not a bind")
        };
        assert_eq!(
            params.iter().collect::<Vec<_>>(),
            vec![Some(&7i32.to_be_bytes()[..]), None]
        );
        assert_eq!(param_formats.for_value(1), Format::Binary);
        assert_eq!(result_formats.for_value(3), Format::Text);
        assert_eq!(
            decode_frontend(b'E', b"\0\0\0\0\x05"),
            Ok(Frontend::Execute {
                portal: "",
                max_rows: 5
            })
        );
    }

    #[test]
    fn password_messages_are_never_decoded() {
        assert_eq!(decode_frontend(b'p', b"hunter2\0"), Ok(Frontend::Password));
        assert!(!format!("{:?}", decode_frontend(b'p', b"hunter2\0")).contains("hunter2"));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(decode_frontend(b'Q', b"no nul").is_err());
        assert!(decode_frontend(b'Q', b"a\0b").is_err());
        assert!(decode_frontend(b'Q', b"\xff\0").is_err());
        assert!(decode_frontend(b'D', b"Xname\0").is_err());
        assert!(decode_frontend(b'S', b"x").is_err());
        // Bind with a negative value length other than -1.
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&(-2i32).to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        assert!(decode_frontend(b'B', &b).is_err());
        // Bind with a format code that is neither text nor binary.
        let mut b = b"\0\0".to_vec();
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&2i16.to_be_bytes());
        assert!(decode_frontend(b'B', &b).is_err());
    }

    #[test]
    fn unknown_tags_are_reported_not_rejected() {
        assert_eq!(
            decode_frontend(b'z', b"abc"),
            Ok(Frontend::Unknown { tag: b'z' })
        );
    }
}
