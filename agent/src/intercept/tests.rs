//! Real-kernel tests: each one creates its own cgroup under the cgroup2 root, attaches there,
//! and runs clients (python3) moved into that cgroup, so nothing outside the test is ever
//! intercepted. A "backend" listens on the protected port and a fake "proxy" on the proxy port,
//! both on 127.0.0.1 and [::1]: which one accepts says whether a connect was redirected.
//!
//! Needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN for SO_MARK). Without it every test
//! prints `SKIPPED (needs root)` and passes, unless `CI=true`, where it fails. Tests run one at a
//! time (a process-wide lock) to keep their kernel side effects apart and their counters exact.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use super::*;

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT: AtomicU32 = AtomicU32::new(0);

/// `None`: not root and not in CI, the test must return.
fn root_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: needs root, and CI=true does not allow skipping"
        );
        eprintln!("\n*** {test}: SKIPPED (needs root) ***\n");
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Listeners on `127.0.0.1:port` and `[::1]:port` for one free port.
struct Pair {
    port: u16,
    v4: TcpListener,
    v6: TcpListener,
}

impl Pair {
    fn new() -> Pair {
        for _ in 0..50 {
            let v4 = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
            let port = v4.local_addr().expect("local addr").port();
            if let Ok(v6) = TcpListener::bind(("::1", port)) {
                v4.set_nonblocking(true).expect("nonblocking");
                v6.set_nonblocking(true).expect("nonblocking");
                return Pair { port, v4, v6 };
            }
        }
        panic!("no port free on both 127.0.0.1 and [::1]");
    }

