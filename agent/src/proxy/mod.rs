//! The proxy: listeners, the accept loop, one task per connection, and shutdown.
//!
//! Two kinds of listener feed the same path:
//! - the **redirect listener** (`agent.proxy_listen`, and [::1] on the same port), where the eBPF
//!   programs send every protected connect; the accepted connection's 4-tuple finds the record
//!   the kernel saved in `connect()` (original destination, process identity, target id);
//! - **explicit listeners** (`target.listen`), for clients that connect to sluice on purpose and
//!   for hosts without eBPF (`--no-ebpf`); their target and backend come from the config;
//! - **unix listeners** (`<agent.unix_listen_dir>/target-<id>.sock`), where `cgroup/connect_unix`
//!   sends connects to a target's protected socket names ([`unix`]); the accepted connection's
//!   peer socket finds the record saved in `connect()`, SO_PEERCRED gives uid, gid and pid.
//!
//! Shutdown follows mini-redis: a broadcast tells every task to stop, each connection task holds
//! a clone of an `mpsc::Sender` so that dropping the last one means all have sealed their
//! sessions, and a semaphore bounds concurrent connections. Accept loops stop first (new
//! redirected connects are then refused), sessions are sealed, and the eBPF programs are
//! detached last.
//!
//! This module never parses protocol bytes: that is `postgres/` and `mysql/`, one module per
//! protocol, on top of `protocol::`.

mod hold;
mod identify;
pub mod mysql;
mod postgres;
mod unix;
mod upstream;

