//! Parsing statement texts for policy and masking: sqlparser, plus the few statement shapes
//! real clients send that sqlparser 0.64 refuses and sluice recognises itself.
//!
//! [`parse`] is the one entry point ([`super::facts`] and [`super::tracking`] both call it).
//! A text sqlparser parses is taken as sqlparser parses it. Only when it refuses the text does
//! the fallback run: the text is parsed statement by statement exactly as sqlparser's own
//! `parse_statements` does, except that a statement whose *whole* token sequence (up to `;` or
//! the end) has one of the shapes below is taken by sluice. Every other statement still goes
//! through sqlparser, so one statement nobody recognises leaves the whole text unparsed.
//!
//! Recognised shapes, PostgreSQL dialect (each PostgreSQL's grammar for it, complete):
//! - `FETCH [direction] [FROM | IN] cursor` and `MOVE [direction] [FROM | IN] cursor`, where
//!   direction is `NEXT | PRIOR | FIRST | LAST | ABSOLUTE n | RELATIVE n | n | ALL | FORWARD
//!   [n | ALL] | BACKWARD [n | ALL]` and `n` a signed integer. sqlparser demands `FROM`/`IN` and
//!   a count after FORWARD/BACKWARD, so `FETCH ALL c`, `FETCH NEXT c`, `FETCH c` and `FETCH
//!   FORWARD FROM c` (psycopg, JDBC and psql write such forms) are refused by it. A FETCH
//!   becomes the `Statement::Fetch` sqlparser builds for the same FETCH written with `FROM`;
//!   a MOVE (no AST in sqlparser) is [`Parsed::Move`]. Neither changes data: they read or
//!   reposition a cursor whose query was decided when it was DECLAREd.
//!
//! MySQL dialect (what mysqldump and the mariadb CLI send; see `mysql_shape`):
//! `SHOW {PROCEDURE | FUNCTION | PACKAGE [BODY]} STATUS {LIKE 'p' | WHERE expr}` (taken as
//! sqlparser's `SHOW STATUS` with the same filter), `SHOW CREATE {DATABASE | SCHEMA} name` and
//! `LOCK TABLES` naming `db.table` ([`Parsed::Metadata`]).
//!
//! What the fallback must never do: accept a statement it has not matched token for token
//! (a near miss, such as `FETCH ALL c INTO t`, `FETCH 1.5 c` or `FETCH ALL c; DROP TABLE t` with
//! an unparsable DROP, stays unparsed), or take a statement sqlparser would read. It works on
//! sqlparser's own tokens, so comments, quoted names and dollar quoting are sqlparser's.
//!
//! MariaDB's executable comments (`/*M!100100 ... */`, run by MariaDB servers as code) are read
//! as code in the MySQL dialect, as sqlparser already does for MySQL's `/*! ... */`: otherwise
//! `/*M! DROP TABLE t */` would be an empty text to policy and a DROP to the server.
//!
//! Never panics, never does I/O; the fallback costs a second tokenization only for texts
//! sqlparser refuses (results are cached by the callers' caches).

use sqlparser::ast::{FetchDirection, FetchPosition, Ident, Statement, Value, ValueWithSpan};
use sqlparser::dialect::{Dialect as SqlDialect, MySqlDialect, PostgreSqlDialect};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Span, Token, TokenWithSpan, Tokenizer, Whitespace};

use super::facts::Dialect;

/// One statement of a text.
///
/// Not boxed: nearly every statement is `Sql`, a `Parsed` lives only while one request is
/// judged, and the callers match on the statement's shape, which a box would hide.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// sqlparser's AST: parsed by sqlparser, or a recognised shape given the AST sqlparser
    /// builds for its equivalent form.
    Sql(Statement),
    /// `MOVE ...`: repositions a cursor; returns no rows and changes no data.
    Move,
    /// A MySQL statement sqlparser has no AST for that reads only server metadata or takes
    /// table locks, and changes no data: `SHOW CREATE DATABASE`, `LOCK TABLES` of qualified
    /// names.
    Metadata,
}

/// The longest statement the fallback looks at, in tokens (a LOCK TABLES of many tables).
const MAX_SHAPE_TOKENS: usize = 4096;

