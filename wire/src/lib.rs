//! The contract between a sluice agent and its collector, in the one crate both link (so the
//! agent does not link the collector's server):
//!
//! - [`api`]: the routes, the enrollment JSON, the token's text form and the message an
//!   enrolling agent signs.
//! - [`http`]: the minimal HTTP/1.1 codec both ends (and the agent's metrics endpoint) use.
//! - [`pki`]: certificates (rcgen), fingerprints, the pinning and client-key verifiers.
//!
//! The ship format itself (`ShipBatch`, `IngestReport`) is the journal's (`sluice_journal`),
//! since it carries the journal's records as they are stored.
#![forbid(unsafe_code)]

pub mod api;
pub mod http;
pub mod pki;
