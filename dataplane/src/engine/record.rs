//! What an appliance keeps on disk about a session whose guest memory is a file, so
//! that it can resume the session after it restarts (see `resume`): the destination's
//! [`SessionRecord`], the source's [`OutgoingRecord`].
//!
//! Each is one small text file, `key value` per line, written atomically (a temporary
//! file, fsync, rename, fsync of the directory) once the session is open — the
//! source's again at every round — and removed when the session ends either way.
//! Whatever survives a crash is therefore a session that was open: the restarted
//! appliance reads its memory file back into a CRC table (a full read) and the session
//! is resumed.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A session a destination received into a memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session's id.
    pub session_id: u128,
    /// Where its memory is.
    pub memory_file: PathBuf,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Data streams.
    pub streams: u16,
    /// Capabilities granted.
    pub granted: u64,
    /// The authenticated source (a TLS session), which alone may resume it.
    pub peer: Option<String>,
    /// What the memory file belongs to (an incoming QEMU VM's QMP socket), kept for
    /// the appliance, which finds the VM again through it.
    pub guest: Option<String>,
}

/// A record that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file system refused.
    #[error("session record {path}: {source}")]
    Io {
        /// The record's path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a session record.
    #[error("session record {path}: {reason}")]
    Malformed {
        /// The record's path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A session a source was sending from a memory file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingRecord {
    /// The session's id.
    pub session_id: u128,
    /// The destination.
    pub peer: std::net::SocketAddr,
    /// Bytes of guest memory.
    pub memory_bytes: u64,
    /// Data streams.
    pub streams: u16,
    /// The round being sent.
    pub round: u64,
    /// How the appliance finds its guest again (a QEMU VM's QMP socket), kept for it.
    pub guest: Option<String>,
    /// The appliance's number for the migration (what its operators and its cluster
    /// know it by), kept for it so that a resumed migration keeps its number.
    pub migration_id: Option<u64>,
}

impl OutgoingRecord {
    /// Write the record to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        let mut text = format!(
            "session {:032x}\npeer {}\nmemory_bytes {}\nstreams {}\nround {}\n",
            self.session_id, self.peer, self.memory_bytes, self.streams, self.round
        );
        if let Some(guest) = &self.guest {
            text.push_str(&format!("guest {guest}\n"));
        }
        if let Some(id) = self.migration_id {
            text.push_str(&format!("migration_id {id}\n"));
        }
        write_atomic(path, &text)
    }

    /// Read the record at `path`.
    pub fn read(path: &Path) -> Result<Self, RecordError> {
        read_fields(path, |f| {
            let peer = f.field("peer")?;
            Ok(OutgoingRecord {
                session_id: f.session()?,
                peer: peer.parse().map_err(|e| format!("peer {peer:?}: {e}"))?,
                memory_bytes: f.number("memory_bytes")?,
                streams: u16::try_from(f.number("streams")?)
                    .map_err(|e| format!("streams: {e}"))?,
                round: f.number("round")?,
                guest: f.field("guest").ok().map(str::to_string),
                migration_id: match f.field("migration_id") {
                    Ok(_) => Some(f.number("migration_id")?),
                    Err(_) => None,
                },
            })
        })
    }
}

/// The `key value` lines of a record.
struct Fields<'t>(&'t str);

impl Fields<'_> {
    fn field(&self, key: &str) -> Result<&str, String> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
            .ok_or_else(|| format!("no {key}"))
    }

    fn number(&self, key: &str) -> Result<u64, String> {
        let v = self.field(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        }
        .map_err(|e| format!("{key} {v:?}: {e}"))
    }

    fn session(&self) -> Result<u128, String> {
        let session = self.field("session")?;
        u128::from_str_radix(session, 16).map_err(|e| format!("session {session:?}: {e}"))
    }
}

fn read_fields<T>(
    path: &Path,
    parse: impl FnOnce(&Fields<'_>) -> Result<T, String>,
) -> Result<T, RecordError> {
    let text = std::fs::read_to_string(path).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&Fields(&text)).map_err(|reason| RecordError::Malformed {
        path: path.to_path_buf(),
        reason,
    })
}

/// Write `text` to `path` atomically: a temporary file, fsync, rename, fsync of the
/// directory.
fn write_atomic(path: &Path, text: &str) -> Result<(), RecordError> {
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = dir {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Remove the record at `path` (its session ended); a record already gone is fine.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_file(path);
}

impl SessionRecord {
    fn text(&self) -> String {
        let mut text = format!(
            "session {:032x}\nmemory_file {}\nmemory_bytes {}\nstreams {}\ngranted {:#x}\n",
            self.session_id,
            self.memory_file.display(),
            self.memory_bytes,
            self.streams,
            self.granted
        );
        if let Some(peer) = &self.peer {
            text.push_str(&format!("peer {peer}\n"));
        }
        if let Some(guest) = &self.guest {
            text.push_str(&format!("guest {guest}\n"));
        }
        text
    }

    /// Write the record to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), RecordError> {
        write_atomic(path, &self.text())
    }

    /// Read the record at `path`.
    pub fn read(path: &Path) -> Result<Self, RecordError> {
        read_fields(path, |f| {
            Ok(SessionRecord {
                session_id: f.session()?,
                memory_file: PathBuf::from(f.field("memory_file")?),
                memory_bytes: f.number("memory_bytes")?,
                streams: u16::try_from(f.number("streams")?)
                    .map_err(|e| format!("streams: {e}"))?,
                granted: f.number("granted")?,
                peer: f.field("peer").ok().map(str::to_string),
                guest: f.field("guest").ok().map(str::to_string),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_written_and_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("dwcp-record-{}", std::process::id()));
        let path = dir.join("incoming.session");
        let record = SessionRecord {
            session_id: 0x0123_4567_89ab_cdef_0011_2233_4455_6677,
            memory_file: PathBuf::from("/dev/shm/guest ram"),
            memory_bytes: 1 << 30,
            streams: 8,
            granted: 0x1bf,
            peer: Some("appliance-a".into()),
            guest: Some("/run/vm/b.qmp".into()),
        };
        record.write(&path).unwrap();
        assert_eq!(SessionRecord::read(&path).unwrap(), record);
        std::fs::write(&path, "session zz\n").unwrap();
        assert!(matches!(
            SessionRecord::read(&path),
            Err(RecordError::Malformed { .. })
        ));
        remove(&path);
        assert!(matches!(
            SessionRecord::read(&path),
            Err(RecordError::Io { .. })
        ));
        let outgoing = OutgoingRecord {
            session_id: 7,
            peer: "127.0.0.1:7410".parse().unwrap(),
            memory_bytes: 1 << 20,
            streams: 4,
            round: 3,
            guest: Some("/run/vm/a.qmp".into()),
            migration_id: Some(12),
        };
        outgoing.write(&path).unwrap();
        assert_eq!(OutgoingRecord::read(&path).unwrap(), outgoing);
        let _ = std::fs::remove_dir_all(dir);
    }
}
