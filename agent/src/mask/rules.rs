//! The masking rule file (`policies/masking.toml`): its serde types ([`RulesFile`]) and their
//! validation, once, into a compiled [`RuleSet`].
//!
//! Owns the file format (documented below and in the commented example `masking.toml`), glob
//! matching of target/schema/table/column names, strategy resolution for a principal's groups,
//! and every load-time check: unknown detector or strategy names, bad regular expressions, bad
//! globs, unsafe masks, a missing or short hash key. A rule file that compiles is one the
//! engine can run with: nothing here fails later, per row. Never reads files (the caller reads
//! the rule file and the hash key file and hands over their bytes).
//!
//! ```text
//! [hash]                       # needed only if some rule hashes
//! key_hex  = "..."             # 16+ bytes in hex, or
//! key_file = "/etc/sluice/masking.key"   # read by the caller (hex text or raw bytes)
//!
//! [strategies.NAME]            # named strategies; built in: redact, partial, hash, null,
//! kind = "redact" | "partial" | "hash" | "null" | "clear"   # clear (no mask: for overrides
//!                              # exempting a group; content detectors skip the column too)
//! mask = "****"                # redact
//! keep = 4                     # partial: last N alphanumerics kept (at most half the value)
//! mask_char = "*"              # partial
//! keep_email_domain = false    # partial: `****@example.com`
//!
//! [[target]]                   # per-target modes (first matching glob wins)
//! name = "prod-*"
//! strict = true                # deny statements whose masked columns cannot be tracked
//!
//! [[column]]                   # by column; the first matching rule wins
//! name = "customer-email"      # unique; recorded in the journal
//! target = "*"                 # globs (`*` only), ASCII case-insensitive; default "*"
//! schema = "*"
//! table = "customers"
//! column = "email"             # required
//! strategy = "redact"
//! [[column.override]]          # per group; the first override naming one of the
//! groups = ["support"]         # principal's groups wins, else `strategy`
//! strategy = "partial"
//!
//! [[detector]]                 # by content, on every text value no column rule masked
//! name = "email"               # a built-in detector, or a custom name with `regex`
//! regex = "EMP-[0-9]{6}"       # custom detectors only
//! target = "*"
//! strategy = "redact"
//! [[detector.override]]
//! groups = ["support"]
//! strategy = "partial"
//! ```
//!
//! Column matching: a result column whose origin the proxy resolved (schema, table, column)
//! must match all three patterns; a component the proxy could not resolve matches any pattern,
//! and a column with no resolved origin at all (an expression, an alias) is matched by its
//! result name against `column` alone. Masking too much is the safe error.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use thiserror::Error;

use super::detect::{Builtin, DetectError, DetectorId, Detectors};
use super::strategy::{HashKey, Strategy, StrategyError, StrategyKind, check_mask};

/// Why a rule file is not usable.
#[derive(Debug, Error)]
pub enum RulesError {
    #[error("invalid masking rules file")]
    Parse {
        #[source]
        source: toml::de::Error,
    },
    #[error("{rule}: invalid detector")]
    Detector {
        rule: String,
        #[source]
        source: DetectError,
    },
    #[error("{rule}: {field} pattern {pattern:?} is not a valid glob: {reason}")]
    BadGlob {
        rule: String,
        field: &'static str,
        pattern: String,
        reason: &'static str,
    },
    #[error("{rule}: unknown strategy {name:?}; known strategies are {known}")]
    UnknownStrategy {
        rule: String,
        name: String,
        known: String,
    },
    #[error("strategy {name:?} is invalid")]
    BadStrategy {
        name: String,
        #[source]
        source: StrategyError,
    },
    #[error("strategy {name:?} redefines the built-in strategy with kind {kind:?}")]
    BuiltinRedefined { name: String, kind: &'static str },
    #[error("{kind} name {name:?} is used twice")]
    Duplicate { kind: &'static str, name: String },
    #[error("{rule}: an override needs at least one group")]
    EmptyGroups { rule: String },
    #[error("{rule}: only a custom detector (not the built-in {name:?}) may have a regex")]
    RegexOnBuiltin { rule: String, name: String },
    #[error("rules hash values but [hash] has neither key_hex nor key_file")]
    HashKeyMissing,
    #[error("[hash] key_file {path:?} is set but its contents were not provided")]
    HashKeyFileNotRead { path: PathBuf },
    #[error("[hash] must set exactly one of key_hex and key_file")]
    HashKeyAmbiguous,
    #[error("[hash] key_hex is not hexadecimal")]
    HashKeyNotHex,
    #[error("[hash] key is unusable")]
    HashKey {
        #[source]
        source: StrategyError,
    },
}

// ---------------------------------------------------------------------------------------------
// The file, as written

/// A rule file as parsed, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub hash: Option<HashSpec>,
    #[serde(default)]
    pub strategies: BTreeMap<String, StrategySpec>,
    #[serde(rename = "target", default)]
    pub targets: Vec<TargetSpec>,
    #[serde(rename = "column", default)]
    pub columns: Vec<ColumnSpec>,
    #[serde(rename = "detector", default)]
    pub detectors: Vec<DetectorSpec>,
}

/// `[hash]`: where the HMAC key comes from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashSpec {
    #[serde(default)]
    pub key_hex: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[strategies.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StrategySpec {
    Redact {
        #[serde(default)]
        mask: Option<String>,
    },
    Partial {
        #[serde(default)]
        keep: Option<usize>,
        #[serde(default)]
        mask_char: Option<char>,
        #[serde(default)]
        keep_email_domain: Option<bool>,
    },
    Hash {},
    Null {},
    Clear {},
}

/// `[[target]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    pub name: String,
    #[serde(default)]
    pub strict: bool,
}

/// `[[column.override]]` and `[[detector.override]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideSpec {
    pub groups: Vec<String>,
    pub strategy: String,
}

