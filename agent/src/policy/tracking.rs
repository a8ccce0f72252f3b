//! Masking's strict mode: can the masked columns a statement reads be told apart by sluice, on
//! every road they could take out?
//!
//! The masking engine matches result columns by their names in the RowDescription, so a result
//! column is *tracked* when its name is the source column's own: a plain column reference
//! (`email`, `c.email`, `email AS email`) or a wildcard, in a single SELECT over tables. Any
//! other shape (an alias, an expression, a subquery, a CTE, a set operation, a derived table, a
//! whole-row reference such as `SELECT c FROM customers c`, `row_to_json(c)`, `json_agg(c.*)`,
//! a COPY, whose output has no column names, or a RETURNING list of those) loses the name, and
//! only the content detectors stand between the value and the client.
//!
//! A statement can also *move* a masked column instead of returning it: copy it into a table
//! (`INSERT ... SELECT`, `CREATE TABLE ... AS`, `SELECT ... INTO`, `MERGE`), into another
//! column (`UPDATE ... SET x = email`, `ON CONFLICT DO UPDATE`, a generated column, `ALTER
//! COLUMN ... USING`, a rename), into a view (whose columns are no longer the table's), into a
//! variable (MySQL's `SET @v = (SELECT ...)`, `SELECT ... INTO @v`), into a file (`COPY (...)
//! TO`, `INTO OUTFILE`), or into a routine, trigger or rule that reads it later under its own
//! name. The copy can then be read back transformed (reversed, base64) where neither a rule nor
//! a detector recognises it. On a strict target such a statement is denied; masking is not
//! propagated to the new object (sluice cannot know every object the backend creates, nor
//! keep rules for them in step), so the only copy that stays masked is the one never made.
//!
//! Decisions (and why):
//! - **Moving counts what a statement writes, not what it filters by.** A source query's
//!   projections anywhere (and VALUES rows, and `TABLE t`) count, so `INSERT INTO t SELECT id
//!   FROM customers WHERE email = 'x'` is allowed (the same oracle as a plain SELECT's WHERE);
//!   assignment values count for UPDATE / ON CONFLICT / ON DUPLICATE KEY. A wildcard in a
//!   moving statement counts as masked: sluice does not know the table's columns.
//! - **Bodies must be proven clean.** A routine body, a rule's actions, a trigger: anything
//!   there that names a masked column, a whole row (`new`, `old`, a table or alias) or a
//!   wildcard denies, wherever it appears. Bodies sluice cannot read are denied: functions in
//!   any language but SQL (plpgsql, python, ...), MySQL stored routines, triggers and events and
//!   `DO` blocks (sqlparser does not parse them), PostgreSQL triggers (their function receives
//!   whole rows), and SQL bodies that do not parse. SQL bodies are parsed (to a bounded depth).
//! - **Other statements** are denied when any expression in them names a masked column or a
//!   whole row (generated columns, defaults, checks, `CALL p((SELECT email ...))`), except
//!   DELETE (only its RETURNING returns anything) and CREATE INDEX (an index is never read back
//!   as values).
//! - **PREPARE / EXPLAIN are decided as the statement they wrap** (EXECUTE runs only what a
//!   checked PREPARE created); a cursor's query is checked like a SELECT (FETCH returns it).
//!
//! [`untracked`] says why a statement would return or move a masked column untracked, or None.
//! It is conservative: in a statement of any untracked shape, every projection that mentions a
//! masked column's name, a wildcard or a whole-row reference counts. A statement that does not
//! parse is untracked (strict targets deny what they cannot read). Never does I/O.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    AlterTableOperation, AlterViewOperation, CopySource, CopyTarget, CreateFunctionBody,
    CreateProcedureBody, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName,
    OnConflictAction, OnInsert, Query, SelectItem, SetExpr, Statement, TableFactor, Value, Visit,
    Visitor,
};
use sqlparser::parser::ParserError;

use super::facts::Dialect;
use super::parse::Parsed;

/// What a moved column's denial tells the person to do.
const MOVE_ADVICE: &str = "on a strict target masked columns leave only as query results under their own names, never copied into tables, columns, views, variables, files or routines";

/// How deep routine bodies inside routine bodies are parsed before sluice gives up (denies).
const MAX_BODY_DEPTH: usize = 4;

/// The column names strict mode must not lose (the rules' question, by name).
type Masked<'a> = &'a dyn Fn(&str) -> bool;

