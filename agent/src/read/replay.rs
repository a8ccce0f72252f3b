//! `sluice replay ID`: a readable transcript of one session.
//!
//! ```text
//! 08:01:02.123456  > select id, email from users where id = $1   [$1 = '7']
//! 08:01:02.124001  < id | email
//!                    ---+------------------
//!                    7  | ada@example.com
//!                    (1 row)
//!                    SELECT 1
//! 08:01:02.130000  ! ERROR 42P01: relation "nope" does not exist
//! ```
//! Result rows are buffered per result set (to align the table) up to `max_rows`; the rest is
//! counted, not printed, so memory stays bounded on huge results.
//!
//! With [`Timing`], replay waits before each recorded event for the time that passed before it
//! in the recording, divided by `speed`; one wait is capped at [`MAX_GAP`] / `speed`, and a
//! capped wait is said so in the transcript. Waiting goes through a caller's function, so tests
//! run without sleeping.

use std::io::Write;
use std::time::Duration;

use sluice_journal::{Body, NoteLevel, Reader};

use super::{Decoder, ReadError, rfc3339};
use crate::inert::{Lines, escaped};
use crate::protocol::Item;

pub struct ReplayOptions {
    /// Rows shown per result set; the rest are counted.
    pub max_rows: usize,
    /// Replay with the recording's timing; None: as fast as it prints.
    pub timing: Option<Timing>,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            max_rows: 1000,
            timing: None,
        }
    }
}

/// The longest recorded pause replayed as it was (before dividing by the speed).
pub const MAX_GAP: Duration = Duration::from_secs(5);

/// Replay at the recorded pace, `speed` times faster.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub speed: f64,
}

impl Timing {
    /// The wait for a recorded gap of `gap_ns`, and whether it was capped.
    pub fn wait(&self, gap_ns: u64) -> (Duration, bool) {
        let gap = Duration::from_nanos(gap_ns);
        let capped = gap > MAX_GAP;
        let speed = if self.speed.is_finite() && self.speed > 0.0 {
            self.speed
        } else {
            1.0
        };
        (gap.min(MAX_GAP).div_f64(speed), capped)
    }
}

/// A result set being collected for display.
#[derive(Default)]
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
    hidden: u64,
    total: u64,
    ts: Option<u64>,
}

pub fn replay(
    reader: &Reader,
    id: &str,
    options: &ReplayOptions,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    replay_with(reader, id, options, out, &mut std::thread::sleep)
}

