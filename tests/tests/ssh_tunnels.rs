//! End to end: SSH port forwarding through a database host. A real OpenSSH server (Debian's
//! `openssh-server`, a throwaway host key, a loopback port) runs inside the test cgroup, so the
//! connects it makes on a user's behalf for `ssh -L`, `-D` and `-W` are the cgroup's connects:
//! the TCP hooks redirect them to sluice like any other, and the journal attributes them to the
//! logged-in user's uid with comm `sshd`.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, Postgres, free_port, pg_target, psql_args,
    require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);

/// A PostgreSQL StartupMessage for user and database `postgres`, then a simple Query; prints
/// the first byte of each answer and the rows. argv: mode (`stdio`, or `socks HOST PORT`).
const PG_OVER: &str = r#"
import socket, struct, sys
def startup():
    body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
    return struct.pack("!I", len(body) + 4) + body
def query(sql):
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body
def run(send, recv):
    send(startup())
    got = b""
    while b"Z\0\0\0\x05" not in got:
        chunk = recv()
        if not chunk:
            break
        got += chunk
    print("auth", got[:1].decode())
    send(query("select 'tunnelled'"))
    got = b""
    while b"Z\0\0\0\x05" not in got:
        chunk = recv()
        if not chunk:
            break
        got += chunk
    print("rows", "tunnelled" if b"tunnelled" in got else got[:40])
mode = sys.argv[1]
if mode == "stdio":
    import os
    run(lambda b: os.write(int(sys.argv[2]), b), lambda: os.read(int(sys.argv[3]), 65536))
else:
    host, port, dport = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    s = socket.create_connection((host, port))
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", dport))
    reply = s.recv(10)
    assert reply[1] == 0, reply
    run(s.sendall, lambda: s.recv(65536))
"#;

struct Sshd {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    key: std::path::PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require_sshd(test: &str) -> bool {
    if Path::new("/usr/sbin/sshd").exists() && Path::new("/usr/bin/ssh").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: openssh-server and openssh-client are required under CI"
    );
    eprintln!("{test}: skipped (apt-get install openssh-server openssh-client)");
    false
}

/// sshd on a free loopback port inside `cgroup`, letting `nobody` in with a throwaway key and
/// forward (no shell, no PAM).
fn sshd(cgroup: &Cgroup) -> Sshd {
    let dir = tempfile::Builder::new()
        .prefix("sluice-sshd-")
        .tempdir()
        .unwrap();
    let host_key = dir.path().join("host_ed25519");
    let key = dir.path().join("user_ed25519");
    for k in [&host_key, &key] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let auth = dir.path().join("authorized_keys");
    std::fs::copy(key.with_extension("pub"), &auth).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let port = free_port();
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nAuthorizedKeysFile {}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             AllowTcpForwarding yes\nPermitOpen any\nAllowUsers nobody\nPidFile none\n",
            host_key.display(),
            auth.display()
        ),
    )
    .unwrap();
    let child = cgroup
        .command(None, "/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("sshd.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd {
        child,
        port,
        _dir: dir,
        key,
    }
}

/// The ssh client (outside the cgroup: its own connect goes to sshd, which is not protected).
fn ssh(d: &Sshd, extra: &[&str]) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.args(["-F", "/dev/null", "-i"])
        .arg(&d.key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-p",
            &d.port.to_string(),
        ])
        .args(extra)
        .arg("nobody@127.0.0.1");
    cmd
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the ssh forward did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_one_sshd_session(agent: &Agent) {
    let sessions = agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}\n{}", agent.log());
    assert_eq!(sessions[0]["uid"], CLIENT_UID, "{:#?}", sessions[0]);
    assert!(
        sessions[0]["comm"].as_str().unwrap().starts_with("sshd"),
        "{:#?}",
        sessions[0]
    );
}

fn setup(name: &str) -> (Postgres, Cgroup, Agent, Sshd) {
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![pg_target("app-db", &format!("127.0.0.1:{}", pg.port))],
        ..AgentOptions::default()
    })
    .unwrap();
    let d = sshd(&cgroup);
    (pg, cgroup, agent, d)
}

#[test]
fn ssh_local_forwarding_through_the_host_is_intercepted_and_attributed_to_the_user() {
    let test = "ssh_local_forwarding_through_the_host_is_intercepted_and_attributed_to_the_user";
    if !require_root(test) || !require_sshd(test) {
        return;
    }
    let (pg, _cgroup, agent, d) = setup("ssh-l");
    let lport = free_port();
    let mut tunnel = ssh(&d, &["-N", "-L", &format!("{lport}:127.0.0.1:{}", pg.port)])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(lport);
    let mut psql = Command::new(pg.bin.join("psql"));
    psql.args(psql_args("127.0.0.1", lport, "select 'via ssh -L'"));
    let out = run_bounded(&mut psql, LIMIT).unwrap();
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert_eq!(
        out.stdout,
        "via ssh -L\n",
        "{}\n{}",
        out.stderr,
        agent.log()
    );
    assert_one_sshd_session(&agent);
}

#[test]
fn ssh_dynamic_forwarding_through_the_host_is_intercepted_and_attributed_to_the_user() {
    let test = "ssh_dynamic_forwarding_through_the_host_is_intercepted_and_attributed_to_the_user";
    if !require_root(test) || !require_sshd(test) {
        return;
    }
    let (pg, _cgroup, agent, d) = setup("ssh-d");
    let lport = free_port();
    let mut tunnel = ssh(&d, &["-N", "-D", &format!("127.0.0.1:{lport}")])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(lport);
    let mut py = Command::new("/usr/bin/python3");
    py.args([
        "-c",
        PG_OVER,
        "socks",
        "127.0.0.1",
        &lport.to_string(),
        &pg.port.to_string(),
    ]);
    let out = run_bounded(&mut py, LIMIT).unwrap();
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert_eq!(
        out.stdout,
        "auth R\nrows tunnelled\n",
        "{}\n{}",
        out.stderr,
        agent.log()
    );
    assert_one_sshd_session(&agent);
}

#[test]
fn ssh_stdio_forwarding_through_the_host_is_intercepted_and_attributed_to_the_user() {
    let test = "ssh_stdio_forwarding_through_the_host_is_intercepted_and_attributed_to_the_user";
    if !require_root(test) || !require_sshd(test) {
        return;
    }
    let (pg, _cgroup, agent, d) = setup("ssh-w");
    // psql speaks through `ssh -W` on a pair of pipes the python client holds.
    let script = format!(
        "import subprocess, sys\n\
         p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)\n\
         sys.argv = ['x', 'stdio', str(p.stdin.fileno()), str(p.stdout.fileno())]\n\
         exec(compile({PG_OVER:?}, 'pg', 'exec'))\n\
         p.kill()\n"
    );
    let cmd = ssh(&d, &["-W", &format!("127.0.0.1:{}", pg.port)]);
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut py = Command::new("/usr/bin/python3");
    py.arg("-c").arg(script).arg(program).args(args);
    let out = run_bounded(&mut py, LIMIT).unwrap();
    assert_eq!(
        out.stdout,
        "auth R\nrows tunnelled\n",
        "{}\n{}",
        out.stderr,
        agent.log()
    );
    assert_one_sshd_session(&agent);
}
