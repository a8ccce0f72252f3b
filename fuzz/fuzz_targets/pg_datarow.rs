//! Arbitrary bytes as a DataRow body (and as COPY text data) through the masking rewriter:
//! never a panic; a rewritten row always parses back with the plan's column count and
//! consistent lengths; an unchanged or rejected row writes nothing.
//!
//! The same bytes go through the plan for text outside rows (error fields, notification
//! payloads), with and without a column rule set on it: never a panic, and a replacement is
//! never empty.
//!
//! The first input byte picks the columns' types, formats and names (so column rules, binary
//! nulling, jsonb version bytes and content detection are all reached); the rest is the body.
//! Like the other targets this compiles the agent's module from source (`#[path]`); the mask
//! module needs `regex`, `ring` and `toml` in fuzz/Cargo.toml besides bytes/serde/thiserror.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/mask/mod.rs"]
mod mask;

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mask::engine::{ColumnDesc, MaskPlan};
use mask::pgrow::{DataRow, Format, RowRewrite, rewrite_copy_text, rewrite_data_row, value_kind};
use mask::rules::{Audience, Origin, RuleSet};

const RULES: &str = r#"
[hash]
key_hex = "000102030405060708090a0b0c0d0e0f"
[[column]]
name = "email"
column = "email"
strategy = "partial"
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
[[detector]]
name = "card"
strategy = "partial"
[[detector]]
name = "iban"
strategy = "hash"
[[detector]]
name = "us_ssn"
strategy = "redact"
[[detector]]
name = "phone"
strategy = "partial"
[[detector]]
name = "ipv4"
strategy = "redact"
[[detector]]
name = "ipv6"
strategy = "redact"
[[detector]]
name = "jwt"
strategy = "redact"
[[detector]]
name = "api_key"
strategy = "redact"
[[detector]]
name = "structural"
regex = "x[,\"(){}]+y"
strategy = "redact"
"#;

/// text, int8, json, jsonb, text[], unknown (0), a composite, inet.
const TYPES: [u32; 8] = [25, 20, 114, 3802, 1009, 0, 16_384, 869];
const NAMES: [&str; 4] = ["email", "tax_id", "ssn", "notes"];

fn rules() -> Arc<RuleSet> {
    static RULES_SET: OnceLock<Arc<RuleSet>> = OnceLock::new();
    RULES_SET
        .get_or_init(|| Arc::new(RuleSet::from_toml(RULES, None).expect("fuzz rules compile")))
        .clone()
}

/// The framed message's body, after checking its tag and length field.
fn unframe(tag: u8, msg: &[u8]) -> &[u8] {
    assert_eq!(msg[0], tag);
    let len = i32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]);
    assert_eq!(usize::try_from(len).ok(), Some(msg.len() - 1));
    &msg[5..]
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    // The column count the body claims (capped), so most inputs reach the masking path.
    let claimed = body.get(..2).map_or(0, |b| {
        i16::from_be_bytes([b[0], b[1]]).clamp(0, 64) as usize
    });
    let s = usize::from(sel);
    let cols: Vec<ColumnDesc<'_>> = (0..claimed)
        .map(|i| ColumnDesc {
            origin: Origin {
                name: NAMES[(s + i) % NAMES.len()],
                ..Origin::default()
            },
            kind: value_kind(
                TYPES[(s / 4 + i) % TYPES.len()],
                if (sel >> (i % 8)) & 1 == 1 {
                    Format::Binary
                } else {
                    Format::Text
                },
            ),
        })
        .collect();
    let mut plan = MaskPlan::new(rules(), "fuzz", Audience::Groups(&[]), &cols);

    let mut out = BytesMut::new();
    match rewrite_data_row(body, &mut plan, &mut out) {
        Ok(RowRewrite::Unchanged) => assert!(out.is_empty()),
        Ok(RowRewrite::Rewritten) => {
            let original = DataRow::parse(body).expect("a rewritten row was valid");
            let row = DataRow::parse(unframe(b'D', &out)).expect("rewritten row parses");
            assert_eq!(row.len(), cols.len());
            for (new, old) in row.iter().zip(original.iter()) {
                assert!(old.is_some() || new.is_none(), "NULL became a value");
            }
        }
        Err(_) => assert!(out.is_empty()),
    }

    // The same bytes as a message field (detectors only, then a column rule on the detail).
    let mut text = MaskPlan::for_text(rules(), "fuzz", Audience::Groups(&[]), &["message", "detail"]);
    let rule = rules().column_rule("fuzz", &Origin { name: NAMES[s % NAMES.len()], ..Origin::default() }).cloned();
    text.set_rule(1, rule.as_ref(), Audience::Groups(&[]));
    for col in 0..3 {
        let mut out = vec![0xAA];
        if text.apply_message_into(col, body, &mut out) {
            assert!(out.len() > 1 || body.is_empty());
            assert_eq!(out[0], 0xAA);
        } else {
            assert_eq!(out, [0xAA]);
        }
    }

    // The same bytes as COPY text data for a plan of `claimed` columns.
    let mut out = BytesMut::new();
    match rewrite_copy_text(body, &mut plan, &mut out) {
        Ok(RowRewrite::Rewritten) => {
            let payload = unframe(b'd', &out);
            let lines_in = body.split(|&b| b == b'\n').count();
            assert_eq!(payload.split(|&b| b == b'\n').count(), lines_in);
            for line in payload.split(|&b| b == b'\n') {
                let fields = line.split(|&b| b == b'\t').count();
                assert!(line.is_empty() || line == b"\\." || fields == cols.len());
            }
        }
        Ok(RowRewrite::Unchanged) | Err(_) => assert!(out.is_empty()),
    }
});
