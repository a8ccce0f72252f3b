//! The Debian packages `cargo xtask package` builds (`cargo xtask test` builds them with the
//! debug binaries and names them in `SLUICE_DEBS`): installed with the real dpkg into a
//! scratch root (`dpkg --root`, maintainer scripts run chrootless with `DPKG_ROOT`), their
//! units checked by `systemd-analyze verify`, the agent started with exactly its unit's
//! `ExecStart` and capability set intercepting a real psql, then removed (the journal stays)
//! and purged (journal, keys and pins go).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_tests::package::{AgentUnit, ScratchRoot as Root, debs};
use sluice_tests::{
    CLIENT_UID, Cgroup, Postgres, free_port, pg_target, psql_args, require_root, run_bounded,
    sluice_bin,
};

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn both_packages_install_into_a_scratch_root_with_their_files_conffiles_and_nothing_enabled() {
    let test =
        "both_packages_install_into_a_scratch_root_with_their_files_conffiles_and_nothing_enabled";
    if !require_root(test) {
        return;
    }
    let Some(debs) = debs(test) else { return };
    let root = Root::new().unwrap();
    root.install(&debs).unwrap();

    for file in [
        "usr/bin/sluice",
        "usr/bin/sluice-collector",
        "usr/lib/systemd/system/sluice.service",
        "usr/lib/systemd/system/sluice-collector.service",
        "usr/lib/sysusers.d/sluice-collector.conf",
        "usr/lib/tmpfiles.d/sluice.conf",
        "usr/lib/tmpfiles.d/sluice-collector.conf",
        "usr/share/man/man1/sluice.1.gz",
        "usr/share/man/man1/sluice-collector.1.gz",
        "usr/share/doc/sluice/copyright",
        "usr/share/doc/sluice/changelog.Debian.gz",
        "usr/share/doc/sluice-collector/copyright",
        "usr/share/doc/sluice-collector/changelog.Debian.gz",
        "usr/share/sluice/policies/base.cedar",
        "etc/sluice/masking.toml",
        "etc/default/sluice-collector",
    ] {
        assert!(root.path(file).is_file(), "{file} is not installed");
    }
    // The documented example config, byte for byte, as a conffile.
    let example =
        std::fs::read(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/sluice.toml"))
            .unwrap();
    assert_eq!(
        std::fs::read(root.path("etc/sluice/sluice.toml")).unwrap(),
        example
    );
    let conffiles =
        std::fs::read_to_string(root.path("var/lib/dpkg/info/sluice.conffiles")).unwrap();
    for c in ["/etc/sluice/sluice.toml", "/etc/sluice/masking.toml"] {
        assert!(
            conffiles.lines().any(|l| l == c),
            "{c} is not a conffile: {conffiles}"
        );
    }
    let conffiles =
        std::fs::read_to_string(root.path("var/lib/dpkg/info/sluice-collector.conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/default/sluice-collector"),
        "{conffiles}"
    );

    // The installed binary runs, and its man page documents every command, doctor included.
    let version = run_bounded(
        Command::new(root.path("usr/bin/sluice")).arg("--version"),
        LIMIT,
    )
    .unwrap();
    assert!(version.ok().starts_with("sluice "), "{}", version.stdout);
    let man = run_bounded(
        Command::new("zcat").arg(root.path("usr/share/man/man1/sluice.1.gz")),
        LIMIT,
    )
    .unwrap();
    let man = man.ok();
    assert!(man.starts_with(".TH SLUICE 1"), "{man}");
    for command in [
        "sluice agent",
        "sluice doctor",
        "sluice policy check",
        "sluice request access",
    ] {
        assert!(
            man.contains(&format!(".SS \"{command}\"")),
            "no {command} in the man page"
        );
    }

    // postinst made the collector's user and its directory (sysusers, tmpfiles) ...
    let passwd = std::fs::read_to_string(root.path("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("sluice-collector:"))
        .unwrap_or_else(|| panic!("no sluice-collector user: {passwd}"));
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    use std::os::unix::fs::MetadataExt as _;
    let home = std::fs::metadata(root.path("var/lib/sluice-collector")).unwrap();
    assert_eq!((home.uid(), home.mode() & 0o777), (uid, 0o700));
    let state = std::fs::metadata(root.path("var/lib/sluice")).unwrap();
    assert_eq!((state.uid(), state.mode() & 0o777), (0, 0o700));
    // ... and enabled nothing: no unit is wanted by any target.
    let enabled: Vec<PathBuf> = walk(&root.path("etc/systemd"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("sluice"))
        .collect();
    assert!(enabled.is_empty(), "installing enabled {enabled:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn the_packaged_units_pass_systemd_analyze_verify() {
    let test = "the_packaged_units_pass_systemd_analyze_verify";
    if !require_root(test) {
        return;
    }
    let Some(debs) = debs(test) else { return };
    let root = Root::new().unwrap();
    root.install(&debs).unwrap();
    // What the units refer to on any Debian host with systemd: systemd's own targets and
    // slices, and procps' kill (ExecReload).
    let units = root.path("usr/lib/systemd/system");
    for e in std::fs::read_dir("/usr/lib/systemd/system")
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.ends_with(".target") || name.ends_with(".slice")) && e.path().is_file() {
            std::fs::copy(e.path(), units.join(&name)).unwrap();
        }
    }
    std::fs::create_dir_all(root.path("bin")).unwrap();
    std::fs::copy("/bin/kill", root.path("bin/kill")).unwrap();
    for unit in ["sluice.service", "sluice-collector.service"] {
        let mut cmd = Command::new("systemd-analyze");
        // The man pages are checked by the installation test (verify would ask the host's man).
        cmd.args(["verify", "--man=no"])
            .arg(format!("--root={}", root.dir().display()))
            .arg(root.path(&format!("usr/lib/systemd/system/{unit}")));
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            out.status.success(),
            "systemd-analyze verify {unit}: {}\n{}",
            out.stdout,
            out.stderr
        );
        // verify also exits 0 on some warnings about the unit itself: none allowed.
        let about_unit: Vec<&str> = out.stderr.lines().filter(|l| l.contains(unit)).collect();
        assert!(
            about_unit.is_empty(),
            "systemd-analyze verify {unit}:\n{}",
            out.stderr
        );
    }
}

/// Waits for the agent's "ready" line on stderr, keeping the whole log.
fn wait_ready(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("sluice agent ready") {
                let _ = tx.send(());
            }
            if let Ok(mut l) = keep.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    if !ready {
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(200));
        panic!(
            "the agent was not ready within 30 s:\n{}",
            log.lock().unwrap()
        );
    }
    log
}

#[test]
fn the_agent_started_as_its_unit_starts_it_intercepts_psql_and_remove_keeps_the_journal_purge_deletes_it()
 {
    let test = "the_agent_started_as_its_unit_starts_it_intercepts_psql_and_remove_keeps_the_journal_purge_deletes_it";
    if !require_root(test) {
        return;
    }
    let Some(debs) = debs(test) else { return };
    let root = Root::new().unwrap();
    root.install(&debs).unwrap();
    let unit = AgentUnit::installed(root.dir()).unwrap();

    // What the unit runs, and with what.
    assert_eq!(
        unit.argv,
        [
            "/usr/bin/sluice",
            "agent",
            "--config",
            "/etc/sluice/sluice.toml"
        ]
    );
    assert_eq!(unit.user, "root");
    assert_eq!(unit.caps, ["bpf", "net_admin", "perfmon"]);
    assert!(unit.no_new_privileges);
    assert_eq!(unit.umask, "0077");

    // A backend, a cgroup for the client and one for the agent (the unit's own cgroup).
    let pg = Postgres::start().unwrap();
    let clients = Cgroup::create("pkg-clients").unwrap();
    let own = Cgroup::create("pkg-agent").unwrap();
    let pins = format!("/sys/fs/bpf/sluice-pkg-test-{}", std::process::id());
    std::fs::create_dir_all(root.path("run/sluice")).unwrap();
    // The installed config, with this test's target, attach cgroup and paths inside the root.
    let config = format!(
        "[agent]\nproxy_listen = \"127.0.0.1:{}\"\ncgroup = \"{}\"\njournal_dir = \"{}\"\nsigning_key = \"{}\"\nencryption_key = \"{}\"\ncontrol_socket = \"{}\"\nbpf_pin_dir = \"{pins}\"\nspool_max_bytes = 1048576\n{}",
        free_port(),
        clients.path.display(),
        root.path("var/lib/sluice/journal").display(),
        root.path("var/lib/sluice/signing.key").display(),
        root.path("var/lib/sluice/journal.key").display(),
        root.path("run/sluice/agent.sock").display(),
        pg_target("app-db", &format!("127.0.0.1:{}", pg.port)),
    );
    let config_path = unit.config(root.dir()).unwrap();
    std::fs::write(&config_path, config).unwrap();

    // ExecStart with its paths inside the root, in a cgroup of its own, with the unit's
    // umask, no new privileges and exactly its capability bounding set.
    let mut cmd = unit.command(root.dir(), &own.path).unwrap();
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut agent = cmd.spawn().unwrap();
    let log = wait_ready(&mut agent);

    let mut psql = clients.command(Some(CLIENT_UID), "psql");
    psql.args(psql_args(
        "127.0.0.1",
        pg.port,
        "select 'through the packaged agent'",
    ));
    let out = run_bounded(&mut psql, LIMIT).unwrap();
    assert_eq!(out.ok().trim(), "through the packaged agent");
    let sessions = |bin: &Path| -> Vec<serde_json::Value> {
        let mut c = Command::new(bin);
        c.args(["sessions", "--json", "--journal"])
            .arg(root.path("var/lib/sluice/journal"));
        let out = run_bounded(&mut c, LIMIT).unwrap();
        serde_json::from_str(out.ok()).unwrap()
    };
    let recorded = sessions(&root.path("usr/bin/sluice"));
    assert!(
        recorded
            .iter()
            .any(|s| s["comm"] == "psql" && s["target"] == "app-db"),
        "no intercepted psql session: {recorded:?}\n{}",
        log.lock().unwrap()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let _ = std::fs::remove_dir_all(&pins);

    // The pins of an installed agent live at /sys/fs/bpf/sluice: stand one in inside the root.
    std::fs::create_dir_all(root.path("sys/fs/bpf/sluice")).unwrap();
    std::fs::write(root.path("sys/fs/bpf/sluice/sluice_connect4"), "").unwrap();

    // dpkg -r: the binaries go; the journal, its keys, the pins and the conffiles stay, and
    // the journal still reads back.
    root.dpkg(&["-r", "sluice", "sluice-collector"]).unwrap();
    assert!(!root.path("usr/bin/sluice").exists());
    assert!(!root.path("usr/lib/systemd/system/sluice.service").exists());
    assert!(root.path("etc/sluice/sluice.toml").exists());
    assert!(root.path("var/lib/sluice/journal.key").exists());
    assert!(root.path("sys/fs/bpf/sluice/sluice_connect4").exists());
    assert!(root.path("var/lib/sluice-collector").exists());
    assert_eq!(sessions(&sluice_bin()).len(), recorded.len());

    // dpkg --purge: the journal, the keys, the pins, the collector's store and the conffiles go.
    root.dpkg(&["--purge", "sluice", "sluice-collector"])
        .unwrap();
    for gone in [
        "var/lib/sluice",
        "sys/fs/bpf/sluice",
        "var/lib/sluice-collector",
        "etc/sluice/sluice.toml",
        "etc/default/sluice-collector",
    ] {
        assert!(!root.path(gone).exists(), "{gone} survived the purge");
    }
}
