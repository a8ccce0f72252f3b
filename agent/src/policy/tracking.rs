//! Masking's strict mode: can the masked columns a statement returns be told apart by sluice?
//!
//! The masking engine matches result columns by their names in the RowDescription, so a result
//! column is *tracked* when its name is the source column's own: a plain column reference
//! (`email`, `c.email`, `email AS email`) or a wildcard, in a single SELECT over tables. Any
//! other shape (an alias, an expression, a subquery, a CTE, a set operation, a derived table, a
//! whole-row reference such as `SELECT c FROM customers c`, `row_to_json(c)`, `json_agg(c)`,
//! or a COPY, whose output has no column names) loses the name, and only the content
//! detectors stand between the value and the client.
//!
//! [`untracked`] says why a statement would return a masked column untracked, or None. It is
//! conservative: in a statement of any untracked shape, every projection that mentions a
//! masked column's name, a wildcard or a whole-row reference counts. A statement that does
//! not parse is untracked (strict targets deny what they cannot read). Never does I/O.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    CopySource, Expr, Query, SelectItem, SetExpr, Statement, TableFactor, Visit, Visitor,
};

use super::facts::Dialect;
use super::parse::{Parsed, parse};

/// Why `sql` would return a column that `masked(name)` says is masked without sluice being
/// able to recognise it by name; None when every such column is tracked (or there is none).
pub fn untracked(sql: &str, dialect: Dialect, masked: &dyn Fn(&str) -> bool) -> Option<String> {
    let Ok(statements) = parse(sql, dialect) else {
        return Some("the statement does not parse, so its columns cannot be tracked".into());
    };
    for statement in &statements {
        // A MOVE, LOCK TABLES or SHOW CREATE DATABASE returns no table rows.
        if let Parsed::Sql(statement) = statement
            && let Some(why) = statement_untracked(statement, masked)
        {
            return Some(why);
        }
    }
    None
}

fn statement_untracked(statement: &Statement, masked: &dyn Fn(&str) -> bool) -> Option<String> {
    match statement {
        Statement::Query(q) => query_untracked(q, masked),
        Statement::Copy { source, to, .. } if *to => match source {
            CopySource::Table { columns, .. } => {
                if columns.is_empty() {
                    return Some(
                        "COPY of a whole table has no column names, so masked columns cannot be tracked; list the columns".into(),
                    );
                }
                columns
                    .iter()
                    .find(|c| masked(&c.value))
                    .map(|c| format!("COPY returns masked column {} without its name", c.value))
            }
            CopySource::Query(q) => shape_untracked(q, masked, "COPY (SELECT ...)"),
        },
        _ => None,
    }
}

/// A query of the one tracked shape, or every projection of it checked.
fn query_untracked(q: &Query, masked: &dyn Fn(&str) -> bool) -> Option<String> {
    let simple = q.with.is_none()
        && match q.body.as_ref() {
            SetExpr::Select(s) => s.from.iter().all(|t| {
                matches!(t.relation, TableFactor::Table { .. })
                    && t.joins
                        .iter()
                        .all(|j| matches!(j.relation, TableFactor::Table { .. }))
            }),
            _ => false,
        };
    if !simple {
        return shape_untracked(q, masked, "a subquery, CTE, set operation or derived table");
    }
    let SetExpr::Select(select) = q.body.as_ref() else {
        return None;
    };
    let wholes = relation_names(q);
    for item in &select.projection {
        match item {
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {}
            SelectItem::UnnamedExpr(e) if column_name(e).is_some() => {
                // A bare name may be a whole-row reference (`SELECT c FROM customers c`).
                if let Some(name) = column_name(e)
                    && wholes.contains(&name.to_lowercase())
                {
                    return Some(format!(
                        "whole-row reference {name} returns every column under one name"
                    ));
                }
            }
            SelectItem::ExprWithAlias { expr, alias } => {
                if let Some(name) = column_name(expr)
                    && name.eq_ignore_ascii_case(&alias.value)
                {
                    continue;
                }
                if let Some(why) = mentions(expr, masked, &wholes) {
                    return Some(format!("{why} under the alias {}", alias.value));
                }
            }
            SelectItem::UnnamedExpr(e) => {
                if let Some(why) = mentions(e, masked, &wholes) {
                    return Some(format!("{why} inside an expression"));
                }
            }
            SelectItem::ExprWithAliases { expr, .. } => {
                if let Some(why) = mentions(expr, masked, &wholes) {
                    return Some(format!("{why} under several aliases"));
                }
            }
        }
    }
    None
}

/// In a query of an untracked shape: any projection anywhere that carries a masked column,
/// a wildcard or a whole-row reference.
fn shape_untracked(q: &Query, masked: &dyn Fn(&str) -> bool, shape: &str) -> Option<String> {
    let wholes = relation_names(q);
    let mut found = None;
    let _ = q.visit(&mut Projections {
        on_item: &mut |item: &SelectItem| {
            if found.is_some() {
                return;
            }
            found = match item {
                SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                    Some("a wildcard".to_string())
                }
                SelectItem::UnnamedExpr(e)
                | SelectItem::ExprWithAlias { expr: e, .. }
                | SelectItem::ExprWithAliases { expr: e, .. } => mentions(e, masked, &wholes),
            };
        },
    });
    found.map(|why| format!("{why} in {shape}"))
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
fn mentions(e: &Expr, masked: &dyn Fn(&str) -> bool, wholes: &BTreeSet<String>) -> Option<String> {
    let mut found = None;
    let _ = e.visit(&mut Identifiers {
        on: &mut |name: &str, whole_candidate: bool| {
            if found.is_some() {
                return;
            }
            if masked(name) {
                found = Some(format!("masked column {name}"));
            } else if whole_candidate && wholes.contains(&name.to_lowercase()) {
                found = Some(format!("whole-row reference {name}"));
            }
        },
    });
    found
}

/// Table names and aliases in the query (what a bare identifier may name as a whole row).
fn relation_names(q: &Query) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let _ = q.visit(&mut Relations { names: &mut names });
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
}

struct Identifiers<'a> {
    /// (name, may it be a whole-row reference: a bare identifier)
    on: &'a mut dyn FnMut(&str, bool),
}

impl Visitor for Identifiers<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        match e {
            Expr::Identifier(i) => (self.on)(&i.value, true),
            Expr::CompoundIdentifier(parts) => {
                if let Some(last) = parts.last() {
                    (self.on)(&last.value, false);
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Calls `on_item` for every SELECT projection item in a query, nested ones included.
struct Projections<'a> {
    on_item: &'a mut dyn FnMut(&SelectItem),
}

impl Visitor for Projections<'_> {
    type Break = ();
    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        visit_set_expr(q.body.as_ref(), self.on_item);
        ControlFlow::Continue(())
    }
}

fn visit_set_expr(s: &SetExpr, on_item: &mut dyn FnMut(&SelectItem)) {
    match s {
        SetExpr::Select(select) => {
            for item in &select.projection {
                on_item(item);
            }
        }
        SetExpr::SetOperation { left, right, .. } => {
            visit_set_expr(left, on_item);
            visit_set_expr(right, on_item);
        }
        // Nested queries are reached by the visitor itself.
        _ => {}
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
            "copy customers to stdout",
            "copy (select email from customers) to stdout",
            "copy customers (id, card_number) to stdout",
            "this is not sql",
        ] {
            assert!(check(sql).is_some(), "{sql} should be untracked");
        }
    }
}
