//! The masking engine for one result set: which columns are masked and how, applied value by
//! value, with counts for the journal.
//!
//! Owns [`MaskPlan`], built once per result set (PostgreSQL RowDescription, MySQL column
//! definitions, a COPY's columns) from the column descriptors and the principal's groups (or
//! once per session for text outside rows, [`MaskPlan::for_text`]: error messages, notices,
//! notification payloads, with a column rule set per message where it names its table), and
//! [`MaskPlan::apply`], which turns one value into an [`Outcome`]. Never parses protocol
//! messages ([`pgrow`](super::pgrow) does), never touches a socket, never logs a value, and
//! keeps per-row work allocation-free when nothing is masked (scratch buffers live in the
//! plan).
//!
//! Decisions, per column:
//! - A column rule (by origin or name) masks the whole value with the principal's strategy;
//!   content detectors then do not run on it. A rule whose strategy for the principal is
//!   `clear` (an exempting override) leaves the column as it is, unscanned; a detector whose
//!   strategy is `clear` is off for that principal.
//! - Otherwise the target's detectors scan the value and only the findings are replaced.
//!   Overlapping findings are merged and get the strictest of their strategies; a `null`
//!   strategy nulls the whole value.
//! - Types: the replacement must stay a valid value of the column's type, or the column
//!   becomes NULL. The engine sees types as a protocol-neutral [`ValueKind`]; the PostgreSQL
//!   mapping (below, by type name) is [`pgrow::value_kind`](super::pgrow::value_kind), the
//!   MySQL one is in `proxy/mysql/masking.rs`. Text-like types (text, varchar, bpchar, name, xml, unknown, and unknown
//!   OIDs such as composites, enums, domains in text format) take text masks; json/jsonb get
//!   a JSON string (`"****"`) for a whole value, and findings outside JSON strings (a card
//!   number as a JSON number) become JSON strings too, so documents stay valid JSON; binary
//!   jsonb keeps its version byte. Arrays of text get in-place replacements but a whole-value
//!   mask is NULL. Numbers, dates, booleans, uuids and other non-text scalars are never
//!   scanned (so ids are not mistaken for card numbers) and a column rule on them gives NULL;
//!   inet/cidr text values are scanned and NULL when an address is found. Binary values of
//!   non-text types are scanned as raw bytes (text fields of a binary row or array appear
//!   verbatim) and nulled when anything is found: never corrupted.
//!
//! What is recorded: [`MaskPlan::report`] gives, per column, which rule or detector fired,
//! the strategy actually applied, whether it is the strictest that rule allows, and how many
//! values were masked. The journal records what the client received; [`MaskPlan::strictest`]
//! says whether that is the strictest form of every rule involved, and a plan built for
//! [`Audience::Strictest`] produces exactly that form.
use std::sync::Arc;

use super::detect::{DetectorId, Finding};
use super::rules::{Audience, ColumnRule, DEFAULT_MASK, Origin, RuleSet, StrategyId};
use super::strategy::{Applied, Strategy, StrategyKind};

/// What a column's values are, in the engine's terms: the shared vocabulary between the
/// protocols and the engine. Each protocol maps its own types onto it (PostgreSQL: the type
/// OID and format, [`pgrow::value_kind`](super::pgrow::value_kind); MySQL: the column
/// definition, in the proxy's MySQL masking), so the engine knows no protocol's types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueKind {
    /// Text, possibly holding a JSON document: findings are replaced in place; a whole-value
    /// mask is text (a JSON string when the value looks like a JSON document).
    #[default]
    Text,
    /// A JSON document: findings outside strings become strings; a whole-value mask is a
    /// JSON string.
    Json,
    /// A text array literal (`{a,b}`): findings are replaced in place; a whole-value mask,
    /// which would not be an array, is NULL.
    TextArray,
    /// PostgreSQL's binary jsonb: a version byte (1), then JSON text.
    JsonbBinary,
    /// Bytes that cannot be rewritten in place (binary composites and unknown binary types,
    /// network addresses): scanned as raw bytes; NULL when anything is found or a column
    /// rule applies.
    ScanThenNull,
    /// A non-text scalar (numbers, decimals, dates and times, booleans, uuids, bytes, bits):
    /// never scanned (ids are not card numbers); NULL when a column rule applies.
    Scalar,
}

/// One result column, as the proxy knows it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ColumnDesc<'a> {
    pub origin: Origin<'a>,
    pub kind: ValueKind,
}

/// What becomes of one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Replaced(Vec<u8>),
    Null,
}

/// [`Outcome`] without the bytes (they were appended to a caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    Replaced,
    Null,
}

/// Which rule fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A `[[column]]` rule, by name.
    Column(String),
    /// A `[[detector]]`, by name.
    Detector(String),
}

/// Counts for the journal: `values` values of result column `column` were masked by `source`
/// with `strategy` (the strategy actually applied: `null` where a type could not carry the
/// configured mask).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    pub column: usize,
    pub column_name: String,
    pub source: Source,
    pub strategy: StrategyKind,
    /// Whether the rule's strategy for this principal is the strictest the rule allows.
    pub strictest: bool,
    pub values: u64,
}

