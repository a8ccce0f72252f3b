//! The `sluice` binary: command-line glue over the library. It parses arguments, sets up
//! logging, runs one command, and prints any error once, with its chain of causes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use sluice::config::{self, Config};
use sluice::control::{ControlRequest, ControlResponse};
use sluice::doctor;
use sluice::proxy::{self, RunOptions};
use sluice::read;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Identity-aware, recording gateway for database connections",
    long_about = "sluice intercepts every connection to a protected database port on this host (eBPF on \
the cgroup v2 hierarchy) and passes it through a Layer 7 proxy that authenticates the person \
(OIDC), decides every statement by policy (holding risky ones for approval), masks sensitive \
values, and records every request and every (masked) response in a local journal before \
forwarding it.\n\n\
Run the agent as root with `sluice agent --config FILE`. People use `sluice login`, `sluice \
request access`, `sluice requests`/`approve`/`deny`; auditors read the journal with `sluice \
sessions`, `sluice replay ID` and `sluice export`, also while the agent runs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    Jsonl,
    Csv,
}

#[derive(clap::Args)]
struct JournalArgs {
    /// Agent config whose `journal_dir` to read.
    #[arg(long, short, env = "SLUICE_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Journal directory to read (overrides the config's).
    #[arg(long, short)]
    journal: Option<PathBuf>,
    /// The journal's data key file (default: the one its `SEALED-WITH` file names); for a
    /// journal or store moved away from its key.
    #[arg(long, value_name = "FILE")]
    data_key: Option<PathBuf>,
}

