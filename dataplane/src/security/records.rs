//! Sealed records on the data streams: the bytes of one send buffer, sealed in place
//! with AES-256-GCM after staging (and compression), opened in place by the receiver
//! before its frame parser sees a byte.
//!
//! A record is `header(8) | ciphertext | tag(16)`. The header is the ciphertext's
//! length with the tag (u32 LE) and the low 32 bits of the record's number (u32 LE);
//! it is the AEAD's additional data, so neither can be changed unseen. The nonce is the
//! stream's IV XOR the 64-bit record number (the TLS 1.3 construction, RFC 8446 §5.3):
//! records are numbered per stream and direction from 0, and the receiver only accepts
//! the number it expects next, so a replayed, reordered or dropped record fails to
//! open. Keys differ per stream and direction (see [`SessionKeys`]), so a record
//! moved to another stream fails too. A stream that ends inside a record is truncated.
//!
//! **Key updates.** AES-GCM's safety margin under one key is about 2^38 bytes (TLS
//! 1.3's limit, RFC 8446 §5.5). Both sides therefore move to a new key every
//! [`KEY_EPOCH_RECORDS`] records, at a record number both know, with nothing said on
//! the wire: epoch *e*'s key and IV are HKDF-SHA256 of the stream's exported material
//! (salt `dwcp record key update`, info *e* as u64 BE), and epoch 0's are the material
//! itself. An epoch holds at most 2^13 records of at most [`MAX_RECORD`] bytes, 2^38
//! bytes; a record replayed into another epoch fails to open like one moved to
//! another stream.
//!
//! One record per send buffer keeps the cost at one seal per buffer (hundreds of KiB)
//! and lets the io_uring sender keep its registered buffers and `SEND_ZC`: the record
//! is sealed where it was staged, and the header and tag have their room reserved.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes before a record's ciphertext.
pub const RECORD_HEADER: usize = 8;
/// Bytes after it (the GCM tag).
pub const RECORD_TAG: usize = 16;
/// The largest record a receiver accepts (ciphertext and tag); senders seal at most a
/// send buffer, far less.
pub const MAX_RECORD: usize = 32 << 20;
/// Bytes of a data stream's binding in its hello.
pub const BINDING_LEN: usize = 16;
/// Records sealed under one key before both sides move to the next: with records of
/// at most [`MAX_RECORD`] bytes, an epoch carries at most 2^38 bytes.
pub const KEY_EPOCH_RECORDS: u64 = 1 << 13;
const _: () = assert!(KEY_EPOCH_RECORDS as u128 * MAX_RECORD as u128 <= 1 << 38);

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A length no sender produces.
    #[error("record {record} claims {len} bytes (at most {MAX_RECORD}): not a sealed record")]
    BadLength {
        /// The record's number.
        record: u64,
        /// The claimed length.
        len: usize,
    },
    /// Not the record due next.
    #[error(
        "record numbered {found} arrived where record {expected} was due (replayed, reordered \
         or dropped on the way)"
    )]
    OutOfOrder {
        /// The number in its header (low 32 bits).
        found: u32,
        /// The number expected.
        expected: u64,
    },
    /// The tag did not match.
    #[error(
        "record {record} failed authentication (tampered with on the way, or sealed for \
         another stream or session)"
    )]
    Authentication {
        /// The record's number.
        record: u64,
    },
    /// The stream ended inside a record.
    #[error("the stream ended inside record {record} ({have} of {len} bytes arrived): truncated")]
    Truncated {
        /// The record's number.
        record: u64,
        /// Bytes of it that arrived.
        have: usize,
        /// Its full length.
        len: usize,
    },
}

impl RecordError {
    /// Its label in `dwcp_records_rejected_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::BadLength { .. } => "bad_length",
            RecordError::OutOfOrder { .. } => "out_of_order",
            RecordError::Authentication { .. } => "authentication",
            RecordError::Truncated { .. } => "truncated",
        }
    }
}

/// Which way a stream's records go; each direction has its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source to destination (pages).
    ToDestination = 0,
    /// Destination to source.
    ToSource = 1,
}

