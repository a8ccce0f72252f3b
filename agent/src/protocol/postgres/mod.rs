//! PostgreSQL frontend/backend protocol v3: a pure codec (no I/O, no tokio, no allocation on
//! the forwarding path).
//!
//! Layers, one file each:
//! - [`startup`]: the untyped packets a client sends first (SSLRequest, GSSENCRequest,
//!   CancelRequest, StartupMessage).
//! - [`frame`]: framing of typed messages (1 tag byte + big-endian i32 length that counts
//!   itself): is a whole message buffered, how long is the prefix of whole messages.
//! - [`body`]: primitives shared by the decoders: a bounds-checked reader, the decode error,
//!   and validated zero-copy lists (formats, values, OIDs).
//! - [`frontend`] / [`backend`]: zero-copy decoders of one message body, per direction (the
//!   same tag means different messages in each direction).
//! - [`encode`]: the few messages sluice writes itself (errors, notices).
//! - [`transcript`]: stateful decoding of a recorded session into shared [`Item`]s.
//!
//! Invariants: every function here is total over arbitrary bytes (errors, never panics); a
//! message is only decoded once its frame is complete; decoders borrow from the input.
//!
//! [`Item`]: crate::protocol::Item
pub mod auth;
pub mod backend;
pub mod body;
pub mod encode;
pub mod frame;
pub mod frontend;
pub mod startup;
pub mod transcript;

pub use backend::{Backend, decode_backend};
pub use body::{DecodeError, Format};
pub use frame::{FrameError, message_len, messages, whole_messages};
pub use frontend::{Frontend, decode_frontend};
pub use startup::{StartupError, StartupPacket, is_tls_client_hello, parse_startup, startup_len};
pub use transcript::Transcriber;

#[cfg(test)]
mod captured;
