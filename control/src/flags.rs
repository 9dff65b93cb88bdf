//! Feature flags: one per component, a rollout percentage, and the kill switch.
//!
//! A migration gets an enabled component only if its id falls in the rollout: a
//! consistent hash (FNV-1a 64, stable across builds and hosts) of the id maps it to a
//! bucket 0..100, and buckets below the percentage are in. **Safe mode** overrides
//! everything: plain TCP, no codecs, no zero-copy, for new migrations and — through a
//! settings epoch — for running ones. Flags persist to a TOML file, written on every
//! change and read again on `flags-reload` or when the file changes.

use dwcp_api::{FlagState, FlagsInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The components behind flags, by name.
pub const COMPONENTS: [&str; 7] = [
    "zero-copy",
    "io-uring",
    "delta",
    "dedup",
    "compression",
    "rdma",
    "ml-predictor",
];

/// The flags as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flags {
    /// Component name → enabled.
    pub components: BTreeMap<String, bool>,
    /// Share of migrations that get the enabled components, percent.
    pub rollout_percent: u8,
    /// The kill switch.
    pub safe_mode: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            components: COMPONENTS.iter().map(|c| (c.to_string(), true)).collect(),
            rollout_percent: 100,
            safe_mode: false,
        }
    }
}

/// Which components one migration uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Components {
    /// `SEND_ZC`.
    pub zero_copy: bool,
    /// io_uring (else plain sockets).
    pub io_uring: bool,
    /// XBZRLE deltas.
    pub delta: bool,
    /// Page references.
    pub dedup: bool,
    /// zstd.
    pub compression: bool,
    /// RDMA verbs.
    pub rdma: bool,
    /// The learned predictor (the codec policy's model).
    pub ml_predictor: bool,
    /// Whether the migration fell in the rollout.
    pub in_rollout: bool,
    /// Safe mode was on.
    pub safe: bool,
}

impl Components {
    /// Names of the components in use, for status and metrics.
    pub fn names(&self) -> Vec<String> {
        if self.safe {
            return vec!["safe-mode".into()];
        }
        [
            (self.zero_copy, "zero-copy"),
            (self.io_uring, "io-uring"),
            (self.delta, "delta"),
            (self.dedup, "dedup"),
            (self.compression, "compression"),
            (self.rdma, "rdma"),
            (self.ml_predictor, "ml-predictor"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n.to_string())
        .collect()
    }
}

/// The rollout bucket (0..100) of a migration id: FNV-1a 64 of its bytes.
pub fn bucket(migration: u64) -> u8 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in migration.to_le_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % 100) as u8
}

impl Flags {
    /// Whether `name` is a component flag.
    fn check_component(name: &str) -> Result<(), String> {
        if COMPONENTS.contains(&name) {
            Ok(())
        } else {
            Err(format!(
                "unknown flag {name:?} (flags: {}, rollout, safe-mode)",
                COMPONENTS.join(", ")
            ))
        }
    }