/// Whether a text value is JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Json {
    /// Never (arrays of text: `{a,b}` is not JSON).
    No,
    /// If it looks like a JSON document (text columns carrying JSON).
    Maybe,
    /// Always (json, jsonb).
    Yes,
}

/// How a column's values can be masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handling {
    /// Text: findings replaced in place; a whole-value mask is text (a JSON string if JSON)
    /// or, if not `whole_ok`, NULL.
    Text { json: Json, whole_ok: bool },
    /// Binary jsonb: a version byte (1) then JSON text.
    JsonbBinary,
    /// Cannot be rewritten: scanned as raw bytes, NULL if anything is found or a rule applies.
    ScanThenNull,
    /// A non-text scalar: never scanned; NULL if a rule applies.
    Opaque,
    /// A non-text scalar in COPY text: never scanned; a rule's mask is written as text.
    OpaqueText,
}

fn handling(kind: ValueKind) -> Handling {
    match kind {
        ValueKind::Text => Handling::Text {
            json: Json::Maybe,
            whole_ok: true,
        },
        ValueKind::Json => Handling::Text {
            json: Json::Yes,
            whole_ok: true,
        },
        ValueKind::TextArray => Handling::Text {
            json: Json::No,
            whole_ok: false,
        },
        ValueKind::JsonbBinary => Handling::JsonbBinary,
        ValueKind::ScanThenNull => Handling::ScanThenNull,
        ValueKind::Scalar => Handling::Opaque,
    }
}

/// The handling of the same column in COPY text format, where the client does not parse
/// values by type: every mask can be written as text.
fn copy_handling(h: Handling) -> Handling {
    match h {
        Handling::Text { json, .. } => Handling::Text {
            json,
            whole_ok: true,
        },
        Handling::JsonbBinary => Handling::Text {
            json: Json::Yes,
            whole_ok: true,
        },
        Handling::ScanThenNull => Handling::Text {
            json: Json::Maybe,
            whole_ok: true,
        },
        Handling::Opaque | Handling::OpaqueText => Handling::OpaqueText,
    }
}

#[derive(Debug, Clone)]
struct ColumnPlan {
    name: String,
    handling: Handling,
    /// The column rule: its name, the strategy for this audience, and whether that is the
    /// rule's strictest.
    rule: Option<(String, StrategyId, bool)>,
    /// The column rule's strategy for this audience is `clear`: the values pass as they are,
    /// unscanned.
    exempt: bool,
}

/// What a firing counts, internally (no allocation to find one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Column,
    Detector(DetectorId),
}

/// How one result set is masked for one principal, with its counters.
#[derive(Debug, Clone)]
pub struct MaskPlan {
    rules: Arc<RuleSet>,
    columns: Vec<ColumnPlan>,
    /// Detectors enabled for the target.
    enabled: Vec<DetectorId>,
    /// Per detector id: its strategy for this principal and whether it is the strictest.
    detector_strategy: Vec<Option<(StrategyId, bool)>>,
    firings: Vec<(Key, Firing)>,
    strictest: bool,
    // Scratch, reused from value to value.
    findings: Vec<Finding>,
    seen: Vec<u64>,
    generation: u64,
    pub(super) scratch: Vec<u8>,
}

const UNPLANNED: ColumnPlan = ColumnPlan {
    name: String::new(),
    handling: Handling::Text {
        json: Json::Maybe,
        whole_ok: false,
    },
    rule: None,
    exempt: false,
};