/// The proxy's own dial (SO_MARK set before connect), for `sluice doctor`'s reachability checks.
pub(crate) use upstream::dial as dial_upstream;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use sluice_journal::{Journal, JournalOptions, ProcessInfo};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::access::Access;
use crate::config::{Config, IdentityConfig, Protocol, Target, TargetMatch};
use crate::control::{self, ControlContext};
use crate::identity::Identity;
use crate::intercept::{self, ConnTable, InterceptConfig, Interceptor, Match, UnixTable};
use crate::policy::Policy;
use crate::tls::Socket;
pub(crate) use upstream::Addr;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Journal(#[from] sluice_journal::JournalError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the policies")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("cannot load the approval requests")]
    Access(#[from] crate::access::AccessError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("invalid [oidc] section: {0}")]
    Oidc(String),
    #[error("cannot load the masking rules {path}: {message}")]
    Masking {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Resolve(#[from] crate::resolve::ResolveError),
    #[error(
        "cannot set up eBPF interception (run as root, or use --no-ebpf with explicit listeners)"
    )]
    Intercept(#[from] intercept::InterceptError),
    #[error(transparent)]
    Unix(#[from] unix::UnixError),
}

/// How the agent runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Do not load eBPF; serve only the targets' explicit listeners.
    pub no_ebpf: bool,
}

/// The policy id of a statement strict masking denies (both protocols).
pub(crate) const STRICT_MASKING_POLICY: &str = "sluice-masking-strict";

/// The denial strict masking gives `sql` on `target` (both protocols): a statement that would
/// return a masked column under another name or move it anywhere sluice cannot track it
/// (`policy::tracking`); None when it may run.
pub(crate) fn strict_denial(
    rules: &crate::mask::rules::RuleSet,
    target: &str,
    dialect: crate::policy::Dialect,
    sql: &str,
) -> Option<crate::policy::Verdict> {
    let why =
        crate::policy::tracking::untracked(sql, dialect, &|c| rules.masks_column_name(target, c))?;
    Some(crate::policy::Verdict {
        allowed: false,
        policies: vec![STRICT_MASKING_POLICY.into()],
        reason: format!("target \"{target}\" masks in strict mode and {why}"),
        approval: None,
    })
}

/// Which end of a proxied connection something came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The engineer's client.
    Client,
    /// The database server.
    Server,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// Why a proxied session ended, whatever its protocol: the only way a started session is
/// sealed ([`End::seal`]); the text goes to the journal's end event and the log.
#[derive(Debug)]
pub(crate) enum End {
    ClientClosed,
    ServerClosed,
    ClientClosedMidMessage,
    ServerClosedMidMessage,
    Malformed {
        from: Side,
        reason: String,
    },
    Io {
        from: Side,
        error: std::io::Error,
    },
    Journal(sluice_journal::JournalError),
    Shutdown,
    /// sluice refused something that ends the session (the client was told why, and the
    /// refusal is journaled).
    Refused(String),
    /// A message or packet declared longer than `max_message_bytes`.
    TooLarge {
        from: Side,
        len: usize,
        max: usize,
    },
    /// Before the relay: the connect decision denied the session (the client was told why).
    ConnectDenied,
    /// Before the relay: the backend could not be dialed (the client was told why).
    BackendUnreachable,
    /// Before the relay: sluice's own login to the backend failed (the client was told why).
    BackendLoginFailed,
    /// Before the relay: the backend refused the client's own login (passthrough; its error
    /// went to the client as the backend sent it).
    BackendRefusedLogin,
}

impl End {
    /// The sentence for the journal and the log; `unit` is the protocol's word for what it
    /// frames ("message", "packet").
    pub fn text(&self, unit: &str) -> String {
        match self {
            End::ClientClosed => "client closed the connection".into(),
            End::ServerClosed => "server closed the connection".into(),
            End::ClientClosedMidMessage => format!("client disconnected in the middle of a {unit}"),
            End::ServerClosedMidMessage => format!("server disconnected in the middle of a {unit}"),
            End::Malformed { from, reason } => {
                format!("malformed {unit} from the {from}: {reason}")
            }
            // A TLS peer that closes without close_notify (the mariadb CLI after an error,
            // many drivers) has still just closed: not an i/o error.
            End::Io { from, error } if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                format!("{from} closed the connection (without TLS close_notify)")
            }
            End::Io { from, error } => format!("i/o error on the {from} connection: {error}"),
            End::Journal(e) => format!("journal write failed: {e}"),
            End::Shutdown => "agent shutdown".into(),
            End::Refused(reason) => reason.clone(),
            End::TooLarge { from, len, max } => format!(
                "a {unit} of {len} bytes from the {from} exceeds max_message_bytes ({max} bytes)"
            ),
            End::ConnectDenied => "connect denied by policy".into(),
            End::BackendUnreachable => "backend unreachable".into(),
            End::BackendLoginFailed => "backend login failed".into(),
            End::BackendRefusedLogin => "the backend refused the login".into(),
        }
    }

    /// An end the journal already explains (a close, a shutdown, a refusal the client was
    /// sent and that was journaled): logged at info and not noted again.
    fn normal(&self) -> bool {
        match self {
            End::ClientClosed
            | End::ServerClosed
            | End::Shutdown
            | End::Refused(_)
            | End::ConnectDenied
            | End::BackendUnreachable
            | End::BackendLoginFailed
            | End::BackendRefusedLogin => true,
            End::Io { error, .. } => error.kind() == std::io::ErrorKind::UnexpectedEof,
            _ => false,
        }
    }

    /// Logs how the session ended, notes an abnormal end in the journal (unless the journal
    /// is what failed), and seals the session.
    pub fn seal(self, recorder: &sluice_journal::SessionRecorder, unit: &str) {
        let text = self.text(unit);
        if self.normal() {
            info!(reason = %text, "session ended");
        } else {
            warn!(reason = %text, "session ended abnormally");
            if !matches!(self, End::Journal(_)) {
                let _ = recorder.note(sluice_journal::NoteLevel::Error, text.clone());
            }
        }
        if let Err(e) = recorder.end(text) {
            warn!(error = %e, "cannot seal the session");
        }
    }
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub config: crate::config::AgentConfig,
    pub targets: Vec<Target>,
    pub journal: Journal,
    pub conns: Option<ConnTable>,
    /// Redirected unix connects (None: no unix socket name is protected).
    pub unix_conns: Option<UnixTable>,
    /// None: no `policy_dir`, every statement is allowed.
    pub policy: Option<Arc<Policy>>,
    pub identities: Vec<IdentityConfig>,
    pub access: Arc<Access>,
    /// PostgreSQL sessions by backend key, for CancelRequests.
    pub pg_cancels: Arc<postgres::CancelKeys>,
    /// MySQL sessions by backend connection id, for KILLs of held statements.
    pub mysql_kills: Arc<mysql::KillTargets>,
    /// Token validation and `sluice login` bindings.
    pub identity: Arc<Identity>,
    /// Masking rules (None: results pass unmasked).
    pub masking: Option<Arc<crate::mask::rules::RuleSet>>,
    /// Column origins for masking, per target and database.
    pub pg_catalogs: Arc<postgres::Catalogs>,
    /// Targets named by DNS: their addresses, and the sessions using each.
    pub names: Arc<crate::resolve::Names>,
}

impl Shared {
    fn target(&self, id: u32) -> Option<&Target> {
        self.targets.iter().find(|t| t.id == id)
    }

    /// Whether a new session may start, given the journal's spool limit: Err carries the
    /// sentence the client gets when the spool is full and the agent fails closed.
    pub fn admit_session(&self) -> Result<(), String> {
        let max = self.config.spool_max_bytes;
        if max == 0 {
            return Ok(());
        }
        let used = self.journal.spool_bytes();
        if used < max {
            return Ok(());
        }
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        match self.config.spool_full {
            crate::config::SpoolFull::Admit => {
                warn!(
                    used_mib = mib(used),
                    max_mib = mib(max),
                    "journal spool is full; admitting the session anyway (spool_full = \"admit\")"
                );
                Ok(())
            }
            crate::config::SpoolFull::Refuse => Err(format!(
                "sluice: new sessions are refused because this host's recording spool is full ({:.1} of {:.1} MiB): recordings are kept until the collector acknowledges them; ask the administrator to check the shipper and the collector",
                mib(used),
                mib(max)
            )),
        }
    }
    /// Starts the journal's record of a session through `routed` (its start event).
    pub fn start_session(
        &self,
        routed: &Routed,
        params: Vec<(String, String)>,
        principal: Option<sluice_journal::Principal>,
    ) -> Result<sluice_journal::SessionRecorder, sluice_journal::JournalError> {
        self.journal.start_session(sluice_journal::SessionStart {
            target: routed.target.name.clone(),
            protocol: routed.target.protocol.as_str().into(),
            orig_dst: routed.orig_dst.to_string(),
            client_addr: routed.client_addr.to_string(),
            process: routed.process.clone(),
            params,
            principal,
        })
    }

    /// Journals a connection refused before its session could start: a session holding the
    /// refusal `text` as its note and end (the client was told in its protocol's words).
    pub fn record_refusal(&self, routed: &Routed, params: Vec<(String, String)>, text: &str) {
        warn!(reason = %text, "connection refused before the session started");
        if let Ok(rec) = self.start_session(routed, params, None) {
            let _ = rec.note(sluice_journal::NoteLevel::Error, text.to_string());
            End::Refused(text.to_string()).seal(&rec, routed.target.protocol.unit());
        }
    }

    /// The masking rules when `target` masks in strict mode (statements are then checked even
    /// without policies).
    pub fn strict_masking(&self, target: &str) -> Option<Arc<crate::mask::rules::RuleSet>> {
        self.masking
            .as_ref()
            .filter(|r| r.is_strict(target))
            .cloned()
    }
}

/// The policies' request for `who` connecting through `routed` (Err: why it cannot be built).
pub(crate) fn policy_session(
    policy: &Policy,
    routed: &Routed,
    who: &sluice_journal::Principal,
) -> Result<crate::policy::SessionPolicy, String> {
    policy
        .engine()
        .session(
            crate::policy::PrincipalRef {
                name: &who.name,
                groups: &who.groups,
            },
            &routed.target.name,
            crate::policy::Source {
                uid: routed.process.as_ref().map(|p| p.uid),
                comm: routed
                    .process
                    .as_ref()
                    .map(|p| p.comm.as_str())
                    .unwrap_or(""),
            },
        )
        .map_err(|e| format!("cannot build the policy request: {e}"))
}

/// May the principal connect at all (a just-in-time grant counts)? The decision is journaled
/// in the session. Ok: the session's request to the policies, for its statements; Err: the
/// sentence the client gets.
pub(crate) fn decide_connect(
    policy: &Policy,
    session: Result<crate::policy::SessionPolicy, String>,
    jit: bool,
    recorder: &sluice_journal::SessionRecorder,
) -> Result<crate::policy::SessionPolicy, String> {
    let connect = match &session {
        Ok(s) => policy.engine().decide_connect(s, jit),
        Err(reason) => crate::policy::Verdict {
            allowed: false,
            policies: Vec::new(),
            reason: reason.clone(),
            approval: None,
        },
    };
    let _ = recorder.decision(sluice_journal::Decision {
        sql: String::new(),
        action: "connect".into(),
        facts: String::new(),
        allowed: connect.allowed,
        policies: connect.policies.clone(),
        reason: connect.reason.clone(),
    });
    match session {
        Ok(session) if connect.allowed => Ok(session),
        _ => Err(connect.message()),
    }
}

/// Reads and discards up to `len` bytes from `client` (`buffered` of them already read), for at
/// most two seconds: before refusing a message or packet too large to buffer, so that closing
/// does not reset the connection before the client has read why.
pub(crate) async fn drain<R: tokio::io::AsyncRead + Unpin>(
    client: &mut R,
    buffered: usize,
    len: usize,
) {
    use tokio::io::AsyncReadExt;
    let mut left = len.saturating_sub(buffered);
    let mut scratch = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while left > 0 {
        match tokio::time::timeout_at(deadline, client.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// Where an accepted connection came in.
#[derive(Debug, Clone, Copy)]
enum Entry {
    Redirect,
    Explicit {
        target_id: u32,
    },
    /// A target's unix listener.
    Unix {
        target_id: u32,
    },
}

/// A connection whose destination and origin are known.
pub(crate) struct Routed {
    pub target: Target,
    pub backend: Addr,
    pub orig_dst: Addr,
    pub client_addr: Addr,
    pub process: Option<ProcessInfo>,
}

/// A listening socket of either family.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(Socket, Addr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Socket::Tcp(s), Addr::Tcp(peer)))
            }
            // Clients of a database socket do not bind theirs: the peer is unnamed, and the
            // listener's path says where it came in.
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Socket::Unix(s), Addr::Unix(path.clone())))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

/// Runs the agent until `shutdown` resolves, then seals every session and detaches.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let targets = config.targets()?;
    std::fs::create_dir_all(&config.agent.journal_dir).map_err(|source| ProxyError::Listen {
        addr: config.agent.proxy_listen,
        source,
    })?;
    let journal = Journal::open_with(
        &config.agent.journal_dir,
        &JournalOptions {
            signing_key: Some(config.agent.signing_key.clone()),
            encryption_key: Some(config.agent.encryption_key.clone()),
            power_loss_durable: config.agent.durability == crate::config::Durability::PowerLoss,
        },
    )?;
    for id in journal.recovered() {
        warn!(session = %id, "the previous agent left this session open: sealed as interrupted");
    }
    let access = Arc::new(Access::open(journal.clone())?);
    let identity = Arc::new(match &config.oidc {
        Some(o) => {
            let id = Identity::new(o.validation.clone(), o.client_id())
                .map_err(|e| ProxyError::Oidc(e.to_string()))?;
            info!(issuer = %o.validation.issuer, "OIDC tokens accepted from this issuer");
            id
        }
        None => Identity::none(),
    });
    let policy = match &config.agent.policy_dir {
        Some(dir) => {
            let p = Policy::load(dir)?;
            info!(dir = %dir.display(), policies = p.engine().len(), "policies loaded");
            Some(p)
        }
        None => {
            warn!(
                "NO POLICY: agent.policy_dir is not set, so every statement is allowed (it is still recorded)"
            );
            None
        }
    };

    let masking = match &config.agent.masking_file {
        Some(path) => {
            let rules = load_masking(path)?;
            info!(file = %path.display(), "masking rules loaded");
            Some(Arc::new(rules))
        }
        None => None,
    };

    let names = Arc::new(crate::resolve::Names::resolve(&targets).await?);
    let mut listeners: Vec<(Listener, Entry)> = Vec::new();
    let mut interceptor = None;
    let mut unix_unprotected = false;
    if !options.no_ebpf {
        let v4 = config.agent.proxy_listen;
        listeners.push((Listener::Tcp(bind(v4).await?), Entry::Redirect));
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), v4.port());
        match bind(v6).await {
            Ok(l) => listeners.push((Listener::Tcp(l), Entry::Redirect)),
            Err(e) => {
                warn!(error = %e, "no IPv6 loopback: IPv6 clients of protected targets will be refused")
            }
        }
        let matches = intercept_matches(&targets, &names.protected())?;
        let cgroup = match &config.agent.cgroup {
            Some(c) => c.clone(),
            None => intercept::cgroup2_root()?,
        };
        let exempt_cgroup_id = own_cgroup_exemption(config.agent.exempt_own_cgroup, &cgroup)?;
        let cfg = InterceptConfig {
            cgroup: cgroup.clone(),
            proxy_port: v4.port(),
            mark: config.agent.upstream_mark,
            exempt_cgroup_id,
            pin_dir: config.agent.bpf_pin_dir.clone(),
        };
        let plan = unix::plan(&config.agent, &targets, &intercept::local_addresses()?)?;
        let exempt = unix::exempt_cgroups(&config.agent)?;
        let attached = match Interceptor::attach_with_unix(&cfg, &matches, &plan.matches, &exempt) {
            Ok(a) => a,
            Err(e)
                if !plan.matches.is_empty()
                    && config.agent.unix_sockets == crate::config::UnixSockets::Unprotected =>
            {
                error!(
                    error = %crate::error_chain(&e),
                    "UNIX SOCKETS UNPROTECTED: the kernel cannot load the unix-socket hook \
                     (cgroup/connect_unix, kernel 6.7+), and agent.unix_sockets = \"unprotected\": \
                     clients that connect to the targets' unix sockets go around sluice"
                );
                unix_unprotected = true;
                Interceptor::attach(&cfg, &matches)?
            }
            Err(e) if !plan.matches.is_empty() => {
                return Err(unix::UnixError::Hook(Box::new(e)).into());
            }
            Err(e) => return Err(e.into()),
        };
        info!(cgroup = %cgroup.display(), protected = matches.len(), unix_names = plan.matches.len(), exempt_cgroup_id, "eBPF interception attached");
        if !unix_unprotected {
            for (listener, target_id, path) in plan.listeners {
                listeners.push((Listener::Unix(listener, path), Entry::Unix { target_id }));
            }
        }
        interceptor = Some(attached);
    }
    for t in &targets {
        match t.listen {
            Some(addr) => listeners.push((
                Listener::Tcp(bind(addr).await?),
                Entry::Explicit { target_id: t.id },
            )),
            None if options.no_ebpf => {
                warn!(target = %t.name, "target has no `listen` address: unreachable without eBPF")
            }
            None => {}
        }
    }

    let shared = Arc::new(Shared {
        config: config.agent.clone(),
        targets,
        journal,
        conns: interceptor.as_ref().map(Interceptor::connections),
        unix_conns: interceptor.as_ref().and_then(Interceptor::unix_connections),
        policy,
        identities: config.identities.clone(),
        access,
        pg_cancels: Arc::default(),
        mysql_kills: Arc::default(),
        identity: identity.clone(),
        masking,
        pg_catalogs: Arc::default(),
        names: names.clone(),
    });
    let (stop_tx, _) = broadcast::channel::<()>(1);
    let ship_metrics = Arc::new(crate::ship::ShipMetrics::default());
    ship_metrics.unix_sockets_unprotected.store(
        u64::from(unix_unprotected),
        std::sync::atomic::Ordering::Relaxed,
    );
    let control_listener = control::bind(&shared.config.control_socket)?;
    info!(socket = %shared.config.control_socket.display(), "control socket ready");
    let control_task = tokio::spawn(control::serve(
        control_listener,
        Arc::new(ControlContext {
            access: shared.access.clone(),
            identities: shared.identities.clone(),
            targets: shared.targets.clone(),
            policy: shared.policy.clone(),
            identity: shared.identity.clone(),
            oidc: config
                .oidc
                .as_ref()
                .map(|o| (o.validation.issuer.clone(), o.client_id().to_string())),
            ship: ship_metrics.clone(),
            journal: shared.journal.clone(),
        }),
        stop_tx.subscribe(),
    ));
    let refresh_task = tokio::spawn(refresh_logins(
        shared.identity.clone(),
        Duration::from_secs(shared.config.login_refresh_secs.max(1)),
        stop_tx.subscribe(),
    ));
    let reload_task = shared.policy.clone().map(|p| {
        tokio::spawn(watch_policies(
            p,
            Duration::from_secs(shared.config.policy_poll_secs),
            stop_tx.subscribe(),
        ))
    });
    let ship_task = match &config.shipper {
        Some(s) => Some(tokio::spawn(crate::ship::run(
            shared.journal.clone(),
            s.clone(),
            config.agent.clone(),
            ship_metrics.clone(),
            stop_tx.subscribe(),
        ))),
        None => {
            info!("no [shipper] section: the journal stays on this host (nothing is shipped)");
            None
        }
    };
    let names_task = match &interceptor {
        Some(i) if !names.is_empty() => {
            let table = i.targets();
            let targets = shared.targets.clone();
            let apply = move |named: &[(u32, SocketAddr)]| match intercept_matches(&targets, named)
                .and_then(|m| Ok(table.replace(&m)?))
            {
                Ok(()) => info!(
                    protected = named.len(),
                    "protected addresses of named targets updated"
                ),
                Err(e) => {
                    error!(error = %crate::error_chain(&e), "cannot update the protected addresses: the previous ones stay protected")
                }
            };
            Some(tokio::spawn(names.clone().watch(
                shared.config.resolve_interval(),
                apply,
                stop_tx.subscribe(),
            )))
        }
        _ => None,
    };
    let refresh_metrics_task = tokio::spawn(crate::ship::refresh_metrics(
        shared.journal.clone(),
        ship_metrics.clone(),
        Duration::from_secs(2),
        stop_tx.subscribe(),
    ));
    let metrics_task = match config.agent.metrics_listen {
        Some(addr) => {
            let listener = bind(addr).await?;
            info!(%addr, "metrics at http://{addr}/metrics");
            Some(tokio::spawn(crate::ship::serve_metrics(
                listener,
                ship_metrics.clone(),
                shared.journal.clone(),
                stop_tx.subscribe(),
            )))
        }
        None => None,
    };
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(shared.config.max_connections.max(1)));

    let mut accept_tasks = Vec::new();
    for (listener, entry) in listeners {
        let addr = listener.describe();
        info!(%addr, ?entry, "listening");
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            entry,
            shared.clone(),
            limit.clone(),
            stop_tx.clone(),
            done_tx.clone(),
        )));
    }
    drop(done_tx);
    info!(
        targets = shared.targets.len(),
        ebpf = !options.no_ebpf,
        "sluice agent ready"
    );

    shutdown.await;
    info!("shutting down: sealing open sessions");
    let _ = stop_tx.send(());
    for task in accept_tasks {
        let _ = task.await;
    }
    let _ = control_task.await;
    let _ = refresh_task.await;
    if let Some(t) = reload_task {
        let _ = t.await;
    }
    let _ = refresh_metrics_task.await;
    for t in [ship_task, metrics_task, names_task].into_iter().flatten() {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&shared.config.control_socket);
    drop(stop_tx);
    // Every connection task holds a Sender; recv() returns None once all have finished.
    if tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
        .await
        .is_err()
    {
        warn!("some sessions did not finish within 10 s of shutdown");
    }
    if let Some(i) = interceptor {
        match i.counters() {
            Ok(c) => info!(counters = ?c, "eBPF counters at shutdown"),
            Err(e) => warn!(error = %e, "cannot read eBPF counters"),
        }
        match i.unix_counters() {
            Some(Ok(c)) => info!(counters = ?c, "unix eBPF counters at shutdown"),
            Some(Err(e)) => warn!(error = %e, "cannot read the unix eBPF counters"),
            None => {}
        }
        i.detach()?;
        info!("eBPF interception detached");
    }
    info!("sluice agent stopped");
    Ok(())
}

