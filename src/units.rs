//! Sizes and durations as people write them in settings (`8MiB`, `64KiB`, `500ms`, `2s`, `1h`),
//! the same in the config file, in `DLA_*` variables and in flags, and printed back the same
//! way by `check-config`.
//!
//! A leaf: the settings of every stage use it, so it uses nothing of the crate. Sizes stay
//! plain integers in the code (their names end in `_bytes`); only their spelling changes.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;

/// What a size setting accepts, for error messages and `--help`.
pub const SIZE_HELP: &str =
    "a number of bytes, or with a unit such as 64KiB, 8MiB or 4GiB (KiB = 1024 bytes, kB = 1000)";
/// What a duration setting accepts, for error messages and `--help`.
pub const DURATION_HELP: &str = "a duration with a unit, such as 500ms, 2s, 60s, 10m or 1h";

/// A size or duration setting that does not parse; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnitError {
    /// Not a number of bytes, nor a number with a size unit.
    #[error("{0:?} is not a size: expected {help}", help = SIZE_HELP)]
    NotASize(String),
    /// A size beyond what the setting's type holds.
    #[error("{0:?} is too large")]
    TooLarge(String),
    /// Not a duration with a unit.
    #[error("{given:?} is not a duration ({reason}): expected {help}", help = DURATION_HELP)]
    NotADuration {
        /// The text given.
        given: String,
        /// humantime's reason.
        reason: humantime::DurationError,
    },
}

/// Parses a size: a plain number of bytes (what every size setting took before units), or a
/// number with a unit. Binary (`KiB`, `MiB`, `GiB`, `Ki`) and decimal (`kB`, `MB`, `k`, `M`)
/// units mean what they say, as in Kubernetes quantities.
pub fn parse_size<T: TryFrom<u64>>(s: &str) -> Result<T, UnitError> {
    let t = s.trim();
    // A sign or an empty string would otherwise reach bytesize's float parse.
    let n = if t.starts_with(|c: char| c.is_ascii_digit()) {
        t.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64())
    } else {
        None
    };
    let n = n.ok_or_else(|| UnitError::NotASize(s.to_owned()))?;
    T::try_from(n).map_err(|_| UnitError::TooLarge(s.to_owned()))
}

/// Prints a size exactly, in the largest binary unit that divides it (`65536` is `64KiB`), so
/// that what `check-config` prints reads back as the same number.
pub fn format_size(n: u64) -> String {
    const UNITS: [(&str, u32); 5] = [
        ("PiB", 50),
        ("TiB", 40),
        ("GiB", 30),
        ("MiB", 20),
        ("KiB", 10),
    ];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{}{name}", n >> shift);
        }
    }
    format!("{n}B")
}

/// Parses a duration with a unit (`500ms`, `2s`, `1m 30s`, `1h`); `0` alone is zero. A bare
/// number is refused: `2000` could be seconds or milliseconds, which is why the old settings
/// named their unit (`block_max_age_ms`), and those names still take a bare number.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    humantime::parse_duration(s.trim()).map_err(|reason| UnitError::NotADuration {
        given: s.to_owned(),
        reason,
    })
}

/// Prints a duration as [`parse_duration`] reads it back (`2s`, `1h`, `1m 30s`, `500ms`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    humantime::format_duration(d).to_string()
}

/// `#[serde(with = "crate::units::size")]`: a size field as an integer (bytes, the old form) or
/// a string with a unit; printed with its unit.
pub mod size {
    use super::*;

    /// Prints the size with its unit ([`format_size`]).
    pub fn serialize<T, S>(v: &T, s: S) -> Result<S::Ok, S::Error>
    where
        T: Copy + TryInto<u64>,
        S: Serializer,
    {
        // usize and u64 always fit.
        let n: u64 = (*v).try_into().unwrap_or(u64::MAX);
        s.serialize_str(&format_size(n))
    }

    /// Reads an integer (bytes) or a string with a unit ([`parse_size`]).
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: TryFrom<u64>,
        D: Deserializer<'de>,
    {
        struct V<T>(std::marker::PhantomData<T>);
        impl<T: TryFrom<u64>> Visitor<'_> for V<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_HELP)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<T, E> {
                T::try_from(n).map_err(|_| E::custom(format!("{n} is too large")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<T, E> {
                let n = u64::try_from(n).map_err(|_| {
                    E::invalid_value(de::Unexpected::Signed(n), &"a size of at least 0")
                })?;
                self.visit_u64(n)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
                parse_size(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// `#[serde(with = "crate::units::duration")]`: a duration field as a string with a unit.
pub mod duration {
    use super::*;

    /// Prints the duration with its unit ([`format_duration`]).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    /// Reads a string with a unit ([`parse_duration`]); a bare number is refused with what to
    /// write instead.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(DURATION_HELP)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "{n} has no unit: expected {DURATION_HELP}, e.g. \"{n}s\""
                )))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "{n} has no unit: expected {DURATION_HELP}, e.g. \"{n}s\""
                )))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                parse_duration(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_and_without_units_and_print_back_exactly() {
        assert_eq!(parse_size::<u64>("65536"), Ok(65536));
        assert_eq!(parse_size::<u64>("64KiB"), Ok(65536));
        assert_eq!(parse_size::<u64>("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size::<u64>("8 MiB"), Ok(8 << 20));
        assert_eq!(parse_size::<u64>("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size::<u64>("8MB"), Ok(8_000_000));
        assert!(parse_size::<u64>("-1").is_err());
        assert!(parse_size::<u64>("lots").is_err());
        assert!(parse_size::<u64>("8 parsecs").is_err());
        assert!(parse_size::<u32>("8GiB").is_err());
        for n in [
            0,
            1,
            1000,
            1024,
            65536,
            1 << 20,
            (1 << 20) + 1,
            5 << 30,
            4 << 30,
            u64::MAX,
        ] {
            assert_eq!(
                parse_size::<u64>(&format_size(n)),
                Ok(n),
                "{}",
                format_size(n)
            );
        }
        assert_eq!(format_size(64 << 10), "64KiB");
        assert_eq!(format_size(8 << 20), "8MiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn durations_need_a_unit_and_print_back_exactly() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("2000").is_err());
        assert!(parse_duration("soon").is_err());
        for d in [0, 1, 500, 2000, 60_000, 90_000, 3_600_000, 86_400_000 + 1] {
            let d = Duration::from_millis(d);
            assert_eq!(
                parse_duration(&format_duration(d)),
                Ok(d),
                "{}",
                format_duration(d)
            );
        }
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