impl MaskPlan {
    /// The plan for a result set of `columns` on `target`, as seen by `audience`.
    pub fn new(
        rules: Arc<RuleSet>,
        target: &str,
        audience: Audience<'_>,
        columns: &[ColumnDesc<'_>],
    ) -> Self {
        let mut strictest = true;
        let plans = columns
            .iter()
            .map(|c| {
                let rule = rules.column_rule(target, &c.origin).map(|r| {
                    let (id, s) = rules.resolve(r.choice(), audience);
                    strictest &= s;
                    (r.name.clone(), id, s)
                });
                // An exempting override: no rule, and no detector either.
                let exempt = rule
                    .as_ref()
                    .is_some_and(|&(_, id, _)| rules.strategy(id).kind() == StrategyKind::Clear);
                ColumnPlan {
                    name: c.origin.name.to_string(),
                    handling: handling(c.kind),
                    rule: rule.filter(|_| !exempt),
                    exempt,
                }
            })
            .collect();
        let mut enabled = Vec::new();
        let mut detector_strategy = vec![None; rules.detectors().len()];
        for (id, r) in rules.detector_rules(target) {
            let (sid, s) = rules.resolve(r.choice(), audience);
            strictest &= s;
            if rules.strategy(sid).kind() == StrategyKind::Clear {
                // Exempt from this detector.
                continue;
            }
            enabled.push(id);
            if let Some(slot) = detector_strategy.get_mut(usize::from(id.0)) {
                *slot = Some((sid, s));
            }
        }
        let seen = vec![0; rules.detectors().len()];
        Self {
            rules,
            columns: plans,
            enabled,
            detector_strategy,
            firings: Vec::new(),
            strictest,
            findings: Vec::new(),
            seen,
            generation: 0,
            scratch: Vec::new(),
        }
    }

    /// A plan for text a server sends outside result rows (error and notice fields,
    /// notification payloads, parameter values, MySQL error messages and OK info): one
    /// "column" per kind of text, named by `names` in the journal's report. Content detectors
    /// replace their findings in place; no column rule applies until
    /// [`set_rule`](Self::set_rule) gives one.
    pub fn for_text(
        rules: Arc<RuleSet>,
        target: &str,
        audience: Audience<'_>,
        names: &[&str],
    ) -> Self {
        let mut plan = Self::new(rules, target, audience, &[]);
        plan.columns = names
            .iter()
            .map(|n| ColumnPlan {
                name: (*n).to_string(),
                handling: Handling::Text {
                    json: Json::Maybe,
                    whole_ok: true,
                },
                rule: None,
                exempt: false,
            })
            .collect();
        plan
    }

    /// Makes column rule `rule` mask column `col` whole with its strategy for `audience` (an
    /// exempting `clear` leaves it unscanned), or, with `None`, leaves it to the detectors
    /// again: for text whose origin is known only per message (an error naming its table).
    pub fn set_rule(&mut self, col: usize, rule: Option<&ColumnRule>, audience: Audience<'_>) {
        let rule = rule.map(|r| {
            let (id, s) = self.rules.resolve(r.choice(), audience);
            (r.name.clone(), id, s)
        });
        let exempt = rule
            .as_ref()
            .is_some_and(|&(_, id, _)| self.rules.strategy(id).kind() == StrategyKind::Clear);
        if let Some(c) = self.columns.get_mut(col) {
            c.rule = rule.filter(|_| !exempt);
            c.exempt = exempt;
        }
    }

    /// [`apply_into`](Self::apply_into) for text that cannot be NULL (a message field): what
    /// a `null` strategy would null becomes [`DEFAULT_MASK`]. True when a replacement was
    /// appended to `out`.
    pub fn apply_message_into(&mut self, col: usize, value: &[u8], out: &mut Vec<u8>) -> bool {
        let mark = out.len();
        match self.apply_into(col, value, out) {
            Change::Unchanged => false,
            Change::Replaced => true,
            Change::Null => {
                out.truncate(mark);
                out.extend_from_slice(DEFAULT_MASK.as_bytes());
                true
            }
        }
    }

    pub fn column_count(&self) -> usize {
        self.columns.len()
    }

    /// Whether this plan can change anything; if not, the proxy may skip rewriting.
    pub fn is_active(&self) -> bool {
        !self.enabled.is_empty() || self.columns.iter().any(|c| c.rule.is_some())
    }

    /// The column rule masking column `col`, by name.
    pub fn column_rule(&self, col: usize) -> Option<&str> {
        self.columns
            .get(col)
            .and_then(|c| c.rule.as_ref())
            .map(|(name, _, _)| name.as_str())
    }

    /// Whether every rule involved gives this audience its strictest strategy, i.e. what the
    /// client receives (and the journal records) is the strictest form.
    pub fn strictest(&self) -> bool {
        self.strictest
    }

    /// Firings with at least one masked value since the plan was built or last reset.
    pub fn report(&self) -> Vec<Firing> {
        self.firings
            .iter()
            .filter(|(_, f)| f.values > 0)
            .map(|(_, f)| f.clone())
            .collect()
    }

    /// What the journal records of [`MaskPlan::report`] (both protocols record the same).
    pub fn journal_report(&self) -> sluice_journal::MaskReport {
        sluice_journal::MaskReport {
            fired: self
                .report()
                .into_iter()
                .map(|f| sluice_journal::MaskFiring {
                    column: f.column_name,
                    rule: match f.source {
                        Source::Column(r) => format!("column:{r}"),
                        Source::Detector(d) => format!("detector:{d}"),
                    },
                    strategy: format!("{:?}", f.strategy).to_lowercase(),
                    values: f.values,
                })
                .collect(),
        }
    }

    /// Total values masked since the plan was built or last reset.
    pub fn masked_values(&self) -> u64 {
        self.firings.iter().map(|(_, f)| f.values).sum()
    }

    /// Zeroes the counters (e.g. at the end of each response).
    pub fn reset_counts(&mut self) {
        self.firings.iter_mut().for_each(|(_, f)| f.values = 0);
    }

    /// Masks one value of column `col` in the column's wire format. A column beyond the plan
    /// is scanned as text and nulled where a finding cannot be replaced.
    pub fn apply(&mut self, col: usize, value: &[u8]) -> Outcome {
        let mut out = Vec::new();
        into_outcome(self.apply_into(col, value, &mut out), out)
    }

    /// Masks one value of column `col` known to be text whatever the column's type (a field of
    /// a COPY text row, already unescaped).
    pub fn apply_text(&mut self, col: usize, value: &[u8]) -> Outcome {
        let mut out = Vec::new();
        into_outcome(self.apply_text_into(col, value, &mut out), out)
    }

    /// [`apply`](Self::apply), appending a replacement to `out`.
    pub fn apply_into(&mut self, col: usize, value: &[u8], out: &mut Vec<u8>) -> Change {
        let h = self.columns.get(col).unwrap_or(&UNPLANNED).handling;
        self.apply_as(col, h, value, out)
    }

    /// [`apply_text`](Self::apply_text), appending a replacement to `out`.
    pub fn apply_text_into(&mut self, col: usize, value: &[u8], out: &mut Vec<u8>) -> Change {
        let h = copy_handling(self.columns.get(col).unwrap_or(&UNPLANNED).handling);
        self.apply_as(col, h, value, out)
    }

    fn apply_as(&mut self, col: usize, h: Handling, value: &[u8], out: &mut Vec<u8>) -> Change {
        if self.columns.get(col).is_some_and(|c| c.exempt) {
            return Change::Unchanged;
        }
        let rule = self
            .columns
            .get(col)
            .and_then(|c| c.rule.as_ref())
            .map(|&(_, id, strictest)| (id, strictest));
        match h {
            Handling::Text { json, whole_ok } => match rule {
                Some(r) => self.whole_by_rule(col, r, value, json, whole_ok, out),
                None => self.content(col, value, json, whole_ok, out),
            },
            Handling::JsonbBinary => {
                if value.first() != Some(&1) {
                    return self.apply_as(col, Handling::ScanThenNull, value, out);
                }
                let mark = out.len();
                out.push(1);
                let change = self.apply_as(
                    col,
                    Handling::Text {
                        json: Json::Yes,
                        whole_ok: true,
                    },
                    &value[1..],
                    out,
                );
                if change != Change::Replaced {
                    out.truncate(mark);
                }
                change
            }
            Handling::ScanThenNull => match rule {
                Some((_, s)) => {
                    self.count(col, Key::Column, StrategyKind::Null, s);
                    Change::Null
                }
                None => self.scan_then_null(col, value),
            },
            Handling::Opaque => match rule {
                Some((_, s)) => {
                    self.count(col, Key::Column, StrategyKind::Null, s);
                    Change::Null
                }
                None => Change::Unchanged,
            },
            Handling::OpaqueText => match rule {
                Some(r) => self.whole_by_rule(col, r, value, Json::No, true, out),
                None => Change::Unchanged,
            },
        }
    }

    fn whole_by_rule(
        &mut self,
        col: usize,
        (id, strictest): (StrategyId, bool),
        value: &[u8],
        json: Json,
        whole_ok: bool,
        out: &mut Vec<u8>,
    ) -> Change {
        let change = whole(self.rules.strategy(id), value, json, whole_ok, out);
        let kind = match change {
            Change::Null => StrategyKind::Null,
            _ => self.rules.strategy(id).kind(),
        };
        self.count(col, Key::Column, kind, strictest);
        change
    }

    fn scan(&mut self, value: &[u8]) -> Vec<Finding> {
        let mut findings = std::mem::take(&mut self.findings);
        findings.clear();
        self.rules
            .detectors()
            .scan(value, &self.enabled, &mut findings);
        findings
    }

    fn scan_then_null(&mut self, col: usize, value: &[u8]) -> Change {
        if self.enabled.is_empty() {
            return Change::Unchanged;
        }
        let findings = self.scan(value);
        let change = if findings.is_empty() {
            Change::Unchanged
        } else {
            self.credit(col, &findings, |_| StrategyKind::Null);
            Change::Null
        };
        self.findings = findings;
        change
    }

    fn content(
        &mut self,
        col: usize,
        value: &[u8],
        json: Json,
        whole_ok: bool,
        out: &mut Vec<u8>,
    ) -> Change {
        if self.enabled.is_empty() {
            return Change::Unchanged;
        }
        let findings = self.scan(value);
        let change = if findings.is_empty() {
            Change::Unchanged
        } else {
            self.replace(col, value, &findings, json, whole_ok, out)
        };
        self.findings = findings;
        change
    }

    fn strategy_of(&self, f: &Finding) -> StrategyId {
        self.detector_strategy
            .get(usize::from(f.detector.0))
            .copied()
            .flatten()
            .map_or(StrategyId(usize::MAX), |(id, _)| id)
    }

    /// Replaces `findings` (sorted by start) in `value`.
    fn replace(
        &mut self,
        col: usize,
        value: &[u8],
        findings: &[Finding],
        json: Json,
        whole_ok: bool,
        out: &mut Vec<u8>,
    ) -> Change {
        let rules = Arc::clone(&self.rules);
        let kind_of = |id: StrategyId| rules.strategy(id).kind();
        let spans = || merge(findings, |f| self.strategy_of(f), kind_of);

        // A null strategy, or a finding that cannot be replaced in place (a custom regex
        // matched structural characters), masks the whole value with the strictest strategy.
        let mut strictest: Option<StrategyId> = None;
        let mut in_place = true;
        for span in spans() {
            if strictest.is_none_or(|s| kind_of(span.strategy) > kind_of(s)) {
                strictest = Some(span.strategy);
            }
            let unsafe_byte = value[span.start..span.end]
                .iter()
                .any(|&b| b < 0x20 || matches!(b, b'"' | b'\\' | b',' | b'(' | b')' | b'{' | b'}'));
            in_place &= !unsafe_byte && kind_of(span.strategy) != StrategyKind::Null;
        }
        let Some(strictest) = strictest else {
            return Change::Unchanged;
        };
        if !in_place {
            let change = whole(rules.strategy(strictest), value, json, whole_ok, out);
            let kind = match change {
                Change::Null => StrategyKind::Null,
                _ => kind_of(strictest),
            };
            self.credit(col, findings, |_| kind);
            return change;
        }

        let json_ctx = json == Json::Yes || (json == Json::Maybe && looks_like_json(value));
        let mut walker = JsonWalker::default();
        let mut pos = 0;
        let mut applied: Vec<(DetectorId, StrategyKind)> = Vec::new();
        for span in spans() {
            let (mut s, mut e) = (span.start.max(pos), span.end);
            let mut quote = false;
            if json_ctx {
                let state = walker.advance(value, s);
                if state.in_string {
                    if state.escaped {
                        // The detector swallowed the letter of an escape (`\nfoo@x.io`).
                        s += if value.get(s) == Some(&b'u') { 5 } else { 1 };
                    }
                } else {
                    // A finding outside strings is a number (or part of one).
                    let is_num =
                        |b: u8| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E');
                    while s > pos && is_num(value[s - 1]) {
                        s -= 1;
                    }
                    while e < value.len() && is_num(value[e]) {
                        e += 1;
                    }
                    quote = true;
                }
            }
            let kind = kind_of(span.strategy);
            applied.extend(
                findings[span.from..span.to]
                    .iter()
                    .map(|f| (f.detector, kind)),
            );
            if s >= e {
                // Already covered by the previous replacement (a JSON number it extended to).
                continue;
            }
            out.extend_from_slice(&value[pos..s]);
            if quote {
                out.push(b'"');
            }
            rules.strategy(span.strategy).apply(&value[s..e], out);
            if quote {
                out.push(b'"');
            }
            pos = e;
        }
        out.extend_from_slice(&value[pos..]);
        let lookup = |d: DetectorId| {
            applied
                .iter()
                .find(|(id, _)| *id == d)
                .map_or(StrategyKind::Null, |&(_, k)| k)
        };
        self.credit(col, findings, lookup);
        Change::Replaced
    }

    /// Counts one masked value per distinct detector among `findings`.
    fn credit(
        &mut self,
        col: usize,
        findings: &[Finding],
        kind: impl Fn(DetectorId) -> StrategyKind,
    ) {
        self.generation += 1;
        for f in findings {
            let i = usize::from(f.detector.0);
            match self.seen.get_mut(i) {
                Some(g) if *g == self.generation => continue,
                Some(g) => *g = self.generation,
                None => {}
            }
            let strictest = self
                .detector_strategy
                .get(i)
                .copied()
                .flatten()
                .is_some_and(|(_, s)| s);
            self.count(col, Key::Detector(f.detector), kind(f.detector), strictest);
        }
    }

    /// One more value of column `col` masked by `key` with `strategy`.
    fn count(&mut self, col: usize, key: Key, strategy: StrategyKind, strictest: bool) {
        if let Some((_, f)) = self
            .firings
            .iter_mut()
            .find(|(k, f)| *k == key && f.column == col && f.strategy == strategy)
        {
            f.values += 1;
            return;
        }
        let plan = self.columns.get(col);
        let source = match key {
            Key::Column => Source::Column(
                plan.and_then(|c| c.rule.as_ref())
                    .map_or_else(String::new, |(name, _, _)| name.clone()),
            ),
            Key::Detector(id) => Source::Detector(self.rules.detectors().name(id).to_string()),
        };
        let firing = Firing {
            column: col,
            column_name: plan.map_or_else(String::new, |c| c.name.clone()),
            source,
            strategy,
            strictest,
            values: 1,
        };
        self.firings.push((key, firing));
    }
}

fn into_outcome(change: Change, out: Vec<u8>) -> Outcome {
    match change {
        Change::Unchanged => Outcome::Unchanged,
        Change::Replaced => Outcome::Replaced(out),
        Change::Null => Outcome::Null,
    }
}

/// A whole value masked with `strategy`: as text, as a JSON string when `json`, or NULL when
/// the type cannot carry text (`!whole_ok`).
fn whole(
    strategy: &Strategy,
    value: &[u8],
    json: Json,
    whole_ok: bool,
    out: &mut Vec<u8>,
) -> Change {
    if !whole_ok || strategy.kind() == StrategyKind::Null {
        return Change::Null;
    }
    if json != Json::Yes {
        return match strategy.apply(value, out) {
            Applied::Replaced => Change::Replaced,
            Applied::Null => Change::Null,
        };
    }
    let mark = out.len();
    out.push(b'"');
    if strategy.apply(value, out) == Applied::Null {
        out.truncate(mark);
        return Change::Null;
    }
    // Partial masks keep the original's punctuation: nothing may end the string early.
    for b in &mut out[mark + 1..] {
        if *b < 0x20 || *b == b'"' || *b == b'\\' {
            *b = b'*';
        }
    }
    out.push(b'"');
    Change::Replaced
}

/// Whether a text value is probably a JSON document: `{...}` or `[...]` after trimming.
fn looks_like_json(v: &[u8]) -> bool {
    let t = v.trim_ascii();
    matches!(
        (t.first(), t.last()),
        (Some(b'{'), Some(b'}')) | (Some(b'['), Some(b']'))
    )
}

/// Lexical state at a position of a JSON text.
#[derive(Debug, Clone, Copy, Default)]
struct JsonState {
    in_string: bool,
    /// The previous byte is an unescaped backslash inside a string.
    escaped: bool,
}

/// Walks a JSON text forward, once, to tell whether positions are inside strings.
#[derive(Debug, Default)]
struct JsonWalker {
    at: usize,
    state: JsonState,
}

impl JsonWalker {
    fn advance(&mut self, text: &[u8], to: usize) -> JsonState {
        while self.at < to && self.at < text.len() {
            let b = text[self.at];
            let st = &mut self.state;
            if st.in_string {
                if st.escaped {
                    st.escaped = false;
                } else if b == b'\\' {
                    st.escaped = true;
                } else if b == b'"' {
                    st.in_string = false;
                }
            } else if b == b'"' {
                st.in_string = true;
            }
            self.at += 1;
        }
        self.state
    }
}

/// A run of overlapping findings: `findings[from..to]`, masked with the strictest strategy.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    strategy: StrategyId,
    from: usize,
    to: usize,
}

