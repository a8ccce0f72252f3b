//! Dialing backends. Every upstream socket carries the agent's SO_MARK *before* connect(), so
//! the eBPF connect hooks let it through instead of redirecting it back to the proxy.

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` with `mark` set, within `timeout`.
pub(crate) async fn dial(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    setsockopt(&socket, sockopt::Mark, &mark).map_err(std::io::Error::from)?;
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs the TLS handshake toward `target`'s backend on `tcp` (the protocol's own "start TLS"
/// exchange done), verifying per `backend_tls` against `backend_server_name` or else the
/// backend's IP address. Errors say what failed, for the caller's refusal text.
pub(crate) async fn tls(
    tcp: TcpStream,
    target: &crate::config::Target,
    backend: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<crate::tls::Stream, String> {
    let name = match &target.backend_server_name {
        Some(n) => rustls::pki_types::ServerName::try_from(n.clone())
            .map_err(|e| format!("bad backend_server_name {n:?}: {e}"))?,
        None => rustls::pki_types::ServerName::IpAddress(backend.ip().into()),
    };
    let stream = tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_string())?
    .map_err(|e| format!("TLS handshake failed: {e}"))?;
    Ok(crate::tls::Stream::Tls(Box::new(
        tokio_rustls::TlsStream::Client(stream),
    )))
}
