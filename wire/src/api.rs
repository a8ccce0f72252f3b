//! The JSON of `/v1/enroll` and the enrollment token's text form, shared by the collector and
//! `sluice enroll`. (`/v1/ingest` carries `sluice_journal::ShipBatch` and answers
//! `IngestReport`, both in the journal's own encoding.)

use serde::{Deserialize, Serialize};

pub const ENROLL_PATH: &str = "/v1/enroll";
pub const INGEST_PATH: &str = "/v1/ingest";
pub const HEALTH_PATH: &str = "/v1/health";

/// What an agent sends to enroll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The token's secret (the part before the `.`).
    pub token: String,
    /// The name the agent expects to be enrolled under (the token's, when absent).
    #[serde(default)]
    pub agent: Option<String>,
    /// Its Ed25519 journal signing key (raw 32 bytes), hex.
    pub public_key: String,
    /// That key's signature over `[`enroll_message`]`(token, public key)``, hex.
    pub signature: String,
}

/// The collector's answer to a successful enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub agent: String,
    /// SHA-256 of the collector's certificate, hex (what the agent pins).
    pub fingerprint: String,
}

/// A token as people pass it around: `<secret>.<collector certificate sha256 hex>`.
pub fn format_token(secret: &str, fingerprint: &str) -> String {
    format!("{secret}.{fingerprint}")
}

/// Splits a token into its secret and the collector's fingerprint.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let (secret, fingerprint) = token.trim().rsplit_once('.')?;
    let hex_ok = fingerprint.len() == 64 && fingerprint.bytes().all(|b| b.is_ascii_hexdigit());
    (!secret.is_empty() && hex_ok).then_some((secret, fingerprint))
}

/// The message an enrolling agent signs with the key it enrolls: a context string, the token
/// secret and the key itself.
pub fn enroll_message(secret: &str, public_key: &[u8]) -> Vec<u8> {
    let mut m = b"sluice-enroll-v1\0".to_vec();
    m.extend_from_slice(secret.as_bytes());
    m.push(0);
    m.extend_from_slice(public_key);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_splits_into_its_secret_and_the_pinned_fingerprint() {
        let fp = "ab".repeat(32);
        let t = format_token("s3cr-et_", &fp);
        assert_eq!(parse_token(&t), Some(("s3cr-et_", fp.as_str())));
        assert_eq!(
            parse_token(&format!(" {t}\n")),
            Some(("s3cr-et_", fp.as_str()))
        );
        assert_eq!(parse_token("nodot"), None);
        assert_eq!(parse_token(&format!(".{fp}")), None);
        assert_eq!(parse_token("s.abc"), None);
    }
}
