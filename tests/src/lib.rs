//! The end-to-end harness: real PostgreSQL servers, real cgroups, the real `sluice` binary and
//! real clients, each in a temporary directory and on free loopback ports. Used by the tests in
//! `tests/tests/`, and by `cargo xtask demo` and `cargo xtask bench`.
//!
//! Everything started here is stopped when its handle drops (servers get SIGTERM, then SIGKILL
//! after a bounded wait; cgroups are removed), so a failing test leaves nothing running.
//! Every wait is bounded. Tests that need root call [`require_root`]: outside CI they print a
//! loud SKIPPED line and return; under `CI=true` they fail.

use std::io::{BufRead, BufReader};
use std::net::{Ipv6Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod collector;
pub mod lab;
pub mod mariadb;
pub mod netns;
pub mod oidc;
pub mod package;

/// The uid/gid intercepted clients run as in tests (`nobody`), so the recorded uid is not root's.
pub const CLIENT_UID: u32 = 65534;

/// True when running as root. Otherwise prints why the test is skipped, or panics under CI.
pub fn require_root(test: &str) -> bool {
    is_root()
        || skip(
            test,
            "needs root (eBPF, cgroups): run `sudo -E cargo xtask test`",
        )
}

/// A test that cannot run here: under `CI=true` it fails (panics) with `why`; otherwise it
/// prints a loud SKIPPED line and adds it to the file named by `SLUICE_SKIP_LOG` (which
/// `cargo xtask test` reads back and prints last, so a green run says what did not run).
/// Returns false, for `if !require_x() { return }`.
pub fn skip(test: &str, why: &str) -> bool {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test} cannot run and CI=true, refusing to skip: {why}");
    }
    // Straight to fd 2: the test harness captures `eprintln!` of passing tests.
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("\n*** SKIPPED {test}: {why} ***\n\n").as_bytes());
    if let Some(log) = std::env::var_os("SLUICE_SKIP_LOG")
        && let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
    {
        let _ = writeln!(file, "{test}\t{why}");
    }
    false
}

/// True when the effective uid is 0.
pub fn is_root() -> bool {
    // The effective uid, read from /proc so the harness needs no unsafe libc call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A free TCP port on 127.0.0.1 that is also free on [::1].
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = l.local_addr() else { continue };
        if TcpListener::bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())).is_ok() {
            return addr.port();
        }
    }
    panic!("no free loopback port found in 100 tries");
}

