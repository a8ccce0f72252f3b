//! `cargo xtask package`: the Debian packages `sluice` (agent and CLI) and `sluice-collector`,
//! built by cargo-deb from each crate's `[package.metadata.deb]` into
//! `$CARGO_TARGET_DIR/debian/` (a stable path: the tests and the lab install from there).
//!
//! Steps: install cargo-deb if it is missing (`cargo install cargo-deb --locked`, saying so);
//! build the two binaries (release, or with `--dev` the debug ones `cargo xtask test` has just
//! built); write each binary's man page from its own `--help` output (the clap definitions,
//! as the binary renders them; see [`man_page`]); then `cargo deb --no-build` per package.
//! The packaging files themselves (units, maintainer scripts, sysusers/tmpfiles, changelogs)
//! live in `agent/debian/` and `collector/debian/`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::util::{cargo, root, run, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Package the debug binaries of `cargo build --workspace` (what `cargo xtask test`
    /// installs and checks) instead of building release ones.
    #[arg(long)]
    pub dev: bool,
}

/// A man page's FILES section: each path and what it is.
type Files = &'static [(&'static str, &'static str)];

/// The packages, each with its binary, the crate holding its metadata, and the man page's
/// FILES section.
const PACKAGES: &[(&str, &str, Files)] = &[
    (
        "sluice",
        "sluice",
        &[
            ("/etc/sluice/sluice.toml", "the agent's configuration"),
            (
                "/etc/sluice/masking.toml",
                "example masking rules (masking_file)",
            ),
            (
                "/usr/share/sluice/policies/",
                "example Cedar policies (copy to policy_dir)",
            ),
            (
                "/var/lib/sluice/",
                "the journal, its signing and data keys, the enrollment",
            ),
            ("/run/sluice/agent.sock", "the agent's control socket"),
            (
                "/sys/fs/bpf/sluice/",
                "the pinned eBPF links (they outlive the agent: fail closed)",
            ),
            (
                "/usr/lib/systemd/system/sluice.service",
                "the unit (not enabled on install)",
            ),
        ],
    ),
    (
        "sluice-collector",
        "sluice-collector",
        &[
            (
                "/var/lib/sluice-collector/",
                "the collector's TLS key, registry and store",
            ),
            (
                "/etc/default/sluice-collector",
                "options for `serve` in the unit",
            ),
            (
                "/usr/lib/systemd/system/sluice-collector.service",
                "the unit (not enabled on install)",
            ),
        ],
    ),
];

/// Builds both packages; returns the .deb files.
pub fn run_package(args: &Args) -> anyhow::Result<Vec<PathBuf>> {
    ensure_cargo_deb()?;
    let (profile_dir, profile) = if args.dev {
        // Exactly the test command's build, so nothing is rebuilt.
        run(cargo().args(["build", "--workspace", "--all-targets"]))?;
        ("debug", "dev")
    } else {
        run(cargo().args([
            "build",
            "--release",
            "-p",
            "sluice",
            "-p",
            "sluice-collector",
        ]))?;
        ("release", "release")
    };
    let bin_dir = target_dir().join(profile_dir);
    let man_dir = bin_dir.join("man");
    std::fs::create_dir_all(&man_dir)?;
    let started = std::time::Instant::now();
    for (bin, _, files) in PACKAGES {
        let page = man_page(&bin_dir.join(bin), bin, files)?;
        write_gzip(&man_dir.join(format!("{bin}.1.gz")), page.as_bytes())?;
    }
    eprintln!(
        "xtask: man pages written from --help in {} ms",
        started.elapsed().as_millis()
    );
    let out = target_dir().join("debian");
    std::fs::create_dir_all(&out)?;
    let mut debs = Vec::new();
    for (_, package, _) in PACKAGES {
        let mut deb = cargo();
        deb.args([
            "deb",
            "--no-build",
            "--strip",
            "-p",
            package,
            "--profile",
            profile,
        ])
        .arg("--output")
        .arg(&out)
        .current_dir(root())
        .stderr(Stdio::inherit());
        if args.dev {
            // Debug binaries are large: fast compression keeps the test run short.
            deb.arg("--fast");
        }
        eprintln!("xtask: running {deb:?}");
        let done = deb
            .output()
            .with_context(|| format!("cannot run {deb:?}"))?;
        if !done.status.success() {
            bail!("{deb:?} failed ({})", done.status);
        }
        // cargo-deb prints the package it wrote, last.
        let stdout = String::from_utf8_lossy(&done.stdout);
        let path = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| l.ends_with(".deb"))
            .map(PathBuf::from)
            .with_context(|| format!("cargo deb did not say which .deb it wrote: {stdout}"))?;
        debs.push(path);
    }
    eprintln!("xtask: packages:");
    for d in &debs {
        eprintln!("    {}", d.display());
    }
    Ok(debs)
}

pub fn run_cmd(args: Args) -> anyhow::Result<()> {
    crate::packages::ensure(crate::packages::Need::Build)?;
    run_package(&args).map(drop)
}

