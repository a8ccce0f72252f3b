//! End to end: statements held for approval, just-in-time grants, and policy reload, with the
//! example policies in `policies/`, the real agent, real psql, a real PostgreSQL, and the real
//! `sluice requests/approve/deny/request access/grants` commands run as other uids.
//!
//! The target is named `prod-db`, where the example policies hold every DELETE for a member of
//! `dba` and allow DDL only under a just-in-time grant. People (by uid, through `[[identity]]`):
//! - uid 65534 (`CLIENT_UID`): "dev", groups developers;
//! - uid 1: "dana", groups dba and admins;
//! - uid 3: "sam", group dba;
//! - uid 2: "dev2", group developers.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_session_args, require_root,
    run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);
const DANA: u32 = 1;
const DEV2: u32 = 2;
const SAM: u32 = 3;
/// The hold timeout these agents run with.
const HOLD_SECS: u64 = 6;

struct Setup {
    agent: Agent,
    cgroup: Cgroup,
    pg: Postgres,
    policies: PathBuf,
}

fn identities() -> String {
    format!(
        "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n\n\
         [[identity]]\nuid = {DANA}\nprincipal = \"dana\"\ngroups = [\"dba\", \"admins\"]\n\n\
         [[identity]]\nuid = {SAM}\nprincipal = \"sam\"\ngroups = [\"dba\"]\n\n\
         [[identity]]\nuid = {DEV2}\nprincipal = \"dev2\"\ngroups = [\"developers\"]\n"
    )
}

fn start_agent(pg: &Postgres, cgroup: &Cgroup, policies: &Path, journal: Option<PathBuf>) -> Agent {
    let mut target = pg_target("prod-db", &format!("127.0.0.1:{}", pg.port));
    target.push_str("jit_approvers = \"dba\"\njit_max_secs = 3600\n");
    Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![target],
        policy_dir: Some(policies.to_path_buf()),
        extra_config: identities(),
        agent_config: format!("approval_timeout_secs = {HOLD_SECS}\npolicy_poll_secs = 1\n"),
        journal_dir: journal,
        ..AgentOptions::default()
    })
    .unwrap()
}

fn setup(name: &str) -> Setup {
    let pg = Postgres::start().unwrap();
    pg.sql("create table people (id int primary key, name text); insert into people values (1, 'ada'), (2, 'grace'), (3, 'edsger');")
        .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    // A copy, so a test may change the policies under a running agent.
    let policies = tempfile::Builder::new()
        .prefix("sluice-policies-")
        .tempdir()
        .unwrap()
        .keep();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    for e in std::fs::read_dir(&examples).unwrap() {
        let p = e.unwrap().path();
        if p.extension()
            .is_some_and(|x| x == "cedar" || x == "cedarschema")
        {
            std::fs::copy(&p, policies.join(p.file_name().unwrap())).unwrap();
        }
    }
    let agent = start_agent(&pg, &cgroup, &policies, None);
    Setup {
        agent,
        cgroup,
        pg,
        policies,
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.policies);
    }
}

/// A client running in the background, its stdout and stderr going to files we can poll.
struct Background {
    child: Child,
    dir: tempfile::TempDir,
}

