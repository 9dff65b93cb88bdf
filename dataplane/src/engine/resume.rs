//! Resuming a session whose connections were all lost ([`caps::RESUME`]): once the
//! source has reconnected, the two sides compare their CRC tables over the new control
//! stream, chunk by chunk, so that only what the destination lacks or holds stale is
//! sent again.
//!
//! The source sends one digest per chunk of [`RESUME_CHUNK_PAGES`] pages
//! ([`CrcTable::range_digest`], 8 bytes per 4 MiB of memory); the destination answers
//! each chunk whose digest differs from its own with that chunk's entries (4 bytes a
//! page, or nothing when it placed no page of the chunk yet); the source then names
//! the pages whose entries differ. One round trip; bytes exchanged grow with memory
//! only by the digests (2 KiB per GiB), and otherwise with what differs.
//!
//! What the source's table says must be what the destination would hold if nothing
//! had been lost. Pages of the round that was interrupted may not have been sent yet
//! (their entries are a previous round's); the source therefore records their current
//! content's CRC before comparing (see the source's `reconnect`), and the comparison
//! then finds them too unless the destination already holds exactly that content.

use super::MigrationError;
use super::handshake::ControlChannel;
use crate::crc_table::CrcTable;
use crate::dirty::DirtyBitmap;
use crate::wire::{
    ControlMessage, RESUME_CHUNK_PAGES, RESUME_DIGESTS_PER_MESSAGE, WireError, caps,
};

/// What a table comparison found and cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Comparison {
    /// Pages whose entries differ: the destination lacks them or holds other content.
    pub differing_pages: DirtyBitmap,
    /// Chunks compared.
    pub chunks: u64,
    /// Chunks whose digests differed.
    pub differing_chunks: u64,
    /// Digest and entry bytes exchanged, both ways (message framing aside).
    pub bytes_exchanged: u64,
}

/// Bytes of a [`ControlMessage::ChunkEntries`] beyond its entries: the chunk index.
const CHUNK_HEADER_BYTES: u64 = 8;

/// The source's side: send `table`'s chunk digests (round `round` follows), read the
/// destination's entries of the chunks that differ, and name the differing pages.
pub(super) fn compare_as_source(
    control: &mut ControlChannel,
    table: &CrcTable,
    round: u64,
) -> Result<Comparison, MigrationError> {
    let digests = table.chunk_digests(RESUME_CHUNK_PAGES);
    let chunks = digests.len() as u64;
    let mut bytes_exchanged = 0u64;
    let mut first_chunk = 0usize;
    loop {
        let end = (first_chunk + RESUME_DIGESTS_PER_MESSAGE).min(digests.len());
        let part = digests[first_chunk..end].to_vec();
        bytes_exchanged += 8 * part.len() as u64;
        control
            .send(&ControlMessage::ResumeTable {
                round,
                first_chunk: first_chunk as u64,
                digests: part,
                last: end == digests.len(),
            })
            .map_err(|e| MigrationError::Disconnected(format!("sending the table digests: {e}")))?;
        if end == digests.len() {
            break;
        }
        first_chunk = end;
    }
    let mut differing_pages = DirtyBitmap::new(table.pages());
    let mut answered = DirtyBitmap::new(chunks);
    loop {
        let msg = control.recv().map_err(|e| {
            MigrationError::Disconnected(format!("waiting for the destination's table: {e}"))
        })?;
        match msg {
            ControlMessage::ChunkEntries { chunk, crcs } => {
                if chunk >= chunks || answered.get(chunk) {
                    return Err(WireError::Unexpected(format!(
                        "entries of chunk {chunk} (the table has {chunks}; each is answered once)"
                    ))
                    .into());
                }
                answered.set(chunk);
                let first = chunk * RESUME_CHUNK_PAGES;
                let count = RESUME_CHUNK_PAGES.min(table.pages() - first);
                if !crcs.is_empty() && crcs.len() as u64 != count {
                    return Err(WireError::Unexpected(format!(
                        "{} entries for chunk {chunk} of {count} pages",
                        crcs.len()
                    ))
                    .into());
                }
                bytes_exchanged += CHUNK_HEADER_BYTES + 4 * crcs.len() as u64;
                for (i, ours) in table.entries(first, count as usize).into_iter().enumerate() {
                    let theirs = crcs.get(i).copied().unwrap_or(0);
                    if ours != theirs {
                        differing_pages.set(first + i as u64);
                    }
                }
            }
            ControlMessage::TableCompared { differing } => {
                if differing != answered.count() {
                    return Err(WireError::Unexpected(format!(
                        "the destination counted {differing} differing chunks but sent {}",
                        answered.count()
                    ))
                    .into());
                }
                bytes_exchanged += 8;
                return Ok(Comparison {
                    differing_pages,
                    chunks,
                    differing_chunks: differing,
                    bytes_exchanged,
                });
            }
            ControlMessage::Abort { message, .. } => {
                return Err(MigrationError::Transport(format!(
                    "destination aborted: {message}"
                )));
            }
            other => {
                return Err(
                    WireError::Unexpected(format!("{other:?} while comparing tables")).into(),
                );
            }
        }
    }
}

