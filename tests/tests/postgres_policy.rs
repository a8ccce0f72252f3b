//! End to end: statement-level policy with the example Cedar policies in `policies/`, decided
//! by the real agent between real clients (psql, a raw wire client) in a test cgroup and a real
//! PostgreSQL. Clients run as uid 65534, mapped to principal "dev" (no groups); a child cgroup
//! is mapped to principal "admin" (group "admins"). Every denial is checked three ways: the
//! client's error names the policy, the backend's state shows the statement never ran, and the
//! journal holds the decision with the policy id.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_session_args, require_root,
    run_bounded,
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
    let pg = Postgres::start().unwrap();
    pg.sql("create table people (id int primary key, name text); insert into people values (1, 'ada'), (2, 'grace'), (3, 'edsger');")
        .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let admin_path = cgroup.path.join("admin");
    std::fs::create_dir(&admin_path).unwrap();
    let admin = Cgroup { path: admin_path };
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let extra_config = format!(
        "[[identity]]\ncgroup = \"{}\"\nprincipal = \"admin\"\ngroups = [\"admins\"]\n\n[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n",
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
    fn psql_in(&self, cgroup: &Cgroup, sql: &[&str]) -> sluice_tests::Output {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_session_args(self.pg.port, sql));
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    fn psql(&self, sql: &[&str]) -> sluice_tests::Output {
        self.psql_in(&self.cgroup, sql)
    }

    fn raw(&self, mode: &str, sql: &[&str]) -> String {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
        cmd.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/pgraw.py"))
            .args(["127.0.0.1", &self.pg.port.to_string(), mode])
            .args(sql);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
        out.stdout
    }

    fn people(&self) -> String {
        self.pg
            .sql("select count(*) from people")
            .unwrap()
            .trim()
            .to_string()
    }

    fn decisions(&self) -> Vec<Value> {
        self.agent
            .export()
            .unwrap()
            .into_iter()
            .filter(|r| r["kind"] == "decision")
            .collect()
    }
}

fn denied_by(policy: &str) -> String {
    format!("sluice: denied by policy \"{policy}\"")
}

#[test]
fn statements_that_policy_denies_never_reach_the_backend_however_they_are_written() {
    if !require_root(
        "statements_that_policy_denies_never_reach_the_backend_however_they_are_written",
    ) {
        return;
    }
    let s = setup("policy-deny");
    let pwned = format!("/tmp/sluice-policy-test-{}", std::process::id());
    let copy_program = format!("COPY people TO PROGRAM 'touch {pwned}'");
    let cases: Vec<(&str, &str)> = vec![
        ("DROP TABLE people", "no-ddl-for-non-admins"),
        ("/* x */ DROP TABLE people", "no-ddl-for-non-admins"),
        ("-- x\nDROP TABLE people", "no-ddl-for-non-admins"),
        ("dRoP tAbLe people", "no-ddl-for-non-admins"),
        ("SELECT 1; DROP TABLE people", "no-ddl-for-non-admins"),
        ("DELETE FROM people", "no-update-or-delete-without-where"),
        (
            "UPDATE people SET name = 'x'",
            "no-update-or-delete-without-where",
        ),
        (
            "WITH d AS (DELETE FROM people RETURNING *) SELECT * FROM d",
            "no-update-or-delete-without-where",
        ),
        ("TRUNCATE people", "no-update-or-delete-without-where"),
        (copy_program.as_str(), "no-copy-program"),
        (
            "PREPARE p AS DELETE FROM people",
            "no-update-or-delete-without-where",
        ),
        (
            "SELECT lo_import('/etc/passwd')",
            "no-server-file-functions",
        ),
        ("DO $$ BEGIN DELETE FROM people; END $$", "sluice-unparsed"),
    ];
    for (sql, policy) in &cases {
        let out = s.psql(&[*sql]);
        assert!(
            !out.status.success(),
            "{sql} was not denied: {}",
            out.stdout
        );
        assert!(
            out.stderr.contains(&denied_by(policy)) && out.stderr.contains("ERROR"),
            "{sql}: {}",
            out.stderr
        );
        assert_eq!(s.people(), "3", "{sql} reached the backend");
    }
    assert!(
        !std::path::Path::new(&pwned).exists(),
        "COPY TO PROGRAM ran"
    );
    // `SELECT 1; DROP ...` was denied as a whole: the SELECT did not run either (no row came
    // back), and the table is still there.
    assert_eq!(
        s.pg.sql("select name from people where id = 3")
            .unwrap()
            .trim(),
        "edsger"
    );

    let decisions = s.decisions();
    for (sql, policy) in &cases {
        let d = decisions
            .iter()
            .find(|d| d["sql"] == *sql)
            .unwrap_or_else(|| panic!("no decision for {sql}: {decisions:#?}"));
        assert_eq!(d["allowed"], false, "{d}");
        assert!(
            d["policies"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p == policy),
            "{d}"
        );
        assert_eq!(d["principal"], "dev", "{d}");
    }
    // Each session was allowed to connect, and that decision is journaled too.
    assert!(
        decisions
            .iter()
            .any(|d| d["action"] == "connect" && d["allowed"] == true)
    );
}

