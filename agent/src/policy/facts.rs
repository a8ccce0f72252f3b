//! Statement facts: what a SQL text does, as policy needs to know it, from `sqlparser`.
//!
//! One [`Facts`] per statement: a Query message with `SELECT 1; DROP TABLE t` yields two, and
//! policy denies the whole message when it denies any of them. Each fact set holds the
//! statement's [`Kind`], the tables it reads and writes, whether an UPDATE/DELETE has a WHERE,
//! the functions it calls, and whether it is a `COPY ... PROGRAM`.
//!
//! Decisions (and why):
//! - **Names** are schema-qualified as written (`public.t` stays `public.t`, `t` stays `t`),
//!   each part lowercased unless it was quoted, as PostgreSQL folds them.
//! - **CTE names are not tables.** A data-modifying CTE (`WITH d AS (DELETE FROM t RETURNING *)
//!   SELECT * FROM d`) makes the statement a write whose kind is the modification's (`delete`);
//!   `has_where` is then true only when every UPDATE/DELETE inside has one.
//! - **Read vs written.** `tables_written` are the targets of INSERT/UPDATE/DELETE/MERGE/
//!   TRUNCATE/COPY FROM; `tables_read` are the other relations named; a table both read and
//!   written is listed as written only; a DDL statement writes the tables sqlparser reports
//!   for it (CREATE/ALTER TABLE; DROP names are not reported). `all_tables` is the union.
//! - **TRUNCATE is kind `delete` without WHERE** (it removes every row), so the "no DELETE
//!   without WHERE" rule covers it.
//! - **PREPARE / EXPLAIN take the facts of the statement they wrap.** `PREPARE p AS DELETE FROM
//!   t` is a `delete` without WHERE and is decided as one. `EXPLAIN ANALYZE` runs its
//!   statement, so every EXPLAIN is decided as its statement (denying a plain EXPLAIN of a
//!   denied statement is the safe side).
//! - **EXECUTE is kind `call`.** It can only run what an earlier PREPARE created, and every
//!   PREPARE went through policy (with the facts of the statement it prepared); like a named
//!   extended-protocol statement, it cannot be swapped afterwards.
//! - **A text that does not parse** yields one fact set with `parse_error` (kind `other`): the
//!   caller decides, per target, whether that is denied (default) or allowed and flagged. The
//!   PostgreSQL dialect accepts some statements PostgreSQL rejects: facts are never a validator.
//!   Parsing is [`super::parse`]'s: sqlparser, plus the shapes it refuses that sluice
//!   recognises whole (FETCH/MOVE forms); a MOVE is kind `other` with no tables, as sqlparser's
//!   FETCH is.
//! - **Dialect is a parameter** ([`Dialect`]), so MySQL shares this module.
//! - **Cache.** Parsing costs microseconds; [`FactsCache`] keeps results by statement text in
//!   two generations (an LRU approximation: a hit in the old generation is promoted, and when
//!   the young one is full the old one is dropped), bounded by its capacity.
//!
//! Never panics on any input (sqlparser's recursion limit turns deep nesting into a parse
//! error), never does I/O.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use sqlparser::ast::{
    CopySource, CopyTarget, Expr, FromTable, ObjectName, ObjectNamePart, Query, Statement,
    TableFactor, TableObject, Visit, Visitor,
};

use super::parse::{Parsed, parse};

/// The SQL dialect a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Postgres,
    MySql,
}

/// What kind of statement this is; the Cedar action is `Sluice::Action::"<kind>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
    Ddl,
    Dcl,
    Tcl,
    Copy,
    Call,
    Set,
    Other,
}

impl Kind {
    /// Every kind, in the order the schema lists them.
    pub const ALL: [Kind; 12] = [
        Kind::Select,
        Kind::Insert,
        Kind::Update,
        Kind::Delete,
        Kind::Merge,
        Kind::Ddl,
        Kind::Dcl,
        Kind::Tcl,
        Kind::Copy,
        Kind::Call,
        Kind::Set,
        Kind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Select => "select",
            Kind::Insert => "insert",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Merge => "merge",
            Kind::Ddl => "ddl",
            Kind::Dcl => "dcl",
            Kind::Tcl => "tcl",
            Kind::Copy => "copy",
            Kind::Call => "call",
            Kind::Set => "set",
            Kind::Other => "other",
        }
    }
}

