//! Targets named by DNS (`match = "prod-db.internal:5432"`): what each name resolves to, kept
//! current, and which addresses stay protected after the name moved.
//!
//! Resolution goes through the system resolver (getaddrinfo: nsswitch, /etc/hosts, DNS), run by
//! tokio on its blocking pool with a timeout, so a slow or dead DNS server never blocks the
//! runtime. getaddrinfo gives no TTL, so names are resolved again every
//! `agent.resolve_interval_secs` (default 30 s).
//!
//! Invariants:
//! - A name that does not resolve at start is an error ([`Names::resolve`]): the agent does not
//!   start without knowing what to protect.
//! - A name that stops resolving later (an error, or no address) keeps its last addresses: a DNS
//!   outage never unprotects a backend.
//! - An address the name no longer resolves to stays protected while a session uses it
//!   ([`Names::hold`]), and is dropped when its last such session ends; every change is logged.
//! - This module never touches the eBPF maps itself: [`Names::watch`] hands the protected set
//!   to its caller, which writes it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, broadcast};
use tracing::{info, warn};

use crate::config::{Target, TargetMatch};

/// The longest one resolution of one name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "target {target}: its match name {host:?} does not resolve ({reason}); check the name and this host's resolver (/etc/hosts, /etc/resolv.conf)"
    )]
    Unresolved {
        target: String,
        host: String,
        reason: String,
    },
}

/// One target whose `match` is a name.
#[derive(Debug)]
struct Named {
    id: u32,
    target: String,
    host: String,
    port: u16,
}

#[derive(Debug, Default)]
struct State {
    /// What each name resolved to last, by target id.
    current: HashMap<u32, BTreeSet<SocketAddr>>,
    /// Addresses a name moved away from that sessions still use, by target id.
    retired: HashMap<u32, BTreeSet<SocketAddr>>,
}

/// The named targets and their addresses.
#[derive(Debug, Default)]
pub struct Names {
    named: Vec<Named>,
    state: Mutex<State>,
    /// Open sessions per (target id, backend address) of named targets.
    uses: Mutex<HashMap<(u32, SocketAddr), usize>>,
    /// Signalled when the last session on an address ends, so a retired one is dropped now.
    released: Notify,
}

/// Marks one session as using an address of a named target, until dropped.
#[derive(Debug)]
pub struct InUse {
    names: Arc<Names>,
    key: (u32, SocketAddr),
}

impl Drop for InUse {
    fn drop(&mut self) {
        let last = {
            let mut uses = self.names.uses.lock().unwrap_or_else(|p| p.into_inner());
            match uses.get_mut(&self.key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                _ => {
                    uses.remove(&self.key);
                    true
                }
            }
        };
        if last {
            self.names.released.notify_one();
        }
    }
}

/// What `host:port` resolves to now, without blocking the runtime.
async fn lookup(host: &str, port: u16) -> Result<BTreeSet<SocketAddr>, String> {
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
        Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(addrs)) => {
            let set: BTreeSet<SocketAddr> = addrs.collect();
            if set.is_empty() {
                Err("no address".into())
            } else {
                Ok(set)
            }
        }
    }
}

