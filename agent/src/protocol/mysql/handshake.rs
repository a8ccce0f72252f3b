//! The connection phase and the generic server replies: Initial Handshake v10, SSLRequest,
//! HandshakeResponse41, AuthSwitchRequest / AuthMoreData, and the OK / ERR / EOF packets.
//!
//! Each message decodes from one reassembled payload (see [`packet`](super::packet)) and
//! encodes to one payload; framing and sequence ids are the caller's. Capabilities are 64 bits:
//! the low 32 are MySQL's, the high 32 MariaDB's extended capabilities, which MariaDB carries in
//! the last 4 filler bytes of the handshake and of the client's response when the client does
//! not set `CLIENT_MYSQL` (bit 0, MySQL's `CLIENT_LONG_PASSWORD`).
//!
//! ```text
//! Handshake v10:  0x0a | server version\0 | conn id u32 | nonce[8] | 0 | caps lo u16 |
//!                 charset u8 | status u16 | caps hi u16 | nonce len u8 | 6 filler |
//!                 MariaDB caps u32 (or 4 filler) | nonce[max(13, len-8)] | plugin\0
//! Response41:     caps u32 | max packet u32 | charset u8 | 19 filler | MariaDB caps u32 |
//!                 user\0 | auth (lenenc / u8 len / \0) | [db\0] | [plugin\0] | [attrs]
//! SSLRequest:     the first 32 bytes of a Response41, with CLIENT_SSL
//! ```
//! Never panics on input; strings are decoded as UTF-8, lossy.
use bytes::{BufMut, BytesMut};

use super::packet::{DecodeError, Reader, put_cstr, put_lenenc, put_lenenc_bytes, text};

