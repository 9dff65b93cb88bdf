//! Quantities with units as operators write them: durations (`40ms`, `250us`), rates
//! (`1gbit`, `500Mbit/s`), sizes (`64KiB`, `10MB`) and probabilities (`0.01%`).
//!
//! Each parses from a string and prints back in a form that parses again, so scenario
//! files, flags and the control command share one notation.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Splits `"12.5ms"` into `(12.5, "ms")`.
fn split_number(text: &str) -> Result<(f64, &str), String> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+' || c == 'e'))
        .unwrap_or(text.len());
    // "1e" would otherwise swallow the unit's start; units never begin with 'e' here.
    let (number, unit) = text.split_at(end);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number followed by a unit"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("`{text}`: must be a finite, non-negative number"));
    }
    Ok((value, unit.trim()))
}

/// A duration in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Nanos(pub u64);

impl Nanos {
    pub const ZERO: Nanos = Nanos(0);

    pub fn from_millis_f64(ms: f64) -> Nanos {
        Nanos((ms * 1e6).round() as u64)
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub fn as_millis_f64(self) -> f64 {
        self.0 as f64 / 1e6
    }
}

impl FromStr for Nanos {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (value, unit) = split_number(text)?;
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            _ => return Err(format!("`{text}`: unit must be one of ns, us, ms, s")),
        };
        Ok(Nanos((value * scale).round() as u64))
    }
}

impl fmt::Display for Nanos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0;
        if ns == 0 {
            write!(f, "0ms")
        } else if ns.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", ns / 1_000_000_000)
        } else if ns >= 1_000_000 {
            write!(f, "{}ms", ns as f64 / 1e6)
        } else if ns >= 1_000 {
            write!(f, "{}us", ns as f64 / 1e3)
        } else {
            write!(f, "{ns}ns")
        }
    }
}

impl TryFrom<String> for Nanos {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Nanos> for String {
    fn from(value: Nanos) -> String {
        value.to_string()
    }
}

/// A link rate in bits per second; `0` means no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BitsPerSecond(pub u64);

impl BitsPerSecond {
    pub const UNLIMITED: BitsPerSecond = BitsPerSecond(0);

    pub fn is_unlimited(self) -> bool {
        self.0 == 0
    }

    pub fn bytes_per_second(self) -> f64 {
        self.0 as f64 / 8.0
    }
}

impl FromStr for BitsPerSecond {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        if matches!(lower.as_str(), "unlimited" | "none" | "0") {
            return Ok(BitsPerSecond::UNLIMITED);
        }
        let (value, unit) = split_number(&lower)?;
        let unit = unit.trim_end_matches("/s");
        // `mbps` and `mbit` are the same thing.
        let unit = match unit.strip_suffix("bps") {
            Some(prefix) => format!("{prefix}bit"),
            None => unit.to_string(),
        };
        let scale = match unit.as_str() {
            "bit" | "b" => 1.0,
            "kbit" | "k" => 1e3,
            "mbit" | "m" => 1e6,
            "gbit" | "g" => 1e9,
            "tbit" | "t" => 1e12,
            _ => {
                return Err(format!(
                    "`{text}`: unit must be one of bit, kbit, mbit, gbit (or `unlimited`)"
                ));
            }
        };
        Ok(BitsPerSecond((value * scale).round() as u64))
    }
}

impl fmt::Display for BitsPerSecond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.0;
        if bits == 0 {
            write!(f, "unlimited")
        } else if bits.is_multiple_of(1_000_000_000) {
            write!(f, "{}gbit", bits / 1_000_000_000)
        } else if bits.is_multiple_of(1_000_000) {
            write!(f, "{}mbit", bits / 1_000_000)
        } else if bits.is_multiple_of(1_000) {
            write!(f, "{}kbit", bits / 1_000)
        } else {
            write!(f, "{bits}bit")
        }
    }
}

