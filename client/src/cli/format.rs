//! Human-readable sizes, durations and tables.

/// Bytes in the units `ollama ps` uses (decimal: KB, MB, GB).
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.0} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0} KB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60) {
        (0, 0, 0, sec) => format!("{sec}s"),
        (0, 0, m, sec) => format!("{m}m {sec}s"),
        (0, h, m, _) => format!("{h}h {m}m"),
        (d, h, _, _) => format!("{d}d {h}h"),
    }
}

/// The hot/cold split as `ollama ps` shows a CPU/GPU split: `0%/100% GPU/CPU`.
pub fn processor(hot_share: f32) -> String {
    let hot = (f64::from(hot_share) * 100.0).round().clamp(0.0, 100.0);
    format!("{hot:.0}%/{:.0}% GPU/CPU", 100.0 - hot)
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(bytes(98_000_000), "98 MB");
        assert_eq!(bytes(7_300_000_000), "7.3 GB");
        assert_eq!(duration(3725.0), "1h 2m");
        assert_eq!(processor(0.0), "0%/100% GPU/CPU");
        assert_eq!(processor(0.25), "25%/75% GPU/CPU");
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
