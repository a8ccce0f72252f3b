//! Wire protocols: one module per protocol.
pub mod postgres;
