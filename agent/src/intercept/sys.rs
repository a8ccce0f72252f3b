//! The syscalls the intercept module makes besides aya's: mounting bpffs, checking what file
//! system a directory is on, listing the host's interface addresses, and turning the eBPF side's
//! `CLOCK_BOOTTIME` timestamps into wall-clock time. Nothing else in the agent makes these calls.

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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn local_addresses_include_loopback() {
        let addrs = local_addresses().expect("getifaddrs");
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }
}
