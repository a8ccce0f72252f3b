//! End to end: the compliance walk-through of issue 7 on a real agent's journal. Sessions of
//! two database users (alice, bob) under two principals (dev by uid, admin by cgroup) touch two
//! tables; then `sluice sessions` finds the ones of one user touching one table in a time
//! range, `sluice replay --timing` replays one, `sluice export --out --bundle` exports them and
//! `sluice verify --bundle --export` checks the export offline. Every way of tampering with the
//! bundle (alter, drop, swap, insert an event) or the CSV (change a value) makes verify fail
//! and name the first bad event or line.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;
use sluice_tests::collector::Collector;
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, require_root, run_bounded,
    sluice_bin,
};

const LIMIT: Duration = Duration::from_secs(60);

/// Field order is drop order: the admin cgroup goes before its parent.
struct Setup {
    agent: Agent,
    admin: Cgroup,
    cgroup: Cgroup,
    pg: Postgres,
}

fn setup(name: &str) -> Setup {
    setup_with(name, "")
}

fn setup_with(name: &str, more_config: &str) -> Setup {
    let pg = Postgres::start().unwrap();
    pg.sql(
        "create table people (id int primary key, name text);
         insert into people values (1, 'ada'), (2, 'grace'), (3, 'edsger');
         create table orders (id int primary key, total numeric);
         insert into orders values (10, 12.50), (11, 99.00);
         create role alice login; create role bob login;
         grant select, insert, update, delete on people, orders to alice, bob;",
    )
    .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let admin_path = cgroup.path.join("admin");
    std::fs::create_dir(&admin_path).unwrap();
    let admin = Cgroup { path: admin_path };
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let extra_config = format!(
        "[[identity]]\ncgroup = \"{}\"\nprincipal = \"admin\"\ngroups = [\"admins\"]\n\n[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n{more_config}",
        admin.path.display()
    );
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        policy_dir: Some(policies),
        extra_config,
        ..AgentOptions::default()
    })
    .unwrap();
    Setup {
        agent,
        admin,
        cgroup,
        pg,
    }
}

impl Setup {
    /// One psql session as database user `user` from `cgroup`, running each statement.
    fn psql(&self, cgroup: &Cgroup, user: &str, sql: &[&str]) -> String {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1"])
            .args([
                "-p",
                &self.pg.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
            ]);
        for s in sql {
            cmd.args(["-c", s]);
        }
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        format!("{}{}", out.stdout, out.stderr)
    }

