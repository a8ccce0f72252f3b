//! The shipper: sends the journal to the collector, in order, batched, at least once.
//!
//! One task loops: take the next batch from the journal (`Journal::next_batch`, which resumes
//! at each session's acknowledged cursor, persisted, so a restart resumes too), POST it to
//! `/v1/ingest` over HTTPS with mutual TLS, and only after a 200 hand the collector's report
//! to `Journal::acknowledge`, which moves the cursors and deletes sealed, fully acknowledged
//! sessions: the spool shrinks only there. A failure leaves the cursor where it was, so the
//! same events go again (the collector absorbs duplicates) after an exponential backoff with
//! full jitter (200 ms doubling to 30 s). The log says when shipping starts failing, when the
//! reason changes and when it recovers, never once per retry.
//!
//! TLS identities (`sluice_wire::pki`): the agent presents a certificate it self-signs,
//! at each start, for its journal signing key, so the collector pins the key that signs the
//! checkpoints; it accepts the collector's certificate only if its SHA-256 is the pinned one,
//! learnt at enrollment (`sluice enroll`, [`enroll`]) from the token.
//!
//! Journal calls block (RocksDB) and run on `spawn_blocking`; nothing here touches the data
//! path. Metrics ([`ShipMetrics`]) are served in Prometheus text format on
//! `agent.metrics_listen`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_journal::{IngestReport, Journal};
use sluice_wire::api::{self, EnrollRequest, EnrollResponse};
use sluice_wire::http::{self, Request, Response};
use sluice_wire::pki;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::config::{AgentConfig, ShipperConfig};

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("cannot connect to the collector {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the collector {addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("TLS with the collector {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the collector failed")]
    Http(#[from] http::HttpError),
    #[error("the collector answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the collector's answer does not decode")]
    Report(#[source] sluice_journal::JournalError),
    #[error("journal")]
    Journal(#[from] sluice_journal::JournalError),
    #[error("cannot set up TLS")]
    Pki(#[from] pki::PkiError),
    #[error("cannot read the signing key {path} (the agent's identity at the collector)")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the signing key {path} is not an Ed25519 PKCS#8 key")]
    BadKey { path: PathBuf },
    #[error("cannot create the signing key")]
    NewKey(#[source] sluice_journal::KeyError),
    #[error(
        "[shipper] is configured but this agent is not enrolled: run `sluice enroll --collector HOST:PORT --token TOKEN` \
         (it writes {path}), or set `collector` and `collector_fingerprint` in [shipper]"
    )]
    NotEnrolled { path: PathBuf },
    #[error("the enrollment file {path} is invalid: {message}")]
    BadEnrollment { path: PathBuf, message: String },
    #[error("cannot write the enrollment file {path}")]
    WriteEnrollment {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the token is not `<secret>.<64 hex digits>`: copy it whole from `sluice-collector token`"
    )]
    BadToken,
    #[error("enrollment refused by the collector: {0}")]
    EnrollRefused(String),
    #[error("a shipping task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error(
        "the collector stored none of the {events} events shipped (session {session} stays at event {next_seq}): {problems}"
    )]
    NoProgress {
        events: usize,
        session: String,
        next_seq: u64,
        problems: String,
    },
}

/// What `sluice enroll` writes next to the signing key (mode 600), and the shipper reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// The collector, `host:port`.
    pub collector: String,
    /// SHA-256 of its certificate, hex.
    pub collector_fingerprint: String,
    /// The name the collector enrolled this agent under.
    #[serde(default)]
    pub agent: Option<String>,
}

impl Enrollment {
    pub fn read(path: &Path) -> Result<Option<Enrollment>, ShipError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ShipError::BadEnrollment {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                });
            }
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| ShipError::BadEnrollment {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    }

    pub fn write(&self, path: &Path) -> Result<(), ShipError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let fail = |source| ShipError::WriteEnrollment {
            path: path.to_path_buf(),
            source,
        };
        let text = format!(
            "# Written by `sluice enroll`: the collector this agent ships to, and the SHA-256 of its\n\
             # certificate (pinned). Enabled by a [shipper] section in the agent's config.\n{}",
            toml::to_string(self).unwrap_or_default()
        );
        let tmp = path.with_extension("toml.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(fail)?;
        f.write_all(text.as_bytes()).map_err(fail)?;
        f.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, path).map_err(fail)
    }
}