/// The masking rules in `path` (and the hash key file they name).
pub fn load_masking(path: &std::path::Path) -> Result<crate::mask::rules::RuleSet, ProxyError> {
    use crate::mask::rules::{KeySource, RuleSet, RulesFile};
    let fail = |message: String| ProxyError::Masking {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let file = RulesFile::parse(&text).map_err(|e| fail(e.to_string()))?;
    let key = match file.key_source() {
        KeySource::File(k) => {
            Some(std::fs::read(&k).map_err(|e| fail(format!("{}: {e}", k.display())))?)
        }
        KeySource::None | KeySource::Inline => None,
    };
    RuleSet::compile(&file, key.as_deref()).map_err(|e| fail(e.to_string()))
}

/// Every `every`, refreshes `sluice login` bindings whose token expires within five minutes
/// (when the login left a refresh token).
async fn refresh_logins(
    identity: Arc<Identity>,
    every: Duration,
    mut stop: broadcast::Receiver<()>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.recv() => return,
            _ = tick.tick() => {}
        }
        let id = identity.clone();
        match tokio::task::spawn_blocking(move || id.refresh_due(300_000_000_000)).await {
            Ok(0) | Err(_) => {}
            Ok(n) => info!(refreshed = n, "login tokens refreshed"),
        }
    }
}

