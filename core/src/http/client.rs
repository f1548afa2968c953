//! Who the client of an HTTP request is: the address its default scope
//! (`ip:<address>`) is keyed by, the same in every binding's middleware.
//!
//! - **Proxies** follow Express's `trust proxy` model: the addresses are the
//!   socket peer, then the `X-Forwarded-For` entries from right to left (each
//!   proxy appends the address it saw). Walking from the socket, every address
//!   that is a trusted proxy is skipped; the first one that is not is the
//!   client. Trust is a hop count ([`TrustProxy::Hops`]: the `n` nearest
//!   addresses are proxies) or a list of proxy networks ([`TrustProxy::Proxies`]).
//!   An entry a client forged to the left of what your proxies appended is
//!   never reached. An entry that is not an address (`garbage`, `1.2.3.4:5555`)
//!   is never a key: the walk stops at the last address before it.
//! - **Normalised**: `::ffff:127.0.0.1` is `127.0.0.1`; IPv6 spellings of one
//!   address are one key (`2001:DB8::1` = `2001:db8:0:0::1`); zone ids go.
//! - **IPv6 subnets**: one host can rotate through a whole /64, so an IPv6
//!   client is keyed by its subnet, `/56` by default (as express-rate-limit v8
//!   does): `ip:2001:db8:0:100::/56`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::error::{Error, Result, truncate};

/// The IPv6 prefix length clients are keyed by unless told otherwise.
pub const DEFAULT_IPV6_SUBNET: u8 = 56;

/// Which addresses in front of the server are proxies whose `X-Forwarded-For`
/// entries are believed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TrustProxy {
    /// None: the socket peer is the client; `X-Forwarded-For` is ignored.
    #[default]
    Nobody,
    /// The `n` addresses nearest the server (the socket peer first) are
    /// proxies. `Hops(1)`: one reverse proxy (nginx) in front.
    Hops(u32),
    /// Addresses in these networks are proxies.
    Proxies(Vec<Network>),
}

/// An IP network, `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `10.0.0.0/8`, `::1/128` or a bare address (a network of one).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the entry.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid(
                "trust_proxy",
                format!("`{}` is not {why}", truncate(s.trim())),
            )
        };
        let (a, p) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = normalize(
            a.parse::<IpAddr>()
                .map_err(|_| bad("an IP address or network"))?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(bad("a network: its prefix length is out of range")),
            },
        };
        Ok(Self { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl TrustProxy {
    /// Trusted proxies from a list of networks, addresses, or the names
    /// `loopback`, `linklocal` and `uniquelocal` (Express's shorthands).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the entry that is neither.
    pub fn networks<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut out = Vec::new();
        for e in entries {
            let named: &[&str] = match e.trim() {
                "loopback" => &["127.0.0.0/8", "::1/128"],
                "linklocal" => &["169.254.0.0/16", "fe80::/10"],
                "uniquelocal" => &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"],
                _ => {
                    out.push(Network::parse(e)?);
                    continue;
                }
            };
            for n in named {
                out.push(Network::parse(n)?);
            }
        }
        Ok(Self::Proxies(out))
    }

    /// The setting as the bindings take it (`trustProxy` / `trust_proxy`):
    /// `false` or null → [`TrustProxy::Nobody`]; `true` → one hop (a reverse
    /// proxy in front: **not** "trust every entry", which lets a client forge
    /// its address); a whole number → that many hops; a string of
    /// comma-separated networks, addresses or `loopback` / `linklocal` /
    /// `uniquelocal`, or an array of them → those proxies.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `trust_proxy` and what was wrong.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        use serde_json::Value;
        let bad = |why: String| Error::invalid("trust_proxy", why);
        match v {
            Value::Null | Value::Bool(false) => Ok(Self::Nobody),
            Value::Bool(true) => Ok(Self::Hops(1)),
            Value::Number(n) => n
                .as_u64()
                .and_then(|h| u32::try_from(h).ok())
                .map(Self::Hops)
                .ok_or_else(|| bad(format!("{n} is not a hop count (a whole number from 0)"))),
            Value::String(s) => Self::networks(s.split(',').filter(|e| !e.trim().is_empty())),
            Value::Array(items) => {
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s) => list.push(s.as_str()),
                        other => {
                            return Err(bad(format!("expected networks as strings, got {other}")));
                        }
                    }
                }
                Self::networks(list)
            }
            Value::Object(_) => Err(bad(
                "expected true/false, a hop count, or a list of proxy networks".into(),
            )),
        }
    }

    /// Whether the `i`-th address from the server (0: the socket peer) is a proxy.
    fn trusts(&self, i: usize, ip: Option<IpAddr>) -> bool {
        match self {
            Self::Nobody => false,
            Self::Hops(n) => i < *n as usize,
            // No peer address (a Unix socket): a local hop.
            Self::Proxies(nets) => ip.is_none_or(|ip| nets.iter().any(|n| n.contains(ip))),
        }
    }
}

