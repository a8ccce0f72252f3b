//! Masking in the server->client direction of a MySQL/MariaDB session: every result row, text
//! (COM_QUERY) or binary (COM_STMT_EXECUTE, COM_STMT_FETCH), goes through the masking engine
//! (`crate::mask`, the same one PostgreSQL uses) before the journal records it and before the
//! client receives it, so the clear value never leaves the agent.
//!
//! The [`Masker`] places each server packet in the session's [`ResponseMachine`] itself (it
//! replaces the server pump's placement loop), so it knows what every packet is. A result
//! set's [`MaskPlan`] is built at its first row from the columns the machine holds then: the
//! definitions just received, or, when MariaDB's cached metadata (or a cursor's fetch) sends
//! none, the prepared statement's. Rules match a column by its origin (database as schema,
//! `org_table`, `org_name`), so aliases do not hide a masked column; a computed column (no
//! `org_table`) matches by its result name, and content detectors see every text value. The
//! end of a result set (or an ERR) yields a report for the journal, as for PostgreSQL: which
//! rule or detector fired on which column, with what strategy, how many values, never a value.
//!
//! Text outside rows goes through the same engine: the message of every ERR packet (its number
//! and SQLSTATE keep their bytes) and the info of every OK packet, content detectors replacing
//! their findings in place, each rewritten packet followed by its report. MySQL's errors name
//! no column, so column rules do not apply to them. Warnings are a result set (SHOW WARNINGS),
//! masked as rows.
//!
//! Types ([`value_kind`]): strings, blobs, enums and sets are text (findings replaced in place,
//! a whole-value mask is text); JSON is JSON (masks stay JSON strings); numbers, decimals,
//! dates and times, bits and geometry are never scanned and a column rule on them gives NULL,
//! in both protocols: a masked number or date has no honest stand-in of its type, and a text
//! mask in a decimal would break clients that parse it. Unknown types are scanned as raw bytes
//! and nulled when anything is found.
//!
//! Bytes: a row with nothing to mask, and every other packet, keeps its exact bytes; a chunk is
//! copied only from its first rewritten packet on. A rewritten row is framed again with its
//! sequence id; one that grows to 16 MiB or more is split into 16 MiB chunks (and one that
//! shrinks below a chunk boundary is joined), which changes how many sequence ids it takes:
//! the rest of that command's response is then renumbered by the difference, so the client
//! sees consecutive ids (those packets are re-framed, their payloads unchanged). A row that
//! does not match its columns while rules apply ends the session rather than pass unmasked.
//! Never touches a socket, never blocks, allocates per result set (the plan), not per row.
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sluice_journal::MaskReport;

use crate::mask::engine::{Change, ColumnDesc, MaskPlan, ValueKind};
use crate::mask::rules::{Audience, Origin, RuleSet};
use crate::protocol::mysql::handshake::Capabilities;
use crate::protocol::mysql::packet::{Decoder, encode_packet};
use crate::protocol::mysql::response::{Event, ResponseMachine};
use crate::protocol::mysql::resultset::{ColumnDef, types};
use crate::protocol::mysql::rewrite::{
    Cell, RowFormat, rewrite_err_message, rewrite_ok_info, rewrite_row,
};

/// The kinds of text outside rows, as named in the journal's reports.
const TEXT_COLUMNS: [&str; 2] = ["error message", "ok info"];

/// How the engine treats the values of a MySQL column (both protocols).
pub(crate) fn value_kind(def: &ColumnDef) -> ValueKind {
    use types::*;
    match def.column_type {
        JSON => ValueKind::Json,
        VARCHAR | VAR_STRING | STRING | TINY_BLOB | MEDIUM_BLOB | LONG_BLOB | BLOB | ENUM | SET => {
            ValueKind::Text
        }
        DECIMAL | NEWDECIMAL | TINY | SHORT | LONG | FLOAT | DOUBLE | NULL | TIMESTAMP
        | LONGLONG | INT24 | DATE | TIME | DATETIME | YEAR | NEWDATE | BIT | TIMESTAMP2
        | DATETIME2 | TIME2 | GEOMETRY => ValueKind::Scalar,
        _ => ValueKind::ScanThenNull,
    }
}

