//! `cargo xtask lab`: the two-host lab of `vagrant/` on this machine, with network namespaces
//! instead of virtual machines (see `sluice_tests::lab`, which `tests/tests/lab.rs` runs too).
//! As root: installs what is missing, builds, then runs the provisioning scripts and the
//! engineer's walk-through, and removes everything it made.

use anyhow::bail;

use crate::util::{cargo, is_root, target_dir};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the lab creates network namespaces, cgroups and loads eBPF programs: run it as root (sudo -E cargo xtask lab)"
        );
    }
    crate::packages::ensure(crate::packages::Need::Lab)?;
    crate::util::run(cargo().args(["build", "--workspace", "--bins"]))?;
    sluice_tests::lab::run(&target_dir().join("debug/sluice"))
}
