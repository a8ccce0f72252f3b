//! The key schema and the value codec (the table in the crate's doc): column family names,
//! keys, and the versioned postcard encoding of plain values. The lowest layer over RocksDB:
//! every other file reads and writes through these, and nothing here opens a database.

use rocksdb::{ColumnFamilyDescriptor, Options};
use serde::{Deserialize, Serialize};

use crate::error::JournalError;
use crate::hex;
use crate::model::{AccessRequest, Body, Event, SessionId};

pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_SESSIONS: &str = "sessions";
pub(crate) const CF_REQUESTS: &str = "requests";
pub(crate) const CF_CHECKPOINTS: &str = "checkpoints";
/// Each event's chain hash h(n), so a verifier can name the exact event that was changed.
pub(crate) const CF_HASHES: &str = "hashes";
/// The agent's shipping cursor per session: events below it are acknowledged by the collector.
pub(crate) const CF_SHIPPED: &str = "shipped";
/// The collector's ingest verdict per session.
pub(crate) const CF_INTEGRITY: &str = "integrity";
pub(crate) const FAMILIES: [&str; 7] = [
    CF_EVENTS,
    CF_SESSIONS,
    CF_REQUESTS,
    CF_CHECKPOINTS,
    CF_HASHES,
    CF_SHIPPED,
    CF_INTEGRITY,
];
/// First byte of every plain stored value: the value format. Bump it when the encoding changes.
pub(crate) const FORMAT: u8 = 1;

/// The stored form of an event (the key carries session and seq).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredEvent {
    pub ts_ns: u64,
    pub body: Body,
}

pub(crate) fn encode<T: Serialize>(
    value: &T,
    what: impl Fn() -> String,
) -> Result<Vec<u8>, JournalError> {
    postcard::to_extend(value, vec![FORMAT]).map_err(|source| JournalError::Encode {
        what: what(),
        source,
    })
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    what: impl Fn() -> String,
) -> Result<T, JournalError> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|source| JournalError::Decode {
                what: what(),
                source,
            })
        }
        Some((&format, _)) => Err(JournalError::Format {
            what: what(),
            format,
        }),
        None => Err(JournalError::Format {
            what: what(),
            format: 0,
        }),
    }
}

/// Decodes the plain stored value of event `seq` of `session`.
pub(crate) fn decode_event(
    session: SessionId,
    seq: u64,
    plain: &[u8],
) -> Result<Event, JournalError> {
    let stored: StoredEvent = decode(plain, || format!("event {session}/{seq}"))?;
    Ok(Event {
        session,
        seq,
        ts_ns: stored.ts_ns,
        body: stored.body,
    })
}

pub(crate) fn key_seq(key: &[u8]) -> Result<u64, JournalError> {
    key.get(16..24)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| JournalError::Format {
            what: format!("event key {}", hex(key)),
            format: 0,
        })
}

pub(crate) fn event_key(session: &SessionId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(session.as_bytes());
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts
}

pub(crate) fn descriptors() -> Vec<ColumnFamilyDescriptor> {
    FAMILIES
        .into_iter()
        .map(|name| ColumnFamilyDescriptor::new(name, options()))
        .collect()
}

/// A request's key: created ns (u64 BE) ++ request id, so the family iterates in creation
/// order.
pub(crate) fn request_key(request: &AccessRequest) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + request.id.len());
    key.extend_from_slice(&request.created_ns.to_be_bytes());
    key.extend_from_slice(request.id.as_bytes());
    key
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_value_is_an_error_not_a_panic() {
        let err = decode::<StoredEvent>(&[FORMAT, 0xff, 0xff, 0xff], || "x".into())
            .err()
            .unwrap();
        assert!(err.to_string().contains("undecodable"));
        let err = decode::<StoredEvent>(&[9], || "x".into()).err().unwrap();
        assert!(err.to_string().contains("unknown format 9"));
    }
}
