//! End to end: masking of result rows through interception, with real psql and psycopg 3 and a
//! real PostgreSQL. A `customers` table holds emails, card numbers, SSNs, IBANs, a tax id and
//! free text; the rules (written here) mask by column name and by content. Checked: text and
//! binary formats, simple and extended protocol, COPY TO STDOUT, joins on hashed values, the
//! escapes whose values content detection still catches, the journal's masking reports, and that
//! no clear value is anywhere in the journal directory or the export.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, find_leak, pg_target, psql_args,
    require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);

/// Every clear sensitive value the tests put in the database.
const CLEAR: &[&str] = &[
    "ada@example.com",
    "grace.hopper@navy.example",
    "4111 1111 1111 1111",
    "5500005555555559",
    "078-05-1120",
    "219-09-9999",
    "GB82WEST12345698765432",
    "DE89370400440532013000",
    "TAX-00042",
    "TAX-00043",
    "edsger@example.org",
];

const RULES: &str = r#"
[hash]
key_hex = "00112233445566778899aabbccddeeff"

[[column]]
name = "email"
column = "email"
strategy = "redact"

[[column]]
name = "cards"
column = "card_*"
strategy = "partial"

[[column]]
name = "ssn"
column = "ssn"
strategy = "null"

[[column]]
name = "tax-id"
column = "tax_id"
strategy = "hash"

[[detector]]
name = "email"
strategy = "redact"

[[detector]]
name = "card"
strategy = "partial"

[[detector]]
name = "us_ssn"
strategy = "redact"

[[detector]]
name = "iban"
strategy = "partial"

[[detector]]
name = "tax"
regex = "TAX-[0-9]{5}"
strategy = "hash"
"#;

struct Setup {
    agent: Agent,
    cgroup: Cgroup,
    pg: Postgres,
    _rules: tempfile::TempDir,
}

fn setup(name: &str) -> Setup {
    setup_rules(name, RULES)
}

fn setup_rules(name: &str, rules_text: &str) -> Setup {
    let pg = Postgres::start().unwrap();
    pg.sql(
        "create table customers (id int primary key, name text, email text, card_number text, \
           ssn text, iban text, tax_id text, note text);
         insert into customers values
           (1, 'Ada', 'ada@example.com', '4111 1111 1111 1111', '078-05-1120', 'GB82WEST12345698765432', 'TAX-00042', 'call ada@example.com'),
           (2, 'Grace', 'grace.hopper@navy.example', '5500005555555559', '219-09-9999', 'DE89370400440532013000', 'TAX-00043', 'no secrets here');
         create table orders (id int, tax_id text, amount int);
         insert into orders values (10, 'TAX-00042', 5), (11, 'TAX-00043', 7), (12, 'TAX-00042', 3);",
    )
    .unwrap();
    let rules = tempfile::tempdir().unwrap();
    std::fs::write(rules.path().join("masking.toml"), rules_text).unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        agent_config: format!(
            "masking_file = \"{}\"\n",
            rules.path().join("masking.toml").display()
        ),
        ..AgentOptions::default()
    })
    .unwrap();
    Setup {
        agent,
        cgroup,
        pg,
        _rules: rules,
    }
}

impl Setup {
    fn psql_output(&self, sql: &str) -> sluice_tests::Output {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args("127.0.0.1", self.pg.port, sql));
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    /// psql with verbose errors (the SQLSTATE is printed).
    fn psql_verbose(&self, sql: &str) -> sluice_tests::Output {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(["-v", "VERBOSITY=verbose"])
            .args(psql_args("127.0.0.1", self.pg.port, sql));
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    fn psql(&self, sql: &str) -> String {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args("127.0.0.1", self.pg.port, sql));
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}\n{}",
            out.stderr,
            self.agent.log()
        );
        out.stdout
    }
}

fn assert_no_clear(what: &str, text: &str) {
    for clear in CLEAR {
        assert!(
            !text.contains(clear),
            "{what}: clear value {clear:?} in:\n{text}"
        );
    }
}

