//! SPEC §4 bad input: every case gets a specific error naming the problem and
//! changes nothing.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{now, remaining, warden};
use ratewarden::{
    Amount, Cost, DelegateFrom, Error, ErrorKind, Format, Policy, Request, ReservationId, Scope,
};
use serde_json::json;

fn policy() -> serde_json::Value {
    json!({
        "scopes": {"tenant": {"limits": [
            {"name": "usd", "kind": "budget", "unit": "usd", "limit": "10", "per": "month"},
            {"name": "rps", "kind": "rate", "limit": 10, "per": "1s"}
        ]}, "user": {}},
        "resources": {"github": {"limits": [{"name": "gh", "kind": "quota", "limit": 5000, "per": "hour"}]}},
        "actions": {"send_email": {"risk": 5}}
    })
}

fn untouched(w: &ratewarden::Warden) {
    let d = now(w.check(&Request::parse("tenant:a").unwrap().spend("requests", 0))).unwrap();
    assert_eq!(remaining(&d, "usd"), 10_000_000);
    assert_eq!(remaining(&d, "rps"), 10);
}

#[test]
fn bad_amounts() {
    let (w, _c) = warden(policy());
    let base = || Request::parse("tenant:a").unwrap();
    let cases: Vec<(Request, &str)> = vec![
        (base().spend("usd", Amount::units(-1)), "negative"),
        (
            base().spend("usd", Amount::parse("0.0000001").unwrap()),
            "finer than",
        ),
        (
            base().spend("usd", Amount::units(1 << 40)),
            "exceeds the largest amount",
        ),
        (
            base().spend("requests", Amount::units(1 << 53)),
            "exceeds the largest amount",
        ),
        (
            base().spend("tokens", Amount::parse("0.5").unwrap()),
            "finer than",
        ),
    ];
    for (req, needle) in cases {
        let e = now(w.acquire(&req)).unwrap_err();
        assert!(matches!(e, Error::InvalidAmount { .. }), "{e}");
        assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
        let e = now(w.reserve(&req, None)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }
    for f in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0] {
        let e = Amount::from_f64(f).unwrap_err();
        assert!(matches!(e, Error::InvalidAmount { .. }), "{e}");
    }
    untouched(&w);
}

#[test]
fn unknown_names() {
    let (w, _c) = warden(policy());
    let cases = vec![
        (
            Request::parse("tennant:a").unwrap(),
            "unknown scope kind `tennant`",
        ),
        (
            Request::parse("tenant:a").unwrap().resource("gitlab"),
            "unknown resource `gitlab`",
        ),
        (
            Request::parse("tenant:a").unwrap().action("delete_all"),
            "unknown action `delete_all`",
        ),
        (
            Request::parse("tenant:a").unwrap().spend("eur", 1),
            "unknown unit `eur`",
        ),
    ];
    for (req, needle) in cases {
        let e = now(w.acquire(&req)).unwrap_err();
        assert!(matches!(e, Error::Unknown { .. }), "{e}");
        assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
        assert!(
            e.to_string().contains("the policy defines"),
            "{e} should list what exists"
        );
    }
    untouched(&w);
}

