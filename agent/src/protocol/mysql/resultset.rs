//! Result sets: column definitions ([`ColumnDef`]), text rows (length-encoded strings, 0xFB
//! NULL) and binary rows (0x00, a NULL bitmap offset by 2 bits, typed values), and the
//! [`Value`]s both decode into; binary values are also what COM_STMT_EXECUTE parameters are.
//!
//! ```text
//! column definition: catalog | schema | table | org_table | name | org_name (lenenc strings)
//!                    [MariaDB EXTENDED_TYPE_INFO: lenenc extended info]
//!                    0x0c | charset u16 | length u32 | type u8 | flags u16 | decimals u8 | 0 0
//! ```
//! Decoders borrow from the payload and never panic on input; no I/O.
use super::handshake::Capabilities;
use super::packet::{DecodeError, Reader, text};

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
    pub const ENUM: u8 = 0xF7;
    pub const SET: u8 = 0xF8;
    pub const TINY_BLOB: u8 = 0xF9;
    pub const MEDIUM_BLOB: u8 = 0xFA;
    pub const LONG_BLOB: u8 = 0xFB;
    pub const BLOB: u8 = 0xFC;
    pub const VAR_STRING: u8 = 0xFD;
    pub const STRING: u8 = 0xFE;
    pub const GEOMETRY: u8 = 0xFF;

    /// The width in bytes of a binary-protocol value of type `ty` with a fixed width, or
    /// `None` when it is a length-encoded string (strings, decimals, blobs, JSON, bits, enums,
    /// geometry; unknown types are read as strings too) or length-prefixed (temporal types:
    /// a length byte, then that many bytes).
    pub fn fixed_width(ty: u8) -> Option<usize> {
        match ty {
            NULL => Some(0),
            TINY => Some(1),
            SHORT | YEAR => Some(2),
            LONG | INT24 | FLOAT => Some(4),
            LONGLONG | DOUBLE => Some(8),
            _ => None,
        }
    }

    /// Whether a binary-protocol value of type `ty` is a length byte and that many bytes.
    pub fn is_temporal(ty: u8) -> bool {
        matches!(
            ty,
            DATE | DATETIME | TIMESTAMP | NEWDATE | TIMESTAMP2 | DATETIME2 | TIME | TIME2
        )
    }
}

/// Column flag: the integer is unsigned.
pub const UNSIGNED_FLAG: u16 = 0x20;

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