/// Reloads the policies on SIGHUP and, every `poll` (zero: never), when a file in their
/// directory changed. A set that fails to load is logged with Cedar's messages and the
/// previous one stays in force.
async fn watch_policies(policy: Arc<Policy>, poll: Duration, mut stop: broadcast::Receiver<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP: policies reload on file change only");
            None
        }
    };
    let mut seen = crate::policy::dir_fingerprint(policy.dir());
    let mut tick = (!poll.is_zero()).then(|| tokio::time::interval(poll));
    loop {
        let why = tokio::select! {
            _ = stop.recv() => return,
            Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = async { match tick.as_mut() { Some(t) => { t.tick().await; } None => std::future::pending::<()>().await } } => {
                let now = crate::policy::dir_fingerprint(policy.dir());
                if now == seen {
                    continue;
                }
                seen = now;
                "a policy file changed"
            }
        };
        match policy.reload() {
            Ok(n) => {
                info!(policies = n, dir = %policy.dir().display(), reason = why, "policies reloaded")
            }
            Err(e) => error!(
                dir = %policy.dir().display(),
                reason = why,
                error = %crate::error_chain(&e),
                "policy reload refused: the previous policies stay in force"
            ),
        }
    }
}

/// The agent's own cgroup id, when it may be exempted. Never the cgroup2 root's, nor the attach
/// cgroup's: exempting those would exempt every process the programs are meant to cover.
fn own_cgroup_exemption(wanted: bool, attach: &std::path::Path) -> Result<Option<u64>, ProxyError> {
    if !wanted {
        return Ok(None);
    }
    let own = intercept::own_cgroup_id()?;
    let root = intercept::cgroup_id(&intercept::cgroup2_root()?)?;
    let attached = intercept::cgroup_id(attach)?;
    if own == root || own == attached {
        warn!(
            "the agent runs in the cgroup2 root or in the cgroup it attaches to, so its cgroup is not exempted \
             (that would exempt everything); its upstream connections are exempt by SO_MARK alone. \
             Run the agent in a cgroup of its own (e.g. a systemd unit)"
        );
        return Ok(None);
    }
    Ok(Some(own))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Listen { addr, source })
}

