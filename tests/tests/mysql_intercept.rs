//! End to end for MySQL targets: a real MariaDB, the real kernel's eBPF attached to a cgroup
//! this test creates, the real `sluice` binary, and the real `mariadb` CLI inside that cgroup
//! (as uid 65534) connecting to the server's own address. Authentication is passthrough with
//! the MariaDB user's own password.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::mariadb::{self, Intercepted, MariaDb, require_mariadb, require_mysql_python};
use sluice_tests::{AgentOptions, CLIENT_UID, TestCa, require_root, run_bounded};

const LIMIT: Duration = Duration::from_secs(60);

fn setup(name: &str, tweak: impl FnOnce(&mut AgentOptions)) -> Intercepted {
    let s = Intercepted::start(name, tweak).unwrap();
    s.db.sql("create table shop.t (id int primary key, name varchar(20)); insert into shop.t values (1, 'ada'), (2, 'grace'), (3, 'edsger');")
        .unwrap();
    s
}

fn rows_in_t(s: &Intercepted) -> String {
    s.db.sql("select count(*) from shop.t")
        .unwrap()
        .trim()
        .to_string()
}

fn skip(test: &str) -> bool {
    !require_root(test) || !require_mariadb(test)
}

#[test]
fn the_mariadb_cli_in_the_cgroup_is_intercepted_recorded_and_gets_the_same_rows() {
    let test = "the_mariadb_cli_in_the_cgroup_is_intercepted_recorded_and_gets_the_same_rows";
    if skip(test) {
        return;
    }
    let s = setup("mysql-basic", |_| {});
    let sql = "select id, name from t order by id";
    let direct = s.direct(sql);
    assert_eq!(direct.ok(), "id\tname\n1\tada\n2\tgrace\n3\tedsger\n");
    let through = s.mariadb(sql);
    assert_eq!(through.ok(), direct.ok(), "{}", s.agent.log());

    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}\n{}", s.agent.log());
    let session = &sessions[0];
    assert_eq!(session["protocol"], "mysql");
    assert_eq!(session["target"], "app-db");
    assert_eq!(session["uid"], CLIENT_UID);
    assert_eq!(session["pid"], through.pid);
    assert_eq!(session["comm"], "mariadb");
    assert_eq!(session["orig_dst"], format!("127.0.0.1:{}", s.db.port));
    assert_eq!(session["user"], mariadb::USER);
    assert_eq!(session["database"], mariadb::DATABASE);
    assert_eq!(session["statements"], 1, "{session}");
    assert!(session["end"].is_string(), "not sealed: {session}");

    let records = s.agent.export().unwrap();
    let statements: Vec<&str> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .filter_map(|r| r["sql"].as_str())
        .collect();
    assert_eq!(statements, vec![sql], "{records:#?}");
    let rows: Vec<Value> = records
        .iter()
        .filter(|r| r["kind"] == "row")
        .map(|r| r["values"].clone())
        .collect();
    assert_eq!(
        rows,
        vec![
            serde_json::json!(["1", "ada"]),
            serde_json::json!(["2", "grace"]),
            serde_json::json!(["3", "edsger"])
        ],
        "{records:#?}"
    );
    let id = session["id"].as_str().unwrap();
    let replay = s.agent.read(&["replay", id]).unwrap();
    assert!(
        replay.contains(sql) && replay.contains("edsger"),
        "{replay}"
    );

    // The password never reaches the journal, in any form the export shows.
    let everything = serde_json::to_string(&records).unwrap();
    assert!(!everything.contains(mariadb::PASSWORD));

    let verified = s.agent.read(&["verify", "--session", &id[..13]]).unwrap();
    assert!(
        verified.contains("ok:") && verified.contains("all signed"),
        "{verified}"
    );
}

