//! End to end: masking of MySQL result rows through interception, with a real MariaDB, the
//! `mariadb` CLI (text protocol) and mysql-connector-python's prepared cursors (binary
//! protocol). A `customers` table holds emails, card numbers, SSNs, tax ids, birth dates and
//! free text; the rules (written here) mask by column origin and by content, and exempt the
//! `dba` group. Checked: masked values in both protocols (aliases, multi-statements, NULLs, a
//! date nulled), clear values for the exempt group, the journal's masking reports, and that no
//! clear value is in the journal directory, the export or the replay.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::mariadb::{self, Intercepted, require_mariadb, require_mysql_python};
use sluice_tests::{AgentOptions, CLIENT_UID, find_leak, require_root, run_bounded};

const LIMIT: Duration = Duration::from_secs(60);

/// Every clear sensitive value the tests put in the database.
const CLEAR: &[&str] = &[
    "ada@example.com",
    "grace.hopper@navy.example",
    "4111 1111 1111 1111",
    "5500005555555559",
    "078-05-1120",
    "219-09-9999",
    "TAX-00042",
    "TAX-00043",
    "edsger@example.org",
    "1815-12-10",
];

const RULES: &str = r#"
[hash]
key_hex = "00112233445566778899aabbccddeeff"

[[column]]
name = "email"
column = "email"
strategy = "redact"
[[column.override]]
groups = ["dba"]
strategy = "clear"

[[column]]
name = "cards"
column = "card_*"
strategy = "partial"
[[column.override]]
groups = ["dba"]
strategy = "clear"

[[column]]
name = "ssn"
column = "ssn"
strategy = "null"
[[column.override]]
groups = ["dba"]
strategy = "clear"

[[column]]
name = "tax-id"
column = "tax_id"
strategy = "hash"
[[column.override]]
groups = ["dba"]
strategy = "clear"

[[column]]
name = "born"
table = "customers"
column = "born"
strategy = "redact"
[[column.override]]
groups = ["dba"]
strategy = "clear"

[[detector]]
name = "email"
strategy = "redact"
[[detector.override]]
groups = ["dba"]
strategy = "clear"
"#;

const SELECT: &str = "select id, name, email, card_number, ssn, tax_id, note, born, score from customers order by id";

struct Setup {
    s: Intercepted,
    _rules: tempfile::TempDir,
}

fn setup(name: &str, extra: impl FnOnce(&mut AgentOptions)) -> Setup {
    setup_rules(name, RULES, extra)
}

fn setup_rules(name: &str, text: &str, extra: impl FnOnce(&mut AgentOptions)) -> Setup {
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("masking.toml"), text).unwrap();
    let path = rules.path().join("masking.toml");
    let s = Intercepted::start(name, |o| {
        o.agent_config = format!("masking_file = \"{}\"\n", path.display());
        extra(o);
    })
    .unwrap();
    s.db.sql(
        "create table shop.customers (id int primary key, name varchar(40), email varchar(80), \
           card_number varchar(30), ssn varchar(20), tax_id varchar(20), note text, born date, \
           score decimal(6,2));
         insert into shop.customers values
           (1, 'Ada', 'ada@example.com', '4111 1111 1111 1111', '078-05-1120', 'TAX-00042', \
            'call ada@example.com', '1815-12-10', 12.50),
           (2, 'Grace', 'grace.hopper@navy.example', '5500005555555559', '219-09-9999', \
            'TAX-00043', 'no secrets here', null, null);
         create table shop.orders (id int, tax_id varchar(20));
         insert into shop.orders values (10, 'TAX-00042'), (11, 'TAX-00043'), (12, 'TAX-00042');",
    )
    .unwrap();
    Setup { s, _rules: rules }
}

fn skip(test: &str) -> bool {
    !require_root(test) || !require_mariadb(test)
}

fn assert_no_clear(what: &str, text: &str) {
    for clear in CLEAR {
        assert!(
            !text.contains(clear),
            "{what}: clear value {clear:?} in:\n{text}"
        );
    }
}

