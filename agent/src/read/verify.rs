//! `sluice verify`: checks recorded sessions against their hash chains and signed checkpoints
//! (see `sluice_journal::chain`), and says per session whether it is intact, where it is not,
//! and which of its events no checkpoint covers yet. In a collector's store it also prints
//! what the collector flagged at ingest (gaps, bad or foreign signatures, conflicting
//! duplicates), which fails the verification too. Offline checks of an export bundle are in
//! `bundle.rs`.

use std::io::Write;

use sluice_journal::Reader;

use super::{ReadError, sessions};

/// Verifies one session (id or prefix) or all; returns whether every one verified.
pub fn verify(
    reader: &Reader,
    session: Option<&str>,
    out: &mut dyn Write,
) -> Result<bool, ReadError> {
    let list = match session {
        Some(prefix) => vec![reader.find(prefix)?],
        None => sessions(reader)?,
    };
    let mut all_ok = true;
    for s in &list {
        let v = reader.verify(&s.id)?;
        let key = v
            .public_key
            .as_ref()
            .map(|k| {
                k.iter()
                    .take(8)
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            })
            .unwrap_or_else(|| "-".into());
        match (&v.problem, v.sealed_through) {
            (Some((seq, why)), _) => {
                all_ok = false;
                writeln!(out, "{}  FAILED at event {seq}: {why}", s.id)?;
            }
            (None, None) => {
                all_ok = false;
                writeln!(
                    out,
                    "{}  UNSEALED: {} events, no signed checkpoint (unsigned journal, or the agent stopped first)",
                    s.id, v.events
                )?;
            }
            (None, Some(last)) if last + 1 < v.events => {
                all_ok = false;
                writeln!(
                    out,
                    "{}  ok through event {last}; {} later events are not covered by a checkpoint (key {key})",
                    s.id,
                    v.events - last - 1
                )?;
            }
            (None, Some(_)) => {
                writeln!(
                    out,
                    "{}  ok: {} events, all signed (key {key})",
                    s.id, v.events
                )?;
            }
        }
        if let Some(i) = reader.integrity(&s.id)?
            && !i.problems.is_empty()
        {
            all_ok = false;
            for p in &i.problems {
                writeln!(
                    out,
                    "{}  FLAGGED by the collector (agent {}): {p}",
                    s.id, i.agent
                )?;
            }
        }
    }
    Ok(all_ok)
}
