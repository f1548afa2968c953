//! Describing a policy for people: the effective-limits table `ratewarden
//! check` prints, and the formatting of durations, windows and percentages.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Policy {
    /// A human-readable table of the effective limits (what `ratewarden check` prints).
    #[must_use]
    pub fn describe(&self) -> String {
        let mut rows: Vec<[String; 7]> = vec![[
            "LIMIT".into(),
            "KIND".into(),
            "COUNTED PER".into(),
            "CAPACITY".into(),
            "WINDOW".into(),
            "UNIT".into(),
            "FLOORS std/bg".into(),
        ]];
        for l in self.limits() {
            let per = match (&l.attach, &l.owner) {
                (Attach::Scope(k), _) => format!("scope {k}"),
                (Attach::Pool, Some(o)) => format!("{} (shared pool)", owner_name(o)),
                (Attach::PerScope(k), Some(o)) => format!("{} per {k}", owner_name(o)),
                (_, None) => "-".into(),
            };
            let (cap, window) = match &l.kind {
                LimitKind::Rate(r) => (
                    format!(
                        "{} (burst {})",
                        l.fmt_amount(l.limit),
                        l.fmt_amount(r.burst)
                    ),
                    format!("per {}", fmt_duration(r.period)),
                ),
                LimitKind::Quota(w) | LimitKind::Budget(w) => {
                    (l.fmt_amount(l.limit), fmt_window(w))
                }
                LimitKind::Concurrency => (
                    format!("{} in flight", l.fmt_amount(l.limit)),
                    format!("lease {}", fmt_duration(l.lease)),
                ),
            };
            let floors = format!(
                "{}/{}",
                fmt_permille(l.floors.standard),
                fmt_permille(l.floors.background)
            );
            rows.push([
                l.name.clone(),
                l.kind.name().into(),
                per,
                cap,
                window,
                l.unit.clone(),
                floors,
            ]);
        }
        let mut widths = [0usize; 7];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let mut line = String::new();
            for (c, w) in r.iter().zip(widths) {
                let _ = write!(line, "{c:<w$}  ");
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        for (name, t) in &self.actions {
            if t.risk > 0 {
                let _ = writeln!(out, "action {name}: {} risk points per call", t.risk);
            }
        }
        out
    }
}

pub(super) fn owner_name(o: &Owner) -> String {
    match o {
        Owner::Resource(r) => format!("resource {r}"),
        Owner::Action(a) => format!("action {a}"),
    }
}

pub(super) fn fmt_permille(p: u16) -> String {
    if p % 10 == 0 {
        format!("{}%", p / 10)
    } else {
        format!("{}.{}%", p / 10, p % 10)
    }
}

/// Formats microseconds as `1h30m`, `250ms`…
#[must_use]
pub fn fmt_duration(us: Micros) -> String {
    if us == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = us;
    for (unit, len) in [
        ("d", DAY_US),
        ("h", HOUR_US),
        ("m", MINUTE_US),
        ("s", SECOND_US),
        ("ms", 1000),
        ("us", 1),
    ] {
        if rest >= len {
            let _ = write!(out, "{}{unit}", rest / len);
            rest %= len;
        }
    }
    out
}

pub(super) fn fmt_window(w: &Window) -> String {
    let tz = |o: i64| {
        if o == 0 {
            String::new()
        } else {
            format!(
                " (UTC{}{})",
                if o < 0 { "-" } else { "+" },
                fmt_duration(o.abs())
            )
        }
    };
    match *w {
        Window::Lifetime => "lifetime".into(),
        Window::Fixed { len, offset } => format!("per {}{}", fmt_duration(len), tz(offset)),
        Window::Week { offset } => format!("per week{}", tz(offset)),
        Window::Month { offset } => format!("per month{}", tz(offset)),
        Window::Year { offset } => format!("per year{}", tz(offset)),
    }
}
