//! Statement-level policy: facts about each statement (`sqlparser`), decided by Cedar.
//!
//! - [`facts`]: what a SQL text does (kind, tables, WHERE, functions, COPY PROGRAM), cached by
//!   text.
//! - [`engine`]: the Cedar schema + policy set from a directory, validated, and decisions.
//! - [`parse`]: sqlparser, plus the statement shapes it refuses that sluice recognises whole
//!   (PostgreSQL's FETCH/MOVE forms), and MariaDB's `/*M! */` comments read as code.
//! - [`principal`]: who a connection belongs to, from the config's `[[identity]]` entries.
//! - [`tracking`]: for masking's strict mode, whether a statement returns masked columns under
//!   their own names and moves none anywhere else (tables, columns, views, variables, files,
//!   routines).
//!
//! The protocol relays (`proxy/postgres.rs`) call [`Policy::decide_sql`] for every statement
//! before it is forwarded; this module never touches a socket or the journal.
//!
//! [`Policy`] holds the engine behind a lock that is taken only to clone an `Arc`, so a reload
//! ([`Policy::reload`], on SIGHUP or a changed file) swaps the whole policy set at once for every
//! session, open ones included, and a set that fails validation leaves the old one in force.
//! The facts cache survives reloads: facts do not depend on policies.

pub mod engine;
pub mod facts;
pub mod parse;
pub mod principal;
pub mod tracking;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use engine::{Engine, PolicyError, PrincipalRef, SessionPolicy, Source, Verdict};
pub use facts::{Dialect, Facts, FactsCache, Kind};

use crate::config::Unparsed;

/// Statement texts whose facts are cached (shared by all connections).
pub const FACTS_CACHE_ENTRIES: usize = 4096;

/// The policy id a statement sluice cannot parse is denied by (when its target says "deny").
pub const UNPARSED_POLICY: &str = "sluice-unparsed";

/// The loaded engine and the facts cache, shared by every connection.
pub struct Policy {
    engine: RwLock<Arc<Engine>>,
    /// Facts of PostgreSQL statement texts.
    pub facts: FactsCache,
    /// Facts of MySQL/MariaDB statement texts (the same text may parse differently).
    pub mysql_facts: FactsCache,
    dir: PathBuf,
}

/// The decision for one statement text (possibly several statements).
#[derive(Debug, Clone)]
pub struct SqlDecision {
    pub verdict: Verdict,
    /// The action of the statement that decided (the first denied one, or the first).
    pub action: &'static str,
    /// The facts of every statement, one summary each, joined with "; ".
    pub facts: String,
    /// Some statement did not parse (and its target allows that).
    pub unparsed_allowed: bool,
}

impl SqlDecision {
    /// Allowed without asking anyone (no policies configured).
    pub fn allowed() -> SqlDecision {
        SqlDecision {
            verdict: Verdict {
                allowed: true,
                policies: Vec::new(),
                reason: String::new(),
                approval: None,
            },
            action: "other",
            facts: String::new(),
            unparsed_allowed: false,
        }
    }
}

impl Policy {
    pub fn load(dir: &Path) -> Result<Arc<Policy>, PolicyError> {
        Ok(Arc::new(Policy {
            engine: RwLock::new(Arc::new(Engine::load(dir)?)),
            facts: FactsCache::new(Dialect::Postgres, FACTS_CACHE_ENTRIES),
            mysql_facts: FactsCache::new(Dialect::MySql, FACTS_CACHE_ENTRIES),
            dir: dir.to_path_buf(),
        }))
    }

