//! Statement-level policy: facts about each statement (`sqlparser`), decided by Cedar.
//!
//! - [`facts`]: what a SQL text does (kind, tables, WHERE, functions, COPY PROGRAM), cached by
//!   text.
//! - [`engine`]: the Cedar schema + policy set from a directory, validated, and decisions.
//! - [`principal`]: who a connection belongs to, from the config's `[[identity]]` entries.
//!
//! The protocol relays (`proxy/postgres.rs`) call [`Policy::decide_sql`] for every statement
//! before it is forwarded; this module never touches a socket or the journal.

pub mod engine;
pub mod facts;
pub mod principal;

use std::path::Path;
use std::sync::Arc;

pub use engine::{Engine, PolicyError, PrincipalRef, SessionPolicy, Source, Verdict};
pub use facts::{Dialect, Facts, FactsCache, Kind};

use crate::config::Unparsed;

/// Statement texts whose facts are cached (shared by all connections).
pub const FACTS_CACHE_ENTRIES: usize = 4096;

/// The policy id a statement sluice cannot parse is denied by (when its target says "deny").
pub const UNPARSED_POLICY: &str = "sluice-unparsed";

/// The loaded engine and the facts cache, shared by every connection.
pub struct Policy {
    pub engine: Engine,
    pub facts: FactsCache,
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

impl Policy {
    pub fn load(dir: &Path) -> Result<Arc<Policy>, PolicyError> {
        Ok(Arc::new(Policy {
            engine: Engine::load(dir)?,
            facts: FactsCache::new(Dialect::Postgres, FACTS_CACHE_ENTRIES),
        }))
    }

    /// Decides a statement text: denied when any statement in it is denied.
    pub fn decide_sql(
        &self,
        session: &SessionPolicy,
        sql: &str,
        unparsed: Unparsed,
    ) -> SqlDecision {
        let facts = self.facts.get(sql);
        let summary = facts
            .iter()
            .map(Facts::summary)
            .collect::<Vec<_>>()
            .join("; ");
        let mut first: Option<(Verdict, &'static str)> = None;
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
            let v = self.engine.decide(session, f);
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
        let (verdict, action) = first.unwrap_or_else(|| {
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
    let session = policy.engine.session(
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
            denied += usize::from(!policy.engine.decide(&session, &f).allowed);
        }
    }
    let uncached = start.elapsed();

    let start = Instant::now();
    for i in 0..iterations {
        let sql = BENCH_MIX[i % BENCH_MIX.len()];
        denied += usize::from(
            !policy
                .decide_sql(&session, sql, Unparsed::Deny)
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
            !policy
                .engine
                .decide(&session, &parsed[i % parsed.len()])
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
