//! Provider rate-limit headers (tests/vectors/headers/*.json, one response
//! each: OpenAI, Azure OpenAI, Anthropic, GitHub primary and secondary, the
//! IETF drafts, generic X-RateLimit-*, Retry-After forms, malformed and
//! sentinel values) parse to exactly the expected observation.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;

use ratewarden::upstream::{Observation, parse};
use serde_json::{Value, json};

fn as_json(o: &Observation) -> Value {
    json!({
        "quotas": o.quotas.iter().map(|q| json!({
            "dimension": q.dimension.as_str(),
            "name": q.name,
            "limit": q.limit,
            "remaining": q.remaining,
            "reset_ms": q.reset.map(|d| u64::try_from(d.as_millis()).unwrap()),
        })).collect::<Vec<_>>(),
        "retry_after_ms": o.retry_after.map(|d| u64::try_from(d.as_millis()).unwrap()),
        "warnings": o.warnings.len(),
    })
}

#[test]
fn every_captured_header_set_parses_as_expected() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/headers");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 12, "{files:?}");
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let headers: Vec<(String, String)> = v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_owned(),
                    h[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let o = parse(
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            v["now_us"].as_i64().unwrap(),
        );
        assert_eq!(
            as_json(&o),
            v["expect"],
            "{}: {:?}",
            f.display(),
            o.warnings
        );
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_never_make_up_a_count() {
    let names = [
        "x-ratelimit-remaining-tokens",
        "anthropic-ratelimit-requests-reset",
        "ratelimit",
        "ratelimit-policy",
        "retry-after",
        "x-ratelimit-reset",
    ];
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..20_000 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = usize::try_from(rng % 24).unwrap();
        let value: String = (0..len)
            .map(|i| {
                let b = ((rng >> (i % 56)) & 0x7f) as u8;
                char::from(b.max(b' '))
            })
            .collect();
        let name = names[usize::try_from(rng % 6).unwrap()];
        let o = parse([(name, value.as_str())], 1_764_563_400_000_000);
        for q in &o.quotas {
            assert!(
                q.remaining.is_none_or(|r| r <= 1 << 53),
                "{name}: {value:?} {q:?}"
            );
            assert!(q.limit.is_none_or(|r| r <= 1 << 53));
        }
    }
}
