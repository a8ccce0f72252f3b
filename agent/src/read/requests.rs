//! Listing requests and grants (`sluice requests`, `sluice grants`): a table for people, or
//! JSON. The records come from the agent over its control socket; this file only formats them.

use std::io::Write;

use sluice_journal::{AccessRequest, RequestKind, RequestState, now_ns};

use super::{ReadError, rfc3339};

/// Prints `requests` as a table (or JSON, one array); an approved access request shows when its
/// grant expires.
pub fn print_requests(
    requests: &[AccessRequest],
    json: bool,
    out: &mut dyn Write,
) -> Result<(), ReadError> {
    if json {
        serde_json::to_writer_pretty(&mut *out, requests)?;
        writeln!(out)?;
        return Ok(());
    }
    if requests.is_empty() {
        writeln!(out, "(none)")?;
        return Ok(());
    }
    // Statements and reasons are what people typed: each line is written escaped.
    let out = &mut crate::inert::Lines::new(out);
    let now = now_ns();
    writeln!(
        out,
        "{:<8}  {:<9}  {:<20}  {:<16}  {:<10}  {:<14}  {:<30}  WHY",
        "ID", "STATE", "CREATED", "WHO", "TARGET", "APPROVERS", "WHAT"
    )?;
    for r in requests {
        let what = match &r.kind {
            RequestKind::Statement { sql, action, .. } => {
                format!("{action}: {}", one_line(sql, 60))
            }
            RequestKind::Access { seconds } => format!("access for {}", duration(*seconds)),
        };
        let mut why = r.reason.clone();
        match &r.state {
            RequestState::Pending => {}
            RequestState::Approved {
                expires_ns: Some(e),
                ..
            } => {
                let left = if *e > now {
                    format!("expires in {}", duration((*e - now) / 1_000_000_000))
                } else {
                    "expired".into()
                };
                why = format!("{why} [{}; {left}]", r.state.describe());
            }
            state => why = format!("{why} [{}]", state.describe()),
        }
        writeln!(
            out,
            "{:<8}  {:<9}  {:<20}  {:<16}  {:<10}  {:<14}  {:<30}  {}",
            r.id,
            r.state.word(),
            rfc3339(r.created_ns).get(..19).unwrap_or(""),
            r.requester.name,
            r.target,
            r.approvers,
            what,
            why
        )?;
    }
    Ok(())
}

/// `3h 05m`, `30m`, `45s`.
fn duration(seconds: u64) -> String {
    match (seconds / 3600, seconds % 3600 / 60, seconds % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m {s:02}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h {m:02}m"),
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(1800), "30m");
        assert_eq!(duration(90), "1m 30s");
        assert_eq!(duration(7200), "2h");
        assert_eq!(duration(11100), "3h 05m");
    }

    #[test]
    fn long_statements_are_cut_on_one_line() {
        assert_eq!(one_line("select\n  1", 60), "select 1");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