/// The directory holding PostgreSQL's server binaries (initdb, postgres, pg_ctl).
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "PostgreSQL is not installed (/usr/lib/postgresql missing): apt-get install postgresql",
        )?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions
        .pop()
        .context("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

/// A throwaway PostgreSQL server: initdb in a temp dir, trust auth, listening on 127.0.0.1 and
/// ::1 on a free port. Runs as the `postgres` OS user when started as root.
pub struct Postgres {
    pub port: u16,
    pub bin: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// Options for a test server beyond the defaults.
#[derive(Default, Clone)]
pub struct PgOptions {
    /// Serve TLS with this certificate and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// pg_hba.conf lines put before the default `trust` ones (e.g. SCRAM for one role).
    pub hba: Vec<String>,
    /// Run the server in this network namespace, listening on every address there (see
    /// [`netns::Topology`]; give `hba` lines for the clients' network).
    pub netns: Option<String>,
    /// Server settings, each passed as `-c` (e.g. `unix_socket_permissions=0700`).
    pub settings: Vec<String>,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        Postgres::start_with(PgOptions::default())
    }

    pub fn start_with(options: PgOptions) -> anyhow::Result<Postgres> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            // Mode 700 whatever the umask: only the server's user reaches its unix socket.
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .context("temp dir")?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock)?;
        let as_root = is_root();
        if as_root {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path()),
            )?;
        }
        let initdb = user_cmd(as_root, &bin.join("initdb"));
        run_ok(&mut initdb_args(initdb, &data))?;
        if !options.hba.is_empty() {
            let hba = data.join("pg_hba.conf");
            let old = std::fs::read_to_string(&hba)?;
            std::fs::write(&hba, format!("{}\n{old}", options.hba.join("\n")))?;
        }
        let mut tls_args = Vec::new();
        if let Some((cert, key)) = &options.tls {
            // The server wants its key owned by itself and private.
            let (c, k) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(cert, &c)?;
            std::fs::copy(key, &k)?;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
            if as_root {
                run_ok(
                    Command::new("chown")
                        .args(["postgres:postgres"])
                        .arg(&c)
                        .arg(&k),
                )?;
            }
            tls_args = vec![
                "-c".to_string(),
                "ssl=on".to_string(),
                "-c".to_string(),
                format!("ssl_cert_file={}", c.display()),
                "-c".to_string(),
                format!("ssl_key_file={}", k.display()),
            ];
        }
        let port = free_port();
        // In a network namespace the child is still the server itself (see netns::in_netns).
        let in_netns = |c: Command| match &options.netns {
            Some(ns) => netns::in_netns(ns, &c),
            None => c,
        };
        let mut postgres = in_netns(user_cmd(as_root, &bin.join("postgres")));
        let listen = if options.netns.is_some() {
            "listen_addresses=*"
        } else {
            "listen_addresses=127.0.0.1,::1"
        };
        postgres
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&sock)
            .args(["-c", listen, "-c", "fsync=off", "-c", "max_connections=200"])
            .args(&tls_args)
            .args(options.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.path().join("postgres.log"),
            )?));
        let child = postgres.spawn().context("cannot start postgres")?;
        let pg = Postgres {
            port,
            bin,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = in_netns(Command::new(pg.bin.join("pg_isready")))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(pg);
            }
            if Instant::now() > deadline {
                bail!("postgres did not become ready in 30 s; log:\n{}", pg.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.<port>`), inside a temp
    /// directory of mode 700 owned by the server's user: nobody else reaches the socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.socket_dir().join(format!(".s.PGSQL.{}", self.port))
    }

    /// The server's own address for clients.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Runs SQL directly (not intercepted: the test process is outside the test cgroup).
    pub fn sql(&self, sql: &str) -> anyhow::Result<String> {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
            ])
            .arg(self.port.to_string())
            .args(["-d", "postgres", "-c", sql])
            .output()?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn initdb_args(mut cmd: Command, data: &Path) -> Command {
    cmd.arg("-D")
        .arg(data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
    cmd.stdout(Stdio::null());
    cmd
}

/// A command run as the `postgres` OS user when we are root (PostgreSQL refuses root).
fn user_cmd(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, "postgres");
        }
    }
}

/// Sends SIGTERM, waits up to 10 s, then SIGKILL.
fn stop(mut child: Child, what: &str) {
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
    eprintln!("{what} did not stop within 10 s of SIGTERM: killing it");
    let _ = child.kill();
    let _ = child.wait();
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in info.lines() {
        // ... mount-point ... - fstype source options
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2")
            && let Some(mount) = left.split_whitespace().nth(4)
        {
            return Ok(PathBuf::from(mount));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo")
}

/// A cgroup created for one test and removed when dropped.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> anyhow::Result<Cgroup> {
        let path = cgroup2_root()?.join(format!("sluice-test-{name}-{}", std::process::id()));
        if path.exists() {
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// A command that moves itself into this cgroup, drops to `uid` (when given), then runs
    /// `program args...` (exec all the way, so pid and comm are the program's own).
    pub fn command(&self, uid: Option<u32>, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
            .arg(&self.path);
        if let Some(uid) = uid {
            // Not root's home: libpq, Java and friends look for files there.
            c.env("HOME", "/nonexistent");
            c.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        c.arg(program);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes that exited leave the cgroup on their own; give stragglers a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove cgroup {}", self.path.display());
    }
}

/// The `sluice` binary built from this workspace.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/sluice
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("sluice");
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build --workspace --bins`; `cargo xtask test` does) or set SLUICE_BIN",
        bin.display()
    );
    bin
}

/// A throwaway certificate authority (openssl CLI) and the certificates it issues, in a
/// temporary directory removed on drop.
pub struct TestCa {
    pub dir: tempfile::TempDir,
    /// The CA's certificate (PEM).
    pub cert: PathBuf,
    key: PathBuf,
}

