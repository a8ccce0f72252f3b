//! The Cedar policy engine: loads a schema and a policy set from a directory, validates the
//! policies against the schema, and decides requests.
//!
//! A policy directory holds `sluice.cedarschema` and any number of `*.cedar` files (read in
//! name order). Each policy gets the id `<file stem>.<n>` (its place in the file); an
//! `@id("...")` annotation gives the name people see in errors and in the journal. A policy set
//! that does not parse or does not validate (strict mode) is rejected with Cedar's messages, so
//! a typo is found by `sluice policy check` or at agent start, never at the first statement.
//!
//! A request is principal `Sluice::User::"<name>"` (member of `Sluice::Group::"<g>"` for each of
//! its groups), action `Sluice::Action::"<kind>"` (or `"connect"` at session start), resource
//! `Sluice::Target::"<target>"`, and a context with the statement facts, the time, the source
//! process, and `jit` (whether the principal holds an unexpired just-in-time grant for the
//! target, which the caller looks up). The entities (user, groups, target) are built once per
//! session ([`SessionPolicy`]); per statement only the context is built, from typed values (no
//! JSON).
//!
//! Decisions fail closed: Cedar skips a policy whose evaluation errors, which could let a
//! `forbid` fall away, so any evaluation error is a deny. The reason of a deny is the
//! `@reason("...")` of the policies that decided it. A deny decided by a `forbid` annotated
//! `@approval("group")` carries that group in [`Verdict::approval`]: the proxy then holds the
//! statement until a member of the group approves it (a deny by any other policy stays a deny).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, Policy, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};

use super::facts::{Facts, Kind};

/// The schema file's name inside a policy directory.
pub const SCHEMA_FILE: &str = "sluice.cedarschema";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid schema {path}: {message}")]
    Schema { path: PathBuf, message: String },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: policy templates are not supported")]
    Template { path: PathBuf },
    #[error("the policies do not validate against the schema:\n{0}")]
    Invalid(String),
    #[error("no policy files (*.cedar) in {0}")]
    Empty(PathBuf),
    #[error("bad entity or context for {what}: {message}")]
    Request { what: String, message: String },
}

/// Who a session belongs to, as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalRef<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The deciding policies: `@id` annotations where present, else Cedar policy ids.
    pub policies: Vec<String>,
    /// For a deny: the reasons (`@reason` annotations) joined, or why no policy allowed it.
    pub reason: String,
    /// For a deny by a policy annotated `@approval("group")`: that group.
    pub approval: Option<String>,
}