/// The statements of `sql` in order (see the module doc), or sqlparser's error when some
/// statement is neither sqlparser's nor a recognised shape.
pub fn parse(sql: &str, dialect: Dialect) -> Result<Vec<Parsed>, ParserError> {
    let d: &dyn SqlDialect = match dialect {
        Dialect::Postgres => &PostgreSqlDialect {},
        Dialect::MySql => &MySqlDialect {},
    };
    let mariadb_code = dialect == Dialect::MySql && sql.contains("/*M!");
    let mut refused = None;
    if !mariadb_code {
        match Parser::parse_sql(d, sql) {
            Ok(statements) => return Ok(statements.into_iter().map(Parsed::Sql).collect()),
            Err(e) => refused = Some(e),
        }
    }
    let mut tokens = Tokenizer::new(d, sql)
        .with_unescape(true)
        .tokenize_with_location()?;
    if mariadb_code {
        tokens = mariadb_comments_as_code(d, tokens)?;
        match Parser::new(d)
            .with_tokens_with_locations(tokens.clone())
            .parse_statements()
        {
            Ok(statements) => return Ok(statements.into_iter().map(Parsed::Sql).collect()),
            Err(e) => refused = Some(e),
        }
    }
    statements(d, dialect, tokens).map_err(|e| refused.unwrap_or(e))
}

/// Whether any statement of the MySQL text `sql` is `LOAD {DATA | XML} [LOW_PRIORITY |
/// CONCURRENT] LOCAL ...` (the server would ask the client for one of its files). Read from
/// sqlparser's MySQL tokens, so comments between the words, executable comments (`/*!`,
/// `/*M!`), any case and spacing, and a LOAD after other statements of a multi-statement text
/// are all seen; words inside strings and quoted names are not. A text that does not tokenize
/// counts as loading when it holds the words `load` and `local` anywhere (fail closed).
pub fn loads_local_file(sql: &str) -> bool {
    let d = MySqlDialect {};
    let tokens = Tokenizer::new(&d, sql)
        .with_unescape(true)
        .tokenize_with_location()
        .map_err(ParserError::from)
        .and_then(|t| mariadb_comments_as_code(&d, t));
    let Ok(tokens) = tokens else {
        let lower = sql.to_ascii_lowercase();
        return lower.contains("load") && lower.contains("local");
    };
    let words: Vec<&Token> = tokens
        .iter()
        .map(|t| &t.token)
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    words
        .split(|t| **t == Token::SemiColon)
        .any(|statement| match statement {
            [load, what, rest @ ..]
                if bare(load, "load") && (bare(what, "data") || bare(what, "xml")) =>
            {
                let rest = match rest {
                    [priority, rest @ ..]
                        if bare(priority, "low_priority") || bare(priority, "concurrent") =>
                    {
                        rest
                    }
                    _ => rest,
                };
                rest.first().is_some_and(|t| bare(t, "local"))
            }
            _ => false,
        })
}

/// `/*M!NNNNNN code */` comments replaced by the tokens of `code` (MySQL's `/*!` rule).
fn mariadb_comments_as_code(
    d: &dyn SqlDialect,
    tokens: Vec<TokenWithSpan>,
) -> Result<Vec<TokenWithSpan>, ParserError> {
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        match &t.token {
            Token::Whitespace(Whitespace::MultiLineComment(c)) if c.starts_with("M!") => {
                // `/*!...*/` is what sqlparser's MySQL tokenizer already reads as code.
                let code = format!("/*{}*/", &c[1..]);
                out.extend(
                    Tokenizer::new(d, &code)
                        .with_unescape(true)
                        .tokenize_with_location()?
                        .into_iter()
                        .filter(|t| t.token != Token::EOF),
                );
            }
            _ => out.push(t),
        }
    }
    Ok(out)
}

/// sqlparser's statement loop over `tokens`, trying the recognised shapes at each statement's
/// start.
fn statements(
    d: &dyn SqlDialect,
    dialect: Dialect,
    tokens: Vec<TokenWithSpan>,
) -> Result<Vec<Parsed>, ParserError> {
    let mut p = Parser::new(d).with_tokens_with_locations(tokens);
    let mut out = Vec::new();
    loop {
        while p.consume_token(&Token::SemiColon) {}
        if p.peek_token_ref().token == Token::EOF {
            return Ok(out);
        }
        match recognise(&p, d, dialect) {
            Some((parsed, used)) => {
                for _ in 0..used {
                    p.advance_token();
                }
                out.push(parsed);
            }
            None => out.push(Parsed::Sql(p.parse_statement()?)),
        }
        if !matches!(p.peek_token_ref().token, Token::SemiColon | Token::EOF) {
            return Err(ParserError::ParserError(format!(
                "expected end of statement, found {}",
                p.peek_token_ref().token
            )));
        }
    }
}