fn list(set: &BTreeSet<SocketAddr>) -> String {
    set.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Names {
    /// Resolves every target whose `match` is a name; one that does not resolve is an error.
    pub async fn resolve(targets: &[Target]) -> Result<Names, ResolveError> {
        let mut names = Names::default();
        let mut current = HashMap::new();
        for t in targets {
            let Some(TargetMatch::Name { host, port }) = &t.matches else {
                continue;
            };
            let addrs = lookup(host, *port)
                .await
                .map_err(|reason| ResolveError::Unresolved {
                    target: t.name.clone(),
                    host: host.clone(),
                    reason,
                })?;
            info!(target = %t.name, name = %host, addresses = %list(&addrs), "target name resolved");
            current.insert(t.id, addrs);
            names.named.push(Named {
                id: t.id,
                target: t.name.clone(),
                host: host.clone(),
                port: *port,
            });
        }
        names.state = Mutex::new(State {
            current,
            retired: HashMap::new(),
        });
        Ok(names)
    }

    /// Every address to protect now, by target id: what each name resolves to, and the
    /// addresses it moved away from that sessions still use.
    pub fn protected(&self) -> Vec<(u32, SocketAddr)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u32, SocketAddr)> = [&state.current, &state.retired]
            .into_iter()
            .flat_map(|m| m.iter())
            .flat_map(|(id, addrs)| addrs.iter().map(|a| (*id, *a)))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Counts a session of `target_id` on `backend` (None when the target is not named).
    pub fn hold(self: &Arc<Self>, target_id: u32, backend: SocketAddr) -> Option<InUse> {
        if !self.named.iter().any(|n| n.id == target_id) {
            return None;
        }
        let key = key(target_id, backend);
        *self
            .uses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert(0) += 1;
        Some(InUse {
            names: self.clone(),
            key,
        })
    }

    fn in_use(&self, id: u32, addr: SocketAddr) -> usize {
        let key = key(id, addr);
        self.uses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Resolves every name again and drops retired addresses no session uses; true when the
    /// protected set changed.
    pub async fn refresh(&self) -> bool {
        let mut changed = false;
        for n in &self.named {
            let now = match lookup(&n.host, n.port).await {
                Ok(now) => now,
                Err(reason) => {
                    warn!(target = %n.target, name = %n.host, %reason, "target name does not resolve any more: its last addresses stay protected");
                    continue;
                }
            };
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let before = state.current.insert(n.id, now.clone()).unwrap_or_default();
            if before == now {
                continue;
            }
            changed = true;
            info!(target = %n.target, name = %n.host, addresses = %list(&now), was = %list(&before), "target name moved: the new addresses are protected");
            let retired = state.retired.entry(n.id).or_default();
            retired.retain(|a| !now.contains(a));
            for gone in before.difference(&now) {
                let sessions = self.in_use(n.id, *gone);
                if sessions > 0 {
                    info!(target = %n.target, address = %gone, sessions, "the old address stays protected until its sessions end");
                    retired.insert(*gone);
                }
            }
        }
        changed | self.drop_released()
    }

    /// Forgets retired addresses whose last session ended; true when one was.
    fn drop_released(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for n in &self.named {
            let Some(retired) = state.retired.get_mut(&n.id) else {
                continue;
            };
            retired.retain(|a| {
                let keep = self.in_use(n.id, *a) > 0;
                if !keep {
                    info!(target = %n.target, address = %a, "no session uses the old address any more: it is no longer protected");
                    changed = true;
                }
                keep
            });
        }
        changed
    }

    /// True when some target is named (otherwise there is nothing to watch).
    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    /// Every `every`, and whenever the last session on an address ends, refreshes the names
    /// and hands a changed protected set to `apply` (which logs its own failures; the set is
    /// offered again at the next change).
    pub async fn watch(
        self: Arc<Self>,
        every: Duration,
        apply: impl Fn(&[(u32, SocketAddr)]),
        mut stop: broadcast::Receiver<()>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate: the set at start is already written.
        tick.tick().await;
        loop {
            let changed = tokio::select! {
                _ = stop.recv() => return,
                _ = tick.tick() => self.refresh().await,
                _ = self.released.notified() => self.drop_released(),
            };
            if changed {
                apply(&self.protected());
            }
        }
    }
}

/// A session's key: the target and the backend address in canonical form (an IPv4-mapped
/// IPv6 address counts as its IPv4 one, as the eBPF side stores them).
fn key(id: u32, addr: SocketAddr) -> (u32, SocketAddr) {
    (id, SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn named(id: u32, host: &str) -> Target {
        let mut t = Target::plain(id, &format!("t{id}"), Protocol::Postgres);
        t.matches = Some(TargetMatch::Name {
            host: host.into(),
            port: 5432,
        });
        t
    }

    #[tokio::test]
    async fn a_name_that_resolves_is_protected_at_every_address() {
        let names = Names::resolve(&[named(3, "localhost")]).await.unwrap();
        let protected = names.protected();
        assert!(!protected.is_empty());
        assert!(protected.iter().all(|(id, a)| *id == 3 && a.port() == 5432));
        assert!(protected.iter().any(|(_, a)| a.ip().is_loopback()));
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_at_start_is_an_error_naming_it() {
        let err = Names::resolve(&[named(1, "no-such-host.invalid")])
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("target t1"), "{err}");
        assert!(err.contains("no-such-host.invalid"), "{err}");
    }

    #[tokio::test]
    async fn a_moved_address_stays_protected_while_a_session_uses_it() {
        let names = Arc::new(Names::resolve(&[named(1, "localhost")]).await.unwrap());
        let old: SocketAddr = "198.18.0.9:5432".parse().unwrap();
        names
            .state
            .lock()
            .unwrap()
            .current
            .insert(1, BTreeSet::from([old]));
        let session = names.hold(1, old).unwrap();
        assert!(names.hold(2, old).is_none(), "target 2 is not named");
        // localhost is what the name resolves to now: 198.18.0.9 is retired, not dropped.
        assert!(names.refresh().await);
        assert!(names.protected().iter().any(|(_, a)| *a == old));
        assert!(!names.refresh().await, "nothing changed");
        drop(session);
        assert!(names.drop_released());
        assert!(!names.protected().iter().any(|(_, a)| *a == old));
    }
}