impl TestCa {
    pub fn new() -> anyhow::Result<TestCa> {
        let dir = tempfile::Builder::new().prefix("sluice-ca-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let cert = dir.path().join("ca.crt");
        let key = dir.path().join("ca.key");
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "2", "-subj", "/CN=sluice throwaway CA"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null()),
        )?;
        Ok(TestCa { dir, cert, key })
    }

    /// A server certificate for `name` valid for 127.0.0.1, ::1 and localhost: (cert, key).
    pub fn issue(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let d = self.dir.path();
        let (cert, key, csr, ext) = (
            d.join(format!("{name}.crt")),
            d.join(format!("{name}.key")),
            d.join(format!("{name}.csr")),
            d.join(format!("{name}.ext")),
        );
        std::fs::write(
            &ext,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n",
        )?;
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                ])
                .args(["-subj", &format!("/CN={name}")])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr)
                .stderr(Stdio::null()),
        )?;
        run_ok(
            Command::new("openssl")
                .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
                .arg("-in")
                .arg(&csr)
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                .arg("-extfile")
                .arg(&ext)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null()),
        )?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        Ok((cert, key))
    }
}

/// Options for a test agent.
pub struct AgentOptions {
    pub cgroup: Option<PathBuf>,
    pub targets: Vec<String>,
    pub exempt_own_cgroup: bool,
    pub no_ebpf: bool,
    /// Run the agent itself inside this cgroup (to prove its upstream connects are exempt).
    pub run_in_cgroup: Option<PathBuf>,
    pub max_message_bytes: usize,
    /// bpffs pin directory (default: unique to this agent).
    pub pin_dir: Option<String>,
    /// The `sluice` binary (default: [`sluice_bin`]).
    pub bin: Option<PathBuf>,
    /// Where the journal goes (default: inside the agent's temp dir, removed with it).
    pub journal_dir: Option<PathBuf>,
    /// `agent.policy_dir` (default: none, every statement allowed).
    pub policy_dir: Option<PathBuf>,
    /// TOML appended after the targets (e.g. `[[identity]]` tables).
    pub extra_config: String,
    /// Lines added to the `[agent]` table (e.g. `approval_timeout_secs = 5`).
    pub agent_config: String,
    /// Environment variables for the agent process (e.g. a role's `password_env`).
    pub env: Vec<(String, String)>,
    /// Run the agent in this network namespace (see [`netns::Topology`]).
    pub netns: Option<String>,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            cgroup: None,
            targets: Vec::new(),
            exempt_own_cgroup: true,
            no_ebpf: false,
            run_in_cgroup: None,
            max_message_bytes: 16 << 20,
            pin_dir: None,
            bin: None,
            journal_dir: None,
            policy_dir: None,
            extra_config: String::new(),
            agent_config: String::new(),
            env: Vec::new(),
            netns: None,
        }
    }
}

