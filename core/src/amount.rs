//! Exact amounts and cost maps.
//!
//! Money and every other quantity are integers: an [`Amount`] is a decimal
//! `value × 10^-scale` given by the caller, and the policy converts it to the
//! unit's *base units* (`usd` has 6 decimals, so `0.0125` usd is 12 500 base
//! units). No binary floating point ever touches a balance. Every base amount
//! stays within ±[`MAX_AMOUNT`] (2^53 − 1) so the Redis scripts, whose numbers
//! are doubles, compute exactly the same results.

use std::fmt;

use smallvec::SmallVec;

use crate::error::{Error, Result, truncate};

/// Largest magnitude of any amount, capacity or intermediate, in base units.
pub const MAX_AMOUNT: i64 = (1 << 53) - 1;

/// An exact non-negative decimal number as given by a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    value: i64,
    scale: u8,
}

impl Amount {
    /// A whole number of units.
    #[must_use]
    pub const fn units(value: i64) -> Self {
        Self { value, scale: 0 }
    }

    /// `value × 10^-scale`, e.g. `Amount::decimal(125, 4)` is `0.0125`.
    #[must_use]
    pub const fn decimal(value: i64, scale: u8) -> Self {
        Self { value, scale }
    }

    /// The amount as written: `(value, scale)` for `value × 10^-scale`.
    #[must_use]
    pub const fn parts(self) -> (i64, u8) {
        (self.value, self.scale)
    }

    /// Parses a decimal string like `12`, `0.0125` or `1e-3`… (no exponent: plain decimals only).
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] (with `unit` empty) for anything but a plain
    /// non-negative decimal with at most 18 significant digits.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |m: &str| Error::InvalidAmount {
            unit: String::new(),
            message: format!("`{}` {m}", truncate(s)),
        };
        let t = s.trim();
        let t = t.strip_prefix('+').unwrap_or(t);
        if let Some(rest) = t.strip_prefix('-') {
            // Negative zero is zero; anything else below zero is refused.
            if !rest.is_empty()
                && rest.bytes().all(|b| b == b'0' || b == b'.')
                && rest.contains('0')
            {
                return Ok(Self::units(0));
            }
            return Err(bad("is negative"));
        }
        let (int, frac) = t.split_once('.').unwrap_or((t, ""));
        if (int.is_empty() && frac.is_empty())
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad("is not a plain decimal number"));
        }
        let frac = frac.trim_end_matches('0');
        let scale = u8::try_from(frac.len()).map_err(|_| bad("has too many decimals"))?;
        // Leading zeros (of the integer part, then of the fraction when the
        // integer part is zero) are not significant.
        let digits = int.bytes().chain(frac.bytes()).skip_while(|b| *b == b'0');
        if digits.clone().count() > 18 {
            return Err(bad("has more than 18 significant digits"));
        }
        let mut value: i64 = 0;
        for b in digits {
            value = value * 10 + i64::from(b - b'0');
        }
        Ok(Self { value, scale })
    }

    /// Converts a binary float exactly as its shortest decimal representation
    /// (`0.1` becomes `0.1`, not `0.1000000000000000055…`).
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] for NaN, infinities and negatives.
    pub fn from_f64(f: f64) -> Result<Self> {
        if !f.is_finite() {
            return Err(Error::InvalidAmount {
                unit: String::new(),
                message: format!("{f} is not a finite number"),
            });
        }
        if f == 0.0 {
            return Ok(Self::units(0)); // -0.0 included
        }
        if f < 0.0 {
            return Err(Error::InvalidAmount {
                unit: String::new(),
                message: format!("{f} is negative"),
            });
        }
        // `{}` prints the shortest representation that round-trips; never exponent form for f64 Display.
        Self::parse(&format!("{f}"))
    }

    /// The amount in base units of a unit with `decimals` decimals.
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] if it has finer precision than the unit allows,
    /// is negative, or exceeds [`MAX_AMOUNT`].
    pub fn to_base(self, unit: &str, decimals: u8) -> Result<i64> {
        self.base(unit, decimals, false).map(|(b, _)| b)
    }

    /// The amount in base units, rounded **up** to the next whole base unit when
    /// it is finer than the unit allows (`0.0000025` usd → 3 base units, i.e.
    /// `0.000003`); the flag says whether it was rounded. The settlement of a
    /// call that already ran uses it: what was spent is charged, never less.
    ///
    /// # Errors
    /// [`Error::InvalidAmount`] if it is negative or exceeds [`MAX_AMOUNT`] once rounded.
    pub fn to_base_ceil(self, unit: &str, decimals: u8) -> Result<(i64, bool)> {
        self.base(unit, decimals, true)
    }

    fn base(self, unit: &str, decimals: u8, round_up: bool) -> Result<(i64, bool)> {
        let err = |message: String| Error::InvalidAmount {
            unit: unit.to_owned(),
            message,
        };
        if self.value < 0 {
            return Err(err(format!("{self} is negative")));
        }
        let mut rounded = false;
        let base = if self.value == 0 || self.scale == decimals {
            Some(self.value)
        } else if self.scale < decimals {
            pow10(decimals - self.scale).and_then(|m| self.value.checked_mul(m))
        } else {
            // A divisor past 10^18 exceeds every non-zero i64: never divisible.
            match pow10(self.scale - decimals) {
                Some(d) if self.value % d == 0 => Some(self.value / d),
                d if round_up => {
                    rounded = true;
                    // value > 0 here; past 10^18 the quotient is 0, rounded up to 1.
                    Some(d.map_or(0, |d| self.value / d) + 1)
                }
                _ => {
                    return Err(err(format!(
                        "{self} is finer than the unit's {decimals} decimal places"
                    )));
                }
            }
        };
        match base {
            Some(b) if b <= MAX_AMOUNT => Ok((b, rounded)),
            _ => Err(err(format!(
                "{self} exceeds the largest amount (2^53-1 base units = {})",
                format_base(MAX_AMOUNT, decimals)
            ))),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_base(self.value, self.scale))
    }
}

