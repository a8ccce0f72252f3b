//! Packet payloads the codec's and the proxy's unit tests build their exchanges from (one copy,
//! shared by `response`, `transcript`, `rewrite` and `proxy::mysql::masking`).

use bytes::{BufMut, BytesMut};

use super::handshake::{Capabilities, OkPacket};
use super::packet::{put_lenenc, put_lenenc_bytes};

/// A column definition (protocol 4.1) in schema `shop`: `table` (also its org_table), `name`,
/// `org_name`, type `ty`, `flags`; charset 33, display length 255.
pub fn coldef(table: &str, name: &str, org_name: &str, ty: u8, flags: u16) -> Vec<u8> {
    let mut b = BytesMut::new();
    for s in ["def", "shop", table, table, name, org_name] {
        put_lenenc_bytes(&mut b, s.as_bytes());
    }
    put_lenenc(&mut b, 0x0c);
    b.put_u16_le(33);
    b.put_u32_le(255);
    b.put_u8(ty);
    b.put_u16_le(flags);
    b.put_u8(0);
    b.put_u16_le(0);
    b.to_vec()
}

/// A text-protocol row: length-encoded values, NULL as 0xFB.
pub fn text_row<T: AsRef<[u8]>>(values: &[Option<T>]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for v in values {
        match v {
            Some(s) => put_lenenc_bytes(&mut b, s.as_ref()),
            None => b.put_u8(0xFB),
        }
    }
    b.to_vec()
}

/// The 0xFE OK that ends a result set under DEPRECATE_EOF, with `status`.
pub fn ok_fe(status: u16) -> Vec<u8> {
    OkPacket {
        status,
        ..OkPacket::default()
    }
    .encode(0xFE, Capabilities::sluice_default())
    .to_vec()
}
