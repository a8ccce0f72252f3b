//! End to end: the real `sluice-collector` (TLS on loopback, its store on disk) and the real
//! `sluice` agent shipping to it.
//!
//! - Enrollment and shipping, and the loss test, run the agent with eBPF in a test cgroup
//!   (root; they skip loudly outside CI and fail under `CI=true`).
//! - Security and retention need no root: a test "agent" here is a `sluice_journal::Journal`
//!   in a temp dir with its own Ed25519 key, and the requests are made with the same TLS and
//!   HTTP code the agent uses (`sluice_wire::{pki, http}`), so each refusal is the
//!   collector's own answer to a real TLS client.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use sluice_journal::{IngestReport, Journal, JournalOptions, SessionId, SessionStart, ShipBatch};
use sluice_tests::collector::{Collector, ServeOptions};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_session_args, require_root,
    run_bounded, sluice_bin,
};
use sluice_wire::api::{self, EnrollRequest};
use sluice_wire::http::{self, Request, Response};
use sluice_wire::pki;

const LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A stand-in agent: a signed journal in a temp dir, and TLS/HTTP requests as the agent makes.

struct FakeAgent {
    _dir: tempfile::TempDir,
    journal: Journal,
    pkcs8: Vec<u8>,
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_be_bytes());
    m.extend_from_slice(body);
    m
}

impl FakeAgent {
    fn new() -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("signing.key");
        let journal = Journal::open_with(
            &dir.path().join("journal"),
            &JournalOptions {
                signing_key: Some(key.clone()),
                ..JournalOptions::default()
            },
        )
        .unwrap();
        let pkcs8 = std::fs::read(&key).unwrap();
        FakeAgent {
            _dir: dir,
            journal,
            pkcs8,
        }
    }

    fn public_key(&self) -> Vec<u8> {
        self.journal.public_key().unwrap()
    }

    fn identity(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        pki::agent_identity(&self.pkcs8).unwrap()
    }

    /// A sealed session running `sql`, one Query each.
    fn record(&self, sql: &[&str]) -> SessionId {
        let rec = self
            .journal
            .start_session(SessionStart {
                target: "app-db".into(),
                protocol: "postgres".into(),
                orig_dst: "127.0.0.1:5432".into(),
                client_addr: "127.0.0.1:40000".into(),
                process: None,
                params: vec![("user".into(), "app".into())],
                principal: None,
            })
            .unwrap();
        for q in sql {
            let mut body = q.as_bytes().to_vec();
            body.push(0);
            rec.client(Bytes::from(message(b'Q', &body)), 1).unwrap();
            let mut reply = message(b'C', b"SELECT 1\0");
            reply.extend(message(b'Z', b"I"));
            rec.server(Bytes::from(reply)).unwrap();
        }
        rec.end("client closed").unwrap();
        rec.id()
    }

    /// The unshipped events of `session` as one batch.
    fn batch(&self, session: SessionId) -> ShipBatch {
        let mut b = self.journal.next_batch(100_000, 64 << 20).unwrap().unwrap();
        b.sessions.retain(|s| s.summary.id == session);
        assert_eq!(b.sessions.len(), 1, "session {session} is in the journal");
        b
    }

    fn enroll(&self, c: &Collector, token: &str) -> Response {
        let (secret, fingerprint) = api::parse_token(token).unwrap();
        let pair =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&self.pkcs8).unwrap();
        let key = self.public_key();
        let sig = pair.sign(&api::enroll_message(secret, &key));
        let body = EnrollRequest {
            token: secret.into(),
            agent: None,
            public_key: pki::hex(&key),
            signature: pki::hex(sig.as_ref()),
        };
        post(
            c,
            pki::parse_fingerprint(fingerprint).unwrap(),
            None,
            &Request::post(
                api::ENROLL_PATH,
                "application/json",
                serde_json::to_vec(&body).unwrap(),
            ),
        )
    }

    fn ingest(&self, c: &Collector, batch: &ShipBatch) -> Response {
        ingest_as(c, Some(self.identity()), batch)
    }
}

