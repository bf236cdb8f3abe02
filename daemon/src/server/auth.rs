//! API keys: checked on gRPC (`authorization: Bearer KEY` metadata) and on the HTTP API
//! (`Authorization: Bearer KEY`) alike. Keys are held as SHA-256 digests and a presented
//! key is compared with every one of them in constant time, so neither the comparison
//! nor the number of keys tried leaks through timing. `grpc.health.v1`, reflection and
//! `/health` stay open (load balancers probe them without keys). No keys: every request
//! is let through — which the configuration allows only on loopback addresses.

use std::path::Path;

use sha2::{Digest, Sha256};

/// The accepted keys (none: no check).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<[u8; 32]>);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys, nor their digests.
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

/// Why a key list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the API key file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("an API key must be printable ASCII without spaces, at least 8 characters")]
    Bad,
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<Self, KeyError> {
        let mut out = Vec::new();
        for k in keys {
            let k = k.trim();
            if k.len() < 8 || !k.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(KeyError::Bad);
            }
            out.push(digest(k.as_bytes()));
        }
        Ok(Self(out))
    }

    /// Keys from a file: one per line; blank lines and `#` comments are skipped.
    pub fn read_file(path: &Path) -> Result<Vec<String>, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether an `Authorization` value (`Bearer KEY`) carries an accepted key; always
    /// true without keys.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        self.0.is_empty() || self.identify(authorization).is_some()
    }

    /// Which accepted key an `Authorization` value (`Bearer KEY`) carries, if any.
    pub fn identify(&self, authorization: Option<&[u8]>) -> Option<ClientKey> {
        let value = authorization?;
        let key = match value.get(..7) {
            Some(p) if p.eq_ignore_ascii_case(b"bearer ") => &value[7..],
            _ => return None,
        };
        let d = digest(key.trim_ascii());
        // Every key compared, every byte: no early exit.
        let mut found = usize::MAX;
        for (i, k) in self.0.iter().enumerate() {
            let diff = k.iter().zip(&d).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            let hit = usize::from(diff == 0).wrapping_neg(); // all ones on a match
            found = (found & !hit) | (i & hit);
        }
        (found != usize::MAX).then_some(ClientKey(found))
    }
}

/// The API key a request was let in with (its index among the accepted keys), carried in
/// the request's extensions for the per-key limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(pub usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked() {
        let keys = ApiKeys::new(["first-key-123", "second-key-456"]).unwrap();
        assert!(keys.allows(Some(b"Bearer first-key-123")));
        assert!(keys.allows(Some(b"bearer second-key-456")));
        assert!(!keys.allows(Some(b"Bearer first-key-12")));
        assert!(!keys.allows(Some(b"first-key-123")));
        assert!(!keys.allows(Some(b"Basic Zmlyc3Q=")));
        assert!(!keys.allows(None));
        assert!(!keys.allows(Some(b"")));
        let open = ApiKeys::default();
        assert!(open.allows(None) && open.is_empty());
        assert!(ApiKeys::new(["short"]).is_err());
        assert!(ApiKeys::new(["has a space"]).is_err());
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
        assert_eq!(
            keys.identify(Some(b"Bearer second-key-456")),
            Some(ClientKey(1))
        );
        assert_eq!(
            keys.identify(Some(b"Bearer first-key-123")),
            Some(ClientKey(0))
        );
        assert_eq!(keys.identify(Some(b"Bearer nobody-at-all")), None);
    }
}
