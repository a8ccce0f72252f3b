//! End to end: people authenticated by sluice (OIDC tokens from a real `oidc-provider` on
//! loopback, `sluice login`'s device flow, workload identities), TLS on both legs (a throwaway
//! CA; the backend's pg_hba only lets the role in over TLS with SCRAM), injected backend
//! credentials, real clients (psql, psycopg 3, the PostgreSQL JDBC driver, pgbench), and a real
//! CancelRequest mapped from sluice's key to the backend's.
//!
//! Target `prod-db`: `auth = "sluice"`, `client_tls = "required"`, `backend_tls = "verify-full"`.
//! Roles: `app_rw` (SCRAM, password from a root-only file, for group developers) and `app_md5`
//! (MD5, password from an environment variable, for ada only). Processes in the `svc` child
//! cgroup are the workload `billing-svc` (group developers).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use sluice_tests::oidc::{self, Provider};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Output, PgOptions, Postgres, TestCa, contains_bytes,
    pg_target, require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);
const RW_SECRET: &str = "rw-Secret-7f3a0c";
const MD5_SECRET: &str = "md5-Secret-91c2e4";

/// Drop order: the child cgroup before its parent.
struct Setup {
    agent: Agent,
    svc: Cgroup,
    cgroup: Cgroup,
    pg: Postgres,
    idp: &'static Provider,
    _ca: TestCa,
    _secrets: tempfile::TempDir,
}

fn setup(name: &str) -> Option<Setup> {
    if !oidc::node_available() {
        return None;
    }
    setup_with(name, oidc::shared(), "")
}

fn setup_with(name: &str, idp: &'static Provider, agent_config: &str) -> Option<Setup> {
    let ca = TestCa::new().unwrap();
    let (pg_cert, pg_key) = ca.issue("postgres").unwrap();
    let (sl_cert, sl_key) = ca.issue("sluice").unwrap();
    let pg = Postgres::start_with(PgOptions {
        tls: Some((pg_cert, pg_key)),
        hba: vec![
            "hostnossl all app_rw all reject".into(),
            "hostssl all app_rw all scram-sha-256".into(),
            "host all app_md5 all md5".into(),
        ],
        ..PgOptions::default()
    })
    .unwrap();
    pg.sql(&format!(
        "create role app_rw login password '{RW_SECRET}'; grant create on schema public to app_rw; \
         set password_encryption = 'md5'; create role app_md5 login password '{MD5_SECRET}';"
    ))
    .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let rw_file = secrets.path().join("app_rw");
    std::fs::write(&rw_file, format!("{RW_SECRET}\n")).unwrap();
    std::fs::set_permissions(
        &rw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let svc_path = cgroup.path.join("svc");
    std::fs::create_dir(&svc_path).unwrap();
    let svc = Cgroup { path: svc_path };
    let mut target = pg_target("prod-db", &format!("127.0.0.1:{}", pg.port));
    target.push_str(&format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_tls = \"required\"\nbackend_tls = \"verify-full\"\nbackend_ca = \"{}\"\nauth = \"sluice\"\n\
         [[target.role]]\nname = \"app_rw\"\npassword_file = \"{}\"\nallow = [\"group:developers\"]\n\
         [[target.role]]\nname = \"app_md5\"\npassword_env = \"SLUICE_TEST_MD5\"\nallow = [\"user:ada@example.com\"]\n",
        sl_cert.display(),
        sl_key.display(),
        ca.cert.display(),
        rw_file.display()
    ));
    let extra = format!(
        "[oidc]\nissuer = \"{}\"\naudience = \"sluice\"\nleeway_secs = 1\n\n\
         [[identity]]\ncgroup = \"{}\"\nprincipal = \"billing-svc\"\ngroups = [\"developers\"]\n",
        idp.issuer,
        svc.path.display()
    );
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![target],
        extra_config: extra,
        env: vec![("SLUICE_TEST_MD5".into(), MD5_SECRET.into())],
        agent_config: agent_config.to_string(),
        ..AgentOptions::default()
    })
    .unwrap();
    Some(Setup {
        agent,
        svc,
        cgroup,
        pg,
        idp,
        _ca: ca,
        _secrets: secrets,
    })
}