impl Verdict {
    /// The sentence the client gets on a deny.
    pub fn message(&self) -> String {
        let mut s = match self.policies.as_slice() {
            [] => "sluice: denied".to_string(),
            [one] => format!("sluice: denied by policy \"{one}\""),
            many => format!(
                "sluice: denied by policies {}",
                many.iter()
                    .map(|p| format!("\"{p}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        if !self.reason.is_empty() {
            s.push_str(": ");
            s.push_str(&self.reason);
        }
        s
    }
}

/// A loaded, validated policy set.
pub struct Engine {
    policies: PolicySet,
    /// Display name (`@id`) per Cedar policy id, and the annotations a deny needs.
    names: HashMap<PolicyId, Annotations>,
    actions: HashMap<&'static str, EntityUid>,
    authorizer: Authorizer,
    dir: PathBuf,
}

struct Annotations {
    name: String,
    reason: Option<String>,
    approval: Option<String>,
}

/// The per-session part of a request: the entities and uids, built once.
pub struct SessionPolicy {
    principal: EntityUid,
    target: EntityUid,
    target_name: String,
    entities: Entities,
    process: RestrictedExpression,
}

/// Where a request comes from, for the context.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub uid: Option<u32>,
    pub comm: &'a str,
}

fn uid(type_name: &str, id: &str) -> Result<EntityUid, PolicyError> {
    let t = EntityTypeName::from_str(type_name).map_err(|e| PolicyError::Request {
        what: type_name.into(),
        message: e.to_string(),
    })?;
    Ok(EntityUid::from_type_name_and_id(t, EntityId::new(id)))
}

impl Engine {
    /// Loads and validates `dir/sluice.cedarschema` and `dir/*.cedar`.
    pub fn load(dir: &Path) -> Result<Engine, PolicyError> {
        let schema_path = dir.join(SCHEMA_FILE);
        let schema_text = read(&schema_path)?;
        let (schema, _warnings) =
            Schema::from_cedarschema_str(&schema_text).map_err(|e| PolicyError::Schema {
                path: schema_path.clone(),
                message: e.to_string(),
            })?;

        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| PolicyError::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(PolicyError::Empty(dir.to_path_buf()));
        }

        let mut policies = PolicySet::new();
        let mut names = HashMap::new();
        for path in &files {
            let text = read(path)?;
            let parsed = PolicySet::from_str(&text).map_err(|e| PolicyError::Parse {
                path: path.clone(),
                message: format!("{e}: {}", diagnostic_details(&e)),
            })?;
            if parsed.templates().next().is_some() {
                return Err(PolicyError::Template { path: path.clone() });
            }
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut in_file: Vec<&Policy> = parsed.policies().collect();
            // Cedar numbers policies policy0, policy1, ... in file order.
            in_file.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            for (n, p) in in_file.into_iter().enumerate() {
                let id = PolicyId::new(format!("{stem}.{n}"));
                let policy = p.new_id(id.clone());
                names.insert(
                    id.clone(),
                    Annotations {
                        name: policy
                            .annotation("id")
                            .map(str::to_owned)
                            .unwrap_or_else(|| id.to_string()),
                        reason: policy.annotation("reason").map(str::to_owned),
                        approval: policy.annotation("approval").map(str::to_owned),
                    },
                );
                policies.add(policy).map_err(|e| PolicyError::Parse {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }

        let result = Validator::new(schema).validate(&policies, ValidationMode::Strict);
        if !result.validation_passed() {
            let lines: Vec<String> = result
                .validation_errors()
                .map(|e| {
                    let id = e.policy_id();
                    let name = names.get(id).map(|a| a.name.as_str()).unwrap_or("?");
                    format!("  policy {id} (\"{name}\"): {e}: {}", diagnostic_details(e))
                })
                .collect();
            return Err(PolicyError::Invalid(lines.join("\n")));
        }

        let mut actions = HashMap::new();
        for name in Kind::ALL.iter().map(|k| k.as_str()).chain(["connect"]) {
            actions.insert(name, uid("Sluice::Action", name)?);
        }
        Ok(Engine {
            policies,
            names,
            actions,
            authorizer: Authorizer::new(),
            dir: dir.to_path_buf(),
        })
    }

    /// The directory the policies came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many policies are loaded.
    pub fn len(&self) -> usize {
        self.policies.policies().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Builds the per-session entities for `principal` on `target`.
    pub fn session(
        &self,
        principal: PrincipalRef<'_>,
        target: &str,
        source: Source<'_>,
    ) -> Result<SessionPolicy, PolicyError> {
        let user = uid("Sluice::User", principal.name)?;
        let mut groups = HashSet::new();
        let mut entities = Vec::new();
        for g in principal.groups {
            let g = uid("Sluice::Group", g)?;
            entities.push(Entity::new_no_attrs(g.clone(), HashSet::new()));
            groups.insert(g);
        }
        entities.push(Entity::new_no_attrs(user.clone(), groups));
        let target_uid = uid("Sluice::Target", target)?;
        entities.push(Entity::new_no_attrs(target_uid.clone(), HashSet::new()));
        let entities =
            Entities::from_entities(entities, None).map_err(|e| PolicyError::Request {
                what: format!("principal {}", principal.name),
                message: e.to_string(),
            })?;
        let process = RestrictedExpression::new_record([
            (
                "uid".to_string(),
                RestrictedExpression::new_long(source.uid.map(i64::from).unwrap_or(-1)),
            ),
            (
                "comm".to_string(),
                RestrictedExpression::new_string(source.comm.to_string()),
            ),
        ])
        .map_err(|e| PolicyError::Request {
            what: "process".into(),
            message: e.to_string(),
        })?;
        Ok(SessionPolicy {
            principal: user,
            target: target_uid,
            target_name: target.to_string(),
            entities,
            process,
        })
    }

    /// Decides whether the session may connect at all. `jit`: the principal holds an active
    /// just-in-time grant for the target.
    pub fn decide_connect(&self, session: &SessionPolicy, jit: bool) -> Verdict {
        self.decide_action(session, "connect", None, jit)
    }

    /// Decides one statement.
    pub fn decide(&self, session: &SessionPolicy, facts: &Facts, jit: bool) -> Verdict {
        self.decide_action(session, facts.kind.as_str(), Some(facts), jit)
    }

    fn decide_action(
        &self,
        session: &SessionPolicy,
        action: &'static str,
        facts: Option<&Facts>,
        jit: bool,
    ) -> Verdict {
        let Some(action_uid) = self.actions.get(action) else {
            return deny_internal(format!("unknown action {action}"));
        };
        let context = match context(action, facts, session, jit) {
            Ok(c) => c,
            Err(e) => return deny_internal(e),
        };
        let request = match Request::new(
            session.principal.clone(),
            action_uid.clone(),
            session.target.clone(),
            context,
            None,
        ) {
            Ok(r) => r,
            Err(e) => return deny_internal(e.to_string()),
        };
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &session.entities);
        let diagnostics = response.diagnostics();
        let ids: Vec<&PolicyId> = diagnostics.reason().collect();
        let mut ids_sorted = ids.clone();
        ids_sorted.sort();
        let policies: Vec<String> = ids_sorted.iter().map(|id| self.name(id)).collect();
        if let Some(error) = diagnostics.errors().next() {
            return Verdict {
                allowed: false,
                policies,
                reason: format!("policy evaluation failed, so the statement is denied: {error}"),
                approval: None,
            };
        }
        match response.decision() {
            CedarDecision::Allow => Verdict {
                allowed: true,
                policies,
                reason: String::new(),
                approval: None,
            },
            CedarDecision::Deny if ids_sorted.is_empty() => Verdict {
                allowed: false,
                policies,
                reason: format!(
                    "no policy permits {action} on target \"{}\"",
                    session.target_name
                ),
                approval: None,
            },
            CedarDecision::Deny => {
                let mut reasons = Vec::new();
                let mut approval = None;
                for id in &ids_sorted {
                    if let Some(a) = self.names.get(id) {
                        if let Some(r) = &a.reason
                            && !reasons.contains(r)
                        {
                            reasons.push(r.clone());
                        }
                        if approval.is_none() {
                            approval = a.approval.clone();
                        }
                    }
                }
                // Only a deny that every deciding policy would turn into a request is held:
                // a forbid without @approval among them keeps it a plain deny.
                let all_approval = ids_sorted
                    .iter()
                    .all(|id| self.names.get(id).is_some_and(|a| a.approval.is_some()));
                Verdict {
                    allowed: false,
                    policies,
                    reason: reasons.join("; "),
                    approval: approval.filter(|_| all_approval),
                }
            }
        }
    }

    fn name(&self, id: &PolicyId) -> String {
        self.names
            .get(id)
            .map(|a| a.name.clone())
            .unwrap_or_else(|| id.to_string())
    }
}

fn deny_internal(message: String) -> Verdict {
    Verdict {
        allowed: false,
        policies: Vec::new(),
        reason: format!("policy request failed, so the statement is denied: {message}"),
        approval: None,
    }
}

fn strings<'a>(items: impl Iterator<Item = &'a String>) -> RestrictedExpression {
    RestrictedExpression::new_set(items.map(|s| RestrictedExpression::new_string(s.clone())))
}

fn context(
    action: &str,
    facts: Option<&Facts>,
    session: &SessionPolicy,
    jit: bool,
) -> Result<Context, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let none = Facts {
        kind: Kind::Other,
        tables_read: Default::default(),
        tables_written: Default::default(),
        has_where: false,
        functions: Default::default(),
        copy_program: false,
        parse_error: false,
    };
    let f = facts.unwrap_or(&none);
    let pairs = [
        ("kind", RestrictedExpression::new_string(action.to_string())),
        ("tables_read", strings(f.tables_read.iter())),
        ("tables_written", strings(f.tables_written.iter())),
        ("all_tables", strings(f.all_tables())),
        ("has_where", RestrictedExpression::new_bool(f.has_where)),
        ("functions", strings(f.functions.iter())),
        (
            "copy_program",
            RestrictedExpression::new_bool(f.copy_program),
        ),
        ("parse_error", RestrictedExpression::new_bool(f.parse_error)),
        ("hour", RestrictedExpression::new_long(now / 3600 % 24)),
        ("unix_seconds", RestrictedExpression::new_long(now)),
        ("process", session.process.clone()),
        ("jit", RestrictedExpression::new_bool(jit)),
    ];
    Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| e.to_string())
}

/// Cedar's errors carry help and source labels through `miette`; the help is the useful part.
fn diagnostic_details(e: &dyn miette::Diagnostic) -> String {
    e.help().map(|h| h.to_string()).unwrap_or_default()
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::facts::{Dialect, analyze};
    use super::*;

    fn example() -> Engine {
        Engine::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")).unwrap()
    }

    /// The session of `who` (name, groups) on `target`, from psql as uid 1000.
    fn session(engine: &Engine, who: (&str, &[&str]), target: &str) -> SessionPolicy {
        let groups: Vec<String> = who.1.iter().map(|s| s.to_string()).collect();
        engine
            .session(
                PrincipalRef {
                    name: who.0,
                    groups: &groups,
                },
                target,
                Source {
                    uid: Some(1000),
                    comm: "psql",
                },
            )
            .unwrap()
    }

    /// A policy directory with the example schema and no policies yet.
    fn dir_with_schema() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let schema = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sluice.cedarschema"),
        )
        .unwrap();
        std::fs::write(dir.path().join(SCHEMA_FILE), schema).unwrap();
        dir
    }

    fn decide(engine: &Engine, who: (&str, &[&str]), target: &str, sql: &str) -> Verdict {
        let session = session(engine, who, target);
        let mut last = engine.decide_connect(&session, false);
        for f in &analyze(sql, Dialect::Postgres) {
            last = engine.decide(&session, f, false);
            if !last.allowed {
                break;
            }
        }
        last
    }

    #[test]
    fn the_example_policies_decide_the_documented_cases() {
        let e = example();
        let dev = ("dev", &[][..]);
        let admin = ("root", &["admins"][..]);
        // (who, target, sql, allowed, deciding policy when denied)
        let cases: &[(_, &str, &str, bool, &str)] = &[
            (dev, "app-db", "select * from people", true, ""),
            (
                dev,
                "app-db",
                "update people set name = 'x' where id = 1",
                true,
                "",
            ),
            (
                dev,
                "app-db",
                "drop table people",
                false,
                "no-ddl-for-non-admins",
            ),
            (
                dev,
                "app-db",
                "/* x */ DrOp TaBlE people",
                false,
                "no-ddl-for-non-admins",
            ),
            (
                dev,
                "app-db",
                "grant all on people to public",
                false,
                "no-ddl-for-non-admins",
            ),
            (admin, "app-db", "drop table people", true, ""),
            (
                dev,
                "app-db",
                "delete from people",
                false,
                "no-update-or-delete-without-where",
            ),
            (
                dev,
                "app-db",
                "update people set name = 'x'",
                false,
                "no-update-or-delete-without-where",
            ),
            (
                dev,
                "app-db",
                "with d as (delete from people returning *) select * from d",
                false,
                "no-update-or-delete-without-where",
            ),
            (
                dev,
                "app-db",
                "select 1; drop table people",
                false,
                "no-ddl-for-non-admins",
            ),
            (
                dev,
                "app-db",
                "copy people to program 'id'",
                false,
                "no-copy-program",
            ),
            (
                admin,
                "app-db",
                "copy people to program 'id'",
                false,
                "no-copy-program",
            ),
            (
                dev,
                "app-db",
                "select lo_import('/etc/passwd')",
                false,
                "no-server-file-functions",
            ),
            (
                dev,
                "app-db",
                "prepare p as delete from people",
                false,
                "no-update-or-delete-without-where",
            ),
            (
                dev,
                "prod-db",
                "delete from people where id = 1",
                false,
                "prod-delete-needs-dba",
            ),
            (dev, "app-db", "delete from people where id = 1", true, ""),
        ];
        for (who, target, sql, allowed, policy) in cases {
            let v = decide(&e, *who, target, sql);
            assert_eq!(v.allowed, *allowed, "{sql} as {}: {v:?}", who.0);
            if !allowed {
                assert!(v.policies.iter().any(|p| p == policy), "{sql}: {v:?}");
                assert!(v.message().contains(policy), "{sql}: {}", v.message());
            }
        }
    }

    #[test]
    fn a_deny_names_its_policy_and_reason_and_an_approval_policy_asks_for_its_group() {
        let e = example();
        let v = decide(&e, ("dev", &[]), "app-db", "drop table t");
        assert_eq!(
            v.message(),
            "sluice: denied by policy \"no-ddl-for-non-admins\": DDL and DCL are for the admins group"
        );
        assert_eq!(v.approval, None);
        let v = decide(&e, ("dev", &[]), "prod-db", "delete from t where id = 1");
        assert_eq!(v.approval.as_deref(), Some("dba"));
        assert_eq!(v.reason, "DELETE on prod-db needs a DBA's approval");
        // A deny that a plain forbid also decides is not held: no approval can lift it.
        let v = decide(&e, ("dev", &[]), "prod-db", "delete from t");
        assert!(!v.allowed);
        assert_eq!(v.approval, None, "{v:?}");
    }

    #[test]
    fn jit_reaches_the_policies_as_context() {
        let dir = dir_with_schema();
        std::fs::write(
            dir.path().join("jit.cedar"),
            "permit (principal, action, resource);\n@id(\"prod-needs-jit\")\nforbid (principal, action, resource == Sluice::Target::\"prod-db\") unless { context.jit };\n",
        )
        .unwrap();
        let e = Engine::load(dir.path()).unwrap();
        let session = session(&e, ("dev", &[]), "prod-db");
        let f = &analyze("select 1", Dialect::Postgres)[0];
        assert!(!e.decide(&session, f, false).allowed);
        assert!(e.decide(&session, f, true).allowed);
        assert!(!e.decide_connect(&session, false).allowed);
    }

    #[test]
    fn invalid_policies_are_rejected_with_cedar_messages() {
        let dir = dir_with_schema();
        std::fs::write(
            dir.path().join("bad.cedar"),
            "@id(\"typo\") forbid (principal, action, resource) when { context.has_wher };",
        )
        .unwrap();
        let err = Engine::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("typo") && err.contains("has_wher"), "{err}");

        std::fs::write(
            dir.path().join("bad.cedar"),
            "permit (principal, action, resource",
        )
        .unwrap();
        let err = Engine::load(dir.path()).err().unwrap().to_string();
        assert!(err.contains("bad.cedar"), "{err}");

        std::fs::write(
            dir.path().join("bad.cedar"),
            "permit (principal, action == Sluice::Action::\"sellect\", resource);",
        )
        .unwrap();
        assert!(Engine::load(dir.path()).is_err());
    }

    #[test]
    fn without_a_permit_everything_is_denied_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/sluice.cedarschema"),
            dir.path().join(SCHEMA_FILE),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("only.cedar"),
            "permit (principal in Sluice::Group::\"readers\", action == Sluice::Action::\"select\", resource);",
        )
        .unwrap();
        let e = Engine::load(dir.path()).unwrap();
        let v = decide(&e, ("dev", &[]), "app-db", "select 1");
        assert!(!v.allowed);
        assert!(v.reason.contains("no policy permits select"), "{v:?}");
        let groups = vec!["readers".to_string()];
        let reader = PrincipalRef {
            name: "r",
            groups: &groups,
        };
        let source = Source {
            uid: None,
            comm: "",
        };
        let session = e.session(reader, "app-db", source).unwrap();
        assert!(
            e.decide(&session, &analyze("select 1", Dialect::Postgres)[0], false)
                .allowed
        );
        assert!(!e.decide_connect(&session, false).allowed);
    }
}
