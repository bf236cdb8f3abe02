//! Concurrent generation streams per API key: a request takes a permit for as long as its
//! stream runs, and one over the key's limit is refused (RESOURCE_EXHAUSTED, HTTP 429)
//! naming it. Requests without a key (a server without keys) are not counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::auth::ClientKey;
use super::status::ServerError;

#[derive(Debug, Default)]
pub struct StreamLimits {
    /// 0: no limit.
    limit: usize,
    running: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// A stream's place under its key's limit, given back when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    key: ClientKey,
    running: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = running.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                running.remove(&self.key);
            }
        }
    }
}

impl StreamLimits {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            running: Arc::default(),
        }
    }

    /// A permit for one more stream of `key`'s (`None`: no key, no limit).
    pub fn acquire(&self, key: Option<ClientKey>) -> Result<Option<StreamPermit>, ServerError> {
        let Some(key) = key.filter(|_| self.limit > 0) else {
            return Ok(None);
        };
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let n = running.entry(key).or_insert(0);
        if *n >= self.limit {
            return Err(ServerError::TooManyStreams { limit: self.limit });
        }
        *n += 1;
        Ok(Some(StreamPermit {
            key,
            running: self.running.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_count_per_key_and_come_back_when_dropped() {
        let limits = StreamLimits::new(2);
        let (a, b) = (Some(ClientKey(0)), Some(ClientKey(1)));
        let p1 = limits.acquire(a).unwrap();
        let _p2 = limits.acquire(a).unwrap();
        let e = limits.acquire(a).unwrap_err();
        assert!(e.to_string().contains('2'), "{e}");
        // Another key has its own count; no key is not counted.
        let _q = limits.acquire(b).unwrap();
        assert!(limits.acquire(None).unwrap().is_none());
        drop(p1);
        assert!(limits.acquire(a).unwrap().is_some());
        // Without a limit nothing is counted.
        assert!(StreamLimits::new(0).acquire(a).unwrap().is_none());
    }
}