/// The facts of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub kind: Kind,
    pub tables_read: BTreeSet<String>,
    pub tables_written: BTreeSet<String>,
    /// For UPDATE/DELETE (also inside a CTE): every one has a WHERE. False for other kinds.
    pub has_where: bool,
    pub functions: BTreeSet<String>,
    /// `COPY ... TO PROGRAM` / `COPY ... FROM PROGRAM`: runs a shell command on the server.
    pub copy_program: bool,
    /// The text did not parse; nothing else here is known.
    pub parse_error: bool,
}

impl Facts {
    fn new(kind: Kind) -> Facts {
        Facts {
            kind,
            tables_read: BTreeSet::new(),
            tables_written: BTreeSet::new(),
            has_where: false,
            functions: BTreeSet::new(),
            copy_program: false,
            parse_error: false,
        }
    }

    fn unparsed() -> Facts {
        Facts {
            parse_error: true,
            ..Facts::new(Kind::Other)
        }
    }

    /// Read and written tables together.
    pub fn all_tables(&self) -> impl Iterator<Item = &String> {
        self.tables_read.iter().chain(self.tables_written.iter())
    }

    /// A one-line summary for the journal and logs.
    pub fn summary(&self) -> String {
        if self.parse_error {
            return "kind=other parse_error".into();
        }
        let mut s = format!("kind={}", self.kind.as_str());
        let list = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(",");
        if !self.tables_read.is_empty() {
            s.push_str(&format!(" read={}", list(&self.tables_read)));
        }
        if !self.tables_written.is_empty() {
            s.push_str(&format!(" write={}", list(&self.tables_written)));
        }
        if matches!(self.kind, Kind::Update | Kind::Delete) {
            s.push_str(&format!(" where={}", self.has_where));
        }
        if !self.functions.is_empty() {
            s.push_str(&format!(" functions={}", list(&self.functions)));
        }
        if self.copy_program {
            s.push_str(" copy_program");
        }
        s
    }
}

/// The facts of every statement in `sql`, in order. An empty text yields none; a text that does
/// not parse yields one fact set with `parse_error`.
pub fn analyze(sql: &str, dialect: Dialect) -> Vec<Facts> {
    match parse(sql, dialect) {
        Ok(statements) => statements
            .iter()
            .map(|s| match s {
                Parsed::Sql(s) => statement_facts(s),
                Parsed::Move | Parsed::Metadata => Facts::new(Kind::Other),
            })
            .collect(),
        Err(_) => vec![Facts::unparsed()],
    }
}

/// A name as PostgreSQL resolves it: parts lowercased unless quoted, joined with dots.
fn normalize(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part {
            ObjectNamePart::Identifier(ident) if ident.quote_style.is_some() => {
                out.push_str(&ident.value)
            }
            ObjectNamePart::Identifier(ident) => out.push_str(&ident.value.to_lowercase()),
            ObjectNamePart::Function(f) => out.push_str(&f.name.value.to_lowercase()),
        }
    }
    out
}

fn table_factor_name(t: &TableFactor) -> Option<String> {
    match t {
        TableFactor::Table { name, .. } => Some(normalize(name)),
        _ => None,
    }
}

/// A data-modifying statement found anywhere in the tree.
struct Modification {
    kind: Kind,
    targets: Vec<String>,
    /// `Some(has WHERE)` for UPDATE/DELETE.
    has_where: Option<bool>,
}

