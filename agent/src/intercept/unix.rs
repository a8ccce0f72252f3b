//! The unix-socket side of interception: `agent-ebpf/sluice_unix.bpf.o` (`cgroup/connect_unix`,
//! kernel 6.7+) rewrites a connect to a protected socket name into the target's agent listener,
//! and records who connected and to which name, keyed by the client socket's inode number.
//!
//! aya 0.14 parses neither the `cgroup/connect_unix` section nor kfunc calls
//! (`bpf_cast_to_kern_ctx`, `bpf_sock_addr_set_sun_path`), so this one object is loaded with
//! libbpf (libbpf-rs over a static libbpf 1.7; Debian's 1.1 knows neither). Its link is pinned
//! in the same directory as aya's links, as `sluice_connect_unix`, so the same stale-link
//! replacement and the same fail-closed behaviour hold (see `programs::replace_pins`).
//!
//! Invariants:
//! - `#[repr(C)]` mirrors of `agent-ebpf/sluice_unix.h` with compile-time size asserts; libbpf
//!   checks key and value sizes again on every map call (a mismatch is an error, not UB).
//! - A [`UnixPath`] is built by [`UnixPath::new`] only, in the kernel's resolved form (a
//!   filesystem name up to its first NUL, an abstract name exactly), the same form the program
//!   builds, so one configured name matches exactly the connects that name the same socket.
//! - This file never decides policy: it hands [`UnixRecord`]s to the proxy.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    sync::Mutex,
};

use libbpf_rs::{Link, MapCore as _, MapFlags, MapHandle, ObjectBuilder, PrintLevel};

use super::InterceptError;

/// The object built by `cargo xtask build-ebpf`, committed next to its source.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../agent-ebpf/sluice_unix.bpf.o");

/// The program's name in the object, and its pin's name under the pin directory.
pub(crate) const PROGRAM: &str = "sluice_connect_unix";

/// `SLUICE_UNIX_PATH_MAX` (the kernel's UNIX_PATH_MAX).
pub const PATH_MAX: usize = 108;
const COMM_LEN: usize = 16;

/// `enum sluice_unix_counter`.
const CNT_REDIRECTED: u32 = 0;
const CNT_EXEMPT_MARK: u32 = 1;
const CNT_EXEMPT_CGROUP: u32 = 2;
const CNT_RECORD_FAILED: u32 = 3;
const CNT_REFUSED: u32 = 4;

/// `struct unix_path`: a unix socket name in the kernel's resolved form.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UnixPath {
    len: u32,
    path: [u8; PATH_MAX],
}

/// `struct unix_target`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUnixTarget {
    target_id: u32,
    listener_len: u32,
    listener: [u8; PATH_MAX],
}

/// `struct unix_record`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUnixRecord {
    target_id: u32,
    uid: u32,
    gid: u32,
    pid: u32,
    cgroup_id: u64,
    boot_ns: u64,
    comm: [u8; COMM_LEN],
    orig: UnixPath,
}

/// `struct unix_knobs`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawKnobs {
    exempt_mark: u32,
    pad: u32,
}

const _: () = {
    assert!(size_of::<UnixPath>() == 112);
    assert!(size_of::<RawUnixTarget>() == 116);
    assert!(size_of::<RawUnixRecord>() == 160);
    assert!(size_of::<RawKnobs>() == 8);
};

/// Plain-old-data views of the mirrors, for the map calls.
macro_rules! bytes_of {
    ($t:ty) => {
        impl $t {
            #[allow(unsafe_code)]
            fn as_bytes(&self) -> &[u8] {
                // SAFETY: #[repr(C)], only integer and byte-array fields, no padding (the size
                // asserts above equal the sum of the fields).
                unsafe {
                    std::slice::from_raw_parts(
                        (self as *const Self).cast::<u8>(),
                        size_of::<Self>(),
                    )
                }
            }
        }
    };
}
bytes_of!(UnixPath);
bytes_of!(RawUnixTarget);
bytes_of!(RawKnobs);

impl RawUnixRecord {
    fn from_bytes(b: &[u8]) -> Option<RawUnixRecord> {
        let u32_at = |o: usize| Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?));
        if b.len() != size_of::<RawUnixRecord>() {
            return None;
        }
        let mut comm = [0u8; COMM_LEN];
        comm.copy_from_slice(b.get(32..48)?);
        let mut path = [0u8; PATH_MAX];
        path.copy_from_slice(b.get(52..160)?);
        Some(RawUnixRecord {
            target_id: u32_at(0)?,
            uid: u32_at(4)?,
            gid: u32_at(8)?,
            pid: u32_at(12)?,
            cgroup_id: u64_at(16)?,
            boot_ns: u64_at(24)?,
            comm,
            orig: UnixPath {
                len: u32_at(48)?,
                path,
            },
        })
    }
}