fn merge<'f>(
    findings: &'f [Finding],
    strategy: impl Fn(&Finding) -> StrategyId + 'f,
    kind: impl Fn(StrategyId) -> StrategyKind + 'f,
) -> impl Iterator<Item = Span> + 'f {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = findings.get(i)?;
        let mut span = Span {
            start: first.start,
            end: first.end,
            strategy: strategy(first),
            from: i,
            to: i + 1,
        };
        i += 1;
        while let Some(f) = findings.get(i) {
            if f.start >= span.end {
                break;
            }
            span.end = span.end.max(f.end);
            let s = strategy(f);
            if kind(s) > kind(span.strategy) {
                span.strategy = s;
            }
            i += 1;
            span.to = i;
        }
        Some(span)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::pgrow::{Format, oid, value_kind};
    use super::*;
    use proptest::prelude::*;

    const RULES: &str = r#"
        [hash]
        key_hex = "00112233445566778899aabbccddeeff"
        [strategies.last4]
        kind = "partial"
        keep = 4
        [strategies.email_domain]
        kind = "partial"
        keep_email_domain = true
        [[column]]
        name = "email"
        table = "customers"
        column = "email"
        strategy = "redact"
        [[column.override]]
        groups = ["support"]
        strategy = "email_domain"
        [[column]]
        name = "tax"
        column = "tax_id"
        strategy = "hash"
        [[column]]
        name = "ssn"
        column = "ssn"
        strategy = "null"
        [[detector]]
        name = "email"
        strategy = "redact"
        [[detector.override]]
        groups = ["support"]
        strategy = "email_domain"
        [[detector]]
        name = "card"
        strategy = "last4"
        [[detector]]
        name = "us_ssn"
        strategy = "redact"
        [[detector]]
        name = "secret"
        regex = "secret=[^ ]+"
        strategy = "redact"
        [[detector]]
        name = "kill"
        regex = "DROPME"
        strategy = "null"
    "#;

    fn rules() -> Arc<RuleSet> {
        Arc::new(RuleSet::from_toml(RULES, None).unwrap())
    }

    fn col(name: &str, type_oid: u32, format: Format) -> ColumnDesc<'_> {
        ColumnDesc {
            origin: Origin {
                name,
                ..Origin::default()
            },
            kind: value_kind(type_oid, format),
        }
    }

    fn plan(groups: &[&str], cols: &[ColumnDesc<'_>]) -> MaskPlan {
        let groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
        MaskPlan::new(rules(), "app", Audience::Groups(&groups), cols)
    }

    fn text(o: Outcome) -> Option<String> {
        match o {
            Outcome::Replaced(v) => Some(String::from_utf8(v).unwrap()),
            Outcome::Unchanged => Some("<unchanged>".into()),
            Outcome::Null => None,
        }
    }

    #[test]
    fn a_column_rule_masks_the_whole_value_per_group() {
        let cols = [col("email", oid::TEXT, Format::Text)];
        let mut p = plan(&[], &cols);
        assert_eq!(
            text(p.apply(0, b"ann@example.com")).as_deref(),
            Some("****")
        );
        assert!(p.strictest());
        let mut p = plan(&["support"], &cols);
        assert_eq!(
            text(p.apply(0, b"ann@example.com")).as_deref(),
            Some("***@example.com")
        );
        assert!(!p.strictest());
        let r = p.report();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].source, Source::Column("email".into()));
        assert_eq!(r[0].strategy, StrategyKind::Partial);
        assert!(!r[0].strictest);
    }

    #[test]
    fn a_clear_override_exempts_a_group_from_the_rule_and_the_detectors() {
        let rules = Arc::new(
            RuleSet::from_toml(
                r#"
                [[column]]
                name = "email"
                column = "email"
                strategy = "redact"
                [[column.override]]
                groups = ["dba"]
                strategy = "clear"
                [[detector]]
                name = "email"
                strategy = "redact"
                [[detector.override]]
                groups = ["dba"]
                strategy = "clear"
                "#,
                None,
            )
            .unwrap(),
        );
        let cols = [
            col("email", oid::TEXT, Format::Text),
            col("note", oid::TEXT, Format::Text),
        ];
        let dba = vec!["dba".to_string()];
        let mut p = MaskPlan::new(rules.clone(), "app", Audience::Groups(&dba), &cols);
        assert!(!p.is_active());
        assert_eq!(p.apply(0, b"ann@example.com"), Outcome::Unchanged);
        assert_eq!(p.apply(1, b"ann@example.com"), Outcome::Unchanged);
        assert!(!p.strictest());
        let mut p = MaskPlan::new(rules, "app", Audience::Groups(&[]), &cols);
        assert_eq!(
            p.apply(0, b"ann@example.com"),
            Outcome::Replaced(b"****".to_vec())
        );
        assert_eq!(
            p.apply(1, b"ann@example.com"),
            Outcome::Replaced(b"****".to_vec())
        );
    }

    #[test]
    fn the_strictest_audience_gets_every_rules_strictest_strategy() {
        let cols = [col("email", oid::TEXT, Format::Text)];
        let mut p = MaskPlan::new(rules(), "app", Audience::Strictest, &cols);
        assert_eq!(
            text(p.apply(0, b"ann@example.com")).as_deref(),
            Some("****")
        );
        assert!(p.strictest());
    }

    #[test]
    fn hashed_columns_are_stable_so_joins_still_match() {
        let cols = [col("tax_id", oid::VARCHAR, Format::Text)];
        let mut p = plan(&[], &cols);
        let a = text(p.apply(0, b"DE123456789")).unwrap();
        let b = text(p.apply(0, b"DE123456789")).unwrap();
        assert_eq!(a, b);
        assert!(a.starts_with("h:") && a.len() == 18);
    }

    #[test]
    fn content_findings_are_replaced_in_place() {
        let cols = [col("notes", oid::TEXT, Format::Text)];
        let mut p = plan(&[], &cols);
        assert_eq!(
            text(p.apply(0, b"mail ann@example.com, card 4111 1111 1111 1111 ok")).as_deref(),
            Some("mail ****, card **** **** **** 1111 ok")
        );
        assert_eq!(
            text(p.apply(0, b"nothing here")).as_deref(),
            Some("<unchanged>")
        );
        let mut r = p.report();
        r.sort_by_key(|f| format!("{:?}", f.source));
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].source, Source::Detector("card".into()));
        assert_eq!(r[1].source, Source::Detector("email".into()));
        assert_eq!(p.masked_values(), 2);
        p.reset_counts();
        assert!(p.report().is_empty());
    }

    #[test]
    fn detector_strategies_depend_on_groups_too() {
        let cols = [col("notes", oid::TEXT, Format::Text)];
        let mut p = plan(&["support"], &cols);
        assert_eq!(
            text(p.apply(0, b"from ann@example.com")).as_deref(),
            Some("from ***@example.com")
        );
        assert!(!p.strictest());
        assert!(!p.report()[0].strictest);
    }

    #[test]
    fn a_plan_with_no_rules_for_the_target_is_inactive() {
        let rules = Arc::new(
            RuleSet::from_toml(
                "[[detector]]\nname = \"email\"\ntarget = \"prod\"\nstrategy = \"redact\"\n",
                None,
            )
            .unwrap(),
        );
        let cols = [col("email", oid::TEXT, Format::Text)];
        let p = MaskPlan::new(rules.clone(), "dev", Audience::Groups(&[]), &cols);
        assert!(!p.is_active());
        let mut p = MaskPlan::new(rules, "prod", Audience::Groups(&[]), &cols);
        assert!(p.is_active());
        assert_eq!(p.apply(0, b"a@b.io"), Outcome::Replaced(b"****".to_vec()));
    }

    #[test]
    fn a_null_detector_nulls_the_whole_value() {
        let cols = [col("notes", oid::TEXT, Format::Text)];
        let mut p = plan(&[], &cols);
        assert_eq!(p.apply(0, b"a@b.io DROPME"), Outcome::Null);
    }

    #[test]
    fn json_documents_stay_valid_json() {
        let cols = [col("doc", oid::JSONB, Format::Text)];
        let mut p = plan(&[], &cols);
        assert_eq!(
            text(p.apply(
                0,
                br#"{"e":"ann@example.com","n":4111111111111111,"s":"x\nbob@ex.io"}"#
            ))
            .as_deref(),
            Some(r#"{"e":"****","n":"************1111","s":"x\n****"}"#)
        );
        // A custom finding spanning structure falls back to a whole-value JSON string.
        assert_eq!(
            text(p.apply(0, br#"{"a":"secret=abc","b":"c"}"#)).as_deref(),
            Some(r#""****""#)
        );
    }

    #[test]
    fn a_json_column_rule_gives_a_json_string() {
        let cols = [ColumnDesc {
            origin: Origin {
                table: Some("customers"),
                column: Some("email"),
                name: "e",
                ..Origin::default()
            },
            kind: value_kind(oid::JSON, Format::Text),
        }];
        let mut p = plan(&["support"], &cols);
        assert_eq!(
            text(p.apply(0, br#""a\"b@x.io""#)).as_deref(),
            Some(r#""*****@x.io*""#)
        );
    }

    #[test]
    fn non_text_types_are_nulled_not_corrupted() {
        let cols = [
            col("ssn", oid::INT4, Format::Text),
            col("id", oid::INT8, Format::Text),
            col("tax_id", oid::INT8, Format::Binary),
            col("addr", oid::INET, Format::Text),
            col("tags", oid::TEXT_ARRAY, Format::Text),
            col("email", oid::TEXT_ARRAY, Format::Text),
            col("row", 16_384, Format::Binary),
        ];
        let mut p = plan(&[], &cols);
        assert_eq!(p.apply(0, b"123456789"), Outcome::Null);
        assert_eq!(p.apply(1, b"4111111111111111"), Outcome::Unchanged);
        assert_eq!(p.apply(2, &[0, 0, 0, 0, 0, 0, 0, 1]), Outcome::Null);
        assert_eq!(p.apply(3, b"10.0.0.1"), Outcome::Unchanged);
        assert_eq!(
            text(p.apply(4, b"{a@b.io,\"x y\"}")).as_deref(),
            Some("{****,\"x y\"}")
        );
        assert_eq!(p.apply(5, b"{a,b}"), Outcome::Null);
        let mut row = vec![0, 0, 0, 1, 0, 0, 0, 25, 0, 0, 0, 8];
        row.extend(b"a@b.io!!");
        assert_eq!(p.apply(6, &row), Outcome::Null);
        assert_eq!(p.apply(6, &[0, 0, 0, 0]), Outcome::Unchanged);
    }

    #[test]
    fn binary_jsonb_keeps_its_version_byte() {
        let cols = [col("doc", oid::JSONB, Format::Binary)];
        let mut p = plan(&[], &cols);
        let mut v = vec![1];
        v.extend(br#"{"e": "a@b.io"}"#);
        let mut want = vec![1];
        want.extend(br#"{"e": "****"}"#);
        assert_eq!(p.apply(0, &v), Outcome::Replaced(want));
        let mut v2 = vec![2];
        v2.extend(br#"{"e": "a@b.io"}"#);
        assert_eq!(p.apply(0, &v2), Outcome::Null);
    }

    #[test]
    fn copy_text_writes_masks_as_text_for_any_type() {
        let cols = [
            col("ssn", oid::INT4, Format::Text),
            col("tags", oid::TEXT_ARRAY, Format::Text),
        ];
        let mut p = plan(&[], &cols);
        assert_eq!(p.apply_text(0, b"123456789"), Outcome::Null);
        assert_eq!(
            text(p.apply_text(1, b"{123-45-6789}")).as_deref(),
            Some("{****}")
        );
    }

    #[test]
    fn an_unresolved_alias_is_left_to_the_detectors() {
        let cols = [
            col("lower", oid::TEXT, Format::Text),
            col("email", oid::TEXT, Format::Text),
        ];
        let mut p = plan(&[], &cols);
        assert_eq!(
            text(p.apply(0, b"ann@example.com")).as_deref(),
            Some("****")
        );
        assert_eq!(p.column_rule(0), None);
        assert_eq!(p.column_rule(1), Some("email"));
        let r = p.report();
        assert_eq!(r[0].source, Source::Detector("email".into()));
    }

    proptest! {
        #[test]
        fn masking_a_json_document_keeps_it_json_shaped(
            parts in prop::collection::vec(prop::sample::select(vec![
                "\"a@b.io\"", "4111111111111111", "\"x\\nc@d.io\"", "\"123-45-6789\"",
                "\"4111-1111-1111-1111 and DROP\"", "true", "null", "\"\\u0040e@f.io\"",
            ]), 1..6),
        ) {
            let doc = format!("[{}]", parts.join(","));
            let cols = [col("doc", oid::JSON, Format::Text)];
            let mut p = plan(&[], &cols);
            let out = match p.apply(0, doc.as_bytes()) {
                Outcome::Replaced(v) => String::from_utf8(v).unwrap(),
                Outcome::Unchanged => doc.clone(),
                Outcome::Null => return Ok(()),
            };
            // Quotes balance, and every string token is closed (a minimal JSON lexer).
            let mut w = JsonWalker::default();
            let end = w.advance(out.as_bytes(), out.len());
            prop_assert!(!end.in_string && !end.escaped, "{}", out);
            prop_assert!(!out.contains("a@b.io") && !out.contains("c@d.io") && !out.contains("4111111111111111"));
        }
    }
}
