//! The agent's configuration file (TOML), parsed and validated once at start.
//!
//! Everything the rest of the agent needs is resolved here into typed values (socket addresses,
//! paths, target matches); a configuration that loads is one the agent can run with. The
//! documented example lives in `policies/sluice.toml` and is parsed by a test below, so the
//! example cannot drift from the code.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// Where the agent looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/sluice/sluice.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub agent: AgentConfig,
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetConfig>,
    /// Who a caller is without a password: workloads (and, until `sluice login`, people) by
    /// uid or cgroup (first match wins).
    #[serde(rename = "identity", default)]
    pub identities: Vec<IdentityConfig>,
    /// The identity provider whose tokens identify people (`auth = "sluice"` targets).
    #[serde(default)]
    pub oidc: Option<OidcSection>,
    /// Ship the journal to a collector (none: nothing ships and the spool only grows).
    #[serde(default)]
    pub shipper: Option<ShipperConfig>,
}

/// `[shipper]`: where and how the journal is shipped. The collector's address and certificate
/// fingerprint come from the file `sluice enroll` writes (`enrollment_file`), unless given
/// here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipperConfig {
    /// The collector, `host:port` (default: the enrollment file's).
    #[serde(default)]
    pub collector: Option<String>,
    /// SHA-256 of the collector's certificate, hex (default: the enrollment file's).
    #[serde(default)]
    pub collector_fingerprint: Option<String>,
    /// What `sluice enroll` wrote (default: `collector.toml` next to `agent.signing_key`).
    #[serde(default)]
    pub enrollment_file: Option<PathBuf>,
    /// Most events per shipment.
    #[serde(default = "default_batch_events")]
    pub max_batch_events: usize,
    /// Most bytes of events per shipment (a single larger event still ships alone).
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: usize,
    /// How often to look for new events when everything is shipped, in milliseconds.
    #[serde(default = "default_ship_interval")]
    pub interval_ms: u64,
    /// Time allowed for one shipment (connect, TLS, upload, the collector's synced write).
    #[serde(default = "default_ship_timeout")]
    pub timeout_secs: u64,
}

fn default_batch_events() -> usize {
    5000
}
fn default_batch_bytes() -> usize {
    4 << 20
}
fn default_ship_interval() -> u64 {
    200
}
fn default_ship_timeout() -> u64 {
    30
}

impl ShipperConfig {
    /// Where `sluice enroll` writes, and the shipper reads, the collector's address and pin.
    pub fn enrollment_path(&self, agent: &AgentConfig) -> PathBuf {
        self.enrollment_file
            .clone()
            .unwrap_or_else(|| default_enrollment_path(agent))
    }
}

/// `collector.toml` next to the signing key.
pub fn default_enrollment_path(agent: &AgentConfig) -> PathBuf {
    agent
        .signing_key
        .parent()
        .unwrap_or(Path::new("."))
        .join("collector.toml")
}

/// `[oidc]`: the issuer whose ID tokens sluice accepts as passwords and from `sluice login`
/// (see `identity::oidc::OidcConfig` for the validation keys), plus the client id the device
/// flow uses.
#[derive(Debug, Clone, Deserialize)]
pub struct OidcSection {
    #[serde(flatten)]
    pub validation: crate::identity::oidc::OidcConfig,
    /// The client id `sluice login` uses for the device flow (default: `audience`).
    #[serde(default)]
    pub client_id: Option<String>,
}

impl OidcSection {
    pub fn client_id(&self) -> &str {
        self.client_id
            .as_deref()
            .unwrap_or(&self.validation.audience)
    }
}

/// What the journal's writes survive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// An agent crash (the WAL is in the kernel's page cache).
    #[default]
    Crash,
    /// A power loss too: each write waits for the WAL's fsync (group commit).
    PowerLoss,
}

/// What new sessions get when the journal's spool is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SpoolFull {
    /// Refused with an error that says why (fail closed).
    #[default]
    Refuse,
    /// Admitted and recorded beyond the limit, with a warning (fail open).
    Admit,
}