impl UnixPath {
    /// A socket name as configured: `@name` is the abstract name `\0name` (PostgreSQL's and
    /// ss's spelling), anything else a filesystem name. None when it is empty or does not
    /// fit in a sockaddr_un.
    pub fn new(name: &str) -> Option<UnixPath> {
        let bytes: Vec<u8> = match name.strip_prefix('@') {
            Some(abstract_name) => std::iter::once(0).chain(abstract_name.bytes()).collect(),
            None => name.bytes().take_while(|&b| b != 0).collect(),
        };
        if bytes.is_empty() || bytes.len() > PATH_MAX || (bytes == [0]) {
            return None;
        }
        let mut path = [0u8; PATH_MAX];
        path[..bytes.len()].copy_from_slice(&bytes);
        Some(UnixPath {
            len: u32::try_from(bytes.len()).ok()?,
            path,
        })
    }

    fn bytes(&self) -> &[u8] {
        let n = usize::try_from(self.len).unwrap_or(PATH_MAX).min(PATH_MAX);
        &self.path[..n]
    }

    /// Whether this is an abstract name (no file in any file system).
    pub fn is_abstract(&self) -> bool {
        self.path[0] == 0
    }

    /// The configured spelling back: `@name` for an abstract name.
    pub fn display(&self) -> String {
        match self.bytes().split_first() {
            Some((&0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
            _ => String::from_utf8_lossy(self.bytes()).into_owned(),
        }
    }
}

impl std::fmt::Debug for UnixPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

/// One protected socket name and the agent listener its connects go to.
#[derive(Clone, Debug)]
pub struct UnixMatch {
    pub name: UnixPath,
    pub target_id: u32,
    /// A filesystem path of at most [`PATH_MAX`] bytes.
    pub listener: std::path::PathBuf,
}

/// What the program recorded about a redirected unix connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixRecord {
    pub target_id: u32,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub connected_at: std::time::SystemTime,
    /// The socket name the client connected to (`@...` for an abstract one).
    pub orig: String,
}

/// The unix program's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixCounters {
    pub redirected: u64,
    pub exempt_mark: u64,
    pub exempt_cgroup: u64,
    pub record_failed: u64,
    /// Protected connects refused because the rewrite failed (fail closed).
    pub refused: u64,
}

/// The loaded object's maps the agent keeps, and the link until it is pinned.
pub(crate) struct Loaded {
    pub conns: MapHandle,
    pub counters: MapHandle,
    pub link: Link,
}

/// libbpf's messages (the verifier log among them) while a load runs, for the error.
static LOG: Mutex<String> = Mutex::new(String::new());

fn collect_log(level: PrintLevel, line: String) {
    if !matches!(level, PrintLevel::Debug)
        && let Ok(mut log) = LOG.lock()
        && log.len() < 64 * 1024
    {
        log.push_str(&line);
    }
}

fn unix_err(what: &'static str) -> impl Fn(libbpf_rs::Error) -> InterceptError {
    move |source| {
        let log = LOG
            .lock()
            .map(|l| l.trim_end().to_string())
            .unwrap_or_default();
        InterceptError::Unix {
            what,
            log: if log.is_empty() {
                log
            } else {
                format!(" (libbpf: {log})")
            },
            source,
        }
    }
}

/// Loads the object, fills its maps and attaches the program to `cgroup` (not pinned yet: the
/// caller pins it once stale links are replaced).
pub(crate) fn load_and_attach(
    cgroup: &std::fs::File,
    matches: &[UnixMatch],
    exempt_mark: u32,
    exempt_cgroups: &[u64],
) -> Result<Loaded, InterceptError> {
    let mut entries = Vec::with_capacity(matches.len());
    for m in matches {
        let listener = m.listener.as_os_str().as_encoded_bytes();
        if listener.is_empty() || listener.len() > PATH_MAX {
            return Err(InterceptError::UnixListenerPath {
                path: m.listener.clone(),
            });
        }
        let mut value = RawUnixTarget {
            target_id: m.target_id,
            listener_len: listener.len() as u32,
            listener: [0; PATH_MAX],
        };
        value.listener[..listener.len()].copy_from_slice(listener);
        entries.push((m.name, value));
    }
    if let Ok(mut log) = LOG.lock() {
        log.clear();
    }
    let previous = libbpf_rs::set_print(Some((PrintLevel::Info, collect_log)));
    let result = (|| {
        let open = ObjectBuilder::default()
            .open_memory(OBJECT)
            .map_err(unix_err("opening the unix eBPF object"))?;
        open.load().map_err(unix_err(
            "loading the unix eBPF program (needs kernel 6.7+)",
        ))
    })();
    libbpf_rs::set_print(previous);
    let object = result?;

    let handle = |name: &'static str| -> Result<MapHandle, InterceptError> {
        let map = object
            .maps()
            .find(|m| m.name() == name)
            .ok_or(InterceptError::MissingMap { map: name })?;
        MapHandle::try_from(&map).map_err(unix_err(name))
    };
    let targets = handle("unix_targets")?;
    for (key, value) in &entries {
        targets
            .update(key.as_bytes(), value.as_bytes(), MapFlags::ANY)
            .map_err(unix_err("unix_targets"))?;
    }
    let knobs = handle("unix_knobs")?;
    let raw = RawKnobs {
        exempt_mark,
        pad: 0,
    };
    knobs
        .update(&0u32.to_ne_bytes(), raw.as_bytes(), MapFlags::ANY)
        .map_err(unix_err("unix_knobs"))?;
    let exempt = handle("unix_exempt")?;
    for id in exempt_cgroups {
        exempt
            .update(&id.to_ne_bytes(), &[1], MapFlags::ANY)
            .map_err(unix_err("unix_exempt"))?;
    }
    let conns = handle("unix_conns")?;
    let counters = handle("unix_counters")?;

    let program = object
        .progs_mut()
        .find(|p| p.name() == PROGRAM)
        .ok_or(InterceptError::MissingProgram { program: PROGRAM })?;
    let link = program
        .attach_cgroup(cgroup.as_fd().as_raw_fd())
        .map_err(unix_err("attaching cgroup/connect_unix"))?;
    Ok(Loaded {
        conns,
        counters,
        link,
    })
}

