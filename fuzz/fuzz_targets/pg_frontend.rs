//! Arbitrary bytes as a client stream: startup framing and parsing, typed framing, frontend
//! decoding and the Transcriber must never panic.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/protocol/mod.rs"]
mod protocol;

use libfuzzer_sys::fuzz_target;
use protocol::postgres::{
    Transcriber, decode_frontend, messages, parse_startup, startup_len, whole_messages,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(n)) = startup_len(data, 10_000) {
        if let Ok(p) = parse_startup(&data[..n]) {
            let _ = p.param("user");
        }
    }
    let Ok(whole) = whole_messages(data, 1 << 20) else {
        return;
    };
    assert!(whole <= data.len());
    for m in messages(data) {
        let Ok((tag, body)) = m else { break };
        let _ = format!("{:?}", decode_frontend(tag, body));
    }
    // Feed the same bytes as client chunks and, afterwards, as if the server had answered
    // with them, so that both state machines see arbitrary sequences.
    let mut t = Transcriber::new();
    let (a, b) = data[..whole].split_at(whole / 2);
    let _ = t.client(a);
    let _ = t.server(b);
    let _ = t.client(&data[..whole]);
});
