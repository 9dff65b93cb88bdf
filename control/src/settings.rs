//! The live settings of outgoing migrations, in layers: the configuration, then the
//! mode's policy, then operator overrides (those for every migration, then those for
//! one), then flags (safe mode last, winning). Every change of any layer — a mode
//! switch, a `set`, safe mode — recomputes the whole stack, so no layer undoes
//! another, and each value carries where it came from for `status` and `migrations`.

use crate::config::{Size, parse_codec_mode};
use crate::flags::Components;
use crate::mode::{Mode, policy_for};
use dwcp_api::{SetOptions, SettingInfo};
use dwcp_dataplane::codec::policy::CodecMode;
use dwcp_dataplane::engine::LiveSettings;
use dwcp_dataplane::transport::TransportKind;
use dwcp_dataplane::transport::socket::Congestion;
use std::time::Duration;

/// An operator's `set`, checked and parsed; absent fields change nothing.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Overrides {
    /// Streams carrying pages.
    pub streams: Option<u16>,
    /// `Some(None)` removes the cap.
    pub pacing_rate: Option<Option<u64>>,
    /// Codecs.
    pub codec: Option<CodecMode>,
    /// Congestion control.
    pub congestion: Option<Congestion>,
    /// Downtime limit.
    pub downtime_limit: Option<Duration>,
}

impl Overrides {
    /// Check and parse a `set` request.
    pub fn parse(o: &SetOptions) -> Result<Overrides, String> {
        if let Some(n) = o.streams
            && !(1..=dwcp_dataplane::wire::MAX_STREAMS).contains(&n)
        {
            return Err(format!("streams {n} (allowed 1..=256)"));
        }
        if let Some(ms) = o.downtime_ms
            && !(1..=60_000).contains(&ms)
        {
            return Err(format!("downtime {ms} ms (allowed 1..=60000)"));
        }
        let overrides = Overrides {
            streams: o.streams,
            pacing_rate: o.pacing_rate.map(|r| (r > 0).then_some(r)),
            codec: o
                .codec
                .as_deref()
                .map(|c| parse_codec_mode(c, Default::default()))
                .transpose()?,
            congestion: o.congestion.as_deref().map(str::parse).transpose()?,
            downtime_limit: o.downtime_ms.map(Duration::from_millis),
        };
        if overrides == Overrides::default() {
            return Err(
                "nothing to set (give --streams, --pacing-rate, --codec, --congestion \
                        or --downtime-ms)"
                    .into(),
            );
        }
        Ok(overrides)
    }

    /// Newer overrides win field by field.
    pub fn merge(&mut self, newer: &Overrides) {
        self.streams = newer.streams.or(self.streams);
        self.pacing_rate = newer.pacing_rate.or(self.pacing_rate);
        self.codec = newer.codec.clone().or(self.codec.take());
        self.congestion = newer.congestion.or(self.congestion);
        self.downtime_limit = newer.downtime_limit.or(self.downtime_limit);
    }

    /// What it sets, as an operator would write it.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.streams {
            parts.push(format!("streams {n}"));
        }
        if let Some(r) = self.pacing_rate {
            parts.push(format!("pacing rate {}", rate_text(r)));
        }
        if let Some(c) = &self.codec {
            parts.push(format!("codec {}", codec_text(c)));
        }
        if let Some(c) = self.congestion {
            parts.push(format!("congestion {c}"));
        }
        if let Some(d) = self.downtime_limit {
            parts.push(format!("downtime {} ms", d.as_millis()));
        }
        parts.join(", ")
    }
}

/// Narrow live settings to what a migration's components allow.
pub fn restrict(s: &mut LiveSettings, c: &Components) {
    if !c.zero_copy {
        s.zero_copy = false;
    }
    if !c.io_uring {
        s.transport = Some(TransportKind::Plain);
    }
    if !c.rdma && s.transport == Some(TransportKind::Rma) {
        s.transport = Some(TransportKind::IoUring);
    }
    let codecs_allowed = c.delta || c.dedup || c.compression;
    match &mut s.codec {
        CodecMode::Fixed(settings) => {
            settings.delta &= c.delta;
            settings.dedup &= c.dedup;
            if !c.compression {
                settings.level = None;
                settings.dictionary = false;
            }
            if settings.is_off() {
                s.codec = CodecMode::Off;
            }
        }
        CodecMode::Auto if !codecs_allowed || !c.ml_predictor => s.codec = CodecMode::Off,
        _ => {}
    }
    if c.safe {
        s.transport = Some(TransportKind::Plain);
        s.codec = CodecMode::Off;
        s.zero_copy = false;
    }
}

