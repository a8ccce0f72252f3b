//! `sluice doctor`: what the agent needs on this host, checked one by one, each reported as
//! `ok: CHECK: detail` or `problem: CHECK: what is wrong (what to do)`. `sluice agent` runs the
//! same checks at start ([`Scope::agent`]) and refuses to start with the same sentences when a
//! [`Severity::Required`] check fails; an [`Severity::Advisory`] one (a full disk ahead, an
//! unreachable backend or collector) is logged as a warning and the agent starts anyway, since
//! an agent that is down protects nothing.
//!
//! ```text
//! kernel            /proc/sys/kernel/osrelease >= 5.11 (every hook, BPF memory without memlock)
//! hook <section>    one line per eBPF program: its kernel minimum, and with `probe` the real
//!                   thing: intercept::Interceptor::attach on an empty throwaway cgroup and a
//!                   throwaway pin dir (load, verifier, attach, pin), then detach and remove both
//! cgroup2           intercept::cgroup2_root() and the attach cgroup hold cgroup.controllers
//! bpffs             bpf_pin_dir (or its parent) is on a bpf file system
//! capabilities      CapEff of /proc/self/status holds CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON
//! lockdown          /sys/kernel/security/lockdown (the programs use no helper it blocks)
//! journal           journal_dir (or the ancestor it will be created in) takes a file; free
//!                   space vs spool_max_bytes
//! collector         [shipper]'s destination (or the enrollment file's) answers a TCP connect
//! target <name>     each backend answers a TCP connect dialed with upstream_mark (so a running
//!                   agent does not redirect the check into itself)
//! ```
//!
//! It never changes the host beyond the probe's throwaway cgroup and pins, which it removes,
//! and a probe file in the journal directory, which it removes. Discovery (the cgroup2 mount,
//! cgroup ids) and loading are intercept's and config's, never copied here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Config, TargetMatch};
use crate::intercept::{self, InterceptConfig, InterceptError, Interceptor};

/// The eBPF programs, in the order `intercept` loads and attaches them, with the kernel that
/// introduced what each one uses.
const HOOKS: &[Hook] = &[
    Hook::new("sluice_connect4", "cgroup/connect4", (4, 17)),
    Hook::new("sluice_connect6", "cgroup/connect6", (4, 17)),
    Hook::new("sluice_sockops", "sockops", (4, 13)),
    Hook::new("sluice_getpeername4", "cgroup/getpeername4", (5, 8)),
    Hook::new("sluice_getpeername6", "cgroup/getpeername6", (5, 8)),
    Hook::new("sluice_sock_release", "cgroup/sock_release", (5, 9)),
];

/// Every hook, plus BPF memory charged to the cgroup instead of RLIMIT_MEMLOCK (the agent does
/// not raise that limit), plus `bpf_ktime_get_boot_ns` (5.8).
const MIN_KERNEL: (u32, u32) = (5, 11);

/// What the agent's eBPF side needs: load programs and maps (CAP_BPF), attach to cgroups and
/// set SO_MARK on upstream sockets (CAP_NET_ADMIN), the programs' pointer and helper use
/// (CAP_PERFMON). The kernel also grants the first and the last to CAP_SYS_ADMIN
/// (`bpf_capable()`, `perfmon_capable()`), as on kernels before 5.8.
pub const CAPABILITIES: &[Capability] = &[
    Capability::new("CAP_NET_ADMIN", 12, false),
    Capability::new("CAP_PERFMON", 38, true),
    Capability::new("CAP_BPF", 39, true),
];

const CAP_SYS_ADMIN: u32 = 21;

pub struct Capability {
    pub name: &'static str,
    bit: u32,
    /// CAP_SYS_ADMIN stands in for it.
    or_sys_admin: bool,
}

impl Capability {
    const fn new(name: &'static str, bit: u32, or_sys_admin: bool) -> Capability {
        Capability {
            name,
            bit,
            or_sys_admin,
        }
    }

