//! Parse coverage on real traffic (issue 20, item 3): what real clients send through sluice,
//! and which of those statements sluice's statement parser cannot read.
//!
//! `the_statements_real_clients_send_are_measured_for_parse_coverage` is the measurement, not a
//! check of behaviour: it is `#[ignore]`d and run by hand,
//! `cargo test -p sluice-tests --test parse_coverage -- --ignored --nocapture`. It starts a real
//! PostgreSQL and a real MariaDB behind one agent whose targets say `unparsed = "allow"` (so
//! every client runs to its end and each statement sluice cannot parse is forwarded and flagged
//! `parse_error` in the journal) under a permit-all policy (so every statement gets a journaled
//! decision), runs each client in the test cgroup, and prints, per client: sessions, statements
//! sent (decisions journaled), parsed, refused (would be denied on a target with
//! `unparsed = "deny"`), followed by every distinct refused text. Point `SLUICE_BIN` at another
//! build to measure that one (e.g. the previous release, for a before/after table).
//!
//! The other tests here check behaviour: the clients whose statements sluice now recognises
//! work on targets that deny what they cannot parse, and on a strict masking target.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::mariadb::{self, MariaDb, mysql_target, require_mariadb};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Output, Postgres, pg_target, psql_session_args,
    require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(180);

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}

/// A small schema with one of each thing the catalog browsers look at.
const PG_SCHEMA: &str = "
create type psy_mood as enum ('sad', 'ok', 'happy');
create type psy_pair as (a int, b text);
create table people (id int primary key, name text not null, mood psy_mood);
create table orders (id serial primary key, person int references people (id), amount numeric check (amount > 0));
create index orders_person_idx on orders (person);
create view people_v as select id, name from people;
create function order_total(p int) returns numeric language sql as 'select sum(amount) from orders where person = p';
insert into people values (1, 'ada', 'happy'), (2, 'grace', 'ok'), (3, 'edsger', null);
insert into orders (person, amount) values (1, 10), (1, 5), (2, 7);
";

const MARIADB_SCHEMA: &str = "
use shop;
create table people (id int primary key, name varchar(80) not null);
create table orders (id int auto_increment primary key, person int, amount decimal(10,2), key (person), foreign key (person) references people (id));
create view people_v as select id, name from people;
create trigger orders_positive before insert on orders for each row set new.amount = abs(new.amount);
create procedure order_count(out n int) select count(*) into n from orders;
insert into people values (1, 'ada'), (2, 'grace');
insert into orders (person, amount) values (1, 10), (2, 7);
";

/// psql's meta-commands a person types to look around (each its own `-c`, one session).
const PSQL_META: &[&str] = &[
    "\\d",
    "\\d people",
    "\\d+ people",
    "\\d orders",
    "\\dt",
    "\\dt+",
    "\\di",
    "\\dv",
    "\\ds",
    "\\dn",
    "\\df",
    "\\du",
    "\\dp",
    "\\l",
    "\\dx",
    "\\dT",
    "\\sf order_total",
    "\\sv people_v",
    "\\conninfo",
    "\\x",
    "select * from people order by id",
];

/// Cursors written by hand in psql: the forms PostgreSQL's grammar accepts.
const PSQL_CURSORS: &[&str] = &[
    "BEGIN",
    "DECLARE c CURSOR FOR SELECT id, name FROM people ORDER BY id",
    "FETCH c",
    "FETCH NEXT c",
    "MOVE FIRST IN c",
    "FETCH ALL c",
    "MOVE ABSOLUTE 1 c",
    "FETCH 1 c",
    "FETCH FORWARD ALL FROM c",
    "FETCH BACKWARD 1 IN c",
    "CLOSE c",
    "DECLARE d SCROLL CURSOR WITH HOLD FOR SELECT id FROM people",
    "COMMIT",
    "FETCH LAST FROM d",
    "FETCH PRIOR d",
    "CLOSE ALL",
    "DISCARD ALL",
];

