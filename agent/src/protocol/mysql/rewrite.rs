//! Rewriting one result row value by value: walks a text or binary row payload, asks the
//! caller's function about each non-NULL value, and re-encodes the row only when one changed.
//! The same for the text of an ERR packet ([`rewrite_err_message`]) and the info of an OK
//! packet ([`rewrite_ok_info`]): only that text is offered, every other byte is kept.
//!
//! ```text
//! text row:    count x ( lenenc string | 0xFB NULL )
//! binary row:  0x00 | NULL bitmap ((count + 9) / 8 bytes, column i is bit i + 2)
//!              | each non-NULL value by its column type: fixed width (ints, floats),
//!                a length byte and that many bytes (dates, times), or a lenenc string
//!                (strings, blobs, decimals, JSON, bits, enums, geometry, unknown types)
//! ```
//!
//! Owns the row layouts and their re-encoding; never decides what to mask (the caller's
//! function does: the proxy wraps the masking engine's plan in it), never frames packets (the
//! caller re-frames the payload with [`encode_packet`](super::packet::encode_packet), splitting
//! one that grew past 16 MiB), never allocates or writes when nothing changes. Invariants: the
//! whole payload is checked against the columns (a value past the end, a bad header or bytes
//! after the last value is an error, never a panic, and leaves `out` as it was); a rewritten
//! row has the same columns, a NULL stays NULL, and unchanged values keep their bytes. A
//! replacement is only possible where the wire carries a length: for a fixed-width or temporal
//! binary value the function's [`Cell::Replaced`] is written as NULL (the bitmap bit set), since
//! no other value of that type could stand for "masked".
use super::handshake::Capabilities;
use super::packet::{DecodeError, Reader, put_lenenc_bytes};
use super::resultset::{ColumnDef, types};

/// What the caller's function did with one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// The value stays as it is.
    Keep,
    /// The replacement was appended to the scratch buffer it was given.
    Replaced,
    /// The value becomes NULL.
    Null,
}

/// A row's layout.
#[derive(Debug, Clone, Copy)]
pub enum RowFormat<'a> {
    /// A text-protocol row (COM_QUERY) of this many columns.
    Text { columns: usize },
    /// A binary-protocol row (COM_STMT_EXECUTE, COM_STMT_FETCH) of these columns.
    Binary { columns: &'a [ColumnDef] },
}

/// Where one value sits in the payload.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// Offset of the value's encoding (its length prefix included).
    at: usize,
    /// Offset and length of the value itself.
    value: usize,
    len: usize,
    /// Whether the encoding carries a length (lenenc), so a replacement of any size fits.
    lenenc: bool,
}

/// Rewrites the row `payload`. `mask(column, value, scratch)` is called for every non-NULL
/// value with an empty `scratch`. Returns `Ok(true)` with the new payload appended to `out`
/// when some value changed, `Ok(false)` with `out` untouched otherwise.
pub fn rewrite_row<F>(
    payload: &[u8],
    format: RowFormat<'_>,
    scratch: &mut Vec<u8>,
    mut mask: F,
    out: &mut Vec<u8>,
) -> Result<bool, DecodeError>
where
    F: FnMut(usize, &[u8], &mut Vec<u8>) -> Cell,
{
    let mark = out.len();
    let result = match format {
        RowFormat::Text { columns } => text(payload, columns, scratch, &mut mask, out),
        RowFormat::Binary { columns } => binary(payload, columns, scratch, &mut mask, out),
    };
    if !matches!(result, Ok(true)) {
        out.truncate(mark);
    }
    result
}

fn offset(payload: &[u8], r: &Reader<'_>) -> usize {
    payload.len() - r.remaining()
}

fn text<F>(
    payload: &[u8],
    columns: usize,
    scratch: &mut Vec<u8>,
    mask: &mut F,
    out: &mut Vec<u8>,
) -> Result<bool, DecodeError>
where
    F: FnMut(usize, &[u8], &mut Vec<u8>) -> Cell,
{
    let mut r = Reader::new("text row", payload);
    // Bytes of `payload` before this offset are in `out` already (once something changed),
    // starting at `out[base]`.
    let mut copied: Option<usize> = None;
    let base = out.len();
    for col in 0..columns {
        let at = offset(payload, &r);
        let Some(value) = r.lenenc_bytes_or_null("value")? else {
            continue;
        };
        let span = Span {
            at,
            value: offset(payload, &r) - value.len(),
            len: value.len(),
            lenenc: true,
        };
        let at = Written {
            base,
            copied: &mut copied,
            null_bit: None,
        };
        apply(payload, span, col, scratch, mask, out, at);
    }
    finish(payload, &r, copied, out)
}

