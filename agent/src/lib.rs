//! sluice: the agent library. The `sluice` binary (`main.rs`) is glue over these modules.
//!
//! - [`config`]: the agent's TOML configuration, validated once at start.
//! - [`intercept`]: loads and attaches the eBPF programs (aya); the only place that calls aya.
//! - [`proxy`]: accept loop, one task per connection, target selection, upstream dialing.
//! - [`policy`]: statement facts (sqlparser) and Cedar policy decisions.
//! - [`access`]: requests for approval (held statements, just-in-time access) and grants.
//! - [`doctor`]: what the agent needs on this host (`sluice doctor`, and the agent's checks
//!   at start).
//! - [`control`]: the agent's unix socket for the `requests/approve/deny/grants` commands.
//! - [`identity`]: OIDC token validation, the device flow of `sluice login`, login bindings.
//! - [`inert`]: untrusted text shown to people with its control characters escaped (the
//!   agent's log formatter, the read commands' line writer).
//! - [`protocol`]: one module per wire protocol (codec, no I/O) and the shared vocabulary.
//! - [`read`]: reading the journal back: `sessions`, `replay`, `export`.
//! - [`ship`]: the shipper (journal -> collector, mutual TLS), `sluice enroll`, metrics.
//! - [`tls`]: rustls configs for both legs, and the stream type the proxy relays over.
//! - [`mask`]: the masking engine (rules, detectors, strategies, the DataRow/COPY rewriters),
//!   which the PostgreSQL relay runs on every result.
#![deny(unsafe_code)]

pub mod access;
pub mod config;
pub mod control;
pub mod doctor;
pub mod identity;
pub mod inert;
pub mod intercept;
pub mod mask;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod read;
pub mod resolve;
pub mod ship;
pub mod tls;

/// An error and its causes on one line, `outer: cause: cause`, for logs and client messages.
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