/// A recognised statement at the parser's position and how many (non-whitespace) tokens it
/// spans, or None.
fn recognise(p: &Parser<'_>, d: &dyn SqlDialect, dialect: Dialect) -> Option<(Parsed, usize)> {
    let mut words: Vec<&Token> = Vec::new();
    loop {
        let t = &p.peek_nth_token_ref(words.len()).token;
        if matches!(t, Token::SemiColon | Token::EOF) {
            break;
        }
        if words.len() == MAX_SHAPE_TOKENS {
            return None;
        }
        words.push(t);
    }
    let parsed = match dialect {
        Dialect::Postgres => postgres_shape(&words)?,
        Dialect::MySql => mysql_shape(d, &words)?,
    };
    Some((parsed, words.len()))
}

/// FETCH and MOVE (see the module doc), all of `words`.
fn postgres_shape(words: &[&Token]) -> Option<Parsed> {
    let (first, rest) = words.split_first()?;
    // sqlparser has no MOVE keyword: the word itself, unquoted.
    let is_move = bare(first, "move");
    let parsed = match keyword(first)? {
        _ if is_move => {
            cursor_command(rest)?;
            Parsed::Move
        }
        Keyword::FETCH => {
            let (direction, position, name) = cursor_command(rest)?;
            Parsed::Sql(Statement::Fetch {
                name,
                direction,
                position,
                into: None,
            })
        }
        _ => return None,
    };
    Some(parsed)
}

/// MySQL/MariaDB statements mysqldump and the mariadb CLI send that sqlparser refuses, all of
/// `words`:
/// - `SHOW {PROCEDURE | FUNCTION | PACKAGE | PACKAGE BODY} STATUS [LIKE 'p' | WHERE expr]`
///   becomes the `Statement::ShowStatus` sqlparser builds for `SHOW STATUS` with the same
///   filter (both list server metadata; a WHERE's expression, parsed by sqlparser, keeps its
///   subqueries and functions as facts);
/// - `SHOW CREATE {DATABASE | SCHEMA} [IF NOT EXISTS] name` is [`Parsed::Metadata`];
/// - `LOCK {TABLES | TABLE} t [[AS] a] lock [, ...]` where some `t` is qualified (`mysql.proc`:
///   sqlparser takes only a bare name) is [`Parsed::Metadata`], as sqlparser's own
///   `LOCK TABLES` is kind `other` with no tables.
fn mysql_shape(d: &dyn SqlDialect, words: &[&Token]) -> Option<Parsed> {
    let kw = |i: usize| words.get(i).and_then(|t| keyword(t));
    match kw(0)? {
        Keyword::SHOW => {
            let status_at = match (kw(1)?, kw(2)) {
                (Keyword::PROCEDURE | Keyword::FUNCTION, _) => 2,
                (Keyword::PACKAGE, _) if words.get(2).is_some_and(|t| bare(t, "body")) => 3,
                (Keyword::PACKAGE, _) => 2,
                (Keyword::CREATE, Some(Keyword::DATABASE | Keyword::SCHEMA)) => {
                    let name = match (kw(3), kw(4), kw(5)) {
                        (Some(Keyword::IF), Some(Keyword::NOT), Some(Keyword::EXISTS)) => 6,
                        _ => 3,
                    };
                    return (words.len() == name + 1 && matches!(words[name], Token::Word(_)))
                        .then_some(Parsed::Metadata);
                }
                _ => return None,
            };
            if kw(status_at)? != Keyword::STATUS {
                return None;
            }
            let rest: Vec<Token> = words[status_at + 1..].iter().map(|&t| t.clone()).collect();
            let mut sub = Parser::new(d).with_tokens(rest);
            let filter = sub.parse_show_statement_filter().ok()?;
            (sub.peek_token_ref().token == Token::EOF).then_some(Parsed::Sql(
                Statement::ShowStatus {
                    filter,
                    global: false,
                    session: false,
                },
            ))
        }
        Keyword::LOCK if matches!(kw(1)?, Keyword::TABLES | Keyword::TABLE) => {
            lock_tables(&words[2..]).then_some(Parsed::Metadata)
        }
        _ => None,
    }
}

