//! Verification bundles: `sluice export --out F --bundle B` writes B next to the export F, and
//! `sluice verify --bundle B [--export F] [--key HEX]` checks both offline, without the journal
//! or the collector.
//!
//! A bundle is JSON Lines, one object per line, so a person can read it and a tamperer's
//! change shows in a diff:
//! ```text
//! {"type":"header","format":"sluice-bundle","version":1,"export":{"file":..,"format":"csv",
//!   "sha256":..,"bytes":..},"filters":{..},"session":..,"sessions":N,"events":M,"created":..}
//! {"type":"session","session":ID,"summary":{..},"checkpoints":[{"seq":..,"chain":HEX,
//!   "public_key":HEX,"signature":HEX,"ts_ns":..}],"collector":null|{"agent":..,
//!   "verdict":..,"problems":[..]}}
//! {"type":"event","session":ID,"seq":0,"hash":HEX,"value":BASE64}     one line per event
//! ...
//! ```
//! Event values are the plaintext stored values the session's hash chain covers
//! (`sluice_journal::RawSession`); checkpoints carry the agent's Ed25519 public key and
//! signature. What the bundle proves: every event of every listed session is exactly what the
//! agent signed (chain + signatures, one key, `--key` if given), and the export is exactly what
//! those events produce through the code that wrote it ([`export_session`]). What it cannot
//! prove on its own: that no whole session was left out of both files (the session list is not
//! signed by anyone); compare the session count with the collector's search if that matters.
//! A session the collector flagged at ingest carries the collector's problems and fails
//! verification; that note is not signed either, so it protects against honest mistakes only
//! (`--key` is what pins the agent).
//!
//! Bundles are built and checked one session at a time: memory is bounded by the largest
//! session, not by the export.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::digest::{Context, SHA256};
use serde_json::{Value, json};
use sluice_journal::chain::Checkpoint;
use sluice_journal::{
    Body, Integrity, RawEvent, RawSession, Reader, SessionId, SessionSummary, ShipCheckpoint,
};

use super::export::{export_session, selected, write_header};
use super::{Filter, Format, ReadError, rfc3339};

const MAGIC: &str = "sluice-bundle";
const VERSION: u64 = 1;

/// A bundle that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: line {line}: {message} (is this a bundle written by `sluice export --bundle`?)",
        path.display()
    )]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("--key {0:?}: give the agent's Ed25519 public key as 64 hex digits")]
    Key(String),
}

/// `sluice export --out export --bundle bundle`: writes the export and, next to it, the
/// bundle that proves it. Returns the number of sessions exported.
pub fn export_with_bundle(
    reader: &Reader,
    session: Option<&str>,
    filter: &Filter,
    format: Format,
    export: &Path,
    bundle: &Path,
) -> Result<usize, ReadError> {
    // The session lines go to a side file first: the header, which comes first, needs the
    // export's digest.
    let partial = bundle.with_extension("partial");
    let result = write_both(reader, session, filter, format, export, bundle, &partial);
    let _ = std::fs::remove_file(&partial);
    result
}