    fn held(&self, effective: u64) -> bool {
        let has = |bit: u32| effective & (1u64 << bit) != 0;
        has(self.bit) || (self.or_sys_admin && has(CAP_SYS_ADMIN))
    }
}

struct Hook {
    program: &'static str,
    section: &'static str,
    since: (u32, u32),
}

impl Hook {
    const fn new(program: &'static str, section: &'static str, since: (u32, u32)) -> Hook {
        Hook {
            program,
            section,
            since,
        }
    }
}

/// Whether a failed check stops `sluice agent` from starting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The agent cannot do its job without it: it refuses to start.
    Required,
    /// Worth fixing, but the agent starts (and logs the sentence as a warning).
    Advisory,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Problem { what: String, todo: String },
}

#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub severity: Severity,
    pub outcome: Outcome,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            severity: Severity::Required,
            outcome: Outcome::Ok(detail.into()),
        }
    }

    fn problem(name: impl Into<String>, what: impl Into<String>, todo: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            severity: Severity::Required,
            outcome: Outcome::Problem {
                what: what.into(),
                todo: todo.into(),
            },
        }
    }

    fn advisory(mut self) -> Check {
        self.severity = Severity::Advisory;
        self
    }

    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Ok(_))
    }

    /// `ok: NAME: detail` or `problem: NAME: what (todo)`: the sentence both `sluice doctor`
    /// and `sluice agent` print.
    pub fn line(&self) -> String {
        match &self.outcome {
            Outcome::Ok(detail) => format!("ok: {}: {detail}", self.name),
            Outcome::Problem { what, todo } => format!("problem: {}: {what} ({todo})", self.name),
        }
    }
}

/// Which checks to run.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    /// The eBPF side: kernel, hooks, cgroup2, bpffs, capabilities, lockdown.
    pub ebpf: bool,
    /// Load and attach the programs on a throwaway cgroup (needs a writable cgroup2 root).
    pub probe: bool,
    /// Dial the collector and every target's backend.
    pub network: bool,
}

impl Scope {
    /// `sluice doctor`: everything, the probe included.
    pub fn doctor() -> Scope {
        Scope {
            ebpf: true,
            probe: true,
            network: true,
        }
    }

    /// `sluice agent` at start: no probe (the real attach follows at once, and under its unit
    /// the cgroup tree is read-only); `--no-ebpf` leaves out the eBPF side.
    pub fn agent(no_ebpf: bool) -> Scope {
        Scope {
            ebpf: !no_ebpf,
            probe: false,
            network: true,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.checks.iter().all(Check::is_ok)
    }

    /// The failed checks that stop the agent.
    pub fn blocking(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| !c.is_ok() && c.severity == Severity::Required)
    }

    /// The failed checks the agent only warns about.
    pub fn advisories(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| !c.is_ok() && c.severity == Severity::Advisory)
    }

    /// One line per check.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&c.line());
            out.push('\n');
        }
        out
    }
}

/// Runs the checks of `scope` against `config` on this host.
pub async fn run(config: &Config, scope: Scope) -> Report {
    let mut checks = Vec::new();
    if scope.ebpf {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let release = release.trim();
        let version = parse_release(release);
        checks.push(kernel(release, version));
        let probe = if scope.probe {
            Some(probe(config))
        } else {
            None
        };
        checks.extend(hooks(release, version, probe));
        checks.push(cgroup2(config));
        checks.push(bpffs(&config.agent.bpf_pin_dir));
        checks.push(capabilities(&effective_capabilities()));
        checks.push(lockdown(
            std::fs::read_to_string("/sys/kernel/security/lockdown").ok(),
        ));
    }
    checks.push(journal_writable(&config.agent.journal_dir));
    checks.push(journal_space(
        &config.agent.journal_dir,
        config.agent.spool_max_bytes,
    ));
    if scope.network {
        checks.push(collector(config).await);
        checks.extend(targets(config, scope.ebpf).await);
    }
    Report { checks }
}