impl Setup {
    /// psql as `uid` in `cgroup` with `conn` (a libpq connection string without host/port),
    /// the password from PGPASSWORD when given, never prompting.
    fn psql(
        &self,
        cgroup: &Cgroup,
        uid: u32,
        conn: &str,
        password: Option<&str>,
        sql: &str,
    ) -> Output {
        let mut cmd = cgroup.command(Some(uid), "psql");
        cmd.args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(format!(
                "host=127.0.0.1 port={} dbname=postgres {conn}",
                self.pg.port
            ));
        cmd.env_remove("PGPASSWORD");
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    fn token(&self, account: &str) -> String {
        self.idp.id_token(account, 600, "sluice")
    }

    fn export(&self) -> Vec<Value> {
        self.agent.export().unwrap()
    }
}

#[test]
fn psql_with_a_token_over_tls_reaches_the_backend_as_the_role_with_injected_credentials() {
    if !require_root(
        "psql_with_a_token_over_tls_reaches_the_backend_as_the_role_with_injected_credentials",
    ) {
        return;
    }
    let Some(s) = setup("id-token") else { return };
    let token = s.token("ada");
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        Some(&token),
        "select current_user || '|' || (select ssl from pg_stat_ssl where pid = pg_backend_pid()) || '|' || current_setting('application_name')",
    );
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    assert_eq!(
        out.stdout.trim(),
        "app_rw|true|psql [sluice:ada@example.com]"
    );
    // The MD5 role, for ada only.
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_md5 sslmode=require",
        Some(&token),
        "select current_user",
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "app_md5");

    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0]["principal"], "ada@example.com", "{sessions:?}");
    let auth: Vec<Value> = s
        .export()
        .into_iter()
        .filter(|r| r["kind"] == "auth")
        .collect();
    assert_eq!(auth.len(), 2, "{auth:?}");
    assert_eq!(auth[0]["method"], "token");
    assert_eq!(auth[0]["role"], "app_rw");
    assert_eq!(auth[0]["backend_user"], "app_rw");
    assert!(
        auth[0]["client_tls"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1_3"),
        "{auth:?}"
    );
    assert!(
        auth[0]["backend_tls"]
            .as_str()
            .unwrap()
            .starts_with("TLSv1_3"),
        "{auth:?}"
    );
    // No credential anywhere: not in the export, not in the journal's files.
    let export = serde_json::to_string(&s.export()).unwrap();
    let raw = s.agent.journal_bytes();
    for secret in [RW_SECRET, MD5_SECRET, token.as_str()] {
        assert!(!export.contains(secret), "a credential is in the export");
        assert!(
            !contains_bytes(&raw, secret),
            "a credential is in the journal files"
        );
    }
}

