//! The untyped packets a client sends before the typed message stream: SSLRequest,
//! GSSENCRequest, CancelRequest and the StartupMessage.
//!
//! ```text
//! +-----------+-----------+----------------------------------------------+
//! | len: i32  | code: i32 | payload (len - 8)                            |
//! +-----------+-----------+----------------------------------------------+
//! code 80877103 SSLRequest, 80877104 GSSENCRequest (no payload)
//! code 80877102 CancelRequest: pid i32, key i32
//! code 196608 (3.0) StartupMessage: key\0value\0 ... \0
//! ```
//!
//! Owns recognising and parsing those packets; never decides what to answer (the proxy does).
//! The length counts itself. Only protocol 3.0 is accepted (3.2 clients must opt in explicitly
//! and would need a NegotiateProtocolVersion answer, which sluice does not send yet). The
//! number of parameters is capped at [`MAX_PARAMS`]. PostgreSQL 17 clients may skip all this
//! and open TLS directly: see [`is_tls_client_hello`].
use thiserror::Error;

use super::frame::FrameError;

/// SSLRequest code.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// GSSENCRequest code.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// CancelRequest code.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol version 3.0, the only one accepted.
pub const PROTOCOL_3_0: i32 = 196_608;
/// Most parameters accepted in a StartupMessage.
pub const MAX_PARAMS: usize = 64;
/// Smallest valid startup packet: length and code.
pub const MIN_LEN: usize = 8;

/// Why a startup packet was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StartupError {
    #[error("startup packet declares {declared} bytes but {actual} were given")]
    LengthMismatch { declared: i64, actual: usize },
    #[error("unsupported frontend protocol {major}.{minor}: sluice speaks 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("{what} packet has {len} bytes, expected {expected}")]
    BadLength {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("startup parameters are not terminated by an empty name")]
    Unterminated,
    #[error("startup parameter {name:?} has no value")]
    MissingValue { name: String },
    #[error("startup packet has bytes after the terminating empty name")]
    TrailingBytes,
    #[error("startup parameter is not valid utf-8")]
    NotUtf8,
    #[error("startup packet has more than {max} parameters")]
    TooManyParams { max: usize },
}

/// A parsed startup packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        key: i32,
    },
    Startup {
        version: (u16, u16),
        params: Vec<(String, String)>,
    },
}

impl StartupPacket {
    /// The value of a StartupMessage parameter (`"user"`, `"database"`, ...).
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Whether the first byte a client sent opens a TLS handshake (PostgreSQL 17 direct SSL)
/// rather than a startup packet.
pub fn is_tls_client_hello(first_byte: u8) -> bool {
    first_byte == 0x16
}

/// Size of the startup packet at the start of `buf`, `Ok(None)` if not entirely buffered.
/// `max` caps it (keep it small, about 10 kB: the client is not authenticated yet).
pub fn startup_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([a, b, c, d]);
    let len = match usize::try_from(len) {
        Ok(n) if n >= MIN_LEN => n,
        _ => {
            return Err(FrameError::TooShort {
                len: i64::from(len),
                min: MIN_LEN,
            });
        }
    };
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok((buf.len() >= len).then_some(len))
}

/// Parses one whole startup packet (length field included, as delimited by [`startup_len`]).
pub fn parse_startup(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let (Some(&[a, b, c, d]), Some(&[e, f, g, h])) = (packet.get(..4), packet.get(4..8)) else {
        return Err(StartupError::BadLength {
            what: "startup",
            len: packet.len(),
            expected: MIN_LEN,
        });
    };
    let declared = i32::from_be_bytes([a, b, c, d]);
    if usize::try_from(declared).ok() != Some(packet.len()) {
        return Err(StartupError::LengthMismatch {
            declared: i64::from(declared),
            actual: packet.len(),
        });
    }
    let code = i32::from_be_bytes([e, f, g, h]);
    let payload = &packet[8..];
    let exact = |what: &'static str, expected: usize| {
        if packet.len() == expected {
            Ok(())
        } else {
            Err(StartupError::BadLength {
                what,
                len: packet.len(),
                expected,
            })
        }
    };
    match code {
        SSL_REQUEST_CODE => exact("SSLRequest", 8).map(|()| StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => exact("GSSENCRequest", 8).map(|()| StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            exact("CancelRequest", 16)?;
            let pid = i32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            let key = i32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
            Ok(StartupPacket::Cancel { pid, key })
        }
        PROTOCOL_3_0 => Ok(StartupPacket::Startup {
            version: (3, 0),
            params: parse_params(payload)?,
        }),
        other => {
            let v = other.to_be_bytes();
            Err(StartupError::UnsupportedVersion {
                major: u16::from_be_bytes([v[0], v[1]]),
                minor: u16::from_be_bytes([v[2], v[3]]),
            })
        }
    }
}

