//! The journal's one error type, for every layer of the crate.

use std::path::PathBuf;

use crate::model::SessionId;
use crate::seal::SealError;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the journal at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("no journal at {path} (has the agent run with journal_dir set to it?)")]
    Missing { path: PathBuf },
    #[error("journal write failed for session {session}")]
    Write {
        session: SessionId,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot write {what} to the journal")]
    WriteOther {
        what: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot write request {id} to the journal")]
    WriteRequest {
        id: String,
        #[source]
        source: rocksdb::Error,
    },
    #[error("cannot use the journal signing key")]
    Key(#[source] crate::chain::KeyError),
    #[error("cannot use the journal's data key")]
    Seal(#[from] SealError),
    #[error("journal read failed")]
    Read {
        #[source]
        source: rocksdb::Error,
    },
    #[error("undecodable journal value at {what}")]
    Decode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode journal value {what}")]
    Encode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("journal value at {what} has unknown format {format} (written by a newer sluice?)")]
    Format { what: String, format: u8 },
    #[error(
        "journal value at {what} does not open with the data key: it was altered or moved, or the journal holds values sealed with another key"
    )]
    Unseal { what: String },
    #[error(
        "journal value at {what} is encrypted, and no data key was given (pass --data-key, or run where the journal's SEALED-WITH file is readable)"
    )]
    Sealed { what: String },
    #[error("no session matches {0:?}")]
    NoSuchSession(String),
    #[error("{prefix:?} matches several sessions: {candidates}")]
    Ambiguous { prefix: String, candidates: String },
}