fn ingest_as(
    c: &Collector,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    batch: &ShipBatch,
) -> Response {
    let pin = pki::parse_fingerprint(&c.fingerprint().unwrap()).unwrap();
    post(
        c,
        pin,
        identity,
        &Request::post(
            api::INGEST_PATH,
            "application/octet-stream",
            batch.encode().unwrap(),
        ),
    )
}

/// One request over a fresh TLS connection, as the agent's shipper makes it.
fn post(
    c: &Collector,
    pin: [u8; 32],
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    req: &Request,
) -> Response {
    let config = pki::client_config(pin, identity).unwrap();
    let addr = c.addr();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(pki::server_name(), tcp)
                .await
                .unwrap();
            tokio::time::timeout(
                Duration::from_secs(30),
                http::roundtrip(&mut tls, "127.0.0.1", req, http::MAX_BODY),
            )
            .await
            .unwrap()
            .unwrap()
        })
}

fn report(r: &Response) -> IngestReport {
    assert_eq!(r.status, 200, "{}", r.error_message());
    IngestReport::decode(&r.body).unwrap()
}

fn serving() -> Collector {
    let mut c = Collector::init().unwrap();
    c.start().unwrap();
    c
}

fn verify(c: &Collector, session: Option<&SessionId>) -> sluice_tests::Output {
    let id = session.map(|s| s.to_string());
    let mut args = vec!["verify"];
    if let Some(id) = &id {
        args.extend(["--session", id.as_str()]);
    }
    c.read(&args).unwrap()
}

fn session_json(c: &Collector, id: &SessionId) -> Value {
    c.sessions()
        .unwrap()
        .into_iter()
        .find(|s| s["id"] == id.to_string())
        .unwrap_or_else(|| panic!("session {id} not in the store"))
}

// ---------------------------------------------------------------------------------------------
// Security (no root needed)

#[test]
fn ingest_without_a_client_certificate_or_with_an_unenrolled_key_is_refused() {
    let c = serving();
    let agent = FakeAgent::new();
    let id = agent.record(&["select 1"]);
    let batch = agent.batch(id);

    let r = ingest_as(&c, None, &batch);
    assert_eq!(r.status, 401, "{}", r.error_message());
    assert!(
        r.error_message().contains("sluice enroll"),
        "{}",
        r.error_message()
    );

    let r = agent.ingest(&c, &batch);
    assert_eq!(r.status, 403, "{}", r.error_message());
    assert!(
        r.error_message().contains("not enrolled"),
        "{}",
        r.error_message()
    );
    assert!(c.sessions().unwrap().is_empty(), "nothing was stored");

    // Enrolled, it is accepted; revoked, refused again with the reason.
    let token = c.token("db1", "10m").unwrap();
    assert_eq!(agent.enroll(&c, &token).status, 200);
    assert_eq!(
        report(&agent.ingest(&c, &batch)).sessions[0].next_seq,
        batch.sessions[0].events.len() as u64
    );
    let out = c.admin(&["revoke", "--agent", "db1"]).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    let r = agent.ingest(&c, &batch);
    assert_eq!(r.status, 403);
    assert!(
        r.error_message().contains("revoked"),
        "{}",
        r.error_message()
    );
}

#[test]
fn expired_used_and_unknown_enrollment_tokens_are_refused_with_what_to_do() {
    let c = serving();
    let agent = FakeAgent::new();
    let expired = c.token("db1", "1s").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let r = agent.enroll(&c, &expired);
    assert_eq!(r.status, 403);
    assert!(
        r.error_message().contains("expired"),
        "{}",
        r.error_message()
    );
    assert!(
        r.error_message().contains("new one"),
        "{}",
        r.error_message()
    );

    let token = c.token("db1", "10m").unwrap();
    assert_eq!(agent.enroll(&c, &token).status, 200);
    let r = FakeAgent::new().enroll(&c, &token);
    assert_eq!(r.status, 403);
    assert!(
        r.error_message().contains("already used"),
        "{}",
        r.error_message()
    );

    let fp = c.fingerprint().unwrap();
    let r = agent.enroll(&c, &api::format_token("made-up", &fp));
    assert_eq!(r.status, 403);
    assert!(
        r.error_message().contains("unknown"),
        "{}",
        r.error_message()
    );

    // Only the good one enrolled anything; the audit log has all four.
    let agents = c.admin(&["agents", "--json"]).unwrap();
    let list: Value = serde_json::from_str(&agents.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["public_key"], pki::hex(&agent.public_key()));
    let audit = c.admin(&["audit"]).unwrap().stdout;
    assert_eq!(audit.matches("enroll-refused").count(), 3, "{audit}");
}