impl Background {
    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("err")).unwrap_or_default()
    }
    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("out")).unwrap_or_default()
    }
    /// Waits (bounded) until stdout or stderr contains `needle`; returns both.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            let both = format!("{}\n{}", self.stdout(), self.stderr());
            if both.contains(needle) {
                return both;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not appear within {LIMIT:?}; output so far:\n{both}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    /// Waits (bounded) for the process to exit; returns (success, stdout, stderr).
    fn finish(mut self) -> (bool, String, String) {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.stdout(), self.stderr());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "client did not finish within {LIMIT:?}:\n{}\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Setup {
    fn spawn(&self, mut cmd: Command, stdin: bool) -> Background {
        let dir = tempfile::tempdir().unwrap();
        cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap());
        Background {
            child: cmd.spawn().unwrap(),
            dir,
        }
    }

    /// psql as `uid` running each of `sql` in one session, in the background.
    fn psql_bg(&self, uid: u32, sql: &[&str]) -> Background {
        let mut cmd = self.cgroup.command(Some(uid), "psql");
        cmd.args(psql_session_args(self.pg.port, sql));
        self.spawn(cmd, false)
    }

    /// `sluice ARGS` as `uid` against the agent; (success, stdout + stderr).
    fn sluice(&self, uid: Option<u32>, args: &[&str]) -> (bool, String) {
        let out = self.agent.control(uid, args).unwrap();
        (
            out.status.success(),
            format!("{}{}", out.stdout, out.stderr),
        )
    }

    fn requests(&self, all: bool) -> Vec<Value> {
        let mut args = vec!["requests", "--json"];
        if all {
            args.push("--all");
        }
        let (ok, text) = self.sluice(Some(DEV2), &args);
        assert!(ok, "{text}");
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn people(&self) -> String {
        self.pg
            .sql("select string_agg(id::text, ',' order by id) from people")
            .unwrap()
            .trim()
            .to_string()
    }

    fn export(&self, kind: &str) -> Vec<Value> {
        self.agent
            .export()
            .unwrap()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }
}

/// The request id from the notice "... request <id>; ...".
fn request_id(text: &str) -> String {
    let at = text
        .find("held for approval: request ")
        .unwrap_or_else(|| panic!("no held notice in:\n{text}"));
    text[at + "held for approval: request ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect()
}

#[test]
fn a_held_delete_runs_once_another_dba_approves_it_and_its_rows_arrive() {
    if !require_root("a_held_delete_runs_once_another_dba_approves_it_and_its_rows_arrive") {
        return;
    }
    let s = setup("approve");
    let psql = s.psql_bg(
        CLIENT_UID,
        &[
            "delete from people where id = 1 returning name",
            "select 'after'",
        ],
    );
    let seen = psql.wait_for("held for approval");
    let id = request_id(&seen);
    assert!(
        seen.contains(&format!("sluice approve {id}")),
        "the notice says what to run: {seen}"
    );
    // Held: nothing reached the backend.
    assert_eq!(s.people(), "1,2,3");
    let pending = s.requests(false);
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["id"], id.as_str());
    assert_eq!(pending[0]["requester"]["name"], "dev");
    assert_eq!(pending[0]["target"], "prod-db");
    assert_eq!(
        pending[0]["kind"]["Statement"]["sql"],
        "delete from people where id = 1 returning name"
    );
    let (_, table) = s.sluice(Some(DEV2), &["requests"]);
    assert!(table.contains(&id) && table.contains("pending"), "{table}");

    // The requester and a non-member cannot decide; a member of dba can.
    let (ok, text) = s.sluice(Some(CLIENT_UID), &["approve", &id]);
    assert!(
        !ok && text.contains("only members of group \"dba\""),
        "{text}"
    );
    let (ok, text) = s.sluice(Some(DEV2), &["approve", &id]);
    assert!(!ok && text.contains("dev2 is not one"), "{text}");
    assert_eq!(s.people(), "1,2,3");
    let (ok, text) = s.sluice(
        Some(DANA),
        &["approve", &id[..5], "--comment", "INC-7 cleanup"],
    );
    assert!(ok && text.contains("approved by dana"), "{text}");

    let (ok, out, err) = psql.finish();
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("ada") && out.contains("after"),
        "rows arrive: {out}"
    );
    assert_eq!(s.people(), "2,3");
    // Decided once.
    let (ok, text) = s.sluice(Some(SAM), &["deny", &id, "--reason", "late"]);
    assert!(!ok && text.contains("already approved"), "{text}");
    assert!(s.requests(false).is_empty());

    let reviews = s.export("review");
    let states: Vec<&str> = reviews.iter().filter_map(|r| r["state"].as_str()).collect();
    assert_eq!(states, ["pending", "approved"], "{reviews:?}");
    assert_eq!(reviews[1]["by"], "dana");
    let decision = s
        .export("decision")
        .into_iter()
        .find(|d| d["action"] == "delete")
        .unwrap();
    assert_eq!(decision["allowed"], true);
    assert_eq!(
        decision["reason"],
        format!("request {id} approved by dana: INC-7 cleanup")
    );
    assert_eq!(decision["policies"][0], "prod-delete-needs-dba");
    let session = s.agent.sessions().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let replay = s.agent.read(&["replay", &session]).unwrap();
    assert!(
        replay.contains(&format!("request {id} approved by dana")),
        "{replay}"
    );
}

