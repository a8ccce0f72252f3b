//! Test fixture: small signed journals with PostgreSQL sessions, built from wire messages.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use sluice_journal::{Journal, Principal, ProcessInfo, Reader, SessionId, SessionStart};

/// A message: tag, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

pub fn query(sql: &str) -> Bytes {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    Bytes::from(message(b'Q', &body))
}

/// RowDescription (text columns), DataRows, CommandComplete, ReadyForQuery.
pub fn result(columns: &[&str], rows: &[&[&str]], tag: &str) -> Bytes {
    let mut out = Vec::new();
    let mut body = (columns.len() as u16).to_be_bytes().to_vec();
    for c in columns {
        body.extend_from_slice(c.as_bytes());
        body.push(0);
        body.extend_from_slice(&0u32.to_be_bytes()); // table oid
        body.extend_from_slice(&0u16.to_be_bytes()); // attnum
        body.extend_from_slice(&25u32.to_be_bytes()); // text
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0u16.to_be_bytes()); // text format
    }
    out.extend(message(b'T', &body));
    for row in rows {
        let mut body = (row.len() as u16).to_be_bytes().to_vec();
        for v in *row {
            body.extend_from_slice(&(v.len() as u32).to_be_bytes());
            body.extend_from_slice(v.as_bytes());
        }
        out.extend(message(b'D', &body));
    }
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    out.extend(message(b'C', &body));
    out.extend(message(b'Z', b"I"));
    Bytes::from(out)
}

pub fn start(principal: &str, user: &str) -> SessionStart {
    SessionStart {
        target: "app-db".into(),
        protocol: "postgres".into(),
        orig_dst: "127.0.0.1:5432".into(),
        client_addr: "127.0.0.1:40000".into(),
        process: Some(ProcessInfo {
            uid: 65534,
            gid: 65534,
            pid: 42,
            comm: "psql".into(),
            cgroup_id: 7,
            connected_ns: 1,
        }),
        params: vec![
            ("user".into(), user.into()),
            ("database".into(), "app".into()),
        ],
        principal: Some(Principal {
            name: principal.into(),
            groups: vec!["developers".into()],
        }),
    }
}

/// A signed journal with two sealed sessions: ada reads people, grace reads orders.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub sessions: Vec<SessionId>,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let journal =
            Journal::open_signed(&dir.path().join("journal"), &dir.path().join("signing.key"))
                .unwrap();
        let mut sessions = Vec::new();
        for (who, user, sql, table, rows) in [
            (
                "ada",
                "app",
                "select id, name from people",
                ["id", "name"],
                &[&["1", "ada"][..], &["2", "grace, \"the admiral\""][..]][..],
            ),
            (
                "grace",
                "report",
                "select id, total from orders",
                ["id", "total"],
                &[&["7", "12.50"][..]][..],
            ),
        ] {
            let rec = journal.start_session(start(who, user)).unwrap();
            rec.client(query(sql), 1).unwrap();
            rec.server(result(&table, rows, &format!("SELECT {}", rows.len())))
                .unwrap();
            rec.end("client closed").unwrap();
            sessions.push(rec.id());
        }
        drop(journal);
        Fixture { dir, sessions }
    }

    pub fn reader(&self) -> Reader {
        Reader::open(&self.dir.path().join("journal")).unwrap()
    }
}