/// Where a column's values come from, for the rules.
fn origin(def: &ColumnDef) -> Origin<'_> {
    fn some(s: &str) -> Option<&str> {
        (!s.is_empty()).then_some(s)
    }
    if def.org_table.is_empty() {
        // Computed (an expression, a literal): only the result name is known.
        return Origin {
            name: &def.name,
            ..Origin::default()
        };
    }
    Origin {
        schema: some(&def.schema),
        table: Some(&def.org_table),
        column: some(&def.org_name),
        name: &def.name,
    }
}

/// The current result set's plan.
enum Plan {
    /// No row of it seen yet.
    Unplanned,
    /// No rule applies: rows pass without being parsed.
    Inactive,
    Active(MaskPlan),
}

/// One session's masking state.
pub(crate) struct Masker {
    rules: Arc<RuleSet>,
    target: String,
    groups: Vec<String>,
    plan: Plan,
    /// The plan for text outside rows (columns: [`TEXT_COLUMNS`]).
    text: MaskPlan,
    /// Where one value's replacement is built.
    scratch: Vec<u8>,
    /// Where a rewritten row's payload is built.
    row: Vec<u8>,
    /// Added to the sequence ids of the rest of the current response, after a rewritten row
    /// took a different number of chunks than the original.
    shift: u8,
}

impl Masker {
    pub(crate) fn new(rules: Arc<RuleSet>, target: &str, groups: &[String]) -> Masker {
        let text = MaskPlan::for_text(
            rules.clone(),
            target,
            Audience::Groups(groups),
            &TEXT_COLUMNS,
        );
        Masker {
            rules,
            target: target.to_string(),
            groups: groups.to_vec(),
            plan: Plan::Unplanned,
            text,
            scratch: Vec::new(),
            row: Vec::new(),
            shift: 0,
        }
    }

    /// Places every packet of `chunk` (whole packets of at most `max` bytes) in `machine` and
    /// masks its rows. Returns the bytes to forward (the same bytes when nothing changed) and
    /// the reports of result sets that ended in it. An error ends the session.
    pub(crate) fn chunk(
        &mut self,
        chunk: Bytes,
        machine: &mut ResponseMachine,
        max: usize,
    ) -> Result<(Bytes, Vec<MaskReport>), String> {
        let mut out: Option<BytesMut> = None;
        let mut reports = Vec::new();
        let mut decoder = Decoder::unchecked(max);
        let mut offset = 0usize;
        while offset < chunk.len() {
            let Some((wire, packet)) = decoder
                .decode(&chunk[offset..])
                .map_err(|e| e.to_string())?
            else {
                return Err("the chunk ends inside a packet".into());
            };
            let start = offset;
            offset += wire;
            let completed = machine.responses_completed();
            let event = machine.server(&packet.payload).map_err(|e| e.to_string())?;
            let rewritten = match event {
                Event::Row(payload) => self.row(payload, machine)?,
                event => {
                    self.end_result(&mut reports);
                    self.mask_text(
                        &event,
                        &packet.payload,
                        machine.capabilities(),
                        &mut reports,
                    )?
                }
            };
            let seq = packet.seq.wrapping_add(self.shift);
            if rewritten || self.shift != 0 {
                let o = out.get_or_insert_with(|| copy_prefix(&chunk, start));
                let payload: &[u8] = if rewritten {
                    &self.row
                } else {
                    &packet.payload
                };
                let next = encode_packet(seq, payload, o);
                self.shift = next.wrapping_sub(packet.last_seq.wrapping_add(1));
            } else if let Some(o) = out.as_mut() {
                o.extend_from_slice(&chunk[start..offset]);
            }
            if machine.responses_completed() != completed {
                // The next response numbers its packets afresh.
                self.shift = 0;
            }
        }
        Ok((out.map(BytesMut::freeze).unwrap_or(chunk), reports))
    }