#[test]
fn deny_timeout_and_own_requests_fail_the_statement_and_the_session_goes_on() {
    if !require_root("deny_timeout_and_own_requests_fail_the_statement_and_the_session_goes_on") {
        return;
    }
    let s = setup("deny");
    // Denied with a reason; the next statement in the session runs.
    let psql = s.psql_bg(
        CLIENT_UID,
        &["delete from people where id = 2", "select 'still here'"],
    );
    let id = request_id(&psql.wait_for("held for approval"));
    let (ok, text) = s.sluice(Some(SAM), &["deny", &id]);
    assert!(
        !ok && text.contains("--reason"),
        "a deny needs a reason: {text}"
    );
    let (ok, text) = s.sluice(Some(SAM), &["deny", &id, "--reason", "use the archive job"]);
    assert!(ok, "{text}");
    let (_, out, err) = psql.finish();
    assert!(
        err.contains(&format!(
            "sluice: request {id} was denied by sam: use the archive job"
        )),
        "{err}"
    );
    assert!(out.contains("still here"), "{out}");
    assert_eq!(s.people(), "1,2,3");

    // Nobody decides: after the hold timeout the statement fails; a late approval is refused.
    let started = Instant::now();
    let psql = s.psql_bg(
        CLIENT_UID,
        &["delete from people where id = 3", "select 'next'"],
    );
    let id = request_id(&psql.wait_for("held for approval"));
    let (_, out, err) = psql.finish();
    assert!(started.elapsed() >= Duration::from_secs(HOLD_SECS));
    assert!(
        err.contains(&format!(
            "request {id} was not decided within {HOLD_SECS} s"
        )),
        "{err}"
    );
    assert!(out.contains("next"), "{out}");
    let (ok, text) = s.sluice(Some(SAM), &["approve", &id]);
    assert!(!ok && text.contains("already timed-out"), "{text}");
    assert_eq!(s.people(), "1,2,3");

    // A dba's own request waits for another dba.
    let psql = s.psql_bg(DANA, &["delete from people where id = 3 returning name"]);
    let id = request_id(&psql.wait_for("held for approval"));
    let (ok, text) = s.sluice(Some(DANA), &["approve", &id]);
    assert!(!ok && text.contains("dana made request"), "{text}");
    let (ok, text) = s.sluice(Some(SAM), &["approve", &id]);
    assert!(ok, "{text}");
    let (ok, out, err) = psql.finish();
    assert!(ok && out.contains("edsger"), "{out}\n{err}");
    assert_eq!(s.people(), "1,2");

    // Ctrl-C: psql sends a CancelRequest on a new connection; the hold ends at once.
    let psql = s.psql_bg(CLIENT_UID, &["delete from people where id = 1"]);
    let id = request_id(&psql.wait_for("held for approval"));
    let cancelled_at = Instant::now();
    let pid = psql.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let (_, out, err) = psql.finish();
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(HOLD_SECS),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "canceling statement due to user request: request {id} is withdrawn"
        )),
        "{err}"
    );
    // (psql itself stops running further -c commands after a cancel.)
    let _ = out;
    assert_eq!(s.people(), "1,2");
    assert!(s.requests(false).is_empty());

    let all = s.requests(true);
    let states: Vec<&str> = all
        .iter()
        .filter_map(|r| r["state"].as_object())
        .flat_map(|o| o.keys())
        .map(String::as_str)
        .collect();
    assert_eq!(
        states,
        ["Denied", "TimedOut", "Approved", "Abandoned"],
        "{all:?}"
    );
    assert_eq!(
        all[3]["state"]["Abandoned"]["why"],
        "the client cancelled the statement"
    );
}

