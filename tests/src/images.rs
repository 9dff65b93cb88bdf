//! The reference guest RAM images in `../shared/data/guest-ram` (beside the checkout):
//! unpacked once into a temporary directory (never into the repository), checked
//! against their published SHA-256, and replayed as a migrating guest.
//!
//! `DWCP_DATA` overrides where the data directory is.

use dwcp_dataplane::dirty::{DirtyLogKind, open_dirty_log};
use dwcp_dataplane::engine::{
    self, DestConfig, DestReport, MigrationError, MigrationReport, SourceConfig,
};
use dwcp_dataplane::guest::GuestControl;
use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_hugepages::PagePreference;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

const T0_SHA256: &str = "d7646e165b919866253e8f4fbd73b4288143e2282407565a628801ef995ff399";
const T1_SHA256: &str = "8aa3289b5b083d9aa4fe806ca026f9fb06079649cefb8e4b365bfd4c2b32183c";

/// Two snapshots of the same guest, taken seconds apart.
pub struct GuestImages {
    /// Snapshot t0.
    pub t0: Vec<u8>,
    /// Snapshot t1.
    pub t1: Vec<u8>,
    /// Where t0 is unpacked (for tools that read files).
    pub t0_path: PathBuf,
}

impl GuestImages {
    /// Pages of each snapshot.
    pub fn pages(&self) -> u64 {
        (self.t0.len() / PAGE_SIZE) as u64
    }

    /// Pages whose content differs between t0 and t1.
    pub fn changed_pages(&self) -> Vec<u64> {
        self.t0
            .chunks_exact(PAGE_SIZE)
            .zip(self.t1.chunks_exact(PAGE_SIZE))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// Fraction of t0's pages that are all zeros.
    pub fn zero_fraction(&self) -> f64 {
        let zero = self
            .t0
            .chunks_exact(PAGE_SIZE)
            .filter(|p| p.iter().all(|&b| b == 0))
            .count();
        zero as f64 / self.pages() as f64
    }
}

/// The data directory: `DWCP_DATA`, else `shared/data` beside the checkout.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("DWCP_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn sha256(path: &Path) -> Option<String> {
    let out = Command::new("sha256sum").arg(path).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().next().map(str::to_string)
}

/// Unpack (once per machine) and load the images; `Err` says why they are not
/// available, for a skip message.
pub fn guest_images() -> Result<GuestImages, String> {
    let src = data_dir().join("guest-ram");
    let t0_zst = src.join("sample-t0.img.zst");
    let t1_patch = src.join("sample-t1.patch.zst");
    if !t0_zst.exists() || !t1_patch.exists() {
        return Err(format!("no guest RAM images in {}", src.display()));
    }
    let dir = std::env::temp_dir().join(format!("dwcp-guest-ram-{}", user_id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let t0 = dir.join("sample-t0.img");
    let t1 = dir.join("sample-t1.img");
    // Unpack under a temporary name and rename, so a concurrent or interrupted run
    // never leaves a partial image behind under the final name.
    for (target, expected, args) in [
        (&t0, T0_SHA256, vec!["-d".into(), t0_zst.clone()]),
        (
            &t1,
            T1_SHA256,
            vec![
                "-d".into(),
                PathBuf::from(format!("--patch-from={}", t0.display())),
                t1_patch.clone(),
            ],
        ),
    ] {
        if target.exists() {
            continue;
        }
        let partial = target.with_extension(format!("partial{}", std::process::id()));
        run(Command::new("zstd")
            .arg("-q")
            .arg("-f")
            .args(&args)
            .arg("-o")
            .arg(&partial))
        .map_err(|e| format!("unpacking with the zstd command: {e}"))?;
        if let Some(found) = sha256(&partial)
            && found != expected
        {
            let _ = std::fs::remove_file(&partial);
            return Err(format!(
                "{} unpacked with SHA-256 {found}, expected {expected}",
                target.display()
            ));
        }
        std::fs::rename(&partial, target).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let images = GuestImages {
        t0: read(&t0)?,
        t1: read(&t1)?,
        t0_path: t0,
    };
    if images.t0.len() != images.t1.len() || !images.t0.len().is_multiple_of(PAGE_SIZE) {
        return Err("the two images differ in size or are not whole pages".into());
    }
    Ok(images)
}

fn user_id() -> u32 {
    // The directory is per user, so two users never share (or fight over) it.
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap_or(0)
}

/// A guest whose only writes are the ones the replay makes; pausing and throttling
/// have nothing to stop.
pub struct ReplayGuest;

impl GuestControl for ReplayGuest {
    fn pause(&self) -> Result<Option<Instant>, dwcp_dataplane::guest::GuestError> {
        Ok(None)
    }
    fn resume(&self) {}
    fn set_throttle(&self, _percent: u32) {}
}

/// What [`migrate_images`] measured.
pub struct ImageMigration {
    /// The source's report.
    pub report: MigrationReport,
    /// The destination's report.
    pub dest: DestReport,
    /// Wall time of the whole migration, from connecting to the verified switchover.
    pub seconds: f64,
    /// Whether the destination ended byte-identical to t1.
    pub identical: bool,
}

/// Migrate a guest holding snapshot t0 that, once round 0 is sent, turns into t1 (its
/// changed pages written as a vCPU would, tracked by the dirty log): the first snapshot
/// goes out, then the pages that changed. `policy` chooses codecs when given.
pub fn migrate_images<'a>(
    images: &GuestImages,
    source: &'a SourceConfig,
    dest: &DestConfig,
    policy: Option<&'a mut dyn dwcp_dataplane::codec::policy::CodecPolicy>,
) -> Result<ImageMigration, MigrationError> {
    let memory = Arc::new(
        GuestMemory::anonymous(images.t0.len(), PagePreference::TransparentHuge)
            .expect("guest memory"),
    );
    for (i, page) in images.t0.chunks_exact(PAGE_SIZE).enumerate() {
        memory.write_page(i as u64, page);
    }
    let changed = images.changed_pages();
    let opened = open_dirty_log(&memory, DirtyLogKind::Uffd)?;
    let (addr, receiver) = crate::spawn_destination(dest);
    let marker = opened.marker.clone();
    let writer = memory.clone();
    let mut replayed = false;
    let started = Instant::now();
    let report = engine::migrate_with_policy(
        addr,
        memory.clone(),
        &ReplayGuest,
        opened.log,
        source,
        policy,
        &mut |p| {
            if p.rounds_done >= 1 && !replayed {
                replayed = true;
                for &page in &changed {
                    let at = page as usize * PAGE_SIZE;
                    writer.write_page(page, &images.t1[at..at + PAGE_SIZE]);
                    if let Some(m) = &marker {
                        m.mark(page);
                    }
                }
            }
        },
    );
    let seconds = started.elapsed().as_secs_f64();
    let received = receiver.join().expect("destination thread");
    let report = report?;
    let dest = received?;
    let mut identical = true;
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, expected) in images.t1.chunks_exact(PAGE_SIZE).enumerate() {
        dest.memory.read_page(i as u64, &mut page);
        identical &= page == expected;
    }
    Ok(ImageMigration {
        report,
        dest,
        seconds,
        identical,
    })
}
