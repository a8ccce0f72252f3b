//! Arbitrary bytes as a server stream: typed framing, backend decoding (including every view:
//! row descriptions, data rows, error fields) and the Transcriber must never panic. Every
//! message also goes through masking's text rewriter (errors, notices, notifications,
//! parameters) with a function that replaces some values (NUL and invalid UTF-8 included): a
//! rewrite is one whole message of the same tag that decodes whenever the original did, with
//! every code field unchanged; no rewrite writes nothing.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use bytes::BytesMut;
use protocol::postgres::backend::{
    Backend, DIAGNOSTIC_CODE_FIELDS, TextField, rewrite_text_fields,
};
use protocol::postgres::{Transcriber, decode_backend, message_len, messages, whole_messages};

fuzz_target!(|data: &[u8]| {
    let _ = message_len(data, 1 << 20);
    let Ok(whole) = whole_messages(data, 1 << 20) else {
        return;
    };
    for m in messages(&data[..whole]) {
        let Ok((tag, body)) = m else { break };
        match decode_backend(tag, body) {
            Ok(Backend::RowDescription(f)) => f.iter().for_each(|f| drop(format!("{f:?}"))),
            Ok(Backend::DataRow(v)) => v.iter().for_each(|v| drop(format!("{v:?}"))),
            Ok(Backend::ErrorResponse(d) | Backend::NoticeResponse(d)) => {
                let _ = (d.severity(), d.sqlstate(), d.message(), d.iter().count());
            }
            other => drop(format!("{other:?}")),
        }
    }
    for m in messages(&data[..whole]) {
        let Ok((tag, body)) = m else { break };
        rewrite(tag, body);
    }
    let mut t = Transcriber::new();
    let _ = t.server(&data[..whole]);
    let _ = t.client(&data[..whole]);
    let _ = t.server(&data[..whole]);
});

/// Replaces values whose first byte is even with half of them and bytes a field cannot hold.
fn rewrite(tag: u8, body: &[u8]) {
    let mut out = BytesMut::from(&b"keep"[..]);
    let mut scratch = Vec::new();
    let result = rewrite_text_fields(
        tag,
        body,
        &mut scratch,
        |_: TextField, v: &[u8], s: &mut Vec<u8>| match v.first() {
            Some(b) if b % 2 == 0 => {
                s.extend_from_slice(&v[..v.len() / 2]);
                s.extend_from_slice(b"*\0\xff*");
                true
            }
            _ => false,
        },
        &mut out,
    );
    match result {
        Ok(true) => {
            assert_eq!(&out[..4], b"keep");
            let msg = &out[4..];
            assert_eq!(msg[0], tag);
            let len = i32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]);
            assert_eq!(usize::try_from(len).ok(), Some(msg.len() - 1));
            let new = &msg[5..];
            if let Ok(old) = decode_backend(tag, body) {
                let got = decode_backend(tag, new).expect("a rewrite of a valid message decodes");
                if let (
                    Backend::ErrorResponse(a) | Backend::NoticeResponse(a),
                    Backend::ErrorResponse(b) | Backend::NoticeResponse(b),
                ) = (old, got)
                {
                    for code in DIAGNOSTIC_CODE_FIELDS {
                        assert_eq!(a.get(*code), b.get(*code));
                    }
                    assert_eq!(a.iter().count(), b.iter().count());
                }
            }
        }
        _ => assert_eq!(&out[..], b"keep"),
    }
}
