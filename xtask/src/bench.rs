//! `cargo xtask bench`: throughput through sluice against a direct connection, measured in the
//! same run on the same server. PostgreSQL: `pgbench -S` (select-only, scale 10) for 1 and 8
//! clients, direct and through the agent (release build, eBPF interception of a bench cgroup),
//! plus pgbouncer (session pooling) as a reference proxy when it is installed, and through a
//! second agent that decides every statement with the example policies (`policies/`), and
//! through a third with TLS toward the client and an OIDC token as the password. Then
//! the policy micro-benchmark: facts + Cedar per statement, cached and uncached. Prints TPS,
//! ratios and microseconds; never asserts on them.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_tests::{Agent, AgentOptions, Cgroup, Postgres, pg_target, run_bounded};

use crate::util::{cargo, ensure_packages, is_root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// pgbench scale factor.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Only the policy micro-benchmark: facts + Cedar per statement, cached and uncached
    /// (no root, no servers).
    #[arg(long)]
    policy: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.policy {
        return run_policy();
    }
    if !is_root() {
        bail!("the benchmark attaches eBPF programs: run it as root");
    }
    ensure_packages(&[
        ("/usr/lib/postgresql", "postgresql"),
        ("/usr/sbin/pgbouncer", "pgbouncer"),
    ])?;
    crate::util::run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let bin = target_dir().join("release/sluice");

    let pg = Postgres::start()?;
    let pgbench = pg.bin.join("pgbench");
    let port = pg.port.to_string();
    eprintln!("bench: pgbench -i -s {}", args.scale);
    let init = Command::new(&pgbench)
        .args([
            "-i",
            "-q",
            "-s",
            &args.scale.to_string(),
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "postgres",
        ])
        .output()?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let cgroup = Cgroup::create("bench")?;
    let agent = Agent::start(AgentOptions {
        bin: Some(bin.clone()),
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("bench-db", &format!("127.0.0.1:{}", pg.port))],
        ..AgentOptions::default()
    })?;
    // TLS toward the client and an OIDC token as the password (a real provider on loopback),
    // sluice logging in to the backend with the role's credentials.
    let idp = sluice_tests::oidc::Provider::start(&[]);
    let token = idp.id_token("ada", 3600, "sluice");
    let ca = sluice_tests::TestCa::new()?;
    let (cert, key) = ca.issue("sluice")?;
    let secured = Cgroup::create("bench-tls")?;
    let mut tls_target = pg_target("bench-db", &format!("127.0.0.1:{}", pg.port));
    tls_target.push_str(&format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_tls = \"required\"\nauth = \"sluice\"\n\
         [[target.role]]\nname = \"postgres\"\npassword_env = \"SLUICE_BENCH_PG\"\nallow = [\"group:developers\"]\n",
        cert.display(),
        key.display()
    ));
    let secured_agent = Agent::start(AgentOptions {
        bin: Some(bin.clone()),
        cgroup: Some(secured.path.clone()),
        targets: vec![tls_target],
        extra_config: format!(
            "[oidc]\nissuer = \"{}\"\naudience = \"sluice\"\n",
            idp.issuer
        ),
        // The bench server trusts local connections; the password is never asked for.
        env: vec![("SLUICE_BENCH_PG".into(), "unused".into())],
        ..AgentOptions::default()
    })?;
    // The same, with every statement decided by the example policies.
    let policed = Cgroup::create("bench-policy")?;
    let policed_agent = Agent::start(AgentOptions {
        bin: Some(bin),
        cgroup: Some(policed.path.clone()),
        targets: vec![pg_target("bench-db", &format!("127.0.0.1:{}", pg.port))],
        policy_dir: Some(crate::util::root().join("policies")),
        ..AgentOptions::default()
    })?;

    let pgbouncer = std::path::Path::new("/usr/sbin/pgbouncer")
        .exists()
        .then(|| start_pgbouncer(&pg))
        .transpose()?;

    println!(
        "\npgbench -S, scale {}, {} s per run (TPS; ratio against direct)",
        args.scale, args.seconds
    );
    println!(
        "{:<8} {:>10} {:>10} {:>7} {:>14} {:>7} {:>15} {:>7} {:>10} {:>7}",
        "clients",
        "direct",
        "sluice",
        "ratio",
        "sluice+policy",
        "ratio",
        "sluice+TLS+OIDC",
        "ratio",
        "pgbouncer",
        "ratio"
    );
    for clients in [1u32, 8] {
        let direct = pgbench_tps(Command::new(&pgbench), &port, clients, args.seconds)?;
        let through = pgbench_tps(
            cgroup.command(None, pgbench.to_str().unwrap_or("pgbench")),
            &port,
            clients,
            args.seconds,
        )?;
        let with_policy = pgbench_tps(
            policed.command(None, pgbench.to_str().unwrap_or("pgbench")),
            &port,
            clients,
            args.seconds,
        )?;
        let mut cmd = secured.command(None, pgbench.to_str().unwrap_or("pgbench"));
        cmd.env("PGSSLMODE", "require").env("PGPASSWORD", &token);
        let with_tls = pgbench_tps(cmd, &port, clients, args.seconds)?;
        let bouncer = match &pgbouncer {
            Some((_, bport)) => Some(pgbench_tps(
                Command::new(&pgbench),
                &bport.to_string(),
                clients,
                args.seconds,
            )?),
            None => None,
        };
        println!(
            "{:<8} {:>10.0} {:>10.0} {:>7.3} {:>14.0} {:>7.3} {:>15.0} {:>7.3} {:>10} {:>7}",
            clients,
            direct,
            through,
            through / direct,
            with_policy,
            with_policy / direct,
            with_tls,
            with_tls / direct,
            bouncer
                .map(|b| format!("{b:.0}"))
                .unwrap_or_else(|| "-".into()),
            bouncer
                .map(|b| format!("{:.3}", b / direct))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let sessions = agent.sessions()?;
    let statements: u64 = sessions
        .iter()
        .filter_map(|s| s["statements"].as_u64())
        .sum();
    println!(
        "\nsluice recorded {} sessions, {statements} statements",
        sessions.len()
    );
    drop(pgbouncer);
    drop(policed_agent);
    drop(secured_agent);
    drop(agent);
    println!();
    run_policy()
}

fn pgbench_tps(mut cmd: Command, port: &str, clients: u32, seconds: u32) -> anyhow::Result<f64> {
    let c = clients.to_string();
    cmd.args([
        "-S",
        "-n",
        "-c",
        &c,
        "-j",
        &c,
        "-T",
        &seconds.to_string(),
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-U",
        "postgres",
        "postgres",
    ]);
    let out = run_bounded(&mut cmd, Duration::from_secs(u64::from(seconds) + 60))?;
    if !out.status.success() {
        bail!("pgbench failed: {}{}", out.stdout, out.stderr);
    }
    out.stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no tps line in pgbench output:\n{}", out.stdout))
}

/// pgbouncer in session mode in front of `pg`, on a free port.
fn start_pgbouncer(pg: &Postgres) -> anyhow::Result<(Pgbouncer, u16)> {
    let dir = tempfile::tempdir()?;
    let port = sluice_tests::free_port();
    let ini = dir.path().join("pgbouncer.ini");
    std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n")?;
    std::fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\nauth_file = {}\npool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\nunix_socket_dir =\n",
            pg.port,
            dir.path().join("users.txt").display()
        ),
    )?;
    Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir.path())
        .status()?;
    let child = Command::new("setpriv")
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            "/usr/sbin/pgbouncer",
            "-q",
        ])
        .arg(&ini)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    Ok((Pgbouncer { child, _dir: dir }, port))
}

struct Pgbouncer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `cargo xtask bench --policy`: `sluice policy bench` (release build) over the example
/// policies in `policies/`.
fn run_policy() -> anyhow::Result<()> {
    crate::util::run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let bin = target_dir().join("release/sluice");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let out = Command::new(&bin)
        .args(["policy", "bench", "--dir"])
        .arg(&dir)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "sluice policy bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