/// Why `sql` would return or move a column that `masked(name)` says is masked without sluice
/// being able to recognise it by name, as a clause that completes "the target masks in strict
/// mode and ..."; None when every such column is tracked (or there is none).
pub fn untracked(sql: &str, dialect: Dialect, masked: Masked<'_>) -> Option<String> {
    let Ok(statements) = parse(sql, dialect) else {
        return Some(
            "sluice cannot parse the statement, so it cannot check which masked columns it reads or where it puts them".into(),
        );
    };
    for statement in &statements {
        if let Some(why) = returned(statement, masked) {
            return Some(format!(
                "the statement would return {why}; select masked columns by their own names"
            ));
        }
        if let Some(why) = moved(statement, dialect, masked, 0) {
            return Some(format!("the statement would {why}; {MOVE_ADVICE}"));
        }
    }
    None
}

/// The statements of `sql` that have an AST, through the policy layer's one parser (its
/// fallback included). The shapes the fallback knows without an AST (a MOVE, LOCK TABLES, SHOW
/// CREATE DATABASE) return no table rows and move no data, so they have nothing to track.
fn parse(sql: &str, dialect: Dialect) -> Result<Vec<Statement>, ParserError> {
    Ok(super::parse::parse(sql, dialect)?
        .into_iter()
        .filter_map(|parsed| match parsed {
            Parsed::Sql(statement) => Some(statement),
            Parsed::Move | Parsed::Metadata => None,
        })
        .collect())
}

/// The statement PREPARE / EXPLAIN wrap (or the statement itself).
fn unwrapped(mut s: &Statement) -> &Statement {
    while let Statement::Prepare { statement, .. } | Statement::Explain { statement, .. } = s {
        s = statement;
    }
    s
}

/// Why what the statement sends back to the client (its result) carries a masked column under a
/// name that is not the column's own.
fn returned(statement: &Statement, masked: Masked<'_>) -> Option<String> {
    let statement = unwrapped(statement);
    match statement {
        Statement::Query(q) => query_untracked(q, masked),
        Statement::Copy {
            source,
            to: true,
            target: CopyTarget::Stdout,
            ..
        } => copy_untracked(source, masked),
        Statement::Declare { stmts, .. } => stmts
            .iter()
            .filter_map(|d| d.for_query.as_deref())
            .find_map(|q| query_untracked(q, masked))
            .map(|why| format!("{why} through a cursor")),
        Statement::Insert(sqlparser::ast::Insert {
            returning: Some(items),
            ..
        })
        | Statement::Update(sqlparser::ast::Update {
            returning: Some(items),
            ..
        })
        | Statement::Delete(sqlparser::ast::Delete {
            returning: Some(items),
            ..
        }) => items_untracked(items, masked, &relation_names(statement))
            .map(|why| format!("{why} in RETURNING")),
        _ => None,
    }
}

/// What a COPY ... TO takes from masked columns: COPY output has no column names.
fn copy_untracked(source: &CopySource, masked: Masked<'_>) -> Option<String> {
    match source {
        CopySource::Table { columns, .. } => {
            if columns.is_empty() {
                return Some(
                    "every column of a table through COPY, which has no column names to track; list the columns".into(),
                );
            }
            columns
                .iter()
                .find(|c| masked(&c.value))
                .map(|c| format!("masked column {} through COPY, without its name", c.value))
        }
        CopySource::Query(q) => shape_untracked(q, masked, "COPY (SELECT ...)"),
    }
}

/// A query of the one tracked shape, or every projection of it checked.
fn query_untracked(q: &Query, masked: Masked<'_>) -> Option<String> {
    let simple = q.with.is_none()
        && match q.body.as_ref() {
            SetExpr::Select(s) => s.from.iter().all(|t| {
                matches!(t.relation, TableFactor::Table { .. })
                    && t.joins
                        .iter()
                        .all(|j| matches!(j.relation, TableFactor::Table { .. }))
            }),
            // `TABLE t` is `SELECT * FROM t`.
            SetExpr::Table(_) => true,
            _ => false,
        };
    if !simple {
        return shape_untracked(q, masked, "a subquery, CTE, set operation or derived table");
    }
    let SetExpr::Select(select) = q.body.as_ref() else {
        return None;
    };
    items_untracked(&select.projection, masked, &relation_names(q))
}

