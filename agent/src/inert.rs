//! Untrusted text made inert for the people who read it. What clients, servers and tokens say
//! (a user or database name, a statement, a token's `kid`, an error text) reaches the agent's
//! log and the read commands' output; a newline in it would forge a line there, and an escape
//! sequence would drive the reader's terminal.
//!
//! Owns the one escaping rule ([`escape_into`]; [`Inert`] displays a value through it) and its
//! two unforgettable uses:
//! - [`LogFields`], the field formatter of the agent's text log, installed once in `main`:
//!   every field of every event and span (the message included) is escaped, so no call site
//!   can forget to. (The JSON log format escapes by itself: serde_json writes control
//!   characters as `\n`, `\u001b`, ...)
//! - [`Lines`], the writer the read commands print through: each write is one line, every
//!   control character in it is escaped and exactly one newline ends it.
//!
//! The rule: control characters (C0, DEL, C1) and the bidirectional overrides and isolates
//! (which reorder what a line appears to say) are written as `\n`, `\r`, `\t`, `\xHH`
//! (other C0 and DEL) or `\u{HHHH}`. Everything else, the backslash included, is written as
//! it is: inert, not reversible (a literal `\n` in a statement looks like an escaped newline,
//! and forges nothing). Never used for what must stay exact: the journal keeps the bytes as
//! sent, and exports are JSON (escaped faithfully by serde_json) or CSV (RFC 4180 quoting,
//! exact values; see `read/export.rs`).

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::io;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Whether `c` is written escaped.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Writes `text` to `out` with its control characters escaped (see the module's rule).
pub fn escape_into(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    let mut rest = text;
    while let Some((at, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
        out.write_str(&rest[..at])?;
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32)?,
            c => write!(out, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[at + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// `text` with its control characters escaped; borrowed when there is none.
pub fn escaped(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let _ = escape_into(&mut out, text);
    Cow::Owned(out)
}

/// Displays a value with its control characters escaped.
pub struct Inert<T>(pub T);

impl<T: fmt::Display> fmt::Display for Inert<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(Escaping(f), "{}", self.0)
    }
}

/// A `fmt::Write` that escapes what goes through it.
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(&mut self.0, s)
    }
}

/// The agent's text log formatter for fields: like tracing-subscriber's default (the message
/// bare, then `name=value` separated by spaces, `log.*` fields of bridged `log` records
/// skipped) with every value escaped, whether recorded with `%`, `?` or as a string.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogFields;

impl<'writer> FormatFields<'writer> for LogFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = FieldVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct FieldVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            " "
        };
        let w = &mut self.writer;
        self.result = match name {
            "message" => write!(w, "{sep}").and_then(|_| write!(Escaping(&mut *w), "{value:?}")),
            name => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(w, "{sep}{name}=").and_then(|_| write!(Escaping(&mut *w), "{value:?}"))
            }
        };
    }
}

/// Lines for a person to read, over any `io::Write`: each `write!`/`writeln!` is one line.
/// Its control characters are escaped (a newline inside a value too), and exactly one newline
/// ends it (the `writeln!` one, or one added).
pub struct Lines<'a> {
    out: &'a mut dyn io::Write,
    line: String,
    escaped: String,
}

impl<'a> Lines<'a> {
    pub fn new(out: &'a mut dyn io::Write) -> Lines<'a> {
        Lines {
            out,
            line: String::new(),
            escaped: String::new(),
        }
    }

    /// What `write!` and `writeln!` call: formats one line and writes it escaped.
    pub fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> io::Result<()> {
        self.line.clear();
        self.escaped.clear();
        let format = |e: fmt::Error| io::Error::other(e);
        self.line.write_fmt(args).map_err(format)?;
        let text = self.line.strip_suffix('\n').unwrap_or(&self.line);
        escape_into(&mut self.escaped, text).map_err(format)?;
        self.escaped.push('\n');
        self.out.write_all(self.escaped.as_bytes())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn control_characters_and_bidi_overrides_are_escaped_and_the_rest_is_kept() {
        assert_eq!(escaped("plain ünïcode \\n"), "plain ünïcode \\n");
        assert!(matches!(escaped("plain"), Cow::Borrowed(_)));
        assert_eq!(
            escaped("a\nb\r\tc\x1b[31md\x07\x7f\u{9b}e\u{202e}f"),
            "a\\nb\\r\\tc\\x1b[31md\\x07\\x7f\\u{9b}e\\u{202e}f"
        );
        assert_eq!(Inert("x\ny").to_string(), "x\\ny");
    }

    #[test]
    fn each_write_to_lines_is_one_line_whatever_its_values_hold() {
        let mut out = Vec::new();
        {
            let mut lines = Lines::new(&mut out);
            let forged = "select 1;\n12:00:00  > forged\x1b[2J";
            writeln!(lines, "> {forged}").unwrap();
            writeln!(lines).unwrap();
            write!(lines, "no newline").unwrap();
            writeln!(lines, "ends with one\n").unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "> select 1;\\n12:00:00  > forged\\x1b[2J\n\nno newline\nends with one\\n\n"
        );
    }

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_field_of_a_log_line_is_escaped_however_it_is_recorded() {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(LogFields)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("conn", user = %"bob\nINFO forged");
            let _in = span.enter();
            let reason = "token names key a\n2026 WARN forged\x1b[31m";
            tracing::warn!(reason = %reason, debug = ?reason, plain = reason, "refused: {}", "x\ny");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("refused: x\\ny"), "{text}");
        assert!(
            text.contains("reason=token names key a\\n2026 WARN forged\\x1b[31m"),
            "{text}"
        );
        assert!(text.contains("user=bob\\nINFO forged"), "{text}");
        // `?` and plain strings are Debug-quoted, as tracing-subscriber writes them.
        assert!(text.contains("plain=\"token names key a\\n"), "{text}");
    }
}
