//! The raft log on disk: one append-only file per appliance, read back whole at start.
//!
//! The cluster's log is small and written seldom (flag changes, migration records, the
//! budget: a few entries a minute), so it is one file of records, each
//! `length (u32 LE) · CRC32C of the payload (u32 LE) · kind (u8) · body`, with raft-rs's
//! own protobuf encoding for the body: an entry, the hard state, the configuration, or
//! a snapshot. The file is replayed into memory at start; raft-rs reads the log from
//! memory ([`Storage`]). Writes go to the file first; [`DurableLog::sync`] (fdatasync)
//! runs before anything that depends on them leaves the appliance (a vote, an
//! acknowledgement), which is what raft requires of stable storage.
//!
//! - A torn record at the end (a crash mid-write) is cut off at the last whole one:
//!   nothing after it was synced, so nothing after it was promised to anyone.
//! - A bad record before the end is corruption, and opening fails with its offset.
//! - When the entries since the last snapshot pass a count, the caller hands over its
//!   state ([`DurableLog::compact`]): the entries up to the applied index are dropped
//!   and the file is rewritten (a temporary file, fsync, rename, fsync of the
//!   directory), so it never grows without bound.
//!
//! Why not a log engine crate (raft-engine): it is built for many raft groups of heavy
//! traffic, and its build (and dependencies) would cost more on two cores than this
//! whole module; our one group writes a few hundred bytes a minute.

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
/// No record is larger than this (a snapshot of the state is a few KiB).
const MAX_RECORD: usize = 64 << 20;

/// The log's file name in the cluster's directory.
pub const LOG_FILE: &str = "raft.log";

/// When the log reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before a vote or an acknowledgement leaves the appliance: survives a
    /// power loss.
    Fsync,
    /// Written to the kernel only: survives the process, not the machine. For
    /// simulations that restart processes thousands of times.
    ProcessOnly,
}

/// The raft log: entries after the last snapshot, the snapshot (with the state at its
/// index), the hard state and the configuration; in memory for raft-rs, on disk for
/// restarts.
pub struct DurableLog {
    path: PathBuf,
    file: File,
    durability: Durability,
    /// Bytes in the file.
    file_bytes: u64,
    /// Writes since the last sync.
    unsynced: bool,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    /// `entries[0].index == snapshot index + 1`.
    entries: Vec<Entry>,
    /// fdatasync calls and their total seconds, for the status and the bench.
    pub syncs: u64,
    /// Seconds spent in fdatasync.
    pub sync_seconds: f64,
}