#[test]
fn delete_without_where_is_denied_before_reaching_the_backend() {
    let test = "delete_without_where_is_denied_before_reaching_the_backend";
    if skip(test) {
        return;
    }
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let s = setup("mysql-policy", |o| {
        o.policy_dir = Some(policies);
        o.extra_config = format!(
            "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n"
        );
    });
    let out = s.mariadb("delete from t");
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("ERROR 1142 (42000)")
            && out.stderr.contains("no-update-or-delete-without-where"),
        "{}\n{}",
        out.stderr,
        s.agent.log()
    );
    assert_eq!(rows_in_t(&s), "3", "the denied delete must not have run");

    // The same session goes on after a denial; a delete naming its rows is allowed.
    let out = s.mariadb("delete from t; select 1");
    assert!(!out.status.success());
    let out = s.mariadb("delete from t where id = 3; select count(*) as n from t");
    assert_eq!(out.ok(), "n\n2\n");
    assert_eq!(rows_in_t(&s), "2");

    let records = s.agent.export().unwrap();
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "decision" && r["allowed"] == false)
        .collect();
    assert!(!denied.is_empty(), "{records:#?}");
    assert!(denied.iter().all(|d| {
        d["policies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "no-update-or-delete-without-where"))
    }));
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 3, "{sessions:#?}");
    assert!(sessions.iter().all(|s| s["principal"] == "dev"));
    // The replay shows the denied statement and the error the client got.
    let first = sessions
        .iter()
        .min_by_key(|s| s["start"].as_str().unwrap().to_string())
        .unwrap();
    let replay = s
        .agent
        .read(&["replay", first["id"].as_str().unwrap()])
        .unwrap();
    assert!(
        replay.contains("delete from t") && replay.contains("no-update-or-delete-without-where"),
        "{replay}"
    );
    let verified = s.agent.read(&["verify"]).unwrap();
    assert!(verified.contains("ok:"), "{verified}");
}

#[test]
fn a_client_asking_for_tls_gets_it_from_sluice_with_the_targets_certificate() {
    let test = "a_client_asking_for_tls_gets_it_from_sluice_with_the_targets_certificate";
    if skip(test) {
        return;
    }
    let ca = TestCa::new().unwrap();
    let (cert, key) = ca.issue("sluice").unwrap();
    let s = setup("mysql-tls", |o| {
        for t in &mut o.targets {
            t.push_str(&format!(
                "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_tls = \"required\"\n",
                cert.display(),
                key.display()
            ));
        }
    });
    let args: Vec<String> = MariaDb::client_args(s.db.port)
        .into_iter()
        .filter(|a| a != "--skip-ssl")
        .chain([
            "--ssl".to_string(),
            format!("--ssl-ca={}", ca.cert.display()),
            "--ssl-verify-server-cert".to_string(),
        ])
        .collect();
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "mariadb");
    cmd.args(&args)
        .args(["-e", "select name from t where id = 2"]);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(out.ok(), "name\ngrace\n", "{}", s.agent.log());

    // Without TLS the target refuses, saying how to connect.
    let out = s.mariadb("select 1");
    assert!(!out.status.success());
    assert!(out.stderr.contains("requires TLS"), "{}", out.stderr);

    let records = s.agent.export().unwrap();
    let auth: Vec<&Value> = records.iter().filter(|r| r["kind"] == "auth").collect();
    assert_eq!(auth.len(), 1, "{records:#?}");
    assert!(
        auth[0]["client_tls"].as_str().unwrap().starts_with("TLS"),
        "{}",
        auth[0]
    );
    assert_eq!(auth[0]["backend_tls"], "plain");
    let rows: Vec<Value> = records
        .iter()
        .filter(|r| r["kind"] == "row")
        .map(|r| r["values"].clone())
        .collect();
    assert_eq!(rows, vec![serde_json::json!(["grace"])]);
}

#[test]
fn an_agent_shutdown_seals_an_open_mysql_session() {
    let test = "an_agent_shutdown_seals_an_open_mysql_session";
    if skip(test) {
        return;
    }
    let mut s = setup("mysql-shutdown", |_| {});
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "mariadb");
    cmd.args(MariaDb::client_args(s.db.port))
        .args(["-e", "select sleep(20)"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while s.agent.sessions().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "{}", s.agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The statement is on its way; the agent stops under it.
    std::thread::sleep(Duration::from_millis(300));
    s.agent.stop();
    let sessions = s.agent.sessions().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert_eq!(
        sessions[0]["end_reason"],
        "agent shutdown",
        "{}",
        s.agent.log()
    );
    let verified = s.agent.read(&["verify"]).unwrap();
    assert!(verified.contains("ok:"), "{verified}");
}

/// Prepared statements (COM_STMT_PREPARE / EXECUTE, binary rows) with mysql-connector-python.
const PREPARED_PY: &str = r#"
import sys, json
import mysql.connector
c = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user=sys.argv[2],
                            password=sys.argv[3], database=sys.argv[4], use_pure=True)