fn modification(s: &Statement) -> Option<Modification> {
    match s {
        Statement::Insert(i) => Some(Modification {
            kind: Kind::Insert,
            targets: match &i.table {
                TableObject::TableName(n) => vec![normalize(n)],
                _ => Vec::new(),
            },
            has_where: None,
        }),
        Statement::Update(u) => Some(Modification {
            kind: Kind::Update,
            targets: table_factor_name(&u.table.relation).into_iter().collect(),
            has_where: Some(u.selection.is_some()),
        }),
        Statement::Delete(d) => {
            let mut targets: Vec<String> = d.tables.iter().map(normalize).collect();
            if targets.is_empty() {
                let from = match &d.from {
                    FromTable::WithFromKeyword(v) | FromTable::WithoutKeyword(v) => v,
                };
                targets = from
                    .iter()
                    .filter_map(|t| table_factor_name(&t.relation))
                    .collect();
            }
            Some(Modification {
                kind: Kind::Delete,
                targets,
                has_where: Some(d.selection.is_some()),
            })
        }
        Statement::Merge(m) => Some(Modification {
            kind: Kind::Merge,
            targets: table_factor_name(&m.table).into_iter().collect(),
            has_where: None,
        }),
        Statement::Truncate(t) => Some(Modification {
            kind: Kind::Delete,
            targets: t.table_names.iter().map(|t| normalize(&t.name)).collect(),
            has_where: Some(false),
        }),
        _ => None,
    }
}

/// Walks one statement's tree once, collecting what the facts need.
#[derive(Default)]
struct Collector {
    relations: BTreeSet<String>,
    ctes: BTreeSet<String>,
    functions: BTreeSet<String>,
    modifications: Vec<Modification>,
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_lowercase());
                self.ctes.insert(cte.alias.name.value.clone());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        self.relations.insert(normalize(relation));
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        // `SELECT * FROM pg_read_file(...)`: a function in FROM.
        match t {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => {
                self.functions.insert(normalize(name));
            }
            TableFactor::Function { name, .. } => {
                self.functions.insert(normalize(name));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            self.functions.insert(normalize(&f.name));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        if let Some(m) = modification(s) {
            self.modifications.push(m);
        }
        if let Statement::Call(f) = s {
            self.functions.insert(normalize(&f.name));
        }
        ControlFlow::Continue(())
    }
}

/// The kind of a statement by its own variant (PREPARE and EXPLAIN unwrapped by the caller).
fn base_kind(s: &Statement) -> Kind {
    match s {
        Statement::Query(_) => Kind::Select,
        Statement::Insert(_) => Kind::Insert,
        Statement::Update(_) => Kind::Update,
        Statement::Delete(_) | Statement::Truncate(_) => Kind::Delete,
        Statement::Merge(_) => Kind::Merge,
        Statement::Copy { .. } => Kind::Copy,
        Statement::Call(_) | Statement::Execute { .. } => Kind::Call,
        Statement::Set(_) => Kind::Set,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. } => Kind::Tcl,
        Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::Deny(_)
        | Statement::CreateRole(_)
        | Statement::AlterRole { .. }
        | Statement::CreateUser(_)
        | Statement::AlterUser(_)
        | Statement::AlterDefaultPrivileges(_) => Kind::Dcl,
        Statement::Comment { .. } | Statement::RenameTable(_) => Kind::Ddl,
        other => {
            // The AST has well over a hundred CREATE/ALTER/DROP variants; their names say it.
            // Only reached for statements none of the above match (results are cached).
            let name = format!("{other:?}");
            if ["Create", "Alter", "Drop"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                Kind::Ddl
            } else {
                Kind::Other
            }
        }
    }
}