/// How a middleware finds the client of a request: which proxies to trust
/// and the IPv6 subnet clients are keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    trust: TrustProxy,
    ipv6_subnet: u8,
}

impl Default for ClientIdentity {
    fn default() -> Self {
        Self {
            trust: TrustProxy::Nobody,
            ipv6_subnet: DEFAULT_IPV6_SUBNET,
        }
    }
}

impl ClientIdentity {
    /// Trusting `trust`, keying IPv6 clients by their `/ipv6_subnet` (1–128;
    /// 128 keys each address alone).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a subnet outside 1–128.
    pub fn new(trust: TrustProxy, ipv6_subnet: u8) -> Result<Self> {
        if !(1..=128).contains(&ipv6_subnet) {
            return Err(Error::invalid(
                "ipv6_subnet",
                format!("{ipv6_subnet} is not a prefix length from 1 to 128"),
            ));
        }
        Ok(Self { trust, ipv6_subnet })
    }

    /// The proxies trusted.
    #[must_use]
    pub const fn trust(&self) -> &TrustProxy {
        &self.trust
    }

    /// The client's key: its normalised address (an IPv6 one as its subnet,
    /// `2001:db8:0:100::/56`), or `None` when no address is known (no peer and
    /// nothing trusted to say otherwise).
    #[must_use]
    pub fn address(&self, peer: Option<&str>, forwarded_for: Option<&str>) -> Option<String> {
        let peer = peer.map(str::trim).filter(|p| !p.is_empty());
        let peer_ip = match peer {
            Some(p) => Some(parse_address(p)?),
            None => None,
        };
        let mut client = peer_ip;
        if self.trust != TrustProxy::Nobody && self.trust.trusts(0, peer_ip) {
            // Right to left: the entry the nearest proxy appended first.
            let entries = forwarded_for
                .into_iter()
                .flat_map(|v| v.rsplit(','))
                .map(str::trim)
                .filter(|e| !e.is_empty());
            for (i, entry) in entries.enumerate() {
                // Not an address: never a key; the last address before it is.
                let Some(ip) = parse_address(entry) else {
                    break;
                };
                client = Some(ip);
                if !self.trust.trusts(i + 1, Some(ip)) {
                    break;
                }
            }
        }
        client.map(|ip| self.key(ip))
    }

    /// The default scope of a request: `ip:<address>` (escaped), or
    /// `ip:unknown` when no address is known.
    ///
    /// # Errors
    /// Never for real addresses (kept for the scope's own validation).
    pub fn scope(&self, peer: Option<&str>, forwarded_for: Option<&str>) -> Result<String> {
        let address = self
            .address(peer, forwarded_for)
            .unwrap_or_else(|| "unknown".to_owned());
        crate::Scope::from_segments([("ip", address.as_str())]).map(|s| s.as_str().to_owned())
    }

    fn key(&self, ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) if self.ipv6_subnet >= 128 => v6.to_string(),
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.ipv6_subnet))
                    .unwrap_or(0);
                let net = Ipv6Addr::from(u128::from(v6) & mask);
                format!("{net}/{}", self.ipv6_subnet)
            }
        }
    }
}

