//! Stateful decoding of a recorded MySQL/MariaDB session into shared [`Item`]s, for replay and
//! export.
//!
//! Works on the raw chunks the journal stores, each holding one or more whole packets (a packet
//! of 16 MiB or more spans several wire chunks, all in the same journal chunk), fed in recording
//! order through [`Transcriber::client`] and [`Transcriber::server`]. It follows the connection
//! phase (handshake → optional SSLRequest → response → auth exchange), taking the negotiated
//! capabilities from it, then hands the command phase to a [`ResponseMachine`]. A recording
//! that starts after the login (no handshake seen) is read with sluice's default capabilities.
//! It never panics: a chunk that cannot be framed or decoded yields
//! `Item::Error { code: "sluice", message: "undecodable ..." }` and the rest of that chunk is
//! skipped. Memory is bounded by the machine's limits and [`MAX_STATEMENTS`] remembered SQL
//! texts.
//!
//! What becomes an item:
//! - COM_QUERY → `Statement` (a multi-statement string stays one item). COM_STMT_PREPARE yields
//!   nothing; each COM_STMT_EXECUTE yields a `Statement` with the prepared SQL and the decoded
//!   parameters. COM_INIT_DB → `USE `db``, COM_PROCESS_KILL → `KILL id`, COM_FIELD_LIST,
//!   COM_CHANGE_USER and unknown commands → a comment naming them.
//! - A result set → `Columns` (once its definitions are in), one `Row` per row, then
//!   `Complete { "SELECT n rows" }` (`FETCH n rows` for cursor fetches). An OK →
//!   `Complete { "OK n rows affected" }`, except the OKs of pings, resets and a change of
//!   user, which report nothing. ERR → `Error { code: SQLSTATE, message }` (also when
//!   the login fails).
//! - A LOCAL INFILE request → `Notice` naming the file (its content is not itemised).
//! - The handshake, auth exchange, pings, prepares, closes and the rest yield nothing.
use std::collections::{HashMap, VecDeque};

use super::command::{Command, LAST_PREPARED, decode_command};
use super::handshake::{
    AuthReply, Capabilities, ClientHandshake, parse_auth_reply, parse_client_handshake, parse_err,
    parse_handshake,
};
use super::packet::{packets, text};
use super::response::{ClientEvent, Event, ResponseMachine};
use crate::protocol::Item;

/// Most prepared statements' SQL remembered per session.
pub const MAX_STATEMENTS: usize = 16_384;
/// Largest packet the transcriber reassembles (MySQL's own maximum max_allowed_packet).
pub const MAX_PACKET: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing seen yet: the first server packet says whether this is a handshake.
    Start,
    /// The server greeted; the client's SSLRequest or response comes next.
    ClientHello,
    /// Auth exchange until OK or ERR.
    Auth,
    Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResultKind {
    Select,
    Fetch,
}

/// Turns the raw chunks of one recorded session into [`Item`]s. Feed chunks in recording order.
#[derive(Debug)]
pub struct Transcriber {
    phase: Phase,
    server_caps: Option<Capabilities>,
    machine: ResponseMachine,
    sql: HashMap<u32, String>,
    last_prepared: Option<u32>,
    /// SQL of prepares awaiting their PREPARE_OK, in order.
    preparing: VecDeque<String>,
    result: Option<ResultKind>,
    rows: u64,
}

impl Default for Transcriber {
    fn default() -> Self {
        Self::new()
    }
}

impl Transcriber {
    pub fn new() -> Self {
        Self::with_capabilities(Capabilities::sluice_default())
    }

    /// A transcriber for a recording without the handshake, made on a connection that
    /// negotiated `caps`.
    pub fn with_capabilities(caps: Capabilities) -> Self {
        Self {
            phase: Phase::Start,
            server_caps: None,
            machine: ResponseMachine::new(caps),
            sql: HashMap::new(),
            last_prepared: None,
            preparing: VecDeque::new(),
            result: None,
            rows: 0,
        }
    }