/// `6.1.0-18-amd64` -> (6, 1).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel(release: &str, version: Option<(u32, u32)>) -> Check {
    let (want_major, want_minor) = MIN_KERNEL;
    match version {
        Some(v) if v >= MIN_KERNEL => Check::ok(
            "kernel",
            format!("{release} (the agent needs {want_major}.{want_minor} or later)"),
        ),
        Some(_) => Check::problem(
            "kernel",
            format!("kernel {release} is older than {want_major}.{want_minor}"),
            format!(
                "boot a kernel {want_major}.{want_minor} or later, e.g. Debian 12's 6.1: older ones lack the hooks below or charge BPF memory to RLIMIT_MEMLOCK"
            ),
        ),
        None => Check::problem(
            "kernel",
            format!("cannot read the kernel version (/proc/sys/kernel/osrelease: {release:?})"),
            "mount /proc",
        ),
    }
}

/// One check per hook: the kernel's version, and the probe's verdict when it ran.
fn hooks(
    release: &str,
    version: Option<(u32, u32)>,
    probe: Option<Result<(), InterceptError>>,
) -> Vec<Check> {
    // The program the probe failed at: every one before it loaded and attached.
    let failed_at = match &probe {
        Some(Err(e)) => Some(failed_program(e)),
        _ => None,
    };
    // A failure before any program (the object's maps, the throwaway cgroup) is one problem,
    // not six.
    if let (Some(Err(e)), Some(None)) = (&probe, failed_at) {
        return vec![Check::problem(
            "hooks",
            format!("not probed: {}", crate::error_chain(e)),
            "see the capabilities, cgroup2 and bpffs lines; run `sluice doctor` as root",
        )];
    }
    let mut reached = true;
    HOOKS
        .iter()
        .map(|hook| {
            let name = format!("hook {}", hook.section);
            let (major, minor) = hook.since;
            if version.is_some_and(|v| v < hook.since) {
                return Check::problem(
                    name,
                    format!("kernel {release} has no {} (added in {major}.{minor})", hook.section),
                    format!("boot a kernel {major}.{minor} or later"),
                );
            }
            match (&probe, failed_at) {
                (None, _) => Check::ok(name, format!("kernel {major}.{minor} or later")),
                (Some(Ok(())), _) => Check::ok(
                    name,
                    "loaded, verified and attached (to an empty throwaway cgroup)",
                ),
                (Some(Err(e)), Some(Some(at))) if reached && at == hook.program => {
                    reached = false;
                    Check::problem(
                        name,
                        format!("cannot load or attach it: {}", crate::error_chain(e)),
                        "see the problems below (capabilities, lockdown, cgroup2); a kernel built without CONFIG_CGROUP_BPF has no such hook",
                    )
                }
                (Some(Err(_)), Some(Some(_))) if reached => Check::ok(
                    name,
                    "loaded, verified and attached (to an empty throwaway cgroup)",
                ),
                (Some(Err(_)), _) => Check::problem(
                    name,
                    "not loaded: the probe stopped at an earlier hook",
                    "fix the hook reported above",
                ),
            }
        })
        .collect()
}

/// The program an attach error names, if it names one.
fn failed_program(e: &InterceptError) -> Option<&'static str> {
    match e {
        InterceptError::Program { program, .. }
        | InterceptError::Attach { program, .. }
        | InterceptError::Link { program, .. }
        | InterceptError::Pin { program, .. }
        | InterceptError::MissingProgram { program } => Some(program),
        _ => None,
    }
}

