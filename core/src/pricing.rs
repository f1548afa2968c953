//! Pricing: what a call costs, computed from what it uses.
//!
//! A resource's `pricing:` in the policy gives its prices — per million
//! input, cached-input and output tokens, per image, per second of audio or
//! video, per call — in one money unit, optionally as a history of price
//! lists with the date each took effect. A caller then passes a [`Usage`]
//! (`1 200` input tokens, at most `800` output tokens) instead of money:
//! [`Pricing::price`] turns it into a [`Cost`] in every unit the limits may
//! count — the money unit, `tokens`, and `input_tokens` / `output_tokens`
//! where the policy knows those units — so a budget in dollars and a quota in
//! tokens are charged in one atomic decision.
//!
//! The arithmetic is exact: prices are decimals as written (`2.50`,
//! `0.075`), every line of the bill is summed as an exact fraction, and the
//! total is rounded **up** once, to the money unit's base unit (a micro-dollar
//! for `usd`): what a call costs is never under-charged, and never by more
//! than one base unit over. A bill over the largest amount (2^53 − 1 base
//! units) is an error, never a wrapped or saturated number.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;

use crate::amount::{Amount, Cost, MAX_AMOUNT, format_base};
use crate::clock::Micros;
use crate::error::{Error, Result};

/// Finest decimal a price may have (`0.000000000001`): bills stay exact in
/// 128-bit arithmetic.
pub const MAX_PRICE_DECIMALS: u8 = 12;

/// What a call uses (or, for an estimate, may use). Counts are whole
/// numbers; `seconds` may have up to three decimals (milliseconds).
///
/// `input_tokens` counts **every** input token, cached ones included (as
/// OpenAI's `prompt_tokens` does); `cached_input_tokens` says how many of
/// them were read from the provider's cache and are priced at
/// `cached_input`. (Anthropic reports cache reads apart from
/// `input_tokens`: add them.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Input (prompt) tokens, cached ones included.
    pub input_tokens: u64,
    /// How many of the input tokens were cached (at most `input_tokens`).
    pub cached_input_tokens: u64,
    /// Output (completion) tokens the call produced.
    pub output_tokens: u64,
    /// The most output tokens the call may produce (`max_tokens` of the
    /// request): an estimate prices this instead of `output_tokens`.
    pub max_output_tokens: Option<u64>,
    /// Images generated or read.
    pub images: u64,
    /// Seconds of audio or video (up to three decimals).
    pub seconds: Option<Amount>,
    /// Calls; one when unsaid (the `call` price, and the `requests` unit).
    pub calls: Option<u64>,
}