/// Where to ship: address and pinned fingerprint, from `[shipper]` or the enrollment file.
#[derive(Debug, Clone)]
pub struct Destination {
    pub addr: String,
    pub pin: [u8; 32],
}

impl Destination {
    pub fn resolve(shipper: &ShipperConfig, agent: &AgentConfig) -> Result<Destination, ShipError> {
        let path = shipper.enrollment_path(agent);
        let file = Enrollment::read(&path)?;
        let addr = shipper
            .collector
            .clone()
            .or_else(|| file.as_ref().map(|f| f.collector.clone()));
        let fingerprint = shipper
            .collector_fingerprint
            .clone()
            .or_else(|| file.as_ref().map(|f| f.collector_fingerprint.clone()));
        let (Some(addr), Some(fingerprint)) = (addr, fingerprint) else {
            return Err(ShipError::NotEnrolled { path });
        };
        Ok(Destination {
            addr,
            pin: pki::parse_fingerprint(&fingerprint)?,
        })
    }
}

/// The PKCS#8 signing key, created (as the journal would) when missing.
fn signing_key(path: &Path) -> Result<Vec<u8>, ShipError> {
    if !path.exists() {
        sluice_journal::chain::Signer::load_or_create(path).map_err(ShipError::NewKey)?;
    }
    std::fs::read(path).map_err(|source| ShipError::Key {
        path: path.to_path_buf(),
        source,
    })
}

/// The agent's TLS client config toward `pin`, presenting its journal key.
pub fn tls_client(
    signing_key_path: &Path,
    pin: [u8; 32],
) -> Result<Arc<rustls::ClientConfig>, ShipError> {
    let pkcs8 = signing_key(signing_key_path)?;
    let identity = pki::agent_identity(&pkcs8).map_err(|_| ShipError::BadKey {
        path: signing_key_path.to_path_buf(),
    })?;
    Ok(pki::client_config(pin, Some(identity))?)
}

/// One request to the collector over a fresh TLS connection, bounded by `timeout`.
pub async fn post(
    connector: &TlsConnector,
    addr: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ShipError> {
    let exchange = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ShipError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let mut tls = connector
            .connect(pki::server_name(), tcp)
            .await
            .map_err(|source| ShipError::Tls {
                addr: addr.to_string(),
                source,
            })?;
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        Ok::<_, ShipError>(http::roundtrip(&mut tls, host, request, http::MAX_BODY).await?)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ShipError::Timeout {
            addr: addr.to_string(),
            secs: timeout.as_secs(),
        })?
}

/// What `sluice enroll` did.
pub struct Enrolled {
    pub agent: String,
    pub fingerprint: String,
    pub file: PathBuf,
    pub public_key: String,
}

/// `sluice enroll`: proves possession of the journal key to the collector with a one-time
/// token, pinning the collector's certificate by the fingerprint the token carries, and
/// writes the enrollment file.
pub async fn enroll(
    agent: &AgentConfig,
    enrollment_file: &Path,
    collector: &str,
    token: &str,
    name: Option<&str>,
) -> Result<Enrolled, ShipError> {
    let (secret, fingerprint) = api::parse_token(token).ok_or(ShipError::BadToken)?;
    let pin = pki::parse_fingerprint(fingerprint)?;
    let pkcs8 = signing_key(&agent.signing_key)?;
    let pair =
        ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|_| {
            ShipError::BadKey {
                path: agent.signing_key.clone(),
            }
        })?;
    let public_key = ring::signature::KeyPair::public_key(&pair)
        .as_ref()
        .to_vec();
    let signature = pair.sign(&sluice_wire::api::enroll_message(secret, &public_key));
    let config = tls_client(&agent.signing_key, pin)?;
    let connector = TlsConnector::from(config);
    let body = EnrollRequest {
        token: secret.to_string(),
        agent: name.map(str::to_string),
        public_key: pki::hex(&public_key),
        signature: pki::hex(signature.as_ref()),
    };
    let response = post(
        &connector,
        collector,
        &Request::post(
            api::ENROLL_PATH,
            "application/json",
            serde_json::to_vec(&body).unwrap_or_default(),
        ),
        Duration::from_secs(30),
    )
    .await?;
    if response.status != 200 {
        return Err(ShipError::EnrollRefused(response.error_message()));
    }
    let answer: EnrollResponse = serde_json::from_slice(&response.body).map_err(|e| {
        ShipError::EnrollRefused(format!("the collector's answer does not decode: {e}"))
    })?;
    let enrollment = Enrollment {
        collector: collector.to_string(),
        collector_fingerprint: pki::hex(&pin),
        agent: Some(answer.agent.clone()),
    };
    enrollment.write(enrollment_file)?;
    Ok(Enrolled {
        agent: answer.agent,
        fingerprint: pki::hex(&pin),
        file: enrollment_file.to_path_buf(),
        public_key: pki::hex(&public_key),
    })
}

