//! `sluice doctor`, the real binary on this host: every check ok when the host has what the
//! agent needs; with the cgroup2 mount hidden (a private mount namespace with a tmpfs over
//! it) or CAP_BPF dropped (setpriv), it names the problem and exits non-zero, and `sluice
//! agent` started the same way refuses with the same sentence.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_tests::{
    Postgres, cgroup2_root, free_port, pg_target, require_root, run_bounded, sluice_bin,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A config protecting `pg`, with its journal and pins of its own, written into `dir`.
fn config(dir: &Path, pg: &Postgres) -> std::path::PathBuf {
    let text = format!(
        "[agent]\nproxy_listen = \"127.0.0.1:{}\"\njournal_dir = \"{}\"\nsigning_key = \"{}\"\nencryption_key = \"{}\"\ncontrol_socket = \"{}\"\nbpf_pin_dir = \"/sys/fs/bpf/sluice-doctor-test-{}\"\nspool_max_bytes = 1048576\n{}",
        free_port(),
        dir.join("journal").display(),
        dir.join("signing.key").display(),
        dir.join("journal.key").display(),
        dir.join("agent.sock").display(),
        std::process::id(),
        pg_target("app-db", &format!("127.0.0.1:{}", pg.port)),
    );
    let path = dir.join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn doctor(prefix: &[&str], config: &Path) -> sluice_tests::Output {
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .arg(sluice_bin())
        .arg("doctor")
        .arg("--config")
        .arg(config);
    run_bounded(&mut cmd, LIMIT).unwrap()
}

#[test]
fn doctor_on_this_host_prints_every_check_ok() {
    if !require_root("doctor_on_this_host_prints_every_check_ok") {
        return;
    }
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pg);
    let out = doctor(&["env"], &config);
    assert!(
        out.status.success(),
        "doctor failed ({}):\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    for line in &lines {
        assert!(line.starts_with("ok: "), "not ok: {line}\n{}", out.stdout);
    }
    for hook in [
        "cgroup/connect4",
        "cgroup/connect6",
        "sockops",
        "cgroup/getpeername4",
        "cgroup/getpeername6",
        "cgroup/sock_release",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(&format!("hook {hook}"))
                && l.contains("loaded, verified and attached")),
            "no probe line for {hook}:\n{}",
            out.stdout
        );
    }
    for check in [
        "kernel",
        "cgroup2",
        "bpffs",
        "capabilities",
        "lockdown",
        "journal",
        "journal disk",
        "collector",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("ok: {check}: "))),
            "no {check} line:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout
            .contains(&format!("ok: target app-db: 127.0.0.1:{} answers", pg.port)),
        "{}",
        out.stdout
    );
    // The probe leaves nothing behind: no throwaway cgroup, no pin directory.
    let root = cgroup2_root().unwrap();
    let leftovers: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .chain(std::fs::read_dir("/sys/fs/bpf").unwrap())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| *n == format!("sluice-doctor-{}", out.pid))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn doctor_with_the_cgroup2_mount_hidden_names_the_problem_and_exits_non_zero() {
    if !require_root("doctor_with_the_cgroup2_mount_hidden_names_the_problem_and_exits_non_zero") {
        return;
    }
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pg);
    let root = cgroup2_root().unwrap();
    // A private mount namespace (unshare's default propagation), a tmpfs over the cgroup2
    // mount point: the host's mount is untouched.
    let script = format!("mount -t tmpfs none '{}' && exec \"$@\"", root.display());
    let out = doctor(&["unshare", "-m", "sh", "-c", &script, "sh"], &config);
    assert!(!out.status.success(), "doctor passed:\n{}", out.stdout);
    let expected = format!(
        "problem: cgroup2: {} is not a cgroup v2 directory: something is mounted over it, or it does not exist (mount the cgroup v2 hierarchy there, or set agent.cgroup to a cgroup v2 directory)",
        root.display()
    );
    assert!(out.stdout.contains(&expected), "{}", out.stdout);
    assert!(out.stderr.contains("problem(s) found"), "{}", out.stderr);
    // The rest is still checked and reported.
    assert!(out.stdout.contains("ok: capabilities: "), "{}", out.stdout);

    // The agent, started the same way, refuses with the same sentence.
    let mut agent = Command::new("unshare");
    agent
        .args(["-m", "sh", "-c", &script, "sh"])
        .arg(sluice_bin())
        .arg("agent")
        .arg("--config")
        .arg(&config);
    let refused = run_bounded(&mut agent, LIMIT).unwrap();
    assert!(
        !refused.status.success(),
        "the agent started:\n{}",
        refused.stderr
    );
    assert!(refused.stderr.contains(&expected), "{}", refused.stderr);
}

#[test]
fn doctor_without_cap_bpf_names_the_capability_and_the_agent_refuses_with_the_same_sentence() {
    if !require_root(
        "doctor_without_cap_bpf_names_the_capability_and_the_agent_refuses_with_the_same_sentence",
    ) {
        return;
    }
    let pg = Postgres::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), &pg);
    // CAP_SYS_ADMIN would stand in for CAP_BPF: drop both.
    let drop_bpf = [
        "setpriv",
        "--bounding-set=-bpf,-sys_admin",
        "--inh-caps=-all",
        "--",
    ];
    let out = doctor(&drop_bpf, &config);
    assert!(!out.status.success(), "doctor passed:\n{}", out.stdout);
    let expected = "problem: capabilities: missing CAP_BPF (run the agent as root, or with exactly CAP_NET_ADMIN CAP_PERFMON CAP_BPF as the sluice.service unit does)";
    assert!(out.stdout.contains(expected), "{}", out.stdout);
    // The probe could not load the programs either.
    assert!(
        out.stdout
            .contains("problem: hooks: not probed: loading the eBPF object"),
        "{}",
        out.stdout
    );

    let mut agent = Command::new(drop_bpf[0]);
    agent
        .args(&drop_bpf[1..])
        .arg(sluice_bin())
        .arg("agent")
        .arg("--config")
        .arg(&config);
    let refused = run_bounded(&mut agent, LIMIT).unwrap();
    assert!(
        !refused.status.success(),
        "the agent started:\n{}",
        refused.stderr
    );
    assert!(refused.stderr.contains(expected), "{}", refused.stderr);
}