#[test]
fn a_held_statement_in_a_transaction_runs_in_it_or_leaves_it_untouched() {
    if !require_root("a_held_statement_in_a_transaction_runs_in_it_or_leaves_it_untouched") {
        return;
    }
    let s = setup("txn");
    // Approved: the DELETE runs inside the open transaction, which then commits both.
    let psql = s.psql_bg(
        CLIENT_UID,
        &[
            "begin",
            "insert into people values (10, 'barbara')",
            "delete from people where id = 1",
            "commit",
        ],
    );
    let id = request_id(&psql.wait_for("held for approval"));
    // The transaction is open on the backend, its insert not visible yet.
    assert_eq!(s.people(), "1,2,3");
    let (ok, text) = s.sluice(Some(SAM), &["approve", &id]);
    assert!(ok, "{text}");
    let (ok, out, err) = psql.finish();
    assert!(ok, "{out}\n{err}");
    assert_eq!(s.people(), "2,3,10");

    // Denied: the DELETE never ran, the transaction is neither aborted nor rolled back, and
    // COMMIT keeps its earlier insert.
    let psql = s.psql_bg(
        CLIENT_UID,
        &[
            "begin",
            "insert into people values (11, 'frances')",
            "delete from people where id = 2",
            "select 'in transaction: ' || (now() = statement_timestamp())::text",
            "commit",
        ],
    );
    let id = request_id(&psql.wait_for("held for approval"));
    let (ok, text) = s.sluice(Some(SAM), &["deny", &id, "--reason", "no"]);
    assert!(ok, "{text}");
    let (_, out, err) = psql.finish();
    assert!(err.contains("was denied by sam: no"), "{err}");
    assert!(!err.contains("current transaction is aborted"), "{err}");
    // now() is the transaction's start, so it differs from the statement's time inside it.
    assert!(out.contains("in transaction: false"), "{out}");
    assert_eq!(s.people(), "2,3,10,11");
}

#[test]
fn a_held_statement_in_an_extended_protocol_pipeline_keeps_responses_in_order() {
    if !require_root("a_held_statement_in_an_extended_protocol_pipeline_keeps_responses_in_order") {
        return;
    }
    let s = setup("extended");
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/pgraw.py"))
        .args([
            "127.0.0.1",
            &s.pg.port.to_string(),
            "extended",
            "select 'first'",
            "delete from people where id = 3 returning name",
            "select 'third'",
        ]);
    let raw = s.spawn(cmd, false);
    let id = request_id(&raw.wait_for("held for approval"));
    // The batch before the held one is answered during the hold (the notice, sent at once,
    // may come before or after its rows); the batch after it waits.
    let seen = raw.wait_for("D first");
    assert!(!seen.contains("third"), "{seen}");
    let (ok, text) = s.sluice(Some(DANA), &["approve", &id]);
    assert!(ok, "{text}");
    let (ok, out, err) = raw.finish();
    assert!(ok, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    let expected = [
        "C SELECT 1",
        "Z I",
        "D edsger",
        "C DELETE 1",
        "Z I",
        "D third",
        "C SELECT 1",
        "Z I",
    ];
    let got: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| !l.starts_with("N ") && !l.starts_with("D first"))
        .collect();
    assert_eq!(got, expected, "{out}");
    assert_eq!(s.people(), "1,2");
}

