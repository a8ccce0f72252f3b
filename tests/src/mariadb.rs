//! A throwaway MariaDB server for tests: Debian's `mariadb-install-db` into a temp dir, then
//! `mariadbd` on a free loopback port (and a unix socket in the same dir), with a password user
//! (`mysql_native_password`) for TCP clients. Runs as the `mysql` OS user when started as root.
//!
//! Installs nothing (`apt-get install mariadb-server mariadb-client`; `.ci/run` does). Every wait
//! is bounded; the server gets SIGTERM (then SIGKILL) when the handle drops.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Output, free_port, is_root, run_bounded, run_ok, stop,
};

/// The password user every test server has (all privileges).
pub const USER: &str = "app";
pub const PASSWORD: &str = "s3cret-pw";
/// The database created for tests.
pub const DATABASE: &str = "shop";

pub struct MariaDb {
    pub port: u16,
    pub socket: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// True when MariaDB's server binaries are installed. Otherwise prints why the test is
/// skipped, or panics under `CI=true`.
pub fn require_mariadb(test: &str) -> bool {
    if Path::new("/usr/sbin/mariadbd").exists() && Path::new("/usr/bin/mariadb").exists() {
        return true;
    }
    crate::skip(
        test,
        "MariaDB is not installed (apt-get install mariadb-server mariadb-client)",
    )
}

/// The Python client libraries the tests drive, pinned: mysql-connector-python (pure-Python
/// protocol, binary prepared statements) and PyMySQL (text protocol, multi-statements).
const PYTHON_CLIENTS: [&str; 2] = ["mysql-connector-python==26.10.0", "PyMySQL==1.1.2"];

/// A Python with [`PYTHON_CLIENTS`], in a venv under the target dir made from Debian's
/// `/usr/bin/python3` (so any uid can run it; root's `python3` may be a pyenv shim under
/// /root), made on first use (pip: needs the network once). Otherwise prints why the test is
/// skipped and returns None, or panics under `CI=true`.
pub fn require_mysql_python(test: &str) -> Option<PathBuf> {
    // Tests in one binary run in parallel: one of them makes the venv.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let venv = target.join("mysql-clients-venv");
    let python = venv.join("bin/python");
    let works = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import mysql.connector, pymysql"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if works(&python) {
        return Some(python);
    }
    let made = Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(PYTHON_CLIENTS)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if made && works(&python) {
        return Some(python);
    }
    crate::skip(
        test,
        &format!(
            "{PYTHON_CLIENTS:?} could not be installed into {} (python3-venv, pip, network?)",
            venv.display()
        ),
    );
    None
}

/// A `[[target]]` table for a MySQL/MariaDB target.
pub fn mysql_target(name: &str, matches: &str) -> String {
    format!("[[target]]\nname = \"{name}\"\nprotocol = \"mysql\"\nmatch = \"{matches}\"\n")
}

impl MariaDb {
    /// Starts a server with the default options plus `max_allowed_packet=64M`.
    pub fn start() -> anyhow::Result<MariaDb> {
        MariaDb::start_with(&[])
    }

    /// Starts a server with extra `mariadbd` arguments (e.g. `--max-connections=10`).
    pub fn start_with(extra: &[&str]) -> anyhow::Result<MariaDb> {
        MariaDb::start_inner(extra, None)
    }

    /// Starts a server offering TLS with this certificate and key (PEM; copied into the
    /// server's directory, where its OS user can read them).
    pub fn start_tls(cert: &Path, key: &Path) -> anyhow::Result<MariaDb> {
        MariaDb::start_inner(&[], Some((cert, key)))
    }

