//! End to end: the unix-socket road. Real PostgreSQL with its socket in a directory only its
//! user can enter, the real kernel's `cgroup/connect_unix` attached to a cgroup this test
//! creates, the real `sluice` binary, and psql/pgbench as `nobody` inside that cgroup,
//! connecting without `-h` as people do on a database host.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_tests::{
    Agent, AgentOptions, CLIENT_UID, Cgroup, PgOptions, Postgres, require_root, run_bounded,
};

const LIMIT: Duration = Duration::from_secs(60);

struct Setup {
    pg: Postgres,
    cgroup: Cgroup,
    agent: Agent,
}

/// A `[[target]]` for `pg` protecting `sockets` (TOML array text) and dialing its socket.
fn unix_target(pg: &Postgres, sockets: &str) -> String {
    format!(
        "[[target]]\nname = \"app-db\"\nprotocol = \"postgres\"\nmatch = \"127.0.0.1:{}\"\nsockets = {sockets}\nsocket_backend = \"{}\"\n",
        pg.port,
        pg.socket().display()
    )
}

fn setup(name: &str, sockets: Option<&str>, tweak: impl FnOnce(&mut AgentOptions)) -> Setup {
    setup_on(Postgres::start().unwrap(), name, sockets, tweak)
}

/// [`setup`] on a server the caller started.
fn setup_on(
    pg: Postgres,
    name: &str,
    sockets: Option<&str>,
    tweak: impl FnOnce(&mut AgentOptions),
) -> Setup {
    pg.sql("create table people (id int primary key, name text, email text); insert into people values (1, 'ada', 'ada@example.com'), (2, 'grace', 'grace@example.com');")
        .unwrap();
    let cgroup = Cgroup::create(name).unwrap();
    let sockets = sockets
        .map(str::to_string)
        .unwrap_or_else(|| format!("[\"{}\"]", pg.socket().display()));
    let mut options = AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![unix_target(&pg, &sockets)],
        ..AgentOptions::default()
    };
    tweak(&mut options);
    let agent = Agent::start(options).unwrap();
    Setup { pg, cgroup, agent }
}

impl Setup {
    /// psql as `nobody` inside the cgroup, without -h: libpq's unix socket in `pghost` (None:
    /// the compiled-in default directory).
    fn psql(&self, pghost: Option<&Path>, sql: &str) -> sluice_tests::Output {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &self.pg.port.to_string(), "-c", sql])
        .env_remove("PGHOST");
        if let Some(dir) = pghost {
            cmd.env("PGHOST", dir);
        }
        run_bounded(&mut cmd, LIMIT).unwrap()
    }

    /// A raw connect() to `name` as `nobody` inside the cgroup: "connected", or the error.
    fn connect(&self, name: &str) -> String {
        let mut cmd = self.cgroup.command(Some(CLIENT_UID), "/usr/bin/python3");
        cmd.arg("-c").arg(CONNECT_PY).arg(name);
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        out.stdout.trim().to_string()
    }
}

/// Connects to argv[1] (`@x`: the abstract name `\0x`) and prints what happened.
const CONNECT_PY: &str = r#"
import socket, sys
name = sys.argv[1]
addr = "\0" + name[1:] if name.startswith("@") else name
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(addr)
    print("connected")
except OSError as e:
    print(type(e).__name__, e.errno)
"#;

fn ok(out: &sluice_tests::Output) -> &str {
    assert!(
        out.status.success(),
        "client failed: {}\n{}",
        out.stdout,
        out.stderr
    );
    &out.stdout
}

#[test]
fn psql_through_the_servers_unix_socket_is_intercepted_recorded_and_replayed() {
    if !require_root("psql_through_the_servers_unix_socket_is_intercepted_recorded_and_replayed") {
        return;
    }
    let s = setup("unix-basic", None, |_| {});
    // Without sluice, nobody cannot even reach the socket: its directory is the server's.
    let direct = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            CONNECT_PY,
        ])
        .arg(s.pg.socket())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&direct.stdout).trim(),
        "PermissionError 13"
    );

    let out = s.psql(
        Some(&s.pg.socket_dir()),
        "select id, name from people order by id",
    );
    assert_eq!(ok(&out), "1|ada\n2|grace\n", "{}", s.agent.log());

    let sessions = s.agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}\n{}", s.agent.log());
    let session = &sessions[0];
    assert_eq!(session["target"], "app-db");
    assert_eq!(session["uid"], CLIENT_UID);
    assert_eq!(session["gid"], CLIENT_UID);
    assert_eq!(session["pid"], out.pid);
    assert_eq!(session["comm"], "psql");
    assert_eq!(
        session["orig_dst"],
        format!("unix:{}", s.pg.socket().display())
    );
    assert_eq!(session["statements"], 1);

    let id = session["id"].as_str().unwrap();
    let replay = s.agent.read(&["replay", &id[..13]]).unwrap();
    assert!(
        replay.contains("> select id, name from people order by id"),
        "{replay}"
    );
    assert!(replay.contains("grace"), "{replay}");
    assert!(replay.contains("comm psql"), "{replay}");
}

