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