impl TryFrom<String> for BitsPerSecond {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<BitsPerSecond> for String {
    fn from(value: BitsPerSecond) -> String {
        value.to_string()
    }
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Bytes(pub u64);

impl FromStr for Bytes {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (value, unit) = split_number(text)?;
        let scale = match unit {
            "" | "B" | "b" => 1.0,
            "KB" | "kB" | "kb" | "K" | "k" => 1e3,
            "KiB" | "Ki" => 1024.0,
            "MB" | "mb" | "M" | "m" => 1e6,
            "MiB" | "Mi" => 1024.0 * 1024.0,
            "GB" | "gb" | "G" | "g" => 1e9,
            "GiB" | "Gi" => 1024.0 * 1024.0 * 1024.0,
            _ => {
                return Err(format!(
                    "`{text}`: unit must be one of B, KB, KiB, MB, MiB, GB, GiB"
                ));
            }
        };
        Ok(Bytes((value * scale).round() as u64))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}B")
        }
    }
}

impl TryFrom<String> for Bytes {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Bytes> for String {
    fn from(value: Bytes) -> String {
        value.to_string()
    }
}

/// A probability, written as a percentage (`"0.01%"`) or a plain fraction (`"0.0001"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Probability(pub f64);

impl Probability {
    pub const NEVER: Probability = Probability(0.0);

    pub fn is_never(self) -> bool {
        self.0 <= 0.0
    }
}

impl FromStr for Probability {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        let (value, unit) = split_number(trimmed)?;
        let fraction = match unit {
            "%" => value / 100.0,
            "" => value,
            _ => {
                return Err(format!(
                    "`{text}`: write a percentage (`0.5%`) or a fraction"
                ));
            }
        };
        if fraction > 1.0 {
            return Err(format!("`{text}`: must be within 0–100%"));
        }
        Ok(Probability(fraction))
    }
}

impl fmt::Display for Probability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

impl TryFrom<String> for Probability {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Probability> for String {
    fn from(value: Probability) -> String {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_round_trip() {
        assert_eq!("40ms".parse::<Nanos>().unwrap(), Nanos(40_000_000));
        assert_eq!("0.5ms".parse::<Nanos>().unwrap(), Nanos(500_000));
        assert_eq!("250us".parse::<Nanos>().unwrap(), Nanos(250_000));
        assert_eq!("2s".parse::<Nanos>().unwrap(), Nanos(2_000_000_000));
        for text in ["40ms", "0.5ms", "250us", "2s", "0ms", "17ns"] {
            let value: Nanos = text.parse().unwrap();
            assert_eq!(value.to_string().parse::<Nanos>().unwrap(), value, "{text}");
        }
        assert!("40".parse::<Nanos>().is_err());
        assert!("-3ms".parse::<Nanos>().is_err());
        assert!("fast".parse::<Nanos>().is_err());
    }

    #[test]
    fn rates_parse_in_the_usual_spellings() {
        assert_eq!("1gbit".parse::<BitsPerSecond>().unwrap().0, 1_000_000_000);
        assert_eq!("500Mbit/s".parse::<BitsPerSecond>().unwrap().0, 500_000_000);
        assert_eq!("100mbps".parse::<BitsPerSecond>().unwrap().0, 100_000_000);
        assert_eq!("2.5gbit".parse::<BitsPerSecond>().unwrap().0, 2_500_000_000);
        assert!("unlimited".parse::<BitsPerSecond>().unwrap().is_unlimited());
        assert!("10 parsecs".parse::<BitsPerSecond>().is_err());
        let rate: BitsPerSecond = "50mbit".parse().unwrap();
        assert_eq!(rate.to_string(), "50mbit");
    }

    #[test]
    fn sizes_and_probabilities() {
        assert_eq!("64KiB".parse::<Bytes>().unwrap().0, 65536);
        assert_eq!("10MB".parse::<Bytes>().unwrap().0, 10_000_000);
        assert_eq!("1500".parse::<Bytes>().unwrap().0, 1500);
        assert!(("0.01%".parse::<Probability>().unwrap().0 - 1e-4).abs() < 1e-12);
        assert!(("0.05".parse::<Probability>().unwrap().0 - 0.05).abs() < 1e-12);
        assert!("120%".parse::<Probability>().is_err());
        let p: Probability = "5%".parse().unwrap();
        assert_eq!(p.to_string().parse::<Probability>().unwrap(), p);
    }
}