    /// The policy set in force now.
    pub fn engine(&self) -> Arc<Engine> {
        // A poisoned lock only means a panic while swapping an Arc: the value is whole.
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Loads the directory again; on success the new set is in force for every session and its
    /// size is returned. On failure nothing changes and the error says why.
    pub fn reload(&self) -> Result<usize, PolicyError> {
        let fresh = Engine::load(&self.dir)?;
        let n = fresh.len();
        *self.engine.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(n)
    }

    /// The policy directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Decides a statement text in `dialect`: denied when any statement in it is denied.
    /// `jit`: the principal holds an active just-in-time grant for the session's target.
    pub fn decide_sql(
        &self,
        session: &SessionPolicy,
        dialect: Dialect,
        sql: &str,
        unparsed: Unparsed,
        jit: bool,
    ) -> SqlDecision {
        let engine = self.engine();
        let facts = match dialect {
            Dialect::Postgres => self.facts.get(sql),
            Dialect::MySql => self.mysql_facts.get(sql),
        };
        let summary = facts
            .iter()
            .map(Facts::summary)
            .collect::<Vec<_>>()
            .join("; ");
        let mut first: Option<(Verdict, &'static str)> = None;
        // A statement an @approval policy holds: kept while the others are checked, because a
        // plain deny of any statement in the text must win (an approval would run them all).
        let mut held: Option<(Verdict, &'static str)> = None;
        let mut unparsed_allowed = false;
        for f in facts.iter() {
            if f.parse_error {
                if unparsed == Unparsed::Deny {
                    return SqlDecision {
                        verdict: Verdict {
                            allowed: false,
                            policies: vec![UNPARSED_POLICY.into()],
                            reason: "sluice cannot parse this statement, and this target denies what it cannot parse".into(),
                            approval: None,
                        },
                        action: f.kind.as_str(),
                        facts: summary,
                        unparsed_allowed: false,
                    };
                }
                unparsed_allowed = true;
            }
            let v = engine.decide(session, f, jit);
            if !v.allowed && v.approval.is_some() {
                if held.is_none() {
                    held = Some((v, f.kind.as_str()));
                }
                continue;
            }
            if !v.allowed {
                return SqlDecision {
                    verdict: v,
                    action: f.kind.as_str(),
                    facts: summary,
                    unparsed_allowed,
                };
            }
            if first.is_none() {
                first = Some((v, f.kind.as_str()));
            }
        }
        let (verdict, action) = held.or(first).unwrap_or_else(|| {
            (
                Verdict {
                    allowed: true,
                    policies: Vec::new(),
                    reason: String::new(),
                    approval: None,
                },
                "other",
            )
        });
        SqlDecision {
            verdict,
            action,
            facts: summary,
            unparsed_allowed,
        }
    }
}

/// A fingerprint of the policy directory's files (name, size, modification time), to notice a
/// change without reading them. None when the directory cannot be read.
pub fn dir_fingerprint(
    dir: &Path,
) -> Option<Vec<(std::ffi::OsString, u64, std::time::SystemTime)>> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.file_name(), m.len(), m.modified().ok()?))
        })
        .collect();
    out.sort();
    Some(out)
}

/// Per-statement cost of policy, as `sluice policy bench` measures it.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub iterations: usize,
    /// Facts from the cache (warm) + Cedar, µs per statement.
    pub cached_us: f64,
    /// Parsing every time + Cedar, µs per statement.
    pub uncached_us: f64,
    /// Cedar evaluation alone, µs per statement.
    pub cedar_us: f64,
}

/// The statement mix of the benchmark: OLTP reads and writes plus a few the policies deny.
pub const BENCH_MIX: &[&str] = &[
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213",
    "UPDATE pgbench_accounts SET abalance = abalance + -2113 WHERE aid = 48213",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48213, -2113, CURRENT_TIMESTAMP)",
    "select p.id, p.name, count(o.id) from people p left join orders o on o.person = p.id where p.id = $1 group by p.id, p.name",
    "BEGIN",
    "DELETE FROM people",
    "DROP TABLE people",
    "with d as (delete from orders where id < 10 returning *) select count(*) from d",
];

/// Runs `iterations` decisions over [`BENCH_MIX`] as a principal without groups, cached and
/// uncached.
pub fn bench(dir: &Path, iterations: usize) -> Result<BenchResult, PolicyError> {
    use std::time::Instant;
    let policy = Policy::load(dir)?;
    let engine = policy.engine();
    let session = engine.session(
        PrincipalRef {
            name: "bench",
            groups: &[],
        },
        "app-db",
        Source {
            uid: Some(1000),
            comm: "bench",
        },
    )?;
    let iterations = iterations.max(BENCH_MIX.len());
    let mut denied = 0usize;

    let start = Instant::now();
    for i in 0..iterations {
        let sql = BENCH_MIX[i % BENCH_MIX.len()];
        for f in facts::analyze(sql, Dialect::Postgres) {
            denied += usize::from(!engine.decide(&session, &f, false).allowed);
        }
    }
    let uncached = start.elapsed();

    let start = Instant::now();
    for i in 0..iterations {
        let sql = BENCH_MIX[i % BENCH_MIX.len()];
        denied += usize::from(
            !policy
                .decide_sql(&session, Dialect::Postgres, sql, Unparsed::Deny, false)
                .verdict
                .allowed,
        );
    }
    let cached = start.elapsed();

    let parsed: Vec<Facts> = BENCH_MIX
        .iter()
        .flat_map(|s| facts::analyze(s, Dialect::Postgres))
        .collect();
    let start = Instant::now();
    for i in 0..iterations {
        denied += usize::from(
            !engine
                .decide(&session, &parsed[i % parsed.len()], false)
                .allowed,
        );
    }
    let cedar = start.elapsed();
    std::hint::black_box(denied);

    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / iterations as f64;
    Ok(BenchResult {
        iterations,
        cached_us: per(cached),
        uncached_us: per(uncached),
        cedar_us: per(cedar),
    })
}