/// Loads and attaches every program on a new, empty cgroup with a throwaway pin directory,
/// then detaches and removes both. Nothing is redirected: no process is in that cgroup and
/// there are no targets.
fn probe(config: &Config) -> Result<(), InterceptError> {
    let root = intercept::cgroup2_root()?;
    let tag = format!("sluice-doctor-{}", std::process::id());
    let cgroup = root.join(&tag);
    std::fs::create_dir(&cgroup).map_err(|source| InterceptError::OpenCgroup {
        path: cgroup.clone(),
        source,
    })?;
    let pin_dir = config
        .agent
        .bpf_pin_dir
        .parent()
        .map_or_else(|| PathBuf::from(&tag), |p| p.join(&tag));
    let cfg = InterceptConfig {
        cgroup: cgroup.clone(),
        proxy_port: config.agent.proxy_listen.port(),
        mark: config.agent.upstream_mark,
        exempt_cgroup_id: None,
        pin_dir: pin_dir.clone(),
    };
    let result = Interceptor::attach(&cfg, &[]).and_then(Interceptor::detach);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&pin_dir);
    }
    let _ = std::fs::remove_dir(&cgroup);
    result
}

/// The cgroup2 mount (found as intercept finds it) and the cgroup the agent attaches to are
/// real cgroup v2 directories (a cgroup2 directory always holds `cgroup.controllers`; a file
/// system mounted over it does not).
fn cgroup2(config: &Config) -> Check {
    let root = match intercept::cgroup2_root() {
        Ok(root) => root,
        Err(e) => {
            return Check::problem(
                "cgroup2",
                crate::error_chain(&e),
                "mount the cgroup v2 hierarchy: mount -t cgroup2 none /sys/fs/cgroup (or boot with systemd.unified_cgroup_hierarchy=1)",
            );
        }
    };
    let attach = config.agent.cgroup.clone().unwrap_or_else(|| root.clone());
    for dir in [&root, &attach] {
        if !dir.join("cgroup.controllers").is_file() {
            return Check::problem(
                "cgroup2",
                format!(
                    "{} is not a cgroup v2 directory: something is mounted over it, or it does not exist",
                    dir.display()
                ),
                "mount the cgroup v2 hierarchy there, or set agent.cgroup to a cgroup v2 directory",
            );
        }
    }
    Check::ok(
        "cgroup2",
        format!(
            "mounted at {}, attaching to {}",
            root.display(),
            attach.display()
        ),
    )
}

fn is_fs(path: &Path, magic: nix::sys::statfs::FsType) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

/// The pin directory is on bpffs, or will be created on one (the agent mounts bpffs at
/// /sys/fs/bpf itself when it is missing there, as `intercept` does at start).
fn bpffs(pin_dir: &Path) -> Check {
    let on = if pin_dir.exists() {
        pin_dir
    } else {
        pin_dir.parent().unwrap_or(pin_dir)
    };
    let standard = Path::new(crate::intercept::BPFFS);
    if is_fs(on, nix::sys::statfs::BPF_FS_MAGIC) {
        Check::ok("bpffs", format!("{} is on bpffs", on.display()))
    } else if on == standard {
        Check::ok(
            "bpffs",
            format!(
                "{} is not mounted yet; the agent mounts bpffs there at start",
                standard.display()
            ),
        )
    } else {
        Check::problem(
            "bpffs",
            format!(
                "{} is not on a bpf file system, so the agent cannot pin its programs (bpf_pin_dir = {})",
                on.display(),
                pin_dir.display()
            ),
            format!(
                "mount it: mount -t bpf bpf {} (systemd does at boot), or set agent.bpf_pin_dir under a bpffs",
                on.display()
            ),
        )
    }
}

/// The effective capability set, from `/proc/self/status` (0 if unreadable).
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn capabilities(effective: &u64) -> Check {
    let missing: Vec<&str> = CAPABILITIES
        .iter()
        .filter(|c| !c.held(*effective))
        .map(|c| c.name)
        .collect();
    let all: Vec<&str> = CAPABILITIES.iter().map(|c| c.name).collect();
    if missing.is_empty() {
        Check::ok("capabilities", all.join(", "))
    } else {
        Check::problem(
            "capabilities",
            format!("missing {}", missing.join(", ")),
            format!(
                "run the agent as root, or with exactly {} as the sluice.service unit does",
                all.join(" ")
            ),
        )
    }
}