/// Key and IV of one stream and direction.
#[derive(Clone)]
pub struct RecordKey {
    key: [u8; 32],
    iv: [u8; 12],
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey(..)")
    }
}

impl RecordKey {
    /// From 44 bytes of key material: the key, then the IV.
    pub fn from_material(material: &[u8; 44]) -> Self {
        let mut key = [0u8; 32];
        let mut iv = [0u8; 12];
        key.copy_from_slice(&material[..32]);
        iv.copy_from_slice(&material[32..]);
        RecordKey { key, iv }
    }

    fn aead(&self) -> LessSafeKey {
        // AES-256-GCM takes any 32-byte key: this cannot fail.
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("a 32-byte AES key"))
    }

    /// The key and IV of key epoch `epoch` (see the module docs): epoch 0 is this one.
    fn for_epoch(&self, epoch: u64) -> RecordKey {
        if epoch == 0 {
            return self.clone();
        }
        struct Material;
        impl hkdf::KeyType for Material {
            fn len(&self) -> usize {
                44
            }
        }
        let mut secret = [0u8; 44];
        secret[..32].copy_from_slice(&self.key);
        secret[32..].copy_from_slice(&self.iv);
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"dwcp record key update").extract(&secret);
        let info = epoch.to_be_bytes();
        let mut next = [0u8; 44];
        prk.expand(&[&info], Material)
            .and_then(|okm| okm.fill(&mut next))
            // 44 bytes is far within HKDF-SHA256's 8160-byte output limit.
            .expect("HKDF-SHA256 of 44 bytes");
        RecordKey::from_material(&next)
    }
}

/// A stream's key for the record at hand: the epoch's, derived again when a record
/// number crosses into the next epoch.
struct EpochKey {
    base: RecordKey,
    epoch: u64,
    key: LessSafeKey,
    iv: [u8; 12],
}

impl EpochKey {
    fn new(base: &RecordKey, record: u64) -> Self {
        let epoch = record / KEY_EPOCH_RECORDS;
        let current = base.for_epoch(epoch);
        EpochKey {
            base: base.clone(),
            epoch,
            key: current.aead(),
            iv: current.iv,
        }
    }

    /// The key and nonce of record `record`.
    fn of(&mut self, record: u64) -> (&LessSafeKey, Nonce) {
        let epoch = record / KEY_EPOCH_RECORDS;
        if epoch != self.epoch {
            let current = self.base.for_epoch(epoch);
            self.epoch = epoch;
            self.key = current.aead();
            self.iv = current.iv;
        }
        (&self.key, nonce(&self.iv, record))
    }
}

/// What one session's data streams are keyed with, derived from its TLS session (see
/// [`crate::security::tls::TlsChannel::session_keys`]); shared by its workers.
pub struct SessionKeys {
    /// Per stream: the binding its hello carries.
    bindings: Vec<[u8; BINDING_LEN]>,
    /// Per stream: source-to-destination keys.
    to_destination: Vec<RecordKey>,
    /// Per stream: the number of the next record the source seals, carried across
    /// workers (a transport switch hands a stream to a new worker mid-session).
    next_sealed: Vec<AtomicU64>,
    /// Per stream: the keys of the connection that replaced it, once one did (its
    /// generation's; see [`SessionKeys::derive_generation`]).
    replaced: Mutex<Vec<Option<Arc<SessionKeys>>>>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKeys({} streams)", self.bindings.len())
    }
}