/// [`replay`], waiting (with [`Timing`]) through `sleep`.
pub fn replay_with(
    reader: &Reader,
    id: &str,
    options: &ReplayOptions,
    out: &mut dyn Write,
    sleep: &mut dyn FnMut(Duration),
) -> Result<(), ReadError> {
    // Every line goes through `Lines`: a newline or escape sequence that a client, a server or
    // a token put in a recorded string is shown escaped, never printed (the journal keeps it).
    let out = &mut Lines::new(out);
    let summary = reader.find(id)?;
    let s = &summary.start;
    writeln!(
        out,
        "session {}  target {} ({})  to {}  from {}",
        summary.id, s.target, s.protocol, s.orig_dst, s.client_addr
    )?;
    match &s.process {
        Some(p) => writeln!(
            out,
            "process uid {} gid {} pid {} comm {} cgroup {}",
            p.uid, p.gid, p.pid, p.comm, p.cgroup_id
        )?,
        None => writeln!(out, "process (explicit listener: not known)")?,
    }
    if let Some(p) = &s.principal {
        writeln!(out, "principal {} groups [{}]", p.name, p.groups.join(", "))?;
    }
    if !s.params.is_empty() {
        let params: Vec<String> = s.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(out, "startup {}", params.join(" "))?;
    }
    writeln!(
        out,
        "started {}  ended {}",
        rfc3339(summary.started_ns),
        match (summary.ended_ns, &summary.end_reason) {
            (Some(t), Some(r)) => format!("{} ({r})", rfc3339(t)),
            (Some(t), None) => rfc3339(t),
            _ => "(open, or not sealed)".into(),
        }
    )?;
    writeln!(out)?;

    let mut decoder = Decoder::for_protocol(&s.protocol);
    let mut table: Option<Table> = None;
    let mut last_ts: Option<u64> = None;
    for event in reader.events(&summary.id)? {
        let event = event?;
        if let Some(timing) = &options.timing {
            if let Some(last) = last_ts {
                pace(
                    timing,
                    event.ts_ns.saturating_sub(last),
                    &mut table,
                    out,
                    sleep,
                )?;
            }
            last_ts = Some(event.ts_ns);
        }
        match &event.body {
            Body::Note { level, text } => {
                let mark = match level {
                    NoteLevel::Info => "*",
                    NoteLevel::Warning | NoteLevel::Error => "!",
                };
                writeln!(out, "{}  {mark} sluice: {text}", clock(event.ts_ns))?;
            }
            Body::Decision(d) if !d.allowed => {
                writeln!(
                    out,
                    "{}  ! sluice: {} denied ({}): {}",
                    clock(event.ts_ns),
                    d.action,
                    d.policies.join(", "),
                    d.reason
                )?;
            }
            Body::Auth(a) => {
                writeln!(
                    out,
                    "{}  * sluice: authenticated by {}{}; client {}, backend {}",
                    clock(event.ts_ns),
                    a.method,
                    a.role
                        .as_ref()
                        .map(|r| format!(" as role {r}"))
                        .unwrap_or_default(),
                    a.client_tls,
                    a.backend_tls
                )?;
            }
            Body::Masked(m) => {
                let what: Vec<String> = m
                    .fired
                    .iter()
                    .map(|f| format!("{} {} by {} ({})", f.values, f.column, f.rule, f.strategy))
                    .collect();
                writeln!(
                    out,
                    "{}  * sluice: masked {}",
                    clock(event.ts_ns),
                    what.join(", ")
                )?;
            }
            Body::Review(r) => {
                writeln!(
                    out,
                    "{}  * sluice: request {} {}",
                    clock(event.ts_ns),
                    r.request,
                    r.state.describe()
                )?;
            }
            Body::End { reason } => {
                flush(&mut table, out)?;
                writeln!(out, "{}  = session ended: {reason}", clock(event.ts_ns))?;
            }
            _ => {}
        }
        for item in decoder.items(&event) {
            match item {
                Item::Columns(columns) => {
                    flush(&mut table, out)?;
                    table = Some(Table {
                        // Escaped here, so the widths are those of what is shown.
                        columns: columns.iter().map(|c| escaped(c).into_owned()).collect(),
                        ts: Some(event.ts_ns),
                        ..Table::default()
                    });
                }
                Item::Row(values) => {
                    let t = table.get_or_insert_with(|| Table {
                        ts: Some(event.ts_ns),
                        ..Table::default()
                    });
                    t.total += 1;
                    if t.rows.len() < options.max_rows {
                        t.rows.push(
                            values
                                .into_iter()
                                .map(|v| match v {
                                    Some(v) => escaped(&v).into_owned(),
                                    None => "NULL".into(),
                                })
                                .collect(),
                        );
                    } else {
                        t.hidden += 1;
                    }
                }
                Item::Complete { tag } => {
                    let ts = table.as_ref().and_then(|t| t.ts).unwrap_or(event.ts_ns);
                    if table.is_some() {
                        flush(&mut table, out)?;
                        writeln!(out, "{:15}    {tag}", "")?;
                    } else {
                        writeln!(out, "{}  < {tag}", clock(ts))?;
                    }
                }
                Item::Statement { sql, params } => {
                    flush(&mut table, out)?;
                    let mut line = format!("{}  > {}", clock(event.ts_ns), sql.trim());
                    if !params.is_empty() {
                        let shown: Vec<String> = params
                            .iter()
                            .enumerate()
                            .map(|(i, p)| match p {
                                Some(v) => format!("${} = '{v}'", i + 1),
                                None => format!("${} = NULL", i + 1),
                            })
                            .collect();
                        line.push_str(&format!("   [{}]", shown.join(", ")));
                    }
                    writeln!(out, "{line}")?;
                }
                Item::Error {
                    code,
                    message,
                    number,
                } => {
                    flush(&mut table, out)?;
                    let number = number.map(|n| format!(" ({n})")).unwrap_or_default();
                    writeln!(
                        out,
                        "{}  ! ERROR {code}{number}: {message}",
                        clock(event.ts_ns)
                    )?;
                }
                Item::Notice { code, message } => {
                    writeln!(out, "{}  ~ NOTICE {code}: {message}", clock(event.ts_ns))?
                }
                Item::Notification { channel, payload } => {
                    writeln!(out, "{}  ~ NOTIFY {channel}: {payload}", clock(event.ts_ns))?
                }
            }
        }
    }
    flush(&mut table, out)?;
    Ok(())
}