#[test]
fn plain_psql_on_the_default_socket_path_reaches_the_server_through_sluice() {
    if !require_root("plain_psql_on_the_default_socket_path_reaches_the_server_through_sluice") {
        return;
    }
    // No `sockets`: a local target protects the standard names for its port, and Debian's
    // libpq connects to /var/run/postgresql/.s.PGSQL.<port> when given no host at all.
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("unix-default").unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![format!(
            "[[target]]\nname = \"app-db\"\nprotocol = \"postgres\"\nmatch = \"127.0.0.1:{}\"\nsocket_backend = \"{}\"\n",
            pg.port,
            pg.socket().display()
        )],
        ..AgentOptions::default()
    })
    .unwrap();
    let s = Setup { pg, cgroup, agent };
    let out = s.psql(None, "select 'default path'");
    assert_eq!(ok(&out), "default path\n", "{}", s.agent.log());
    let sessions = s.agent.sessions().unwrap();
    assert_eq!(
        sessions[0]["orig_dst"],
        format!("unix:/var/run/postgresql/.s.PGSQL.{}", s.pg.port)
    );
    // The /run spelling and the abstract name are protected as well.
    for name in [
        format!("/run/postgresql/.s.PGSQL.{}", s.pg.port),
        format!("@/run/postgresql/.s.PGSQL.{}", s.pg.port),
    ] {
        assert_eq!(s.connect(&name), "connected", "{name}: {}", s.agent.log());
    }
}

#[test]
fn denials_and_masking_apply_over_the_unix_socket_as_over_tcp() {
    if !require_root("denials_and_masking_apply_over_the_unix_socket_as_over_tcp") {
        return;
    }
    let policies = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let rules = tempfile::tempdir().unwrap();
    let masking = rules.path().join("masking.toml");
    std::fs::write(
        &masking,
        "[[column]]\nname = \"email\"\ncolumn = \"email\"\nstrategy = \"redact\"\n",
    )
    .unwrap();
    let s = setup("unix-policy", None, |o| {
        o.policy_dir = Some(policies);
        o.agent_config = format!("masking_file = \"{}\"\n", masking.display());
        o.extra_config = format!(
            "[[identity]]\nuid = {CLIENT_UID}\nprincipal = \"dev\"\ngroups = [\"developers\"]\n"
        );
    });
    let out = s.psql(Some(&s.pg.socket_dir()), "delete from people");
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(
        out.stderr.contains("no-update-or-delete-without-where"),
        "{}\n{}",
        out.stderr,
        s.agent.log()
    );
    assert_eq!(s.pg.sql("select count(*) from people").unwrap().trim(), "2");
    let out = s.psql(
        Some(&s.pg.socket_dir()),
        "select email from people where id = 1",
    );
    let masked = ok(&out).trim().to_string();
    assert!(
        !masked.contains("ada@example.com"),
        "{masked}\n{}",
        s.agent.log()
    );
}

#[test]
fn pgbench_over_the_unix_socket_works_in_every_query_mode() {
    if !require_root("pgbench_over_the_unix_socket_works_in_every_query_mode") {
        return;
    }
    let s = setup("unix-pgbench", None, |_| {});
    let init = Command::new(s.pg.bin.join("pgbench"))
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
        ])
        .arg(s.pg.port.to_string())
        .arg("postgres")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        let mut cmd = s.cgroup.command(Some(CLIENT_UID), "pgbench");
        cmd.args([
            "-n", "-S", "-t", "50", "-c", "2", "-M", mode, "-U", "postgres", "-p",
        ])
        .arg(s.pg.port.to_string())
        .arg("postgres")
        .env("PGHOST", s.pg.socket_dir());
        let out = run_bounded(&mut cmd, LIMIT).unwrap();
        assert!(
            out.status.success()
                && out
                    .stdout
                    .contains("number of transactions actually processed: 100/100"),
            "pgbench -M {mode}: {}{}\n{}",
            out.stdout,
            out.stderr,
            s.agent.log()
        );
    }
    let sessions = s.agent.sessions().unwrap();
    assert!(sessions.len() >= 6, "{}", sessions.len());
    assert!(sessions.iter().all(|x| x["comm"] == "pgbench"));
}

