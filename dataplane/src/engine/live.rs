//! Live reconfiguration of a running migration.
//!
//! The slow path publishes **epochs**: immutable snapshots of the settings that may
//! change while pages move ([`LiveSettings`]). The engine checks for a newer epoch at
//! every loop boundary (one atomic load) and adopts it there: socket options at once on
//! every stream, worker settings through each worker's control ring (which overtakes
//! queued runs), the codec mode through codec steering, and a new stream count or
//! transport at the next round boundary (the round in progress is cut short; its unsent
//! pages lead the next). A stream count waits until the destination has applied the
//! round (pages then move between streams, so no stream may still hold older copies of
//! them in flight); a transport change waits until the old workers have sent all they
//! hold, then new workers take over the same open streams.
//!
//! Back the other way the engine offers [`LiveReport`]s on a bounded channel, at most
//! every [`REPORT_INTERVAL`], dropping them when the reader lags: it never waits for
//! the slow path.

use super::SourceConfig;
use super::report::Progress;
use crate::codec::policy::CodecMode;
use crate::transport::socket::Congestion;
use crate::transport::{IdleStrategy, TransportKind};
use crossbeam::channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shortest time between two reports of one migration.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// The settings a running migration may change.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSettings {
    /// Streams carrying pages (`None`: every stream the session opened). At most the
    /// streams the session opened.
    pub active_streams: Option<u16>,
    /// The transport of the workers (`None`: the one the session opened with). A
    /// change takes effect at the next round boundary: the workers send what they
    /// hold, hand the open streams over, and workers of the other transport carry on.
    pub transport: Option<TransportKind>,
    /// Congestion control of every data stream.
    pub congestion: Congestion,
    /// Cap on the migration's total send rate, bytes per second, shared evenly by the
    /// streams carrying pages (`SO_MAX_PACING_RATE`); `None` for no cap.
    pub pacing_rate: Option<u64>,
    /// Codecs: off, fixed settings, or the policy's choice.
    pub codec: CodecMode,
    /// Zero-copy sends (turning them on only takes on workers started with them).
    pub zero_copy: bool,
    /// How idle workers wait.
    pub idle: IdleStrategy,
    /// Switch over when the estimated downtime is below this.
    pub downtime_limit: Duration,
}

impl LiveSettings {
    /// Epoch 0: what a session opens with, from its configuration. Later epochs change
    /// only what differs from it.
    pub fn from_config(config: &SourceConfig) -> Self {
        LiveSettings {
            active_streams: None,
            // An RMA session opens with RMA (where the destination grants it); the rest
            // open with what the probe finds.
            transport: (config.transport.choice == crate::transport::TransportChoice::Rma)
                .then_some(TransportKind::Rma),
            congestion: config.transport.socket.congestion,
            pacing_rate: config
                .transport
                .socket
                .pacing_rate
                .map(|r| r.saturating_mul(u64::from(config.streams))),
            codec: config.codec.mode.clone(),
            zero_copy: config.transport.zero_copy,
            idle: config.transport.idle,
            downtime_limit: config.downtime_limit,
        }
    }
}

/// One published configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Epoch {
    /// Increases by one with every publication; the first is 1.
    pub number: u64,
    /// The settings.
    pub settings: LiveSettings,
    /// Why it was published (operator command, mode change, safe mode...).
    pub reason: String,
}

/// What the engine reports while a migration runs.
#[derive(Debug, Clone)]
pub struct LiveReport {
    /// The migration (the id given to [`LiveControl::new`]).
    pub migration: u64,
    /// When the report was made.
    pub at: Instant,
    /// Progress, with per-stream and per-worker telemetry.
    pub progress: Progress,
}

/// The handle shared by the slow path and one migration's engine.
pub struct LiveControl {
    migration: u64,
    /// The latest epoch. Written under the lock, then `published` is stored (Release);
    /// the engine loads `published` (Acquire, pairs with that store) and takes the lock
    /// only when it moved.
    latest: Mutex<Arc<Epoch>>,
    published: AtomicU64,
    adopted: AtomicU64,
    active_streams: AtomicU16,
    cancel: AtomicBool,
    cancel_reason: Mutex<String>,
    /// Data streams the slow path asked to replace, with why; `replace_asked` is set
    /// (Release) after a push so the engine's check is one load (Acquire).
    replacements: Mutex<Vec<(u16, String)>>,
    replace_asked: AtomicBool,
    /// The slow path's forecast of the path's rate, bytes per second, as `f64` bits
    /// (0: none), for the planner's downtime estimate.
    path_rate: AtomicU64,
    notes: Mutex<Vec<String>>,
    /// What the migration is doing while it sets up (before any report says more).
    activity: Mutex<String>,
    reports: Option<Sender<LiveReport>>,
    dropped_reports: AtomicU64,
}

impl LiveControl {
    /// A handle for migration `migration`, starting from `settings` (epoch 1), offering
    /// reports on `reports` when given.
    pub fn new(
        migration: u64,
        settings: LiveSettings,
        reports: Option<Sender<LiveReport>>,
    ) -> Arc<Self> {
        Arc::new(LiveControl {
            migration,
            latest: Mutex::new(Arc::new(Epoch {
                number: 1,
                settings,
                reason: "initial".into(),
            })),
            published: AtomicU64::new(1),
            adopted: AtomicU64::new(0),
            active_streams: AtomicU16::new(0),
            cancel: AtomicBool::new(false),
            cancel_reason: Mutex::new(String::new()),
            replacements: Mutex::new(Vec::new()),
            replace_asked: AtomicBool::new(false),
            path_rate: AtomicU64::new(0),
            notes: Mutex::new(Vec::new()),
            activity: Mutex::new(String::new()),
            reports,
            dropped_reports: AtomicU64::new(0),
        })
    }

