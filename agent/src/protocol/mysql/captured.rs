//! Tests over real sessions captured between the `mariadb` CLI / mysql-connector-python and
//! MariaDB 10.11 (`agent/testdata/mysql`, see its README): framing at every prefix, and
//! transcription in recording order, including of every truncation.
#![allow(clippy::unwrap_used)]

use super::packet::{packet_len, packets, whole_packets};
use super::transcript::Transcriber;
use crate::protocol::Item;

const MAX: usize = 1 << 24;

struct Capture {
    name: &'static str,
    session: &'static [u8],
}

macro_rules! capture {
    ($name:literal) => {
        Capture {
            name: $name,
            session: include_bytes!(concat!("../../../testdata/mysql/", $name, ".session")),
        }
    };
}

const CAPTURES: [Capture; 2] = [capture!("cli_text"), capture!("connector_python_prepared")];

/// The relay's records: (from the client?, bytes).
fn records(session: &[u8]) -> Vec<(bool, &[u8])> {
    let mut out = Vec::new();
    let mut rest = session;
    while let [dir, a, b, c, d, tail @ ..] = rest {
        let n = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        out.push((*dir == b'C', &tail[..n]));
        rest = &tail[n..];
    }
    out
}

fn stream(session: &[u8], client: bool) -> Vec<u8> {
    records(session)
        .into_iter()
        .filter(|(c, _)| *c == client)
        .flat_map(|(_, b)| b.iter().copied())
        .collect()
}

/// Feeds the session as the journal would hold it: whole packets per chunk, in order.
fn transcribe(session: &[u8]) -> Vec<Item> {
    let mut t = Transcriber::new();
    let (mut client, mut server) = (Vec::new(), Vec::new());
    let mut items = Vec::new();
    for (from_client, bytes) in records(session) {
        let buf = if from_client {
            &mut client
        } else {
            &mut server
        };
        buf.extend_from_slice(bytes);
        let n = whole_packets(buf, MAX).unwrap();
        let chunk: Vec<u8> = buf.drain(..n).collect();
        if chunk.is_empty() {
            continue;
        }
        items.extend(if from_client {
            t.client(&chunk)
        } else {
            t.server(&chunk)
        });
    }
    items
}

#[test]
fn every_prefix_of_every_captured_stream_frames_without_error() {
    for c in &CAPTURES {
        for s in [stream(c.session, true), stream(c.session, false)] {
            let mut ends = vec![0];
            for p in packets(&s, MAX) {
                let p = p.unwrap();
                ends.push(ends.last().unwrap() + 4 + p.payload.len());
            }
            assert_eq!(*ends.last().unwrap(), s.len(), "{}", c.name);
            for end in 0..=s.len() {
                let want = ends.iter().copied().filter(|&e| e <= end).max().unwrap();
                assert_eq!(
                    whole_packets(&s[..end], MAX),
                    Ok(want),
                    "{} at {end}",
                    c.name
                );
                assert_eq!(
                    packet_len(&s[..end], MAX).unwrap(),
                    (end >= ends[1]).then_some(ends[1]),
                    "{} at {end}",
                    c.name
                );
            }
        }
    }
}

#[test]
fn the_cli_session_transcribes_to_its_statements_and_results() {
    let items = transcribe(CAPTURES[0].session);
    let no_errors = items
        .iter()
        .all(|i| !matches!(i, Item::Error { code, .. } if code == "sluice"));
    assert!(no_errors, "{items:#?}");
    let find = |want: &Item| items.iter().position(|i| i == want);
    let select = find(&Item::Statement {
        sql: "select id, name, price, born from t order by id".into(),
        params: vec![],
    })
    .unwrap();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        items[select + 1..select + 6],
        [
            Item::Columns(vec![
                "id".into(),
                "name".into(),
                "price".into(),
                "born".into()
            ]),
            Item::Row(vec![s("1"), s("ann"), s("1.50"), s("2001-02-03")]),
            Item::Row(vec![s("2"), s("bob"), None, None]),
            Item::Row(vec![s("3"), s("cy"), s("3.00"), s("1999-12-31")]),
            Item::Complete {
                tag: "SELECT 3 rows".into()
            },
        ]
    );
    let multi = find(&Item::Statement {
        sql: "select 1 as a; select 2 as b; update t set name = 'x' where id = 3".into(),
        params: vec![],
    })
    .unwrap();
    assert_eq!(
        items[multi + 1..multi + 8],
        [
            Item::Columns(vec!["a".into()]),
            Item::Row(vec![s("1")]),
            Item::Complete {
                tag: "SELECT 1 row".into()
            },
            Item::Columns(vec!["b".into()]),
            Item::Row(vec![s("2")]),
            Item::Complete {
                tag: "SELECT 1 row".into()
            },
            Item::Complete {
                tag: "OK 1 row affected".into()
            },
        ]
    );
    assert!(
        find(&Item::Error {
            code: "42S02".into(),
            message: "Table 'shop.nope' doesn't exist".into(),
            number: Some(1146),
        })
        .is_some()
    );
}

