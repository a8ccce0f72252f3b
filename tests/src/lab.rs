//! The lab (`cargo xtask lab`, and `tests/tests/lab.rs` under `cargo xtask test`): the
//! topology of `vagrant/Vagrantfile` built on this machine with network namespaces (bastion,
//! router, db; see [`crate::netns`]), provisioned by the same scripts (`vagrant/provision/`),
//! then the walk-through an engineer would do on the bastion:
//!
//! 1. `db.sh` in the db namespace: PostgreSQL and MariaDB on the routed address, seeded;
//!    a collector is started there too;
//! 2. `bastion.sh` in the bastion namespace: the `sluice` package installed (with dpkg, into
//!    a directory standing for the bastion's /), the agent's config (targets `db:5432` and
//!    `db:3306`, by name; the example policies and masking rules), `db` in the bastion's
//!    /etc/hosts, enrollment with the collector;
//! 3. the agent started as its installed systemd unit would start it (no systemd as PID 1
//!    here): the unit's `ExecStart` in a cgroup of its own, with the unit's `UMask`, no new
//!    privileges and exactly its `CapabilityBoundingSet` ([`AgentUnit`]);
//! 4. the engineer (an unprivileged uid, [`crate::CLIENT_UID`]) runs `psql -h db` and
//!    `mariadb -h db`: intercepted, identified by uid as `ada`, masked (customers.email
//!    redacted, the card number found by a detector), a DELETE without WHERE denied;
//! 5. every session reaches the collector, which is read back: destination the routed
//!    address, the engineer's uid and principal, the denial in the replay.
//!
//! Everything it starts is stopped, and the namespaces, cgroups and files are removed, on
//! every exit path (the handles' Drop). Every wait is bounded. Fails (Err) when anything the
//! walk-through shows is not so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::collector::Collector;
use crate::netns::{DB, Topology, in_netns};
use crate::package::AgentUnit;
use crate::{Agent, CLIENT_UID, Cgroup, Output, run_bounded};

/// The engineer's password on both databases (seeded by `db.sh`; a lab, not a secret).
const PASSWORD: &str = "ada-lab-password";

const SELECT: &str = "select id, name, email, note from customers order by id";
const DELETE: &str = "delete from customers";

const LIMIT: Duration = Duration::from_secs(60);

/// The repository's root.
fn repo() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(prompt: &str, out: &Output) {
    println!("    {prompt}");
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        println!("          {line}");
    }
}

/// Runs a provisioning script in namespace `ns` with `env`, bounded.
fn provision(ns: &str, script: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
    let path = repo().join("vagrant/provision").join(script);
    let mut cmd = Command::new("sh");
    cmd.arg(&path).env("SLUICE_SRC", repo());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_bounded(&mut in_netns(ns, &cmd), Duration::from_secs(300))?;
    show(&format!("{ns}# sh {}", path.display()), &out);
    if !out.status.success() {
        bail!("{script} failed ({})", out.status);
    }
    Ok(())
}