impl SessionKeys {
    /// Keys for `streams` streams, from `export(label, context, out)` (a TLS exporter,
    /// RFC 8446 §7.5).
    pub fn derive<E>(
        streams: u16,
        export: impl FnMut(&[u8], &[u8], &mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        Self::derive_generation(streams, 0, export)
    }

    /// [`SessionKeys::derive`] for the streams of generation `generation`: those that
    /// replace lost ones ([`crate::wire::StreamHello::generation`]). Each generation
    /// has its own bindings and keys, so a replacement never reuses a nonce of the
    /// stream it replaces, and nothing of the old connection opens on the new one.
    pub fn derive_generation<E>(
        streams: u16,
        generation: u16,
        mut export: impl FnMut(&[u8], &[u8], &mut [u8]) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut bindings = Vec::with_capacity(usize::from(streams));
        let mut to_destination = Vec::with_capacity(usize::from(streams));
        // Generation 0's contexts are the stream id alone (and the direction).
        let tail = |mut context: Vec<u8>| {
            if generation > 0 {
                context.extend_from_slice(&generation.to_le_bytes());
            }
            context
        };
        for stream in 0..streams {
            let id = stream.to_le_bytes();
            let mut binding = [0u8; BINDING_LEN];
            export(
                b"EXPORTER-dwcp stream binding",
                &tail(id.to_vec()),
                &mut binding,
            )?;
            bindings.push(binding);
            let mut material = [0u8; 44];
            let context = tail(vec![id[0], id[1], Direction::ToDestination as u8]);
            export(b"EXPORTER-dwcp stream record keys", &context, &mut material)?;
            to_destination.push(RecordKey::from_material(&material));
        }
        Ok(SessionKeys {
            bindings,
            to_destination,
            next_sealed: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            replaced: Mutex::new(vec![None; usize::from(streams)]),
        })
    }

    /// Stream `stream` is carried by a replacement connection keyed with `keys` (its
    /// generation's) from now on: sealers and openers made for it after this use them.
    pub fn replace_stream(&self, stream: u16, keys: Arc<SessionKeys>) {
        let mut replaced = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = replaced.get_mut(usize::from(stream)) {
            *slot = Some(keys);
        }
    }

    /// The keys stream `stream` uses now, if a replacement changed them.
    fn replacement(&self, stream: u16) -> Option<Arc<SessionKeys>> {
        let replaced = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
        replaced.get(usize::from(stream)).cloned().flatten()
    }

    /// Stream `stream`'s binding (what its hello must carry).
    pub fn binding(&self, stream: u16) -> [u8; BINDING_LEN] {
        self.bindings[usize::from(stream)]
    }

    /// Whether `presented` is stream `stream`'s binding (compared in constant time).
    pub fn binding_matches(&self, stream: u16, presented: &[u8; BINDING_LEN]) -> bool {
        self.bindings.get(usize::from(stream)).is_some_and(|b| {
            aws_lc_rs::constant_time::verify_slices_are_equal(b, presented).is_ok()
        })
    }

    /// The sealer of stream `stream` (source side), numbering on from the last worker
    /// that sealed on it.
    pub fn sealer(self: &Arc<Self>, stream: u16) -> RecordSealer {
        if let Some(keys) = self.replacement(stream) {
            return keys.sealer(stream);
        }
        let i = usize::from(stream);
        // Relaxed: a worker hands a stream on only after it has been joined, which
        // orders its last store before this load.
        let next = self.next_sealed[i].load(Ordering::Relaxed);
        RecordSealer {
            key: EpochKey::new(&self.to_destination[i], next),
            next,
            keys: self.clone(),
            stream,
        }
    }

    /// The opener of stream `stream` (destination side).
    pub fn opener(&self, stream: u16) -> RecordOpener {
        if let Some(keys) = self.replacement(stream) {
            return keys.opener(stream);
        }
        let i = usize::from(stream);
        RecordOpener {
            key: EpochKey::new(&self.to_destination[i], 0),
            next: 0,
            record: Vec::new(),
            have: 0,
        }
    }
}

/// `e`, counted in `dwcp_records_rejected_total`.
fn rejected(e: RecordError) -> RecordError {
    super::counters::record_rejected(e.reason());
    e
}

fn nonce(iv: &[u8; 12], record: u64) -> Nonce {
    let mut n = *iv;
    for (b, r) in n[4..].iter_mut().zip(record.to_be_bytes()) {
        *b ^= r;
    }
    Nonce::assume_unique_for_key(n)
}

fn header(len: usize, record: u64) -> [u8; RECORD_HEADER] {
    let mut h = [0u8; RECORD_HEADER];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..].copy_from_slice(&(record as u32).to_le_bytes());
    h
}