    /// The next connection accepted on either listener: (peer, local). The client has finished
    /// its handshake before we look, so the connection is already queued if it came here at
    /// all; the wait only absorbs scheduling noise.
    fn accept(&self) -> Option<(SocketAddr, SocketAddr)> {
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            for l in [&self.v4, &self.v6] {
                match l.accept() {
                    Ok((s, peer)) => return Some((peer, s.local_addr().expect("local addr"))),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

/// What a client saw.
#[derive(Debug)]
struct Seen {
    peer: SocketAddr,
    pid: u32,
    comm: String,
}

const CLIENT: &str = r#"
import socket, sys, os
fam, host, port, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET if fam == "4" else socket.AF_INET6, socket.SOCK_STREAM)
if mark:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
s.settimeout(5)
s.connect((host, port))
p = s.getpeername()
comm = open("/proc/self/comm").read().strip()
print(p[0], p[1], os.getpid(), comm, flush=True)
"#;

struct Lab {
    cgroup: PathBuf,
    pin_dir: PathBuf,
    proxy: Pair,
    backend: Pair,
}

impl Lab {
    fn new() -> Lab {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("sluice-test-{}-{n}", std::process::id());
        let cgroup = cgroup2_root().expect("cgroup2 root").join(&name);
        std::fs::create_dir(&cgroup).expect("create test cgroup");
        Lab {
            cgroup,
            pin_dir: PathBuf::from(sys::BPFFS).join(name),
            proxy: Pair::new(),
            backend: Pair::new(),
        }
    }

    fn config(&self) -> InterceptConfig {
        InterceptConfig {
            cgroup: self.cgroup.clone(),
            proxy_port: self.proxy.port,
            mark: 0x5155,
            exempt_cgroup_id: None,
            pin_dir: self.pin_dir.clone(),
        }
    }

    fn attach(&self, targets: &[(Match, u32)]) -> Interceptor {
        Interceptor::attach(&self.config(), targets).expect("attach")
    }

    /// Runs the client inside the test cgroup (moved in before it creates its socket).
    fn connect_inside(&self, fam: u8, host: &str, port: u16, mark: u32) -> Seen {
        let procs = self.cgroup.join("cgroup.procs");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"echo $$ > "$1" && shift && exec python3 "$@""#,
            "sh",
        ])
        .arg(&procs);
        run_client(cmd, fam, host, port, mark)
    }

    fn pins(&self) -> Vec<String> {
        match std::fs::read_dir(&self.pin_dir) {
            Ok(d) => {
                let mut v: Vec<_> = d
                    .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            }
            Err(e) if e.kind() == ErrorKind::NotFound => vec![],
            Err(e) => panic!("read pin dir: {e}"),
        }
    }

    fn id(&self) -> u64 {
        cgroup_id(&self.cgroup).expect("cgroup id")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Clients have exited (run_client waits), so the cgroup is empty. Links still pinned
        // after a failed test are removed so that nothing outlives the test.
        let _ = programs::remove_pins(&self.pin_dir);
        let _ = std::fs::remove_dir(&self.pin_dir);
        if let Err(e) = std::fs::remove_dir(&self.cgroup) {
            eprintln!("could not remove {}: {e}", self.cgroup.display());
        }
    }
}

fn run_client(mut cmd: Command, fam: u8, host: &str, port: u16, mark: u32) -> Seen {
    let out = cmd
        .args([
            "-c",
            CLIENT,
            &fam.to_string(),
            host,
            &port.to_string(),
            &mark.to_string(),
        ])
        .output()
        .expect("run python3 client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f: Vec<&str> = stdout.split_whitespace().collect();
    let [host, port, pid, comm] = f[..] else {
        panic!("unexpected client output {stdout:?}");
    };
    Seen {
        peer: SocketAddr::new(
            host.parse().expect("peer ip"),
            port.parse().expect("peer port"),
        ),
        pid: pid.parse().expect("pid"),
        comm: comm.to_owned(),
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// Asserts the connection reached the proxy and returns its record.
fn taken(lab: &Lab, table: &ConnTable) -> OrigRecord {
    assert!(
        lab.backend.accept().is_none(),
        "the backend was reached directly"
    );
    let (peer, local) = lab.proxy.accept().expect("the proxy accepted nothing");
    assert_eq!(local.port(), lab.proxy.port);
    let rec = table
        .take(peer, local)
        .expect("take")
        .expect("no record for the connection");
    assert_eq!(table.take(peer, local).expect("take"), None, "taken twice");
    rec
}

fn reached_backend(lab: &Lab) {
    assert!(lab.proxy.accept().is_none(), "the proxy was reached");
    assert!(
        lab.backend.accept().is_some(),
        "the backend accepted nothing"
    );
}

#[test]
fn a_protected_ipv4_connect_reaches_the_proxy_with_the_callers_identity() {
    let Some(_serial) = root_or_skip("a_protected_ipv4_connect_reaches_the_proxy...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let icp = lab.attach(&[(Match::Exact(SocketAddr::from(([127, 0, 0, 1], port))), 7)]);
    let table = icp.connections();

    let seen = lab.connect_inside(4, "127.0.0.1", port, 0);
    assert_eq!(
        seen.peer,
        SocketAddr::from(([127, 0, 0, 1], port)),
        "getpeername"
    );
    let rec = taken(&lab, &table);
    assert_eq!(rec.orig_dst, SocketAddr::from(([127, 0, 0, 1], port)));
    assert_eq!(rec.target_id, 7);
    assert_eq!(rec.pid, seen.pid);
    assert_eq!(rec.comm, seen.comm);
    assert_eq!(rec.uid, nix::unistd::getuid().as_raw());
    assert_eq!(rec.gid, nix::unistd::getgid().as_raw());
    assert_eq!(rec.cgroup_id, lab.id());
    let age = SystemTime::now()
        .duration_since(rec.connected_at)
        .expect("not in the future");
    assert!(age < Duration::from_secs(10), "connected_at is {age:?} ago");

    let c = icp.counters().expect("counters");
    assert_eq!((c.redirected, c.established), (1, 1), "{c:?}");
    // python3 calls getpeername() once more on its own when the socket is finalized.
    assert!(c.peer_restored >= 1, "{c:?}");
    assert_eq!(
        (c.exempt_mark, c.exempt_cgroup, c.record_failed),
        (0, 0, 0),
        "{c:?}"
    );
    icp.detach().expect("detach");
}

#[test]
fn ipv6_and_ipv4_mapped_destinations_are_redirected_and_keep_their_peer() {
    let Some(_serial) = root_or_skip("ipv6_and_ipv4_mapped_destinations...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let icp = lab.attach(&[(Match::Exact(SocketAddr::from(([127, 0, 0, 1], port))), 3)]);
    let table = icp.connections();

    // ::1 is local: covered by the LOCAL entry the loopback Exact target implies.
    let seen = lab.connect_inside(6, "::1", port, 0);
    assert_eq!(seen.peer, sa(&format!("[::1]:{port}")), "getpeername6");
    let rec = taken(&lab, &table);
    assert_eq!(rec.orig_dst, sa(&format!("[::1]:{port}")));
    assert_eq!(rec.target_id, 3);

    // An AF_INET6 socket to ::ffff:127.0.0.1 fires connect6 only and lands on the v4 proxy.
    let seen = lab.connect_inside(6, "::ffff:127.0.0.1", port, 0);
    assert_eq!(
        seen.peer,
        sa(&format!("[::ffff:127.0.0.1]:{port}")),
        "getpeername6"
    );
    let rec = taken(&lab, &table);
    assert_eq!(
        rec.orig_dst,
        SocketAddr::from(([127, 0, 0, 1], port)),
        "mapped comes back as v4"
    );

    let c = icp.counters().expect("counters");
    assert_eq!((c.redirected, c.established), (2, 2), "{c:?}");
    assert!(c.peer_restored >= 2, "{c:?}");
    icp.detach().expect("detach");
}

#[test]
fn every_local_address_of_a_local_backend_goes_through_the_proxy() {
    let Some(_serial) = root_or_skip("every_local_address_of_a_local_backend...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let icp = lab.attach(&[(Match::Exact(SocketAddr::from(([127, 0, 0, 1], port))), 1)]);
    let table = icp.connections();
    for (fam, host) in [
        (4, "127.0.0.2"),
        (4, "0.0.0.0"),
        (6, "::"),
        (6, "::ffff:0.0.0.0"),
    ] {
        let seen = lab.connect_inside(fam, host, port, 0);
        let rec = taken(&lab, &table);
        assert_eq!(rec.orig_dst.port(), port, "{host}");
        assert_eq!(
            rec.orig_dst.ip().to_canonical(),
            seen.peer.ip().to_canonical(),
            "{host}"
        );
    }
    icp.detach().expect("detach");
}

#[test]
fn any_port_and_exact_remote_targets_catch_remote_destinations() {
    let Some(_serial) = root_or_skip("any_port_and_exact_remote_targets...") else {
        return;
    };
    let lab = Lab::new();
    let icp = lab.attach(&[
        (Match::Any { port: 3306 }, 11),
        (Match::Exact(sa("192.0.2.10:5432")), 12),
        (Match::Exact(sa("[2001:db8::10]:5432")), 13),
    ]);
    let table = icp.connections();
    // Nothing answers at these TEST-NET addresses: only a redirect lets the connect succeed.
    for (fam, host, port, id) in [
        (4, "192.0.2.1", 3306, 11),
        (6, "2001:db8::99", 3306, 11),
        (4, "192.0.2.10", 5432, 12),
        (6, "2001:db8::10", 5432, 13),
    ] {
        let seen = lab.connect_inside(fam, host, port, 0);
        assert_eq!(seen.peer, SocketAddr::new(host.parse().expect("ip"), port));
        let rec = taken(&lab, &table);
        assert_eq!(
            rec.orig_dst,
            SocketAddr::new(host.parse().expect("ip"), port)
        );
        assert_eq!(rec.target_id, id, "{host}");
    }
    icp.detach().expect("detach");
}

#[test]
fn unprotected_ports_and_processes_outside_the_cgroup_are_not_redirected() {
    let Some(_serial) = root_or_skip("unprotected_ports_and_processes...") else {
        return;
    };
    let lab = Lab::new();
    let other = Pair::new();
    let port = lab.backend.port;
    let icp = lab.attach(&[(Match::Exact(SocketAddr::from(([127, 0, 0, 1], port))), 1)]);

    let seen = lab.connect_inside(4, "127.0.0.1", other.port, 0);
    assert_eq!(seen.peer.port(), other.port);
    assert!(
        other.accept().is_some(),
        "the unprotected port was not reached"
    );
    assert!(lab.proxy.accept().is_none());

    // The test process itself is not in the test cgroup.
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect from outside");
    assert_eq!(s.peer_addr().expect("peer").port(), port);
    reached_backend(&lab);

    assert_eq!(icp.counters().expect("counters"), Counters::default());
    icp.detach().expect("detach");
}

#[test]
fn a_socket_with_the_exempt_mark_is_not_redirected() {
    let Some(_serial) = root_or_skip("a_socket_with_the_exempt_mark...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let icp = lab.attach(&[(Match::Exact(SocketAddr::from(([127, 0, 0, 1], port))), 1)]);
    let seen = lab.connect_inside(4, "127.0.0.1", port, lab.config().mark);
    assert_eq!(seen.peer.port(), port);
    reached_backend(&lab);
    // Any other mark is no exemption.
    lab.connect_inside(4, "127.0.0.1", port, lab.config().mark + 1);
    taken(&lab, &icp.connections());
    let c = icp.counters().expect("counters");
    assert_eq!((c.exempt_mark, c.redirected), (1, 1), "{c:?}");
    icp.detach().expect("detach");
}

#[test]
fn the_exempt_cgroup_is_not_redirected() {
    let Some(_serial) = root_or_skip("the_exempt_cgroup...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let cfg = InterceptConfig {
        exempt_cgroup_id: Some(lab.id()),
        ..lab.config()
    };
    let icp = Interceptor::attach(&cfg, &[(Match::Any { port }, 1)]).expect("attach");
    lab.connect_inside(4, "127.0.0.1", port, 0);
    reached_backend(&lab);
    let c = icp.counters().expect("counters");
    assert_eq!((c.exempt_cgroup, c.redirected), (1, 0), "{c:?}");
    icp.detach().expect("detach");
}

#[test]
fn detach_restores_direct_connections_and_empties_the_pin_dir() {
    let Some(_serial) = root_or_skip("detach_restores_direct_connections...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let icp = lab.attach(&[(Match::Any { port }, 1)]);
    assert_eq!(
        lab.pins().len(),
        programs::PROGRAMS.len(),
        "{:?}",
        lab.pins()
    );
    icp.detach().expect("detach");
    assert_eq!(lab.pins(), Vec::<String>::new());
    lab.connect_inside(4, "127.0.0.1", port, 0);
    reached_backend(&lab);
}

#[test]
fn links_outlive_a_crashed_agent_and_the_next_attach_replaces_them() {
    let Some(_serial) = root_or_skip("links_outlive_a_crashed_agent...") else {
        return;
    };
    let lab = Lab::new();
    let port = lab.backend.port;
    let targets = [(Match::Any { port }, 1)];

    // First agent "crashes": its fds close, its pinned links stay attached (fail closed).
    drop(lab.attach(&targets));
    lab.connect_inside(4, "127.0.0.1", port, 0);
    assert!(
        lab.backend.accept().is_none(),
        "a crashed agent let a connect through"
    );
    assert!(
        lab.proxy.accept().is_some(),
        "the stale links no longer redirect"
    );

    // The next agent, on another proxy port, takes over the same pin dir.
    let second = Pair::new();
    let cfg = InterceptConfig {
        proxy_port: second.port,
        ..lab.config()
    };
    let icp = Interceptor::attach(&cfg, &targets).expect("second attach");
    assert_eq!(
        lab.pins().len(),
        programs::PROGRAMS.len(),
        "{:?}",
        lab.pins()
    );
    lab.connect_inside(4, "127.0.0.1", port, 0);
    assert!(
        lab.proxy.accept().is_none(),
        "a stale link still redirects to the dead proxy"
    );
    assert!(lab.backend.accept().is_none());
    let (peer, local) = second.accept().expect("the new proxy accepted nothing");
    let rec = icp
        .connections()
        .take(peer, local)
        .expect("take")
        .expect("record");
    assert_eq!(rec.orig_dst, SocketAddr::from(([127, 0, 0, 1], port)));

    icp.detach().expect("detach");
    lab.connect_inside(4, "127.0.0.1", port, 0);
    reached_backend(&lab);
}

#[test]
fn attach_rejects_a_directory_that_is_not_a_cgroup() {
    let Some(_serial) = root_or_skip("attach_rejects_a_directory...") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = InterceptConfig {
        cgroup: dir.path().to_path_buf(),
        proxy_port: 1,
        mark: 0,
        exempt_cgroup_id: None,
        pin_dir: Path::new(sys::BPFFS).join("sluice-test-never-created"),
    };
    let err = Interceptor::attach(&cfg, &[]).err().expect("must fail");
    assert!(matches!(err, InterceptError::NotCgroup2 { .. }), "{err}");
}
