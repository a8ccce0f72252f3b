//! End to end: real PostgreSQL, the real kernel's eBPF attached to a cgroup this test creates,
//! the real `sluice` binary, and real clients (psql, pgbench, a raw wire client) inside that
//! cgroup, connecting to the backend's own address as they always would.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_args, require_root,
    run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A server, a cgroup and an agent protecting the server's address inside that cgroup.
struct Setup {
    pg: Postgres,
    cgroup: Cgroup,
    agent: Agent,
}

fn setup(name: &str, tweak: impl FnOnce(&mut AgentOptions)) -> Setup {
    let pg = Postgres::start().unwrap();
    pg.sql("create table people (id int primary key, name text); insert into people values (1, 'ada'), (2, 'grace'), (3, 'edsger');")
        .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let mut options = AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        ..AgentOptions::default()
    };
    tweak(&mut options);
    let agent = Agent::start(options).unwrap();
    Setup { pg, cgroup, agent }
}

impl Setup {
    /// psql as `nobody` inside the cgroup.
    fn psql(&self, host: &str, sql: &str) -> sluice_tests::Output {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args(host, self.pg.port, sql));
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    /// The raw wire client inside the cgroup.
    fn raw(&self, host: &str, port: u16, mode: &str) -> sluice_tests::Output {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
        cmd.arg(pgraw()).args([host, &port.to_string(), mode]);
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    fn sessions(&self) -> Vec<Value> {
        self.agent.sessions().unwrap()
    }
}

fn pgraw() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/pgraw.py")
}

fn ok(out: &sluice_tests::Output) -> &str {
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        out.stdout,
        out.stderr
    );
    &out.stdout
}

#[test]
fn psql_in_the_cgroup_is_intercepted_recorded_and_gets_correct_results() {
    if !require_root("psql_in_the_cgroup_is_intercepted_recorded_and_gets_correct_results") {
        return;
    }
    let s = setup("basic", |_| {});
    let out = s.psql("127.0.0.1", "select id, name from people order by id");
    assert_eq!(ok(&out), "1|ada\n2|grace\n3|edsger\n");

    let sessions = s.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:#?}\n{}", s.agent.log());
    let session = &sessions[0];
    assert_eq!(session["target"], "app-db");
    assert_eq!(session["uid"], CLIENT_UID);
    assert_eq!(session["gid"], CLIENT_UID);
    assert_eq!(session["pid"], out.pid);
    assert_eq!(session["comm"], "psql");
    assert_eq!(session["orig_dst"], format!("127.0.0.1:{}", s.pg.port));
    assert_eq!(session["user"], "postgres");
    assert_eq!(session["statements"], 1);
    assert!(
        session["end"].is_string(),
        "session was not sealed: {session}"
    );

    let records = s.agent.export().unwrap();
    let statements: Vec<&str> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .filter_map(|r| r["sql"].as_str())
        .collect();
    assert_eq!(statements, vec!["select id, name from people order by id"]);
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
        ]
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "complete" && r["tag"] == "SELECT 3")
    );

    let id = session["id"].as_str().unwrap();
    let replay = s.agent.read(&["replay", &id[..13]]).unwrap();
    assert!(
        replay.contains("> select id, name from people order by id"),
        "{replay}"
    );
    assert!(replay.contains("edsger"), "{replay}");
    assert!(replay.contains("SELECT 3"), "{replay}");
    assert!(replay.contains("comm psql"), "{replay}");

    let csv = s.agent.read(&["export", "--format", "csv"]).unwrap();
    assert!(csv.starts_with("session,seq,ts,"), "{csv}");
    assert!(
        csv.lines()
            .any(|l| l.contains(",row,") && l.contains("grace")),
        "{csv}"
    );

    // The sealed session's hash chain and signed checkpoint verify.
    let verified = s.agent.read(&["verify", "--session", &id[..13]]).unwrap();
    assert!(
        verified.contains("ok:") && verified.contains("all signed"),
        "{verified}"
    );
}