impl DurableLog {
    /// Opens (or creates) the log in `dir`, replaying what it holds.
    pub fn open(dir: &Path, durability: Durability) -> Result<DurableLog, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create the cluster directory {}: {e}", dir.display()))?;
        let path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("cannot open the raft log {}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read the raft log {}: {e}", path.display()))?;
        let mut log = DurableLog {
            path,
            file,
            durability,
            file_bytes: 0,
            unsynced: false,
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: Snapshot::default(),
            entries: Vec::new(),
            syncs: 0,
            sync_seconds: 0.0,
        };
        let whole = log.replay(&bytes)?;
        if whole < bytes.len() {
            // A torn tail: cut it off so that new records follow whole ones.
            log.file
                .set_len(whole as u64)
                .map_err(|e| format!("cannot cut the torn end of {}: {e}", log.path.display()))?;
        }
        log.file_bytes = whole as u64;
        Ok(log)
    }

    /// Applies the file's records; returns the length of its whole records.
    fn replay(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let mut at = 0;
        while at < bytes.len() {
            let Some((kind, body, next)) = read_record(bytes, at) else {
                // Only the last record may be torn: a later whole one means corruption.
                if let Some(later) =
                    (at + 1..bytes.len()).find(|&o| read_record(bytes, o).is_some())
                {
                    return Err(format!(
                        "the raft log {} is corrupt at byte {at} (a whole record follows at byte {later})",
                        self.path.display()
                    ));
                }
                return Ok(at);
            };
            let bad = |what: &str, e: protobuf::ProtobufError| {
                format!(
                    "the raft log {} holds a bad {what} at byte {at}: {e}",
                    self.path.display()
                )
            };
            match kind {
                KIND_ENTRY => {
                    let entry = Entry::parse_from_bytes(body).map_err(|e| bad("entry", e))?;
                    self.append_in_memory(std::slice::from_ref(&entry))?;
                }
                KIND_HARD_STATE => {
                    self.hard_state =
                        HardState::parse_from_bytes(body).map_err(|e| bad("hard state", e))?;
                }
                KIND_CONF_STATE => {
                    self.conf_state =
                        ConfState::parse_from_bytes(body).map_err(|e| bad("configuration", e))?;
                }
                KIND_SNAPSHOT => {
                    let snapshot =
                        Snapshot::parse_from_bytes(body).map_err(|e| bad("snapshot", e))?;
                    self.install_in_memory(snapshot);
                }
                other => {
                    return Err(format!(
                        "the raft log {} holds a record of unknown kind {other} at byte {at}",
                        self.path.display()
                    ));
                }
            }
            at = next;
        }
        Ok(at)
    }

    /// Whether `dir` holds a log that was written (an appliance that founded or
    /// joined a cluster), without opening it.
    pub fn exists_in(dir: &Path) -> bool {
        std::fs::metadata(dir.join(LOG_FILE)).is_ok_and(|m| m.len() > 0)
    }

    /// Whether the log has never been written (a new appliance).
    pub fn is_empty(&self) -> bool {
        self.file_bytes == 0
    }

    /// The snapshot the log starts from (its data is the state at its index).
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    /// Entries after the snapshot.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Bytes in the file.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// The hard state as last written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Appends entries (an entry at an index already held replaces it and all after).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        self.append_in_memory(entries)?;
        for entry in entries {
            self.write(
                KIND_ENTRY,
                &entry.write_to_bytes().expect("an entry encodes"),
            )?;
        }
        Ok(())
    }

    fn append_in_memory(&mut self, entries: &[Entry]) -> Result<(), String> {
        let first = entries[0].index;
        let snapshot_index = self.snapshot.get_metadata().index;
        if first <= snapshot_index {
            return Err(format!(
                "raft asked to append entry {first}, at or before the snapshot at {snapshot_index}"
            ));
        }
        let last = self.last();
        if first > last + 1 {
            return Err(format!(
                "raft asked to append entry {first} after entry {last}: a gap"
            ));
        }
        self.entries.truncate((first - snapshot_index - 1) as usize);
        self.entries.extend_from_slice(entries);
        Ok(())
    }

    /// Records the hard state (term, vote, commit).
    pub fn set_hard_state(&mut self, hard_state: &HardState) -> Result<(), String> {
        self.hard_state = hard_state.clone();
        self.write(
            KIND_HARD_STATE,
            &hard_state.write_to_bytes().expect("a hard state encodes"),
        )
    }

    /// Records the commit index alone.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), String> {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        self.set_hard_state(&hard_state)
    }

    /// Records the configuration (members).
    pub fn set_conf_state(&mut self, conf_state: &ConfState) -> Result<(), String> {
        self.conf_state = conf_state.clone();
        self.write(
            KIND_CONF_STATE,
            &conf_state
                .write_to_bytes()
                .expect("a configuration encodes"),
        )
    }

    /// Installs a snapshot the leader sent: the log restarts after it.
    pub fn install(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        self.install_in_memory(snapshot.clone());
        self.write(
            KIND_SNAPSHOT,
            &snapshot.write_to_bytes().expect("a snapshot encodes"),
        )
    }

    fn install_in_memory(&mut self, snapshot: Snapshot) {
        let meta = snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        // Entries past the snapshot that agree with it stay (a local compaction); any
        // other log is replaced.
        let keep = if self.entry(index).is_some_and(|e| e.term == term) {
            self.entries
                .iter()
                .filter(|e| e.index > index)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        self.entries = keep;
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.term = self.hard_state.term.max(term);
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.snapshot = snapshot;
    }

    /// Takes a snapshot at `index` (applied, with `data` the state there) and rewrites
    /// the file without the entries it covers.
    pub fn compact(&mut self, index: u64, data: Vec<u8>) -> Result<(), String> {
        let Some(term) = self.entry(index).map(|e| e.term) else {
            return Ok(()); // Already covered by the snapshot.
        };
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.install_in_memory(snapshot);
        self.rewrite()
    }

    /// The file again, from what memory holds, replacing the old one atomically.
    fn rewrite(&mut self) -> Result<(), String> {
        let mut bytes = Vec::new();
        push_record(
            &mut bytes,
            KIND_SNAPSHOT,
            &self.snapshot.write_to_bytes().expect("encodes"),
        );
        push_record(
            &mut bytes,
            KIND_CONF_STATE,
            &self.conf_state.write_to_bytes().expect("encodes"),
        );
        push_record(
            &mut bytes,
            KIND_HARD_STATE,
            &self.hard_state.write_to_bytes().expect("encodes"),
        );
        for entry in &self.entries {
            push_record(
                &mut bytes,
                KIND_ENTRY,
                &entry.write_to_bytes().expect("encodes"),
            );
        }
        let temporary = self.path.with_extension("log.new");
        let fail =
            |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", temporary.display());
        let mut file = File::create(&temporary).map_err(|e| fail("create", e))?;
        file.write_all(&bytes).map_err(|e| fail("write", e))?;
        file.sync_all().map_err(|e| fail("sync", e))?;
        std::fs::rename(&temporary, &self.path).map_err(|e| fail("rename", e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot sync the directory {}: {e}", dir.display()))?;
        }
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| format!("cannot reopen the raft log {}: {e}", self.path.display()))?;
        self.file_bytes = bytes.len() as u64;
        self.unsynced = false;
        Ok(())
    }

    fn write(&mut self, kind: u8, body: &[u8]) -> Result<(), String> {
        let mut record = Vec::with_capacity(body.len() + 9);
        push_record(&mut record, kind, body);
        self.file
            .write_all(&record)
            .map_err(|e| format!("cannot write the raft log {}: {e}", self.path.display()))?;
        self.file_bytes += record.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Makes every write so far durable (per [`Durability`]).
    pub fn sync(&mut self) -> Result<(), String> {
        if !self.unsynced {
            return Ok(());
        }
        self.unsynced = false;
        if self.durability == Durability::Fsync {
            let start = std::time::Instant::now();
            self.file
                .sync_data()
                .map_err(|e| format!("cannot sync the raft log {}: {e}", self.path.display()))?;
            self.syncs += 1;
            self.sync_seconds += start.elapsed().as_secs_f64();
        }
        Ok(())
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(self.snapshot.get_metadata().index, |e| e.index)
    }

    fn first(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        let first = self.first();
        if index < first {
            return None;
        }
        self.entries.get((index - first) as usize)
    }
}

impl Storage for DurableLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let first = self.first();
        let mut entries = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if index == meta.index {
            return Ok(meta.term);
        }
        if index < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.entry(index)
            .map(|e| e.term)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

fn push_record(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    let mut payload = Vec::with_capacity(body.len() + 1);
    payload.push(kind);
    payload.extend_from_slice(body);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&dwcp_simd::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// The record at `at`: its kind, body and the offset after it; `None` when what is
/// there is not a whole record with a matching checksum.
fn read_record(bytes: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = bytes.get(at + 8..at + 8 + len)?;
    (dwcp_simd::crc32c(payload) == crc).then(|| (payload[0], &payload[1..], at + 8 + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dwcp-raftlog-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn what_was_written_is_read_back_and_a_conflicting_append_replaces_the_tail() {
        let dir = dir("replay");
        let mut log = DurableLog::open(&dir, Durability::Fsync).unwrap();
        assert!(log.is_empty());
        log.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        // A new leader's entry 2 replaces 2 and 3.
        log.append(&[entry(2, 2, b"B")]).unwrap();
        let hs = HardState {
            term: 2,
            vote: 3,
            commit: 2,
            ..Default::default()
        };
        log.set_hard_state(&hs).unwrap();
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        log.set_conf_state(&cs).unwrap();
        log.sync().unwrap();
        assert_eq!(log.syncs, 1);
        drop(log);

        let log = DurableLog::open(&dir, Durability::Fsync).unwrap();
        assert_eq!(log.last_index().unwrap(), 2);
        assert_eq!(log.term(2).unwrap(), 2);
        assert_eq!(
            log.entries(1, 3, None, GetEntriesContext::empty(false))
                .unwrap()[1]
                .data
                .as_ref(),
            b"B"
        );
        let state = log.initial_state().unwrap();
        assert_eq!(
            (
                state.hard_state.term,
                state.hard_state.vote,
                state.hard_state.commit
            ),
            (2, 3, 2)
        );
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert!(matches!(
            log.entries(1, 4, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_a_bad_one_before_the_end_is_an_error() {
        let dir = dir("torn");
        let mut log = DurableLog::open(&dir, Durability::ProcessOnly).unwrap();
        log.append(&[entry(1, 1, b"one"), entry(2, 1, b"two")])
            .unwrap();
        drop(log);
        let path = dir.join(LOG_FILE);
        let whole = std::fs::read(&path).unwrap();
        // A crash in the middle of writing entry 3.
        let mut torn = whole.clone();
        let mut third = Vec::new();
        push_record(
            &mut third,
            KIND_ENTRY,
            &entry(3, 1, b"three").write_to_bytes().unwrap(),
        );
        torn.extend_from_slice(&third[..third.len() - 3]);
        std::fs::write(&path, &torn).unwrap();
        let mut log = DurableLog::open(&dir, Durability::ProcessOnly).unwrap();
        assert_eq!(log.last_index().unwrap(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole.len() as u64);
        // Appending after the cut continues the log.
        log.append(&[entry(3, 1, b"three")]).unwrap();
        drop(log);
        assert_eq!(
            DurableLog::open(&dir, Durability::ProcessOnly)
                .unwrap()
                .last_index()
                .unwrap(),
            3
        );

        // A flipped bit in the first record, whole records after it: corruption.
        let mut bad = std::fs::read(&path).unwrap();
        bad[10] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = DurableLog::open(&dir, Durability::ProcessOnly)
            .err()
            .unwrap();
        assert!(err.contains("corrupt at byte 0"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_keeps_the_state_and_the_entries_after_it_and_shrinks_the_file() {
        let dir = dir("compact");
        let mut log = DurableLog::open(&dir, Durability::Fsync).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, &[7u8; 200])).collect();
        log.append(&entries).unwrap();
        log.set_commit(100).unwrap();
        let before = log.file_bytes();
        log.compact(90, b"state at 90".to_vec()).unwrap();
        assert!(
            log.file_bytes() < before / 5,
            "{} of {before}",
            log.file_bytes()
        );
        assert_eq!(log.first_index().unwrap(), 91);
        assert_eq!(log.term(90).unwrap(), 1);
        assert!(matches!(
            log.term(89),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        drop(log);
        let log = DurableLog::open(&dir, Durability::Fsync).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (91, 100)
        );
        assert_eq!(log.snapshot(0, 2).unwrap().get_data(), b"state at 90");
        assert_eq!(log.hard_state().commit, 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
