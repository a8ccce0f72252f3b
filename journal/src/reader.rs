//! The readers' view ([`Reader`]): a read-only open of a journal directory (an agent's journal
//! or a collector's store), which works while its writer holds it open: it sees everything
//! written up to the moment it opened.

use std::collections::BTreeMap;
use std::path::Path;

use rocksdb::DB;

use crate::db::{Core, Integrity, RawSession, Verification, verify_chain};
use crate::error::JournalError;
use crate::model::{AccessRequest, Event, SessionId, SessionSummary};
use crate::schema::{CF_CHECKPOINTS, descriptors, options};

/// A read-only view of a journal directory (an agent's journal or a collector's store); safe
/// to open while its writer runs.
pub struct Reader {
    pub(crate) core: Core,
}

impl Reader {
    /// Opens `dir`, finding its data key (if sealed) through the pointer its writer left.
    pub fn open(dir: &Path) -> Result<Reader, JournalError> {
        Reader::open_with_key(dir, None)
    }

    /// Opens `dir` with the data key in `key` (or the one its pointer names).
    pub fn open_with_key(dir: &Path, key: Option<&Path>) -> Result<Reader, JournalError> {
        if !dir.join("CURRENT").exists() {
            return Err(JournalError::Missing {
                path: dir.to_path_buf(),
            });
        }
        let open = |source| JournalError::Open {
            path: dir.to_path_buf(),
            source,
        };
        // Open the families the directory has: an older journal may lack newer ones.
        let existing = DB::list_cf(&options(), dir).map_err(open)?;
        let families = descriptors()
            .into_iter()
            .filter(|d| existing.iter().any(|name| name == d.name()));
        let db =
            DB::open_cf_descriptors_read_only(&options(), dir, families, false).map_err(open)?;
        let sealer = crate::seal::sealer_for(dir, key)?;
        Ok(Reader {
            core: Core { db, sealer },
        })
    }

    /// Every request, oldest first, in its latest state.
    pub fn requests(&self) -> Result<Vec<AccessRequest>, JournalError> {
        self.core.requests()
    }

    /// Recomputes `session`'s hash chain from its stored events and checks every recorded hash
    /// and checkpoint; reports the first event where anything disagrees: a changed, missing,
    /// inserted or reordered event, a bad signature, or a second signing key.
    pub fn verify(&self, session: &SessionId) -> Result<Verification, JournalError> {
        if self.core.db.cf_handle(CF_CHECKPOINTS).is_none() {
            return verify_chain(session, std::iter::empty(), BTreeMap::new());
        }
        self.core.verify(session)
    }

    /// Everything needed to verify `session` offline (an export bundle).
    pub fn raw_session(&self, session: &SessionId) -> Result<RawSession, JournalError> {
        self.core.raw_session(session)
    }

    /// The collector's ingest verdict for `session` (None in an agent's journal).
    pub fn integrity(&self, session: &SessionId) -> Result<Option<Integrity>, JournalError> {
        self.core.integrity(session)
    }

    /// Every session's index entry, oldest first. For sessions that were never sealed, the
    /// byte and event counters are derived from the events (statements stay as last written).
    pub fn sessions(&self) -> Result<Vec<SessionSummary>, JournalError> {
        self.core.sessions()
    }

    /// Finds a session by its full id or a unique prefix of it.
    pub fn find(&self, prefix: &str) -> Result<SessionSummary, JournalError> {
        let wanted = prefix.trim().to_ascii_lowercase();
        let matches: Vec<SessionSummary> = self
            .sessions()?
            .into_iter()
            .filter(|s| !wanted.is_empty() && s.id.to_string().starts_with(&wanted))
            .collect();
        match matches.len() {
            0 => Err(JournalError::NoSuchSession(prefix.to_string())),
            1 => Ok(matches
                .into_iter()
                .next()
                .ok_or_else(|| JournalError::NoSuchSession(prefix.to_string()))?),
            _ => Err(JournalError::Ambiguous {
                prefix: prefix.to_string(),
                candidates: matches
                    .iter()
                    .map(|s| s.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// A session's events in order.
    pub fn events(
        &self,
        session: &SessionId,
    ) -> Result<impl Iterator<Item = Result<Event, JournalError>> + '_, JournalError> {
        self.core.events(session)
    }
}