/// The eBPF map entries for the configured targets, a named target's being the addresses in
/// `named` (target id, address). A backend on this host is reachable through every local
/// address (loopback, unspecified, each interface address), so an exact match on any of them
/// protects all of them: otherwise `127.0.0.2` or the host's own address would be a way around
/// the proxy.
fn intercept_matches(
    targets: &[Target],
    named: &[(u32, SocketAddr)],
) -> Result<Vec<(Match, u32)>, ProxyError> {
    let locals = intercept::local_addresses()?;
    let mut out = Vec::new();
    for t in targets {
        let exact: Vec<SocketAddr> = match &t.matches {
            Some(TargetMatch::Exact(addr)) => vec![*addr],
            Some(TargetMatch::Name { .. }) => named
                .iter()
                .filter(|(id, _)| *id == t.id)
                .map(|(_, addr)| *addr)
                .collect(),
            Some(TargetMatch::AnyAddress { port }) => {
                out.push((Match::Any { port: *port }, t.id));
                Vec::new()
            }
            None => Vec::new(),
        };
        for addr in exact {
            let ip = addr.ip().to_canonical();
            out.push((Match::Exact(addr), t.id));
            if ip.is_loopback() || ip.is_unspecified() || locals.contains(&ip) {
                out.push((Match::AnyLocal { port: addr.port() }, t.id));
                for l in &locals {
                    out.push((Match::Exact(SocketAddr::new(*l, addr.port())), t.id));
                }
            }
        }
    }
    Ok(out)
}