#[test]
fn ipv6_and_ipv4_mapped_connects_are_intercepted_and_getpeername_shows_the_original() {
    if !require_root(
        "ipv6_and_ipv4_mapped_connects_are_intercepted_and_getpeername_shows_the_original",
    ) {
        return;
    }
    let s = setup("v6", |_| {});
    let port = s.pg.port;
    for host in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
        let out = s.raw(host, port, "peer");
        assert_eq!(
            ok(&out).trim(),
            format!("peer {host} {port}"),
            "getpeername through {host}"
        );
        let out = s.psql(host, "select name from people where id = 2");
        assert_eq!(ok(&out), "grace\n", "psql through {host}");
    }
    let sessions = s.sessions();
    let mut dsts: Vec<String> = sessions
        .iter()
        .filter(|x| x["comm"] == "psql")
        .map(|x| x["orig_dst"].as_str().unwrap().to_string())
        .collect();
    dsts.sort();
    let mut want = vec![
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];
    want.sort();
    // An IPv4-mapped destination is recorded as the IPv4 address it stands for.
    assert_eq!(dsts, want, "{sessions:#?}");
    assert!(
        sessions
            .iter()
            .filter(|x| x["comm"] == "psql")
            .all(|x| x["uid"] == CLIENT_UID)
    );
}

#[test]
fn processes_outside_the_cgroup_and_unprotected_ports_are_not_touched() {
    if !require_root("processes_outside_the_cgroup_and_unprotected_ports_are_not_touched") {
        return;
    }
    let s = setup("untouched", |_| {});
    // Outside the cgroup: straight to the server, nothing recorded.
    assert_eq!(s.pg.sql("select count(*) from people").unwrap().trim(), "3");
    // Inside the cgroup, an unprotected port: straight to whoever listens there.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let out = s.raw("127.0.0.1", other_port, "peer");
    assert_eq!(ok(&out).trim(), format!("peer 127.0.0.1 {other_port}"));
    other.set_nonblocking(true).unwrap();
    let accepted = (0..100).find_map(|_| match other.accept() {
        Ok(c) => Some(c),
        Err(_) => {
            std::thread::sleep(Duration::from_millis(20));
            None
        }
    });
    assert!(
        accepted.is_some(),
        "the unprotected listener never saw the client"
    );
    assert!(s.sessions().is_empty(), "{:#?}", s.sessions());
}

#[test]
fn the_agents_own_upstream_connection_is_not_redirected_again() {
    if !require_root("the_agents_own_upstream_connection_is_not_redirected_again") {
        return;
    }
    // The agent runs inside the intercepted cgroup without the cgroup exemption: only its
    // SO_MARK keeps its upstream connect from being sent back to itself.
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("self").unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        exempt_own_cgroup: false,
        run_in_cgroup: Some(cgroup.path.clone()),
        ..AgentOptions::default()
    })
    .unwrap();
    let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(psql_args("127.0.0.1", pg.port, "select 40 + 2"));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(ok(&out), "42\n", "{}", agent.log());
    let sessions = agent.sessions().unwrap();
    assert_eq!(
        sessions.len(),
        1,
        "exactly one session (no loop through the proxy): {sessions:#?}"
    );
}

#[test]
fn extended_protocol_copy_and_notifications_pass_through_and_are_recorded() {
    if !require_root("extended_protocol_copy_and_notifications_pass_through_and_are_recorded") {
        return;
    }
    let s = setup("protocol", |_| {});
    // Extended protocol with parameters: pgbench's prepared mode over its own tables.
    let init = Command::new(s.pg.bin.join("pgbench"))
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &s.pg.port.to_string(),
            "postgres",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut bench = s
        .cgroup
        .command(Some(CLIENT_UID), s.pg.bin.join("pgbench").to_str().unwrap());
    bench.args([
        "-M",
        "extended",
        "-S",
        "-t",
        "20",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-p",
        &s.pg.port.to_string(),
        "postgres",
    ]);
    let out = run_bounded(&mut bench, LIMIT).unwrap();
    assert!(
        ok(&out).contains("number of transactions actually processed: 20/20"),
        "{}",
        out.stdout
    );

    // COPY out and in, and LISTEN/NOTIFY, through psql.
    let out = s.psql(
        "127.0.0.1",
        "copy (select id, name from people order by id) to stdout",
    );
    assert_eq!(ok(&out), "1\tada\n2\tgrace\n3\tedsger\n");
    let mut copy_in = s.cgroup.command(Some(CLIENT_UID), "psql");
    copy_in.args(psql_args("127.0.0.1", s.pg.port, "copy people from stdin"));
    let child = copy_in
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = child;
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"4\tbarbara\n5\tdonald\n")
            .unwrap();
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(s.pg.sql("select count(*) from people").unwrap().trim(), "5");
    let out = s.psql("127.0.0.1", "listen news; notify news, 'hello'; select 1");
    assert!(
        ok(&out).contains("\"news\" with payload \"hello\""),
        "{}",
        out.stdout
    );

    let records = s.agent.export().unwrap();
    let statements: Vec<(&str, &Value)> = records
        .iter()
        .filter(|r| r["kind"] == "statement")
        .map(|r| (r["sql"].as_str().unwrap_or(""), &r["params"]))
        .collect();
    let selects: Vec<&(&str, &Value)> = statements
        .iter()
        .filter(|(sql, _)| sql.contains("SELECT abalance FROM pgbench_accounts"))
        .collect();
    assert_eq!(
        selects.len(),
        20,
        "each extended-protocol execution is one statement with its parameter"
    );
    assert!(
        selects
            .iter()
            .all(|(_, p)| p.as_array().is_some_and(|a| a.len() == 1))
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "row" && r["values"] == serde_json::json!(["2", "grace"])),
        "COPY out rows recorded"
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "row" && r["values"] == serde_json::json!(["5", "donald"])),
        "COPY in rows recorded"
    );
    assert!(
        records
            .iter()
            .any(|r| r["kind"] == "notification" && r["message"] == "hello")
    );
}