    /// Items for a chunk the client sent: one or more whole packets.
    pub fn client(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        for p in packets(bytes, MAX_PACKET) {
            match p {
                Ok(p) => {
                    if let Err(e) = self.on_client(p.seq, &p.payload, &mut out) {
                        out.push(undecodable("client", &e));
                        break;
                    }
                }
                Err(e) => {
                    out.push(undecodable("client", &e.to_string()));
                    break;
                }
            }
        }
        out
    }

    /// Items for a chunk the server sent: one or more whole packets.
    pub fn server(&mut self, bytes: &[u8]) -> Vec<Item> {
        let mut out = Vec::new();
        for p in packets(bytes, MAX_PACKET) {
            match p {
                Ok(p) => {
                    if let Err(e) = self.on_server(&p.payload, &mut out) {
                        out.push(undecodable("server", &e));
                        break;
                    }
                }
                Err(e) => {
                    out.push(undecodable("server", &e.to_string()));
                    break;
                }
            }
        }
        out
    }

    fn on_client(&mut self, seq: u8, payload: &[u8], out: &mut Vec<Item>) -> Result<(), String> {
        match self.phase {
            Phase::ClientHello => {
                match parse_client_handshake(payload).map_err(|e| e.to_string())? {
                    ClientHandshake::SslRequest { .. } => {}
                    ClientHandshake::Response(r) => {
                        let caps = match self.server_caps {
                            Some(s) => r.capabilities & s,
                            None => r.capabilities,
                        };
                        self.machine = ResponseMachine::new(caps);
                        self.phase = Phase::Auth;
                    }
                }
                return Ok(());
            }
            Phase::Auth => return Ok(()),
            Phase::Start => {
                // No greeting recorded: the recording starts in the command phase.
                if seq == 0 && decode_command(payload, self.machine.capabilities()).is_ok() {
                    self.phase = Phase::Command;
                } else {
                    return Ok(());
                }
            }
            Phase::Command => {}
        }
        let event = self
            .machine
            .client(seq, payload)
            .map_err(|e| e.to_string())?;
        let ClientEvent::Command(cmd) = event else {
            return Ok(());
        };
        let statement = |sql: String| Item::Statement {
            sql,
            params: Vec::new(),
        };
        match cmd {
            Command::Query(sql) => out.push(statement(text(sql))),
            Command::InitDb(db) => out.push(statement(format!("USE `{}`", text(db)))),
            Command::ProcessKill(id) => out.push(statement(format!("KILL {id}"))),
            Command::FieldList { table, .. } => {
                out.push(statement(format!("/* COM_FIELD_LIST `{}` */", text(table))))
            }
            Command::ChangeUser { user, .. } => {
                out.push(statement(format!("/* COM_CHANGE_USER {} */", text(user))));
                self.sql.clear();
            }
            Command::StmtPrepare(sql) => {
                if self.preparing.len() >= MAX_STATEMENTS {
                    self.preparing.clear();
                }
                self.preparing.push_back(text(sql));
            }
            Command::StmtExecute(exec) => {
                let id = if exec.stmt_id == LAST_PREPARED {
                    self.last_prepared.unwrap_or(exec.stmt_id)
                } else {
                    exec.stmt_id
                };
                let sql = match self.sql.get(&id) {
                    Some(s) => s.clone(),
                    None => format!("/* prepared statement {id}, not seen in this recording */"),
                };
                let params = exec
                    .params
                    .map(|v| v.iter().map(|v| v.render()).collect())
                    .unwrap_or_default();
                out.push(Item::Statement { sql, params });
            }
            Command::StmtClose(id) => {
                self.sql.remove(&id);
            }
            Command::ResetConnection => self.sql.clear(),
            Command::Unknown(c) => out.push(statement(format!("/* command 0x{c:02x} */"))),
            Command::Quit
            | Command::Statistics
            | Command::Ping
            | Command::StmtSendLongData { .. }
            | Command::StmtReset(_)
            | Command::StmtFetch { .. }
            | Command::SetOption(_) => {}
        }
        Ok(())
    }