/// How a target's clients authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The client authenticates to the database itself; sluice relays the exchange.
    #[default]
    Passthrough,
    /// sluice authenticates the person (login, workload identity, or an OIDC token as the
    /// password) and logs in to the backend with a configured role's credentials.
    Sluice,
}

/// Whether clients of a target must use TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTls {
    /// TLS when the client asks (needs `tls_cert`), plaintext otherwise.
    #[default]
    Optional,
    /// Plaintext sessions are refused with a message saying to use TLS.
    Required,
}

/// `[[target.role]]`: a database role clients may ask for (the startup message's `user`), the
/// backend credentials sluice logs in with, and who may use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// The role name clients ask for.
    pub name: String,
    /// The backend login (default: `name`).
    #[serde(default)]
    pub user: Option<String>,
    /// The backend password from this environment variable of the agent ...
    #[serde(default)]
    pub password_env: Option<String>,
    /// ... or from this file (readable by root only; one line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Who may use it: `"user:<principal>"`, `"group:<group>"`, or `"*"`.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// A backend password: never printed.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A role, resolved: its password read.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub user: String,
    pub password: Secret,
    pub allow: Vec<String>,
}

impl Role {
    /// May `principal` (member of `groups`) use this role?
    pub fn allows(&self, principal: &str, groups: &[String]) -> bool {
        self.allow.iter().any(|a| {
            a == "*"
                || a.strip_prefix("user:") == Some(principal)
                || a.strip_prefix("group:")
                    .is_some_and(|g| groups.iter().any(|m| m == g))
        })
    }
}