#[test]
fn a_pinned_agent_refuses_a_collector_with_another_certificate() {
    let c = serving();
    let config = pki::client_config([7u8; 32], None).unwrap();
    let addr = c.addr();
    let err = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(pki::server_name(), tcp)
                .await
                .map(|_| ())
        })
        .expect_err("the handshake fails");
    assert!(err.to_string().contains("not the pinned"), "{err}");
}

#[test]
fn replayed_altered_and_foreign_signed_batches_are_absorbed_or_flagged_never_stored_as_good() {
    let c = serving();
    let agent = FakeAgent::new();
    let token = c.token("db1", "10m").unwrap();
    assert_eq!(agent.enroll(&c, &token).status, 200);

    // A good batch, then the same batch again: absorbed, the store unchanged.
    let good = agent.record(&["select 1", "select 2"]);
    let batch = agent.batch(good);
    let first = report(&agent.ingest(&c, &batch));
    assert!(
        first.sessions[0].problems.is_empty(),
        "{:?}",
        first.sessions[0].problems
    );
    let before = c.sessions().unwrap();
    let again = report(&agent.ingest(&c, &batch));
    assert_eq!(again.sessions[0].next_seq, first.sessions[0].next_seq);
    assert!(
        again.sessions[0].problems.is_empty(),
        "{:?}",
        again.sessions[0].problems
    );
    assert_eq!(c.sessions().unwrap(), before);
    assert_eq!(session_json(&c, &good)["integrity"], "verified");
    let out = verify(&c, Some(&good));
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);

    // An event's bytes altered (still a valid encoding): stored flagged; verify names it.
    let altered_id = agent.record(&["select 1", "select 2", "select 3"]);
    let mut altered = agent.batch(altered_id);
    let mut changed = None;
    for e in &mut altered.sessions[0].events {
        if let Some(i) = e.value.windows(8).position(|w| w == b"select 2") {
            e.value[i + 7] = b'9';
            changed = Some(e.seq);
            break;
        }
    }
    let changed = changed.expect("the statement is in an event");
    let r = report(&agent.ingest(&c, &altered));
    assert!(!r.sessions[0].problems.is_empty(), "flagged on ingest");
    let s = session_json(&c, &altered_id);
    assert!(
        s["integrity"].as_str().unwrap().starts_with("FLAGGED"),
        "{s}"
    );
    // The batch carries the agent's per-event hashes: verify names the changed event itself.
    let out = verify(&c, Some(&altered_id));
    assert!(!out.status.success());
    let named: u64 = out
        .stdout
        .split("FAILED at event ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("verify names an event:\n{}", out.stdout));
    assert_eq!(
        named, changed,
        "event {changed} changed, {named} named:\n{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("FLAGGED by the collector"),
        "{}",
        out.stdout
    );

    // Checkpoints signed by another key than the enrolled one: flagged.
    let other = FakeAgent::new();
    let foreign_id = other.record(&["select 1"]);
    let foreign = other.batch(foreign_id);
    let r = report(&agent.ingest(&c, &foreign));
    assert!(
        !r.sessions[0].problems.is_empty(),
        "a foreign key is flagged"
    );
    let s = session_json(&c, &foreign_id);
    assert!(
        s["integrity"].as_str().unwrap().starts_with("FLAGGED"),
        "{s}"
    );
    assert!(!verify(&c, Some(&foreign_id)).status.success());

    // The good session is still good.
    assert!(verify(&c, Some(&good)).status.success());
}

