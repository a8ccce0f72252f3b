//! Framing of typed PostgreSQL messages: 1 tag byte, then a big-endian i32 length that counts
//! itself and the body but not the tag.
//!
//! ```text
//! +-----+-----------+------------------+
//! | tag | len: i32  | body (len - 4)   |
//! +-----+-----------+------------------+
//! ```
//!
//! Owns the question "is a whole message buffered?" (the mini-redis `Frame::check` step): an
//! incomplete message is `Ok(None)`, never an error; a length below 4 or a message larger than
//! the caller's cap is an error as soon as the 5-byte header is buffered, so a peer cannot make
//! the proxy buffer more than `max` bytes. Never decodes bodies, never allocates, never copies.
use thiserror::Error;

/// Bytes in the header of a typed message: the tag and the length.
pub const HEADER_LEN: usize = 5;

/// Why a byte stream is not a sequence of well-formed frames.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("message length {len} is smaller than the minimum of {min}")]
    TooShort { len: i64, min: usize },
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("buffer ends inside a message ({missing} bytes missing)")]
    Truncated { missing: usize },
}

/// Total size in bytes (tag included) of the first message in `buf`, `Ok(None)` if it is not
/// entirely buffered yet. `max` caps that total size.
pub fn message_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(total) = declared_len(buf)? else {
        return Ok(None);
    };
    if total > max {
        return Err(FrameError::TooLong { len: total, max });
    }
    Ok((buf.len() >= total).then_some(total))
}

/// Total size declared by the header at the start of `buf` (tag included), `Ok(None)` if fewer
/// than [`HEADER_LEN`] bytes are buffered.
fn declared_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(&[_, a, b, c, d]) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([a, b, c, d]);
    match usize::try_from(len) {
        Ok(n) if n >= 4 => Ok(Some(n + 1)),
        _ => Err(FrameError::TooShort {
            len: i64::from(len),
            min: 4,
        }),
    }
}

/// Byte length of the longest prefix of `buf` made of whole messages (0 if none). The proxy
/// splits that prefix off and forwards it as one chunk. An invalid header anywhere in the
/// buffered bytes is an error, even after valid messages.
pub fn whole_messages(buf: &[u8], max: usize) -> Result<usize, FrameError> {
    let mut at = 0;
    while let Some(n) = message_len(&buf[at..], max)? {
        at += n;
    }
    Ok(at)
}

/// Iterates over `(tag, body)` of each message in `buf`, which should hold whole messages only
/// (see [`whole_messages`]). A trailing partial message or a bad length yields one error and
/// ends the iteration.
pub fn messages(buf: &[u8]) -> Messages<'_> {
    Messages { buf, done: false }
}

/// Iterator returned by [`messages`].
#[derive(Debug, Clone)]
pub struct Messages<'a> {
    buf: &'a [u8],
    done: bool,
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<(u8, &'a [u8]), FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.buf.is_empty() {
            return None;
        }
        let total = match declared_len(self.buf) {
            Ok(Some(total)) => total,
            Ok(None) => {
                self.done = true;
                return Some(Err(FrameError::Truncated {
                    missing: HEADER_LEN - self.buf.len(),
                }));
            }
            Err(e) => {
                self.done = true;
                return Some(Err(e));
            }
        };
        let Some(message) = self.buf.get(..total) else {
            self.done = true;
            return Some(Err(FrameError::Truncated {
                missing: total - self.buf.len(),
            }));
        };
        self.buf = &self.buf[total..];
        Some(Ok((message[0], &message[HEADER_LEN..])))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn an_incomplete_header_or_body_needs_more_bytes() {
        let m = msg(b'Q', b"select 1\0");
        for end in 0..m.len() {
            assert_eq!(message_len(&m[..end], 1024), Ok(None), "prefix {end}");
        }
        assert_eq!(message_len(&m, 1024), Ok(Some(m.len())));
    }

    #[test]
    fn a_length_below_four_is_an_error() {
        for len in [-1i32, 0, 3, i32::MIN] {
            let mut m = vec![b'Q'];
            m.extend_from_slice(&len.to_be_bytes());
            assert!(matches!(
                message_len(&m, 1024),
                Err(FrameError::TooShort { .. })
            ));
            assert!(whole_messages(&m, 1024).is_err());
        }
    }

    #[test]
    fn a_message_over_the_cap_is_an_error_before_its_body_arrives() {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(
            message_len(&m, 10_000),
            Err(FrameError::TooLong {
                len: i32::MAX as usize + 1,
                max: 10_000
            })
        );
        let exact = msg(b'Q', &[0; 95]);
        assert_eq!(message_len(&exact, 100), Ok(Some(100)));
        assert!(message_len(&exact, 99).is_err());
    }

    #[test]
    fn whole_messages_stops_before_a_partial_message() {
        let mut buf = msg(b'S', b"");
        buf.extend(msg(b'Q', b"select 1\0"));
        let two = buf.len();
        buf.extend(&msg(b'X', b"")[..3]);
        assert_eq!(whole_messages(&buf, 1024), Ok(two));
        assert_eq!(whole_messages(&buf[..4], 1024), Ok(0));
    }

    #[test]
    fn messages_yields_tags_and_bodies_then_reports_a_partial_tail() {
        let mut buf = msg(b'S', b"");
        buf.extend(msg(b'Q', b"x\0"));
        buf.extend(&msg(b'X', b"")[..2]);
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(got[0], Ok((b'S', &b""[..])));
        assert_eq!(got[1], Ok((b'Q', &b"x\0"[..])));
        assert_eq!(got[2], Err(FrameError::Truncated { missing: 3 }));
        assert_eq!(got.len(), 3);
    }
}