impl Usage {
    /// Input and output tokens: `input_tokens` and `output_tokens`.
    #[must_use]
    pub fn tokens(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            ..Self::default()
        }
    }

    /// Sets the most output tokens the call may produce.
    #[must_use]
    pub fn max_output(mut self, max_output_tokens: u64) -> Self {
        self.max_output_tokens = Some(max_output_tokens);
        self
    }

    /// Sets how many of the input tokens were cached.
    #[must_use]
    pub fn cached(mut self, cached_input_tokens: u64) -> Self {
        self.cached_input_tokens = cached_input_tokens;
        self
    }

    /// The names a usage has, as bindings take them (`{input_tokens: 1200,
    /// max_output_tokens: 800}`).
    pub const FIELDS: [&'static str; 7] = [
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "max_output_tokens",
        "images",
        "seconds",
        "calls",
    ];

    /// A usage from named fields, as every binding takes it: the names of
    /// [`Usage::FIELDS`], counts whole, `seconds` to milliseconds; then
    /// [`Usage::validate`]d.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field: unknown, given twice, not
    /// a whole number, or out of range.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, Amount)>) -> Result<Self> {
        let bad = |message: String| Error::InvalidArgument {
            what: "usage",
            message,
        };
        let mut u = Self::default();
        let mut seen = [false; 7];
        for (name, amount) in fields {
            let Some(i) = Self::FIELDS.iter().position(|f| *f == name) else {
                return Err(bad(format!(
                    "unknown field `{}` (expected {})",
                    crate::error::truncate(name),
                    Self::FIELDS.join(", ")
                )));
            };
            if std::mem::replace(&mut seen[i], true) {
                return Err(bad(format!("`{name}` is given twice")));
            }
            if name == "seconds" {
                u.seconds = Some(amount);
                continue;
            }
            let (v, scale) = amount.parts();
            let n = if scale == 0 && v >= 0 {
                v.unsigned_abs()
            } else {
                return Err(bad(format!(
                    "`{name}` {amount} is not a whole non-negative number"
                )));
            };
            match i {
                0 => u.input_tokens = n,
                1 => u.cached_input_tokens = n,
                2 => u.output_tokens = n,
                3 => u.max_output_tokens = Some(n),
                4 => u.images = n,
                _ => u.calls = Some(n),
            }
        }
        u.validate()?;
        Ok(u)
    }

    /// The output tokens an estimate prices: `max_output_tokens` when given,
    /// else `output_tokens`.
    #[must_use]
    pub fn estimated_output(&self) -> u64 {
        self.max_output_tokens.unwrap_or(self.output_tokens)
    }

    /// Checks every count is within the largest amount, the cached tokens
    /// within the input tokens, and the seconds to milliseconds.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the field and the problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: String| Error::InvalidArgument {
            what: "usage",
            message,
        };
        let counts = [
            ("input_tokens", Some(self.input_tokens)),
            ("cached_input_tokens", Some(self.cached_input_tokens)),
            ("output_tokens", Some(self.output_tokens)),
            ("max_output_tokens", self.max_output_tokens),
            ("images", Some(self.images)),
            ("calls", self.calls),
        ];
        for (name, v) in counts {
            if let Some(v) = v {
                if v > MAX_AMOUNT.unsigned_abs() {
                    return Err(bad(format!(
                        "`{name}` {v} exceeds the largest amount (2^53-1)"
                    )));
                }
            }
        }
        if self.cached_input_tokens > self.input_tokens {
            return Err(bad(format!(
                "`cached_input_tokens` {} exceeds `input_tokens` {} (input tokens count the cached ones too)",
                self.cached_input_tokens, self.input_tokens
            )));
        }
        if self.input_tokens + self.estimated_output().max(self.output_tokens)
            > MAX_AMOUNT.unsigned_abs()
        {
            return Err(bad(
                "input and output tokens together exceed the largest amount (2^53-1)".into(),
            ));
        }
        if let Some(s) = self.seconds {
            s.to_base("seconds", 3).map_err(|_| {
                bad(format!(
                    "`seconds` {s} must be at most 2^53-1 milliseconds, with at most 3 decimals"
                ))
            })?;
        }
        Ok(())
    }
}

/// One price list, as the policy gives it. Prices are decimals of the money
/// `unit`: per million tokens for `input`, `cached_input` and `output`; per
/// image, per second and per call for the others. A price left out is zero,
/// except `cached_input`, which is `input` when left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prices {
    /// When it took effect (µs since the epoch); `None`: always.
    pub from: Option<Micros>,
    /// The money unit.
    pub unit: Box<str>,
    /// The money unit's decimals (its base unit is `10^-decimals`).
    pub decimals: u8,
    /// Per million input tokens.
    pub input: Amount,
    /// Per million cached input tokens (`input` when `None`).
    pub cached_input: Option<Amount>,
    /// Per million output tokens.
    pub output: Amount,
    /// Per image.
    pub image: Amount,
    /// Per second.
    pub second: Amount,
    /// Per call.
    pub call: Amount,
}

