//! The MySQL codec against a real MariaDB and real clients: exchanges are captured by a tiny
//! recording TCP relay (std threads, no sluice in the path), then every packet must frame with
//! consistent sequence ids, and the `Transcriber` must yield the statements, columns and rows
//! the client printed: the `mariadb` CLI (text protocol, a multi-statement, an error, a blob
//! over 16 MiB in both directions, LOCAL INFILE), mysql-connector-python (binary protocol,
//! long data, ping/statistics/reset/change user) and sysbench's prepared statements through
//! MariaDB Connector/C (MariaDB's cached result metadata). Also sluice's own backend login.
//!
//! `SLUICE_WRITE_MYSQL_CAPTURES=<dir>` writes the small sessions there in the relay format of
//! `agent/testdata/mysql` (direction byte, big-endian u32 length, bytes), which is how those
//! files were made.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice::protocol::Item;
use sluice::protocol::mysql::{Decoder, Transcriber, packets, whole_packets};
use sluice_tests::mariadb::{self, MariaDb, require_mariadb, require_mysql_python};

const MAX: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Client,
    Server,
}

type Session = Vec<(Dir, Vec<u8>)>;

/// A relay that records every read of each direction, in order, per accepted connection.
struct Relay {
    port: u16,
    sessions: Arc<Mutex<Vec<Arc<Mutex<Session>>>>>,
    pumps_done: Arc<AtomicUsize>,
}

impl Relay {
    fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let sessions: Arc<Mutex<Vec<Arc<Mutex<Session>>>>> = Arc::default();
        let pumps_done = Arc::new(AtomicUsize::new(0));
        let (s, d) = (sessions.clone(), pumps_done.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let server = TcpStream::connect(target).expect("relay connects to the server");
                let log: Arc<Mutex<Session>> = Arc::default();
                s.lock().expect("sessions").push(log.clone());
                for (from, to, dir) in [
                    (client.try_clone(), server.try_clone(), Dir::Client),
                    (server.try_clone(), client.try_clone(), Dir::Server),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (log, done) = (log.clone(), d.clone());
                    std::thread::spawn(move || {
                        pump(from, to, dir, &log);
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Relay {
            port,
            sessions,
            pumps_done,
        }
    }

    /// The recorded sessions, once every connection has closed (bounded wait).
    fn finish(&self) -> Vec<Session> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = self.sessions.lock().expect("sessions").len();
            if self.pumps_done.load(Ordering::SeqCst) >= 2 * n {
                break;
            }
            assert!(Instant::now() < deadline, "relay sessions did not close");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.sessions
            .lock()
            .expect("sessions")
            .iter()
            .map(|s| s.lock().expect("session").clone())
            .collect()
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, dir: Dir, log: &Mutex<Session>) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Record before forwarding, so the log's order is causal.
        log.lock().expect("log").push((dir, buf[..n].to_vec()));
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn stream(session: &Session, dir: Dir) -> Vec<u8> {
    session
        .iter()
        .filter(|(d, _)| *d == dir)
        .flat_map(|(_, b)| b.iter().copied())
        .collect()
}

/// Every byte of both directions frames into whole packets, with the sequence ids a server and
/// client must use (commands start at 0, replies continue the count). Returns the number of
/// (client, server) packets and the largest payload seen.
fn check_framing(session: &Session) -> (usize, usize, usize) {
    let (mut client, mut server) = (Vec::new(), Vec::new());
    let mut cdec = Decoder::unchecked(MAX);
    let mut sdec = Decoder::new(MAX);
    let (mut nc, mut ns, mut largest) = (0, 0, 0);
    for (dir, bytes) in session {
        let (buf, dec, other) = match dir {
            Dir::Client => (&mut client, &mut cdec, &mut sdec),
            Dir::Server => (&mut server, &mut sdec, &mut cdec),
        };
        buf.extend_from_slice(bytes);
        loop {
            // A client's new command restarts the count at 0.
            if *dir == Dir::Client && buf.get(3) == Some(&0) {
                dec.expect(Some(0));
            }
            let expected = dec.expected();
            let (n, seq, last, len) = match dec.decode(buf) {
                Ok(Some((n, p))) => (n, p.seq, p.last_seq, p.payload.len()),
                Ok(None) => break,
                Err(e) => panic!("{dir:?} packet: {e}"),
            };
            assert!(seq == 0 || Some(seq) == expected || expected.is_none());
            buf.drain(..n);
            largest = largest.max(len);
            match dir {
                Dir::Client => nc += 1,
                Dir::Server => ns += 1,
            }
            other.expect(Some(last.wrapping_add(1)));
        }
    }
    assert!(client.is_empty(), "client bytes left over");
    assert!(server.is_empty(), "server bytes left over");
    // The one-shot helpers agree.
    for dir in [Dir::Client, Dir::Server] {
        let s = stream(session, dir);
        assert_eq!(whole_packets(&s, MAX), Ok(s.len()));
        assert!(packets(&s, MAX).all(|p| p.is_ok()));
    }
    (nc, ns, largest)
}

/// The items of a session, fed as a proxy would journal it: whole packets per chunk, in order.
fn transcribe(session: &Session) -> Vec<Item> {
    let mut t = Transcriber::new();
    let (mut client, mut server) = (Vec::new(), Vec::new());
    let mut items = Vec::new();
    for (dir, bytes) in session {
        let buf = match dir {
            Dir::Client => &mut client,
            Dir::Server => &mut server,
        };
        buf.extend_from_slice(bytes);
        let n = whole_packets(buf, MAX).expect("frames");
        if n == 0 {
            continue;
        }
        let chunk: Vec<u8> = buf.drain(..n).collect();
        items.extend(match dir {
            Dir::Client => t.client(&chunk),
            Dir::Server => t.server(&chunk),
        });
    }
    for i in &items {
        if let Item::Error { code, message, .. } = i {
            assert_ne!(code, "sluice", "the transcriber failed: {message}");
        }
    }
    items
}

fn maybe_write_capture(name: &str, session: &Session) {
    let Some(dir) = std::env::var_os("SLUICE_WRITE_MYSQL_CAPTURES") else {
        return;
    };
    let mut out = Vec::new();
    for (d, bytes) in session {
        out.push(if *d == Dir::Client { b'C' } else { b'S' });
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let path = PathBuf::from(dir).join(format!("{name}.session"));
    std::fs::write(&path, out).expect("write capture");
    eprintln!("wrote {}", path.display());
}

/// Runs the `mariadb` CLI through `port` with `sql` on stdin; returns its stdout.
fn mariadb_cli(port: u16, sql: &[u8]) -> String {
    let mut child = Command::new("mariadb")
        .args(MariaDb::client_args(port))
        .arg("--force")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mariadb");
    let mut stdin = child.stdin.take().expect("stdin");
    let sql = sql.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&sql);
    });
    let out = child.wait_with_output().expect("mariadb output");
    let _ = writer.join();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn statements(items: &[Item]) -> Vec<&str> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Statement { sql, .. } => Some(sql.as_str()),
            _ => None,
        })
        .collect()
}

