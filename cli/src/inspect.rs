//! `ratewarden inspect --backend URL [SCOPE]`: the live state a Redis backend
//! holds under a scope — counters, rate debts, leases, grants, reservations.

use ratewarden::Scope;
use ratewarden::backend::{KeyState, RedisBackend};

/// Options of `ratewarden inspect`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The shared backend.
    #[command(flatten)]
    pub store: crate::BackendArgs,
    /// Scope prefix to show (`tenant:acme`); everything if omitted.
    pub scope: Option<String>,
}

/// Prints the state.
///
/// # Errors
/// A malformed scope or an unreachable backend.
pub fn run(args: &Args) -> ratewarden::Result<()> {
    let scope = args.scope.as_deref().map(Scope::parse).transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ratewarden::Error::Backend {
            message: format!("cannot start a runtime: {e}"),
        })?;
    let keys = rt.block_on(async {
        let backend = RedisBackend::connect(&args.store.backend, &args.store.namespace).await?;
        backend.inspect(scope.as_ref()).await
    })?;
    let now_us = ratewarden::Clock::now(&ratewarden::SystemClock);
    if keys.is_empty() {
        println!(
            "nothing stored under {}",
            args.scope.as_deref().unwrap_or("this namespace")
        );
    }
    for k in &keys {
        print!("{}", render(k, now_us));
    }
    Ok(())
}

fn render(k: &KeyState, now_us: i64) -> String {
    use std::fmt::Write as _;
    let field = |name: &str| {
        k.fields
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = format!("{:<12} {}", k.what, k.key);
    match k.what {
        "counter" => {
            let _ = write!(
                out,
                "  used {} (window {})",
                field("u").unwrap_or("0"),
                field("w").unwrap_or("-")
            );
        }
        "rate" => {
            let _ = write!(
                out,
                "  debt {} at {}",
                field("d").unwrap_or("0"),
                field("t").unwrap_or("-")
            );
        }
        "reservation" => {
            let state = match field("st") {
                Some("a") => "active",
                Some("c") => "committed",
                Some("r") => "released",
                _ => "?",
            };
            let exp: i64 = field("exp").and_then(|v| v.parse().ok()).unwrap_or(0);
            let _ = write!(
                out,
                "  {state}, scope {}, lease {}",
                field("scope").unwrap_or("?"),
                left(exp, now_us)
            );
        }
        "grant" => {
            let exp: i64 = field("e").and_then(|v| v.parse().ok()).unwrap_or(0);
            let _ = write!(
                out,
                "  delegation {}, {}",
                field("d").unwrap_or("?"),
                left(exp, now_us)
            );
        }
        _ => {}
    }
    if let Some(ttl) = k.ttl_ms {
        let _ = write!(out, "  (key expires in {:.1} s)", ttl as f64 / 1000.0);
    }
    out.push('\n');
    for (id, amount, exp) in &k.holds {
        let _ = writeln!(
            out,
            "  {:<10} lease {id}: holds {amount}, {}",
            "",
            left(*exp, now_us)
        );
    }
    out
}

fn left(expires_us: i64, now_us: i64) -> String {
    let d = expires_us - now_us;
    if d <= 0 {
        "expired".to_owned()
    } else {
        format!("expires in {:.1} s", d as f64 / 1e6)
    }
}