fn star() -> String {
    "*".to_string()
}

/// `[[column]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    pub name: String,
    #[serde(default = "star")]
    pub target: String,
    #[serde(default = "star")]
    pub schema: String,
    #[serde(default = "star")]
    pub table: String,
    pub column: String,
    pub strategy: String,
    #[serde(rename = "override", default)]
    pub overrides: Vec<OverrideSpec>,
}

/// `[[detector]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorSpec {
    pub name: String,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default = "star")]
    pub target: String,
    pub strategy: String,
    #[serde(rename = "override", default)]
    pub overrides: Vec<OverrideSpec>,
}

/// Where the hash key comes from, for the caller to read before [`RuleSet::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    None,
    Inline,
    File(PathBuf),
}

impl RulesFile {
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        toml::from_str(text).map_err(|source| RulesError::Parse { source })
    }

    /// Whether [`RuleSet::compile`] needs the contents of a key file.
    pub fn key_source(&self) -> KeySource {
        match &self.hash {
            Some(HashSpec {
                key_file: Some(path),
                ..
            }) => KeySource::File(path.clone()),
            Some(HashSpec {
                key_hex: Some(_), ..
            }) => KeySource::Inline,
            _ => KeySource::None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Globs

/// A name pattern where `*` matches any run of characters; ASCII case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    /// Lowercased pattern.
    pattern: Box<str>,
    any: bool,
}

impl Glob {
    /// A glob, or why `pattern` is not one: it must not be empty, and `?`, `[`, `]`, `{`, `}`
    /// are refused rather than silently taken literally.
    pub fn new(pattern: &str) -> Result<Self, &'static str> {
        if pattern.is_empty() {
            return Err("it is empty");
        }
        if pattern.contains(['?', '[', ']', '{', '}']) {
            return Err("only `*` is a wildcard; `?`, `[]` and `{}` are not supported");
        }
        Ok(Self {
            pattern: pattern.to_ascii_lowercase().into(),
            any: pattern.bytes().all(|b| b == b'*'),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.any || wildcard(self.pattern.as_bytes(), name.as_bytes())
    }

    /// The pattern, lowercased.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

/// Iterative `*` matching with single backtracking point (linear in practice).
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si].to_ascii_lowercase() {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

// ---------------------------------------------------------------------------------------------
// Compiled

/// Index of a strategy in a [`RuleSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrategyId(pub(crate) usize);

/// Whose masking applies: a principal's groups, or the strictest form of every rule (what a
/// journal that must not see more than anyone would record).
#[derive(Debug, Clone, Copy)]
pub enum Audience<'a> {
    Groups(&'a [String]),
    Strictest,
}

/// A rule's strategy and its per-group overrides.
#[derive(Debug, Clone)]
pub struct Choice {
    default: StrategyId,
    overrides: Vec<(Vec<String>, StrategyId)>,
    strictest: StrategyId,
}

/// A compiled `[[column]]` rule.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    pub name: String,
    target: Glob,
    schema: Glob,
    table: Glob,
    column: Glob,
    choice: Choice,
}

/// A compiled `[[detector]]` rule; its detector has the same index in [`RuleSet::detectors`].
#[derive(Debug, Clone)]
pub struct DetectorRule {
    pub name: String,
    target: Glob,
    choice: Choice,
}

/// Where a result column comes from, as far as the proxy could resolve it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin<'a> {
    pub schema: Option<&'a str>,
    pub table: Option<&'a str>,
    pub column: Option<&'a str>,
    /// The column's name in the result (RowDescription field name), used when nothing else is
    /// resolved.
    pub name: &'a str,
}

/// The validated, compiled rules.
#[derive(Debug, Clone)]
pub struct RuleSet {
    strategies: Vec<(String, Strategy)>,
    columns: Vec<ColumnRule>,
    detectors: Detectors,
    detector_rules: Vec<DetectorRule>,
    targets: Vec<(Glob, bool)>,
}

const BUILTIN_STRATEGIES: [(&str, StrategyKind); 5] = [
    ("redact", StrategyKind::Redact),
    ("partial", StrategyKind::Partial),
    ("hash", StrategyKind::Hash),
    ("null", StrategyKind::Null),
    ("clear", StrategyKind::Clear),
];

/// Default mask of the redact strategy.
pub const DEFAULT_MASK: &str = "****";
/// Default number of characters the partial strategy keeps.
pub const DEFAULT_KEEP: usize = 4;

impl RuleSet {
    /// Parses and compiles `text`. `key_file` is the contents of `[hash] key_file` when the
    /// file names one (see [`RulesFile::key_source`]).
    pub fn from_toml(text: &str, key_file: Option<&[u8]>) -> Result<Self, RulesError> {
        Self::compile(&RulesFile::parse(text)?, key_file)
    }

    /// Validates and compiles a parsed file.
    pub fn compile(file: &RulesFile, key_file: Option<&[u8]>) -> Result<Self, RulesError> {
        let uses_hash = |name: &str| {
            file.strategies
                .get(name)
                .map_or(name == "hash", |s| matches!(s, StrategySpec::Hash {}))
        };
        let referenced = file
            .columns
            .iter()
            .flat_map(|c| {
                std::iter::once(&c.strategy).chain(c.overrides.iter().map(|o| &o.strategy))
            })
            .chain(file.detectors.iter().flat_map(|d| {
                std::iter::once(&d.strategy).chain(d.overrides.iter().map(|o| &o.strategy))
            }));
        let mut needs_key = false;
        for name in referenced {
            needs_key |= uses_hash(name);
        }
        let key = if needs_key {
            Some(hash_key(file.hash.as_ref(), key_file)?)
        } else {
            None
        };

        let mut strategies: Vec<(String, Strategy)> = Vec::new();
        for (name, kind) in BUILTIN_STRATEGIES {
            if file.strategies.contains_key(name) {
                continue;
            }
            let spec = match kind {
                StrategyKind::Redact => StrategySpec::Redact { mask: None },
                StrategyKind::Partial => StrategySpec::Partial {
                    keep: None,
                    mask_char: None,
                    keep_email_domain: None,
                },
                StrategyKind::Hash => StrategySpec::Hash {},
                StrategyKind::Null => StrategySpec::Null {},
                StrategyKind::Clear => StrategySpec::Clear {},
            };
            strategies.push((name.to_string(), strategy(name, &spec, key.as_ref())?));
        }
        for (name, spec) in &file.strategies {
            if let Some((_, kind)) = BUILTIN_STRATEGIES.iter().find(|(n, _)| n == name) {
                let same = matches!(
                    (kind, spec),
                    (StrategyKind::Redact, StrategySpec::Redact { .. })
                        | (StrategyKind::Partial, StrategySpec::Partial { .. })
                        | (StrategyKind::Hash, StrategySpec::Hash {})
                        | (StrategyKind::Null, StrategySpec::Null {})
                        | (StrategyKind::Clear, StrategySpec::Clear {})
                );
                if !same {
                    return Err(RulesError::BuiltinRedefined {
                        name: name.clone(),
                        kind: spec_kind(spec).name(),
                    });
                }
            }
            strategies.push((name.clone(), strategy(name, spec, key.as_ref())?));
        }

        let mut set = RuleSet {
            strategies,
            columns: Vec::new(),
            detectors: Detectors::new(),
            detector_rules: Vec::new(),
            targets: Vec::new(),
        };

        for t in &file.targets {
            let rule = format!("target {:?}", t.name);
            set.targets.push((glob(&rule, "name", &t.name)?, t.strict));
        }

        for c in &file.columns {
            let rule = format!("column rule {:?}", c.name);
            if set.columns.iter().any(|r| r.name == c.name) {
                return Err(RulesError::Duplicate {
                    kind: "column rule",
                    name: c.name.clone(),
                });
            }
            let compiled = ColumnRule {
                name: c.name.clone(),
                target: glob(&rule, "target", &c.target)?,
                schema: glob(&rule, "schema", &c.schema)?,
                table: glob(&rule, "table", &c.table)?,
                column: glob(&rule, "column", &c.column)?,
                choice: set.choice(&rule, &c.strategy, &c.overrides)?,
            };
            set.columns.push(compiled);
        }

        for d in &file.detectors {
            let rule = format!("detector {:?}", d.name);
            if set.detector_rules.iter().any(|r| r.name == d.name) {
                return Err(RulesError::Duplicate {
                    kind: "detector",
                    name: d.name.clone(),
                });
            }
            let target = glob(&rule, "target", &d.target)?;
            let choice = set.choice(&rule, &d.strategy, &d.overrides)?;
            let detector_err = |source| RulesError::Detector {
                rule: rule.clone(),
                source,
            };
            match &d.regex {
                Some(re) => {
                    if Builtin::from_name(&d.name).is_some() {
                        return Err(RulesError::RegexOnBuiltin {
                            rule,
                            name: d.name.clone(),
                        });
                    }
                    set.detectors
                        .push_custom(&d.name, re)
                        .map_err(detector_err)?;
                }
                None => {
                    let b = Builtin::parse(&d.name).map_err(detector_err)?;
                    set.detectors.push_builtin(b);
                }
            }
            set.detector_rules.push(DetectorRule {
                name: d.name.clone(),
                target,
                choice,
            });
        }
        Ok(set)
    }

    fn strategy_id(&self, rule: &str, name: &str) -> Result<StrategyId, RulesError> {
        self.strategies
            .iter()
            .position(|(n, _)| n == name)
            .map(StrategyId)
            .ok_or_else(|| RulesError::UnknownStrategy {
                rule: rule.to_string(),
                name: name.to_string(),
                known: self
                    .strategies
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    fn choice(
        &self,
        rule: &str,
        default: &str,
        overrides: &[OverrideSpec],
    ) -> Result<Choice, RulesError> {
        let default = self.strategy_id(rule, default)?;
        let mut strictest = default;
        let mut list = Vec::with_capacity(overrides.len());
        for o in overrides {
            if o.groups.is_empty() {
                return Err(RulesError::EmptyGroups {
                    rule: rule.to_string(),
                });
            }
            let id = self.strategy_id(rule, &o.strategy)?;
            if self.strategy(id).kind() > self.strategy(strictest).kind() {
                strictest = id;
            }
            list.push((o.groups.clone(), id));
        }
        Ok(Choice {
            default,
            overrides: list,
            strictest,
        })
    }

    /// The strategy `id` refers to.
    pub fn strategy(&self, id: StrategyId) -> &Strategy {
        // Ids only come from this set; the fallback is never reached but keeps this total.
        self.strategies
            .get(id.0)
            .map_or(&Strategy::Null, |(_, s)| s)
    }

    /// The name of strategy `id`.
    pub fn strategy_name(&self, id: StrategyId) -> &str {
        self.strategies.get(id.0).map_or("", |(n, _)| n)
    }

    /// The strategy a rule's choice gives an audience, and whether it is the rule's strictest.
    pub fn resolve(&self, choice: &Choice, audience: Audience<'_>) -> (StrategyId, bool) {
        let id = match audience {
            Audience::Strictest => choice.strictest,
            Audience::Groups(groups) => choice
                .overrides
                .iter()
                .find(|(gs, _)| gs.iter().any(|g| groups.contains(g)))
                .map_or(choice.default, |&(_, id)| id),
        };
        let strictest = self.strategy(id).kind() >= self.strategy(choice.strictest).kind();
        (id, strictest)
    }

    /// Whether `target` is in strict mode (first matching `[[target]]`; default not strict).
    pub fn is_strict(&self, target: &str) -> bool {
        self.targets
            .iter()
            .find(|(g, _)| g.matches(target))
            .is_some_and(|&(_, strict)| strict)
    }

    /// The first column rule for `target` matching `origin` (see the module doc).
    pub fn column_rule(&self, target: &str, origin: &Origin<'_>) -> Option<&ColumnRule> {
        self.columns
            .iter()
            .find(|r| r.target.matches(target) && r.matches(origin))
    }

    /// The first column rule for `target` on some column of `table` (in `schema`, when known):
    /// for text that names a table but not a column, such as a constraint violation's detail,
    /// which may show any column of the row.
    pub fn table_rule(
        &self,
        target: &str,
        schema: Option<&str>,
        table: &str,
    ) -> Option<&ColumnRule> {
        self.columns.iter().find(|r| {
            r.target.matches(target)
                && schema.is_none_or(|s| r.schema.matches(s))
                && r.table.matches(table)
        })
    }

    /// Whether some column rule of `target` masks `schema.table.column`: for the proxy's
    /// strict mode, which must deny statements whose masked columns it cannot track.
    /// Could a column named `column` be masked by a column rule on `target`, whatever its
    /// table? (Strict mode's question, asked of the names a statement mentions.)
    pub fn masks_column_name(&self, target: &str, column: &str) -> bool {
        let origin = Origin {
            schema: None,
            table: None,
            column: Some(column),
            name: column,
        };
        self.column_rule(target, &origin).is_some()
    }

    pub fn masks_column(&self, target: &str, schema: &str, table: &str, column: &str) -> bool {
        let origin = Origin {
            schema: Some(schema),
            table: Some(table),
            column: Some(column),
            name: column,
        };
        self.column_rule(target, &origin).is_some()
    }

    pub fn detectors(&self) -> &Detectors {
        &self.detectors
    }

    /// The detector rules enabled for `target`, with their detector ids.
    pub fn detector_rules<'s>(
        &'s self,
        target: &'s str,
    ) -> impl Iterator<Item = (DetectorId, &'s DetectorRule)> + 's {
        self.detector_rules
            .iter()
            .enumerate()
            .filter(move |(_, r)| r.target.matches(target))
            .map(|(i, r)| (DetectorId(u16::try_from(i).unwrap_or(u16::MAX)), r))
    }
}

/// What the rules do on one target, as `sluice check-config` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetMasking<'s> {
    /// The `[[target]]` glob that set the mode (the first that matches), if any.
    pub mode_glob: Option<&'s str>,
    pub strict: bool,
    /// The column rules whose `target` matches, in order.
    pub columns: Vec<&'s str>,
    /// The detectors enabled on the target, in order.
    pub detectors: Vec<&'s str>,
}

impl RuleSet {
    /// Strict or not (and why), and which column rules and detectors apply to `target`.
    pub fn for_target(&self, target: &str) -> TargetMasking<'_> {
        let mode = self.targets.iter().find(|(g, _)| g.matches(target));
        TargetMasking {
            mode_glob: mode.map(|(g, _)| g.pattern()),
            strict: mode.is_some_and(|&(_, strict)| strict),
            columns: self
                .columns
                .iter()
                .filter(|r| r.target.matches(target))
                .map(|r| r.name.as_str())
                .collect(),
            detectors: self
                .detector_rules
                .iter()
                .filter(|r| r.target.matches(target))
                .map(|r| r.name.as_str())
                .collect(),
        }
    }

    /// Every target glob of the file (`[[target]] name`, a column rule's or a detector's
    /// `target`) that matches none of `targets`, described as the file names it: such a rule
    /// never applies, which is usually a typo or a renamed target.
    pub fn unmatched_target_globs(&self, targets: &[&str]) -> Vec<String> {
        let none = |g: &Glob| !targets.iter().any(|t| g.matches(t));
        let mut out = Vec::new();
        for (g, strict) in &self.targets {
            if none(g) {
                out.push(format!(
                    "[[target]] name = {:?} (strict = {strict})",
                    g.pattern()
                ));
            }
        }
        for r in &self.columns {
            if none(&r.target) {
                out.push(format!(
                    "column rule {:?}: target = {:?}",
                    r.name,
                    r.target.pattern()
                ));
            }
        }
        for r in &self.detector_rules {
            if none(&r.target) {
                out.push(format!(
                    "detector {:?}: target = {:?}",
                    r.name,
                    r.target.pattern()
                ));
            }
        }
        out
    }
}

impl ColumnRule {
    pub fn choice(&self) -> &Choice {
        &self.choice
    }

    fn matches(&self, o: &Origin<'_>) -> bool {
        if o.schema.is_none() && o.table.is_none() && o.column.is_none() {
            return self.column.matches(o.name);
        }
        let ok = |g: &Glob, v: Option<&str>| v.is_none_or(|v| g.matches(v));
        ok(&self.schema, o.schema)
            && ok(&self.table, o.table)
            && self.column.matches(o.column.unwrap_or(o.name))
    }
}

impl DetectorRule {
    pub fn choice(&self) -> &Choice {
        &self.choice
    }
}

fn glob(rule: &str, field: &'static str, pattern: &str) -> Result<Glob, RulesError> {
    Glob::new(pattern).map_err(|reason| RulesError::BadGlob {
        rule: rule.to_string(),
        field,
        pattern: pattern.to_string(),
        reason,
    })
}

fn spec_kind(spec: &StrategySpec) -> StrategyKind {
    match spec {
        StrategySpec::Redact { .. } => StrategyKind::Redact,
        StrategySpec::Partial { .. } => StrategyKind::Partial,
        StrategySpec::Hash {} => StrategyKind::Hash,
        StrategySpec::Null {} => StrategyKind::Null,
        StrategySpec::Clear {} => StrategyKind::Clear,
    }
}

fn strategy(
    name: &str,
    spec: &StrategySpec,
    key: Option<&HashKey>,
) -> Result<Strategy, RulesError> {
    let bad = |source| RulesError::BadStrategy {
        name: name.to_string(),
        source,
    };
    Ok(match spec {
        StrategySpec::Redact { mask } => {
            let mask = mask.as_deref().unwrap_or(DEFAULT_MASK);
            check_mask(mask).map_err(bad)?;
            Strategy::Redact { mask: mask.into() }
        }
        StrategySpec::Partial {
            keep,
            mask_char,
            keep_email_domain,
        } => {
            let mask_char = mask_char.unwrap_or('*');
            check_mask(mask_char.encode_utf8(&mut [0; 4])).map_err(bad)?;
            Strategy::Partial {
                keep: keep.unwrap_or(DEFAULT_KEEP),
                mask_char,
                keep_email_domain: keep_email_domain.unwrap_or(false),
            }
        }
        // Without a key no rule uses a hash strategy (checked by the caller), so a placeholder
        // that redacts is never applied.
        StrategySpec::Hash {} => match key {
            Some(k) => Strategy::Hash(k.clone()),
            None => Strategy::Redact {
                mask: DEFAULT_MASK.into(),
            },
        },
        StrategySpec::Null {} => Strategy::Null,
        StrategySpec::Clear {} => Strategy::Clear,
    })
}

/// The HMAC key from `[hash]`: inline hex, or the key file's contents (hex text if it is all
/// hex after trimming whitespace, raw bytes otherwise).
fn hash_key(spec: Option<&HashSpec>, key_file: Option<&[u8]>) -> Result<HashKey, RulesError> {
    let bytes = match spec {
        None
        | Some(HashSpec {
            key_hex: None,
            key_file: None,
        }) => return Err(RulesError::HashKeyMissing),
        Some(HashSpec {
            key_hex: Some(_),
            key_file: Some(_),
        }) => return Err(RulesError::HashKeyAmbiguous),
        Some(HashSpec {
            key_hex: Some(hex), ..
        }) => decode_hex(hex.trim().as_bytes()).ok_or(RulesError::HashKeyNotHex)?,
        Some(HashSpec {
            key_file: Some(path),
            ..
        }) => {
            let raw =
                key_file.ok_or_else(|| RulesError::HashKeyFileNotRead { path: path.clone() })?;
            decode_hex(raw.trim_ascii()).unwrap_or_else(|| raw.to_vec())
        }
    };
    HashKey::new(&bytes).map_err(|source| RulesError::HashKey { source })
}

fn decode_hex(s: &[u8]) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |b: u8| (b as char).to_digit(16);
    s.chunks_exact(2)
        .map(|p| Some((nibble(p[0])? * 16 + nibble(p[1])?) as u8))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff";

    fn compile(text: &str) -> Result<RuleSet, RulesError> {
        RuleSet::from_toml(text, None)
    }

    fn err(text: &str) -> String {
        let e = compile(text).unwrap_err();
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    }

    #[test]
    fn the_documented_example_file_compiles() {
        let text = include_str!("../../../policies/masking.toml");
        let file = RulesFile::parse(text).unwrap();
        assert_eq!(file.key_source(), KeySource::Inline);
        let set = RuleSet::compile(&file, None).unwrap();
        assert!(set.is_strict("prod-billing"));
        assert!(!set.is_strict("dev-db"));
        assert!(set.masks_column("app-db", "public", "customers", "email"));
        assert!(set.detectors().len() >= 9);
    }

    #[test]
    fn what_applies_to_a_target_and_globs_matching_no_target_are_reported() {
        let set = compile(
            "[[target]]\nname = \"Prod-*\"\nstrict = true\n[[target]]\nname = \"stage-*\"\n\
             [[column]]\nname = \"mail\"\ncolumn = \"email\"\nstrategy = \"redact\"\n\
             [[column]]\nname = \"cards\"\ntarget = \"prod-*\"\ncolumn = \"card\"\nstrategy = \"redact\"\n\
             [[detector]]\nname = \"email\"\nstrategy = \"redact\"\n\
             [[detector]]\nname = \"iban\"\ntarget = \"qa-*\"\nstrategy = \"redact\"\n",
        )
        .unwrap();
        assert_eq!(
            set.for_target("prod-db"),
            TargetMasking {
                mode_glob: Some("prod-*"),
                strict: true,
                columns: vec!["mail", "cards"],
                detectors: vec!["email"],
            }
        );
        let dev = set.for_target("dev-db");
        assert_eq!((dev.mode_glob, dev.strict), (None, false));
        assert_eq!(dev.columns, vec!["mail"]);
        assert_eq!(
            set.unmatched_target_globs(&["prod-db", "dev-db"]),
            vec![
                "[[target]] name = \"stage-*\" (strict = false)".to_string(),
                "detector \"iban\": target = \"qa-*\"".to_string(),
            ]
        );
        assert_eq!(set.unmatched_target_globs(&[]).len(), 6);
    }

    #[test]
    fn an_empty_file_masks_nothing() {
        let set = compile("").unwrap();
        assert!(!set.masks_column("t", "s", "t", "c"));
        assert_eq!(set.detector_rules("t").count(), 0);
    }

    #[test]
    fn an_unknown_detector_name_is_an_error_listing_the_built_ins() {
        let e = err("[[detector]]\nname = \"emial\"\nstrategy = \"redact\"\n");
        assert!(e.contains("detector \"emial\""), "{e}");
        assert!(e.contains("unknown detector \"emial\""), "{e}");
        assert!(e.contains("email, card, iban, us_ssn"), "{e}");
    }

    #[test]
    fn a_bad_regex_is_an_error_naming_the_detector() {
        let e = err("[[detector]]\nname = \"emp\"\nregex = \"EMP-(\"\nstrategy = \"redact\"\n");
        assert!(
            e.contains("detector \"emp\"") && e.contains("invalid regular expression"),
            "{e}"
        );
        let e = err("[[detector]]\nname = \"emp\"\nregex = \"a?\"\nstrategy = \"redact\"\n");
        assert!(e.contains("matches the empty string"), "{e}");
        let e = err("[[detector]]\nname = \"email\"\nregex = \"x\"\nstrategy = \"redact\"\n");
        assert!(e.contains("only a custom detector"), "{e}");
    }

    #[test]
    fn a_bad_glob_is_an_error_naming_rule_field_and_pattern() {
        let e = err(
            "[[column]]\nname = \"c\"\ntable = \"cust?mers\"\ncolumn = \"email\"\nstrategy = \"redact\"\n",
        );
        assert!(
            e.contains("column rule \"c\": table pattern \"cust?mers\""),
            "{e}"
        );
        let e = err("[[column]]\nname = \"c\"\ncolumn = \"\"\nstrategy = \"redact\"\n");
        assert!(
            e.contains("column pattern \"\"") && e.contains("empty"),
            "{e}"
        );
    }

    #[test]
    fn unknown_strategies_fields_and_duplicates_are_errors() {
        let e = err("[[column]]\nname = \"c\"\ncolumn = \"x\"\nstrategy = \"last4\"\n");
        assert!(
            e.contains("unknown strategy \"last4\"") && e.contains("redact, partial"),
            "{e}"
        );
        let e =
            err("[[column]]\nname = \"c\"\ncolumn = \"x\"\nstrategy = \"redact\"\ncolour = 1\n");
        assert!(e.contains("colour"), "{e}");
        let e = err("[strategies.x]\nkind = \"redact\"\nkeep = 4\n");
        assert!(e.contains("keep"), "{e}");
        let e = err("[strategies.redact]\nkind = \"null\"\n");
        assert!(e.contains("redefines the built-in"), "{e}");
        let e = err(
            "[[column]]\nname = \"c\"\ncolumn = \"x\"\nstrategy = \"redact\"\n[[column]]\nname = \"c\"\ncolumn = \"y\"\nstrategy = \"redact\"\n",
        );
        assert!(e.contains("column rule name \"c\" is used twice"), "{e}");
        let e = err("[strategies.x]\nkind = \"redact\"\nmask = \"\\\"x\\\"\"\n");
        assert!(
            e.contains("strategy \"x\" is invalid") && e.contains("could break JSON"),
            "{e}"
        );
    }

    #[test]
    fn hashing_needs_a_usable_key() {
        let rule = "[[column]]\nname = \"c\"\ncolumn = \"x\"\nstrategy = \"hash\"\n";
        assert!(err(rule).contains("neither key_hex nor key_file"));
        assert!(err(&format!("[hash]\nkey_hex = \"zz\"\n{rule}")).contains("not hexadecimal"));
        assert!(err(&format!("[hash]\nkey_hex = \"0011\"\n{rule}")).contains("at least 16"));
        compile(&format!("[hash]\nkey_hex = \"{KEY}\"\n{rule}")).unwrap();
        let with_file = format!("[hash]\nkey_file = \"/etc/k\"\n{rule}");
        assert!(err(&with_file).contains("contents were not provided"));
        assert_eq!(
            RulesFile::parse(&with_file).unwrap().key_source(),
            KeySource::File("/etc/k".into())
        );
        RuleSet::from_toml(&with_file, Some(format!("{KEY}\n").as_bytes())).unwrap();
        RuleSet::from_toml(&with_file, Some(&[9u8; 32])).unwrap();
        // A file that never hashes needs no key.
        compile("[[column]]\nname = \"c\"\ncolumn = \"x\"\nstrategy = \"redact\"\n").unwrap();
    }

    #[test]
    fn globs_match_case_insensitively_with_star_only() {
        let g = Glob::new("cust*er*").unwrap();
        assert!(g.matches("customers") && g.matches("CUSTOMER") && g.matches("custer"));
        assert!(!g.matches("acustomer"));
        assert!(Glob::new("*").unwrap().matches(""));
        assert!(Glob::new("*_email").unwrap().matches("work_email"));
        assert!(!Glob::new("*_email").unwrap().matches("email"));
        assert!(Glob::new("a*b*c").unwrap().matches("aXbYbZc"));
    }

    fn groups_rules() -> RuleSet {
        compile(&format!(
            r#"
            [hash]
            key_hex = "{KEY}"
            [[column]]
            name = "email"
            column = "email"
            strategy = "redact"
            [[column.override]]
            groups = ["support"]
            strategy = "partial"
            [[column.override]]
            groups = ["analysts", "support"]
            strategy = "hash"
            "#
        ))
        .unwrap()
    }

    #[test]
    fn a_principal_gets_the_first_override_naming_one_of_its_groups() {
        let set = groups_rules();
        let rule = set
            .column_rule(
                "t",
                &Origin {
                    name: "email",
                    ..Origin::default()
                },
            )
            .unwrap();
        let kind = |groups: &[&str]| {
            let groups: Vec<String> = groups.iter().map(|s| s.to_string()).collect();
            let (id, strictest) = set.resolve(rule.choice(), Audience::Groups(&groups));
            (set.strategy(id).kind(), strictest)
        };
        assert_eq!(kind(&["support"]), (StrategyKind::Partial, false));
        assert_eq!(
            kind(&["analysts", "support"]),
            (StrategyKind::Partial, false)
        );
        assert_eq!(kind(&["analysts"]), (StrategyKind::Hash, false));
        assert_eq!(kind(&[]), (StrategyKind::Redact, true));
        let (id, strictest) = set.resolve(rule.choice(), Audience::Strictest);
        assert_eq!(
            (set.strategy(id).kind(), strictest),
            (StrategyKind::Redact, true)
        );
    }

    #[test]
    fn resolved_columns_match_all_patterns_and_unresolved_ones_match_by_name() {
        let set = compile(
            "[[column]]\nname = \"c\"\nschema = \"public\"\ntable = \"customers\"\ncolumn = \"email\"\nstrategy = \"redact\"\n",
        )
        .unwrap();
        let at = |schema, table, column, name| {
            set.column_rule(
                "t",
                &Origin {
                    schema,
                    table,
                    column,
                    name,
                },
            )
            .is_some()
        };
        assert!(at(
            Some("public"),
            Some("customers"),
            Some("email"),
            "contact"
        ));
        assert!(!at(Some("public"), Some("orders"), Some("email"), "email"));
        assert!(!at(
            Some("public"),
            Some("customers"),
            Some("name"),
            "email"
        ));
        assert!(at(None, None, None, "email"));
        assert!(at(None, None, None, "EMAIL"));
        assert!(!at(None, None, None, "lower"));
        assert!(at(None, Some("customers"), Some("email"), "x"));
    }

    #[test]
    fn the_first_matching_column_rule_and_target_win() {
        let set = compile(
            r#"
            [[target]]
            name = "prod-*"
            strict = true
            [[target]]
            name = "*"
            [[column]]
            name = "exempt"
            target = "dev-*"
            column = "*"
            strategy = "partial"
            [[column]]
            name = "all"
            column = "*"
            strategy = "null"
            "#,
        )
        .unwrap();
        let o = Origin {
            name: "x",
            ..Origin::default()
        };
        assert_eq!(set.column_rule("dev-1", &o).unwrap().name, "exempt");
        assert_eq!(set.column_rule("prod-1", &o).unwrap().name, "all");
        assert!(set.is_strict("prod-1") && !set.is_strict("dev-1"));
    }
}
