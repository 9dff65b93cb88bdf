//! The test guest's memory layout and its checks, shared by the guest workload (which
//! runs inside a QEMU guest) and the tests that read its serial console.
//!
//! Every page the workload owns describes itself: word 0 is its index, word 1 its
//! generation (how many times it has been rewritten), and the other 510 words a pattern
//! derived from both. The workload rewrites the first `hot` pages in order, one
//! generation per pass, and counts its writes; from that count alone the generation
//! every page must hold follows ([`expected_generation`]). A page the migration left
//! stale, torn or misplaced fails that check, wherever the workload's counter lived.
//!
//! [`host`]: the host side, booting VMs of this guest for tests and benchmarks.

pub mod host;

/// Bytes per page.
pub const PAGE: usize = 4096;
/// 64-bit words per page.
pub const WORDS: usize = PAGE / 8;

/// The generation page `index` holds after `writes` rewrites of `hot` pages in order
/// (page `writes % hot` is the next one written).
pub fn expected_generation(index: u64, hot: u64, writes: u64) -> u64 {
    if index >= hot || writes <= index {
        0
    } else {
        (writes - 1 - index) / hot + 1
    }
}

/// The seed of a page's pattern (splitmix64 of index and generation).
fn seed(index: u64, generation: u64) -> u64 {
    let mut z = (index << 24 ^ generation).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `k` (≥ 2) of the page `index` at `generation`.
pub fn pattern_word(index: u64, generation: u64, k: usize) -> u64 {
    seed(index, generation) ^ (k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// Write page `index` at `generation` into `page`.
pub fn fill_page(page: &mut [u64], index: u64, generation: u64) {
    page[0] = index;
    page[1] = generation;
    let s = seed(index, generation);
    for (k, word) in page.iter_mut().enumerate().skip(2) {
        *word = s ^ (k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    }
}

/// What is wrong with a page, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageFault {
    /// The page names another index (misplaced, or never written).
    Index { found: u64 },
    /// The page is whole but of another generation (stale, or newer than possible).
    Generation { found: u64 },
    /// The pattern does not match the page's own header (torn or corrupted).
    Pattern { word: usize },
}

/// Check `page` against what page `index` must hold at `generation`.
pub fn check_page(page: &[u64], index: u64, generation: u64) -> Option<PageFault> {
    if page[0] != index {
        return Some(PageFault::Index { found: page[0] });
    }
    if page[1] != generation {
        return Some(PageFault::Generation { found: page[1] });
    }
    let s = seed(index, generation);
    page.iter()
        .enumerate()
        .skip(2)
        .find(|(k, w)| **w != s ^ (*k as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93))
        .map(|(k, _)| PageFault::Pattern { word: k })
}

/// A heartbeat line the workload prints on its console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Heartbeats printed before this one.
    pub seq: u64,
    /// Page writes so far.
    pub writes: u64,
    /// Complete checks of every page so far.
    pub checks: u64,
    /// Pages found wrong, over all checks.
    pub mismatches: u64,
}

/// The prefix of every line the workload prints.
pub const PREFIX: &str = "dwcp-guest:";

impl Heartbeat {
    /// The console line.
    pub fn line(&self) -> String {
        format!(
            "{PREFIX} heartbeat seq={} writes={} checks={} mismatches={}",
            self.seq, self.writes, self.checks, self.mismatches
        )
    }

    /// Parse a console line (`None` for any other line).
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let rest = line
            .trim()
            .strip_prefix(PREFIX)?
            .trim()
            .strip_prefix("heartbeat")?;
        let mut beat = Heartbeat {
            seq: 0,
            writes: 0,
            checks: 0,
            mismatches: 0,
        };
        let mut seen = 0;
        for field in rest.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            let value: u64 = value.parse().ok()?;
            match key {
                "seq" => beat.seq = value,
                "writes" => beat.writes = value,
                "checks" => beat.checks = value,
                "mismatches" => beat.mismatches = value,
                _ => continue,
            }
            seen += 1;
        }
        (seen == 4).then_some(beat)
    }
}