    fn on_server(&mut self, payload: &[u8], out: &mut Vec<Item>) -> Result<(), String> {
        match self.phase {
            Phase::Start => {
                if payload.first() == Some(&10)
                    && let Ok(h) = parse_handshake(payload)
                {
                    self.server_caps = Some(h.capabilities);
                    self.phase = Phase::ClientHello;
                    return Ok(());
                }
                if payload.first() == Some(&0xFF) {
                    // Refused before the handshake (too many connections, host blocked).
                    let e = parse_err(payload).map_err(|e| e.to_string())?;
                    out.push(Item::Error {
                        code: e.sql_state,
                        message: e.message,
                        number: Some(e.code),
                    });
                    return Ok(());
                }
                self.phase = Phase::Command;
            }
            Phase::ClientHello => {
                if payload.first() == Some(&0xFF) {
                    let e = parse_err(payload).map_err(|e| e.to_string())?;
                    out.push(Item::Error {
                        code: e.sql_state,
                        message: e.message,
                        number: Some(e.code),
                    });
                }
                return Ok(());
            }
            Phase::Auth => {
                match parse_auth_reply(payload, self.machine.capabilities())
                    .map_err(|e| e.to_string())?
                {
                    AuthReply::Ok(_) => self.phase = Phase::Command,
                    AuthReply::Err(e) => out.push(Item::Error {
                        code: e.sql_state,
                        message: e.message,
                        number: Some(e.code),
                    }),
                    AuthReply::Switch(_) | AuthReply::MoreData(_) => {}
                }
                return Ok(());
            }
            Phase::Command => {}
        }
        let was_preparing = self.machine.awaiting_prepare();
        let housekeeping = self.machine.answering_housekeeping();
        let event = self.machine.server(payload).map_err(|e| e.to_string())?;
        match event {
            Event::ResultStart { metadata, .. } => {
                self.result = Some(ResultKind::Select);
                self.rows = 0;
                if !metadata {
                    // Cached metadata: the columns are the statement's, not resent.
                    out.push(Item::Columns(
                        self.machine
                            .columns()
                            .iter()
                            .map(|c| c.name.clone())
                            .collect(),
                    ));
                }
            }
            Event::Column { last: true, .. } => out.push(Item::Columns(
                self.machine
                    .columns()
                    .iter()
                    .map(|c| c.name.clone())
                    .collect(),
            )),
            Event::Row(row) => {
                if self.result.is_none() {
                    self.result = Some(ResultKind::Fetch);
                    self.rows = 0;
                }
                self.rows += 1;
                let values = self.machine.row(row).map_err(|e| e.to_string())?;
                out.push(Item::Row(values.iter().map(|v| v.render()).collect()));
            }
            Event::ResultDone { status } => {
                let verb = match self.result.take() {
                    Some(ResultKind::Select) => "SELECT",
                    Some(ResultKind::Fetch) => "FETCH",
                    None => return Ok(()),
                };
                let tag = if status & super::handshake::status::CURSOR_EXISTS != 0
                    && verb == "SELECT"
                    && self.rows == 0
                {
                    "SELECT (cursor opened)".to_owned()
                } else {
                    format!("{verb} {}", rows(self.rows))
                };
                out.push(Item::Complete { tag });
            }
            Event::Ok(_) if housekeeping => {}
            Event::Ok(ok) => out.push(Item::Complete {
                tag: format!("OK {} affected", rows(ok.affected_rows)),
            }),
            Event::Err(e) => {
                if was_preparing {
                    self.preparing.pop_front();
                }
                self.result = None;
                out.push(Item::Error {
                    code: e.sql_state,
                    message: e.message,
                    number: Some(e.code),
                });
            }
            Event::PrepareOk { stmt_id, .. } => {
                if let Some(sql) = self.preparing.pop_front()
                    && (self.sql.len() < MAX_STATEMENTS || self.sql.contains_key(&stmt_id))
                {
                    self.sql.insert(stmt_id, sql);
                }
                self.last_prepared = Some(stmt_id);
            }
            Event::LocalInfile(name) => out.push(Item::Notice {
                code: String::new(),
                message: format!("the server asks for the client file {:?}", text(name)),
            }),
            Event::Progress
            | Event::Column { .. }
            | Event::ColumnsDone
            | Event::Param
            | Event::PrepareColumn
            | Event::PrepareDone { .. }
            | Event::Statistics(_)
            | Event::AuthData
            | Event::Unexpected => {}
        }
        Ok(())
    }
}

