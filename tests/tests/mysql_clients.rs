//! Real MySQL clients through sluice (issue 6): PyMySQL, MariaDB Connector/J, the `mariadb` CLI
//! and sysbench, each in a test cgroup (as uid 65534) whose connects to a real MariaDB's own
//! address the real kernel's eBPF sends into the real `sluice` agent. Each client prints what
//! a user would look at; the same client run directly (outside the cgroup) must print the same
//! bytes, and the journal must hold the statements. Blobs are over 16 MiB, so they travel as
//! several MySQL packets in both directions (the agent's `max_message_bytes` is raised for
//! them; the server's `max_allowed_packet` is 64 MiB).
#![allow(clippy::unwrap_used)]

use std::fs::Permissions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::mariadb::{
    self, Intercepted, require_mariadb, require_mysql_python, sysbench_run,
};
use sluice_tests::{AgentOptions, Output, require_root, run_bounded};

const LIMIT: Duration = Duration::from_secs(180);
/// Room for a 17 MiB blob, as text (PyMySQL escapes it) or hex, in one logical message.
const BIG: usize = 64 << 20;

fn skip(test: &str) -> bool {
    !require_root(test) || !require_mariadb(test)
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// An agent whose messages may be as large as [`BIG`].
fn big_messages(o: &mut AgentOptions) {
    o.max_message_bytes = BIG;
}

/// The first `n` characters of `text`, for failure messages about megabytes of output.
fn head(text: &str, n: usize) -> &str {
    text.char_indices().nth(n).map_or(text, |(i, _)| &text[..i])
}

/// Asserts that the client succeeded both ways and printed the same thing; returns that.
fn same_both_ways(s: &Intercepted, direct: &Output, through: &Output) -> String {
    assert!(
        direct.status.success(),
        "direct run failed: {}\n{}",
        head(&direct.stdout, 2000),
        direct.stderr
    );
    assert!(
        through.status.success(),
        "run through sluice failed: {}\n{}\nagent log:\n{}",
        head(&through.stdout, 2000),
        through.stderr,
        s.agent.log()
    );
    assert!(
        direct.stdout == through.stdout,
        "through sluice differs from direct:\ndirect:  {}\nthrough: {}",
        head(&direct.stdout, 4000),
        head(&through.stdout, 4000)
    );
    direct.stdout.clone()
}

/// The SQL of every statement the journal holds, in order.
fn journaled_statements(s: &Intercepted) -> Vec<String> {
    s.agent
        .export()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "statement")
        .filter_map(|r| r["sql"].as_str().map(str::to_string))
        .collect()
}

fn assert_journaled(statements: &[String], starts: &[&str]) {
    for start in starts {
        assert!(
            statements.iter().any(|q| q.starts_with(start)),
            "no statement starting {start:?} in the journal: {:?}",
            statements.iter().map(|q| head(q, 200)).collect::<Vec<_>>()
        );
    }
}

#[test]
fn pymysql_queries_transactions_multi_statements_prepare_and_a_17_mib_blob_match_a_direct_run() {
    let test = "pymysql_queries_transactions_multi_statements_prepare_and_a_17_mib_blob_match_a_direct_run";
    if skip(test) {
        return;
    }
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let s = Intercepted::start("mysql-pymysql", big_messages).unwrap();
    let run = |through_sluice: bool| {
        let mut cmd = s.command(through_sluice, python.to_str().unwrap());
        cmd.arg(clients_dir().join("pymysql_client.py"))
            .arg(s.db.port.to_string())
            .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE]);
        run_bounded(&mut cmd, LIMIT).unwrap()
    };
    let direct = run(false);
    let through = run(true);
    let out = same_both_ways(&s, &direct, &through);
    for line in [
        "other_before_commit=(0,)",
        "other_after_commit=((11,),)",
        "multi=[((4,),), ('affected', 1), ((1, 'ada l.'), (2, 'grace'))]",
        "prepared=((3, \"ünïcödé 'quoted' \\\\ back\"), (11, 'committed'))",
        "blob_length=17825797",
        "blob_equal=True",
        "blob_server_sha256_matches=True",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "{line} missing:\n{}",
            head(&out, 4000)
        );
    }

    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 2, "the client and its second connection");
    assert!(
        sessions
            .iter()
            .all(|x| x["uid"] == sluice_tests::CLIENT_UID),
        "{sessions:#?}"
    );
    let statements = journaled_statements(&s);
    assert_journaled(
        &statements,
        &[
            "create table py_t",
            "insert into py_t (id, name) values (10, 'rolled back')",
            "ROLLBACK",
            "COMMIT",
            "select count(*) from py_t; update py_t set name = 'ada l.' where id = 1; select",
            "prepare by_id from",
            "execute by_id using @low",
            "insert into py_t (id, name, b) values (100, 'blob', '",
        ],
    );
}

