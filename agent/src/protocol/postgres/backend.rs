//! Zero-copy decoding of the typed messages a server (backend) sends.
//!
//! Owns the mapping from a (tag, body) pair, as delimited by [`frame`](super::frame), to a
//! [`Backend`] value borrowing from the body. Decoding never allocates: repeated fields (row
//! descriptions, data rows, error fields) are validated once here and exposed as views whose
//! iteration cannot fail. Also owns which backend text can carry data a query touched (error
//! and notice fields, notification payloads, echoed parameters) and its re-encoding for
//! masking ([`rewrite_text_fields`]), which writes only when a value changed. A body with bytes left over after its last field is an error. Tags
//! shared with the frontend direction mean something else there: see
//! [`frontend`](super::frontend).
use bytes::{BufMut, BytesMut};

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

/// A text field of a backend message that can carry what a query touched, as offered to the
/// masking function of [`rewrite_text_fields`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    /// A free-text field of an ErrorResponse or NoticeResponse, by its code: message `M`,
    /// detail `D`, hint `H`, context `W`, internal query `q`, or a code newer than this list.
    Diagnostic(u8),
    /// A NotificationResponse's payload (the channel is an identifier a listener matches).
    NotificationPayload,
    /// The value of a ParameterStatus that echoes what a client set (`application_name`,
    /// `session_authorization`, a parameter this list does not know).
    ParameterValue,
}

/// Diagnostic fields that are codes or identifiers, never free text: severity (`S`, `V`),
/// SQLSTATE (`C`), positions (`P`, `p`), the server's source file, line and routine (`F`,
/// `L`, `R`), and the names of the schema, table, column, data type and constraint (`s`, `t`,
/// `c`, `d`, `n`), which clients match on.
pub const DIAGNOSTIC_CODE_FIELDS: &[u8] = b"SVCPpFLRstcdn";

/// Parameters whose values the server writes in fixed formats that clients parse (libpq reads
/// `server_version`, drivers read the encodings, date and interval styles, `integer_datetimes`,
/// `standard_conforming_strings`): never offered for masking. Every other parameter may echo a
/// client's input.
pub const FIXED_FORMAT_PARAMETERS: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "standard_conforming_strings",
    "TimeZone",
];

/// Offers each text field of backend message `tag`/`body` that can carry data to `mask(field,
/// value, scratch)` (`scratch` empty), which appends a replacement to `scratch` and returns
/// true, or returns false to keep the value. Fields: the free-text fields of an ErrorResponse
/// or NoticeResponse (not [`DIAGNOSTIC_CODE_FIELDS`]), a NotificationResponse's payload, a
/// ParameterStatus value (not of [`FIXED_FORMAT_PARAMETERS`]); other tags have none.
///
/// Returns `Ok(true)` with the whole rewritten message (tag, length, body) appended to `out`
/// when some value changed; `Ok(false)` with `out` untouched otherwise, so the caller forwards
/// the original bytes. Every other byte is copied as it was (codes, identifiers, untouched
/// fields). NUL bytes in a replacement become `*` (a field is NUL-terminated), and so does
/// every non-ASCII byte of a replacement that is not UTF-8. Values are bytes, not necessarily
/// UTF-8 (a server may use the client's encoding). A malformed body is an error and leaves
/// `out` as it was.
pub fn rewrite_text_fields<F>(
    tag: u8,
    body: &[u8],
    scratch: &mut Vec<u8>,
    mut mask: F,
    out: &mut BytesMut,
) -> Result<bool, DecodeError>
where
    F: FnMut(TextField, &[u8], &mut Vec<u8>) -> bool,
{
    let mark = out.len();
    let mut w = FieldWriter {
        body,
        out,
        mark,
        tag,
        copied: 0,
        started: false,
    };
    let result = text_fields(tag, body, scratch, &mut mask, &mut w);
    let result = match result {
        Ok(()) if w.started => w.finish(),
        Ok(()) => Ok(false),
        Err(e) => Err(e),
    };
    if !matches!(result, Ok(true)) {
        out.truncate(mark);
    }
    result
}