#[test]
fn bad_input_closes_only_that_connection_with_a_reason_and_the_agent_keeps_serving() {
    if !require_root(
        "bad_input_closes_only_that_connection_with_a_reason_and_the_agent_keeps_serving",
    ) {
        return;
    }
    let s = setup("badinput", |o| o.max_message_bytes = 1 << 20);
    let port = s.pg.port;

    let out = s.raw("127.0.0.1", port, "malformed");
    assert!(
        ok(&out).starts_with("closed 08P01 sluice: malformed message from the client"),
        "{}",
        out.stdout
    );
    let out = s.raw("127.0.0.1", port, "oversized");
    assert!(ok(&out).starts_with("closed 08P01"), "{}", out.stdout);
    let out = s.raw("127.0.0.1", port, "huge-startup");
    assert!(
        ok(&out).starts_with("closed 08P01 sluice: bad startup packet"),
        "{}",
        out.stdout
    );
    let out = s.raw("127.0.0.1", port, "midmessage");
    ok(&out);

    // The agent is unaffected.
    assert_eq!(
        ok(&s.psql("127.0.0.1", "select 'still here'")),
        "still here\n"
    );

    let sessions = s.sessions();
    let reasons: Vec<&str> = sessions
        .iter()
        .filter_map(|x| x["end_reason"].as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("malformed message from the client")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .filter(|r| r.contains("malformed") || r.contains("bad startup packet"))
            .count()
            >= 3,
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"client disconnected in the middle of a message"),
        "{reasons:?}"
    );
    let notes: Vec<Value> = s
        .agent
        .export()
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "note")
        .collect();
    assert!(
        notes.iter().any(|n| n["message"]
            .as_str()
            .is_some_and(|m| m.contains("exceeds") || m.contains("too long") || m.contains("max"))),
        "{notes:#?}"
    );
}

#[test]
fn an_unreachable_backend_gives_sqlstate_08006_naming_the_target() {
    if !require_root("an_unreachable_backend_gives_sqlstate_08006_naming_the_target") {
        return;
    }
    let dead = sluice_tests::free_port();
    let s = setup("unreachable", |o| {
        o.targets
            .push(pg_target("gone-db", &format!("127.0.0.1:{dead}")))
    });
    let out = s.raw("127.0.0.1", dead, "error");
    let text = ok(&out).trim().to_string();
    assert!(
        text.starts_with("error 08006 sluice: cannot reach target \"gone-db\""),
        "{text}"
    );
    let psql = s.psql("127.0.0.1", "select 1");
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(psql_args("127.0.0.1", dead, "select 1"));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("cannot reach target \"gone-db\""),
        "{}",
        out.stderr
    );
    ok(&psql);
    let sessions = s.sessions();
    assert!(
        sessions
            .iter()
            .any(|x| x["target"] == "gone-db" && x["end_reason"] == "backend unreachable"),
        "{sessions:#?}"
    );
}