impl From<i64> for Amount {
    fn from(v: i64) -> Self {
        Self::units(v)
    }
}

impl From<i32> for Amount {
    fn from(v: i32) -> Self {
        Self::units(i64::from(v))
    }
}

impl From<u32> for Amount {
    fn from(v: u32) -> Self {
        Self::units(i64::from(v))
    }
}

impl From<u64> for Amount {
    /// Values above `i64::MAX` saturate (and are then rejected as too large).
    fn from(v: u64) -> Self {
        Self::units(i64::try_from(v).unwrap_or(i64::MAX))
    }
}

impl std::str::FromStr for Amount {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// `10^n` for `n ≤ 18`.
fn pow10(n: u8) -> Option<i64> {
    const P: [i64; 19] = [
        1,
        10,
        100,
        1_000,
        10_000,
        100_000,
        1_000_000,
        10_000_000,
        100_000_000,
        1_000_000_000,
        10_000_000_000,
        100_000_000_000,
        1_000_000_000_000,
        10_000_000_000_000,
        100_000_000_000_000,
        1_000_000_000_000_000,
        10_000_000_000_000_000,
        100_000_000_000_000_000,
        1_000_000_000_000_000_000,
    ];
    P.get(usize::from(n)).copied()
}

/// Formats base units of a unit with `decimals` decimals as a decimal string (`12500`, 6 → `0.0125`).
#[must_use]
pub fn format_base(value: i64, decimals: u8) -> String {
    if decimals == 0 {
        return value.to_string();
    }
    // Digit arithmetic on the text, so any scale (up to 255) formats exactly.
    let sign = if value < 0 { "-" } else { "" };
    let width = usize::from(decimals) + 1;
    let digits = format!("{:0width$}", value.unsigned_abs());
    let (int, frac) = digits.split_at(digits.len() - usize::from(decimals));
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// What a request spends: unit name → amount. Units not listed spend nothing,
/// except `requests`, which is 1 unless given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cost {
    pub(crate) items: SmallVec<[(Box<str>, Amount); 2]>,
}

impl Cost {
    /// The default cost: one request, nothing else.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the amount of `unit`.
    #[must_use]
    pub fn with(mut self, unit: &str, amount: impl Into<Amount>) -> Self {
        self.set(unit, amount.into());
        self
    }

    /// Sets the amount of `unit`, replacing any earlier one.
    pub fn set(&mut self, unit: &str, amount: Amount) {
        if let Some(item) = self.items.iter_mut().find(|(u, _)| &**u == unit) {
            item.1 = amount;
        } else {
            self.items.push((unit.into(), amount));
        }
    }

    /// The amount given for `unit`, if any.
    #[must_use]
    pub fn get(&self, unit: &str) -> Option<Amount> {
        self.items
            .iter()
            .find(|(u, _)| &**u == unit)
            .map(|(_, a)| *a)
    }

    /// Iterates over `(unit, amount)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Amount)> {
        self.items.iter().map(|(u, a)| (&**u, *a))
    }

