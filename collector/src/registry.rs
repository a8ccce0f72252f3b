//! The collector's own records: enrolled agents, enrollment tokens, and the audit log
//! (token issued, agent enrolled, enrollment refused, agent revoked, recordings purged).
//!
//! They live in small files under the collector's directory, not in the store, because
//! RocksDB admits one writer process and `sluice-collector token|revoke` must work while
//! `serve` runs. Every change takes an exclusive lock on `registry.lock` (`flock`), rewrites
//! `registry.json` through a temporary file and a rename (so a reader never sees half a file),
//! and appends to `audit.jsonl`. Files are mode 600.
//!
//! A token is never stored: only the SHA-256 of its secret, with the agent name and expiry.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use sluice_wire::api::enroll_message;
use sluice_wire::pki::{hex, sha256};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("no randomness for a token")]
    Random,
    #[error("no agent named {0:?} is enrolled (`sluice-collector agents` lists them)")]
    NoSuchAgent(String),
    #[error("{0}")]
    Enroll(#[from] EnrollError),
}

/// Why an enrollment is refused; each message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error(
        "this enrollment token is unknown to the collector (mistyped, or issued by another collector): \
         ask its operator for a new one (`sluice-collector token --agent NAME`)"
    )]
    UnknownToken,
    #[error(
        "this enrollment token was already used (agent {agent:?} enrolled with it at {used}): tokens are \
         one-time; ask the collector's operator for a new one"
    )]
    UsedToken { agent: String, used: String },
    #[error(
        "this enrollment token expired at {expired}: ask the collector's operator for a new one \
         (`sluice-collector token --agent {agent} --ttl 1h`)"
    )]
    ExpiredToken { agent: String, expired: String },
    #[error(
        "this token is for agent {token_agent:?}, not {asked:?}: enroll under the token's name"
    )]
    WrongAgent { token_agent: String, asked: String },
    #[error("the enrollment is not signed by the key it enrolls (the proof of possession failed)")]
    BadProof,
    #[error("the public key is not a 32-byte Ed25519 key")]
    BadKey,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    pub enrolled_ns: u64,
    #[serde(default)]
    pub revoked_ns: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    /// SHA-256 of the secret, hex.
    secret_sha256: String,
    agent: String,
    created_ns: u64,
    expires_ns: u64,
    #[serde(default)]
    used_ns: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    agents: Vec<AgentRecord>,
    tokens: Vec<TokenRecord>,
}

/// One line of `audit.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub ts_ns: u64,
    /// token, enroll, enroll-refused, revoke, purge.
    pub kind: String,
    #[serde(default)]
    pub agent: Option<String>,
    pub detail: String,
    /// Sessions concerned (a purge's).
    #[serde(default)]
    pub sessions: Vec<String>,
}

pub fn format_ns(ns: u64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(ns))
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| ns.to_string())
}

pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn open(dir: &Path) -> Registry {
        Registry {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + '_ {
        move |source| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn lock(&self, exclusive: bool) -> Result<File, RegistryError> {
        let path = self.path("registry.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(Self::io(&path))?;
        if exclusive {
            f.lock().map_err(Self::io(&path))?;
        } else {
            f.lock_shared().map_err(Self::io(&path))?;
        }
        Ok(f)
    }

    fn load(&self) -> Result<State, RegistryError> {
        let path = self.path("registry.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| RegistryError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(RegistryError::Io { path, source }),
        }
    }

    fn save(&self, state: &State) -> Result<(), RegistryError> {
        let path = self.path("registry.json");
        let tmp = self.path("registry.json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| RegistryError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Self::io(&tmp))?;
        f.write_all(&bytes).map_err(Self::io(&tmp))?;
        f.sync_all().map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(Self::io(&path))
    }

    /// Appends to the audit log (callers hold the lock, or take it here).
    fn append_audit(&self, record: &AuditRecord) -> Result<(), RegistryError> {
        let path = self.path("audit.jsonl");
        let mut line = serde_json::to_vec(record).map_err(|e| RegistryError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(Self::io(&path))?;
        f.write_all(&line).map_err(Self::io(&path))?;
        f.sync_data().map_err(Self::io(&path))
    }

    /// Records an event in the audit log.
    pub fn audit(&self, record: &AuditRecord) -> Result<(), RegistryError> {
        let _lock = self.lock(true)?;
        self.append_audit(record)
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditRecord>, RegistryError> {
        let _lock = self.lock(false)?;
        let path = self.path("audit.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| RegistryError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// A new one-time token secret for `agent`, valid `ttl_secs` from `now_ns`.
    pub fn issue_token(
        &self,
        agent: &str,
        ttl_secs: u64,
        now_ns: u64,
    ) -> Result<String, RegistryError> {
        use base64::Engine;
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| RegistryError::Random)?;
        // Prefixed so that it never starts with '-' (a command line would take it for a flag).
        let secret = format!(
            "sl{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
        );
        let expires_ns = now_ns.saturating_add(ttl_secs.saturating_mul(1_000_000_000));
        let _lock = self.lock(true)?;
        let mut state = self.load()?;
        // Forget tokens that expired more than a day ago (their audit lines stay).
        state
            .tokens
            .retain(|t| t.expires_ns.saturating_add(86_400_000_000_000) > now_ns);
        state.tokens.push(TokenRecord {
            secret_sha256: hex(&sha256(secret.as_bytes())),
            agent: agent.to_string(),
            created_ns: now_ns,
            expires_ns,
            used_ns: None,
        });
        self.save(&state)?;
        self.append_audit(&AuditRecord {
            ts_ns: now_ns,
            kind: "token".into(),
            agent: Some(agent.to_string()),
            detail: format!(
                "enrollment token issued, valid until {}",
                format_ns(expires_ns)
            ),
            sessions: Vec::new(),
        })?;
        Ok(secret)
    }

    /// Enrolls `public_key` under the token's agent name, once. `signature` must be the key's
    /// Ed25519 signature over [`enroll_message`]. Refusals are audited too.
    pub fn enroll(
        &self,
        secret: &str,
        agent: Option<&str>,
        public_key: &[u8],
        signature: &[u8],
        now_ns: u64,
    ) -> Result<AgentRecord, RegistryError> {
        let _lock = self.lock(true)?;
        let mut state = self.load()?;
        let outcome = Self::check_token(&state, secret, agent, public_key, signature, now_ns);
        let (index, name) = match outcome {
            Ok(x) => x,
            Err(e) => {
                let named = match &e {
                    EnrollError::UsedToken { agent, .. }
                    | EnrollError::ExpiredToken { agent, .. } => Some(agent.clone()),
                    EnrollError::WrongAgent { token_agent, .. } => Some(token_agent.clone()),
                    _ => agent.map(str::to_string),
                };
                self.append_audit(&AuditRecord {
                    ts_ns: now_ns,
                    kind: "enroll-refused".into(),
                    agent: named,
                    detail: e.to_string(),
                    sessions: Vec::new(),
                })?;
                return Err(e.into());
            }
        };
        if let Some(t) = state.tokens.get_mut(index) {
            t.used_ns = Some(now_ns);
        }
        let record = AgentRecord {
            name: name.clone(),
            public_key: hex(public_key),
            enrolled_ns: now_ns,
            revoked_ns: None,
        };
        let replaced = state.agents.iter().position(|a| a.name == name);
        match replaced {
            Some(i) => state.agents[i] = record.clone(),
            None => state.agents.push(record.clone()),
        }
        self.save(&state)?;
        self.append_audit(&AuditRecord {
            ts_ns: now_ns,
            kind: "enroll".into(),
            agent: Some(name),
            detail: format!(
                "agent enrolled with Ed25519 key {}{}",
                record.public_key,
                if replaced.is_some() {
                    " (replacing its previous key)"
                } else {
                    ""
                }
            ),
            sessions: Vec::new(),
        })?;
        Ok(record)
    }

    fn check_token(
        state: &State,
        secret: &str,
        agent: Option<&str>,
        public_key: &[u8],
        signature: &[u8],
        now_ns: u64,
    ) -> Result<(usize, String), EnrollError> {
        let hash = hex(&sha256(secret.as_bytes()));
        let index = state
            .tokens
            .iter()
            .position(|t| t.secret_sha256 == hash)
            .ok_or(EnrollError::UnknownToken)?;
        let token = &state.tokens[index];
        if let Some(used) = token.used_ns {
            return Err(EnrollError::UsedToken {
                agent: token.agent.clone(),
                used: format_ns(used),
            });
        }
        if token.expires_ns <= now_ns {
            return Err(EnrollError::ExpiredToken {
                agent: token.agent.clone(),
                expired: format_ns(token.expires_ns),
            });
        }
        if let Some(asked) = agent
            && asked != token.agent
        {
            return Err(EnrollError::WrongAgent {
                token_agent: token.agent.clone(),
                asked: asked.to_string(),
            });
        }
        if public_key.len() != 32 {
            return Err(EnrollError::BadKey);
        }
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
            .verify(&enroll_message(secret, public_key), signature)
            .map_err(|_| EnrollError::BadProof)?;
        Ok((index, token.agent.clone()))
    }

    /// The agents, enrolled and revoked.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        let _lock = self.lock(false)?;
        Ok(self.load()?.agents)
    }

    /// The agent whose key is `public_key`, revoked or not.
    pub fn agent_by_key(&self, public_key: &[u8]) -> Result<Option<AgentRecord>, RegistryError> {
        let key = hex(public_key);
        Ok(self.agents()?.into_iter().find(|a| a.public_key == key))
    }

    /// Revokes `name`: its key may no longer ingest.
    pub fn revoke(&self, name: &str, now_ns: u64) -> Result<AgentRecord, RegistryError> {
        let _lock = self.lock(true)?;
        let mut state = self.load()?;
        let agent = state
            .agents
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or_else(|| RegistryError::NoSuchAgent(name.to_string()))?;
        agent.revoked_ns.get_or_insert(now_ns);
        let record = agent.clone();
        self.save(&state)?;
        self.append_audit(&AuditRecord {
            ts_ns: now_ns,
            kind: "revoke".into(),
            agent: Some(name.to_string()),
            detail: format!("agent revoked (key {})", record.public_key),
            sessions: Vec::new(),
        })?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn key() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("key");
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("key")
    }

    fn enroll(
        r: &Registry,
        secret: &str,
        agent: &str,
        k: &Ed25519KeyPair,
        now: u64,
    ) -> Result<AgentRecord, RegistryError> {
        let sig = k.sign(&enroll_message(secret, k.public_key().as_ref()));
        r.enroll(
            secret,
            Some(agent),
            k.public_key().as_ref(),
            sig.as_ref(),
            now,
        )
    }

    #[test]
    fn a_token_never_starts_like_a_command_line_flag() {
        let dir = tempfile::tempdir().expect("dir");
        let r = Registry::open(dir.path());
        for _ in 0..200 {
            let secret = r.issue_token("db1", 60, 0).expect("token");
            assert!(secret.starts_with("sl"), "{secret}");
            assert!(!secret.contains('.'), "{secret}");
        }
    }

    #[test]
    fn a_token_enrolls_once_then_is_refused_as_used() {
        let dir = tempfile::tempdir().expect("dir");
        let r = Registry::open(dir.path());
        let secret = r.issue_token("db1", 3600, 1_000).expect("token");
        let k = key();
        let a = enroll(&r, &secret, "db1", &k, 2_000).expect("enrolled");
        assert_eq!(a.name, "db1");
        assert_eq!(
            r.agent_by_key(k.public_key().as_ref()).expect("read"),
            Some(a)
        );
        let again = enroll(&r, &secret, "db1", &key(), 3_000).expect_err("used");
        assert!(again.to_string().contains("already used"), "{again}");
        let kinds: Vec<String> = r
            .audit_log()
            .expect("audit")
            .into_iter()
            .map(|a| a.kind)
            .collect();
        assert_eq!(kinds, ["token", "enroll", "enroll-refused"]);
    }

    #[test]
    fn expired_unknown_misnamed_and_unproven_enrollments_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let r = Registry::open(dir.path());
        let secret = r.issue_token("db1", 60, 0).expect("token");
        let k = key();
        let e = enroll(&r, &secret, "db1", &k, 61_000_000_000).expect_err("expired");
        assert!(e.to_string().contains("expired"), "{e}");
        let e = enroll(&r, "nope", "db1", &k, 1).expect_err("unknown");
        assert!(e.to_string().contains("unknown"), "{e}");
        let e = enroll(&r, &secret, "db2", &k, 1).expect_err("wrong name");
        assert!(e.to_string().contains("not \"db2\""), "{e}");
        let other = key();
        let sig = other.sign(&enroll_message(&secret, k.public_key().as_ref()));
        let e = r
            .enroll(&secret, None, k.public_key().as_ref(), sig.as_ref(), 1)
            .expect_err("no proof");
        assert!(
            matches!(e, RegistryError::Enroll(EnrollError::BadProof)),
            "{e}"
        );
        // The refusals did not use the token up.
        enroll(&r, &secret, "db1", &k, 2).expect("still valid");
    }

    #[test]
    fn a_revoked_agent_stays_listed_with_its_revocation() {
        let dir = tempfile::tempdir().expect("dir");
        let r = Registry::open(dir.path());
        let secret = r.issue_token("db1", 60, 0).expect("token");
        enroll(&r, &secret, "db1", &key(), 1).expect("enrolled");
        let a = r.revoke("db1", 5).expect("revoked");
        assert_eq!(a.revoked_ns, Some(5));
        assert!(r.revoke("db9", 5).is_err());
        assert_eq!(r.agents().expect("agents")[0].revoked_ns, Some(5));
    }
}