/// One `[[identity]]` entry: callers matching `uid` or `cgroup` (a cgroup v2 directory; its
/// descendants match too) are `principal`, member of `groups`. Exactly one of `uid` and
/// `cgroup` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    pub principal: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// What happens to a statement sluice cannot parse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unparsed {
    /// Denied before policy is asked (policy id `sluice-unparsed`).
    #[default]
    Deny,
    /// Decided by policy as kind `other` with `parse_error`, and flagged in the journal.
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Where redirected connections arrive (IPv4 loopback); the same port on [::1] takes IPv6.
    #[serde(default = "default_proxy_listen")]
    pub proxy_listen: SocketAddr,
    /// The cgroup v2 directory to attach to; default: the cgroup2 root (every process).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default = "default_journal_dir")]
    pub journal_dir: PathBuf,
    /// SO_MARK on the proxy's upstream sockets; connects carrying it are never redirected.
    #[serde(default = "default_mark")]
    pub upstream_mark: u32,
    /// Also exempt every process in the agent's own cgroup (run the agent in its own unit).
    #[serde(default = "default_true")]
    pub exempt_own_cgroup: bool,
    /// bpffs directory where the attachments are pinned (they outlive a crashed agent, so a
    /// crash fails closed: protected connects are refused instead of bypassing the proxy).
    #[serde(default = "default_pin_dir")]
    pub bpf_pin_dir: PathBuf,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest single protocol message (a MySQL packet after reassembly) accepted after
    /// authentication (default 64 MiB); it bounds each session's buffers.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Time a client gets to send its startup message.
    #[serde(default = "default_startup_timeout")]
    pub startup_timeout_secs: u64,
    /// Time allowed to connect to a backend.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Cedar policies (`*.cedar` + `sluice.cedarschema`); none: every statement is allowed.
    #[serde(default)]
    pub policy_dir: Option<PathBuf>,
    /// Masking rules (see `policies/masking.toml`); none: results are not masked.
    #[serde(default)]
    pub masking_file: Option<PathBuf>,
    /// "crash" (default): a journal write survives an agent crash. "power-loss": every write
    /// also waits for the WAL's fsync (shared by concurrent writers).
    #[serde(default)]
    pub durability: Durability,
    /// The Ed25519 key that signs the journal's chain checkpoints (PKCS#8, mode 600; created
    /// at first start).
    #[serde(default = "default_signing_key")]
    pub signing_key: PathBuf,
    /// The AES-256 key that seals the journal's recorded values at rest (32 bytes, mode 600;
    /// created at first start). Reading the journal needs it: the journal directory names it.
    #[serde(default = "default_encryption_key")]
    pub encryption_key: PathBuf,
    /// The most the journal may occupy on disk, in bytes (0: no limit). When it is reached,
    /// `spool_full` decides what new sessions get; nothing recorded is ever dropped.
    #[serde(default = "default_spool_max")]
    pub spool_max_bytes: u64,
    /// "refuse" (default: fail closed): new sessions get a clear error while the spool is
    /// full. "admit" (fail open): they are admitted and recorded beyond the limit, with a
    /// warning in the log.
    #[serde(default)]
    pub spool_full: SpoolFull,
    /// Seconds between checks of `policy_dir` for changed files (0: reload on SIGHUP only).
    #[serde(default = "default_policy_poll")]
    pub policy_poll_secs: u64,
    /// How long a statement held for approval waits before it fails.
    #[serde(default = "default_approval_timeout")]
    pub approval_timeout_secs: u64,
    /// The agent's unix socket for `sluice requests|approve|deny|grants|request access`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Append `[sluice:<principal>]` to the `application_name` sluice logs in to the backend
    /// with, so the database's own logs show who is behind a session (`auth = "sluice"`).
    #[serde(default = "default_true")]
    pub tag_application_name: bool,
    /// How often `sluice login` bindings are checked for refresh (those expiring within five
    /// minutes are refreshed when a refresh token exists).
    #[serde(default = "default_login_refresh")]
    pub login_refresh_secs: u64,
    /// How often a target named by DNS (`match = "db.internal:5432"`) is resolved again, in
    /// seconds. The system resolver (getaddrinfo: /etc/hosts, DNS) gives no TTL, so this
    /// interval stands for it; a changed answer is logged and takes effect at once.
    #[serde(default = "default_resolve_interval")]
    pub resolve_interval_secs: u64,
    /// Serve Prometheus metrics (spool size, shipping backlog and lag) over plain HTTP here,
    /// e.g. "127.0.0.1:9187" (default: no endpoint).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Where the agent's unix listeners go, one per target that protects a socket name
    /// (`<dir>/target-<id>.sock`): a directory owned by root and writable by nobody else.
    #[serde(default = "default_unix_listen_dir")]
    pub unix_listen_dir: PathBuf,
    /// "protected" (default): a target that protects a unix socket name makes the agent refuse
    /// to start when the kernel cannot load the unix hook (kernel 6.7+) or the real socket is
    /// reachable by others than its owner. "unprotected": start anyway, loudly.
    #[serde(default)]
    pub unix_sockets: UnixSockets,
    /// cgroups whose connects to protected socket names are never redirected: the database
    /// service's (e.g. /sys/fs/cgroup/system.slice/postgresql.service), so that pg_ctl,
    /// backups and maintenance reach the server's own socket.
    #[serde(default)]
    pub unix_exempt_cgroups: Vec<PathBuf>,
}