fn rows(n: u64) -> String {
    if n == 1 {
        "1 row".to_owned()
    } else {
        format!("{n} rows")
    }
}

fn undecodable(direction: &str, error: &str) -> Item {
    Item::Error {
        code: "sluice".to_owned(),
        message: format!("undecodable {direction} packet: {error}"),
        number: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::protocol::mysql::handshake::{
        AuthSwitch, ErrPacket, Handshake, HandshakeResponse, OkPacket, status,
    };
    use crate::protocol::mysql::packet::{encode_packet, put_lenenc_bytes};
    use crate::protocol::mysql::resultset::types;

    fn caps() -> Capabilities {
        Capabilities::sluice_default()
    }

    /// Packets (seq, payload) as one chunk.
    fn chunk(packets: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = BytesMut::new();
        for (seq, p) in packets {
            encode_packet(*seq, p, &mut b);
        }
        b.to_vec()
    }

    use crate::protocol::mysql::testing::{ok_fe, text_row};

    fn coldef(name: &str, ty: u8) -> Vec<u8> {
        crate::protocol::mysql::testing::coldef("t", name, name, ty, 0)
    }

    fn ok(affected: u64, status: u16) -> Vec<u8> {
        OkPacket {
            affected_rows: affected,
            status,
            ..OkPacket::default()
        }
        .encode(0, caps())
        .to_vec()
    }

    fn login(t: &mut Transcriber) -> Vec<Item> {
        let mut items = Vec::new();
        let h = Handshake {
            server_version: "10.11.19-MariaDB".into(),
            connection_id: 1,
            nonce: vec![b'x'; 20],
            capabilities: caps() | Capabilities::CONNECT_ATTRS,
            charset: 45,
            status: status::AUTOCOMMIT,
            auth_plugin: "mysql_native_password".into(),
        };
        items.extend(t.server(&chunk(&[(0, &h.encode())])));
        let r = HandshakeResponse {
            capabilities: caps(),
            max_packet: 1 << 24,
            charset: 45,
            username: "app".into(),
            auth_response: vec![1; 20],
            database: Some("shop".into()),
            auth_plugin: Some("caching_sha2_password".into()),
            attributes: Vec::new(),
        };
        items.extend(t.client(&chunk(&[(1, &r.encode())])));
        let sw = AuthSwitch {
            plugin: "mysql_native_password".into(),
            data: vec![b'y'; 20],
        };
        items.extend(t.server(&chunk(&[(2, &sw.encode())])));
        items.extend(t.client(&chunk(&[(3, &[2; 20])])));
        items.extend(t.server(&chunk(&[(4, &ok(0, status::AUTOCOMMIT))])));
        items
    }

    #[test]
    fn the_login_yields_nothing_and_queries_yield_statements_columns_rows() {
        let mut t = Transcriber::new();
        assert_eq!(login(&mut t), vec![]);
        assert_eq!(
            t.client(&chunk(&[(0, b"\x03select id, name from t")])),
            vec![Item::Statement {
                sql: "select id, name from t".into(),
                params: vec![]
            }]
        );
        let c1 = coldef("id", types::LONG);
        let c2 = coldef("name", types::VAR_STRING);
        let r1 = text_row(&[Some("1"), Some("ann")]);
        let r2 = text_row(&[Some("2"), None]);
        let done = ok_fe(status::AUTOCOMMIT);
        // Split over two chunks, the second holding several packets.
        let mut items = t.server(&chunk(&[(1, b"\x02"), (2, &c1)]));
        items.extend(t.server(&chunk(&[(3, &c2), (4, &r1), (5, &r2), (6, &done)])));
        assert_eq!(
            items,
            vec![
                Item::Columns(vec!["id".into(), "name".into()]),
                Item::Row(vec![Some("1".into()), Some("ann".into())]),
                Item::Row(vec![Some("2".into()), None]),
                Item::Complete {
                    tag: "SELECT 2 rows".into()
                },
            ]
        );
        t.client(&chunk(&[(0, b"\x03delete from t where id = 1")]));
        assert_eq!(
            t.server(&chunk(&[(1, &ok(1, status::AUTOCOMMIT))])),
            vec![Item::Complete {
                tag: "OK 1 row affected".into()
            }]
        );
        t.client(&chunk(&[(0, b"\x03select * from nope")]));
        assert_eq!(
            t.server(&chunk(&[(
                1,
                &ErrPacket::new(1146, "42S02", "Table 'shop.nope' doesn't exist").encode()
            )])),
            vec![Item::Error {
                code: "42S02".into(),
                message: "Table 'shop.nope' doesn't exist".into(),
                number: Some(1146),
            }]
        );
        assert_eq!(
            t.client(&chunk(&[(0, b"\x02other")])),
            vec![Item::Statement {
                sql: "USE `other`".into(),
                params: vec![]
            }]
        );
    }

    #[test]
    fn a_failed_login_is_an_error_item() {
        let mut t = Transcriber::new();
        let h = Handshake {
            server_version: "10.11".into(),
            connection_id: 1,
            nonce: vec![b'x'; 20],
            capabilities: caps(),
            charset: 45,
            status: 0,
            auth_plugin: "mysql_native_password".into(),
        };
        t.server(&chunk(&[(0, &h.encode())]));
        let r = HandshakeResponse {
            capabilities: caps(),
            username: "app".into(),
            ..HandshakeResponse::default()
        };
        t.client(&chunk(&[(1, &r.encode())]));
        let e = ErrPacket::new(1045, "28000", "Access denied for user 'app'@'localhost'");
        assert_eq!(
            t.server(&chunk(&[(2, &e.encode())])),
            vec![Item::Error {
                code: "28000".into(),
                message: "Access denied for user 'app'@'localhost'".into(),
                number: Some(1045),
            }]
        );
    }

    #[test]
    fn prepared_statements_yield_one_statement_per_execution_with_params() {
        let mut t = Transcriber::new();
        login(&mut t);
        assert_eq!(
            t.client(&chunk(&[(0, b"\x16select name from t where id = ?")])),
            vec![]
        );
        let mut prep = BytesMut::new();
        prep.put_u8(0);
        prep.put_u32_le(4);
        prep.put_u16_le(1);
        prep.put_u16_le(1);
        prep.put_u8(0);
        prep.put_u16_le(0);
        let p = coldef("?", types::LONGLONG);
        let c = coldef("name", types::VAR_STRING);
        assert_eq!(t.server(&chunk(&[(1, &prep), (2, &p), (3, &c)])), vec![]);
        let mut exec = BytesMut::new();
        exec.put_u8(0x17);
        exec.put_u32_le(4);
        exec.put_u8(0);
        exec.put_u32_le(1);
        exec.put_u8(0);
        exec.put_u8(1);
        exec.put_slice(&[types::LONGLONG, 0]);
        exec.put_u64_le(1);
        assert_eq!(
            t.client(&chunk(&[(0, &exec)])),
            vec![Item::Statement {
                sql: "select name from t where id = ?".into(),
                params: vec![Some("1".into())]
            }]
        );
        let mut row = BytesMut::new();
        row.put_slice(&[0, 0]);
        put_lenenc_bytes(&mut row, b"ann");
        assert_eq!(
            t.server(&chunk(&[(1, b"\x01"), (2, &c), (3, &row), (4, &ok_fe(0))])),
            vec![
                Item::Columns(vec!["name".into()]),
                Item::Row(vec![Some("ann".into())]),
                Item::Complete {
                    tag: "SELECT 1 row".into()
                }
            ]
        );
        // A statement prepared before the recording started.
        let mut other = exec.clone();
        other[1] = 99;
        assert!(matches!(
            &t.client(&chunk(&[(0, &other)]))[..],
            [Item::Statement { sql, .. }] if sql.contains("not seen in this recording")
        ));
    }

    #[test]
    fn a_multi_statement_yields_one_statement_and_every_result() {
        let mut t = Transcriber::new();
        login(&mut t);
        t.client(&chunk(&[(0, b"\x03insert into t values (3); select 1")]));
        let items = t.server(&chunk(&[
            (1, &ok(1, status::MORE_RESULTS_EXISTS)),
            (2, b"\x01"),
            (3, &coldef("1", types::LONGLONG)),
            (4, &text_row(&[Some("1")])),
            (5, &ok_fe(0)),
        ]));
        assert_eq!(
            items,
            vec![
                Item::Complete {
                    tag: "OK 1 row affected".into()
                },
                Item::Columns(vec!["1".into()]),
                Item::Row(vec![Some("1".into())]),
                Item::Complete {
                    tag: "SELECT 1 row".into()
                },
            ]
        );
    }

    #[test]
    fn a_recording_without_the_handshake_is_read_with_default_capabilities() {
        let mut t = Transcriber::new();
        assert_eq!(
            t.client(&chunk(&[(0, b"\x03select 1")])).len(),
            1,
            "the statement"
        );
        let items = t.server(&chunk(&[
            (1, b"\x01"),
            (2, &coldef("1", types::LONGLONG)),
            (3, &text_row(&[Some("1")])),
            (4, &ok_fe(0)),
        ]));
        assert_eq!(items.len(), 3);
    }

    #[test]
    fn garbage_is_an_undecodable_item_not_a_panic() {
        let mut t = Transcriber::new();
        login(&mut t);
        t.client(&chunk(&[(0, b"\x03select 1")]));
        let items = t.server(&chunk(&[(1, b"\x01"), (2, b"\x03de")]));
        assert!(matches!(&items[..], [Item::Error { code, .. }] if code == "sluice"));
        let items = t.server(&[1, 0, 0]);
        assert!(matches!(&items[..], [Item::Error { code, .. }] if code == "sluice"));
        // And it recovers at the next command (a ping's OK reports nothing).
        t.client(&chunk(&[(0, b"\x0e")]));
        assert_eq!(t.server(&chunk(&[(1, &ok(0, 0))])), vec![]);
        t.client(&chunk(&[(0, b"\x03update t set a = 1")]));
        assert_eq!(
            t.server(&chunk(&[(1, &ok(0, 0))])),
            vec![Item::Complete {
                tag: "OK 0 rows affected".into()
            }]
        );
    }

    #[test]
    fn every_prefix_of_a_session_is_survived() {
        let mut server = Vec::new();
        let mut client = Vec::new();
        client.extend(chunk(&[(0, b"\x03select id from t; delete from t")]));
        server.extend(chunk(&[
            (1, b"\x01"),
            (2, &coldef("id", types::LONG)),
            (3, &text_row(&[Some("1")])),
            (4, &ok_fe(status::MORE_RESULTS_EXISTS)),
            (5, &ok(1, 0)),
        ]));
        for end in 0..=server.len() {
            let mut t = Transcriber::new();
            t.client(&client);
            let _ = t.server(&server[..end]);
            let _ = t.server(&server[end..]);
        }
    }
}
