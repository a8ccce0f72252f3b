//! The collector's HTTPS server: TLS with optional client certificates ([`sluice_wire::pki`]), one
//! request per connection ([`sluice_wire::http`]), three routes:
//!
//! - `POST /v1/enroll` (no client certificate needed): a one-time token, checked by the
//!   [`Registry`]; 403 with the reason when refused.
//! - `POST /v1/ingest`: only for a client certificate whose Ed25519 key belongs to an enrolled,
//!   non-revoked agent (401 without a certificate, 403 otherwise). The body is a shipment; the
//!   answer (200) is sent only after the [`Sink`] stored it durably. 400 for a body that does
//!   not decode, 413 for one over 64 MiB.
//! - `GET /v1/health`: the certificate's fingerprint.
//!
//! Anyone can reach the first and last, so they are cheap: a head must arrive within 10 s, an
//! enrollment body is at most 64 KiB and must arrive within 10 s, and at most 20 enrollment
//! attempts a second are served (429 beyond). Only an enrolled agent's shipment gets 120 s.
//!
//! The head is read first and the body only when the request may have one: an enrollment
//! (64 KiB at most) or an ingest whose key is already known to be an active agent's. So a
//! client nobody enrolled cannot make the collector hold more than 64 KiB, and memory grows
//! with the bytes that arrive, never with what a head declares.
//!
//! Registry and store calls block (file locks, RocksDB's synced writes) and run on
//! `spawn_blocking`. Shutdown follows mini-redis: stop accepting, let the connections in
//! flight finish (bounded), so an acknowledged shipment is always a stored one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::registry::{AgentRecord, Registry, RegistryError, format_ns};
use sluice_wire::api::{EnrollRequest, EnrollResponse};
use sluice_wire::http::{self, Request, Response};
use sluice_wire::pki::{self, hex};

/// Where shipments go (the collector's store; a seam for tests).
pub trait Sink: Send + Sync + 'static {
    /// Verifies and stores the encoded shipment `body` from `agent`, whose enrolled key is
    /// `public_key`, durably; returns the encoded acknowledgement.
    fn ingest(&self, agent: &str, public_key: &[u8], body: &[u8]) -> Result<Vec<u8>, IngestError>;
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is not a shipment (400).
    #[error("the shipment does not decode: {0}")]
    BadBatch(String),
    /// The store failed (500): the agent keeps the events and retries.
    #[error("the collector cannot store the shipment: {0}")]
    Store(String),
}

pub struct Server {
    pub registry: Arc<Registry>,
    pub sink: Arc<dyn Sink>,
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
    pub tls: TlsAcceptor,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Bounds enrollment attempts.
    pub enrollments: EnrollLimiter,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// For a request's head, and for the small bodies anyone may send (enrollment).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// For an enrolled agent's shipment (up to 64 MiB).
const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// Enrollment attempts admitted per second, all clients together: enough for a fleet being
/// enrolled, and a bound on what unauthenticated clients can make the collector do (each
/// attempt takes a file lock and writes an audit line).
const ENROLLMENTS_PER_SECOND: u32 = 20;

/// A fixed-window counter of enrollment attempts.
#[derive(Debug, Default)]
pub struct EnrollLimiter {
    window: std::sync::Mutex<(u64, u32)>,
}

impl EnrollLimiter {
    fn admit(&self) -> bool {
        let second = sluice_journal::now_ns() / 1_000_000_000;
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 != second {
            *w = (second, 0);
        }
        w.1 += 1;
        w.1 <= ENROLLMENTS_PER_SECOND
    }
}

/// Serves `listener` until `shutdown` resolves, then lets the connections in flight finish
/// (at most 30 s).
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (stop_tx, _) = broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(server.max_connections.max(1)));
    let mut stopping = stop_tx.subscribe();
    let accept = async {
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stopping.recv() => return,
            };
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopping.recv() => return,
            };
            let server = server.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _done = done;
                connection(stream, peer, &server).await;
            });
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = shutdown => {}
    }
    let _ = stop_tx.send(());
    drop(done_tx);
    if tokio::time::timeout(Duration::from_secs(30), done_rx.recv())
        .await
        .is_err()
    {
        warn!("some requests did not finish within 30 s of shutdown");
    }
}