/// Seals a stream's send buffers in place (source side).
pub struct RecordSealer {
    key: EpochKey,
    next: u64,
    keys: Arc<SessionKeys>,
    stream: u16,
}

impl RecordSealer {
    /// Seal `buf[RECORD_HEADER..len]` in place: writes the header into
    /// `buf[..RECORD_HEADER]` and the tag after the ciphertext. `buf` must hold
    /// `len + RECORD_TAG` bytes. Returns the record's length.
    pub fn seal(&mut self, buf: &mut [u8], len: usize) -> usize {
        debug_assert!(len >= RECORD_HEADER && len + RECORD_TAG <= buf.len());
        let sealed_len = len - RECORD_HEADER + RECORD_TAG;
        let h = header(sealed_len, self.next);
        let (key, nonce) = self.key.of(self.next);
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(h), &mut buf[RECORD_HEADER..len])
            // Sealing fails only for inputs beyond GCM's 64 GiB limit; a buffer is MiBs.
            .expect("a record within AES-GCM's length limit");
        buf[..RECORD_HEADER].copy_from_slice(&h);
        buf[len..len + RECORD_TAG].copy_from_slice(tag.as_ref());
        self.next += 1;
        // Relaxed: read by the stream's next worker after this one is joined.
        self.keys.next_sealed[usize::from(self.stream)].store(self.next, Ordering::Relaxed);
        len + RECORD_TAG
    }
}

/// Reassembles and opens a stream's records (destination side), handing plaintext on
/// only once its record authenticated.
///
/// Bytes go into the record buffer either copied ([`RecordOpener::feed`]) or read
/// there straight from the socket ([`RecordOpener::window`], then
/// [`RecordOpener::filled`]): a window spans the rest of the record being assembled and
/// the next record's header, so one read per record suffices and the kernel's copy is
/// the only one before the record is opened in place.
pub struct RecordOpener {
    key: EpochKey,
    next: u64,
    /// The record being reassembled, header first (and possibly the start of the next
    /// one's header past its end).
    record: Vec<u8>,
    /// Bytes of `record` that have arrived.
    have: usize,
}

impl RecordOpener {
    /// Records opened so far.
    pub fn opened(&self) -> u64 {
        self.next
    }

    /// Where the next bytes of the stream go: the rest of the record being assembled
    /// (its header first, when not yet known) and room for the next record's header.
    /// Never empty.
    pub fn window(&mut self) -> &mut [u8] {
        let end = if self.have < RECORD_HEADER {
            RECORD_HEADER
        } else {
            // The header was checked when it arrived: its length is within bounds.
            RECORD_HEADER + self.sealed_len() + RECORD_HEADER
        };
        if self.record.len() < end {
            self.record.resize(end, 0);
        }
        &mut self.record[self.have..end]
    }

    /// `n` bytes were written at the start of [`RecordOpener::window`]: every record
    /// they complete is opened and its plaintext handed to `plaintext`, in order.
    pub fn filled<E: From<RecordError>>(
        &mut self,
        n: usize,
        plaintext: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let before = self.have;
        self.have += n;
        if before < RECORD_HEADER && self.have >= RECORD_HEADER {
            self.check_header()?;
        }
        loop {
            if self.have < RECORD_HEADER {
                return Ok(());
            }
            let total = RECORD_HEADER + self.sealed_len();
            if self.have < total {
                return Ok(());
            }
            self.open_and_hand_on(total, plaintext)?;
            // Bytes past the record are the next one's header, or part of it.
            let extra = self.have - total;
            self.record.copy_within(total..self.have, 0);
            self.have = extra;
            if self.have >= RECORD_HEADER {
                self.check_header()?;
            }
        }
    }