fn parse_params(mut payload: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let name = take_cstr(&mut payload)?.ok_or(StartupError::Unterminated)?;
        if name.is_empty() {
            if !payload.is_empty() {
                return Err(StartupError::TrailingBytes);
            }
            return Ok(params);
        }
        let value = take_cstr(&mut payload)?.ok_or_else(|| StartupError::MissingValue {
            name: name.to_owned(),
        })?;
        if params.len() == MAX_PARAMS {
            return Err(StartupError::TooManyParams { max: MAX_PARAMS });
        }
        params.push((name.to_owned(), value.to_owned()));
    }
}

/// Takes a NUL-terminated UTF-8 string off the front; `Ok(None)` if there is no NUL.
fn take_cstr<'a>(buf: &mut &'a [u8]) -> Result<Option<&'a str>, StartupError> {
    let Some(end) = buf.iter().position(|&b| b == 0) else {
        return Ok(None);
    };
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| StartupError::NotUtf8)?;
    *buf = &buf[end + 1..];
    Ok(Some(s))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn packet(code: i32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn ssl_gss_and_cancel_requests_are_recognised() {
        assert_eq!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let mut p = 1234i32.to_be_bytes().to_vec();
        p.extend_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, &p)),
            Ok(StartupPacket::Cancel { pid: 1234, key: -5 })
        );
        assert!(matches!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, &p[..4])),
            Err(StartupError::BadLength { .. })
        ));
        assert!(matches!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"x")),
            Err(StartupError::BadLength { .. })
        ));
    }

    #[test]
    fn startup_message_params_are_parsed_and_looked_up() {
        let p = packet(PROTOCOL_3_0, b"user\0alice\0database\0app\0\0");
        let s = parse_startup(&p).unwrap();
        assert_eq!(s.param("user"), Some("alice"));
        assert_eq!(s.param("database"), Some("app"));
        assert_eq!(s.param("options"), None);
        assert_eq!(
            parse_startup(&packet(PROTOCOL_3_0, b"\0")),
            Ok(StartupPacket::Startup {
                version: (3, 0),
                params: vec![]
            })
        );
    }

    #[test]
    fn other_protocol_versions_are_rejected_with_their_number() {
        let e = parse_startup(&packet(0x0003_0002, b"\0")).unwrap_err();
        assert_eq!(e, StartupError::UnsupportedVersion { major: 3, minor: 2 });
        assert_eq!(
            e.to_string(),
            "unsupported frontend protocol 3.2: sluice speaks 3.0"
        );
        assert!(matches!(
            parse_startup(&packet(0x0002_0000, b"\0")),
            Err(StartupError::UnsupportedVersion { major: 2, minor: 0 })
        ));
    }

    #[test]
    fn malformed_params_are_rejected() {
        for bad in [&b""[..], b"user\0", b"user\0alice\0", b"user", b"\0x"] {
            assert!(
                parse_startup(&packet(PROTOCOL_3_0, bad)).is_err(),
                "{bad:?}"
            );
        }
        let mut many = Vec::new();
        for i in 0..=MAX_PARAMS {
            many.extend_from_slice(format!("k{i}\0v\0").as_bytes());
        }
        many.push(0);
        assert_eq!(
            parse_startup(&packet(PROTOCOL_3_0, &many)),
            Err(StartupError::TooManyParams { max: MAX_PARAMS })
        );
    }

    #[test]
    fn startup_len_needs_the_whole_packet_and_caps_it() {
        let p = packet(PROTOCOL_3_0, b"user\0a\0\0");
        for end in 0..p.len() {
            assert_eq!(startup_len(&p[..end], 10_000), Ok(None));
        }
        assert_eq!(startup_len(&p, 10_000), Ok(Some(p.len())));
        assert!(matches!(
            startup_len(&p, 8),
            Err(FrameError::TooLong { .. })
        ));
        assert!(matches!(
            startup_len(&7i32.to_be_bytes(), 10_000),
            Err(FrameError::TooShort { .. })
        ));
        assert!(matches!(
            startup_len(&(-1i32).to_be_bytes(), 10_000),
            Err(FrameError::TooShort { .. })
        ));
        assert!(matches!(
            parse_startup(&p[..p.len() - 1]),
            Err(StartupError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn a_tls_client_hello_is_told_apart_from_a_startup_length() {
        assert!(is_tls_client_hello(0x16));
        assert!(!is_tls_client_hello(0x00));
    }
}