/// Where the running agent's control socket is.
#[derive(clap::Args)]
struct AgentArgs {
    /// The agent's control socket (default: the config's `control_socket`).
    #[arg(long, env = "SLUICE_SOCKET")]
    socket: Option<PathBuf>,
    /// Agent config whose `control_socket` to use.
    #[arg(long, short, env = "SLUICE_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum RequestCommand {
    /// Ask for just-in-time access to a target; a member of its `jit_approvers` group approves.
    Access {
        /// The target (its `[[target]] name`).
        #[arg(long)]
        target: String,
        /// How long the grant lasts once approved: 90s, 30m, 2h, 1h30m.
        #[arg(long = "for", value_parser = sluice_journal::parse_duration)]
        duration: u64,
        /// Why (an incident or ticket id); shown to the approvers and kept in the journal.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Measure the journal: events per second from concurrent sessions recording result
    /// chunks (hash chain, checkpoints, encryption, WAL), and bytes per row on disk. Writes a
    /// throwaway journal in a temporary directory.
    Bench {
        /// Concurrent sessions.
        #[arg(long, default_value_t = 8)]
        writers: usize,
        /// Events (result chunks) per session.
        #[arg(long, default_value_t = 20_000)]
        events: u64,
        /// DataRows per chunk.
        #[arg(long, default_value_t = 10)]
        rows: u64,
        /// Every write waits for the WAL's fsync (durability = "power-loss").
        #[arg(long)]
        power_loss: bool,
        /// Store values in the clear (no data key) to see what encryption costs.
        #[arg(long)]
        no_encryption: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy directory (sluice.cedarschema + *.cedar) and print the errors or "ok".
    Check {
        /// The directory (the agent's `policy_dir`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Ask the running agent to reload its policies now (as SIGHUP does).
    Reload {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Measure the cost per statement of facts + Cedar, cached and uncached.
    Bench {
        #[arg(long)]
        dir: PathBuf,
        /// Decisions per measurement.
        #[arg(long, default_value_t = 100_000)]
        iterations: usize,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: attach the eBPF programs, proxy and record protected connections.
    Agent {
        /// Config file (TOML); see policies/sluice.toml for a documented example.
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Do not load eBPF: serve only targets with an explicit `listen` address.
        #[arg(long)]
        no_ebpf: bool,
        /// Log format on stderr (filter with RUST_LOG, default info).
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Check what the agent needs on this host (kernel and eBPF hooks, cgroup2, bpffs,
    /// capabilities, lockdown, the journal's disk, the collector, every target): one line
    /// each, `ok: ...` or `problem: ... (what to do)`; exits 1 if any problem. The agent runs
    /// the same checks at start.
    Doctor {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check a config file (and its masking file) and print the targets it protects, with the
    /// masking each gets; warns about masking rules whose target globs match no target.
    CheckConfig {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Policy tools: `sluice policy check --dir DIR`.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Journal tools: `sluice journal bench` measures the recording path.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// List requests for approval (held statements, access requests): open ones (pending,
    /// deferred, approved but not used yet), or --all.
    Requests {
        /// Also decided, timed-out and abandoned ones.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Approve a request: the held statement runs, or the access grant starts.
    Approve {
        /// Request id (a unique prefix is enough).
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Deny a request: the held statement fails with your reason.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Make a request: `sluice request access --target T --for 30m --reason "INC-1234"`.
    Request {
        #[command(subcommand)]
        command: RequestCommand,
    },
    /// List the active just-in-time grants.
    Grants {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// End a grant before it expires, or take back an approval of a MySQL statement that has
    /// not run yet (its requester or an approver may).
    Revoke {
        id: String,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Who the agent takes you for: your `sluice login`, a workload identity, or your uid.
    Whoami {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Log in with the company's identity provider (device flow: open the URL, enter the
    /// code); afterwards database connections from your uid need no password.
    Login {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Forget your login on this host.
    Logout {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// The agent's spool and shipping metrics: spool size, events not yet acknowledged by the
    /// collector, the age of the oldest one, events shipped, failed shipments.
    Status {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Enroll this agent at a collector with a one-time token from `sluice-collector token`
    /// (as root): proves possession of the journal signing key and pins the collector's
    /// certificate, writing both to `collector.toml` next to the key. Then add a `[shipper]`
    /// section to the config and restart the agent.
    Enroll {
        /// The collector, HOST:PORT.
        #[arg(long)]
        collector: String,
        /// The token, `<secret>.<fingerprint>`, as `sluice-collector token` printed it.
        #[arg(long, env = "SLUICE_ENROLL_TOKEN")]
        token: String,
        /// Refuse unless the token enrolls this agent name.
        #[arg(long)]
        name: Option<String>,
        /// Agent config (its `signing_key`, and `[shipper] enrollment_file` if set).
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check recorded sessions against their hash chains and signed checkpoints; exits 1 and
    /// names the event when anything was changed, dropped, inserted or reordered. With
    /// --bundle, checks an export's verification bundle offline (no journal needed) and, with
    /// --export, that the export is exactly what the bundle's signed events say.
    Verify {
        /// Only this session (id or unique prefix).
        #[arg(long, conflicts_with = "bundle")]
        session: Option<String>,
        #[command(flatten)]
        journal: JournalArgs,
        /// A bundle written by `sluice export --bundle`: verify it instead of a journal.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// With --bundle: the export file to re-derive from the bundle and compare byte for byte.
        #[arg(long, requires = "bundle")]
        export: Option<PathBuf>,
        /// With --bundle: the agent's Ed25519 public key (64 hex digits) every checkpoint must
        /// be signed with.
        #[arg(long, requires = "bundle")]
        key: Option<String>,
    },
    /// List recorded sessions: id, start, end, target, uid, comm, statements, bytes (and, in
    /// a collector's store, the collector's integrity verdict). Filters combine (AND), e.g.
    /// `sluice sessions --user app --statement people --since 7d`.
    Sessions {
        #[command(flatten)]
        journal: JournalArgs,
        #[command(flatten)]
        filter: read::FilterArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a readable transcript of one session: statements, result rows, tags, errors.
    Replay {
        /// Session id, or a unique prefix of it.
        id: String,
        #[command(flatten)]
        journal: JournalArgs,
        /// Rows shown per result set; the rest are counted.
        #[arg(long, default_value_t = 1000)]
        max_rows: usize,
        /// Replay with the recording's original timing: wait before each event as long as
        /// passed before it in the recording (divided by --speed). One wait is capped at 5 s
        /// divided by --speed, and the transcript says where a longer pause was shortened.
        #[arg(long)]
        timing: bool,
        /// With --timing: this many times faster than recorded (e.g. 10, or 0.5 for slower).
        #[arg(long, default_value_t = 1.0, requires = "timing", value_parser = parse_speed)]
        speed: f64,
    },
    /// Export recordings: one record per statement, row, tag, error and session start/end,
    /// each with its session, time, target, principal and user (values as recorded: masked).
    /// Takes the same filters as `sluice sessions`.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// Only this session (id or unique prefix).
        #[arg(long)]
        session: Option<String>,
        /// Write here instead of standard output.
        #[arg(long, short, visible_alias = "out")]
        output: Option<PathBuf>,
        /// Also write a verification bundle here (needs --out): the exported sessions' signed
        /// events and checkpoints and the export's SHA-256, for `sluice verify --bundle FILE
        /// --export EXPORT` anywhere, without the journal.
        #[arg(long, requires = "output")]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        journal: JournalArgs,
        #[command(flatten)]
        filter: read::FilterArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut text = format!("sluice: error: {e}");
            for cause in e.chain().skip(1) {
                text.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{text}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            config,
            no_ebpf,
            log_format,
        } => {
            init_logging(log_format);
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            runtime.block_on(async {
                let report = doctor::run(&config, doctor::Scope::agent(no_ebpf)).await;
                for check in report.advisories() {
                    tracing::warn!("{}", check.line());
                }
                let refused: Vec<String> = report.blocking().map(doctor::Check::line).collect();
                if !refused.is_empty() {
                    anyhow::bail!(
                        "this host cannot run the agent (`sluice doctor` checks it):\n{}",
                        refused.join("\n")
                    );
                }
                let shutdown = shutdown_signal()?;
                proxy::run(config, RunOptions { no_ebpf }, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Command::Policy {
            command: PolicyCommand::Check { dir },
        } => {
            let engine = sluice::policy::Engine::load(&dir)?;
            println!("{}: ok ({} policies)", dir.display(), engine.len());
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Reload { agent },
        } => {
            let r = control(&agent, ControlRequest::Reload)?;
            println!("policies reloaded: {}", r.message.unwrap_or_default());
            Ok(())
        }
        Command::Requests { all, json, agent } => {
            let r = control(&agent, ControlRequest::Requests { all })?;
            print_requests(&r.requests, json)
        }
        Command::Grants { json, agent } => {
            let r = control(&agent, ControlRequest::Grants)?;
            print_requests(&r.requests, json)
        }
        Command::Approve { id, comment, agent } => {
            let r = control(&agent, ControlRequest::Approve { id, comment })?;
            for req in &r.requests {
                println!("request {}: {}", req.id, req.state.describe());
            }
            Ok(())
        }
        Command::Deny { id, reason, agent } => {
            let r = control(&agent, ControlRequest::Deny { id, reason })?;
            for req in &r.requests {
                println!("request {}: {}", req.id, req.state.describe());
            }
            Ok(())
        }
        Command::Revoke { id, agent } => {
            let r = control(&agent, ControlRequest::Revoke { id })?;
            for req in &r.requests {
                // A grant, or a MySQL statement's approval that was not used yet.
                let what = match req.kind {
                    sluice_journal::RequestKind::Access { .. } => "grant",
                    _ => "approval of request",
                };
                println!("{what} {}: {}", req.id, req.state.describe());
            }
            Ok(())
        }
        Command::Whoami { agent } => {
            let r = control(&agent, ControlRequest::Whoami)?;
            print_identity(&r);
            Ok(())
        }
        Command::Login { agent } => login(&agent),
        Command::Status { agent } => {
            let r = control(&agent, ControlRequest::Status)?;
            print!("{}", r.message.unwrap_or_default());
            Ok(())
        }
        Command::Enroll {
            collector,
            token,
            name,
            config,
        } => enroll(&config, &collector, &token, name.as_deref()),
        Command::Logout { agent } => {
            let r = control(&agent, ControlRequest::Logout)?;
            if let Some(p) = r.principal {
                println!("logged out ({} on this host)", p.name);
            }
            Ok(())
        }
        Command::Request {
            command:
                RequestCommand::Access {
                    target,
                    duration,
                    reason,
                    agent,
                },
        } => {
            let r = control(
                &agent,
                ControlRequest::RequestAccess {
                    target,
                    seconds: duration,
                    reason,
                },
            )?;
            for req in &r.requests {
                println!(
                    "request {} sent to group \"{}\"; a member runs `sluice approve {}`; then `sluice grants` shows the grant",
                    req.id, req.approvers, req.id
                );
            }
            Ok(())
        }
        Command::Journal {
            command:
                JournalCommand::Bench {
                    writers,
                    events,
                    rows,
                    power_loss,
                    no_encryption,
                },
        } => {
            let dir = tempfile_dir()?;
            let options = sluice_journal::JournalOptions {
                signing_key: Some(dir.join("signing.key")),
                encryption_key: (!no_encryption).then(|| dir.join("data.key")),
                power_loss_durable: power_loss,
            };
            let r =
                sluice_journal::bench::bench(&dir.join("journal"), &options, writers, events, rows);
            let _ = std::fs::remove_dir_all(&dir);
            let r = r?;
            println!(
                "journal ({}{}): {} sessions, {} events in {:.2} s: {:.0} events/s, {:.1} MB/s of rows; {:.1} bytes per row on disk ({:.1} on the wire)",
                if power_loss {
                    "power-loss durable"
                } else {
                    "crash durable"
                },
                if no_encryption {
                    ", unencrypted"
                } else {
                    ", encrypted"
                },
                r.writers,
                r.events,
                r.seconds,
                r.events_per_second(),
                r.wire_mb_per_second(),
                r.disk_bytes_per_row(),
                r.wire_bytes_per_row()
            );
            Ok(())
        }
        Command::Policy {
            command: PolicyCommand::Bench { dir, iterations },
        } => {
            let r = sluice::policy::bench(&dir, iterations)?;
            println!(
                "policy: {} decisions over {} statements: cached {:.2} µs/statement, uncached {:.2} µs/statement (Cedar alone {:.2} µs)",
                r.iterations,
                sluice::policy::BENCH_MIX.len(),
                r.cached_us,
                r.uncached_us,
                r.cedar_us
            );
            Ok(())
        }
        Command::Doctor { config } => {
            let config = Config::load(&config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?;
            let report = runtime.block_on(doctor::run(&config, doctor::Scope::doctor()));
            print!("{}", report.render());
            let problems = report.checks.iter().filter(|c| !c.is_ok()).count();
            if problems > 0 {
                anyhow::bail!("{problems} problem(s) found");
            }
            Ok(())
        }
        Command::CheckConfig { config } => {
            let loaded = Config::load(&config)?;
            let masking = loaded
                .agent
                .masking_file
                .as_deref()
                .map(|path| sluice::proxy::load_masking(path).map(|rules| (path, rules)))
                .transpose()?;
            let targets = loaded.targets()?;
            println!("{}: ok", config.display());
            match &masking {
                Some((path, _)) => println!("masking rules {}: ok", path.display()),
                None => println!("masking: none (no masking_file): results pass unmasked"),
            }
            for t in &targets {
                println!(
                    "  target {} ({}): match {} listen {} backend {}",
                    t.name,
                    t.protocol.as_str(),
                    t.matches
                        .as_ref()
                        .map(|m| format!("{m:?}"))
                        .unwrap_or_else(|| "-".into()),
                    t.listen
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                    t.backend
                        .map(|a| a.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
                if let Some((_, rules)) = &masking {
                    let m = rules.for_target(&t.name);
                    let list = |names: &[&str]| {
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    };
                    println!(
                        "    masking: {}; column rules: {}; detectors: {}",
                        match (m.strict, m.mode_glob) {
                            (true, Some(g)) => format!("strict ([[target]] {g:?})"),
                            (false, Some(g)) => format!("not strict ([[target]] {g:?})"),
                            (_, None) => "not strict (no [[target]] matches)".to_string(),
                        },
                        list(&m.columns),
                        list(&m.detectors)
                    );
                }
            }
            if let Some((path, rules)) = &masking {
                let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
                for glob in rules.unmatched_target_globs(&names) {
                    eprintln!(
                        "warning: {}: {glob} matches none of the configured targets ({}), so it never applies",
                        path.display(),
                        names.join(", ")
                    );
                }
            }
            Ok(())
        }
        Command::Verify {
            bundle: Some(bundle),
            export,
            key,
            ..
        } => {
            let check = read::BundleCheck {
                export: export.as_deref(),
                key: key.as_deref().map(read::parse_key).transpose()?,
            };
            let bundle = read::Bundle::read(&bundle)?;
            let mut out = std::io::stdout().lock();
            let ok = read::verify_bundle(&bundle, &check, &mut out)?;
            out.flush()?;
            if !ok {
                anyhow::bail!("the bundle or the export does not verify (see above)");
            }
            Ok(())
        }
        Command::Verify {
            session, journal, ..
        } => {
            let reader = open_reader(&journal)?;
            let mut out = std::io::stdout().lock();
            let ok = read::verify(&reader, session.as_deref(), &mut out)?;
            out.flush()?;
            if !ok {
                anyhow::bail!("the journal does not verify (see above)");
            }
            Ok(())
        }
        Command::Sessions {
            journal,
            filter,
            json,
        } => {
            let filter = filter.parse()?;
            let reader = open_reader(&journal)?;
            let mut out = std::io::stdout().lock();
            read::print_sessions(&reader, &filter, json, &mut out)?;
            out.flush()?;
            Ok(())
        }
        Command::Replay {
            id,
            journal,
            max_rows,
            timing,
            speed,
        } => {
            let reader = open_reader(&journal)?;
            let mut out = std::io::stdout().lock();
            let options = read::ReplayOptions {
                max_rows,
                timing: timing.then_some(read::Timing { speed }),
            };
            read::replay(&reader, &id, &options, &mut out)?;
            out.flush()?;
            Ok(())
        }
        Command::Export {
            format,
            session,
            output,
            bundle,
            journal,
            filter,
        } => {
            let filter = filter.parse()?;
            let reader = open_reader(&journal)?;
            let format = match format {
                ExportFormat::Jsonl => read::Format::Jsonl,
                ExportFormat::Csv => read::Format::Csv,
            };
            if let (Some(bundle), Some(output)) = (&bundle, &output) {
                let n = read::export_with_bundle(
                    &reader,
                    session.as_deref(),
                    &filter,
                    format,
                    output,
                    bundle,
                )?;
                eprintln!(
                    "exported {n} sessions to {}; verification bundle {} (check with `sluice verify --bundle {} --export {}`)",
                    output.display(),
                    bundle.display(),
                    bundle.display(),
                    output.display()
                );
                return Ok(());
            }
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            read::export(&reader, session.as_deref(), &filter, format, &mut out)?;
            out.flush()?;
            Ok(())
        }
    }
}

/// The journal directory: `--journal`, else the config's `journal_dir`, else the default.
fn journal_dir(args: &JournalArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.journal {
        return Ok(dir.clone());
    }
    if args.config.exists() {
        return Ok(Config::load(&args.config)?.agent.journal_dir);
    }
    if args.config != Path::new(config::DEFAULT_PATH) {
        anyhow::bail!("config file {} does not exist", args.config.display());
    }
    Ok(PathBuf::from("/var/lib/sluice/journal"))
}

/// The control socket: `--socket`, else the config's `control_socket`, else the default.
fn socket_path(args: &AgentArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    if args.config.exists() {
        return Ok(Config::load(&args.config)?.agent.control_socket);
    }
    if args.config != Path::new(config::DEFAULT_PATH) {
        anyhow::bail!("config file {} does not exist", args.config.display());
    }
    Ok(PathBuf::from("/run/sluice/agent.sock"))
}

/// One request to the running agent.
fn control(args: &AgentArgs, request: ControlRequest) -> anyhow::Result<ControlResponse> {
    let path = socket_path(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    Ok(runtime.block_on(sluice::control::call(&path, &request))?)
}

/// `sluice login`: the device flow against the agent's issuer, then the tokens to the agent,
/// which binds this uid to the person until the token expires.
fn login(agent: &AgentArgs) -> anyhow::Result<()> {
    use sluice::identity::device;
    let info = control(agent, ControlRequest::OidcInfo)?;
    let (Some(issuer), Some(client_id)) = (info.issuer, info.client_id) else {
        anyhow::bail!("the agent did not say which issuer to log in to");
    };
    let cfg = device::DeviceConfig::new(issuer.clone(), client_id);
    let auth = device::authorize(&cfg).context("cannot start the login")?;
    println!("To log in to sluice, open");
    println!("    {}", auth.verification_uri);
    println!("and enter the code {}", auth.user_code);
    if let Some(complete) = &auth.verification_uri_complete {
        println!("(or open {complete})");
    }
    println!("Waiting up to {} s for you to finish ...", auth.expires_in);
    std::io::stdout().flush()?;
    let tokens = device::wait_for_tokens(&cfg, &auth).context("the login did not complete")?;
    let r = control(
        agent,
        ControlRequest::Login {
            id_token: tokens.id_token.clone(),
            refresh_token: tokens.refresh_token.clone(),
        },
    )?;
    print!("logged in: ");
    print_identity(&r);
    Ok(())
}

/// `sluice enroll`: see `ship::enroll`.
fn enroll(config: &Path, collector: &str, token: &str, name: Option<&str>) -> anyhow::Result<()> {
    let loaded = Config::load(config)?;
    let file = match &loaded.shipper {
        Some(s) => s.enrollment_path(&loaded.agent),
        None => config::default_enrollment_path(&loaded.agent),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let done = runtime.block_on(sluice::ship::enroll(
        &loaded.agent,
        &file,
        collector,
        token,
        name,
    ))?;
    println!(
        "enrolled as agent {:?} at {collector} (collector certificate {}; this agent's key {})",
        done.agent, done.fingerprint, done.public_key
    );
    println!("wrote {}", done.file.display());
    if loaded.shipper.is_none() {
        println!(
            "next: add a `[shipper]` section to {} and restart the agent to start shipping",
            config.display()
        );
    }
    Ok(())
}

fn print_identity(r: &ControlResponse) {
    let Some(p) = &r.principal else {
        return;
    };
    let groups = if p.groups.is_empty() {
        "none".to_string()
    } else {
        p.groups.join(", ")
    };
    let how = match (r.method.as_deref(), r.expires_ns) {
        (Some("login"), Some(ns)) => format!(
            "by `sluice login`, until {}",
            jiff::Timestamp::from_nanosecond(i128::from(ns))
                .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|_| ns.to_string())
        ),
        (Some("workload"), _) => "by this process's uid or cgroup ([[identity]])".into(),
        (Some("uid"), _) => "by uid only: run `sluice login`".into(),
        (Some(m), _) => m.to_string(),
        (None, _) => String::new(),
    };
    println!("{} (groups: {groups}) {how}", p.name);
}

fn print_requests(requests: &[sluice_journal::AccessRequest], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    read::print_requests(requests, json, &mut out)?;
    out.flush()?;
    Ok(())
}

/// A replay speed: a finite number above zero.
fn parse_speed(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!(
            "{text:?}: give a number above 0 (2 = twice as fast, 0.5 = half as fast)"
        )),
    }
}

fn open_reader(args: &JournalArgs) -> anyhow::Result<sluice_journal::Reader> {
    let dir = journal_dir(args)?;
    Ok(sluice_journal::Reader::open_with_key(
        &dir,
        args.data_key.as_deref(),
    )?)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    // Every field of the text format is escaped (a client's newline forges no log line);
    // the JSON format escapes by itself.
    match format {
        LogFormat::Text => builder.fmt_fields(sluice::inert::LogFields).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// A new private directory under the system's temporary directory.
fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "sluice-journal-bench-{}-{}",
        std::process::id(),
        sluice_journal::now_ns()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
