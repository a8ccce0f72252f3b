//! The `sluice-collector` binary: command-line glue over the library. It parses arguments,
//! sets up logging, runs one command, and prints any error once, with its chain of causes.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice_collector::registry::{Registry, format_ns};
use sluice_wire::{api, pki};

mod serve;

#[derive(Parser)]
#[command(
    name = "sluice-collector",
    version,
    about = "Receives, verifies and keeps the recordings of sluice agents",
    long_about = "sluice-collector receives the journals of sluice agents over HTTPS with mutual TLS, \
verifies every session's hash chain and signed checkpoints as it stores them (a gap or a bad \
signature is stored flagged, never as good), and purges recordings past their retention.\n\n\
Set up: `sluice-collector init --dir DIR --listen 0.0.0.0:7443`, then for each agent \
`sluice-collector token --dir DIR --agent NAME` and, on the agent's host, `sluice enroll \
--collector HOST:7443 --token TOKEN`. Run `sluice-collector serve --dir DIR`. Compliance reads \
the store with `sluice sessions|replay|export|verify --journal DIR/store`, also while the \
collector runs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a collector directory: TLS certificate and key, the store's encryption key.
    Init {
        /// The collector's directory (created, mode 700).
        #[arg(long)]
        dir: PathBuf,
        /// Address `serve` listens on by default.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: std::net::SocketAddr,
        /// DNS name in the certificate (agents pin its fingerprint, not the name).
        #[arg(long, default_value = "localhost")]
        name: String,
    },
    /// Print a one-time enrollment token for an agent: `<secret>.<certificate sha256>`.
    Token {
        #[arg(long)]
        dir: PathBuf,
        /// The name the agent is enrolled under.
        #[arg(long)]
        agent: String,
        /// How long the token is valid: 90s, 30m, 2h, 1d.
        #[arg(long, default_value = "1h", value_parser = sluice_journal::parse_duration)]
        ttl: u64,
    },
    /// List enrolled (and revoked) agents.
    Agents {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its key may no longer ship (what it shipped stays).
    Revoke {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        agent: String,
    },
    /// List the audit log: tokens issued, enrollments (and refusals), revocations, purges.
    Audit {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the collector certificate's SHA-256 fingerprint.
    Fingerprint {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Serve agents: enrollment and ingest over HTTPS; retention every hour.
    Serve {
        #[arg(long)]
        dir: PathBuf,
        /// Listen here instead of the address given to `init`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Purge recordings older than this many days (every hour and at start). Default: keep.
        #[arg(long)]
        retention_days: Option<u64>,
        /// Seconds between retention runs.
        #[arg(long, default_value_t = 3600, hide = true)]
        retention_interval_secs: u64,
        /// Retention in seconds instead of days (for tests).
        #[arg(long, hide = true, conflicts_with = "retention_days")]
        retention_secs: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut text = format!("sluice-collector: error: {e}");
            for cause in e.chain().skip(1) {
                text.push_str(&format!("\n  caused by: {cause}"));
            }
            eprintln!("{text}");
            ExitCode::FAILURE
        }
    }
}

/// The files of a collector directory.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
        }
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("collector.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("collector.key")
    }
    pub fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
    pub fn store_key(&self) -> PathBuf {
        self.dir.join("store.key")
    }
    pub fn settings(&self) -> PathBuf {
        self.dir.join("collector.toml")
    }

    /// The certificate's DER, or a clear error if `init` was not run.
    pub fn cert_der(&self) -> anyhow::Result<Vec<u8>> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let path = self.cert();
        if !path.exists() {
            anyhow::bail!(
                "{} has no collector certificate: run `sluice-collector init --dir {}` first",
                self.dir.display(),
                self.dir.display()
            );
        }
        let der = CertificateDer::from_pem_file(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(der.to_vec())
    }

    pub fn fingerprint(&self) -> anyhow::Result<String> {
        Ok(pki::fingerprint(&self.cert_der()?))
    }

    /// The listen address `init` recorded.
    pub fn listen(&self) -> anyhow::Result<std::net::SocketAddr> {
        let text = std::fs::read_to_string(self.settings())
            .with_context(|| format!("cannot read {}", self.settings().display()))?;
        text.lines()
            .find_map(|l| l.trim().strip_prefix("listen"))
            .and_then(|rest| rest.trim().strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
            .context("no `listen = \"ADDR\"` line")?
            .parse()
            .with_context(|| format!("bad listen address in {}", self.settings().display()))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    std::io::Write::write_all(&mut f, bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, listen, name } => {
            let l = Layout::new(&dir);
            if l.key().exists() {
                anyhow::bail!(
                    "{} is already a collector directory (fingerprint {}); nothing changed",
                    dir.display(),
                    l.fingerprint().unwrap_or_default()
                );
            }
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let (cert, key, der) = pki::generate_server_cert(&name)?;
            write_private(&l.key(), key.as_bytes())?;
            write_private(&l.cert(), cert.as_bytes())?;
            let mut data_key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut data_key)
                .map_err(|_| anyhow::anyhow!("no randomness for the store key"))?;
            write_private(&l.store_key(), &data_key)?;
            write_private(
                &l.settings(),
                format!(
                    "# Written by `sluice-collector init`; `serve --listen` overrides it.\nlisten = \"{listen}\"\n"
                )
                .as_bytes(),
            )?;
            println!("collector initialised in {}", dir.display());
            println!(
                "certificate fingerprint (SHA-256): {}",
                pki::fingerprint(&der)
            );
            println!(
                "next: `sluice-collector token --dir {} --agent NAME` for each agent, then `sluice-collector serve --dir {}`",
                dir.display(),
                dir.display()
            );
            Ok(())
        }
        Command::Token { dir, agent, ttl } => {
            let l = Layout::new(&dir);
            let fingerprint = l.fingerprint()?;
            let secret = Registry::open(&dir).issue_token(&agent, ttl, sluice_journal::now_ns())?;
            let token = api::format_token(&secret, &fingerprint);
            println!("{token}");
            eprintln!(
                "one-time token for agent {agent:?}, valid for {ttl} s. On the agent's host, as root:\n  sluice enroll --collector HOST:PORT --token {token}"
            );
            Ok(())
        }
        Command::Agents { dir, json } => {
            let agents = Registry::open(&dir).agents()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
                return Ok(());
            }
            println!("{:<20} {:<24} {:<24} KEY", "AGENT", "ENROLLED", "REVOKED");
            for a in agents {
                println!(
                    "{:<20} {:<24} {:<24} {}",
                    a.name,
                    format_ns(a.enrolled_ns),
                    a.revoked_ns.map(format_ns).unwrap_or_else(|| "-".into()),
                    a.public_key
                );
            }
            Ok(())
        }
        Command::Revoke { dir, agent } => {
            let a = Registry::open(&dir).revoke(&agent, sluice_journal::now_ns())?;
            println!(
                "agent {:?} revoked at {}: it can no longer ship",
                a.name,
                a.revoked_ns.map(format_ns).unwrap_or_default()
            );
            Ok(())
        }
        Command::Audit { dir, json } => {
            let log = Registry::open(&dir).audit_log()?;
            if json {
                for r in log {
                    println!("{}", serde_json::to_string(&r)?);
                }
                return Ok(());
            }
            for r in log {
                println!(
                    "{}  {:<14} {:<16} {}{}",
                    format_ns(r.ts_ns),
                    r.kind,
                    r.agent.as_deref().unwrap_or("-"),
                    r.detail,
                    if r.sessions.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", r.sessions.join(", "))
                    }
                );
            }
            Ok(())
        }
        Command::Fingerprint { dir } => {
            println!("{}", Layout::new(&dir).fingerprint()?);
            Ok(())
        }
        Command::Serve {
            dir,
            listen,
            retention_days,
            retention_interval_secs,
            retention_secs,
        } => serve::run(
            &Layout::new(&dir),
            listen,
            retention_secs.or(retention_days.map(|d| d.saturating_mul(86_400))),
            retention_interval_secs,
        ),
    }
}
