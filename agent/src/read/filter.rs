//! Which sessions a compliance question is about: `sluice sessions|export` filters.
//!
//! Filters combine with AND. The cheap ones (principal, target, time range, host, user) look
//! at the session's summary only; `--statement` and `--decision` decode the session's events,
//! and only for sessions the cheap filters kept. Nothing here writes or holds more than one
//! session's state at a time.
//!
//! Time range: a session matches when it overlaps `[since, until]` (it started at or before
//! `until` and ended at or after `since`, or is still open).

use serde_json::{Value, json};
use sluice_journal::{Body, Event, JournalError, RequestState, SessionSummary};

use super::{Decoder, rfc3339};
use crate::protocol::Item;

/// What `--decision` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DecisionKind {
    /// A statement refused: by policy, by an approver, or held and never decided.
    Denied,
    /// A held statement an approver let through.
    Approved,
    /// A statement held for approval (whatever became of it).
    Held,
    /// A statement policy allowed.
    Allowed,
}

impl DecisionKind {
    fn word(self) -> &'static str {
        match self {
            DecisionKind::Denied => "denied",
            DecisionKind::Approved => "approved",
            DecisionKind::Held => "held",
            DecisionKind::Allowed => "allowed",
        }
    }

    /// Does this event show a decision of this kind?
    fn seen_in(self, body: &Body) -> bool {
        match (self, body) {
            (DecisionKind::Denied, Body::Decision(d)) => !d.allowed,
            (DecisionKind::Allowed, Body::Decision(d)) => d.allowed,
            // A deferred statement did not run in the session that deferred it.
            (DecisionKind::Denied, Body::Review(r)) => matches!(
                r.state,
                RequestState::Denied { .. }
                    | RequestState::TimedOut { .. }
                    | RequestState::Deferred { .. }
            ),
            (DecisionKind::Approved, Body::Review(r)) => {
                matches!(
                    r.state,
                    RequestState::Approved { .. } | RequestState::Used { .. }
                )
            }
            (DecisionKind::Held, Body::Review(r)) => matches!(r.state, RequestState::Pending),
            _ => false,
        }
    }
}

/// The filters of `sluice sessions` and `sluice export`, as typed on the command line.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FilterArgs {
    /// Only sessions of this principal (the identity policy decided for; exact name).
    #[arg(long)]
    pub principal: Option<String>,
    /// Only sessions to this target (its `[[target]] name`).
    #[arg(long)]
    pub target: Option<String>,
    /// Only sessions active at or after this time: RFC 3339 (2026-11-21T08:00:00Z), a date
    /// (2026-11-21, UTC midnight), or an age (7d, 24h, 30m, 1h30m: that long ago).
    #[arg(long)]
    pub since: Option<String>,
    /// Only sessions active at or before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Only sessions that ran a statement containing this text (case-insensitive), e.g. a
    /// table name. Decodes the sessions' recordings: slower than the other filters.
    #[arg(long)]
    pub statement: Option<String>,
    /// Only sessions with a decision of this kind: denied (by policy, by an approver, or not
    /// decided in time), approved (a held statement let through), held (held for approval),
    /// allowed (a statement policy allowed). Needs a policy on the agent.
    #[arg(long, value_enum)]
    pub decision: Option<DecisionKind>,
    /// Only sessions from this source host: the client's address (IP, or IP:port), or the
    /// agent's name when reading a collector's store.
    #[arg(long)]
    pub host: Option<String>,
    /// Only sessions that logged in as this database user.
    #[arg(long)]
    pub user: Option<String>,
}

/// A parsed, ready-to-apply filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub principal: Option<String>,
    pub target: Option<String>,
    pub since_ns: Option<u64>,
    pub until_ns: Option<u64>,
    /// Lowercased.
    pub statement: Option<String>,
    pub decision: Option<DecisionKind>,
    pub host: Option<String>,
    pub user: Option<String>,
}

