//! TLS for both legs of a connection (rustls, ring provider): the server side sluice shows
//! clients (SSLRequest, and PostgreSQL 17's direct SSL with ALPN `postgresql`), and the client
//! side it dials backends with (`disable`, `require`, `verify-full` against a configured CA).
//!
//! Everything is loaded once, at start, into `Arc`ed rustls configs: a bad certificate, key or
//! CA file stops the agent with the path and the reason, never the first connection.
//! `require` encrypts without checking the backend's certificate (like libpq's
//! `sslmode=require`); `verify-full` checks the chain against `backend_ca` and the name
//! against `backend_server_name` (default: the backend's IP address).
//!
//! Also the [`Stream`] type the proxy relays over: a plain [`Socket`] (TCP, or a unix socket
//! for clients redirected from a database's socket and for backends dialed on theirs) or
//! either side of a TLS stream over one, with a description of the TLS parameters for the
//! journal.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// The ALPN protocol PostgreSQL 17 clients ask for with direct SSL.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("certificate {cert} and key {key} do not make a TLS server config")]
    Server {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {path} has a certificate rustls rejects")]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS client config")]
    Client(#[source] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The server side: `cert` (PEM chain) and `key` (PEM, PKCS#8/PKCS#1/SEC1), with ALPN
/// `postgresql` offered for direct SSL (a client that asks for no ALPN still gets TLS).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs("certificate", cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Read {
        what: "private key",
        path: key.to_path_buf(),
        source,
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|source| TlsError::Server {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(config))
}

/// How sluice dials a target's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTls {
    /// Plain TCP (the default; a backend on the same host).
    #[default]
    Disable,
    /// TLS without checking the certificate (encryption against passive listeners only).
    Require,
    /// TLS with the chain checked against `backend_ca` and the name against the server name.
    VerifyFull,
}

/// The client side for `mode` (None for `disable`).
pub fn client_config(
    mode: BackendTls,
    ca: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let builder = || {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Client)
    };
    Ok(match mode {
        BackendTls::Disable => None,
        BackendTls::Require => Some(Arc::new(
            builder()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth(),
        )),
        BackendTls::VerifyFull => {
            let mut roots = RootCertStore::empty();
            if let Some(path) = ca {
                for c in certs("CA file", path)? {
                    roots.add(c).map_err(|source| TlsError::Ca {
                        path: path.to_path_buf(),
                        source,
                    })?;
                }
            }
            Some(Arc::new(
                builder()?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            ))
        }
    })
}

/// `sslmode=require`: encrypt, accept any certificate (signatures are still checked, so the
/// handshake is with whoever holds the presented key).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A connected socket of either family; TLS runs over it, the protocols over a [`Stream`].
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Reads without consuming, like `TcpStream::peek` (tokio's UnixStream has none).
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.peek(buf).await,
            Socket::Unix(s) => loop {
                s.readable().await?;
                match s.try_io(tokio::io::Interest::READABLE, || {
                    use std::os::fd::AsRawFd as _;
                    nix::sys::socket::recv(s.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                        .map_err(io::Error::from)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            },
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Socket::Unix(_))
    }

    /// Owned halves without a lock between them (tokio's `into_split` of either family).
    pub fn into_split(self) -> (SocketRead, SocketWrite) {
        match self {
            Socket::Tcp(s) => {
                let (r, w) = s.into_split();
                (SocketRead::Tcp(r), SocketWrite::Tcp(w))
            }
            Socket::Unix(s) => {
                let (r, w) = s.into_split();
                (SocketRead::Unix(r), SocketWrite::Unix(w))
            }
        }
    }
}

/// The read half of a [`Socket`].
pub enum SocketRead {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Unix(tokio::net::unix::OwnedReadHalf),
}

/// The write half of a [`Socket`].
pub enum SocketWrite {
    Tcp(tokio::net::tcp::OwnedWriteHalf),
    Unix(tokio::net::unix::OwnedWriteHalf),
}

impl AsyncRead for SocketRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SocketRead::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            SocketRead::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

macro_rules! each_write_half {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            SocketWrite::Tcp($s) => $e,
            SocketWrite::Unix($s) => $e,
        }
    };
}

impl AsyncWrite for SocketWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_write_half!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_write_half!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_write_half!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_write_half!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each_write_half!(self, s => s.is_write_vectored())
    }
}

macro_rules! each_socket {
    ($self:expr, $s:ident => $e:expr) => {
        match $self {
            Socket::Tcp($s) => $e,
            Socket::Unix($s) => $e,
        }
    };
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each_socket!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_socket!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_socket!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_socket!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_socket!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        each_socket!(self, s => s.is_write_vectored())
    }
}

/// A connection the proxy relays: plain, or TLS on either side.
pub enum Stream {
    Plain(Socket),
    Tls(Box<tokio_rustls::TlsStream<Socket>>),
}

impl Stream {
    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384", "plain" or "unix socket", for the journal.
    pub fn describe(&self) -> String {
        match self {
            Stream::Plain(Socket::Unix(_)) => "unix socket".into(),
            Stream::Plain(_) => "plain".into(),
            Stream::Tls(t) => {
                let (version, suite) = match t.as_ref() {
                    tokio_rustls::TlsStream::Client(c) => {
                        let s = c.get_ref().1;
                        (s.protocol_version(), s.negotiated_cipher_suite())
                    }
                    tokio_rustls::TlsStream::Server(c) => {
                        let s = c.get_ref().1;
                        (s.protocol_version(), s.negotiated_cipher_suite())
                    }
                };
                format!(
                    "{} {}",
                    version
                        .map(|v| format!("{v:?}"))
                        .unwrap_or_else(|| "TLS".into()),
                    suite
                        .map(|s| format!("{:?}", s.suite()))
                        .unwrap_or_default()
                )
                .trim_end()
                .to_string()
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