fn complete_tags(items: &[Item]) -> Vec<&str> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Complete { tag } => Some(tag.as_str()),
            _ => None,
        })
        .collect()
}

/// Rows as the CLI's batch mode prints them (tab-separated, NULL as "NULL").
fn rows_as_printed(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Row(values) => Some(
                values
                    .iter()
                    .map(|v| v.clone().unwrap_or_else(|| "NULL".into()))
                    .collect::<Vec<_>>()
                    .join("\t"),
            ),
            Item::Columns(names) => Some(names.join("\t")),
            _ => None,
        })
        .collect()
}

const SCRIPT: &str = "\
create table t (id int primary key, name varchar(20), price decimal(6,2), born date);
insert into t values (1,'ann',1.50,'2001-02-03'),(2,'bob',NULL,NULL),(3,'cy',3.00,'1999-12-31');
select id, name, price, born from t order by id;
select * from nope;
delimiter //
select 1 as a; select 2 as b; update t set name = 'x' where id = 3 //
delimiter ;
use shop;
select count(*) as n from t;
";

#[test]
fn the_mariadb_cli_session_frames_and_transcribes_to_what_the_client_printed() {
    if !require_mariadb("the_mariadb_cli_session_frames_and_transcribes") {
        return;
    }
    let db = MariaDb::start().expect("start mariadb");
    let relay = Relay::start(db.addr());
    let printed = mariadb_cli(relay.port, SCRIPT.as_bytes());
    let sessions = relay.finish();
    assert_eq!(sessions.len(), 1);
    let session = &sessions[0];
    maybe_write_capture("cli_text", session);

    let (nc, ns, _) = check_framing(session);
    assert!(nc >= 10 && ns >= 20, "{nc} client, {ns} server packets");

    let items = transcribe(session);
    let sql = statements(&items);
    for want in [
        "create table t (id int primary key, name varchar(20), price decimal(6,2), born date)",
        "select id, name, price, born from t order by id",
        "select * from nope",
        "select 1 as a; select 2 as b; update t set name = 'x' where id = 3",
        "USE `shop`",
        "select count(*) as n from t",
    ] {
        assert!(sql.contains(&want), "{want:?} not in {sql:#?}");
    }
    // Every line the client printed (headers and rows) is a Columns or Row item, in order.
    let transcribed = rows_as_printed(&items);
    let printed: Vec<&str> = printed.lines().collect();
    let mut at = 0;
    for line in &printed {
        let found = transcribed[at..].iter().position(|t| t == line);
        assert!(
            found.is_some(),
            "printed {line:?} not transcribed in order: {transcribed:#?}"
        );
        at += found.unwrap_or(0) + 1;
    }
    assert!(printed.contains(&"1\tann\t1.50\t2001-02-03"));
    assert!(printed.contains(&"2\tbob\tNULL\tNULL"));

    let tags = complete_tags(&items);
    assert!(tags.contains(&"OK 3 rows affected"), "{tags:?}");
    assert!(tags.contains(&"SELECT 3 rows"), "{tags:?}");
    // The multi-statement: two result sets, then the update's OK, from one COM_QUERY.
    let multi = tags
        .windows(3)
        .any(|w| w == ["SELECT 1 row", "SELECT 1 row", "OK 1 row affected"]);
    assert!(multi, "{tags:?}");
    assert!(items.contains(&Item::Error {
        code: "42S02".into(),
        message: "Table 'shop.nope' doesn't exist".into(),
        number: Some(1146),
    }));
}

