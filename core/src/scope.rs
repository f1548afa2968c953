//! Scopes: who is spending, as a path of `kind:id` segments, most general first
//! (`tenant:acme/user:42/run:7f3a`).
//!
//! Ids are arbitrary user data. A [`Scope`] keeps one canonical *encoded* form in
//! which every byte of an id outside `[A-Za-z0-9._~@+-]` is percent-encoded, so
//! no id can contain a separator (`/`, `:`), a Redis hash-tag brace, a glob `*`
//! or a newline, and two different scopes never share a key. The string syntax
//! accepts `%XX` escapes for such bytes; [`Scope::from_segments`] takes raw ids.

use std::fmt;

use crate::error::{Error, Result, truncate};

/// Most segments a scope may have.
pub const MAX_DEPTH: usize = 8;
/// Longest id (decoded bytes) a segment may have.
pub const MAX_ID_BYTES: usize = 256;
/// Longest kind name a segment may have.
pub const MAX_KIND_BYTES: usize = 32;

/// A validated scope path. Cheap to clone relative to parsing; compare and hash
/// by canonical form.
#[derive(Clone)]
pub struct Scope {
    encoded: String,
    /// End offset (exclusive) of each segment in `encoded`.
    ends: Offsets,
    /// Offset of the `:` of each segment in `encoded`.
    colons: Offsets,
}

impl PartialEq for Scope {
    fn eq(&self, other: &Self) -> bool {
        self.encoded == other.encoded
    }
}

impl Eq for Scope {}

impl std::hash::Hash for Scope {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.encoded.hash(state);
    }
}

/// Up to [`MAX_DEPTH`] byte offsets into a scope's encoded form (fixed array: no
/// inline/heap branch on every access).
#[derive(Clone, Copy, Default)]
struct Offsets {
    len: u8,
    v: [u16; MAX_DEPTH],
}

impl Offsets {
    fn push(&mut self, x: u16) {
        self.v[usize::from(self.len)] = x;
        self.len += 1;
    }
    fn len(&self) -> usize {
        usize::from(self.len)
    }
    fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn truncated(&self, n: usize) -> Self {
        let n = n.min(self.len());
        let mut t = Self {
            len: u8::try_from(n).unwrap_or(0),
            v: [0; MAX_DEPTH],
        };
        t.v[..n].copy_from_slice(&self.v[..n]);
        t
    }
}

impl std::ops::Index<usize> for Offsets {
    type Output = u16;
    fn index(&self, i: usize) -> &u16 {
        &self.v[i]
    }
}

fn scope_err(input: &str, message: impl Into<String>) -> Error {
    Error::InvalidScope {
        input: truncate(input),
        message: message.into(),
    }
}

fn valid_kind(kind: &str) -> std::result::Result<(), String> {
    if kind.is_empty() {
        return Err("a segment has an empty kind (expected `kind:id`)".into());
    }
    if kind.len() > MAX_KIND_BYTES {
        return Err(format!(
            "kind `{}` is longer than {MAX_KIND_BYTES} bytes",
            truncate(kind)
        ));
    }
    let mut chars = kind.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first_ok
        || !kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    {
        return Err(format!(
            "kind `{}` must start with a lowercase letter and contain only a-z, 0-9, `_` and `-`",
            truncate(kind)
        ));
    }
    Ok(())
}

const fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'@' | b'+' | b'-')
}

fn encode_id_into(id: &[u8], out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in id {
        if is_plain(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a raw id from the string syntax (with `%XX` escapes), rejecting
/// reserved characters that must be escaped.
fn decode_raw_id(raw: &str) -> std::result::Result<Vec<u8>, String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_val);
                let lo = bytes.get(i + 2).copied().and_then(hex_val);
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push(h << 4 | l),
                    _ => {
                        return Err(format!(
                            "bad percent-escape at byte {i} of id `{}`",
                            truncate(raw)
                        ));
                    }
                }
                i += 3;
                continue;
            }
            b'{' | b'}' | b'*' | b':' => {
                return Err(format!(
                    "id `{}` contains `{}` at byte {i}; escape it as %{:02X} or use Scope::from_segments",
                    truncate(raw),
                    char::from(b),
                    b
                ));
            }
            _ if b.is_ascii_control() => {
                return Err(format!(
                    "id `{}` contains control character 0x{b:02X} at byte {i}",
                    truncate(raw)
                ));
            }
            _ => out.push(b),
        }
        i += 1;
    }
    Ok(out)
}