/// A filter the command line got wrong.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error(
        "--{flag} {text:?}: not a time; give RFC 3339 (2026-11-21T08:00:00Z), a date (2026-11-21) or an age (7d, 24h, 30m)"
    )]
    Time { flag: &'static str, text: String },
    #[error("--since {since} is after --until {until}: nothing can match")]
    Range { since: String, until: String },
}

impl FilterArgs {
    /// Parses the times against the clock now.
    pub fn parse(&self) -> Result<Filter, FilterError> {
        self.parse_at(jiff::Timestamp::now())
    }

    fn parse_at(&self, now: jiff::Timestamp) -> Result<Filter, FilterError> {
        let time =
            |flag: &'static str, text: &Option<String>| -> Result<Option<u64>, FilterError> {
                text.as_deref()
                    .map(|t| {
                        parse_time(t, now).ok_or_else(|| FilterError::Time {
                            flag,
                            text: t.to_string(),
                        })
                    })
                    .transpose()
            };
        let since_ns = time("since", &self.since)?;
        let until_ns = time("until", &self.until)?;
        if let (Some(s), Some(u)) = (since_ns, until_ns)
            && s > u
        {
            return Err(FilterError::Range {
                since: rfc3339(s),
                until: rfc3339(u),
            });
        }
        let text = |v: &Option<String>| v.as_ref().map(|s| s.trim().to_string());
        Ok(Filter {
            principal: text(&self.principal),
            target: text(&self.target),
            since_ns,
            until_ns,
            statement: self.statement.as_ref().map(|s| s.to_lowercase()),
            decision: self.decision,
            host: text(&self.host),
            user: text(&self.user),
        })
    }
}

/// RFC 3339, a civil date (UTC midnight), or an age before `now`; as ns since the epoch.
pub fn parse_time(text: &str, now: jiff::Timestamp) -> Option<u64> {
    let text = text.trim();
    let ts = if let Ok(t) = text.parse::<jiff::Timestamp>() {
        t
    } else if let Ok(d) = text.parse::<jiff::civil::Date>() {
        d.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp()
    } else {
        let age =
            sluice_journal::parse_duration(text.strip_suffix("ago").unwrap_or(text).trim()).ok()?;
        let secs = i64::try_from(age).ok()?;
        now.checked_sub(jiff::SignedDuration::from_secs(secs))
            .ok()?
    };
    u64::try_from(ts.as_nanosecond()).ok()
}

/// The host part of `ip:port`, `[v6]:port`, or the text itself.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            host
        }
        _ => addr,
    }
}

impl Filter {
    /// Does any filter need the session's events?
    pub fn needs_events(&self) -> bool {
        self.statement.is_some() || self.decision.is_some()
    }

    /// The cheap filters, on the summary (and the collector's agent name, when known).
    pub fn summary_matches(&self, s: &SessionSummary, agent: Option<&str>) -> bool {
        let principal = s.start.principal.as_ref().map(|p| p.name.as_str());
        if self
            .principal
            .as_deref()
            .is_some_and(|want| principal != Some(want))
        {
            return false;
        }
        if self
            .target
            .as_deref()
            .is_some_and(|want| s.start.target != want)
        {
            return false;
        }
        if self
            .user
            .as_deref()
            .is_some_and(|want| s.start.param("user") != Some(want))
        {
            return false;
        }
        if let Some(until) = self.until_ns
            && s.started_ns > until
        {
            return false;
        }
        if let (Some(since), Some(ended)) = (self.since_ns, s.ended_ns)
            && ended < since
        {
            return false;
        }
        if let Some(want) = self.host.as_deref() {
            let addr = s.start.client_addr.as_str();
            let hit = addr == want || host_of(addr) == host_of(want) || agent == Some(want);
            if !hit {
                return false;
            }
        }
        true
    }

