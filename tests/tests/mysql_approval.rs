//! End to end: MySQL statements held for approval, with the example policies in `policies/`,
//! the real agent and eBPF interception, a real MariaDB, the real `mariadb` CLI, and the real
//! `sluice requests/approve/deny` commands run as other uids.
//!
//! The target is named `prod-db`, where the example policies hold every DELETE for a member of
//! `dba`. MySQL has no mid-query notice, so a client learns of its request only when the hold
//! ends; the tests find it with `sluice requests`. People (by uid, through `[[identity]]`):
//! - uid 65534 (`CLIENT_UID`, runs the `mariadb` CLI): "dev", group developers;
//! - uid 1: "dana", group dba; uid 3: "sam", group dba; uid 2: "dev2", group developers.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_tests::mariadb::{Intercepted, MariaDb, require_mariadb};
use sluice_tests::{Agent, AgentOptions, CLIENT_UID, require_root};

const LIMIT: Duration = Duration::from_secs(60);
const DANA: u32 = 1;
const DEV2: u32 = 2;
const SAM: u32 = 3;

fn identities() -> String {
    format!(
        "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n\n\
         [[identity]]\nuid = {DANA}\nprincipal = \"dana\"\ngroups = [\"dba\"]\n\n\
         [[identity]]\nuid = {SAM}\nprincipal = \"sam\"\ngroups = [\"dba\"]\n\n\
         [[identity]]\nuid = {DEV2}\nprincipal = \"dev2\"\ngroups = [\"developers\"]\n"
    )
}

/// The agent's options for a `prod-db` target with the example policies and `hold_secs`.
fn prod(o: &mut AgentOptions, hold_secs: u64) {
    for t in o.targets.iter_mut() {
        *t = t.replace("name = \"app-db\"", "name = \"prod-db\"");
    }
    o.policy_dir = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies"));
    o.extra_config = identities();
    o.agent_config = format!("approval_timeout_secs = {hold_secs}\n");
}

fn setup(name: &str, hold_secs: u64) -> Intercepted {
    let s = Intercepted::start(name, |o| prod(o, hold_secs)).unwrap();
    s.db.sql("create table shop.t (id int primary key, name varchar(20)); insert into shop.t values (1, 'ada'), (2, 'grace'), (3, 'edsger');")
        .unwrap();
    s
}

fn skip(test: &str) -> bool {
    !require_root(test) || !require_mariadb(test)
}

fn ids(s: &Intercepted) -> String {
    s.db.sql("select group_concat(id order by id) from shop.t")
        .unwrap()
        .trim()
        .to_string()
}

/// `sluice ARGS` as `uid` against the agent; (success, stdout + stderr).
fn sluice(agent: &Agent, uid: u32, args: &[&str]) -> (bool, String) {
    let out = agent.control(Some(uid), args).unwrap();
    (
        out.status.success(),
        format!("{}{}", out.stdout, out.stderr),
    )
}

fn requests(agent: &Agent, all: bool) -> Vec<Value> {
    let mut args = vec!["requests", "--json"];
    if all {
        args.push("--all");
    }
    let (ok, text) = sluice(agent, DEV2, &args);
    assert!(ok, "{text}");
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The state's name in a request's JSON (`{"Deferred": {...}}` -> "Deferred").
fn state(r: &Value) -> String {
    match &r["state"] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
        v => v.to_string(),
    }
}

