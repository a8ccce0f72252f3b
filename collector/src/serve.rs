//! `sluice-collector serve`: opens the store, serves agents (`sluice_collector::server`) and
//! runs retention. The store is `sluice_journal::Store` in `DIR/store`, encrypted with
//! `DIR/store.key`; this process is its only writer (the read commands open it read-only).
//!
//! Retention runs at start and then every hour: sessions that ended (or, never sealed,
//! started) more than `--retention-days` ago are deleted, and each purge that removed anything
//! is written to the audit log with the cutoff and the session ids.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sluice_collector::registry::{AuditRecord, Registry, format_ns};
use sluice_collector::server;
use sluice_collector::server::{IngestError, Server, Sink};
use sluice_journal::{ShipBatch, Store};
use sluice_wire::pki;
use tracing::{debug, error, info, warn};

use crate::Layout;

/// The journal store as the server's sink.
struct StoreSink(Arc<Store>);

impl Sink for StoreSink {
    fn ingest(&self, agent: &str, public_key: &[u8], body: &[u8]) -> Result<Vec<u8>, IngestError> {
        let batch = ShipBatch::decode(body)
            .map_err(|e| IngestError::BadBatch(sluice_collector::error_chain(&e)))?;
        let report = self
            .0
            .ingest(agent, public_key, &batch)
            .map_err(|e| IngestError::Store(sluice_collector::error_chain(&e)))?;
        for ack in &report.sessions {
            if !ack.problems.is_empty() {
                warn!(agent, session = %ack.session, problems = ?ack.problems, "session stored FLAGGED");
            }
        }
        debug!(
            agent,
            sessions = batch.sessions.len(),
            events = batch.event_count(),
            bytes = body.len(),
            "shipment stored"
        );
        report
            .encode()
            .map_err(|e| IngestError::Store(sluice_collector::error_chain(&e)))
    }
}

pub fn run(
    layout: &Layout,
    listen: Option<std::net::SocketAddr>,
    retention_secs: Option<u64>,
    retention_every_secs: u64,
) -> anyhow::Result<()> {
    init_logging();
    let listen = match listen {
        Some(a) => a,
        None => layout.listen()?,
    };
    let chain = vec![CertificateDer::from(layout.cert_der()?)];
    let key = PrivateKeyDer::from_pem_file(layout.key())
        .with_context(|| format!("cannot read the TLS key {}", layout.key().display()))?;
    let fingerprint = layout.fingerprint()?;
    let tls = pki::server_config(chain, key)?;
    let store = Arc::new(
        Store::open(&layout.store(), Some(&layout.store_key()))
            .with_context(|| format!("cannot open the store {}", layout.store().display()))?,
    );
    let registry = Arc::new(Registry::open(&layout.dir));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let server = Arc::new(Server {
            registry: registry.clone(),
            sink: Arc::new(StoreSink(store.clone())),
            fingerprint: fingerprint.clone(),
            tls: tokio_rustls::TlsAcceptor::from(tls),
            max_connections: 256,
            enrollments: Default::default(),
        });
        let retention = retention_secs.map(|secs| {
            tokio::spawn(retention_loop(
                store.clone(),
                registry.clone(),
                secs,
                Duration::from_secs(retention_every_secs.max(1)),
            ))
        });
        match retention_secs {
            Some(secs) => info!(
                days = secs as f64 / 86_400.0,
                "retention: recordings older than this are purged"
            ),
            None => warn!("no --retention-days: recordings are kept until deleted by hand"),
        }
        info!(%listen, %fingerprint, store = %layout.store().display(), "sluice-collector ready");
        let shutdown = shutdown_signal()?;
        server::serve(listener, server, shutdown).await;
        if let Some(r) = retention {
            r.abort();
        }
        info!("sluice-collector stopped");
        Ok(())
    })
}

async fn retention_loop(store: Arc<Store>, registry: Arc<Registry>, secs: u64, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (store, registry) = (store.clone(), registry.clone());
        let run = tokio::task::spawn_blocking(move || purge(&store, &registry, secs)).await;
        match run {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %format!("{e:#}"), "retention purge failed; retrying at the next run")
            }
            Err(e) => error!(error = %e, "retention purge panicked"),
        }
    }
}

fn purge(store: &Store, registry: &Registry, secs: u64) -> anyhow::Result<()> {
    let now = sluice_journal::now_ns();
    let cutoff = now.saturating_sub(secs.saturating_mul(1_000_000_000));
    let purged = store.purge_before(cutoff)?;
    if purged.is_empty() {
        info!(cutoff = %format_ns(cutoff), "retention: nothing to purge");
        return Ok(());
    }
    let ids: Vec<String> = purged.iter().map(|s| s.id.to_string()).collect();
    registry.audit(&AuditRecord {
        ts_ns: now,
        kind: "purge".into(),
        agent: None,
        detail: format!(
            "retention ({}): {} sessions that ended before {} purged",
            if secs.is_multiple_of(86_400) {
                format!("{} days", secs / 86_400)
            } else {
                format!("{secs} s")
            },
            ids.len(),
            format_ns(cutoff)
        ),
        sessions: ids.clone(),
    })?;
    info!(sessions = ids.len(), cutoff = %format_ns(cutoff), ids = ?ids, "retention: sessions purged");
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Resolves on SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
