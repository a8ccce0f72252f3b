//! `cargo xtask bench`: throughput through sluice against a direct connection, measured in the
//! same run on the same server. PostgreSQL: `pgbench -S` (select-only, scale 10) for 1 and 8
//! clients, direct and through the agent (release build, eBPF interception of a bench cgroup),
//! plus pgbouncer (session pooling) as a reference proxy when it is installed, and through a
//! second agent that decides every statement with the example policies (`policies/`), and
//! through a third with TLS toward the client and an OIDC token as the password. MySQL:
//! sysbench `oltp_read_only` and `oltp_point_select` on MariaDB for 1 and 8 threads, direct
//! and through the agent. Then
//! shipping a recorded large result to a local collector (events/s, MB/s), the journal
//! micro-benchmark (events/s, bytes per row, crash and power-loss durable), and
//! the policy micro-benchmark: facts + Cedar per statement, cached and uncached. Prints TPS,
//! ratios and microseconds; never asserts on them.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use sluice_tests::mariadb::{MariaDb, mysql_target, sysbench_run};
use sluice_tests::{Agent, AgentOptions, Cgroup, Postgres, pg_target, run_bounded};

use crate::util::{cargo, is_root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per pgbench and sysbench run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// pgbench scale factor.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Rows of the large-result (masking) benchmark.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
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
    crate::packages::ensure(crate::packages::Need::Bench)?;
    crate::util::run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let bin = target_dir().join("release/sluice");
    // SAFETY: no thread has been started yet in this process; the harness's read commands
    // and its collector then use the release binaries.
    unsafe {
        std::env::set_var("SLUICE_BIN", &bin);
        std::env::set_var(
            "SLUICE_COLLECTOR_BIN",
            target_dir().join("release/sluice-collector"),
        );
    }

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
        bin: Some(bin.clone()),
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
    unix_socket(&pg, &bin, &pgbench, args.seconds)?;
    let (sessions, statements) = agent.recorded()?;
    println!("\nsluice recorded {sessions} sessions, {statements} statements");
    drop(pgbouncer);
    drop(policed_agent);
    drop(secured_agent);
    sysbench(&bin, args.seconds)?;
    large_result(&pg, &bin, &cgroup, args.rows)?;
    drop(agent);
    shipping(&pg, &bin)?;
    println!();
    run_journal(&bin)?;
    println!();
    run_policy()
}

/// pgbench -S over the server's unix socket: direct (this process may enter the socket's
/// directory) and through sluice (a cgroup whose connects to the socket are redirected).
fn unix_socket(
    pg: &Postgres,
    bin: &std::path::Path,
    pgbench: &std::path::Path,
    seconds: u32,
) -> anyhow::Result<()> {
    let cgroup = Cgroup::create("bench-unix")?;
    let _agent = Agent::start(AgentOptions {
        bin: Some(bin.to_path_buf()),
        cgroup: Some(cgroup.path.clone()),
        targets: vec![format!(
            "{}sockets = [\"{}\"]\n",
            pg_target("bench-db", &format!("127.0.0.1:{}", pg.port)),
            pg.socket().display()
        )],
        ..AgentOptions::default()
    })?;
    let dir = pg.socket_dir();
    let dir = dir.to_str().context("socket directory is not UTF-8")?;
    let port = pg.port.to_string();
    println!("\npgbench -S over the unix socket, {seconds} s per run (TPS; ratio against direct)");
    println!(
        "{:<8} {:>10} {:>10} {:>7}",
        "clients", "direct", "sluice", "ratio"
    );
    for clients in [1u32, 8] {
        let direct = pgbench_tps_on(Command::new(pgbench), dir, &port, clients, seconds)?;
        let through = pgbench_tps_on(
            cgroup.command(None, pgbench.to_str().unwrap_or("pgbench")),
            dir,
            &port,
            clients,
            seconds,
        )?;
        println!(
            "{:<8} {:>10.0} {:>10.0} {:>7.3}",
            clients,
            direct,
            through,
            through / direct
        );
    }
    Ok(())
}

