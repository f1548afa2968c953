//! Calendar-aligned quota and budget windows.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden_at};
use ratewarden::calendar::{DAY_US, HOUR_US, MINUTE_US, days_from_civil};
use ratewarden::{ManualClock, Request};
use serde_json::json;

fn at(y: i64, m: u32, d: u32, h: i64, min: i64) -> ManualClock {
    ManualClock::new(days_from_civil(y, m, d) * DAY_US + h * HOUR_US + min * MINUTE_US)
}

fn quota(per: &str, limit: i64) -> serde_json::Value {
    json!({"scopes": {"tenant": {"limits": [
        {"name": "q", "kind": "quota", "limit": limit, "per": per}
    ]}}})
}

fn drain(w: &ratewarden::Warden, req: &Request) -> usize {
    let mut n = 0;
    while now(w.acquire(req)).unwrap().allowed() {
        n += 1;
        assert!(n < 10_000);
    }
    n
}

#[test]
fn month_rolls_over_at_the_calendar_boundary() {
    let (w, clock) = warden_at(quota("month", 3), at(2026, 1, 31, 23, 59));
    let req = Request::parse("tenant:a").unwrap();
    assert_eq!(drain(&w, &req), 3);
    let d = now(w.acquire(&req)).unwrap();
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(60)),
        "exact: until Feb 1 00:00"
    );
    assert_eq!(d.limits[0].reset, Duration::from_secs(60));
    clock.advance(Duration::from_secs(59));
    assert!(!now(w.acquire(&req)).unwrap().allowed());
    clock.advance(Duration::from_secs(1));
    assert_eq!(drain(&w, &req), 3, "February is a new window");
    // February 2026 has 28 days: the next reset is March 1.
    let d = now(w.check(&req)).unwrap();
    assert_eq!(d.limits[0].reset, Duration::from_secs(28 * 86_400));
}

#[test]
fn leap_day_belongs_to_february_and_day_windows_roll_at_midnight() {
    let (w, clock) = warden_at(quota("day", 2), at(2028, 2, 28, 23, 0));
    let req = Request::parse("tenant:a").unwrap();
    assert_eq!(drain(&w, &req), 2);
    clock.advance(Duration::from_secs(3600)); // 2028-02-29 00:00
    assert_eq!(drain(&w, &req), 2);
    let (wm, clock_m) = warden_at(quota("month", 1), at(2028, 2, 29, 12, 0));
    assert_eq!(drain(&wm, &req), 1);
    let d = now(wm.check(&req)).unwrap();
    assert_eq!(
        d.retry_after,
        Some(Duration::from_secs(12 * 3600)),
        "leap day to March 1"
    );
    clock_m.advance(Duration::from_secs(12 * 3600));
    assert_eq!(drain(&wm, &req), 1);
}

#[test]
fn weeks_start_on_monday_and_years_on_january_first() {
    // 2026-01-15 is a Thursday; the week ends Monday 2026-01-19 00:00.
    let (w, _c) = warden_at(quota("week", 1), at(2026, 1, 15, 0, 0));
    let req = Request::parse("tenant:a").unwrap();
    assert_eq!(drain(&w, &req), 1);
    assert_eq!(
        now(w.check(&req)).unwrap().retry_after,
        Some(Duration::from_secs(4 * 86_400))
    );
    let (wy, _c) = warden_at(quota("year", 1), at(2026, 12, 31, 23, 0));
    assert_eq!(drain(&wy, &req), 1);
    assert_eq!(
        now(wy.check(&req)).unwrap().retry_after,
        Some(Duration::from_secs(3600))
    );
}

#[test]
fn timezone_offsets_shift_the_boundary() {
    let policy = json!({"scopes": {"tenant": {"limits": [
        {"name": "q", "kind": "quota", "limit": 1, "per": "day", "tz": "+05:30"}
    ]}}});
    // 18:00 UTC is 23:30 in +05:30: the local day ends in 30 minutes.
    let (w, _c) = warden_at(policy, at(2026, 3, 10, 18, 0));
    let req = Request::parse("tenant:a").unwrap();
    assert_eq!(drain(&w, &req), 1);
    assert_eq!(
        now(w.check(&req)).unwrap().retry_after,
        Some(Duration::from_secs(1800))
    );
}

#[test]
fn fifteen_minute_windows_are_epoch_aligned_and_budgets_can_be_lifetime() {
    let (w, clock) = warden_at(quota("15m", 2), at(2026, 3, 10, 10, 14));
    let req = Request::parse("tenant:a").unwrap();
    assert_eq!(drain(&w, &req), 2);
    clock.advance(Duration::from_secs(60));
    assert_eq!(drain(&w, &req), 2);
    let (wl, clock) = warden_at(
        json!({"scopes": {"tenant": {"limits": [{"name": "life", "kind": "budget", "unit": "usd", "limit": "1.5"}]}}}),
        at(2026, 3, 10, 10, 0),
    );
    let spend = Request::parse("tenant:a")
        .unwrap()
        .spend("usd", ratewarden::Amount::parse("0.5").unwrap());
    for _ in 0..3 {
        assert!(now(wl.acquire(&spend)).unwrap().allowed());
    }
    clock.advance(Duration::from_secs(400 * 86_400));
    let d = now(wl.acquire(&spend)).unwrap();
    assert!(!d.allowed());
    assert_eq!(d.retry_after, None, "a spent lifetime budget never refills");
    assert_eq!(remaining(&d, "life"), 0);
}

#[test]
fn every_well_formed_offset_is_read_exactly() {
    let cases: [(&str, i64); 8] = [
        ("+14:00", 840),
        ("-12:00", -720),
        ("+05:45", 345),
        ("-03:30", -210),
        ("UTC", 0),
        ("Z", 0),
        ("+00:00", 0),
        ("-00:00", 0),
    ];
    for (tz, offset_min) in cases {
        let (w, _clock) = warden_at(
            json!({"scopes": {"tenant": {"limits": [
                {"name": "q", "kind": "quota", "limit": 1, "per": "day", "tz": tz}
            ]}}}),
            at(2026, 1, 15, 0, 0),
        );
        // At 00:00 UTC the zone's day ends at its next local midnight.
        let d = now(w.acquire(&Request::parse("tenant:a").unwrap())).unwrap();
        let left = (86_400 - offset_min * 60).rem_euclid(86_400);
        let left = if left == 0 { 86_400 } else { left };
        assert_eq!(
            d.limits[0].reset,
            Duration::from_secs(left.unsigned_abs()),
            "{tz}"
        );
    }
}