#[test]
fn bad_tokens_wrong_roles_and_plaintext_are_refused_clearly_and_journaled() {
    if !require_root("bad_tokens_wrong_roles_and_plaintext_are_refused_clearly_and_journaled") {
        return;
    }
    let Some(s) = setup("id-refuse") else { return };
    let good = s.token("ada");
    let parts: Vec<&str> = good.split('.').collect();
    let mut sig = parts[2].to_string();
    let flipped = if sig.ends_with('A') { 'B' } else { 'A' };
    sig.pop();
    sig.push(flipped);
    let bad_signature = format!("{}.{}.{sig}", parts[0], parts[1]);
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    let other_issuer = Provider::start(&[]);
    let expiring = s.idp.id_token("ada", 1, "sluice");
    let wrong_audience = s.idp.id_token("ada", 600, "other-app");
    let foreign = other_issuer.id_token("ada", 600, "sluice");
    let bob = s.token("bob");
    std::thread::sleep(Duration::from_secs(3));

    // (connection, password, what the client must be told)
    let cases: Vec<(&str, Option<&str>, &str)> = vec![
        (
            "user=app_rw sslmode=disable",
            Some(&good),
            "requires TLS: connect with sslmode=require",
        ),
        (
            "user=app_rw sslmode=require",
            Some(&expiring),
            "token expired at",
        ),
        (
            "user=app_rw sslmode=require",
            Some(&wrong_audience),
            "audience",
        ),
        ("user=app_rw sslmode=require", Some(&foreign), "issuer"),
        (
            "user=app_rw sslmode=require",
            Some(&bad_signature),
            "signature",
        ),
        (
            "user=app_rw sslmode=require",
            Some(&alg_none),
            "algorithm none is not allowed",
        ),
        (
            "user=app_rw sslmode=require",
            Some("not-a-token"),
            "not a JWT",
        ),
        (
            "user=app_md5 sslmode=require",
            Some(&bob),
            "bob@example.com may not use role \"app_md5\" on target \"prod-db\" (roles you may use: app_rw)",
        ),
        (
            "user=postgres sslmode=require",
            Some(&good),
            "has no role \"postgres\"",
        ),
    ];
    for (conn, password, expected) in &cases {
        let out = s.psql(&s.cgroup, CLIENT_UID, conn, *password, "select 1");
        assert!(!out.status.success(), "{conn}: should be refused");
        assert!(
            out.stderr.contains(expected),
            "{conn}: expected {expected:?} in:\n{}",
            out.stderr
        );
        for secret in [RW_SECRET, MD5_SECRET] {
            assert!(!out.stderr.contains(secret));
        }
    }
    // Each refusal is a journaled session whose end says why.
    let ends = s.agent.end_reasons().unwrap();
    for (_, _, expected) in &cases {
        assert!(
            ends.iter().any(|e| e.contains(expected)),
            "no journaled refusal with {expected:?}: {ends:?}"
        );
    }
    // Nobody logged in and an empty password: refused.
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        Some(""),
        "select 1",
    );
    assert!(!out.status.success());
}

/// Runs `sluice login` as CLIENT_UID and completes the device flow for `account`.
fn login_as(s: &Setup, account: &str) -> String {
    oidc::sluice_login(&s.agent, s.idp, account)
}

#[test]
fn a_uid_that_ran_sluice_login_connects_without_a_password_until_it_logs_out() {
    if !require_root("a_uid_that_ran_sluice_login_connects_without_a_password_until_it_logs_out") {
        return;
    }
    let Some(s) = setup("id-login") else { return };
    let text = login_as(&s, "ada");
    assert!(text.contains("logged in: ada@example.com"), "{text}");

    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        None,
        "select current_user",
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "app_rw");
    let who = s.agent.control(Some(CLIENT_UID), &["whoami"]).unwrap();
    assert!(
        who.stdout
            .contains("ada@example.com (groups: dba, developers) by `sluice login`"),
        "{}",
        who.stdout
    );
    // Another uid is not ada.
    let out = s.psql(
        &s.cgroup,
        1,
        "user=app_rw sslmode=require",
        None,
        "select 1",
    );
    assert!(!out.status.success());
    let auth: Vec<Value> = s
        .export()
        .into_iter()
        .filter(|r| r["kind"] == "auth")
        .collect();
    assert_eq!(auth[0]["method"], "login");

    let bye = s.agent.control(Some(CLIENT_UID), &["logout"]).unwrap();
    assert!(bye.status.success(), "{}", bye.stderr);
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        None,
        "select 1",
    );
    assert!(!out.status.success());
}

