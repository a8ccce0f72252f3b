//! `cargo xtask`: the project's own tasks (build the eBPF object, demo, tests, benchmarks).
//! Each subcommand lives in its own module; this file only dispatches.

mod ebpf;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::BuildEbpf(args) => ebpf::run(args),
    }
}