impl Setup {
    fn cli(&self, sql: &str) -> String {
        let out = self.s.mariadb(sql);
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            out.stderr,
            self.s.agent.log()
        );
        out.stdout
    }

    /// mysql-connector-python, prepared (binary protocol) and plain (text) cursors, each row
    /// printed as a JSON list of strings (None as null).
    fn connector(&self, python: &std::path::Path) -> Value {
        let script = r#"
import json, sys
import mysql.connector
conn = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user=sys.argv[2],
                               password=sys.argv[3], database=sys.argv[4], ssl_disabled=True)
out = {}
sql = "select id, name, email, card_number, ssn, tax_id, note, born, score from customers where id >= %s order by id"
for prepared in (True, False):
    cur = conn.cursor(prepared=prepared)
    rows = []
    for _ in range(2):  # a second execution of the same statement
        cur.execute(sql, (1,))
        rows = [[None if v is None else (v.decode() if isinstance(v, (bytes, bytearray)) else str(v)) for v in r] for r in cur.fetchall()]
    out["binary" if prepared else "text"] = rows
    cur.close()
print(json.dumps(out))
"#;
        let mut cmd = self.s.command(true, python.to_str().unwrap());
        cmd.args(["-c", script])
            .arg(self.s.db.port.to_string())
            .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE]);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            out.status.success(),
            "{}\n{}",
            out.stderr,
            self.s.agent.log()
        );
        serde_json::from_str(out.stdout.trim()).unwrap()
    }
}

#[test]
fn sensitive_values_are_masked_for_the_cli_and_prepared_statements_and_never_recorded() {
    let test = "sensitive_values_are_masked_for_the_cli_and_prepared_statements_and_never_recorded";
    if skip(test) {
        return;
    }
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let setup = setup("mysql-mask", |_| {});

    // Text protocol, by column origin and by content.
    let out = setup.cli(SELECT);
    assert_no_clear("select", &out);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows[0][1], "Ada", "unmasked columns pass: {out}");
    assert_eq!(rows[0][2], "****", "{out}");
    assert!(
        rows[0][3].ends_with("1111") && rows[0][3].starts_with('*'),
        "{out}"
    );
    assert_eq!(rows[0][4], "NULL", "ssn is NULL: {out}");
    assert!(rows[0][5].starts_with("h:"), "{out}");
    assert_eq!(rows[0][6], "call ****", "{out}");
    assert_eq!(rows[0][7], "NULL", "a masked date is NULL: {out}");
    assert_eq!(rows[0][8], "12.50", "an unmasked decimal passes: {out}");
    assert_eq!(rows[1][6], "no secrets here");
    assert_eq!(rows[1][7], "NULL");

    // An alias does not hide a column's origin; a multi-statement masks every result.
    let out = setup.cli("select email as e from customers where id = 1; select note, card_number as c from customers where id = 1");
    assert_no_clear("alias and multi-statement", &out);
    assert!(out.contains("e\n****\n"), "{out}");
    assert!(out.contains("call ****\t"), "{out}");
    // Hashed values still join.
    let out = setup.cli("select c.tax_id, count(o.id) from customers c join orders o on o.tax_id = c.tax_id group by c.tax_id order by 2");
    assert_no_clear("join", &out);
    let counts: Vec<&str> = out
        .lines()
        .skip(1)
        .map(|l| l.split('\t').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(counts, ["1", "2"], "{out}");

    // Binary protocol (prepared cursors) and text through mysql-connector-python.
    let v = setup.connector(&python);
    assert_no_clear("connector", &v.to_string());
    for protocol in ["binary", "text"] {
        let row = &v[protocol][0];
        assert_eq!(row[0], "1", "{protocol}: an integer passes: {v}");
        assert_eq!(row[1], "Ada", "{protocol}: {v}");
        assert_eq!(row[2], "****", "{protocol}: {v}");
        assert!(
            row[3].as_str().unwrap().ends_with("1111"),
            "{protocol}: {v}"
        );
        assert_eq!(row[4], Value::Null, "{protocol}: {v}");
        assert!(
            row[5].as_str().unwrap().starts_with("h:"),
            "{protocol}: {v}"
        );
        assert_eq!(row[6], "call ****", "{protocol}: {v}");
        assert_eq!(
            row[7],
            Value::Null,
            "{protocol}: a masked date is NULL: {v}"
        );
        assert_eq!(row[8], "12.50", "{protocol}: {v}");
        assert_eq!(v[protocol][1][6], "no secrets here", "{protocol}: {v}");
    }

    // The journal says what was masked, never the value; nothing clear anywhere in it.
    let export = setup.s.agent.export().unwrap();
    let masked: Vec<&Value> = export.iter().filter(|r| r["kind"] == "masked").collect();
    assert!(
        masked
            .iter()
            .any(|m| m["column"] == "email" && m["rule"] == "column:email" && m["values"] == 2),
        "{masked:?}"
    );
    assert!(
        masked
            .iter()
            .any(|m| m["column"] == "note" && m["rule"] == "detector:email"),
        "{masked:?}"
    );
    assert!(
        masked
            .iter()
            .any(|m| m["column"] == "ssn" && m["strategy"] == "null"),
        "{masked:?}"
    );
    let text = serde_json::to_string(&export).unwrap();
    assert_no_clear("export", &text);
    let rows: Vec<&Value> = export.iter().filter(|r| r["kind"] == "row").collect();
    assert!(
        rows.iter()
            .any(|r| r["values"].to_string().contains("call ****")),
        "the journal holds the masked rows: {rows:#?}"
    );
    let csv = setup.s.agent.read(&["export", "--format", "csv"]).unwrap();
    assert_no_clear("csv export", &csv);
    let sessions = setup.s.agent.sessions().unwrap();
    assert!(sessions.len() >= 4, "{sessions:#?}");
    for session in &sessions {
        let replay = setup
            .s
            .agent
            .read(&["replay", session["id"].as_str().unwrap()])
            .unwrap();
        assert_no_clear("replay", &replay);
    }
    let replays: String = sessions
        .iter()
        .map(|x| {
            setup
                .s
                .agent
                .read(&["replay", x["id"].as_str().unwrap()])
                .unwrap()
        })
        .collect();
    assert!(replays.contains("call ****"), "{replays}");
    let mut raw = Vec::new();
    for e in walk(&setup.s.agent.journal_dir()) {
        raw.extend(std::fs::read(e).unwrap());
    }
    for clear in CLEAR {
        assert!(
            !raw.windows(clear.len()).any(|w| w == clear.as_bytes()),
            "clear value {clear:?} in the journal directory"
        );
    }
    let verified = setup.s.agent.read(&["verify"]).unwrap();
    assert!(verified.contains("ok:"), "{verified}");
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else if p.is_file() {
            files.push(p);
        }
    }
    files
}