#[test]
fn connector_j_with_server_prepared_statements_matches_a_direct_run_including_a_17_mib_blob() {
    let test =
        "connector_j_with_server_prepared_statements_matches_a_direct_run_including_a_17_mib_blob";
    if skip(test) {
        return;
    }
    let jar = "/usr/share/java/mariadb-java-client.jar";
    if !std::path::Path::new(jar).exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} needs {jar} and CI=true: apt-get install libmariadb-java");
        }
        eprintln!("\n*** SKIPPED {test}: {jar} missing (apt-get install libmariadb-java). ***\n");
        return;
    }
    let s = Intercepted::start("mysql-connector-j", big_messages).unwrap();
    let url = format!(
        "jdbc:mariadb://127.0.0.1:{}/{}?user={}&password={}&useServerPrepStmts=true&allowMultiQueries=true&useSsl=false",
        s.db.port,
        mariadb::DATABASE,
        mariadb::USER,
        mariadb::PASSWORD
    );
    let run = |through_sluice: bool| {
        let mut cmd = s.command(through_sluice, "java");
        cmd.args(["-Xmx1g", "-cp", jar])
            .arg(clients_dir().join("MariaJdbcClient.java"))
            .arg(&url);
        run_bounded(&mut cmd, LIMIT).unwrap()
    };
    let direct = run(false);
    let through = run(true);
    let out = same_both_ways(&s, &direct, &through);
    for line in [
        "after_transactions=[[id:INTEGER], [11]]",
        "blob_length=17825795",
        "blob_equal=true",
        "blob_server_sha256_matches=true",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
    }
    assert!(
        out.contains("multi=[[[count(*):BIGINT], [4]], affected 1, [[id:INTEGER, name:VARCHAR], [1, first], [2, row2]]]"),
        "{out}"
    );

    let records = s.agent.export().unwrap();
    let prepared: Vec<&Value> = records
        .iter()
        .filter(|r| {
            r["kind"] == "statement"
                && r["sql"] == "select id, name, price, seen from j_t where id >= ? order by id"
        })
        .collect();
    assert_eq!(
        prepared.len(),
        2,
        "two executions of the server-side prepared select: {:#?}",
        records
            .iter()
            .filter(|r| r["kind"] == "statement")
            .map(|r| head(r["sql"].as_str().unwrap_or_default(), 200))
            .collect::<Vec<_>>()
    );
    assert_journaled(
        &journaled_statements(&s),
        &[
            "insert into j_t (id, name, price, seen) values (?, ?, ?, ?)",
            "insert into j_t (id, name) values (10, 'rolled back')",
            "select count(*) from j_t; update j_t set name = 'first' where id = 1; select",
            "insert into j_t (id, name, b) values (?, ?, ?)",
        ],
    );
}

#[test]
fn the_mariadb_cli_sends_and_reads_back_a_17_mib_blob_through_sluice() {
    let test = "the_mariadb_cli_sends_and_reads_back_a_17_mib_blob_through_sluice";
    if skip(test) {
        return;
    }
    let s = Intercepted::start("mysql-cli-blob", big_messages).unwrap();
    s.db.sql("create table shop.cli_blob (id int primary key, b longblob)")
        .unwrap();
    // Letters and digits only, so the CLI prints the value as it is stored.
    let value: String = (0..17 * 1024 * 1024 + 7)
        .map(|i: usize| {
            char::from(
                b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                    [(i * 7 + i / 4099) % 62],
            )
        })
        .collect();
    // A statement over 16 MiB, read by the CLI from a file `nobody` can read.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("insert.sql");
    let insert = format!("insert into cli_blob values (1, '{value}')");
    std::fs::write(&file, format!("{insert};\n")).unwrap();
    std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();

    // `source` reports a failed statement on stderr but still exits 0: ask the server.
    let inserted = s.mariadb(&format!("source {}", file.display()));
    let stored = s.db.sql("select length(b) from shop.cli_blob").unwrap();
    assert!(
        stored.trim() == value.len().to_string(),
        "the insert did not arrive whole (stored length {stored:?}): {}\nagent log:\n{}",
        inserted.stderr,
        head(&s.agent.log(), 20_000)
    );
    let sql = "select b from cli_blob where id = 1";
    let through = s.mariadb(sql);
    let direct = s.direct(sql);
    let out = same_both_ways(&s, &direct, &through);
    assert!(
        out == format!("b\n{value}\n"),
        "the blob changed on its way"
    );

    let statements = journaled_statements(&s);
    assert_journaled(&statements, &["insert into cli_blob values (1, '0", sql]);
    let recorded = statements
        .iter()
        .find(|q| q.starts_with("insert into cli_blob"))
        .unwrap();
    assert!(
        *recorded == insert,
        "the whole statement is on record: {} bytes of {}",
        recorded.len(),
        insert.len()
    );
}

