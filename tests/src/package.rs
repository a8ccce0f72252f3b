//! The Debian packages `cargo xtask package` builds, as the tests and the lab use them: the
//! .deb files `cargo xtask test` names in `SLUICE_DEBS`, a scratch root with a dpkg database of
//! its own, and what the agent's packaged unit runs (its `ExecStart`, capabilities and umask),
//! so both start the agent exactly as systemd would, without systemd as PID 1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::{Output, run_bounded, skip};

const LIMIT: Duration = Duration::from_secs(120);

/// The built packages, or None (the test is skipped, which fails under `CI=true`) when
/// `SLUICE_DEBS` does not name both of them.
pub fn debs(test: &str) -> Option<Vec<PathBuf>> {
    let listed: Vec<PathBuf> = std::env::var_os("SLUICE_DEBS")
        .map(|v| std::env::split_paths(&v).collect())
        .unwrap_or_default();
    if ["sluice_", "sluice-collector_"]
        .iter()
        .all(|prefix| deb(&listed, prefix).is_some())
    {
        Some(listed)
    } else {
        skip(
            test,
            "the packages were not built: run `cargo xtask test` (it builds them), or set SLUICE_DEBS to the two .deb files of `cargo xtask package`",
        );
        None
    }
}

/// The package among `debs` whose file name starts with `prefix` (`sluice_` is the agent's).
pub fn deb<'a>(debs: &'a [PathBuf], prefix: &str) -> Option<&'a Path> {
    debs.iter().map(PathBuf::as_path).find(|p| {
        p.exists()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
    })
}

/// A scratch root with an empty dpkg database, removed on drop.
pub struct ScratchRoot {
    dir: tempfile::TempDir,
}

impl ScratchRoot {
    pub fn new() -> anyhow::Result<ScratchRoot> {
        let dir = tempfile::Builder::new().prefix("sluice-pkg-").tempdir()?;
        for d in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "var/lib/dpkg/triggers",
            "etc",
        ] {
            std::fs::create_dir_all(dir.path().join(d))?;
        }
        std::fs::write(dir.path().join("var/lib/dpkg/status"), "")?;
        std::fs::write(dir.path().join("var/lib/dpkg/available"), "")?;
        Ok(ScratchRoot { dir })
    }

    /// The root itself.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An absolute path of the installed system (`/usr/bin/sluice`), inside this root.
    pub fn path(&self, rel: &str) -> PathBuf {
        inside(self.dir.path(), rel)
    }

    /// dpkg on this root; the maintainer scripts run on the host with DPKG_ROOT set, and the
    /// base system the packages depend on (libc6, ...) is not in this root's database.
    pub fn dpkg(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", self.dir.path().display()))
            .arg(format!("--log={}", self.path("dpkg.log").display()))
            .args(["--force-script-chrootless", "--force-depends"])
            .args(args);
        let out = run_bounded(&mut cmd, LIMIT)?;
        if !out.status.success() {
            bail!("dpkg {args:?} failed: {}\n{}", out.stdout, out.stderr);
        }
        Ok(out)
    }

    pub fn install(&self, debs: &[PathBuf]) -> anyhow::Result<()> {
        let mut args = vec!["-i".to_string()];
        args.extend(debs.iter().map(|d| d.display().to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.dpkg(&args).map(drop)
    }
}

/// `rel` (absolute or not) under `root`.
fn inside(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

/// `Key=value` lines of a unit's `[Service]` section.
pub fn service_values(unit: &str, key: &str) -> Vec<String> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]"
            && let Some((k, v)) = line.split_once('=')
            && k == key
        {
            out.push(v.to_string());
        }
    }
    out
}

/// How the packaged `sluice.service` starts the agent.
#[derive(Debug)]
pub struct AgentUnit {
    /// `ExecStart`, split on whitespace (the unit quotes nothing).
    pub argv: Vec<String>,
    /// `CapabilityBoundingSet`, as setpriv names them (`bpf`, `net_admin`, ...).
    pub caps: Vec<String>,
    /// `UMask`.
    pub umask: String,
    /// `NoNewPrivileges=yes`.
    pub no_new_privileges: bool,
    /// `User`.
    pub user: String,
}