/// The first item of a result list (a simple SELECT's projection, a RETURNING list) that
/// carries a masked column or a whole row under a name that is not the column's own.
fn items_untracked(
    items: &[SelectItem],
    masked: Masked<'_>,
    wholes: &BTreeSet<String>,
) -> Option<String> {
    for item in items {
        match item {
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {}
            SelectItem::UnnamedExpr(e) if column_name(e).is_some() => {
                // A bare name may be a whole-row reference (`SELECT c FROM customers c`).
                if let Some(name) = column_name(e)
                    && wholes.contains(&name.to_lowercase())
                {
                    return Some(format!(
                        "whole-row reference {name}, every column under one name"
                    ));
                }
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                if let Some(name) = column_name(expr)
                    && name.eq_ignore_ascii_case(&alias.value)
                {
                    continue;
                }
                if let Some(why) = mentions(expr, masked, wholes) {
                    return Some(format!("{why} under the alias {}", alias.value));
                }
            }
            SelectItem::UnnamedExpr(e) => {
                if let Some(why) = mentions(e, masked, wholes) {
                    return Some(format!("{why} inside an expression"));
                }
            }
            SelectItem::ExprWithAliases { expr, .. } => {
                if let Some(why) = mentions(expr, masked, wholes) {
                    return Some(format!("{why} under several aliases"));
                }
            }
        }
    }
    None
}

/// In a query of an untracked shape: any projection anywhere that carries a masked column,
/// a wildcard or a whole-row reference.
fn shape_untracked(q: &Query, masked: Masked<'_>, shape: &str) -> Option<String> {
    reads(q, masked).map(|why| format!("{why} in {shape}"))
}

/// What in `node`'s result lists (every query's projection, VALUES rows, `TABLE t`, RETURNING
/// lists of nested modifications) carries a masked column, a wildcard or a whole row.
fn reads<V: Visit>(node: &V, masked: Masked<'_>) -> Option<String> {
    let wholes = relation_names(node);
    let mut found = None;
    let _ = node.visit(&mut Projections {
        on: &mut |p: Projected<'_>| {
            if found.is_some() {
                return;
            }
            found = match p {
                Projected::Item(SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..)) => {
                    Some("a wildcard".to_string())
                }
                Projected::Item(
                    SelectItem::UnnamedExpr(e)
                    | SelectItem::ExprWithAlias { expr: e, .. }
                    | SelectItem::ExprWithAliases { expr: e, .. },
                )
                | Projected::Expr(e) => mentions(e, masked, &wholes),
                Projected::WholeTable(name) => Some(format!("every column of {name} (TABLE)")),
            };
        },
    });
    found
}

/// Why a statement (or one nested in it: a data-modifying CTE, a rule's action, a routine's
/// body) moves a masked column somewhere it is no longer tracked, as a verb phrase.
fn moved(
    statement: &Statement,
    dialect: Dialect,
    masked: Masked<'_>,
    depth: usize,
) -> Option<String> {
    let mut moves = Moves {
        dialect,
        masked,
        depth,
        found: None,
    };
    let _ = statement.visit(&mut moves);
    moves.found
}