/// Everything one migration's settings are made of.
pub struct Layers<'a> {
    /// What its session opens with (the configuration, the `migrate` options).
    pub base: &'a LiveSettings,
    /// Streams its session opens.
    pub opened: u16,
    /// The mode in force, if any, and the host's RDMA devices.
    pub mode: Option<Mode>,
    /// RMA providers on RDMA hardware here (datacenter mode writes pages through them).
    pub rma_hardware: &'a [String],
    /// Overrides for every migration.
    pub all: &'a Overrides,
    /// Overrides for this migration only.
    pub own: Option<&'a Overrides>,
    /// Components its flags allow.
    pub components: &'a Components,
    /// Its share of the site's WAN budget, bytes per second (a cap under any other).
    pub budget_share: Option<u64>,
}

/// The settings and where each comes from.
pub fn layered(l: &Layers<'_>) -> (LiveSettings, Vec<SettingInfo>) {
    let mut s = l.base.clone();
    let mut from = Sources::all("config");
    if let Some(mode) = l.mode {
        let policy = policy_for(mode, l.rma_hardware);
        let label = format!("mode {mode}");
        if policy.transport == "rma" {
            s.transport = Some(TransportKind::Rma);
            from.transport = label.clone();
        }
        s.active_streams = Some(policy.streams.min(l.opened));
        s.congestion = policy.congestion;
        s.codec = policy.codec;
        from.streams = label.clone();
        from.congestion = label.clone();
        from.codec = label;
    }
    for (overrides, label) in [
        (Some(l.all), "override"),
        (l.own, "override (this migration)"),
    ] {
        let Some(o) = overrides else { continue };
        if let Some(n) = o.streams {
            s.active_streams = Some(n.min(l.opened));
            from.streams = label.into();
        }
        if let Some(r) = o.pacing_rate {
            s.pacing_rate = r;
            from.pacing_rate = label.into();
        }
        if let Some(c) = &o.codec {
            s.codec = c.clone();
            from.codec = label.into();
        }
        if let Some(c) = o.congestion {
            s.congestion = c;
            from.congestion = label.into();
        }
        if let Some(d) = o.downtime_limit {
            s.downtime_limit = d;
            from.downtime = label.into();
        }
    }
    if let Some(share) = l.budget_share
        && s.pacing_rate.is_none_or(|r| r > share)
    {
        s.pacing_rate = Some(share);
        from.pacing_rate = "cluster budget".into();
    }
    let before = s.clone();
    restrict(&mut s, l.components);
    let flags = if l.components.safe {
        "safe mode"
    } else {
        "flags"
    };
    if s.transport != before.transport {
        from.transport = flags.into();
    }
    if s.codec != before.codec {
        from.codec = flags.into();
    }
    if s.zero_copy != before.zero_copy {
        from.zero_copy = flags.into();
    }
    let shown = vec![
        setting(
            "streams",
            format!(
                "{} of {} opened",
                s.active_streams.unwrap_or(l.opened).min(l.opened),
                l.opened
            ),
            from.streams,
        ),
        setting("congestion", s.congestion.to_string(), from.congestion),
        setting("pacing-rate", rate_text(s.pacing_rate), from.pacing_rate),
        setting("codec", codec_text(&s.codec), from.codec),
        setting(
            "downtime",
            format!("{} ms", s.downtime_limit.as_millis()),
            from.downtime,
        ),
        setting(
            "transport",
            s.transport
                .map_or("as opened".to_string(), |k| k.name().to_string()),
            from.transport,
        ),
        setting(
            "zero-copy",
            if s.zero_copy { "on" } else { "off" }.into(),
            from.zero_copy,
        ),
    ];
    (s, shown)
}

/// Where each shown setting came from.
struct Sources {
    streams: String,
    congestion: String,
    pacing_rate: String,
    codec: String,
    downtime: String,
    transport: String,
    zero_copy: String,
}

impl Sources {
    fn all(source: &str) -> Self {
        Sources {
            streams: source.into(),
            congestion: source.into(),
            pacing_rate: source.into(),
            codec: source.into(),
            downtime: source.into(),
            transport: source.into(),
            zero_copy: source.into(),
        }
    }
}

fn setting(name: &str, value: String, source: String) -> SettingInfo {
    SettingInfo {
        name: name.into(),
        value,
        source,
    }
}

/// A send-rate cap as an operator writes it (`300M/s`), or `none`.
pub fn rate_text(rate: Option<u64>) -> String {
    rate.map_or("none".into(), |r| format!("{}/s", Size(r)))
}

