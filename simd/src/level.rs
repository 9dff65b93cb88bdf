//! Which instruction-set level the kernels run at.
//!
//! The CPU is probed once; the result, possibly lowered by the `DWCP_SIMD` environment
//! variable (`scalar|sse42|avx2|avx512`), is cached for the life of the process. A request
//! for a level the CPU lacks degrades to the best level it has and says so in
//! [`Selection::note`], so the choice is visible in `status` and never silently wrong.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// An instruction-set level. Each level implies the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Portable Rust, no target features: the reference every other path is tested against.
    Scalar,
    /// SSE4.2 (`crc32` instruction) with PCLMULQDQ; every x86-64 CPU since 2010.
    Sse42,
    /// AVX2 on top of [`SimdLevel::Sse42`].
    Avx2,
    /// AVX-512 F/BW/VL with VPCLMULQDQ on top of [`SimdLevel::Avx2`].
    Avx512,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 4] = [
        SimdLevel::Scalar,
        SimdLevel::Sse42,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
    ];

    /// The name used by `DWCP_SIMD` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Sse42 => "sse42",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run kernels of this level.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Sse42 => {
                std::arch::is_x86_feature_detected!("sse4.2")
                    && std::arch::is_x86_feature_detected!("pclmulqdq")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                SimdLevel::Sse42.is_supported()
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("bmi1")
                    && std::arch::is_x86_feature_detected!("bmi2")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                SimdLevel::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("vpclmulqdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The levels this CPU supports, lowest first.
    pub fn supported() -> Vec<SimdLevel> {
        Self::ALL.into_iter().filter(|l| l.is_supported()).collect()
    }

    /// The highest level this CPU supports.
    pub fn best() -> SimdLevel {
        Self::ALL
            .into_iter()
            .rev()
            .find(|l| l.is_supported())
            .unwrap_or(SimdLevel::Scalar)
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `DWCP_SIMD` value that names no level.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown SIMD level {0:?} (expected scalar, sse42, avx2 or avx512)")]
pub struct UnknownLevel(pub String);

impl FromStr for SimdLevel {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(SimdLevel::Scalar),
            "sse42" | "sse4.2" => Ok(SimdLevel::Sse42),
            "avx2" => Ok(SimdLevel::Avx2),
            "avx512" => Ok(SimdLevel::Avx512),
            _ => Err(UnknownLevel(s.to_owned())),
        }
    }
}

/// The level the process runs at and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The level in use.
    pub level: SimdLevel,
    /// The best level the CPU supports.
    pub best: SimdLevel,
    /// The raw `DWCP_SIMD` value, when set.
    pub requested: Option<String>,
    /// Why `level` differs from what was requested, when it does.
    pub note: Option<String>,
}

impl Selection {
    /// Resolve a request (the value of `DWCP_SIMD`, if any) against this CPU.
    pub fn resolve(requested: Option<&str>) -> Selection {
        let best = SimdLevel::best();
        let (level, note) = match requested.map(str::parse::<SimdLevel>) {
            None => (best, None),
            Some(Err(e)) => (best, Some(format!("DWCP_SIMD ignored: {e}; using {best}"))),
            Some(Ok(wanted)) if wanted.is_supported() => (wanted, None),
            Some(Ok(wanted)) => (
                best,
                Some(format!(
                    "DWCP_SIMD={wanted} is not supported by this CPU; using {best}"
                )),
            ),
        };
        Selection {
            level,
            best,
            requested: requested.map(str::to_owned),
            note,
        }
    }
}

static SELECTION: OnceLock<Selection> = OnceLock::new();

/// The process-wide selection, probed on first use.
pub fn selection() -> &'static Selection {
    SELECTION.get_or_init(|| Selection::resolve(std::env::var("DWCP_SIMD").ok().as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_rejects_others() {
        for level in SimdLevel::ALL {
            assert_eq!(level.name().parse::<SimdLevel>(), Ok(level));
        }
        assert!("avx1024".parse::<SimdLevel>().is_err());
    }

    #[test]
    fn unsupported_or_unknown_request_degrades_with_a_note() {
        let sel = Selection::resolve(Some("bogus"));
        assert_eq!(sel.level, SimdLevel::best());
        assert!(sel.note.unwrap().contains("unknown SIMD level"));

        let sel = Selection::resolve(Some("scalar"));
        assert_eq!(sel.level, SimdLevel::Scalar);
        assert!(sel.note.is_none());

        for level in SimdLevel::ALL {
            let sel = Selection::resolve(Some(level.name()));
            if level.is_supported() {
                assert_eq!(sel.level, level);
            } else {
                assert_eq!(sel.level, SimdLevel::best());
                assert!(sel.note.is_some());
            }
        }
    }
}