fn write_both(
    reader: &Reader,
    session: Option<&str>,
    filter: &Filter,
    format: Format,
    export: &Path,
    bundle: &Path,
    partial: &Path,
) -> Result<usize, ReadError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Write { path, source }
    };
    let sessions = selected(reader, session, filter)?;
    let mut out = HashingWriter {
        inner: BufWriter::new(File::create(export).map_err(write_err(export))?),
        digest: Context::new(&SHA256),
        bytes: 0,
    };
    let mut body = BufWriter::new(File::create(partial).map_err(write_err(partial))?);
    let mut events = 0u64;
    write_header(format, &mut out)?;
    for s in &sessions {
        let raw = reader.raw_session(&s.id)?;
        export_session(
            &raw.summary.id,
            &raw.summary.start,
            raw.events(),
            format,
            &mut out,
        )?;
        events += raw.events.len() as u64;
        let flagged = reader.integrity(&s.id)?;
        write_session(&raw, flagged.as_ref(), &mut body)?;
    }
    out.inner.flush().map_err(write_err(export))?;
    body.flush().map_err(write_err(partial))?;
    drop(body);
    let header = json!({
        "type": "header",
        "format": MAGIC,
        "version": VERSION,
        "export": {
            "file": export.file_name().map(|n| n.to_string_lossy().into_owned()),
            "format": format.word(),
            "sha256": hex(out.digest.finish().as_ref()),
            "bytes": out.bytes,
        },
        "filters": filter.to_json(),
        "session": session,
        "sessions": sessions.len(),
        "events": events,
        "created": rfc3339(sluice_journal::now_ns()),
    });
    let mut file = BufWriter::new(File::create(bundle).map_err(write_err(bundle))?);
    serde_json::to_writer(&mut file, &header)?;
    writeln!(file)?;
    let mut side = File::open(partial).map_err(write_err(partial))?;
    std::io::copy(&mut side, &mut file).map_err(write_err(bundle))?;
    file.flush().map_err(write_err(bundle))?;
    Ok(sessions.len())
}