fn statement_facts(statement: &Statement) -> Facts {
    let mut inner = statement;
    while let Statement::Prepare { statement, .. } | Statement::Explain { statement, .. } = inner {
        inner = statement;
    }
    let mut facts = Facts::new(base_kind(inner));
    let mut c = Collector::default();
    let _ = statement.visit(&mut c);

    if let Statement::Copy {
        source, to, target, ..
    } = inner
    {
        facts.copy_program = matches!(target, CopyTarget::Program { .. });
        if let CopySource::Table { table_name, .. } = source {
            let name = normalize(table_name);
            if *to {
                c.relations.insert(name);
            } else {
                facts.tables_written.insert(name);
            }
        }
    }
    if let Some(first) = c.modifications.first()
        && matches!(facts.kind, Kind::Select | Kind::Other)
    {
        // A data-modifying CTE (or INSERT ... in a query body) makes the whole statement that
        // modification.
        facts.kind = first.kind;
    }
    let mut wheres = c
        .modifications
        .iter()
        .filter_map(|m| m.has_where)
        .peekable();
    if matches!(facts.kind, Kind::Update | Kind::Delete) {
        facts.has_where = wheres.peek().is_some() && wheres.all(|w| w);
    }
    for m in &c.modifications {
        facts.tables_written.extend(m.targets.iter().cloned());
    }
    for r in c.relations {
        if c.ctes.contains(&r) || facts.tables_written.contains(&r) {
            continue;
        }
        if facts.kind == Kind::Ddl {
            // CREATE TABLE t / ALTER TABLE t name the table they change.
            facts.tables_written.insert(r);
        } else {
            facts.tables_read.insert(r);
        }
    }
    facts.functions = c.functions;
    facts
}

/// Facts by statement text, shared by every connection; see the module doc for the policy.
pub struct FactsCache {
    dialect: Dialect,
    capacity: usize,
    inner: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<String, Arc<[Facts]>>,
    old: HashMap<String, Arc<[Facts]>>,
}

impl FactsCache {
    /// A cache holding at most `capacity` texts (at least 2).
    pub fn new(dialect: Dialect, capacity: usize) -> FactsCache {
        FactsCache {
            dialect,
            capacity: capacity.max(2),
            inner: Mutex::new(Generations::default()),
        }
    }

    /// The facts of `sql`, parsed at most once while cached. Parsing happens outside the lock.
    pub fn get(&self, sql: &str) -> Arc<[Facts]> {
        {
            let mut g = self.lock();
            if let Some(f) = g.young.get(sql) {
                return f.clone();
            }
            if let Some((k, f)) = g.old.remove_entry(sql) {
                let out = f.clone();
                self.insert(&mut g, k, f);
                return out;
            }
        }
        let facts: Arc<[Facts]> = analyze(sql, self.dialect).into();
        let mut g = self.lock();
        self.insert(&mut g, sql.to_owned(), facts.clone());
        facts
    }

