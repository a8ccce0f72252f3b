//! Interception: the eBPF programs of `agent-ebpf/` that steer every TCP connect to a protected
//! destination into the local proxy, and typed access to what they record. The only module of
//! the agent that calls aya (and the few syscalls around it, in [`sys`]).
//!
//! ```text
//! client connect(db:5432) in the attached cgroup
//!   cgroup/connect4|6   protected (targets) and not exempt (SO_MARK, agent cgroup)?
//!                       socks[cookie] = {orig dst, uid, gid, pid, comm, cgroup, boot_ns}
//!                       dst := 127.0.0.1:proxy_port | [::1]:proxy_port | [::ffff:127.0.0.1]:..
//!   sockops             ACTIVE_ESTABLISHED: conns[{client, proxy}] = socks[cookie]
//!   getpeername4|6      the client sees db:5432
//!   sock_release        socks[cookie] deleted
//! proxy accept()        ConnTable::take(peer, local) -> OrigRecord (and the entry is deleted)
//! ```
//!
//! Invariants:
//! - Fail closed. Links are pinned under `pin_dir`, so a crashed (or merely dropped) agent
//!   leaves connections redirected to a port nobody answers; only [`Interceptor::detach`]
//!   lets traffic flow directly again. A new [`Interceptor::attach`] on the same `pin_dir`
//!   attaches first, then replaces the stale links.
//! - The `targets` map changes only through [`TargetTable::replace`] (DNS-named targets whose
//!   addresses moved): new entries are inserted before stale ones are removed, so an address
//!   that stays protected is never unprotected in between.
//! - A record is consumed once: `take` deletes it, so an LRU map never fills with accepted
//!   connections; entries nobody takes (the proxy was down) are evicted by the LRU.
//! - The proxy must listen on `127.0.0.1:proxy_port` and `[::1]:proxy_port`, and mark its
//!   upstream sockets with `SO_MARK = mark` (or run in the exempt cgroup), or its own dials
//!   loop back into itself.
//!
//! Unix sockets ([`unix`], a second object loaded with libbpf, kernel 6.7+):
//! ```text
//! client connect("/run/postgresql/.s.PGSQL.5432") in the attached cgroup
//!   cgroup/connect_unix protected name (unix_targets) and not exempt (SO_MARK, exempt cgroups)?
//!                       unix_conns[client socket inode] = {name, uid, gid, pid, comm, cgroup}
//!                       path := the target's agent listener (a file in a root-owned directory)
//! proxy accept()        UnixTable::take(accepted) -> sock_diag peer inode -> UnixRecord
//! ```
//! It is loaded only when a target protects a unix socket name, and attached and pinned with
//! the TCP programs (same pin directory, same stale-link replacement, same fail-closed rule).

mod cgroup;
mod maps;
mod programs;
mod sys;
mod unix;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::links::PinnedLink,
};

pub use cgroup::{cgroup_id, cgroup2_root, own_cgroup_id, process_cgroup_id};
use maps::{ConnKey, RawOrigRecord, TargetKey, TargetValue};
pub(crate) use sys::BPFFS;
pub use unix::{PATH_MAX as UNIX_PATH_MAX, UnixCounters, UnixMatch, UnixPath, UnixRecord};

/// Where and how to intercept.
#[derive(Clone, Debug)]
pub struct InterceptConfig {
    /// cgroup v2 directory to attach to (the cgroup2 root in production).
    pub cgroup: PathBuf,
    /// The proxy listens on 127.0.0.1:port and [::1]:port.
    pub proxy_port: u16,
    /// SO_MARK the proxy puts on its upstream sockets (0: no mark exemption).
    pub mark: u32,
    /// The agent's own cgroup id, when exempt.
    pub exempt_cgroup_id: Option<u64>,
    /// bpffs directory for pinned links, e.g. /sys/fs/bpf/sluice/<name>; owned by this agent.
    pub pin_dir: PathBuf,
}