#[test]
fn sensitive_values_are_masked_in_text_binary_simple_extended_and_copy_and_never_recorded() {
    if !require_root(
        "sensitive_values_are_masked_in_text_binary_simple_extended_and_copy_and_never_recorded",
    ) {
        return;
    }
    let s = setup("mask");
    // Simple protocol, text format, by column and by content.
    let out = s.psql(
        "select id, name, email, card_number, ssn, iban, tax_id, note from customers order by id",
    );
    assert_no_clear("select", &out);
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows[0][1], "Ada", "unmasked columns pass: {out}");
    assert_eq!(rows[0][2], "****");
    assert!(
        rows[0][3].ends_with("1111") && rows[0][3].starts_with('*'),
        "{out}"
    );
    assert_eq!(rows[0][4], "", "ssn is NULL: {out}");
    assert!(
        rows[0][5].ends_with("5432") && rows[0][5].contains('*'),
        "{out}"
    );
    assert!(rows[0][6].starts_with("h:"), "{out}");
    assert_eq!(rows[0][7], "call ****");
    assert_eq!(rows[1][7], "no secrets here");

    // Hashed values still join: the masked tax ids of customers match those of orders.
    let out = s.psql(
        "select c.tax_id, count(o.id) from customers c join orders o on o.tax_id = c.tax_id group by c.tax_id order by 2",
    );
    assert_no_clear("join", &out);
    let counts: Vec<&str> = out
        .lines()
        .map(|l| l.split('|').nth(1).unwrap_or(""))
        .collect();
    assert_eq!(counts, ["1", "2"], "{out}");
    let h_customers = s.psql("select tax_id from customers where id = 1");
    let h_orders = s.psql("select tax_id from orders where id = 10");
    assert_eq!(h_customers.trim(), h_orders.trim(), "same value, same hash");

    // COPY TO STDOUT (text format).
    let out = s.psql("copy customers to stdout");
    assert_no_clear("copy", &out);
    assert!(out.contains("Ada") && out.contains("Grace"), "{out}");

    // Extended protocol in text and binary formats (psycopg 3).
    let script = r#"
import json, sys, psycopg
out = {}
with psycopg.connect(sys.argv[1]) as conn:
    for binary in (False, True):
        cur = conn.cursor(binary=binary)
        cur.execute("select email, card_number, iban, note, id from customers where id = %s", (1,))
        out["binary" if binary else "text"] = [str(v) for v in cur.fetchone()]
print(json.dumps(out))
"#;
    let mut cmd = s.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
    cmd.args(["-c", script]).arg(format!(
        "host=127.0.0.1 port={} dbname=postgres user=postgres",
        s.pg.port
    ));
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert!(out.status.success(), "{}", out.stderr);
    assert_no_clear("psycopg", &out.stdout);
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    for format in ["text", "binary"] {
        assert_eq!(v[format][0], "****", "{format}: {v}");
        assert!(
            v[format][1].as_str().unwrap().ends_with("1111"),
            "{format}: {v}"
        );
        assert_eq!(v[format][3], "call ****", "{format}: {v}");
        assert_eq!(v[format][4], "1", "{format}: an integer passes: {v}");
    }

    // The journal says what was masked, never the value; nothing clear anywhere in it.
    let export = s.agent.export().unwrap();
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
    let text = serde_json::to_string(&export).unwrap();
    assert_no_clear("export", &text);
    let csv = s.agent.read(&["export", "--format", "csv"]).unwrap();
    assert_no_clear("csv export", &csv);
    let mut raw = Vec::new();
    for e in std::fs::read_dir(s.agent.journal_dir()).unwrap() {
        let p: PathBuf = e.unwrap().path();
        if p.is_file() {
            raw.extend(std::fs::read(p).unwrap());
        }
    }
    for clear in CLEAR {
        assert!(
            !raw.windows(clear.len()).any(|w| w == clear.as_bytes()),
            "clear value {clear:?} in the journal directory"
        );
    }
}

#[test]
fn values_whose_column_is_lost_are_still_caught_by_their_content() {
    if !require_root("values_whose_column_is_lost_are_still_caught_by_their_content") {
        return;
    }
    let s = setup("mask-escape");
    let escapes = [
        "select email as contact from customers",
        "select lower(email) from customers",
        "select email || '' from customers",
        "select upper(card_number) as c from customers",
        "select (select email from customers where id = 1)",
        "with x as (select email, iban from customers) select * from x",
        "select email from customers union all select ssn from customers",
        "select c from customers c",
        "select row_to_json(c) from customers c",
        "select json_agg(c) from customers c",
        "select concat_ws(' ', name, ssn, iban) from customers",
        "copy (select note, tax_id, card_number from customers) to stdout",
    ];
    for sql in escapes {
        let out = s.psql(sql);
        assert_no_clear(sql, &out);
        assert!(!out.trim().is_empty(), "{sql}: rows still come back");
    }
    // JSON stays JSON.
    let out = s.psql("select json_agg(c) from customers c");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v[0]["name"], "Ada");
}