sel = c.cursor(prepared=True)
sel.execute("select id, name from t where id >= ? order by id", (2,))
for row in sel.fetchall():
    print(json.dumps([str(v) if not isinstance(v, (bytes, bytearray)) else v.decode() for v in row]))
try:
    c.cursor(prepared=True).execute("delete from t")
    print("deleted")
except mysql.connector.Error as e:
    print("error", e.errno, e.msg)
sel.execute("select id, name from t where id >= ? order by id", (3,))
print(len(sel.fetchall()))
c.close()
"#;

#[test]
fn prepared_statements_are_decided_at_prepare_and_their_executions_recorded() {
    let test = "prepared_statements_are_decided_at_prepare_and_their_executions_recorded";
    if skip(test) {
        return;
    }
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let s = setup("mysql-prepared", |o| o.policy_dir = Some(policies));
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), python.to_str().unwrap());
    cmd.args(["-c", PREPARED_PY])
        .arg(s.db.port.to_string())
        .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE]);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(
        lines[..2],
        [r#"["2", "grace"]"#, r#"["3", "edsger"]"#],
        "{}",
        out.stdout
    );
    assert!(
        lines[2].starts_with("error 1142 ")
            && lines[2].contains("no-update-or-delete-without-where"),
        "{}\n{}",
        out.stdout,
        s.agent.log()
    );
    assert_eq!(lines[3], "1", "the session goes on after the denial");
    assert_eq!(rows_in_t(&s), "3");

    let records = s.agent.export().unwrap();
    let statements: Vec<&str> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .filter_map(|r| r["sql"].as_str())
        .collect();
    assert!(
        statements
            .iter()
            .filter(|q| q.starts_with("select id, name from t where id >= ?"))
            .count()
            == 2,
        "{records:#?}"
    );
    assert!(
        records.iter().any(|r| r["kind"] == "decision"
            && r["allowed"] == false
            && r["sql"] == "delete from t")
    );
}

/// Connects, reads the greeting, sends argv[2] (hex) as the client's bytes, prints what comes
/// back (hex) until the server closes.
const RAW_PY: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
head = s.recv(4)
n = head[0] | head[1] << 8 | head[2] << 16
greeting = b""
while len(greeting) < n:
    greeting += s.recv(n - len(greeting))
s.sendall(bytes.fromhex(sys.argv[2]))
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
print(reply.hex())
"#;

#[test]
fn bad_input_gets_a_clear_error_and_the_agent_serves_the_next_client() {
    let test = "bad_input_gets_a_clear_error_and_the_agent_serves_the_next_client";
    if skip(test) {
        return;
    }
    let s = setup("mysql-bad-input", |_| {});
    let raw = |hex: &str| {
        let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
        cmd.args(["-c", RAW_PY, &s.db.port.to_string(), hex]);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        let hex = out.ok().trim().to_string();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        bytes
    };
    // An oversize length before login, a truncated response, a response out of sequence.
    for (hex, what) in [
        ("ffffff01000000", "exceeds the limit"),
        ("0500000101020304ff", "not a HandshakeResponse41"),
        ("0500000701020304ff", "sequence id"),
    ] {
        let reply = raw(hex);
        assert!(reply.len() > 7, "{what}: {reply:?}");
        assert_eq!(reply[4], 0xff, "{what}: an ERR packet");
        assert_eq!(u16::from_le_bytes([reply[5], reply[6]]), 1043, "{what}");
        let text = String::from_utf8_lossy(&reply[7..]);
        assert!(
            text.contains("bad handshake response") && text.contains(what),
            "{text}"
        );
    }
    let out = s.mariadb("select count(*) as n from t");
    assert_eq!(out.ok(), "n\n3\n", "{}", s.agent.log());
    // The refusals are on record too.
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 4, "{sessions:#?}");
}

#[test]
fn a_denied_statement_in_a_pipeline_is_answered_in_its_place() {
    let test = "a_denied_statement_in_a_pipeline_is_answered_in_its_place";
    if skip(test) {
        return;
    }
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let s = setup("mysql-pipeline", |o| o.policy_dir = Some(policies));
    let client = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/mysqlraw.py");
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.arg(client)
        .arg(s.db.port.to_string())
        .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE])
        .args([
            "select sleep(0.3) as a",
            "delete from t",
            "select count(*) from t",
        ]);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.stdout);
    assert_eq!(lines[0], "ROWS [['0']]");
    assert!(
        lines[1]
            .starts_with("ERR 1142 sluice: denied by policy \"no-update-or-delete-without-where\""),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2], "ROWS [['3']]");
}