/// The mariadb CLI's own commands and the SHOW statements people type.
const MARIADB_CLI: &str = "status;
SHOW DATABASES; SHOW TABLES; SHOW FULL TABLES; SHOW CREATE TABLE people; SHOW COLUMNS FROM people;
SHOW FULL COLUMNS FROM orders; SHOW INDEX FROM orders; SHOW TABLE STATUS; SHOW PROCESSLIST;
SHOW VARIABLES LIKE 'version%'; SHOW GLOBAL STATUS LIKE 'Uptime'; SHOW SESSION STATUS LIKE 'Questions';
SHOW GRANTS; SHOW WARNINGS; SHOW ERRORS; SHOW ENGINES; SHOW CREATE DATABASE shop; SHOW TRIGGERS;
SHOW PROCEDURE STATUS WHERE Db = 'shop'; SHOW CREATE PROCEDURE order_count; SHOW CREATE VIEW people_v;
SHOW CHARACTER SET LIKE 'utf8mb4'; SHOW COLLATION LIKE 'utf8mb4_bin'; SHOW PLUGINS; SHOW PRIVILEGES;
SHOW ENGINE INNODB STATUS; SHOW OPEN TABLES FROM shop; SHOW CREATE TRIGGER orders_positive;
DESCRIBE people; DESC orders; EXPLAIN SELECT * FROM people; SELECT DATABASE(), USER();";

/// A permit-all policy directory (the example schema, one policy), so every statement gets a
/// journaled decision and none is refused by policy.
fn permit_all() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    std::fs::copy(
        policies.join("sluice.cedarschema"),
        dir.path().join("sluice.cedarschema"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("all.cedar"),
        "@id(\"measure-everything\")\npermit(principal, action, resource);\n",
    )
    .unwrap();
    dir
}