/// Capability flags, MySQL's (low 32 bits) and MariaDB's extended ones (high 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// MySQL: CLIENT_LONG_PASSWORD; MariaDB: CLIENT_MYSQL, "not MariaDB extended".
    pub const MYSQL: Self = Self(1);
    pub const FOUND_ROWS: Self = Self(1 << 1);
    pub const LONG_FLAG: Self = Self(1 << 2);
    pub const CONNECT_WITH_DB: Self = Self(1 << 3);
    pub const NO_SCHEMA: Self = Self(1 << 4);
    pub const COMPRESS: Self = Self(1 << 5);
    pub const ODBC: Self = Self(1 << 6);
    pub const LOCAL_FILES: Self = Self(1 << 7);
    pub const IGNORE_SPACE: Self = Self(1 << 8);
    pub const PROTOCOL_41: Self = Self(1 << 9);
    pub const INTERACTIVE: Self = Self(1 << 10);
    pub const SSL: Self = Self(1 << 11);
    pub const IGNORE_SIGPIPE: Self = Self(1 << 12);
    pub const TRANSACTIONS: Self = Self(1 << 13);
    pub const RESERVED: Self = Self(1 << 14);
    pub const SECURE_CONNECTION: Self = Self(1 << 15);
    pub const MULTI_STATEMENTS: Self = Self(1 << 16);
    pub const MULTI_RESULTS: Self = Self(1 << 17);
    pub const PS_MULTI_RESULTS: Self = Self(1 << 18);
    pub const PLUGIN_AUTH: Self = Self(1 << 19);
    pub const CONNECT_ATTRS: Self = Self(1 << 20);
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: Self = Self(1 << 21);
    pub const CAN_HANDLE_EXPIRED_PASSWORDS: Self = Self(1 << 22);
    pub const SESSION_TRACK: Self = Self(1 << 23);
    pub const DEPRECATE_EOF: Self = Self(1 << 24);
    pub const OPTIONAL_RESULTSET_METADATA: Self = Self(1 << 25);
    pub const ZSTD_COMPRESSION: Self = Self(1 << 26);
    pub const QUERY_ATTRIBUTES: Self = Self(1 << 27);
    pub const SSL_VERIFY_SERVER_CERT: Self = Self(1 << 30);
    pub const REMEMBER_OPTIONS: Self = Self(1 << 31);
    /// MariaDB: progress reports (ERR packets with code 0xFFFF that are not errors).
    pub const MARIADB_PROGRESS: Self = Self(1 << 32);
    pub const MARIADB_COM_MULTI: Self = Self(1 << 33);
    pub const MARIADB_STMT_BULK_OPERATIONS: Self = Self(1 << 34);
    /// MariaDB: column definitions carry extended type info (after `org_name`).
    pub const MARIADB_EXTENDED_TYPE_INFO: Self = Self(1 << 35);
    /// MariaDB: a column count may be followed by "metadata follows" (0/1).
    pub const MARIADB_CACHE_METADATA: Self = Self(1 << 36);
    pub const MARIADB_BULK_UNIT_RESULTS: Self = Self(1 << 37);

    pub const fn empty() -> Self {
        Self(0)
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn intersection(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// The low 32 bits (MySQL's).
    pub const fn lower(self) -> u32 {
        self.0 as u32
    }

    /// The high 32 bits (MariaDB's extended capabilities).
    pub const fn upper(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// What sluice offers a client, and asks of a backend, by default: protocol 4.1 with
    /// plugin auth, TLS, transactions, multi-statements and multi-results, DEPRECATE_EOF.
    /// Never compression, never LOCAL INFILE.
    pub const fn sluice_default() -> Self {
        Self(
            Self::LONG_FLAG.0
                | Self::CONNECT_WITH_DB.0
                | Self::PROTOCOL_41.0
                | Self::SSL.0
                | Self::TRANSACTIONS.0
                | Self::SECURE_CONNECTION.0
                | Self::MULTI_STATEMENTS.0
                | Self::MULTI_RESULTS.0
                | Self::PS_MULTI_RESULTS.0
                | Self::PLUGIN_AUTH.0
                | Self::PLUGIN_AUTH_LENENC_CLIENT_DATA.0
                | Self::DEPRECATE_EOF.0,
        )
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl std::ops::BitAnd for Capabilities {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        self.intersection(rhs)
    }
}

/// Server status flags (OK / EOF packets).
pub mod status {
    pub const IN_TRANS: u16 = 0x0001;
    pub const AUTOCOMMIT: u16 = 0x0002;
    pub const MORE_RESULTS_EXISTS: u16 = 0x0008;
    pub const CURSOR_EXISTS: u16 = 0x0040;
    pub const LAST_ROW_SENT: u16 = 0x0080;
    pub const PS_OUT_PARAMS: u16 = 0x1000;
    pub const SESSION_STATE_CHANGED: u16 = 0x4000;
}

/// Length of the scramble (nonce) both native and caching_sha2 passwords use.
pub const NONCE_LEN: usize = 20;

/// The server's first packet, Initial Handshake v10.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub server_version: String,
    pub connection_id: u32,
    /// The auth plugin data (the nonce), without the trailing NUL servers append.
    pub nonce: Vec<u8>,
    pub capabilities: Capabilities,
    pub charset: u8,
    pub status: u16,
    /// The server's default auth plugin (empty when it does not speak PLUGIN_AUTH).
    pub auth_plugin: String,
}

/// Decodes an Initial Handshake v10 (as a client). Protocol versions other than 10 are refused.
pub fn parse_handshake(payload: &[u8]) -> Result<Handshake, DecodeError> {
    let mut r = Reader::new("handshake", payload);
    let version = r.u8("protocol version")?;
    if version != 10 {
        return Err(r.invalid("protocol version", u64::from(version)));
    }
    let server_version = text(r.cstr("server version")?);
    let connection_id = r.u32("connection id")?;
    let mut nonce = r.bytes(8, "auth plugin data")?.to_vec();
    r.u8("filler")?;
    let lo = u64::from(r.u16("capability flags")?);
    let mut h = Handshake {
        server_version,
        connection_id,
        nonce: Vec::new(),
        capabilities: Capabilities(lo),
        charset: 0,
        status: 0,
        auth_plugin: String::new(),
    };
    if r.is_empty() {
        h.nonce = nonce;
        return Ok(h);
    }
    h.charset = r.u8("character set")?;
    h.status = r.u16("status flags")?;
    let hi = u64::from(r.u16("capability flags")?);
    let data_len = r.u8("auth plugin data length")?;
    r.bytes(6, "filler")?;
    let mariadb = u64::from(r.u32("extended capabilities")?);
    let mut caps = lo | hi << 16;
    if caps & Capabilities::MYSQL.0 == 0 {
        caps |= mariadb << 32;
    }
    h.capabilities = Capabilities(caps);
    if h.capabilities.contains(Capabilities::SECURE_CONNECTION) {
        let n = usize::from(data_len).saturating_sub(8).max(13);
        let part2 = r.bytes(n.min(r.remaining()), "auth plugin data")?;
        nonce.extend_from_slice(part2);
    }
    if nonce.len() > NONCE_LEN && nonce.last() == Some(&0) {
        nonce.pop();
    }
    h.nonce = nonce;
    if h.capabilities.contains(Capabilities::PLUGIN_AUTH) {
        h.auth_plugin = text(r.cstr_or_rest());
    }
    Ok(h)
}

impl Handshake {
    /// Encodes the handshake (as a server). The nonce should be 20 bytes (it is sent as
    /// 8 + 12 bytes plus a NUL, as servers do). MariaDB extended capabilities are sent in the
    /// filler when `CLIENT_MYSQL` is not among the capabilities.
    pub fn encode(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(96);
        out.put_u8(10);
        put_cstr(&mut out, self.server_version.as_bytes());
        out.put_u32_le(self.connection_id);
        let mut part1 = [0u8; 8];
        for (d, s) in part1.iter_mut().zip(&self.nonce) {
            *d = *s;
        }
        out.put_slice(&part1);
        out.put_u8(0);
        let caps = self.capabilities;
        out.put_u16_le(caps.lower() as u16);
        out.put_u8(self.charset);
        out.put_u16_le(self.status);
        out.put_u16_le((caps.lower() >> 16) as u16);
        let plugin = caps.contains(Capabilities::PLUGIN_AUTH);
        let rest = self.nonce.get(8..).unwrap_or_default();
        out.put_u8(if plugin {
            (8 + rest.len() + 1) as u8
        } else {
            0
        });
        out.put_slice(&[0; 6]);
        if caps.contains(Capabilities::MYSQL) {
            out.put_u32_le(0);
        } else {
            out.put_u32_le(caps.upper());
        }
        if caps.contains(Capabilities::SECURE_CONNECTION) {
            // At least 13 bytes: the rest of the nonce, NUL-terminated, zero-padded.
            out.put_slice(rest);
            out.put_u8(0);
            for _ in rest.len() + 1..13 {
                out.put_u8(0);
            }
        }
        if plugin {
            put_cstr(&mut out, self.auth_plugin.as_bytes());
        }
        out
    }
}

/// What a client sends after the handshake: an SSLRequest (TLS comes next) or its
/// HandshakeResponse41.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHandshake {
    SslRequest {
        capabilities: Capabilities,
        max_packet: u32,
        charset: u8,
    },
    Response(HandshakeResponse),
}

/// HandshakeResponse41: who the client is and its first auth response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeResponse {
    pub capabilities: Capabilities,
    pub max_packet: u32,
    pub charset: u8,
    pub username: String,
    pub auth_response: Vec<u8>,
    pub database: Option<String>,
    pub auth_plugin: Option<String>,
    pub attributes: Vec<(String, String)>,
}

