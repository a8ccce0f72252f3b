//! Tamper evidence for recorded sessions: a hash chain over every event of a session, and
//! checkpoints of it signed with the agent's Ed25519 key.
//!
//! ```text
//! h(-1)  = SHA-256("sluice-chain-v1" ++ session id)
//! h(n)   = SHA-256(h(n-1) ++ n (u64 BE) ++ stored value of event n)
//! checkpoint at n = { chain: h(n), public key, signature over
//!                     "sluice-checkpoint-v1" ++ session id ++ n (u64 BE) ++ h(n) }
//! ```
//! The stored value is exactly the bytes in the `events` family (FORMAT byte included), so a
//! verifier needs nothing but the journal: altering, dropping, inserting or reordering an event
//! changes every hash after it, and the next checkpoint's signature no longer matches. The
//! recorder writes a checkpoint with the session's end and at least every
//! [`CHECKPOINT_EVENTS`] events or [`CHECKPOINT_NANOS`] of time, in the same batch as the event
//! it covers; events after a session's last checkpoint (an agent killed mid-session) are
//! reported as unsealed, not as good.
//!
//! Never: sign without hashing the exact stored bytes, or accept checkpoints made with more
//! than one key in a session.

use std::path::Path;

use ring::digest::{Context, SHA256};
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::keyfile;
pub use crate::keyfile::KeyError;
use crate::model::SessionId;

/// Events between two checkpoints of a long session, at most.
pub const CHECKPOINT_EVENTS: u64 = 1000;
/// Time between two checkpoints of a long session, at most (10 s).
pub const CHECKPOINT_NANOS: u64 = 10_000_000_000;

const CHAIN_DOMAIN: &[u8] = b"sluice-chain-v1";
const CHECKPOINT_DOMAIN: &[u8] = b"sluice-checkpoint-v1";

/// The agent's Ed25519 key, created on first use (mode 600).
pub struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    /// Loads the PKCS#8 key in `path`, or creates one there (readable by its owner only).
    pub fn load_or_create(path: &Path) -> Result<Signer, KeyError> {
        let pkcs8 = keyfile::load_or_create(path, || {
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map(|d| d.as_ref().to_vec())
                .map_err(|_| KeyError::Random)
        })?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyError::Invalid {
            path: path.display().to_string(),
            what: "an Ed25519 PKCS#8 key",
        })?;
        Ok(Signer { key })
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    fn sign(&self, session: &SessionId, seq: u64, chain: &[u8; 32]) -> Vec<u8> {
        self.key
            .sign(&checkpoint_message(session, seq, chain))
            .as_ref()
            .to_vec()
    }
}

/// A signed state of a session's chain, stored in the `checkpoints` family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub chain: [u8; 32],
    pub public_key: Vec<u8>,
    pub signature: Vec<u8>,
    pub ts_ns: u64,
}

fn checkpoint_message(session: &SessionId, seq: u64, chain: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 16 + 8 + 32);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(session.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(chain);
    m
}

/// The chain before a session's first event.
pub fn genesis(session: &SessionId) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(CHAIN_DOMAIN);
    c.update(session.as_bytes());
    digest32(c)
}

/// The chain after event `seq` whose stored value is `value`.
pub fn link(previous: &[u8; 32], seq: u64, value: &[u8]) -> [u8; 32] {
    let mut c = Context::new(&SHA256);
    c.update(previous);
    c.update(&seq.to_be_bytes());
    c.update(value);
    digest32(c)
}

fn digest32(c: Context) -> [u8; 32] {
    let d = c.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A session's running chain, kept by its recorder.
pub(crate) struct ChainState {
    pub next_seq: u64,
    pub hash: [u8; 32],
    pub since_checkpoint: u64,
    pub last_checkpoint_ns: u64,
}

impl ChainState {
    pub fn new(session: &SessionId, now_ns: u64) -> ChainState {
        ChainState {
            next_seq: 0,
            hash: genesis(session),
            since_checkpoint: 0,
            last_checkpoint_ns: now_ns,
        }
    }

    /// Links the event `seq` and says whether a checkpoint is due after it.
    pub fn push(&mut self, seq: u64, value: &[u8], ending: bool, now_ns: u64) -> bool {
        self.hash = link(&self.hash, seq, value);
        self.since_checkpoint += 1;
        ending
            || self.since_checkpoint >= CHECKPOINT_EVENTS
            || now_ns.saturating_sub(self.last_checkpoint_ns) >= CHECKPOINT_NANOS
    }

    /// The signed checkpoint of the chain as it is now (after event `seq`).
    pub fn checkpoint(
        &mut self,
        signer: &Signer,
        session: &SessionId,
        seq: u64,
        now_ns: u64,
    ) -> Checkpoint {
        self.since_checkpoint = 0;
        self.last_checkpoint_ns = now_ns;
        Checkpoint {
            chain: self.hash,
            public_key: signer.public_key(),
            signature: signer.sign(session, seq, &self.hash),
            ts_ns: now_ns,
        }
    }
}

/// Does `checkpoint` sign the chain state `chain` after event `seq` of `session`?
pub fn verify_checkpoint(
    session: &SessionId,
    seq: u64,
    chain: &[u8; 32],
    checkpoint: &Checkpoint,
) -> bool {
    checkpoint.chain == *chain
        && UnparsedPublicKey::new(&ED25519, &checkpoint.public_key)
            .verify(
                &checkpoint_message(session, seq, chain),
                &checkpoint.signature,
            )
            .is_ok()
}
