//! The journal's record model (`journal/src/model.rs`, compiled from source) under the journal
//! crate's name, for the fuzz targets that compile `agent/src/mask`: the same types, without
//! the RocksDB spool.
#[allow(dead_code)]
#[path = "../../../journal/src/model.rs"]
mod model;

pub use model::*;
