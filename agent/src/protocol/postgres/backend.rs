//! Zero-copy decoding of the typed messages a server (backend) sends.
//!
//! Owns the mapping from a (tag, body) pair, as delimited by [`frame`](super::frame), to a
//! [`Backend`] value borrowing from the body. Never allocates: repeated fields (row
//! descriptions, data rows, error fields) are validated once here and exposed as views whose
//! iteration cannot fail. A body with bytes left over after its last field is an error. Tags
//! shared with the frontend direction mean something else there: see
//! [`frontend`](super::frontend).
use super::body::{CStrs, DecodeError, Format, Formats, Oids, Reader, Values};

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// The authentication request or outcome carried by an 'R' message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    Ok,
    KerberosV5,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Gss,
    GssContinue(&'a [u8]),
    Sspi,
    Sasl {
        mechanisms: CStrs<'a>,
    },
    SaslContinue(&'a [u8]),
    SaslFinal(&'a [u8]),
    /// A code this decoder does not know.
    Other {
        code: i32,
    },
}

/// One column of a RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDescription<'a> {
    pub name: &'a str,
    /// OID of the table the column comes from, 0 if it is not a plain table column.
    pub table_oid: u32,
    /// Attribute number of the column in that table, 0 if none.
    pub column: i16,
    pub type_oid: u32,
    pub type_len: i16,
    pub type_mod: i32,
    pub format: Format,
}

/// A validated RowDescription body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fields<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = FieldDescription<'a>> + 'a {
        let mut r = Reader::new(b'T', self.raw);
        (0..self.count).map_while(move |_| field(&mut r).ok())
    }
}

fn field<'a>(r: &mut Reader<'a>) -> Result<FieldDescription<'a>, DecodeError> {
    Ok(FieldDescription {
        name: r.cstr("field name")?,
        table_oid: r.u32("table oid")?,
        column: r.i16("column number")?,
        type_oid: r.u32("type oid")?,
        type_len: r.i16("type length")?,
        type_mod: r.i32("type modifier")?,
        format: r.format("field format")?,
    })
}

/// The fields of an ErrorResponse or NoticeResponse: (code byte, value) pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Diagnostic<'a> {
    raw: &'a [u8],
}

impl<'a> Diagnostic<'a> {
    /// Every (field code, value) pair, in wire order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a str)> + 'a {
        let mut r = Reader::new(b'E', self.raw);
        std::iter::from_fn(move || {
            let code = r.u8("field code").ok()?;
            Some((code, r.cstr("field value").ok()?))
        })
    }

    /// The value of field `code` (b'S' severity, b'V' non-localized severity, b'C' SQLSTATE,
    /// b'M' message, b'D' detail, b'H' hint, b'P' position, ...).
    pub fn get(&self, code: u8) -> Option<&'a str> {
        self.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    /// Non-localized severity (V, PostgreSQL 9.6+), else the localized one (S).
    pub fn severity(&self) -> Option<&'a str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    pub fn sqlstate(&self) -> Option<&'a str> {
        self.get(b'C')
    }

    pub fn message(&self) -> Option<&'a str> {
        self.get(b'M')
    }
}

/// The body of CopyInResponse, CopyOutResponse and CopyBothResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResponse<'a> {
    /// Text (which includes CSV) or binary.
    pub format: Format,
    pub column_formats: Formats<'a>,
}

