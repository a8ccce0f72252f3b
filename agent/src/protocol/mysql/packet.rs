//! Framing of MySQL/MariaDB packets, and the primitives every payload decoder shares
//! (length-encoded integers and strings, a bounds-checked [`Reader`], the [`DecodeError`]).
//!
//! ```text
//! +----------------------+--------+---------------------------+
//! | payload len: u24 LE  | seq u8 | payload (len bytes)       |
//! +----------------------+--------+---------------------------+
//! ```
//!
//! A payload of 2^24 - 1 bytes or more is split into chunks of exactly `0xFFFFFF` bytes, each
//! with the next sequence id, ended by a shorter chunk (possibly empty). A *packet* here is the
//! whole logical payload; a *chunk* is one wire frame. Sequence ids count up (wrapping) within a
//! command's exchange and restart at 0 with each client command.
//!
//! Owns the question "is a whole packet buffered?": an incomplete packet is `Ok(None)`, never an
//! error; a payload larger than the caller's cap is an error as soon as the chunk headers that
//! declare it are buffered, so a peer cannot make the proxy buffer more than `max` bytes. A
//! single-chunk packet is borrowed; only a packet of 16 MiB or more is copied (reassembled).
//! Never panics on input, never touches a socket.
use std::borrow::Cow;

use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// Bytes in a chunk header: the 3-byte length and the sequence id.
pub const HEADER_LEN: usize = 4;
/// The largest payload one chunk carries; a chunk this long is continued by the next one.
pub const MAX_CHUNK: usize = 0xFF_FFFF;

/// Why a byte stream is not a sequence of well-formed packets.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("packet of {len} bytes exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("packet has sequence id {got}, expected {expected}")]
    Sequence { expected: u8, got: u8 },
    #[error("buffer ends inside a packet ({missing} bytes missing)")]
    Truncated { missing: usize },
}

/// One whole (reassembled) packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Sequence id of the first chunk.
    pub seq: u8,
    /// Sequence id of the last chunk (equal to `seq` unless the payload is 16 MiB or more).
    pub last_seq: u8,
    pub payload: Cow<'a, [u8]>,
}

/// Walks the chunk headers of the first packet in `buf`: `Ok(Some((wire_len, payload_len)))`
/// when the whole packet is buffered, `Ok(None)` when more bytes are needed.
fn scan(buf: &[u8], max: usize, expect: Option<u8>) -> Result<Option<(usize, usize)>, PacketError> {
    let mut at = 0usize;
    let mut payload = 0usize;
    let mut expected = expect;
    loop {
        let Some(&[a, b, c, seq]) = buf.get(at..at + HEADER_LEN) else {
            return Ok(None);
        };
        if let Some(e) = expected
            && seq != e
        {
            return Err(PacketError::Sequence {
                expected: e,
                got: seq,
            });
        }
        expected = Some(seq.wrapping_add(1));
        let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
        payload += len;
        if payload > max {
            return Err(PacketError::TooLong { len: payload, max });
        }
        at += HEADER_LEN + len;
        if len < MAX_CHUNK {
            return Ok((buf.len() >= at).then_some((at, payload)));
        }
        if buf.len() < at {
            return Ok(None);
        }
    }
}

/// Wire size in bytes (headers included) of the first packet in `buf`, `Ok(None)` if it is not
/// entirely buffered yet. `max` caps the reassembled payload size. Sequence ids are not checked
/// (see [`Decoder`] for that).
pub fn packet_len(buf: &[u8], max: usize) -> Result<Option<usize>, PacketError> {
    Ok(scan(buf, max, None)?.map(|(wire, _)| wire))
}

/// Byte length of the longest prefix of `buf` made of whole packets (0 if none). An oversize
/// packet anywhere in the buffered bytes is an error, even after valid packets.
pub fn whole_packets(buf: &[u8], max: usize) -> Result<usize, PacketError> {
    let mut at = 0;
    while let Some(n) = packet_len(&buf[at..], max)? {
        at += n;
        if at >= buf.len() {
            break;
        }
    }
    Ok(at)
}