/// One statement's own movement (nested statements are visited on their own).
fn statement_moves(
    s: &Statement,
    dialect: Dialect,
    masked: Masked<'_>,
    depth: usize,
) -> Option<String> {
    use sqlparser::ast::{Insert, Update};
    match s {
        Statement::Insert(Insert {
            table,
            source,
            assignments,
            on,
            ..
        }) => {
            let wholes = relation_names(s);
            let conflict = match on {
                Some(OnInsert::DuplicateKeyUpdate(a)) => a.as_slice(),
                Some(OnInsert::OnConflict(c)) => match &c.action {
                    OnConflictAction::DoUpdate(u) => u.assignments.as_slice(),
                    OnConflictAction::DoNothing => &[],
                },
                _ => &[],
            };
            source
                .as_deref()
                .and_then(|q| reads(q, masked))
                .or_else(|| {
                    assignments
                        .iter()
                        .chain(conflict.iter().filter(|a| !proposed_row(&a.value)))
                        .find_map(|a| mentions(&a.value, masked, &wholes))
                })
                .map(|why| format!("copy {why} into {table} (INSERT ... SELECT)"))
        }
        Statement::Update(Update {
            table,
            assignments,
            from,
            ..
        }) => {
            let wholes = relation_names(s);
            assignments
                .iter()
                .find_map(|a| mentions(&a.value, masked, &wholes))
                .or_else(|| reads(table, masked))
                .or_else(|| from.as_ref().and_then(|f| reads(f, masked)))
                .map(|why| format!("write {why} into a column (UPDATE ... SET)"))
        }
        Statement::Merge(m) => body_reads(m, masked).map(|why| format!("copy {why} with MERGE")),
        Statement::CreateTable(ct) => ct
            .query
            .as_deref()
            .and_then(|q| reads(q, masked))
            .or_else(|| expressions_mention(&ct.columns, masked))
            .or_else(|| expressions_mention(&ct.constraints, masked))
            .map(|why| format!("copy {why} into the new table {} (CREATE TABLE)", ct.name)),
        Statement::CreateView(v) => reads(v.query.as_ref(), masked).map(|why| {
            format!(
                "expose {why} through the view {}, whose columns masking does not know",
                v.name
            )
        }),
        Statement::CreateFunction(f) => function_reads(f, dialect, masked, depth)
            .map(|why| format!("create function {} that reads {why}", f.name)),
        Statement::CreateProcedure {
            name,
            language,
            body,
            ..
        } => {
            let statements = match body {
                CreateProcedureBody::As(c) => c.statements(),
                CreateProcedureBody::BeginAtomic(b) => &b.statements,
            };
            match language.as_ref().map(|l| l.value.to_lowercase()) {
                Some(l) if l != "sql" => Some(format!(
                    "create procedure {name} in {l}, whose body sluice cannot check for masked columns"
                )),
                _ => body_reads(statements, masked),
            }
            .map(|why| {
                if why.starts_with("create ") {
                    why
                } else {
                    format!("create procedure {name} that reads {why}")
                }
            })
        }
        Statement::CreateTrigger(t) => Some(format!(
            "create trigger {}, whose function runs on whole rows (NEW, OLD) and cannot be checked for masked columns",
            t.name
        )),
        Statement::CreateRule(r) => body_reads(&r.condition, masked)
            .or_else(|| body_reads(&r.action, masked))
            .map(|why| format!("create rule {} whose action reads {why}", r.name)),
        Statement::Set(set) => {
            expressions_mention(set, masked).map(|why| format!("copy {why} into a variable (SET)"))
        }
        Statement::AlterTable(a) => a
            .operations
            .iter()
            .find_map(|op| match op {
                AlterTableOperation::RenameColumn {
                    old_column_name: old,
                    ..
                }
                | AlterTableOperation::ChangeColumn { old_name: old, .. }
                    if masked(&old.value) =>
                {
                    Some(format!(
                        "rename masked column {old}, whose new name no rule masks"
                    ))
                }
                _ => None,
            })
            .or_else(|| {
                expressions_mention(&a.operations, masked)
                    .map(|why| format!("store {why} in table {} (ALTER TABLE)", a.name))
            }),
        // To STDOUT it is a result (checked by `returned`); to a file or a program, a copy.
        Statement::Copy {
            source,
            to: true,
            target,
            ..
        } if !matches!(target, CopyTarget::Stdout) => copy_untracked(source, masked)
            .map(|why| format!("write {why} to a file or program on the server (COPY ... TO)")),
        Statement::AlterView(v) => match &v.operation {
            AlterViewOperation::RenameColumn {
                old_column_name, ..
            } if masked(&old_column_name.value) => Some(format!(
                "rename masked column {old_column_name}, whose new name no rule masks"
            )),
            _ => expressions_mention(v, masked)
                .map(|why| format!("expose {why} through the view {}", v.name)),
        },
        // Returned (checked by `returned`) or nothing moved; containers' nested statements are
        // visited on their own.
        Statement::Query(_)
        | Statement::Delete(_)
        | Statement::Copy { .. }
        | Statement::Declare { .. }
        | Statement::Prepare { .. }
        | Statement::Explain { .. }
        | Statement::Execute { .. }
        | Statement::CreateIndex(_) => None,
        other => expressions_mention(other, masked)
            .map(|why| format!("pass {why} to a statement that may store it")),
    }
}

/// An upsert's value taken from the row being inserted (`excluded.email`, MySQL's
/// `VALUES(email)`): the insert's own source, checked already.
fn proposed_row(e: &Expr) -> bool {
    match e {
        Expr::CompoundIdentifier(parts) => {
            parts.len() == 2 && parts[0].value.eq_ignore_ascii_case("excluded")
        }
        Expr::Function(f) => {
            f.name.to_string().eq_ignore_ascii_case("values")
                && matches!(&f.args, FunctionArguments::List(l)
                    if l.args.len() == 1
                        && matches!(&l.args[0], FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(_)))))
        }
        _ => false,
    }
}

/// Does any SELECT in this query body (set operations included) write its rows with INTO?
fn selects_into(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_some(),
        SetExpr::SetOperation { left, right, .. } => selects_into(left) || selects_into(right),
        _ => false,
    }
}