/// Waits (bounded) for a pending request, as the client cannot be told of one mid-query.
fn pending_request(s: &Intercepted) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(r) = requests(&s.agent, false)
            .into_iter()
            .find(|r| state(r) == "Pending")
        {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no pending request within {LIMIT:?}:\n{}",
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `mariadb` CLI running `sql` through sluice in the background, read from its stdin with
/// `--force`, so it goes on after an error and each statement's fate shows (with `-e` the CLI
/// stops at the first error whatever `--force` says).
struct Background {
    child: Child,
    dir: tempfile::TempDir,
}

impl Background {
    fn start(s: &Intercepted, sql: &str) -> Background {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("in.sql");
        std::fs::write(&script, format!("{sql};\n")).unwrap();
        let mut cmd = s.command(true, "mariadb");
        cmd.args(MariaDb::client_args(s.db.port))
            .arg("--force")
            .stdin(std::fs::File::open(&script).unwrap())
            .stdout(std::fs::File::create(dir.path().join("out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("err")).unwrap());
        Background {
            child: cmd.spawn().unwrap(),
            dir,
        }
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// Waits (bounded) for the CLI to exit; returns (success, stdout, stderr).
    fn finish(mut self) -> (bool, String, String) {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.read("out"), self.read("err"));
            }
            assert!(
                Instant::now() < deadline,
                "mariadb did not finish within {LIMIT:?}:\n{}\n{}",
                self.read("out"),
                self.read("err")
            );
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

/// The request id in a deferred hold's error ("... Request <id> stays open ...").
fn deferred_id(stderr: &str) -> String {
    let at = stderr
        .find("Request ")
        .unwrap_or_else(|| panic!("no request id in:\n{stderr}"));
    stderr[at + "Request ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect()
}

fn export_reviews(agent: &Agent) -> Vec<Value> {
    agent
        .export()
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "review")
        .collect()
}

#[test]
fn a_held_delete_runs_when_another_dba_approves_it_during_the_hold_and_its_rows_change() {
    let test =
        "a_held_delete_runs_when_another_dba_approves_it_during_the_hold_and_its_rows_change";
    if skip(test) {
        return;
    }
    let s = setup("mysql-approve", 60);
    let cli = Background::start(
        &s,
        "select 'before'; delete from t where id = 1; select count(*) as n from t",
    );
    let r = pending_request(&s);
    let id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["requester"]["name"], "dev");
    assert_eq!(r["target"], "prod-db");
    assert_eq!(r["kind"]["Statement"]["sql"], "delete from t where id = 1");
    assert_eq!(r["approvers"], "dba");
    // Held: nothing reached the backend.
    assert_eq!(ids(&s), "1,2,3");

    // The requester and a non-member cannot decide; a member of dba can.
    let (ok, text) = sluice(&s.agent, CLIENT_UID, &["approve", &id]);
    assert!(
        !ok && text.contains("only members of group \"dba\""),
        "{text}"
    );
    let (ok, text) = sluice(&s.agent, DEV2, &["approve", &id]);
    assert!(!ok && text.contains("dev2 is not one"), "{text}");
    assert_eq!(ids(&s), "1,2,3");
    let (ok, text) = sluice(&s.agent, DANA, &["approve", &id, "--comment", "INC-7"]);
    assert!(ok && text.contains("approved by dana"), "{text}");

    let (ok, out, err) = cli.finish();
    assert!(ok, "{out}\n{err}\n{}", s.agent.log());
    assert_eq!(out, "before\nbefore\nn\n2\n", "{err}");
    assert_eq!(ids(&s), "2,3");
    // Used where it was held: nothing is left open to run again.
    assert!(requests(&s.agent, false).is_empty());
    let (ok, text) = sluice(&s.agent, SAM, &["deny", &id, "--reason", "late"]);
    assert!(!ok && text.contains("already approved"), "{text}");

    let states: Vec<String> = export_reviews(&s.agent)
        .iter()
        .map(|r| r["state"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(states, ["pending", "approved"]);
    let records = s.agent.export().unwrap();
    let decision = records
        .iter()
        .find(|d| d["kind"] == "decision" && d["action"] == "delete")
        .unwrap();
    assert_eq!(decision["allowed"], true);
    assert_eq!(
        decision["reason"],
        format!("request {id} approved by dana: INC-7")
    );
    assert_eq!(decision["policies"][0], "prod-delete-needs-dba");
    let session = s.agent.sessions().unwrap()[0].clone();
    assert_eq!(session["statements"], 3, "{session}");
    assert!(session["end"].is_string(), "not sealed: {session}");
}

#[test]
fn a_hold_that_times_out_names_its_request_and_once_approved_the_same_statement_runs_once() {
    let test =
        "a_hold_that_times_out_names_its_request_and_once_approved_the_same_statement_runs_once";
    if skip(test) {
        return;
    }
    const HOLD: u64 = 2;
    let mut s = setup("mysql-rerun", HOLD);
    let delete = "delete from t where id = 2";
    let started = Instant::now();
    let out = s.mariadb(delete);
    assert!(started.elapsed() >= Duration::from_secs(HOLD));
    assert!(!out.status.success());
    assert!(out.stderr.contains("ERROR 1142 (42000)"), "{}", out.stderr);
    let id = deferred_id(&out.stderr);
    assert!(
        out.stderr.contains(&format!("`sluice approve {id}`"))
            && out.stderr.contains("run the same statement again"),
        "{}",
        out.stderr
    );
    assert_eq!(ids(&s), "1,2,3");
    // Still open for a decision, and listed.
    let open = requests(&s.agent, false);
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(
        (open[0]["id"].as_str(), state(&open[0]).as_str()),
        (Some(id.as_str()), "Deferred")
    );
    let (_, table) = sluice(&s.agent, DEV2, &["requests"]);
    assert!(table.contains(&id) && table.contains("deferred"), "{table}");

    let (ok, text) = sluice(&s.agent, SAM, &["approve", &id]);
    assert!(
        ok && text.contains("approved by sam") && text.contains("runs once"),
        "{text}"
    );
    let (_, table) = sluice(&s.agent, DEV2, &["requests"]);
    assert!(table.contains(&id) && table.contains("ready"), "{table}");
    // Nothing ran yet, and the approval survives an agent restart.
    assert_eq!(ids(&s), "1,2,3");
    let journal = s.agent.journal_dir();
    s.agent.stop();
    let mut options = AgentOptions {
        cgroup: Some(s.cgroup.path.clone()),
        targets: vec![sluice_tests::mariadb::mysql_target(
            "prod-db",
            &format!("127.0.0.1:{}", s.db.port),
        )],
        journal_dir: Some(journal),
        ..AgentOptions::default()
    };
    prod(&mut options, HOLD);
    // Keep the old agent's directory (and journal) while the new agent uses it.
    let old = std::mem::replace(&mut s.agent, Agent::start(options).unwrap());

    // Another text is not the approved statement.
    let out = s.mariadb("delete from t where id=2");
    assert!(out.stderr.contains("ERROR 1142"), "{}", out.stderr);
    assert_ne!(deferred_id(&out.stderr), id);
    // The same one runs, once.
    let out = s.mariadb(&format!("{delete}; select count(*) as n from t"));
    assert_eq!(out.ok(), "n\n2\n", "{}", s.agent.log());
    assert_eq!(ids(&s), "1,3");
    let all = requests(&s.agent, true);
    let used = all.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert_eq!(state(used), "Used", "{used}");
    assert_eq!(used["state"]["Used"]["by"], "sam");
    // A third run is held anew, as a new request.
    let out = s.mariadb(delete);
    assert!(out.stderr.contains("ERROR 1142 (42000)"), "{}", out.stderr);
    let third = deferred_id(&out.stderr);
    assert_ne!(third, id);

    let reviews: Vec<(String, String)> = export_reviews(&s.agent)
        .iter()
        .map(|r| {
            (
                r["request"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for want in [
        (id.clone(), "pending".to_string()),
        (id.clone(), "deferred".to_string()),
        (id.clone(), "used".to_string()),
        (third.clone(), "deferred".to_string()),
    ] {
        assert!(reviews.contains(&want), "{want:?} not in {reviews:?}");
    }
    s.agent.stop();
    drop(old);
}

#[test]
fn a_denied_hold_is_an_error_with_the_reason_and_the_session_and_its_transaction_go_on() {
    let test =
        "a_denied_hold_is_an_error_with_the_reason_and_the_session_and_its_transaction_go_on";
    if skip(test) {
        return;
    }
    let s = setup("mysql-deny", 60);
    let cli = Background::start(
        &s,
        "begin; insert into t values (10, 'barbara'); delete from t where id = 1; select 'still here'; commit",
    );
    let id = pending_request(&s)["id"].as_str().unwrap().to_string();
    // The transaction is open on the backend: its insert is not visible yet.
    assert_eq!(ids(&s), "1,2,3");
    let (ok, text) = sluice(&s.agent, SAM, &["deny", &id]);
    assert!(
        !ok && text.contains("--reason"),
        "a deny needs a reason: {text}"
    );
    let (ok, text) = sluice(
        &s.agent,
        SAM,
        &["deny", &id, "--reason", "use the archive job"],
    );
    assert!(ok, "{text}");
    let (_, out, err) = cli.finish();
    assert!(
        err.contains("ERROR 1142 (42000)")
            && err.contains(&format!(
                "request {id} was denied by sam: use the archive job"
            )),
        "{err}"
    );
    // The next statement ran in the same session, and COMMIT kept the earlier insert.
    assert!(
        out.contains("still here"),
        "{out}\n{err}\n{}",
        s.agent.log()
    );
    assert_eq!(ids(&s), "1,2,3,10");
    assert!(requests(&s.agent, false).is_empty());
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let decision = s
        .agent
        .export()
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "decision" && d["action"] == "delete")
        .unwrap();
    assert_eq!(decision["allowed"], false);

    // A client that hangs up during a hold withdraws it.
    let cli = Background::start(&s, "delete from t where id = 3");
    let id = pending_request(&s)["id"].as_str().unwrap().to_string();
    drop(cli);
    let deadline = Instant::now() + LIMIT;
    loop {
        let all = requests(&s.agent, true);
        let r = all.iter().find(|r| r["id"] == id.as_str()).unwrap();
        if state(r) == "Abandoned" {
            break;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ids(&s), "1,2,3,10");

    // The agent stopping during a hold ends the session: the waiting client gets the answer
    // to its command (an error saying why), and the journal the session's end.
    let mut s = s;
    let cli = Background::start(&s, "delete from t where id = 3");
    pending_request(&s);
    s.agent.stop();
    let (_, _, err) = cli.finish();
    assert!(
        err.contains("ERROR 1053") && err.contains("shutting down"),
        "{err}"
    );
    let sessions = s.agent.sessions().unwrap();
    assert!(
        sessions.iter().all(|x| x["end"].is_string()),
        "{sessions:#?}"
    );
    assert_eq!(ids(&s), "1,2,3,10");
}

#[test]
fn a_kill_query_from_the_same_person_withdraws_a_held_statement_with_error_1317() {
    let test = "a_kill_query_from_the_same_person_withdraws_a_held_statement_with_error_1317";
    if skip(test) {
        return;
    }
    let s = setup("mysql-kill-hold", 60);
    let cli = Background::start(
        &s,
        "delete from t where id = 1; select count(*) as n from t",
    );
    let r = pending_request(&s);
    let id = r["id"].as_str().unwrap().to_string();
    // The held client's backend connection: idle there, as its statement never arrived.
    let connection =
        s.db.sql("select id from information_schema.processlist where user = 'app'")
            .unwrap()
            .trim()
            .to_string();
    assert!(connection.parse::<u32>().is_ok(), "{connection:?}");
    // What the CLI's Ctrl-C does: KILL QUERY on a new connection, by the same person.
    let kill = s.mariadb(&format!("kill query {connection}"));
    assert!(kill.status.success(), "{}", kill.stderr);
    let (_, out, err) = cli.finish();
    assert!(
        err.contains("ERROR 1317 (70100)") && err.contains(&format!("request {id} is withdrawn")),
        "{err}"
    );
    // The session goes on (--force): the next statement ran; the row is still there.
    assert!(out.contains("n\n3\n"), "{out}");
    assert_eq!(ids(&s), "1,2,3");
    let r = requests(&s.agent, true)
        .into_iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap();
    assert_eq!(state(&r), "Abandoned", "{r}");
}
