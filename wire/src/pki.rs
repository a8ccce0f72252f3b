//! Identities without a CA, pinned like SSH or WireGuard keys.
//!
//! - The collector has a self-signed ECDSA P-256 certificate ([`generate_server_cert`]); agents
//!   pin the SHA-256 of its DER ([`fingerprint`]), learnt from the enrollment token, and
//!   [`PinnedServer`] accepts exactly that certificate (and checks the handshake signature).
//! - An agent's client certificate is self-signed, at each start, for its **journal signing
//!   key** (Ed25519, [`agent_identity`]), so the key the collector pins for TLS is the key that
//!   signs the checkpoints. [`AgentClientAuth`] accepts any certificate carrying an Ed25519 key
//!   whose handshake signature verifies, and lets clients without one through (only
//!   `/v1/enroll` serves them); the server then decides by the key ([`ed25519_key`]).
//!
//! Everything here uses rustls's ring provider; nothing touches a socket.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("cannot build the TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("the fingerprint {0:?} is not 64 hex digits (a SHA-256)")]
    BadFingerprint(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex (either case), `None` if it is not hex.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The SHA-256 of a certificate's DER, in hex: what agents pin.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex(&sha256(cert_der))
}

/// Parses a pinned fingerprint (64 hex digits, `:` separators allowed).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], PkiError> {
    let clean: String = text.chars().filter(|c| *c != ':').collect();
    unhex(&clean)
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| PkiError::BadFingerprint(text.to_string()))
}

/// A new self-signed server certificate for `name`: (certificate PEM, PKCS#8 key PEM, DER).
pub fn generate_server_cert(name: &str) -> Result<(String, String, Vec<u8>), PkiError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("sluice collector {name}"),
    );
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), followed by the 32-byte key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The raw Ed25519 public key a certificate carries, if it carries one.
pub fn ed25519_key(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let rest = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    <[u8; 32]>::try_from(rest).ok()
}

/// The agent's TLS identity: a certificate self-signed by its Ed25519 journal key (PKCS#8 as
/// ring writes it), and that key.
pub fn agent_identity(
    pkcs8: &[u8],
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), PkiError> {
    let der = PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec!["sluice-agent".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice agent");
    let cert = params.self_signed(&key)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The agent's view of the collector: exactly the certificate whose SHA-256 is pinned.
#[derive(Debug)]
pub struct PinnedServer {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedServer {
    pub fn new(pin: [u8; 32]) -> PinnedServer {
        PinnedServer {
            pin,
            algorithms: algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = sha256(end_entity.as_ref());
        if got != self.pin {
            return Err(rustls::Error::General(format!(
                "the collector's certificate has fingerprint {}, not the pinned {}: \
                 wrong address, a new collector, or someone in between; enroll again with a new token",
                hex(&got),
                hex(&self.pin)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The collector's view of clients: an Ed25519 certificate whose handshake signature verifies,
/// or no certificate at all (enrollment). Which keys may ingest is the server's decision.
#[derive(Debug)]
pub struct AgentClientAuth {
    algorithms: WebPkiSupportedAlgorithms,
}

impl Default for AgentClientAuth {
    fn default() -> Self {
        AgentClientAuth {
            algorithms: algorithms(),
        }
    }
}

impl ClientCertVerifier for AgentClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match ed25519_key(end_entity) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(rustls::Error::General(
                "the client certificate must carry an Ed25519 key (the agent's journal signing key)"
                    .into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The collector's TLS server config.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(AgentClientAuth::default()))
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// The agent's TLS client config: the collector pinned by `pin`, and the agent's certificate
/// when it has one (None: anonymous, as a test client would be).
pub fn client_config(
    pin: [u8; 32],
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer::new(pin)));
    let config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name agents send in SNI (the pin, not the name, authenticates the collector).
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("sluice-collector")
        .unwrap_or_else(|_| ServerName::from(std::net::IpAddr::from([127, 0, 0, 1])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    #[test]
    fn an_agent_certificate_carries_its_journal_key() {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key");
        let (cert, _key) = agent_identity(pkcs8.as_ref()).expect("certificate");
        let got = ed25519_key(&cert).expect("an Ed25519 key");
        assert_eq!(&got[..], pair.public_key().as_ref());
    }

    #[test]
    fn a_server_certificate_is_not_an_agent_identity() {
        let (_pem, _key, der) = generate_server_cert("localhost").expect("certificate");
        assert!(ed25519_key(&CertificateDer::from(der.clone())).is_none());
        let fp = fingerprint(&der);
        assert_eq!(parse_fingerprint(&fp).expect("parses"), sha256(&der));
        assert!(parse_fingerprint("abc").is_err());
    }
}