#[test]
fn bad_scopes() {
    let long = format!("tenant:{}", "x".repeat(300));
    let deep = ["tenant:a"; 9].join("/");
    let cases: Vec<(&str, &str)> = vec![
        ("", "empty"),
        ("tenant", "no `:`"),
        ("tenant:", "empty id"),
        (":acme", "empty kind"),
        ("Tenant:acme", "lowercase"),
        ("tenant:a//user:b", "empty"),
        ("tenant:a/", "empty"),
        ("tenant:{acme}", "`{`"),
        ("tenant:ac}me", "`}`"),
        ("tenant:a*", "`*`"),
        ("tenant:a:b", "`:`"),
        ("tenant:a\nb", "control character"),
        ("tenant:%zz", "percent-escape"),
        ("tenant:%FF%FE", "UTF-8"),
        (&long, "at most 256"),
        (&deep, "more than 8"),
    ];
    for (input, needle) in cases {
        let e = Scope::parse(input).unwrap_err();
        assert!(matches!(e, Error::InvalidScope { .. }), "{input:?}: {e}");
        assert!(
            e.to_string().contains(needle),
            "{input:?}: {e} lacks {needle:?}"
        );
    }
    // Raw ids with reserved characters are accepted through from_segments and cannot collide.
    let a = Scope::from_segments([("tenant", "a/user:b")]).unwrap();
    let b = Scope::parse("tenant:a/user:b").unwrap();
    assert_ne!(a, b);
    assert_eq!(a.depth(), 1);
    let (w, _c) = warden(policy());
    assert!(
        now(w.acquire(&Request::new(a).spend("usd", 10)))
            .unwrap()
            .allowed()
    );
    let d = now(w.check(&Request::new(Scope::parse("tenant:a").unwrap()).spend("usd", 1))).unwrap();
    assert!(d.allowed(), "tenant `a/user:b` spent, not tenant `a`");
    assert!(Scope::from_segments([("tenant", "")]).is_err());
    assert!(Scope::from_segments(std::iter::empty::<(&str, &str)>()).is_err());
}

