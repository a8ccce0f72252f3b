//! Hosts made of Linux network namespaces, for tests and `cargo xtask lab` that need a backend
//! on another host reached over a routed link: `bastion` -- `router` -- `db`, linked by veth
//! pairs on the benchmarking range 198.18.0.0/15 (RFC 2544), which no real network uses.
//!
//! ```text
//!  bastion            router                     db
//!  eth0 198.18.1.2 -- eth0 198.18.1.1
//!                     eth1 198.18.2.1 ------- eth0 198.18.2.2 (+ 198.18.2.3, a failover)
//! ```
//!
//! Invariants:
//! - Only namespaces this module creates get addresses, and only from 198.18.0.0/15 and
//!   loopback; the host's own interfaces, routes, /etc/hosts and resolver are never touched.
//!   Each namespace's name resolution is `/etc/netns/<ns>/hosts` (and a `resolv.conf` naming
//!   no reachable server), which [`in_netns`] bind-mounts over /etc's in a private mount
//!   namespace for the processes it starts (and only for them).
//! - [`Topology`] is the guard: dropping it (on success, error or panic) kills what runs in
//!   its namespaces, deletes them (which deletes their veths) and their /etc/netns directories.
//! - Every command is bounded in time ([`crate::run_bounded`]).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// The bastion's address on its link to the router.
pub const BASTION: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The router's address on the bastion's link.
pub const ROUTER_BASTION: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The router's address on the db's link.
pub const ROUTER_DB: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The database host's address.
pub const DB: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// A second address of the database host, where a failover moves `db`.
pub const DB_FAILOVER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);

const LIMIT: Duration = Duration::from_secs(20);

/// Three namespaces, routed, removed on drop.
pub struct Topology {
    pub bastion: String,
    pub router: String,
    pub db: String,
}

/// Runs `ip args...`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = crate::run_bounded(Command::new("ip").args(args), LIMIT)?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), out.stderr.trim());
    }
    Ok(())
}

impl Topology {
    /// Creates `sluice-<tag>-<pid>-{bastion,router,db}`, links and routes them; each gets an
    /// /etc/hosts naming only localhost ([`Topology::set_hosts`] names more).
    pub fn create(tag: &str) -> anyhow::Result<Topology> {
        let name = |role: &str| format!("sluice-{tag}-{}-{role}", std::process::id());
        let topo = Topology {
            bastion: name("bastion"),
            router: name("router"),
            db: name("db"),
        };
        // Leftovers of a killed run with the same pid are removed first.
        topo.remove();
        for ns in topo.all() {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            std::fs::create_dir_all(topo.etc(ns))?;
        }
        // Both ends are created inside their namespaces: no name on the host can clash.
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &topo.bastion,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &topo.router,
        ])?;
        ip(&[
            "link",
            "add",
            "eth1",
            "netns",
            &topo.router,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &topo.db,
        ])?;
        let addr = |ns: &str, dev: &str, a: Ipv4Addr| -> anyhow::Result<()> {
            ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])
        };
        addr(&topo.bastion, "eth0", BASTION)?;
        addr(&topo.router, "eth0", ROUTER_BASTION)?;
        addr(&topo.router, "eth1", ROUTER_DB)?;
        addr(&topo.db, "eth0", DB)?;
        ip(&[
            "-n",
            &topo.db,
            "addr",
            "add",
            &format!("{DB_FAILOVER}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &topo.bastion,
            "route",
            "add",
            "default",
            "via",
            &ROUTER_BASTION.to_string(),
        ])?;
        ip(&[
            "-n",
            &topo.db,
            "route",
            "add",
            "default",
            "via",
            &ROUTER_DB.to_string(),
        ])?;
        for ns in topo.all() {
            topo.set_hosts(ns, &[])?;
            // No DNS server here: names come from /etc/hosts, and a lookup of anything else
            // fails at once instead of waiting on the host's resolver.
            std::fs::write(
                topo.etc(ns).join("resolv.conf"),
                "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
            )?;
        }
        // Forwarding is per namespace: this changes the router's, not the host's.
        let out = crate::run_bounded(
            topo.exec(&topo.router, "sysctl")
                .args(["-q", "-w", "net.ipv4.ip_forward=1"]),
            LIMIT,
        )?;
        if !out.status.success() {
            bail!(
                "enabling forwarding in {} failed: {}",
                topo.router,
                out.stderr
            );
        }
        Ok(topo)
    }

    fn all(&self) -> [&str; 3] {
        [&self.bastion, &self.router, &self.db]
    }

    /// `/etc/netns/<ns>`: the files [`in_netns`] mounts over /etc's for that namespace.
    pub fn etc(&self, ns: &str) -> PathBuf {
        PathBuf::from("/etc/netns").join(ns)
    }

    /// Writes `ns`'s /etc/hosts: localhost and `names`. Written in place (not renamed), so a
    /// process that already has it bind-mounted sees the new content.
    pub fn set_hosts(&self, ns: &str, names: &[(Ipv4Addr, &str)]) -> anyhow::Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (a, n) in names {
            text.push_str(&format!("{a} {n}\n"));
        }
        let path = self.etc(ns).join("hosts");
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// A command that runs `program` in namespace `ns` (with its /etc/hosts).
    pub fn exec(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(ns, &Command::new(program))
    }

    fn remove(&self) {
        for ns in self.all() {
            // Whatever still runs there (servers, the agent) goes first, then the namespace.
            if let Ok(out) =
                crate::run_bounded(Command::new("ip").args(["netns", "pids", ns]), LIMIT)
            {
                let pids: Vec<&str> = out.stdout.split_whitespace().collect();
                if !pids.is_empty() {
                    let _ = Command::new("kill")
                        .arg("-KILL")
                        .args(&pids)
                        .stderr(std::process::Stdio::null())
                        .status();
                }
            }
            let _ = crate::run_bounded(Command::new("ip").args(["netns", "del", ns]), LIMIT);
            let _ = std::fs::remove_dir_all(self.etc(ns));
        }
    }
}

/// `cmd` (program, arguments, environment) run in network namespace `ns`, with that
/// namespace's /etc/hosts and /etc/resolv.conf bind-mounted over the host's in a private mount
/// namespace of its own (`nsenter --net`, `unshare -m`, `mount --bind`). Not `ip netns exec`:
/// it remounts /sys, which hides the cgroup2 and bpffs mounts the agent and the clients need.
/// Every step execs the next, so the child's pid is the program's.
pub fn in_netns(ns: &str, cmd: &Command) -> Command {
    let etc = PathBuf::from("/etc/netns").join(ns);
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount --bind \"$0\" /etc/hosts && mount --bind \"$1\" /etc/resolv.conf && shift && exec \"$@\"",
        )
        .arg(etc.join("hosts"))
        .arg(etc.join("resolv.conf"))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.remove();
    }
}
