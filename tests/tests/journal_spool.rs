//! The journal on the agent's host: a `kill -9` mid-session loses nothing that was forwarded
//! and the session is sealed as interrupted at restart; the journal is encrypted at rest; a full
//! spool refuses new sessions with a clear error (or admits them when configured to fail open).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_args, require_root,
    run_bounded,
};

const LIMIT: Duration = Duration::from_secs(30);

/// A psycopg client that runs two statements, prints their results (flushed), then holds the
/// session open.
const HOLD: &str = r#"
import sys, time, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True, connect_timeout=15)
print(conn.execute("select 'before the crash'").fetchone()[0], flush=True)
print(conn.execute("select string_agg(g::text, ',') from generate_series(1, 5) g").fetchone()[0], flush=True)
time.sleep(60)
"#;

struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_killed_agent_loses_nothing_forwarded_and_the_session_is_sealed_as_interrupted() {
    if !require_root(
        "a_killed_agent_loses_nothing_forwarded_and_the_session_is_sealed_as_interrupted",
    ) {
        return;
    }
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("spool-crash").unwrap();
    let keep = tempfile::tempdir().unwrap();
    let journal = keep.path().join("journal");
    let options = || AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        journal_dir: Some(journal.clone()),
        ..AgentOptions::default()
    };
    let mut first = Agent::start(options()).unwrap();
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut cmd = cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    let child = cmd
        .args(["-c", HOLD, &conninfo])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut held = Held(child);
    // What the client received, line by line, until both results are in (bounded).
    let stdout = held.0.stdout.take().unwrap();
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
    assert_eq!(
        received,
        vec!["before the crash".to_string(), "1,2,3,4,5".into()],
        "{}",
        first.log()
    );

    // kill -9 mid-session.
    let pid = first.pid().unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    first.stop();
    drop(held);

    let second = Agent::start(options()).unwrap();
    assert!(
        second.logged("the previous agent left this session open"),
        "{}",
        second.log()
    );
    let sessions = second.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let id = sessions[0]["id"].as_str().unwrap().to_string();
    assert!(
        sessions[0]["end_reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("interrupted"),
        "{sessions:?}"
    );
    // Every statement forwarded and every row the client received is in the journal.
    let replay = second.read(&["replay", &id]).unwrap();
    for needle in [
        "select 'before the crash'",
        "before the crash",
        "generate_series(1, 5)",
        "1,2,3,4,5",
        "interrupted",
    ] {
        assert!(replay.contains(needle), "{needle:?} not in:\n{replay}");
    }
    // The chain verifies through the seal written at restart.
    let verify = second.read(&["verify", "--session", &id]).unwrap();
    assert!(verify.contains("ok"), "{verify}");

    // No file of the journal holds what was recorded in the clear.
    let mut files = 0;
    for entry in std::fs::read_dir(&journal).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        assert!(
            !bytes.windows(16).any(|w| w == b"before the crash"),
            "a journal file holds a result in the clear"
        );
    }
    assert!(files > 3);
}

#[test]
fn a_full_spool_refuses_new_sessions_clearly_unless_configured_to_admit_them() {
    if !require_root("a_full_spool_refuses_new_sessions_clearly_unless_configured_to_admit_them") {
        return;
    }
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("spool-full").unwrap();
    let keep = tempfile::tempdir().unwrap();
    let journal = keep.path().join("journal");
    let options = |config: &str| AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        journal_dir: Some(journal.clone()),
        agent_config: config.to_string(),
        ..AgentOptions::default()
    };
    let psql = |sql: &str| {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args("127.0.0.1", pg.port, sql));
        run_bounded(&mut cmd, LIMIT).unwrap()
    };
    // A spool of 1 MiB, filled by a 3.2 MB result that does not compress (hex digests),
    // recorded before it was forwarded.
    let agent = Agent::start(options("spool_max_bytes = 1048576\n")).unwrap();
    let big = psql("select string_agg(md5(g::text), '') from generate_series(1, 100000) g");
    assert!(big.status.success(), "{}", big.stderr);
    let refused = psql("select 'after'");
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("recording spool is full"),
        "the client is told why: {}",
        refused.stderr
    );
    assert!(
        agent.logged("journal spool full: session refused"),
        "{}",
        agent.log()
    );
    // Nothing recorded was dropped: the big session is still whole.
    let sessions = agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert!(sessions[0]["server_bytes"].as_u64().unwrap() > 3_000_000);
    drop(agent);

    // Fail open: admitted (and recorded) beyond the limit, with a warning.
    let agent = Agent::start(options(
        "spool_max_bytes = 1048576\nspool_full = \"admit\"\n",
    ))
    .unwrap();
    let admitted = psql("select 'admitted'");
    assert_eq!(admitted.stdout, "admitted\n", "{}", admitted.stderr);
    assert!(
        agent.logged("admitting the session anyway"),
        "{}",
        agent.log()
    );
    assert_eq!(agent.sessions().unwrap().len(), 2);
}