/// `agent.unix_sockets`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnixSockets {
    #[default]
    Protected,
    Unprotected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
    /// MySQL and MariaDB.
    Mysql,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
        }
    }

    /// The protocol's word for what it frames, in end reasons ("a packet of N bytes ...").
    pub fn unit(self) -> &'static str {
        match self {
            Protocol::Postgres => "message",
            Protocol::Mysql => "packet",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    pub protocol: Protocol,
    /// `IP:PORT`, `[V6]:PORT`, `NAME:PORT` (a DNS name: every address it resolves to, kept
    /// current, see `agent.resolve_interval_secs`), or `*:PORT` for any address on the port.
    #[serde(rename = "match")]
    pub match_: Option<String>,
    /// An explicit listener for this target (for hosts without eBPF, or clients that connect
    /// to sluice on purpose).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Where an explicit listener's connections go (default: the exact `match` address).
    #[serde(default)]
    pub backend: Option<SocketAddr>,
    /// Statements sluice cannot parse: "deny" (default) or "allow" (flagged in the journal).
    #[serde(default)]
    pub unparsed: Unparsed,
    /// The group whose members approve just-in-time access requests for this target (none:
    /// the target takes no such requests).
    #[serde(default)]
    pub jit_approvers: Option<String>,
    /// The longest grant a just-in-time request may ask for.
    #[serde(default = "default_jit_max")]
    pub jit_max_secs: u64,
    /// TLS toward clients: the certificate chain and key (PEM). Without them an SSLRequest
    /// is answered 'N'.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// "optional" (default) or "required": plaintext sessions are refused.
    #[serde(default)]
    pub client_tls: ClientTls,
    /// TLS toward the backend: "disable" (default), "require", "verify-full".
    #[serde(default)]
    pub backend_tls: crate::tls::BackendTls,
    /// The CA (PEM) that `verify-full` checks the backend's certificate against.
    #[serde(default)]
    pub backend_ca: Option<PathBuf>,
    /// The name `verify-full` checks (default: the backend's IP address).
    #[serde(default)]
    pub backend_server_name: Option<String>,
    /// "passthrough" (default) or "sluice" (identity + injected credentials).
    #[serde(default)]
    pub auth: AuthMode,
    /// With `auth = "sluice"`: the roles clients may ask for.
    #[serde(rename = "role", default)]
    pub roles: Vec<RoleConfig>,
    /// Unix socket names clients of this target connect to (`@name` for an abstract one);
    /// connects to them are redirected to sluice like TCP ones. Default for a target on this
    /// host: the standard names for its port ([`default_sockets`]); `[]`: none.
    #[serde(default)]
    pub sockets: Option<Vec<String>>,
    /// The real socket sluice dials for sessions that arrived over a unix socket (default: the
    /// name the client connected to).
    #[serde(default)]
    pub socket_backend: Option<PathBuf>,
}

/// The socket names a PostgreSQL or MySQL server on this host listens on for `port`, in every
/// spelling a client may use: `/run` and `/var/run` (a symlink to it on most systems), the
/// compiled-in `/tmp` defaults, and PostgreSQL's abstract form (`unix_socket_directories =
/// '@/run/postgresql'`). MySQL's socket name has no port: only 3306 gets its defaults.
pub fn default_sockets(protocol: Protocol, port: u16) -> Vec<String> {
    match protocol {
        Protocol::Postgres => ["/run/postgresql", "/var/run/postgresql", "/tmp"]
            .iter()
            .flat_map(|dir| {
                [
                    format!("{dir}/.s.PGSQL.{port}"),
                    format!("@{dir}/.s.PGSQL.{port}"),
                ]
            })
            .collect(),
        Protocol::Mysql if port == 3306 => [
            "/run/mysqld/mysqld.sock",
            "/var/run/mysqld/mysqld.sock",
            "/tmp/mysql.sock",
            "/var/lib/mysql/mysql.sock",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        Protocol::Mysql => Vec::new(),
    }
}

/// A target's address match, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetMatch {
    Exact(SocketAddr),
    AnyAddress {
        port: u16,
    },
    /// A DNS name and port: the agent protects every address `host` resolves to (see
    /// `crate::resolve`).
    Name {
        host: String,
        port: u16,
    },
}

/// One configured target, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    /// 1-based; the id the eBPF maps carry.
    pub id: u32,
    pub name: String,
    pub protocol: Protocol,
    pub matches: Option<TargetMatch>,
    pub listen: Option<SocketAddr>,
    pub backend: Option<SocketAddr>,
    pub unparsed: Unparsed,
    pub jit_approvers: Option<String>,
    pub jit_max: Duration,
    /// The server config for clients' TLS, when the target has a certificate.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub client_tls: ClientTls,
    /// The client config for the backend leg (None: plaintext).
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    pub backend_server_name: Option<String>,
    pub auth: AuthMode,
    pub roles: Vec<Role>,
    /// Protected unix socket names; None: the defaults, when the target is on this host.
    pub sockets: Option<Vec<String>>,
    pub socket_backend: Option<PathBuf>,
}