/// MySQL: sysbench `oltp_read_only` and `oltp_point_select` (prepared statements through
/// MariaDB Connector/C) against a throwaway MariaDB, for 1 and 8 threads, direct and through
/// an agent intercepting a bench cgroup.
fn sysbench(bin: &std::path::Path, seconds: u32) -> anyhow::Result<()> {
    let (tables, rows) = (4, 10_000);
    eprintln!("bench: MariaDB, sysbench prepare ({tables} tables of {rows} rows)");
    let db = MariaDb::start()?;
    db.sysbench_prepare(tables, rows)?;
    let cgroup = Cgroup::create("bench-mysql")?;
    let agent = Agent::start(AgentOptions {
        bin: Some(bin.to_path_buf()),
        cgroup: Some(cgroup.path.clone()),
        targets: vec![mysql_target("bench-mysql", &db.addr().to_string())],
        ..AgentOptions::default()
    })?;
    println!(
        "\nsysbench on MariaDB, {tables} tables of {rows} rows, {seconds} s per run (TPS; ratio against direct)"
    );
    println!(
        "{:<18} {:>8} {:>10} {:>10} {:>7}",
        "workload", "threads", "direct", "sluice", "ratio"
    );
    for workload in ["oltp_read_only", "oltp_point_select"] {
        for threads in [1u32, 8] {
            let run =
                |cmd: Command| sysbench_run(cmd, workload, db.port, tables, rows, threads, seconds);
            let direct = run(Command::new("sysbench"))?;
            let through = run(cgroup.command(None, "sysbench"))?;
            for (how, r) in [("direct", &direct), ("through sluice", &through)] {
                if r.ignored_errors > 0 {
                    bail!("sysbench {workload} {how}: {} errors", r.ignored_errors);
                }
            }
            println!(
                "{:<18} {:>8} {:>10.0} {:>10.0} {:>7.3}",
                workload,
                threads,
                direct.tps,
                through.tps,
                through.tps / direct.tps
            );
        }
    }
    let (sessions, statements) = agent.recorded()?;
    println!("\nsluice recorded {sessions} MySQL sessions, {statements} statements");
    Ok(())
}

