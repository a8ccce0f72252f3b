//! PostgreSQL row rewriters: a DataRow ('D') body, or COPY TO STDOUT text-format data, run
//! through a [`MaskPlan`] and re-encoded only if a value changed.
//!
//! ```text
//! DataRow body:  count: i16 | count x ( len: i32 (-1 = NULL) | len bytes )
//! COPY text:     field \t field \t ... \n      (\N = NULL; \\ \n \r \t \b \f \v, \ooo and
//!                                               \xhh escapes inside fields)
//! ```
//!
//! Owns validation of a DataRow body ([`DataRow::parse`]: the column count and every length
//! checked against the body before anything is written), and re-encoding with rewritten
//! lengths. Invariants: an unchanged row is reported as [`RowRewrite::Unchanged`] and nothing
//! is written, so the caller forwards the original bytes; a rewritten row is appended to the
//! caller's buffer as one complete message (tag, length, body) whose lengths are consistent;
//! a malformed row is an error, never a panic, and leaves the buffer as it was. Only changed
//! values are re-encoded (unchanged ones are copied as bytes, escapes included). Never
//! decides what to mask ([`engine`](super::engine) does) and never touches a socket.
use bytes::{BufMut, BytesMut};
use thiserror::Error;

use super::engine::{Change, MaskPlan, ValueKind};

/// Wire format of a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Text,
    Binary,
}

/// PostgreSQL type OIDs the engine treats specially.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const JSON_ARRAY: u32 = 199;
    pub const CIDR: u32 = 650;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const UNKNOWN: u32 = 705;
    pub const MONEY: u32 = 790;
    pub const INET: u32 = 869;
    pub const NAME_ARRAY: u32 = 1003;
    pub const TEXT_ARRAY: u32 = 1009;
    pub const BPCHAR_ARRAY: u32 = 1014;
    pub const VARCHAR_ARRAY: u32 = 1015;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const BIT: u32 = 1560;
    pub const VARBIT: u32 = 1562;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
    pub const JSONB_ARRAY: u32 = 3807;
}

fn is_text_like(oid: u32) -> bool {
    matches!(
        oid,
        0 | oid::TEXT | oid::VARCHAR | oid::BPCHAR | oid::NAME | oid::UNKNOWN | oid::XML
    )
}

fn is_json(oid: u32) -> bool {
    matches!(oid, oid::JSON | oid::JSONB)
}

fn is_text_array(oid: u32) -> bool {
    matches!(
        oid,
        oid::TEXT_ARRAY
            | oid::VARCHAR_ARRAY
            | oid::BPCHAR_ARRAY
            | oid::NAME_ARRAY
            | oid::JSON_ARRAY
            | oid::JSONB_ARRAY
    )
}

fn is_address(oid: u32) -> bool {
    matches!(oid, oid::INET | oid::CIDR)
}

/// Scalars whose values never carry a sensitive shape as text worth finding: numbers (ids
/// would look like card numbers), dates and times, booleans, uuids, bytes, bits.
fn is_plain_scalar(oid: u32) -> bool {
    matches!(
        oid,
        oid::BOOL
            | oid::BYTEA
            | oid::CHAR
            | oid::INT8
            | oid::INT2
            | oid::INT4
            | oid::OID
            | oid::FLOAT4
            | oid::FLOAT8
            | oid::MONEY
            | oid::DATE
            | oid::TIME
            | oid::TIMESTAMP
            | oid::TIMESTAMPTZ
            | oid::INTERVAL
            | oid::TIMETZ
            | oid::BIT
            | oid::VARBIT
            | oid::NUMERIC
            | oid::UUID
    )
}

/// How the engine treats values of PostgreSQL type `type_oid` (0: unknown, as text) sent in
/// `format`.
pub fn value_kind(type_oid: u32, format: Format) -> ValueKind {
    match format {
        Format::Text if is_text_like(type_oid) => ValueKind::Text,
        Format::Text if is_json(type_oid) => ValueKind::Json,
        Format::Text if is_text_array(type_oid) => ValueKind::TextArray,
        Format::Text if is_address(type_oid) => ValueKind::ScanThenNull,
        Format::Text if is_plain_scalar(type_oid) => ValueKind::Scalar,
        Format::Text => ValueKind::Text,
        Format::Binary if is_text_like(type_oid) && type_oid != 0 => ValueKind::Text,
        Format::Binary if type_oid == oid::JSON => ValueKind::Json,
        Format::Binary if type_oid == oid::JSONB => ValueKind::JsonbBinary,
        Format::Binary if is_plain_scalar(type_oid) || is_address(type_oid) => ValueKind::Scalar,
        Format::Binary => ValueKind::ScanThenNull,
    }
}