/// A directory any uid can read, holding a copy of the client sources (root's checkout may not be
/// readable by `nobody`).
fn readable_clients() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    for entry in std::fs::read_dir(clients_dir()).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// A venv (from Debian's python3, with its site packages, so Debian's psycopg is there) holding
/// SQLAlchemy and PyMySQL, pinned; made on first use under the target dir. None when it cannot be
/// made (no network): the measurement then says so and goes on without the ORM.
fn sqlalchemy_python() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let venv = target.join("sqlalchemy-venv");
    let python = venv.join("bin/python");
    let works = |p: &Path| {
        Command::new(p)
            .args(["-c", "import sqlalchemy, pymysql, psycopg"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&python) {
        return Some(python);
    }
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--system-site-packages"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "SQLAlchemy==2.1.9", "PyMySQL==1.1.2"])
            .status()
            .is_ok_and(|s| s.success());
    (made && works(&python)).then_some(python)
}

/// One client's share of the journal.
#[derive(Default)]
struct Tally {
    sessions: usize,
    sent: usize,
    refused: usize,
    refused_texts: BTreeSet<String>,
}

/// The journal's decisions, by session id, for the sessions not in `seen` (which they join).
fn new_decisions(agent: &Agent, seen: &mut BTreeSet<String>) -> Tally {
    let mut by_session: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in agent.export().unwrap() {
        let session = r["session"].as_str().unwrap_or_default().to_string();
        if seen.contains(&session) {
            continue;
        }
        let entry = by_session.entry(session).or_default();
        if r["kind"] == "decision" && r["action"] != "connect" {
            entry.push(r);
        }
    }
    let mut t = Tally::default();
    for (session, decisions) in by_session {
        seen.insert(session);
        t.sessions += 1;
        for d in decisions {
            t.sent += 1;
            if d["facts"]
                .as_str()
                .unwrap_or_default()
                .contains("parse_error")
            {
                t.refused += 1;
                let sql = d["sql"].as_str().unwrap_or_default();
                let flat = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                let short: String = flat.chars().take(160).collect();
                t.refused_texts.insert(short);
            }
        }
    }
    t
}

fn ran(name: &str, out: &Output) {
    if !out.status.success() {
        eprintln!(
            "note: client {name} exited with {}: {}\n{}",
            out.status,
            out.stdout.chars().take(2000).collect::<String>(),
            out.stderr.chars().take(2000).collect::<String>()
        );
    }
}

#[test]
#[ignore = "a measurement: run with --ignored --nocapture to print the table"]
fn the_statements_real_clients_send_are_measured_for_parse_coverage() {
    let test = "the_statements_real_clients_send_are_measured_for_parse_coverage";
    if !require_root(test) || !require_mariadb(test) {
        return;
    }
    let pg = Postgres::start().unwrap();
    pg.sql(PG_SCHEMA).unwrap();
    let db = MariaDb::start().unwrap();
    db.sql(MARIADB_SCHEMA).unwrap();
    let cgroup = Cgroup::create("parse-coverage").unwrap();
    let policies = permit_all();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![
            format!(
                "{}unparsed = \"allow\"\n",
                pg_target("pg", &format!("127.0.0.1:{}", pg.port))
            ),
            format!(
                "{}unparsed = \"allow\"\n",
                mysql_target("maria", &format!("127.0.0.1:{}", db.port))
            ),
        ],
        policy_dir: Some(policies.path().to_path_buf()),
        ..AgentOptions::default()
    })
    .unwrap();
    let clients = readable_clients();
    let cdir = clients.path();
    let port = pg.port.to_string();
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut rows: Vec<(String, Tally)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut run = |name: &str, mut cmd: Command| {
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        ran(name, &out);
        rows.push((name.to_string(), new_decisions(&agent, &mut seen)));
    };
    let client = |program: &str| cgroup.command(Some(CLIENT_UID), program);

    let mut c = client("psql");
    c.args(psql_session_args(pg.port, PSQL_META));
    run("psql \\d \\l \\du \\df \\dn \\x ...", c);
    let mut c = client("psql");
    c.args(psql_session_args(
        pg.port,
        &["select * from people order by id"],
    ))
    .args(["-v", "FETCH_COUNT=2"]);
    run("psql FETCH_COUNT=2 (cursor)", c);
    let mut c = client("psql");
    c.args(psql_session_args(pg.port, PSQL_CURSORS));
    run("psql cursors by hand", c);
    let mut c = client("pg_dump");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "postgres",
    ]);
    run("pg_dump", c);
    let mut c = client("/usr/bin/python3");
    c.arg(cdir.join("psycopg_metadata.py")).arg(&conninfo);
    run("psycopg 3 types + server cursor", c);
    let pg_jar = "/usr/share/java/postgresql.jar";
    let mut c = client("java");
    c.args(["-cp", pg_jar])
        .arg(cdir.join("JdbcMetadata.java"))
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/postgres?user=postgres",
            pg.port
        ))
        .args(["", "public", "people"]);
    run("pgjdbc DatabaseMetaData", c);
    let sqlalchemy = sqlalchemy_python();
    if let Some(python) = &sqlalchemy {
        let mut c = client(python.to_str().unwrap());
        c.arg(cdir.join("sqlalchemy_client.py")).arg(format!(
            "postgresql+psycopg://postgres@127.0.0.1:{}/postgres",
            pg.port
        ));
        run("SQLAlchemy (psycopg) migrate+reflect", c);
    }

    let mut c = client("mariadb");
    c.args(MariaDb::client_args(db.port))
        .args(["-e", MARIADB_CLI]);
    run("mariadb CLI status + SHOW ...", c);
    let mut c = client("mysqldump");
    c.args(&MariaDb::client_args(db.port)[..10]).args([
        "--routines",
        "--triggers",
        "--events",
        mariadb::DATABASE,
    ]);
    run("mysqldump --routines --triggers", c);
    let mut c = client("java");
    c.args(["-cp", "/usr/share/java/mariadb-java-client.jar"])
        .arg(cdir.join("JdbcMetadata.java"))
        .arg(format!(
            "jdbc:mariadb://127.0.0.1:{}/{}?user={}&password={}&useSsl=false",
            db.port,
            mariadb::DATABASE,
            mariadb::USER,
            mariadb::PASSWORD
        ))
        .args([mariadb::DATABASE, "", "people"]);
    run("Connector/J DatabaseMetaData", c);
    if let Some(python) = &sqlalchemy {
        let mut c = client(python.to_str().unwrap());
        c.arg(cdir.join("sqlalchemy_client.py")).arg(format!(
            "mysql+pymysql://{}:{}@127.0.0.1:{}/{}",
            mariadb::USER,
            mariadb::PASSWORD,
            db.port,
            mariadb::DATABASE
        ));
        run("SQLAlchemy (PyMySQL) migrate+reflect", c);
    }

    let bin = sluice_tests::sluice_bin();
    println!("\nparse coverage of {}:", bin.display());
    println!(
        "| {:<40} | {:>8} | {:>10} | {:>6} | {:>7} |",
        "client", "sessions", "statements", "parsed", "refused"
    );
    println!(
        "|{:-<42}|{:->10}|{:->12}|{:->8}|{:->9}|",
        "", "", "", "", ""
    );
    let mut total = (0, 0, 0);
    for (name, t) in &rows {
        println!(
            "| {:<40} | {:>8} | {:>10} | {:>6} | {:>7} |",
            name,
            t.sessions,
            t.sent,
            t.sent - t.refused,
            t.refused
        );
        total = (
            total.0 + t.sent,
            total.1 + t.sent - t.refused,
            total.2 + t.refused,
        );
    }
    println!(
        "| {:<40} | {:>8} | {:>10} | {:>6} | {:>7} |",
        "total", "", total.0, total.1, total.2
    );
    if sqlalchemy.is_none() {
        println!("(SQLAlchemy could not be installed into a venv: not measured)");
    }
    for (name, t) in &rows {
        for text in &t.refused_texts {
            println!("refused [{name}]: {text}");
        }
    }
    // The measurement is only worth its table if every client really talked through sluice.
    for (name, t) in &rows {
        assert!(
            t.sent > 0,
            "{name} sent nothing through sluice:\n{}",
            agent.log()
        );
    }
}