#[test]
fn other_names_for_the_socket_are_refused_and_unrelated_sockets_are_untouched() {
    if !require_root("other_names_for_the_socket_are_refused_and_unrelated_sockets_are_untouched") {
        return;
    }
    let s = setup("unix-names", None, |_| {});
    let real = s.pg.socket();
    // A symlink in a directory anyone can enter: the hook sees the link's name, the kernel
    // resolves it into the server's directory, which nobody may enter.
    let links = tempfile::tempdir().unwrap();
    std::fs::set_permissions(links.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = links.path().join(format!(".s.PGSQL.{}", s.pg.port));
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert_eq!(s.connect(link.to_str().unwrap()), "PermissionError 13");
    let out = s.psql(Some(links.path()), "select 1");
    assert!(
        !out.status.success(),
        "a symlink must not reach the server: {}",
        out.stdout
    );
    // Through /proc/self/root, and with a doubled slash: other strings, same refusal.
    let via_proc = format!("/proc/self/root{}", real.display());
    assert_eq!(s.connect(&via_proc), "PermissionError 13");
    let doubled = real.to_str().unwrap().replacen('/', "//", 1);
    assert_eq!(s.connect(&doubled), "PermissionError 13");
    // The protected name itself is intercepted.
    assert_eq!(s.connect(real.to_str().unwrap()), "connected");
    // An unrelated socket in the cgroup: reached directly, nothing recorded.
    let other_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(other_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let other = other_dir.path().join("other.sock");
    let listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    assert_eq!(s.connect(other.to_str().unwrap()), "connected");
    assert!(
        listener.accept().is_ok(),
        "the unrelated listener never saw the client"
    );
    // The agent's own listener, named directly: no record, so refused (closed at once).
    let sessions = s.agent.sessions().unwrap();
    assert!(
        sessions.is_empty(),
        "raw connects run no session: {sessions:#?}"
    );
}

#[test]
fn hard_links_and_bind_mounts_of_an_owner_only_socket_are_refused() {
    if !require_root("hard_links_and_bind_mounts_of_an_owner_only_socket_are_refused") {
        return;
    }
    // The socket itself owner-only, as the agent asks a DBA to set it: then no other name of
    // the same inode (which the hook cannot recognise by its string) lets anyone else in.
    let pg = Postgres::start_with(PgOptions {
        settings: vec!["unix_socket_permissions=0700".into()],
        ..PgOptions::default()
    })
    .unwrap();
    let s = setup_on(pg, "unix-links", None, |_| {});
    let real = s.pg.socket();
    let public = tempfile::tempdir().unwrap();
    std::fs::set_permissions(public.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A hard link made by root in a directory anyone can enter.
    let hard = public.path().join("hard.sock");
    std::fs::hard_link(&real, &hard).unwrap();
    assert_eq!(s.connect(hard.to_str().unwrap()), "PermissionError 13");
    // A bind mount of the socket over a file anyone can reach.
    let bound = public.path().join("bound.sock");
    std::fs::write(&bound, b"").unwrap();
    std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mount = run_bounded(
        Command::new("mount").arg("--bind").arg(&real).arg(&bound),
        LIMIT,
    )
    .unwrap();
    assert!(mount.status.success(), "mount --bind: {}", mount.stderr);
    let through_mount = s.connect(bound.to_str().unwrap());
    let _ = run_bounded(Command::new("umount").arg(&bound), LIMIT);
    assert_eq!(through_mount, "PermissionError 13");
    // The protected name still works, through sluice.
    assert_eq!(
        ok(&s.psql(Some(&s.pg.socket_dir()), "select 'via-' || 1")),
        "via-1\n"
    );
    assert_eq!(s.agent.sessions().unwrap().len(), 1);
}

#[test]
fn a_killed_agent_leaves_the_protected_socket_refused_not_bypassed() {
    if !require_root("a_killed_agent_leaves_the_protected_socket_refused_not_bypassed") {
        return;
    }
    let pg = Postgres::start().unwrap();
    let cgroup = Cgroup::create("unix-crash").unwrap();
    let pin = format!("/sys/fs/bpf/sluice-test-unix-crash-{}", std::process::id());
    // The real socket's directory opened to all, so that only sluice stands in between; the
    // agent is told it knows (unix_sockets = "unprotected" skips the start-time check).
    std::fs::set_permissions(
        pg.socket_dir().parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(pg.socket_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let options = || AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![unix_target(
            &pg,
            &format!("[\"{}\"]", pg.socket().display()),
        )],
        pin_dir: Some(pin.clone()),
        agent_config: "unix_sockets = \"unprotected\"\n".into(),
        ..AgentOptions::default()
    };
    let psql = || {
        let mut cmd = cgroup.command(Some(CLIENT_UID), "psql");
        cmd.args(["-X", "-A", "-t", "-U", "postgres", "-d", "postgres", "-p"])
            .arg(pg.port.to_string())
            .args(["-c", "select 'through'"])
            .env("PGHOST", pg.socket_dir());
        run_bounded(&mut cmd, LIMIT).unwrap()
    };
    let mut first = Agent::start(options()).unwrap();
    assert_eq!(ok(&psql()), "through\n", "{}", first.log());
    assert_eq!(first.sessions().unwrap().len(), 1);
    Command::new("kill")
        .args(["-KILL", &first.pid().unwrap().to_string()])
        .status()
        .unwrap();
    first.stop();
    // The pinned program still rewrites to the dead listener: refused, never the server.
    let out = psql();
    assert!(
        !out.status.success(),
        "a crashed agent must not let clients bypass it: {}",
        out.stdout
    );
    let second = Agent::start(options()).unwrap();
    assert_eq!(ok(&psql()), "through\n", "{}", second.log());
}

#[test]
fn a_real_socket_others_can_reach_stops_the_agent_with_the_fix_in_the_message() {
    if !require_root("a_real_socket_others_can_reach_stops_the_agent_with_the_fix_in_the_message") {
        return;
    }
    let pg = Postgres::start().unwrap();
    std::fs::set_permissions(
        pg.socket_dir().parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(pg.socket_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cgroup = Cgroup::create("unix-exposed").unwrap();
    let err = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![unix_target(
            &pg,
            &format!("[\"{}\"]", pg.socket().display()),
        )],
        ..AgentOptions::default()
    })
    .err()
    .expect("the agent must refuse to start");
    let text = format!("{err:#}");
    assert!(
        text.contains("reachable by others than its owner"),
        "{text}"
    );
    assert!(text.contains("unix_socket_permissions = 0700"), "{text}");
}

#[test]
fn the_mariadb_cli_on_the_servers_socket_goes_through_sluice() {
    use sluice_tests::mariadb::{DATABASE, MariaDb, PASSWORD, USER, require_mariadb};
    let test = "the_mariadb_cli_on_the_servers_socket_goes_through_sluice";
    if !require_root(test) || !require_mariadb(test) {
        return;
    }
    let db = MariaDb::start().unwrap();
    db.sql("create table shop.t (id int primary key, name varchar(20)); insert into shop.t values (1, 'ada'), (2, 'grace');")
        .unwrap();
    let cgroup = Cgroup::create("unix-mariadb").unwrap();
    let agent = Agent::start(AgentOptions {
        cgroup: Some(cgroup.path.clone()),
        targets: vec![format!(
            "[[target]]\nname = \"app-db\"\nprotocol = \"mysql\"\nmatch = \"127.0.0.1:{}\"\nsockets = [\"{}\"]\n",
            db.port,
            db.socket.display()
        )],
        ..AgentOptions::default()
    })
    .unwrap();
    let mut cmd = cgroup.command(Some(CLIENT_UID), "mariadb");
    cmd.arg("--no-defaults")
        .arg(format!("--socket={}", db.socket.display()))
        .args([
            "-u",
            USER,
            &format!("-p{PASSWORD}"),
            "--skip-ssl",
            "-B",
            DATABASE,
        ])
        .args(["-e", "select id, name from t order by id"]);
    let out = run_bounded(&mut cmd, LIMIT).unwrap();
    assert_eq!(ok(&out), "id\tname\n1\tada\n2\tgrace\n", "{}", agent.log());
    let sessions = agent.sessions().unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert_eq!(sessions[0]["comm"], "mariadb");
    assert_eq!(sessions[0]["uid"], CLIENT_UID);
    assert_eq!(
        sessions[0]["orig_dst"],
        format!("unix:{}", db.socket.display())
    );
}