/// Counts and hashes what passes through.
struct HashingWriter<W: Write> {
    inner: W,
    digest: Context,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn write_session(
    raw: &RawSession,
    collector: Option<&Integrity>,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    let id = raw.summary.id.to_string();
    let checkpoints: Vec<Value> = raw
        .checkpoints
        .iter()
        .map(|c| {
            json!({
                "seq": c.seq,
                "chain": hex(&c.checkpoint.chain),
                "public_key": hex(&c.checkpoint.public_key),
                "signature": hex(&c.checkpoint.signature),
                "ts_ns": c.checkpoint.ts_ns,
            })
        })
        .collect();
    let line = json!({
        "type": "session",
        "session": id,
        "summary": raw.summary,
        "checkpoints": checkpoints,
        "collector": collector.map(|i| json!({
            "agent": i.agent,
            "verdict": i.verdict(),
            "problems": i.problems,
        })),
    });
    serde_json::to_writer(&mut *out, &line)?;
    writeln!(out)?;
    for e in &raw.events {
        let line = json!({
            "type": "event",
            "session": id,
            "seq": e.seq,
            "hash": e.hash.map(|h| hex(&h)),
            "value": BASE64.encode(&e.value),
        });
        serde_json::to_writer(&mut *out, &line)?;
        writeln!(out)?;
    }
    Ok(())
}

/// A bundle read back: its header and its sessions, in file order.
pub struct Bundle {
    pub path: PathBuf,
    pub header: Value,
    pub sessions: Vec<BundleSession>,
}

/// One session of a bundle, with what its lines looked like (for naming the bad one).
pub struct BundleSession {
    pub raw: RawSession,
    /// The bundle line of each event, in file order.
    pub lines: Vec<usize>,
    /// The first structural problem of its event lines (seq and what is wrong), found before
    /// the chain is checked: a repeated or out-of-order seq.
    pub order_problem: Option<(u64, String)>,
    /// The agent that shipped it, when exported from a collector.
    pub agent: Option<String>,
    /// What the collector flagged at ingest (not signed: an honest exporter's note).
    pub flagged: Vec<String>,
}

impl Bundle {
    pub fn read(path: &Path) -> Result<Bundle, BundleError> {
        let file = File::open(path).map_err(|source| BundleError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, message: String| BundleError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut header = None;
        let mut sessions: Vec<BundleSession> = Vec::new();
        let mut index: HashMap<SessionId, usize> = HashMap::new();
        for (n, text) in BufReader::new(file).lines().enumerate() {
            let line = n + 1;
            let text = text.map_err(|source| BundleError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            if text.trim().is_empty() {
                continue;
            }
            let v: Value =
                serde_json::from_str(&text).map_err(|e| bad(line, format!("not JSON: {e}")))?;
            let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
            match (kind, &header) {
                ("header", None) => {
                    if v.get("format").and_then(Value::as_str) != Some(MAGIC) {
                        return Err(bad(line, format!("the header's format is not {MAGIC:?}")));
                    }
                    if v.get("version").and_then(Value::as_u64) != Some(VERSION) {
                        return Err(bad(
                            line,
                            format!("bundle version {} is not {VERSION}", v["version"]),
                        ));
                    }
                    header = Some(v);
                }
                (_, None) => return Err(bad(line, "the first line is not a bundle header".into())),
                ("header", Some(_)) => return Err(bad(line, "a second header".into())),
                ("session", Some(_)) => {
                    let raw = parse_session(&v).map_err(|m| bad(line, m))?;
                    let id = raw.summary.id;
                    if index.insert(id, sessions.len()).is_some() {
                        return Err(bad(line, format!("session {id} is listed twice")));
                    }
                    let flagged = v["collector"]["problems"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| p.as_str().map(str::to_string))
                        .collect();
                    sessions.push(BundleSession {
                        raw,
                        lines: Vec::new(),
                        order_problem: None,
                        agent: v["collector"]["agent"].as_str().map(str::to_string),
                        flagged,
                    });
                }
                ("event", Some(_)) => {
                    let (id, event) = parse_event(&v).map_err(|m| bad(line, m))?;
                    let Some(&i) = index.get(&id) else {
                        return Err(bad(
                            line,
                            format!(
                                "an event of session {id}, which no session line before it lists"
                            ),
                        ));
                    };
                    let s = &mut sessions[i];
                    if s.order_problem.is_none() {
                        let expected = s.raw.events.len() as u64;
                        if event.seq < expected {
                            let previous = s.raw.events.last().map(|e| e.seq).unwrap_or(0);
                            s.order_problem = Some((
                                event.seq,
                                format!(
                                    "repeated or out of order: bundle line {line} holds event {} after event {previous} (events were inserted or reordered)",
                                    event.seq
                                ),
                            ));
                        } else if event.seq > expected {
                            s.order_problem = Some((
                                expected,
                                format!(
                                    "missing: bundle line {line} holds event {} where event {expected} should be (events were dropped or reordered)",
                                    event.seq
                                ),
                            ));
                        }
                    }
                    s.lines.push(line);
                    s.raw.events.push(event);
                }
                (other, Some(_)) => {
                    return Err(bad(line, format!("unknown line type {other:?}")));
                }
            }
        }
        let header = header.ok_or_else(|| bad(1, "the bundle is empty".into()))?;
        Ok(Bundle {
            path: path.to_path_buf(),
            header,
            sessions,
        })
    }
}

fn parse_session(v: &Value) -> Result<RawSession, String> {
    let summary: SessionSummary = serde_json::from_value(v["summary"].clone())
        .map_err(|e| format!("a session line whose summary does not parse: {e}"))?;
    let mut checkpoints = Vec::new();
    for c in v["checkpoints"].as_array().into_iter().flatten() {
        let seq = c["seq"]
            .as_u64()
            .ok_or_else(|| "a checkpoint without a seq".to_string())?;
        let field = |name: &str| {
            c[name]
                .as_str()
                .and_then(unhex)
                .ok_or_else(|| format!("checkpoint {seq}: {name} is not hex"))
        };
        let chain: [u8; 32] = field("chain")?
            .try_into()
            .map_err(|_| format!("checkpoint {seq}: chain is not 32 bytes"))?;
        checkpoints.push(ShipCheckpoint {
            seq,
            checkpoint: Checkpoint {
                chain,
                public_key: field("public_key")?,
                signature: field("signature")?,
                ts_ns: c["ts_ns"].as_u64().unwrap_or(0),
            },
        });
    }
    Ok(RawSession {
        summary,
        events: Vec::new(),
        checkpoints,
    })
}

fn parse_event(v: &Value) -> Result<(SessionId, RawEvent), String> {
    let id: SessionId = v["session"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "an event line without a valid session id".to_string())?;
    let seq = v["seq"]
        .as_u64()
        .ok_or_else(|| "an event line without a seq".to_string())?;
    let value = v["value"]
        .as_str()
        .and_then(|s| BASE64.decode(s).ok())
        .ok_or_else(|| format!("event {seq}: value is not base64"))?;
    let hash = match &v["hash"] {
        Value::Null => None,
        h => Some(
            h.as_str()
                .and_then(unhex)
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| format!("event {seq}: hash is not 64 hex digits"))?,
        ),
    };
    Ok((id, RawEvent { seq, value, hash }))
}

/// What to check besides the sessions themselves.
pub struct BundleCheck<'a> {
    /// The export the bundle is for, to re-derive and compare.
    pub export: Option<&'a Path>,
    /// The agent's public key the checkpoints must be signed with (32 bytes).
    pub key: Option<Vec<u8>>,
}

/// `--key HEX` as raw bytes.
pub fn parse_key(text: &str) -> Result<Vec<u8>, BundleError> {
    unhex(text.trim())
        .filter(|k| k.len() == 32)
        .ok_or_else(|| BundleError::Key(text.to_string()))
}

/// `sluice verify --bundle`: checks every session (chain, signatures, one key), then the
/// export; prints a line per finding and returns whether everything verified.
pub fn verify_bundle(
    bundle: &Bundle,
    check: &BundleCheck<'_>,
    out: &mut dyn Write,
) -> Result<bool, ReadError> {
    let mut all_ok = true;
    let mut key: Option<Vec<u8>> = check.key.clone();
    let mut first_key_from: Option<SessionId> = None;
    writeln!(
        out,
        "bundle {}: {} sessions, export {} ({})",
        bundle.path.display(),
        bundle.sessions.len(),
        bundle.header["export"]["file"].as_str().unwrap_or("-"),
        bundle.header["export"]["format"].as_str().unwrap_or("-"),
    )?;
    for s in &bundle.sessions {
        let id = s.raw.summary.id;
        match session_problem(s, &mut key, &mut first_key_from, check.key.is_some()) {
            Some((seq, why)) => {
                all_ok = false;
                // The journal's sentences often start by naming the event again.
                let why = why
                    .strip_prefix(&format!("event {seq} "))
                    .map(str::to_string)
                    .unwrap_or(why);
                writeln!(out, "session {id} event {seq}: {why}")?;
            }
            None => writeln!(
                out,
                "session {id}: ok, {} events, all signed",
                s.raw.events.len()
            )?,
        }
        for p in &s.flagged {
            all_ok = false;
            writeln!(
                out,
                "session {id}: FLAGGED by the collector (agent {}): {p}",
                s.agent.as_deref().unwrap_or("-")
            )?;
        }
    }
    match &key {
        Some(k) => writeln!(out, "signed by key {}", hex(k))?,
        None if bundle.sessions.is_empty() => {}
        None => writeln!(out, "no session is signed")?,
    }
    if let Some(path) = check.export
        && !verify_export(bundle, path, all_ok, out)?
    {
        all_ok = false;
    }
    Ok(all_ok)
}

/// The first problem of one session: line order, chain and hashes, signatures and key, the
/// coverage of its checkpoints, and its index entry against its signed start event.
fn session_problem(
    s: &BundleSession,
    key: &mut Option<Vec<u8>>,
    first_key_from: &mut Option<SessionId>,
    key_given: bool,
) -> Option<(u64, String)> {
    if let Some(p) = &s.order_problem {
        return Some(p.clone());
    }
    let v = s.raw.verify();
    if let Some(p) = v.problem {
        return Some(p);
    }
    let n = s.raw.events.len() as u64;
    match v.sealed_through {
        None if n > 0 => {
            return Some((
                0,
                "no signed checkpoint covers this session (unsigned journal, or exported while it was open): it cannot be verified".into(),
            ));
        }
        Some(last) if last + 1 < n => {
            return Some((
                last + 1,
                format!(
                    "events {} to {} are not covered by a signed checkpoint (exported while the session was open?): they cannot be verified",
                    last + 1,
                    n - 1
                ),
            ));
        }
        _ => {}
    }
    if let Some(k) = &v.public_key {
        match (key.as_ref(), *first_key_from) {
            (Some(want), _) if want != k => {
                let whose = match first_key_from {
                    Some(other) if !key_given => format!("the key of session {other}"),
                    _ => "the key given with --key".to_string(),
                };
                return Some((0, format!("signed with key {}, not {whose}", hex(k))));
            }
            (None, _) => {
                *key = Some(k.clone());
                *first_key_from = Some(s.raw.summary.id);
            }
            _ => {}
        }
    }
    // The index entry is not signed; the start event is. They must agree.
    match s.raw.events().next() {
        Some(Ok(e)) => match &e.body {
            Body::Start(start) if *start == s.raw.summary.start => None,
            Body::Start(_) => Some((
                0,
                "the session line's summary does not match the signed start event (target, principal, user or process were altered)".into(),
            )),
            _ => Some((0, "the first event is not the session's start".into())),
        },
        Some(Err(e)) => Some((0, format!("does not decode: {e}"))),
        None => None,
    }
}

/// Re-derives the export from the bundle's events and compares it with `path`, line by line.
/// `sessions_ok`: whether those events verified (if not, a match proves nothing).
fn verify_export(
    bundle: &Bundle,
    path: &Path,
    sessions_ok: bool,
    out: &mut dyn Write,
) -> Result<bool, ReadError> {
    let format = bundle.header["export"]["format"]
        .as_str()
        .and_then(Format::from_word)
        .ok_or_else(|| BundleError::Line {
            path: bundle.path.clone(),
            line: 1,
            message: "the header names no export format (jsonl or csv)".into(),
        })?;
    let mut actual = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut actual))
        .map_err(|source| BundleError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let shown = path.display();
    let mut expected = Vec::new();
    write_header(format, &mut expected)?;
    for s in &bundle.sessions {
        if let Err(e) = export_session(
            &s.raw.summary.id,
            &s.raw.summary.start,
            s.raw.events(),
            format,
            &mut expected,
        ) {
            writeln!(
                out,
                "export {shown}: cannot be re-derived from session {}: {}",
                s.raw.summary.id,
                crate::error_chain(&e)
            )?;
            return Ok(false);
        }
    }
    if let Some((line, want, got)) = first_difference(&expected, &actual) {
        writeln!(
            out,
            "export {shown}: line {line} is not what the bundle's events say\n  expected: {}\n  found:    {}",
            want.as_deref().unwrap_or("(end of file)"),
            got.as_deref().unwrap_or("(end of file)"),
        )?;
        return Ok(false);
    }
    let digest = hex(ring::digest::digest(&SHA256, &actual).as_ref());
    if bundle.header["export"]["sha256"].as_str() != Some(digest.as_str()) {
        writeln!(
            out,
            "export {shown}: matches the bundle's events, but its SHA-256 {digest} is not the one the bundle's header records ({})",
            bundle.header["export"]["sha256"].as_str().unwrap_or("none")
        )?;
        return Ok(false);
    }
    let lines = expected.split(|b| *b == b'\n').count().saturating_sub(1);
    if !sessions_ok {
        writeln!(
            out,
            "export {shown}: matches the bundle's {lines} lines, but the bundle's events do not verify (see above), so neither does the export"
        )?;
        return Ok(false);
    }
    writeln!(
        out,
        "export {shown}: ok, {lines} lines re-derived from the bundle's events (sha256 {digest})"
    )?;
    Ok(true)
}

