//! The C/Rust boundary: `#[repr(C)]` mirrors of every struct in `agent-ebpf/sluice.h`, the
//! address conversions both sides agree on, and the rule that turns configured [`Match`]es into
//! `targets` entries.
//!
//! Invariants:
//! - Layouts match `sluice.h` field for field, with the explicit `pad` fields and no implicit
//!   padding; the `const` asserts below fail the build when a size drifts, and aya checks the
//!   key/value sizes again when a map is opened (a mismatch fails at start, not at the first
//!   lookup). Changing a layout means changing `sluice.h` in the same commit.
//! - Every address is 16 bytes in network order, IPv4 as IPv4-mapped IPv6; ports are host order.
//! - This file does no I/O and calls no aya function; `Pod` is the only thing it implements.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use super::{InterceptError, Match};

/// `SLUICE_COMM_LEN`.
pub(crate) const COMM_LEN: usize = 16;

/// `target_key.kind` values (`SLUICE_MATCH_*`).
pub(crate) const MATCH_EXACT: u8 = 0;
pub(crate) const MATCH_LOCAL: u8 = 1;
pub(crate) const MATCH_ANY: u8 = 2;

/// `enum sluice_counter`.
pub(crate) const CNT_REDIRECTED: u32 = 0;
pub(crate) const CNT_EXEMPT_MARK: u32 = 1;
pub(crate) const CNT_EXEMPT_CGROUP: u32 = 2;
pub(crate) const CNT_ESTABLISHED: u32 = 3;
pub(crate) const CNT_PEER_RESTORED: u32 = 4;
pub(crate) const CNT_RECORD_FAILED: u32 = 5;
pub(crate) const CNT_OTHER_NETNS: u32 = 6;
pub(crate) const CNT_MAX: u32 = 7;
const _: () = assert!(CNT_OTHER_NETNS + 1 == CNT_MAX, "a counter is missing here");

/// `struct target_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct TargetKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub kind: u8,
    pub pad: u8,
}

/// `struct target_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TargetValue {
    pub target_id: u32,
}

/// `struct orig_record`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawOrigRecord {
    pub orig_addr: [u8; 16],
    pub orig_port: u16,
    pub family: u16,
    pub target_id: u32,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub pad: u32,
    pub cgroup_id: u64,
    pub boot_ns: u64,
    pub comm: [u8; COMM_LEN],
}

/// `struct conn_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConnKey {
    pub client_addr: [u8; 16],
    pub proxy_addr: [u8; 16],
    pub client_port: u16,
    pub proxy_port: u16,
    pub pad: u32,
}

const _: () = assert!(size_of::<TargetKey>() == 20);
const _: () = assert!(size_of::<TargetValue>() == 4);
const _: () = assert!(size_of::<RawOrigRecord>() == 72);
const _: () = assert!(size_of::<ConnKey>() == 40);

// SAFETY: all four are #[repr(C)], Copy, made only of integers and byte arrays, with every
// padding byte spelled out as a field (the size asserts above prove there is no implicit
// padding), so every bit pattern is a valid value and every byte is initialised.
#[allow(unsafe_code)]
mod pod {
    unsafe impl aya::Pod for super::TargetKey {}
    unsafe impl aya::Pod for super::TargetValue {}
    unsafe impl aya::Pod for super::RawOrigRecord {}
    unsafe impl aya::Pod for super::ConnKey {}
}