/// True when `payload` is an SSLRequest: exactly the 32-byte fixed part of a response, with
/// CLIENT_SSL.
pub fn is_ssl_request(payload: &[u8]) -> bool {
    payload.len() == 32
        && payload
            .get(..4)
            .is_some_and(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x800 != 0)
}

/// Decodes the client's answer to the handshake (as a server). Pre-4.1 clients are refused.
pub fn parse_client_handshake(payload: &[u8]) -> Result<ClientHandshake, DecodeError> {
    let mut r = Reader::new("handshake response", payload);
    let lo = r.u32("capability flags")?;
    if lo & Capabilities::PROTOCOL_41.lower() == 0 {
        return Err(r.invalid("capability flags (no CLIENT_PROTOCOL_41)", u64::from(lo)));
    }
    let max_packet = r.u32("max packet size")?;
    let charset = r.u8("character set")?;
    r.bytes(19, "filler")?;
    let mariadb = r.u32("extended capabilities")?;
    let mut caps = u64::from(lo);
    if caps & Capabilities::MYSQL.0 == 0 {
        caps |= u64::from(mariadb) << 32;
    }
    let capabilities = Capabilities(caps);
    if r.is_empty() && capabilities.contains(Capabilities::SSL) {
        return Ok(ClientHandshake::SslRequest {
            capabilities,
            max_packet,
            charset,
        });
    }
    let username = text(r.cstr("username")?);
    let auth_response = if capabilities.contains(Capabilities::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
        r.lenenc_bytes("auth response")?
    } else if capabilities.contains(Capabilities::SECURE_CONNECTION) {
        let n = r.u8("auth response length")?;
        r.bytes(usize::from(n), "auth response")?
    } else {
        r.cstr("auth response")?
    }
    .to_vec();
    let mut resp = HandshakeResponse {
        capabilities,
        max_packet,
        charset,
        username,
        auth_response,
        ..HandshakeResponse::default()
    };
    if capabilities.contains(Capabilities::CONNECT_WITH_DB) && !r.is_empty() {
        resp.database = Some(text(r.cstr_or_rest()));
    }
    if capabilities.contains(Capabilities::PLUGIN_AUTH) && !r.is_empty() {
        resp.auth_plugin = Some(text(r.cstr_or_rest()));
    }
    if capabilities.contains(Capabilities::CONNECT_ATTRS) && !r.is_empty() {
        resp.attributes = read_attributes(&mut r)?;
    }
    Ok(ClientHandshake::Response(resp))
}

fn put_fixed_part(out: &mut BytesMut, caps: Capabilities, max_packet: u32, charset: u8) {
    out.put_u32_le(caps.lower());
    out.put_u32_le(max_packet);
    out.put_u8(charset);
    out.put_slice(&[0; 19]);
    if caps.contains(Capabilities::MYSQL) {
        out.put_u32_le(0);
    } else {
        out.put_u32_le(caps.upper());
    }
}

/// An SSLRequest payload (as a client): `capabilities` must include CLIENT_SSL.
pub fn ssl_request(capabilities: Capabilities, max_packet: u32, charset: u8) -> BytesMut {
    let mut out = BytesMut::with_capacity(32);
    put_fixed_part(
        &mut out,
        capabilities | Capabilities::SSL,
        max_packet,
        charset,
    );
    out
}