impl AgentUnit {
    /// The unit installed under `root` (`usr/lib/systemd/system/sluice.service`).
    pub fn installed(root: &Path) -> anyhow::Result<AgentUnit> {
        let path = inside(root, "usr/lib/systemd/system/sluice.service");
        let unit = std::fs::read_to_string(&path)
            .with_context(|| format!("the agent's unit {} is not installed", path.display()))?;
        let one = |key: &str| -> anyhow::Result<String> {
            match service_values(&unit, key).as_slice() {
                [v] => Ok(v.clone()),
                other => bail!("{}: expected one {key}=, found {other:?}", path.display()),
            }
        };
        Ok(AgentUnit {
            argv: one("ExecStart")?
                .split_whitespace()
                .map(str::to_string)
                .collect(),
            caps: one("CapabilityBoundingSet")?
                .split_whitespace()
                .map(|c| c.to_lowercase().trim_start_matches("cap_").to_string())
                .collect(),
            umask: one("UMask")?,
            no_new_privileges: one("NoNewPrivileges")? == "yes",
            user: one("User")?,
        })
    }

    /// The agent's config file (`--config` of `ExecStart`), inside `root`.
    pub fn config(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let at = self
            .argv
            .iter()
            .position(|a| a == "--config")
            .and_then(|i| self.argv.get(i + 1))
            .with_context(|| format!("ExecStart names no --config: {:?}", self.argv))?;
        Ok(inside(root, at))
    }

    /// The installed binary (`ExecStart`'s program), inside `root`.
    pub fn program(&self, root: &Path) -> anyhow::Result<PathBuf> {
        let program = self.argv.first().context("ExecStart is empty")?;
        Ok(inside(root, program))
    }

    /// The capability mask the agent runs with (CapEff), as /proc/PID/status prints it.
    pub fn cap_mask(&self) -> anyhow::Result<u64> {
        self.caps.iter().try_fold(0u64, |m, c| {
            let n = cap_number(c).with_context(|| format!("unknown capability {c:?}"))?;
            Ok(m | (1 << n))
        })
    }

    /// `ExecStart` with its paths inside `root`, started as systemd would: in the cgroup
    /// `cgroup` (the unit's own), with the unit's umask, no new privileges and exactly its
    /// capability bounding set (setpriv), as root (`User=root`).
    pub fn command(&self, root: &Path, cgroup: &Path) -> anyhow::Result<Command> {
        if self.user != "root" {
            bail!(
                "the unit runs as {}; the lab starts root's units only",
                self.user
            );
        }
        let config = self.config(root)?;
        let caps: Vec<String> = self.caps.iter().map(|c| format!("+{c}")).collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && umask \"$1\" && shift && exec \"$@\"")
            .arg(cgroup)
            .arg(&self.umask)
            .arg("setpriv");
        if self.no_new_privileges {
            cmd.arg("--no-new-privs");
        }
        cmd.arg("--inh-caps=-all")
            .arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .arg("--")
            .arg(self.program(root)?);
        let mut rest = self.argv.iter().skip(1).peekable();
        while let Some(a) = rest.next() {
            cmd.arg(a);
            if a == "--config" {
                rest.next();
                cmd.arg(&config);
            }
        }
        Ok(cmd)
    }
}

/// linux/capability.h's numbers of the capabilities a unit of ours may name.
fn cap_number(name: &str) -> Option<u32> {
    match name {
        "net_bind_service" => Some(10),
        "net_admin" => Some(12),
        "net_raw" => Some(13),
        "sys_admin" => Some(21),
        "sys_resource" => Some(24),
        "perfmon" => Some(38),
        "bpf" => Some(39),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const UNIT: &str = "[Unit]\nDescription=x\nExecStart=/nope\n[Service]\nExecStart=/usr/bin/sluice agent --config /etc/sluice/sluice.toml\nUser=root\nCapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN\nNoNewPrivileges=yes\nUMask=0077\n";

    #[test]
    fn the_unit_is_read_from_its_service_section_and_started_with_its_paths_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("usr/lib/systemd/system");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sluice.service"), UNIT).unwrap();
        let unit = AgentUnit::installed(root.path()).unwrap();
        assert_eq!(unit.caps, ["bpf", "net_admin"]);
        assert_eq!(unit.cap_mask().unwrap(), (1 << 39) | (1 << 12));
        let cmd = unit.command(root.path(), Path::new("/cg")).unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let r = root.path().display();
        assert_eq!(
            args[2..],
            [
                "/cg".to_string(),
                "0077".into(),
                "setpriv".into(),
                "--no-new-privs".into(),
                "--inh-caps=-all".into(),
                "--bounding-set=-all,+bpf,+net_admin".into(),
                "--".into(),
                format!("{r}/usr/bin/sluice"),
                "agent".into(),
                "--config".into(),
                format!("{r}/etc/sluice/sluice.toml"),
            ]
        );
    }
}
