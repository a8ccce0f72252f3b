//! `cargo xtask demo`: sluice's main job on embedded defaults, on a fresh Debian machine as
//! root. Installs what is missing, starts a throwaway PostgreSQL on a free loopback port,
//! starts the agent attached to a demo cgroup, runs psql statements from inside that cgroup
//! against the server's own address (psql is not told about sluice) under the example
//! policies in `policies/` (one statement is denied), and prints what the journal recorded. Everything it started is stopped and removed at the end.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, pg_target, psql_args, run_bounded,
};

use crate::util::{cargo, ensure_packages, is_root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Keep the agent and the server running until Ctrl-C, to try your own clients.
    #[arg(long)]
    keep: bool,
}

const STATEMENTS: &[&str] = &[
    "create table customers (id int primary key, name text, email text)",
    "insert into customers values (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', 'alan@example.com')",
    "select id, name, email from customers order by id",
    "update customers set email = 'ada@lovelace.example' where id = 1",
    "delete from customers",
    "select * from no_such_table",
];

pub fn run(args: Args) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and creates a cgroup: run it as root (sudo -E cargo xtask demo)"
        );
    }
    ensure_packages(&[
        ("/usr/bin/psql", "postgresql"),
        ("/usr/lib/postgresql", "postgresql"),
    ])?;
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

    step("starting the sluice agent, attached to a demo cgroup");
    let cgroup = Cgroup::create("demo")?;
    let target = format!("127.0.0.1:{}", pg.port);
    // The demo's journal outlives the demo, so it can be read afterwards.
    let journal = target_dir().join("sluice-demo/journal");
    if journal.exists() {
        std::fs::remove_dir_all(&journal)
            .with_context(|| format!("cannot remove {}", journal.display()))?;
    }
    let agent = Agent::start(AgentOptions {
        bin: Some(bin.clone()),
        journal_dir: Some(journal.clone()),
        // The example policies, with `nobody` (the demo's psql) as an admin called "demo".
        policy_dir: Some(crate::util::root().join("policies")),
        extra_config: format!(
            "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"demo\"\ngroups = [\"admins\"]\n"
        ),
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("demo-db", &target)],
        ..AgentOptions::default()
    })?;
    println!(
        "    protecting {target} for every process in {}",
        cgroup.path.display()
    );
    println!(
        "    proxy on 127.0.0.1:{}, journal in {}",
        agent.proxy_port,
        agent.journal_dir().display()
    );

    step("running psql as `nobody` inside the cgroup, against the server's own address");
    for sql in STATEMENTS {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(psql_args("127.0.0.1", pg.port, sql));
        let out = run_bounded(&mut cmd, Duration::from_secs(30))?;
        println!("    psql> {sql}");
        for line in out.stdout.lines().chain(out.stderr.lines()) {
            println!("          {line}");
        }
    }

    step("sluice sessions");
    print!("{}", agent.read(&["sessions"])?);
    let sessions = agent.sessions()?;
    let ids: Vec<&str> = sessions.iter().filter_map(|s| s["id"].as_str()).collect();
    if ids.len() != STATEMENTS.len() {
        bail!(
            "expected {} recorded sessions, found {}",
            STATEMENTS.len(),
            ids.len()
        );
    }
    // The SELECT with its rows, the denied DELETE, and the failing statement.
    for index in [2, 4, 5] {
        step(&format!("sluice replay {}", ids[index]));
        print!("{}", agent.read(&["replay", ids[index]])?);
    }

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
    step("stopping (sessions sealed, programs detached, server and cgroup removed)");
    drop(agent);
    drop(cgroup);
    drop(pg);
    println!(
        "\nThe journal stays in {}. Read it yourself:",
        journal.display()
    );
    for cmd in ["sessions", "replay <ID>", "export --format csv"] {
        println!(
            "    {} {cmd} --journal {}",
            bin.display(),
            journal.display()
        );
    }
    Ok(())
}

fn step(text: &str) {
    println!("\n==> {text}");
}
