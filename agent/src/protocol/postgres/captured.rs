//! Tests over real sessions captured between psql/pgbench/a raw client and PostgreSQL 15
//! (`agent/testdata/postgres`, see its README): framing at every prefix, decoding of every
//! message, and transcription in recording order.
#![allow(clippy::unwrap_used)]

use super::backend::{Backend, decode_backend};
use super::frame::{message_len, messages, whole_messages};
use super::frontend::{Frontend, decode_frontend};
use super::startup::{StartupPacket, parse_startup, startup_len};
use super::transcript::Transcriber;
use crate::protocol::Item;

const MAX: usize = 1 << 20;
const STARTUP_MAX: usize = 10_000;

struct Capture {
    name: &'static str,
    client: &'static [u8],
    server: &'static [u8],
    session: &'static [u8],
}

macro_rules! capture {
    ($name:literal) => {
        Capture {
            name: $name,
            client: include_bytes!(concat!("../../../testdata/postgres/", $name, ".client.bin")),
            server: include_bytes!(concat!("../../../testdata/postgres/", $name, ".server.bin")),
            session: include_bytes!(concat!("../../../testdata/postgres/", $name, ".session")),
        }
    };
}

const CAPTURES: [Capture; 5] = [
    capture!("simple_query"),
    capture!("pgbench_prepared"),
    capture!("copy_in"),
    capture!("extended_binary"),
    capture!("ssl_refused"),
];

/// Splits the untyped startup packets off a client stream.
fn split_startup(client: &[u8]) -> (Vec<StartupPacket>, &[u8]) {
    let mut packets = Vec::new();
    let mut rest = client;
    loop {
        let n = startup_len(rest, STARTUP_MAX).unwrap().unwrap();
        let p = parse_startup(&rest[..n]).unwrap();
        rest = &rest[n..];
        let done = matches!(p, StartupPacket::Startup { .. });
        packets.push(p);
        if done {
            return (packets, rest);
        }
    }
}

/// The typed parts of a capture: (startup packets, client messages, server messages).
fn typed(c: &Capture) -> (Vec<StartupPacket>, &'static [u8], &'static [u8]) {
    let (packets, client) = split_startup(c.client);
    // One single-byte answer per SSLRequest precedes the server's typed messages.
    let answers = packets
        .iter()
        .filter(|p| matches!(p, StartupPacket::SslRequest))
        .count();
    (packets, client, &c.server[answers..])
}

fn tags(stream: &[u8]) -> String {
    messages(stream).map(|m| char::from(m.unwrap().0)).collect()
}

#[test]
fn every_prefix_of_every_captured_stream_frames_without_error() {
    for c in &CAPTURES {
        let (_, client, server) = typed(c);
        for stream in [client, server] {
            let mut ends = vec![0];
            for m in messages(stream) {
                let (_, body) = m.unwrap();
                ends.push(ends.last().unwrap() + 5 + body.len());
            }
            assert_eq!(*ends.last().unwrap(), stream.len(), "{}", c.name);
            for end in 0..=stream.len() {
                let prefix = &stream[..end];
                let want = ends.iter().copied().filter(|&e| e <= end).max().unwrap();
                assert_eq!(whole_messages(prefix, MAX), Ok(want), "{} at {end}", c.name);
                let first = message_len(prefix, MAX).unwrap();
                assert_eq!(
                    first,
                    (end >= ends[1]).then_some(ends[1]),
                    "{} at {end}",
                    c.name
                );
            }
        }
        // The startup packet too: incomplete until its last byte.
        let first = startup_len(c.client, STARTUP_MAX).unwrap().unwrap();
        for end in 0..first {
            assert_eq!(startup_len(&c.client[..end], STARTUP_MAX), Ok(None));
        }
    }
}

#[test]
fn every_captured_message_decodes_into_the_expected_tags() {
    let expected = [
        (
            "QQQQQQQQQX",
            "RSSSSSSSSSSSSSKZCZCZTDDDCZEZNCZCZCAZHdddcCZTDCZ",
        ),
        ("PSBDESBDESBDESX", "RSSSSSSSSSSSSSKZ1Z2TDCZ2TDCZ2TDCZ"),
        ("QdcX", "RSSSSSSSSSSSSSKZGCZ"),
        (
            "PBDESPDSBESBESPBEESPBESCHSX",
            "RSSSSSSSSSSSSSKZ12TDCZ1tTZ2DDCZ2DCZ12DDsDCZ1EZ3Z",
        ),
        ("QX", "RSSSSSSSSSSSSSKZTDCZ"),
    ];
    for (c, (want_client, want_server)) in CAPTURES.iter().zip(expected) {
        let (_, client, server) = typed(c);
        assert_eq!(tags(client), want_client, "{}", c.name);
        assert_eq!(tags(server), want_server, "{}", c.name);
        for m in messages(client) {
            let (tag, body) = m.unwrap();
            let msg = decode_frontend(tag, body).unwrap();
            assert!(!matches!(msg, Frontend::Unknown { .. }), "{}", c.name);
        }
        for m in messages(server) {
            let (tag, body) = m.unwrap();
            let msg = decode_backend(tag, body).unwrap();
            assert!(!matches!(msg, Backend::Unknown { .. }), "{}", c.name);
        }
    }
}