fn binary<F>(
    payload: &[u8],
    columns: &[ColumnDef],
    scratch: &mut Vec<u8>,
    mask: &mut F,
    out: &mut Vec<u8>,
) -> Result<bool, DecodeError>
where
    F: FnMut(usize, &[u8], &mut Vec<u8>) -> Cell,
{
    let mut r = Reader::new("binary row", payload);
    let header = r.u8("header")?;
    if header != 0 {
        return Err(r.invalid("header", u64::from(header)));
    }
    let bitmap = r.bytes((columns.len() + 9) / 8, "NULL bitmap")?;
    let mut copied: Option<usize> = None;
    let base = out.len();
    for (col, def) in columns.iter().enumerate() {
        let bit = col + 2;
        if bitmap
            .get(bit / 8)
            .is_some_and(|b| b & (1 << (bit % 8)) != 0)
        {
            continue;
        }
        let at = offset(payload, &r);
        let ty = def.column_type;
        let span = if let Some(width) = types::fixed_width(ty) {
            r.bytes(width, "value")?;
            Span {
                at,
                value: at,
                len: width,
                lenenc: false,
            }
        } else if types::is_temporal(ty) {
            let len = usize::from(r.u8("temporal length")?);
            r.bytes(len, "temporal value")?;
            Span {
                at,
                value: at + 1,
                len,
                lenenc: false,
            }
        } else {
            let value = r.lenenc_bytes("value")?;
            Span {
                at,
                value: offset(payload, &r) - value.len(),
                len: value.len(),
                lenenc: true,
            }
        };
        let at = Written {
            base,
            copied: &mut copied,
            null_bit: Some(bit),
        };
        apply(payload, span, col, scratch, mask, out, at);
    }
    finish(payload, &r, copied, out)
}

/// How far a rewritten row is in `out`.
struct Written<'c> {
    /// Where the row's first byte sits in `out`.
    base: usize,
    /// Bytes of the payload before this offset are in `out` (None: nothing changed yet).
    copied: &'c mut Option<usize>,
    /// The binary row's bitmap bit for this column (text rows write 0xFB instead).
    null_bit: Option<usize>,
}

/// Asks about one value and, if it changed, brings `out` up to it and writes its new form.
fn apply<F>(
    payload: &[u8],
    span: Span,
    col: usize,
    scratch: &mut Vec<u8>,
    mask: &mut F,
    out: &mut Vec<u8>,
    at: Written<'_>,
) where
    F: FnMut(usize, &[u8], &mut Vec<u8>) -> Cell,
{
    scratch.clear();
    let value = &payload[span.value..span.value + span.len];
    let cell = match mask(col, value, scratch) {
        Cell::Replaced if !span.lenenc => Cell::Null,
        c => c,
    };
    if cell == Cell::Keep {
        return;
    }
    let from = match *at.copied {
        Some(c) => c,
        None => {
            out.reserve(payload.len() + scratch.len() + 9);
            0
        }
    };
    out.extend_from_slice(&payload[from..span.at]);
    match (cell, at.null_bit) {
        (Cell::Replaced, _) => put_lenenc_bytes(out, scratch),
        (_, None) => out.push(0xFB),
        (_, Some(bit)) => {
            // The bitmap follows the header byte and precedes every value, so it is in `out`
            // already, at the same offsets.
            if let Some(b) = out.get_mut(at.base + 1 + bit / 8) {
                *b |= 1 << (bit % 8);
            }
        }
    }
    *at.copied = Some(span.value + span.len);
}