#[test]
fn a_blob_over_16_mib_crosses_as_split_packets_both_ways() {
    if !require_mariadb("a_blob_over_16_mib_crosses_as_split_packets_both_ways") {
        return;
    }
    const LEN: usize = 17 << 20;
    let db = MariaDb::start().expect("start mariadb");
    let relay = Relay::start(db.addr());
    let mut sql = b"create table big (id int, b longblob);\ninsert into big values (1, '".to_vec();
    sql.extend(std::iter::repeat_n(b'x', LEN));
    sql.extend_from_slice(b"');\nselect id, length(b) as len from big;\nselect b from big;\n");
    let printed = mariadb_cli(relay.port, &sql);
    let sessions = relay.finish();
    assert!(
        printed.contains(&format!("1\t{LEN}")),
        "{}",
        &printed[..printed.len().min(200)]
    );

    let session = &sessions[0];
    let (_, _, largest) = check_framing(session);
    assert!(largest > 0xFF_FFFF, "largest payload {largest}");
    // The client's insert itself was split: its stream holds a 0xFFFFFF chunk header.
    let client = stream(session, Dir::Client);
    assert!(client.windows(3).any(|w| w == [0xFF, 0xFF, 0xFF]));

    let items = transcribe(session);
    let insert = statements(&items)
        .into_iter()
        .find(|s| s.starts_with("insert into big"))
        .expect("the insert");
    assert_eq!(insert.len(), "insert into big values (1, '')".len() + LEN);
    let blob = items.iter().find_map(|i| match i {
        Item::Row(v) if v.len() == 1 && v[0].as_ref().is_some_and(|s| s.len() == LEN) => Some(()),
        _ => None,
    });
    assert!(blob.is_some(), "no 17 MiB row transcribed");
}

/// mysql-connector-python (pure Python) in a venv under the target dir, created on first use.
const PREPARED_PY: &str = r#"
import sys, json, datetime, decimal
import mysql.connector
c = mysql.connector.connect(host="127.0.0.1", port=int(sys.argv[1]), user=sys.argv[2],
                            password=sys.argv[3], database=sys.argv[4], use_pure=True)
cur = c.cursor()
cur.execute("create table p (id int primary key, name varchar(20), score double, "
            "born datetime, big bigint unsigned, note text)")
