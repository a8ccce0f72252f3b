//! Workload identities: who a caller is without a password.
//!
//! The `[[identity]]` entries of the config map a caller to a principal name and groups: by the
//! uid the eBPF record captured in connect(), or by the caller's cgroup (a configured cgroup v2
//! directory matches processes in it and in every cgroup below it). The first matching entry
//! wins ([`matching`]). For policy on passthrough targets ([`resolve`]) a caller nobody matches
//! is `uid:<n>` with no groups, and a connection without an eBPF record (an explicit listener)
//! is `unknown`. With `auth = "sluice"` a `sluice login` binding comes first and a token as the
//! password last (`proxy/postgres/login.rs`); the control socket asks the same way.
//!
//! Matching a cgroup walks the configured directory looking for the caller's cgroup id (the
//! directory's inode number on cgroup v2), bounded in depth and entries; it runs once per
//! connection, never per statement.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sluice_journal::{Principal, ProcessInfo};

use crate::config::IdentityConfig;

/// Deepest cgroup level below a configured directory that is searched.
const MAX_DEPTH: usize = 8;
/// Most directories examined per configured cgroup.
const MAX_DIRS: usize = 10_000;

/// The principal for a connection made by `process` (None: no eBPF record).
pub fn resolve(identities: &[IdentityConfig], process: Option<&ProcessInfo>) -> Principal {
    let Some(p) = process else {
        return Principal {
            name: "unknown".into(),
            groups: Vec::new(),
        };
    };
    matching(identities, p).unwrap_or_else(|| Principal {
        name: format!("uid:{}", p.uid),
        groups: Vec::new(),
    })
}

/// The first `[[identity]]` entry matching `p`, if any (no `uid:<n>` fallback).
pub fn matching(identities: &[IdentityConfig], p: &ProcessInfo) -> Option<Principal> {
    identities
        .iter()
        .find(|id| match (&id.uid, &id.cgroup) {
            (Some(uid), _) => *uid == p.uid,
            (None, Some(dir)) => cgroup_contains(dir, p.cgroup_id),
            (None, None) => false,
        })
        .map(|id| Principal {
            name: id.principal.clone(),
            groups: id.groups.clone(),
        })
}

/// Is the cgroup with id `cgroup_id` `dir` or one of its descendants?
fn cgroup_contains(dir: &Path, cgroup_id: u64) -> bool {
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    let mut seen = 0usize;
    while let Some((d, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_DIRS {
            return false;
        }
        match std::fs::metadata(&d) {
            Ok(m) if m.ino() == cgroup_id => return true,
            Ok(_) => {}
            Err(_) => continue,
        }
        if depth >= MAX_DEPTH {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn process(uid: u32, cgroup_id: u64) -> ProcessInfo {
        ProcessInfo {
            uid,
            gid: uid,
            pid: 1,
            comm: "psql".into(),
            cgroup_id,
            connected_ns: 0,
        }
    }

    #[test]
    fn the_first_matching_identity_wins_and_strangers_are_their_uid() {
        let dir = tempfile::tempdir().unwrap();
        let child = dir.path().join("a/b");
        std::fs::create_dir_all(&child).unwrap();
        let child_ino = std::fs::metadata(&child).unwrap().ino();
        let ids = vec![
            IdentityConfig {
                uid: None,
                cgroup: Some(dir.path().to_path_buf()),
                principal: "ops".into(),
                groups: vec!["admins".into()],
            },
            IdentityConfig {
                uid: Some(1000),
                cgroup: None,
                principal: "ada".into(),
                groups: vec!["developers".into()],
            },
        ];
        assert_eq!(resolve(&ids, Some(&process(1000, child_ino))).name, "ops");
        assert_eq!(resolve(&ids, Some(&process(1000, 1))).name, "ada");
        let stranger = resolve(&ids, Some(&process(7, 1)));
        assert_eq!(stranger.name, "uid:7");
        assert!(stranger.groups.is_empty());
        assert_eq!(resolve(&ids, None).name, "unknown");
    }
}