/// Walks the text fields of one message, handing each to `mask` and changed ones to `w`.
fn text_fields<F>(
    tag: u8,
    body: &[u8],
    scratch: &mut Vec<u8>,
    mask: &mut F,
    w: &mut FieldWriter<'_>,
) -> Result<(), DecodeError>
where
    F: FnMut(TextField, &[u8], &mut Vec<u8>) -> bool,
{
    let mut r = Reader::new(tag, body);
    let mut offer = |field: TextField, value: &[u8], at: usize, w: &mut FieldWriter<'_>| {
        scratch.clear();
        if mask(field, value, scratch) {
            w.replace(at, at + value.len(), scratch);
        }
    };
    let at = |r: &Reader<'_>| body.len() - r.remaining();
    match tag {
        b'E' | b'N' => loop {
            let code = r.u8("field code")?;
            if code == 0 {
                break;
            }
            let start = at(&r);
            let value = r.cbytes("field value")?;
            if !DIAGNOSTIC_CODE_FIELDS.contains(&code) {
                offer(TextField::Diagnostic(code), value, start, w);
            }
        },
        b'A' => {
            r.i32("process id")?;
            r.cbytes("channel")?;
            let start = at(&r);
            let payload = r.cbytes("payload")?;
            offer(TextField::NotificationPayload, payload, start, w);
        }
        b'S' => {
            let name = r.cbytes("parameter name")?;
            let start = at(&r);
            let value = r.cbytes("parameter value")?;
            if !FIXED_FORMAT_PARAMETERS
                .iter()
                .any(|p| p.as_bytes().eq_ignore_ascii_case(name))
            {
                offer(TextField::ParameterValue, value, start, w);
            }
        }
        _ => return Ok(()),
    }
    r.finish()
}

/// Builds a rewritten message from the original body and the replaced ranges, in order.
struct FieldWriter<'a> {
    body: &'a [u8],
    out: &'a mut BytesMut,
    mark: usize,
    tag: u8,
    /// The body is copied up to here.
    copied: usize,
    started: bool,
}