impl Prices {
    /// The bill for `usage`, pricing `output` output tokens, in base units of
    /// the money unit, rounded up once.
    fn bill(&self, usage: &Usage, output: u64) -> Result<i64> {
        let cached = usage.cached_input_tokens;
        let fresh = usage.input_tokens - cached;
        let millis = match usage.seconds {
            Some(s) => s.to_base("seconds", 3)?.unsigned_abs(),
            None => 0,
        };
        // (quantity, price, quantity units per priced unit)
        let lines: [(u64, Amount, u64); 6] = [
            (fresh, self.input, 1_000_000),
            (cached, self.cached_input.unwrap_or(self.input), 1_000_000),
            (output, self.output, 1_000_000),
            (usage.images, self.image, 1),
            (millis, self.second, 1_000),
            (usage.calls.unwrap_or(1), self.call, 1),
        ];
        let too_large = || Error::InvalidArgument {
            what: "usage",
            message: format!(
                "its price exceeds the largest amount (2^53-1 base units = {} {})",
                format_base(MAX_AMOUNT, self.decimals),
                self.unit
            ),
        };
        // Each line is q × v × 10^decimals / (10^scale × per) base units: its
        // whole part is added at once, its remainder kept as a fraction over
        // the common denominator 10^MAX_PRICE_DECIMALS × 10^6 and rounded up
        // with the others at the end.
        // Denominators are at most 10^12 × 10^6 and every remainder below
        // its denominator, so the remainders' sum fits a u64; a numerator
        // takes 128 bits only when it must.
        let unit_scale = 10u64.pow(u32::from(self.decimals));
        let common: u64 = 10u64.pow(u32::from(MAX_PRICE_DECIMALS)) * 1_000_000;
        let mut whole: u128 = 0;
        let mut rest: u64 = 0;
        for (q, price, per) in lines {
            let (v, scale) = price.parts();
            if q == 0 || v == 0 {
                continue;
            }
            let denominator = 10u64.pow(u32::from(scale)) * per;
            let (quotient, remainder) = match q
                .checked_mul(v.unsigned_abs())
                .and_then(|n| n.checked_mul(unit_scale))
            {
                Some(n) => (u128::from(n / denominator), n % denominator),
                None => {
                    let n = u128::from(q)
                        .checked_mul(v.unsigned_abs().into())
                        .and_then(|n| n.checked_mul(unit_scale.into()))
                        .ok_or_else(too_large)?;
                    let d = u128::from(denominator);
                    // The remainder is below the denominator: it fits.
                    (n / d, u64::try_from(n % d).unwrap_or(0))
                }
            };
            whole = whole.checked_add(quotient).ok_or_else(too_large)?;
            rest += remainder * (common / denominator);
        }
        let total = whole + u128::from(rest.div_ceil(common));
        i64::try_from(total)
            .ok()
            .filter(|t| *t <= MAX_AMOUNT)
            .ok_or_else(too_large)
    }
}

/// `shrink:` of a priced resource: a request by usage whose
/// `max_output_tokens` the budget cannot cover is allowed with caps instead
/// of denied — `caps.max_tokens` the most output tokens that fit what is left
/// (its money, `tokens` and `output_tokens` limits, at this caller's
/// priority), when that is at least `min_output_tokens`. When even that
/// does not fit, the `fallback` models are tried in order (the same usage,
/// priced and shrunk on each): the first that fits is allowed with
/// `caps.model` naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shrink {
    /// The smallest output worth a call; below it the request is denied.
    pub min_output_tokens: u64,
    /// Cheaper resources (models) to fall back to, in order; each is a
    /// priced resource of the policy.
    pub fallback: Arc<[Arc<str>]>,
}

/// A resource's prices: one list, or a history of lists by the date each
/// took effect (sorted, earliest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    versions: Vec<Prices>,
}

/// What a usage costs: the priced amount and the tokens it counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    /// The money unit.
    pub unit: Box<str>,
    /// Its decimals.
    pub decimals: u8,
    /// The bill, base units of `unit` (rounded up once).
    pub amount: i64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens priced (the estimate's `max_output_tokens`, or the actual ones).
    pub output_tokens: u64,
    /// Calls, when the usage said.
    pub calls: Option<u64>,
    /// When the price list used took effect (`None`: always).
    pub list_from: Option<Micros>,
}

impl Priced {
    /// The bill as an exact decimal of the money unit.
    #[must_use]
    pub fn money(&self) -> Amount {
        Amount::decimal(self.amount, self.decimals)
    }

