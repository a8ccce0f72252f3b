//! Masking in the server->client direction of a PostgreSQL session: every result row (DataRow,
//! text or binary) and every COPY TO STDOUT row (text format) goes through the masking engine
//! (`crate::mask`) before the journal records it and before the client receives it, so the
//! clear value never leaves the agent.
//!
//! A RowDescription starts a result set's [`MaskPlan`] (column names, types and formats, and,
//! for sessions sluice logged in for, each column's schema, table and source column from the
//! catalog ([`super::catalog`]), so rules by table apply under aliases; otherwise rules match
//! the result column's name); CopyOutResponse starts a plan for a COPY's columns (no names:
//! detectors only). CommandComplete ends the result set and, if
//! anything was masked, yields a report for the journal: which rule or detector fired on which
//! column, with what strategy, how many values (never a value).
//!
//! Text outside rows goes through the same engine: the free-text fields of every ErrorResponse
//! and NoticeResponse (message, detail, hint, context, internal query; codes and names stay
//! as they are), NotificationResponse payloads, and ParameterStatus values that echo a client
//! (`application_name`, ...), as chosen by [`rewrite_text_fields`]. Content detectors replace
//! their findings in place; where an error names its table (fields `t`, and `c` for a column),
//! the column rule for that column (or, with no column named, the first rule on the table)
//! masks the detail whole, since it shows the row's or the key's values. Each rewritten
//! message is followed by its report.
//!
//! Unchanged messages keep their bytes; a chunk is copied only from its first rewritten
//! message on. A binary-format COPY cannot be masked row by row, so with masking on it ends
//! the session rather than pass clear values.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sluice_journal::MaskReport;

use super::catalog::{CatalogAccess, TableNames};
use crate::mask::engine::{ColumnDesc, MaskPlan};
use crate::mask::pgrow::{Format, RowRewrite, rewrite_copy_text, rewrite_data_row, value_kind};
use crate::mask::rules::{Audience, Origin, RuleSet};
use crate::protocol::postgres::backend::{Backend, decode_backend};
use crate::protocol::postgres::backend::{TextField, rewrite_text_fields};
use crate::protocol::postgres::body::Format as WireFormat;
use crate::protocol::postgres::frame::{HEADER_LEN, messages};

/// One session's masking state.
pub(crate) struct Masker {
    rules: Arc<RuleSet>,
    target: String,
    groups: Vec<String>,
    /// Column origins by table OID (sessions sluice logged in for); None: names only.
    catalog: Option<CatalogAccess>,
    plan: Option<MaskPlan>,
    /// Text outside rows.
    text: TextMasker,
    /// Where a rewritten message is built before it joins the output.
    scratch: BytesMut,
}

/// The kinds of text outside rows, as named in the journal's reports.
const TEXT_COLUMNS: [&str; 8] = [
    "message",
    "detail",
    "hint",
    "context",
    "internal query",
    "diagnostic",
    "notification payload",
    "parameter value",
];
/// The detail's column in [`TEXT_COLUMNS`].
const DETAIL: usize = 1;

fn text_column(field: TextField) -> usize {
    match field {
        TextField::Diagnostic(b'M') => 0,
        TextField::Diagnostic(b'D') => DETAIL,
        TextField::Diagnostic(b'H') => 2,
        TextField::Diagnostic(b'W') => 3,
        TextField::Diagnostic(b'q') => 4,
        TextField::Diagnostic(_) => 5,
        TextField::NotificationPayload => 6,
        TextField::ParameterValue => 7,
    }
}

impl Masker {
    pub(crate) fn new(
        rules: Arc<RuleSet>,
        target: &str,
        groups: &[String],
        catalog: Option<CatalogAccess>,
    ) -> Masker {
        let text = TextMasker {
            plan: MaskPlan::for_text(
                rules.clone(),
                target,
                Audience::Groups(groups),
                &TEXT_COLUMNS,
            ),
            field: Vec::new(),
        };
        Masker {
            rules,
            target: target.to_string(),
            groups: groups.to_vec(),
            catalog,
            plan: None,
            text,
            scratch: BytesMut::new(),
        }
    }