#[test]
fn psycopg_and_jdbc_run_queries_prepared_statements_transactions_and_copy() {
    if !require_root("psycopg_and_jdbc_run_queries_prepared_statements_transactions_and_copy") {
        return;
    }
    let Some(s) = setup("id-drivers") else { return };
    let token = s.token("bob");
    let clients = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients");

    // psycopg 3 with a token.
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.arg(clients.join("psycopg_client.py"))
        .arg(format!(
            "host=127.0.0.1 port={} dbname=postgres user=app_rw sslmode=require",
            s.pg.port
        ))
        .env("PGPASSWORD", &token);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["user"], "app_rw");
    assert_eq!(v["ssl"], true);
    assert_eq!(v["prepared_rows"], 3);
    assert_eq!(v["after_transactions"], "0,1,2,11");
    assert_eq!(v["copied_out"][4][1], "copied104");
    assert_eq!(v["notifications"][0], "hello");

    // The JDBC driver as the workload identity (no password at all).
    let build = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        build.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let jar = "/usr/share/java/postgresql.jar";
    let javac = Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(build.path())
        .arg(clients.join("JdbcClient.java"))
        .output()
        .unwrap();
    assert!(
        javac.status.success(),
        "{}",
        String::from_utf8_lossy(&javac.stderr)
    );
    let mut cmd = s.svc.command(Some(CLIENT_UID), "java");
    cmd.args([
        "-cp",
        &format!("{}:{jar}", build.path().display()),
        "JdbcClient",
    ])
    .arg(format!(
        "jdbc:postgresql://127.0.0.1:{}/postgres?user=app_rw&sslmode=require&prepareThreshold=1",
        s.pg.port
    ));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    for line in [
        "user=app_rw",
        "ssl=true",
        "copied_in=2",
        "ids=0,1,2,11,100,101",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "{line} missing:\n{}",
            out.stdout
        );
    }
    let principals: Vec<String> = s
        .agent
        .sessions()
        .unwrap()
        .iter()
        .filter_map(|x| x["principal"].as_str().map(str::to_string))
        .collect();
    assert!(
        principals.contains(&"bob@example.com".to_string()),
        "{principals:?}"
    );
    assert!(
        principals.contains(&"billing-svc".to_string()),
        "{principals:?}"
    );
}