impl HandshakeResponse {
    /// Encodes the response (as a client), honouring its capabilities for the auth response
    /// form and the optional fields.
    pub fn encode(&self) -> BytesMut {
        let caps = self.capabilities;
        let mut out = BytesMut::with_capacity(64 + self.auth_response.len());
        put_fixed_part(&mut out, caps, self.max_packet, self.charset);
        put_cstr(&mut out, self.username.as_bytes());
        if caps.contains(Capabilities::PLUGIN_AUTH_LENENC_CLIENT_DATA) {
            put_lenenc_bytes(&mut out, &self.auth_response);
        } else if caps.contains(Capabilities::SECURE_CONNECTION) {
            let n = self.auth_response.len().min(255);
            out.put_u8(n as u8);
            out.put_slice(&self.auth_response[..n]);
        } else {
            put_cstr(&mut out, &self.auth_response);
        }
        if caps.contains(Capabilities::CONNECT_WITH_DB) {
            put_cstr(&mut out, self.database.as_deref().unwrap_or("").as_bytes());
        }
        if caps.contains(Capabilities::PLUGIN_AUTH) {
            put_cstr(
                &mut out,
                self.auth_plugin.as_deref().unwrap_or("").as_bytes(),
            );
        }
        if caps.contains(Capabilities::CONNECT_ATTRS) {
            put_attributes(&mut out, &self.attributes);
        }
        out
    }
}

/// Connection attributes (CLIENT_CONNECT_ATTRS): a length-encoded block of name/value pairs.
fn read_attributes(r: &mut Reader<'_>) -> Result<Vec<(String, String)>, DecodeError> {
    let attrs = r.lenenc_bytes("connection attributes")?;
    let mut a = Reader::new("connection attributes", attrs);
    let mut out = Vec::new();
    while !a.is_empty() {
        let k = text(a.lenenc_bytes("attribute name")?);
        let v = text(a.lenenc_bytes("attribute value")?);
        out.push((k, v));
    }
    Ok(out)
}

fn put_attributes(out: &mut BytesMut, attributes: &[(String, String)]) {
    let mut attrs = BytesMut::new();
    for (k, v) in attributes {
        put_lenenc_bytes(&mut attrs, k.as_bytes());
        put_lenenc_bytes(&mut attrs, v.as_bytes());
    }
    put_lenenc_bytes(out, &attrs);
}

impl HandshakeResponse {
    /// The payload of this response with its auth response emptied: the copy a journal may
    /// keep (a native or caching_sha2 scramble and the greeting's nonce are enough to guess
    /// the password offline; a clear-password response *is* the password or token).
    pub fn without_credentials(&self) -> BytesMut {
        HandshakeResponse {
            auth_response: Vec::new(),
            ..self.clone()
        }
        .encode()
    }
}

/// COM_CHANGE_USER (0x11): log in again as `user` on the same connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangeUser {
    pub user: String,
    pub auth_response: Vec<u8>,
    pub database: String,
    /// Absent in the oldest form (no bytes after the database).
    pub charset: Option<u16>,
    pub auth_plugin: Option<String>,
    pub attributes: Vec<(String, String)>,
}

/// Decodes a COM_CHANGE_USER payload (with its 0x11 command byte) under `caps`.
pub fn parse_change_user(payload: &[u8], caps: Capabilities) -> Result<ChangeUser, DecodeError> {
    let mut r = Reader::new("COM_CHANGE_USER", payload);
    let command = r.u8("command")?;
    if command != 0x11 {
        return Err(r.invalid("command", u64::from(command)));
    }
    let user = text(r.cstr("user")?);
    let auth_response = if caps.contains(Capabilities::SECURE_CONNECTION) {
        let n = r.u8("auth response length")?;
        r.bytes(usize::from(n), "auth response")?
    } else {
        r.cstr("auth response")?
    }
    .to_vec();
    let mut c = ChangeUser {
        user,
        auth_response,
        database: if r.is_empty() {
            String::new()
        } else {
            text(r.cstr_or_rest())
        },
        ..ChangeUser::default()
    };
    if r.remaining() >= 2 {
        c.charset = Some(r.u16("character set")?);
        if caps.contains(Capabilities::PLUGIN_AUTH) && !r.is_empty() {
            c.auth_plugin = Some(text(r.cstr_or_rest()));
        }
        if caps.contains(Capabilities::CONNECT_ATTRS) && !r.is_empty() {
            c.attributes = read_attributes(&mut r)?;
        }
    }
    Ok(c)
}

impl ChangeUser {
    /// Encodes the command (as a client) under `caps`.
    pub fn encode(&self, caps: Capabilities) -> BytesMut {
        let mut out = BytesMut::with_capacity(64 + self.auth_response.len());
        out.put_u8(0x11);
        put_cstr(&mut out, self.user.as_bytes());
        if caps.contains(Capabilities::SECURE_CONNECTION) {
            let n = self.auth_response.len().min(255);
            out.put_u8(n as u8);
            out.put_slice(&self.auth_response[..n]);
        } else {
            put_cstr(&mut out, &self.auth_response);
        }
        put_cstr(&mut out, self.database.as_bytes());
        if let Some(charset) = self.charset {
            out.put_u16_le(charset);
            if caps.contains(Capabilities::PLUGIN_AUTH) {
                put_cstr(
                    &mut out,
                    self.auth_plugin.as_deref().unwrap_or("").as_bytes(),
                );
            }
            if caps.contains(Capabilities::CONNECT_ATTRS) {
                put_attributes(&mut out, &self.attributes);
            }
        }
        out
    }