#[test]
fn a_group_exempted_by_an_override_sees_clear_values() {
    let test = "a_group_exempted_by_an_override_sees_clear_values";
    if skip(test) {
        return;
    }
    let Some(python) = require_mysql_python(test) else {
        return;
    };
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let setup = setup("mysql-mask-dba", |o| {
        o.policy_dir = Some(policies);
        o.extra_config = format!(
            "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dba\"\ngroups = [\"developers\", \"dba\"]\n"
        );
    });
    let out = setup.cli(SELECT);
    let direct = setup.s.direct(SELECT);
    assert!(direct.status.success(), "{}", direct.stderr);
    assert_eq!(out, direct.stdout, "the exempt group gets the direct bytes");
    assert!(out.contains("ada@example.com") && out.contains("078-05-1120"));
    let v = setup.connector(&python);
    for protocol in ["binary", "text"] {
        assert_eq!(v[protocol][0][2], "ada@example.com", "{protocol}: {v}");
        assert_eq!(v[protocol][0][6], "call ada@example.com", "{protocol}: {v}");
        assert_eq!(v[protocol][0][7], "1815-12-10", "{protocol}: {v}");
    }
    let export = setup.s.agent.export().unwrap();
    assert!(
        !export.iter().any(|r| r["kind"] == "masked"),
        "nothing masked for the exempt group"
    );
    let sessions = setup.s.agent.sessions().unwrap();
    assert!(
        sessions.iter().all(|x| x["principal"] == "dba"),
        "{sessions:#?}"
    );
}

