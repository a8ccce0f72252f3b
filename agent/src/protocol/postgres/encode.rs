//! The few PostgreSQL messages sluice writes itself, rather than forwards.
//!
//! Owns encoding ErrorResponse and NoticeResponse (so a denied client gets a protocol-native
//! error with a SQLSTATE and a sentence it can act on), ReadyForQuery, and the one-byte answer
//! refusing an SSLRequest. Invariant: the output is always a well-formed frame; a NUL inside a
//! caller's string would end a field early, so NULs are dropped. Never touches a socket.
use bytes::{BufMut, Bytes, BytesMut};

use super::backend::TxStatus;

/// The answer to an SSLRequest or GSSENCRequest that sluice declines.
pub const SSL_REFUSED: u8 = b'N';
/// The answer to an SSLRequest that sluice accepts (TLS follows).
pub const SSL_ACCEPTED: u8 = b'S';

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement fails; the session continues.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Severity of a NoticeResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeSeverity {
    Warning,
    Notice,
    Info,
}

impl NoticeSeverity {
    fn as_str(self) -> &'static str {
        match self {
            NoticeSeverity::Warning => "WARNING",
            NoticeSeverity::Notice => "NOTICE",
            NoticeSeverity::Info => "INFO",
        }
    }
}

/// An ErrorResponse with fields S, V, C and M.
pub fn error_response(severity: Severity, sqlstate: &str, message: &str) -> Bytes {
    diagnostic(b'E', severity.as_str(), sqlstate, message)
}

/// A NoticeResponse with fields S, V, C and M.
pub fn notice_response(severity: NoticeSeverity, sqlstate: &str, message: &str) -> Bytes {
    diagnostic(b'N', severity.as_str(), sqlstate, message)
}

/// A simple Query message (sluice's own queries, e.g. the masking catalog lookup).
pub fn query(sql: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(sql.len() + 6);
    out.put_u8(b'Q');
    out.put_i32(0); // patched below, once NULs have been dropped
    out.extend(sql.bytes().filter(|&b| b != 0));
    out.put_u8(0);
    let len = i32::try_from(out.len() - 1).unwrap_or(i32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

/// A ReadyForQuery, which must follow an error sluice sends in place of a query's results.
pub fn ready_for_query(status: TxStatus) -> Bytes {
    Bytes::copy_from_slice(&[b'Z', 0, 0, 0, 5, status.byte()])
}

fn diagnostic(tag: u8, severity: &str, sqlstate: &str, message: &str) -> Bytes {
    let fields = [
        (b'S', severity),
        (b'V', severity),
        (b'C', sqlstate),
        (b'M', message),
    ];
    let body_len: usize = fields.iter().map(|(_, v)| v.len() + 2).sum::<usize>() + 1;
    let mut out = BytesMut::with_capacity(body_len + 5);
    out.put_u8(tag);
    out.put_i32(0); // patched below, once NULs have been dropped
    for (code, value) in fields {
        out.put_u8(code);
        out.extend(value.bytes().filter(|&b| b != 0));
        out.put_u8(0);
    }
    out.put_u8(0);
    let len = i32::try_from(out.len() - 1).unwrap_or(i32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::backend::{Backend, decode_backend};
    use super::super::frame::{message_len, messages};
    use super::*;

    #[test]
    fn an_error_response_decodes_back_to_its_fields() {
        let b = error_response(Severity::Error, "42501", "denied by policy \"no-deletes\"");
        assert_eq!(message_len(&b, 1 << 20), Ok(Some(b.len())));
        let (tag, body) = messages(&b).next().unwrap().unwrap();
        let Backend::ErrorResponse(d) = decode_backend(tag, body).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(d.get(b'S'), Some("ERROR"));
        assert_eq!(d.severity(), Some("ERROR"));
        assert_eq!(d.sqlstate(), Some("42501"));
        assert_eq!(d.message(), Some("denied by policy \"no-deletes\""));
    }

    #[test]
    fn a_nul_in_a_message_cannot_break_the_frame() {
        let b = notice_response(NoticeSeverity::Notice, "00000", "a\0b");
        let (tag, body) = messages(&b).next().unwrap().unwrap();
        let Backend::NoticeResponse(d) = decode_backend(tag, body).unwrap() else {
            panic!("not a notice")
        };
        assert_eq!(d.message(), Some("ab"));
        assert_eq!(d.severity(), Some("NOTICE"));
    }

    #[test]
    fn ready_for_query_is_a_whole_frame() {
        let b = ready_for_query(TxStatus::Idle);
        let (tag, body) = messages(&b).next().unwrap().unwrap();
        assert_eq!(
            decode_backend(tag, body),
            Ok(Backend::ReadyForQuery {
                status: TxStatus::Idle
            })
        );
    }
}