#[test]
fn a_body_that_is_not_a_shipment_is_400_and_oversized_or_unauthorised_bodies_are_refused_before_they_are_read()
 {
    let c = serving();
    let agent = FakeAgent::new();
    let token = c.token("db1", "10m").unwrap();
    assert_eq!(agent.enroll(&c, &token).status, 200);
    let pin = pki::parse_fingerprint(&c.fingerprint().unwrap()).unwrap();
    let r = post(
        &c,
        pin,
        Some(agent.identity()),
        &Request::post(
            api::INGEST_PATH,
            "application/octet-stream",
            b"garbage".to_vec(),
        ),
    );
    assert_eq!(r.status, 400, "{}", r.error_message());

    // Refused from the head alone, before any body byte is sent: declared larger than 64 MiB
    // by an agent; a large enrollment; a large ingest from a key nobody enrolled.
    let head =
        |path: &str, len: usize| format!("POST {path} HTTP/1.1\r\ncontent-length: {len}\r\n\r\n");
    let r = raw(
        &c,
        Some(agent.identity()),
        &head(api::INGEST_PATH, 67_108_865),
    );
    assert_eq!(r.status, 413, "{}", r.error_message());
    let r = raw(&c, None, &head(api::ENROLL_PATH, 100_000));
    assert_eq!(r.status, 413, "{}", r.error_message());
    let stranger = FakeAgent::new();
    let r = raw(
        &c,
        Some(stranger.identity()),
        &head(api::INGEST_PATH, 60_000_000),
    );
    assert_eq!(r.status, 403, "{}", r.error_message());
    let r = raw(&c, None, &head(api::INGEST_PATH, 60_000_000));
    assert_eq!(r.status, 401, "{}", r.error_message());
}

/// Sends `head` alone (no body) over TLS and reads the answer.
fn raw(
    c: &Collector,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    head: &str,
) -> Response {
    let pin = pki::parse_fingerprint(&c.fingerprint().unwrap()).unwrap();
    let config = pki::client_config(pin, identity).unwrap();
    let addr = c.addr();
    let head = head.as_bytes().to_vec();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            use tokio::io::AsyncWriteExt;
            let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(pki::server_name(), tcp)
                .await
                .unwrap();
            tls.write_all(&head).await.unwrap();
            tokio::time::timeout(
                Duration::from_secs(10),
                http::read_response(&mut tls, 1 << 20),
            )
            .await
            .unwrap()
            .unwrap()
        })
}

// ---------------------------------------------------------------------------------------------
// Retention (no root needed)

#[test]
fn sessions_past_the_retention_are_purged_and_the_purge_is_audited() {
    let mut c = Collector::init().unwrap();
    c.options = ServeOptions {
        retention_secs: Some(6),
        retention_interval_secs: Some(1),
    };
    c.start().unwrap();
    let agent = FakeAgent::new();
    let token = c.token("db1", "10m").unwrap();
    assert_eq!(agent.enroll(&c, &token).status, 200);

    let old = agent.record(&["select 'old'"]);
    report(&agent.ingest(&c, &agent.batch(old)));
    std::thread::sleep(Duration::from_secs(4));
    let new = agent.record(&["select 'new'"]);
    report(&agent.ingest(&c, &agent.batch(new)));

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ids: Vec<String> = c
            .sessions()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap_or_default().to_string())
            .collect();
        if !ids.contains(&old.to_string()) {
            assert!(
                ids.contains(&new.to_string()),
                "the newer session is kept while the older is purged: {ids:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not purged in 20 s; log:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The purge is audited right after it (bounded wait: the listing may come in between).
    let purge = loop {
        let audit = c.admin(&["audit", "--json"]).unwrap().stdout;
        let found = audit
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["kind"] == "purge");
        if let Some(p) = found {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "no purge in the audit log:\n{audit}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        purge["sessions"]
            .as_array()
            .unwrap()
            .contains(&Value::from(old.to_string())),
        "{purge}"
    );
    assert!(
        c.admin(&["audit"])
            .unwrap()
            .stdout
            .contains(&old.to_string())
    );
}

// ---------------------------------------------------------------------------------------------
// With the real agent (root: eBPF, cgroups)

struct Setup {
    agent: Agent,
    cgroup: Cgroup,
    collector: Collector,
    pg: Postgres,
}

fn setup(name: &str) -> Setup {
    setup_with(name, "")
}

fn setup_with(name: &str, agent_config: &str) -> Setup {
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let mut collector = Collector::init().unwrap();
    collector.start().unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        extra_config: "[shipper]\ninterval_ms = 100\n".into(),
        agent_config: agent_config.into(),
        ..AgentOptions::default()
    })
    .unwrap();
    let token = collector.token(name, "10m").unwrap();
    let out = run_bounded(
        &mut collector.enroll_command(&sluice_bin(), &token, &agent.config),
        LIMIT,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "sluice enroll: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("enrolled as agent"), "{}", out.stdout);
    Setup {
        agent,
        cgroup,
        collector,
        pg,
    }
}