#[test]
fn a_strict_target_denies_what_it_cannot_track_and_masks_what_it_can() {
    let test = "a_strict_target_denies_what_it_cannot_track_and_masks_what_it_can";
    if skip(test) {
        return;
    }
    let rules = format!("{RULES}\n[[target]]\nname = \"app-db\"\nstrict = true\n");
    let setup = setup_rules("mysql-mask-strict", &rules, |_| {});
    // Tracked: masked by name, as on any target; no policies, so nothing else is decided.
    let out = setup.cli("select id, email, ssn from customers order by id");
    assert_no_clear("tracked", &out);
    assert!(out.starts_with("id\temail\tssn\n1\t****\tNULL\n"), "{out}");
    assert_eq!(setup.cli("select count(*) as n from customers"), "n\n2\n");
    // Untracked shapes that return masked columns are denied before they reach the server,
    // even the one content detection cannot catch (three digits of an SSN).
    for sql in [
        "select substr(ssn, 1, 3) from customers",
        "select email as contact from customers",
        "select lower(email) from customers",
        "select * from (select email from customers) x",
        "select email from customers union all select ssn from customers",
    ] {
        let out = setup.s.mariadb(sql);
        assert!(!out.status.success(), "{sql}: should be denied");
        assert!(
            out.stderr.contains("ERROR 1142") && out.stderr.contains("sluice-masking-strict"),
            "{sql}: {}",
            out.stderr
        );
        assert_no_clear(sql, &out.stdout);
    }
    let decisions: Vec<Value> = setup
        .s
        .agent
        .export()
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "decision")
        .collect();
    assert_eq!(
        decisions.len(),
        5,
        "only the denials are recorded: {decisions:?}"
    );
    assert!(decisions.iter().all(|d| d["allowed"] == false));
}