/// Runs the lab with the agent's package `deb` (the `sluice_*.deb` of `cargo xtask package`)
/// on the bastion; the collector on db is the build's `sluice-collector`.
pub fn run(deb: &Path) -> anyhow::Result<()> {
    step("building the topology: bastion -- router -- db (network namespaces, 198.18.0.0/15)");
    let topo = Topology::create("lab")?;
    println!(
        "    {} 198.18.1.2, {} 198.18.1.1 / 198.18.2.1, {} {DB}",
        topo.bastion, topo.router, topo.db
    );
    let state = tempfile::Builder::new().prefix("sluice-lab-").tempdir()?;
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;

    step("provisioning db (vagrant/provision/db.sh): PostgreSQL and MariaDB");
    provision(
        &topo.db,
        "db.sh",
        &[(
            "SLUICE_LAB_STATE",
            state.path().join("db").display().to_string(),
        )],
    )?;

    step("starting a collector on db");
    let mut collector = Collector::init_in_netns(&topo.db, DB)?;
    collector.start()?;
    println!("    sluice-collector serving on {}", collector.addr());
    let token = collector.token("bastion", "10m")?;

    step("provisioning the bastion (vagrant/provision/bastion.sh)");
    let engineers = Cgroup::create("lab-engineers")?;
    let root = state.path().join("bastion");
    provision(
        &topo.bastion,
        "bastion.sh",
        &[
            ("DB_ADDR", DB.to_string()),
            ("SLUICE_ROOT", root.display().to_string()),
            ("SLUICE_DEB", deb.display().to_string()),
            ("ENGINEER_UID", CLIENT_UID.to_string()),
            ("SLUICE_CGROUP", engineers.path.display().to_string()),
            ("COLLECTOR", collector.addr()),
            ("COLLECTOR_TOKEN", token),
        ],
    )?;

    step(
        "starting the agent as its installed unit would (own cgroup, its umask and capabilities only)",
    );
    let unit = Cgroup::create("lab-agent")?;
    let service = AgentUnit::installed(&root)?;
    let installed = service.program(&root)?;
    let config = service.config(&root)?;
    let cmd = service.command(&root, &unit.path)?;
    let agent = Agent::start_command(
        in_netns(&topo.bastion, &cmd),
        installed.clone(),
        config.clone(),
        root.join("run/sluice/agent.sock"),
        root.join("var/lib/sluice/journal"),
        15432,
    )?;
    println!(
        "    {} (from usr/lib/systemd/system/sluice.service; capabilities: {}, umask {})",
        service.argv.join(" "),
        service.caps.join(", "),
        service.umask
    );
    check_caps(&agent, &service)?;
    if !agent.logged("target name resolved") {
        bail!("the agent did not resolve `db`:\n{}", agent.log());
    }

    let engineer = |program: &str, args: &[&str]| -> anyhow::Result<Output> {
        let mut cmd = engineers.command(Some(CLIENT_UID), program);
        cmd.args(args)
            .env("PGPASSWORD", PASSWORD)
            .env("PGCONNECT_TIMEOUT", "10");
        run_bounded(&mut in_netns(&topo.bastion, &cmd), LIMIT)
    };
    let psql = |sql: &str| {
        let out = engineer(
            "psql",
            &["-X", "-h", "db", "-U", "ada", "-d", "lab", "-c", sql],
        )?;
        show(
            &format!("ada@bastion$ psql -h db -U ada lab -c '{sql}'"),
            &out,
        );
        Ok::<_, anyhow::Error>(out)
    };
    let mariadb = |sql: &str| {
        let password = format!("-p{PASSWORD}");
        let out = engineer(
            "mariadb",
            &[
                "--no-defaults",
                "-h",
                "db",
                "-u",
                "ada",
                &password,
                "--connect-timeout=10",
                "-t",
                "lab",
                "-e",
                sql,
            ],
        )?;
        show(
            &format!("ada@bastion$ mariadb -h db -u ada lab -e '{sql}'"),
            &out,
        );
        Ok::<_, anyhow::Error>(out)
    };

    step("the engineer (uid nobody, `ada` to sluice) on the bastion: psql -h db");
    let selected = psql(SELECT)?;
    check_masked(&selected).context("psql's output")?;
    let denied = psql(DELETE)?;
    check_denied(&denied).context("psql's DELETE")?;

    step("the engineer on the bastion: mariadb -h db");
    let selected = mariadb(SELECT)?;
    check_masked(&selected).context("mariadb's output")?;
    let denied = mariadb(DELETE)?;
    check_denied(&denied).context("mariadb's DELETE")?;

    step("the sessions reach the collector on db");
    let deadline = Instant::now() + LIMIT;
    let sessions = loop {
        let stored = collector.sessions()?;
        if stored.len() >= 4 && stored.iter().all(|s| !s["end"].is_null()) {
            break stored;
        }
        if Instant::now() > deadline {
            bail!(
                "the collector holds {} of 4 sealed sessions after {LIMIT:?}; agent log:\n{}",
                stored.len(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    print!("{}", collector.read(&["sessions"])?.stdout);
    for (target, port) in [("lab-postgres", 5432), ("lab-mariadb", 3306)] {
        let of: Vec<&serde_json::Value> =
            sessions.iter().filter(|s| s["target"] == target).collect();
        if of.len() != 2 {
            bail!(
                "expected 2 sessions of {target}, the collector has {}",
                of.len()
            );
        }
        for s in &of {
            if s["orig_dst"] != format!("{DB}:{port}").as_str()
                || s["uid"] != CLIENT_UID
                || s["principal"] != "ada"
            {
                bail!("a session of {target} is not the engineer's to db's routed address: {s}");
            }
        }
        let Some(id) = of[1]["id"].as_str() else {
            bail!("a session without an id: {}", of[1]);
        };
        let replay = collector.read(&["replay", id])?;
        step(&format!("sluice replay {id} (from the collector's store)"));
        print!("{}", replay.stdout);
        if !replay.stdout.contains("no-update-or-delete-without-where") {
            bail!("the replay of {target}'s DELETE does not show the denial");
        }
    }

    step("stopping: agent (detaches), collector, servers; namespaces, cgroups and files removed");
    drop(agent);
    drop(unit);
    drop(collector);
    drop(engineers);
    drop(topo);
    drop(state);
    println!("\nThe lab ran end to end.");
    Ok(())
}

/// The running agent's effective capabilities are exactly its unit's bounding set.
fn check_caps(agent: &Agent, unit: &AgentUnit) -> anyhow::Result<()> {
    let pid = agent.pid().context("the agent has no pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapEff in the agent's status")?;
    let want = unit.cap_mask()?;
    if eff != want {
        bail!("the agent runs with capabilities {eff:#x}, its unit grants {want:#x}");
    }
    println!("    effective capabilities {eff:#x} (exactly the unit's)");
    Ok(())
}

/// The example masking rules applied: the email redacted, the card number found in `note`.
fn check_masked(out: &Output) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!("the select failed: {}", out.stderr);
    }
    for clear in ["ada@example.com", "4111 1111 1111 1111"] {
        if out.stdout.contains(clear) {
            bail!("{clear:?} is shown in clear: masking did not apply");
        }
    }
    if !out.stdout.contains("Ada Lovelace") || !out.stdout.contains("****") {
        bail!("the masked rows are not there: {}", out.stdout);
    }
    Ok(())
}

/// The example policies' refusal of a DELETE without WHERE, as the client shows it.
fn check_denied(out: &Output) -> anyhow::Result<()> {
    if out.status.success() || !out.stderr.contains("UPDATE and DELETE need a WHERE clause") {
        bail!(
            "the DELETE without WHERE was not denied: {}{}",
            out.stdout,
            out.stderr
        );
    }
    Ok(())
}
