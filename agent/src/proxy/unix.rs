//! The unix-socket road into the proxy: which socket names each target protects, the agent's
//! listener for each such target, the start-time check that the real sockets cannot be reached
//! under another name, and routing a connection accepted on a listener.
//!
//! The eBPF hook matches the name a client passes to connect(), before the kernel resolves
//! it. A symlink, a relative path, `/proc/self/root/...`, a hard link or a bind mount names
//! the same socket with another string, so the hook alone cannot close those. What closes them
//! is that the real socket is reachable only by its owner (the database's OS user, and root):
//! its mode gives group and others no write permission (connect() needs it). A hard link and a
//! bind mount are the same inode with the same mode, so every other name then resolves to a
//! socket the client may not connect to, while the protected names are rewritten to sluice
//! before resolution. A directory above the socket that others cannot search also keeps
//! unprivileged users out, but not from a link root makes elsewhere: accepted with a warning.
//! [`plan`] checks this for every configured socket that exists and refuses to start when
//! neither holds (unless `agent.unix_sockets = "unprotected"`).
//!
//! Invariants:
//! - A listener lives in `agent.unix_listen_dir`, a directory owned by the agent's user (root)
//!   that nobody else may write: no other process can take a listener's name, even while the
//!   agent is down (an abstract name could be taken). The listener itself is world-connectable.
//! - A connection on a listener without a record (someone connected to the listener by its
//!   own name, or the record was lost) is refused, as on the TCP redirect port.
//! - uid, gid and pid come from SO_PEERCRED (the kernel's, at connect()); the record adds the
//!   command, cgroup, time and the socket name the client asked for. A record whose uid
//!   disagrees with SO_PEERCRED is not this connection's: refused.

use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sluice_journal::ProcessInfo;
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use super::{Addr, Entry, Routed, Shared};
use crate::config::{AgentConfig, Target, TargetMatch, UnixSockets, default_sockets};
use crate::intercept::{self, UNIX_PATH_MAX, UnixMatch, UnixPath};

#[derive(Debug, thiserror::Error)]
pub enum UnixError {
    #[error(
        "targets protect unix sockets, but the kernel cannot load the unix-socket hook \
         (cgroup/connect_unix needs Linux 6.7+): refusing to start, since clients could go \
         around sluice through them. Set agent.unix_sockets = \"unprotected\" to start anyway"
    )]
    Hook(#[source] Box<intercept::InterceptError>),
    #[error("target {target}: socket name {name:?} is empty or longer than 108 bytes")]
    BadName { target: String, name: String },
    #[error("targets {first} and {second} both protect the socket {name}")]
    Conflict {
        first: String,
        second: String,
        name: String,
    },
    #[error("unix listener directory {path}: {why}")]
    ListenDir { path: PathBuf, why: String },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is reachable by others than its owner ({why}), so another name for it (a \
         symlink, a hard link, a relative path, /proc/self/root/...) would reach the server \
         around sluice. Make it reachable only by the database's user: PostgreSQL \
         `unix_socket_permissions = 0700` (or chmod 700 its socket directory), MariaDB chmod 700 \
         its socket directory. Or set agent.unix_sockets = \"unprotected\""
    )]
    Exposed { path: PathBuf, why: String },
    #[error("agent.unix_exempt_cgroups: {path}")]
    ExemptCgroup {
        path: PathBuf,
        #[source]
        source: Box<intercept::InterceptError>,
    },
}

/// What the agent listens on and what the unix hook is told.
pub(crate) struct Plan {
    pub matches: Vec<UnixMatch>,
    /// (listener, target id, its path)
    pub listeners: Vec<(UnixListener, u32, PathBuf)>,
}

/// The socket names `t` protects: its `sockets`, or the standard ones for its port when the
/// target is on this host (`locals`: the host's interface addresses).
pub(crate) fn names(t: &Target, locals: &[IpAddr]) -> Vec<String> {
    if let Some(names) = &t.sockets {
        return names.clone();
    }
    match t.matches {
        Some(TargetMatch::Exact(a))
            if a.ip().is_loopback() || a.ip().is_unspecified() || locals.contains(&a.ip()) =>
        {
            default_sockets(t.protocol, a.port())
        }
        Some(TargetMatch::AnyAddress { port }) => default_sockets(t.protocol, port),
        _ => Vec::new(),
    }
}

