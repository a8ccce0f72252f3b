//! What sluice's build, demo, lab, tests and benchmark need on a Debian machine: the one list.
//! `cargo xtask demo` installs [`Need::Demo`], `cargo xtask lab` [`Need::Lab`], `cargo xtask
//! test` [`Need::Tests`], `cargo xtask bench` [`Need::Bench`], and `.ci/run` runs the demo and
//! the tests, so no other file names a package. dpkg is asked first, so a machine that has
//! everything installs nothing and needs no root.

use std::process::Command;

use anyhow::bail;

use crate::util::{is_root, run};

/// What a task needs; each level includes the ones before it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// `cargo build --workspace`: RocksDB's C++ and its bindgen bindings.
    Build,
    /// `cargo xtask demo`: the build, the servers and the CA it starts.
    Demo,
    /// `cargo xtask lab`: the demo's, plus the network namespaces' tools.
    Lab,
    /// `cargo xtask test`: the lab's, plus every client and tool the tests run.
    Tests,
    /// `cargo xtask bench`: the tests', plus the peers it measures against.
    Bench,
}

/// One Debian package: why it is needed, and the first task that needs it.
struct Package {
    name: &'static str,
    why: &'static str,
    need: Need,
}

const fn pkg(need: Need, name: &'static str, why: &'static str) -> Package {
    Package { name, why, need }
}

#[rustfmt::skip]
const PACKAGES: &[Package] = &[
    pkg(Need::Build, "libclang-19-dev", "bindgen for RocksDB's bindings (clang-sys)"),
    pkg(Need::Build, "g++", "RocksDB's C++ sources"),
    pkg(Need::Build, "gzip", "the man pages of `cargo xtask package`"),
    pkg(Need::Build, "libelf-dev", "libbpf-sys's vendored libbpf (the unix-socket eBPF loader)"),
    pkg(Need::Build, "zlib1g-dev", "libbpf-sys's vendored libbpf"),
    pkg(Need::Build, "pkg-config", "libbpf-sys finds libelf and zlib with it"),
    pkg(Need::Demo, "postgresql", "the PostgreSQL server, psql and pgbench"),
    pkg(Need::Demo, "postgresql-contrib", "PostgreSQL's contrib modules"),
    pkg(Need::Demo, "openssl", "the throwaway CA and certificates"),
    pkg(Need::Demo, "mariadb-server", "the MariaDB server"),
    pkg(Need::Demo, "mariadb-client", "the mariadb CLI"),
    pkg(Need::Lab, "iproute2", "the lab's network namespaces and veth links (ip netns)"),
    pkg(Need::Lab, "util-linux", "the lab's engineer as another uid, the agent with its unit's capabilities (setpriv)"),
    pkg(Need::Lab, "procps", "forwarding on the lab's router namespace (sysctl)"),
    pkg(Need::Tests, "clang-19", "rebuilding the eBPF object to check the committed one"),
    pkg(Need::Tests, "llvm-19", "the eBPF object's tools"),
    pkg(Need::Tests, "bpftool", "BPF introspection"),
    pkg(Need::Tests, "libbpf-dev", "the BPF headers the eBPF source includes"),
    pkg(Need::Tests, "python3", "the raw wire clients (tests/clients/*.py)"),
    pkg(Need::Tests, "python3-psycopg", "psycopg 3"),
    pkg(Need::Tests, "python3-venv", "the venv of mysql-connector-python and PyMySQL"),
    pkg(Need::Tests, "systemd", "systemd-analyze verify of the packaged units, sysusers and tmpfiles in a scratch root"),
    pkg(Need::Tests, "default-jdk-headless", "the JDBC clients"),
    pkg(Need::Tests, "libpostgresql-jdbc-java", "the PostgreSQL JDBC driver"),
    pkg(Need::Tests, "libmariadb-java", "MariaDB Connector/J"),
    pkg(Need::Tests, "openssh-server", "the SSH tunnel tests' real sshd"),
    pkg(Need::Tests, "openssh-client", "the SSH tunnel tests' ssh -L, -D and -W"),
    pkg(Need::Tests, "sysbench", "prepared statements through MariaDB Connector/C"),
    pkg(Need::Bench, "pgbouncer", "the reference proxy the benchmark compares with"),
];

/// Installs every package `need` calls for that dpkg does not list as installed, saying what
/// and why. Node.js is installed from Debian only when there is no `node` and `npm` on PATH
/// (they may come from elsewhere, e.g. NodeSource, whose package carries npm and conflicts
/// with Debian's).
pub fn ensure(need: Need) -> anyhow::Result<()> {
    let node = [
        pkg(
            Need::Tests,
            "nodejs",
            "the OIDC provider the identity tests log in to",
        ),
        pkg(Need::Tests, "npm", "the OIDC provider's packages"),
    ];
    let wanted: Vec<&Package> = PACKAGES
        .iter()
        .filter(|p| p.need <= need)
        .chain(
            node.iter()
                .filter(|_| need >= Need::Tests && !(on_path("node") && on_path("npm"))),
        )
        .collect();
    let installed = installed(wanted.iter().map(|p| p.name));
    let missing: Vec<&Package> = wanted
        .into_iter()
        .filter(|p| !installed.iter().any(|i| i == p.name))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if !is_root() {
        bail!(
            "missing Debian packages {names:?}: run as root (sudo -E cargo xtask ...), or `apt-get install {}`",
            names.join(" ")
        );
    }
    eprintln!("xtask: installing Debian packages:");
    for p in &missing {
        eprintln!("    {:<24} {}", p.name, p.why);
    }
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&names)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The packages among `names` that dpkg lists as installed.
fn installed<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\\n"])
        .args(names)
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(" installed"))
        .map(|name| name.split(':').next().unwrap_or(name).to_string())
        .collect()
}

/// True when `command` is an executable file on PATH.
fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

/// The OIDC provider's npm packages, pinned by tests/oidc/package-lock.json.
pub fn ensure_oidc_fixture() -> anyhow::Result<()> {
    let dir = crate::util::root().join("tests/oidc");
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return Ok(());
    }
    eprintln!("xtask: installing the OIDC provider's npm packages (tests/oidc)");
    run(Command::new("npm")
        .args([
            "ci",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(dir))
}