async fn connection(stream: TcpStream, peer: SocketAddr, server: &Server) {
    let _ = stream.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, server.tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let key = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(pki::ed25519_key);
    let Some(response) = respond(&mut tls, key, peer, server).await else {
        return;
    };
    if let Err(e) = http::write_response(&mut tls, &response).await {
        debug!(%peer, error = %e, "cannot send the response");
    }
    // A refused request's body may still be on its way: read it into nothing (bounded), so
    // the client gets the answer rather than a reset.
    if response.status >= 400 {
        let mut sink = tokio::io::sink();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::copy(&mut (&mut tls).take(http::MAX_BODY as u64), &mut sink),
        )
        .await;
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
}

/// Reads the head, decides, and reads the body only for a request that may send one: an
/// enrollment (small) or an ingest from an enrolled, active agent (up to 64 MiB). So nobody
/// else makes the collector hold more than a small body.
async fn respond<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    key: Option<[u8; 32]>,
    peer: SocketAddr,
    server: &Server,
) -> Option<Response> {
    let (mut req, pending) =
        match tokio::time::timeout(HEAD_TIMEOUT, http::read_request_head(stream)).await {
            Err(_) => {
                return Some(Response::error(
                    408,
                    "the request head did not arrive within 10 s",
                ));
            }
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                info!(%peer, error = %e, "bad request");
                return Some(Response::error(e.status(), &e.to_string()));
            }
        };
    let (limit, within) = match (req.method.as_str(), req.path.as_str()) {
        ("POST", sluice_wire::api::ENROLL_PATH) => {
            if !server.enrollments.admit() {
                return Some(Response::error(
                    429,
                    "too many enrollment attempts right now: retry in a few seconds",
                ));
            }
            (ENROLL_MAX_BODY, HEAD_TIMEOUT)
        }
        ("POST", sluice_wire::api::INGEST_PATH) => match authorize(key, peer, server).await {
            Ok(_) => (http::MAX_BODY, BODY_TIMEOUT),
            Err(refusal) => return Some(refusal),
        },
        ("GET", sluice_wire::api::HEALTH_PATH) => (0, HEAD_TIMEOUT),
        (
            _,
            sluice_wire::api::ENROLL_PATH
            | sluice_wire::api::INGEST_PATH
            | sluice_wire::api::HEALTH_PATH,
        ) => {
            return Some(Response::error(405, "method not allowed"));
        }
        (_, path) => return Some(Response::error(404, &format!("no such endpoint {path:?}"))),
    };
    req.body = match tokio::time::timeout(within, http::read_body(stream, pending, limit)).await {
        Err(_) => {
            return Some(Response::error(
                408,
                &format!(
                    "the request body did not arrive within {} s",
                    within.as_secs()
                ),
            ));
        }
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "bad request");
            return Some(Response::error(e.status(), &e.to_string()));
        }
    };
    // No timeout from here on: an ingest that is being written finishes and is answered.
    Some(route(req, key, peer, server).await)
}

/// Largest enrollment request.
const ENROLL_MAX_BODY: usize = 64 * 1024;

async fn route(req: Request, key: Option<[u8; 32]>, peer: SocketAddr, server: &Server) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", sluice_wire::api::ENROLL_PATH) => enroll(req, peer, server).await,
        ("POST", sluice_wire::api::INGEST_PATH) => ingest(req, key, peer, server).await,
        _ => Response::new(
            200,
            "application/json",
            serde_json::json!({ "ok": true, "fingerprint": server.fingerprint })
                .to_string()
                .into_bytes(),
        ),
    }
}

fn now_ns() -> u64 {
    sluice_journal::now_ns()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Response::error(500, "the collector's worker failed; retry"))
}