    /// The payload with its auth response emptied: the copy a journal may keep.
    pub fn without_credentials(&self, caps: Capabilities) -> BytesMut {
        ChangeUser {
            auth_response: Vec::new(),
            ..self.clone()
        }
        .encode(caps)
    }
}

/// AuthSwitchRequest (0xFE): the server asks for another auth plugin with new data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSwitch {
    pub plugin: String,
    /// The plugin's data, usually a fresh nonce; the trailing NUL servers append is removed.
    pub data: Vec<u8>,
}

impl AuthSwitch {
    pub fn encode(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(32 + self.data.len());
        out.put_u8(0xFE);
        put_cstr(&mut out, self.plugin.as_bytes());
        out.put_slice(&self.data);
        out.put_u8(0);
        out
    }
}

/// An OK packet (header 0x00, or 0xFE where it ends a result set under DEPRECATE_EOF).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OkPacket {
    pub affected_rows: u64,
    pub last_insert_id: u64,
    pub status: u16,
    pub warnings: u16,
    pub info: String,
    /// Raw session state change information (SESSION_TRACK), undecoded.
    pub session_state: Vec<u8>,
}

/// Decodes an OK packet with header 0x00 or 0xFE.
pub fn parse_ok(payload: &[u8], caps: Capabilities) -> Result<OkPacket, DecodeError> {
    let mut r = Reader::new("OK", payload);
    let header = r.u8("header")?;
    if header != 0x00 && header != 0xFE {
        return Err(r.invalid("header", u64::from(header)));
    }
    let mut ok = OkPacket {
        affected_rows: r.lenenc("affected rows")?,
        last_insert_id: r.lenenc("last insert id")?,
        ..OkPacket::default()
    };
    if caps.contains(Capabilities::PROTOCOL_41) {
        ok.status = r.u16("status flags")?;
        ok.warnings = r.u16("warnings")?;
    } else if caps.contains(Capabilities::TRANSACTIONS) {
        ok.status = r.u16("status flags")?;
    }
    if r.is_empty() {
        return Ok(ok);
    }
    if caps.contains(Capabilities::SESSION_TRACK) {
        ok.info = text(r.lenenc_bytes("info")?);
        if ok.status & status::SESSION_STATE_CHANGED != 0 && !r.is_empty() {
            ok.session_state = r.lenenc_bytes("session state")?.to_vec();
        }
    } else {
        ok.info = text(r.rest());
    }
    Ok(ok)
}

impl OkPacket {
    /// Encodes with `header` (0x00, or 0xFE to end a result set under DEPRECATE_EOF).
    pub fn encode(&self, header: u8, caps: Capabilities) -> BytesMut {
        let mut out = BytesMut::with_capacity(16 + self.info.len());
        out.put_u8(header);
        put_lenenc(&mut out, self.affected_rows);
        put_lenenc(&mut out, self.last_insert_id);
        out.put_u16_le(self.status);
        out.put_u16_le(self.warnings);
        if caps.contains(Capabilities::SESSION_TRACK) {
            if !self.info.is_empty() || self.status & status::SESSION_STATE_CHANGED != 0 {
                put_lenenc_bytes(&mut out, self.info.as_bytes());
            }
            if self.status & status::SESSION_STATE_CHANGED != 0 {
                put_lenenc_bytes(&mut out, &self.session_state);
            }
        } else {
            out.put_slice(self.info.as_bytes());
        }
        out
    }
}

/// An ERR packet (0xFF).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrPacket {
    /// The MySQL error number (1045, 1146, ...).
    pub code: u16,
    /// The SQLSTATE after the `#` marker (protocol 4.1); `HY000` when absent.
    pub sql_state: String,
    pub message: String,
}

/// MariaDB's ERR code for a progress report (not an error) under MARIADB_CLIENT_PROGRESS.
pub const PROGRESS_REPORT: u16 = 0xFFFF;

/// Decodes an ERR packet.
pub fn parse_err(payload: &[u8]) -> Result<ErrPacket, DecodeError> {
    let mut r = Reader::new("ERR", payload);
    let header = r.u8("header")?;
    if header != 0xFF {
        return Err(r.invalid("header", u64::from(header)));
    }
    let code = r.u16("error code")?;
    let mut sql_state = "HY000".to_owned();
    if r.peek_rest().first() == Some(&b'#') && r.remaining() >= 6 {
        r.u8("sql state marker")?;
        sql_state = text(r.bytes(5, "sql state")?);
    }
    Ok(ErrPacket {
        code,
        sql_state,
        message: text(r.rest()),
    })
}