async fn accept_loop(
    listener: Listener,
    entry: Entry,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    stop: broadcast::Sender<()>,
    done: mpsc::Sender<()>,
) {
    let mut stopping = stop.subscribe();
    loop {
        // Subscribed before accepting, so a stop sent while a connection is being accepted
        // still reaches that connection's task.
        let mut conn_stop = stop.subscribe();
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stopping.recv() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopping.recv() => return,
        };
        let shared = shared.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = done;
            handle(stream, peer, entry, &shared, &mut conn_stop).await;
        });
    }
}

async fn handle(
    stream: Socket,
    peer: Addr,
    entry: Entry,
    shared: &Shared,
    stop: &mut broadcast::Receiver<()>,
) {
    let routed = match &stream {
        Socket::Tcp(tcp) => {
            let (Addr::Tcp(peer), Ok(local)) = (&peer, tcp.local_addr()) else {
                debug!(%peer, "connection gone before it could be routed");
                return;
            };
            route(*peer, local, entry, shared).await
        }
        Socket::Unix(s) => unix::route(s, peer.clone(), entry, shared),
    };
    let Some(routed) = routed else {
        return;
    };
    // A named target's old address stays protected while this session uses it.
    let _in_use = match &routed.backend {
        Addr::Tcp(backend) => shared.names.hold(routed.target.id, *backend),
        Addr::Unix(_) => None,
    };
    let span = info_span!("session", target = %routed.target.name, client = %peer, session = tracing::field::Empty, principal = tracing::field::Empty);
    match routed.target.protocol {
        Protocol::Postgres => {
            postgres::serve(stream, routed, shared, stop)
                .instrument(span)
                .await
        }
        Protocol::Mysql => {
            mysql::serve(stream, routed, shared, stop)
                .instrument(span)
                .await
        }
    }
}

