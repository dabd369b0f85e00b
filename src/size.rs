//! Byte sizes as users write them (`8G`, `512M`, `4096`) and as we print them.
//!
//! One parser for the whole project: the plugin keys, the CLI flags and the
//! config file all go through [`parse_size`], so `size=8G` means the same
//! everywhere. Suffixes are binary (K = 1024), as in nbdkit's own
//! `nbdkit_parse_size`, `losetup` and `swapon`.

use std::fmt;

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("'{0}' is not a size: expected a number with an optional K, M, G, T or P suffix")]
    Malformed(String),
    #[error("'{0}' is too large: it does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a byte count such as `4096`, `512M`, `8G`, `8GiB` or `1.5G`.
///
/// The suffix is case-insensitive and binary: `k`=2^10, `m`=2^20, `g`=2^30,
/// `t`=2^40, `p`=2^50, each optionally followed by `iB` or `B`; a bare `b` or
/// `B` means bytes. A fraction is allowed with a suffix and the result is
/// rounded down to a whole byte.
///
/// ```
/// assert_eq!(vramswap::parse_size("8G").unwrap(), 8 << 30);
/// assert_eq!(vramswap::parse_size("512MiB").unwrap(), 512 << 20);
/// assert!(vramswap::parse_size("eight").is_err());
/// ```
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let malformed = || SizeError::Malformed(text.to_string());
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(malformed());
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(malformed()),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) if shift > 0 && !f.contains('.') => (w, f),
        Some(_) => return Err(malformed()),
        None => (number, ""),
    };
    let overflow = || SizeError::Overflow(text.to_string());
    let whole: u64 = whole.parse().map_err(|_| overflow())?;
    let mut bytes = whole.checked_mul(1u64 << shift).ok_or_else(overflow)?;
    if !frac.is_empty() {
        // Exact decimal fraction of the unit, computed in u128 so 19 digits fit.
        let digits = &frac[..frac.len().min(18)];
        let numerator: u128 = digits.parse().map_err(|_| malformed())?;
        let denominator = 10u128.pow(digits.len() as u32);
        let extra = (numerator << shift) / denominator;
        bytes = bytes.checked_add(extra as u64).ok_or_else(overflow)?;
    }
    Ok(bytes)
}

/// A byte count printed the way people read them: `8 GiB`, `1.5 GiB`,
/// `4 MiB`, `512 B`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut unit = 0;
        while unit + 1 < UNITS.len() && self.0 >= 1u64 << (10 * (unit + 1)) {
            unit += 1;
        }
        if unit == 0 {
            return write!(f, "{} B", self.0);
        }
        let scaled = self.0 as f64 / (1u64 << (10 * unit)) as f64;
        if self.0 % (1u64 << (10 * unit)) == 0 {
            write!(f, "{} {}", self.0 >> (10 * unit), UNITS[unit])
        } else {
            write!(f, "{scaled:.2} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_and_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("8gb"), Ok(8 << 30));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.25M"), Ok(256 << 10));
    }

    #[test]
    fn garbage_is_refused_with_the_text() {
        for bad in [
            "", "  ", "G", "8X", "8 G", "-1", "1..5G", "1.5", ".5G", "5.G", "8Gi", "0x10",
        ] {
            let err = parse_size(bad).expect_err(bad);
            if !bad.trim().is_empty() {
                assert!(
                    err.to_string().contains(bad.trim()) || err == SizeError::Empty,
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert!(matches!(parse_size("16384P"), Err(SizeError::Overflow(_))));
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert_eq!(parse_size("16383P"), Ok(16383 << 50));
    }

    #[test]
    fn display_is_human() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(4 << 20).to_string(), "4 MiB");
        assert_eq!(ByteSize(8 << 30).to_string(), "8 GiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.50 GiB");
    }
}