impl FieldWriter<'_> {
    /// The value at `body[start..end]` becomes `with`.
    fn replace(&mut self, start: usize, end: usize, with: &[u8]) {
        if !self.started {
            self.out.reserve(self.body.len() + 5 + with.len());
            self.out.put_u8(self.tag);
            self.out.put_i32(0);
            self.started = true;
        }
        self.out.extend_from_slice(&self.body[self.copied..start]);
        let from = self.out.len();
        self.out.extend_from_slice(with);
        let ascii_only = std::str::from_utf8(&self.out[from..]).is_err();
        for b in &mut self.out[from..] {
            if *b == 0 || (ascii_only && !b.is_ascii()) {
                *b = b'*';
            }
        }
        self.copied = end;
    }

    fn finish(&mut self) -> Result<bool, DecodeError> {
        self.out.extend_from_slice(&self.body[self.copied..]);
        let len = self.out.len() - self.mark - 1;
        let n = i32::try_from(len).map_err(|_| DecodeError::Invalid {
            tag: self.tag,
            field: "rewritten length",
            value: i64::try_from(len).unwrap_or(i64::MAX),
        })?;
        self.out[self.mark + 1..self.mark + 5].copy_from_slice(&n.to_be_bytes());
        Ok(true)
    }
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

    /// What PostgreSQL 15 sends for `SELECT id FROM t WHERE email::int > 0`.
    const CAST_ERROR: &[u8] = b"SERROR\0VERROR\0C22P02\0Minvalid input syntax for type integer: \"ann@example.com\"\0Fnumutils.c\0L232\0Rpg_strtoint32\0\0";

    /// Replaces every `ann@example.com` with `****`.
    fn hide_ann(_: TextField, v: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(at) = v.windows(15).position(|w| w == b"ann@example.com") else {
            return false;
        };
        out.extend_from_slice(&v[..at]);
        out.extend_from_slice(b"****");
        out.extend_from_slice(&v[at + 15..]);
        true
    }

    fn rewrite(tag: u8, body: &[u8]) -> Result<Option<Vec<u8>>, DecodeError> {
        let mut out = BytesMut::new();
        let mut scratch = Vec::new();
        let changed = rewrite_text_fields(tag, body, &mut scratch, hide_ann, &mut out)?;
        assert_eq!(changed, !out.is_empty());
        if !changed {
            return Ok(None);
        }
        assert_eq!(out[0], tag);
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]);
        assert_eq!(len as usize, out.len() - 1);
        Ok(Some(out[5..].to_vec()))
    }

    #[test]
    fn an_error_message_loses_only_its_finding_and_keeps_its_codes() {
        let body = rewrite(b'E', CAST_ERROR).unwrap().unwrap();
        let Backend::ErrorResponse(d) = decode_backend(b'E', &body).unwrap() else {
            panic!("not an error")
        };
        assert_eq!(
            d.message(),
            Some("invalid input syntax for type integer: \"****\"")
        );
        let Backend::ErrorResponse(orig) = decode_backend(b'E', CAST_ERROR).unwrap() else {
            panic!("not an error")
        };
        for code in *b"SVCFLR" {
            assert_eq!(d.get(code), orig.get(code), "field {}", char::from(code));
        }
        // Every field is in its place, in the same order.
        let codes: Vec<u8> = d.iter().map(|(c, _)| c).collect();
        assert_eq!(codes, orig.iter().map(|(c, _)| c).collect::<Vec<u8>>());
    }

    #[test]
    fn a_message_with_nothing_to_mask_writes_nothing() {
        let body = b"SNOTICE\0VNOTICE\0C00000\0Mall fine\0\0";
        assert_eq!(rewrite(b'N', body), Ok(None));
        assert_eq!(rewrite(b'Z', b"I"), Ok(None));
        assert_eq!(rewrite(b'D', b"\0\x01\0\0\0\x0fann@example.com"), Ok(None));
    }

    #[test]
    fn codes_and_names_are_never_offered() {
        let mut offered = Vec::new();
        let body = b"SERROR\0VERROR\0C23505\0Mdup\0DKey (email)=(x) already exists.\0Hh\0Wctx\0qselect 1\0P3\0p2\0spublic\0tcustomers\0ccol\0dtype\0ncustomers_email_key\0Ff.c\0L1\0Rr\0Zfuture\0\0";
        let mut out = BytesMut::new();
        let changed = rewrite_text_fields(
            b'E',
            body,
            &mut Vec::new(),
            |f, _, _| {
                offered.push(f);
                false
            },
            &mut out,
        )
        .unwrap();
        assert!(!changed && out.is_empty());
        let codes: Vec<u8> = offered
            .iter()
            .map(|f| match f {
                TextField::Diagnostic(c) => *c,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(codes, b"MDHWqZ".to_vec());
    }

    #[test]
    fn notification_payloads_and_echoed_parameters_are_rewritten() {
        let mut n = 42i32.to_be_bytes().to_vec();
        n.extend_from_slice(b"ann@example.com\0new ann@example.com\0");
        let body = rewrite(b'A', &n).unwrap().unwrap();
        assert_eq!(
            decode_backend(b'A', &body),
            Ok(Backend::NotificationResponse {
                pid: 42,
                channel: "ann@example.com",
                payload: "new ****"
            })
        );
        let body = rewrite(b'S', b"application_name\0ann@example.com\0")
            .unwrap()
            .unwrap();
        assert_eq!(body, b"application_name\0****\0");
        // A value clients parse is never offered.
        assert_eq!(
            rewrite(b'S', b"server_version\0ann@example.com\0"),
            Ok(None)
        );
    }

    #[test]
    fn a_replacement_cannot_end_its_field_early() {
        let mut out = BytesMut::new();
        rewrite_text_fields(
            b'N',
            b"Mx\0\0",
            &mut Vec::new(),
            |_, _, s| {
                s.extend_from_slice(b"a\0b\xff");
                true
            },
            &mut out,
        )
        .unwrap();
        assert_eq!(&out[5..], b"Ma*b*\0\0");
    }

    #[test]
    fn every_prefix_of_a_message_is_an_error_or_a_whole_rewrite_never_a_panic() {
        let mut n = 7i32.to_be_bytes().to_vec();
        n.extend_from_slice(b"ch\0ann@example.com\0");
        let cases: [(u8, &[u8]); 3] = [
            (b'E', CAST_ERROR),
            (b'A', &n),
            (b'S', b"application_name\0ann@example.com\0"),
        ];
        for (tag, body) in cases {
            for cut in 0..body.len() {
                let mut out = BytesMut::from(&b"keep"[..]);
                let r = rewrite_text_fields(tag, &body[..cut], &mut Vec::new(), hide_ann, &mut out);
                assert!(r.is_err(), "{} at {cut}", char::from(tag));
                assert_eq!(&out[..], b"keep");
            }
            assert!(rewrite(tag, body).unwrap().is_some());
            let mut extra = body.to_vec();
            extra.push(b'x');
            assert!(rewrite(tag, &extra).is_err());
        }
    }
}
