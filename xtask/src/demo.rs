//! `cargo xtask demo`: sluice's main job on embedded defaults, on a fresh Debian machine as
//! root. Installs what is missing, starts a throwaway PostgreSQL on a free loopback port,
//! makes a throwaway CA and a certificate (clients must use TLS), starts the agent attached to
//! a demo cgroup (it authenticates clients itself and logs in to the server with a configured
//! role), runs psql statements (sslmode=require) from inside that cgroup
//! against the server's own address (psql is not told about sluice) under the example
//! policies in `policies/`, and prints what the journal recorded. The target is called
//! `prod-db`, so the production policies apply: the schema change needs a just-in-time grant
//! (requested, then approved by a second person), a DELETE without WHERE is denied, and a
//! DELETE with one is held until that second person approves it. The agent is enrolled with a
//! local collector and ships everything it recorded; the sessions and replays are read from
//! the collector's store, and the sessions touching `customers` are exported as CSV with a
//! verification bundle that `sluice verify` checks offline. The same agent also protects a
//! throwaway MariaDB (`orders-db`, MySQL protocol, same identity, TLS, policies and journal):
//! the `mariadb` CLI, given no password, is logged in by sluice, a DELETE without WHERE is
//! denied, and the session is replayed from the collector. Everything it started is stopped
//! and removed at the end; the collector's store, the export and the bundle stay in
//! `target/sluice-demo/`.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_tests::collector::Collector;
use sluice_tests::mariadb::{self, MariaDb, mysql_target};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_args, run_bounded,
};

use crate::util::{cargo, is_root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the agent and the server running until Ctrl-C, to try your own clients.
    #[arg(long)]
    keep: bool,
}

/// The approver: uid 1 (`daemon` on Debian), mapped to "dana" in group "dba".
const APPROVER_UID: u32 = 1;

const CREATE: &str =
    "create table customers (id int primary key, name text, email text, note text)";
/// The select whose rows the example masking rules change (see [`check_masked`]).
const SELECT: &str = "select id, name, email, note from customers order by id";
const STATEMENTS: &[&str] = &[
    "insert into customers values \
     (1, 'Ada Lovelace', 'ada@example.com', 'paid with card 4111 1111 1111 1111'), \
     (2, 'Alan Turing', 'alan@example.com', 'call back on +44 20 7946 0958')",
    SELECT,
    "update customers set email = 'ada@lovelace.example' where id = 1",
    "delete from customers",
    "select * from no_such_table",
];
const HELD: &str = "delete from customers where id = 2 returning name";
const MYSQL: &[&str] = &[
    "create table orders (id int primary key, customer varchar(40), total decimal(8,2))",
    "insert into orders values (1, 'Ada Lovelace', 12.50), (2, 'Alan Turing', 99.00)",
    "select id, customer, total from orders order by id",
    "delete from orders",
    "select * from no_such_table",
];

