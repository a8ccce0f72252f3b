//! sluice's journal: the record model and the RocksDB spool that holds it.
//!
//! The agent appends to it on the data path (every message is recorded **before** it is
//! forwarded); the read commands (`sluice sessions|replay|export`) and, later, the collector
//! read the same format through [`Reader`]. This crate is the one definition of that format:
//! never copy it elsewhere.
//!
//! ```text
//! column family  key                                   value
//! "events"       session id (16 B, UUIDv7) ++ seq (u64 BE)   FORMAT ++ postcard(Event body + time)
//! "sessions"     session id (16 B)                     FORMAT ++ postcard(SessionSummary)
//! "requests"     created ns (u64 BE) ++ request id     FORMAT ++ postcard(AccessRequest)
//! "checkpoints"  session id (16 B) ++ seq (u64 BE)     FORMAT ++ postcard(chain::Checkpoint)
//! "hashes"       session id (16 B) ++ seq (u64 BE)     the chain hash after that event (32 B)
//! "shipped"      session id (16 B)                     next unacknowledged seq (u64 BE), agent only
//! "integrity"    session id (16 B)                     FORMAT ++ postcard(Integrity), collector only
//! ```
//! With a data key, values of `events`, `sessions` and `requests` are sealed (AES-256-GCM, see
//! [`seal`]); everything the chain hashes is the plain value.
//! A request (a held statement or a just-in-time access request) is rewritten under the same
//! key as its state changes, so the family holds each request's latest state, in creation
//! order; the sessions it touches also carry `Body::Review` events.
//! UUIDv7 ids sort by start time, so both families iterate in time order. A session's events
//! are numbered from 0 without gaps; the summary is written with the start event and rewritten
//! with the end event in the same atomic batch, so a session with no `ended_ns` is one that is
//! still open or whose agent died (the reader then derives its counters from the events).
//!
//! What must never happen here: blocking on the network, holding a clear credential (the agent
//! redacts password messages before they reach [`SessionRecorder::client`]), or a panic on a
//! corrupt value (decoding errors are returned, naming the key).
#![forbid(unsafe_code)]

// In layers, each file importing only the ones above it in this list (the model, keys and
// crypto first; the collector's store last).
pub mod bench;
pub mod chain;
mod collector;
mod db;
mod error;
mod keyfile;
mod model;
mod reader;
mod recovery;
mod schema;
pub mod seal;
mod ship;
mod wire;
mod writer;

pub use collector::Store;
pub use db::{Integrity, RawEvent, RawSession, Verification};
pub use error::JournalError;
pub use keyfile::KeyError;
pub use model::{
    AccessRequest, AuthInfo, Body, Decision, Direction, Event, MaskFiring, MaskReport, NoteLevel,
    Principal, ProcessInfo, RequestKind, RequestState, Review, SessionId, SessionStart,
    SessionSummary, now_ns, parse_duration,
};
pub use reader::Reader;
pub use recovery::INTERRUPTED;
pub use ship::Backlog;
pub use wire::{IngestReport, SessionAck, ShipBatch, ShipCheckpoint, ShipEvent, ShipSession};
pub use writer::{Journal, JournalOptions, SessionRecorder};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