async fn route(
    peer: SocketAddr,
    local: SocketAddr,
    entry: Entry,
    shared: &Shared,
) -> Option<Routed> {
    match entry {
        Entry::Explicit { target_id } => {
            let target = shared.target(target_id)?.clone();
            let backend = target.backend?;
            Some(Routed {
                target,
                backend: Addr::Tcp(backend),
                orig_dst: Addr::Tcp(local),
                client_addr: Addr::Tcp(peer),
                process: None,
            })
        }
        Entry::Unix { .. } => None,
        Entry::Redirect => {
            let conns = shared.conns.as_ref()?;
            // The sockops program stores the record before the client's ACK, so it is there
            // by the time accept() returns; the retries only cover an unexpected delay.
            let mut record = None;
            for _ in 0..20 {
                match conns.take(peer, local) {
                    Ok(Some(r)) => {
                        record = Some(r);
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(1)).await,
                    Err(e) => {
                        error!(error = %e, %peer, "cannot read the interception record");
                        return None;
                    }
                }
            }
            let Some(record) = record else {
                warn!(%peer, %local, "connection to the redirect port without an interception record: closed");
                return None;
            };
            let Some(target) = shared.target(record.target_id).cloned() else {
                warn!(%peer, target_id = record.target_id, "interception record names an unknown target: closed");
                return None;
            };
            Some(Routed {
                target,
                backend: Addr::Tcp(record.orig_dst),
                orig_dst: Addr::Tcp(record.orig_dst),
                client_addr: Addr::Tcp(peer),
                process: Some(ProcessInfo {
                    uid: record.uid,
                    gid: record.gid,
                    pid: record.pid,
                    comm: record.comm.clone(),
                    cgroup_id: record.cgroup_id,
                    connected_ns: record
                        .connected_at
                        .duration_since(UNIX_EPOCH)
                        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                        .unwrap_or(0),
                }),
            })
        }
    }
}