    /// The event filters (`--statement`, `--decision`), reading events until both are met.
    pub fn events_match(
        &self,
        summary: &SessionSummary,
        events: impl Iterator<Item = Result<Event, JournalError>>,
    ) -> Result<bool, JournalError> {
        if !self.needs_events() {
            return Ok(true);
        }
        let mut decoder = self
            .statement
            .as_ref()
            .map(|_| Decoder::for_protocol(&summary.start.protocol));
        let mut statement_seen = self.statement.is_none();
        let mut decision_seen = self.decision.is_none();
        for event in events {
            let event = event?;
            if !decision_seen && let Some(kind) = self.decision {
                decision_seen = kind.seen_in(&event.body);
            }
            if !statement_seen
                && let (Some(want), Some(decoder)) = (&self.statement, decoder.as_mut())
            {
                // Every event goes through the decoder (it keeps protocol state across them).
                statement_seen = decoder.items(&event).iter().any(|item| match item {
                    Item::Statement { sql, .. } => sql.to_lowercase().contains(want.as_str()),
                    _ => false,
                });
            }
            if statement_seen && decision_seen {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The filter as JSON, for a verification bundle's header.
    pub fn to_json(&self) -> Value {
        json!({
            "principal": self.principal,
            "target": self.target,
            "since": self.since_ns.map(rfc3339),
            "until": self.until_ns.map(rfc3339),
            "statement": self.statement,
            "decision": self.decision.map(DecisionKind::word),
            "host": self.host,
            "user": self.user,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sluice_journal::{Decision, Principal, Review, SessionId, SessionStart};

    fn summary(
        principal: &str,
        user: &str,
        started_s: u64,
        ended_s: Option<u64>,
    ) -> SessionSummary {
        SessionSummary {
            id: SessionId::new(),
            start: SessionStart {
                target: "app-db".into(),
                protocol: "postgres".into(),
                orig_dst: "127.0.0.1:5432".into(),
                client_addr: "10.0.0.7:40000".into(),
                process: None,
                params: vec![("user".into(), user.into())],
                principal: Some(Principal {
                    name: principal.into(),
                    groups: vec![],
                }),
            },
            started_ns: started_s * 1_000_000_000,
            ended_ns: ended_s.map(|e| e * 1_000_000_000),
            end_reason: None,
            statements: 0,
            client_bytes: 0,
            server_bytes: 0,
            events: 0,
        }
    }

    fn event(seq: u64, body: Body) -> Result<Event, JournalError> {
        Ok(Event {
            session: SessionId::new(),
            seq,
            ts_ns: seq,
            body,
        })
    }

    fn query(sql: &str) -> Body {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        Body::Client(Bytes::from(m))
    }

    fn decision(allowed: bool) -> Body {
        Body::Decision(Decision {
            sql: "delete from people".into(),
            action: "delete".into(),
            facts: String::new(),
            allowed,
            policies: vec![],
            reason: String::new(),
        })
    }

    fn parse(args: FilterArgs) -> Filter {
        args.parse_at("2026-11-28T12:00:00Z".parse().unwrap())
            .unwrap()
    }

    #[test]
    fn times_parse_as_rfc3339_dates_and_ages() {
        let now: jiff::Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let at = |t: &str| parse_time(t, now).map(rfc3339);
        assert_eq!(
            at("2026-11-21T08:00:00Z").as_deref(),
            Some("2026-11-21T08:00:00.000000000Z")
        );
        assert_eq!(
            at("2026-11-21T09:00:00+01:00").as_deref(),
            Some("2026-11-21T08:00:00.000000000Z")
        );
        assert_eq!(
            at("2026-11-21").as_deref(),
            Some("2026-11-21T00:00:00.000000000Z")
        );
        assert_eq!(at("7d").as_deref(), Some("2026-11-21T12:00:00.000000000Z"));
        assert_eq!(at("24h").as_deref(), Some("2026-11-27T12:00:00.000000000Z"));
        assert_eq!(
            at("1h30m ago").as_deref(),
            Some("2026-11-28T10:30:00.000000000Z")
        );
        for bad in ["", "yesterday", "7", "7x", "d"] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_bad_time_or_an_empty_range_is_refused_with_the_flag_named() {
        let now: jiff::Timestamp = "2026-11-28T12:00:00Z".parse().unwrap();
        let e = FilterArgs {
            since: Some("last tuesday".into()),
            ..FilterArgs::default()
        }
        .parse_at(now)
        .unwrap_err();
        assert!(e.to_string().starts_with("--since \"last tuesday\""), "{e}");
        let e = FilterArgs {
            since: Some("1d".into()),
            until: Some("2d".into()),
            ..FilterArgs::default()
        }
        .parse_at(now)
        .unwrap_err();
        assert!(matches!(e, FilterError::Range { .. }), "{e}");
    }

    #[test]
    fn cheap_filters_combine_with_and() {
        let s = summary("ada", "app", 1000, Some(2000));
        let f = |args: FilterArgs| parse(args).summary_matches(&s, Some("bastion-1"));
        assert!(f(FilterArgs::default()));
        assert!(f(FilterArgs {
            principal: Some("ada".into()),
            user: Some("app".into()),
            target: Some("app-db".into()),
            ..FilterArgs::default()
        }));
        assert!(!f(FilterArgs {
            principal: Some("ada".into()),
            user: Some("other".into()),
            ..FilterArgs::default()
        }));
        assert!(!f(FilterArgs {
            principal: Some("grace".into()),
            ..FilterArgs::default()
        }));
        assert!(!f(FilterArgs {
            target: Some("prod-db".into()),
            ..FilterArgs::default()
        }));
        for host in ["10.0.0.7", "10.0.0.7:40000", "bastion-1"] {
            assert!(
                f(FilterArgs {
                    host: Some(host.into()),
                    ..FilterArgs::default()
                }),
                "{host}"
            );
        }
        assert!(!f(FilterArgs {
            host: Some("10.0.0.8".into()),
            ..FilterArgs::default()
        }));
    }

    #[test]
    fn a_session_matches_a_time_range_it_overlaps() {
        let at = |s: u64| Some(rfc3339(s * 1_000_000_000));
        let range = |since: u64, until: u64| {
            parse(FilterArgs {
                since: at(since),
                until: at(until),
                ..FilterArgs::default()
            })
        };
        let sealed = summary("ada", "app", 1000, Some(2000));
        let open = summary("ada", "app", 1000, None);
        assert!(range(500, 1000).summary_matches(&sealed, None));
        assert!(range(1500, 1600).summary_matches(&sealed, None));
        assert!(range(2000, 3000).summary_matches(&sealed, None));
        assert!(!range(2001, 3000).summary_matches(&sealed, None));
        assert!(!range(100, 999).summary_matches(&sealed, None));
        assert!(range(5000, 6000).summary_matches(&open, None));
    }

    #[test]
    fn statement_and_decision_filters_read_the_events() {
        let s = summary("ada", "app", 1, None);
        let events = || {
            vec![
                event(0, query("SELECT * FROM People")),
                event(1, decision(false)),
                event(
                    2,
                    Body::Review(Review {
                        request: "abcd0123".into(),
                        state: RequestState::Pending,
                    }),
                ),
            ]
            .into_iter()
        };
        let matches = |args: FilterArgs| parse(args).events_match(&s, events()).unwrap();
        assert!(matches(FilterArgs {
            statement: Some("from people".into()),
            ..FilterArgs::default()
        }));
        assert!(!matches(FilterArgs {
            statement: Some("orders".into()),
            ..FilterArgs::default()
        }));
        assert!(matches(FilterArgs {
            decision: Some(DecisionKind::Denied),
            statement: Some("PEOPLE".into()),
            ..FilterArgs::default()
        }));
        assert!(matches(FilterArgs {
            decision: Some(DecisionKind::Held),
            ..FilterArgs::default()
        }));
        assert!(!matches(FilterArgs {
            decision: Some(DecisionKind::Approved),
            ..FilterArgs::default()
        }));
        assert!(!matches(FilterArgs {
            decision: Some(DecisionKind::Allowed),
            ..FilterArgs::default()
        }));
    }
}
