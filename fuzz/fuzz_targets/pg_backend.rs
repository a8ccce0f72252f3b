//! Arbitrary bytes as a server stream: typed framing, backend decoding (including every view:
//! row descriptions, data rows, error fields) and the Transcriber must never panic.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::postgres::backend::Backend;
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
    let mut t = Transcriber::new();
    let _ = t.server(&data[..whole]);
    let _ = t.client(&data[..whole]);
    let _ = t.server(&data[..whole]);
});