/// A PostgreSQL with [`PG_SCHEMA`] behind an agent whose one target denies what sluice cannot
/// parse, under the example policies (clients are uid 65534, principal "dev").
struct Denying {
    agent: Agent,
    cgroup: Cgroup,
    pg: Postgres,
    _rules: tempfile::TempDir,
}

fn denying(name: &str, masking: &str) -> Denying {
    let pg = Postgres::start().unwrap();
    pg.sql(PG_SCHEMA).unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let rules = tempfile::tempdir().unwrap();
    let rules_file = rules.path().join("masking.toml");
    std::fs::write(&rules_file, masking).unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![format!(
            "{}unparsed = \"deny\"\n",
            pg_target("app-db", &format!("127.0.0.1:{}", pg.port))
        )],
        policy_dir: Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies")),
        agent_config: format!("masking_file = \"{}\"\n", rules_file.display()),
        extra_config: format!(
            "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n"
        ),
        ..AgentOptions::default()
    })
    .unwrap();
    Denying {
        agent,
        cgroup,
        pg,
        _rules: rules,
    }
}

impl Denying {
    /// psql running each of `sql` as its own `-c`, stopping at the first error.
    fn psql(&self, sql: &[&str]) -> String {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_session_args(self.pg.port, sql))
            .args(["-v", "ON_ERROR_STOP=1"]);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            out.status.success(),
            "{sql:?}: {}\n{}\nagent log:\n{}",
            out.stdout,
            out.stderr,
            self.agent.log()
        );
        out.stdout
    }

    /// Decisions the journal holds that sluice's parser refused.
    fn unparsed(&self) -> Vec<String> {
        self.agent
            .export()
            .unwrap()
            .into_iter()
            .filter(|r| {
                r["kind"] == "decision"
                    && r["facts"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("parse_error")
            })
            .map(|r| r["sql"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

#[test]
fn psql_meta_commands_pg_dump_and_fetch_all_work_on_a_target_that_denies_what_it_cannot_parse() {
    let test = "psql_meta_commands_pg_dump_and_fetch_all_work_on_a_target_that_denies_what_it_cannot_parse";
    if !require_root(test) {
        return;
    }
    let s = denying("parse-deny", "");

    let out = s.psql(PSQL_META);
    for seen in [
        "people_v",
        "orders_person_idx",
        "order_total",
        "psy_mood",
        "postgres",
    ] {
        assert!(
            out.contains(seen),
            "{seen} missing from psql's output:\n{out}"
        );
    }

    let out = s.psql(&[
        "BEGIN",
        "DECLARE c CURSOR FOR SELECT id, name FROM people ORDER BY id",
        "FETCH NEXT c",
        "MOVE ABSOLUTE 1 IN c",
        "FETCH ALL c",
        "CLOSE c",
        "COMMIT",
    ]);
    assert_eq!(
        out.lines().filter(|l| l.contains('|')).collect::<Vec<_>>(),
        ["1|ada", "2|grace", "3|edsger"],
        "FETCH NEXT gives row 1, MOVE ABSOLUTE 1 stays there, FETCH ALL gives the rest:\n{out}"
    );

    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(psql_session_args(
        s.pg.port,
        &["select name from people order by id"],
    ))
    .args(["-v", "FETCH_COUNT=2", "-v", "ON_ERROR_STOP=1"]);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(
        out.ok().lines().collect::<Vec<_>>(),
        ["ada", "grace", "edsger"]
    );

    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "pg_dump");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &s.pg.port.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
    ]);
    let dump = run_bounded(&mut cmd, LIMIT).unwrap();
    let dump = dump.ok();
    for seen in [
        "CREATE TABLE public.people",
        "CREATE VIEW public.people_v",
        "CREATE FUNCTION public.order_total",
        "COPY public.people (id, name, mood) FROM stdin;",
        "1\tada\thappy",
    ] {
        assert!(
            dump.contains(seen),
            "{seen} missing from pg_dump's output:\n{dump}"
        );
    }

    assert_eq!(
        s.unparsed(),
        Vec::<String>::new(),
        "statements sluice could not parse"
    );
    // The fallback never lets what it does not know through: a near miss is still denied.
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "psql");
    cmd.args(psql_session_args(s.pg.port, &["FETCH ALL c INTO people"]));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(
        out.stderr
            .contains("sluice: denied by policy \"sluice-unparsed\""),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn psycopg_server_side_cursors_and_jdbc_metadata_work_on_a_target_that_denies_what_it_cannot_parse()
{
    let test = "psycopg_server_side_cursors_and_jdbc_metadata_work_on_a_target_that_denies_what_it_cannot_parse";
    if !require_root(test) {
        return;
    }
    let s = denying("parse-deny-drivers", "");
    let clients = readable_clients();
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.arg(clients.path().join("psycopg_metadata.py"))
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            s.pg.port
        ));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    let v: Value = serde_json::from_str(out.ok().trim()).unwrap();
    assert_eq!(v["first_two"], serde_json::json!([1, 2]));
    assert_eq!(v["one"], 6, "scroll(3) skips 3, 4, 5: {v}");
    assert_eq!(v["rest"], serde_json::json!([7, 8, 9, 10]));
    assert_eq!(v["absolute"], 5, "{v}");
    assert_eq!(v["enum_labels"], serde_json::json!(["sad", "ok", "happy"]));

    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "java");
    cmd.args(["-cp", "/usr/share/java/postgresql.jar"])
        .arg(clients.path().join("JdbcMetadata.java"))
        .arg(format!(
            "jdbc:postgresql://127.0.0.1:{}/postgres?user=postgres",
            s.pg.port
        ))
        .args(["", "public", "people"]);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    let out = out.ok();
    for line in [
        "columns=3",
        "primary_keys=1",
        "exported_keys=1",
        "result_columns=3 nullable=1",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
    }
    assert!(!out.contains("error:"), "{out}");
    assert_eq!(
        s.unparsed(),
        Vec::<String>::new(),
        "statements sluice could not parse"
    );
}

