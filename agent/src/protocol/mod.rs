//! Wire protocols: one module per protocol, and the shared vocabulary they decode into.
//!
//! Each protocol module is a pure codec: functions over byte slices, no sockets, no tokio, no
//! clocks. What a recorded exchange *means* is expressed as [`Item`]s, which replay, export and
//! (later) policy and masking consume without knowing which protocol produced them. A protocol
//! module must never panic on input bytes: malformed input is an error value, or an
//! [`Item::Error`] with code `"sluice"` when transcribing.
pub mod mysql;
pub mod postgres;

use serde::Serialize;

/// What a recorded exchange means, protocol-independent.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    /// A statement the client had executed: simple-query text, or a prepared statement's SQL
    /// with the parameter values of one execution (text values as UTF-8, lossy; binary values
    /// decoded when their type is known, otherwise rendered as `\x` hex).
    Statement {
        sql: String,
        params: Vec<Option<String>>,
    },
    /// The names of the columns of the result rows that follow. JSON: `{"kind":"columns",
    /// "names":[...]}` (serde cannot inline a sequence next to the tag).
    #[serde(serialize_with = "as_field::<_, _, NAMES>")]
    Columns(Vec<String>),
    /// One result row (or one COPY line); `None` is SQL NULL. JSON: `{"kind":"row",
    /// "values":[...]}`.
    #[serde(serialize_with = "as_field::<_, _, VALUES>")]
    Row(Vec<Option<String>>),
    /// The command completion tag: `"SELECT 3"`, `"INSERT 0 1"`, ...
    Complete { tag: String },
    /// An error reported by the server (SQLSTATE code), or by sluice itself (code `"sluice"`).
    Error {
        code: String,
        message: String,
        /// The protocol's own error number, where it has one (MySQL: 1146).
        #[serde(skip_serializing_if = "Option::is_none")]
        number: Option<u16>,
    },
    /// A notice or warning reported by the server.
    Notice { code: String, message: String },
    /// An asynchronous notification (PostgreSQL LISTEN/NOTIFY).
    Notification { channel: String, payload: String },
}

const NAMES: u8 = 0;
const VALUES: u8 = 1;

/// Serializes a newtype variant's sequence as a one-entry map (`names` or `values`), which an
/// internally tagged enum can flatten next to its `kind` tag.
fn as_field<T, S, const FIELD: u8>(value: &T, serializer: S) -> Result<S::Ok, S::Error>
where
    T: Serialize,
    S: serde::Serializer,
{
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(1))?;
    map.serialize_entry(if FIELD == NAMES { "names" } else { "values" }, value)?;
    map.end()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Item;

    #[test]
    fn items_serialize_with_a_kind_tag() {
        let json = |i: &Item| serde_json::to_string(i).unwrap();
        assert_eq!(
            json(&Item::Complete {
                tag: "SELECT 1".into()
            }),
            r#"{"kind":"complete","tag":"SELECT 1"}"#
        );
        assert_eq!(
            json(&Item::Columns(vec!["id".into()])),
            r#"{"kind":"columns","names":["id"]}"#
        );
        assert_eq!(
            json(&Item::Row(vec![Some("1".into()), None])),
            r#"{"kind":"row","values":["1",null]}"#
        );
        assert_eq!(
            json(&Item::Statement {
                sql: "select $1".into(),
                params: vec![None]
            }),
            r#"{"kind":"statement","sql":"select $1","params":[null]}"#
        );
    }
}