#[test]
fn a_packet_over_max_message_bytes_gets_error_1153_naming_the_setting() {
    let test = "a_packet_over_max_message_bytes_gets_error_1153_naming_the_setting";
    if skip(test) {
        return;
    }
    let s = setup("mysql-too-large", |o| o.max_message_bytes = 1 << 20);
    // A 2 MiB statement, read by the CLI from a file `nobody` can read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let file = dir.path().join("big.sql");
    std::fs::write(
        &file,
        format!("select length('{}');\n", "x".repeat(2 << 20)),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = s.mariadb(&format!("source {}", file.display()));
    assert!(
        out.stderr.contains("ERROR 1153 (08S01)")
            && out
                .stderr
                .contains("exceeds this agent's max_message_bytes (1048576 bytes)")
            && out.stderr.contains("raise `max_message_bytes`"),
        "{}",
        out.stderr
            .chars()
            .rev()
            .take(600)
            .collect::<String>()
            .chars()
            .rev()
            .collect::<String>()
    );
    let ends = s.agent.end_reasons().unwrap();
    assert!(
        ends.iter()
            .any(|e| e.contains("exceeds max_message_bytes (1048576 bytes)")),
        "{ends:?}"
    );
    // The agent serves the next client.
    assert_eq!(s.mariadb("select 1 as one").ok(), "one\n1\n");
}

/// The PostgreSQL proxy once chose its cap before the read that began during login; the MySQL
/// one must take a first command over the pre-login cap (64 KiB) too, from the CLI and from a
/// client that sends it the moment the OK arrives.
#[test]
fn a_statement_over_the_pre_login_cap_may_be_the_first_of_a_fresh_session() {
    let test = "a_statement_over_the_pre_login_cap_may_be_the_first_of_a_fresh_session";
    if skip(test) {
        return;
    }
    let s = setup("mysql-big-first", |_| {});
    let big = format!("select length('{}') as n", "x".repeat(100_000));
    let out = s.mariadb(&big);
    assert_eq!(out.ok(), "n\n100000\n", "{}", s.agent.log());
    let client = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/mysqlraw.py");
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.arg(client)
        .arg(s.db.port.to_string())
        .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE])
        .arg(&big);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(out.ok().trim(), "ROWS [['100000']]", "{}", s.agent.log());
}

#[test]
fn load_data_local_is_denied_however_it_is_spelled_and_the_file_never_leaves_the_client() {
    let test =
        "load_data_local_is_denied_however_it_is_spelled_and_the_file_never_leaves_the_client";
    if skip(test) {
        return;
    }
    let s = setup("mysql-local-infile", |_| {});
    // A file only the client's host has, readable by the client's uid.
    let dir = tempfile::Builder::new()
        .prefix("sluice-infile-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let file = dir.path().join("rows.tsv");
    std::fs::write(&file, "7\tleaked\n").unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let f = file.display();
    for sql in [
        format!("load data local infile '{f}' into table t"),
        format!("LOAD DATA LOW_PRIORITY LOCAL INFILE '{f}' INTO TABLE t"),
        format!("load data concurrent local infile '{f}' into table t"),
        format!("LOAD /* a comment */ DATA LOCAL INFILE '{f}' INTO TABLE t"),
        format!("LOAD DATA /*!40000 LOCAL */ INFILE '{f}' INTO TABLE t"),
        format!("select 1; load data local infile '{f}' into table t"),
    ] {
        let mut cmd = s.command(true, "mariadb");
        cmd.args(MariaDb::client_args(s.db.port))
            .arg("--local-infile=1")
            .args(["-e", &sql]);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            !out.status.success() && out.stderr.contains("sluice-local-infile"),
            "{sql}: {}{}\n{}",
            out.stdout,
            out.stderr,
            s.agent.log()
        );
        assert_eq!(rows_in_t(&s), "3", "{sql} loaded rows");
    }
    let records = s.agent.export().unwrap();
    assert!(
        !serde_json::to_string(&records).unwrap().contains("leaked"),
        "the file's content reached the journal"
    );
}