    /// The cost to charge: the money unit, `tokens` (input plus output), and
    /// `input_tokens` / `output_tokens` / `requests` (the calls, when given)
    /// where `known` says the policy counts that unit.
    #[must_use]
    pub fn cost(&self, known: impl Fn(&str) -> bool) -> Cost {
        let mut cost = Cost::new();
        cost.set(&self.unit, self.money());
        cost.set(
            "tokens",
            Amount::from(self.input_tokens + self.output_tokens),
        );
        if known("input_tokens") {
            cost.set("input_tokens", Amount::from(self.input_tokens));
        }
        if known("output_tokens") {
            cost.set("output_tokens", Amount::from(self.output_tokens));
        }
        if let Some(calls) = self.calls {
            cost.set("requests", Amount::from(calls));
        }
        cost
    }
}

impl fmt::Display for Priced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} for {} input and {} output tokens",
            format_base(self.amount, self.decimals),
            self.unit,
            self.input_tokens,
            self.output_tokens
        )
    }
}

impl Pricing {
    /// A pricing from its lists (any order; at most one without `from`,
    /// which then applies before every dated one).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no list, two lists from the same date,
    /// or lists in different money units.
    pub fn new(mut versions: Vec<Prices>) -> Result<Self> {
        let bad = |message: &str| Error::InvalidArgument {
            what: "pricing",
            message: message.to_owned(),
        };
        if versions.is_empty() {
            return Err(bad("has no price list"));
        }
        for p in &versions {
            let prices = [
                p.input,
                p.cached_input.unwrap_or(p.input),
                p.output,
                p.image,
                p.second,
                p.call,
            ];
            if prices.iter().any(|a| {
                let (v, scale) = a.parts();
                !(0..=MAX_AMOUNT).contains(&v) || scale > MAX_PRICE_DECIMALS
            }) {
                return Err(bad(&format!(
                    "has a price that is negative, over 2^53-1 or finer than {MAX_PRICE_DECIMALS} decimals"
                )));
            }
            if p.decimals > 9 {
                return Err(bad("has a unit with more than 9 decimals"));
            }
        }
        versions.sort_by_key(|p| p.from.unwrap_or(Micros::MIN));
        for w in versions.windows(2) {
            if w[0].from == w[1].from {
                return Err(bad("has two price lists taking effect at the same time"));
            }
            if w[0].unit != w[1].unit {
                return Err(bad("has price lists in different units"));
            }
        }
        Ok(Self { versions })
    }

    /// Every price list, earliest first.
    #[must_use]
    pub fn versions(&self) -> &[Prices] {
        &self.versions
    }

    /// The money unit.
    #[must_use]
    pub fn unit(&self) -> &str {
        &self.versions[0].unit
    }

    /// The list in effect at `now`: the latest that took effect by then.
    #[must_use]
    pub fn at(&self, now: Micros) -> Option<&Prices> {
        self.versions
            .iter()
            .rev()
            .find(|p| p.from.is_none_or(|f| f <= now))
    }

    /// The bill alone, base units of [`Pricing::unit`] (as
    /// [`Pricing::price`], without building its receipt).
    ///
    /// # Errors
    /// As [`Pricing::price`].
    pub fn amount(&self, usage: &Usage, now: Micros, estimate: bool) -> Result<i64> {
        self.bill_at(usage, now, estimate)
            .map(|(_, _, amount)| amount)
    }

    /// The list in effect, the output tokens priced and the bill.
    fn bill_at(&self, usage: &Usage, now: Micros, estimate: bool) -> Result<(&Prices, u64, i64)> {
        usage.validate()?;
        let prices = self.at(now).ok_or_else(|| self.not_yet())?;
        let output = if estimate {
            usage.estimated_output()
        } else {
            usage.output_tokens
        };
        Ok((prices, output, prices.bill(usage, output)?))
    }

    fn not_yet(&self) -> Error {
        Error::InvalidArgument {
            what: "usage",
            message: format!(
                "no price list is in effect yet (the first takes effect at {} µs since the epoch)",
                self.versions[0].from.unwrap_or_default()
            ),
        }
    }

