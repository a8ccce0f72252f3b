//! `cargo xtask test`: the one test command (README, `.ci/run`). As root it first installs what
//! the tests need (the Debian packages of [`crate::packages`], the OIDC provider's npm
//! packages); checks that the committed eBPF object matches its source; builds the `sluice`
//! binary the end-to-end tests run and its Debian packages (`SLUICE_DEBS`, see
//! [`crate::package`]); runs every test in the workspace; and prints last how many
//! tests were skipped and why (a test that cannot run here says so through
//! `sluice_tests::skip`, which fails instead under `CI=true`).

use anyhow::bail;

use crate::packages::{Need, ensure, ensure_oidc_fixture};
use crate::util::{cargo, is_root, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    rest: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if is_root() || ci {
        ensure(Need::Tests)?;
        ensure_oidc_fixture()?;
    } else {
        eprintln!(
            "xtask: not root: nothing installed, and the tests that need root or a missing package are skipped (listed at the end)"
        );
    }
    let clang = std::path::Path::new("/usr/bin/clang-19").exists();
    if clang {
        crate::ebpf::run(crate::ebpf::Args { check: true })?;
    } else if ci {
        bail!(
            "clang-19 is missing, so the committed eBPF object cannot be checked (apt-get install clang-19)"
        );
    } else {
        eprintln!("xtask: clang-19 not installed: skipping the eBPF object check");
    }
    // Build exactly as the tests will (--workspace), so features unify the same way and the
    // RocksDB build is shared.
    crate::util::run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    // The Debian packages of these binaries, for tests/tests/packaging.rs.
    let debs = crate::package::run_package(&crate::package::Args { dev: true })?;
    let skips = tempfile::NamedTempFile::new()?;
    let mut test = cargo();
    // Every test binary runs even after one fails, so a run shows every failure at once.
    test.args(["test", "--workspace", "--no-fail-fast"])
        .env("SLUICE_BIN", target_dir().join("debug/sluice"))
        .env("SLUICE_DEBS", std::env::join_paths(&debs)?)
        .env("SLUICE_SKIP_LOG", skips.path());
    if !args.rest.is_empty() {
        test.arg("--").args(&args.rest);
    }
    let result = crate::util::run(&mut test);
    let skipped = std::fs::read_to_string(skips.path()).unwrap_or_default();
    let lines: Vec<&str> = skipped.lines().collect();
    if !clang {
        eprintln!("\nxtask: the eBPF object check did not run (clang-19 is not installed)");
    }
    if lines.is_empty() {
        eprintln!("\nxtask: no test was skipped");
    } else {
        eprintln!(
            "\nxtask: {} test(s) SKIPPED, so this run does not cover them:",
            lines.len()
        );
        for line in &lines {
            let (test, why) = line.split_once('\t').unwrap_or((line, ""));
            eprintln!("    {test}: {why}");
        }
    }
    result
}