    /// Whether no unit was given (so the cost is one request).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl<'a, A: Into<Amount>> FromIterator<(&'a str, A)> for Cost {
    fn from_iter<T: IntoIterator<Item = (&'a str, A)>>(iter: T) -> Self {
        let mut c = Self::new();
        for (u, a) in iter {
            c.set(u, a.into());
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scale_converts_or_is_refused_without_panicking() {
        for scale in 0..=u8::MAX {
            for value in [0, 1, 7, MAX_AMOUNT, i64::MAX] {
                let a = Amount::decimal(value, scale);
                let text = a.to_string();
                for decimals in [0, 6, 18] {
                    match a.to_base("usd", decimals) {
                        Ok(b) => assert_eq!(
                            Amount::parse(&text)
                                .unwrap()
                                .to_base("usd", decimals)
                                .unwrap(),
                            b,
                            "{text}"
                        ),
                        Err(e) => assert!(matches!(e, Error::InvalidAmount { .. }), "{e}"),
                    }
                }
            }
        }
        assert!(
            Amount::decimal(1, 64)
                .to_base("usd", 6)
                .unwrap_err()
                .to_string()
                .contains("finer than")
        );
        assert_eq!(Amount::decimal(0, 25).to_base("usd", 6).unwrap(), 0);
        assert_eq!(Amount::decimal(10_000_000, 7).to_base("usd", 0).unwrap(), 1);
    }

    #[test]
    fn negative_zero_is_zero_and_messages_name_the_unit_once_known() {
        for z in ["-0", "-0.0", "-00.000", "+0", "0"] {
            assert_eq!(
                Amount::parse(z).unwrap().to_base("usd", 6).unwrap(),
                0,
                "{z}"
            );
        }
        assert_eq!(
            Amount::from_f64(-0.0).unwrap().to_base("usd", 6).unwrap(),
            0
        );
        for bad in ["-", "-.", "-0.1", "-1"] {
            assert!(Amount::parse(bad).is_err(), "{bad}");
        }
        let e = Amount::parse("x").unwrap_err().to_string();
        assert_eq!(e, "invalid amount: `x` is not a plain decimal number");
        let e = Amount::parse("0.0000001")
            .unwrap()
            .to_base("usd", 6)
            .unwrap_err();
        assert!(
            e.to_string().starts_with("invalid amount for unit `usd`: "),
            "{e}"
        );
    }

    #[test]
    fn leading_zeros_are_not_significant() {
        let a = Amount::parse("00000000000000000000.01").unwrap();
        assert_eq!(a.to_base("usd", 6).unwrap(), 10_000);
        let a = Amount::parse("0.000000000000000000000000000001").unwrap();
        assert!(
            a.to_base("usd", 6)
                .unwrap_err()
                .to_string()
                .contains("finer than")
        );
        assert!(Amount::parse("0000123456789012345678").is_ok());
        assert!(
            Amount::parse("1234567890123456789")
                .unwrap_err()
                .to_string()
                .contains("18 significant")
        );
        assert_eq!(
            Amount::parse(&format!("0.{}", "0".repeat(300)))
                .unwrap()
                .to_base("usd", 6)
                .unwrap(),
            0
        );
        assert!(
            Amount::parse(&format!("0.{}1", "0".repeat(300)))
                .unwrap_err()
                .to_string()
                .contains("too many decimals")
        );
    }

    #[test]
    fn rounding_up_charges_the_next_base_unit() {
        let up = |s: &str, d: u8| Amount::parse(s).unwrap().to_base_ceil("usd", d).unwrap();
        assert_eq!(up("0.0000025", 6), (3, true));
        assert_eq!(up("0.000003", 6), (3, false));
        assert_eq!(up("2.5", 0), (3, true));
        assert_eq!(up("0", 0), (0, false));
        assert_eq!(up("0.000000000000000000001", 0), (1, true));
        assert_eq!(
            Amount::decimal(1, 64).to_base_ceil("usd", 0).unwrap(),
            (1, true)
        );
        let max = format!("{MAX_AMOUNT}.5");
        assert!(
            Amount::parse(&max)
                .unwrap()
                .to_base_ceil("t", 0)
                .unwrap_err()
                .to_string()
                .contains("exceeds")
        );
        assert!(Amount::units(-1).to_base_ceil("t", 0).is_err());
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(
            Amount::parse("0.0125").unwrap().to_base("usd", 6).unwrap(),
            12_500
        );
        assert_eq!(
            Amount::from_f64(0.1).unwrap().to_base("usd", 6).unwrap(),
            100_000
        );
        assert_eq!(Amount::parse("3").unwrap().to_base("tokens", 0).unwrap(), 3);
        assert_eq!(
            Amount::parse("3.000")
                .unwrap()
                .to_base("tokens", 0)
                .unwrap(),
            3
        );
        assert!(Amount::parse("0.5").unwrap().to_base("tokens", 0).is_err());
        assert!(Amount::parse("-1").is_err());
        assert!(Amount::parse("1e3").is_err());
        assert!(Amount::parse("").is_err());
        assert!(Amount::from_f64(f64::NAN).is_err());
        assert!(Amount::from_f64(f64::INFINITY).is_err());
        assert!(Amount::from_f64(-0.5).is_err());
        assert!(Amount::units(1 << 53).to_base("requests", 0).is_err());
        assert!(Amount::units(10_000_000_000).to_base("usd", 6).is_err());
        assert_eq!(format_base(12_500, 6), "0.0125");
        assert_eq!(format_base(i64::MIN, 0), "-9223372036854775808");
        assert_eq!(format_base(1, 64), format!("0.{}1", "0".repeat(63)));
        assert_eq!(format_base(i64::MAX, 19), "0.9223372036854775807");
        assert_eq!(format_base(-3_000_000, 6), "-3");
    }
}
