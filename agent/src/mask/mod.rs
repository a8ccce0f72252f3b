//! Inline masking of sensitive values in result rows: the pure core (no I/O).
//!
//! Owns the masking rule file ([`rules`]), the content detectors ([`detect`]), the masking
//! strategies ([`strategy`]), the per-result-set engine ([`engine`], which sees types only as
//! protocol-neutral [`ValueKind`]s) and the PostgreSQL row rewriters and type mapping
//! ([`pgrow`]); MySQL rows are rewritten around the same engine by the proxy's MySQL masking
//! (with `protocol::mysql::rewrite`). The proxy builds a [`MaskPlan`] from each RowDescription (or COPY
//! column list) and the principal's groups, runs every DataRow through
//! [`pgrow::rewrite_data_row`] before the journal and the client see it, and records
//! [`MaskPlan::report`] per response. Text the server sends outside rows (error and notice
//! fields, notification payloads, echoed parameters, MySQL ERR messages and OK info) goes
//! through a [`MaskPlan::for_text`] plan, around the protocol codecs' text rewriters. Never
//! touches a socket, a file or the journal; the clear value never leaves the value being
//! rewritten.
//!
//! Layering: `strategy` and `detect` know nothing of rules or protocols; `rules` compiles the
//! file into a [`RuleSet`]; `engine` decides per column and per value; `pgrow` only parses and
//! re-encodes PostgreSQL bytes around the engine. Modules refer to each other through
//! `super::`, so this directory can be compiled from another crate by `#[path]` (the fuzz
//! targets do).
pub mod detect;
pub mod engine;
pub mod pgrow;
pub mod rules;
pub mod strategy;

pub use engine::{Change, ColumnDesc, Firing, MaskPlan, Outcome, Source, ValueKind};
pub use pgrow::{Format, RowError, RowRewrite, rewrite_copy_text, rewrite_data_row, value_kind};
pub use rules::{Audience, Origin, RuleSet, RulesError, RulesFile};
pub use strategy::StrategyKind;
