//! KILL for statements sluice holds. A MySQL client interrupts a statement from another
//! connection (the `mariadb` CLI's Ctrl-C sends `KILL QUERY <id>` on a new one), naming the
//! connection id it got in the greeting, which sluice passes through from the backend. For a
//! running statement the backend does the rest. A statement held for approval never reached
//! the backend, so only sluice can interrupt it: [`KillTargets`] maps (backend, connection id)
//! to the session, and a KILL from the *same principal* (the backend's own rule is "your own
//! threads, or the PROCESS privilege"; sluice's is the person) withdraws the hold, whose
//! client then gets ERR 1317, as from an interrupted query. The KILL itself is still decided
//! by policy and forwarded to the backend like any statement.
//!
//! A session's entry is removed when its [`KillRegistration`] is dropped, at session end.

use crate::proxy::upstream::Addr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// (backend address, the backend's connection id).
type Key = (Addr, u32);

struct Entry {
    principal: String,
    kill: watch::Sender<u64>,
}

/// Every live MySQL session with a gate, by backend connection.
#[derive(Default)]
pub(crate) struct KillTargets {
    map: Mutex<HashMap<Key, Entry>>,
}

impl KillTargets {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A KILL of connection `id` on `backend` by `principal`: tells that session (its held
    /// statement, if any, is withdrawn). True when a session of the same principal was told.
    pub(crate) fn interrupt(&self, backend: &Addr, id: u32, principal: &str) -> bool {
        match self.lock().get(&(backend.clone(), id)) {
            Some(e) if e.principal == principal => {
                e.kill.send_modify(|n| *n = n.wrapping_add(1));
                true
            }
            _ => false,
        }
    }
}

/// A session's entry in [`KillTargets`], removed on drop.
pub(crate) struct KillRegistration {
    targets: Arc<KillTargets>,
    key: Key,
}

impl KillRegistration {
    /// Registers the session on `backend` with connection `id`, for `principal`; the receiver
    /// changes on every KILL of it.
    pub(crate) fn new(
        targets: Arc<KillTargets>,
        backend: Addr,
        id: u32,
        principal: &str,
    ) -> (KillRegistration, watch::Receiver<u64>) {
        let (kill, rx) = watch::channel(0);
        targets.lock().insert(
            (backend.clone(), id),
            Entry {
                principal: principal.to_string(),
                kill,
            },
        );
        (
            KillRegistration {
                targets,
                key: (backend, id),
            },
            rx,
        )
    }
}

impl Drop for KillRegistration {
    fn drop(&mut self) {
        self.targets.lock().remove(&self.key);
    }
}

/// The connection id a `KILL [QUERY | CONNECTION] <id>` statement names.
pub(crate) fn killed_id(sql: &str) -> Option<u32> {
    let mut words = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .peekable();
    if !words.next()?.eq_ignore_ascii_case("kill") {
        return None;
    }
    if let Some(w) = words.peek()
        && (w.eq_ignore_ascii_case("query")
            || w.eq_ignore_ascii_case("connection")
            || w.eq_ignore_ascii_case("hard")
            || w.eq_ignore_ascii_case("soft"))
    {
        words.next();
        if let Some(w) = words.peek()
            && (w.eq_ignore_ascii_case("query") || w.eq_ignore_ascii_case("connection"))
        {
            words.next();
        }
    }
    let id = words.next()?.parse().ok()?;
    words.next().is_none().then_some(id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kill_statements_name_their_connection() {
        assert_eq!(killed_id("KILL QUERY 42"), Some(42));
        assert_eq!(killed_id("kill 7;"), Some(7));
        assert_eq!(killed_id("  kill connection 9 "), Some(9));
        assert_eq!(killed_id("KILL HARD QUERY 3"), Some(3));
        assert_eq!(killed_id("kill query id 3"), None);
        assert_eq!(killed_id("kill query 3 4"), None);
        assert_eq!(killed_id("select 'kill 3'"), None);
        assert_eq!(killed_id("killall 3"), None);
    }

    #[test]
    fn only_the_same_principal_interrupts_and_the_entry_goes_with_the_session() {
        let targets = Arc::new(KillTargets::default());
        let addr = Addr::Tcp("127.0.0.1:3306".parse().unwrap());
        let (reg, mut rx) = KillRegistration::new(targets.clone(), addr.clone(), 12, "ada");
        assert!(!targets.interrupt(&addr, 12, "bob"));
        assert!(!rx.has_changed().unwrap());
        assert!(!targets.interrupt(&addr, 13, "ada"));
        assert!(targets.interrupt(&addr, 12, "ada"));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        drop(reg);
        assert!(!targets.interrupt(&addr, 12, "ada"));
    }
}