/// `t [[AS] a] lock [, ...]`, all of `tokens`: `t` a name or `db.name`; lock `READ [LOCAL]`,
/// `[LOW_PRIORITY] WRITE` or `WRITE CONCURRENT`.
fn lock_tables(tokens: &[&Token]) -> bool {
    let name = |t: &Token| matches!(t, Token::Word(_));
    let mut i = 0;
    loop {
        // The table, maybe qualified.
        if !tokens.get(i).is_some_and(|t| name(t)) {
            return false;
        }
        i += 1;
        if tokens.get(i) == Some(&&Token::Period) {
            if !tokens.get(i + 1).is_some_and(|t| name(t)) {
                return false;
            }
            i += 2;
        }
        let kw = |i: usize| tokens.get(i).and_then(|t| keyword(t));
        // An alias: AS name, or a name that is not a lock type.
        if kw(i) == Some(Keyword::AS) {
            if !tokens.get(i + 1).is_some_and(|t| name(t)) {
                return false;
            }
            i += 2;
        } else if tokens.get(i).is_some_and(|t| name(t))
            && !matches!(
                kw(i),
                Some(Keyword::READ | Keyword::WRITE | Keyword::LOW_PRIORITY)
            )
        {
            i += 1;
        }
        i += match (kw(i), kw(i + 1)) {
            (Some(Keyword::READ), Some(Keyword::LOCAL)) => 2,
            (Some(Keyword::READ), _) => 1,
            (Some(Keyword::LOW_PRIORITY), Some(Keyword::WRITE)) => 2,
            (Some(Keyword::WRITE), _)
                if tokens.get(i + 1).is_some_and(|t| bare(t, "concurrent")) =>
            {
                2
            }
            (Some(Keyword::WRITE), _) => 1,
            _ => return false,
        };
        match tokens.get(i) {
            None => return true,
            Some(Token::Comma) => i += 1,
            Some(_) => return false,
        }
    }
}

/// Whether `t` is the unquoted word `word` (for words sqlparser has no keyword for).
fn bare(t: &Token, word: &str) -> bool {
    matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// The keyword of an unquoted word.
fn keyword(t: &Token) -> Option<Keyword> {
    match t {
        Token::Word(w) if w.quote_style.is_none() => Some(w.keyword),
        _ => None,
    }
}

/// `[direction] [FROM | IN] cursor`, all of `tokens`.
fn cursor_command(tokens: &[&Token]) -> Option<(FetchDirection, FetchPosition, Ident)> {
    let with_direction = direction(tokens).and_then(|(direction, used)| {
        cursor(&tokens[used..]).map(|(position, name)| (direction, position, name))
    });
    // Without a direction PostgreSQL fetches the NEXT row.
    with_direction
        .or_else(|| cursor(tokens).map(|(position, name)| (FetchDirection::Next, position, name)))
}

/// A direction at the start of `tokens`, and how many tokens it uses.
fn direction(tokens: &[&Token]) -> Option<(FetchDirection, usize)> {
    let first = tokens.first()?;
    let after = &tokens[1..];
    let Some(k) = keyword(first) else {
        return count(tokens).map(|(limit, used)| (FetchDirection::Count { limit }, used));
    };
    Some(match k {
        Keyword::NEXT => (FetchDirection::Next, 1),
        Keyword::PRIOR => (FetchDirection::Prior, 1),
        Keyword::FIRST => (FetchDirection::First, 1),
        Keyword::LAST => (FetchDirection::Last, 1),
        Keyword::ALL => (FetchDirection::All, 1),
        Keyword::ABSOLUTE => {
            let (limit, used) = count(after)?;
            (FetchDirection::Absolute { limit }, 1 + used)
        }
        Keyword::RELATIVE => {
            let (limit, used) = count(after)?;
            (FetchDirection::Relative { limit }, 1 + used)
        }
        Keyword::FORWARD | Keyword::BACKWARD => {
            let forward = k == Keyword::FORWARD;
            if after.first().and_then(|t| keyword(t)) == Some(Keyword::ALL) {
                let d = if forward {
                    FetchDirection::ForwardAll
                } else {
                    FetchDirection::BackwardAll
                };
                (d, 2)
            } else {
                let (limit, used) = match count(after) {
                    Some((limit, used)) => (Some(limit), used),
                    None => (None, 0),
                };
                let d = if forward {
                    FetchDirection::Forward { limit }
                } else {
                    FetchDirection::Backward { limit }
                };
                (d, 1 + used)
            }
        }
        _ => return None,
    })
}

/// A signed integer at the start of `tokens` (PostgreSQL's SignedIconst), and its length.
fn count(tokens: &[&Token]) -> Option<(ValueWithSpan, usize)> {
    let integer = |t: &Token| match t {
        Token::Number(n, false) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            Some(n.clone())
        }
        _ => None,
    };
    let (text, used) = match tokens.first()? {
        Token::Minus => (format!("-{}", integer(tokens.get(1)?)?), 2),
        Token::Plus => (integer(tokens.get(1)?)?, 2),
        t => (integer(t)?, 1),
    };
    Some((Value::Number(text, false).with_empty_span(), used))
}