/// The cargo-deb this was written against. Later versions warn that `--profile dev` (what
/// `--dev` packages) is to become an error.
const CARGO_DEB: &str = "3.8.0";

/// cargo-deb on PATH, or installed now (once per machine; it says so, and how long it took).
fn ensure_cargo_deb() -> anyhow::Result<()> {
    let found = cargo()
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Ok(());
    }
    eprintln!(
        "xtask: cargo-deb is missing: installing it with `cargo install cargo-deb --version {CARGO_DEB} --locked` (once; 5 to 15 minutes on 2 cores)"
    );
    let started = std::time::Instant::now();
    let mut install = cargo();
    install.args(["install", "cargo-deb", "--version", CARGO_DEB, "--locked"]);
    // Its own build directory, not the workspace's target dir.
    install.env_remove("CARGO_TARGET_DIR");
    run(&mut install)?;
    eprintln!(
        "xtask: cargo-deb installed in {} s",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// A binary's `--help` text (clap renders its definitions; `NO_COLOR`, fixed width).
fn help(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .arg("--help")
        // Nothing of the builder's environment (clap shows `env` values such as SLUICE_CONFIG).
        .env_clear()
        .env("NO_COLOR", "1")
        .env("COLUMNS", "100")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} --help failed: {}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The subcommand names of a clap help text (its `Commands:` list), `help` left out.
fn subcommands(help: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line == "Commands:" {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            // A command's own line is indented by two; its wrapped description by more.
            if line.starts_with("   ") {
                continue;
            }
            if let Some(name) = line.split_whitespace().next()
                && name != "help"
            {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// Text for roff: backslashes escaped, and no line read as a request.
fn roff(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            out.push_str("\\&");
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A man page for `bin`: NAME and DESCRIPTION from `bin --help`, then every subcommand (and
/// theirs) with its own `--help`, verbatim; then FILES. Generated from the binary rather than
/// with clap_mangen: the clap definitions live in the binary crates' main.rs, which xtask
/// cannot import, and `--help` is exactly what a person sees.
fn man_page(bin: &Path, name: &str, files: &[(&str, &str)]) -> anyhow::Result<String> {
    let top = help(bin, &[])?;
    let short = help(bin, &["-h"]).ok();
    let about = short
        .as_deref()
        .and_then(|h| h.lines().next())
        .unwrap_or(name)
        .trim()
        .to_string();
    let description = top.split("\nUsage:").next().unwrap_or("").trim();
    let version = env!("CARGO_PKG_VERSION");
    let mut page = format!(
        ".TH {} 1 \"\" \"{name} {version}\" \"User Commands\"\n.SH NAME\n{name} \\- {}\n.SH SYNOPSIS\n.B {name}\n\\fICOMMAND\\fR [\\fIOPTIONS\\fR]\n.SH DESCRIPTION\n",
        name.to_uppercase(),
        roff(&about).trim_end(),
    );
    for para in description.split("\n\n") {
        page.push_str(".PP\n");
        page.push_str(&roff(para));
    }
    page.push_str(".SH COMMANDS\n");
    let mut queue: Vec<Vec<String>> = subcommands(&top).into_iter().map(|c| vec![c]).collect();
    let mut i = 0;
    while let Some(path) = queue.get(i).cloned() {
        i += 1;
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(bin, &args)?;
        page.push_str(&format!(".SS \"{name} {}\"\n.nf\n", args.join(" ")));
        page.push_str(&roff(text.trim_end()));
        page.push_str(".fi\n");
        for sub in subcommands(&text) {
            let mut p = path.clone();
            p.push(sub);
            queue.push(p);
        }
    }
    page.push_str(".SH FILES\n");
    for (path, what) in files {
        page.push_str(&format!(".TP\n.I {path}\n{}", roff(what)));
    }
    page.push_str(&format!(
        ".SH SEE ALSO\n.BR {} (1),\n.BR systemctl (1)\n",
        if name == "sluice" {
            "sluice-collector"
        } else {
            "sluice"
        }
    ));
    Ok(page)
}

/// `gzip -9n` (no name or time stamp, so the page is reproducible).
fn write_gzip(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut child = Command::new("gzip")
        .args(["-9n"])
        .stdin(Stdio::piped())
        .stdout(file)
        .spawn()
        .context("cannot run gzip")?;
    child
        .stdin
        .take()
        .context("gzip has no stdin")?
        .write_all(data)?;
    let status = child.wait()?;
    if !status.success() {
        bail!("gzip failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_are_read_from_the_commands_list_without_wrapped_lines_or_help() {
        let help = "About\n\nUsage: sluice <COMMAND>\n\nCommands:\n  agent         Run the agent\n  check-config  Check a config\n                wrapped line\n  help          Print this message\n\nOptions:\n  -h, --help  Print help\n";
        assert_eq!(subcommands(help), vec!["agent", "check-config"]);
    }

    #[test]
    fn roff_escapes_backslashes_and_leading_dots() {
        assert_eq!(roff(".hidden\na\\b\n"), "\\&.hidden\na\\eb\n");
    }
}