/// A routine body's reads: what a function would read from masked columns when it runs (it
/// returns it under the function's name, or stores it, beyond sluice's sight).
fn function_reads(
    f: &sqlparser::ast::CreateFunction,
    dialect: Dialect,
    masked: Masked<'_>,
    depth: usize,
) -> Option<String> {
    let language = f.language.as_ref().map(|l| l.value.to_lowercase());
    if let Some(l) = language.as_deref()
        && l != "sql"
    {
        return Some(format!(
            "whatever its {l} body reads: sluice cannot check such a body for masked columns"
        ));
    }
    match &f.function_body {
        Some(CreateFunctionBody::AsBeforeOptions { body, .. })
        | Some(CreateFunctionBody::AsAfterOptions(body)) => {
            let Some(text) = string_literal(body) else {
                return Some("a body sluice cannot read".into());
            };
            if depth >= MAX_BODY_DEPTH {
                return Some("a body nested too deep for sluice to check".into());
            }
            let Ok(statements) = parse(text, dialect) else {
                return Some("a body sluice cannot parse".into());
            };
            statements.iter().find_map(|s| {
                body_reads(s, masked).or_else(|| moved(s, dialect, masked, depth + 1))
            })
        }
        Some(CreateFunctionBody::Return(e)) | Some(CreateFunctionBody::AsReturnExpr(e)) => {
            body_reads(e, masked)
        }
        Some(CreateFunctionBody::AsReturnSelect(s)) => body_reads(s, masked),
        Some(CreateFunctionBody::AsBeginEnd(b)) | Some(CreateFunctionBody::BeginAtomic(b)) => {
            body_reads(&b.statements, masked)
        }
        // No body here (an external symbol, a library): nothing sluice can check.
        None if f.using.is_some() => Some("code sluice cannot check".into()),
        None => None,
    }
}

/// In a body (routine, rule): anything naming a masked column, a whole row (`new`, `old`, a
/// table or alias) or a wildcard, anywhere.
fn body_reads<V: Visit>(node: &V, masked: Masked<'_>) -> Option<String> {
    let mut wholes = relation_names(node);
    wholes.extend(["new".to_string(), "old".to_string()]);
    expressions_mention_with(node, masked, &wholes).or_else(|| reads(node, masked))
}

/// Any expression anywhere in `node` naming a masked column or a whole row.
fn expressions_mention<V: Visit>(node: &V, masked: Masked<'_>) -> Option<String> {
    expressions_mention_with(node, masked, &relation_names(node))
}

fn expressions_mention_with<V: Visit>(
    node: &V,
    masked: Masked<'_>,
    wholes: &BTreeSet<String>,
) -> Option<String> {
    let mut found = None;
    let _ = node.visit(&mut Identifiers {
        on: &mut |m: Mention<'_>| {
            if found.is_none() {
                found = mention_reason(m, masked, wholes);
            }
        },
    });
    found
}

/// A string literal's text (a routine body).
fn string_literal(e: &Expr) -> Option<&str> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s)
            | Value::EscapedStringLiteral(s)
            | Value::TripleSingleQuotedString(s)
            | Value::TripleDoubleQuotedString(s)
            | Value::DoubleQuotedString(s) => Some(s),
            Value::DollarQuotedString(d) => Some(&d.value),
            _ => None,
        },
        _ => None,
    }
}

/// The last part of a plain column reference.
fn column_name(e: &Expr) -> Option<&str> {
    match e {
        Expr::Identifier(i) => Some(i.value.as_str()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.as_str()),
        Expr::Nested(inner) => column_name(inner),
        _ => None,
    }
}

/// Does `e` (subqueries included) name a masked column or a whole row?
fn mentions(e: &Expr, masked: Masked<'_>, wholes: &BTreeSet<String>) -> Option<String> {
    expressions_mention_with(e, masked, wholes)
}

fn mention_reason(m: Mention<'_>, masked: Masked<'_>, wholes: &BTreeSet<String>) -> Option<String> {
    match m {
        Mention::Column { name, bare } => {
            if masked(name) {
                Some(format!("masked column {name}"))
            } else if bare && wholes.contains(&name.to_lowercase()) {
                Some(format!("whole-row reference {name}"))
            } else {
                None
            }
        }
        Mention::WholeRow(name) => Some(format!("whole-row reference {name}.*")),
    }
}

/// Table names and aliases in `node` (what a bare identifier may name as a whole row).
fn relation_names<V: Visit>(node: &V) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let _ = node.visit(&mut Relations { names: &mut names });
    names
}

struct Relations<'a> {
    names: &'a mut BTreeSet<String>,
}