/// One protected destination, as the proxy configured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// This address and port. A local address (127/8, 0.0.0.0, ::1, ::) also protects every
    /// local address on the port, see `maps::target_entries`.
    Exact(SocketAddr),
    /// Any loopback or unspecified address on this port.
    AnyLocal { port: u16 },
    /// Any address on this port.
    Any { port: u16 },
}

/// What the client was doing when the eBPF side redirected it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrigRecord {
    /// Where the client was going (IPv4 and IPv4-mapped destinations as `SocketAddr::V4`).
    pub orig_dst: SocketAddr,
    pub target_id: u32,
    pub uid: u32,
    pub gid: u32,
    /// Thread group id of the process that called connect().
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub connected_at: SystemTime,
}

/// The `counters` map, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connects rewritten to the proxy.
    pub redirected: u64,
    /// Protected connects let through because of SO_MARK.
    pub exempt_mark: u64,
    /// Protected connects let through because of the agent's cgroup.
    pub exempt_cgroup: u64,
    /// Redirected connections whose record reached the `conns` map.
    pub established: u64,
    /// getpeername() answers rewritten to the original peer.
    pub peer_restored: u64,
    /// Map updates that failed (map full, ...): those connections are refused by the proxy.
    pub record_failed: u64,
    /// Protected connects from another network namespace, refused with EPERM.
    pub other_netns: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("reading the agent's network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+)")]
    NetnsCookie {
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 file system in /proc/self/mountinfo")]
    Cgroup2NotMounted,
    #[error("no cgroup v2 (0::) line in /proc/self/cgroup")]
    OwnCgroupUnknown,
    #[error("reading {path}")]
    ReadProc {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the cgroup id of {path}")]
    CgroupId {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error("opening cgroup {path}")]
    OpenCgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting bpffs at {path}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin directory {path} is not on a bpffs")]
    PinDirNotBpffs { path: PathBuf },
    #[error(
        "targets {first:?} (id {first_id}) and {second:?} (id {second_id}) claim the same destinations"
    )]
    ConflictingTargets {
        first: Match,
        first_id: u32,
        second: Match,
        second_id: u32,
    },
    #[error("target {target:?} would redirect the proxy's own port {proxy_port} to itself")]
    TargetIsProxy { target: Match, proxy_port: u16 },
    #[error("loading the eBPF object")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    #[error("the eBPF object has no program {program}")]
    MissingProgram { program: &'static str },
    #[error("the eBPF object has no map {map}")]
    MissingMap { map: &'static str },
    /// Loading (the verifier log is in the source's message), typing or taking a program.
    #[error("eBPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching eBPF program {program} to {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF program {program} has no fd-based link")]
    Link {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning the link of {program} at {path}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("unpinning {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("listing interface addresses")]
    Interfaces {
        #[source]
        source: nix::Error,
    },
    #[error("reading CLOCK_BOOTTIME")]
    Clock {
        #[source]
        source: nix::Error,
    },
    /// libbpf's own messages (the verifier's log among them) are in `log`, as
    /// " (libbpf: ...)" or empty.
    #[error("{what}{log}")]
    Unix {
        what: &'static str,
        log: String,
        #[source]
        source: libbpf_rs::Error,
    },
    #[error("agent listener path {path} does not fit in a unix socket address (108 bytes)")]
    UnixListenerPath { path: PathBuf },
    #[error("finding the client socket of an accepted unix connection (sock_diag)")]
    PeerInode {
        #[source]
        source: std::io::Error,
    },
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> InterceptError {
    move |source| InterceptError::Map { map, source }
}

/// The loaded, attached programs. Dropping it without [`Interceptor::detach`] leaves the
/// programs attached through their pinned links, exactly as a crash would.
pub struct Interceptor {
    links: Vec<PinnedLink>,
    pin_dir: PathBuf,
    conns: ConnTable,
    targets: TargetTable,
    /// The unix side, when a target protects a socket name.
    unix: Option<(UnixTable, libbpf_rs::MapHandle)>,
    counters: PerCpuArray<MapData, u64>,
    /// Keeps the programs and the remaining maps loaded for the agent's lifetime.
    _ebpf: Ebpf,
}

impl Interceptor {
    /// Loads, fills `targets`, attaches all programs to cfg.cgroup, pins the links under pin_dir
    /// (so that a crashed agent leaves connections redirected to a dead port: fail closed),
    /// replacing any stale pinned links a previous crashed run left there (after the new ones
    /// are attached, so nothing slips through in between).
    pub fn attach(
        cfg: &InterceptConfig,
        targets: &[(Match, u32 /*target_id*/)],
    ) -> Result<Interceptor, InterceptError> {
        Interceptor::attach_with_unix(cfg, targets, &[], &[])
    }

    /// [`Interceptor::attach`], plus `cgroup/connect_unix` for `unix` (when not empty): the
    /// program is attached before any stale link is replaced and pinned beside the others.
    /// `unix_exempt_cgroups` are exempt from it besides the agent's own cgroup (the database
    /// service's, so that its own tools reach its socket).
    pub fn attach_with_unix(
        cfg: &InterceptConfig,
        targets: &[(Match, u32 /*target_id*/)],
        unix: &[UnixMatch],
        unix_exempt_cgroups: &[u64],
    ) -> Result<Interceptor, InterceptError> {
        let entries = maps::target_entries(targets, cfg.proxy_port)?;
        if !sys::is_cgroup2(&cfg.cgroup) {
            return Err(InterceptError::NotCgroup2 {
                path: cfg.cgroup.clone(),
            });
        }
        sys::ensure_bpffs()?;
        std::fs::create_dir_all(&cfg.pin_dir).map_err(|source| InterceptError::PinDir {
            path: cfg.pin_dir.clone(),
            source,
        })?;
        if !sys::is_bpffs(&cfg.pin_dir) {
            return Err(InterceptError::PinDirNotBpffs {
                path: cfg.pin_dir.clone(),
            });
        }

        let mut ebpf = programs::load(&programs::Knobs {
            proxy_port: u32::from(cfg.proxy_port),
            // Network order, as the program stores it straight into user_ip4.
            proxy_ip4: u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets()),
            exempt_mark: cfg.mark,
            exempt_cgroup_id: cfg.exempt_cgroup_id.unwrap_or(0),
            proxy_netns_cookie: sys::own_netns_cookie()
                .map_err(|source| InterceptError::NetnsCookie { source })?,
        })?;

        let target_map: HashMap<_, TargetKey, TargetValue> =
            HashMap::try_from(take_map(&mut ebpf, "targets")?).map_err(map_err("targets"))?;
        let targets = TargetTable {
            map: Arc::new(Mutex::new(target_map)),
            proxy_port: cfg.proxy_port,
        };
        targets.write(&entries)?;
        let conns: HashMap<_, ConnKey, RawOrigRecord> =
            HashMap::try_from(take_map(&mut ebpf, "conns")?).map_err(map_err("conns"))?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(take_map(&mut ebpf, "counters")?).map_err(map_err("counters"))?;

        let links = programs::attach_all(&mut ebpf, &cfg.cgroup)?;
        let mut unix_loaded: Option<unix::Loaded> = if unix.is_empty() {
            None
        } else {
            let dir =
                std::fs::File::open(&cfg.cgroup).map_err(|source| InterceptError::OpenCgroup {
                    path: cfg.cgroup.clone(),
                    source,
                })?;
            let mut exempt: Vec<u64> = unix_exempt_cgroups.to_vec();
            exempt.extend(cfg.exempt_cgroup_id);
            Some(unix::load_and_attach(&dir, unix, cfg.mark, &exempt)?)
        };
        let links = programs::replace_pins(&cfg.pin_dir, links)?;
        let unix_side = match unix_loaded.take() {
            Some(mut loaded) => {
                unix::pin(&mut loaded.link, &cfg.pin_dir.join(unix::PROGRAM))?;
                // The pinned link keeps the program attached; the handle on it drops here.
                Some((
                    UnixTable {
                        map: Arc::new(loaded.conns),
                    },
                    loaded.counters,
                ))
            }
            None => None,
        };
        tracing::info!(
            cgroup = %cfg.cgroup.display(),
            pin_dir = %cfg.pin_dir.display(),
            proxy_port = cfg.proxy_port,
            targets = entries.len(),
            unix_names = unix.len(),
            "eBPF interception attached"
        );
        Ok(Interceptor {
            links,
            unix: unix_side,
            pin_dir: cfg.pin_dir.clone(),
            conns: ConnTable {
                map: Arc::new(Mutex::new(conns)),
            },
            targets,
            counters,
            _ebpf: ebpf,
        })
    }

    /// A cheap, clonable, Send + Sync handle the accept loop uses.
    pub fn connections(&self) -> ConnTable {
        self.conns.clone()
    }

    /// A clonable handle on the `targets` map, to change what is protected while attached.
    pub fn targets(&self) -> TargetTable {
        self.targets.clone()
    }

    /// The unix side's handle for the accept loop (None: no unix socket name is protected).
    pub fn unix_connections(&self) -> Option<UnixTable> {
        self.unix.as_ref().map(|(t, _)| t.clone())
    }

    /// The unix program's counters, summed over CPUs (None: not loaded).
    pub fn unix_counters(&self) -> Option<Result<UnixCounters, InterceptError>> {
        self.unix.as_ref().map(|(_, c)| unix::counters(c))
    }

    /// The eBPF counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, InterceptError> {
        let get = |index: u32| -> Result<u64, InterceptError> {
            let per_cpu = self.counters.get(&index, 0).map_err(map_err("counters"))?;
            Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(Counters {
            redirected: get(maps::CNT_REDIRECTED)?,
            exempt_mark: get(maps::CNT_EXEMPT_MARK)?,
            exempt_cgroup: get(maps::CNT_EXEMPT_CGROUP)?,
            established: get(maps::CNT_ESTABLISHED)?,
            peer_restored: get(maps::CNT_PEER_RESTORED)?,
            record_failed: get(maps::CNT_RECORD_FAILED)?,
            other_netns: get(maps::CNT_OTHER_NETNS)?,
        })
    }

    /// Detach and unpin everything (graceful shutdown); removes `pin_dir` once empty.
    pub fn detach(self) -> Result<(), InterceptError> {
        for link in self.links {
            // Unpinning removes the file; dropping the returned FdLink closes the last
            // reference, which detaches the program from the cgroup.
            let fd_link = link.unpin().map_err(|source| InterceptError::Unpin {
                path: self.pin_dir.clone(),
                source,
            })?;
            drop(fd_link);
        }
        programs::remove_pins(&self.pin_dir)?;
        if let Err(error) = std::fs::remove_dir(&self.pin_dir) {
            tracing::debug!(pin_dir = %self.pin_dir.display(), %error, "pin directory kept");
        }
        tracing::info!(pin_dir = %self.pin_dir.display(), "eBPF interception detached");
        Ok(())
    }
}

fn take_map(ebpf: &mut Ebpf, map: &'static str) -> Result<aya::maps::Map, InterceptError> {
    ebpf.take_map(map).ok_or(InterceptError::MissingMap { map })
}

/// The `unix_conns` map: redirected unix connects by the client socket's inode.
#[derive(Clone)]
pub struct UnixTable {
    map: Arc<libbpf_rs::MapHandle>,
}

impl std::fmt::Debug for UnixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixTable").finish_non_exhaustive()
    }
}

impl UnixTable {
    /// Looks up and removes the record of the client at the other end of `accepted` (a
    /// connection accepted on an agent listener). `Ok(None)`: not redirected by us (someone
    /// connected to the listener by its own name) or the record was lost: refuse it.
    pub fn take(
        &self,
        accepted: std::os::fd::BorrowedFd<'_>,
    ) -> Result<Option<UnixRecord>, InterceptError> {
        let Some(ino) = sys::unix_peer_inode(accepted)
            .map_err(|source| InterceptError::PeerInode { source })?
        else {
            return Ok(None);
        };
        unix::take(&self.map, ino)
    }
}

/// The `conns` map: redirected connections by the 4-tuple the proxy sees at accept().
#[derive(Clone)]
pub struct ConnTable {
    /// `HashMap::remove` needs `&mut`; the lock is held for two map syscalls, never across an
    /// await point.
    map: Arc<Mutex<HashMap<MapData, ConnKey, RawOrigRecord>>>,
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable").finish_non_exhaustive()
    }
}

