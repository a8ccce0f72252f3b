//! Finding cgroups: the cgroup v2 mount point (from `/proc/self/mountinfo`), a cgroup's id (the
//! inode number of its directory, which is what `bpf_get_current_cgroup_id()` returns), and the
//! current process's own cgroup (the `0::/path` line of `/proc/self/cgroup`).
//!
//! Parsing is pure (`parse_*`, unit-tested on captured text); the public functions only read the
//! proc files. Assumes the agent runs in the cgroup namespace it attaches in (the path in
//! `/proc/self/cgroup` is relative to the namespace root, which is the mount's root then).

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::InterceptError;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const SELF_CGROUP: &str = "/proc/self/cgroup";

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` on most hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_root() -> Result<PathBuf, InterceptError> {
    let text = read(MOUNTINFO)?;
    parse_cgroup2_mount(&text).ok_or(InterceptError::Cgroup2NotMounted)
}

/// The id of the cgroup the current process belongs to.
pub fn own_cgroup_id() -> Result<u64, InterceptError> {
    cgroup_id_of(SELF_CGROUP)
}

/// The id of the cgroup process `pid` belongs to (e.g. a control-socket peer).
pub fn process_cgroup_id(pid: u32) -> Result<u64, InterceptError> {
    cgroup_id_of(&format!("/proc/{pid}/cgroup"))
}

fn cgroup_id_of(proc_cgroup: &str) -> Result<u64, InterceptError> {
    let text = read(proc_cgroup)?;
    let rel = parse_own_cgroup(&text).ok_or(InterceptError::OwnCgroupUnknown)?;
    cgroup_id(&cgroup2_root()?.join(rel.trim_start_matches('/')))
}

/// The id of the cgroup v2 directory `dir`: its inode number.
pub fn cgroup_id(dir: &Path) -> Result<u64, InterceptError> {
    std::fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|source| InterceptError::CgroupId {
            path: dir.to_path_buf(),
            source,
        })
}

fn read(path: &str) -> Result<String, InterceptError> {
    std::fs::read_to_string(path).map_err(|source| InterceptError::ReadProc {
        path: PathBuf::from(path),
        source,
    })
}

/// `36 35 0:30 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw`:
/// the mount point is the fifth field, the file system type the first one after ` - `.
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        left.split(' ').nth(4).map(|p| PathBuf::from(unescape(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path of the `0::` (cgroup v2) line of `/proc/<pid>/cgroup`.
fn parse_own_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn cgroup2_mount_is_found_on_a_hybrid_host() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn escaped_mount_points_are_unescaped() {
        let line = "34 33 0:29 / /mnt/my\\040cgroups rw shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(line),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn own_cgroup_is_the_v2_line() {
        let text = "12:pids:/user.slice\n1:name=systemd:/init.scope\n0::/sluice/agent\n";
        assert_eq!(parse_own_cgroup(text), Some("/sluice/agent"));
        assert_eq!(parse_own_cgroup("1:cpu:/\n"), None);
    }

    #[test]
    fn own_cgroup_id_is_the_inode_of_our_cgroup_directory() {
        let Ok(root) = cgroup2_root() else {
            return; // no cgroup v2 on this host: nothing to compare with
        };
        let id = own_cgroup_id().expect("own cgroup id");
        let rel = parse_own_cgroup(&read(SELF_CGROUP).expect("read")).map(str::to_owned);
        let dir = root.join(rel.expect("0:: line").trim_start_matches('/'));
        assert_eq!(id, std::fs::metadata(dir).expect("stat").ino());
    }
}