#[test]
fn shutdown_seals_open_sessions_and_detaches_the_programs() {
    if !require_root("shutdown_seals_open_sessions_and_detaches_the_programs") {
        return;
    }
    let mut s = setup("shutdown", |_| {});
    let mut idle = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    idle.arg(pgraw())
        .args(["127.0.0.1", &s.pg.port.to_string(), "idle"]);
    let mut idle = idle.stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Wait for "ready" (bounded by the client's own timeouts).
    let mut reader = std::io::BufReader::new(idle.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    s.agent.stop();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    assert!(idle.wait().unwrap().success());
    assert!(
        rest.starts_with("closed 57P01"),
        "the client is told why: {rest}"
    );
    let sessions = s.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["end_reason"], "agent shutdown");
    assert!(
        s.agent.logged("eBPF interception detached"),
        "{}",
        s.agent.log()
    );

    // Detached: the cgroup's clients now reach the server directly and nothing is recorded.
    assert_eq!(ok(&s.psql("127.0.0.1", "select 7")), "7\n");
    assert_eq!(s.sessions().len(), 1);
}

#[test]
fn a_killed_agent_fails_closed_and_the_next_start_replaces_its_attachments() {
    if !require_root("a_killed_agent_fails_closed_and_the_next_start_replaces_its_attachments") {
        return;
    }
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("crash").unwrap();
    let pin = format!("/sys/fs/bpf/sluice-test-crash-{}", std::process::id());
    let options = || AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        pin_dir: Some(pin.clone()),
        ..AgentOptions::default()
    };
    let psql = || {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args("127.0.0.1", pg.port, "select 'through'"));
        run_bounded(&mut cmd, LIMIT).unwrap()
    };
    let mut first = Agent::start(options()).unwrap();
    assert_eq!(ok(&psql()), "through\n");
    let pid = first.pid().unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    first.stop();
    // The pinned programs still redirect, to a port nobody listens on: refused, not bypassed.
    let out = psql();
    assert!(
        !out.status.success(),
        "a crashed agent must not let clients bypass it: {}",
        out.stdout
    );
    let second = Agent::start(options()).unwrap();
    assert_eq!(ok(&psql()), "through\n", "{}", second.log());
    assert_eq!(second.sessions().unwrap().len(), 1);
}

#[test]
fn without_ebpf_an_explicit_listener_takes_the_same_recorded_path() {
    // No eBPF and no cgroup: this one runs without root too.
    let pg = Postgres::start().unwrap();
    let listen = sluice_tests::free_port();
    let target = format!(
        "[[target]]\nname = \"explicit\"\nprotocol = \"postgres\"\nlisten = \"127.0.0.1:{listen}\"\nbackend = \"127.0.0.1:{}\"\n",
        pg.port
    );
    let agent = Agent::start(AgentOptions {
        no_ebpf: true,
        targets: vec![target],
        ..AgentOptions::default()
    })
    .unwrap();
    let mut cmd = Command::new("psql");
    cmd.args(psql_args("127.0.0.1", listen, "select 'explicit'"));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(ok(&out), "explicit\n", "{}", agent.log());
    let sessions = agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["target"], "explicit");
    assert_eq!(
        sessions[0]["comm"],
        Value::Null,
        "no process identity without eBPF"
    );
    assert_eq!(sessions[0]["statements"], 1);
}

/// Regression: the client side chose its message cap before the read that began during
/// login, so a fresh session whose first statement was over the pre-login cap was closed with
/// FATAL 08P01 (the same statement sent second passed). 100 kB is over that cap (64 kB and a
/// few bytes, room for a token as the password).
#[test]
fn a_statement_over_the_pre_login_cap_may_be_the_first_of_a_fresh_session() {
    if !require_root("a_statement_over_the_pre_login_cap_may_be_the_first_of_a_fresh_session") {
        return;
    }
    let s = setup("big-first", |_| {});
    let big = format!("select length('{}')", "x".repeat(100_000));
    // psql sends it the moment the login is done (simple protocol).
    let out = s.psql("127.0.0.1", &big);
    assert_eq!(ok(&out), "100000\n", "{}", s.agent.log());
    // The raw client, simple and extended protocol, right after AuthenticationOk's
    // ReadyForQuery.
    let port = s.pg.port.to_string();
    for mode in ["pipeline", "extended"] {
        let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
        cmd.arg(pgraw())
            .args(["127.0.0.1", port.as_str(), mode, big.as_str()]);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            ok(&out).lines().any(|l| l == "D 100000"),
            "{mode}: {}\n{}",
            out.stdout,
            s.agent.log()
        );
    }
    let sessions = s.sessions();
    assert_eq!(sessions.len(), 3, "{sessions:#?}");
    for session in &sessions {
        assert_eq!(session["statements"], 1, "{session}");
    }
}