/// The first line (1-based) where two texts differ, with both versions of it.
fn first_difference(
    expected: &[u8],
    actual: &[u8],
) -> Option<(usize, Option<String>, Option<String>)> {
    let mut want = expected.split_inclusive(|b| *b == b'\n');
    let mut got = actual.split_inclusive(|b| *b == b'\n');
    let mut line = 0;
    loop {
        line += 1;
        match (want.next(), got.next()) {
            (None, None) => return None,
            (w, g) if w == g => continue,
            (w, g) => {
                let show = |l: &[u8]| String::from_utf8_lossy(l).trim_end().to_string();
                return Some((line, w.map(show), g.map(show)));
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::read::fixture::Fixture;

    /// An export with its bundle, written from the fixture's journal.
    struct Written {
        fixture: Fixture,
        export: PathBuf,
        bundle: PathBuf,
    }

    fn written(format: Format) -> Written {
        let fixture = Fixture::new();
        let export = fixture.dir.path().join("export.csv");
        let bundle = fixture.dir.path().join("export.bundle.jsonl");
        let n = export_with_bundle(
            &fixture.reader(),
            None,
            &Filter::default(),
            format,
            &export,
            &bundle,
        )
        .unwrap();
        assert_eq!(n, 2);
        Written {
            fixture,
            export,
            bundle,
        }
    }

    fn verify(w: &Written, key: Option<Vec<u8>>) -> (bool, String) {
        let bundle = Bundle::read(&w.bundle).unwrap();
        let mut out = Vec::new();
        let ok = verify_bundle(
            &bundle,
            &BundleCheck {
                export: Some(&w.export),
                key,
            },
            &mut out,
        )
        .unwrap();
        (ok, String::from_utf8(out).unwrap())
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    /// The index of the bundle line holding event `seq` of the first session.
    fn event_line(lines: &[String], seq: u64) -> usize {
        lines
            .iter()
            .position(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["type"] == "event" && v["seq"] == seq
            })
            .unwrap()
    }

    #[test]
    fn an_export_and_its_bundle_verify_offline() {
        for format in [Format::Csv, Format::Jsonl] {
            let w = written(format);
            let (ok, out) = verify(&w, None);
            assert!(ok, "{out}");
            assert!(out.contains("all signed"), "{out}");
            assert!(out.contains("ok, "), "{out}");
            // The export is the one `sluice export` writes without a bundle.
            let mut plain = Vec::new();
            crate::read::export(
                &w.fixture.reader(),
                None,
                &Filter::default(),
                format,
                &mut plain,
            )
            .unwrap();
            assert_eq!(plain, std::fs::read(&w.export).unwrap());
            // The right key passes, another one fails.
            let header = Bundle::read(&w.bundle).unwrap();
            let key = header.sessions[0].raw.checkpoints[0]
                .checkpoint
                .public_key
                .clone();
            assert!(verify(&w, Some(key)).0);
            let (ok, out) = verify(&w, Some(vec![7; 32]));
            assert!(!ok && out.contains("not the key given with --key"), "{out}");
        }
    }

    #[test]
    fn an_altered_event_value_is_named() {
        let w = written(Format::Csv);
        let mut l = lines(&w.bundle);
        let i = event_line(&l, 1);
        let mut v: Value = serde_json::from_str(&l[i]).unwrap();
        let mut value = BASE64.decode(v["value"].as_str().unwrap()).unwrap();
        let last = value.len() - 2;
        value[last] ^= 1;
        v["value"] = BASE64.encode(&value).into();
        l[i] = v.to_string();
        write_lines(&w.bundle, &l);
        let (ok, out) = verify(&w, None);
        assert!(!ok);
        let id = w.fixture.sessions[0];
        assert!(out.contains(&format!("session {id} event 1: ")), "{out}");
    }

    #[test]
    fn dropped_swapped_and_inserted_event_lines_are_named() {
        let id = |w: &Written| w.fixture.sessions[0];
        // Dropped.
        let w = written(Format::Csv);
        let mut l = lines(&w.bundle);
        l.remove(event_line(&l, 1));
        write_lines(&w.bundle, &l);
        let (ok, out) = verify(&w, None);
        assert!(
            !ok && out.contains(&format!("session {} event 1: missing", id(&w))),
            "{out}"
        );
        // Swapped.
        let w = written(Format::Csv);
        let mut l = lines(&w.bundle);
        let (a, b) = (event_line(&l, 1), event_line(&l, 2));
        l.swap(a, b);
        write_lines(&w.bundle, &l);
        let (ok, out) = verify(&w, None);
        assert!(
            !ok && out.contains(&format!("session {} event 1: missing", id(&w))),
            "{out}"
        );
        // Swapped values, seqs left in order: the recorded hashes cover the seq.
        let w = written(Format::Csv);
        let mut l = lines(&w.bundle);
        let (a, b) = (event_line(&l, 1), event_line(&l, 2));
        let mut va: Value = serde_json::from_str(&l[a]).unwrap();
        let mut vb: Value = serde_json::from_str(&l[b]).unwrap();
        va["seq"] = 2.into();
        vb["seq"] = 1.into();
        l[a] = vb.to_string();
        l[b] = va.to_string();
        write_lines(&w.bundle, &l);
        let (ok, out) = verify(&w, None);
        assert!(
            !ok && out.contains(&format!("session {} event 1: ", id(&w))),
            "{out}"
        );
        // Inserted (a copy of event 1 after it).
        let w = written(Format::Csv);
        let mut l = lines(&w.bundle);
        let a = event_line(&l, 1);
        l.insert(a + 1, l[a].clone());
        write_lines(&w.bundle, &l);
        let (ok, out) = verify(&w, None);
        assert!(
            !ok && out.contains(&format!("session {} event 1: repeated", id(&w))),
            "{out}"
        );
    }

    #[test]
    fn an_altered_session_summary_is_caught_by_its_signed_start_event() {
        let w = written(Format::Csv);
        let l: Vec<String> = lines(&w.bundle)
            .into_iter()
            .map(|l| l.replacen("\"name\":\"ada\"", "\"name\":\"mallory\"", 1))
            .collect();
        write_lines(&w.bundle, &l);
        let (ok, out) = verify(&w, None);
        assert!(
            !ok && out.contains("event 0: the session line's summary"),
            "{out}"
        );
    }

    #[test]
    fn an_altered_export_line_is_named() {
        let w = written(Format::Csv);
        let mut l = lines(&w.export);
        let i = l.iter().position(|l| l.contains(",row,")).unwrap();
        l[i] = l[i].replace("ada", "eve");
        write_lines(&w.export, &l);
        let (ok, out) = verify(&w, None);
        assert!(!ok, "{out}");
        assert!(
            out.contains(&format!("line {} is not what", i + 1)),
            "{out}"
        );
        // A line appended at the end is caught too.
        let w = written(Format::Jsonl);
        let mut l = lines(&w.export);
        l.push(l[l.len() - 1].clone());
        write_lines(&w.export, &l);
        let (ok, out) = verify(&w, None);
        assert!(
            !ok && out.contains(&format!("line {} is not what", l.len())),
            "{out}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_bundle_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        std::fs::write(&path, "{\"kind\":\"row\"}\n").unwrap();
        let e = Bundle::read(&path).err().unwrap().to_string();
        assert!(
            e.contains("line 1: the first line is not a bundle header"),
            "{e}"
        );
        std::fs::write(&path, "session,seq\n").unwrap();
        let e = Bundle::read(&path).err().unwrap().to_string();
        assert!(e.contains("line 1: not JSON"), "{e}");
        assert!(parse_key("abcd").is_err());
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), vec![0xab; 32]);
    }
}