#[test]
fn pgbench_runs_in_simple_extended_and_prepared_modes_over_tls() {
    if !require_root("pgbench_runs_in_simple_extended_and_prepared_modes_over_tls") {
        return;
    }
    let Some(s) = setup("id-pgbench") else { return };
    let pgbench = s.pg.bin.join("pgbench");
    let init = Command::new(&pgbench)
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ])
        .arg(s.pg.port.to_string())
        .arg("postgres")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    s.pg.sql("grant select, update on all tables in schema public to app_rw")
        .unwrap();
    for mode in ["simple", "extended", "prepared"] {
        let mut cmd = s.svc.command(None, pgbench.to_str().unwrap());
        cmd.args([
            "-n",
            "-S",
            "-M",
            mode,
            "-c",
            "2",
            "-j",
            "2",
            "-T",
            "2",
            "-h",
            "127.0.0.1",
        ])
        .args(["-U", "app_rw", "-p", &s.pg.port.to_string(), "postgres"])
        .env("PGSSLMODE", "require");
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            out.status.success(),
            "{mode}: {}\n{}",
            out.stderr,
            out.stdout
        );
        let processed = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        assert!(processed > 0, "{mode}: {}", out.stdout);
        assert!(
            !out.stdout.contains("number of failed transactions: 1"),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn a_cancel_request_with_sluices_key_stops_the_query_on_the_backend() {
    if !require_root("a_cancel_request_with_sluices_key_stops_the_query_on_the_backend") {
        return;
    }
    let Some(s) = setup("id-cancel") else { return };
    let token = s.token("ada");
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(["-X", "-A", "-t", "-w", "-c", "select pg_sleep(60)"])
        .arg(format!(
            "host=127.0.0.1 port={} dbname=postgres user=app_rw sslmode=require",
            s.pg.port
        ))
        .env("PGPASSWORD", &token)
        .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err")).unwrap());
    let mut psql = cmd.spawn().unwrap();
    let running = || {
        s.pg.sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'")
            .unwrap()
            .trim()
            == "1"
    };
    let deadline = Instant::now() + LIMIT;
    while !running() {
        assert!(Instant::now() < deadline, "the query never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The key psql holds is sluice's, not the backend's.
    let backend_pid =
        s.pg.sql("select pid from pg_stat_activity where query = 'select pg_sleep(60)'")
            .unwrap();
    let sent = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-INT", &psql.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + LIMIT;
    while psql.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "psql did not end after the cancel"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}\nbackend pid {backend_pid}\n{}",
        s.agent.log()
    );
    assert!(sent.elapsed() < Duration::from_secs(30));
    assert!(!running(), "the backend still runs the query");
}

#[test]
fn postgresql_17_direct_tls_needs_alpn_postgresql() {
    if !require_root("postgresql_17_direct_tls_needs_alpn_postgresql") {
        return;
    }
    let Some(s) = setup("id-direct") else { return };
    let raw = |mode: &str| {
        let mut cmd = s.svc.command(Some(CLIENT_UID), "/usr/bin/python3");
        cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/pgraw.py"))
            .args(["127.0.0.1", &s.pg.port.to_string(), mode, "app_rw"])
            .arg("select 'direct ' || (select ssl from pg_stat_ssl where pid = pg_backend_pid())");
        run_bounded(&mut cmd, LIMIT).unwrap()
    };
    let out = raw("direct-tls");
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("D direct true"),
        "{}\n{}",
        out.stdout,
        s.agent.log()
    );
    // Without ALPN the handshake may finish, but the connection is closed unused.
    let out = raw("direct-tls-no-alpn");
    assert!(
        out.stdout.starts_with("closed") || out.stdout.starts_with("login failed EOF"),
        "{}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn a_login_is_refreshed_before_its_token_expires() {
    if !require_root("a_login_is_refreshed_before_its_token_expires") {
        return;
    }
    if !oidc::node_available() {
        return;
    }
    // ID tokens that live 6 s; the agent checks its logins every second.
    let idp: &'static Provider = Box::leak(Box::new(Provider::start(&["--id-token-ttl", "6"])));
    let Some(s) = setup_with("id-refresh", idp, "login_refresh_secs = 1\n") else {
        return;
    };
    let text = login_as(&s, "bob");
    assert!(text.contains("logged in: bob@example.com"), "{text}");
    let first = s
        .agent
        .control(Some(CLIENT_UID), &["whoami"])
        .unwrap()
        .stdout;
    // Well past the first token's expiry (and the 1 s leeway), the uid is still bob.
    std::thread::sleep(Duration::from_secs(9));
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        None,
        "select current_user",
    );
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    let later = s
        .agent
        .control(Some(CLIENT_UID), &["whoami"])
        .unwrap()
        .stdout;
    assert!(later.contains("bob@example.com"), "{later}");
    assert_ne!(first, later, "the expiry moved: {first} / {later}");
    assert!(
        s.agent.logged("login tokens refreshed"),
        "{}",
        s.agent.log()
    );
}

#[test]
fn a_relayed_scram_login_leaves_no_guessable_material_in_the_journal() {
    if !require_root("a_relayed_scram_login_leaves_no_guessable_material_in_the_journal") {
        return;
    }
    let pg = Postgres::start_with(PgOptions {
        tls: None,
        hba: vec!["host all scram_user all scram-sha-256".into()],
        ..PgOptions::default()
    })
    .unwrap();
    pg.sql("create role scram_user login password 'Scram-Pass-55e1'")
        .unwrap();
    let verifier = pg
        .sql("select rolpassword from pg_authid where rolname = 'scram_user'")
        .unwrap();
    // SCRAM-SHA-256$<iterations>:<salt>$<stored key>:<server key>
    let salt = verifier
        .trim()
        .split('$')
        .nth(1)
        .and_then(|p| p.split(':').nth(1))
        .unwrap()
        .to_string();
    let cgroup = Cgroup::create("id-scram-relay").unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        ..AgentOptions::default()
    })
    .unwrap();
    let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(["-X", "-A", "-t", "-w", "-c", "select current_user"])
        .arg(format!(
            "host=127.0.0.1 port={} dbname=postgres user=scram_user",
            pg.port
        ))
        .env("PGPASSWORD", "Scram-Pass-55e1");
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.trim(), "scram_user");
    let export = agent.read(&["export", "--format", "jsonl"]).unwrap();
    let mut raw = Vec::new();
    for e in std::fs::read_dir(agent.journal_dir()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            raw.extend(std::fs::read(p).unwrap());
        }
    }
    for secret in [salt.as_str(), "Scram-Pass-55e1"] {
        assert!(!export.contains(secret), "{secret} in the export");
        assert!(
            !contains_bytes(&raw, secret),
            "{secret} in the journal files"
        );
    }
}