#[test]
fn every_prefix_of_every_captured_message_body_decodes_or_errors_without_panicking() {
    for c in &CAPTURES {
        let (_, client, server) = typed(c);
        for m in messages(client) {
            let (tag, body) = m.unwrap();
            for end in 0..body.len() {
                let _ = decode_frontend(tag, &body[..end]);
            }
        }
        for m in messages(server) {
            let (tag, body) = m.unwrap();
            for end in 0..body.len() {
                let _ = decode_backend(tag, &body[..end]);
            }
        }
    }
}

#[test]
fn captured_startup_packets_name_the_user_and_database() {
    let (packets, _, _) = typed(&CAPTURES[4]);
    assert_eq!(packets[0], StartupPacket::SslRequest);
    assert_eq!(packets[1].param("user"), Some("postgres"));
    assert_eq!(packets[1].param("database"), Some("postgres"));
    let (packets, _, _) = typed(&CAPTURES[1]);
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].param("application_name"), Some("pgbench"));
}

/// Replays a `.session` log the way the proxy journals it: each direction is reframed into
/// whole messages (startup packets and SSL answers skipped) and fed to a Transcriber in the
/// order the relay saw the bytes.
fn transcribe(c: &Capture) -> Vec<Item> {
    let (packets, _, _) = typed(c);
    let mut ssl_answers = packets
        .iter()
        .filter(|p| matches!(p, StartupPacket::SslRequest))
        .count();
    let mut client_skip = c.client.len() - typed(c).1.len();
    let mut client = Vec::new();
    let mut server = Vec::new();
    let mut t = Transcriber::new();
    let mut items = Vec::new();
    let mut log = c.session;
    while !log.is_empty() {
        let dir = log[0];
        let n = u32::from_be_bytes([log[1], log[2], log[3], log[4]]) as usize;
        let mut chunk = &log[5..5 + n];
        log = &log[5 + n..];
        if dir == b'C' {
            let skip = client_skip.min(chunk.len());
            client_skip -= skip;
            chunk = &chunk[skip..];
            client.extend_from_slice(chunk);
            let whole = whole_messages(&client, MAX).unwrap();
            items.extend(t.client(&client[..whole]));
            client.drain(..whole);
        } else {
            let skip = ssl_answers.min(chunk.len());
            ssl_answers -= skip;
            server.extend_from_slice(&chunk[skip..]);
            let whole = whole_messages(&server, MAX).unwrap();
            items.extend(t.server(&server[..whole]));
            server.drain(..whole);
        }
    }
    assert!(client.is_empty() && server.is_empty(), "{}", c.name);
    items
}

fn stmt(sql: &str, params: &[Option<&str>]) -> Item {
    Item::Statement {
        sql: sql.into(),
        params: params.iter().map(|p| p.map(String::from)).collect(),
    }
}

fn cols(names: &[&str]) -> Item {
    Item::Columns(names.iter().map(|&n| n.into()).collect())
}

fn row(values: &[Option<&str>]) -> Item {
    Item::Row(values.iter().map(|v| v.map(String::from)).collect())
}

fn done(tag: &str) -> Item {
    Item::Complete { tag: tag.into() }
}

#[test]
fn a_simple_query_session_transcribes_to_statements_results_errors_notices_and_notifications() {
    let items = transcribe(&CAPTURES[0]);
    let want = vec![
        stmt(
            "create table t(id int primary key, name text, price numeric, ok bool);",
            &[],
        ),
        done("CREATE TABLE"),
        stmt(
            "insert into t values (1,'apple',1.5,true),(2,'pear',null,false),(3,'fig',0.25,true);",
            &[],
        ),
        done("INSERT 0 3"),
        stmt("select id, name, price, ok from t order by id;", &[]),
        cols(&["id", "name", "price", "ok"]),
        row(&[Some("1"), Some("apple"), Some("1.5"), Some("t")]),
        row(&[Some("2"), Some("pear"), None, Some("f")]),
        row(&[Some("3"), Some("fig"), Some("0.25"), Some("t")]),
        done("SELECT 3"),
        stmt("select * from nonexistent_table;", &[]),
        Item::Error {
            code: "42P01".into(),
            message: "relation \"nonexistent_table\" does not exist".into(),
            number: None,
        },
        stmt("do $$ begin raise notice 'hello notice'; end $$;", &[]),
        Item::Notice {
            code: "00000".into(),
            message: "hello notice".into(),
        },
        done("DO"),
        stmt("listen chan1;", &[]),
        done("LISTEN"),
        stmt("notify chan1, 'the payload';", &[]),
        done("NOTIFY"),
        Item::Notification {
            channel: "chan1".into(),
            payload: "the payload".into(),
        },
        stmt("copy (select id, name from t order by id) to stdout;", &[]),
        row(&[Some("1"), Some("apple")]),
        row(&[Some("2"), Some("pear")]),
        row(&[Some("3"), Some("fig")]),
        done("COPY 3"),
        stmt("select;", &[]),
        cols(&[]),
        row(&[]),
        done("SELECT 1"),
    ];
    assert_eq!(items, want);
}