/// Reads the packet whose headers `scan` validated: borrowed when it is one chunk.
fn assemble(buf: &[u8], wire: usize, payload_len: usize) -> Packet<'_> {
    let seq = buf.get(3).copied().unwrap_or(0);
    if wire == payload_len + HEADER_LEN {
        return Packet {
            seq,
            last_seq: seq,
            payload: Cow::Borrowed(buf.get(HEADER_LEN..wire).unwrap_or_default()),
        };
    }
    let mut out = Vec::with_capacity(payload_len);
    let mut at = 0;
    let mut last_seq = seq;
    while at < wire {
        let Some(&[a, b, c, s]) = buf.get(at..at + HEADER_LEN) else {
            break;
        };
        let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
        out.extend_from_slice(
            buf.get(at + HEADER_LEN..at + HEADER_LEN + len)
                .unwrap_or_default(),
        );
        last_seq = s;
        at += HEADER_LEN + len;
    }
    Packet {
        seq,
        last_seq,
        payload: Cow::Owned(out),
    }
}

/// Iterates over the packets of `buf`, which should hold whole packets only (see
/// [`whole_packets`]). A trailing partial packet yields one error and ends the iteration.
/// `max` caps each reassembled payload.
pub fn packets(buf: &[u8], max: usize) -> Packets<'_> {
    Packets {
        buf,
        max,
        done: false,
    }
}

/// Iterator returned by [`packets`].
#[derive(Debug, Clone)]
pub struct Packets<'a> {
    buf: &'a [u8],
    max: usize,
    done: bool,
}

impl<'a> Iterator for Packets<'a> {
    type Item = Result<Packet<'a>, PacketError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.buf.is_empty() {
            return None;
        }
        match scan(self.buf, self.max, None) {
            Ok(Some((wire, payload))) => {
                let p = assemble(self.buf, wire, payload);
                self.buf = self.buf.get(wire..).unwrap_or_default();
                Some(Ok(p))
            }
            Ok(None) => {
                self.done = true;
                Some(Err(PacketError::Truncated {
                    missing: missing(self.buf),
                }))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// How many more bytes the incomplete packet at the start of `buf` needs, at least.
fn missing(buf: &[u8]) -> usize {
    let mut at = 0usize;
    loop {
        let Some(&[a, b, c, _]) = buf.get(at..at + HEADER_LEN) else {
            return at + HEADER_LEN - buf.len();
        };
        let len = usize::from(a) | usize::from(b) << 8 | usize::from(c) << 16;
        at += HEADER_LEN + len;
        if buf.len() < at {
            return at - buf.len();
        }
        if len < MAX_CHUNK {
            return 0;
        }
    }
}

/// An incremental packet decoder for one direction of a connection: reports "need more bytes"
/// (`Ok(None)`), a whole packet with the bytes it used, or an error (oversize, wrong sequence
/// id). It tracks the sequence id the next packet must carry; call [`Decoder::reset`] when a
/// new command starts (the client's next packet is 0) or [`Decoder::expect`] to set it.
#[derive(Debug, Clone)]
pub struct Decoder {
    max: usize,
    expected: Option<u8>,
}

impl Decoder {
    /// A decoder capping payloads at `max` bytes that checks sequence ids from 0.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            expected: Some(0),
        }
    }

    /// A decoder that does not check sequence ids until told what to expect.
    pub fn unchecked(max: usize) -> Self {
        Self {
            max,
            expected: None,
        }
    }

    /// The next packet must carry sequence id 0.
    pub fn reset(&mut self) {
        self.expected = Some(0);
    }

    /// The next packet must carry `seq` (`None`: accept any and follow it).
    pub fn expect(&mut self, seq: Option<u8>) {
        self.expected = seq;
    }

    /// The sequence id the next packet must carry, if checked.
    pub fn expected(&self) -> Option<u8> {
        self.expected
    }

    /// Decodes the first packet of `buf`: `Ok(None)` when more bytes are needed, else the
    /// number of bytes it took (headers included) and the packet.
    pub fn decode<'a>(
        &mut self,
        buf: &'a [u8],
    ) -> Result<Option<(usize, Packet<'a>)>, PacketError> {
        let Some((wire, payload)) = scan(buf, self.max, self.expected)? else {
            return Ok(None);
        };
        let p = assemble(buf, wire, payload);
        self.expected = Some(p.last_seq.wrapping_add(1));
        Ok(Some((wire, p)))
    }
}

