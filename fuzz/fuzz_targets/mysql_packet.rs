//! Arbitrary bytes as a MySQL/MariaDB stream: framing (with and without sequence-id checks,
//! 16 MiB reassembly), every payload decoder (handshake, response, auth replies, OK/ERR/EOF,
//! commands and COM_CHANGE_USER, column definitions, text/binary rows, execute parameters,
//! a server's RSA public key), the response state
//! machine under two capability sets, and the Transcriber must never panic. Every payload also
//! goes through the row rewriter (masking's codec) as a text and a binary row: a rewritten row
//! must decode with the same columns, keep its NULLs NULL, and a rejected one writes nothing.
//! Every payload also goes through the ERR-message and OK-info rewriters: a rewritten ERR
//! decodes with the same number and SQLSTATE, a rewritten OK decodes exactly when the original
//! did, with the same counts and status.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::mysql::Capabilities;
use protocol::mysql::command::{decode_command, decode_execute_params};
use protocol::mysql::handshake::{
    parse_auth_reply, parse_change_user, parse_client_handshake, parse_eof, parse_err,
    parse_handshake, parse_ok,
};
use protocol::mysql::rsa::PublicKey;
use protocol::mysql::response::{Event, ResponseMachine};
use protocol::mysql::resultset::{
    ColumnDef, Value, decode_binary_row, decode_text_row, parse_column_def,
};
use protocol::mysql::rewrite::{Cell, RowFormat, rewrite_err_message, rewrite_ok_info, rewrite_row};
use protocol::mysql::{Decoder, Transcriber, packet_len, packets, whole_packets};

const MAX: usize = 1 << 20;

fn machine(caps: Capabilities, data: &[u8]) {
    let mut m = ResponseMachine::new(caps);
    for p in packets(data, MAX) {
        let Ok(p) = p else { break };
        if p.seq == 0 {
            let _ = m.client(p.seq, &p.payload);
        } else if let Ok(Event::Row(row)) = m.server(&p.payload) {
            let _ = m.row(row).map(|v| v.iter().map(|v| v.render()).count());
        }
    }
}

/// Rewrites `payload` as a row of `format` with a masker that replaces, nulls or keeps values
/// by their first byte, and checks the result.
fn rewrite(payload: &[u8], format: RowFormat<'_>) {
    fn decode<'a>(b: &'a [u8], format: RowFormat<'_>) -> Option<Vec<Value<'a>>> {
        match format {
            RowFormat::Text { columns } => decode_text_row(b, columns).ok(),
            RowFormat::Binary { columns } => decode_binary_row(b, columns).ok(),
        }
    }
    let mut out = vec![0xAA];
    let mut scratch = Vec::new();
    let result = rewrite_row(
        payload,
        format,
        &mut scratch,
        |_, v, s| match v.first().map(|b| b % 3) {
            Some(0) => {
                s.extend_from_slice(&v[..v.len() / 2]);
                s.extend_from_slice(b"****");
                Cell::Replaced
            }
            Some(1) => Cell::Null,
            _ => Cell::Keep,
        },
        &mut out,
    );
    match result {
        Ok(true) => {
            let before = decode(payload, format).expect("a rewritten row was valid");
            let after = decode(&out[1..], format).expect("the rewritten row decodes");
            assert_eq!(before.len(), after.len());
            for (b, a) in before.iter().zip(&after) {
                assert!(*b != Value::Null || *a == Value::Null, "NULL became a value");
            }
        }
        _ => assert_eq!(out, [0xAA]),
    }
}