/// Resolves every target's names, checks the real sockets, and binds one listener per target
/// that protects any.
pub(crate) fn plan(
    agent: &AgentConfig,
    targets: &[Target],
    locals: &[IpAddr],
) -> Result<Plan, UnixError> {
    let mut matches: Vec<UnixMatch> = Vec::new();
    let mut listeners = Vec::new();
    let mut owners: Vec<(UnixPath, String)> = Vec::new();
    for t in targets {
        let names = names(t, locals);
        if names.is_empty() {
            continue;
        }
        let listener_path = agent.unix_listen_dir.join(format!("target-{}.sock", t.id));
        let mut mine = Vec::new();
        for name in &names {
            let parsed = UnixPath::new(name).ok_or_else(|| UnixError::BadName {
                target: t.name.clone(),
                name: name.clone(),
            })?;
            if let Some((_, first)) = owners.iter().find(|(p, _)| *p == parsed) {
                if *first == t.name {
                    continue; // listed twice
                }
                return Err(UnixError::Conflict {
                    first: first.clone(),
                    second: t.name.clone(),
                    name: name.clone(),
                });
            }
            owners.push((parsed, t.name.clone()));
            if !parsed.is_abstract() {
                check_owner_only(Path::new(name), agent.unix_sockets)?;
            }
            mine.push(UnixMatch {
                name: parsed,
                target_id: t.id,
                listener: listener_path.clone(),
            });
        }
        if let Some(backend) = &t.socket_backend {
            check_owner_only(backend, agent.unix_sockets)?;
        }
        prepare_dir(&agent.unix_listen_dir)?;
        listeners.push((listen(&listener_path)?, t.id, listener_path.clone()));
        info!(target = %t.name, listener = %listener_path.display(), sockets = ?names, "unix socket names protected");
        matches.extend(mine);
    }
    Ok(Plan { matches, listeners })
}

/// The ids of `agent.unix_exempt_cgroups`.
pub(crate) fn exempt_cgroups(agent: &AgentConfig) -> Result<Vec<u64>, UnixError> {
    agent
        .unix_exempt_cgroups
        .iter()
        .map(|path| {
            intercept::cgroup_id(path).map_err(|source| UnixError::ExemptCgroup {
                path: path.clone(),
                source: Box::new(source),
            })
        })
        .collect()
}

/// Who can reach an existing socket other than through the protected names.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// The socket's own mode gives group and others no write permission: every other name for
    /// it (a symlink, a hard link, a bind mount, `/proc/self/root/...`) refuses them too, since
    /// a hard link or a bind mount is the same inode with the same mode.
    OwnerOnly,
    /// Only a directory above it keeps others out (this one). An unprivileged user cannot name
    /// the socket through it, nor hard-link it elsewhere; a hard link or bind mount that root
    /// makes in a public place would reach it.
    Directory(PathBuf),
    /// Others can connect (why).
    Exposed(String),
}

fn reach(path: &Path) -> Reach {
    let Ok(meta) = std::fs::metadata(path) else {
        return Reach::OwnerOnly; // nothing there yet: nothing to reach
    };
    let mode = meta.permissions().mode();
    if mode & 0o022 == 0 {
        return Reach::OwnerOnly;
    }
    let mut dir = path.parent();
    while let Some(d) = dir {
        if let Ok(m) = std::fs::metadata(d)
            && m.permissions().mode() & 0o011 == 0
        {
            return Reach::Directory(d.to_path_buf());
        }
        dir = d.parent();
    }
    Reach::Exposed(format!(
        "the socket's mode is {:o} and every directory above it lets others through",
        mode & 0o7777
    ))
}

fn check_owner_only(path: &Path, mode: UnixSockets) -> Result<(), UnixError> {
    match (reach(path), mode) {
        (Reach::OwnerOnly, _) => Ok(()),
        (Reach::Directory(dir), _) => {
            warn!(socket = %path.display(), directory = %dir.display(), "this socket is closed to others only by its directory: a hard link or bind mount that root makes elsewhere would reach the server around sluice. Make the socket itself owner-only (PostgreSQL unix_socket_permissions = 0700)");
            Ok(())
        }
        (Reach::Exposed(why), UnixSockets::Protected) => Err(UnixError::Exposed {
            path: path.to_path_buf(),
            why,
        }),
        (Reach::Exposed(why), UnixSockets::Unprotected) => {
            error!(socket = %path.display(), reason = %why, "UNIX SOCKET UNPROTECTED: other names for this socket reach the server around sluice (agent.unix_sockets = \"unprotected\")");
            Ok(())
        }
    }
}