#[test]
fn bad_leases_and_handles() {
    let (w, _c) = warden(policy());
    let req = Request::parse("tenant:a").unwrap().spend("usd", 1);
    assert_eq!(
        now(w.reserve(&req, Some(Duration::ZERO)))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        now(w.reserve(&req, Some(Duration::from_secs(8 * 86_400))))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    let ghost = ReservationId(42);
    assert!(matches!(
        now(w.commit(ghost, &Cost::new())).unwrap_err(),
        Error::ReservationNotFound { .. }
    ));
    assert!(matches!(
        now(w.release(ghost)).unwrap_err(),
        Error::ReservationNotFound { .. }
    ));
    assert!(matches!(
        now(w.extend(ghost, Duration::from_secs(1))).unwrap_err(),
        Error::ReservationNotFound { .. }
    ));
    for bad in [
        "",
        "xyz",
        "0123456789abcdef0123456789abcdeg",
        "0123456789abcdef",
    ] {
        assert!(ReservationId::parse(bad).is_err(), "{bad}");
    }
    let r = now(w.reserve(&req, None)).unwrap().reservation.unwrap();
    assert_eq!(ReservationId::parse(&r.id.to_string()).unwrap(), r.id);
    assert!(now(w.commit(r.id, &Cost::new().with("usd", Amount::units(-5)))).is_err());
    assert!(now(w.commit(r.id, &Cost::new().with("eur", 1))).is_err());
    // The failed commits changed nothing: the reservation still commits normally.
    let rc = now(w.commit(r.id, &Cost::new())).unwrap();
    assert_eq!(
        rc.charges
            .iter()
            .find(|c| c.name() == "usd")
            .unwrap()
            .charged,
        1_000_000
    );
    let a = Scope::parse("tenant:a").unwrap();
    let e = now(w.delegate(
        DelegateFrom::Scope(&a),
        &Scope::parse("tenant:a/user:1").unwrap(),
        &Cost::new(),
        None,
    ))
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn malformed_policies_name_file_path_and_problem() {
    let cases: Vec<(&str, Format, &str, &str)> = vec![
        (
            "scopes: [1, 2",
            Format::Yaml,
            "line 2 column 1",
            "not valid YAML",
        ),
        ("{\"scopes\": ", Format::Json, "line 1", "not valid JSON"),
        ("scopes = 3", Format::Toml, "scopes", "invalid type"),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, limit: 10}\n",
            Format::Yaml,
            "scopes.tenant.limits[0]",
            "needs `per`",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, limit: -3, per: 1s}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].limit",
            "negative",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, limit: 0, per: 1s}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].limit",
            "greater than zero",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: leaky, limit: 3}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].kind",
            "unknown variant `leaky`",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: quota, limit: 3, per: day, burst: 2}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].burst",
            "only applies to rate",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: quota, limit: 3, per: day}\n      - {name: a, kind: quota, limit: 3, per: day}\n",
            Format::Yaml,
            "scopes.tenant.limits[1].name",
            "used twice",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: quota, limit: 3, per: day, floors: {background: 150%}}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].floors.background",
            "more than 100%",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: budget, unit: usd, limit: 0.0000001}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].limit",
            "finer than",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: rate, unit: tokens, limit: 999983, per: 30d}\n",
            Format::Yaml,
            "scopes.tenant.limits[0]",
            "exactly",
        ),
        (
            "scopes:\n  tenant:\n    limits:\n      - {name: a, kind: quota, limit: 3, per: day, tz: Mars/Olympus}\n",
            Format::Yaml,
            "scopes.tenant.limits[0].tz",
            "UTC offset",
        ),
        (
            "resources:\n  gh:\n    limits:\n      - {name: a, kind: quota, limit: 3, per: day, scope: org}\n",
            Format::Yaml,
            "resources.gh.limits[0].scope",
            "not declared",
        ),
        (
            "resources:\n  gh:\n    risk: 3\n",
            Format::Yaml,
            "resources.gh.risk",
            "belong to actions",
        ),
        (
            "version: 2\n",
            Format::Yaml,
            "version",
            "unsupported version",
        ),
        ("", Format::Yaml, "(document)", "empty"),
        (
            "scopes:\n  Tenant: {}\n",
            Format::Yaml,
            "scopes.Tenant",
            "not a valid scope kind",
        ),
    ];
    let mut cases = cases;
    // Malformed UTC offsets name the field; none is read as another offset.
    for tz in [
        "+-5:30", "+05:-30", "--05:00", "-+1:00", "+14:59", "+5:30", "+05:3", "+0530", "05:30",
        "+05:30 ", "-12:30", "+15:00", "+05:60", "+٠٥:30",
    ] {
        cases.push((
            Box::leak(
                format!("scopes:\n  tenant:\n    limits:\n      - {{name: a, kind: quota, limit: 3, per: day, tz: '{tz}'}}\n")
                    .into_boxed_str(),
            ),
            Format::Yaml,
            "scopes.tenant.limits[0].tz",
            "UTC offset",
        ));
    }
    // Windows and periods whose length a double cannot hold exactly in µs.
    for (kind, per) in [
        ("quota", "99999999d"),
        ("budget", "300000w"),
        ("rate", "999999999h"),
    ] {
        cases.push((
            Box::leak(
                format!("scopes:\n  tenant:\n    limits:\n      - {{name: a, kind: {kind}, limit: 3, per: {per}}}\n")
                    .into_boxed_str(),
            ),
            Format::Yaml,
            "scopes.tenant.limits[0].per",
            "longest supported duration",
        ));
    }
    for (text, format, path, needle) in cases {
        let e = Policy::from_str_as(text, format, "policy.test").unwrap_err();
        let s = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Policy, "{s}");
        assert!(s.contains("policy.test"), "{s} lacks the source name");
        assert!(s.contains(path), "{text:?}: `{s}` lacks path {path:?}");
        assert!(s.contains(needle), "{text:?}: `{s}` lacks {needle:?}");
    }
    let e = Policy::from_file("/nonexistent/policy.yaml").unwrap_err();
    assert!(
        matches!(e, Error::PolicyIo { .. }) && e.to_string().contains("/nonexistent/policy.yaml")
    );
    let e = Policy::from_file("policy.ini").unwrap_err();
    assert!(e.to_string().contains(".ini"), "{e}");
}

#[test]
fn ids_are_exactly_32_hex_digits() {
    use ratewarden::OperationId;
    for bad in [
        format!("+{}", "0".repeat(31)),
        format!("-{}", "1".repeat(31)),
        "0".repeat(31),
        "0".repeat(33),
        format!("{}g", "0".repeat(31)),
        String::new(),
    ] {
        let e = ReservationId::parse(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}");
        assert!(e.to_string().contains("reservation id"), "{e}");
        let e = OperationId::parse(&bad).unwrap_err();
        assert!(e.to_string().contains("operation id"), "{e}");
    }
    for good in ["0".repeat(32), "F".repeat(32), "aBcD".repeat(8)] {
        assert_eq!(
            ReservationId::parse(&good).unwrap().to_string(),
            good.to_lowercase()
        );
        assert_eq!(
            OperationId::parse(&good).unwrap().to_string(),
            good.to_lowercase()
        );
    }
}