#[test]
fn a_strict_target_denies_what_it_cannot_track_and_masks_what_it_can() {
    if !require_root("a_strict_target_denies_what_it_cannot_track_and_masks_what_it_can") {
        return;
    }
    let rules = format!("{RULES}\n[[target]]\nname = \"app-db\"\nstrict = true\n");
    let s = setup_rules("mask-strict", &rules);
    // Tracked: masked by name, as on any target.
    let out = s.psql("select id, email, ssn from customers order by id");
    assert_no_clear("tracked", &out);
    assert!(out.starts_with("1|****|"), "{out}");
    let out = s.psql("select count(*) from customers");
    assert_eq!(out.trim(), "2");
    // Untracked shapes that return masked columns are denied before they run, even the one
    // content detection cannot catch (three digits of an SSN).
    for sql in [
        "select substr(ssn, 1, 3) from customers",
        "select email as contact from customers",
        "select lower(email) from customers",
        "with x as (select email from customers) select * from x",
        "select email from customers union all select ssn from customers",
        "select c from customers c",
        "select row_to_json(c) from customers c",
        "copy customers to stdout",
        "copy (select card_number from customers) to stdout",
    ] {
        let out = s.psql_output(sql);
        assert!(!out.status.success(), "{sql}: should be denied");
        assert!(
            out.stderr.contains("sluice-masking-strict"),
            "{sql}: {}",
            out.stderr
        );
        assert_no_clear(sql, &out.stdout);
    }
    let denials: Vec<Value> = s
        .agent
        .export()
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == "decision" && r["allowed"] == false)
        .collect();
    assert_eq!(denials.len(), 9, "{denials:?}");
}