#[test]
fn a_prepared_statement_shows_its_sql_with_each_executions_parameters() {
    let items = transcribe(&CAPTURES[1]);
    assert_eq!(items.len(), 12, "{items:#?}");
    for exec in items.chunks(4) {
        let Item::Statement { sql, params } = &exec[0] else {
            panic!("{exec:?}")
        };
        assert_eq!(sql, "SELECT abalance FROM pgbench_accounts WHERE aid = $1;");
        assert_eq!(params.len(), 1);
        let aid: u32 = params[0].as_deref().unwrap().parse().unwrap();
        assert!((1..=100_000).contains(&aid));
        assert_eq!(
            exec[1..],
            [cols(&["abalance"]), row(&[Some("0")]), done("SELECT 1")]
        );
    }
}

#[test]
fn copy_from_stdin_lines_become_rows_with_nulls() {
    assert_eq!(
        transcribe(&CAPTURES[2]),
        vec![
            stmt("COPY  t FROM STDIN ", &[]),
            row(&[Some("10"), Some("kiwi"), Some("2"), Some("t")]),
            row(&[Some("11"), Some("lime"), None, Some("f")]),
            done("COPY 2"),
        ]
    );
}

#[test]
fn binary_results_of_known_types_are_decoded_and_others_shown_as_hex() {
    let s1 = "select id, name, ok, id::int8 as big, id::float8 as f, price from t where id <= $1 order by id";
    let s1_cols = ["id", "name", "ok", "big", "f", "price"];
    let series = "select coalesce($1, 'none') as v from generate_series(1,3)";
    let items = transcribe(&CAPTURES[3]);
    let want = vec![
        stmt(
            "select $1::int + 1 as n, 'hi'::text as greeting",
            &[Some("41")],
        ),
        cols(&["n", "greeting"]),
        row(&[Some("42"), Some("hi")]),
        done("SELECT 1"),
        stmt(s1, &[Some("2")]),
        cols(&s1_cols),
        // numeric 1.5 in binary: ndigits 2, weight 0, sign +, dscale 1, digits 1, 5000.
        row(&[
            Some("1"),
            Some("apple"),
            Some("t"),
            Some("1"),
            Some("1"),
            Some("\\x000200000000000100011388"),
        ]),
        row(&[
            Some("2"),
            Some("pear"),
            Some("f"),
            Some("2"),
            Some("2"),
            None,
        ]),
        done("SELECT 2"),
        stmt(s1, &[Some("1")]),
        cols(&s1_cols),
        row(&[
            Some("1"),
            Some("apple"),
            Some("t"),
            Some("1"),
            Some("1"),
            Some("\\x000200000000000100011388"),
        ]),
        done("SELECT 1"),
        stmt(series, &[None]),
        row(&[Some("none")]),
        row(&[Some("none")]),
        row(&[Some("none")]),
        done("SELECT 1"),
        stmt("select 1/0", &[]),
        Item::Error {
            code: "22012".into(),
            message: "division by zero".into(),
            number: None,
        },
    ];
    assert_eq!(items, want);
}

#[test]
fn a_session_after_a_refused_ssl_request_transcribes_normally() {
    assert_eq!(
        transcribe(&CAPTURES[4]),
        vec![
            stmt("select 1", &[]),
            cols(&["?column?"]),
            row(&[Some("1")]),
            done("SELECT 1"),
        ]
    );
}

#[test]
fn malformed_chunks_become_sluice_errors_not_panics() {
    let mut t = Transcriber::new();
    for bad in [
        &b"Q\0\0\0\x02"[..],
        b"Q\0\0\0\x09abc",
        b"Q\0\0\0\x05",
        b"B\0\0\0\x06\0\0",
    ] {
        let items = t.client(bad);
        assert!(
            matches!(&items[..], [Item::Error { code, message, .. }] if code == "sluice" && message.starts_with("undecodable client message")),
            "{bad:?}: {items:?}"
        );
    }
    let items = t.server(b"T\0\0\0\x06\0\x05");
    assert!(matches!(&items[..], [Item::Error { code, .. }] if code == "sluice"));
}

#[test]
fn a_password_message_never_reaches_the_transcript() {
    let mut t = Transcriber::new();
    assert!(t.client(b"p\0\0\0\x0chunter2\0").is_empty());
}