/// Why a row could not be rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RowError {
    #[error("data row ends inside its {field}")]
    Truncated { field: &'static str },
    #[error("data row has a negative column count ({count})")]
    NegativeCount { count: i16 },
    #[error("data row column {column} has an invalid length ({len})")]
    BadLength { column: usize, len: i32 },
    #[error("data row has {count} unexpected trailing bytes")]
    TrailingBytes { count: usize },
    #[error("row has {got} columns but the result has {expected}")]
    ColumnCount { got: usize, expected: usize },
    #[error("masked row of {len} bytes exceeds the protocol's limit")]
    TooLong { len: usize },
}

/// Whether a row was rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowRewrite {
    /// Nothing changed and nothing was written: forward the original message.
    Unchanged,
    /// A complete replacement message was appended to the output buffer.
    Rewritten,
}

/// A validated DataRow body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRow<'a> {
    count: usize,
    body: &'a [u8],
}

impl<'a> DataRow<'a> {
    /// Checks the column count and every length against `body`; the whole body must be used.
    pub fn parse(body: &'a [u8]) -> Result<Self, RowError> {
        let Some(&[a, b]) = body.get(..2) else {
            return Err(RowError::Truncated {
                field: "column count",
            });
        };
        let count = i16::from_be_bytes([a, b]);
        let count = usize::try_from(count).map_err(|_| RowError::NegativeCount { count })?;
        let mut at = 2;
        for column in 0..count {
            let Some(&[a, b, c, d]) = body.get(at..at + 4) else {
                return Err(RowError::Truncated {
                    field: "value length",
                });
            };
            at += 4;
            let len = i32::from_be_bytes([a, b, c, d]);
            if len == -1 {
                continue;
            }
            let n = usize::try_from(len).map_err(|_| RowError::BadLength { column, len })?;
            if body.len() - at < n {
                return Err(RowError::Truncated { field: "value" });
            }
            at += n;
        }
        if at != body.len() {
            return Err(RowError::TrailingBytes {
                count: body.len() - at,
            });
        }
        Ok(Self { count, body })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each value, `None` for NULL.
    pub fn iter(&self) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
        self.cells()
            .map(|c| c.value.map(|(at, len)| &self.body[at..at + len]))
    }