    /// Masks one row; true when `self.row` holds its new payload.
    fn row(&mut self, payload: &[u8], machine: &ResponseMachine) -> Result<bool, String> {
        if matches!(self.plan, Plan::Unplanned) {
            self.plan = self.plan_for(machine.columns());
        }
        let Plan::Active(plan) = &mut self.plan else {
            return Ok(false);
        };
        let format = if machine.binary_rows() {
            RowFormat::Binary {
                columns: machine.columns(),
            }
        } else {
            RowFormat::Text {
                columns: machine.columns().len(),
            }
        };
        self.row.clear();
        rewrite_row(
            payload,
            format,
            &mut self.scratch,
            |col, value, scratch| match plan.apply_into(col, value, scratch) {
                Change::Unchanged => Cell::Keep,
                Change::Replaced => Cell::Replaced,
                Change::Null => Cell::Null,
            },
            &mut self.row,
        )
        .map_err(|e| format!("cannot mask a result row: {e}"))
    }

    /// Masks the message of an ERR or the info of an OK (one that ends a result set too);
    /// true when `self.row` holds the new payload.
    fn mask_text(
        &mut self,
        event: &Event<'_>,
        payload: &[u8],
        caps: Capabilities,
        reports: &mut Vec<MaskReport>,
    ) -> Result<bool, String> {
        let text = &mut self.text;
        self.row.clear();
        let rewritten = match event {
            Event::Err(_) => rewrite_err_message(
                payload,
                &mut self.scratch,
                |m, out| text.apply_message_into(0, m, out),
                &mut self.row,
            ),
            // An unsolicited ERR (a server shutting down, a killed connection).
            Event::Unexpected if payload.first() == Some(&0xFF) => rewrite_err_message(
                payload,
                &mut self.scratch,
                |m, out| text.apply_message_into(0, m, out),
                &mut self.row,
            ),
            Event::Ok(_) => rewrite_ok_info(
                payload,
                caps,
                &mut self.scratch,
                |i, out| text.apply_message_into(1, i, out),
                &mut self.row,
            ),
            // An OK (0xFE) ending a result set under DEPRECATE_EOF; an EOF carries no text.
            Event::ResultDone { .. } if caps.contains(Capabilities::DEPRECATE_EOF) => {
                rewrite_ok_info(
                    payload,
                    caps,
                    &mut self.scratch,
                    |i, out| text.apply_message_into(1, i, out),
                    &mut self.row,
                )
            }
            _ => Ok(false),
        }
        .map_err(|e| format!("cannot mask a server message: {e}"))?;
        if rewritten && self.text.masked_values() > 0 {
            reports.push(self.text.journal_report());
            self.text.reset_counts();
        }
        Ok(rewritten)
    }

    fn plan_for(&self, columns: &[ColumnDef]) -> Plan {
        let descs: Vec<ColumnDesc<'_>> = columns
            .iter()
            .map(|c| ColumnDesc {
                origin: origin(c),
                kind: value_kind(c),
            })
            .collect();
        let plan = MaskPlan::new(
            self.rules.clone(),
            &self.target,
            Audience::Groups(&self.groups),
            &descs,
        );
        if plan.is_active() {
            Plan::Active(plan)
        } else {
            Plan::Inactive
        }
    }