impl Visitor for Relations<'_> {
    type Break = ();
    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<()> {
        match t {
            TableFactor::Table { name, alias, .. } => {
                if let Some(last) = name.0.last() {
                    self.names.insert(last.to_string().to_lowercase());
                }
                if let Some(a) = alias {
                    self.names.insert(a.name.value.to_lowercase());
                }
            }
            TableFactor::Derived { alias: Some(a), .. } => {
                self.names.insert(a.name.value.to_lowercase());
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        // UPDATE / INSERT targets (`UPDATE customers SET note = customers`).
        if let Some(last) = relation.0.last() {
            self.names.insert(last.to_string().to_lowercase());
        }
        ControlFlow::Continue(())
    }
}

/// What an expression can name that strict mode cares about.
enum Mention<'a> {
    /// A column reference's last part; `bare` when it is a lone identifier (then it may be a
    /// whole-row reference).
    Column { name: &'a str, bare: bool },
    /// `t.*` inside an expression (`row_to_json(c.*)`, `(c.*)::text`): every column of a row.
    WholeRow(String),
}

struct Identifiers<'a> {
    on: &'a mut dyn FnMut(Mention<'_>),
}

impl Visitor for Identifiers<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(i) => (self.on)(Mention::Column {
                name: &i.value,
                bare: true,
            }),
            Expr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    (self.on)(Mention::Column {
                        name: &last.value,
                        bare: false,
                    });
                }
            }
            Expr::QualifiedWildcard(name, _) => (self.on)(Mention::WholeRow(name.to_string())),
            Expr::Function(f) => {
                // `count(*)` counts rows; `f(c.*)` passes every column of one.
                if let FunctionArguments::List(list) = &f.args {
                    for arg in &list.args {
                        if let FunctionArg::Unnamed(FunctionArgExpr::QualifiedWildcard(name))
                        | FunctionArg::Named {
                            arg: FunctionArgExpr::QualifiedWildcard(name),
                            ..
                        } = arg
                        {
                            (self.on)(Mention::WholeRow(name.to_string()));
                        }
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// What a query body puts in its result.
enum Projected<'a> {
    Item(&'a SelectItem),
    /// A VALUES row's expression.
    Expr(&'a Expr),
    /// `TABLE t`: every column of t.
    WholeTable(String),
}

/// Calls `on` for every result item of every query in a tree, nested ones included: SELECT
/// projections, VALUES rows, `TABLE t`, and the RETURNING lists of data-modifying CTEs.
struct Projections<'a> {
    on: &'a mut dyn FnMut(Projected<'_>),
}

impl Visitor for Projections<'_> {
    type Break = ();
    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        visit_set_expr(q.body.as_ref(), self.on);
        ControlFlow::Continue(())
    }
}

fn visit_set_expr(s: &SetExpr, on: &mut dyn FnMut(Projected<'_>)) {
    match s {
        SetExpr::Select(select) => {
            for item in &select.projection {
                on(Projected::Item(item));
            }
        }
        SetExpr::SetOperation { left, right, .. } => {
            visit_set_expr(left, on);
            visit_set_expr(right, on);
        }
        SetExpr::Values(values) => {
            for row in &values.rows {
                for e in row.iter() {
                    on(Projected::Expr(e));
                }
            }
        }
        SetExpr::Table(t) => on(Projected::WholeTable(
            t.table_name
                .as_ref()
                .map(|n| n.value.clone())
                .unwrap_or_default(),
        )),
        SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) => {
            let returning = match s {
                Statement::Insert(i) => i.returning.as_deref(),
                Statement::Update(u) => u.returning.as_deref(),
                Statement::Delete(d) => d.returning.as_deref(),
                _ => None,
            };
            for item in returning.unwrap_or_default() {
                on(Projected::Item(item));
            }
        }
        // Nested queries are reached by the visitor itself.
        _ => {}
    }
}

/// Checks every statement and every query in a tree for movement; stops at the first found.
struct Moves<'a> {
    dialect: Dialect,
    masked: Masked<'a>,
    depth: usize,
    found: Option<String>,
}

