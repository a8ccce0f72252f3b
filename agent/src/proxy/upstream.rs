//! Dialing backends. Every upstream socket carries the agent's SO_MARK *before* connect(), so
//! the eBPF connect hooks (TCP and unix alike) let it through instead of redirecting it back
//! to the proxy.
//!
//! Also [`Addr`], the one address type of a connection's ends: a TCP address or a unix socket
//! name (`@name` for an abstract one).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use std::os::unix::ffi::OsStringExt as _;

use tokio::net::{TcpSocket, UnixSocket};

use crate::tls::Socket;

/// Where a connection goes or comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Addr {
    Tcp(SocketAddr),
    /// A unix socket: a filesystem path, or `@name` for the abstract name `\0name`.
    Unix(PathBuf),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => a.fmt(f),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Addr {
    /// On this host: a loopback address or a unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            Addr::Tcp(a) => a.ip().is_loopback(),
            Addr::Unix(_) => true,
        }
    }
}

/// Connects to `addr` with `mark` set, within `timeout`.
pub(crate) async fn dial(addr: &Addr, mark: u32, timeout: Duration) -> std::io::Result<Socket> {
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
    };
    match addr {
        Addr::Tcp(addr) => {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            setsockopt(&socket, sockopt::Mark, &mark).map_err(std::io::Error::from)?;
            let stream = tokio::time::timeout(timeout, socket.connect(*addr))
                .await
                .map_err(|_| timed_out())??;
            stream.set_nodelay(true)?;
            Ok(Socket::Tcp(stream))
        }
        Addr::Unix(path) => {
            let socket = UnixSocket::new_stream()?;
            setsockopt(&socket, sockopt::Mark, &mark).map_err(std::io::Error::from)?;
            // `@name` is the abstract `\0name`, which socket2 takes from a leading NUL.
            let name = path.as_os_str().as_encoded_bytes();
            let path = match name.strip_prefix(b"@") {
                Some(rest) => {
                    let mut bytes = vec![0u8];
                    bytes.extend_from_slice(rest);
                    PathBuf::from(std::ffi::OsString::from_vec(bytes))
                }
                None => path.clone(),
            };
            let stream = tokio::time::timeout(timeout, socket.connect(path))
                .await
                .map_err(|_| timed_out())??;
            Ok(Socket::Unix(stream))
        }
    }
}

/// Runs the TLS handshake toward `target`'s backend on `socket` (the protocol's own "start
/// TLS" exchange done), verifying per `backend_tls` against `backend_server_name` or else the
/// backend's IP address. Errors say what failed, for the caller's refusal text.
pub(crate) async fn tls(
    socket: Socket,
    target: &crate::config::Target,
    backend: &Addr,
    config: std::sync::Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<crate::tls::Stream, String> {
    let name = match (&target.backend_server_name, backend) {
        (Some(n), _) => rustls::pki_types::ServerName::try_from(n.clone())
            .map_err(|e| format!("bad backend_server_name {n:?}: {e}"))?,
        (None, Addr::Tcp(a)) => rustls::pki_types::ServerName::IpAddress(a.ip().into()),
        (None, Addr::Unix(_)) => {
            return Err(
                "TLS to a backend's unix socket needs the target's backend_server_name".into(),
            );
        }
    };
    let stream = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(config).connect(name, socket),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake failed: {e}"))?;
    Ok(crate::tls::Stream::Tls(Box::new(
        tokio_rustls::TlsStream::Client(stream),
    )))
}