impl Setup {
    /// Waits (bounded) until the agent's spool holds no session and the collector `n`.
    fn wait_shipped(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let spooled = self.agent.sessions().unwrap();
            let stored = self.collector.sessions().unwrap();
            let sealed = stored.iter().filter(|s| !s["end"].is_null()).count();
            if spooled.is_empty() && stored.len() >= n && sealed == stored.len() {
                return stored;
            }
            assert!(
                Instant::now() < deadline,
                "not shipped within {within:?}: {} spooled, {} stored\nagent log:\n{}\ncollector log:\n{}",
                spooled.len(),
                stored.len(),
                self.agent.log(),
                self.collector.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn an_enrolled_agent_ships_every_statement_and_its_spool_deletes_what_the_collector_stored() {
    if !require_root(
        "an_enrolled_agent_ships_every_statement_and_its_spool_deletes_what_the_collector_stored",
    ) {
        return;
    }
    let metrics_port = sluice_tests::free_port();
    let s = setup_with(
        "ship",
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n"),
    );
    let statements = [
        "create table shipped (id int, name text)",
        "insert into shipped values (1, 'ada'), (2, 'grace')",
        "select name from shipped order by id",
        "select 'the last one'",
    ];
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(psql_session_args(s.pg.port, &statements));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("grace"), "{}", out.stdout);

    let stored = s.wait_shipped(1, Duration::from_secs(30));
    assert_eq!(stored.len(), 1, "{stored:?}");
    let session = &stored[0];
    assert_eq!(session["statements"], statements.len() as u64, "{session}");
    assert_eq!(session["integrity"], "verified", "{session}");
    let id = session["id"].as_str().unwrap();

    let out = s.collector.read(&["verify"]).unwrap();
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let replay = s.collector.read(&["replay", id]).unwrap();
    assert!(replay.status.success(), "{}", replay.stderr);
    for st in statements {
        assert!(
            replay.stdout.contains(st),
            "replay lacks {st:?}:\n{}",
            replay.stdout
        );
    }
    assert!(replay.stdout.contains("grace"), "{}", replay.stdout);

    // The metrics say it: shipped events, nothing waiting, no error; `sluice status` too.
    assert!(s.agent.sessions().unwrap().is_empty());
    let metrics = get_metrics(metrics_port);
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in:\n{metrics}"))
    };
    assert!(value("sluice_shipped_events_total") >= session["events"].as_u64().unwrap());
    assert_eq!(value("sluice_ship_backlog_events"), 0, "{metrics}");
    assert_eq!(value("sluice_ship_errors_total"), 0, "{metrics}");
    assert!(value("sluice_spool_bytes") > 0, "{metrics}");
    let status = s.agent.control(None, &["status"]).unwrap();
    assert!(status.status.success(), "{}", status.stderr);
    assert!(
        status.stdout.contains("sluice_shipped_events_total "),
        "{}",
        status.stdout
    );
    assert!(s.agent.logged("shipping the journal"), "{}", s.agent.log());
}

/// `GET /metrics` on the agent's metrics endpoint (plain HTTP).
fn get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

#[test]
fn stopping_the_collector_under_load_loses_and_duplicates_nothing() {
    if !require_root("stopping_the_collector_under_load_loses_and_duplicates_nothing") {
        return;
    }
    let mut s = setup("loss");
    let script = tempfile::Builder::new().suffix(".sql").tempfile().unwrap();
    std::fs::write(
        script.path(),
        "\\set n random(1, 1000000)\nselect :n as n;\n",
    )
    .unwrap();
    std::fs::set_permissions(
        script.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let clients = 4;
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "pgbench");
    // A steady 400 transactions per second for 12 s, one statement each.
    cmd.args(["-n", "-h", "127.0.0.1", "-U", "postgres", "-p"])
        .arg(s.pg.port.to_string())
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-T",
            "12",
            "-R",
            "400",
        ])
        .arg("-f")
        .arg(script.path())
        .arg("postgres");
    let bench = std::thread::spawn(move || run_bounded(&mut cmd, Duration::from_secs(120)));

    // Let some shipments through, then take the collector away for a while, under load.
    std::thread::sleep(Duration::from_secs(3));
    let before_outage = s.collector.sessions().unwrap().len();
    s.collector.stop();
    std::thread::sleep(Duration::from_secs(5));
    // Meanwhile the agent says what waits and for how long.
    let status = s.agent.control(None, &["status"]).unwrap().stdout;
    let value = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in:\n{status}"))
    };
    assert!(value("sluice_ship_errors_total") > 0, "{status}");
    assert!(value("sluice_ship_backlog_events") > 0, "{status}");
    assert!(value("sluice_ship_lag_seconds") >= 3, "{status}");
    s.collector.start().unwrap();

    let out = bench.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "pgbench: {}{}",
        out.stdout,
        out.stderr
    );
    let ran: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("pgbench's count: {}", out.stdout));
    assert!(ran > 1000, "a steady load ran: {ran}");
    // pgbench opens one more connection of its own, which runs no statement.
    let stored = s.wait_shipped(clients + 1, Duration::from_secs(90));
    let working: Vec<&Value> = stored
        .iter()
        .filter(|x| x["statements"].as_u64().unwrap() > 0)
        .collect();
    assert_eq!(working.len(), clients, "one session per client: {stored:?}");
    let total: u64 = stored
        .iter()
        .map(|x| x["statements"].as_u64().unwrap())
        .sum();
    assert_eq!(total, ran, "every statement pgbench ran, exactly once");
    for x in &stored {
        assert_eq!(x["integrity"], "verified", "{x}");
    }
    let out = s.collector.read(&["verify"]).unwrap();
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(before_outage >= 1, "shipping ran before the outage");
    // The shipper logged the outage once and the recovery once, not every retry.
    let log = s.agent.log();
    let failing = log.matches("shipping to the collector fails").count();
    assert!(
        (1..=3).contains(&failing),
        "{failing} failure lines:\n{log}"
    );
    assert!(
        log.contains("shipping to the collector works again"),
        "{log}"
    );
}