    /// Each cell's header offset and value range (validated by `parse`).
    fn cells(&self) -> impl Iterator<Item = Cell> + 'a {
        let body = self.body;
        let mut at = 2;
        (0..self.count).map_while(move |_| {
            let header = at;
            let raw = body.get(at..at + 4)?;
            let len = i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
            at += 4;
            let value = usize::try_from(len).ok().map(|n| {
                let v = (at, n);
                at += n;
                v
            });
            Some(Cell { header, value })
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Cell {
    /// Offset of the length field.
    header: usize,
    /// Offset and length of the value; `None` for NULL.
    value: Option<(usize, usize)>,
}

/// Rewrites a DataRow `body` through `plan`. On [`RowRewrite::Rewritten`], a complete DataRow
/// message (tag `D`, length, body) was appended to `out`; otherwise `out` is untouched. The
/// row must have as many columns as the plan.
pub fn rewrite_data_row(
    body: &[u8],
    plan: &mut MaskPlan,
    out: &mut BytesMut,
) -> Result<RowRewrite, RowError> {
    let row = DataRow::parse(body)?;
    if row.len() != plan.column_count() {
        return Err(RowError::ColumnCount {
            got: row.len(),
            expected: plan.column_count(),
        });
    }
    if !plan.is_active() {
        return Ok(RowRewrite::Unchanged);
    }
    let mark = out.len();
    let mut scratch = std::mem::take(&mut plan.scratch);
    let mut copied = 0;
    let mut result = Ok(RowRewrite::Unchanged);
    for (col, cell) in row.cells().enumerate() {
        let Some((at, len)) = cell.value else {
            continue;
        };
        scratch.clear();
        let change = plan.apply_into(col, &body[at..at + len], &mut scratch);
        if change == Change::Unchanged {
            continue;
        }
        if copied == 0 {
            out.reserve(body.len() + 5 + scratch.len());
            out.put_u8(b'D');
            out.put_i32(0);
        }
        out.extend_from_slice(&body[copied..cell.header]);
        match change {
            Change::Replaced => match i32::try_from(scratch.len()) {
                Ok(n) => {
                    out.put_i32(n);
                    out.extend_from_slice(&scratch);
                }
                Err(_) => {
                    result = Err(RowError::TooLong { len: scratch.len() });
                    break;
                }
            },
            _ => out.put_i32(-1),
        }
        copied = at + len;
        result = Ok(RowRewrite::Rewritten);
    }
    plan.scratch = scratch;
    if result == Ok(RowRewrite::Rewritten) {
        out.extend_from_slice(&body[copied..]);
        result = finish_frame(out, mark);
    }
    if result != Ok(RowRewrite::Rewritten) {
        out.truncate(mark);
    }
    result
}

/// Writes the length of the message started at `mark` (tag at `mark`, length after it).
fn finish_frame(out: &mut BytesMut, mark: usize) -> Result<RowRewrite, RowError> {
    let len = out.len() - mark - 1;
    let n = i32::try_from(len).map_err(|_| RowError::TooLong { len })?;
    out[mark + 1..mark + 5].copy_from_slice(&n.to_be_bytes());
    Ok(RowRewrite::Rewritten)
}

/// Rewrites COPY TO STDOUT text-format `data` (the payload of one CopyData message: one or
/// more whole rows, as PostgreSQL sends them) through `plan`, by column index. Values are
/// unescaped before masking and masks escaped after, so the output is valid COPY text. On
/// [`RowRewrite::Rewritten`], a complete CopyData message (tag `d`, length, payload) was
/// appended to `out`; otherwise `out` is untouched. Every row must have as many fields as the
/// plan has columns; the end marker `\.` is passed through. (CSV and binary COPY are other
/// formats: not handled here.)
pub fn rewrite_copy_text(
    data: &[u8],
    plan: &mut MaskPlan,
    out: &mut BytesMut,
) -> Result<RowRewrite, RowError> {
    if !plan.is_active() || plan.column_count() == 0 {
        return Ok(RowRewrite::Unchanged);
    }
    let mark = out.len();
    let mut scratch = std::mem::take(&mut plan.scratch);
    let mut unescaped = Vec::new();
    let mut copied = 0;
    let mut started = false;
    let mut result = Ok(());
    let mut line_start = 0;
    'lines: while line_start < data.len() {
        let line_end = data[line_start..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |p| line_start + p);
        if &data[line_start..line_end] == b"\\." {
            line_start = line_end + 1;
            continue;
        }
        let mut col = 0;
        let mut fs = line_start;
        loop {
            let fe = data[fs..line_end]
                .iter()
                .position(|&b| b == b'\t')
                .map_or(line_end, |p| fs + p);
            let field = &data[fs..fe];
            if field != b"\\N" {
                let value = if field.contains(&b'\\') {
                    unescaped.clear();
                    unescape(field, &mut unescaped);
                    &unescaped[..]
                } else {
                    field
                };
                scratch.clear();
                let change = plan.apply_text_into(col, value, &mut scratch);
                if change != Change::Unchanged {
                    if !started {
                        out.reserve(data.len() + 5 + scratch.len());
                        out.put_u8(b'd');
                        out.put_i32(0);
                        started = true;
                    }
                    out.extend_from_slice(&data[copied..fs]);
                    match change {
                        Change::Replaced => escape(&scratch, out),
                        _ => out.extend_from_slice(b"\\N"),
                    }
                    copied = fe;
                }
            }
            col += 1;
            if fe == line_end {
                break;
            }
            fs = fe + 1;
        }
        if col != plan.column_count() {
            result = Err(RowError::ColumnCount {
                got: col,
                expected: plan.column_count(),
            });
            break 'lines;
        }
        line_start = line_end + 1;
    }
    plan.scratch = scratch;
    let result = match result {
        Err(e) => Err(e),
        Ok(()) if !started => Ok(RowRewrite::Unchanged),
        Ok(()) => {
            out.extend_from_slice(&data[copied..]);
            finish_frame(out, mark)
        }
    };
    if result != Ok(RowRewrite::Rewritten) {
        out.truncate(mark);
    }
    result
}

/// Decodes COPY text escapes (`\b \f \n \r \t \v`, `\ooo` octal, `\xhh` hex, `\c` = `c`).
pub fn unescape(field: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' || i + 1 == field.len() {
            out.push(b);
            i += 1;
            continue;
        }
        let c = field[i + 1];
        i += 2;
        let decoded = match c {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                (v & 0xff) as u8
            }
            b'x' if field.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match field.get(i).and_then(|&d| (d as char).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                v as u8
            }
            other => other,
        };
        out.push(decoded);
    }
}