impl Target {
    /// A plain target: no TLS, passthrough authentication (tests and tools build these).
    pub fn plain(id: u32, name: &str, protocol: Protocol) -> Target {
        Target {
            id,
            name: name.to_string(),
            protocol,
            matches: None,
            listen: None,
            backend: None,
            unparsed: Unparsed::Deny,
            jit_approvers: None,
            jit_max: Duration::from_secs(default_jit_max()),
            tls: None,
            client_tls: ClientTls::Optional,
            backend_tls: None,
            backend_server_name: None,
            auth: AuthMode::Passthrough,
            roles: Vec::new(),
            sockets: None,
            socket_backend: None,
        }
    }
}

fn default_proxy_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15432)
}
fn default_journal_dir() -> PathBuf {
    PathBuf::from("/var/lib/sluice/journal")
}
fn default_mark() -> u32 {
    0x5c1c_e000
}
fn default_true() -> bool {
    true
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/sluice")
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_message() -> usize {
    // MySQL 8's default max_allowed_packet: a client that works directly works through sluice.
    64 << 20
}
fn default_startup_timeout() -> u64 {
    10
}
fn default_connect_timeout() -> u64 {
    5
}
fn default_policy_poll() -> u64 {
    2
}
fn default_approval_timeout() -> u64 {
    300
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/sluice/agent.sock")
}
fn default_signing_key() -> PathBuf {
    PathBuf::from("/var/lib/sluice/signing.key")
}
fn default_encryption_key() -> PathBuf {
    PathBuf::from("/var/lib/sluice/journal.key")
}
fn default_spool_max() -> u64 {
    10 << 30
}
fn default_login_refresh() -> u64 {
    60
}
fn default_resolve_interval() -> u64 {
    30
}
fn default_unix_listen_dir() -> PathBuf {
    PathBuf::from("/run/sluice/unix")
}
fn default_jit_max() -> u64 {
    8 * 3600
}

impl AgentConfig {
    pub fn startup_timeout(&self) -> Duration {
        Duration::from_secs(self.startup_timeout_secs)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn approval_timeout(&self) -> Duration {
        Duration::from_secs(self.approval_timeout_secs)
    }
    pub fn resolve_interval(&self) -> Duration {
        Duration::from_secs(self.resolve_interval_secs.max(1))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.targets()?;
        Ok(config)
    }

    /// The targets, resolved and checked (unique names, a match or a listener each).
    pub fn targets(&self) -> Result<Vec<Target>, ConfigError> {
        if self.agent.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "agent.max_message_bytes must be at least 1024".into(),
            ));
        }
        if !self.agent.proxy_listen.ip().is_loopback() || !self.agent.proxy_listen.is_ipv4() {
            return Err(ConfigError::Invalid(format!(
                "agent.proxy_listen must be an IPv4 loopback address, got {}",
                self.agent.proxy_listen
            )));
        }
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            if t.name.is_empty() || !names.insert(t.name.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "target #{} needs a unique, non-empty name",
                    i + 1
                )));
            }
            let matches = t
                .match_
                .as_deref()
                .map(|m| {
                    parse_match(m)
                        .map_err(|e| ConfigError::Invalid(format!("target {}: {e}", t.name)))
                })
                .transpose()?;
            if matches.is_none() && t.listen.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "target {} needs `match` or `listen`",
                    t.name
                )));
            }
            let backend = match (t.backend, &matches) {
                (Some(b), _) => Some(b),
                (None, Some(TargetMatch::Exact(a))) => Some(*a),
                (None, _) => None,
            };
            if t.listen.is_some() && backend.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "target {} has `listen` but no `backend` (and `match` is not one exact address)",
                    t.name
                )));
            }
            let id = u32::try_from(i + 1)
                .map_err(|_| ConfigError::Invalid("too many targets".into()))?;
            let invalid = |e: String| ConfigError::Invalid(format!("target {}: {e}", t.name));
            let tls = match (&t.tls_cert, &t.tls_key) {
                (Some(cert), Some(key)) => Some(
                    crate::tls::server_config(cert, key)
                        .map_err(|e| invalid(crate::error_chain(&e)))?,
                ),
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "set both `tls_cert` and `tls_key`, or neither".into(),
                    ));
                }
            };
            if t.client_tls == ClientTls::Required && tls.is_none() {
                return Err(invalid(
                    "`client_tls = \"required\"` needs `tls_cert` and `tls_key`".into(),
                ));
            }
            let backend_tls = crate::tls::client_config(t.backend_tls, t.backend_ca.as_deref())
                .map_err(|e| invalid(crate::error_chain(&e)))?;
            if t.backend_tls == crate::tls::BackendTls::VerifyFull && t.backend_ca.is_none() {
                return Err(invalid(
                    "`backend_tls = \"verify-full\"` needs `backend_ca`".into(),
                ));
            }
            if t.auth == AuthMode::Passthrough && !t.roles.is_empty() {
                return Err(invalid(
                    "[[target.role]] entries only apply with `auth = \"sluice\"`".into(),
                ));
            }
            let roles = t
                .roles
                .iter()
                .map(|r| resolve_role(r).map_err(invalid))
                .collect::<Result<Vec<_>, _>>()?;
            if t.auth == AuthMode::Sluice && roles.is_empty() {
                return Err(invalid(
                    "`auth = \"sluice\"` needs at least one [[target.role]]".into(),
                ));
            }
            out.push(Target {
                id,
                name: t.name.clone(),
                protocol: t.protocol,
                matches,
                listen: t.listen,
                backend,
                unparsed: t.unparsed,
                jit_approvers: t.jit_approvers.clone().filter(|g| !g.is_empty()),
                jit_max: Duration::from_secs(t.jit_max_secs),
                tls,
                client_tls: t.client_tls,
                backend_tls,
                backend_server_name: t.backend_server_name.clone(),
                auth: t.auth,
                roles,
                sockets: t.sockets.clone(),
                socket_backend: t.socket_backend.clone(),
            });
        }
        for (i, id) in self.identities.iter().enumerate() {
            if id.principal.is_empty() || id.uid.is_some() == id.cgroup.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "identity #{} needs a principal and exactly one of `uid` and `cgroup`",
                    i + 1
                )));
            }
        }
        Ok(out)
    }
}