/// A psycopg client that runs two statements, prints their results (flushed), then holds the
/// session open.
const HOLD: &str = r#"
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=15)
print(conn.execute("select 'before the crash'").fetchone()[0], flush=True)
print(conn.execute("select string_agg(g::text, ',') from generate_series(1, 5) g").fetchone()[0], flush=True)
time.sleep(60)
"#;

#[test]
fn a_session_interrupted_by_kill_9_reaches_the_collector_whole_and_sealed_as_interrupted() {
    if !require_root(
        "a_session_interrupted_by_kill_9_reaches_the_collector_whole_and_sealed_as_interrupted",
    ) {
        return;
    }
    use std::io::{BufRead, BufReader};
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("collector-kill").unwrap();
    let mut collector = Collector::init().unwrap();
    collector.start().unwrap();
    let keep = tempfile::tempdir().unwrap();
    let journal = keep.path().join("journal");
    let pin = format!(
        "/sys/fs/bpf/sluice-test-collector-kill-{}",
        std::process::id()
    );
    let options = || AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        journal_dir: Some(journal.clone()),
        pin_dir: Some(pin.clone()),
        extra_config: "[shipper]\ninterval_ms = 100\n".into(),
        ..AgentOptions::default()
    };
    let mut first = Agent::start(options()).unwrap();
    let token = collector.token("crashy", "10m").unwrap();
    let out = run_bounded(
        &mut collector.enroll_command(&sluice_bin(), &token, &first.config),
        LIMIT,
    )
    .unwrap();
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);

    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut held = cgroup
        .command(Some(CLIENT_UID), "/usr/bin/python3")
        .args(["-c", HOLD, &conninfo])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = held.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut received = Vec::new();
    let deadline = Instant::now() + LIMIT;
    while received.len() < 2 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            received.push(line);
        }
    }
    assert_eq!(received.len(), 2, "{received:?}\n{}", first.log());
    // The open session ships while it runs (bounded wait), then the agent is killed.
    let deadline = Instant::now() + LIMIT;
    while collector.sessions().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "{}", first.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = first.pid().unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    first.stop();
    let _ = held.kill();
    let _ = held.wait();

    // The next agent seals the session as interrupted and ships the rest.
    let second = Agent::start(options()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let stored = collector.sessions().unwrap();
        let done = second.sessions().unwrap().is_empty()
            && stored.len() == 1
            && !stored[0]["end"].is_null();
        if done {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "{stored:?}\n{}\n{}",
            second.log(),
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let session = &stored[0];
    assert!(
        session["end_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("interrupted"),
        "{session}"
    );
    assert_eq!(session["integrity"], "verified", "{session}");
    // (The seal at restart does not recount `statements`; the replay below shows both.)
    let id = session["id"].as_str().unwrap();
    let replay = collector.read(&["replay", id]).unwrap();
    for seen in ["before the crash", "1,2,3,4,5", "generate_series"] {
        assert!(replay.stdout.contains(seen), "{seen}:\n{}", replay.stdout);
    }
    assert!(collector.read(&["verify"]).unwrap().status.success());
}

#[test]
fn the_collector_binary_explains_itself() {
    let out = run_bounded(
        Command::new(sluice_tests::collector::collector_bin()).arg("--help"),
        LIMIT,
    )
    .unwrap();
    assert!(out.status.success());
    for word in ["init", "token", "serve", "agents", "revoke", "audit"] {
        assert!(out.stdout.contains(word), "{word}: {}", out.stdout);
    }
}

/// Shipper throughput to a local collector: the shipper's own sequence (next_batch, POST over
/// mutual TLS, acknowledge) over a journal of 20 000 statements (40 000 events). Prints
/// events/s; run with `--ignored --nocapture` (numbers from a release build mean more).
#[test]
#[ignore]
fn shipper_throughput_to_a_local_collector() {
    let c = serving();
    let agent = FakeAgent::new();
    let token = c.token("bench", "10m").unwrap();
    assert_eq!(agent.enroll(&c, &token).status, 200);
    let statements: Vec<String> = (0..200)
        .map(|i| format!("select {i}, 'some text'"))
        .collect();
    let sql: Vec<&str> = statements.iter().map(String::as_str).collect();
    for _ in 0..100 {
        agent.record(&sql);
    }
    let started = Instant::now();
    let (mut events, mut bytes, mut shipments) = (0usize, 0usize, 0usize);
    while let Some(batch) = agent.journal.next_batch(5000, 4 << 20).unwrap() {
        events += batch.event_count();
        bytes += batch.encode().unwrap().len();
        shipments += 1;
        let r = report(&agent.ingest(&c, &batch));
        agent.journal.acknowledge(&r).unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "shipped {events} events ({} MiB) in {shipments} shipments in {secs:.2} s: {:.0} events/s, {:.1} MiB/s",
        bytes >> 20,
        events as f64 / secs,
        bytes as f64 / secs / f64::from(1u32 << 20)
    );
    assert!(agent.journal.next_batch(5000, 4 << 20).unwrap().is_none());
    assert!(verify(&c, None).status.success());
}