/// Appends `payload` as one packet starting at sequence id `seq` (split into 16 MiB chunks,
/// ended by a shorter, possibly empty chunk); returns the sequence id of the next packet.
pub fn encode_packet(seq: u8, payload: &[u8], out: &mut BytesMut) -> u8 {
    out.reserve(payload.len() + HEADER_LEN * (1 + payload.len() / MAX_CHUNK));
    let mut seq = seq;
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_CHUNK);
        let len = n.to_le_bytes();
        out.put_slice(&[len[0], len[1], len[2], seq]);
        out.put_slice(&rest[..n]);
        rest = &rest[n..];
        seq = seq.wrapping_add(1);
        if n < MAX_CHUNK {
            return seq;
        }
    }
}

/// One packet as a new buffer (see [`encode_packet`]).
pub fn packet(seq: u8, payload: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    encode_packet(seq, payload, &mut out);
    out
}

/// Why a packet payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("{packet} packet ends inside its {field}")]
    Truncated {
        packet: &'static str,
        field: &'static str,
    },
    #[error("{packet} packet has an invalid {field}: {value}")]
    Invalid {
        packet: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("{packet} packet is empty")]
    Empty { packet: &'static str },
}

/// A bounds-checked cursor over one packet payload. Every read either returns exactly what it
/// asked for or a [`DecodeError`] naming the packet and field; nothing reads past the end.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    packet: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(packet: &'static str, buf: &'a [u8]) -> Self {
        Self { buf, packet }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The unread bytes, without consuming them.
    pub fn peek_rest(&self) -> &'a [u8] {
        self.buf
    }

    pub fn truncated(&self, field: &'static str) -> DecodeError {
        DecodeError::Truncated {
            packet: self.packet,
            field,
        }
    }

    pub fn invalid(&self, field: &'static str, value: u64) -> DecodeError {
        DecodeError::Invalid {
            packet: self.packet,
            field,
            value,
        }
    }

    pub fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.truncated(field));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.bytes(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u24(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.bytes(3, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.bytes(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.bytes(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// A NUL-terminated string (the NUL is consumed, not returned).
    pub fn cstr(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let Some(nul) = self.buf.iter().position(|&b| b == 0) else {
            return Err(self.truncated(field));
        };
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    /// A NUL-terminated string, or the rest of the payload when it has no NUL (servers and
    /// clients disagree on whether some trailing strings are terminated).
    pub fn cstr_or_rest(&mut self) -> &'a [u8] {
        match self.buf.iter().position(|&b| b == 0) {
            Some(nul) => {
                let s = &self.buf[..nul];
                self.buf = &self.buf[nul + 1..];
                s
            }
            None => self.rest(),
        }
    }

    /// A length-encoded integer; `None` is the NULL marker 0xFB (only meaningful in rows).
    pub fn lenenc_or_null(&mut self, field: &'static str) -> Result<Option<u64>, DecodeError> {
        let first = self.u8(field)?;
        Ok(Some(match first {
            0..=0xFA => u64::from(first),
            0xFB => return Ok(None),
            0xFC => u64::from(self.u16(field)?),
            0xFD => u64::from(self.u24(field)?),
            0xFE => self.u64(field)?,
            0xFF => return Err(self.invalid(field, 0xFF)),
        }))
    }

    /// A length-encoded integer (0xFB, NULL, is invalid here).
    pub fn lenenc(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        match self.lenenc_or_null(field)? {
            Some(n) => Ok(n),
            None => Err(self.invalid(field, 0xFB)),
        }
    }

    /// A length-encoded string.
    pub fn lenenc_bytes(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.lenenc(field)?;
        let n = usize::try_from(n).map_err(|_| self.truncated(field))?;
        self.bytes(n, field)
    }

    /// A length-encoded string, or `None` for the NULL marker 0xFB (text rows).
    pub fn lenenc_bytes_or_null(
        &mut self,
        field: &'static str,
    ) -> Result<Option<&'a [u8]>, DecodeError> {
        let Some(n) = self.lenenc_or_null(field)? else {
            return Ok(None);
        };
        let n = usize::try_from(n).map_err(|_| self.truncated(field))?;
        Ok(Some(self.bytes(n, field)?))
    }
}

/// Decodes one length-encoded integer at the start of `buf`: the value (`None` for 0xFB) and the
/// bytes it took.
pub fn read_lenenc(buf: &[u8]) -> Result<(Option<u64>, usize), DecodeError> {
    let mut r = Reader::new("length-encoded integer", buf);
    let v = r.lenenc_or_null("value")?;
    Ok((v, buf.len() - r.remaining()))
}

/// Appends `n` as a length-encoded integer (shortest form).
pub fn put_lenenc(out: &mut impl BufMut, n: u64) {
    match n {
        0..=0xFA => out.put_u8(n as u8),
        0xFB..=0xFFFF => {
            out.put_u8(0xFC);
            out.put_u16_le(n as u16);
        }
        0x1_0000..=0xFF_FFFF => {
            out.put_u8(0xFD);
            let b = (n as u32).to_le_bytes();
            out.put_slice(&b[..3]);
        }
        _ => {
            out.put_u8(0xFE);
            out.put_u64_le(n);
        }
    }
}

/// Appends `s` as a length-encoded string.
pub fn put_lenenc_bytes(out: &mut impl BufMut, s: &[u8]) {
    put_lenenc(out, s.len() as u64);
    out.put_slice(s);
}

/// Appends `s` NUL-terminated (interior NULs dropped, so the field cannot be cut short).
pub fn put_cstr(out: &mut impl BufMut, s: &[u8]) {
    for &b in s {
        if b != 0 {
            out.put_u8(b);
        }
    }
    out.put_u8(0);
}

/// Bytes as text for a reader: UTF-8, lossy.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn raw(seq: u8, payload: &[u8]) -> Vec<u8> {
        packet(seq, payload).to_vec()
    }

    #[test]
    fn an_incomplete_header_or_payload_needs_more_bytes() {
        let p = raw(0, b"\x03select 1");
        for end in 0..p.len() {
            assert_eq!(packet_len(&p[..end], 1024), Ok(None), "prefix {end}");
            assert_eq!(Decoder::new(1024).decode(&p[..end]), Ok(None));
        }
        assert_eq!(packet_len(&p, 1024), Ok(Some(p.len())));
        let (n, got) = Decoder::new(1024).decode(&p).unwrap().unwrap();
        assert_eq!(n, p.len());
        assert_eq!(&*got.payload, b"\x03select 1");
    }

    #[test]
    fn a_packet_over_the_cap_is_an_error_before_its_payload_arrives() {
        let header = [0xFF, 0xFF, 0x7F, 0];
        assert_eq!(
            packet_len(&header, 1000),
            Err(PacketError::TooLong {
                len: 0x7F_FFFF,
                max: 1000
            })
        );
        let exact = raw(0, &[1; 100]);
        assert_eq!(packet_len(&exact, 100), Ok(Some(104)));
        assert!(packet_len(&exact, 99).is_err());
    }

    #[test]
    fn a_wrong_sequence_id_is_a_clear_error() {
        let p = raw(3, b"\x0e");
        let mut d = Decoder::new(1024);
        let e = d.decode(&p).unwrap_err();
        assert_eq!(
            e,
            PacketError::Sequence {
                expected: 0,
                got: 3
            }
        );
        assert_eq!(e.to_string(), "packet has sequence id 3, expected 0");
        // Following the server's replies: 1, 2, ... then a new command resets to 0.
        let mut d = Decoder::new(1024);
        d.expect(Some(1));
        assert!(
            d.decode(&raw(1, b"\x00\x00\x00\x02\x00\x00\x00"))
                .unwrap()
                .is_some()
        );
        assert_eq!(d.expected(), Some(2));
        assert!(d.decode(&raw(1, b"")).is_err());
        d.reset();
        assert!(d.decode(&raw(0, b"\x0e")).unwrap().is_some());
    }

    #[test]
    fn payloads_of_16_mib_and_more_are_split_and_reassembled() {
        for len in [MAX_CHUNK - 1, MAX_CHUNK, MAX_CHUNK + 5, 2 * MAX_CHUNK] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = BytesMut::new();
            let next = encode_packet(7, &payload, &mut wire);
            let chunks = len / MAX_CHUNK + 1;
            assert_eq!(wire.len(), len + HEADER_LEN * chunks, "len {len}");
            assert_eq!(next, 7 + chunks as u8);
            assert_eq!(packet_len(&wire, len), Ok(Some(wire.len())));
            assert!(packet_len(&wire, len - 1).is_err());
            // Missing the last byte (or the empty terminator chunk): need more.
            assert_eq!(packet_len(&wire[..wire.len() - 1], len), Ok(None));
            let mut d = Decoder::new(len);
            d.expect(Some(7));
            let (n, p) = d.decode(&wire).unwrap().unwrap();
            assert_eq!(n, wire.len());
            assert_eq!(p.seq, 7);
            assert_eq!(p.last_seq, 7 + chunks as u8 - 1);
            assert!(p.payload == payload, "len {len}");
            assert_eq!(d.expected(), Some(next));
        }
    }

    #[test]
    fn a_wrong_sequence_id_inside_a_split_packet_is_an_error() {
        let mut wire = packet(0, &vec![0u8; MAX_CHUNK + 1]).to_vec();
        wire[HEADER_LEN + MAX_CHUNK + 3] = 9;
        assert_eq!(
            Decoder::new(1 << 25).decode(&wire),
            Err(PacketError::Sequence {
                expected: 1,
                got: 9
            })
        );
    }

    #[test]
    fn packets_iterates_then_reports_a_partial_tail() {
        let mut buf = raw(0, b"\x0e");
        buf.extend(raw(1, b"\x00\x00\x00\x02\x00\x00\x00"));
        let two = buf.len();
        buf.extend(&raw(0, b"\x01")[..3]);
        assert_eq!(whole_packets(&buf, 1024), Ok(two));
        let got: Vec<_> = packets(&buf, 1024).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(&*got[0].as_ref().unwrap().payload, b"\x0e");
        assert_eq!(got[1].as_ref().unwrap().seq, 1);
        assert_eq!(got[2], Err(PacketError::Truncated { missing: 1 }));
    }

    #[test]
    fn lenenc_integers_round_trip_in_every_form() {
        for n in [
            0u64,
            250,
            251,
            0xFFFF,
            0x1_0000,
            0xFF_FFFF,
            0x100_0000,
            u64::MAX,
        ] {
            let mut b = BytesMut::new();
            put_lenenc(&mut b, n);
            let expected_len = match n {
                0..=250 => 1,
                251..=0xFFFF => 3,
                0x1_0000..=0xFF_FFFF => 4,
                _ => 9,
            };
            assert_eq!(b.len(), expected_len, "{n}");
            assert_eq!(read_lenenc(&b), Ok((Some(n), expected_len)));
            for end in 0..b.len() {
                assert!(read_lenenc(&b[..end]).is_err(), "{n} truncated at {end}");
            }
        }
        assert_eq!(read_lenenc(&[0xFB]), Ok((None, 1)));
        assert!(read_lenenc(&[0xFF]).is_err());
        let mut r = Reader::new("test", &[0xFB]);
        assert!(r.lenenc("n").is_err());
    }

    #[test]
    fn lenenc_strings_error_on_truncation() {
        let mut b = BytesMut::new();
        put_lenenc_bytes(&mut b, b"hello");
        assert_eq!(Reader::new("t", &b).lenenc_bytes("s"), Ok(&b"hello"[..]));
        for end in 0..b.len() {
            assert_eq!(
                Reader::new("t", &b[..end]).lenenc_bytes("s"),
                Err(DecodeError::Truncated {
                    packet: "t",
                    field: "s"
                })
            );
        }
        // A declared length beyond usize or the buffer is truncation, not a panic.
        let huge = [0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(Reader::new("t", &huge).lenenc_bytes("s").is_err());
        assert_eq!(
            Reader::new("t", &[0xFB]).lenenc_bytes_or_null("s"),
            Ok(None)
        );
    }
}