    fn start(&mut self, columns: &[ColumnDesc<'_>]) {
        let plan = MaskPlan::new(
            self.rules.clone(),
            &self.target,
            Audience::Groups(&self.groups),
            columns,
        );
        self.plan = plan.is_active().then_some(plan);
    }

    fn report(&mut self, reports: &mut Vec<MaskReport>) {
        let Some(plan) = self.plan.as_mut() else {
            return;
        };
        if plan.masked_values() == 0 {
            return;
        }
        reports.push(plan.journal_report());
        plan.reset_counts();
    }

    /// Looks up, before [`Masker::chunk`], the tables of the chunk's RowDescriptions that the
    /// catalog cache does not know yet.
    pub(crate) async fn resolve(&self, chunk: &Bytes) {
        let Some(catalog) = &self.catalog else {
            return;
        };
        let mut oids: Vec<u32> = Vec::new();
        for (tag, body) in messages(chunk).flatten() {
            if tag == b'T'
                && let Ok(Backend::RowDescription(fields)) = decode_backend(tag, body)
            {
                oids.extend(fields.iter().map(|f| f.table_oid).filter(|o| *o != 0));
            }
        }
        if !oids.is_empty() {
            oids.sort_unstable();
            oids.dedup();
            catalog.ensure(&oids).await;
        }
    }

    /// Masks a chunk of whole server messages. Returns the chunk to forward (the same bytes
    /// when nothing changed) and the reports of result sets that ended in it.
    pub(crate) fn chunk(&mut self, chunk: Bytes) -> Result<(Bytes, Vec<MaskReport>), String> {
        let mut out: Option<BytesMut> = None;
        let mut reports = Vec::new();
        let mut offset = 0usize;
        for message in messages(&chunk) {
            let (tag, body) = message.map_err(|e| e.to_string())?;
            let len = HEADER_LEN + body.len();
            let start = offset;
            offset += len;
            let mut rewritten = false;
            match tag {
                b'T' => {
                    let Ok(Backend::RowDescription(fields)) = decode_backend(tag, body) else {
                        return Err("malformed RowDescription".into());
                    };
                    // Where each column comes from, when the catalog knows its table.
                    let tables: Vec<Option<Arc<TableNames>>> = fields
                        .iter()
                        .map(|f| {
                            self.catalog
                                .as_ref()
                                .filter(|_| f.table_oid != 0)
                                .and_then(|c| c.table(f.table_oid))
                        })
                        .collect();
                    let columns: Vec<ColumnDesc<'_>> = fields
                        .iter()
                        .zip(&tables)
                        .map(|(f, t)| ColumnDesc {
                            origin: match t.as_deref() {
                                Some(t) => Origin {
                                    schema: Some(t.schema.as_str()),
                                    table: Some(t.table.as_str()),
                                    column: t.columns.get(&f.column).map(String::as_str),
                                    name: f.name,
                                },
                                None => Origin {
                                    name: f.name,
                                    ..Origin::default()
                                },
                            },
                            kind: value_kind(
                                f.type_oid,
                                match f.format {
                                    WireFormat::Binary => Format::Binary,
                                    WireFormat::Text => Format::Text,
                                },
                            ),
                        })
                        .collect();
                    self.start(&columns);
                }
                b'H' => {
                    // CopyOutResponse: overall format (0 text, 1 binary), then the columns.
                    let binary = body.first() == Some(&1);
                    let count = body
                        .get(1..3)
                        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                        .unwrap_or(0);
                    let columns = vec![ColumnDesc::default(); count];
                    self.start(&columns);
                    if binary && self.plan.is_some() {
                        return Err(
                            "a binary COPY cannot be masked; use COPY in text format".into()
                        );
                    }
                }
                b'D' | b'd' => {
                    if let Some(plan) = self.plan.as_mut() {
                        // The rewriters append only a rewritten message, so once the chunk is
                        // being copied they write into the copy; before that into scratch, and
                        // the chunk is copied only when a first row changes.
                        let target = match out.as_mut() {
                            Some(o) => o,
                            None => {
                                self.scratch.clear();
                                &mut self.scratch
                            }
                        };
                        let done = if tag == b'D' {
                            rewrite_data_row(body, plan, target)
                                .map_err(|e| format!("cannot mask a result row: {e}"))?
                        } else {
                            rewrite_copy_text(body, plan, target)
                                .map_err(|e| format!("cannot mask a COPY row: {e}"))?
                        };
                        if done == RowRewrite::Rewritten {
                            if out.is_none() {
                                let mut o = copy_prefix(&chunk, start);
                                o.extend_from_slice(&self.scratch);
                                out = Some(o);
                            }
                            rewritten = true;
                        }
                    }
                }
                b'C' => {
                    self.report(&mut reports);
                    self.plan = None;
                }
                b'Z' => self.plan = None,
                b'E' | b'N' | b'A' | b'S' => {
                    if tag == b'E' {
                        // An error ends the result set: what its rows had masked is reported.
                        self.report(&mut reports);
                        self.plan = None;
                    }
                    let target = match out.as_mut() {
                        Some(o) => o,
                        None => {
                            self.scratch.clear();
                            &mut self.scratch
                        }
                    };
                    let (rules, name, groups) = (&self.rules, &self.target, &self.groups);
                    if self
                        .text
                        .mask(rules, name, groups, tag, body, target, &mut reports)?
                    {
                        if out.is_none() {
                            let mut o = copy_prefix(&chunk, start);
                            o.extend_from_slice(&self.scratch);
                            out = Some(o);
                        }
                        rewritten = true;
                    }
                }
                _ => {}
            }
            if !rewritten && let Some(o) = out.as_mut() {
                o.extend_from_slice(&chunk[start..offset]);
            }
        }
        Ok((out.map(BytesMut::freeze).unwrap_or(chunk), reports))
    }
}

/// The masking of text outside rows, for one session.
struct TextMasker {
    /// Columns: [`TEXT_COLUMNS`].
    plan: MaskPlan,
    /// Where one field's replacement is built.
    field: Vec<u8>,
}

impl TextMasker {
    /// Masks the text of an ErrorResponse, NoticeResponse, NotificationResponse or
    /// ParameterStatus; true when the rewritten message was appended to `out` (and its report
    /// to `reports`).
    #[allow(clippy::too_many_arguments)]
    fn mask(
        &mut self,
        rules: &RuleSet,
        target: &str,
        groups: &[String],
        tag: u8,
        body: &[u8],
        out: &mut BytesMut,
        reports: &mut Vec<MaskReport>,
    ) -> Result<bool, String> {
        let audience = Audience::Groups(groups);
        // The table (and column) an error names, when it names one (and is UTF-8).
        let rule = match decode_backend(tag, body) {
            Ok(Backend::ErrorResponse(d) | Backend::NoticeResponse(d)) => {
                d.get(b't').and_then(|table| match d.get(b'c') {
                    Some(column) => rules.column_rule(
                        target,
                        &Origin {
                            schema: d.get(b's'),
                            table: Some(table),
                            column: Some(column),
                            name: column,
                        },
                    ),
                    None => rules.table_rule(target, d.get(b's'), table),
                })
            }
            _ => None,
        };
        let ruled = rule.is_some();
        if ruled {
            self.plan.set_rule(DETAIL, rule, audience);
        }
        let plan = &mut self.plan;
        let result = rewrite_text_fields(
            tag,
            body,
            &mut self.field,
            |field, value, scratch| plan.apply_message_into(text_column(field), value, scratch),
            out,
        );
        if ruled {
            self.plan.set_rule(DETAIL, None, audience);
        }
        let rewritten = result.map_err(|e| format!("cannot mask a server message: {e}"))?;
        if rewritten && self.plan.masked_values() > 0 {
            reports.push(self.plan.journal_report());
            self.plan.reset_counts();
        }
        Ok(rewritten)
    }
}

/// A buffer holding `chunk[..upto]`, with room for the rest.
fn copy_prefix(chunk: &Bytes, upto: usize) -> BytesMut {
    let mut o = BytesMut::with_capacity(chunk.len() + chunk.len() / 8);
    o.extend_from_slice(&chunk[..upto]);
    o
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn row_description(names: &[&str]) -> Vec<u8> {
        let mut b = (names.len() as i16).to_be_bytes().to_vec();
        for n in names {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
            b.extend_from_slice(&0u32.to_be_bytes()); // table oid
            b.extend_from_slice(&0i16.to_be_bytes()); // attnum
            b.extend_from_slice(&25u32.to_be_bytes()); // text
            b.extend_from_slice(&(-1i16).to_be_bytes());
            b.extend_from_slice(&(-1i32).to_be_bytes());
            b.extend_from_slice(&0i16.to_be_bytes()); // text format
        }
        msg(b'T', &b)
    }

    fn data_row(values: &[&str]) -> Vec<u8> {
        let mut b = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            b.extend_from_slice(&(v.len() as i32).to_be_bytes());
            b.extend_from_slice(v.as_bytes());
        }
        msg(b'D', &b)
    }