/// The workload's settings, from the kernel command line (`dwcp.NAME=VALUE`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    /// MiB of self-describing pages.
    pub mib: u64,
    /// Pages rewritten in order, from the first (at most all of them).
    pub hot_pages: u64,
    /// Page rewrites per second.
    pub rate: u64,
    /// Seconds between checks of every page.
    pub check_every_s: u64,
    /// Extra memory of the mixed profile, in MiB: text, records, random bytes and zero
    /// pages in the proportions of a Linux guest's memory (written once, not checked).
    pub ballast_mib: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mib: 64,
            hot_pages: 4096,
            rate: 2000,
            check_every_s: 2,
            ballast_mib: 0,
        }
    }
}

impl Settings {
    /// Settings from a kernel command line; unknown or malformed `dwcp.` fields are
    /// returned as complaints and otherwise ignored.
    pub fn from_cmdline(cmdline: &str) -> (Settings, Vec<String>) {
        let mut settings = Settings::default();
        let mut complaints = Vec::new();
        for field in cmdline.split_whitespace() {
            let Some(rest) = field.strip_prefix("dwcp.") else {
                continue;
            };
            let Some((key, value)) = rest.split_once('=') else {
                complaints.push(format!("{field}: expected dwcp.NAME=VALUE"));
                continue;
            };
            let Ok(value) = value.parse::<u64>() else {
                complaints.push(format!("{field}: not a number"));
                continue;
            };
            match key {
                "mib" => settings.mib = value.max(1),
                "hot" => settings.hot_pages = value,
                "rate" => settings.rate = value,
                "check_s" => settings.check_every_s = value.max(1),
                "ballast_mib" => settings.ballast_mib = value,
                _ => complaints.push(format!("{field}: unknown setting")),
            }
        }
        let pages = settings.mib * (1 << 20) / PAGE as u64;
        settings.hot_pages = settings.hot_pages.min(pages);
        (settings, complaints)
    }

    /// Pages of self-describing memory.
    pub fn pages(&self) -> u64 {
        self.mib * (1 << 20) / PAGE as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_follow_the_write_count() {
        let hot = 4;
        // Writes: page 0 (gen 1), 1, 2, 3, then page 0 (gen 2), 1 (gen 2).
        assert_eq!(expected_generation(0, hot, 0), 0);
        assert_eq!(expected_generation(0, hot, 1), 1);
        assert_eq!(expected_generation(1, hot, 1), 0);
        assert_eq!(expected_generation(0, hot, 6), 2);
        assert_eq!(expected_generation(1, hot, 6), 2);
        assert_eq!(expected_generation(2, hot, 6), 1);
        assert_eq!(expected_generation(7, hot, 100), 0);
    }

    #[test]
    fn a_stale_torn_or_misplaced_page_is_caught() {
        let mut page = vec![0u64; WORDS];
        fill_page(&mut page, 9, 3);
        assert_eq!(check_page(&page, 9, 3), None);
        assert_eq!(
            check_page(&page, 9, 4),
            Some(PageFault::Generation { found: 3 })
        );
        assert_eq!(check_page(&page, 8, 3), Some(PageFault::Index { found: 9 }));
        let mut torn = page.clone();
        let mut newer = vec![0u64; WORDS];
        fill_page(&mut newer, 9, 4);
        torn[..256].copy_from_slice(&newer[..256]);
        assert_eq!(
            check_page(&torn, 9, 4),
            Some(PageFault::Pattern { word: 256 })
        );
    }

    #[test]
    fn heartbeats_round_trip_and_other_lines_are_ignored() {
        let beat = Heartbeat {
            seq: 3,
            writes: 1000,
            checks: 2,
            mismatches: 0,
        };
        assert_eq!(Heartbeat::parse(&beat.line()), Some(beat));
        assert_eq!(Heartbeat::parse("[    0.1] Linux version"), None);
        assert_eq!(Heartbeat::parse("dwcp-guest: heartbeat seq=x"), None);
    }

    #[test]
    fn settings_come_from_the_kernel_command_line() {
        let (s, complaints) = Settings::from_cmdline(
            "console=ttyS0 dwcp.mib=8 dwcp.hot=100000 dwcp.rate=50 dwcp.bogus=1 dwcp.check_s=x",
        );
        assert_eq!(s.mib, 8);
        assert_eq!(
            s.hot_pages, 2048,
            "the hot set is capped at the pages owned"
        );
        assert_eq!(s.rate, 50);
        assert_eq!(complaints.len(), 2, "{complaints:?}");
    }
}
