//! Message-body primitives shared by the [`frontend`](super::frontend) and
//! [`backend`](super::backend) decoders.
//!
//! Owns the bounds-checked [`Reader`] over one message body, the [`DecodeError`] both decoders
//! return, and validated zero-copy views of repeated fields ([`Formats`], [`Values`], [`Oids`],
//! [`CStrs`]). Invariant: a view is only constructed after its whole extent has been checked, so
//! iterating it never fails and never reads outside the body; nothing here allocates.
use thiserror::Error;

/// Why a message body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message '{tag}' ends inside its {field}", tag = char::from(*tag))]
    Truncated { tag: u8, field: &'static str },
    #[error("message '{tag}' has a {field} that is not valid utf-8", tag = char::from(*tag))]
    NotUtf8 { tag: u8, field: &'static str },
    #[error("message '{tag}' has an invalid {field}: {value}", tag = char::from(*tag))]
    Invalid {
        tag: u8,
        field: &'static str,
        value: i64,
    },
    #[error("message '{tag}' has {count} unexpected trailing bytes", tag = char::from(*tag))]
    TrailingBytes { tag: u8, count: usize },
}

/// The format of a parameter or column value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Text,
    Binary,
}

/// A bounds-checked cursor over one message body.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    tag: u8,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(tag: u8, buf: &'a [u8]) -> Self {
        Self { buf, tag }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            field,
        }
    }

    pub(crate) fn invalid(&self, field: &'static str, value: i64) -> DecodeError {
        DecodeError::Invalid {
            tag: self.tag,
            field,
            value,
        }
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.truncated(field));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn i16(&mut self, field: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    /// A NUL-terminated string (the NUL is consumed, not returned).
    pub(crate) fn cstr(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let raw = self.cbytes(field)?;
        std::str::from_utf8(raw).map_err(|_| DecodeError::NotUtf8 {
            tag: self.tag,
            field,
        })
    }

    /// NUL-terminated bytes (the NUL is consumed, not returned).
    pub(crate) fn cbytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated(field))?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// Everything left in the body.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// A count field (i16) that must not be negative.
    pub(crate) fn count(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let n = self.i16(field)?;
        usize::try_from(n).map_err(|_| self.invalid(field, i64::from(n)))
    }

    pub(crate) fn format(&mut self, field: &'static str) -> Result<Format, DecodeError> {
        let code = self.i16(field)?;
        format_from_code(code).ok_or_else(|| self.invalid(field, i64::from(code)))
    }

    /// An i16 count followed by that many i16 format codes (0 text, 1 binary).
    pub(crate) fn formats(&mut self, field: &'static str) -> Result<Formats<'a>, DecodeError> {
        let n = self.count(field)?;
        let raw = self.bytes(n * 2, field)?;
        for pair in raw.chunks_exact(2) {
            let code = i16::from_be_bytes([pair[0], pair[1]]);
            if format_from_code(code).is_none() {
                return Err(self.invalid(field, i64::from(code)));
            }
        }
        Ok(Formats { raw })
    }

    /// An i16 count followed by that many (i32 length, bytes) values; length -1 is NULL.
    pub(crate) fn values(&mut self, field: &'static str) -> Result<Values<'a>, DecodeError> {
        let count = self.count(field)?;
        let start = self.buf;
        for _ in 0..count {
            let len = self.i32(field)?;
            if len == -1 {
                continue;
            }
            let len = usize::try_from(len).map_err(|_| self.invalid(field, i64::from(len)))?;
            self.bytes(len, field)?;
        }
        let used = start.len() - self.buf.len();
        Ok(Values {
            count,
            raw: &start[..used],
        })
    }

    /// An i16 count followed by that many u32 OIDs.
    pub(crate) fn oids(&mut self, field: &'static str) -> Result<Oids<'a>, DecodeError> {
        let n = self.count(field)?;
        Ok(Oids {
            raw: self.bytes(n * 4, field)?,
        })
    }

    /// NUL-terminated UTF-8 strings up to (and consuming) an empty one.
    pub(crate) fn cstrs_until_empty(
        &mut self,
        field: &'static str,
    ) -> Result<CStrs<'a>, DecodeError> {
        let start = self.buf;
        let mut count = 0;
        while !self.cstr(field)?.is_empty() {
            count += 1;
        }
        // Exclude the terminating empty string from the view.
        let used = start.len() - self.buf.len() - 1;
        Ok(CStrs {
            count,
            raw: &start[..used],
        })
    }

    /// `count` NUL-terminated UTF-8 strings.
    pub(crate) fn cstrs(
        &mut self,
        count: usize,
        field: &'static str,
    ) -> Result<CStrs<'a>, DecodeError> {
        let start = self.buf;
        for _ in 0..count {
            self.cstr(field)?;
        }
        let used = start.len() - self.buf.len();
        Ok(CStrs {
            count,
            raw: &start[..used],
        })
    }

    /// Fails unless the whole body has been consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                tag: self.tag,
                count: self.buf.len(),
            })
        }
    }
}

fn format_from_code(code: i16) -> Option<Format> {
    match code {
        0 => Some(Format::Text),
        1 => Some(Format::Binary),
        _ => None,
    }
}

/// A validated list of format codes (Bind, FunctionCall, Copy*Response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Formats<'a> {
    raw: &'a [u8],
}

impl<'a> Formats<'a> {
    pub fn len(&self) -> usize {
        self.raw.len() / 2
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Format> + 'a {
        self.raw
            .chunks_exact(2)
            .map(|p| format_from_code(i16::from_be_bytes([p[0], p[1]])).unwrap_or(Format::Text))
    }

    /// The format of value `index` under the protocol's rule: no codes means all text, one code
    /// applies to every value, otherwise one code per value.
    pub fn for_value(&self, index: usize) -> Format {
        let i = if self.len() == 1 { 0 } else { index };
        self.iter().nth(i).unwrap_or(Format::Text)
    }
}

/// A validated list of nullable values (Bind parameters, DataRow columns, FunctionCall args).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Values<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each value, `None` for SQL NULL.
    pub fn iter(&self) -> ValuesIter<'a> {
        ValuesIter {
            left: self.count,
            raw: self.raw,
        }
    }
}

/// Iterator over [`Values`].
#[derive(Debug, Clone)]
pub struct ValuesIter<'a> {
    left: usize,
    raw: &'a [u8],
}

impl<'a> Iterator for ValuesIter<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Validated at construction; a failure here ends the iteration instead of panicking.
        let mut r = Reader::new(0, self.raw);
        let len = r.i32("value length").ok()?;
        let value = match usize::try_from(len) {
            Ok(n) => Some(r.bytes(n, "value").ok()?),
            Err(_) => None,
        };
        self.raw = r.rest();
        Some(value)
    }
}

/// A validated list of type OIDs (Parse, ParameterDescription).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Oids<'a> {
    raw: &'a [u8],
}

impl<'a> Oids<'a> {
    pub fn len(&self) -> usize {
        self.raw.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.raw
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A validated sequence of NUL-terminated UTF-8 strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CStrs<'a> {
    count: usize,
    raw: &'a [u8],
}

impl<'a> CStrs<'a> {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.raw
            .split(|&b| b == 0)
            .take(self.count)
            .map(|s| std::str::from_utf8(s).unwrap_or(""))
    }
}
