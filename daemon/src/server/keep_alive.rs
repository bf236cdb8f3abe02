//! How long an idle model stays loaded, as Ollama's `keep_alive`: a duration (`30s`,
//! `5m`, `1h`, or seconds), `0` (unload when its requests are done) or `-1` (forever).
//! The server has a default (five minutes); a request may set its model's.

use std::time::Duration;

/// How long a model stays loaded once idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepAlive {
    Forever,
    For(Duration),
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self::For(Duration::from_secs(300))
    }
}

impl KeepAlive {
    /// `-1` (or any negative number), `forever`; `0`; `N` seconds; `Ns`, `Nm`, `Nh`
    /// (fractions allowed: `1.5m`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s == "forever" {
            return Some(Self::Forever);
        }
        let (num, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
            Some((i, _)) => (&s[..i], &s[i..]),
            None => (s, "s"),
        };
        let n: f64 = num.trim().parse().ok()?;
        if !n.is_finite() {
            return None;
        }
        if n < 0.0 {
            return Some(Self::Forever);
        }
        let scale = match unit {
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        Some(Self::For(Duration::try_from_secs_f64(n * scale).ok()?))
    }

    /// A JSON value: a number of seconds, or a string [`Self::parse`] reads.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Number(n) => Self::parse(&n.to_string()),
            serde_json::Value::String(s) => Self::parse(s),
            _ => None,
        }
    }

    /// Whether a model idle for `idle` should go.
    pub fn expired(self, idle: Duration) -> bool {
        match self {
            Self::Forever => false,
            Self::For(d) => idle >= d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_ollama_s() {
        let s = |n| Some(KeepAlive::For(Duration::from_secs(n)));
        assert_eq!(KeepAlive::parse("-1"), Some(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("forever"), Some(KeepAlive::Forever));
        assert_eq!(KeepAlive::parse("0"), s(0));
        assert_eq!(KeepAlive::parse("45"), s(45));
        assert_eq!(KeepAlive::parse("30s"), s(30));
        assert_eq!(KeepAlive::parse("5m"), s(300));
        assert_eq!(KeepAlive::parse("1.5m"), s(90));
        assert_eq!(KeepAlive::parse("2h"), s(7200));
        assert_eq!(
            KeepAlive::parse("250ms"),
            Some(KeepAlive::For(Duration::from_millis(250)))
        );
        for bad in ["", "soon", "5x", "m", "NaN", "1e400"] {
            assert_eq!(KeepAlive::parse(bad), None, "{bad}");
        }
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!(-1)),
            Some(KeepAlive::Forever)
        );
        assert_eq!(KeepAlive::from_json(&serde_json::json!("10m")), s(600));
        assert_eq!(KeepAlive::from_json(&serde_json::json!(true)), None);
        assert!(KeepAlive::default().expired(Duration::from_secs(300)));
        assert!(!KeepAlive::Forever.expired(Duration::MAX));
    }
}
