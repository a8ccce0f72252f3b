//! MySQL / MariaDB client/server protocol (protocol 4.1, handshake v10): a pure codec (no I/O,
//! no tokio, no clocks).
//!
//! Layers, one file each:
//! - [`packet`]: framing (3-byte little-endian length + sequence id), reassembly of payloads of
//!   16 MiB and more, sequence-id checks, and the primitives every payload decoder shares
//!   (length-encoded integers and strings, a bounds-checked reader, the decode error).
//! - [`handshake`]: the connection phase (Initial Handshake v10, SSLRequest,
//!   HandshakeResponse41, AuthSwitchRequest, AuthMoreData) and the OK / ERR / EOF packets.
//! - [`auth`]: the auth plugins' scrambles and states (`mysql_native_password`,
//!   `caching_sha2_password`, `mysql_clear_password`).
//! - [`command`]: client commands and COM_STMT_EXECUTE's parameters.
//! - [`resultset`]: column definitions, text and binary rows, and the values they carry.
//! - [`rewrite`]: re-encoding a text or binary row whose values the caller changed (masking).
//! - [`response`]: the [`ResponseMachine`] that, fed both directions in order, knows what each
//!   server packet of the command phase is.
//! - [`transcript`]: stateful decoding of a recorded session into shared [`Item`]s.
//!
//! [`Item`]: crate::protocol::Item
//!
//! Invariants: every function here is total over arbitrary bytes (errors, never panics); memory
//! is bounded by the caller's maximum packet size; decoders borrow from the input where they
//! can.
pub mod auth;
pub mod command;
pub mod handshake;
pub mod packet;
pub mod response;
pub mod resultset;
pub mod rewrite;
pub mod rsa;
#[cfg(test)]
pub(crate) mod testing;
pub mod transcript;

pub use command::{Command, decode_command};
pub use handshake::{Capabilities, ErrPacket, Handshake, HandshakeResponse, OkPacket};
pub use packet::{DecodeError, Decoder, Packet, PacketError, packet_len, packets, whole_packets};
pub use response::{ClientEvent, Event, ResponseMachine};
pub use resultset::{ColumnDef, Value};
pub use transcript::Transcriber;

#[cfg(test)]
mod captured;