async fn enroll(req: Request, peer: SocketAddr, server: &Server) -> Response {
    let body: EnrollRequest = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return Response::error(
                400,
                &format!("the enrollment request is not valid JSON: {e}"),
            );
        }
    };
    let (Some(public_key), Some(signature)) =
        (pki::unhex(&body.public_key), pki::unhex(&body.signature))
    else {
        return Response::error(400, "public_key and signature must be hex");
    };
    let registry = server.registry.clone();
    let result = blocking(move || {
        registry.enroll(
            &body.token,
            body.agent.as_deref(),
            &public_key,
            &signature,
            now_ns(),
        )
    })
    .await;
    match result {
        Err(r) => r,
        Ok(Ok(agent)) => {
            info!(%peer, agent = %agent.name, key = %agent.public_key, "agent enrolled");
            let answer = EnrollResponse {
                agent: agent.name,
                fingerprint: server.fingerprint.clone(),
            };
            Response::new(
                200,
                "application/json",
                serde_json::to_vec(&answer).unwrap_or_default(),
            )
        }
        Ok(Err(RegistryError::Enroll(e))) => {
            warn!(%peer, reason = %e, "enrollment refused");
            Response::error(403, &e.to_string())
        }
        Ok(Err(e)) => {
            warn!(%peer, error = %crate::error_chain(&e), "enrollment failed");
            Response::error(500, &crate::error_chain(&e))
        }
    }
}

/// The enrolled, active agent behind the client certificate's key, or the refusal.
async fn authorize(
    key: Option<[u8; 32]>,
    peer: SocketAddr,
    server: &Server,
) -> Result<AgentRecord, Response> {
    let Some(key) = key else {
        return Err(Response::error(
            401,
            "no client certificate: only enrolled agents may ingest (run `sluice enroll` on the agent)",
        ));
    };
    let registry = server.registry.clone();
    let agent = match blocking(move || registry.agent_by_key(&key)).await? {
        Err(e) => return Err(Response::error(500, &crate::error_chain(&e))),
        Ok(a) => a,
    };
    let Some(agent) = agent else {
        info!(%peer, key = %hex(&key), "ingest refused: key not enrolled");
        return Err(Response::error(
            403,
            &format!(
                "the key {} is not enrolled at this collector: enroll the agent with `sluice enroll --token ...`",
                hex(&key)
            ),
        ));
    };
    if let Some(revoked) = agent.revoked_ns {
        info!(%peer, agent = %agent.name, "ingest refused: agent revoked");
        return Err(Response::error(
            403,
            &format!(
                "agent {:?} was revoked at {}: enroll it again with a new token",
                agent.name,
                format_ns(revoked)
            ),
        ));
    }
    Ok(agent)
}

async fn ingest(
    req: Request,
    key: Option<[u8; 32]>,
    peer: SocketAddr,
    server: &Server,
) -> Response {
    // Checked again once the body is in: a revocation meanwhile counts.
    let agent = match authorize(key, peer, server).await {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };
    let Some(key) = key else {
        return Response::error(401, "no client certificate");
    };
    let sink = server.sink.clone();
    let name = agent.name.clone();
    let bytes = req.body.len();
    match blocking(move || sink.ingest(&name, &key, &req.body)).await {
        Err(r) => r,
        Ok(Ok(report)) => {
            debug!(%peer, agent = %agent.name, bytes, "shipment stored");
            Response::new(200, "application/octet-stream", report)
        }
        Ok(Err(e @ IngestError::BadBatch(_))) => {
            warn!(%peer, agent = %agent.name, error = %e, "shipment refused");
            Response::error(400, &e.to_string())
        }
        Ok(Err(e @ IngestError::Store(_))) => {
            warn!(%peer, agent = %agent.name, error = %e, "shipment not stored");
            Response::error(500, &e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_attempts_beyond_the_rate_are_refused_until_the_next_second() {
        let limiter = EnrollLimiter::default();
        // Start at the beginning of a second so the window does not roll over mid-test.
        while sluice_journal::now_ns() % 1_000_000_000 > 500_000_000 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let admitted = (0..ENROLLMENTS_PER_SECOND + 5)
            .filter(|_| limiter.admit())
            .count();
        assert_eq!(admitted, ENROLLMENTS_PER_SECOND as usize);
    }
}
