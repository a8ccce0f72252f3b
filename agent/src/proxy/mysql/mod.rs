//! The MySQL/MariaDB session (issue 6, in progress). So far only the backend login
//! ([`login`]); the accept loop does not route MySQL targets here yet.
pub mod login;