/// Shipper throughput to a local collector: an agent records the large result (`big`) while
/// its collector is down, then the collector starts and the spool drains; events and bytes per
/// second from the collector's start until the agent's spool is empty.
fn shipping(pg: &Postgres, bin: &std::path::Path) -> anyhow::Result<()> {
    use sluice_tests::collector::Collector;
    use std::time::Instant;
    eprintln!("bench: shipping to a local collector");
    let mut collector = Collector::init()?;
    collector.start()?;
    let cg = Cgroup::create("bench-ship")?;
    let agent = Agent::start(AgentOptions {
        bin: Some(bin.to_path_buf()),
        cgroup: Some(cg.path.clone()),
        targets: vec![pg_target("bench-db", &format!("127.0.0.1:{}", pg.port))],
        extra_config: "[shipper]\ninterval_ms = 50\n".into(),
        ..AgentOptions::default()
    })?;
    let token = collector.token("bench", "10m")?;
    let out = run_bounded(
        &mut collector.enroll_command(bin, &token, &agent.config),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!("sluice enroll failed: {}{}", out.stdout, out.stderr);
    }
    collector.stop();
    let mut psql = cg.command(None, &pg.bin.join("psql").display().to_string());
    psql.args([
        "-X",
        "-A",
        "-t",
        "-q",
        "-o",
        "/dev/null",
        "-h",
        "127.0.0.1",
        "-p",
    ])
    .arg(pg.port.to_string())
    .args([
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        "select * from big",
    ]);
    let out = run_bounded(&mut psql, Duration::from_secs(600))?;
    if !out.status.success() {
        bail!("psql through the shipping agent failed: {}", out.stderr);
    }
    let spooled = agent.sessions()?;
    let events: u64 = spooled.iter().filter_map(|s| s["events"].as_u64()).sum();
    let bytes: u64 = spooled
        .iter()
        .filter_map(|s| s["server_bytes"].as_u64())
        .sum();
    let started = Instant::now();
    collector.start()?;
    let deadline = started + Duration::from_secs(600);
    while !agent.sessions()?.is_empty() {
        if Instant::now() > deadline {
            bail!("the spool did not drain within 600 s:\n{}", agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "shipping to a local collector (mutual TLS, verify on ingest, synced store): {events} events, {:.0} MB of results in {secs:.2} s: {:.0} events/s, {:.1} MB/s",
        bytes as f64 / 1e6,
        events as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    Ok(())
}

/// `sluice journal bench`: events per second and bytes per row of the recording path, crash
/// durable (encrypted, then in the clear) and power-loss durable.
fn run_journal(bin: &std::path::Path) -> anyhow::Result<()> {
    eprintln!("bench: journal micro-benchmark");
    for extra in [
        &[][..],
        &["--no-encryption"][..],
        &["--power-loss", "--events", "2000"][..],
    ] {
        let out = Command::new(bin)
            .args(["journal", "bench"])
            .args(extra)
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "sluice journal bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// One large result (`rows` rows, about 130 bytes each) read with psql, direct, through
/// sluice, and through sluice masking one column by rule with the content detectors on.
fn large_result(
    pg: &Postgres,
    bin: &std::path::Path,
    plain_cg: &Cgroup,
    rows: u64,
) -> anyhow::Result<()> {
    eprintln!("bench: creating a table of {rows} rows");
    pg.sql(&format!(
        "drop table if exists big; create table big as select g as id, 'user' || g || '@example.com' as email,          'order ' || g || ' shipped to the usual address; ' || repeat('x', 60) as note          from generate_series(1, {rows}) g; analyze big;"
    ))?;
    let bytes: f64 = pg
        .sql("select sum(octet_length(id::text) + octet_length(email) + octet_length(note)) from big")?
        .trim()
        .parse()
        .unwrap_or(0.0);
    let rules = tempfile::tempdir()?;
    let rules_file = rules.path().join("masking.toml");
    std::fs::write(
        &rules_file,
        "[[column]]\nname = \"email\"\ncolumn = \"email\"\nstrategy = \"redact\"\n\n\
         [[detector]]\nname = \"email\"\nstrategy = \"redact\"\n[[detector]]\nname = \"card\"\nstrategy = \"partial\"\n\
         [[detector]]\nname = \"iban\"\nstrategy = \"partial\"\n[[detector]]\nname = \"us_ssn\"\nstrategy = \"redact\"\n",
    )?;
    let masked_cg = Cgroup::create("bench-mask")?;
    let _masked = Agent::start(AgentOptions {
        bin: Some(bin.to_path_buf()),
        cgroup: Some(masked_cg.path.clone()),
        targets: vec![pg_target("bench-db", &format!("127.0.0.1:{}", pg.port))],
        agent_config: format!("masking_file = \"{}\"\n", rules_file.display()),
        ..AgentOptions::default()
    })?;
    let psql = pg.bin.join("psql");
    let read = |mut cmd: Command| -> anyhow::Result<f64> {
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ])
        .arg(pg.port.to_string())
        .args([
            "-d",
            "postgres",
            "-o",
            "/dev/null",
            "-c",
            "select id, email, note from big",
        ]);
        let start = std::time::Instant::now();
        let out = run_bounded(&mut cmd, Duration::from_secs(600))?;
        if !out.status.success() {
            bail!("psql failed: {}", out.stderr);
        }
        Ok(start.elapsed().as_secs_f64())
    };
    let durable_cg = Cgroup::create("bench-durable")?;
    let _durable = Agent::start(AgentOptions {
        bin: Some(bin.to_path_buf()),
        cgroup: Some(durable_cg.path.clone()),
        targets: vec![pg_target("bench-db", &format!("127.0.0.1:{}", pg.port))],
        agent_config: "durability = \"power-loss\"\n".into(),
        ..AgentOptions::default()
    })?;
    let direct = read(Command::new(&psql))?;
    let through = read(plain_cg.command(None, psql.to_str().unwrap_or("psql")))?;
    let masked = read(masked_cg.command(None, psql.to_str().unwrap_or("psql")))?;
    let durable = read(durable_cg.command(None, psql.to_str().unwrap_or("psql")))?;
    let mb = bytes / 1e6;
    println!(
        "\nlarge result: {rows} rows, {mb:.0} MB of values, read by psql (MB/s; ratio against direct)"
    );
    println!(
        "{:<40} {:>10.0} MB/s {:>8.0} rows/s ratio {:.3}",
        "direct",
        mb / direct,
        rows as f64 / direct,
        1.0
    );
    println!(
        "{:<40} {:>10.0} MB/s {:>8.0} rows/s ratio {:.3}",
        "sluice (recorded)",
        mb / through,
        rows as f64 / through,
        direct / through
    );
    println!(
        "{:<40} {:>10.0} MB/s {:>8.0} rows/s ratio {:.3}",
        "sluice, 1 column masked + 4 detectors",
        mb / masked,
        rows as f64 / masked,
        direct / masked
    );
    println!(
        "{:<40} {:>10.0} MB/s {:>8.0} rows/s ratio {:.3}",
        "sluice, power-loss durable journal",
        mb / durable,
        rows as f64 / durable,
        direct / durable
    );
    Ok(())
}

fn pgbench_tps(cmd: Command, port: &str, clients: u32, seconds: u32) -> anyhow::Result<f64> {
    pgbench_tps_on(cmd, "127.0.0.1", port, clients, seconds)
}

/// pgbench -S against `host` (an address, or a unix socket directory).
fn pgbench_tps_on(
    mut cmd: Command,
    host: &str,
    port: &str,
    clients: u32,
    seconds: u32,
) -> anyhow::Result<f64> {
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
        host,
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
