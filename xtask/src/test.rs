//! `cargo xtask test`: the one test command (README, `.ci/run`). Checks that the committed eBPF
//! object matches its source (when clang-19 is there; always under CI), builds the `sluice`
//! binary the end-to-end tests run, then runs every test in the workspace.

use anyhow::bail;

use crate::util::{cargo, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Arguments passed to `cargo test` after `--` (e.g. a test name filter).
    #[arg(trailing_var_arg = true)]
    rest: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
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
    let mut test = cargo();
    test.args(["test", "--workspace"])
        .env("SLUICE_BIN", target_dir().join("debug/sluice"));
    if !args.rest.is_empty() {
        test.arg("--").args(&args.rest);
    }
    crate::util::run(&mut test)
}