pub fn run(args: Args) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and creates a cgroup: run it as root (sudo -E cargo xtask demo)"
        );
    }
    // Before the build: RocksDB's bindings need libclang.
    crate::packages::ensure(crate::packages::Need::Demo)?;
    step("building sluice");
    crate::util::run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    let bin = target_dir().join("debug/sluice");

    step("starting a throwaway PostgreSQL");
    let pg = Postgres::start()?;
    println!(
        "    PostgreSQL {} listening on 127.0.0.1:{} and [::1]:{}",
        pg.bin.display(),
        pg.port,
        pg.port
    );

    step("starting a throwaway MariaDB");
    let my = MariaDb::start()?;
    println!("    MariaDB listening on 127.0.0.1:{}", my.port);

    step("making a throwaway CA and a certificate for sluice (openssl)");
    let ca = sluice_tests::TestCa::new()?;
    let (cert, key) = ca.issue("sluice-demo")?;
    println!(
        "    CA {}, server certificate {}",
        ca.cert.display(),
        cert.display()
    );

    // What the demo leaves behind (the agent's spool, the collector's store, an export and its
    // bundle) outlives it, so it can be read afterwards.
    let kept = target_dir().join("sluice-demo");
    if kept.exists() {
        std::fs::remove_dir_all(&kept)
            .with_context(|| format!("cannot remove {}", kept.display()))?;
    }
    std::fs::create_dir_all(&kept)?;
    let journal = kept.join("journal");

    step("starting a collector (its own certificate, pinned by the agents that enroll)");
    let mut collector = Collector::init_at(kept.join("collector"))?;
    collector.start()?;
    println!(
        "    sluice-collector serving on {}, store in {}",
        collector.addr(),
        collector.store().display()
    );

    step("starting the sluice agent, attached to a demo cgroup");
    let cgroup = Cgroup::create("demo")?;
    let target = format!("127.0.0.1:{}", pg.port);
    let agent = Agent::start(AgentOptions {
        bin: Some(bin.clone()),
        journal_dir: Some(journal.clone()),
        // The example policies, with `nobody` (the demo's psql) as an admin called "demo",
        // and uid 1 as "dana", who approves; the example masking rules.
        policy_dir: Some(crate::util::root().join("policies")),
        agent_config: format!(
            "masking_file = \"{}\"\n",
            crate::util::root().join("policies/masking.toml").display()
        ),
        extra_config: format!(
            "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"demo\"\ngroups = [\"admins\"]\n\n\
             [[identity]]\nuid = {APPROVER_UID}\nprincipal = \"dana\"\ngroups = [\"dba\"]\n\n\
             [shipper]\ninterval_ms = 100\n"
        ),
        cgroup: Some(cgroup.path.clone()),
        // TLS required toward clients; sluice authenticates them itself (here: by uid, as
        // workloads) and logs in to the server as role postgres (the demo server trusts
        // local logins, so the configured password is never asked for).
        targets: vec![
            format!(
                "{}jit_approvers = \"dba\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_tls = \"required\"\nauth = \"sluice\"\n\
                 [[target.role]]\nname = \"postgres\"\npassword_env = \"SLUICE_DEMO_PG_PASSWORD\"\nallow = [\"group:admins\"]\n",
                pg_target("prod-db", &target),
                cert.display(),
                key.display()
            ),
            // The MariaDB: the same, with the server's password user as role `app`, whose
            // password only the agent has.
            format!(
                "{}tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_tls = \"required\"\nauth = \"sluice\"\n\
                 [[target.role]]\nname = \"{}\"\npassword_env = \"SLUICE_DEMO_MY_PASSWORD\"\nallow = [\"group:admins\"]\n",
                mysql_target("orders-db", &format!("127.0.0.1:{}", my.port)),
                cert.display(),
                key.display(),
                mariadb::USER
            ),
        ],
        env: demo_env(),
        ..AgentOptions::default()
    })?;
    println!(
        "    protecting {target} for every process in {}",
        cgroup.path.display()
    );
    println!(
        "    proxy on 127.0.0.1:{}, journal in {} (encrypted, hash-chained, signed)",
        agent.proxy_port,
        agent.journal_dir().display()
    );

    step("enrolling the agent with the collector (one-time token)");
    let token = collector.token("demo-host", "10m")?;
    println!("    collector$ sluice-collector token --agent demo-host --ttl 10m");
    let enrolled = run_bounded(
        collector
            .enroll_command(&bin, &token, &agent.config)
            // The config is checked whole, credentials included.
            .envs(demo_env()),
        Duration::from_secs(30),
    )?;
    println!(
        "    root$ sluice enroll --collector {} --token ...",
        collector.addr()
    );
    for line in enrolled.stdout.lines().chain(enrolled.stderr.lines()) {
        println!("          {line}");
    }
    if !enrolled.status.success() {
        bail!("sluice enroll failed");
    }

    let psql = |sql: &str| -> anyhow::Result<String> {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args("127.0.0.1", pg.port, sql))
            .env("PGSSLMODE", "require");
        let out = run_bounded(&mut cmd, Duration::from_secs(60))?;
        println!("    psql> {sql}");
        // Notices and errors first: psql got them before the rows it prints at the end.
        for line in out.stderr.lines().chain(out.stdout.lines()) {
            println!("          {line}");
        }
        Ok(out.stdout)
    };
    let sluice = |uid: u32, who: &str, args: &[&str]| -> anyhow::Result<String> {
        let out = agent.control(Some(uid), args)?;
        println!("    {who}$ sluice {}", args.join(" "));
        for line in out.stdout.lines().chain(out.stderr.lines()) {
            println!("          {line}");
        }
        if !out.status.success() {
            bail!("sluice {args:?} failed");
        }
        Ok(out.stdout)
    };

    step(
        "running psql (sslmode=require) as `nobody` inside the cgroup, against the server's own address",
    );
    println!("    (schema changes on prod-db need a just-in-time grant, even for admins)");
    psql(CREATE)?;

    step("asking for just-in-time access; a second person (dana, group dba) approves");
    let asked = sluice(
        CLIENT_UID,
        "demo",
        &[
            "request",
            "access",
            "--target",
            "prod-db",
            "--for",
            "10m",
            "--reason",
            "DEMO-1 new customers table",
        ],
    )?;
    let id = asked
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    sluice(
        APPROVER_UID,
        "dana",
        &["approve", &id, "--comment", "ok for DEMO-1"],
    )?;
    sluice(APPROVER_UID, "dana", &["grants"])?;

    step("the same psql statements again, now with the grant");
    println!(
        "    (policies/masking.toml: customers.email is redacted by a column rule; the card and \
         phone numbers in `note` are found by the content detectors)"
    );
    psql(CREATE)?;
    for sql in STATEMENTS {
        let out = psql(sql)?;
        if *sql == SELECT {
            check_masked(&out).context("the psql output")?;
        }
    }

    step("a DELETE with WHERE on prod-db is held until dana approves it");
    let held = std::thread::scope(|scope| -> anyhow::Result<()> {
        let client = scope.spawn(|| psql(HELD));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let id = loop {
            // The table's first column, below its header.
            let out = agent.control(Some(APPROVER_UID), &["requests"])?;
            if let Some(id) = out
                .stdout
                .lines()
                .nth(1)
                .and_then(|l| l.split_whitespace().next())
            {
                break id.to_string();
            }
            if std::time::Instant::now() > deadline {
                bail!("the held statement did not show up in `sluice requests`");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        sluice(APPROVER_UID, "dana", &["requests"])?;
        sluice(
            APPROVER_UID,
            "dana",
            &["approve", &id, "--comment", "customer asked to be removed"],
        )?;
        client
            .join()
            .map_err(|_| anyhow::anyhow!("the psql thread panicked"))?
            .map(drop)
    });
    held?;

    step("the agent ships its journal; the collector verifies every chain and signature");
    let expected = STATEMENTS.len() + 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stored = collector.sessions()?;
        let sealed = stored.iter().filter(|s| !s["end"].is_null()).count();
        if stored.len() >= expected && sealed == stored.len() && agent.sessions()?.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the collector stored {} of {expected} sessions within 60 s:\n{}",
                stored.len(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "    the agent's spool is empty; the collector holds {expected} sessions (sluice status on the agent shows the shipping metrics)"
    );
    let store = collector.store();
    let read = |args: &[&str]| -> anyhow::Result<String> {
        let out = run_bounded(
            Command::new(&bin).args(args).arg("--journal").arg(&store),
            Duration::from_secs(60),
        )?;
        if !out.status.success() {
            bail!("sluice {args:?} failed: {}", out.stderr);
        }
        Ok(out.stdout)
    };

    step("sluice sessions --journal <collector store>");
    print!("{}", read(&["sessions"])?);
    let listed: serde_json::Value = serde_json::from_str(&read(&["sessions", "--json"])?)?;
    let ids: Vec<String> = listed
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if ids.len() != expected {
        bail!("expected {expected} recorded sessions, found {}", ids.len());
    }
    // The denied CREATE, the SELECT with its rows, the denied DELETE, and the held one.
    for index in [0, 3, 5, 7] {
        step(&format!("sluice replay {}", ids[index]));
        let replay = read(&["replay", &ids[index]])?;
        print!("{replay}");
        if index == 3 {
            check_masked(&replay).context("the replay of the select")?;
        }
    }

    step("compliance: every session touching `customers`, exported as CSV with a bundle");
    let csv = kept.join("customers.csv");
    let bundle = kept.join("customers.bundle.jsonl");
    let exported = read(&[
        "export",
        "--format",
        "csv",
        "--statement",
        "customers",
        "--out",
        &csv.display().to_string(),
        "--bundle",
        &bundle.display().to_string(),
    ])?;
    print!("{exported}");
    println!("    {} and {}", csv.display(), bundle.display());
    step("sluice verify --bundle ... --export ... (offline: no journal, no collector)");
    let verified = run_bounded(
        Command::new(&bin)
            .args(["verify", "--bundle"])
            .arg(&bundle)
            .arg("--export")
            .arg(&csv),
        Duration::from_secs(60),
    )?;
    print!("{}{}", verified.stdout, verified.stderr);
    if !verified.status.success() {
        bail!("the exported bundle does not verify");
    }

    step(
        "the same agent protects MariaDB: the mariadb CLI (TLS, no password) as `nobody` in the cgroup",
    );
    println!(
        "    (sluice knows the uid, checks role `{}`, logs in with the password only it holds)",
        mariadb::USER
    );
    for sql in MYSQL {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "mariadb");
        cmd.args([
            "--no-defaults",
            "-h",
            "127.0.0.1",
            "--protocol=tcp",
            "--ssl",
            "-t",
        ])
        .arg(format!("--ssl-ca={}", ca.cert.display()))
        .arg(format!("-P{}", my.port))
        .arg(format!("-u{}", mariadb::USER))
        .args([mariadb::DATABASE, "-e", sql]);
        let out = run_bounded(&mut cmd, Duration::from_secs(60))?;
        println!("    mariadb> {sql}");
        for line in out.stderr.lines().chain(out.stdout.lines()) {
            println!("          {line}");
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mysql_session = loop {
        // One session per statement, in order; the fourth is the DELETE.
        let stored: Vec<serde_json::Value> = collector
            .sessions()?
            .into_iter()
            .filter(|s| s["target"] == "orders-db")
            .collect();
        if stored.len() == MYSQL.len()
            && stored.iter().all(|s| !s["end"].is_null())
            && let Some(id) = stored[3]["id"].as_str()
        {
            break id.to_string();
        }
        if std::time::Instant::now() > deadline {
            bail!("the MariaDB sessions did not reach the collector within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    step(&format!(
        "sluice replay {mysql_session} (the denied DELETE, from the collector)"
    ));
    print!("{}", read(&["replay", &mysql_session])?);

    if args.keep {
        println!("Agent and server keep running; connect from the cgroup with:");
        println!(
            "    sh -c 'echo $$ > {}/cgroup.procs; exec psql -h 127.0.0.1 -p {} -U postgres'",
            cgroup.path.display(),
            pg.port
        );
        println!("Press Ctrl-C to stop.");
        let _ = Command::new("sleep").arg("infinity").status();
    }
    step("stopping (sessions sealed, programs detached, collector, server and cgroup removed)");
    drop(agent);
    drop(collector);
    drop(cgroup);
    drop(pg);
    drop(my);
    println!(
        "\nThe collector's store stays in {}. Read it yourself:",
        store.display()
    );
    for cmd in ["sessions", "replay <ID>", "export --format csv", "verify"] {
        println!("    {} {cmd} --journal {}", bin.display(), store.display());
    }
    Ok(())
}

/// The select's rows as the example masking rules leave them: the email column redacted, the
/// card and the phone number in `note` replaced but for their last four digits, nothing in
/// clear. The demo fails otherwise.
fn check_masked(out: &str) -> anyhow::Result<()> {
    for clear in ["ada@example.com", "4111 1111 1111 1111", "7946 0958"] {
        if out.contains(clear) {
            bail!("{clear:?} is shown in clear: masking did not apply");
        }
    }
    for masked in ["****", "1111", "0958"] {
        if !out.contains(masked) {
            bail!("{masked:?} is missing: the masked rows are not there");
        }
    }
    Ok(())
}

fn step(text: &str) {
    println!("\n==> {text}");
}

/// The roles' passwords, from the agent's environment: PostgreSQL trusts local logins (never
/// asked for), MariaDB's password user checks it.
fn demo_env() -> Vec<(String, String)> {
    vec![
        ("SLUICE_DEMO_PG_PASSWORD".into(), "unused-by-trust".into()),
        ("SLUICE_DEMO_MY_PASSWORD".into(), mariadb::PASSWORD.into()),
    ]
}
