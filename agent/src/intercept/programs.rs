//! Loading `agent-ebpf/sluice.bpf.o`, attaching its programs to a cgroup, and the pinned links
//! that keep them attached when the agent dies.
//!
//! Invariants:
//! - [`PROGRAMS`] is the complete list of programs in the object; each is attached once, with
//!   `CgroupAttachMode::Single` (link-based cgroup attachments are multi-attach anyway, and
//!   `AllowMultiple` fails with EINVAL on link-based attach in aya 0.14).
//! - The pin directory belongs to one agent instance: everything in it is a link this module
//!   pinned (a link is pinned as `<pin_dir>/<program name>`).
//! - Fail closed: new links are attached *before* stale pinned links are removed, so there is
//!   no instant at which a protected connect goes through unredirected. A failed attach drops
//!   the new, still unpinned, links (detaching them) and leaves any stale ones in place.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};

use super::InterceptError;

/// The object built by `cargo xtask build-ebpf`, committed next to its source.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../../agent-ebpf/sluice.bpf.o");

#[derive(Clone, Copy)]
pub(crate) enum Kind {
    SockAddr,
    SockOps,
    Sock,
}

/// Every program in the object, by its C function name.
pub(crate) const PROGRAMS: &[(&str, Kind)] = &[
    ("sluice_connect4", Kind::SockAddr),
    ("sluice_connect6", Kind::SockAddr),
    ("sluice_sockops", Kind::SockOps),
    ("sluice_getpeername4", Kind::SockAddr),
    ("sluice_getpeername6", Kind::SockAddr),
    ("sluice_sock_release", Kind::Sock),
];

/// The `const volatile` knobs of sluice.bpf.c.
pub(crate) struct Knobs {
    pub proxy_port: u32,
    pub proxy_ip4: u32,
    pub exempt_mark: u32,
    pub exempt_cgroup_id: u64,
    /// The agent's network namespace (SO_NETNS_COOKIE); protected connects from any other one
    /// are refused.
    pub proxy_netns_cookie: u64,
}

/// Parses the object and creates its maps, with the knobs frozen into `.rodata`.
pub(crate) fn load(knobs: &Knobs) -> Result<Ebpf, InterceptError> {
    EbpfLoader::new()
        .override_global("proxy_port", &knobs.proxy_port, true)
        .override_global("proxy_ip4", &knobs.proxy_ip4, true)
        .override_global("exempt_mark", &knobs.exempt_mark, true)
        .override_global("exempt_cgroup_id", &knobs.exempt_cgroup_id, true)
        .override_global("proxy_netns_cookie", &knobs.proxy_netns_cookie, true)
        .load(OBJECT)
        .map_err(|source| InterceptError::Load { source })
}

/// Loads every program (the verifier runs here) and attaches it to `cgroup`.
pub(crate) fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
) -> Result<Vec<(&'static str, FdLink)>, InterceptError> {
    let dir = File::open(cgroup).map_err(|source| InterceptError::OpenCgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    let mut links = Vec::with_capacity(PROGRAMS.len());
    for &(name, kind) in PROGRAMS {
        let program = ebpf
            .program_mut(name)
            .ok_or(InterceptError::MissingProgram { program: name })?;
        let prog_err = |source| InterceptError::Program {
            program: name,
            source,
        };
        let attach_err = |source| InterceptError::Attach {
            program: name,
            cgroup: cgroup.to_path_buf(),
            source,
        };
        let link_err = |source| InterceptError::Link {
            program: name,
            source,
        };
        let link = match kind {
            Kind::SockAddr => {
                let p: &mut CgroupSockAddr = program.try_into().map_err(prog_err)?;
                p.load().map_err(prog_err)?;
                let id = p
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(link_err)?
            }
            Kind::SockOps => {
                let p: &mut SockOps = program.try_into().map_err(prog_err)?;
                p.load().map_err(prog_err)?;
                let id = p
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(link_err)?
            }
            Kind::Sock => {
                let p: &mut CgroupSock = program.try_into().map_err(prog_err)?;
                p.load().map_err(prog_err)?;
                let id = p
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(attach_err)?;
                FdLink::try_from(p.take_link(id).map_err(prog_err)?).map_err(link_err)?
            }
        };
        links.push((name, link));
    }
    Ok(links)
}

/// Removes every stale pinned link in `pin_dir` (detaching it, since a dead agent holds no
/// other reference), then pins the new links there.
pub(crate) fn replace_pins(
    pin_dir: &Path,
    links: Vec<(&'static str, FdLink)>,
) -> Result<Vec<PinnedLink>, InterceptError> {
    let stale = remove_pins(pin_dir)?;
    if stale > 0 {
        tracing::warn!(
            pin_dir = %pin_dir.display(),
            stale,
            "replaced pinned links left by a previous agent"
        );
    }
    links
        .into_iter()
        .map(|(name, link)| {
            let path = pin_dir.join(name);
            link.pin(&path).map_err(|source| InterceptError::Pin {
                program: name,
                path,
                source,
            })
        })
        .collect()
}

/// Unpins everything in `pin_dir`; returns how many entries were removed. An entry that is not
/// a link is removed as a file. Dropping the returned `FdLink` detaches the link.
pub(crate) fn remove_pins(pin_dir: &Path) -> Result<usize, InterceptError> {
    let pin_err = |path: PathBuf, source| InterceptError::Unpin { path, source };
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(pin_err(pin_dir.to_path_buf(), e)),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry.map_err(|e| pin_err(pin_dir.to_path_buf(), e))?.path();
        match PinnedLink::from_pin(&path) {
            Ok(link) => drop(link.unpin().map_err(|e| pin_err(path.clone(), e))?),
            Err(_) => std::fs::remove_file(&path).map_err(|e| pin_err(path.clone(), e))?,
        }
        removed += 1;
    }
    Ok(removed)
}