impl ErrPacket {
    pub fn new(code: u16, sql_state: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            sql_state: sql_state.to_owned(),
            message: message.into(),
        }
    }

    /// Encodes with the SQLSTATE marker (protocol 4.1); a SQLSTATE that is not 5 ASCII
    /// characters is sent as HY000.
    pub fn encode(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(9 + self.message.len());
        out.put_u8(0xFF);
        out.put_u16_le(self.code);
        out.put_u8(b'#');
        let state = self.sql_state.as_bytes();
        if state.len() == 5 && state.is_ascii() {
            out.put_slice(state);
        } else {
            out.put_slice(b"HY000");
        }
        out.put_slice(self.message.as_bytes());
        out
    }
}

/// An EOF packet (0xFE, payload shorter than 9 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EofPacket {
    pub warnings: u16,
    pub status: u16,
}

/// True when a 0xFE packet of this payload is an EOF (or an OK ending a result set) and not a
/// text row whose first value is 16 MiB or longer.
pub fn is_eof_or_ok_fe(payload: &[u8]) -> bool {
    payload.first() == Some(&0xFE) && payload.len() < super::packet::MAX_CHUNK
}

/// Decodes an EOF packet.
pub fn parse_eof(payload: &[u8]) -> Result<EofPacket, DecodeError> {
    let mut r = Reader::new("EOF", payload);
    let header = r.u8("header")?;
    if header != 0xFE {
        return Err(r.invalid("header", u64::from(header)));
    }
    if r.is_empty() {
        // Pre-4.1 servers send a bare 0xFE.
        return Ok(EofPacket::default());
    }
    Ok(EofPacket {
        warnings: r.u16("warnings")?,
        status: r.u16("status flags")?,
    })
}

impl EofPacket {
    pub fn encode(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(5);
        out.put_u8(0xFE);
        out.put_u16_le(self.warnings);
        out.put_u16_le(self.status);
        out
    }
}

/// The status flags of a 0xFE packet that ends a result set, EOF or OK, under `caps`.
pub fn terminator_status(payload: &[u8], caps: Capabilities) -> Result<u16, DecodeError> {
    if caps.contains(Capabilities::DEPRECATE_EOF) && payload.len() > 5 {
        Ok(parse_ok(payload, caps)?.status)
    } else {
        Ok(parse_eof(payload)?.status)
    }
}

/// What a server sends during authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply<'a> {
    Ok(OkPacket),
    Err(ErrPacket),
    /// AuthSwitchRequest: use another plugin with this data.
    Switch(AuthSwitch),
    /// AuthMoreData (0x01): plugin-specific data (caching_sha2: 0x03 fast auth succeeded,
    /// 0x04 full auth needed, or a PEM public key).
    MoreData(&'a [u8]),
}

/// Decodes a server packet of the authentication phase.
pub fn parse_auth_reply(payload: &[u8], caps: Capabilities) -> Result<AuthReply<'_>, DecodeError> {
    match payload.first() {
        Some(0x00) => Ok(AuthReply::Ok(parse_ok(payload, caps)?)),
        Some(0xFF) => Ok(AuthReply::Err(parse_err(payload)?)),
        Some(0x01) => Ok(AuthReply::MoreData(&payload[1..])),
        Some(0xFE) => {
            let mut r = Reader::new("auth switch request", &payload[1..]);
            if r.is_empty() {
                // The old "use the pre-4.1 password" request: a switch without a plugin name.
                return Ok(AuthReply::Switch(AuthSwitch {
                    plugin: "mysql_old_password".to_owned(),
                    data: Vec::new(),
                }));
            }
            let plugin = text(r.cstr("plugin name")?);
            let mut data = r.rest().to_vec();
            if data.last() == Some(&0) {
                data.pop();
            }
            Ok(AuthReply::Switch(AuthSwitch { plugin, data }))
        }
        Some(&other) => Err(DecodeError::Invalid {
            packet: "auth reply",
            field: "header",
            value: u64::from(other),
        }),
        None => Err(DecodeError::Empty {
            packet: "auth reply",
        }),
    }
}