/// pgraw's `token USER` mode over TLS, the token in PGPASSWORD: "ok" or "error CODE MESSAGE".
fn raw_token_login(s: &Setup, user: &str, token: &str) -> String {
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/pgraw.py"))
        .args(["127.0.0.1", &s.pg.port.to_string(), "token", user])
        .env("PGPASSWORD", token);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    out.stdout.trim().to_string()
}

/// Regression: a real ID token listing many groups is over 10 kB, which the pre-login cap
/// refused as a protocol violation (08P01), so such a person could never log in.
#[test]
fn a_token_with_many_groups_logs_in_and_one_over_64_kb_is_refused_as_too_large() {
    if !require_root("a_token_with_many_groups_logs_in_and_one_over_64_kb_is_refused_as_too_large")
    {
        return;
    }
    let Some(s) = setup("id-large") else { return };
    let large = s.idp.id_token_with_groups("bob", 600, "sluice", 400);
    assert!(
        (10 * 1024..64 * 1024).contains(&large.len()),
        "{}",
        large.len()
    );
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        Some(&large),
        "select current_user",
    );
    assert!(out.status.success(), "{}\n{}", out.stderr, s.agent.log());
    assert_eq!(out.stdout.trim(), "app_rw");
    assert_eq!(raw_token_login(&s, "app_rw", &large), "ok");
    let sessions = s.agent.sessions().unwrap();
    let groups = sessions[0]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 401, "{:?}", sessions[0]["principal"]);

    let huge = s.idp.id_token_with_groups("bob", 600, "sluice", 1600);
    assert!(huge.len() > 64 * 1024, "{}", huge.len());
    let sentence = format!(
        "sluice: the token is too large ({} bytes; sluice accepts tokens of up to 65536 bytes)",
        huge.len()
    );
    let answer = raw_token_login(&s, "app_rw", &huge);
    assert!(
        answer.starts_with(&format!("error 28P01 {sentence}")),
        "{answer}\n{}",
        s.agent.log()
    );
    let out = s.psql(
        &s.cgroup,
        CLIENT_UID,
        "user=app_rw sslmode=require",
        Some(&huge),
        "select 1",
    );
    assert!(!out.status.success());
    assert!(out.stderr.contains(&sentence), "{}", out.stderr);
    // Refused sessions say why, and hold no part of the token.
    let ends = s.agent.end_reasons().unwrap();
    assert_eq!(
        ends.iter().filter(|e| e.contains(&sentence)).count(),
        2,
        "{ends:?}"
    );
    assert!(!contains_bytes(&s.agent.journal_bytes(), &huge[..200]));
}

/// What a forged log line would look like, with an escape sequence after it.
const FORGED: &str = "\n1999-01-01T00:00:00.000000Z  WARN sluice: FORGED\x1b[31m";