/// Creates the listener directory (mode 755) or checks it: owned by us, writable by nobody
/// else, so that no other process can put a socket under a listener's name.
fn prepare_dir(dir: &Path) -> Result<(), UnixError> {
    let fail = |why: String| UnixError::ListenDir {
        path: dir.to_path_buf(),
        why,
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| fail(e.to_string()))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(fail(format!(
            "owned by uid {}, not by the agent's uid {me}",
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(fail(format!(
            "writable by others (mode {:o}): chmod 755 it",
            meta.permissions().mode() & 0o7777
        )));
    }
    Ok(())
}

/// Binds `path` (replacing a stale socket a previous agent left), world-connectable.
fn listen(path: &Path) -> Result<UnixListener, UnixError> {
    let fail = |source| UnixError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if path.as_os_str().len() > UNIX_PATH_MAX - 1 {
        return Err(fail(std::io::Error::other(
            "longer than a unix socket address allows (107 bytes)",
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(fail)?,
        Ok(_) => {
            return Err(fail(std::io::Error::other(
                "exists and is not a socket: remove it",
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(fail)?;
    Ok(listener)
}

/// Routes a connection accepted on target `entry`'s unix listener (None: refused, logged).
pub(crate) fn route(
    stream: &UnixStream,
    client_addr: Addr,
    entry: Entry,
    shared: &Shared,
) -> Option<Routed> {
    let Entry::Unix { target_id } = entry else {
        return None;
    };
    let conns = shared.unix_conns.as_ref()?;
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "unix client gone before it could be routed");
            return None;
        }
    };
    let record = match conns.take(stream.as_fd()) {
        Ok(Some(r)) => r,
        Ok(None) => {
            warn!(uid = cred.uid(), pid = ?cred.pid(), listener = %client_addr, "connection to a unix listener without an interception record: closed");
            return None;
        }
        Err(e) => {
            error!(error = %crate::error_chain(&e), "cannot read the unix interception record");
            return None;
        }
    };
    if record.uid != cred.uid() || record.target_id != target_id {
        warn!(
            record_uid = record.uid,
            peer_uid = cred.uid(),
            record_target = record.target_id,
            target_id,
            "unix interception record does not match the connection: closed"
        );
        return None;
    }
    let target = shared.target(target_id)?.clone();
    let orig = Addr::Unix(PathBuf::from(&record.orig));
    let backend = match &target.socket_backend {
        Some(p) => Addr::Unix(p.clone()),
        None => orig.clone(),
    };
    Some(Routed {
        target,
        backend,
        orig_dst: orig,
        client_addr,
        process: Some(ProcessInfo {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred
                .pid()
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(record.pid),
            comm: record.comm,
            cgroup_id: record.cgroup_id,
            connected_ns: record
                .connected_at
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        }),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    #[test]
    fn a_local_target_protects_the_standard_names_for_its_port() {
        let mut t = Target::plain(1, "pg", Protocol::Postgres);
        t.matches = Some(TargetMatch::Exact("127.0.0.1:5433".parse().unwrap()));
        let n = names(&t, &[]);
        assert!(n.contains(&"/run/postgresql/.s.PGSQL.5433".to_string()));
        assert!(n.contains(&"/var/run/postgresql/.s.PGSQL.5433".to_string()));
        assert!(n.contains(&"@/run/postgresql/.s.PGSQL.5433".to_string()));
        t.matches = Some(TargetMatch::Exact("10.1.2.3:5433".parse().unwrap()));
        assert!(
            names(&t, &[]).is_empty(),
            "a remote backend has no socket here"
        );
        t.sockets = Some(vec!["/x/.s.PGSQL.1".into()]);
        assert_eq!(names(&t, &[]), vec!["/x/.s.PGSQL.1".to_string()]);
        let mut m = Target::plain(2, "my", Protocol::Mysql);
        m.matches = Some(TargetMatch::AnyAddress { port: 3306 });
        assert!(names(&m, &[]).contains(&"/run/mysqld/mysqld.sock".to_string()));
    }

    #[test]
    fn a_socket_only_its_owner_can_reach_is_not_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // The directory is 0700: nobody else gets through it, but a link root makes elsewhere would.
        assert_eq!(reach(&sock), Reach::Directory(dir.path().to_path_buf()));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // /tmp and / are searchable by all: exposed unless the socket itself is closed.
        assert!(matches!(reach(&sock), Reach::Exposed(_)));
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(reach(&sock), Reach::OwnerOnly);
    }
}