    fn start_inner(extra: &[&str], tls: Option<(&Path, &Path)>) -> anyhow::Result<MariaDb> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-mariadb-")
            // Mode 700 whatever the umask: only the server's user reaches its unix socket.
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("temp dir")?;
        let data = dir.path().join("data");
        let socket = dir.path().join("mysqld.sock");
        // Each server its own tmpdir: bootstraps running in parallel collide on /tmp's
        // `#sql-temptable-*` names ("Unknown table 'mysql.tmp_user_sys'").
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let mut tls_args = Vec::new();
        if let Some((cert, key)) = tls {
            let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(cert, &c)?;
            std::fs::copy(key, &k)?;
            tls_args.push(format!("--ssl-cert={}", c.display()));
            tls_args.push(format!("--ssl-key={}", k.display()));
        }
        let as_root = is_root();
        if as_root {
            run_ok(
                Command::new("chown")
                    .args(["-R", "mysql:mysql"])
                    .arg(dir.path()),
            )?;
        }
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .arg(format!("--tmpdir={}", tmp.display()));
        if as_root {
            install.arg("--user=mysql");
        }
        run_ok(&mut install)?;
        let port = free_port();
        let mut cmd = Command::new("mariadbd");
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mariadbd.pid").display()
            ))
            .arg(format!("--port={port}"))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-networking=0",
                "--skip-log-bin",
                "--max-allowed-packet=64M",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=0",
            ])
            .args(extra)
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("mariadbd.log"),
            )?));
        if as_root {
            cmd.arg("--user=mysql");
        }
        let child = cmd.spawn().context("cannot start mariadbd")?;
        let mut db = MariaDb {
            port,
            socket,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new("mariadb-admin")
                .arg("--no-defaults")
                .arg(format!("--socket={}", db.socket.display()))
                .args(["-uroot", "--connect-timeout=2", "ping"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                break;
            }
            if let Some(c) = db.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "mariadbd exited ({status}) before it was ready; log:\n{}",
                    db.log()
                );
            }
            if Instant::now() > deadline {
                bail!("mariadbd did not become ready in 30 s; log:\n{}", db.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        db.sql(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED VIA mysql_native_password \
             USING PASSWORD('{PASSWORD}'); \
             GRANT ALL ON *.* TO '{USER}'@'%'; CREATE DATABASE {DATABASE};"
        ))?;
        Ok(db)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mariadbd.log")).unwrap_or_default()
    }

    /// The server's TCP address.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs SQL as root over the unix socket (batch mode: tab-separated, no headers).
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-uroot", "-B", "-N", "-e", sql])
            .output()?;
        if !out.status.success() {
            bail!("mariadb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `mariadb` CLI arguments connecting over TCP to `port` (this server's, or a relay's) as
    /// the password user, in batch mode with column names, to database `shop`.
    pub fn client_args(port: u16) -> Vec<String> {
        vec![
            "--no-defaults".into(),
            "-h".into(),
            "127.0.0.1".into(),
            "-P".into(),
            port.to_string(),
            "-u".into(),
            USER.into(),
            format!("-p{PASSWORD}"),
            "--protocol=tcp".into(),
            "--skip-ssl".into(),
            "--max-allowed-packet=64M".into(),
            "-B".into(),
            DATABASE.into(),
        ]
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, "mariadbd");
        }
    }
}

/// A MariaDB server behind a running agent that intercepts one test cgroup: clients started
/// with [`Intercepted::command`] connect to the server's own address and go through sluice;
/// the test process itself (outside the cgroup) reaches the server directly.
///
/// Field order is drop order: the agent stops before its cgroup and server go.
pub struct Intercepted {
    pub agent: Agent,
    pub cgroup: Cgroup,
    pub db: MariaDb,
}

impl Intercepted {
    /// A new server, a cgroup named after `name`, and an agent with one `mysql` target for the
    /// server (`tweak` adjusts the agent's options before it starts).
    pub fn start(name: &str, tweak: impl FnOnce(&mut AgentOptions)) -> anyhow::Result<Self> {
        let db = MariaDb::start()?;
        let cgroup = Cgroup::create(name)?;
        let mut options = AgentOptions {
            cgroup: Some(cgroup.path.clone()),
            targets: vec![mysql_target("app-db", &format!("127.0.0.1:{}", db.port))],
            ..AgentOptions::default()
        };
        tweak(&mut options);
        let agent = Agent::start(options)?;
        Ok(Intercepted { agent, cgroup, db })
    }

