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

use crate::{free_port, is_root, run_ok, stop};

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
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} needs MariaDB and CI=true: apt-get install mariadb-server mariadb-client");
    }
    eprintln!(
        "\n*** SKIPPED {test}: MariaDB is not installed \
         (apt-get install mariadb-server mariadb-client). ***\n"
    );
    false
}

/// A Python with mysql-connector-python (pure-Python protocol), in a venv under the target
/// dir, made on first use (pip: needs the network once). None when it cannot be made.
pub fn connector_python() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let venv = target.join("mysql-venv");
    let python = venv.join("bin/python");
    let works = |p: &PathBuf| {
        Command::new(p)
            .args(["-c", "import mysql.connector"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if works(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "mysql-connector-python==26.10.0"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    (made && works(&python)).then_some(python)
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