impl ConnTable {
    /// Looks up and removes the record for an accepted connection (peer = client addr, local =
    /// proxy addr). `Ok(None)`: the connection was not redirected by us (or its record was
    /// lost): the proxy must refuse it.
    pub fn take(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<OrigRecord>, InterceptError> {
        let key = ConnKey::new(peer, local);
        let raw = {
            // A poisoned lock only means another thread panicked between two syscalls; the map
            // itself lives in the kernel and is intact.
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            let raw = match map.get(&key, 0) {
                Ok(raw) => raw,
                Err(MapError::KeyNotFound) => return Ok(None),
                Err(source) => {
                    return Err(InterceptError::Map {
                        map: "conns",
                        source,
                    });
                }
            };
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(source) => {
                    return Err(InterceptError::Map {
                        map: "conns",
                        source,
                    });
                }
            }
            raw
        };
        Ok(Some(OrigRecord::from_raw(&raw)?))
    }
}

/// The `targets` map: which destinations are protected, by which target id.
#[derive(Clone)]
pub struct TargetTable {
    /// Held for the map syscalls of one replacement, never across an await point.
    map: Arc<Mutex<HashMap<MapData, TargetKey, TargetValue>>>,
    proxy_port: u16,
}

impl std::fmt::Debug for TargetTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetTable").finish_non_exhaustive()
    }
}