    /// Prices `usage` at `now`: an estimate (`estimate = true`) prices
    /// `max_output_tokens` when given, the actual bill prices
    /// `output_tokens`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for invalid usage, no price list in effect
    /// yet, or a bill over the largest amount.
    pub fn price(&self, usage: &Usage, now: Micros, estimate: bool) -> Result<Priced> {
        let (prices, output, amount) = self.bill_at(usage, now, estimate)?;
        Ok(Priced {
            unit: prices.unit.clone(),
            decimals: prices.decimals,
            amount,
            input_tokens: usage.input_tokens,
            output_tokens: output,
            calls: usage.calls,
            list_from: prices.from,
        })
    }

    /// The most output tokens a call with `usage`'s input can produce for at
    /// most `budget` base units of the money unit at `now` (`None`: even
    /// none, i.e. the input alone costs more; `Some(u64::MAX)`: output is
    /// free).
    #[must_use]
    pub fn max_output_within(&self, usage: &Usage, budget: i64, now: Micros) -> Option<u64> {
        let prices = self.at(now)?;
        let base = Usage {
            output_tokens: 0,
            max_output_tokens: None,
            ..usage.clone()
        };
        if prices.bill(&base, 0).ok()? > budget {
            return None;
        }
        if prices.output.parts().0 == 0 {
            return Some(u64::MAX);
        }
        // The bill grows with the output: the largest output within budget,
        // by bisection over exact bills (≤ 54 steps).
        let (mut lo, mut hi) = (0u64, MAX_AMOUNT.unsigned_abs() - usage.input_tokens);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            match prices.bill(&base, mid) {
                Ok(b) if b <= budget => lo = mid,
                _ => hi = mid - 1,
            }
        }
        Some(lo)
    }
}

/// Reads a price: a non-negative decimal (number or string) with at most
/// [`MAX_PRICE_DECIMALS`] decimals.
pub(crate) fn read_price(v: &Value) -> std::result::Result<Amount, String> {
    let a = match v {
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => Amount::from(u),
            (None, Some(f)) => Amount::from_f64(f).map_err(|e| e.to_string())?,
            _ => return Err(format!("{n} is out of range")),
        },
        Value::String(s) => Amount::parse(s).map_err(|e| e.to_string())?,
        _ => return Err("expected a price (a non-negative decimal number)".into()),
    };
    if a.parts().1 > MAX_PRICE_DECIMALS {
        return Err(format!("{a} has more than {MAX_PRICE_DECIMALS} decimals"));
    }
    if a.parts().0 > MAX_AMOUNT {
        return Err(format!("{a} exceeds the largest price"));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(input: &str, output: &str) -> Prices {
        Prices {
            from: None,
            unit: "usd".into(),
            decimals: 6,
            input: Amount::parse(input).unwrap(),
            cached_input: None,
            output: Amount::parse(output).unwrap(),
            image: Amount::units(0),
            second: Amount::units(0),
            call: Amount::units(0),
        }
    }

    #[test]
    fn bills_round_up_once() {
        let p = Pricing::new(vec![list("0.15", "0.60")]).unwrap();
        // 1 input token of $0.15/M = $0.00000015: one micro-dollar.
        let one = p.price(&Usage::tokens(1, 0), 0, false).unwrap();
        assert_eq!(one.amount, 1);
        // 1 + 1 tokens = $0.00000075: still one micro-dollar (rounded once, not per line).
        assert_eq!(p.price(&Usage::tokens(1, 1), 0, false).unwrap().amount, 1);
        // 1200 in, 800 out: 180 + 480 µ$.
        assert_eq!(
            p.price(&Usage::tokens(1200, 800), 0, false).unwrap().amount,
            660
        );
    }

    #[test]
    fn max_output_within_is_the_largest_that_fits() {
        let p = Pricing::new(vec![list("2.50", "10")]).unwrap();
        let u = Usage::tokens(1000, 0);
        // input: 2 500 µ$; each output token 10 µ$.
        assert_eq!(p.max_output_within(&u, 2_499, 0), None);
        assert_eq!(p.max_output_within(&u, 2_500, 0), Some(0));
        assert_eq!(p.max_output_within(&u, 2_509, 0), Some(0));
        assert_eq!(p.max_output_within(&u, 2_510, 0), Some(1));
        assert_eq!(p.max_output_within(&u, 12_500, 0), Some(1000));
    }
}