    /// `program` inside the cgroup as `nobody` (intercepted), or outside it (direct).
    pub fn command(&self, through_sluice: bool, program: &str) -> Command {
        if through_sluice {
            self.cgroup.command(Some(CLIENT_UID), program)
        } else {
            Command::new(program)
        }
    }

    /// The `mariadb` CLI running `sql` as the password user in the cgroup: through sluice.
    pub fn mariadb(&self, sql: &str) -> Output {
        self.cli(true, sql)
    }

    /// The same CLI outside the cgroup: not intercepted.
    pub fn direct(&self, sql: &str) -> Output {
        self.cli(false, sql)
    }

    fn cli(&self, through_sluice: bool, sql: &str) -> Output {
        let mut cmd = self.command(through_sluice, "mariadb");
        cmd.args(MariaDb::client_args(self.db.port))
            .args(["-e", sql]);
        run_bounded(&mut cmd, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.agent.log()))
    }
}

/// What `sysbench ... run` reported.
#[derive(Debug, Clone, Copy)]
pub struct Sysbench {
    pub transactions: u64,
    pub tps: f64,
    pub queries: u64,
    pub ignored_errors: u64,
}

/// `sysbench`'s arguments for `workload` (e.g. `oltp_point_select`) against 127.0.0.1:`port`
/// as the password user, on `tables` tables of `rows` rows in database `shop`.
fn sysbench_args(workload: &str, port: u16, tables: u32, rows: u32) -> Vec<String> {
    vec![
        workload.into(),
        "--db-driver=mysql".into(),
        "--mysql-host=127.0.0.1".into(),
        format!("--mysql-port={port}"),
        format!("--mysql-user={USER}"),
        format!("--mysql-password={PASSWORD}"),
        format!("--mysql-db={DATABASE}"),
        "--mysql-ssl=off".into(),
        format!("--tables={tables}"),
        format!("--table-size={rows}"),
    ]
}

impl MariaDb {
    /// `sysbench <workload> prepare` directly against this server (the oltp workloads share
    /// their tables, so one prepare serves them all).
    pub fn sysbench_prepare(&self, tables: u32, rows: u32) -> anyhow::Result<()> {
        let mut cmd = Command::new("sysbench");
        cmd.args(sysbench_args("oltp_read_only", self.port, tables, rows))
            .arg("prepare");
        let out = run_bounded(&mut cmd, Duration::from_secs(300))?;
        if !out.status.success() {
            bail!("sysbench prepare failed: {}{}", out.stdout, out.stderr);
        }
        Ok(())
    }
}

/// Runs `cmd` (`sysbench`, or a wrapper exec-ing it) as `sysbench <workload> run` against
/// 127.0.0.1:`port` with `threads` threads for `seconds` seconds, and parses its report.
pub fn sysbench_run(
    mut cmd: Command,
    workload: &str,
    port: u16,
    tables: u32,
    rows: u32,
    threads: u32,
    seconds: u32,
) -> anyhow::Result<Sysbench> {
    cmd.args(sysbench_args(workload, port, tables, rows))
        .arg(format!("--threads={threads}"))
        .arg(format!("--time={seconds}"))
        .args(["--report-interval=0", "run"]);
    let out = run_bounded(&mut cmd, Duration::from_secs(u64::from(seconds) + 60))?;
    if !out.status.success() {
        bail!("sysbench {workload} failed: {}{}", out.stdout, out.stderr);
    }
    // "    transactions:                        1234   (123.40 per sec.)"
    let field = |name: &str| -> anyhow::Result<(u64, f64)> {
        let line = out
            .stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no `{name}` line in sysbench's report:\n{}", out.stdout))?;
        let mut words = line[name.len()..].split_whitespace();
        let count = words.next().and_then(|w| w.parse().ok());
        let rate = words
            .next()
            .and_then(|w| w.trim_start_matches('(').parse().ok());
        count
            .zip(rate)
            .with_context(|| format!("cannot read sysbench's `{line}`"))
    };
    let (transactions, tps) = field("transactions:")?;
    let (queries, _) = field("queries:")?;
    let (ignored_errors, _) = field("ignored errors:")?;
    Ok(Sysbench {
        transactions,
        tps,
        queries,
        ignored_errors,
    })
}