#[test]
fn a_strict_target_denies_every_statement_that_moves_a_masked_column_and_nothing_gets_out() {
    let test =
        "a_strict_target_denies_every_statement_that_moves_a_masked_column_and_nothing_gets_out";
    if skip(test) {
        return;
    }
    let rules = format!("{RULES}\n[[target]]\nname = \"app-db\"\nstrict = true\n");
    let setup = setup_rules("mysql-mask-strict-move", &rules, |_| {});
    let file = std::env::temp_dir().join(format!("sluice-leak-mysql-{}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let outfile = format!(
        "select email into outfile '{}' from customers",
        file.display()
    );
    let dumpfile = format!(
        "select ssn from customers limit 1 into dumpfile '{}'",
        file.display()
    );
    let moves = [
        "insert into orders select id, email from customers",
        "replace into orders select id, ssn from customers",
        "insert into orders (id, tax_id) values (20, (select card_number from customers limit 1))",
        "create table leak_t1 select email from customers",
        "create table leak_t2 as select id, card_number as c from customers",
        "create temporary table leak_t3 as select * from customers",
        "create view leak_v1 (contact) as select email from customers",
        "create view leak_v2 as select * from customers",
        "create procedure leak_p() select email from customers",
        "create function leak_f() returns text deterministic return (select email from customers limit 1)",
        "create trigger leak_tr after insert on orders for each row set @leak = (select email from customers limit 1)",
        "create event leak_e on schedule every 1 hour do insert into orders select id, email from customers",
        outfile.as_str(),
        dumpfile.as_str(),
        "select email into @leak from customers limit 1",
        "set @leak = (select ssn from customers limit 1)",
        "prepare leak_s from 'select lower(email) from customers'",
        "update customers set note = email",
        "update customers c join orders o on o.id = c.id + 9 set o.tax_id = c.ssn",
        "insert into orders (id, tax_id) values (10, 'x') on duplicate key update tax_id = (select email from customers limit 1)",
        "alter table customers change email contact varchar(80)",
        "alter table customers add column leak_x varchar(80) generated always as (reverse(email)) stored",
    ];
    let mut seen = String::new();
    for sql in moves {
        let out = setup.s.mariadb(sql);
        assert!(!out.status.success(), "{sql}: should be denied");
        assert!(
            out.stderr.contains("ERROR 1142") && out.stderr.contains("sluice-masking-strict"),
            "{sql}: {}",
            out.stderr
        );
        seen.push_str(&out.stdout);
        seen.push_str(&out.stderr);
    }

    // Nothing reached the server: asked directly, not through sluice.
    for (what, sql) in [
        (
            "tables and views",
            "select count(*) from information_schema.tables where table_schema = 'shop' and table_name like 'leak%'",
        ),
        (
            "routines",
            "select count(*) from information_schema.routines where routine_schema = 'shop'",
        ),
        (
            "triggers",
            "select count(*) from information_schema.triggers where trigger_schema = 'shop'",
        ),
        (
            "events",
            "select count(*) from information_schema.events where event_schema = 'shop'",
        ),
        (
            "renamed or generated columns",
            "select count(*) from information_schema.columns where table_schema = 'shop' and table_name = 'customers' and column_name in ('contact', 'leak_x')",
        ),
    ] {
        assert_eq!(setup.s.db.sql(sql).unwrap().trim(), "0", "{what}");
    }
    assert_eq!(
        setup
            .s
            .db
            .sql("select count(*) from shop.orders")
            .unwrap()
            .trim(),
        "3"
    );
    assert_eq!(
        setup
            .s
            .db
            .sql("select concat(name, '|', note) from shop.customers order by id")
            .unwrap(),
        "Ada|call ada@example.com\nGrace|no secrets here\n",
        "no column was overwritten"
    );
    assert_eq!(
        setup
            .s
            .db
            .sql("select group_concat(tax_id order by id) from shop.orders")
            .unwrap()
            .trim(),
        "TAX-00042,TAX-00043,TAX-00042"
    );
    assert!(!file.exists(), "the server wrote {}", file.display());

    // Harmless statements on the same strict target still run.
    for sql in [
        "insert into orders values (13, 'TAX-00099')",
        "create table kept_plain (id int, email varchar(80))",
        "create table kept_copy as select id, name from customers",
        "create view kept_names as select id, name from customers",
        "update customers set name = 'Ada L.' where id = 1",
    ] {
        let out = setup.s.mariadb(sql);
        assert!(out.status.success(), "{sql}: {}", out.stderr);
    }
    assert_eq!(
        setup.cli("select name from kept_names order by id"),
        "name\nAda L.\nGrace\n"
    );
    assert_eq!(setup.cli("select count(*) as n from kept_copy"), "n\n2\n");
    let out = setup.cli("select id, email, ssn from customers order by id");
    assert!(out.starts_with("id\temail\tssn\n1\t****\tNULL\n"), "{out}");
    seen.push_str(&out);

    // Reading back transformed forms finds no clear value: what was not moved cannot come back
    // reversed, in base64 or in hex, and the masked columns themselves are denied transformed.
    let out = setup.cli(
        "select reverse(note) as r, to_base64(name) as b, hex(note) as h from customers where id = 2",
    );
    assert!(
        out.contains("ereh sterces on\t"),
        "the read back ran: {out}"
    );
    seen.push_str(&out);
    for sql in [
        "select reverse(email) from customers",
        "select to_base64(ssn) from customers",
        "select hex(card_number) from customers",
    ] {
        let out = setup.s.mariadb(sql);
        assert!(
            !out.status.success() && out.stderr.contains("sluice-masking-strict"),
            "{sql}: {}",
            out.stderr
        );
        seen.push_str(&out.stdout);
        seen.push_str(&out.stderr);
    }
    // The same reads straight to the server do show the forms: the search below can fail.
    let direct = setup
        .s
        .direct("select reverse(email), to_base64(ssn), hex(card_number) from customers");
    assert!(
        find_leak(&direct.stdout, CLEAR).is_some(),
        "{}",
        direct.stdout
    );
    assert_eq!(find_leak(&seen, CLEAR), None, "client output:\n{seen}");
    let export = serde_json::to_string(&setup.s.agent.export().unwrap()).unwrap();
    assert_eq!(find_leak(&export, CLEAR), None, "export");
}

#[test]
fn errors_warnings_and_signals_never_carry_a_clear_value() {
    let test = "errors_warnings_and_signals_never_carry_a_clear_value";
    if skip(test) {
        return;
    }
    let rules = format!(
        "{RULES}\n[[detector]]\nname = \"card\"\nstrategy = \"partial\"\n\
         [[detector]]\nname = \"us_ssn\"\nstrategy = \"redact\"\n\
         [[target]]\nname = \"app-db\"\nstrict = true\n"
    );
    let setup = setup_rules("mysql-mask-roads", &rules, |_| {});
    setup
        .s
        .db
        .sql(
            "create table shop.people (id int primary key, email varchar(80) unique);
             insert into shop.people select id, email from shop.customers;
             create table shop.cards (card varchar(30) primary key);
             insert into shop.cards select card_number from shop.customers;
             delimiter //
             create procedure shop.leak_signal()
             begin
               declare m varchar(200);
               select concat('card ', card_number, ' ssn ', ssn) into m from shop.customers where id = 1;
               signal sqlstate '45000' set message_text = m, mysql_errno = 1644;
             end //
             delimiter ;",
        )
        .unwrap();
    // Each road, with the error number (or warning code) the client must still get. The
    // duplicate keys are composed from literals: on a strict target an INSERT ... SELECT of a
    // masked column is denied before the server sees it, and the statement the client sends
    // must not hold the clear value itself (the export is searched for it).
    let roads: [(&str, &str); 6] = [
        (
            "insert into people (id, email) values (9, concat('ada', '@example.com'))",
            "ERROR 1062 (23000)",
        ),
        (
            "insert into cards (card) values (concat('55000055', '55555559'))",
            "ERROR 1062 (23000)",
        ),
        (
            "select id from customers where cast(email as signed) = 0; show warnings",
            "1292",
        ),
        (
            "select id from customers order by cast(card_number as double); show warnings",
            "1292",
        ),
        ("call leak_signal()", "ERROR 1644 (45000)"),
        (
            "select id from customers where id = 1 and cast(ssn as signed) = 1; show warnings",
            "1292",
        ),
    ];
    let mut client = String::new();
    for (sql, code) in roads {
        let out = setup.s.mariadb(sql);
        let text = format!("{}\n{}", out.stdout, out.stderr);
        assert_no_clear(sql, &text);
        assert!(
            text.contains(code),
            "{sql}: no {code} in:\n{text}\n{}",
            setup.s.agent.log()
        );
        client.push_str(&text);
    }
    // The messages still say what happened, with the values masked.
    for want in [
        "Duplicate entry '****' for key",
        "Duplicate entry '************5559' for key",
        "Truncated incorrect",
        "card **** **** **** 1111 ssn ****",
    ] {
        assert!(client.contains(want), "missing {want:?} in:\n{client}");
    }
    // The journal holds what the client got: export, CSV, replay and raw files.
    let export = setup.s.agent.export().unwrap();
    let text = serde_json::to_string(&export).unwrap();
    assert_no_clear("export", &text);
    assert!(text.contains("1062") && text.contains("1644"), "{text}");
    let masked: Vec<&Value> = export.iter().filter(|r| r["kind"] == "masked").collect();
    assert!(
        masked.iter().any(|m| m["column"] == "error message"),
        "{masked:?}"
    );
    assert!(
        masked.iter().any(|m| m["column"] == "Message"),
        "SHOW WARNINGS is masked as rows: {masked:?}"
    );
    assert_no_clear(
        "csv export",
        &setup.s.agent.read(&["export", "--format", "csv"]).unwrap(),
    );
    for session in setup.s.agent.sessions().unwrap() {
        let replay = setup
            .s
            .agent
            .read(&["replay", session["id"].as_str().unwrap()])
            .unwrap();
        assert_no_clear("replay", &replay);
    }
    let mut raw = Vec::new();
    for e in walk(&setup.s.agent.journal_dir()) {
        raw.extend(std::fs::read(e).unwrap());
    }
    for clear in CLEAR {
        assert!(
            !raw.windows(clear.len()).any(|w| w == clear.as_bytes()),
            "clear value {clear:?} in the journal directory"
        );
    }
}
