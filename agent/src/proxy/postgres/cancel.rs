//! Cancel requests. A CancelRequest arrives on a connection of its own, carrying the key pair
//! (process id, secret) the client got in BackendKeyData; [`CancelKeys`] maps that key to the
//! session it belongs to.
//!
//! - With passthrough authentication the client holds the backend's own key, so the request is
//!   forwarded as it is; the session is also told, because a statement sluice holds for
//!   approval is not running on the backend and only sluice can withdraw it.
//! - With `auth = "sluice"` the client holds a key sluice made up (it never sees the
//!   backend's); the map gives the backend's address and key, and sluice sends the backend a
//!   CancelRequest of its own.
//!
//! A session's entry is removed when its [`CancelRegistration`] is dropped, at session end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::protocol::postgres::frame::messages;

/// A BackendKeyData pair: process id and secret.
pub(crate) type Key = (i32, i32);

/// Where a cancel for a sluice-issued key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackendCancel {
    pub addr: crate::proxy::upstream::Addr,
    pub pid: i32,
    pub key: i32,
}

#[derive(Clone)]
struct Entry {
    hold: Arc<watch::Sender<u64>>,
    backend: Option<BackendCancel>,
}

/// Every live session's key.
#[derive(Default)]
pub(crate) struct CancelKeys {
    map: Mutex<HashMap<Key, Entry>>,
}

impl CancelKeys {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the session holding `key` (its held statement is withdrawn). None: no session has
    /// this key. Some(Some(b)): the key is sluice's, and the backend's cancel goes to `b`.
    pub(crate) fn cancel(&self, key: Key) -> Option<Option<BackendCancel>> {
        let entry = self.lock().get(&key).cloned()?;
        entry.hold.send_modify(|n| *n += 1);
        Some(entry.backend)
    }

    fn insert(&self, key: Key, entry: Entry) {
        self.lock().insert(key, entry);
    }

    fn remove(&self, key: Key) {
        self.lock().remove(&key);
    }
}

/// A session's entry in [`CancelKeys`]; removed on drop.
pub(crate) struct CancelRegistration {
    keys: Arc<CancelKeys>,
    hold: Arc<watch::Sender<u64>>,
    key: Mutex<Option<Key>>,
}

impl CancelRegistration {
    /// A registration (not yet keyed) and the receiver a held statement watches.
    pub(crate) fn new(keys: Arc<CancelKeys>) -> (CancelRegistration, watch::Receiver<u64>) {
        let (tx, rx) = watch::channel(0u64);
        (
            CancelRegistration {
                keys,
                hold: Arc::new(tx),
                key: Mutex::new(None),
            },
            rx,
        )
    }

    fn set(&self, key: Key, backend: Option<BackendCancel>) {
        self.keys.insert(
            key,
            Entry {
                hold: self.hold.clone(),
                backend,
            },
        );
        let old = self
            .key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(key);
        if let Some(old) = old.filter(|o| *o != key) {
            self.keys.remove(old);
        }
    }

    /// Passthrough: registers the backend's BackendKeyData ('K') if `chunk` carries one.
    pub(crate) fn observe(&self, chunk: &[u8]) {
        for (tag, body) in messages(chunk).flatten() {
            if tag == b'K'
                && let (Some(pid), Some(secret)) = (body.get(..4), body.get(4..8))
            {
                let key = (
                    i32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]),
                    i32::from_be_bytes([secret[0], secret[1], secret[2], secret[3]]),
                );
                self.set(key, None);
            }
        }
    }

    /// Terminated authentication: `key` is sluice's, `backend` where its cancels go.
    pub(crate) fn own(&self, key: Key, backend: BackendCancel) {
        self.set(key, Some(backend));
    }
}

impl Drop for CancelRegistration {
    fn drop(&mut self) {
        if let Some(key) = self.key.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.keys.remove(key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_reaches_the_session_with_the_key_until_it_ends() {
        let keys = Arc::new(CancelKeys::default());
        let (reg, mut rx) = CancelRegistration::new(keys.clone());
        reg.observe(b"K\0\0\0\x0c\0\0\0\x07\0\0\0\x09");
        rx.borrow_and_update();
        assert_eq!(keys.cancel((7, 9)), Some(None));
        assert!(rx.has_changed().unwrap());
        assert_eq!(keys.cancel((7, 8)), None);
        let b = BackendCancel {
            addr: crate::proxy::upstream::Addr::Tcp("127.0.0.1:5432".parse().unwrap()),
            pid: 7,
            key: 9,
        };
        reg.own((100, -3), b.clone());
        assert_eq!(keys.cancel((7, 9)), None, "the old key is gone");
        assert_eq!(keys.cancel((100, -3)), Some(Some(b)));
        drop(reg);
        assert_eq!(keys.cancel((100, -3)), None);
    }
}