/// A codec mode as the configuration writes it.
pub fn codec_text(mode: &CodecMode) -> String {
    match mode {
        CodecMode::Off => "off".into(),
        CodecMode::Auto => "auto".into(),
        CodecMode::Fixed(s) => {
            let mut text = match s.level {
                Some(level) => format!("zstd:{level}"),
                None => "delta".into(),
            };
            for (off, option) in [
                (!s.dedup, ",nodedup"),
                (!s.delta, ",nodelta"),
                (s.level.is_some() && !s.dictionary, ",nodict"),
            ] {
                if off {
                    text += option;
                }
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::Flags;

    fn base() -> LiveSettings {
        LiveSettings::from_config(&dwcp_dataplane::engine::SourceConfig::default())
    }

    fn value<'a>(shown: &'a [SettingInfo], name: &str) -> (&'a str, &'a str) {
        let s = shown.iter().find(|s| s.name == name).expect(name);
        (&s.value, &s.source)
    }

    #[test]
    fn overrides_outlive_a_mode_change_and_say_where_they_come_from() {
        let base = base();
        let components = Flags::default().components_for(1);
        let all = Overrides::parse(&SetOptions {
            streams: Some(2),
            pacing_rate: Some(300 << 20),
            ..SetOptions::default()
        })
        .unwrap();
        let own = Overrides::parse(&SetOptions {
            codec: Some("zstd:3".into()),
            ..SetOptions::default()
        })
        .unwrap();
        let layers = |mode| Layers {
            base: &base,
            opened: 8,
            mode,
            rma_hardware: &[],
            all: &all,
            own: Some(&own),
            components: &components,
            budget_share: None,
        };
        for mode in [None, Some(Mode::Internet), Some(Mode::Datacenter)] {
            let (s, shown) = layered(&layers(mode));
            assert_eq!(s.active_streams, Some(2), "{mode:?}");
            assert_eq!(s.pacing_rate, Some(300 << 20));
            assert_eq!(value(&shown, "streams"), ("2 of 8 opened", "override"));
            assert_eq!(value(&shown, "pacing-rate"), ("300M/s", "override"));
            assert_eq!(
                value(&shown, "codec"),
                ("zstd:3", "override (this migration)")
            );
            assert_eq!(value(&shown, "downtime").1, "config");
        }
        let (s, shown) = layered(&layers(Some(Mode::Internet)));
        assert_eq!(s.congestion, Congestion::Bbr);
        assert_eq!(value(&shown, "congestion"), ("bbr", "mode internet"));
    }

    #[test]
    fn safe_mode_wins_and_says_so() {
        let base = base();
        let flags = Flags {
            safe_mode: true,
            ..Flags::default()
        };
        let components = flags.components_for(1);
        let all = Overrides::parse(&SetOptions {
            codec: Some("zstd:3".into()),
            ..SetOptions::default()
        })
        .unwrap();
        let (s, shown) = layered(&Layers {
            base: &base,
            opened: 4,
            mode: None,
            rma_hardware: &[],
            all: &all,
            own: None,
            components: &components,
            budget_share: None,
        });
        assert_eq!(s.codec, CodecMode::Off);
        assert_eq!(value(&shown, "codec"), ("off", "safe mode"));
        assert_eq!(value(&shown, "transport"), ("plain", "safe mode"));
    }

    #[test]
    fn datacenter_mode_writes_by_rma_on_rdma_hardware_unless_a_flag_says_no() {
        let base = base();
        let all = Overrides::default();
        let layers = |components: &Components, hardware: &'static [String]| {
            layered(&Layers {
                base: &base,
                opened: 4,
                mode: Some(Mode::Datacenter),
                rma_hardware: hardware,
                all: &all,
                own: None,
                components,
                budget_share: None,
            })
        };
        static SOCKETS_ONLY: [String; 0] = [];
        let hardware: &'static [String] = Box::leak(Box::new(["verbs on mlx5_0".to_string()]));
        let components = Flags::default().components_for(1);
        let (s, shown) = layers(&components, hardware);
        assert_eq!(s.transport, Some(TransportKind::Rma));
        assert_eq!(value(&shown, "transport"), ("rma", "mode datacenter"));
        // Sockets only (tcp): RMA over sockets is no faster than the streams.
        let (s, _) = layers(&components, &SOCKETS_ONLY);
        assert_eq!(s.transport, None);
        let mut no_rdma = Flags::default();
        no_rdma.components.insert("rdma".into(), false);
        let no_rdma = no_rdma.components_for(1);
        let (s, _) = layers(&no_rdma, hardware);
        assert_eq!(s.transport, Some(TransportKind::IoUring));
        let safe = Flags {
            safe_mode: true,
            ..Flags::default()
        }
        .components_for(1);
        let (s, shown) = layers(&safe, hardware);
        assert_eq!(s.transport, Some(TransportKind::Plain));
        assert_eq!(value(&shown, "transport"), ("plain", "safe mode"));
    }

    #[test]
    fn an_empty_set_is_refused() {
        assert!(Overrides::parse(&SetOptions::default()).is_err());
    }
}