/// Waits for a recorded gap (scaled and capped), saying so when it was capped; what was
/// printed so far is flushed first, so the reader sees it before the pause.
fn pace(
    timing: &Timing,
    gap_ns: u64,
    table: &mut Option<Table>,
    out: &mut Lines<'_>,
    sleep: &mut dyn FnMut(Duration),
) -> Result<(), ReadError> {
    if gap_ns == 0 {
        return Ok(());
    }
    let (wait, capped) = timing.wait(gap_ns);
    if capped {
        flush(table, out)?;
        writeln!(
            out,
            "{:15}  ~ sluice: {:.1} s passed here in the recording (replay waits {:.2} s)",
            "",
            Duration::from_nanos(gap_ns).as_secs_f64(),
            wait.as_secs_f64()
        )?;
    }
    out.flush()?;
    sleep(wait);
    Ok(())
}

/// Time of day with microseconds, UTC.
fn clock(ns: u64) -> String {
    let full = rfc3339(ns);
    // 2026-11-28T08:01:02.123456789Z -> 08:01:02.123456
    full.get(11..26).map(str::to_string).unwrap_or(full)
}

fn flush(table: &mut Option<Table>, out: &mut Lines<'_>) -> Result<(), ReadError> {
    let Some(t) = table.take() else { return Ok(()) };
    let ncols = t
        .columns
        .len()
        .max(t.rows.iter().map(Vec::len).max().unwrap_or(0));
    let mut widths = vec![0usize; ncols];
    for (i, c) in t.columns.iter().enumerate() {
        widths[i] = widths[i].max(c.chars().count());
    }
    for row in &t.rows {
        for (i, v) in row.iter().enumerate() {
            widths[i] = widths[i].max(v.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let padded: Vec<String> = (0..ncols)
            .map(|i| {
                let v = cells.get(i).map(String::as_str).unwrap_or("");
                format!("{v:<w$}", w = widths[i])
            })
            .collect();
        padded.join(" | ").trim_end().to_string()
    };
    let ts = t.ts.map(clock).unwrap_or_default();
    writeln!(out, "{ts:15}  < {}", line(&t.columns))?;
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    writeln!(out, "{:15}    {}", "", rule.join("-+-"))?;
    for row in &t.rows {
        writeln!(out, "{:15}    {}", "", line(row))?;
    }
    if t.hidden > 0 {
        writeln!(
            out,
            "{:15}    ... {} more rows not shown (--max-rows)",
            "", t.hidden
        )?;
    }
    writeln!(
        out,
        "{:15}    ({} row{})",
        "",
        t.total,
        if t.total == 1 { "" } else { "s" }
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::read::fixture::Fixture;

    #[test]
    fn timing_divides_gaps_by_the_speed_and_caps_long_pauses() {
        let t = Timing { speed: 100.0 };
        assert_eq!(t.wait(2_000_000_000), (Duration::from_millis(20), false));
        assert_eq!(t.wait(60_000_000_000), (Duration::from_millis(50), true));
        let slow = Timing { speed: 0.5 };
        assert_eq!(slow.wait(1_000_000_000), (Duration::from_secs(2), false));
        assert_eq!(slow.wait(6_000_000_000), (Duration::from_secs(10), true));
    }

    #[test]
    fn a_capped_pause_is_said_in_the_transcript() {
        let mut out = Vec::new();
        let mut waits = Vec::new();
        let t = Timing { speed: 100.0 };
        pace(
            &t,
            60_000_000_000,
            &mut None,
            &mut Lines::new(&mut out),
            &mut |d| waits.push(d),
        )
        .unwrap();
        pace(
            &t,
            1_000_000_000,
            &mut None,
            &mut Lines::new(&mut out),
            &mut |d| waits.push(d),
        )
        .unwrap();
        pace(&t, 0, &mut None, &mut Lines::new(&mut out), &mut |d| {
            waits.push(d)
        })
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.trim(),
            "~ sluice: 60.0 s passed here in the recording (replay waits 0.05 s)"
        );
        assert_eq!(
            waits,
            vec![Duration::from_millis(50), Duration::from_millis(10)]
        );
    }

    #[test]
    fn replay_with_timing_waits_between_events_and_shows_the_same_transcript() {
        let f = Fixture::new();
        let id = f.sessions[0].to_string();
        let mut plain = Vec::new();
        replay(&f.reader(), &id, &ReplayOptions::default(), &mut plain).unwrap();
        let mut timed = Vec::new();
        let mut waits = Vec::new();
        let options = ReplayOptions {
            timing: Some(Timing { speed: 100.0 }),
            ..ReplayOptions::default()
        };
        replay_with(&f.reader(), &id, &options, &mut timed, &mut |d| {
            waits.push(d)
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            String::from_utf8(timed).unwrap()
        );
        assert!(!waits.is_empty());
        assert!(waits.iter().all(|w| *w <= MAX_GAP / 100), "{waits:?}");
    }
}