#[test]
fn the_prepared_session_transcribes_each_execution_with_its_parameters() {
    let items = transcribe(CAPTURES[1].session);
    let s = |v: &str| Some(v.to_owned());
    let executions: Vec<&Item> = items
        .iter()
        .filter(|i| matches!(i, Item::Statement { params, .. } if !params.is_empty()))
        .collect();
    assert_eq!(
        executions[1],
        &Item::Statement {
            sql: "insert into p values (?, ?, ?, ?, ?, ?)".into(),
            params: vec![
                s("2"),
                s("bob"),
                s("-2.25"),
                s("1999-12-31 23:59:59"),
                s("7"),
                s("hi")
            ]
        }
    );
    let rows: Vec<&Item> = items.iter().filter(|i| matches!(i, Item::Row(_))).collect();
    assert_eq!(
        rows,
        [
            &Item::Row(vec![
                s("1"),
                s("ann"),
                s("1.5"),
                s("2001-02-03 04:05:06"),
                s("18446744073709551615"),
                None
            ]),
            &Item::Row(vec![
                s("2"),
                s("bob"),
                s("-2.25"),
                s("1999-12-31 23:59:59"),
                s("7"),
                s("hi")
            ]),
        ]
    );
}

#[test]
fn every_truncation_of_a_captured_session_transcribes_without_panicking() {
    for c in &CAPTURES {
        let full = transcribe(c.session);
        let recs = records(c.session);
        // Every prefix of the records, as whole-packet chunks: a prefix of the full items.
        for n in 0..=recs.len() {
            let mut partial = Vec::new();
            for (from_client, bytes) in &recs[..n] {
                partial.push(if *from_client { b'C' } else { b'S' });
                partial.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                partial.extend_from_slice(bytes);
            }
            let items = transcribe(&partial);
            assert!(full.starts_with(&items), "{} at record {n}", c.name);
        }
        // Every byte prefix of each direction fed raw (a partial last packet): no panic.
        let (client, server) = (stream(c.session, true), stream(c.session, false));
        for end in 0..=server.len() {
            let mut t = Transcriber::new();
            let _ = t.client(&client);
            let _ = t.server(&server[..end]);
        }
        for end in 0..=client.len() {
            let mut t = Transcriber::new();
            let _ = t.server(&server);
            let _ = t.client(&client[..end]);
        }
    }
}

#[test]
fn the_captured_greetings_and_responses_parse() {
    use super::handshake::{
        Capabilities, ClientHandshake, parse_client_handshake, parse_handshake,
    };
    for c in &CAPTURES {
        let server = stream(c.session, false);
        let client = stream(c.session, true);
        let greeting = packets(&server, MAX).next().unwrap().unwrap();
        let h = parse_handshake(&greeting.payload).unwrap();
        assert!(h.server_version.contains("MariaDB"), "{}", h.server_version);
        assert_eq!(h.nonce.len(), 20);
        assert_eq!(h.auth_plugin, "mysql_native_password");
        assert!(
            h.capabilities
                .contains(Capabilities::MARIADB_CACHE_METADATA)
        );
        assert!(h.capabilities.contains(Capabilities::DEPRECATE_EOF));
        let response = packets(&client, MAX).next().unwrap().unwrap();
        assert_eq!(response.seq, 1);
        let ClientHandshake::Response(r) = parse_client_handshake(&response.payload).unwrap()
        else {
            panic!("{}: an SSLRequest", c.name)
        };
        assert_eq!(r.username, "app", "{}", c.name);
        assert_eq!(r.database.as_deref(), Some("shop"));
        assert_eq!(r.auth_response.len(), 20);
        assert!(!r.attributes.is_empty());
        // Neither client asks for DEPRECATE_EOF: MariaDB's own CLI still reads EOF packets.
        assert!(!r.capabilities.contains(Capabilities::DEPRECATE_EOF));
    }
}