/// One decoded backend message. Variants are named as in the PostgreSQL protocol documentation
/// (hence `BackendKeyData` inside `Backend`).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend<'a> {
    /// 'R'
    Authentication(Authentication<'a>),
    /// 'S'
    ParameterStatus { name: &'a str, value: &'a str },
    /// 'K'
    BackendKeyData { pid: i32, key: i32 },
    /// 'Z'
    ReadyForQuery { status: TxStatus },
    /// 'T'
    RowDescription(Fields<'a>),
    /// 'D'
    DataRow(Values<'a>),
    /// 'C'
    CommandComplete { tag: &'a str },
    /// 'I'
    EmptyQueryResponse,
    /// 'E'
    ErrorResponse(Diagnostic<'a>),
    /// 'N'
    NoticeResponse(Diagnostic<'a>),
    /// '1'
    ParseComplete,
    /// '2'
    BindComplete,
    /// '3'
    CloseComplete,
    /// 'n'
    NoData,
    /// 't'
    ParameterDescription(Oids<'a>),
    /// 's'
    PortalSuspended,
    /// 'G'
    CopyInResponse(CopyResponse<'a>),
    /// 'H'
    CopyOutResponse(CopyResponse<'a>),
    /// 'W'
    CopyBothResponse(CopyResponse<'a>),
    /// 'd'
    CopyData(&'a [u8]),
    /// 'c'
    CopyDone,
    /// 'A'
    NotificationResponse {
        pid: i32,
        channel: &'a str,
        payload: &'a str,
    },
    /// 'v': the server supports at most `newest_minor` and did not recognise these options.
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: CStrs<'a>,
    },
    /// 'V': result of a FunctionCall.
    FunctionCallResponse { value: Option<&'a [u8]> },
    /// Any other tag.
    Unknown { tag: u8 },
}

/// Decodes one backend message body.
pub fn decode_backend(tag: u8, body: &[u8]) -> Result<Backend<'_>, DecodeError> {
    let mut r = Reader::new(tag, body);
    let msg = match tag {
        b'R' => Backend::Authentication(authentication(&mut r)?),
        b'S' => Backend::ParameterStatus {
            name: r.cstr("parameter name")?,
            value: r.cstr("parameter value")?,
        },
        b'K' => Backend::BackendKeyData {
            pid: r.i32("process id")?,
            key: r.i32("secret key")?,
        },
        b'Z' => Backend::ReadyForQuery {
            status: match r.u8("transaction status")? {
                b'I' => TxStatus::Idle,
                b'T' => TxStatus::InTransaction,
                b'E' => TxStatus::Failed,
                other => return Err(r.invalid("transaction status", i64::from(other))),
            },
        },
        b'T' => {
            let count = r.count("field count")?;
            let start = r.rest();
            let mut fr = Reader::new(tag, start);
            for _ in 0..count {
                field(&mut fr)?;
            }
            let used = start.len() - fr.remaining();
            fr.finish()?;
            Backend::RowDescription(Fields {
                count,
                raw: &start[..used],
            })
        }
        b'D' => Backend::DataRow(r.values("column values")?),
        b'C' => Backend::CommandComplete {
            tag: r.cstr("command tag")?,
        },
        b'I' => Backend::EmptyQueryResponse,
        b'E' | b'N' => {
            let start = r.rest();
            let mut fr = Reader::new(tag, start);
            while fr.u8("field code")? != 0 {
                fr.cstr("field value")?;
            }
            fr.finish()?;
            // Exclude the terminating zero byte from the view.
            let d = Diagnostic {
                raw: &start[..start.len() - 1],
            };
            if tag == b'E' {
                Backend::ErrorResponse(d)
            } else {
                Backend::NoticeResponse(d)
            }
        }
        b'1' => Backend::ParseComplete,
        b'2' => Backend::BindComplete,
        b'3' => Backend::CloseComplete,
        b'n' => Backend::NoData,
        b't' => Backend::ParameterDescription(r.oids("parameter types")?),
        b's' => Backend::PortalSuspended,
        b'G' => Backend::CopyInResponse(copy_response(&mut r)?),
        b'H' => Backend::CopyOutResponse(copy_response(&mut r)?),
        b'W' => Backend::CopyBothResponse(copy_response(&mut r)?),
        b'd' => Backend::CopyData(r.rest()),
        b'c' => Backend::CopyDone,
        b'A' => Backend::NotificationResponse {
            pid: r.i32("process id")?,
            channel: r.cstr("channel")?,
            payload: r.cstr("payload")?,
        },
        b'v' => {
            let newest_minor = r.i32("newest minor version")?;
            let n = r.i32("option count")?;
            let n = usize::try_from(n).map_err(|_| r.invalid("option count", i64::from(n)))?;
            Backend::NegotiateProtocolVersion {
                newest_minor,
                unrecognized: r.cstrs(n, "option name")?,
            }
        }
        b'V' => {
            let len = r.i32("result length")?;
            let value = match len {
                -1 => None,
                n => {
                    let n =
                        usize::try_from(n).map_err(|_| r.invalid("result length", i64::from(n)))?;
                    Some(r.bytes(n, "result")?)
                }
            };
            Backend::FunctionCallResponse { value }
        }
        _ => {
            r.rest();
            Backend::Unknown { tag }
        }
    };
    r.finish()?;
    Ok(msg)
}

fn authentication<'a>(r: &mut Reader<'a>) -> Result<Authentication<'a>, DecodeError> {
    let code = r.i32("authentication code")?;
    Ok(match code {
        0 => Authentication::Ok,
        2 => Authentication::KerberosV5,
        3 => Authentication::CleartextPassword,
        5 => {
            let s = r.bytes(4, "salt")?;
            Authentication::Md5Password {
                salt: [s[0], s[1], s[2], s[3]],
            }
        }
        7 => Authentication::Gss,
        8 => Authentication::GssContinue(r.rest()),
        9 => Authentication::Sspi,
        10 => Authentication::Sasl {
            mechanisms: r.cstrs_until_empty("sasl mechanism")?,
        },
        11 => Authentication::SaslContinue(r.rest()),
        12 => Authentication::SaslFinal(r.rest()),
        _ => {
            r.rest();
            Authentication::Other { code }
        }
    })
}

fn copy_response<'a>(r: &mut Reader<'a>) -> Result<CopyResponse<'a>, DecodeError> {
    let code = r.u8("copy format")?;
    let format = match code {
        0 => Format::Text,
        1 => Format::Binary,
        other => return Err(r.invalid("copy format", i64::from(other))),
    };
    Ok(CopyResponse {
        format,
        column_formats: r.formats("column formats")?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn error_fields_are_found_by_code() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0";
        let Backend::ErrorResponse(d) = decode_backend(b'E', body).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(d.severity(), Some("ERROR"));
        assert_eq!(d.sqlstate(), Some("42P01"));
        assert_eq!(d.message(), Some("relation \"x\" does not exist"));
        assert_eq!(d.get(b'H'), None);
        assert_eq!(d.iter().count(), 4);
        assert!(decode_backend(b'E', b"SERROR\0").is_err());
        assert!(decode_backend(b'E', b"SERROR\0\0x").is_err());
    }

    #[test]
    fn row_description_fields_round_trip() {
        let mut b = 1i16.to_be_bytes().to_vec();
        b.extend_from_slice(b"id\0");
        b.extend_from_slice(&16384u32.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&23u32.to_be_bytes());
        b.extend_from_slice(&4i16.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        let Backend::RowDescription(f) = decode_backend(b'T', &b).unwrap() else {
            panic!("not a row description")
        };
        let only = f.iter().next().unwrap();
        assert_eq!(
            only,
            FieldDescription {
                name: "id",
                table_oid: 16384,
                column: 1,
                type_oid: 23,
                type_len: 4,
                type_mod: -1,
                format: Format::Binary
            }
        );
        assert!(decode_backend(b'T', &b[..b.len() - 1]).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode_backend(b'T', &extra).is_err());
    }

    #[test]
    fn same_tags_as_the_frontend_mean_other_messages() {
        assert_eq!(
            decode_backend(b'C', b"SELECT 1\0"),
            Ok(Backend::CommandComplete { tag: "SELECT 1" })
        );
        assert_eq!(
            decode_backend(b'S', b"TimeZone\0UTC\0"),
            Ok(Backend::ParameterStatus {
                name: "TimeZone",
                value: "UTC"
            })
        );
        assert_eq!(
            decode_backend(b'Z', b"T"),
            Ok(Backend::ReadyForQuery {
                status: TxStatus::InTransaction
            })
        );
        assert!(decode_backend(b'Z', b"Q").is_err());
    }

    #[test]
    fn sasl_mechanisms_are_listed() {
        let mut b = 10i32.to_be_bytes().to_vec();
        b.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let Backend::Authentication(Authentication::Sasl { mechanisms }) =
            decode_backend(b'R', &b).unwrap()
        else {
            panic!("not sasl")
        };
        assert_eq!(
            mechanisms.iter().collect::<Vec<_>>(),
            vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
    }

    #[test]
    fn negotiate_protocol_version_lists_options() {
        let mut b = 0i32.to_be_bytes().to_vec();
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(b"_pq_.x\0");
        let Backend::NegotiateProtocolVersion {
            newest_minor,
            unrecognized,
        } = decode_backend(b'v', &b).unwrap()
        else {
            panic!("not v")
        };
        assert_eq!(newest_minor, 0);
        assert_eq!(unrecognized.iter().collect::<Vec<_>>(), vec!["_pq_.x"]);
        b[7] = 2;
        assert!(decode_backend(b'v', &b).is_err());
    }
}
