//! (being written by the PostgreSQL codec work)
