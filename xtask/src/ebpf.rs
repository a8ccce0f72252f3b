//! `cargo xtask build-ebpf [--check]`: build the eBPF objects of `agent-ebpf/` from their C
//! sources: `sluice.bpf.o` (TCP, loaded by aya) and `sluice_unix.bpf.o` (unix sockets, loaded
//! by libbpf).
//!
//! The objects are committed so that a plain `cargo build` needs no clang; CI runs `--check`,
//! which builds into a temporary file and fails when the committed object differs.
//!
//! Invariant: the same source gives byte-identical objects wherever the workspace is cloned.
//! clang runs from the workspace root on relative paths, and `-ffile-prefix-map=<root>=.`
//! rewrites the root (DW_AT_comp_dir and any file name that still holds it) in the debug info,
//! so no absolute path of this checkout ends up in the object.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

const CLANG: &str = "clang-19";
/// Every (source, object) pair, built with the same flags.
const OBJECTS: &[(&str, &str)] = &[
    ("agent-ebpf/sluice.bpf.c", "agent-ebpf/sluice.bpf.o"),
    (
        "agent-ebpf/sluice_unix.bpf.c",
        "agent-ebpf/sluice_unix.bpf.o",
    ),
];

#[derive(clap::Args)]
pub struct Args {
    /// Build into a temporary file and fail if the committed object differs from it.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = workspace_root()?;
    for &(source, object) in OBJECTS {
        if args.check {
            let dir = tempfile::tempdir().context("creating a temporary directory")?;
            let fresh = dir.path().join("fresh.bpf.o");
            compile(&root, source, &fresh)?;
            let built =
                std::fs::read(&fresh).with_context(|| format!("reading {}", fresh.display()))?;
            let committed = std::fs::read(root.join(object))
                .with_context(|| format!("reading {object} (run cargo xtask build-ebpf)"))?;
            if built != committed {
                bail!("{object} is stale: run cargo xtask build-ebpf and commit it");
            }
            println!("{object} is up to date");
        } else {
            compile(&root, source, &root.join(object))?;
            println!("built {object}");
        }
    }
    Ok(())
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .with_context(|| format!("{} has no parent directory", manifest.display()))?;
    Ok(root.to_path_buf())
}

fn compile(root: &Path, source: &str, out: &Path) -> anyhow::Result<()> {
    let prefix_map = format!("-ffile-prefix-map={}=.", root.display());
    let status = Command::new(CLANG)
        .current_dir(root)
        .args([
            "-O2",
            "-g",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-I/usr/include/x86_64-linux-gnu",
            &prefix_map,
            "-c",
            source,
            "-o",
        ])
        .arg(out)
        .status()
        .with_context(|| format!("running {CLANG} (is it installed? apt-get install clang-19)"))?;
    if !status.success() {
        bail!("{CLANG} failed to build {source} ({status})");
    }
    Ok(())
}