    fn insert(&self, g: &mut Generations, key: String, facts: Arc<[Facts]>) {
        if g.young.len() >= self.capacity / 2 {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.insert(key, facts);
    }

    /// Texts currently cached (both generations).
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.young.len() + g.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // Poisoning only means a panic elsewhere mid-insert of plain maps.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    struct Case {
        sql: &'static str,
        kind: Kind,
        read: &'static [&'static str],
        written: &'static [&'static str],
        has_where: bool,
    }

    #[test]
    fn statements_are_classified_with_their_tables() {
        let cases = [
            Case {
                sql: "select * from people",
                kind: Kind::Select,
                read: &["people"],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "SELECT * FROM Public.People p JOIN \"Orders\" o ON o.id = p.id",
                kind: Kind::Select,
                read: &["Orders", "public.people"],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "insert into t (a) select a from s",
                kind: Kind::Insert,
                read: &["s"],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "update t set a = 1",
                kind: Kind::Update,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "update t set a = 1 where id = 2",
                kind: Kind::Update,
                read: &[],
                written: &["t"],
                has_where: true,
            },
            Case {
                sql: "delete from s.t where id in (select id from u)",
                kind: Kind::Delete,
                read: &["u"],
                written: &["s.t"],
                has_where: true,
            },
            Case {
                sql: "DELETE FROM t",
                kind: Kind::Delete,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "truncate t",
                kind: Kind::Delete,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "with d as (delete from t returning *) select * from d",
                kind: Kind::Delete,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "with x as (select * from a) select * from x join b on true",
                kind: Kind::Select,
                read: &["a", "b"],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "merge into t using s on t.id = s.id when matched then delete",
                kind: Kind::Merge,
                read: &["s"],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "/* x */ DROP TABLE t",
                kind: Kind::Ddl,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "-- x\ndRoP tAbLe t",
                kind: Kind::Ddl,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "create table t (a int)",
                kind: Kind::Ddl,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "alter table t add column b int",
                kind: Kind::Ddl,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "grant select on t to bob",
                kind: Kind::Dcl,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "begin",
                kind: Kind::Tcl,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "commit",
                kind: Kind::Tcl,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "set search_path = x",
                kind: Kind::Set,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "copy t to stdout",
                kind: Kind::Copy,
                read: &["t"],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "copy t from stdin",
                kind: Kind::Copy,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "prepare p as delete from t",
                kind: Kind::Delete,
                read: &[],
                written: &["t"],
                has_where: false,
            },
            Case {
                sql: "execute p",
                kind: Kind::Call,
                read: &[],
                written: &[],
                has_where: false,
            },
            Case {
                sql: "explain analyze delete from t",
                kind: Kind::Delete,
                read: &[],
                written: &["t"],
                has_where: false,
            },
        ];
        for c in cases {
            let facts = analyze(c.sql, Dialect::Postgres);
            assert_eq!(facts.len(), 1, "{}", c.sql);
            let f = &facts[0];
            assert!(!f.parse_error, "{}", c.sql);
            assert_eq!(f.kind, c.kind, "{}", c.sql);
            assert_eq!(f.tables_read, set(c.read), "{}", c.sql);
            assert_eq!(f.tables_written, set(c.written), "{}", c.sql);
            assert_eq!(f.has_where, c.has_where, "{}", c.sql);
        }
    }

    #[test]
    fn several_statements_give_several_fact_sets() {
        let facts = analyze("SELECT 1; DROP TABLE t", Dialect::Postgres);
        let kinds: Vec<Kind> = facts.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, vec![Kind::Select, Kind::Ddl]);
        assert!(analyze("", Dialect::Postgres).is_empty());
    }

    #[test]
    fn copy_program_and_functions_are_facts() {
        for sql in [
            "COPY t TO PROGRAM 'id'",
            "copy t from program 'cat /etc/passwd'",
        ] {
            let f = &analyze(sql, Dialect::Postgres)[0];
            assert!(f.copy_program, "{sql}");
            assert_eq!(f.kind, Kind::Copy);
        }
        assert!(!analyze("copy t to stdout", Dialect::Postgres)[0].copy_program);
        let f = &analyze(
            "select lo_import('/etc/passwd'), Upper(name) from t",
            Dialect::Postgres,
        )[0];
        assert_eq!(f.functions, set(&["lo_import", "upper"]));
        let f = &analyze(
            "select * from pg_read_file('/etc/passwd')",
            Dialect::Postgres,
        )[0];
        assert!(f.functions.contains("pg_read_file"), "{f:?}");
    }

    #[test]
    fn unparsable_text_is_a_parse_error_fact() {
        for sql in ["DO $$ BEGIN DELETE FROM t; END $$", "selec 1", "drop"] {
            let facts = analyze(sql, Dialect::Postgres);
            assert_eq!(facts, vec![Facts::unparsed()], "{sql}");
        }
        let deep = format!("select {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(analyze(&deep, Dialect::Postgres)[0].parse_error);
    }

    #[test]
    fn the_mysql_dialect_is_a_parameter() {
        let f = &analyze("DELETE FROM `Orders` WHERE id = 1", Dialect::MySql)[0];
        assert_eq!(f.kind, Kind::Delete);
        assert_eq!(f.tables_written, set(&["Orders"]));
        assert!(f.has_where);
    }

    #[test]
    fn the_cache_is_bounded_and_returns_the_same_facts() {
        let cache = FactsCache::new(Dialect::Postgres, 8);
        let a = cache.get("select 1");
        let b = cache.get("select 1");
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..100 {
            cache.get(&format!("select {i}"));
            assert!(cache.len() <= 8);
        }
        assert_eq!(cache.get("delete from t")[0].kind, Kind::Delete);
    }
}