    /// Take `data` (any piece of the stream), copied into the record buffer; as
    /// [`RecordOpener::filled`].
    pub fn feed<E: From<RecordError>>(
        &mut self,
        mut data: &[u8],
        plaintext: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            let window = self.window();
            let n = window.len().min(data.len());
            window[..n].copy_from_slice(&data[..n]);
            data = &data[n..];
            self.filled(n, plaintext)?;
        }
        Ok(())
    }

    /// The stream ended: an error if it ended inside a record.
    pub fn at_end(&self) -> Result<(), RecordError> {
        if self.have == 0 {
            return Ok(());
        }
        Err(rejected(RecordError::Truncated {
            record: self.next,
            have: self.have,
            len: if self.have >= RECORD_HEADER {
                RECORD_HEADER + self.sealed_len()
            } else {
                RECORD_HEADER
            },
        }))
    }

    fn sealed_len(&self) -> usize {
        u32::from_le_bytes([
            self.record[0],
            self.record[1],
            self.record[2],
            self.record[3],
        ]) as usize
    }

    fn check_header(&self) -> Result<(), RecordError> {
        let len = self.sealed_len();
        if !(RECORD_TAG..=MAX_RECORD).contains(&len) {
            return Err(rejected(RecordError::BadLength {
                record: self.next,
                len,
            }));
        }
        let found = u32::from_le_bytes([
            self.record[4],
            self.record[5],
            self.record[6],
            self.record[7],
        ]);
        if found != self.next as u32 {
            return Err(rejected(RecordError::OutOfOrder {
                found,
                expected: self.next,
            }));
        }
        Ok(())
    }

    fn open_and_hand_on<E: From<RecordError>>(
        &mut self,
        total: usize,
        plaintext: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut h = [0u8; RECORD_HEADER];
        h.copy_from_slice(&self.record[..RECORD_HEADER]);
        let record = self.next;
        let (key, nonce) = self.key.of(record);
        let opened = key
            .open_in_place(nonce, Aad::from(h), &mut self.record[RECORD_HEADER..total])
            .map_err(|_| rejected(RecordError::Authentication { record }))?;
        self.next += 1;
        plaintext(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(streams: u16, secret: u8) -> Arc<SessionKeys> {
        keys_of(streams, 0, secret)
    }

    fn keys_of(streams: u16, generation: u16, secret: u8) -> Arc<SessionKeys> {
        let keys = SessionKeys::derive_generation(streams, generation, |label, context, out| {
            // A stand-in exporter: distinct bytes per label, context and secret.
            for (i, b) in out.iter_mut().enumerate() {
                *b = secret
                    ^ (i as u8)
                    ^ label.iter().fold(0u8, |a, x| a.wrapping_mul(31) ^ x)
                    ^ context.iter().fold(0u8, |a, x| a.wrapping_mul(17) ^ x);
            }
            Ok::<(), ()>(())
        })
        .unwrap();
        Arc::new(keys)
    }

    fn seal(sealer: &mut RecordSealer, plaintext: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; RECORD_HEADER + plaintext.len() + RECORD_TAG];
        buf[RECORD_HEADER..RECORD_HEADER + plaintext.len()].copy_from_slice(plaintext);
        let n = sealer.seal(&mut buf, RECORD_HEADER + plaintext.len());
        buf.truncate(n);
        buf
    }

    fn open_all(
        opener: &mut RecordOpener,
        wire: &[u8],
        piece: usize,
    ) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        for chunk in wire.chunks(piece.max(1)) {
            opener.feed(chunk, &mut |p: &[u8]| {
                out.extend_from_slice(p);
                Ok::<(), RecordError>(())
            })?;
        }
        Ok(out)
    }

    #[test]
    fn keys_update_at_each_epoch_on_both_sides_and_a_stale_key_does_not_open() {
        let k = keys(1, 9);
        let mut sealer = k.sealer(0);
        let mut opener = k.opener(0);
        // Across the first epoch boundary and a little past it, a worker change in
        // the middle (a new sealer numbers on and starts in the right epoch).
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        for n in 0..KEY_EPOCH_RECORDS + 3 {
            if n == KEY_EPOCH_RECORDS + 1 {
                sealer = k.sealer(0);
            }
            let plaintext = n.to_le_bytes();
            sent.extend_from_slice(&plaintext);
            wire.extend_from_slice(&seal(&mut sealer, &plaintext));
        }
        assert_eq!(open_all(&mut opener, &wire, 4093).unwrap(), sent);
        assert_eq!(opener.opened(), KEY_EPOCH_RECORDS + 3);

        // The key did change: record KEY_EPOCH_RECORDS does not open under epoch 0's
        // key (what a side that never updated would use), and does under epoch 1's.
        let base = k.to_destination[0].clone();
        let record_len = RECORD_HEADER + 8 + RECORD_TAG;
        let at = usize::try_from(KEY_EPOCH_RECORDS).unwrap() * record_len;
        let open_with = |key: &RecordKey| {
            let mut record = wire[at..at + record_len].to_vec();
            let mut h = [0u8; RECORD_HEADER];
            h.copy_from_slice(&record[..RECORD_HEADER]);
            key.aead()
                .open_in_place(
                    nonce(&key.iv, KEY_EPOCH_RECORDS),
                    Aad::from(h),
                    &mut record[RECORD_HEADER..],
                )
                .map(|p| p.to_vec())
        };
        assert!(open_with(&base).is_err());
        assert_eq!(
            open_with(&base.for_epoch(1)).unwrap(),
            KEY_EPOCH_RECORDS.to_le_bytes()
        );
        // Epoch keys are fixed by the material and differ from each other.
        assert_eq!(base.for_epoch(1).key, base.for_epoch(1).key);
        assert_ne!(base.for_epoch(1).key, base.key);
        assert_ne!(base.for_epoch(1).key, base.for_epoch(2).key);
        assert_ne!(base.for_epoch(1).iv, base.iv);
    }

    #[test]
    fn records_open_back_in_any_piece_sizes_and_number_on_across_sealers() {
        let k = keys(2, 7);
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for r in 0..5u8 {
            // A new sealer per record, as after a transport switch: numbering carries on.
            let mut sealer = k.sealer(1);
            let plain: Vec<u8> = (0..(1000 + usize::from(r) * 77))
                .map(|i| i as u8 ^ r)
                .collect();
            wire.extend(seal(&mut sealer, &plain));
            expected.extend(plain);
        }
        for piece in [1, 7, 8, 9, 100, 4096, wire.len()] {
            let mut opener = k.opener(1);
            assert_eq!(open_all(&mut opener, &wire, piece).unwrap(), expected);
            assert_eq!(opener.opened(), 5);
            opener.at_end().unwrap();
        }
    }

    /// Reading straight into the window, however short the reads, gives the same
    /// plaintext as copying.
    #[test]
    fn window_reads_open_the_same_records() {
        let k = keys(1, 3);
        let mut sealer = k.sealer(0);
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for r in 0..4u8 {
            let plain: Vec<u8> = (0..(5000 + usize::from(r) * 999))
                .map(|i| (i as u8) ^ r)
                .collect();
            wire.extend(seal(&mut sealer, &plain));
            expected.extend(plain);
        }
        for max_read in [1, 5, 8, 13, 4096, usize::MAX] {
            let mut opener = k.opener(0);
            let mut out = Vec::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let window = opener.window();
                assert!(!window.is_empty());
                let n = window.len().min(rest.len()).min(max_read);
                window[..n].copy_from_slice(&rest[..n]);
                rest = &rest[n..];
                opener
                    .filled(n, &mut |p: &[u8]| {
                        out.extend_from_slice(p);
                        Ok::<(), RecordError>(())
                    })
                    .unwrap();
            }
            assert_eq!(out, expected, "reads of at most {max_read}");
            opener.at_end().unwrap();
        }
    }

    #[test]
    fn a_replacement_connection_has_keys_and_a_binding_of_its_own() {
        let session = keys(2, 7);
        let replacement = keys_of(2, 1, 7);
        assert_ne!(session.binding(1), replacement.binding(1));
        assert!(!session.binding_matches(1, &replacement.binding(1)));
        // A record of the replacement does not open with the old connection's keys,
        // nor one of the old connection with the replacement's.
        let new_record = seal(&mut replacement.sealer(1), b"after the loss");
        assert!(open_all(&mut session.opener(1), &new_record, 64).is_err());
        let old_record = seal(&mut session.sealer(1), b"before the loss");
        assert!(open_all(&mut replacement.opener(1), &old_record, 64).is_err());
        // Once the session takes the replacement's keys for stream 1, its sealers and
        // openers for it use them; stream 0 keeps its own.
        session.replace_stream(1, replacement.clone());
        assert!(open_all(&mut session.opener(1), &new_record, 64).is_ok());
        let zero = seal(&mut session.sealer(0), b"stream 0");
        assert!(open_all(&mut keys(2, 7).opener(0), &zero, 64).is_ok());
    }

    #[test]
    fn tampering_replay_reordering_other_streams_and_truncation_are_refused() {
        let k = keys(2, 7);
        let mut sealer = k.sealer(0);
        let r0 = seal(&mut sealer, b"first record");
        let r1 = seal(&mut sealer, b"second record");

        // A flipped bit in the ciphertext, the tag or the header's number (a flipped
        // length bit is a truncation or a length error, below).
        for byte in [RECORD_HEADER + 3, r0.len() - 1, 5] {
            let mut bad = r0.clone();
            bad[byte] ^= 0x10;
            let err = open_all(&mut k.opener(0), &bad, 64).unwrap_err();
            assert!(
                matches!(
                    err,
                    RecordError::Authentication { record: 0 }
                        | RecordError::BadLength { .. }
                        | RecordError::OutOfOrder { .. }
                ),
                "byte {byte}: {err}"
            );
        }
        // Replayed: record 0 twice.
        let mut wire = r0.clone();
        wire.extend(&r0);
        let err = open_all(&mut k.opener(0), &wire, 64).unwrap_err();
        assert_eq!(
            err,
            RecordError::OutOfOrder {
                found: 0,
                expected: 1
            },
            "{err}"
        );
        // Reordered: record 1 first.
        let err = open_all(&mut k.opener(0), &r1, 64).unwrap_err();
        assert!(
            matches!(
                err,
                RecordError::OutOfOrder {
                    found: 1,
                    expected: 0
                }
            ),
            "{err}"
        );
        // Reordered with a forged number: the nonce differs, so the tag fails.
        let mut forged = r1.clone();
        forged[4..8].copy_from_slice(&0u32.to_le_bytes());
        let err = open_all(&mut k.opener(0), &forged, 64).unwrap_err();
        assert_eq!(err, RecordError::Authentication { record: 0 });
        // Another stream's record, and another session's.
        let err = open_all(&mut k.opener(1), &r0, 64).unwrap_err();
        assert_eq!(err, RecordError::Authentication { record: 0 });
        let err = open_all(&mut keys(2, 8).opener(0), &r0, 64).unwrap_err();
        assert_eq!(err, RecordError::Authentication { record: 0 });
        // Truncated: nothing of it is handed on, and the end says so.
        let mut opener = k.opener(0);
        let out = open_all(&mut opener, &r0[..r0.len() - 1], 64).unwrap();
        assert!(out.is_empty());
        let err = opener.at_end().unwrap_err();
        assert!(
            matches!(err, RecordError::Truncated { record: 0, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("truncated"), "{err}");
        // An absurd length is refused from the header alone.
        let mut huge = r0.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = open_all(&mut k.opener(0), &huge, 64).unwrap_err();
        assert!(matches!(err, RecordError::BadLength { .. }), "{err}");
    }

    #[test]
    fn bindings_differ_per_stream_and_session() {
        let a = keys(3, 1);
        let b = keys(3, 2);
        assert!(a.binding_matches(2, &a.binding(2)));
        assert!(!a.binding_matches(1, &a.binding(2)));
        assert!(!a.binding_matches(2, &b.binding(2)));
        assert!(!a.binding_matches(9, &a.binding(2)));
    }
}