/// Connection A: prints its connection id, runs SELECT SLEEP(30), prints how it ended.
const SLEEPER_PY: &str = r#"
import sys, time
import pymysql
c = pymysql.connect(host="127.0.0.1", port=int(sys.argv[1]), user=sys.argv[2],
                    password=sys.argv[3], database=sys.argv[4])
cur = c.cursor()
cur.execute("select connection_id()")
print(cur.fetchone()[0], flush=True)
started = time.monotonic()
try:
    cur.execute("select sleep(30)")
    print("no error", cur.fetchall())
except pymysql.err.MySQLError as e:
    print("error", e.args[0], e.args[1])
print("seconds %.1f" % (time.monotonic() - started))
"#;

#[test]
fn kill_query_from_another_intercepted_connection_interrupts_a_sleeping_statement() {
    let test = "kill_query_from_another_intercepted_connection_interrupts_a_sleeping_statement";
    if skip(test) {
        return;
    }
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let s = Intercepted::start("mysql-kill", |_| {}).unwrap();
    let mut sleeper = s
        .command(true, python.to_str().unwrap())
        .args(["-c", SLEEPER_PY])
        .arg(s.db.port.to_string())
        .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = sleeper.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let id = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| {
            let _ = sleeper.kill();
            panic!("A printed no connection id\n{}", s.agent.log())
        });
    assert!(id.parse::<u64>().is_ok(), "{id}");
    // A is inside SLEEP(30) once the server lists its query.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !s
        .db
        .sql(&format!(
            "select count(*) from information_schema.processlist where id = {id} and info like 'select sleep%'"
        ))
        .unwrap()
        .starts_with('1')
    {
        assert!(Instant::now() < deadline, "A never started sleeping");
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed_at = Instant::now();
    s.mariadb(&format!("KILL QUERY {id}")).ok();
    let mut ended = Vec::new();
    while ended.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => ended.push(line),
            Err(_) => {
                let _ = sleeper.kill();
                let _ = sleeper.wait();
                panic!(
                    "A was not interrupted within 10 s of KILL QUERY (printed {ended:?})\n{}",
                    s.agent.log()
                );
            }
        }
    }
    let waited = killed_at.elapsed();
    assert!(sleeper.wait().unwrap().success());
    assert_eq!(ended[0], "error 1317 Query execution was interrupted");
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 2, "{sessions:#?}");
    assert_journaled(
        &journaled_statements(&s),
        &["select sleep(30)", &format!("KILL QUERY {id}")],
    );
    let records = s.agent.export().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.to_string().contains("Query execution was interrupted")),
        "A's error is on record"
    );
}

#[test]
fn sysbench_oltp_read_only_and_point_select_run_through_sluice_without_errors() {
    let test = "sysbench_oltp_read_only_and_point_select_run_through_sluice_without_errors";
    if skip(test) {
        return;
    }
    let s = Intercepted::start("mysql-sysbench", |_| {}).unwrap();
    let (tables, rows) = (2, 1000);
    s.db.sysbench_prepare(tables, rows).unwrap();
    let before = s.agent.sessions().unwrap().len();
    assert_eq!(before, 0, "the direct prepare is not intercepted");
    let mut queries = 0;
    for workload in ["oltp_read_only", "oltp_point_select"] {
        let report = sysbench_run(
            s.command(true, "sysbench"),
            workload,
            s.db.port,
            tables,
            rows,
            2,
            3,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.agent.log()));
        assert!(report.transactions > 0, "{workload}: {report:?}");
        assert_eq!(report.ignored_errors, 0, "{workload}: {report:?}");
        queries += report.queries;
    }
    let (sessions, statements) = s.agent.recorded().unwrap();
    // sysbench connects once per thread per run (and once more to look at the server).
    assert!(sessions >= 4, "{sessions} sessions");
    assert!(
        s.agent
            .sessions()
            .unwrap()
            .iter()
            .all(|x| x["end"].is_string()),
        "every session sealed"
    );
    assert!(
        statements >= queries,
        "sysbench ran {queries} queries, the journal counts {statements} statements"
    );
}