/// Pins `link` at `path`.
pub(crate) fn pin(link: &mut Link, path: &Path) -> Result<(), InterceptError> {
    link.pin(path).map_err(unix_err("pinning the unix link"))
}

/// Looks up and removes the record of the client socket with inode `ino`.
pub(crate) fn take(conns: &MapHandle, ino: u64) -> Result<Option<UnixRecord>, InterceptError> {
    let key = ino.to_ne_bytes();
    let Some(raw) = conns
        .lookup(&key, MapFlags::ANY)
        .map_err(unix_err("unix_conns"))?
    else {
        return Ok(None);
    };
    // Gone already (LRU eviction) is as good as deleted.
    let _ = conns.delete(&key);
    let Some(raw) = RawUnixRecord::from_bytes(&raw) else {
        return Ok(None);
    };
    let comm_len = raw.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    Ok(Some(UnixRecord {
        target_id: raw.target_id,
        uid: raw.uid,
        gid: raw.gid,
        pid: raw.pid,
        comm: String::from_utf8_lossy(&raw.comm[..comm_len]).into_owned(),
        cgroup_id: raw.cgroup_id,
        connected_at: super::sys::boot_ns_to_system_time(raw.boot_ns)?,
        orig: raw.orig.display(),
    }))
}

/// The counters map, summed over CPUs.
pub(crate) fn counters(map: &MapHandle) -> Result<UnixCounters, InterceptError> {
    let get = |index: u32| -> Result<u64, InterceptError> {
        let per_cpu = map
            .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)
            .map_err(unix_err("unix_counters"))?
            .unwrap_or_default();
        Ok(per_cpu
            .iter()
            .filter_map(|v| v.get(..8).and_then(|b| b.try_into().ok()))
            .map(u64::from_ne_bytes)
            .fold(0u64, u64::wrapping_add))
    };
    Ok(UnixCounters {
        redirected: get(CNT_REDIRECTED)?,
        exempt_mark: get(CNT_EXEMPT_MARK)?,
        exempt_cgroup: get(CNT_EXEMPT_CGROUP)?,
        record_failed: get(CNT_RECORD_FAILED)?,
        refused: get(CNT_REFUSED)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_name_ends_at_its_first_nul_and_an_at_sign_makes_it_abstract() {
        let p = UnixPath::new("/run/postgresql/.s.PGSQL.5432").expect("fits");
        assert_eq!(p.len, 29);
        assert!(!p.is_abstract());
        assert_eq!(p.display(), "/run/postgresql/.s.PGSQL.5432");
        let a = UnixPath::new("@/run/postgresql/.s.PGSQL.5432").expect("fits");
        assert_eq!(a.len, 30);
        assert!(a.is_abstract());
        assert_eq!(a.path[0], 0);
        assert_eq!(a.display(), "@/run/postgresql/.s.PGSQL.5432");
        assert_ne!(p, a);
        assert_eq!(UnixPath::new("/x\0trailing"), UnixPath::new("/x"));
    }

    #[test]
    fn names_that_do_not_fit_a_sockaddr_un_are_refused() {
        assert!(UnixPath::new("").is_none());
        assert!(UnixPath::new("@").is_none());
        assert!(UnixPath::new(&"a".repeat(PATH_MAX)).is_some());
        assert!(UnixPath::new(&"a".repeat(PATH_MAX + 1)).is_none());
    }

    #[test]
    fn a_record_is_read_back_field_by_field() {
        let orig = UnixPath::new("@sock").expect("fits");
        let mut bytes = Vec::new();
        for v in [7u32, 1000, 1001, 4242] {
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        bytes.extend_from_slice(&99u64.to_ne_bytes());
        bytes.extend_from_slice(&5u64.to_ne_bytes());
        bytes.extend_from_slice(b"psql\0\0\0\0\0\0\0\0\0\0\0\0");
        bytes.extend_from_slice(orig.as_bytes());
        let r = RawUnixRecord::from_bytes(&bytes).expect("whole record");
        assert_eq!((r.target_id, r.uid, r.gid, r.pid), (7, 1000, 1001, 4242));
        assert_eq!((r.cgroup_id, r.boot_ns), (99, 5));
        assert_eq!(r.orig.display(), "@sock");
        assert!(RawUnixRecord::from_bytes(&bytes[1..]).is_none());
    }
}