/// Shipping and spool metrics (Prometheus text format via [`ShipMetrics::render`]).
#[derive(Debug, Default)]
pub struct ShipMetrics {
    pub spool_bytes: AtomicU64,
    pub backlog_events: AtomicU64,
    /// Seconds since the oldest unshipped event was recorded (0: nothing waits).
    pub lag_seconds: AtomicU64,
    pub shipped_events: AtomicU64,
    pub errors: AtomicU64,
    /// 1 while shipping fails.
    pub failing: AtomicU64,
    /// 1 when targets protect unix sockets but the agent runs without the unix hook
    /// (`agent.unix_sockets = "unprotected"` on a kernel that cannot load it).
    pub unix_sockets_unprotected: AtomicU64,
}

impl ShipMetrics {
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "# HELP sluice_spool_bytes Bytes the journal spool occupies on disk.\n\
             # TYPE sluice_spool_bytes gauge\nsluice_spool_bytes {}\n\
             # HELP sluice_ship_backlog_events Recorded events not yet acknowledged by the collector.\n\
             # TYPE sluice_ship_backlog_events gauge\nsluice_ship_backlog_events {}\n\
             # HELP sluice_ship_lag_seconds Age of the oldest event not yet acknowledged by the collector.\n\
             # TYPE sluice_ship_lag_seconds gauge\nsluice_ship_lag_seconds {}\n\
             # HELP sluice_shipped_events_total Events the collector acknowledged.\n\
             # TYPE sluice_shipped_events_total counter\nsluice_shipped_events_total {}\n\
             # HELP sluice_ship_errors_total Shipments that failed (each is retried).\n\
             # TYPE sluice_ship_errors_total counter\nsluice_ship_errors_total {}\n\
             # HELP sluice_unix_sockets_unprotected 1: the targets' unix sockets are NOT intercepted (agent.unix_sockets = \"unprotected\").\n\
             # TYPE sluice_unix_sockets_unprotected gauge\nsluice_unix_sockets_unprotected {}\n",
            g(&self.spool_bytes),
            g(&self.backlog_events),
            g(&self.lag_seconds),
            g(&self.shipped_events),
            g(&self.errors),
            g(&self.unix_sockets_unprotected),
        )
    }

    /// Spool size, backlog and lag, read from the journal (blocking).
    pub fn refresh(&self, journal: &Journal) {
        self.spool_bytes
            .store(journal.spool_bytes(), Ordering::Relaxed);
        if let Ok(b) = journal.backlog() {
            self.backlog_events.store(b.events, Ordering::Relaxed);
            let lag = b
                .oldest_ns
                .map(|o| sluice_journal::now_ns().saturating_sub(o) / 1_000_000_000)
                .unwrap_or(0);
            self.lag_seconds.store(lag, Ordering::Relaxed);
        }
    }
}

/// Backoff with full jitter: a random wait in [0, min(cap, base * 2^attempt)].
fn backoff(attempt: u32) -> Duration {
    const BASE_MS: u64 = 200;
    const CAP_MS: u64 = 30_000;
    let ceiling = BASE_MS.saturating_mul(1u64 << attempt.min(20)).min(CAP_MS);
    let mut r = [0u8; 8];
    let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r)
        .map(|_| u64::from_le_bytes(r))
        .unwrap_or(ceiling / 2);
    // At least 50 ms, so a failing collector is never hammered.
    Duration::from_millis((random % (ceiling + 1)).max(50))
}