impl Scope {
    /// Parses the string syntax `kind:id/kind:id/…`.
    ///
    /// Kinds are `[a-z][a-z0-9_-]*` (≤ 32 bytes). Ids are non-empty, ≤ 256 bytes
    /// once decoded, valid UTF-8; the characters `{ } * : /` and control
    /// characters must be written as `%XX` escapes. At most 8 segments.
    ///
    /// # Errors
    /// [`Error::InvalidScope`] naming the problem and where it is.
    pub fn parse(input: &str) -> Result<Self> {
        if input.is_empty() {
            return Err(scope_err(
                input,
                "scope is empty (expected `kind:id[/kind:id…]`)",
            ));
        }
        if input.len() > MAX_DEPTH * (MAX_KIND_BYTES + 1 + 3 * MAX_ID_BYTES + 1) {
            return Err(scope_err(
                input,
                format!("scope is {} bytes long", input.len()),
            ));
        }
        let mut b = ScopeBuilder::new();
        for (n, seg) in input.split('/').enumerate() {
            if seg.is_empty() {
                return Err(scope_err(
                    input,
                    format!("segment {} is empty (doubled or trailing `/`)", n + 1),
                ));
            }
            let Some((kind, raw)) = seg.split_once(':') else {
                return Err(scope_err(
                    input,
                    format!(
                        "segment {} `{}` has no `:` (expected `kind:id`)",
                        n + 1,
                        truncate(seg)
                    ),
                ));
            };
            let id = decode_raw_id(raw)
                .map_err(|m| scope_err(input, format!("segment {}: {m}", n + 1)))?;
            b.push(kind, &id)
                .map_err(|m| scope_err(input, format!("segment {}: {m}", n + 1)))?;
        }
        Ok(b.finish())
    }

    /// Builds a scope from raw `(kind, id)` pairs; ids may hold any UTF-8 text
    /// (slashes, braces, newlines…): they are encoded, never interpreted.
    ///
    /// # Errors
    /// [`Error::InvalidScope`] for bad kinds, empty/oversized ids or too many segments.
    pub fn from_segments<'a, I>(segments: I) -> Result<Self>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut b = ScopeBuilder::new();
        let mut shown = String::new();
        for (n, (kind, id)) in segments.into_iter().enumerate() {
            if n > 0 {
                shown.push('/');
            }
            shown.push_str(kind);
            shown.push(':');
            shown.push_str(id);
            b.push(kind, id.as_bytes())
                .map_err(|m| scope_err(&shown, format!("segment {}: {m}", n + 1)))?;
        }
        if b.ends.is_empty() {
            return Err(scope_err("", "scope has no segments"));
        }
        Ok(b.finish())
    }

    /// This scope extended by one segment.
    ///
    /// # Errors
    /// [`Error::InvalidScope`] as for [`Scope::from_segments`].
    pub fn child(&self, kind: &str, id: &str) -> Result<Self> {
        let mut b = ScopeBuilder {
            encoded: self.encoded.clone(),
            ends: self.ends,
            colons: self.colons,
        };
        b.push(kind, id.as_bytes())
            .map_err(|m| scope_err(&format!("{self}/{kind}:{id}"), m))?;
        Ok(b.finish())
    }

    /// The canonical encoded form; also a valid input to [`Scope::parse`].
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.encoded
    }

    /// Number of segments (≥ 1).
    #[must_use]
    pub fn depth(&self) -> usize {
        self.ends.len()
    }

    /// The encoded prefix made of the first `n` segments (`1 ≤ n ≤ depth`).
    #[must_use]
    pub fn prefix(&self, n: usize) -> &str {
        let end = n.clamp(1, self.depth());
        &self.encoded[..usize::from(self.ends[end - 1])]
    }

    /// The kind of segment `i` (0-based).
    #[must_use]
    pub fn kind(&self, i: usize) -> &str {
        let start = if i == 0 {
            0
        } else {
            usize::from(self.ends[i - 1]) + 1
        };
        &self.encoded[start..usize::from(self.colons[i])]
    }

    /// The encoded id of segment `i` (0-based).
    #[must_use]
    pub fn encoded_id(&self, i: usize) -> &str {
        &self.encoded[usize::from(self.colons[i]) + 1..usize::from(self.ends[i])]
    }

    /// The decoded (raw) id of segment `i`.
    #[must_use]
    pub fn id(&self, i: usize) -> String {
        let enc = self.encoded_id(i).as_bytes();
        let mut out = Vec::with_capacity(enc.len());
        let mut j = 0;
        while j < enc.len() {
            if enc[j] == b'%' && j + 2 < enc.len() + 1 {
                if let (Some(h), Some(l)) = (
                    enc.get(j + 1).copied().and_then(hex_val),
                    enc.get(j + 2).copied().and_then(hex_val),
                ) {
                    out.push(h << 4 | l);
                    j += 3;
                    continue;
                }
            }
            out.push(enc[j]);
            j += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The scope made of the first `depth` segments (`1 ≤ depth ≤ self.depth()`).
    #[must_use]
    pub fn ancestor(&self, depth: usize) -> Self {
        let d = depth.clamp(1, self.depth());
        Self {
            encoded: self.prefix(d).to_owned(),
            ends: self.ends.truncated(d),
            colons: self.colons.truncated(d),
        }
    }

    /// Index of the first segment of the given kind, if any.
    #[must_use]
    pub fn position_of_kind(&self, kind: &str) -> Option<usize> {
        (0..self.depth()).find(|&i| self.kind(i) == kind)
    }

    /// Whether `self` is a strict ancestor of `other` (a proper prefix by segments).
    #[must_use]
    pub fn is_ancestor_of(&self, other: &Self) -> bool {
        other.depth() > self.depth() && other.prefix(self.depth()) == self.encoded
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encoded)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.encoded)
    }
}