#[test]
fn a_strict_target_denies_every_statement_that_moves_a_masked_column_and_nothing_gets_out() {
    let test =
        "a_strict_target_denies_every_statement_that_moves_a_masked_column_and_nothing_gets_out";
    if !require_root(test) {
        return;
    }
    let rules = format!("{RULES}\n[[target]]\nname = \"app-db\"\nstrict = true\n");
    let s = setup_rules("mask-strict-move", &rules);
    let file = std::env::temp_dir().join(format!("sluice-leak-{}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let copy_to_file = format!("copy (select email from customers) to '{}'", file.display());
    let copy_to_program = format!(
        "copy (select reverse(ssn) from customers) to program 'cat > {}'",
        file.display()
    );
    let moves = [
        "create table leak_t1 as select id, email from customers",
        "create temp table leak_t2 as select reverse(card_number) as x from customers",
        "create table leak_t3 as table customers",
        "select ssn into leak_t4 from customers",
        "insert into orders (id, tax_id, amount) select id, email, 0 from customers",
        "insert into orders (id, tax_id) values (20, (select ssn from customers limit 1))",
        "create view leak_v1 (contact) as select email from customers",
        "create materialized view leak_v2 as select id, ssn from customers",
        "create function leak_f1() returns setof text language sql as $$ select email from customers $$",
        "create function leak_f2() returns text language plpgsql as $$ begin return (select ssn from customers limit 1); end $$",
        "create trigger leak_tr before update on customers for each row execute function suppress_redundant_updates_trigger()",
        "create rule leak_r as on insert to orders do also update customers set note = card_number",
        "do $$ begin create table leak_t5 as select email from customers; end $$",
        copy_to_file.as_str(),
        copy_to_program.as_str(),
        "prepare leak_p as insert into orders (id, tax_id) select id, ssn from customers",
        "update customers set note = email",
        "update customers set name = (select card_number from customers c2 where c2.id = customers.id)",
        "with x as (update customers set note = ssn returning id) select count(*) from x",
        "delete from orders where id = 12 returning reverse(tax_id)",
        "alter table customers rename column email to contact",
        "alter table customers add column leak_e text generated always as (reverse(email)) stored",
        "explain analyze create table leak_t6 as select email from customers",
    ];
    let mut seen = String::new();
    for sql in moves {
        let out = s.psql_verbose(sql);
        assert!(!out.status.success(), "{sql}: should be denied");
        assert!(
            out.stderr.contains("42501") && out.stderr.contains("sluice-masking-strict"),
            "{sql}: {}",
            out.stderr
        );
        seen.push_str(&out.stdout);
        seen.push_str(&out.stderr);
    }

    // Nothing reached the backend: asked directly, not through sluice.
    for (what, sql) in [
        (
            "tables and views",
            "select count(*) from pg_class where relname like 'leak%'",
        ),
        (
            "functions",
            "select count(*) from pg_proc where proname like 'leak%'",
        ),
        (
            "triggers",
            "select count(*) from pg_trigger where tgname like 'leak%'",
        ),
        (
            "rules",
            "select count(*) from pg_rules where rulename like 'leak%'",
        ),
        (
            "renamed or generated columns",
            "select count(*) from information_schema.columns where table_name = 'customers' and column_name in ('contact', 'leak_e')",
        ),
    ] {
        assert_eq!(s.pg.sql(sql).unwrap().trim(), "0", "{what}");
    }
    assert_eq!(s.pg.sql("select count(*) from orders").unwrap().trim(), "3");
    assert_eq!(
        s.pg.sql("select name || '|' || note from customers order by id")
            .unwrap(),
        "Ada|call ada@example.com\nGrace|no secrets here\n",
        "no column was overwritten"
    );
    assert!(!file.exists(), "COPY wrote {}", file.display());

    // Harmless statements on the same strict target still run.
    for sql in [
        "insert into orders values (13, 'TAX-00099', 1)",
        "create table kept_plain (id int, email text)",
        "create table kept_copy as select id, name from customers",
        "create view kept_names as select id, name from customers",
        "update customers set name = 'Ada L.' where id = 1",
    ] {
        let out = s.psql_verbose(sql);
        assert!(out.status.success(), "{sql}: {}", out.stderr);
    }
    assert_eq!(
        s.psql("select name from kept_names order by id"),
        "Ada L.\nGrace\n"
    );
    assert_eq!(s.psql("select count(*) from kept_copy").trim(), "2");
    let out = s.psql("select id, email, ssn from customers order by id");
    assert!(out.starts_with("1|****|"), "masking still answers: {out}");
    seen.push_str(&out);
    assert_eq!(
        s.pg.sql("select count(*) from pg_class where relname like 'kept%'")
            .unwrap()
            .trim(),
        "3"
    );

    // Reading back transformed forms finds no clear value: what was not moved cannot come back
    // reversed, in base64 or in hex, and the masked columns themselves are denied transformed.
    let out = s.psql(
        "select reverse(note), encode(convert_to(name, 'UTF8'), 'base64'), encode(convert_to(note, 'UTF8'), 'hex') from customers where id = 2",
    );
    assert!(
        out.starts_with("ereh sterces on|"),
        "the read back ran: {out}"
    );
    seen.push_str(&out);
    for sql in [
        "select reverse(email) from customers",
        "select encode(convert_to(ssn, 'UTF8'), 'base64') from customers",
        "select encode(convert_to(card_number, 'UTF8'), 'hex') from customers",
    ] {
        let out = s.psql_output(sql);
        assert!(!out.status.success(), "{sql}: should be denied");
        seen.push_str(&out.stdout);
        seen.push_str(&out.stderr);
    }
    // The same reads straight to the server do show the forms: the search below can fail.
    let direct = s
        .pg
        .sql("select reverse(email), encode(convert_to(ssn, 'UTF8'), 'base64'), encode(convert_to(card_number, 'UTF8'), 'hex') from customers")
        .unwrap();
    assert!(find_leak(&direct, CLEAR).is_some(), "{direct}");
    assert_eq!(find_leak(&seen, CLEAR), None, "client output:\n{seen}");
    let export = serde_json::to_string(&s.agent.export().unwrap()).unwrap();
    assert_eq!(find_leak(&export, CLEAR), None, "export");
}

#[test]
fn with_sluice_authentication_columns_are_matched_by_table_through_the_catalog() {
    if !require_root("with_sluice_authentication_columns_are_matched_by_table_through_the_catalog")
    {
        return;
    }
    let pg = Postgres::start().unwrap();
    pg.sql(
        "create table customers (id int, name text); insert into customers values (1, 'Ada Lovelace');
         create table products (id int, name text); insert into products values (1, 'Analytical Engine');",
    )
    .unwrap();
    let rules = tempfile::tempdir().unwrap();
    let rules_file = rules.path().join("masking.toml");
    std::fs::write(
        &rules_file,
        "[[column]]\nname = \"customer-names\"\nschema = \"public\"\ntable = \"customers\"\ncolumn = \"name\"\nstrategy = \"redact\"\n",
    )
    .unwrap();
    let cgroup = Cgroup::create("mask-catalog").unwrap();
    let mut target = pg_target("app-db", &format!("127.0.0.1:{}", pg.port));
    target.push_str(
        "auth = \"sluice\"\n[[target.role]]\nname = \"postgres\"\npassword_env = \"SLUICE_TEST_PG\"\nallow = [\"*\"]\n",
    );
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![target],
        agent_config: format!("masking_file = \"{}\"\n", rules_file.display()),
        extra_config: format!("[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"analyst\"\n"),
        // The test server trusts local logins; the password is never asked for.
        env: vec![("SLUICE_TEST_PG".into(), "unused".into())],
        ..AgentOptions::default()
    })
    .unwrap();
    let s = Setup {
        agent,
        cgroup,
        pg,
        _rules: rules,
    };
    assert_eq!(s.psql("select name from customers").trim(), "****");
    // An alias keeps the column's origin: the catalog names it.
    assert_eq!(s.psql("select name as who from customers").trim(), "****");
    // The same column name in another table is not masked: the rule is for customers.
    assert_eq!(
        s.psql("select name from products").trim(),
        "Analytical Engine"
    );
    assert_eq!(
        s.psql("select c.name as n, p.name from customers c, products p")
            .trim(),
        "****|Analytical Engine"
    );
}