/// The shipper task: runs until `stop`.
pub async fn run(
    journal: Journal,
    shipper: ShipperConfig,
    agent: AgentConfig,
    metrics: Arc<ShipMetrics>,
    mut stop: broadcast::Receiver<()>,
) {
    // Not enrolled yet: wait for `sluice enroll` (checked every 2 s), no restart needed.
    let mut said = false;
    let (destination, connector) = loop {
        let ready = Destination::resolve(&shipper, &agent).and_then(|d| {
            let config = tls_client(&agent.signing_key, d.pin)?;
            Ok((d, TlsConnector::from(config)))
        });
        match ready {
            Ok(x) => break x,
            Err(e) => {
                if !said {
                    warn!(error = %crate::error_chain(&e), "NOT SHIPPING yet: the journal only grows until this is fixed (checked every 2 s)");
                    said = true;
                }
            }
        }
        tokio::select! {
            _ = stop.recv() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    };
    info!(collector = %destination.addr, fingerprint = %pki::hex(&destination.pin), "shipping the journal");
    let idle = Duration::from_millis(shipper.interval_ms.max(10));
    let timeout = Duration::from_secs(shipper.timeout_secs.max(1));
    let mut failures: u32 = 0;
    let mut last_error: Option<String> = None;
    loop {
        let outcome = tokio::select! {
            _ = stop.recv() => break,
            r = ship_once(&journal, &shipper, &destination, &connector, timeout, &metrics) => r,
        };
        let wait = match outcome {
            Ok(0) => {
                recovered(&mut failures, &mut last_error, &metrics);
                idle
            }
            Ok(_) => {
                recovered(&mut failures, &mut last_error, &metrics);
                Duration::ZERO
            }
            Err(e) => {
                metrics.errors.fetch_add(1, Ordering::Relaxed);
                metrics.failing.store(1, Ordering::Relaxed);
                let text = crate::error_chain(&e);
                // Once per state change: the first failure, and whenever the reason changes.
                let kind = error_kind(&e);
                if last_error.as_deref() != Some(kind.as_str()) {
                    warn!(collector = %destination.addr, error = %text, "shipping to the collector fails; retrying with backoff (events stay in the spool)");
                    last_error = Some(kind);
                } else {
                    debug!(error = %text, attempt = failures, "shipping still fails");
                }
                failures = failures.saturating_add(1);
                backoff(failures)
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = stop.recv() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    debug!("shipper stopped");
}

fn recovered(failures: &mut u32, last_error: &mut Option<String>, metrics: &ShipMetrics) {
    if last_error.is_some() {
        info!(
            failed_attempts = *failures,
            "shipping to the collector works again"
        );
    }
    *failures = 0;
    *last_error = None;
    metrics.failing.store(0, Ordering::Relaxed);
}

/// What "the same failure" means for logging: the variant, and the status for refusals.
fn error_kind(e: &ShipError) -> String {
    match e {
        ShipError::Refused { status, .. } => format!("refused {status}"),
        other => {
            let s = format!("{other:?}");
            s.split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default()
                .to_string()
        }
    }
}

/// Ships one batch; returns how many events it carried (0: nothing to ship).
async fn ship_once(
    journal: &Journal,
    shipper: &ShipperConfig,
    destination: &Destination,
    connector: &TlsConnector,
    timeout: Duration,
    metrics: &ShipMetrics,
) -> Result<usize, ShipError> {
    let j = journal.clone();
    let (max_events, max_bytes) = (shipper.max_batch_events, shipper.max_batch_bytes);
    let batch = tokio::task::spawn_blocking(move || j.next_batch(max_events, max_bytes)).await??;
    let Some(batch) = batch else {
        return Ok(0);
    };
    let events = batch.event_count();
    let body = batch.encode()?;
    let response = post(
        connector,
        &destination.addr,
        &Request::post(api::INGEST_PATH, "application/octet-stream", body),
        timeout,
    )
    .await?;
    if response.status != 200 {
        return Err(ShipError::Refused {
            status: response.status,
            message: response.error_message(),
        });
    }
    let report = IngestReport::decode(&response.body).map_err(ShipError::Report)?;
    // Each session's first shipped seq; an acknowledgement that moves none of them is a
    // failure (retried with backoff), not a reason to resend at full speed.
    let firsts: Vec<(sluice_journal::SessionId, u64)> = batch
        .sessions
        .iter()
        .filter_map(|s| s.events.first().map(|e| (s.summary.id, e.seq)))
        .collect();
    let stalled = !firsts.is_empty()
        && firsts.iter().all(|(id, first)| {
            report
                .sessions
                .iter()
                .find(|a| a.session == *id)
                .is_none_or(|a| a.next_seq <= *first)
        });
    for ack in &report.sessions {
        if !ack.problems.is_empty() {
            warn!(session = %ack.session, problems = ?ack.problems, "the collector flagged this session");
        }
    }
    if stalled {
        let (id, first) = firsts[0];
        let ack = report.sessions.iter().find(|a| a.session == id);
        return Err(ShipError::NoProgress {
            events,
            session: id.to_string(),
            next_seq: ack.map(|a| a.next_seq).unwrap_or(first),
            problems: ack
                .map(|a| a.problems.join("; "))
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "no reason given".into()),
        });
    }
    let j = journal.clone();
    let deleted = tokio::task::spawn_blocking(move || j.acknowledge(&report)).await??;
    metrics
        .shipped_events
        .fetch_add(events as u64, Ordering::Relaxed);
    debug!(events, sessions_deleted = deleted, "shipment acknowledged");
    // A batch of only sealed, empty sessions still made progress (they were deleted).
    Ok(events.max(deleted))
}

/// Refreshes the spool size, backlog and lag every `every` until `stop` (shipping or not, and
/// through the shipper's backoff waits), so `sluice status` and `/metrics` are current.
pub async fn refresh_metrics(
    journal: Journal,
    metrics: Arc<ShipMetrics>,
    every: Duration,
    mut stop: broadcast::Receiver<()>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        let (j, m) = (journal.clone(), metrics.clone());
        let _ = tokio::task::spawn_blocking(move || m.refresh(&j)).await;
    }
}

/// Serves `GET /metrics` (Prometheus text) on `listener` until `stop`.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<ShipMetrics>,
    journal: Journal,
    mut stop: broadcast::Receiver<()>,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = stop.recv() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        let (metrics, journal) = (metrics.clone(), journal.clone());
        tokio::spawn(async move {
            let req =
                tokio::time::timeout(Duration::from_secs(5), http::read_request(&mut stream, 0))
                    .await;
            let response = match req {
                Ok(Ok(Some(r))) if r.method == "GET" && r.path == "/metrics" => {
                    let m = metrics.clone();
                    let _ = tokio::task::spawn_blocking(move || m.refresh(&journal)).await;
                    Response::new(
                        200,
                        "text/plain; version=0.0.4",
                        metrics.render().into_bytes(),
                    )
                }
                Ok(Ok(Some(_))) => Response::error(404, "only GET /metrics is served here"),
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(e)) => Response::error(e.status(), &e.to_string()),
            };
            let _ = http::write_response(&mut stream, &response).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_below_it() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_millis(30_000), "{attempt}: {d:?}");
            assert!(d >= Duration::from_millis(50));
        }
        let early = backoff(1);
        assert!(early <= Duration::from_millis(400));
    }

    #[test]
    fn an_enrollment_file_round_trips_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("collector.toml");
        let e = Enrollment {
            collector: "127.0.0.1:7443".into(),
            collector_fingerprint: "ab".repeat(32),
            agent: Some("db1".into()),
        };
        e.write(&path).expect("written");
        assert_eq!(Enrollment::read(&path).expect("read"), Some(e));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            Enrollment::read(&dir.path().join("none")).expect("read"),
            None
        );
    }

    #[test]
    fn metrics_render_in_prometheus_text_format() {
        let m = ShipMetrics::default();
        m.shipped_events.store(7, Ordering::Relaxed);
        let text = m.render();
        assert!(text.contains("\nsluice_shipped_events_total 7\n"), "{text}");
        for name in [
            "sluice_spool_bytes",
            "sluice_ship_backlog_events",
            "sluice_ship_lag_seconds",
            "sluice_ship_errors_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