/// AuthMoreData (0x01 + data), e.g. the caching_sha2 0x03 / 0x04 states.
pub fn auth_more_data(data: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(1 + data.len());
    out.put_u8(0x01);
    out.put_slice(data);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn change_user_round_trips_and_its_journal_copy_has_no_auth_response() {
        let caps = Capabilities::sluice_default() | Capabilities::CONNECT_ATTRS;
        let c = ChangeUser {
            user: "app_ro".into(),
            auth_response: b"0123456789abcdefghij".to_vec(),
            database: "shop".into(),
            charset: Some(45),
            auth_plugin: Some("mysql_native_password".into()),
            attributes: vec![("_client_name".into(), "libmariadb".into())],
        };
        let wire = c.encode(caps);
        assert_eq!(parse_change_user(&wire, caps).unwrap(), c);
        let copy = parse_change_user(&c.without_credentials(caps), caps).unwrap();
        assert!(copy.auth_response.is_empty());
        assert_eq!(
            (copy.user.as_str(), copy.database.as_str()),
            ("app_ro", "shop")
        );
        // The oldest form: user, auth response, database and nothing after.
        let old = ChangeUser {
            charset: None,
            auth_plugin: None,
            attributes: Vec::new(),
            ..c
        };
        assert_eq!(parse_change_user(&old.encode(caps), caps).unwrap(), old);
        for cut in 0..wire.len() {
            let _ = parse_change_user(&wire[..cut], caps);
        }
        assert!(parse_change_user(b"\x03select 1", caps).is_err());
    }

    /// Shaped like MariaDB 10.11's greeting: extended capabilities in the filler.
    const MARIADB_GREETING: &[u8] = b"\x0a5.5.5-10.11.19-MariaDB-0+deb12u1\0\x05\0\0\0\
        ab&cd(ef\0\xfe\xf7\x2d\x02\0\xff\x81\x15\0\0\0\0\0\0\x1d\0\0\0\
        ghijklmnopqr\0mysql_native_password\0";

    #[test]
    fn a_mariadb_greeting_parses_with_its_extended_capabilities() {
        let h = parse_handshake(MARIADB_GREETING).unwrap();
        assert_eq!(h.server_version, "5.5.5-10.11.19-MariaDB-0+deb12u1");
        assert_eq!(h.connection_id, 5);
        assert_eq!(h.nonce, b"ab&cd(efghijklmnopqr");
        assert_eq!(h.charset, 0x2d);
        assert_eq!(h.status, 2);
        assert!(!h.capabilities.contains(Capabilities::MYSQL));
        assert!(h.capabilities.contains(Capabilities::PLUGIN_AUTH));
        assert!(h.capabilities.contains(Capabilities::DEPRECATE_EOF));
        assert!(
            h.capabilities
                .contains(Capabilities::MARIADB_EXTENDED_TYPE_INFO)
        );
        assert!(
            h.capabilities
                .contains(Capabilities::MARIADB_CACHE_METADATA)
        );
        assert_eq!(h.auth_plugin, "mysql_native_password");
        // Round trip.
        assert_eq!(parse_handshake(&h.encode()).unwrap(), h);
    }

    #[test]
    fn sluice_builds_a_handshake_clients_can_parse() {
        let h = Handshake {
            server_version: "8.0.0-sluice".into(),
            connection_id: 42,
            nonce: (1..=20).collect(),
            capabilities: Capabilities::sluice_default(),
            charset: 45,
            status: status::AUTOCOMMIT,
            auth_plugin: "mysql_clear_password".into(),
        };
        let wire = h.encode();
        let back = parse_handshake(&wire).unwrap();
        assert_eq!(back, h);
        assert!(!back.capabilities.contains(Capabilities::COMPRESS));
        assert!(!back.capabilities.contains(Capabilities::LOCAL_FILES));
        for end in 0..wire.len() - 1 {
            // Any truncation is an error or a shorter handshake, never a panic.
            let _ = parse_handshake(&wire[..end]);
        }
    }

    #[test]
    fn a_protocol_version_other_than_10_is_refused() {
        let mut g = MARIADB_GREETING.to_vec();
        g[0] = 9;
        assert!(parse_handshake(&g).is_err());
        assert!(parse_handshake(b"").is_err());
    }

    #[test]
    fn responses_and_ssl_requests_round_trip() {
        let caps = Capabilities::sluice_default() | Capabilities::CONNECT_ATTRS;
        let ssl = ssl_request(caps, 1 << 24, 45);
        assert_eq!(ssl.len(), 32);
        assert!(is_ssl_request(&ssl));
        assert_eq!(
            parse_client_handshake(&ssl).unwrap(),
            ClientHandshake::SslRequest {
                capabilities: caps,
                max_packet: 1 << 24,
                charset: 45
            }
        );
        let resp = HandshakeResponse {
            capabilities: caps,
            max_packet: 1 << 24,
            charset: 45,
            username: "app".into(),
            auth_response: vec![7; 20],
            database: Some("shop".into()),
            auth_plugin: Some("mysql_native_password".into()),
            attributes: vec![("_client_name".into(), "libmariadb".into())],
        };
        let wire = resp.encode();
        assert!(!is_ssl_request(&wire));
        assert_eq!(
            parse_client_handshake(&wire).unwrap(),
            ClientHandshake::Response(resp.clone())
        );
        // The one-byte length form (no PLUGIN_AUTH_LENENC_CLIENT_DATA).
        let old = HandshakeResponse {
            capabilities: caps.without(Capabilities::PLUGIN_AUTH_LENENC_CLIENT_DATA),
            ..resp
        };
        assert_eq!(
            parse_client_handshake(&old.encode()).unwrap(),
            ClientHandshake::Response(old)
        );
    }

    #[test]
    fn a_response_without_credentials_keeps_everything_but_the_auth_response() {
        let resp = HandshakeResponse {
            capabilities: Capabilities::sluice_default() | Capabilities::CONNECT_ATTRS,
            max_packet: 1 << 24,
            charset: 45,
            username: "app".into(),
            auth_response: b"eyJ-a-token".to_vec(),
            database: Some("shop".into()),
            auth_plugin: Some("mysql_clear_password".into()),
            attributes: vec![("_os".into(), "Linux".into())],
        };
        let journaled = resp.without_credentials();
        assert!(!journaled.windows(4).any(|w| w == b"eyJ-"));
        let ClientHandshake::Response(back) = parse_client_handshake(&journaled).unwrap() else {
            panic!("not a response")
        };
        assert_eq!(
            back,
            HandshakeResponse {
                auth_response: Vec::new(),
                ..resp
            }
        );
    }

    #[test]
    fn a_mariadb_client_sends_extended_capabilities_in_the_filler() {
        let caps = Capabilities::sluice_default() | Capabilities::MARIADB_CACHE_METADATA;
        let resp = HandshakeResponse {
            capabilities: caps,
            username: "u".into(),
            ..HandshakeResponse::default()
        };
        let ClientHandshake::Response(back) = parse_client_handshake(&resp.encode()).unwrap()
        else {
            panic!("not a response")
        };
        assert!(
            back.capabilities
                .contains(Capabilities::MARIADB_CACHE_METADATA)
        );
        // With CLIENT_MYSQL the filler is not read as capabilities.
        let mut wire = resp.encode().to_vec();
        wire[0] |= 1;
        let ClientHandshake::Response(back) = parse_client_handshake(&wire).unwrap() else {
            panic!("not a response")
        };
        assert_eq!(back.capabilities.upper(), 0);
    }

    #[test]
    fn a_pre_41_client_is_refused() {
        let mut wire = ssl_request(Capabilities::SSL, 0, 8).to_vec();
        wire[1] &= !0x02;
        assert!(parse_client_handshake(&wire).is_err());
    }

    #[test]
    fn ok_err_and_eof_round_trip() {
        let caps = Capabilities::sluice_default();
        let ok = OkPacket {
            affected_rows: 3,
            last_insert_id: 300,
            status: status::AUTOCOMMIT,
            warnings: 1,
            info: "Rows matched: 3  Changed: 3  Warnings: 1".into(),
            session_state: Vec::new(),
        };
        assert_eq!(parse_ok(&ok.encode(0, caps), caps).unwrap(), ok);
        let fe = ok.encode(0xFE, caps);
        assert!(is_eof_or_ok_fe(&fe));
        assert_eq!(terminator_status(&fe, caps).unwrap(), status::AUTOCOMMIT);
        let tracked = caps | Capabilities::SESSION_TRACK;
        let ok2 = OkPacket {
            status: status::SESSION_STATE_CHANGED,
            session_state: b"\x00\x05\x04abcd".to_vec(),
            ..OkPacket::default()
        };
        assert_eq!(parse_ok(&ok2.encode(0, tracked), tracked).unwrap(), ok2);

        let err = ErrPacket::new(1146, "42S02", "Table 'shop.nope' doesn't exist");
        let wire = err.encode();
        assert_eq!(&wire[..9], b"\xff\x7a\x04#42S02");
        assert_eq!(parse_err(&wire).unwrap(), err);
        // Without the marker (errors sent before the handshake completes).
        let bare = parse_err(b"\xff\x10\x04Too many connections").unwrap();
        assert_eq!(bare.code, 1040);
        assert_eq!(bare.sql_state, "HY000");
        assert_eq!(bare.message, "Too many connections");

        let eof = EofPacket {
            warnings: 0,
            status: status::MORE_RESULTS_EXISTS,
        };
        assert_eq!(parse_eof(&eof.encode()).unwrap(), eof);
        assert_eq!(
            terminator_status(&eof.encode(), caps.without(Capabilities::DEPRECATE_EOF)).unwrap(),
            status::MORE_RESULTS_EXISTS
        );
    }

    #[test]
    fn auth_replies_are_classified() {
        let caps = Capabilities::sluice_default();
        let sw = AuthSwitch {
            plugin: "mysql_native_password".into(),
            data: (1..=20).collect(),
        };
        assert_eq!(
            parse_auth_reply(&sw.encode(), caps).unwrap(),
            AuthReply::Switch(sw)
        );
        assert_eq!(
            parse_auth_reply(&auth_more_data(&[3]), caps).unwrap(),
            AuthReply::MoreData(&[3])
        );
        assert!(matches!(
            parse_auth_reply(&OkPacket::default().encode(0, caps), caps).unwrap(),
            AuthReply::Ok(_)
        ));
        assert!(matches!(
            parse_auth_reply(&ErrPacket::new(1045, "28000", "denied").encode(), caps).unwrap(),
            AuthReply::Err(_)
        ));
        assert!(parse_auth_reply(b"", caps).is_err());
        assert!(parse_auth_reply(b"\x02", caps).is_err());
    }
}