    /// Set a flag from an operator's text: `on`/`off` (or `true`/`false`), a percentage
    /// for `rollout`.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let on_off = |v: &str| match v {
            "on" | "true" | "1" => Ok(true),
            "off" | "false" | "0" => Ok(false),
            other => Err(format!("{name}: {other:?} is not on or off")),
        };
        match name {
            "rollout" => {
                let pct: u8 = value
                    .trim_end_matches('%')
                    .parse()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| format!("rollout: {value:?} (allowed 0..=100)"))?;
                self.rollout_percent = pct;
            }
            "safe-mode" => self.safe_mode = on_off(value)?,
            component => {
                Self::check_component(component)?;
                let on = on_off(value)?;
                self.components.insert(component.to_string(), on);
            }
        }
        Ok(())
    }

    fn enabled(&self, component: &str) -> bool {
        self.components.get(component).copied().unwrap_or(true)
    }

    /// What migration `id` may use.
    pub fn components_for(&self, id: u64) -> Components {
        let in_rollout = bucket(id) < self.rollout_percent;
        let on = |c: &str| !self.safe_mode && in_rollout && self.enabled(c);
        Components {
            zero_copy: on("zero-copy"),
            io_uring: on("io-uring"),
            delta: on("delta"),
            dedup: on("dedup"),
            compression: on("compression"),
            rdma: on("rdma"),
            ml_predictor: on("ml-predictor"),
            in_rollout,
            safe: self.safe_mode,
        }
    }

    /// For `flags`.
    pub fn info(&self, file: Option<&Path>) -> FlagsInfo {
        FlagsInfo {
            flags: COMPONENTS
                .iter()
                .map(|c| {
                    (
                        c.to_string(),
                        FlagState {
                            enabled: self.enabled(c),
                        },
                    )
                })
                .collect(),
            rollout_percent: self.rollout_percent,
            safe_mode: self.safe_mode,
            file: file.map(|p| p.display().to_string()),
        }
    }

    /// Parse a flags file, checking every name and value.
    pub fn parse(text: &str) -> Result<Flags, String> {
        let flags: Flags = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut errors: Vec<String> = flags
            .components
            .keys()
            .filter_map(|k| Self::check_component(k).err())
            .collect();
        if flags.rollout_percent > 100 {
            errors.push(format!(
                "rollout_percent = {} (allowed 0..=100)",
                flags.rollout_percent
            ));
        }
        if errors.is_empty() {
            Ok(flags)
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Flags bound to their file.
pub struct FlagStore {
    /// The flags in force.
    pub flags: Flags,
    path: Option<PathBuf>,
    seen: Option<SystemTime>,
}

impl FlagStore {
    /// Load `path` (defaults when it does not exist yet) or keep flags in memory only.
    pub fn open(path: Option<PathBuf>) -> Result<Self, String> {
        let mut store = FlagStore {
            flags: Flags::default(),
            path,
            seen: None,
        };
        if let Some(p) = &store.path
            && p.exists()
        {
            store.reload()?;
        }
        Ok(store)
    }

    /// The file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Read the file again; on error the flags in force stay.
    pub fn reload(&mut self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Err("no flags file configured".into());
        };
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.flags = Flags::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.seen = modified(path);
        Ok(())
    }

    /// Reload when the file changed since it was last read or written; returns whether
    /// it did (or the error).
    pub fn reload_if_changed(&mut self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let now = modified(path);
        if now.is_none() || now == self.seen {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// Change a flag and persist the flags.
    pub fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let mut next = self.flags.clone();
        next.set(name, value)?;
        self.replace(next)
    }

    /// Put `next` in force and persist it (the cluster's flags, once applied).
    pub fn replace(&mut self, next: Flags) -> Result<(), String> {
        if let Some(path) = &self.path {
            let text = toml::to_string(&next).map_err(|e| e.to_string())?;
            // Written whole, then renamed: a reader never sees half a file.
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            self.seen = modified(path);
        }
        self.flags = next;
        Ok(())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollout_is_a_stable_share_of_ids() {
        let mut flags = Flags::default();
        flags.set("rollout", "30").unwrap();
        let ids = 0..10_000u64;
        let inside = ids
            .clone()
            .filter(|&id| flags.components_for(id).in_rollout)
            .count();
        assert!((2_700..3_300).contains(&inside), "{inside}");
        // The same id always lands in the same bucket; raising the share only adds ids.
        let before: Vec<bool> = ids
            .clone()
            .map(|id| flags.components_for(id).in_rollout)
            .collect();
        flags.set("rollout", "60").unwrap();
        for (id, was) in ids.zip(before) {
            assert!(!was || flags.components_for(id).in_rollout, "id {id} left");
        }
        assert_eq!(bucket(42), bucket(42));
    }

    #[test]
    fn safe_mode_turns_everything_off() {
        let mut flags = Flags::default();
        assert!(flags.components_for(7).compression);
        flags.set("safe-mode", "on").unwrap();
        let c = flags.components_for(7);
        assert!(!c.zero_copy && !c.io_uring && !c.delta && !c.dedup && !c.compression);
        assert_eq!(c.names(), vec!["safe-mode"]);
    }

    #[test]
    fn bad_flags_are_refused_by_name() {
        let mut flags = Flags::default();
        assert!(
            flags
                .set("warp-drive", "on")
                .unwrap_err()
                .contains("unknown flag")
        );
        assert!(flags.set("delta", "maybe").is_err());
        assert!(flags.set("rollout", "101").unwrap_err().contains("0..=100"));
        assert_eq!(flags, Flags::default());
        assert!(Flags::parse("rollout_percent = 120").is_err());
        assert!(Flags::parse("[components]\nwarp = true").is_err());
    }

    #[test]
    fn flags_persist_and_reload_without_restart() {
        let dir = std::env::temp_dir().join(format!("dwcp-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flags.toml");
        let _ = std::fs::remove_file(&path);
        let mut store = FlagStore::open(Some(path.clone())).unwrap();
        store.set("compression", "off").unwrap();
        let reopened = FlagStore::open(Some(path.clone())).unwrap();
        assert!(!reopened.flags.enabled("compression"));
        // Another writer changes the file: picked up without a restart.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "safe_mode = true\n").unwrap();
        assert_eq!(store.reload_if_changed(), Ok(true));
        assert!(store.flags.safe_mode);
        // A broken file is refused and the flags in force stay.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, "safe_mode = maybe\n").unwrap();
        assert!(store.reload_if_changed().is_err());
        assert!(store.flags.safe_mode);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