/// `none [integrity] confidentiality`: the programs call no helper either mode blocks (no
/// kernel memory reads, no user memory writes), so any mode is fine; it is reported so a
/// person reading the output knows.
fn lockdown(text: Option<String>) -> Check {
    match text {
        None => Check::ok(
            "lockdown",
            "no lockdown (/sys/kernel/security/lockdown absent)",
        ),
        Some(text) => {
            let mode = text
                .split_whitespace()
                .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
                .unwrap_or("unknown")
                .to_string();
            Check::ok(
                "lockdown",
                format!("{mode} (the programs use no helper lockdown blocks)"),
            )
        }
    }
}

/// The journal directory, or the nearest ancestor it will be created in.
fn existing_ancestor(dir: &Path) -> Option<&Path> {
    dir.ancestors().find(|p| p.is_dir())
}

/// A file can be created (and is removed again) where the journal lives.
fn journal_writable(dir: &Path) -> Check {
    let Some(at) = existing_ancestor(dir) else {
        return Check::problem(
            "journal",
            format!("no directory of {} exists", dir.display()),
            "set agent.journal_dir to an absolute path",
        );
    };
    let probe = at.join(format!(".sluice-doctor-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            let detail = if at == dir {
                format!("{} is writable", dir.display())
            } else {
                format!("{} will be created in {}", dir.display(), at.display())
            };
            Check::ok("journal", detail)
        }
        Err(e) => Check::problem(
            "journal",
            format!("cannot write in {}: {e}", at.display()),
            "make it writable by the agent (the sluice.service unit's StateDirectory is /var/lib/sluice), or set agent.journal_dir",
        ),
    }
}

fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

/// Free space on the journal's file system vs `spool_max_bytes`: with less, the disk fills
/// before the spool limit refuses new sessions.
fn journal_space(dir: &Path, spool_max: u64) -> Check {
    let Some(at) = existing_ancestor(dir) else {
        return Check::problem(
            "journal disk",
            format!("no directory of {} exists", dir.display()),
            "set agent.journal_dir to an absolute path",
        )
        .advisory();
    };
    let free = match nix::sys::statvfs::statvfs(at) {
        Ok(s) => s.blocks_available().saturating_mul(s.fragment_size()),
        Err(e) => {
            return Check::problem(
                "journal disk",
                format!("cannot read the free space of {}: {e}", at.display()),
                "check the file system",
            )
            .advisory();
        }
    };
    if free >= spool_max {
        Check::ok(
            "journal disk",
            format!("{} free, spool_max_bytes is {}", gib(free), gib(spool_max)),
        )
    } else {
        Check::problem(
            "journal disk",
            format!(
                "{} free on the journal's file system ({}), less than spool_max_bytes ({}): the disk fills before the spool limit refuses sessions",
                gib(free),
                at.display(),
                gib(spool_max)
            ),
            "free space, give the journal its own file system, or lower agent.spool_max_bytes",
        )
        .advisory()
    }
}

const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

async fn collector(config: &Config) -> Check {
    let Some(shipper) = &config.shipper else {
        return Check::ok(
            "collector",
            "none configured ([shipper] absent): the journal stays on this host",
        );
    };
    let destination = match crate::ship::Destination::resolve(shipper, &config.agent) {
        Ok(d) => d,
        Err(e) => {
            return Check::problem(
                "collector",
                crate::error_chain(&e),
                "enroll this agent once: sluice enroll --token TOKEN (the collector's `token` command prints one)",
            )
            .advisory();
        }
    };
    let addr = destination.addr;
    let result = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await;
    match result {
        Ok(Ok(_)) => Check::ok("collector", format!("{addr} answers")),
        Ok(Err(e)) => Check::problem(
            "collector",
            format!("cannot reach {addr}: {e}"),
            "start sluice-collector there, or open the firewall; the agent spools meanwhile",
        )
        .advisory(),
        Err(_) => Check::problem(
            "collector",
            format!("{addr} did not answer within {DIAL_TIMEOUT:?}"),
            "check the address and the firewall; the agent spools meanwhile",
        )
        .advisory(),
    }
}