c.commit()
ins = c.cursor(prepared=True)
ins.execute("insert into p values (?, ?, ?, ?, ?, ?)",
            (1, "ann", 1.5, datetime.datetime(2001, 2, 3, 4, 5, 6), 18446744073709551615, None))
ins.execute("insert into p values (?, ?, ?, ?, ?, ?)",
            (2, "bob", -2.25, datetime.datetime(1999, 12, 31, 23, 59, 59), 7, "hi"))
c.commit()
sel = c.cursor(prepared=True)
sel.execute("select id, name, score, born, big, note from p where id >= ? order by id", (1,))
def s(v):
    if v is None: return None
    if isinstance(v, (bytes, bytearray)): return v.decode()
    return str(v)
for row in sel.fetchall():
    print(json.dumps([s(v) for v in row]))
c.close()
"#;

#[test]
fn prepared_statements_travel_in_the_binary_protocol_and_transcribe() {
    if !require_mariadb("prepared_statements_travel_in_the_binary_protocol") {
        return;
    }
    let Some(python) =
        require_mysql_python("prepared_statements_travel_in_the_binary_protocol_and_transcribe")
    else {
        return;
    };
    let db = MariaDb::start().expect("start mariadb");
    let relay = Relay::start(db.addr());
    let out = Command::new(python)
        .args(["-c", PREPARED_PY])
        .arg(relay.port.to_string())
        .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sessions = relay.finish();
    let session = &sessions[0];
    maybe_write_capture("connector_python_prepared", session);
    check_framing(session);
    let items = transcribe(session);

    let executions: Vec<(&str, &Vec<Option<String>>)> = items
        .iter()
        .filter_map(|i| match i {
            Item::Statement { sql, params } if !params.is_empty() => Some((sql.as_str(), params)),
            _ => None,
        })
        .collect();
    assert_eq!(executions.len(), 3, "{items:#?}");
    assert_eq!(executions[0].0, "insert into p values (?, ?, ?, ?, ?, ?)");
    assert_eq!(
        executions[0].1,
        &vec![
            Some("1".to_string()),
            Some("ann".into()),
            Some("1.5".into()),
            Some("2001-02-03 04:05:06".into()),
            Some("18446744073709551615".into()),
            None
        ]
    );
    assert_eq!(
        executions[2].0,
        "select id, name, score, born, big, note from p where id >= ? order by id"
    );

    // The binary rows decode to what the client printed.
    let printed: Vec<Vec<Option<String>>> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json row"))
        .collect();
    let rows: Vec<&Vec<Option<String>>> = items
        .iter()
        .filter_map(|i| match i {
            Item::Row(v) if v.len() == 6 => Some(v),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 2, "{items:#?}");
    for (got, want) in rows.iter().zip(&printed) {
        assert_eq!(*got, want);
    }
    assert!(
        items.contains(&Item::Columns(
            ["id", "name", "score", "born", "big", "note"]
                .map(String::from)
                .to_vec()
        ))
    );
}

/// What one command got back, as the response machine placed it.
#[derive(Debug, Default)]
struct Reply {
    rows: Vec<Vec<Option<String>>>,
    /// The events in order, by kind (`"Row"`, `"ResultDone"`, ...).
    events: Vec<String>,
    /// The status flags of each result set's end.
    done_status: Vec<u16>,
}

/// Sends one command on a logged-in connection and reads its whole reply with the codec alone.
async fn exchange(
    s: &mut tokio::net::TcpStream,
    m: &mut sluice::protocol::mysql::ResponseMachine,
    payload: &[u8],
) -> Reply {
    use sluice::protocol::mysql::Event;
    use sluice::protocol::mysql::packet::packet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    m.client(0, payload).expect("command");
    s.write_all(&packet(0, payload)).await.expect("send");
    let mut dec = Decoder::new(MAX);
    dec.expect(Some(1));
    let mut buf = bytes::BytesMut::new();
    let mut reply = Reply::default();
    while !m.is_idle() {
        let Some((n, p)) = dec.decode(&buf).expect("server packet") else {
            assert!(s.read_buf(&mut buf).await.expect("read") > 0, "closed");
            continue;
        };
        let payload = p.payload.into_owned();
        let _ = buf.split_to(n);
        let event = m.server(&payload).expect("placed");
        let kind = format!("{event:?}");
        reply
            .events
            .push(kind.split([' ', '(', '{']).next().unwrap_or("").to_owned());
        match event {
            Event::Row(r) => reply
                .rows
                .push(m.row(r).expect("row").iter().map(|v| v.render()).collect()),
            Event::ResultDone { status } => reply.done_status.push(status),
            Event::Err(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    assert!(buf.is_empty(), "bytes after the reply");
    reply
}

/// Runs `sql` on a logged-in connection with the codec alone; returns the rows' values.
async fn query(
    s: &mut tokio::net::TcpStream,
    caps: sluice::protocol::mysql::Capabilities,
    sql: &str,
) -> Vec<Vec<Option<String>>> {
    let mut m = sluice::protocol::mysql::ResponseMachine::new(caps);
    let mut payload = vec![0x03];
    payload.extend_from_slice(sql.as_bytes());
    exchange(s, &mut m, &payload).await.rows
}

#[tokio::test]
async fn sluice_logs_in_to_mariadb_with_injected_native_password_credentials() {
    use sluice::proxy::mysql::login::{
        Credentials, LoginError, LoginOptions, authenticate, read_greeting, request_tls,
    };
    if !require_mariadb("sluice_logs_in_to_mariadb_with_injected_native_password_credentials") {
        return;
    }
    let db = MariaDb::start().expect("start mariadb");
    let creds = Credentials {
        user: mariadb::USER,
        password: mariadb::PASSWORD.as_bytes(),
        database: Some(mariadb::DATABASE),
    };
    let opts = LoginOptions::default();

    let mut s = tokio::net::TcpStream::connect(db.addr())
        .await
        .expect("connect");
    let greeting = read_greeting(&mut s).await.expect("greeting");
    assert!(greeting.server_version.contains("MariaDB"));
    let login = authenticate(&mut s, &greeting, &creds, &opts, false)
        .await
        .expect("login");
    assert_eq!(login.plugin, "mysql_native_password");
    assert!(login.leftover.is_empty());
    let rows = query(
        &mut s,
        login.capabilities,
        "select current_user(), database()",
    )
    .await;
    assert_eq!(
        rows,
        vec![vec![Some("app@%".to_string()), Some("shop".into())]]
    );
    // A multi-statement on the same connection, DEPRECATE_EOF negotiated by sluice.
    let rows = query(&mut s, login.capabilities, "select 1; select 2, null").await;
    assert_eq!(
        rows,
        vec![vec![Some("1".to_string())], vec![Some("2".into()), None]]
    );

    // A wrong password: the server's 1045, as a typed refusal.
    let mut s = tokio::net::TcpStream::connect(db.addr())
        .await
        .expect("connect");
    let greeting = read_greeting(&mut s).await.expect("greeting");
    let bad = Credentials {
        password: b"wrong",
        ..creds.clone()
    };
    match authenticate(&mut s, &greeting, &bad, &opts, false).await {
        Err(LoginError::Refused(e)) => {
            assert_eq!((e.code, e.sql_state.as_str()), (1045, "28000"), "{e:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // This server has no TLS configured: asking for it is a clear error, not a hang.
    let mut s = tokio::net::TcpStream::connect(db.addr())
        .await
        .expect("connect");
    let greeting = read_greeting(&mut s).await.expect("greeting");
    assert!(matches!(
        request_tls(&mut s, &greeting, &opts).await,
        Err(LoginError::NoTls)
    ));
}

#[test]
fn a_local_infile_exchange_is_framed_and_the_request_is_a_notice() {
    if !require_mariadb("a_local_infile_exchange_is_framed_and_the_request_is_a_notice") {
        return;
    }
    let db = MariaDb::start().expect("start mariadb");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rows.tsv");
    std::fs::write(&file, "1\tann\n2\tbob\n").expect("write rows");
    let relay = Relay::start(db.addr());
    let sql = format!(
        "create table l (id int, name text);\n\
         load data local infile '{}' into table l;\n\
         select count(*) from l;\n",
        file.display()
    );
    let out = Command::new("mariadb")
        .args(MariaDb::client_args(relay.port))
        .arg("--local-infile=1")
        .args(["-e", &sql])
        .output()
        .expect("run mariadb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sessions = relay.finish();
    let session = &sessions[0];
    check_framing(session);
    let items = transcribe(session);
    let notice = format!(
        "the server asks for the client file {:?}",
        file.display().to_string()
    );
    let at = items
        .iter()
        .position(|i| matches!(i, Item::Notice { message, .. } if *message == notice))
        .unwrap_or_else(|| panic!("no LOCAL INFILE notice in {items:#?}"));
    assert_eq!(
        items[at + 1],
        Item::Complete {
            tag: "OK 2 rows affected".into()
        }
    );
    assert!(items.contains(&Item::Row(vec![Some("2".into())])));
}

const COMMANDS_PY: &str = r#"
import sys, io
import mysql.connector
port, user, pw, db = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
c = mysql.connector.connect(host="127.0.0.1", port=port, user=user, password=pw,
                            database=db, use_pure=True)
def check(tag):
    cur = c.cursor()
    cur.execute("select '" + tag + "'")
    print(cur.fetchall()[0][0])
c.cmd_ping(); check("after ping")
c.cmd_statistics(); check("after statistics")
c.cmd_init_db("mysql"); check("after init_db")
c.cmd_init_db(db)
cur = c.cursor(); cur.execute("create table lob (id int, b longblob)"); c.commit()
st = c.cmd_stmt_prepare(b"insert into lob values (?, ?)")
sid = st["statement_id"]
# A file-like parameter goes as COM_STMT_SEND_LONG_DATA before the execute.
c.cmd_stmt_execute(sid, (7, io.BytesIO(b"long data bytes")), st["parameters"])
c.commit()
c.cmd_stmt_reset(sid)
c.cmd_stmt_close(sid); check("after long data")
c.cmd_reset_connection(); check("after reset")
c.cmd_change_user(username=user, password=pw, database=db); check("after change user")
cur = c.cursor(); cur.execute("select id, length(b) from lob"); print(cur.fetchall())
c.close()
"#;

#[test]
fn the_machine_stays_in_step_through_ping_statistics_long_data_reset_and_change_user() {
    if !require_mariadb("the_machine_stays_in_step_through_ping_statistics_long_data") {
        return;
    }
    let Some(python) = require_mysql_python(
        "the_machine_stays_in_step_through_ping_statistics_long_data_reset_and_change_user",
    ) else {
        return;
    };
    let db = MariaDb::start().expect("start mariadb");
    let relay = Relay::start(db.addr());
    let out = Command::new(python)
        .args(["-c", COMMANDS_PY])
        .arg(relay.port.to_string())
        .args([mariadb::USER, mariadb::PASSWORD, mariadb::DATABASE])
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("[(7, 15)]"), "{printed}");
    let sessions = relay.finish();
    let session = &sessions[0];
    check_framing(session);
    let items = transcribe(session);
    for tag in [
        "after ping",
        "after statistics",
        "after init_db",
        "after long data",
        "after reset",
        "after change user",
    ] {
        assert!(
            items.contains(&Item::Row(vec![Some(tag.to_string())])),
            "{tag:?} not transcribed: {items:#?}"
        );
    }
    assert!(items.contains(&Item::Statement {
        sql: "USE `mysql`".into(),
        params: vec![]
    }));
    assert!(items.iter().any(|i| matches!(
        i,
        Item::Statement { sql, params } if sql == "insert into lob values (?, ?)"
            && params == &vec![Some("7".to_string()), Some("/* sent as long data */".into())]
    )));
    assert!(items.contains(&Item::Row(vec![Some("7".into()), Some("15".into())])));
}

/// sysbench's MySQL driver arguments against `port`.
fn sysbench_args(port: u16) -> Vec<String> {
    [
        "--db-driver=mysql",
        "--mysql-host=127.0.0.1",
        &format!("--mysql-port={port}"),
        &format!("--mysql-user={}", mariadb::USER),
        &format!("--mysql-password={}", mariadb::PASSWORD),
        &format!("--mysql-db={}", mariadb::DATABASE),
        "--mysql-ssl=off",
        "--tables=1",
        "--table-size=200",
        "--threads=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn sysbench_prepared_statements_through_mariadb_connector_c_transcribe() {
    if !require_mariadb("sysbench_prepared_statements_through_mariadb_connector_c") {
        return;
    }
    if !std::path::Path::new("/usr/bin/sysbench").exists() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("sysbench is not installed and CI=true: apt-get install sysbench");
        }
        eprintln!("\n*** SKIPPED: sysbench is not installed (apt-get install sysbench). ***\n");
        return;
    }
    let db = MariaDb::start().expect("start mariadb");
    let prepare = Command::new("sysbench")
        .arg("oltp_read_only")
        .args(sysbench_args(db.port))
        .arg("prepare")
        .output()
        .expect("sysbench prepare");
    assert!(
        prepare.status.success(),
        "{}",
        String::from_utf8_lossy(&prepare.stdout)
    );
    let relay = Relay::start(db.addr());
    let run = Command::new("sysbench")
        .arg("oltp_read_only")
        .args(sysbench_args(relay.port))
        .args(["--events=20", "--time=0", "--db-ps-mode=auto", "run"])
        .output()
        .expect("sysbench run");
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{report}");
    let sessions = relay.finish();
    assert!(!sessions.is_empty());
    if let Some(last) = sessions.last() {
        maybe_write_capture("sysbench_read_only", last);
    }
    let (mut executions, mut rows, mut columns) = (0, 0, 0);
    for session in &sessions {
        check_framing(session);
        let items = transcribe(session);
        for i in &items {
            match i {
                Item::Statement { sql, params } if !params.is_empty() => {
                    assert!(sql.contains("sbtest1"), "{sql}");
                    assert!(params.iter().all(Option::is_some), "{params:?}");
                    executions += 1;
                }
                Item::Row(_) => rows += 1,
                Item::Columns(names) => {
                    assert!(!names.is_empty());
                    columns += 1;
                }
                Item::Error { code, message, .. } => panic!("{code}: {message}"),
                _ => {}
            }
        }
    }
    // oltp_read_only: per event 10 point selects and 4 range queries, all prepared.
    assert!(executions >= 20 * 14, "{executions} executions");
    assert!(rows >= 20 * 10, "{rows} rows");
    // Every result set reads columns-then-rows, also when MariaDB did not resend the metadata.
    assert!(columns >= 20 * 14, "{columns} column headers");
}

#[tokio::test]
async fn a_cursor_is_opened_and_fetched_from_mariadb_with_deprecate_eof() {
    use sluice::protocol::mysql::ResponseMachine;
    use sluice::protocol::mysql::handshake::status;
    use sluice::proxy::mysql::login::{Credentials, LoginOptions, authenticate, read_greeting};
    if !require_mariadb("a_cursor_is_opened_and_fetched_from_mariadb_with_deprecate_eof") {
        return;
    }
    let db = MariaDb::start().expect("start mariadb");
    let mut s = tokio::net::TcpStream::connect(db.addr())
        .await
        .expect("connect");
    let greeting = read_greeting(&mut s).await.expect("greeting");
    let creds = Credentials {
        user: mariadb::USER,
        password: mariadb::PASSWORD.as_bytes(),
        database: Some(mariadb::DATABASE),
    };
    let login = authenticate(&mut s, &greeting, &creds, &LoginOptions::default(), false)
        .await
        .expect("login");
    let mut m = ResponseMachine::new(login.capabilities);
    let q = |sql: &str| [&[0x03u8][..], sql.as_bytes()].concat();
    exchange(
        &mut s,
        &mut m,
        &q("create table c (id int, name varchar(9))"),
    )
    .await;
    exchange(
        &mut s,
        &mut m,
        &q("insert into c values (1,'a'),(2,'b'),(3,'c'),(4,null),(5,'e')"),
    )
    .await;
    let prep = exchange(&mut s, &mut m, b"\x16select id, name from c order by id").await;
    assert_eq!(prep.events.first().map(String::as_str), Some("PrepareOk"));
    assert_eq!(prep.events.last().map(String::as_str), Some("PrepareDone"));
    let id = 1u32; // MariaDB numbers statements per connection from 1.
    // COM_STMT_EXECUTE with CURSOR_TYPE_READ_ONLY: metadata only, rows stay on the server.
    let mut exec = vec![0x17];
    exec.extend_from_slice(&id.to_le_bytes());
    exec.push(0x01);
    exec.extend_from_slice(&1u32.to_le_bytes());
    let opened = exchange(&mut s, &mut m, &exec).await;
    // Under DEPRECATE_EOF MariaDB ends the metadata with an OK (0xFE) carrying CURSOR_EXISTS.
    assert_eq!(
        opened.events,
        ["ResultStart", "Column", "Column", "ResultDone"],
        "{opened:?}"
    );
    assert!(
        opened
            .done_status
            .iter()
            .all(|s| s & status::CURSOR_EXISTS != 0),
        "{opened:?}"
    );
    let mut fetched = Vec::new();
    for _ in 0..3 {
        let mut fetch = vec![0x1C];
        fetch.extend_from_slice(&id.to_le_bytes());
        fetch.extend_from_slice(&2u32.to_le_bytes());
        let r = exchange(&mut s, &mut m, &fetch).await;
        fetched.extend(r.rows);
        if r.done_status.iter().any(|s| s & status::LAST_ROW_SENT != 0) {
            break;
        }
    }
    let v = |id: &str, name: Option<&str>| vec![Some(id.to_string()), name.map(String::from)];
    assert_eq!(
        fetched,
        vec![
            v("1", Some("a")),
            v("2", Some("b")),
            v("3", Some("c")),
            v("4", None),
            v("5", Some("e"))
        ]
    );
    // Close (no reply), then the connection is still in step.
    let mut close = vec![0x19];
    close.extend_from_slice(&id.to_le_bytes());
    {
        use tokio::io::AsyncWriteExt;
        m.client(0, &close).expect("close");
        s.write_all(&sluice::protocol::mysql::packet::packet(0, &close))
            .await
            .expect("send close");
    }
    assert!(m.is_idle());
    let r = exchange(&mut s, &mut m, &q("select 'in step'")).await;
    assert_eq!(r.rows, vec![vec![Some("in step".to_string())]]);
}

#[tokio::test]
async fn sluice_logs_in_to_mariadb_over_tls_after_an_ssl_request() {
    use sluice::proxy::mysql::login::{
        Credentials, LoginOptions, authenticate, read_greeting, request_tls,
    };
    use sluice::tls::{BackendTls, client_config};
    use sluice_tests::TestCa;
    if !require_mariadb("sluice_logs_in_to_mariadb_over_tls_after_an_ssl_request") {
        return;
    }
    let ca = TestCa::new().expect("test CA");
    let (cert, key) = ca.issue("mariadb").expect("server certificate");
    let db = MariaDb::start_tls(&cert, &key).expect("start mariadb with TLS");
    let opts = LoginOptions::default();
    let mut tcp = tokio::net::TcpStream::connect(db.addr())
        .await
        .expect("connect");
    let greeting = read_greeting(&mut tcp).await.expect("greeting");
    request_tls(&mut tcp, &greeting, &opts)
        .await
        .expect("SSLRequest");
    let config = client_config(BackendTls::VerifyFull, Some(&ca.cert))
        .expect("client config")
        .expect("a TLS config");
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS handshake with MariaDB (certificate verified)");
    let creds = Credentials {
        user: mariadb::USER,
        password: mariadb::PASSWORD.as_bytes(),
        database: Some(mariadb::DATABASE),
    };
    // The response is packet 2 (the SSLRequest was 1); the server checks.
    let login = authenticate(&mut s, &greeting, &creds, &opts, true)
        .await
        .expect("login over TLS");
    assert!(
        login
            .capabilities
            .contains(sluice::protocol::mysql::Capabilities::SSL)
    );
    // The session is encrypted, as the server sees it.
    use sluice::protocol::mysql::packet::packet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sql = b"\x03show status like 'Ssl_version'";
    s.write_all(&packet(0, sql)).await.expect("send");
    let mut m = sluice::protocol::mysql::ResponseMachine::new(login.capabilities);
    m.client(0, sql).expect("command");
    let mut buf = bytes::BytesMut::new();
    let mut dec = Decoder::new(MAX);
    dec.expect(Some(1));
    let mut version = None;
    while !m.is_idle() {
        let Some((n, p)) = dec.decode(&buf).expect("packet") else {
            assert!(s.read_buf(&mut buf).await.expect("read") > 0, "closed");
            continue;
        };
        let payload = p.payload.into_owned();
        let _ = buf.split_to(n);
        if let sluice::protocol::mysql::Event::Row(r) = m.server(&payload).expect("placed") {
            version = m.row(r).expect("row")[1].render();
        }
    }
    let version = version.unwrap_or_default();
    assert!(version.starts_with("TLSv1."), "Ssl_version = {version:?}");
}