#[test]
fn fetch_all_through_a_cursor_works_on_a_strict_masking_target_and_stays_masked() {
    let test = "fetch_all_through_a_cursor_works_on_a_strict_masking_target_and_stays_masked";
    if !require_root(test) {
        return;
    }
    let s = denying(
        "parse-strict",
        "[[target]]\nname = \"app-db\"\nstrict = true\n\
         [[column]]\nname = \"names\"\ntable = \"people\"\ncolumn = \"name\"\nstrategy = \"redact\"\n",
    );
    let out = s.psql(&[
        "BEGIN",
        "DECLARE c CURSOR FOR SELECT id, name FROM people ORDER BY id",
        "FETCH ALL c",
        "COMMIT",
    ]);
    assert_eq!(
        out.lines().filter(|l| l.contains('|')).collect::<Vec<_>>(),
        ["1|****", "2|****", "3|****"],
        "{out}"
    );
}

#[test]
fn mysqldump_and_the_mariadb_clis_show_commands_work_on_a_target_that_denies_what_it_cannot_parse()
{
    let test = "mysqldump_and_the_mariadb_clis_show_commands_work_on_a_target_that_denies_what_it_cannot_parse";
    if !require_root(test) || !require_mariadb(test) {
        return;
    }
    let s = mariadb::Intercepted::start("parse-deny-mysql", |o| {
        o.targets = o
            .targets
            .iter()
            .map(|t| format!("{t}unparsed = \"deny\"\n"))
            .collect();
        o.policy_dir = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies"));
    })
    .unwrap();
    s.db.sql(MARIADB_SCHEMA).unwrap();

    let out = s.mariadb(
        "SHOW CREATE DATABASE shop; SHOW PROCEDURE STATUS WHERE Db = 'shop'; SHOW FUNCTION STATUS WHERE Db = 'shop'",
    );
    let text = out.ok();
    assert!(text.contains("CREATE DATABASE `shop`"), "{text}");
    assert!(text.contains("order_count"), "{text}");

    let mut cmd = s.command(true, "mysqldump");
    cmd.args(&MariaDb::client_args(s.db.port)[..10]).args([
        "--routines",
        "--triggers",
        "--events",
        mariadb::DATABASE,
    ]);
    let dump = run_bounded(&mut cmd, LIMIT).unwrap();
    let dump = dump.ok();
    for seen in [
        "CREATE TABLE `people`",
        "INSERT INTO `people` VALUES",
        "CREATE DEFINER=`root`@`localhost` PROCEDURE `order_count`",
        "orders_positive",
    ] {
        assert!(
            dump.contains(seen),
            "{seen} missing from mysqldump's output:\n{dump}"
        );
    }
    let unparsed: Vec<Value> = s
        .agent
        .export()
        .unwrap()
        .into_iter()
        .filter(|r| {
            r["kind"] == "decision"
                && r["facts"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("parse_error")
        })
        .collect();
    assert!(
        unparsed.is_empty(),
        "statements sluice could not parse: {unparsed:#?}"
    );

    // What the fallback does not know is still denied.
    let out = s.mariadb("LOCK TABLES mysql.proc READ LOCAL x");
    assert!(
        out.stderr.contains("sluice-unparsed"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
}