    fn masker() -> Masker {
        let rules = "[[detector]]\nname = \"email\"\nstrategy = \"redact\"\n";
        let rules = Arc::new(RuleSet::from_toml(rules, None).unwrap());
        Masker::new(rules, "app-db", &[], None)
    }

    #[test]
    fn rows_with_sensitive_values_are_rewritten_and_the_rest_keep_their_bytes() {
        let mut m = masker();
        let mut chunk = row_description(&["id", "note"]);
        chunk.extend(data_row(&["1", "nothing to see"]));
        chunk.extend(data_row(&["2", "mail ada@example.com please"]));
        chunk.extend(msg(b'C', b"SELECT 2\0"));
        chunk.extend(msg(b'Z', b"I"));
        let chunk = Bytes::from(chunk);
        let (out, reports) = m.chunk(chunk.clone()).unwrap();
        assert!(!out.windows(17).any(|w| w == b"ada@example.com p"));
        let tags: Vec<u8> = messages(&out).flatten().map(|(t, _)| t).collect();
        assert_eq!(tags, b"TDDCZ".to_vec());
        // The first row is byte for byte the same.
        let rows: Vec<&[u8]> = messages(&out)
            .flatten()
            .filter(|(t, _)| *t == b'D')
            .map(|(_, b)| b)
            .collect();
        assert_eq!(rows[0], &data_row(&["1", "nothing to see"])[5..]);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].fired[0].column, "note");
        assert_eq!(reports[0].fired[0].values, 1);

        // Nothing sensitive: the very same bytes come back.
        let mut plain = row_description(&["id"]);
        plain.extend(data_row(&["7"]));
        plain.extend(msg(b'C', b"SELECT 1\0"));
        let plain = Bytes::from(plain);
        let (out, reports) = m.chunk(plain.clone()).unwrap();
        assert_eq!(out.as_ptr(), plain.as_ptr());
        assert!(reports.is_empty());
    }

    fn strict_masker() -> Masker {
        let rules = r#"
            [[column]]
            name = "customer-email"
            table = "customers"
            column = "email"
            strategy = "redact"
            [[detector]]
            name = "email"
            strategy = "redact"
            [[detector]]
            name = "card"
            strategy = "redact"
        "#;
        let rules = Arc::new(RuleSet::from_toml(rules, None).unwrap());
        Masker::new(rules, "app-db", &[], None)
    }

    fn diagnostic(tag: u8, fields: &[(u8, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (c, v) in fields {
            b.push(*c);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        msg(tag, &b)
    }

    #[test]
    fn errors_notices_and_notifications_lose_their_findings_and_keep_their_codes() {
        let mut m = strict_masker();
        let error = diagnostic(
            b'E',
            &[
                (b'S', "ERROR"),
                (b'V', "ERROR"),
                (b'C', "22P02"),
                (
                    b'M',
                    "invalid input syntax for type integer: \"ann@example.com\"",
                ),
                (b'P', "30"),
            ],
        );
        let notice = diagnostic(
            b'N',
            &[
                (b'S', "NOTICE"),
                (b'C', "00000"),
                (b'M', "card 4111 1111 1111 1111"),
                (b'W', "PL/pgSQL function f() line 3 at RAISE"),
            ],
        );
        let mut notify = 9i32.to_be_bytes().to_vec();
        notify.extend_from_slice(b"orders\0{\"by\":\"ann@example.com\"}\0");
        let mut chunk = notice.clone();
        chunk.extend(msg(b'A', &notify));
        chunk.extend(error);
        chunk.extend(msg(b'Z', b"I"));
        let (out, reports) = m.chunk(Bytes::from(chunk)).unwrap();
        let all = String::from_utf8_lossy(&out);
        assert!(
            !all.contains("ann@example.com") && !all.contains("4111"),
            "{all}"
        );
        let Ok(Backend::ErrorResponse(d)) = messages(&out)
            .flatten()
            .find(|(t, _)| *t == b'E')
            .map(|(t, b)| decode_backend(t, b))
            .unwrap()
        else {
            panic!("no error")
        };
        assert_eq!(d.sqlstate(), Some("22P02"));
        assert_eq!(d.get(b'P'), Some("30"));
        assert_eq!(
            d.message(),
            Some("invalid input syntax for type integer: \"****\"")
        );
        let Ok(Backend::NotificationResponse {
            payload, channel, ..
        }) = messages(&out)
            .flatten()
            .find(|(t, _)| *t == b'A')
            .map(|(t, b)| decode_backend(t, b))
            .unwrap()
        else {
            panic!("no notification")
        };
        assert_eq!((channel, payload), ("orders", "{\"by\":\"****\"}"));
        // The context had nothing to mask: its bytes are the same.
        let Ok(Backend::NoticeResponse(n)) = messages(&out)
            .flatten()
            .find(|(t, _)| *t == b'N')
            .map(|(t, b)| decode_backend(t, b))
            .unwrap()
        else {
            panic!("no notice")
        };
        assert_eq!(n.get(b'W'), Some("PL/pgSQL function f() line 3 at RAISE"));
        assert_eq!(n.message(), Some("card ****"));
        let fired: Vec<String> = reports
            .iter()
            .flat_map(|r| r.fired.iter().map(|f| format!("{} {}", f.column, f.rule)))
            .collect();
        assert_eq!(
            fired,
            vec![
                "message detector:card",
                "notification payload detector:email",
                "message detector:email"
            ]
        );

        // Nothing to mask: the very same bytes.
        let plain = Bytes::from(diagnostic(
            b'E',
            &[(b'C', "42P01"), (b'M', "no such table")],
        ));
        let (out, reports) = m.chunk(plain.clone()).unwrap();
        assert_eq!(out.as_ptr(), plain.as_ptr());
        assert!(reports.is_empty());
    }

    #[test]
    fn an_error_naming_a_masked_table_has_its_detail_masked_whole() {
        let mut m = strict_masker();
        let unique = diagnostic(
            b'E',
            &[
                (b'C', "23505"),
                (
                    b'M',
                    "duplicate key value violates unique constraint \"customers_email_key\"",
                ),
                (b'D', "Key (email)=(ANN AT EXAMPLE) already exists."),
                (b's', "public"),
                (b't', "customers"),
                (b'n', "customers_email_key"),
            ],
        );
        let (out, reports) = m.chunk(Bytes::from(unique)).unwrap();
        let (t, b) = messages(&out).flatten().next().unwrap();
        let Ok(Backend::ErrorResponse(d)) = decode_backend(t, b) else {
            panic!("no error")
        };
        assert_eq!(d.get(b'D'), Some("****"));
        assert_eq!(d.get(b'n'), Some("customers_email_key"));
        assert_eq!(reports[0].fired[0].rule, "column:customer-email");
        // Another table's detail is left to the detectors.
        let other = diagnostic(
            b'E',
            &[
                (b'C', "23505"),
                (b'D', "Key (sku)=(A-1) already exists."),
                (b't', "items"),
            ],
        );
        let other = Bytes::from(other);
        let (out, _) = m.chunk(other.clone()).unwrap();
        assert_eq!(out.as_ptr(), other.as_ptr());
    }
}