/// Regression: a token whose `kid` held a newline and an escape sequence forged lines in the
/// agent's log before authentication, and escape sequences reached `sluice replay` as they
/// were. Every string a client controls is shown escaped; the journal and the JSON export keep
/// it exactly.
#[test]
fn newlines_and_escape_sequences_from_clients_are_inert_in_the_log_replay_and_sessions() {
    if !require_root(
        "newlines_and_escape_sequences_from_clients_are_inert_in_the_log_replay_and_sessions",
    ) {
        return;
    }
    let Some(s) = setup("id-inert") else { return };
    let header = URL_SAFE_NO_PAD.encode(
        serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": format!("k{FORGED}") })
            .to_string(),
    );
    let claims = URL_SAFE_NO_PAD.encode(
        serde_json::json!({ "iss": s.idp.issuer, "aud": "sluice", "sub": "x", "exp": 4_000_000_000u64 })
            .to_string(),
    );
    let forged_kid = format!("{header}.{claims}.c2lnbmF0dXJl");
    let good = s.token("ada");
    // One client process, its name (comm) set to hold a newline and an escape sequence too.
    let script = r#"
import ctypes, os, sys
import psycopg
forged = os.environ["FORGED"]
ctypes.CDLL(None).prctl(15, b"py\n\x1b[31mFORGED", 0, 0, 0)
def connect(user, dbname, password):
    return psycopg.connect(host="127.0.0.1", port=int(sys.argv[1]), sslmode="require",
                           connect_timeout=15, user=user, dbname=dbname, password=password)
for user, dbname, password in [("app_rw", "postgres", os.environ["BAD"]),
                               ("app_rw" + forged, "postgres", os.environ["GOOD"]),
                               ("app_rw", "postgres" + forged, os.environ["GOOD"])]:
    try:
        connect(user, dbname, password).close()
        print("connected")
    except psycopg.OperationalError:
        print("refused")
with connect("app_rw", "postgres", os.environ["GOOD"]) as conn:
    conn.execute("select 'v" + forged + "' as \"c" + forged + "\"").fetchall()
    conn.execute("select %s::text as v", ["p" + forged]).fetchall()
print("done")
"#;
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.args(["-c", script, &s.pg.port.to_string()])
        .env("FORGED", FORGED)
        .env("BAD", &forged_kid)
        .env("GOOD", &good);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(
        out.stdout,
        "refused\nrefused\nrefused\ndone\n",
        "{}\n{}",
        out.stderr,
        s.agent.log()
    );

    let escaped = "\\n1999-01-01T00:00:00.000000Z  WARN sluice: FORGED\\x1b[31m";
    let inert = |what: &str, text: &str| {
        assert!(!text.contains('\x1b'), "{what} holds a raw ESC:\n{text}");
        assert!(
            !text.lines().any(|l| l.starts_with("1999-01-01T00:00:00")),
            "{what} holds a forged line:\n{text}"
        );
    };
    // The log: the kid, the user name and the database name each on one escaped line.
    let log = s.agent.log();
    inert("the agent's log", &log);
    for why in [
        "client authentication refused",
        "role refused",
        "backend login failed",
    ] {
        assert!(
            log.lines().any(|l| l.contains(why) && l.contains(escaped)),
            "no escaped {why:?} line:\n{log}"
        );
    }
    // `sluice sessions` and `sluice replay` of every session.
    let table = s.agent.read(&["sessions"]).unwrap();
    inert("sluice sessions", &table);
    assert!(table.contains("py\\n\\x1b[31mFORGED"), "{table}");
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 4, "{sessions:#?}");
    let mut replays = String::new();
    for session in &sessions {
        let replay = s
            .agent
            .read(&["replay", session["id"].as_str().unwrap()])
            .unwrap();
        inert("sluice replay", &replay);
        replays.push_str(&replay);
    }
    for shown in [
        format!("> select 'v{escaped}' as \"c{escaped}\""),
        format!("< c{escaped}"),
        format!("v{escaped}"),
        format!("$1 = 'p{escaped}'"),
        format!("user=app_rw{escaped}"),
    ] {
        assert!(replays.contains(&shown), "{shown:?} not in:\n{replays}");
    }
    // The journal keeps the exact text, and the JSON export carries it faithfully.
    let export = s.export();
    assert!(
        export.iter().any(|r| r["kind"] == "statement"
            && r["sql"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("'v{FORGED}'"))),
        "{export:#?}"
    );
    assert!(
        export
            .iter()
            .any(|r| r["kind"] == "row" && r["values"][0] == format!("v{FORGED}")),
        "{export:#?}"
    );
    assert_eq!(sessions[0]["comm"], "py\n\x1b[31mFORGED");
}