/// Encodes a value for COPY text (backslash, newline, carriage return, tab and the other
/// control escapes PostgreSQL writes).
pub fn escape(value: &[u8], out: &mut BytesMut) {
    for &b in value {
        let esc = match b {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            8 => b'b',
            12 => b'f',
            11 => b'v',
            _ => {
                out.put_u8(b);
                continue;
            }
        };
        out.put_u8(b'\\');
        out.put_u8(esc);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::super::engine::ColumnDesc;
    use super::super::rules::{Audience, Origin, RuleSet};
    use super::*;

    const RULES: &str = r#"
        [[column]]
        name = "email"
        column = "email"
        strategy = "redact"
        [[column]]
        name = "ssn"
        column = "ssn"
        strategy = "null"
        [[detector]]
        name = "email"
        strategy = "redact"
        [[detector]]
        name = "card"
        strategy = "partial"
    "#;

    fn plan_for(cols: &[(&str, u32, Format)]) -> MaskPlan {
        let rules = Arc::new(RuleSet::from_toml(RULES, None).unwrap());
        let descs: Vec<ColumnDesc<'_>> = cols
            .iter()
            .map(|&(name, type_oid, format)| ColumnDesc {
                origin: Origin {
                    name,
                    ..Origin::default()
                },
                kind: value_kind(type_oid, format),
            })
            .collect();
        MaskPlan::new(rules, "t", Audience::Groups(&[]), &descs)
    }

    fn body(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    b.extend((v.len() as i32).to_be_bytes());
                    b.extend(*v);
                }
                None => b.extend((-1i32).to_be_bytes()),
            }
        }
        b
    }

    /// The body of a framed message after checking tag and length.
    fn unframe(tag: u8, msg: &[u8]) -> &[u8] {
        assert_eq!(msg[0], tag);
        let len = i32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(
            len,
            msg.len() - 1,
            "length field counts itself and the body"
        );
        &msg[5..]
    }

    fn text_cols() -> MaskPlan {
        plan_for(&[
            ("id", oid::INT4, Format::Text),
            ("email", oid::TEXT, Format::Text),
            ("notes", oid::TEXT, Format::Text),
            ("ssn", oid::TEXT, Format::Text),
        ])
    }

    #[test]
    fn a_row_without_sensitive_values_is_unchanged_and_nothing_is_written() {
        let mut plan = text_cols();
        let b = body(&[Some(b"1"), None, Some(b"hello"), None]);
        let mut out = BytesMut::new();
        assert_eq!(
            rewrite_data_row(&b, &mut plan, &mut out),
            Ok(RowRewrite::Unchanged)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn masked_values_get_new_lengths_and_the_rest_is_copied() {
        let mut plan = text_cols();
        let b = body(&[
            Some(b"42"),
            Some(b"ann@example.com"),
            Some(b"card 4111111111111111 ok"),
            Some(b"123-45-6789"),
        ]);
        let mut out = BytesMut::from(&b"prefix"[..]);
        assert_eq!(
            rewrite_data_row(&b, &mut plan, &mut out),
            Ok(RowRewrite::Rewritten)
        );
        assert_eq!(&out[..6], b"prefix");
        let row = DataRow::parse(unframe(b'D', &out[6..])).unwrap();
        let values: Vec<_> = row.iter().collect();
        assert_eq!(
            values,
            [
                Some(&b"42"[..]),
                Some(&b"****"[..]),
                Some(&b"card ************1111 ok"[..]),
                None
            ]
        );
        let report = plan.report();
        assert_eq!(report.len(), 3);
    }

    #[test]
    fn binary_text_is_masked_and_binary_non_text_is_nulled() {
        let mut plan = plan_for(&[
            ("email", oid::VARCHAR, Format::Binary),
            ("email", oid::INT8, Format::Binary),
            ("doc", oid::JSONB, Format::Binary),
            ("n", oid::INT8, Format::Binary),
        ]);
        let b = body(&[
            Some(b"ann@example.com"),
            Some(&[0, 0, 0, 0, 0, 0, 0, 7]),
            Some(b"\x01{\"e\": \"b@c.io\"}"),
            Some(&[0, 0, 0, 0, 0, 0, 0, 9]),
        ]);
        let mut out = BytesMut::new();
        rewrite_data_row(&b, &mut plan, &mut out).unwrap();
        let row = DataRow::parse(unframe(b'D', &out)).unwrap();
        let values: Vec<_> = row.iter().collect();
        assert_eq!(
            values,
            [
                Some(&b"****"[..]),
                None,
                Some(&b"\x01{\"e\": \"****\"}"[..]),
                Some(&[0u8, 0, 0, 0, 0, 0, 0, 9][..])
            ]
        );
    }

    #[test]
    fn malformed_rows_are_errors_and_write_nothing() {
        let mut plan = plan_for(&[("email", oid::TEXT, Format::Text)]);
        let good = body(&[Some(b"a@b.io")]);
        let cases: Vec<(Vec<u8>, RowError)> = vec![
            (
                vec![],
                RowError::Truncated {
                    field: "column count",
                },
            ),
            (
                vec![0],
                RowError::Truncated {
                    field: "column count",
                },
            ),
            (vec![0xff, 0xff], RowError::NegativeCount { count: -1 }),
            (
                good[..5].to_vec(),
                RowError::Truncated {
                    field: "value length",
                },
            ),
            (
                good[..good.len() - 1].to_vec(),
                RowError::Truncated { field: "value" },
            ),
            (
                [&good[..], b"x"].concat(),
                RowError::TrailingBytes { count: 1 },
            ),
            (
                [&[0, 1][..], &(-2i32).to_be_bytes()].concat(),
                RowError::BadLength { column: 0, len: -2 },
            ),
            (
                body(&[None, None]),
                RowError::ColumnCount {
                    got: 2,
                    expected: 1,
                },
            ),
        ];
        for (b, want) in cases {
            let mut out = BytesMut::new();
            assert_eq!(rewrite_data_row(&b, &mut plan, &mut out), Err(want));
            assert!(out.is_empty());
        }
    }

    #[test]
    fn copy_rows_are_masked_by_column_with_escapes_preserved() {
        let mut plan = text_cols();
        let data = b"1\tann@example.com\tline\\none\\tx\t123-45-6789\n2\t\\N\tcard 4111-1111-1111-1111\\\\\t\\N\n";
        let mut out = BytesMut::new();
        assert_eq!(
            rewrite_copy_text(data, &mut plan, &mut out),
            Ok(RowRewrite::Rewritten)
        );
        let payload = unframe(b'd', &out);
        assert_eq!(
            std::str::from_utf8(payload).unwrap(),
            "1\t****\tline\\none\\tx\t\\N\n2\t\\N\tcard ****-****-****-1111\\\\\t\\N\n"
        );
    }

    #[test]
    fn copy_text_with_nothing_to_mask_or_the_end_marker_is_unchanged() {
        let mut plan = text_cols();
        let mut out = BytesMut::new();
        assert_eq!(
            rewrite_copy_text(b"1\t\\N\tplain\t\\N\n\\.\n", &mut plan, &mut out),
            Ok(RowRewrite::Unchanged)
        );
        assert!(out.is_empty());
        assert_eq!(
            rewrite_copy_text(b"1\ta@b.io\n", &mut plan, &mut out),
            Err(RowError::ColumnCount {
                got: 2,
                expected: 4
            })
        );
        assert!(out.is_empty());
    }

    #[test]
    fn copy_escapes_round_trip() {
        let raw: Vec<u8> = (0u8..=255).collect();
        let mut esc = BytesMut::new();
        escape(&raw, &mut esc);
        assert!(!esc.contains(&b'\t') && !esc.contains(&b'\n'));
        let mut back = Vec::new();
        unescape(&esc, &mut back);
        assert_eq!(back, raw);
        let mut v = Vec::new();
        unescape(b"\\101\\x42\\q\\", &mut v);
        assert_eq!(v, b"ABq\\");
    }

    fn any_cell() -> impl Strategy<Value = Option<Vec<u8>>> {
        prop_oneof![
            Just(None),
            prop::collection::vec(any::<u8>(), 0..40).prop_map(Some),
            prop::sample::select(vec![
                &b"ann@example.com"[..],
                b"4111 1111 1111 1111",
                b"{\"x\":\"a@b.io\"}",
                b"\x01{\"x\":4111111111111111}",
                b"",
            ])
            .prop_map(|v| Some(v.to_vec())),
        ]
    }

    const TYPES: [u32; 8] = [
        oid::TEXT,
        oid::INT8,
        oid::JSONB,
        oid::JSON,
        oid::TEXT_ARRAY,
        0,
        16_384,
        oid::INET,
    ];

    proptest! {
        #[test]
        fn rewritten_rows_always_decode_with_the_same_column_count(
            cells in prop::collection::vec((any_cell(), 0usize..8, any::<bool>(), any::<bool>()), 0..8),
        ) {
            let names: Vec<&str> = cells.iter().map(|c| if c.3 { "email" } else { "x" }).collect();
            let cols: Vec<(&str, u32, Format)> = cells
                .iter()
                .zip(&names)
                .map(|(c, n)| (*n, TYPES[c.1], if c.2 { Format::Binary } else { Format::Text }))
                .collect();
            let mut plan = plan_for(&cols);
            let values: Vec<Option<&[u8]>> = cells.iter().map(|c| c.0.as_deref()).collect();
            let b = body(&values);
            let mut out = BytesMut::new();
            match rewrite_data_row(&b, &mut plan, &mut out).unwrap() {
                RowRewrite::Unchanged => prop_assert!(out.is_empty()),
                RowRewrite::Rewritten => {
                    let row = DataRow::parse(unframe(b'D', &out)).unwrap();
                    prop_assert_eq!(row.len(), cells.len());
                    for (got, want) in row.iter().zip(&values) {
                        // A value never turns from NULL into something.
                        prop_assert!(want.is_some() || got.is_none());
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_as_a_data_row_never_panic_and_lengths_stay_consistent(
            raw in prop::collection::vec(any::<u8>(), 0..64), ncols in 0usize..4,
        ) {
            let cols: Vec<(&str, u32, Format)> =
                (0..ncols).map(|i| ("email", TYPES[i], Format::Text)).collect();
            let mut plan = plan_for(&cols);
            let mut out = BytesMut::new();
            match rewrite_data_row(&raw, &mut plan, &mut out) {
                Ok(RowRewrite::Rewritten) => {
                    let row = DataRow::parse(unframe(b'D', &out)).unwrap();
                    prop_assert_eq!(row.len(), ncols);
                }
                Ok(RowRewrite::Unchanged) | Err(_) => prop_assert!(out.is_empty()),
            }
        }

        #[test]
        fn copy_output_has_the_same_rows_and_fields(
            rows in prop::collection::vec(prop::collection::vec(any_cell(), 3), 1..4),
        ) {
            let mut plan = plan_for(&[
                ("email", oid::TEXT, Format::Text),
                ("x", oid::TEXT, Format::Text),
                ("y", oid::JSONB, Format::Text),
            ]);
            let mut data = BytesMut::new();
            for row in &rows {
                for (i, cell) in row.iter().enumerate() {
                    if i > 0 {
                        data.put_u8(b'\t');
                    }
                    match cell {
                        Some(v) => escape(v, &mut data),
                        None => data.extend_from_slice(b"\\N"),
                    }
                }
                data.put_u8(b'\n');
            }
            let mut out = BytesMut::new();
            let payload = match rewrite_copy_text(&data, &mut plan, &mut out).unwrap() {
                RowRewrite::Unchanged => &data[..],
                RowRewrite::Rewritten => unframe(b'd', &out),
            };
            let lines: Vec<&[u8]> = payload.split(|&b| b == b'\n').collect();
            prop_assert_eq!(lines.len(), rows.len() + 1);
            for (line, row) in lines.iter().zip(&rows) {
                let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
                prop_assert_eq!(fields.len(), 3);
                // Column 0 is masked by rule: never the clear value.
                if row[0].is_some() {
                    prop_assert_eq!(fields[0], &b"****"[..]);
                }
            }
        }
    }
}
