//! A real `sluice-collector` for end-to-end tests: `init` in a temporary directory, `serve` on
//! a free loopback port (stopped with SIGTERM when dropped or on [`Collector::stop`], and
//! restartable on the same port and directory), its admin commands, and the `sluice` read
//! commands against its store.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{Output, free_port, run_bounded, sluice_bin};

/// The `sluice-collector` binary next to `sluice`.
pub fn collector_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_COLLECTOR_BIN") {
        return PathBuf::from(p);
    }
    let bin = sluice_bin().with_file_name("sluice-collector");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --workspace --bins`) or set SLUICE_COLLECTOR_BIN",
        bin.display()
    );
    bin
}

/// Options of `serve`.
#[derive(Default, Clone)]
pub struct ServeOptions {
    /// `--retention-secs` (hidden flag; `--retention-days` in production).
    pub retention_secs: Option<u64>,
    /// `--retention-interval-secs`.
    pub retention_interval_secs: Option<u64>,
}

pub struct Collector {
    /// Holds the collector's directory unless it was given (`init_at`).
    pub dir: Option<tempfile::TempDir>,
    home: PathBuf,
    /// Whether `serve` ever started (agents may have enrolled with its address since).
    started: bool,
    pub port: u16,
    pub options: ServeOptions,
    /// Serve in this network namespace, on this address (default: the host's 127.0.0.1).
    netns: Option<(String, std::net::Ipv4Addr)>,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Collector {
    /// `sluice-collector init` in a new temporary directory (not serving yet).
    pub fn init() -> anyhow::Result<Collector> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-collector-")
            .tempdir()?;
        let home = dir.path().join("collector");
        Collector::init_in(Some(dir), home)
    }

    /// `sluice-collector init` in `home` (which must not exist yet), kept after the handle
    /// drops.
    pub fn init_at(home: PathBuf) -> anyhow::Result<Collector> {
        Collector::init_in(None, home)
    }

    /// `sluice-collector init` in a new temporary directory, to serve inside network namespace
    /// `ns` on `addr` (see [`crate::netns::Topology`]).
    pub fn init_in_netns(ns: &str, addr: std::net::Ipv4Addr) -> anyhow::Result<Collector> {
        let dir = tempfile::Builder::new()
            .prefix("sluice-collector-")
            .tempdir()?;
        let home = dir.path().join("collector");
        Collector::init_with(Some(dir), home, Some((ns.to_string(), addr)))
    }

    fn init_in(dir: Option<tempfile::TempDir>, home: PathBuf) -> anyhow::Result<Collector> {
        Collector::init_with(dir, home, None)
    }

    fn init_with(
        dir: Option<tempfile::TempDir>,
        home: PathBuf,
        netns: Option<(String, std::net::Ipv4Addr)>,
    ) -> anyhow::Result<Collector> {
        let port = listen_port();
        let c = Collector {
            dir,
            home,
            started: false,
            port,
            options: ServeOptions::default(),
            netns,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
        };
        let home = c.home();
        let out = run_bounded(
            Command::new(collector_bin())
                .args(["init", "--dir"])
                .arg(&home)
                .args(["--listen", &c.addr()]),
            Duration::from_secs(30),
        )?;
        if !out.status.success() {
            bail!("sluice-collector init failed: {}", out.stderr);
        }
        Ok(c)
    }

    /// The collector directory (`init` creates it).
    pub fn home(&self) -> PathBuf {
        self.home.clone()
    }

    pub fn addr(&self) -> String {
        match &self.netns {
            Some((_, ip)) => format!("{ip}:{}", self.port),
            None => format!("127.0.0.1:{}", self.port),
        }
    }

    pub fn store(&self) -> PathBuf {
        self.home().join("store")
    }

    /// Starts `serve` and waits (bounded) until it says it is ready. Its port can be taken by
    /// another test's connection between `init` and here: before any agent enrolled (first
    /// start) another port is chosen; later the same port is tried again (bounded).
    pub fn start(&mut self) -> anyhow::Result<()> {
        for attempt in 0..5 {
            match self.try_start() {
                Err(e) if attempt < 4 && e.to_string().contains("Address already in use") => {
                    if !self.started {
                        self.port = listen_port();
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                Ok(()) => {
                    self.started = true;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        bail!("sluice-collector could not listen after 5 attempts")
    }

    fn try_start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let mut cmd = Command::new(collector_bin());
        cmd.args(["serve", "--dir"])
            .arg(self.home())
            .args(["--listen", &self.addr()]);
        if let Some(s) = self.options.retention_secs {
            cmd.args(["--retention-secs", &s.to_string()]);
        }
        if let Some(s) = self.options.retention_interval_secs {
            cmd.args(["--retention-interval-secs", &s.to_string()]);
        }
        cmd.env("RUST_LOG", "info,sluice_collector=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((ns, _)) = &self.netns {
            cmd = crate::netns::in_netns(ns, &cmd);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().context("cannot start sluice-collector serve")?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        if let Some(stderr) = child.stderr.take() {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("sluice-collector ready") {
                        let _ = tx.send(());
                    }
                    if std::env::var_os("SLUICE_TEST_LOG").is_some() {
                        eprintln!("[collector] {line}");
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                std::thread::sleep(Duration::from_millis(200));
                bail!("sluice-collector exited ({status}); log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "sluice-collector not ready within 30 s; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGTERM, bounded wait, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("sluice-collector did not stop within 10 s of SIGTERM: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `sluice-collector ARGS --dir HOME`, bounded.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<Output> {
        run_bounded(
            Command::new(collector_bin())
                .args(args)
                .arg("--dir")
                .arg(self.home()),
            Duration::from_secs(30),
        )
    }

    /// A one-time enrollment token for `agent`.
    pub fn token(&self, agent: &str, ttl: &str) -> anyhow::Result<String> {
        let out = self.admin(&["token", "--agent", agent, "--ttl", ttl])?;
        if !out.status.success() {
            bail!("sluice-collector token failed: {}", out.stderr);
        }
        Ok(out.stdout.trim().to_string())
    }

    /// `BIN enroll --collector ADDR --token TOKEN --config CONFIG`: an agent (whose config
    /// is `config`) enrolling with this collector; the caller adds environment and runs it.
    pub fn enroll_command(&self, bin: &Path, token: &str, config: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.args([
            "enroll",
            "--collector",
            &self.addr(),
            "--token",
            token,
            "--config",
        ])
        .arg(config);
        cmd
    }

    /// The certificate's fingerprint.
    pub fn fingerprint(&self) -> anyhow::Result<String> {
        let out = self.admin(&["fingerprint"])?;
        if !out.status.success() {
            bail!("sluice-collector fingerprint failed: {}", out.stderr);
        }
        Ok(out.stdout.trim().to_string())
    }

    /// `sluice ARGS --journal STORE` (read-only, works while serving).
    pub fn read(&self, args: &[&str]) -> anyhow::Result<Output> {
        read_store(&self.store(), args)
    }

    /// `sluice sessions --json` on the store, parsed (empty before the first ingest).
    pub fn sessions(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        if !self.store().join("CURRENT").exists() {
            return Ok(Vec::new());
        }
        let out = self.read(&["sessions", "--json"])?;
        if !out.status.success() {
            bail!("sluice sessions failed: {}", out.stderr);
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// `sluice ARGS --journal DIR`, bounded.
pub fn read_store(dir: &Path, args: &[&str]) -> anyhow::Result<Output> {
    run_bounded(
        Command::new(sluice_bin())
            .args(args)
            .arg("--journal")
            .arg(dir),
        Duration::from_secs(60),
    )
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback port below the kernel's ephemeral range, so that no outgoing connection of
/// a test running alongside takes it while the collector is stopped.
fn listen_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u16>().ok())
        })
        .unwrap_or(32768);
    let (from, to) = (20_000u16, low.max(20_100));
    let span = u64::from(to - from);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(17);
    for i in 0..200u64 {
        let port = from + ((seed.wrapping_add(i.wrapping_mul(7919))) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}