/// Checks that the row ended exactly, and completes a rewritten one.
fn finish(
    payload: &[u8],
    r: &Reader<'_>,
    copied: Option<usize>,
    out: &mut Vec<u8>,
) -> Result<bool, DecodeError> {
    if !r.is_empty() {
        return Err(DecodeError::Invalid {
            packet: "row",
            field: "trailing bytes",
            value: r.remaining() as u64,
        });
    }
    match copied {
        Some(c) => {
            out.extend_from_slice(&payload[c..]);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Rewrites the message of ERR packet `payload` (0xFF, error number, `#` and SQLSTATE under
/// protocol 4.1, message to the end). `mask(message, scratch)` is called once with an empty
/// `scratch`; when it returns true, the packet with its replacement is appended to `out` and
/// `Ok(true)` returned: the header, error number and SQLSTATE keep their bytes. `Ok(false)`
/// leaves `out` untouched. A progress report (error number 0xFFFF) carries no message and is
/// not offered.
pub fn rewrite_err_message<F>(
    payload: &[u8],
    scratch: &mut Vec<u8>,
    mut mask: F,
    out: &mut Vec<u8>,
) -> Result<bool, DecodeError>
where
    F: FnMut(&[u8], &mut Vec<u8>) -> bool,
{
    let mut r = Reader::new("ERR", payload);
    let header = r.u8("header")?;
    if header != 0xFF {
        return Err(r.invalid("header", u64::from(header)));
    }
    if r.u16("error code")? == 0xFFFF {
        return Ok(false);
    }
    if r.peek_rest().first() == Some(&b'#') && r.remaining() >= 6 {
        r.bytes(6, "sql state")?;
    }
    let at = offset(payload, &r);
    scratch.clear();
    if !mask(r.rest(), scratch) {
        return Ok(false);
    }
    out.extend_from_slice(&payload[..at]);
    out.extend_from_slice(scratch);
    Ok(true)
}

/// Rewrites the human-readable info of OK packet `payload` (header 0x00 or 0xFE; affected rows,
/// last insert id, status and warnings as [`parse_ok`](super::handshake::parse_ok) reads them
/// under `caps`; then the info, a lenenc string followed by the session state under
/// SESSION_TRACK, else the rest of the packet). `mask(info, scratch)` as for
/// [`rewrite_err_message`]; everything but the info (and its length) keeps its bytes. An OK
/// without info is not offered.
pub fn rewrite_ok_info<F>(
    payload: &[u8],
    caps: Capabilities,
    scratch: &mut Vec<u8>,
    mut mask: F,
    out: &mut Vec<u8>,
) -> Result<bool, DecodeError>
where
    F: FnMut(&[u8], &mut Vec<u8>) -> bool,
{
    let mut r = Reader::new("OK", payload);
    let header = r.u8("header")?;
    if header != 0x00 && header != 0xFE {
        return Err(r.invalid("header", u64::from(header)));
    }
    r.lenenc("affected rows")?;
    r.lenenc("last insert id")?;
    if caps.contains(Capabilities::PROTOCOL_41) {
        r.u16("status flags")?;
        r.u16("warnings")?;
    } else if caps.contains(Capabilities::TRANSACTIONS) {
        r.u16("status flags")?;
    }
    if r.is_empty() {
        return Ok(false);
    }
    let at = offset(payload, &r);
    let tracked = caps.contains(Capabilities::SESSION_TRACK);
    let info = if tracked {
        r.lenenc_bytes("info")?
    } else {
        r.rest()
    };
    if info.is_empty() {
        return Ok(false);
    }
    let end = offset(payload, &r);
    scratch.clear();
    if !mask(info, scratch) {
        return Ok(false);
    }
    out.extend_from_slice(&payload[..at]);
    if tracked {
        put_lenenc_bytes(out, scratch);
    } else {
        out.extend_from_slice(scratch);
    }
    out.extend_from_slice(&payload[end..]);
    Ok(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::mysql::resultset::{Value, decode_binary_row, decode_text_row};

    fn text_row(values: &[Option<&[u8]>]) -> Vec<u8> {
        crate::protocol::mysql::testing::text_row(values)
    }

    fn def(ty: u8) -> ColumnDef {
        ColumnDef {
            column_type: ty,
            ..ColumnDef::default()
        }
    }

    /// Masks values containing '@' (to "****"), nulls values containing "NUL".
    fn masker(_col: usize, v: &[u8], s: &mut Vec<u8>) -> Cell {
        if v.windows(3).any(|w| w == b"NUL") {
            Cell::Null
        } else if v.contains(&b'@') {
            s.extend_from_slice(b"****");
            Cell::Replaced
        } else {
            Cell::Keep
        }
    }

    fn run(payload: &[u8], format: RowFormat<'_>) -> Result<Option<Vec<u8>>, DecodeError> {
        let mut out = b"prefix".to_vec();
        let mut scratch = Vec::new();
        let changed = rewrite_row(payload, format, &mut scratch, masker, &mut out)?;
        assert!(out.starts_with(b"prefix"));
        Ok(changed.then(|| out[6..].to_vec()))
    }

    #[test]
    fn a_text_row_is_rewritten_only_where_a_value_changed() {
        let row = text_row(&[Some(b"1"), Some(b"ada@example.com"), None, Some(b"NUL!")]);
        let out = run(&row, RowFormat::Text { columns: 4 }).unwrap().unwrap();
        assert_eq!(
            decode_text_row(&out, 4).unwrap(),
            vec![
                Value::Bytes(b"1"),
                Value::Bytes(b"****"),
                Value::Null,
                Value::Null
            ]
        );
        let plain = text_row(&[Some(b"1"), None]);
        assert_eq!(run(&plain, RowFormat::Text { columns: 2 }).unwrap(), None);
    }

    #[test]
    fn a_binary_row_nulls_through_its_bitmap_and_rewrites_strings() {
        use types::*;
        let cols = [
            def(LONG),
            def(VAR_STRING),
            def(DATETIME),
            def(BLOB),
            def(LONGLONG),
        ];
        // id = 7, email, datetime (4 bytes), blob NULL, a longlong whose bytes hold '@'.
        let mut row = vec![0x00, 0b0010_0000];
        row.extend(7i32.to_le_bytes());
        put_lenenc_bytes(&mut row, b"ada@example.com");
        row.extend([4, 0xE9, 0x07, 2, 1]);
        row.extend(u64::from_le_bytes(*b"a@b.io!!").to_le_bytes());
        let out = run(&row, RowFormat::Binary { columns: &cols })
            .unwrap()
            .unwrap();
        let values = decode_binary_row(&out, &cols).unwrap();
        assert_eq!(values[0], Value::Int(7));
        assert_eq!(values[1], Value::Bytes(b"****"));
        assert!(matches!(
            values[2],
            Value::Date { .. } | Value::DateTime { .. }
        ));
        assert_eq!(values[3], Value::Null);
        // A fixed-width value cannot carry a replacement: NULL.
        assert_eq!(values[4], Value::Null);
        assert_eq!(out[1], 0b0110_0000);
    }

    #[test]
    fn bitmaps_of_more_than_one_byte_are_addressed_right() {
        let cols: Vec<ColumnDef> = (0..10).map(|_| def(types::VAR_STRING)).collect();
        let mut row = vec![0x00, 0, 0];
        for i in 0..10 {
            let v = if i == 9 {
                "x@y.z".to_string()
            } else {
                i.to_string()
            };
            put_lenenc_bytes(&mut row, v.as_bytes());
        }
        let out = run(&row, RowFormat::Binary { columns: &cols })
            .unwrap()
            .unwrap();
        let values = decode_binary_row(&out, &cols).unwrap();
        assert_eq!(values[9], Value::Bytes(b"****"));
        assert_eq!(values[8], Value::Bytes(b"8"));
        assert_eq!(&out[1..3], &[0, 0], "replaced, not nulled");
    }

    #[test]
    fn malformed_rows_are_errors_and_write_nothing() {
        let cols = [def(types::LONG), def(types::VAR_STRING)];
        for bad in [
            &b""[..],
            b"\x01\x00\x07\x00\x00\x00\x01a",
            b"\x00\x00\x07\x00\x00\x00\x05ab",
            b"\x00\x00\x07\x00\x00\x00\x01a!",
        ] {
            let mut out = Vec::new();
            let mut scratch = Vec::new();
            assert!(
                rewrite_row(
                    bad,
                    RowFormat::Binary { columns: &cols },
                    &mut scratch,
                    |_, _, s| {
                        s.push(b'x');
                        Cell::Replaced
                    },
                    &mut out
                )
                .is_err()
            );
            assert!(out.is_empty());
        }
        assert!(run(b"\x05ab", RowFormat::Text { columns: 1 }).is_err());
        assert!(run(b"\x01a\x01b", RowFormat::Text { columns: 1 }).is_err());
    }

    /// A value whose length prefix takes three bytes.
    const LONG: &str = "long long long long long long long long long long long long long long \
        long long long long long long long long long long long long long long long long long long \
        long long long long long long long long long long long long long long long long long long \
        long long long long long long long long long long long long long long long long @ end";

    proptest! {
        #[test]
        fn a_rewritten_text_row_decodes_to_the_masked_values(
            values in prop::collection::vec(prop::option::of(prop::sample::select(vec![
                "", "1", "plain", "a@b.io", "NUL", LONG,
            ])), 0..12),
        ) {
            let raw: Vec<Option<&[u8]>> = values.iter().map(|v| v.map(str::as_bytes)).collect();
            let row = text_row(&raw);
            let format = RowFormat::Text { columns: raw.len() };
            let out = run(&row, format).unwrap();
            let got = match &out {
                Some(o) => decode_text_row(o, raw.len()).unwrap(),
                None => decode_text_row(&row, raw.len()).unwrap(),
            };
            for (v, g) in raw.iter().zip(&got) {
                let want = match v {
                    None => Value::Null,
                    Some(v) if v.windows(3).any(|w| w == b"NUL") => Value::Null,
                    Some(v) if v.contains(&b'@') => Value::Bytes(b"****"),
                    Some(v) => Value::Bytes(v),
                };
                prop_assert_eq!(g, &want);
            }
            let changed = raw.iter().flatten().any(|v| v.contains(&b'@') || v.windows(3).any(|w| w == b"NUL"));
            prop_assert_eq!(out.is_some(), changed);
        }
    }

    /// Replaces every `ann@example.com` with `****`.
    fn hide_ann(v: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(at) = v.windows(15).position(|w| w == b"ann@example.com") else {
            return false;
        };
        out.extend_from_slice(&v[..at]);
        out.extend_from_slice(b"****");
        out.extend_from_slice(&v[at + 15..]);
        true
    }

    #[test]
    fn an_err_message_loses_only_its_finding_and_keeps_number_and_sqlstate() {
        use crate::protocol::mysql::handshake::{ErrPacket, parse_err};
        let err = ErrPacket::new(
            1062,
            "23000",
            "Duplicate entry 'ann@example.com' for key 'email'",
        )
        .encode();
        let mut out = Vec::new();
        assert!(rewrite_err_message(&err, &mut Vec::new(), hide_ann, &mut out).unwrap());
        let got = parse_err(&out).unwrap();
        assert_eq!(
            got,
            ErrPacket::new(1062, "23000", "Duplicate entry '****' for key 'email'")
        );
        // Nothing found: nothing written.
        let plain = ErrPacket::new(1146, "42S02", "Table 'shop.nope' doesn't exist").encode();
        let mut out = Vec::new();
        assert!(!rewrite_err_message(&plain, &mut Vec::new(), hide_ann, &mut out).unwrap());
        assert!(out.is_empty());
        // Every prefix: an error or a whole packet, never a panic; a bad header is an error.
        for cut in 0..err.len() {
            let mut out = Vec::new();
            if let Ok(true) = rewrite_err_message(&err[..cut], &mut Vec::new(), hide_ann, &mut out)
            {
                assert!(parse_err(&out).is_ok());
            } else {
                assert!(out.is_empty());
            }
        }
        assert!(
            rewrite_err_message(b"\x00abc", &mut Vec::new(), hide_ann, &mut Vec::new()).is_err()
        );
        // A progress report is not an error message.
        let progress = b"\xff\xff\xff\x01\x01\x00\x00\x00ann@example.com";
        assert!(
            !rewrite_err_message(progress, &mut Vec::new(), hide_ann, &mut Vec::new()).unwrap()
        );
    }

    #[test]
    fn an_ok_info_loses_only_its_finding_with_and_without_session_tracking() {
        use crate::protocol::mysql::handshake::{OkPacket, parse_ok, status};
        let base = Capabilities::sluice_default();
        for caps in [base, base | Capabilities::SESSION_TRACK] {
            for state in [false, true] {
                if state && !caps.contains(Capabilities::SESSION_TRACK) {
                    continue;
                }
                let ok = OkPacket {
                    affected_rows: 3,
                    last_insert_id: 9,
                    status: if state {
                        status::SESSION_STATE_CHANGED
                    } else {
                        0
                    },
                    warnings: 1,
                    info: "Rows matched: 1 by ann@example.com".into(),
                    session_state: if state {
                        b"\x00\x05\x04ab\x01c".to_vec()
                    } else {
                        Vec::new()
                    },
                };
                let wire = ok.encode(0x00, caps);
                let mut out = Vec::new();
                assert!(rewrite_ok_info(&wire, caps, &mut Vec::new(), hide_ann, &mut out).unwrap());
                let got = parse_ok(&out, caps).unwrap();
                assert_eq!(
                    got,
                    OkPacket {
                        info: "Rows matched: 1 by ****".into(),
                        ..ok.clone()
                    }
                );
                for cut in 0..wire.len() {
                    let mut out = Vec::new();
                    match rewrite_ok_info(&wire[..cut], caps, &mut Vec::new(), hide_ann, &mut out) {
                        // A cut inside the session state is passed on as it came.
                        Ok(true) => assert_eq!(
                            parse_ok(&out, caps).is_ok(),
                            parse_ok(&wire[..cut], caps).is_ok()
                        ),
                        _ => assert!(out.is_empty()),
                    }
                }
            }
            let plain = OkPacket::default().encode(0x00, caps);
            let mut out = Vec::new();
            assert!(!rewrite_ok_info(&plain, caps, &mut Vec::new(), hide_ann, &mut out).unwrap());
            assert!(out.is_empty());
        }
    }
}
