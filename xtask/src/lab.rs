//! `cargo xtask lab`: the two-host lab of `vagrant/` on this machine, with network namespaces
//! instead of virtual machines (see `sluice_tests::lab`, which `tests/tests/lab.rs` runs too).
//! As root: installs what is missing, builds the Debian packages (`cargo xtask package --dev`;
//! the bastion installs the agent's), then runs the provisioning scripts and the engineer's
//! walk-through, and removes everything it made.

use anyhow::bail;

use crate::util::is_root;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the lab creates network namespaces, cgroups and loads eBPF programs: run it as root (sudo -E cargo xtask lab)"
        );
    }
    crate::packages::ensure(crate::packages::Need::Lab)?;
    // The packages of the test command's debug build (it builds the workspace first).
    let debs = crate::package::run_package(&crate::package::Args { dev: true })?;
    let Some(deb) = sluice_tests::package::deb(&debs, "sluice_") else {
        bail!("cargo xtask package wrote no sluice_*.deb: {debs:?}");
    };
    sluice_tests::lab::run(deb)
}