    /// A bounded channel for reports: the engine drops reports rather than wait.
    pub fn report_channel(capacity: usize) -> (Sender<LiveReport>, Receiver<LiveReport>) {
        crossbeam::channel::bounded(capacity)
    }

    /// The migration id.
    pub fn migration(&self) -> u64 {
        self.migration
    }

    /// Publish new settings; returns the epoch's number.
    pub fn publish(&self, settings: LiveSettings, reason: impl Into<String>) -> u64 {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let number = latest.number + 1;
        *latest = Arc::new(Epoch {
            number,
            settings,
            reason: reason.into(),
        });
        // Release: pairs with the Acquire in `newer_than`.
        self.published.store(number, Ordering::Release);
        number
    }

    /// The latest epoch.
    pub fn latest(&self) -> Arc<Epoch> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The latest epoch if it is newer than `adopted`.
    pub fn newer_than(&self, adopted: u64) -> Option<Arc<Epoch>> {
        // Acquire: pairs with the Release in `publish`.
        if self.published.load(Ordering::Acquire) <= adopted {
            return None;
        }
        Some(self.latest())
    }

    /// The engine adopted epoch `number`.
    pub(crate) fn mark_adopted(&self, number: u64) {
        self.adopted.store(number, Ordering::Release);
    }

    /// The last epoch the engine adopted (0 before it started).
    pub fn adopted(&self) -> u64 {
        self.adopted.load(Ordering::Acquire)
    }

    /// The engine now spreads pages over `n` streams.
    pub(crate) fn set_active_streams(&self, n: u16) {
        self.active_streams.store(n, Ordering::Release);
    }

    /// Streams carrying pages now (0 before the session opened).
    pub fn active_streams(&self) -> u16 {
        self.active_streams.load(Ordering::Acquire)
    }

    /// Ask the engine to stop the migration (the source stays intact).
    pub fn cancel(&self, reason: impl Into<String>) {
        *self.cancel_reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.into();
        self.cancel.store(true, Ordering::Release);
    }

    /// Ask the engine to give data stream `stream` up and carry it on a new connection,
    /// as when a stream is lost (its pages go to the others at once; the replacement
    /// comes from a new source port, which in a multipath network likely takes another
    /// path). Not done, and said in the notes, while streams may not be lost (the
    /// paused window, a session without that capability) or when it is the last one.
    pub fn replace_stream(&self, stream: u16, why: impl Into<String>) {
        self.replacements
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((stream, why.into()));
        self.replace_asked.store(true, Ordering::Release);
    }

    /// What [`LiveControl::replace_stream`] asked since the last call (the engine's).
    pub(crate) fn take_replacements(&self) -> Vec<(u16, String)> {
        // Acquire: pairs with the Release in `replace_stream`.
        if !self.replace_asked.swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *self.replacements.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Tell the planner what the path will carry over the next second, bytes per second
    /// (`None`: no forecast). Its downtime estimate then never prices the final round
    /// faster than that; see [`crate::engine::precopy`].
    pub fn set_path_rate(&self, bytes_per_second: Option<f64>) {
        let bits = bytes_per_second
            .filter(|r| r.is_finite() && *r > 0.0)
            .map_or(0, f64::to_bits);
        self.path_rate.store(bits, Ordering::Relaxed);
    }

    /// What [`LiveControl::set_path_rate`] said last.
    pub fn path_rate(&self) -> Option<f64> {
        match self.path_rate.load(Ordering::Relaxed) {
            0 => None,
            bits => Some(f64::from_bits(bits)),
        }
    }

    /// The flag [`LiveControl::cancel`] sets, for waits that poll it (set with Release;
    /// load it with Acquire to see the reason written before).
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }

    /// Why the migration was cancelled, if it was.
    pub fn cancelled(&self) -> Option<String> {
        self.cancel.load(Ordering::Acquire).then(|| {
            self.cancel_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// Something the engine could not do as asked, or did differently.
    pub(crate) fn note(&self, note: String) {
        self.notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(note);
    }

    /// Say what the migration is doing now (a setup step that takes a while: filling
    /// a simulated guest, the destination allocating memory, write-protecting memory).
    pub fn set_activity(&self, what: impl Into<String>) {
        *self.activity.lock().unwrap_or_else(|p| p.into_inner()) = what.into();
    }

    /// What [`LiveControl::set_activity`] said last (empty before).
    pub fn activity(&self) -> String {
        self.activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes so far.
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Offer a report; dropped (and counted) when the reader lags.
    pub(crate) fn offer(&self, progress: Progress) {
        let Some(tx) = &self.reports else { return };
        let report = LiveReport {
            migration: self.migration,
            at: Instant::now(),
            progress,
        };
        if let Err(TrySendError::Full(_)) = tx.try_send(report) {
            self.dropped_reports.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports dropped because the reader lagged.
    pub fn dropped_reports(&self) -> u64 {
        self.dropped_reports.load(Ordering::Relaxed)
    }
}