/// The 16-byte map form of an IP address: IPv6 as is, IPv4 as `::ffff:a.b.c.d`.
pub(crate) fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr16`]: an IPv4-mapped address comes back as `SocketAddr::V4`.
pub(crate) fn socket_addr(addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
        None => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, 0)),
    }
}

impl ConnKey {
    /// The key sockops wrote for a connection the proxy accepted from `peer` on `local`.
    pub(crate) fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        Self {
            client_addr: addr16(peer.ip()),
            proxy_addr: addr16(local.ip()),
            client_port: peer.port(),
            proxy_port: local.port(),
            pad: 0,
        }
    }
}

/// Reaches a service on this host whatever address it bound: 127/8, 0.0.0.0, ::1, :: and their
/// IPv4-mapped forms. Must agree with `addr_is_local()` in sluice.bpf.c.
pub(crate) fn is_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    }
}

fn key(addr: [u8; 16], port: u16, kind: u8) -> TargetKey {
    TargetKey {
        addr,
        port,
        kind,
        pad: 0,
    }
}

/// Turns the configured targets into `targets` map entries. The one place of the local-backend
/// rule: an `Exact` target on a local address (see [`is_local`]) also gets the `LOCAL` entry
/// for its port, because a backend on this host is reachable through every local address
/// (127.0.0.2, 0.0.0.0, ::1, ...) and each of them would otherwise bypass the proxy. A backend
/// bound to a host interface address needs `Exact` entries for those addresses too (see
/// [`super::local_addresses`]).
///
/// Two targets that produce the same key with different ids are an error (the kernel could
/// only honour one of them), as is any target that would catch the proxy's own listeners.
pub(crate) fn target_entries(
    targets: &[(Match, u32)],
    proxy_port: u16,
) -> Result<Vec<(TargetKey, TargetValue)>, InterceptError> {
    let mut entries: BTreeMap<TargetKey, (u32, Match)> = BTreeMap::new();
    for &(m, target_id) in targets {
        let keys = match m {
            Match::Exact(addr) if is_local(addr.ip()) => vec![
                key(addr16(addr.ip()), addr.port(), MATCH_EXACT),
                key([0; 16], addr.port(), MATCH_LOCAL),
            ],
            Match::Exact(addr) => vec![key(addr16(addr.ip()), addr.port(), MATCH_EXACT)],
            Match::AnyLocal { port } => vec![key([0; 16], port, MATCH_LOCAL)],
            Match::Any { port } => vec![key([0; 16], port, MATCH_ANY)],
        };
        for k in keys {
            if k.port == proxy_port && (k.kind != MATCH_EXACT || is_local(IpAddr::from(k.addr))) {
                return Err(InterceptError::TargetIsProxy {
                    target: m,
                    proxy_port,
                });
            }
            match entries.get(&k) {
                Some(&(first_id, first)) if first_id != target_id => {
                    return Err(InterceptError::ConflictingTargets {
                        first,
                        first_id,
                        second: m,
                        second_id: target_id,
                    });
                }
                Some(_) => {}
                None => {
                    entries.insert(k, (target_id, m));
                }
            }
        }
    }
    Ok(entries
        .into_iter()
        .map(|(k, (target_id, _))| (k, TargetValue { target_id }))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn ipv4_is_stored_mapped_and_comes_back_as_v4() {
        let a = addr16("10.1.2.3".parse().expect("ip"));
        assert_eq!(a[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(socket_addr(a, 5432), sa("10.1.2.3:5432"));
        let mapped = addr16("::ffff:10.1.2.3".parse().expect("ip"));
        assert_eq!(mapped, a);
        assert_eq!(
            socket_addr(addr16("::1".parse().expect("ip")), 1),
            sa("[::1]:1")
        );
    }

    #[test]
    fn local_means_loopback_or_unspecified_in_every_form() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_local(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["10.0.0.1", "::2", "fe80::1", "::ffff:10.0.0.1"] {
            assert!(!is_local(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn exact_local_target_also_protects_every_local_address_on_its_port() {
        let e = target_entries(&[(Match::Exact(sa("127.0.0.1:5432")), 7)], 15432).expect("ok");
        let mut kinds: Vec<_> = e
            .iter()
            .map(|(k, v)| (k.kind, k.port, v.target_id))
            .collect();
        kinds.sort();
        assert_eq!(kinds, vec![(MATCH_EXACT, 5432, 7), (MATCH_LOCAL, 5432, 7)]);
        let remote = target_entries(&[(Match::Exact(sa("10.0.0.5:5432")), 7)], 15432).expect("ok");
        assert_eq!(remote.len(), 1);
    }

    #[test]
    fn two_ids_for_the_same_key_are_rejected() {
        let err = target_entries(
            &[
                (Match::Exact(sa("127.0.0.1:5432")), 1),
                (Match::AnyLocal { port: 5432 }, 2),
            ],
            15432,
        )
        .expect_err("conflict");
        assert!(
            matches!(err, InterceptError::ConflictingTargets { .. }),
            "{err}"
        );
        // The same id twice is fine (127.0.0.1 and ::1 for one local backend).
        target_entries(
            &[
                (Match::Exact(sa("127.0.0.1:5432")), 1),
                (Match::Exact(sa("[::1]:5432")), 1),
            ],
            15432,
        )
        .expect("same id");
    }

    #[test]
    fn a_target_on_the_proxy_port_is_rejected() {
        let err = target_entries(&[(Match::Any { port: 15432 }, 1)], 15432).expect_err("loop");
        assert!(matches!(err, InterceptError::TargetIsProxy { .. }), "{err}");
        target_entries(&[(Match::Exact(sa("10.0.0.5:15432")), 1)], 15432).expect("remote ok");
    }
}