/// `[FROM | IN] cursor`, all of `tokens`.
fn cursor(tokens: &[&Token]) -> Option<(FetchPosition, Ident)> {
    let (position, name) = match tokens {
        [name] => (FetchPosition::From, name),
        [from, name] if keyword(from) == Some(Keyword::FROM) => (FetchPosition::From, name),
        [from, name] if keyword(from) == Some(Keyword::IN) => (FetchPosition::In, name),
        _ => return None,
    };
    let Token::Word(w) = name else {
        return None;
    };
    let reserved =
        w.quote_style.is_none() && matches!(w.keyword, Keyword::ALL | Keyword::FROM | Keyword::IN);
    if reserved {
        return None;
    }
    Some((
        position,
        Ident {
            value: w.value.clone(),
            quote_style: w.quote_style,
            span: Span::empty(),
        },
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pg(sql: &str) -> Result<Vec<Parsed>, ParserError> {
        parse(sql, Dialect::Postgres)
    }

    #[test]
    fn every_postgresql_fetch_form_sqlparser_refuses_becomes_the_fetch_it_builds_with_from() {
        let cases = [
            ("FETCH ALL c", "FETCH ALL FROM c"),
            ("fetch all c", "FETCH ALL FROM c"),
            ("FETCH c", "FETCH NEXT FROM c"),
            ("FETCH NEXT c", "FETCH NEXT FROM c"),
            ("FETCH PRIOR c", "FETCH PRIOR FROM c"),
            ("FETCH FIRST c", "FETCH FIRST FROM c"),
            ("FETCH LAST c", "FETCH LAST FROM c"),
            ("FETCH 5 c", "FETCH 5 FROM c"),
            ("FETCH -2 c", "FETCH -2 FROM c"),
            ("FETCH ABSOLUTE 3 c", "FETCH ABSOLUTE 3 FROM c"),
            ("FETCH RELATIVE -1 c", "FETCH RELATIVE -1 FROM c"),
            ("FETCH FORWARD c", "FETCH FORWARD FROM c"),
            ("FETCH FORWARD FROM c", "FETCH FORWARD FROM c"),
            ("FETCH FORWARD ALL c", "FETCH FORWARD ALL FROM c"),
            ("FETCH FORWARD 10 c", "FETCH FORWARD 10 FROM c"),
            ("FETCH BACKWARD c", "FETCH BACKWARD FROM c"),
            ("FETCH BACKWARD +2 IN c", "FETCH BACKWARD 2 IN c"),
            ("FETCH BACKWARD ALL c", "FETCH BACKWARD ALL FROM c"),
            ("FETCH IN c", "FETCH NEXT IN c"),
            ("FETCH FROM \"My Cursor\"", "FETCH NEXT FROM \"My Cursor\""),
            ("/* psql */ FETCH ALL -- rest\n c ;", "FETCH ALL FROM c"),
        ];
        for (sql, canonical) in cases {
            assert!(
                Parser::parse_sql(&PostgreSqlDialect {}, sql).is_err(),
                "{sql}: sqlparser parses it; the fallback is not needed"
            );
            let parsed = pg(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert_eq!(parsed.len(), 1, "{sql}");
            let Parsed::Sql(fetch @ Statement::Fetch { into: None, .. }) = &parsed[0] else {
                panic!("{sql}: {parsed:?}");
            };
            assert_eq!(fetch.to_string(), canonical, "{sql}");
            // Where sqlparser reads the canonical form, it builds the same statement.
            if let Ok(own) = Parser::parse_sql(&PostgreSqlDialect {}, canonical) {
                assert_eq!(own.len(), 1);
                assert_eq!(own[0].to_string(), fetch.to_string(), "{sql}");
            }
        }
    }

    #[test]
    fn move_in_every_direction_is_a_move() {
        for sql in [
            "MOVE c",
            "MOVE NEXT IN c",
            "MOVE ALL c",
            "move forward 5 from c",
            "MOVE BACKWARD ALL FROM c",
            "MOVE ABSOLUTE -1 c",
            "MOVE FIRST c",
        ] {
            assert_eq!(pg(sql).unwrap(), vec![Parsed::Move], "{sql}");
        }
    }

    #[test]
    fn a_text_mixing_recognised_and_ordinary_statements_keeps_both_in_order() {
        let parsed = pg("BEGIN; DECLARE c CURSOR FOR SELECT * FROM t; FETCH ALL c; MOVE FIRST c; CLOSE c; COMMIT").unwrap();
        let names: Vec<String> = parsed
            .iter()
            .map(|p| match p {
                Parsed::Sql(s) => s.to_string().split(' ').next().unwrap().to_string(),
                Parsed::Move => "MOVE".into(),
                Parsed::Metadata => "metadata".into(),
            })
            .collect();
        assert_eq!(
            names,
            ["BEGIN", "DECLARE", "FETCH", "MOVE", "CLOSE", "COMMIT"]
        );
    }

    #[test]
    fn near_misses_stay_unparsed() {
        for sql in [
            "FETCH",
            "FETCH ALL",
            "FETCH ALL FROM",
            "FETCH FROM",
            "FETCH ALL c INTO t",
            "FETCH ALL c d",
            "FETCH 1.5 c",
            "FETCH 1e3 c",
            "FETCH - c",
            "FETCH ABSOLUTE c",
            "FETCH RELATIVE ALL c",
            "FETCH FORWARD ALL 3 c",
            "FETCH ALL 'c'",
            "FETCH ALL c.d",
            "FETCH ALL (c)",
            "FETCH ALL c, d",
            "FETCH FROM FROM c",
            "FETCH ALL IN",
            "MOVE",
            "MOVE ALL c; DELETE",
            "FETCH ALL c; DO $$ BEGIN DELETE FROM t; END $$",
            "FETCH ALL c DELETE FROM t",
            "FETCH ALL c; selec 1",
            "FETCH FORWARD FORWARD FORWARD FORWARD FORWARD FORWARD FORWARD FORWARD c",
        ] {
            assert!(pg(sql).is_err(), "{sql} must stay unparsed: {:?}", pg(sql));
        }
    }

    #[test]
    fn texts_sqlparser_parses_are_its_own() {
        let sql = "SELECT 1; FETCH ALL FROM c; CLOSE c";
        let parsed = pg(sql).unwrap();
        let own: Vec<Parsed> = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .unwrap()
            .into_iter()
            .map(Parsed::Sql)
            .collect();
        assert_eq!(parsed, own);
    }

    #[test]
    fn fetch_and_move_are_postgresql_only() {
        assert!(parse("FETCH ALL c", Dialect::MySql).is_err());
        assert!(parse("MOVE ALL c", Dialect::MySql).is_err());
    }

    #[test]
    fn mysqldump_and_mariadb_cli_statements_sqlparser_refuses_are_recognised() {
        let my = |sql: &str| parse(sql, Dialect::MySql);
        for sql in [
            "SHOW CREATE DATABASE shop",
            "show create schema if not exists `shop`",
            "LOCK TABLES mysql.proc READ",
            "LOCK TABLES mysql.event READ LOCAL, `shop`.`people` AS p WRITE, t2 LOW_PRIORITY WRITE",
            "LOCK TABLE a.b x WRITE CONCURRENT",
        ] {
            assert!(
                Parser::parse_sql(&MySqlDialect {}, sql).is_err(),
                "{sql}: sqlparser parses it"
            );
            assert_eq!(my(sql).unwrap(), vec![Parsed::Metadata], "{sql}");
        }
        for (sql, filter) in [
            (
                "SHOW PROCEDURE STATUS WHERE Db = 'shop'",
                " WHERE Db = 'shop'",
            ),
            (
                "SHOW FUNCTION STATUS WHERE Db = 'shop'",
                " WHERE Db = 'shop'",
            ),
            (
                "SHOW PACKAGE BODY STATUS WHERE Db = 'shop'",
                " WHERE Db = 'shop'",
            ),
            (
                "show package status where Db = 'shop'",
                " WHERE Db = 'shop'",
            ),
        ] {
            assert!(
                Parser::parse_sql(&MySqlDialect {}, sql).is_err(),
                "{sql}: sqlparser parses it"
            );
            let parsed = my(sql).unwrap();
            let Parsed::Sql(s @ Statement::ShowStatus { .. }) = &parsed[0] else {
                panic!("{sql}: {parsed:?}");
            };
            assert_eq!(s.to_string(), format!("SHOW STATUS{filter}"), "{sql}");
        }
        // A subquery in the filter stays a fact.
        let parsed = my("SHOW FUNCTION STATUS WHERE Db IN (SELECT name FROM secrets)").unwrap();
        assert!(parsed[0] != Parsed::Metadata);
        for sql in [
            "SHOW CREATE DATABASE",
            "SHOW CREATE DATABASE a b",
            "SHOW PROCEDURE STATUS WHERE",
            "SHOW PROCEDURE STATUS LIKE x y",
            "SHOW PROCEDURE",
            "SHOW PACKAGE BODY",
            "LOCK TABLES mysql.proc",
            "LOCK TABLES mysql.proc READ,",
            "LOCK TABLES mysql.proc READ x",
            "LOCK TABLES mysql. READ",
            "LOCK TABLES a.b.c READ",
            "LOCK TABLES mysql.proc READ; DELETE FROM",
            "LOCK TABLES mysql.proc READ DELETE FROM t",
        ] {
            // sqlparser takes some of these as `SHOW <variable>`; those are its own.
            if Parser::parse_sql(&MySqlDialect {}, sql).is_ok() {
                continue;
            }
            assert!(my(sql).is_err(), "{sql} must stay unparsed: {:?}", my(sql));
        }
        // These are MySQL's: the PostgreSQL dialect does not take them.
        assert!(pg("SHOW CREATE DATABASE shop").is_err());
    }

    #[test]
    fn load_local_is_seen_through_case_spacing_comments_priorities_and_other_statements() {
        for sql in [
            "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE t",
            "  load\n xml  local infile 'x' into table t",
            "LOAD DATA LOW_PRIORITY LOCAL INFILE 'x' INTO TABLE t",
            "load data concurrent local infile 'x' into table t",
            "LOAD /* a */ DATA -- b\n LOCAL INFILE 'x' INTO TABLE t",
            "LOAD DATA /*! LOCAL */ INFILE 'x' INTO TABLE t",
            "LOAD DATA /*M!100100 LOCAL */ INFILE 'x' INTO TABLE t",
            "select 1; LOAD DATA LOCAL INFILE 'x' INTO TABLE t",
            "LOAD DATA LOCAL INFILE 'unterminated",
        ] {
            assert!(loads_local_file(sql), "{sql}");
        }
        for sql in [
            "LOAD DATA INFILE '/tmp/x' INTO TABLE t",
            "LOAD DATA LOW_PRIORITY INFILE '/tmp/x' INTO TABLE t",
            "select 'load data local'",
            "select `load`, data, local from t",
            "select 1 /* LOAD DATA LOCAL */",
            "",
        ] {
            assert!(!loads_local_file(sql), "{sql}");
        }
    }

    #[test]
    fn mariadb_executable_comments_are_code() {
        let parsed = parse("/*M!100100 DROP TABLE t */", Dialect::MySql).unwrap();
        assert_eq!(parsed.len(), 1);
        assert!(
            matches!(&parsed[0], Parsed::Sql(Statement::Drop { .. })),
            "{parsed:?}"
        );
        // MySQL's own form, which sqlparser reads as code already.
        assert_eq!(
            parse("/*!50000 DROP TABLE t */", Dialect::MySql)
                .unwrap()
                .len(),
            1
        );
        // An ordinary comment is still a comment; PostgreSQL has no such comments.
        assert!(
            parse("/* M! DROP TABLE t */", Dialect::MySql)
                .unwrap()
                .is_empty()
        );
        assert!(
            parse("/*M!100100 DROP TABLE t */", Dialect::Postgres)
                .unwrap()
                .is_empty()
        );
    }
}