/// Each target's backend answers a TCP connect, dialed as the proxy dials (with `upstream_mark`
/// when the eBPF side is in scope, so a running agent lets the check through).
async fn targets(config: &Config, marked: bool) -> Vec<Check> {
    let targets = match config.targets() {
        Ok(t) => t,
        Err(e) => {
            return vec![Check::problem(
                "targets",
                crate::error_chain(&e),
                "fix the config (sluice check-config)",
            )];
        }
    };
    if targets.is_empty() {
        return vec![
            Check::problem(
                "targets",
                "the config protects no target",
                "add a [[target]] table",
            )
            .advisory(),
        ];
    }
    let mut out = Vec::new();
    for t in &targets {
        let name = format!("target {}", t.name);
        let Some(backend) = t.backend else {
            let detail = match t.matches {
                Some(TargetMatch::AnyAddress { port }) => {
                    format!("any address on port {port}: no one backend to dial")
                }
                _ => "no backend address to dial".to_string(),
            };
            out.push(Check::ok(name, detail));
            continue;
        };
        let mark = if marked {
            config.agent.upstream_mark
        } else {
            0
        };
        out.push(match dial(backend, mark).await {
            Ok(()) => Check::ok(name, format!("{backend} answers")),
            Err(e) => Check::problem(
                name,
                format!("cannot reach {backend}: {e}"),
                "start the database, or fix the target's match/backend; clients get a clear refusal meanwhile",
            )
            .advisory(),
        });
    }
    out
}

async fn dial(addr: SocketAddr, mark: u32) -> std::io::Result<()> {
    crate::proxy::dial_upstream(&crate::proxy::Addr::Tcp(addr), mark, DIAL_TIMEOUT)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_release("5.10.0"), Some((5, 10)));
        assert_eq!(parse_release("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(parse_release(""), None);
    }

    #[test]
    fn a_kernel_older_than_a_hook_is_a_problem_for_that_hook() {
        let checks = hooks("5.8.0", Some((5, 8)), None);
        let release = checks
            .iter()
            .find(|c| c.name == "hook cgroup/sock_release")
            .expect("sock_release line");
        assert!(!release.is_ok(), "{}", release.line());
        assert!(
            release.line().contains("added in 5.9"),
            "{}",
            release.line()
        );
        assert!(checks.iter().filter(|c| c.is_ok()).count() == HOOKS.len() - 1);
        assert!(!kernel("5.8.0", Some((5, 8))).is_ok());
    }

    #[test]
    fn missing_capabilities_are_named_with_what_to_do() {
        let all = CAPABILITIES.iter().fold(0u64, |acc, c| acc | 1 << c.bit);
        assert!(capabilities(&all).is_ok());
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON, not for CAP_NET_ADMIN.
        assert!(capabilities(&(1 << 12 | 1 << CAP_SYS_ADMIN)).is_ok());
        assert!(!capabilities(&(1 << CAP_SYS_ADMIN)).is_ok());
        let line = capabilities(&(all & !(1 << 39))).line();
        assert_eq!(
            line,
            "problem: capabilities: missing CAP_BPF (run the agent as root, or with exactly CAP_NET_ADMIN CAP_PERFMON CAP_BPF as the sluice.service unit does)"
        );
    }

    #[test]
    fn lockdown_mode_is_the_bracketed_word() {
        let line = lockdown(Some("none [integrity] confidentiality\n".into())).line();
        assert!(line.starts_with("ok: lockdown: integrity"), "{line}");
    }

    #[test]
    fn a_journal_under_a_missing_directory_is_checked_where_it_will_be_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = dir.path().join("a/b/journal");
        let check = journal_writable(&journal);
        assert!(check.is_ok(), "{}", check.line());
        assert!(
            check.line().contains("will be created in"),
            "{}",
            check.line()
        );
        assert!(!journal_space(&journal, u64::MAX).is_ok());
        assert_eq!(
            journal_space(&journal, u64::MAX).severity,
            Severity::Advisory
        );
    }
}