impl TargetTable {
    /// Makes the map hold exactly the entries of `targets` (checked as at attach: conflicts and
    /// the proxy's own port are refused, and the map is left as it was). Entries are inserted
    /// first and stale ones removed after, so what stays protected never has a gap.
    pub fn replace(&self, targets: &[(Match, u32)]) -> Result<(), InterceptError> {
        let entries = maps::target_entries(targets, self.proxy_port)?;
        self.write(&entries)
    }

    fn write(&self, entries: &[(TargetKey, TargetValue)]) -> Result<(), InterceptError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        for (key, value) in entries {
            map.insert(key, value, 0).map_err(map_err("targets"))?;
        }
        let stale: Vec<TargetKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !entries.iter().any(|(e, _)| e == k))
            .collect();
        for key in &stale {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
                Err(source) => {
                    return Err(InterceptError::Map {
                        map: "targets",
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

impl OrigRecord {
    fn from_raw(raw: &RawOrigRecord) -> Result<Self, InterceptError> {
        let comm_len = raw
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(raw.comm.len());
        Ok(OrigRecord {
            orig_dst: maps::socket_addr(raw.orig_addr, raw.orig_port),
            target_id: raw.target_id,
            uid: raw.uid,
            gid: raw.gid,
            pid: raw.pid,
            comm: String::from_utf8_lossy(&raw.comm[..comm_len]).into_owned(),
            cgroup_id: raw.cgroup_id,
            connected_at: sys::boot_ns_to_system_time(raw.boot_ns)?,
        })
    }
}

/// Host interface addresses, for the proxy to add `Exact` entries for a local backend.
pub fn local_addresses() -> Result<Vec<IpAddr>, InterceptError> {
    sys::local_addresses()
}

const _: () = {
    const fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<ConnTable>();
    send_sync::<TargetTable>();
    send_sync::<UnixTable>();
};

#[cfg(test)]
mod tests;
