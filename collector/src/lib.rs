//! sluice's collector: agents enroll with a one-time token and ship their journals here over
//! HTTPS with mutual TLS; the collector verifies each shipment's hash chains and signatures,
//! stores it (RocksDB, the journal's own format, so `sluice sessions|replay|export|verify
//! --journal DIR/store` read it), and purges recordings past their retention.
//!
//! - [`registry`]: enrolled agents, tokens and the audit log (files under the collector dir).
//! - [`server`]: the HTTPS routes.
//!
//! What the agent shares with it (the routes, the enrollment JSON, the HTTP codec, the TLS
//! identities) is the `sluice_wire` crate; the agent does not link this one.
#![forbid(unsafe_code)]

pub mod registry;
pub mod server;

/// An error and its causes on one line, `outer: cause: cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