/// A role with its password read from the environment or a root-only file.
fn resolve_role(r: &RoleConfig) -> Result<Role, String> {
    let password = match (&r.password_env, &r.password_file) {
        (Some(var), None) => std::env::var(var).map_err(|_| {
            format!(
                "role {}: environment variable {var} (password_env) is not set",
                r.name
            )
        })?,
        (None, Some(path)) => {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| format!("role {}: cannot read {}: {e}", r.name, path.display()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(format!(
                    "role {}: password file {} is readable by others than its owner (chmod 600 it)",
                    r.name,
                    path.display()
                ));
            }
            std::fs::read_to_string(path)
                .map_err(|e| format!("role {}: cannot read {}: {e}", r.name, path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string()
        }
        _ => {
            return Err(format!(
                "role {}: set exactly one of `password_env` and `password_file`",
                r.name
            ));
        }
    };
    if r.allow.is_empty() {
        return Err(format!(
            "role {}: `allow` is empty, so nobody could use it",
            r.name
        ));
    }
    Ok(Role {
        name: r.name.clone(),
        user: r.user.clone().unwrap_or_else(|| r.name.clone()),
        password: Secret(password),
        allow: r.allow.clone(),
    })
}

/// Parses `IP:PORT`, `[V6]:PORT`, `NAME:PORT` or `*:PORT`.
pub fn parse_match(text: &str) -> Result<TargetMatch, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(TargetMatch::Exact(addr));
    }
    let bad = || format!("match {text:?} is not IP:PORT, [V6]:PORT, NAME:PORT or *:PORT");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("bad port in match {text:?}"))?;
    if port == 0 {
        return Err(format!("bad port in match {text:?}"));
    }
    if host == "*" {
        return Ok(TargetMatch::AnyAddress { port });
    }
    if !is_dns_name(host) {
        return Err(bad());
    }
    Ok(TargetMatch::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

/// A host name as DNS and /etc/hosts spell one: dot-separated labels of letters, digits, `-`
/// and `_` (not first or last `-`), at most 253 characters, and not all digits and dots (that
/// is a malformed IPv4 address, not a name).
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && !host.chars().all(|c| c.is_ascii_digit() || c == '.')
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sluice.toml");
        let config = Config::load(&path).unwrap();
        let targets = config.targets().unwrap();
        assert!(!targets.is_empty());
        assert_eq!(targets[0].id, 1);
    }

    #[test]
    fn the_documented_shipper_section_loads_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sluice.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let (head, shipper) = text.split_once("# [shipper]").unwrap();
        let head = head.replace("# metrics_listen = ", "metrics_listen = ");
        let mut full = format!("{head}[shipper]");
        for line in shipper.lines() {
            full.push_str(line.strip_prefix("# ").unwrap_or(line));
            full.push('\n');
        }
        let config: Config = toml::from_str(&full).unwrap();
        let s = config.shipper.unwrap();
        assert_eq!(s.collector.as_deref(), Some("collector.example.com:7443"));
        assert_eq!(s.max_batch_events, default_batch_events());
        assert_eq!(s.max_batch_bytes, default_batch_bytes());
        assert_eq!(s.interval_ms, default_ship_interval());
        assert_eq!(s.timeout_secs, default_ship_timeout());
        assert_eq!(
            config.agent.metrics_listen,
            Some("127.0.0.1:9187".parse().unwrap())
        );
    }

    #[test]
    fn matches_parse_exact_v6_and_any() {
        assert_eq!(
            parse_match("127.0.0.1:5432").unwrap(),
            TargetMatch::Exact("127.0.0.1:5432".parse().unwrap())
        );
        assert_eq!(
            parse_match("[::1]:5432").unwrap(),
            TargetMatch::Exact("[::1]:5432".parse().unwrap())
        );
        assert_eq!(
            parse_match("*:5432").unwrap(),
            TargetMatch::AnyAddress { port: 5432 }
        );
        assert!(parse_match("*:x").is_err());
    }

    #[test]
    fn a_dns_name_is_a_match_and_malformed_names_are_refused() {
        assert_eq!(
            parse_match("prod-db.internal:5432").unwrap(),
            TargetMatch::Name {
                host: "prod-db.internal".into(),
                port: 5432
            }
        );
        assert_eq!(
            parse_match("DB:3306").unwrap(),
            TargetMatch::Name {
                host: "db".into(),
                port: 3306
            }
        );
        for bad in [
            "db",
            "db:",
            "db:0",
            "db:99999",
            ":5432",
            "-db:5432",
            "a..b:5432",
            "10.0.0:5432",
            "db/x:5432",
            "[db]:5432",
        ] {
            assert!(parse_match(bad).is_err(), "{bad}");
        }
        let text =
            "[agent]\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='prod-db.internal:5432'\n";
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.agent.resolve_interval(), Duration::from_secs(30));
        let t = c.targets().unwrap();
        assert_eq!(t[0].backend, None);
        let listen = format!("{text}listen='127.0.0.1:7000'\n");
        let c: Config = toml::from_str(&listen).unwrap();
        assert!(
            c.targets()
                .unwrap_err()
                .to_string()
                .contains("no `backend`")
        );
    }

    #[test]
    fn duplicate_names_and_unknown_keys_are_rejected() {
        let text = "[agent]\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='*:1'\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='*:2'\n";
        let c: Config = toml::from_str(text).unwrap();
        assert!(c.targets().unwrap_err().to_string().contains("unique"));
        let bad = "[agent]\nproxy_lissten='127.0.0.1:1'\n";
        assert!(toml::from_str::<Config>(bad).is_err());
    }

    #[test]
    fn identities_policy_dir_and_unparsed_are_read_and_checked() {
        let text = "[agent]\npolicy_dir = '/etc/sluice/policies'\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='*:1'\nunparsed='allow'\n[[identity]]\nuid=1000\nprincipal='ada'\ngroups=['admins']\n[[identity]]\ncgroup='/sys/fs/cgroup/ops'\nprincipal='ops'\n";
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.agent.approval_timeout(), Duration::from_secs(300));
        assert_eq!(c.agent.durability, Durability::Crash);
        let durable: Config = toml::from_str("[agent]\ndurability = 'power-loss'\n").unwrap();
        assert_eq!(durable.agent.durability, Durability::PowerLoss);
        assert!(toml::from_str::<Config>("[agent]\ndurability = 'maybe'\n").is_err());
        assert_eq!(c.targets().unwrap()[0].jit_approvers, None);
        assert_eq!(
            c.agent.policy_dir.as_deref(),
            Some(Path::new("/etc/sluice/policies"))
        );
        assert_eq!(c.targets().unwrap()[0].unparsed, Unparsed::Allow);
        assert_eq!(c.identities[0].groups, vec!["admins".to_string()]);
        let both = "[agent]\n[[identity]]\nuid=1\ncgroup='/x'\nprincipal='p'\n";
        let c: Config = toml::from_str(both).unwrap();
        assert!(c.targets().unwrap_err().to_string().contains("exactly one"));
        let default = "[agent]\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='*:1'\n";
        let c: Config = toml::from_str(default).unwrap();
        assert_eq!(c.targets().unwrap()[0].unparsed, Unparsed::Deny);
        assert!(c.agent.policy_dir.is_none());
    }

    #[test]
    fn tls_and_sluice_authentication_settings_are_checked_at_load() {
        let base = "[agent]\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='*:1'\n";
        let err = |extra: &str| {
            toml::from_str::<Config>(&format!("{base}{extra}"))
                .unwrap()
                .targets()
                .unwrap_err()
                .to_string()
        };
        assert!(err("client_tls='required'\n").contains("needs `tls_cert`"));
        assert!(err("tls_cert='/x'\n").contains("both `tls_cert` and `tls_key`"));
        assert!(err("backend_tls='verify-full'\n").contains("needs `backend_ca`"));
        assert!(err("auth='sluice'\n").contains("at least one [[target.role]]"));
        assert!(
            err("auth='sluice'\n[[target.role]]\nname='r'\nallow=['*']\n")
                .contains("exactly one of `password_env` and `password_file`")
        );
        assert!(
            err("auth='sluice'\n[[target.role]]\nname='r'\npassword_env='SLUICE_TEST_SURELY_UNSET'\nallow=['*']\n")
                .contains("SLUICE_TEST_SURELY_UNSET")
        );
        assert!(
            err("[[target.role]]\nname='r'\npassword_env='X'\nallow=['*']\n")
                .contains("only apply with `auth")
        );
        let role = Role {
            name: "r".into(),
            user: "r".into(),
            password: Secret("s3cret".into()),
            allow: vec!["group:dba".into(), "user:ada".into()],
        };
        assert!(role.allows("ada", &[]));
        assert!(role.allows("bob", &["dba".to_string()]));
        assert!(!role.allows("bob", &["dev".to_string()]));
        assert!(!format!("{role:?}").contains("s3cret"));
    }

    #[test]
    fn mysql_targets_load_with_sluice_auth_and_backend_tls() {
        let base = "[agent]\n[[target]]\nname='m'\nprotocol='mysql'\nmatch='127.0.0.1:3306'\n";
        let c: Config = toml::from_str(base).unwrap();
        let t = c.targets().unwrap();
        assert_eq!(t[0].protocol, Protocol::Mysql);
        assert_eq!(t[0].protocol.as_str(), "mysql");
        // PATH: a variable every test process has (its value does not matter here).
        let c: Config = toml::from_str(&format!(
            "{base}auth='sluice'\nbackend_tls='require'\n[[target.role]]\nname='r'\npassword_env='PATH'\nallow=['*']\n"
        ))
        .unwrap();
        let t = c.targets().unwrap();
        assert_eq!(t[0].auth, AuthMode::Sluice);
        assert!(t[0].backend_tls.is_some());
        assert_eq!(t[0].roles[0].user, "r");
    }

    #[test]
    fn a_listener_without_a_backend_is_rejected() {
        let text = "[agent]\n[[target]]\nname='a'\nprotocol='postgres'\nmatch='*:1'\nlisten='127.0.0.1:7000'\n";
        let c: Config = toml::from_str(text).unwrap();
        assert!(
            c.targets()
                .unwrap_err()
                .to_string()
                .contains("no `backend`")
        );
    }
}