    /// The current result set is over (any packet that is not a row): its report, if
    /// anything was masked, and a fresh plan for the next one.
    fn end_result(&mut self, reports: &mut Vec<MaskReport>) {
        if let Plan::Active(plan) = &self.plan
            && plan.masked_values() > 0
        {
            reports.push(plan.journal_report());
        }
        self.plan = Plan::Unplanned;
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
    use bytes::BufMut;

    use super::*;
    use crate::protocol::mysql::handshake::{Capabilities, EofPacket, OkPacket, status};
    use crate::protocol::mysql::packet::{MAX_CHUNK, packets, put_lenenc_bytes};
    use crate::protocol::mysql::resultset::Value;

    const RULES: &str = r#"
        [hash]
        key_hex = "00112233445566778899aabbccddeeff"
        [[column]]
        name = "email"
        table = "customers"
        column = "email"
        strategy = "redact"
        [[column.override]]
        groups = ["support"]
        strategy = "clear"
        [[column]]
        name = "ssn"
        column = "ssn"
        strategy = "redact"
        [[column]]
        name = "tag"
        column = "tag*"
        strategy = "hash"
        [[detector]]
        name = "email"
        strategy = "redact"
    "#;

    fn masker(groups: &[&str]) -> Masker {
        let rules = Arc::new(RuleSet::from_toml(RULES, None).unwrap());
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        Masker::new(rules, "app-db", &groups)
    }

    fn caps() -> Capabilities {
        Capabilities::sluice_default()
    }

    fn text_row(values: &[Option<&str>]) -> Vec<u8> {
        crate::protocol::mysql::testing::text_row(values)
    }

    fn coldef(table: &str, name: &str, org_name: &str, ty: u8) -> Vec<u8> {
        crate::protocol::mysql::testing::coldef(table, name, org_name, ty, 0)
    }

    fn ok_fe(more: bool) -> Vec<u8> {
        crate::protocol::mysql::testing::ok_fe(if more { status::MORE_RESULTS_EXISTS } else { 0 })
    }

    /// Packets framed with consecutive sequence ids from `seq`.
    fn framed(seq: u8, payloads: &[Vec<u8>]) -> Bytes {
        let mut out = BytesMut::new();
        let mut seq = seq;
        for p in payloads {
            seq = encode_packet(seq, p, &mut out);
        }
        out.freeze()
    }

    /// (sequence id, payload) of each packet of `wire`.
    fn unframe(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        packets(wire, 1 << 26)
            .map(|p| {
                let p = p.unwrap();
                (p.seq, p.payload.into_owned())
            })
            .collect()
    }

    /// The ids of every chunk header in `wire`.
    fn chunk_ids(wire: &[u8]) -> Vec<u8> {
        let mut ids = Vec::new();
        let mut at = 0;
        while at + 4 <= wire.len() {
            let len = usize::from(wire[at])
                | usize::from(wire[at + 1]) << 8
                | usize::from(wire[at + 2]) << 16;
            ids.push(wire[at + 3]);
            at += 4 + len;
        }
        ids
    }

    fn customers_query(m: &mut ResponseMachine) {
        m.client(0, b"\x03select id, email as e, note from customers")
            .unwrap();
    }

    fn customers_columns() -> Vec<Vec<u8>> {
        vec![
            b"\x03".to_vec(),
            coldef("customers", "id", "id", types::LONG),
            coldef("customers", "e", "email", types::VAR_STRING),
            coldef("customers", "note", "note", types::BLOB),
        ]
    }

    #[test]
    fn text_rows_are_masked_by_origin_and_content_and_unchanged_rows_keep_their_bytes() {
        let mut machine = ResponseMachine::new(caps());
        customers_query(&mut machine);
        let mut payloads = customers_columns();
        payloads.push(text_row(&[Some("1"), None, Some("nothing to see")]));
        payloads.push(text_row(&[
            Some("2"),
            Some("ada@example.com"),
            Some("mail bob@example.org"),
        ]));
        payloads.push(ok_fe(false));
        let chunk = framed(1, &payloads);
        let mut m = masker(&[]);
        let (out, reports) = m.chunk(chunk.clone(), &mut machine, 1 << 24).unwrap();
        assert!(machine.is_idle());
        let got = unframe(&out);
        let want = unframe(&chunk);
        assert_eq!(got.len(), want.len());
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=7).collect::<Vec<u8>>()
        );
        // Everything but the second row is byte for byte the same (NULL included).
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if i != 5 {
                assert_eq!(g, w, "packet {i}");
            }
        }
        assert_eq!(
            got[5].1,
            text_row(&[Some("2"), Some("****"), Some("mail ****")])
        );
        assert_eq!(reports.len(), 1);
        let mut fired: Vec<(String, String, u64)> = reports[0]
            .fired
            .iter()
            .map(|f| (f.column.clone(), f.rule.clone(), f.values))
            .collect();
        fired.sort();
        assert_eq!(
            fired,
            vec![
                ("e".into(), "column:email".into(), 1),
                ("note".into(), "detector:email".into(), 1)
            ]
        );

        // Nothing sensitive: the very same buffer comes back, and no report.
        customers_query(&mut machine);
        let mut payloads = customers_columns();
        payloads.push(text_row(&[Some("3"), None, Some("plain")]));
        payloads.push(ok_fe(false));
        let chunk = framed(1, &payloads);
        let (out, reports) = m.chunk(chunk.clone(), &mut machine, 1 << 24).unwrap();
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert!(reports.is_empty());
    }

    #[test]
    fn a_group_with_an_override_sees_the_clear_column() {
        let mut machine = ResponseMachine::new(caps());
        customers_query(&mut machine);
        let mut payloads = customers_columns();
        payloads.push(text_row(&[Some("2"), Some("ada@example.com"), None]));
        payloads.push(ok_fe(false));
        let chunk = framed(1, &payloads);
        let (out, _) = masker(&["support"])
            .chunk(chunk.clone(), &mut machine, 1 << 24)
            .unwrap();
        assert_eq!(out, chunk);
    }

    fn prepare(machine: &mut ResponseMachine, m: &mut Masker, id: u32, eof: bool) {
        machine
            .client(
                0,
                b"\x16select id, ssn, email, note from customers where id > ?",
            )
            .unwrap();
        let mut ok = BytesMut::new();
        ok.put_u8(0);
        ok.put_u32_le(id);
        ok.put_u16_le(4);
        ok.put_u16_le(0);
        ok.put_u8(0);
        ok.put_u16_le(0);
        let mut payloads = vec![ok.to_vec()];
        payloads.extend(binary_columns());
        if eof {
            payloads.push(EofPacket::default().encode().to_vec());
        }
        m.chunk(framed(1, &payloads), machine, 1 << 24).unwrap();
        assert!(machine.is_idle());
    }

    fn binary_columns() -> Vec<Vec<u8>> {
        vec![
            coldef("customers", "id", "id", types::LONG),
            coldef("customers", "ssn", "ssn", types::LONGLONG),
            coldef("customers", "email", "email", types::VAR_STRING),
            coldef("customers", "note", "note", types::BLOB),
        ]
    }

    fn execute(machine: &mut ResponseMachine, id: u32) {
        let mut exec = BytesMut::new();
        exec.put_u8(0x17);
        exec.put_u32_le(id);
        exec.put_u8(0);
        exec.put_u32_le(1);
        machine.client(0, &exec).unwrap();
    }

    /// id = 7, ssn = 123456789, email, note NULL (bit 5).
    fn binary_row() -> Vec<u8> {
        let mut row = vec![0x00, 0b0010_0000];
        row.extend(7i32.to_le_bytes());
        row.extend(123_456_789i64.to_le_bytes());
        put_lenenc_bytes(&mut row, b"ada@example.com");
        row
    }

    fn check_binary(machine: &ResponseMachine, payload: &[u8]) {
        let cols = binary_columns()
            .iter()
            .map(|c| crate::protocol::mysql::resultset::parse_column_def(c, caps()).unwrap())
            .collect::<Vec<_>>();
        let values = crate::protocol::mysql::resultset::decode_binary_row(payload, &cols).unwrap();
        assert_eq!(
            values,
            vec![
                Value::Int(7),
                Value::Null,
                Value::Bytes(b"****"),
                Value::Null
            ]
        );
        assert!(machine.columns().len() == 4 || machine.is_idle());
    }

    #[test]
    fn binary_rows_null_masked_numbers_through_the_bitmap_and_rewrite_strings() {
        let mut machine = ResponseMachine::new(caps());
        let mut m = masker(&[]);
        prepare(&mut machine, &mut m, 5, false);
        execute(&mut machine, 5);
        let mut payloads = vec![b"\x04".to_vec()];
        payloads.extend(binary_columns());
        payloads.push(binary_row());
        payloads.push(ok_fe(false));
        let (out, reports) = m
            .chunk(framed(1, &payloads), &mut machine, 1 << 24)
            .unwrap();
        let got = unframe(&out);
        check_binary(&machine, &got[5].1);
        assert_eq!(reports.len(), 1);
        let ssn = reports[0].fired.iter().find(|f| f.column == "ssn").unwrap();
        assert_eq!((ssn.strategy.as_str(), ssn.values), ("null", 1));
    }

    #[test]
    fn cached_metadata_executions_are_masked_with_the_statements_columns() {
        let c = caps()
            .without(Capabilities::DEPRECATE_EOF)
            .union(Capabilities::MARIADB_CACHE_METADATA);
        let mut machine = ResponseMachine::new(c);
        let mut m = masker(&[]);
        prepare(&mut machine, &mut m, 9, true);
        let eof = EofPacket::default().encode().to_vec();
        for metadata in [true, false] {
            execute(&mut machine, 9);
            let mut payloads = vec![vec![4, u8::from(metadata)]];
            if metadata {
                payloads.extend(binary_columns());
            }
            payloads.push(eof.clone());
            payloads.push(binary_row());
            payloads.push(eof.clone());
            let (out, reports) = m
                .chunk(framed(1, &payloads), &mut machine, 1 << 24)
                .unwrap();
            let got = unframe(&out);
            check_binary(&machine, &got[got.len() - 2].1);
            assert_eq!(reports.len(), 1, "metadata sent: {metadata}");
            assert!(machine.is_idle());
        }
    }

    #[test]
    fn every_result_of_a_multi_result_response_is_masked_and_reported() {
        let mut machine = ResponseMachine::new(caps());
        machine
            .client(
                0,
                b"\x03select email from customers; select 1; select email from customers",
            )
            .unwrap();
        let email = coldef("customers", "email", "email", types::VAR_STRING);
        let payloads = vec![
            b"\x01".to_vec(),
            email.clone(),
            text_row(&[Some("a@b.io")]),
            ok_fe(true),
            b"\x01".to_vec(),
            coldef("", "1", "", types::LONGLONG),
            text_row(&[Some("1")]),
            ok_fe(true),
            b"\x01".to_vec(),
            email,
            text_row(&[Some("c@d.io")]),
            text_row(&[None]),
            ok_fe(false),
        ];
        let (out, reports) = masker(&[])
            .chunk(framed(1, &payloads), &mut machine, 1 << 24)
            .unwrap();
        let got = unframe(&out);
        assert_eq!(got[2].1, text_row(&[Some("****")]));
        assert_eq!(got[6].1, text_row(&[Some("1")]));
        assert_eq!(got[10].1, text_row(&[Some("****")]));
        assert_eq!(got[11].1, text_row(&[None]));
        assert_eq!(reports.len(), 2);
        assert!(machine.is_idle());
    }

    #[test]
    fn a_row_that_grows_past_16_mib_is_split_and_the_rest_of_the_response_renumbered() {
        let mut machine = ResponseMachine::new(caps());
        machine
            .client(0, b"\x03select blob, tag1, ..., tag10 from t")
            .unwrap();
        let mut payloads = vec![b"\x0b".to_vec()];
        payloads.push(coldef("t", "filler", "filler", types::BLOB));
        for i in 0..10 {
            let n = format!("tag{i}");
            payloads.push(coldef("t", &n, &n, types::VAR_STRING));
        }
        // 10 one-byte values hashed to 18 bytes each: the row grows by 170 bytes, past a
        // chunk boundary it was 100 bytes short of.
        let filler = "x".repeat(MAX_CHUNK - 100 - 4 - 20);
        let mut row: Vec<Option<&str>> = vec![Some(&filler)];
        row.extend(std::iter::repeat_n(Some("t"), 10));
        let row = text_row(&row);
        assert_eq!(row.len(), MAX_CHUNK - 100);
        payloads.push(row);
        payloads.push(text_row(&[Some("small"); 11]));
        payloads.push(ok_fe(false));
        let chunk = framed(1, &payloads);
        let mut m = masker(&[]);
        let (out, reports) = m.chunk(chunk, &mut machine, 1 << 25).unwrap();
        assert_eq!(reports.len(), 1);
        // 13 packets before the big row (ids 1..=12), the row in two chunks (13, 14), then
        // the small row and the terminator, shifted by one.
        let ids = chunk_ids(&out);
        assert_eq!(ids, (1..=16).collect::<Vec<u8>>());
        let got = unframe(&out);
        assert_eq!(got[12].1.len(), MAX_CHUNK - 100 + 170);
        assert_eq!(got[13].0, 15);
        assert!(machine.is_idle());

        // The next command's response starts at 1 again, unshifted and untouched.
        machine.client(0, b"\x0e").unwrap();
        let ok = framed(1, &[OkPacket::default().encode(0, caps()).to_vec()]);
        let (out, _) = m.chunk(ok.clone(), &mut machine, 1 << 24).unwrap();
        assert_eq!(out, ok);
    }

    #[test]
    fn a_row_that_does_not_match_its_columns_ends_the_session() {
        let mut machine = ResponseMachine::new(caps());
        customers_query(&mut machine);
        let mut payloads = customers_columns();
        payloads.push(text_row(&[Some("1"), Some("2")]));
        let err = masker(&[])
            .chunk(framed(1, &payloads), &mut machine, 1 << 24)
            .unwrap_err();
        assert!(err.contains("cannot mask a result row"), "{err}");
    }

    #[test]
    fn err_messages_lose_their_findings_and_keep_number_and_sqlstate() {
        use crate::protocol::mysql::handshake::{ErrPacket, parse_err};
        let mut machine = ResponseMachine::new(caps());
        machine
            .client(0, b"\x03insert into people select * from x")
            .unwrap();
        let err = ErrPacket::new(
            1062,
            "23000",
            "Duplicate entry 'ada@example.com' for key 'email'",
        );
        let chunk = framed(1, &[err.encode().to_vec()]);
        let mut m = masker(&[]);
        let (out, reports) = m.chunk(chunk, &mut machine, 1 << 24).unwrap();
        assert!(machine.is_idle());
        let got = unframe(&out);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 1);
        assert_eq!(
            parse_err(&got[0].1).unwrap(),
            ErrPacket::new(1062, "23000", "Duplicate entry '****' for key 'email'")
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].fired[0].column, "error message");
        assert_eq!(reports[0].fired[0].rule, "detector:email");

        // An OK with nothing to hide, and an ERR with nothing found: the same bytes.
        machine.client(0, b"\x03update t set a = 1").unwrap();
        let ok = OkPacket {
            affected_rows: 1,
            info: "Rows matched: 1  Changed: 1  Warnings: 0".into(),
            ..OkPacket::default()
        };
        let wire = framed(1, &[ok.encode(0, caps()).to_vec()]);
        let (out, reports) = m.chunk(wire.clone(), &mut machine, 1 << 24).unwrap();
        assert_eq!(out.as_ptr(), wire.as_ptr());
        assert!(reports.is_empty());
        machine.client(0, b"\x03select nope").unwrap();
        let plain = ErrPacket::new(1054, "42S22", "Unknown column 'nope' in 'field list'");
        let wire = framed(1, &[plain.encode().to_vec()]);
        let (out, reports) = m.chunk(wire.clone(), &mut machine, 1 << 24).unwrap();
        assert_eq!(out.as_ptr(), wire.as_ptr());
        assert!(reports.is_empty());
    }
}