#[test]
fn a_grant_allows_ddl_until_it_expires_also_in_an_open_session_and_survives_a_restart() {
    if !require_root(
        "a_grant_allows_ddl_until_it_expires_also_in_an_open_session_and_survives_a_restart",
    ) {
        return;
    }
    let mut s = setup("jit");
    // One long session for dana (an admin, so only the JIT policy stands in the way).
    let mut cmd = s.cgroup.command(Some(DANA), "psql");
    let mut args = psql_session_args(s.pg.port, &[]);
    args.extend(["-f".to_string(), "-".to_string()]);
    cmd.args(args);
    let mut psql = s.spawn(cmd, true);
    let mut stdin = psql.child.stdin.take().unwrap();
    let mut send = |sql: &str| {
        stdin.write_all(sql.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    };
    let tables = |pg: &Postgres| {
        pg.sql("select string_agg(tablename, ',' order by tablename) from pg_tables where schemaname = 'public'")
            .unwrap()
            .trim()
            .to_string()
    };

    send("create table t1 (x int);");
    psql.wait_for("prod-ddl-needs-jit");
    assert_eq!(tables(&s.pg), "people");

    // Bad requests are refused with what to do.
    let (ok, text) = s.sluice(
        Some(DANA),
        &[
            "request", "access", "--target", "prod-db", "--for", "2h", "--reason", "INC-1",
        ],
    );
    assert!(!ok && text.contains("between 1 and 3600 seconds"), "{text}");
    let (ok, text) = s.sluice(
        Some(DANA),
        &[
            "request", "access", "--target", "nope", "--for", "5m", "--reason", "INC-1",
        ],
    );
    assert!(!ok && text.contains("no target named \"nope\""), "{text}");

    let (ok, text) = s.sluice(
        Some(DANA),
        &[
            "request", "access", "--target", "prod-db", "--for", "8s", "--reason", "INC-1234",
        ],
    );
    assert!(ok, "{text}");
    let id = text.split_whitespace().nth(1).unwrap().to_string();
    let (ok, text) = s.sluice(Some(DANA), &["approve", &id]);
    assert!(!ok && text.contains("dana made request"), "{text}");
    let (ok, text) = s.sluice(Some(SAM), &["approve", &id, "--comment", "ok for INC-1234"]);
    assert!(ok, "{text}");
    let approved = Instant::now();
    let (_, grants) = s.sluice(Some(DEV2), &["grants"]);
    assert!(
        grants.contains(&id) && grants.contains("dana") && grants.contains("expires in"),
        "{grants}"
    );

    // The open session gets the right at once.
    send("create table t2 (x int);");
    let deadline = Instant::now() + LIMIT;
    while tables(&s.pg) != "people,t2" {
        assert!(
            Instant::now() < deadline,
            "t2 never appeared: {}",
            psql.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // ... and loses it at expiry, mid-session.
    let expiry = approved + Duration::from_secs(9);
    std::thread::sleep(expiry.saturating_duration_since(Instant::now()));
    send("create table t3 (x int);");
    let deadline = Instant::now() + LIMIT;
    while psql.stderr().matches("prod-ddl-needs-jit").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "t3 was not denied: {}",
            psql.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tables(&s.pg), "people,t2");
    let (_, grants) = s.sluice(Some(DEV2), &["grants"]);
    assert!(grants.contains("(none)"), "{grants}");
    drop(stdin);
    let (ok, out, err) = psql.finish();
    assert!(ok, "{out}\n{err}");

    // A long grant and the decisions survive a restart; a statement held at shutdown is
    // marked abandoned.
    let (ok, text) = s.sluice(
        Some(DANA),
        &[
            "request", "access", "--target", "prod-db", "--for", "30m", "--reason", "INC-99",
        ],
    );
    assert!(ok, "{text}");
    let long = text.split_whitespace().nth(1).unwrap().to_string();
    let (ok, text) = s.sluice(Some(SAM), &["approve", &long]);
    assert!(ok, "{text}");
    let held = s.psql_bg(CLIENT_UID, &["delete from people where id = 1"]);
    let held_id = request_id(&held.wait_for("held for approval"));
    let journal = s.agent.journal_dir();
    // Keep the old agent's directory (and journal) while a new agent opens the journal.
    s.agent.stop();
    let (_, _, err) = held.finish();
    assert!(
        err.contains("shutting down") || err.contains("terminat"),
        "{err}"
    );
    let old = std::mem::replace(
        &mut s.agent,
        start_agent(&s.pg, &s.cgroup, &s.policies, Some(journal)),
    );
    let all = s.requests(true);
    let state = |id: &str| {
        all.iter()
            .find(|r| r["id"] == id)
            .map(|r| r["state"].clone())
            .unwrap_or_else(|| panic!("{id} missing after restart: {all:?}"))
    };
    assert_eq!(state(&id)["Approved"]["by"], "sam");
    assert_eq!(state(&long)["Approved"]["by"], "sam");
    assert!(state(&held_id)["Abandoned"].is_object(), "{all:?}");
    let (_, grants) = s.sluice(Some(DEV2), &["grants"]);
    assert!(grants.contains(&long) && !grants.contains(&id), "{grants}");
    let out = run_bounded(
        s.cgroup
            .command(Some(DANA), "psql")
            .args(psql_session_args(s.pg.port, &["create table t4 (x int)"])),
        LIMIT,
    )
    .unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    // Revoked: gone from the next statement on.
    let (ok, text) = s.sluice(Some(DANA), &["revoke", &long]);
    assert!(ok, "{text}");
    let out = run_bounded(
        s.cgroup
            .command(Some(DANA), "psql")
            .args(psql_session_args(s.pg.port, &["create table t5 (x int)"])),
        LIMIT,
    )
    .unwrap();
    assert!(out.stderr.contains("prod-ddl-needs-jit"), "{}", out.stderr);
    // The new agent uses the old one's journal directory: stop it before that goes.
    s.agent.stop();
    drop(old);
}

#[test]
fn policies_reload_on_change_and_on_sighup_and_a_broken_set_keeps_the_old_one() {
    if !require_root("policies_reload_on_change_and_on_sighup_and_a_broken_set_keeps_the_old_one") {
        return;
    }
    let s = setup("reload");
    let select = || {
        run_bounded(
            s.cgroup
                .command(Some(CLIENT_UID), "psql")
                .args(psql_session_args(
                    s.pg.port,
                    &["select count(*) from people"],
                )),
            LIMIT,
        )
        .unwrap()
    };
    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + LIMIT;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} within {LIMIT:?}; log:\n{}",
                s.agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(select().stdout.contains('3'));

    // A new file is picked up without a signal.
    std::fs::write(
        s.policies.join("zz-freeze.cedar"),
        "@id(\"freeze\")\n@reason(\"reads are frozen\")\nforbid (principal, action == Sluice::Action::\"select\", resource);\n",
    )
    .unwrap();
    wait_until("the new policy applies", &|| {
        select().stderr.contains("denied by policy \"freeze\"")
    });

    // A broken set is refused with Cedar's message, and the freeze stays.
    std::fs::write(
        s.policies.join("zz-broken.cedar"),
        "permit (principal, action, resource) when { context.nope };\n",
    )
    .unwrap();
    wait_until("the broken set is refused", &|| {
        s.agent.log().contains("policy reload refused")
    });
    assert!(s.agent.log().contains("nope"), "{}", s.agent.log());
    assert!(select().stderr.contains("denied by policy \"freeze\""));
    let (ok, text) = s.sluice(None, &["policy", "reload"]);
    assert!(!ok && text.contains("nope"), "{text}");

    // Fixed: the poll finds the set valid again (the freeze stays).
    let reloads = s.agent.log().matches("policies reloaded").count();
    std::fs::remove_file(s.policies.join("zz-broken.cedar")).unwrap();
    wait_until("the fixed set is loaded", &|| {
        s.agent.log().matches("policies reloaded").count() > reloads
    });
    assert!(select().stderr.contains("denied by policy \"freeze\""));

    // A change the poll cannot see (same size, same modification time) waits for SIGHUP.
    let freeze = s.policies.join("zz-freeze.cedar");
    let mtime = std::fs::metadata(&freeze).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&freeze)
        .unwrap()
        .replace("\"select\"", "\"insert\"");
    std::fs::write(&freeze, text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&freeze)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(select().stderr.contains("denied by policy \"freeze\""));
    let pid = s.agent.pid().unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_until("SIGHUP applies the change", &|| {
        select().stdout.contains('3')
    });
    assert!(s.agent.logged("SIGHUP"), "{}", s.agent.log());
    let (ok, text) = s.sluice(None, &["policy", "reload"]);
    assert!(ok && text.contains("policies in force"), "{text}");
}
