//! Parsing the scalar fields of a policy — durations, UTC offsets, windows,
//! amounts, percentages, names — each answering what was expected when it
//! fails (the caller adds the path).

#[allow(clippy::wildcard_imports)]
use super::*;

/// Parses a duration like `500ms`, `1s`, `5m`, `1h30m`, `1d`, `2w`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_duration(s: &str) -> std::result::Result<Micros, String> {
    let expected =
        || format!("`{s}` is not a duration (expected e.g. `500ms`, `1s`, `5m`, `1h30m`, `1d`)");
    let t = s.trim();
    if t.is_empty() {
        return Err(expected());
    }
    let mut total: i64 = 0;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 12 {
            return Err(expected());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| expected())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let len = match &rest[..unit_len] {
            "us" => 1,
            "ms" => 1000,
            "s" => SECOND_US,
            "m" => MINUTE_US,
            "h" => HOUR_US,
            "d" => DAY_US,
            "w" => 7 * DAY_US,
            _ => return Err(expected()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(len)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("`{s}` is too long"))?;
    }
    // Every time the Redis scripts handle stays exact in a double.
    if total > MAX_AMOUNT {
        return Err(format!(
            "`{s}` is longer than the longest supported duration (2^53 µs, about 285 years)"
        ));
    }
    Ok(total)
}

pub(super) fn parse_tz(s: &str) -> std::result::Result<Micros, String> {
    if s == "UTC" || s == "Z" {
        return Ok(0);
    }
    let bad = || {
        format!(
            "`{}` is not a UTC offset (expected `UTC`, or ±HH:MM between -12:00 and +14:00, e.g. `+05:30`, `-08:00`)",
            crate::error::truncate(s)
        )
    };
    // Exactly `±HH:MM`: one sign, two digits, a colon, two digits.
    let b = s.as_bytes();
    let two = |i: usize| -> Option<i64> {
        let (x, y) = (*b.get(i)?, *b.get(i + 1)?);
        (x.is_ascii_digit() && y.is_ascii_digit())
            .then(|| i64::from(x - b'0') * 10 + i64::from(y - b'0'))
    };
    let sign = match b.first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(bad()),
    };
    let (Some(h), Some(m)) = (two(1), two(4)) else {
        return Err(bad());
    };
    if b.len() != 6 || b[3] != b':' || m > 59 {
        return Err(bad());
    }
    let offset = sign * (h * HOUR_US + m * MINUTE_US);
    if !(-12 * HOUR_US..=14 * HOUR_US).contains(&offset) {
        return Err(bad());
    }
    Ok(offset)
}

pub(super) fn parse_window(
    per: Option<&str>,
    tz: Micros,
    budget: bool,
) -> std::result::Result<Window, String> {
    let Some(per) = per else {
        return if budget {
            Ok(Window::Lifetime)
        } else {
            Err("a quota needs `per` (e.g. `minute`, `day`, `month`, `15m`)".into())
        };
    };
    Ok(match per {
        "lifetime" if budget => Window::Lifetime,
        "second" => Window::Fixed {
            len: SECOND_US,
            offset: tz,
        },
        "minute" => Window::Fixed {
            len: MINUTE_US,
            offset: tz,
        },
        "hour" => Window::Fixed {
            len: HOUR_US,
            offset: tz,
        },
        "day" => Window::Fixed {
            len: DAY_US,
            offset: tz,
        },
        "week" => Window::Week { offset: tz },
        "month" => Window::Month { offset: tz },
        "year" => Window::Year { offset: tz },
        other => {
            let len = parse_duration(other).map_err(|e| {
                format!(
                    "{e}, or one of second, minute, hour, day, week, month, year{}",
                    if budget { ", lifetime" } else { "" }
                )
            })?;
            if len < SECOND_US {
                return Err(format!("window `{other}` is shorter than one second"));
            }
            Window::Fixed { len, offset: tz }
        }
    })
}

pub(super) fn parse_amount(
    v: &Value,
    unit: &str,
    decimals: u8,
) -> std::result::Result<i64, String> {
    let amount = match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i < 0 {
                    return Err(format!("{i} is negative"));
                }
                Amount::units(i)
            } else if let Some(f) = n.as_f64() {
                Amount::from_f64(f).map_err(|e| e.to_string())?
            } else {
                return Err(format!("{n} is out of range"));
            }
        }
        Value::String(s) => Amount::parse(s).map_err(|e| e.to_string())?,
        other => return Err(format!("expected a number, found {}", kind_of(other))),
    };
    amount.to_base(unit, decimals).map_err(|e| match e {
        Error::InvalidAmount { message, .. } => format!("{message} (unit `{unit}`)"),
        other => other.to_string(),
    })
}

pub(super) fn parse_permille(v: &Value) -> std::result::Result<u16, String> {
    let bad = || format!("expected a percentage like `30%` or a fraction like 0.3, found {v}");
    let permille = match v {
        Value::String(s) => {
            let num = s.trim().strip_suffix('%').ok_or_else(bad)?;
            let a = Amount::parse(num).map_err(|_| bad())?;
            a.to_base("%", 1)
                .map_err(|_| format!("`{s}`: at most one decimal place (0.1%)"))?
        }
        Value::Number(n) => {
            let f = n.as_f64().ok_or_else(bad)?;
            let a = Amount::from_f64(f).map_err(|_| bad())?;
            a.to_base("fraction", 3)
                .map_err(|_| format!("{f}: at most three decimal places (0.1%)"))?
        }
        _ => return Err(bad()),
    };
    if permille > 1000 {
        return Err(format!("{v} is more than 100%"));
    }
    u16::try_from(permille).map_err(|_| bad())
}

pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

pub(super) fn valid_name(s: &str, extra: &[char]) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' || extra.contains(&c)
        })
}

pub(super) fn gcd(mut a: i64, mut b: i64) -> i64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.abs()
}

pub(super) fn valid_unit(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