/// An IPv4 address as such, never as IPv4-mapped IPv6.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// An address as a socket or a proxy writes it: `1.2.3.4`, `2001:db8::1`,
/// `[2001:db8::1]`, `fe80::1%eth0` (the zone id dropped). Anything else —
/// with a port, a name, garbage — is not an address.
fn parse_address(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let s = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    let s = s.split_once('%').map_or(s, |(a, _)| a);
    if let Ok(v4) = s.parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    s.parse::<Ipv6Addr>()
        .ok()
        .map(|v6| normalize(IpAddr::V6(v6)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(trust: TrustProxy) -> ClientIdentity {
        ClientIdentity::new(trust, DEFAULT_IPV6_SUBNET).unwrap()
    }

    #[test]
    fn without_trust_the_peer_is_the_client() {
        let c = id(TrustProxy::Nobody);
        assert_eq!(
            c.address(Some("10.0.0.1"), Some("1.2.3.4")).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(c.address(None, Some("1.2.3.4")), None);
        assert_eq!(c.scope(None, None).unwrap(), "ip:unknown");
    }

    #[test]
    fn hops_take_the_right_most_untrusted_address() {
        // nginx appends: the client forged the first entry.
        let xff = Some("6.6.6.6, 203.0.113.7");
        let one = id(TrustProxy::Hops(1));
        assert_eq!(
            one.address(Some("10.0.0.1"), xff).as_deref(),
            Some("203.0.113.7")
        );
        let two = id(TrustProxy::Hops(2));
        assert_eq!(
            two.address(Some("10.0.0.1"), xff).as_deref(),
            Some("6.6.6.6")
        );
        // More hops than entries: the furthest address.
        let nine = id(TrustProxy::Hops(9));
        assert_eq!(
            nine.address(Some("10.0.0.1"), xff).as_deref(),
            Some("6.6.6.6")
        );
        assert_eq!(
            one.address(Some("10.0.0.1"), None).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            id(TrustProxy::Hops(0))
                .address(Some("10.0.0.1"), xff)
                .as_deref(),
            Some("10.0.0.1")
        );
    }

    #[test]
    fn networks_skip_trusted_proxies_only() {
        let t = TrustProxy::networks(["loopback", "10.0.0.0/8"]).unwrap();
        let c = id(t);
        let xff = Some("6.6.6.6, 203.0.113.7, 10.1.2.3");
        assert_eq!(
            c.address(Some("127.0.0.1"), xff).as_deref(),
            Some("203.0.113.7")
        );
        // A peer that is not a proxy: it is the client, whatever it says.
        assert_eq!(
            c.address(Some("198.51.100.1"), xff).as_deref(),
            Some("198.51.100.1")
        );
        assert!(TrustProxy::networks(["10.0.0.0/33"]).is_err());
        assert!(
            TrustProxy::networks(["intranet"])
                .unwrap_err()
                .to_string()
                .contains("intranet")
        );
    }

    #[test]
    fn the_bindings_setting() {
        use serde_json::json;
        assert_eq!(
            TrustProxy::from_json(&json!(false)).unwrap(),
            TrustProxy::Nobody
        );
        assert_eq!(
            TrustProxy::from_json(&json!(null)).unwrap(),
            TrustProxy::Nobody
        );
        assert_eq!(
            TrustProxy::from_json(&json!(true)).unwrap(),
            TrustProxy::Hops(1)
        );
        assert_eq!(
            TrustProxy::from_json(&json!(2)).unwrap(),
            TrustProxy::Hops(2)
        );
        assert_eq!(
            TrustProxy::from_json(&json!("loopback, 10.0.0.0/8")).unwrap(),
            TrustProxy::from_json(&json!(["loopback", "10.0.0.0/8"])).unwrap()
        );
        for bad in [json!(-1), json!(1.5), json!("yes"), json!([1]), json!({})] {
            let e = TrustProxy::from_json(&bad).unwrap_err().to_string();
            assert!(e.contains("trust_proxy"), "{bad}: {e}");
        }
    }

    #[test]
    fn entries_that_are_not_addresses_are_never_keys() {
        let c = id(TrustProxy::Hops(1));
        for bad in ["garbage", "1.2.3.4:5555", "unknown", "::1::2", "1.2.3"] {
            assert_eq!(
                c.address(Some("10.0.0.1"), Some(bad)).as_deref(),
                Some("10.0.0.1"),
                "{bad}"
            );
        }
        assert_eq!(c.address(Some("not an address"), None), None);
    }

    #[test]
    fn addresses_are_normalised_and_ipv6_keyed_by_subnet() {
        let c = id(TrustProxy::Nobody);
        assert_eq!(
            c.address(Some("::ffff:127.0.0.1"), None).as_deref(),
            Some("127.0.0.1")
        );
        let a = c.address(Some("2001:DB8:0:1ff:0:0:0:1"), None);
        assert_eq!(a.as_deref(), Some("2001:db8:0:100::/56"));
        assert_eq!(
            c.address(Some("2001:db8:0:1aa::ffff"), None),
            a,
            "one /56, one key"
        );
        assert_eq!(c.address(Some("[2001:db8:0:100::1]"), None), a);
        assert_eq!(
            c.address(Some("fe80::1%eth0"), None).as_deref(),
            Some("fe80::/56")
        );
        let each = ClientIdentity::new(TrustProxy::Nobody, 128).unwrap();
        assert_eq!(
            each.address(Some("2001:db8::0:1"), None).as_deref(),
            Some("2001:db8::1")
        );
        let s64 = ClientIdentity::new(TrustProxy::Nobody, 64).unwrap();
        assert_eq!(
            s64.address(Some("2001:db8:0:1ff::1"), None).as_deref(),
            Some("2001:db8:0:1ff::/64")
        );
        let one = ClientIdentity::new(TrustProxy::Nobody, 1).unwrap();
        assert_eq!(
            one.address(Some("2001:db8::1"), None).as_deref(),
            Some("::/1")
        );
        assert_eq!(
            one.address(Some("fe80::1"), None).as_deref(),
            Some("8000::/1")
        );
        assert!(ClientIdentity::new(TrustProxy::Nobody, 0).is_err());
        assert!(ClientIdentity::new(TrustProxy::Nobody, 129).is_err());
        assert_eq!(
            c.scope(Some("2001:db8::1"), None).unwrap(),
            "ip:2001%3Adb8%3A%3A%2F56"
        );
    }
}