#[test]
fn a_session_survives_denials_and_reads_and_admin_ddl_are_allowed() {
    if !require_root("a_session_survives_denials_and_reads_and_admin_ddl_are_allowed") {
        return;
    }
    let s = setup("policy-session");
    // One psql session: denied statements fail, the ones after them run.
    let out = s.psql(&[
        "select 'before'",
        "drop table people",
        "select 'after'",
        "prepare p as delete from people",
        "execute p",
        "delete from people where id = 3",
        "select count(*) from people",
    ]);
    assert_eq!(out.stdout, "before\nafter\nDELETE 1\n2\n", "{}", out.stderr);
    assert!(
        out.stderr.contains(&denied_by("no-ddl-for-non-admins")),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains(&denied_by("no-update-or-delete-without-where")),
        "{}",
        out.stderr
    );
    // The PREPARE never reached the server, so there is nothing to EXECUTE.
    assert!(
        out.stderr
            .contains("prepared statement \"p\" does not exist"),
        "{}",
        out.stderr
    );
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");

    // The admin principal (by cgroup) may change the schema; COPY PROGRAM stays denied.
    let out = s.psql_in(
        &s.admin,
        &[
            "create table notes (a int)",
            "drop table notes",
            "copy people to program 'id'",
        ],
    );
    assert_eq!(out.stdout, "CREATE TABLE\nDROP TABLE\n", "{}", out.stderr);
    assert!(
        out.stderr.contains(&denied_by("no-copy-program")),
        "{}",
        out.stderr
    );

    let export = s.agent.export().unwrap();
    assert!(export.iter().any(|r| r["principal"] == "admin"
        && r["kind"] == "decision"
        && r["sql"] == "drop table notes"
        && r["allowed"] == true));
}

#[test]
fn denials_over_the_extended_protocol_and_in_pipelines_keep_responses_in_order() {
    if !require_root("denials_over_the_extended_protocol_and_in_pipelines_keep_responses_in_order")
    {
        return;
    }
    let s = setup("policy-wire");
    let deny_where = format!("E 42501 {}", denied_by("no-update-or-delete-without-where"));
    let deny_ddl = format!("E 42501 {}", denied_by("no-ddl-for-non-admins"));

    // Prepared statements: each batch is Parse(named)/Bind/Execute/Sync, all in one write.
    let out = s.raw(
        "extended",
        &[
            "select name from people where id = 1",
            "DELETE FROM people",
            "select count(*) from people",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert_eq!(lines[..3], ["D ada", "C SELECT 1", "Z I"], "{out}");
    assert!(lines[3].starts_with(&deny_where), "{out}");
    assert_eq!(lines[4..], ["Z I", "D 3", "C SELECT 1", "Z I"], "{out}");

    // Simple queries pipelined in one write, inside a transaction block: the injected error
    // comes after the earlier results, the block is not aborted, and status stays 'T'.
    let out = s.raw(
        "pipeline",
        &[
            "begin",
            "select 1",
            "drop table people",
            "select 2",
            "commit",
        ],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 12, "{out}");
    assert_eq!(
        lines[..5],
        ["C BEGIN", "Z T", "D 1", "C SELECT 1", "Z T"],
        "{out}"
    );
    assert!(lines[5].starts_with(&deny_ddl), "{out}");
    assert_eq!(
        lines[6..],
        ["Z T", "D 2", "C SELECT 1", "Z T", "C COMMIT", "Z I"],
        "{out}"
    );
    assert_eq!(s.people(), "3");

    // pgbench -M prepared with a custom script: the DELETE without WHERE is denied at Parse.
    let script = format!("/tmp/sluice-policy-pgbench-{}.sql", std::process::id());
    std::fs::write(&script, "DELETE FROM people;\n").unwrap();
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "pgbench");
    cmd.args([
        "-n",
        "-M",
        "prepared",
        "-t",
        "1",
        "-f",
        script.as_str(),
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-p",
    ])
    .arg(s.pg.port.to_string())
    .arg("postgres");
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    let _ = std::fs::remove_file(&script);
    assert!(
        out.stderr
            .contains(&denied_by("no-update-or-delete-without-where")),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(s.people(), "3");

    let decisions = s.decisions();
    assert!(decisions.iter().any(|d| d["sql"] == "DELETE FROM people"
        && d["allowed"] == false
        && d["facts"].as_str().unwrap().contains("kind=delete")));
}