/// The destination's side: read the source's chunk digests, answer each chunk whose
/// digest differs from `table`'s. Returns the round the source sends next and the
/// chunks that differed.
pub(super) fn answer_as_destination(
    control: &mut ControlChannel,
    table: &CrcTable,
) -> Result<(u64, u64), MigrationError> {
    let ours = table.chunk_digests(RESUME_CHUNK_PAGES);
    // Every digest first, then the answers: answering while the source still writes
    // digests could fill both directions' buffers at once.
    let mut theirs: Vec<u64> = Vec::with_capacity(ours.len());
    let round = loop {
        let msg = control.recv().map_err(|e| {
            MigrationError::Disconnected(format!("waiting for the source's table digests: {e}"))
        })?;
        let (round, first_chunk, digests, last) = match msg {
            ControlMessage::ResumeTable {
                round,
                first_chunk,
                digests,
                last,
            } => (round, first_chunk, digests, last),
            ControlMessage::Abort { message, .. } => {
                return Err(MigrationError::Transport(format!(
                    "source aborted: {message}"
                )));
            }
            other => {
                return Err(WireError::Unexpected(format!(
                    "{other:?} instead of the source's table digests"
                ))
                .into());
            }
        };
        let end = first_chunk.saturating_add(digests.len() as u64);
        if first_chunk != theirs.len() as u64
            || end > ours.len() as u64
            || (last && end != ours.len() as u64)
        {
            return Err(WireError::Unexpected(format!(
                "table digests of chunks {first_chunk}..{end} (expected from {}, {} in all)",
                theirs.len(),
                ours.len()
            ))
            .into());
        }
        theirs.extend(digests);
        if last {
            break round;
        }
    };
    let mut differing = 0u64;
    for (chunk, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        if a == b {
            continue;
        }
        differing += 1;
        let first = chunk as u64 * RESUME_CHUNK_PAGES;
        let count = RESUME_CHUNK_PAGES.min(table.pages() - first);
        let mut crcs = table.entries(first, count as usize);
        if crcs.iter().all(|&c| c == 0) {
            crcs.clear();
        }
        control
            .send(&ControlMessage::ChunkEntries {
                chunk: chunk as u64,
                crcs,
            })
            .map_err(|e| MigrationError::Disconnected(format!("sending table entries: {e}")))?;
    }
    control
        .send(&ControlMessage::TableCompared { differing })
        .map_err(|e| MigrationError::Disconnected(format!("sending table entries: {e}")))?;
    Ok((round, differing))
}

/// Whether a failure ends the session for good, or its connections were only lost and
/// the session may be resumed (when both sides granted [`caps::RESUME`]).
pub(super) fn may_resume(error: &MigrationError, granted: u64) -> bool {
    granted & caps::RESUME != 0 && matches!(error, MigrationError::Disconnected(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn channel_pair() -> (ControlChannel, ControlChannel) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (
            ControlChannel::plain(a).unwrap(),
            ControlChannel::plain(b).unwrap(),
        )
    }

    #[test]
    fn only_the_pages_that_differ_are_named_and_the_exchange_is_small() {
        // 10 000 pages: 10 chunks, the last one short.
        let pages = 10_000u64;
        let source = CrcTable::new(pages);
        let dest = CrcTable::new(pages);
        for p in 0..pages {
            source.record(p, (p as u32).wrapping_mul(2_654_435_761) | 1, 0);
        }
        // The destination has everything but: chunk 2 not at all, page 5000 stale,
        // page 9999 missing.
        for p in 0..pages {
            if !(2048..3072).contains(&p) && p != 9999 {
                dest.record(p, source.get(p), 1);
            }
        }
        dest.record(5000, 12345, 1);
        let (mut src_ctl, mut dst_ctl) = channel_pair();
        let answering = std::thread::spawn(move || {
            let r = answer_as_destination(&mut dst_ctl, &dest);
            (r, dest)
        });
        let found = compare_as_source(&mut src_ctl, &source, 7).unwrap();
        let (answer, _dest) = answering.join().unwrap();
        assert_eq!(answer.unwrap(), (7, 3));
        assert_eq!(found.chunks, 10);
        assert_eq!(found.differing_chunks, 3);
        let named: Vec<u64> = found.differing_pages.iter().collect();
        let mut expected: Vec<u64> = (2048..3072).collect();
        expected.extend([5000, 9999]);
        assert_eq!(named, expected);
        // 10 digests; chunk 2 sent as "nothing placed"; chunks 4 and 9 entry by entry.
        assert_eq!(
            found.bytes_exchanged,
            10 * 8 + 3 * CHUNK_HEADER_BYTES + 4 * (1024 + (10_000 - 9 * 1024)) + 8
        );
    }

    #[test]
    fn identical_tables_exchange_only_digests() {
        let source = CrcTable::new(4096);
        let dest = CrcTable::new(4096);
        for p in 0..4096 {
            source.record(p, p as u32 + 1, 0);
            dest.record(p, p as u32 + 1, 2);
        }
        let (mut src_ctl, mut dst_ctl) = channel_pair();
        let answering = std::thread::spawn(move || answer_as_destination(&mut dst_ctl, &dest));
        let found = compare_as_source(&mut src_ctl, &source, 1).unwrap();
        assert_eq!(answering.join().unwrap().unwrap(), (1, 0));
        assert!(found.differing_pages.is_empty());
        assert_eq!(found.bytes_exchanged, 4 * 8 + 8);
    }

    #[test]
    fn a_destination_answer_out_of_range_is_a_protocol_error() {
        let source = CrcTable::new(2048);
        let (mut src_ctl, mut dst_ctl) = channel_pair();
        let lying = std::thread::spawn(move || {
            let _ = dst_ctl.recv();
            dst_ctl
                .send(&ControlMessage::ChunkEntries {
                    chunk: 5,
                    crcs: vec![],
                })
                .unwrap();
            dst_ctl
        });
        let err = compare_as_source(&mut src_ctl, &source, 0).unwrap_err();
        assert!(matches!(err, MigrationError::Protocol(_)), "{err}");
        drop(lying.join());
    }
}