impl Moves<'_> {
    fn stop_if_found(&self) -> ControlFlow<()> {
        if self.found.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl Visitor for Moves<'_> {
    type Break = ();
    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<()> {
        self.found = statement_moves(s, self.dialect, self.masked, self.depth);
        self.stop_if_found()
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if selects_into(q.body.as_ref()) {
            self.found =
                reads(q, self.masked).map(|why| format!("copy {why} with SELECT ... INTO"));
        }
        self.stop_if_found()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(name: &str) -> bool {
        ["email", "ssn", "card_number"].contains(&name.to_lowercase().as_str())
    }

    fn check(sql: &str) -> Option<String> {
        untracked(sql, Dialect::Postgres, &masked)
    }

    fn check_mysql(sql: &str) -> Option<String> {
        untracked(sql, Dialect::MySql, &masked)
    }

    #[test]
    fn plain_columns_and_wildcards_over_tables_are_tracked() {
        for sql in [
            "select id, email from customers",
            "select c.email, c.name from customers c join orders o on o.customer = c.id",
            "select * from customers",
            "select c.* from customers c",
            "select email as email from customers",
            "select count(*), max(id) from customers",
            "select id + 1 as next from customers",
            "insert into t values (1)",
            "copy customers (id, name) to stdout",
            "select (select max(id) from orders) from customers",
        ] {
            assert_eq!(check(sql), None, "{sql}");
        }
    }

    #[test]
    fn mysql_show_warnings_is_tracked() {
        // Diagnostics of the previous statement, no table column: masked as rows by content.
        for sql in ["show warnings", "SHOW ERRORS", "show warnings limit 10"] {
            assert_eq!(untracked(sql, Dialect::MySql, &masked), None, "{sql}");
        }
    }

    #[test]
    fn the_known_escapes_are_untracked() {
        for sql in [
            "select email as contact from customers",
            "select lower(email) from customers",
            "select email || '' from customers",
            "select substr(ssn, 1, 3) from customers",
            "select (select email from customers limit 1)",
            "with x as (select email from customers) select * from x",
            "select email from customers union all select name from people",
            "select * from (select * from customers) s",
            "select c from customers c",
            "select row_to_json(c) from customers c",
            "select json_agg(c) from customers c",
            "select row_to_json(c.*) from customers c",
            "select (c.*)::text from customers c",
            "copy customers to stdout",
            "copy (select email from customers) to stdout",
            "copy customers (id, card_number) to stdout",
            "this is not sql",
            // What a prepared statement or a cursor would return later.
            "prepare p as select lower(email) from customers",
            "declare c cursor for select reverse(email) from customers",
            // RETURNING is a result too.
            "delete from customers where id = 1 returning lower(email)",
            "update customers set name = 'x' returning email as e",
            "with x as (delete from customers returning reverse(email) as e) select e from x",
        ] {
            assert!(check(sql).is_some(), "{sql} should be untracked");
        }
    }

    #[test]
    fn statements_that_copy_masked_columns_elsewhere_are_untracked_in_postgres() {
        for sql in [
            "insert into t select email from customers",
            "insert into t (a) select * from customers",
            "insert into t select row_to_json(c.*) from customers c",
            "insert into t values ((select ssn from customers limit 1))",
            "insert into t table customers",
            "insert into customers (id) values (1) on conflict (id) do update set name = customers.email",
            "create table t as select email from customers",
            "create temp table t as select reverse(card_number) as x from customers",
            "create table t as table customers",
            "create table t (id int, e text generated always as (reverse(email)) stored)",
            "select email into t from customers",
            "select * into temp t from customers",
            "create view v as select email from customers",
            "create view v (contact) as select email from customers",
            "create materialized view v as select id, ssn from customers",
            "create view v as select * from customers",
            "update customers set name = email",
            "update customers set name = (select email from customers c2 where c2.id = customers.id)",
            "update t set x = s.c from (select email as c from customers) s where s.id = t.id",
            "merge into t using customers c on t.id = c.id when not matched then insert values (c.email)",
            "with x as (insert into t select email from customers returning 1) select * from x",
            "with x as (update t set a = (select ssn from customers limit 1) returning 1) select count(*) from x",
            "prepare p as insert into t select email from customers",
            "explain analyze create table t as select email from customers",
            "copy (select email from customers) to '/tmp/x'",
            "copy (select reverse(ssn) from customers) to program 'cat'",
            "create function f() returns text language sql as $$ select email from customers limit 1 $$",
            "create function f() returns setof customers language sql as 'select * from customers'",
            "create function f() returns text return (select email from customers limit 1)",
            "create function f() returns text begin atomic select ssn from customers; end",
            "create function f() returns int language plpgsql as $$ begin return 1; end $$",
            "create function f() returns int language plpython3u as 'return 1'",
            "create function f() returns int language sql as 'not sql at all'",
            "create procedure p() language sql begin atomic insert into t select email from customers; end",
            "create procedure p() as $$ select 1 $$ language sql",
            "create trigger tr after insert on t for each row execute function f()",
            "create rule r as on insert to t do also insert into log values (new.email)",
            "create rule r as on update to customers do also insert into log select new.*",
            "create rule r as on insert to t do also insert into log values (new)",
            "do $$ begin insert into t select email from customers; end $$",
            "alter table customers rename column email to contact",
            "alter table customers add column e2 text generated always as (reverse(email)) stored",
            "alter table customers alter column email type text using reverse(email)",
            "alter view v rename column ssn to x",
            "call p((select email from customers limit 1))",
        ] {
            let why = check(sql);
            assert!(why.is_some(), "{sql} should be denied");
        }
    }

    #[test]
    fn statements_that_copy_masked_columns_elsewhere_are_untracked_in_mysql() {
        for sql in [
            "insert into t select email from customers",
            "replace into t select ssn from customers",
            "insert into t (a) values (1) on duplicate key update a = email",
            "create table t select email from customers",
            "create table t as select * from customers",
            "create view v as select email from customers",
            "create view v (c) as select card_number from customers",
            "update customers set note = email",
            "update customers c join t on t.id = c.id set t.x = c.email",
            "select email into @e from customers limit 1",
            "set @e = (select email from customers limit 1)",
            "select @e := email from customers",
            "alter table customers change email contact text",
            "alter table customers rename column ssn to x",
            // sqlparser reads none of these, so strict mode cannot check them.
            "select email into outfile '/tmp/x' from customers",
            "select email from customers into outfile '/tmp/x'",
            "select email into dumpfile '/tmp/x' from customers",
            "select email from customers limit 1 into @e",
            "create procedure p() begin select email from customers; end",
            "create function f() returns text deterministic return (select email from customers limit 1)",
            "create trigger tr after insert on customers for each row insert into log values (new.email)",
            "create event e on schedule every 1 hour do insert into log select email from customers",
            "prepare s from 'select lower(email) from customers'",
            "prepare s from @q",
            "do (select email from customers)",
        ] {
            assert!(check_mysql(sql).is_some(), "{sql} should be denied");
        }
    }

    #[test]
    fn harmless_writes_and_definitions_are_allowed() {
        for sql in [
            "insert into t values (1, 'x')",
            "insert into t (a, b) select id, name from customers",
            "insert into t select id from customers where email = 'x'",
            "insert into customers (id, email) values (3, 'new@example.com') returning id, email",
            "create table t (id int, email text)",
            "create table t (like customers)",
            "create temp table t as select id, name from customers",
            "create view v as select id, name from customers",
            "create view v as select id from customers where ssn is not null",
            "update customers set name = 'x' where email = 'ada@example.com'",
            "update customers set email = 'new@example.com' where id = 1",
            "delete from customers where email = 'ada@example.com'",
            "delete from customers where id = 1 returning id, email",
            "insert into customers (id, email) values (1, 'a@example.com') on conflict (id) do update set email = excluded.email",
            "select count(*) into t from customers",
            "create function f(x int) returns int language sql immutable as 'select x + 1'",
            "create function f() returns bigint language sql as $$ select count(*) from customers $$",
            "create index on customers (email)",
            "alter table customers add column e2 text",
            "alter table customers rename column name to full_name",
            "prepare p as select id, email from customers",
            "execute p",
            "declare c cursor for select id, email from customers",
            "comment on column customers.email is 'contact'",
            "set search_path = public",
            "begin",
            "copy customers (id, name) to '/tmp/x'",
        ] {
            assert_eq!(check(sql), None, "{sql}");
        }
        for sql in [
            "insert into t values (1, 'x')",
            "insert into t (a) select id from customers",
            "create table t (id int, email varchar(80))",
            "create table t like customers",
            "create view v as select id, name from customers",
            "select count(*) into @n from customers",
            "set @n = 1",
            "update customers set name = 'x' where email = 'a'",
            "insert into customers (id, email) values (1, 'a@example.com') on duplicate key update email = values(email)",
        ] {
            assert_eq!(check_mysql(sql), None, "{sql}");
        }
    }

    #[test]
    fn routine_bodies_nested_in_bodies_are_parsed_to_a_bounded_depth() {
        let mut body = "select 1".to_string();
        for _ in 0..10 {
            body = format!(
                "create function f() returns int language sql as '{}'",
                body.replace('\'', "''")
            );
        }
        let why = check(&body).unwrap_or_default();
        assert!(why.contains("too deep"), "{why}");
        // Two levels are read.
        assert_eq!(
            check(
                "create function f() returns int language sql as 'create function g() returns int language sql as ''select 1'''"
            ),
            None
        );
    }

    #[test]
    fn denials_say_what_moved_and_what_to_do() {
        let why = check("create table t as select email from customers").unwrap_or_default();
        assert!(
            why.contains("masked column email") && why.contains("CREATE TABLE"),
            "{why}"
        );
        assert!(why.contains("never copied into tables"), "{why}");
        let why = check("select lower(email) from customers").unwrap_or_default();
        assert!(
            why.contains("select masked columns by their own names"),
            "{why}"
        );
    }
}