impl std::str::FromStr for Scope {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for Scope {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

struct ScopeBuilder {
    encoded: String,
    ends: Offsets,
    colons: Offsets,
}

impl ScopeBuilder {
    fn new() -> Self {
        Self {
            encoded: String::new(),
            ends: Offsets::default(),
            colons: Offsets::default(),
        }
    }

    fn push(&mut self, kind: &str, id: &[u8]) -> std::result::Result<(), String> {
        if self.ends.len() >= MAX_DEPTH {
            return Err(format!("more than {MAX_DEPTH} segments"));
        }
        valid_kind(kind)?;
        if id.is_empty() {
            return Err(format!("kind `{kind}` has an empty id"));
        }
        if id.len() > MAX_ID_BYTES {
            return Err(format!(
                "id of `{kind}` is {} bytes; at most {MAX_ID_BYTES}",
                id.len()
            ));
        }
        if std::str::from_utf8(id).is_err() {
            return Err(format!("id of `{kind}` is not valid UTF-8"));
        }
        if !self.encoded.is_empty() {
            self.encoded.push('/');
        }
        self.encoded.push_str(kind);
        // Lengths are bounded by MAX_DEPTH * (32 + 1 + 768 + 1) < u16::MAX.
        self.colons
            .push(u16::try_from(self.encoded.len()).unwrap_or(u16::MAX));
        self.encoded.push(':');
        encode_id_into(id, &mut self.encoded);
        self.ends
            .push(u16::try_from(self.encoded.len()).unwrap_or(u16::MAX));
        Ok(())
    }

    fn finish(self) -> Scope {
        Scope {
            encoded: self.encoded,
            ends: self.ends,
            colons: self.colons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_encodes() {
        let s = Scope::parse("tenant:acme/user:bob@x.com/run:7f3a").unwrap();
        assert_eq!(s.depth(), 3);
        assert_eq!(s.kind(1), "user");
        assert_eq!(s.id(1), "bob@x.com");
        assert_eq!(s.prefix(2), "tenant:acme/user:bob@x.com");
        let raw = Scope::from_segments([("tenant", "a/b{c}:*\n")]).unwrap();
        assert_eq!(raw.as_str(), "tenant:a%2Fb%7Bc%7D%3A%2A%0A");
        assert_eq!(raw.id(0), "a/b{c}:*\n");
        assert_eq!(Scope::parse(raw.as_str()).unwrap(), raw);
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            "",
            "tenant",
            "tenant:",
            ":x",
            "Tenant:x",
            "tenant:a/",
            "tenant:a//user:b",
            "tenant:{x}",
            "tenant:a*b",
            "tenant:a\nb",
            "tenant:%zz",
            "tenant:%FF",
            "tenant:a:b",
        ] {
            assert!(
                matches!(Scope::parse(bad), Err(Error::InvalidScope { .. })),
                "{bad:?} accepted"
            );
        }
        let long = format!("tenant:{}", "x".repeat(257));
        assert!(Scope::parse(&long).is_err());
        let deep = ["a:b"; 9].join("/");
        assert!(Scope::parse(&deep).is_err());
    }

    #[test]
    fn ancestors() {
        let a = Scope::parse("tenant:a").unwrap();
        let b = Scope::parse("tenant:a/user:1").unwrap();
        let c = Scope::parse("tenant:ab/user:1").unwrap();
        assert!(a.is_ancestor_of(&b));
        assert!(!a.is_ancestor_of(&c));
        assert!(!b.is_ancestor_of(&a));
        assert!(!a.is_ancestor_of(&a));
    }
}
