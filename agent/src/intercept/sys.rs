//! The syscalls the intercept module makes besides aya's and libbpf's: mounting bpffs, checking
//! what file system a directory is on, listing the host's interface addresses, turning the eBPF
//! side's `CLOCK_BOOTTIME` timestamps into wall-clock time, and asking sock_diag for the peer of
//! an accepted unix connection. Nothing else in the agent makes these calls.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime},
};

use nix::{
    mount::MsFlags,
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs},
    time::{ClockId, clock_gettime},
};

use super::InterceptError;

/// Where bpffs lives by convention.
pub(crate) const BPFFS: &str = "/sys/fs/bpf";

fn is_fs(path: &Path, magic: FsType) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == magic)
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    is_fs(path, BPF_FS_MAGIC)
}

pub(crate) fn is_cgroup2(path: &Path) -> bool {
    is_fs(path, CGROUP2_SUPER_MAGIC)
}

/// Mounts bpffs at [`BPFFS`] unless it is already there (idempotent; needs CAP_SYS_ADMIN).
pub(crate) fn ensure_bpffs() -> Result<(), InterceptError> {
    let path = Path::new(BPFFS);
    if is_bpffs(path) {
        return Ok(());
    }
    let mount_err = |source| InterceptError::MountBpffs {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(mount_err)?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map_err(|errno| mount_err(errno.into()))?;
    tracing::info!(path = BPFFS, "mounted bpffs");
    Ok(())
}

/// Every address configured on a host interface (loopback included).
pub(crate) fn local_addresses() -> Result<Vec<IpAddr>, InterceptError> {
    let addrs =
        nix::ifaddrs::getifaddrs().map_err(|source| InterceptError::Interfaces { source })?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

fn since_zero(clock: ClockId) -> Result<Duration, InterceptError> {
    let ts = clock_gettime(clock).map_err(|source| InterceptError::Clock { source })?;
    Ok(Duration::from(ts))
}

/// The wall-clock time of a `bpf_ktime_get_boot_ns()` timestamp: now, minus how long ago (on
/// the boot clock, which keeps counting through suspend) the timestamp was taken.
pub(crate) fn boot_ns_to_system_time(boot_ns: u64) -> Result<SystemTime, InterceptError> {
    let now_boot = since_zero(ClockId::CLOCK_BOOTTIME)?;
    let now_wall = SystemTime::now();
    let ago = now_boot.saturating_sub(Duration::from_nanos(boot_ns));
    Ok(now_wall.checked_sub(ago).unwrap_or(now_wall))
}

/// The cookie of the caller's network namespace, as `bpf_get_netns_cookie()` reports it for a
/// socket there: SO_NETNS_COOKIE on a throwaway socket.
pub(crate) fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `socket` is an open socket for the whole call; `cookie` and `len` are live locals,
    // and `len` holds the size of `cookie`, so the kernel writes at most that many bytes.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The inode number of the socket at the other end of the connected unix socket `fd` (the
/// client's socket, for a connection the agent accepted): sock_diag's UNIX_DIAG_PEER for our
/// own socket's inode. None when the kernel reports no peer (the client is gone).
pub(crate) fn unix_peer_inode(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<u64>> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        socket,
    };
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLMSG_ERROR: u16 = 2;
    const AF_UNIX: u8 = 1;
    const UDIAG_SHOW_PEER: u32 = 0x04;
    const UNIX_DIAG_PEER: u16 = 2;
    const HDR: usize = 16; // struct nlmsghdr
    const MSG: usize = 16; // struct unix_diag_msg

    // Our own socket's inode: fstat of the socket fd.
    let own = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.ino();
    let own =
        u32::try_from(own).map_err(|_| std::io::Error::other("socket inode beyond 32 bits"))?;

    let mut req = Vec::with_capacity(HDR + 24);
    req.extend_from_slice(&((HDR + 24) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills it
    // struct unix_diag_req
    req.extend_from_slice(&[AF_UNIX, 0, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&own.to_ne_bytes());
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    req.extend_from_slice(&u32::MAX.to_ne_bytes());

    let nl = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    sendto(
        nl.as_raw_fd(),
        &req,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut buf = [0u8; 1024];
    let n = recv(nl.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    let msg = &buf[..n];
    let u16_at = |o: usize| msg.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        msg.get(o..o + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let short = || std::io::Error::other("short sock_diag answer");
    let len = u32_at(0).ok_or_else(short)? as usize;
    match u16_at(4).ok_or_else(short)? {
        NLMSG_ERROR => {
            let errno = i32::from_ne_bytes(u32_at(HDR).ok_or_else(short)?.to_ne_bytes());
            return match errno {
                0 => Ok(None),
                e => Err(std::io::Error::from_raw_os_error(-e)),
            };
        }
        SOCK_DIAG_BY_FAMILY => {}
        other => {
            return Err(std::io::Error::other(format!(
                "sock_diag answered type {other}"
            )));
        }
    }
    let end = len.min(msg.len());
    let mut at = HDR + MSG;
    while at + 4 <= end {
        let rta_len = usize::from(u16_at(at).ok_or_else(short)?);
        if rta_len < 4 {
            break;
        }
        if u16_at(at + 2) == Some(UNIX_DIAG_PEER) {
            return Ok(u32_at(at + 4).map(u64::from).filter(|&i| i != 0));
        }
        at += (rta_len + 3) & !3;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sock_diag_names_the_peer_of_a_connected_unix_socket() {
        use std::os::fd::AsFd as _;
        use std::os::unix::fs::MetadataExt as _;
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let b_ino = std::fs::metadata(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd as _;
            b.as_raw_fd()
        }))
        .expect("fstat")
        .ino();
        assert_eq!(unix_peer_inode(a.as_fd()).expect("sock_diag"), Some(b_ino));
    }

    #[test]
    fn a_boot_timestamp_taken_now_is_now_on_the_wall_clock() {
        let boot_ns = u64::try_from(
            since_zero(ClockId::CLOCK_BOOTTIME)
                .expect("clock")
                .as_nanos(),
        )
        .expect("fits");
        let t = boot_ns_to_system_time(boot_ns).expect("convert");
        let diff = SystemTime::now()
            .duration_since(t)
            .expect("not in the future");
        assert!(diff < Duration::from_secs(1), "{diff:?}");
    }

    #[test]
    fn the_netns_cookie_is_stable_and_nonzero() {
        let a = own_netns_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(a, 0);
        assert_eq!(own_netns_cookie().expect("SO_NETNS_COOKIE"), a);
    }

    #[test]
    fn local_addresses_include_loopback() {
        let addrs = local_addresses().expect("getifaddrs");
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }
}