    /// `sluice sessions --json ARGS`: the ids, oldest first.
    fn find(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec!["sessions", "--json"];
        all.extend_from_slice(args);
        let text = self.agent.read(&all).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits until every session is sealed (the agent writes End when the client is gone).
    fn wait_sealed(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let sessions = self.agent.sessions().unwrap();
            if sessions.len() >= n && sessions.iter().all(|s| s["end"].is_string()) {
                return sessions;
            }
            assert!(
                Instant::now() < deadline,
                "sessions not sealed in 15 s: {sessions:#?}\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `sluice verify --bundle B --export E` in a directory without any journal or config.
fn verify_offline(dir: &Path, bundle: &Path, export: &Path) -> (bool, String) {
    let out = Command::new(sluice_bin())
        .current_dir(dir)
        .env_clear()
        .env("SLUICE_CONFIG", dir.join("no-such-config.toml"))
        .args(["verify", "--bundle"])
        .arg(bundle)
        .arg("--export")
        .arg(export)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// The bundle line index of event `seq` of session `id`.
fn event_line(lines: &[String], id: &str, seq: u64) -> usize {
    lines
        .iter()
        .position(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["type"] == "event" && v["session"] == id && v["seq"] == seq
        })
        .unwrap_or_else(|| panic!("no event {seq} of {id} in the bundle"))
}

#[test]
fn compliance_finds_replays_exports_and_verifies_sessions_and_names_every_tampering() {
    if !require_root(
        "compliance_finds_replays_exports_and_verifies_sessions_and_names_every_tampering",
    ) {
        return;
    }
    let s = setup("compliance");
    let before = jiff::Timestamp::now();
    // Four sessions: alice/dev on people, alice/dev on orders, bob/admin on people, bob/dev on
    // orders with a DELETE without WHERE that policy denies.
    let out = s.psql(
        &s.cgroup,
        "alice",
        &[
            "select name from people order by id",
            "select pg_sleep(0.3)",
            "select count(*) from people",
        ],
    );
    assert!(out.contains("grace"), "{out}");
    s.psql(
        &s.cgroup,
        "alice",
        &["select total from orders order by id"],
    );
    s.psql(&s.admin, "bob", &["select name from people where id = 3"]);
    let out = s.psql(
        &s.cgroup,
        "bob",
        &["select count(*) from orders", "delete from orders"],
    );
    assert!(out.contains("no-update-or-delete-without-where"), "{out}");
    let sessions = s.wait_sealed(4);
    let after = jiff::Timestamp::now();
    let ids: Vec<String> = sessions
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 4, "{sessions:#?}");

    // Search: user alice touching people in the time range.
    let (since, until) = (before.to_string(), after.to_string());
    let found = s.find(&[
        "--user",
        "alice",
        "--statement",
        "PEOPLE",
        "--since",
        &since,
        "--until",
        &until,
    ]);
    assert_eq!(found, vec![ids[0].clone()]);
    assert_eq!(
        s.find(&["--user", "alice", "--since", "1h"]),
        ids[..2].to_vec()
    );
    assert_eq!(s.find(&["--principal", "admin"]), vec![ids[2].clone()]);
    assert_eq!(
        s.find(&["--principal", "dev", "--statement", "orders"]),
        vec![ids[1].clone(), ids[3].clone()]
    );
    assert_eq!(s.find(&["--decision", "denied"]), vec![ids[3].clone()]);
    assert_eq!(s.find(&["--decision", "allowed"]).len(), 4);
    assert_eq!(
        s.find(&["--target", "app-db", "--host", "127.0.0.1"]).len(),
        4
    );
    assert!(s.find(&["--until", &before.to_string()]).is_empty());
    assert!(s.find(&["--target", "prod-db"]).is_empty());
    let table = s.agent.read(&["sessions", "--user", "bob"]).unwrap();
    assert_eq!(table.lines().count(), 3, "{table}");
    let bad = Command::new(sluice_bin())
        .args(["sessions", "--since", "last week", "--journal"])
        .arg(s.agent.journal_dir())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since \"last week\""));

    // Replay with timing, 100 times faster: the 0.3 s sleep is replayed as a few ms.
    let started = Instant::now();
    let replay = s
        .agent
        .read(&["replay", &ids[0], "--timing", "--speed", "100"])
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        replay.contains("> select name from people order by id"),
        "{replay}"
    );
    assert!(replay.contains("edsger"), "{replay}");
    assert!(replay.contains("principal dev"), "{replay}");
    let help = Command::new(sluice_bin())
        .args(["replay", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("capped at 5 s"));

    // Export alice's sessions as CSV with a bundle; verify them offline, elsewhere.
    let work = tempfile::tempdir().unwrap();
    let export = work.path().join("alice.csv");
    let bundle = work.path().join("alice.bundle.jsonl");
    s.agent
        .read(&[
            "export",
            "--format",
            "csv",
            "--user",
            "alice",
            "--out",
            export.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
        ])
        .unwrap();
    let csv = lines(&export);
    assert!(csv[0].starts_with("session,seq,ts,target,"), "{}", csv[0]);
    assert!(csv[0].ends_with(",principal"), "{}", csv[0]);
    assert!(
        csv.iter()
            .any(|l| l.contains(",row,") && l.contains("edsger") && l.ends_with(",dev")),
        "{csv:#?}"
    );
    assert!(csv.iter().all(|l| !l.contains("bob")), "{csv:#?}");
    let (ok, out) = verify_offline(work.path(), &bundle, &export);
    eprintln!("--- pristine: sluice verify says:\n{out}");
    assert!(ok, "{out}");
    assert!(out.contains(&format!("session {}: ok", ids[0])), "{out}");
    assert!(out.contains("alice.csv: ok"), "{out}");

    let pristine_bundle = lines(&bundle);
    let pristine_csv = lines(&export);
    let id = ids[0].as_str();
    let tamper = |what: &str, bundle_lines: Vec<String>, csv_lines: Vec<String>, want: String| {
        write_lines(&bundle, &bundle_lines);
        write_lines(&export, &csv_lines);
        let (ok, out) = verify_offline(work.path(), &bundle, &export);
        eprintln!("--- tampered ({what}): sluice verify says:\n{out}");
        assert!(!ok, "{what}: verify passed:\n{out}");
        assert!(out.contains(&want), "{what}: wanted {want:?} in:\n{out}");
    };

    // Alter an event's value (a row's text), keeping its recorded hash.
    let mut l = pristine_bundle.clone();
    let i = event_line(&l, id, 3);
    let mut v: Value = serde_json::from_str(&l[i]).unwrap();
    let mut value = BASE64.decode(v["value"].as_str().unwrap()).unwrap();
    let last = value.len() - 1;
    value[last] ^= 0x20;
    v["value"] = BASE64.encode(&value).into();
    l[i] = v.to_string();
    tamper(
        "altered",
        l,
        pristine_csv.clone(),
        format!("session {id} event 3: "),
    );

    // Drop an event line.
    let mut l = pristine_bundle.clone();
    l.remove(event_line(&l, id, 3));
    tamper(
        "dropped",
        l,
        pristine_csv.clone(),
        format!("session {id} event 3: missing"),
    );

    // Swap two events.
    let mut l = pristine_bundle.clone();
    let (a, b) = (event_line(&l, id, 3), event_line(&l, id, 4));
    l.swap(a, b);
    tamper(
        "swapped",
        l,
        pristine_csv.clone(),
        format!("session {id} event 3: "),
    );

    // Insert one (a second copy of event 3).
    let mut l = pristine_bundle.clone();
    let a = event_line(&l, id, 3);
    l.insert(a + 1, l[a].clone());
    tamper(
        "inserted",
        l,
        pristine_csv.clone(),
        format!("session {id} event 3: repeated"),
    );

    // Change a value in the CSV.
    let mut c = pristine_csv.clone();
    let row = c
        .iter()
        .position(|l| l.contains(",row,") && l.contains("grace"))
        .unwrap();
    c[row] = c[row].replace("grace", "mallory");
    tamper(
        "csv value",
        pristine_bundle.clone(),
        c,
        format!("line {} is not what the bundle's events say", row + 1),
    );

    // Put back, it verifies again.
    write_lines(&bundle, &pristine_bundle);
    write_lines(&export, &pristine_csv);
    assert!(verify_offline(work.path(), &bundle, &export).0);
}

#[test]
fn the_same_walk_through_works_on_the_collectors_store_with_the_agents_key() {
    if !require_root("the_same_walk_through_works_on_the_collectors_store_with_the_agents_key") {
        return;
    }
    let mut collector = Collector::init().unwrap();
    collector.start().unwrap();
    let s = setup_with("compliance-collector", "\n[shipper]\ninterval_ms = 100\n");
    let token = collector.token("bastion-7", "10m").unwrap();
    let enrolled = run_bounded(
        &mut collector.enroll_command(&sluice_bin(), &token, &s.agent.config),
        LIMIT,
    )
    .unwrap();
    assert!(
        enrolled.status.success(),
        "{}{}",
        enrolled.stdout,
        enrolled.stderr
    );
    s.psql(&s.cgroup, "alice", &["select name from people order by id"]);
    s.psql(&s.admin, "bob", &["select total from orders order by id"]);

    // Shipped and sealed at the collector (the agent's spool empties).
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let stored = collector.sessions().unwrap();
        if stored.len() == 2 && stored.iter().all(|x| x["integrity"] == "verified") {
            break stored;
        }
        assert!(
            Instant::now() < deadline,
            "not shipped in 30 s: {stored:#?}\n{}\n{}",
            s.agent.log(),
            collector.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        stored.iter().all(|x| x["agent"] == "bastion-7"),
        "{stored:#?}"
    );
    let read = |args: &[&str]| {
        let out = collector.read(args).unwrap();
        assert!(out.status.success(), "sluice {args:?}: {}", out.stderr);
        out.stdout
    };
    let table = read(&["sessions"]);
    assert!(
        table.lines().next().unwrap().ends_with("INTEGRITY"),
        "{table}"
    );
    assert_eq!(table.matches("  verified").count(), 2, "{table}");
    let found = read(&[
        "sessions",
        "--json",
        "--host",
        "bastion-7",
        "--user",
        "alice",
        "--statement",
        "people",
    ]);
    let found: Value = serde_json::from_str(&found).unwrap();
    assert_eq!(found.as_array().unwrap().len(), 1, "{found:#}");
    let id = found[0]["id"].as_str().unwrap().to_string();
    assert!(read(&["verify"]).contains("all signed"));
    let replay = read(&["replay", &id, "--timing", "--speed", "100"]);
    assert!(replay.contains("edsger"), "{replay}");

    // Export from the store with a bundle; verify offline, pinned to the enrolled key.
    let work = tempfile::tempdir().unwrap();
    let export = work.path().join("alice.jsonl");
    let bundle = work.path().join("alice.bundle.jsonl");
    read(&[
        "export",
        "--format",
        "jsonl",
        "--session",
        &id,
        "--out",
        export.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ]);
    let agents = collector.admin(&["agents", "--json"]).unwrap();
    let agents: Value = serde_json::from_str(&agents.stdout).unwrap();
    let key = agents[0]["public_key"].as_str().unwrap().to_string();
    let verify = |key: &str| {
        let out = Command::new(sluice_bin())
            .current_dir(work.path())
            .env_clear()
            .args(["verify", "--bundle"])
            .arg(&bundle)
            .arg("--export")
            .arg(&export)
            .args(["--key", key])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = verify(&key);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("signed by key {key}")), "{out}");
    let (ok, out) = verify(&"00".repeat(32));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "session {id} event 0: signed with key {key}, not the key given with --key"
        )),
        "{out}"
    );
}
