//! `cargo xtask`: the project's own tasks (build the eBPF object, demo, lab, tests, packages,
//! benchmarks).
//! Each subcommand lives in its own module; this file only dispatches.

mod bench;
mod demo;
mod ebpf;
mod lab;
mod package;
mod packages;
mod test;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "sluice's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Rebuild agent-ebpf/sluice.bpf.o with clang-19 (`--check`: fail if the committed object is stale).
    BuildEbpf(ebpf::Args),
    /// Run every test: the eBPF object check, unit tests, and the end-to-end tests (as root).
    Test(test::Args),
    /// Start a throwaway PostgreSQL and the agent, run psql through it, print the replay.
    Demo(demo::Args),
    /// Build the Debian packages `sluice` and `sluice-collector` into $CARGO_TARGET_DIR/debian/.
    Package(package::Args),

    /// The two-host lab of vagrant/ (bastion, router, db) in network namespaces, and an
    /// engineer's walk-through on it.
    Lab(lab::Args),
    /// pgbench -S and sysbench (MySQL) direct vs through sluice (1 and 8 clients), with ratios.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(args) => ebpf::run(args),
        Command::Test(args) => test::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Package(args) => package::run_cmd(args),

        Command::Lab(args) => lab::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