/// A running `sluice agent` with its own config, journal and pin dir.
pub struct Agent {
    pub dir: tempfile::TempDir,
    /// The agent's control socket.
    pub socket: PathBuf,
    pub proxy_port: u16,
    pub config: PathBuf,
    bin: PathBuf,
    journal: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

/// A `[[target]]` table for a PostgreSQL target.
pub fn pg_target(name: &str, matches: &str) -> String {
    format!("[[target]]\nname = \"{name}\"\nprotocol = \"postgres\"\nmatch = \"{matches}\"\n")
}

/// Mounts bpffs at /sys/fs/bpf in the host's mount namespace unless it is there (as systemd
/// does at boot; a bare machine or container may lack it).
pub fn ensure_host_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    run_ok(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

impl Agent {
    pub fn start(options: AgentOptions) -> anyhow::Result<Agent> {
        let dir = tempfile::Builder::new().prefix("sluice-agent-").tempdir()?;
        // Clients running as other uids reach the control socket inside (but list nothing).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
        let socket = dir.path().join("agent.sock");
        let journal = options
            .journal_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("journal"));
        // The keys live beside the journal, so an agent restarted on it keeps them.
        let signing_key = journal.with_extension("signing.key");
        let encryption_key = journal.with_extension("data.key");
        let proxy_port = free_port();
        if options.netns.is_some() && !options.no_ebpf {
            // The agent would mount a missing bpffs inside its private mount namespace, where
            // the pins (and so the attached programs) die with it: mount it for the host first.
            ensure_host_bpffs()?;
        }
        let pin = options.pin_dir.clone().unwrap_or_else(|| {
            format!(
                "/sys/fs/bpf/sluice-test-{}-{proxy_port}",
                std::process::id()
            )
        });
        let mut text = format!(
            "[agent]\nproxy_listen = \"127.0.0.1:{proxy_port}\"\njournal_dir = \"{}\"\nbpf_pin_dir = \"{pin}\"\nexempt_own_cgroup = {}\nmax_message_bytes = {}\ncontrol_socket = \"{}\"\nsigning_key = \"{}\"\nencryption_key = \"{}\"\nunix_listen_dir = \"{}\"\n{}",
            journal.display(),
            options.exempt_own_cgroup,
            options.max_message_bytes,
            socket.display(),
            signing_key.display(),
            encryption_key.display(),
            // Each agent its own listener directory (the default, /run/sluice/unix, is one per
            // host).
            dir.path().join("unix").display(),
            options.agent_config,
        );
        if let Some(cg) = &options.cgroup {
            text.push_str(&format!("cgroup = \"{}\"\n", cg.display()));
        }
        if let Some(dir) = &options.policy_dir {
            text.push_str(&format!("policy_dir = \"{}\"\n", dir.display()));
        }
        for t in &options.targets {
            text.push_str(t);
        }
        text.push_str(&options.extra_config);
        let config = dir.path().join("sluice.toml");
        std::fs::write(&config, text)?;

        let bin = options.bin.clone().unwrap_or_else(sluice_bin);
        let program = |p: &dyn AsRef<std::ffi::OsStr>| match &options.netns {
            Some(ns) => netns::in_netns(ns, &Command::new(p)),
            None => Command::new(p),
        };
        let mut cmd = match &options.run_in_cgroup {
            Some(cg) => {
                let mut c = program(&"sh");
                c.arg("-c")
                    .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
                    .arg(cg)
                    .arg(&bin);
                c
            }
            None => program(&bin),
        };
        cmd.arg("agent").arg("--config").arg(&config);
        if options.no_ebpf {
            cmd.arg("--no-ebpf");
        }
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
        Agent::spawn(
            cmd,
            Agent {
                dir,
                socket,
                journal,
                proxy_port,
                config,
                bin,
                child: None,
                log: Arc::default(),
            },
        )
    }

    /// An agent started by `cmd` (which runs `bin agent --config config` its own way, e.g. as
    /// a systemd unit would) whose control socket, journal and proxy port are those given.
    pub fn start_command(
        cmd: Command,
        bin: PathBuf,
        config: PathBuf,
        socket: PathBuf,
        journal: PathBuf,
        proxy_port: u16,
    ) -> anyhow::Result<Agent> {
        let dir = tempfile::Builder::new().prefix("sluice-agent-").tempdir()?;
        Agent::spawn(
            cmd,
            Agent {
                dir,
                socket,
                journal,
                proxy_port,
                config,
                bin,
                child: None,
                log: Arc::default(),
            },
        )
    }

    /// Spawns `cmd` as `agent`'s process and waits (bounded) until it says it is ready.
    fn spawn(mut cmd: Command, mut agent: Agent) -> anyhow::Result<Agent> {
        cmd.env("RUST_LOG", "info,sluice=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("cannot start sluice agent")?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        if let Some(stderr) = child.stderr.take() {
            let log = agent.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("sluice agent ready") {
                        let _ = tx.send(());
                    }
                    if std::env::var_os("SLUICE_TEST_LOG").is_some() {
                        eprintln!("[agent] {line}");
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        agent.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return Ok(agent);
            }
            if let Some(c) = agent.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                std::thread::sleep(Duration::from_millis(200));
                bail!(
                    "sluice agent exited ({status}) before it was ready; log:\n{}",
                    agent.log()
                );
            }
            if Instant::now() > deadline {
                bail!("sluice agent not ready within 30 s; log:\n{}", agent.log());
            }
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether the agent's log contains `needle` within 10 s (the log is read by a thread, so
    /// a line may arrive a moment after what caused it).
    pub fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every file of the journal directory, as bytes (to look for what must not be there).
    pub fn journal_bytes(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(self.journal_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if p.is_file() {
                all.extend(std::fs::read(p).unwrap_or_default());
            }
        }
        all
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.journal.clone()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the agent with SIGTERM and waits for it (bounded).
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop(child, "sluice agent");
        }
    }

    /// Runs a `sluice` read command against this agent's journal and returns its stdout.
    pub fn read(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--journal")
            .arg(self.journal_dir())
            .output()?;
        if !out.status.success() {
            bail!(
                "sluice {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `sluice ARGS --socket <this agent's socket>` as `uid` (root when None), bounded.
    pub fn control(&self, uid: Option<u32>, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "--",
                ])
                .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(args).arg("--socket").arg(&self.socket);
        run_bounded(&mut cmd, Duration::from_secs(30))
    }

    /// `sluice sessions --json`, parsed.
    pub fn sessions(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = self.read(&["sessions", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Every ended session's end reason, oldest session first.
    pub fn end_reasons(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .sessions()?
            .iter()
            .filter_map(|x| x["end_reason"].as_str().map(str::to_string))
            .collect())
    }

    /// How many sessions the journal holds, and how many statements they ran.
    pub fn recorded(&self) -> anyhow::Result<(usize, u64)> {
        let sessions = self.sessions()?;
        let statements = sessions
            .iter()
            .filter_map(|s| s["statements"].as_u64())
            .sum();
        Ok((sessions.len(), statements))
    }

    /// `sluice export --format jsonl`, parsed.
    pub fn export(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = self.read(&["export", "--format", "jsonl"])?;
        text.lines()
            .map(|l| serde_json::from_str(l).map_err(anyhow::Error::from))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Output of a finished client process.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub pid: u32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The process's stdout; panics with both streams when it did not succeed.
    pub fn ok(&self) -> &str {
        assert!(
            self.status.success(),
            "client failed ({}): {}\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }
}

/// Runs `cmd` to completion within `timeout`, killing it after that.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out?;
            Ok(Output {
                status: out.status,
                pid,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            bail!("{cmd:?} did not finish within {timeout:?}: killed")
        }
    }
}

/// psql arguments for an unattended run against `host:port` as `postgres`.
pub fn psql_args(host: &str, port: u16, sql: &str) -> Vec<String> {
    vec![
        "-X".into(),
        "-A".into(),
        "-t".into(),
        "-v".into(),
        "ON_ERROR_STOP=1".into(),
        "-h".into(),
        host.into(),
        "-p".into(),
        port.to_string(),
        "-U".into(),
        "postgres".into(),
        "-d".into(),
        "postgres".into(),
        "-c".into(),
        sql.into(),
    ]
}

/// psql arguments running each of `sql` as its own `-c` in one session against
/// 127.0.0.1:`port` as `postgres`, continuing after errors.
pub fn psql_session_args(port: u16, sql: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "-X",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=0",
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-p",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(port.to_string());
    for s in sql {
        args.push("-c".into());
        args.push(s.to_string());
    }
    args
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// `value` and the transformed forms a copied value could be read back in (reversed, base64,
/// hex in both cases): what a test greps for to show a masked value did not get out.
pub fn leak_forms(value: &str) -> Vec<String> {
    use base64::Engine as _;
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    vec![
        value.to_string(),
        value.chars().rev().collect(),
        base64::engine::general_purpose::STANDARD.encode(value),
        hex.to_uppercase(),
        hex,
    ]
}

/// The first of `values`' [`leak_forms`] found in `text`, as (value, form).
pub fn find_leak(text: &str, values: &[&str]) -> Option<(String, String)> {
    values.iter().find_map(|v| {
        leak_forms(v)
            .into_iter()
            .find(|f| text.contains(f.as_str()))
            .map(|f| (v.to_string(), f))
    })
}
