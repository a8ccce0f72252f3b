//! Where a result column comes from: a RowDescription names each column's table OID and
//! attribute number; the catalog turns those into schema, table and column names, so masking
//! rules by table and column apply even under an alias (`SELECT email AS contact`).
//!
//! Lookups go over a connection of sluice's own to the same backend and database, logged in
//! as the session's role (so only with `auth = "sluice"`, where the agent holds credentials;
//! passthrough sessions match by result name). Results are cached per target and database,
//! shared by all sessions; a table OID the catalog does not know (dropped, or invisible to the
//! role) is cached as unknown too, so it is not asked for again. The side connection is not
//! journaled: it reads catalog names only, never rows. Bounded: one query per batch of unknown
//! OIDs, a timeout on the whole exchange, at most [`MAX_TABLES`] cached tables per database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::login;
use crate::config::{Role, Target};
use crate::protocol::postgres::backend::{Backend, decode_backend};
use crate::protocol::postgres::encode;
use crate::protocol::postgres::frame::HEADER_LEN;

/// Cached tables per target and database before the cache starts over.
pub(crate) const MAX_TABLES: usize = 10_000;

/// A table's names: schema, table, and its columns by attribute number.
#[derive(Debug, Clone, Default)]
pub(crate) struct TableNames {
    pub schema: String,
    pub table: String,
    pub columns: HashMap<i16, String>,
}

type Cache = HashMap<(String, String), HashMap<u32, Option<Arc<TableNames>>>>;

/// The agent's caches, per (target, database).
#[derive(Default)]
pub(crate) struct Catalogs {
    cache: Mutex<Cache>,
}

impl Catalogs {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One session's way to the catalog.
pub(crate) struct CatalogAccess {
    pub catalogs: Arc<Catalogs>,
    pub target: Target,
    pub backend: crate::proxy::upstream::Addr,
    pub role: Role,
    pub database: String,
    pub mark: u32,
    pub timeout: Duration,
    pub max_message: usize,
}

impl CatalogAccess {
    fn key(&self) -> (String, String) {
        (self.target.name.clone(), self.database.clone())
    }

    /// The names of table `oid`, if known.
    pub(crate) fn table(&self, oid: u32) -> Option<Arc<TableNames>> {
        self.catalogs
            .lock()
            .get(&self.key())
            .and_then(|m| m.get(&oid).cloned())
            .flatten()
    }

    /// Makes sure every OID in `oids` is cached (as names or as unknown). A failed lookup is
    /// logged and leaves them unknown for this result only (masking then falls back to names).
    pub(crate) async fn ensure(&self, oids: &[u32]) {
        let missing: Vec<u32> = {
            let cache = self.catalogs.lock();
            let known = cache.get(&self.key());
            oids.iter()
                .copied()
                .filter(|o| *o != 0 && known.is_none_or(|m| !m.contains_key(o)))
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        match tokio::time::timeout(self.timeout, self.fetch(&missing)).await {
            Ok(Ok(found)) => {
                let mut cache = self.catalogs.lock();
                let entry = cache.entry(self.key()).or_default();
                if entry.len() + missing.len() > MAX_TABLES {
                    entry.clear();
                }
                for oid in missing {
                    entry.insert(oid, found.get(&oid).cloned().map(Arc::new));
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "catalog lookup failed: masking matches by column name")
            }
            Err(_) => tracing::warn!("catalog lookup timed out: masking matches by column name"),
        }
    }

    async fn fetch(&self, oids: &[u32]) -> Result<HashMap<u32, TableNames>, String> {
        let mut conn = super::dial(&self.target, &self.backend, self.mark, self.timeout).await?;
        let params = vec![
            ("database".to_string(), self.database.clone()),
            ("application_name".to_string(), "sluice catalog".to_string()),
        ];
        login::backend_login(&mut conn, &self.role, &params, self.max_message)
            .await
            .map_err(|e| e.to_string())?;
        let list: Vec<String> = oids.iter().map(u32::to_string).collect();
        let sql = format!(
            "select c.oid, n.nspname, c.relname, a.attnum, a.attname from pg_catalog.pg_class c \
             join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
             join pg_catalog.pg_attribute a on a.attrelid = c.oid \
             where c.oid in ({}) and a.attnum > 0 and not a.attisdropped",
            list.join(",")
        );
        conn.write_all(&encode::query(&sql))
            .await
            .map_err(|e| e.to_string())?;
        let mut found: HashMap<u32, TableNames> = HashMap::new();
        let mut buf = BytesMut::with_capacity(8192);
        loop {
            let (tag, msg) = login::read_message(&mut conn, &mut buf, self.max_message)
                .await
                .map_err(|e| format!("catalog answer: {e:?}"))?;
            match decode_backend(tag, &msg[HEADER_LEN..]).map_err(|e| e.to_string())? {
                Backend::DataRow(values) => {
                    let v: Vec<Option<&[u8]>> = values.iter().collect();
                    let text = |i: usize| {
                        v.get(i)
                            .copied()
                            .flatten()
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                            .unwrap_or_default()
                    };
                    let (Ok(oid), Ok(attnum)) = (text(0).parse::<u32>(), text(3).parse::<i16>())
                    else {
                        continue;
                    };
                    let t = found.entry(oid).or_insert_with(|| TableNames {
                        schema: text(1),
                        table: text(2),
                        columns: HashMap::new(),
                    });
                    t.columns.insert(attnum, text(4));
                }
                Backend::ErrorResponse(d) => {
                    return Err(d.message().unwrap_or("catalog query failed").to_string());
                }
                Backend::ReadyForQuery { .. } => break,
                _ => {}
            }
        }
        let _ = conn.write_all(&[b'X', 0, 0, 0, 4]).await;
        Ok(found)
    }
}