/// Rewrites `payload` as an ERR message and an OK info (replaced when their first byte is
/// even) and checks the results.
fn rewrite_text(payload: &[u8], caps: Capabilities) {
    let mask = |v: &[u8], s: &mut Vec<u8>| match v.first() {
        Some(b) if b % 2 == 0 => {
            s.extend_from_slice(&v[..v.len() / 2]);
            s.extend_from_slice(b"****");
            true
        }
        _ => false,
    };
    let mut out = Vec::new();
    match rewrite_err_message(payload, &mut Vec::new(), mask, &mut out) {
        Ok(true) => {
            let before = parse_err(payload).expect("a rewritten ERR was valid");
            let after = parse_err(&out).expect("the rewritten ERR decodes");
            assert_eq!((before.code, before.sql_state), (after.code, after.sql_state));
        }
        _ => assert!(out.is_empty()),
    }
    let mut out = Vec::new();
    match rewrite_ok_info(payload, caps, &mut Vec::new(), mask, &mut out) {
        Ok(true) => {
            let before = parse_ok(payload, caps);
            let after = parse_ok(&out, caps);
            assert_eq!(before.is_ok(), after.is_ok());
            if let (Ok(b), Ok(a)) = (before, after) {
                assert_eq!(
                    (b.affected_rows, b.last_insert_id, b.status, b.warnings, b.session_state),
                    (a.affected_rows, a.last_insert_id, a.status, a.warnings, a.session_state)
                );
            }
        }
        _ => assert!(out.is_empty()),
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = packet_len(data, MAX);
    let mut d = Decoder::new(MAX);
    let mut at = 0;
    while let Ok(Some((n, _))) = d.decode(&data[at..]) {
        at += n;
    }
    let Ok(whole) = whole_packets(data, MAX) else {
        return;
    };
    let data = &data[..whole];
    let default = Capabilities::sluice_default();
    let mariadb = default
        .without(Capabilities::DEPRECATE_EOF)
        .union(Capabilities::MARIADB_CACHE_METADATA)
        .union(Capabilities::MARIADB_EXTENDED_TYPE_INFO)
        .union(Capabilities::SESSION_TRACK)
        .union(Capabilities::MARIADB_PROGRESS);
    let columns: Vec<ColumnDef> = [1u8, 3, 8, 5, 12, 11, 253, 246]
        .iter()
        .map(|&t| ColumnDef {
            column_type: t,
            flags: if t == 8 { 0x20 } else { 0 },
            ..ColumnDef::default()
        })
        .collect();
    for p in packets(data, MAX) {
        let Ok(p) = p else { break };
        let b = &p.payload[..];
        let _ = parse_handshake(b).map(|h| h.encode());
        let _ = parse_client_handshake(b);
        for caps in [default, mariadb] {
            let _ = parse_auth_reply(b, caps);
            let _ = parse_ok(b, caps).map(|ok| ok.encode(0, caps));
            let _ = decode_command(b, caps);
            let _ = parse_column_def(b, caps);
            // A change-user command that decodes re-encodes to something that decodes the same.
            if let Ok(c) = parse_change_user(b, caps) {
                let again = parse_change_user(&c.encode(caps), caps).expect("re-encoded");
                assert_eq!(again.user, c.user);
                let _ = c.without_credentials(caps);
            }
        }
        // A server's RSA key (caching_sha2 full auth without TLS) is PEM from the backend.
        if let Ok(key) = PublicKey::from_pem(b) {
            let _ = key.encrypt_oaep_sha1(b"password\0");
        }
        let _ = parse_err(b).map(|e| e.encode());
        let _ = parse_eof(b);
        let _ = decode_text_row(b, 4);
        let _ = decode_binary_row(b, &columns).map(|v| v.iter().map(|v| v.render()).count());
        let _ = decode_execute_params(b, 3, &[], &[]);
        rewrite_text(b, default);
        rewrite_text(b, mariadb);
        rewrite(b, RowFormat::Text { columns: 4 });
        rewrite(b, RowFormat::Binary { columns: &columns });
    }
    machine(default, data);
    machine(mariadb, data);
    let mut t = Transcriber::new();
    let _ = t.server(data);
    let _ = t.client(data);
    let _ = t.server(data);
    let mut t = Transcriber::with_capabilities(mariadb);
    let _ = t.client(data);
    let _ = t.server(data);
});
