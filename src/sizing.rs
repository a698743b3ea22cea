//! Sizing the KV pool from a byte budget or a share of the machine's available memory.

use anyhow::{Context, Result, bail};

/// Parses `512MiB`, `2GiB`, `1.5G`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("{s:?} is not a size like 512MiB or 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB, K, M, G)"),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes < 1.0 {
        bail!("size {s:?} must be at least one byte");
    }
    Ok(bytes as usize)
}

/// `MemAvailable` from `/proc/meminfo`.
pub fn mem_available() -> Result<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:")).context("/proc/meminfo has no MemAvailable")?;
    let kib: usize = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).context("unreadable MemAvailable")?;
    Ok(kib * 1024)
}

/// The KV budget in bytes: explicit bytes win, else a fraction of available memory.
pub fn kv_budget(bytes: Option<&str>, fraction: Option<f64>) -> Result<usize> {
    match (bytes, fraction) {
        (Some(_), Some(_)) => bail!("give --kv-cache-bytes or --kv-cache-fraction, not both"),
        (Some(b), None) => parse_bytes(b),
        (None, Some(f)) => {
            if !(f > 0.0 && f <= 0.95) {
                bail!("--kv-cache-fraction must be in (0, 0.95], got {f}");
            }
            Ok((mem_available()? as f64 * f) as usize)
        }
        (None, None) => Ok(1 << 30),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_bad_ones_are_named() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("12XB").unwrap_err().to_string().contains("XB"));
        assert!(parse_bytes("lots").is_err());
        assert!(kv_budget(Some("1G"), Some(0.5)).is_err());
        assert!(kv_budget(None, Some(1.5)).unwrap_err().to_string().contains("--kv-cache-fraction"));
        assert!(kv_budget(None, Some(0.1)).unwrap() > 0);
    }
}
